"""Small schedule objects: mask-update timing and drop fraction (RigL/SET/SNFS), cubic pruning (GMP),
and the learning-rate schedule. Each is a pure function of the step, so resuming needs no state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sparsekit.errors import InputError

DROP_SCHEDULES = ("cosine", "constant", "linear")
LR_SCHEDULES = ("cosine", "step", "constant")


@dataclass(frozen=True)
class UpdateSchedule:
    """When masks are updated and what fraction of active connections is dropped (docs/methods.md).

    Steps t = 1, 2, ... count optimizer iterations. Updates happen at t % interval == 0 and t <= end_step,
    with end_step = round(update_end * total_steps). f(t) = alpha/2 (1 + cos(pi t / end_step)) for cosine.
    """

    total_steps: int
    interval: int = 100
    update_end: float = 0.75
    drop_fraction: float = 0.3
    drop_schedule: str = "cosine"

    def __post_init__(self) -> None:
        if self.interval < 1:
            raise InputError(f"update interval {self.interval} must be >= 1", where="--update-interval",
                             fix="give the number of steps between mask updates, e.g. 100")
        if not 0.0 < self.update_end <= 1.0:
            raise InputError(f"update end {self.update_end} is outside (0, 1]", where="--update-end",
                             fix="give the fraction of training during which masks change, e.g. 0.75")
        if not 0.0 <= self.drop_fraction <= 1.0:
            raise InputError(f"drop fraction {self.drop_fraction} is outside [0, 1]", where="--drop-fraction",
                             fix="give alpha, the initial fraction of active weights replaced, e.g. 0.3")
        if self.drop_schedule not in DROP_SCHEDULES:
            raise InputError(f"unknown drop schedule {self.drop_schedule!r}", where="--drop-schedule",
                             fix=f"choose one of {', '.join(DROP_SCHEDULES)}")

    @property
    def end_step(self) -> int:
        return round(self.update_end * self.total_steps)

    def is_update_step(self, step: int) -> bool:
        return step > 0 and step % self.interval == 0 and step <= self.end_step

    def fraction(self, step: int) -> float:
        end = max(self.end_step, 1)
        if self.drop_schedule == "constant":
            return self.drop_fraction
        if self.drop_schedule == "linear":
            return self.drop_fraction * (1.0 - step / end)
        return self.drop_fraction / 2.0 * (1.0 + math.cos(math.pi * step / end))

    def update_steps(self) -> list[int]:
        return list(range(self.interval, self.end_step + 1, self.interval))


def cubic_sparsity(step: int, *, initial: float, final: float, begin: int, end: int) -> float:
    """Zhu & Gupta: s_t = s_f + (s_i - s_f)(1 - (t - t_b)/(t_e - t_b))^3, clamped to [begin, end]."""
    if step <= begin:
        return initial
    if step >= end or end <= begin:
        return final
    progress = (step - begin) / (end - begin)
    return final + (initial - final) * (1.0 - progress) ** 3


@dataclass(frozen=True)
class LRSchedule:
    """Learning rate as a function of the step: linear warm-up, then cosine, step (×gamma at
    milestones, fractions of training) or constant."""

    base_lr: float
    total_steps: int
    kind: str = "cosine"
    warmup_steps: int = 0
    milestones: tuple[float, ...] = (0.3, 0.6, 0.9)
    gamma: float = 0.2

    def __post_init__(self) -> None:
        if self.kind not in LR_SCHEDULES:
            raise InputError(f"unknown LR schedule {self.kind!r}", where="--lr-schedule",
                             fix=f"choose one of {', '.join(LR_SCHEDULES)}")

    def lr(self, step: int) -> float:
        """LR used for optimizer step ``step`` (1-based)."""
        if self.warmup_steps > 0 and step <= self.warmup_steps:
            return self.base_lr * step / self.warmup_steps
        if self.kind == "constant":
            return self.base_lr
        if self.kind == "step":
            frac = step / max(self.total_steps, 1)
            return self.base_lr * self.gamma ** sum(frac >= m for m in self.milestones)
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min(max(step - self.warmup_steps - 1, 0) / span, 1.0)
        return 0.5 * self.base_lr * (1.0 + math.cos(math.pi * progress))
