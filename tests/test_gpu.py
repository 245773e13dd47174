"""The correctness parts of benchmarks/gpu_check.py under pytest: run where a
GPU is lent (skipped without CUDA)."""

import pytest
import torch

from benchmarks import gpu_check

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def device():
    return torch.device("cuda", torch.cuda.current_device())


def test_nearest_rounding_is_the_same_on_the_gpu_and_the_cpu(device):
    result = gpu_check.section_nearest(device)
    assert result["all_identical"], result["rows"]


def test_stochastic_rounding_on_the_gpu_equals_the_interpreted_kernels(device):
    result = gpu_check.section_stochastic(device)
    assert result.get("all_identical"), result


def test_the_training_loop_and_the_loader_do_not_wait_for_the_gpu(device):
    result = gpu_check.section_syncs(device)
    assert all(row["per_step"] == 0 for row in result["loop"]) and result["loader_batch_syncs"] == 0, result


def test_train_py_on_cuda_repeats_and_resumes_bit_for_bit(device):
    result = gpu_check.section_train(device)
    assert result["repeats_bit_for_bit"] and result["resume_is_exact"], result


def test_compiled_rounding_on_the_gpu_draws_the_triton_backends_bits(device):
    result = gpu_check.compiled_bits(device)
    assert result["all_identical"], result
