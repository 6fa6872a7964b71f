"""What every writer gets: the source run, loaded from its files alone (no user code, no model rebuild).

A source is a run dir (the trainer's contract, ``sparsekit.run_dir.RunDir``: the summary, the dense
reference ONNX model with masked weights exactly 0, the masks, the reference samples) or a compressed
archive (``exporters.compressed``), which restores the same reference model. Writers are registered
with ``@register_format(name, description, suffix)`` and called as ``write(ctx, out_path, options) ->
dict`` (notes for the report); the pipeline validates what they wrote.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

import sparsekit
from sparsekit.errors import InputError
from sparsekit.model_io import check_io, to_metadata
from sparsekit.run_dir import RunDir, Samples

RUN_FILES = (RunDir.SUMMARY, RunDir.ONNX)  # what export needs from a run dir (masks and samples are optional)


@dataclass
class ExportOptions:
    opset: int = 18
    precisions: tuple[str, ...] = ("fp32",)
    warn_only: bool = False
    tune: bool = False            # fast format: measure every layer's kernels (else a quick calibration)
    tune_batch_size: int = 1      # fast format: batch size to measure at (besides the standard sizes 1-256)
    threads: int = 1              # fast format: threads the plan is measured with
    skip_slow: bool = False       # int8-onnx: refuse when measured slower than dense (--format all)


@dataclass
class ExportContext:
    source: Path                          # the run dir or archive it came from
    source_kind: str                      # "run" or "archive"
    model: onnx.ModelProto                # dense fp32 reference, masked weights exactly 0
    masks: dict[str, np.ndarray]          # bool, keyed by initializer (= torch parameter) name
    summary: dict[str, Any]
    samples: Samples | None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def source_run(self) -> str:
        return str(self.summary.get("run_dir") or self.source)

    def model_bytes(self) -> bytes:
        return self.model.SerializeToString()


def load_run_dir(run_dir: str | Path) -> ExportContext:
    run = RunDir(run_dir)
    run_dir = run.path
    if not run_dir.is_dir():
        raise InputError(f"run dir {run_dir} does not exist", where="RUN_DIR",
                         fix="pass the directory that 'sparsekit train' printed, or an archive")
    missing = [f for f in RUN_FILES if not (run_dir / f).exists()]
    if missing:
        raise InputError(f"{run_dir} is not a run dir: missing {', '.join(missing)}", where=str(run_dir),
                         fix="pass a directory written by 'sparsekit train' or sparsekit.train()")
    summary = run.summary()
    model = run.onnx_model()
    summary.setdefault("run_dir", str(run_dir))
    return ExportContext(source=run_dir, source_kind="run", model=model, masks=run.masks(), summary=summary,
                         samples=run.samples())


def io_of(ctx: ExportContext) -> dict[str, Any] | None:
    """The source's io record (``sparsekit.model_io``), checked; None for runs written before it existed."""
    io = ctx.summary.get("io")
    return None if io is None else check_io(io, f"{ctx.source}: summary io")


def metadata_for(ctx: ExportContext, fmt: str, *, opset: int, precision: str = "fp32",
                 extra: dict[str, Any] | None = None) -> dict[str, str]:
    """The metadata_props every exported ONNX file carries (values are strings; JSON for structures),
    with the io entries a deployer needs (``sparsekit.input_layout`` ..., docs/deploy.md)."""
    s = ctx.summary
    base = {p.key: p.value for p in ctx.model.metadata_props}
    layers = [{"name": layer.get("name"), "target_density": layer.get("planned_density"),
               "realized_density": layer.get("density")} for layer in s.get("layers", [])]
    meta: dict[str, Any] = {
        "exporter": base.get("exporter", "unknown"),
        "torch_version": base.get("torch_version", ""),
        "opset": opset,
        "sparsekit_version": sparsekit.__version__,
        "sparsekit_format": fmt,
        "precision": precision,
        "method": s.get("method", "unknown"),
        "distribution": s.get("distribution", "unknown"),
        "target_sparsity": s.get("target_sparsity"),
        "realized_sparsity": s.get("realized_sparsity"),
        "layer_sparsity": layers,
        "source_run": ctx.source_run,
        "test_accuracy": s.get("test_accuracy"),
        **(extra or {}),
    }
    return {**{k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}, **to_metadata(io_of(ctx))}


def set_metadata(model: onnx.ModelProto, meta: dict[str, str]) -> onnx.ModelProto:
    del model.metadata_props[:]
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    return model


def save_onnx_atomic(model: onnx.ModelProto, path: Path) -> int:
    """Write ``model`` atomically (temp file, then rename); returns the file size in bytes."""
    from sparsekit.fileio import atomic_path

    with atomic_path(path) as tmp:
        onnx.save_model(model, str(tmp))
    return path.stat().st_size


def convert_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if current == opset:
        return model
    from onnx import version_converter

    try:
        return version_converter.convert_version(model, opset)
    except Exception as exc:  # the converter raises plain RuntimeErrors
        raise InputError(f"cannot convert the model from opset {current} to {opset}: {exc}",
                         where="--opset", fix=f"use --opset {current} (the run's own opset)") from exc
