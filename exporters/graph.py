"""Read and write ONNX graphs that are MLP chains, the shape every structural exporter works on.

An *MLP chain* is: the graph input ``[batch, *shape]``, optionally flattened (``Flatten`` or a
``Reshape`` to ``[-1, n]``/``[0, n]``), then dense layers — ``Gemm`` (``transB`` 0 or 1) or
``MatMul`` with an initializer (optionally followed by ``Add`` of an initializer bias) — each
optionally followed by ``Relu``; ``Identity`` nodes are skipped. Every intermediate value feeds exactly
one node, so residual connections are refused rather than silently mis-read.

``parse_mlp_chain`` returns the per-sample input shape and the layers with weights as float32
``(out, in)`` arrays; ``build_mlp_chain`` writes such a list back as a small opset-18 ONNX graph
(``Flatten`` → optional ``Gather`` of kept input features → ``Gemm(transB=1)``/``Relu`` …), which
is how compact and restored models keep the original input signature.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from sparsekit.errors import InputError

__all__ = [
    "DenseLayer",
    "UnsupportedGraphError",
    "build_mlp_chain",
    "densified",
    "initializer_arrays",
    "parse_mlp_chain",
    "sparse_constant_value",
    "sparse_weight_names",
]


class UnsupportedGraphError(InputError):
    """The ONNX graph is not of a shape this exporter can handle (names the op or pattern)."""


@dataclass
class DenseLayer:
    """One fully connected layer: ``y = act(x @ weight.T + bias)``."""

    weight: np.ndarray          # float32 (out, in)
    bias: np.ndarray | None     # float32 (out,)
    activation: str | None      # "relu" or None, applied after this layer
    weight_name: str
    bias_name: str | None


def _to_array(t: onnx.TensorProto) -> np.ndarray:
    try:
        return numpy_helper.to_array(t)
    except Exception as exc:  # data that does not match the declared shape or type (truncated, crafted)
        raise InputError(f"initializer {t.name!r} is unreadable: {exc}", where="model",
                         fix="pass an ONNX file written by sparsekit or another exporter, not a damaged one") from exc


def initializer_arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """All initializers and Constant node values (dense or sparse) of the main graph as dense arrays."""
    out = {t.name: _to_array(t) for t in model.graph.initializer}
    for sp in model.graph.sparse_initializer:  # sparse-onnx files of sparsekit 0.1 and other tools
        out[sp.values.name] = _sparse_to_dense(sp)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value":
                    out[node.output[0]] = numpy_helper.to_array(attr.t)
                elif attr.name == "sparse_value":
                    out[node.output[0]] = _sparse_to_dense(attr.sparse_tensor)
    return out


def sparse_constant_value(node: onnx.NodeProto) -> onnx.SparseTensorProto | None:
    """The sparse tensor of a ``Constant`` node with a ``sparse_value``, else None."""
    if node.op_type != "Constant":
        return None
    return next((a.sparse_tensor for a in node.attribute if a.name == "sparse_value"), None)


def sparse_weight_names(model: onnx.ModelProto) -> list[str]:
    """Names of the sparse weights of the main graph: sparse constants and sparse initializers."""
    return ([n.output[0] for n in model.graph.node if sparse_constant_value(n) is not None and n.output]
            + [sp.values.name for sp in model.graph.sparse_initializer])


def densified(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every sparse weight (sparse constant or sparse initializer) turned into a
    dense initializer of the same name."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    dense = [numpy_helper.from_array(_sparse_to_dense(sp), sp.values.name) for sp in graph.sparse_initializer]
    nodes = []
    for node in graph.node:
        sp = sparse_constant_value(node)
        if sp is None or not node.output:
            nodes.append(node)
        else:
            dense.append(numpy_helper.from_array(_sparse_to_dense(sp), node.output[0]))
    del graph.sparse_initializer[:]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(dense)
    return out


def _sparse_to_dense(sp: onnx.SparseTensorProto) -> np.ndarray:
    values = numpy_helper.to_array(sp.values)
    indices = numpy_helper.to_array(sp.indices).astype(np.int64)
    dims = tuple(int(d) for d in sp.dims)
    dense = np.zeros(int(np.prod(dims)), dtype=values.dtype)
    if indices.ndim == 2:  # coordinate list (nnz, rank)
        indices = np.ravel_multi_index(tuple(indices.T), dims) if indices.size else indices.reshape(-1)
    dense[indices.reshape(-1)] = values.reshape(-1)
    return dense.reshape(dims)


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _unsupported(what: str, where: str) -> UnsupportedGraphError:
    return UnsupportedGraphError(
        what, where=where,
        fix="this exporter handles MLP chains (Flatten/Reshape, Gemm or MatMul+Add, Relu); "
            "use --format onnx or sparse-onnx for other graphs")


def _input_shape(model: onnx.ModelProto, init_names: set[str]) -> tuple[str, tuple[int, ...]]:
    inputs = [i for i in model.graph.input if i.name not in init_names]
    if len(inputs) != 1:
        raise _unsupported(f"graph has {len(inputs)} inputs, expected 1", "graph inputs")
    inp = inputs[0]
    dims = inp.type.tensor_type.shape.dim
    if len(dims) < 2:
        raise _unsupported(f"input {inp.name!r} has rank {len(dims)}, expected [batch, features...]",
                           f"input {inp.name}")
    shape = []
    for d in dims[1:]:
        if not d.HasField("dim_value"):
            raise _unsupported(f"input {inp.name!r} has a symbolic per-sample dimension {d.dim_param!r}",
                               f"input {inp.name}")
        shape.append(int(d.dim_value))
    return inp.name, tuple(shape)


def parse_mlp_chain(model: onnx.ModelProto) -> tuple[tuple[int, ...], list[DenseLayer]]:
    """Parse ``model`` into ``(per-sample input shape, dense layers)``.

    Raises ``UnsupportedGraphError`` (an ``InputError``, exit 2) naming the first op or pattern
    that is not part of an MLP chain (e.g. ``Conv``, a value used twice as in a residual block).
    """
    graph = model.graph
    arrays = initializer_arrays(model)
    init_names = set(arrays)
    input_name, shape = _input_shape(model, init_names)
    n_features = int(np.prod(shape)) if shape else 1

    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            if name and name not in init_names:
                consumers.setdefault(name, []).append(node)
    if len(graph.output) != 1:
        raise _unsupported(f"graph has {len(graph.output)} outputs, expected 1", "graph outputs")
    output_name = graph.output[0].name

    layers: list[DenseLayer] = []
    current = input_name
    flat = len(shape) == 1
    pending: DenseLayer | None = None  # a MatMul layer that may still take an Add bias

    def finish_pending() -> None:
        nonlocal pending
        if pending is not None:
            layers.append(pending)
            pending = None

    while current != output_name:
        users = consumers.get(current, [])
        if len(users) != 1:
            if not users:
                raise _unsupported(f"value {current!r} is not consumed and is not the output",
                                   "graph structure")
            ops = ", ".join(sorted({u.op_type for u in users}))
            raise _unsupported(f"value {current!r} feeds {len(users)} nodes ({ops}): residual or "
                               "branching graphs are not MLP chains", "graph structure")
        node = users[0]
        op = node.op_type
        where = f"node {node.name or op} ({op})"
        others = [n for n in node.input if n and n != current]
        if op == "Identity":
            pass
        elif op in ("Flatten", "Reshape"):
            if layers or pending is not None:
                raise _unsupported(f"{op} after a dense layer is not supported", where)
            if op == "Flatten" and _attr(node, "axis", 1) != 1:
                raise _unsupported("Flatten with axis != 1 is not supported", where)
            if op == "Reshape":
                target = arrays.get(node.input[1]) if len(node.input) > 1 else None
                ok = (target is not None and target.ndim == 1 and len(target) == 2
                      and int(target[0]) in (-1, 0) and int(target[1]) in (n_features, -1)
                      and not (int(target[0]) == -1 and int(target[1]) == -1))
                if not ok:
                    raise _unsupported("Reshape that is not a flatten to [batch, features]", where)
            flat = True
        elif op in ("Gemm", "MatMul"):
            finish_pending()
            if not flat:
                raise _unsupported(f"{op} on an input of rank > 2 (missing Flatten)", where)
            if len(others) < 1 or others[0] not in arrays or node.input[0] != current:
                raise _unsupported(f"{op} whose weight is not an initializer", where)
            w = arrays[others[0]].astype(np.float32)
            if w.ndim != 2:
                raise _unsupported(f"{op} weight of rank {w.ndim}", where)
            if op == "Gemm":
                if _attr(node, "transA", 0) != 0:
                    raise _unsupported("Gemm with transA=1", where)
                alpha, beta = float(_attr(node, "alpha", 1.0)), float(_attr(node, "beta", 1.0))
                weight = w if _attr(node, "transB", 0) == 1 else w.T
                weight = np.ascontiguousarray(weight * np.float32(alpha)) if alpha != 1.0 else \
                    np.ascontiguousarray(weight)
                bias = None
                bias_name = None
                if len(node.input) > 2 and node.input[2]:
                    if node.input[2] not in arrays:
                        raise _unsupported("Gemm bias that is not an initializer", where)
                    b = arrays[node.input[2]].astype(np.float32) * np.float32(beta)
                    bias = np.ascontiguousarray(np.broadcast_to(b.reshape(-1), (weight.shape[0],)))
                    bias_name = node.input[2]
                layers.append(DenseLayer(weight, bias, None, others[0], bias_name))
            else:
                pending = DenseLayer(np.ascontiguousarray(w.T), None, None, others[0], None)
        elif op == "Add":
            if pending is None or len(others) != 1 or others[0] not in arrays:
                raise _unsupported("Add that is not a bias after MatMul (residual connection?)", where)
            b = arrays[others[0]].astype(np.float32).reshape(-1)
            if b.size not in (1, pending.weight.shape[0]):
                raise _unsupported(f"Add of a tensor of size {b.size} as a bias", where)
            pending.bias = np.ascontiguousarray(np.broadcast_to(b, (pending.weight.shape[0],)))
            pending.bias_name = others[0]
            finish_pending()
        elif op == "Relu":
            finish_pending()
            if not layers or layers[-1].activation is not None:
                raise _unsupported("Relu that does not follow a dense layer", where)
            layers[-1].activation = "relu"
        else:
            raise _unsupported(f"unsupported op {op}", where)
        if len(node.output) != 1:
            raise _unsupported(f"{op} with {len(node.output)} outputs", where)
        current = node.output[0]
    finish_pending()
    if not layers:
        raise _unsupported("graph has no dense layers", "graph structure")
    prev = n_features
    for layer in layers:
        if layer.weight.shape[1] != prev:
            raise _unsupported(f"layer {layer.weight_name!r} expects {layer.weight.shape[1]} inputs, "
                               f"gets {prev}", layer.weight_name)
        prev = layer.weight.shape[0]
    return shape, layers


def build_mlp_chain(input_shape: tuple[int, ...], layers: list[DenseLayer], *,
                    input_indices: np.ndarray | None = None, input_name: str = "input",
                    output_name: str = "logits", opset: int = 18,
                    graph_name: str = "sparsekit_mlp", matmul: bool = False) -> onnx.ModelProto:
    """Write ``layers`` as an ONNX graph taking ``[batch, *input_shape]``.

    With ``input_indices`` only those flattened input features are used (``Gather`` on axis 1, inside
    the graph), so the model keeps its input signature after inputs were removed. ``matmul=True``
    writes ``MatMul`` (weight stored ``(in, out)``) + ``Add`` instead of ``Gemm``: ONNX Runtime's dynamic
    quantization only rewrites ``MatMul``.
    """
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    cur = input_name
    if len(input_shape) != 1:
        nodes.append(helper.make_node("Flatten", [cur], ["flat"], axis=1, name="flatten"))
        cur = "flat"
    if input_indices is not None:
        inits.append(numpy_helper.from_array(np.asarray(input_indices, dtype=np.int64), "input_indices"))
        nodes.append(helper.make_node("Gather", [cur, "input_indices"], ["gathered"], axis=1,
                                      name="select_inputs"))
        cur = "gathered"
    for i, layer in enumerate(layers):
        last = i == len(layers) - 1
        out = output_name if last and layer.activation is None else f"gemm_{i}"
        bname = layer.bias_name or f"{layer.weight_name}.bias"
        if matmul:
            inits.append(numpy_helper.from_array(np.ascontiguousarray(layer.weight.T, dtype=np.float32),
                                                 layer.weight_name))
            mm_out = f"matmul_{i}" if layer.bias is not None else out
            nodes.append(helper.make_node("MatMul", [cur, layer.weight_name], [mm_out], name=f"matmul_{i}"))
            if layer.bias is not None:
                inits.append(numpy_helper.from_array(np.ascontiguousarray(layer.bias, dtype=np.float32),
                                                     bname))
                nodes.append(helper.make_node("Add", [mm_out, bname], [out], name=f"add_{i}"))
        else:
            inits.append(numpy_helper.from_array(np.ascontiguousarray(layer.weight, dtype=np.float32),
                                                 layer.weight_name))
            ins = [cur, layer.weight_name]
            if layer.bias is not None:
                inits.append(numpy_helper.from_array(np.ascontiguousarray(layer.bias, dtype=np.float32),
                                                     bname))
                ins.append(bname)
            nodes.append(helper.make_node("Gemm", ins, [out], transB=1, name=f"gemm_{i}"))
        cur = out
        if layer.activation == "relu":
            out = output_name if last else f"relu_{i}"
            nodes.append(helper.make_node("Relu", [cur], [out], name=f"relu_{i}"))
            cur = out
        elif layer.activation is not None:
            raise UnsupportedGraphError(f"activation {layer.activation!r} is not supported",
                                        where=layer.weight_name, fix="use relu or none")
    x = helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch", *input_shape])
    y = helper.make_tensor_value_info(output_name, TensorProto.FLOAT,
                                      ["batch", int(layers[-1].weight.shape[0])])
    graph = helper.make_graph(nodes, graph_name, [x], [y], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="sparsekit")
    model.ir_version = min(model.ir_version, 10)
    return model
