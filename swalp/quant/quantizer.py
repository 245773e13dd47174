"""Low precision as a wrapper around a full-precision network.

`TensorQuantizer` turns a format, a rounding mode and a backend into a
tensor -> tensor function; `Quantizer` is the autograd module (forward
format for activations, backward format for errors) that `quantize_model`
hangs after the layers a placement rule picks; `build_quantizers` makes one
quantizer per number kind for a run.

qtorch's own `Quantizer` cannot express the small-block and block-dim layouts
or take a generator, and qtorch maps a word length of -1 to garbage instead
of full precision, so the module here is our own.
"""

from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn as nn

from swalp.quant import specs
from swalp.quant.backends import TORCH_BACKEND, Backend, UnsupportedFormat, choose_backend
from swalp.quant.kinds import NUMBER_KINDS, OPTIMIZER_KINDS, ROUNDINGS
from swalp.quant.layers import formats_for, layer_names
from swalp.quant.noise import BACKWARD_STREAM, FORWARD_STREAM, NO_GRAD_STREAM, OPTIMIZER_STREAM, SITE_BITS, StepNoise

# What the default placement rule puts quantizers after (all but the last such layer).
SITE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class TensorQuantizer:
    """A tensor -> tensor rounding function for one format, rounding mode and
    backend. With `noise`, stochastic rounding draws from its per-step
    generators (or, on a counter-based backend, its keys); otherwise from
    torch's default generator of the device.

    >>> round8 = TensorQuantizer("bfp8", "nearest")
    >>> round8(torch.tensor([[1.0, 0.3]]))
    tensor([[1.0000, 0.2969]])
    """

    def __init__(self, number_format, rounding: str = "stochastic", backend: Backend = TORCH_BACKEND,
                 noise: Optional[StepNoise] = None):
        if isinstance(number_format, str):
            number_format = specs.parse(number_format)
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
            step = self.noise.step_tensor(device) if self.backend.step_tensor else None
            return self.noise.key(identity, stream, step)
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

    >>> x = torch.randn(4, 8, requires_grad=True)
    >>> y = Quantizer(TensorQuantizer("bfp8"), TensorQuantizer("bfp8"))(x)  # y rounded, x.grad too
    """

    def __init__(self, forward_quant: Optional[Callable] = None, backward_quant: Optional[Callable] = None,
                 inplace: bool = False, site: int = 0):
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
        # Compiled, rounding in place saves nothing (Inductor fuses it) and
        # Dynamo cannot trace a custom Function that marks its input dirty.
        inplace = self.inplace and not torch.compiler.is_compiling()
        return _Round.apply(x, self.forward_quant, self.backward_quant, inplace, self.site, stream)

    def extra_repr(self):
        return (f"forward={self.forward_quant}, backward={self.backward_quant}, inplace={self.inplace}, "
                f"site={self.site}")


def _quantize_output(module, inputs, output):
    return module.quantizer(output)


def as_quantizer(value, rounding, backend, noise, fallback=None, optimizer=False):
    """`value` (None, a spec, a format, a TensorQuantizer or any function
    with its call signature) as such a function or None, on `backend` (a Backend, or a function of no
    arguments that returns one, called only when a format needs it); a
    format the backend cannot compute runs on `fallback`, or raises
    UnsupportedFormat without one. The optimizer's quantizers draw from
    `noise` always, activations and errors only on a counter-based backend
    (on the torch backend from torch's default generators)."""
    if value is None or callable(value):
        return value
    number_format = specs.parse(value) if isinstance(value, str) else value
    if number_format is None:
        return None
    chosen = backend if isinstance(backend, Backend) else backend()
    if not chosen.supports(number_format):
        if fallback is None:
            raise UnsupportedFormat(f"the {chosen.name} backend cannot compute {number_format.spec}")
        chosen = fallback
    keyed = optimizer or chosen.counter_based
    return TensorQuantizer(number_format, rounding, chosen, noise if keyed else None)


def backend_for(backend, device, values=(), rounding="nearest"):
    """A function returning the Backend `backend` names (a Backend, or auto,
    torch, triton, qtorch) for `device`, chosen on first call with the
    formats among `values` (specs or formats) that it will round."""
    if isinstance(backend, Backend):
        return backend
    chosen = []

    def load():
        if not chosen:
            needed = [specs.parse(value) if isinstance(value, str) else value for value in values
                      if value is not None and not callable(value)]
            formats = [number_format for number_format in needed if number_format is not None]
            chosen.append(choose_backend(backend, torch.device(device), formats, rounding)[0])
        return chosen[0]

    return load


def quantizer_maker(values, backend, device, rounding, noise, fallback=None, optimizer=False):
    """A function from each of `values` (as `as_quantizer` takes them) to its
    quantizer, one quantizer per distinct value, on the backend chosen for
    all of them; `fallback` defaults to the torch backend under "auto".
    Makes the noise's step a tensor now where the backend compiles: made
    while a graph is traced, it would cost a recompilation."""
    chosen_backend = backend_for(backend, device, values, rounding)
    fallback = fallback if fallback is not None else (TORCH_BACKEND if backend == "auto" else None)
    if noise is not None and (backend == "compiled" or getattr(chosen_backend, "step_tensor", False)):
        noise.step_tensor(device)
    made = {}

    def quantizer(value):
        key = id(value) if callable(value) else value
        if key not in made:
            made[key] = as_quantizer(value, rounding, chosen_backend, noise, fallback, optimizer=optimizer)
        return made[key]

    return quantizer


def _site_names(model, sites):
    """(name, module) of each site: sites given as modules, qualified names or module types."""
    named = list(model.named_modules())
    if sites is None:
        if hasattr(model, "quantizer_sites"):
            sites = model.quantizer_sites("layer")
        else:  # the seed's rule: every layer of these types but the last, whose logits stay in full precision
            sites = [module for _, module in named if isinstance(module, SITE_TYPES)][:-1]
    elif isinstance(sites, type) or (isinstance(sites, tuple) and all(isinstance(s, type) for s in sites)):
        sites = [module for _, module in named if isinstance(module, sites)]
    names = {id(module): name for name, module in named}
    by_name = dict(named)
    chosen = []
    for site in sites:
        if isinstance(site, str):
            if site not in by_name:
                raise ValueError(f"{type(model).__name__} has no module named {site!r}")
            chosen.append((site, by_name[site]))
        elif id(site) in names:
            chosen.append((names[id(site)], site))
        else:
            raise ValueError(f"{site!r} is not a module of {type(model).__name__}")
    return chosen


def quantize_model(model: nn.Module, activate=None, error=None, *,
                   sites: Union[None, type, tuple, Sequence[Union[str, nn.Module]]] = None,
                   rounding: str = "stochastic", backend: Union[str, Backend] = "auto",
                   noise: Optional[StepNoise] = None, rules: Sequence = (),
                   fallback: Optional[Backend] = None) -> list:
    """Make any network low-precision: round the output of each site with
    `activate` in the forward pass and the gradient arriving there with
    `error` in the backward pass. Returns the qualified names of the sites
    that got a quantizer.

    `activate` and `error`: None (full precision), a spec ("bfp8", "mxfp8",
    ...), a format object or a TensorQuantizer (or a function with its call
    signature). `sites`: None picks the
    model's own `quantizer_sites("layer")` where it has one, else every
    convolution and linear layer but the last (the logits stay in full
    precision: the seed's rule); or module types (every module of them), or
    qualified names or modules. `rules` (`swalp.quant.layers.LayerRule`s)
    give the sites of the layers they name other formats. `backend`: a
    Backend or auto, torch, triton, qtorch (auto: triton on CUDA, else
    torch); a format it lacks runs on `fallback` (default: torch under
    auto). `noise`: the StepNoise shared with `wrap_optimizer`, needed for
    stochastic rounding on the triton backend.

    Each site gets the quantizer as a child module named `quantizer` and a
    forward hook, so parameter names, state_dict keys and parameter order
    stay those of the plain network (an `AveragedModel` copy taken before
    loads its state). Nothing is added where both are None.

    >>> net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    >>> quantize_model(net, "bfp8", "bfp8", backend="torch")
    ['0']
    """
    chosen = _site_names(model, sites)
    layers = layer_names(model) if rules else []
    per_site = [formats_for(name, {"activate": activate, "error": error}, rules, layers) for name, _ in chosen]
    values = [value for formats in per_site for value in formats.values()]
    if all(value is None for value in values):
        return []
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    quantizer, named = quantizer_maker(values, backend, device, rounding, noise, fallback), []
    for index, ((name, site), formats) in enumerate(zip(chosen, per_site)):
        activation_quant, error_quant = quantizer(formats["activate"]), quantizer(formats["error"])
        if activation_quant is None and error_quant is None:
            continue
        # Convolutions and linear layers keep their input, not their output,
        # for backward: rounding their output in place saves a copy.
        inplace = isinstance(site, SITE_TYPES)
        site.add_module("quantizer", Quantizer(activation_quant, error_quant, inplace, index))
        site.register_forward_hook(_quantize_output)
        named.append(name)
    return named


def build_quantizers(formats, rounding, backend=TORCH_BACKEND, noise=None, optimizer_backend=None, fallback=None):
    """One TensorQuantizer per number kind, None in full precision.

    `formats` maps each of NUMBER_KINDS to a format object or None. The
    optimizer's kinds run on `optimizer_backend` (default: `backend`) and
    draw their noise from `noise` (a StepNoise); activations and errors too on
    a counter-based backend, from torch's default generators otherwise. A
    format the backend cannot compute runs on `fallback`, or raises
    UnsupportedFormat without one.
    """
    return {kind: as_quantizer(formats.get(kind), rounding,
                               (optimizer_backend or backend) if kind in OPTIMIZER_KINDS else backend, noise,
                               fallback, optimizer=kind in OPTIMIZER_KINDS)
            for kind in NUMBER_KINDS}
