"""End-to-end runs with the cyclical SWA learning rate and averaging within epochs."""

import json
import signal

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from runs import EIGHT_BIT, SMALL, assert_same_run, start_train, table_rows, wait_for

# 40 training images in batches of 16: 3 steps per epoch. The SWA phase starts
# at step 3; cycles of 5 steps end at steps 8 and 13, across epoch boundaries.
CYCLIC_RUN = ["--dataset", "CIFAR10", "--model", "PreResNet20", "--epochs", 5, "--swa_start", 1,
              "--swa_schedule", "cyclic", "--swa_lr_max", 0.05, "--swa_lr", 0.005, "--swa_cycle_steps", 5,
              "--save_freq", 1, *EIGHT_BIT, *SMALL]


@pytest.fixture(scope="module")
def cyclic_run(train_fast, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cyclic") / "run"
    result = train_fast(*CYCLIC_RUN, "--data_path", train_fast.data_path, "--dir", run_dir)
    assert result.returncode == 0, result.stderr
    return run_dir, result


def test_cyclic_run_collects_at_each_cycle_end(cyclic_run):
    run_dir, result = cyclic_run
    results = json.loads((run_dir / "results.json").read_text())
    assert [record["collected_at_steps"] for record in results["epochs"]] == [[], [], [8], [], [13]]
    assert [record["swa_n"] for record in results["epochs"]] == [0, 0, 1, 1, 2]
    assert results["swa_n"] == 2 and results["swa_error"] is not None
    assert "averaged after steps 8" in result.stdout and "averaged after steps 13" in result.stdout
    assert [int(row[-1]) for row in table_rows(result.stdout)] == [0, 0, 1, 1, 2]

    steps = EventAccumulator(str(run_dir / "steps"))
    steps.Reload()
    rates = {event.step: event.value for event in steps.Scalars("lr/iteration")}
    assert sorted(rates) == list(range(4, 16))  # every iteration of the SWA phase (1-based steps)
    assert rates[8] == pytest.approx(0.005) and rates[13] == pytest.approx(0.005)
    assert rates[4] == pytest.approx(0.8 * 0.05 + 0.2 * 0.005) == rates[9]
    assert [event.step for event in steps.Scalars("swa/collected")] == [8, 13]


def test_a_run_resumed_mid_cycle_continues_the_cycle(train_fast, fake_cifar_env, cyclic_run, tmp_path):
    reference, _ = cyclic_run
    run_dir = tmp_path / "stopped"
    args = [*CYCLIC_RUN, "--data_path", train_fast.data_path, "--dir", run_dir]
    process = start_train(fake_cifar_env, *args, "--save_every_steps", 1)
    wait_for(run_dir / "checkpoint-1-step1.pt", process)  # step 4, the first of the cycle ending at 8
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    saved = stdout.strip().splitlines()[-1].split("--resume ")[-1].strip("'")

    result = train_fast(*args, "--resume", saved)
    assert result.returncode == 0, result.stderr
    assert_same_run(reference, run_dir, epochs=5)
    results = json.loads((run_dir / "results.json").read_text())
    assert [record["collected_at_steps"] for record in results["epochs"]] == [[], [], [8], [], [13]]
