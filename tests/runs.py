"""Command lines and comparisons shared by the end-to-end tests."""

import contextlib
import io
import json
import os
import subprocess
import sys
import time

import pytest
import torch

import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EIGHT_BIT = ["--wl-weight", 8, "--wl-grad", 8, "--wl-activate", 8, "--wl-error", 8, "--wl-momentum", 8]
SMALL = ["--batch_size", 16, "--num_workers", 0]
LOW_PRECISION_RUN = ["--dataset", "CIFAR10", "--model", "PreResNet20", "--epochs", 4, "--swa_start", 2,
                     "--swa_c_epochs", 2, "--save_freq", 1, *EIGHT_BIT, "--wl-acc", 12, *SMALL]
# A download attempt fails at once instead of leaving the machine (the tests' process's and its children's).
OFFLINE = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}


def start_interpreted_checks(work):
    """tests/triton_interpreted.py's checks, started in a process of their
    own on one thread (Triton's interpreter must be chosen before triton is
    imported), offline, writing to work/stdout and work/stderr (files: a
    full pipe would stall it while nobody reads); returns the Popen."""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **OFFLINE)
    env.pop("no_proxy", None)
    env.pop("NO_PROXY", None)
    with open(os.path.join(work, "stdout"), "w") as stdout, open(os.path.join(work, "stderr"), "w") as stderr:
        return subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "triton_interpreted.py"), str(work)],
                                cwd=ROOT, env=env, stdout=stdout, stderr=stderr)


def refusal(capsys, *flags):
    """The one line of stderr with which train.py's parser refuses `flags`
    (given with a data path and a model), exiting 2."""
    with pytest.raises(SystemExit) as stopped:
        train.parse_args(["--data_path", "data", "--model", "VGG16", *flags])
    error = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2 and len(error) == 1, error
    return error[0]


def table_rows(stdout):
    return [line.split() for line in stdout.splitlines() if line.strip() and line.split()[0].isdigit()
            and len(line.split()) >= 6]


def assert_same_run(first, second, epochs):
    """Bit-identical weights, SWA weights, optimizer state and per-epoch metrics."""
    expected = torch.load(first / f"checkpoint-{epochs}.pt", weights_only=True)
    actual = torch.load(second / f"checkpoint-{epochs}.pt", weights_only=True)
    for part in ("model_state", "swa_state"):
        assert expected[part].keys() == actual[part].keys()
        for key, value in expected[part].items():
            assert torch.equal(actual[part][key], value), (part, key)
    for index, state in expected["optimizer_state"]["state"].items():
        for key, value in state.items():  # SGD's momentum buffer, AdamW's moments and step count
            assert torch.equal(actual["optimizer_state"]["state"][index][key], value), (index, key)
    assert actual["noise_step"] == expected["noise_step"]
    first_results = json.loads((first / "results.json").read_text())
    second_results = json.loads((second / "results.json").read_text())
    for ours, theirs in zip(second_results["epochs"], first_results["epochs"], strict=True):
        for key in ("train_loss", "train_accuracy", "test_loss", "swa_test_loss", "lr", "swa_n", "collected"):
            assert ours[key] == theirs[key], key
    return first_results, second_results


def start_train(fake_cifar_env, *args, new_session=False):
    """train.py in the background (in a process group of its own with new_session)."""
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *map(str, args)], cwd=ROOT,
                            env=fake_cifar_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=new_session)


def wait_for(path, process, timeout=300):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def train_here(*args, timeout=None):
    """`python train.py ARGS` as train.main in this process: a CompletedProcess
    with its exit code and what it printed."""
    import train

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            train.main([str(arg) for arg in args])
            code = 0
        except SystemExit as exit:
            code = exit.code
    return subprocess.CompletedProcess(["train.py", *map(str, args)], code, out.getvalue(), err.getvalue())


def checkpoint_mid_epoch(flags, run_dir, steps=2):
    """Train train.py's run of `flags` in this process for `steps` steps of
    its first epoch, then save: the mid-epoch checkpoint's path."""
    import train
    from swalp.run import distributed

    args = train.parse_args([str(flag) for flag in (*flags, "--dir", run_dir)])
    stopped = train.start(args, distributed.World(), torch.device("cpu"), str(run_dir), None, [])
    stopped.open_logs(resumed=False)

    class StopAfterSteps:
        def __bool__(self):
            return stopped.state.epoch_totals["steps"] == steps

    assert not train.train_epoch(stopped, StopAfterSteps())
    checkpoint = train.save(stopped)
    stopped.close_logs()
    return checkpoint
