"""benchmarks/compiled.py's second run: a process of its own, asked by
--first-step-of for its first compiled step, whose answer lands in the
compiled rows. The VGG16 steps are stubbed (compiling one takes minutes);
what is checked is the command each side builds and reads."""

import subprocess
import sys

import torch

from benchmarks import compiled


def test_a_compiled_row_carries_the_first_step_of_a_second_run(monkeypatch, capsys):
    started, in_second_run = [], []

    def started_step(spec, is_compiled, device, batch_size):
        started.append((spec, is_compiled, device.type, batch_size))
        return (lambda: None), 3.5 if in_second_run else 40.0

    def second_run(command, **options):
        assert command[:4] == [sys.executable, "-m", "benchmarks.compiled", "--first-step-of"], command
        capsys.readouterr()
        in_second_run.append(True)
        compiled.main(command[3:])
        in_second_run.clear()
        return subprocess.CompletedProcess(command, 0, stdout=capsys.readouterr().out)

    monkeypatch.setattr(compiled, "started_step", started_step)
    monkeypatch.setattr(compiled, "median_seconds", lambda step, device, steps: 1.25)
    monkeypatch.setattr(compiled.subprocess, "run", second_run)
    row = compiled.step_row("bfp8", True, torch.device("cpu"), 16, steps=3)
    assert row == {"precision": "bfp8", "mode": "compiled", "seconds_per_step": 1.25, "first_step_seconds": 40.0,
                   "second_run_first_step_seconds": 3.5}
    assert started == [("bfp8", True, "cpu", 16)] * 2  # the second run: the same spec, device and batch, compiled
    assert compiled.step_row(None, True, torch.device("cpu"), 16, steps=3)["second_run_first_step_seconds"] == 3.5
    assert started[-1] == (None, True, "cpu", 16)  # full precision, as "fp32" on the command line
    assert "second_run_first_step_seconds" not in compiled.step_row(None, False, torch.device("cpu"), 16, steps=3)
    assert started[-1] == (None, False, "cpu", 16)
