"""Channel links of an ONNX graph: where ``compact-onnx`` may remove channels exactly (see
``sparsekit.exporters.compact_graph``).

A *link* is a producer with a constant weight (``Conv`` with groups = 1, ``Gemm``, ``MatMul``) whose output
reaches only *sinks* — the data input of other such layers — through channel-wise ops: activations,
``Add``/``Mul``/… with a scalar or per-channel constant or with another tensor of the link,
``BatchNormalization``, depthwise ``Conv``, pooling, a spatial ``ReduceMean`` (keepdims), and a final
``Flatten``/``Reshape`` of (N, C, H, W) to (N, C·H·W) before a ``Gemm``/``MatMul``. A tensor of the link
that anything else reads (a residual ``Add``, attention's head split, ``Shape``, a graph output) makes the
link ineligible.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

_UNARY = {"Relu", "LeakyRelu", "Sigmoid", "Tanh", "Erf", "Identity", "Clip", "Softplus"}
_BINARY = {"Add", "Sub", "Mul", "Div"}
# Channel-wise ops that keep a constant channel constant (pads of MaxPool are -inf, so they do too).
_SPATIAL = {"MaxPool", "GlobalAveragePool", "GlobalMaxPool", "AveragePool", "ReduceMean"}
_FLATTEN = {"Flatten", "Reshape"}


@dataclass
class Sink:
    node: onnx.NodeProto
    span: int = 1            # sink input columns per channel (H·W after a Flatten, else 1)
    reshape: onnx.NodeProto | None = None


@dataclass
class Link:
    producer: onnx.NodeProto
    channels: int
    members: list[onnx.NodeProto] = field(default_factory=list)  # channel-wise nodes, graph order
    sinks: list[Sink] = field(default_factory=list)
    conv: bool = False       # channel axis 1 of NCHW (else the last axis)


class GraphIndex:
    """Constants, producers and consumers of one graph (rebuilt after every change)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        self.model = model
        self.const: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        for n in g.node:
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
                self.const[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        self.uses: dict[str, int] = {}
        for n in g.node:
            for i, name in enumerate(n.input):
                self.consumers.setdefault(name, []).append((n, i))
                self.uses[name] = self.uses.get(name, 0) + 1
        self.outputs = {o.name for o in g.output}
        self.order = {id(n): i for i, n in enumerate(g.node)}
        inferred = onnx.shape_inference.infer_shapes(model)
        self.shapes: dict[str, tuple[int | None, ...]] = {}
        for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
            dims = vi.type.tensor_type.shape.dim
            self.shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)


def attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            value = onnx.helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


def weight_of(ix: GraphIndex, node: onnx.NodeProto) -> np.ndarray | None:
    """The constant weight of a layer node (only when nothing else reads it), else None."""
    if len(node.input) < 2 or node.input[1] not in ix.const or ix.uses.get(node.input[1], 0) != 1:
        return None
    w = ix.const[node.input[1]]
    if node.op_type == "Conv":
        return w if w.ndim == 4 and attr(node, "group", 1) == 1 else None
    if node.op_type == "Gemm":
        return w if w.ndim == 2 and attr(node, "transA", 0) == 0 else None
    return w if node.op_type == "MatMul" and w.ndim == 2 else None


def out_rows(node: onnx.NodeProto, w: np.ndarray) -> np.ndarray:
    """The weight as (output channel, inputs...): one row per output channel."""
    if node.op_type == "Conv" or (node.op_type == "Gemm" and attr(node, "transB", 0) == 1):
        return w.reshape(w.shape[0], -1)
    return w.T


def in_cols(node: onnx.NodeProto, w: np.ndarray) -> np.ndarray:
    """The weight as (input column, outputs...): one row per input column (Conv: per input channel)."""
    if node.op_type == "Conv":
        return np.moveaxis(w, 1, 0).reshape(w.shape[1], -1)
    if node.op_type == "Gemm" and attr(node, "transB", 0) == 1:
        return w.T
    return w


def per_channel(ix: GraphIndex, name: str, channels: int, conv: bool, *,
                layer_bias: bool = False) -> np.ndarray | None:
    """A constant input as a per-channel float64 vector (scalars broadcast), or None if it is not one.
    ``layer_bias``: a Conv/Gemm bias, (C,) whatever the layout (an elementwise (C,) constant on NCHW would
    broadcast over the width instead)."""
    if name not in ix.const:
        return None
    c = ix.const[name].astype(np.float64)
    if c.size == 1:
        return np.full(channels, float(c.reshape(-1)[0]))
    if layer_bias:
        return c if c.shape == (channels,) else None
    squeezed = [d for d in c.shape if d != 1]
    if squeezed != [channels]:
        return None
    tail = c.shape[c.shape.index(channels) + 1:] if channels in c.shape else ()
    if conv and len(c.shape) >= 3 and all(d == 1 for d in tail) and len(tail) == 2:
        return c.reshape(-1)
    if not conv and c.shape[-1] == channels:
        return c.reshape(-1)
    return None


def _sink(ix: GraphIndex, node: onnx.NodeProto, idx: int, link: Link) -> Sink | None:
    """``node`` as a sink of ``link`` (reading it at input ``idx``), or None."""
    w = weight_of(ix, node) if idx == 0 else None
    if w is None or (node.op_type == "Conv") != link.conv:  # a conv link reaches a Gemm only via a Flatten
        return None
    return Sink(node) if in_cols(node, w).shape[0] == link.channels else None


def _flatten_sinks(ix: GraphIndex, node: onnx.NodeProto, link: Link) -> list[Sink] | None:
    """The layers behind a Flatten/Reshape of an (N, C, H, W) tensor of a conv link to (N, C·H·W)."""
    shape_in, shape_out = ix.shapes.get(node.input[0], ()), ix.shapes.get(node.output[0], ())
    if not link.conv or len(shape_in) != 4 or len(shape_out) != 2 or None in shape_in[1:]:
        return None
    span = int(shape_in[2] * shape_in[3])
    if shape_in[1] != link.channels or shape_out[1] != link.channels * span or node.output[0] in ix.outputs:
        return None
    sinks = []
    for user, idx in ix.consumers.get(node.output[0], []):
        w = weight_of(ix, user) if idx == 0 and user.op_type in ("Gemm", "MatMul") else None
        if w is None or in_cols(user, w).shape[0] != link.channels * span:
            return None
        sinks.append(Sink(user, span, node))
    return sinks


def _member(ix: GraphIndex, node: onnx.NodeProto, idx: int, link: Link) -> bool:
    """Whether ``node`` (reading a tensor of the link at input ``idx``) is channel-wise for it."""
    op, c = node.op_type, link.channels
    if len(node.output) != 1:
        return False
    if op in _UNARY:
        return idx == 0 and all(n == "" or (n in ix.const and ix.const[n].size == 1) for n in node.input[1:])
    if op in _BINARY:
        other = node.input[1 - idx]
        return other not in ix.const or per_channel(ix, other, c, link.conv) is not None
    if op == "Conv":
        return idx == 0 and link.conv and depthwise(ix, node, c)
    if op == "BatchNormalization":
        return idx == 0 and attr(node, "training_mode", 0) == 0 and \
            all(per_channel(ix, n, c, link.conv) is not None for n in node.input[1:5])
    if op in _SPATIAL and link.conv and idx == 0:
        if op == "AveragePool":
            return attr(node, "count_include_pad", 0) == 0 or not any(attr(node, "pads", []))
        if op == "ReduceMean":
            axes = attr(node, "axes", None)
            if axes is None and len(node.input) > 1 and node.input[1] in ix.const:
                axes = ix.const[node.input[1]].reshape(-1).tolist()
            return axes is not None and {int(a) % 4 for a in axes} <= {2, 3} and attr(node, "keepdims", 1) == 1
        return True
    return False


def depthwise(ix: GraphIndex, node: onnx.NodeProto, channels: int) -> bool:
    """A depthwise Conv over ``channels`` channels, weight (C, 1, kh, kw) read by nothing else: channel-wise."""
    w = ix.const.get(node.input[1]) if len(node.input) > 1 and ix.uses.get(node.input[1], 0) == 1 else None
    if w is None or w.ndim != 4 or w.shape[:2] != (channels, 1) or attr(node, "group", 1) != channels:
        return False
    return len(node.input) < 3 or not node.input[2] or (node.input[2] in ix.const and
                                                        ix.const[node.input[2]].shape == (channels,))


def find_link(ix: GraphIndex, producer: onnx.NodeProto) -> Link | None:
    """The link that starts at ``producer``, or None when anything but channel-wise ops and sinks reads it."""
    w = weight_of(ix, producer)
    if w is None or len(producer.output) != 1:
        return None
    link = Link(producer, out_rows(producer, w).shape[0], conv=producer.op_type == "Conv")
    inside, todo, seen = {producer.output[0]}, [producer.output[0]], set()
    while todo:
        tensor = todo.pop()
        if tensor in ix.outputs:
            return None
        for node, idx in ix.consumers.get(tensor, []):
            if id(node) in seen:
                continue
            if node.op_type in _FLATTEN:
                sinks = _flatten_sinks(ix, node, link)
            else:
                sink = None if _member(ix, node, idx, link) else _sink(ix, node, idx, link)
                sinks = [sink] if sink is not None else None
            seen.add(id(node))
            if sinks is not None:
                link.sinks += sinks
            elif _member(ix, node, idx, link):
                link.members.append(node)
                inside.add(node.output[0])
                todo.append(node.output[0])
            else:
                return None
    if not link.sinks or any(n not in inside and n not in ix.const and n != ""
                             for m in link.members for n in m.input):
        return None
    link.members.sort(key=lambda n: ix.order[id(n)])
    return link
