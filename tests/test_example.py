import json
import os
import subprocess

from runs import ROOT


def documented_example():
    """The command line example.sh's header gives as its example."""
    with open(os.path.join(ROOT, "example.sh")) as handle:
        comment = [line[1:].strip() for line in handle if line.startswith("#") and not line.startswith("#!")]
    return next(line for line in comment if line.startswith("bash example.sh "))


def test_the_documented_example_line_runs_the_seed_experiment(fake_cifar_env, cifar_root, tmp_path):
    """The header's exact line, unchanged, started from another folder through
    a link to example.sh (DATA_PATH names the tiny data): it runs the seed's
    configuration with the line's flags passed through."""
    (tmp_path / "example.sh").symlink_to(os.path.join(ROOT, "example.sh"))
    env = dict(fake_cifar_env, DATA_PATH=str(cifar_root))
    result = subprocess.run(["bash", "-c", documented_example()], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    results = json.loads((tmp_path / "runs" / "example-trial" / "results.json").read_text())
    assert results["status"] == "finished" and results["swa_n"] == 2
    config = results["config"]
    assert config["dataset"] == "CIFAR100" and config["seed"] == 100 and config["wd"] == 5e-4
    assert config["lr_init"] == 0.05 and config["swa_lr"] == 0.01 and config["rounding"] == "stochastic"
    assert all(config[f"wl_{kind}"] == 8 for kind in ("weight", "grad", "activate", "error", "momentum"))
    assert config["wl_acc"] == -1
    assert "\nacc       : none, SGD updates the weights directly\n" in result.stdout  # as --help and README say
    assert (config["model"], config["epochs"], config["swa_start"], config["device"]) == ("VGG16", 2, 1, "cpu")
