"""Each C kernel of the fast runtime (rows, panel, gemv, dense), run alone on every code path (ISA) of this CPU,
against a dense float64 reference: layouts, index widths, ragged shapes, malformed CSR, compaction, and the
default kernel's cost model. No timing asserts."""

from __future__ import annotations

import numpy as np
import pytest
from runtime_helpers import K, close, sparse_matrix

import sparsekit.runtime as rt
from sparsekit.errors import InputError
from sparsekit.runtime import layers as L

KERNEL_SPECS = ["rows", "panel", "panel:16", "panel:7", "gemv", "dense"]


@pytest.mark.parametrize("spec", KERNEL_SPECS)
@pytest.mark.parametrize("batch", [1, 3, 64, 130])
def test_kernels_match_dense_reference(isa, spec, batch):
    rng = np.random.default_rng(batch)
    # odd shapes, all-zero rows (output = bias) and columns, relu and a row longer than the vector width
    w = sparse_matrix(rng, 37, 53, 0.3, zero_rows=(0, 5, 36), zero_cols=(1, 2, 52))
    w[7] = rng.standard_normal(53)
    layer = rt.CsrLayer.from_dense(w, rng.standard_normal(37), relu=True)
    model = rt.FastModel([layer], (53,))
    x = rng.standard_normal((batch, 53)).astype(np.float32)
    for threads in (1, 2):
        close(model.run(x, kernels=[spec], threads=threads), layer.reference(x))


def test_empty_layers_and_wide_inputs_use_int32_indices():
    rng = np.random.default_rng(2)
    n_in = 70_000  # > 65536 columns: int32 indices
    w = np.zeros((4, n_in), np.float32)
    w[1, [0, 65_535, 65_536, 69_999]] = [1.0, 2.0, 3.0, 4.0]
    layer = rt.CsrLayer.from_dense(w, np.arange(4, dtype=np.float32), relu=False)
    assert layer.indices.dtype == np.int32
    model = rt.FastModel([layer], (n_in,))
    x = rng.standard_normal((3, n_in)).astype(np.float32)
    for spec in ("rows", "panel", "panel:1000"):
        close(model.run(x, kernels=[spec]), layer.reference(x))
    empty = rt.CsrLayer.from_dense(np.zeros((5, 6), np.float32), np.ones(5, np.float32), relu=False)
    y = rt.FastModel([empty], (6,)).run(np.ones((2, 6), np.float32))
    assert np.array_equal(y, np.ones((2, 5), np.float32))


@pytest.mark.parametrize("n_in", [53, 70_001])  # uint16 and int32 column indices
@pytest.mark.parametrize("bias", [True, False])
def test_sliced_rows_kernel_matches_the_reference(isa, n_in, bias):
    """The rows kernel's sliced layout (SELL-16): rows of 0, 1, 15, 16, 17 and 33 nonzeros mixed in one
    slice, row counts not a multiple of the slice, a last slice of one row, batches 1 and 3."""
    rng = np.random.default_rng(n_in + bias)
    lengths = [0, 1, 15, 16, 17, 33, 2, 0, 31, 32, 5, 16, 17, 1, 0, 3, 33, 20, 0, 7, 16, 9, 1, 40, 0]
    for n_out in (1, 5, 16, 17, 25):
        w = np.zeros((n_out, n_in), dtype=np.float32)
        for r in range(n_out):
            cols = rng.choice(n_in, min(lengths[r % len(lengths)], n_in), replace=False)
            w[r, cols] = rng.standard_normal(cols.size)
        layer = rt.CsrLayer.from_dense(w, rng.standard_normal(n_out) if bias else None, relu=bias)
        assert layer.indices.dtype == (np.uint16 if n_in <= 65536 else np.int32)
        sv, si, slice_ptr, perm, _ = layer.sliced()
        assert sorted(perm[perm >= 0].tolist()) == list(range(n_out)) and int(slice_ptr[-1]) % L.SLICE == 0
        for batch in (1, 3):
            x = rng.standard_normal((batch, n_in)).astype(np.float32)
            for threads in (1, -2):
                y = np.full((batch, n_out), np.nan, dtype=np.float32)
                layer.run_rows(x, y, threads)
                close(y, layer.reference(x))
    if K is not None:  # the C side re-checks the layout it is given
        with pytest.raises(ValueError):
            K.rows(sv, si, slice_ptr[:-1], perm, None, x, y, layer.idx_bytes, n_in, n_out, 3, 0, 1)
        bad = slice_ptr.copy()
        bad[1] += 1
        with pytest.raises(ValueError):
            K.rows(sv, si, bad, perm, None, x, y, layer.idx_bytes, n_in, n_out, 3, 0, 1)


def test_gemv_handles_ragged_widths_and_refuses_short_buffers(isa):
    rng = np.random.default_rng(7)
    for n_out in (1, 15, 16, 17, 127, 128, 129, 300):  # masked tails of the 128-wide register block
        layer = rt.CsrLayer.from_dense(sparse_matrix(rng, n_out, 19, 0.4), rng.standard_normal(n_out),
                                          relu=bool(n_out % 2))
        x = rng.standard_normal((5, 19)).astype(np.float32)
        for threads in (1, 2):
            close(rt.FastModel([layer], (19,)).run(x, kernels=["gemv"], threads=threads), layer.reference(x))
    if K is not None:
        with pytest.raises(ValueError):
            K.gemv(np.zeros(10, np.float32), None, np.zeros(4, np.float32), np.zeros(4, np.float32), 4, 4, 1, 0, 1)


@pytest.mark.parametrize("n_out", [256, 250])
def test_fused_output_transpose_matches_the_reference(isa, n_out):
    # the last panel layer writes row-major output itself: whole 16-row tiles (n_out % 16 == 0, full
    # panels: the register-transpose path) and ragged ones (tail rows, tail panel, odd row strides)
    rng = np.random.default_rng(n_out)
    layer = rt.CsrLayer.from_dense(sparse_matrix(rng, n_out, 96, 0.2, zero_rows=(3, 17)),
                                      rng.standard_normal(n_out), relu=True)
    model = rt.FastModel([layer], (96,))
    for batch in (64, 200):
        x = rng.standard_normal((batch, 96)).astype(np.float32)
        for spec in ("panel", "panel:32"):
            for threads in (1, 2):
                close(model.run(x, kernels=[spec], threads=threads), layer.reference(x))
    if K is not None:  # a row-major output whose batch does not fit the panel count is refused
        v, i, bp, nb, _ = layer.blocked(0)
        xp, P = L.to_panels(np.zeros((64, 96), np.float32), 96)
        with pytest.raises(ValueError):
            K.panel(v, i, bp, None, xp, np.zeros(P * n_out * 64, np.float32), layer.idx_bytes, 96, n_out, P, nb,
                    0, 1, np.zeros((65, n_out), np.float32), 65)


def test_blocked_layout_covers_every_nonzero_once_in_group_sorted_order():
    rng = np.random.default_rng(11)
    n_out, n_in = 200, 300  # 4 groups of 64 rows, the last one ragged; empty rows and columns
    w = sparse_matrix(rng, n_out, n_in, 0.15, zero_rows=(0, 64, 65, 199), zero_cols=(5, 299))
    layer = rt.CsrLayer.from_dense(w, None, relu=False)
    group = L.GROUP_ROWS
    for block in (0, 64, 100, 128, 1000):
        v, i, bptr, nb, order = layer.blocked(block)
        width = block if 0 < block < n_in else n_in
        assert nb == -(-n_in // width) and order.dtype == np.int32 and order.shape == (nb * n_out,)
        assert bptr[0] == 0 and bptr[-1] == layer.nnz and np.all(np.diff(bptr) >= 0)
        rebuilt = np.zeros_like(w)
        for c in range(nb):
            rows = order[c * n_out:(c + 1) * n_out].astype(np.int64)
            # a permutation of the rows that keeps every row in its 64-row group
            assert np.array_equal(np.sort(rows), np.arange(n_out))
            assert np.array_equal(rows // group, np.arange(n_out) // group)
            counts = np.diff(bptr[c * n_out:(c + 1) * n_out + 1])
            for g0 in range(0, n_out, group):  # sorted by nonzero count (descending) within a group
                assert np.all(np.diff(counts[g0:g0 + group]) <= 0)
            for k in range(n_out):
                seg = slice(bptr[c * n_out + k], bptr[c * n_out + k + 1])
                cols = i[seg].astype(np.int64)
                assert np.all((cols >= c * width) & (cols < (c + 1) * width))
                assert not rebuilt[rows[k], cols].any()  # each nonzero exactly once
                rebuilt[rows[k], cols] = v[seg]
        assert np.array_equal(rebuilt, w)


@pytest.mark.parametrize(("n_out", "n_in", "density", "batch", "want"), [
    (512, 64, 0.02, 1, "rows"),     # measured 2.6 vs 3.6 us (gemv, the old cost model's pick)
    (1024, 64, 0.02, 1, "rows"),    # 3.0 vs 4.8 us
    (10, 1024, 0.3, 1, "rows"),     # 3.2 vs 3.9 us
    (64, 1024, 0.3, 1, "gemv"),     # 6.6 vs 6.1 us: dense enough for the dense kernel
    (64, 64, 0.5, 1, "gemv"),       # above ROWS_MAX_DENSITY
    (3000, 3000, 0.5, 1, "dense"),  # too big for gemv, too dense for rows
    (512, 64, 0.02, 64, "panel"),
    (512, 1024, 0.1, 256, "panel:128"),
])
def test_default_kernel_follows_the_measured_cost_model(n_out, n_in, density, batch, want):
    from sparsekit.runtime.model import default_kernel

    rng = np.random.default_rng(13)
    layer = rt.CsrLayer.from_dense(sparse_matrix(rng, n_out, n_in, density), None, relu=False)
    if want == "rows":  # the sparse small-batch kernel: gather-free with a vector code path
        want = "window" if rt.layers.kernel_isa() in ("avx512", "avx2") else "rows"
    assert default_kernel(layer, batch) == want


@pytest.mark.parametrize("idx_dtype", [np.uint16, np.int32])
def test_kernel_layouts_are_cache_line_aligned(idx_dtype):
    """Every array a kernel reads vector by vector starts on a 64-byte boundary (numpy only promises 16):
    values 16 bytes past a line made the batch-1 rows kernel 12% slower."""
    rng = np.random.default_rng(12)
    n_in = 300 if idx_dtype == np.uint16 else 70000  # wide inputs need int32 indices
    w = sparse_matrix(rng, 50, n_in, 0.05 if idx_dtype == np.uint16 else 0.001)
    layer = rt.CsrLayer.from_dense(w, rng.standard_normal(50), relu=False)
    assert layer.indices.dtype == idx_dtype
    sv, si, _, perm, bias = layer.sliced()
    bv, bi, _, _, order = layer.blocked(128)
    for a in (sv, si, perm, bias, bv, bi, order, layer.dense_t()):
        assert a.ctypes.data % 64 == 0 and a.flags.c_contiguous
    assert si.dtype == bi.dtype == idx_dtype and perm.dtype == order.dtype == np.int32
    assert layer.dense_t().shape == (n_in, 50) and np.array_equal(layer.dense_t(), w.T)
    for n, dt in ((1, np.float32), (33, np.uint16), (1000, np.int64)):
        a = L.aligned_empty(n, dtype=dt)
        assert a.shape == (n,) and a.dtype == dt and a.ctypes.data % 64 == 0


def test_large_outputs_streamed_to_memory_match_the_reference(isa):
    # outputs of 512 KB and more are written with non-temporal stores (full panels, 16-row tiles)
    rng = np.random.default_rng(17)
    layer = rt.CsrLayer.from_dense(sparse_matrix(rng, 512, 80, 0.1), rng.standard_normal(512), relu=True)
    model = rt.FastModel([layer], (80,))
    for batch in (256, 250):
        x = rng.standard_normal((batch, 80)).astype(np.float32)
        for threads in (1, 2):
            close(model.run(x, kernels=["panel"], threads=threads), layer.reference(x))


def test_malformed_csr_is_refused():
    with pytest.raises(InputError, match="out of range"):
        rt.CsrLayer.from_csr(4, 2, np.ones(2), np.array([0, 9]), np.array([0, 1, 2]), None, False)
    with pytest.raises(InputError, match="row pointers"):
        rt.CsrLayer.from_csr(4, 2, np.ones(2), np.array([0, 1]), np.array([0, 2, 1]), None, False)
    if K is not None:  # the C side re-checks buffer sizes
        layer = rt.CsrLayer.from_dense(np.eye(4, dtype=np.float32), None, False)
        sv, si, slice_ptr, perm, _ = layer.sliced()
        with pytest.raises(ValueError):  # x holds 3 floats where the layer reads 4
            K.rows(sv, si, slice_ptr, perm, None, np.zeros(3, np.float32), np.zeros(4, np.float32), layer.idx_bytes,
                   4, 4, 1, 0, 1)


def test_compaction_is_exact_and_folds_bias_of_input_less_units():
    from sparsekit.exporters.compact import compact_layers, with_all_inputs
    from sparsekit.exporters.graph import DenseLayer

    rng = np.random.default_rng(3)
    w1 = sparse_matrix(rng, 12, 8, 0.5)
    w2 = sparse_matrix(rng, 6, 12, 0.6)
    w3 = sparse_matrix(rng, 3, 6, 0.8)
    w1[2] = 0           # no inputs, relu(bias) > 0 must be folded
    w2[:, 2] = 1.0
    w2[:, 4] = 0        # no outputs
    w1[4] = 1.0
    b1 = rng.standard_normal(12).astype(np.float32)
    b1[2] = 0.8
    chain = [DenseLayer(w1, b1, "relu", "w1", "b1"), DenseLayer(w2, None, "relu", "w2", None),
             DenseLayer(w3, np.zeros(3, np.float32), None, "w3", "b3")]
    kept_in, compacted, counts = compact_layers(8, chain)
    compacted = with_all_inputs(8, kept_in, compacted)  # what the fast exporter packs
    assert sum(u["before"] - u["after"] for u in counts["units"]) >= 2 and counts["folded_units"] >= 1
    assert compacted[0].weight.shape[1] == 8 and compacted[0].weight.shape[0] < 12
    layers = [rt.CsrLayer.from_dense(c.weight, c.bias, c.activation == "relu") for c in compacted]
    full = [rt.CsrLayer.from_dense(c.weight, c.bias, c.activation == "relu") for c in chain]
    x = rng.standard_normal((5, 8))
    ref, got = x, x
    for a in full:
        ref = a.reference(ref)
    for b in layers:
        got = b.reference(got)
    close(got.astype(np.float32), ref)
