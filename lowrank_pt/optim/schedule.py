"""Learning-rate schedules as multipliers of the stage's peak LR, by optimizer step.

Schedules are small callable objects with plain attributes, so ``LambdaLR.state_dict()`` stores
them as data in checkpoints.
"""

from __future__ import annotations

import math


class LRSchedule:
    """Warm-up, then cosine / linear / constant decay to ``min_lr_ratio``.

    ``jagged_cosine`` multiplies the cosine envelope by a re-warm ramp after every restart: at steps
    ``restart_every, 2*restart_every, ...`` the LR drops to 0 and climbs back over
    ``restart_warmup_steps`` steps (ReLoRA's schedule).
    """

    def __init__(self, kind: str, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.1,
                 restart_every: int = 0, restart_warmup_steps: int = 0):
        if kind == "jagged_cosine" and restart_every < 1:
            raise ValueError("jagged_cosine needs restart_every >= 1")
        self.kind = kind
        self.total_steps = max(1, total_steps)
        self.warmup_steps = warmup_steps
        self.min_lr_ratio = min_lr_ratio
        self.restart_every = restart_every
        self.restart_warmup_steps = restart_warmup_steps

    def envelope(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.kind == "constant":
            return 1.0
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        if self.kind == "linear":
            shape = 1.0 - progress
        else:
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * shape

    def __call__(self, step: int) -> float:
        lr = self.envelope(step)
        if self.kind == "jagged_cosine" and step >= self.restart_every and self.restart_warmup_steps > 0:
            since_restart = step % self.restart_every
            if since_restart < self.restart_warmup_steps:
                lr *= (since_restart + 1) / (self.restart_warmup_steps + 1)
        return lr


def build(cfg, total_steps: int) -> LRSchedule:
    return LRSchedule(cfg.kind, total_steps, cfg.warmup_steps, cfg.min_lr_ratio,
                      cfg.restart_every, cfg.restart_warmup_steps)
