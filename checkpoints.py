"""Checkpoint files: names, atomic saves that fail cleanly, pruning, and
loading that refuses damaged content.

Every checkpoint carries a checksum (CRC-32) of its content (each tensor's
bytes and every plain value), computed when it is saved and verified when
it is loaded, so that bytes changed on disk are caught even where the file
still unpickles. A checkpoint is also refused when its weights, SWA weights,
momenta or accumulators hold NaN or inf, and (`check_structure`) when a
field does not have the type or shape this run needs.
"""

import math
import os
import pickle
import random
import re
import zlib

import numpy as np
import torch

from utils import UserError, WriteFailed, first_line, remove_quietly

CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)(?:-step(\d+))?\.pt")
# What train.py writes; "checksum" seals the rest.
CHECKPOINT_KEYS = {"epoch", "step", "config", "model_state", "swa_state", "optimizer_state", "weight_acc",
                   "noise_step", "rng", "loader_generator", "history", "epoch_totals", "world_size", "checksum"}
# The parts that are numbers of the network; NaN or inf there is never a state a run can continue from.
NUMERIC_PARTS = ("model_state", "swa_state", "optimizer_state", "weight_acc")


class Rejected(Exception):
    """A checkpoint that must not be used; the message says why."""


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


# ---------------------------------------------------------------- loading

def _read(path):
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError:
        raise Rejected("cannot be read: permission denied") from None
    except pickle.UnpicklingError as error:
        if "weights_only" in str(error) or "Unsupported global" in str(error):
            raise Rejected("holds pickled objects other than tensors and plain values; refusing to load it "
                           "(it was not written by this train.py)") from None
        raise Rejected(f"is corrupt ({first_line(error)})") from None
    except Exception as error:
        raise Rejected(f"is truncated or corrupt ({first_line(error)})") from None
    missing = CHECKPOINT_KEYS - set(checkpoint) if isinstance(checkpoint, dict) else CHECKPOINT_KEYS
    if missing:
        raise Rejected(f"lacks {', '.join(sorted(missing))}; it was not written by this train.py")
    return checkpoint


def _first_non_finite(value, key):
    """The key of the first floating-point tensor in `value` holding NaN or inf."""
    if isinstance(value, torch.Tensor):
        # A sum is non-finite when any element is (or it overflows, hence the
        # exact check after it); much faster than isfinite(...).all() on the CPU.
        finite = not value.is_floating_point() or bool(torch.isfinite(value.sum())) \
            or bool(torch.isfinite(value).all())
        return None if finite else key
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) \
        else ()
    for name, item in items:
        found = _first_non_finite(item, f"{key}[{name!r}]")
        if found:
            return found
    return None


def read_verified(path):
    """The checkpoint at `path`, its checksum and numbers checked; raises Rejected."""
    checkpoint = _read(path)
    if checkpoint["checksum"] != content_checksum({k: v for k, v in checkpoint.items() if k != "checksum"}):
        raise Rejected("is corrupt: its content does not match its checksum")
    for part in NUMERIC_PARTS:
        found = _first_non_finite(checkpoint[part], part)
        if found:
            raise Rejected(f"is corrupt: {found} holds NaN or inf")
    return checkpoint


def newest_good_checkpoint(directory, besides=None):
    """The newest checkpoint in `directory` (other than `besides`) that loads
    and verifies, or None."""
    for _, _, path in reversed(list_checkpoints(directory)):
        if besides is not None and os.path.abspath(path) == os.path.abspath(besides):
            continue
        try:
            read_verified(path)
        except Rejected:
            continue
        return path
    return None


def load_checkpoint(path):
    """A checkpoint's dict, loaded with weights_only=True and verified; a
    damaged one is a UserError naming the newest good one to resume from."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist; pass a checkpoint-<epoch>.pt file or auto to --resume")
    try:
        return read_verified(path)
    except Rejected as rejected:
        other = newest_good_checkpoint(os.path.dirname(path) or ".", besides=path)
        advice = f"resume from {other}" if other else "resume from another checkpoint"
        raise UserError(f"checkpoint {path} {rejected}; {advice}") from None


# ---------------------------------------------------------------- structure

def _shape(value):
    return list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__


def _check_tensor_dict(found, reference, key):
    if not isinstance(found, dict):
        raise Rejected(f"{key} must be a dict of tensors, found {type(found).__name__}")
    for name, tensor in reference.items():
        if name not in found:
            raise Rejected(f"{key} lacks {name!r}, which this model has")
        if not isinstance(found[name], torch.Tensor) or found[name].shape != tensor.shape:
            raise Rejected(f"{key}[{name!r}] must be a tensor of shape {list(tensor.shape)}, "
                           f"found {_shape(found[name])}")
    extra = [name for name in found if name not in reference]
    if extra:
        raise Rejected(f"{key} has {extra[0]!r}, which this model does not")


def _check_count(checkpoint, key, minimum):
    value = checkpoint[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise Rejected(f"{key} must be an integer of at least {minimum}, found {value!r}")


def _check_rng(state, key):
    """Each generator state, tried on a throwaway generator of its kind."""
    if not isinstance(state, dict) or not {"python", "numpy", "torch", "cuda"} <= set(state):
        raise Rejected(f"{key} must be a dict with python, numpy, torch and cuda generator states")
    try:
        version, internal, gauss = state["python"]
        random.Random().setstate((version, tuple(internal), gauss))
    except (TypeError, ValueError, OverflowError) as error:
        raise Rejected(f"{key}['python'] is not a Python generator state ({first_line(error)})") from None
    try:
        kind, keys, position, has_gauss, cached = state["numpy"]
        np.random.RandomState().set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    except (TypeError, ValueError, AttributeError) as error:
        raise Rejected(f"{key}['numpy'] is not a NumPy generator state ({first_line(error)})") from None
    expected = torch.get_rng_state()
    found = state["torch"]
    if not isinstance(found, torch.Tensor) or found.dtype != torch.uint8 or found.shape != expected.shape:
        raise Rejected(f"{key}['torch'] must be a uint8 tensor of shape {list(expected.shape)}, found {_shape(found)}")
    cuda = state["cuda"]
    if not isinstance(cuda, (list, tuple)) or not all(
            isinstance(found, torch.Tensor) and found.dtype == torch.uint8 for found in cuda):
        raise Rejected(f"{key}['cuda'] must be a list of uint8 tensors (one per device)")


def check_structure(checkpoint, model_state, swa_state, parameter_shapes, accumulators, epoch_totals):
    """Raise Rejected naming the first field of `checkpoint` that does not
    have the type or shape this run needs: its model's and SWA model's
    state dicts, its parameters' shapes (momenta), whether it keeps
    accumulators, and the keys of its epoch totals."""
    for key, minimum in (("epoch", 0), ("step", 0), ("noise_step", 0), ("world_size", 1)):
        _check_count(checkpoint, key, minimum)
    for key, kind in (("history", list), ("epoch_totals", dict), ("rng", list),
                      ("weight_acc", list), ("optimizer_state", dict)):
        if not isinstance(checkpoint[key], kind):
            raise Rejected(f"{key} must be a {kind.__name__}, found {type(checkpoint[key]).__name__}")
    _check_tensor_dict(checkpoint["model_state"], model_state, "model_state")
    _check_tensor_dict(checkpoint["swa_state"], swa_state, "swa_state")

    optimizer = checkpoint["optimizer_state"]
    if not isinstance(optimizer.get("state"), dict) or not isinstance(optimizer.get("param_groups"), list):
        raise Rejected("optimizer_state must hold a 'state' dict and a 'param_groups' list")
    for index, state in optimizer["state"].items():
        if not isinstance(index, int) or not 0 <= index < len(parameter_shapes) or not isinstance(state, dict):
            raise Rejected(f"optimizer_state['state'] has entry {index!r}; this model has parameters "
                           f"0..{len(parameter_shapes) - 1}")
        buffer = state.get("momentum_buffer")
        if buffer is not None and (not isinstance(buffer, torch.Tensor) or buffer.shape != parameter_shapes[index]):
            raise Rejected(f"optimizer_state['state'][{index}]['momentum_buffer'] must be a tensor of shape "
                           f"{list(parameter_shapes[index])}, found {_shape(buffer)}")
    if len(checkpoint["weight_acc"]) != len(accumulators):
        raise Rejected(f"weight_acc must hold {len(accumulators)} accumulators, found {len(checkpoint['weight_acc'])}")
    for index, (found, expected) in enumerate(zip(checkpoint["weight_acc"], accumulators)):
        if not isinstance(found, torch.Tensor) or found.shape != expected.shape:
            raise Rejected(f"weight_acc[{index}] must be a tensor of shape {list(expected.shape)}, "
                           f"found {_shape(found)}")

    if not checkpoint["rng"]:
        raise Rejected("rng must hold at least one process's generator states")
    for rank, state in enumerate(checkpoint["rng"]):
        _check_rng(state, f"rng[{rank}]")
    generator = checkpoint["loader_generator"]
    expected = torch.Generator().get_state()
    if not isinstance(generator, torch.Tensor) or generator.dtype != torch.uint8 or generator.shape != expected.shape:
        raise Rejected(f"loader_generator must be a uint8 tensor of shape {list(expected.shape)}, "
                       f"found {_shape(generator)}")

    totals = checkpoint["epoch_totals"]
    for name, value in epoch_totals.items():
        found = totals.get(name)
        if isinstance(value, list):
            if not isinstance(found, list) or not all(isinstance(step, int) for step in found):
                raise Rejected(f"epoch_totals[{name!r}] must be a list of step numbers, found {found!r}")
        elif not isinstance(found, (int, float)) or isinstance(found, bool) or not math.isfinite(found):
            raise Rejected(f"epoch_totals[{name!r}] must be a finite number, found {found!r}")
    for index, record in enumerate(checkpoint["history"]):
        if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
            raise Rejected(f"history[{index}] must be an epoch record (a dict with its epoch), found {record!r}")
