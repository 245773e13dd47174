"""Data parallelism under torchrun: the process group, collective helpers, and
the two passes that must see the whole data set across ranks (BatchNorm
statistics and evaluation).

A plain `python train.py` run is a world of one process: every helper here is
then a no-op and nothing is initialised.
"""

import os
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim import swa_utils
from torch.utils.data import Sampler

from swalp.errors import UserError


class World(NamedTuple):
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self):
        return self.size > 1

    @property
    def main(self):
        return self.rank == 0


def init(device_name):
    """The world torchrun describes in the environment (a world of one
    without torchrun), its process group initialised: NCCL when this process
    uses its local GPU, gloo on the CPU. Returns (world, device name to use)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(), device_name
    world = World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))
    # Each process uses the GPU of its local rank ("cuda:N" included).
    use_cuda = (device_name == "auto" or device_name.startswith("cuda")) and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(world.local_rank)
        device_name = f"cuda:{world.local_rank}"
    elif device_name == "auto":
        device_name = "cpu"
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return world, device_name


def shutdown(world):
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def sum_across(world, values, device):
    """Element-wise sums of a list of numbers over all ranks (float64)."""
    if not world.distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def any_across(world, flag, device):
    """Whether `flag` holds on any rank."""
    return bool(sum_across(world, [float(bool(flag))], device)[0])


def on_rank_zero(world, action):
    """Run `action` on rank 0 only and share its result (or its UserError,
    raised on every rank) with the others."""
    outcome = None
    if world.main:
        try:
            outcome = (action(), None)
        except UserError as error:
            outcome = (None, str(error))
    result, error = broadcast_object(world, outcome)
    if error:
        raise UserError(error)
    return result


def gather_objects(world, value):
    """`value` of every rank, in rank order, on every rank."""
    if not world.distributed:
        return [value]
    gathered = [None] * world.size
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_object(world, value):
    """Rank 0's `value`, on every rank."""
    if not world.distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


class ShardSampler(Sampler):
    """Indices rank, rank + size, ... of a data set, in order and without
    the padding DistributedSampler adds: together the ranks cover each sample
    exactly once."""

    def __init__(self, length, world):
        self.indices = range(world.rank, length, world.size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def recompute_batchnorm(loader, model, device, world=World()):
    """BatchNorm statistics from one pass over `loader`: torch's update_bn in
    a single process, `update_bn`'s pooled sums over every rank otherwise."""
    if world.distributed:
        update_bn(loader, model, device, world)
    else:
        swa_utils.update_bn(loader, model, device)


@torch.no_grad()
def update_bn(loader, model, device, world):
    """Recompute BatchNorm running statistics from every sample that `loader`
    yields on any rank: each layer's running_mean and running_var become the
    mean and unbiased variance of its input over all of them (sums reduced
    across ranks), identical on every rank and the same as one process
    passing the same batches.

    As in torch.optim.swa_utils.update_bn, the model runs in train mode, so
    each layer normalises with its batch statistics during the pass and the
    inputs of deeper layers depend on how samples are grouped into batches.
    torch's update_bn also averages per-batch statistics rather than pooling
    them; single-process runs keep using it.
    """
    layers = [module for module in model.modules() if isinstance(module, _BatchNorm)]
    if not layers:
        return
    sums = {layer: torch.zeros(3, layer.num_features, dtype=torch.float64, device=device) for layer in layers}

    def accumulate(layer, inputs):
        x = inputs[0].detach().double().transpose(0, 1).reshape(layer.num_features, -1)
        sums[layer][0] += x.shape[1]
        sums[layer][1] += x.sum(1)
        sums[layer][2] += (x * x).sum(1)

    hooks = [layer.register_forward_pre_hook(accumulate) for layer in layers]
    was_training = model.training
    model.train()
    batches = 0
    try:
        for inputs, _ in loader:
            model(inputs.to(device))
            batches += 1
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    total = torch.cat([sums[layer] for layer in layers], dim=1)
    if world.distributed:
        dist.all_reduce(total)
    batches = int(sum_across(world, [batches], device)[0])
    per_layer = total.split([layer.num_features for layer in layers], dim=1)
    for layer, (count, first, second) in zip(layers, per_layer):
        mean = first / count
        variance = (second - count * mean * mean) / (count - 1).clamp(min=1)
        layer.running_mean.copy_(mean)
        layer.running_var.copy_(variance.clamp(min=0))
        layer.num_batches_tracked.fill_(batches)
