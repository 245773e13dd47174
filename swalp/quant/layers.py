"""Per-layer precision: rules that give the layers a user names other formats.

A rule is `PATTERN:SPEC` (every kind of number of those layers in SPEC,
e.g. `features.0:fp32`) or `PATTERN:KIND=SPEC,...` (only those kinds, e.g.
`classifier.*:weight=bfp16,activate=bfp16`). PATTERN is a glob on the
module's qualified name, or `first` / `last`: the network's first and last
layer (convolution or linear layer, in module order). A rule reaches the
modules it names and everything inside them: a parameter's kinds (weight,
grad, momentum, acc) follow the rules of the module owning it, a quantizer
site's (activate, error) the rules of the site. Later rules win. Parsing
imports no torch: the command line checks rules before torch loads.
"""

import difflib
import fnmatch
import zlib
from dataclasses import dataclass, replace

from swalp.errors import UserError
from swalp.quant import specs
from swalp.quant.kinds import EVERY, NUMBER_KINDS, is_word_length


@dataclass(frozen=True)
class LayerRule:
    """One rule: a pattern and the formats (format object, None for full
    precision) of the kinds it sets."""

    pattern: str
    formats: tuple  # ((kind, format or None), ...) in NUMBER_KINDS order

    @classmethod
    def parse(cls, text: str) -> "LayerRule":
        """The rule `text` names; FormatError (one line) for anything else.

        >>> LayerRule.parse("classifier.*:weight=bfp16").text
        'classifier.*:weight=bfp16'
        """
        pattern, colon, body = str(text).strip().rpartition(":")
        if not colon or not pattern or not body:
            raise specs.FormatError(f"{text!r} is not a layer rule; use PATTERN:SPEC or PATTERN:KIND=SPEC,...")
        chosen = {}
        for part in body.split(","):
            kind, equals, spec = part.strip().rpartition("=")
            if equals and kind not in NUMBER_KINDS:
                raise specs.FormatError(f"{text!r}: {kind!r} is not a kind of number; use {', '.join(NUMBER_KINDS)}")
            try:
                number_format = specs.parse(spec)
            except specs.FormatError as error:
                raise specs.FormatError(f"{text!r}: {error}") from None
            chosen.update({kind: number_format} if equals else dict.fromkeys(EVERY, number_format))
        return cls(pattern, tuple((kind, chosen[kind]) for kind in NUMBER_KINDS if kind in chosen))

    def laid_out(self, small_block, block_dim):
        """The rule with its block floating point word lengths laid out as the run's (--small-block, --block-dim)."""
        return LayerRule(self.pattern, tuple(
            (kind, replace(f, small_block=small_block, block_dim=block_dim) if is_word_length(f) else f)
            for kind, f in self.formats))

    @property
    def text(self) -> str:
        """The rule's one spelling (canonical specs, kinds in a fixed order)."""
        body = ",".join(f"{kind}={specs.FULL_PRECISION if f is None else f.spec}" for kind, f in self.formats)
        return f"{self.pattern}:{body}"


def layer_names(model):
    """The qualified names of the network's layers (convolutions and linear
    layers, the default quantizer sites' types), in module order."""
    import torch.nn as nn  # here: the command line parses rules before torch loads

    layer_types = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    return [name for name, module in model.named_modules() if isinstance(module, layer_types)]


def _matches(name, pattern, layers):
    """Whether module `name` is named by `pattern` or lies inside a module it names."""
    if pattern == "first":
        pattern = layers[0] if layers else ""
    elif pattern == "last":
        pattern = layers[-1] if layers else ""
    parts = name.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[:end]), pattern) for end in range(1, len(parts) + 1)) \
        if name else False


def formats_for(name, defaults, rules, layers):
    """The formats {kind: format or None} of module `name`: `defaults`, then every rule that reaches it."""
    chosen = dict(defaults)
    for rule in rules:
        if _matches(name, rule.pattern, layers):
            chosen.update(rule.formats)
    return chosen


def check_rules(model, rules):
    """A UserError (one line, naming the closest names) for the first rule
    that reaches no module of `model`."""
    names = [name for name, _ in model.named_modules() if name]
    layers = layer_names(model)
    for rule in rules:
        if not any(_matches(name, rule.pattern, layers) for name in names):
            close = difflib.get_close_matches(rule.pattern, names, n=3, cutoff=0.3) or layers[:3]
            raise UserError(f"--layer-format {rule.text!r} matches no layer of {type(model).__name__}; "
                             f"the closest names: {', '.join(close)} (--list-layers lists them all)")


def tag(rules):
    """A short stable tag of the rules for run directory names, e.g. L3fa2c1."""
    return "L" + format(zlib.crc32(";".join(rule.text for rule in rules).encode()), "08x")[:6]
