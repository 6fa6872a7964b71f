"""Gradual magnitude pruning (Zhu & Gupta 2017): dense at first, pruned to the target on a cubic schedule.

Unlike the sparse-from-scratch methods this one starts from all-ones masks, so its training cost is
that of a shrinking model (Σ_l 3·f_D,l·(1 − s_t,l) per step). Per-layer final sparsity
s_f,l comes from the distribution (ERK by default), so the end point is the same per-layer plan the
other methods train at. Defaults (our choice; the paper's numbers came from per-dataset schedules):
start at 10 % of training, prune every 100 steps, reach the target at 75 % (the same point where
RigL's update window ends), then fine-tune at the target for the remaining 25 %.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch

from sparsekit.errors import InputError
from sparsekit.methods.base import InitInputs, LayerUpdate, Method, register_method
from sparsekit.schedules import cubic_sparsity

if TYPE_CHECKING:
    from sparsekit.masks import SparseLayer
    from sparsekit.sparsifier import Sparsifier


@register_method
class Pruning(Method):
    """Drop the lowest-|w| active connections every ``prune_interval`` steps between ``prune_begin`` and
    ``prune_end`` (fractions of training) so each layer follows
    s_t = s_f + (0 − s_f)(1 − (t − t_b)/(t_e − t_b))³;
    exactly at the planned count from ``t_e`` on. Pruned connections never come back. With a structured
    granularity the counts are whole units: blocks go by summed |w|; under N:M every group keeps its top
    n_t of M by |w| (n_t stepping from M down to N), under fan-in every row its top K_t."""

    name = "pruning"
    description = ("Pruning: gradual magnitude pruning from dense, cubic schedule per layer "
                   "(Zhu & Gupta 2017; the paper's Gale et al. baseline)")
    family = "pruning"
    reference = ("Zhu & Gupta, To prune, or not to prune, 2017; "
                 "Gale et al., The State of Sparsity in DNNs, 2019")
    defaults: ClassVar[dict[str, Any]] = {"prune_begin": 0.1, "prune_end": 0.75, "prune_interval": 100}
    paper_recipe: ClassVar[dict[str, Any]] = {"prune_begin": 0.1, "prune_end": 0.75, "prune_interval": 100,
                                              "distribution": "erk", "optimizer": "sgd", "momentum": 0.9}

    own_start_mask = "dense"  # also from loaded weights

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.begin_step = 0  # t_b and t_e in steps, set by attach once total steps are known
        self.end_step = 1
        self.units: dict[str, int] = {}  # a structured granularity's count unit per layer (set by attach)

    def validate(self) -> None:
        begin, end, interval = (self.options[k] for k in ("prune_begin", "prune_end", "prune_interval"))
        for flag, v in (("--prune-begin", begin), ("--prune-end", end)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise InputError(f"{flag} {v!r} is outside [0, 1]", where=flag,
                                 fix="give a fraction of training, e.g. --prune-begin 0.1 --prune-end 0.75")
        if begin >= end:
            raise InputError(f"--prune-begin {begin} must come before --prune-end {end}",
                             where="--prune-begin",
                             fix="e.g. --prune-begin 0.1 --prune-end 0.75")
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise InputError(f"--prune-interval {interval!r} must be a positive integer",
                             where="--prune-interval",
                             fix="e.g. --prune-interval 100")

    def attach(self, sp: Sparsifier) -> None:
        self.begin_step = round(float(self.options["prune_begin"]) * sp.total_steps)
        self.end_step = max(1, round(float(self.options["prune_end"]) * sp.total_steps))
        self.units = {ly.name: sp.granularity.unit(ly.plan.shape) for ly in sp.layers}

    def initial_masks(self, sp: Sparsifier, init: InitInputs) -> dict[str, torch.Tensor]:
        return {ly.name: torch.ones(ly.plan.shape, dtype=torch.bool, device=ly.param.device)
                for ly in sp.layers}

    def is_update_step(self, step: int) -> bool:
        if step == self.end_step:
            return True
        return (self.begin_step < step < self.end_step
                and (step - self.begin_step) % int(self.options["prune_interval"]) == 0)

    def update_steps(self) -> list[int]:
        return [t for t in range(self.begin_step + 1, self.end_step + 1) if self.is_update_step(t)]

    def sparsity_at(self, numel: int, planned_active: int, step: int) -> float:
        """s_t of one layer at step ``step`` (its final s_f = 1 − planned / numel)."""
        final = 1.0 - planned_active / numel
        if step >= self.end_step:
            return final
        return cubic_sparsity(step, initial=0.0, final=final, begin=self.begin_step, end=self.end_step)

    def target_active(self, numel: int, planned_active: int, step: int, unit: int = 1) -> int:
        """Active count after the pruning step at ``step``: round((1 − s_t)·numel) in whole ``unit``s (a
        structured granularity's: blocks, or n_t of every N:M group / row); exact plan from t_e."""
        if step >= self.end_step:
            return planned_active
        return round((1.0 - self.sparsity_at(numel, planned_active, step)) * numel / unit) * unit

    def planned_history(self, layers: list[SparseLayer]) -> list[dict[str, Any]]:
        """Active counts per layer after every pruning step (what ``updates.jsonl`` will record)."""
        history = [{"step": 0, "active": {ly.name: ly.numel for ly in layers}}]
        for t in self.update_steps():
            history.append({"step": t, "active": {ly.name: min(ly.numel, self.target_active(
                ly.numel, ly.plan.active, t, self.units.get(ly.name, 1))) for ly in layers}})
        return history

    def update_counts(self, sp: Sparsifier, step: int) -> dict[str, LayerUpdate]:
        """Drop the lowest-|w| active connections (the default drop score) down to the target; grow none."""
        counts = {}
        for ly in sp.layers:
            k = ly.active - self.target_active(ly.numel, ly.plan.active, step, self.units.get(ly.name, 1))
            if k > 0:
                counts[ly.name] = LayerUpdate(k_drop=k, k_grow=0)
        return counts

    # Training cost: the default 3·f_S per step at the mask in effect, i.e. Σ_l 3·f_D,l·(1 − s_t,l),
    # over the recorded mask history (or planned_history above).
    def training_formula(self) -> str:
        return "Σ_l 3·f_D,l·(1 − s_t,l)"
