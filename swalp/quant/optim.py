"""The optimizer wrapper: qtorch's OptimLP with seeded, counter-based noise.

Weights, gradients, momentum buffers and an optional gradient accumulator
are rounded around each step in OptimLP's order; the noise is a function of
(seed, step) alone, so data-parallel replicas round alike and a run resumes
exactly from the step.
"""

from typing import Optional, Union

import torch
from qtorch.optim import OptimLP

from swalp.quant.backends import TORCH_BACKEND, Backend
from swalp.quant.noise import StepNoise
from swalp.quant.quantizer import as_quantizer, backend_for


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


def wrap_optimizer(optimizer: torch.optim.Optimizer, *, weight=None, grad=None, momentum=None, acc=None,
                   rounding: str = "stochastic", backend: Union[str, Backend] = "auto",
                   noise: Optional[StepNoise] = None) -> SeededOptimLP:
    """`optimizer` (SGD) with its weights, gradients, momentum buffers and,
    with `acc`, a gradient accumulator rounded at every step.

    Each of `weight`, `grad`, `momentum`, `acc`: None (full precision; no
    accumulator), a spec ("bfp8", ...), a format object or a
    TensorQuantizer. `backend` as in `quantize_model`. `noise` (default
    StepNoise(seed=0)) is advanced by every step; give the same StepNoise to
    `quantize_model`, and save `wrapped.noise.step` with a checkpoint
    (`noise.seek(step)` on resume) together with `wrapped.optim.state_dict()`
    and, with an accumulator, `wrapped.weight_acc`.

    >>> net = torch.nn.Linear(4, 2)
    >>> sgd = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    >>> optimizer = wrap_optimizer(sgd, weight="bfp8", grad="bfp8", momentum="bfp8", backend="torch")
    """
    noise = noise if noise is not None else StepNoise(seed=0)
    parameter = next((p for group in optimizer.param_groups for p in group["params"]), None)
    chosen_backend = backend_for(backend, parameter.device if parameter is not None else "cpu",
                                 (weight, grad, momentum, acc), rounding)
    fallback = TORCH_BACKEND if backend == "auto" else None
    quantizers = {f"{kind}_quant": as_quantizer(value, rounding, chosen_backend, noise, fallback, optimizer=True)
                  for kind, value in (("weight", weight), ("grad", grad), ("momentum", momentum), ("acc", acc))}
    return SeededOptimLP(optimizer, noise, **quantizers)
