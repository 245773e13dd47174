"""SWALP on a vision transformer: SGD and AdamW, full precision and 8 bits, on the digits.

For each seed, trains `train.py --dataset digits --model ViT` with SGD and
with AdamW, in full precision and with every kind (the accumulator included,
AdamW's second moment excepted, as its own default) in each 8-bit format,
stochastic rounding, `--small-block FC`, batches of 32 (42 steps per epoch
on the digits); the SWALP schedule and the SWA average as for the CNNs.
Prints test error, mean ± sample standard deviation over the seeds, of the
optimizer's final model of its decaying schedule (the "SGD" column of the
paper: SGD-LP, AdamW-LP) and of the SWA model, with the mean epoch time.
Finished runs are read, not run again; `--report` prints the table of the
runs finished so far.

    python -m experiments.vit_digits [--seeds 1 2 3] [--formats bfp8 mxfp8] [--epochs 20] [--out DIR]
        [--report] [-- train.py flags]

On a GPU, CIFAR10 is the real test (digits has 1,347 training images):

    python -m experiments.vit_digits --dataset CIFAR10 --data_path ./data --epochs 200 --out runs/vit-cifar10 \
        -- --batch_size 128
"""

import statistics

import tabulate

from experiments.digits_runs import each_run, parse, runner_parser, spread, write_summary

OPTIMIZERS = {
    "SGD": ["--optimizer", "sgd", "--lr_init", "0.05", "--swa_lr", "0.01", "--wd", "5e-4"],
    # 1e-3, usual for small ViTs, sat at chance for the first epochs under the digits' crops and flips.
    "AdamW": ["--optimizer", "adamw", "--lr_init", "0.0003", "--swa_lr", "0.0001", "--wd", "0.05"],
}


def runs(formats):
    """(optimizer, format label, run name, train.py flags) of every configuration."""
    for spec in ("fp32", *formats):
        precision = [] if spec == "fp32" else ["--format", spec, "--rounding", "stochastic", "--small-block", "FC"]
        for optimizer, flags in OPTIMIZERS.items():
            yield optimizer, spec, f"{optimizer.lower()}-{spec}", [*flags, *precision]


def configurations(dataset, epochs, formats, extra=()):
    """(run name, train.py flags, optimizer, format label) of every configuration."""
    schedule = ["--epochs", str(epochs), "--swa_start", str(round(0.6 * epochs)), "--eval_freq", str(epochs)]
    base = ["--dataset", dataset, "--model", "ViT", "--loader", "batched", "--batch_size", "32", *schedule]
    return [(name, [*base, *flags, *extra], optimizer, spec) for optimizer, spec, name, flags in runs(formats)]


def table(summary):
    rows = {}
    for entry in summary:
        row = rows.setdefault((entry["optimizer"], entry["format"]), {"final": [], "swa": [], "epoch": []})
        row["final"].append(entry["sgd_error"])
        row["swa"].append(entry["swa_error"])
        row["epoch"].append(entry["epoch_seconds"])
    seeds = len({entry["seed"] for entry in summary})
    body = [[optimizer, spec, spread(row["final"]), spread(row["swa"]), f"{statistics.fmean(row['epoch']):.0f}"]
            for (optimizer, spec), row in rows.items()]
    return tabulate.tabulate(body, ["optimizer", "format", f"final model, {seeds} seeds", "SWA model",
                                    "s per epoch"], tablefmt="github", missingval="-", disable_numparse=True)


def main(argv=None):
    parser = runner_parser(__doc__, "vit_digits")
    parser.add_argument("--formats", nargs="+", default=["bfp8", "mxfp8"], help="8-bit format specs")
    parser.add_argument("--dataset", default="digits", help="train.py's --dataset")
    parser.add_argument("--epochs", type=int, default=20, help="epochs per run; averaging from 60%% of them on")
    args, extra = parse(parser, argv)
    summary = []
    for seed, (name, _, optimizer, spec), results in each_run(
            args.out, args.seeds, configurations(args.dataset, args.epochs, args.formats, extra), args.report):
        epoch_seconds = statistics.fmean(record["train_time"] for record in results["epochs"])
        summary.append({"optimizer": optimizer, "format": spec, "seed": seed, "epoch_seconds": epoch_seconds,
                        "sgd_error": results["sgd_error"], "swa_error": results["swa_error"]})
        if not args.report:
            print(f"{name} seed {seed}: final {results['sgd_error']:.2f} %, SWA {results['swa_error']:.2f} % "
                  f"({epoch_seconds:.0f} s per epoch)", flush=True)
    return write_summary(args.out, summary, table)


if __name__ == "__main__":
    main()
