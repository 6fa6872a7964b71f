"""sparse-onnx files: sparse weights as ``Constant`` nodes with a ``sparse_value`` pass the strict checks
that graph-level ``sparse_initializer``s fail, and sparsekit's readers handle both forms."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from export_fixtures import dead_unit_mlp, make_run_dir
from onnx import helper, numpy_helper
from sparsekit.exporters.graph import densified, initializer_arrays, sparse_weight_names
from sparsekit.exporters.pipeline import export
from sparsekit.exporters.report import build_report
from sparsekit.exporters.validate import check_onnx_file
from tolerances import fp32_bound

from sparsekit.errors import ValidationError

MASKED = ["net.1.weight", "net.3.weight", "net.5.weight"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    model, masks = dead_unit_mlp(seed=2)
    x = torch.randn(48, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    run = make_run_dir(tmp_path_factory.mktemp("runs") / "r", model, masks, x)
    export(run, "onnx,sparse-onnx")
    return run


def with_sparse_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its masked weights moved into graph-level sparse initializers (the old form)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    keep = []
    for t in out.graph.initializer:
        if t.name not in MASKED:
            keep.append(t)
            continue
        arr = numpy_helper.to_array(t)
        flat = np.flatnonzero(arr).astype(np.int64)
        out.graph.sparse_initializer.append(helper.make_sparse_tensor(
            numpy_helper.from_array(arr.reshape(-1)[flat], t.name), numpy_helper.from_array(flat, "i"),
            list(arr.shape)))
    del out.graph.initializer[:]
    out.graph.initializer.extend(keep)
    vi = [v for v in out.graph.value_info if v.name not in MASKED]  # typed dense: a contradiction
    del out.graph.value_info[:]
    out.graph.value_info.extend(vi)
    return out


def test_validation_rejects_sparse_initializers_feeding_dense_ops(run, tmp_path):
    dense = onnx.load(str(run / "export" / "model.onnx"))
    old = tmp_path / "old.sparse.onnx"
    onnx.save(with_sparse_initializers(dense), str(old))
    with pytest.raises(ValidationError, match=r"Gemm.*has unsupported type: sparse_tensor"):
        check_onnx_file(old)
    check_onnx_file(run / "export" / "model.sparse.onnx")  # the written form passes
    # files of the old form still read: the same weights, and a densified twin that passes the checks
    model = onnx.load(str(old))
    assert sparse_weight_names(model) == MASKED
    arrays, ref = initializer_arrays(model), initializer_arrays(dense)
    assert set(arrays) == set(ref) and all(np.array_equal(arrays[k], ref[k]) for k in ref)
    onnx.save(densified(model), str(tmp_path / "twin.onnx"))
    check_onnx_file(tmp_path / "twin.onnx")


def test_sparse_constants_read_back_as_the_dense_weights(run, tmp_path):
    sparse = onnx.load(str(run / "export" / "model.sparse.onnx"))
    dense = onnx.load(str(run / "export" / "model.onnx"))
    assert sorted(sparse_weight_names(sparse)) == MASKED
    arrays, ref = initializer_arrays(sparse), initializer_arrays(dense)
    assert set(arrays) == set(ref) and all(np.array_equal(arrays[k], ref[k]) for k in ref)
    twin = densified(sparse)
    assert not sparse_weight_names(twin) and {t.name for t in twin.graph.initializer} >= set(MASKED)
    onnx.save(twin, str(tmp_path / "twin.onnx"))
    check_onnx_file(tmp_path / "twin.onnx")


def test_report_on_a_lone_sparse_file_compares_it_with_its_densified_twin(run, tmp_path):
    alone = tmp_path / "model.sparse.onnx"
    shutil.copy(run / "export" / "model.sparse.onnx", alone)  # no model.onnx beside it
    report = build_report(alone, batch_sizes=(1,), latency=False)
    assert [a["artifact"] for a in report["artifacts"]] == ["onnx (densified)", "sparse-onnx"]
    ref = np.load(run / "samples.npz")["logits"]
    for a in report["artifacts"]:
        assert a["quality"]["max_abs_diff_vs_torch"] <= fp32_bound(ref), a
    weights = initializer_arrays(onnx.load(str(run / "export" / "model.onnx")))
    assert [ly["name"] for ly in report["layers"]] == MASKED
    assert [ly["nonzeros"] for ly in report["layers"]] == [int(np.count_nonzero(weights[n])) for n in MASKED]


def test_sparse_onnx_below_opset_11_is_refused_in_one_line(run, tmp_path, cli):
    res = cli(["export", str(run), "--format", "sparse-onnx", "--opset", "10", "--out", str(tmp_path)])
    assert res.exit_code == 2
    assert res.stderr.strip() == ("error: sparse-onnx needs opset 11 or later (Constant sparse_value); nothing was "
                                  "written (--opset); fix: use --opset 11 or later")
    assert not (tmp_path / "model.sparse.onnx").exists()
