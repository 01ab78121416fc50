"""Learning-rate schedules, as a multiplier of the peak rate at each optimizer step."""

from __future__ import annotations

import math

from archifactory.train.config import ScheduleConfig


def lr_multiplier(cfg: ScheduleConfig, step: int | float, total_steps: int | float) -> float:
    """Multiplier at optimizer step ``step`` (0-based, may be fractional for time budgets) of ``total_steps``.

    - warmup: linear from 1/(warmup+1) to 1 over ``warmup`` steps;
    - ``cosine``: half-cosine from 1 to ``min_lr_ratio`` over the remaining steps;
    - ``linear``: straight line from 1 to ``min_lr_ratio``;
    - ``wsd``: warmup-stable-decay (Hu et al. 2024, MiniCPM): constant, then linear decay to the floor
      over the last ``decay_fraction`` of the steps;
    - ``constant``: 1 after warmup.
    """
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_fraction * total_steps)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if cfg.kind == "constant":
        return 1.0
    floor = cfg.min_lr_ratio
    if cfg.kind == "wsd":
        decay_start = total_steps * (1 - cfg.decay_fraction)
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1.0, total_steps - decay_start))
        return 1.0 - (1.0 - floor) * progress
    progress = min(1.0, (step - warmup) / max(1.0, total_steps - warmup))
    if cfg.kind == "linear":
        return 1.0 - (1.0 - floor) * progress
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
