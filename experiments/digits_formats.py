"""Does averaging cancel rounding noise at 4 bits? SWALP and EMA on the digits, per format.

For each seed, trains `train.py --dataset digits` (PreResNet20, its digits
defaults, the batched loader) in full precision (SGD-FP, SWA-FP) and, for
each format (every kind, the accumulator included, stochastic rounding,
`--small-block FC`), twice: averaged by SWA (SGD-LP, SWALP) and by an
exponential moving average (EMA-LP); each format with every layer in it and
with the first and last layer in full precision (`--layer-format first:fp32
--layer-format last:fp32`). Then prints test errors as mean ± sample
standard deviation over the seeds. Runs already done (their results.json
finished) are read, not run again, so the command can be repeated;
`--report` prints the table of the runs finished so far.

    python -m experiments.digits_formats [--seeds 1 2 3] [--formats bfp8 mxfp8 mxfp4 nvfp4] [--out DIR]
        [--report] [-- train.py flags]
"""

import tabulate

from experiments.digits_runs import each_run, parse, runner_parser, spread, write_summary

EDGES_FP32 = ["--layer-format", "first:fp32", "--layer-format", "last:fp32"]
COLUMNS = ("SGD", "SWA", "EMA")


def runs(formats, ema_decay):
    """(row label, run name, train.py flags) of every configuration."""
    yield "full precision", "fp", []
    for spec in formats:
        for layout, extra in (("every layer", []), ("first, last fp32", EDGES_FP32)):
            flags = ["--format", spec, "--rounding", "stochastic", "--small-block", "FC", *extra]
            tag = f"{spec}{'-edges' if extra else ''}"
            yield f"{spec}, {layout}", f"{tag}-swa", flags
            yield f"{spec}, {layout}", f"{tag}-ema", [*flags, "--average", "ema", "--ema_decay", str(ema_decay)]


def table(summary):
    """Rows per format and layout: SGD, SWA (the swa runs) and EMA (the ema
    runs' averaged model), mean ± std over seeds. (Seconds per run are in
    summary.json; the runs of one command share the machine with whatever
    else runs, so they are no benchmark.)"""
    rows = {}
    for entry in summary:
        row = rows.setdefault(entry["row"], {column: [] for column in COLUMNS})
        if entry["name"].endswith("-ema"):
            row["EMA"].append(entry["swa_error"])
        else:
            row["SGD"].append(entry["sgd_error"])
            row["SWA"].append(entry["swa_error"])
    body = [[label, *(spread(row[column]) for column in COLUMNS)] for label, row in rows.items()]
    seeds = len({entry["seed"] for entry in summary})
    return tabulate.tabulate(body, [f"test error %, {seeds} seeds", "SGD", "SWA", "EMA"],
                             tablefmt="github", missingval="-", disable_numparse=True)


def main(argv=None):
    parser = runner_parser(__doc__, "digits_formats")
    parser.add_argument("--formats", nargs="+", default=["bfp8", "mxfp8", "mxfp4", "nvfp4"], help="format specs")
    parser.add_argument("--ema_decay", type=float, default=0.99,
                        help="the EMA runs' --ema_decay (two epochs of 42 steps average)")
    args, extra = parse(parser, argv)
    base = ["--dataset", "digits", "--model", "PreResNet20", "--loader", "batched", "--eval_freq", "6"]
    configurations = [(name, [*base, *flags, *extra], label) for label, name, flags in runs(args.formats,
                                                                                              args.ema_decay)]
    summary = []
    for seed, (name, _, label), results in each_run(args.out, args.seeds, configurations, args.report):
        seconds = results.get("seconds")
        summary.append({"row": label, "name": name, "seed": seed, "seconds": seconds,
                        "sgd_error": results["sgd_error"], "swa_error": results["swa_error"]})
        if not args.report:
            print(f"{name} seed {seed}: SGD {results['sgd_error']:.2f} %, averaged {results['swa_error']:.2f} % "
                  f"({seconds:.0f} s)", flush=True)
    return write_summary(args.out, summary, table)


if __name__ == "__main__":
    main()
