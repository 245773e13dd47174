"""Data, the train/eval loops, the per-epoch table, TensorBoard scalars,
checkpoints, results.json and random-generator state."""

import json
import os
import random
import sys
import time

import numpy as np
import tabulate
import torch
import torch.nn.functional as F
import torchvision.datasets as datasets
import torchvision.transforms as transforms
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

NUM_CLASSES = {"CIFAR10": 10, "CIFAR100": 100}
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
TABLE_COLUMNS = ["ep", "lr", "tr_loss", "tr_acc", "tr_time", "te_loss", "te_acc", "swa_te_loss", "swa_te"]
HEADER_EVERY = 40


class UserError(Exception):
    """A problem the user can fix (path, flag, data, checkpoint); train.py
    prints its message as one line and exits with code 2."""


# ---------------------------------------------------------------- data

def load_cifar(dataset, data_path):
    """Train (augmented) and test sets of CIFAR10/100 under data_path/<dataset lower>,
    downloaded there when absent."""
    dataset_class = getattr(datasets, dataset)
    root = os.path.join(data_path, dataset.lower())
    normalize = transforms.Normalize(CIFAR_MEAN, CIFAR_STD)
    train_transform = transforms.Compose([
        transforms.RandomCrop(32, padding=4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        normalize,
    ])
    test_transform = transforms.Compose([transforms.ToTensor(), normalize])
    try:
        # download=True verifies the md5 sums of every file first and only
        # fetches the archive when one is missing or corrupt.
        train_set = dataset_class(root, train=True, transform=train_transform, download=True)
        test_set = dataset_class(root, train=False, transform=test_transform)
    except OSError as error:
        raise UserError(
            f"{dataset} files in {root} are missing or corrupt and could not be downloaded "
            f"({error}); put the extracted '{dataset_class.base_folder}' folder of the python "
            f"version of {dataset} in {root}"
        ) from None
    except Exception as error:
        raise UserError(
            f"{dataset} files in {root} cannot be read ({error}); "
            f"remove {os.path.join(root, dataset_class.base_folder)} to download them again"
        ) from None
    return train_set, test_set


def make_loaders(train_set, test_set, batch_size, num_workers, seed, pin_memory):
    """Loaders whose order and augmentation are set by `seed` and the epoch.

    The train order comes from a DistributedSampler (one replica here): its
    permutation is a function of (seed, epoch) via `set_epoch`, which is what a
    resumed or data-parallel run needs.
    """
    train_sampler = DistributedSampler(train_set, num_replicas=1, rank=0, shuffle=True, seed=seed)
    common = dict(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory)
    train_loader = DataLoader(train_set, sampler=train_sampler,
                              generator=torch.Generator().manual_seed(seed), **common)
    test_loader = DataLoader(test_set, shuffle=False, **common)
    return train_loader, test_loader


# ---------------------------------------------------------------- loops

def _progress(loader, description):
    return tqdm(loader, desc=description, leave=False, disable=not sys.stderr.isatty(),
                file=sys.stderr, dynamic_ncols=True)


def train_epoch(loader, model, optimizer, device, description="train"):
    model.train()
    loss_sum, correct, seen = 0.0, 0, 0
    start = time.perf_counter()
    for inputs, targets in _progress(loader, description):
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        output = model(inputs)
        loss = F.cross_entropy(output, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * inputs.size(0)
        correct += (output.argmax(1) == targets).sum().item()
        seen += inputs.size(0)
    return {"loss": loss_sum / seen, "accuracy": 100.0 * correct / seen,
            "time": time.perf_counter() - start}


@torch.no_grad()
def evaluate(loader, model, device, description="eval"):
    model.eval()
    loss_sum, correct, seen = 0.0, 0, 0
    for inputs, targets in _progress(loader, description):
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        output = model(inputs)
        loss_sum += F.cross_entropy(output, targets, reduction="sum").item()
        correct += (output.argmax(1) == targets).sum().item()
        seen += inputs.size(0)
    return {"loss": loss_sum / seen, "accuracy": 100.0 * correct / seen}


# ---------------------------------------------------------------- logging

def table_row(values, epoch):
    """One line of the seed's per-epoch table, with the header before it on
    the first epoch and every HEADER_EVERY epochs."""
    table = tabulate.tabulate([values], TABLE_COLUMNS, tablefmt="simple", floatfmt="8.4f")
    lines = table.split("\n")
    if epoch % HEADER_EVERY == 0:
        return "\n".join([lines[1]] + lines)
    return lines[2]


def log_scalars(writer, record):
    """TensorBoard scalars of one epoch record, with the original's tag names."""
    step = record["epoch"]
    writer.add_scalar("lr", record["lr"], step)
    writer.add_scalar("time/epoch", record["epoch_time"], step)
    writer.add_scalar("swa/n_averaged", record["swa_n"], step)
    for prefix, key in (("train", "train"), ("test", "test"), ("test_swa", "swa_test")):
        if record[f"{key}_loss"] is None:
            continue
        accuracy = record[f"{key}_accuracy"]
        writer.add_scalar(f"{prefix}/loss", record[f"{key}_loss"], step)
        writer.add_scalar(f"{prefix}/acc_perc", accuracy, step)
        writer.add_scalar(f"{prefix}/err_perc", 100.0 - accuracy, step)
    writer.flush()


def write_json_atomic(path, payload):
    """Write JSON next to `path` and rename it over, so a crash never leaves a
    truncated file."""
    temporary = f"{path}.tmp"
    with open(temporary, "w") as handle:
        json.dump(payload, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


# ---------------------------------------------------------------- checkpoints

def rng_state():
    """Every random generator the run draws from, as tensors and plain values
    (so checkpoints load with torch.load(weights_only=True))."""
    numpy_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)),
                  *numpy_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(directory, epoch, **state):
    """Save `checkpoint-<epoch>.pt` atomically (temporary file, then rename)."""
    path = os.path.join(directory, f"checkpoint-{epoch}.pt")
    temporary = f"{path}.tmp"
    torch.save({"epoch": epoch, **state}, temporary)
    os.replace(temporary, path)
    return path


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist; pass the path of a checkpoint-<epoch>.pt file to --resume")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserError(f"checkpoint {path} cannot be loaded ({str(error).splitlines()[0]}); "
                        f"resume from another checkpoint") from None
