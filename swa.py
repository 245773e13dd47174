"""Stochastic Weight Averaging pieces that torch.optim.swa_utils leaves to the
caller: the SWALP learning-rate schedule and when to collect a model.

Averaging and BatchNorm recomputation are torch's `AveragedModel` and
`update_bn`; the averaged copy is built from the plain network before any
quantizer is attached, so it is evaluated in full precision.
"""

# Fraction of swa_start after which the rate starts to fall, where it reaches
# its floor, and that floor relative to lr_init (the references' constants).
DECAY_START, DECAY_END, DECAY_FLOOR = 0.5, 0.9, 0.01


def schedule(epoch, lr_init, swa_start, swa_lr):
    """Learning rate for 0-based `epoch` (the original's convention).

    Constant lr_init for the first half of swa_start, linear decay to
    0.01 * lr_init at 90% of it, held until swa_start, then swa_lr.
    """
    t = epoch / swa_start
    if t >= 1.0:
        return swa_lr
    if t <= DECAY_START:
        factor = 1.0
    elif t <= DECAY_END:
        factor = 1.0 - (1.0 - DECAY_FLOOR) * (t - DECAY_START) / (DECAY_END - DECAY_START)
    else:
        factor = DECAY_FLOOR
    return lr_init * factor


def is_collection_epoch(epoch, swa_start, swa_c_epochs):
    """Whether the model is averaged after 0-based `epoch`: from the epoch that
    completes swa_start epochs on, every swa_c_epochs epochs."""
    completed = epoch + 1
    return completed >= swa_start and (completed - swa_start) % swa_c_epochs == 0

