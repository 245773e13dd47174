"""The vision transformer and low-precision AdamW."""

import json
import shutil

import torch
import torch.nn.functional as F

import models
import swalp
from grid import on_block_grid
from models.vit import SITES, Attention
from runs import EIGHT_BIT, SMALL, assert_same_run, checkpoint_mid_epoch
from test_distributed import torchrun

ADAMW = ["--optimizer", "adamw", "--lr_init", 0.002, "--wd", 0.05]
ADAMW_RUN = ["--dataset", "CIFAR10", "--model", "PreResNet20", "--epochs", 2, "--swa_start", 1, *SMALL, *ADAMW,
             *EIGHT_BIT, "--format-moment2", "e8m7", "--save_every_steps", 2]


def test_the_vit_has_about_2_7m_parameters_and_eight_named_sites_per_block():
    net = models.build_model("ViT", 10)
    assert 2.6e6 < sum(p.numel() for p in net.parameters()) < 2.8e6
    names = {id(module): name for name, module in net.named_modules()}
    sites = [names[id(module)] for module in net.quantizer_sites("layer")]
    assert sites == [f"blocks.{block}.{site}" for block in range(6) for site in SITES] and len(sites) == 48
    assert net.quantizer_sites("relu") == net.quantizer_sites("layer")


def test_explicit_attention_is_scaled_dot_product_attention():
    torch.manual_seed(0)
    attention = Attention(192, 3)
    x = torch.randn(2, 65, 192)
    q, k, v = attention.qkv(x).reshape(2, 65, 3, 3, 64).permute(2, 0, 3, 1, 4)
    expected = attention.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 65, 192))
    torch.testing.assert_close(attention(x), expected)


def test_every_site_rounds_its_operand_forward_and_its_error_backward():
    torch.manual_seed(0)
    net = models.build_model("ViT", 10)
    sites = net.quantizer_sites("layer")
    assert len(swalp.quantize_model(net, "bfp8", "bfp8", sites=sites, rounding="nearest", backend="torch")) == 48
    operands, errors = {}, {}

    def record(module, inputs, output):
        operands[module] = output
        inputs[0].register_hook(lambda grad: errors.__setitem__(module, grad))

    for site in sites:
        site.register_forward_hook(record)
    images = torch.randn(2, 3, 32, 32)
    F.cross_entropy(net(images), torch.tensor([1, 7])).backward()
    assert len(operands) == len(errors) == 48
    for site in sites:
        assert on_block_grid(operands[site].detach(), 8), site
        assert errors[site].abs().sum() > 0 and on_block_grid(errors[site], 8), site
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def fixed(x, wl, fl):
    """Fixed-point nearest rounding, by hand."""
    return (torch.round(x * 2.0 ** fl) / 2.0 ** fl).clamp(-2.0 ** (wl - fl - 1), 2.0 ** (wl - fl - 1) - 2.0 ** -fl)


def test_an_adamw_lp_step_is_adamw_between_roundings():
    """Two steps of AdamW with every kind in fixed point, nearest rounding,
    against the same steps written out: the gradient rounded, the decoupled
    decay and the Adam update of the rounded moments, then the weights and
    both moments rounded."""
    torch.manual_seed(0)
    net = torch.nn.Linear(5, 3)
    lr, wd, beta1, beta2, eps = 0.01, 0.1, 0.9, 0.99, 1e-8
    adamw = torch.optim.AdamW(net.parameters(), lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=wd, foreach=False)
    formats = {"weight": (16, 12), "grad": (12, 8), "momentum": (14, 12), "moment2": (24, 22)}
    optimizer = swalp.wrap_optimizer(adamw, **{kind: f"fixed{wl}.{fl}" for kind, (wl, fl) in formats.items()},
                                     rounding="nearest", backend="torch")
    expected = {p: fixed(p.detach().clone(), *formats["weight"]) for p in net.parameters()}
    for p in net.parameters():
        p.data = expected[p].clone()
    moments = {p: (torch.zeros_like(p), torch.zeros_like(p)) for p in net.parameters()}
    for step in (1, 2):
        optimizer.zero_grad()
        net(torch.randn(8, 5)).pow(2).sum().backward()
        for p in net.parameters():
            grad = fixed(p.grad, *formats["grad"])
            m, v = moments[p]
            # torch's own elementwise operations, so that the float32 roundings agree
            m = m.lerp(grad, 1 - beta1)
            v = v.mul(beta2).addcmul(grad, grad, value=1 - beta2)
            decayed = expected[p].mul(1 - lr * wd)
            denom = (v.sqrt() / (1 - beta2 ** step) ** 0.5).add(eps)
            expected[p] = fixed(decayed.addcdiv(m, denom, value=-lr / (1 - beta1 ** step)), *formats["weight"])
            moments[p] = fixed(m, *formats["momentum"]), fixed(v, *formats["moment2"])
        optimizer.step()
        for p in net.parameters():
            torch.testing.assert_close(p.detach(), expected[p], rtol=0, atol=0)
            torch.testing.assert_close(adamw.state[p]["exp_avg"], moments[p][0], rtol=0, atol=0)
            torch.testing.assert_close(adamw.state[p]["exp_avg_sq"], moments[p][1], rtol=0, atol=0)
    assert sorted(adamw.state[net.weight]) == ["exp_avg", "exp_avg_sq", "step"]


def test_an_adamw_run_repeats_and_resumes_mid_epoch_exactly(train_fast, tmp_path):
    flags = [*ADAMW_RUN, "--data_path", train_fast.data_path]
    whole, again, resumed = tmp_path / "whole", tmp_path / "again", tmp_path / "resumed"
    for run_dir in (whole, again):
        result = train_fast(*flags, "--dir", run_dir)
        assert result.returncode == 0, result.stderr
    assert "moment2   : FloatFormat(exp=8, man=7), stochastic, torch backend" in result.stdout
    assert_same_run(whole, again, epochs=2)

    checkpoint = checkpoint_mid_epoch(flags, resumed)
    result = train_fast(*flags, "--dir", resumed, "--resume", checkpoint)
    assert result.returncode == 0, result.stderr
    assert "after epoch 0, step 2" in result.stdout
    assert_same_run(whole, resumed, epochs=2)
    config = json.loads((whole / "results.json").read_text())["config"]
    assert config["optimizer"] == "adamw" and config["format_moment2"] == "e8m7" and config["beta2"] == 0.999


def test_a_checkpoint_of_one_optimizer_cannot_resume_as_the_other(train_fast, tmp_path):
    run_dir = tmp_path / "adamw"
    assert train_fast(*ADAMW_RUN, "--data_path", train_fast.data_path, "--dir", run_dir).returncode == 0
    sgd_flags = [*ADAMW_RUN[:ADAMW_RUN.index("--format-moment2")], *ADAMW_RUN[ADAMW_RUN.index("e8m7") + 1:]]
    sgd_flags[sgd_flags.index("adamw")] = "sgd"
    shutil.copy(run_dir / "checkpoint-1.pt", tmp_path / "checkpoint-1.pt")
    result = train_fast(*sgd_flags, "--data_path", train_fast.data_path, "--dir", tmp_path / "sgd",
                        "--resume", tmp_path / "checkpoint-1.pt")
    assert result.returncode == 2 and "--optimizer" in result.stderr.strip().splitlines()[-1]


def test_two_gloo_ranks_running_adamw_stay_bit_identical(fake_cifar_env, cifar_root, tmp_path):
    run_dir = tmp_path / "ddp"
    flags = [*ADAMW_RUN, "--epochs", 1, "--batch_size", 8, "--data_path", cifar_root, "--dir", run_dir]
    result = torchrun(fake_cifar_env, *flags)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    checkpoint = torch.load(run_dir / "checkpoint-1.pt", weights_only=True)
    # The digests cover the weights and both moments, compared at every save (every 2 steps).
    assert checkpoint["world_size"] == 2 and len(set(checkpoint["replica_digests"])) == 1
    assert all("exp_avg_sq" in state for state in checkpoint["optimizer_state"]["state"].values())


def test_a_low_precision_vit_trains_with_adamw_and_its_swa_model_is_evaluated(train_fast, tmp_path):
    run_dir = tmp_path / "vit"
    result = train_fast("--dataset", "CIFAR10", "--model", "vit", "--epochs", 2, "--swa_start", 1,
                        "--batch_size", 20, "--num_workers", 0, *ADAMW, "--format", "bfp8", "--layer-format",
                        "blocks.0.attn.probs:fp32", "--data_path", train_fast.data_path, "--dir", run_dir)
    assert result.returncode == 0, result.stderr
    assert "Model ViT: 47 activation quantizers" in result.stdout  # the rule's site has none
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "finished" and results["swa_n"] == 2
    assert results["epochs"][-1]["swa_test_accuracy"] is not None
    assert results["config"]["layer_format"] == [  # canonical: every kind spelled out
        "blocks.0.attn.probs:weight=fp32,activate=fp32,grad=fp32,error=fp32,momentum=fp32,acc=fp32"]


def test_list_layers_names_the_vits_sites_and_the_formats_rules_give_them(train_in_process):
    code, stdout, stderr = train_in_process("--dataset", "digits", "--model", "ViT", "--optimizer", "adamw",
                                            "--format", "bfp8", "--layer-format", "blocks.5.mlp.*:fp32",
                                            "--layer-format", "last:bfp16", "--list-layers")
    assert code == 0, stderr
    header = stdout.splitlines()[0].split()
    assert header == ["layer", "type", "site", "weight", "activate", "grad", "error", "momentum", "acc", "moment2"]
    rows = {line.split()[0]: line.split() for line in stdout.splitlines()[2:]}
    assert rows["blocks.0.attn.probs"][1:] == ["Identity", "3", "bfp8", "bfp8"]
    assert rows["blocks.5.mlp.fc2_in"][1:] == ["Identity", "47", "fp32", "fp32"]
    assert rows["blocks.5.mlp.fc1"][1:] == ["Linear", *["fp32"] * 5]
    assert rows["head"][1:] == ["Linear", "bfp16", "bfp16", "bfp16", "bfp16", "fp32"]  # moment2: its own flags
    assert sum(1 for row in rows.values() if row[1] == "Identity") == 48
