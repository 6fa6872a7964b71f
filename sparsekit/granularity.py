"""Mask granularity: which entries of a weight go on and off together (docs/methods.md#granularity).

- ``unstructured``: every entry on its own (the default; the engine's own fast path, not this module).
- ``N:M``: groups of M consecutive *inputs* (Linear: M columns of one row; Conv (O, I, kh, kw): M input
  channels at one (o, kh, kw)); every group keeps exactly N.
- ``RxC``: blocks of R output rows × C consecutive columns of the weight viewed as (out, prod(shape[1:]));
  a block is all on or all off.
- ``fanin``: every output row keeps the same number K of inputs (SRigL). ``fanin+ablate[=γ]`` also
  switches off rows whose salient count falls below γ·K at an update; their budget goes to the others
  (rows then hold K or K+1, the layer's active count is unchanged).

A layer's mask is seen as a (groups, group size) matrix (``Granularity.grouped``): blocks are groups of
R·C, N:M groups of M, fan-in groups are rows. Scores aggregate per block by their sum; N:M and fan-in
select per group (``top_per_group``), ties broken by the (seed, step, layer, element) keys of
``sparsekit.selection``, or the block index for blocks.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sparsekit.errors import InputError
from sparsekit.selection import Magnitude, element_keys, select_top

KINDS = ("unstructured", "nm", "block", "fanin")
FORMS = "unstructured | N:M (e.g. 2:4, input dim) | RxC blocks (e.g. 4x1, 1x4, 16x1) | fanin | fanin+ablate[=γ]"
DEFAULT_GAMMA = 0.3
_FIX = "use unstructured, N:M such as 2:4, RxC such as 4x1, fanin or fanin+ablate (fanin+ablate=0.3)"
_NEG = -np.finfo(np.float64).max  # a candidate's NaN / -inf score: ranks after every real score, before non-candidates


@dataclass(frozen=True)
class Granularity:
    """One mask granularity. Build it with ``Granularity.parse(spec)``; ``spec`` gives it back canonically."""

    kind: str = "unstructured"
    n: int = 0  # N:M
    m: int = 0
    rows: int = 1  # RxC
    cols: int = 1
    ablate: float | None = None  # fanin+ablate: saliency threshold γ

    @classmethod
    def parse(cls, spec: str | Granularity | None) -> Granularity:
        """``unstructured``, ``N:M``, ``RxC``, ``fanin``, ``fanin+ablate`` or ``fanin+ablate=γ``."""
        if isinstance(spec, Granularity):
            return spec
        text = "unstructured" if spec is None else str(spec).strip().lower()
        bad = InputError(f"unknown granularity {spec!r}", where="--granularity", fix=_FIX)
        if text == "unstructured":
            return cls()
        if text == "fanin":
            return cls("fanin")
        if (hit := re.fullmatch(r"fanin\+ablate(?:=([0-9.eE+-]+))?", text)) is not None:
            try:
                gamma = DEFAULT_GAMMA if hit.group(1) is None else float(hit.group(1))
            except ValueError:
                raise bad from None
            if not 0.0 < gamma < 1.0:
                raise InputError(f"neuron ablation threshold {gamma:g} is outside (0, 1)", where="--granularity",
                                 fix="give the saliency threshold γ as a fraction, e.g. fanin+ablate=0.3")
            return cls("fanin", ablate=gamma)
        if (hit := re.fullmatch(r"(\d+):(\d+)", text)) is not None:
            n, m = int(hit.group(1)), int(hit.group(2))
            if not 0 < n < m:
                raise InputError(f"granularity {spec!r} needs 0 < N < M", where="--granularity",
                                 fix="e.g. 2:4 (two of every four inputs kept), 1:4 or 4:8")
            return cls("nm", n=n, m=m)
        if (hit := re.fullmatch(r"(\d+)x(\d+)", text)) is not None:
            r, c = int(hit.group(1)), int(hit.group(2))
            if r < 1 or c < 1 or r * c == 1:
                raise InputError(f"block {spec!r} needs R, C >= 1 and more than one entry", where="--granularity",
                                 fix="e.g. 4x1 (4 output rows × 1 input), 1x4 or 16x1; 1x1 is unstructured")
            return cls("block", rows=r, cols=c)
        raise bad

    @property
    def spec(self) -> str:
        if self.kind == "nm":
            return f"{self.n}:{self.m}"
        if self.kind == "block":
            return f"{self.rows}x{self.cols}"
        if self.kind == "fanin":
            return "fanin" if self.ablate is None else f"fanin+ablate={self.ablate:g}"
        return "unstructured"

    @property
    def structured(self) -> bool:
        return self.kind != "unstructured"

    @property
    def fixed_count(self) -> bool:
        """N:M and fan-in: a fixed number of active entries per group (regrown per group at an update)."""
        return self.kind in ("nm", "fanin")

    # -- geometry -----------------------------------------------------------------------------------
    def misfit(self, shape: tuple[int, ...]) -> str | None:
        """Why a weight of ``shape`` cannot take this granularity, or None when it can."""
        if not self.structured:
            return None
        if len(shape) < 2:
            return "it is not a matrix"
        cols = math.prod(shape[1:])
        if self.kind == "nm" and shape[1] % self.m:
            return f"its input dimension {shape[1]} is not a multiple of {self.m}"
        if self.kind == "block" and (shape[0] % self.rows or cols % self.cols):
            return (f"its {shape[0]} output rows × {cols} columns do not divide into "
                    f"{self.rows}x{self.cols} blocks")
        return None

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        """Refuse a prunable weight whose shape does not fit, naming the layer and the fix."""
        why = self.misfit(tuple(shape))
        if why is not None:
            raise InputError(f"layer {name} of shape {tuple(shape)} cannot be {self.spec}: {why}",
                             where="--granularity",
                             fix=f"keep it dense with --layer-density {name}=1 (exclude=[{name!r}] in sparsify()), "
                                 "or choose a granularity that fits its shape")

    def unit(self, shape: tuple[int, ...]) -> int:
        """Active counts of a layer are multiples of this: the block size, the number of N:M groups (N per
        group), the number of rows (K per row); 1 when unstructured or when the shape does not fit."""
        if not self.structured or self.misfit(tuple(shape)) is not None:
            return 1
        if self.kind == "block":
            return self.rows * self.cols
        if self.kind == "nm":
            return math.prod(shape) // self.m
        return int(shape[0])

    def group_size(self, shape: tuple[int, ...]) -> int:
        if self.kind == "nm":
            return self.m
        if self.kind == "block":
            return self.rows * self.cols
        return math.prod(shape[1:]) if len(shape) > 1 else 1

    def n_groups(self, shape: tuple[int, ...]) -> int:
        return math.prod(shape) // self.group_size(shape)

    def grouped(self, t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """A tensor of the layer (any shape with the layer's numel) as (groups, group size)."""
        out, cols = shape[0], math.prod(shape[1:])
        if self.kind == "nm":
            rest = math.prod(shape[2:])
            v = t.reshape(out, shape[1] // self.m, self.m, rest)
            return v.permute(0, 1, 3, 2).reshape(-1, self.m) if rest > 1 else v.reshape(-1, self.m)
        if self.kind == "block":
            v = t.reshape(out // self.rows, self.rows, cols // self.cols, self.cols)
            return v.permute(0, 2, 1, 3).reshape(-1, self.rows * self.cols)
        return t.reshape(out, cols)

    def ungrouped(self, g: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """The inverse of ``grouped``: back to a flat tensor in the layer's memory order."""
        out, cols = shape[0], math.prod(shape[1:])
        if self.kind == "nm":
            rest = math.prod(shape[2:])
            v = g.reshape(out, shape[1] // self.m, rest, self.m)
            return v.permute(0, 1, 3, 2).reshape(-1) if rest > 1 else v.reshape(-1)
        if self.kind == "block":
            v = g.reshape(out // self.rows, cols // self.cols, self.rows, self.cols)
            return v.permute(0, 2, 1, 3).reshape(-1)
        return g.reshape(-1)

    def group_counts(self, mask: torch.Tensor) -> torch.Tensor:
        """Active entries per group (int64, CPU)."""
        shape = tuple(mask.shape)
        return self.grouped(mask.detach().cpu(), shape).sum(dim=1)

    def conforms(self, mask: torch.Tensor, *, any_count: bool = False) -> bool:
        """Whether ``mask`` has this granularity's pattern exactly. ``any_count``: N:M groups may all hold
        the same n other than N (gradual pruning's n_t:M on its way to N:M, or dense)."""
        if not self.structured:
            return True
        if self.misfit(tuple(mask.shape)) is not None:
            return False
        counts = self.group_counts(mask)
        if self.kind == "block":
            return bool(((counts == 0) | (counts == self.group_size(tuple(mask.shape)))).all())
        if self.kind == "nm":
            return bool((counts == (counts[0] if any_count else self.n)).all())
        alive = counts[counts > 0]
        if self.ablate is None:
            return bool((counts == counts[0]).all())
        return alive.numel() == 0 or int(alive.max()) - int(alive.min()) <= 1

    def summary(self, mask: torch.Tensor) -> dict[str, int]:
        """``groups`` and ``active_groups`` (blocks on, N:M groups with an active entry, rows alive)."""
        counts = self.group_counts(mask)
        return {"groups": int(counts.numel()), "active_groups": int((counts > 0).sum())}


# -- selection ------------------------------------------------------------------------------------------
def score_values(scores: torch.Tensor | Magnitude) -> torch.Tensor:
    """Flat float64 CPU scores (|values| for ``Magnitude``)."""
    if isinstance(scores, Magnitude):
        return scores.values.detach().reshape(-1).abs().to(device="cpu", dtype=torch.float64)
    return scores.detach().reshape(-1).to(device="cpu", dtype=torch.float64)


def block_sums(gran: Granularity, shape: tuple[int, ...], scores: torch.Tensor | Magnitude) -> torch.Tensor:
    """Per-block sums of the element scores (float64; NaN blocks rank last in ``select_top``)."""
    return gran.grouped(score_values(scores), shape).sum(dim=1)


def top_per_group(scores: np.ndarray, candidates: np.ndarray, keys: np.ndarray, need: np.ndarray) -> np.ndarray:
    """In every row of (groups, size) ``scores``, the ``need[row]`` highest-scoring candidates (bool, same
    shape). Ties go to the smaller key; NaN ranks last among candidates; non-candidates are never chosen
    while ``need[row]`` does not exceed the row's candidates. Two stable sorts, no loop over groups."""
    s = np.where(np.isnan(scores) | (scores == -np.inf), _NEG, scores)
    s = np.where(candidates, s, -np.inf)
    by_key = np.argsort(keys, axis=1, kind="stable")
    ranked = np.take_along_axis(by_key, np.argsort(-np.take_along_axis(s, by_key, axis=1), axis=1,
                                                   kind="stable"), axis=1)
    chosen = np.zeros(scores.shape, dtype=bool)
    take = np.arange(scores.shape[1])[None, :] < need[:, None]
    np.put_along_axis(chosen, ranked, take, axis=1)
    return chosen & candidates


def fill_groups(gran: Granularity, mask: torch.Tensor, target: torch.Tensor, *, drop: torch.Tensor | Magnitude | None,
                grow: torch.Tensor | Magnitude | None, seed: int, step: int, layer: int) -> torch.Tensor:
    """``mask`` (layer-shaped bool) changed so that group g holds exactly ``target[g]`` active entries: a
    group above its target drops its lowest ``drop`` scores, one below grows its highest ``grow`` scores
    among its inactive. Only the groups that change are touched. Returns a new CPU mask, layer-shaped."""
    shape = tuple(mask.shape)
    g_mask = gran.grouped(mask.detach().cpu(), shape).clone()
    delta = target.to(torch.int64) - g_mask.sum(dim=1)
    for sign, scores in ((-1, drop), (1, grow)):
        rows = torch.nonzero(delta * sign > 0).reshape(-1)
        if rows.numel() == 0:
            continue
        if scores is None:
            raise ValueError("fill_groups needs scores for the direction it changes")
        vals = gran.grouped(score_values(scores), shape)[rows].numpy()
        index = gran.grouped(torch.arange(math.prod(shape)), shape)[rows].numpy()
        cand = g_mask[rows].numpy() if sign < 0 else ~g_mask[rows].numpy()
        keys = element_keys(seed, step, layer, index)
        chosen = top_per_group(-vals if sign < 0 else vals, cand, keys, (delta[rows] * sign).numpy())
        g_mask[rows] = torch.from_numpy(cand & ~chosen if sign < 0 else ~cand | chosen)
    return gran.ungrouped(g_mask, shape).reshape(shape)


def structured_top(gran: Granularity, shape: tuple[int, ...], scores: torch.Tensor | Magnitude, active: int, *,
                   seed: int, step: int, layer: int) -> torch.Tensor:
    """A CPU mask of ``active`` entries in the pattern, of the highest scores: the top ``active / block``
    blocks by summed score, or the top ``active / groups`` of every N:M group / row. Initial masks
    (random scores, |w|) and SNIP (saliency) are built with it."""
    unit = gran.unit(shape)
    if active % unit:
        raise ValueError(f"{active} active entries are not a whole number of {gran.spec} units ({unit})")
    if gran.kind == "block":
        sums = block_sums(gran, shape, scores)
        on = torch.zeros(sums.numel(), dtype=torch.bool)
        on[select_top(sums, torch.ones_like(on), active // unit, largest=True, seed=seed, step=step,
                      layer=layer)] = True
        return gran.ungrouped(on[:, None].expand(-1, unit), shape).reshape(shape)
    empty = torch.zeros(shape, dtype=torch.bool)
    per_group = active // gran.n_groups(shape)
    return fill_groups(gran, empty, torch.full((gran.n_groups(shape),), per_group), drop=None, grow=scores,
                       seed=seed, step=step, layer=layer)


def random_scores(numel: int, *, seed: int, layer: int) -> torch.Tensor:
    """Uniform random scores of a layer's entries from (seed, layer): the random initial mask's ranking."""
    from sparsekit.selection import tie_keys

    return tie_keys(seed, 0, layer, numel, purpose="init-mask")


def drop_and_grow(gran: Granularity, mask: torch.Tensor, *, k_drop: int, k_grow: int,
                  drop: torch.Tensor | Magnitude | None, grow: torch.Tensor | Magnitude | None,
                  seed: int, step: int, layer: int) -> torch.Tensor:
    """One layer's structured update (counts in entries, as methods give them); a new layer-shaped CPU mask.

    Blocks: drop ``k_drop // block`` active blocks of lowest summed drop score, grow ``k_grow // block``
    of the highest summed grow score among inactive blocks. N:M / fan-in: with equal counts, drop the
    ``k_drop`` lowest active entries of the layer, then regrow in every group exactly what it lost;
    with ``k_grow == 0`` (pruning), every active group drops the same share."""
    shape = tuple(mask.shape)
    cpu = mask.detach().cpu()
    if gran.kind == "block":
        return _blocks_drop_and_grow(gran, cpu, k_drop // gran.unit(shape), k_grow // gran.unit(shape),
                                     drop, grow, seed=seed, step=step, layer=layer)
    counts = gran.group_counts(cpu)
    if k_grow == 0:
        alive = int((counts > 0).sum())
        if alive == 0 or k_drop % alive:
            raise ValueError(f"cannot drop {k_drop} entries evenly from {alive} {gran.spec} groups")
        target = torch.where(counts > 0, counts - k_drop // alive, counts)
        return fill_groups(gran, cpu, target, drop=drop, grow=None, seed=seed, step=step, layer=layer)
    if k_drop != k_grow:
        raise ValueError(f"{gran.spec} keeps every group's count: an update must drop as many as it grows "
                         f"(got {k_drop} and {k_grow})")
    new = cpu.reshape(-1).clone()
    assert drop is not None
    new[select_top(drop, cpu.reshape(-1), k_drop, largest=False, seed=seed, step=step, layer=layer).cpu()] = False
    return fill_groups(gran, new.reshape(shape), counts, drop=drop, grow=grow, seed=seed, step=step, layer=layer)


def _blocks_drop_and_grow(gran: Granularity, mask: torch.Tensor, kd: int, kg: int,
                          drop: torch.Tensor | Magnitude | None, grow: torch.Tensor | Magnitude | None,
                          *, seed: int, step: int, layer: int) -> torch.Tensor:
    shape = tuple(mask.shape)
    on = gran.grouped(mask, shape).all(dim=1)
    if kd > 0:
        assert drop is not None
        on[select_top(block_sums(gran, shape, drop), on, kd, largest=False, seed=seed, step=step,
                      layer=layer)] = False
    if kg > 0:
        assert grow is not None
        on[select_top(block_sums(gran, shape, grow), ~on, kg, largest=True, seed=seed, step=step,
                      layer=layer)] = True
    return gran.ungrouped(on[:, None].expand(-1, gran.group_size(shape)), shape).reshape(shape)


def describe(spec: Any) -> str:
    """The canonical spelling of a granularity given as text (for messages and summaries)."""
    return Granularity.parse(spec).spec


def implied_density(gran: Granularity, sparsity: float | None, distribution: str | None) -> tuple[float, str]:
    """(sparsity, distribution) of a run: N:M implies 1 − N/M and uniform and refuses others given
    explicitly; otherwise None means the defaults (0.9, erk)."""
    if gran.kind != "nm":
        return (0.9 if sparsity is None else sparsity), ("erk" if distribution is None else distribution)
    implied = 1.0 - gran.n / gran.m
    if sparsity is not None and abs(float(sparsity) - implied) > 1e-9:
        raise InputError(f"sparsity {sparsity:g} disagrees with granularity {gran.spec}, which fixes every sparse "
                         f"layer's density at {gran.n}/{gran.m}", where="--sparsity",
                         fix=f"drop --sparsity (it is implied) or give --sparsity {implied:g}")
    if distribution is not None and distribution != "uniform":
        raise InputError(f"distribution {distribution!r} does not apply to granularity {gran.spec}, which fixes "
                         f"every sparse layer's density at {gran.n}/{gran.m}", where="--distribution",
                         fix="drop --distribution (uniform is implied)")
    return implied, "uniform"


def check_method(gran: Granularity, method: Any, options: dict[str, Any]) -> None:
    """Refuse a granularity a method cannot keep (``method`` is the Method class or instance)."""
    if not gran.structured:
        return
    name = method.name
    if not method.sparse:
        raise InputError(f"method {name!r} trains a dense model, so granularity {gran.spec} does not apply",
                         where="--granularity",
                         fix="drop --granularity, or use rigl, set, snfs, snip, static or pruning")
    if options.get("redistribute"):
        raise InputError(f"SNFS redistribution moves single connections between layers, which a {gran.spec} mask "
                         "cannot follow", where="--redistribute", fix="use --no-redistribute with --granularity")
    if options.get("snip_scope") == "global":
        raise InputError(f"--snip-scope global ranks single connections across layers; granularity {gran.spec} "
                         "selects per layer", where="--snip-scope", fix="use --snip-scope layer with --granularity")
    if gran.ablate is not None and method.family != "dynamic":
        raise InputError(f"neuron ablation happens at the mask updates of rigl, set and snfs; {name!r} has none",
                         where="--granularity", fix=f"use fanin (without +ablate) with {name}")


# -- neuron ablation (fanin+ablate) ------------------------------------------------------------------------
def salient_counts(gran: Granularity, mask: torch.Tensor, k: int, drop: torch.Tensor | Magnitude,
                   grow: torch.Tensor | Magnitude, *, seed: int, step: int, layer: int) -> torch.Tensor:
    """Per row, how many of its entries the *unstructured* update would keep: the active entries except the
    ``k`` of lowest drop score in the layer, plus the ``k`` inactive ones of highest grow score (SRigL)."""
    flat = mask.detach().reshape(-1).cpu()
    kept = flat.clone()
    kept[select_top(drop, flat, k, largest=False, seed=seed, step=step, layer=layer).cpu()] = False
    salient = kept.clone()
    salient[select_top(grow, ~kept, k, largest=True, seed=seed, step=step, layer=layer).cpu()] = True
    return gran.group_counts(salient.reshape(mask.shape))


def ablate_rows(gran: Granularity, mask: torch.Tensor, k: int, drop: torch.Tensor | Magnitude,
                grow: torch.Tensor | Magnitude, *, seed: int, step: int,
                layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SRigL's neuron ablation at one update: rows alive whose salient count is below γ·K (K = active //
    rows alive) are switched off for good (never so many that the rest cannot hold the layer's active
    count). Returns the mask without them and every row's target: active // alive rows, the remainder
    rows (highest salient count first) one more, ablated rows 0 — the layer's active count is unchanged."""
    assert gran.ablate is not None
    keys = {"seed": seed, "step": step, "layer": layer}
    counts = gran.group_counts(mask)
    alive = counts > 0
    active, cols = int(counts.sum()), gran.group_size(tuple(mask.shape))
    if active == 0:
        return mask, counts
    salient = salient_counts(gran, mask, k, drop, grow, **keys).to(torch.float32)
    weak = alive & (salient < gran.ablate * (active // int(alive.sum())))
    n_off = min(int(weak.sum()), int(alive.sum()) - math.ceil(active / cols))
    if n_off > 0:
        alive[select_top(salient, weak, n_off, largest=False, **keys).cpu()] = False
    n_alive = int(alive.sum())
    target = torch.where(alive, active // n_alive, 0)
    target[select_top(salient, alive, active % n_alive, largest=True, **keys).cpu()] += 1
    kept = gran.ungrouped(gran.grouped(mask.detach().cpu(), tuple(mask.shape)) & alive[:, None], tuple(mask.shape))
    return kept.reshape(mask.shape), target


def drop_to_targets(gran: Granularity, mask: torch.Tensor, target: torch.Tensor, k: int,
                    drop: torch.Tensor | Magnitude, grow: torch.Tensor | Magnitude, *, seed: int, step: int,
                    layer: int) -> torch.Tensor:
    """Drop the ``k`` lowest active entries of the layer, then bring every row to its ``target`` (growing the
    highest grow scores, or dropping more where a row's target fell)."""
    flat = mask.detach().reshape(-1).cpu().clone()
    k = min(k, int(flat.sum()))
    flat[select_top(drop, flat.clone(), k, largest=False, seed=seed, step=step, layer=layer).cpu()] = False
    return fill_groups(gran, flat.reshape(mask.shape), target, drop=drop, grow=grow, seed=seed, step=step,
                       layer=layer)


def method_granularities(method: Any) -> list[str]:
    """The granularity forms a method (class) takes, for ``sparsekit methods``."""
    if not method.sparse:
        return ["unstructured"]
    forms = ["unstructured", "N:M", "RxC", "fanin"]
    return [*forms, "fanin+ablate"] if method.family == "dynamic" else forms
