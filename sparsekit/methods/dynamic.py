"""Dynamic sparse training: the mask changes during training at a fixed parameter budget.

``DynamicSparseMethod`` implements DESIGN.md §3's update step once; RigL, SET and SNFS differ
only in their grow score and in whether the optimizer step comes before the mask update.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from sparsekit.errors import InputError
from sparsekit.methods.base import Method, register_method
from sparsekit.schedules import DROP_SCHEDULES, UpdateSchedule

if TYPE_CHECKING:
    from sparsekit.masks import SparseLayer
    from sparsekit.sparsifier import Sparsifier

DYNAMIC_DEFAULTS: dict[str, Any] = {
    "update_interval": 100,
    "update_end": 0.75,
    "drop_fraction": 0.3,
    "drop_schedule": "cosine",
    "grow_init": "zero",
}


class DynamicSparseMethod(Method):
    """Drop the lowest-|w| active connections, grow the highest-scoring inactive ones (equal counts)."""

    family = "dynamic"
    defaults: ClassVar[dict[str, Any]] = dict(DYNAMIC_DEFAULTS)

    def validate(self) -> None:
        if self.options["grow_init"] != "zero":
            raise InputError(f"unknown grow init {self.options['grow_init']!r}", where="--grow-init",
                             fix="use 'zero' (new connections start at 0, as in the paper)")
        if self.options["drop_schedule"] not in DROP_SCHEDULES:
            raise InputError(f"unknown drop schedule {self.options['drop_schedule']!r}", where="--drop-schedule",
                             fix=f"choose one of {', '.join(DROP_SCHEDULES)}")
        self.schedule: UpdateSchedule | None = None

    def attach(self, sp: Sparsifier) -> None:
        self.schedule = UpdateSchedule(
            total_steps=sp.total_steps,
            interval=int(self.options["update_interval"]),
            update_end=float(self.options["update_end"]),
            drop_fraction=float(self.options["drop_fraction"]),
            drop_schedule=str(self.options["drop_schedule"]),
        )

    def is_update_step(self, step: int) -> bool:
        return self.schedule is not None and self.schedule.is_update_step(step)

    # -- scores -------------------------------------------------------------------------------
    def drop_scores(self, sp: Sparsifier, layer: SparseLayer, step: int) -> torch.Tensor:
        return layer.param.detach().abs().flatten()

    def grow_scores(self, sp: Sparsifier, layer: SparseLayer, step: int) -> torch.Tensor:
        raise NotImplementedError

    # -- the update -----------------------------------------------------------------------------
    def after_optimizer_step(self, sp: Sparsifier, step: int) -> None:
        if not self.is_update_step(step):
            return
        assert self.schedule is not None
        fraction = self.schedule.fraction(step)
        new_masks = {}
        for layer in sp.layers:
            k = math.floor(fraction * layer.active)
            new_masks[layer.name] = sp.drop_and_grow(
                layer, step, k_drop=k, k_grow=k,
                drop_scores=self.drop_scores(sp, layer, step),
                grow_scores=self.grow_scores(sp, layer, step),
            )
        sp.commit_masks(new_masks, step)


@register_method
class RigL(DynamicSparseMethod):
    """RigL (Evci et al., ICML 2020): grow where the instantaneous dense gradient is largest."""

    name = "rigl"
    description = "RigL: drop smallest |w|, regrow largest dense |grad|, cosine-decayed fraction (Evci et al. 2020)"
    reference = "Evci et al., Rigging the Lottery: Making All Tickets Winners, ICML 2020"
    defaults: ClassVar[dict[str, Any]] = {**DYNAMIC_DEFAULTS, "skip_step_on_update": True}
    paper_recipe: ClassVar[dict[str, Any]] = {
        "update_interval": 100, "update_end": 0.75, "drop_fraction": 0.3, "drop_schedule": "cosine",
        "distribution": "erk", "optimizer": "sgd", "momentum": 0.9,
    }
    needs_dense_grad = True

    def validate(self) -> None:
        super().validate()
        self._grow: dict[str, torch.Tensor] = {}

    def before_optimizer_step(self, sp: Sparsifier, step: int) -> None:
        if not self.is_update_step(step):
            return
        # The dense gradient of this step's mini-batch, taken before inactive entries are masked.
        # Under DDP, param.grad is already the all-reduced average (taken before |.|).
        for layer in sp.layers:
            grad = layer.param.grad
            if grad is None:
                self._grow[layer.name] = torch.zeros(layer.numel, device=layer.param.device)
            else:
                self._grow[layer.name] = grad.detach().abs().flatten().clone()

    def skip_optimizer_step(self, sp: Sparsifier, step: int) -> bool:
        return bool(self.options["skip_step_on_update"]) and self.is_update_step(step)

    def grow_scores(self, sp: Sparsifier, layer: SparseLayer, step: int) -> torch.Tensor:
        return self._grow.pop(layer.name)
