"""What a run or artifact saves: counts recomputed from the files, sizes, accuracy and measured latency.

Everything here is recomputed from the artifacts themselves (like torchvision's weights-metadata test):
per layer shape, nonzeros, density and MACs (docs/counting.md: a MAC per active weight per output
position; FLOPs = 2 × MACs), file sizes against the dense fp32 ONNX file, accuracy through ONNX Runtime
on the run's samples ("unavailable" without them), and latency of every runnable artifact next to the
dense model in the same interleaved run (``sparsekit.bench``); speed-format artifacts measured below 0.95×
of dense are flagged (``slower_than_dense``). The JSON layout is versioned and described by
``sparsekit/schemas/report.schema.json``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from sparsekit.exporters.compressed import is_archive, load_archive
from sparsekit.exporters.context import Samples, load_run_dir
from sparsekit.exporters.graph import densified, initializer_arrays, sparse_weight_names
from sparsekit.exporters.pipeline import REPORT_NAME, artifact_path
from sparsekit.exporters.speed import SPEED_FORMATS, slower_than_dense, speed_record
from sparsekit.exporters.validate import input_shape_of, load_runner, run_batched

import sparsekit
from sparsekit.errors import GateError, InputError, ValidationError
from sparsekit.run_dir import RunDir

REPORT_SCHEMA_VERSION = 1
WEIGHT_OPS = {"Gemm": 1, "MatMul": 1, "Conv": 1, "MatMulInteger": 1, "ConvInteger": 1}
NOT_TIMED = {"compressed": "storage format: restores to the dense model",
             "semi-structured": "GPU format (2:4 sparse tensor cores): on CPU it runs as the dense reference graph"}


# --------------------------------------------------------------------------- counting

def _conv_positions(model: onnx.ModelProto) -> dict[str, int]:
    """Output positions per sample of every Conv node's output (via ONNX shape inference)."""
    if not any(n.op_type in ("Conv", "ConvInteger") for n in model.graph.node):
        return {}
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # shape inference is best effort here
        return {}
    dims = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        d = vi.type.tensor_type.shape.dim
        if len(d) > 2 and all(x.HasField("dim_value") for x in d[2:]):
            dims[vi.name] = int(np.prod([x.dim_value for x in d[2:]]))
    return dims


def count_layers(model: onnx.ModelProto, masks: dict[str, np.ndarray] | None = None) -> list[dict[str, Any]]:
    """Per weight layer: shape, params, nonzeros, density and MACs per sample (dense and sparse)."""
    arrays = initializer_arrays(model)
    positions = _conv_positions(model)
    layers = []
    for node in model.graph.node:
        if node.op_type not in WEIGHT_OPS or len(node.input) < 2 or node.input[1] not in arrays:
            continue
        name = node.input[1]
        w = arrays[name]
        if w.ndim < 2:
            continue
        pos = positions.get(node.output[0], 1) if "Conv" in node.op_type else 1
        nnz = int(np.count_nonzero(w))
        entry = {"name": name, "op": node.op_type, "shape": [int(d) for d in w.shape], "params": int(w.size),
                 "nonzeros": nnz, "density": nnz / w.size if w.size else 0.0, "output_positions": int(pos),
                 "macs_dense": int(w.size * pos), "macs_sparse": int(nnz * pos)}
        if masks and name in masks:
            entry["active"] = int(masks[name].sum())
        layers.append(entry)
    return layers


def count_totals(model: onnx.ModelProto, layers: list[dict[str, Any]]) -> dict[str, Any]:
    arrays = initializer_arrays(model)
    params = sum(int(a.size) for a in arrays.values() if a.dtype.kind == "f" or a.dtype in (np.int8, np.uint8))
    macs_d = sum(x["macs_dense"] for x in layers)
    macs_s = sum(x["macs_sparse"] for x in layers)
    weights = sum(x["params"] for x in layers)
    nnz = sum(x["nonzeros"] for x in layers)
    return {"params": params, "weight_params": weights, "weight_nonzeros": nnz,
            "weight_density": nnz / weights if weights else 0.0,
            "macs_dense": macs_d, "macs_sparse": macs_s, "flops_dense": 2 * macs_d, "flops_sparse": 2 * macs_s,
            "macs_sparse_vs_dense": macs_s / macs_d if macs_d else 1.0}


def training_flops(summary: dict[str, Any]) -> dict[str, Any] | None:
    flops = summary.get("flops") or {}
    train = flops.get("training")
    if not train:
        return None
    source = RunDir.SUMMARY
    out = {"source": source, **train} if isinstance(train, dict) else {"source": source, "value": train}
    for key in ("relative_to_dense", "sparse_vs_dense", "ratio_vs_dense"):
        if isinstance(train, dict) and key in train:
            out["training_flops_vs_dense"] = train[key]
            break
    return out


# --------------------------------------------------------------------------- resolving PATH

def _artifact(label: str, fmt: str, path: Path, precision: str = "fp32") -> dict[str, Any]:
    return {"artifact": label, "format": fmt, "path": str(path), "precision": precision}


def _resolve(path: Path, tmp: Path, progress=None) -> dict[str, Any]:
    """What to report on: dense reference file, artifacts, samples, summary, masks."""
    if path.is_dir():
        ctx = load_run_dir(path)
        run = RunDir(path)
        export_dir = run.export_dir
        rep_file = export_dir / REPORT_NAME
        if not rep_file.exists():
            from sparsekit.exporters.pipeline import export

            if progress:
                progress("exporting missing artifacts")
            try:
                export(path, "all", export_dir)
            except ValidationError:
                pass  # failed artifacts were removed and are listed in export_report.json
        exp = json.loads(rep_file.read_text())
        arts = []
        for a in exp.get("artifacts", []):
            if a.get("status", "").startswith(("ok", "kept")) and Path(a["path"]).exists():
                label = a["format"] if a["format"] != "compressed" or a["precision"] == "fp32" else \
                    f"compressed-{a['precision']}"
                arts.append(_artifact(label, a["format"], Path(a["path"]), a.get("precision", "fp32")))
        dense = artifact_path(export_dir, "onnx")
        if not dense.exists():
            dense = run.onnx_file
        if not any(a["artifact"] == "onnx" for a in arts):
            arts.insert(0, _artifact("onnx", "onnx", dense))
        return {"kind": "run", "dense": dense, "artifacts": arts, "samples": ctx.samples,
                "summary": ctx.summary, "masks": ctx.masks}
    if is_archive(path):
        ctx = load_archive(path)
        dense = tmp / "restored.onnx"
        onnx.save_model(ctx.model, str(dense))
        prec = ctx.extra.get("archive_precision", "fp32")
        return {"kind": "archive", "dense": dense,
                "artifacts": [_artifact("onnx (restored)", "onnx", dense, prec),
                              _artifact("compressed" if prec == "fp32" else f"compressed-{prec}", "compressed",
                                        path, prec)],
                "samples": ctx.samples, "summary": ctx.summary, "masks": ctx.masks, "dense_is_restored": True}
    if path.is_file():
        try:
            model = onnx.load(str(path))
        except Exception as exc:  # protobuf DecodeError
            raise InputError(f"{path} is not an ONNX file, run dir or sparsekit archive: {exc}",
                             where="PATH", fix="pass a run dir, a .onnx file or a .skz archive") from exc
        meta = {p.key: p.value for p in model.metadata_props}
        fmt = meta.get("sparsekit_format", "onnx")
        if fmt == "fast":  # a file from someone else: the runtime's loader checks all of it first (InputError)
            from sparsekit.runtime import load as load_fast

            load_fast(path)
        source = RunDir(meta["source_run"]) if meta.get("source_run") else None
        if source is not None and not source.path.is_dir():
            source = None  # the run it came from is gone: no samples, masks or summary
        samples = source.samples() if source else None
        masks = source.masks() if source else {}
        summary = source.summary() if source and source.summary_file.exists() else {}
        sibling = artifact_path(path.parent, "onnx")
        arts = [_artifact(fmt, fmt, path, meta.get("precision", "fp32"))]
        if path.name != sibling.name and sibling.exists():
            dense = sibling
            arts.insert(0, _artifact("onnx", "onnx", dense))
        elif sparse_weight_names(model):
            dense = tmp / "densified.onnx"
            onnx.save_model(densified(model), str(dense))
            arts.insert(0, _artifact("onnx (densified)", "onnx", dense))
        else:
            dense = path
            arts[0]["artifact"] = "onnx"
        return {"kind": "onnx", "dense": dense, "artifacts": arts, "samples": samples, "summary": summary,
                "masks": masks}
    raise InputError(f"{path} does not exist", where="PATH", fix="pass a run dir, a .onnx file or a .skz archive")


def archive_layouts(path: Path) -> dict[str, Any]:
    """An archive's layout per sparse tensor and the bytes its structured layouts save, from its manifest."""
    from sparsekit.exporters.compressed import Archive, layout_gain

    arch = Archive(path)
    try:
        entries = arch.manifest.get("tensors")
        return layout_gain([e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else [])
    finally:
        arch.close()


# --------------------------------------------------------------------------- accuracy

def _quality(runner, samples: Samples | None) -> dict[str, Any]:
    if samples is None:
        return {"accuracy": "unavailable", "reason": f"no samples ({RunDir.SAMPLES} of the source run not found)"}
    out = run_batched(runner, samples.x)
    ref = samples.logits
    res: dict[str, Any] = {"n_samples": len(ref),
                           "max_abs_diff_vs_torch": float(np.max(np.abs(out - ref))) if ref.size else 0.0,
                           "top1_agreement": float((out.argmax(-1) == ref.argmax(-1)).mean())}
    if samples.y is not None:
        res["accuracy"] = float((out.argmax(-1) == samples.y).mean())  # (LM: next-symbol accuracy per position)
        res["torch_accuracy"] = samples.reference_accuracy
    else:
        res["accuracy"] = "unavailable"
        res["reason"] = "samples have no labels"
    return res


# --------------------------------------------------------------------------- the report

def build_report(path: str | Path, *, batch_sizes: tuple[int, ...] = (1, 64, 256), threads: tuple[int, ...] = (1,),
                 runs: int = 50, warmup: int = 5, latency: bool = True, progress=None) -> dict[str, Any]:
    from sparsekit import bench

    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="sparsekit-report-") as tmpdir:
        src = _resolve(path, Path(tmpdir), progress)
        dense_model = onnx.load(str(src["dense"]))
        masks = src["masks"]
        layers = count_layers(dense_model, masks)
        totals = count_totals(dense_model, layers)
        if src.get("dense_is_restored"):
            dense_bytes = len(dense_model.SerializeToString())
        else:
            dense_bytes = Path(src["dense"]).stat().st_size
        samples: Samples | None = src["samples"]
        artifacts = []
        runners = {}
        for a in src["artifacts"]:
            p = Path(a["path"])
            rec = dict(a)
            rec["bytes"] = p.stat().st_size if not a["artifact"].startswith("onnx (") else dense_bytes
            rec["size_ratio_vs_dense"] = rec["bytes"] / dense_bytes
            rec["compression_vs_dense"] = dense_bytes / rec["bytes"]
            if p.suffix == ".onnx":
                m = onnx.load(str(p))
                own = count_layers(m)
                if own:  # formats with their own ops (e.g. fast) are not counted here
                    rec["macs_executed"] = sum(x["macs_dense"] for x in own)
                    rec["weight_params_stored"] = sum(x["params"] for x in own)
            runner = load_runner(p, a["format"], threads=1)
            rec["quality"] = _quality(runner, samples)
            if callable(getattr(runner, "describe", None)):  # e.g. fast: its kernel plan per batch size
                rec.update(runner.describe(batch_sizes))
            if a["format"] in NOT_TIMED:
                rec["latency"] = NOT_TIMED[a["format"]]
            else:
                runners[a["artifact"]] = (p, a["format"])
            if a["format"] == "sparse-onnx":
                rec["note"] = "ONNX Runtime densifies sparse weights at load: dense speed expected"
            if a["format"] == "compressed":
                rec["structured_layouts"] = archive_layouts(p)
            artifacts.append(rec)
        records: list[dict[str, Any]] = []
        structured_speed: list[dict[str, Any]] = []
        summary = src["summary"] or {}
        fast_label = next((a["artifact"] for a in src["artifacts"] if a["format"] == "fast"), None)
        twin = latency and fast_label in runners and summary.get("granularity", "unstructured") != "unstructured"
        if twin:  # what the structure buys: the same model unstructured, timed in the same run
            from sparsekit.exporters.twin import TWIN, write_twin

            if progress:
                progress("packing the unstructured twin")
            runners[TWIN] = (write_twin(dense_model, Path(tmpdir) / "twin.fast.onnx"), "fast")
        if latency and runners:
            if progress:
                progress("measuring latency")
            dense_label = next(iter(runners))
            shape = input_shape_of(dense_model) or (() if samples is not None else None)  # () : samples are used
            if shape is None:
                raise InputError("cannot tell the model's per-sample input shape", where=str(src["dense"]),
                                 fix="export with a fixed per-sample input shape")
            records = bench.latency_records(
                lambda name, t: load_runner(runners[name][0], runners[name][1], threads=t), list(runners),
                input_shape=shape, batch_sizes=batch_sizes, threads=threads, runs=runs, warmup=warmup,
                dense=dense_label, samples=None if samples is None else samples.x)
            if twin:
                from sparsekit.exporters.twin import split_twin

                records, structured_speed = split_twin(records, fast_label)
            flag_slow_artifacts(artifacts, records)
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "kind": "sparsekit-report",
        "sparsekit_version": sparsekit.__version__,
        "path": str(path),
        "path_kind": src["kind"],
        "run": {**{k: summary.get(k) for k in ("method", "distribution", "target_sparsity", "realized_sparsity",
                                               "overall_sparsity", "test_accuracy", "run_dir")},
                "granularity": summary.get("granularity", "unstructured")},
        "layers": layers,
        "totals": totals,
        "training_flops": training_flops(summary),
        "dense_onnx_bytes": dense_bytes,
        "artifacts": artifacts,
        "latency": records,
        "structured_speed": structured_speed,
        "latency_settings": {"measured": bool(latency), "batch_sizes": list(batch_sizes),
                             "threads": list(threads), "runs": runs,
                             "warmup": warmup, "interleaved": True, "allow_spinning": False,
                             "dense_reference": next(iter(runners), None)},
        "gates": [],
    }


def flag_slow_artifacts(artifacts: list[dict[str, Any]], records: list[dict[str, Any]]) -> None:
    """Set ``slower_than_dense`` on every timed speed-format artifact: its latency records whose p50
    speedup vs dense is below ``exporters.speed.MIN_SPEEDUP`` (``speed_record`` form; empty when none)."""
    for art in artifacts:
        if art["format"] not in SPEED_FORMATS:
            continue
        mine = [speed_record(r["batch_size"], r["threads"], r["speedup_vs_dense"]) for r in records
                if r["artifact"] == art["artifact"] and r.get("speedup_vs_dense") is not None]
        if mine:
            art["slower_than_dense"] = slower_than_dense(mine)


def _speed_artifact_records(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Latency records of the speed-format artifacts (not the dense reference), with a speedup."""
    speed = {a["artifact"] for a in report["artifacts"] if a["format"] in SPEED_FORMATS}
    dense = report["latency_settings"].get("dense_reference")
    return [r for r in report["latency"] if r["artifact"] in speed and r["artifact"] != dense
            and r.get("speedup_vs_dense") is not None]


LATENCY_GATES = {"min_speedup": "--min-speedup", "min_speedup_each": "--min-speedup-each"}


def require_latency(gates: dict[str, float | None], measured: bool) -> None:
    """A gate on latency without latency measurements is a usage error (exit 2), not a failed gate."""
    asked = [LATENCY_GATES[g] for g, v in gates.items() if g in LATENCY_GATES and v is not None]
    if asked and not measured:
        raise InputError(f"{' and '.join(asked)} needs latency measurements", where="--no-latency",
                         fix="drop --no-latency (or the speed gate)")


def check_gates(report: dict[str, Any], *, min_accuracy: float | None = None, min_speedup: float | None = None,
                max_size_ratio: float | None = None, min_speedup_each: float | None = None) -> list[dict[str, Any]]:
    """CI gates; fills ``report['gates']`` and returns them (``passed`` per gate).

    - min_accuracy (fraction, or percent when > 1): every artifact with a measured accuracy reaches it.
    - min_speedup: at every batch size and thread count, the fastest non-dense artifact's p50 speedup.
    - min_speedup_each: every speed-format artifact (fast, compact-onnx, int8-onnx) at every batch size and
      thread count (passes when there is none).
    - max_size_ratio: the smallest artifact's bytes / dense ONNX bytes.

    A speed gate on a report built without latency raises ``InputError``.
    """
    require_latency({"min_speedup": min_speedup, "min_speedup_each": min_speedup_each},
                    report["latency_settings"].get("measured", True))
    gates = []
    if min_accuracy is not None:
        want = min_accuracy / 100 if min_accuracy > 1 else min_accuracy
        accs = {a["artifact"]: a["quality"].get("accuracy") for a in report["artifacts"]}
        measured = {k: v for k, v in accs.items() if isinstance(v, float)}
        worst = min(measured.values()) if measured else None
        gates.append({"gate": "min_accuracy", "threshold": want, "value": worst,
                      "passed": worst is not None and worst >= want,
                      "detail": "no accuracy measured (no labelled samples)" if worst is None else
                      f"worst artifact {min(measured, key=measured.get)}"})
    if min_speedup is not None:
        dense = report["latency_settings"].get("dense_reference")
        best: dict[tuple[int, int], float] = {}
        for r in report["latency"]:
            if r["artifact"] != dense and r.get("speedup_vs_dense"):
                key = (r["batch_size"], r["threads"])
                best[key] = max(best.get(key, 0.0), r["speedup_vs_dense"])
        worst = min(best.values()) if best else None
        gates.append({"gate": "min_speedup", "threshold": min_speedup, "value": worst,
                      "passed": worst is not None and worst >= min_speedup,
                      "detail": "no latency measured" if worst is None else
                      "best artifact per batch size, worst batch size"})
    if min_speedup_each is not None:
        recs = _speed_artifact_records(report)
        worst = min(recs, key=lambda r: r["speedup_vs_dense"]) if recs else None
        gates.append({"gate": "min_speedup_each", "threshold": min_speedup_each,
                      "value": None if worst is None else worst["speedup_vs_dense"],
                      "passed": worst is None or worst["speedup_vs_dense"] >= min_speedup_each,
                      "detail": f"no speed artifact ({', '.join(SPEED_FORMATS)}) was timed" if worst is None else
                      f"slowest speed artifact: {worst['artifact']} at batch {worst['batch_size']}, "
                      f"{worst['threads']} thread(s)"})
    if max_size_ratio is not None:
        ratios = [a["size_ratio_vs_dense"] for a in report["artifacts"]]
        value = min(ratios) if ratios else None
        gates.append({"gate": "max_size_ratio", "threshold": max_size_ratio, "value": value,
                      "passed": value is not None and value <= max_size_ratio,
                      "detail": "smallest artifact bytes / dense ONNX bytes"})
    report["gates"] = gates
    return gates


class ReportGateError(GateError):
    """A gate failed; with --json the error object carries the whole report."""

    def __init__(self, what: str, report: dict[str, Any], **kw: Any) -> None:
        self.report = report
        super().__init__(what, **kw)

    def to_json(self) -> dict[str, Any]:
        return {**self.report, **super().to_json()}


def raise_on_failed_gates(report: dict[str, Any]) -> None:
    failed = [g for g in report["gates"] if not g["passed"]]
    if failed:
        parts = [f"{g['gate']} {g['value'] if g['value'] is None else round(g['value'], 4)} vs "
                 f"{g['threshold']}" for g in failed]
        raise ReportGateError(f"gate not met: {', '.join(parts)}", report, where=report["path"],
                              fix="see the report; improve the model or relax the threshold")


def schema() -> dict[str, Any]:
    return json.loads((Path(sparsekit.__file__).parent / "schemas" / "report.schema.json").read_text())

