"""The digits runners of the formats and transformer tables: what they run,
that finished runs are read back rather than trained, and their tables."""

import json
import os

import pytest

import train
from experiments import digits_formats, digits_runs, vit_digits


def test_the_formats_runner_runs_each_format_twice_per_layout_beside_full_precision():
    configurations = list(digits_formats.runs(["nvfp4"], ema_decay=0.99))
    assert [name for _, name, _ in configurations] == [
        "fp", "nvfp4-swa", "nvfp4-ema", "nvfp4-edges-swa", "nvfp4-edges-ema"]
    flags = dict((name, flags) for _, name, flags in configurations)
    assert flags["fp"] == []
    assert flags["nvfp4-edges-ema"] == ["--format", "nvfp4", "--rounding", "stochastic", "--small-block", "FC",
                                        "--layer-format", "first:fp32", "--layer-format", "last:fp32",
                                        "--average", "ema", "--ema_decay", "0.99"]
    for _, _, extra in configurations:  # every configuration is a valid command line
        train.parse_args(["--dataset", "digits", "--model", "PreResNet20", *extra])


def test_the_formats_table_gives_mean_and_std_per_layout_and_average():
    summary = [{"row": row, "name": name, "seed": seed, "sgd_error": 10.0 + seed, "swa_error": 5.0 + 2 * seed}
               for seed in (1, 2, 3) for row, name in (("bfp8, every layer", "bfp8-swa"),
                                                       ("bfp8, every layer", "bfp8-ema"))]
    line = digits_formats.table(summary).splitlines()[-1]
    assert [cell.strip() for cell in line.split("|")[1:-1]] == ["bfp8, every layer", "12.00 ± 1.00", "9.00 ± 2.00",
                                                                 "9.00 ± 2.00"]
    assert "3 seeds" in digits_formats.table(summary).splitlines()[0]


def test_the_vit_runner_pairs_each_optimizer_with_each_format():
    configurations = vit_digits.configurations("digits", 10, ["bfp8"], ["--seed", "7"])
    assert [name for name, *_ in configurations] == ["sgd-fp32", "adamw-fp32", "sgd-bfp8", "adamw-bfp8"]
    for name, argv, optimizer, spec in configurations:
        args = train.parse_args(argv)
        assert (args.model, args.optimizer, args.epochs, args.swa_start, args.seed) == (
            "ViT", optimizer.lower(), 10, 6, 7)
        assert args.format == (None if spec == "fp32" else spec)


def test_a_finished_run_is_read_back_not_trained_again(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "results.json").write_text(json.dumps({"status": "running"}))
    assert digits_runs.finished(run_dir) is None
    (run_dir / "results.json").write_text(json.dumps({"status": "finished", "sgd_error": 3.0}))

    def refuse(argv):
        raise AssertionError("trained again")

    monkeypatch.setattr(train, "main", refuse)
    assert digits_runs.train_once(run_dir, [])["sgd_error"] == 3.0
    assert digits_runs.spread([1.0, 3.0]) == "2.00 ± 1.41" and digits_runs.spread([2.0]) == "2.00"
    assert digits_runs.spread([None]) is None


@pytest.mark.parametrize("runner", [digits_formats, vit_digits])
def test_report_prints_only_what_finished(runner, tmp_path, capsys):
    runner.main(["--seeds", "1", "--out", str(tmp_path), "--report"])
    assert "seeds" in capsys.readouterr().out


def test_a_runner_passes_what_follows_its_own_flags_to_train_py():
    parser = digits_runs.runner_parser("What a runner does.\n\nMore.", "name")
    args, extra = digits_runs.parse(parser, ["--seeds", "4", "5", "--", "--epochs", "2"])
    assert (args.seeds, args.report, extra) == ([4, 5], False, ["--epochs", "2"])
    assert args.out == os.path.join("experiments", "results", "name") and parser.description == "What a runner does."
