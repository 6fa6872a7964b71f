"""sparsekit export: every format validates against the torch outputs, compaction is exact, the archive
round-trips bit-exactly, and the error paths exit with the documented codes. Real ONNX Runtime, no mocks."""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from export_fixtures import MLP, dead_unit_mlp, make_run_dir, random_masks, scripted_speed
from onnx import numpy_helper
from sparsekit.cli.main import main
from sparsekit.exporters.compressed import Archive, _compress, build_archive, encode_delta8, load_state_dict
from sparsekit.exporters.context import ExportContext
from sparsekit.exporters.graph import DenseLayer, build_mlp_chain
from sparsekit.exporters.pipeline import export
from tolerances import fp32_bound

from sparsekit.errors import InputError


def cli(*args: str) -> int:
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def weights(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def ort_run(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


@pytest.fixture(scope="module")
def dead_run(tmp_path_factory) -> Path:
    model, masks = dead_unit_mlp()
    x = torch.randn(128, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    return make_run_dir(tmp_path_factory.mktemp("runs") / "dead", model, masks, x)


@pytest.fixture(scope="module")
def exported(dead_run, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("export")
    with pytest.MonkeyPatch.context() as mp:  # int8 measured as fast as dense: 'all' keeps it on any machine
        mp.setattr("sparsekit.exporters.int8.speedups_vs_dense", scripted_speed())
        code = cli("export", dead_run, "--format", "all", "--out", out, "--precision", "fp32,fp16,int8")
    assert code == 0
    return out, json.loads((out / "export_report.json").read_text())


def test_every_format_is_written_and_validated(exported, dead_run):
    _, report = exported
    by = {(a["format"], a["precision"]): a for a in report["artifacts"]}
    assert set(by) >= {("onnx", "fp32"), ("sparse-onnx", "fp32"), ("compact-onnx", "fp32"),
                       ("compressed", "fp32"), ("compressed", "fp16"), ("compressed", "int8"),
                       ("int8-onnx", "int8")}
    for a in report["artifacts"]:
        assert a["status"] == "ok", a
        assert a["validation"]["passed"] and a["validation"]["n_samples"] == 128
        assert Path(a["path"]).stat().st_size == a["bytes"]
    # torch vs ONNX Runtime: equal to rounding (the fp32 rule), not bit for bit (that depends on the CPU)
    bound = fp32_bound(np.load(dead_run / "samples.npz")["logits"])
    for fmt in ("onnx", "sparse-onnx", "compact-onnx", "compressed"):
        v = by[(fmt, "fp32")]["validation"]
        assert v["tolerance"] == pytest.approx(bound) and v["max_abs_diff"] <= bound, (fmt, v)
    assert "densifies" in by[("sparse-onnx", "fp32")]["notes"][0]


def test_onnx_files_carry_metadata(exported, dead_run):
    out, _ = exported
    for name in ("model.onnx", "model.sparse.onnx", "model.compact.onnx", "model.int8.onnx"):
        meta = {p.key: p.value for p in onnx.load(str(out / name)).metadata_props}
        for key in ("sparsekit_version", "method", "target_sparsity", "realized_sparsity", "layer_sparsity",
                    "source_run", "test_accuracy", "exporter", "opset"):
            assert key in meta, (name, key)
        assert meta["method"] == "rigl" and meta["source_run"] == str(dead_run)
        assert len(json.loads(meta["layer_sparsity"])) == 3


def test_sparse_onnx_stores_active_weights_as_sparse_constants(exported, dead_run):
    out, _ = exported
    model = onnx.load(str(out / "model.sparse.onnx"))
    from safetensors.numpy import load_file
    masks = load_file(str(dead_run / "masks.safetensors"))
    sparse = {n.output[0]: n.attribute[0].sparse_tensor for n in model.graph.node if n.op_type == "Constant"}
    assert set(sparse) == set(masks) and not model.graph.sparse_initializer
    assert not {t.name for t in model.graph.initializer} & set(masks)  # no dense copy left behind
    dense = weights(out / "model.onnx")
    for name, sp in sparse.items():
        assert sp.values.dims[0] == int(masks[name].sum())  # active entries, from the masks
        flat = numpy_helper.to_array(sp.indices)
        assert list(sp.dims) == list(dense[name].shape) and np.array_equal(flat, np.flatnonzero(masks[name]))
        assert np.array_equal(numpy_helper.to_array(sp.values), dense[name].reshape(-1)[flat])


def test_compact_removes_dead_inputs_and_units_and_is_exact(exported, dead_run):
    out, report = exported
    compact = next(a for a in report["artifacts"] if a["format"] == "compact-onnx")["compaction"]
    assert compact["inputs"] == {"before": 64, "after": 44}               # inputs 0..19 had no weights
    assert [u["after"] for u in compact["units"]] == [30, 14, 10]         # units 3 (folded) and 5; unit 7
    assert compact["folded_units"] == 2
    samples = np.load(dead_run / "samples.npz")
    x = samples["x"]
    got = ort_run(out / "model.compact.onnx", x)
    ref = samples["logits"]
    assert np.max(np.abs(got - ref)) <= 1e-5 * max(1.0, np.abs(ref).max())
    sess = ort.InferenceSession(str(out / "model.compact.onnx"), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].name == "input" and sess.get_inputs()[0].shape[1:] == [1, 8, 8]
    assert (out / "model.compact.onnx").stat().st_size < (out / "model.onnx").stat().st_size


def test_compact_input_gather_form_is_exact_and_selects_the_live_inputs(dead_run):
    from sparsekit.exporters.compact import compact_model
    from sparsekit.exporters.context import ExportOptions, load_run_dir

    ctx = load_run_dir(dead_run)
    default, counts = compact_model(ctx, ExportOptions())
    gathered, _ = compact_model(ctx, ExportOptions(), input_selection="gather")
    assert counts["input_selection"] == "zero-columns"
    assert "Gather" not in [n.op_type for n in default.graph.node]  # dead inputs stay as zero columns
    idx = next(t for t in gathered.graph.initializer if t.name == "input_indices")
    assert list(numpy_helper.to_array(idx)) == list(range(20, 64))  # inputs 0..19 had no weights
    samples = np.load(dead_run / "samples.npz")
    for model in (default, gathered):
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        got = sess.run(None, {"input": samples["x"]})[0]
        assert np.max(np.abs(got - samples["logits"])) <= 1e-5 * max(1.0, np.abs(samples["logits"]).max())


def test_compact_folds_relu_of_bias_of_unit_without_inputs():
    """Hand-computed: unit 0 has no inputs and bias 2 → relu(2)=2 feeds the output through weight 3."""
    from sparsekit.exporters.compact import compact_layers

    w1 = np.array([[0.0, 0.0], [1.0, 0.0]], np.float32)
    w2 = np.array([[3.0, 1.0]], np.float32)
    layers = [DenseLayer(w1, np.array([2.0, 0.0], np.float32), "relu", "a", "ab"),
              DenseLayer(w2, np.array([0.5], np.float32), None, "b", "bb")]
    kept, new, counts = compact_layers(2, layers)
    assert kept.tolist() == [0]                          # input 1 has no weights
    assert new[0].weight.tolist() == [[1.0]]
    assert new[1].weight.tolist() == [[1.0]] and new[1].bias.tolist() == [6.5]  # 0.5 + 3 * relu(2)
    assert counts["folded_units"] == 1


def test_compressed_fp32_round_trips_bit_exactly(exported, tmp_path):
    out, _ = exported
    ref = weights(out / "model.onnx")
    state = load_state_dict(out / "model.skz")
    assert set(state) == {k for k, v in ref.items() if v.dtype == np.float32}
    for name, tensor in state.items():
        assert tensor.numpy().tobytes() == ref[name].tobytes(), name
    # the archive back to ONNX through the CLI
    assert cli("export", out / "model.skz", "--format", "onnx", "--out", tmp_path) == 0
    restored = weights(tmp_path / "model.onnx")
    for name, arr in ref.items():
        assert restored[name].tobytes() == arr.tobytes(), name
    manifest = Archive(out / "model.skz").manifest
    assert manifest["format"] == "sparsekit-archive" and manifest["version"] == 1
    # every masked weight is stored sparse, with the smaller of the two index encodings after compression
    sparse = [t for t in manifest["tensors"] if t["layout"] == "sparse"]
    assert [t["name"] for t in sparse] == ["net.1.weight", "net.3.weight", "net.5.weight"]
    masks = {n: m for n, (_, m) in Archive(out / "model.skz").tensors().items() if m is not None}
    for t in sparse:
        flat = masks[t["name"]].reshape(-1)
        sizes = {"bitmask": len(_compress(np.packbits(flat.astype(np.uint8)).tobytes())[1]),
                 "delta8": len(_compress(encode_delta8(np.flatnonzero(flat)))[1])}
        assert t["nnz"] == int(flat.sum()) and t["index"]["encoding"] == min(sizes, key=sizes.get), (t, sizes)


def _random_layer_ctx(sparsity: float = 0.9) -> ExportContext:
    rng = np.random.default_rng(0)
    mask = rng.random((1024, 1024)) >= sparsity
    w = np.where(mask, rng.standard_normal((1024, 1024)) * 0.05, 0).astype(np.float32)
    model = build_mlp_chain((1024,), [DenseLayer(w, None, None, "w", None)])
    return ExportContext(Path("unused"), "run", model, {"w": mask}, {}, None)


def test_archive_size_ratios_on_a_random_90_percent_layer():
    ctx = _random_layer_ctx()
    dense = len(ctx.model_bytes())
    ratios = {p: dense / len(build_archive(ctx, p)) for p in ("fp32", "fp16", "int8")}
    assert ratios["fp32"] >= 7.5 and ratios["fp16"] >= 15 and ratios["int8"] >= 23, ratios


def test_tolerance_failure_exits_4_and_removes_the_file(dead_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(dead_run, run)
    s = dict(np.load(run / "samples.npz"))
    s["logits"] = s["logits"] + 1e-3  # the reference no longer matches the model
    np.savez(run / "samples.npz", **s)
    assert cli("export", run, "--format", "onnx,compact-onnx", "--out", tmp_path / "o") == 4
    assert not (tmp_path / "o" / "model.onnx").exists()
    assert not (tmp_path / "o" / "model.compact.onnx").exists()
    report = json.loads((tmp_path / "o" / "export_report.json").read_text())
    assert all(a["status"].startswith("failed") for a in report["artifacts"])
    assert "max |Δ|" in report["artifacts"][0]["validation"]["errors"][0]
    assert cli("export", run, "--format", "onnx", "--out", tmp_path / "w", "--warn-only") == 0
    assert (tmp_path / "w" / "model.onnx").exists()


class ConvNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


@pytest.fixture(scope="module")
def conv_run(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    net = ConvNet()
    return make_run_dir(tmp_path_factory.mktemp("runs") / "conv", net, random_masks(net, 0.3),
                        torch.randn(32, 1, 8, 8))


def test_compact_refuses_a_conv_graph_with_nothing_to_remove_and_writes_nothing(conv_run, tmp_path, capsys):
    assert cli("export", conv_run, "--format", "compact-onnx", "--out", tmp_path) == 2
    err = capsys.readouterr().err
    assert "no channel or unit that can be removed exactly" in err and "nothing was written" in err
    assert err.count("\n") == 1
    assert not (tmp_path / "model.compact.onnx").exists()
    # with 'all' the refusal is reported and the other formats are still written
    assert cli("export", conv_run, "--out", tmp_path / "all") == 0
    report = json.loads((tmp_path / "all" / "export_report.json").read_text())
    status = {a["format"]: a["status"] for a in report["artifacts"]}
    assert status["compact-onnx"] == "refused" and status["onnx"] == status["compressed"] == "ok"
    assert status["sparse-onnx"] == "ok"


def test_corrupt_and_truncated_archives_are_refused(exported, tmp_path):
    out, _ = exported
    data = (out / "model.skz").read_bytes()
    (tmp_path / "trunc.skz").write_bytes(data[: len(data) // 2])
    flipped = bytearray(data)
    member = zipfile.ZipFile(io.BytesIO(data)).getinfo("t/0.val")
    flipped[member.header_offset + 60] ^= 0xFF  # inside the stored blob
    (tmp_path / "flip.skz").write_bytes(bytes(flipped))
    for name in ("trunc.skz", "flip.skz"):
        with pytest.raises(InputError, match="corrupt or truncated"):
            load_state_dict(tmp_path / name)
        assert cli("export", tmp_path / name, "--out", tmp_path / "o") == 2


def test_archive_path_traversal_is_refused(exported, tmp_path):
    out, _ = exported
    src = zipfile.ZipFile(out / "model.skz")
    manifest = json.loads(src.read("manifest.json"))
    manifest["tensors"][0]["values"]["blob"] = "../../etc/passwd"
    evil = tmp_path / "evil.skz"
    with zipfile.ZipFile(evil, "w") as zf:
        for name in src.namelist():
            if name != "manifest.json":
                zf.writestr(name, src.read(name))
        zf.writestr("manifest.json", json.dumps(manifest))
    with pytest.raises(InputError, match="path traversal"):
        load_state_dict(evil)
    member = tmp_path / "member.skz"
    with zipfile.ZipFile(member, "w") as zf:
        zf.writestr("../escape", b"x")
        zf.writestr("manifest.json", "{}")
    assert cli("export", member, "--out", tmp_path / "o") == 2


def test_unwritable_output_exits_2(dead_run, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a dir")
    assert cli("export", dead_run, "--format", "onnx", "--out", blocker / "sub") == 2
    assert "cannot write" in capsys.readouterr().err


def test_unknown_format_and_missing_run_dir_are_input_errors(dead_run, tmp_path, capsys):
    assert cli("export", dead_run, "--format", "compact") == 2
    assert "compact-onnx" in capsys.readouterr().err
    assert cli("export", tmp_path / "nope") == 2


def test_export_json_and_list(dead_run, tmp_path, capsys):
    assert cli("export", "--list", "--json") == 0
    names = [f["name"] for f in json.loads(capsys.readouterr().out)]
    assert names[:5] == ["onnx", "sparse-onnx", "compact-onnx", "compressed", "int8-onnx"]
    assert cli("export", dead_run, "--format", "onnx", "--out", tmp_path, "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["artifacts"][0]["status"] == "ok"


def test_python_api_export_of_a_flat_input_mlp(tmp_path):
    torch.manual_seed(3)
    net = MLP(20, (16,), 4, flatten=False)
    run = make_run_dir(tmp_path / "flat", net, random_masks(net, 0.5), torch.randn(16, 20))
    report = export(run, "onnx,compact-onnx,compressed")
    assert [a["status"] for a in report["artifacts"]] == ["ok", "ok", "ok"]
    assert (run / "export" / "export_report.json").exists()
