#!/usr/bin/env bash
# The seed's example command: 8-bit SWALP on CIFAR100 with VGG16 (weights,
# activations, gradients, errors and momentum in 8-bit block floating point,
# stochastic rounding; no gradient accumulator, every tensor blocked along
# dimension 0). The paper's table setting, which adds an 8-bit accumulator and
# --small-block FC, is reproduce/run.py's `lp8`.
# Extra arguments are passed to train.py and override these, e.g. a short
# trial on the CPU, apart from the full run's directory:
#   bash example.sh --epochs 2 --swa_start 1 --device cpu --dir runs/example-trial
# DATA_PATH (default ./data) holds or receives cifar100/; it and the run
# directory are relative to the folder this is started from.
set -euo pipefail

python "$(dirname "$(readlink -f "$0")")/train.py" \
    --dataset CIFAR100 \
    --data_path "${DATA_PATH:-./data}" \
    --model VGG16 \
    --epochs 300 \
    --lr_init 0.05 \
    --swa_start 200 \
    --swa_lr 0.01 \
    --wd 5e-4 \
    --seed 100 \
    --wl-weight 8 \
    --wl-grad 8 \
    --wl-activate 8 \
    --wl-error 8 \
    --wl-momentum 8 \
    --rounding stochastic \
    "$@"
