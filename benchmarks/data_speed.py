"""Does each CIFAR input path keep up with training?

(a) Images per second each path delivers, over whole epochs of a CIFAR10
    training set with its augmentation, batch 128: the batched path
    (`--loader batched`) and torchvision's per-sample path (`--loader
    torchvision`), on the CPU with 1 and 2 torch threads (the per-sample path
    also with 2 loader workers, one thread each), and on CUDA when present
    (the per-sample batches copied to the GPU).
(b) Images per second a VGG16 training step (batch 128) consumes on the same
    device and threads: full precision and 8-bit (weights, activations,
    gradients, errors, momentum; torch backend).
(c) One epoch of `train.py` (8-bit VGG16, the seed's settings, evaluation
    included) with each path: the time of its training steps, of the whole
    epoch and of the process. The paths take turns for --rounds rounds and
    each keeps its fastest run (this machine may be shared).

Data: real CIFAR10 under --data_path, or by default a fake CIFAR10 in the
real on-disk format (swalp/data/fake_cifar.py) of --images training and
--test-images test images, loaded through torchvision like real data.

    python -m benchmarks.data_speed [--images 2560] [--rounds 2] [--json PATH]
"""

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import types

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import models
import swalp
from swalp.data import batched, cifar, loaders
from swalp.data.fake_cifar import patch_torchvision_md5, write_fake_cifar

BATCH = 128
# The input paths of (c): the batched one, and the per-sample one with the
# default 4 loader workers and in the training process.
PATHS = (("batched", 0), ("torchvision", 4), ("torchvision", 0))
EIGHT_BIT = ["--wl-weight", "8", "--wl-grad", "8", "--wl-activate", "8", "--wl-error", "8", "--wl-momentum", "8"]


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_second(loader, device, min_seconds):
    """Images per second over whole epochs of `loader` (each epoch's batches
    moved to `device`), repeated until `min_seconds` have passed, after one
    epoch of warm-up."""
    def epoch(number):
        loaders.set_epoch(loader, number)
        count = 0
        for inputs, _ in loader:
            inputs.to(device, non_blocking=True)
            count += len(inputs)
        synchronize(device)
        return count

    epoch(0)
    images, number, start = 0, 1, time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        images += epoch(number)
        number += 1
    return images / (time.perf_counter() - start)


def loader_rows(train_set, test_set, device, threads, min_seconds):
    torch.set_num_threads(threads)
    device_loader, _, _ = batched.make_loaders(train_set, test_set, BATCH, 1, device)
    rows = [{"what": "batched path", "device": str(device), "threads": threads,
             "images_per_s": images_per_second(device_loader, device, min_seconds)}]
    workers = [0] if threads == 1 else [0, threads]
    for count in workers:
        per_sample, _, _ = loaders.make_loaders(train_set, test_set, BATCH, count, 1, device.type == "cuda")
        what = "per-sample path" + (f", {count} loader workers" if count else ", in process")
        rows.append({"what": what, "device": str(device), "threads": threads,
                     "images_per_s": images_per_second(per_sample, device, min_seconds)})
    return rows


def step_rows(device, threads, steps):
    """Images per second of VGG16 training steps, full precision and 8-bit."""
    torch.set_num_threads(threads)
    rows = []
    for name in ("full precision", "8-bit"):
        torch.manual_seed(0)
        net = models.build_model("VGG16", num_classes=10).to(device)
        noise = swalp.StepNoise(0)
        spec = "bfp8" if name == "8-bit" else None
        swalp.quantize_model(net, spec, spec, backend="torch", noise=noise)
        sgd = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        optimizer = swalp.wrap_optimizer(sgd, weight=spec, grad=spec, momentum=spec, backend="torch", noise=noise)
        inputs = torch.randn(BATCH, 3, 32, 32, device=device)
        targets = torch.randint(0, 10, (BATCH,), device=device)
        seconds = []
        for _ in range(steps + 1):  # the first is warm-up
            start = time.perf_counter()
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(net(inputs), targets).backward()
            optimizer.step()
            synchronize(device)
            seconds.append(time.perf_counter() - start)
        rows.append({"what": f"VGG16 step, {name}", "device": str(device), "threads": threads,
                     "images_per_s": BATCH / statistics.median(seconds[1:])})
    return rows


def epoch_rows(data_path, environment, device, threads, rounds):
    """One epoch of train.py (8-bit VGG16) per input path, each in its own
    process; the paths take turns for `rounds` rounds and each keeps its
    fastest, the run least disturbed by other work on the machine."""
    runs = {}
    for _, (loader, workers) in itertools.product(range(rounds), PATHS):
        with tempfile.TemporaryDirectory() as run_dir:
            command = [sys.executable, os.path.join(ROOT, "train.py"), "--dataset", "CIFAR10", "--data_path",
                       data_path, "--model", "VGG16", "--epochs", "1", "--swa_start", "1", "--wd", "5e-4",
                       "--seed", "100", *EIGHT_BIT, "--quant-backend", "torch", "--device", str(device),
                       "--loader", loader, "--num_workers", str(workers), "--dir", run_dir]
            start = time.perf_counter()
            child = subprocess.run(command, cwd=ROOT, env=dict(environment, OMP_NUM_THREADS=str(threads)),
                                   capture_output=True, text=True)
            wall = time.perf_counter() - start
            if child.returncode != 0:
                raise RuntimeError(f"train.py failed: {child.stderr.strip()[-2000:]}")
            with open(os.path.join(run_dir, "results.json")) as handle:
                record = json.load(handle)["epochs"][0]
        run = {"loader": loader, "num_workers": workers, "device": str(device), "threads": threads,
               "train_steps_s": record["train_time"], "epoch_s": record["epoch_time"], "process_s": wall}
        fastest = runs.setdefault((loader, workers), run)
        if run["epoch_s"] < fastest["epoch_s"]:
            runs[(loader, workers)] = run
    return list(runs.values())


def fake_cifar(root, images, test_images):
    """A fake CIFAR10 of the given sizes under root; returns the environment
    in which train.py accepts its files (and accepts them in this process)."""
    sums = write_fake_cifar(root, train_size=images, test_size=test_images)
    patch_torchvision_md5(types.SimpleNamespace(setattr=setattr), sums)
    return dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(root, "site"), os.environ.get("PYTHONPATH", "")]),
                FAKE_CIFAR_MD5=os.path.join(root, "md5.json"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_path", help="a folder with real CIFAR10 (cifar10/); default: fake CIFAR10")
    parser.add_argument("--images", type=int, default=2560, help="fake training images (default: 2560)")
    parser.add_argument("--test-images", type=int, default=512, help="fake test images (default: 512)")
    parser.add_argument("--seconds", type=float, default=3.0, help="minimum timing per loader row")
    parser.add_argument("--steps", type=int, default=3, help="timed VGG16 steps per row (median)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="CPU thread counts")
    parser.add_argument("--rounds", type=int, default=2, help="(c): runs per path, the fastest kept")
    parser.add_argument("--skip-epochs", action="store_true", help="leave out (c)")
    parser.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results", "data_speed.json"))
    args = parser.parse_args()

    import tabulate

    scratch = tempfile.TemporaryDirectory()
    data_path = args.data_path or scratch.name
    environment = dict(os.environ) if args.data_path else fake_cifar(scratch.name, args.images, args.test_images)
    train_set, test_set = cifar.load_cifar("CIFAR10", data_path)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores" + (
        f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "")
    print(f"Machine: {machine}; torch {torch.__version__}; {len(train_set)} training images "
          f"({'CIFAR10' if args.data_path else 'fake CIFAR10'}), batch {BATCH}")

    speeds = []
    for device in devices:
        for threads in args.threads if device.type == "cpu" else [max(args.threads)]:
            speeds += loader_rows(train_set, test_set, device, threads, args.seconds)
            speeds += step_rows(device, threads, args.steps)
    for row in speeds:
        per_sample = next(other["images_per_s"] for other in speeds if other["what"] == "per-sample path, in process"
                          and other["device"] == row["device"] and other["threads"] == row["threads"])
        row["x per-sample in process"] = None if "step" in row["what"] else row["images_per_s"] / per_sample
    print("\n(a, b) images per second delivered by each input path and consumed by a VGG16 step")
    print(tabulate.tabulate(speeds, headers="keys", floatfmt=".1f"))

    epochs = []
    if not args.skip_epochs:
        for device in devices:
            epochs += epoch_rows(data_path, environment, device, max(args.threads), args.rounds)
        print(f"\n(c) one epoch of train.py, 8-bit VGG16 (torch backend), {len(train_set)} training and "
              f"{len(test_set)} test images, seconds (fastest of {args.rounds})")
        print(tabulate.tabulate(epochs, headers="keys", floatfmt=".2f"))

    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as handle:
        json.dump({"machine": machine, "torch": torch.__version__, "training_images": len(train_set),
                   "fake_data": not args.data_path, "speeds": speeds, "epochs": epochs}, handle, indent=2)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
