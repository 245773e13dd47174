"""Philox-4x32-10 in PyTorch integer operations: the triton backend's noise
without Triton.

`random_bits(offsets, key)` gives, for each element index, the first word
of Philox-4x32-10 with key = the run's seed and counter = (index, identity,
step, domain): exactly what the triton backend's kernels draw with
`tl.philox` (see `triton_kernels`). Everything is elementwise int64
arithmetic on values below 2^32, so it runs on any device, eagerly or under
`torch.compile`, where Inductor fuses it into the rounding around it; the
step (and the identity) may be tensors, so that a compiled graph serves
every step without recompiling.

torch has no public counter-based generator (its Philox serves only its
own CUDA kernels, offset by a global state), hence this one.

The draw is one operator, `torch.ops.swalp.philox_bits` (see `operators`):
Dynamo records it as one call instead of tracing its ~130 tensor operations
in Python bytecode (which took 0.4 s per draw, most of the time it took to
trace an 8-bit network).
"""

import torch

from swalp.quant import operators

ROUNDS = 10
# Philox-4x32's multipliers and Weyl key increments (Salmon et al., 2011), as Triton uses them.
MULTIPLIER_A, MULTIPLIER_B = 0xD2511F53, 0xCD9E8D57
KEY_STEP_A, KEY_STEP_B = 0x9E3779B9, 0xBB67AE85
WORD = 0xFFFFFFFF
SEED_MASK = (1 << 63) - 1  # the triton backend passes the seed as a signed 64-bit int


def _round_keys(seed):
    """The key words of each round for a 64-bit seed, as Python ints."""
    low, high = seed & WORD, (seed >> 32) & WORD
    keys = []
    for _ in range(ROUNDS):
        keys.append((low, high))
        low, high = (low + KEY_STEP_A) & WORD, (high + KEY_STEP_B) & WORD
    return keys


def _word(value, like):
    """A counter word (an int or an int tensor) as its unsigned 32 bits, an
    int64 tensor of `like`'s shape. An int goes in through full_like: added
    to a tensor as a symbolic int, Inductor (torch 2.14) computes in float."""
    if isinstance(value, torch.Tensor):
        return (value.to(torch.int64) & WORD).expand(like.shape)
    return torch.full_like(like, value & WORD)


def _multiply(constant, word):
    """(high, low) 32-bit halves of constant * word, both below 2^32. The
    64-bit product may pass 2^63, where int64 arithmetic wraps: its low 64
    bits are still exact, which is all the halves need."""
    product = word * constant
    return (product >> 32) & WORD, product & WORD


def operator_words(identity, step, domain):
    """Counter words as this package's operators take them: the words that
    are tensors (None for the others), and the others' 32 bits as ints (0
    for the tensors). Ints stay ints, not 0-dimensional tensors: their
    graphs are those torch 2.14's Inductor generates correct code for."""
    words = (identity, step, domain)
    return ([word if isinstance(word, torch.Tensor) else None for word in words],
            [0 if isinstance(word, torch.Tensor) else word & WORD for word in words])


def counter_words(tensors, constants):
    """operator_words' inverse: each word, its tensor or else its int."""
    return [constant if tensor is None else tensor for tensor, constant in zip(tensors, constants)]


def _philox_bits(offsets, seed, identity, step, domain, constants):
    """The operator's implementation (words as `operator_words` gives them)."""
    c0 = offsets.to(torch.int64)
    c1, c2, c3 = (_word(word, c0) for word in counter_words((identity, step, domain), constants))
    for key_low, key_high in _round_keys(seed):
        high_b, low_b = _multiply(MULTIPLIER_B, c2)
        high_a, low_a = _multiply(MULTIPLIER_A, c0)
        c0, c1, c2, c3 = high_b ^ c1 ^ key_low, low_b, high_a ^ c3 ^ key_high, low_a
    return c0


operators.define("philox_bits(Tensor offsets, int seed, Tensor? identity, Tensor? step, Tensor? domain, "
                 "int[3] constants) -> Tensor", _philox_bits)


def random_bits(offsets, seed, identity, step, domain):
    """Philox-4x32-10's first output word (int64 holding 32 bits) for each
    element of `offsets` (int64 element indices below 2^31), key `seed`
    (taken modulo 2^63, as the triton backend passes it), counter words
    (offset, identity, step, domain): ints or tensors broadcastable to
    `offsets`."""
    tensors, constants = operator_words(identity, step, domain)
    return torch.ops.swalp.philox_bits(offsets, seed & SEED_MASK, *tensors, constants)
