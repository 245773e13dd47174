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



class SWASchedule:
    """Learning rate per step and when to average, over a whole run.

    Steps are counted over the run (`step`: 0-based index of the step about
    to be taken; `completed`: steps taken so far). Before swa_start the rate
    follows `schedule` per epoch. From swa_start on it is either constant
    (swa_lr, the seed's behaviour) or cyclical (Izmailov et al., 2018): in
    each cycle of `cycle_steps` iterations it falls linearly from lr_max
    towards swa_lr, reaching swa_lr at the cycle's last iteration.

    Averaging: every `c_steps` steps of the averaging phase when set (by
    default at each cycle's end for the cyclical rate), otherwise after every
    `c_epochs`-th epoch from the one completing swa_start epochs on (the
    original's convention). The averaging phase starts with the SWA phase, or
    after `average_start` epochs when given (an EMA from epoch 0, say).
    """

    def __init__(self, lr_init, swa_start, swa_lr, steps_per_epoch, cyclic=False, lr_max=None,
                 cycle_steps=0, c_epochs=1, c_steps=0, average_start=None):
        self.lr_init, self.swa_start, self.swa_lr = lr_init, swa_start, swa_lr
        self.average_start = swa_start if average_start is None else average_start
        self.steps_per_epoch = steps_per_epoch
        self.cyclic = cyclic
        self.lr_max = lr_init if lr_max is None else lr_max
        self.cycle_steps = cycle_steps or steps_per_epoch
        self.c_epochs = c_epochs
        self.c_steps = c_steps or (self.cycle_steps if cyclic else 0)

    @property
    def start_step(self):
        return self.swa_start * self.steps_per_epoch

    def lr(self, step):
        epoch = step // self.steps_per_epoch
        if epoch < self.swa_start or not self.cyclic:
            return schedule(epoch, self.lr_init, self.swa_start, self.swa_lr)
        iteration = step - self.start_step + 1
        t = ((iteration - 1) % self.cycle_steps + 1) / self.cycle_steps
        return (1 - t) * self.lr_max + t * self.swa_lr

    def changes_within_epochs(self, step):
        """Whether the rate of `step` may differ from its epoch's first step."""
        return self.cyclic and step >= self.start_step

    def collects_after(self, completed):
        if self.c_steps:
            phase_steps = completed - self.average_start * self.steps_per_epoch
            return phase_steps > 0 and phase_steps % self.c_steps == 0
        if completed % self.steps_per_epoch:
            return False
        return is_collection_epoch(completed // self.steps_per_epoch - 1, self.swa_start, self.c_epochs)


def schedule_for(args, steps_per_epoch):
    """The schedule train.py's flags describe: with --average ema, an update
    after every step from --ema_start (default --swa_start) on."""
    ema = args.average == "ema"
    return SWASchedule(args.lr_init, args.swa_start, args.swa_lr, steps_per_epoch,
                       cyclic=args.swa_schedule == "cyclic", lr_max=args.swa_lr_max, cycle_steps=args.swa_cycle_steps,
                       c_epochs=args.swa_c_epochs, c_steps=1 if ema else args.swa_c_steps,
                       average_start=args.ema_start if ema else None)
