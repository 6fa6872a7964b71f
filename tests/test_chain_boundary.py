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
    spec = model._chain_specs([L.parse_kernel("rows")])[0]
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
