"""SWALP: low-precision SGD with Stochastic Weight Averaging (Yang et al., 2019).

Trains a network with low-precision weights, activations, gradients, errors
and momentum on the SWALP schedule, averages its weights from --swa_start on
into a full-precision copy, and evaluates both after recomputing their
BatchNorm statistics. The machinery is the swalp package; this file builds a
run's parts from its flags and holds its loop (see --help).
"""

import sys

import models
from swalp.run import arguments


def parse_args(argv=None):
    return arguments.parse_args(argv, models.MODELS, models.IMAGENET_MODELS)


if __name__ == "__main__":
    parse_args()  # checks every flag before torch loads, which takes seconds: a mistake fails at once

import contextlib  # noqa: E402  (the imports below wait for the check above)
import os
import signal
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import swa
import swalp
import utils
from swalp.data import batched, datasets, loaders
from swalp.errors import UserError
from swalp.quant import kinds, layers
from swalp.run import checkpoint_files, distributed, results, rng, run_directory
from swalp.run.device import configure, resolve_device
from swalp.run.files import WriteFailed
from swalp.run.quantizers import choose_quantizers
from swalp.run.signals import StopRequest, Stopped, resume_command
from swalp.run.state import TrainingState, check_resumable, load_checkpoint, new_epoch_totals
from swalp.seeds import mix_seed


@dataclass
class Run:
    """A run's parts, as `build` makes them from the flags."""

    args: object
    device: torch.device
    world: distributed.World
    run_dir: str
    state: TrainingState  # the models, the optimizer and the position: what a checkpoint holds
    train_net: torch.nn.Module  # the network, or its data-parallel wrapper
    train_loader: object
    test_loader: object
    bn_loader: object  # the BatchNorm recomputation's pass over the training data
    steps_per_epoch: int
    schedule: swa.SWASchedule
    backend: object  # the rounding backend, None in full precision
    sites: int  # activation quantizers
    format_lines: list
    writers: utils.Writers = None
    rows_printed: int = 0  # by this process: its first row, a resumed run's too, gets the header

    @property
    def global_step(self):
        return self.state.epoch * self.steps_per_epoch + self.state.epoch_totals["steps"]

    def open_logs(self, resumed):
        self.writers = utils.Writers.open(self.run_dir, self.state.epoch, self.global_step, resumed, self.world)
        self.writers.epochs.add_text("formats", "\n\n".join(self.format_lines))

    def close_logs(self):
        self.writers.close()


def build(args, device, run_dir, world=distributed.World()):
    """The run's parts: data, the network and its SWA copy, quantizers, the optimizer, the schedule."""
    print(f"Loading dataset {args.dataset}" + (f" from {args.data_path}" if args.data_path else ""))
    train_set, test_set, num_classes = datasets.load_on_every_rank(args.dataset, args.data_path, world)
    if args.loader == "batched":
        data = batched.make_loaders(train_set, test_set, args.batch_size, args.seed, device, world)
    else:
        data = loaders.make_loaders(train_set, test_set, args.batch_size, args.num_workers, args.seed,
                                    device.type == "cuda", world)
    net = models.build_model(args.model, num_classes).to(device)
    layers.check_rules(net, args.layer_rules)
    swa_model = utils.averaged_model(net, args.average, args.ema_decay)  # before quantizers: full precision
    # The optimizer's rounding noise depends only on (seed, step): identical
    # across data-parallel replicas and restored exactly on resume.
    noise = swalp.StepNoise(args.seed, rank=world.rank)
    rounding = choose_quantizers(args, device, noise, world)
    q = rounding.quantizers
    format_lines = utils.format_lines(q, args.optimizer, args.layer_format or [], args.compile)
    print("\n".join(format_lines))
    lowp = dict(rules=args.layer_rules, rounding=args.rounding, fallback=rounding.fallback, noise=noise)
    sites = swalp.quantize_model(net, q["activate"], q["error"], sites=net.quantizer_sites(args.quant_placement),
                                 backend=rounding.backend or "torch", **lowp)
    print(f"Model {args.model}: {len(sites)} activation quantizers ({args.quant_placement} placement), "
          f"device {device}, run directory {run_dir}")
    optimizer = swalp.wrap_optimizer(utils.base_optimizer(args, net.parameters()), model=net,
                                     **{kind: q[kind] for kind in kinds.OPTIMIZER_KINDS},
                                     backend=rounding.optimizer_backend or "torch", compiler=args.compile_backend,
                                     **lowp)
    if args.compile:  # in place: parameter names and state_dict keys stay the plain network's
        net.compile(backend=args.compile_backend, dynamic=False)
    # Gradients are averaged across replicas before the optimizer rounds them
    # with noise shared by all ranks, so the replicas stay bit-identical.
    train_net = net if not world.distributed else torch.nn.parallel.DistributedDataParallel(
        net, device_ids=[device.index] if device.type == "cuda" else None)
    steps_per_epoch = len(data[0])
    state = TrainingState(args, net, swa_model, optimizer, data[0], device, world)
    return Run(args, device, world, run_dir, state, train_net, *data, steps_per_epoch,
               swa.schedule_for(args, steps_per_epoch), rounding.backend, len(sites), format_lines)


def train_epoch(run, stop):
    """Train the rest of the current epoch; False when stopped early. Each
    step: its rate, forward, the finite check (every rank's loss, before any
    weight changes), backward, the rounded optimizer step, averaging where
    the schedule says, a mid-epoch checkpoint, a stop request."""
    args, state, schedule = run.args, run.state, run.schedule
    totals = state.epoch_totals
    loaders.set_epoch(run.train_loader, state.epoch, totals["steps"])
    run.train_net.train()
    batches = utils.progress(run.train_loader, f"epoch {state.epoch + 1}/{args.epochs}", run.world)
    if isinstance(stop, StopRequest) and not run.world.distributed:
        batches = stop.waiting(batches)
    # Loss, accuracy and the finite check stay on the device until settled:
    # before averaging, saving or stopping, and at the epoch's end.
    sums = utils.EpochSums(totals, run.device)
    start = time.perf_counter()
    try:
        for inputs, targets in batches:
            step = run.global_step
            lr = schedule.lr(step)
            for group in state.optimizer.param_groups:
                group["lr"] = lr
            if schedule.changes_within_epochs(step):
                run.writers.steps.add_scalar("lr/iteration", lr, step + 1)
            inputs, targets = inputs.to(run.device, non_blocking=True), targets.to(run.device, non_blocking=True)
            output = run.train_net(inputs)
            loss = F.cross_entropy(output, targets)
            sums.add(loss, output, targets, totals["steps"] + 1)
            state.optimizer.zero_grad()
            loss.backward()
            state.optimizer.step()
            totals["steps"] += 1
            totals["seen"] += inputs.size(0)
            totals["time"] += time.perf_counter() - start
            start = time.perf_counter()
            if schedule.collects_after(step + 1):
                settle(run, sums)
                state.swa_model.update_parameters(state.net)
                if args.average == "swa":  # an EMA updates every step: its steps go unlisted
                    totals["collected_at"].append(step + 1)
                    run.writers.steps.add_scalar("swa/collected", int(state.swa_model.n_averaged), step + 1)
            if args.save_every_steps and totals["steps"] < run.steps_per_epoch \
                    and (step + 1) % args.save_every_steps == 0:
                settle(run, sums)
                save(run)
            if distributed.any_across(run.world, stop, run.device):  # at the last step too: saved before evaluating
                settle(run, sums)
                return False
        settle(run, sums)
        return True
    except Stopped:  # while waiting for data, at a step boundary
        settle(run, sums)
        return False
    finally:
        loaders.set_epoch(run.train_loader, state.epoch)


def finish_epoch(run):
    """Evaluate, record and print the epoch's row after its last step.
    BatchNorm statistics are recomputed before each evaluation: the SGD
    model's, and the SWA model's once for all the models averaged since."""
    args, state, world = run.args, run.state, run.world
    epoch, completed = state.epoch, state.epoch + 1
    lr = run.schedule.lr(epoch * run.steps_per_epoch)
    train_res = utils.epoch_result(state.epoch_totals, run.device, world)
    test_res = swa_res = {"loss": None, "accuracy": None}
    if completed % args.eval_freq == 0 or completed in (args.swa_start, args.epochs):
        distributed.recompute_batchnorm(run.bn_loader, state.net, run.device, world)
        test_res = utils.evaluate(run.test_loader, state.net, run.device, "test", world)
        if state.swa_model.n_averaged > 0:
            distributed.recompute_batchnorm(run.bn_loader, state.swa_model, run.device, world)
            swa_res = utils.evaluate(run.test_loader, state.swa_model, run.device, "swa test", world)
    collected_at = list(state.epoch_totals["collected_at"])
    record = utils.epoch_record(completed, lr, train_res, test_res, swa_res, int(state.swa_model.n_averaged),
                                collected_at)
    state.history.append(record)
    state.epoch, state.epoch_totals = completed, new_epoch_totals()
    utils.print_row(record, header=run.rows_printed == 0)
    run.rows_printed += 1
    if run.schedule.c_steps and collected_at:
        print(f"     averaged after steps {', '.join(map(str, collected_at))}", flush=True)
    return record


def train(run, stop):
    """Run epochs to the end; returns the checkpoint saved when `stop` was requested first, else None."""
    args, state = run.args, run.state
    while state.epoch < args.epochs:
        epoch_start = time.perf_counter()
        if not train_epoch(run, stop):
            return save(run)
        record = finish_epoch(run)
        record["epoch_time"] = time.perf_counter() - epoch_start
        utils.log_scalars(run.writers.epochs, record)
        stopping = distributed.any_across(run.world, stop, run.device)
        path = None
        if state.epoch % args.save_freq == 0 or state.epoch in (args.swa_start, args.epochs) or stopping:
            path = save(run)
        status = "finished" if state.epoch == args.epochs else "running"
        distributed.on_rank_zero(run.world, lambda: write_results(run, status))
        if stopping and state.epoch < args.epochs:
            return path
    # Also when a resume from the final checkpoint had nothing left to train:
    # a kill between that checkpoint and the epoch's results.json is repaired.
    distributed.on_rank_zero(run.world, lambda: write_results(run, "finished"))
    return None


def settle(run, sums):
    """Read the epoch's sums; end the run on a NaN or infinite loss, before
    anything is averaged or saved after it: the checkpoints written while it
    was finite stay."""
    bad = sums.settle()
    if not distributed.any_across(run.world, bad is not None, run.device):
        return
    step, loss = min(found for found in distributed.gather_objects(run.world, bad) if found is not None)
    saved = checkpoint_files.list_checkpoints(run.run_dir)
    if run.world.main:
        write_results(run, "diverged", diverged_at={"epoch": run.state.epoch + 1, "step": step})
    raise UserError(f"the loss became {loss} at epoch {run.state.epoch + 1}, step {step}; stopped (newest "
                    f"checkpoint, written while the loss was still finite: {saved[-1][2] if saved else 'none'}); "
                    f"start afresh with a lower --lr_init or --swa_lr, or longer word lengths")


def save(run):
    """Checkpoint (written by rank 0; every rank must call it); returns its
    path. With --keep_checkpoints, older epoch checkpoints are deleted."""
    state = run.state.state_dict()

    def write():
        try:
            path = checkpoint_files.save_checkpoint(run.run_dir, state)
        except WriteFailed as failed:
            raise results.failure(run.run_dir, lambda status: record(run, status), failed) from None
        if run.args.keep_checkpoints and state["step"] == 0:
            checkpoint_files.prune_epoch_checkpoints(run.run_dir, run.args.keep_checkpoints, run.args.swa_start)
        return path

    return distributed.on_rank_zero(run.world, write)


def record(run, status):
    """What results.json holds (rank 0 writes it after every epoch)."""
    return {"status": status, "config": arguments.config(run.args), "activation_quantizers": run.sites,
            "quant_backend": run.backend.name if run.backend else None, "epochs": run.state.history,
            **utils.summary(run.state.history, run.args.swa_start)}


def write_results(run, status, **extra):
    results.write_results(run.run_dir, lambda status: record(run, status), status, **extra)


def start(args, world, device, run_dir, resume_path, stale_outputs):
    """The run, built and resumed, with every check that can fail before
    training passed; only then are the outputs --overwrite replaces deleted."""
    checkpoint = None
    if resume_path:  # before the data load: a wrong --resume fails at once
        checkpoint = load_checkpoint(resume_path)
        check_resumable(checkpoint, resume_path, args, world)
    rng.seed_everything(args.seed)
    configure(device, args.tf32, args.deterministic)
    run = build(args, device, run_dir, world)
    if world.distributed:
        # The model was initialised alike on every rank; from here each replica
        # draws its own dropout masks and activation rounding noise.
        rng.seed_everything(mix_seed(args.seed, world.rank) % 2 ** 32)
    if checkpoint:
        run.state.load_state_dict(checkpoint, resume_path)
        print(f"Resumed from {resume_path} after epoch {run.state.epoch}, step {run.state.epoch_totals['steps']}")
    if world.main:  # --overwrite: only now that the new run could start
        for path in stale_outputs:
            os.remove(path)
    return run


def train_to_the_end(run, resumed):
    """Train, then print the closing figures, or exit with the resume command
    when a signal stopped the run."""
    run.open_logs(resumed)
    try:
        with StopRequest() as stop:
            saved = train(run, stop)
    finally:
        run.close_logs()
    if saved:
        signum = stop.signal or signal.SIGTERM  # another rank may have received it
        print(f"Stopped by {signal.Signals(signum).name} at epoch {run.state.epoch + 1}, step "
              f"{run.state.epoch_totals['steps']}; saved {saved}. Resume with:\n{resume_command(saved, run.world)}",
              flush=True)
        sys.exit(128 + signum)
    final = utils.summary(run.state.history, run.args.swa_start)
    print("Done")
    print(f"SGD Error : {final['sgd_error']}")
    print(f"SWA Error : {final['swa_error']}")


def run_training(args, world):
    if args.swa_start > args.epochs:
        raise UserError(f"--swa_start {args.swa_start} is beyond --epochs {args.epochs}; lower it or train longer")
    device = resolve_device(args.device)
    tags = (f"-{layers.tag(args.layer_rules)}" if args.layer_rules else "") + ("-compiled" if args.compile else "")
    name = f"{args.dataset}-{args.model}-{kinds.precision_tag(args.formats)}{tags}-seed{args.seed}"
    directory, run_dir, resume_path, stale_outputs = run_directory.claim_on_rank_zero(args, name, world)
    with directory or contextlib.nullcontext():  # releases the lock; a failed start leaves no empty folder
        run = start(args, world, device, run_dir, resume_path, stale_outputs)
        if directory:
            directory.training_started = True
        train_to_the_end(run, resume_path is not None)


def main(argv=None):
    args = parse_args(argv)
    world, args.device = distributed.init(args.device)
    if not world.main:  # rank 0 alone prints, logs and writes
        sys.stdout = open(os.devnull, "w")
    try:
        utils.list_layers(args) if args.list_layers else run_training(args, world)
    except UserError as error:
        if world.main:  # every rank raises it; one line is enough
            print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # once training runs, Ctrl-C saves and stops instead (StopRequest)
        if world.main:
            print("error: interrupted by Ctrl-C before training started", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    finally:
        distributed.shutdown(world)


if __name__ == "__main__":
    main()
