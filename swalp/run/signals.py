"""Stopping a run cleanly: SIGTERM and SIGINT become a request to save at
the next step boundary, and the run ends with the command that resumes it."""

import shlex
import signal
import sys


class Stopped(Exception):
    """A stop request that came while the training loop waited for its next
    batch: the run stands at a step boundary."""


class StopRequest:
    """Turns SIGTERM and SIGINT into a request to save and stop at the next
    step boundary instead of dying mid-write (a context manager; true once a
    signal came)."""

    def __init__(self):
        self.signal = None
        self._previous = {}
        self._waiting = False

    def __enter__(self):
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame):
        self.signal = signum
        if self._waiting:
            raise Stopped

    def waiting(self, batches):
        """The items of `batches`; a signal while the next one is awaited
        (loader workers starting, a slow disk) raises Stopped at once instead
        of after the next step. Only for a single process: data-parallel
        ranks must stop at the same step."""
        self._waiting = True
        try:
            if self.signal is not None:
                raise Stopped
            iterator = iter(batches)
            while True:
                try:
                    item = next(iterator)
                except StopIteration:
                    return
                self._waiting = False
                yield item
                self._waiting = True
        finally:
            self._waiting = False

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
