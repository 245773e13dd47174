#!/usr/bin/env bash
# The paper's ImageNet setting: 8-bit SWALP with ResNet-18 (weights,
# activations, gradients, errors, momentum and the gradient accumulator in
# 8-bit block floating point, stochastic rounding), data-parallel over the
# GPUs of this machine with torchrun. The defaults for ImageNet: 90 epochs,
# lr 0.1 for a global batch of 256 (32 per process: set NPROC=8, or scale
# --lr_init with the global batch), averaging over the last 10 epochs at
# swa_lr 0.001, weight decay 1e-4.
# DATA_PATH (default ./imagenet) holds train/ and val/ with a folder per class;
# NPROC (default: every visible GPU, else 1) processes; extra arguments go to
# train.py and override these, e.g. a one-epoch trial in its own directory
# (add --resume auto to continue it after a stop):
#   bash example_imagenet.sh --epochs 1 --swa_start 1 --dir runs/imagenet-trial
set -euo pipefail
cd "$(dirname "$0")"

NPROC=${NPROC:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}
python -m torch.distributed.run --standalone --nproc_per_node "${NPROC}" train.py \
    --dataset ImageNet \
    --data_path "${DATA_PATH:-./imagenet}" \
    --model ResNet18 \
    --seed 1 \
    --wl-weight 8 \
    --wl-grad 8 \
    --wl-activate 8 \
    --wl-error 8 \
    --wl-momentum 8 \
    --wl-acc 8 \
    --rounding stochastic \
    "$@"
