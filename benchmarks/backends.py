"""What does each rounding backend cost a training step, and does it stall?

For full precision and each backend (torch, triton, qtorch where it builds),
on one device, each in a process of its own:

(a) kernel launches and host syncs (`aten::_local_scalar_dense`) in one
    VGG16 training step in 8 bits (weights, activations, gradients, errors,
    momentum), counted by torch.profiler at batch --count-batch. On CUDA the
    launches are the profiler's device events that are kernels, copies or
    fills (not the `triton::` annotation ranges, which the profiler also
    shows on the device's timeline); on the CPU, where nothing is
    launched, the innermost aten operations that are neither allocations nor
    views (one kernel each on a GPU) plus one per Triton kernel;
(b) seconds per training step, full precision vs 8 bits, VGG16 at batch
    --batch-size on synthetic CIFAR-size data (median of --steps);
(c) 8-bit stochastic block rounding (one exponent per index of dim 0) of a
    128x64x32x32 tensor against a plain copy of it: ms per call and GB/s
    (bytes read and written), and whether the backend's nearest rounding of
    it is bit-identical to the torch backend's.

qtorch on CUDA compiles its kernels with nvcc; without one on PATH (or in
CUDA_HOME) its configuration is skipped at once with a note.

On the CPU the triton backend runs under Triton's interpreter
(TRITON_INTERPRET=1): its counts are exact, its times meaningless, so they
are not measured. Prints tables and writes JSON:

    python -m benchmarks.backends [--device cpu|cuda] [--json PATH]
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys

import torch

from benchmarks.quantization_speed import median_seconds, synchronize, training_step
from swalp.quant import backends, formats, quantizer

CONFIGS = ("fp", "torch", "triton", "qtorch")
# Top-level operations that only allocate or make views: no kernel on a GPU.
NO_KERNEL = {"aten::empty", "aten::empty_like", "aten::empty_strided", "aten::view", "aten::reshape",
             "aten::split", "aten::split_with_sizes", "aten::detach", "aten::detach_", "aten::set_", "aten::t",
             "aten::transpose", "aten::flatten", "aten::as_strided", "aten::alias", "aten::zero_"}


def interpreted(config, device):
    return config == "triton" and device.type != "cuda"


def count_step(step, device):
    """(launches, host syncs) of one step, after a warm-up step."""
    step()
    synchronize(device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profile:
        step()
        synchronize(device)
    events = profile.events()
    if device.type == "cuda":
        launches = sum(event.device_type == torch.autograd.DeviceType.CUDA and not event.is_user_annotation
                       and not event.name.startswith("triton::") for event in events)
    else:
        launches = sum(map(would_launch, events))
    syncs = sum(event.name == "aten::_local_scalar_dense" for event in events)
    return launches, syncs


def would_launch(event):
    """Whether a CPU profiler event stands for one kernel launch on a GPU: a
    Triton kernel, or an aten operation that calls no other (and is not an
    allocation or a view) outside a Triton kernel, whose interpreter runs
    torch operations of its own."""
    if event.name.startswith("triton::"):
        return True
    if not event.name.startswith("aten::") or event.name in NO_KERNEL:
        return False
    if any(child.name.startswith("aten::") for child in event.cpu_children):
        return False
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("triton::"):
            return False
        parent = parent.cpu_parent
    return True


def rounding_throughput(backend, noise, device, repeats):
    """ms per call and GB/s of 8-bit stochastic block rounding and of a copy."""
    x = torch.randn(128, 64, 32, 32, device=device)
    moved = 2 * x.numel() * x.element_size() / 1e9
    rows = {"copy": median_seconds(lambda: x.clone(), device, repeats)}
    matches = None
    if backend is not None:
        rounding = quantizer.TensorQuantizer(formats.BlockFormat(8), "stochastic", backend, noise)
        rows["rounding"] = median_seconds(lambda: rounding(x), device, repeats)
        nearest = quantizer.TensorQuantizer(formats.BlockFormat(8), "nearest", backend, noise)
        reference = quantizer.TensorQuantizer(formats.BlockFormat(8), "nearest", backends.TORCH_BACKEND)
        matches = bool(torch.equal(nearest(x).view(torch.int32), reference(x).view(torch.int32)))
    return {f"{name}_ms": 1000 * seconds for name, seconds in rows.items()} | {
        f"{name}_gb_per_s": moved / seconds for name, seconds in rows.items()} | {"nearest_matches_torch": matches}


def nvcc_missing(config, device):
    """Why qtorch cannot build its CUDA kernels here, or None."""
    if config != "qtorch" or device.type != "cuda":
        return None
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or ""
    if shutil.which("nvcc") or os.path.exists(os.path.join(home, "bin", "nvcc")):
        return None
    return "qtorch's CUDA kernels need nvcc (on PATH or in CUDA_HOME); skipped"


def measure(config, device, batch_size, count_batch, steps, repeats):
    """Every figure of one configuration (run in a child process)."""
    row = {"config": config, "device": str(device), "interpreted": interpreted(config, device)}
    step, backend, noise = training_step(config, device, count_batch)
    row["launches_per_step"], row["syncs_per_step"] = count_step(step, device)
    if row["interpreted"]:
        return row
    step, backend, noise = training_step(config, device, batch_size)
    row["seconds_per_step"] = median_seconds(step, device, steps)
    row.update(rounding_throughput(backend, noise, device, repeats))
    return row


def run_config(config, device, args):
    missing = nvcc_missing(config, device)
    if missing:
        print(f"{config}: {missing}", file=sys.stderr)
        return None
    command = [sys.executable, "-m", __spec__.name, "--device", str(device), "--batch-size",
               str(args.batch_size), "--count-batch", str(args.count_batch), "--steps", str(args.steps),
               "--repeats", str(args.repeats), "--config", config]
    env = dict(os.environ, TRITON_INTERPRET="1") if interpreted(config, device) else os.environ
    child = subprocess.run(command, capture_output=True, text=True, env=env)
    if child.returncode != 0:
        print(f"{config}: failed: {child.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(child.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=128, help="batch of the timed steps")
    parser.add_argument("--count-batch", type=int, default=None,
                        help="batch of the profiled step (default: --batch-size on CUDA, 8 on the CPU, where "
                             "the interpreter is slow; the counts do not depend on it)")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per configuration (median)")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounding calls (median)")
    parser.add_argument("--json", default=os.path.join("benchmarks", "results", "backends.json"))
    parser.add_argument("--config", choices=CONFIGS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.count_batch is None:
        args.count_batch = args.batch_size if device.type == "cuda" else 8

    if args.config:
        print(json.dumps(measure(args.config, device, args.batch_size, args.count_batch, args.steps,
                                 args.repeats)))
        return

    import tabulate

    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                    f"{torch.get_num_threads()} torch threads")
    print(f"Machine: {machine}; torch {torch.__version__}")
    rows = [row for row in (run_config(config, device, args) for config in CONFIGS) if row]
    fp = next((row for row in rows if row["config"] == "fp"), None)
    for row in rows:
        if fp and fp.get("seconds_per_step") and row.get("seconds_per_step"):
            row["ratio_to_fp"] = row["seconds_per_step"] / fp["seconds_per_step"]
        if fp:
            row["launches_vs_fp"] = row["launches_per_step"] / fp["launches_per_step"]
    what = "CUDA kernels" if device.type == "cuda" else "innermost operations"
    print(f"\n(a) one VGG16 step at batch {args.count_batch}: launches ({what}) and host syncs")
    print(tabulate.tabulate([{key: row.get(key) for key in ("config", "interpreted", "launches_per_step",
                                                            "launches_vs_fp", "syncs_per_step")} for row in rows],
                            headers="keys", floatfmt=".2f"))
    print(f"\n(b) seconds per VGG16 step at batch {args.batch_size} (interpreted: not measured)")
    print(tabulate.tabulate([{key: row.get(key) for key in ("config", "seconds_per_step", "ratio_to_fp")}
                             for row in rows], headers="keys", floatfmt=".3f"))
    print("\n(c) 8-bit stochastic block rounding of 128x64x32x32 vs a copy")
    print(tabulate.tabulate([{key: row.get(key) for key in ("config", "rounding_ms", "rounding_gb_per_s", "copy_ms",
                                                            "copy_gb_per_s", "nearest_matches_torch")}
                             for row in rows if row["config"] != "fp"],
                            headers="keys", floatfmt=".2f"))

    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as handle:
        json.dump({"machine": machine, "torch": torch.__version__, "device": str(device),
                   "batch_size": args.batch_size, "count_batch": args.count_batch, "configs": rows}, handle, indent=2)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
