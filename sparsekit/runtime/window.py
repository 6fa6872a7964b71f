"""The window layout: the rows kernel's sliced layout without gathers (the ``window`` kernel).

The gather form of the sliced layout (``CsrLayer.sliced``) feeds each slot of a 16-row slice with a 16-lane
gather of the input. Gathers are microcoded on some CPUs (AMD Zen 4 and Zen 5: a 16-lane gather costs
about as much as 16 scalar loads), which held batch-1 speed there to a fifth of Intel's. The window form
cuts the input into windows of ``width`` consecutive features (32 for AVX-512, 16 for AVX2): each slot of a
slice draws all 16 of its inputs from one window, which the kernel holds in registers and indexes with a
permute. A slice therefore stores, per window, as many slots as its busiest row has nonzeros in that
window (rows with fewer are padded with value 0, index 0); slots are ordered by window.

Rows stay in natural order (slice ``s`` holds rows ``16 s .. 16 s + 15``): the kernel stores its 16 outputs
contiguously instead of scattering them. The last window starts at ``n_in - width`` so that every window
lies inside the input (a layer narrower than one window cannot use this layout: see ``fits``).
"""

from __future__ import annotations

import numpy as np

SLICE = 16
MAX_WIDTH = 256  # in-window indices are 8-bit


def fits(n_in: int, width: int) -> bool:
    """Whether a layer with ``n_in`` inputs has a window layout of this width."""
    return 0 < width <= min(n_in, MAX_WIDTH)


def window_starts(n_in: int, width: int) -> np.ndarray:
    """First input feature of each window: multiples of ``width``, the last moved back to end at ``n_in``."""
    nw = -(-n_in // width)
    return np.minimum(np.arange(nw, dtype=np.int64) * width, n_in - width)


def _groups(indices: np.ndarray, rowptr: np.ndarray, n_in: int, width: int):
    """Per nonzero: its row, window and rank among its row's nonzeros in that window; and the slots each
    (slice, window) pair needs (its busiest row's count), flattened slice-major."""
    n_out, nnz = rowptr.size - 1, int(rowptr[-1])
    nw = -(-n_in // width)
    nsl = -(-n_out // SLICE)
    rows = np.repeat(np.arange(n_out, dtype=np.int64), np.diff(rowptr))
    win = indices[:nnz].astype(np.int64) // width
    key = rows * nw + win  # ascending: rows in order, columns ascending within a row
    new = np.ones(nnz, dtype=bool)
    new[1:] = key[1:] != key[:-1]
    starts = np.flatnonzero(new)
    rank = np.arange(nnz, dtype=np.int64) - starts[np.cumsum(new) - 1]
    slots = np.zeros(nsl * nw, dtype=np.int64)
    ends = np.append(starts[1:], nnz)
    np.maximum.at(slots, (key[starts] // nw) // SLICE * nw + key[starts] % nw, ends - starts)
    return rows, win, rank, slots, nw, nsl


def slot_count(indices: np.ndarray, rowptr: np.ndarray, n_in: int, width: int) -> int:
    """Stored slots of the window layout (each holds SLICE values), without building it."""
    if not fits(n_in, width) or rowptr[-1] == 0:
        return 0
    return int(_groups(indices, rowptr, n_in, width)[3].sum())


def build(values: np.ndarray, indices: np.ndarray, rowptr: np.ndarray, bias: np.ndarray | None, n_in: int,
          width: int, alloc) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
    """(values, 8-bit in-window indices, slice pointers, row order, bias, windows) of the window layout.

    Slice pointers count elements (SLICE per slot) like the gather form's; ``windows[k]`` is the first input
    feature of slot ``k``'s window; the row order is the identity (-1 past the last row) and ``bias`` is
    padded to whole slices. ``alloc(n, dtype)`` makes the zeroed, aligned arrays the kernels load from.
    """
    n_out, nnz = rowptr.size - 1, int(rowptr[-1])
    rows, win, rank, slots, nw, nsl = _groups(indices, rowptr, n_in, width)
    offsets = np.zeros(nsl * nw + 1, dtype=np.int64)
    np.cumsum(slots, out=offsets[1:])
    total = int(offsets[-1])
    slot = offsets[(rows // SLICE) * nw + win] + rank
    dest = slot * SLICE + rows % SLICE
    starts = window_starts(n_in, width)
    wv = alloc(total * SLICE, np.float32)
    wv[dest] = values[:nnz]
    wi = alloc(total * SLICE, np.uint8)
    wi[dest] = (indices[:nnz].astype(np.int64) - starts[win]).astype(np.uint8)
    windows = alloc(total, np.int32)
    windows[:] = np.repeat(np.tile(starts, nsl), slots)
    slice_ptr = offsets[np.arange(nsl + 1) * nw] * SLICE
    order = alloc(nsl * SLICE, np.int32)
    order[:] = -1
    order[:n_out] = np.arange(n_out, dtype=np.int32)
    padded = None
    if bias is not None:
        padded = alloc(nsl * SLICE, np.float32)
        padded[:n_out] = bias
    return wv, wi, np.ascontiguousarray(slice_ptr, dtype=np.int64), order, padded, windows
