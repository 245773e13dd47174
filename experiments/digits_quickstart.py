"""Quick start on the CPU: SWALP on scikit-learn's digits, in full precision and in 8 bits.

For each seed, trains `train.py --dataset digits` (its defaults for the
digits) twice: in full precision, which gives SGD-FP and SWA-FP, and in the
paper's 8-bit table setting (every number in 8-bit block floating point,
the gradient accumulator included, `--small-block FC`), which gives SGD-LP
and SWALP. Then prints their test errors side by side, per seed and as the
mean over seeds. Needs no download: the digits ship with scikit-learn.

    python -m experiments.digits_quickstart [--seeds 1 2 3] [--model PreResNet20] [--out DIR] [-- train.py flags]

Each run's own output goes to <out>/<precision>/seed<seed>/train.log, the
table also to <out>/summary.json. Flags after `--` go to every train.py run
(e.g. `-- --epochs 20 --swa_start 15`).
"""

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

import tabulate

import models
import train
from reproduce.run import PRECISIONS  # fp, and the paper's table setting lp8
from swalp.run import arguments

COLUMNS = {("fp", "sgd_error"): "SGD-FP", ("fp", "swa_error"): "SWA-FP",
           ("lp8", "sgd_error"): "SGD-LP", ("lp8", "swa_error"): "SWALP"}


def train_digits(model, precision, seed, run_dir, extra):
    """One train.py run in this process (flags `extra` last), its output in
    run_dir/train.log; returns its results.json and the seconds it took."""
    epochs = arguments.DATASET_DEFAULTS["digits"]["epochs"]
    # The table needs only the evaluations at swa_start and at the end, which
    # train.py always makes.
    argv = ["--dataset", "digits", "--model", model, "--seed", str(seed), "--num_workers", "0",
            "--eval_freq", str(epochs), "--dir", run_dir, "--overwrite", *PRECISIONS[precision], *extra]
    os.makedirs(run_dir, exist_ok=True)
    began = time.perf_counter()
    with open(os.path.join(run_dir, "train.log"), "w") as log, contextlib.redirect_stdout(log):
        train.main(argv)
    with open(os.path.join(run_dir, "results.json")) as handle:
        return json.load(handle), time.perf_counter() - began


def table(errors):
    """Markdown rows: one per seed, then the mean ± sample standard deviation
    over seeds (a seed's row repeats bit for bit only on the same kind of CPU
    and thread count, see docs/reliability.md; the mean and spread are what
    carry over to another machine)."""
    seeds = sorted({seed for _, seed in errors})
    rows = []
    for seed in seeds:
        values = [errors.get((precision, seed), {}).get(key) for precision, key in COLUMNS]
        rows.append([f"seed {seed}"] + [None if value is None else f"{value:.2f}" for value in values])
    if len(seeds) > 1:
        spreads = []
        for precision, key in COLUMNS:
            values = [errors[(precision, seed)][key] for seed in seeds if (precision, seed) in errors]
            spreads.append(f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"
                           if len(values) > 1 else None)
        rows.append([f"mean ± std of {len(seeds)}"] + spreads)
    return tabulate.tabulate(rows, ["test error %", *COLUMNS.values()], tablefmt="github", missingval="-",
                             disable_numparse=True)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1], help="one run per precision and seed")
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS),
                        help="fp: full precision; lp8: the paper's 8-bit setting")
    parser.add_argument("--model", default="PreResNet20",
                        choices=sorted(set(models.MODELS) - set(models.IMAGENET_MODELS)), help="a CIFAR model")
    parser.add_argument("--out", default=os.path.join("experiments", "results", "digits"),
                        help="folder of the run directories and summary.json")
    return parser


def main(argv=None):
    argv, extra = list(sys.argv[1:] if argv is None else argv), []
    if "--" in argv:
        argv, extra = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    args = build_parser().parse_args(argv)
    errors = {}
    for seed in args.seeds:
        for precision in args.precisions:
            results, seconds = train_digits(args.model, precision, seed,
                                            os.path.join(args.out, precision, f"seed{seed}"), extra)
            errors[(precision, seed)] = {key: results[key] for key in ("sgd_error", "swa_error")}
            print(f"{precision} seed {seed}: SGD {results['sgd_error']:.2f} %, SWA {results['swa_error']:.2f} % "
                  f"test error ({seconds:.0f} s)", flush=True)
    print(f"\ndigits, {args.model}, {arguments.DATASET_DEFAULTS['digits']} {' '.join(extra)}".rstrip())
    print(table(errors))
    summary = [{"precision": precision, "seed": seed, **values} for (precision, seed), values in errors.items()]
    with open(os.path.join(args.out, "summary.json"), "w") as handle:
        json.dump(summary, handle, indent=1)
    return errors


if __name__ == "__main__":
    main()
