import pytest
import torch
from torch.optim.swa_utils import AveragedModel, update_bn
from torch.utils.data import DataLoader, TensorDataset

import models
import quantization
import swa


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
    lengths = dict.fromkeys(quantization.NUMBER_KINDS, 8)
    lengths["acc"] = -1
    noise = quantization.StepNoise(seed)
    q = quantization.build_quantizers(lengths, "stochastic", noise=noise)
    quantization.insert_quantizers(net, q["activate"], q["error"], "layer")
    return net, swa_model, quantization.make_optimizer(net, q, 0.05, 0.9, 5e-4, noise)


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
    assert not any(isinstance(m, quantization.Quantizer) for m in swa_model.modules())


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
