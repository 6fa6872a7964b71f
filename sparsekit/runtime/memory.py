"""How much memory a kernel needs for a layer beyond the CSR it is built from, and the bound a loaded artifact's
kernels must fit in.

An artifact stores only its nonzeros, but its plan can ask for kernels whose own data is not proportional to
them: ``dense`` and ``gemv`` densify the weight (n_in x n_out floats however few nonzeros the file holds; a 129 KiB
file with a 16384x16384 layer took 7.2 GiB on its first ``dense`` call), a column-blocked ``panel`` layout keeps a
pointer per row and block, and a panel kernel's scratch holds 64 samples of every input and output feature even
for one sample. ``FastModel`` checks each kernel against the bound before anything is allocated and runs a sparse
kernel that fits instead (see ``FastModel.kernels_for``).
"""

from __future__ import annotations

from sparsekit.runtime import blocks, window
from sparsekit.runtime.layers import PANEL, SLICE, SORT_WINDOW, CsrLayer, window_width

MIN_BOUND = 256 << 20  # bytes
FILE_FACTOR = 16
# peak bytes per dense weight: ``dense`` holds the densified weight, its transpose, the ONNX model built from it
# (initializer and serialized copy) and ONNX Runtime's own copies (measured: 4096x4096 -> 500 MiB peak, 7.8x the
# 64 MiB weight); ``gemv`` the weight and its transpose
DENSE_COPIES = 8
GEMV_COPIES = 2
# temporaries while a layout is built, per nonzero and per (column block x row) entry (measured: panel:1 on
# 4096x4096 -> 732 MiB peak, 44 bytes an entry)
BUILD_BYTES_PER_NNZ = 48
BUILD_BYTES_PER_ENTRY = 48


def memory_bound(file_bytes: int) -> int:
    """max(256 MiB, 16 x the artifact's bytes). The sparse kernels' layouts are reorderings of the CSR the file holds
    (``rows`` pads each 16-row slice to its longest row, at worst 16x the nonzeros; ``window`` pads each slice's
    slots per input window likewise, every slot holding at least one nonzero; ``panel`` adds a pointer per row
    and column block; ``block`` stores the nonzeros and at most 2% padding zeros, and a pointer per block row and
    column block), so 16x the file admits every sparse layout of an honest artifact, while 256 MiB lets a small
    model densify a layer (a 4096x4096 dense layer peaks at about 500 MiB: refused for files under 32 MiB) or run
    64-sample panels of wide inputs."""
    return max(MIN_BOUND, FILE_FACTOR * int(file_bytes))


def sliced_slots(layer: CsrLayer) -> int:
    """Stored slots of the rows kernel's sliced layout (``CsrLayer.sliced``) without building it: rows sorted by
    length (descending) within windows of SORT_WINDOW rows, each SLICE-row slice padded to its longest row."""
    counts = layer.rowptr[1:] - layer.rowptr[:-1]
    if not counts.size:
        return 0
    nw = -(-counts.size // SORT_WINDOW)
    padded = counts.copy()
    padded.resize(nw * SORT_WINDOW)
    windows = -padded.reshape(nw, SORT_WINDOW)
    windows.sort(axis=1)
    return int(-windows[:, ::SLICE].sum()) * SLICE


def kernel_bytes(layer: CsrLayer, name: str, block: int, threads: int = 1) -> int:
    """Peak bytes ``name`` (with column block width ``block`` for panel and block) needs for ``layer`` beyond its CSR
    and the activations of the batch itself: its weight layout (built once and kept) with the temporaries of building
    it, plus fixed per-call scratch (a panel kernel's 64-sample input and output panels on each thread)."""
    n_in, n_out, nnz = layer.n_in, layer.n_out, layer.nnz
    entry = 4 + layer.idx_bytes  # a stored nonzero: value and column index
    if name == "dense":
        return DENSE_COPIES * 4 * n_in * n_out
    if name == "gemv":
        return GEMV_COPIES * 4 * n_in * n_out
    build = BUILD_BYTES_PER_NNZ * (nnz + n_out)
    if name == "rows" or (name == "window" and not layer.has_window()):
        return sliced_slots(layer) * entry + build
    if name == "window":  # a slot: SLICE values and 8-bit indices, and its window
        _, i, rp = layer.csr()
        return window.slot_count(i, rp, n_in, window_width()) * (5 * SLICE + 4) + build
    nb = -(-n_in // block) if 0 < block < n_in else 1
    panels = 2 * PANEL * 4 * (n_in + n_out) * max(1, threads)
    if name == "block" and layer.has_block():  # an entry per column of a block row: R values and one index
        r = layer.row_block()
        stored = int(nnz * (1 + blocks.MAX_FILL)) + r  # weights the layout stores, at most (row_block's bound)
        return stored * 4 + (stored // r) * layer.idx_bytes + (8 + BUILD_BYTES_PER_ENTRY) * nb * (n_out // r) \
            + build + panels
    return nnz * entry + (4 + BUILD_BYTES_PER_ENTRY) * nb * n_out + build + panels
