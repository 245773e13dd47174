"""Exact resume, interruption, safe checkpoints and the failures a user can cause."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from runs import LOW_PRECISION_RUN, ROOT, SMALL, assert_same_run, start_train, table_rows, wait_for
from swalp.run import checkpoint_files

FP_RUN = ["--dataset", "CIFAR10", "--model", "PreResNet20", "--epochs", 2, "--swa_start", 1, *SMALL]


def test_sigkill_mid_epoch_then_resume_auto_matches_the_uninterrupted_run(
        train_fast, fake_cifar_env, low_precision_run, tmp_path):
    run_dir = tmp_path / "killed"
    args = [*LOW_PRECISION_RUN, "--data_path", train_fast.data_path, "--dir", run_dir, "--save_every_steps", 1]
    process = start_train(fake_cifar_env, *args)
    wait_for(run_dir / "checkpoint-1-step2.pt", process)
    process.kill()
    process.wait()
    assert (run_dir / ".train.lock").exists()  # left behind, but its lock died with the process
    newest = max(run_dir.glob("checkpoint-*.pt"), key=os.path.getmtime)
    torch.load(newest, weights_only=True)  # a kill, even during a save, leaves the newest checkpoint whole

    result = train_fast(*args, "--resume", "auto")
    assert result.returncode == 0, result.stderr
    assert f"Resumed from {newest}" in result.stdout
    assert_same_run(low_precision_run, run_dir, epochs=4)
    # Superseded mid-epoch checkpoints and leftovers of an interrupted save are gone.
    assert list(run_dir.glob("checkpoint-*-step*.pt")) == []
    assert list(run_dir.glob("*.tmp")) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_at_the_next_step_and_says_how_to_resume(
        train_fast, fake_cifar_env, low_precision_run, tmp_path, signum):
    run_dir = tmp_path / "stopped"
    args = [*LOW_PRECISION_RUN, "--data_path", train_fast.data_path, "--dir", run_dir]
    process = start_train(fake_cifar_env, *args, "--save_every_steps", 1)
    wait_for(run_dir / "checkpoint-2-step1.pt", process)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signum, stderr
    message = stdout.strip().splitlines()
    assert message[-2].startswith(f"Stopped by {signal.Signals(signum).name} at epoch ")
    command = message[-1]
    assert command.startswith(sys.executable) and "--resume" in command
    saved = command.split("--resume ")[-1].strip("'")
    assert os.path.exists(saved)

    result = train_fast(*args, "--resume", saved)
    assert result.returncode == 0, result.stderr
    assert_same_run(low_precision_run, run_dir, epochs=4)
    # Only the newest mid-epoch checkpoint is kept; epoch checkpoints stay.
    assert sorted(p.name for p in run_dir.glob("checkpoint-*.pt")) == [
        "checkpoint-1.pt", "checkpoint-2.pt", "checkpoint-3.pt", "checkpoint-4.pt"]


def test_resume_auto_starts_fresh_in_an_empty_directory(train_fast, tmp_path):
    run_dir = tmp_path / "fresh"
    result = train_fast(*FP_RUN, "--data_path", train_fast.data_path, "--dir", run_dir, "--resume", "auto")
    assert result.returncode == 0, result.stderr
    assert "Resumed" not in result.stdout
    assert [int(row[0]) for row in table_rows(result.stdout)] == [1, 2]


@pytest.fixture(scope="module")
def fp_checkpoint(train_fast, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("fp") / "run"
    assert train_fast(*FP_RUN, "--data_path", train_fast.data_path, "--dir", run_dir).returncode == 0
    return run_dir / "checkpoint-1.pt"


def run_in_copy(train_fast, tmp_path, checkpoint_bytes, *extra):
    """Resume from a checkpoint with the given bytes, kept in a directory
    holding a finished run; returns the result and asserts the directory is
    untouched."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "results.json").write_text('{"status": "finished"}')
    bad = run_dir / "bad.pt"
    bad.write_bytes(checkpoint_bytes)
    result = train_fast(*FP_RUN, "--data_path", train_fast.data_path, "--dir", run_dir, "--resume", bad, *extra)
    assert sorted(p.name for p in run_dir.iterdir()) == ["bad.pt", "results.json"]
    assert (run_dir / "results.json").read_text() == '{"status": "finished"}'
    return result


def one_line_error(result, *fragments):
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_truncated_checkpoint(train_fast, fp_checkpoint, tmp_path):
    data = fp_checkpoint.read_bytes()
    one_line_error(run_in_copy(train_fast, tmp_path, data[: len(data) // 2]), "truncated or corrupt")


def test_corrupt_checkpoint(train_fast, tmp_path):
    one_line_error(run_in_copy(train_fast, tmp_path, os.urandom(5000)), "bad.pt", "corrupt")


def test_checkpoint_with_foreign_objects_is_refused(train_fast, tmp_path):
    import argparse
    import io

    buffer = io.BytesIO()
    torch.save({"config": argparse.Namespace(model="PreResNet20")}, buffer)
    one_line_error(run_in_copy(train_fast, tmp_path, buffer.getvalue()), "other than tensors and plain values")


@pytest.mark.parametrize("content", [{"epoch": 1, "model_state": {}}, [1, 2], torch.zeros(2)])
def test_checkpoint_missing_parts(train_fast, tmp_path, content):
    import io

    buffer = io.BytesIO()
    torch.save(content, buffer)
    one_line_error(run_in_copy(train_fast, tmp_path, buffer.getvalue()), "lacks", "config")


def test_empty_checkpoint_file(train_fast, tmp_path):
    one_line_error(run_in_copy(train_fast, tmp_path, b""), "bad.pt", "truncated or corrupt")


@pytest.mark.parametrize("flags, fragment", [
    (["--model", "VGG16"], "--model PreResNet20, this run has VGG16"),
    (["--dataset", "CIFAR100"], "--dataset CIFAR10, this run has CIFAR100"),
    (["--wl-weight", "8"], "--wl-weight -1, this run has 8"),
    (["--small-block", "FC"], "--small-block None, this run has FC"),
    (["--seed", "2"], "--seed 1, this run has 2"),
    (["--wd", "0.5"], "--wd 0.0001, this run has 0.5"),
    (["--swa_schedule", "cyclic"], "--swa_schedule constant, this run has cyclic"),
    (["--loader", "torchvision"], "--loader batched, this run has torchvision"),
])
def test_mismatched_checkpoint(train_fast, fp_checkpoint, tmp_path, flags, fragment):
    one_line_error(run_in_copy(train_fast, tmp_path, fp_checkpoint.read_bytes(), *flags), fragment)


@pytest.mark.parametrize("flags, fragment", [
    (["--wl-weight", "0"], "--wl-weight: 0 is not a word length"),
    (["--wl-error", "1"], "--wl-error: 1 is not a word length"),
    (["--wl-grad", "33"], "--wl-grad: 33 is not a word length"),
    (["--batch_size", "0"], "--batch_size: 0 must be positive"),
    (["--epochs", "-3"], "--epochs: -3 must be positive"),
    (["--swa_lr", "0"], "--swa_lr: 0 must be positive"),
    (["--dataset", "MNIST"], "--dataset: invalid choice: 'MNIST'"),
    (["--save_every_steps", "-1"], "--save_every_steps: -1 must be 0 or more"),
])
def test_invalid_flags(train_fast, tmp_path, flags, fragment):
    result = train_fast("--data_path", train_fast.data_path, "--model", "VGG16", "--dir", tmp_path / "run", *flags)
    one_line_error(result, fragment)
    assert not (tmp_path / "run").exists()


def test_unwritable_run_directory(train_fast, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = train_fast(*FP_RUN, "--data_path", train_fast.data_path, "--dir", blocker / "run")
    one_line_error(result, "cannot write to run directory", "choose another --dir")


def test_corrupt_data_file_in_a_run(train_fast, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(train_fast.data_path / "cifar10", data / "cifar10")
    (data / "cifar10" / "cifar-10-batches-py" / "test_batch").write_bytes(b"garbage")
    result = train_fast(*FP_RUN, "--data_path", data, "--dir", tmp_path / "run")
    one_line_error(result, "missing or corrupt", "cifar-10-batches-py")


def test_overwrite_replaces_only_the_previous_run(train_fast, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in ("results.json", "checkpoint-7.pt", "checkpoint-7-step3.pt", "notes.txt"):
        (run_dir / name).write_text("old")
    result = train_fast(*FP_RUN, "--data_path", train_fast.data_path, "--dir", run_dir, "--overwrite")
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in run_dir.iterdir() if not p.name.startswith("events") and p.name != "steps")
    assert names == ["checkpoint-1.pt", "checkpoint-2.pt", "notes.txt", "results.json"]
    assert json.loads((run_dir / "results.json").read_text())["status"] == "finished"


def test_a_diverged_run_stops_and_keeps_its_last_good_checkpoint(train_fast, tmp_path):
    run_dir = tmp_path / "diverged"
    result = train_fast(*FP_RUN, "--data_path", train_fast.data_path, "--dir", run_dir, "--lr_init", 1e6,
                       "--save_every_steps", 1)
    one_line_error(result, "the loss became nan at epoch 1, step 3", "checkpoint-0-step2.pt")
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-0-step2.pt"]
    torch.load(run_dir / "checkpoint-0-step2.pt", weights_only=True)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "diverged" and results["diverged_at"] == {"epoch": 1, "step": 3}


def test_sigterm_to_the_whole_process_group_with_loader_workers(train_fast, fake_cifar_env, tmp_path):
    # Launchers and schedulers signal every process of the group, loader workers included.
    per_sample = [*LOW_PRECISION_RUN, "--epochs", 2, "--data_path", train_fast.data_path, "--loader", "torchvision"]
    reference = tmp_path / "reference"
    assert train_fast(*per_sample, "--dir", reference).returncode == 0
    run_dir = tmp_path / "group"
    args = [*per_sample, "--dir", run_dir, "--num_workers", 2]
    process = start_train(fake_cifar_env, *args, "--save_every_steps", 1, new_session=True)
    wait_for(run_dir / "checkpoint-1-step2.pt", process)
    os.killpg(process.pid, signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "Resume with:" in stdout
    result = train_fast(*args, "--resume", "auto")
    assert result.returncode == 0, result.stderr
    # Two loader workers or none: the same augmentation, the same run.
    assert_same_run(reference, run_dir, epochs=2)


def test_resuming_another_runs_checkpoint_into_a_used_directory_is_refused(train_fast, fp_checkpoint, tmp_path):
    run_dir = tmp_path / "other"
    run_dir.mkdir()
    (run_dir / "results.json").write_text('{"status": "finished"}')
    result = train_fast(*FP_RUN, "--data_path", train_fast.data_path, "--dir", run_dir, "--resume", fp_checkpoint)
    one_line_error(result, "already holds a run; resume with one of its own checkpoints")
    assert sorted(p.name for p in run_dir.iterdir()) == ["results.json"]


def test_overwrite_deletes_nothing_when_the_new_run_cannot_start(train_fast, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "results.json").write_text("old")
    (run_dir / "checkpoint-3.pt").write_text("old")
    result = train_fast(*FP_RUN, "--data_path", tmp_path / "no-data", "--dir", run_dir, "--overwrite")
    one_line_error(result, "could not be downloaded")
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint-3.pt", "results.json"]


def test_a_mid_epoch_checkpoint_needs_the_same_process_count(train_fast, fp_checkpoint, tmp_path):
    checkpoint = torch.load(fp_checkpoint, weights_only=True)
    checkpoint.update(step=1, world_size=2)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torch.save(checkpoint_files.seal(checkpoint), run_dir / "checkpoint-1-step1.pt")
    result = train_fast(*FP_RUN, "--data_path", train_fast.data_path, "--dir", run_dir, "--resume", "auto")
    one_line_error(result, "is mid-epoch and was written by 2 process(es), this run has 1")


def test_a_stop_at_an_epochs_last_step_saves_before_evaluating(cifar_in_process, tmp_path):
    import train

    args = train.parse_args(["--data_path", str(cifar_in_process), "--model", "PreResNet20", "--epochs", "2",
                             "--swa_start", "1", "--batch_size", "16", "--num_workers", "0", "--dir", str(tmp_path)])
    training = train.build(args, torch.device("cpu"), str(tmp_path))
    training.open_logs(resumed=False)
    steps = training.steps_per_epoch

    class StopAtLastStep:
        def __bool__(self):
            return training.state.epoch_totals["steps"] == steps

    assert not train.train_epoch(training, StopAtLastStep())
    path = train.save(training)
    assert os.path.basename(path) == f"checkpoint-0-step{steps}.pt"
    assert training.state.history == []  # no evaluation yet

    resumed = train.build(args, torch.device("cpu"), str(tmp_path))
    resumed.state.load_state_dict(torch.load(path, weights_only=True), path)
    resumed.open_logs(resumed=True)
    assert train.train_epoch(resumed, stop=False)  # nothing left to train in this epoch
    record = train.finish_epoch(resumed)
    assert record["epoch"] == 1 and record["swa_n"] == 1 and record["test_accuracy"] is not None
    training.close_logs()
    resumed.close_logs()


def test_resume_auto_in_a_directory_with_results_but_no_checkpoint(train_fast, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "results.json").write_text('{"status": "running"}')
    result = train_fast(*FP_RUN, "--data_path", train_fast.data_path, "--dir", run_dir, "--resume", "auto")
    one_line_error(result, "holds results.json but no checkpoint to continue from")
    assert (run_dir / "results.json").read_text() == '{"status": "running"}'


@pytest.mark.parametrize("damage", ["removed", "truncated", "one epoch short"])
def test_a_resume_from_the_final_checkpoint_repairs_results_json(train_fast, fp_checkpoint, tmp_path, damage):
    """A kill between the final checkpoint and the final results.json leaves
    it missing, cut or an epoch short: a resume completes it as the
    uninterrupted run wrote it."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(fp_checkpoint.parent, run_dir)
    complete = json.loads((run_dir / "results.json").read_text())
    path = run_dir / "results.json"
    if damage == "removed":
        path.unlink()
    elif damage == "truncated":
        path.write_text(path.read_text()[:100])
    else:
        path.write_text(json.dumps({**complete, "status": "running", "epochs": complete["epochs"][:-1]}))
    result = train_fast(*FP_RUN, "--data_path", train_fast.data_path, "--dir", run_dir, "--resume", "auto")
    assert result.returncode == 0, result.stderr
    assert table_rows(result.stdout) == [] and result.stdout.splitlines()[-3] == "Done"
    repaired = json.loads(path.read_text())
    assert repaired == {**complete, "config": {**complete["config"], "dir": str(run_dir), "resume": "auto"}}


def test_a_stop_while_loader_workers_start_stops_at_once(fake_cifar_env, train_fast, tmp_path):
    """SIGTERM while the epoch waits for its first batch (here: a worker that
    takes seconds to start; 975 took minutes) saves at the step boundary at
    once, rather than after the first step."""
    run_dir = tmp_path / "slow"
    slow_workers = (
        "import runpy, sys, time\n"
        "from swalp.data import loaders\n"
        "started = loaders.own_process_group\n"
        "def slow(worker_id):\n"
        "    started(worker_id)\n"
        "    time.sleep(4)\n"
        "loaders.own_process_group = slow\n"
        "sys.argv = sys.argv[1:]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    process = subprocess.Popen(
        [sys.executable, "-c", slow_workers, os.path.join(ROOT, "train.py"), *map(str, FP_RUN), "--data_path",
         str(train_fast.data_path), "--dir", str(run_dir), "--loader", "torchvision", "--num_workers", "1"],
        cwd=ROOT, env=dict(fake_cifar_env, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True)
    for line in process.stdout:
        if line.startswith("Model PreResNet20"):
            break
    time.sleep(0.5)  # the worker is starting
    process.send_signal(signal.SIGTERM)
    try:
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert f"Stopped by SIGTERM at epoch 1, step 0; saved {run_dir / 'checkpoint-0.pt'}" in stdout
    result = train_fast(*FP_RUN, "--data_path", train_fast.data_path, "--dir", run_dir, "--loader", "torchvision",
                        "--resume", "auto")
    assert result.returncode == 0, result.stderr
    assert [int(row[0]) for row in table_rows(result.stdout)] == [1, 2]
