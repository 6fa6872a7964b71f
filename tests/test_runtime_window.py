"""The ``window`` kernel (the gather-free small-batch kernel): its layout, its results on every code path,
its chains and the checks ``chain_new`` makes on it."""

from __future__ import annotations

import numpy as np
import pytest
from runtime_helpers import K, close, sparse_matrix

import sparsekit.runtime as rt
from sparsekit.runtime import window as W
from sparsekit.runtime.layers import aligned_zeros
from sparsekit.runtime.model import CHAIN_ROWS, CHAIN_WINDOW

pytestmark = pytest.mark.skipif(K is None, reason="no compiled kernels")


def _layer(rng, n_out, n_in, density, *, bias=True, relu=True, **kw):
    w = sparse_matrix(rng, n_out, n_in, density, **kw)
    b = rng.standard_normal(n_out).astype(np.float32) if bias else None
    return rt.CsrLayer.from_dense(w, b, relu=relu)


@pytest.mark.parametrize("width", [7, 16, 32])
@pytest.mark.parametrize(("n_out", "n_in", "density"), [(37, 45, 0.3), (64, 64, 0.9), (16, 300, 0.05), (1, 40, 1.0)])
def test_window_layout_holds_every_nonzero_once_inside_its_window(width, n_out, n_in, density):
    rng = np.random.default_rng(n_out * n_in)
    layer = _layer(rng, n_out, n_in, density, zero_rows=[0])
    wv, wi, slice_ptr, order, bias, windows = W.build(*layer.csr(), layer.bias, n_in, width, aligned_zeros)
    nsl = -(-n_out // W.SLICE)
    assert slice_ptr.shape == (nsl + 1,) and slice_ptr[0] == 0 and np.all(slice_ptr % W.SLICE == 0)
    assert windows.size * W.SLICE == slice_ptr[-1] == wv.size == wi.size
    assert windows.min(initial=0) >= 0 and windows.max(initial=0) <= n_in - width
    assert wi.max(initial=0) < width
    assert np.array_equal(order[:n_out], np.arange(n_out)) and np.all(order[n_out:] == -1)
    assert np.array_equal(bias[:n_out], layer.bias) and not bias[n_out:].any()
    rebuilt = np.zeros((nsl * W.SLICE, n_in), np.float32)
    hits = np.zeros_like(rebuilt, dtype=np.int64)
    for s in range(nsl):
        slots = range(slice_ptr[s] // W.SLICE, slice_ptr[s + 1] // W.SLICE)
        starts = windows[list(slots)]
        assert np.all(np.diff(starts) >= 0)  # slots ordered by window
        for k in slots:
            lanes = np.arange(W.SLICE)
            v = wv[k * W.SLICE:(k + 1) * W.SLICE]
            cols = windows[k] + wi[k * W.SLICE:(k + 1) * W.SLICE].astype(np.int64)
            nz = v != 0
            rebuilt[s * W.SLICE + lanes[nz], cols[nz]] += v[nz]
            hits[s * W.SLICE + lanes[nz], cols[nz]] += 1
        # each window gets as many slots as its busiest row has nonzeros there (no more: no wasted slot)
        dense = layer.dense_weight()[s * W.SLICE:(s + 1) * W.SLICE]
        for start in np.unique(starts):
            w_id = start // width if start % width == 0 else -(-n_in // width) - 1
            lo, hi = w_id * width, min((w_id + 1) * width, n_in)
            assert np.sum(starts == start) == (dense[:, lo:hi] != 0).sum(axis=1).max()
    assert np.array_equal(rebuilt[:n_out], layer.dense_weight()) and hits.max() <= 1
    assert W.slot_count(layer.csr()[1], layer.rowptr, n_in, width) == windows.size


@pytest.mark.parametrize(("n_out", "n_in", "density"), [
    (37, 45, 0.3),      # ragged: n_out not a multiple of 16, n_in of any window width
    (16, 32, 0.5),      # exactly one slice and one AVX-512 window
    (100, 1024, 0.1),
    (33, 200, 0.02),    # mostly one nonzero per row and window
    (20, 64, 0.0),      # no nonzeros at all
])
@pytest.mark.parametrize("batch", [1, 3, 7])
def test_window_kernel_matches_the_reference_on_every_path(isa, n_out, n_in, density, batch):
    rng = np.random.default_rng(batch + n_out)
    for bias, relu in ((True, True), (False, False)):
        layer = _layer(rng, n_out, n_in, density, bias=bias, relu=relu, zero_rows=[1])
        assert layer.has_window()
        x = rng.standard_normal((batch, n_in)).astype(np.float32)
        for threads in (1, 2, -2):  # -2: exactly two threads, whatever the work
            y = np.full((batch, n_out), np.nan, np.float32)
            layer.run_window(x, y, threads)
            close(y, layer.reference(x))


def test_a_layer_narrower_than_a_window_runs_rows(isa):
    rng = np.random.default_rng(5)
    width = rt.layers.window_width()
    layer = _layer(rng, 20, width - 1, 0.5)
    assert not layer.has_window() and layer.has_window(width - 1)
    x = rng.standard_normal((2, width - 1)).astype(np.float32)
    y = np.empty((2, 20), np.float32)
    layer.run_window(x, y, 1)
    close(y, layer.reference(x))
    model = rt.FastModel([layer], (width - 1,))
    assert [c.kind for c in model.chain_layers([("window", 0, 0)])] == [CHAIN_ROWS]
    close(model.run(x, kernels=["window"]), layer.reference(x))


def test_a_window_width_the_simd_kernel_was_not_built_for_runs_the_generic_kernel(isa):
    rng = np.random.default_rng(6)
    layer = _layer(rng, 40, 50, 0.3)
    wv, wi, sp, order, bias, windows = layer.windowed(8)
    x = rng.standard_normal((2, 50)).astype(np.float32)
    y = np.empty((2, 40), np.float32)
    K.rows(wv, wi, sp, order, bias, x, y, 1, 50, 40, 2, 1, 1, windows, 8)
    close(y, layer.reference(x))


def test_window_chains_run_in_one_call_and_match(isa):
    rng = np.random.default_rng(7)
    layers = [_layer(rng, 300, 100, 0.1), _layer(rng, 64, 300, 0.2), _layer(rng, 10, 64, 0.5, relu=False)]
    model = rt.FastModel(layers, (100,))
    for kernels, kinds in ((["window"] * 3, [CHAIN_WINDOW] * 3), (["window", "rows", "gemv"], [CHAIN_WINDOW,
                                                                                              CHAIN_ROWS, 1])):
        for layer, spec in zip(layers, kernels, strict=True):
            layer.plan = {1: spec}
        assert model.chain(1) is not None
        assert [c.kind for c in model.chain_layers(model.parsed_plan(1))] == kinds
        x = rng.standard_normal((1, 100)).astype(np.float32)
        want = layers[2].reference(layers[1].reference(layers[0].reference(x)))
        close(model.run(x), want)
        close(model.run(x, kernels=kernels, chain=False), want)


def _window_spec(layer: rt.CsrLayer, width: int, **change) -> rt.model.ChainLayer:
    wv, wi, sp, order, bias, windows = (a.copy() if a is not None else None for a in layer.windowed(width))
    fields = dict(kind=CHAIN_WINDOW, values=wv, indices=wi, pointers=sp, order=order, bias=bias, idx_bytes=1,
                  n_in=layer.n_in, n_out=layer.n_out, relu=1, threads=0, windows=windows, window=width)
    fields.update(change)
    return rt.model.ChainLayer(**fields)


@pytest.mark.parametrize(("change", "message"), [
    ("window_past_the_input", "window out of range"),
    ("negative_window", "window out of range"),
    ("index_past_the_window", "index out of range"),
    ("rows_reordered", "bad row order"),
    ("two_byte_indices", "idx_bytes must be 1"),
    ("window_wider_than_input", "idx_bytes must be 1"),
    ("short_windows", "windows buffer too small"),
])
def test_chain_new_refuses_a_window_layout_that_would_read_outside_its_buffers(change, message):
    rng = np.random.default_rng(8)
    layer = _layer(rng, 40, 70, 0.3)
    spec = _window_spec(layer, 32)
    if change == "window_past_the_input":
        spec.windows[3] = 70 - 32 + 1
    elif change == "negative_window":
        spec.windows[0] = -1
    elif change == "index_past_the_window":
        spec.indices[5] = 32
    elif change == "rows_reordered":
        spec.order[[0, 1]] = spec.order[[1, 0]]
    elif change == "two_byte_indices":
        spec = _window_spec(layer, 32, idx_bytes=2)
    elif change == "window_wider_than_input":
        spec = _window_spec(layer, 32, window=71)
    elif change == "short_windows":
        spec = _window_spec(layer, 32, windows=spec.windows[:-1].copy())
    with pytest.raises(ValueError, match=message):
        K.chain_new([spec])
    K.chain_new([_window_spec(layer, 32)])  # the untouched layout is accepted


def test_window_memory_is_counted_before_anything_is_built():
    from sparsekit.runtime.memory import BUILD_BYTES_PER_NNZ, kernel_bytes

    rng = np.random.default_rng(9)
    layer = _layer(rng, 200, 300, 0.1)
    width = rt.layers.window_width()
    slots = W.slot_count(layer.csr()[1], layer.rowptr, 300, width)
    assert slots == layer.windowed(width)[5].size
    assert kernel_bytes(layer, "window", 0) == slots * (5 * W.SLICE + 4) + BUILD_BYTES_PER_NNZ * (layer.nnz + 200)
