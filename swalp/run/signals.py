"""Stopping a run cleanly: SIGTERM and SIGINT become a request to save at
the next step boundary, and the run ends with the command that resumes it."""

import shlex
import signal
import sys


class StopRequest:
    """Turns SIGTERM and SIGINT into a request to save and stop at the next
    step boundary instead of dying mid-write (a context manager; true once a
    signal came)."""

    def __init__(self):
        self.signal = None
        self._previous = {}

    def __enter__(self):
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame):
        self.signal = signum

    def __bool__(self):
        return self.signal is not None


def resume_command(path, world):
    """This command line with --resume PATH instead of any --resume (under
    torchrun, with the launcher for as many processes on one machine)."""
    argv, kept, skip = sys.argv[1:], [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--resume":
            skip = True
        elif not arg.startswith("--resume="):
            kept.append(arg)
    launcher = [sys.executable]
    if world.distributed:
        launcher = ["torchrun", f"--nproc_per_node={world.size}"]
    return shlex.join([*launcher, sys.argv[0], *kept, "--resume", path])
