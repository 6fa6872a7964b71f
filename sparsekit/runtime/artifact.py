"""The ``fast`` artifact: an ONNX file of ``com.sparsekit::SparseLinear`` nodes, and its loader.

Each layer is one node ``SparseLinear(X, values, indices, rowptr[, bias]) -> Y`` with ``Y = act(X W^T
+ b)``; ``W`` (out, in) is CSR: ``values`` float32 (nnz), ``indices`` uint16 (int32 when in > 65536)
column indices, ``rowptr`` int64 (out + 1), all stored as initializers. Attributes: ``in_features``,
``out_features``, ``activation`` ("relu" or "none"; all three required), ``negative_slope`` (0.0 for relu, 1.0
for none) and ``plan`` (JSON: batch size -> kernel spec). The loader checks everything (``checks``) and refuses
what it cannot run exactly, the io metadata a deployer reads (``sparsekit.input_layout``,
``sparsekit.input_normalization``, ``sparsekit.class_names``) included. A ``Flatten`` in front keeps the input
signature of the dense model. ``sparsekit.runtime.load`` (or ``sparsekit run``) runs the nodes with sparsekit's
kernels; the file also carries the op as an ONNX function of standard ops (``portable``), so stock ONNX Runtime
runs it too, at dense speed. docs/fast-format.md specifies the format.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from sparsekit.errors import InputError
from sparsekit.fileio import atomic_path
from sparsekit.runtime import checks, portable, rnn_onnx
from sparsekit.runtime.checks import CONV_OP, DOMAIN, OP, SLOPES
from sparsekit.runtime.conv import ConvGeometry, SparseConv
from sparsekit.runtime.graph_model import GraphModel
from sparsekit.runtime.layers import CsrLayer
from sparsekit.runtime.memory import memory_bound
from sparsekit.runtime.model import FastModel
from sparsekit.runtime.rnn import SparseRnn

# 2: the SparseLinear function and negative_slope (version 1 files lack both and still load)
FORMAT_VERSION = "2"


def to_onnx(model: FastModel, *, opset: int = 18) -> onnx.ModelProto:
    """The artifact of ``model``: its layers as SparseLinear nodes plus the op's function for stock runtimes."""
    body = portable.function(int(opset))  # refuses an opset below portable.MIN_OPSET first
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
        act = "relu" if layer.relu else "none"
        nodes.append(helper.make_node(
            OP, [cur, *names], [out], domain=DOMAIN, name=layer.name or prefix,
            in_features=layer.n_in, out_features=layer.n_out, activation=act, negative_slope=SLOPES[act],
            plan=json.dumps({str(k): s for k, s in sorted(layer.plan.items())})))
        cur = out
    graph = helper.make_graph(
        nodes, "sparsekit_fast",
        [helper.make_tensor_value_info(model.input_name, TensorProto.FLOAT, ["batch", *model.input_shape])],
        [helper.make_tensor_value_info(model.output_name, TensorProto.FLOAT, ["batch", model.n_outputs])],
        initializer=inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", int(opset)),
                                                    helper.make_opsetid(DOMAIN, 1)],
                              producer_name="sparsekit", functions=[body])
    proto.ir_version = 10
    meta = {"sparsekit_format": "fast", **model.metadata, "fast_format_version": FORMAT_VERSION}
    helper.set_model_props(proto, {str(k): str(v) for k, v in meta.items()})
    return proto


def save(model: FastModel | GraphModel, path: str | os.PathLike[str], *, opset: int = 18) -> Path:
    proto = model.to_onnx() if isinstance(model, GraphModel) else to_onnx(model, opset=opset)
    with atomic_path(path) as tmp:
        tmp.write_bytes(proto.SerializeToString())
    return Path(path)


def is_chain(graph: onnx.GraphProto) -> bool:
    """An MLP chain artifact (SparseLinear nodes, a Flatten first at most), else a whole-graph one."""
    return all((n.domain == DOMAIN and n.op_type == OP)
               or (i == 0 and n.op_type == "Flatten" and n.domain in ("", "ai.onnx"))
               for i, n in enumerate(graph.node))


def _sparse_conv(node: onnx.NodeProto, inits: dict[str, np.ndarray], label: str, portable_body: bool) -> SparseConv:
    """A SparseConv node as a ``SparseConv``, its attributes and CSR checked as a SparseLinear's."""
    attrs = checks.conv_attrs(node, label, portable=portable_body)
    values, indices, rowptr, bias = checks.layer_arrays(node, inits, label)
    try:
        layer = CsrLayer.from_csr(attrs["in_features"], attrs["out_features"], values, indices, rowptr, bias,
                                  attrs["activation"] == "relu", name=node.name)
    except InputError as exc:
        raise InputError(exc.what, where=label, fix=exc.fix or checks.FIX) from exc
    geometry = ConvGeometry(tuple(attrs["kernel_shape"]), tuple(attrs["strides"]), tuple(attrs["pads"]),
                            tuple(attrs["dilations"]))
    return SparseConv(layer, attrs["in_channels"], geometry, block=attrs.get("block", 0))


def _sparse_layers(proto: onnx.ModelProto, where: str) -> dict[str, CsrLayer | SparseConv | SparseRnn]:
    """The SparseLinear nodes of a whole-graph artifact as layers by node name, each checked as in a chain."""
    graph = proto.graph
    has_function = portable.check(proto, where, graph=True)
    sparse = [n for n in graph.node if n.domain == DOMAIN and n.op_type not in rnn_onnx.OPS]
    names = {name for n in sparse for name in n.input[1:]}
    inits = checks.initializers(onnx.helper.make_graph([], "sparse", [], [], initializer=[
        t for t in graph.initializer if t.name in names]), where)
    layers: dict[str, CsrLayer | SparseConv | SparseRnn] = {}
    for node in (n for n in graph.node if n.domain == DOMAIN and n.op_type in rnn_onnx.OPS):
        label = f"{where}: node {node.name!r}"
        if not node.name or node.name in layers:
            raise InputError(f"unnamed or repeated {DOMAIN} node name", where=label, fix=checks.FIX)
        layers[node.name] = rnn_onnx.parse_node(node, graph, label)
    for node in sparse:
        label = f"{where}: node {node.name!r}"
        if node.op_type not in (OP, CONV_OP) or len(node.output) != 1 or not node.input or not node.name \
                or node.name in layers:
            raise InputError(f"unsupported or unnamed {DOMAIN} node {node.op_type}", where=label, fix=checks.FIX)
        if node.op_type == CONV_OP:
            layers[node.name] = _sparse_conv(node, inits, label, has_function)
            continue
        attrs = checks.node_attrs(node, label, portable=has_function)
        values, indices, rowptr, bias = checks.layer_arrays(node, inits, label)
        try:
            layers[node.name] = CsrLayer.from_csr(attrs["in_features"], attrs["out_features"], values, indices,
                                                  rowptr, bias, attrs["activation"] == "relu", name=node.name,
                                                  plan=attrs["plan"])
        except InputError as exc:
            raise InputError(exc.what, where=label, fix=exc.fix or checks.FIX) from exc
    if not layers:
        raise InputError("artifact has no SparseLinear layers", where=where)
    return layers


def from_onnx(proto: onnx.ModelProto, *, threads: int = 1, where: str = "artifact",
              file_bytes: int | None = None) -> FastModel | GraphModel:
    """A ``FastModel`` (an MLP chain) or a ``GraphModel`` (sparse layers inside any graph) from a fast artifact,
    every part sparsekit runs checked first (``sparsekit.runtime.checks``, ``CsrLayer.from_csr``; ONNX Runtime
    checks the ordinary nodes of a graph): anything malformed is an ``InputError``. Kernels are held to
    ``memory_bound(file_bytes)`` (default: the serialized size of ``proto``); plan entries over it are re-planned
    and listed in ``model.notes``."""
    graph = proto.graph
    size = proto.ByteSize() if file_bytes is None else file_bytes
    if not is_chain(graph):
        meta = {p.key: p.value for p in proto.metadata_props}
        return GraphModel(proto, _sparse_layers(proto, where), threads=threads, metadata=meta,
                          memory_limit=memory_bound(size))
    inits = checks.initializers(graph, where)
    in_name, shape = checks.graph_input(graph, inits, where)
    has_function = portable.check(proto, where)
    layers: list[CsrLayer] = []
    for node in checks.chain(graph, in_name, graph.output[0].name, inits, where):
        label = f"{where}: node {node.name!r}"
        if node.op_type == "Flatten" and node.domain in ("", "ai.onnx") and not layers:
            checks.check_flatten(node, where)
            continue
        if node.domain != DOMAIN or node.op_type != OP:
            raise InputError(f"unsupported node {node.op_type} (domain {node.domain or 'ai.onnx'!r})",
                             where=label, fix="load artifacts written by 'sparsekit export --format fast'")
        attrs = checks.node_attrs(node, label, portable=has_function)
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
    model = FastModel(layers, shape, threads=threads, input_name=in_name, output_name=graph.output[0].name,
                      metadata=meta, memory_limit=memory_bound(size))
    model.fit_plans()
    return model


def load(path: str | os.PathLike[str], *, threads: int = 1, replan: bool = True) -> FastModel | GraphModel:
    """Load a ``fast`` artifact written by ``sparsekit export --format fast`` (validated; see ``from_onnx``).

    A plan measured on another CPU is measured again here, once per (artifact, CPU, threads) and then cached
    (``sparsekit.runtime.replan``; ``replan=False`` or ``SPARSEKIT_REPLAN=0`` keeps the recorded plan)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"artifact {p} not found", where=str(p), fix="pass the path of a .fast.onnx file")
    try:
        data = p.read_bytes()
        # external data never: a fast artifact is one file, and its tensors must not name other files to read
        proto = onnx.load_model_from_string(data)
    except Exception as exc:
        raise InputError(f"cannot read {p} as ONNX: {type(exc).__name__}", where=str(p),
                         fix="pass a file written by 'sparsekit export --format fast'") from exc
    model = from_onnx(proto, threads=threads, where=str(p), file_bytes=len(data))
    if replan:
        from sparsekit.runtime.replan import replan as replan_on_this_cpu

        replan_on_this_cpu(model, hashlib.sha256(data).hexdigest(), threads=threads)
    return model
