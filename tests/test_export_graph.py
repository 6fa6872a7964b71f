"""parse_mlp_chain / build_mlp_chain: the graph reader every structural exporter relies on."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from sparsekit.exporters.graph import UnsupportedGraphError, build_mlp_chain, parse_mlp_chain
from tolerances import assert_fp32_close

from sparsekit.errors import InputError


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10  # what onnxruntime 1.31 loads
    return model


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _matmul_add_model(rng: np.random.Generator) -> onnx.ModelProto:
    w1 = rng.standard_normal((12, 8)).astype(np.float32)   # MatMul layout (in, out)
    b1 = rng.standard_normal(8).astype(np.float32)
    w2 = rng.standard_normal((5, 8)).astype(np.float32)     # Gemm transB=1 layout (out, in)
    nodes = [
        helper.make_node("Flatten", ["x"], ["f"], axis=1),
        helper.make_node("MatMul", ["f", "w1"], ["m"]),
        helper.make_node("Add", ["m", "b1"], ["a"]),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("Identity", ["r"], ["i"]),
        helper.make_node("Gemm", ["i", "w2"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5])],
        initializer=[numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1, "b1"),
                     numpy_helper.from_array(w2, "w2")])
    return _model(graph)


def test_parse_matmul_add_gemm_chain_and_rebuild_is_exact():
    rng = np.random.default_rng(0)
    model = _matmul_add_model(rng)
    shape, layers = parse_mlp_chain(model)
    assert shape == (3, 4)
    assert [layer.weight.shape for layer in layers] == [(8, 12), (5, 8)]
    assert [layer.activation for layer in layers] == ["relu", None]
    assert layers[0].bias_name == "b1" and layers[1].bias is None
    rebuilt = build_mlp_chain(shape, layers, output_name="y", input_name="x")
    onnx.checker.check_model(rebuilt, full_check=True)
    x = rng.standard_normal((4, 3, 4)).astype(np.float32)
    assert_fp32_close(_run(rebuilt, x), _run(model, x))  # Gemm vs MatMul+Add: equal to rounding


def test_gather_keeps_input_signature():
    rng = np.random.default_rng(1)
    model = _matmul_add_model(rng)
    shape, layers = parse_mlp_chain(model)
    keep = np.array([0, 2, 5, 11])
    layers[0].weight = np.ascontiguousarray(layers[0].weight[:, keep])
    rebuilt = build_mlp_chain(shape, layers, input_indices=keep)
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    sess = ort.InferenceSession(rebuilt.SerializeToString(), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape == ["batch", 3, 4]
    ref = np.maximum(x.reshape(2, -1)[:, keep] @ layers[0].weight.T + layers[0].bias, 0) @ layers[1].weight.T
    assert_fp32_close(sess.run(None, {"input": x})[0], ref)


def _conv_model() -> onnx.ModelProto:
    w = np.ones((2, 1, 3, 3), np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "c",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2, 4, 4])],
        initializer=[numpy_helper.from_array(w, "w")])
    return _model(graph)


def _residual_model() -> onnx.ModelProto:
    w = np.eye(4, dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w"], ["h"], transB=1), helper.make_node("Add", ["h", "x"], ["y"])],
        "r", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        initializer=[numpy_helper.from_array(w, "w")])
    return _model(graph)


@pytest.mark.parametrize(("model", "needle"), [(_conv_model, "Conv"), (_residual_model, "residual")])
def test_unsupported_graphs_name_the_problem(model, needle):
    with pytest.raises(UnsupportedGraphError) as info:
        parse_mlp_chain(model())
    assert needle in str(info.value)
    assert isinstance(info.value, InputError) and info.value.exit_code == 2
