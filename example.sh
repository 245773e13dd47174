#!/usr/bin/env bash
# The seed's experiment: 8-bit SWALP on CIFAR100 with VGG16 (weights,
# activations, gradients, errors and momentum in 8-bit block floating point,
# stochastic rounding). Extra arguments are passed to train.py and override
# these, e.g. `bash example.sh --epochs 10 --device cpu`.
# DATA_PATH (default ./data) holds or receives cifar100/.
set -euo pipefail
cd "$(dirname "$0")"

python train.py \
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
