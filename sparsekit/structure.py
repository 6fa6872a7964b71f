"""Which structure a mask has, read from the mask (or a weight's zero pattern) alone.

Pure functions over one mask — a bool or float array (numpy or torch; a float counts its nonzeros) —
for exporters, kernels and reports; nothing here knows how the mask was trained. The geometry is the
one training uses (docs/methods.md, "Granularity"):

- ``N:M`` runs along the *input* dimension: a Linear ``(out, in)`` has groups of M consecutive inputs
  of one row; a Conv ``(O, I, kh, kw)`` has groups of M consecutive input channels at one ``(o, kh, kw)``.
  A mask is N:M when every group keeps exactly N (0 < N < M).
- ``RxC`` blocks tile the weight viewed as a 2-D ``(out, prod(shape[1:]))`` matrix in memory order; a
  mask is RxC when every block is all on or all off.
- constant fan-in: every output row keeps K; with neuron ablation a row may be off (0) and the others
  keep K or K + 1 (the ablated rows' budget moved to them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

NM_GROUP_SIZES = (2, 4, 8, 16, 32)  # the M that detection tries, smallest first
BLOCK_CANDIDATES = ((16, 1), (8, 1), (4, 1), (2, 1), (1, 4), (1, 2), (2, 2), (4, 4))


@dataclass(frozen=True)
class NM:
    n: int
    m: int

    @property
    def spec(self) -> str:
        return f"{self.n}:{self.m}"


@dataclass(frozen=True)
class Block:
    r: int
    c: int

    @property
    def spec(self) -> str:
        return f"{self.r}x{self.c}"


@dataclass(frozen=True)
class FanIn:
    k: int                      # the smallest active count of a row that is not ablated
    ablated: tuple[int, ...]    # rows with no active entry
    long_rows: int              # rows with K + 1 (only after ablation moved budget)

    @property
    def constant(self) -> bool:
        """Every row keeps exactly K (no ablated row, no row with K + 1)."""
        return not self.ablated and not self.long_rows


def as_mask(x: Any) -> np.ndarray:
    """A bool numpy array: a bool mask as is, a float weight's nonzeros."""
    if hasattr(x, "detach"):  # a torch tensor, without importing torch
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    return a if a.dtype == np.bool_ else a != 0


def matrix(x: Any) -> np.ndarray:
    """The mask as the 2-D ``(out, prod(shape[1:]))`` matrix of its memory order."""
    a = as_mask(x)
    if a.ndim < 2:
        raise ValueError(f"a weight mask has at least 2 dimensions, got shape {a.shape}")
    return a.reshape(a.shape[0], -1)


# --------------------------------------------------------------------------- N:M

def nm_order(shape: tuple[int, ...]) -> np.ndarray:
    """Linear (memory-order) index of each entry in group order: rows ``(o, *kernel)``, then input
    channels, so that every M consecutive entries form one N:M group."""
    idx = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)
    return np.moveaxis(idx, 1, -1).reshape(-1) if len(shape) > 2 else idx.reshape(-1)


def nm_groups(x: Any, m: int) -> np.ndarray | None:
    """The mask as ``(groups, m)`` in group order, or None when the input dimension is not a multiple of m."""
    a = as_mask(x)
    if a.ndim < 2 or m < 1 or a.shape[1] % m:
        return None
    return (np.moveaxis(a, 1, -1) if a.ndim > 2 else a).reshape(-1, m)


def is_nm(x: Any, n: int, m: int) -> bool:
    """Every group of m consecutive inputs keeps exactly n."""
    groups = nm_groups(x, m)
    return groups is not None and 0 < n < m and groups.size > 0 and bool(np.all(groups.sum(1) == n))


def detect_nm(x: Any, sizes: tuple[int, ...] = NM_GROUP_SIZES) -> NM | None:
    """The N:M pattern with the smallest M among ``sizes`` that the mask has, or None."""
    for m in sizes:
        groups = nm_groups(x, m)
        if groups is None or groups.size == 0:
            continue
        counts = groups.sum(1)
        n = int(counts[0])
        if 0 < n < m and np.all(counts == n):
            return NM(n, m)
    return None


# --------------------------------------------------------------------------- blocks

def block_grid(x: Any, r: int, c: int) -> np.ndarray | None:
    """Which r×c blocks are on, ``(out/r, cols/c)`` bool; None when the shape does not tile or a block
    is partly on."""
    a = matrix(x)
    rows, cols = a.shape
    if r < 1 or c < 1 or rows % r or cols % c:
        return None
    counts = a.reshape(rows // r, r, cols // c, c).sum(axis=(1, 3))
    if np.any((counts != 0) & (counts != r * c)):
        return None
    return counts != 0


def is_block(x: Any, r: int, c: int) -> bool:
    return block_grid(x, r, c) is not None


def detect_block(x: Any, candidates: tuple[tuple[int, int], ...] = BLOCK_CANDIDATES) -> Block | None:
    """The largest block (by r·c; the earlier candidate on a tie) the mask is made of, or None."""
    ranked = sorted(candidates, key=lambda rc: -rc[0] * rc[1])  # stable: ties keep the candidates' order
    for r, c in ranked:
        if r * c > 1 and is_block(x, r, c):
            return Block(r, c)
    return None


# --------------------------------------------------------------------------- fan-in

def fanin(x: Any) -> FanIn | None:
    """Constant fan-in: the rows that are not all off keep K or K + 1 (K + 1 only when some row is
    ablated); None otherwise, or when every row is off."""
    counts = matrix(x).sum(1)
    live = counts[counts > 0]
    if live.size == 0:
        return None
    k = int(live.min())
    ablated = tuple(int(i) for i in np.flatnonzero(counts == 0))
    long_rows = int(np.count_nonzero(live == k + 1))
    if np.any(live > k + 1) or (long_rows and not ablated):
        return None
    return FanIn(k, ablated, long_rows)


# --------------------------------------------------------------------------- a declared granularity

def parse_spec(spec: str) -> NM | Block | str:
    """A granularity spec (parsed by ``sparsekit.granularity.Granularity``, the one parser) as this module
    sees it: ``NM``, ``Block``, or ``"unstructured"`` / ``"fanin"`` / ``"fanin+ablate"``; ValueError for
    anything else."""
    from sparsekit.errors import InputError
    from sparsekit.granularity import Granularity

    try:
        g = Granularity.parse(spec)
    except InputError as exc:
        raise ValueError(exc.message) from exc
    if g.kind == "nm":
        return NM(g.n, g.m)
    if g.kind == "block":
        return Block(g.rows, g.cols)
    return g.kind if g.ablate is None else "fanin+ablate"


def conforms(x: Any, spec: str) -> bool:
    """Whether the mask has the declared granularity (``unstructured``: always): the training side's own
    check (``Granularity.conforms``) on this module's inputs."""
    import torch

    from sparsekit.errors import InputError
    from sparsekit.granularity import Granularity

    try:
        g = Granularity.parse(spec)
    except InputError as exc:
        raise ValueError(exc.message) from exc
    mask = torch.from_numpy(np.ascontiguousarray(as_mask(x)))
    return mask.dim() >= 2 and g.conforms(mask) if g.structured else True


def describe(x: Any) -> dict[str, Any]:
    """Every structure detected in one mask (None where absent), for reports."""
    nm, block, fi = detect_nm(x), detect_block(x), fanin(x)
    return {"nm": nm.spec if nm else None, "block": block.spec if block else None,
            "fanin": None if fi is None else {"k": fi.k, "ablated": list(fi.ablated), "long_rows": fi.long_rows}}


def label(x: Any, declared: str = "unstructured") -> str:
    """What one layer's mask is, for titles: the declared granularity when the mask holds it (fan-in with
    its K and ablated rows), ``"<spec> (not held)"`` when it does not (e.g. pruning before its schedule
    ends), ``"unstructured"`` when none was declared."""
    try:
        g = parse_spec(declared)
    except ValueError:
        return str(declared)
    if g == "unstructured":
        return "unstructured"
    spec = g.spec if isinstance(g, NM | Block) else str(declared)
    if not conforms(x, declared):
        return f"{spec} (not held)"
    if isinstance(g, NM | Block):
        return spec
    f = fanin(x)
    return f"fan-in K={f.k}" + (f", {len(f.ablated)} rows ablated" if f.ablated else "")
