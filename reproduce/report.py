"""The paper's results table, and test-error curves, from finished runs.

Reads every results.json under a directory (as written by train.py, e.g. by
reproduce/run.py), groups finished runs by dataset, model and number format,
and prints in markdown the test error (%) as mean ± sample standard deviation
over seeds with the number of seeds, next to the paper's numbers. A
full-precision run gives SGD-FP and SWA-FP, an 8-bit one SGD-LP and SWALP;
runs in other formats get rows of their own. "SGD" is the SGD model's error
after `swa_start` epochs, the end of its decaying schedule (the original's
convention); "SWA" the averaged model's after the last epoch.

    python reproduce/report.py runs/paper [--plots DIR]

With --plots, one PNG per dataset and model: test error against epoch for
SGD and SWA in each format (mean over seeds).
"""

import argparse
import json
import os
import statistics
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from quantization import NUMBER_KINDS, precision_tag  # noqa: E402

PAPER = {  # test error %, mean and std over 3 seeds (the paper's table)
    ("CIFAR10", "VGG16"): {"SGD-FP": (6.81, 0.09), "SWA-FP": (6.51, 0.14), "SGD-LP": (7.61, 0.15),
                           "SWALP": (6.70, 0.12)},
    ("CIFAR100", "VGG16"): {"SGD-FP": (27.23, 0.17), "SWA-FP": (25.93, 0.21), "SGD-LP": (29.59, 0.32),
                            "SWALP": (26.65, 0.29)},
    ("CIFAR10", "PreResNet164"): {"SGD-FP": (4.63, 0.18), "SWA-FP": (4.03, 0.10)},
    ("CIFAR100", "PreResNet164"): {"SGD-FP": (22.20, 0.57), "SWA-FP": (19.95, 0.19)},
}
COLUMNS = ("SGD-FP", "SWA-FP", "SGD-LP", "SWALP")
def number_format(config):
    """"FP", "8-bit" (weights, activations, gradients, errors and momentum in
    8 bits, with or without an 8-bit accumulator) or a tag such as W6A6G6E6M6."""
    lengths = {kind: config.get(f"wl_{kind}", -1) for kind in NUMBER_KINDS}
    if all(lengths[kind] == 8 for kind in NUMBER_KINDS[:5]) and lengths["acc"] in (-1, 8):
        return "8-bit"
    return precision_tag(lengths)


def load_runs(root):
    """Every results.json under root, with its path."""
    runs = []
    for directory, _, files in os.walk(root):
        if "results.json" in files:
            path = os.path.join(directory, "results.json")
            try:
                with open(path) as handle:
                    runs.append((path, json.load(handle)))
            except (OSError, ValueError) as error:
                print(f"skipping {path}: {error}", file=sys.stderr)
    return sorted(runs, key=lambda item: item[0])


def group(runs):
    """{(dataset, model, format): [results of finished runs]}, and the count
    of runs not finished per group."""
    finished, unfinished = defaultdict(list), defaultdict(int)
    for _, results in runs:
        config = results["config"]
        key = (config["dataset"], config["model"], number_format(config))
        if results.get("status") == "finished":
            finished[key].append(results)
        else:
            unfinished[key] += 1
    return finished, unfinished


def summarise(values):
    """(mean, sample std or None, count) of the non-missing values."""
    values = [value for value in values if value is not None]
    if not values:
        return None
    spread = statistics.stdev(values) if len(values) > 1 else None
    return statistics.fmean(values), spread, len(values)


def cell(measured, paper):
    if measured is None:
        text = "–"
    else:
        mean, spread, count = measured
        text = f"{mean:.2f} ± {spread:.2f} ({count})" if spread is not None else f"{mean:.2f} ({count})"
    if paper:
        text += f" [paper {paper[0]:.2f} ± {paper[1]:.2f}]"
    return text


def table(finished, unfinished):
    """The markdown table: one row per dataset and model (and per low-precision
    format other than 8-bit)."""
    rows = {}
    for (dataset, model, fmt), results in finished.items():
        low = "8-bit" if fmt in ("FP", "8-bit") else fmt
        row = rows.setdefault((dataset, model, low), {})
        prefix = ("SGD-FP", "SWA-FP") if fmt == "FP" else ("SGD-LP", "SWALP")
        row[prefix[0]] = summarise([r["sgd_error"] for r in results])
        row[prefix[1]] = summarise([r["swa_error"] for r in results])
    lines = ["| Dataset | Model | Low precision | " + " | ".join(COLUMNS) + " |",
             "|---" * (3 + len(COLUMNS)) + "|"]
    for (dataset, model, low), row in sorted(rows.items()):
        paper = PAPER.get((dataset, model), {}) if low == "8-bit" else {}
        cells = [cell(row.get(column), paper.get(column)) for column in COLUMNS]
        lines.append(f"| {dataset} | {model} | {low} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Test error %, mean ± sample std over seeds (number of finished seeds); [paper mean ± std, 3 seeds].")
    for (dataset, model, fmt), count in sorted(unfinished.items()):
        lines.append(f"Not finished: {count} run(s) of {dataset} {model} {fmt}.")
    return "\n".join(lines)


def curves(results_list, key):
    """Mean test error per epoch over runs (NaN where no run evaluated)."""
    by_epoch = defaultdict(list)
    for results in results_list:
        for record in results["epochs"]:
            if record.get(f"{key}_accuracy") is not None:
                by_epoch[record["epoch"]].append(100.0 - record[f"{key}_accuracy"])
    epochs = sorted(by_epoch)
    return epochs, [statistics.fmean(by_epoch[epoch]) for epoch in epochs]


def plot(finished, directory):
    """One PNG per dataset and model; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(directory, exist_ok=True)
    paths = []
    for dataset, model in sorted({key[:2] for key in finished}):
        figure, axes = plt.subplots(figsize=(7, 4.5))
        for (d, m, fmt), results in sorted(finished.items()):
            if (d, m) != (dataset, model):
                continue
            for key, label, style in (("test", "SGD", "--"), ("swa_test", "SWA", "-")):
                epochs, errors = curves(results, key)
                if epochs:
                    axes.plot(epochs, errors, style, label=f"{label} {fmt} ({len(results)} seeds)")
        axes.set_xlabel("epoch")
        axes.set_ylabel("test error %")
        axes.set_title(f"{dataset} {model}")
        axes.grid(alpha=0.3)
        axes.legend()
        path = os.path.join(directory, f"{dataset}-{model}.png")
        figure.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(figure)
        paths.append(path)
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="directory searched for results.json files")
    parser.add_argument("--plots", metavar="DIR", help="write test-error curves as PNGs into DIR")
    args = parser.parse_args(argv)
    runs = load_runs(args.root)
    if not runs:
        print(f"error: no results.json under {args.root}; run reproduce/run.py first", file=sys.stderr)
        sys.exit(2)
    finished, unfinished = group(runs)
    print(table(finished, unfinished))
    if args.plots:
        for path in plot(finished, args.plots):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
