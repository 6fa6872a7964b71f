"""The ``fast`` artifact: an ONNX file of ``com.sparsekit::SparseLinear`` nodes, and its loader.

Each layer is one node ``SparseLinear(X, values, indices, rowptr[, bias]) -> Y`` with ``Y = act(X W^T
+ b)``; ``W`` (out, in) is CSR: ``values`` float32 (nnz), ``indices`` uint16 (int32 when in > 65536)
column indices, ``rowptr`` int64 (out + 1), all stored as initializers. Attributes: ``in_features``,
``out_features``, ``activation`` ("relu" or "none") and ``plan`` (JSON: batch size -> kernel spec).
A ``Flatten`` in front keeps the input signature of the dense model. Stock ONNX Runtime cannot run
the custom nodes; ``sparsekit.runtime.load`` (or ``sparsekit run``) does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from sparsekit.errors import InputError
from sparsekit.fileio import atomic_path
from sparsekit.runtime.layers import SparseLayer
from sparsekit.runtime.model import FastModel

DOMAIN = "com.sparsekit"
OP = "SparseLinear"
FORMAT_VERSION = "1"


def to_onnx(model: FastModel, *, opset: int = 18) -> onnx.ModelProto:
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    cur = model.input_name
    if len(model.input_shape) != 1:
        nodes.append(helper.make_node("Flatten", [cur], ["flat"], axis=1, name="flatten"))
        cur = "flat"
    for i, layer in enumerate(model.layers):
        prefix = f"layer{i}"
        v, idx, rp = layer.csr()
        names = [f"{prefix}.values", f"{prefix}.indices", f"{prefix}.rowptr"]
        inits += [numpy_helper.from_array(np.ascontiguousarray(v), names[0]),
                  numpy_helper.from_array(np.ascontiguousarray(idx), names[1]),
                  numpy_helper.from_array(np.ascontiguousarray(rp), names[2])]
        if layer.bias is not None:
            names.append(f"{prefix}.bias")
            inits.append(numpy_helper.from_array(layer.bias, names[3]))
        out = model.output_name if i == len(model.layers) - 1 else f"{prefix}.out"
        nodes.append(helper.make_node(
            OP, [cur, *names], [out], domain=DOMAIN, name=layer.name or prefix,
            in_features=layer.n_in, out_features=layer.n_out,
            activation="relu" if layer.relu else "none",
            plan=json.dumps({str(k): s for k, s in sorted(layer.plan.items())})))
        cur = out
    graph = helper.make_graph(
        nodes, "sparsekit_fast",
        [helper.make_tensor_value_info(model.input_name, TensorProto.FLOAT, ["batch", *model.input_shape])],
        [helper.make_tensor_value_info(model.output_name, TensorProto.FLOAT, ["batch", model.n_outputs])],
        initializer=inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", int(opset)),
                                                    helper.make_opsetid(DOMAIN, 1)],
                              producer_name="sparsekit")
    proto.ir_version = 10
    meta = {"sparsekit_format": "fast", "fast_format_version": FORMAT_VERSION, **model.metadata}
    helper.set_model_props(proto, {str(k): str(v) for k, v in meta.items()})
    return proto


def save(model: FastModel, path: str | os.PathLike[str], *, opset: int = 18) -> Path:
    proto = to_onnx(model, opset=opset)
    with atomic_path(path) as tmp:
        tmp.write_bytes(proto.SerializeToString())
    return Path(path)


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            v = helper.get_attribute_value(a)
            return v.decode() if isinstance(v, bytes) else v
    return default


def from_onnx(proto: onnx.ModelProto, *, threads: int = 1, where: str = "artifact") -> FastModel:
    graph = proto.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise InputError("not a sparsekit fast artifact (needs one input and one output)", where=where,
                         fix="export one with 'sparsekit export RUN --format fast'")
    dims = inputs[0].type.tensor_type.shape.dim
    try:
        shape = tuple(int(d.dim_value) for d in dims[1:])
    except Exception as exc:  # pragma: no cover
        raise InputError("input shape unreadable", where=where) from exc
    if not shape or any(d <= 0 for d in shape):
        raise InputError("input has a symbolic or empty per-sample shape", where=where)
    layers: list[SparseLayer] = []
    for node in graph.node:
        if node.op_type == "Flatten" and node.domain in ("", "ai.onnx") and not layers:
            continue
        if node.domain != DOMAIN or node.op_type != OP:
            raise InputError(f"unsupported node {node.op_type} (domain {node.domain or 'ai.onnx'!r})",
                             where=where, fix="load artifacts written by 'sparsekit export --format fast'")
        try:
            arrays = [inits[n] for n in node.input[1:4]]
        except KeyError as exc:
            raise InputError(f"node {node.name} misses initializer {exc}", where=where) from exc
        bias = inits.get(node.input[4]) if len(node.input) > 4 and node.input[4] else None
        act = _attr(node, "activation", "none")
        if act not in ("relu", "none"):
            raise InputError(f"unknown activation {act!r}", where=f"{where}: {node.name}")
        try:
            plan = {int(k): str(v) for k, v in json.loads(_attr(node, "plan", "{}") or "{}").items()}
        except (ValueError, AttributeError) as exc:
            raise InputError(f"unreadable plan on node {node.name}", where=where) from exc
        layers.append(SparseLayer.from_csr(
            int(_attr(node, "in_features", -1)), int(_attr(node, "out_features", -1)), arrays[0], arrays[1],
            arrays[2], bias, act == "relu", name=node.name, plan=plan))
    if not layers:
        raise InputError("artifact has no SparseLinear layers", where=where)
    meta = {p.key: p.value for p in proto.metadata_props}
    return FastModel(layers, shape, threads=threads, input_name=inputs[0].name,
                     output_name=graph.output[0].name, metadata=meta)


def load(path: str | os.PathLike[str], *, threads: int = 1) -> FastModel:
    """Load a ``fast`` artifact written by ``sparsekit export --format fast``."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"artifact {p} not found", where=str(p), fix="pass the path of a .fast.onnx file")
    try:
        proto = onnx.load(str(p))
    except Exception as exc:
        raise InputError(f"cannot read {p} as ONNX: {type(exc).__name__}", where=str(p),
                         fix="pass a file written by 'sparsekit export --format fast'") from exc
    return from_onnx(proto, threads=threads, where=str(p))
