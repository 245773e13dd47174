"""The batched, device-resident input pipeline (`--loader batched`).

For data sets held in memory as uint8 images: CIFAR10/100, and any data set
object that, like torchvision's CIFAR classes, exposes `.data` (an
N x H x W x C uint8 array), `.targets` (a list of ints) and `.transform`.
The whole set becomes one uint8 tensor on the training device; each batch is
gathered by index, then cropped, flipped, converted to float and normalised
with batched tensor operations. torchvision's per-sample path (PIL images,
one transform call per image) costs about a millisecond per image on one
core, more than a GPU needs to train on it.

The augmentation is read off the data set's own torchvision transform, so the
two paths cannot disagree on padding, flip probability, mean or std:
`RandomCrop(size, padding=p)` with zero padding draws its top and left offsets
uniformly from 0..2p, `RandomHorizontalFlip(q)` flips with probability q, and
the crop of the padded image, the flip, ToTensor's division by 255 and
Normalize are the same arithmetic here (bit for bit, tested). Only the random
stream differs: a batch's offsets and flips come from a generator seeded with
(seed, epoch, rank, step), not one generator draw per sample.

The loaders yield (inputs, targets) already on the device and have the
attributes the training loop uses from torch's DataLoader: `sampler`,
`batch_size`, `dataset` (with `set_epoch`), `generator` and `len`.
"""

import functools
import math
from typing import NamedTuple

import torch
import torchvision.transforms as transforms
from torch.utils.data import SequentialSampler

from swalp.data.loaders import EpochSampler
from swalp.errors import UserError
from swalp.run.distributed import ShardSampler, World
from swalp.seeds import mix_seed


class BatchAugmentation(NamedTuple):
    """The batched form of a torchvision transform: zero `padding` on each
    side then a random crop back to the image size (0: no crop), a horizontal
    flip with probability `flip`, then (x / 255 - mean) / std per channel."""
    padding: int
    flip: float
    mean: tuple
    std: tuple

    @property
    def random(self):
        return self.padding > 0 or self.flip > 0


def batch_augmentation(transform, image_size):
    """The BatchAugmentation equal to `transform` (a torchvision Compose of
    an optional RandomCrop to `image_size` with zero padding, an optional
    RandomHorizontalFlip, ToTensor and an optional Normalize, in this order)
    for images of `image_size` (height, width). Raises ValueError for any
    other transform: this pipeline has no batched form of it."""
    steps = list(transform.transforms) if isinstance(transform, transforms.Compose) else [transform]
    padding, flip, mean, std = 0, 0.0, None, None
    if steps and isinstance(steps[0], transforms.RandomCrop):
        crop = steps.pop(0)
        sides = {crop.padding} if isinstance(crop.padding, int) else set(crop.padding or [0])
        if tuple(crop.size) != tuple(image_size) or len(sides) != 1 or crop.fill != 0 \
                or crop.padding_mode != "constant":
            raise ValueError(f"no batched form of {crop}: only a crop back to the image size "
                             f"{tuple(image_size)} after equal zero padding on every side")
        padding = sides.pop()
    if steps and isinstance(steps[0], transforms.RandomHorizontalFlip):
        flip = float(steps.pop(0).p)
    if not steps or not isinstance(steps.pop(0), transforms.ToTensor):
        raise ValueError(f"no batched form of {transform}: expected [RandomCrop], [RandomHorizontalFlip], "
                         f"ToTensor, [Normalize]")
    if steps and isinstance(steps[0], transforms.Normalize):
        normalize = steps.pop(0)
        mean, std = tuple(map(float, normalize.mean)), tuple(map(float, normalize.std))
    if steps:
        raise ValueError(f"no batched form of {steps[0]} in {transform}")
    return BatchAugmentation(padding, flip, mean, std)


def draw_augmentation(generator, count, augmentation):
    """Top and left crop offsets (uniform in 0..2*padding) and flips (True
    with probability `flip`) of `count` images, drawn from `generator`."""
    span = 2 * augmentation.padding + 1
    top = torch.randint(0, span, (count,), generator=generator)
    left = torch.randint(0, span, (count,), generator=generator)
    flip = torch.rand(count, generator=generator) < augmentation.flip
    return top, left, flip


def augment(images, top, left, flip, augmentation):
    """Float images of uint8 `images` (B x C x H x W): each padded with
    zeros by `augmentation.padding` on every side, cropped back to H x W at
    (top, left), flipped horizontally where `flip`, divided by 255 and
    normalised."""
    batch, channels, height, width = images.shape
    pad = augmentation.padding
    device = images.device
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    padded_height, padded_width = height + 2 * pad, width + 2 * pad
    # One copy to the device for the batch's offsets and flips; the indices of
    # the flipped images are found on the host, where `flip` was drawn (a
    # boolean mask on a GPU would make the host wait for it every batch).
    offsets = to_device(torch.cat([top, left, flip.nonzero().squeeze(1)]), device)
    top, left, flipped = offsets.split([batch, batch, offsets.numel() - 2 * batch])
    # Every output row is a run of `width` bytes of the padded batch: copying
    # whole rows (index_select over a view of all windows of the flat batch)
    # is several times faster on the CPU than gathering pixel by pixel.
    row_starts = ((torch.arange(batch, device=device) * channels * padded_height * padded_width
                   + left)[:, None, None]
                  + (torch.arange(channels, device=device) * padded_height * padded_width)[None, :, None]
                  + ((top[:, None] + torch.arange(height, device=device)) * padded_width)[:, None, :])
    windows = padded.view(-1).unfold(0, width, 1)
    cropped = windows.index_select(0, row_starts.view(-1)).view(batch, channels, height, width)
    cropped[flipped] = cropped[flipped].flip(3)
    return normalise(cropped, augmentation)


def to_device(tensor, device):
    """A host tensor copied to `device` without making the host wait (from
    pinned memory on CUDA)."""
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def normalise(images, augmentation):
    """uint8 images as float32, / 255 and normalised as ToTensor and
    Normalize compute it. The division is by a tensor: CUDA divides by a
    Python number as a multiplication by its reciprocal, which differs from
    the correctly rounded quotient ToTensor computes for 126 of the 256 byte
    values."""
    images = images.float().div_(per_channel((255.0,) * images.shape[1], images.device))
    if augmentation.mean is None:
        return images
    return images.sub_(per_channel(augmentation.mean, images.device)).div_(per_channel(augmentation.std,
                                                                                        images.device))


@functools.lru_cache(maxsize=None)
def per_channel(values, device):
    """`values` as a 1 x C x 1 x 1 tensor on `device`, built once rather than
    copied to the device every batch."""
    return torch.tensor(values, device=device).view(1, -1, 1, 1)


class DeviceImages:
    """A data set's images (N x C x H x W uint8) and targets on `device`,
    with its batched augmentation; `set_epoch` picks the epoch that seeds it."""

    def __init__(self, dataset, device, augmentation, seed=0):
        self.augmentation = augmentation
        self.seed = seed
        self.epoch = 0
        images = torch.as_tensor(dataset.data).permute(0, 3, 1, 2).contiguous()
        targets = torch.as_tensor(dataset.targets, dtype=torch.int64)
        try:
            self.images = images.to(device)
            self.targets = targets.to(device)
        except torch.OutOfMemoryError:
            size = images.numel() / 2 ** 20
            raise UserError(f"{device} has no room for the {size:.0f} MB data set (--loader batched keeps "
                            f"it on the training device); use --loader torchvision") from None

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.targets)


class BatchedLoader:
    """Batches of `batch_size` (the last one may be smaller) in `sampler`'s
    order, as (inputs, targets) on the data's device. With randomness in its
    augmentation, a batch's crops and flips are a function of (seed, epoch,
    rank, step): the same for a run resumed mid-epoch (an EpochSampler's
    `start` counts in whole batches) and for any device."""

    def __init__(self, data, sampler, batch_size, rank=0):
        self.dataset, self.sampler, self.batch_size, self.rank = data, sampler, batch_size, rank
        # Reseeded for every batch; kept as an attribute so a checkpoint can save it like a DataLoader's.
        self.generator = torch.Generator()

    def __len__(self):
        return math.ceil(len(self.sampler) / self.batch_size)

    def __iter__(self):
        data, augmentation = self.dataset, self.dataset.augmentation
        first_step = getattr(self.sampler, "start", 0) // self.batch_size
        order = torch.as_tensor(list(self.sampler), dtype=torch.int64).to(data.images.device)
        for step, first in enumerate(range(0, len(order), self.batch_size), start=first_step):
            indices = order[first:first + self.batch_size]
            images = data.images[indices]
            if augmentation.random:
                self.generator.manual_seed(mix_seed(data.seed, data.epoch, self.rank, step))
                inputs = augment(images, *draw_augmentation(self.generator, len(indices), augmentation),
                                 augmentation)
            else:
                inputs = normalise(images, augmentation)
            yield inputs, data.targets[indices]


def make_loaders(train_set, test_set, batch_size, seed, device, world=World()):
    """(train, test, bn) loaders as loaders.make_loaders builds them, on the
    batched path: the training order is the same DistributedSampler order
    (seed, epoch, rank); the test set is only normalised. Each data set's
    augmentation is read off its torchvision transform."""
    image_size = train_set.data.shape[1:3]
    train_data = DeviceImages(train_set, device, batch_augmentation(train_set.transform, image_size), seed)
    test_data = DeviceImages(test_set, device, batch_augmentation(test_set.transform, image_size))
    train_sampler = EpochSampler(train_data, num_replicas=world.size, rank=world.rank, seed=seed)
    train_loader = BatchedLoader(train_data, train_sampler, batch_size, world.rank)
    if not world.distributed:
        return train_loader, BatchedLoader(test_data, SequentialSampler(test_data), batch_size), train_loader
    test_loader = BatchedLoader(test_data, ShardSampler(len(test_data), world), batch_size, world.rank)
    bn_loader = BatchedLoader(train_data, ShardSampler(len(train_data), world), batch_size, world.rank)
    return train_loader, test_loader, bn_loader
