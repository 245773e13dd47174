"""Number formats on the command line of train.py."""

import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import swalp
import train
from runs import SMALL, refusal
from swalp.errors import UserError
from swalp.quant import backends, kinds, specs, torch_kernels
from swalp.run import arguments
from swalp.run.quantizers import choose_quantizers

# qtorch's floating point (the slowest kernel here) on the small momentum buffers only.
MIXED = ["--format-weight", "MXFP8", "--format-activate", "fp8e5m2", "--format-grad", "fixed8.6",
         "--format-error", "bfp8/32", "--format-momentum", "e4m3", "--format-acc", "mxint8"]


def on_grid(tensor, spec):
    """A tensor on a format's grid is left unchanged by nearest rounding to it."""
    return torch.equal(specs.parse(spec).quantize(tensor, "nearest", backends.TORCH_BACKEND), tensor)


def train_in_process(data_path, run_dir, *extra):
    train.main(["--data_path", str(data_path), "--model", "PreResNet20", "--swa_start", "1", "--dir", str(run_dir),
                *map(str, SMALL), *extra])


def test_a_run_with_a_format_per_kind(cifar_in_process, tmp_path, capsys):
    run_dir = tmp_path / "mixed"
    train_in_process(cifar_in_process, run_dir, "--epochs", "1", *MIXED)
    result = capsys.readouterr()
    for line in ("weight    : MX mxfp8e4m3 (E4M3 elements, E8M0 floor scale per block of 32)",
                 "activate  : OCP FP8 E5M2 (largest 57344, saturating)", "grad      : FixedFormat(wl=8, fl=6",
                 "error     : BlockFloatingPoint(wl=8, block_size=32)",
                 "momentum  : FloatFormat(exp=4, man=3)", "acc       : MX mxint8"):
        assert line in result.out, line
    config = json.loads((run_dir / "results.json").read_text())["config"]
    assert [config[f"format_{kind}"] for kind in kinds.NUMBER_KINDS] == [
        "mxfp8e4m3", "fp8e5m2", "fixed8.6", "bfp8/32", "e4m3", "mxint8", None]  # no second moment with SGD
    assert all(config[f"wl_{kind}"] == -1 for kind in kinds.NUMBER_KINDS)

    checkpoint = torch.load(run_dir / "checkpoint-1.pt", weights_only=True)
    weights = [checkpoint["model_state"][name] for name in ("conv1.weight", "fc.weight", "fc.bias")]
    assert all(on_grid(weight, "mxfp8") for weight in weights)
    assert not all(on_grid(weight, "mxfp4") for weight in weights)  # not merely on a coarser grid by accident
    assert all(on_grid(accumulator, "mxint8") for accumulator in checkpoint["weight_acc"])
    momenta = [state["momentum_buffer"] for state in checkpoint["optimizer_state"]["state"].values()]
    assert momenta and all(on_grid(momentum, "e4m3") for momentum in momenta)

    events = EventAccumulator(str(run_dir))
    events.Reload()
    text = events.Tensors("formats/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "MX mxfp8e4m3" in text and "OCP FP8 E5M2" in text

    with pytest.raises(SystemExit) as exit_info:
        train_in_process(cifar_in_process, run_dir, "--epochs", "2", *MIXED[:-1], "mxfp4",
                         "--resume", str(run_dir / "checkpoint-1.pt"))
    assert exit_info.value.code == 2
    assert "written with --format-acc mxint8, this run has mxfp4e2m1" in capsys.readouterr().err


def flags(*extra):
    return train.parse_args(["--data_path", "d", "--model", "VGG16", *extra])


def test_run_names_carry_the_formats():
    assert kinds.precision_tag(flags(*MIXED).formats) == "Wmxfp8e4m3Afp8e5m2Gfixed8.6Ebfp8k32Me4m3Accmxint8"
    assert kinds.precision_tag(flags("--format", "bfp8", "--format-acc", "fp32").formats) == "W8A8G8E8M8"
    assert kinds.precision_tag(flags("--format", "fp32").formats) == "FP"


def test_format_sets_every_kind_and_a_kinds_own_spec_wins():
    args = flags("--format", "MXFP4", "--format-grad", "bf16", "--format-momentum", "bfp6")
    specs_given = {kind: arguments.config(args)[f"format_{kind}"] for kind in kinds.NUMBER_KINDS}
    assert specs_given == {"weight": "mxfp4e2m1", "activate": "mxfp4e2m1", "grad": "e8m7",
                           "error": "mxfp4e2m1", "momentum": None, "acc": "mxfp4e2m1", "moment2": None}
    assert arguments.config(args)["wl_momentum"] == 6  # bfp6 is --wl-momentum 6: the same run
    assert vars(flags("--format-weight", "bfp8")) == vars(flags("--wl-weight", "8")) | {"format": None}


@pytest.mark.parametrize("extra, complaint", [
    (["--format-grad", "e4m3x"], "argument --format-grad: 'e4m3x' is not a number format; use one of fp32,"),
    (["--format", "bfp30"], "argument --format: bfp30: block word length must be in [2, 22]"),
    (["--format", "mxfp8", "--wl-acc", "-1"], "--wl-acc and --format both set the acc format; keep one"),
    (["--wl-weight", "8", "--format-weight", "e5m2"], "--wl-weight and --format-weight both set the weight format"),
])
def test_bad_or_conflicting_formats_are_one_line_and_exit_2(extra, complaint, capsys):
    assert complaint in refusal(capsys, *extra)


def test_a_backend_without_the_formats_kernel_is_refused_or_falls_back(monkeypatch):
    lean = backends.Backend("qtorch", torch_kernels.block_quantize, torch_kernels.fixed_point_quantize,
                                torch_kernels.float_quantize, seedable=False)
    monkeypatch.setattr(backends, "choose_backend", lambda name, device, *needed: (lean, None))
    with pytest.raises(UserError, match="--quant-backend qtorch: the qtorch backend cannot compute mxfp8e4m3"):
        choose_quantizers(flags("--format-weight", "mxfp8", "--quant-backend", "qtorch"), torch.device("cpu"),
                               swalp.StepNoise(0))
    quantizers = choose_quantizers(flags("--format-weight", "mxfp8", "--format-grad", "e4m3"),
                                   torch.device("cpu"), swalp.StepNoise(0)).quantizers
    assert quantizers["weight"].backend is backends.TORCH_BACKEND and quantizers["grad"].backend is lean
