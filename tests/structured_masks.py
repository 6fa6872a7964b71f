"""Structured masks built directly (no training): N:M along the input dimension, RxC blocks, constant
fan-in with optional ablated rows — the geometry of docs/methods.md, "Granularity"."""

from __future__ import annotations

import numpy as np


def nm_mask(shape: tuple[int, ...], n: int, m: int, seed: int = 0) -> np.ndarray:
    """Every group of m consecutive input channels (axis 1) at one (o, *kernel) keeps exactly n, at random."""
    rng = np.random.default_rng(seed)
    moved = (shape[0], *shape[2:], shape[1])           # input channels last
    keys = rng.random((*moved[:-1], shape[1] // m, m))
    ranks = np.argsort(np.argsort(keys, axis=-1), axis=-1)
    grouped = (ranks < n).reshape(moved)
    return np.moveaxis(grouped, -1, 1) if len(shape) > 2 else grouped


def block_mask(shape: tuple[int, ...], r: int, c: int, density: float = 0.25, seed: int = 0) -> np.ndarray:
    """r×c blocks of the 2-D (out, prod(shape[1:])) view, each on with probability ``density`` (at least one)."""
    rng = np.random.default_rng(seed)
    rows, cols = shape[0], int(np.prod(shape[1:]))
    grid = rng.random((rows // r, cols // c)) < density
    grid.flat[0] = True
    return np.kron(grid, np.ones((r, c), bool)).astype(bool).reshape(shape)


def fanin_mask(shape: tuple[int, ...], k: int, ablated: tuple[int, ...] = (), long_rows: tuple[int, ...] = (),
               seed: int = 0) -> np.ndarray:
    """Every row of the 2-D view keeps exactly k (k + 1 in ``long_rows``), rows in ``ablated`` none."""
    rng = np.random.default_rng(seed)
    rows, cols = shape[0], int(np.prod(shape[1:]))
    mask = np.zeros((rows, cols), bool)
    for i in range(rows):
        if i not in ablated:
            mask[i, rng.choice(cols, k + (i in long_rows), replace=False)] = True
    return mask.reshape(shape)


def weights_for(mask: np.ndarray, seed: int = 1) -> np.ndarray:
    """Random float32 weights that are exactly 0 outside ``mask`` (and never 0 inside it)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(mask.shape).astype(np.float32)
    w = np.where(np.abs(w) < 1e-3, np.float32(0.5), w)
    return np.where(mask, w, np.float32(0)).astype(np.float32)
