"""Repeatable randomness: seeds derived from (run seed, epoch, step, index, ...).

Randomness that must not depend on execution order (the augmentation of one
sample, the optimizer's rounding noise at one step) comes from a generator
seeded with `mix_seed` of its coordinates, or from counter-based noise keyed
by a `NoiseKey`. `use_deterministic_algorithms` removes the other source of
run-to-run differences on a GPU: kernels whose results depend on scheduling.
"""

import os
from typing import NamedTuple

import torch

_MASK = (1 << 64) - 1


class NoiseKey(NamedTuple):
    """What selects the random bits of one counter-based rounding, besides
    each element's index: the run's seed, what is rounded (`identity`), at
    which optimizer step, and in which stream (`domain`: quantization's
    stream number plus 4 times the data-parallel rank where it differs)."""

    seed: int
    identity: int
    step: int
    domain: int


def mix_seed(*values):
    """A 63-bit seed from non-negative integers: splitmix64 folded over them,
    so nearby coordinates give unrelated seeds and every bit is used (the CPU
    generator keeps only the low 32 bits of its seed)."""
    state = 0
    for value in values:
        state = (state + 0x9E3779B97F4A7C15 + value) & _MASK
        state = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        state = ((state ^ (state >> 27)) * 0x94D049BB133111EB) & _MASK
        state ^= state >> 31
    return state >> 1


def use_deterministic_algorithms():
    """Deterministic kernels only (PyTorch's flag, cuDNN's, no cuDNN
    autotuning, and the fixed cuBLAS workspace that deterministic cuBLAS
    needs). An operation without a deterministic CUDA kernel warns instead of
    stopping the run. The CPU kernels used here are deterministic already."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
