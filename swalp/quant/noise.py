"""The noise of stochastic rounding as a function of (seed, step).

A `NoiseKey` selects the random bits of one counter-based rounding (the
triton backend's); `StepNoise` hands out keys, or for the torch backend
torch generators reseeded from (seed, step), so that every process starting
from the same seed and step draws the same noise: data-parallel replicas
round their weights, gradients, momenta and accumulators alike without
communicating, and a resumed run needs only the step.
"""

from typing import NamedTuple

import torch

from swalp.seeds import mix_seed


class NoiseKey(NamedTuple):
    """What selects the random bits of one counter-based rounding, besides
    each element's index: the run's seed, what is rounded (`identity`), at
    which optimizer step, and in which stream (`domain`: the stream number
    plus 4 times the data-parallel rank where it differs). `step` is an int,
    or for the compiled backend a tensor holding it (a compiled graph then
    serves every step). `offset` is the counter index of the tensor's first
    element: its position in a batch's concatenation (0 on its own).
    `words`, where given, are the tensor's bits, drawn with the rest of its
    batch in one go (one draw per batch, not per tensor)."""

    seed: int
    identity: int
    step: object
    domain: int
    offset: int = 0
    words: object = None


# Noise streams of a counter-based backend: the optimizer's (shared by all
# data-parallel ranks), and per rank the forward pass of a training step,
# its backward pass, and forward passes without gradients (evaluation,
# BatchNorm statistics), of which a step may hold many.
OPTIMIZER_STREAM, FORWARD_STREAM, BACKWARD_STREAM, NO_GRAD_STREAM = range(4)
SITE_BITS = 12  # identity = site + (no-grad call within the step << SITE_BITS)


class StepNoise:
    """The noise of stochastic rounding as a function of (seed, step).

    Share one between the model's quantizers and the optimizer wrapper: the
    optimizer's step advances it.

    >>> noise = StepNoise(seed=1)
    >>> noise.key(identity=0, stream=OPTIMIZER_STREAM)
    NoiseKey(seed=1, identity=0, step=0, domain=0, offset=0, words=None)

    For the torch backend: generators for the optimizer's rounding, reseeded
    from (seed, step) at every optimizer step. For a counter-based backend:
    NoiseKeys (seed, identity, step, stream and rank) for every rounding,
    activations and errors included. Every process that starts from the same
    seed and step draws the same noise, so data-parallel replicas round their
    weights, gradients, momenta and accumulators identically without
    communicating, and a resumed run needs only the step.
    """

    def __init__(self, seed: int, step: int = 0, rank: int = 0):
        self.seed = seed
        self.step = step
        self.rank = rank
        self._generators = {}
        self._no_grad_calls = {}
        self._step_tensors = {}
        self._no_grad_counts = {}

    def _reseed(self, generator):
        generator.manual_seed(mix_seed(self.seed, self.step))

    def seek(self, step):
        self.step = step
        self._no_grad_calls.clear()
        for generator in self._generators.values():
            self._reseed(generator)
        for tensor in self._step_tensors.values():
            tensor.fill_(step)  # on a GPU a launch, not a sync
        for tensor in self._no_grad_counts.values():
            tensor.zero_()

    def step_tensor(self, device):
        """The step as a 0-dimensional int64 tensor on `device`, kept current
        by `seek`: what compiled code reads, so that the step is a graph input
        rather than a constant that would recompile the graph at every step."""
        device = torch.device(device)
        if device not in self._step_tensors:
            self._step_tensors[device] = torch.tensor(self.step, dtype=torch.int64, device=device)
            self._no_grad_counts[device] = torch.zeros((), dtype=torch.int64, device=device)
        return self._step_tensors[device]

    def key(self, identity, stream, step=None):
        """The NoiseKey of one rounding. The optimizer's stream is the same on
        every rank; the others add the rank. Forward passes without gradients
        are counted per site since the last step, so each draws anew; the
        count restarts at every step, so a run resumed at a step boundary
        continues it exactly. `step` (a tensor from `step_tensor`) stands in
        for the current step; then passes without gradients are counted, by
        all sites together, in a tensor too."""
        if stream == NO_GRAD_STREAM and isinstance(step, torch.Tensor):
            count = self._no_grad_counts[step.device]
            identity = count * (1 << SITE_BITS) + identity
            count.add_(1)
        elif stream == NO_GRAD_STREAM:
            call = self._no_grad_calls.get(identity, 0)
            self._no_grad_calls[identity] = call + 1
            identity += call << SITE_BITS
        rank = 0 if stream == OPTIMIZER_STREAM else self.rank
        return NoiseKey(self.seed, identity, self.step if step is None else step, stream + (rank << 2))

    def advance(self):
        self.seek(self.step + 1)

    def generator(self, device):
        if device not in self._generators:
            generator = self._generators[device] = torch.Generator(device=device)
            self._reseed(generator)
        return self._generators[device]
