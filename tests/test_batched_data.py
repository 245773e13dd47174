"""The batched, device-resident input pipeline against torchvision's per-sample one."""

import types

import numpy as np
import pytest
import torch
import torchvision.transforms as transforms
import torchvision.transforms.functional as TF
from PIL import Image

import train
from swalp.data import batched, cifar, loaders
from swalp.run import distributed

CIFAR_AUGMENTATION = batched.BatchAugmentation(4, 0.5, cifar.CIFAR_MEAN, cifar.CIFAR_STD)


def test_the_cifar_transforms_have_a_batched_form(cifar_in_process):
    train_set, test_set = cifar.load_cifar("CIFAR100", str(cifar_in_process))
    assert batched.batch_augmentation(train_set.transform, (32, 32)) == CIFAR_AUGMENTATION
    assert batched.batch_augmentation(test_set.transform, (32, 32)) == (0, 0.0, cifar.CIFAR_MEAN,
                                                                               cifar.CIFAR_STD)


@pytest.mark.parametrize("transform", [
    transforms.Compose([transforms.RandomResizedCrop(32), transforms.ToTensor()]),
    transforms.Compose([transforms.RandomCrop(32, padding=4, padding_mode="reflect"), transforms.ToTensor()]),
    transforms.Compose([transforms.RandomCrop(28), transforms.ToTensor()]),
    transforms.Compose([transforms.RandomHorizontalFlip(), transforms.RandomCrop(32, padding=4),
                        transforms.ToTensor()]),
    transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,)), transforms.ToTensor()]),
    transforms.RandomCrop(32, padding=4),
])
def test_transforms_without_a_batched_form_are_refused(transform):
    with pytest.raises(ValueError, match="no batched form"):
        batched.batch_augmentation(transform, (32, 32))


def test_every_crop_and_flip_equals_torchvisions_output_bit_for_bit():
    image = np.random.default_rng(0).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    batch = torch.from_numpy(image).permute(2, 0, 1)[None].contiguous()
    for top in range(9):
        for left in range(9):
            for flip in (False, True):
                ours = batched.augment(batch, torch.tensor([top]), torch.tensor([left]), torch.tensor([flip]),
                                            CIFAR_AUGMENTATION)[0]
                cropped = TF.crop(TF.pad(Image.fromarray(image), 4), top, left, 32, 32)
                expected = TF.to_tensor(TF.hflip(cropped) if flip else cropped)
                assert torch.equal(ours, TF.normalize(expected, cifar.CIFAR_MEAN, cifar.CIFAR_STD)), (top, left, flip)


def test_offsets_are_uniform_and_flips_fair_and_independent():
    draws = 162 * 200
    top, left, flip = batched.draw_augmentation(torch.Generator().manual_seed(5), draws, CIFAR_AUGMENTATION)
    assert top.min() == left.min() == 0 and top.max() == left.max() == 8
    # Each of the 9 x 9 x 2 outcomes equally likely: chi-square with 161 degrees
    # of freedom stays below 218 (its 0.1% upper quantile) for a uniform law.
    counts = torch.bincount((top * 9 + left) * 2 + flip.long(), minlength=162).double()
    assert ((counts - 200) ** 2 / 200).sum() < 218
    assert abs(flip.double().mean() - 0.5) < 4 * 0.5 / draws ** 0.5


def cifar_loaders(data_path, seed=4, world=distributed.World(), batch_size=8):
    train_set, test_set = cifar.load_cifar("CIFAR10", str(data_path))
    return train_set, test_set, batched.make_loaders(train_set, test_set, batch_size, seed,
                                                          torch.device("cpu"), world)


def batches(loader):
    return [(inputs.clone(), targets.clone()) for inputs, targets in loader]


def test_test_batches_equal_torchvisions_test_set(cifar_in_process):
    _, test_set, (_, test_loader, _) = cifar_loaders(cifar_in_process)
    inputs, targets = map(torch.cat, zip(*batches(test_loader)))
    assert torch.equal(inputs, torch.stack([test_set[i][0] for i in range(len(test_set))]))
    assert targets.tolist() == test_set.targets


def test_training_batches_follow_the_samplers_order_and_depend_only_on_seed_epoch_and_step(cifar_in_process):
    train_set, test_set, (train_loader, _, bn_loader) = cifar_loaders(cifar_in_process)
    assert bn_loader is train_loader  # one process: the BatchNorm pass sees the epoch's batches
    loaders.set_epoch(train_loader, 3)
    whole = batches(train_loader)
    assert len(whole) == len(train_loader) == 5
    per_sample, _, _ = loaders.make_loaders(train_set, test_set, 8, 0, seed=4, pin_memory=False)
    loaders.set_epoch(per_sample, 3)
    assert [t.tolist() for _, t in whole] == [t.tolist() for _, t in per_sample]
    torch.manual_seed(123)  # the global generator plays no part
    assert all(torch.equal(a[0], b[0]) for a, b in zip(whole, batches(train_loader)))
    loaders.set_epoch(train_loader, 3, start_step=2)
    tail = batches(train_loader)
    assert len(tail) == 3 and all(torch.equal(a[0], b[0]) for a, b in zip(whole[2:], tail))
    loaders.set_epoch(train_loader, 3, start_step=5)
    assert batches(train_loader) == []  # stopped after the epoch's last step
    loaders.set_epoch(train_loader, 4)
    assert not torch.equal(batches(train_loader)[0][0], whole[0][0])
    _, _, (other_seed, _, _) = cifar_loaders(cifar_in_process, seed=5)
    loaders.set_epoch(other_seed, 3)
    assert not torch.equal(batches(other_seed)[0][0], whole[0][0])


def test_data_parallel_ranks_augment_their_own_shards(cifar_in_process):
    shards = []
    for rank in range(2):
        _, _, (train_loader, test_loader, bn_loader) = cifar_loaders(cifar_in_process, world=distributed.World(rank, 2))
        loaders.set_epoch(train_loader, 1)
        shards.append({"train": list(train_loader.sampler), "bn": list(bn_loader.sampler),
                       "test": list(test_loader.sampler), "first": next(iter(train_loader))[0]})
    assert len(shards[0]["train"]) == 20 and set(shards[0]["train"]).isdisjoint(shards[1]["train"])
    assert sorted(shards[0]["bn"] + shards[1]["bn"]) == list(range(40))
    assert sorted(shards[0]["test"] + shards[1]["test"]) == list(range(20))
    assert shards[0]["first"].shape == (8, 3, 32, 32) and not torch.equal(shards[0]["first"], shards[1]["first"])


def test_any_data_set_with_cifars_attributes_works():
    # Grey 8 x 8 digits, normalised, no augmentation: the test-set form of another data set.
    rng = np.random.default_rng(1)
    digits = types.SimpleNamespace(data=rng.integers(0, 256, size=(10, 8, 8, 1), dtype=np.uint8),
                                   targets=list(range(10)),
                                   transform=transforms.Compose([transforms.ToTensor(),
                                                                 transforms.Normalize((0.3,), (0.2,))]))
    _, test_loader, _ = batched.make_loaders(digits, digits, 4, 0, torch.device("cpu"))
    inputs, targets = map(torch.cat, zip(*batches(test_loader)))
    expected = torch.stack([digits.transform(image) for image in digits.data])
    assert inputs.shape == (10, 1, 8, 8) and torch.equal(inputs, expected) and targets.tolist() == digits.targets


def test_a_device_without_room_for_the_data_ends_the_run_in_one_line(cifar_in_process, tmp_path, monkeypatch,
                                                                      capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "results.json").write_text("earlier")
    move = torch.Tensor.to

    def out_of_memory(tensor, *args, **kwargs):
        if tensor.dtype == torch.uint8 and tensor.dim() == 4:  # the images
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 146.00 MiB")
        return move(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", out_of_memory)
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--data_path", str(cifar_in_process), "--model", "PreResNet20", "--epochs", "1",
                    "--swa_start", "1", "--dir", str(run_dir), "--overwrite"])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()
    assert len(message) == 1 and "has no room for the" in message[0] and "use --loader torchvision" in message[0]
    assert sorted(p.name for p in run_dir.iterdir()) == ["results.json"]
    assert (run_dir / "results.json").read_text() == "earlier"


def test_imagenet_keeps_the_per_sample_path(capsys):
    imagenet = ["--dataset", "ImageNet", "--data_path", "x", "--model", "ResNet18"]
    assert train.parse_args(imagenet).loader == "torchvision"
    assert train.parse_args(["--data_path", "x", "--model", "VGG16"]).loader == "batched"
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args([*imagenet, "--loader", "batched"])
    assert exit_info.value.code == 2
    assert "use --loader torchvision with --dataset ImageNet" in capsys.readouterr().err
