"""Dynamic sparse training: the mask changes during training at a fixed parameter budget.

``DynamicSparseMethod`` gives the update step's schedule and counts once (docs/methods.md); RigL, SET
and SNFS differ only in their grow score, in whether the optimizer step comes before the mask update,
and in what a training step costs. The engine does the selection and commits the masks.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from sparsekit.errors import InputError
from sparsekit.methods.base import LayerUpdate, Method, register_method
from sparsekit.schedules import DROP_SCHEDULES, UpdateSchedule
from sparsekit.selection import Magnitude, tie_keys

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
    """Drop the lowest-|w| active connections, grow the highest-scoring inactive ones (equal counts).
    Subclasses give ``grow_scores`` and, if they need it, the dense gradient in ``before_optimizer_step``."""

    family = "dynamic"
    defaults: ClassVar[dict[str, Any]] = dict(DYNAMIC_DEFAULTS)

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.schedule: UpdateSchedule | None = None  # set by attach, once total steps are known

    def validate(self) -> None:
        if self.options["grow_init"] != "zero":
            raise InputError(f"unknown grow init {self.options['grow_init']!r}", where="--grow-init",
                             fix="use 'zero' (new connections start at 0, as in the paper)")
        if self.options["drop_schedule"] not in DROP_SCHEDULES:
            raise InputError(f"unknown drop schedule {self.options['drop_schedule']!r}", where="--drop-schedule",
                             fix=f"choose one of {', '.join(DROP_SCHEDULES)}")

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

    def update_counts(self, sp: Sparsifier, step: int) -> dict[str, LayerUpdate]:
        """k_l = floor(f(t) · active_l) dropped and as many grown, in every layer."""
        assert self.schedule is not None
        fraction = self.schedule.fraction(step)
        counts = {}
        for layer in sp.layers:
            k = math.floor(fraction * layer.active)
            counts[layer.name] = LayerUpdate(k_drop=k, k_grow=k)
        return counts

    # drop_scores is the base default, |w|; subclasses give grow_scores.


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

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._grow: dict[str, torch.Tensor] = {}  # |dense grad| of the update step, by layer
        self._grow_buf: dict[str, torch.Tensor] = {}

    def before_optimizer_step(self, sp: Sparsifier, step: int) -> None:
        if not self.is_update_step(step):
            return
        # The dense gradient of this step's mini-batch, taken before inactive entries are masked.
        # Under DDP, param.grad is already the all-reduced average (taken before |.|).
        for layer in sp.layers:
            grad = layer.param.grad
            if grad is None:
                self._grow[layer.name] = torch.zeros(layer.numel, device=layer.param.device)
                continue
            buf = self._grow_buf.get(layer.name)  # reused: a fresh large tensor costs page faults
            if buf is None or buf.numel() != layer.numel or buf.device != grad.device or buf.dtype != grad.dtype:
                buf = self._grow_buf[layer.name] = torch.empty(layer.numel, dtype=grad.dtype, device=grad.device)
            self._grow[layer.name] = torch.abs(grad.detach().reshape(-1), out=buf)

    def skip_optimizer_step(self, sp: Sparsifier, step: int) -> bool:
        return bool(self.options["skip_step_on_update"]) and self.is_update_step(step)

    def grow_scores(self, sp: Sparsifier, layer: SparseLayer, step: int) -> torch.Tensor | Magnitude:
        return self._grow.pop(layer.name)

    # -- training cost: the dense gradient is paid for on update steps only ----------------------
    def _window(self) -> tuple[int, int]:
        assert self.schedule is not None, "attach() the method first"
        return self.schedule.interval, self.schedule.end_step

    def training_step_cost(self, f_s: float, f_d: float, step: int) -> float:
        """(3·f_S·ΔT + 2·f_S + f_D)/(ΔT + 1) up to T_end (one dense gradient per ΔT + 1 steps, as the
        paper's appendix H averages it), 3·f_S after."""
        interval, end_step = self._window()
        if step <= end_step:
            return (3.0 * f_s * interval + 2.0 * f_s + f_d) / (interval + 1)
        return 3.0 * f_s

    def training_segment_cost(self, f_s: float, f_d: float, first: int, last: int) -> float:
        _, end_step = self._window()  # the per-step cost changes at T_end: split the segment there
        inside = max(0, min(last, end_step) - first + 1)
        return inside * self.training_step_cost(f_s, f_d, first) + (last - first + 1 - inside) * 3.0 * f_s

    def training_formula(self) -> str:
        return "(3·f_S·ΔT + 2·f_S + f_D)/(ΔT + 1) for t ≤ T_end, 3·f_S after"

    def training_formula_fields(self) -> dict[str, Any]:
        interval, end_step = self._window()
        return {"update_interval": interval, "update_end_step": end_step}


@register_method
class SET(DynamicSparseMethod):
    """SET (Mocanu et al. 2018): magnitude drop, random regrowth. The random grow score comes from the
    reproducible key stream, so every process of a data-parallel job grows the same connections."""

    name = "set"
    description = "SET: drop smallest |w|, regrow at random, cosine-decayed fraction (Mocanu et al. 2018)"
    reference = "Mocanu et al., Scalable training of artificial neural networks ..., Nat. Commun. 2018"
    paper_recipe: ClassVar[dict[str, Any]] = {
        "update_interval": 100, "update_end": 0.75, "drop_fraction": 0.3, "drop_schedule": "cosine",
        "distribution": "erk", "optimizer": "sgd", "momentum": 0.9,
    }

    def grow_scores(self, sp: Sparsifier, layer: SparseLayer, step: int) -> torch.Tensor | Magnitude:
        keys = tie_keys(sp.seed, step, layer.index, layer.numel, purpose="set-grow")
        return keys.to(layer.param.device)


@register_method
class SNFS(DynamicSparseMethod):
    """Sparse momentum (Dettmers & Zettlemoyer 2019): grow where the EMA of the dense gradient is largest.

    The EMA m ← β m + (1 − β) g of every entry (active or not) is updated on every step, so SNFS needs
    dense gradients every step (its training cost is 2 f_S + f_D per step). With ``redistribute`` the
    regrowth is shared between layers in proportion to each layer's mean |m| over its active weights;
    then only the global active count is invariant, and no layer falls below one connection per
    output unit (count floor ``shape[0]``).
    """

    name = "snfs"
    description = ("SNFS (sparse momentum): drop smallest |w|, regrow largest |EMA of dense grad| (β 0.9); "
                   "optional momentum redistribution across layers (Dettmers & Zettlemoyer 2019)")
    reference = ("Dettmers & Zettlemoyer, Sparse Networks from Scratch: Faster Training without Losing "
                 "Performance, 2019")
    defaults: ClassVar[dict[str, Any]] = {**DYNAMIC_DEFAULTS, "momentum_beta": 0.9, "redistribute": False}
    paper_recipe: ClassVar[dict[str, Any]] = {
        "update_interval": 100, "update_end": 0.75, "drop_fraction": 0.3, "drop_schedule": "cosine",
        "momentum_beta": 0.9, "redistribute": False, "distribution": "erk", "optimizer": "sgd",
        "momentum": 0.9,
    }
    needs_dense_grad = True  # every step: the training cost is the base default for it, 2·f_S + f_D

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.ema: dict[str, torch.Tensor] = {}  # EMA of the dense gradient, by layer

    def validate(self) -> None:
        super().validate()
        beta = self.options["momentum_beta"]
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
            raise InputError(f"momentum beta {beta!r} is outside [0, 1)",
                             where="--method-option momentum_beta",
                             fix="give the EMA coefficient, e.g. 0.9")
        if not isinstance(self.options["redistribute"], bool):
            raise InputError(f"redistribute must be true or false, got {self.options['redistribute']!r}",
                             where="--redistribute", fix="use --redistribute or --no-redistribute")

    def before_optimizer_step(self, sp: Sparsifier, step: int) -> None:
        beta = float(self.options["momentum_beta"])
        for layer in sp.layers:
            grad = layer.param.grad
            ema = self.ema.get(layer.name)
            if ema is None or ema.shape != layer.param.shape or ema.device != layer.param.device:
                ema = torch.zeros_like(layer.param, memory_format=torch.contiguous_format)
                self.ema[layer.name] = ema
            if grad is None:
                ema.mul_(beta)
            else:
                ema.mul_(beta).add_(grad.detach(), alpha=1.0 - beta)

    def grow_scores(self, sp: Sparsifier, layer: SparseLayer, step: int) -> torch.Tensor | Magnitude:
        ema = self.ema.get(layer.name)
        if ema is None:
            return torch.zeros(layer.numel, device=layer.param.device)
        return Magnitude(ema.reshape(-1))

    @staticmethod
    def floor(layer: SparseLayer) -> int:
        """The fewest connections a layer may keep under redistribution: one per output unit (or its
        planned count, if the plan itself gives it fewer)."""
        return min(layer.numel, int(layer.param.shape[0]), layer.plan.active)

    def grow_counts(self, sp: Sparsifier, kept: dict[str, int], total_grow: int) -> dict[str, int]:
        """Regrowth per layer under redistribution: first lift every layer to its floor (one connection
        per output unit), then share the rest by mean |EMA| over active weights, capped by free room."""
        from sparsekit.distributions import largest_remainder

        names = [ly.name for ly in sp.layers]
        room = {ly.name: ly.numel - kept[ly.name] for ly in sp.layers}
        grow = dict.fromkeys(names, 0)
        left = total_grow
        for ly in sp.layers:  # only after --init-from with a thinner mask can a layer be below its floor
            lift = min(max(0, self.floor(ly) - kept[ly.name]), left)
            grow[ly.name] += lift
            left -= lift
        weights = {}
        for ly in sp.layers:
            ema = self.ema.get(ly.name)
            weights[ly.name] = float(ema[ly.mask].abs().mean()) if ema is not None and ly.active else 0.0
        while left > 0:
            open_ = [n for n in names if room[n] - grow[n] > 0]
            if not open_:
                break
            total_w = sum(weights[n] for n in open_)
            share = [(weights[n] / total_w if total_w > 0 else 1.0 / len(open_)) * left for n in open_]
            caps = [room[n] - grow[n] for n in open_]
            ideal = [min(s, c) for s, c in zip(share, caps, strict=True)]
            give = largest_remainder(ideal, min(left, round(sum(ideal))), caps)
            if sum(give) == 0:  # all shares rounded to 0: hand out one at a time by weight
                give = [0] * len(open_)
                give[max(range(len(open_)), key=lambda i: (weights[open_[i]], -i))] = 1
            for n, g in zip(open_, give, strict=True):
                grow[n] += g
            left -= sum(give)
        return grow

    def update_counts(self, sp: Sparsifier, step: int) -> dict[str, LayerUpdate]:
        """Without redistribution, the dynamic default; with it, per-layer magnitude drops (never below
        a layer's floor) and the regrowth shared out by ``grow_counts``."""
        if not self.options["redistribute"]:
            return super().update_counts(sp, step)
        assert self.schedule is not None
        fraction = self.schedule.fraction(step)
        drops = {}
        for layer in sp.layers:
            # Dropping is per layer (magnitude); never below the floor of one connection per output unit.
            room = max(0, layer.active - self.floor(layer))
            drops[layer.name] = min(math.floor(fraction * layer.active), room)
        kept = {ly.name: ly.active - drops[ly.name] for ly in sp.layers}
        grows = self.grow_counts(sp, kept, sum(drops.values()))
        return {ly.name: LayerUpdate(k_drop=drops[ly.name], k_grow=grows[ly.name]) for ly in sp.layers}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"ema/{name}": t for name, t in self.ema.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.ema = {k[len("ema/"):]: v.clone() for k, v in state.items() if k.startswith("ema/")}
