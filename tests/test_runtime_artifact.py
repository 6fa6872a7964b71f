"""The fast artifact: write/load round trip against ONNX Runtime and torch, the export pipeline and report,
``sparsekit export --tune``, the loader's refusals and ``sparsekit run`` errors."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from runtime_helpers import close, dense_mlp, sparse_matrix

import sparsekit.runtime as rt
from sparsekit.errors import InputError


def test_write_fast_round_trip_matches_onnxruntime(tmp_path):
    import onnxruntime as ort
    from sparsekit.exporters.fast import write_fast

    rng = np.random.default_rng(4)
    dense = dense_mlp(rng, [64, 48, 32, 10], 0.15)
    dense_path = tmp_path / "dense.onnx"
    onnx.save(dense, str(dense_path))
    out = tmp_path / "m.fast.onnx"
    info = write_fast(dense_path, out, tune=True, batch_size=16, tune_budget_s=0.01)
    assert out.exists() and info["tuned"] and info["dense_check"]["max_abs_diff"] <= info["dense_check"]["bound"]
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto, full_check=True)
    assert {n.op_type for n in proto.graph.node} <= {"Flatten", "SparseLinear"}
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["sparsekit_format"] == "fast" and "sparsity_per_layer" in meta
    model = rt.load(out)
    assert all(layer.plan for layer in model.layers)  # tuned plans survive the round trip
    sess = ort.InferenceSession(dense.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch in (1, 3, 64):
        x = rng.standard_normal((batch, 1, 8, 8)).astype(np.float32)
        ref = sess.run(None, {"input": x})[0]
        for threads in (1, 2):
            close(model.run(x, threads=threads), ref.astype(np.float64))


def test_fast_matches_the_torch_model(tmp_path):
    torch = pytest.importorskip("torch")
    from export_fixtures import MLP, random_masks
    from sparsekit.exporters.fast import write_fast

    from sparsekit.onnx_export import export_dense_onnx

    torch.manual_seed(0)
    net = MLP(64, (40, 24), 10).eval()
    with torch.no_grad():
        for name, m in random_masks(net, 0.1).items():
            dict(net.named_parameters())[name].mul_(m)
    x = torch.randn(33, 64)
    export_dense_onnx(net, x[:2], tmp_path / "model.onnx")
    write_fast(tmp_path / "model.onnx", tmp_path / "m.fast.onnx")
    with torch.no_grad():
        ref = net(x).double().numpy()
    close(rt.load(tmp_path / "m.fast.onnx").run(x.numpy()), ref)


def test_export_pipeline_validates_fast_on_samples(tmp_path):
    torch = pytest.importorskip("torch")
    from export_fixtures import dead_unit_mlp, make_run_dir
    from sparsekit.exporters.pipeline import export

    model, masks = dead_unit_mlp()
    run = make_run_dir(tmp_path / "run", model, masks, torch.randn(40, 64))
    report = export(run, "fast", tmp_path / "out")
    (art,) = report["artifacts"]
    assert art["status"] == "ok", art
    assert art["validation"]["passed"]
    assert art["plan_source"] == "calibrated" and art["calibration"]


def test_report_shows_the_fast_plan(tmp_path):
    torch = pytest.importorskip("torch")
    from export_fixtures import dead_unit_mlp, make_run_dir
    from sparsekit.exporters.pipeline import export
    from sparsekit.exporters.report import build_report

    model, masks = dead_unit_mlp()
    run = make_run_dir(tmp_path / "run", model, masks, torch.randn(40, 64))
    export(run, "onnx,fast")
    report = build_report(run, batch_sizes=(1, 64), latency=False)
    (fast,) = [a for a in report["artifacts"] if a["format"] == "fast"]
    assert fast["plan_source"] == "calibrated" and set(fast["kernels"]) == {"1", "64"}
    assert "kernels per layer" in fast["note"]


def test_export_cli_tunes_the_fast_plan(tmp_path, cli):
    torch = pytest.importorskip("torch")
    from export_fixtures import dead_unit_mlp, make_run_dir

    model, masks = dead_unit_mlp()
    run = make_run_dir(tmp_path / "run", model, masks, torch.randn(40, 64))
    res = cli(["export", str(run), "--format", "fast", "--out", str(tmp_path / "out"), "--tune",
               "--tune-batch-size", "32", "--threads", "2", "--json"])
    assert res.exit_code == 0, res.stderr
    (art,) = res.json()["artifacts"]
    assert art["status"] == "ok" and art["plan_source"] == "tuned", art
    fast = rt.load(art["path"])
    assert fast.metadata["tune_batch_size"] == "32" and fast.metadata["tune_threads"] == "2"
    assert all(32 in layer.plan for layer in fast.layers)


def test_run_rejects_bad_inputs(tmp_path, cli):
    rng = np.random.default_rng(5)
    layer = rt.CsrLayer.from_dense(sparse_matrix(rng, 4, 6, 0.5), None, relu=False)
    art = tmp_path / "m.fast.onnx"
    rt.save(rt.FastModel([layer], (2, 3)), art)
    good = tmp_path / "x.npy"
    np.save(good, rng.standard_normal((3, 2, 3)).astype(np.float32))
    res = cli(["run", str(art), "--input", str(good), "--output", str(tmp_path / "y.npy"), "--json"])
    assert res.exit_code == 0, res.stderr
    assert res.json()["output_shape"] == [3, 4]
    close(np.load(tmp_path / "y.npy"), layer.reference(np.load(good).reshape(3, -1)))

    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((3, 5), np.float32))
    text = tmp_path / "text.npy"
    text.write_text("not an array")
    cases = [
        ["run", str(art), "--input", str(wrong)],
        ["run", str(art), "--input", str(tmp_path / "missing.npy")],
        ["run", str(tmp_path / "missing.fast.onnx"), "--input", str(good)],
        ["run", str(art), "--input", str(text)],
        ["run", str(art), "--input", str(good), "--threads", "0"],
    ]
    for args in cases:
        res = cli(args)
        assert res.exit_code == 2, (args, res.stderr)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    res = cli(["run", str(art), "--input", str(wrong), "--json"])
    assert res.exit_code == 2 and json.loads(res.stdout)["exit_code"] == 2


def test_loader_refuses_plain_onnx_and_garbage(tmp_path):
    rng = np.random.default_rng(6)
    dense = dense_mlp(rng, [64, 10], 0.5)
    onnx.save(dense, str(tmp_path / "dense.onnx"))
    (tmp_path / "junk.onnx").write_bytes(b"\x00junk")
    for name in ("dense.onnx", "junk.onnx"):
        with pytest.raises(InputError):
            rt.load(tmp_path / name)
