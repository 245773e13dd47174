"""Checks of the triton backend on the CPU, under Triton's interpreter.

TRITON_INTERPRET=1 must be set before triton is first imported, which other
test modules of a pytest process may already have done; so these checks run
in a process of their own (tests/test_triton_quant.py starts it):

    TRITON_INTERPRET=1 python tests/triton_interpreted.py WORK_DIR [CHECK ...]

Each check prints one JSON line: its name, its duration, whether it passed
and the error.
The interpreter pays per launch and per numpy operation, so the checks round
few, small tensors, and one large one where many draws are needed.
"""

import json
import os
import sys
import tempfile
import time
import traceback

import torch
import torch.nn as nn

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(TESTS), TESTS]

import lowp  # noqa: E402
import swalp  # noqa: E402
from grid import on_block_grid  # noqa: E402
from swalp.quant import backends, formats, quantizer, torch_kernels  # noqa: E402
from swalp.quant.noise import NoiseKey  # noqa: E402

CHECKS = {}


def check(function):
    CHECKS[function.__name__] = function
    return function


def bits(x):
    return x.contiguous().view(torch.int32)


def assert_bit_identical(actual, expected, what):
    assert actual.shape == expected.shape, what
    assert torch.equal(bits(actual), bits(expected)), what


def hard_inputs():
    """test_torch_quant's edge cases: blocks of every scale, zeros, all-zero
    blocks, subnormals, values near 2^126, powers of two."""
    from test_torch_quant import hard_inputs as edge_cases

    return edge_cases()


def special_values():
    return torch.tensor([[1.0, float("inf"), 2.0], [1.0, float("nan"), 3.0], [2.0 ** 126, 1.0, -2.0],
                         [1.0, -2.0, 0.5], [-float("inf"), 0.0, 1.0], [1e-41, -3e-42, 0.0], [-0.0, 0.0, -0.0]])


@check
def block_nearest_is_bit_identical_to_the_torch_backend(work):
    from swalp.quant import triton_kernels as tq

    x = hard_inputs()
    for wl in (2, 3, 8, 16, 22):
        for dim in (-1, 0, 1, 2, 3):
            expected = torch_kernels.block_quantize(x, wl, dim, "nearest")
            assert_bit_identical(tq.block_quantize(x, wl, dim, "nearest"), expected, (wl, dim))
            in_place = x.clone()
            assert tq.block_quantize(in_place, wl, dim, "nearest", inplace=True) is in_place
            assert_bit_identical(in_place, expected, (wl, dim, "in place"))
    views = {"transposed": x.transpose(0, 3), "sliced": x[:, ::2, 1:], "strided 1-D": x.flatten()[::3],
             "2-D": x[:, 0, 0, :].t(), "specials": special_values()}
    for name, view in views.items():
        for dim in (-1, 0):
            assert_bit_identical(tq.block_quantize(view, 8, dim, "nearest"),
                                 torch_kernels.block_quantize(view, 8, dim, "nearest"), (name, dim))
    assert tq.block_quantize(torch.empty(0, 3), 8, 0).shape == (0, 3)


@check
def fixed_and_float_nearest_are_bit_identical_to_the_torch_backend(work):
    from swalp.quant import triton_kernels as tq

    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0])
    for wl, fl in ((8, 4), (4, 2), (16, 8), (8, 12), (32, 16), (8, -2)):
        x = torch.cat([(hard_inputs()[:, :2] * 1e-36).flatten(), torch.randn(1000) * 10,
                       torch.arange(-20, 20) / 2 ** (fl + 1), specials])
        for clamp in (True, False):
            for symmetric in (True, False):
                assert_bit_identical(tq.fixed_point_quantize(x, wl, fl, clamp, symmetric, "nearest"),
                                     torch_kernels.fixed_point_quantize(x, wl, fl, clamp, symmetric, "nearest"),
                                     ("fixed", wl, fl, clamp, symmetric))
    x = torch.cat([hard_inputs().flatten(), specials])
    for exp, man in ((8, 7), (5, 2), (5, 10), (4, 3), (3, 1), (8, 22), (2, 0)):
        assert_bit_identical(tq.float_quantize(x, exp, man, "nearest"),
                             torch_kernels.float_quantize(x, exp, man, "nearest"), ("float", exp, man))


@check
def batched_rounding_equals_rounding_one_tensor_at_a_time(work):
    from swalp.quant import triton_kernels as tq

    torch.manual_seed(0)
    shapes = [(4, 3, 3, 3), (4,), (10, 12), (7,), (2, 5)]
    cases = [formats.BlockFormat(8), formats.BlockFormat(6, small_block="FC"),
             formats.BlockFormat(5, small_block="Conv"), formats.BlockFormat(8, block_dim="BC"),
             formats.FixedFormat(8, 4), formats.FloatFormat(5, 2)]
    for number_format in cases:
        tensors = [torch.randn(shape) * 10.0 ** torch.randint(-3, 3, ()) for shape in shapes]
        expected = [number_format.quantize(t, "nearest", backends.TORCH_BACKEND) for t in tensors]
        originals = [t.clone() for t in tensors]
        out = [torch.empty_like(t) for t in tensors]
        tq.round_many(tensors, number_format, "nearest", out=out)
        for original, tensor, result, wanted in zip(originals, tensors, out, expected):
            assert torch.equal(tensor, original), "out= leaves the inputs alone"
            assert_bit_identical(result, wanted, (str(number_format), "out"))
        tq.round_many(tensors, number_format, "nearest")
        for tensor, wanted in zip(tensors, expected):
            assert_bit_identical(tensor, wanted, (str(number_format), "in place"))


@check
def block_stochastic_lands_on_a_neighbour_with_the_right_probability(work):
    from swalp.quant import triton_kernels as tq
    from test_torch_quant import block_neighbours

    torch.manual_seed(0)
    draws_per_value = 300
    x = torch.randn(4, 500) * torch.tensor([[1e-3], [1.0], [7.0], [1e4]])
    # One row (one block) per draw: every element index draws its own bits.
    draws = tq.block_quantize(x.repeat(draws_per_value, 1), 8, 0, "stochastic", NoiseKey(5, 1, 0, 0))
    draws = draws.view(draws_per_value, *x.shape)
    low, high, step = block_neighbours(x, 8)
    assert ((draws == low) | (draws == high)).all()
    interior = high > low
    p_up = ((x - low) / step)[interior]
    observed = (draws == high).double().mean(0)[interior]
    bound = 6 * (p_up * (1 - p_up) / draws_per_value).sqrt() + 1e-9
    assert ((observed - p_up).abs() <= bound).all()
    error = ((draws.double() - x) / step)[:, interior]
    assert error.mean().abs() < 6 * 0.5 / error.numel() ** 0.5


@check
def fixed_and_float_stochastic_round_to_a_neighbour_either_way(work):
    from swalp.quant import triton_kernels as tq

    torch.manual_seed(0)
    x = torch.randn(2000)
    spacing = 2.0 ** (torch.floor(torch.log2(x.abs())) - 3)
    key = NoiseKey(5, 1, 0, 0)
    for name, draws, low, step in (
            ("fixed", tq.fixed_point_quantize(x.repeat(50), 8, 4, rounding="stochastic", key=key),
             torch.floor(x * 16) / 16, 1 / 16),
            ("float", tq.float_quantize(x.repeat(50), 8, 3, "stochastic", key), torch.floor(x / spacing) * spacing,
             spacing)):
        draws = draws.view(50, -1)
        high = low + step
        assert ((draws == low) | (draws == high)).all(), name
        off_grid = x != low
        assert (draws == low).any(0)[off_grid].float().mean() > 0.9, name
        assert (draws == high).any(0)[off_grid].float().mean() > 0.9, name
        p_up = ((x - low) / step)[off_grid]
        assert ((draws == high).double().mean(0)[off_grid] - p_up).abs().mean() < 0.05, name


@check
def noise_is_a_function_of_seed_step_identity_domain_and_index(work):
    from swalp.quant import triton_kernels as tq

    torch.manual_seed(0)
    x = torch.randn(64, 100)
    key = NoiseKey(7, 3, 11, 1)
    first = tq.block_quantize(x, 6, 0, "stochastic", key)
    assert torch.equal(tq.block_quantize(x, 6, 0, "stochastic", key), first)
    for field in ("seed", "identity", "step", "domain"):
        other = key._replace(**{field: getattr(key, field) + 1})
        assert not torch.equal(tq.block_quantize(x, 6, 0, "stochastic", other), first), field
    # An element's bits depend on its index, not on what else is rounded with it
    # (fixed point: no block maximum couples the elements).
    alone = tq.fixed_point_quantize(x, 8, 4, rounding="stochastic", key=key)
    extended = tq.fixed_point_quantize(torch.cat([x, torch.randn(30, 100)]), 8, 4, rounding="stochastic", key=key)
    assert torch.equal(extended[:64], alone)
    # The top counter bits are used: steps 2^31 apart draw differently.
    far = tq.block_quantize(x, 6, 0, "stochastic", key._replace(step=key.step + (1 << 31)))
    assert not torch.equal(far, first)


@check
def the_compiled_backend_draws_the_triton_backends_bits(work):
    """The compiled backend's noise (torch operations) against the triton kernels':
    stochastic rounding bit for bit, one tensor at a time and batched, with
    the step as an int and as the tensor compiled graphs read."""
    triton_backend = backends.load_triton_backend(torch.device("cpu"))
    compiled = backends.COMPILED_BACKEND
    torch.manual_seed(0)
    shapes = [(4, 3, 3, 3), (6,), (10, 12)]
    cases = [formats.BlockFormat(8), formats.BlockFormat(6, small_block="FC"), formats.BlockFormat(8, block_dim="BC"),
             formats.FixedFormat(8, 4), formats.FloatFormat(5, 2)]
    for step in (9, torch.tensor(9)):
        key = NoiseKey(seed=11, identity=2, step=step, domain=1)
        for number_format in cases:
            tensors = [torch.randn(shape) * 10.0 ** torch.randint(-3, 3, ()) for shape in shapes]
            for tensor in tensors:
                assert_bit_identical(number_format.quantize(tensor, "stochastic", compiled, key),
                                     number_format.quantize(tensor, "stochastic", triton_backend, key._replace(
                                         step=int(step))), (str(number_format), tensor.shape))
            ours, theirs = [t.clone() for t in tensors], [t.clone() for t in tensors]
            compiled.round_many(ours, number_format, "stochastic", key)
            triton_backend.round_many(theirs, number_format, "stochastic", key._replace(step=int(step)))
            for mine, wanted in zip(ours, theirs):
                assert_bit_identical(mine, wanted, (str(number_format), "batched"))


@check
def key_words_of_every_argument_width_give_the_torch_backends_bits(work):
    """Key words reach the kernels as 32-bit arguments when they fit (signed,
    or under the interpreter unsigned from 2^31) and as 64-bit ones
    otherwise; each must draw what the torch operations draw. Real keys
    fit 32 bits once in 2^32 roundings, so the words are chosen here."""
    from swalp.quant import splitmix

    triton_backend = backends.load_triton_backend(torch.device("cpu"))
    x = torch.randn(40, 30)
    derive = splitmix.stream_keys
    try:
        for words in ((0, 0), (-5, 7), (2 ** 31 - 1, -2 ** 31), (2 ** 31 + 5, 2 ** 32 - 1), (-2 ** 63, 2 ** 63 - 1)):
            splitmix.stream_keys = lambda *key, words=words: words
            for number_format in (formats.BlockFormat(8), formats.FixedFormat(8, 4)):
                key = NoiseKey(seed=1, identity=0, step=0, domain=0)
                assert_bit_identical(number_format.quantize(x, "stochastic", triton_backend, key),
                                     number_format.quantize(x, "stochastic", backends.COMPILED_BACKEND, key),
                                     (words, str(number_format)))
    finally:
        splitmix.stream_keys = derive


# Top-level operations that allocate or make views, and launch nothing on a GPU.
NO_KERNEL = {"aten::empty", "aten::empty_like", "aten::split", "aten::split_with_sizes", "aten::view",
             "aten::reshape", "aten::contiguous"}


@check
def one_tensor_costs_two_kernels_and_a_fill_and_nothing_is_read_back(work):
    from swalp.quant import triton_kernels as tq

    key = NoiseKey(1, 0, 0, 0)
    tensors = [torch.randn(8, 4, 3, 3), torch.randn(8), torch.randn(10, 8)]
    tq.round_many(tensors, formats.BlockFormat(8), "stochastic", key)  # builds the cached block map
    for name, call, top_level in (
            ("one tensor", lambda: tq.block_quantize(tensors[0], 8, 0, "stochastic", key), 3),
            ("batched", lambda: tq.round_many(tensors, formats.BlockFormat(8), "stochastic", key), 5)):
        with torch.profiler.profile() as profile:
            call()
        events = [event for event in profile.events() if event.cpu_parent is None]
        names = [event.name for event in events]
        assert sum(name.startswith("triton::") for name in names) == 2, (name, names)
        # Launches: the fill of the block maxima, the two kernels (and for a batch the gather and scatter).
        launching = [n for n in names if n not in NO_KERNEL]
        assert len(launching) <= top_level, (name, names)
        everything = [event.name for event in profile.events()]
        assert "aten::_local_scalar_dense" not in everything and "aten::item" not in everything, name


class TinyNet(nn.Module):
    """A convolution and a linear layer, one quantizer site after the
    convolution: enough to exercise every stream."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def quantizer_sites(self, placement):
        return [self.conv]

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def tiny_training(seed, rank=0, steps=2, wrap=None):
    """A TinyNet trained a few steps in 8 bits on the triton backend."""
    torch.manual_seed(0)
    net = TinyNet()
    noise = swalp.StepNoise(seed, rank=rank)
    backend, _ = backends.choose_backend("triton", torch.device("cpu"))
    lengths = lowp.word_lengths(weight=8, activate=8, grad=8, error=8, momentum=8, acc=12)
    quantizers = quantizer.build_quantizers(lengths, "stochastic", backend=backend, noise=noise)
    lowp.insert_quantizers(net, quantizers["activate"], quantizers["error"], "layer")
    optimizer = lowp.make_optimizer(net, quantizers, 0.1, 0.9, 5e-4, noise)
    assert optimizer.batched
    model = wrap(net) if wrap else net
    data = torch.Generator().manual_seed(100 + rank)
    for _ in range(steps):
        optimizer.zero_grad()
        inputs, targets = torch.randn(4, 3, 6, 6, generator=data), torch.randint(0, 5, (4,), generator=data)
        nn.functional.cross_entropy(model(inputs), targets).backward()
        optimizer.step()
    return net, optimizer


@check
def training_is_repeatable_and_every_number_is_on_its_grid(work):
    net, optimizer = tiny_training(seed=3)
    again, _ = tiny_training(seed=3)
    other, _ = tiny_training(seed=4)
    for ours, theirs in zip(net.parameters(), again.parameters()):
        assert_bit_identical(ours.data, theirs.data, "same seed")
    assert any(not torch.equal(a, b) for a, b in zip(net.parameters(), other.parameters())), "other seed"
    for param in net.parameters():
        assert on_block_grid(param.data, 8) and on_block_grid(param.grad, 8)
        assert on_block_grid(optimizer.optim.state[param]["momentum_buffer"], 8)
        assert on_block_grid(optimizer.weight_acc[param], 12)


@check
def adamw_rounds_each_kind_in_one_batch_repeatably(work):
    """Weights, gradients and both moments of AdamW: one batch (two kernels)
    per kind and step, whatever the number of parameters, on their grids."""
    backend, _ = backends.choose_backend("triton", torch.device("cpu"))

    def train(seed):
        torch.manual_seed(0)
        net, noise = TinyNet(), swalp.StepNoise(seed)
        adamw = torch.optim.AdamW(net.parameters(), lr=0.01)
        optimizer = swalp.wrap_optimizer(adamw, weight="bfp8", grad="bfp8", momentum="bfp8", moment2="bfp16",
                                         backend=backend, noise=noise)
        assert optimizer.batched
        data = torch.Generator().manual_seed(100)
        for _ in range(2):
            optimizer.zero_grad()
            inputs, targets = torch.randn(4, 3, 6, 6, generator=data), torch.randint(0, 5, (4,), generator=data)
            nn.functional.cross_entropy(net(inputs), targets).backward()
            with torch.profiler.profile() as profile:
                optimizer.step()
            launches = [event.name for event in profile.events() if event.name.startswith("triton::")]
            assert len(launches) == 2 * 4, launches  # 4 kinds, 4 parameters each
        return net, adamw

    net, adamw = train(seed=3)
    again, _ = train(seed=3)
    for ours, theirs in zip(net.parameters(), again.parameters()):
        assert_bit_identical(ours.data, theirs.data, "same seed")
    for param in net.parameters():
        assert on_block_grid(param.data, 8) and on_block_grid(param.grad, 8)
        assert on_block_grid(adamw.state[param]["exp_avg"], 8)
        assert on_block_grid(adamw.state[param]["exp_avg_sq"], 16)


def _rank(rank, init_file, queue):
    torch.set_num_threads(1)  # two ranks on two cores
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    net, optimizer = tiny_training(seed=3, rank=rank, wrap=nn.parallel.DistributedDataParallel)
    probe = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        activation = net.conv(probe)  # rounded by the site's quantizer, with this rank's noise
    state = [p.data for p in net.parameters()] + [optimizer.optim.state[p]["momentum_buffer"] for p in
                                                  net.parameters()]
    queue.put((rank, [bits(t).tolist() for t in state], bits(activation).tolist()))
    torch.distributed.destroy_process_group()


@check
def optimizer_rounding_is_identical_on_two_gloo_ranks(work):
    import torch.multiprocessing as mp

    context = mp.get_context("fork")  # a spawned process would import torch and triton again
    queue = context.Queue()
    init_file = os.path.join(tempfile.mkdtemp(dir=work), "gloo-init")  # a stale one would hang the rendezvous
    processes = [context.Process(target=_rank, args=(rank, init_file, queue)) for rank in range(2)]
    for process in processes:
        process.start()
    results = {}
    try:
        for _ in processes:
            rank, state, activation = queue.get(timeout=300)
            results[rank] = (state, activation)
    finally:
        for process in processes:
            process.join(timeout=60)
            if process.exitcode is None:
                process.kill()
    assert all(process.exitcode == 0 for process in processes)
    # Different data and activation noise per rank, one average gradient, one optimizer noise.
    assert results[0][0] == results[1][0], "weights or momenta differ between ranks"
    assert results[0][1] != results[1][1], "activation noise should differ between ranks"


@check
def train_py_on_the_triton_backend_resumes_exactly(work):
    """train.py itself in 8 bits on the triton backend: CIFAR100 with 2
    training and 2 test images (one step of 2 per epoch, which the
    interpreter runs in seconds), then the second epoch (a step, BatchNorm
    passes, evaluations) again from the first epoch's checkpoint, written
    after that epoch's evaluation."""
    import contextlib
    import io
    import json as json_module

    import train
    from runs import EIGHT_BIT, assert_same_run, table_rows
    from swalp.data.fake_cifar import write_fake_cifar
    from torchvision.datasets import CIFAR10, CIFAR100

    root = os.path.join(work, "tiny")
    write_fake_cifar(root, train_size=2, test_size=2)
    with open(os.path.join(root, "md5.json")) as handle:
        sums = json_module.load(handle)
    for cls in (CIFAR10, CIFAR100):
        own = sums[cls.__name__]
        cls.train_list = [[name, own[name]] for name, _ in cls.train_list]
        cls.test_list = [[name, own[name]] for name, _ in cls.test_list]
        cls.meta = dict(cls.meta, md5=own[cls.meta["filename"]])
    flags = ["--dataset", "CIFAR100", "--data_path", root, "--model", "PreResNet20", "--epochs", 2, "--swa_start", 1,
             "--save_freq", 1, "--batch_size", 2, "--num_workers", 0, *EIGHT_BIT, "--wl-acc", 12,
             "--quant-backend", "triton"]

    def train_py(*extra):
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            train.main([str(flag) for flag in (*flags, *extra)])
        return printed.getvalue()

    first = os.path.join(work, "first")
    out = train_py("--dir", first)
    assert "triton backend" in out and [int(row[0]) for row in table_rows(out)] == [1, 2], out
    resumed = os.path.join(work, "resumed")
    train_py("--dir", resumed, "--resume", os.path.join(first, "checkpoint-1.pt"))
    from pathlib import Path
    assert_same_run(Path(first), Path(resumed), epochs=2)


@check
def gpu_checks_interpreted_half_rounds_onto_the_grid_alike_batched_or_not(work):
    """benchmarks/gpu_check.py compares these bits with the GPU's: each is on
    its format's grid, and the batched rounding of the same elements (the
    same positions, so the same noise) equals the one-tensor rounding."""
    from benchmarks import gpu_check
    from swalp.quant import specs

    bits = gpu_check.stochastic_bits(torch.device("cpu"))
    assert len(bits) == 18
    for name, rounded in bits.items():
        number_format = specs.parse(name.split("/")[0])
        finite = rounded.isfinite()
        again = number_format.quantize(rounded, "nearest", backends.TORCH_BACKEND)
        assert torch.equal(again[finite], rounded[finite]), name
        if name.endswith("/batched"):
            assert gpu_check.same_bits(rounded, bits[name[:-len("/batched")]]) == 0, name


def main():
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    work = sys.argv[1]
    for name in sys.argv[2:] or CHECKS:
        start = time.perf_counter()
        try:
            CHECKS[name](work)
            outcome = {"ok": True}
        except Exception:
            outcome = {"ok": False, "error": traceback.format_exc()}
        print(json.dumps({"check": name, "seconds": round(time.perf_counter() - start, 2), **outcome}), flush=True)


if __name__ == "__main__":
    main()
