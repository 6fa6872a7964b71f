"""Depthwise convolutions run by sparsekit (``sparsekit/runtime/depthwise.py``, ``csrc/runtime/sk_depthwise.c``):
the kernel against ONNX Runtime's grouped Conv on every code path, which Conv nodes it takes, and MobileNet
blocks whose depthwise layers and ReLU6 clamps run between the sparse steps with no ONNX Runtime segment."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from runtime_helpers import K, isa  # noqa: F401  (isa: the fixture running a test once per code path)
from sparsekit.exporters.fast_graph import pack_graph
from tolerances import assert_fp32_close

from sparsekit.errors import InputError
from sparsekit.runtime import depthwise
from sparsekit.runtime.graph_model import ConvStep, DenseStep, DepthwiseStep, GraphModel
from sparsekit.runtime.layers import kernel_isa

NATIVE = kernel_isa() == "avx512"


def _model(nodes, inits, x_shape, y_shape, opset: int = 18) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
                              initializer=[numpy_helper.from_array(a, n) for n, a in inits.items()])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 10
    return m


def _ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _dw_model(rng, c, kernel, strides, pads, dilations, h, w, bias=True):
    inits = {"w": rng.standard_normal((c, 1, *kernel)).astype(np.float32)}
    if bias:
        inits["b"] = rng.standard_normal(c).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w", *(["b"] if bias else [])], ["y"], name="dw", group=c,
                            kernel_shape=list(kernel), strides=list(strides), pads=list(pads),
                            dilations=list(dilations))
    return _model([node], inits, ["batch", c, h, w], None)


# (channels, kernel, strides, pads, dilations, h, w): "same" stride 1 (read in place), column stride 2 (spans),
# stride 3 and uneven pads (padded phases), dilation, planes smaller than a vector, a 1x1 image
GEOMETRIES = [
    (8, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 7, 9),
    (20, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 4, 4),
    (5, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 16, 16),
    (6, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 9, 37),
    (3, (5, 5), (2, 3), (2, 1, 0, 2), (1, 1), 11, 13),
    (4, (3, 3), (1, 1), (2, 2, 2, 2), (2, 2), 12, 12),
    (6, (3, 1), (3, 1), (0, 1, 2, 0), (1, 1), 9, 9),
    (16, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, 1),
    (7, (5, 5), (1, 1), (2, 2, 2, 2), (1, 1), 6, 21),
]


@pytest.mark.parametrize(("c", "kernel", "strides", "pads", "dilations", "h", "w"), GEOMETRIES)
def test_the_kernel_matches_onnx_runtime_on_every_path(isa, c, kernel, strides, pads, dilations, h, w):  # noqa: F811
    rng = np.random.default_rng(c * h + w)
    model = _dw_model(rng, c, kernel, strides, pads, dilations, h, w)
    dw = depthwise.from_node(model.graph.node[0], {t.name: t for t in model.graph.initializer})
    assert dw is not None and dw.channels == c
    x = rng.standard_normal((3, c, h, w)).astype(np.float32)
    want = _ort(model, x)
    for threads in (1, 2):
        assert_fp32_close(dw.run(x, threads=threads), want)
    dw.lo, dw.hi = 0.0, 6.0  # a ReLU6 fused
    assert_fp32_close(dw.run(x), np.clip(want, 0.0, 6.0))
    assert_fp32_close(dw.reference(x), np.clip(want, 0.0, 6.0))
    assert dw.run(x[:0]).shape == (0, *want.shape[1:])


def test_only_depthwise_convolutions_with_constant_weights_and_explicit_pads_are_taken():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 1, 3, 3)).astype(np.float32)
    inits = {t.name: t for t in [numpy_helper.from_array(w, "w"), numpy_helper.from_array(w[:2], "w2"),
                                 numpy_helper.from_array(np.zeros((4, 2, 3, 3), np.float32), "wg"),
                                 numpy_helper.from_array(w.astype(np.float64), "w64")]}
    conv = helper.make_node
    assert depthwise.from_node(conv("Conv", ["x", "w"], ["y"], group=4, pads=[1, 1, 1, 1]), inits) is not None
    refused = [conv("Conv", ["x", "w"], ["y"]),                                  # group 1: a full convolution
               conv("Conv", ["x", "wg"], ["y"], group=2),                          # two channels per group
               conv("Conv", ["x", "w"], ["y"], group=4, auto_pad="SAME_UPPER"),   # pads left to ONNX Runtime
               conv("Conv", ["x", "weights_in"], ["y"], group=4),                  # a weight computed in the graph
               conv("Conv", ["x", "w64"], ["y"], group=4),                         # not float32
               conv("Conv", ["x", "w", "bias_in"], ["y"], group=4),                # a computed bias
               conv("Conv", ["x", "w"], ["y"], group=4, kernel_shape=[5, 5]),      # kernel_shape disagrees
               conv("ConvTranspose", ["x", "w"], ["y"], group=4)]
    assert [depthwise.from_node(n, inits) for n in refused] == [None] * len(refused)


def test_the_clamps_of_relu_and_constant_clips():
    inits = {t.name: t for t in [numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
                                 numpy_helper.from_array(np.array(6.0, np.float32), "six")]}
    node = helper.make_node
    assert depthwise.clamp_of(node("Relu", ["a"], ["b"]), inits) == (0.0, np.inf)
    assert depthwise.clamp_of(node("Clip", ["a", "zero", "six"], ["b"]), inits) == (0.0, 6.0)
    assert depthwise.clamp_of(node("Clip", ["a", "", "six"], ["b"]), inits) == (-depthwise.NO_BOUND, 6.0)
    assert depthwise.clamp_of(node("Clip", ["a"], ["b"], min=0.0, max=6.0), inits) == (0.0, 6.0)  # opset 6
    assert depthwise.clamp_of(node("Clip", ["a", "zero", "computed"], ["b"]), inits) is None
    assert depthwise.clamp_of(node("Sigmoid", ["a"], ["b"]), inits) is None


def test_a_wrong_input_is_refused_with_one_line():
    dw = depthwise.Depthwise(np.ones((4, 3, 3), np.float32), None, depthwise.ConvGeometry((3, 3)), name="dw1")
    with pytest.raises(InputError, match=r"input has shape \[1, 3, 8, 8\], expected \(batch, 4, h, w\)"):
        dw.run(np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(InputError, match="smaller than the kernel"):
        dw.run(np.zeros((1, 4, 2, 8), np.float32))


@pytest.mark.skipif(K is None, reason="compiled kernels only")
def test_the_kernel_checks_its_buffers():
    x, y, w = np.zeros((1, 4, 8, 8), np.float32), np.zeros((1, 4, 8, 8), np.float32), np.zeros((4, 3, 3), np.float32)
    geo = (4, 8, 8, 3, 3, 1, 1, 1, 1, 1, 1, 8, 8)
    K.depthwise(x, w, None, y, 1, geo, 0.0, 6.0, 1)
    with pytest.raises(ValueError, match="y"):
        K.depthwise(x, w, None, y[:, :3], 1, geo, 0.0, 6.0, 1)
    with pytest.raises(ValueError, match="x"):
        K.depthwise(x, w, None, y, 2, geo, 0.0, 6.0, 1)
    with pytest.raises(ValueError, match="weight"):
        K.depthwise(x, w[:3], None, y, 1, geo, 0.0, 6.0, 1)
    with pytest.raises(ValueError, match="geometry"):
        K.depthwise(x, w, None, y, 1, (4, 8, 8, 3, 3, 0, 1, 1, 1, 1, 1, 8, 8), 0.0, 6.0, 1)


def _mobile_block(rng) -> onnx.ModelProto:
    """x (b, 8, 10, 10) -> 1x1 conv 8->16 + Clip(0, 6) -> depthwise 3x3 + Clip(0, 6) -> 1x1 conv 16->8 -> + x ->
    depthwise 3x3 stride 2 + Relu (a MobileNetV2 block, then a downsampling depthwise layer); 1x1 weights 70% zeros."""
    def sparse(*shape):
        return (rng.standard_normal(shape) * (rng.random(shape) < 0.3)).astype(np.float32)

    inits = {"w1": sparse(16, 8, 1, 1), "b1": rng.standard_normal(16).astype(np.float32),
             "wd": rng.standard_normal((16, 1, 3, 3)).astype(np.float32),
             "bd": rng.standard_normal(16).astype(np.float32),
             "w2": sparse(8, 16, 1, 1), "b2": rng.standard_normal(8).astype(np.float32),
             "wd2": rng.standard_normal((8, 1, 3, 3)).astype(np.float32),
             "zero": np.array(0.0, np.float32), "six": np.array(6.0, np.float32)}
    n = helper.make_node
    nodes = [n("Conv", ["x", "w1", "b1"], ["e"], name="expand"), n("Clip", ["e", "zero", "six"], ["e6"]),
             n("Conv", ["e6", "wd", "bd"], ["d"], name="dw", group=16, pads=[1, 1, 1, 1]),
             n("Clip", ["d", "zero", "six"], ["d6"]),
             n("Conv", ["d6", "w2", "b2"], ["p"], name="project"), n("Add", ["p", "x"], ["s"]),
             n("Conv", ["s", "wd2"], ["r"], name="down", group=8, strides=[2, 2], pads=[1, 1, 1, 1]),
             n("Relu", ["r"], ["y"])]
    return _model(nodes, inits, ["batch", 8, 10, 10], ["batch", 8, 5, 5])


def test_a_mobilenet_block_runs_with_no_onnx_runtime_segment():
    rng = np.random.default_rng(5)
    dense = _mobile_block(rng)
    packed = pack_graph(dense)
    assert [n.op_type for n in packed.proto.graph.node] == ["SparseConv", "Clip", "Conv", "Clip", "SparseConv",
                                                            "Add", "Conv", "Relu"]
    model = GraphModel(packed.proto, packed.layers)
    kinds = [type(s).__name__ for s in model._steps]
    if NATIVE:  # the depthwise layers and every activation run in sparsekit's steps
        assert kinds == ["ConvStep", "DepthwiseStep", "ConvStep", "DepthwiseStep"]
        expand, dw, project, down = model._steps
        assert expand.clamp == (0.0, 6.0) and (dw.conv.lo, dw.conv.hi) == (0.0, 6.0)
        assert project.residual == "x" and (down.conv.lo, down.conv.hi, down.y) == (0.0, np.inf, "y")
        assert model.info()["segments"] == 0 and model.info()["depthwise"] == 2
    else:  # the AVX2 and generic paths leave depthwise layers to ONNX Runtime
        assert not any(isinstance(s, DepthwiseStep) for s in model._steps)
        assert any(isinstance(s, DenseStep) for s in model._steps)
    for batch in (1, 3):
        x = rng.standard_normal((batch, 8, 10, 10)).astype(np.float32) * 3
        want = _ort(dense, x)
        assert_fp32_close(model.run(x), want)
        assert_fp32_close(_ort(model.to_onnx(), x), want)  # the file is unchanged: stock ORT agrees


def test_a_clip_not_from_zero_stays_in_onnx_runtime():
    rng = np.random.default_rng(6)
    w = (rng.standard_normal((6, 4, 1, 1)) * (rng.random((6, 4, 1, 1)) < 0.3)).astype(np.float32)
    inits = {"w": w, "lo": np.array(-1.0, np.float32), "six": np.array(6.0, np.float32)}
    n = helper.make_node
    nodes = [n("Conv", ["x", "w"], ["c"], name="conv"), n("Clip", ["c", "lo", "six"], ["y"])]
    packed = pack_graph(_model(nodes, inits, ["batch", 4, 5, 5], ["batch", 6, 5, 5]))
    model = GraphModel(packed.proto, packed.layers)
    step = next(s for s in model._steps if isinstance(s, ConvStep))
    assert step.clamp is None and isinstance(model._steps[-1], DenseStep)  # Clip(-1, 6) is not a fused [0, hi]
    x = rng.standard_normal((2, 4, 5, 5)).astype(np.float32) * 4
    assert_fp32_close(model.run(x), _ort(_model(nodes, inits, ["batch", 4, 5, 5], ["batch", 6, 5, 5]), x))


def test_a_depthwise_layer_between_two_ordinary_nodes_stays_in_onnx_runtime():
    """Taking it would cut its ONNX Runtime segment in two: two hand-offs more, none fewer."""
    rng = np.random.default_rng(7)
    sparse = (rng.standard_normal((6, 4, 1, 1)) * (rng.random((6, 4, 1, 1)) < 0.3)).astype(np.float32)
    inits = {"ws": sparse, "wa": rng.standard_normal((6, 6, 1, 1)).astype(np.float32),
             "wd": rng.standard_normal((6, 1, 3, 3)).astype(np.float32),
             "wb": rng.standard_normal((6, 6, 1, 1)).astype(np.float32)}
    n = helper.make_node
    nodes = [n("Conv", ["x", "ws"], ["s"], name="sparse"), n("Relu", ["s"], ["r"]),
             n("Conv", ["r", "wa"], ["a"], name="dense_a"), n("Relu", ["a"], ["ra"]),
             n("Conv", ["ra", "wd"], ["d"], name="dw", group=6, pads=[1, 1, 1, 1]), n("Relu", ["d"], ["rd"]),
             n("Conv", ["rd", "wb"], ["y"], name="dense_b")]
    dense = _model(nodes, inits, ["batch", 4, 6, 6], ["batch", 6, 6, 6])
    packed = pack_graph(dense, keep_conv=lambda conv, _x: conv.layer.name == "sparse")
    model = GraphModel(packed.proto, packed.layers)
    assert [type(s).__name__ for s in model._steps] == ["ConvStep", "DenseStep"]
    x = rng.standard_normal((2, 4, 6, 6)).astype(np.float32)
    assert_fp32_close(model.run(x), _ort(dense, x))


def test_fuzzed_depthwise_layers_are_refused_or_match_onnx_runtime(tmp_path):
    """The MobileNet block's artifact with a depthwise node's attributes or weight mutated: sparsekit refuses it
    with an InputError, or runs it and agrees with ONNX Runtime on the same file (or ONNX Runtime refuses it too:
    then sparsekit's answer is checked against its own reference of each layer; no other exception, no crash)."""
    import sparsekit.runtime as rt

    rng = np.random.default_rng(8)
    packed = pack_graph(_mobile_block(np.random.default_rng(5)))
    seed = GraphModel(packed.proto, packed.layers).to_onnx()
    ints = [-1, 0, 1, 2, 3, 5, 8, 16, 65, 2**31 - 1]
    outcomes = {"refused": 0, "ran": 0}
    for case in range(40):
        proto = onnx.ModelProto()
        proto.CopyFrom(seed)
        node = [nd for nd in proto.graph.node if nd.op_type == "Conv"][case % 2]
        name = ["group", "kernel_shape", "strides", "pads", "dilations"][case % 5]
        old = next((a for a in node.attribute if a.name == name), None)
        width = {"group": 0, "kernel_shape": 2, "strides": 2, "pads": 4, "dilations": 2}[name]
        values = [int(rng.choice(ints)) for _ in range(max(1, width))] if old is None or old.ints else []
        if old is not None:
            node.attribute.remove(old)
        node.attribute.append(helper.make_attribute(name, values if width else int(rng.choice(ints))))
        if case % 4 == 0:  # and the weight's shape
            init = next(t for t in proto.graph.initializer if t.name == node.input[1])
            w = numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w[: max(1, w.shape[0] // 2)]), init.name))
        path = tmp_path / "m.fast.onnx"
        path.write_bytes(proto.SerializeToString())
        x = rng.standard_normal((2, 8, 10, 10)).astype(np.float32)
        try:
            got = rt.load(path).run(x)
        except InputError:
            outcomes["refused"] += 1
            continue
        outcomes["ran"] += 1
        try:
            want = _ort(proto, x)
        except Exception:  # ONNX Runtime refuses the mutated node: nothing to compare with
            continue
        assert_fp32_close(got, want)
    assert outcomes["refused"] > 0 and outcomes["ran"] > 0, outcomes


@pytest.mark.parametrize(("strides", "h"), [((1, 1), 9), ((2, 2), 9), ((3, 3), 10)])
def test_a_nan_in_the_input_stays_nan_where_it_reaches(isa, strides, h):  # noqa: F811
    """No clamp turns a NaN into a bound (max/min instructions return their second operand on a NaN)."""
    rng = np.random.default_rng(9)
    model = _dw_model(rng, 4, (3, 3), strides, (1, 1, 1, 1), (1, 1), h, h)
    dw = depthwise.from_node(model.graph.node[0], {t.name: t for t in model.graph.initializer})
    x = rng.standard_normal((1, 4, h, h)).astype(np.float32)
    x[0, 1, 4, 4] = np.nan
    for lo, hi in ((-np.inf, np.inf), (0.0, 6.0)):
        dw.lo, dw.hi = lo, hi
        got, want = dw.run(x), dw.reference(x)
        assert np.array_equal(np.isnan(got), np.isnan(want)) and np.isnan(want).sum() > 0
        assert_fp32_close(np.nan_to_num(got), np.nan_to_num(want))
