"""SWALP: low-precision SGD with Stochastic Weight Averaging.

Trains a low-precision network (quantized weights, activations, gradients,
errors, momentum and optionally the gradient accumulator) with the SWALP
learning-rate schedule, averages its weights from --swa_start on into a
full-precision copy, and evaluates both after recomputing their BatchNorm
statistics.
"""

import argparse
import os
import random
import sys
import time

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, update_bn

import models
import quantization
import swa
import utils
from utils import UserError


def word_length(text):
    value = int(text)
    if value != -1 and not quantization.MIN_WL <= value <= quantization.MAX_WL:
        raise argparse.ArgumentTypeError(
            f"{value} is not a word length: use -1 (full precision) or "
            f"{quantization.MIN_WL}..{quantization.MAX_WL} bits")
    return value


def positive(kind):
    def parse(text):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text} must be positive")
        return value
    return parse


def non_negative_float(text):
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must not be negative")
    return value


class ExitTwoParser(argparse.ArgumentParser):
    """argparse already exits with code 2 on bad flags; this only makes its
    message the one-line form used for every other user error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser():
    parser = ExitTwoParser(description="SWALP training (SGD and SWA in low precision).")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default="CIFAR10", choices=sorted(utils.NUM_CLASSES),
                      help="dataset name (default: CIFAR10)")
    data.add_argument("--data_path", required=True, metavar="PATH",
                      help="folder holding <dataset lower-case>/ with the python version of CIFAR; "
                           "downloaded there when absent")
    data.add_argument("--batch_size", type=positive(int), default=128, metavar="N",
                      help="input batch size (default: 128)")
    data.add_argument("--num_workers", type=int, default=4, metavar="N",
                      help="data loading processes (default: 4; 0 loads in the main process)")

    training = parser.add_argument_group("training")
    training.add_argument("--model", required=True, choices=sorted(models.MODELS), metavar="MODEL",
                          help=f"model name: {', '.join(models.MODELS)}")
    training.add_argument("--epochs", type=positive(int), default=300, metavar="N",
                          help="number of epochs to train (default: 300)")
    training.add_argument("--lr_init", type=positive(float), default=0.05, metavar="LR",
                          help="initial learning rate (default: 0.05)")
    training.add_argument("--momentum", type=non_negative_float, default=0.9, metavar="M",
                          help="SGD momentum (default: 0.9)")
    training.add_argument("--wd", type=non_negative_float, default=1e-4,
                          help="weight decay (default: 1e-4)")
    training.add_argument("--seed", type=int, default=1, metavar="N", help="random seed (default: 1)")
    training.add_argument("--device", default="auto",
                          help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N (default: auto)")

    averaging = parser.add_argument_group("stochastic weight averaging")
    averaging.add_argument("--swa_start", type=positive(int), default=200, metavar="N",
                           help="number of epochs before averaging starts; epochs from "
                                "swa_start on (0-based) run at swa_lr (default: 200)")
    averaging.add_argument("--swa_lr", type=positive(float), default=0.01, metavar="LR",
                           help="SWALP learning rate (default: 0.01)")
    averaging.add_argument("--swa_c_epochs", type=positive(int), default=1, metavar="N",
                           help="average the weights every N epochs (default: 1)")

    lowp = parser.add_argument_group("low precision (block floating point)")
    for kind, what in (("weight", "weights"), ("activate", "activations"), ("grad", "gradients"),
                       ("error", "back-propagated errors"), ("momentum", "momentum buffers"),
                       ("acc", "the gradient accumulator, a low-precision copy of the weights that "
                               "SGD updates (with -1 there is none)")):
        lowp.add_argument(f"--wl-{kind}", type=word_length, default=-1, metavar="N",
                          help=f"word length in bits ({quantization.MIN_WL}..{quantization.MAX_WL}) for {what}; "
                               f"-1 if full precision (default: -1)")
    lowp.add_argument("--rounding", "--quant-type", dest="rounding", default="stochastic",
                      choices=quantization.ROUNDINGS,
                      help="rounding: stochastic or nearest (default: stochastic; "
                           "--quant-type is the original's name)")
    lowp.add_argument("--small-block", default="None", choices=list(quantization.SMALL_BLOCK_MAX_DIMS),
                      help="None: every tensor is blocked along --block-dim; FC: tensors of at most 1 "
                           "dimension share one exponent; Conv: at most 2 dimensions (default: None)")
    lowp.add_argument("--block-dim", default="B", choices=quantization.BLOCK_DIMS,
                      help="B: one exponent per index of dim 0; BC: per index of dims 0 and 1 (default: B)")
    lowp.add_argument("--quant-backend", default="auto", choices=quantization.BACKENDS,
                      help="rounding kernels: torch (ours: PyTorch operations, seedable, no compiler), "
                           "qtorch (qtorch's compiled C++/CUDA kernels, not seedable), auto (qtorch's "
                           "CUDA kernels on a CUDA device when they build, else torch) (default: auto)")
    lowp.add_argument("--quant-placement", default="layer", choices=("layer", "relu"),
                      help="where activation/error quantizers go: layer: after every conv and linear "
                           "layer but the last (the seed); relu: after each ReLU, and before and after "
                           "each residual-block convolution (the original) (default: layer)")

    output = parser.add_argument_group("output")
    output.add_argument("--dir", default=None, metavar="DIR",
                        help="run directory for checkpoints, TensorBoard logs and results.json "
                             "(default: runs/<dataset>-<model>-<precision>-seed<seed>)")
    output.add_argument("--save_freq", type=positive(int), default=25, metavar="N",
                        help="save a checkpoint every N epochs, besides at swa_start and the end (default: 25)")
    output.add_argument("--eval_freq", type=positive(int), default=1, metavar="N",
                        help="evaluate every N epochs, besides at swa_start and the end (default: 1)")
    output.add_argument("--resume", default=None, metavar="CKPT",
                        help="checkpoint-<epoch>.pt to continue from (default: none)")
    output.add_argument("--overwrite", action="store_true",
                        help="start afresh in a --dir that already holds a run")
    return parser


def word_lengths(args):
    return {kind: getattr(args, f"wl_{kind}") for kind in quantization.NUMBER_KINDS}


def precision_tag(args):
    tags = [f"{kind[0].upper()}{wl}" for kind, wl in word_lengths(args).items() if wl != -1]
    return "".join(tags) if tags else "FP"


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available here; use --device cpu")
    return device


def prepare_run_dir(args):
    if args.swa_start > args.epochs:
        raise UserError(f"--swa_start {args.swa_start} is beyond --epochs {args.epochs}; "
                        f"lower it or train longer")
    run_dir = args.dir or os.path.join(
        "runs", f"{args.dataset}-{args.model}-{precision_tag(args)}-seed{args.seed}")
    if (not args.resume and not args.overwrite
            and os.path.exists(os.path.join(run_dir, "results.json"))):
        raise UserError(f"{run_dir} already holds a run; pass --resume, --overwrite or another --dir")
    try:
        os.makedirs(run_dir, exist_ok=True)
        probe = os.path.join(run_dir, ".write-test")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as error:
        raise UserError(f"cannot write to run directory {run_dir} ({error.strerror}); "
                        f"choose another --dir") from None
    return run_dir


def seed_everything(seed):
    """Seed Python, NumPy and torch (CPU and every CUDA device); activation
    and error rounding of the torch backend draws from torch's generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_quantizers(args, device, noise):
    """The quantizers of every number kind (None where full precision), on
    the backend --quant-backend picks; no backend is loaded in full precision."""
    lengths = word_lengths(args)
    if all(wl == -1 for wl in lengths.values()):
        return dict.fromkeys(quantization.NUMBER_KINDS), None
    try:
        backend, note = quantization.select_backend(args.quant_backend, device)
    except quantization.BackendUnavailable as error:
        raise UserError(f"--quant-backend qtorch: qtorch's kernels failed to build ({error}); install "
                        f"ninja and a C++ compiler (and nvcc for CUDA), or use --quant-backend torch") from None
    if note:
        print(note)
    quantizers = quantization.build_quantizers(lengths, args.rounding, args.small_block, args.block_dim,
                                               backend, noise)
    return quantizers, backend


STATE_DEFINING = ("dataset", "model", "small_block", "block_dim", "quant_placement") + tuple(
    f"wl_{kind}" for kind in quantization.NUMBER_KINDS)


def restore(checkpoint, path, args, net, swa_model, optimizer, train_loader):
    saved = checkpoint.get("config", {})
    for key in STATE_DEFINING:
        if key in saved and saved[key] != getattr(args, key):
            raise UserError(f"checkpoint {path} was written with --{key.replace('_', '-') if key.startswith('wl') else key} "
                            f"{saved[key]}, this run has {getattr(args, key)}; use the same flags")
    try:
        net.load_state_dict(checkpoint["model_state"])
        swa_model.load_state_dict(checkpoint["swa_state"])
        optimizer.optim.load_state_dict(checkpoint["optimizer_state"])
    except (KeyError, RuntimeError, ValueError) as error:
        raise UserError(f"checkpoint {path} does not match this model ({str(error).splitlines()[0]})") from None
    # Optimizer.load_state_dict replaces the group list; OptimLP must see the new one.
    optimizer.param_groups = optimizer.optim.param_groups
    if optimizer.acc_quant is not None:
        for param, accumulator in zip(net.parameters(), checkpoint["weight_acc"]):
            optimizer.weight_acc[param] = accumulator.to(param.device)
    optimizer.noise.seek(checkpoint["noise_step"])
    utils.set_rng_state(checkpoint["rng"])
    train_loader.generator.set_state(checkpoint["loader_generator"])
    return checkpoint["epoch"], checkpoint["history"]


def training_state(args, net, swa_model, optimizer, train_loader, history):
    accumulators = ([optimizer.weight_acc[p] for p in net.parameters()]
                    if optimizer.acc_quant is not None else [])
    return dict(
        config=vars(args),
        model_state=net.state_dict(),
        swa_state=swa_model.state_dict(),
        optimizer_state=optimizer.optim.state_dict(),
        weight_acc=accumulators,
        noise_step=optimizer.noise.step,
        rng=utils.rng_state(),
        loader_generator=train_loader.generator.get_state(),
        history=history,
    )


def summary(history, args):
    """The original's closing figures: SGD error when averaging starts (the
    end of the SGD schedule) and SWA error at the last epoch."""
    by_epoch = {record["epoch"]: record for record in history}
    at_start = by_epoch.get(args.swa_start, {})
    last = history[-1] if history else {}

    def error(record, key):
        accuracy = record.get(f"{key}_accuracy")
        return None if accuracy is None else 100.0 - accuracy

    return {
        "sgd_error": error(at_start, "test"),
        "sgd_error_final": error(last, "test"),
        "swa_error": error(last, "swa_test"),
        "swa_n": last.get("swa_n", 0),
    }


def run(args):
    device = resolve_device(args.device)
    run_dir = prepare_run_dir(args)
    seed_everything(args.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    print(f"Loading dataset {args.dataset} from {args.data_path}")
    train_set, test_set = utils.load_cifar(args.dataset, args.data_path)
    train_loader, test_loader = utils.make_loaders(
        train_set, test_set, args.batch_size, args.num_workers, args.seed,
        pin_memory=device.type == "cuda")

    net = models.build_model(args.model, utils.NUM_CLASSES[args.dataset]).to(device)
    # The average is a deep copy of the plain network, taken before quantizers
    # are attached, so it is evaluated in full precision.
    swa_model = AveragedModel(net)
    # The optimizer's rounding noise depends only on (seed, step): identical
    # across data-parallel replicas and restored exactly on resume.
    noise = quantization.StepNoise(args.seed)
    quantizers, backend = build_quantizers(args, device, noise)
    for kind in quantization.NUMBER_KINDS:
        print(f"{kind:10}: {quantizers[kind] or 'full precision'}")
    sites = quantization.insert_quantizers(net, quantizers["activate"], quantizers["error"],
                                           args.quant_placement)
    print(f"Model {args.model}: {sites} activation quantizers ({args.quant_placement} placement), "
          f"device {device}, run directory {run_dir}")
    optimizer = quantization.make_optimizer(net, quantizers, args.lr_init, args.momentum, args.wd, noise)

    start_epoch, history = 0, []
    if args.resume:
        checkpoint = utils.load_checkpoint(args.resume)
        start_epoch, history = restore(checkpoint, args.resume, args, net, swa_model,
                                       optimizer, train_loader)
        print(f"Resumed from {args.resume} after epoch {start_epoch}")

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=run_dir)
    results_path = os.path.join(run_dir, "results.json")
    for epoch in range(start_epoch, args.epochs):
        epoch_start = time.perf_counter()
        completed = epoch + 1
        lr = swa.schedule(epoch, args.lr_init, args.swa_start, args.swa_lr)
        for group in optimizer.optim.param_groups:
            group["lr"] = lr
        train_loader.sampler.set_epoch(epoch)
        train_res = utils.train_epoch(train_loader, net, optimizer, device,
                                      f"epoch {completed}/{args.epochs}")

        collected = swa.is_collection_epoch(epoch, args.swa_start, args.swa_c_epochs)
        if collected:
            swa_model.update_parameters(net)
            update_bn(train_loader, swa_model, device)

        test_res = swa_res = {"loss": None, "accuracy": None}
        if completed % args.eval_freq == 0 or completed in (args.swa_start, args.epochs):
            update_bn(train_loader, net, device)
            test_res = utils.evaluate(test_loader, net, device, "test")
            if swa_model.n_averaged > 0:
                swa_res = utils.evaluate(test_loader, swa_model, device, "swa test")

        record = {
            "epoch": completed, "lr": lr,
            "train_loss": train_res["loss"], "train_accuracy": train_res["accuracy"],
            "train_time": train_res["time"],
            "test_loss": test_res["loss"], "test_accuracy": test_res["accuracy"],
            "swa_test_loss": swa_res["loss"], "swa_test_accuracy": swa_res["accuracy"],
            "swa_n": int(swa_model.n_averaged), "collected": collected,
            "epoch_time": time.perf_counter() - epoch_start,
        }
        history.append(record)
        print(utils.table_row([completed, lr, train_res["loss"], train_res["accuracy"], train_res["time"],
                               test_res["loss"], test_res["accuracy"], swa_res["loss"],
                               swa_res["accuracy"]], epoch), flush=True)
        utils.log_scalars(writer, record)

        if completed % args.save_freq == 0 or completed in (args.swa_start, args.epochs):
            utils.save_checkpoint(run_dir, completed, **training_state(
                args, net, swa_model, optimizer, train_loader, history))
        finished = completed == args.epochs
        utils.write_json_atomic(results_path, {
            "status": "finished" if finished else "running",
            "config": vars(args),
            "activation_quantizers": sites,
            "quant_backend": backend.name if backend else None,
            "epochs": history,
            **summary(history, args),
        })
    writer.close()

    final = summary(history, args)
    print("Done")
    print(f"SGD Error : {final['sgd_error']}")
    print(f"SWA Error : {final['swa_error']}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
