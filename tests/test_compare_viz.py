"""``sparsekit compare`` and ``sparsekit viz`` in quick mode: outputs checked on their data."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sparsekit.compare import CompareSpec, plan_runs, run_compare
from sparsekit.errors import InputError
from sparsekit.viz import compare_runs, fanout_maps, image_shape, visualize

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp")
    spec = CompareSpec(methods=["rigl", "static", "dense"], sparsities=[0.9], seeds=1,
                       train={"epochs": 2, "batch_size": 64, "device": "cpu"}, quick=True)
    events = []
    result = run_compare(spec, out, on_run=events.append)
    return out, spec, result, events


def _png(path: Path) -> np.ndarray:
    img = Image.open(path)
    assert img.format == "PNG"
    return np.asarray(img.convert("RGB"), dtype=np.int16)


def _colourful(arr: np.ndarray) -> float:
    """Fraction of pixels that are clearly coloured (not grey/white/black): markers, heat maps."""
    spread = arr.max(axis=2) - arr.min(axis=2)
    return float((spread > 60).mean())


def test_plan_runs_trains_dense_once_per_seed_and_names_dirs():
    spec = CompareSpec(methods=["rigl", "dense", "small-dense"], sparsities=[0.9, 0.98], seeds=2, quick=True)
    names = [r.name for r in plan_runs(spec)]
    assert names == ["dense-s0", "rigl-0.9-s0", "small-dense-0.9-s0", "rigl-0.98-s0", "small-dense-0.98-s0",
                     "dense-s1", "rigl-0.9-s1", "small-dense-0.9-s1", "rigl-0.98-s1", "small-dense-0.98-s1"]
    rigl = plan_runs(spec)[1].config
    assert rigl.epochs == 2 and rigl.method_options["update_interval"] == 5  # --quick shortens both


def test_compare_writes_csv_json_matching_the_run_summaries(sweep):
    out, _, result, events = sweep
    assert [e["name"] for e in events] == ["dense-s0", "rigl-0.9-s0", "static-0.9-s0"]
    rows = {(r["method"], r["sparsity"]): r for r in result["rows"]}
    with open(out / "compare.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [(t["method"], float(t["sparsity"])) for t in table] == list(rows)
    saved = json.loads((out / "compare.json").read_text())
    assert saved["rows"] == result["rows"]
    for t in table:
        s = json.loads((out / ("dense-s0" if t["method"] == "dense" else f"{t['method']}-0.9-s0")
                        / "summary.json").read_text())
        assert float(t["accuracy_mean"]) == pytest.approx(s["test_accuracy"])
        assert float(t["realized_sparsity"]) == pytest.approx(s["realized_sparsity"])
        assert float(t["train_flops_vs_dense"]) == pytest.approx(s["flops"]["training"]["vs_dense"])
        assert float(t["params_nonzero"]) == s["params"]["nonzero"]
    assert rows[("dense", 0.0)]["train_flops_vs_dense"] == pytest.approx(1.0)
    assert rows[("static", 0.9)]["realized_sparsity"] == pytest.approx(0.9, abs=1e-6)
    # static: 3 f_S per step; rigl pays for its dense gradients inside the update window
    assert rows[("static", 0.9)]["train_flops_vs_dense"] == pytest.approx(
        rows[("static", 0.9)]["inference_flops_vs_dense"])
    assert rows[("static", 0.9)]["train_flops_vs_dense"] < rows[("rigl", 0.9)]["train_flops_vs_dense"] < 1.0


def test_compare_plot_has_coloured_markers(sweep):
    out, *_ = sweep
    arr = _png(out / "compare.png")
    assert arr.shape[0] >= 400 and arr.shape[1] >= 700
    assert 0.0005 < _colourful(arr) < 0.2  # markers and legend, not a blank or a solid image


def test_compare_reuses_finished_runs(sweep):
    out, spec, result, _ = sweep
    events = []
    again = run_compare(spec, out, on_run=events.append)
    assert all(e["reused"] for e in events)
    assert again["rows"] == result["rows"]


def test_compare_cli_json_quick(sweep, cli):
    out, *_ = sweep
    res = cli(["compare", "--quick", "--methods", "rigl,static,dense", "--sparsity", "0.9", "--epochs", "2",
               "--batch-size", "64", "--device", "cpu", "--out", str(out), "--json"])
    assert res.exit_code == 0, res.stderr
    data = res.json()
    assert {r["method"] for r in data["rows"]} == {"rigl", "static", "dense"}
    assert res.stderr.count("(reused)") == 3


def test_compare_refuses_a_finished_run_with_other_settings(sweep, cli):
    out, *_ = sweep
    res = cli(["compare", "--quick", "--methods", "dense", "--sparsity", "0.9", "--epochs", "1",
               "--batch-size", "64", "--out", str(out)])
    assert res.exit_code != 0 and "different settings" in res.stderr


def test_image_shape_and_fanout_maps():
    assert image_shape([1, 28, 28], 784) == (28, 28)
    assert image_shape([64], 64) == (8, 8)
    assert image_shape([3, 32, 32], 3) is None  # conv first layer: channels, not pixels
    assert image_shape([10], 10) is None
    maps = fanout_maps([{"step": 0, "input_fanout": list(range(16))}, {"step": 5}], (4, 4))
    assert len(maps) == 1 and maps[0][0] == 0
    assert maps[0][1][1, 2] == 6  # row-major reshape, as the input is flattened


def test_viz_run_writes_connectivity_density_and_curves(sweep, tmp_path):
    out, *_ = sweep
    run = out / "rigl-0.9-s0"
    result = visualize(run, tmp_path / "viz")
    names = {Path(f).name for f in result["files"]}
    assert names == {"connectivity.png", "connectivity.gif", "layers.png", "density.png", "curves.png"}
    updates = [json.loads(line) for line in (run / "updates.jsonl").read_text().splitlines()]
    gif = Image.open(tmp_path / "viz" / "connectivity.gif")
    assert gif.n_frames == len([u for u in updates if "input_fanout" in u]) > 2
    conn = _png(tmp_path / "viz" / "connectivity.png")
    assert _colourful(conn) > 0.05  # viridis heat maps
    dens = _png(tmp_path / "viz" / "density.png")
    assert _colourful(dens) > 0.01
    curves = _png(tmp_path / "viz" / "curves.png")
    assert curves.shape[1] > curves.shape[0]


def test_viz_compare_overlays_loss_curves(sweep, tmp_path, cli):
    out, *_ = sweep
    res = cli(["viz", "--compare", str(out / "rigl-0.9-s0"), str(out / "static-0.9-s0"),
               "--out", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.stderr
    arr = _png(tmp_path / "compare_loss.png")
    assert _colourful(arr) > 0.001
    with pytest.raises(Exception, match="two"):
        compare_runs([out / "rigl-0.9-s0"], tmp_path)


def test_init_from_starts_with_the_source_runs_mask(sweep, tmp_path):
    from safetensors.torch import load_file

    from sparsekit.config import TrainConfig
    from sparsekit.methods import get_method_class
    from sparsekit.training import train

    out, *_ = sweep
    source = out / "static-0.9-s0"
    src_cfg = json.loads((source / "config.json").read_text())
    cfg = TrainConfig(method="rigl", sparsity=0.9, epochs=1, batch_size=64, device="cpu",
                      init_from=str(source), seed=src_cfg["seed"],
                      method_options={**get_method_class("rigl").defaults, "update_interval": 5})
    train(cfg, tmp_path / "restart")
    first = json.loads((tmp_path / "restart" / "updates.jsonl").read_text().splitlines()[0])
    mask = load_file(str(source / "masks.safetensors"))
    src_first = next(iter(mask.values())).bool()
    assert first["step"] == 0
    assert first["input_fanout"] == src_first.sum(dim=0).tolist()
    assert first["active"] == {k: int(v.sum()) for k, v in mask.items()}


def test_point_labels_are_nudged_apart_only_where_they_would_overlap():
    from sparsekit.compare import label_offsets

    pts = [(100.0, 200.0), (101.0, 201.0), (102.0, 199.0), (400.0, 50.0)]
    offs = label_offsets(pts, width=70.0, height=10.0)
    boxes = [(p[0] + o[0], p[1] + o[1]) for p, o in zip(pts, offs, strict=True)]
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            assert abs(boxes[i][0] - boxes[j][0]) >= 70.0 or abs(boxes[i][1] - boxes[j][1]) >= 10.0
    assert offs[3] == (6.0, 4.0)  # an isolated point keeps the default offset
    assert offs[1] == (6.0, 4.0)  # the highest of the cluster keeps it too; the others stack below it
    assert [b[1] for b in boxes[:3]] == [194.0, 205.0, 183.0]


def test_a_sweep_needs_sparsity_levels_unless_every_method_is_dense():

    for methods in (["small-dense"], ["dense", "rigl"]):  # small-dense is sized by --sparsity too
        with pytest.raises(InputError, match="no sparsity levels given"):
            CompareSpec(methods=methods, sparsities=[], seeds=1).validate()
    assert CompareSpec(methods=["dense"], sparsities=[], seeds=1).validate().methods == ["dense"]
