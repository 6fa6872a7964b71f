"""``int8-onnx``: ONNX Runtime int8 quantization of the compact model, the quantization measured fastest here.

Candidates (each must pass the int8 rule on the run's samples: top-1 agreement ≥ 99%, accuracy drop ≤ 1
point):

- ``dynamic``: ``quantize_dynamic`` of every op it handles except Conv (MatMul, LSTM, Gather, ...; int8
  weights per output channel, activations quantized at run time). Conv layers stay fp32: ORT's dynamic
  ``ConvInteger`` ran 4-8× slower than the fp32 Conv on every conv net we measured (LeNet-5 0.24× of
  dense at batch 64, ResNet-20 0.12×).
- ``static`` (graphs with Conv, given samples): ``quantize_static`` in QDQ form (uint8 activations, int8
  weights per channel), ranges calibrated on the first half of the samples and kept only if the other
  half also passes the rule: ResNet-20 on digits ran 1.6× (batch 1) and 2.1× (batch 64) of dense.

The candidates are timed against the dense model at batch 1 and 64 (``exporters.speed``, one thread)
and the one with the best worst-batch speedup is written. Where even that one runs below 0.95× of dense
(tiny conv nets: LeNet-5 on 8×8 digits, 0.8× at batch 1), ``--format all`` leaves int8-onnx out with that
message; named explicitly, it is written and flagged ``slower_than_dense``. The compact model is written
with ``MatMul`` + ``Add``; graphs that cannot be compacted are quantized as they are.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from sparsekit.exporters.compact import compact_model
from sparsekit.exporters.context import (
    ExportContext,
    ExportOptions,
    Samples,
    metadata_for,
    save_onnx_atomic,
    set_metadata,
)
from sparsekit.exporters.dense import reference_model
from sparsekit.exporters.graph import UnsupportedGraphError
from sparsekit.exporters.registry import register_format
from sparsekit.exporters.speed import EXPORT_BATCHES, MIN_SPEEDUP, describe_slow, slower_than_dense, speedups_vs_dense
from sparsekit.exporters.validate import compare, onnx_runner, run_batched, take

from sparsekit.run_dir import Inputs

MIN_STATIC_SAMPLES = 16  # static calibration splits the samples in two halves (calibrate / check)
DESCRIBE = {"dynamic": "dynamic int8 (MatMul and the like; Conv kept fp32)",
            "static": "static int8 QDQ (uint8 activations calibrated on the run's samples)"}


@contextlib.contextmanager
def _quiet_quantizer(what: str) -> Iterator[None]:
    """Silence the quantizer (it logs hints on the root logger and prints) and turn its errors into one line."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    except Exception as exc:  # the quantizer raises assorted errors on graphs it cannot handle
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedGraphError(f"ONNX Runtime {what} failed: {msg}", where="int8-onnx",
                                    fix="use the fp32 or compressed formats") from exc
    finally:
        root.setLevel(level)


def _run_quantizer(model: onnx.ModelProto, what: str, quantize: Callable[[str, str], None]) -> onnx.ModelProto:
    model_copy = onnx.ModelProto()
    model_copy.CopyFrom(model)
    del model_copy.graph.value_info[:]  # stale exporter shapes trip the quantizer's shape inference
    with tempfile.TemporaryDirectory(prefix="sparsekit-int8-") as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        onnx.save_model(model_copy, str(src))
        with _quiet_quantizer(what):
            quantize(str(src), str(dst))
        return onnx.load(str(dst))


def quantize_int8(model: onnx.ModelProto) -> onnx.ModelProto:
    """Dynamic int8 quantization (per output channel) of every op ORT handles so, except Conv (kept fp32)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.registry import IntegerOpsRegistry

    ops = sorted(op for op in IntegerOpsRegistry if op != "Conv")
    return _run_quantizer(model, "dynamic quantization", lambda src, dst: quantize_dynamic(
        src, dst, weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=ops))


def quantize_static_int8(model: onnx.ModelProto, calibration: np.ndarray) -> onnx.ModelProto:
    """Static QDQ int8 quantization (uint8 activations, int8 weights per channel), ranges from ``calibration``."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    name = next(i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer})

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calibration[i:i + 32] for i in range(0, len(calibration), 32))

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self.batches, None)
            return None if x is None else {name: x}

    return _run_quantizer(model, "static quantization", lambda src, dst: quantize_static(
        src, dst, Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8, per_channel=True, calibrate_method=CalibrationMethod.MinMax))


def _passes(model: onnx.ModelProto, samples: Samples | None, *, held_out: int = 0) -> bool:
    """The int8 rule on all samples (and on the last ``held_out`` of them alone)."""
    if samples is None:
        return True
    out = run_batched(onnx_runner(model.SerializeToString()), samples.x)
    if not compare(out, samples, "int8")["passed"]:
        return False
    if held_out:
        n = samples.count
        tail = Samples(take(samples.x, n - held_out, n), None if samples.y is None else samples.y[-held_out:],
                       samples.logits[-held_out:])
        return bool(compare(out[-held_out:], tail, "int8")["passed"])
    return True


def candidates(base: onnx.ModelProto, samples: Samples | None) -> dict[str, onnx.ModelProto]:
    """The quantizations worth timing (see the module docstring); each passes the int8 rule, except
    ``dynamic`` when nothing passes (it is then written, and validation reports the failure)."""
    out = {"dynamic": quantize_int8(base)}
    has_conv = any(n.op_type == "Conv" for n in base.graph.node)
    if has_conv and samples is not None and samples.count >= MIN_STATIC_SAMPLES \
            and isinstance(samples.x, np.ndarray) and samples.x.dtype == np.float32:
        half = len(samples.x) // 2
        try:
            out["static"] = quantize_static_int8(base, samples.x[:half])
        except UnsupportedGraphError:
            pass  # the dynamic form still stands
        else:
            if not _passes(out["static"], samples, held_out=len(samples.x) - half):
                del out["static"]
    if not any(t.data_type == onnx.TensorProto.INT8 for t in out["dynamic"].graph.initializer) and len(out) > 1:
        del out["dynamic"]  # nothing but Conv to quantize: it would be the fp32 model
    elif len(out) > 1 and not _passes(out["dynamic"], samples):
        del out["dynamic"]
    return out


def timing_inputs(samples: Samples | None) -> dict[int, Inputs] | None:
    """Batches of ``EXPORT_BATCHES`` samples (tiled), or None without samples."""
    if samples is None or not samples.count:
        return None
    reps = -(-max(EXPORT_BATCHES) // samples.count)
    return {b: tiled(samples.x, reps, b) for b in EXPORT_BATCHES}


def tiled(x: Inputs, reps: int, n: int) -> Inputs:
    """The first ``n`` samples of ``x`` repeated ``reps`` times (each input of a dict alike), contiguous."""
    if isinstance(x, dict):
        return {k: np.ascontiguousarray(np.concatenate([v] * reps)[:n]) for k, v in x.items()}
    return np.ascontiguousarray(np.concatenate([x] * reps)[:n])


def pick_fastest(dense: onnx.ModelProto, cands: dict[str, onnx.ModelProto], samples: Samples | None
                 ) -> tuple[str, list[dict[str, Any]] | None]:
    """The candidate with the best worst-batch speedup vs ``dense`` and its speed records (None: not timed)."""
    inputs = timing_inputs(samples)
    if inputs is None:
        return next(iter(cands)), None
    runners = {k: onnx_runner(m.SerializeToString()) for k, m in cands.items()}
    records = speedups_vs_dense(onnx_runner(dense.SerializeToString()), runners, inputs)
    best = max(records, key=lambda k: min(r["speedup"] for r in records[k]))
    return best, records[best]


@register_format("int8-onnx", "ONNX Runtime int8 quantization of the compact model (the fastest measured here)",
                 ".int8.onnx")
def write_int8_onnx(ctx: ExportContext, out_path: Path, options: ExportOptions) -> dict[str, Any]:
    notes = []
    try:
        base, counts = compact_model(ctx, options, matmul=True)
        source = "compact-onnx"
    except UnsupportedGraphError as exc:
        base, counts = reference_model(ctx, "int8-onnx", options), None
        source = "onnx"
        notes.append(f"not compacted ({exc.what}); quantized the dense graph")
    cands = candidates(base, ctx.samples)
    chosen, speed = pick_fastest(reference_model(ctx, "onnx", options), cands, ctx.samples)
    slow = slower_than_dense(speed or [])
    if slow and options.skip_slow:
        raise UnsupportedGraphError(f"slower than the dense model on this machine ({DESCRIBE[chosen]}, the "
                                    f"fastest form: {describe_slow(slow)}, below {MIN_SPEEDUP}×); nothing was "
                                    "written", where="int8-onnx",
                                    fix="--format int8-onnx writes it anyway (flagged); compressed --precision "
                                        "int8 gives a small file")
    model = cands[chosen]
    set_metadata(model, metadata_for(ctx, "int8-onnx", opset=options.opset, precision="int8",
                                     extra={"quantized_from": source, "compaction": counts,
                                            "quantization": chosen,
                                            "exporter": f"onnxruntime.quantization.quantize_{chosen}"}))
    save_onnx_atomic(model, out_path)
    notes.append(DESCRIBE[chosen] + (f" (measured faster than {', '.join(k for k in cands if k != chosen)})"
                                      if len(cands) > 1 else ""))
    return {"precision": "int8", "notes": notes, "quantized_from": source, "quantization": chosen,
            "speed_vs_dense": speed}
