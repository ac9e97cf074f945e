"""Learning-rate schedules as ``LambdaLR`` multipliers, so the scheduler state goes into checkpoints.

Paper / training card (Sec. 2.5): AdamW at a peak of 1e-4 after 10k linear warm-up steps, cosine decay to 1e-6.
Public recipes hold the rate constant after warm-up, so the shape after warm-up is a config choice.
"""

from __future__ import annotations

import math

import torch

SCHEDULES = ("cosine", "constant")


class WarmupThenDecay:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based: the step about to be taken).

    Warm-up rises linearly from ``1/warmup_steps`` to 1 over ``warmup_steps`` steps; then ``cosine`` decays to
    ``min_lr / peak_lr`` at ``max_steps`` and stays there, ``constant`` stays at 1. A plain object with number
    attributes (not a closure) so ``LambdaLR.state_dict()`` can save it.
    """

    def __init__(self, *, peak_lr: float, min_lr: float, warmup_steps: int, max_steps: int, schedule: str):
        if schedule not in SCHEDULES:
            raise ValueError(f"train.schedule must be one of {list(SCHEDULES)}, got {schedule!r}")
        if peak_lr <= 0:
            raise ValueError(f"train.lr must be > 0, got {peak_lr}")
        if not 0 <= min_lr <= peak_lr:
            raise ValueError(f"train.min_lr must be in [0, train.lr={peak_lr}], got {min_lr}")
        if warmup_steps < 0 or max_steps < 1:
            raise ValueError(f"need train.warmup_steps >= 0 and train.max_steps >= 1, got {warmup_steps}, {max_steps}")
        self.peak_lr = float(peak_lr)
        self.min_lr = float(min_lr)
        self.warmup_steps = int(warmup_steps)
        self.max_steps = int(max_steps)
        self.schedule = schedule

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        decay_steps = max(1, self.max_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        floor = self.min_lr / self.peak_lr
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_lr_scheduler(optimizer: torch.optim.Optimizer, train_cfg) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over ``optimizer`` (whose param groups hold ``lr = train.lr``) from the ``train`` config section."""
    multiplier = WarmupThenDecay(peak_lr=float(train_cfg.lr), min_lr=float(train_cfg.min_lr),
                                 warmup_steps=int(train_cfg.warmup_steps), max_steps=int(train_cfg.max_steps),
                                 schedule=str(train_cfg.schedule))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
