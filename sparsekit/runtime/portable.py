"""``SparseLinear`` as an ONNX model-local function of standard ops, so that stock ONNX Runtime runs a fast artifact.

A fast artifact carries this ``FunctionProto`` (domain ``com.sparsekit``) in ``model.functions``. A runtime that
has no kernel for the op inlines the body: it rebuilds the dense weight from the CSR initializers and multiplies
with ``Gemm``. Every tensor the rebuild reads is an initializer or an attribute, so ONNX Runtime folds it into one
dense constant when the session is created, and a call costs what the dense model's does. sparsekit's loader
runs its own kernels instead and accepts the function only when it is exactly the one written here (``check``),
so both runtimes compute the same thing. docs/fast-format.md describes the body step by step.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, helper, numpy_helper

from sparsekit.errors import InputError
from sparsekit.runtime.checks import CONV_OP, DOMAIN, FIX, OP, SLOPE

# ScatterElements' reduction="add" (row ids from row pointers shared by empty rows) is opset 16
MIN_OPSET = 16
INPUTS = ["X", "values", "indices", "rowptr", "bias"]  # bias may be left out: Gemm's C is optional
ATTRIBUTES = ["in_features", "out_features", "activation", "plan", SLOPE]
CONV_ATTRIBUTES = ["in_features", "out_features", "in_channels", "kernel_shape", "strides", "pads", "dilations",
                   "activation", SLOPE, "block"]


def _ref(node: onnx.NodeProto, name: str, attr: str, kind: int) -> onnx.NodeProto:
    """``node`` with attribute ``name`` taken from the calling node's attribute ``attr``."""
    node.attribute.append(AttributeProto(name=name, ref_attr_name=attr, type=kind))
    return node


def _int64(name: str, values: list[int]) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(values, np.int64), name))


def _filled(shape: str, out: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("ConstantOfShape", [shape], [out], value=numpy_helper.from_array(value))


def _row_ids() -> list[onnx.NodeProto]:
    """``row`` (nnz): the row of each nonzero, without an (nnz x out) compare: a one at each row start
    ``rowptr[1:-1]`` (empty rows share one; a row start equal to nnz lands in the extra last slot), summed up."""
    mk = helper.make_node
    return [
        mk("Cast", ["rowptr"], ["rp"], to=TensorProto.INT64),
        mk("Shape", ["values"], ["nnz"]),
        mk("Add", ["nnz", "one"], ["nnz_plus_1"]),
        _filled("nnz_plus_1", "no_starts", np.zeros(1, np.int64)),
        mk("Slice", ["rp", "one", "minus_one"], ["starts"]),
        mk("Shape", ["starts"], ["n_starts"]),
        _filled("n_starts", "ones", np.ones(1, np.int64)),
        mk("ScatterElements", ["no_starts", "starts", "ones"], ["start_counts"], axis=0, reduction="add"),
        mk("Slice", ["start_counts", "zero", "nnz"], ["row_steps"]),
        mk("CumSum", ["row_steps", "zero"], ["row"]),
    ]


def _dense_weight() -> list[onnx.NodeProto]:
    """``W`` (out_features, in_features) float32: zeros with ``values`` scattered to (row, column)."""
    mk = helper.make_node
    return [
        _ref(mk("Constant", [], ["n_out"]), "value_int", "out_features", AttributeProto.INT),
        _ref(mk("Constant", [], ["n_in"]), "value_int", "in_features", AttributeProto.INT),
        mk("Unsqueeze", ["n_out", "zero"], ["n_out_1d"]),
        mk("Unsqueeze", ["n_in", "zero"], ["n_in_1d"]),
        mk("Concat", ["n_out_1d", "n_in_1d"], ["w_shape"], axis=0),
        _filled("w_shape", "w_zeros", np.zeros(1, np.float32)),
        mk("Cast", ["indices"], ["col"], to=TensorProto.INT64),
        mk("Unsqueeze", ["row", "minus_one"], ["row_2d"]),
        mk("Unsqueeze", ["col", "minus_one"], ["col_2d"]),
        mk("Concat", ["row_2d", "col_2d"], ["positions"], axis=1),
        mk("ScatterND", ["w_zeros", "positions", "values"], ["W"]),
    ]


def function(opset: int) -> onnx.FunctionProto:
    """The body: ``Y = LeakyRelu(Gemm(X, W, bias, transB=1), alpha=negative_slope)`` with ``W`` rebuilt from CSR
    (``negative_slope`` 0.0 is ReLU, 1.0 is none). ``opset``: the model's default-domain opset (>= 16)."""
    if opset < MIN_OPSET:
        raise InputError(f"the fast format needs opset {MIN_OPSET} or later (its SparseLinear function uses "
                         f"ScatterElements with a reduction), not {opset}", where="--opset",
                         fix=f"use --opset {MIN_OPSET} or later")
    nodes = [_int64("zero", [0]), _int64("one", [1]), _int64("minus_one", [-1]), *_row_ids(), *_dense_weight(),
             helper.make_node("Gemm", ["X", "W", "bias"], ["Z"], transB=1),
             _ref(helper.make_node("LeakyRelu", ["Z"], ["Y"]), "alpha", SLOPE, AttributeProto.FLOAT)]
    return helper.make_function(DOMAIN, OP, INPUTS, ["Y"], nodes, [helper.make_opsetid("", opset)],
                                attributes=ATTRIBUTES)


def conv_function(opset: int) -> onnx.FunctionProto:
    """SparseConv's body: the (out_features, in_features) weight rebuilt as SparseLinear's, reshaped to
    (out_features, in_channels, *kernel_shape), then ``LeakyRelu(Conv(X, W, bias), alpha=negative_slope)`` with
    the node's strides, pads and dilations."""
    function(opset)  # the same opset floor
    mk = helper.make_node
    conv = mk("Conv", ["X", "W4", "bias"], ["Z"])
    for name, attr in (("kernel_shape", "kernel_shape"), ("strides", "strides"), ("pads", "pads"),
                       ("dilations", "dilations")):
        _ref(conv, name, attr, AttributeProto.INTS)
    nodes = [_int64("zero", [0]), _int64("one", [1]), _int64("minus_one", [-1]), *_row_ids(), *_dense_weight(),
             _ref(mk("Constant", [], ["c_in"]), "value_int", "in_channels", AttributeProto.INT),
             mk("Unsqueeze", ["c_in", "zero"], ["c_in_1d"]),
             _ref(mk("Constant", [], ["k_shape"]), "value_ints", "kernel_shape", AttributeProto.INTS),
             mk("Concat", ["n_out_1d", "c_in_1d", "k_shape"], ["w4_shape"], axis=0),
             mk("Reshape", ["W", "w4_shape"], ["W4"]),
             conv,
             _ref(mk("LeakyRelu", ["Z"], ["Y"]), "alpha", SLOPE, AttributeProto.FLOAT)]
    return helper.make_function(DOMAIN, CONV_OP, INPUTS, ["Y"], nodes, [helper.make_opsetid("", opset)],
                                attributes=CONV_ATTRIBUTES)


BODIES = {OP: function, CONV_OP: conv_function}


def graph_bodies() -> dict[str, Callable[[int], onnx.FunctionProto]]:
    """Every op's body a whole-graph artifact may carry: SparseLinear's, SparseConv's and the recurrent ones
    (``sparsekit.runtime.rnn_onnx``)."""
    from sparsekit.runtime import rnn_onnx

    return {**BODIES, **{op: partial(rnn_onnx.function, op) for op in rnn_onnx.OPS}}


def _default_opset(proto: onnx.ModelProto) -> int | None:
    return next((int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


def _normalized(f: onnx.FunctionProto) -> onnx.FunctionProto:
    """``f`` without its doc strings and node names, which do not change what it computes."""
    out = onnx.FunctionProto()
    out.CopyFrom(f)
    out.ClearField("doc_string")
    for node in out.node:
        node.ClearField("doc_string")
        node.ClearField("name")
    return out


def check(proto: onnx.ModelProto, where: str, *, graph: bool = False) -> bool:
    """Whether ``proto`` carries the SparseLinear function (artifacts of format version 1 do not). One it carries
    must be exactly ``function(opset)``: another body would make stock ONNX Runtime compute something else than
    sparsekit's kernels, so it is refused, as is any other function of an MLP chain artifact. A whole-graph
    artifact (``graph``) may also hold the source model's functions of other domains (ONNX Runtime runs them)."""
    ours = [f for f in proto.functions if f.domain == DOMAIN] if graph else list(proto.functions)
    if not ours:
        return False
    label = f"{where}: functions"
    found = [f"{f.domain}::{f.name}" for f in ours]
    bodies = graph_bodies() if graph else BODIES
    if (found != [f"{DOMAIN}::{OP}"] and not graph) or len(set(found)) != len(found) \
            or any(f.name not in bodies for f in ours):
        raise InputError(f"holds the functions {', '.join(found)}; a fast artifact holds one, {DOMAIN}::{OP}"
                         + (f" (and at most one of each of {', '.join(sorted(set(bodies) - {OP}))})" if graph
                            else ""), where=label, fix=FIX)
    opset = _default_opset(proto)
    if opset is None or opset < MIN_OPSET:
        raise InputError(f"the model imports opset {opset}; its {ours[0].name} function needs {MIN_OPSET} or later",
                         where=label, fix=FIX)
    for f in ours:
        if _normalized(f) != _normalized(bodies[f.name](opset)):
            raise InputError(f"the {f.name} function is not the fast format's body (stock ONNX Runtime would "
                             "compute something else than sparsekit)", where=label, fix=FIX)
    return True
