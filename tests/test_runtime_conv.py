"""Sparse 2-D convolutions (``sparsekit.runtime.conv``, ``csrc/runtime/sk_conv.c``): im2col panels fed to the panel
kernel, against an explicit float64 im2col reference, on every code path; and the checks of the C entry point."""

from __future__ import annotations

import numpy as np
import pytest
from runtime_helpers import K, close

from sparsekit.runtime.conv import ConvGeometry, SparseConv
from sparsekit.runtime.layers import CsrLayer

pytestmark = pytest.mark.skipif(K is None, reason="no compiled kernels")


def _conv(rng, cin, cout, k, density=0.3, *, bias=True, relu=True, block=0, **geo) -> SparseConv:
    kh, kw = k
    w = (rng.standard_normal((cout, cin * kh * kw)) * (rng.random((cout, cin * kh * kw)) < density)).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32) if bias else None
    return SparseConv(CsrLayer.from_dense(w, b, relu=relu), cin, ConvGeometry(k, **geo), block=block, direct=False)


GEOMETRIES = [  # (cin, cout, (kh, kw), h, w, geometry)
    (3, 8, (3, 3), 9, 9, {"strides": (2, 2), "pads": (1, 1, 1, 1)}),           # a stem
    (16, 24, (1, 1), 10, 7, {}),                                              # 1x1, 70 pixels: a ragged panel
    (8, 8, (3, 3), 12, 11, {"pads": (0, 1, 1, 0)}),                           # asymmetric pads
    (4, 6, (5, 5), 13, 13, {"dilations": (2, 2), "pads": (4, 4, 4, 4)}),      # dilation
    (3, 5, (7, 7), 20, 17, {"strides": (2, 3), "pads": (3, 3, 3, 3)}),        # unequal strides
    (6, 4, (2, 3), 5, 9, {}),                                                 # a non-square kernel
    # images of at most 64 pixels, in and out: AVX-512 builds their columns by permutes (4 images a panel at 4x4)
    (16, 8, (3, 3), 8, 8, {"pads": (1, 1, 1, 1)}),                            # 64 in, 64 out: one panel
    (12, 8, (3, 3), 7, 7, {"pads": (1, 1, 1, 1)}),                            # ResNet-18's 7x7 stage
    (6, 8, (3, 3), 8, 8, {"strides": (2, 2), "pads": (1, 1, 1, 1)}),          # 64 in, 16 out
    (5, 8, (5, 5), 6, 9, {"pads": (2, 1, 2, 3), "dilations": (1, 2)}),        # 54 in, dilated
    (32, 8, (3, 3), 4, 4, {"pads": (1, 1, 1, 1)}),                            # ResNet's last stage at batch 1
    (5, 8, (3, 3), 3, 5, {"pads": (1, 0, 1, 2)}),                             # 15 pixels, asymmetric pads
    (4, 8, (3, 3), 4, 4, {"strides": (2, 2), "pads": (1, 1, 1, 1)}),          # 2x2 outputs
    (6, 8, (1, 1), 2, 8, {}),
]


@pytest.mark.parametrize(("cin", "cout", "k", "h", "w", "geo"), GEOMETRIES)
def test_sparse_convolution_matches_the_im2col_reference_on_every_path(isa, cin, cout, k, h, w, geo):
    rng = np.random.default_rng(cin * h + w)
    for batch, threads, bias, relu, block in ((1, 1, True, True, 0), (3, 2, False, False, 0), (2, 1, True, False, 16),
                                              (5, 1, True, True, 0)):
        conv = _conv(rng, cin, cout, k, bias=bias, relu=relu, block=block, **geo)
        x = rng.standard_normal((batch, cin, h, w)).astype(np.float32)
        y = conv.run(x, threads=threads)
        assert y.shape == (batch, cout, *conv.geometry.output(h, w))
        close(y, conv.reference(x))


def test_the_reference_is_onnx_convolution():
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    conv = _conv(rng, 4, 6, (3, 3), strides=(2, 1), pads=(1, 0, 2, 1), dilations=(1, 2))
    x = rng.standard_normal((2, 4, 11, 10)).astype(np.float32)
    w = conv.layer.dense_weight().reshape(6, 4, 3, 3)
    g = conv.geometry
    node = helper.make_node("Conv", ["x", "w", "b"], ["c"], strides=list(g.strides), pads=list(g.pads),
                            dilations=list(g.dilations))
    graph = helper.make_graph([node, helper.make_node("Relu", ["c"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(conv.layer.bias, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    close(conv.reference(x), want)


@pytest.mark.parametrize(("change", "message"), [
    ({"K": 35}, "bad convolution geometry"),                       # K != c * kh * kw
    ({"geometry": (4, 11, 10, 3, 3, 0, 1, 1, 1, 1, 1, 5, 5)}, "bad convolution geometry"),   # stride 0
    ({"geometry": (4, 11, 10, 3, 3, 1, 1, -1, 1, 1, 1, 5, 5)}, "bad convolution geometry"),  # negative pad
    ({"batch": 3}, "x buffer too small"),                           # x holds 2 images
    ({"y": np.zeros(10, np.float32)}, "y buffer too small"),
    ({"residual": np.zeros(100, np.float32)}, "residual buffer too small"),
])
def test_the_c_entry_point_refuses_what_would_read_or_write_outside_its_buffers(change, message):
    rng = np.random.default_rng(2)
    conv = _conv(rng, 4, 6, (3, 3))
    x = rng.standard_normal((2, 4, 11, 10)).astype(np.float32)
    v, i, bptr, nb, order = conv.layer.blocked(0)
    args = {"K": 36, "batch": 2, "geometry": (4, 11, 10, 3, 3, 1, 1, 0, 0, 1, 1, 9, 8),
            "y": np.zeros((2, 6, 9, 8), np.float32), "residual": None}
    args.update(change)
    with pytest.raises(ValueError, match=message):
        K.conv(v, i, bptr, conv.layer.bias, order, x, args["y"], conv.layer.idx_bytes, args["K"], 6, nb, 1, 1,
               args["batch"], args["geometry"], None, 1, False, 0, args["residual"])


@pytest.mark.parametrize("width", [None, 0, 8, 40])
def test_column_blocks_need_the_width_that_covers_k(width):
    """Column blocks are built one by one into the im2col panel: the entry point needs their width (36 columns
    in 3 blocks: 12 to 17 cover them, 8 falls short, 40 overshoots)."""
    rng = np.random.default_rng(3)
    conv = _conv(rng, 4, 6, (3, 3))
    x = rng.standard_normal((2, 4, 11, 10)).astype(np.float32)
    v, i, bptr, nb, order = conv.layer.blocked(16)
    assert nb == 3
    extra = () if width is None else (None, 1, False, width)
    with pytest.raises(ValueError, match="column blocks: nblocks blocks of the block width must cover K exactly"):
        K.conv(v, i, bptr, conv.layer.bias, order, x, np.zeros((2, 6, 9, 8), np.float32), conv.layer.idx_bytes, 36,
               6, nb, 1, 1, 2, (4, 11, 10, 3, 3, 1, 1, 0, 0, 1, 1, 9, 8), *extra)


def test_concurrent_calls_of_one_convolution_do_not_share_scratch():
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(3)
    conv = _conv(rng, 16, 32, (3, 3), pads=(1, 1, 1, 1))
    xs = [rng.standard_normal((2, 16, 20, 20)).astype(np.float32) for _ in range(8)]
    with ThreadPoolExecutor(4) as pool:
        ys = list(pool.map(lambda x: conv.run(x, threads=1), xs * 4))
    for x, y in zip(xs * 4, ys, strict=True):
        close(y, conv.reference(x))


@pytest.mark.parametrize(("h", "w", "batch", "direct"), [(12, 11, 2, False), (4, 4, 3, False), (8, 8, 1, False),
                                                         (16, 16, 2, True), (32, 32, 1, True)])
@pytest.mark.parametrize("relu", [True, False])
def test_a_residual_is_added_before_the_relu_as_the_output_is_written(isa, h, w, batch, direct, relu):
    """A ResNet block's Add and Relu after its second convolution: im2col panels (ragged, images side by side,
    one 64-pixel image) and shifted planes (one panel a row copy, rows in runs)."""
    rng = np.random.default_rng(h + batch)
    conv = _conv(rng, 6, 8, (3, 3), relu=False, pads=(1, 1, 1, 1))
    conv.direct = direct
    x = rng.standard_normal((batch, 6, h, w)).astype(np.float32)
    res = rng.standard_normal((batch, 8, h, w)).astype(np.float32)
    want = conv.reference(x) + res
    got = conv.run(x, threads=2 if batch > 1 else 1, residual=res, residual_relu=relu)
    close(got, np.maximum(want, 0) if relu else want)
    assert conv.uses_direct(batch, h, w) is direct


def test_a_residual_of_another_shape_or_after_the_convolutions_own_relu_is_refused():
    from sparsekit.errors import InputError

    rng = np.random.default_rng(9)
    x = rng.standard_normal((1, 6, 8, 8)).astype(np.float32)
    with pytest.raises(InputError, match=r"residual has shape \[1, 8, 8\], the convolution's output \[1, 8, 8, 8\]"):
        _conv(rng, 6, 8, (3, 3), relu=False, pads=(1, 1, 1, 1)).run(x, residual=np.zeros((1, 8, 8), np.float32))
    with pytest.raises(InputError, match="a residual is added before the activation"):
        _conv(rng, 6, 8, (3, 3), relu=True, pads=(1, 1, 1, 1)).run(x, residual=np.zeros((1, 8, 8, 8), np.float32))


@pytest.mark.parametrize("direct", [False, True])
def test_a_fused_clamp_caps_the_output_and_a_nan_in_the_residual_stays_nan(isa, direct):
    """A ReLU6 after a convolution (clamp (0, 6)) on im2col and shifted planes; and the residual epilogue keeps a
    NaN a NaN, with and without its ReLU, rather than clamping it to a bound."""
    from sparsekit.errors import InputError

    rng = np.random.default_rng(10)
    conv = _conv(rng, 6, 8, (3, 3), relu=False, pads=(1, 1, 1, 1))
    conv.direct = direct
    x = rng.standard_normal((2, 6, 16, 16)).astype(np.float32) * 4
    close(conv.run(x, clamp=(0.0, 6.0)), np.clip(conv.reference(x), 0.0, 6.0))
    res = rng.standard_normal((2, 8, 16, 16)).astype(np.float32)
    res[1, 3, 5, 7] = np.nan
    for relu in (False, True):
        got = conv.run(x, residual=res, residual_relu=relu)
        assert np.isnan(got[1, 3, 5, 7]) and np.isnan(got).sum() == 1
    with pytest.raises(InputError, match=r"a fused clamp is \[0, hi\]"):
        conv.run(x, clamp=(-1.0, 6.0))


@pytest.mark.parametrize(("h", "w", "block", "rows_per_block"), [(4, 4, 0, 1), (7, 7, 16, 1), (8, 8, 0, 4)])
def test_a_single_panel_splits_its_output_rows_between_threads(isa, h, w, block, rows_per_block):
    """Fewer panels than threads (ResNet's last stage at batch 1): 160 output channels in parts of whole 64-row
    groups, each thread building the panel's columns for itself; with a row order (column blocks) and R x 1
    blocks."""
    from test_runtime_block import block_matrix

    rng = np.random.default_rng(h + block)
    k = 6 * 9
    wt = block_matrix(rng, 160, k, rows_per_block, 0.3) if rows_per_block > 1 else \
        (rng.standard_normal((160, k)) * (rng.random((160, k)) < 0.3)).astype(np.float32)
    conv = SparseConv(CsrLayer.from_dense(wt, rng.standard_normal(160).astype(np.float32), relu=True), 6,
                      ConvGeometry((3, 3), pads=(1, 1, 1, 1)), block=block, direct=False)
    assert conv.kernel == ("block" if rows_per_block > 1 else "panel")
    x = rng.standard_normal((1, 6, h, w)).astype(np.float32)
    want = conv.reference(x)
    close(conv.run(x, threads=2), want)
    close(conv.run(x, threads=1), want)
