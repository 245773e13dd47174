"""The swalp package: installable, importable from any folder, a small public
API that works on a model of the user's own, and checkpoints of earlier
versions that still resume."""

import inspect
import json
import lzma
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import swalp
import train
from grid import on_block_grid
from runs import EIGHT_BIT, ROOT, SMALL, table_rows
from swalp.run import arguments

USE_API = """
import json, os, sys, torch, swalp
net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
sites = swalp.quantize_model(net, "bfp8", "bfp8", backend="torch")
optimizer = swalp.wrap_optimizer(torch.optim.SGD(net.parameters(), lr=0.1), weight="bfp6", backend="torch")
net(torch.randn(4, 8)).sum().backward()
optimizer.step()
print(json.dumps({"file": swalp.__file__, "sites": sites, "step": optimizer.noise.step,
                  "weight": net[0].weight.tolist()}))
"""


def test_pip_install_puts_an_importable_package_where_it_is_installed(tmp_path):
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                              "--target", str(target), ROOT], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr
    installed = sorted(str(path.relative_to(target)) for path in (target / "swalp").rglob("*.py"))
    in_repository = sorted(str(path.relative_to(ROOT)) for path in (
        __import__("pathlib").Path(ROOT) / "swalp").rglob("*.py"))
    assert installed == in_repository
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", USE_API], cwd=elsewhere, env=dict(env, PYTHONPATH=str(target)),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    used = json.loads(result.stdout)
    assert used["file"] == str(target / "swalp" / "__init__.py") and used["sites"] == ["0"] and used["step"] == 1
    assert on_block_grid(torch.tensor(used["weight"]), 6)


def test_no_file_of_the_package_is_ignored_by_git():
    if shutil.which("git") is None or not os.path.isdir(os.path.join(ROOT, ".git")):
        pytest.skip("not a git checkout")
    files = [str(path.relative_to(ROOT)) for path in __import__("pathlib").Path(ROOT, "swalp").rglob("*.py")]
    ignored = subprocess.run(["git", "check-ignore", *files], cwd=ROOT, capture_output=True, text=True)
    assert ignored.stdout == ""


def test_the_public_api_is_small_typed_and_documented_with_examples():
    assert sorted(swalp.__all__) == sorted(set(swalp.__all__)) and len(swalp.__all__) <= 20
    for name in swalp.__all__:
        value = getattr(swalp, name)
        assert name in dir(swalp)
        if callable(value) and not isinstance(value, type(swalp.NUMBER_KINDS)):
            assert value.__doc__, name
        if inspect.isfunction(value):
            assert ">>>" in value.__doc__, f"{name}'s docstring has no example"
            assert any(parameter.annotation is not inspect.Parameter.empty
                       for parameter in inspect.signature(value).parameters.values()), f"{name} has no types"
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        swalp.nothing


def test_the_public_api_docstring_examples_hold():
    import doctest

    for name in ("parse_format", "select_backend", "quantize_model", "wrap_optimizer", "TensorQuantizer",
                 "StepNoise"):
        value = getattr(swalp, name)
        globs = {**vars(inspect.getmodule(value)), "torch": torch, "nn": torch.nn}
        runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
        for test in doctest.DocTestFinder(recurse=False).find(value, name, globs=globs):
            runner.run(test)
        assert runner.failures == 0, name


def test_a_model_of_ones_own_learns_in_8_bits_with_swa_from_the_example(capsys):
    import runpy

    script = os.path.join(ROOT, "examples", "swalp_own_model.py")
    with open(script) as handle:
        source = handle.read()
    assert len(source.splitlines()) <= 40
    imports = re.findall(r"^(?:import|from) (\S+)", source, flags=re.MULTILINE)
    assert set(imports) <= {"torch", "torch.nn", "torch.optim.swa_utils", "sklearn.datasets", "swalp"}
    runpy.run_path(script, run_name="__main__")  # in this process: torch is imported already
    errors = [float(line.rsplit(" ", 1)[-1].rstrip("%")) for line in capsys.readouterr().out.splitlines()]
    assert len(errors) == 2 and all(error < 15 for error in errors), errors


def test_a_checkpoint_written_before_the_package_resumes_and_continues(train_fast, tmp_path):
    """tests/fixtures/README.md says how the checkpoint was made."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with lzma.open(os.path.join(ROOT, "tests", "fixtures", "main-checkpoint-2-step2.pt.xz")) as packed:
        (run_dir / "checkpoint-2-step2.pt").write_bytes(packed.read())
    old = torch.load(run_dir / "checkpoint-2-step2.pt", weights_only=True)
    result = train_fast("--dataset", "CIFAR10", "--data_path", train_fast.data_path, "--model", "PreResNet20",
                       "--epochs", 3, "--swa_start", 2, "--save_freq", 1, *EIGHT_BIT, *SMALL,
                       "--save_every_steps", 4, "--dir", run_dir, "--resume", "auto")
    assert result.returncode == 0, result.stderr
    assert f"Resumed from {run_dir / 'checkpoint-2-step2.pt'} after epoch 2, step 2" in result.stdout
    assert [int(row[0]) for row in table_rows(result.stdout)] == [3]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "finished" and results["swa_n"] == 2
    assert results["epochs"][:2] == old["history"] and results["epochs"][2]["epoch"] == 3
    new = torch.load(run_dir / "checkpoint-3.pt", weights_only=True)
    # Its own paths, and the defaults of flags added since it was written.
    changed = {"data_path": str(train_fast.data_path), "dir": str(run_dir), "resume": "auto"}
    defaults = arguments.config(train.parse_args(["--data_path", "d", "--model", "PreResNet20"]))
    added = {key: new["config"][key] for key in new["config"].keys() - old["config"].keys()}
    assert added and added == {key: defaults[key] for key in added}
    assert new["config"] == {**old["config"], **changed, **added}
    assert new["noise_step"] == old["noise_step"] + 1  # the epoch's last step of three
    assert on_block_grid(new["model_state"]["layer1.0.conv1.weight"], 8)
    assert not torch.equal(new["model_state"]["layer1.0.conv1.weight"], old["model_state"]["layer1.0.conv1.weight"])
    assert sorted(path.name for path in run_dir.glob("checkpoint-*.pt")) == ["checkpoint-3.pt"]
