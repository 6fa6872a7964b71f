"""``fast`` artifacts of whole graphs: sparse linear layers anywhere in a graph run on sparsekit's kernels, the
rest of the graph in ONNX Runtime (``exporters/fast_graph.py``, ``exporters/fast_graph_write.py``,
``sparsekit/runtime/graph_model.py``)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from runtime_helpers import sparse_matrix
from sparsekit.exporters.fast_graph import pack_graph
from sparsekit.exporters.graph import UnsupportedGraphError
from test_zoo_onnx import train_tiny
from tolerances import assert_fp32_close

import sparsekit.runtime as rt
from sparsekit.errors import InputError
from sparsekit.runtime.graph_model import GraphModel


def _model(nodes, inits, *, inputs=(("x", TensorProto.FLOAT, ["batch", "seq", 12]),),
           outputs=(("y", TensorProto.FLOAT, ["batch", "seq", 12]),)) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(*i) for i in inputs],
                              [helper.make_tensor_value_info(*o) for o in outputs],
                              initializer=[numpy_helper.from_array(a, n) for n, a in inits.items()])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 10
    return m


def _ort(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def _ffn(rng, *, reads_twice: bool = False) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """x (b, s, 12) -> LayerNorm -> MatMul W1 (12x40) + b1 -> Relu -> MatMul W2 (40x12) + b2 -> + x (residual)."""
    inits = {"ln_s": np.ones(12, np.float32), "ln_b": np.zeros(12, np.float32),
             "w1": sparse_matrix(rng, 12, 40, 0.3), "b1": rng.standard_normal(40).astype(np.float32),
             "w2": sparse_matrix(rng, 40, 12, 0.3), "b2": rng.standard_normal(12).astype(np.float32)}
    nodes = [helper.make_node("LayerNormalization", ["x", "ln_s", "ln_b"], ["n"], axis=-1),
             helper.make_node("MatMul", ["n", "w1"], ["h0"], name="fc1"),
             helper.make_node("Add", ["h0", "b1"], ["h1"]),
             helper.make_node("Relu", ["h1"], ["h"]),
             helper.make_node("MatMul", ["h", "w2"], ["o0"], name="fc2"),
             helper.make_node("Add", ["b2", "o0"], ["o"]),
             helper.make_node("Add", ["o", "x"], ["y"])]
    outputs = (("y", TensorProto.FLOAT, ["batch", "seq", 12]),)
    if reads_twice:  # fc1's sum before the bias is also a graph output: nothing may be folded into fc1
        outputs += (("h0", TensorProto.FLOAT, ["batch", "seq", 40]),)
    return _model(nodes, inits, outputs=outputs), inits


def test_linear_layers_inside_a_graph_become_sparse_nodes_and_the_graph_still_computes_the_same():
    rng = np.random.default_rng(0)
    dense, inits = _ffn(rng)
    packed = pack_graph(dense)
    wrapper = {"Shape", "Slice", "Reshape", "Concat"}  # (b, s, 12) viewed as rows around each sparse node
    ops = [(n.op_type, n.domain) for n in packed.proto.graph.node if n.op_type not in wrapper]
    assert ops == [("LayerNormalization", ""), ("SparseLinear", "com.sparsekit"), ("SparseLinear", "com.sparsekit"),
                   ("Add", "")]  # bias Adds and the Relu folded; the residual Add stays
    assert sum(n.op_type in wrapper for n in packed.proto.graph.node) == 2 * 5
    assert packed.layers["fc1"].relu and not packed.layers["fc2"].relu
    assert np.array_equal(packed.layers["fc1"].dense_weight(), inits["w1"].T)
    assert np.array_equal(packed.layers["fc2"].bias, inits["b2"])
    assert not {"w1", "w2", "b1", "b2"} & {t.name for t in packed.proto.graph.initializer}
    model = GraphModel(packed.proto, packed.layers)
    for shape in ((1, 5, 12), (3, 7, 12)):  # batch and sequence both vary
        x = rng.standard_normal(shape).astype(np.float32)
        assert_fp32_close(model.run(x), _ort(dense, {"x": x})[0])
        assert_fp32_close(model.run({"x": x}, threads=2), _ort(dense, {"x": x})[0])
    # LayerNorm, then fc1 and fc2 as one chain reading (b, s, 12) itself (the rows wrappers are not run), the Add
    assert model.info()["segments"] == 2 and len(model.layers) == 2
    assert [(type(st).__name__, getattr(st, "x", None)) for st in model._steps][:2] == [("DenseStep", None),
                                                                                       ("SparseStep", "n")]
    # stock ONNX Runtime runs the artifact itself (the op's function of standard ops), no sparsekit needed
    x = rng.standard_normal((2, 9, 12)).astype(np.float32)
    assert_fp32_close(_ort(model.to_onnx(), {"x": x})[0], _ort(dense, {"x": x})[0])


def test_a_rows_wrapper_whose_tensors_something_else_reads_is_run_as_written():
    """fc1's wrapper computes a shape that is also a graph output: its nodes run in ONNX Runtime and fc1 reads its
    (rows, in) view; fc2's wrapper is skipped as usual."""
    rng = np.random.default_rng(14)
    dense, _ = _ffn(rng)
    packed = pack_graph(dense)
    packed.proto.graph.output.append(helper.make_tensor_value_info("fc1.x_shape", TensorProto.INT64, [3]))
    model = GraphModel(packed.proto, packed.layers)
    xs = [getattr(st, "x", None) for st in model._steps]
    assert "fc1.x2d" in xs and "fc2.x2d" not in xs
    x = rng.standard_normal((2, 5, 12)).astype(np.float32)
    y, shape = model.run(x)
    assert_fp32_close(y, _ort(dense, {"x": x})[0])
    assert list(shape) == [2, 5, 12]
    # a wrapper whose constants are not the ones export writes is run as written too (here: refused by ORT)
    out_dim = next(t for t in packed.proto.graph.initializer if t.name == "fc2.out_dim")
    out_dim.CopyFrom(numpy_helper.from_array(np.array([13], np.int64), "fc2.out_dim"))
    model = GraphModel(packed.proto, packed.layers)
    assert "fc2.x2d" in [getattr(st, "x", None) for st in model._steps]
    with pytest.raises(InputError, match="ONNX Runtime refused the input"):
        model.run(x)


def test_a_two_d_input_needs_no_reshapes_and_runs_in_stock_onnx_runtime():
    rng = np.random.default_rng(10)
    dense, _ = _ffn(rng)
    two_d = onnx.ModelProto()
    two_d.CopyFrom(dense)
    two_d.graph.input[0].CopyFrom(helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 12]))
    two_d.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 12]))
    packed = pack_graph(two_d)
    assert not {"Reshape", "Shape"} & {n.op_type for n in packed.proto.graph.node}
    x = rng.standard_normal((5, 12)).astype(np.float32)
    assert_fp32_close(_ort(GraphModel(packed.proto, packed.layers).to_onnx(), {"x": x})[0], _ort(two_d, {"x": x})[0])


def _two_d(model: onnx.ModelProto, outputs: int = 1) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.input[0].CopyFrom(helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 12]))
    out.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 12]))
    if outputs > 1:
        out.graph.output[1].CopyFrom(helper.make_tensor_value_info("h0", TensorProto.FLOAT, ["batch", 40]))
    return out


@pytest.mark.parametrize("reads_twice", [False, True])
def test_consecutive_sparse_linear_layers_run_as_one_chain(reads_twice):
    """fc1 -> Relu -> fc2 on 2-D rows: fc2 reads fc1's output and nothing else does, so the two run as one chain
    (one call); with fc1's pre-bias sum also a graph output nothing is folded into fc1 and they stay apart."""
    from sparsekit.runtime.graph_model import SparseStep

    rng = np.random.default_rng(13)
    dense = _two_d(_ffn(rng, reads_twice=reads_twice)[0], 2 if reads_twice else 1)
    packed = pack_graph(dense)
    model = GraphModel(packed.proto, packed.layers)
    sparse = [s for s in model._steps if isinstance(s, SparseStep)]
    assert [len(s.model.layers) for s in sparse] == ([1, 1] if reads_twice else [2])
    assert [layer.name for layer in model.layers] == ["fc1", "fc2"] and len(model.kernels_for(4)) == 2
    x = rng.standard_normal((6, 12)).astype(np.float32)
    got, want = model.run(x), _ort(dense, {"x": x})
    for g, w in zip(got if reads_twice else [got], want, strict=True):
        assert_fp32_close(g, w)
    assert [n.op_type for n in model.to_onnx().graph.node].count("SparseLinear") == 2  # the file is unchanged


def test_nothing_is_folded_into_a_layer_whose_output_something_else_reads():
    rng = np.random.default_rng(1)
    dense, _ = _ffn(rng, reads_twice=True)
    packed = pack_graph(dense)
    assert [n.op_type for n in packed.proto.graph.node].count("Add") == 2  # b1's Add kept, b2 folded
    assert packed.layers["fc1"].bias is None and not packed.layers["fc1"].relu
    x = rng.standard_normal((2, 4, 12)).astype(np.float32)
    got = GraphModel(packed.proto, packed.layers).run(x)
    for g, want in zip(got, _ort(dense, {"x": x}), strict=True):
        assert_fp32_close(g, want)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_with_a_constant_weight_either_way_round(trans_b):
    rng = np.random.default_rng(2)
    w = sparse_matrix(rng, 20, 12, 0.2)  # (out, in)
    inits = {"B": w if trans_b else np.ascontiguousarray(w.T), "C": rng.standard_normal(20).astype(np.float32)}
    dense = _model([helper.make_node("Gemm", ["x", "B", "C"], ["y"], name="g", transB=trans_b)], inits,
                   inputs=(("x", TensorProto.FLOAT, ["batch", 12]),),
                   outputs=(("y", TensorProto.FLOAT, ["batch", 20]),))
    packed = pack_graph(dense)
    assert np.array_equal(packed.layers["g"].dense_weight(), w)
    x = rng.standard_normal((4, 12)).astype(np.float32)
    assert_fp32_close(GraphModel(packed.proto, packed.layers).run(x), _ort(dense, {"x": x})[0])


def test_dense_layers_stay_with_onnx_runtime_and_a_graph_without_sparse_ones_is_not_packed():
    rng = np.random.default_rng(3)
    dense, _ = _ffn(rng)
    for init in dense.graph.initializer:
        if init.name == "w2":
            init.CopyFrom(numpy_helper.from_array(rng.standard_normal((40, 12)).astype(np.float32), "w2"))
    packed = pack_graph(dense)
    assert list(packed.layers) == ["fc1"] and packed.kept_dense == ["fc2"]
    with pytest.raises(UnsupportedGraphError, match="no linear layer or convolution of this graph has a sparse"):
        pack_graph(dense, max_density=0.0)


def test_a_graph_artifact_round_trips_through_its_file(tmp_path):
    rng = np.random.default_rng(4)
    dense, _ = _ffn(rng)
    packed = pack_graph(dense)
    model = GraphModel(packed.proto, packed.layers, metadata={"k": "v"})
    model.layers[0].plan = {1: "rows", 64: "panel"}
    path = rt.save(model, tmp_path / "g.fast.onnx")
    onnx.checker.check_model(str(path), full_check=True)
    loaded = rt.load(path)
    assert isinstance(loaded, GraphModel) and loaded.metadata["k"] == "v"
    assert loaded.layers[0].plan == {1: "rows", 64: "panel"}
    x = rng.standard_normal((2, 3, 12)).astype(np.float32)
    assert_fp32_close(loaded.run(x), _ort(dense, {"x": x})[0])


def test_a_hostile_graph_artifact_is_refused_with_one_line(tmp_path):
    rng = np.random.default_rng(5)
    dense, _ = _ffn(rng)
    packed = pack_graph(dense)
    good = GraphModel(packed.proto, packed.layers).to_onnx()

    def refused(proto: onnx.ModelProto, message: str) -> None:
        path = tmp_path / "bad.fast.onnx"
        path.write_bytes(proto.SerializeToString())
        with pytest.raises(InputError, match=message):
            rt.load(path).run(np.zeros((1, 2, 12), np.float32))

    bad = onnx.ModelProto()
    bad.CopyFrom(good)
    next(t for t in bad.graph.initializer if t.name == "fc1.indices").CopyFrom(
        numpy_helper.from_array(np.full(8, 999, np.uint16), "fc1.indices"))
    refused(bad, "CSR arrays hold|column index out of range")
    bad.CopyFrom(good)
    next(n for n in bad.graph.node if n.domain == "com.sparsekit").attribute.append(
        helper.make_attribute("surprise", 1))
    refused(bad, "unknown attribute 'surprise'")
    bad.CopyFrom(good)
    for a in next(n for n in bad.graph.node if n.domain == "com.sparsekit").attribute:
        if a.name == "negative_slope":
            a.f = 0.5  # stock ONNX Runtime would compute another activation than sparsekit
    refused(bad, "negative_slope = 0.5 does not match activation")
    bad.CopyFrom(good)
    bad.functions[0].node[-1].op_type = "Relu"
    refused(bad, "not the fast format's body")
    bad.CopyFrom(good)
    branch = helper.make_graph([helper.make_node("Identity", ["x"], ["z"])], "b", [],
                               [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)])
    bad.graph.node.insert(0, helper.make_node("If", ["c"], ["q"], then_branch=branch, else_branch=branch))
    refused(bad, "has a subgraph")
    bad.CopyFrom(good)
    bad.graph.node[0].op_type = "NoSuchOp"
    refused(bad, "ONNX Runtime cannot run part of this artifact|cannot be inferred")
    model = GraphModel(packed.proto, packed.layers)
    with pytest.raises(InputError, match="takes float32"):
        model.run(np.zeros((1, 2, 12), np.int64))
    with pytest.raises(InputError, match=r"ONNX Runtime refused the input: .*Got: 13 Expected: 12"):
        model.run(np.zeros((1, 2, 13), np.float32))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["char-transformer", "lenet5", "resnet20"])
def test_zoo_models_export_to_fast_and_match_the_dense_model(cli, tmp_path, monkeypatch, name):
    from sparsekit.exporters import fast_graph_write as fast_graph

    # every sparse convolution packed and the whole artifact "faster" with them (the export decides both by timing)
    monkeypatch.setattr(fast_graph, "faster_than_dense", lambda *_a, **_k: lambda *_b: True)
    monkeypatch.setattr(fast_graph, "graph_speed", lambda model, *_a: [
        {"batch_size": 1, "threads": 1, "speedup": 1.5 if model.convs else 1.1}])
    run = train_tiny(cli, tmp_path, name)
    res = cli(["export", str(run), "--format", "onnx,fast", "--json"])
    assert res.exit_code == 0, res.stderr
    fast = next(a for a in json.loads(res.stdout)["artifacts"] if a["format"] == "fast")
    assert fast["status"] == "ok" and fast["graph"] is True
    model = rt.load(run / "export" / "model.fast.onnx")
    sparse = sum(ly["prunable"] and len(ly["shape"]) == 2 for ly in json.loads((run / "summary.json").read_text())
                 ["layers"])
    assert isinstance(model, GraphModel) and 1 <= len(model.layers) + len(model.convs)
    assert len(model.layers) <= sparse and (len(model.convs) >= 1) == (name != "char-transformer")
    x = np.load(run / "samples.npz")["x"]
    feed = {ort.InferenceSession(str(run / "model.onnx")).get_inputs()[0].name: x}
    want = _ort(onnx.load(str(run / "model.onnx")), feed)[0]
    assert_fp32_close(model.run(x), want)
    # and in stock ONNX Runtime (the file's SparseLinear function), as a user without sparsekit runs it
    assert_fp32_close(_ort(onnx.load(str(run / "export" / "model.fast.onnx")), feed)[0], want)


def _conv_net(rng) -> onnx.ModelProto:
    """x (b, 3, 10, 9) -> Conv 3->8 3x3 s1 p1 + bias -> Relu -> Conv 8->6 3x3 s2 p(0,1,1,0) -> Add residual-free
    output; weights 70% zeros."""
    def w(*shape):
        return (rng.standard_normal(shape) * (rng.random(shape) < 0.3)).astype(np.float32)

    inits = {"w1": w(8, 3, 3, 3), "b1": rng.standard_normal(8).astype(np.float32), "w2": w(6, 8, 3, 3)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["y"], name="conv2", strides=[2, 2], pads=[0, 1, 1, 0])]
    return _model(nodes, inits, inputs=(("x", TensorProto.FLOAT, ["batch", 3, 10, 9]),),
                  outputs=(("y", TensorProto.FLOAT, ["batch", 6, 5, 4]),))


def test_sparse_convolutions_become_sparse_nodes_and_run_in_both_runtimes():
    rng = np.random.default_rng(11)
    dense = _conv_net(rng)
    packed = pack_graph(dense)
    assert [(n.op_type, n.name) for n in packed.proto.graph.node] == [("SparseConv", "conv1"), ("SparseConv", "conv2")]
    assert packed.layers["conv1"].layer.relu and packed.layers["conv2"].geometry.pads == (0, 1, 1, 0)
    model = GraphModel(packed.proto, packed.layers)
    x = rng.standard_normal((3, 3, 10, 9)).astype(np.float32)
    want = _ort(dense, {"x": x})[0]
    assert_fp32_close(model.run(x), want)
    assert_fp32_close(_ort(model.to_onnx(), {"x": x})[0], want)  # stock ONNX Runtime: the SparseConv function
    onnx.checker.check_model(model.to_onnx(), full_check=True)
    kept = pack_graph(dense, keep_conv=lambda conv, _x: conv.layer.name == "conv2")
    assert list(kept.layers) == ["conv2"] and kept.kept_dense == ["conv1"]


def _residual_net(rng, *, shortcut: str) -> onnx.ModelProto:
    """A ResNet block, x (b, 8, 6, 6): conv1 -> Relu -> conv2 -> Add(shortcut) -> Relu. ``shortcut``: "identity"
    (x), "conv" (a 1x1 convolution of x written after conv2, as torch exports a downsampling block),
    "broadcast" (a per-channel (1, 8, 1, 1) tensor computed in the graph) or "reused" (conv2's output also read
    by a second output)."""
    def w(*shape):
        return (rng.standard_normal(shape) * (rng.random(shape) < 0.3)).astype(np.float32)

    inits = {"w1": w(8, 8, 3, 3), "w2": w(8, 8, 3, 3), "b2": rng.standard_normal(8).astype(np.float32),
             "w3": w(8, 8, 1, 1), "axes": np.array([2, 3], np.int64)}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1])]
    short, outputs = "x", [("y", TensorProto.FLOAT, ["batch", 8, 6, 6])]
    if shortcut == "conv":
        nodes.append(helper.make_node("Conv", ["x", "w3"], ["s"], name="conv3"))
        short = "s"
    elif shortcut == "broadcast":
        nodes.append(helper.make_node("ReduceMean", ["x", "axes"], ["s"], keepdims=1))
        short = "s"
    elif shortcut == "reused":
        outputs.append(("c2", TensorProto.FLOAT, ["batch", 8, 6, 6]))
    nodes += [helper.make_node("Add", ["c2", short], ["a"]), helper.make_node("Relu", ["a"], ["y"])]
    return _model(nodes, inits, inputs=(("x", TensorProto.FLOAT, ["batch", 8, 6, 6]),), outputs=outputs)


@pytest.mark.parametrize(("shortcut", "dense_conv1", "fused", "segments"), [
    ("identity", False, True, 0),   # conv1, then conv2 with the Add and Relu: no ONNX Runtime segment left
    ("conv", False, True, 0),       # the shortcut convolution runs first, conv2 where the Add was
    ("conv", True, True, 1),        # conv1 and its Relu in ONNX Runtime: their segment hands conv2's input on
    ("broadcast", False, True, 1),  # fused, falling back to numpy's broadcasting Add; ReduceMean stays a segment
    ("reused", False, False, 1),    # conv2's output is a graph output too: the Add and Relu stay in ONNX Runtime
])
def test_an_add_and_relu_after_a_convolution_run_in_its_step(shortcut, dense_conv1, fused, segments):
    from sparsekit.runtime.graph_model import ConvStep, DenseStep

    rng = np.random.default_rng(12)
    dense = _residual_net(rng, shortcut=shortcut)
    packed = pack_graph(dense, keep_conv=(lambda conv, _x: conv.layer.name != "conv1") if dense_conv1 else None)
    model = GraphModel(packed.proto, packed.layers)
    conv2 = next(s for s in model._steps if isinstance(s, ConvStep) and s.conv.layer.name == "conv2")
    assert (conv2.residual is not None, conv2.residual_relu) == (fused, fused)
    assert sum(isinstance(s, DenseStep) for s in model._steps) == segments
    for batch in (1, 5):
        x = rng.standard_normal((batch, 8, 6, 6)).astype(np.float32)
        want, got = _ort(dense, {"x": x}), model.run(x)
        for g, wnt in zip(got if isinstance(got, list) else [got], want, strict=True):
            assert_fp32_close(g, wnt)
        assert_fp32_close(_ort(model.to_onnx(), {"x": x})[0], want[0])  # the file is unchanged: stock ORT agrees


@pytest.mark.parametrize(("attr", "value", "message"), [
    ("kernel_shape", [3], r"kernel_shape = \[3\]: need 2 integers"),
    ("strides", [0, 1], r"strides = \[0, 1\]: need 2 integers in \[1, 32768\)"),
    ("pads", [0, 0, -1, 0], "pads = "),
    ("dilations", [1, 40000], "dilations = "),
    ("in_features", 28, "in_features = 28 is not in_channels x kh x kw = 27"),
    ("block", -1, "block = -1 is outside"),
])
def test_a_hostile_sparse_convolution_is_refused_with_one_line(tmp_path, attr, value, message):
    rng = np.random.default_rng(12)
    packed = pack_graph(_conv_net(rng))
    proto = GraphModel(packed.proto, packed.layers).to_onnx()
    node = proto.graph.node[0]
    for a in node.attribute:
        if a.name == attr:
            a.CopyFrom(helper.make_attribute(attr, value))
    path = tmp_path / "bad.fast.onnx"
    path.write_bytes(proto.SerializeToString())
    with pytest.raises(InputError, match=message):
        rt.load(path)


def test_a_graph_artifact_slower_than_dense_is_flagged_and_left_out_of_all(tmp_path, monkeypatch):
    from sparsekit.exporters import fast_graph_write as fast_graph
    from sparsekit.exporters.fast import write_model
    from sparsekit.exporters.speed import speed_record

    dense, _ = _ffn(np.random.default_rng(13))
    # scripted timings (real ones depend on the CPU and its load): the segments cost more than they save
    monkeypatch.setattr(fast_graph, "graph_speed", lambda *_a: [speed_record(1, 1, 0.6)])
    with pytest.raises(UnsupportedGraphError, match=r"slower than the dense model on this machine \(0.60× at batch 1"):
        write_model(dense, tmp_path / "all.fast.onnx", skip_slow=True)  # --format all
    assert not (tmp_path / "all.fast.onnx").exists()
    report = write_model(dense, tmp_path / "asked.fast.onnx")  # --format fast: written, its speed recorded
    assert report["speed_vs_dense"] == [{"batch_size": 1, "threads": 1, "speedup": 0.6}]
    monkeypatch.setattr(fast_graph, "graph_speed", lambda *_a: [speed_record(1, 1, 1.3)])
    assert write_model(dense, tmp_path / "fast.fast.onnx", skip_slow=True)["speed_vs_dense"][0]["speedup"] == 1.3


def test_the_fastest_whole_artifact_decides_which_convolutions_are_sparse(tmp_path, monkeypatch):
    from sparsekit.exporters import fast_graph_write as fast_graph
    from sparsekit.exporters.fast import write_model
    from sparsekit.exporters.speed import speed_record

    rng = np.random.default_rng(14)
    dense = _conv_net(rng)
    dense.graph.node.append(helper.make_node("Flatten", ["y"], ["f"]))
    dense.graph.node.append(helper.make_node("Gemm", ["f", "fc"], ["z"], name="fc", transB=1))
    dense.graph.initializer.append(numpy_helper.from_array(
        (rng.standard_normal((4, 120)) * (rng.random((4, 120)) < 0.3)).astype(np.float32), "fc"))
    dense.graph.output[0].CopyFrom(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 4]))
    monkeypatch.setattr(fast_graph, "faster_than_dense", lambda *_a, **_k: lambda *_b: True)
    # scripted: each convolution measured faster alone, the artifact with them 0.7x of dense, without 0.9x
    monkeypatch.setattr(fast_graph, "graph_speed",
                        lambda model, *_a: [speed_record(1, 1, 0.7 if model.convs else 0.9)])
    report = write_model(dense, tmp_path / "m.fast.onnx")
    model = rt.load(tmp_path / "m.fast.onnx")
    assert not model.convs and [ly.name for ly in model.layers] == ["fc"]
    assert report["speed_vs_dense"] == [{"batch_size": 1, "threads": 1, "speedup": 0.9}]
    assert report["notes"][-1] == ("convolutions: none sparse, the fastest whole artifact measured by 1.05x (its "
                                   "worst speedup over batch 1: 2 of 2 sparse (each measured faster): 0.70x of dense, "
                                   "none sparse: 0.90x of dense)")
    x = rng.standard_normal((2, 3, 10, 9)).astype(np.float32)
    assert_fp32_close(model.run(x), _ort(dense, {"x": x})[0])
    # the other way round: conv1 measured slower alone, but the model runs fastest with both sparse
    monkeypatch.setattr(fast_graph, "faster_than_dense", lambda *_a, **_k: lambda conv, _x: conv.layer.name == "conv2")
    monkeypatch.setattr(fast_graph, "graph_speed",
                        lambda model, *_a: [speed_record(1, 1, {0: 0.9, 1: 1.1, 2: 1.4}[len(model.convs)])])
    report = write_model(dense, tmp_path / "m.fast.onnx")
    assert sorted(c.layer.name for c in rt.load(tmp_path / "m.fast.onnx").convs) == ["conv1", "conv2"]
    assert report["notes"][-1].startswith("convolutions: all 2 sparse, the fastest whole artifact measured by 1.05x "
                                          "(its worst speedup over batch 1: 1 of 2")
    assert report["speed_vs_dense"][0]["speedup"] == 1.4
    # faster with sparse convolutions, but within the margin: none sparse, which cannot be slower than dense
    monkeypatch.setattr(fast_graph, "graph_speed",
                        lambda model, *_a: [speed_record(1, 1, {0: 1.0, 1: 1.02, 2: 1.04}[len(model.convs)])])
    report = write_model(dense, tmp_path / "m.fast.onnx")
    assert not rt.load(tmp_path / "m.fast.onnx").convs and report["speed_vs_dense"][0]["speedup"] == 1.0
    # planned for batch 64 too: sparse convolutions pay at batch 1 (1.3x) but lose at 64 (0.9x), so none sparse
    batches_seen = []

    def scripted(model, _dense, _inputs, batch_size=1):
        batches_seen.append(batch_size)
        return [speed_record(1, 1, 1.3 if model.convs else 1.0), speed_record(64, 1, 0.9 if model.convs else 1.0)]

    monkeypatch.setattr(fast_graph, "graph_speed", scripted)
    report = write_model(dense, tmp_path / "m.fast.onnx", batch_size=64)
    assert not rt.load(tmp_path / "m.fast.onnx").convs and set(batches_seen) == {64}
    assert "worst speedup over batch 1/64" in report["notes"][-1]


def test_a_convolution_whose_scratch_would_not_fit_the_memory_bound_is_refused(tmp_path):
    """A few bytes of file can declare a convolution of millions of input channels: its im2col panels would
    take gigabytes per thread, so the loader refuses it before anything is allocated."""
    from sparsekit.runtime.checks import DOMAIN

    c_in = 1 << 20
    inits = {"v": np.ones(1, np.float32), "i": np.zeros(1, np.int32), "p": np.asarray([0, 1], np.int64)}
    node = helper.make_node("SparseConv", ["x", "v", "i", "p"], ["y"], domain=DOMAIN, name="huge",
                            in_features=c_in * 9, out_features=1, in_channels=c_in, kernel_shape=[3, 3],
                            strides=[1, 1], pads=[1, 1, 1, 1], dilations=[1, 1], activation="none")
    proto = _model([node], inits, inputs=(("x", TensorProto.FLOAT, ["batch", c_in, 4, 4]),),
                   outputs=(("y", TensorProto.FLOAT, ["batch", 1, 4, 4]),))
    proto.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    path = tmp_path / "huge.fast.onnx"
    path.write_bytes(proto.SerializeToString())
    with pytest.raises(InputError, match=r"convolution 'huge' needs ~\d+ MiB, over this artifact's 256 MiB"):
        rt.load(path)
