"""Every model of the zoo (``sparsekit models``), trained for one step at a tiny width, exports with
``--format all`` to ONNX files that pass ``onnx.checker``'s full check and strict shape inference — what
converters, optimizers and other runtimes run before they accept a file — and its ``sparse-onnx`` file
stores the masked weights sparse, runs in ONNX Runtime like the dense model and is smaller."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from tolerances import assert_fp32_close

from sparsekit.models import list_models

IMAGES = ["--data", "synthetic-image:n=32,test=16,size=8,channels=3", "--model-kwargs", "width=0.125"]
TEXT = ["--model-kwargs", "width=0.0625", "--seq-len", "8"]
TINY = {  # data and widths per model: seconds of training and export each
    "mlp": ["--data", "synthetic:n=32,test=16", "--model-kwargs", "hidden=16,8"],
    "lenet300": ["--data", "synthetic:n=32,test=16", "--model-kwargs", "width=0.05"],
    "lenet5": ["--data", "synthetic-image:n=32,test=16,size=16", "--model-kwargs", "width=0.25"],
    "resnet20": IMAGES,
    "wrn-22-2": IMAGES,
    "mobilenet-v1": IMAGES,
    "resnet18": [*IMAGES, "--model-kwargs", "stem=cifar"],
    "resnet50": ["--data", "synthetic-image:n=32,test=16,size=16,channels=3", "--model-kwargs", "width=0.0625"],
    "mobilenet-v2": ["--data", "synthetic-image:n=32,test=16,size=16,channels=3", "--model-kwargs", "width=0.125"],
    "char-gru": TEXT,
    "char-lstm": TEXT,
    "char-transformer": TEXT,
}
FP32_FORMATS = {"onnx", "sparse-onnx", "compact-onnx", "compressed", "fast"}


def test_every_zoo_model_is_covered():
    assert sorted(TINY) == sorted(m["name"] for m in list_models())


def strict_check(path: Path) -> None:
    onnx.checker.check_model(str(path), full_check=True)
    onnx.shape_inference.infer_shapes(onnx.load(str(path)), check_type=True, strict_mode=True)


def ort_outputs(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def train_tiny(cli, tmp_path: Path, name: str) -> Path:
    """A one-step RigL 80% run of zoo model ``name`` at its tiny size (``TINY``); returns the run dir."""
    args = TINY[name]
    if name.startswith("char-"):
        corpus = tmp_path / "corpus.txt"
        corpus.write_text("the quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
        args = ["--data", f"text:{corpus}", *args]
    run = tmp_path / "run"
    res = cli(["train", "--model", name, *args, "--method", "rigl", "--sparsity", "0.8", "--steps", "1",
               "--batch-size", "8", "--device", "cpu", "--out", str(run), "-q"])
    assert res.exit_code == 0, res.stderr
    return run


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TINY))
def test_zoo_model_exports_strictly_valid_onnx(cli, tmp_path, name):
    run = train_tiny(cli, tmp_path, name)
    # --warn-only: a one-step model's int8 form may miss the agreement rule; the files are what is tested
    res = cli(["export", str(run), "--format", "all", "--warn-only", "--json"])
    assert res.exit_code == 0, res.stderr
    out = run / "export"
    for art in json.loads((out / "export_report.json").read_text())["artifacts"]:
        if art["format"] in FP32_FORMATS and art["precision"] == "fp32":
            assert art["status"] in ("ok", "refused"), art  # refused: compact/fast take MLP chains only
    files = sorted(out.glob("*.onnx"))
    assert {"model.onnx", "model.sparse.onnx"} <= {p.name for p in files}
    for path in files:
        strict_check(path)

    sparse = onnx.load(str(out / "model.sparse.onnx"))
    constants = {n.output[0] for n in sparse.graph.node if n.op_type == "Constant"
                 and n.attribute[0].name == "sparse_value"}
    # every masked weight the graph holds under its own name (RNN weights are stored re-packed, found
    # by their zeros instead) is a sparse constant, none a sparse initializer
    masked = {ly["name"] for ly in json.loads((run / "summary.json").read_text())["layers"] if ly.get("prunable")}
    dense_names = {t.name for t in onnx.load(str(out / "model.onnx")).graph.initializer}
    assert constants and masked & dense_names <= constants and not sparse.graph.sparse_initializer
    assert (out / "model.sparse.onnx").stat().st_size < (out / "model.onnx").stat().st_size
    x = np.load(run / "samples.npz")["x"]
    assert_fp32_close(ort_outputs(out / "model.sparse.onnx", x), ort_outputs(out / "model.onnx", x))
