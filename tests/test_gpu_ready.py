"""What a GPU run depends on, checked without one: the device its kernels
and generators use, the float32 arithmetic, bit-exact input scaling, and a
training step that never makes the host wait for the device."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import train
from swalp.data import batched
from swalp.quant import torch_kernels
from swalp.run import device as devices
from swalp.run import rng


class Recorder(TorchDispatchMode):
    """The aten operations run inside it: reads back to the host, and copies
    from the host to another device with whether they wait for it."""

    def __init__(self):
        super().__init__()
        self.reads, self.copies = 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        if func is torch.ops.aten._to_copy.default and args[0].device.type == "cpu" \
                and kwargs.get("device") not in (None, torch.device("cpu")):
            self.copies.append(kwargs.get("non_blocking", False))
        return func(*args, **kwargs)


def test_a_cuda_device_becomes_the_current_one_for_triton(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert devices.resolve_device("cuda:1") == torch.device("cuda", 1) and chosen == [torch.device("cuda", 1)]


def test_the_cuda_generator_saved_and_restored_is_the_training_devices(monkeypatch):
    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: asked.append(("get", device)) or torch.zeros(8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: asked.append(("set", device)))
    state = rng.rng_state(torch.device("cuda", 1))
    rng.set_rng_state(state, torch.device("cuda", 1))
    assert asked == [("get", torch.device("cuda", 1)), ("set", torch.device("cuda", 1))]


def test_float32_arithmetic_is_ieee_unless_tf32_is_asked_for(monkeypatch):
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    monkeypatch.setattr(conv, "fp32_precision", conv.fp32_precision)  # restored after the test
    monkeypatch.setattr(matmul, "fp32_precision", matmul.fp32_precision)
    devices.use_tf32(False)
    assert (conv.fp32_precision, matmul.fp32_precision) == ("ieee", "ieee")
    devices.use_tf32(True)
    assert (conv.fp32_precision, matmul.fp32_precision) == ("tf32", "tf32")


def test_a_run_sets_its_float32_arithmetic_before_training(cifar_in_process, tmp_path, monkeypatch):
    class Reached(Exception):
        pass

    def record(enabled):
        raise Reached(enabled)

    monkeypatch.setattr(devices, "use_tf32", record)
    for flags, expected in (([], False), (["--tf32"], True)):
        with pytest.raises(Reached) as reached:
            train.main(["--data_path", str(cifar_in_process), "--model", "PreResNet20", "--epochs", "1",
                        "--swa_start", "1", "--dir", str(tmp_path / str(expected)), *flags])
        assert reached.value.args == (expected,)


def test_bytes_become_the_correctly_rounded_quotient_on_any_device():
    """ToTensor divides on the CPU; CUDA divides by a Python number as a
    product with its reciprocal, 126 byte values one ulp off. The batched
    path divides by a tensor, the same true division everywhere."""
    values = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    quotient = (torch.arange(256, dtype=torch.float64) / 255).float().view(1, 1, 16, 16)
    normalised = batched.normalise(values, batched.BatchAugmentation(0, 0.0, None, None))
    assert torch.equal(normalised, quotient)
    assert int((values.float() * torch.tensor(1 / 255) != quotient).sum()) == 126


def test_a_batch_costs_one_copy_to_the_device_that_does_not_wait(monkeypatch):
    """On a device (meta stands in for a GPU here), each batch's crops and
    flips travel in one non-blocking copy."""
    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8, device="meta")
    augmentation = batched.BatchAugmentation(2, 0.5, (0.5,) * 3, (0.2,) * 3)
    top, left, flip = batched.draw_augmentation(torch.Generator().manual_seed(0), 6, augmentation)
    batched.augment(images, top, left, flip, augmentation)  # the per-channel constants move once, here
    with Recorder() as recorder:
        batched.augment(images, top, left, flip, augmentation)
    assert recorder.copies == [True] and recorder.reads == 0


def test_rounding_makes_no_tensor_from_host_values_on_the_device(monkeypatch):
    """A tensor built from Python values on a GPU is a copy the host waits
    for (fixed point built its exponents so, twice per call)."""
    made = []
    for name in ("tensor", "as_tensor"):
        factory = getattr(torch, name)

        def recording(*args, factory=factory, **kwargs):
            made.append(kwargs.get("device"))
            return factory(*args, **kwargs)

        monkeypatch.setattr(torch, name, recording)
    x = torch.randn(4, 5, device="meta")
    with Recorder() as recorder:
        torch_kernels.fixed_point_quantize(x, 8, 4, rounding="nearest")
        torch_kernels.block_quantize(x, 8, 0, "nearest")
        torch_kernels.float_quantize(x, 4, 3, "nearest")
    assert [device for device in made if device is not None] == [] and recorder.reads == 0


def test_a_training_step_reads_nothing_back_as_on_a_gpu(cifar_in_process, tmp_path, monkeypatch):
    """With the GPU's decisions (the torch backend's clip taken on the
    device), an 8-bit epoch of 3 steps reads back exactly what an epoch of 1
    step does: the loss, accuracy and finite check wait for the epoch's end
    (and for averaging or saving), no step reads anything."""
    monkeypatch.setattr(torch_kernels, "_decide_on_host", lambda device: False)
    reads = {}
    for batch_size in (16, 40):  # 40 training images: 3 steps, then 1
        args = train.parse_args(["--data_path", str(cifar_in_process), "--model", "PreResNet20", "--epochs", "1",
                                 "--swa_start", "1", "--batch_size", str(batch_size), "--dir", str(tmp_path),
                                 "--format", "bfp8", "--rounding", "stochastic"])
        run = train.build(args, torch.device("cpu"), str(tmp_path))
        run.open_logs(resumed=False)
        with Recorder() as recorder:
            assert train.train_epoch(run, stop=False)
        run.close_logs()
        reads[run.steps_per_epoch] = recorder.reads
    assert set(reads) == {3, 1} and reads[3] == reads[1], reads


def test_the_gpu_checks_comparison_counts_differing_bits_but_not_nan_signs():
    from benchmarks import gpu_check

    a = torch.tensor([1.0, float("nan"), 2.0, 0.0])
    b = torch.tensor([1.0, -float("nan"), 2.5, -0.0])
    assert gpu_check.same_bits(a, b) == 2  # 2.0 against 2.5, and +0 against -0
    cases = gpu_check.edge_cases()
    assert cases.isnan().any() and cases.isinf().any() and (cases.abs() < 1.2e-38).any() and (cases == 0).any()
