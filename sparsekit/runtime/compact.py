"""Exact removal of dead hidden units from an MLP chain (before packing it for the fast runtime).

A hidden unit whose incoming weights are all zero outputs the constant ``act(b_j)``: its effect
``act(b_j) * W_next[:, j]`` is folded into the next layer's bias before the unit goes. A unit whose
outgoing weights are all zero is removed outright. The input features and the outputs are kept (the
sparse kernels ignore unused inputs for free), so the model's signature does not change.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class ChainLayer:
    weight: np.ndarray          # float32 (out, in)
    bias: np.ndarray | None     # float32 (out,)
    relu: bool
    name: str = ""


def _act(b: np.ndarray, relu: bool) -> np.ndarray:
    return np.maximum(b, 0) if relu else b


def compact_chain(layers: list[ChainLayer]) -> tuple[list[ChainLayer], dict[str, int]]:
    """Return the compacted layers and ``{"units_removed": ..., "units_folded": ...}``."""
    layers = [ChainLayer(np.asarray(c.weight, np.float32), None if c.bias is None else
                         np.asarray(c.bias, np.float32), c.relu, c.name) for c in layers]
    removed = folded = 0
    changed = True
    while changed:
        changed = False
        for i in range(len(layers) - 1):
            cur, nxt = layers[i], layers[i + 1]
            w, wn = cur.weight, nxt.weight
            b = cur.bias if cur.bias is not None else np.zeros(w.shape[0], np.float32)
            no_in = ~np.any(w != 0, axis=1)
            no_out = ~np.any(wn != 0, axis=0)
            dead = no_in | no_out
            if not dead.any():
                continue
            fold = no_in & ~no_out
            if fold.any():
                const = _act(b[fold].astype(np.float64), cur.relu)
                extra = wn[:, fold].astype(np.float64) @ const
                if np.any(extra != 0):
                    nb = (nxt.bias if nxt.bias is not None else np.zeros(wn.shape[0], np.float32))
                    nxt.bias = (nb.astype(np.float64) + extra).astype(np.float32)
                folded += int(fold.sum())
            keep = ~dead
            cur.weight = np.ascontiguousarray(w[keep])
            cur.bias = None if cur.bias is None else np.ascontiguousarray(cur.bias[keep])
            nxt.weight = np.ascontiguousarray(wn[:, keep])
            removed += int(dead.sum())
            changed = True
    return layers, {"units_removed": removed, "units_folded": folded}
