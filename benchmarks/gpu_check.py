"""The one command to run when a GPU is lent: is CUDA's default path right and fast?

Sections, each written to the JSON file as soon as it ends, so that a
timeout keeps what finished (about 5 minutes in all on one GPU):

  versions      torch, triton, CUDA, cuDNN, the device
  compile       first-compile (and then cached) time of every kernel family and mode
  nearest       nearest rounding, edge cases (specials, subnormals, ties, huge
                blocks) of every format: triton on CUDA == torch on CUDA == torch on the CPU
  stochastic    stochastic rounding on CUDA == the same kernels under Triton's
                interpreter on the CPU, for the same noise keys
  syncs         host syncs in the training loop (torch.cuda.set_sync_debug_mode),
                per backend, and in a batch of the batched loader
  train         train.py on CUDA (digits, PreResNet20, 8 bits): twice with
                --deterministic, bit-compared; 2 epochs == 1 epoch + --resume auto
  speed         launches, FP vs 8-bit VGG16 step, rounding vs copy per backend
                (benchmarks.backends), against the targets
  compiled      --compile's rounding (Inductor's Triton kernels) == the triton
                backend's bits, stochastic, and == eager torch, nearest; its
                VGG16 step and rounding times (benchmarks.compiled)

    python -m benchmarks.gpu_check [--sections NAME ...] [--json PATH]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings

if __name__ == "__main__" and "TRITON_CACHE_DIR" not in os.environ:
    # A cache of our own, empty: the compile section times first compiles.
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-cache-")

import torch  # noqa: E402

from swalp.quant import backends, specs  # noqa: E402
from swalp.quant.formats import BlockFormat, FixedFormat, FloatFormat  # noqa: E402
from swalp.quant.noise import NoiseKey  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRITON_FORMATS = ("bfp2", "bfp4", "bfp8", "bfp12", "bfp22", "fixed8.6", "fixed4.2", "e4m3", "e5m2", "e8m7", "e5m10")
OTHER_FORMATS = ("fp8e4m3", "fp8e5m2", "mxfp8", "mxfp8-ceil", "mxfp6e2m3", "mxfp6e3m2", "mxfp4", "mxint8",
                 "bfp8/32")
KEYS = [NoiseKey(5, identity, step, domain) for identity, step, domain in ((0, 0, 0), (2, 7, 1), (4097, 2 ** 20, 6))]
TARGETS = {"triton step / FP step": 1.3, "rounding / copy": 1.5}


def edge_cases():
    """Blocks of every scale, zeros, subnormals, values near 2^126, powers of
    two, ties between grid points, inf and NaN (a 2-D tensor of rows)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 96, generator=generator) * torch.logspace(-38, 36, 64).view(64, 1)
    x[3] = 0
    x[5, ::3] = 0
    x[7] = torch.randn(96, generator=generator) * 1e-41
    x[8, 0] = 1e-45
    x[9, 1] = 8e37
    x[10] = 2.0 ** torch.randint(-20, 20, (96,), generator=generator).float()
    x[11] = (torch.arange(96) - 48 + 0.5) / 8  # ties for steps of 1/8 and coarser
    x[12, :3] = torch.tensor([float("inf"), -float("inf"), float("nan")])
    x[13, 0] = 3.3e38
    return x


def same_bits(a, b):
    """Bit-identical, except that any NaN equals any NaN (the CPU's and
    CUDA's default NaN differ in sign); and the count of differing elements."""
    a, b = a.cpu(), b.cpu()
    both_nan = a.isnan() & b.isnan()
    differ = (a.view(torch.int32) != b.view(torch.int32)) & ~both_nan
    return int(differ.sum())


def section_versions(device):
    properties = torch.cuda.get_device_properties(device)
    import triton

    return {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "triton": triton.__version__, "device": properties.name,
            "capability": list(torch.cuda.get_device_capability(device)),
            "memory_gb": round(properties.total_memory / 2 ** 30, 1)}


def triton_backend(device):
    return backends.load_triton_backend(device)


def section_compile(device):
    from swalp.quant import triton_kernels

    backend = triton_backend(device)
    rows = []
    for number_format in (BlockFormat(8), FixedFormat(8, 6), FloatFormat(4, 3)):
        for rounding in ("nearest", "stochastic"):
            times = []
            for _ in range(2):
                start = time.perf_counter()
                triton_kernels.compile_for(device, backend, [number_format], rounding)
                torch.cuda.synchronize(device)
                times.append(time.perf_counter() - start)
            rows.append({"format": number_format.spec, "rounding": rounding, "first_s": times[0],
                         "cached_s": times[1]})
    return {"families": rows}


def section_nearest(device):
    backend = triton_backend(device)
    x = edge_cases()
    rows = []
    for spec in TRITON_FORMATS + OTHER_FORMATS:
        number_format = specs.parse(spec)
        cpu = number_format.quantize(x, "nearest", backends.TORCH_BACKEND)
        row = {"format": spec, "torch_cuda_vs_cpu": same_bits(
            number_format.quantize(x.to(device), "nearest", backends.TORCH_BACKEND), cpu)}
        if backend.supports(number_format):
            row["triton_cuda_vs_cpu"] = same_bits(number_format.quantize(x.to(device), "nearest", backend), cpu)
        rows.append(row)
    return {"rows": rows, "all_identical": all(value == 0 for row in rows for key, value in row.items()
                                               if key != "format")}


def stochastic_bits(device):
    """Stochastic rounding of the edge cases with the triton kernels for each key and format."""
    from swalp.quant import triton_kernels

    x = edge_cases().to(device)
    bits = {}
    for spec in ("bfp8", "fixed8.6", "e4m3"):
        number_format = specs.parse(spec)
        for index, key in enumerate(KEYS):
            backend = backends.Backend("triton", triton_kernels.block_quantize, triton_kernels.fixed_point_quantize,
                                       triton_kernels.float_quantize, seedable=True, counter_based=True)
            bits[f"{spec}/{index}"] = number_format.quantize(x, "stochastic", backend, key).cpu()
            parts = [x[:20].clone(), x[20:].clone()]
            triton_kernels.round_many(parts, number_format, "stochastic", key)
            bits[f"{spec}/{index}/batched"] = torch.cat(parts).cpu()
    return bits


def section_stochastic(device):
    ours = stochastic_bits(device)
    with tempfile.TemporaryDirectory() as work:
        path = os.path.join(work, "interpreted.pt")
        child = subprocess.run([sys.executable, "-m", __spec__.name, "--interpreted-bits", path], cwd=ROOT,
                               env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True,
                               timeout=600)
        if child.returncode != 0:
            return {"error": child.stderr.strip().splitlines()[-1:]}
        theirs = torch.load(path)
    rows = {name: same_bits(ours[name], theirs[name]) for name in ours}
    return {"differing_elements": rows, "all_identical": not any(rows.values())}


def epoch_syncs(device, backend, batch_size):
    """Host syncs in one epoch of train.py's loop (digits, 8 bits), counted
    by CUDA's sync debug mode as warnings."""
    import train

    with tempfile.TemporaryDirectory() as run_dir:
        args = train.parse_args(["--dataset", "digits", "--model", "PreResNet20", "--epochs", "1", "--swa_start", "1",
                                 "--batch_size", str(batch_size), "--loader", "batched", "--format", "bfp8",
                                 "--quant-backend", backend, "--device", str(device), "--dir", run_dir])
        run = train.build(args, device, run_dir)
        run.open_logs(resumed=False)
        train.train_epoch(run, stop=False)  # warm-up: compiles, allocates
        run.state.epoch, run.state.epoch_totals = 0, train.new_epoch_totals()
        torch.cuda.synchronize(device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                train.train_epoch(run, stop=False)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        run.close_logs()
        return run.steps_per_epoch, len(caught)


def section_syncs(device):
    rows = []
    for backend in ("torch", "triton"):
        counts = dict(epoch_syncs(device, backend, batch_size) for batch_size in (1347, 449))  # 1 step, then 3
        rows.append({"backend": backend, "syncs_per_epoch": counts,
                     "per_step": (counts.get(3, 0) - counts.get(1, 0)) / 2})
    from swalp.data import batched, datasets

    train_set, test_set, _ = datasets.load_data("digits", None)
    loader, _, _ = batched.make_loaders(train_set, test_set, 128, 1, device)
    batches = iter(loader)
    next(batches)
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            next(batches)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return {"loop": rows, "loader_batch_syncs": len(caught)}


def train_py(run_dir, *flags):
    command = [sys.executable, os.path.join(ROOT, "train.py"), "--dataset", "digits", "--model", "PreResNet20",
               "--swa_start", "1", "--num_workers", "0", "--loader", "batched", "--device", "cuda",
               "--deterministic", "--wl-weight", "8", "--wl-activate", "8", "--wl-grad", "8", "--wl-error", "8",
               "--wl-momentum", "8", "--wl-acc", "8", "--dir", run_dir, *flags]
    child = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if child.returncode != 0:
        raise RuntimeError(child.stderr.strip()[-2000:])
    return child.stdout


def same_checkpoints(first, second):
    one, two = (torch.load(path, weights_only=True) for path in (first, second))
    return all(torch.equal(one[part][key], two[part][key]) for part in ("model_state", "swa_state")
               for key in one[part])


def section_train(device):
    with tempfile.TemporaryDirectory() as work:
        runs = {name: os.path.join(work, name) for name in ("first", "again", "resumed")}
        start = time.perf_counter()
        out = train_py(runs["first"], "--epochs", "2")
        seconds = time.perf_counter() - start
        train_py(runs["again"], "--epochs", "2")
        train_py(runs["resumed"], "--epochs", "1")
        train_py(runs["resumed"], "--epochs", "2", "--resume", "auto")
        final = {name: os.path.join(path, "checkpoint-2.pt") for name, path in runs.items()}
        return {"backend_line": next((line for line in out.splitlines() if line.startswith("weight")), None),
                "seconds_per_2_epochs": seconds,
                "repeats_bit_for_bit": same_checkpoints(final["first"], final["again"]),
                "resume_is_exact": same_checkpoints(final["first"], final["resumed"])}


def section_speed(device):
    from benchmarks import backends as backend_benchmark

    settings = argparse.Namespace(batch_size=128, count_batch=128, steps=10, repeats=20)
    rows = [row for row in (backend_benchmark.run_config(config, device, settings)
                            for config in backend_benchmark.CONFIGS) if row]
    by_config = {row["config"]: row for row in rows}
    checks = {}
    if "fp" in by_config and "triton" in by_config:
        checks["triton step / FP step"] = by_config["triton"]["seconds_per_step"] / by_config["fp"]["seconds_per_step"]
        checks["rounding / copy"] = by_config["triton"]["rounding_ms"] / by_config["triton"]["copy_ms"]
    if "qtorch" in by_config and "triton" in by_config:
        checks["triton faster than qtorch"] = (by_config["triton"]["seconds_per_step"]
                                               < by_config["qtorch"]["seconds_per_step"])
    return {"configs": rows, "checks": checks, "targets": TARGETS}


def compiled_bits(device):
    """--compile's rounding on `device` (on CUDA Inductor's Triton kernels):
    elements differing from the triton backend's stochastic rounding for the
    same keys (the same counter-based bits), one tensor and batched, and from eager
    torch's nearest rounding, per format."""
    from swalp.quant.optim import compile_rounding

    triton = triton_backend(device)
    x = edge_cases().to(device)
    stochastic = {}
    for spec in ("bfp8", "fixed8.6", "e4m3"):
        number_format = specs.parse(spec)
        for index, key in enumerate(KEYS):
            torch._dynamo.reset()  # each format and key its own graph, however many
            tensor_key = key._replace(step=torch.tensor(key.step, device=device))

            def rounded(tensor):
                return number_format.quantize(tensor, "stochastic", backends.COMPILED_BACKEND, tensor_key)

            def batch(parts):
                backends.COMPILED_BACKEND.round_many(parts, number_format, "stochastic", tensor_key)
                return parts

            ours, batched = compile_rounding(rounded)(x), compile_rounding(batch)([x[:20].clone(), x[20:].clone()])
            theirs = [x[:20].clone(), x[20:].clone()]
            triton.round_many(theirs, number_format, "stochastic", key)
            stochastic[f"{spec}/{index}"] = same_bits(ours, number_format.quantize(x, "stochastic", triton, key))
            stochastic[f"{spec}/{index}/batched"] = same_bits(torch.cat(batched), torch.cat(theirs))
    nearest = {}
    for spec in TRITON_FORMATS + OTHER_FORMATS + ("nvfp4",):
        torch._dynamo.reset()
        number_format = specs.parse(spec)
        compiled = compile_rounding(lambda tensor: number_format.quantize(tensor, "nearest", backends.COMPILED_BACKEND))
        nearest[spec] = same_bits(compiled(x), number_format.quantize(x, "nearest", backends.TORCH_BACKEND))
    return {"stochastic_vs_triton": stochastic, "nearest_vs_eager": nearest,
            "all_identical": not any(stochastic.values()) and not any(nearest.values())}


def section_compiled(device):
    """compiled_bits, and the VGG16 step and rounding times of benchmarks.compiled."""
    from benchmarks import compiled as compiled_benchmark

    result = compiled_bits(device)
    steps = [compiled_benchmark.step_row(spec, compiled, device, 128, 10) for spec in (None, "bfp8")
             for compiled in (False, True)]
    rounding, compile_seconds = compiled_benchmark.rounding_rows(device, 20)
    by = {(row["precision"], row["mode"]): row["seconds_per_step"] for row in steps}
    return {**result, "steps": steps, "rounding": rounding, "rounding_compile_seconds": compile_seconds,
            "checks": {"compiled 8-bit step / compiled FP step": by[("bfp8", "compiled")] / by[("fp32", "compiled")],
                       "compiled rounding / copy": rounding[1]["x copy"]}}


SECTIONS = {"versions": section_versions, "compile": section_compile, "nearest": section_nearest,
            "stochastic": section_stochastic, "syncs": section_syncs, "train": section_train,
            "speed": section_speed, "compiled": section_compiled}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    parser.add_argument("--json", default=os.path.join("benchmarks", "results", "gpu_check.json"))
    parser.add_argument("--interpreted-bits", metavar="PATH", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.interpreted_bits:  # the stochastic section's other half, under TRITON_INTERPRET=1
        torch.save(stochastic_bits(torch.device("cpu")), args.interpreted_bits)
        return
    if not torch.cuda.is_available():
        print("error: no CUDA device here; run this where a GPU is lent", file=sys.stderr)
        sys.exit(2)
    device = torch.device("cuda", torch.cuda.current_device())
    results = {}
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    for name in args.sections:
        start = time.perf_counter()
        try:
            results[name] = SECTIONS[name](device)
        except Exception as error:  # one section's failure must not lose the others
            results[name] = {"error": f"{type(error).__name__}: {error}"}
        results[name]["section_seconds"] = round(time.perf_counter() - start, 2)
        print(f"{name}: {json.dumps(results[name])[:2000]}", flush=True)
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
