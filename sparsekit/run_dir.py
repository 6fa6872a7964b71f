"""The run directory: the one contract between training and everything after it.

``RunDir`` names every file a run leaves behind and reads each of them back; training's writers
(``sparsekit.run_writer``) and every reader (export, report, viz, compare, resume, ``--init-from``) go
through it, so a file name is spelled once.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sparsekit.errors import InputError

_RETRAIN = "re-run training to rewrite the run dir"


Inputs = np.ndarray | dict[str, np.ndarray]  # one model input, or several by ONNX input name


@dataclass
class Samples:
    """Real inputs from the run's dataset and the torch model's outputs on them (the reference)."""

    x: Inputs                     # [n, ...] float32 (or integer token ids / bool); a dict for several inputs
    y: np.ndarray | None          # int64 [n] labels, when the task has them
    logits: np.ndarray            # float32 [n, classes], torch reference outputs for x

    @property
    def count(self) -> int:
        return len(self.logits)

    @property
    def reference_accuracy(self) -> float | None:
        if self.y is None or self.logits.ndim != self.y.ndim + 1:
            return None
        return float((self.logits.argmax(-1) == self.y).mean())  # LM: (n, T, V) logits vs (n, T) targets


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines log; [] when it does not exist; a torn last line (crash) ends it."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return out


def _sample_inputs(data: Any, path: Path) -> Inputs:
    """``x`` (one input), or ``input_names`` with ``x_0``, ``x_1``, ...: floats as float32, integers and bool as
    stored (token ids keep their dtype, as the ONNX graph's inputs do)."""
    if "input_names" not in data.files:
        return _input_array(data["x"], "x", path)
    names = [str(n) for n in np.asarray(data["input_names"]).reshape(-1)]
    if not names or len(set(names)) != len(names) or not all(n.isidentifier() for n in names):
        raise InputError(f"{RunDir.SAMPLES} has bad input_names {names[:5]}", where=str(path), fix=_RETRAIN)
    return {n: _input_array(data[f"x_{i}"], f"x_{i}", path) for i, n in enumerate(names)}


def _input_array(a: np.ndarray, key: str, path: Path) -> np.ndarray:
    if a.dtype.kind == "f":
        return np.asarray(a, dtype=np.float32)
    if a.dtype.kind in "iub":
        return np.asarray(a)
    raise InputError(f"{RunDir.SAMPLES} array {key} has dtype {a.dtype}", where=str(path),
                     fix=f"{RunDir.SAMPLES} inputs are float, integer or bool arrays; re-run training")


class RunDir:
    """A run directory: one name, one path and one reader per file.

    Each file, its path property, what it holds, who writes it → who reads it:

    - ``config.json`` (``config_file``): the resolved config (reproduces the run); the first file a run
      writes (``rundir.prepare_run_dir``, ``sparsekit.save``) → ``--resume`` (settings check), ``compare``
      (reuse of a finished run), ``--overwrite`` (``is_run_dir``).
    - ``metrics.jsonl`` (``metrics_file``): one line per epoch (training) → ``viz`` (curves),
      ``rundir.finish_run`` (best accuracy), ``--resume`` (lines after the checkpoint are dropped).
    - ``updates.jsonl`` (``updates_file``): one line per mask update: active counts per layer, first-layer
      input fan-out (training, ``sparsekit.save``) → ``viz`` (connectivity), ``rundir.finish_run``
      (training FLOPs), ``--resume``.
    - ``checkpoint.safetensors`` (``checkpoint_file``): weights, masks, optimizer/method/RNG state + JSON
      state, written atomically (training) → ``--resume`` (``sparsekit.checkpoint``).
    - ``weights.safetensors`` (``weights_file``): final weights, masked entries exactly 0
      (``rundir.write_artifacts``) → ``--init-from``.
    - ``masks.safetensors`` (``masks_file``): final masks (uint8) keyed by parameter name
      (``rundir.write_artifacts``) → export, report, ``--init-from``.
    - ``model.onnx`` (``onnx_file``): the dense fp32 reference graph, no user code needed
      (``rundir.write_artifacts``) → export, report.
    - ``samples.npz`` (``samples_file``): x, y, logits: test samples and the torch model's outputs on them
      (a model with several inputs: ``input_names`` and ``x_0``, ``x_1``, ... in their place)
      (``rundir.write_artifacts``) → export (validation), report (accuracy), ``viz`` (mean input image).
    - ``summary.json`` (``summary_file``): the versioned summary, checked against
      ``sparsekit/schemas/summary.schema.json``; the last file a run writes (``rundir.finish_run``,
      ``sparsekit.save``) → export, report, ``viz``, ``compare``.
    - ``export/`` (``export_dir``): ``sparsekit export``'s default output → ``sparsekit report``.
    - ``viz/`` (``viz_dir``): ``sparsekit viz``'s default output (figures, for people).

    A ``sparsekit train`` run holds every file of ``FILES``; ``sparsekit.save`` writes all but
    ``CHECKPOINT`` and ``METRICS``. Readers raise ``InputError`` (what, where, fix) for a missing
    required file or a malformed one; the optional files (logs, masks, samples) read as empty or None.
    """

    CONFIG = "config.json"
    METRICS = "metrics.jsonl"
    UPDATES = "updates.jsonl"
    CHECKPOINT = "checkpoint.safetensors"
    WEIGHTS = "weights.safetensors"
    MASKS = "masks.safetensors"
    ONNX = "model.onnx"
    SAMPLES = "samples.npz"
    SUMMARY = "summary.json"
    FILES = (CONFIG, METRICS, UPDATES, CHECKPOINT, WEIGHTS, MASKS, ONNX, SAMPLES, SUMMARY)
    EXPORT = "export"
    VIZ = "viz"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # ------------------------------------------------------------------ paths

    @property
    def config_file(self) -> Path:
        return self.path / self.CONFIG

    @property
    def metrics_file(self) -> Path:
        return self.path / self.METRICS

    @property
    def updates_file(self) -> Path:
        return self.path / self.UPDATES

    @property
    def checkpoint_file(self) -> Path:
        return self.path / self.CHECKPOINT

    @property
    def weights_file(self) -> Path:
        return self.path / self.WEIGHTS

    @property
    def masks_file(self) -> Path:
        return self.path / self.MASKS

    @property
    def onnx_file(self) -> Path:
        return self.path / self.ONNX

    @property
    def samples_file(self) -> Path:
        return self.path / self.SAMPLES

    @property
    def summary_file(self) -> Path:
        return self.path / self.SUMMARY

    @property
    def export_dir(self) -> Path:
        return self.path / self.EXPORT

    @property
    def viz_dir(self) -> Path:
        return self.path / self.VIZ

    def is_run_dir(self) -> bool:
        """Whether sparsekit wrote this directory (config.json is the first file a run writes)."""
        return self.config_file.is_file()

    # ------------------------------------------------------------------ readers

    def _json_object(self, path: Path, fix_missing: str) -> dict[str, Any]:
        if not path.is_file():
            raise InputError(f"{self.path} has no {path.name}", where=str(self.path), fix=fix_missing)
        try:
            value = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"cannot read {path.name}: {exc}", where=str(path), fix=_RETRAIN) from exc
        if not isinstance(value, dict):
            raise InputError(f"{path.name} is not a JSON object", where=str(path), fix=_RETRAIN)
        return value

    def summary(self) -> dict[str, Any]:
        return self._json_object(self.summary_file, "give a finished sparsekit run directory (train it first)")

    def config(self) -> dict[str, Any]:
        return self._json_object(self.config_file, "give a sparsekit run directory")

    def metrics(self) -> list[dict[str, Any]]:
        """One record per epoch; [] when there are none."""
        return read_jsonl(self.metrics_file)

    def updates(self) -> list[dict[str, Any]]:
        """One record per mask update; [] when there are none."""
        return read_jsonl(self.updates_file)

    def masks(self) -> dict[str, np.ndarray]:
        """Boolean masks keyed by parameter name; {} without a masks file (a dense model)."""
        if not self.masks_file.exists():
            return {}
        from safetensors.numpy import load_file

        try:
            return {k: np.asarray(v).astype(bool) for k, v in load_file(str(self.masks_file)).items()}
        except Exception as exc:  # safetensors raises its own error types
            raise InputError(f"cannot read masks: {exc}", where=str(self.masks_file), fix=_RETRAIN) from exc

    def weights(self) -> dict[str, Any]:
        """The final state dict as torch tensors (dtypes as saved)."""
        if not self.weights_file.is_file():
            raise InputError(f"{self.path} has no {self.WEIGHTS}", where=str(self.path),
                             fix="give a finished sparsekit run directory")
        from safetensors.torch import load_file

        try:
            return load_file(str(self.weights_file))
        except Exception as exc:  # safetensors raises its own error types
            raise InputError(f"cannot read weights: {exc}", where=str(self.weights_file), fix=_RETRAIN) from exc

    def samples(self) -> Samples | None:
        """The reference samples; None without a samples file (outputs are then validated 'unavailable')."""
        path = self.samples_file
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                x = _sample_inputs(data, path)
                logits = np.asarray(data["logits"], dtype=np.float32)
                y = np.asarray(data["y"]).astype(np.int64) if "y" in data.files else None
                if y is not None and y.size == 0 and len(logits):  # written without labels
                    y = None
        except (OSError, ValueError, KeyError) as exc:
            raise InputError(f"cannot read samples: {exc}", where=str(path),
                             fix=f"{self.SAMPLES} needs arrays x (float32) and logits; re-run training") from exc
        n = len(logits)
        if any(len(a) != n for a in (x.values() if isinstance(x, dict) else [x])) or (y is not None and len(y) != n):
            raise InputError(f"{self.SAMPLES} arrays x, y, logits have different lengths", where=str(path),
                             fix=_RETRAIN)
        return Samples(x, y, logits)

    def onnx_model(self) -> Any:
        """The dense fp32 reference as an ``onnx.ModelProto``."""
        import onnx

        try:
            return onnx.load(str(self.onnx_file))
        except Exception as exc:  # protobuf DecodeError and friends
            raise InputError(f"cannot read {self.ONNX}: {exc}", where=str(self.onnx_file), fix=_RETRAIN) from exc
