"""The ``fast`` export format: sparse linear layers packed for sparsekit's own CPU kernels.

``write_fast`` reads the dense reference ONNX model. An MLP chain has its dead hidden units removed exactly
and every layer packed as CSR into ``com.sparsekit::SparseLinear`` nodes (see ``sparsekit.runtime.artifact``);
any other graph keeps its nodes and has only its sparse linear layers packed (``fast_graph``: Transformers'
projections, CNNs' classifiers; the rest runs in ONNX Runtime). It optionally measures the kernels per layer
on this machine
(``tune=True``), checks the result against the dense model under ONNX Runtime and writes the file
atomically. Load it with ``sparsekit.runtime.load`` or run it with ``sparsekit run``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from sparsekit.exporters.registry import register_format

from sparsekit.errors import InputError, ValidationError
from sparsekit.model_io import PREFIX as IO_PREFIX

if TYPE_CHECKING:
    from sparsekit.exporters.graph import DenseLayer

DESCRIPTION = ("sparse linear layers on sparsekit's CPU kernels (ONNX with com.sparsekit nodes; sparsekit run); "
               "stock ONNX Runtime runs it too, at dense speed; a model with a step method (char-gru, char-lstm) "
               "also gets its one-step models *.step.onnx and *.step.fast.onnx (state in and out)")
SUFFIX = ".fast.onnx"
TOLERANCE = 1e-5
VALIDATION_BATCHES = (1, 3, 64)


def _dense_reference(proto: onnx.ModelProto, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


def validate_against_dense(model, dense: onnx.ModelProto, *, batches=VALIDATION_BATCHES, seed: int = 0,
                           inputs: np.ndarray | None = None) -> dict[str, float]:
    """max |fast - dense ORT| and the allowed bound ``1e-5 * max(1, max |dense|)`` over random inputs."""
    sess = _dense_reference(dense, 1)
    name = sess.get_inputs()[0].name
    rng = np.random.default_rng(seed)
    worst, bound = 0.0, 0.0
    samples = [inputs] if inputs is not None else [
        rng.standard_normal((b, *model.input_shape)).astype(np.float32) for b in batches]
    for x in samples:
        ref = sess.run(None, {name: np.asarray(x, np.float32)})[0]
        got = model.run(x)
        worst = max(worst, float(np.max(np.abs(got - ref))) if ref.size else 0.0)
        bound = max(bound, TOLERANCE * max(1.0, float(np.max(np.abs(ref))) if ref.size else 1.0))
    return {"max_abs_diff": worst, "bound": bound}


def calibrated_speed(calibration: dict[str, dict] | None, threads: int) -> list[dict[str, Any]] | None:
    """Speed records vs dense ORT from a calibration report: at each batch where the all-dense plan was
    timed, its median over the chosen plan's (None without a calibration)."""
    from sparsekit.exporters.speed import speed_record

    if calibration is None:
        return None
    out = []
    for b, entry in calibration.items():
        med = entry["median_s"]
        if "dense" in med and entry["chosen"] in med and med[entry["chosen"]] > 0:
            out.append(speed_record(int(b), threads, med["dense"] / med[entry["chosen"]]))
    return out


def _compacted(dense_layers: list[DenseLayer], n_inputs: int) -> tuple[list[DenseLayer], dict[str, int]]:
    """The chain after ``compact_layers`` (inputs kept: the kernels skip zero columns for free) and its stats."""
    from sparsekit.exporters.compact import compact_layers, with_all_inputs

    kept_in, layers, counts = compact_layers(n_inputs, dense_layers)
    removed = sum(u["before"] - u["after"] for u in counts["units"])
    return with_all_inputs(n_inputs, kept_in, layers), {"units_removed": removed,
                                                        "units_folded": counts["folded_units"]}


def build_fast_model(dense: onnx.ModelProto, *, compact: bool = True, threads: int = 1):
    """Parse the dense chain, compact it, and return ``(FastModel, compaction stats)`` (no plan)."""
    from sparsekit.exporters.graph import parse_mlp_chain

    from sparsekit import __version__
    from sparsekit.runtime.layers import CsrLayer
    from sparsekit.runtime.model import FastModel

    shape, chain = parse_mlp_chain(dense)
    for dl in chain:
        if dl.activation not in (None, "relu"):
            raise InputError(f"activation {dl.activation!r} is not supported by the fast format",
                             where=dl.weight_name, fix="use ReLU or no activation")
    stats = {"units_removed": 0, "units_folded": 0}
    if compact and len(chain) > 1:
        chain, stats = _compacted(chain, int(np.prod(shape)))
    layers = [CsrLayer.from_dense(c.weight, c.bias, c.activation == "relu", name=c.weight_name or f"layer{i}")
              for i, c in enumerate(chain)]
    src_meta = {p.key: p.value for p in dense.metadata_props}
    meta = {f"source.{k}": v for k, v in src_meta.items() if not k.startswith(IO_PREFIX)}
    meta.update({k: v for k, v in src_meta.items() if k.startswith(IO_PREFIX)})  # io: same keys in every artifact
    meta.update({
        "sparsekit_version": __version__,
        "exporter": "sparsekit.exporters.fast",
        "opset": "18",
        "sparsity_per_layer": json.dumps({ly.name: round(1 - ly.density, 6) for ly in layers}),
        "compaction": json.dumps(stats),
    })
    inputs = [i for i in dense.graph.input if i.name not in {t.name for t in dense.graph.initializer}]
    model = FastModel(layers, shape, threads=threads, input_name=inputs[0].name,
                      output_name=dense.graph.output[0].name, metadata=meta)
    return model, stats


def write_model(dense: onnx.ModelProto, out_path: str | os.PathLike[str], *, tune: bool = False,
                batch_size: int = 1, threads: int = 1, compact: bool = True, tune_budget_s: float = 0.3,
                calibrate: bool = True, opset: int = 18,
                metadata: dict[str, str] | None = None, inputs: np.ndarray | None = None,
                skip_slow: bool = False) -> dict[str, Any]:
    """Pack, calibrate or tune, check against ``dense`` under ONNX Runtime and write the artifact.

    Without ``tune``, a quick whole-model calibration (``sparsekit.runtime.tune.calibrate``, 0.2 s for
    a small MLP, ~2 s for 4096-wide ones) measures the heuristic plan against dense ONNX Runtime at
    batch sizes 1, 2, 4, ..., 64, 256 and ``batch_size`` and keeps the faster, so the default artifact is
    not slower than the dense model where call overhead dominates (tiny layers). ``calibrate=False``
    leaves the heuristic alone. A graph that is not an MLP chain is packed whole
    (``sparsekit.exporters.fast_graph``): its sparse linear layers run on sparsekit's kernels, the rest in
    ONNX Runtime; ``inputs`` (real samples) validate it, else random ones of each input's type; it is timed
    against the dense graph, and ``skip_slow`` (``--format all``) refuses it where it is slower.
    Returns a report.
    """
    from sparsekit.exporters.graph import UnsupportedGraphError

    from sparsekit.runtime.artifact import save, to_onnx
    from sparsekit.runtime.layers import kernel_isa
    from sparsekit.runtime.replan import record as record_plan_cpu
    from sparsekit.runtime.tune import (
        CALIBRATION_BATCHES,
        DEFAULT_BATCHES,
        check_heuristic_plan,
        check_panel_chain,
        check_thread_caps,
        tune_layers,
    )
    from sparsekit.runtime.tune import calibrate as calibrate_model

    batch_size, threads = int(batch_size), int(threads)
    if batch_size < 1 or threads < 1:
        raise InputError("batch size and threads must be positive", where="--tune-batch-size/--threads")
    try:
        model, stats = build_fast_model(dense, compact=compact, threads=threads)
    except UnsupportedGraphError:  # not an MLP chain: sparse layers inside the graph, the rest in ORT
        from sparsekit.exporters.fast_graph_write import write_graph_model

        return write_graph_model(dense, out_path, tune=tune, batch_size=batch_size, threads=threads,
                                 calibrate=calibrate, tune_budget_s=tune_budget_s, metadata=metadata, inputs=inputs,
                                 skip_slow=skip_slow)
    if metadata:
        model.metadata.update(metadata)
    model.metadata.update({"sparsekit_format": "fast", "exporter": "sparsekit.exporters.fast",
                           "opset": str(opset), "compaction": json.dumps(stats)})
    timings = calibration = thread_caps = panel_chain = heuristic_check = None
    if tune:
        batches = sorted({*DEFAULT_BATCHES, batch_size})
        timings = tune_layers(model.layers, batches=batches, threads=threads, budget_s=tune_budget_s)
        model.plan_changed()
        # whole-model check: all layers on the batch kernel run as one data-parallel chain
        panel_chain = check_panel_chain(model, batches=batches, threads=threads)
        # whole-model check: never slower than the untuned heuristic plan
        heuristic_check = check_heuristic_plan(model, batches=batches, threads=threads)
        if threads > 1:  # whole-model check: a chain that loses on two threads keeps one
            thread_caps = check_thread_caps(model, batches=batches, threads=threads)
        plan_source = "tuned"
    elif calibrate:
        calibration = calibrate_model(model, batches=sorted({*CALIBRATION_BATCHES, batch_size}),
                                      threads=threads)
        plan_source = "calibrated"
    else:
        plan_source = "heuristic"
    measured = plan_source != "heuristic"
    model.metadata.update({"tuned": str(bool(tune)).lower(), "plan_source": plan_source,
                           "tune_threads": str(threads), "tune_batch_size": str(batch_size),
                           "tuned_isa": kernel_isa() if measured else ""})
    if measured:  # loaded on another CPU, the plan is measured again there (sparsekit.runtime.replan)
        record_plan_cpu(model)
    check = validate_against_dense(model, dense)
    if not check["max_abs_diff"] <= check["bound"]:
        raise ValidationError(f"fast model differs from the dense model by {check['max_abs_diff']:.3g} "
                              f"(allowed {check['bound']:.3g})", where=str(out_path),
                              fix="please report this with the model attached")
    proto = to_onnx(model, opset=opset)
    onnx.checker.check_model(proto, full_check=True)
    save(model, out_path, opset=opset)
    dense_bytes = sum(layer.n_in * layer.n_out * 4 for layer in model.layers)
    kernels = {str(b): model.kernels_for(b) for b in sorted({1, batch_size, 256})}
    return {
        "format": "fast",
        "precision": "fp32",
        "path": str(out_path),
        "bytes": Path(out_path).stat().st_size,
        "dense_weight_bytes": dense_bytes,
        "layers": model.info()["layers"],
        "compaction": stats,
        "tuned": bool(tune),
        "plan_source": plan_source,
        "tune_timings_s": timings,
        "calibration": calibration,
        "speed_vs_dense": calibrated_speed(calibration, threads),
        "thread_caps": thread_caps,
        "panel_chain": panel_chain,
        "heuristic_check": heuristic_check,
        "dense_check": check,
        "isa": kernel_isa(),
        "kernels": kernels,
        "notes": [f"kernels per layer by batch size: {json.dumps(kernels)} ({plan_source}"
                  + (" per layer" if tune else " for the whole model; --tune measures every layer"
                     if measured else "; export with --tune to measure them on this machine")
                  + f", {threads} thread{'s' if threads > 1 else ''})"],
    }


def write_fast(dense_onnx_path: str | os.PathLike[str], out_path: str | os.PathLike[str], *,
               tune: bool = False, batch_size: int = 1, threads: int = 1, compact: bool = True,
               tune_budget_s: float = 0.3, calibrate: bool = True) -> dict[str, Any]:
    """Write the ``fast`` artifact of the dense MLP at ``dense_onnx_path`` to ``out_path``.

    ``tune`` measures every layer's kernels at batch sizes 1, 4, 16, 64, 256 and ``batch_size`` with
    ``threads`` threads and stores the fastest per batch size (dense GEMM included, so a tuned layer
    is never slower than dense there); otherwise a quick whole-model calibration checks the
    density/batch heuristic against dense (``calibrate=False``: the heuristic alone).
    Raises ``ValidationError`` when the outputs differ from the dense model by more than
    ``1e-5 * max(1, max |dense|)``.
    """
    src = Path(dense_onnx_path)
    if not src.is_file():
        raise InputError(f"dense model {src} not found", where=str(src),
                         fix="export the dense ONNX model first (format onnx)")
    try:
        dense = onnx.load(str(src))
    except Exception as exc:
        raise InputError(f"cannot read {src} as ONNX: {type(exc).__name__}", where=str(src)) from exc
    return write_model(dense, out_path, tune=tune, batch_size=batch_size, threads=threads, compact=compact,
                       tune_budget_s=tune_budget_s, calibrate=calibrate, metadata={"source_model": str(src)})


@register_format("fast", DESCRIPTION, SUFFIX)
def write_fast_format(ctx, out_path: Path, options) -> dict[str, Any]:
    """Registry entry (``write(ctx, out_path, options)``). Planning options come from ``options``
    (``sparsekit export --tune --tune-batch-size N --threads T``), else from the environment
    (``SPARSEKIT_FAST_TUNE=1``, ``SPARSEKIT_FAST_BATCH``, ``SPARSEKIT_FAST_THREADS``;
    ``SPARSEKIT_FAST_CALIBRATE=0`` keeps the untuned plan heuristic, without the quick calibration)."""
    from sparsekit.exporters.context import metadata_for
    from sparsekit.exporters.graph import UnsupportedGraphError

    from sparsekit.runtime.portable import MIN_OPSET

    env = os.environ
    tune = bool(getattr(options, "tune", False)) or env.get("SPARSEKIT_FAST_TUNE") == "1"
    batch = int(getattr(options, "tune_batch_size", 1) if getattr(options, "tune_batch_size", 1) != 1
                else env.get("SPARSEKIT_FAST_BATCH", 1))
    threads = int(getattr(options, "threads", 1) if getattr(options, "threads", 1) != 1
                  else env.get("SPARSEKIT_FAST_THREADS", 1))
    calibrate = env.get("SPARSEKIT_FAST_CALIBRATE", "1") != "0"
    opset = int(getattr(options, "opset", 18))
    if opset < MIN_OPSET:
        raise UnsupportedGraphError(f"fast needs opset {MIN_OPSET} or later (its SparseLinear function for stock "
                                    "ONNX Runtime); nothing was written", where="--opset",
                                    fix=f"use --opset {MIN_OPSET} or later")
    try:
        meta = metadata_for(ctx, "fast", opset=opset, extra={"exporter": "sparsekit.exporters.fast"})
    except Exception:  # metadata is best effort; the artifact itself does not depend on it
        meta = {}
    try:
        samples = ctx.samples.x[:64] if ctx.samples is not None else None
        record = write_model(ctx.model, out_path, tune=tune, batch_size=batch, threads=threads, opset=opset,
                             calibrate=calibrate, metadata=meta, inputs=samples,
                             skip_slow=bool(getattr(options, "skip_slow", False)))
    except UnsupportedGraphError as exc:
        raise UnsupportedGraphError(f"fast cannot pack this graph ({exc.what}); nothing was written",
                                    where=exc.where, fix="the fast format packs sparse linear layers "
                                    "(Gemm/MatMul with a constant weight); use --format onnx,compressed") from exc
    return _with_step_models(ctx, out_path, record, opset=opset, metadata=meta, measure=calibrate or tune)


def _with_step_models(ctx, out_path: Path, record: dict[str, Any], **kw: Any) -> dict[str, Any]:
    """``record`` plus, for a run whose model has a ``step`` method (char-gru, char-lstm), its one-step models
    (``sparsekit.exporters.fast_step``)."""
    from sparsekit.exporters.fast_step import torch_model_of, write_step_models

    model = torch_model_of(ctx)
    if model is None:
        return record
    step = write_step_models(model, Path(out_path), **kw)
    return {**record, "step_models": {k: v for k, v in step.items() if k != "note"},
            "notes": [*record.get("notes", []), step["note"]]}


def _register_runner() -> None:
    try:
        from sparsekit.exporters.validate import register_runner
    except ImportError:  # pragma: no cover - validate module not present
        return

    @register_runner("fast")
    def fast_runner(path: Path, threads: int = 1):
        from sparsekit.runtime import load

        model = load(path, threads=threads)

        def run(x: np.ndarray) -> np.ndarray:
            return model.run(x)

        def describe(batch_sizes=(1, 64, 256)) -> dict[str, Any]:
            """The plan the latency runs with (for ``sparsekit report``)."""
            meta = model.metadata
            source = meta.get("plan_source") or ("tuned" if meta.get("tuned") == "true" else "heuristic")
            kernels = {str(b): model.kernels_for(int(b)) for b in batch_sizes}
            at = f" at {meta.get('tune_threads', '1')} thread(s) on {meta.get('tuned_isa') or '?'}" \
                if source != "heuristic" else ""
            if model.replanned:  # measured on another CPU: re-measured here when loaded
                at = f" for {model.replanned['to']}"
            unit = "rows (batch x sequence)" if meta.get("fast_graph") == "1" else "batch size"
            return {"plan_source": source, "kernels": kernels, "isa": model.info()["isa"],
                    "note": f"kernels per layer by {unit} ({source}{at}): "
                            + "; ".join(f"{b}: {' '.join(k)}" for b, k in kernels.items())}

        run.model = model  # type: ignore[attr-defined]
        run.describe = describe  # type: ignore[attr-defined]
        return run


_register_runner()
