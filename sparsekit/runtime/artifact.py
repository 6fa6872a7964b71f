"""The ``fast`` artifact: an ONNX file of ``com.sparsekit::SparseLinear`` nodes, and its loader.

Each layer is one node ``SparseLinear(X, values, indices, rowptr[, bias]) -> Y`` with ``Y = act(X W^T
+ b)``; ``W`` (out, in) is CSR: ``values`` float32 (nnz), ``indices`` uint16 (int32 when in > 65536)
column indices, ``rowptr`` int64 (out + 1), all stored as initializers. Attributes: ``in_features``,
``out_features``, ``activation`` ("relu" or "none"; all three required) and ``plan`` (JSON: batch size ->
kernel spec). The loader checks everything (``checks``) and refuses what it cannot run exactly, the
io metadata a deployer reads (``sparsekit.input_layout``, ``sparsekit.input_normalization``,
``sparsekit.class_names``) included.
A ``Flatten`` in front keeps the input signature of the dense model. Stock ONNX Runtime cannot run
the custom nodes; ``sparsekit.runtime.load`` (or ``sparsekit run``) does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from sparsekit.errors import InputError
from sparsekit.fileio import atomic_path
from sparsekit.runtime import checks
from sparsekit.runtime.checks import DOMAIN, OP
from sparsekit.runtime.layers import CsrLayer
from sparsekit.runtime.memory import memory_bound
from sparsekit.runtime.model import FastModel

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


def from_onnx(proto: onnx.ModelProto, *, threads: int = 1, where: str = "artifact",
              file_bytes: int | None = None) -> FastModel:
    """A ``FastModel`` from a fast artifact, every part checked first (``sparsekit.runtime.checks``,
    ``CsrLayer.from_csr``): anything malformed is an ``InputError``. Kernels are held to
    ``memory_bound(file_bytes)`` (default: the serialized size of ``proto``); plan entries over it are re-planned
    and listed in ``model.notes``."""
    graph = proto.graph
    inits = checks.initializers(graph, where)
    in_name, shape = checks.graph_input(graph, inits, where)
    layers: list[CsrLayer] = []
    for node in checks.chain(graph, in_name, graph.output[0].name, inits, where):
        label = f"{where}: node {node.name!r}"
        if node.op_type == "Flatten" and node.domain in ("", "ai.onnx") and not layers:
            checks.check_flatten(node, where)
            continue
        if node.domain != DOMAIN or node.op_type != OP:
            raise InputError(f"unsupported node {node.op_type} (domain {node.domain or 'ai.onnx'!r})",
                             where=label, fix="load artifacts written by 'sparsekit export --format fast'")
        attrs = checks.node_attrs(node, label)
        values, indices, rowptr, bias = checks.layer_arrays(node, inits, label)
        try:
            layers.append(CsrLayer.from_csr(attrs["in_features"], attrs["out_features"], values, indices,
                                               rowptr, bias, attrs["activation"] == "relu", name=node.name,
                                               plan=attrs["plan"]))
        except InputError as exc:  # name the file and node, not only the layer
            raise InputError(exc.what, where=label, fix=exc.fix or checks.FIX) from exc
    if not layers:
        raise InputError("artifact has no SparseLinear layers", where=where)
    meta = {p.key: p.value for p in proto.metadata_props}
    checks.io_metadata(meta, n_outputs=layers[-1].n_out, input_shape=shape, where=where)
    size = proto.ByteSize() if file_bytes is None else file_bytes
    model = FastModel(layers, shape, threads=threads, input_name=in_name, output_name=graph.output[0].name,
                      metadata=meta, memory_limit=memory_bound(size))
    model.fit_plans()
    return model


def load(path: str | os.PathLike[str], *, threads: int = 1) -> FastModel:
    """Load a ``fast`` artifact written by ``sparsekit export --format fast`` (validated; see ``from_onnx``)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"artifact {p} not found", where=str(p), fix="pass the path of a .fast.onnx file")
    try:
        # external data never: a fast artifact is one file, and its tensors must not name other files to read
        proto = onnx.load(str(p), load_external_data=False)
    except Exception as exc:
        raise InputError(f"cannot read {p} as ONNX: {type(exc).__name__}", where=str(p),
                         fix="pass a file written by 'sparsekit export --format fast'") from exc
    return from_onnx(proto, threads=threads, where=str(p), file_bytes=p.stat().st_size)
