"""Reading a ``fast`` artifact's graph defensively: it is a file users get from others and load in servers.

Every part the loader uses is checked before it is used: initializers (type, declared size against the bytes
actually stored, no external data), the graph input's shape, the nodes' wiring (one chain from the graph input to
the graph output, followed by name, not by file order), each node's inputs and attributes (required ones present,
each of its ONNX type, nothing unknown). Anything else is an ``InputError`` naming the node or tensor, never a
numpy or protobuf exception. The CSR contents themselves are checked by ``CsrLayer.from_csr``.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, numpy_helper

from sparsekit.errors import InputError
from sparsekit.runtime.layers import MAX_DIM, parse_kernel

DOMAIN = "com.sparsekit"
OP = "SparseLinear"
CONV_OP = "SparseConv"
FIX = "load artifacts written by 'sparsekit export --format fast'"

# initializer element types a fast artifact may hold, by role (the writer uses float32, uint16/int32, int64)
FLOAT_TYPES = {TensorProto.FLOAT: np.float32}
INT_TYPES = {TensorProto.UINT8: np.uint8, TensorProto.INT8: np.int8, TensorProto.UINT16: np.uint16,
             TensorProto.INT16: np.int16, TensorProto.INT32: np.int32, TensorProto.UINT32: np.uint32,
             TensorProto.INT64: np.int64}
# typed protobuf field that holds each type's values when raw_data is empty
_FIELDS = {TensorProto.FLOAT: "float_data", TensorProto.INT64: "int64_data", TensorProto.UINT32: "uint64_data"}

# the attribute the portable body's LeakyRelu takes its alpha from: the negative-side slope of each activation
SLOPE = "negative_slope"
SLOPES = {"relu": 0.0, "none": 1.0}
# SparseLinear attributes: ONNX type, required (negative_slope: by artifacts that carry the portable body)
ATTRS = {"in_features": (AttributeProto.INT, True), "out_features": (AttributeProto.INT, True),
         "activation": (AttributeProto.STRING, True), "plan": (AttributeProto.STRING, False),
         SLOPE: (AttributeProto.FLOAT, False)}
ACTIVATIONS = tuple(SLOPES)
# SparseConv attributes (its weight is (out_features, in_features) CSR, in_features = in_channels x kh x kw)
CONV_ATTRS = {"in_features": (AttributeProto.INT, True), "out_features": (AttributeProto.INT, True),
              "in_channels": (AttributeProto.INT, True), "kernel_shape": (AttributeProto.INTS, True),
              "strides": (AttributeProto.INTS, True), "pads": (AttributeProto.INTS, True),
              "dilations": (AttributeProto.INTS, True), "activation": (AttributeProto.STRING, True),
              SLOPE: (AttributeProto.FLOAT, False), "block": (AttributeProto.INT, False)}
CONV_MAX = 1 << 15  # kernel sizes, strides, dilations and pads


def _type_name(t: int) -> str:
    try:
        return TensorProto.DataType.Name(t)
    except ValueError:
        return str(t)


def tensor_array(t: TensorProto, where: str) -> np.ndarray:
    """An initializer as a numpy array, after checking that its declared shape matches the data it stores."""
    w = f"{where}: initializer {t.name!r}"
    if t.data_location == TensorProto.EXTERNAL or len(t.external_data) or t.HasField("segment"):
        raise InputError("external or segmented tensor data is not allowed in a fast artifact", where=w, fix=FIX)
    dtype = FLOAT_TYPES.get(t.data_type) or INT_TYPES.get(t.data_type)
    if dtype is None:
        raise InputError(f"has element type {_type_name(t.data_type)}; a fast artifact holds float32 and "
                         "integer tensors only", where=w, fix=FIX)
    if any(d < 0 for d in t.dims):
        raise InputError(f"has a negative dimension {list(t.dims)}", where=w, fix=FIX)
    count = math.prod(t.dims)
    if t.raw_data:
        stored = len(t.raw_data) / np.dtype(dtype).itemsize
    else:
        stored = len(getattr(t, _FIELDS.get(t.data_type, "int32_data")))
    if stored != count:
        raise InputError(f"declares shape {list(t.dims)} ({count} values) but stores {stored:g}: truncated or "
                         "corrupt", where=w, fix=FIX)
    try:
        arr = numpy_helper.to_array(t)
    except Exception as exc:  # onnx/numpy conversion of a tensor that passed the checks above: still refuse
        raise InputError(f"unreadable: {type(exc).__name__}", where=w, fix=FIX) from exc
    return np.asarray(arr, dtype=dtype)


def initializers(graph: onnx.GraphProto, where: str) -> dict[str, np.ndarray]:
    if len(graph.sparse_initializer):
        raise InputError("sparse initializers are not part of the fast format", where=where, fix=FIX)
    out: dict[str, np.ndarray] = {}
    for t in graph.initializer:
        if t.name in out:
            raise InputError(f"initializer {t.name!r} is defined twice", where=where, fix=FIX)
        out[t.name] = tensor_array(t, where)
    return out


def graph_input(graph: onnx.GraphProto, inits: dict[str, np.ndarray], where: str) -> tuple[str, tuple[int, ...]]:
    """The one graph input that is not an initializer: (name, per-sample shape), each dim a positive integer and
    their product below 2^31."""
    inputs = [i for i in graph.input if i.name not in inits]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise InputError("not a sparsekit fast artifact (needs one input and one output)", where=where,
                         fix="export one with 'sparsekit export RUN --format fast'")
    tt = inputs[0].type.tensor_type
    if not inputs[0].type.HasField("tensor_type") or tt.elem_type != TensorProto.FLOAT:
        raise InputError(f"graph input {inputs[0].name!r} is not a float32 tensor", where=where, fix=FIX)
    dims = tt.shape.dim
    if len(dims) < 2 or any(not d.HasField("dim_value") or d.dim_value <= 0 for d in dims[1:]):
        raise InputError("input has a symbolic or empty per-sample shape", where=where, fix=FIX)
    shape = tuple(int(d.dim_value) for d in dims[1:])
    if math.prod(shape) > MAX_DIM:
        raise InputError(f"input shape {list(shape)} has more than 2^31 - 1 features per sample", where=where,
                         fix=FIX)
    return inputs[0].name, shape


def chain(graph: onnx.GraphProto, start: str, end: str, inits: dict[str, np.ndarray],
          where: str) -> list[onnx.NodeProto]:
    """The nodes in wiring order: from the graph input, each node's first input is the previous node's (or the graph
    input's) tensor; every node is on that one path, which ends at the graph output."""
    produced: set[str] = set()
    readers: dict[str, list[onnx.NodeProto]] = {}
    for i, node in enumerate(graph.node):
        label = f"{where}: node {node.name or i!r}"
        if len(node.output) != 1 or not node.output[0]:
            raise InputError(f"has {len(node.output)} outputs; each node of a fast artifact has one", where=label,
                             fix=FIX)
        out = node.output[0]
        if out in produced or out in inits or out == start:
            raise InputError(f"writes tensor {out!r}, which already exists", where=label, fix=FIX)
        produced.add(out)
        if not node.input or not node.input[0]:
            raise InputError("has no data input", where=label, fix=FIX)
        readers.setdefault(node.input[0], []).append(node)
    for i, node in enumerate(graph.node):
        src = node.input[0]
        if src != start and src not in produced:
            what = "an initializer" if src in inits else "a tensor that no node produces and is not the graph input"
            raise InputError(f"reads {src!r}, {what}", where=f"{where}: node {node.name or i!r}", fix=FIX)
    order: list[onnx.NodeProto] = []
    cur = start
    while cur in readers and len(order) <= len(graph.node):
        nxt = readers[cur]
        if len(nxt) > 1:
            raise InputError(f"tensor {cur!r} feeds {len(nxt)} nodes; a fast artifact is one chain of layers",
                             where=where, fix=FIX)
        order.append(nxt[0])
        cur = nxt[0].output[0]
    if len(order) != len(graph.node):
        stray = next(n for n in graph.node if all(n is not m for m in order))
        raise InputError(f"node {stray.name!r} is not on the chain from the graph input to its output",
                         where=where, fix=FIX)
    if cur != end:
        raise InputError(f"the chain of nodes ends at tensor {cur!r}, not at the graph output {end!r}",
                         where=where, fix=FIX)
    return order


def check_flatten(node: onnx.NodeProto, where: str) -> None:
    label = f"{where}: node {node.name!r}"
    if len(node.input) != 1:
        raise InputError(f"Flatten has {len(node.input)} inputs, expected 1", where=label, fix=FIX)
    for a in node.attribute:
        if a.name != "axis" or a.type != AttributeProto.INT or a.i != 1:
            raise InputError(f"Flatten attribute {a.name!r} must be axis=1 (INT)", where=label, fix=FIX)


def _parse_attrs(node: onnx.NodeProto, schema: dict[str, tuple[int, bool]], where: str) -> dict[str, Any]:
    """A node's attributes by ``schema`` (name: ONNX type, required): each checked for its type, none unknown or
    given twice; STRINGs decoded (UTF-8), INTS as lists."""
    out: dict[str, Any] = {}
    for a in node.attribute:
        if a.name not in schema:
            raise InputError(f"unknown attribute {a.name!r} ({node.op_type} has {', '.join(schema)})", where=where,
                             fix=FIX)
        if a.name in out:
            raise InputError(f"attribute {a.name!r} is given twice", where=where, fix=FIX)
        want = schema[a.name][0]
        if a.type != want:
            raise InputError(f"attribute {a.name!r} is {AttributeProto.AttributeType.Name(a.type)}, expected "
                             f"{AttributeProto.AttributeType.Name(want)}", where=where, fix=FIX)
        if want in (AttributeProto.INT, AttributeProto.FLOAT, AttributeProto.INTS):
            out[a.name] = (int(a.i) if want == AttributeProto.INT else float(a.f) if want == AttributeProto.FLOAT
                           else [int(v) for v in a.ints])
            continue
        try:
            out[a.name] = a.s.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"attribute {a.name!r} is not UTF-8 text", where=where, fix=FIX) from exc
    missing = [k for k, (_, required) in schema.items() if required and k not in out]
    if missing:
        raise InputError(f"missing required attribute(s) {', '.join(missing)}", where=where, fix=FIX)
    return out


def conv_attrs(node: onnx.NodeProto, where: str, *, portable: bool = False) -> dict[str, Any]:
    """A SparseConv node's attributes (``CONV_ATTRS``), each checked: 2-D kernel, strides and dilations from 1
    and pads (top, left, bottom, right) from 0, all below 2^15; ``in_features`` = in_channels x kernel size."""
    out = _parse_attrs(node, CONV_ATTRS, where)
    for key, n, low in (("kernel_shape", 2, 1), ("strides", 2, 1), ("dilations", 2, 1), ("pads", 4, 0)):
        if len(out[key]) != n or not all(low <= v < CONV_MAX for v in out[key]):
            raise InputError(f"{key} = {out[key]}: need {n} integers in [{low}, {CONV_MAX})", where=where, fix=FIX)
    for key in ("in_channels", "out_features"):
        if not 1 <= out[key] <= MAX_DIM:
            raise InputError(f"{key} = {out[key]} is outside [1, 2^31 - 1]", where=where, fix=FIX)
    kh, kw = out["kernel_shape"]
    if out["in_features"] != out["in_channels"] * kh * kw:
        raise InputError(f"in_features = {out['in_features']} is not in_channels x kh x kw = "
                         f"{out['in_channels'] * kh * kw}", where=where, fix=FIX)
    if not 0 <= out.get("block", 0) <= MAX_DIM:
        raise InputError(f"block = {out['block']} is outside [0, 2^31 - 1]", where=where, fix=FIX)
    if out["activation"] not in ACTIVATIONS:
        raise InputError(f"unknown activation {out['activation']!r} (use {' or '.join(ACTIVATIONS)})", where=where,
                         fix=FIX)
    check_slope(out, portable, where)
    return out


def node_attrs(node: onnx.NodeProto, where: str, *, portable: bool = False) -> dict[str, Any]:
    """A SparseLinear node's attributes, each checked for its ONNX type; STRINGs decoded (UTF-8). ``portable``: the
    artifact carries the SparseLinear function, which reads ``negative_slope``: then it is required."""
    out = _parse_attrs(node, ATTRS, where)
    for key in ("in_features", "out_features"):
        if not 0 <= out[key] <= MAX_DIM:
            raise InputError(f"{key} = {out[key]} is outside [0, 2^31 - 1]", where=where, fix=FIX)
    if out["activation"] not in ACTIVATIONS:
        raise InputError(f"unknown activation {out['activation']!r} (use {' or '.join(ACTIVATIONS)})", where=where,
                         fix=FIX)
    check_slope(out, portable, where)
    out["plan"] = parse_plan(out.get("plan", ""), where)
    return out


def check_slope(attrs: dict[str, Any], portable: bool, where: str) -> None:
    """``negative_slope`` must be the one of ``activation`` (else stock ONNX Runtime, running the function, and
    sparsekit's kernels would compute different activations); required when the function is there (LeakyRelu's
    default alpha, 0.01, is neither)."""
    want = SLOPES[attrs["activation"]]
    if SLOPE not in attrs:
        if portable:
            raise InputError(f"missing attribute {SLOPE!r}, which the artifact's {OP} function reads (use {want:g} "
                             f"for activation {attrs['activation']!r})", where=where, fix=FIX)
        return
    if not attrs[SLOPE] == want:  # NaN is refused too
        raise InputError(f"{SLOPE} = {attrs[SLOPE]:g} does not match activation {attrs['activation']!r} (which needs "
                         f"{want:g})", where=where, fix=FIX)


def parse_plan(text: str, where: str) -> dict[int, str]:
    """The ``plan`` attribute: a JSON object {batch size (1 .. 2^31 - 1): kernel spec}; an empty string is no plan."""
    if not text:
        return {}
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise InputError("unreadable plan (not JSON)", where=where, fix=FIX) from exc
    if not isinstance(raw, dict):
        raise InputError("the plan must be a JSON object {batch size: kernel}", where=where, fix=FIX)
    plan: dict[int, str] = {}
    for k, v in raw.items():
        batch = int(k) if isinstance(k, str) and k.isascii() and k.isdigit() and len(k) <= 10 else 0
        if not 1 <= batch <= MAX_DIM or not isinstance(v, str):
            raise InputError(f"bad plan entry {k!r}: {v!r} (need a batch size and a kernel spec)", where=where,
                             fix=FIX)
        try:
            parse_kernel(v)
        except InputError as exc:
            raise InputError(f"plan entry {k}: {exc.what}", where=where, fix=exc.fix or FIX) from exc
        plan[batch] = v
    return plan


def layer_arrays(node: onnx.NodeProto, inits: dict[str, np.ndarray],
                 where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """(values, indices, rowptr, bias or None) of a SparseLinear node: 4 or 5 inputs, the weights initializers of
    the right element kind and rank 1."""
    n = len(node.input)
    if n not in (4, 5):
        raise InputError(f"has {n} inputs; SparseLinear takes 4 or 5 (X, values, indices, rowptr[, bias])",
                         where=where, fix=FIX)
    roles = [("values", FLOAT_TYPES), ("indices", INT_TYPES), ("rowptr", INT_TYPES), ("bias", FLOAT_TYPES)]
    arrays: list[np.ndarray | None] = []
    for (role, kinds), name in zip(roles, list(node.input[1:]) + [""] * (5 - n), strict=True):
        if not name and role == "bias":
            arrays.append(None)
            continue
        if name not in inits:
            raise InputError(f"input {role} names {name!r}, which is not an initializer", where=where, fix=FIX)
        arr = inits[name]
        if arr.dtype.type not in kinds.values() or arr.ndim != 1:
            kind = "float32" if kinds is FLOAT_TYPES else "integer"
            raise InputError(f"{role} {name!r} is {arr.dtype} with shape {list(arr.shape)}; expected a 1-D {kind} "
                             "tensor", where=where, fix=FIX)
        arrays.append(arr)
    values, indices, rowptr, bias = arrays
    assert values is not None and indices is not None and rowptr is not None
    return values, indices, rowptr, bias


def io_metadata(meta: dict[str, str], *, n_outputs: int, input_shape: tuple[int, ...], where: str) -> dict[str, Any]:
    """The artifact's io entries (``sparsekit.input_layout``, ``sparsekit.input_normalization``,
    ``sparsekit.class_names``; ``sparsekit.model_io``), each checked for type and range and against the model:
    one class name per output, a per-feature normalisation over the last input axis. A bad one is an
    ``InputError``."""
    from sparsekit.model_io import check_against_model, from_metadata

    io = from_metadata(meta, where)
    check_against_model(io, n_classes=n_outputs, n_features=input_shape[-1], where=where)
    return io
