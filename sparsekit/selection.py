"""Reproducible top-k selection for mask updates (docs/methods.md).

Ordering is total: by score, ties broken by a pseudo-random key derived from (seed, step, layer
index, element index). The key is the splitmix64 finaliser of (element index + a per-(seed, step,
layer) offset): a pure function of those four numbers and a bijection of the index, so keys never
collide and every process of a data-parallel job picks the same connections.

Selection is linear time: a k-th-largest threshold (``numpy.partition`` on CPU, which measured 5-10x
faster than ``torch.topk``/``kthvalue`` here; ``torch.topk`` on GPU), everything above it, and the tied
entries at the threshold ordered by key. Keys are only computed where ties actually occur.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

import numpy as np
import torch

try:  # the C helpers (csrc/sparsekit_select.c); the numpy path below gives the same result without them
    from sparsekit import _select as _c
except ImportError:  # pragma: no cover - only when the package was installed without building extensions
    _c = None

_MASK63 = (1 << 63) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def stream_seed(seed: int, step: int, layer: int, purpose: str) -> int:
    """A 63-bit seed for one (seed, step, layer, purpose) stream; stable across processes and runs."""
    digest = hashlib.blake2b(f"{seed}:{step}:{layer}:{purpose}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _MASK63


def element_keys(seed: int, step: int, layer: int, indices: np.ndarray, purpose: str = "tie") -> np.ndarray:
    """uint64 keys of the given flat element indices (distinct indices give distinct keys)."""
    z = indices.astype(np.uint64) * _GOLDEN + np.uint64(stream_seed(seed, step, layer, purpose))
    z ^= z >> np.uint64(30)
    z *= _M1
    z ^= z >> np.uint64(27)
    z *= _M2
    z ^= z >> np.uint64(31)
    return z


def tie_keys(seed: int, step: int, layer: int, numel: int, purpose: str = "tie") -> torch.Tensor:
    """Keys in [0, 1) for every element index of a layer (float64, CPU): element i gets keys[i].

    Ordering by these floats equals ordering by the exact uint64 keys except in the astronomically
    rare case of two keys sharing their top 53 bits. Also used as SET's random grow score.
    """
    z = element_keys(seed, step, layer, np.arange(numel, dtype=np.uint64), purpose)
    return torch.from_numpy((z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53)))


def kth_largest(values: np.ndarray, k: int, scratch: np.ndarray | None = None) -> float:
    """The k-th largest value (1-based) of a 1-D float array, exactly.

    A strided sample gives a lower bound that keeps at least k elements (checked by counting); the
    exact partition then runs on those few elements only. Falls back to a full partition. ``scratch``
    (float32, at least as long as ``values``) lets the C helper filter without allocating.
    """
    n = values.size
    if n > 16 * k and n > 8192:
        stride = max(1, n // 4096)
        sample = values[::stride]
        rank = min(sample.size, 2 * k // stride + 8)  # ~2x the expected count above the threshold
        bound = np.partition(sample, sample.size - rank)[sample.size - rank]
        if _c is not None and scratch is not None and values.dtype == np.float32:
            kept = scratch[:_c.keep_ge(values, n, float(bound), scratch)]
        else:
            kept = values[values >= bound]
        if kept.size >= k:
            return float(np.partition(kept, kept.size - k)[kept.size - k])
    return float(np.partition(values, n - k)[n - k])


_SCRATCH: dict[int, tuple[np.ndarray, ...]] = {}


def _scratch(n: int) -> tuple[np.ndarray, ...]:
    """Reused work arrays per layer size (fresh megabyte arrays cost page faults on every update)."""
    if n not in _SCRATCH:
        if len(_SCRATCH) > 64:
            _SCRATCH.clear()
        _SCRATCH[n] = (np.empty(n, np.float32), np.empty(n, np.int64), np.empty(n, np.int64),
                       np.empty(n, np.int64), np.empty(n, np.float32))
    return _SCRATCH[n]


def _sampled_bound(vals: np.ndarray, cand: np.ndarray, n_cand: int, k: int, mode: int) -> float | None:
    """A score bound that a little more than k of the candidates reach, from a strided sample of ~4096
    entries (the sample's expected count above the k-th score plus four standard deviations), or None
    when the sample is too small or the bound would keep nearly every candidate."""
    n = cand.size
    stride = max(1, n // 4096)
    sample = vals[::stride][cand[::stride]]
    if sample.size < 64:
        return None
    if mode & 1:
        sample = np.abs(sample)
    if mode & 2:
        sample = -sample
    expected = k * sample.size / n_cand
    rank = int(expected + 4.0 * expected ** 0.5) + 8
    if rank >= sample.size - sample.size // 8:
        return None
    bound = float(np.partition(sample, sample.size - rank)[sample.size - rank])
    return bound if bound > -np.inf else None


def _with_ties(above: np.ndarray, tied: np.ndarray, k: int, seed: int, step: int, layer: int) -> np.ndarray:
    """The ``k`` chosen: everything strictly above the threshold, then the tied entries by key."""
    need = k - above.size
    if need <= 0:
        return above.copy()
    if tied.size > need:
        tied = tied[np.argpartition(element_keys(seed, step, layer, tied), need - 1)[:need]]
    return np.concatenate([above, tied])


def _select_c(vals: np.ndarray, cand: np.ndarray, n_cand: int, k: int, mode: int, seed: int, step: int,
              layer: int) -> np.ndarray:
    """select_top on CPU float32 scores with the C helpers. Usually one pass: keep only the candidates at
    or above a sampled bound (about k of them), then the exact threshold and the above/tied split on
    that short list. If the bound was too high (fewer than k kept), the full path: compact every
    candidate, threshold, split. ``mode``: bit 1 scores are |vals|, bit 2 smallest first."""
    work, index, above, tied, kept = _scratch(cand.size)
    cand8 = cand.view(np.uint8)
    bound = _sampled_bound(vals, cand, n_cand, k, mode)
    m = _c.gather_ge(vals, cand8, mode, bound, work, index) if bound is not None else -1
    if m >= k:
        sel_vals, sel_idx = work[:m], index[:m]
        threshold = float(np.partition(sel_vals, m - k)[m - k])
        return _with_ties(sel_idx[sel_vals > threshold], sel_idx[sel_vals == threshold], k, seed, step, layer)
    m = _c.gather_ge(vals, cand8, mode, -np.inf, work, index)
    threshold = kth_largest(work[:m], k, scratch=kept)
    n_above, n_tied = _c.split(work, index, m, threshold, above, tied)
    return _with_ties(above[:n_above], tied[:n_tied], k, seed, step, layer)


class Magnitude(NamedTuple):
    """Scores given as |values| without materialising them (the C path takes |.| on the fly)."""

    values: torch.Tensor


def select_top(scores: torch.Tensor | Magnitude, candidates: torch.Tensor, k: int, *, largest: bool,
               seed: int, step: int, layer: int) -> torch.Tensor:
    """Flat indices of the ``k`` candidates with the highest (``largest``) or lowest scores.

    ``scores`` and ``candidates`` (bool) are flat tensors of equal length. Ties at the threshold are
    resolved by ascending element key, so the result depends only on (scores, candidates, seed, step,
    layer). NaN scores rank last. ``Magnitude(t)`` scores rank by |t|.
    """
    magnitude = isinstance(scores, Magnitude)
    raw = scores.values if isinstance(scores, Magnitude) else scores
    device = raw.device
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=device)
    cand = candidates.detach().reshape(-1).cpu().numpy()
    n_cand = int(np.count_nonzero(cand))
    if k > n_cand:
        raise ValueError(f"cannot select {k} of {n_cand} candidates")
    vals = raw.detach().reshape(-1)
    if _c is not None and device.type == "cpu" and vals.dtype == torch.float32:
        mode = (1 if magnitude else 0) | (0 if largest else 2)
        chosen = _select_c(vals.contiguous().numpy(), cand, n_cand, k, mode, seed, step, layer)
        return torch.from_numpy(chosen)
    if magnitude:
        vals = vals.abs()
    if 2 * n_cand > cand.size:
        # Most entries compete (growing into a sparse layer): work on the whole array, non-candidates at
        # -inf, and skip building an index of the candidates.
        full = vals.float().cpu().numpy()
        work = np.where(cand, full if largest else -full, np.float32(-np.inf))
        cand_idx = None
    else:  # few candidates (dropping from a sparse layer): gather them first
        cand_idx = np.flatnonzero(cand)
        if device.type == "cpu":
            work = vals.numpy()[cand_idx].astype(np.float32, copy=False)
        else:  # GPU: gather there, threshold on the host (one copy of the candidate scores)
            work = vals[torch.from_numpy(cand_idx).to(device)].float().cpu().numpy()
        work = work if largest else -work
    if np.isnan(work).any():
        work = np.where(np.isnan(work), np.float32(-np.inf), work)  # NaN ranks last
    threshold = kth_largest(work, k)
    # One pass for everything at or above the threshold (about k entries), then split it.
    at_least = work >= threshold
    if cand_idx is None:
        if threshold == -np.inf:  # non-candidates sit at -inf too
            at_least &= cand
        sel = np.flatnonzero(at_least)
        sel_vals = work[sel]
    else:
        sel = cand_idx[at_least]
        sel_vals = work[at_least]
    chosen = _with_ties(sel[sel_vals > threshold], sel[sel_vals == threshold], k, seed, step, layer)
    return torch.from_numpy(chosen.astype(np.int64)).to(device)
