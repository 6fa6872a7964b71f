"""The one-step model of a recurrent run (``--format fast`` on a model with a ``step`` method, e.g. the zoo's
``char-gru``/``char-lstm``): ``model.step.onnx``, the dense step exported from torch (inputs ``input`` (N, 1)
symbol codes, ``h`` (layers, N, hidden)[, ``c``]; outputs ``logits`` (N, 1, vocab), ``h_out``[, ``c_out``]), and
``model.step.fast.onnx``, its fast artifact. Both are checked against the torch model stepping the same state,
step after step along a sequence; the fast one keeps its recurrent layers dense where sparse is not faster.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from sparsekit.errors import ValidationError
from sparsekit.fileio import atomic_path

CHECK_STEPS = 6  # validation: steps along one sequence, at batch 1 and 3


class StepModule(nn.Module):
    """``model.step`` as a module's forward (what torch's exporter traces)."""

    def __init__(self, model: nn.Module, lstm: bool) -> None:
        super().__init__()
        self.model, self.lstm = model, lstm

    def forward(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        return self.model.step(x, h, c) if self.lstm else self.model.step(x, h)


def torch_model_of(ctx) -> nn.Module | None:
    """The run's torch model with its final weights; None for an archive, a graph without a GRU/LSTM node, or a
    model without ``step``."""
    if getattr(ctx, "source_kind", "") != "run" or not any(
            n.op_type in ("GRU", "LSTM") for n in ctx.model.graph.node):
        return None
    from sparsekit.models import build_model
    from sparsekit.run_dir import RunDir

    cfg, data = ctx.summary.get("config", {}), ctx.summary.get("data", {})
    kwargs = dict(cfg.get("model_kwargs") or {})
    if "small_dense" in ctx.summary and "width" in ctx.summary["small_dense"]:
        kwargs["width"] = ctx.summary["small_dense"]["width"]
    model = build_model(cfg.get("model", ""), kwargs, input_shape=tuple(data.get("input_shape", ())),
                        num_classes=int(data.get("num_classes", 0)))
    if not callable(getattr(model, "step", None)) or not isinstance(getattr(model, "rnn", None), nn.RNNBase):
        return None
    model.load_state_dict(RunDir(ctx.source).weights())
    return model.eval()


def _state_shape(model: nn.Module, batch: int) -> tuple[int, int, int]:
    return model.rnn.num_layers, batch, model.rnn.hidden_size


def export_step(model: nn.Module, path: Path, opset: int) -> onnx.ModelProto:
    """The dense step model, exported by torch's dynamo exporter (batch dynamic), written to ``path``."""
    lstm = isinstance(model.rnn, nn.LSTM)
    state = torch.zeros(_state_shape(model, 2))
    args = (torch.zeros(2, 1), state, *((state.clone(),) if lstm else ()))
    batch = torch.export.Dim("batch")
    shapes = ({0: batch}, {1: batch}, *(({1: batch},) if lstm else ()))
    names = ["input", "h", *(["c"] if lstm else [])]
    outs = ["logits", "h_out", *(["c_out"] if lstm else [])]
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(StepModule(model, lstm), args, dynamo=True, opset_version=opset,
                                        input_names=names, output_names=outs, dynamic_shapes=shapes, optimize=True)
    finally:
        logger.setLevel(level)
    proto = program.model_proto
    with atomic_path(path) as tmp:
        onnx.save_model(proto, str(tmp))
    return proto


def _torch_steps(model: nn.Module, feeds: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    with torch.no_grad():
        return [[t.numpy() for t in model.step(*(torch.from_numpy(v) for v in f.values()))] for f in feeds]


def check_steps(model: nn.Module, run, where: str, seed: int = 0) -> dict[str, float]:
    """``run(feed) -> outputs`` against the torch model stepping the same state along a sequence (its own state
    fed back each step), at batch 1 and 3: every output within ``1e-5 * max(1, max |reference|)``."""
    from sparsekit.exporters.fast import TOLERANCE

    rng = np.random.default_rng(seed)
    lstm = isinstance(model.rnn, nn.LSTM)
    worst, bound = 0.0, 0.0
    for batch in (1, 3):
        state = [rng.standard_normal(_state_shape(model, batch)).astype(np.float32) * 0.5
                 for _ in range(2 if lstm else 1)]
        for _ in range(CHECK_STEPS):
            feed = {"input": rng.integers(0, model.vocab, (batch, 1)).astype(np.float32),
                    **dict(zip(["h", "c"], state, strict=False))}
            ref = _torch_steps(model, [feed])[0]
            got = run(feed)
            for r, g in zip(ref, got, strict=True):
                worst = max(worst, float(np.max(np.abs(np.asarray(g) - r))))
                bound = max(bound, TOLERANCE * max(1.0, float(np.max(np.abs(r)))))
            state = [np.asarray(s, np.float32) for s in ref[1:]]
    if not worst <= bound:
        raise ValidationError(f"step model differs from torch stepping by {worst:.3g} (allowed {bound:.3g})",
                              where=where, fix="please report this with the run attached")
    return {"max_abs_diff": worst, "bound": bound}


def step_speed(model, dense: onnx.ModelProto, torch_model: nn.Module) -> float:
    """Dense ONNX Runtime time / fast time of one step at batch 1, one thread (interleaved medians)."""
    from sparsekit.exporters.fast import _dense_reference
    from sparsekit.exporters.fast_graph_write import _medians

    sess = _dense_reference(dense, 1)
    state = np.zeros(_state_shape(torch_model, 1), np.float32)
    feed = {"input": np.zeros((1, 1), np.float32), "h": state,
            **({"c": state} if isinstance(torch_model.rnn, nn.LSTM) else {})}
    med = _medians({"dense": lambda: sess.run(None, feed), "fast": lambda: model.run(feed, threads=1)}, 41, 1)
    return med["dense"] / med["fast"]


def write_step_models(torch_model: nn.Module, fast_path: Path, *, opset: int, metadata: dict[str, str],
                      measure: bool) -> dict[str, Any]:
    """Write ``<stem>.step.onnx`` and ``<stem>.step.fast.onnx`` beside ``fast_path`` (``model.fast.onnx``), each
    checked against torch stepping; ``measure``: keep the recurrent layers dense when sparse is not faster."""
    from sparsekit.exporters.fast import _dense_reference
    from sparsekit.exporters.fast_graph import pack_graph
    from sparsekit.exporters.fast_graph_write import _planned

    from sparsekit.runtime.artifact import save

    stem = fast_path.name.removesuffix(".fast.onnx")
    dense_path, step_path = fast_path.with_name(f"{stem}.step.onnx"), fast_path.with_name(f"{stem}.step.fast.onnx")
    dense = export_step(torch_model, dense_path, opset)
    sess = _dense_reference(dense, 1)
    dense_check = check_steps(torch_model, lambda f: sess.run(None, f), str(dense_path))
    plan = {"tune": False, "calibrate": False, "threads": 1, "batch_size": 1, "tune_budget_s": 0.0}
    meta = {**metadata, "step_model": "1"}
    model, _ = _planned(pack_graph(dense), dense, meta, **plan)
    speedup, recurrent = (step_speed(model, dense, torch_model) if measure else None), "sparse"
    if speedup is not None and speedup < 1.0:
        alt, _ = _planned(pack_graph(dense, keep_rnn=False), dense, meta, **plan)
        alt_speedup = step_speed(alt, dense, torch_model)
        if alt_speedup > speedup:
            model, speedup, recurrent = alt, alt_speedup, "dense (ONNX Runtime: sparse was slower)"
    if speedup is not None and speedup < 1.0:  # never ship a step slower than the dense one
        return {"step_model": str(dense_path), "step_fast": None, "step_dense_check": dense_check,
                "step_speedup_batch1": speedup,
                "note": f"step models: {dense_path.name} (one generation step, state in and out); no sparse step "
                        f"model: it measured {speedup:.2f}x of dense ONNX Runtime at batch 1 on this machine"}
    check = check_steps(torch_model, lambda f: model.run(f), str(step_path))
    onnx.checker.check_model(model.to_onnx(), full_check=True)
    save(model, step_path)
    return {"step_model": str(dense_path), "step_fast": str(step_path), "step_dense_check": dense_check,
            "step_fast_check": check, "step_speedup_batch1": speedup,
            "note": f"step models: {dense_path.name} and {step_path.name} (one generation step, state in and out; "
                    f"recurrent layers {recurrent}"
                    + (f", {speedup:.2f}x of dense ONNX Runtime at batch 1)" if speedup is not None else ")")}
