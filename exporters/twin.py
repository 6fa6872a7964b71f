"""The unstructured twin of a structured model, for ``sparsekit report``: what the granularity buys in speed.

The twin has every sparse weight of the dense ONNX model with the same nonzero values at random positions
(the same count per tensor, so the same MACs and bytes), packed as a ``fast`` artifact like the real one. The
report times both in the same interleaved run and gives the ratio per batch size; the twin itself is never
written into the export folder, listed as an artifact or gated on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

TWIN = "fast (same model, unstructured)"


def unstructured_twin(dense: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """A copy of ``dense`` whose sparse weights (≥ 2-D, at least half zeros) keep their nonzero values at
    random positions."""
    twin = onnx.ModelProto.FromString(dense.SerializeToString())
    rng = np.random.default_rng(seed)
    for i, t in enumerate(twin.graph.initializer):
        w = numpy_helper.to_array(t)
        if w.ndim < 2 or w.dtype != np.float32 or np.count_nonzero(w) * 2 > w.size:
            continue
        values = w[w != 0]
        shuffled = np.zeros(w.size, np.float32)
        shuffled[rng.choice(w.size, values.size, replace=False)] = values
        twin.graph.initializer[i].CopyFrom(numpy_helper.from_array(shuffled.reshape(w.shape), t.name))
    return twin


def write_twin(dense: onnx.ModelProto, out_path: Path) -> Path:
    """The twin's fast artifact at ``out_path`` (the exporter's default plan and checks)."""
    from sparsekit.exporters.fast import write_model

    write_model(unstructured_twin(dense), out_path)
    return out_path


def split_twin(records: list[dict[str, Any]], fast_label: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The latency records without the twin's, and per (batch, threads) the fast artifact against it."""
    twin = {(r["batch_size"], r["threads"]): r for r in records if r["artifact"] == TWIN}
    gains = []
    for r in records:
        t = twin.get((r["batch_size"], r["threads"]))
        if r["artifact"] == fast_label and t is not None and r["p50_ms"] > 0:
            gains.append({"batch_size": r["batch_size"], "threads": r["threads"], "fast_p50_ms": r["p50_ms"],
                          "unstructured_p50_ms": t["p50_ms"], "speedup_vs_unstructured": t["p50_ms"] / r["p50_ms"]})
    return [r for r in records if r["artifact"] != TWIN], gains
