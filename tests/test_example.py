import json
import os
import subprocess

from runs import ROOT


def test_example_sh_runs_the_seed_experiment_and_passes_arguments_through(fake_cifar_env, cifar_root, tmp_path):
    run_dir = tmp_path / "example"
    env = dict(fake_cifar_env, DATA_PATH=str(cifar_root))
    result = subprocess.run(
        ["bash", os.path.join(ROOT, "example.sh"), "--model", "PreResNet20", "--epochs", "1", "--swa_start", "1",
         "--batch_size", "16", "--num_workers", "0", "--dir", str(run_dir)],
        env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    config = json.loads((run_dir / "results.json").read_text())["config"]
    assert config["dataset"] == "CIFAR100" and config["seed"] == 100 and config["wd"] == 5e-4
    assert config["lr_init"] == 0.05 and config["swa_lr"] == 0.01 and config["rounding"] == "stochastic"
    assert all(config[f"wl_{kind}"] == 8 for kind in ("weight", "grad", "activate", "error", "momentum"))
    assert config["wl_acc"] == -1
    assert (config["model"], config["epochs"]) == ("PreResNet20", 1)
