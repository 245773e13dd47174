"""The triton backend's kernels as a GPU would get them, without a GPU: the
specializations Triton would compile over a run, the warm-up that compiles
every one of them before training, and ahead-of-time compiles for sm_80,
sm_90 and sm_100 whose PTX is checked."""

import pytest
import torch

pytest.importorskip("triton")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

import models  # noqa: E402
import swalp  # noqa: E402
from swalp.quant import triton_kernels as tk  # noqa: E402
from swalp.quant.backends import Backend  # noqa: E402
from swalp.quant.formats import BlockFormat, FixedFormat, FloatFormat  # noqa: E402
from swalp.quant.quantizer import build_quantizers  # noqa: E402

if tk.INTERPRETING:
    pytest.skip("these checks need Triton's compiler, not its interpreter", allow_module_level=True)

TRITON = Backend("triton", tk.block_quantize, tk.fixed_point_quantize, tk.float_quantize, seedable=True,
                 counter_based=True, block_sizes=False, round_many=tk.round_many)
EIGHT_BIT = {kind: BlockFormat(8, small_block="FC") for kind in swalp.NUMBER_KINDS}


@pytest.fixture
def launches(monkeypatch):
    """Every launch the kernels' callers make, recorded instead of run (no GPU here)."""
    recorded = []
    monkeypatch.setattr(tk, "_launch", lambda kernel, n, *args, **constants: recorded.append((kernel, args, constants)))
    return recorded


def bind(kernel, args, constants, arch=90):
    """What Triton's launcher computes for a launch on a GPU of `arch`:
    the bound arguments, the specialization (its cache key) and options."""
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = {"TILE": tk.TILE, **constants, **tk.LAUNCH_OPTIONS}
    bound, specialization, options = binder(*args, **kwargs)
    return backend, kwargs, bound, specialization, options


def mode(kernel, constants):
    """A kernel family and mode: the kernel and its compile-time constants."""
    return kernel.fn.__name__, tuple(sorted(constants.items()))


def train_three_steps():
    torch.manual_seed(0)
    net = models.build_model("VGG16", num_classes=10)
    noise = swalp.StepNoise(seed=7)
    quantizers = build_quantizers(EIGHT_BIT, "stochastic", TRITON, noise)
    swalp.quantize_model(net, quantizers["activate"], quantizers["error"], sites=net.quantizer_sites("layer"))
    sgd = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    optimizer = swalp.wrap_optimizer(sgd, weight=quantizers["weight"], grad=quantizers["grad"],
                                     momentum=quantizers["momentum"], acc=quantizers["acc"], noise=noise)
    for _ in range(3):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(torch.randn(2, 3, 32, 32)), torch.tensor([1, 2])).backward()
        optimizer.step()


def test_a_run_compiles_each_kernel_family_and_mode_once(launches):
    """Three 8-bit VGG16 steps (every kind, the accumulator too): however the
    sizes, sites, kinds and steps change, each family and mode binds to one
    specialization, so it compiles once for the whole run."""
    train_three_steps()
    keys = {}
    for kernel, args, constants in launches:
        keys.setdefault(mode(kernel, constants), set()).add(tuple(bind(kernel, args, constants)[3]))
    assert len(launches) > 100 and len(keys) >= 4
    assert {name: len(found) for (name, _), found in keys.items() if len(found) > 1} == {}


def test_the_warm_up_compiles_every_mode_a_run_launches(launches):
    """auto's start-up check runs every family and mode the run's formats
    need, so no kernel a run launches is compiled for the first time mid-run."""
    tk.compile_for(torch.device("cpu"), TRITON, [EIGHT_BIT["weight"]], "stochastic")
    warmed = {mode(kernel, constants) for kernel, _, constants in launches}
    launches.clear()
    train_three_steps()
    assert {mode(kernel, constants) for kernel, _, constants in launches} <= warmed


def representatives(launches):
    """One launch of every kernel family and mode: block floating point one
    tensor at a time and batched, fixed and floating point, nearest and
    stochastic."""
    for rounding in ("nearest", "stochastic"):
        tk.compile_for(torch.device("cpu"), TRITON, [BlockFormat(8), FixedFormat(8, 6), FloatFormat(4, 3)], rounding)
    chosen = {}
    for kernel, args, constants in launches:
        chosen.setdefault(mode(kernel, constants), (kernel, args, constants))
    return list(chosen.values())


def compile_ptx(kernel, args, constants, arch, **options):
    backend, kwargs, bound, specialization, parsed = bind(kernel, args, constants, arch)
    _, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, parsed)
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                              options={**tk.LAUNCH_OPTIONS, **options})
    return compiled.asm["ptx"]


@pytest.mark.parametrize("arch", [80, 90, 100])
def test_every_kernel_compiles_for_the_gpu_without_fused_or_approximate_arithmetic(launches, arch):
    """With the project's launch options, every family and mode compiles for
    the architecture, and its PTX has no fused multiply-add (nearest rounding
    must repeat torch's separate roundings bit for bit), no flush of
    subnormals to zero, no approximate instruction and no local memory."""
    found = representatives(launches)
    assert len(found) == 10, [mode(kernel, constants) for kernel, _, constants in found]
    for kernel, args, constants in found:
        ptx = compile_ptx(kernel, args, constants, arch)
        for forbidden in ("fma.", ".ftz", ".approx", ".local"):
            assert forbidden not in ptx, (arch, kernel.fn.__name__, constants, forbidden)


def test_the_ptx_check_sees_the_fused_multiply_adds_triton_makes_by_default(launches):
    kernel, args, constants = next(launch for launch in representatives(launches)
                                   if launch[0] is tk._fixed_kernel and launch[2]["STOCHASTIC"])
    assert "fma." in compile_ptx(kernel, args, constants, 90, enable_fp_fusion=True)
