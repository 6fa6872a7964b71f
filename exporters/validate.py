"""Validation of every written artifact against the trained model (docs/validation.md).

fp32 forms pass when max |Δ| ≤ 1e-5 · max(1, max |reference|) on the run's real samples; fp16 and int8
forms pass on top-1 agreement ≥ 99% and an accuracy drop ≤ 0.5 points (int8: ≤ 1 point). ONNX files
are also checked with ``onnx.checker`` (full check) and strict shape inference. A failure raises
``ValidationError`` (exit 4).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from sparsekit.exporters.context import Samples

from sparsekit.errors import ValidationError
from sparsekit.run_dir import Inputs

FP32_RTOL = 1e-5
MIN_AGREEMENT = 0.99
MAX_DROP_POINTS = {"fp32": 0.0, "fp16": 0.5, "int8": 1.0}

Runner = Callable[[Inputs], np.ndarray]  # one input array, or a dict of arrays by ONNX input name


def check_onnx_file(path: Path) -> None:
    """``onnx.checker`` full check and strict shape inference (types checked): what converters,
    optimizers and other runtimes run on a file before they accept it."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
        onnx.shape_inference.infer_shapes(onnx.load(str(path)), check_type=True, strict_mode=True)
    except Exception as exc:  # onnx raises ValidationError / InferenceError subclasses
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValidationError(f"onnx.checker rejected the model: {msg}", where=str(path),
                              fix="report this as a bug with the run dir attached") from exc


def onnx_runner(model: str | Path | bytes, threads: int = 1) -> Runner:
    """An ONNX Runtime CPU session as ``x -> first output`` (no idle spinning, fixed threads)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    src = model if isinstance(model, bytes) else str(model)
    sess = ort.InferenceSession(src, sess_options=opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name

    def run(x: Inputs) -> np.ndarray:
        return sess.run(None, x if isinstance(x, dict) else {name: x})[0]

    run.session = sess  # type: ignore[attr-defined]
    return run


def take(x: Inputs, start: int, stop: int) -> Inputs:
    """Samples ``start:stop`` of one input array or of every input of a dict."""
    return {k: v[start:stop] for k, v in x.items()} if isinstance(x, dict) else x[start:stop]


def count(x: Inputs) -> int:
    return len(next(iter(x.values()))) if isinstance(x, dict) else len(x)


def run_batched(runner: Runner, x: Inputs, batch: int = 256) -> np.ndarray:
    return np.concatenate([np.asarray(runner(take(x, i, i + batch))) for i in range(0, count(x), batch)])


def compare(outputs: np.ndarray, samples: Samples, precision: str,
            output_name: str = "logits") -> dict[str, Any]:
    """Apply the pass rule of ``precision`` to ``outputs`` vs the reference logits; never raises."""
    ref = samples.logits
    result: dict[str, Any] = {"n_samples": len(ref), "output": output_name, "precision": precision}
    if outputs.shape != ref.shape:
        result.update(passed=False, errors=[f"{output_name}: shape {list(outputs.shape)} != reference "
                                            f"{list(ref.shape)}"])
        return result
    diff = float(np.max(np.abs(outputs.astype(np.float64) - ref.astype(np.float64)))) if ref.size else 0.0
    tol = FP32_RTOL * max(1.0, float(np.max(np.abs(ref))) if ref.size else 1.0)
    # classes on the last axis: (n, classes) classifiers, (n, T, V) language models (per token)
    agreement = float((outputs.argmax(-1) == ref.argmax(-1)).mean()) if ref.ndim >= 2 and ref.size else None
    acc = ref_acc = drop = None
    if samples.y is not None and ref.ndim == samples.y.ndim + 1 and ref.size:
        acc = float((outputs.argmax(-1) == samples.y).mean())
        ref_acc = samples.reference_accuracy
        drop = 100.0 * (ref_acc - acc)
    result.update(max_abs_diff=diff, tolerance=tol, top1_agreement=agreement, accuracy=acc,
                  reference_accuracy=ref_acc, accuracy_drop_points=drop)
    errors = []
    if not np.all(np.isfinite(outputs)):
        errors.append(f"{output_name}: non-finite outputs")
    if precision == "fp32":
        result["rule"] = f"max|Δ| ≤ {FP32_RTOL:g}·max(1, max|ref|)"
        if not diff <= tol:
            errors.append(f"{output_name}: max |Δ| {diff:.3g} > tolerance {tol:.3g}")
    else:
        max_drop = MAX_DROP_POINTS[precision]
        result["rule"] = f"top-1 agreement ≥ {MIN_AGREEMENT:.0%}, accuracy drop ≤ {max_drop} points"
        if agreement is not None and agreement < MIN_AGREEMENT:
            errors.append(f"{output_name}: top-1 agreement {agreement:.2%} < {MIN_AGREEMENT:.0%}")
        if drop is not None and drop > max_drop + 1e-9:
            errors.append(f"{output_name}: accuracy drop {drop:.2f} points > {max_drop}")
    result["passed"] = not errors
    result["errors"] = errors
    return result


def validate_runner(runner: Runner, samples: Samples | None, precision: str,
                    probe_shape: tuple[int, ...] | None = None) -> dict[str, Any]:
    """Run ``runner`` on the samples (or, without samples, on zeros only to prove it runs)."""
    if samples is None:
        if probe_shape is None:
            return {"passed": True, "errors": [], "outputs": "unavailable (no samples)",
                    "precision": precision}
        out = np.asarray(runner(np.zeros((2, *probe_shape), np.float32)))
        ok = bool(np.all(np.isfinite(out)))
        return {"passed": ok, "errors": [] if ok else ["non-finite outputs on zeros"],
                "outputs": "unavailable (no samples): ran on zeros only", "precision": precision}
    return compare(run_batched(runner, samples.x), samples, precision)


def input_shape_of(path_or_model: str | Path | onnx.ModelProto) -> tuple[int, ...] | None:
    model = path_or_model if isinstance(path_or_model, onnx.ModelProto) else onnx.load(
        str(path_or_model), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name not in inits:
            dims = inp.type.tensor_type.shape.dim[1:]
            if all(d.HasField("dim_value") for d in dims):
                return tuple(int(d.dim_value) for d in dims)
            return None
    return None


def raise_if_failed(result: dict[str, Any], path: Path, fmt: str) -> None:
    if not result.get("passed", False):
        raise ValidationError(f"{fmt} failed validation: {'; '.join(result.get('errors', []))}",
                              where=str(path),
                              fix="the file was removed; rerun with --warn-only to keep it for debugging")


# Runners for artifacts that are not plain ONNX files: format name -> loader(path, threads) -> Runner.
# A format with its own runtime (e.g. ``fast``) registers one so that export validates it and
# ``sparsekit report`` times it next to the dense ONNX Runtime model.
RUNNERS: dict[str, Callable[[Path, int], Runner]] = {}


def register_runner(fmt: str) -> Callable[[Callable[[Path, int], Runner]], Callable[[Path, int], Runner]]:
    def deco(loader: Callable[[Path, int], Runner]) -> Callable[[Path, int], Runner]:
        RUNNERS[fmt] = loader
        return loader

    return deco


def load_runner(path: str | Path, fmt: str | None = None, threads: int = 1) -> Runner:
    """A runner for an artifact: the format's registered runner, else ONNX Runtime on the file."""
    if fmt in RUNNERS:
        return RUNNERS[fmt](Path(path), threads)
    return onnx_runner(path, threads)
