"""The checkpoint schema: what a checkpoint of a run holds, and every check
made before one is used.

A checkpoint carries the low-precision model, the SWA model and its count,
the optimizer's state (momentum buffers), the accumulators, the rounding
noise's step, every random generator of every rank, the data loader's
generator, the position (epochs, then steps into the next with the partial
sums of that epoch), the metrics so far and the flags. It holds tensors and
plain values only, so it loads with torch.load(weights_only=True).

On load it is refused when its checksum does not match (bytes changed on
disk), when its weights, SWA weights, momenta or accumulators hold NaN or
inf, when a field does not have the type or shape this run needs, or when
it was written with other state-defining flags.
"""

import math
import os
import pickle
import random

import numpy as np
import torch

from swalp.errors import UserError, first_line
from swalp.quant import kinds
from swalp.quant.kinds import NUMBER_KINDS
from swalp.run import arguments, distributed, rng
from swalp.run.checkpoint_files import content_checksum, list_checkpoints

# What a checkpoint holds; "checksum" seals the rest.
CHECKPOINT_KEYS = {"epoch", "step", "config", "model_state", "swa_state", "optimizer_state", "weight_acc",
                   "noise_step", "rng", "loader_generator", "history", "epoch_totals", "world_size", "checksum"}
# The optimizer's state a checkpoint holds per parameter: SGD's momentum, AdamW's moments.
MOMENTS = ("momentum_buffer", "exp_avg", "exp_avg_sq")
# The parts that are numbers of the network; NaN or inf there is never a state a run can continue from.
NUMERIC_PARTS = ("model_state", "swa_state", "optimizer_state", "weight_acc")
# Flags a resumed run must share with its checkpoint: they shape the state or
# the randomness, the data order or the schedule it continues.
STATE_DEFINING = ("dataset", "model", "batch_size", "seed", "lr_init", "momentum", "wd", "swa_start", "swa_lr",
                  "swa_c_epochs", "swa_c_steps", "swa_schedule", "swa_lr_max", "swa_cycle_steps", "rounding",
                  "small_block", "block_dim", "quant_placement", "loader", "tf32", "layer_format", "average",
                  "ema_decay", "ema_start", "optimizer", "beta1", "beta2", "eps", "compile") + tuple(
    f"{flag}_{kind}" for flag in ("wl", "format") for kind in NUMBER_KINDS)


class Rejected(Exception):
    """A checkpoint that must not be used; the message says why."""


def new_epoch_totals():
    """Running sums of the epoch in progress, and the steps after which the
    SWA model collected a model (plain values, saved in checkpoints)."""
    return {"steps": 0, "loss_sum": 0.0, "correct": 0, "seen": 0, "time": 0.0, "collected_at": []}


class TrainingState:
    """What a checkpoint captures of a run, and where the run stands:
    `epoch` complete epochs, then `epoch_totals["steps"]` steps into the
    next, with `history` the records of the epochs done."""

    def __init__(self, args, net, swa_model, optimizer, train_loader, device, world=distributed.World()):
        self.args, self.net, self.swa_model, self.optimizer = args, net, swa_model, optimizer
        self.train_loader, self.device, self.world = train_loader, device, world
        self.epoch = 0
        self.epoch_totals = new_epoch_totals()
        self.history = []

    def accumulators(self):
        """The parameters' accumulators, in parameter order (those that have one)."""
        return [self.optimizer.weight_acc[p] for p in self.net.parameters() if p in self.optimizer.weight_acc]

    def replica_digest(self):
        """A checksum of the bits of everything replicas must share: weights,
        SWA weights, momentum buffers and accumulators."""
        tensors = [*self.net.parameters(), *self.swa_model.parameters(), *self.accumulators(),
                   *(state[key] for state in self.optimizer.optim.state.values() for key in MOMENTS if key in state)]
        return sum(int(t.detach().contiguous().view(torch.int32).to(torch.int64).sum()) for t in tensors)

    def state_dict(self):
        """The whole training state. A collective: every rank must call it.
        The epoch's partial sums are summed over ranks; the random generators
        of every rank are kept, in rank order."""
        optimizer, world = self.optimizer, self.world
        totals = dict(self.epoch_totals)
        loss_sum, correct, seen = distributed.sum_across(
            world, [totals["loss_sum"], totals["correct"], totals["seen"]], self.device)
        totals.update(loss_sum=loss_sum, correct=int(correct), seen=int(seen))
        # Replicas exist only in data-parallel runs; a lone process skips the checksum.
        digests = distributed.gather_objects(world, self.replica_digest()) if world.distributed else []
        if len(set(digests)) > 1:
            raise RuntimeError(f"data-parallel replicas have drifted apart: digests {digests}")
        return dict(
            epoch=self.epoch,
            step=self.epoch_totals["steps"],
            epoch_totals=totals,
            world_size=world.size,
            replica_digests=digests,
            config=arguments.config(self.args),
            model_state=self.net.state_dict(),
            swa_state=self.swa_model.state_dict(),
            optimizer_state=optimizer.optim.state_dict(),
            weight_acc=self.accumulators(),
            noise_step=optimizer.noise.step,
            rng=distributed.gather_objects(world, rng.rng_state(self.device)),
            loader_generator=self.train_loader.generator.get_state(),
            history=self.history,
        )

    def load_state_dict(self, checkpoint, path):
        """Continue from a checkpoint (as load_checkpoint returns it): its
        flags, then every field, checked against this run first."""
        check_resumable(checkpoint, path, self.args, self.world)
        try:
            check_structure(
                checkpoint, self.net.state_dict(), self.swa_model.state_dict(),
                [param.shape for param in self.net.parameters()], self.accumulators(), new_epoch_totals())
        except Rejected as rejected:
            raise UserError(f"checkpoint {path} is malformed: {rejected}") from None
        try:
            self.net.load_state_dict(checkpoint["model_state"])
            self.swa_model.load_state_dict(checkpoint["swa_state"])
            self.optimizer.optim.load_state_dict(checkpoint["optimizer_state"])
        except (KeyError, RuntimeError, ValueError) as error:
            raise UserError(f"checkpoint {path} does not match this model ({first_line(error)})") from None
        with_accumulators = [p for p in self.net.parameters() if p in self.optimizer.weight_acc]
        for param, accumulator in zip(with_accumulators, checkpoint["weight_acc"]):
            self.optimizer.weight_acc[param] = accumulator.to(param.device)
        self.optimizer.noise.seek(checkpoint["noise_step"])
        # The same process count continues exactly; another one takes rank 0's generators.
        generators = checkpoint["rng"]
        rng.set_rng_state(generators[self.world.rank] if len(generators) == self.world.size else generators[0],
                          self.device)
        self.train_loader.generator.set_state(checkpoint["loader_generator"])
        self.epoch = checkpoint["epoch"]
        self.epoch_totals = dict(checkpoint["epoch_totals"])
        if not self.world.main:  # the saved partial sums are all ranks' already
            self.epoch_totals.update(loss_sum=0.0, correct=0, seen=0)
        self.history = list(checkpoint["history"])


def check_resumable(checkpoint, path, args, world=distributed.World()):
    """What a run can check of a checkpoint before it builds anything (so a
    wrong --resume fails before the data load): the state-defining flags,
    the position, and the process count of a mid-epoch checkpoint."""
    saved = checkpoint["config"]
    if not isinstance(saved, dict):
        raise UserError(f"checkpoint {path} is malformed: config must be a dict, found {type(saved).__name__}")
    current = arguments.config(args)
    parser = arguments.build_parser()
    absent = {**{key: parser.get_default(key) for key in STATE_DEFINING}, **kinds.record({})}
    for key in STATE_DEFINING:
        value = saved.get(key, absent[key])  # a flag newer than the checkpoint: its default
        if value != current[key]:
            raise UserError(f"checkpoint {path} was written with {arguments.flag_name(key)} {value}, "
                            f"this run has {current[key]}; resume with the same flags")
    try:
        for key, minimum in (("epoch", 0), ("step", 0), ("world_size", 1)):
            _check_count(checkpoint, key, minimum)
    except Rejected as rejected:
        raise UserError(f"checkpoint {path} is malformed: {rejected}") from None
    if checkpoint["epoch"] > args.epochs:
        raise UserError(f"checkpoint {path} is after epoch {checkpoint['epoch']}, beyond --epochs "
                        f"{args.epochs}; resume with --epochs {checkpoint['epoch']} or more")
    if checkpoint["step"] and checkpoint["world_size"] != world.size:
        raise UserError(f"checkpoint {path} is mid-epoch and was written by {checkpoint['world_size']} "
                        f"process(es), this run has {world.size}; resume it with as many, or resume "
                        f"from an epoch checkpoint (checkpoint-<epoch>.pt)")


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
        for key in MOMENTS:
            buffer = state.get(key)
            if buffer is not None and (not isinstance(buffer, torch.Tensor) or buffer.shape != parameter_shapes[index]):
                raise Rejected(f"optimizer_state['state'][{index}][{key!r}] must be a tensor of shape "
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
