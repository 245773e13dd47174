"""This package's torch operators and torch's compile caches on disk, which
every process shares: a graph cached by one version of the package, or for
one number format, is never served for another."""

import pathlib
import shutil
import subprocess
import sys

import pytest
import torch
from torch._dynamo.utils import counters

import swalp
from runs import ROOT
from swalp.quant import formats, operators, specs, splitmix
from swalp.quant.backends import COMPILED_BACKEND
from swalp.quant.noise import NoiseKey

BFP8 = specs.parse("bfp8")


def draw(offsets):
    return splitmix.random_bits(offsets, 1, 0, 0, 0)


def round_batch(offsets):
    """A batch's rounding: a round_batch call, the draw inside its expansion."""
    tensors = [offsets.float() / 7]
    COMPILED_BACKEND.round_many(tensors, BFP8, "stochastic", NoiseKey(seed=1, identity=0, step=0, domain=0))
    return tensors[0]


@pytest.mark.parametrize("function", [draw, round_batch])
def test_code_cached_for_other_sources_is_not_served(function, tmp_path, monkeypatch):
    """The next version of this package (simulated: another draw, another
    digest of its sources) compiles its own code. On torch 2.14, without
    the digest in each call, the second compilation below is served the
    first one's code from AOTAutograd's cache (pytorch/pytorch#144344)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    offsets = torch.arange(256)

    def compiled():
        torch._dynamo.reset()
        counters.clear()
        return torch.compile(function, fullgraph=True, backend="inductor")(offsets)

    assert torch.equal(compiled(), function(offsets))
    assert counters["aot_autograd"]["autograd_cache_saved"] == 1  # the cache is on: the test means something
    monkeypatch.setattr(splitmix, "_bits", lambda offsets, a, b: (offsets * 40503) & 0xFFFFFFFF)
    monkeypatch.setattr(operators, "SOURCES", operators.SOURCES ^ 1)
    assert torch.equal(compiled(), function(offsets))
    assert counters["aot_autograd"]["autograd_cache_miss"] == 1 and not counters["aot_autograd"]["autograd_cache_hit"]


@pytest.mark.parametrize("function", [draw, round_batch])
def test_the_digest_is_a_constant_of_the_graph_dynamo_captures(function):
    """What AOTAutograd's cache key is computed from."""
    captured = []

    def capture(graph, example_inputs):
        captured.append(graph.code)
        return graph.forward

    torch._dynamo.reset()
    torch.compile(function, fullgraph=True, backend=capture)(torch.arange(8))
    assert len(captured) == 1 and str(operators.SOURCES) in captured[0]


def test_the_digest_is_of_the_sources_and_changes_with_any_of_them(tmp_path):
    assert operators.SOURCES == operators._digest(pathlib.Path(splitmix.__file__).parent)
    assert 0 <= operators.SOURCES < 2 ** 63
    copied = tmp_path / "quant"
    shutil.copytree(pathlib.Path(splitmix.__file__).parent, copied, ignore=shutil.ignore_patterns("__pycache__"))
    assert operators._digest(copied) == operators.SOURCES
    kernels = copied / "torch_kernels.py"
    kernels.write_bytes(kernels.read_bytes() + b"\n")
    assert operators._digest(copied) != operators.SOURCES


def test_a_format_has_the_same_key_in_every_process():
    """Keys go into cached graphs: an address (an id) would differ between
    runs, and could name another format in a later one."""
    specs_here = ["bfp8", "fixed8.6", "mxfp8", "nvfp4"]
    script = ("from swalp.quant import formats, specs; "
              f"print('|'.join(formats.key(specs.parse(spec)) for spec in {specs_here!r}))")
    there = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    keys = [formats.key(specs.parse(spec)) for spec in specs_here]
    assert there.stdout.strip().split("|") == keys and len(set(keys)) == len(keys)


def test_the_optimizer_rounding_graphs_are_written_to_the_cache_and_served_again(tmp_path, monkeypatch):
    """They run without gradients: with the parameters requiring them,
    AOTAutograd would compile training graphs, written to disk only once a
    backward compiles, which never comes, so every run (a resumed one too)
    traced and partitioned them again."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    kinds = dict.fromkeys(("weight", "grad", "momentum"), "bfp8")  # no accumulator: the weights themselves
    for run in range(2):  # as two runs of the same script would
        torch._dynamo.reset()
        counters.clear()
        net = torch.nn.Linear(8, 4)
        sgd = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        optimizer = swalp.wrap_optimizer(sgd, **kinds, backend=COMPILED_BACKEND, noise=swalp.StepNoise(0))
        net(torch.randn(2, 8)).sum().backward()
        optimizer.step()
        cache = counters["aot_autograd"]
        assert cache["autograd_cache_saved" if run == 0 else "autograd_cache_hit"] == 2, (run, cache)
