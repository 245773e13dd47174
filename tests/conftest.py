import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from runs import LOW_PRECISION_RUN, OFFLINE, ROOT, start_interpreted_checks, train_here
from swalp.data.fake_cifar import patch_torchvision_md5, write_fake_cifar

def pytest_collection_finish(session):
    """The interpreted checks keep one core busy for tens of seconds, while
    much of the suite leaves the second idle (subprocesses starting,
    waiting for each other): where a selected test needs them, they start
    now and run beside the tests before it."""
    if any("interpreted" in getattr(item, "fixturenames", ()) for item in session.items):
        work = tempfile.mkdtemp(prefix="interpreted-")
        session.config.interpreted_checks = (start_interpreted_checks(work), work)


def pytest_sessionfinish(session):
    process, work = getattr(session.config, "interpreted_checks", (None, None))
    if process is not None:
        process.kill()  # nothing, when it has finished
        process.wait()
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory):
    """A --data_path holding tiny CIFAR10 and CIFAR100 in their real format."""
    root = tmp_path_factory.mktemp("data")
    write_fake_cifar(str(root))
    return root


@pytest.fixture(scope="session", autouse=True)
def offline_with_fake_cifar(cifar_root):
    """For the whole session: torchvision knows the fake files' md5 sums in
    this process (a test may patch its own over them), and no download
    leaves the machine."""
    with pytest.MonkeyPatch.context() as patch:
        patch_torchvision_md5(patch, json.loads((cifar_root / "md5.json").read_text()))
        for key, value in OFFLINE.items():
            patch.setenv(key, value)
        patch.delenv("no_proxy", raising=False)
        patch.delenv("NO_PROXY", raising=False)
        yield


@pytest.fixture
def cifar_in_process(cifar_root):
    """cifar_root, readable through torchvision in this process."""
    return cifar_root


@pytest.fixture(scope="session")
def fake_cifar_env(cifar_root):
    """Environment for subprocesses that see the fake data sets and cannot
    reach the network."""
    env = dict(os.environ)
    # The repository too: scripts started by path import the swalp package even where it is not installed.
    env["PYTHONPATH"] = os.pathsep.join([str(cifar_root / "site"), ROOT, env.get("PYTHONPATH", "")])
    env["FAKE_CIFAR_MD5"] = str(cifar_root / "md5.json")
    env.update(OFFLINE)
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
def train_fast(cifar_root):
    """Like run_train, but train.main in this process: no interpreter to start
    and no torch to import, seconds each. For runs whose process boundary
    does not matter (no signals, no second process)."""
    train_here.data_path = cifar_root
    return train_here


@pytest.fixture(scope="session")
def low_precision_run(train_fast, tmp_path_factory):
    """One seeded 8-bit run on the CPU (the torch backend), with a checkpoint per epoch."""
    run_dir = tmp_path_factory.mktemp("lp") / "run"
    result = train_fast(*LOW_PRECISION_RUN, "--data_path", train_fast.data_path, "--dir", run_dir)
    assert result.returncode == 0, result.stderr
    assert "torch backend" in result.stdout  # auto picks ours on the CPU
    return run_dir




@pytest.fixture
def train_in_process(cifar_in_process):
    """Run `train.main(ARGS)` in this process: returns (exit code, stdout, stderr)."""

    def run(*args):
        result = train_here(*args)
        return result.returncode, result.stdout, result.stderr

    run.data_path = cifar_in_process
    return run
