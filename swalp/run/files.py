"""Writing a run's outputs so that a crash never leaves a truncated file,
and a failed write says what failed."""

import json
import os

from swalp.errors import first_line


class WriteFailed(Exception):
    """Writing an output failed (disk full, I/O error, its directory gone);
    its partial file was removed."""

    def __init__(self, path, error, size):
        super().__init__(f"cannot write {path} ({error.strerror or first_line(error)})")
        self.path, self.reason, self.size = path, error.strerror or first_line(error), size


def remove_quietly(path):
    """Remove a partial file where it can be; its directory may be gone."""
    try:
        os.remove(path)
    except OSError:
        pass


def write_json_atomic(path, payload):
    """Write JSON next to `path` and rename it over, so a crash never leaves a
    truncated file; a failed write removes its partial file and raises
    WriteFailed."""
    temporary = f"{path}.tmp"
    text = json.dumps(payload, indent=2)
    try:
        with open(temporary, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as error:
        remove_quietly(temporary)
        raise WriteFailed(path, error, len(text)) from None
