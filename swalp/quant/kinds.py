"""The kinds of numbers a low-precision run rounds, and each kind's format
from the command line's flags.

Weights, activations, gradients, back-propagated errors, momentum buffers
and the gradient accumulator each take a format (None: full precision).
After `per_kind` a run knows its formats only as format objects; `record`
writes them back as the flags' values for results.json and checkpoints.
"""

from dataclasses import replace

from swalp.quant import specs
from swalp.quant.formats import BlockFormat

# Names the command line offers, kept here so that it need not import torch.
ROUNDINGS = ("stochastic", "nearest")
BACKENDS = ("auto", "torch", "triton", "qtorch")
# moment2: AdamW's second moment (its running mean of squared gradients);
# momentum is SGD's momentum buffer or AdamW's first moment.
NUMBER_KINDS = ("weight", "activate", "grad", "error", "momentum", "acc", "moment2")
OPTIMIZER_KINDS = ("weight", "grad", "momentum", "acc", "moment2")
# What --format sets: every kind but the second moment, which only its own flags do.
EVERY = NUMBER_KINDS[:-1]
KIND_TAGS = {"weight": "W", "activate": "A", "grad": "G", "error": "E", "momentum": "M", "acc": "Acc", "moment2": "V"}


def shown(optimizer):
    """The kinds a run with `optimizer` (sgd, adamw) has: SGD has no second moment."""
    return NUMBER_KINDS if optimizer == "adamw" else EVERY


def unquantized(kind):
    """What full precision means for a kind, said alike in --help and the startup lines."""
    return "none, SGD updates the weights directly" if kind == "acc" else "full precision"


def per_kind(word_lengths, kind_specs, every=None, small_block="None", block_dim="B"):
    """Each kind's format: `word_lengths` maps kinds to --wl-<kind> (None
    where not given, -1 full precision), `kind_specs` to --format-<kind> (a
    spec or None), `every` is --format. A kind's own spec wins over
    --format; a word length and a spec for one kind are refused. Block
    floating point without a block size (a word length, or bfp<wl>) is laid
    out by `small_block` and `block_dim`, so that `--format-weight bfp8` and
    `--wl-weight 8` are one run. Each spec is parsed once; FormatError names
    the flag of a bad one in argparse's words. Returns {kind: format or
    None} and the canonical spec of --format (None when not given)."""
    given = {"--format": every, **{f"--format-{kind}": spec for kind, spec in kind_specs.items()}}
    parsed = {}
    for flag, spec in given.items():
        if spec is None:
            continue
        try:
            parsed[flag] = specs.parse(spec)
        except specs.FormatError as error:
            raise specs.FormatError(f"argument {flag}: {error}") from None
    chosen = {}
    for kind, wl in word_lengths.items():
        flag = f"--format-{kind}" if kind_specs.get(kind) is not None else "--format" if kind in EVERY else None
        if flag in parsed and wl is not None:
            raise specs.FormatError(f"--wl-{kind} and {flag} both set the {kind} format; keep one")
        number_format = parsed.get(flag)
        if flag not in parsed and wl not in (None, -1):
            number_format = BlockFormat(wl)
        if isinstance(number_format, BlockFormat) and not number_format.block_size:
            number_format = replace(number_format, small_block=small_block, block_dim=block_dim)
        chosen[kind] = number_format
    if "--format" not in parsed:
        return chosen, None
    return chosen, specs.FULL_PRECISION if parsed["--format"] is None else parsed["--format"].spec


def is_word_length(number_format):
    """Whether a format is what --wl-<kind> sets: block floating point without a block size."""
    return isinstance(number_format, BlockFormat) and not number_format.block_size


def record(formats):
    """The flags' values of each kind's format, as results.json and
    checkpoints keep them: wl_<kind> (-1 unless a word length) and
    format_<kind> (the canonical spec, None for a word length or full
    precision)."""
    values = {}
    for kind in NUMBER_KINDS:
        number_format = formats.get(kind)
        values[f"wl_{kind}"] = number_format.wl if is_word_length(number_format) else -1
        values[f"format_{kind}"] = None if number_format is None or is_word_length(number_format) \
            else number_format.spec
    return values


def from_record(values):
    """The formats a record names (`record`'s fields, e.g. in a results.json
    config), block floating point in its default layout."""
    formats = {}
    for kind in NUMBER_KINDS:
        wl, spec = values.get(f"wl_{kind}", -1), values.get(f"format_{kind}")
        formats[kind] = BlockFormat(wl) if wl != -1 else specs.parse(spec) if spec else None
    return formats


def precision_tag(formats):
    """FP, or the formats that are set, e.g. W8A8G8E8M8Acc8 for block
    floating point word lengths, Wmxfp8e4m3Gfixed8.6 for other formats
    (bfp8/32 written bfp8k32: no path separator)."""
    tags = []
    for kind in NUMBER_KINDS:
        number_format = formats.get(kind)
        if number_format is None:
            continue
        name = str(number_format.wl) if is_word_length(number_format) else number_format.spec.replace("/", "k")
        tags.append(f"{KIND_TAGS[kind]}{name}")
    return "".join(tags) if tags else "FP"
