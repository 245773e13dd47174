"""Help texts and the README say what the code does."""

import os
import re

import pytest

from experiments import linear_regression, logistic_regression
from runs import ROOT
from swalp.quant import kinds
from swalp.run import arguments


def option_blocks(help_text):
    """{option: its help text} from argparse's --help output."""
    blocks, current = {}, None
    for line in help_text.splitlines():
        match = re.match(r"  (--[\w-]+)", line)
        if match:
            current = match[1]
            blocks[current] = ""
        if current and (match or line.startswith("    ")):
            blocks[current] += " " + line.strip()
        elif not line.strip():
            current = None
    return blocks


@pytest.mark.parametrize("experiment", [linear_regression, logistic_regression])
def test_convex_experiments_help_every_option_with_its_default(experiment):
    blocks = option_blocks(experiment.build_parser().format_help())
    options = [action for action in experiment.build_parser()._actions if action.dest != "help"]
    assert options and set(blocks) >= {action.option_strings[0] for action in options}
    for action in options:
        block = blocks[action.option_strings[0]]
        assert re.search(r"\S \(default: ", block), (action.option_strings[0], block)  # a text, then the default
        assert f"(default: {action.default})".replace(" ", "") in block.replace(" ", "")


def test_no_accumulator_is_described_alike_in_help_startup_and_readme():
    meaning = kinds.unquantized("acc")
    assert f"-1: {meaning}" in " ".join(arguments.build_parser().format_help().split())
    with open(os.path.join(ROOT, "README.md")) as handle:
        row = next(line for line in handle if line.startswith("| `--wl-acc`"))
    assert f"-1: {meaning}" in row


def test_every_train_flag_has_help_and_a_sentence_in_the_readme_or_docs():
    parser = arguments.build_parser()
    blocks = option_blocks(parser.format_help())
    documents = []
    for folder, names in ((ROOT, ["README.md"]), (os.path.join(ROOT, "docs"), os.listdir(os.path.join(ROOT, "docs")))):
        documents += [open(os.path.join(folder, name)).read() for name in names if name.endswith(".md")]
    text = "\n".join(documents)
    for action in parser._actions:
        if action.dest == "help":
            continue
        flag = next(option for option in action.option_strings if option.startswith("--"))
        assert len(blocks.get(flag, "").split()) > 2, f"{flag} has no help text"
        assert re.search(rf"`{re.escape(flag)}[` =]", text), f"{flag} is in neither the README nor docs/"
