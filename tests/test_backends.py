import sys

import pytest
import torch

import swalp
import train
from swalp.errors import UserError
from swalp.quant import backends
from swalp.run.quantizers import choose_quantizers


@pytest.fixture
def broken_qtorch(monkeypatch):
    """qtorch's kernels fail to load, as on a machine without a compiler."""
    monkeypatch.setitem(sys.modules, "qtorch.quant", None)


def test_auto_uses_ours_on_cpu_without_loading_qtorch():
    backend, note = backends.choose_backend("auto", torch.device("cpu"))
    assert backend is backends.TORCH_BACKEND and note is None


@pytest.fixture
def broken_triton(monkeypatch):
    """Triton cannot be imported, as on a machine without it."""
    import swalp.quant

    monkeypatch.setitem(sys.modules, "swalp.quant.triton_kernels", None)
    monkeypatch.delattr(swalp.quant, "triton_kernels", raising=False)


def test_auto_prefers_triton_on_cuda_when_it_compiles(monkeypatch):
    from swalp.quant import triton_kernels

    compiled = []
    monkeypatch.setattr(triton_kernels, "available", lambda device: None)
    monkeypatch.setattr(triton_kernels, "compile_for", lambda device, *needed: compiled.append(device))
    backend, note = backends.choose_backend("auto", torch.device("cuda"))
    assert backend.name == "triton" and backend.seedable and backend.counter_based and note is None
    assert compiled == [torch.device("cuda")]  # compiled once, up front


def test_auto_falls_back_with_one_line_when_triton_is_unavailable(broken_triton):
    backend, note = backends.choose_backend("auto", torch.device("cuda"))
    assert backend is backends.TORCH_BACKEND
    assert note.startswith("the triton backend is unavailable (Triton cannot be imported") and "\n" not in note


def test_auto_falls_back_when_triton_does_not_compile(monkeypatch):
    from swalp.quant import triton_kernels

    def fail(*args):
        raise RuntimeError("ptxas failed\nmore lines")

    monkeypatch.setattr(triton_kernels, "available", lambda device: None)
    monkeypatch.setattr(triton_kernels, "compile_for", fail)
    backend, note = backends.choose_backend("auto", torch.device("cuda"))
    assert backend is backends.TORCH_BACKEND
    assert note == ("the triton backend is unavailable (Triton's kernels failed to compile (ptxas failed)); "
                    "using the torch backend")


def test_explicit_qtorch_that_does_not_build_is_a_clear_error(broken_qtorch):
    with pytest.raises(backends.BackendUnavailable):
        backends.choose_backend("qtorch", torch.device("cpu"))
    args = train.parse_args(["--data_path", "d", "--model", "VGG16", "--wl-weight", "8",
                                            "--quant-backend", "qtorch"])
    with pytest.raises(UserError, match="--quant-backend qtorch: qtorch's kernels failed to build"):
        choose_quantizers(args, torch.device("cpu"), swalp.StepNoise(0))


def test_full_precision_never_loads_a_backend(broken_qtorch):
    args = train.parse_args(["--data_path", "d", "--model", "VGG16", "--quant-backend", "qtorch"])
    rounding = choose_quantizers(args, torch.device("cpu"), swalp.StepNoise(0))
    assert rounding.backend is None and set(rounding.quantizers.values()) == {None}


def test_explicit_qtorch_failure_exits_with_code_2(broken_qtorch, cifar_in_process, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--data_path", str(cifar_in_process), "--model", "PreResNet20", "--wl-weight", "8",
                    "--quant-backend", "qtorch", "--epochs", "1", "--swa_start", "1", "--num_workers", "0",
                    "--dir", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().startswith("error: --quant-backend qtorch")
