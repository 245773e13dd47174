"""Checks that a tensor lies on a block floating point grid."""

import torch


def block_exponents(blocks):
    """floor(log2(max |x|)) per row of a 2-D tensor (rows of zeros: None)."""
    peaks = blocks.abs().amax(dim=1)
    return [None if peak == 0 else int(torch.floor(torch.log2(peak))) for peak in peaks]


def on_block_grid(tensor, wl, rows=None):
    """True when every row of `rows` (default: one row per index of dim 0)
    holds integer multiples k of its step 2^(e - wl + 2), |k| <= 2^(wl-1) - 1,
    with e the exponent of the row's largest magnitude."""
    blocks = (rows if rows is not None else tensor.reshape(tensor.shape[0], -1)).double()
    for row, exponent in zip(blocks, block_exponents(blocks)):
        if exponent is None:
            continue
        steps = row / 2.0 ** (exponent - wl + 2)
        if not torch.equal(steps, steps.round()) or steps.abs().max() > 2 ** (wl - 1) - 1:
            return False
    return True
