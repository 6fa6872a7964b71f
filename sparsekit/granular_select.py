"""Selection under a granularity (``sparsekit.granularity``): structured start masks, the drop-and-grow of
an update, and SRigL's neuron ablation (docs/methods.md#granularity).

A layer's mask is seen as a (groups, group size) matrix (``Granularity.grouped``): blocks are groups of
R·C, N:M groups of M, fan-in groups are rows. Scores aggregate per block by their sum; N:M and fan-in
select per group (``top_per_group``), ties broken by the (seed, step, layer, element) keys of
``sparsekit.selection``, or the block index for blocks.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from sparsekit.granularity import Granularity
from sparsekit.selection import Magnitude, element_keys, select_top

_NEG = -np.finfo(np.float64).max  # a candidate's NaN / -inf score: ranks after every real score, before non-candidates


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
