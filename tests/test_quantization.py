import pytest
import torch
import torch.nn as nn

import lowp
import models
import swalp
from grid import on_block_grid
from swalp.quant import backends, kinds, quantizer, torch_kernels
from swalp.quant.formats import BlockFormat, FixedFormat, FloatFormat
from swalp.quant.quantizer import Quantizer, TensorQuantizer


@pytest.fixture(scope="module", params=["torch", "qtorch"])
def backend(request):
    if request.param == "torch":
        return backends.TORCH_BACKEND
    return backends.load_qtorch_backend()


def quantizers(backend, rounding="stochastic", **word_lengths):
    noise = swalp.StepNoise(seed=0)
    return quantizer.build_quantizers(lowp.word_lengths(**word_lengths), rounding, backend=backend, noise=noise), noise


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def take_steps(net, optimizer, steps=3):
    torch.manual_seed(0)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(torch.randn(6, 3, 8, 8)), torch.randint(0, 5, (6,))).backward()
        optimizer.step()


def test_optimizer_step_puts_weights_gradients_and_momentum_on_their_grids(backend):
    net = SmallNet()
    q, noise = quantizers(backend, weight=8, grad=6, momentum=5)
    optimizer = lowp.make_optimizer(net, q, lr=0.1, momentum=0.9, weight_decay=5e-4, noise=noise)
    take_steps(net, optimizer)
    for param in net.parameters():
        assert on_block_grid(param.data, 8)
        assert on_block_grid(param.grad, 6)
        assert on_block_grid(optimizer.optim.state[param]["momentum_buffer"], 5)
        # 5 bits is coarser than 8: the buffers are not merely on the weight grid by accident.
        assert not on_block_grid(param.data, 5) or param.numel() < 8


def test_accumulator_is_kept_on_its_own_grid(backend):
    net = SmallNet()
    q, noise = quantizers(backend, weight=4, acc=12)
    optimizer = lowp.make_optimizer(net, q, lr=0.1, momentum=0.9, weight_decay=0.0, noise=noise)
    take_steps(net, optimizer)
    for param in net.parameters():
        accumulator = optimizer.weight_acc[param]
        assert on_block_grid(accumulator, 12) and on_block_grid(param.data, 4)
        assert not torch.equal(accumulator, param.data)


def test_full_precision_optimizer_equals_plain_sgd():
    torch.manual_seed(1)
    net, reference = SmallNet(), SmallNet()
    reference.load_state_dict(net.state_dict())
    optimizer = lowp.make_optimizer(net, dict.fromkeys(kinds.NUMBER_KINDS), 0.1, 0.9, 1e-4,
                                            swalp.StepNoise(seed=0))
    sgd = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    take_steps(net, optimizer)
    take_steps(reference, sgd)
    for ours, theirs in zip(net.parameters(), reference.parameters()):
        assert torch.equal(ours, theirs)


def test_quantizer_rounds_activations_forward_and_errors_backward(backend):
    forward = TensorQuantizer(BlockFormat(8), "stochastic", backend)
    backward = TensorQuantizer(BlockFormat(4), "stochastic", backend)
    x = torch.randn(8, 3, 5, 5, requires_grad=True)
    y = Quantizer(forward, backward)(x)
    assert on_block_grid(y.detach(), 8) and not torch.equal(y.detach(), x.detach())
    y.backward(torch.randn_like(y))
    assert on_block_grid(x.grad, 4)
    assert not on_block_grid(x.grad, 3)


def test_error_only_quantizer_passes_activations_through(backend):
    backward = TensorQuantizer(BlockFormat(4), "nearest", backend)
    x = torch.randn(4, 10, requires_grad=True)
    y = torch.relu_(Quantizer(None, backward)(x))  # in place after the quantizer is allowed
    assert torch.equal(y.detach(), x.detach().clamp(min=0))
    y.sum().backward()
    assert on_block_grid(x.grad, 4)


def test_nearest_rounding_is_round_half_up_on_the_block_grid(backend):
    torch.manual_seed(0)
    x = torch.randn(16, 50) * torch.logspace(-3, 3, 16).unsqueeze(1)
    quantized = BlockFormat(8).quantize(x, "nearest", backend)
    step = 2.0 ** (torch.floor(torch.log2(x.abs().amax(1, keepdim=True))) - 8 + 2)
    expected = (torch.floor(x / step + 0.5) * step).clamp(-127 * step, 127 * step)
    assert torch.equal(quantized, expected)


def test_stochastic_rounding_is_unbiased_between_the_two_neighbours(backend):
    x = torch.full((1, 40000), 0.3)
    x[0, 0] = 1.0  # block exponent 0, so the 8-bit step is 2^-6
    step = 2.0 ** -6
    quantized = BlockFormat(8).quantize(x, "stochastic", backend)[0, 1:]
    assert set((quantized / step).unique().tolist()) == {19.0, 20.0}
    # 0.3 = 19.2 steps: rounds up with probability 0.2; 6 standard errors.
    assert abs(quantized.mean().item() - 0.3) < 6 * step * 0.4 / (40000 ** 0.5)


def test_default_layout_blocks_each_index_of_dim_zero(backend):
    x = torch.tensor([[1000.0, 3.0], [0.001, 0.0007]])
    quantized = BlockFormat(8).quantize(x, "nearest", backend)
    assert quantized[1].abs().min() > 0  # the small row keeps its own exponent
    bias = torch.tensor([1000.0, 0.001])
    assert BlockFormat(8).quantize(bias, "nearest", backend)[1] > 0  # 1-D: one block per element


def test_small_block_shares_one_exponent_for_small_tensors(backend):
    bias = torch.tensor([1000.0, 0.001])
    assert BlockFormat(8, small_block="FC").quantize(bias, "nearest", backend)[1] == 0
    matrix = torch.tensor([[1000.0, 3.0], [0.001, 0.0007]])
    assert torch.equal(BlockFormat(8, small_block="FC").quantize(matrix, "nearest", backend),
                       BlockFormat(8).quantize(matrix, "nearest", backend))
    shared = BlockFormat(8, small_block="Conv").quantize(matrix, "nearest", backend)
    assert on_block_grid(shared, 8, rows=shared.reshape(1, -1))
    assert shared[1].abs().max() == 0


def test_block_dim_bc_gives_each_channel_of_each_sample_its_exponent(backend):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 6, 6) * torch.tensor([1.0, 1e-3, 1e3]).view(1, 3, 1, 1)
    per_channel = BlockFormat(8, block_dim="BC").quantize(x, "nearest", backend)
    assert on_block_grid(per_channel, 8, rows=per_channel.reshape(12, -1))
    assert per_channel[:, 1].abs().min() > 0
    per_sample = BlockFormat(8, block_dim="B").quantize(x, "nearest", backend)
    assert per_sample[:, 1].abs().max() == 0  # flushed by the 1e3 channel's exponent


@pytest.mark.parametrize("bad", [dict(wl=1), dict(wl=23), dict(wl=8, small_block="All"),
                                 dict(wl=8, block_dim="C"), dict(wl=8, dim=1, block_dim="BC")])
def test_block_format_rejects_what_it_cannot_simulate(bad):
    with pytest.raises(ValueError):
        BlockFormat(**bad)


def test_in_place_output_rounding_matches_the_copying_one():
    torch.manual_seed(0)
    nets = [models.build_model("PreResNet20", num_classes=10) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    forward = TensorQuantizer(BlockFormat(6), "nearest")
    backward = TensorQuantizer(BlockFormat(5), "nearest")
    lowp.insert_quantizers(nets[0], forward, backward, "layer")
    for site in nets[1].quantizer_sites("layer"):  # the same sites, copying
        site.add_module("quantizer", Quantizer(forward, backward, inplace=False))
        site.register_forward_hook(quantizer._quantize_output)
    assert all(site.quantizer.inplace for site in nets[0].quantizer_sites("layer"))
    inputs = torch.randn(4, 3, 32, 32)
    outputs = [net(inputs) for net in nets]
    assert torch.equal(outputs[0], outputs[1])
    for output in outputs:
        output.square().sum().backward()
    for ours, theirs in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.equal(ours.grad, theirs.grad)


def test_fixed_and_floating_point_formats_round_through_either_backend(backend):
    x = torch.randn(64, 8) * 3
    fixed = TensorQuantizer(FixedFormat(8, 4), "nearest", backend)(x)
    assert torch.equal(fixed, torch_kernels.fixed_point_quantize(x, 8, 4, rounding="nearest"))
    floating = TensorQuantizer(FloatFormat(5, 2), "nearest", backend)(x)
    assert torch.equal(floating, torch_kernels.float_quantize(x, 5, 2, "nearest"))
    # As an activation/error quantizer, with both formats at once.
    y = Quantizer(TensorQuantizer(FixedFormat(8, 4), "nearest", backend),
                  TensorQuantizer(FloatFormat(5, 2), "nearest", backend))(x.requires_grad_())
    y.backward(torch.ones_like(y) / 3)
    assert torch.equal(y.detach(), fixed) and torch.equal(x.grad, torch_kernels.float_quantize(x.grad, 5, 2, "nearest"))


@pytest.mark.parametrize("make", [lambda: FixedFormat(1, 0), lambda: FixedFormat(40, 4),
                                  lambda: FloatFormat(9, 2), lambda: FloatFormat(5, 23)])
def test_fixed_and_floating_point_formats_reject_what_they_cannot_simulate(make):
    with pytest.raises(ValueError):
        make()
