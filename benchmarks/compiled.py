"""What does --compile buy? Eager against torch.compile, full precision and 8 bits.

(a) Seconds per VGG16 training step on synthetic CIFAR-size data (median of
    --steps after the compiling ones), full precision and 8 bits (weights,
    activations, gradients, errors, momentum in bfp8, stochastic rounding),
    eager (the torch backend) and compiled (`--compile`: the network's
    forward and backward and the optimizer's rounding under torch.compile,
    Inductor), with the seconds the first step took while compiling, and
    compiled, the first step of a second run (a new process, the compiler's
    cache on disk warm: what a resumed run waits).
(b) 8-bit stochastic block rounding of a 128x64x32x32 tensor, compiled and
    eager, against a copy of it (ms per call): `clone()`, as the speed
    reference measures it, and into a tensor allocated before; and compiled
    nearest rounding, the same passes over memory without the noise: the
    difference is what the noise costs, fused.

Targets: the compiled 8-bit step within 1.15x of the compiled full-precision
step, compiled rounding within 1.5x of a copy. Prints tables and writes JSON:

    python -m benchmarks.compiled [--device cpu|cuda] [--batch-size 128] [--steps 5] [--sections steps rounding]
        [--json PATH]

Run it with an empty cache (TORCHINDUCTOR_CACHE_DIR=a new folder) for the
first steps' compile times.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import tabulate
import torch
import torch.nn.functional as F

import models
import swalp
from benchmarks.quantization_speed import median_seconds, synchronize
from swalp.quant import specs
from swalp.quant.backends import COMPILED_BACKEND, TORCH_BACKEND
from swalp.quant.optim import compile_rounding

KINDS = ("weight", "grad", "momentum")
SECTIONS = ("steps", "rounding")


def training_step(spec, compiled, device, batch_size):
    """One VGG16 training step (a closure) in `spec` (None: full precision), compiled or not."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = models.build_model("VGG16", num_classes=10).to(device)
    noise = swalp.StepNoise(0)
    backend = COMPILED_BACKEND if compiled else TORCH_BACKEND
    swalp.quantize_model(net, spec, spec, backend=backend, noise=noise)
    sgd = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    optimizer = swalp.wrap_optimizer(sgd, **dict.fromkeys(KINDS, spec), backend=backend, noise=noise)
    if compiled:
        net.compile(dynamic=False)
    inputs = torch.randn(batch_size, 3, 32, 32, device=device)
    targets = torch.randint(0, 10, (batch_size,), device=device)

    def step():
        optimizer.zero_grad()
        F.cross_entropy(net(inputs), targets).backward()
        optimizer.step()

    return step


def started_step(spec, compiled, device, batch_size):
    """The training step, called once, and the seconds that first call took (compiling, when compiled)."""
    step = training_step(spec, compiled, device, batch_size)
    began = time.perf_counter()
    step()
    synchronize(device)
    return step, time.perf_counter() - began


def step_row(spec, compiled, device, batch_size, steps):
    step, first = started_step(spec, compiled, device, batch_size)
    row = {"precision": spec or "fp32", "mode": "compiled" if compiled else "eager",
           "seconds_per_step": median_seconds(step, device, steps), "first_step_seconds": first}
    if compiled:  # a second run, in a process of its own, as a resumed run is
        second_run = subprocess.run([sys.executable, "-m", "benchmarks.compiled", "--first-step-of", spec or "fp32",
                                     "--device", str(device), "--batch-size", str(batch_size)],
                                    check=True, capture_output=True, text=True)
        row["second_run_first_step_seconds"] = json.loads(second_run.stdout.splitlines()[-1])["first_step_seconds"]
    return row


def rounding_rows(device, repeats):
    """ms per call: a copy, and 8-bit stochastic block rounding compiled and eager."""
    torch._dynamo.reset()
    x = torch.randn(128, 64, 32, 32, device=device)
    out = torch.empty_like(x)
    bfp8 = specs.parse("bfp8")
    noise = swalp.StepNoise(0)
    key = noise.key(identity=0, stream=0, step=noise.step_tensor(device))

    def compiled_round(tensor):
        return bfp8.quantize(tensor, "stochastic", COMPILED_BACKEND, key)

    def compiled_round_nearest(tensor):
        return bfp8.quantize(tensor, "nearest", COMPILED_BACKEND)

    compiled = compile_rounding(compiled_round)
    began = time.perf_counter()
    compiled(x)
    synchronize(device)
    compile_seconds = time.perf_counter() - began
    compiled_nearest = compile_rounding(compiled_round_nearest)
    eager_key = key._replace(step=0)
    timings = {"copy (clone, the speed reference)": x.clone, "compiled rounding": lambda: compiled(x),
               "compiled nearest rounding (no noise: the passes alone)": lambda: compiled_nearest(x),
               "eager rounding (counter-based noise)": lambda: bfp8.quantize(x, "stochastic", TORCH_BACKEND,
                                                                              eager_key),
               "eager rounding (torch backend)": lambda: bfp8.quantize(x, "stochastic", TORCH_BACKEND),
               "copy into a tensor allocated before": lambda: out.copy_(x)}
    rows = [{"operation": name, "ms": 1e3 * median_seconds(function, device, repeats)}
            for name, function in timings.items()]
    for row in rows:
        row["x copy"] = row["ms"] / rows[0]["ms"]
    return rows, compile_seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration (median)")
    parser.add_argument("--repeats", type=int, default=10, help="timed roundings (median)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="steps: (a), rounding: (b)")
    parser.add_argument("--json", default=os.path.join("benchmarks", "results", "compiled.json"))
    parser.add_argument("--first-step-of", metavar="SPEC",
                        help="(for its own second runs) print only the seconds of the first compiled step in SPEC "
                             "(fp32: full precision), as JSON")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.first_step_of:
        spec = None if args.first_step_of == "fp32" else args.first_step_of
        print(json.dumps({"first_step_seconds": started_step(spec, True, device, args.batch_size)[1]}))
        return
    print(f"{device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
          f"torch {torch.__version__}")
    report = {"device": str(device), "batch_size": args.batch_size, "torch": torch.__version__}
    if "steps" in args.sections:
        steps = [step_row(spec, compiled, device, args.batch_size, args.steps)
                 for spec in (None, "bfp8") for compiled in (False, True)]
        by = {(row["precision"], row["mode"]): row["seconds_per_step"] for row in steps}
        for row in steps:
            row["x compiled fp32"] = row["seconds_per_step"] / by[("fp32", "compiled")]
        print(f"VGG16, batch {args.batch_size}")
        print(tabulate.tabulate(steps, headers="keys", floatfmt=".3f", tablefmt="github"))
        print(f"compiled 8-bit step / compiled fp32 step: "
              f"{by[('bfp8', 'compiled')] / by[('fp32', 'compiled')]:.2f} (target 1.15)\n")
        report["steps"] = steps
    if "rounding" in args.sections:
        rounding, compile_seconds = rounding_rows(device, args.repeats)
        print(f"bfp8 stochastic rounding of a 128x64x32x32 tensor (compiling it took {compile_seconds:.1f} s)")
        print(tabulate.tabulate(rounding, headers="keys", floatfmt=".2f", tablefmt="github"))
        print(f"compiled rounding / copy: {rounding[1]['x copy']:.2f} (target 1.5)")
        report.update(rounding=rounding, rounding_compile_seconds=compile_seconds)
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as handle:
        json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()
