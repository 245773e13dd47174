"""What the digits experiments share: train.py runs in this process whose
finished results are read back instead of trained again, and mean ± std."""

import argparse
import contextlib
import json
import os
import statistics
import time

import train


def finished(run_dir):
    """The results.json of a finished run in `run_dir`, else None."""
    path = os.path.join(run_dir, "results.json")
    if not os.path.exists(path):
        return None
    with open(path) as handle:
        results = json.load(handle)
    return results if results.get("status") == "finished" else None


def train_once(run_dir, argv):
    """results.json of `train.py ARGV --dir RUN_DIR` (trained here, its
    output in RUN_DIR/train.log, unless it finished before), with the run's
    wall-clock `seconds` added."""
    results = finished(run_dir)
    if results is not None:
        return results
    os.makedirs(run_dir, exist_ok=True)
    began = time.perf_counter()
    with open(os.path.join(run_dir, "train.log"), "w") as log, contextlib.redirect_stdout(log):
        train.main([*argv, "--dir", run_dir, "--overwrite"])
    results = finished(run_dir)
    results["seconds"] = time.perf_counter() - began
    with open(os.path.join(run_dir, "results.json"), "w") as handle:
        json.dump(results, handle, indent=1)
    return results


def each_run(out, seeds, configurations, report=False):
    """(seed, configuration, results.json) of every seed and configuration
    (a tuple whose first items are its run name and train.py flags): the run
    in OUT/NAME/seed<SEED>, trained unless it finished before; with
    `report`, only those that finished."""
    for seed in seeds:
        for configuration in configurations:
            name, argv = configuration[:2]
            run_dir = os.path.join(out, name, f"seed{seed}")
            if report and finished(run_dir) is None:
                continue
            yield seed, configuration, train_once(run_dir, [*argv, "--seed", str(seed)])


def runner_parser(doc, name):
    """The arguments every runner takes (--seeds, --out, by default
    experiments/results/NAME, --report), described by the first paragraph
    of `doc`; `parse` reads them."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="one run per configuration and seed")
    parser.add_argument("--out", default=os.path.join("experiments", "results", name),
                        help="folder of the run directories and summary.json")
    parser.add_argument("--report", action="store_true", help="print the table of the runs done, train nothing")
    return parser


def parse(parser, argv):
    """(the runner's arguments, the train.py flags after them, `--` dropped)."""
    args, extra = parser.parse_known_args(argv)
    return args, [flag for flag in extra if flag != "--"]


def spread(values):
    """'mean ± sample std' of the values given (one value alone, None for none)."""
    values = [value for value in values if value is not None]
    if len(values) < 2:
        return f"{values[0]:.2f}" if values else None
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"


def write_summary(out, summary, table):
    """Print table(summary) and keep the summary as out/summary.json."""
    print(table(summary))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "summary.json"), "w") as handle:
        json.dump(summary, handle, indent=1)
    return summary
