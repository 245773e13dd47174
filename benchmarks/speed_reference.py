"""How fast is this machine? The reference the project's times are given against.

Machines of one kind differ by 2 to 4 times in speed, so every time in the
README and docs/ names the machine it came from and this reference, measured
there: the median time of a plain copy of a 128x64x32x32 float32 tensor
(32 MiB, the activation tensor the rounding benchmarks use), on the thread
count torch uses by default and on one thread. Scale a documented time by
the ratio of your reference to the documented one for a rough expectation.

    python -m benchmarks.speed_reference [--repeats N] [--json PATH]
"""

import argparse
import json
import os
import platform
import statistics
import time

import torch

SHAPE = (128, 64, 32, 32)


def copy_ms(threads, repeats):
    """Median milliseconds of `tensor.clone()` over `repeats` calls on `threads` threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        source = torch.randn(*SHAPE)
        source.clone()  # the first call pays for the allocation
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            source.clone()
            times.append(time.perf_counter() - start)
        return 1000 * statistics.median(times)
    finally:
        torch.set_num_threads(previous)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=21, help="timed copies per thread count (median)")
    parser.add_argument("--json", default=os.path.join("benchmarks", "results", "speed_reference.json"),
                        help="where to write the figures")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    rows = [{"threads": count, "copy_ms": copy_ms(count, args.repeats)} for count in sorted({threads, 1})]
    machine = {"processor": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}
    print(f"machine: {machine['processor']}, {machine['cores']} cores, {machine['cpu_capability']}, "
          f"torch {machine['torch']}")
    for row in rows:
        print(f"copy of a 128x64x32x32 float32 tensor, {row['threads']} thread(s): {row['copy_ms']:.1f} ms")
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as handle:
        json.dump({"machine": machine, "rows": rows}, handle, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
