"""Per-layer densities from a global sparsity: uniform, ER and ERK (docs/methods.md).

The *prunable set* is every weight the distribution sparsifies. Stacked gate matrices (GRU/LSTM
``weight_ih``/``weight_hh``: (G·H, in); attention ``in_proj_weight``: (3·E, E)) are one prunable weight
with one mask, but ER/ERK score them by the shape of *one gate block* (H, in) via ``score_shapes``:
each block is a separate linear map, so it gets the density an equal standalone Linear would get,
instead of the lower density the (G·H)+in over (G·H)·in of the stacked shape would give.

A layer whose solved density would exceed 1 becomes dense and leaves the prunable set; the rest is
re-solved so that the prunable set's active count is exactly ``round((1 - S) * size)``. Integer counts
per layer come from the largest remainder method, so the total is exact and reproducible.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from dataclasses import dataclass

from sparsekit.errors import InputError, close_matches

DISTRIBUTIONS = ("uniform", "er", "erk")


@dataclass(frozen=True)
class LayerPlan:
    """The plan for one candidate weight: whether it is sparsified and how many entries stay active."""

    name: str
    shape: tuple[int, ...]
    prunable: bool
    density: float  # planned density (1.0 for dense layers)
    active: int  # planned active count (numel for dense layers)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _raw_score(shape: tuple[int, ...], kind: str, power_scale: float) -> float:
    """Unnormalised density: ER uses (n_in + n_out)/(n_in * n_out); ERK sums/multiplies all dims."""
    if kind == "er":
        n_out, n_in = shape[0], math.prod(shape[1:]) if len(shape) > 1 else 1
        # For conv kernels ER ignores the kernel dims (Mocanu et al.): use in/out channels only.
        if len(shape) > 2:
            n_in = shape[1]
        return ((n_in + n_out) / (n_in * n_out)) ** power_scale
    return (sum(shape) / math.prod(shape)) ** power_scale


def largest_remainder(ideal: Sequence[float], total: int, caps: Sequence[int]) -> list[int]:
    """Round ``ideal`` to integers summing to ``total`` (each within [0, cap]), largest remainder first.

    Ties in the remainder go to the earlier index, so the result is reproducible.
    """
    floors = [min(math.floor(v + 1e-9), c) for v, c in zip(ideal, caps, strict=True)]
    short = total - sum(floors)
    order = sorted(range(len(ideal)), key=lambda i: (-(ideal[i] - math.floor(ideal[i] + 1e-9)), i))
    i = 0
    while short > 0 and order:
        j = order[i % len(order)]
        if floors[j] < caps[j]:
            floors[j] += 1
            short -= 1
        i += 1
        if i > 4 * len(order) * max(1, short):  # pragma: no cover - cannot happen when total <= sum(caps)
            break
    return floors


def _unit_counts(ideal: Sequence[float], numels: Sequence[int], units: Sequence[int]) -> list[int]:
    """Counts that are whole multiples of each layer's unit: the ideal counts in units, rounded to a total of
    round(sum of ideal units) by the largest remainder. Each layer is within one unit of its ideal."""
    in_units = [v / u for v, u in zip(ideal, units, strict=True)]
    caps = [n // u for n, u in zip(numels, units, strict=True)]
    whole = largest_remainder(in_units, min(round(sum(in_units)), sum(caps)), caps)
    return [w * u for w, u in zip(whole, units, strict=True)]


def _match_overrides(names: Sequence[str], overrides: dict[str, float]) -> dict[str, float]:
    fixed: dict[str, float] = {}
    for pattern, density in overrides.items():
        if not 0.0 <= density <= 1.0:
            raise InputError(f"density override {pattern}={density} is outside [0, 1]", where="--layer-density",
                             fix="give a density (fraction of weights kept) between 0 and 1")
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern) or n == pattern]
        if not hits:
            raise InputError(f"density override pattern {pattern!r} matches no layer", where="--layer-density",
                             fix=close_matches(pattern, list(names)))
        for n in hits:
            fixed[n] = density
    return fixed


def plan_layers(
    shapes: dict[str, tuple[int, ...]],
    sparsity: float,
    distribution: str = "erk",
    *,
    dense_first_layer: bool = True,
    erk_power_scale: float = 1.0,
    overrides: dict[str, float] | None = None,
    score_shapes: dict[str, tuple[int, ...]] | None = None,
    units: dict[str, int] | None = None,
) -> list[LayerPlan]:
    """Plan densities and integer active counts for each candidate weight (in the given order).

    ``shapes`` maps the fully qualified parameter name of each candidate weight (Linear/Conv and
    friends) to its shape, in model order; the first entry is the "first layer". ``score_shapes`` gives
    the shape ER/ERK score a weight by, where it differs from its own (one gate block of a stacked
    matrix); sizes and counts always use the real shape. ``units`` gives a layer's count unit (a structured
    mask granularity: block size, rows for fan-in, groups for N:M; absent or 1: single entries): its count
    is then a whole number of units, by the largest remainder in units (``_unit_counts``).
    """
    score_shapes = score_shapes or {}
    if distribution not in DISTRIBUTIONS:
        raise InputError(f"unknown distribution {distribution!r}", where="--distribution",
                         fix=close_matches(distribution, DISTRIBUTIONS))
    if not (isinstance(sparsity, (int, float)) and 0.0 <= sparsity < 1.0) or math.isnan(sparsity):
        raise InputError(f"sparsity {sparsity!r} is outside [0, 1)", where="--sparsity",
                         fix="give the fraction of prunable weights removed, e.g. 0.9")
    names = list(shapes)
    if not names:
        raise InputError("the model has no prunable weights (no Linear or Conv layers)", where="--model",
                         fix="use a model with Linear/Conv layers")
    fixed = _match_overrides(names, overrides or {})
    dense: set[str] = {n for n, d in fixed.items() if d >= 1.0}
    if distribution == "uniform" and dense_first_layer and names[0] not in fixed:
        dense.add(names[0])
    density: dict[str, float] = {}
    if sparsity == 0.0:
        dense = set(names)
    while True:
        prunable = [n for n in names if n not in dense]
        if not prunable:
            break
        size = sum(math.prod(shapes[n]) for n in prunable)
        budget = (1.0 - sparsity) * size - sum(fixed[n] * math.prod(shapes[n]) for n in prunable if n in fixed)
        free = [n for n in prunable if n not in fixed]
        if not free:
            density.update({n: fixed[n] for n in prunable})
            break
        if distribution == "uniform":
            raw = dict.fromkeys(free, 1.0)
        else:
            raw = {n: _raw_score(tuple(score_shapes.get(n, shapes[n])), distribution, erk_power_scale)
                   for n in free}
        denom = sum(raw[n] * math.prod(shapes[n]) for n in free)
        eps = budget / denom
        if eps < 0:
            raise InputError("the density overrides use more than the whole budget", where="--layer-density",
                             fix="lower the overridden densities or the global sparsity")
        saturated = [n for n in free if eps * raw[n] > 1.0]
        if not saturated:
            density.update({n: eps * raw[n] for n in free})
            density.update({n: fixed[n] for n in prunable if n in fixed})
            break
        # The layer with the highest raw density becomes dense; re-solve the rest without it.
        dense.add(max(saturated, key=lambda n: raw[n]))
    prunable = [n for n in names if n not in dense]
    if units and any(units.get(n, 1) != 1 for n in prunable):
        counts = _unit_counts([density[n] * math.prod(shapes[n]) for n in prunable],
                              [math.prod(shapes[n]) for n in prunable], [units.get(n, 1) for n in prunable])
    else:
        total = round((1.0 - sparsity) * sum(math.prod(shapes[n]) for n in prunable))
        counts = largest_remainder([density[n] * math.prod(shapes[n]) for n in prunable], total,
                                   [math.prod(shapes[n]) for n in prunable])
    active = dict(zip(prunable, counts, strict=True))
    plans = []
    for n in names:
        numel = math.prod(shapes[n])
        if n in dense:
            plans.append(LayerPlan(n, tuple(shapes[n]), False, 1.0, numel))
        else:
            plans.append(LayerPlan(n, tuple(shapes[n]), True, density[n], active[n]))
    return plans
