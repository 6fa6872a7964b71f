"""The row-block layout: layers made of R x 1 blocks (the ``block`` kernel).

A layer is *R x 1 blocked* when its output rows fall into groups of R consecutive rows (R dividing
``out_features``) whose rows use the same input columns: the output-channel blocks of *Fast Sparse ConvNets*
and of a ``--granularity 4x1`` run. The panel kernel reads a 64-wide input panel row and a column index for
every nonzero; the block kernel stores each column of a block row once with its R values side by side, and
reads that input row once for all R rows (``csrc/runtime/sk_runtime.h``).

Detection works on what the artifact holds, the nonzeros (a fast artifact stores no mask): a block whose
weights are all zero is simply absent, and a block with a few zero weights inside stays a block as long as
the layout's stored weights (the nonzeros plus the zeros it pads into partly zero blocks) exceed the
nonzeros by at most ``MAX_FILL``. ``row_block`` picks the largest R in ``ROW_BLOCKS`` that meets this.

Layout (``build``): per column block ``c`` (of ``block`` input columns; one block for 0) and block row ``br``
(rows ``R br .. R br + R - 1``), the entries ``bptr[c * nbr + br] .. bptr[c * nbr + br + 1] - 1`` in column
order; entry ``k`` holds column ``indices[k]`` and values ``values[R k .. R k + R - 1]``, one per row of the
block (0 where that row has no weight there).
"""

from __future__ import annotations

import numpy as np

ROW_BLOCKS = (16, 8, 4, 2)  # the block kernel's R, largest first
MAX_FILL = 0.02  # zeros the layout may store, as a fraction of the nonzeros


def _entries(indices: np.ndarray, rowptr: np.ndarray, r: int, block: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Per nonzero its layout entry (after sorting by column block, block row, column); the sort key of each
    entry (c * nbr + br); the entry count."""
    n_out, nnz = rowptr.size - 1, int(rowptr[-1])
    rows = np.repeat(np.arange(n_out, dtype=np.int64), np.diff(rowptr))
    cols = indices[:nnz].astype(np.int64)
    nbr = n_out // r
    key = (cols // block if block else 0) * nbr + rows // r
    order = np.lexsort((cols, key))
    ks, cs = key[order], cols[order]
    new = np.ones(nnz, dtype=bool)
    new[1:] = (ks[1:] != ks[:-1]) | (cs[1:] != cs[:-1])
    entry = np.empty(nnz, dtype=np.int64)
    entry[order] = np.cumsum(new) - 1
    return entry, ks[new], int(new.sum())


def _exact(indices: np.ndarray, rowptr: np.ndarray, r: int) -> bool:
    """Every block row's R rows hold the same columns (O(nnz), no sort)."""
    counts = np.diff(rowptr).reshape(-1, r)
    if np.any(counts != counts[:, :1]):
        return False
    n_out = rowptr.size - 1
    rows = np.repeat(np.arange(n_out, dtype=np.int64), np.diff(rowptr))
    first = rowptr[(rows // r) * r]  # the block's first row's start
    k = np.arange(int(rowptr[-1]), dtype=np.int64)
    return bool(np.array_equal(indices[:k.size], indices[first + k - rowptr[rows]]))


def row_block(indices: np.ndarray, rowptr: np.ndarray) -> int:
    """The largest R in ROW_BLOCKS (dividing the row count) whose layout stores at most (1 + MAX_FILL) x the
    nonzeros; 0 when none does or the layer has no nonzeros."""
    n_out, nnz = rowptr.size - 1, int(rowptr[-1])
    if nnz == 0:
        return 0
    counts = np.diff(rowptr)
    for r in ROW_BLOCKS:
        if n_out % r:
            continue
        # each block row stores at least its longest row: a cheap bound that rejects unstructured layers
        if int(counts.reshape(-1, r).max(axis=1).sum()) * r > nnz * (1 + MAX_FILL):
            continue
        if _exact(indices, rowptr, r) or _entries(indices, rowptr, r, 0)[2] * r <= nnz * (1 + MAX_FILL):
            return r
    return 0


def build(values: np.ndarray, indices: np.ndarray, rowptr: np.ndarray, n_in: int, r: int, block: int, pad: int,
          alloc) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(values, indices, block pointers, column blocks) of the layout with R = ``r`` and column blocks of
    ``block`` inputs (0: one block); ``pad`` spare elements after the values and indices (the kernels' vector
    tails); ``alloc(n, dtype)`` makes the zeroed aligned arrays."""
    n_out, nnz = rowptr.size - 1, int(rowptr[-1])
    nb = -(-n_in // block) if block else 1
    nbr = n_out // r
    entry, keys, n = _entries(indices, rowptr, r, block)
    rows = np.repeat(np.arange(n_out, dtype=np.int64), np.diff(rowptr))
    bv = alloc(n * r + pad, np.float32)
    bv[entry * r + rows % r] = values[:nnz]
    bi = alloc(n + pad, indices.dtype)
    bi[entry] = indices[:nnz]
    bptr = np.zeros(nb * nbr + 1, dtype=np.int64)
    np.cumsum(np.bincount(keys, minlength=nb * nbr), out=bptr[1:])
    return bv, bi, bptr, nb
