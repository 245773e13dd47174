"""The triton backend: its kernels and a training run under Triton's
interpreter on the CPU (in processes of their own, see
tests/triton_interpreted.py), and what needs no kernel at all."""

import json
import os
from pathlib import Path

import pytest
import torch

import swalp
import train
import triton_interpreted
from swalp.errors import UserError
from swalp.quant import backends, formats, quantizer
from swalp.quant import noise as noise_streams
from swalp.run import rng
from swalp.run.quantizers import choose_quantizers

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def interpreted(request):
    """Every check of triton_interpreted.py, run once in one process, which
    conftest started in the background when the session began."""
    process, work = request.config.interpreted_checks
    process.wait(timeout=600)
    outcomes = {}
    for line in (Path(work) / "stdout").read_text().splitlines():
        if line.startswith("{"):
            outcome = json.loads(line)
            outcomes[outcome["check"]] = outcome
    assert outcomes, (Path(work) / "stderr").read_text()[-3000:]
    return outcomes


@pytest.mark.parametrize("check", sorted(triton_interpreted.CHECKS))
def test_under_the_interpreter(interpreted, check):
    assert check in interpreted, "the check did not run"
    assert interpreted[check]["ok"], interpreted[check]["error"]


def test_step_noise_keys_share_the_optimizer_stream_across_ranks_only():
    ranks = [swalp.StepNoise(9, step=4, rank=rank) for rank in (0, 1)]
    optimizer_keys = {noise.key(2, noise_streams.OPTIMIZER_STREAM) for noise in ranks}
    assert optimizer_keys == {noise_streams.NoiseKey(9, 2, 4, noise_streams.OPTIMIZER_STREAM)}
    for stream in (noise_streams.FORWARD_STREAM, noise_streams.BACKWARD_STREAM):
        assert ranks[0].key(2, stream) != ranks[1].key(2, stream)
    assert len({ranks[0].key(2, stream) for stream in range(4)}) == 4
    assert ranks[0].key(2, noise_streams.FORWARD_STREAM) != ranks[0].key(3, noise_streams.FORWARD_STREAM)


def test_passes_without_gradients_draw_anew_until_the_next_step():
    noise = swalp.StepNoise(9)
    keys = [noise.key(5, noise_streams.NO_GRAD_STREAM) for _ in range(3)]
    assert len(set(keys)) == 3 and {key.identity & 0xFFF for key in keys} == {5}
    assert noise.key(5, noise_streams.FORWARD_STREAM) == noise.key(5, noise_streams.FORWARD_STREAM)
    noise.advance()
    assert noise.key(5, noise_streams.NO_GRAD_STREAM) == keys[0]._replace(step=1)
    resumed = swalp.StepNoise(9)
    resumed.seek(1)
    assert resumed.key(5, noise_streams.NO_GRAD_STREAM) == keys[0]._replace(step=1)


def test_with_the_step_as_a_tensor_passes_without_gradients_are_counted_in_a_tensor():
    noise = swalp.StepNoise(9)
    step = noise.step_tensor("cpu")
    keys = [noise.key(5, noise_streams.NO_GRAD_STREAM, step) for _ in range(3)]
    assert [int(key.identity) for key in keys] == [5, 5 + 4096, 5 + 8192]  # one count for all sites
    assert int(noise.key(6, noise_streams.NO_GRAD_STREAM, step).identity) == 6 + 3 * 4096
    noise.advance()
    assert int(step) == 1 and int(noise.key(5, noise_streams.NO_GRAD_STREAM, step).identity) == 5


def test_a_training_pass_rounds_on_the_forward_stream_and_evaluation_on_its_own():
    seen = []

    class Recording(quantizer.TensorQuantizer):
        def __call__(self, x, inplace=False, identity=0, stream=noise_streams.OPTIMIZER_STREAM):
            seen.append((identity, stream))
            return x.clone()

    recording = Recording(formats.BlockFormat(8), "nearest")
    site = quantizer.Quantizer(recording, recording, site=7)
    x = torch.randn(2, 3, requires_grad=True)
    site(x).sum().backward()
    with torch.no_grad():
        site(x)
    assert seen == [(7, noise_streams.FORWARD_STREAM), (7, noise_streams.BACKWARD_STREAM),
                    (7, noise_streams.NO_GRAD_STREAM)]


def test_a_format_a_backend_lacks_is_refused_in_one_line():
    block_only = backends.TORCH_BACKEND._replace(name="blocky", fixed=None, block_sizes=False)
    with pytest.raises(backends.UnsupportedFormat, match="the blocky backend cannot round FixedFormat"):
        quantizer.TensorQuantizer(formats.FixedFormat(8, 4), "nearest", block_only)
    with pytest.raises(backends.UnsupportedFormat, match="the blocky backend cannot round BlockFloatingPoint"):
        quantizer.TensorQuantizer(formats.BlockFormat(8, block_size=32), "nearest", block_only)
    quantizer.TensorQuantizer(formats.BlockFormat(8), "nearest", block_only)


def test_a_quantizer_on_a_backend_without_batched_kernels_rounds_a_list_one_tensor_at_a_time():
    torch.manual_seed(0)
    tensors = [torch.randn(4, 3) * 10, torch.randn(5)]
    expected = [formats.BlockFormat(6).quantize(t, "nearest", backends.TORCH_BACKEND) for t in tensors]
    rounding = quantizer.TensorQuantizer(formats.BlockFormat(6), "nearest", backends.TORCH_BACKEND)
    out = [torch.empty_like(t) for t in tensors]
    rounding.round_many(tensors, identity=0, out=out)
    assert all(torch.equal(a, b) for a, b in zip(out, expected))
    rounding.round_many(tensors, identity=0)
    assert all(torch.equal(a, b) for a, b in zip(tensors, expected))


def test_triton_without_a_gpu_or_the_interpreter_is_a_clear_error(monkeypatch):
    from swalp.quant import triton_kernels

    monkeypatch.setattr(triton_kernels, "INTERPRETING", False)
    args = train.parse_args(["--data_path", "d", "--model", "VGG16", "--wl-weight", "8", "--quant-backend", "triton"])
    with pytest.raises(UserError, match="^--quant-backend triton: Triton's kernels run on CUDA devices") as error:
        choose_quantizers(args, torch.device("cpu"), swalp.StepNoise(0))
    assert "\n" not in str(error.value) and str(error.value).endswith("use --quant-backend torch")


def test_deterministic_flag_asks_for_deterministic_kernels(cifar_in_process, tmp_path, monkeypatch):
    class Reached(Exception):
        pass

    def record():
        raise Reached

    monkeypatch.setattr(rng, "use_deterministic_algorithms", record)
    with pytest.raises(Reached):
        train.main(["--data_path", str(cifar_in_process), "--model", "PreResNet20", "--epochs", "1",
                    "--swa_start", "1", "--num_workers", "0", "--dir", str(tmp_path / "run"), "--deterministic"])


def test_deterministic_algorithms_settings(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)  # restored after the test
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        rng.use_deterministic_algorithms()
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
