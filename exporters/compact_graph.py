"""Exact compaction of any graph (``compact-onnx`` beyond MLP chains): dead channels of conv nets and dead
units inside residual and attention graphs, link by link (``sparsekit.exporters.channel_links``).

Channel c of a link can go when

- no sink reads it (its slice of every sink weight is zero), or
- it has no incoming weights: it then carries the constant v_c = chain(bias_c) everywhere. If v_c is 0 it
  goes outright; otherwise v_c · (its sink weights) is folded into each sink's bias first. That is exact
  only where every output of the sink sees the same constant, so a ``Conv`` sink with padding (whose
  border would see zeros instead of v_c), or a ``MatMul`` sink without a bias ``Add``, keeps the channel.

Folds accumulate in float64 and are rounded to float32 once. Removing channels can leave others dead, so
passes repeat until nothing changes; every link keeps at least one channel.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import numpy_helper
from sparsekit.exporters.channel_links import (
    GraphIndex,
    Link,
    Sink,
    attr,
    find_link,
    in_cols,
    out_rows,
    per_channel,
    weight_of,
)

_ERF = np.vectorize(math.erf, otypes=[np.float64])


def _start(ix: GraphIndex, link: Link) -> np.ndarray:
    """The producer's output per channel when its weights are zero: its bias (Gemm: beta · C)."""
    p, c = link.producer, link.channels
    if p.op_type in ("Conv", "Gemm") and len(p.input) > 2 and p.input[2]:
        bias = per_channel(ix, p.input[2], c, link.conv, layer_bias=True)
        if bias is None:  # a bias that is not per channel: treat every channel as live
            return np.full(c, np.nan)
        return bias * (float(attr(p, "beta", 1.0)) if p.op_type == "Gemm" else 1.0)
    return np.zeros(c)


def _apply(ix: GraphIndex, node: onnx.NodeProto, vals: dict[str, np.ndarray], link: Link) -> np.ndarray:
    """One channel-wise op on per-channel constants."""
    c, op = link.channels, node.op_type

    def arg(i: int) -> np.ndarray:
        name = node.input[i]
        return vals[name] if name in vals else per_channel(ix, name, c, link.conv)

    if op in ("Add", "Sub", "Mul", "Div"):
        a, b = arg(0), arg(1)
        return {"Add": a + b, "Sub": a - b, "Mul": a * b, "Div": a / b}[op]
    x = vals[node.input[0]]  # every other channel-wise op reads the link at input 0
    if op == "Conv":  # depthwise: a zero channel gives its bias everywhere (zero padding agrees); others only
        w = ix.const[node.input[1]].astype(np.float64)  # without padding
        b = per_channel(ix, node.input[2], c, True, layer_bias=True) if len(node.input) > 2 and node.input[2] \
            else np.zeros(c)
        unpadded = attr(node, "auto_pad", "NOTSET") in ("NOTSET", "VALID") and not any(attr(node, "pads", []))
        return np.where(x == 0, b, x * w.sum(axis=(1, 2, 3)) + b if unpadded else np.nan)
    if op == "Relu":
        return np.maximum(x, 0.0)
    if op == "LeakyRelu":
        return np.where(x >= 0, x, x * float(attr(node, "alpha", 0.01)))
    if op == "Sigmoid":
        return 1.0 / (1.0 + np.exp(-x))
    if op == "Tanh":
        return np.tanh(x)
    if op == "Erf":
        return _ERF(x)
    if op == "Softplus":
        return np.log1p(np.exp(x))
    if op == "Clip":
        lo = arg(1) if len(node.input) > 1 and node.input[1] else -np.inf
        hi = arg(2) if len(node.input) > 2 and node.input[2] else np.inf
        return np.clip(x, lo, hi)
    if op == "BatchNormalization":
        scale, bias, mean, var = (arg(i) for i in range(1, 5))
        return (x - mean) / np.sqrt(var + float(attr(node, "epsilon", 1e-5))) * scale + bias
    return x  # Identity and the pooling ops keep a constant channel constant


def channel_constants(ix: GraphIndex, link: Link) -> dict[str, np.ndarray]:
    """Per-channel values of every tensor of the link for channels whose producer weights are all zero."""
    vals = {link.producer.output[0]: _start(ix, link)}
    with np.errstate(all="ignore"):
        for node in link.members:
            vals[node.output[0]] = _apply(ix, node, vals, link)
    return vals


def sink_input(sink: Sink) -> str:
    """The tensor of the link a sink reads (before its Flatten, if any)."""
    return sink.reshape.input[0] if sink.reshape is not None else sink.node.input[0]


class Editor:
    """Replaces constant inputs of nodes with new initializers (the old ones are pruned at the end);
    ``origin`` maps every new name to the original initializer's, across passes."""

    def __init__(self, model: onnx.ModelProto, origin: dict[str, str]) -> None:
        self.model = model
        self.origin = origin
        self.names = {t.name for t in model.graph.initializer} | {o for n in model.graph.node for o in n.output}

    def set(self, node: onnx.NodeProto, idx: int, value: np.ndarray, dtype: np.dtype) -> None:
        base = node.input[idx] if idx < len(node.input) and node.input[idx] else f"{node.name or node.op_type}_bias"
        name, k = f"{base}_compact", 0
        while name in self.names:
            k += 1
            name = f"{base}_compact{k}"
        self.names.add(name)
        self.origin[name] = self.origin.get(base, base)
        self.model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value, dtype), name))
        while len(node.input) <= idx:
            node.input.append("")
        node.input[idx] = name

    def prune(self) -> None:
        used = {n for node in self.model.graph.node for n in node.input}
        keep = [t for t in self.model.graph.initializer if t.name in used]
        del self.model.graph.initializer[:]
        self.model.graph.initializer.extend(keep)
        del self.model.graph.value_info[:]  # shapes changed; ONNX Runtime infers them again

    def restore_names(self) -> None:
        """Give every replaced initializer its original name back (the originals are gone by now)."""
        taken = {t.name for t in self.model.graph.initializer}
        renames = {t.name: self.origin[t.name] for t in self.model.graph.initializer
                   if t.name in self.origin and self.origin[t.name] not in taken}
        for t in self.model.graph.initializer:
            t.name = renames.get(t.name, t.name)
        for node in self.model.graph.node:
            for i, n in enumerate(node.input):
                node.input[i] = renames.get(n, n)


def _bias_add(ix: GraphIndex, sink: Sink) -> tuple[onnx.NodeProto, int] | None:
    """For a MatMul sink: the Add of a constant bias that alone reads its output, and the bias input."""
    users = ix.consumers.get(sink.node.output[0], [])
    if len(users) != 1 or users[0][0].op_type != "Add":
        return None
    add, idx = users[0]
    other = add.input[1 - idx]
    return (add, 1 - idx) if other in ix.const and ix.const[other].ndim == 1 else None


def foldable(ix: GraphIndex, sink: Sink) -> bool:
    """Whether a constant channel can be folded into this sink's bias exactly."""
    node = sink.node
    if node.op_type == "Conv":
        return attr(node, "auto_pad", "NOTSET") in ("NOTSET", "VALID") and not any(attr(node, "pads", []))
    if node.op_type == "Gemm":
        return float(attr(node, "beta", 1.0)) != 0.0 and (len(node.input) < 3 or not node.input[2]
                                                           or ix.const.get(node.input[2], np.zeros(2)).ndim <= 1)
    return _bias_add(ix, sink) is not None


def fold(ix: GraphIndex, ed: Editor, link: Link, sink: Sink, value: np.ndarray) -> None:
    """Add Σ_c value_c · (channel c's sink weights) to the sink's bias (value is 0 for channels that stay)."""
    node = sink.node
    w = weight_of(ix, node)
    cols = in_cols(node, w).astype(np.float64).reshape(link.channels, sink.span, -1)
    contrib = np.einsum("c,cso->o", value, cols) if node.op_type != "Conv" else \
        np.einsum("c,oc->o", value, w.astype(np.float64).sum(axis=(2, 3)))
    if node.op_type == "MatMul":
        add, idx = _bias_add(ix, sink)
        ed.set(add, idx, ix.const[add.input[idx]] + contrib, ix.const[add.input[idx]].dtype)
        return
    has_bias = len(node.input) > 2 and node.input[2]
    bias = ix.const[node.input[2]].astype(np.float64) if has_bias else np.zeros(contrib.shape)
    if node.op_type == "Gemm":
        contrib = contrib * float(attr(node, "alpha", 1.0)) / float(attr(node, "beta", 1.0))
    ed.set(node, 2, bias + contrib, w.dtype)


def _slice_channel(value: np.ndarray, keep: np.ndarray, conv: bool) -> np.ndarray:
    """A per-channel constant with only the kept channels (scalars stay as they are)."""
    if value.size == 1:
        return value
    axes = [i for i, d in enumerate(value.shape) if d == keep.size]
    return np.compress(keep, value, axis=axes[0] if conv else axes[-1])


def remove_channels(ix: GraphIndex, ed: Editor, link: Link, keep: np.ndarray) -> None:
    """Drop the channels not in ``keep`` from the producer, the channel-wise constants and the sinks."""
    p = link.producer
    w = ix.const[p.input[1]]
    ed.set(p, 1, np.compress(keep, w, axis=1 if p.op_type == "MatMul" or
                             (p.op_type == "Gemm" and not attr(p, "transB", 0)) else 0), w.dtype)
    if p.op_type in ("Conv", "Gemm") and len(p.input) > 2 and p.input[2]:
        b = ix.const[p.input[2]]
        ed.set(p, 2, _slice_channel(b, keep, link.conv and b.ndim > 1), b.dtype)
    for node in link.members:
        if node.op_type == "Conv":  # depthwise: its filters, and one group per channel
            dw = ix.const[node.input[1]]
            ed.set(node, 1, dw[keep], dw.dtype)
            if len(node.input) > 2 and node.input[2]:
                ed.set(node, 2, ix.const[node.input[2]][keep], dw.dtype)
            next(a for a in node.attribute if a.name == "group").i = int(keep.sum())
        for i, name in enumerate(node.input):
            if name in ix.const and ix.const[name].size > 1 and \
                    per_channel(ix, name, link.channels, link.conv) is not None:  # not e.g. ReduceMean's axes
                ed.set(node, i, _slice_channel(ix.const[name], keep, link.conv), ix.const[name].dtype)
    reshaped = set()
    for sink in link.sinks:
        cols = np.repeat(keep, sink.span)
        sw = ix.const[sink.node.input[1]]
        axis = 1 if sink.node.op_type == "Conv" or (sink.node.op_type == "Gemm" and attr(sink.node, "transB", 0)) \
            else 0
        ed.set(sink.node, 1, np.compress(cols, sw, axis=axis), sw.dtype)
        r = sink.reshape
        if r is not None and r.op_type == "Reshape" and id(r) not in reshaped and r.input[1] in ix.const:
            shape = ix.const[r.input[1]].copy()
            shape[shape == keep.size * sink.span] = int(keep.sum()) * sink.span
            ed.set(r, 1, shape, shape.dtype)
            reshaped.add(id(r))


def compact_link(ix: GraphIndex, ed: Editor, link: Link) -> dict | None:
    """Remove what can go from one link; its report entry, or None when every channel stays."""
    c = link.channels
    dead_in = ~np.any(out_rows(link.producer, weight_of(ix, link.producer)) != 0, axis=1)
    used = np.zeros(c, bool)
    for sink in link.sinks:
        cols = in_cols(sink.node, weight_of(ix, sink.node)).reshape(c, sink.span, -1)
        used |= np.any(cols != 0, axis=(1, 2))
    vals = channel_constants(ix, link)
    seen = [np.where(dead_in & used, vals[sink_input(s)], 0.0) for s in link.sinks]
    silent = np.all([v == 0 for v in seen], axis=0)           # NaN (an unknown bias) is never silent
    can_fold = all(foldable(ix, s) for s in link.sinks)
    gone = ~used | (dead_in & (silent | (can_fold & np.all([np.isfinite(v) for v in seen], axis=0))))
    if gone.all():
        gone[0] = False  # a link keeps one channel, as it was
    if not gone.any():
        return None
    for sink, v in zip(link.sinks, seen, strict=True):
        folded = np.where(gone, v, 0.0)
        if np.any(folded != 0):
            fold(ix, ed, link, sink, folded)
    remove_channels(ix, ed, link, ~gone)
    return {"layer": ed.origin.get(link.producer.input[1], link.producer.input[1]), "before": c,
            "after": int((~gone).sum()), "folded": int(np.sum(gone & used & ~silent)),
            "sinks": [ed.origin.get(s.node.input[1], s.node.input[1]) for s in link.sinks]}


def compact_graph(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    """A copy of ``model`` with every removable channel removed, and what was removed per layer."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    weights_before = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    done: dict[str, dict] = {}
    origin: dict[str, str] = {}
    while True:
        ix, ed = GraphIndex(model), Editor(model, origin)
        entry = None
        for node in list(model.graph.node):
            link = find_link(ix, node) if node.op_type in ("Conv", "Gemm", "MatMul") else None
            entry = compact_link(ix, ed, link) if link is not None else None
            if entry is not None:
                break
        ed.prune()
        if entry is None:
            ed.restore_names()
            break
        first = done.get(entry["layer"])
        if first is not None:  # the same layer shrank again in a later pass
            entry = {**entry, "before": first["before"], "folded": entry["folded"] + first["folded"]}
        done[entry["layer"]] = entry
    weights_after = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    return model, {"channels": list(done.values()),
                   "weights": {"before": weights_before, "after": weights_after}}
