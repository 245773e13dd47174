import os
import subprocess
import sys

import pytest

from runs import LOW_PRECISION_RUN, ROOT
from swalp.data.fake_cifar import patch_torchvision_md5, write_fake_cifar


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory):
    """A --data_path holding tiny CIFAR10 and CIFAR100 in their real format."""
    root = tmp_path_factory.mktemp("data")
    write_fake_cifar(str(root))
    return root


@pytest.fixture
def cifar_in_process(cifar_root, monkeypatch):
    """cifar_root, with torchvision told the fake files' md5 sums in this process."""
    import json

    patch_torchvision_md5(monkeypatch, json.loads((cifar_root / "md5.json").read_text()))
    return cifar_root


@pytest.fixture(scope="session")
def fake_cifar_env(cifar_root):
    """Environment for subprocesses that see the fake data sets and cannot
    reach the network."""
    env = dict(os.environ)
    # The repository too: scripts started by path import the swalp package even where it is not installed.
    env["PYTHONPATH"] = os.pathsep.join([str(cifar_root / "site"), ROOT, env.get("PYTHONPATH", "")])
    env["FAKE_CIFAR_MD5"] = str(cifar_root / "md5.json")
    # A download attempt fails at once instead of leaving the machine.
    env["http_proxy"] = env["https_proxy"] = "http://127.0.0.1:9"
    env.pop("no_proxy", None)
    env.pop("NO_PROXY", None)
    return env


@pytest.fixture(scope="session")
def run_train(cifar_root, fake_cifar_env):
    """Run `python train.py ARGS` in such a subprocess; returns the CompletedProcess."""

    def run(*args, timeout=600):
        return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *map(str, args)],
                              cwd=ROOT, env=fake_cifar_env, capture_output=True, text=True, timeout=timeout)

    run.data_path = cifar_root
    return run


@pytest.fixture(scope="session")
def low_precision_run(run_train, tmp_path_factory):
    """One seeded 8-bit run on the CPU (the torch backend), with a checkpoint per epoch."""
    run_dir = tmp_path_factory.mktemp("lp") / "run"
    result = run_train(*LOW_PRECISION_RUN, "--data_path", run_train.data_path, "--dir", run_dir)
    assert result.returncode == 0, result.stderr
    assert "torch backend" in result.stdout  # auto picks ours on the CPU
    return run_dir




@pytest.fixture
def train_in_process(cifar_in_process, capsys):
    """Run `train.main(ARGS)` in this process (no interpreter start-up, no
    import of torch): returns (exit code, stdout, stderr)."""
    import train

    def run(*args):
        try:
            train.main([str(arg) for arg in args])
            code = 0
        except SystemExit as exit:
            code = exit.code
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    run.data_path = cifar_in_process
    return run
