"""``int8-onnx``: ONNX Runtime dynamic quantization (int8 weights, per output channel) of the compact model.

The compact model is written with ``MatMul`` + ``Add`` (ONNX Runtime's dynamic quantization rewrites
``MatMul`` only) and quantized with ``onnxruntime.quantization.quantize_dynamic``. Graphs that cannot be
compacted are quantized as they are. Validation: top-1 agreement ≥ 99%, accuracy drop ≤ 1 point.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from pathlib import Path
from typing import Any

import onnx
from sparsekit.exporters.compact import compact_model
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


def quantize_int8(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model_copy = onnx.ModelProto()
    model_copy.CopyFrom(model)
    del model_copy.graph.value_info[:]  # stale exporter shapes trip the quantizer's shape inference
    with tempfile.TemporaryDirectory(prefix="sparsekit-int8-") as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        onnx.save_model(model_copy, str(src))
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # the quantizer logs a pre-processing hint on the root logger
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True)
        except Exception as exc:  # the quantizer raises assorted errors on graphs it cannot handle
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UnsupportedGraphError(f"ONNX Runtime dynamic quantization failed: {msg}",
                                        where="int8-onnx", fix="use the fp32 or compressed formats") from exc
        finally:
            root.setLevel(level)
        return onnx.load(str(dst))


@register_format("int8-onnx", "ONNX Runtime dynamic int8 quantization of the compact model", ".int8.onnx")
def write_int8_onnx(ctx: ExportContext, out_path: Path, options: ExportOptions) -> dict[str, Any]:
    notes = []
    try:
        base, counts = compact_model(ctx, options, matmul=True)
        source = "compact-onnx"
    except UnsupportedGraphError as exc:
        base, counts = reference_model(ctx, "int8-onnx", options), None
        source = "onnx"
        notes.append(f"not compacted ({exc.what}); quantized the dense graph")
    model = quantize_int8(base)
    set_metadata(model, metadata_for(ctx, "int8-onnx", opset=options.opset, precision="int8",
                                     extra={"quantized_from": source, "compaction": counts,
                                            "exporter": "onnxruntime.quantization.quantize_dynamic"}))
    save_onnx_atomic(model, out_path)
    return {"precision": "int8", "notes": notes, "quantized_from": source}
