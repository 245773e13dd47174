"""qtorch's rounding kernels written with PyTorch tensor operations.

Same number formats and results as qtorch 0.3.0's kernels, with three
differences that matter here: no compiler is needed, the work is vectorised
(and runs on any device torch supports), and stochastic rounding draws its
noise from a torch generator, so a seeded run is repeatable.

The kernels reproduce qtorch's bit manipulations on the float32 encoding, so
nearest rounding is bit-identical to qtorch and stochastic rounding has the
same distribution: the value is rounded to `man` bits of mantissa after
adding uniform random bits below the last kept bit, then truncated.

The noise argument of every kernel (`generator`) is a torch generator (or
None: the device's default one), or a `noise.NoiseKey`: then each element's
random bits are the triton backend's counter-based draws (keyed
SplitMix64, `splitmix.random_bits`), the same bits at the same element index, computed
by traceable tensor operations, which is what the compiled backend uses.

Special values:
- block floating point: a block whose largest magnitude is inf or NaN
  becomes all NaN (its shared exponent is undefined); in a block whose
  largest magnitude is at least 2^126 the rebasing below overflows float32
  and, as in qtorch, every value becomes ±(the block's largest value) with
  the sign of the CPU's default NaN: garbage, reproduced bit for bit. Other
  blocks are unaffected;
- fixed point: NaN stays NaN, ±inf clamps to the range (or stays ±inf
  without clamping);
- floating point: ±inf and NaN become the largest finite value of the format
  (NaN with its sign bit), except with 8 exponent bits, where they stay inf
  and NaN and values that round past the largest float32 become inf, as in
  qtorch's kernel.
"""

import contextlib
import threading

import torch

from swalp.quant import splitmix
from swalp.quant.noise import NoiseKey

SIGN_BIT = -(1 << 31)  # 0x80000000 as an int32
EXPONENT_FIELD = 0xFF << 23
MANTISSA_BITS = 23
OVERFLOWING_EXPONENT = (127 + 126) << 23  # the biased field of 2^126: 6 * 2^126 is beyond float32


def _bits(x):
    return x.view(torch.int32)


def _float(bits):
    return bits.view(torch.float32)


RANDOM_BITS = 31  # an int32 `random_()` is uniform on [0, 2^31 - 1]
_buffers = {}


def _scratch(device, role, count):
    """A reused int32 buffer: a fresh 30 MB allocation per call costs the CPU
    as much as the rounding itself. Callers finish with it before the next call."""
    buffer = _buffers.get((device, role))
    if buffer is None or buffer.numel() < count:
        buffer = _buffers[(device, role)] = torch.empty(count, dtype=torch.int32, device=device)
    return buffer[:count]


def _add_random_bits(bits, mask, generator):
    """bits += uniform integers in [0, mask], in place (`bits` contiguous int32).

    Random number generation dominates stochastic rounding, so each 31-bit
    draw is cut into as many independent `mask`-wide fields as it holds
    (two for 8-bit block floating point) and each field feeds one element.
    """
    flat = bits.view(-1)
    if isinstance(generator, NoiseKey):  # one counter-based word per element, its low bits, as the triton kernels take
        flat += (_counter_bits(flat.numel(), bits.device, generator) & mask).to(torch.int32)
        return
    width = mask.bit_length()
    fields = max(1, RANDOM_BITS // width)
    draws = -(-flat.numel() // fields)
    raw = _scratch(bits.device, "raw", draws).random_(generator=generator)
    field = _scratch(bits.device, "field", draws)
    for index in range(fields):
        target = flat[index * draws:(index + 1) * draws]
        count = target.numel()
        torch.bitwise_right_shift(raw[:count], index * width, out=field[:count])
        target += field[:count].bitwise_and_(mask)


def _counter_bits(count, device, key):
    """The counter-based noise (int64 holding 32 bits) of the `count`
    elements of a contiguous tensor: element i draws at index key.offset + i
    (the key's words, where a batch drew them)."""
    if key.words is not None:
        assert key.words.numel() == count, "a batch's words must be those its tensors draw (formats.draws)"
        return key.words
    offsets = torch.arange(key.offset, key.offset + count, dtype=torch.int64, device=device)
    return splitmix.random_bits(offsets, key.seed, key.identity, key.step, key.domain)


def _uniform(x, generator):
    """A float32 uniform on [0, 1) per element of x (24 random bits, as torch.rand draws)."""
    if isinstance(generator, NoiseKey):
        bits = (_counter_bits(x.numel(), x.device, generator) >> 8) & 0xFFFFFF
        return (bits.to(torch.float32) * 2.0 ** -24).view(x.shape)
    return torch.rand(x.shape, device=x.device, generator=generator)


_TRACING = threading.local()


@contextlib.contextmanager
def traceable():
    """Within it, the kernels take the paths they take under torch.compile
    (out of place, no decision read back from the device), as they must in
    an operator that the compiler expands; their bits are the same."""
    before = getattr(_TRACING, "on", False)
    _TRACING.on = True
    try:
        yield
    finally:
        _TRACING.on = before


def _traceable():
    return torch.compiler.is_compiling() or getattr(_TRACING, "on", False)


def _round_mantissa(bits, man, rounding, generator):
    """qtorch's round_bitwise: keep `man` mantissa bits, rounding half up in
    the last kept bit (nearest) or after adding uniform random lower bits
    (stochastic). Modifies and returns `bits` (contiguous int32)."""
    mask = (1 << (MANTISSA_BITS - man)) - 1
    if _traceable() and (rounding == "nearest" or isinstance(generator, NoiseKey)):
        # Out of place: Inductor fuses it all the same, and in-place updates of
        # a dtype view before a copy into a graph input trip its CPU code
        # generator (torch 2.14: KeyError in outer-loop fusion).
        if rounding == "nearest":
            return (bits + (1 << (MANTISSA_BITS - man - 1))) & ~mask
        noise = (_counter_bits(bits.numel(), bits.device, generator) & mask).to(torch.int32)
        return (bits + noise.view(bits.shape)) & ~mask
    if rounding == "nearest":
        bits += 1 << (MANTISSA_BITS - man - 1)
    else:
        _add_random_bits(bits, mask, generator)
    return bits.bitwise_and_(~mask)


def _largest_mantissa(man):
    """The mantissa field with its top `man` bits set."""
    drop = MANTISSA_BITS - man
    return ((1 << MANTISSA_BITS) - 1) >> drop << drop


def _check(x, rounding):
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32:
        raise TypeError("quantization needs a float32 tensor")
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")


def block_max(x, dim):
    """Largest magnitude per block, broadcastable to x: the whole tensor for
    dim -1, else one block per index of `dim` (so each element of a 1-D
    tensor is its own block)."""
    if not -1 <= dim < max(x.dim(), 1):
        raise ValueError(f"block dim must be -1 or in [0, {x.dim() - 1}], got {dim}")
    if dim == -1:
        return torch.maximum(x.amax(), -x.amin())
    if x.dim() <= 1:
        return x.abs()
    others = [d for d in range(x.dim()) if d != dim % x.dim()]
    # Two reductions allocate nothing of x's size, unlike abs().amax().
    return torch.maximum(x.amax(dim=others, keepdim=True), -x.amin(dim=others, keepdim=True))


def block_quantize(x, wl, dim=-1, rounding="stochastic", generator=None, inplace=False):
    """Block floating point with `wl` bits (sign included) per number; blocks
    share the exponent of their largest magnitude. dim -1: one block; else
    one block per index of `dim`. With `inplace` (and x contiguous) the
    result is written into x, which saves an allocation of x's size."""
    _check(x, rounding)
    if x.numel() == 0:
        return x if inplace else x.clone()
    peak = block_max(x, dim)
    max_exponent = _bits(peak) & EXPONENT_FIELD
    # Adding 6 * 2^e moves every value of the block to exponent e + 2, where
    # `wl` mantissa bits leave steps of 2^(e - wl + 2).
    base = _float(max_exponent) * 6
    rebased = x.add_(base) if inplace and x.is_contiguous() else (x + base).contiguous()
    bits = _bits(rebased)
    rounded = _round_mantissa(bits, wl, rounding, generator)
    if rounded is not bits:  # compiled: out of place
        rebased = _float(rounded)
    largest = _float(max_exponent | _largest_mantissa(wl - 2))
    if not _decide_on_host(x.device) or bool((((max_exponent == 0) & (peak != 0))
                                             | (max_exponent >= OVERFLOWING_EXPONENT)).any()):
        clipped = _clip_exactly(rebased - base, max_exponent, largest)
        return rebased.copy_(clipped) if rebased is x else clipped
    # qtorch clips whatever rounded past the block's exponent to the largest
    # magnitude with wl - 2 fraction bits. In a block with a normal exponent
    # nothing on the grid lies between that magnitude and 2^(e+1), so the clip
    # is a clamp around the base, done before removing it.
    return rebased.clamp_(base - largest, base + largest).sub_(base)


def _decide_on_host(device):
    """Whether to read back if some block needs the bit-level clip, and clamp
    when none does. Reading a flag costs a CPU tensor nothing, but stalls a
    GPU's launch queue until the kernels before it finish, and under
    torch.compile it would break the graph; there every block takes the
    bit-level clip, which equals the clamp where a clamp would do."""
    return device.type == "cpu" and not _traceable()


def _clip_exactly(quantized, max_exponent, largest):
    """qtorch's clip on the bits; needed where a block's largest magnitude is
    subnormal (values above `largest` but below 2^-126 are kept) or where
    rebasing overflowed."""
    bits = _bits(quantized)
    overflow = (bits & EXPONENT_FIELD) > max_exponent
    return _float(torch.where(overflow, (bits & SIGN_BIT) | _bits(largest), bits))


def fixed_point_quantize(x, wl, fl, clamp=True, symmetric=False, rounding="stochastic", generator=None):
    """Fixed point with `wl` bits of which `fl` are fractional: a multiple of
    2^-fl in [-2^(wl-fl-1), 2^(wl-fl-1) - 2^-fl] (symmetric: the lowest value
    is dropped). Without clamp, only the precision is simulated."""
    _check(x, rounding)
    if wl - fl > 128 or fl > 126:
        raise ValueError(f"fixed point range and step must be normal float32 numbers "
                         f"(wl - fl <= 128, fl <= 126), got wl {wl}, fl {fl}")
    # Powers of two as Python numbers (exact in float32 here): an exponent
    # tensor would be copied to a GPU, and waited for, at every call.
    scaled = x * 2.0 ** fl
    # qtorch computes nearbyint((float)(a + r) - 0.5) with a double 0.5 and
    # r = 0.5 for nearest, r uniform in [0, 1) for stochastic.
    offset = 0.5 if rounding == "nearest" else _uniform(x, generator)
    rounded = torch.round((scaled + offset).double() - 0.5).float()
    out = rounded * 2.0 ** -fl
    if clamp:
        step = 2.0 ** -fl
        t_min = -(2.0 ** (wl - fl - 1))
        t_max = -t_min - step
        if symmetric:
            t_min += step
        out = out.clamp(t_min, t_max)
    return out


def float_quantize(x, exp, man, rounding="stochastic", generator=None):
    """Floating point with `exp` exponent bits and `man` mantissa bits
    (without the hidden bit), with subnormals; no inf or NaN."""
    _check(x, rounding)
    if not 2 <= exp <= 8 or not 0 <= man <= 22:
        raise ValueError(f"floating point needs exp in [2, 8] and man in [0, 22], got {exp}, {man}")
    bits = _bits(x)
    exponent = ((bits >> 23) & 0xFF) - 127
    min_exponent = -((1 << (exp - 1)) - 2)
    subnormal = exponent < min_exponent
    if rounding == "stochastic" and isinstance(generator, NoiseKey) and generator.words is None:
        # Each element keeps one of the two roundings below, both with its bits: drawn once.
        generator = generator._replace(words=_counter_bits(x.numel(), x.device, generator))

    # Subnormals of the format: shift to its smallest normal exponent, round there.
    shift = _float(((127 + min_exponent) << 23) | (bits & SIGN_BIT))
    shifted = _round_mantissa(_bits((x + shift).contiguous()), man, rounding, generator)
    small = _float(shifted) - shift

    normal = _round_mantissa(bits.contiguous().clone(), man, rounding, generator)
    max_exponent = (1 << (exp - 1)) + 127
    largest = (max_exponent << 23) | _largest_mantissa(man)
    overflow = ((normal >> 23) & 0xFF) > max_exponent
    normal = torch.where(overflow, (bits & SIGN_BIT) | largest, normal)
    return torch.where(subnormal, small, _float(normal))


# OCP-style floats and Microscaling (MX). Unlike qtorch's float format above,
# these follow the OCP specifications (8-bit floating point v1.0, MX v1.0):
# nearest rounding ties to even, and conversion saturates to the largest
# finite value; qtorch has no such kernel, hence our own.


def minifloat_quantize(x, man, min_exponent, largest, rounding="stochastic", generator=None):
    """A float with `man` mantissa bits, normal exponents from `min_exponent`
    up (subnormals below, with the step of the smallest normal binade),
    saturating at ±`largest`: finite values and ±inf beyond it become
    ±largest; NaN stays NaN. Nearest rounding ties to even; stochastic
    rounding goes to the upper of the two neighbouring grid points with
    probability equal to the distance from the lower one in steps (to
    within float32's 2^-24 resolution of uniform noise)."""
    _check(x, rounding)
    if not 1 <= man <= 22 or not -126 + man <= min_exponent <= 127:
        raise ValueError(f"minifloat needs man in [1, 22] and min_exponent in [man - 126, 127], "
                         f"got {man}, {min_exponent}")
    # The biased exponent of each value's grid step is field - man; float32
    # subnormals, inf and NaN land on the clamps, where the arithmetic below
    # still gives the right result.
    field = (_bits(x) >> MANTISSA_BITS).bitwise_and_(0xFF).clamp_(min_exponent + 127, 254)
    # Multiplying by powers of two (built from their bits) is exact here: steps become integers.
    scaled = x * _float(torch.sub(254 + man, field).bitwise_left_shift_(MANTISSA_BITS))
    if rounding == "nearest":
        rounded = scaled.round_()
    else:
        rounded = torch.floor(scaled)
        rounded += _uniform(x, generator) < (scaled - rounded)
    step = _float(field.sub_(man).bitwise_left_shift_(MANTISSA_BITS))
    return rounded.mul_(step).clamp_(-largest, largest)


def mx_quantize(blocks, man, min_exponent, emax, largest, rounding="stochastic", generator=None, scale="floor"):
    """OCP Microscaling: each row of the 2-D `blocks` shares a power-of-two
    scale X, clamped to E8M0's range 2^-127..2^127, and each value becomes X
    times a `minifloat_quantize`d element (`man`, `min_exponent`, `largest`:
    the element format; `emax` its largest normal exponent). `scale` floor
    (the OCP MX v1.0 spec): X = 2^(floor(log2(max |row|)) - emax), which
    saturates a row's largest values where they exceed `largest` X; ceil: the
    smallest X with max |row| <= largest X, which never saturates (NVIDIA's
    and torchao's RCEIL). Rows holding inf or NaN become all NaN (their scale
    is NaN)."""
    _check(blocks, rounding)
    if blocks.dim() != 2:
        raise ValueError(f"MX blocks must be a 2-D tensor of rows, got {blocks.dim()} dimensions")
    if scale not in ("floor", "ceil"):
        raise ValueError(f"MX scale rounding must be floor or ceil, got {scale!r}")
    peak = torch.maximum(blocks.amax(dim=1, keepdim=True), -blocks.amin(dim=1, keepdim=True))
    _, exponent = torch.frexp(peak)  # exact for float32 subnormals too
    shared = exponent - 1 - emax
    one = torch.ones_like(peak)
    if scale == "ceil":
        shared += peak > largest * torch.ldexp(one, shared)
    shared.clamp_(-127, 127)
    # One scale per row (ldexp reaches 2^-127, below float32's normal range);
    # elements keep few enough bits that scaling them back is exact.
    elements = minifloat_quantize(blocks * torch.ldexp(one, -shared), man, min_exponent, largest, rounding, generator)
    return elements.mul_(torch.ldexp(one, shared)).masked_fill_(~peak.isfinite(), float("nan"))


E4M3_LARGEST, E4M3_SMALLEST = 448.0, 2.0 ** -6  # torchao clamps block factors at the smallest normal
E2M1_LARGEST = 6.0


def nvfp4_quantize(blocks, rounding="stochastic", generator=None):
    """NVFP4 (formats.NVFP4Format) of the 2-D `blocks`, one block of 16 per
    row, the tensor factor taken over all of them. The arithmetic follows
    torchao's nvfp4_quantize step for step (its nearest rounding is the
    reference, bit for bit): block factors rounded to E4M3 by torch's
    float8 cast, the reciprocal of the combined factor multiplied in."""
    _check(blocks, rounding)
    if blocks.dim() != 2:
        raise ValueError(f"NVFP4 blocks must be a 2-D tensor of rows, got {blocks.dim()} dimensions")
    magnitude = blocks.abs()
    peak = magnitude.amax()
    # Nothing read back: a tensor of zeros takes the factor 1 (its elements
    # stay 0), one holding inf or NaN is filled with NaN at the end.
    tensor_scale = torch.where(peak > 0, peak / (E4M3_LARGEST * E2M1_LARGEST), torch.ones_like(peak))
    block_scale = (magnitude.amax(dim=1, keepdim=True) / E2M1_LARGEST) / tensor_scale
    block_scale = block_scale.clamp_(E4M3_SMALLEST, E4M3_LARGEST).to(torch.float8_e4m3fn).float()
    scaled = (blocks * ((1.0 / tensor_scale) / block_scale)).clamp_(-E2M1_LARGEST, E2M1_LARGEST)
    elements = minifloat_quantize(scaled, 1, 0, E2M1_LARGEST, rounding, generator)
    return elements.mul_(tensor_scale * block_scale).masked_fill_(~peak.isfinite(), float("nan"))
