"""train.py's helpers: the average, the progress bar, evaluation, the
per-epoch table and record, the layer listing, TensorBoard's writers and
scalars, and the closing figures."""

import os
import sys
from typing import NamedTuple

import tabulate
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

import models
from swalp.data import CLASSES
from swalp.quant.kinds import OPTIMIZER_KINDS, shown, unquantized
from swalp.quant.layers import check_rules, formats_for, layer_names
from swalp.run.distributed import World, sum_across

TABLE_COLUMNS = ["ep", "lr", "tr_loss", "tr_acc", "tr_time", "te_loss", "te_acc", "swa_te_loss", "swa_te", "swa_n"]
HEADER_EVERY = 40


def averaged_model(net, average, ema_decay):
    """torch's AveragedModel of the plain network (taken before quantizers
    are attached, so it is evaluated in full precision, and always kept in
    float32): the equal-weight mean (SWA), or an exponential moving average."""
    if average == "ema":
        return AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(ema_decay))
    return AveragedModel(net)


def format_lines(quantizers, optimizer, rules, compiled):
    """The startup lines that say how each kind is rounded."""
    lines = [f"{kind:10}: {quantizers[kind] or unquantized(kind)}" for kind in shown(optimizer)]
    lines += [f"layer rule: {rule}" for rule in rules]
    return lines + (["compiled  : torch.compile (counter-based noise)"] if compiled else [])


def base_optimizer(args, params):
    """The optimizer the low-precision wrapper rounds around: SGD with
    momentum, or AdamW (its weight decay decoupled from the gradient)."""
    if args.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=args.lr_init, betas=(args.beta1, args.beta2), eps=args.eps,
                                 weight_decay=args.wd)
    return torch.optim.SGD(params, lr=args.lr_init, momentum=args.momentum, weight_decay=args.wd)


def progress(loader, description, world=World()):
    """`loader` with a progress bar on a terminal, shown by the first process only."""
    return tqdm(loader, desc=description, leave=False, disable=not (world.main and sys.stderr.isatty()),
                file=sys.stderr, dynamic_ncols=True)


class EpochSums:
    """The epoch's loss and accuracy sums and its first non-finite loss, kept
    on the device: reading a GPU tensor makes the host wait for the GPU, so
    `settle` reads them only where the run must know them. The sums continue
    the totals' (a resumed epoch's) in the same order as adding on the host."""

    def __init__(self, totals, device):
        self.totals = totals
        self.loss_sum = torch.tensor(totals["loss_sum"], dtype=torch.float64, device=device)
        self.correct = torch.tensor(totals["correct"], dtype=torch.int64, device=device)
        self.bad_step = torch.zeros((), dtype=torch.int64, device=device)  # 0 while every loss is finite
        self.bad_loss = torch.zeros((), device=device)

    def add(self, loss, output, targets, step):
        loss = loss.detach()
        self.loss_sum += loss.double() * targets.size(0)
        self.correct += (output.argmax(1) == targets).sum()
        first = torch.isfinite(loss).logical_not_() & (self.bad_step == 0)
        self.bad_step.masked_fill_(first, step)
        self.bad_loss = torch.where(first, loss, self.bad_loss)

    def settle(self):
        """The sums into the totals; (step, loss) of the epoch's first
        non-finite loss, or None."""
        self.totals["loss_sum"], self.totals["correct"] = self.loss_sum.item(), int(self.correct.item())
        step = int(self.bad_step.item())
        return (step, self.bad_loss.item()) if step else None


def epoch_result(totals, device, world=World()):
    """Train loss and accuracy of an epoch over all ranks."""
    loss_sum, correct, seen = sum_across(world, [totals["loss_sum"], totals["correct"], totals["seen"]], device)
    return {"loss": loss_sum / seen, "accuracy": 100.0 * correct / seen, "time": totals["time"]}


@torch.no_grad()
def evaluate(loader, model, device, description="eval", world=World()):
    """Loss and accuracy over everything `loader` yields on any rank."""
    model.eval()
    loss_sum, correct, seen = 0.0, 0, 0
    for inputs, targets in progress(loader, description, world):
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        output = model(inputs)
        loss_sum += F.cross_entropy(output, targets, reduction="sum").item()
        correct += (output.argmax(1) == targets).sum().item()
        seen += inputs.size(0)
    loss_sum, correct, seen = sum_across(world, [loss_sum, correct, seen], device)
    return {"loss": loss_sum / seen, "accuracy": 100.0 * correct / seen, "seen": int(seen)}


def epoch_record(epoch, lr, train_res, test_res, swa_res, swa_n, collected_at):
    """One epoch's entry of results.json and the checkpoints' history."""
    return {"epoch": epoch, "lr": lr, "train_loss": train_res["loss"], "train_accuracy": train_res["accuracy"],
            "train_time": train_res["time"], "test_loss": test_res["loss"], "test_accuracy": test_res["accuracy"],
            "swa_test_loss": swa_res["loss"], "swa_test_accuracy": swa_res["accuracy"], "swa_n": swa_n,
            "collected": bool(collected_at), "collected_at_steps": collected_at, "test_samples": test_res.get("seen")}


def print_row(record, header):
    """The record's line of the per-epoch table."""
    print(table_row([record[key] for key in ("epoch", "lr", "train_loss", "train_accuracy", "train_time", "test_loss",
                                             "test_accuracy", "swa_test_loss", "swa_test_accuracy", "swa_n")],
                    record["epoch"] - 1, header=header), flush=True)


def list_layers(args):
    """--list-layers: each layer and quantizer site of the run's model (its
    site number, which keys its noise), and the formats it would get."""
    net = models.build_model(args.model, CLASSES[args.dataset])
    check_rules(net, args.layer_rules)
    formats, rules = args.formats, args.layer_rules
    site_index = {id(module): index for index, module in enumerate(net.quantizer_sites(args.quant_placement))}
    layers, rows, columns = layer_names(net), [], shown(args.optimizer)
    for name, module in net.named_modules():
        if name and (name in layers or id(module) in site_index):
            chosen = formats_for(name, formats, rules, layers)
            kinds = OPTIMIZER_KINDS if any(True for _ in module.parameters(recurse=False)) else ()
            if id(module) in site_index:
                kinds = [kind for kind in columns if kind in kinds or kind in ("activate", "error")]
            rows.append([name, type(module).__name__, site_index.get(id(module), ""),
                         *[(chosen[kind].spec if chosen[kind] else "fp32") if kind in kinds else ""
                           for kind in columns]])
    print(tabulate.tabulate(rows, ["layer", "type", "site", *columns], tablefmt="simple"))


def table_row(values, epoch, header=False):
    """One line of the seed's per-epoch table, with the header before it on
    the first epoch, every HEADER_EVERY epochs, and when `header` is set (the
    first row a resumed run prints)."""
    table = tabulate.tabulate([values], TABLE_COLUMNS, tablefmt="simple", floatfmt="8.4f")
    lines = table.split("\n")
    if header or epoch % HEADER_EVERY == 0:
        return "\n".join([lines[1]] + lines)
    return lines[2]


class NullWriter:
    """Stands in for TensorBoard's writer on every rank but the first."""

    def add_scalar(self, *args, **kwargs):
        pass

    def add_text(self, *args, **kwargs):
        pass

    def flush(self):
        pass

    def close(self):
        pass


class Writers(NamedTuple):
    """TensorBoard writers: per-epoch scalars in the run directory indexed by
    epoch, per-iteration ones in steps/ indexed by step."""

    epochs: object
    steps: object

    @classmethod
    def open(cls, run_dir, epoch, step, resumed, world=World()):
        """On resume, purge_step drops what an interrupted run logged after its checkpoint."""
        from torch.utils.tensorboard import SummaryWriter  # TensorBoard is slow to import and rank 0's alone

        if not world.main:
            return cls(NullWriter(), NullWriter())
        return cls(SummaryWriter(run_dir, purge_step=epoch + 1 if resumed else None),
                   SummaryWriter(os.path.join(run_dir, "steps"), purge_step=step + 1 if resumed else None))

    def close(self):
        for writer in self:
            writer.close()


def log_scalars(writer, record):
    """TensorBoard scalars of one epoch record, with the original's tag names."""
    step = record["epoch"]
    writer.add_scalar("lr", record["lr"], step)
    writer.add_scalar("time/epoch", record["epoch_time"], step)
    writer.add_scalar("swa/n_averaged", record["swa_n"], step)
    for prefix, key in (("train", "train"), ("test", "test"), ("test_swa", "swa_test")):
        if record[f"{key}_loss"] is None:
            continue
        accuracy = record[f"{key}_accuracy"]
        writer.add_scalar(f"{prefix}/loss", record[f"{key}_loss"], step)
        writer.add_scalar(f"{prefix}/acc_perc", accuracy, step)
        writer.add_scalar(f"{prefix}/err_perc", 100.0 - accuracy, step)
    writer.flush()


def summary(history, swa_start):
    """The original's closing figures: SGD error when averaging starts (the
    end of the SGD schedule) and SWA error at the last epoch."""
    by_epoch = {record["epoch"]: record for record in history}
    at_start = by_epoch.get(swa_start, {})
    last = history[-1] if history else {}

    def error(record, key):
        accuracy = record.get(f"{key}_accuracy")
        return None if accuracy is None else 100.0 - accuracy

    return {
        "sgd_error": error(at_start, "test"),
        "sgd_error_final": error(last, "test"),
        "swa_error": error(last, "swa_test"),
        "swa_n": last.get("swa_n", 0),
    }
