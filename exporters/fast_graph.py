"""Packing a whole graph for the ``fast`` format: every linear layer with a sparse constant weight becomes a
``com.sparsekit::SparseLinear`` node, wherever it is, and every sparse 2-D convolution with one group that the
caller's ``keep_conv`` accepts a ``com.sparsekit::SparseConv`` node; the rest of the graph is kept as it is
(ONNX Runtime runs it, see ``sparsekit.runtime.graph_model``). ``fast_graph_write`` decides and writes.

A layer is a ``MatMul(X, W)`` whose ``W`` is a 2-D initializer (``W`` is (in, out): torch exports
``nn.Linear`` on 3-D inputs this way), or a ``Gemm(X, B[, C])`` with a constant ``B`` (alpha = beta = 1,
no transposed ``X``). A following ``Add`` of a constant (out,) vector becomes the node's bias and a following
``Relu`` its activation, when nothing else reads the intermediate tensor. SparseLinear takes rows (2-D): an
input of another rank, e.g. (batch, sequence, features), is reshaped to rows and back by standard nodes
around it. The artifact carries the op's ONNX function (``sparsekit.runtime.portable``), so stock ONNX
Runtime runs it too, at dense speed. Layers denser than
``MAX_DENSITY`` stay ordinary nodes: the sparse kernels would not beat ONNX Runtime's GEMM on them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper
from sparsekit.exporters.fast_rnn import pack_recurrent
from sparsekit.exporters.graph import UnsupportedGraphError, _attr, initializer_arrays

from sparsekit.runtime import portable
from sparsekit.runtime.checks import CONV_OP, DOMAIN, OP, SLOPES
from sparsekit.runtime.conv import ConvGeometry, SparseConv
from sparsekit.runtime.layers import CsrLayer
from sparsekit.runtime.rnn import SparseRnn

MAX_DENSITY = 0.5


@dataclass
class Packed:
    proto: onnx.ModelProto           # the graph with SparseLinear nodes (their CSR initializers included)
    layers: dict[str, CsrLayer | SparseConv | SparseRnn]  # by node name
    kept_dense: list[str]            # linear and conv layers left to ONNX Runtime (too dense, or slower sparse)
    sparse_convs: list[str]          # the convolutions sparse enough to pack (offered to ``keep_conv``)


def _weight(node: onnx.NodeProto, inits: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray | None] | None:
    """(weight (out, in), bias or None) of a linear node with a constant weight, else None."""
    if node.op_type == "MatMul" and node.domain in ("", "ai.onnx") and len(node.input) == 2:
        x, w = node.input
        if x not in inits and w in inits and inits[w].ndim == 2 and inits[w].dtype == np.float32:
            return np.ascontiguousarray(inits[w].T), None
    if node.op_type == "Gemm" and node.domain in ("", "ai.onnx") and len(node.input) in (2, 3):
        x, b = node.input[:2]
        if x in inits or b not in inits or inits[b].ndim != 2 or inits[b].dtype != np.float32:
            return None
        if _attr(node, "alpha", 1.0) != 1.0 or _attr(node, "beta", 1.0) != 1.0 or _attr(node, "transA", 0):
            return None
        w = inits[b] if _attr(node, "transB", 0) else inits[b].T
        bias = None
        if len(node.input) == 3 and node.input[2]:
            c = inits.get(node.input[2])
            if c is None or c.size != w.shape[0] or c.dtype != np.float32:
                return None
            bias = c.reshape(-1)
        return np.ascontiguousarray(w), bias
    return None


def _conv(node: onnx.NodeProto, inits: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray | None,
                                                                         ConvGeometry] | None:
    """(weight (C_out, C_in, kh, kw), bias or None, geometry) of a dense 2-D convolution with a constant weight
    and one group (explicit pads; depthwise and grouped convolutions stay with ONNX Runtime), else None."""
    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
        return None
    x, w = node.input[:2]
    weight = inits.get(w)
    if x in inits or weight is None or weight.ndim != 4 or weight.dtype != np.float32:
        return None
    auto_pad = _attr(node, "auto_pad", b"NOTSET")
    if _attr(node, "group", 1) != 1 or (auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad) != "NOTSET":
        return None
    bias = None
    if len(node.input) > 2 and node.input[2]:
        bias = inits.get(node.input[2])
        if bias is None or bias.dtype != np.float32 or bias.size != weight.shape[0]:
            return None
        bias = bias.reshape(-1)
    geometry = ConvGeometry(tuple(int(k) for k in weight.shape[2:]), tuple(_attr(node, "strides", [1, 1])),
                            tuple(_attr(node, "pads", [0, 0, 0, 0])), tuple(_attr(node, "dilations", [1, 1])))
    if len(geometry.strides) != 2 or len(geometry.pads) != 4 or len(geometry.dilations) != 2:
        return None
    return weight, bias, geometry


def _follower(name: str, readers: dict[str, list[onnx.NodeProto]], outputs: set[str], op: str
              ) -> onnx.NodeProto | None:
    """The one node of type ``op`` that reads ``name``, when nothing else does (and it is no graph output)."""
    r = readers.get(name, [])
    if len(r) == 1 and r[0].op_type == op and r[0].domain in ("", "ai.onnx") and name not in outputs:
        return r[0]
    return None


def pack_graph(dense: onnx.ModelProto, *, max_density: float = MAX_DENSITY,
               keep_conv: Callable[[SparseConv, str], bool] | None = None, keep_rnn: bool = True) -> Packed:
    """``dense`` with its sparse linear layers as SparseLinear nodes, its sparse convolutions as SparseConv
    nodes and its sparse GRU/LSTM layers as SparseGRU/SparseLSTM nodes (``fast_rnn``; ``keep_rnn=False``: they
    stay ordinary nodes). ``keep_conv(conv, input_name)``: whether a sparse convolution is packed (the exporter
    measures it against ONNX Runtime's; default: every one)."""
    dense, recurrent = pack_recurrent(dense, max_density=max_density, keep=keep_rnn)
    inits = initializer_arrays(dense)
    g = dense.graph
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in g.node:
        for i in node.input:
            readers.setdefault(i, []).append(node)
    outputs = {o.name for o in g.output}
    removed: set[int] = set()
    replaced: dict[int, list[onnx.NodeProto]] = {}
    ranks = _ranks(dense)
    layers: dict[str, CsrLayer | SparseConv | SparseRnn] = dict(recurrent)
    new_inits: list[onnx.TensorProto] = []
    kept: list[str] = []
    offered: list[str] = []
    for k, node in enumerate(g.node):
        linear, conv = _weight(node, inits), _conv(node, inits)
        if linear is None and conv is None:
            continue
        weight, bias = linear if linear is not None else (conv[0].reshape(conv[0].shape[0], -1), conv[1])
        name = node.name or f"{'linear' if linear is not None else 'conv'}{k}"
        if np.count_nonzero(weight) > max_density * weight.size:
            kept.append(name)
            continue
        out = node.output[0]
        add = _follower(out, readers, outputs, "Add") if bias is None and linear is not None else None
        if add is not None:
            other = add.input[1] if add.input[0] == out else add.input[0]
            b = inits.get(other)
            if b is not None and b.dtype == np.float32 and b.size == weight.shape[0] and b.ndim <= 2:
                bias, out = b.reshape(-1), add.output[0]
                removed.add(id(add))
        relu = _follower(out, readers, outputs, "Relu")
        layer = CsrLayer.from_dense(weight, bias, relu is not None, name=name)
        if conv is not None:
            offered.append(name)
            sc = SparseConv(layer, conv[0].shape[1], conv[2], block=conv_block(layer))
            if keep_conv is not None and not keep_conv(sc, node.input[0]):
                kept.append(name)
                continue
            layers[name] = sc
        else:
            layers[name] = layer
        if relu is not None:
            out = relu.output[0]
            removed.add(id(relu))
        names, arrays = _csr_initializers(name, layer)
        new_inits += [onnx.numpy_helper.from_array(np.ascontiguousarray(a), n) for a, n in zip(arrays, names,
                                                                                                strict=True)]
        act = "relu" if layer.relu else "none"
        x = node.input[0]
        if conv is not None:
            geo = conv[2]
            replaced[id(node)] = [helper.make_node(
                CONV_OP, [x, *names], [out], domain=DOMAIN, name=name, in_features=layer.n_in,
                out_features=layer.n_out, in_channels=int(conv[0].shape[1]), kernel_shape=list(geo.kernel),
                strides=list(geo.strides), pads=list(geo.pads), dilations=list(geo.dilations), activation=act,
                negative_slope=SLOPES[act], block=int(layers[name].block))]
            continue
        two_d = ranks.get(x) == 2
        sparse = helper.make_node(OP, [x if two_d else f"{name}.x2d", *names], [out if two_d else f"{name}.y2d"],
                                  domain=DOMAIN, name=name, in_features=layer.n_in, out_features=layer.n_out,
                                  activation=act, negative_slope=SLOPES[act], plan="{}")
        if two_d:
            replaced[id(node)] = [sparse]
        else:
            wrapped, consts = _rows_wrapper(sparse, x, out, layer.n_in, layer.n_out)
            replaced[id(node)] = wrapped
            new_inits += consts
    if not layers:
        raise UnsupportedGraphError("no linear layer or convolution of this graph has a sparse constant weight",
                                    where="model", fix="the fast format packs sparse Linear/Gemm/MatMul and Conv "
                                    "layers; use --format onnx")
    nodes = [m for n in g.node if id(n) not in removed for m in replaced.get(id(n), [n])]
    used = {i for n in nodes for i in n.input}
    kept_inits = [t for t in g.initializer if t.name in used]
    all_inits = {t.name for t in g.initializer}
    inputs = [i for i in g.input if i.name not in all_inits or i.name in used]
    graph = helper.make_graph(nodes, g.name or "sparsekit_fast", inputs, list(g.output),
                              initializer=kept_inits + new_inits, value_info=list(g.value_info))
    opsets = [o for o in dense.opset_import if o.domain != DOMAIN] + [helper.make_opsetid(DOMAIN, 1)]
    proto = helper.make_model(graph, opset_imports=opsets, producer_name="sparsekit")
    proto.ir_version = dense.ir_version
    proto.functions.extend(dense.functions)
    opset = next((int(o.version) for o in dense.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset >= portable.MIN_OPSET:  # stock ONNX Runtime runs the artifact too (its body needs opset 16)
        kinds = {n.op_type for n in nodes if n.domain == DOMAIN}
        proto.functions.extend(portable.BODIES[op](opset) for op in (OP, CONV_OP) if op in kinds)
    return Packed(proto, layers, kept, offered)


def conv_block(layer: CsrLayer) -> int:
    """The panel kernel's column block width for a convolution's (C_out, K) weight: the heuristic's for its
    64-pixel panels (blocks of 128/256 columns keep a wide K's panel rows in cache)."""
    from sparsekit.runtime.layers import parse_kernel
    from sparsekit.runtime.model import default_kernel

    name, block, _ = parse_kernel(default_kernel(layer, 64))
    return block if name in ("panel", "block") else 0


def _csr_initializers(name: str, layer: CsrLayer) -> tuple[list[str], list[np.ndarray]]:
    v, i, rp = layer.csr()
    names = [f"{name}.values", f"{name}.indices", f"{name}.rowptr"]
    arrays = [v, i, rp]
    if layer.bias is not None:
        names.append(f"{name}.bias")
        arrays.append(layer.bias)
    return names, arrays


def _shapes(dense: onnx.ModelProto) -> dict[str, list[int]]:
    """Each tensor's dims where shape inference knows them (0 for a symbolic dim)."""
    try:
        g = onnx.shape_inference.infer_shapes(dense, strict_mode=False).graph
    except Exception:
        return {}
    return {v.name: [d.dim_value if d.HasField("dim_value") else 0 for d in v.type.tensor_type.shape.dim]
            for v in [*g.input, *g.value_info, *g.output]
            if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape")}


def _ranks(dense: onnx.ModelProto) -> dict[str, int]:
    """Each tensor's rank where ONNX shape inference knows it."""
    try:
        g = onnx.shape_inference.infer_shapes(dense, strict_mode=False).graph
    except Exception:  # unknown ranks only mean wrappers everywhere
        return {}
    return {v.name: len(v.type.tensor_type.shape.dim) for v in [*g.input, *g.value_info, *g.output]
            if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape")}


def _rows_wrapper(sparse: onnx.NodeProto, x: str, y: str, n_in: int, n_out: int
                  ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """SparseLinear takes rows (2-D, as Gemm in its function body does): ``x`` (..., in) is viewed as (rows, in)
    and the result (rows, out) as (..., out), with standard Shape/Slice/Reshape/Concat nodes around it."""
    p = sparse.name
    mk = helper.make_node
    consts = [onnx.numpy_helper.from_array(np.asarray(a, np.int64), n) for a, n in (
        ([-1, n_in], f"{p}.rows_shape"), ([0], f"{p}.zero"), ([-1], f"{p}.minus_one"), ([n_out], f"{p}.out_dim"))]
    nodes = [mk("Shape", [x], [f"{p}.x_shape"]),
             mk("Slice", [f"{p}.x_shape", f"{p}.zero", f"{p}.minus_one"], [f"{p}.lead"]),
             mk("Reshape", [x, f"{p}.rows_shape"], [f"{p}.x2d"]),
             sparse,
             mk("Concat", [f"{p}.lead", f"{p}.out_dim"], [f"{p}.y_shape"], axis=0),
             mk("Reshape", [f"{p}.y2d", f"{p}.y_shape"], [y])]
    return nodes, consts
