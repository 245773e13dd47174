"""The paper runner and report, on short real runs."""

import json
import os
import statistics
import subprocess
import sys
import threading
import time

from runs import ROOT

sys.path.insert(0, os.path.join(ROOT, "reproduce"))

import report  # noqa: E402
import run as runner  # noqa: E402

TINY = ["--", "--model", "PreResNet20", "--epochs", "2", "--swa_start", "1", "--batch_size", "16",
        "--num_workers", "0"]


def reproduce(script, *args, env=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "reproduce", script), *map(str, args)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_dry_run_prints_the_papers_commands(tmp_path):
    out = tmp_path / "paper"
    finished = out / "CIFAR10-VGG16-fp" / "seed2"
    finished.mkdir(parents=True)
    (finished / "results.json").write_text(json.dumps({"status": "finished"}))
    result = reproduce("run.py", "--data_path", "data", "--out", out, "--seeds", 1, 2, "--dry-run")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    commands = [line for line in lines if line.startswith("run: ")]
    assert len(commands) == 7  # 2 datasets x 2 precisions x 2 seeds, one finished
    assert "skip (finished): CIFAR10-VGG16-fp seed 2" in lines
    assert lines[-1] == "7 of 8 runs to do"
    lp = next(c for c in commands if "CIFAR100-VGG16-lp8/seed1" in c)
    for flag in ("--epochs 300", "--lr_init 0.05", "--swa_start 200", "--swa_lr 0.01", "--wd 0.0005",
                 "--wl-weight 8", "--wl-acc 8", "--wl-momentum 8", "--resume auto", "--seed 1"):
        assert flag in lp, flag
    fp = next(c for c in commands if "CIFAR10-VGG16-fp/seed1" in c)
    assert "--wl-" not in fp
    assert not (out / "CIFAR10-VGG16-fp" / "seed1").exists()  # a dry run creates nothing


def test_runs_on_several_gpus_side_by_side_but_one_per_gpu():
    jobs = [runner.Job(f"job{i}", f"/nonexistent/{i}") for i in range(6)]
    spans, lock = [], threading.Lock()

    def fake_launch(job, gpu):
        start = time.monotonic()
        time.sleep(0.05)
        with lock:
            spans.append((gpu, start, time.monotonic()))
        return 1 if job.name == "job3" else 0

    failed = runner.run_jobs(jobs, ["0", "1"], start=fake_launch, report=lambda line: None)
    assert [job.name for job in failed] == ["job3"]
    assert {gpu for gpu, _, _ in spans} == {"0", "1"}
    for gpu in ("0", "1"):
        own = sorted(span[1:] for span in spans if span[0] == gpu)
        assert all(end <= next_start for (_, end), (next_start, _) in zip(own, own[1:]))  # never two at once
    zero, one = [min(s[1] for s in spans if s[0] == gpu) for gpu in ("0", "1")]
    assert abs(zero - one) < 0.04  # the two GPUs started together


def test_runner_then_report_on_short_real_runs(fake_cifar_env, cifar_root, tmp_path):
    out = tmp_path / "paper"
    args = ["--data_path", cifar_root, "--out", out, "--datasets", "CIFAR10", "--seeds", 1, 2, *TINY]
    result = reproduce("run.py", *args, env=fake_cifar_env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 of 4 runs done" in result.stdout
    again = reproduce("run.py", *args, env=fake_cifar_env)
    assert again.stdout.count("skip (finished)") == 4 and "0 of 4 runs to do" in again.stdout

    results = {(precision, seed): json.loads((out / f"CIFAR10-VGG16-{precision}" / f"seed{seed}" /
                                              "results.json").read_text())
               for precision in ("fp", "lp8") for seed in (1, 2)}
    assert results[("lp8", 1)]["config"]["wl_acc"] == 8 and results[("fp", 1)]["config"]["wl_weight"] == -1

    printed = reproduce("report.py", out, "--plots", tmp_path / "plots")
    assert printed.returncode == 0, printed.stderr
    row = next(line for line in printed.stdout.splitlines() if line.startswith("| CIFAR10 | PreResNet20"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    for column, (precision, key) in zip(cells[3:], [("fp", "sgd_error"), ("fp", "swa_error"),
                                                    ("lp8", "sgd_error"), ("lp8", "swa_error")]):
        values = [results[(precision, seed)][key] for seed in (1, 2)]
        assert column == f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f} (2)"
    assert (tmp_path / "plots" / "CIFAR10-PreResNet20.png").stat().st_size > 10_000


def test_report_puts_the_papers_numbers_next_to_the_measured_ones():
    def fake(fmt_lengths, sgd, swa):
        config = {"dataset": "CIFAR100", "model": "VGG16", **{f"wl_{k}": fmt_lengths for k in report.NUMBER_KINDS}}
        return ("x", {"status": "finished", "config": config, "sgd_error": sgd, "swa_error": swa, "epochs": []})

    runs = [fake(-1, 27.0, 26.0), fake(-1, 28.0, 25.0), fake(8, 30.0, 27.0), fake(6, 40.0, 35.0),
            ("y", {"status": "running", "config": fake(8, 0, 0)[1]["config"], "epochs": []})]
    text = report.table(*report.group(runs))
    lines = text.splitlines()
    eight = next(line for line in lines if "| 8-bit |" in line)
    assert "27.50 ± 0.71 (2) [paper 27.23 ± 0.17]" in eight and "25.50 ± 0.71 (2) [paper 25.93 ± 0.21]" in eight
    assert "30.00 (1) [paper 29.59 ± 0.32]" in eight and "27.00 (1) [paper 26.65 ± 0.29]" in eight
    six = next(line for line in lines if "| W6A6G6E6M6Acc6 |" in line)
    assert "40.00 (1)" in six and "paper" not in six
    assert "Not finished: 1 run(s) of CIFAR100 VGG16 8-bit." in lines


def test_report_without_results_is_a_clear_error(tmp_path):
    result = reproduce("report.py", tmp_path)
    assert result.returncode == 2 and "no results.json" in result.stderr
