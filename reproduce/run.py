"""Run the paper's experiments: full precision and 8 bits, for N seeds.

One full-precision run gives SGD-FP and SWA-FP, one 8-bit run SGD-LP and
SWALP; `--formats` adds a low-precision run per number format (train.py's
--format: every number kind, accumulator included, in that format). The
8-bit setting is the paper's table setting (`lp8`): every number in 8 bits
including the gradient accumulator, with `--small-block FC`; it differs from
`example.sh`, the seed's example command, which has no accumulator and
blocks every tensor along dimension 0. Each (dataset, model, precision,
seed) gets its own run directory
`<out>/<dataset>-<model>-<precision>/seed<seed>`; finished runs are skipped
and interrupted ones continue from their newest checkpoint (`--resume auto`),
so the same command can be repeated until everything is done. With `--gpus`
runs go side by side, one per GPU (CUDA_VISIBLE_DEVICES). Paths are taken
relative to the folder the runner is started from, whichever it is.

    python reproduce/run.py --data_path ./data --seeds 1 2 3 [--formats e4m3 mxfp8 ...] [--gpus 0,1,2,3]
        [--dry-run] [-- extra train.py flags]

Then `python reproduce/report.py <out>` prints the table.
"""

import argparse
import fcntl
import glob
import json
import os
import queue
import shlex
import subprocess
import sys
import threading
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train.py")

from swalp.quant import specs

# The paper's hyper-parameters, from the reference scripts (VGG: the seed's
# example.sh and the original's block_vgg_swa.sh; PreResNet164: the original's
# block_resnet_swa.sh).
HYPERPARAMETERS = {
    "VGG16": {"epochs": 300, "lr_init": 0.05, "swa_start": 200, "swa_lr": 0.01, "wd": 5e-4},
    "PreResNet164": {"epochs": 225, "lr_init": 0.1, "swa_start": 150, "swa_lr": 0.01, "wd": 3e-4},
}
# "All numbers quantized down to 8 bits, including the gradient accumulators",
# with the original's layout: biases share one exponent per tensor.
PRECISIONS = {
    "fp": [],
    "lp8": ["--wl-weight", "8", "--wl-activate", "8", "--wl-grad", "8", "--wl-error", "8", "--wl-momentum", "8",
            "--wl-acc", "8", "--rounding", "stochastic", "--small-block", "FC", "--block-dim", "B"],
}


def format_precision(spec):
    """The name and train.py flags of a run in one number format everywhere,
    with lp8's rounding and layout (the layout matters for bfp<wl> only)."""
    return specs.path_tag(spec), ["--format", spec, "--rounding", "stochastic", "--small-block", "FC",
                                    "--block-dim", "B"]


@dataclass
class Job:
    name: str
    run_dir: str
    dataset: str
    command: list = field(default_factory=list)

    def status(self):
        """finished, diverged, running (results.json of an unfinished run),
        partial (other outputs) or new."""
        try:
            with open(os.path.join(self.run_dir, "results.json")) as handle:
                results = json.load(handle)
            return results.get("status", "partial") if isinstance(results, dict) else "partial"
        except FileNotFoundError:
            # Lock files say nothing of progress (train.py's stays after a kill -9).
            outputs = [name for name in os.listdir(self.run_dir) if name not in (".runner.lock", ".train.lock")] \
                if os.path.isdir(self.run_dir) else []
            return "partial" if outputs else "new"
        except (OSError, ValueError):
            return "partial"


def make_jobs(args):
    jobs = []
    precisions = [(name, PRECISIONS[name]) for name in args.precisions] + [format_precision(spec)
                                                                            for spec in args.formats]
    for dataset in args.datasets:
        for model in args.models:
            hyper = HYPERPARAMETERS[model]
            for precision, precision_flags in precisions:
                for seed in args.seeds:
                    name = f"{dataset}-{model}-{precision}"
                    run_dir = os.path.join(args.out, name, f"seed{seed}")
                    command = [sys.executable, TRAIN, "--dataset", dataset, "--data_path", args.data_path,
                               "--model", model, "--seed", str(seed), "--dir", run_dir, "--resume", "auto"]
                    for key, value in hyper.items():
                        command += [f"--{key}", str(value)]
                    if args.keep_checkpoints:
                        command += ["--keep_checkpoints", str(args.keep_checkpoints)]
                    command += precision_flags + args.extra
                    jobs.append(Job(f"{name} seed {seed}", run_dir, dataset, command))
    return jobs


def launch(job, gpu):
    """Run one job to its end, its output appended to <run_dir>/train.log;
    returns its exit code, None when another runner holds the run, or
    "busy (process N on HOST)" when a train.py still runs in it (one whose
    runner was killed). A run that stopped before its first checkpoint has
    nothing to resume and starts afresh."""
    os.makedirs(job.run_dir, exist_ok=True)
    with open(os.path.join(job.run_dir, ".runner.lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None
        owner = training_owner(job.run_dir)
        if owner:
            return f"busy ({owner})"
        return _run_locked(job, gpu)


def training_owner(run_dir):
    """Who holds train.py's lock on run_dir (its lock file names the process), or None."""
    path = os.path.join(run_dir, ".train.lock")
    try:
        handle = open(path)
    except FileNotFoundError:
        return None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return handle.read().strip() or "another process"
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None


def _run_locked(job, gpu):
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    command = list(job.command)
    if not glob.glob(os.path.join(glob.escape(job.run_dir), "checkpoint-*.pt")):
        at = command.index("--resume")
        command[at:at + 2] = ["--overwrite"]
    with open(os.path.join(job.run_dir, "train.log"), "a") as log:
        return subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT).returncode


def download_data(datasets, data_path):
    """Read (and if needed download) each data set once, before runs start
    side by side and would otherwise all download into the same folder;
    returns an error message, or None."""
    from swalp.data.datasets import load_data  # torch loads only when the runs are real, not for --dry-run
    from swalp.errors import UserError

    for dataset in datasets:
        try:
            load_data(dataset, data_path)
        except UserError as error:
            return str(error)
    return None


def run_jobs(jobs, gpus, start=launch, report=print):
    """Run `jobs`, one at a time per entry of `gpus` (None: one at a time
    on whatever train.py picks); returns the jobs that failed."""
    slots = queue.Queue()
    for gpu in gpus or [None]:
        slots.put(gpu)
    failed, lock, threads = [], threading.Lock(), []

    def work(job, gpu):
        try:
            code = start(job, gpu)
            outcome = code if isinstance(code, str) else {0: "done", None: "skip (running elsewhere)"}.get(
                code, f"FAILED (exit {code})")
        except Exception as error:  # a run that cannot even start is a failed run
            code, outcome = 1, f"FAILED ({type(error).__name__}: {error})"
        finally:
            slots.put(gpu)
        with lock:
            where = "" if gpu is None else f" (GPU {gpu})"
            report(f"{outcome}: {job.name}{where}")
            if isinstance(code, int) and code != 0:
                failed.append(job)

    for job in jobs:
        gpu = slots.get()
        with lock:
            report(f"start: {job.name}" + ("" if gpu is None else f" on GPU {gpu}"))
        thread = threading.Thread(target=work, args=(job, gpu))
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    return failed


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        extra = argv[argv.index("--") + 1:]
        argv = argv[:argv.index("--")]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Flags after -- go to every train.py command (and override its own).")
    parser.add_argument("--data_path", required=True, help="passed to train.py (as an absolute path)")
    parser.add_argument("--out", default=os.path.join("runs", "paper"),
                        help="root of the run directories (default: runs/paper under the current folder)")
    parser.add_argument("--datasets", nargs="+", default=["CIFAR10", "CIFAR100"], choices=["CIFAR10", "CIFAR100"])
    parser.add_argument("--models", nargs="+", default=["VGG16"], choices=sorted(HYPERPARAMETERS))
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    parser.add_argument("--formats", nargs="+", default=[], type=specs.argument, metavar="SPEC",
                        help=f"also run in each of these number formats everywhere ({specs.GRAMMAR}), "
                             f"e.g. e4m3 mxfp8 mxint8")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--gpus", default="", help="comma-separated GPU ids to run on side by side, e.g. 0,1,2,3")
    parser.add_argument("--keep-checkpoints", type=int, default=2, metavar="N",
                        help="passed to train.py as --keep_checkpoints N: keep the newest N epoch checkpoints "
                             "and the one at swa_start; 0 keeps all (default: 2)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and what would be skipped")
    args = parser.parse_args(argv)
    if args.keep_checkpoints < 0:
        parser.error(f"--keep-checkpoints {args.keep_checkpoints} must be 0 (keep all) or more")
    # train.py runs in the runner's folder, but what is finished, train.log
    # and the lock are decided in the run directories themselves: one
    # absolute path for both, whatever folder the runner was started from.
    args.out, args.data_path = os.path.abspath(args.out), os.path.abspath(args.data_path)
    args.extra = extra
    args.gpus = [gpu.strip() for gpu in args.gpus.split(",") if gpu.strip()]
    return args


def main(argv=None):
    args = parse_args(argv)
    jobs = make_jobs(args)
    todo = []
    for job in jobs:
        status = job.status()
        if status in ("finished", "diverged"):
            print(f"skip ({status}): {job.name}")
        else:
            todo.append(job)
            if args.dry_run:
                print(f"{'run' if status == 'new' else 'continue'}: {shlex.join(job.command)}")
    if args.dry_run or not todo:
        print(f"{len(todo)} of {len(jobs)} runs to do")
        return
    error = download_data(sorted({job.dataset for job in todo}), args.data_path)
    if error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    failed = run_jobs(todo, args.gpus)
    print(f"{len(todo) - len(failed)} of {len(todo)} runs done (or running in another runner); "
          f"logs in <run dir>/train.log")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
