"""Sparse layers and their kernels: CSR packing, the C kernels' calling convention, dense fallback.

A ``CsrLayer`` holds ``y = act(W x + b)`` with ``W`` in CSR (float32 values, uint16/int32 column
indices, int64 row pointers). Kernels (see ``csrc/runtime/sk_runtime.h``):

- ``rows``: row-major activations, gathered dot product per output row (batch 1 and small batches);
- ``panel`` (optionally ``panel:<block>``): batch-minor "panel" activations, register-blocked
  broadcast-FMA over 64 samples; with a block width the weight is split into column blocks so the
  input rows a block touches stay in cache;
- ``window``: the rows kernel's layout without gathers (``sparsekit.runtime.window``): each 16-row
  slot reads one window of 32 (AVX-512) or 16 (AVX2) consecutive inputs held in registers; faster than
  ``rows`` where gathers are microcoded (AMD Zen 4/5). Layers narrower than a window run ``rows``;
- ``block`` (optionally ``block:<block>``): the panel kernel for layers made of R x 1 row blocks
  (``sparsekit.runtime.blocks``: R consecutive rows sharing their columns, detected from the nonzeros),
  each input panel row loaded once for R rows; column blocks as ``panel``'s;
- ``gemv``: the layer densified (transposed weight) and run by sparsekit's own dense kernel at small
  batch: for small layers (a few 10^4 weights) it beats both the sparse kernel (per-row overhead)
  and ONNX Runtime (per-node call overhead);
- ``dense``: the layer densified and run by ONNX Runtime's GEMM (never slower than dense when a
  layer is not sparse enough to win).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sparsekit.errors import InputError
from sparsekit.runtime import blocks as _blocks
from sparsekit.runtime import window as _window

try:  # the compiled kernels; a pure-numpy path keeps the package usable (slowly) without them
    from sparsekit.runtime import _kernels as _K
except ImportError as _exc:
    if "SPARSEKIT_ISA" in str(_exc):  # a bad code-path override is the user's input, not a broken install
        raise InputError(str(_exc), fix="unset SPARSEKIT_ISA or set it to one of those") from None
    _K = None  # pragma: no cover - exercised only on broken installs

PANEL = int(_K.PANEL) if _K is not None else 64
PAD_SLACK = int(_K.PAD_SLACK) if _K is not None else 32
GROUP_ROWS = int(_K.GROUP_ROWS) if _K is not None else 64
SLICE = int(getattr(_K, "SLICE", 16)) if _K is not None else 16
SORT_WINDOW = 256  # sliced layout: rows are sorted by length within windows of this many rows
KERNELS = ("rows", "window", "panel", "block", "gemv", "dense")
# largest layer width or input size: the kernels index columns and rows with int32
MAX_DIM = 2**31 - 1
MAX_THREAD_CAP = 1024  # a plan's ``@N``: the kernels clamp threads to their pool size anyway


def have_kernels() -> bool:
    return _K is not None


def kernel_isa() -> str:
    return _K.isa() if _K is not None else "numpy"


def window_width() -> int:
    """The window width of the active code path's ``window`` kernel (0 without compiled kernels)."""
    return int(_K.window_width()) if _K is not None and hasattr(_K, "window_width") else 0


def aligned_empty(n: int, align: int = 64, dtype: Any = np.float32) -> np.ndarray:
    """A 1-D array of ``n`` elements (float32 by default) whose data starts on an ``align``-byte boundary.

    The kernels load whole 64-byte vectors (the panel kernel's 64-float rows, the rows kernel's 16-lane
    slices of values, indices and row order, gemv's weight rows); a load split across cache lines costs
    up to 2x. numpy aligns to 16 bytes: 1024x1024 98% batch 1 (rows) ran 5.65 us with the values 16 bytes
    past a line, 5.03 us aligned.
    """
    dt = np.dtype(dtype)
    if _K is not None and align % dt.itemsize == 0:
        # a step's output is made every call: 0.6 us this way, 2.7 us through .ctypes.data and a byte view
        buf = np.empty(n + align // dt.itemsize, dtype=dt)
        off = -_K.address(buf) % align
        if off % dt.itemsize == 0:
            return buf[off // dt.itemsize:off // dt.itemsize + n]
    buf = np.empty(n * dt.itemsize + align, dtype=np.uint8)
    off = -buf.ctypes.data % align
    return buf[off:off + n * dt.itemsize].view(dt)


def aligned_zeros(n: int, dtype: Any = np.float32) -> np.ndarray:
    """``aligned_empty``, zero-filled."""
    out = aligned_empty(n, dtype=dtype)
    out.fill(0)
    return out


def aligned_copy(a: np.ndarray) -> np.ndarray:
    """A C-contiguous 64-byte-aligned copy of ``a`` (same shape and dtype)."""
    out = aligned_empty(a.size, dtype=a.dtype).reshape(a.shape)
    out[...] = a
    return out


def parse_kernel(spec: str) -> tuple[str, int, int]:
    """``"panel:256"`` -> ``("panel", 256, 0)``; ``"rows@1"`` -> ``("rows", 0, 1)``.

    The optional ``@N`` caps the layer's threads at ``N`` (``--tune`` records ``@1`` where one thread
    measured faster than the model's thread count); 0 means the model's thread count.
    """
    body, at, cap_s = spec.partition("@")
    name, _, arg = body.partition(":")
    if name not in KERNELS:
        raise InputError(f"unknown kernel {spec!r}", where="plan", fix=f"use one of {', '.join(KERNELS)}")
    try:
        block = int(arg) if arg else 0
        cap = int(cap_s) if at else 0
    except ValueError as exc:
        raise InputError(f"bad kernel block width or thread cap in {spec!r}", where="plan") from exc
    if block < 0 or (block and name not in ("panel", "block")):
        raise InputError(f"bad kernel spec {spec!r}", where="plan", fix="only panel and block take a block width")
    if at and not 1 <= cap <= MAX_THREAD_CAP:
        raise InputError(f"bad thread cap in {spec!r}", where="plan", fix=f"use @N with 1 <= N <= {MAX_THREAD_CAP}")
    if block > MAX_DIM:
        raise InputError(f"block width in {spec!r} is over 2^31 - 1", where="plan")
    return name, block, cap


def _dim(n: Any, what: str, where: str) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 <= int(n) <= MAX_DIM:
        raise InputError(f"{what} = {n!r} is not an integer in [0, 2^31 - 1]", where=where)
    return int(n)


def _int64(a: Any, what: str, where: str) -> np.ndarray:
    """A 1-D int64 copy of integer array ``a`` (uint64 values past int64 refused, never wrapped)."""
    arr = np.asarray(a).reshape(-1)
    if arr.dtype.kind not in "iu":
        raise InputError(f"{what} are {arr.dtype}, not integers", where=where)
    if arr.dtype == np.uint64 and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
        raise InputError(f"{what} exceed the int64 range", where=where)
    return np.ascontiguousarray(arr, dtype=np.int64)


def _check_columns(indices: np.ndarray, rowptr: np.ndarray, n_in: int, where: str) -> None:
    """Column indices in [0, n_in) and strictly increasing within each row."""
    nnz = indices.size
    if nnz and (indices.min() < 0 or indices.max() >= n_in):
        raise InputError(f"column index out of range [0, {n_in})", where=where)
    if nnz < 2:
        return
    bad = np.diff(indices) <= 0
    starts = rowptr[1:-1]
    bad[starts[(starts > 0) & (starts < nnz)] - 1] = False  # a row's first index may be below the last row's
    if bad.any():
        k = int(np.argmax(bad)) + 1
        row = int(np.searchsorted(rowptr, k, side="right")) - 1
        raise InputError(f"row {row}: column indices not strictly increasing (duplicate or unsorted column "
                         f"{int(indices[k])})", where=where)


@dataclass
class CsrLayer:
    """One layer in CSR. Arrays are validated and padded with ``PAD_SLACK`` spare elements."""

    n_in: int
    n_out: int
    values: np.ndarray        # float32 (nnz + slack,)
    indices: np.ndarray       # uint16 or int32 (nnz + slack,)
    rowptr: np.ndarray        # int64 (n_out + 1,)
    bias: np.ndarray | None   # float32 (n_out,)
    relu: bool
    plan: dict[int, str] = field(default_factory=dict)   # batch size -> kernel spec
    name: str = ""
    _blocked: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, int, np.ndarray]] = field(
        default_factory=dict, repr=False)
    _sliced: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None] | None = field(
        default=None, repr=False)
    _windowed: dict[int, tuple[np.ndarray, ...]] = field(default_factory=dict, repr=False)
    _row_block: int | None = field(default=None, repr=False)
    _row_blocked: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, int]] = field(default_factory=dict, repr=False)
    _dense: np.ndarray | None = field(default=None, repr=False)
    _dense_t: np.ndarray | None = field(default=None, repr=False)
    # the models running this layer (FastModel registers itself): told when ``plan`` is replaced
    _owners: weakref.WeakSet[Any] = field(default_factory=weakref.WeakSet, init=False, repr=False, compare=False)

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        if name == "plan":
            for owner in list(getattr(self, "_owners", ())):  # none yet while __init__ sets the first plan
                owner.plan_changed()

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_dense(cls, weight: np.ndarray, bias: np.ndarray | None, relu: bool, *, name: str = "",
                   plan: dict[int, str] | None = None) -> CsrLayer:
        w = np.asarray(weight, dtype=np.float32)
        if w.ndim != 2:
            raise InputError(f"layer weight has rank {w.ndim}, expected 2", where=name or "layer")
        n_out, n_in = w.shape
        mask = w != 0
        rowptr = np.zeros(n_out + 1, dtype=np.int64)
        np.cumsum(mask.sum(axis=1), out=rowptr[1:])
        rows, cols = np.nonzero(mask)  # row-major order: rows ascending, columns ascending within
        return cls.from_csr(n_in, n_out, w[rows, cols], cols, rowptr, bias, relu, name=name, plan=plan)

    @classmethod
    def from_csr(cls, n_in: int, n_out: int, values: np.ndarray, indices: np.ndarray, rowptr: np.ndarray,
                 bias: np.ndarray | None, relu: bool, *, name: str = "",
                 plan: dict[int, str] | None = None) -> CsrLayer:
        """A layer from CSR arrays, all checked (they may come from a file): shape within [0, 2^31 - 1] (the
        kernels index with int32), row pointers from 0 and non-decreasing, exactly that many values and indices,
        column indices in range and strictly increasing within each row (a duplicate would be summed by some
        kernels and not others), finite weights and bias."""
        where = name or "layer"
        n_in, n_out = _dim(n_in, "in_features", where), _dim(n_out, "out_features", where)
        rowptr = _int64(rowptr, "row pointers", where)
        if rowptr.shape != (n_out + 1,) or rowptr[0] != 0 or np.any(np.diff(rowptr) < 0):
            raise InputError("malformed row pointers (need n_out+1 non-decreasing values from 0)", where=where)
        nnz = int(rowptr[-1])
        values = np.asarray(values).reshape(-1)
        if values.dtype.kind != "f":
            raise InputError(f"weight values are {values.dtype}, not floats", where=where)
        values = values.astype(np.float32)
        indices = _int64(indices, "column indices", where)
        if values.size != nnz or indices.size != nnz:
            raise InputError(f"CSR arrays hold {values.size} values and {indices.size} indices, rowptr says {nnz}",
                             where=where)
        _check_columns(indices, rowptr, n_in, where)
        if not np.all(np.isfinite(values)):
            raise InputError("non-finite weight values", where=where)
        idx_dtype = np.uint16 if n_in <= 65536 else np.int32  # n_in <= MAX_DIM: every index fits int32
        pad_v = np.zeros(nnz + PAD_SLACK, dtype=np.float32)
        pad_v[:nnz] = values
        pad_i = np.zeros(nnz + PAD_SLACK, dtype=idx_dtype)
        pad_i[:nnz] = indices
        if bias is not None:
            bias = np.ascontiguousarray(np.asarray(bias, dtype=np.float32).reshape(-1))
            if bias.shape != (n_out,):
                raise InputError(f"bias has {bias.size} values, expected {n_out}", where=where)
            if not np.all(np.isfinite(bias)):
                raise InputError("non-finite bias values", where=where)
        return cls(n_in, n_out, pad_v, pad_i, rowptr, bias, bool(relu), dict(plan or {}), name)

    # ---------------------------------------------------------------- properties
    @property
    def nnz(self) -> int:
        return int(self.rowptr[-1])

    @property
    def density(self) -> float:
        size = self.n_in * self.n_out
        return self.nnz / size if size else 0.0

    @property
    def idx_bytes(self) -> int:
        return int(self.indices.dtype.itemsize)

    def csr(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Unpadded (values, indices, rowptr)."""
        n = self.nnz
        return self.values[:n], self.indices[:n], self.rowptr

    def dense_weight(self) -> np.ndarray:
        if self._dense is None:
            w = np.zeros((self.n_out, self.n_in), dtype=np.float32)
            rows = np.repeat(np.arange(self.n_out), np.diff(self.rowptr))
            v, i, _ = self.csr()
            w[rows, i.astype(np.int64)] = v
            self._dense = w
        return self._dense

    def dense_t(self) -> np.ndarray:
        """The dense weight transposed, (n_in, n_out) C-contiguous (the ``gemv`` kernel's layout)."""
        if self._dense_t is None:
            self._dense_t = aligned_copy(self.dense_weight().T)
        return self._dense_t

    def blocked(self, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, np.ndarray]:
        """(values, indices, block pointers, number of blocks, row order) for the panel kernel with column
        blocks of width ``block`` (0 or ≥ n_in: one block).

        Nonzeros are ordered by (column block, position); ``order[c*n_out + k]`` is the row at position
        ``k`` of block ``c`` and block pointer ``c*n_out + k`` starts its segment. Positions permute rows
        only within groups of ``GROUP_ROWS`` (the kernel's thread ranges start on group boundaries):
        within a group, rows are sorted by their nonzero count in the block (descending, stable), so the
        kernel's inner loop runs the same trip count row after row and its exit branch is predicted.
        """
        key = block if 0 < block < self.n_in else 0
        if key not in self._blocked:
            v, i, rp = self.csr()
            n_out, nnz = self.n_out, self.nnz
            nb = -(-self.n_in // key) if key else 1
            rows = np.repeat(np.arange(n_out, dtype=np.int64), np.diff(rp))
            blk = i.astype(np.int64) // key if key else np.zeros(nnz, dtype=np.int64)
            counts = np.bincount(blk * n_out + rows, minlength=nb * n_out).reshape(nb, n_out)
            row_ids = np.broadcast_to(np.arange(n_out, dtype=np.int64), (nb, n_out))
            blk_ids = np.broadcast_to(np.arange(nb, dtype=np.int64)[:, None], (nb, n_out))
            flat = np.lexsort((row_ids.ravel(), -counts.ravel(), (row_ids // GROUP_ROWS).ravel(), blk_ids.ravel()))
            order = (flat % max(n_out, 1)).reshape(nb, n_out)
            pos = np.empty((nb, n_out), dtype=np.int64)
            np.put_along_axis(pos, order, np.broadcast_to(np.arange(n_out, dtype=np.int64), (nb, n_out)), axis=1)
            perm = np.argsort(blk * n_out + pos[blk, rows], kind="stable")  # columns stay ascending
            bptr = np.zeros(nb * n_out + 1, dtype=np.int64)
            np.cumsum(np.take_along_axis(counts, order, axis=1).ravel(), out=bptr[1:])
            bv = aligned_zeros(self.values.size, self.values.dtype)
            bv[:nnz] = v[perm]
            bi = aligned_zeros(self.indices.size, self.indices.dtype)
            bi[:nnz] = i[perm]
            self._blocked[key] = (bv, bi, bptr, nb, aligned_copy(order.astype(np.int32, copy=False).ravel()))
        return self._blocked[key]

    def sliced(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        """(values, indices, slice pointers, perm, bias) for the rows kernel's sliced layout (SELL-16).

        Rows are sorted by nonzero count (descending, stable) within windows of ``SORT_WINDOW`` rows
        (so a thread's outputs stay in its own part of y) and cut into slices of ``SLICE`` rows. Slice
        ``s`` stores slot ``j`` of its rows side by side at ``slice_ptr[s] + SLICE*j + lane``; rows shorter than
        the slice's longest are padded with value 0, index 0. ``perm[SLICE*s + lane]`` is the output row
        of a lane (-1 past the last row) and ``bias`` (or None) is in the same lane order.
        """
        if self._sliced is None:
            v, i, rp = self.csr()
            n_out, nnz = self.n_out, self.nnz
            nsl = -(-n_out // SLICE)
            counts = np.diff(rp)
            rows = np.arange(n_out, dtype=np.int64)
            order = np.lexsort((rows, -counts, rows // SORT_WINDOW))  # position -> row
            lens = np.zeros(nsl * SLICE, dtype=np.int64)
            lens[:n_out] = counts[order]
            slot_len = lens.reshape(nsl, SLICE).max(axis=1) if nsl else lens[:0]
            slice_ptr = np.zeros(nsl + 1, dtype=np.int64)
            np.cumsum(slot_len * SLICE, out=slice_ptr[1:])
            pos = np.empty(n_out, dtype=np.int64)
            pos[order] = rows
            row_of = np.repeat(rows, counts)
            j = np.arange(nnz, dtype=np.int64) - rp[row_of]  # slot within the row
            dest = slice_ptr[pos[row_of] // SLICE] + SLICE * j + pos[row_of] % SLICE
            total = int(slice_ptr[-1])
            sv = aligned_zeros(total + PAD_SLACK)  # 64-byte aligned: each slot of a slice is one vector load
            si = aligned_zeros(total + PAD_SLACK, self.indices.dtype)
            sv[dest] = v
            si[dest] = i
            perm = aligned_empty(nsl * SLICE, dtype=np.int32)
            perm.fill(-1)
            perm[:n_out] = order
            bias = None
            if self.bias is not None:
                bias = aligned_zeros(nsl * SLICE)
                bias[:n_out] = self.bias[order]
            self._sliced = (sv, si, slice_ptr, perm, bias)
        return self._sliced

    def row_block(self) -> int:
        """R of the layer's R x 1 row blocks (``sparsekit.runtime.blocks.row_block``, from the nonzeros), 0: none."""
        if self._row_block is None:
            self._row_block = _blocks.row_block(self.indices, self.rowptr)
        return self._row_block

    def has_block(self) -> bool:
        """Whether the ``block`` kernel can run this layer (else ``block`` runs ``panel``)."""
        return self.row_block() > 1

    def row_blocked(self, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """(values, indices, block pointers, number of column blocks): the ``block`` kernel's layout with column
        blocks of width ``block`` (0 or >= n_in: one block; ``sparsekit.runtime.blocks.build``). The layer must
        ``has_block``."""
        key = block if 0 < block < self.n_in else 0
        if key not in self._row_blocked:
            v, i, rp = self.csr()
            self._row_blocked[key] = _blocks.build(v, i, rp, self.n_in, self.row_block(), key, PAD_SLACK,
                                                   aligned_zeros)
        return self._row_blocked[key]

    def has_window(self, width: int | None = None) -> bool:
        """Whether the ``window`` kernel can run this layer (at ``width``, default the active path's)."""
        return _window.fits(self.n_in, window_width() if width is None else width)

    def windowed(self, width: int) -> tuple[np.ndarray, ...]:
        """(values, 8-bit indices, slice pointers, row order, bias, windows): the ``window`` kernel's layout
        for windows of ``width`` inputs (``sparsekit.runtime.window.build``; the layer must ``has_window``)."""
        if width not in self._windowed:
            v, i, rp = self.csr()
            self._windowed = {width: _window.build(v, i, rp, self.bias, self.n_in, width, aligned_zeros)}
        return self._windowed[width]

    # ---------------------------------------------------------------- kernels
    def run_window(self, x: np.ndarray, y: np.ndarray, threads: int) -> None:
        """The ``window`` kernel, x (B, n_in) C-contiguous float32 -> y (B, n_out); ``rows`` for a layer
        narrower than a window."""
        width = window_width()
        if _K is None or not self.has_window(width):
            self.run_rows(x, y, threads)
            return
        wv, wi, slice_ptr, order, bias, windows = self.windowed(width)
        _K.rows(wv, wi, slice_ptr, order, bias, x, y, 1, self.n_in, self.n_out, x.shape[0], int(self.relu),
                int(threads), windows, width)

    def run_rows(self, x: np.ndarray, y: np.ndarray, threads: int) -> None:
        """x (B, n_in) C-contiguous float32 -> y (B, n_out)."""
        batch = x.shape[0]
        if _K is None:
            y[...] = self._numpy(x)
            return
        sv, si, slice_ptr, perm, bias = self.sliced()
        _K.rows(sv, si, slice_ptr, perm, bias, x, y, self.idx_bytes, self.n_in, self.n_out, batch, int(self.relu),
                int(threads))

    def run_gemv(self, x: np.ndarray, y: np.ndarray, threads: int) -> None:
        """Dense kernel: x (B, n_in) C-contiguous float32 -> y (B, n_out)."""
        if _K is None:
            y[...] = self._numpy(x)
            return
        _K.gemv(self.dense_t(), self.bias, x, y, self.n_in, self.n_out, x.shape[0], int(self.relu), int(threads))

    def run_panel(self, xp: np.ndarray, yp: np.ndarray, npanels: int, block: int, threads: int,
                  y_rows: np.ndarray | None = None, x_rows: np.ndarray | None = None, *,
                  row_blocks: bool = False) -> None:
        """Panels (P, n_in, PANEL) -> (P, n_out, PANEL); ``row_blocks``: the ``block`` kernel (the ``panel``
        kernel on a layer without row blocks). With ``y_rows`` (batch, n_out) C-contiguous the
        results go there row-major instead (the output transpose fused into the kernel; ``yp`` is
        then scratch for partial sums). With ``x_rows`` (batch, n_in) C-contiguous the input is
        row-major: the kernel transposes it into ``xp`` (aligned scratch) one panel at a time, right
        before that panel's rows. ``threads`` < 0: exactly that many threads (no work threshold)."""
        if _K is None:
            if x_rows is not None:
                to_panels(x_rows, self.n_in, out=xp)
            x = xp.reshape(npanels, self.n_in, PANEL).transpose(0, 2, 1).reshape(-1, self.n_in)
            y = self._numpy(x)
            if y_rows is not None:
                y_rows[...] = y[: y_rows.shape[0]]
                return
            yp.reshape(npanels, self.n_out, PANEL)[...] = y.reshape(npanels, PANEL, self.n_out).transpose(0, 2, 1)
            return
        batch = y_rows.shape[0] if y_rows is not None else x_rows.shape[0] if x_rows is not None else 0
        if row_blocks and self.has_block():
            v, i, bptr, nb = self.row_blocked(block)
            _K.panel(v, i, bptr, self.bias, xp, yp, self.idx_bytes, self.n_in, self.n_out, npanels, nb,
                     int(self.relu), int(threads), y_rows, int(batch), None, x_rows, self.row_block())
            return
        v, i, bptr, nb, order = self.blocked(block)
        _K.panel(v, i, bptr, self.bias, xp, yp, self.idx_bytes, self.n_in, self.n_out, npanels, nb,
                 int(self.relu), int(threads), y_rows, int(batch), order, x_rows)

    def _numpy(self, x: np.ndarray) -> np.ndarray:
        y = x @ self.dense_weight().T
        if self.bias is not None:
            y += self.bias
        if self.relu:
            np.maximum(y, 0, out=y)
        return y.astype(np.float32, copy=False)

    def reference(self, x: np.ndarray) -> np.ndarray:
        """Dense float64 reference output (tests)."""
        y = np.asarray(x, dtype=np.float64) @ self.dense_weight().astype(np.float64).T
        if self.bias is not None:
            y += self.bias
        return np.maximum(y, 0) if self.relu else y


def to_panels(x: np.ndarray, n: int, threads: int = 1, out: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """(B, n) row-major -> (aligned flat panels, number of panels); padding samples are zero.
    ``out``: an aligned flat float32 buffer of at least that size to write into (reused scratch)."""
    batch = x.shape[0]
    npanels = -(-batch // PANEL)
    xp = aligned_empty(npanels * n * PANEL) if out is None else out[: npanels * n * PANEL]
    if _K is None:
        tmp = np.zeros((npanels * PANEL, n), dtype=np.float32)
        tmp[:batch] = x
        xp[...] = tmp.reshape(npanels, PANEL, n).transpose(0, 2, 1).reshape(-1)
    else:
        _K.to_panels(x, xp, batch, n, int(threads))
    return xp, npanels


def from_panels(yp: np.ndarray, batch: int, n: int, threads: int = 1) -> np.ndarray:
    y = np.empty((batch, n), dtype=np.float32)
    if _K is None:
        npanels = -(-batch // PANEL)
        y[...] = yp.reshape(npanels, n, PANEL).transpose(0, 2, 1).reshape(-1, n)[:batch]
    else:
        _K.from_panels(yp, y, batch, n, int(threads))
    return y
