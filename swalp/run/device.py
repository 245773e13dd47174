"""The training device a run names, checked before anything is built, and
the float32 arithmetic of its matrix products and convolutions."""

import torch

from swalp.errors import UserError
from swalp.run import rng


def resolve_device(name):
    """The torch.device for --device `name` (auto: CUDA when available, else
    the CPU). A CUDA device becomes the current one: Triton launches its
    kernels on the current device and its stream, not on the tensors'."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name} is not supported; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available here; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices")
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        torch.cuda.set_device(device)
    return device


def configure(device, tf32=False, deterministic=False):
    """A run's arithmetic: TF32 or not (`use_tf32`), and deterministic
    kernels (`rng.use_deterministic_algorithms`) or, on CUDA, cuDNN's
    autotuned ones."""
    use_tf32(tf32)
    if deterministic:
        rng.use_deterministic_algorithms()
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def use_tf32(enabled):
    """float32 convolutions and matrix products in IEEE float32 (the
    paper's arithmetic), or with TF32 tensor cores (`enabled`): torch 2.14
    lets cuDNN convolutions use TF32 by default. The CPU is unaffected."""
    precision = "tf32" if enabled else "ieee"
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        conv.fp32_precision = precision
        torch.backends.cuda.matmul.fp32_precision = precision
    else:  # torch before 2.9
        torch.backends.cudnn.allow_tf32 = enabled
        torch.backends.cuda.matmul.allow_tf32 = enabled
