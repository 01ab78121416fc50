"""Learning-rate schedules as registered, typed components (``schedule: {kind: cosine, ...}``): each
gives the multiplier of the peak rate at an optimizer step (not a sample or a micro-batch)."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field

from archifactory.config import MAX_STEPS, Component
from archifactory.registry import register_schedule


class ScheduleConfig(Component):
    """Base of every schedule: a linear warmup, then the schedule's own shape."""

    warmup_steps: int | None = Field(None, ge=0, le=MAX_STEPS)
    """Linear warmup steps; ``None`` means ``warmup_fraction`` of the run."""
    warmup_fraction: float = Field(0.05, ge=0, le=1)

    def warmup(self, total_steps: int | float) -> int:
        return self.warmup_steps if self.warmup_steps is not None else int(self.warmup_fraction * total_steps)

    def multiplier(self, step: int | float, total_steps: int | float) -> float:
        """Multiplier at optimizer step ``step`` (0-based, fractional for time budgets) of ``total_steps``:
        during warmup, linear from 1/(warmup+1) to 1; then :meth:`after_warmup`."""
        warmup = self.warmup(total_steps)
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return self.after_warmup(step, total_steps, warmup)

    def after_warmup(self, step, total_steps, warmup) -> float:  # pragma: no cover - abstract
        raise NotImplementedError


class _DecayingSchedule(ScheduleConfig):
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """The floor the decay ends at, as a fraction of the peak."""

    def progress(self, step, total_steps, warmup) -> float:
        return min(1.0, (step - warmup) / max(1.0, total_steps - warmup))


@register_schedule
class CosineSchedule(_DecayingSchedule):
    """Half-cosine from 1 to ``min_lr_ratio`` over the steps after warmup (Loshchilov & Hutter 2017)."""

    kind: Literal["cosine"] = "cosine"

    def after_warmup(self, step, total_steps, warmup):
        floor = self.min_lr_ratio
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * self.progress(step, total_steps, warmup)))


@register_schedule
class LinearSchedule(_DecayingSchedule):
    """Straight line from 1 to ``min_lr_ratio`` over the steps after warmup."""

    kind: Literal["linear"] = "linear"

    def after_warmup(self, step, total_steps, warmup):
        return 1.0 - (1.0 - self.min_lr_ratio) * self.progress(step, total_steps, warmup)


@register_schedule
class WSDSchedule(_DecayingSchedule):
    """Warmup-stable-decay (Hu et al. 2024, MiniCPM): constant, then linear to ``min_lr_ratio`` over the
    last ``decay_fraction`` of the steps."""

    kind: Literal["wsd"] = "wsd"
    decay_fraction: float = Field(0.2, gt=0, le=1)

    def after_warmup(self, step, total_steps, warmup):
        decay_start = total_steps * (1 - self.decay_fraction)
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1.0, total_steps - decay_start))
        return 1.0 - (1.0 - self.min_lr_ratio) * progress


@register_schedule
class ConstantSchedule(ScheduleConfig):
    """1 after warmup (schedule-free optimizers are meant to run with it)."""

    kind: Literal["constant"] = "constant"

    def after_warmup(self, step, total_steps, warmup):
        return 1.0


def lr_multiplier(cfg: ScheduleConfig, step: int | float, total_steps: int | float) -> float:
    """``cfg.multiplier(step, total_steps)``."""
    return cfg.multiplier(step, total_steps)
