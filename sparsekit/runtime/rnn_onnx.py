"""The ONNX side of ``com.sparsekit::SparseGRU`` / ``SparseLSTM`` (docs/fast-format.md): the node's inputs and
attributes, its portable function body (the dense W and R rebuilt from CSR as SparseLinear's are, then ONNX's own
GRU/LSTM with the same attributes), the loader's checks, and a stand-in node for shape inference.

Node inputs: ``X`` (T, N, input_size), ``W_values, W_indices, W_rowptr`` (W: gates*H rows, input_size columns),
``R_values, R_indices, R_rowptr`` (R: gates*H rows, H columns), ``B`` (1, 2*gates*H) or empty, ``sequence_lens``
(always empty), ``initial_h`` (1, N, H) or empty, and for an LSTM ``initial_c``. Outputs ``Y`` (T, 1, N, H),
``Y_h`` (1, N, H)[, ``Y_c``]. Gate order is ONNX's (GRU z, r, h; LSTM i, o, f, c).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import AttributeProto, helper

from sparsekit.errors import InputError
from sparsekit.runtime import portable
from sparsekit.runtime.checks import DOMAIN, FIX, _parse_attrs, initializers
from sparsekit.runtime.layers import MAX_DIM, CsrLayer
from sparsekit.runtime.rnn import GATES, GRU, LSTM, SparseRnn

OPS = (GRU, LSTM)
DENSE_OP = {GRU: "GRU", LSTM: "LSTM"}
STATE_INPUTS = {GRU: ["initial_h"], LSTM: ["initial_h", "initial_c"]}
INPUTS = {op: ["X", "W_values", "W_indices", "W_rowptr", "R_values", "R_indices", "R_rowptr", "B", "sequence_lens",
               *STATE_INPUTS[op]] for op in OPS}
OUTPUTS = {GRU: ["Y", "Y_h"], LSTM: ["Y", "Y_h", "Y_c"]}
ATTRS = {GRU: {"hidden_size": (AttributeProto.INT, True), "input_size": (AttributeProto.INT, True),
               "linear_before_reset": (AttributeProto.INT, True)},
         LSTM: {"hidden_size": (AttributeProto.INT, True), "input_size": (AttributeProto.INT, True)}}


def _renamed(nodes: list[onnx.NodeProto], prefix: str, names: dict[str, str]) -> list[onnx.NodeProto]:
    """``nodes`` with tensor ``t`` renamed to ``names[t]``, the shared constants kept, every other one prefixed."""
    keep = {"zero", "one", "minus_one"}
    out = []
    for node in nodes:
        n = onnx.NodeProto()
        n.CopyFrom(node)
        for field in (n.input, n.output):
            for k, t in enumerate(field):
                field[k] = names.get(t, t if t in keep else f"{prefix}{t}")
        out.append(n)
    return out


def _weight3(m: str, cols: str) -> list[onnx.NodeProto]:
    """``{m}3`` (1, n_rows, cols): matrix ``m`` (W or R) rebuilt from its CSR inputs as SparseLinear's weight."""
    p = m.lower() + "_"
    names = {"values": f"{m}_values", "indices": f"{m}_indices", "rowptr": f"{m}_rowptr", "n_out": "n_rows",
             "n_in": cols}
    build = [*portable._row_ids(), *portable._dense_weight()[2:]]  # without its n_out / n_in constants
    return [*_renamed(build, p, names), helper.make_node("Unsqueeze", [f"{p}W", "zero"], [f"{m}3"])]


def function(op: str, opset: int) -> onnx.FunctionProto:
    """SparseGRU/SparseLSTM's body: W and R rebuilt, then ``GRU``/``LSTM`` on them with the node's hidden_size
    (and linear_before_reset), the other attributes at ONNX's defaults (forward, layout 0, tanh/sigmoid)."""
    portable.function(opset)  # the same opset floor as SparseLinear's
    mk = helper.make_node
    ref = portable._ref
    cell = mk(DENSE_OP[op], ["X", "W3", "R3", "B", "sequence_lens", *STATE_INPUTS[op]], OUTPUTS[op])
    ref(cell, "hidden_size", "hidden_size", AttributeProto.INT)
    if op == GRU:
        ref(cell, "linear_before_reset", "linear_before_reset", AttributeProto.INT)
    nodes = [portable._int64("zero", [0]), portable._int64("one", [1]), portable._int64("minus_one", [-1]),
             ref(mk("Constant", [], ["hidden"]), "value_int", "hidden_size", AttributeProto.INT),
             ref(mk("Constant", [], ["inputs"]), "value_int", "input_size", AttributeProto.INT),
             mk("Constant", [], ["gates"], value=onnx.numpy_helper.from_array(np.asarray(GATES[op], np.int64))),
             mk("Mul", ["hidden", "gates"], ["n_rows"]),
             *_weight3("W", "inputs"), *_weight3("R", "hidden"), cell]
    return helper.make_function(DOMAIN, op, INPUTS[op], OUTPUTS[op], nodes, [helper.make_opsetid("", opset)],
                                attributes=list(ATTRS[op]))


def node_attrs(node: onnx.NodeProto, where: str) -> dict[str, int]:
    """A recurrent node's attributes, checked: hidden and input sizes in [1, 2^29), GRU's linear_before_reset 1
    (the form torch writes and sparsekit's loop computes), the inputs and outputs the op has."""
    op = node.op_type
    out = _parse_attrs(node, ATTRS[op], where)
    for key in ("hidden_size", "input_size"):
        if not 1 <= out[key] <= MAX_DIM // 4:
            raise InputError(f"{key} = {out[key]} is outside [1, 2^29)", where=where, fix=FIX)
    if op == GRU and out["linear_before_reset"] != 1:
        raise InputError(f"linear_before_reset = {out['linear_before_reset']}: sparsekit runs only 1 (torch's GRU)",
                         where=where, fix=FIX)
    if len(node.input) != len(INPUTS[op]) or len(node.output) != len(OUTPUTS[op]) or not all(node.output):
        raise InputError(f"{op} takes {len(INPUTS[op])} inputs and {len(OUTPUTS[op])} outputs, the node has "
                         f"{len(node.input)} and {len(node.output)}", where=where, fix=FIX)
    if node.input[8]:
        raise InputError("sequence_lens is given; sparsekit runs full sequences only", where=where, fix=FIX)
    return out


def _csr(node: onnx.NodeProto, inits: dict[str, np.ndarray], first: int, where: str) -> list[np.ndarray]:
    names = node.input[first:first + 3]
    missing = [n for n in names if n not in inits]
    if missing:
        raise InputError(f"CSR input {missing[0]!r} is not an initializer", where=where, fix=FIX)
    return [inits[n] for n in names]


def parse_node(node: onnx.NodeProto, graph: onnx.GraphProto, where: str) -> SparseRnn:
    """A SparseGRU/SparseLSTM node as a ``SparseRnn``, everything checked (attributes, CSR, the bias's shape)."""
    attrs = node_attrs(node, where)
    op, hid, n_in = node.op_type, attrs["hidden_size"], attrs["input_size"]
    g = GATES[op]
    wanted = {*node.input[1:8]} - {""}
    inits = initializers(helper.make_graph([], "rnn", [], [], initializer=[
        t for t in graph.initializer if t.name in wanted]), where)
    b = None
    if node.input[7]:
        if node.input[7] not in inits:
            raise InputError(f"bias {node.input[7]!r} is not an initializer", where=where, fix=FIX)
        b = np.asarray(inits[node.input[7]])
        if b.dtype != np.float32 or b.shape != (1, 2 * g * hid) or not np.all(np.isfinite(b)):
            raise InputError(f"bias B must be finite float32 of shape [1, {2 * g * hid}], not {b.dtype} "
                             f"{list(b.shape)}", where=where, fix=FIX)
        b = b[0]
    wb = None if b is None else b[:g * hid] + (b[g * hid:] if op == LSTM else 0)
    rb = None if b is None or op == LSTM else b[g * hid:]
    try:
        w = CsrLayer.from_csr(n_in, g * hid, *_csr(node, inits, 1, where), wb, False, name=f"{node.name}.W")
        r = CsrLayer.from_csr(hid, g * hid, *_csr(node, inits, 4, where), rb, False, name=f"{node.name}.R")
        return SparseRnn(op, w, r, name=node.name)
    except InputError as exc:
        raise InputError(exc.what, where=where, fix=exc.fix or FIX) from exc


def stand_in(node: onnx.NodeProto, k: int) -> tuple[onnx.NodeProto, list[onnx.ValueInfoProto]]:
    """For shape inference only: ONNX's GRU/LSTM on weight graph inputs of the node's shapes (no data)."""
    ints = {a.name: a.i for a in node.attribute if a.type == AttributeProto.INT}
    hid, n_in, g = ints.get("hidden_size", 1), ints.get("input_size", 1), GATES.get(node.op_type, 3)
    w, r = f"__sparsekit_rnn_w_{k}", f"__sparsekit_rnn_r_{k}"
    infos = [helper.make_tensor_value_info(w, onnx.TensorProto.FLOAT, [1, g * hid, n_in]),
             helper.make_tensor_value_info(r, onnx.TensorProto.FLOAT, [1, g * hid, hid])]
    inputs = [node.input[0], w, r, *node.input[7:]]
    return helper.make_node(DENSE_OP.get(node.op_type, "GRU"), inputs, list(node.output), hidden_size=hid), infos

