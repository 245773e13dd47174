"""The paper runner and report, on short real runs."""

import json
import os
import statistics
import subprocess
import sys
import threading
import time

import pytest

from runs import ROOT

sys.path.insert(0, os.path.join(ROOT, "reproduce"))

import report  # noqa: E402
import run as runner  # noqa: E402

TINY = ["--", "--model", "PreResNet20", "--epochs", "2", "--swa_start", "1", "--batch_size", "16",
        "--num_workers", "0"]


def reproduce(script, *args, env=None, cwd=ROOT):
    return subprocess.run([sys.executable, os.path.join(ROOT, "reproduce", script), *map(str, args)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def test_a_negative_keep_checkpoints_is_refused(capsys):
    with pytest.raises(SystemExit) as stopped:
        runner.parse_args(["--data_path", "data", "--keep-checkpoints", "-1"])
    assert stopped.value.code == 2 and "--keep-checkpoints -1 must be 0 (keep all) or more" in capsys.readouterr().err


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
    interrupted = out / "CIFAR100-VGG16-lp8" / "seed1"
    interrupted.mkdir(parents=True)
    (interrupted / "results.json").write_text(json.dumps({"status": "running"}))
    again = reproduce("run.py", "--data_path", "data", "--out", out, "--seeds", 1, 2, "--dry-run").stdout
    assert any(line.startswith("continue: ") and "CIFAR100-VGG16-lp8/seed1" in line for line in again.splitlines())
    lp = next(c for c in commands if "CIFAR100-VGG16-lp8/seed1" in c)
    for flag in ("--epochs 300", "--lr_init 0.05", "--swa_start 200", "--swa_lr 0.01", "--wd 0.0005",
                 "--wl-weight 8", "--wl-acc 8", "--wl-momentum 8", "--resume auto", "--seed 1",
                 "--keep_checkpoints 2", f"--data_path {ROOT}/data ", f"--dir {out}/CIFAR100-VGG16-lp8/seed1 "):
        assert flag in lp, flag
    fp = next(c for c in commands if "CIFAR10-VGG16-fp/seed1" in c)
    assert "--wl-" not in fp
    assert not (out / "CIFAR10-VGG16-fp" / "seed1").exists()  # a dry run creates nothing
    keep_all = reproduce("run.py", "--data_path", "data", "--out", out, "--keep-checkpoints", 0, "--dry-run").stdout
    assert "run: " in keep_all and "--keep_checkpoints" not in keep_all


def test_runs_on_several_gpus_side_by_side_but_one_per_gpu():
    jobs = [runner.Job(f"job{i}", f"/nonexistent/{i}", "CIFAR10") for i in range(6)]
    spans, lock = [], threading.Lock()

    def fake_launch(job, gpu):
        start = time.monotonic()
        time.sleep(0.05)
        with lock:
            spans.append((gpu, start, time.monotonic()))
        return 1 if job.name == "job3" else 0

    lines = []
    failed = runner.run_jobs(jobs, ["0", "1"], start=fake_launch, report=lines.append)
    assert [job.name for job in failed] == ["job3"]
    assert any(line.startswith("FAILED (exit 1): job3") for line in lines)
    assert {gpu for gpu, _, _ in spans} == {"0", "1"}
    for gpu in ("0", "1"):
        own = sorted(span[1:] for span in spans if span[0] == gpu)
        assert all(end <= next_start for (_, end), (next_start, _) in zip(own, own[1:]))  # never two at once
    zero, one = [min(s[1] for s in spans if s[0] == gpu) for gpu in ("0", "1")]
    assert abs(zero - one) < 0.04  # the two GPUs started together


def test_a_run_that_cannot_start_or_is_running_elsewhere(tmp_path):
    import fcntl

    def broken(job, gpu):
        raise OSError("no such directory")

    lines = []
    broken_job = runner.Job("broken", str(tmp_path / "x"), "CIFAR10")
    failed = runner.run_jobs([broken_job], [], start=broken, report=lines.append)
    assert [job.name for job in failed] == ["broken"] and "FAILED (OSError: no such directory): broken" in lines
    busy = runner.Job("busy", str(tmp_path / "busy"), "CIFAR10", command=["false", "--resume", "auto"])
    (tmp_path / "busy").mkdir()
    with open(tmp_path / "busy" / ".runner.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert runner.launch(busy, None) is None  # another runner has it
    assert runner.run_jobs([busy], [], report=lines.append) == [busy]  # free again: runs, and `false` fails
    assert lines[-1] == "FAILED (exit 1): busy"


def test_runner_then_report_on_short_real_runs_from_another_folder(fake_cifar_env, cifar_root, tmp_path):
    """Started outside the repository with relative paths, the runner, its
    dry run and the report all find the same run directories."""
    out = tmp_path / "paper"
    args = ["--data_path", os.path.relpath(cifar_root, tmp_path), "--out", "paper", "--datasets", "CIFAR10",
            "--seeds", 1, 2, "--keep-checkpoints", 1, "--gpus", "0,1", *TINY]
    # Two runs side by side on one thread each (each "GPU" is the CPU here):
    # the runs are mostly interpreter start-up, which then overlaps.
    result = reproduce("run.py", *args, env=dict(fake_cifar_env, OMP_NUM_THREADS="1"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 of 4 runs done" in result.stdout
    run_dir = out / "CIFAR10-VGG16-lp8" / "seed1"
    assert {"train.log", ".runner.lock", "results.json"} <= set(os.listdir(run_dir))  # all in one place
    # train.py took --keep_checkpoints 1: the newest epoch checkpoint, and the one at swa_start (1).
    assert sorted(name for name in os.listdir(run_dir) if name.startswith("checkpoint")) == [
        "checkpoint-1.pt", "checkpoint-2.pt"]
    dry = reproduce("run.py", *args[:-len(TINY)], "--dry-run", cwd=tmp_path)
    assert dry.stdout.count("skip (finished)") == 4 and "0 of 4 runs to do" in dry.stdout, dry.stdout
    again = reproduce("run.py", *args, env=fake_cifar_env, cwd=tmp_path)
    assert again.stdout.count("skip (finished)") == 4 and "0 of 4 runs to do" in again.stdout

    results = {(precision, seed): json.loads((out / f"CIFAR10-VGG16-{precision}" / f"seed{seed}" /
                                              "results.json").read_text())
               for precision in ("fp", "lp8") for seed in (1, 2)}
    assert results[("lp8", 1)]["config"]["wl_acc"] == 8 and results[("fp", 1)]["config"]["wl_weight"] == -1

    printed = reproduce("report.py", "paper", "--plots", "plots", cwd=tmp_path)
    assert printed.returncode == 0, printed.stderr
    row = next(line for line in printed.stdout.splitlines() if line.startswith("| CIFAR10 | PreResNet20"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[2] == "2 ep, lr 0.05, swa 1@0.01, wd 0.0005, bs 16"
    for column, (precision, key) in zip(cells[4:], [("fp", "sgd_error"), ("fp", "swa_error"),
                                                    ("lp8", "sgd_error"), ("lp8", "swa_error")]):
        values = [results[(precision, seed)][key] for seed in (1, 2)]
        assert column == f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f} (2)"
    assert (tmp_path / "plots" / "CIFAR10-PreResNet20.png").stat().st_size > 10_000


PAPER_RECIPE = {"epochs": 300, "batch_size": 128, "lr_init": 0.05, "swa_start": 200, "swa_lr": 0.01, "wd": 5e-4,
                "momentum": 0.9, "swa_schedule": "constant", "rounding": "stochastic"}


def fake_run(word_length, seed, sgd, swa, status="finished", **changes):
    config = {"dataset": "CIFAR100", "model": "VGG16", "seed": seed, **PAPER_RECIPE,
              **{f"wl_{kind}": word_length for kind in report.EVERY}, **changes}
    return (f"run{seed}", {"status": status, "config": config, "sgd_error": sgd, "swa_error": swa, "epochs": []})


def test_report_puts_the_papers_numbers_next_to_the_measured_ones():
    runs = [fake_run(-1, 1, 27.0, 26.0), fake_run(-1, 2, 28.0, 25.0), fake_run(8, 1, 30.0, 27.0),
            fake_run(6, 1, 40.0, 35.0), fake_run(8, 2, 0, 0, status="running"), fake_run(8, 3, 0, 0, "diverged"),
            fake_run(8, 1, 99.0, 99.0)]  # seed 1 again: counted once
    lines = report.table(*report.group(runs)).splitlines()
    eight = next(line for line in lines if "| W8A8G8E8M8Acc8 |" in line)
    assert "| 300 ep, lr 0.05, swa 200@0.01, wd 0.0005, bs 128 |" in eight
    assert "27.50 ± 0.71 (2) [paper 27.23 ± 0.17]" in eight and "25.50 ± 0.71 (2) [paper 25.93 ± 0.21]" in eight
    assert "30.00 (1) [paper 29.59 ± 0.32]" in eight and "27.00 (1) [paper 26.65 ± 0.29]" in eight
    six = next(line for line in lines if "| W6A6G6E6M6Acc6 |" in line)
    assert "40.00 (1) |" in six and "[paper 29.59" not in six and "27.50 ± 0.71 (2) [paper 27.23" in six
    left_out = [line for line in lines if line.startswith("Left out")]
    assert len(left_out) == 3
    assert any(line.startswith("Left out, not finished: 1 run(s) of CIFAR100 VGG16 W8A8G8E8M8Acc8")
               for line in left_out)
    assert any(line.startswith("Left out, diverged: 1 run(s)") for line in left_out)
    assert any(line.startswith("Left out, a repeated seed: 1 run(s)") for line in left_out)


def test_report_keeps_different_recipes_and_formats_apart():
    runs = [fake_run(8, 1, 30.0, 27.0), fake_run(8, 2, 31.0, 28.0, epochs=2),
            fake_run(8, 3, 32.0, 29.0, rounding="nearest")]
    lines = [line for line in report.table(*report.group(runs)).splitlines() if line.startswith("| CIFAR100")]
    assert len(lines) == 3
    assert any("| 2 ep," in line and "31.00 (1)" in line for line in lines)
    assert any("W8A8G8E8M8Acc8 rounding=nearest" in line and "32.00 (1)" in line for line in lines)


def test_report_without_results_is_a_clear_error(tmp_path):
    result = reproduce("report.py", tmp_path)
    assert result.returncode == 2 and "no results.json" in result.stderr


def test_runner_adds_one_run_per_format():
    args = runner.parse_args(["--data_path", "data", "--datasets", "CIFAR10", "--seeds", "1", "--precisions", "fp",
                              "--formats", "E4M3", "mxfp8", "bfp8/32"])
    jobs = runner.make_jobs(args)
    assert [os.path.basename(os.path.dirname(job.run_dir)) for job in jobs] == [
        "CIFAR10-VGG16-fp", "CIFAR10-VGG16-e4m3", "CIFAR10-VGG16-mxfp8e4m3", "CIFAR10-VGG16-bfp8k32"]
    command = jobs[2].command
    assert command[command.index("--format") + 1] == "mxfp8e4m3" and "--wl-weight" not in command


def test_report_gives_each_format_its_own_row():
    def formatted(spec, seed, sgd, swa, **changes):
        path, results = fake_run(-1, seed, sgd, swa, small_block="FC", **changes)
        results["config"].update({f"format_{kind}": spec for kind in report.EVERY})
        return path, results

    runs = [fake_run(-1, 1, 27.0, 26.0), formatted("e4m3", 1, 31.0, 28.0), formatted("e4m3", 2, 33.0, 30.0),
            formatted("mxfp8e4m3", 1, 29.0, 27.0), fake_run(8, 1, 30.0, 27.0, small_block="FC")]
    rows = {line.split("|")[4].strip(): line for line in report.table(*report.group(runs)).splitlines()
            if line.startswith("| CIFAR100")}
    assert set(rows) == {"e4m3", "mxfp8e4m3", "W8A8G8E8M8Acc8 small_block=FC"}
    assert "32.00 ± 1.41 (2)" in rows["e4m3"] and "29.00 ± 1.41 (2)" in rows["e4m3"]
    assert "29.00 (1) |" in rows["mxfp8e4m3"] and "[paper 29.59" not in rows["mxfp8e4m3"]
    assert "27.00 (1) [paper 27.23 ± 0.17]" in rows["mxfp8e4m3"]  # the FP run fills every row's FP cells


def test_data_is_fetched_once_before_any_run_starts(fake_cifar_env, tmp_path):
    """Runs side by side would all download into one folder: the runner
    reads the data first, and stops with one line when it cannot."""
    result = reproduce("run.py", "--data_path", tmp_path / "empty", "--out", tmp_path / "paper", "--gpus", "0,1",
                       "--datasets", "CIFAR100", "--seeds", 1, env=fake_cifar_env)
    assert result.returncode == 2
    assert result.stderr.startswith("error: CIFAR100 files in ") and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "paper").exists()


def test_plot_shows_sgd_and_swa_apart_within_0_to_100_percent():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def curve(sgd, swa):
        run = fake_run(8, 1, sgd[-1], swa[-1])[1]
        run["epochs"] = [{"epoch": epoch, "test_accuracy": 100 - sgd_error,
                          "swa_test_accuracy": None if swa_error is None else 100 - swa_error}
                         for epoch, (sgd_error, swa_error) in enumerate(zip(sgd, swa), 1)]
        return [run]

    by_label = {"8-bit": curve([99.9, 60.0, 40.0], [None, 40.0, 39.0]),
                "fp": curve([99.0, 50.0, 0.2], [None, 0.2, 0.1])}
    figure = report.error_figure(by_label, "CIFAR100 VGG16", plt)
    axes = figure.axes[0]
    assert axes.get_ylim() == (0.0, 100.0)  # clamped: the margins would leave 0..100 %
    lines = {tuple(line.get_label().split()[:2]): line for line in axes.lines}
    for label in ("8-bit", "fp"):
        sgd, swa = lines[("SGD", label)], lines[("SWA", label)]
        assert sgd.get_color() == swa.get_color() and sgd.get_linestyle() != swa.get_linestyle()
        assert sgd.get_zorder() > swa.get_zorder() and swa.get_alpha() < 1  # SGD drawn over a see-through SWA
        assert swa.get_linewidth() > sgd.get_linewidth()  # and SWA still shows on both sides of it
    assert lines[("SGD", "8-bit")].get_color() != lines[("SGD", "fp")].get_color()
    plt.close(figure)
    assert report.error_limits([20.0, 30.0]) == (19.5, 30.5)


def test_results_that_are_not_a_record_are_listed_not_a_crash(tmp_path):
    bad = tmp_path / "paper" / "CIFAR10-VGG16-fp" / "seed1"
    bad.mkdir(parents=True)
    (bad / "results.json").write_text("[]")
    assert runner.Job("x", str(bad), "CIFAR10").status() == "partial"
    result = reproduce("report.py", tmp_path / "paper")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert f"Left out, unreadable: {bad / 'results.json'} is not a run's record (no config)." in result.stdout
    dry = reproduce("run.py", "--data_path", "data", "--out", tmp_path / "paper", "--seeds", 1, "--dry-run")
    assert dry.returncode == 0 and "Traceback" not in dry.stderr, dry.stderr


def test_the_report_names_each_run_it_leaves_out_and_why():
    config = {"dataset": "CIFAR10", "model": "VGG16", "epochs": 4, "seed": 1, "batch_size": 128, "lr_init": 0.05,
              "swa_start": 2, "swa_lr": 0.01, "wd": 5e-4}
    runs = [("a/results.json", {"status": "running", "config": config, "epochs": [{}, {}, {}]})]
    lines = report.table(*report.group(runs)).splitlines()
    assert any(line.startswith("Left out, not finished: 1 run(s)") and "a/results.json (running, 3 of 4 epochs)"
               in line for line in lines), lines


def test_a_run_whose_runner_was_killed_is_busy_not_failed(tmp_path):
    """A kill -9 of the runner leaves its train.py training: the next runner
    skips that run, naming the process, and does not count it as failed."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys\nhandle = open(sys.argv[1], 'a+')\n"
                               "fcntl.flock(handle, fcntl.LOCK_EX)\nhandle.write(f'process {os.getpid()} on box')\n"
                               "handle.flush()\nprint('locked', flush=True)\nsys.stdin.read()",
         str(run_dir / ".train.lock")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        job = runner.Job("CIFAR10-VGG16-fp seed 1", str(run_dir), "CIFAR10", ["false"])
        lines = []
        assert runner.run_jobs([job], None, report=lines.append) == []
        assert lines[-1] == f"busy (process {holder.pid} on box): CIFAR10-VGG16-fp seed 1"
    finally:
        holder.kill()
        holder.wait()
    assert runner.training_owner(str(run_dir)) is None  # the lock died with its process
