import pytest
import torch
import torch.nn as nn

import lowp
import models
from swalp.quant import kinds, quantizer


def identity_quantizers():
    """Quantizers that leave values alone but count their calls."""
    calls = {"forward": 0, "backward": 0}

    def forward(x, inplace=False, identity=0, stream=0):
        calls["forward"] += 1
        return x.clone()

    def backward(x, identity=0, stream=0):
        calls["backward"] += 1
        return x

    return forward, backward, calls


@pytest.mark.parametrize("name, params", [("VGG16", 15245130), ("VGG16BN", 15253578),
                                          ("VGG19", 20554826), ("PreResNet20", 272282)])
def test_models_build_and_run(name, params):
    net = models.build_model(name, num_classes=10)
    assert sum(p.numel() for p in net.parameters()) == params
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_preresnet164_has_164_weighted_layers_in_bottlenecks():
    net = models.build_model("PreResNet164", num_classes=100)
    shortcuts = {block.downsample[0] for block in net.blocks() if block.downsample is not None}
    main_path = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and m not in shortcuts]
    assert len(main_path) == 164
    assert len(net.blocks()) == 54 and all(isinstance(block, type(net.blocks()[0])) for block in net.blocks())
    assert type(net.blocks()[0]).__name__ == "Bottleneck" and net.fc.out_features == 100


def test_vgg_layer_placement_follows_every_conv_and_linear_but_the_last():
    net = models.build_model("VGG16", num_classes=10)
    forward, backward, calls = identity_quantizers()
    assert lowp.insert_quantizers(net, forward, backward, "layer") == 15
    convs = [m for m in net.features if isinstance(m, nn.Conv2d)]
    linears = [m for m in net.classifier if isinstance(m, nn.Linear)]
    assert all(hasattr(m, "quantizer") for m in convs + linears[:2])
    assert not hasattr(linears[2], "quantizer")
    assert not any(hasattr(m, "quantizer") for m in net.modules() if isinstance(m, (nn.ReLU, nn.BatchNorm2d)))
    net(torch.randn(2, 3, 32, 32, requires_grad=True)).sum().backward()
    assert calls == {"forward": 15, "backward": 15}


def test_vgg_relu_placement_follows_every_relu():
    net = models.build_model("VGG16BN", num_classes=10)
    forward, backward, calls = identity_quantizers()
    assert lowp.insert_quantizers(net, forward, None, "relu") == 15
    assert all(hasattr(m, "quantizer") for m in net.modules() if isinstance(m, nn.ReLU))
    net(torch.randn(2, 3, 32, 32))
    assert calls["forward"] == 15


def test_preresnet_relu_placement_quantizes_before_and_after_each_block_conv():
    net = models.build_model("PreResNet20", num_classes=10)
    forward, backward, calls = identity_quantizers()
    lowp.insert_quantizers(net, forward, None, "relu")
    net(torch.randn(2, 3, 32, 32))
    # Stem conv, then per basic block 2 ReLUs and 2 convs; 9 blocks.
    assert calls["forward"] == 1 + 9 * 4
    assert not hasattr(net.fc, "quantizer") and not hasattr(net.relu, "quantizer")


def test_preresnet_layer_placement_spares_the_classifier():
    net = models.build_model("PreResNet20", num_classes=10)
    forward, backward, calls = identity_quantizers()
    assert lowp.insert_quantizers(net, forward, backward, "layer") == 21  # 19 convs + 2 shortcuts
    net(torch.randn(2, 3, 32, 32))
    assert calls["forward"] == 21 and not hasattr(net.fc, "quantizer")


def test_full_precision_inserts_no_quantizer():
    net = models.build_model("VGG16", num_classes=10)
    quantizers = quantizer.build_quantizers(dict.fromkeys(kinds.NUMBER_KINDS), "stochastic")
    assert quantizers == dict.fromkeys(kinds.NUMBER_KINDS)
    assert lowp.insert_quantizers(net, quantizers["activate"], quantizers["error"], "layer") == 0
    assert not any(isinstance(m, quantizer.Quantizer) for m in net.modules())


def test_quantizers_leave_state_dict_keys_unchanged():
    net = models.build_model("VGG16BN", num_classes=10)
    keys = list(net.state_dict())
    forward, backward, _ = identity_quantizers()
    lowp.insert_quantizers(net, forward, backward, "layer")
    assert list(net.state_dict()) == keys
