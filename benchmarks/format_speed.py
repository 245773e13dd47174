"""How fast is rounding to each number format, per backend?

One call of each format's rounding on a 128x64x32x32 float tensor (an
activation of VGG16's first block at batch 128), stochastic and nearest,
with our kernels (torch backend) and qtorch's where it has the format; a
plain copy is the floor. Prints a table and writes JSON:

    python -m benchmarks.format_speed [--device cpu|cuda] [--formats SPEC ...] [--json PATH]
"""

import argparse
import json
import os
import platform
import sys

import torch

from benchmarks.quantization_speed import median_seconds
from swalp.quant import backends, specs

DEFAULT_FORMATS = ("bfp8", "bfp8/32", "fixed8.6", "e4m3", "e5m2", "bf16", "fp8e4m3", "fp8e5m2", "mxfp8",
                   "mxfp8-ceil", "mxfp6e3m2", "mxfp4", "mxint8")


def format_table(device, spec_list, repeats):
    x = torch.randn(128, 64, 32, 32, device=device)
    available = [backends.TORCH_BACKEND]
    try:
        available.append(backends.load_qtorch_backend())
    except backends.BackendUnavailable as error:
        print(f"qtorch unavailable: {error}", file=sys.stderr)
    rows = [{"format": "copy (floor)", "backend": "-", "stochastic ms": None,
             "nearest ms": 1000 * median_seconds(lambda: x.clone(), device, repeats)}]
    for spec in spec_list:
        number_format = specs.parse(spec)
        for backend in available:
            if not backend.supports(number_format):
                continue
            row = {"format": number_format.spec, "backend": backend.name}
            for rounding in ("stochastic", "nearest"):
                seconds = median_seconds(lambda: number_format.quantize(x, rounding, backend), device, repeats)
                row[f"{rounding} ms"] = 1000 * seconds
            rows.append(row)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--formats", nargs="+", default=list(DEFAULT_FORMATS), type=specs.argument)
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per format (median)")
    parser.add_argument("--json", default=os.path.join("benchmarks", "results", "format_speed.json"))
    args = parser.parse_args()
    device = torch.device(args.device)

    import tabulate

    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                    f"{torch.get_num_threads()} torch threads")
    print(f"Machine: {machine}; torch {torch.__version__}")
    rows = format_table(device, args.formats, args.repeats)
    print("\nRounding a 128x64x32x32 tensor to each format, per call (median)")
    print(tabulate.tabulate(rows, headers="keys", floatfmt=".1f", missingval="-"))
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as handle:
        json.dump({"machine": machine, "torch": torch.__version__, "device": str(device), "formats": rows}, handle,
                  indent=2)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
