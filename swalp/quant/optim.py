"""The optimizer wrapper: qtorch's OptimLP with seeded, counter-based noise.

Weights, gradients, momentum buffers and an optional gradient accumulator
are rounded around each step in OptimLP's order; the noise is a function of
(seed, step) alone, so data-parallel replicas round alike and a run resumes
exactly from the step. Each parameter may have formats of its own (per-layer
rules, `swalp.quant.layers`).
"""

import contextlib
from typing import Optional, Sequence, Union

import torch

from swalp.quant.backends import Backend
from swalp.quant.layers import formats_for, layer_names
from swalp.quant.noise import StepNoise
from swalp.quant.quantizer import quantizer_maker

# The counter-based noise's identity of each kind's batch (8 apart for each
# further group of the kind that shares another quantizer).
IDENTITIES = {"weight": 0, "grad": 1, "momentum": 2, "acc": 3, "moment2": 4}
# The optimizer state each kind rounds: SGD's momentum buffer, AdamW's moments.
STATE_KINDS = {"momentum_buffer": "momentum", "exp_avg": "momentum", "exp_avg_sq": "moment2"}


class SeededOptimLP:
    """An optimizer (SGD or AdamW) whose weights, gradients, momentum buffers
    (AdamW: first and second moments) and accumulators are rounded as
    qtorch's OptimLP rounds them: each gradient before the step; then, where
    a parameter has an accumulator (a low-precision copy of the weights that
    the step updates), the accumulator, and the weights rounded from it;
    else the weights; then the momentum buffers or moments. AdamW's
    decoupled weight decay happens inside its step, on the unrounded
    update. `quantizers` maps each kind to {parameter: quantizer or None}.
    The noise's step advances with every step.

    On a backend with batched kernels all tensors of a kind that share a
    quantizer are rounded together, a few launches per kind instead of a few
    per tensor; elsewhere one tensor at a time, in parameter order."""

    def __init__(self, optim, noise, quantizers, compiler="inductor"):
        self.optim, self.noise, self.quantizers = optim, noise, quantizers
        self.weight_acc = {p: p.detach().clone() for p, quant in quantizers["acc"].items() if quant is not None}
        if self.compiled and compiler is not None:
            # One graph before the step and one after, each rounding every
            # kind: Inductor fuses each tensor's rounding, and the step is a
            # tensor input, so the graphs serve every step.
            self._round_gradients = compile_rounding(self._round_gradients, compiler)
            self._round_state = compile_rounding(self._round_state, compiler)

    @property
    def param_groups(self):
        return self.optim.param_groups

    @property
    def params(self):
        return [p for group in self.optim.param_groups for p in group["params"]]

    def zero_grad(self, set_to_none=True):
        self.optim.zero_grad(set_to_none=set_to_none)

    def _round(self, kind, pairs, out=None):
        """Round each (parameter, tensor) pair's tensor with the parameter's
        `kind` quantizer, in place, or into out[parameter] when given."""
        groups = {}
        for p, tensor in pairs:
            quant = self.quantizers[kind].get(p)
            if quant is None:
                continue
            if quant.backend.round_many is None:
                rounded = quant(tensor)
                (out[p] if out is not None else tensor).copy_(rounded)
            else:
                groups.setdefault(id(quant), (quant, []))[1].append((p, tensor))
        for index, (quant, members) in enumerate(groups.values()):
            quant.round_many([tensor for _, tensor in members], identity=IDENTITIES[kind] + 8 * index,
                             out=None if out is None else [out[p] for p, _ in members])

    def step(self, closure=None):
        with_grad = [p for p in self.params if p.grad is not None]
        # The tensors go in as arguments: a compiled function that found them
        # through the parameters would recompile whenever a gradient is freed.
        self._round_gradients(with_grad, [p.grad for p in with_grad])
        for p, accumulator in self.weight_acc.items():
            p.data = accumulator.data
        loss = self.optim.step(closure)
        rounded = {p: torch.empty_like(p) for p in self.weight_acc if self.quantizers["weight"].get(p) is not None}
        self._round_state(rounded, self._state_buffers(with_grad))
        for p, weight in rounded.items():  # the weights are a rounded copy of the accumulators, which stay
            p.data = weight
        self.noise.advance()
        return loss

    def _round_gradients(self, params, grads):
        self._round("grad", list(zip(params, grads)))

    def _state_buffers(self, with_grad):
        """(kind, parameter, tensor) of each momentum buffer or moment to round."""
        stepped = set(with_grad)
        buffers = []
        for group in self.optim.param_groups:
            if isinstance(self.optim, torch.optim.SGD) and group["momentum"] == 0:
                continue
            for p in group["params"]:
                if p in stepped:
                    state = self.optim.state[p]
                    buffers += [(kind, p, state[key]) for key, kind in STATE_KINDS.items() if key in state]
        return buffers

    def _round_state(self, rounded, buffers):
        """After the step: the accumulators, the weights (those with an
        accumulator into `rounded`), then the momentum buffers or moments."""
        self._round("acc", list(self.weight_acc.items()))
        self._round("weight", [(p, p.data) for p in self.params if p not in self.weight_acc])
        self._round("weight", [(p, self.weight_acc[p]) for p in rounded], out=rounded)
        for kind in ("momentum", "moment2"):
            self._round(kind, [(p, tensor) for buffer_kind, p, tensor in buffers if buffer_kind == kind])

    @property
    def compiled(self):
        """Whether its rounding runs compiled (the compiled backend)."""
        return any(quant is not None and quant.backend.step_tensor
                   for by_param in self.quantizers.values() for quant in by_param.values())

    @property
    def batched(self):
        return any(quant is not None and quant.backend.round_many is not None
                   for by_param in self.quantizers.values() for quant in by_param.values())

    def __repr__(self):
        return f"SeededOptimLP({self.optim!r})"


def compile_rounding(function, compiler="inductor"):
    """`function` under torch.compile (one whole graph, static shapes) with
    the torch.compile backend `compiler`, without gradients: rounding is
    never differentiated, and a graph of parameters (which require
    gradients) with them would be compiled for training, its forward
    and backward partitioned, and never written to the compile cache on
    disk (AOTAutograd writes a training graph once its backward compiles)."""
    compiled = torch.compile(function, fullgraph=True, dynamic=False, backend=compiler)

    def call(*args):
        with torch.no_grad(), _small_cpu_kernels() if compiler == "inductor" else contextlib.nullcontext():
            return compiled(*args)

    return call


@contextlib.contextmanager
def _small_cpu_kernels(arguments=24):
    """Inductor's C++ code generator puts consecutive elementwise work into
    one function until it takes 500 arguments: here the rounding of every
    tensor of a network, tens of thousands of lines, which gcc 12 fails to
    compile (an internal compiler error in loop unrolling). Meanwhile a
    function ends after `arguments`: a few tensors."""
    try:
        from torch._inductor.codegen.cpp import CppScheduling
        before = CppScheduling.MAX_FUSED_KERNEL_ARGS_NUM
    except (ImportError, AttributeError):  # another torch: its own limits
        yield
        return
    CppScheduling.MAX_FUSED_KERNEL_ARGS_NUM = min(before, arguments)
    try:
        yield
    finally:
        CppScheduling.MAX_FUSED_KERNEL_ARGS_NUM = before


def wrap_optimizer(optimizer: torch.optim.Optimizer, *, weight=None, grad=None, momentum=None, acc=None,
                   moment2=None, rounding: str = "stochastic", backend: Union[str, Backend] = "auto",
                   noise: Optional[StepNoise] = None, rules: Sequence = (), model: Optional[torch.nn.Module] = None,
                   fallback: Optional[Backend] = None, compiler: Optional[str] = "inductor") -> SeededOptimLP:
    """`optimizer` (SGD or AdamW) with its weights, gradients, momentum
    buffers (AdamW: first moments) and second moments (AdamW's `moment2`)
    and, with `acc`, a gradient accumulator rounded at every step.

    Each of `weight`, `grad`, `momentum`, `acc`, `moment2`: None (full precision; no
    accumulator), a spec ("bfp8", ...), a format object or a
    TensorQuantizer. `backend` as in `quantize_model`; a format it cannot
    compute runs on `fallback` (default: the torch backend under "auto").
    `rules` (`swalp.quant.layers.LayerRule`s, with the `model` the
    parameters belong to) give the parameters of the layers they name other
    formats. `noise` (default StepNoise(seed=0)) is advanced by every step;
    give the same StepNoise to `quantize_model`, and save `wrapped.noise.step`
    with a checkpoint (`noise.seek(step)` on resume) together with
    `wrapped.optim.state_dict()` and the accumulators `wrapped.weight_acc`.
    On the compiled backend its rounding before and after each step runs
    under torch.compile with the backend `compiler` ("aot_eager" traces the
    same graphs without generating code; None: eagerly, the same bits).

    >>> net = torch.nn.Linear(4, 2)
    >>> sgd = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    >>> optimizer = wrap_optimizer(sgd, weight="bfp8", grad="bfp8", momentum="bfp8", backend="torch")
    """
    noise = noise if noise is not None else StepNoise(seed=0)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    defaults = {"weight": weight, "grad": grad, "momentum": momentum, "acc": acc, "moment2": moment2}
    owner = {}
    if rules:
        if model is None:
            raise ValueError("per-layer rules need the model whose parameters the optimizer steps")
        owner = {id(p): name.rpartition(".")[0] for name, p in model.named_parameters()}
    layers = layer_names(model) if rules else []
    per_param = {id(p): formats_for(owner.get(id(p), ""), defaults, rules, layers) for p in params}
    values = [value for chosen in per_param.values() for value in chosen.values()]
    quantizer = quantizer_maker(values, backend, params[0].device if params else "cpu", rounding, noise, fallback,
                                optimizer=True)
    quantizers = {kind: {p: quantizer(per_param[id(p)][kind]) for p in params} for kind in IDENTITIES}
    return SeededOptimLP(optimizer, noise, quantizers, compiler)
