"""Format specs: the names the command line and the public API give formats.

Grammar (case-insensitive):

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
    nvfp4                     NVIDIA's NVFP4: E2M1 elements, an E4M3 scale per block of 16 and a
                              float32 scale per tensor

`parse` turns a spec into a format object (None for fp32); `canonical`
normalises a spec for run names and records.
"""

import argparse
import re
from typing import Optional

from swalp.quant.formats import (ELEMENTS, BlockFormat, FixedFormat, FloatFormat, MXFormat, NumberFormat, NVFP4Format,
                                 OCPFloatFormat)

GRAMMAR = ("fp32, bfp<wl>, bfp<wl>/<k>, fixed<wl>.<fl>, e<exp>m<man>, bf16, fp16, fp8e4m3, fp8e5m2, "
           "mxfp8 (= mxfp8e4m3), mxfp8e5m2, mxfp6e2m3, mxfp6e3m2, mxfp4, mxint8, any mx spec with -ceil, nvfp4")
FULL_PRECISION = "fp32"


class FormatError(ValueError):
    """A spec that names no format; the message says what is wrong."""


PRESETS = {"bf16": "e8m7", "fp16": "e5m10", "mxfp8": "mxfp8e4m3", "mxfp4": "mxfp4e2m1", "mxfp8-ceil": "mxfp8e4m3-ceil",
           "mxfp4-ceil": "mxfp4e2m1-ceil"}
NAMED = {number_format.spec: number_format for number_format in (
    *(OCPFloatFormat(ELEMENTS[name]) for name in ("e4m3", "e5m2")),
    *(MXFormat(element, scale) for element in ELEMENTS.values() for scale in ("floor", "ceil")), NVFP4Format())}


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


def parse(spec: str) -> Optional[NumberFormat]:
    """The format named by `spec` (any case), or None for fp32; FormatError
    (one line) for anything else.

    >>> parse("MXFP8").spec
    'mxfp8e4m3'
    """
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


def argument(text):
    """An argparse type for scripts: the canonical spec, or the one-line error."""
    try:
        return canonical(text)
    except FormatError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def path_tag(spec):
    """`spec` as it appears in run directory names (no path separator)."""
    return canonical(spec).replace("/", "k")
