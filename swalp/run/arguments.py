"""train.py's command line: every flag, its default and its checks.

It imports no torch (nor anything that does), so that a mistake on the
command line ends in its one-line message within a fraction of a second;
the model names come from the caller (train.py's `models` registry).
After `parse_args` a run's number formats exist only as format objects
(`args.formats`, one per kind, None in full precision); `config` records
the flags as results.json and checkpoints keep them.
"""

import argparse
import difflib
import math
import os

from swalp.data import DATASETS
from swalp.quant import formats, kinds, layers, specs
from swalp.quant.kinds import BACKENDS, NUMBER_KINDS, ROUNDINGS, unquantized


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
decay = number(float, lambda value: 0 < value < 1, "between 0 and 1")
non_negative_float = number(float, lambda value: value >= 0, "0 or more")
seed_value = number(int, lambda value: 0 <= value < 2 ** 32, "in 0..2^32-1")  # NumPy's limit


# Loader processes beyond this many per core only thrash the machine (and a
# few thousand take minutes to start, during which a stop request waits).
WORKERS_PER_CORE = 4


def machine_cores():
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def model_name(names):
    """An argparse type: one of `names` in any case, or an error naming the closest."""
    by_lower = {name.lower(): name for name in names}

    def parse(text):
        if text.lower() in by_lower:
            return by_lower[text.lower()]
        close = difflib.get_close_matches(text.lower(), list(by_lower), n=1, cutoff=0.6)
        hint = f"; did you mean {by_lower[close[0]]}?" if close else ""
        raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {', '.join(sorted(names))}){hint}")
    return parse


class ExitTwoParser(argparse.ArgumentParser):
    """argparse already exits with code 2 on bad flags; this only makes its
    message the one-line form used for every other user error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser(model_names=()):
    parser = ExitTwoParser(description="SWALP training (SGD and SWA in low precision).")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default="CIFAR10", choices=DATASETS,
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
    data.add_argument("--num_workers", type=non_negative_int, default=None, metavar="N",
                      help=f"data loading processes of --loader torchvision, at most {WORKERS_PER_CORE} per core "
                           f"(default: 4, or the machine's cores if fewer; 0 loads in the main process)")

    training = parser.add_argument_group("training")
    training.add_argument("--model", required=True, type=model_name(model_names) if model_names else str,
                          metavar="MODEL", help=f"model name, in any case: {', '.join(model_names)}")
    training.add_argument("--epochs", type=positive(int), default=None, metavar="N",
                          help="number of epochs to train (default: 300; ImageNet: 90)")
    training.add_argument("--lr_init", type=positive(float), default=None, metavar="LR",
                          help="initial learning rate (default: 0.05; ImageNet: 0.1)")
    training.add_argument("--optimizer", default="sgd", choices=("sgd", "adamw"),
                          help="sgd (the paper), or adamw: Adam with decoupled weight decay (--wd), its first "
                               "moment rounded as --format-momentum, its second as --format-moment2; choose its "
                               "--lr_init and --swa_lr (the defaults are SGD's) (default: sgd)")
    training.add_argument("--momentum", type=non_negative_float, default=0.9, metavar="M",
                          help="SGD momentum (default: 0.9)")
    training.add_argument("--beta1", type=decay, default=0.9, metavar="B", help="AdamW's beta1 (default: 0.9)")
    training.add_argument("--beta2", type=decay, default=0.999, metavar="B", help="AdamW's beta2 (default: 0.999)")
    training.add_argument("--eps", type=positive(float), default=1e-8, metavar="E",
                          help="AdamW's epsilon (default: 1e-08)")
    training.add_argument("--wd", type=non_negative_float, default=None,
                          help="weight decay (default: 1e-4; ImageNet: 1e-4)")
    training.add_argument("--seed", type=seed_value, default=1, metavar="N",
                          help="random seed, 0..2^32-1 (default: 1)")
    training.add_argument("--device", default="auto",
                          help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N (default: auto)")
    training.add_argument("--deterministic", action="store_true",
                          help="CUDA: deterministic algorithms only and no cuDNN autotuning, so that a run "
                               "with the triton or torch backend repeats bit for bit (slower; see docs/backends.md)")
    training.add_argument("--tf32", action="store_true",
                          help="CUDA: convolutions and matrix products round their float32 operands to TF32 "
                               "(10 mantissa bits) on tensor cores: faster, and exact only where every operand "
                               "lies on a grid of at most 11 significant bits, such as 8-bit block floating point "
                               "(bfp<wl> up to wl 12), FP8, MX and bf16 values; the input images and any kind in "
                               "full precision do not, so the first layer and full-precision runs change. "
                               "Off: IEEE float32, the paper's arithmetic (default: off)")

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
    averaging.add_argument("--average", default="swa", choices=("swa", "ema"),
                           help="swa: the equal-weight average of the weights collected by the schedule (the "
                                "paper); ema: an exponential moving average updated after every step from "
                                "--ema_start on (torch's AveragedModel with get_ema_multi_avg_fn), kept in float32 "
                                "whatever the weights' format; its BatchNorm statistics are recomputed and it is "
                                "evaluated like the SWA model, in the swa columns (default: swa)")
    averaging.add_argument("--ema_decay", type=decay, default=0.999, metavar="D",
                           help="--average ema: each update keeps D of the average and adds 1 - D of the "
                                "weights (default: 0.999)")
    averaging.add_argument("--ema_start", type=non_negative_int, default=None, metavar="N",
                           help="--average ema: the epochs before the first update; 0 averages from the first "
                                "step (default: --swa_start)")

    lowp = parser.add_argument_group(
        "low precision", f"Number format specs (any case): {specs.GRAMMAR}. e<exp>m<man> is qtorch's "
        "floating point (e4m3 reaches 480, e5m2 114688, ties away from zero); fp8e4m3 and fp8e5m2 are OCP's "
        "(448 and 57344, saturating, ties to even). bfp<wl> is --wl-* N, laid out by --small-block and "
        "--block-dim; bfp<wl>/<k> and MX formats block k (MX: 32) consecutive elements of each row (index of "
        "dim 0). qtorch has no kernels for fp8* and mx*: --quant-backend auto runs them on torch.")
    lowp.add_argument("--format", default=None, metavar="SPEC",
                      help="number format of every kind below, accumulator included (default: full precision)")
    for kind, what in (("weight", "weights"), ("activate", "activations"), ("grad", "gradients"),
                       ("error", "back-propagated errors"), ("momentum", "momentum buffers"),
                       ("acc", "the gradient accumulator, a low-precision copy of the weights that SGD updates"),
                       ("moment2", "AdamW's second moment, its running mean of squared gradients")):
        lowp.add_argument(f"--wl-{kind}", type=word_length, default=None, metavar="N",
                          help=f"block floating point word length in bits ({formats.MIN_WL}..{formats.MAX_WL}) "
                               f"for {what}; -1: {unquantized(kind)} (default: -1)")
        lowp.add_argument(f"--format-{kind}", default=None, metavar="SPEC",
                          help=f"number format of {what.split(',')[0]} (instead of --wl-{kind}; "
                               + ("--format does not set it)" if kind == "moment2" else "overrides --format)"))
    lowp.add_argument("--rounding", "--quant-type", dest="rounding", default="stochastic",
                      choices=ROUNDINGS,
                      help="rounding: stochastic or nearest (default: stochastic; "
                           "--quant-type is the original's name)")
    lowp.add_argument("--small-block", default="None", choices=list(formats.SMALL_BLOCK_MAX_DIMS),
                      help="None: every tensor is blocked along --block-dim; FC: tensors of at most 1 "
                           "dimension share one exponent; Conv: at most 2 dimensions (default: None)")
    lowp.add_argument("--block-dim", default="B", choices=formats.BLOCK_DIMS,
                      help="B: one exponent per index of dim 0; BC: per index of dims 0 and 1 (default: B)")
    lowp.add_argument("--quant-backend", default="auto", choices=BACKENDS,
                      help="rounding kernels: torch (ours: PyTorch operations, seedable, no compiler), "
                           "triton (ours: fused Triton kernels with counter-based noise; CUDA, or the CPU "
                           "with TRITON_INTERPRET=1), qtorch (qtorch's compiled C++/CUDA kernels, not "
                           "seedable), auto (triton on a CUDA device when it compiles, else torch) "
                           "(default: auto)")
    lowp.add_argument("--compile", action="store_true",
                      help="run the network's forward and backward and the optimizer's rounding under "
                           "torch.compile: the torch kernels, fused into the layers around them (C++ on the CPU, "
                           "Triton on CUDA), with the triton backend's counter-based noise; the first steps wait "
                           "for the compiler")
    lowp.add_argument("--compile-backend", default="inductor", choices=("inductor", "aot_eager", "eager"),
                      help="torch.compile's backend under --compile: inductor (generated code), aot_eager (the "
                           "same graphs, forward and backward, run by PyTorch's kernels, without waiting for code "
                           "generation: to check that a model compiles) or eager (Dynamo's capture alone, the "
                           "quickest check) (default: inductor)")
    lowp.add_argument("--layer-format", action="append", default=None, metavar="RULE",
                      help="formats of the layers a rule names, repeatable, later rules winning: PATTERN:SPEC "
                           "(every kind, e.g. 'features.0:fp32') or PATTERN:KIND=SPEC,... (e.g. "
                           "'classifier.*:weight=bfp16,activate=bfp16'); PATTERN is a glob on the module's "
                           "qualified name, or first or last (the first and last convolution or linear layer); "
                           "a rule reaches the modules it names and their submodules (default: none)")
    lowp.add_argument("--list-layers", action="store_true",
                      help="print the model's layers, their quantizer sites and the formats each gets, then exit")
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


def parse_args(argv=None, model_names=(), imagenet_models=()):
    """The command line, with the dataset's defaults where a flag is not
    given; --model is one of `model_names`, those of `imagenet_models` for
    ImageNet and the others for CIFAR."""
    parser = build_parser(model_names)
    args = parser.parse_args(argv)
    try:
        args.formats, args.format = kinds.per_kind(given_word_lengths(args), given_specs(args), args.format,
                                                   args.small_block, args.block_dim)
        args.layer_rules = [layers.LayerRule.parse(rule).laid_out(args.small_block, args.block_dim)
                            for rule in args.layer_format or []]
    except specs.FormatError as error:
        parser.error(str(error) if str(error).startswith("argument") else f"argument --layer-format: {error}")
    args.layer_format = [rule.text for rule in args.layer_rules] or None
    for key, value in DATASET_DEFAULTS[args.dataset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.dir is not None and not args.dir.strip():
        parser.error("--dir is empty; name a run directory, or leave --dir out for "
                     "runs/<dataset>-<model>-<precision>-seed<seed>")
    cores = machine_cores()
    if args.num_workers is None:
        args.num_workers = min(4, cores)
    elif args.num_workers > WORKERS_PER_CORE * cores:
        parser.error(f"--num_workers {args.num_workers} is far more than this machine's {cores} cores can run; "
                     f"use at most {WORKERS_PER_CORE * cores}")
    if args.data_path is None and args.dataset != "digits":
        parser.error(f"--dataset {args.dataset} needs --data_path")
    imagenet = args.dataset == "ImageNet"
    if imagenet != (args.model in imagenet_models):
        parser.error(f"--model {args.model} is for {'CIFAR' if imagenet else 'ImageNet'}; use "
                     + (", ".join(imagenet_models) if imagenet else "a CIFAR model") +
                     f" with --dataset {args.dataset}")
    if imagenet and args.loader == "batched":
        parser.error("--loader batched needs a data set held in memory (CIFAR); use --loader torchvision "
                     "with --dataset ImageNet")
    idle = idle_flag(args, parser)
    if idle:
        parser.error(idle)
    for kind in NUMBER_KINDS:  # from here on the formats say it all
        delattr(args, f"wl_{kind}")
        delattr(args, f"format_{kind}")
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
    if given("compile_backend") and not args.compile:
        return "--compile-backend applies only with --compile"
    if args.compile and args.quant_backend not in ("auto", "torch"):
        return (f"--compile rounds with the torch kernels under the compiler, not --quant-backend "
                f"{args.quant_backend}; drop one of the two")
    if args.average == "swa":
        for key in ("ema_decay", "ema_start"):
            if given(key):
                return f"{flag_name(key)} applies only to --average ema"
    elif given("swa_c_epochs") or given("swa_c_steps"):
        return "--swa_c_epochs and --swa_c_steps do nothing with --average ema, which averages after every step"
    optimizer_flags = {"sgd": ("momentum",), "adamw": ("beta1", "beta2", "eps", "wl_moment2", "format_moment2")}
    for optimizer, keys in optimizer_flags.items():
        for key in keys:
            if args.optimizer != optimizer and given(key):
                return f"{flag_name(key)} applies only to --optimizer {optimizer}"
    if args.optimizer == "sgd" and args.momentum == 0 and (args.wl_momentum not in (None, -1) or args.format_momentum):
        flag = "--wl-momentum" if args.wl_momentum not in (None, -1) else "--format-momentum"
        return f"{flag} does nothing with --momentum 0 (there are no momentum buffers)"
    return None


def given_word_lengths(args):
    return {kind: getattr(args, f"wl_{kind}") for kind in NUMBER_KINDS}


def given_specs(args):
    return {kind: getattr(args, f"format_{kind}") for kind in NUMBER_KINDS}


def config(args):
    """The flags' values as results.json and checkpoints record them, in
    --help's order: each kind's format as its wl_<kind> and format_<kind>."""
    recorded = kinds.record(args.formats)
    return {action.dest: recorded[action.dest] if action.dest in recorded else getattr(args, action.dest)
            for action in build_parser()._actions if action.dest != "help"}


def flag_name(key):
    """The command-line spelling of an argument's dest."""
    for action in build_parser()._actions:
        if action.dest == key:
            return action.option_strings[0]
    raise KeyError(key)
