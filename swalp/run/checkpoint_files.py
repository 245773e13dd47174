"""Checkpoint files: names, the content checksum, atomic saves that fail
cleanly, and pruning. What a checkpoint holds and how it is checked on load
is the schema, in `state`."""

import os
import re
import zlib

import torch

from swalp.run.files import WriteFailed, remove_quietly

CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)(?:-step(\d+))?\.pt")


def checkpoint_name(epoch, step=0):
    """checkpoint-<epoch>.pt after `epoch` complete epochs (the references'
    name), checkpoint-<epoch>-step<k>.pt after k more steps."""
    return f"checkpoint-{epoch}.pt" if step == 0 else f"checkpoint-{epoch}-step{step}.pt"


def list_checkpoints(directory):
    """(epoch, step, path) of every checkpoint in `directory`, oldest first."""
    found = []
    for name in os.listdir(directory) if os.path.isdir(directory) else []:
        match = CHECKPOINT_NAME.fullmatch(name)
        if match:
            found.append((int(match[1]), int(match[2] or 0), os.path.join(directory, name)))
    return sorted(found)


# ---------------------------------------------------------------- content checksum

def _crc(value, crc):
    """CRC-32 of `value` continued from `crc`, in a form that survives a save
    and a weights-only load (tuples and lists alike, dict order kept)."""
    if isinstance(value, torch.Tensor):
        crc = zlib.crc32(f"T{value.dtype}{tuple(value.shape)}".encode(), crc)
        return zlib.crc32(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy(), crc)
    if isinstance(value, dict):
        crc = zlib.crc32(f"D{len(value)}".encode(), crc)
        for key, item in value.items():
            crc = _crc(item, _crc(key, crc))
        return crc
    if isinstance(value, (list, tuple)):
        crc = zlib.crc32(f"L{len(value)}".encode(), crc)
        for item in value:
            crc = _crc(item, crc)
        return crc
    return zlib.crc32(f"{type(value).__name__}:{value!r};".encode(), crc)


def content_checksum(state):
    """CRC-32 of every tensor's bytes and every plain value in `state`: made
    to catch accidental damage, and the fastest such checksum at hand (zlib's,
    about twice blake2b's speed here)."""
    return _crc(state, 0)


def seal(state):
    """`state` with the checksum of the rest of its content."""
    content = {key: value for key, value in state.items() if key != "checksum"}
    return {**content, "checksum": content_checksum(content)}


def tensor_bytes(value):
    """The bytes of all tensors in a nested state: about a checkpoint's size."""
    if isinstance(value, torch.Tensor):
        return value.nelement() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(item) for item in value)
    return 0


# ---------------------------------------------------------------- saving

class _RecordingFile:
    """A file handle that remembers the OSError of a failed write: torch.save
    reports it only as a RuntimeError without the reason."""

    def __init__(self, handle):
        self.handle = handle
        self.error = None

    def write(self, data):
        try:
            return self.handle.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self):
        self.handle.flush()


def save_checkpoint(directory, state):
    """Save `state` (with its "epoch" and "step") sealed with its checksum,
    atomically (a synced temporary file, then a rename), then delete the
    mid-epoch checkpoints it supersedes. A failed write (disk full, I/O
    error, the directory gone) removes its partial file and raises
    WriteFailed; earlier checkpoints are untouched."""
    epoch, step = state["epoch"], state["step"]
    path = os.path.join(directory, checkpoint_name(epoch, step))
    temporary = f"{path}.tmp"
    sealed = seal(state)
    recorder = None
    try:
        with open(temporary, "wb") as handle:
            recorder = _RecordingFile(handle)
            torch.save(sealed, recorder)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except (OSError, RuntimeError) as error:
        remove_quietly(temporary)
        cause = recorder.error if recorder is not None and recorder.error is not None else error
        if not isinstance(cause, OSError):
            raise
        raise WriteFailed(path, cause, tensor_bytes(state)) from None
    for old_epoch, old_step, old_path in list_checkpoints(directory):
        if old_step and (old_epoch, old_step) < (epoch, step):
            os.remove(old_path)
    return path


def failed_write_message(directory, failed):
    """One line for a failed write: what failed, the newest checkpoint to
    resume from, and the free space to make (at least the larger of the
    failed write and the newest checkpoint)."""
    if not os.path.isdir(directory):
        return f"{failed}; the run directory {directory} no longer exists: restore it, or start again elsewhere"
    saved = list_checkpoints(directory)
    newest = saved[-1][2] if saved else None
    needed = max(failed.size, os.path.getsize(newest) if newest else 0)
    where = f"free at least {needed / 2 ** 20:.0f} MB in {directory}"
    if newest:
        return f"{failed}; the newest good checkpoint is {newest}: {where} and resume with --resume {newest}"
    return f"{failed}; no checkpoint was written yet: {where} and start again with --overwrite"


def prune_epoch_checkpoints(directory, keep, protected_epoch):
    """Delete epoch checkpoints but the newest `keep` and the one after
    `protected_epoch` epochs (the SGD model when averaging starts)."""
    epochs = [(epoch, path) for epoch, step, path in list_checkpoints(directory) if step == 0]
    for epoch, path in epochs[:-keep]:
        if epoch != protected_epoch:
            os.remove(path)
