"""Packing recurrent layers for the ``fast`` format: each ONNX ``GRU``/``LSTM`` node whose weights ``W`` and ``R``
are constants (initializers, or constant subgraphs such as the Slice/Concat gate reordering torch's exporter
writes: folded here) and sparse enough becomes a ``com.sparsekit::SparseGRU``/``SparseLSTM`` node
(``sparsekit.runtime.rnn_onnx``), its W and R stored as CSR. Only the forms sparsekit's loop computes are packed:
forward, layout 0, default activations, no clip, no sequence_lens, no peepholes, GRU with linear_before_reset = 1,
LSTM without input_forget; any other stays an ordinary node (ONNX Runtime runs it).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper
from sparsekit.exporters.graph import _attr, initializer_arrays

from sparsekit.runtime import portable, rnn_onnx
from sparsekit.runtime.checks import DOMAIN
from sparsekit.runtime.layers import CsrLayer
from sparsekit.runtime.rnn import GATES, GRU, LSTM, SparseRnn

FOLDABLE = {"Slice", "Concat", "Unsqueeze", "Squeeze", "Reshape", "Transpose", "Identity", "Constant", "Split",
            "Gather", "Cast"}
_DEFAULTS = {"direction": b"forward", "layout": 0, "input_forget": 0, "linear_before_reset": 1}


def _constant(name: str, producer: dict[str, onnx.NodeProto], inits: dict[str, np.ndarray],
              depth: int = 0) -> np.ndarray | None:
    """The value of tensor ``name`` when it is an initializer or computed from initializers only by
    ``FOLDABLE`` nodes (evaluated with ONNX's reference evaluator), else None."""
    if name in inits:
        return inits[name]
    node = producer.get(name)
    if node is None or depth > 16 or node.op_type not in FOLDABLE or node.domain not in ("", "ai.onnx"):
        return None
    args = [_constant(i, producer, inits, depth + 1) if i else None for i in node.input]
    if any(a is None for a, i in zip(args, node.input, strict=True) if i):
        return None
    from onnx.reference import ReferenceEvaluator

    feeds = {f"a{k}": a for k, a in enumerate(args) if a is not None}
    n = onnx.NodeProto()
    n.CopyFrom(node)
    n.input[:] = [f"a{k}" if i else "" for k, i in enumerate(node.input)]
    outs = ReferenceEvaluator(n).run(None, feeds)
    inits.update(zip(node.output, outs, strict=False))
    return inits.get(name)


def _supported(node: onnx.NodeProto) -> str | None:
    """The sparse op of a GRU/LSTM node in a form sparsekit runs, else None."""
    op = {"GRU": GRU, "LSTM": LSTM}.get(node.op_type) if node.domain in ("", "ai.onnx") else None
    if op is None:
        return None
    known = {"hidden_size", *(k for k in _DEFAULTS if k != "linear_before_reset" or op == GRU)}
    if op == LSTM:
        known.discard("linear_before_reset")
    if any(a.name not in known for a in node.attribute):  # activations, clip, ...
        return None
    lbr_default = 0  # ONNX's default; torch writes 1 explicitly
    for key, want in _DEFAULTS.items():
        have = _attr(node, key, lbr_default if key == "linear_before_reset" else want)
        if key in known and have != want:
            return None
    ins = list(node.input) + [""] * (8 - len(node.input))
    if ins[4] or (op == GRU and len(node.input) > 6) or (op == LSTM and ins[7]):  # sequence_lens, peepholes
        return None
    return op


def _sparse(node: onnx.NodeProto, op: str, producer: dict, inits: dict, max_density: float
            ) -> tuple[CsrLayer, CsrLayer, str] | None:
    """(W, R, bias initializer name or '') of a packable node, else None (weights not constant or too dense)."""
    hid = int(_attr(node, "hidden_size", 0))
    g = GATES[op]
    w, r = (_constant(node.input[k], producer, inits) for k in (1, 2))
    b_name = node.input[3] if len(node.input) > 3 else ""
    b = _constant(b_name, producer, inits) if b_name else None
    if w is None or r is None or (b_name and b is None) or hid < 1:
        return None
    bad_b = b is not None and (b.dtype != np.float32 or b.shape != (1, 2 * g * hid))
    if w.dtype != np.float32 or r.dtype != np.float32 or w.ndim != 3 or w.shape[:2] != (1, g * hid) \
            or r.shape != (1, g * hid, hid) or bad_b:
        return None
    if np.count_nonzero(w) + np.count_nonzero(r) > max_density * (w.size + r.size):
        return None
    return CsrLayer.from_dense(w[0], None, False), CsrLayer.from_dense(r[0], None, False), b_name


def pack_recurrent(dense: onnx.ModelProto, *, max_density: float, keep: bool = True
                   ) -> tuple[onnx.ModelProto, dict[str, SparseRnn]]:
    """``dense`` with its packable GRU/LSTM nodes as SparseGRU/SparseLSTM nodes (the constant subgraphs they no
    longer read removed, their functions added), and the layers by node name. ``keep=False``: unchanged."""
    g = dense.graph
    targets = [(k, n, _supported(n)) for k, n in enumerate(g.node)] if keep else []
    targets = [(k, n, op) for k, n, op in targets if op is not None]
    if not targets:
        return dense, {}
    inits = initializer_arrays(dense)
    producer = {o: n for n in g.node for o in n.output if o}
    out = onnx.ModelProto()
    out.CopyFrom(dense)
    layers: dict[str, SparseRnn] = {}
    new_inits: list[onnx.TensorProto] = []
    for k, node, op in targets:
        packed = _sparse(node, op, producer, inits, max_density)
        if packed is None:
            continue
        w, r, b_name = packed
        name = node.name or f"{op.lower()}{k}"
        hid, n_in = r.n_in, w.n_in
        csr_names = []
        for m, layer in (("W", w), ("R", r)):
            names = [f"{name}.{m}_{part}" for part in ("values", "indices", "rowptr")]
            new_inits += [onnx.numpy_helper.from_array(np.ascontiguousarray(a), n)
                          for a, n in zip(layer.csr(), names, strict=True)]
            csr_names += names
        if b_name and b_name not in {t.name for t in g.initializer}:  # a folded bias becomes an initializer
            new_inits.append(onnx.numpy_helper.from_array(inits[b_name], b_name))
        ins = list(node.input) + [""] * (len(rnn_onnx.INPUTS[op]) - 2 - len(node.input))
        states = ins[5:7] if op == LSTM else ins[5:6]
        outs = list(node.output) + [""] * (len(rnn_onnx.OUTPUTS[op]) - len(node.output))
        outs = [o or f"{name}.{rnn_onnx.OUTPUTS[op][j]}" for j, o in enumerate(outs)]
        attrs = {"hidden_size": hid, "input_size": n_in, **({"linear_before_reset": 1} if op == GRU else {})}
        out.graph.node[k].CopyFrom(helper.make_node(op, [node.input[0], *csr_names, b_name, "", *states], outs,
                                                    domain=DOMAIN, name=name, **attrs))
        b = inits[b_name][0] if b_name else None
        g_h = GATES[op] * hid
        wb = None if b is None else b[:g_h] + (b[g_h:] if op == LSTM else 0)
        w = CsrLayer.from_csr(n_in, g_h, *w.csr(), wb, False, name=f"{name}.W")
        r = CsrLayer.from_csr(hid, g_h, *r.csr(), None if b is None or op == LSTM else b[g_h:], False,
                              name=f"{name}.R")
        layers[name] = SparseRnn(op, w, r, name=name)
    if not layers:
        return dense, {}
    out.graph.initializer.extend(new_inits)
    _drop_dead(out)
    opset = next((int(o.version) for o in dense.opset_import if o.domain in ("", "ai.onnx")), 0)
    if not any(o.domain == DOMAIN for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    if opset >= portable.MIN_OPSET:
        kinds = {n.op_type for n in out.graph.node if n.domain == DOMAIN}
        out.functions.extend(rnn_onnx.function(op, opset) for op in rnn_onnx.OPS if op in kinds)
    return out, layers


def _drop_dead(model: onnx.ModelProto) -> None:
    """Remove the nodes whose outputs nothing reads (the folded weight subgraphs) and unused initializers."""
    g = model.graph
    while True:
        read = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        keep = [n for n in g.node if any(o in read for o in n.output if o)]
        if len(keep) == len(g.node):
            break
        del g.node[:]
        g.node.extend(keep)
    read = {i for n in g.node for i in n.input}
    kept = [t for t in g.initializer if t.name in read]
    del g.initializer[:]
    g.initializer.extend(kept)
