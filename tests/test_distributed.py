"""Data parallelism: torchrun with 2 gloo processes on the CPU."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, TensorDataset

import models
import utils
from runs import EIGHT_BIT, ROOT, assert_same_run, table_rows
from swalp.run import distributed

DDP_RUN = ["--dataset", "CIFAR10", "--model", "PreResNet20", "--epochs", 3, "--swa_start", 2, "--save_freq", 1,
           "--batch_size", 8, "--num_workers", 0, *EIGHT_BIT, "--wl-acc", 12]


def torchrun(env, *args, processes=2):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               os.path.join(ROOT, "train.py"), *map(str, args)]
    return subprocess.run(command, cwd=ROOT, env=dict(env, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def ddp_run(fake_cifar_env, cifar_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ddp") / "run"
    result = torchrun(fake_cifar_env, *DDP_RUN, "--data_path", cifar_root, "--dir", run_dir, "--save_every_steps", 2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir, result


def test_two_processes_train_with_replicas_that_never_drift(ddp_run):
    run_dir, result = ddp_run
    # Rank 0 alone prints: one table.
    assert [int(row[0]) for row in table_rows(result.stdout)] == [1, 2, 3]
    assert result.stdout.count("SWA Error") == 1
    checkpoint = torch.load(run_dir / "checkpoint-3.pt", weights_only=True)
    # Every checkpoint (every 2 steps and every epoch) compared the replicas' bits; the run
    # would have stopped on a difference.
    assert checkpoint["world_size"] == 2 and len(checkpoint["rng"]) == 2
    assert len(set(checkpoint["replica_digests"])) == 1
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "finished" and results["swa_n"] == 2
    # 20 test images, split across ranks without padding: each counted once.
    assert all(record["test_samples"] == 20 for record in results["epochs"])


def test_exact_resume_under_torchrun(ddp_run, fake_cifar_env, cifar_root, tmp_path):
    reference, _ = ddp_run
    run_dir = tmp_path / "resumed"
    result = torchrun(fake_cifar_env, *DDP_RUN, "--data_path", cifar_root, "--dir", run_dir,
                      "--resume", reference / "checkpoint-1.pt")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_run(reference, run_dir, epochs=3)


def test_a_checkpoint_of_two_processes_continues_in_one(ddp_run, train_fast, tmp_path):
    reference, _ = ddp_run
    result = train_fast(*DDP_RUN, "--data_path", train_fast.data_path, "--dir", tmp_path / "single",
                       "--resume", reference / "checkpoint-2.pt")
    assert result.returncode == 0, result.stderr
    assert [int(row[0]) for row in table_rows(result.stdout)] == [3]
    assert json.loads((tmp_path / "single" / "results.json").read_text())["swa_n"] == 2


def _worker(rank, size, init_file, inputs, state, queue):
    torch.set_num_threads(1)  # two ranks on two cores
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=size)
    world = distributed.World(rank, size)
    torch.manual_seed(0)
    model = models.build_model("PreResNet20", num_classes=10)
    model.load_state_dict(state)
    dataset = TensorDataset(inputs, torch.arange(len(inputs)) % 10)
    loader = DataLoader(dataset, batch_size=5, sampler=distributed.ShardSampler(len(dataset), world))
    distributed.update_bn(loader, model, torch.device("cpu"), world)
    metrics = utils.evaluate(loader, model, torch.device("cpu"), world=world)
    # Plain lists: shared tensors would not outlive this process.
    queue.put((rank, {k: v.tolist() for k, v in model.state_dict().items() if "running" in k}, metrics))
    torch.distributed.destroy_process_group()


def test_bn_statistics_and_evaluation_cover_the_whole_data_set_across_ranks(tmp_path):
    torch.manual_seed(1)
    inputs = torch.randn(23, 3, 32, 32) * 2 + 0.5  # 23 samples: uneven shards
    state = models.build_model("PreResNet20", num_classes=10).state_dict()
    # Forked: a spawned process would spend seconds importing torch again.
    context = mp.get_context("fork")
    queue = context.Queue()
    processes = [context.Process(target=_worker, args=(rank, 2, tmp_path / "init", inputs, state, queue))
                 for rank in range(2)]
    for process in processes:
        process.start()
    results = {}
    for _ in processes:
        rank, stats, metrics = queue.get(timeout=300)
        results[rank] = ({key: torch.tensor(value) for key, value in stats.items()}, metrics)
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0

    single = models.build_model("PreResNet20", num_classes=10)
    single.load_state_dict(state)
    # One process passing the batches both ranks formed (rank 0: samples 0, 2, 4, ...).
    shards = [list(range(rank, 23, 2)) for rank in range(2)]
    batches = [shard[start:start + 5] for shard in shards for start in range(0, len(shard), 5)]
    loader = DataLoader(TensorDataset(inputs, torch.arange(23) % 10), batch_sampler=batches)
    distributed.update_bn(loader, single, torch.device("cpu"), distributed.World())
    expected_metrics = utils.evaluate(loader, single, torch.device("cpu"))
    for rank in range(2):
        stats, metrics = results[rank]
        for key, value in stats.items():
            torch.testing.assert_close(value, single.state_dict()[key], rtol=1e-4, atol=1e-5)
        assert metrics["seen"] == 23
        assert metrics["accuracy"] == expected_metrics["accuracy"]
        assert metrics["loss"] == pytest.approx(expected_metrics["loss"], rel=1e-4)
    assert all(torch.equal(results[0][0][key], results[1][0][key]) for key in results[0][0])
    # The first BN layer's statistics are those of the stem convolution's output over all 23 samples.
    with torch.no_grad():
        stem = single.conv1(inputs).transpose(0, 1).reshape(16, -1).double()
    torch.testing.assert_close(results[0][0]["layer1.0.bn1.running_mean"], stem.mean(1).float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(results[0][0]["layer1.0.bn1.running_var"], stem.var(1).float(), rtol=1e-4, atol=1e-5)


def test_qtorch_backend_under_torchrun_keeps_the_optimizer_rounding_shared(fake_cifar_env, cifar_root, tmp_path):
    run_dir = tmp_path / "qtorch"
    result = torchrun(fake_cifar_env, *DDP_RUN, "--epochs", 2, "--swa_start", 1, "--quant-backend", "qtorch",
                      "--data_path", cifar_root, "--dir", run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the optimizer's rounding uses the torch backend" in result.stdout
    assert len(set(torch.load(run_dir / "checkpoint-2.pt", weights_only=True)["replica_digests"])) == 1


def test_replica_drift_is_detected(cifar_in_process, tmp_path, monkeypatch):
    import train

    args = train.parse_args(["--data_path", str(cifar_in_process), "--model", "PreResNet20", "--epochs", "1",
                             "--swa_start", "1", "--num_workers", "0", "--dir", str(tmp_path)])
    training = train.build(args, torch.device("cpu"), str(tmp_path))
    digest = training.state.replica_digest()
    weight = next(training.state.net.parameters()).data
    weight.view(-1).view(torch.int32)[0] ^= 1  # one bit of one weight
    assert training.state.replica_digest() != digest
    # Pretend to be rank 0 of two whose partner reports another digest.
    training.state.world = distributed.World(0, 2, 0)
    monkeypatch.setattr(distributed, "sum_across", lambda world, values, device: list(values))
    monkeypatch.setattr(distributed, "gather_objects", lambda world, value: [value, value + 1])
    with pytest.raises(RuntimeError, match="replicas have drifted apart"):
        training.state.state_dict()
