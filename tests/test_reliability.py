"""Nothing lost: run-directory ownership, checked data, failed writes,
checkpoint integrity and structure, flags that would do nothing, and the
messages for the mistakes a user can make."""

import errno
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import train
from runs import ROOT, refusal
from swalp.data import cifar, datasets
from swalp.data.fake_cifar import patch_torchvision_md5, write_fake_cifar
from swalp.errors import UserError
from swalp.run import arguments, checkpoint_files, distributed, files, run_directory
from swalp.run.state import load_checkpoint

TINY = ["--model", "PreResNet20", "--epochs", "2", "--swa_start", "1", "--batch_size", "16", "--num_workers", "0"]


def args_for(data_path, run_dir, *extra):
    return train.parse_args(["--data_path", str(data_path), "--dir", str(run_dir), *TINY, *map(str, extra)])


@pytest.fixture(scope="module")
def training(cifar_root, tmp_path_factory):
    """An untrained PreResNet20 run on the fake data, built once."""
    with pytest.MonkeyPatch.context() as patch:
        patch_torchvision_md5(patch, json.loads((cifar_root / "md5.json").read_text()))
        run_dir = tmp_path_factory.mktemp("run")
        yield train.build(args_for(cifar_root, run_dir, "--wl-weight", 8, "--wl-acc", 12),
                             torch.device("cpu"), str(run_dir))


@pytest.fixture(scope="module")
def state(training):
    return training.state.state_dict()


# ---------------------------------------------------------------- 1. one run per directory

def test_a_live_run_owns_its_directory(cifar_root, tmp_path):
    run_dir = tmp_path / "run"
    with run_directory.claim(args_for(cifar_root, run_dir), "unused") as owner:
        for extra in ([], ["--resume", "auto"], ["--overwrite"]):
            with pytest.raises(UserError, match=rf"is in use by a live run \(process {os.getpid()} "):
                run_directory.claim(args_for(cifar_root, run_dir, *extra), "unused")
        assert owner.lock.handle is not None
    assert os.listdir(run_dir) == []  # the lock file goes with its owner
    run_directory.claim(args_for(cifar_root, run_dir), "unused").close()


def test_a_second_train_py_is_refused_while_the_first_is_alive(cifar_root, fake_cifar_env, tmp_path):
    run_dir = tmp_path / "run"
    with run_directory.claim(args_for(cifar_root, run_dir), "unused"):
        (run_dir / "checkpoint-1.pt").write_text("the live run's")
        result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--data_path", str(cifar_root),
                                 "--dir", str(run_dir), *TINY, "--overwrite"], cwd=ROOT, env=fake_cifar_env,
                                capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {run_dir} is in use by a live run (process {os.getpid()} on {os.uname().nodename}); wait for it "
        f"to end or stop it, or choose another --dir"]
    assert (run_dir / "checkpoint-1.pt").read_text() == "the live run's"


def test_the_lock_dies_with_its_process(cifar_root, tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, train; from swalp.run import run_directory; "
                               "owner = run_directory.claim(train.parse_args(sys.argv[1:]), 'unused'); "
                               "print('locked', flush=True); sys.stdin.read()",
         "--data_path", str(cifar_root), "--dir", str(run_dir), *TINY],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "locked\n"
    with pytest.raises(UserError, match=f"process {holder.pid} "):
        run_directory.claim(args_for(cifar_root, run_dir), "unused")
    holder.kill()
    holder.wait()
    assert (run_dir / run_directory.LOCK_NAME).exists()  # the file stays, its lock does not
    run_directory.claim(args_for(cifar_root, run_dir), "unused").close()


# ---------------------------------------------------------------- 2. data checked before anything is deleted

@pytest.fixture
def bad_cifar(tmp_path, monkeypatch):
    """Fake CIFAR10 under tmp_path/data whose test batch is replaced by
    `entry`; md5 sums patched to the new files."""
    data = tmp_path / "data"

    def write(entry):
        write_fake_cifar(str(data))
        path = data / "cifar10" / "cifar-10-batches-py" / "test_batch"
        with open(path, "rb") as handle:
            original = pickle.load(handle, encoding="latin1")
        with open(path, "wb") as handle:
            pickle.dump({**original, **entry(original)}, handle)
        import hashlib

        sums = json.loads((data / "md5.json").read_text())
        sums["CIFAR10"]["test_batch"] = hashlib.md5(path.read_bytes()).hexdigest()
        patch_torchvision_md5(monkeypatch, sums)
        return data, path

    return write


@pytest.mark.parametrize("entry, problem", [
    (lambda batch: {"labels": [12] + batch["labels"][1:]}, "label 12 of image 0 is outside the classes 0..9"),
    (lambda batch: {"labels": batch["labels"][:-1]}, "19 labels for 20 images"),
    (lambda batch: {"data": batch["data"][:, :1024]}, "images of shape [1024], CIFAR images have 3072 values"),
])
def test_bad_data_is_named_before_training_and_overwrite_deletes_nothing(bad_cifar, tmp_path, entry, problem):
    data, path = bad_cifar(entry)
    with pytest.raises(UserError, match="^" + re.escape(f"{path}: {problem}")):
        datasets.load_data("CIFAR10", str(data))

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "results.json").write_text("old")
    with pytest.raises(UserError, match="outside|labels for|images of shape"):
        train.run_training(args_for(data, run_dir, "--overwrite"), distributed.World())
    assert sorted(p.name for p in run_dir.iterdir()) == ["results.json"]


def test_unreadable_data_says_permission_denied(cifar_in_process, monkeypatch):
    def denied(path):
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(os, "listdir", denied)
    with pytest.raises(UserError, match=re.escape(f"permission denied reading {cifar_in_process}; make")):
        cifar.load_cifar("CIFAR10", str(cifar_in_process))


# ---------------------------------------------------------------- 3. failed writes

def failing_open(target, after_bytes):
    """open() for checkpoint_files.py: writes to files whose name contains
    `target` fail with ENOSPC after `after_bytes` bytes."""
    class Full:
        def __init__(self, handle):
            self.handle, self.written = handle, 0

        def write(self, data):
            self.written += len(data)
            if self.written > after_bytes:
                self.handle.write(bytes(data)[:100])
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.handle.write(data)

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

    def fake(path, mode="r", *args, **kwargs):
        handle = open(path, mode, *args, **kwargs)
        return Full(handle) if target in os.path.basename(path) else handle

    return fake


def test_disk_full_during_a_save_keeps_the_earlier_checkpoints_and_records_the_failure(training, monkeypatch):
    run_dir = training.run_dir
    for name in os.listdir(run_dir):
        os.remove(os.path.join(run_dir, name))
    training.state.epoch = 1
    first = train.save(training)
    training.state.epoch = 2
    monkeypatch.setattr(checkpoint_files, "open", failing_open("checkpoint-2", 300_000), raising=False)
    with pytest.raises(UserError) as failure:
        train.save(training)
    needed = os.path.getsize(first) / 2 ** 20
    assert str(failure.value) == (
        f"cannot write {run_dir}/checkpoint-2.pt (No space left on device); the newest good checkpoint is {first}: "
        f"free at least {needed:.0f} MB in {run_dir} and resume with --resume {first}")
    assert sorted(os.listdir(run_dir)) == ["checkpoint-1.pt", "results.json"]  # no partial file
    load_checkpoint(first)
    results = json.loads(open(os.path.join(run_dir, "results.json")).read())
    assert results["status"] == "failed" and "No space left on device" in results["failure"]


def test_a_vanished_directory_and_a_failed_results_json_are_write_failures(tmp_path, monkeypatch):
    gone = str(tmp_path / "gone")
    with pytest.raises(files.WriteFailed, match="No such file or directory") as failure:
        checkpoint_files.save_checkpoint(gone, {"epoch": 1, "step": 0})
    assert checkpoint_files.failed_write_message(gone, failure.value).endswith(
        f"the run directory {gone} no longer exists: restore it, or start again elsewhere")

    def eio(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", eio)
    with pytest.raises(files.WriteFailed, match="Input/output error"):
        files.write_json_atomic(str(tmp_path / "results.json"), {"status": "running"})
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- 4. checksums and numbers

def malformed(state, change):
    """A copy of `state` (its containers, not its tensors) changed by `change`."""
    import copy

    broken = {key: copy.copy(value) for key, value in state.items()}
    broken["rng"] = [dict(generators) for generators in state["rng"]]
    change(broken)
    return broken


def test_flipped_bytes_deep_in_tensor_data_are_caught(state, tmp_path):
    older = checkpoint_files.save_checkpoint(str(tmp_path), {**state, "epoch": 1, "step": 0})
    newer = checkpoint_files.save_checkpoint(str(tmp_path), {**state, "epoch": 2, "step": 0})
    data = bytearray(open(newer, "rb").read())
    # Inside the stored bytes of the largest tensor: the file still unpickles.
    largest = max(state["model_state"].values(), key=torch.Tensor.nelement)
    offset = bytes(data).index(largest.numpy().tobytes()[:64]) + largest.nelement() * 2
    data[offset:offset + 4] = b"\xff\xff\xff\x7f"
    open(newer, "wb").write(bytes(data))
    torch.load(newer, weights_only=True)
    with pytest.raises(UserError, match=re.escape(f"checkpoint {newer} is corrupt: its content does not "
                                                        f"match its checksum; resume from {older}")):
        load_checkpoint(newer)


@pytest.mark.parametrize("part", ["model_state", "swa_state", "momentum", "weight_acc"])
def test_nan_or_inf_in_a_checkpoint_is_refused(state, tmp_path, part):
    broken = malformed(state, lambda s: None)
    if part == "momentum":
        shape = next(iter(state["model_state"].values())).shape
        broken["optimizer_state"] = {"state": {0: {"momentum_buffer": torch.zeros(shape)}},
                                     "param_groups": state["optimizer_state"]["param_groups"]}
        tensor, key = broken["optimizer_state"]["state"][0]["momentum_buffer"], "optimizer_state['state'][0]"
    elif part == "weight_acc":
        broken["weight_acc"][1] = tensor = state["weight_acc"][1].clone()
        key = "weight_acc[1]"
    else:
        name = next(name for name, tensor in state[part].items() if tensor.is_floating_point())
        broken[part][name] = tensor = state[part][name].clone()
        key = f"{part}['{name}']"
    tensor.view(-1)[0] = float("inf") if part == "swa_state" else float("nan")
    path = tmp_path / "checkpoint-3.pt"
    torch.save(checkpoint_files.seal(broken), path)  # a valid checksum over a NaN
    with pytest.raises(UserError, match=f"is corrupt: {re.escape(key)}.* holds NaN or inf; "
                                              f"resume from another checkpoint"):
        load_checkpoint(str(path))


def test_a_checksum_survives_a_save_and_a_load(state, tmp_path):
    path = checkpoint_files.save_checkpoint(str(tmp_path), state)
    loaded = load_checkpoint(path)
    assert loaded["checksum"] == checkpoint_files.content_checksum(state)


# ---------------------------------------------------------------- 5. structure

@pytest.mark.parametrize("change, message", [
    (lambda s: s.update(config="CIFAR10"), "config must be a dict, found str"),
    (lambda s: s.update(epoch="2"), "epoch must be an integer of at least 0, found '2'"),
    (lambda s: s["rng"][0].update(torch=torch.zeros(3, dtype=torch.uint8)),
     r"rng\[0\]\['torch'\] must be a uint8 tensor of shape \[5056\], found \[3\]"),
    (lambda s: s["rng"][0].update(python=(3, (1, 2), None)), r"rng\[0\]\['python'\] is not a Python generator"),
    (lambda s: s["model_state"].update({"fc.weight": torch.zeros(3, 3)}),
     r"model_state\['fc.weight'\] must be a tensor of shape \[10, 64\], found \[3, 3\]"),
    (lambda s: s["swa_state"].pop("n_averaged"), r"swa_state lacks 'n_averaged'"),
    (lambda s: s["weight_acc"].pop(), "weight_acc must hold"),
    (lambda s: s.update(loader_generator=torch.zeros(2)), "loader_generator must be a uint8 tensor"),
    (lambda s: s["epoch_totals"].update(steps=None), r"epoch_totals\['steps'\] must be a finite number"),
    (lambda s: s.update(history=[1]), r"history\[0\] must be an epoch record"),
    (lambda s: s.update(model_state=[1]), "model_state must be a dict of tensors, found list"),
    (lambda s: s["model_state"].update(extra=torch.zeros(1)), "model_state has 'extra', which this model does not"),
    (lambda s: s["optimizer_state"].pop("state"), "optimizer_state must hold a 'state' dict and a 'param_groups' list"),
    (lambda s: s.update(rng=[]), "rng must hold at least one process's generator states"),
    (lambda s: s["epoch_totals"].update(collected_at=[None]), r"epoch_totals\['collected_at'\] must be a list of step"),
])
def test_a_malformed_checkpoint_names_its_first_bad_field(state, training, change, message):
    with pytest.raises(UserError, match=f"^checkpoint x.pt is malformed: {message}"):
        training.state.load_state_dict(malformed(state, change), "x.pt")


def test_resuming_beyond_epochs_is_refused(state, training):
    with pytest.raises(UserError, match="is after epoch 3, beyond --epochs 2; resume with --epochs 3 or more"):
        training.state.load_state_dict({**state, "epoch": 3}, "x.pt")


# ---------------------------------------------------------------- 6 and 7. flags

@pytest.mark.parametrize("flags, message", [
    (["--swa_cycle_steps", "5"], "--swa_cycle_steps applies only to --swa_schedule cyclic"),
    (["--swa_lr_max", "0.1"], "--swa_lr_max applies only to --swa_schedule cyclic"),
    (["--swa_c_epochs", "2", "--swa_c_steps", "3"], "--swa_c_epochs does nothing when averaging every"),
    (["--swa_c_epochs", "2", "--swa_schedule", "cyclic"], "--swa_c_epochs does nothing when averaging every"),
    (["--wl-momentum", "8", "--momentum", "0"], "--wl-momentum does nothing with --momentum 0"),
    (["--format-momentum", "e4m3", "--momentum", "0"], "--format-momentum does nothing with --momentum 0"),
    (["--swa_lr", "inf"], "--swa_lr: inf must be finite"),
    (["--swa_lr", "fast"], "--swa_lr: fast is not a number"),
    (["--epochs", "2.5"], "--epochs: 2.5 is not a whole number"),
    (["--wl-weight", "eight"], "--wl-weight: eight is not a whole number"),
])
def test_flags_that_would_do_nothing_or_are_no_numbers_are_refused(capsys, flags, message):
    assert message in refusal(capsys, *flags)


def test_format_for_every_kind_with_no_momentum_is_accepted():
    args = train.parse_args(["--data_path", "data", "--model", "VGG16", "--format", "e4m3", "--momentum", "0"])
    config = arguments.config(args)
    assert config["format_weight"] == "e4m3" and config["format_momentum"] == "e4m3"


def test_overwrite_with_a_resume_of_the_same_run_is_refused(cifar_root, tmp_path):
    with pytest.raises(UserError, match="--overwrite starts afresh and --resume auto continues"):
        run_directory.claim(args_for(cifar_root, tmp_path / "run", "--resume", "auto", "--overwrite"), "unused")
    assert not (tmp_path / "run").exists()


def test_resume_of_a_directory_says_so(cifar_root, tmp_path):
    with pytest.raises(UserError, match=re.escape(f"--resume {tmp_path} is a directory; pass one of its ")):
        run_directory.claim(args_for(cifar_root, tmp_path / "run", "--resume", tmp_path), "unused")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("interruption, code, message", [
    (KeyboardInterrupt, 130, "error: interrupted by Ctrl-C before training started"),
    (UserError("bad data"), 2, "error: bad data"),
])
def test_a_run_that_ends_before_training_leaves_no_empty_directory(
        cifar_root, tmp_path, monkeypatch, capsys, interruption, code, message):
    def fail(*args, **kwargs):
        raise interruption

    monkeypatch.setattr(train, "build", fail)
    run_dir = tmp_path / "new" / "run"
    with pytest.raises(SystemExit) as exit_:
        train.main(["--data_path", str(cifar_root), "--dir", str(run_dir), *TINY])
    assert exit_.value.code == code
    assert capsys.readouterr().err.strip().splitlines() == [message]
    assert os.listdir(tmp_path) == []


def test_ctrl_c_while_loading_exits_130_in_one_line(cifar_root, fake_cifar_env, tmp_path):
    run_dir = tmp_path / "run"
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), "--data_path", str(cifar_root),
                                "--dir", str(run_dir), *TINY], cwd=ROOT, env=fake_cifar_env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not (run_dir / run_directory.LOCK_NAME).exists():
        assert process.poll() is None, process.communicate()
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines() == ["error: interrupted by Ctrl-C before training started"]
    assert not run_dir.exists()


# ---------------------------------------------------------------- --keep_checkpoints

def test_keep_checkpoints_keeps_the_newest_and_the_one_at_swa_start(training, monkeypatch):
    monkeypatch.setattr(training.args, "keep_checkpoints", 2)
    run_dir = training.run_dir
    for name in os.listdir(run_dir):
        os.remove(os.path.join(run_dir, name))
    for epoch in range(5):
        training.state.epoch = epoch
        train.save(training)
    training.state.epoch_totals["steps"] = 1  # a mid-epoch checkpoint does not count
    train.save(training)
    training.state.epoch_totals["steps"] = 0
    assert sorted(os.listdir(run_dir)) == [
        "checkpoint-1.pt", "checkpoint-3.pt", "checkpoint-4-step1.pt", "checkpoint-4.pt"]
