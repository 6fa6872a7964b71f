"""Granularity in the accounting: compare rows and their table column, the report's run line and the
compressed archive's structured-layout gain, viz layer titles, and the per-layer label behind them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from structured_masks import block_mask, fanin_mask, nm_mask

from sparsekit import structure


def test_compare_rows_split_by_granularity_and_the_table_gets_a_column_only_when_they_differ():
    from sparsekit.compare import CSV_COLUMNS, CompareSpec, aggregate, format_row, granularities_differ, plan_runs

    spec = CompareSpec(methods=["rigl", "dense"], sparsities=[0.5], seeds=2)
    runs = plan_runs(spec)
    grans = {"rigl": ["2:4", "unstructured"], "dense": [None, None]}  # a run without the key is unstructured
    seen: dict[str, int] = {}
    planned = []
    for r in runs:
        planned.append(grans[r.method][seen.setdefault(r.method, 0)])
        seen[r.method] += 1
    fake = [(r, {"test_accuracy": 0.5, "realized_sparsity": 0.5, **({} if g is None else {"granularity": g})})
            for r, g in zip(runs, planned, strict=True)]
    result = aggregate(fake, spec)
    got = sorted((row["method"], row["granularity"], row["runs"]) for row in result["rows"])
    assert got == [("dense", "unstructured", 2), ("rigl", "2:4", 1), ("rigl", "unstructured", 1)]
    assert granularities_differ(result["rows"]) and "granularity" in CSV_COLUMNS
    assert {format_row(row)["granularity"] for row in result["rows"]} == {"2:4", "unstructured"}
    assert [r["granularity"] for r in result["runs"]] == [g or "unstructured" for g in planned]
    same = [row for row in result["rows"] if row["granularity"] == "unstructured"]
    assert not granularities_differ(same)


@pytest.mark.parametrize("mask,declared,expected", [
    (nm_mask((8, 16), 2, 4), "2:4", "2:4"),
    (nm_mask((8, 16), 2, 4), "unstructured", "unstructured"),
    (nm_mask((8, 16), 1, 4), "2:4", "2:4 (not held)"),
    (block_mask((8, 8), 4, 1), "4X1", "4x1"),
    (fanin_mask((8, 20), 3), "fanin", "fan-in K=3"),
    (fanin_mask((8, 20), 3, ablated=(1, 6), long_rows=(2,)), "fanin+ablate=0.3", "fan-in K=3, 2 rows ablated"),
    (nm_mask((8, 16), 2, 4), "bogus", "bogus"),
])
def test_layer_labels_say_the_granularity_the_mask_holds(mask, declared, expected):
    assert structure.label(mask, declared) == expected


def test_viz_layer_rows_are_titled_with_the_granularity():
    from sparsekit.viz import layers_figure
    from sparsekit.viz_views import layer_views

    masks = {"a.weight": nm_mask((16, 32), 2, 4), "b.weight": nm_mask((8, 16), 1, 4)}
    views = layer_views(masks, {"granularity": "2:4", "layers": [{"name": "a.weight"}, {"name": "b.weight"}]}, None)
    assert [v.granularity for v in views] == ["2:4", "2:4 (not held)"]
    fig = layers_figure(views, "t")
    titles = [sub._suptitle.get_text() for sub in fig.subfigs]
    assert "·  2:4  ·" in titles[0] and "·  2:4 (not held)  ·" in titles[1]
    assert layer_views(masks, {}, None)[0].granularity == "unstructured"


@pytest.fixture(scope="module")
def blocks_run(tmp_path_factory):
    from conftest import run_cli
    from export_fixtures import MLP, make_run_dir

    torch.manual_seed(0)
    model = MLP(64, (256, 128), 8)
    masks = {n: torch.from_numpy(block_mask(tuple(p.shape), 4, 1, 0.15, seed=i))
             for i, (n, p) in enumerate(model.named_parameters()) if n.endswith("weight")}
    run = make_run_dir(tmp_path_factory.mktemp("acc") / "run", model, masks, torch.randn(64, 8, 8))
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "granularity": "4x1"}))
    res = run_cli(["export", str(run), "--format", "onnx,compressed", "-q"])
    assert res.exit_code == 0, res.stderr
    return run


def test_report_shows_the_granularity_and_the_archives_structured_gain(blocks_run, cli):
    from sparsekit.exporters.compressed import Archive

    res = cli(["report", str(blocks_run), "--no-latency", "--json"])
    assert res.exit_code == 0, res.stderr
    rep = res.json()
    assert rep["run"]["granularity"] == "4x1"
    (art,) = [a for a in rep["artifacts"] if a["format"] == "compressed"]
    gain = art["structured_layouts"]
    arch = Archive(art["path"])
    entries = {e["name"]: e for e in arch.manifest["tensors"]}
    arch.close()
    assert {r["name"]: r["layout"] for r in gain["layouts"]} == {n: e["layout"] for n, e in entries.items()
                                                                  if e["layout"] != "dense"}
    blocks = [r for r in gain["layouts"] if r["layout"] == "blocks"]
    assert blocks and gain["structured_layouts"] == len(blocks)
    assert gain["structured_bytes"] == sum(r["bytes"] for r in blocks) < gain["structured_unstructured_bytes"]
    assert all(r["spec"] == "4x1" for r in blocks)
    res = cli(["report", str(blocks_run), "--no-latency"])
    assert res.exit_code == 0, res.stderr
    assert "granularity 4x1" in res.stdout
    ratio = gain["structured_unstructured_bytes"] / gain["structured_bytes"]
    assert f"compressed: {len(blocks)} of {len(gain['layouts'])} sparse tensors in structured layouts, " \
           f"{gain['structured_bytes']:,} bytes vs {gain['structured_unstructured_bytes']:,} unstructured " \
           f"({ratio:.2f}× smaller)" in " ".join(res.stdout.split())


def test_report_of_an_unstructured_run_says_so(tmp_path, cli):
    from export_fixtures import MLP, make_run_dir, random_masks

    model = MLP(64, (16,), 4)
    run = make_run_dir(tmp_path / "run", model, random_masks(model, 0.3), torch.randn(16, 8, 8))
    assert cli(["export", str(run), "--format", "onnx,compressed", "-q"]).exit_code == 0
    rep = cli(["report", str(run), "--no-latency", "--json"]).json()
    (art,) = [a for a in rep["artifacts"] if a["format"] == "compressed"]
    assert rep["run"]["granularity"] == "unstructured" and art["structured_layouts"]["structured_layouts"] == 0
    assert np.all([r["layout"] == "sparse" for r in art["structured_layouts"]["layouts"]])


def test_unstructured_twin_keeps_every_sparse_tensors_values_at_other_positions(blocks_run):
    import onnx
    from onnx import numpy_helper
    from sparsekit.exporters.twin import unstructured_twin

    dense = onnx.load(str(blocks_run / "model.onnx"))
    twin = unstructured_twin(dense)
    moved = 0
    for a, b in zip(dense.graph.initializer, twin.graph.initializer, strict=True):
        x, y = numpy_helper.to_array(a), numpy_helper.to_array(b)
        assert a.name == b.name and x.shape == y.shape
        assert np.array_equal(np.sort(x[x != 0]), np.sort(y[y != 0]))  # same values, same count
        moved += int(np.any((x != 0) != (y != 0)))
    assert moved == 3  # the three block-sparse weights; biases stay as they are


def test_split_twin_gives_the_ratio_per_batch_and_drops_the_twins_records():
    from sparsekit.exporters.twin import TWIN, split_twin

    recs = [{"artifact": a, "batch_size": b, "threads": 1, "p50_ms": ms}
            for a, b, ms in [("onnx", 16, 9.0), ("fast", 16, 2.0), (TWIN, 16, 5.0), ("fast", 1, 1.0), (TWIN, 1, 1.5)]]
    kept, gains = split_twin(recs, "fast")
    assert [r["artifact"] for r in kept] == ["onnx", "fast", "fast"]
    assert [(g["batch_size"], g["speedup_vs_unstructured"]) for g in gains] == [(16, 2.5), (1, 1.5)]


def test_report_times_a_structured_runs_fast_artifact_against_its_unstructured_twin(blocks_run, cli):
    from sparsekit.exporters.twin import TWIN

    res = cli(["export", str(blocks_run), "--format", "fast", "-q"])
    assert res.exit_code == 0, res.stderr
    res = cli(["report", str(blocks_run), "--batch-sizes", "16", "--runs", "3", "--warmup", "1", "--json"])
    assert res.exit_code == 0, res.stderr
    rep = res.json()
    (gain,) = rep["structured_speed"]
    fast = next(r for r in rep["latency"] if r["artifact"] == "fast")
    assert (gain["batch_size"], gain["threads"], gain["fast_p50_ms"]) == (16, 1, fast["p50_ms"])
    assert gain["speedup_vs_unstructured"] == pytest.approx(gain["unstructured_p50_ms"] / gain["fast_p50_ms"])
    assert TWIN not in {r["artifact"] for r in rep["latency"]} | {a["artifact"] for a in rep["artifacts"]}
    res = cli(["report", str(blocks_run), "--batch-sizes", "16", "--runs", "2", "--warmup", "0"])
    assert res.exit_code == 0, res.stderr
    assert "fast vs the same model unstructured (same nonzero count, random positions): " in \
        " ".join(res.stdout.split())
