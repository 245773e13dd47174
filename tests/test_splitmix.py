"""The counter-based noise (keyed SplitMix64): its arithmetic, its
statistics, and that Inductor fuses it into the rounding around it."""

import doctest
import re

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from swalp.quant import operators, specs, splitmix
from swalp.quant.backends import COMPILED_BACKEND
from swalp.quant.noise import NoiseKey

U64 = (1 << 64) - 1
# SplitMix64 seeded with 1234567: its first five outputs (Steele, Lea and Flood's generator,
# as Rosetta Code lists them).
SPLITMIX64_1234567 = [0x599ED017FB08FC85, 0x2C73F08458540FA5, 0x883EBCE5A3F27C77, 0x3FBEF740E9177B3F,
                      0xE3B8346708CB5ECD]


def signed(word):
    return word - (1 << 64) if word >= 1 << 63 else word


def unsigned_mix(z):
    """SplitMix64's output function written on unsigned ints, independently of the module's signed version."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & U64
    return z ^ (z >> 31)


def reference_bits(count, seed, identity, step, domain):
    """The documented draw, in unsigned Python arithmetic."""
    gamma = 0x9E3779B97F4A7C15
    state = unsigned_mix(seed % (1 << 63))
    for word in (identity, domain, step):
        state = unsigned_mix(state ^ ((word % (1 << 32)) * gamma & U64))
    a, b = state, unsigned_mix((state + gamma) & U64)
    return [unsigned_mix(((index ^ a) * gamma & U64) ^ b) >> 32 for index in range(count)]


def test_the_docstring_examples_hold():
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    for test in doctest.DocTestFinder().find(splitmix, globs={**vars(splitmix)}):
        runner.run(test)
    assert runner.tries >= 3 and runner.failures == 0


def test_mix64_is_splitmix64s_output_function_on_ints_and_tensors():
    states = [(1234567 + n * 0x9E3779B97F4A7C15) & U64 for n in range(1, 6)]
    assert [splitmix.mix64(signed(state)) for state in states] == [signed(word) for word in SPLITMIX64_1234567]
    as_tensor = splitmix.mix64(torch.tensor([signed(state) for state in states]))
    assert as_tensor.tolist() == [signed(word) for word in SPLITMIX64_1234567]


@pytest.mark.parametrize("seed, identity, step, domain", [(11, 2, 9, 1), ((1 << 63) - 5, (1 << 32) - 1, 1 << 31, 7),
                                                          (0, 0, 0, 0), (-3, 4100, (1 << 40) + 3, 5)])
def test_the_bits_are_the_documented_function_whether_words_are_ints_or_tensors(seed, identity, step, domain):
    offsets = torch.arange(300, dtype=torch.int64)
    wanted = reference_bits(300, seed, identity, step, domain)
    assert splitmix.random_bits(offsets, seed, identity, step, domain).tolist() == wanted
    as_tensors = [torch.tensor(word) for word in (identity, step, domain)]
    assert splitmix.random_bits(offsets, seed, *as_tensors).tolist() == wanted
    from_ints = splitmix.stream_keys(seed, identity, step, domain)
    assert all(isinstance(word, int) for word in from_ints)  # the triton kernels take them as scalar arguments
    from_tensor = splitmix.stream_keys(seed, identity, torch.tensor(step), domain)
    assert [int(word) for word in from_tensor] == list(from_ints)


def test_the_bits_are_uniform_and_each_word_of_the_key_changes_them():
    count = 1 << 16
    offsets = torch.arange(count, dtype=torch.int64)
    bits = splitmix.random_bits(offsets, 5, 3, 17, 2)
    # Rounding takes the low bits (block, float) or bits 8 to 31 (fixed point): both uniform.
    expected = count / 256
    for field in (bits & 0xFF, (bits >> 24) & 0xFF, (bits >> 8) & 0xFF):
        chi_square = ((torch.bincount(field, minlength=256) - expected) ** 2 / expected).sum().item()
        assert chi_square < 255 + 6 * (2 * 255) ** 0.5, chi_square  # 255 degrees of freedom, 6 sigma
    uniform = (bits >> 8).double() / 2 ** 24
    for changed in ((6, 3, 17, 2), (5, 4, 17, 2), (5, 3, 18, 2), (5, 3, 17, 3), (5, 3, 17 + (1 << 31), 2)):
        other = splitmix.random_bits(offsets, *changed)
        assert (other == bits).double().mean() < 1e-3, changed
        correlation = torch.corrcoef(torch.stack([uniform, (other >> 8).double() / 2 ** 24]))[0, 1].item()
        assert abs(correlation) < 4 / count ** 0.5, (changed, correlation)
    assert torch.equal(splitmix.random_bits(offsets, 5, 3, 17 + (1 << 32), 2), bits)  # words are 32 bits


@pytest.mark.parametrize("spec", ["bfp8", "fixed8.6", "e4m3"])
def test_compiled_stochastic_rounding_is_one_kernel_as_nearest_is(spec):
    """The reason for this generator: Inductor fuses the draw into the
    rounding, one kernel with no buffer more than nearest rounding's but
    the two key words, scalars stored once (`splitmix._stored`); Philox's
    ~124 operations per element it stored apart, in passes of their own.
    e4m3 rounds twice (subnormal and normal) with the same bits: one draw."""
    number_format = specs.parse(spec)
    x = torch.randn(16, 8, 3, 3)
    key = NoiseKey(seed=1, identity=0, step=torch.tensor(3), domain=0)
    generated = {}
    for rounding in ("nearest", "stochastic"):
        torch._dynamo.reset()
        compiled = torch.compile(lambda tensor: number_format.quantize(tensor, rounding, COMPILED_BACKEND, key),
                                 fullgraph=True)
        _, code = run_and_get_code(compiled, x)
        source = "\n".join(code)
        buffers = re.findall(r"empty_strided_cpu\((\([^)]*\))", source)
        generated[rounding] = (len(re.findall(r"cpp_fused_\w+ = ", source)),
                               sorted(shape for shape in buffers if shape != "()"), buffers.count("()"))
    kernels, shapes, scalars = generated["nearest"]
    assert kernels == 1 and scalars == 0, generated
    assert generated["stochastic"] == (kernels, shapes, 2), generated


def largest_loop_body(monkeypatch, key_stored=True):
    """The most operations Inductor traces into one loop body (duplicates
    included: code generation goes through each) compiling a stochastic
    bfp8 rounding with a tensor step, as compiled training does."""
    loop_body = pytest.importorskip("torch._inductor.loop_body")  # Inductor's internals (torch 2.14)
    bodies = []
    create = loop_body.LoopBody.__init__

    def record(body, *args, **kwargs):
        create(body, *args, **kwargs)
        bodies.append(body)

    monkeypatch.setattr(loop_body.LoopBody, "__init__", record)
    if not key_stored:
        monkeypatch.setattr(splitmix, "_stored", lambda key: key)
    number_format = specs.parse("bfp8")
    key = NoiseKey(seed=1, identity=0, step=torch.tensor(3), domain=0)
    torch._dynamo.reset()
    torch.compile(lambda tensor: number_format.quantize(tensor, "stochastic", COMPILED_BACKEND, key),
                  fullgraph=True, options={"fx_graph_cache": False})(torch.randn(16, 8, 3, 3))
    monkeypatch.undo()
    return max(sum(body.op_counts.values()) for body in bodies)


def test_the_key_is_computed_once_not_copied_into_every_use(monkeypatch):
    """Left inline, the key's arithmetic on the step was traced once per use
    of everything computed from it (each xor-shift uses its input twice):
    8030 operations in one loop body against 890 (torch 2.14), and VGG16's
    first compiled 8-bit step took 850 s to compile."""
    assert largest_loop_body(monkeypatch) < 2000
    assert largest_loop_body(monkeypatch, key_stored=False) > 4000  # what the check above would see


def test_an_operator_defined_again_is_left_as_it_was():
    before = torch.ops.swalp.splitmix_bits.default
    operators.define("splitmix_bits(Tensor offsets) -> Tensor", lambda offsets: offsets)
    assert torch.ops.swalp.splitmix_bits.default is before


def test_counter_words_go_into_operators_as_tensors_or_as_their_32_bits():
    step = torch.tensor(5)
    tensors, constants = splitmix.operator_words(3, step, 2 ** 33 + 1)
    assert tensors[0] is None and tensors[1] is step and tensors[2] is None and constants == [3, 0, 1]
    identity, again, domain = splitmix.counter_words(tensors, constants)
    assert (identity, domain) == (3, 1) and again is step
