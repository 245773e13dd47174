"""The rounding kernels of `torch_kernels`, fused into Triton kernels.

Each rounded tensor costs at most three launches and no host sync: block
floating point fills a buffer of block maxima (one fill, one pass of atomic
maxima), then rounds and clips in one pass; fixed and floating point round in
one pass. Nearest rounding does torch_kernels' arithmetic step for step, so
its results are bit-identical to torch_kernels' (and so to qtorch's);
stochastic rounding adds the same uniform bits below the last kept bit.

The noise is counter-based: each element's random bits are keyed
SplitMix64 of its index (`splitmix`: the same bits as the torch backend's
counter-based draws), its two 64-bit key words derived on the host from a
`noise.NoiseKey`'s seed, identity, step and domain, so they depend on
nothing but those numbers, never on a generator's state or on the order of
calls. Callers keep the (identity, step, domain) triples of different
roundings distinct (see noise.StepNoise).

Where no GPU is present, `TRITON_INTERPRET=1` (set before triton is
imported) runs the same kernels on CPU tensors, slowly; tiles are then large
so that a small tensor takes a single program.

torch has no fused block-rounding kernel and qtorch's CUDA kernels cannot be
seeded, hence kernels of our own.
"""

import os

import torch
import triton
import triton.language as tl

from swalp.quant import splitmix, torch_kernels
from swalp.quant.formats import BlockFormat
from swalp.quant.noise import NoiseKey

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
# Elements per program. The interpreter pays per program, a GPU per idle lane.
TILE = 1 << 16 if INTERPRETING else 1024
MAX_ELEMENTS = 1 << 31  # element indices are int32
MANTISSA_BITS = torch_kernels.MANTISSA_BITS
# Contracting a multiply and an add into one fma would skip a rounding that
# torch_kernels performs; nearest rounding must stay bit-identical.
LAUNCH_OPTIONS = {} if INTERPRETING else {"enable_fp_fusion": False}


def available(device):
    """Why the kernels cannot run on `device`, or None when they can."""
    if device.type == "cuda" or INTERPRETING:
        return None
    return f"Triton's kernels run on CUDA devices (or on the CPU with TRITON_INTERPRET=1), not on {device.type}"


def compile_for(device, backend, number_formats=(), rounding="nearest"):
    """Compile (or load from Triton's cache) and run, on `device`, every
    kernel family and mode that rounding `number_formats` (formats `backend`,
    these kernels, computes; default 8-bit block floating point) with
    `rounding` launches: one tensor at a time and batched, so that a compiler
    or driver failure shows now, not in the middle of a run. Raises whatever
    they raise."""
    key = NoiseKey(0, 0, 0, 0) if rounding == "stochastic" else None
    tensors = [torch.ones(4, 4, device=device), torch.ones(3, device=device)]
    for number_format in number_formats or [BlockFormat(8)]:
        number_format.quantize(tensors[0], rounding, backend, key)
        round_many(tensors, number_format, rounding, key)


# splitmix's constants as the unsigned 64-bit words Triton computes with.
_GAMMA, _MIX_A, _MIX_B = (tl.constexpr(word & ((1 << 64) - 1)) for word in (splitmix.GAMMA, splitmix.MIX_A,
                                                                              splitmix.MIX_B))


@triton.jit
def _mix64(value):
    """splitmix.mix64 on uint64, whose shifts are logical."""
    value = (value ^ (value >> 30)) * _MIX_A
    value = (value ^ (value >> 27)) * _MIX_B
    return value ^ (value >> 31)


@triton.jit
def _random_bits(offsets, noise_a, noise_b):
    """splitmix.random_bits: the high 32 bits of mix64(GAMMA * (index ^ a) ^ b), as int32 bits."""
    # A key word that fits 32 bits arrives as a 32-bit argument (signed on a GPU, unsigned
    # under the interpreter when at least 2^31): converted, each keeps its 64-bit value.
    state = (offsets.to(tl.uint64) ^ noise_a.to(tl.uint64)) * _GAMMA
    bits = _mix64(state ^ noise_b.to(tl.uint64)) >> 32
    return bits.to(tl.uint32).to(tl.int32, bitcast=True)


@triton.jit
def _round_mantissa(bits, offsets, noise_a, noise_b, DROP: tl.constexpr, STOCHASTIC: tl.constexpr):
    """torch_kernels._round_mantissa on int32 bits: keep 23 - DROP mantissa bits."""
    mask: tl.constexpr = (1 << DROP) - 1
    if STOCHASTIC:
        bits = bits + (_random_bits(offsets, noise_a, noise_b) & mask)
    else:
        bits = bits + (1 << (DROP - 1))
    return bits & ~mask


@triton.jit
def _block_index(offsets, block_map, inner, blocks, MAPPED: tl.constexpr, mask):
    if MAPPED:
        return tl.load(block_map + offsets, mask=mask, other=0)
    return (offsets // inner) % blocks


# Integer arguments that change from call to call (sizes, the noise key's
# words) are not specialized on: Triton would otherwise compile a kernel anew
# for each value equal to 1 or divisible by 16.
VARYING = ("n", "inner", "blocks", "noise_a", "noise_b")


@triton.jit(do_not_specialize=VARYING[:3])
def _block_peak_kernel(x, peaks, block_map, n, inner, blocks, MAPPED: tl.constexpr, TILE: tl.constexpr):
    """peaks[b] = max over block b of |x| as int32 bits (NaN above inf above
    every finite magnitude, as torch's amax propagates NaN)."""
    offsets = tl.program_id(0).to(tl.int64) * TILE + tl.arange(0, TILE)
    offsets = offsets.to(tl.int32)
    mask = offsets < n
    magnitude = tl.load(x + offsets, mask=mask, other=0.0).to(tl.int32, bitcast=True) & 0x7FFFFFFF
    block = _block_index(offsets, block_map, inner, blocks, MAPPED, mask)
    first = tl.min(tl.where(mask, block, 2147483647), axis=0)
    last = tl.max(tl.where(mask, block, -1), axis=0)
    if first == last:  # the whole tile lies in one block: one atomic instead of TILE
        tl.atomic_max(peaks + first, tl.max(magnitude, axis=0))
    else:
        tl.atomic_max(peaks + block, magnitude, mask=mask)


@triton.jit(do_not_specialize=VARYING)
def _block_round_kernel(x, out, peaks, block_map, n, inner, blocks, noise_a, noise_b,
                        DROP: tl.constexpr, LARGEST_MANTISSA: tl.constexpr, STOCHASTIC: tl.constexpr,
                        MAPPED: tl.constexpr, TILE: tl.constexpr):
    """torch_kernels.block_quantize's rebase, round and qtorch's bit-level clip
    in one pass. torch_kernels clamps instead where no block needs the
    bit-level clip; the two agree on such blocks, so here every block takes
    the bit-level clip."""
    offsets = (tl.program_id(0).to(tl.int64) * TILE + tl.arange(0, TILE)).to(tl.int32)
    mask = offsets < n
    value = tl.load(x + offsets, mask=mask, other=0.0)
    block = _block_index(offsets, block_map, inner, blocks, MAPPED, mask)
    max_exponent = tl.load(peaks + block, mask=mask, other=0) & 0x7F800000
    base = max_exponent.to(tl.float32, bitcast=True) * 6.0
    rebased = (value + base).to(tl.int32, bitcast=True)
    rounded = _round_mantissa(rebased, offsets, noise_a, noise_b, DROP, STOCHASTIC)
    quantized = (rounded.to(tl.float32, bitcast=True) - base).to(tl.int32, bitcast=True)
    overflow = (quantized & 0x7F800000) > max_exponent
    clipped = tl.where(overflow, (quantized & -2147483648) | max_exponent | LARGEST_MANTISSA, quantized)
    tl.store(out + offsets, clipped.to(tl.float32, bitcast=True), mask=mask)


@triton.jit(do_not_specialize=("n", *VARYING[3:]))
def _fixed_kernel(x, out, n, scale, unscale, low, high, noise_a, noise_b,
                  STOCHASTIC: tl.constexpr, CLAMP: tl.constexpr, TILE: tl.constexpr):
    """torch_kernels.fixed_point_quantize: qtorch's nearbyint((float)(a + r) - 0.5)
    in double, rounding half to even."""
    offsets = (tl.program_id(0).to(tl.int64) * TILE + tl.arange(0, TILE)).to(tl.int32)
    mask = offsets < n
    scaled = tl.load(x + offsets, mask=mask, other=0.0) * scale
    if STOCHASTIC:
        # 24 random bits: a float32 uniform on [0, 1), as torch.rand draws.
        uniform = ((_random_bits(offsets, noise_a, noise_b) >> 8) & 0xFFFFFF).to(tl.float32)
        shifted = (scaled + uniform * 5.9604644775390625e-08).to(tl.float64) - 0.5
    else:
        shifted = (scaled + 0.5).to(tl.float64) - 0.5
    # Adding and removing 2^52 rounds a double of smaller magnitude to an
    # integer, half to even; larger ones (and inf, NaN) are integers already.
    magnitude = tl.abs(shifted)
    integral = (magnitude + 4503599627370496.0) - 4503599627370496.0
    whole = tl.where(shifted < 0, -integral, integral)
    rounded = tl.where(magnitude < 4503599627370496.0, whole, shifted).to(tl.float32)
    result = rounded * unscale
    if CLAMP:
        result = tl.minimum(tl.maximum(result, low, propagate_nan=tl.PropagateNan.ALL), high,
                            propagate_nan=tl.PropagateNan.ALL)
    tl.store(out + offsets, result, mask=mask)


@triton.jit(do_not_specialize=("n", *VARYING[3:]))
def _float_kernel(x, out, n, noise_a, noise_b, MIN_EXPONENT: tl.constexpr,
                  MAX_FIELD: tl.constexpr, LARGEST_MANTISSA: tl.constexpr, DROP: tl.constexpr,
                  STOCHASTIC: tl.constexpr, TILE: tl.constexpr):
    """torch_kernels.float_quantize; one draw per element serves whichever of
    the subnormal and normal roundings the element takes."""
    offsets = (tl.program_id(0).to(tl.int64) * TILE + tl.arange(0, TILE)).to(tl.int32)
    mask = offsets < n
    value = tl.load(x + offsets, mask=mask, other=0.0)
    bits = value.to(tl.int32, bitcast=True)
    sign = bits & -2147483648
    exponent = ((bits >> 23) & 0xFF) - 127
    shift = (((127 + MIN_EXPONENT) << 23) | sign).to(tl.float32, bitcast=True)
    shifted = _round_mantissa((value + shift).to(tl.int32, bitcast=True), offsets, noise_a, noise_b,
                              DROP, STOCHASTIC)
    small = shifted.to(tl.float32, bitcast=True) - shift
    normal = _round_mantissa(bits, offsets, noise_a, noise_b, DROP, STOCHASTIC)
    overflow = ((normal >> 23) & 0xFF) > MAX_FIELD
    normal = tl.where(overflow, sign | (MAX_FIELD << 23) | LARGEST_MANTISSA, normal)
    tl.store(out + offsets, tl.where(exponent < MIN_EXPONENT, small, normal.to(tl.float32, bitcast=True)),
             mask=mask)


def _launch(kernel, n, *args, **constants):
    """One launch over n elements, visible to torch.profiler as one event."""
    with torch.profiler.record_function(f"triton::{kernel.fn.__name__}"):
        kernel[(triton.cdiv(n, TILE),)](*args, TILE=TILE, **constants, **LAUNCH_OPTIONS)


def _noise(key, rounding):
    if rounding == "stochastic" and key is None:
        raise ValueError("stochastic rounding with the triton backend needs a NoiseKey")
    if key is None:
        return 0, 0
    return splitmix.stream_keys(key.seed, key.identity, key.step, key.domain)


def _prepare(x, rounding, inplace):
    """Check x; the contiguous input and the tensor to write into."""
    torch_kernels._check(x, rounding)
    if x.numel() >= MAX_ELEMENTS:
        raise ValueError(f"the triton backend rounds tensors of fewer than 2^31 elements, got {x.numel()}")
    source = x.contiguous()
    return source, source if inplace and source is x else torch.empty_like(source)


def _block_round(source, out, wl, rounding, key, inner, blocks, block_map=None, block_count=None):
    n = source.numel()
    mapped = block_map is not None
    peaks = torch.zeros(block_count if mapped else blocks, dtype=torch.int32, device=source.device)
    index = block_map if mapped else peaks  # an unused pointer when the index is computed
    _launch(_block_peak_kernel, n, source, peaks, index, n, inner, blocks, MAPPED=mapped)
    _launch(_block_round_kernel, n, source, out, peaks, index, n, inner, blocks, *_noise(key, rounding),
            DROP=MANTISSA_BITS - wl, LARGEST_MANTISSA=torch_kernels._largest_mantissa(wl - 2),
            STOCHASTIC=rounding == "stochastic", MAPPED=mapped)
    return out


def block_layout(shape, dim):
    """(inner, blocks): element i of a contiguous tensor of `shape` lies in
    block (i // inner) % blocks, as torch_kernels.block_max groups them."""
    numel = 1
    for size in shape:
        numel *= size
    if dim == -1 or not shape:
        return max(numel, 1), 1
    inner = 1
    for size in shape[dim + 1:]:
        inner *= size
    return max(inner, 1), shape[dim]


def block_quantize(x, wl, dim=-1, rounding="stochastic", key=None, inplace=False):
    """torch_kernels.block_quantize; `key` (a noise.NoiseKey) selects the noise."""
    torch_kernels._check(x, rounding)
    if not -1 <= dim < max(x.dim(), 1):
        raise ValueError(f"block dim must be -1 or in [0, {x.dim() - 1}], got {dim}")
    if x.numel() == 0:
        return x if inplace else x.clone()
    source, out = _prepare(x, rounding, inplace)
    inner, blocks = block_layout(tuple(x.shape), dim)
    return _block_round(source, out, wl, rounding, key, inner, blocks)


def fixed_point_quantize(x, wl, fl, clamp=True, symmetric=False, rounding="stochastic", key=None, inplace=False):
    """torch_kernels.fixed_point_quantize; `key` (a noise.NoiseKey) selects the noise."""
    torch_kernels._check(x, rounding)
    if wl - fl > 128 or fl > 126:
        raise ValueError(f"fixed point range and step must be normal float32 numbers "
                         f"(wl - fl <= 128, fl <= 126), got wl {wl}, fl {fl}")
    source, out = _prepare(x, rounding, inplace)
    step_size = 2.0 ** -fl
    low, high = -(2.0 ** (wl - fl - 1)), 2.0 ** (wl - fl - 1) - step_size
    if symmetric:
        low += step_size
    _launch(_fixed_kernel, source.numel(), source, out, source.numel(), 2.0 ** fl, step_size, low, high,
            *_noise(key, rounding), STOCHASTIC=rounding == "stochastic", CLAMP=clamp)
    return out


def float_quantize(x, exp, man, rounding="stochastic", key=None, inplace=False):
    """torch_kernels.float_quantize; `key` (a noise.NoiseKey) selects the noise."""
    torch_kernels._check(x, rounding)
    if not 2 <= exp <= 8 or not 0 <= man <= 22:
        raise ValueError(f"floating point needs exp in [2, 8] and man in [0, 22], got {exp}, {man}")
    source, out = _prepare(x, rounding, inplace)
    _launch(_float_kernel, source.numel(), source, out, source.numel(), *_noise(key, rounding),
            MIN_EXPONENT=-((1 << (exp - 1)) - 2), MAX_FIELD=(1 << (exp - 1)) + 127,
            LARGEST_MANTISSA=torch_kernels._largest_mantissa(man), DROP=MANTISSA_BITS - man,
            STOCHASTIC=rounding == "stochastic")
    return out


_block_maps = {}


def _block_map(layouts, device):
    """For a flat buffer of tensors with the given (numel, inner, blocks),
    each element's block number counted over all tensors (int32), and the
    number of blocks. Cached: a list of parameters keeps its shapes."""
    cache_key = (tuple(layouts), device)
    if cache_key not in _block_maps:
        parts, base = [], 0
        for numel, inner, blocks in layouts:
            local = torch.arange(numel, dtype=torch.int64, device=device).div_(inner, rounding_mode="floor")
            parts.append(local.remainder_(blocks).add_(base).to(torch.int32))
            base += blocks
        _block_maps[cache_key] = torch.cat(parts), base
    return _block_maps[cache_key]


def round_many(tensors, number_format, rounding, key=None, out=None):
    """Round every tensor of the list into itself, or into the matching
    tensor of `out`, as `number_format.quantize` would one by one, with the
    noise of `key` over their concatenation (each element's index is its
    position there). Five launches whatever the number of tensors: gather
    into one flat buffer, the kernels of one tensor (block maxima through a
    cached map of each element's block), scatter back."""
    if not tensors:
        return
    for tensor in tensors:
        torch_kernels._check(tensor, rounding)
    flat = torch.cat([tensor.reshape(-1) for tensor in tensors])
    if flat.numel() >= MAX_ELEMENTS:
        raise ValueError(f"the triton backend rounds fewer than 2^31 elements at once, got {flat.numel()}")
    if number_format.kernel == "block":
        layouts = []
        for tensor in tensors:
            shape, dim = number_format.blocking(tuple(tensor.shape))
            layouts.append((tensor.numel(), *block_layout(shape, dim)))
        block_map, block_count = _block_map(layouts, flat.device)
        _block_round(flat, flat, number_format.wl, rounding, key, 1, 1, block_map, block_count)
    elif number_format.kernel == "fixed":
        fixed_point_quantize(flat, number_format.wl, number_format.fl, number_format.clamp, number_format.symmetric,
                             rounding, key, inplace=True)
    elif number_format.kernel == "float":
        float_quantize(flat, number_format.exp, number_format.man, rounding, key, inplace=True)
    else:
        raise ValueError(f"the triton backend cannot round {number_format}")
    targets = tensors if out is None else out
    pieces = flat.split([tensor.numel() for tensor in tensors])
    torch._foreach_copy_(targets, [piece.view(tensor.shape) for piece, tensor in zip(pieces, targets)])

