"""The ``block`` kernel (R x 1 row blocks): detection from the nonzeros, its layout, its results on every code
path (single layer, chains, convolutions), the plan's choice, memory counting and the checks ``chain_new``
makes on a block layout."""

from __future__ import annotations

import numpy as np
import pytest
from runtime_helpers import K, close

import sparsekit.runtime as rt
from sparsekit.runtime import blocks as BL
from sparsekit.runtime.conv import ConvGeometry, SparseConv
from sparsekit.runtime.layers import PANEL, aligned_empty, aligned_zeros, to_panels
from sparsekit.runtime.model import CHAIN_BLOCK, CHAIN_PANEL, default_kernel

pytestmark = pytest.mark.skipif(K is None, reason="no compiled kernels")


def block_matrix(rng: np.random.Generator, n_out: int, n_in: int, r: int, density: float, *,
                 empty_block_rows: tuple[int, ...] = ()) -> np.ndarray:
    """A weight whose nonzeros are whole r x 1 blocks (about ``density`` of them on)."""
    on = rng.random((n_out // r, n_in)) < density
    on[list(empty_block_rows)] = False
    w = rng.standard_normal((n_out, n_in)).astype(np.float32) * np.repeat(on, r, axis=0)
    w[w == 0] = 0  # no negative zeros
    return w


def _layer(rng, n_out, n_in, r, density, *, bias=True, relu=True, **kw) -> rt.CsrLayer:
    b = rng.standard_normal(n_out).astype(np.float32) if bias else None
    return rt.CsrLayer.from_dense(block_matrix(rng, n_out, n_in, r, density, **kw), b, relu=relu)


@pytest.mark.parametrize("r", [2, 4, 8, 16])
def test_the_largest_block_height_that_fits_is_detected(r):
    rng = np.random.default_rng(r)
    layer = _layer(rng, 64, 50, r, 0.3)
    assert layer.row_block() == r
    unstructured = rt.CsrLayer.from_dense(rng.standard_normal((64, 50)) * (rng.random((64, 50)) < 0.3), None, True)
    assert unstructured.row_block() == 0 and not unstructured.has_block()


def test_detection_needs_the_height_to_divide_the_rows_and_some_nonzeros():
    rng = np.random.default_rng(1)
    assert _layer(rng, 36, 40, 4, 0.3).row_block() == 4  # 36 rows: 8 and 16 do not divide them
    assert rt.CsrLayer.from_dense(np.zeros((16, 8), np.float32), None, True).row_block() == 0


def test_rows_that_share_only_a_prefix_of_their_block_rows_columns_are_not_blocks():
    w = np.zeros((32, 20), np.float32)
    w[0::2, :10] = 1.0  # even rows: columns 0-9; odd rows: 0-4, the same start but half the columns
    w[1::2, :5] = 2.0
    layer = rt.CsrLayer.from_dense(w, None, True)
    assert layer.row_block() == 0  # as 2x1 blocks a third of the stored weights would be padding


def test_a_block_with_a_few_zero_weights_inside_is_still_a_block_more_is_not():
    rng = np.random.default_rng(2)
    w = block_matrix(rng, 64, 200, 4, 0.3)
    nz = np.flatnonzero(w)
    few = w.copy()
    few.flat[nz[:: 200]] = 0  # 0.5% of the weights inside blocks are zero: still 4x1 (layout pads them)
    assert rt.CsrLayer.from_dense(few, None, True).row_block() == 4
    many = w.copy()
    many.flat[nz[:: 20]] = 0  # 5%: more padding than MAX_FILL allows
    assert rt.CsrLayer.from_dense(many, None, True).row_block() == 0


@pytest.mark.parametrize("block", [0, 16, 64])
@pytest.mark.parametrize("r", [2, 4, 16])
def test_layout_holds_every_weight_once_in_its_block_row_and_column_block(r, block):
    rng = np.random.default_rng(r + block)
    w = block_matrix(rng, 48, 100, r, 0.3, empty_block_rows=(1,))
    w.flat[np.flatnonzero(w)[::300]] = 0  # a few zeros inside blocks: padded
    layer = rt.CsrLayer.from_dense(w, None, True)
    assert layer.row_block() == r
    bv, bi, bptr, nb = BL.build(*layer.csr(), 100, r, block, 32, aligned_zeros)
    nbr = 48 // r
    assert nb == (-(-100 // block) if block else 1) and bptr.shape == (nb * nbr + 1,) and bptr[0] == 0
    assert np.all(np.diff(bptr) >= 0) and bv.size == bptr[-1] * r + 32 and bi.size == bptr[-1] + 32
    rebuilt = np.zeros_like(w)
    for c in range(nb):
        for br in range(nbr):
            cols = bi[bptr[c * nbr + br]:bptr[c * nbr + br + 1]].astype(np.int64)
            assert np.all(np.diff(cols) > 0)  # each column once, ascending
            if block:
                assert np.all(cols // block == c)
            for k, col in zip(range(bptr[c * nbr + br], bptr[c * nbr + br + 1]), cols, strict=True):
                rebuilt[br * r:(br + 1) * r, col] += bv[k * r:(k + 1) * r]
    assert np.array_equal(rebuilt, w)
    assert all(bptr[c * nbr + 2] == bptr[c * nbr + 1] for c in range(nb))  # block row 1 is empty in every block


def _run_block(layer: rt.CsrLayer, x: np.ndarray, block: int, threads: int) -> np.ndarray:
    xp, npanels = to_panels(x, layer.n_in)
    yp = aligned_empty(npanels * layer.n_out * PANEL)
    y = np.full((x.shape[0], layer.n_out), np.nan, np.float32)
    layer.run_panel(xp, yp, npanels, block, threads, y_rows=y, row_blocks=True)
    return y


@pytest.mark.parametrize(("n_out", "n_in", "r", "density", "block"), [
    (48, 37, 4, 0.3, 0),       # rows not a multiple of a 64-row group, odd input width
    (64, 300, 2, 0.1, 128),    # R = 2 (its own register tile), column blocks with a ragged last one
    (32, 1, 8, 1.0, 0),        # a single input column
    (128, 200, 16, 0.2, 64),   # R = 16: four 4-row passes over each block row
    (16, 50, 4, 0.0, 0),       # no nonzeros in a block row of the kernel's (all empty)
])
@pytest.mark.parametrize("batch", [1, 16, 33, 64, 130])
def test_block_kernel_matches_the_reference_on_every_path(isa, n_out, n_in, r, density, block, batch):
    rng = np.random.default_rng(n_out + batch)
    for bias, relu in ((True, True), (False, False)):
        layer = _layer(rng, n_out, n_in, r, density, bias=bias, relu=relu, empty_block_rows=(0,))
        x = rng.standard_normal((batch, n_in)).astype(np.float32)
        for threads in (1, 2, -2):  # -2: exactly two threads (rows split between them), whatever the work
            y = _run_block(layer, x, block, threads) if layer.has_block() else None
            if y is None:  # no nonzeros: nothing to detect, the plan runs panel
                assert density == 0.0
                continue
            close(y, layer.reference(x))


@pytest.mark.parametrize("batch", [1, 8, 16, 40, 64, 100, 200])
def test_block_chains_run_in_one_call_and_match(isa, batch):
    rng = np.random.default_rng(batch)
    layers = [_layer(rng, 128, 100, 4, 0.2), _layer(rng, 64, 128, 8, 0.3),
              rt.CsrLayer.from_dense(rng.standard_normal((10, 64)) * (rng.random((10, 64)) < 0.4), None, False)]
    model = rt.FastModel(layers, (100,))
    x = rng.standard_normal((batch, 100)).astype(np.float32)
    want = layers[2].reference(layers[1].reference(layers[0].reference(x)))
    for kernels in (["block", "block:64", "panel"], ["block", "dense", "rows"], ["block:32", "block", "block"]):
        parsed = [rt.layers.parse_kernel(s) for s in kernels]
        kinds = [c.kind for c in model.chain_layers(parsed)] if "dense" not in kernels else None
        if kinds is not None:  # block on a layer without row blocks is the panel kernel
            assert kinds == [CHAIN_BLOCK, CHAIN_BLOCK, CHAIN_PANEL]
        for threads in (1, 2):
            close(model.run(x, kernels=kernels, chain=True, threads=threads), want)
            close(model.run(x, kernels=kernels, chain=False, threads=threads), want)


def test_the_heuristic_picks_block_for_row_blocked_layers_from_the_panel_batch():
    rng = np.random.default_rng(3)
    blocked = _layer(rng, 256, 1024, 4, 0.1)
    plain = rt.CsrLayer.from_dense(rng.standard_normal((256, 1024)) * (rng.random((256, 1024)) < 0.1), None, True)
    assert [default_kernel(blocked, b) for b in (16, 256)] == ["block", "block"]
    assert [default_kernel(plain, b) for b in (16, 256)] == ["panel:128", "panel:128"]
    assert default_kernel(blocked, 1) != "block"
    model = rt.FastModel([blocked], (1024,))
    assert model.chain(64) is not None and model.chain_layers(model.parsed_plan(64))[0].kind == CHAIN_BLOCK


def test_calibration_offers_block_and_the_same_plan_on_panel():
    from sparsekit.runtime.tune import candidates, chain_candidates

    rng = np.random.default_rng(4)
    layer = _layer(rng, 256, 300, 4, 0.1)
    model = rt.FastModel([layer], (300,))
    cands = chain_candidates(model, 64)
    assert cands["heuristic"] == ["block"] and cands["unblocked"] == ["panel"]
    assert {"block", "block:128", "panel"} <= set(candidates(layer, 64))


def test_a_row_blocked_convolution_runs_the_block_kernel(isa):
    rng = np.random.default_rng(5)
    same, strided = ConvGeometry((3, 3), (1, 1), (1, 1, 1, 1)), ConvGeometry((3, 3), (2, 2), (1, 0, 1, 0))
    for r, geometry in ((4, same), (8, strided)):
        w = block_matrix(rng, 16, 6 * 9, r, 0.3)
        layer = rt.CsrLayer.from_dense(w, rng.standard_normal(16).astype(np.float32), True)
        conv = SparseConv(layer, 6, geometry)
        assert conv.kernel == "block" and layer.row_block() == r
        x = rng.standard_normal((3, 6, 11, 9)).astype(np.float32)
        for threads in (1, 2):
            close(conv.run(x, threads=threads), conv.reference(x))


@pytest.mark.parametrize(("hw", "batch"), [(4, 5), (7, 3), (3, 9), (8, 2)])
def test_convolutions_with_fewer_than_64_output_pixels_share_panels_between_images(isa, hw, batch):
    """4x4 outputs: 4 images a panel (5 images: a full panel and a partial one); 7x7: 1 image (49 pixels); 3x3:
    7 images (9 samples: 7 + 2); 8x8: exactly one panel an image."""
    rng = np.random.default_rng(hw * batch)
    for w in (block_matrix(rng, 16, 5 * 9, 4, 0.3), rng.standard_normal((16, 45)) * (rng.random((16, 45)) < 0.2)):
        layer = rt.CsrLayer.from_dense(w, rng.standard_normal(16).astype(np.float32), True)
        conv = SparseConv(layer, 5, ConvGeometry((3, 3), (1, 1), (1, 1, 1, 1)))
        x = rng.standard_normal((batch, 5, hw, hw)).astype(np.float32)
        for threads in (1, 2):
            close(conv.run(x, threads=threads), conv.reference(x))


def _block_spec(layer: rt.CsrLayer, **change) -> rt.model.ChainLayer:
    bv, bi, bptr, nb = (a.copy() if isinstance(a, np.ndarray) else a for a in layer.row_blocked(0))
    fields = dict(kind=CHAIN_BLOCK, values=bv, indices=bi, pointers=bptr, order=None, bias=layer.bias,
                  idx_bytes=layer.idx_bytes, n_in=layer.n_in, n_out=layer.n_out, relu=1, threads=0, blocks=nb,
                  rows_per_block=layer.row_block())
    fields.update(change)
    return rt.model.ChainLayer(**fields)


@pytest.mark.parametrize(("change", "message"), [
    ("column_past_the_input", "index out of range"),
    ("height_not_dividing_rows", "rows_per_block must be 2, 4, 8 or 16 and divide n_out"),
    ("height_not_supported", "rows_per_block must be 2, 4, 8 or 16"),
    ("row_order_given", "order None"),
    ("pointers_decreasing", "bad block pointers"),
    ("values_for_one_row_an_entry", "values buffer too small"),
    ("short_pointers", "block pointers buffer too small"),
])
def test_chain_new_refuses_a_block_layout_that_would_read_outside_its_buffers(change, message):
    rng = np.random.default_rng(6)
    layer = _layer(rng, 40, 70, 4, 0.3)
    spec = _block_spec(layer)
    if change == "column_past_the_input":
        spec.indices[3] = 70
    elif change == "height_not_dividing_rows":
        spec = _block_spec(layer, rows_per_block=16)
    elif change == "height_not_supported":
        spec = _block_spec(layer, rows_per_block=5)
    elif change == "row_order_given":
        spec = _block_spec(layer, order=np.arange(40, dtype=np.int32))
    elif change == "pointers_decreasing":
        spec.pointers[2], spec.pointers[3] = spec.pointers[3], spec.pointers[2] - 1
    elif change == "values_for_one_row_an_entry":
        spec = _block_spec(layer, values=spec.values[:spec.pointers[-1] + 32].copy())
    elif change == "short_pointers":
        spec = _block_spec(layer, pointers=spec.pointers[:-1].copy())
    with pytest.raises(ValueError, match=message):
        K.chain_new([spec])
    K.chain_new([_block_spec(layer)])  # the untouched layout is accepted


def test_single_layer_and_convolution_entry_points_refuse_a_bad_block_height():
    rng = np.random.default_rng(7)
    layer = _layer(rng, 40, 70, 4, 0.3)
    bv, bi, bptr, nb = layer.row_blocked(0)
    xp = aligned_zeros(70 * PANEL)
    yp = aligned_zeros(40 * PANEL)
    with pytest.raises(ValueError, match="rows per block must be 1, 2, 4, 8 or 16 and divide n_out"):
        K.panel(bv, bi, bptr, None, xp, yp, 2, 70, 40, 1, nb, 1, 1, None, 0, None, None, 16)
    with pytest.raises(ValueError, match="values buffer too small"):
        K.panel(bv[:bptr[-1] + 32].copy(), bi, bptr, None, xp, yp, 2, 70, 40, 1, nb, 1, 1, None, 0, None, None, 4)
    conv = _layer(rng, 40, 63, 4, 0.3)  # 7 channels x 3 x 3
    cv, ci, cptr, cnb = conv.row_blocked(0)
    x = np.zeros((1, 7, 3, 3), np.float32)
    y = np.zeros((1, 40, 3, 3), np.float32)
    geometry = (7, 3, 3, 3, 3, 1, 1, 1, 1, 1, 1, 3, 3)
    for rb in (3, 16):
        with pytest.raises(ValueError, match="rows per block must be 1, 2, 4, 8 or 16 and divide C_out"):
            K.conv(cv, ci, cptr, None, None, x, y, 2, 63, 40, cnb, 1, 1, 1, geometry, None, rb)
    K.conv(cv, ci, cptr, None, None, x, y, 2, 63, 40, cnb, 1, 1, 1, geometry, None, 4)


def test_block_memory_is_counted_before_anything_is_built():
    from sparsekit.runtime.memory import BUILD_BYTES_PER_ENTRY, BUILD_BYTES_PER_NNZ, kernel_bytes

    rng = np.random.default_rng(8)
    layer = _layer(rng, 200, 300, 4, 0.1)
    bv, bi, _, _ = layer.row_blocked(0)
    stored = int(layer.nnz * (1 + BL.MAX_FILL)) + 4
    panels = 2 * PANEL * 4 * (300 + 200)
    want = stored * 4 + (stored // 4) * 2 + (8 + BUILD_BYTES_PER_ENTRY) * 50 + BUILD_BYTES_PER_NNZ * (layer.nnz + 200)
    assert kernel_bytes(layer, "block", 0) == want + panels
    assert (bv.size - 32) * 4 + (bi.size - 32) * 2 <= stored * 4 + (stored // 4) * 2  # the bound holds the layout
    assert kernel_bytes(layer, "block", 0) < kernel_bytes(layer, "panel", 0)  # one index per 4 weights


def test_an_artifact_with_block_plans_round_trips_and_stays_portable(tmp_path):
    import onnxruntime as ort

    rng = np.random.default_rng(9)
    layers = [_layer(rng, 64, 48, 4, 0.3), _layer(rng, 32, 64, 8, 0.3, relu=False)]
    for layer in layers:
        layer.plan = {1: "rows", 64: "block", 256: "block:32"}
    path = rt.save(rt.FastModel(layers, (48,)), tmp_path / "m.fast.onnx")
    loaded = rt.load(path, replan=False)
    assert [layer.plan for layer in loaded.layers] == [{1: "rows", 64: "block", 256: "block:32"}] * 2
    assert loaded.chain_layers(loaded.parsed_plan(64))[0].kind == CHAIN_BLOCK
    x = rng.standard_normal((70, 48)).astype(np.float32)
    want = layers[1].reference(layers[0].reference(x))
    close(loaded.run(x), want)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    close(sess.run(None, {sess.get_inputs()[0].name: x})[0], want)  # stock ONNX Runtime: the same CSR, no blocks
