"""Training's side of the run directory: prepare it, append the logs, write the final artifacts and
the summary (also for ``sparsekit.save``). The files, their names and their
readers are ``sparsekit.run_dir.RunDir``'s (the contract between training and export, report, viz).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

import sparsekit
from sparsekit.config import TrainConfig
from sparsekit.errors import InputError
from sparsekit.fileio import atomic_path, atomic_write_json, atomic_write_text
from sparsekit.model_inputs import ModelInputs, as_model_inputs, io_record
from sparsekit.model_io import check_against_model
from sparsekit.run_dir import RunDir, read_jsonl

if TYPE_CHECKING:
    from sparsekit.methods import Method

SCHEMA_VERSION = "1.0"
N_SAMPLES = 512
N_SAMPLES_SEQUENCE = 8  # LM logits are (n, T, vocab): 8 windows of 512 x 256 floats are already 4 MB
# Settings that may differ between an interrupted command and its --resume without changing the result.
_RESUME_FREE = {"device", "checkpoint_every", "eval_batch_size", "workers"}  # none changes the result
# Settings added after runs were saved without them: a saved config that lacks one had this value.
_ADDED_LATER = {"granularity": "unstructured"}


def check_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse an existing run directory without --resume/--overwrite (nothing is written)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError(f"output path {run_dir} exists and is not a directory", where="--out",
                         fix="choose another --out")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not (resume or overwrite):
        raise InputError(f"run directory {run_dir} already exists", where="--out",
                         fix="pass --resume to continue it, --overwrite to replace it, or choose another --out")


def prepare_run_dir(run_dir: Path, config: TrainConfig, *, resume: bool, overwrite: bool) -> Path | None:
    """Create or check ``run_dir``. Returns the checkpoint to resume from, if any.

    Never overwrites without ``overwrite``; with ``resume`` a compatible checkpoint continues the run and
    a missing one starts fresh (so torchrun's restarts can rerun the same command).
    """
    check_run_dir(run_dir, resume=resume, overwrite=overwrite)
    run = RunDir(run_dir)
    existing = run_dir.is_dir() and any(run_dir.iterdir())
    if existing and resume:
        remove_stale_temporaries(run_dir)
    if existing and resume and run.checkpoint_file.is_file():
        saved = run.config() if run.config_file.is_file() else {}
        mine = config.to_dict()
        diff = sorted(k for k in mine if k not in _RESUME_FREE and saved.get(k, _ADDED_LATER.get(k)) != mine[k])
        if diff:
            raise InputError(f"the checkpoint in {run_dir} was made with different settings "
                             f"({', '.join(diff)})", where="--resume",
                             fix="rerun the original command, or pass --overwrite to start again")
        return run.checkpoint_file
    if existing and overwrite:
        if not run.is_run_dir():
            raise InputError(f"{run_dir} is not empty and is not a sparsekit run directory", where="--out",
                             fix="choose an empty or new --out; sparsekit only replaces its own run directories")
        shutil.rmtree(run_dir)
    if existing and resume and not overwrite:  # a run dir without checkpoint: start it again cleanly
        if not run.is_run_dir():
            raise InputError(f"{run_dir} is not empty and is not a sparsekit run directory", where="--out",
                             fix="choose an empty or new --out")
        shutil.rmtree(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise InputError(f"cannot write to {run_dir}: {exc.strerror or exc}", where="--out",
                         fix="choose a writable output directory") from exc
    atomic_write_json(run.config_file, {**config.to_dict(), "sparsekit_version": sparsekit.__version__})
    return None


def remove_stale_temporaries(run_dir: Path) -> None:
    """Delete temporary files of atomic writes that a killed process left behind (``.NAME.*.tmp``)."""
    for p in run_dir.glob(".*.tmp"):
        if p.is_file():
            p.unlink(missing_ok=True)


def build_run_model(config: TrainConfig, data: Any, method: Method) -> tuple[nn.Module, dict[str, Any] | None]:
    """Seed, then build the model (methods that change the width, like small-dense, pick it here)."""
    from sparsekit.models import build_model

    kwargs, width_info = method.choose_model_kwargs(config, data)
    torch.manual_seed(config.seed)
    model = build_model(config.model, kwargs, input_shape=tuple(data.input_shape), num_classes=data.num_classes)
    return model, width_info


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def truncate_logs(run_dir: Path, *, step: int) -> None:
    """After a resume: drop log lines written after the checkpoint's step (they will be redone)."""
    run = RunDir(run_dir)
    for path in (run.metrics_file, run.updates_file):
        _write_jsonl(path, [r for r in read_jsonl(path) if r.get("step", 0) <= step])


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    with open(RunDir(run_dir).metrics_file, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


def write_updates(run_dir: Path, entries: list[dict[str, Any]]) -> None:
    if entries:
        with open(RunDir(run_dir).updates_file, "a", encoding="utf-8") as fh:
            for e in entries:
                fh.write(json.dumps(e) + "\n")


def parameter_counts(model: nn.Module, layers: list[dict[str, Any]]) -> dict[str, int]:
    """total = every parameter; prunable = size of the prunable set; nonzero = active prunable + dense."""
    total = sum(p.numel() for p in model.parameters())
    prunable = sum(ly["numel"] for ly in layers if ly["prunable"])
    active = sum(ly["active"] for ly in layers if ly["prunable"])
    return {"total": int(total), "prunable": int(prunable), "nonzero": int(total - prunable + active)}


def overall_sparsity(layers: list[dict[str, Any]]) -> float:
    """Sparsity over all weight matrices (prunable or dense), from the masks."""
    size = sum(ly["numel"] for ly in layers)
    active = sum(ly["active"] for ly in layers)
    return 0.0 if size == 0 else 1.0 - active / size


@torch.no_grad()
def write_artifacts(run_dir: Path, model: nn.Module, masks: dict[str, torch.Tensor], x: torch.Tensor | ModelInputs,
                    y: torch.Tensor | None, metadata: dict[str, Any], n_samples: int = N_SAMPLES) -> dict[str, Any]:
    """Final weights, masks, the dense ONNX reference and reference samples (what export needs)."""
    from safetensors.torch import save_file

    from sparsekit.onnx_export import export_dense_onnx

    run = RunDir(run_dir)
    model_cpu = model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    xs = as_model_inputs(x, model).take(0, n_samples)
    logits = model_outputs(model, xs.to(device))
    try:  # first: a model torch cannot export leaves no other file behind
        info = export_dense_onnx(model.cpu(), xs, run.onnx_file, metadata=metadata)
    finally:
        model.to(device)
    state = {k: v.detach().cpu().contiguous() for k, v in model_cpu.state_dict().items()}
    with atomic_path(run.weights_file) as tmp:
        save_file(state, str(tmp))
    with atomic_path(run.masks_file) as tmp:
        save_file({k: v.detach().cpu().to(torch.uint8).contiguous() for k, v in masks.items()}, str(tmp))
    labels = y[:n_samples].cpu().numpy().astype(np.int64) if y is not None else np.zeros(0, dtype=np.int64)
    with atomic_path(run.samples_file) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **sample_arrays(xs), y=labels, logits=logits.numpy().astype(np.float32))
    return info


def model_outputs(model: nn.Module, inputs: ModelInputs) -> torch.Tensor:
    """The model's output on ``inputs`` (one tensor of logits), on the CPU."""
    out = inputs.call(model)
    if not isinstance(out, torch.Tensor):
        raise InputError(f"the model returns a {type(out).__name__}; sparsekit needs one tensor of outputs (logits)",
                         where="save(model=...)", fix="wrap the model so that forward returns the logits tensor")
    return out.detach().float().cpu()


def sample_arrays(inputs: ModelInputs) -> dict[str, np.ndarray]:
    """samples.npz's inputs: ``x`` for one input; ``input_names`` and ``x_0``, ``x_1``, ... for several."""
    arrays = inputs.arrays()
    if isinstance(arrays, np.ndarray):
        return {"x": arrays}
    return {"input_names": np.array(list(arrays)), **{f"x_{i}": a for i, a in enumerate(arrays.values())}}


def build_summary(*, run_dir: Path, model: nn.Module, sparsifier: Any, method: str, config: dict[str, Any],
                  test_loss: float | None, test_accuracy: float | None, train_seconds: float,
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    layers = sparsifier.layer_summary()
    summary: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "sparsekit_version": sparsekit.__version__,
        "task": "classification",
        "method": method,
        "distribution": sparsifier.distribution if sparsifier.method.sparse else None,
        "granularity": sparsifier.granularity.spec,
        "target_sparsity": sparsifier.target_sparsity if sparsifier.method.sparse else 0.0,
        "realized_sparsity": sparsifier.realized_sparsity(),
        "overall_sparsity": overall_sparsity(layers),
        "layers": layers,
        "params": parameter_counts(model, layers),
        "test_accuracy": test_accuracy,
        "test_loss": test_loss,
        "train_seconds": train_seconds,
        "steps": sparsifier.step_count,
        "run_dir": str(run_dir),
        "config": config,
        "method_summary": sparsifier.method.summary(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    summary.update(extra or {})
    return summary


def onnx_metadata(summary: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """metadata_props of the reference ONNX file: what made it, how sparse it is, how to feed it."""
    from sparsekit.model_io import to_metadata

    return {"sparsekit_version": sparsekit.__version__, "method": summary["method"],
            "target_sparsity": summary["target_sparsity"], "realized_sparsity": summary["realized_sparsity"],
            "layer_density": {ly["name"]: ly["density"] for ly in summary["layers"]},
            "source_run": str(run_dir), "test_accuracy": summary.get("test_accuracy"),
            **to_metadata(summary.get("io"))}


def finish_run(run_dir: Path, *, config: TrainConfig, model: nn.Module, sparsifier: Any, data: Any,
               test_loss: float, test_accuracy: float, train_seconds: float, total_steps: int,
               width_info: dict[str, Any] | None, wall_seconds: float, device: torch.device,
               world_size: int = 1, start: dict[str, Any] | None = None) -> dict[str, Any]:
    from sparsekit import flops as flops_mod
    from sparsekit.model_io import from_dataset
    from sparsekit.tasks import task_of

    task = task_of(data)
    run = RunDir(run_dir)
    extra: dict[str, Any] = {
        "task": task.name,
        **task.extra_metrics(test_loss),
        "model": config.model,
        "data": data.info(),
        "io": from_dataset(data),
        "seed": config.seed,
        "epochs": config.epochs,
        "total_steps": total_steps,
        "device": str(device),
        "world_size": world_size,
        "wall_seconds": wall_seconds,
        # over the epoch ends and the final evaluation (a --steps run may end mid-epoch)
        "best_test_accuracy": max([*(m["test_accuracy"] for m in run.metrics()), test_accuracy]),
        "start": start if start is not None else sparsifier.start_summary(),
    }
    if width_info is not None:
        extra["small_dense"] = width_info
    extra["flops"] = flops_mod.run_flops(model, sparsifier, input_shape=tuple(data.input_shape), config=config,
                                          updates=run.updates())
    summary = build_summary(run_dir=run_dir, model=model, sparsifier=sparsifier, method=config.method,
                            config=config.to_dict(), test_loss=test_loss, test_accuracy=test_accuracy,
                            train_seconds=train_seconds, extra=extra)
    meta = onnx_metadata(summary, run_dir)
    n_samples = N_SAMPLES_SEQUENCE if task.name == "language-modeling" else N_SAMPLES
    summary["onnx"] = write_artifacts(run_dir, model, sparsifier.masks(), data.x_test, data.y_test, meta,
                                      n_samples=n_samples)
    validate_summary(summary)
    atomic_write_json(run.summary_file, summary)
    return summary


def save(model: nn.Module, sparsifier: Any, run_dir: str | Path, *, example_input: Any,
         labels: torch.Tensor | None = None, test_accuracy: float | None = None, test_loss: float | None = None,
         config: dict[str, Any] | None = None, overwrite: bool = True, dynamic_axes: dict[str, Any] | None = None,
         input_layout: str | dict[str, str] | None = None, normalization: dict[str, Any] | None = None,
         class_names: list[str] | None = None) -> dict[str, Any]:
    """Write a run directory from your own training loop, in the CLI's layout, so that
    ``sparsekit export``, ``sparsekit report`` and ``sparsekit viz`` accept it.

    ``example_input`` is a batch of real inputs: a tensor, a tuple of tensors (``forward``'s positional
    arguments) or a dict of tensors (keyword arguments); float, integer token ids or bool. Up to 512 samples
    are kept for validation (pass test data with ``labels`` for accuracy). Axis 0 of every input is a dynamic
    batch axis; ``dynamic_axes={"tokens": {1: "seq"}}`` makes more axes dynamic. ``input_layout``,
    ``normalization`` ({mean, std[, scale]}) and ``class_names`` go into every artifact's metadata (the layout
    is inferred from dtype and rank when not given). Metrics logged with ``sparsifier.log(...)`` become
    metrics.jsonl (curves) and the summary's test metrics."""
    path = Path(run_dir)
    run = RunDir(path)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise InputError(f"run directory {path} already exists", where="save()", fix="pass overwrite=True")
    inputs = as_model_inputs(example_input, model, dynamic_axes)
    io = io_record(inputs, layout=input_layout, normalization=normalization, class_names=class_names)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with torch.no_grad():
        n_outputs = model_outputs(model.eval(), inputs.take(0, 1).to(device)).shape[-1]
    first = next(iter(inputs.tensors.values()))
    check_against_model(io, n_classes=n_outputs, n_features=first.shape[-1] if len(inputs.tensors) == 1 else None,
                        where="save(class_names=, normalization=)")
    cfg = {"method": sparsifier.method.name, "method_options": dict(sparsifier.method.options),
           "sparsity": sparsifier.target_sparsity, "distribution": sparsifier.distribution,
           "seed": sparsifier.seed, **(config or {})}
    metrics = list(sparsifier.metrics_log)
    test_accuracy = _last_logged(metrics, "test_accuracy") if test_accuracy is None else test_accuracy
    test_loss = _last_logged(metrics, "test_loss") if test_loss is None else test_loss
    shapes = {k: list(v.shape[1:]) for k, v in inputs.tensors.items()}
    extra = {"model": type(model).__name__, "io": io,
             "input_shape": next(iter(shapes.values())) if len(shapes) == 1 else shapes,
             "start": sparsifier.start_summary(), **_logged_extras(metrics)}
    summary = build_summary(run_dir=path, model=model, sparsifier=sparsifier, method=sparsifier.method.name,
                            config=cfg, test_loss=test_loss, test_accuracy=test_accuracy, train_seconds=0.0,
                            extra=extra)
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    try:  # the reference ONNX first: a model torch cannot export leaves nothing behind
        summary["onnx"] = write_artifacts(path, model, sparsifier.masks(), inputs, labels, onnx_metadata(summary, path))
    except InputError:
        if created and not any(path.iterdir()):
            path.rmdir()
        raise
    atomic_write_json(run.config_file, {**cfg, "sparsekit_version": sparsekit.__version__})
    if not run.updates_file.exists():
        write_updates(path, sparsifier.update_log)
    if metrics:
        _write_jsonl(run.metrics_file, metrics)
    else:
        run.metrics_file.unlink(missing_ok=True)  # a stale log of an overwritten run would draw wrong curves
    validate_summary(summary)
    atomic_write_json(run.summary_file, summary)
    return summary


def _last_logged(metrics: list[dict[str, Any]], key: str) -> float | None:
    return next((m[key] for m in reversed(metrics) if m.get(key) is not None), None)


def _logged_extras(metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """The summary fields a CLI run derives from its metrics log: best test accuracy, epochs, train seconds."""
    out: dict[str, Any] = {}
    accs = [m["test_accuracy"] for m in metrics if m.get("test_accuracy") is not None]
    if accs:
        out["best_test_accuracy"] = max(accs)
    for key, name in (("epoch", "epochs"), ("seconds", "train_seconds")):
        last = _last_logged(metrics, key)
        if last is not None:
            out[name] = last
    return out


def metrics_record(sparsifier: Any, step: int | None, metrics: dict[str, Any]) -> dict[str, Any]:
    """One metrics.jsonl line for ``Sparsifier.log``: the step (default: steps taken), the realised sparsity and the
    given numbers (tensors of one element are read as numbers)."""
    record: dict[str, Any] = {"step": sparsifier.step_count if step is None else step}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, np.generic):
            value = value.item()
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise InputError(f"metric {key}={str(value)[:40]!r} is not a number", where="log()",
                             fix="log numbers (floats, ints or one-element tensors), e.g. log(test_accuracy=0.93)")
        record[key] = value
    if isinstance(record["step"], bool) or not isinstance(record["step"], int) or record["step"] < 0:
        raise InputError(f"step {record['step']!r} is not a step count", where="log(step=...)",
                         fix="pass the number of optimizer steps taken, or leave it out")
    record.setdefault("sparsity", sparsifier.realized_sparsity())
    return record


def validate_summary(summary: dict[str, Any]) -> None:
    """Check a summary against the committed JSON Schema (a bug here is an internal error)."""
    import jsonschema

    schema = json.loads((Path(__file__).parent / "schemas" / "summary.schema.json").read_text())
    jsonschema.validate(_jsonable(summary), schema)


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: None if isinstance(o, float) and math.isnan(o) else str(o)))
