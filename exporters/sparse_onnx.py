"""``sparse-onnx``: the dense graph with each sparse weight stored as a sparse tensor.

Each masked weight becomes a standard ``Constant`` node whose ``sparse_value`` holds its *active* entries
(from the masks, so an active weight that happens to be 0 stays) as values plus linear int64 indices; the
node's output is a dense tensor, so the op that reads the weight (Gemm, Conv, GRU, ...) sees what it
expects and the file passes ``onnx.checker``'s full check and strict shape inference. (A graph-level
``sparse_initializer`` does not: shape inference types it ``sparse_tensor``, which no dense op accepts.)
The file is smaller, but ONNX Runtime densifies sparse constants when it loads a model, so it runs exactly
as fast as the dense model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper
from sparsekit.exporters.active import active_mask
from sparsekit.exporters.context import (
    ExportContext,
    ExportOptions,
    metadata_for,
    save_onnx_atomic,
    set_metadata,
)
from sparsekit.exporters.dense import reference_model
from sparsekit.exporters.graph import UnsupportedGraphError
from sparsekit.exporters.registry import register_format

NOTE = ("ONNX Runtime densifies sparse weights at load: smaller file, same speed as dense "
        "(no speedup expected)")
MIN_OPSET = 11  # Constant's sparse_value attribute


def sparse_constant(name: str, dense: np.ndarray, mask: np.ndarray, node_name: str) -> onnx.NodeProto:
    """A ``Constant`` node producing ``dense`` (float32) from its entries where ``mask`` is set."""
    flat = np.flatnonzero(mask.reshape(-1)).astype(np.int64)  # ascending, as the format requires
    values = numpy_helper.from_array(dense.reshape(-1)[flat].astype(np.float32), name)
    indices = numpy_helper.from_array(flat, f"{name}.indices")
    sparse = helper.make_sparse_tensor(values, indices, list(dense.shape))
    return helper.make_node("Constant", [], [name], name=node_name, sparse_value=sparse)


def to_sparse_constants(model: onnx.ModelProto, masks: dict[str, np.ndarray]) -> list[str]:
    """Replace the sparse float weights of ``model`` (in place) by sparse ``Constant`` nodes placed first
    in the graph; returns their names. A weight that is also a graph input (overridable at run time)
    stays a dense initializer: a node may not produce a graph input."""
    graph = model.graph
    inputs = {i.name for i in graph.input}
    node_names = {n.name for n in graph.node}
    moved, keep, constants = [], [], []
    for t in graph.initializer:
        arr = numpy_helper.to_array(t) if t.data_type == onnx.TensorProto.FLOAT and t.name not in inputs else None
        mask = active_mask(t.name, arr, masks) if arr is not None and arr.ndim >= 2 else None
        if mask is None:
            keep.append(t)
            continue
        node_name = f"{t.name}.sparse"
        while node_name in node_names:
            node_name += "_"
        constants.append(sparse_constant(t.name, arr, mask, node_name))
        moved.append(t.name)
    del graph.initializer[:]
    graph.initializer.extend(keep)
    nodes = constants + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    return moved


@register_format("sparse-onnx", "same graph, sparse weights as Constant nodes holding sparse tensors "
                 "(smaller file; ONNX Runtime densifies at load, dense speed)", ".sparse.onnx")
def write_sparse_onnx(ctx: ExportContext, out_path: Path, options: ExportOptions) -> dict[str, Any]:
    if options.opset < MIN_OPSET:
        raise UnsupportedGraphError(f"sparse-onnx needs opset {MIN_OPSET} or later (Constant sparse_value); "
                                    "nothing was written", where="--opset", fix=f"use --opset {MIN_OPSET} or later")
    model = reference_model(ctx, "sparse-onnx", options)
    moved = to_sparse_constants(model, ctx.masks)
    set_metadata(model, metadata_for(ctx, "sparse-onnx", opset=options.opset,
                                     extra={"sparse_weights": moved, "runtime_note": NOTE}))
    save_onnx_atomic(model, out_path)
    return {"precision": "fp32", "notes": [NOTE], "sparse_weights": moved}
