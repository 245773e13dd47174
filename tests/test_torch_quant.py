"""Our tensor-operation kernels against qtorch's compiled CPU kernels."""

import pytest
import torch

import swalp
from swalp.quant import torch_kernels as tq

qtorch_quant = pytest.importorskip("qtorch.quant")


def bits(x):
    return x.contiguous().view(torch.int32)


def assert_bit_identical(actual, expected):
    assert actual.shape == expected.shape
    assert torch.equal(bits(actual), bits(expected)), (actual, expected)


def hard_inputs():
    """Blocks of every scale, zeros, all-zero blocks, subnormals and values up
    to 8e37, as a 4-D tensor."""
    torch.manual_seed(0)
    x = torch.randn(48, 6, 5, 7) * torch.logspace(-38, 36, 48).view(48, 1, 1, 1)
    x[3] = 0                                    # an all-zero block
    x[5, :, 2] = 0                              # zeros inside a block
    x[7] = torch.randn(6, 5, 7) * 1e-41         # a block of subnormals
    x[8, 0, 0, 0] = 1e-45                       # the smallest subnormal
    x[9, 1, 1, 1] = 8e37                   # just below 2^126, where rebasing overflows
    x[10] = 2.0 ** torch.randint(-20, 20, (6, 5, 7)).float()  # exact powers of two
    return x


@pytest.mark.parametrize("wl", [2, 3, 4, 8, 12, 16, 22])
@pytest.mark.parametrize("dim", [-1, 0, 1, 2, 3])
def test_block_nearest_is_bit_identical(wl, dim):
    x = hard_inputs()
    expected = qtorch_quant.block_quantize(x, wl, dim, "nearest")
    assert_bit_identical(tq.block_quantize(x, wl, dim, "nearest"), expected)
    in_place = x.clone()
    assert tq.block_quantize(in_place, wl, dim, "nearest", inplace=True) is in_place
    assert_bit_identical(in_place, expected)


@pytest.mark.parametrize("view", [lambda x: x.transpose(0, 3), lambda x: x[:, ::2, 1:], lambda x: x.flatten()[::3],
                                  lambda x: x[:, 0, 0, :].t()])
def test_block_nearest_is_bit_identical_on_views_and_1d(view):
    x = view(hard_inputs())
    for dim in (-1, 0):
        assert_bit_identical(tq.block_quantize(x, 8, dim, "nearest"), qtorch_quant.block_quantize(x, 8, dim, "nearest"))


@pytest.mark.parametrize("wl, fl", [(8, 4), (4, 2), (16, 8), (8, 12), (32, 16), (8, -2)])
@pytest.mark.parametrize("clamp", [True, False])
@pytest.mark.parametrize("symmetric", [True, False])
def test_fixed_point_nearest_is_bit_identical(wl, fl, clamp, symmetric):
    x = hard_inputs()[:, :2] * 1e-36  # brings a wide range into fixed point's reach
    x = torch.cat([x.flatten(), torch.randn(1000) * 10, torch.arange(-20, 20) / 2 ** (fl + 1)])
    assert_bit_identical(tq.fixed_point_quantize(x, wl, fl, clamp, symmetric, "nearest"),
                         qtorch_quant.fixed_point_quantize(x, wl, fl, clamp, symmetric, "nearest"))


def test_fixed_point_stochastic_matches_qtorch_draw_for_draw():
    # qtorch's fixed-point kernel draws torch.rand_like, so with the same
    # seed both consume the same uniforms.
    x = torch.randn(5000) * 4
    torch.manual_seed(3)
    expected = qtorch_quant.fixed_point_quantize(x, 8, 4, True, False, "stochastic")
    torch.manual_seed(3)
    assert_bit_identical(tq.fixed_point_quantize(x, 8, 4, True, False, "stochastic"), expected)


@pytest.mark.parametrize("exp, man", [(8, 7), (5, 2), (5, 10), (4, 3), (3, 1), (8, 22), (2, 0)])
def test_float_nearest_is_bit_identical(exp, man):
    x = torch.cat([hard_inputs().flatten(), torch.tensor([float("inf"), -float("inf"), 0.0, -0.0])])
    assert_bit_identical(tq.float_quantize(x, exp, man, "nearest"), qtorch_quant.float_quantize(x, exp, man, "nearest"))


def test_special_values_in_blocks_match_qtorch_bit_for_bit():
    x = torch.tensor([[1.0, float("inf"), 2.0], [1.0, float("nan"), 3.0], [2.0 ** 126, 1.0, -2.0],
                      [1.0, -2.0, 0.5], [-float("inf"), 0.0, 1.0], [1e-41, -3e-42, 0.0]])
    for dim in (0, 1, -1):
        assert_bit_identical(tq.block_quantize(x, 8, dim, "nearest"), qtorch_quant.block_quantize(x, 8, dim, "nearest"))
    out = tq.block_quantize(x, 8, 0, "nearest")
    # Blocks holding inf or NaN become NaN; at 2^126 rebasing overflows (qtorch's garbage,
    # reproduced); the other blocks are untouched by it.
    assert out[[0, 1, 4]].isnan().all()
    assert torch.equal(out[3], x[3])
    assert (out[2].abs() == out[2, 0].abs()).all()


def test_special_values_in_fixed_and_floating_point():
    fixed = tq.fixed_point_quantize(torch.tensor([float("nan"), float("inf"), -float("inf")]), 8, 4)
    assert fixed[0].isnan() and fixed[1] == 8 - 2 ** -4 and fixed[2] == -8
    unclamped = tq.fixed_point_quantize(torch.tensor([float("inf")]), 8, 4, clamp=False, rounding="nearest")
    assert unclamped[0] == float("inf")

    specials = torch.tensor([float("inf"), -float("inf"), float("nan")])
    floating = tq.float_quantize(specials, 5, 2, "nearest")
    largest = (2 - 2 ** -2) * 2.0 ** 16  # qtorch reserves no exponent for inf
    assert floating.abs().tolist() == [largest] * 3 and floating[1] < 0
    wide = tq.float_quantize(specials, 8, 2, "nearest")  # 8 exponent bits: inf and NaN survive
    assert wide[:2].tolist() == [float("inf"), -float("inf")] and wide[2].isnan()
    for exp, man in ((5, 2), (8, 2)):
        assert_bit_identical(tq.float_quantize(specials, exp, man, "nearest"),
                             qtorch_quant.float_quantize(specials, exp, man, "nearest"))


def test_ordinary_blocks_take_the_fast_path(monkeypatch):
    x = torch.randn(16, 50) * torch.logspace(-30, 30, 16).unsqueeze(1)
    expected = qtorch_quant.block_quantize(x, 8, 0, "nearest")

    def refuse(*args):
        raise AssertionError("the bit-level clip is only for subnormal and overflowing blocks")

    monkeypatch.setattr(tq, "_clip_exactly", refuse)
    assert_bit_identical(tq.block_quantize(x, 8, 0, "nearest"), expected)
    with pytest.raises(AssertionError):
        tq.block_quantize(torch.tensor([[1e-40, 2e-41]]), 8, 0, "nearest")
    with pytest.raises(AssertionError):
        tq.block_quantize(torch.tensor([[2.0 ** 126, 1.0]]), 8, 0, "nearest")


@pytest.mark.parametrize("inputs", ["hard", "ordinary"])
def test_block_rounding_without_reading_back_is_bit_identical(monkeypatch, inputs):
    # What a GPU runs: every block takes the bit-level clip, and nothing is read back.
    monkeypatch.setattr(tq, "_decide_on_host", lambda device: False)
    x = hard_inputs() if inputs == "hard" else torch.randn(16, 50) * torch.logspace(-30, 30, 16).unsqueeze(1)
    with torch.profiler.profile() as profile:
        results = {(wl, dim): tq.block_quantize(x, wl, dim, "nearest") for wl in (2, 8, 22) for dim in (-1, 0, 1)}
    assert not [event for event in profile.events() if event.name == "aten::_local_scalar_dense"]
    for (wl, dim), result in results.items():
        assert_bit_identical(result, qtorch_quant.block_quantize(x, wl, dim, "nearest"))


def test_kernels_reject_what_float32_cannot_simulate():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError):
        tq.block_quantize(x, 8, 2)
    with pytest.raises(ValueError):
        tq.fixed_point_quantize(x, 32, -100)
    with pytest.raises(ValueError):
        tq.float_quantize(x, 8, 23, "stochastic")


def block_neighbours(x, wl):
    """The two grid points around each value of 2-D x (one block per row):
    multiples of 2^(e - wl + 2) clipped to the block's largest magnitude."""
    exponent = torch.floor(torch.log2(x.abs().amax(1, keepdim=True)))
    step = 2.0 ** (exponent - wl + 2)
    largest = 2.0 ** (exponent + 1) - step
    low = torch.floor(x / step) * step
    return low.clamp(-largest, largest), (low + step).clamp(-largest, largest), step


@pytest.mark.parametrize("kernel", [tq.block_quantize, qtorch_quant.block_quantize], ids=["torch", "qtorch"])
def test_block_stochastic_lands_on_a_neighbour_and_rounds_up_with_the_right_probability(kernel):
    torch.manual_seed(0)
    x = torch.randn(4, 1000) * torch.tensor([[1e-3], [1.0], [7.0], [1e4]])
    low, high, step = block_neighbours(x, 8)
    draws = torch.stack([kernel(x, 8, 0, "stochastic") for _ in range(400)])
    assert ((draws == low) | (draws == high)).all()
    interior = high > low
    p_up = ((x - low) / step)[interior]
    observed = (draws == high).double().mean(0)[interior]
    # Each observed frequency is a mean of 400 Bernoulli draws: 6 standard errors.
    bound = 6 * (p_up * (1 - p_up) / 400).sqrt() + 1e-9
    assert ((observed - p_up).abs() <= bound).all()
    # Unbiased: the mean error over every draw, in steps, is 0 within 6 standard errors
    # (one rounding error is at most half a step from its mean).
    error = ((draws.double() - x) / step)[:, interior]
    assert error.mean().abs() < 6 * 0.5 / error.numel() ** 0.5


def test_float_and_fixed_stochastic_round_to_a_neighbour_either_way():
    torch.manual_seed(0)
    x = torch.randn(2000)
    spacing = 2.0 ** (torch.floor(torch.log2(x.abs())) - 3)  # 3 mantissa bits, normal range
    for kernel, low, step in (
            (lambda: tq.fixed_point_quantize(x, 8, 4, rounding="stochastic"), torch.floor(x * 16) / 16, 1 / 16),
            (lambda: tq.float_quantize(x, 8, 3, "stochastic"), torch.floor(x / spacing) * spacing, spacing)):
        draws = torch.stack([kernel() for _ in range(50)])
        high = low + step
        assert ((draws == low) | (draws == high)).all()
        off_grid = x != low
        assert (draws == low).any(0)[off_grid].float().mean() > 0.9
        assert (draws == high).any(0)[off_grid].float().mean() > 0.9


def test_stochastic_rounding_follows_the_generator():
    x = torch.randn(64, 100)
    def draw(seed):
        return tq.block_quantize(x, 6, 0, "stochastic", torch.Generator().manual_seed(seed))
    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))
    torch.manual_seed(5)
    first = tq.block_quantize(x, 6, 0, "stochastic")
    torch.manual_seed(5)
    assert torch.equal(tq.block_quantize(x, 6, 0, "stochastic"), first)


def test_step_noise_repeats_per_step_and_differs_between_steps():
    def draws(noise, steps):
        out = []
        for _ in range(steps):
            out.append(torch.randint(0, 1 << 20, (4,), generator=noise.generator(torch.device("cpu"))))
            noise.advance()
        return out

    a, b = draws(swalp.StepNoise(7), 3), draws(swalp.StepNoise(7), 3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], a[1])
    resumed = swalp.StepNoise(7)
    resumed.seek(2)
    assert torch.equal(draws(resumed, 1)[0], a[2])
    assert not torch.equal(draws(swalp.StepNoise(8), 1)[0], a[0])


def test_empty_tensors_and_wrong_dtypes():
    assert tq.block_quantize(torch.empty(0, 3), 8, 0).shape == (0, 3)
    with pytest.raises(TypeError):
        tq.block_quantize(torch.zeros(3, dtype=torch.float64), 8, 0)
