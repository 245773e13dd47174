"""Low precision as a wrapper around full-precision networks.

Number formats are small value objects (`formats.py`); a `Backend` holds
the rounding kernels: ours (`torch_quant`, seedable, no compiler;
`triton_quant`, fused and counter-based) or qtorch's; `TensorQuantizer`
turns a format, a rounding mode and a backend into a tensor -> tensor function;
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
from seeding import NoiseKey, mix_seed

ROUNDINGS = ("stochastic", "nearest")
NUMBER_KINDS = ("weight", "activate", "grad", "error", "momentum", "acc")
KIND_TAGS = {"weight": "W", "activate": "A", "grad": "G", "error": "E", "momentum": "M", "acc": "Acc"}
BACKENDS = ("auto", "torch", "triton", "qtorch")


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
    """Rounding kernels with torch_quant's signatures. A kernel a backend
    lacks is None: a format names the kernel it needs (its `kernel`).
    `seedable`: their stochastic rounding is repeatable; `counter_based`:
    their noise argument is a NoiseKey rather than a torch generator;
    `block_sizes`: their block kernel takes formats with a block size;
    `round_many`, where present, rounds a list of tensors in place with a
    handful of launches (see triton_quant.round_many)."""

    name: str
    block: Callable
    fixed: Callable
    float: Callable
    seedable: bool
    minifloat: Callable = None
    mx: Callable = None
    counter_based: bool = False
    block_sizes: bool = True
    round_many: Callable = None

    def supports(self, number_format):
        if getattr(self, number_format.kernel) is None:
            return False
        return self.block_sizes or not getattr(number_format, "block_size", None)


TORCH_BACKEND = Backend("torch", torch_quant.block_quantize, torch_quant.fixed_point_quantize,
                        torch_quant.float_quantize, seedable=True, minifloat=torch_quant.minifloat_quantize,
                        mx=torch_quant.mx_quantize)


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
        raise BackendUnavailable(_first_line(error)) from None

    def block(x, wl, dim=-1, rounding="stochastic", generator=None, inplace=False):
        return block_quantize(x, wl, dim, rounding)

    def fixed(x, wl, fl, clamp=True, symmetric=False, rounding="stochastic", generator=None):
        return fixed_point_quantize(x, wl, fl, clamp, symmetric, rounding)

    def floating(x, exp, man, rounding="stochastic", generator=None):
        return float_quantize(x, exp, man, rounding)

    return Backend("qtorch", block, fixed, floating, seedable=False)


def load_triton_backend(device):
    """Our Triton kernels (triton_quant), imported only when chosen and
    compiled here for `device` once, so that a backend that cannot run fails
    now with one line rather than in the middle of a step."""
    try:
        import triton_quant
    except Exception as error:  # triton missing, or broken beyond import
        raise BackendUnavailable(f"Triton cannot be imported ({_first_line(error)})") from None
    reason = triton_quant.available(device)
    if reason:
        raise BackendUnavailable(reason)
    try:
        triton_quant.compile_for(device)
    except Exception as error:  # a compiler or driver failure can raise anything
        raise BackendUnavailable(f"Triton's kernels failed to compile ({_first_line(error)})") from None
    return Backend("triton", triton_quant.block_quantize, triton_quant.fixed_point_quantize,
                   triton_quant.float_quantize, seedable=True, counter_based=True, block_sizes=False,
                   round_many=triton_quant.round_many)


def _first_line(error):
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def select_backend(name, device):
    """The backend for `--quant-backend name` on `device`, and a note to print
    (or None). auto: our Triton kernels on a CUDA device when they compile,
    the torch backend otherwise."""
    if name == "torch":
        return TORCH_BACKEND, None
    if name == "qtorch":
        return load_qtorch_backend(), None
    if name == "triton":
        return load_triton_backend(device), None
    if name != "auto":
        raise ValueError(f"unknown backend {name!r}")
    if device.type != "cuda":
        return TORCH_BACKEND, None
    try:
        return load_triton_backend(device), None
    except BackendUnavailable as error:
        return TORCH_BACKEND, f"the triton backend is unavailable ({error}); using the torch backend"


# Noise streams of a counter-based backend: the optimizer's (shared by all
# data-parallel ranks), and per rank the forward pass of a training step,
# its backward pass, and forward passes without gradients (evaluation,
# BatchNorm statistics), of which a step may hold many.
OPTIMIZER_STREAM, FORWARD_STREAM, BACKWARD_STREAM, NO_GRAD_STREAM = range(4)
SITE_BITS = 12  # identity = site + (no-grad call within the step << SITE_BITS)


class StepNoise:
    """The noise of stochastic rounding as a function of (seed, step).

    For the torch backend: generators for the optimizer's rounding, reseeded
    from (seed, step) at every optimizer step. For a counter-based backend:
    NoiseKeys (seed, identity, step, stream and rank) for every rounding,
    activations and errors included. Every process that starts from the same
    seed and step draws the same noise, so data-parallel replicas round their
    weights, gradients, momenta and accumulators identically without
    communicating, and a resumed run needs only the step.
    """

    def __init__(self, seed, step=0, rank=0):
        self.seed = seed
        self.step = step
        self.rank = rank
        self._generators = {}
        self._no_grad_calls = {}

    def _reseed(self, generator):
        generator.manual_seed(mix_seed(self.seed, self.step))

    def seek(self, step):
        self.step = step
        self._no_grad_calls.clear()
        for generator in self._generators.values():
            self._reseed(generator)

    def key(self, identity, stream):
        """The NoiseKey of one rounding. The optimizer's stream is the same on
        every rank; the others add the rank. Forward passes without gradients
        are counted per site since the last step, so each draws anew; the
        count restarts at every step, so a run resumed at a step boundary
        continues it exactly."""
        if stream == NO_GRAD_STREAM:
            call = self._no_grad_calls.get(identity, 0)
            self._no_grad_calls[identity] = call + 1
            identity += call << SITE_BITS
        rank = 0 if stream == OPTIMIZER_STREAM else self.rank
        return NoiseKey(self.seed, identity, self.step, stream + (rank << 2))

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
    generators (or, on a counter-based backend, its keys); otherwise from
    torch's default generator of the device."""

    def __init__(self, number_format, rounding, backend=TORCH_BACKEND, noise=None):
        if rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
        if not backend.supports(number_format):
            raise UnsupportedFormat(f"the {backend.name} backend cannot round {number_format}; "
                                    f"use a backend that can, e.g. --quant-backend torch")
        if backend.counter_based and rounding == "stochastic" and noise is None:
            raise ValueError(f"stochastic rounding on the {backend.name} backend needs a StepNoise")
        self.number_format = number_format
        self.rounding = rounding
        self.backend = backend
        self.noise = noise

    def _noise(self, device, identity, stream):
        if self.noise is None or self.rounding == "nearest":
            return None
        if self.backend.counter_based:
            return self.noise.key(identity, stream)
        return self.noise.generator(device)

    def __call__(self, x, inplace=False, identity=0, stream=OPTIMIZER_STREAM):
        """The rounded tensor; with `inplace` x itself where the kernel can
        write into it (check `result is x`). A counter-based backend draws
        the noise of (`identity`, `stream`) at the current step."""
        noise = self._noise(x.device, identity, stream)
        return self.number_format.quantize(x, self.rounding, self.backend, noise, inplace=inplace)

    def round_many(self, tensors, identity, out=None):
        """Round every tensor of the list into itself (or into `out`) with the
        backend's batched kernels (one tensor at a time on a backend without
        them, whose noise comes from generators)."""
        if self.backend.round_many is None:  # a fallback backend beside a batched one
            for index, tensor in enumerate(tensors):
                (tensor if out is None else out[index]).copy_(self(tensor, identity=identity))
            return
        noise = self._noise(tensors[0].device, identity, OPTIMIZER_STREAM) if tensors else None
        self.backend.round_many(tensors, self.number_format, self.rounding, noise, out)

    def __repr__(self):
        return f"{self.number_format}, {self.rounding}, {self.backend.name} backend"


class _Round(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, forward_quant, backward_quant, inplace, site, stream):
        ctx.backward_quant = backward_quant
        ctx.site = site
        if forward_quant is None:
            # A new tensor: an in-place ReLU after an error-only quantizer must
            # not modify a view of the custom Function's input.
            return x.clone()
        out = forward_quant(x, inplace=inplace, identity=site, stream=stream)
        if out is x:
            ctx.mark_dirty(x)
        return out

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.backward_quant is None:
            return grad_output, None, None, None, None, None
        return (ctx.backward_quant(grad_output, identity=ctx.site, stream=BACKWARD_STREAM),
                None, None, None, None, None)


class Quantizer(nn.Module):
    """Rounds activations in the forward pass and errors in the backward pass.

    Either side may be None (identity). It holds no tensors, so wrapping a
    network leaves its state_dict unchanged. `site` numbers it within the
    network: a counter-based backend draws each site's noise apart.
    """

    def __init__(self, forward_quant=None, backward_quant=None, inplace=False, site=0):
        super().__init__()
        if not 0 <= site < 1 << SITE_BITS:
            raise ValueError(f"site must be in [0, {1 << SITE_BITS}), got {site}")
        self.forward_quant = forward_quant
        self.backward_quant = backward_quant
        self.inplace = inplace
        self.site = site

    def forward(self, x):
        # Inside _Round.forward autograd is off: decide here whether this
        # pass trains (one per step) or only evaluates (any number).
        stream = FORWARD_STREAM if torch.is_grad_enabled() else NO_GRAD_STREAM
        return _Round.apply(x, self.forward_quant, self.backward_quant, self.inplace, self.site, stream)

    def extra_repr(self):
        return (f"forward={self.forward_quant}, backward={self.backward_quant}, inplace={self.inplace}, "
                f"site={self.site}")


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
    for index, site in enumerate(sites):
        # Convolutions and linear layers keep their input, not their output,
        # for backward: rounding their output in place saves a copy.
        inplace = isinstance(site, (nn.Conv2d, nn.Linear))
        site.add_module("quantizer", Quantizer(activation_quant, error_quant, inplace, index))
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
    draw their noise from `noise` (a StepNoise); activations and errors too on
    a counter-based backend, from torch's default generators otherwise. A
    format the backend cannot compute runs on `fallback`, or raises
    UnsupportedFormat without one.
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
                raise UnsupportedFormat(f"the {chosen.name} backend cannot compute {number_format.spec}")
            chosen = fallback
        keyed = kind in OPTIMIZER_KINDS or chosen.counter_based
        quantizers[kind] = TensorQuantizer(number_format, rounding, chosen, noise if keyed else None)
    return quantizers


class SeededOptimLP(OptimLP):
    """qtorch's OptimLP whose quantizers' noise is reseeded at every step.

    OptimLP rounds each gradient before SGD's step, then the accumulator (if
    any), the weights and the momentum buffers after it, one tensor at a
    time. On a backend with batched kernels the same steps round all tensors
    of a kind together: a few launches per kind instead of a few per tensor.
    """

    def __init__(self, optim, noise, **quantizers):
        super().__init__(optim, **quantizers)
        self.noise = noise
        self.batched = any(quant is not None and quant.backend.round_many is not None
                           for quant in (self.weight_quant, self.grad_quant, self.momentum_quant, self.acc_quant))

    def step(self, closure=None):
        loss = self._batched_step() if self.batched else super().step(closure)
        self.noise.advance()
        return loss

    def _batched_step(self):
        """OptimLP.step's roundings, in its order, each kind in one batch
        (the identities keep the kinds' noise apart)."""
        params = [p for group in self.param_groups for p in group["params"]]
        if self.grad_quant is not None:
            self.grad_quant.round_many([p.grad for p in params if p.grad is not None], identity=1)
        if self.acc_quant is not None:
            for p in params:
                p.data = self.weight_acc[p].data
        loss = self.optim.step()
        if self.acc_quant is not None:
            self.acc_quant.round_many([self.weight_acc[p] for p in params], identity=3)  # p.data is one of them
        if self.weight_quant is not None:
            if self.acc_quant is None:
                self.weight_quant.round_many([p.data for p in params], identity=0)
            else:  # the weights are a rounded copy of the accumulators, which stay
                rounded = [torch.empty_like(p) for p in params]
                self.weight_quant.round_many([self.weight_acc[p] for p in params], identity=0, out=rounded)
                for p, weight in zip(params, rounded):
                    p.data = weight
        if self.momentum_quant is not None:
            buffers = [self.optim.state[p][key] for group in self.param_groups
                       if not (isinstance(self.optim, torch.optim.SGD) and group["momentum"] == 0)
                       for p in group["params"] if p.grad is not None for key in self.momentum_keys]
            self.momentum_quant.round_many(buffers, identity=2)
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
