"""Random-generator state: seeding every generator a run draws from, saving
and restoring them for an exact resume, and deterministic GPU kernels."""

import os
import random

import numpy as np
import torch


def seed_everything(seed):
    """Seed Python, NumPy and torch (CPU and every CUDA device); activation
    and error rounding of the torch backend draws from torch's generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _cuda(device):
    """The CUDA device whose generator a run on `device` draws from."""
    return device if device is not None and device.type == "cuda" else torch.cuda.current_device()


def rng_state(device=None):
    """Every random generator the run draws from, as tensors and plain values
    (so checkpoints load with torch.load(weights_only=True)): the CUDA one of
    the training `device` (not merely the current device)."""
    numpy_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)),
                  *numpy_state[2:]],
        "torch": torch.get_rng_state(),
        # This process's device only: a resumed run may see fewer GPUs.
        "cuda": [torch.cuda.get_rng_state(_cuda(device))] if torch.cuda.is_available() else [],
    }


def set_rng_state(state, device=None):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"][0], _cuda(device))


def use_deterministic_algorithms():
    """Deterministic kernels only (PyTorch's flag, cuDNN's, no cuDNN
    autotuning, and the fixed cuBLAS workspace that deterministic cuBLAS
    needs). An operation without a deterministic CUDA kernel warns instead of
    stopping the run. The CPU kernels used here are deterministic already."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
