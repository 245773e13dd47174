"""Per-layer precision (--layer-format, --list-layers), the EMA average and
NVFP4 in a run."""

import json

import pytest
import torch
import torch.nn as nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import models
import swalp
from grid import on_block_grid
from runs import EIGHT_BIT, SMALL, assert_same_run, refusal, table_rows
from swalp.errors import UserError
from swalp.quant import layers, specs
from swalp.quant.formats import BlockFormat

TINY = ["--dataset", "CIFAR10", "--model", "PreResNet20", "--epochs", 2, "--swa_start", 1, *SMALL]


@pytest.mark.parametrize("text, canonical", [
    ("features.0:fp32", "features.0:weight=fp32,activate=fp32,grad=fp32,error=fp32,momentum=fp32,acc=fp32"),
    ("classifier.*:weight=BFP16,activate=bfp16", "classifier.*:weight=bfp16,activate=bfp16"),
    ("last:activate=mxfp8,weight=nvfp4", "last:weight=nvfp4,activate=mxfp8e4m3"),
])
def test_a_rule_has_one_spelling(text, canonical):
    assert layers.LayerRule.parse(text).text == canonical
    assert layers.LayerRule.parse(canonical) == layers.LayerRule.parse(text)


@pytest.mark.parametrize("flags, message", [
    (["--layer-format", "features.0"], "argument --layer-format: 'features.0' is not a layer rule"),
    (["--layer-format", "a:kernel=bfp8"], "'kernel' is not a kind of number"),
    (["--layer-format", "a:bfp99"], "'a:bfp99': bfp99: block word length must be in [2, 22]"),
    (["--ema_start", "0"], "--ema_start applies only to --average ema"),
    (["--average", "ema", "--ema_decay", "1"], "--ema_decay: 1 must be between 0 and 1"),
    (["--average", "ema", "--swa_c_epochs", "2"], "do nothing with --average ema"),
])
def test_bad_rules_and_average_flags_end_in_one_line(capsys, flags, message):
    assert message in refusal(capsys, *flags)


def test_later_rules_win_and_reach_the_modules_inside_the_ones_they_name():
    net = models.build_model("PreResNet20", 10)
    names = layers.layer_names(net)
    assert names[0] == "conv1" and names[-1] == "fc"
    rules = [layers.LayerRule.parse(text) for text in ("layer1.*:bfp16", "layer1.0:weight=fp32", "last:bfp6")]
    default = {"weight": BlockFormat(8), "activate": BlockFormat(8)}
    assert layers.formats_for("layer1.0.conv1", default, rules, names)["weight"] is None
    assert layers.formats_for("layer1.0.conv1", default, rules, names)["activate"] == BlockFormat(16)
    assert layers.formats_for("layer1.1.conv2", default, rules, names)["weight"] == BlockFormat(16)
    assert layers.formats_for("fc", default, rules, names)["weight"] == BlockFormat(6)
    assert layers.formats_for("layer2.0.conv1", default, rules, names) == default
    with pytest.raises(UserError, match="'layer9.*:.*' matches no layer of PreResNet; the closest names: "):
        layers.check_rules(net, [layers.LayerRule.parse("layer9.*:fp32")])


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(6, 8)
        self.middle = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.middle(torch.relu(self.first(x)))))


def test_rules_give_the_layers_they_name_their_formats_in_the_model_and_the_optimizer():
    torch.manual_seed(0)
    net = Small()
    rules = [layers.LayerRule.parse(text) for text in ("first:fp32", "middle:weight=bfp12,activate=bfp12")]
    sites = swalp.quantize_model(net, "bfp8", "bfp8", sites=["first", "middle"], rules=rules, backend="torch")
    assert sites == ["middle"] and not hasattr(net.first, "quantizer")
    assert net.middle.quantizer.forward_quant.number_format == BlockFormat(12)
    sgd = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9)
    optimizer = swalp.wrap_optimizer(sgd, weight="bfp8", grad="bfp8", momentum="bfp8", rules=rules, model=net,
                                     backend="torch")
    for _ in range(2):
        optimizer.zero_grad()
        net(torch.randn(5, 6)).square().sum().backward()
        optimizer.step()
    assert not on_block_grid(net.first.weight.data, 16)  # full precision
    assert on_block_grid(net.middle.weight.data, 12) and not on_block_grid(net.middle.weight.data, 8)
    assert on_block_grid(net.head.weight.data, 8)
    assert on_block_grid(optimizer.optim.state[net.head.weight]["momentum_buffer"], 8)


def test_a_run_with_layer_rules_records_them_and_a_resume_must_keep_them(train_fast, tmp_path, monkeypatch):
    run_dir = tmp_path / "rules"
    flags = [*TINY, *EIGHT_BIT, "--data_path", train_fast.data_path, "--layer-format", "first:fp32",
             "--layer-format", "last:weight=bfp12"]
    result = train_fast(*flags, "--dir", run_dir)
    assert result.returncode == 0, result.stderr
    assert "layer rule: first:weight=fp32,activate=fp32," in result.stdout
    assert "20 activation quantizers" in result.stdout
    results = json.loads((run_dir / "results.json").read_text())
    assert results["config"]["layer_format"][1] == "last:weight=bfp12"
    checkpoint = torch.load(run_dir / "checkpoint-2.pt", weights_only=True)["model_state"]
    assert on_block_grid(checkpoint["fc.weight"], 12) and not on_block_grid(checkpoint["fc.weight"], 8)
    assert not on_block_grid(checkpoint["conv1.weight"], 16)
    assert on_block_grid(checkpoint["layer1.0.conv1.weight"], 8)
    other = train_fast(*flags[:-1], "last:weight=bfp10", "--dir", run_dir, "--resume", run_dir / "checkpoint-1.pt")
    assert other.returncode == 2 and "was written with --layer-format" in other.stderr
    monkeypatch.chdir(tmp_path)
    default_name = train_fast(*TINY, *EIGHT_BIT, "--data_path", train_fast.data_path, "--layer-format", "first:fp32",
                              "--epochs", 1, "--swa_start", 1)
    assert default_name.returncode == 0, default_name.stderr
    assert [path.name for path in (tmp_path / "runs").iterdir()] == [
        f"CIFAR10-PreResNet20-W8A8G8E8M8-{layers.tag([layers.LayerRule.parse('first:fp32')])}-seed1"]


def test_list_layers_prints_every_layer_and_site_and_exits(train_in_process):
    code, stdout, stderr = train_in_process("--model", "PreResNet20", "--dataset", "digits", "--list-layers",
                                            "--format", "bfp8", "--layer-format", "first:fp32")
    assert code == 0, stderr
    rows = {line.split()[0]: line.split() for line in stdout.splitlines()[2:]}
    assert rows["conv1"][1:] == ["Conv2d", "0", *["fp32"] * 6]
    assert rows["fc"][1:] == ["Linear", "bfp8", "bfp8", "bfp8", "bfp8"]  # not a site: no activation or error
    assert len(rows) == 22  # 21 convolutions (all sites) and the classifier


def test_the_ema_is_the_exponential_average_of_every_step_from_ema_start(train_fast, tmp_path):
    run_dir = tmp_path / "ema"
    flags = [*TINY, *EIGHT_BIT, "--data_path", train_fast.data_path, "--average", "ema", "--ema_decay", "0.9",
             "--ema_start", 0, "--save_freq", 1, "--dir", run_dir]
    result = train_fast(*flags)
    assert result.returncode == 0, result.stderr
    results = json.loads((run_dir / "results.json").read_text())
    steps = 3  # 40 images, batches of 16
    assert [record["swa_n"] for record in results["epochs"]] == [steps, 2 * steps]
    assert all(record["collected_at_steps"] == [] for record in results["epochs"])
    assert results["epochs"][0]["swa_test_accuracy"] is not None  # averaged and evaluated from the first epoch
    checkpoint = torch.load(run_dir / "checkpoint-2.pt", weights_only=True)
    assert int(checkpoint["swa_state"]["n_averaged"]) == 2 * steps
    average, weights = checkpoint["swa_state"]["module.fc.weight"], checkpoint["model_state"]["fc.weight"]
    assert not torch.equal(average, weights) and not on_block_grid(average, 8)  # a float32 average of 8-bit weights


def test_an_ema_run_resumed_mid_epoch_matches_the_uninterrupted_one(train_fast, tmp_path):
    flags = [*TINY, *EIGHT_BIT, "--data_path", train_fast.data_path, "--average", "ema", "--save_every_steps", 2]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert train_fast(*flags, "--dir", whole).returncode == 0
    import shutil

    resumed.mkdir()
    shutil.copy(whole / "checkpoint-1.pt", resumed)
    result = train_fast(*flags, "--dir", resumed, "--resume", resumed / "checkpoint-1.pt")
    assert result.returncode == 0, result.stderr
    assert_same_run(whole, resumed, epochs=2)


def test_the_ema_update_is_torchs():
    """What AveragedModel with get_ema_multi_avg_fn does, checked by hand on
    the weights after each of three steps."""
    torch.manual_seed(0)
    net = Small()
    ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.8))
    expected = None
    sgd = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(3):
        sgd.zero_grad()
        net(torch.randn(4, 6)).sum().backward()
        sgd.step()
        ema.update_parameters(net)
        weight = net.first.weight.detach()
        expected = weight.clone() if expected is None else 0.8 * expected + 0.2 * weight
    torch.testing.assert_close(ema.module.first.weight, expected)


def test_nvfp4_weights_train_on_the_torch_backend_and_qtorch_refuses_them(train_fast, tmp_path):
    run_dir = tmp_path / "nvfp4"
    result = train_fast(*TINY, "--data_path", train_fast.data_path, "--format-weight", "nvfp4", "--epochs", 1,
                        "--dir", run_dir)
    assert result.returncode == 0, result.stderr
    assert "weight    : NVFP4 (E2M1 elements" in result.stdout
    assert [int(row[0]) for row in table_rows(result.stdout)] == [1]
    weight = torch.load(run_dir / "checkpoint-1.pt", weights_only=True)["model_state"]["layer1.0.conv1.weight"]
    assert torch.equal(specs.parse("nvfp4").quantize(weight, "nearest", swalp.select_backend("torch")), weight)
    refused = train_fast(*TINY, "--data_path", train_fast.data_path, "--format-weight", "nvfp4",
                         "--quant-backend", "qtorch", "--dir", tmp_path / "qtorch")
    assert refused.returncode == 2 and "the qtorch backend cannot compute nvfp4" in refused.stderr
