"""How fast is low-precision training here, per quantization backend?

(a) One call of 8-bit block quantization (one exponent per index of dim 0)
    of a 128x64x32x32 float tensor, stochastic and nearest: our tensor-op
    kernel, qtorch's compiled kernel, the original SWALP's pure-PyTorch
    formula, and a plain copy as the floor.
(b) One VGG16 CIFAR training step (batch 128): full precision and 8-bit
    (weights, activations, gradients, errors, momentum) with each backend;
    seconds per step, the ratio to full precision and peak memory. Each
    configuration runs in its own process so that peak memory is its own.

Prints a table and writes JSON:

    python -m benchmarks.quantization_speed [--device cpu|cuda] [--json PATH]
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

import models
import swalp
from swalp.quant import backends, torch_kernels


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(function, device, repeats):
    function()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def original_formula(x, wl, rounding):
    """The original SWALP quantizer's arithmetic, block exponents along dim 0:
    scale by 2^(wl - 2 - e), round (floor after adding uniform noise for
    stochastic), clamp to the wl-bit integer range, scale back."""
    peak = x.abs().reshape(x.shape[0], -1).amax(1)
    exponent = torch.floor(torch.log2(peak)).clamp(-128, 127).view(-1, *[1] * (x.dim() - 1))
    scaled = x * 2.0 ** (wl - 2 - exponent)
    if rounding == "stochastic":
        scaled = torch.floor(scaled + torch.rand_like(scaled))
    else:
        scaled = torch.round(scaled)
    return scaled.clamp(-(2 ** (wl - 1)), 2 ** (wl - 1) - 1) * 2.0 ** (exponent - wl + 2)


def kernel_table(device, repeats):
    x = torch.randn(128, 64, 32, 32, device=device)
    candidates = {"torch (ours)": torch_kernels.block_quantize,
                  "original formula": lambda t, wl, dim, rounding: original_formula(t, wl, rounding)}
    try:
        candidates["qtorch"] = backends.load_qtorch_backend().block
    except backends.BackendUnavailable as error:
        print(f"qtorch unavailable: {error}", file=sys.stderr)
    rows = [{"kernel": "copy (floor)", "rounding": "-",
             "ms": 1000 * median_seconds(lambda: x.clone(), device, repeats)}]
    for rounding in ("stochastic", "nearest"):
        for name, kernel in candidates.items():
            seconds = median_seconds(lambda: kernel(x, 8, 0, rounding), device, repeats)
            rows.append({"kernel": name, "rounding": rounding, "ms": 1000 * seconds})
    return rows


def training_step(config, device, batch_size):
    """A closure running one VGG16 training step on synthetic CIFAR-size data
    in `config` (fp, or a --quant-backend name for 8 bits everywhere but the
    accumulator), its backend and its noise."""
    torch.manual_seed(0)
    net = models.build_model("VGG16", num_classes=10).to(device)
    noise = swalp.StepNoise(0)
    backend = None if config == "fp" else backends.choose_backend(config, device)[0]
    spec = None if config == "fp" else "bfp8"
    swalp.quantize_model(net, spec, spec, backend=backend or "torch", noise=noise)
    sgd = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    optimizer = swalp.wrap_optimizer(sgd, weight=spec, grad=spec, momentum=spec, backend=backend or "torch",
                                     noise=noise)
    inputs = torch.randn(batch_size, 3, 32, 32, device=device)
    targets = torch.randint(0, 10, (batch_size,), device=device)

    def step():
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(inputs), targets).backward()
        optimizer.step()

    return step, backend, noise


def step_config(name, device, batch_size, steps):
    """Seconds per VGG16 training step and peak memory for one configuration
    (run in a child process)."""
    step, _, _ = training_step(name, device, batch_size)
    seconds = median_seconds(step, device, steps)
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(device) / 2 ** 20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    return {"config": name, "seconds_per_step": seconds, "peak_memory_mb": peak_mb}


def step_table(device, batch_size, steps):
    rows = []
    for name in ("fp", "torch", "qtorch"):
        command = [sys.executable, "-m", __spec__.name, "--device", str(device), "--batch-size",
                   str(batch_size), "--steps", str(steps), "--step-config", name]
        child = subprocess.run(command, capture_output=True, text=True)
        if child.returncode != 0:
            print(f"{name}: failed: {child.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            continue
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
    fp = next((row["seconds_per_step"] for row in rows if row["config"] == "fp"), None)
    for row in rows:
        row["ratio_to_fp"] = row["seconds_per_step"] / fp if fp else None
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per kernel (median)")
    parser.add_argument("--steps", type=int, default=7, help="timed training steps per configuration (median)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--json", default=os.path.join("benchmarks", "results", "quantization_speed.json"))
    parser.add_argument("--step-config", choices=("fp", "torch", "qtorch"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)

    if args.step_config:
        print(json.dumps(step_config(args.step_config, device, args.batch_size, args.steps)))
        return

    import tabulate

    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                    f"{torch.get_num_threads()} torch threads")
    print(f"Machine: {machine}; torch {torch.__version__}")
    kernels = kernel_table(device, args.repeats)
    floor = {row["rounding"]: row["ms"] for row in kernels if row["kernel"] == "qtorch"}
    for row in kernels:
        row["qtorch / this"] = floor[row["rounding"]] / row["ms"] if row["rounding"] in floor else None
    print("\n(a) 8-bit block quantization of a 128x64x32x32 tensor, dim 0, per call")
    print(tabulate.tabulate(kernels, headers="keys", floatfmt=".2f"))

    steps = step_table(device, args.batch_size, args.steps)
    print(f"\n(b) VGG16 training step, batch {args.batch_size}, 8-bit everywhere except the accumulator")
    print(tabulate.tabulate(steps, headers="keys", floatfmt=".2f"))

    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as handle:
        json.dump({"machine": machine, "torch": torch.__version__, "device": str(device),
                   "kernels": kernels, "training_step": steps}, handle, indent=2)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
