import pytest
import torch
from torch.optim.swa_utils import AveragedModel, update_bn
from torch.utils.data import DataLoader, TensorDataset

import lowp
import models
import swa
import swalp
from swalp.quant import quantizer


@pytest.mark.parametrize("epoch, expected", [
    (0, 0.05), (100, 0.05),                      # t <= 0.5: lr_init
    (101, 0.05 * (1 - 0.99 * 0.005 / 0.4)),      # the linear decay starts
    (140, 0.05 * (1 - 0.99 * 0.5)),              # half way down
    (180, 0.0005), (199, 0.0005),                # floor: 1% of lr_init
    (200, 0.01), (299, 0.01),                    # from swa_start on: swa_lr
])
def test_schedule_at_chosen_epochs(epoch, expected):
    assert swa.schedule(epoch, lr_init=0.05, swa_start=200, swa_lr=0.01) == pytest.approx(expected, rel=1e-12)


def test_schedule_switches_to_swa_lr_exactly_at_swa_start():
    rates = [swa.schedule(e, lr_init=0.1, swa_start=3, swa_lr=0.02) for e in range(5)]
    assert rates[:2] == [0.1, 0.1]                                       # t = 0, 1/3
    assert rates[2] == pytest.approx(0.1 * (1 - 0.99 * (2 / 3 - 0.5) / 0.4))  # t = 2/3
    assert rates[3:] == [0.02, 0.02]


@pytest.mark.parametrize("swa_c_epochs, collected", [(1, [2, 3, 4, 5]), (2, [2, 4]), (3, [2, 5])])
def test_collection_epochs(swa_c_epochs, collected):
    # swa_start 3: the first average is taken after the third epoch (0-based 2).
    assert [e for e in range(6) if swa.is_collection_epoch(e, 3, swa_c_epochs)] == collected


def lp_preresnet(seed=0):
    torch.manual_seed(seed)
    net = models.build_model("PreResNet20", num_classes=10)
    swa_model = AveragedModel(net)
    noise = swalp.StepNoise(seed)
    q = quantizer.build_quantizers(lowp.word_lengths(weight=8, activate=8, grad=8, error=8, momentum=8), "stochastic",
                                   noise=noise)
    lowp.insert_quantizers(net, q["activate"], q["error"], "layer")
    return net, swa_model, lowp.make_optimizer(net, q, 0.05, 0.9, 5e-4, noise)


def test_swa_weights_are_the_mean_of_the_collected_low_precision_weights():
    net, swa_model, optimizer = lp_preresnet()
    collected = []
    for step in range(4):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(torch.randn(8, 3, 32, 32)), torch.randint(0, 10, (8,))).backward()
        optimizer.step()
        swa_model.update_parameters(net)
        collected.append([p.detach().clone() for p in net.parameters()])
    assert int(swa_model.n_averaged) == 4
    for index, averaged in enumerate(swa_model.module.parameters()):
        mean = torch.stack([weights[index] for weights in collected]).double().mean(0)
        torch.testing.assert_close(averaged.double(), mean, rtol=1e-6, atol=1e-7)
    assert not any(isinstance(m, quantizer.Quantizer) for m in swa_model.modules())


def test_bn_statistics_of_the_swa_model_are_recomputed_over_the_data():
    torch.manual_seed(0)
    net = models.build_model("PreResNet20", num_classes=10)
    swa_model = AveragedModel(net)
    swa_model.update_parameters(net)
    inputs = torch.randn(24, 3, 32, 32) * 2 + 1
    loader = DataLoader(TensorDataset(inputs, torch.zeros(24, dtype=torch.long)), batch_size=8)
    first_bn = swa_model.module.layer1[0].bn1
    assert torch.equal(first_bn.running_mean, torch.zeros(16))
    update_bn(loader, swa_model)
    with torch.no_grad():
        expected = swa_model.module.conv1(inputs).mean(dim=(0, 2, 3))
    torch.testing.assert_close(first_bn.running_mean, expected, rtol=1e-4, atol=1e-5)
    assert int(first_bn.num_batches_tracked) == 3


def test_constant_swa_rate_switches_at_the_first_step_of_swa_start():
    schedule = swa.SWASchedule(lr_init=0.1, swa_start=3, swa_lr=0.02, steps_per_epoch=10)
    assert schedule.lr(29) == swa.schedule(2, 0.1, 3, 0.02)
    assert [schedule.lr(step) for step in (30, 35, 99)] == [0.02] * 3
    assert not any(schedule.changes_within_epochs(step) for step in range(100))


def test_cyclic_rate_falls_from_lr_max_to_swa_lr_within_each_cycle():
    schedule = swa.SWASchedule(lr_init=0.1, swa_start=3, swa_lr=0.001, steps_per_epoch=10, cyclic=True,
                               lr_max=0.05, cycle_steps=4)
    first = 0.75 * 0.05 + 0.25 * 0.001
    assert schedule.lr(29) == swa.schedule(2, 0.1, 3, 0.001)   # still the decay phase
    assert schedule.lr(30) == pytest.approx(first)               # the first iteration of the first cycle
    assert schedule.lr(31) == pytest.approx(0.5 * 0.05 + 0.5 * 0.001)
    assert schedule.lr(33) == pytest.approx(0.001)               # a cycle's last iteration: swa_lr
    assert schedule.lr(34) == pytest.approx(first)               # the next cycle starts again high
    assert schedule.lr(41) == pytest.approx(0.001)
    assert not schedule.changes_within_epochs(29) and schedule.changes_within_epochs(30)


def test_cyclic_defaults_one_cycle_per_epoch_from_lr_init():
    schedule = swa.SWASchedule(lr_init=0.1, swa_start=1, swa_lr=0.01, steps_per_epoch=5, cyclic=True)
    assert schedule.cycle_steps == 5 and schedule.lr_max == 0.1
    assert [round(schedule.lr(step), 6) for step in range(5, 10)] == [0.082, 0.064, 0.046, 0.028, 0.01]


@pytest.mark.parametrize("options, collected", [
    ({}, [30, 40, 50]),                                    # after each epoch from swa_start's on
    ({"c_epochs": 2}, [30, 50]),
    ({"c_steps": 5}, [35, 40, 45, 50]),                    # every 5 iterations of the SWA phase
    ({"cyclic": True, "cycle_steps": 4}, [34, 38, 42, 46, 50]),  # at each cycle's end
    ({"cyclic": True, "cycle_steps": 4, "c_steps": 8}, [38, 46]),
])
def test_collection_steps(options, collected):
    schedule = swa.SWASchedule(lr_init=0.1, swa_start=3, swa_lr=0.01, steps_per_epoch=10, **options)
    assert [step for step in range(1, 51) if schedule.collects_after(step)] == collected


def test_models_collected_within_an_epoch_are_averaged(cifar_in_process, tmp_path):
    import train

    args = train.parse_args([
        "--data_path", str(cifar_in_process), "--model", "PreResNet20", "--epochs", "2", "--swa_start", "1",
        "--swa_c_steps", "1", "--batch_size", "16", "--num_workers", "0", "--dir", str(tmp_path)])
    training = train.build(args, torch.device("cpu"), str(tmp_path))
    training.open_logs(resumed=False)
    collected = []
    original = training.state.swa_model.update_parameters

    def record(net):
        collected.append([p.detach().clone() for p in net.parameters()])
        original(net)

    training.state.swa_model.update_parameters = record
    for _ in range(2):
        assert train.train_epoch(training, stop=False)
        train.finish_epoch(training)
    training.close_logs()
    steps = training.steps_per_epoch
    assert [record["collected_at_steps"] for record in training.state.history] == [
        [], list(range(steps + 1, 2 * steps + 1))]
    assert int(training.state.swa_model.n_averaged) == len(collected) == steps
    for index, averaged in enumerate(training.state.swa_model.module.parameters()):
        mean = torch.stack([weights[index] for weights in collected]).double().mean(0)
        torch.testing.assert_close(averaged.double(), mean, rtol=1e-6, atol=1e-7)
