"""What do checkpoint checksums cost next to writing and reading the file?

Builds the tensors of a VGG16 CIFAR10 checkpoint with an 8-bit accumulator
(weights, SWA weights, momentum buffers, accumulators; untrained values,
the same bytes as a trained run's) and times, median of --repeats:
writing it as train.py does (torch.save to a temporary file, fsync, rename),
computing its content checksum, loading it, and loading plus verifying.
Prints a table and, with --json, writes one:

    python -m benchmarks.checkpoint_cost [--dir DIR] [--repeats N] [--json PATH]
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time

import torch
from torch.optim.swa_utils import AveragedModel

import models
from swalp.run import checkpoint_files, rng, state


def vgg16_state():
    net = models.build_model("VGG16", 10)
    parameters = list(net.parameters())
    return {
        "epoch": 1, "step": 0,
        "model_state": net.state_dict(),
        "swa_state": AveragedModel(net).state_dict(),
        "optimizer_state": {"state": {i: {"momentum_buffer": torch.randn_like(p)} for i, p in enumerate(parameters)},
                            "param_groups": [{"params": list(range(len(parameters)))}]},
        "weight_acc": [p.detach().clone() for p in parameters],
        "config": {}, "history": [], "epoch_totals": state.new_epoch_totals(), "noise_step": 0, "world_size": 1,
        "rng": [rng.rng_state()], "loader_generator": torch.Generator().get_state(),
    }


def median_seconds(function, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temporary folder)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None, metavar="PATH")
    args = parser.parse_args(argv)

    directory = args.dir or tempfile.mkdtemp(prefix="checkpoint-cost-")
    os.makedirs(directory, exist_ok=True)
    state = vgg16_state()
    path = os.path.join(directory, "checkpoint.pt")

    def write_plain():
        with open(f"{path}.tmp", "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(f"{path}.tmp", path)

    def write_sealed():
        checkpoint_files.save_checkpoint(directory, state)

    try:
        rows = [
            ("write (torch.save, fsync, rename)", median_seconds(write_plain, args.repeats)),
            ("content checksum", median_seconds(lambda: checkpoint_files.content_checksum(state), args.repeats)),
            ("write with checksum (save_checkpoint)", median_seconds(write_sealed, args.repeats)),
            ("load (torch.load, weights only)", median_seconds(
                lambda: torch.load(path, map_location="cpu", weights_only=True), args.repeats)),
        ]
        sealed = checkpoint_files.save_checkpoint(directory, state)
        rows.append(("load with checksum and NaN check (load_checkpoint)",
                     median_seconds(lambda: state.load_checkpoint(sealed), args.repeats)))
        size = os.path.getsize(sealed)
    finally:
        if args.dir is None:
            shutil.rmtree(directory)

    print(f"VGG16 CIFAR10 checkpoint with accumulator: {size / 2 ** 20:.0f} MB, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}")
    print(f"{'operation':52} {'seconds':>8} {'MB/s':>8}")
    for name, seconds in rows:
        print(f"{name:52} {seconds:8.3f} {size / 2 ** 20 / seconds:8.0f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"bytes": size, "seconds": dict(rows)}, handle, indent=2)


if __name__ == "__main__":
    main()
