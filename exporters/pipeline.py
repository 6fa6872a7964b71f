"""Export a source (run dir or archive) to the requested formats, validate each file, write a report.

Every artifact is written atomically, checked (ONNX files: ``onnx.checker`` full check and strict shape
inference) and run on the source's samples against the torch reference (``exporters.validate``). A failed
artifact is removed and the export ends with ``ValidationError`` (exit 4) after writing
``export_report.json``; with ``warn_only`` it is kept and marked. With ``all``, a format that cannot
handle the graph (e.g. ``compact-onnx`` on a residual net) is reported as refused and the others are still
written; named explicitly, the refusal is an error.

Speed formats (``exporters.speed``) carry the speedups export measured (``speed_vs_dense``: fast from its
calibration, int8-onnx while picking its quantization) and ``slower_than_dense`` (those below 0.95×, None
when export did not time the artifact); with ``all``, int8-onnx is refused when it measures slower.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from sparsekit.exporters.compressed import PRECISIONS, is_archive, load_archive
from sparsekit.exporters.context import ExportContext, ExportOptions, load_run_dir
from sparsekit.exporters.graph import UnsupportedGraphError
from sparsekit.exporters.registry import FORMATS, get_format
from sparsekit.exporters.speed import SPEED_FORMATS, slower_than_dense
from sparsekit.exporters.validate import (
    check_onnx_file,
    input_shape_of,
    load_runner,
    raise_if_failed,
    validate_runner,
)

import sparsekit
from sparsekit.errors import InputError, ValidationError
from sparsekit.fileio import atomic_write_json
from sparsekit.run_dir import RunDir

REPORT_NAME = "export_report.json"
REPORT_SCHEMA_VERSION = 1
LOSS_ORDER = {"fp32": 0, "fp16": 1, "int8": 2}
RESERVED = {"format", "path", "precision", "bytes", "status", "validation", "notes", "seconds", "slower_than_dense"}


def load_source(source: str | Path) -> ExportContext:
    path = Path(source)
    if path.is_dir():
        return load_run_dir(path)
    if is_archive(path):
        return load_archive(path)
    if not path.exists():
        raise InputError(f"{path} does not exist", where="SOURCE",
                         fix="pass a run dir written by 'sparsekit train' or a .skz archive")
    raise InputError(f"{path} is neither a run dir nor a sparsekit archive", where="SOURCE",
                     fix="pass a run dir written by 'sparsekit train' or a .skz archive")


def parse_formats(spec: str | None, ctx: ExportContext) -> tuple[list[str], bool]:
    """Format names in registry order, and whether they came from 'all' (refusals are then skipped)."""
    if spec is None:
        spec = "onnx" if ctx.source_kind == "archive" else "all"
    if spec.strip() == "all":  # formats for some sources only (semi-structured: 2:4 runs) say which
        return [n for n, f in FORMATS.items() if f.in_all is None or f.in_all(ctx)], True
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise InputError("empty --format", where="--format", fix="e.g. --format onnx,compact-onnx or all")
    for name in names:
        get_format(name)
    return list(dict.fromkeys(names)), False


def parse_precisions(spec: str | None) -> tuple[str, ...]:
    names = [s.strip() for s in (spec or "fp32").split(",") if s.strip()]
    for name in names:
        if name not in PRECISIONS:
            raise InputError(f"unknown precision {name!r}", where="--precision",
                             fix=f"choose from {', '.join(PRECISIONS)} (comma-separated: one archive each)")
    return tuple(dict.fromkeys(names)) or ("fp32",)


def artifact_path(out_dir: Path, fmt: str, precision: str = "fp32") -> Path:
    suffix = get_format(fmt).suffix
    if fmt == "compressed" and precision != "fp32":
        return out_dir / f"model.{precision}{suffix}"
    return out_dir / f"model{suffix}"


def _validate(path: Path, fmt: str, ctx: ExportContext, precision: str) -> dict[str, Any]:
    if path.suffix == ".onnx":
        check_onnx_file(path)
    runner = load_runner(path, fmt, threads=1)
    return validate_runner(runner, ctx.samples, precision, probe_shape=input_shape_of(ctx.model))


def _flag_speed(record: dict[str, Any]) -> None:
    """Speed formats: ``slower_than_dense`` (the export's speed records below the threshold), or a note
    that export did not time the artifact."""
    if record["format"] not in SPEED_FORMATS:
        return
    speed = record.get("speed_vs_dense")
    if speed is None:
        record["slower_than_dense"] = None
        record["notes"].append("speed not measured at export: 'sparsekit report' times it against dense "
                               "(--min-speedup-each gates on it)")
    else:
        record["slower_than_dense"] = slower_than_dense(speed)


def export(source: str | Path, formats: str | None = None, out_dir: str | Path | None = None, *,
           opset: int = 18, precision: str | None = None, warn_only: bool = False,
           tune: bool = False, tune_batch_size: int = 1, threads: int = 1,
           progress=None) -> dict[str, Any]:
    """Export ``source`` and return the export report (also written to ``out_dir/export_report.json``)."""
    ctx = load_source(source)
    names, from_all = parse_formats(formats, ctx)
    precisions = parse_precisions(precision)
    if out_dir is None:
        out_dir = RunDir(ctx.source).export_dir if ctx.source_kind == "run" else ctx.source.parent / (
            ctx.source.name.split(".")[0] + "_export")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"output {out_dir} exists and is not a directory", where="--out",
                         fix="choose a directory path")
    base_precision = ctx.extra.get("archive_precision", "fp32")
    options = ExportOptions(opset=opset, precisions=precisions, warn_only=warn_only, tune=bool(tune),
                            tune_batch_size=int(tune_batch_size), threads=int(threads), skip_slow=from_all)
    artifacts: list[dict[str, Any]] = []
    failures: list[str] = []
    jobs = [(n, p) for n in names for p in (precisions if n == "compressed" else ("fp32",))]
    for fmt, prec in jobs:
        path = artifact_path(out_dir, fmt, prec)
        record: dict[str, Any] = {"format": fmt, "path": str(path), "precision": prec}
        if progress:
            progress(f"{fmt}" + (f" ({prec})" if fmt == "compressed" else ""))
        start = time.perf_counter()
        try:
            info = get_format(fmt).write(ctx, path, replace(options, precisions=(prec,))) or {}
        except UnsupportedGraphError as exc:
            if not from_all:
                raise
            record.update(status="refused", reason=exc.message, bytes=None)
            artifacts.append(record)
            continue
        art_precision = info.get("precision", prec)
        if LOSS_ORDER.get(base_precision, 0) > LOSS_ORDER.get(art_precision, 0):
            art_precision = base_precision  # restored from a lossy archive: judge it by that rule
        record["precision"] = art_precision
        try:
            validation = _validate(path, fmt, ctx, art_precision)
        except ValidationError as exc:
            validation = {"passed": False, "errors": [exc.what]}
        record.update({k: v for k, v in info.items() if k not in RESERVED})  # writer's extras first
        record.update(bytes=path.stat().st_size, validation=validation,
                      notes=list(info.get("notes", [])), seconds=round(time.perf_counter() - start, 3))
        _flag_speed(record)
        if validation.get("passed"):
            record["status"] = "ok"
        elif warn_only:
            record["status"] = "kept (validation failed)"
        else:
            path.unlink(missing_ok=True)
            record["status"] = "failed (file removed)"
            record["bytes"] = None
            try:
                raise_if_failed(validation, path, fmt)
            except ValidationError as exc:
                failures.append(exc.message)
        artifacts.append(record)
    dense = next((a for a in artifacts if a["format"] == "onnx" and a.get("bytes")), None)
    dense_bytes = dense["bytes"] if dense else len(ctx.model_bytes())
    for a in artifacts:
        if a.get("bytes"):
            a["size_ratio_vs_dense"] = a["bytes"] / dense_bytes
            a["compression_vs_dense"] = dense_bytes / a["bytes"]
    report = {
        "schema_version": REPORT_SCHEMA_VERSION,
        "kind": "sparsekit-export-report",
        "sparsekit_version": sparsekit.__version__,
        "source": str(ctx.source),
        "source_kind": ctx.source_kind,
        "source_run": ctx.source_run,
        "out_dir": str(out_dir),
        "opset": opset,
        "samples": None if ctx.samples is None else ctx.samples.count,
        "dense_onnx_bytes": dense_bytes,
        "dense_onnx_bytes_measured": dense is not None,
        "artifacts": artifacts,
    }
    atomic_write_json(out_dir / REPORT_NAME, report)
    if failures:
        raise ValidationError(failures[0] if len(failures) == 1 else
                              f"{len(failures)} artifacts failed validation: {' | '.join(failures)}",
                              where=str(out_dir), fix="see export_report.json; --warn-only keeps the files")
    return report
