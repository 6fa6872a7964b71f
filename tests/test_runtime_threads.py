"""The fast runtime's thread pool: forced thread counts and splits, several Python threads at once, back-to-back
jobs, a forked child, thread caps in the plan. Every result against a dense float64 reference; no timing asserts."""

from __future__ import annotations

import numpy as np
import pytest
from runtime_helpers import K, close, sparse_matrix

import sparsekit.runtime as rt
from sparsekit.errors import InputError
from sparsekit.runtime import layers as L


@pytest.mark.parametrize("batch", [3, 1500])
def test_threaded_paths_match_the_reference(batch):
    # big enough that the kernels really split the work (small calls run on one thread), ragged rows
    rng = np.random.default_rng(10)
    w = sparse_matrix(rng, 1500, 1400, 0.5, zero_rows=range(0, 1500, 7))
    layer = rt.CsrLayer.from_dense(w, rng.standard_normal(1500), relu=True)
    model = rt.FastModel([layer], (1400,))
    x = rng.standard_normal((batch, 1400)).astype(np.float32)
    for spec in ("rows", "panel", "panel:64", "gemv"):
        close(model.run(x, kernels=[spec], threads=2), layer.reference(x))


@pytest.mark.parametrize("split", [1, 2])
@pytest.mark.parametrize("threads", [1, 2, 3, 4, 7])
def test_forced_thread_counts_and_splits_match_the_reference(isa, threading_knobs, split, threads):
    # thresholds 0: every call really runs on `threads` threads; split 1 gives each thread a nnz-balanced
    # range of 64-row groups of every panel, split 2 whole panels; ragged groups, panels and rows
    threading_knobs.set_threading(-1, 0, 0, split)
    rng = np.random.default_rng(threads)
    w = sparse_matrix(rng, 333, 150, 0.2, zero_rows=range(0, 333, 11))
    w[:64] *= rng.random((64, 150)) < 0.2  # unbalanced groups
    layer = rt.CsrLayer.from_dense(w, rng.standard_normal(333), relu=True)
    model = rt.FastModel([layer], (150,))
    for batch in (1, 5, 64, 130, 256):
        x = rng.standard_normal((batch, 150)).astype(np.float32)
        for spec in ("rows", "panel", "panel:32", "gemv"):
            close(model.run(x, kernels=[spec], threads=threads), layer.reference(x))


def test_threaded_chains_match_at_one_and_two_threads(threading_knobs):
    # panel -> panel -> rows-major output over 2 threads, outputs equal the 1-thread run and the reference
    threading_knobs.set_threading(-1, 0, 0, 0)
    rng = np.random.default_rng(12)
    ws = [sparse_matrix(rng, 256, 200, 0.1), sparse_matrix(rng, 130, 256, 0.1), sparse_matrix(rng, 10, 130, 0.3)]
    layers = [rt.CsrLayer.from_dense(w, rng.standard_normal(w.shape[0]), relu=i < 2) for i, w in enumerate(ws)]
    model = rt.FastModel(layers, (200,))
    x = rng.standard_normal((192, 200)).astype(np.float32)
    ref = x
    for layer in layers:
        ref = layer.reference(ref)
    for specs in (["panel", "panel:64", "panel"], ["panel:128", "rows", "panel"], ["rows", "panel", "gemv"]):
        one = model.run(x, kernels=specs, threads=1)
        two = model.run(x, kernels=specs, threads=2)
        close(one, ref)
        close(two, ref)


def test_kernels_called_from_several_python_threads_at_once(threading_knobs):
    # the pool takes one caller at a time; the others run their items on their own thread
    import concurrent.futures

    threading_knobs.set_threading(-1, 0, 0, 0)
    rng = np.random.default_rng(13)
    layer = rt.CsrLayer.from_dense(sparse_matrix(rng, 300, 200, 0.1), rng.standard_normal(300), relu=True)
    models = [rt.FastModel([layer], (200,), threads=2) for _ in range(4)]
    xs = [rng.standard_normal((b, 200)).astype(np.float32) for b in (1, 7, 64, 200)]

    def work(k: int) -> bool:
        for _ in range(30):
            for x in xs:
                close(models[k].run(x, kernels=["panel" if x.shape[0] >= 64 else "rows"]), layer.reference(x))
        return True

    with concurrent.futures.ThreadPoolExecutor(4) as ex:
        assert all(ex.map(work, range(4)))


def test_pool_back_to_back_jobs_with_late_sleeping_and_oversubscribed_workers(threading_knobs):
    # Jobs of different layers, sizes and thread counts back to back, more threads than cores (workers
    # preempted mid-job, items taken by others, workers arriving after their job is over) and workers
    # that sleep between jobs (spin 0): every item is run exactly once, by someone, with its own job's
    # data. Outputs start as NaN so a skipped item shows; a stale worker would write another job's rows.
    rng = np.random.default_rng(15)
    shapes = [(40, 30, 0.3), (300, 200, 0.1), (17, 500, 0.05), (1024, 64, 0.2)]
    layers = [rt.CsrLayer.from_dense(sparse_matrix(rng, o, i, d), rng.standard_normal(o), relu=k % 2 == 0)
              for k, (o, i, d) in enumerate(shapes)]
    xs = [rng.standard_normal((b, lay.n_in)).astype(np.float32) for lay, b in zip(layers, (1, 3, 1, 2), strict=True)]
    refs = [lay.reference(x) for lay, x in zip(layers, xs, strict=True)]
    for spin in (0, 100):
        threading_knobs.set_threading(spin, 0, 0, 0)
        for rep in range(300):
            k, threads = rep % len(layers), (2, 3, 4, 7, 2)[rep % 5]
            y = np.full((xs[k].shape[0], layers[k].n_out), np.nan, np.float32)
            layers[k].run_rows(xs[k], y, -threads)  # negative: exactly that many threads
            close(y, refs[k])


def test_pool_works_in_a_forked_child(threading_knobs, tmp_path):
    import multiprocessing as mp

    if "fork" not in mp.get_all_start_methods():
        pytest.skip("no fork on this platform")
    threading_knobs.set_threading(-1, 0, 0, 0)
    rng = np.random.default_rng(14)
    layer = rt.CsrLayer.from_dense(sparse_matrix(rng, 300, 200, 0.1), rng.standard_normal(300), relu=True)
    model = rt.FastModel([layer], (200,), threads=2)
    x = rng.standard_normal((130, 200)).astype(np.float32)
    model.run(x)  # the parent's workers exist now
    out = tmp_path / "child.npy"
    child = mp.get_context("fork").Process(target=lambda: np.save(out, model.run(x)))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    close(np.load(out), layer.reference(x))
    close(model.run(x), layer.reference(x))  # the parent's pool still works


def test_thread_cap_in_the_plan_is_parsed_recorded_and_honoured(tmp_path):
    assert L.parse_kernel("panel:128@1") == ("panel", 128, 1)
    assert L.parse_kernel("rows") == ("rows", 0, 0)
    for bad in ("rows@0", "rows@x", "rows@-2", "gemv:8@1"):
        with pytest.raises(InputError):
            L.parse_kernel(bad)
    rng = np.random.default_rng(15)
    layers = [rt.CsrLayer.from_dense(sparse_matrix(rng, 70, 40, 0.2), rng.standard_normal(70), relu=True),
              rt.CsrLayer.from_dense(sparse_matrix(rng, 9, 70, 0.3), None, relu=False)]
    layers[0].plan = {1: "rows@1", 256: "panel:32@1"}
    layers[1].plan = {1: "gemv", 256: "dense@1"}
    model = rt.FastModel(layers, (40,), threads=2)
    path = rt.save(model, tmp_path / "m.fast.onnx")
    loaded = rt.load(path, threads=2)
    assert [layer.plan for layer in loaded.layers] == [layers[0].plan, layers[1].plan]  # recorded
    seen: list[tuple[str, int]] = []
    first = loaded.layers[0]
    orig_rows, orig_panel = first.run_rows, first.run_panel

    def spy_rows(x, y, threads):
        seen.append(("rows", threads))
        return orig_rows(x, y, threads)

    def spy_panel(xp, yp, npanels, block, threads, y_rows=None, x_rows=None):
        seen.append(("panel", threads))
        return orig_panel(xp, yp, npanels, block, threads, y_rows=y_rows, x_rows=x_rows)

    first.run_rows, first.run_panel = spy_rows, spy_panel
    # the batch-1 plan runs as one C chain: its layers carry the caps (field threads) ...
    assert [s.threads for s in loaded.chain_layers(loaded.parsed_plan(1))] == [1, 0]
    loaded._make_chain = lambda parsed: None  # ... and the per-layer path (spied here) honours them too
    loaded.plan_changed()
    ref = lambda x: layers[1].reference(layers[0].reference(x))  # noqa: E731
    for batch in (1, 256):
        x = rng.standard_normal((batch, 40)).astype(np.float32)
        close(loaded.run(x), ref(x))
    assert seen == [("rows", 1), ("panel", 1)]  # honoured: capped at one thread of the model's two
    seen.clear()
    first.plan = {1: "rows", 256: "panel:32"}
    loaded.run(rng.standard_normal((1, 40)).astype(np.float32))
    assert seen == [("rows", 2)]


@pytest.mark.skipif(K is None, reason="compiled kernels")
def test_rows_jobs_use_threads_in_proportion_to_their_work(threading_knobs):
    # one thread below the threshold, then one thread per half-threshold of work, at most the count asked
    threading_knobs.set_threading(-1, 1 << 14, -1, -1)
    assert [K.rows_threads(4, w) for w in (0, 16383, 16384, 24575, 24576, 32768, 10**6)] == [1, 1, 2, 2, 3, 4, 4]
    assert K.rows_threads(2, 16384) == 2 and K.rows_threads(1, 10**6) == 1 and K.rows_threads(16, 10**6) == 16
    threading_knobs.set_threading(-1, 0, -1, -1)  # threshold 0 (tests): every job on every thread
    assert K.rows_threads(3, 1) == 1 and K.rows_threads(3, 7) == 3 and K.rows_threads(3, 0) == 1
