"""The per-sample input path (`--loader torchvision`): torchvision's
transforms in DataLoader workers, with an order and an augmentation that
are functions of (seed, epoch) alone, so that a run resumes exactly and any
number of workers gives the same batches."""

import itertools
import os

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from swalp.run.distributed import ShardSampler, World
from swalp.seeds import mix_seed


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


def own_process_group(worker_id):
    """Each loader worker leaves the run's process group, so that the SIGTERM
    or SIGINT a launcher, scheduler or terminal sends to the whole group
    reaches only the main process, which saves and stops, then shuts its
    workers down; that shutdown's own SIGTERM to a stuck worker still works
    (a worker ignoring SIGTERM would outlive it and hang the exit). A worker
    whose main process is gone exits by itself (torch's watchdog)."""
    os.setpgid(0, 0)


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
                  worker_init_fn=own_process_group if num_workers else None)
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
