"""End-to-end runs of train.py as a subprocess on tiny CIFAR-format data."""

import json
import os
import subprocess
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import utils
from grid import on_block_grid

from runs import EIGHT_BIT, LOW_PRECISION_RUN, ROOT, SMALL, assert_same_run, table_rows


def scalar_tags(run_dir):
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return set(events.Tags()["scalars"])


def check_run(result, run_dir, epochs, swa_start, checkpoints):
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = ["ep", "lr", "tr_loss", "tr_acc", "tr_time", "te_loss", "te_acc", "swa_te_loss", "swa_te", "swa_n"]
    assert any(line.split() == header for line in lines)
    rows = table_rows(result.stdout)
    assert [int(row[0]) for row in rows] == list(range(1, epochs + 1))
    assert all(len(row) == 8 and row[-1] == "0" for row in rows[:swa_start - 1])  # no SWA test before averaging
    assert all(len(row) == 10 for row in rows[swa_start - 1:])
    assert [int(row[-1]) for row in rows[swa_start - 1:]] == list(range(1, epochs - swa_start + 2))
    assert lines[-2].startswith("SGD Error : ") and lines[-1].startswith("SWA Error : ")

    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "finished"
    assert [record["epoch"] for record in results["epochs"]] == list(range(1, epochs + 1))
    assert results["swa_n"] == epochs - swa_start + 1
    assert results["sgd_error"] == pytest.approx(100 - results["epochs"][swa_start - 1]["test_accuracy"])
    assert results["swa_error"] == pytest.approx(100 - results["epochs"][-1]["swa_test_accuracy"])
    assert lines[-1] == f"SWA Error : {results['swa_error']}"

    assert sorted(p.name for p in run_dir.glob("checkpoint-*.pt")) == sorted(
        f"checkpoint-{epoch}.pt" for epoch in checkpoints)
    assert scalar_tags(run_dir) >= {
        "lr", "time/epoch", "swa/n_averaged", "train/loss", "train/acc_perc", "train/err_perc",
        "test/loss", "test/acc_perc", "test/err_perc", "test_swa/loss", "test_swa/acc_perc", "test_swa/err_perc"}
    return results


def test_full_precision_vgg16_on_cifar100(train_fast, tmp_path):
    run_dir = tmp_path / "fp"
    result = train_fast("--dataset", "CIFAR100", "--data_path", train_fast.data_path, "--model", "VGG16",
                       "--epochs", 3, "--swa_start", 2, "--lr_init", 0.01, "--save_freq", 2,
                       "--momentum", 0.8, "--wd", 3e-4, "--dir", run_dir, *SMALL)
    results = check_run(result, run_dir, epochs=3, swa_start=2, checkpoints=[2, 3])
    assert results["activation_quantizers"] == 0
    group = torch.load(run_dir / "checkpoint-3.pt", weights_only=True)["optimizer_state"]["param_groups"][0]
    assert (group["momentum"], group["weight_decay"]) == (0.8, 3e-4)
    assert "qtorch" not in result.stderr
    assert [record["lr"] for record in results["epochs"]] == pytest.approx([0.01, 0.01, 0.01])

    checkpoint = torch.load(run_dir / "checkpoint-3.pt", weights_only=True)
    assert checkpoint["epoch"] == 3 and int(checkpoint["swa_state"]["n_averaged"]) == 2
    assert set(checkpoint) >= {"model_state", "swa_state", "optimizer_state", "rng", "config", "history"}
    assert checkpoint["optimizer_state"]["state"], "momentum buffers are saved"


def test_eight_bit_vgg16bn_on_cifar10(train_fast, tmp_path):
    run_dir = tmp_path / "lp"
    result = train_fast("--dataset", "CIFAR10", "--data_path", train_fast.data_path, "--model", "VGG16BN",
                       "--epochs", 3, "--swa_start", 2, *EIGHT_BIT, "--dir", run_dir, *SMALL)
    results = check_run(result, run_dir, epochs=3, swa_start=2, checkpoints=[2, 3])
    assert results["activation_quantizers"] == 15
    assert [record["lr"] for record in results["epochs"]] == pytest.approx([0.05, 0.05, 0.01])

    checkpoint = torch.load(run_dir / "checkpoint-3.pt", weights_only=True)
    model = checkpoint["model_state"]
    for key in ("features.0.weight", "features.0.bias", "classifier.1.weight", "classifier.6.weight"):
        assert on_block_grid(model[key], 8), key
    for state in checkpoint["optimizer_state"]["state"].values():
        assert on_block_grid(state["momentum_buffer"], 8)
    # The SWA copy is a full-precision average whose BatchNorm statistics were recomputed.
    swa_state = checkpoint["swa_state"]
    assert not on_block_grid(swa_state["module.features.0.weight"], 8)
    assert swa_state["module.features.1.running_mean"].abs().sum() > 0
    assert int(swa_state["module.features.1.num_batches_tracked"]) == 3  # one pass of 3 batches
    # The SGD model's statistics were recomputed before its evaluation, too.
    assert int(model["features.1.num_batches_tracked"]) == 3


def test_seeded_low_precision_cpu_runs_are_bit_identical(run_train, train_fast, low_precision_run, tmp_path):
    again = tmp_path / "again"
    assert run_train(*LOW_PRECISION_RUN, "--data_path", run_train.data_path, "--dir", again).returncode == 0
    results, _ = assert_same_run(low_precision_run, again, epochs=4)
    assert results["quant_backend"] == "torch"
    assert results["swa_n"] == 2  # epochs 2 and 4
    other_seed = tmp_path / "other"
    # One epoch is enough to see another seed change the first epoch's loss.
    assert train_fast(*LOW_PRECISION_RUN, "--data_path", run_train.data_path, "--dir", other_seed,
                     "--seed", 2, "--epochs", 1, "--swa_start", 1, "--swa_c_epochs", 1).returncode == 0
    changed = json.loads((other_seed / "results.json").read_text())["epochs"][0]["train_loss"]
    assert changed != results["epochs"][0]["train_loss"]


def test_resumed_low_precision_run_matches_the_uninterrupted_one(train_fast, low_precision_run, tmp_path):
    resumed = tmp_path / "resumed"
    result = train_fast(*LOW_PRECISION_RUN, "--data_path", train_fast.data_path, "--dir", resumed,
                       "--resume", low_precision_run / "checkpoint-2.pt")
    assert result.returncode == 0, result.stderr
    assert "Resumed from" in result.stdout
    assert [int(row[0]) for row in table_rows(result.stdout)] == [3, 4]
    lines = result.stdout.splitlines()
    first_row = next(i for i, line in enumerate(lines) if line.split()[:1] == ["3"])
    assert lines[first_row - 2].split() == utils.TABLE_COLUMNS  # the header comes before the first row
    assert_same_run(low_precision_run, resumed, epochs=4)


def test_qtorch_backend_end_to_end(train_fast, tmp_path):
    run_dir = tmp_path / "qtorch"
    result = train_fast("--dataset", "CIFAR10", "--data_path", train_fast.data_path, "--model", "PreResNet20",
                       "--epochs", 1, "--swa_start", 1, *EIGHT_BIT, "--quant-backend", "qtorch", "--dir", run_dir,
                       *SMALL, "--batch_size", 40)  # qtorch's CPU kernels are slow: one step
    assert result.returncode == 0, result.stderr
    assert "qtorch backend" in result.stdout
    checkpoint = torch.load(run_dir / "checkpoint-1.pt", weights_only=True)
    assert on_block_grid(checkpoint["model_state"]["layer1.0.conv1.weight"], 8)


def test_help_explains_every_flag(train_in_process):
    code, stdout, _ = train_in_process("--help")
    assert code == 0
    for flag in ("--dataset", "--data_path", "--batch_size", "--swa_start", "--swa_lr", "--model", "--epochs",
                 "--lr_init", "--wd", "--seed", "--wl-weight", "--wl-activate", "--wl-grad", "--wl-error",
                 "--wl-momentum", "--wl-acc", "--rounding", "--quant-type", "--small-block", "--block-dim",
                 "--quant-placement", "--dir", "--num_workers", "--momentum", "--save_freq", "--eval_freq",
                 "--swa_c_epochs", "--resume", "--device", "--overwrite", "--format", "--format-weight",
                 "--keep_checkpoints", "--deterministic", "--loader"):
        assert flag in stdout, flag


@pytest.mark.parametrize("flags, message", [
    (["--wl-weight", 1], "--wl-weight: 1 is not a word length"),
    (["--wl-acc", 40], "--wl-acc: 40 is not a word length"),
    (["--lr_init", 0], "--lr_init: 0 must be positive"),
    (["--lr_init", "nan"], "--lr_init: nan is not a number"),
    (["--wd", "inf"], "--wd: inf must be finite"),
    (["--seed", -1], "--seed: -1 must be in 0..2^32-1"),
    (["--num_workers", -1], "--num_workers: -1 must be 0 or more"),
    (["--device", "mps"], "--device mps is not supported"),
    (["--model", "ResNet1000"], "invalid choice: 'ResNet1000'"),
    (["--swa_start", 5], "--swa_start 5 is beyond --epochs 2"),
    (["--num_workers", 10000], "--num_workers 10000 is far more than this machine's"),
    (["--dir", ""], "--dir is empty; name a run directory"),
    (["--model", "PreResNet2"], "invalid choice: 'PreResNet2' (choose from PreResNet164, PreResNet20, "),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
])
def test_bad_flags_end_in_one_line_and_exit_code_2(train_in_process, tmp_path, flags, message):
    args = {"--model": "VGG16", "--epochs": 2, "--swa_start": 1, "--dir": tmp_path / "run"}
    args.update(dict(zip(flags[::2], flags[1::2])))
    code, _, stderr = train_in_process("--data_path", train_in_process.data_path,
                                       *[x for pair in args.items() for x in pair])
    assert code == 2
    assert message in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert not (tmp_path / "run").exists()


def test_missing_data_says_where_to_put_it(train_fast, tmp_path):
    result = train_fast("--data_path", tmp_path / "empty", "--model", "VGG16", "--epochs", 1, "--swa_start", 1,
                       "--dir", tmp_path / "run", *SMALL)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert "could not be downloaded" in last and "cifar-10-batches-py" in last
    assert str(tmp_path / "empty" / "cifar10") in last
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "empty").exists()  # the failed download leaves no empty folder behind


def test_a_finished_run_is_never_overwritten_silently(train_in_process, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "results.json").write_text('{"status": "finished"}')
    code, _, stderr = train_in_process("--data_path", train_in_process.data_path, "--model", "VGG16", "--epochs", 1,
                                       "--swa_start", 1, "--dir", run_dir, *SMALL)
    assert code == 2 and "already holds a run" in stderr
    assert (run_dir / "results.json").read_text() == '{"status": "finished"}'


def test_resume_from_a_missing_checkpoint_is_a_clear_error(train_in_process, tmp_path):
    code, _, stderr = train_in_process("--data_path", train_in_process.data_path, "--model", "VGG16", "--epochs", 1,
                                       "--swa_start", 1, "--dir", tmp_path / "run", "--resume", tmp_path / "nope.pt",
                                       *SMALL)
    assert code == 2 and "nope.pt does not exist" in stderr


def test_eval_freq_and_the_originals_quantizer_options_end_to_end(train_fast, tmp_path):
    run_dir = tmp_path / "options"
    result = train_fast("--dataset", "CIFAR10", "--data_path", train_fast.data_path, "--model", "PreResNet20",
                       "--epochs", 4, "--swa_start", 1, "--eval_freq", 3, *EIGHT_BIT, "--quant-type", "nearest",
                       "--small-block", "FC", "--block-dim", "BC", "--quant-placement", "relu", "--dir", run_dir,
                       *SMALL, "--batch_size", 40)  # one step per epoch: the test is about what is evaluated
    assert result.returncode == 0, result.stderr
    results = json.loads((run_dir / "results.json").read_text())
    # Evaluated at swa_start (1), every 3rd epoch and at the end; not at epoch 2.
    assert [record["test_accuracy"] is not None for record in results["epochs"]] == [True, False, True, True]
    config = results["config"]
    assert (config["rounding"], config["small_block"], config["block_dim"]) == ("nearest", "FC", "BC")
    assert results["activation_quantizers"] == 1 + 9 * 3  # stem conv, and per block its ReLU and two convs
    model = torch.load(run_dir / "checkpoint-4.pt", weights_only=True)["model_state"]
    weight = model["layer1.0.conv1.weight"]
    # BC: one exponent per (output, input) channel pair; FC: the 1-D classifier bias shares one.
    assert on_block_grid(weight, 8, rows=weight.reshape(weight.shape[0] * weight.shape[1], -1))
    bias = model["fc.bias"]
    assert on_block_grid(bias, 8, rows=bias.reshape(1, -1))


def test_model_names_in_any_case_and_the_closest_one_for_a_typo(capsys):
    import train

    assert train.parse_args(["--model", "preresnet20", "--data_path", "d"]).model == "PreResNet20"
    with pytest.raises(SystemExit):
        train.parse_args(["--model", "PreResNet2", "--data_path", "d"])
    assert capsys.readouterr().err.strip().endswith("did you mean PreResNet20? (see --help)")


def test_the_default_loader_workers_fit_the_machine():
    import train
    from swalp.run.arguments import machine_cores

    for dataset in ("digits", "CIFAR10"):
        args = train.parse_args(["--dataset", dataset, "--model", "PreResNet20", "--data_path", "d"])
        assert 1 <= args.num_workers <= min(4, machine_cores())


def test_a_bad_flag_fails_before_torch_is_imported(tmp_path):
    """train.py checks its flags first: with a torch that cannot be imported,
    a mistake still ends in its one-line message and --help still works."""
    broken = tmp_path / "broken"
    (broken / "torch").mkdir(parents=True)
    (broken / "torch" / "__init__.py").write_text("raise ImportError('torch was imported')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(broken), ROOT])}
    for flags, expected in ((["--model", "VGG16", "--wl-weight", "1", "--data_path", "d"], 2),
                            (["--model", "VGG16"], 2), (["--help"], 0)):
        result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *flags], env=env, cwd=tmp_path,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == expected and "torch was imported" not in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == (1 if expected else 0)


def test_a_missing_resume_checkpoint_fails_before_the_data_load(train_in_process, tmp_path, monkeypatch):
    from swalp.data import datasets

    def no_data(*args, **kwargs):
        raise AssertionError("the data were loaded before --resume was checked")

    monkeypatch.setattr(datasets, "load_on_every_rank", no_data)
    code, _, stderr = train_in_process("--data_path", train_in_process.data_path, "--model", "PreResNet20",
                                       "--epochs", 1, "--swa_start", 1, "--dir", tmp_path / "run", "--resume",
                                       tmp_path / "nope.pt")
    assert code == 2 and "nope.pt does not exist" in stderr

