"""Speed formats (fast, compact-onnx, int8-onnx) are never silently slower than dense: export and report flag
them below 0.95× (table, JSON), ``report --min-speedup-each`` fails on them, int8 picks the quantization
measured fastest (or is left out of ``--format all``), and a speed gate without latency is a usage error.
Every timing here is scripted: no assert depends on this machine's speed."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import onnx
import pytest
import torch
from export_fixtures import dead_unit_mlp, make_run_dir, random_masks, scripted_speed
from sparsekit.exporters import int8
from sparsekit.exporters.context import ExportOptions, load_run_dir
from sparsekit.exporters.dense import reference_model
from sparsekit.exporters.fast import calibrated_speed
from sparsekit.exporters.pipeline import export
from sparsekit.exporters.report import check_gates, schema

from sparsekit import bench
from sparsekit.errors import InputError
from sparsekit.runtime.tune import CALIBRATION_BATCHES

SCRIPTED = "sparsekit.exporters.int8.speedups_vs_dense"
FAST = ("--runs", "3", "--warmup", "1", "--batch-sizes", "1,8")


class ConvNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory) -> Path:
    model, masks = dead_unit_mlp(seed=2)
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    return make_run_dir(tmp_path_factory.mktemp("runs") / "mlp", model, masks, x)


@pytest.fixture(scope="module")
def conv_run(tmp_path_factory) -> Path:
    """A small conv net fitted to its 64 samples (clear top-1 margins, so both int8 forms pass the rule)."""
    torch.manual_seed(3)
    g = torch.Generator().manual_seed(3)
    net, x, y = ConvNet(), torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g)
    masks = random_masks(net, 0.3, 3)
    params = dict(net.named_parameters())
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    for _ in range(60):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        with torch.no_grad():
            for name, m in masks.items():
                params[name].mul_(m)
    return make_run_dir(tmp_path_factory.mktemp("runs") / "conv", net, masks, x, y)


def by_format(report: dict) -> dict[str, dict]:
    return {a["format"]: a for a in report["artifacts"]}


def test_slow_int8_is_left_out_of_all_and_flagged_when_named(mlp_run, tmp_path, monkeypatch, cli):
    monkeypatch.setattr(SCRIPTED, scripted_speed({"dynamic": {1: 0.7}}))  # 0.7x at batch 1, 1.0x at 64
    arts = by_format(export(mlp_run, "all", tmp_path / "all"))
    assert arts["int8-onnx"]["status"] == "refused" and not (tmp_path / "all" / "model.int8.onnx").exists()
    assert "slower than the dense model" in arts["int8-onnx"]["reason"]
    assert "0.70× at batch 1 (1 thread)" in arts["int8-onnx"]["reason"]
    # export does not time compact-onnx: flag unknown, and the note says who times it
    assert arts["compact-onnx"]["slower_than_dense"] is None
    assert any("sparsekit report" in n for n in arts["compact-onnx"]["notes"])
    # fast: its calibration timed the dense plan; the flag is exactly the records below 0.95
    speed = arts["fast"]["speed_vs_dense"]
    assert speed and {r["batch_size"] for r in speed} <= set(CALIBRATION_BATCHES)
    assert arts["fast"]["slower_than_dense"] == [r for r in speed if r["speedup"] < 0.95]
    assert "slower_than_dense" not in arts["sparse-onnx"] and "slower_than_dense" not in arts["compressed"]

    res = cli(["export", str(mlp_run), "--format", "int8-onnx", "--out", str(tmp_path / "named"), "--json"])
    assert res.exit_code == 0
    art = res.json()["artifacts"][0]
    assert art["status"] == "ok" and (tmp_path / "named" / "model.int8.onnx").exists()
    assert art["slower_than_dense"] == [{"batch_size": 1, "threads": 1, "speedup": 0.7}]
    assert [r["batch_size"] for r in art["speed_vs_dense"]] == [1, 64]
    res = cli(["export", str(mlp_run), "--format", "int8-onnx", "--out", str(tmp_path / "named")])
    assert "slower than dense ⚠" in res.stdout
    assert "⚠ int8-onnx is slower than the dense model: 0.70× at batch 1 (1 thread)" in " ".join(res.stdout.split())


def test_int8_at_par_with_dense_is_kept_unflagged(mlp_run, tmp_path, monkeypatch):
    monkeypatch.setattr(SCRIPTED, scripted_speed({"dynamic": 0.95}))  # the threshold itself is not slower
    art = by_format(export(mlp_run, "onnx,int8-onnx", tmp_path))["int8-onnx"]
    assert art["status"] == "ok" and art["slower_than_dense"] == []


def test_int8_keeps_conv_fp32_and_picks_the_fastest_quantization_at_its_worst_batch(conv_run, tmp_path,
                                                                                    monkeypatch):
    ctx = load_run_dir(conv_run)
    cands = int8.candidates(reference_model(ctx, "int8-onnx", ExportOptions()), ctx.samples)
    assert set(cands) == {"dynamic", "static"}
    dyn_ops = {n.op_type for n in cands["dynamic"].graph.node}
    assert "Conv" in dyn_ops and "ConvInteger" not in dyn_ops and "MatMulInteger" in dyn_ops
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= {n.op_type for n in cands["static"].graph.node}

    def written(speedups: dict) -> tuple[str, dict]:
        monkeypatch.setattr(SCRIPTED, scripted_speed(speedups))
        art = by_format(export(conv_run, "int8-onnx", tmp_path, warn_only=True))["int8-onnx"]
        meta = {p.key: p.value for p in onnx.load(str(tmp_path / "model.int8.onnx")).metadata_props}
        assert meta["quantization"] == art["quantization"]
        return art["quantization"], art

    # static is far ahead at batch 64 but behind dense at batch 1: the worst batch decides
    chosen, art = written({"dynamic": 1.2, "static": {1: 0.9, 64: 3.0}})
    assert chosen == "dynamic" and art["slower_than_dense"] == [] and art["validation"]["passed"]
    chosen, art = written({"dynamic": 1.2, "static": 1.5})
    assert chosen == "static" and art["validation"]["passed"]
    assert [r["speedup"] for r in art["speed_vs_dense"]] == [1.5, 1.5]


def test_calibrated_speed_reads_the_dense_plan_from_the_calibration():
    calibration = {"1": {"chosen": "heuristic", "median_s": {"heuristic": 4e-6, "dense": 2e-6}},
                   "8": {"chosen": "heuristic", "median_s": {}},  # not measured
                   "64": {"chosen": "dense", "median_s": {"heuristic": 9e-5, "dense": 3e-5}},
                   "256": {"chosen": "panel chain", "median_s": {"panel chain": 1e-4, "dense": 3e-4}}}
    assert calibrated_speed(calibration, 2) == [{"batch_size": 1, "threads": 2, "speedup": 0.5},
                                                {"batch_size": 64, "threads": 2, "speedup": 1.0},
                                                {"batch_size": 256, "threads": 2, "speedup": 3.0}]
    assert calibrated_speed(None, 1) is None


@pytest.fixture
def scripted_latency(monkeypatch):
    """report's latency with p50s per artifact: compact-onnx at half dense speed, int8 at twice."""
    p50 = {"onnx": 1.0, "sparse-onnx": 2.0, "compact-onnx": 2.0, "int8-onnx": 0.5}

    def fake(runners, _x, **_kw):
        return {n: {"p50_ms": p50[n], "p90_ms": p50[n], "p99_ms": p50[n], "mean_ms": p50[n], "runs": 3}
                for n in runners}

    monkeypatch.setattr(bench, "measure_interleaved", fake)


def test_report_flags_slow_speed_artifacts_and_gates_every_one(mlp_run, tmp_path, monkeypatch, scripted_latency,
                                                              cli):
    monkeypatch.setattr(SCRIPTED, scripted_speed())
    export(mlp_run, "onnx,sparse-onnx,compact-onnx,int8-onnx", mlp_run / "export")
    res = cli(["report", str(mlp_run), *FAST, "--json"])
    assert res.exit_code == 0
    rep = res.json()
    jsonschema.validate(rep, schema())
    arts = {a["artifact"]: a for a in rep["artifacts"]}
    assert arts["compact-onnx"]["slower_than_dense"] == [{"batch_size": 1, "threads": 1, "speedup": 0.5},
                                                         {"batch_size": 8, "threads": 1, "speedup": 0.5}]
    assert arts["int8-onnx"]["slower_than_dense"] == []
    assert "slower_than_dense" not in arts["sparse-onnx"]  # a size format: 0.5x is not a broken promise
    text = " ".join(cli(["report", str(mlp_run), *FAST]).stdout.split())
    assert "0.50× ⚠" in text and "2.00× ⚠" not in text
    assert "⚠ compact-onnx is slower than the dense model: 0.50× at batch 1, 0.50× at batch 8 (1 thread)" in text

    res = cli(["report", str(mlp_run), *FAST, "--min-speedup-each", "0.95", "--min-speedup", "1.5", "--json"])
    assert res.exit_code == 3
    gates = {g["gate"]: g for g in res.json()["gates"]}
    assert gates["min_speedup"]["passed"] and gates["min_speedup"]["value"] == 2.0  # the fastest: int8
    each = gates["min_speedup_each"]
    assert not each["passed"] and each["value"] == 0.5 and "compact-onnx at batch 1" in each["detail"]
    assert cli(["report", str(mlp_run), *FAST, "--min-speedup-each", "0.5"]).exit_code == 0


@pytest.mark.parametrize("gate", ["--min-speedup", "--min-speedup-each"])
def test_speed_gates_without_latency_are_usage_errors(mlp_run, monkeypatch, cli, gate):
    def no_work(*_a, **_kw):
        raise AssertionError("the report was built before the options were checked")

    monkeypatch.setattr("sparsekit.exporters.report.build_report", no_work)
    res = cli(["report", str(mlp_run), "--no-latency", gate, "1.0"])
    assert res.exit_code == 2 and res.stdout == ""
    assert res.stderr.strip() == (f"error: {gate} needs latency measurements (--no-latency); "
                                  "fix: drop --no-latency (or the speed gate)")
    res = cli(["report", str(mlp_run), "--no-latency", gate, "1.0", "--json"])
    assert res.exit_code == 2 and res.json()["error"]["type"] == "input"


def test_check_gates_refuses_speed_gates_on_a_report_without_latency():
    report = {"artifacts": [], "latency": [], "latency_settings": {"measured": False}, "gates": []}
    with pytest.raises(InputError, match="--min-speedup-each needs latency"):
        check_gates(report, min_speedup_each=0.95)
    assert check_gates(report, max_size_ratio=None) == []
    measured = {**report, "latency_settings": {"measured": True, "dense_reference": "onnx"}}
    gate = check_gates(measured, min_speedup_each=0.95)[0]
    assert gate["passed"] and gate["value"] is None  # no speed artifact timed: none is slower
