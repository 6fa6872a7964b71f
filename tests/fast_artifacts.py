"""Tiny real ``fast`` artifacts and the tools to craft hostile ones from them (tests of the artifact loader).

``tiny_model`` builds a small model in memory; ``tiny_proto`` serializes it the way the exporter does. The edit
helpers change one thing of a ModelProto in place: an attribute, an initializer, a node's inputs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import sparsekit.runtime as rt

# 12 -> 37 (relu) -> 21 (relu) -> 5: widths not multiples of 16 (the AVX-512 tile flush's ragged edge)
SHAPES = [(37, 12, 0.4), (21, 37, 0.3), (5, 21, 0.5)]
# one plan per model: sparse kernels only, every kernel by batch size, and a panel chain
PLANS = {
    "mixed": [{1: "rows", 64: "panel"}, {1: "gemv", 64: "panel:16"}, {1: "rows", 64: "dense"}],
    "sparse": [{1: "rows", 8: "panel"}, {1: "rows", 8: "panel:8"}, {1: "rows", 8: "panel"}],
    "heuristic": [{}, {}, {}],
}


def tiny_model(seed: int = 0, plan: str = "mixed", *, bias: bool = True, input_shape: tuple[int, ...] = (12,),
               threads: int = 1) -> rt.FastModel:
    rng = np.random.default_rng(seed)
    layers = []
    for i, (n_out, n_in, density) in enumerate(SHAPES):
        w = (rng.standard_normal((n_out, n_in)) * (rng.random((n_out, n_in)) < density)).astype(np.float32)
        b = rng.standard_normal(n_out).astype(np.float32) if bias else None
        layers.append(rt.CsrLayer.from_dense(w, b, relu=i < len(SHAPES) - 1, name=f"l{i}",
                                                plan=dict(PLANS[plan][i])))
    return rt.FastModel(layers, input_shape, threads=threads)


def tiny_proto(seed: int = 0, plan: str = "mixed", **kw: Any) -> onnx.ModelProto:
    return rt.to_onnx(tiny_model(seed, plan, **kw))


def save(proto: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(proto.SerializeToString())
    return path


def reference(model: rt.FastModel, x: np.ndarray) -> np.ndarray:
    """float64 outputs of the model's layers, computed from their CSR (no densified weight)."""
    return reference_in_range(model, x)[0]


def reference_in_range(model: rt.FastModel, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``reference`` and, per sample, whether float32 can compute it: every layer's sum of |terms| (a bound on
    any partial sum, in any order) stays below 1e30 (weights near the float32 maximum are valid, but their sums
    overflow to inf, and inf - inf is NaN)."""
    y = np.asarray(x, np.float64).reshape(x.shape[0], -1)
    ok = np.ones(x.shape[0], bool)
    for layer in model.layers:
        v, i, rp = layer.csr()
        rows = np.repeat(np.arange(layer.n_out), np.diff(rp))
        terms = v[:, None].astype(np.float64) * y[:, i.astype(np.int64)].T  # (nnz, batch)
        out, size = np.zeros((layer.n_out, y.shape[0])), np.zeros((layer.n_out, y.shape[0]))
        np.add.at(out, rows, terms)
        np.add.at(size, rows, np.abs(terms))
        if layer.bias is not None:
            out += layer.bias[:, None]
            size += np.abs(layer.bias)[:, None]
        ok &= np.all(size < 1e30, axis=0)
        y = np.maximum(out.T, 0) if layer.relu else out.T
    return y, ok


def node(proto: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in proto.graph.node if n.name == name)


def set_attr(proto: onnx.ModelProto, node_name: str, attr: str, value: Any) -> None:
    """Replace (or add) an attribute; ``value`` as ``helper.make_attribute`` types it (int -> INT, str -> STRING,
    float -> FLOAT, list -> INTS/FLOATS)."""
    n = node(proto, node_name)
    kept = [a for a in n.attribute if a.name != attr]
    del n.attribute[:]
    n.attribute.extend([*kept, helper.make_attribute(attr, value)])


def del_attr(proto: onnx.ModelProto, node_name: str, attr: str) -> None:
    n = node(proto, node_name)
    kept = [a for a in n.attribute if a.name != attr]
    del n.attribute[:]
    n.attribute.extend(kept)


def init(proto: onnx.ModelProto, name: str) -> TensorProto:
    return next(t for t in proto.graph.initializer if t.name == name)


def set_init(proto: onnx.ModelProto, name: str, array: np.ndarray | TensorProto) -> None:
    t = init(proto, name)
    new = array if isinstance(array, TensorProto) else numpy_helper.from_array(np.asarray(array), name)
    t.CopyFrom(new)
    t.name = name


def one_layer_proto(n_in: int, n_out: int, cols: list[int], *, plan: dict[str, str] | None = None,
                    index_dtype: Any = np.int64) -> onnx.ModelProto:
    """A one-layer artifact written by hand: ``len(cols)`` nonzeros (value 1) in row 0 at those columns, no
    bias, input shape (n_in,). Any widths, including ones the writer would never produce."""
    rowptr = np.full(n_out + 1, len(cols), np.int64)
    rowptr[0] = 0
    inits = [numpy_helper.from_array(np.ones(len(cols), np.float32), "v"),
             numpy_helper.from_array(np.asarray(cols, index_dtype), "i"),
             numpy_helper.from_array(rowptr, "r")]
    n = helper.make_node("SparseLinear", ["input", "v", "i", "r"], ["output"], domain="com.sparsekit", name="l0",
                         in_features=n_in, out_features=n_out, activation="none", plan=json.dumps(plan or {}))
    graph = helper.make_graph([n], "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["b", n_in])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["b", n_out])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid("com.sparsekit", 1)])
    model.ir_version = 10
    return model
