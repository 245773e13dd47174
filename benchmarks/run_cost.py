"""What does one of the paper's runs cost in compute and in disk?

For each configuration of reproduce/run.py (CIFAR10/CIFAR100, VGG16 and
PreResNet164, full precision and `lp8`):

- floating-point operations of the convolutions and matrix products
  (torch's FlopCounterMode, one forward and backward pass), per training
  epoch (forward and backward over the 50,000 training images, BatchNorm
  recomputation over them for BN models, evaluation of the 10,000 test
  images; the SWA model's too once averaging has started) and per run, and
  the hours that takes at a few sustained GPU throughputs: an estimate, not
  a measurement (it leaves out rounding, data loading and kernel launches);
- the size of one checkpoint (model, SWA model, momentum buffers and, with
  `lp8`, the accumulators, serialised as train.py does), how many a run
  writes with train.py's defaults (`--save_freq 25`, plus `swa_start` and
  the end), how many remain with `--keep_checkpoints 2` (the newest two and
  the one at `swa_start`), and the disk of the default table (3 seeds).

    python -m benchmarks.run_cost [--json PATH]
"""

import argparse
import io
import json
import os

import tabulate
import torch
from torch.optim.swa_utils import AveragedModel
from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import models
from reproduce.run import HYPERPARAMETERS, PRECISIONS

TRAIN_IMAGES, TEST_IMAGES = 50_000, 10_000
CLASSES = {"CIFAR10": 10, "CIFAR100": 100}
SAVE_FREQ = 25  # train.py's default
KEEP = 2  # reproduce/run.py's default --keep-checkpoints
SEEDS = 3
SUSTAINED_TFLOPS = (5, 10, 20)


def flops_per_image(net):
    """(forward, forward and backward) FLOPs of one 32x32 image."""
    images = torch.randn(2, 3, 32, 32)
    with FlopCounterMode(display=False) as forward:
        net.eval()(images)
    with FlopCounterMode(display=False) as both:
        net.train()(images).sum().backward()
    return forward.get_total_flops() / 2, both.get_total_flops() / 2


def run_flops(net, hyper):
    forward, step = flops_per_image(net)
    has_bn = any(isinstance(module, torch.nn.modules.batchnorm._BatchNorm) for module in net.modules())
    total = 0.0
    for epoch in range(1, hyper["epochs"] + 1):
        models_evaluated = 2 if epoch >= hyper["swa_start"] else 1
        total += TRAIN_IMAGES * step + models_evaluated * TEST_IMAGES * forward
        if has_bn:
            total += models_evaluated * TRAIN_IMAGES * forward
    return forward, step, total


def checkpoint_bytes(net, accumulators):
    """Bytes of a checkpoint's tensors as train.py saves them."""
    params = [p.detach() for p in net.parameters()]
    state = {"model_state": net.state_dict(), "swa_state": AveragedModel(net).state_dict(),
             "momentum": [torch.zeros_like(p) for p in params],
             "weight_acc": [torch.zeros_like(p) for p in params] if accumulators else []}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.tell()


def checkpoint_epochs(hyper):
    epochs, swa_start = hyper["epochs"], hyper["swa_start"]
    return [e for e in range(1, epochs + 1) if e % SAVE_FREQ == 0 or e in (swa_start, epochs)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results", "run_cost.json"),
                        help="where to write the figures as JSON (default: %(default)s)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rows, table_bytes, table_kept = [], 0, 0
    for dataset in CLASSES:
        for model, hyper in HYPERPARAMETERS.items():
            net = models.build_model(model, CLASSES[dataset])
            forward, step, total = run_flops(net, hyper)
            saved = checkpoint_epochs(hyper)
            kept = len(set(saved[-KEEP:]) | {hyper["swa_start"]})
            for precision in PRECISIONS:
                size = checkpoint_bytes(net, accumulators="--wl-acc" in PRECISIONS[precision])
                row = {"dataset": dataset, "model": model, "precision": precision, "epochs": hyper["epochs"],
                       "GFLOP/image fwd": forward / 1e9, "GFLOP/image fwd+bwd": step / 1e9,
                       "PFLOP/run": total / 1e15,
                       **{f"h at {t} TFLOP/s": total / (t * 1e12) / 3600 for t in SUSTAINED_TFLOPS},
                       "MB/checkpoint": size / 1e6, "checkpoints": len(saved),
                       "GB/run": len(saved) * size / 1e9, f"GB/run, keep {KEEP}": kept * size / 1e9}
                rows.append(row)
                if model == "VGG16":  # reproduce/run.py's default table
                    table_bytes += SEEDS * len(saved) * size
                    table_kept += SEEDS * kept * size
    print(tabulate.tabulate(rows, headers="keys", floatfmt=".3g"))
    print(f"\nDefault table of reproduce/run.py (CIFAR10 and CIFAR100, VGG16, fp and lp8, {SEEDS} seeds): "
          f"{table_bytes / 1e9:.1f} GB of checkpoints keeping all, {table_kept / 1e9:.1f} GB with "
          f"--keep-checkpoints {KEEP}")
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as handle:
        json.dump({"runs": rows, "default_table_gb": table_bytes / 1e9,
                   f"default_table_gb_keep_{KEEP}": table_kept / 1e9}, handle, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
