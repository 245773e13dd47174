"""The paper's results table, and test-error curves, from finished runs.

Reads every results.json under a directory (as written by train.py, e.g. by
reproduce/run.py), groups finished runs by dataset, model, training recipe
(epochs, batch size, rates, schedule) and number format, one run per seed,
and prints in markdown the test error (%) as mean ± sample standard deviation
over seeds with the number of seeds, next to the paper's numbers. A
full-precision run gives SGD-FP and SWA-FP, an 8-bit one SGD-LP and SWALP;
other recipes and formats get rows of their own, and runs left out
(unfinished, diverged, a seed counted already) are listed below the table. "SGD" is the SGD model's error
after `swa_start` epochs, the end of its decaying schedule (the original's
convention); "SWA" the averaged model's after the last epoch.

    python reproduce/report.py runs/paper [--plots DIR]

With --plots, one PNG per dataset and model: test error against epoch for
SGD (thin, dashed) and SWA (wide, translucent, under it) in each format, one
colour per format (mean over seeds).
"""

import argparse
import json
import os
import statistics
import sys
from collections import defaultdict

from swalp.quant.kinds import EVERY, NUMBER_KINDS, from_record, precision_tag

PAPER = {  # test error %, mean and std over 3 seeds (the paper's table)
    ("CIFAR10", "VGG16"): {"SGD-FP": (6.81, 0.09), "SWA-FP": (6.51, 0.14), "SGD-LP": (7.61, 0.15),
                           "SWALP": (6.70, 0.12)},
    ("CIFAR100", "VGG16"): {"SGD-FP": (27.23, 0.17), "SWA-FP": (25.93, 0.21), "SGD-LP": (29.59, 0.32),
                            "SWALP": (26.65, 0.29)},
    ("CIFAR10", "PreResNet164"): {"SGD-FP": (4.63, 0.18), "SWA-FP": (4.03, 0.10)},
    ("CIFAR100", "PreResNet164"): {"SGD-FP": (22.20, 0.57), "SWA-FP": (19.95, 0.19)},
}
COLUMNS = ("SGD-FP", "SWA-FP", "SGD-LP", "SWALP")
# Settings that make two runs of one dataset and model different experiments:
# the training recipe (shared by the full-precision and low-precision runs of
# one table row) and the number format.
RECIPE_KEYS = ("epochs", "batch_size", "lr_init", "swa_start", "swa_lr", "wd", "momentum", "swa_schedule",
               "swa_lr_max", "swa_cycle_steps", "swa_c_epochs", "swa_c_steps")
FORMAT_KEYS = ("rounding", "small_block", "block_dim", "quant_placement")


def recipe(config):
    return tuple((key, config.get(key)) for key in RECIPE_KEYS)


def describe(recipe_items):
    settings = dict(recipe_items)
    text = (f"{settings['epochs']} ep, lr {settings['lr_init']:g}, swa {settings['swa_start']}@"
            f"{settings['swa_lr']:g}, wd {settings['wd']:g}, bs {settings['batch_size']}")
    if settings.get("swa_schedule") == "cyclic":
        text += f", cyclic {settings['swa_lr_max']}/{settings['swa_cycle_steps']}"
    return text


def number_format(config):
    """"FP", or the formats set (e.g. W8A8G8E8M8Acc8, or the spec alone when
    every kind has it, e.g. mxfp8e4m3) with the rounding and layout where
    they differ from stochastic, None, B, layer."""
    lengths = {kind: config.get(f"wl_{kind}", -1) for kind in NUMBER_KINDS}
    specs = {kind: config.get(f"format_{kind}") for kind in NUMBER_KINDS}
    label = precision_tag(from_record(config))
    if label == "FP":
        return label
    if len({specs[kind] for kind in EVERY}) == 1 and specs["weight"] is not None:
        label = specs["weight"]
    defaults = {"rounding": "stochastic", "small_block": "None", "block_dim": "B", "quant_placement": "layer"}
    # The layout flags shape block floating point word lengths only.
    keys = FORMAT_KEYS if any(wl != -1 for wl in lengths.values()) else ("rounding", "quant_placement")
    extras = [f"{key}={config.get(key)}" for key in keys if config.get(key, defaults[key]) != defaults[key]]
    return " ".join([label, *extras])


def is_eight_bit(config):
    """The paper's SGD-LP/SWALP setting: weights, activations, gradients,
    errors and momentum in 8 bits (with or without an 8-bit accumulator)."""
    return all(config.get(f"wl_{kind}") == 8 for kind in NUMBER_KINDS[:5]) and config.get("wl_acc") in (-1, 8)


def load_runs(root):
    """Every results.json under root: (path, results) of those that are a
    run's record, sorted, and (path, why not) of the others."""
    runs, unreadable = [], []
    for directory, _, files in os.walk(root):
        if "results.json" in files:
            path = os.path.join(directory, "results.json")
            try:
                with open(path) as handle:
                    results = json.load(handle)
            except (OSError, ValueError) as error:
                unreadable.append((path, f"cannot be read: {error}"))
                continue
            if not isinstance(results, dict) or not isinstance(results.get("config"), dict):
                unreadable.append((path, "is not a run's record (no config)"))
            else:
                runs.append((path, results))
    return sorted(runs, key=lambda item: item[0]), sorted(unreadable)


def group(runs):
    """Finished runs by (dataset, model, recipe, format), one per seed; and
    notes on the runs left out (unfinished, diverged, repeated seeds)."""
    finished, left_out = defaultdict(dict), defaultdict(list)
    for path, results in runs:
        config = results["config"]
        key = (config["dataset"], config["model"], recipe(config), number_format(config))
        status = results.get("status")
        done = f"{len(results.get('epochs', []))} of {config.get('epochs')} epochs"
        if status != "finished":
            left_out[(status if status == "diverged" else "not finished", key)].append(f"{path} ({status}, {done})")
        elif config.get("seed") in finished[key]:
            left_out[("a repeated seed", key)].append(f"{path} (seed {config.get('seed')})")
        else:
            finished[key][config.get("seed")] = results
    return {key: list(by_seed.values()) for key, by_seed in finished.items()}, left_out


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


def table(finished, left_out):
    """The markdown table: one row per dataset, model, recipe and
    low-precision format; the full-precision runs of the same recipe fill
    the FP columns of its rows. The paper's figures stand beside 8-bit rows
    (and beside FP cells)."""
    full = {key[:3]: results for key, results in finished.items() if key[3] == "FP"}
    low = defaultdict(list)
    for key in finished:
        if key[3] != "FP":
            low[key[:3]].append(key[3])
    lines = ["| Dataset | Model | Recipe | Low precision | " + " | ".join(COLUMNS) + " |",
             "|---" * (4 + len(COLUMNS)) + "|"]
    for base in sorted(set(full) | set(low), key=str):
        dataset, model, recipe_items = base
        paper = PAPER.get((dataset, model), {})
        for fmt in sorted(low.get(base, [])) or ["–"]:
            lp = finished.get((*base, fmt), [])
            eight = bool(lp) and is_eight_bit(lp[0]["config"])
            measured = {
                "SGD-FP": summarise([r["sgd_error"] for r in full.get(base, [])]),
                "SWA-FP": summarise([r["swa_error"] for r in full.get(base, [])]),
                "SGD-LP": summarise([r["sgd_error"] for r in lp]),
                "SWALP": summarise([r["swa_error"] for r in lp]),
            }
            cells = [cell(measured[column], paper.get(column) if column.endswith("FP") or eight else None)
                     for column in COLUMNS]
            lines.append(f"| {dataset} | {model} | {describe(recipe_items)} | {fmt} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Test error %, mean ± sample std over seeds (number of finished seeds); "
                 "[paper mean ± std, 3 seeds].")
    for (reason, (dataset, model, recipe_items, fmt)), which in sorted(left_out.items(), key=str):
        lines.append(f"Left out, {reason}: {len(which)} run(s) of {dataset} {model} {fmt} ({describe(recipe_items)}): "
                     + "; ".join(which))
    return "\n".join(lines)


def curve_groups(finished):
    """{(dataset, model): {label: results}} for the plots."""
    groups = defaultdict(dict)
    for (dataset, model, recipe_items, fmt), results in finished.items():
        groups[(dataset, model)][f"{fmt}, {describe(recipe_items)}"] = results
    return groups


def curves(results_list, key):
    """Mean test error per epoch over runs (NaN where no run evaluated)."""
    by_epoch = defaultdict(list)
    for results in results_list:
        for record in results["epochs"]:
            if record.get(f"{key}_accuracy") is not None:
                by_epoch[record["epoch"]].append(100.0 - record[f"{key}_accuracy"])
    epochs = sorted(by_epoch)
    return epochs, [statistics.fmean(by_epoch[epoch]) for epoch in epochs]


def error_limits(values):
    """The y range of a test-error plot: the curves with a margin, within 0..100 %."""
    low, high = min(values), max(values)
    margin = max(0.05 * (high - low), 0.5)
    return max(low - margin, 0.0), min(high + margin, 100.0)


def error_figure(by_label, title, plt):
    """Test error against epoch, one colour per format and recipe. The SWA
    curve is wide and translucent, the SGD curve a thin dashed line drawn
    over it, so where the two meet both stay visible."""
    figure, axes = plt.subplots(figsize=(8, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    drawn = []
    for index, (label, results) in enumerate(sorted(by_label.items())):
        color = colors[index % len(colors)]
        for key, name, style in (("swa_test", "SWA", dict(linestyle="-", linewidth=3, alpha=0.45, zorder=2)),
                                 ("test", "SGD", dict(linestyle="--", linewidth=1.2, alpha=1.0, zorder=3))):
            epochs, errors = curves(results, key)
            if epochs:
                axes.plot(epochs, errors, color=color, label=f"{name} {label} ({len(results)} seeds)", **style)
                drawn += errors
    if drawn:
        axes.set_ylim(*error_limits(drawn))
    axes.set_xlabel("epoch")
    axes.set_ylabel("test error %")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    return figure


def plot(finished, directory):
    """One PNG per dataset and model; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(directory, exist_ok=True)
    paths = []
    for (dataset, model), by_label in sorted(curve_groups(finished).items()):
        drawn = error_figure(by_label, f"{dataset} {model}", plt)
        path = os.path.join(directory, f"{dataset}-{model}.png")
        drawn.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(drawn)
        paths.append(path)
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="directory searched for results.json files")
    parser.add_argument("--plots", metavar="DIR", help="write test-error curves as PNGs into DIR")
    args = parser.parse_args(argv)
    runs, unreadable = load_runs(args.root)
    if not runs and not unreadable:
        print(f"error: no results.json under {args.root}; run reproduce/run.py first", file=sys.stderr)
        sys.exit(2)
    finished, left_out = group(runs)
    print(table(finished, left_out))
    for path, reason in unreadable:
        print(f"Left out, unreadable: {path} {reason}.")
    if args.plots:
        for path in plot(finished, args.plots):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
