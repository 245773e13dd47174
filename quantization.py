"""Low precision as a wrapper around full-precision networks.

Number formats are small value objects; `TensorQuantizer` turns a format and a
rounding mode into a tensor -> tensor function; `Quantizer` is the autograd
module (forward format for activations, backward format for errors) that
`insert_quantizers` hangs after the layers a model names; `make_optimizer`
wraps SGD in qtorch's `OptimLP` with the weight, gradient, momentum and
accumulator quantizers.

qtorch's own `Quantizer` cannot express the original's small-block and
block-dim layouts, and qtorch maps a word length of -1 to garbage instead of
full precision, so the module here is our own; the rounding itself is qtorch's
kernel.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn

ROUNDINGS = ("stochastic", "nearest")
# Tensors with at most this many dimensions share one exponent ("small block").
SMALL_BLOCK_MAX_DIMS = {"None": 0, "FC": 1, "Conv": 2}
BLOCK_DIMS = ("B", "BC")
# Word lengths outside this range are not block floating point numbers qtorch can
# simulate in float32 (1 bit leaves only the sign); -1 means full precision.
MIN_WL, MAX_WL = 2, 32
NUMBER_KINDS = ("weight", "activate", "grad", "error", "momentum", "acc")


def load_block_kernel():
    """qtorch's block rounding kernel, compiled on first import.

    Imported here, not at module import, so full-precision runs never need a
    compiler.
    """
    from qtorch.quant import block_quantize

    return block_quantize


@dataclass(frozen=True)
class BlockFormat:
    """Block floating point with `wl` bits per number, sign included.

    By default every tensor is blocked along its first dimension (qtorch's
    `BlockFloatingPoint(wl, dim=0)`: per sample for activations, per output
    channel for weights, per element for 1-D tensors). `small_block` FC or Conv
    gives tensors of at most 1 or 2 dimensions one shared exponent;
    `block_dim` BC blocks along the first two dimensions instead of the first.
    """

    wl: int
    small_block: str = "None"
    block_dim: str = "B"

    def __post_init__(self):
        if not MIN_WL <= self.wl <= MAX_WL:
            raise ValueError(f"word length must be in [{MIN_WL}, {MAX_WL}], got {self.wl}")
        if self.small_block not in SMALL_BLOCK_MAX_DIMS:
            raise ValueError(f"small_block must be one of {list(SMALL_BLOCK_MAX_DIMS)}")
        if self.block_dim not in BLOCK_DIMS:
            raise ValueError(f"block_dim must be one of {list(BLOCK_DIMS)}")

    def __str__(self):
        return f"BlockFloatingPoint(wl={self.wl}, small_block={self.small_block}, block_dim={self.block_dim})"

    def quantize(self, x, rounding, kernel):
        if x.dim() <= SMALL_BLOCK_MAX_DIMS[self.small_block]:
            return kernel(x, self.wl, -1, rounding)
        if self.block_dim == "BC" and x.dim() >= 2:
            rows = x.reshape(x.shape[0] * x.shape[1], -1)
            return kernel(rows, self.wl, 0, rounding).view_as(x)
        return kernel(x, self.wl, 0, rounding)


class TensorQuantizer:
    """A tensor -> tensor rounding function for one format and rounding mode."""

    def __init__(self, number_format, rounding, kernel):
        if rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
        self.number_format = number_format
        self.rounding = rounding
        self.kernel = kernel

    def __call__(self, x):
        return self.number_format.quantize(x, self.rounding, self.kernel)

    def __repr__(self):
        return f"{self.number_format}, {self.rounding}"


class _Round(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, forward_quant, backward_quant):
        ctx.backward_quant = backward_quant
        # A new tensor either way: an in-place ReLU after an error-only
        # quantizer must not modify a view of the custom Function's input.
        return x.clone() if forward_quant is None else forward_quant(x)

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.backward_quant is None:
            return grad_output, None, None
        return ctx.backward_quant(grad_output), None, None


class Quantizer(nn.Module):
    """Rounds activations in the forward pass and errors in the backward pass.

    Either side may be None (identity). It holds no tensors, so wrapping a
    network leaves its state_dict unchanged.
    """

    def __init__(self, forward_quant=None, backward_quant=None):
        super().__init__()
        self.forward_quant = forward_quant
        self.backward_quant = backward_quant

    def forward(self, x):
        return _Round.apply(x, self.forward_quant, self.backward_quant)

    def extra_repr(self):
        return f"forward={self.forward_quant}, backward={self.backward_quant}"


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
        site.add_module("quantizer", Quantizer(activation_quant, error_quant))
        site.register_forward_hook(_quantize_output)
    return len(sites)


def build_quantizers(word_lengths, rounding, small_block="None", block_dim="B", kernel=None):
    """One TensorQuantizer per number kind, None where the word length is -1.

    `word_lengths` maps each of NUMBER_KINDS to an int. The kernel is loaded
    only when some kind is quantized.
    """
    quantizers = dict.fromkeys(NUMBER_KINDS)
    if all(word_lengths[kind] == -1 for kind in NUMBER_KINDS):
        return quantizers
    kernel = kernel or load_block_kernel()
    for kind in NUMBER_KINDS:
        if word_lengths[kind] != -1:
            number_format = BlockFormat(word_lengths[kind], small_block, block_dim)
            quantizers[kind] = TensorQuantizer(number_format, rounding, kernel)
    return quantizers


def make_optimizer(net, quantizers, lr, momentum, weight_decay):
    """SGD wrapped in qtorch's OptimLP: gradients are rounded before the step,
    the accumulator (if any) and the weights after it, then the momentum."""
    from qtorch.optim import OptimLP

    sgd = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    return OptimLP(
        sgd,
        weight_quant=quantizers["weight"],
        grad_quant=quantizers["grad"],
        momentum_quant=quantizers["momentum"],
        acc_quant=quantizers["acc"],
    )
