"""What crosses the Python -> C boundary for a prepared chain: chain_new reads each layer's fields by name
(``ChainLayer``) and says which layer and field is wrong; run()'s fast path holds its own batch -> chain
cache, dropped when a layer's plan is replaced."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

import sparsekit.runtime as rt
from sparsekit.runtime import layers as L

K = L._K
pytestmark = pytest.mark.skipif(K is None, reason="compiled kernels")


def _rows_layer() -> tuple[rt.FastModel, L.CsrLayer]:
    rng = np.random.default_rng(7)
    w = np.where(rng.random((16, 16)) < 0.3, rng.standard_normal((16, 16)), 0).astype(np.float32)
    layer = rt.CsrLayer.from_dense(w, rng.standard_normal(16), relu=True, plan={1: "rows", 4: "rows"})
    return rt.FastModel([layer], (16,), threads=1), layer


def test_chain_new_reads_named_fields_and_names_the_bad_one():
    model, layer = _rows_layer()
    spec = model.chain_layers([L.parse_kernel("rows")])[0]
    chain = K.chain_new([SimpleNamespace(**vars(spec))])  # any object with the fields will do
    x = np.ones((1, 16), np.float32)
    y = np.zeros((1, 16), np.float32)
    assert K.chain_run(chain, x, y, 1) is True
    np.testing.assert_allclose(y, layer.reference(x), rtol=1e-5, atol=1e-5)
    fields = {k: v for k, v in vars(spec).items() if k != "pointers"}
    with pytest.raises(TypeError, match=r"^chain layer 1: no field 'pointers'$"):
        K.chain_new([spec, SimpleNamespace(**fields)])
    with pytest.raises(TypeError, match=r"^chain layer 0: field 'n_in' must be an int, not float$"):
        K.chain_new([replace(spec, n_in=16.0)])
    with pytest.raises(ValueError, match=r"^chain layer 0: field 'threads' out of range$"):
        K.chain_new([replace(spec, threads=2**40)])
    without_blocks = {k: v for k, v in vars(spec).items() if k != "blocks"}
    assert K.chain_new([SimpleNamespace(**without_blocks)]) is not None  # blocks is optional (default 1)


def test_replacing_a_plan_drops_the_chain_cache_of_every_model_running_the_layer():
    model, layer = _rows_layer()
    other = rt.FastModel([layer], (16,), threads=1)
    x = np.ones((1, 16), np.float32)
    want = layer.reference(x)
    for m in (model, other):
        np.testing.assert_allclose(m.run(x), want, rtol=1e-5, atol=1e-5)
        assert list(m.chain_cache) == [1]  # batch 1 runs as one C chain, cached for fast_call
        assert K.fast_call(m.chain_cache, x, 1) is not None
    layer.plan = {1: "dense"}  # no chain for a dense layer: the per-layer path
    assert model.chain_cache == {} and other.chain_cache == {}
    assert K.fast_call(model.chain_cache, x, 1) is None
    np.testing.assert_allclose(model.run(x), want, rtol=1e-5, atol=1e-5)
    assert model.chain_cache == {} and [p[0] for p in model.parsed_plan(1)] == ["dense"]
    layer.plan = {1: "rows"}
    np.testing.assert_allclose(other.run(x), want, rtol=1e-5, atol=1e-5)
    assert list(other.chain_cache) == [1]


def test_a_layer_does_not_keep_its_models_alive():
    import gc

    model, layer = _rows_layer()
    assert list(layer._owners) == [model]
    del model
    gc.collect()
    assert list(layer._owners) == []
    layer.plan = {1: "gemv"}  # nobody to tell: no error


def test_fast_call_takes_the_chain_cache_x_and_threads():
    model, _ = _rows_layer()
    x = np.ones((4, 16), np.float32)
    model.run(x)
    assert K.fast_call(model.chain_cache, x, 1).shape == (4, 16)
    assert K.fast_call(model.chain_cache, np.ones((3, 16), np.float32), 1) is None  # no entry for batch 3
    with pytest.raises(TypeError, match=r"^fast_call\(table: dict, x, threads\)$"):
        K.fast_call(model.chain_cache, x, 1, [0])
    with pytest.raises(TypeError, match=r"^fast_call: table values must be \(chain, alloc\)$"):
        K.fast_call({4: (0, *model.chain_cache[4])}, x, 1)
