"""Counter-based random bits for stochastic rounding: keyed SplitMix64, in
PyTorch integer operations (here) and in Triton (`triton_kernels`), bit
for bit the same.

Element `index` of a rounding draws the high 32 bits of

    mix64(GAMMA * (index ^ a) ^ b)        (all modulo 2^64)

where mix64 and GAMMA are SplitMix64's output function (Stafford's Mix13)
and odd Weyl increment (Steele, Lea and Flood, "Fast splittable
pseudorandom number generators", 2014), and the 64-bit words (a, b) are
derived, by the same function, from the rounding's seed, identity, domain
and step (`stream_keys`). For given (a, b) the map from index to the 64-bit
word is a bijection, so no two elements of a rounding share a state; two
roundings with different (seed, identity, domain, step) have unrelated
words (a, b): they could share a sequence only if their 64-bit keys agreed.
The bits depend on nothing but those numbers, never on a generator's state
or on the order of calls.

Why not Philox-4x32-10 (as `tl.philox` and torch's CUDA generator): it
takes ten rounds of two 32x32->64-bit multiplies, about 124 integer tensor
operations per element, and Inductor (torch 2.14) stores any elementwise
expression of more than 100 in a buffer of its own, so compiled on the CPU
a Philox draw took more time than the rest of the rounding three times
over (docs/backends.md); this one is 16 operations per element, fused into
the rounding around it. The key's derivation is a few operations on
scalars, stored once (see `_stored`).

Everything is int64 arithmetic, which wraps modulo 2^64 (as the products
here need), with logical shifts written as arithmetic ones and a mask, so
it runs on any device, eagerly or under `torch.compile`; the step (or any
word) may be a tensor, so that one compiled graph serves every step.

The draw is one operator, `torch.ops.swalp.splitmix_bits` (see
`operators`): Dynamo records it as one call instead of tracing its
operations in Python bytecode.
"""

import torch

from swalp.quant import operators

# SplitMix64's Weyl increment and output multipliers, as signed 64-bit ints.
GAMMA = 0x9E3779B97F4A7C15 - (1 << 64)
MIX_A, MIX_B = 0xBF58476D1CE4E5B9 - (1 << 64), 0x94D049BB133111EB - (1 << 64)
WORD = 0xFFFFFFFF
SEED_MASK = (1 << 63) - 1  # seeds travel through int64 operator and kernel arguments


def _wrapped(value):
    """`value` as a signed 64-bit int: int64 tensors wrap by themselves,
    Python ints are unbounded."""
    if isinstance(value, torch.Tensor):
        return value
    return ((value + (1 << 63)) & ((1 << 64) - 1)) - (1 << 63)


def _shifted(value, shift):
    """The logical right shift of a 64-bit word (>> alone is arithmetic)."""
    return (value >> shift) & ((1 << (64 - shift)) - 1)


def mix64(value):
    """SplitMix64's output function of a signed 64-bit word (int or int64
    tensor), a bijection of the 64-bit words. SplitMix64 seeded with
    1234567 first outputs mix64(1234567 + GAMMA):

    >>> hex(mix64(1234567 + GAMMA) & (2 ** 64 - 1))
    '0x599ed017fb08fc85'
    """
    value = _wrapped((value ^ _shifted(value, 30)) * MIX_A)
    value = _wrapped((value ^ _shifted(value, 27)) * MIX_B)
    return value ^ _shifted(value, 31)


def stream_keys(seed, identity, step, domain):
    """The words (a, b) of one rounding: ints, or int64 tensors where a
    word is a tensor. The seed is taken modulo 2^63, the other words modulo
    2^32; the step comes last, so a tensor step costs two mixes."""
    state = mix64(_wrapped(seed & SEED_MASK))
    for word in (identity, domain, step):
        state = mix64(state ^ _wrapped((word & WORD) * GAMMA))
    keys = state, mix64(_wrapped(state + GAMMA))
    return tuple(_stored(key) for key in keys)


def _stored(key):
    """`key` itself; a tensor as the maximum of 16 copies of it, which
    Inductor computes once and stores (a reduction). Left inline, it would
    be traced once per use of everything computed from it: each xor-shift
    (`z ^ (z >> 30)`) uses its input twice, so the step's few operations
    were copied 512 times into every draw, and VGG16's first compiled 8-bit
    step took 850 s to compile instead of about 2 minutes."""
    if not isinstance(key, torch.Tensor):
        return key
    return key.reshape(1).expand(16).amax()


def _bits(offsets, a, b):
    """The 32 bits (as int64) of each element index in `offsets` for words (a, b)."""
    return _shifted(mix64(_wrapped((offsets.to(torch.int64) ^ a) * GAMMA) ^ b), 32)


def operator_words(identity, step, domain):
    """Words as this package's operators take them: the words that are
    tensors (None for the others), and the others as ints (0 for the
    tensors). Ints stay ints, not 0-dimensional tensors: their graphs are
    those torch 2.14's Inductor generates correct code for."""
    words = (identity, step, domain)
    return ([word if isinstance(word, torch.Tensor) else None for word in words],
            [0 if isinstance(word, torch.Tensor) else word & WORD for word in words])


def counter_words(tensors, constants):
    """operator_words' inverse: each word, its tensor or else its int."""
    return [constant if tensor is None else tensor for tensor, constant in zip(tensors, constants)]


def _splitmix_bits(offsets, seed, identity, step, domain, constants):
    """The operator's implementation (words as `operator_words` gives them)."""
    identity, step, domain = counter_words((identity, step, domain), constants)
    return _bits(offsets, *stream_keys(seed, identity, step, domain))


operators.define("splitmix_bits(Tensor offsets, int seed, Tensor? identity, Tensor? step, Tensor? domain, "
                 "int[3] constants) -> Tensor", _splitmix_bits)


def random_bits(offsets, seed, identity, step, domain):
    """The 32 random bits (int64 holding them) of each element of `offsets`
    (int64 element indices below 2^31) for key `seed` and words identity,
    step, domain: ints, or int64 tensors with one element (0-dimensional),
    the same bits either way:

    >>> random_bits(torch.arange(4), 1, 0, 0, 0)
    tensor([3637463067,  104183616, 3131988170,  402856549])
    >>> torch.equal(random_bits(torch.arange(4), 1, 0, torch.tensor(0), 0), random_bits(torch.arange(4), 1, 0, 0, 0))
    True
    """
    tensors, constants = operator_words(identity, step, domain)
    return operators.call("splitmix_bits", offsets, seed & SEED_MASK, *tensors, constants)
