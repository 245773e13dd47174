"""Number formats: small value objects, and the specs that name them.

A format knows its spec (the command line's name for it, e.g. `mxfp8e4m3`),
which backend kernel computes it (`kernel`, an attribute of
`quantization.Backend`) and how to round a tensor with that kernel
(`quantize`). `parse` turns a spec into a format; `canonical` normalises a
spec for the command line, run names and checkpoints.

Spec grammar (case-insensitive):

    fp32                      full precision (no rounding)
    bfp<wl>                   block floating point, wl bits with the sign, blocks along dim 0
    bfp<wl>/<k>               ... in blocks of k consecutive elements of each row (MX's layout)
    fixed<wl>.<fl>            fixed point, wl bits of which fl fractional (qtorch's FixedPoint)
    e<exp>m<man>              floating point as qtorch's FloatingPoint: no inf or NaN
                              reserved, so e4m3 reaches 480, e5m2 114688; ties round away from 0
    bf16, fp16                e8m7, e5m10 (qtorch's; fp16 thus reaches 131008, not IEEE's 65504)
    fp8e4m3, fp8e5m2          OCP 8-bit floats (448 and 57344, like torch.float8_e4m3fn and
                              float8_e5m2), ties to even, saturating
    mxfp8 (= mxfp8e4m3), mxfp8e5m2, mxfp6e2m3, mxfp6e3m2, mxfp4 (= mxfp4e2m1), mxint8
                              OCP Microscaling: blocks of 32 share an E8M0 scale, the spec's
                              2^(floor(log2 max) - emax of the element)
    <mx spec>-ceil            ... with the smallest scale that saturates nothing (NVIDIA's rounding)
"""

import argparse
import math
import re
from dataclasses import dataclass
from typing import ClassVar

import torch

GRAMMAR = ("fp32, bfp<wl>, bfp<wl>/<k>, fixed<wl>.<fl>, e<exp>m<man>, bf16, fp16, fp8e4m3, fp8e5m2, "
           "mxfp8 (= mxfp8e4m3), mxfp8e5m2, mxfp6e2m3, mxfp6e3m2, mxfp4, mxint8, and any mx spec with -ceil")
FULL_PRECISION = "fp32"

# Tensors with at most this many dimensions share one exponent ("small block").
SMALL_BLOCK_MAX_DIMS = {"None": 0, "FC": 1, "Conv": 2}
BLOCK_DIMS = ("B", "BC")
# Block floating point is simulated in float32 at the exponent of the block's
# largest value plus 2, which leaves 22 bits below the sign; 1 bit would leave
# only the sign. -1 on the command line means full precision.
MIN_WL, MAX_WL = 2, 22


class FormatError(ValueError):
    """A spec that names no format; the message says what is wrong."""


def row_blocks(x, k):
    """x as rows (dim 0; a 1-D tensor is one row) cut into blocks of k
    consecutive elements, the last block of a row padded with zeros (which
    change no block's largest magnitude): a (blocks, k) tensor, and the
    function that puts such a tensor back into x's shape."""
    count, length = (x.shape[0], math.prod(x.shape[1:])) if x.dim() > 1 else (1, x.numel())
    rows = x.reshape(count, length)
    if length % k:  # padding copies the tensor
        rows = torch.nn.functional.pad(rows, (0, -length % k))
    blocks = rows.reshape(rows.numel() // k, k)

    def restore(quantized):
        return quantized.reshape(rows.shape)[:, :length].reshape(x.shape)

    return blocks, restore


@dataclass(frozen=True)
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

    def quantize(self, x, rounding, backend, generator=None, inplace=False):
        if self.block_size and x.dim() > SMALL_BLOCK_MAX_DIMS[self.small_block]:
            blocks, restore = row_blocks(x, self.block_size)
            return restore(backend.block(blocks.contiguous(), self.wl, 0, rounding, generator))
        shape, dim = self.blocking(x.shape)
        if shape == tuple(x.shape):
            return backend.block(x, self.wl, dim, rounding, generator, inplace=inplace)
        return backend.block(x.reshape(shape), self.wl, dim, rounding, generator, inplace=inplace).view_as(x)


@dataclass(frozen=True)
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

    def quantize(self, x, rounding, backend, generator=None, inplace=False):
        blocks, restore = row_blocks(x, MX_BLOCK)
        element = self.element
        return restore(backend.mx(blocks, element.man, element.min_exponent, element.emax, element.largest,
                                  rounding, generator, self.scale))


PRESETS = {"bf16": "e8m7", "fp16": "e5m10", "mxfp8": "mxfp8e4m3", "mxfp4": "mxfp4e2m1", "mxfp8-ceil": "mxfp8e4m3-ceil",
           "mxfp4-ceil": "mxfp4e2m1-ceil"}
NAMED = {number_format.spec: number_format for number_format in (
    *(OCPFloatFormat(ELEMENTS[name]) for name in ("e4m3", "e5m2")),
    *(MXFormat(element, scale) for element in ELEMENTS.values() for scale in ("floor", "ceil")))}


def _build(spec):
    """The format a canonical lower-case spec names (None for fp32)."""
    if spec == FULL_PRECISION:
        return None
    if match := re.fullmatch(r"bfp(\d+)(?:/(\d+))?", spec):
        return BlockFormat(int(match[1]), block_size=int(match[2]) if match[2] else None)
    if match := re.fullmatch(r"fixed(\d+)\.(\d+)", spec):
        return FixedFormat(int(match[1]), int(match[2]))
    if match := re.fullmatch(r"e(\d+)m(\d+)", spec):
        return FloatFormat(int(match[1]), int(match[2]))
    if spec in NAMED:
        return NAMED[spec]
    raise FormatError(f"{spec!r} is not a number format; use one of {GRAMMAR}")


def parse(spec):
    """The format named by `spec` (any case), or None for fp32; FormatError
    (one line) for anything else."""
    text = str(spec).strip().lower()
    text = PRESETS.get(text, text)
    try:
        return _build(text)
    except FormatError:
        raise
    except ValueError as error:  # a known shape with numbers out of range
        raise FormatError(f"{spec}: {error}") from None


def canonical(spec):
    """The one spelling of `spec`'s format (e.g. MXFP8 -> mxfp8e4m3, bf16 -> e8m7)."""
    number_format = parse(spec)
    return FULL_PRECISION if number_format is None else number_format.spec


def path_tag(spec):
    """`spec` as it appears in run directory names (no path separator)."""
    return canonical(spec).replace("/", "k")


def argument(text):
    """An argparse type: the canonical spec, or an ArgumentTypeError naming what is wrong."""
    try:
        return canonical(text)
    except FormatError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def per_kind(word_lengths, specs, every=None):
    """Each number kind's format from the command line: `word_lengths` maps
    kinds to --wl-<kind> (None where not given), `specs` to --format-<kind>
    (canonical, None where not given), `every` is --format. A kind's own
    spec wins over --format; a word length and a spec for one kind are
    refused (FormatError). Returns (word lengths, specs) with -1 and None
    where a kind is full precision, and block floating point without a
    block size (bfp<wl>) as its word length, so that `--format-weight bfp8`
    and `--wl-weight 8` are one run."""
    lengths, chosen = {}, {}
    for kind, wl in word_lengths.items():
        spec, flag = (specs[kind], f"--format-{kind}") if specs.get(kind) else (every, "--format")
        if spec is not None and wl is not None:
            raise FormatError(f"--wl-{kind} and {flag} both set the {kind} format; keep one")
        number_format = parse(spec) if spec is not None else None
        if isinstance(number_format, BlockFormat) and not number_format.block_size:
            wl, number_format = number_format.wl, None
        lengths[kind] = -1 if wl is None else wl
        chosen[kind] = None if number_format is None else number_format.spec
    return lengths, chosen
