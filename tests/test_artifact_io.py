"""Every artifact carries what a deployer needs: input layout, input normalisation, class names (issue 18.2)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from export_fixtures import MLP, make_run_dir, random_masks
from sparsekit.exporters.compressed import Archive
from sparsekit.exporters.pipeline import export
from test_data import make_image_folder

from sparsekit.data import load_dataset
from sparsekit.errors import InputError
from sparsekit.model_io import read_io
from sparsekit.run_dir import RunDir
from sparsekit.runtime import load as load_fast

FORMATS = "onnx,sparse-onnx,compact-onnx,int8-onnx,compressed,fast"
ONNX_FILES = ("model.onnx", "model.sparse.onnx", "model.compact.onnx", "model.int8.onnx", "model.fast.onnx")


def _train_and_export(cli, out: Path, *args: str) -> dict:
    res = cli(["train", *args, "--steps", "2", "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.stderr
    res = cli(["export", str(out), "--format", FORMATS, "--json"])
    assert res.exit_code == 0, res.stderr
    return json.loads((out / "summary.json").read_text())


def _props(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def _assert_everywhere(run: Path, expected: dict) -> None:
    """The run's own model.onnx, every exported ONNX file, the archive's manifest and the graph inside it."""
    files = [run / "model.onnx", *(run / "export" / f for f in ONNX_FILES)]
    for f in files:
        props = _props(f)
        assert props["sparsekit.input_layout"] == expected["input_layout"], f
        assert json.loads(props["sparsekit.input_normalization"]) == expected["input_normalization"], f
        assert json.loads(props["sparsekit.class_names"]) == expected["class_names"], f
        assert read_io(f) == expected, f
    archive = run / "export" / "model.skz"
    with zipfile.ZipFile(archive) as zf:
        manifest = json.loads(zf.read("manifest.json"))
        inner = onnx.load_model_from_string(zf.read("graph.onnx"))
    assert manifest["io"] == expected
    assert {p.key: p.value for p in inner.metadata_props}["sparsekit.input_layout"] == expected["input_layout"]
    assert read_io(archive) == expected
    assert load_fast(run / "export" / "model.fast.onnx").metadata["sparsekit.input_layout"] == \
        expected["input_layout"]


def test_default_run_records_layout_normalisation_and_digit_names(cli, tmp_path):
    summary = _train_and_export(cli, tmp_path / "run")
    data = load_dataset("digits")
    norm = data.normalization
    expected = {"input_layout": "NCHW", "class_names": [str(i) for i in range(10)],
                "input_normalization": {"mean": norm["mean"], "std": norm["std"], "scale": 1 / 16}}
    assert summary["io"] == expected
    _assert_everywhere(tmp_path / "run", expected)
    # the recorded recipe turns raw 0..16 digit scans into exactly what the model was trained and validated on
    from sklearn.datasets import load_digits

    raw = load_digits().images.astype(np.float64)[:, None]
    x = ((raw * expected["input_normalization"]["scale"] - norm["mean"]) / norm["std"]).reshape(len(raw), -1)
    samples = RunDir(tmp_path / "run").samples()
    for s in samples.x[:20]:  # every saved test sample is one of the raw scans after the recipe
        assert np.abs(x - s.reshape(1, -1)).max(axis=1).min() < 1e-5


def test_folder_run_records_the_class_to_index_mapping(cli, tmp_path):
    make_image_folder(tmp_path / "imgs", {"zebra": (250, 250, 250), "ant": (0, 0, 0), "mole": (120, 60, 10)})
    run = tmp_path / "run"
    summary = _train_and_export(cli, run, "--data", f"folder:{tmp_path / 'imgs'}", "--image-size", "8",
                                "--val-fraction", "0.25")
    norm = summary["data"]["normalization"]
    expected = {"input_layout": "NCHW", "class_names": ["ant", "mole", "zebra"],  # index order = sorted folders
                "input_normalization": {"mean": norm["mean"], "std": norm["std"], "scale": 1 / 255}}
    assert summary["io"] == expected
    _assert_everywhere(run, expected)
    # docs/deploy.md's recipe as written, on a raw PNG: it gives exactly the input the model was trained on
    ns = _run_deploy_snippet(run / "export" / "model.onnx", tmp_path / "imgs" / "mole" / "0.png", size=8)
    data = load_dataset(f"folder:{tmp_path / 'imgs'}", image_size=8, val_fraction=0.25)
    assert any(np.allclose(ns["x"][0], row, atol=1e-5) for row in np.concatenate([data.x_train, data.x_test]))
    assert ns["names"] == expected["class_names"] and ns["logits"].shape == (1, 3)


def _run_deploy_snippet(model: Path, image: Path, *, size: int) -> dict:
    text = (Path(__file__).resolve().parents[1] / "docs" / "deploy.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    code = code.replace('"runs/mine/export/model.onnx"', repr(str(model))).replace('"cat.png"', repr(str(image)))
    code = code.replace("resize((32, 32))", f"resize(({size}, {size}))")
    ns: dict = {}
    exec(compile(code, "docs/deploy.md", "exec"), ns)  # the documentation's own snippet
    return ns


def test_tabular_per_feature_normalisation_and_no_names(tmp_path):
    from sparsekit.model_io import from_dataset

    x = np.array([[1.0, 10.0], [3.0, 30.0], [5.0, 50.0], [7.0, 70.0]] * 3)
    np.savez(tmp_path / "t.npz", x=x, y=np.array([0, 1] * 6))
    io = from_dataset(load_dataset(f"npz:{tmp_path / 't.npz'}"))
    assert io["input_layout"] == "NC" and io["class_names"] is None
    assert io["input_normalization"]["mean"] == pytest.approx([4.0, 40.0])
    assert io["input_normalization"]["scale"] == 1.0


HOSTILE = [
    ("sparsekit.input_layout", "NCHW; rm -rf", "input_layout must be a layout name"),
    ("sparsekit.input_normalization", "[" * 100000, "not valid JSON (RecursionError)"),
    ("sparsekit.input_normalization", '{"mean": 0, "std": 0}', "std or scale that is not positive"),
    ("sparsekit.input_normalization", '{"mean": NaN, "std": 1}', "needs finite numbers"),
    ("sparsekit.input_normalization", '{"mean": [0, 0], "std": 1}', "mean and std of different lengths"),
    ("sparsekit.input_normalization", '{"mean": 0, "std": 1, "eval": "x"}', "must be an object {mean, std"),
    ("sparsekit.class_names", '["a", 1]', "not a printable string"),
    ("sparsekit.class_names", '["a", "\\u001b[2J"]', "not a printable string"),
    ("sparsekit.class_names", '"abc"', "must be a list of 1 to"),
    ("sparsekit.class_names", json.dumps(["x" * 300] * 2), "not a printable string"),
    ("sparsekit.class_names", json.dumps(["a", "b"]), "names 2 classes but the model has 10 outputs"),
    ("sparsekit.class_names", "x" * (5 << 20), "characters long"),
]


@pytest.fixture(scope="module")
def fast_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = MLP()
    root = tmp_path_factory.mktemp("fast")
    run = make_run_dir(root / "run", model, random_masks(model, 0.3), torch.randn(64, 1, 8, 8))
    export(run, "fast", root / "out")
    return root / "out" / "model.fast.onnx"


@pytest.mark.parametrize(("key", "value", "message"), HOSTILE)
def test_fast_loader_refuses_hostile_io_metadata(fast_file, tmp_path, key, value, message):
    proto = onnx.load(str(fast_file))
    entry = proto.metadata_props.add()
    entry.key, entry.value = key, value
    bad = tmp_path / "bad.fast.onnx"
    bad.write_bytes(proto.SerializeToString())
    with pytest.raises(InputError) as info:
        load_fast(bad)
    assert message in info.value.what and key in info.value.what
    assert "\n" not in str(info.value)


def test_archive_reader_refuses_a_hostile_manifest_io(tmp_path):
    torch.manual_seed(0)
    model = MLP()
    run = make_run_dir(tmp_path / "run", model, random_masks(model, 0.3), torch.randn(16, 1, 8, 8))
    export(run, "compressed", tmp_path / "out")
    good = tmp_path / "out" / "model.skz"
    bad = tmp_path / "bad.skz"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "manifest.json":
                manifest = json.loads(data)
                manifest["io"] = {"input_layout": "NC", "input_normalization": None, "class_names": [7]}
                data = json.dumps(manifest).encode()
            dst.writestr(item, data)
    with pytest.raises(InputError, match="class_names has an entry that is not a printable string"):
        Archive(bad)
