"""The run-dir contract: a training run writes exactly the files ``RunDir`` lists, and every ``RunDir``
reader gives back what training wrote (values, not just existence); bad run dirs are one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

import sparsekit
from sparsekit.checkpoint import load_checkpoint
from sparsekit.config import TrainConfig
from sparsekit.errors import InputError
from sparsekit.run_dir import RunDir
from sparsekit.training import Callbacks, train

CONFIG = TrainConfig(model="mlp", model_kwargs={"hidden": [16]}, data="synthetic", method="rigl", sparsity=0.8,
                     epochs=2, batch_size=64, seed=3, device="cpu",
                     method_options={"update_interval": 4})


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Any]:
    """One short run, with what the trainer handed out while writing it (epochs, final model, masks)."""
    seen: dict[str, Any] = {"epochs": []}

    def on_end(payload: dict[str, Any]) -> None:
        seen["weights"] = {k: v.detach().clone() for k, v in payload["model"].state_dict().items()}
        seen["masks"] = {k: v.detach().clone() for k, v in payload["sparsifier"].masks().items()}
        seen["model"] = payload["model"]

    run = RunDir(tmp_path_factory.mktemp("contract") / "run")
    seen["summary"] = train(CONFIG, run.path, callbacks=Callbacks(on_epoch=seen["epochs"].append, on_end=on_end))
    seen["run"] = run
    return seen


def test_a_training_run_holds_exactly_the_files_run_dir_lists(trained):
    run: RunDir = trained["run"]
    assert sorted(p.name for p in run.path.iterdir()) == sorted(RunDir.FILES)
    paths = [run.config_file, run.metrics_file, run.updates_file, run.checkpoint_file, run.weights_file,
             run.masks_file, run.onnx_file, run.samples_file, run.summary_file]
    assert [p.name for p in paths] == list(RunDir.FILES) and all(p.parent == run.path for p in paths)
    assert run.is_run_dir() and not RunDir(run.path / "nowhere").is_run_dir()
    assert (run.export_dir, run.viz_dir) == (run.path / RunDir.EXPORT, run.path / RunDir.VIZ)


def test_readers_return_what_training_wrote(trained):
    run: RunDir = trained["run"]
    summary = trained["summary"]
    assert run.summary() == summary and summary["steps"] > 0
    assert run.config() == {**CONFIG.to_dict(), "sparsekit_version": sparsekit.__version__}
    assert run.metrics() == trained["epochs"] and [m["epoch"] for m in run.metrics()] == [1, 2]
    assert run.metrics()[-1]["step"] == summary["steps"]
    updates = run.updates()
    assert updates[0]["step"] == 0 and len(updates) > 1 and all(u["step"] <= summary["steps"] for u in updates)
    final = {ly["name"]: ly["active"] for ly in summary["layers"]}
    assert updates[-1]["active"] == {k: final[k] for k in updates[-1]["active"]}
    masks = run.masks()
    assert masks.keys() == trained["masks"].keys()
    assert all(m.dtype == bool and np.array_equal(m, trained["masks"][k].numpy()) for k, m in masks.items())
    weights = run.weights()
    assert weights.keys() == trained["weights"].keys()
    assert all(torch.equal(w, trained["weights"][k]) for k, w in weights.items())
    tensors, meta = load_checkpoint(run.checkpoint_file)
    assert meta["step_count"] == summary["steps"]
    assert all(torch.equal(tensors[f"model/{k}"], w) for k, w in weights.items())


def test_samples_and_reference_model_agree_with_the_trained_model(trained):
    run: RunDir = trained["run"]
    samples = run.samples()
    assert samples is not None and samples.x.dtype == np.float32 and samples.y is not None
    assert len(samples.x) == len(samples.y) == len(samples.logits) > 0
    with torch.no_grad():
        torch_logits = trained["model"](torch.from_numpy(samples.x)).numpy()
    bound = 1e-5 * max(1.0, float(np.abs(torch_logits).max()))
    assert float(np.abs(samples.logits - torch_logits).max()) <= bound
    assert samples.reference_accuracy == float((torch_logits.argmax(-1) == samples.y).mean())
    model = run.onnx_model()
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: samples.x})[0]
    assert float(np.abs(got - samples.logits).max()) <= bound


def test_save_writes_the_contract_without_training_state(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = sparsekit.sparsify(model, opt, "static", sparsity=0.5, total_steps=1, seed=0)
    x = torch.randn(10, 6)
    summary = sparsekit.save(model, sp, tmp_path / "mine", example_input=x)
    run = RunDir(tmp_path / "mine")
    assert sorted(p.name for p in run.path.iterdir()) == sorted(set(RunDir.FILES) - {RunDir.CHECKPOINT,
                                                                                      RunDir.METRICS})
    assert run.summary() == json.loads(json.dumps(summary)) and run.metrics() == []
    assert run.config()["method"] == "static" and run.updates()[0]["step"] == 0


def _error(call) -> InputError:
    with pytest.raises(InputError) as err:
        call()
    return err.value


def test_missing_and_malformed_files_are_one_line_errors(tmp_path):
    run = RunDir(tmp_path)
    err = _error(run.summary)
    assert err.message == (f"{tmp_path} has no summary.json ({tmp_path}); "
                           "fix: give a finished sparsekit run directory (train it first)")
    assert (run.metrics(), run.updates(), run.masks(), run.samples()) == ([], [], {}, None)
    assert "has no weights.safetensors" in _error(run.weights).message
    run.summary_file.write_text("{not json")
    err = _error(run.summary)
    assert err.what.startswith("cannot read summary.json") and err.where == str(run.summary_file)
    run.config_file.write_text("[1, 2]")
    assert _error(run.config).what == "config.json is not a JSON object"
    run.metrics_file.write_text('{"step": 1}\n{"step": 2}\n{"st')  # a torn last line from a crash
    assert run.metrics() == [{"step": 1}, {"step": 2}]
    run.masks_file.write_bytes(b"\x00garbage")
    assert _error(run.masks).what.startswith("cannot read masks")
    np.savez(run.samples_file, x=np.zeros((3, 2), np.float32), logits=np.zeros((2, 2), np.float32))
    assert _error(run.samples).what == "samples.npz arrays x, y, logits have different lengths"
    run.onnx_file.write_bytes(b"not onnx")
    err = _error(run.onnx_model)
    assert err.what.startswith("cannot read model.onnx") and err.where == str(run.onnx_file)
    assert Path(err.where).name == RunDir.ONNX
