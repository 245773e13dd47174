"""Number formats: specs, layouts, and each format against a reference."""

import copy
import dataclasses
import math
import pickle

import pytest
import torch

from swalp.quant import backends, formats, kinds, quantizer, specs
from swalp.quant import torch_kernels as tq
from swalp.quant.specs import FormatError

TORCH = backends.TORCH_BACKEND


def bits(x):
    return x.contiguous().view(torch.int32)


def assert_bit_identical(actual, expected):
    assert actual.shape == expected.shape
    assert torch.equal(bits(actual), bits(expected)), (actual, expected)


def assert_same_numbers(actual, expected):
    """Bit-identical but for the payload and sign of NaNs."""
    assert torch.equal(actual.isnan(), expected.isnan())
    numbers = ~actual.isnan()
    assert_bit_identical(actual[numbers], expected[numbers])


@pytest.mark.parametrize("spec, canonical", [
    ("fp32", "fp32"), ("BFP8", "bfp8"), ("bfp8/32", "bfp8/32"), ("fixed8.6", "fixed8.6"), ("e4m3", "e4m3"),
    ("E5M2", "e5m2"), ("e3m4", "e3m4"), ("bf16", "e8m7"), ("FP16", "e5m10"), ("fp8e4m3", "fp8e4m3"),
    ("fp8e5m2", "fp8e5m2"), ("mxfp8", "mxfp8e4m3"), ("MXFP8E4M3", "mxfp8e4m3"), ("mxfp8e5m2", "mxfp8e5m2"),
    ("mxfp6e2m3", "mxfp6e2m3"), ("mxfp6e3m2", "mxfp6e3m2"), ("mxfp4", "mxfp4e2m1"), ("mxint8", "mxint8"),
    ("MXFP8-CEIL", "mxfp8e4m3-ceil"), ("mxint8-ceil", "mxint8-ceil"), ("mxfp4-ceil", "mxfp4e2m1-ceil"),
    ("NVFP4", "nvfp4")])
def test_every_spec_of_the_grammar_has_one_canonical_spelling(spec, canonical):
    assert specs.canonical(spec) == canonical
    number_format = specs.parse(spec)
    assert (number_format is None) == (spec == "fp32")
    if number_format is not None:
        assert number_format.spec == canonical and specs.parse(canonical) == number_format
    assert "/" not in specs.path_tag(spec)


def test_specs_build_the_formats_they_name():
    assert specs.parse("bfp8/32") == formats.BlockFormat(8, block_size=32)
    assert specs.parse("fixed8.6") == formats.FixedFormat(8, 6)
    assert specs.parse("bf16") == formats.FloatFormat(8, 7) and specs.parse("fp16") == formats.FloatFormat(5, 10)
    largest = {spec: specs.parse(spec).element.largest for spec in
               ("fp8e4m3", "fp8e5m2", "mxfp6e2m3", "mxfp6e3m2", "mxfp4", "mxint8")}
    # The OCP tables: largest normal (2 - 2^-man) 2^emax, E4M3 losing its top mantissa to NaN.
    assert largest == {"fp8e4m3": 448.0, "fp8e5m2": 57344.0, "mxfp6e2m3": 7.5, "mxfp6e3m2": 28.0, "mxfp4": 6.0,
                       "mxint8": 127 / 64}


@pytest.mark.parametrize("spec, complaint", [
    ("bfp1", "block word length must be in [2, 22]"), ("bfp8/0", "positive size"), ("e9m2", "exp in [2, 8]"),
    ("e4m23", "man in [0, 22]"), ("fixed40.4", "word length must be in [2, 32]"), ("mxfp6e4m3", "not a number format"),
    ("fp8", "not a number format"), ("bfp8/", "not a number format"), ("int8", "not a number format"),
    ("e4m3-ceil", "not a number format")])
def test_bad_specs_say_what_is_wrong_in_one_line(spec, complaint):
    with pytest.raises(FormatError) as error:
        specs.parse(spec)
    assert complaint in str(error.value) and "\n" not in str(error.value) and spec in str(error.value)


def test_row_blocks_cut_rows_into_padded_blocks_and_put_them_back():
    x = torch.arange(2 * 3 * 5 * 7, dtype=torch.float32).reshape(2, 3, 5, 7)
    blocks, restore = formats.row_blocks(x, 32)
    assert blocks.shape == (8, 32)  # a row of 105 is 4 blocks, the last padded with 23 zeros
    assert torch.equal(blocks[3, :9], x[0].flatten()[96:]) and not blocks[3, 9:].any()
    assert torch.equal(restore(blocks), x)
    vector, restore_vector = formats.row_blocks(torch.ones(40), 16)  # a 1-D tensor is one row
    assert vector.shape == (3, 16) and torch.equal(restore_vector(vector), torch.ones(40))


def hard_inputs():
    """Every scale from subnormal to 1e36, zeros, ties and exact powers of two."""
    torch.manual_seed(0)
    x = torch.randn(24, 40) * torch.logspace(-38, 36, 24).view(24, 1)
    x[3] = 0
    x[5, :7] = torch.tensor([1e-41, -3e-44, 1.0625, -1.0625, 1.1875, 2.0 ** -10, 0.0])
    x[6] = 2.0 ** torch.randint(-20, 20, (40,)).float()
    return torch.cat([x.flatten(), torch.tensor([float("inf"), -float("inf"), float("nan")])])


@pytest.mark.parametrize("spec", ["e4m3", "e5m2", "bf16", "fp16", "e3m4", "fixed8.6", "fixed16.8", "bfp8/32"])
def test_fixed_float_and_blocked_formats_are_bit_identical_to_qtorch(spec):
    pytest.importorskip("qtorch.quant")
    qtorch_backend = backends.load_qtorch_backend()
    number_format = specs.parse(spec)
    x = hard_inputs()
    if spec.startswith("fixed"):
        x = x * 1e-36
    if spec.startswith("bfp"):
        x = x[:-3].reshape(24, 40)  # blocks with inf or NaN are checked in test_torch_quant
    assert_bit_identical(number_format.quantize(x, "nearest", TORCH),
                         number_format.quantize(x, "nearest", qtorch_backend))


def test_a_block_size_gives_each_run_of_k_elements_of_a_row_its_own_exponent():
    torch.manual_seed(0)
    x = torch.randn(3, 70) * torch.logspace(-3, 3, 70)
    out = formats.BlockFormat(6, block_size=32).quantize(x, "nearest", TORCH)
    for start in (0, 32, 64):
        piece = x[:, start:start + 32]
        assert torch.equal(out[:, start:start + 32], tq.block_quantize(piece, 6, 0, "nearest"))
    assert not torch.equal(out, tq.block_quantize(x, 6, 0, "nearest"))


def mx_cases():
    """Rows of 64 at scales from 2^-100 to 2^100 (normal enough that the
    scale is an exponent of the block's maximum), zeros, ties, saturation."""
    torch.manual_seed(1)
    x = torch.randn(40, 64) * (2.0 ** torch.linspace(-100, 100, 40)).view(40, 1)
    x[0] = 0
    x[1, :32] = torch.linspace(-10, 10, 32)   # values between the element grid points
    x[2, :4] = torch.tensor([7.9, 3.0, 2.5, 0.75])  # 7.9 saturates in E4M3's [448, 512) x scale
    return x


@pytest.mark.parametrize("spec, dtype_name", [("mxfp8e4m3", "float8_e4m3fn"), ("mxfp8e5m2", "float8_e5m2"),
                                              ("mxfp6e2m3", "DTYPE_FP6_E2M3"), ("mxfp6e3m2", "DTYPE_FP6_E3M2"),
                                              ("mxfp4", "float4_e2m1fn_x2")])
@pytest.mark.parametrize("scale", ["floor", "ceil"])
def test_mx_nearest_equals_torchao(spec, dtype_name, scale):
    mx = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")
    constants = pytest.importorskip("torchao.prototype.mx_formats.constants")
    dtype = getattr(torch, dtype_name, None) or getattr(constants, dtype_name)
    x = mx_cases()
    # torchao's FLOOR is the spec's scale, its RCEIL the smallest scale that saturates nothing.
    mode = mx.ScaleCalculationMode.FLOOR if scale == "floor" else mx.ScaleCalculationMode.RCEIL
    scales, data = mx.to_mx(x, dtype, 32, mode)
    expected = mx.to_dtype(data, scales, dtype, 32, torch.float32)
    number_format = specs.parse(spec + ("-ceil" if scale == "ceil" else ""))
    assert_bit_identical(number_format.quantize(x, "nearest", TORCH), expected)


def test_the_floor_scale_saturates_a_blocks_largest_values_and_the_ceil_scale_does_not():
    x = torch.linspace(0.25, 7.9, 32)  # the maximum, 7.9, has scale 2^(2 - 8) and lies above 448 x 2^-6 = 7
    floor, ceil = (specs.parse(spec).quantize(x, "nearest", TORCH) for spec in ("mxfp8", "mxfp8-ceil"))
    assert floor.max() == 7 and ceil.max() == 8  # ceil: scale 2^-5, 7.9 rounds to 256 x 2^-5
    assert (floor[x < 6.5] == specs.parse("fp8e4m3").quantize(x[x < 6.5], "nearest", TORCH)).all()


def mx_reference(x, element, rounding_up=None):
    """MX from the spec in float64, one block of 32 at a time: scale
    2^(floor(log2 max) - emax), element rounded on its own grid (ties to
    even), clamped to the largest element."""
    out = []
    for block in x.double().reshape(-1, 32):
        peak = block.abs().max().item()
        exponent = max(math.floor(math.log2(peak)) - element.emax, -127) if peak else -127
        scaled = block / 2.0 ** exponent
        floor_exponent = torch.floor(torch.log2(scaled.abs())).clamp(min=element.min_exponent)
        step = 2.0 ** (floor_exponent - element.man)
        rounded = torch.round(scaled / step) * step
        out.append(rounded.clamp(-element.largest, element.largest) * 2.0 ** exponent)
    return torch.stack(out).reshape(x.shape).float()


def test_mxint8_nearest_equals_a_reference_written_from_the_spec():
    # torchao has no MXINT8; INT8 elements are multiples of 2^-6, here symmetric in [-127/64, 127/64].
    x = mx_cases()
    x[3, 0] = 1.0  # the block's scale is 2^0 ...
    x[3, 1:32] = torch.arange(31) / 64 + 1 / 128  # ... and these lie halfway between multiples of 2^-6
    ours = specs.parse("mxint8").quantize(x, "nearest", TORCH)
    assert_bit_identical(ours, mx_reference(x, formats.ELEMENTS["int8"]))
    assert torch.equal(ours[3, 1:32] * 64, (torch.arange(31) + 0.5).round())  # ties to even
    blocks = x.reshape(-1, 32)[2:]  # (the first two blocks are zeros)
    scaled = ours.reshape(-1, 32)[2:] / 2.0 ** torch.floor(torch.log2(blocks.abs().amax(1, keepdim=True)))
    assert torch.equal(scaled * 64, (scaled * 64).round()) and scaled.abs().max() <= 127 / 64


def test_mx_blocks_with_inf_or_nan_become_nan_and_others_are_untouched():
    x = torch.randn(4, 64)
    x[0, 3], x[1, 40] = float("inf"), float("nan")
    out = specs.parse("mxfp8").quantize(x, "nearest", TORCH)
    assert out[0, :32].isnan().all() and out[1, 32:].isnan().all()
    assert not out[0, 32:].isnan().any() and not out[1, :32].isnan().any() and not out[2:].isnan().any()


def test_ocp_fp8_equals_torch_float8_casts():
    x = torch.cat([hard_inputs(), torch.tensor([449.0, 464.0, 470.0, 500.0, 1e6, -1e6, 2.0 ** -10, 3 * 2.0 ** -10])])
    e4m3 = specs.parse("fp8e4m3").quantize(x, "nearest", TORCH)
    # torch's E4M3 cast saturates like ours, inf included; NaN stays NaN.
    assert_same_numbers(e4m3, x.to(torch.float8_e4m3fn).float())
    e5m2 = specs.parse("fp8e5m2").quantize(x, "nearest", TORCH)
    cast = x.to(torch.float8_e5m2).float()
    within = x.abs() < 61440  # halfway from 57344 to 65536: beyond it torch's cast gives inf, ours saturates
    assert_same_numbers(e5m2[within | x.isnan()], cast[within | x.isnan()])
    assert (e5m2[~within & ~x.isnan()].abs() == 57344).all() and cast[~within & ~x.isnan()].isinf().all()


def test_qtorch_e4m3_and_e5m2_agree_with_torch_float8_casts_except_for_ties_and_range():
    x = hard_inputs()
    for spec, ocp, dtype in (("e4m3", "fp8e4m3", torch.float8_e4m3fn), ("e5m2", "fp8e5m2", torch.float8_e5m2)):
        ours, theirs = specs.parse(spec).quantize(x, "nearest", TORCH), x.to(dtype).float()
        ties = torch.tensor([1.0625, -1.0625, 1.3125, 2.0 ** -10]) if spec == "e4m3" else torch.tensor([1.125, -1.625])
        away = specs.parse(spec).quantize(ties, "nearest", TORCH)
        even = specs.parse(ocp).quantize(ties, "nearest", TORCH)
        assert (away.abs() > even.abs()).all()  # qtorch: ties away from zero; OCP: ties to even
        largest = specs.parse(ocp).element.largest
        ordinary = (x.abs() < largest) & ~torch.isin(x, ties)
        assert torch.equal(ours[ordinary], theirs[ordinary])  # equal values: qtorch flushes -tiny to +0
    # qtorch reserves no code for NaN or inf: its E4M3 reaches 480 and E5M2 114688.
    big = torch.tensor([1e9])
    assert specs.parse("e4m3").quantize(big, "nearest", TORCH).item() == 480
    assert specs.parse("e5m2").quantize(big, "nearest", TORCH).item() == 114688
    assert specs.parse("fp8e4m3").quantize(big, "nearest", TORCH).item() == 448


def element_grid(element):
    """Every non-negative value of an element format, built from its fields."""
    values = {m * 2.0 ** (element.min_exponent - element.man) for m in range(2 ** element.man)}
    for exponent in range(element.min_exponent, element.emax + 1):
        values |= {(1 + m / 2 ** element.man) * 2.0 ** exponent for m in range(2 ** element.man)}
    return sorted(v for v in values if v <= element.largest)


@pytest.mark.parametrize("spec", ["fp8e4m3", "fp8e5m2", "mxfp8e4m3", "mxfp6e3m2", "mxfp4", "mxint8"])
def test_ocp_stochastic_rounding_is_unbiased_between_the_two_neighbours(spec):
    number_format = specs.parse(spec)
    element = number_format.element
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(32, generator=generator) * element.largest * 0.9 - element.largest * 0.45
    x[0] = 1.5 * 2.0 ** element.emax  # the block's maximum: its scale is 2^0 (no saturation region)
    grid = torch.tensor(element_grid(element), dtype=torch.float64)
    grid = torch.cat([-grid.flip(0), grid])
    upper = torch.searchsorted(grid, x.double(), right=True).clamp(max=len(grid) - 1)
    low, high = grid[upper - 1], grid[upper]
    low, high = torch.where(grid[upper - 1] == x, x.double(), low), torch.where(grid[upper - 1] == x, x.double(), high)
    draws = 4000
    out = number_format.quantize(x.repeat(draws, 1), "stochastic", TORCH, generator).double()
    assert ((out == low) | (out == high)).all()
    p_up = (x.double() - low) / (high - low).clamp(min=1e-300)
    observed = (out == high).double().mean(0)
    interior = high > low
    bound = 6 * (p_up * (1 - p_up) / draws).sqrt() + 1e-9
    assert ((observed - p_up).abs() <= bound)[interior].all()
    mean_error = (out.mean(0) - x.double())[interior] / (high - low)[interior]
    assert (mean_error.abs() < 6 * 0.5 / draws ** 0.5).all()


def test_mx_stochastic_rounding_uses_the_block_scale_and_follows_the_generator():
    x = torch.randn(4, 32) * 1000
    out = specs.parse("mxfp4").quantize(x, "stochastic", TORCH, torch.Generator().manual_seed(3))
    again = specs.parse("mxfp4").quantize(x, "stochastic", TORCH, torch.Generator().manual_seed(3))
    assert torch.equal(out, again)
    scale = 2.0 ** (torch.floor(torch.log2(x.abs().amax(1, keepdim=True))) - 2)
    grid = torch.tensor(element_grid(formats.ELEMENTS["e2m1"]))
    assert torch.isin((out / scale).abs(), grid).all()


def test_backends_say_which_formats_they_compute():
    lean = backends.Backend("lean", tq.block_quantize, tq.fixed_point_quantize, tq.float_quantize, seedable=True)
    full_precision = dict.fromkeys(kinds.NUMBER_KINDS)
    for spec in ("bfp8", "bfp8/16", "fixed8.6", "e4m3"):
        assert lean.supports(specs.parse(spec)) and TORCH.supports(specs.parse(spec))
    for spec in ("fp8e4m3", "mxfp8", "mxint8"):
        assert TORCH.supports(specs.parse(spec)) and not lean.supports(specs.parse(spec))
        with pytest.raises(backends.UnsupportedFormat, match=f"the lean backend cannot compute {spec}"):
            quantizer.build_quantizers({**full_precision, "weight": specs.parse(spec)}, "nearest", backend=lean)
    kinds_given = {**full_precision, "weight": specs.parse("mxfp8"), "grad": formats.BlockFormat(8)}
    quantizers = quantizer.build_quantizers(kinds_given, "nearest",
                                               backend=lean, fallback=TORCH)
    assert quantizers["weight"].backend is TORCH and quantizers["grad"].backend is lean


def test_ocp_kernels_reject_what_float32_cannot_simulate():
    x = torch.randn(4, 32)
    for bad in (dict(man=0, min_exponent=-6), dict(man=23, min_exponent=-6), dict(man=3, min_exponent=-125)):
        with pytest.raises(ValueError):
            tq.minifloat_quantize(x, largest=448.0, rounding="nearest", **bad)
    with pytest.raises(ValueError):
        tq.mx_quantize(x.view(4, 2, 16), 3, -6, 8, 448.0, "nearest")
    with pytest.raises(ValueError):
        tq.mx_quantize(x, 3, -6, 8, 448.0, "nearest", scale="round")
    with pytest.raises(ValueError):
        formats.MXFormat(formats.ELEMENTS["e4m3"], scale="round")


@pytest.mark.parametrize("shape, spread", [((8, 64), 3), ((32, 128), 6), ((4, 16), 0), ((64, 48), 3), ((3, 5, 32), 2)])
def test_nvfp4_nearest_equals_torchao(shape, spread):
    nvfp4 = pytest.importorskip("torchao.prototype.mx_formats.nvfp4_tensor")
    torch.manual_seed(0)
    x = torch.randn(*shape) * torch.logspace(-spread, spread, shape[0]).view(-1, *[1] * (len(shape) - 1))
    ours = specs.parse("nvfp4").quantize(x, "nearest", TORCH)
    rows = x.reshape(shape[0], -1)  # torchao: a 2-D tensor, blocks along its last dimension
    scale = nvfp4.per_tensor_amax_to_scale(rows.abs().amax())
    theirs = nvfp4.NVFP4Tensor.to_nvfp4(rows, per_tensor_scale=scale).dequantize(torch.float32).view(shape)
    assert_bit_identical(ours, theirs)


def test_nvfp4_elements_and_scales_are_on_their_grids():
    torch.manual_seed(1)
    x = torch.randn(6, 40) * 3
    out = specs.parse("nvfp4").quantize(x, "nearest", TORCH)
    tensor_scale = x.abs().amax() / (448 * 6)
    blocks, _ = formats.row_blocks(x, 16)
    block_scale = ((blocks.abs().amax(1, keepdim=True) / 6) / tensor_scale).clamp(2 ** -6, 448)
    block_scale = block_scale.to(torch.float8_e4m3fn).float()
    elements = formats.row_blocks(out, 16)[0] / (tensor_scale * block_scale)  # exact to a few ulps
    grid = torch.tensor(element_grid(formats.ELEMENTS["e2m1"]))
    assert ((elements.abs().unsqueeze(-1) - grid).abs().amin(-1) < 1e-5).all()


def test_nvfp4_stochastic_rounding_is_unbiased_between_the_two_neighbours():
    """Block 0 holds the tensor's peak, 2688 = 448 x 6, so the tensor's factor
    is 1; block 1's peak is 6, so its E4M3 factor is 1 too and its elements
    are its values rounded on the E2M1 grid."""
    generator = torch.Generator().manual_seed(0)
    row = torch.zeros(32)
    row[0] = 2688.0
    row[16] = 6.0
    row[17:] = torch.rand(15, generator=generator) * 10.8 - 5.4
    draws = 4000
    out = specs.parse("nvfp4").quantize(row.repeat(draws, 1), "stochastic", TORCH, generator)[:, 17:].double()
    x = row[17:].double()
    grid = torch.tensor(element_grid(formats.ELEMENTS["e2m1"]), dtype=torch.float64)
    grid = torch.cat([-grid.flip(0), grid])
    upper = torch.searchsorted(grid, x, right=True).clamp(max=len(grid) - 1)
    low, high = grid[upper - 1], grid[upper]
    assert ((out == low) | (out == high)).all()
    p_up = (x - low) / (high - low)
    observed = (out == high).double().mean(0)
    assert ((observed - p_up).abs() <= 6 * (p_up * (1 - p_up) / draws).sqrt() + 1e-9).all()


def test_nvfp4_keeps_zeros_and_turns_a_tensor_with_inf_or_nan_into_nan():
    nvfp4 = specs.parse("nvfp4")
    assert torch.equal(nvfp4.quantize(torch.zeros(3, 16), "nearest", TORCH), torch.zeros(3, 16))
    for special in (float("inf"), float("nan")):
        x = torch.randn(3, 16)
        x[1, 2] = special
        assert nvfp4.quantize(x, "nearest", TORCH).isnan().all()


def test_only_the_torch_backend_computes_nvfp4():
    lean = backends.Backend("lean", tq.block_quantize, tq.fixed_point_quantize, tq.float_quantize, seedable=True)
    assert TORCH.supports(specs.parse("nvfp4")) and not lean.supports(specs.parse("nvfp4"))


@pytest.mark.parametrize("spec", ["bfp8", "fixed8.6", "e4m3", "fp8e5m2", "mxfp8", "nvfp4"])
def test_every_format_made_is_found_by_its_key_copies_and_unpickled_ones_too(spec):
    """The compiled backend's batch operator takes its format by key."""
    parsed = specs.parse(spec)
    made = [parsed, copy.copy(parsed), copy.deepcopy(parsed), pickle.loads(pickle.dumps(parsed))]
    if isinstance(parsed, formats.BlockFormat):
        made.append(dataclasses.replace(parsed, small_block="FC"))
        assert formats.key(made[-1]) != formats.key(parsed)
    for number_format in made:
        assert formats.made(formats.key(number_format)) == number_format
    assert made[1:4] == [parsed] * 3
    with pytest.raises(ValueError):
        formats.FixedFormat(99, 2)  # refused: checked before it is registered


@dataclasses.dataclass(frozen=True)
class OwnBlockFormat(formats.BlockFormat):
    """A format class of one's own, as a user would derive it."""


def test_a_format_of_ones_own_class_keeps_its_class_and_key_when_copied_or_unpickled():
    own = OwnBlockFormat(8)
    for copied in (copy.copy(own), copy.deepcopy(own), pickle.loads(pickle.dumps(own))):
        assert type(copied) is OwnBlockFormat and formats.key(copied) == formats.key(own)
    assert formats.key(own) != formats.key(formats.BlockFormat(8))
    assert formats.made(formats.key(own)) == own
