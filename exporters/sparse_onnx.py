"""``sparse-onnx``: the dense graph with its sparse weights stored as ONNX ``sparse_initializer``s.

Each masked weight keeps its *active* entries (from the masks, so an active weight that happens to be 0
stays) as values plus linear int64 indices. The file is smaller, but ONNX Runtime densifies sparse
initializers when it loads a model, so it runs exactly as fast as the dense model (DESIGN.md §5).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper
from sparsekit.exporters.active import active_mask
from sparsekit.exporters.context import (
    ExportContext,
    ExportOptions,
    metadata_for,
    save_onnx_atomic,
    set_metadata,
)
from sparsekit.exporters.dense import reference_model
from sparsekit.exporters.registry import register_format

NOTE = ("ONNX Runtime densifies sparse_initializers at load: smaller file, same speed as dense "
        "(no speedup expected)")


def to_sparse_initializers(model: onnx.ModelProto, masks: dict[str, np.ndarray]) -> list[str]:
    """Move sparse float weights of ``model`` into sparse_initializers in place; returns their names."""
    moved, keep = [], []
    for t in model.graph.initializer:
        arr = numpy_helper.to_array(t) if t.data_type == onnx.TensorProto.FLOAT else None
        mask = active_mask(t.name, arr, masks) if arr is not None and arr.ndim >= 2 else None
        if mask is None:
            keep.append(t)
            continue
        flat = np.flatnonzero(mask.reshape(-1)).astype(np.int64)
        values = numpy_helper.from_array(arr.reshape(-1)[flat].astype(np.float32), t.name)
        indices = numpy_helper.from_array(flat, f"{t.name}.indices")
        sparse = onnx.helper.make_sparse_tensor(values, indices, list(arr.shape))
        model.graph.sparse_initializer.append(sparse)
        moved.append(t.name)
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    # value_info typed as dense tensors for these names would contradict the sparse type (checker error)
    vi = [v for v in model.graph.value_info if v.name not in set(moved)]
    del model.graph.value_info[:]
    model.graph.value_info.extend(vi)
    return moved


@register_format("sparse-onnx", "same graph, sparse weights as ONNX sparse_initializers (smaller file; "
                 "ONNX Runtime densifies at load, dense speed)", ".sparse.onnx")
def write_sparse_onnx(ctx: ExportContext, out_path: Path, options: ExportOptions) -> dict[str, Any]:
    model = reference_model(ctx, "sparse-onnx", options)
    moved = to_sparse_initializers(model, ctx.masks)
    set_metadata(model, metadata_for(ctx, "sparse-onnx", opset=options.opset,
                                     extra={"sparse_initializers": moved, "runtime_note": NOTE}))
    save_onnx_atomic(model, out_path)
    return {"precision": "fp32", "notes": [NOTE], "sparse_initializers": moved}
