"""Low precision as a wrapper around full-precision networks.

Number formats are small value objects (`formats.py`); a `Backend` holds
the rounding kernels, ours (`torch_quant`, seedable, no compiler) or
qtorch's; `TensorQuantizer` turns a format, a rounding mode and a backend into a tensor -> tensor function;
`Quantizer` is the autograd module (forward format for activations, backward
format for errors) that `insert_quantizers` hangs after the layers a model
names; `make_optimizer` wraps SGD in qtorch's `OptimLP` with the weight,
gradient, momentum and accumulator quantizers, their noise reseeded at every
step so that data-parallel replicas round identically.

qtorch's own `Quantizer` cannot express the small-block and block-dim layouts
or take a generator, and qtorch maps a word length of -1 to garbage instead
of full precision, so the module here is our own.
"""

from typing import Callable, NamedTuple

import torch
import torch.nn as nn
from qtorch.optim import OptimLP

import formats
import torch_quant
from formats import BlockFormat
from seeding import mix_seed

ROUNDINGS = ("stochastic", "nearest")
NUMBER_KINDS = ("weight", "activate", "grad", "error", "momentum", "acc")
KIND_TAGS = {"weight": "W", "activate": "A", "grad": "G", "error": "E", "momentum": "M", "acc": "Acc"}
BACKENDS = ("auto", "torch", "qtorch")


def precision_tag(word_lengths, specs=None):
    """FP, or the formats that are set, e.g. W8A8G8E8M8Acc8 for block
    floating point word lengths, Wmxfp8e4m3Gfixed8.6 for format specs
    (`specs` maps kinds to a spec or None, which wins over a word length)."""
    specs = specs or {}
    tags = []
    for kind, wl in word_lengths.items():
        if specs.get(kind) is not None:
            tags.append(f"{KIND_TAGS[kind]}{formats.path_tag(specs[kind])}")
        elif wl != -1:
            tags.append(f"{KIND_TAGS[kind]}{wl}")
    return "".join(tags) if tags else "FP"


class Backend(NamedTuple):
    """Rounding kernels with torch_quant's signatures; `seedable` says whether
    their stochastic rounding follows torch's generators. A kernel a backend
    lacks is None: a format names the kernel it needs (its `kernel`)."""

    name: str
    block: Callable
    fixed: Callable
    float: Callable
    seedable: bool
    minifloat: Callable = None
    mx: Callable = None

    def supports(self, number_format):
        return getattr(self, number_format.kernel) is not None


TORCH_BACKEND = Backend("torch", torch_quant.block_quantize, torch_quant.fixed_point_quantize,
                        torch_quant.float_quantize, seedable=True, minifloat=torch_quant.minifloat_quantize,
                        mx=torch_quant.mx_quantize)


class UnsupportedFormat(ValueError):
    """A backend that has no kernel for a format."""


class BackendUnavailable(RuntimeError):
    """qtorch's kernels could not be compiled or loaded."""


def load_qtorch_backend():
    """qtorch's C++/CUDA kernels, compiled on first import (about 30 s).

    Imported only when chosen. qtorch's block and float kernels draw their
    noise from a generator seeded by the operating system, so the generator
    argument is ignored.
    """
    try:
        from qtorch.quant import block_quantize, fixed_point_quantize, float_quantize
    except Exception as error:  # a failed build raises anything from ImportError to CalledProcessError
        message = str(error).strip().splitlines()
        raise BackendUnavailable(message[0] if message else type(error).__name__) from None

    def block(x, wl, dim=-1, rounding="stochastic", generator=None, inplace=False):
        return block_quantize(x, wl, dim, rounding)

    def fixed(x, wl, fl, clamp=True, symmetric=False, rounding="stochastic", generator=None):
        return fixed_point_quantize(x, wl, fl, clamp, symmetric, rounding)

    def floating(x, exp, man, rounding="stochastic", generator=None):
        return float_quantize(x, exp, man, rounding)

    return Backend("qtorch", block, fixed, floating, seedable=False)


def select_backend(name, device):
    """The backend for `--quant-backend name` on `device`, and a note to print
    (or None). auto: qtorch's CUDA kernels on a CUDA device when they build,
    ours otherwise."""
    if name == "torch":
        return TORCH_BACKEND, None
    if name == "qtorch":
        return load_qtorch_backend(), None
    if name != "auto":
        raise ValueError(f"unknown backend {name!r}")
    if device.type != "cuda":
        return TORCH_BACKEND, None
    try:
        return load_qtorch_backend(), None
    except BackendUnavailable as error:
        return TORCH_BACKEND, f"qtorch's CUDA kernels did not build ({error}); using the torch backend"


class StepNoise:
    """Generators for the optimizer's stochastic rounding, reseeded from
    (seed, step) at every optimizer step.

    Every process that starts from the same seed and step draws the same
    noise in the same order, so data-parallel replicas round their weights,
    gradients, momenta and accumulators identically without communicating.
    """

    def __init__(self, seed, step=0):
        self.seed = seed
        self.step = step
        self._generators = {}

    def _reseed(self, generator):
        generator.manual_seed(mix_seed(self.seed, self.step))

    def seek(self, step):
        self.step = step
        for generator in self._generators.values():
            self._reseed(generator)

    def advance(self):
        self.seek(self.step + 1)

    def generator(self, device):
        if device not in self._generators:
            generator = self._generators[device] = torch.Generator(device=device)
            self._reseed(generator)
        return self._generators[device]


class TensorQuantizer:
    """A tensor -> tensor rounding function for one format, rounding mode and
    backend. With `noise`, stochastic rounding draws from its per-step
    generators; otherwise from torch's default generator of the device."""

    def __init__(self, number_format, rounding, backend=TORCH_BACKEND, noise=None):
        if rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
        self.number_format = number_format
        self.rounding = rounding
        self.backend = backend
        self.noise = noise

    def __call__(self, x, inplace=False):
        """The rounded tensor; with `inplace` x itself where the kernel can
        write into it (check `result is x`)."""
        generator = None if self.noise is None else self.noise.generator(x.device)
        return self.number_format.quantize(x, self.rounding, self.backend, generator, inplace=inplace)

    def __repr__(self):
        return f"{self.number_format}, {self.rounding}, {self.backend.name} backend"


class _Round(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, forward_quant, backward_quant, inplace):
        ctx.backward_quant = backward_quant
        if forward_quant is None:
            # A new tensor: an in-place ReLU after an error-only quantizer must
            # not modify a view of the custom Function's input.
            return x.clone()
        out = forward_quant(x, inplace=inplace)
        if out is x:
            ctx.mark_dirty(x)
        return out

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.backward_quant is None:
            return grad_output, None, None, None
        return ctx.backward_quant(grad_output), None, None, None


class Quantizer(nn.Module):
    """Rounds activations in the forward pass and errors in the backward pass.

    Either side may be None (identity). It holds no tensors, so wrapping a
    network leaves its state_dict unchanged.
    """

    def __init__(self, forward_quant=None, backward_quant=None, inplace=False):
        super().__init__()
        self.forward_quant = forward_quant
        self.backward_quant = backward_quant
        self.inplace = inplace

    def forward(self, x):
        return _Round.apply(x, self.forward_quant, self.backward_quant, self.inplace)

    def extra_repr(self):
        return f"forward={self.forward_quant}, backward={self.backward_quant}, inplace={self.inplace}"


def _quantize_output(module, inputs, output):
    return module.quantizer(output)


def insert_quantizers(net, activation_quant, error_quant, placement):
    """Put a `Quantizer` after each of `net.quantizer_sites(placement)`.

    Each site gets the quantizer as a child module named `quantizer` and a
    forward hook that applies it to the site's output, so parameter names,
    state_dict keys and parameter order stay those of the plain network (the
    SWA copy and checkpoints rely on that). Returns the number of sites; none
    are added when both quantizers are None.
    """
    if activation_quant is None and error_quant is None:
        return 0
    sites = net.quantizer_sites(placement)
    for site in sites:
        # Convolutions and linear layers keep their input, not their output,
        # for backward: rounding their output in place saves a copy.
        inplace = isinstance(site, (nn.Conv2d, nn.Linear))
        site.add_module("quantizer", Quantizer(activation_quant, error_quant, inplace))
        site.register_forward_hook(_quantize_output)
    return len(sites)


OPTIMIZER_KINDS = ("weight", "grad", "momentum", "acc")


def build_quantizers(word_lengths, rounding, small_block="None", block_dim="B",
                     backend=TORCH_BACKEND, noise=None, optimizer_backend=None, fallback=None):
    """One TensorQuantizer per number kind, None in full precision.

    `word_lengths` maps each of NUMBER_KINDS to a block floating point word
    length (-1: full precision, else laid out by `small_block` and
    `block_dim`) or to a format object (None: full precision). The
    optimizer's kinds run on `optimizer_backend` (default: `backend`) and
    draw their noise from `noise` (a StepNoise), activations and errors from
    torch's default generators. A format the backend has no kernel for runs
    on `fallback`, or raises UnsupportedFormat without one.
    """
    quantizers = dict.fromkeys(NUMBER_KINDS)
    for kind in NUMBER_KINDS:
        number_format = word_lengths[kind]
        if isinstance(number_format, int):
            number_format = None if number_format == -1 else BlockFormat(number_format, 0, small_block, block_dim)
        if number_format is None:
            continue
        chosen = (optimizer_backend or backend) if kind in OPTIMIZER_KINDS else backend
        if not chosen.supports(number_format):
            if fallback is None:
                raise UnsupportedFormat(f"the {chosen.name} backend cannot compute {number_format.spec} "
                                        f"(it has no {number_format.kernel} kernel)")
            chosen = fallback
        quantizers[kind] = TensorQuantizer(number_format, rounding, chosen, noise if kind in OPTIMIZER_KINDS else None)
    return quantizers


class SeededOptimLP(OptimLP):
    """qtorch's OptimLP whose quantizers' noise is reseeded at every step.

    OptimLP rounds each gradient before SGD's step, then the accumulator (if
    any), the weights and the momentum buffers after it.
    """

    def __init__(self, optim, noise, **quantizers):
        super().__init__(optim, **quantizers)
        self.noise = noise

    def step(self, closure=None):
        loss = super().step(closure)
        self.noise.advance()
        return loss


def make_optimizer(net, quantizers, lr, momentum, weight_decay, noise):
    """SGD wrapped in SeededOptimLP with the optimizer-side quantizers."""
    sgd = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    return SeededOptimLP(
        sgd,
        noise,
        weight_quant=quantizers["weight"],
        grad_quant=quantizers["grad"],
        momentum_quant=quantizers["momentum"],
        acc_quant=quantizers["acc"],
    )
