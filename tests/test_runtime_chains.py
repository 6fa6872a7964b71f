"""Plans and C chains: the plan cache, the one-call chain of small batches (rows/gemv), its fast path and output
recycling, panel chains (data-parallel batches) and concurrent callers. No timing asserts."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from runtime_helpers import START_ISA, K, close, sparse_matrix

import sparsekit.runtime as rt
from sparsekit.errors import InputError
from sparsekit.runtime import layers as L


@pytest.mark.parametrize("threads", [1, 2])
def test_chains_switch_layouts_between_kernels(isa, threads):
    rng = np.random.default_rng(1)
    ws = [sparse_matrix(rng, 70, 45, 0.2), sparse_matrix(rng, 33, 70, 0.1), sparse_matrix(rng, 9, 33, 0.5)]
    layers = [rt.CsrLayer.from_dense(w, rng.standard_normal(w.shape[0]), relu=i < 2)
              for i, w in enumerate(ws)]
    layers[1].bias = None
    model = rt.FastModel(layers, (5, 9), threads=threads)
    x = rng.standard_normal((67, 5, 9)).astype(np.float32)
    ref = x.reshape(67, -1)
    for layer in layers:
        ref = layer.reference(ref)
    for specs in (["rows", "panel", "dense"], ["panel:8", "dense", "panel"], ["dense", "dense", "rows"],
                  ["panel", "panel:32", "panel"], ["gemv", "panel", "gemv"], ["panel", "gemv", "dense"]):
        close(model.run(x, kernels=specs), ref)
    close(model.run(x), ref)  # default plan
    close(model.run(x[:1]), ref[:1])


def test_plan_cache_follows_plan_changes():
    rng = np.random.default_rng(8)
    layer = rt.CsrLayer.from_dense(sparse_matrix(rng, 20, 30, 0.2), None, relu=False)
    model = rt.FastModel([layer], (30,))
    x = rng.standard_normal((2, 30)).astype(np.float32)
    model.run(x)
    layer.plan = {1: "dense"}  # a new dict is picked up
    assert model.parsed_plan(2) == [("dense", 0, 0)]
    layer.plan[1] = "panel"  # in place: after plan_changed()
    model.plan_changed()
    assert model.parsed_plan(2) == [("panel", 0, 0)]
    close(model.run(x), layer.reference(x))


# ---------------------------------------------------------------- one-call C chain (small batches)
def _chain_model(rng, threads=2, big=False):
    """rows, gemv and rows layers (a gemv-sized middle layer) whose batch-1 plan runs as one C chain."""
    w = 300 if big else 70
    layers = [rt.CsrLayer.from_dense(sparse_matrix(rng, w, 40, 0.1), rng.standard_normal(w), relu=True),
              rt.CsrLayer.from_dense(sparse_matrix(rng, 33, w, 0.9), rng.standard_normal(33), relu=True),
              rt.CsrLayer.from_dense(sparse_matrix(rng, 9, 33, 0.2), None, relu=False)]
    layers[0].plan = {1: "rows", 256: "panel"}
    layers[1].plan = {1: "gemv", 256: "dense"}
    layers[2].plan = {1: "rows", 256: "panel"}
    model = rt.FastModel(layers, (40,), threads=threads)
    ref = lambda x: layers[2].reference(layers[1].reference(layers[0].reference(x)))  # noqa: E731
    return model, ref


@pytest.mark.skipif(K is None, reason="compiled kernels")
def test_chain_path_values_fresh_outputs_and_batch_changes(isa):
    rng = np.random.default_rng(40)
    model, ref = _chain_model(rng)
    assert model.chain(1) is not None and model.chain(256) is None  # chain at 1, panels at 256
    outs = []
    for batch in (1, 3, 1, 7, 256, 1, 2, 0, 1):
        x = rng.standard_normal((batch, 40)).astype(np.float32)
        y = model.run(x)
        close(y, ref(x))
        outs.append((x, y, y.copy()))
    # every call returned its own array: later calls never overwrote an earlier result
    for x, y, snapshot in outs:
        assert np.array_equal(y, snapshot)
        close(y, ref(x))
    ids = {id(y) for _, y, _ in outs}
    assert len(ids) == len(outs)


@pytest.mark.skipif(K is None, reason="compiled kernels")
def test_chain_path_converts_odd_inputs_and_follows_plan_changes():
    rng = np.random.default_rng(41)
    model, ref = _chain_model(rng, threads=1)
    x = rng.standard_normal((2, 40)).astype(np.float32)
    close(model.run(x), ref(x))  # caches the chain for batch 2
    for odd in (x.astype(np.float64), np.asfortranarray(x), np.repeat(x, 2, axis=1)[:, ::2], x.tolist()):
        close(model.run(odd), ref(x))
    with pytest.raises(InputError):
        model.run(np.zeros((2, 41), dtype=np.float32))
    model.layers[1].plan = {1: "rows"}  # assigning a plan invalidates the cached chain
    assert model.kernels_for(2)[1] == "rows"
    close(model.run(x), ref(x))
    assert model.chain(2) is not None
    model.layers[1].plan = {1: "panel"}  # a panel layer: no chain, the per-layer path
    close(model.run(x), ref(x))
    assert model.chain(2) is None
    assert model.run(x, threads=2) is not model.run(x)
    close(model.run(x, threads=2), ref(x))


@pytest.mark.skipif(K is None, reason="compiled kernels")
@pytest.mark.parametrize("plan", ["rows", "panel"])
def test_fast_path_recycles_only_outputs_nothing_references(plan):
    """run() hands an output out again once the caller let go of it (one of the last two), never one that
    is still referenced (a name, a view, a buffer export) or was reshaped, retyped or frozen in place."""
    import sys

    rng = np.random.default_rng(44)
    model, ref = _chain_model(rng, threads=2)
    if plan == "panel":  # an all-panel chain
        for layer in model.layers:
            layer.plan = {1: "panel"}
    x = rng.standard_normal((1, 40)).astype(np.float32)
    x2 = rng.standard_normal((1, 40)).astype(np.float32)
    model.run(x)  # prepares the chain; from here on run() is one C call
    assert model.chain(1) is not None

    y = model.run(x)
    yid = id(y)
    assert sys.getrefcount(y) == 3  # y, getrefcount's argument and the chain's spare
    y[:] = np.nan  # a caller may scribble on its output before letting go of it
    del y
    y = model.run(x2)
    assert id(y) == yid  # recycled ...
    close(y, ref(x2))  # ... and fully rewritten

    held = [model.run(x), model.run(x2), model.run(x)]  # `y` and these hold every spare: new arrays
    assert len({id(a) for a in [y, *held]}) == 4
    view = model.run(x2)[0]  # only a view survives: its base is still referenced
    mem = memoryview(model.run(x2))  # a buffer export
    for _ in range(3):
        model.run(rng.standard_normal((1, 40)).astype(np.float32))
    close(y, ref(x2))
    close(held[0], ref(x))
    close(held[1], ref(x2))
    close(view, ref(x2)[0])
    close(np.asarray(mem), ref(x2))
    del y, held, view, mem

    for change in ("shape", "dtype", "frozen"):
        keep = model.run(x)  # holds one spare: the next output lands in the other
        y = model.run(x)
        yid = id(y)
        if change == "shape":
            y.shape = (-1,)
        elif change == "dtype":
            y.dtype = np.int32
        else:
            y.flags.writeable = False
        del y
        out = model.run(x2)  # the changed array is not handed out: a new one is
        assert id(out) != yid and out.shape == (1, 9) and out.dtype == np.float32 and out.flags.writeable
        close(out, ref(x2))
        close(keep, ref(x))
        del out, keep

    y = model.run(x)
    model.release_scratch()  # drops the spares
    assert sys.getrefcount(y) == 2


@pytest.mark.skipif(K is None, reason="compiled kernels")
@pytest.mark.parametrize("plan", ["rows", "panel"])
def test_fast_path_takes_inputs_in_the_models_own_shape(plan):
    """Image-shaped inputs (batch, *input_shape) run the one-call fast path (the chain's reference to its
    output shows it: the per-layer path keeps none); other shapes with as many features are refused."""
    import sys

    rng = np.random.default_rng(46)
    base, _ = _chain_model(rng, threads=1)
    if plan == "panel":
        for layer in base.layers:
            layer.plan = {1: "panel"}
    model = rt.FastModel(base.layers, (1, 5, 8), threads=1)
    ref = lambda x: model.layers[2].reference(model.layers[1].reference(model.layers[0].reference(x)))  # noqa: E731
    x = rng.standard_normal((1, 1, 5, 8)).astype(np.float32)
    close(model.run(x), ref(x.reshape(1, 40)))  # prepares the chain
    y = model.run(x)
    assert sys.getrefcount(y) == 3  # y, the argument and the chain's spare: the fast path
    close(y, ref(x.reshape(1, 40)))
    flat = model.run(x.reshape(1, 40))
    assert sys.getrefcount(flat) == 3 and np.array_equal(flat, y)  # flat inputs too
    for bad in ((1, 5, 8), (1, 40, 1), (1, 8, 5, 1)):
        with pytest.raises(InputError, match="expected \\(batch, 1, 5, 8\\)"):
            model.run(np.zeros(bad, dtype=np.float32))


@pytest.mark.skipif(K is None, reason="compiled kernels")
def test_fast_path_keeps_no_large_outputs():
    """Outputs over 16 MiB are not kept for reuse."""
    import sys

    rng = np.random.default_rng(45)
    layer = rt.CsrLayer.from_dense(sparse_matrix(rng, 4200, 4, 0.5), None, relu=False)
    model = rt.FastModel([layer], (4,), threads=1)
    for batch, kept in ((900, True), (1100, False)):  # 15.1 MB, 18.5 MB
        layer.plan = {batch: "rows"}
        x = rng.standard_normal((batch, 4)).astype(np.float32)
        model.run(x)
        y = model.run(x)
        assert sys.getrefcount(y) == (3 if kept else 2)
        close(y, layer.reference(x))
        del y


def _errors_from_threads(n: int, calls: int, one_call) -> list[str]:
    """Run ``one_call(k, it)`` (True when its result is right) ``calls`` times on each of ``n`` Python
    threads at once; the (thread, iteration) pairs that went wrong."""
    import threading

    errors: list[str] = []

    def worker(k: int) -> None:
        for it in range(calls):
            if not one_call(k, it):
                errors.append(f"thread {k} iteration {it}")

    workers = [threading.Thread(target=worker, args=(k,)) for k in range(n)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    return errors


def _within(y: np.ndarray, ref: np.ndarray) -> bool:
    """``close`` as a predicate (for worker threads, where an assert would be lost)."""
    return y.shape == ref.shape and float(np.abs(y - ref).max()) <= 1e-5 * max(1.0, float(np.abs(ref).max()))


def test_chain_concurrent_callers_get_their_own_results():
    rng = np.random.default_rng(42)
    model, ref = _chain_model(rng, threads=2, big=True)
    inputs = [rng.standard_normal((b, 40)).astype(np.float32) for b in (1, 1, 2, 3, 1, 4)]
    refs = [ref(x) for x in inputs]
    chain = model.chain(1)

    def one_call(k: int, it: int) -> bool:
        i = (k + it) % len(inputs)
        y = model.run(inputs[i])
        if it % 3 == 0:  # also the bare C call (no Python lock exists on this path)
            y2 = np.empty_like(y)
            if K.chain_run(chain, inputs[i][:1], y2[:1], 2):
                y = np.concatenate([y2[:1], y[1:]])
        return _within(y, refs[i])

    errors = _errors_from_threads(2, 300, one_call)
    assert not errors, errors[:5]


@pytest.mark.skipif(K is None, reason="compiled kernels")
def test_chain_new_validates_once():
    rng = np.random.default_rng(43)
    model, _ = _chain_model(rng)
    specs = model.chain_layers(model.parsed_plan(1))
    bad_sizes = [specs[0], specs[2]]  # 70 outputs into a 33-input layer
    with pytest.raises(ValueError):
        K.chain_new(bad_sizes)
    short = replace(specs[0], values=specs[0].values[:3])  # values shorter than the slice pointers say
    with pytest.raises(ValueError):
        K.chain_new([short])
    with pytest.raises(ValueError):
        K.chain_new([])
    for shape in ((3, 3), (40, 2), (1,) * 9 + (40,)):  # the input shape must hold n_in = 40 in <= 8 dims
        with pytest.raises(ValueError, match="input shape"):
            K.chain_new(specs, shape)
    chain = K.chain_new(specs)
    with pytest.raises(ValueError):
        K.chain_run(chain, np.zeros((2, 40), np.float32), np.zeros((1, 9), np.float32), 1)
    assert K.chain_run(chain, np.zeros((2, 40), np.float64), np.zeros((2, 9), np.float32), 1) is False


# ---------------------------------------------------------------- panel chains (data-parallel batches)
def _panel_chain_model(rng, threads=2):
    """panel layers only: odd widths, an empty row, no bias on the last layer, column blocks."""
    ws = [sparse_matrix(rng, 150, 70, 0.15, zero_rows=(3,)), sparse_matrix(rng, 33, 150, 0.3),
          sparse_matrix(rng, 9, 33, 0.4)]
    layers = [rt.CsrLayer.from_dense(w, rng.standard_normal(w.shape[0]) if i < 2 else None, relu=i < 2)
              for i, w in enumerate(ws)]
    model = rt.FastModel(layers, (70,), threads=threads)
    ref = lambda x: layers[2].reference(layers[1].reference(layers[0].reference(x)))  # noqa: E731
    return model, ref


@pytest.mark.skipif(K is None, reason="compiled kernels")
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_panel_chain_matches_the_reference_whole_and_half_panels(isa, threading_knobs, threads):
    # thresholds 0: every call splits. Batches of whole panels, one panel (two 32-sample halves with
    # AVX-512 on 2 threads; up to 32 or 16 samples on one thread: a half or quarter panel), ragged last panels and
    # halves, more units than threads and fewer
    threading_knobs.set_threading(-1, 0, 0, 0)
    rng = np.random.default_rng(50 + threads)
    model, ref = _panel_chain_model(rng, threads)
    for specs in (["panel"] * 3, ["panel:32", "panel:64", "panel"], ["panel@1", "panel", "panel"]):
        chain = model._make_chain([L.parse_kernel(s) for s in specs])
        assert chain is not None
        for batch in (1, 5, 32, 33, 63, 64, 65, 100, 128, 130, 192, 256):
            x = rng.standard_normal((batch, 70)).astype(np.float32)
            y = np.full((batch, 9), np.nan, np.float32)
            p = -(-batch // 64)
            nt = 1 if specs[0].endswith("@1") else threads
            # panels that do not split evenly: half panels (AVX-512); one panel or less: its rows split
            # between the threads layer by layer; else the chain declines (False) and the runtime runs
            # the layers one by one, splitting rows
            runs = nt == 1 or p == 1 or p % nt == 0 or (K.isa() == "avx512" and (2 * p) % nt == 0)
            assert K.chain_run(chain, x, y, threads) is runs
            if runs:
                close(y, ref(x))
            close(model.run(x, kernels=specs, chain=True), ref(x))


@pytest.mark.skipif(K is None, reason="compiled kernels")
def test_panel_plan_runs_as_one_chain_and_concurrent_callers_get_their_own_results(threading_knobs):
    threading_knobs.set_threading(-1, 0, 0, 0)
    rng = np.random.default_rng(51)
    model, ref = _panel_chain_model(rng, threads=2)
    for layer in model.layers:
        layer.plan = {1: "rows", 64: "panel"}
    model.plan_changed()
    assert model.chain(64) is not None and model.chain(200) is not None  # all-panel plans: a chain
    assert model.chain(1) is not None  # all-rows: the small-batch chain
    mixed = [L.parse_kernel(s) for s in ("panel", "rows", "panel")]
    assert model._make_chain(mixed) is None  # mixed layouts run layer by layer
    inputs = [rng.standard_normal((b, 70)).astype(np.float32) for b in (64, 100, 256, 64, 130)]
    refs = [ref(x) for x in inputs]

    def one_call(k: int, it: int) -> bool:
        i = (k + it) % len(inputs)
        return _within(model.run(inputs[i]), refs[i])

    errors = _errors_from_threads(3, 60, one_call)
    assert not errors, errors[:5]


@pytest.mark.skipif(K is None, reason="compiled kernels")
def test_panel_chain_new_refuses_bad_layouts():
    rng = np.random.default_rng(52)
    model, _ = _panel_chain_model(rng)
    specs = model.chain_layers([L.parse_kernel("panel")] * 3)
    rows_spec = _chain_model(rng)[0].chain_layers([L.parse_kernel("rows")] * 1 + [L.parse_kernel("gemv")]
                                                  + [L.parse_kernel("rows")])[0]
    with pytest.raises(ValueError, match="all panel layers or none"):
        K.chain_new([rows_spec, specs[1]])
    bad = replace(specs[0], pointers=specs[0].pointers.copy())
    bad.pointers[5] = bad.pointers[4] - 1  # block pointers going backwards
    with pytest.raises(ValueError, match="block pointers"):
        K.chain_new([bad])
    bad = replace(specs[0], pointers=specs[0].pointers.copy())
    bad.pointers[0] = 1
    with pytest.raises(ValueError, match="block pointers"):
        K.chain_new([bad])
    bad = replace(specs[0], indices=specs[0].indices.copy())
    bad.indices[0] = 70  # a column index past n_in
    with pytest.raises(ValueError, match="index out of range"):
        K.chain_new([bad])
    bad = replace(specs[0], order=np.full_like(specs[0].order, 150))  # a row order past n_out
    with pytest.raises(ValueError, match="row order"):
        K.chain_new([bad])


@pytest.mark.skipif(K is None, reason="compiled kernels")
@pytest.mark.parametrize("threads", [2, 3])
def test_panel_chain_splits_the_rows_of_one_panel_of_big_layers(isa, threads):
    # one panel or less on 2+ threads at the default thresholds: half panels on 2 threads only while the
    # weights fit well within L2 (every thread reads all of them); above that, or on 3 threads, the
    # chain splits every layer's rows between the threads (the last layer's rows straight into y, in
    # 16, 32 or 64 lanes); three panels on 2 threads of big layers: the chain declines (False)
    rng = np.random.default_rng(53)
    ws = [sparse_matrix(rng, 700, 600, 0.5), sparse_matrix(rng, 300, 700, 0.3)]
    layers = [rt.CsrLayer.from_dense(w, rng.standard_normal(w.shape[0]), relu=i == 0) for i, w in enumerate(ws)]
    assert layers[0].nnz * (4 + layers[0].idx_bytes) > 1 << 20
    model = rt.FastModel(layers, (600,), threads=threads)
    ref = lambda x: layers[1].reference(layers[0].reference(x))  # noqa: E731
    for specs in (["panel", "panel"], ["panel:128", "panel:256"]):
        chain = model._make_chain([L.parse_kernel(s) for s in specs])
        for batch in (1, 9, 16, 17, 32, 40, 64, 128, 192):
            x = rng.standard_normal((batch, 600)).astype(np.float32)
            y = np.full((batch, 300), np.nan, np.float32)
            runs = batch <= 64 or (batch // 64) % threads == 0
            assert K.chain_run(chain, x, y, threads) is runs
            if runs:
                close(y, ref(x))
            close(model.run(x, kernels=specs, chain=True), ref(x))


def test_large_outputs_are_cache_line_aligned_on_every_path():
    # the panel kernel's fused transpose writes whole 64-byte lines only into an aligned output: an
    # unaligned one (numpy's large allocations sit 16 bytes past a page) ran 4096x1024 batch 256 15% slower
    rng = np.random.default_rng(55)
    layer = rt.CsrLayer.from_dense(sparse_matrix(rng, 1100, 30, 0.2), rng.standard_normal(1100), relu=True)
    model = rt.FastModel([layer], (30,))
    x = rng.standard_normal((64, 30)).astype(np.float32)  # 70,400 outputs: above the aligned size
    outs = [model.run(x, kernels=["panel"]), model.run(x, kernels=["panel"], chain=True), model.run(x),
            model.run(x)]  # layer by layer, forced chain, planned chain, fast path
    for y in outs:
        assert y.ctypes.data % 64 == 0 and y.shape == (64, 1100)
        close(y, layer.reference(x))
    small = model.run(x[:2])
    assert small.shape == (2, 1100)


@pytest.mark.skipif(K is None or "avx512" not in K.available_isas(), reason="AVX-512 partial panels")
def test_one_partial_panel_splits_rows_by_work_per_layer(threading_knobs):
    # a chain of one partial panel splits every layer's rows between the threads from 2x the panel
    # minimum of nonzeros x batch per layer (each layer is one pool job, and the layers after the first
    # read the other thread's half of the activations): one layer of 16384 nonzeros splits from batch 8,
    # two such layers also from batch 8, not at 7 (where their total would pass a whole-chain rule)
    threading_knobs.set_threading(-1, -1, 1 << 16, 0)
    K.set_isa("avx512")
    try:
        rng = np.random.default_rng(54)
        w = np.zeros((1024, 1024), np.float32)
        for r in range(1024):
            w[r, rng.choice(1024, 16, replace=False)] = rng.standard_normal(16)
        for n_layers in (1, 2):
            layers = [rt.CsrLayer.from_dense(w, None, relu=True) for _ in range(n_layers)]
            assert sum(layer.nnz for layer in layers) == 16384 * n_layers
            model = rt.FastModel(layers, (1024,), threads=2)
            chain = model._make_chain([L.parse_kernel("panel")] * n_layers)
            split = K.chain_plan(chain, 8, 2)
            assert split == {"threads": 2, "lanes": 16, "rows_split": True, "units": 1}
            assert K.chain_plan(chain, 7, 2) == {"threads": 1, "lanes": 16, "rows_split": False, "units": 1}
            assert K.chain_plan(chain, 8, 1)["threads"] == 1
            x = rng.standard_normal((8, 1024)).astype(np.float32)
            y = np.full((8, 1024), np.nan, np.float32)
            assert K.chain_run(chain, x, y, 2) is True
            ref = x
            for layer in layers:
                ref = layer.reference(ref)
            close(y, ref)
    finally:
        K.set_isa(START_ISA)
