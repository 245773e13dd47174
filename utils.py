"""Data, the train/eval loops, the per-epoch table, TensorBoard scalars,
results.json and random-generator state."""

import itertools
import json
import math
import os
import random
import signal
import sys
import time

import numpy as np
import tabulate
import torch
import torch.nn.functional as F
import torchvision.datasets as datasets
import torchvision.transforms as transforms
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

import data_checks
from digits import load_digits
from distributed import ShardSampler, World, sum_across
from seeding import mix_seed

DATASETS = ("CIFAR10", "CIFAR100", "ImageNet", "digits")
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TABLE_COLUMNS = ["ep", "lr", "tr_loss", "tr_acc", "tr_time", "te_loss", "te_acc", "swa_te_loss", "swa_te", "swa_n"]
HEADER_EVERY = 40


class UserError(Exception):
    """A problem the user can fix (path, flag, data, checkpoint); train.py
    prints its message as one line and exits with code 2."""


# ---------------------------------------------------------------- data

def load_data(dataset, data_path):
    """(train set with augmentation, test set, number of classes)."""
    if dataset == "ImageNet":
        train_set, test_set = load_imagenet(data_path)
        return train_set, test_set, len(train_set.classes)
    if dataset == "digits":  # bundled with scikit-learn: no data_path
        train_set, test_set = load_digits()
        return train_set, test_set, len(train_set.classes)
    train_set, test_set = load_cifar(dataset, data_path)
    return train_set, test_set, len(train_set.classes)


def load_imagenet(data_path):
    """ImageNet as class folders under data_path/train and data_path/val
    (torchvision's ImageFolder): random resized crop 224 and flips for
    training; resize 256 and centre crop 224 for validation."""
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_transform = transforms.Compose([
        transforms.RandomResizedCrop(224),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        normalize,
    ])
    val_transform = transforms.Compose([
        transforms.Resize(256),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        normalize,
    ])
    folders = {split: os.path.join(data_path, split) for split in ("train", "val")}
    try:
        train_set = datasets.ImageFolder(folders["train"], transform=train_transform)
        val_set = datasets.ImageFolder(folders["val"], transform=val_transform)
    except PermissionError as error:
        raise UserError(permission_denied(error, "ImageNet")) from None
    except (FileNotFoundError, OSError) as error:
        raise UserError(f"ImageNet needs class folders of images under {folders['train']} and "
                        f"{folders['val']} ({first_line(error)})") from None
    problem = data_checks.image_folder_problem(train_set, val_set, folders)
    if problem:
        raise UserError(problem)
    return train_set, val_set


def permission_denied(error, dataset):
    return (f"permission denied reading {error.filename or 'the data'}; make the {dataset} files readable "
            f"by this user or pass another --data_path")


def load_cifar(dataset, data_path):
    """Train (augmented) and test sets of CIFAR10/100 under data_path/<dataset lower>,
    downloaded there when absent, checked (labels, image shapes, classes)."""
    dataset_class = getattr(datasets, dataset)
    root = os.path.join(data_path, dataset.lower())
    folder = os.path.join(root, dataset_class.base_folder)
    normalize = transforms.Normalize(CIFAR_MEAN, CIFAR_STD)
    train_transform = transforms.Compose([
        transforms.RandomCrop(32, padding=4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        normalize,
    ])
    test_transform = transforms.Compose([transforms.ToTensor(), normalize])
    try:
        # torchvision takes a folder this user cannot enter for a missing one.
        for path in (data_path, root, folder):
            if os.path.exists(path):
                os.listdir(path)
        # download=True verifies the md5 sums of every file first and only
        # fetches the archive when one is missing or corrupt.
        train_set = dataset_class(root, train=True, transform=train_transform, download=True)
        test_set = dataset_class(root, train=False, transform=test_transform)
    except PermissionError as error:
        raise UserError(permission_denied(error, dataset)) from None
    except OSError as error:
        raise UserError(
            f"{dataset} files in {root} are missing or corrupt and could not be downloaded "
            f"({error}); put the extracted '{dataset_class.base_folder}' folder of the python "
            f"version of {dataset} in {root}"
        ) from None
    except Exception as error:
        files = [name for name, _ in dataset_class.train_list + dataset_class.test_list]
        problem = data_checks.cifar_file_problem(folder, files, data_checks.CIFAR_CLASSES[dataset])
        if problem:
            raise UserError(data_checks.with_remedy(problem, folder)) from None
        raise UserError(f"{dataset} files in {root} cannot be read ({error}); "
                        f"remove {folder} to download them again") from None
    problem = data_checks.cifar_problem(dataset, train_set, test_set)
    if problem:
        raise UserError(problem)
    return train_set, test_set


class SeededAugmentation(Dataset):
    """The training set with random augmentation that depends only on
    (seed, epoch, sample index).

    torchvision's transforms draw from torch's global generator; each sample
    is transformed under a generator forked and seeded for it, so the
    augmentation does not depend on the number of loader workers, on which
    worker loads a sample, or on where in an epoch a resumed run starts.
    """

    def __init__(self, dataset, seed):
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seed(self.seed, self.epoch, index))
            return self.dataset[index]


def ignore_stop_signals(worker_id):
    """Loader workers ignore SIGTERM and SIGINT (a launcher or scheduler
    signals the whole process group): the main process saves and stops, then
    shuts them down itself."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class EpochSampler(DistributedSampler):
    """DistributedSampler (its order is a function of seed and epoch, per
    replica) that can start `start` samples into the epoch, for a run
    resumed part-way through one."""

    def __init__(self, dataset, num_replicas=1, rank=0, seed=0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self):
        return max(super().__len__() - self.start, 0)


def make_loaders(train_set, test_set, batch_size, num_workers, seed, pin_memory, world=World()):
    """Loaders whose order and augmentation are functions of `seed` and the
    epoch (set with `set_epoch`): (train, test, bn), where bn is the loader
    for BatchNorm recomputation. With several processes each rank trains on
    its DistributedSampler share (`batch_size` per process) and tests and
    recomputes BatchNorm statistics on a disjoint shard."""
    train_set = SeededAugmentation(train_set, seed)
    train_sampler = EpochSampler(train_set, num_replicas=world.size, rank=world.rank, seed=seed)
    common = dict(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                  worker_init_fn=ignore_stop_signals if num_workers else None)
    train_loader = DataLoader(train_set, sampler=train_sampler,
                              generator=torch.Generator().manual_seed(seed), **common)
    if not world.distributed:
        return train_loader, DataLoader(test_set, shuffle=False, **common), train_loader
    test_loader = DataLoader(test_set, sampler=ShardSampler(len(test_set), world), **common)
    bn_loader = DataLoader(train_set, sampler=ShardSampler(len(train_set), world), **common)
    return train_loader, test_loader, bn_loader


def set_epoch(loader, epoch, start_step=0):
    """Point the train loader at `epoch`, skipping its first `start_step` batches."""
    loader.sampler.set_epoch(epoch)
    loader.sampler.start = start_step * loader.batch_size
    loader.dataset.set_epoch(epoch)


# ---------------------------------------------------------------- loops

# Off in every process but the first of a data-parallel run.
SHOW_PROGRESS = True


def _progress(loader, description):
    return tqdm(loader, desc=description, leave=False, disable=not (SHOW_PROGRESS and sys.stderr.isatty()),
                file=sys.stderr, dynamic_ncols=True)


class Diverged(Exception):
    """The training loss became NaN or infinite."""

    def __init__(self, step, loss):
        super().__init__(f"loss {loss} at step {step}")
        self.step = step
        self.loss = loss


def new_epoch_totals():
    """Running sums of the epoch in progress, and the steps after which the
    SWA model collected a model (plain values, saved in checkpoints)."""
    return {"steps": 0, "loss_sum": 0.0, "correct": 0, "seen": 0, "time": 0.0, "collected_at": []}


def train_epoch(loader, model, optimizer, device, totals, description="train", before_step=None,
                after_step=None, all_finite=math.isfinite):
    """Train over `loader`, adding to `totals` (see new_epoch_totals), which a
    checkpoint can carry across an interruption. `before_step(totals)` runs
    before each step (to set its learning rate); `after_step(totals)` after
    it, and when it returns True the epoch stops early. A loss for which
    `all_finite` (every rank's loss finite) fails raises Diverged before the
    weights change. Returns whether the epoch ran to its end."""
    model.train()
    start = time.perf_counter()
    for inputs, targets in _progress(loader, description):
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if before_step is not None:
            before_step(totals)
        output = model(inputs)
        loss = F.cross_entropy(output, targets)
        loss_value = loss.item()
        if not all_finite(loss_value):
            raise Diverged(totals["steps"] + 1, loss_value)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        totals["steps"] += 1
        totals["loss_sum"] += loss_value * inputs.size(0)
        totals["correct"] += (output.argmax(1) == targets).sum().item()
        totals["seen"] += inputs.size(0)
        totals["time"] += time.perf_counter() - start
        start = time.perf_counter()
        if after_step is not None and after_step(totals):
            return False
    return True


def epoch_result(totals, device, world=World()):
    """Train loss and accuracy of an epoch over all ranks."""
    loss_sum, correct, seen = sum_across(world, [totals["loss_sum"], totals["correct"], totals["seen"]], device)
    return {"loss": loss_sum / seen, "accuracy": 100.0 * correct / seen, "time": totals["time"]}


@torch.no_grad()
def evaluate(loader, model, device, description="eval", world=World()):
    """Loss and accuracy over everything `loader` yields on any rank."""
    model.eval()
    loss_sum, correct, seen = 0.0, 0, 0
    for inputs, targets in _progress(loader, description):
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        output = model(inputs)
        loss_sum += F.cross_entropy(output, targets, reduction="sum").item()
        correct += (output.argmax(1) == targets).sum().item()
        seen += inputs.size(0)
    loss_sum, correct, seen = sum_across(world, [loss_sum, correct, seen], device)
    return {"loss": loss_sum / seen, "accuracy": 100.0 * correct / seen, "seen": int(seen)}


# ---------------------------------------------------------------- logging

def table_row(values, epoch, header=False):
    """One line of the seed's per-epoch table, with the header before it on
    the first epoch, every HEADER_EVERY epochs, and when `header` is set (the
    first row a resumed run prints)."""
    table = tabulate.tabulate([values], TABLE_COLUMNS, tablefmt="simple", floatfmt="8.4f")
    lines = table.split("\n")
    if header or epoch % HEADER_EVERY == 0:
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


class WriteFailed(Exception):
    """Writing an output failed (disk full, I/O error, its directory gone);
    its partial file was removed."""

    def __init__(self, path, error, size):
        super().__init__(f"cannot write {path} ({error.strerror or first_line(error)})")
        self.path, self.reason, self.size = path, error.strerror or first_line(error), size


def remove_quietly(path):
    """Remove a partial file where it can be; its directory may be gone."""
    try:
        os.remove(path)
    except OSError:
        pass


def write_json_atomic(path, payload):
    """Write JSON next to `path` and rename it over, so a crash never leaves a
    truncated file; a failed write removes its partial file and raises
    WriteFailed."""
    temporary = f"{path}.tmp"
    text = json.dumps(payload, indent=2)
    try:
        with open(temporary, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as error:
        remove_quietly(temporary)
        raise WriteFailed(path, error, len(text)) from None


# ---------------------------------------------------------------- random generators

def rng_state():
    """Every random generator the run draws from, as tensors and plain values
    (so checkpoints load with torch.load(weights_only=True))."""
    numpy_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)),
                  *numpy_state[2:]],
        "torch": torch.get_rng_state(),
        # This process's device only: a resumed run may see fewer GPUs.
        "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_available() else [],
    }


def set_rng_state(state):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"][0])


def first_line(error):
    """The first line of an exception's message, or its type when it has none."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
