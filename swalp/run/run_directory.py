"""A run directory's life: choosing it, owning it for the whole run, telling
which of its files an earlier run left, and leaving no trace when a run
fails before training.

Ownership is an advisory lock (flock) on a file in the directory, taken
before anything else is written there. The operating system drops it when
the process ends, however it ends, so a killed run never leaves a stale
lock; a second run or a resume of the same directory meanwhile is refused,
naming the process that holds it.
"""

import fcntl
import glob
import os
import socket

from swalp.errors import UserError
from swalp.run.checkpoint_files import list_checkpoints
from swalp.run.distributed import on_rank_zero
from swalp.run.files import remove_quietly

LOCK_NAME = ".train.lock"
PARTIAL_WRITES = ("results.json.tmp", "checkpoint-*.pt.tmp")


def run_files(run_dir, patterns):
    return [path for pattern in patterns for path in glob.glob(os.path.join(glob.escape(run_dir), pattern))]


def previous_outputs(run_dir):
    """What a run left in run_dir: results.json, checkpoints, TensorBoard events."""
    events = ("events.out.tfevents.*", os.path.join("steps", "events.out.tfevents.*"))
    found = run_files(run_dir, ("results.json", *events))
    return found + [path for _, _, path in list_checkpoints(run_dir)]


def missing_folders(path):
    """The folders of `path` that do not exist yet, outermost first."""
    missing = []
    path = os.path.abspath(path)
    while not os.path.exists(path):
        missing.insert(0, path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


class RunLock:
    """An exclusive flock on run_dir/.train.lock, which holds the owner's
    process id and host for the message a second run shows.

    fcntl directly rather than the filelock package: the lock file must
    carry its owner for that message, and is removed on release so that a
    finished run leaves nothing behind, which needs the check in acquire."""

    def __init__(self, run_dir):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK_NAME)
        self.handle = None

    def acquire(self):
        while True:
            handle = open(self.path, "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                owner = handle.read().strip() or "another process"
                handle.close()
                raise UserError(f"{self.run_dir} is in use by a live run ({owner}); wait for it to end or stop "
                                f"it, or choose another --dir") from None
            # The lock file may have been removed by its previous owner between
            # open and flock; a lock on a removed file protects nothing.
            try:
                if os.stat(self.path).st_ino == os.fstat(handle.fileno()).st_ino:
                    break
            except FileNotFoundError:
                pass
            handle.close()
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        self.handle = handle

    def release(self):
        if self.handle is None:
            return
        remove_quietly(self.path)  # the directory may be gone; the lock ends with the handle anyway
        self.handle.close()
        self.handle = None


class RunDirectory:
    """The run directory this process owns: its path, the previous run's
    outputs that --overwrite replaces, the checkpoint to resume from, and
    the folders it created."""

    def __init__(self, path, created, lock):
        self.path, self.created, self.lock = path, created, lock
        self.stale = []
        self.resume = None
        self.training_started = False

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        self.close(failed_early=kind is not None and not self.training_started)

    def close(self, failed_early=False):
        """Release the lock; after a failure before training, also remove the
        folders this run created, where nothing else was put in them."""
        self.lock.release()
        if failed_early:
            for folder in reversed(self.created):
                try:
                    os.rmdir(folder)
                except OSError:
                    break


def claim(args, default_name):
    """Create (if needed) and lock the run directory --dir (default
    runs/<default_name>), and decide what an earlier run left there: a
    directory that already holds a run is used only to resume it (from its
    own checkpoint) or with --overwrite, whose stale outputs are deleted
    once the new run has passed every check before training. Use the
    result as a context manager around the run."""
    run_dir = args.dir or os.path.join("runs", default_name)
    if args.resume not in (None, "auto") and os.path.isdir(args.resume):
        raise UserError(f"--resume {args.resume} is a directory; pass one of its checkpoint files "
                        f"(checkpoint-<epoch>.pt), or --resume auto with --dir {args.resume}")
    directory = RunDirectory(run_dir, missing_folders(run_dir), RunLock(run_dir))
    try:
        try:
            os.makedirs(run_dir, exist_ok=True)
            directory.lock.acquire()
        except OSError as error:
            raise UserError(f"cannot write to run directory {run_dir} ({error.strerror}); "
                            f"choose another --dir") from None
        decide_outputs(directory, args)
    except BaseException:
        directory.close(failed_early=True)
        raise
    return directory


def claim_on_rank_zero(args, default_name, world):
    """The run directory, claimed (locked) by rank 0, which alone touches it:
    (the RunDirectory on rank 0, None elsewhere; its path, the checkpoint to
    resume from, the outputs to replace), the last three decided by rank 0
    and known to every rank."""
    owned = []

    def setup():
        owned.append(claim(args, default_name))
        return owned[0].path, owned[0].resume, owned[0].stale

    run_dir, resume_path, stale_outputs = on_rank_zero(world, setup)
    return (owned[0] if owned else None), run_dir, resume_path, stale_outputs


def decide_outputs(directory, args):
    run_dir = directory.path
    previous = previous_outputs(run_dir)
    holds_run = any(not os.path.basename(path).startswith("events.") for path in previous)
    own_checkpoint = args.resume == "auto" or (
        args.resume and os.path.dirname(os.path.realpath(args.resume)) == os.path.realpath(run_dir))
    if own_checkpoint and args.overwrite:
        raise UserError(f"--overwrite starts afresh and --resume {args.resume} continues the run in {run_dir}; "
                        f"pass only one of them")
    if holds_run and not own_checkpoint and not args.overwrite:
        hint = "resume with one of its own checkpoints" if args.resume else "pass --resume auto to continue it"
        raise UserError(f"{run_dir} already holds a run; {hint}, --overwrite to replace it, or another --dir")
    for path in run_files(run_dir, PARTIAL_WRITES):
        os.remove(path)
    directory.stale = previous if args.overwrite else []
    directory.resume = resolve_resume(args, run_dir) if args.resume else None


def resolve_resume(args, run_dir):
    """The checkpoint to resume from: --resume PATH, or with --resume auto the
    newest in the run directory (None, a fresh start, when it has none)."""
    if args.resume != "auto":
        return args.resume
    found = list_checkpoints(run_dir)
    if found:
        return found[-1][2]
    if os.path.exists(os.path.join(run_dir, "results.json")):
        raise UserError(f"--resume auto: {run_dir} holds results.json but no checkpoint to continue from; "
                        f"pass --overwrite to start afresh or another --dir")
    return None
