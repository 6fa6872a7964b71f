"""``onnx``: the dense fp32 reference, masked weights stored as explicit zeros.

The run's model.onnx was written by the dynamo exporter with masks already squashed into the weights;
this writer re-stamps its metadata (format, sparsity per layer, source run, accuracy), converts the opset
if asked, and refuses a graph in which masks survived as multiply nodes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
from sparsekit.exporters.active import canonicalize_model
from sparsekit.exporters.context import (
    ExportContext,
    ExportOptions,
    convert_opset,
    metadata_for,
    save_onnx_atomic,
    set_metadata,
)
from sparsekit.exporters.registry import register_format

from sparsekit.errors import ValidationError


def mask_multiplies(model: onnx.ModelProto) -> list[str]:
    """Names of Mul nodes that multiply by a bool tensor or an initializer named like a mask."""
    inits = {t.name: t for t in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.op_type != "Mul":
            continue
        for name in node.input:
            t = inits.get(name)
            if "mask" in name.lower() or (t is not None and t.data_type == onnx.TensorProto.BOOL):
                found.append(node.name or node.output[0])
    return found


def reference_model(ctx: ExportContext, fmt: str, options: ExportOptions) -> onnx.ModelProto:
    """The run's model at ``options.opset`` with fresh metadata; masked -0.0 entries become +0.0."""
    model = onnx.ModelProto()
    model.CopyFrom(ctx.model)
    model = canonicalize_model(convert_opset(model, options.opset), ctx.masks)
    muls = mask_multiplies(model)
    if muls:
        raise ValidationError(f"masks appear as multiply nodes in the graph ({', '.join(muls[:3])})",
                              where=str(ctx.source), fix="squash masks into the weights before export")
    return set_metadata(model, metadata_for(ctx, fmt, opset=options.opset))


@register_format("onnx", "dense fp32 reference ONNX; masked weights are explicit zeros", ".onnx")
def write_dense_onnx(ctx: ExportContext, out_path: Path, options: ExportOptions) -> dict[str, Any]:
    save_onnx_atomic(reference_model(ctx, "onnx", options), out_path)
    return {"precision": "fp32", "notes": []}
