"""--compile: the network's forward and backward and the optimizer's
rounding under torch.compile, with counter-based noise.

Tracing is what costs here (tens of seconds for PreResNet20 on two cores),
so the tests trace with the aot_eager backend, which runs the very graphs
Inductor would compile (forward and backward), or for whole runs with
Dynamo's capture alone (eager); one compiles with Inductor the roundings of
every kernel and block layout, checked bit for bit against eager."""

import dataclasses
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

import models
import swalp
from runs import assert_same_run, checkpoint_mid_epoch
from swalp.quant import specs
from swalp.quant.backends import COMPILED_BACKEND
from swalp.quant.noise import NoiseKey, StepNoise
from swalp.quant.optim import compile_rounding
from test_distributed import torchrun

EIGHT_BIT_KINDS = dict(weight="bfp8", grad="bfp8", momentum="bfp8", acc="bfp8")


class Tiny(nn.Module):
    """Two convolutions with BatchNorm and a classifier: a network whose graphs trace in seconds."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(4),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.classifier = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))

    def quantizer_sites(self, placement):
        """Every convolution and linear layer but the last (the logits stay in full precision)."""
        return [name for name, module in self.named_modules() if isinstance(module, (nn.Conv2d, nn.Linear))][:-1]


@pytest.fixture(autouse=True)
def fresh_compiler():
    """Each test counts its own compilations; none reuses another's graphs."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def low_precision(name, seed=0):
    """An 8-bit network, `name` of the registry or a class, on the compiled backend."""
    torch.manual_seed(seed)
    net = name(10) if isinstance(name, type) else models.build_model(name, 10)
    noise = StepNoise(seed=1)
    swalp.quantize_model(net, "bfp8", "bfp8", backend=COMPILED_BACKEND, noise=noise)
    return net, noise


@pytest.mark.parametrize("name", ["VGG16", "PreResNet20"])
def test_an_8_bit_network_traces_as_one_graph_without_breaks(name):
    net, _ = low_precision(name)
    explained = torch._dynamo.explain(net)(torch.randn(2, 3, 32, 32))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    # Each site's noise (forward and backward: the autograd functions'
    # subgraphs) is one call, not its operations traced one by one.
    calls = [node.target for graph in explained.graphs[0].modules() if isinstance(graph, torch.fx.GraphModule)
             for node in graph.graph.nodes if node.op == "call_function"]
    assert calls.count(torch.ops.swalp.splitmix_bits) == 2 * len(net.quantizer_sites("layer"))
    assert len(calls) < 70 * len(net.quantizer_sites("layer")), len(calls)


def steps(net, noise, compiler, batches):
    """Train on `batches` with 8-bit SGD (every kind); the unique graphs after
    the first step and after the last, then the evaluated logits."""
    sgd = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    optimizer = swalp.wrap_optimizer(sgd, **EIGHT_BIT_KINDS, backend=COMPILED_BACKEND, noise=noise,
                                     compiler=compiler)
    if compiler:
        net.compile(backend=compiler, dynamic=False)
    graphs = []
    for inputs, targets in batches:
        optimizer.zero_grad()
        F.cross_entropy(net(inputs), targets).backward()
        optimizer.step()
        graphs.append(counters["stats"]["unique_graphs"])
    net.eval()
    with torch.no_grad():
        logits = [net(batches[0][0]), net(batches[0][0])]  # two passes: each draws its own noise
    return optimizer, (graphs[0], graphs[-1]), logits


def test_compiled_training_is_eager_training_bit_for_bit_and_compiles_once():
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, 32, 32, generator=generator), torch.randint(0, 10, (4,), generator=generator))
               for _ in range(3)]
    eager_net, noise = low_precision(Tiny)
    eager, _, eager_logits = steps(eager_net, noise, None, batches)
    compiled_net, noise = low_precision(Tiny)
    compiled, graphs, compiled_logits = steps(compiled_net, noise, "aot_eager", batches)
    # The network (forward and backward), the rounding before the step and after it; none again.
    assert graphs == (3, 3)
    assert not counters["recompiles"]
    for expected, actual in zip(eager.params, compiled.params, strict=True):
        assert torch.equal(expected, actual)
        assert torch.equal(eager.weight_acc[expected], compiled.weight_acc[actual])
        assert torch.equal(eager.optim.state[expected]["momentum_buffer"],
                           compiled.optim.state[actual]["momentum_buffer"])
    for expected, actual in zip(eager_logits, compiled_logits):
        assert torch.equal(expected, actual)
    assert not torch.equal(*compiled_logits)


EDGE_CASES = torch.tensor([
    [1.0, -1.0, 1.5, 2.5, -2.5, 0.1, 3.0, 0.75, 1e-3, -7.0, 100.0, 0.0, -0.0, 5.5, 1.25, 1 / 3],
    [1e-39, -1e-39, 1e-45, 3e-42, 0.0, 1e-38, -2e-38, 5e-40, 1e-44, 0.0, 1.2e-38, 1e-41, -1e-45, 0.0, 2e-39, 7e-39],
    [3.4e38, -3.4e38, 1e38, 448.0, 449.0, 57344.0, 6e4, 6.5e4, 1e30, -1e30, 2.0 ** 127, 1e20, 65504.0, 5e37,
     -6.0, 6.0],
    [float("inf"), 1.0, float("-inf"), 2.0, float("nan"), -3.0, 0.5, 0.25, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
])
# A format of each kernel and block layout (bfp6/4: blocks of 4 along each
# row), rounded to nearest; stochastically those of each way of drawing noise
# (random low bits added to the bit pattern; a uniform compared or added).
NEAREST = ["bfp8", "bfp6/4", "fixed8.6", "e4m3", "fp8e5m2", "mxfp8", "mxfp4", "nvfp4"]
STOCHASTIC = ["bfp8", "fixed8.6", "e4m3", "nvfp4"]


def same_bits(expected, actual):
    return torch.equal(expected.isnan(), actual.isnan()) and torch.equal(
        expected.nan_to_num().view(torch.int32), actual.nan_to_num().view(torch.int32))


def test_inductor_rounds_every_format_as_eager_does_nearest_and_stochastic():
    bfp8 = specs.parse("bfp8")
    layouts = [dataclasses.replace(bfp8, small_block="FC"), dataclasses.replace(bfp8, block_dim="BC")]
    cases = [(specs.parse(spec), "nearest") for spec in NEAREST] + [(f, "nearest") for f in layouts]
    cases += [(specs.parse(spec), "stochastic") for spec in STOCHASTIC]
    step = torch.tensor(5)
    key = NoiseKey(seed=3, identity=7, step=step, domain=1)

    def operand(number_format, rounding):
        # One scale per tensor: NVFP4's noise shows only where no inf or huge value sets it.
        return EDGE_CASES[:1] if rounding == "stochastic" and number_format.spec == "nvfp4" else EDGE_CASES

    def round_all():
        return [number_format.quantize(operand(number_format, rounding), rounding, COMPILED_BACKEND,
                                       key if rounding == "stochastic" else None)
                for number_format, rounding in cases]

    eager = round_all()
    compiled = compile_rounding(round_all)()
    assert len(eager) == len(compiled) == len(cases)
    for case, expected, actual in zip(cases, eager, compiled):
        assert same_bits(expected, actual), case
    step.fill_(6)  # the next step: new noise, from the same compiled code
    assert counters["stats"]["unique_graphs"] == 1
    again = compile_rounding(round_all)()
    assert all(same_bits(expected, actual) for expected, actual in zip(round_all(), again))
    drawn = [index for index, (_, rounding) in enumerate(cases) if rounding == "stochastic"]
    assert [cases[index] for index in drawn if same_bits(compiled[index], again[index])] == []

    # As the optimizer rounds: a batch, in place, in the inputs of a graph of
    # its own. torch 2.14's C++ code generator fails on some such graphs (a
    # KeyError in outer-loop fusion): once the noise took its integer
    # counter words as 0-dimensional tensors, and once the noise was fused
    # and each tensor copied back by a copy_ of its own (with a nonzero
    # stream too, this case, before).
    def round_batch(batch):
        COMPILED_BACKEND.round_many(batch, bfp8, "stochastic", key._replace(identity=1, domain=1))

    weights = torch.randn(8, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    expected, actual = [weights.clone()], [weights.clone()]
    round_batch(expected)
    compile_rounding(round_batch)(actual)
    assert same_bits(expected[0], actual[0])


def test_a_batch_is_one_operator_call_in_the_graph():
    """The optimizer's rounding of a batch, traced: one round_batch call
    (which AOTAutograd expands), not each tensor's rounding traced."""
    bfp8 = specs.parse("bfp8")
    key = NoiseKey(seed=3, identity=1, step=torch.tensor(2), domain=0)
    tensors = [torch.randn(4, 3, 3, 3), torch.randn(4), torch.randn(10, 4)]
    explained = torch._dynamo.explain(lambda batch: COMPILED_BACKEND.round_many(batch, bfp8, "stochastic", key))(
        tensors)
    calls = [node.target for node in explained.graphs[0].graph.nodes if node.op == "call_function"]
    assert explained.graph_break_count == 0 and calls.count(torch.ops.swalp.round_batch) == 1
    # The call, each tensor's item of its result, and one foreach copy back.
    assert calls.count(torch._foreach_copy_) == 1 and len(calls) == len(tensors) + 2, calls


# Batches of 10 divide the 40 training and 20 test images: one shape, no recompilation.
COMPILED_RUN = ["--dataset", "CIFAR10", "--model", "Tiny", "--epochs", 1, "--swa_start", 1, "--batch_size", 10,
                "--num_workers", 0, "--format", "bfp8", "--compile", "--compile-backend", "eager"]


def test_a_compiled_run_repeats_and_resumes_mid_epoch_exactly(train_fast, tmp_path, monkeypatch):
    build_model = models.build_model
    monkeypatch.setitem(models.MODELS, "Tiny", Tiny)
    monkeypatch.setattr(models, "build_model", lambda name, classes: Tiny(classes) if name == "Tiny"
                        else build_model(name, classes))
    flags = [*COMPILED_RUN, "--data_path", train_fast.data_path]
    monkeypatch.chdir(tmp_path)
    result = train_fast(*flags)  # in the default run directory, which says it is compiled
    assert result.returncode == 0, result.stderr
    [whole] = (tmp_path / "runs").iterdir()
    assert whole.name.startswith("CIFAR10-Tiny-") and whole.name.endswith("-compiled-seed1")
    resumed = tmp_path / "resumed"
    assert "compiled  : torch.compile (counter-based noise)" in result.stdout
    assert json.loads((whole / "results.json").read_text())["config"]["compile"] is True

    checkpoint = checkpoint_mid_epoch(flags, resumed)
    result = train_fast(*flags, "--dir", resumed, "--resume", checkpoint)
    assert result.returncode == 0, result.stderr
    assert "after epoch 0, step 2" in result.stdout
    assert_same_run(whole, resumed, epochs=1)  # so the run repeats, and resumes mid-epoch exactly

    eager = train_fast(*flags[:flags.index("--compile")], "--data_path", train_fast.data_path, "--dir", tmp_path / "e",
                       "--resume", whole / "checkpoint-1.pt")
    assert eager.returncode == 2 and "--compile" in eager.stderr.strip().splitlines()[-1]


def test_compile_refuses_the_other_backends_and_an_idle_compile_backend(train_in_process):
    code, _, stderr = train_in_process("--dataset", "digits", "--model", "PreResNet20", "--compile",
                                       "--quant-backend", "triton")
    assert code == 2 and "--compile rounds with the torch kernels" in stderr
    code, _, stderr = train_in_process("--dataset", "digits", "--model", "PreResNet20",
                                       "--compile-backend", "aot_eager")
    assert code == 2 and "--compile-backend applies only with --compile" in stderr


def test_two_gloo_ranks_training_compiled_stay_bit_identical(fake_cifar_env, cifar_root, tmp_path):
    run_dir = tmp_path / "ddp"
    # Gradients alone in 8 bits: the weights' rounding draws from the same
    # optimizer stream, and Dynamo tracing the optimizer's rounding of each
    # kind for PreResNet20's parameters takes each rank seconds.
    result = torchrun(fake_cifar_env, "--dataset", "CIFAR10", "--model", "PreResNet20", "--epochs", 1,
                      "--swa_start", 1, "--batch_size", 5, "--num_workers", 0, "--wl-grad", 8,
                      "--save_every_steps", 2, "--compile", "--compile-backend", "eager",
                      "--data_path", cifar_root, "--dir", run_dir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    checkpoint = torch.load(run_dir / "checkpoint-1.pt", weights_only=True)
    assert checkpoint["world_size"] == 2 and len(set(checkpoint["replica_digests"])) == 1
    assert checkpoint["config"]["compile"] is True
