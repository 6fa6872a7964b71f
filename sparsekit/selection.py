"""Reproducible top-k selection for mask updates (DESIGN.md §3, step 3).

Ordering is total: by score, ties broken by a pseudo-random key derived from (seed, step, layer
index, element index). The key is a pure function of those four numbers, so every process of a
data-parallel job picks the same connections. Selection uses ``torch.kthvalue``-style thresholds
(linear time) instead of a full sort; keys are only generated where ties actually occur.
"""

from __future__ import annotations

import hashlib

import torch

_MASK64 = (1 << 63) - 1


def stream_seed(seed: int, step: int, layer: int, purpose: str) -> int:
    """A 63-bit seed for one (seed, step, layer, purpose) stream; stable across processes and runs."""
    digest = hashlib.blake2b(f"{seed}:{step}:{layer}:{purpose}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _MASK64


def tie_keys(seed: int, step: int, layer: int, numel: int, purpose: str = "tie") -> torch.Tensor:
    """Keys in [0, 1) for every element index of a layer (CPU, float64): element i gets keys[i]."""
    gen = torch.Generator().manual_seed(stream_seed(seed, step, layer, purpose))
    return torch.rand(numel, generator=gen, dtype=torch.float64)


def select_top(scores: torch.Tensor, candidates: torch.Tensor, k: int, *, largest: bool,
               seed: int, step: int, layer: int) -> torch.Tensor:
    """Indices (flat) of the ``k`` candidates with the highest (``largest``) or lowest scores.

    ``scores`` and ``candidates`` (bool) are flat tensors of equal length. Ties at the threshold are
    resolved by ascending tie key, so the result depends only on (scores, candidates, seed, step, layer).
    """
    n_cand = int(candidates.sum())
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=scores.device)
    if k > n_cand:
        raise ValueError(f"cannot select {k} of {n_cand} candidates")
    cand_idx = torch.nonzero(candidates, as_tuple=True)[0]
    vals = scores[cand_idx].to(torch.float64)
    if not largest:
        vals = -vals
    # Threshold = the k-th largest value; everything strictly above it is in, ties at it compete by key.
    threshold = torch.topk(vals, k, largest=True, sorted=False).values.min()
    above = vals > threshold
    n_above = int(above.sum())
    chosen = cand_idx[above]
    need = k - n_above
    if need > 0:
        tied = cand_idx[vals == threshold]
        keys = tie_keys(seed, step, layer, scores.numel())[tied.cpu()].to(tied.device)
        order = torch.topk(keys, need, largest=False, sorted=True).indices
        chosen = torch.cat([chosen, tied[order]])
    return chosen
