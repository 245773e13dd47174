"""results.json: a run's record, rewritten atomically after every epoch, and
what a failed write of any output leaves in it."""

import os

from swalp.errors import UserError
from swalp.run.checkpoint_files import failed_write_message
from swalp.run.files import WriteFailed, write_json_atomic


def write_results(run_dir, record, status, **extra):
    """Write `record(status)` and `extra` to run_dir/results.json; a failed
    write ends the run (see `failure`)."""
    try:
        write_json_atomic(os.path.join(run_dir, "results.json"), {**record(status), **extra})
    except WriteFailed as failed:
        raise failure(run_dir, record, failed) from None


def failure(run_dir, record, failed):
    """The UserError for a failed write, recorded as `record("failed")` with
    the reason in results.json if that still fits."""
    try:
        write_json_atomic(os.path.join(run_dir, "results.json"), {**record("failed"), "failure": str(failed)})
    except WriteFailed:
        pass
    return UserError(failed_write_message(run_dir, failed))
