"""Seeds derived from coordinates: (run seed, epoch, step, index, ...).

Randomness that must not depend on execution order (the augmentation of one
sample, the crops of one batch, the optimizer's rounding noise at one step)
comes from a generator seeded with `mix_seed` of its coordinates.
"""

_MASK = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """A 63-bit seed from non-negative integers: splitmix64 folded over them,
    so nearby coordinates give unrelated seeds and every bit is used (the CPU
    generator keeps only the low 32 bits of its seed).

    >>> mix_seed(1, 0) != mix_seed(1, 1)
    True
    """
    state = 0
    for value in values:
        state = (state + 0x9E3779B97F4A7C15 + value) & _MASK
        state = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        state = ((state ^ (state >> 27)) * 0x94D049BB133111EB) & _MASK
        state ^= state >> 31
    return state >> 1
