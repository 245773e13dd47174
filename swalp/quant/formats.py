"""Number formats as small value objects.

A format knows its spec (the command line's name for it, e.g. `mxfp8e4m3`;
`specs.parse` turns a spec into a format), which backend kernel computes it
(`kernel`, an attribute of `backends.Backend`) and how to round a tensor
with that kernel (`quantize`). Formats import no torch: the command line
checks them before torch loads.
"""

import math
from dataclasses import dataclass, fields
from typing import ClassVar, Union

# Tensors with at most this many dimensions share one exponent ("small block").
SMALL_BLOCK_MAX_DIMS = {"None": 0, "FC": 1, "Conv": 2}
BLOCK_DIMS = ("B", "BC")
# Block floating point is simulated in float32 at the exponent of the block's
# largest value plus 2, which leaves 22 bits below the sign; 1 bit would leave
# only the sign. -1 on the command line means full precision.
MIN_WL, MAX_WL = 2, 22


def _rows(x):
    return (x.shape[0], math.prod(x.shape[1:])) if x.dim() > 1 else (1, x.numel())


def row_blocks_numel(x, k):
    """The elements of `row_blocks(x, k)`, the padding included."""
    count, length = _rows(x)
    return count * (length + (-length % k))


# Every number format made, by its key: an operator's arguments are tensors,
# numbers and strings, and compiled code passes a format to one by its key
# (see backends._round_batch).
_MADE = {}


def key(number_format):
    """What names `number_format` to an operator: its class and fields,
    the same in every process, as a compiled graph cached on disk needs
    (written when it is made: Dynamo cannot trace a dataclass's repr)."""
    return number_format._key


def _key_of(number_format):
    named = tuple((field.name, getattr(number_format, field.name)) for field in fields(number_format))
    return f"{type(number_format).__module__}.{type(number_format).__qualname__}{named!r}"


def made(format_key):
    """The last format made with key `format_key` (all such are equal)."""
    return _MADE[format_key]


def _registered(cls):
    """Class decorator, under @dataclass (whose __init__ then calls the
    __post_init__ set here): each instance, once checked, is registered in
    _MADE, and copies and unpickled ones are made by the constructor too
    (so that they are registered)."""
    check = getattr(cls, "__post_init__", None)

    def __post_init__(self):
        if check is not None:
            check(self)
        object.__setattr__(self, "_key", _key_of(self))
        _MADE[self._key] = self

    def __reduce__(self):
        return type(self), tuple(getattr(self, field.name) for field in fields(self))

    cls.__post_init__, cls.__reduce__ = __post_init__, __reduce__
    return cls


def draws(number_format, x):
    """How many elements the rounding of x in `number_format` draws noise
    for: those of its blocks where they pad rows (counter-based noise
    numbers them, so a batch must know where each tensor's draws end)."""
    block = getattr(number_format, "row_block", lambda _: None)(x)
    return x.numel() if block is None else row_blocks_numel(x, block)


def row_blocks(x, k):
    """x as rows (dim 0; a 1-D tensor is one row) cut into blocks of k
    consecutive elements, the last block of a row padded with zeros (which
    change no block's largest magnitude): a (blocks, k) tensor, and the
    function that puts such a tensor back into x's shape."""
    count, length = _rows(x)
    rows = x.reshape(count, length)
    if length % k:  # padding copies the tensor
        padded = rows.new_zeros((count, length + (-length % k)))
        padded[:, :length] = rows
        rows = padded
    blocks = rows.reshape(rows.numel() // k, k)

    def restore(quantized):
        return quantized.reshape(rows.shape)[:, :length].reshape(x.shape)

    return blocks, restore


@dataclass(frozen=True)
@_registered
class BlockFormat:
    """Block floating point with `wl` bits per number, sign included.

    Blocks run along `dim` (qtorch's `BlockFloatingPoint(wl, dim)`; -1: the
    whole tensor is one block). The default dim 0 gives one exponent per
    sample of an activation and per output channel of a weight, and one per
    element of a 1-D tensor. The original SWALP's layouts: `small_block` FC or
    Conv gives tensors of at most 1 or 2 dimensions one shared exponent;
    `block_dim` BC blocks along the first two dimensions. `block_size` k
    instead cuts each row (index of dim 0) into blocks of k consecutive
    elements, MX's layout.
    """

    wl: int
    dim: int = 0
    small_block: str = "None"
    block_dim: str = "B"
    block_size: int = None
    kernel: ClassVar[str] = "block"

    def __post_init__(self):
        if not MIN_WL <= self.wl <= MAX_WL:
            raise ValueError(f"block word length must be in [{MIN_WL}, {MAX_WL}], got {self.wl}")
        if self.small_block not in SMALL_BLOCK_MAX_DIMS:
            raise ValueError(f"small_block must be one of {list(SMALL_BLOCK_MAX_DIMS)}")
        if self.block_dim not in BLOCK_DIMS:
            raise ValueError(f"block_dim must be one of {list(BLOCK_DIMS)}")
        if self.block_dim == "BC" and self.dim != 0:
            raise ValueError("block_dim BC blocks along dimensions 0 and 1; it needs dim 0")
        if self.block_size is not None and (self.block_size < 1 or self.dim != 0 or self.block_dim != "B"):
            raise ValueError("a block size needs a positive size, dim 0 and block_dim B")

    @property
    def spec(self):
        return f"bfp{self.wl}" + (f"/{self.block_size}" if self.block_size else "")

    def __str__(self):
        layout = (f"block_size={self.block_size}" if self.block_size
                  else f"dim={self.dim}, small_block={self.small_block}, block_dim={self.block_dim}")
        return f"BlockFloatingPoint(wl={self.wl}, {layout})"

    def blocking(self, shape):
        """The shape a tensor of `shape` is rounded as, and the dim its blocks
        run along there (layouts without a block size)."""
        if len(shape) <= SMALL_BLOCK_MAX_DIMS[self.small_block]:
            return tuple(shape), -1
        if self.block_dim == "BC" and len(shape) >= 2:
            return (shape[0] * shape[1], math.prod(shape[2:])), 0
        return tuple(shape), self.dim

    def row_block(self, x):
        """The block size it cuts x's rows into (`row_blocks`), or None."""
        return self.block_size if self.block_size and x.dim() > SMALL_BLOCK_MAX_DIMS[self.small_block] else None

    def quantize(self, x, rounding, backend, generator=None, inplace=False):
        if self.row_block(x):
            blocks, restore = row_blocks(x, self.block_size)
            return restore(backend.block(blocks.contiguous(), self.wl, 0, rounding, generator))
        shape, dim = self.blocking(x.shape)
        if shape == tuple(x.shape):
            return backend.block(x, self.wl, dim, rounding, generator, inplace=inplace)
        return backend.block(x.reshape(shape), self.wl, dim, rounding, generator, inplace=inplace).view_as(x)


@dataclass(frozen=True)
@_registered
class FixedFormat:
    """Fixed point (qtorch's `FixedPoint`): `wl` bits, `fl` of them fractional."""

    wl: int
    fl: int
    clamp: bool = True
    symmetric: bool = False
    kernel: ClassVar[str] = "fixed"

    def __post_init__(self):
        if not 2 <= self.wl <= 32:
            raise ValueError(f"fixed point word length must be in [2, 32], got {self.wl}")
        if not 0 <= self.fl <= 126:
            raise ValueError(f"fixed point fractional bits must be in [0, 126], got {self.fl}")

    @property
    def spec(self):
        return f"fixed{self.wl}.{self.fl}"

    def quantize(self, x, rounding, backend, generator=None, inplace=False):
        return backend.fixed(x, self.wl, self.fl, self.clamp, self.symmetric, rounding, generator)


@dataclass(frozen=True)
@_registered
class FloatFormat:
    """Floating point (qtorch's `FloatingPoint`): `exp` exponent bits, `man`
    mantissa bits without the hidden one, subnormals, and every exponent
    code a number (no inf or NaN reserved, except with 8 exponent bits)."""

    exp: int
    man: int
    kernel: ClassVar[str] = "float"

    def __post_init__(self):
        if not 2 <= self.exp <= 8 or not 0 <= self.man <= 22:
            raise ValueError(f"floating point needs exp in [2, 8] and man in [0, 22], got {self.exp}, {self.man}")

    @property
    def spec(self):
        return f"e{self.exp}m{self.man}"

    def quantize(self, x, rounding, backend, generator=None, inplace=False):
        return backend.float(x, self.exp, self.man, rounding, generator)


@dataclass(frozen=True)
class Element:
    """An OCP element format (8-bit floating point v1.0, MX v1.0): `man`
    mantissa bits, normal exponents `min_exponent`..`emax`, values up to
    `largest`. INT8 is MX's: two's complement with 6 fractional bits, here
    symmetric (±127/64; the spec allows dropping -2), which is the grid of a
    float with 6 mantissa bits and the single exponent 0."""

    name: str
    bits: int
    man: int
    min_exponent: int
    emax: int
    largest: float

    @classmethod
    def floating(cls, name, exp, man, reserved):
        """E<exp>M<man> with the IEEE bias; `reserved`: "inf" (the top
        exponent code is inf and NaN, as IEEE), "nan" (only the top code's
        largest mantissa is NaN, as E4M3) or "none" (FP6 and FP4)."""
        bias = 2 ** (exp - 1) - 1
        emax = 2 ** exp - 1 - bias - (reserved == "inf")
        top_mantissa = 2 - 2.0 ** -man * (1 + (reserved == "nan"))
        return cls(name, 1 + exp + man, man, 1 - bias, emax, top_mantissa * 2.0 ** emax)


INT8_FRACTION_BITS = 6
ELEMENTS = {element.name: element for element in (
    Element.floating("e4m3", 4, 3, "nan"), Element.floating("e5m2", 5, 2, "inf"),
    Element.floating("e2m3", 2, 3, "none"), Element.floating("e3m2", 3, 2, "none"),
    Element.floating("e2m1", 2, 1, "none"),
    Element("int8", 8, INT8_FRACTION_BITS, 0, 0, 2 - 2.0 ** -INT8_FRACTION_BITS))}


@dataclass(frozen=True)
@_registered
class OCPFloatFormat:
    """An OCP 8-bit float on its own: E4M3 (largest 448, as
    torch.float8_e4m3fn) or E5M2 (57344), ties to even, saturating."""

    element: Element
    kernel: ClassVar[str] = "minifloat"

    @property
    def spec(self):
        return f"fp8{self.element.name}"

    def __str__(self):
        return f"OCP FP8 {self.element.name.upper()} (largest {self.element.largest:g}, saturating)"

    def quantize(self, x, rounding, backend, generator=None, inplace=False):
        element = self.element
        return backend.minifloat(x, element.man, element.min_exponent, element.largest, rounding, generator)


MX_BLOCK = 32  # OCP MX v1.0: every MX format has blocks of 32


@dataclass(frozen=True)
@_registered
class MXFormat:
    """OCP Microscaling: blocks of 32 consecutive elements of each row share
    an E8M0 scale, the elements are converted with saturation. Rows as in
    `row_blocks`. `scale` floor is the spec's 2^(floor(log2(max |x|)) - emax
    of the element), which clamps a block's largest values to the largest
    element when their mantissa exceeds the element's (e.g. [448, 512) x
    scale for E4M3); ceil is the smallest scale that clamps nothing."""

    element: Element
    scale: str = "floor"
    kernel: ClassVar[str] = "mx"

    def __post_init__(self):
        if self.scale not in ("floor", "ceil"):
            raise ValueError(f"MX scale rounding must be floor or ceil, got {self.scale!r}")

    @property
    def spec(self):
        name = self.element.name
        return ("mxint8" if name == "int8" else f"mxfp{self.element.bits}{name}") + (
            "-ceil" if self.scale == "ceil" else "")

    def __str__(self):
        return (f"MX {self.spec} ({self.element.name.upper()} elements, E8M0 {self.scale} scale per block of "
                f"{MX_BLOCK})")

    def row_block(self, x):
        return MX_BLOCK

    def quantize(self, x, rounding, backend, generator=None, inplace=False):
        blocks, restore = row_blocks(x, MX_BLOCK)
        element = self.element
        return restore(backend.mx(blocks, element.man, element.min_exponent, element.emax, element.largest,
                                  rounding, generator, self.scale))


NVFP4_BLOCK = 16


@dataclass(frozen=True)
@_registered
class NVFP4Format:
    """NVIDIA's NVFP4: E2M1 elements (largest 6) in blocks of 16 consecutive
    elements of each row (rows as in `row_blocks`), each block scaled by an
    E4M3 factor, the whole tensor by one float32 factor. The tensor's factor
    is max |x| / (448 x 6), so that block factors use E4M3's whole range; a
    block's factor is its max |x| / 6 divided by the tensor's, rounded to
    E4M3 to nearest (ties to even, clamped to E4M3's smallest normal 2^-6 and 448).
    Elements round to E2M1 with `rounding` (nearest: ties to even) after
    division by both factors and saturation at ±6; the value is element x
    (tensor factor x block factor). A tensor holding inf or NaN becomes all
    NaN; a tensor of zeros stays zero."""

    kernel: ClassVar[str] = "nvfp4"
    element: ClassVar[Element] = ELEMENTS["e2m1"]

    @property
    def spec(self):
        return "nvfp4"

    def __str__(self):
        return "NVFP4 (E2M1 elements, E4M3 scale per block of 16, float32 tensor scale)"

    def row_block(self, x):
        return NVFP4_BLOCK

    def quantize(self, x, rounding, backend, generator=None, inplace=False):
        blocks, restore = row_blocks(x, NVFP4_BLOCK)
        return restore(backend.nvfp4(blocks, rounding, generator))


# Any of the formats above.
NumberFormat = Union[BlockFormat, FixedFormat, FloatFormat, OCPFloatFormat, MXFormat, NVFP4Format]
