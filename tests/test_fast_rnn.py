"""Sparse GRU/LSTM layers in fast artifacts: the exporter packs torch's GRU/LSTM nodes as SparseGRU/SparseLSTM
(exporters/fast_rnn.py), sparsekit runs them like torch, stock ONNX Runtime runs the file through the ops'
functions, the one-step models equal torch stepping, and a hostile recurrent node is refused in one line."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from sparsekit.exporters import fast_graph_write
from sparsekit.exporters.fast_graph import pack_graph
from sparsekit.exporters.fast_rnn import pack_recurrent
from sparsekit.exporters.fast_step import torch_model_of, write_step_models
from stock_ort import stock_onnxruntime_output_matches
from tolerances import assert_fp32_close

import sparsekit.runtime as rt
from sparsekit.errors import InputError
from sparsekit.models import build_model
from sparsekit.onnx_export import export_dense_onnx
from sparsekit.runtime.graph_model import GraphModel

SEQ, VOCAB = 12, 64
OPS = {"char-gru": "SparseGRU", "char-lstm": "SparseLSTM"}


def sparse_char_model(name: str, keep: float = 0.25) -> torch.nn.Module:
    torch.manual_seed(0)
    m = build_model(name, {"width": 0.125}, input_shape=(SEQ,), num_classes=VOCAB).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.ndim == 2 and "embed" not in n:
                p.mul_((torch.rand_like(p) < keep).float())
    return m


@pytest.fixture(scope="module", params=list(OPS))
def char(request, tmp_path_factory) -> tuple[str, torch.nn.Module, onnx.ModelProto]:
    m = sparse_char_model(request.param)
    path = tmp_path_factory.mktemp("dense") / "model.onnx"
    export_dense_onnx(m, torch.zeros(2, SEQ), path)
    return request.param, m, onnx.load(str(path))


def codes(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, SEQ)).astype(np.float32)


def torch_logits(m: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return m(torch.from_numpy(x)).numpy()


def test_recurrent_node_is_packed_and_equals_torch(char):
    name, m, dense = char
    packed = pack_graph(dense)
    ops = [n.op_type for n in packed.proto.graph.node]
    assert OPS[name] in ops and "GRU" not in ops and "LSTM" not in ops
    # torch's Slice/Concat gate reordering of R was folded: neither it nor the dense R is left in the file
    assert "rnn.weight_hh_l0" not in {t.name for t in packed.proto.graph.initializer}
    model = GraphModel(packed.proto, packed.layers)
    (info,) = model.info()["recurrent"]
    assert info["op"] == OPS[name] and info["hidden_size"] == m.rnn.hidden_size
    assert info["nnz"] == int((m.rnn.weight_ih_l0 != 0).sum() + (m.rnn.weight_hh_l0 != 0).sum())
    for batch in (1, 3):
        assert_fp32_close(model.run(codes(batch, batch)), torch_logits(m, codes(batch, batch)))
    proto = model.to_onnx()
    onnx.checker.check_model(proto, full_check=True)
    loaded = rt.from_onnx(proto)  # every recurrent part checked again by the loader
    assert_fp32_close(loaded.run(codes(2)), torch_logits(m, codes(2)))
    stock = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    assert_fp32_close(stock.run(None, {"input": codes(2)})[0], torch_logits(m, codes(2)))


def test_dense_or_unwanted_recurrent_layers_stay_onnx_nodes(char):
    name, _, dense = char
    assert OPS[name] not in [n.op_type for n in pack_graph(dense, keep_rnn=False).proto.graph.node]
    same, layers = pack_recurrent(dense, max_density=0.1)  # 25% nonzero: above this density the node stays
    assert same is dense and layers == {}
    assert next(iter(pack_recurrent(dense, max_density=0.3)[1].values())).op == OPS[name]


def test_the_whole_artifact_keeps_the_recurrent_layer_dense_when_sparse_measures_slower(char, monkeypatch):
    _, _, dense = char
    speeds = iter([[{"speedup": 0.8}], [{"speedup": 1.3}]])  # sparse measured first, then dense
    monkeypatch.setattr(fast_graph_write, "graph_speed", lambda *a: next(speeds))
    plan = {"tune": False, "calibrate": False, "threads": 1, "batch_size": 1, "tune_budget_s": 0.0}
    packed = pack_graph(dense)
    model, _ = fast_graph_write._planned(packed, dense, {}, **plan)
    packed, model, speed, notes = fast_graph_write._recurrent_variant(
        dense, {}, plan, None, (packed, model, fast_graph_write.graph_speed()), [])
    assert not any(n.domain == "com.sparsekit" and n.op_type in OPS.values() for n in packed.proto.graph.node)
    assert speed[0]["speedup"] == 1.3 and "recurrent layers: dense" in notes[0]


def test_a_sparse_step_slower_than_the_dense_one_is_not_written(char, tmp_path, monkeypatch):
    from sparsekit.exporters import fast_step

    speeds = iter([0.7, 0.8])  # sparse recurrent layers, then dense ones: both slower than the dense step
    monkeypatch.setattr(fast_step, "step_speed", lambda *a: next(speeds))
    record = write_step_models(char[1], tmp_path / "model.fast.onnx", opset=18, metadata={}, measure=True)
    assert record["step_fast"] is None and record["step_speedup_batch1"] == 0.8
    assert (tmp_path / "model.step.onnx").is_file() and not (tmp_path / "model.step.fast.onnx").exists()
    assert "no sparse step model: it measured 0.80x of dense" in record["note"]


def test_step_models_equal_torch_stepping_and_the_full_sequence(char, tmp_path):
    name, m, _ = char
    record = write_step_models(m, tmp_path / "model.fast.onnx", opset=18, metadata={}, measure=False)
    assert record["step_fast_check"]["max_abs_diff"] <= record["step_fast_check"]["bound"]
    step = rt.load(tmp_path / "model.step.fast.onnx", replan=False)
    assert OPS[name] in [n.op_type for n in onnx.load(str(tmp_path / "model.step.fast.onnx")).graph.node]
    dense = ort.InferenceSession(str(tmp_path / "model.step.onnx"), providers=["CPUExecutionProvider"])
    x = codes(2, 5)
    lstm = name == "char-lstm"
    state = {"h": np.zeros((1, 2, m.rnn.hidden_size), np.float32),
             **({"c": np.zeros((1, 2, m.rnn.hidden_size), np.float32)} if lstm else {})}
    full = torch_logits(m, x)
    for t in range(SEQ):  # the state fed back step by step gives the full sequence's logits at every position
        feed = {"input": x[:, t:t + 1], **state}
        outs = step.run(feed)
        assert_fp32_close(outs[0][:, 0], full[:, t])
        for got, want in zip(outs, dense.run(None, feed), strict=True):
            assert_fp32_close(got, want)
        state = dict(zip(state, outs[1:], strict=True))


def test_the_run_s_torch_model_is_rebuilt_for_the_step_export(tmp_path):
    from safetensors.torch import save_file

    m = sparse_char_model("char-gru")
    save_file(m.state_dict(), str(tmp_path / "weights.safetensors"))
    dense = onnx.helper.make_model(onnx.helper.make_graph([onnx.helper.make_node("GRU", ["x", "w", "r"], ["y"])],
                                                          "g", [], []))
    ctx = SimpleNamespace(source_kind="run", source=tmp_path, model=dense, summary={
        "config": {"model": "char-gru", "model_kwargs": {"width": 0.125}},
        "data": {"input_shape": [SEQ], "num_classes": VOCAB}})
    rebuilt = torch_model_of(ctx)
    assert rebuilt is not None and torch.equal(rebuilt.rnn.weight_hh_l0, m.rnn.weight_hh_l0)
    assert torch_model_of(SimpleNamespace(source_kind="archive")) is None
    assert torch_model_of(SimpleNamespace(**{**vars(ctx), "model": onnx.helper.make_model(
        onnx.helper.make_graph([], "mlp", [], []))})) is None  # no recurrent node: the torch model is not rebuilt


def test_it_runs_where_only_onnxruntime_and_numpy_are_installed(char, tmp_path):
    _, m, dense = char
    packed = pack_graph(dense)
    path = tmp_path / "model.fast.onnx"
    path.write_bytes(GraphModel(packed.proto, packed.layers).to_onnx().SerializeToString())
    stock_onnxruntime_output_matches(path, codes(3), torch_logits(m, codes(3)), tmp_path)


# ---------------------------------------------------------------- hostile recurrent nodes
def _artifact(char) -> onnx.ModelProto:
    _, _, dense = char
    packed = pack_graph(dense)
    return GraphModel(packed.proto, packed.layers).to_onnx()


def _node(proto: onnx.ModelProto) -> onnx.NodeProto:
    return next(n for n in proto.graph.node if n.op_type in OPS.values())


def _set_int(node: onnx.NodeProto, name: str, value: int) -> None:
    next(a for a in node.attribute if a.name == name).i = value


def _refused(proto: onnx.ModelProto, message: str) -> None:
    with pytest.raises(InputError, match=message) as err:
        rt.from_onnx(proto)
    assert "\n" not in str(err.value) and "node" in str(err.value.where)


def test_wrong_hidden_size_is_refused(char):
    proto = _artifact(char)
    _set_int(_node(proto), "hidden_size", 12)
    _refused(proto, r"bias B must be finite float32 of shape \[1, \d+\], not float32 \[1, ")
    _node(proto).input[7] = ""  # without the bias, R's row pointers are the ones that do not fit
    _refused(proto, "malformed row pointers")


def test_wrong_input_size_is_refused(char):
    proto = _artifact(char)
    _set_int(_node(proto), "input_size", 3)
    _refused(proto, r"column index out of range \[0, 3\)")


def test_linear_before_reset_zero_and_unknown_attributes_are_refused(char):
    name = char[0]
    proto = _artifact(char)
    if name == "char-gru":
        _set_int(_node(proto), "linear_before_reset", 0)
        _refused(proto, "linear_before_reset = 0: sparsekit runs only 1")
    proto = _artifact(char)
    _node(proto).attribute.append(onnx.helper.make_attribute("clip", 1.0))
    _refused(proto, "unknown attribute 'clip'")


def test_bias_of_the_wrong_shape_and_sequence_lens_are_refused(char):
    proto = _artifact(char)
    node = _node(proto)
    bias = next(t for t in proto.graph.initializer if t.name == node.input[7])
    bias.CopyFrom(onnx.numpy_helper.from_array(np.zeros((1, 5), np.float32), bias.name))
    _refused(proto, r"bias B must be finite float32 of shape \[1, ")
    proto = _artifact(char)
    _node(proto).input[8] = "input"
    _refused(proto, "sequence_lens is given")


def test_a_changed_function_body_is_refused(char):
    proto = _artifact(char)
    f = next(f for f in proto.functions if f.name in OPS.values())
    cell = next(n for n in f.node if n.op_type in ("GRU", "LSTM"))
    cell.attribute.append(onnx.helper.make_attribute("clip", 3.0))  # stock ORT would clip, sparsekit not
    with pytest.raises(InputError, match="function is not the fast format's body"):
        rt.from_onnx(proto)
