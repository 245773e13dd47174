import io
import sys

import pytest
import torch

import utils
from swalp import errors
from swalp.data import cifar, loaders
from swalp.run import checkpoint_files, files, rng


def test_fake_cifar_loads_through_torchvision(cifar_in_process):
    for name, classes in (("CIFAR10", 10), ("CIFAR100", 100)):
        train_set, test_set = cifar.load_cifar(name, str(cifar_in_process))
        assert (len(train_set), len(test_set)) == (40, 20)
        assert len(train_set.classes) == classes
        image, label = train_set[0]
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and 0 <= label < classes


def test_test_images_are_only_normalised(cifar_in_process):
    _, test_set = cifar.load_cifar("CIFAR10", str(cifar_in_process))
    raw = torch.from_numpy(test_set.data[0]).permute(2, 0, 1).float() / 255
    mean, std = torch.tensor(cifar.CIFAR_MEAN).view(3, 1, 1), torch.tensor(cifar.CIFAR_STD).view(3, 1, 1)
    torch.testing.assert_close(test_set[0][0], (raw - mean) / std)


def test_corrupt_data_file_is_a_user_error(cifar_in_process, tmp_path, monkeypatch):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(cifar_in_process / "cifar10", copy / "cifar10")
    with open(copy / "cifar10" / "cifar-10-batches-py" / "data_batch_3", "ab") as handle:
        handle.write(b"garbage")
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    with pytest.raises(errors.UserError, match="missing or corrupt and could not be downloaded"):
        cifar.load_cifar("CIFAR10", str(copy))


def test_train_order_depends_only_on_seed_and_epoch(cifar_in_process):
    train_set, test_set = cifar.load_cifar("CIFAR10", str(cifar_in_process))

    def order(seed, epoch):
        loader, _, _ = loaders.make_loaders(train_set, test_set, 8, 0, seed, pin_memory=False)
        loader.sampler.set_epoch(epoch)
        return list(loader.sampler)

    assert order(1, 0) == order(1, 0)
    assert order(1, 0) != order(1, 1) and order(1, 0) != order(2, 0)
    assert sorted(order(1, 3)) == list(range(40))


def test_progress_bar_only_on_a_terminal(monkeypatch):
    class Terminal(io.StringIO):
        def __init__(self, tty):
            super().__init__()
            self.tty = tty

        def isatty(self):
            return self.tty

    for tty in (True, False):
        stream = Terminal(tty)
        monkeypatch.setattr(sys, "stderr", stream)
        assert list(utils.progress(range(3), "epoch 1/9")) == [0, 1, 2]
        assert ("epoch 1/9" in stream.getvalue()) == tty


def test_table_reprints_its_header_every_40_epochs():
    values = [1, 0.05, 2.3, 10.0, 1.0, 2.2, 12.0, None, None, 0]
    assert utils.table_row(values, 0).splitlines()[1].split() == utils.TABLE_COLUMNS
    assert len(utils.table_row(values, 1).splitlines()) == 1
    assert len(utils.table_row(values, 40).splitlines()) == 4
    assert utils.table_row(values, 7, header=True).splitlines()[1].split() == utils.TABLE_COLUMNS


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np

    state = rng.rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    path = checkpoint_files.save_checkpoint(str(tmp_path), {"epoch": 1, "step": 0, "rng": state})
    rng.set_rng_state(torch.load(path, weights_only=True)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def batches(loader):
    return [(inputs.clone(), targets.clone()) for inputs, targets in loader]


def test_augmentation_does_not_depend_on_workers_or_on_where_an_epoch_starts(cifar_in_process):
    train_set, test_set = cifar.load_cifar("CIFAR10", str(cifar_in_process))
    in_process, _, _ = loaders.make_loaders(train_set, test_set, 8, 0, seed=4, pin_memory=False)
    with_workers, _, _ = loaders.make_loaders(train_set, test_set, 8, 2, seed=4, pin_memory=False)
    loaders.set_epoch(in_process, 3)
    loaders.set_epoch(with_workers, 3)
    whole = batches(in_process)
    torch.manual_seed(123)  # the global generator plays no part
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(whole, batches(with_workers)))
    loaders.set_epoch(in_process, 3, start_step=2)
    tail = batches(in_process)
    assert len(tail) == len(whole) - 2
    assert all(torch.equal(a[0], b[0]) for a, b in zip(whole[2:], tail))
    loaders.set_epoch(in_process, 4)
    assert not torch.equal(batches(in_process)[0][0], whole[0][0])


def test_an_interrupted_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = checkpoint_files.save_checkpoint(str(tmp_path), {"epoch": 1, "step": 0, "weights": torch.ones(3)})

    def crash(obj, handle):
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(files.WriteFailed, match="disk full"):
        checkpoint_files.save_checkpoint(str(tmp_path), {"epoch": 1, "step": 0, "weights": torch.zeros(3)})
    assert torch.equal(torch.load(path, weights_only=True)["weights"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1.pt"]  # no partial file


def test_mid_epoch_checkpoints_supersede_each_other(tmp_path):
    for epoch, step in ((1, 0), (1, 1), (1, 2), (2, 0), (2, 1)):
        checkpoint_files.save_checkpoint(str(tmp_path), {"epoch": epoch, "step": step})
    assert [(e, s) for e, s, _ in checkpoint_files.list_checkpoints(str(tmp_path))] == [(1, 0), (2, 0), (2, 1)]


def test_unreadable_data_with_valid_checksums_is_a_user_error(cifar_in_process, tmp_path, monkeypatch):
    import hashlib
    import shutil

    from torchvision.datasets import CIFAR10

    copy = tmp_path / "copy"
    shutil.copytree(cifar_in_process / "cifar10", copy / "cifar10")
    garbage = copy / "cifar10" / "cifar-10-batches-py" / "test_batch"
    garbage.write_bytes(b"not a pickle")
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", hashlib.md5(b"not a pickle").hexdigest()]])
    with pytest.raises(errors.UserError, match="cannot be read"):
        cifar.load_cifar("CIFAR10", str(copy))
