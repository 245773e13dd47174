"""Rounding backends: the kernels that compute each number format.

ours in PyTorch operations (`torch_kernels`: seedable, no compiler, any
device), the same under torch.compile (`compiled`: counter-based noise
computed by traceable operations, fused by Inductor), ours in Triton
(`triton_kernels`: fused, counter-based noise; CUDA, or the CPU under
Triton's interpreter), or qtorch's compiled C++/CUDA kernels (not
seedable). A format names the kernel it needs (its `kernel`);
a backend lacking it cannot compute that format.
"""

from typing import Callable, NamedTuple

import torch

from swalp.errors import first_line
from swalp.quant import formats, operators, splitmix, torch_kernels
from swalp.quant.noise import NoiseKey


class Backend(NamedTuple):
    """Rounding kernels with torch_kernels' signatures. A kernel a backend
    lacks is None: a format names the kernel it needs (its `kernel`).
    `seedable`: their stochastic rounding is repeatable; `counter_based`:
    their noise argument is a NoiseKey rather than a torch generator;
    `block_sizes`: their block kernel takes formats with a block size;
    `round_many`, where present, rounds a list of tensors in place with a
    handful of launches (see triton_kernels.round_many); `step_tensor`:
    their noise keys carry the step as a tensor (torch.compile's graphs
    then serve every step)."""

    name: str
    block: Callable
    fixed: Callable
    float: Callable
    seedable: bool
    minifloat: Callable = None
    mx: Callable = None
    nvfp4: Callable = None
    counter_based: bool = False
    block_sizes: bool = True
    round_many: Callable = None
    step_tensor: bool = False

    def supports(self, number_format):
        if getattr(self, number_format.kernel) is None:
            return False
        return self.block_sizes or not getattr(number_format, "block_size", None)


TORCH_BACKEND = Backend("torch", torch_kernels.block_quantize, torch_kernels.fixed_point_quantize,
                        torch_kernels.float_quantize, seedable=True, minifloat=torch_kernels.minifloat_quantize,
                        mx=torch_kernels.mx_quantize, nvfp4=torch_kernels.nvfp4_quantize)


def _rounded_batch(tensors, format_key, rounding, seed, identity, step, domain, constants):
    """The round_batch operator: each tensor rounded (out of place) by the
    torch kernels, in the format `formats.made(format_key)`, with the noise
    of key (seed, identity, step, domain; seed -1: no noise) over their
    concatenation (element j of tensor i at index j + the elements of the
    tensors before it), as the triton backend numbers a batch (words as
    `splitmix.operator_words` gives them)."""
    number_format = formats.made(format_key)
    counts = [formats.draws(number_format, tensor) for tensor in tensors]
    if seed >= 0:
        words = splitmix.counter_words((identity, step, domain), constants)
        drawn = splitmix.random_bits(torch.arange(sum(counts), dtype=torch.int64, device=tensors[0].device),
                                     seed, *words)
    rounded, offset = [], 0
    with torch_kernels.traceable():
        for tensor, count in zip(tensors, counts):
            noise = None if seed < 0 else NoiseKey(seed, *words, offset=offset, words=drawn[offset:offset + count])
            rounded.append(number_format.quantize(tensor, rounding, TORCH_BACKEND, noise))
            offset += count
    return rounded


operators.define("round_batch(Tensor[] tensors, str format, str rounding, int seed, Tensor? identity, "
                 "Tensor? step, Tensor? domain, int[3] constants) -> Tensor[]", _rounded_batch)


def _round_batch(tensors, number_format, rounding, key=None, out=None):
    """The compiled backend's batch: each tensor rounded into itself (or into
    out's), the same bits as the triton backend's batch, by one operator,
    `torch.ops.swalp.round_batch` (see `operators`): Dynamo records
    a batch as one call instead of tracing each tensor's rounding (PreResNet20's
    weights and gradients: 1.9 s instead of 6.0 s on one thread), and
    AOTAutograd expands it for Inductor, one draw for the whole batch. The
    format goes in by its key (`formats.key`), the same in every process,
    so that a compiled graph on disk serves the next run too."""
    words, constants = splitmix.operator_words(*((0, 0, 0) if key is None else (key.identity, key.step, key.domain)))
    rounded = operators.call("round_batch", list(tensors), formats.key(number_format), rounding,
                             -1 if key is None else key.seed & splitmix.SEED_MASK, *words, constants)
    # One foreach copy, not a copy_ per tensor: on some batches (a nonzero
    # stream, or a draw fused into each tensor's rounding) Inductor's C++
    # generator (torch 2.14) fails on those copies into graph inputs (a
    # KeyError in its outer-loop fusion).
    torch._foreach_copy_(list(tensors if out is None else out), rounded)


# The torch kernels with counter-based noise, for code compiled by torch.compile.
COMPILED_BACKEND = TORCH_BACKEND._replace(name="compiled", counter_based=True, round_many=_round_batch,
                                          step_tensor=True)


class BackendUnavailable(RuntimeError):
    """A backend's kernels could not be compiled or loaded; the message says why."""


class UnsupportedFormat(ValueError):
    """A backend cannot round a number format."""


def load_qtorch_backend():
    """qtorch's C++/CUDA kernels, compiled on first import (about 30 s).

    Imported only when chosen. qtorch's block and float kernels draw their
    noise from a generator seeded by the operating system, so the generator
    argument is ignored.
    """
    try:
        from qtorch.quant import block_quantize, fixed_point_quantize, float_quantize
    except Exception as error:  # a failed build raises anything from ImportError to CalledProcessError
        raise BackendUnavailable(first_line(error)) from None

    def block(x, wl, dim=-1, rounding="stochastic", generator=None, inplace=False):
        return block_quantize(x, wl, dim, rounding)

    def fixed(x, wl, fl, clamp=True, symmetric=False, rounding="stochastic", generator=None):
        return fixed_point_quantize(x, wl, fl, clamp, symmetric, rounding)

    def floating(x, exp, man, rounding="stochastic", generator=None):
        return float_quantize(x, exp, man, rounding)

    return Backend("qtorch", block, fixed, floating, seedable=False)


def load_triton_backend(device, number_formats=(), rounding="nearest"):
    """Our Triton kernels (triton_kernels), imported only when chosen and
    compiled here for `device`, every kernel family and mode the run's
    `number_formats` need with `rounding`, so that a backend that cannot run
    fails now with one line rather than in the middle of a step."""
    try:
        from swalp.quant import triton_kernels
    except Exception as error:  # triton missing, or broken beyond import
        raise BackendUnavailable(f"Triton cannot be imported ({first_line(error)})") from None
    reason = triton_kernels.available(device)
    if reason:
        raise BackendUnavailable(reason)
    backend = Backend("triton", triton_kernels.block_quantize, triton_kernels.fixed_point_quantize,
                      triton_kernels.float_quantize, seedable=True, counter_based=True, block_sizes=False,
                      round_many=triton_kernels.round_many)
    try:
        triton_kernels.compile_for(device, backend, [f for f in number_formats if backend.supports(f)], rounding)
    except Exception as error:  # a compiler or driver failure can raise anything
        raise BackendUnavailable(f"Triton's kernels failed to compile ({first_line(error)})") from None
    return backend


def choose_backend(name, device, number_formats=(), rounding="nearest"):
    """The backend for `--quant-backend name` on `device`, and a note to print
    (or None). auto: our Triton kernels on a CUDA device when every kernel
    `number_formats` need with `rounding` compiles and runs there, the torch
    backend otherwise."""
    if name == "torch":
        return TORCH_BACKEND, None
    if name == "compiled":
        return COMPILED_BACKEND, None
    if name == "qtorch":
        return load_qtorch_backend(), None
    if name == "triton":
        return load_triton_backend(device, number_formats, rounding), None
    if name != "auto":
        raise ValueError(f"unknown backend {name!r}")
    if device.type != "cuda":
        return TORCH_BACKEND, None
    try:
        return load_triton_backend(device, number_formats, rounding), None
    except BackendUnavailable as error:
        return TORCH_BACKEND, f"the triton backend is unavailable ({error}); using the torch backend"


def select_backend(name: str = "auto", device="cpu", number_formats=(), rounding: str = "nearest") -> Backend:
    """The rounding kernels `name` picks on `device`: auto (our Triton
    kernels on a CUDA device when they compile, else torch), torch, compiled
    (the torch kernels with counter-based noise, for torch.compile), triton
    or qtorch. Raises BackendUnavailable (one line) when they cannot run.
    Give the formats and rounding to be used: the triton backend compiles and
    runs each of their kernels now, not in the middle of training.

    >>> select_backend("auto", "cpu").name
    'torch'
    """
    return choose_backend(name, torch.device(device), number_formats, rounding)[0]
