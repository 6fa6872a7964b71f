"""A fast artifact in stock ONNX Runtime: its SparseLinear function (sparsekit.runtime.portable) lets a plain
``onnxruntime.InferenceSession`` run it, with the outputs of sparsekit's kernels and of the dense model, even
where sparsekit is not installed; the loader's checks of that function and of ``negative_slope``."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from fast_artifacts import del_attr, node, save, set_attr, tiny_model, tiny_proto
from onnx import helper
from runtime_helpers import sparse_matrix
from sparsekit.exporters.fast import write_model
from sparsekit.exporters.graph import DenseLayer, build_mlp_chain
from sparsekit.exporters.validate import check_onnx_file
from stock_ort import stock_onnxruntime_output_matches
from tolerances import assert_fp32_close

import sparsekit.runtime as rt
from sparsekit.errors import InputError
from sparsekit.runtime import portable

SIZES = [64, 37, 21, 5]  # (1, 8, 8) inputs flattened; widths not multiples of 16
X = np.random.default_rng(0).standard_normal((5, 12)).astype(np.float32)


def dense_chain(seed: int, *, bias: bool, last: str | None) -> onnx.ModelProto:
    """A dense MLP on (1, 8, 8) inputs, ReLU between layers, ``last`` after the last one, 30% of weights nonzero."""
    rng = np.random.default_rng(seed)
    layers = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(SIZES)):
        b = rng.standard_normal(n_out).astype(np.float32) if bias else None
        act = last if i == len(SIZES) - 2 else "relu"
        layers.append(DenseLayer(sparse_matrix(rng, n_out, n_in, 0.3), b, act, f"fc{i}.weight",
                                 f"fc{i}.bias" if bias else None))
    return build_mlp_chain((1, 8, 8), layers, output_name="logits")


def session(model: str | Path | bytes, level: ort.GraphOptimizationLevel | None = None,
            optimized: Path | None = None) -> ort.InferenceSession:
    """A plain ONNX Runtime session: no custom op library, nothing of sparsekit registered."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    if level is not None:
        so.graph_optimization_level = level
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
    src = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def run(sess: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def exported(tmp_path: Path, **kw: object) -> tuple[Path, onnx.ModelProto]:
    dense = dense_chain(1, **kw)  # type: ignore[arg-type]
    path = tmp_path / "model.fast.onnx"
    write_model(dense, path, calibrate=False)
    return path, dense


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("last", ["relu", None], ids=["relu", "none"])
def test_stock_onnxruntime_runs_an_exported_artifact_like_sparsekit_and_dense(tmp_path, bias, last):
    path, dense = exported(tmp_path, bias=bias, last=last)
    stock, reference, model = session(path), session(dense.SerializeToString()), rt.load(path, replan=False)
    assert [n.op_type for n in onnx.load(str(path)).graph.node] == ["Flatten", *["SparseLinear"] * 3]
    for batch in (1, 64):
        x = np.random.default_rng(batch).standard_normal((batch, 1, 8, 8)).astype(np.float32)
        got, want = run(stock, x), run(reference, x)
        assert_fp32_close(got, want)
        assert_fp32_close(got, model.run(x))
        if last == "relu":
            assert got.min() == 0.0 and np.count_nonzero(got == 0) > 0
        else:
            assert got.min() < 0.0


def test_the_artifact_passes_the_full_checker_and_strict_shape_inference(tmp_path):
    path, _ = exported(tmp_path, bias=True, last=None)
    check_onnx_file(path)  # export's own check: full_check + strict, typed shape inference
    inferred = onnx.shape_inference.infer_shapes(onnx.load(str(path)), check_type=True, strict_mode=True,
                                                 data_prop=True)
    shapes = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
              for v in inferred.graph.value_info}
    widths = [layer.n_out for layer in rt.load(path, replan=False).layers]  # after compaction
    assert shapes == {"flat": ["batch", 64], "layer0.out": ["batch", widths[0]], "layer1.out": ["batch", widths[1]]}


def test_onnxruntime_folds_the_weight_rebuild_into_one_dense_constant_per_layer(tmp_path):
    """Dense speed: after session creation only Gemms (and the activations) are left to run per call."""
    path, _ = exported(tmp_path, bias=True, last=None)
    out = tmp_path / "optimized.onnx"
    session(path, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, out)
    graph = onnx.load(str(out)).graph
    assert sorted(n.op_type for n in graph.node) == ["Flatten", "Gemm", "Gemm", "Gemm", *["LeakyRelu"] * 3]
    widths = [(layer.n_out, layer.n_in) for layer in rt.load(path, replan=False).layers]
    assert sorted(tuple(t.dims) for t in graph.initializer if len(t.dims) == 2) == sorted(widths)


@pytest.mark.parametrize("shape", [(1, 5, 0.6, 0), (4, 3, 0.0, 0), (3, 4, 1.0, 0), (6, 9, 0.3, 2), (2, 70000, 5e-4, 0)],
                         ids=["one-row", "no-nonzeros", "full", "empty-rows", "int32-indices"])
def test_stock_onnxruntime_handles_every_csr_shape(shape):
    """One row (no row starts to scatter), nnz 0, a full matrix, empty rows (row starts shared), wide inputs."""
    n_out, n_in, density, empty = shape
    rng = np.random.default_rng(3)
    w = sparse_matrix(rng, n_out, n_in, density, zero_rows=range(empty))
    if empty:
        w[-1] = 0  # an empty last row too: its row start equals nnz
    layer = rt.CsrLayer.from_dense(w, rng.standard_normal(n_out).astype(np.float32), relu=False, name="l0")
    proto = rt.to_onnx(rt.FastModel([layer], (n_in,)))
    x = rng.standard_normal((3, n_in)).astype(np.float32)
    assert_fp32_close(run(session(proto.SerializeToString()), x), x @ w.T + layer.bias)


def test_it_runs_where_only_onnxruntime_and_numpy_are_installed(tmp_path):
    path, _ = exported(tmp_path, bias=True, last=None)
    x = np.random.default_rng(7).standard_normal((64, 1, 8, 8)).astype(np.float32)
    stock_onnxruntime_output_matches(path, x, rt.load(path, replan=False).run(x), tmp_path)


def test_sparsekit_export_writes_a_file_stock_onnxruntime_runs_like_the_trained_model(tmp_path, cli, monkeypatch):
    """Through the CLI (whose validation runs the full checker and strict shape inference on every .onnx file)."""
    from export_fixtures import MLP, make_run_dir, random_masks

    model = MLP()
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    run_dir = make_run_dir(tmp_path / "run", model, random_masks(model, 0.2), x)
    monkeypatch.setenv("SPARSEKIT_FAST_CALIBRATE", "0")
    res = cli(["export", str(run_dir), "--format", "fast", "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.stderr
    samples = np.load(run_dir / "samples.npz")
    assert_fp32_close(run(session(tmp_path / "out" / "model.fast.onnx"), samples["x"]), samples["logits"])
    res = cli(["export", str(run_dir), "--format", "fast", "--opset", "15", "--out", str(tmp_path / "old")])
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1, res.stderr
    assert "fast needs opset 16 or later" in lines[0] and "--opset" in lines[0], res.stderr
    assert not (tmp_path / "old" / "model.fast.onnx").exists()


# ---------------------------------------------------------------- the loader: old files, the function, the slope
def without_function(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` as format version 1 wrote it: no function, no negative_slope."""
    del proto.functions[:]
    for n in proto.graph.node:
        del_attr(proto, n.name, "negative_slope")
    return proto


def test_artifacts_without_the_function_still_load():
    proto, model = without_function(tiny_proto()), tiny_model()
    assert not proto.functions
    assert_fp32_close(rt.from_onnx(proto).run(X), model.run(X))


def test_an_old_artifact_saved_again_is_version_2_and_runs_in_stock_onnxruntime(tmp_path):
    old = without_function(tiny_proto())
    next(p for p in old.metadata_props if p.key == "fast_format_version").value = "1"
    path = rt.save(rt.from_onnx(old), tmp_path / "again.fast.onnx")
    proto = onnx.load(str(path))
    assert {p.key: p.value for p in proto.metadata_props}["fast_format_version"] == "2"
    slopes = {n.name: helper.get_attribute_value(a) for n in proto.graph.node for a in n.attribute
              if a.name == "negative_slope"}
    assert slopes == {"l0": 0.0, "l1": 0.0, "l2": 1.0} and len(proto.functions) == 1
    assert_fp32_close(run(session(path), X), tiny_model().run(X))


def test_a_function_with_nodes_lacking_negative_slope_is_refused():
    proto = tiny_proto()
    del_attr(proto, "l1", "negative_slope")
    with pytest.raises(InputError, match="missing attribute 'negative_slope', which the artifact's SparseLinear "
                                         r"function reads \(use 0 for activation 'relu'\)") as info:
        rt.from_onnx(proto)
    assert info.value.where == "artifact: node 'l1'"


@pytest.mark.parametrize(("layer", "value", "shown"), [
    ("l0", 1.0, "1"), ("l2", 0.0, "0"), ("l0", 0.01, "0.01"), ("l0", math.nan, "nan"), ("l2", math.inf, "inf"),
    ("l2", -math.inf, "-inf"), ("l0", -1e-45, "-1.4013e-45")])
def test_a_negative_slope_that_is_not_its_activations_is_refused(layer, value, shown):
    proto = tiny_proto()
    set_attr(proto, layer, "negative_slope", value)
    act, want = ("relu", "0") if layer == "l0" else ("none", "1")
    with pytest.raises(InputError) as info:
        rt.from_onnx(proto)
    assert info.value.what == f"negative_slope = {shown} does not match activation '{act}' (which needs {want})"
    assert info.value.where == f"artifact: node '{layer}'"
    old = without_function(tiny_proto())  # checked in files without the function too
    set_attr(old, layer, "negative_slope", value)
    with pytest.raises(InputError, match="does not match activation"):
        rt.from_onnx(old)


@pytest.mark.parametrize(("value", "kind"), [(0, "INT"), ("0.0", "STRING"), ([0.0], "FLOATS")])
def test_a_negative_slope_of_another_type_is_refused(value, kind):
    proto = tiny_proto()
    set_attr(proto, "l0", "negative_slope", value)
    with pytest.raises(InputError, match=f"attribute 'negative_slope' is {kind}, expected FLOAT"):
        rt.from_onnx(proto)


def test_a_negative_slope_given_twice_is_refused():
    proto = tiny_proto()
    node(proto, "l0").attribute.append(helper.make_attribute("negative_slope", 1.0))
    with pytest.raises(InputError, match="attribute 'negative_slope' is given twice"):
        rt.from_onnx(proto)


def test_a_bad_negative_slope_is_one_line_from_sparsekit_run(tmp_path, cli):
    proto = tiny_proto()
    set_attr(proto, "l2", "negative_slope", math.nan)
    art = save(proto, tmp_path / "crafted.fast.onnx")
    np.save(tmp_path / "x.npy", X)
    res = cli(["run", str(art), "--input", str(tmp_path / "x.npy")])
    assert res.exit_code == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "negative_slope = nan" in lines[0], res.stderr


def edited_body(proto: onnx.ModelProto, op: str, **attrs: object) -> onnx.ModelProto:
    f = proto.functions[0]
    n = next(n for n in f.node if n.op_type == op)
    kept = [a for a in n.attribute if a.name not in attrs]
    del n.attribute[:]
    n.attribute.extend([*kept, *(helper.make_attribute(k, v) for k, v in attrs.items())])
    return proto


@pytest.mark.parametrize(("edit", "match"), [
    (lambda p: edited_body(p, "Gemm", transB=0), "the SparseLinear function is not the fast format's body"),
    (lambda p: edited_body(p, "LeakyRelu", alpha=0.0), "the SparseLinear function is not the fast format's body"),
    (lambda p: p.functions[0].node.pop(), "the SparseLinear function is not the fast format's body"),
    (lambda p: setattr(p.functions[0], "name", "Other"), "holds the functions com.sparsekit::Other; a fast artifact "
                                                         "holds one, com.sparsekit::SparseLinear"),
    (lambda p: p.functions.append(p.functions[0]), "holds the functions com.sparsekit::SparseLinear, com.sparsekit::"
                                                   "SparseLinear; a fast artifact holds one"),
    (lambda p: setattr(p.opset_import[0], "version", 15), "the model imports opset 15; its SparseLinear function "
                                                          "needs 16 or later"),
    (lambda p: setattr(p.opset_import[0], "version", 20), "the SparseLinear function is not the fast format's body"),
], ids=["gemm-transB", "fixed-alpha", "node-dropped", "renamed", "two-functions", "opset-15", "opset-mismatch"])
def test_a_function_other_than_the_formats_is_refused(edit, match):
    """Stock ONNX Runtime would compute something else than sparsekit's kernels."""
    proto = tiny_proto()
    edit(proto)
    with pytest.raises(InputError, match=match) as info:
        rt.from_onnx(proto)
    assert info.value.where == "artifact: functions"


def test_doc_strings_and_node_names_in_the_function_are_not_part_of_the_body():
    proto = tiny_proto()
    proto.functions[0].doc_string = "written elsewhere"
    proto.functions[0].node[0].name = "zero"
    assert_fp32_close(rt.from_onnx(proto).run(X), tiny_model().run(X))


@pytest.mark.parametrize("opset", [16, 21])
def test_other_opsets_at_or_above_16_write_a_loadable_portable_artifact(opset):
    model = tiny_model(bias=False)
    proto = rt.to_onnx(model, opset=opset)
    onnx.checker.check_model(proto, full_check=True)
    assert_fp32_close(run(session(proto.SerializeToString()), X), model.run(X))
    assert_fp32_close(rt.from_onnx(proto).run(X), model.run(X))


def test_an_opset_below_16_is_refused_when_writing():
    with pytest.raises(InputError, match="the fast format needs opset 16 or later"):
        rt.to_onnx(tiny_model(), opset=15)
    with pytest.raises(InputError, match="needs opset 16 or later"):
        portable.function(15)
