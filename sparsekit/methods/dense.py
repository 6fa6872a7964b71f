"""Dense-width methods: train a dense model (the reference, or a narrower one)."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from sparsekit.errors import InputError
from sparsekit.methods.base import Method, register_method


@register_method
class Dense(Method):
    """The dense reference model: no masks."""

    name = "dense"
    description = "Dense: the reference model, all weights trained"
    family = "dense"
    sparse = False
    paper_recipe: ClassVar[dict[str, Any]] = {"optimizer": "sgd", "momentum": 0.9}


@register_method
class SmallDense(Method):
    """A dense model made narrower until its prunable-weight count fits the sparse model's budget.

    The budget is the active count of the sparse model this run would otherwise train (the plan at
    ``--sparsity``/``--distribution`` over the full-width model's prunable weights, dense layers included).
    Widths are searched on the grid ``n / B`` (B = the widest hidden layer's output count), so the widest
    layer takes every integer width; the largest width whose count does not exceed the budget wins, and
    the gap is reported in ``summary.json`` under ``small_dense``.
    """

    name = "small-dense"
    sized_by_sparsity = True
    description = "Small-Dense: a dense model narrowed to the sparse model's parameter budget"
    family = "dense"
    reference = "Evci et al. 2020 (baseline); Zhu & Gupta 2017"
    paper_recipe: ClassVar[dict[str, Any]] = {"distribution": "erk", "optimizer": "sgd", "momentum": 0.9}
    sparse = False

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.width_info: dict[str, Any] | None = None  # set by choose_model_kwargs

    def choose_model_kwargs(self, config: Any, data: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        from sparsekit.distributions import plan_layers
        from sparsekit.masks import gate_block_shapes, prunable_weights
        from sparsekit.models import build_model, model_accepts_width

        if not model_accepts_width(config.model):
            raise InputError(f"model {config.model!r} does not take a width multiplier, which small-dense "
                             "needs", where="--method small-dense",
                             fix="use a registry model, or give your py: builder a `width` parameter")
        base = dict(config.model_kwargs)
        base_width = float(base.get("width", 1.0))
        input_shape, num_classes = tuple(data.input_shape), int(data.num_classes)

        def model_at(width: float) -> torch.nn.Module:
            with torch.device("meta"):
                return build_model(config.model, {**base, "width": width}, input_shape=input_shape,
                                   num_classes=num_classes)

        def shapes_at(width: float) -> dict[str, tuple[int, ...]]:
            return {n: tuple(p.shape) for n, p in prunable_weights(
                model_at(width), include_embeddings=bool(getattr(config, "sparse_embeddings", False))).items()}

        full = shapes_at(base_width)
        plans = plan_layers(full, config.sparsity, config.distribution,
                            dense_first_layer=config.dense_first_layer,
                            erk_power_scale=config.erk_power_scale,
                            overrides=config.layer_density or None,
                            score_shapes=gate_block_shapes(model_at(base_width)))
        budget = sum(p.active for p in plans)
        outs = [s[0] for s in full.values()]
        grid = max(outs[:-1] or outs)

        def count(n: int) -> int:
            return sum(math.prod(s) for s in shapes_at(base_width * n / grid).values())

        lo, hi = 0, grid  # largest n in [1, grid] with count(n) <= budget (count grows with n)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if count(mid) <= budget:
                lo = mid
            else:
                hi = mid - 1
        if lo == 0:
            raise InputError(f"even the narrowest {config.model} has more weights than the sparse budget "
                             f"({count(1)} > {budget})", where="--method small-dense",
                             fix="lower --sparsity")
        width = base_width * lo / grid
        params = count(lo)
        info = {"width": width, "params": params, "sparse_active_budget": budget, "gap": budget - params,
                "gap_fraction": (budget - params) / budget,
                "full_width_params": sum(math.prod(s) for s in full.values()),
                "layer_shapes": {n: list(s) for n, s in shapes_at(width).items()},
                "full_layer_shapes": {n: list(s) for n, s in full.items()}}
        self.width_info = info
        return {**base, "width": width}, info

    def mismatched_start_fix(self) -> str:
        width = "" if self.width_info is None else f" (width {self.width_info['width']:g})"
        return (f"small-dense trains a narrower model{width} than the weights fit, so it cannot start from "
                "them; fine-tune them sparse at their size instead (--method static or rigl with --init-from)")

    # Training cost: the default for a dense model, 3·f_D per step of the narrower model trained.
    def training_formula(self) -> str:
        return "3·f_small"

    def dense_reference_shapes(self) -> dict[str, list[int]] | None:
        """Training FLOPs are compared with the full-width dense model, not the narrower one."""
        return None if self.width_info is None else self.width_info["full_layer_shapes"]
