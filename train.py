"""SWALP: low-precision SGD with Stochastic Weight Averaging.

Trains a low-precision network (quantized weights, activations, gradients,
errors, momentum and optionally the gradient accumulator) with the SWALP
learning-rate schedule, averages its weights from --swa_start on into a
full-precision copy, and evaluates both after recomputing their BatchNorm
statistics.
"""

import argparse
import contextlib
import math
import os
import random
import shlex
import signal
import sys
import time

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, update_bn

import batched_data
import checkpoints
import distributed
import formats
import models
import quantization
import run_directory
import seeding
import swa
import utils
from seeding import mix_seed
from utils import UserError


def parse_number(kind, text):
    """`text` as a `kind`, or an argparse error that says what it is not."""
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text} is not {'a whole number' if kind is int else 'a number'}") \
            from None


def word_length(text):
    value = parse_number(int, text)
    if value != -1 and not formats.MIN_WL <= value <= formats.MAX_WL:
        raise argparse.ArgumentTypeError(
            f"{value} is not a word length: use -1 (full precision) or "
            f"{formats.MIN_WL}..{formats.MAX_WL} bits")
    return value


def number(kind, valid, requirement):
    """An argparse type: a finite `kind` for which valid(value) holds."""
    def parse(text):
        value = parse_number(kind, text)
        if math.isnan(value):
            raise argparse.ArgumentTypeError(f"{text} is not a number")
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} must be finite")
        if not valid(value):
            raise argparse.ArgumentTypeError(f"{text} must be {requirement}")
        return value
    return parse


def positive(kind):
    return number(kind, lambda value: value > 0, "positive")


non_negative_int = number(int, lambda value: value >= 0, "0 or more")
non_negative_float = number(float, lambda value: value >= 0, "0 or more")
seed_value = number(int, lambda value: 0 <= value < 2 ** 32, "in 0..2^32-1")  # NumPy's limit


def unquantized(kind):
    """What word length -1 means for a kind of number, said alike in --help
    and the startup lines."""
    return "none, SGD updates the weights directly" if kind == "acc" else "full precision"


class ExitTwoParser(argparse.ArgumentParser):
    """argparse already exits with code 2 on bad flags; this only makes its
    message the one-line form used for every other user error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser():
    parser = ExitTwoParser(description="SWALP training (SGD and SWA in low precision).")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default="CIFAR10", choices=utils.DATASETS,
                      help="dataset name; digits: scikit-learn's 8x8 digits upsampled to 32x32, a CPU quick "
                           "start, with defaults of its own: " + ", ".join(
                               f"{key} {value}" for key, value in DATASET_DEFAULTS["digits"].items()) +
                           " (default: CIFAR10)")
    data.add_argument("--data_path", metavar="PATH",
                      help="CIFAR: folder holding <dataset lower-case>/ with the python version of CIFAR, "
                           "downloaded there when absent; ImageNet: folder holding train/ and val/ with one "
                           "folder of images per class; digits: not needed (required for the others)")
    data.add_argument("--batch_size", type=positive(int), default=None, metavar="N",
                      help="input batch size per process (default: 128; ImageNet: 32)")
    data.add_argument("--loader", default=None, choices=("batched", "torchvision"),
                      help="batched: the data set held on the training device, each batch augmented with "
                           "tensor operations (CIFAR only); torchvision: per-sample PIL transforms in "
                           "--num_workers processes (default: batched; ImageNet: torchvision)")
    data.add_argument("--num_workers", type=non_negative_int, default=4, metavar="N",
                      help="data loading processes of --loader torchvision (default: 4; 0 loads in the "
                           "main process)")

    training = parser.add_argument_group("training")
    training.add_argument("--model", required=True, choices=sorted(models.MODELS), metavar="MODEL",
                          help=f"model name: {', '.join(models.MODELS)}")
    training.add_argument("--epochs", type=positive(int), default=None, metavar="N",
                          help="number of epochs to train (default: 300; ImageNet: 90)")
    training.add_argument("--lr_init", type=positive(float), default=None, metavar="LR",
                          help="initial learning rate (default: 0.05; ImageNet: 0.1)")
    training.add_argument("--momentum", type=non_negative_float, default=0.9, metavar="M",
                          help="SGD momentum (default: 0.9)")
    training.add_argument("--wd", type=non_negative_float, default=None,
                          help="weight decay (default: 1e-4; ImageNet: 1e-4)")
    training.add_argument("--seed", type=seed_value, default=1, metavar="N",
                          help="random seed, 0..2^32-1 (default: 1)")
    training.add_argument("--device", default="auto",
                          help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N (default: auto)")
    training.add_argument("--deterministic", action="store_true",
                          help="CUDA: deterministic algorithms only and no cuDNN autotuning, so that a run "
                               "with the triton or torch backend repeats bit for bit (slower; see README)")

    averaging = parser.add_argument_group("stochastic weight averaging")
    averaging.add_argument("--swa_start", type=positive(int), default=None, metavar="N",
                           help="number of epochs before averaging starts; epochs from "
                                "swa_start on (0-based) run at swa_lr (default: 200; ImageNet: 80)")
    averaging.add_argument("--swa_lr", type=positive(float), default=None, metavar="LR",
                           help="SWALP learning rate (default: 0.01; ImageNet: 0.001)")
    averaging.add_argument("--swa_c_epochs", type=positive(int), default=1, metavar="N",
                           help="average the weights every N epochs (default: 1)")
    averaging.add_argument("--swa_c_steps", type=non_negative_int, default=0, metavar="N",
                           help="average every N iterations of the SWA phase instead of per epoch "
                                "(default: 0; with the cyclic schedule: every cycle)")
    averaging.add_argument("--swa_schedule", default="constant", choices=("constant", "cyclic"),
                           help="learning rate from swa_start on: constant swa_lr (the seed), or cyclic: "
                                "within each cycle falling linearly from --swa_lr_max to --swa_lr, set "
                                "every iteration (default: constant)")
    averaging.add_argument("--swa_lr_max", type=positive(float), default=None, metavar="LR",
                           help="cyclic schedule: the high rate a1 each cycle falls from; iteration i of a cycle "
                                "of c runs at (1 - i/c) a1 + (i/c) swa_lr (default: --lr_init)")
    averaging.add_argument("--swa_cycle_steps", type=non_negative_int, default=0, metavar="N",
                           help="cyclic schedule: iterations per cycle (default: 0, one epoch)")

    lowp = parser.add_argument_group(
        "low precision", f"Number format specs (any case): {formats.GRAMMAR}. e<exp>m<man> is qtorch's "
        "floating point (e4m3 reaches 480, e5m2 114688, ties away from zero); fp8e4m3 and fp8e5m2 are OCP's "
        "(448 and 57344, saturating, ties to even). bfp<wl> is --wl-* N, laid out by --small-block and "
        "--block-dim; bfp<wl>/<k> and MX formats block k (MX: 32) consecutive elements of each row (index of "
        "dim 0). qtorch has no kernels for fp8* and mx*: --quant-backend auto runs them on torch.")
    lowp.add_argument("--format", type=formats.argument, default=None, metavar="SPEC",
                      help="number format of every kind below, accumulator included (default: full precision)")
    for kind, what in (("weight", "weights"), ("activate", "activations"), ("grad", "gradients"),
                       ("error", "back-propagated errors"), ("momentum", "momentum buffers"),
                       ("acc", "the gradient accumulator, a low-precision copy of the weights that SGD updates")):
        lowp.add_argument(f"--wl-{kind}", type=word_length, default=None, metavar="N",
                          help=f"block floating point word length in bits ({formats.MIN_WL}..{formats.MAX_WL}) "
                               f"for {what}; -1: {unquantized(kind)} (default: -1)")
        lowp.add_argument(f"--format-{kind}", type=formats.argument, default=None, metavar="SPEC",
                          help=f"number format of {what.split(',')[0]} (instead of --wl-{kind}; "
                               f"overrides --format)")
    lowp.add_argument("--rounding", "--quant-type", dest="rounding", default="stochastic",
                      choices=quantization.ROUNDINGS,
                      help="rounding: stochastic or nearest (default: stochastic; "
                           "--quant-type is the original's name)")
    lowp.add_argument("--small-block", default="None", choices=list(formats.SMALL_BLOCK_MAX_DIMS),
                      help="None: every tensor is blocked along --block-dim; FC: tensors of at most 1 "
                           "dimension share one exponent; Conv: at most 2 dimensions (default: None)")
    lowp.add_argument("--block-dim", default="B", choices=formats.BLOCK_DIMS,
                      help="B: one exponent per index of dim 0; BC: per index of dims 0 and 1 (default: B)")
    lowp.add_argument("--quant-backend", default="auto", choices=quantization.BACKENDS,
                      help="rounding kernels: torch (ours: PyTorch operations, seedable, no compiler), "
                           "triton (ours: fused Triton kernels with counter-based noise; CUDA, or the CPU "
                           "with TRITON_INTERPRET=1), qtorch (qtorch's compiled C++/CUDA kernels, not "
                           "seedable), auto (triton on a CUDA device when it compiles, else torch) "
                           "(default: auto)")
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
    output.add_argument("--keep_checkpoints", type=positive(int), default=None, metavar="N",
                        help="keep only the newest N epoch checkpoints, and the one at swa_start "
                             "(default: all)")
    output.add_argument("--save_every_steps", type=non_negative_int, default=0, metavar="N",
                        help="also checkpoint every N optimizer steps within epochs, keeping only the newest "
                             "such checkpoint (default: 0, off)")
    output.add_argument("--resume", default=None, metavar="CKPT",
                        help="a checkpoint to continue from, or auto for the newest one in --dir "
                             "(a fresh start when there is none) (default: none)")
    output.add_argument("--overwrite", action="store_true",
                        help="start afresh in a --dir that already holds a run")
    return parser


# The seed's CIFAR settings; for ImageNet a standard ResNet-18 recipe (0.1 for
# a global batch of 256, i.e. 8 processes of 32) with the SWA phase's 10 last
# epochs at a low constant rate.
DATASET_DEFAULTS = {
    "CIFAR10": {"batch_size": 128, "epochs": 300, "lr_init": 0.05, "wd": 1e-4, "swa_start": 200, "swa_lr": 0.01,
                "loader": "batched"},
    "ImageNet": {"batch_size": 32, "epochs": 90, "lr_init": 0.1, "wd": 1e-4, "swa_start": 80, "swa_lr": 0.001,
                 "loader": "torchvision"},
}
DATASET_DEFAULTS["CIFAR100"] = DATASET_DEFAULTS["CIFAR10"]
# digits: a CPU quick start (see experiments/digits_quickstart.py), a few
# hundred steps with the smallest CIFAR model, PreResNet20.
DATASET_DEFAULTS["digits"] = {"batch_size": 32, "epochs": 6, "lr_init": 0.05, "wd": 5e-4, "swa_start": 4,
                              "swa_lr": 0.01, "loader": "torchvision"}


def parse_args(argv=None):
    """The command line, with the dataset's defaults where a flag is not given."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for key, value in DATASET_DEFAULTS[args.dataset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.data_path is None and args.dataset != "digits":
        parser.error(f"--dataset {args.dataset} needs --data_path")
    imagenet = args.dataset == "ImageNet"
    if imagenet != (args.model in models.IMAGENET_MODELS):
        parser.error(f"--model {args.model} is for {'CIFAR' if imagenet else 'ImageNet'}; use "
                     + (", ".join(models.IMAGENET_MODELS) if imagenet else "a CIFAR model") +
                     f" with --dataset {args.dataset}")
    if imagenet and args.loader == "batched":
        parser.error("--loader batched needs a data set held in memory (CIFAR); use --loader torchvision "
                     "with --dataset ImageNet")
    idle = idle_flag(args, parser)
    if idle:
        parser.error(idle)
    try:
        lengths, specs = formats.per_kind(word_lengths(args), format_specs(args), args.format)
    except formats.FormatError as error:
        parser.error(str(error))
    for kind in quantization.NUMBER_KINDS:
        setattr(args, f"wl_{kind}", lengths[kind])
        setattr(args, f"format_{kind}", specs[kind])
    return args


def idle_flag(args, parser):
    """Why a flag given with a non-default value would do nothing here, or None."""
    def given(key):
        return getattr(args, key) != parser.get_default(key)

    if args.swa_schedule == "constant":
        for key in ("swa_lr_max", "swa_cycle_steps"):
            if given(key):
                return f"{flag_name(key)} applies only to --swa_schedule cyclic"
    if given("swa_c_epochs") and (args.swa_c_steps or args.swa_schedule == "cyclic"):
        return ("--swa_c_epochs does nothing when averaging every --swa_c_steps iterations "
                "(or every cycle of the cyclic schedule); pass one of them")
    if args.momentum == 0 and (args.wl_momentum not in (None, -1) or args.format_momentum):
        flag = "--wl-momentum" if args.wl_momentum not in (None, -1) else "--format-momentum"
        return f"{flag} does nothing with --momentum 0 (there are no momentum buffers)"
    return None


def word_lengths(args):
    return {kind: getattr(args, f"wl_{kind}") for kind in quantization.NUMBER_KINDS}


def format_specs(args):
    return {kind: getattr(args, f"format_{kind}") for kind in quantization.NUMBER_KINDS}


def precision_tag(args):
    """FP, or the formats that are set, e.g. W8A8G8E8M8 or Wmxfp8e4m3Ae4m3."""
    return quantization.precision_tag(word_lengths(args), format_specs(args))


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
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
    return device


def seed_everything(seed):
    """Seed Python, NumPy and torch (CPU and every CUDA device); activation
    and error rounding of the torch backend draws from torch's generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_quantizers(args, device, noise, world=distributed.World()):
    """The quantizers of every number kind (None where full precision), on
    the backend --quant-backend picks; no backend is loaded in full precision.
    Data-parallel replicas must round their weights, gradients, momenta and
    accumulators alike, which qtorch's kernels (noise from the operating
    system or from each rank's own generator) cannot: there the optimizer's
    rounding always uses ours."""
    lengths = word_lengths(args)
    lengths.update({kind: formats.parse(spec) for kind, spec in format_specs(args).items() if spec})
    if all(wl == -1 for wl in lengths.values()):
        return dict.fromkeys(quantization.NUMBER_KINDS), None
    try:
        backend, note = quantization.select_backend(args.quant_backend, device)
    except quantization.BackendUnavailable as error:
        if args.quant_backend != "qtorch":
            raise UserError(f"--quant-backend {args.quant_backend}: {error}; use --quant-backend torch") from None
        raise UserError(f"--quant-backend qtorch: qtorch's kernels failed to build ({error}); install "
                        f"ninja and a C++ compiler (and nvcc for CUDA), or use --quant-backend torch") from None
    if note:
        print(note)
    optimizer_backend = backend
    if world.distributed and not backend.seedable:
        optimizer_backend = quantization.TORCH_BACKEND
        print("data parallel: the optimizer's rounding uses the torch backend, activations and errors qtorch")
    try:
        quantizers = quantization.build_quantizers(
            lengths, args.rounding, args.small_block, args.block_dim, backend, noise, optimizer_backend,
            fallback=quantization.TORCH_BACKEND if args.quant_backend == "auto" else None)
    except quantization.UnsupportedFormat as error:
        raise UserError(f"--quant-backend {args.quant_backend}: {error}; use --quant-backend torch") from None
    return quantizers, backend


# Flags a resumed run must share with its checkpoint: they shape the state or
# the randomness, the data order or the schedule it continues.
STATE_DEFINING = ("dataset", "model", "batch_size", "seed", "lr_init", "momentum", "wd", "swa_start", "swa_lr",
                  "swa_c_epochs", "swa_c_steps", "swa_schedule", "swa_lr_max", "swa_cycle_steps", "rounding",
                  "small_block", "block_dim", "quant_placement", "loader") + tuple(
    f"{flag}_{kind}" for flag in ("wl", "format") for kind in quantization.NUMBER_KINDS)


def flag_name(key):
    """The command-line spelling of an argument's dest."""
    for action in build_parser()._actions:
        if action.dest == key:
            return action.option_strings[0]
    raise KeyError(key)


class StopRequest:
    """Turns SIGTERM and SIGINT into a request to save and stop at the next
    step boundary instead of dying mid-write."""

    def __init__(self):
        self.signal = None
        self._previous = {}

    def __enter__(self):
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame):
        self.signal = signum

    def __bool__(self):
        return self.signal is not None


class NullWriter:
    """Stands in for TensorBoard's writer on every rank but the first."""

    def add_scalar(self, *args, **kwargs):
        pass

    def flush(self):
        pass

    def close(self):
        pass


class Training:
    """Everything a run holds, and the checkpoint that captures it."""

    def __init__(self, args, device, run_dir, world=distributed.World()):
        self.args, self.device, self.run_dir, self.world = args, device, run_dir, world
        print(f"Loading dataset {args.dataset}" + (f" from {args.data_path}" if args.data_path else ""))
        train_set, test_set, num_classes = load_data(args, world)
        if args.loader == "batched":
            loaders = batched_data.make_loaders(train_set, test_set, args.batch_size, args.seed, device, world)
        else:
            loaders = utils.make_loaders(train_set, test_set, args.batch_size, args.num_workers, args.seed,
                                         device.type == "cuda", world)
        self.train_loader, self.test_loader, self.bn_loader = loaders

        self.net = models.build_model(args.model, num_classes).to(device)
        # The average is a deep copy of the plain network, taken before quantizers
        # are attached, so it is evaluated in full precision.
        self.swa_model = AveragedModel(self.net)
        # The optimizer's rounding noise depends only on (seed, step): identical
        # across data-parallel replicas and restored exactly on resume.
        noise = quantization.StepNoise(args.seed, rank=world.rank)
        quantizers, self.backend = build_quantizers(args, device, noise, world)
        self.format_lines = [f"{kind:10}: {quantizers[kind] or unquantized(kind)}"
                             for kind in quantization.NUMBER_KINDS]
        print("\n".join(self.format_lines))
        self.sites = quantization.insert_quantizers(self.net, quantizers["activate"], quantizers["error"],
                                                    args.quant_placement)
        print(f"Model {args.model}: {self.sites} activation quantizers ({args.quant_placement} placement), "
              f"device {device}, run directory {run_dir}")
        self.optimizer = quantization.make_optimizer(self.net, quantizers, args.lr_init, args.momentum, args.wd,
                                                     noise)
        # Gradients are averaged across replicas before OptimLP rounds them
        # with noise shared by all ranks, so the replicas stay bit-identical.
        self.train_net = self.net
        if world.distributed:
            device_ids = [device.index] if device.type == "cuda" else None
            self.train_net = torch.nn.parallel.DistributedDataParallel(self.net, device_ids=device_ids)
        self.steps_per_epoch = len(self.train_loader)
        self.schedule = swa.SWASchedule(
            args.lr_init, args.swa_start, args.swa_lr, self.steps_per_epoch, cyclic=args.swa_schedule == "cyclic",
            lr_max=args.swa_lr_max, cycle_steps=args.swa_cycle_steps, c_epochs=args.swa_c_epochs,
            c_steps=args.swa_c_steps)
        self.writer = self.step_writer = None  # TensorBoard, see open_logs
        # Position: `epoch` complete epochs, then `epoch_totals["steps"]` steps into the next.
        self.epoch = 0
        self.epoch_totals = utils.new_epoch_totals()
        self.history = []
        self.rows_printed = 0  # by this process: its first row, a resumed run's too, gets the header

    def accumulators(self):
        if self.optimizer.acc_quant is None:
            return []
        return [self.optimizer.weight_acc[p] for p in self.net.parameters()]

    def replica_digest(self):
        """A checksum of the bits of everything replicas must share: weights,
        SWA weights, momentum buffers and accumulators."""
        tensors = [*self.net.parameters(), *self.swa_model.parameters(), *self.accumulators(),
                   *(state["momentum_buffer"] for state in self.optimizer.optim.state.values()
                     if state.get("momentum_buffer") is not None)]
        return sum(int(t.detach().contiguous().view(torch.int32).to(torch.int64).sum()) for t in tensors)

    def state_dict(self):
        """The whole training state. A collective: every rank must call it.
        The epoch's partial sums are summed over ranks; the random generators
        of every rank are kept, in rank order."""
        optimizer, world = self.optimizer, self.world
        totals = dict(self.epoch_totals)
        loss_sum, correct, seen = distributed.sum_across(
            world, [totals["loss_sum"], totals["correct"], totals["seen"]], self.device)
        totals.update(loss_sum=loss_sum, correct=int(correct), seen=int(seen))
        # Replicas exist only in data-parallel runs; a lone process skips the checksum.
        digests = distributed.gather_objects(world, self.replica_digest()) if world.distributed else []
        if len(set(digests)) > 1:
            raise RuntimeError(f"data-parallel replicas have drifted apart: digests {digests}")
        return dict(
            epoch=self.epoch,
            step=self.epoch_totals["steps"],
            epoch_totals=totals,
            world_size=world.size,
            replica_digests=digests,
            config=vars(self.args),
            model_state=self.net.state_dict(),
            swa_state=self.swa_model.state_dict(),
            optimizer_state=optimizer.optim.state_dict(),
            weight_acc=self.accumulators(),
            noise_step=optimizer.noise.step,
            rng=distributed.gather_objects(world, utils.rng_state()),
            loader_generator=self.train_loader.generator.get_state(),
            history=self.history,
        )

    def load_state_dict(self, checkpoint, path):
        """Continue from a checkpoint (as checkpoints.load_checkpoint returns
        it): its flags, then every field, checked against this run first."""
        saved = checkpoint["config"]
        if not isinstance(saved, dict):
            raise UserError(f"checkpoint {path} is malformed: config must be a dict, found {type(saved).__name__}")
        for key in STATE_DEFINING:
            value = saved.get(key)
            if value != getattr(self.args, key):
                raise UserError(f"checkpoint {path} was written with {flag_name(key)} {value}, "
                                f"this run has {getattr(self.args, key)}; resume with the same flags")
        try:
            checkpoints.check_structure(
                checkpoint, self.net.state_dict(), self.swa_model.state_dict(),
                [param.shape for param in self.net.parameters()], self.accumulators(), utils.new_epoch_totals())
        except checkpoints.Rejected as rejected:
            raise UserError(f"checkpoint {path} is malformed: {rejected}") from None
        if checkpoint["epoch"] > self.args.epochs:
            raise UserError(f"checkpoint {path} is after epoch {checkpoint['epoch']}, beyond --epochs "
                            f"{self.args.epochs}; resume with --epochs {checkpoint['epoch']} or more")
        if checkpoint["step"] and checkpoint["world_size"] != self.world.size:
            raise UserError(f"checkpoint {path} is mid-epoch and was written by {checkpoint['world_size']} "
                            f"process(es), this run has {self.world.size}; resume it with as many, or resume "
                            f"from an epoch checkpoint (checkpoint-<epoch>.pt)")
        try:
            self.net.load_state_dict(checkpoint["model_state"])
            self.swa_model.load_state_dict(checkpoint["swa_state"])
            self.optimizer.optim.load_state_dict(checkpoint["optimizer_state"])
        except (KeyError, RuntimeError, ValueError) as error:
            raise UserError(f"checkpoint {path} does not match this model "
                            f"({utils.first_line(error)})") from None
        # Optimizer.load_state_dict replaces the group list; OptimLP must see the new one.
        self.optimizer.param_groups = self.optimizer.optim.param_groups
        if self.optimizer.acc_quant is not None:
            for param, accumulator in zip(self.net.parameters(), checkpoint["weight_acc"]):
                self.optimizer.weight_acc[param] = accumulator.to(param.device)
        self.optimizer.noise.seek(checkpoint["noise_step"])
        # The same process count continues exactly; another one takes rank 0's generators.
        rngs = checkpoint["rng"]
        utils.set_rng_state(rngs[self.world.rank] if len(rngs) == self.world.size else rngs[0])
        self.train_loader.generator.set_state(checkpoint["loader_generator"])
        self.epoch = checkpoint["epoch"]
        self.epoch_totals = dict(checkpoint["epoch_totals"])
        if not self.world.main:  # the saved partial sums are all ranks' already
            self.epoch_totals.update(loss_sum=0.0, correct=0, seen=0)
        self.history = list(checkpoint["history"])

    def open_logs(self, resumed):
        """TensorBoard writers: per-epoch scalars in the run directory indexed
        by epoch, per-iteration ones in steps/ indexed by step. On resume,
        purge_step drops what an interrupted run logged after its checkpoint."""
        from torch.utils.tensorboard import SummaryWriter

        if not self.world.main:
            self.writer = self.step_writer = NullWriter()
            return
        self.writer = SummaryWriter(self.run_dir, purge_step=self.epoch + 1 if resumed else None)
        self.step_writer = SummaryWriter(os.path.join(self.run_dir, "steps"),
                                         purge_step=self.global_step + 1 if resumed else None)
        self.writer.add_text("formats", "\n\n".join(self.format_lines))

    def close_logs(self):
        for writer in (self.writer, self.step_writer):
            writer.close()

    def save(self):
        """Checkpoint (written by rank 0; every rank must call it); returns its
        path. With --keep_checkpoints, older epoch checkpoints are deleted."""
        state = self.state_dict()

        def write():
            try:
                path = checkpoints.save_checkpoint(self.run_dir, state)
            except utils.WriteFailed as failed:
                raise self.write_failed(failed) from None
            if self.args.keep_checkpoints and state["step"] == 0:
                checkpoints.prune_epoch_checkpoints(self.run_dir, self.args.keep_checkpoints, self.args.swa_start)
            return path

        return on_rank_zero(self.world, write)

    def write_results(self, status, **extra):
        """results.json (rank 0 writes it); a failed write ends the run."""
        try:
            utils.write_json_atomic(os.path.join(self.run_dir, "results.json"), {**self.results(status), **extra})
        except utils.WriteFailed as failed:
            raise self.write_failed(failed) from None

    def write_failed(self, failed):
        """The run's error for a failed write, recorded in results.json if that still fits."""
        try:
            utils.write_json_atomic(os.path.join(self.run_dir, "results.json"),
                                    {**self.results("failed"), "failure": str(failed)})
        except utils.WriteFailed:
            pass
        return UserError(checkpoints.failed_write_message(self.run_dir, failed))

    def stop_requested(self, stop):
        """Whether any rank was asked to stop (all ranks then stop at the same step)."""
        if self.world.distributed:
            return distributed.any_across(self.world, stop, self.device)
        return bool(stop)

    def update_bn(self, model):
        if self.world.distributed:
            distributed.update_bn(self.bn_loader, model, self.device, self.world)
        else:
            update_bn(self.bn_loader, model, self.device)

    @property
    def global_step(self):
        """Steps taken since the start of the run."""
        return self.epoch * self.steps_per_epoch + self.epoch_totals["steps"]

    def train_steps(self, stop):
        """Train the rest of the current epoch, averaging into the SWA model
        where the schedule says; False when stopped early."""
        args, schedule = self.args, self.schedule
        utils.set_epoch(self.train_loader, self.epoch, self.epoch_totals["steps"])

        def before_step(totals):
            lr = schedule.lr(self.global_step)
            for group in self.optimizer.optim.param_groups:
                group["lr"] = lr
            if schedule.changes_within_epochs(self.global_step):
                self.step_writer.add_scalar("lr/iteration", lr, self.global_step + 1)

        def after_step(totals):
            completed = self.global_step
            if schedule.collects_after(completed):
                self.swa_model.update_parameters(self.net)
                totals["collected_at"].append(completed)
                self.step_writer.add_scalar("swa/collected", int(self.swa_model.n_averaged), completed)
            if args.save_every_steps and totals["steps"] < self.steps_per_epoch \
                    and completed % args.save_every_steps == 0:
                self.save()
            # At the epoch's last step too: a stop then saves before the evaluation.
            return self.stop_requested(stop)

        def all_finite(loss):
            if not self.world.distributed:
                return math.isfinite(loss)
            return not distributed.any_across(self.world, not math.isfinite(loss), self.device)

        try:
            return utils.train_epoch(self.train_loader, self.train_net, self.optimizer, self.device,
                                     self.epoch_totals, f"epoch {self.epoch + 1}/{args.epochs}", before_step,
                                     after_step, all_finite)
        finally:
            utils.set_epoch(self.train_loader, self.epoch)

    def finish_epoch(self):
        """Evaluate, log and move on after the epoch's last step. BatchNorm
        statistics are recomputed before each evaluation: the SGD model's, and
        the SWA model's once for all the models averaged since."""
        args, epoch = self.args, self.epoch
        completed = epoch + 1
        lr = self.schedule.lr(epoch * self.steps_per_epoch)
        train_res = utils.epoch_result(self.epoch_totals, self.device, self.world)
        test_res = swa_res = {"loss": None, "accuracy": None}
        if completed % args.eval_freq == 0 or completed in (args.swa_start, args.epochs):
            self.update_bn(self.net)
            test_res = utils.evaluate(self.test_loader, self.net, self.device, "test", self.world)
            if self.swa_model.n_averaged > 0:
                self.update_bn(self.swa_model)
                swa_res = utils.evaluate(self.test_loader, self.swa_model, self.device, "swa test", self.world)

        swa_n = int(self.swa_model.n_averaged)
        collected_at = list(self.epoch_totals["collected_at"])
        record = {
            "epoch": completed, "lr": lr,
            "train_loss": train_res["loss"], "train_accuracy": train_res["accuracy"],
            "train_time": train_res["time"],
            "test_loss": test_res["loss"], "test_accuracy": test_res["accuracy"],
            "swa_test_loss": swa_res["loss"], "swa_test_accuracy": swa_res["accuracy"],
            "swa_n": swa_n, "collected": bool(collected_at), "collected_at_steps": collected_at,
            "test_samples": test_res.get("seen"),
        }
        self.history.append(record)
        self.epoch, self.epoch_totals = completed, utils.new_epoch_totals()
        print(utils.table_row([completed, lr, train_res["loss"], train_res["accuracy"], train_res["time"],
                               test_res["loss"], test_res["accuracy"], swa_res["loss"], swa_res["accuracy"],
                               swa_n], epoch, header=self.rows_printed == 0), flush=True)
        self.rows_printed += 1
        if self.schedule.c_steps and collected_at:
            print(f"     averaged after steps {', '.join(map(str, collected_at))}", flush=True)
        return record

    def results(self, status):
        return {
            "status": status,
            "config": vars(self.args),
            "activation_quantizers": self.sites,
            "quant_backend": self.backend.name if self.backend else None,
            "epochs": self.history,
            **summary(self.history, self.args),
        }


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


def resume_command(path, world):
    """This command line with --resume PATH instead of any --resume (under
    torchrun, with the launcher for as many processes on one machine)."""
    argv, kept, skip = sys.argv[1:], [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--resume":
            skip = True
        elif not arg.startswith("--resume="):
            kept.append(arg)
    launcher = [sys.executable]
    if world.distributed:
        launcher = ["torchrun", f"--nproc_per_node={world.size}"]
    return shlex.join([*launcher, sys.argv[0], *kept, "--resume", path])


def train(training, stop):
    """Run epochs until the end; returns the checkpoint saved when `stop`
    was requested first, else None."""
    args, run_dir = training.args, training.run_dir
    while training.epoch < args.epochs:
        epoch_start = time.perf_counter()
        try:
            finished_epoch = training.train_steps(stop)
        except utils.Diverged as diverged:
            saved = checkpoints.list_checkpoints(run_dir)
            last_good = saved[-1][2] if saved else "none"
            if training.world.main:
                training.write_results("diverged", diverged_at={"epoch": training.epoch + 1, "step": diverged.step})
            raise UserError(f"the loss became {diverged.loss} at epoch {training.epoch + 1}, step "
                            f"{diverged.step}; stopped (newest checkpoint, written while the loss was still "
                            f"finite: {last_good}); start afresh with a lower --lr_init or --swa_lr, or longer "
                            f"word lengths") from None
        if not finished_epoch:
            return training.save()
        record = training.finish_epoch()
        record["epoch_time"] = time.perf_counter() - epoch_start
        utils.log_scalars(training.writer, record)
        completed = training.epoch
        stopping = training.stop_requested(stop)
        path = None
        if completed % args.save_freq == 0 or completed in (args.swa_start, args.epochs) or stopping:
            path = training.save()
        status = "finished" if completed == args.epochs else "running"
        on_rank_zero(training.world, lambda: training.write_results(status))
        if stopping and completed < args.epochs:
            return path
    return None


def on_rank_zero(world, action):
    """Run `action` on rank 0 only and share its result (or its UserError,
    raised on every rank) with the others."""
    outcome = None
    if world.main:
        try:
            outcome = (action(), None)
        except UserError as error:
            outcome = (None, str(error))
    result, error = distributed.broadcast_object(world, outcome)
    if error:
        raise UserError(error)
    return result


def setup_run_dir(args, world):
    """The run directory, owned (locked) by rank 0, which alone touches it
    (None on other ranks); its path, the checkpoint to resume from, and the
    outputs to replace, decided by rank 0."""
    owned = []

    def setup():
        owned.append(run_directory.claim(
            args, f"{args.dataset}-{args.model}-{precision_tag(args)}-seed{args.seed}"))
        return owned[0].path, owned[0].resume, owned[0].stale

    run_dir, resume_path, stale_outputs = on_rank_zero(world, setup)
    return (owned[0] if owned else None), run_dir, resume_path, stale_outputs


def load_data(args, world):
    """The data sets; rank 0 loads (and if needed downloads) them before the
    other ranks read them."""
    data = error = None
    if world.main:
        try:
            data = utils.load_data(args.dataset, args.data_path)
        except UserError as raised:
            error = str(raised)
    error = distributed.broadcast_object(world, error)
    if error:
        raise UserError(error)
    return data if world.main else utils.load_data(args.dataset, args.data_path)


def run(args, world):
    if args.swa_start > args.epochs:
        raise UserError(f"--swa_start {args.swa_start} is beyond --epochs {args.epochs}; "
                        f"lower it or train longer")
    device = resolve_device(args.device)
    directory, run_dir, resume_path, stale_outputs = setup_run_dir(args, world)
    with directory or contextlib.nullcontext():  # releases the lock; a failed start leaves no empty folder
        training = start(args, world, device, run_dir, resume_path, stale_outputs)
        if directory:
            directory.training_started = True
        train_to_the_end(training, world, resume_path is not None)


def start(args, world, device, run_dir, resume_path, stale_outputs):
    """The run, built and resumed, with every check that can fail before
    training passed; only then are the outputs --overwrite replaces deleted."""
    seed_everything(args.seed)
    if args.deterministic:
        seeding.use_deterministic_algorithms()
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    training = Training(args, device, run_dir, world)
    if world.distributed:
        # The model was initialised alike on every rank; from here each replica
        # draws its own dropout masks and activation rounding noise.
        seed_everything(mix_seed(args.seed, world.rank) % 2 ** 32)
    if resume_path:
        training.load_state_dict(checkpoints.load_checkpoint(resume_path), resume_path)
        print(f"Resumed from {resume_path} after epoch {training.epoch}, step {training.epoch_totals['steps']}")
    if world.main:  # --overwrite: only now that the new run could start
        for path in stale_outputs:
            os.remove(path)
    return training


def train_to_the_end(training, world, resumed):
    """Train, then print the closing figures, or exit with the resume command
    when a signal stopped the run."""
    args = training.args
    training.open_logs(resumed=resumed)
    try:
        with StopRequest() as stop:
            saved = train(training, stop)
    finally:
        training.close_logs()
    if saved:
        signum = stop.signal or signal.SIGTERM  # another rank may have received it
        print(f"Stopped by {signal.Signals(signum).name} at epoch {training.epoch + 1}, step "
              f"{training.epoch_totals['steps']}; saved {saved}. Resume with:\n{resume_command(saved, world)}",
              flush=True)
        sys.exit(128 + signum)

    final = summary(training.history, args)
    print("Done")
    print(f"SGD Error : {final['sgd_error']}")
    print(f"SWA Error : {final['swa_error']}")


def main(argv=None):
    args = parse_args(argv)
    world, args.device = distributed.init(args.device)
    if not world.main:  # rank 0 alone prints, logs and writes
        sys.stdout = open(os.devnull, "w")
        utils.SHOW_PROGRESS = False
    try:
        run(args, world)
    except UserError as error:
        if world.main:  # every rank raises it; one line is enough
            print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # once training runs, Ctrl-C saves and stops instead (StopRequest)
        if world.main:
            print("error: interrupted by Ctrl-C before training started", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    finally:
        distributed.shutdown(world)


if __name__ == "__main__":
    main()
