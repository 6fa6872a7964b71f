"""Stride-1 sparse convolutions without im2col ("shifted planes", ``csrc/runtime/sk_conv.c``): the panel and block
kernels reading zero-padded, column-shifted image planes through per-column offsets, against the float64 im2col
reference on every code path; the choice between shifted planes and im2col; and the C entry point's refusals."""

from __future__ import annotations

import numpy as np
import pytest
from runtime_helpers import K, close
from test_runtime_block import block_matrix

from sparsekit.errors import InputError
from sparsekit.runtime.conv import ConvGeometry, SparseConv
from sparsekit.runtime.layers import CsrLayer

pytestmark = pytest.mark.skipif(K is None, reason="no compiled kernels")


def _weight(rng: np.random.Generator, cout: int, k: int, rb: int) -> np.ndarray:
    if rb > 1:
        return block_matrix(rng, cout, k, rb, 0.3)
    return (rng.standard_normal((cout, k)) * (rng.random((cout, k)) < 0.3)).astype(np.float32)


def _conv(rng: np.random.Generator, cin: int, cout: int, kernel: tuple[int, int], pads: tuple[int, int, int, int],
          rb: int, *, direct: bool | None = True, block: int = 0, strides: tuple[int, int] = (1, 1)) -> SparseConv:
    kh, kw = kernel
    layer = CsrLayer.from_dense(_weight(rng, cout, cin * kh * kw, rb), rng.standard_normal(cout).astype(np.float32),
                                relu=bool(rng.integers(2)))
    assert layer.row_block() == (rb if rb > 1 else 0)
    return SparseConv(layer, cin, ConvGeometry(kernel, strides, pads), block=block, direct=direct)


CASES = [  # (cin, cout, (kh, kw), (top, left, bottom, right) pads, h, w)
    (16, 16, (1, 1), (0, 0, 0, 0), 5, 9),     # 1x1: the planes are the input, 45 pixels
    (5, 8, (3, 3), (1, 1, 1, 1), 9, 7),       # odd sizes, 5 channels
    (3, 12, (3, 3), (0, 0, 0, 0), 11, 13),    # no padding: the grid's last kw - 1 columns dropped
    (7, 8, (5, 5), (2, 2, 2, 2), 13, 6),      # padded rows (10 pixels) shorter than a panel
    (4, 16, (7, 7), (3, 3, 3, 3), 10, 17),
    (6, 4, (2, 3), (0, 1, 1, 0), 8, 5),       # non-square kernel, asymmetric pads
    (9, 8, (3, 5), (3, 0, 2, 1), 7, 12),      # pads up to 3, larger than needed for "same"
    (17, 24, (3, 3), (1, 1, 1, 1), 33, 31),   # several panels a grid row, 17 channels
    (40, 8, (3, 3), (1, 1, 1, 1), 30, 32),    # rows of 32, one image a chunk: a plane is one shifted copy
    (6, 8, (5, 5), (2, 2, 2, 2), 7, 16),      # the same with a 5x5 kernel
    (24, 8, (3, 3), (1, 1, 1, 1), 12, 4),     # 4-wide rows: 4 images a chunk fill a 16-float row
    (64, 8, (3, 3), (1, 1, 1, 1), 40, 40),    # planes of 36 KB a row: bands of 10 rows (12 plane rows each)
    (64, 8, (3, 3), (1, 1, 1, 1), 48, 48),    # bands of 12 rows, each plane one shifted copy of the band's rows
    (40, 8, (5, 5), (2, 2, 2, 2), 64, 32),    # the same with 5 plane columns, bands of 16 rows
    (40, 8, (3, 3), (0, 1, 2, 1), 61, 32),    # no top padding, two rows at the bottom: every band reads inside
]

STRIDED = [  # (cin, cout, (kh, kw), strides, pads, h, w): planes per kernel column and row phase
    (8, 8, (3, 3), (2, 2), (1, 1, 1, 1), 32, 32),   # ResNet's downsampling 3x3: 6 planes of 16x16
    (6, 8, (1, 1), (2, 2), (0, 0, 0, 0), 16, 16),   # and its 1x1 shortcut: one plane
    (5, 8, (3, 3), (2, 2), (1, 1, 1, 1), 9, 11),    # odd sizes: the last row / column reads the padding
    (4, 8, (5, 5), (3, 2), (2, 1, 2, 2), 17, 13),   # stride 3 down, 2 across; 3 row phases, asymmetric pads
    (7, 4, (2, 3), (4, 1), (0, 1, 1, 1), 19, 10),   # stride above the kernel height: 2 phases, rows skipped
    (3, 8, (7, 7), (2, 2), (3, 3, 3, 3), 30, 34),   # a 7x7 stem at stride 2
    (48, 8, (3, 3), (2, 2), (1, 1, 1, 1), 60, 60),  # bands of 10 output rows (11 plane rows a phase)
]


@pytest.mark.parametrize(("cin", "cout", "kernel", "pads", "h", "w"), CASES)
@pytest.mark.parametrize("rb", [1, 4])
def test_shifted_rows_match_the_reference_on_every_path(isa, cin, cout, kernel, pads, h, w, rb):
    rng = np.random.default_rng(cin * h + w + rb)
    conv = _conv(rng, cin, cout, kernel, pads, rb)
    assert conv.kernel == ("block" if rb > 1 else "panel")
    for batch, threads in ((1, 1), (3, 2), (16, 1), (16, 2)):
        x = rng.standard_normal((batch, cin, h, w)).astype(np.float32)
        assert conv.uses_direct(batch, h, w)
        y = conv.run(x, threads=threads)
        assert y.shape == (batch, cout, *conv.geometry.output(h, w))
        close(y, conv.reference(x))


@pytest.mark.parametrize(("cin", "cout", "kernel", "strides", "pads", "h", "w"), STRIDED)
@pytest.mark.parametrize("rb", [1, 4])
def test_strided_shifted_planes_match_the_reference_on_every_path(isa, cin, cout, kernel, strides, pads, h, w, rb):
    rng = np.random.default_rng(cin * h + w + rb + 1)
    conv = _conv(rng, cin, cout, kernel, pads, rb, strides=strides)
    for batch, threads in ((1, 1), (3, 2), (16, 1)):
        x = rng.standard_normal((batch, cin, h, w)).astype(np.float32)
        y = conv.run(x, threads=threads)
        assert y.shape == (batch, cout, *conv.geometry.output(h, w))
        close(y, conv.reference(x))


def test_shifted_rows_with_column_blocks_and_a_row_order(isa):
    """block=16: the weight in column blocks of 16 with rows sorted per block (CsrLayer.blocked)."""
    rng = np.random.default_rng(4)
    conv = _conv(rng, 6, 40, (3, 3), (1, 1, 1, 1), 1, block=16)
    x = rng.standard_normal((2, 6, 10, 10)).astype(np.float32)
    close(conv.run(x, threads=2), conv.reference(x))


def test_shifted_rows_and_im2col_give_the_same_outputs():
    rng = np.random.default_rng(5)
    direct = _conv(rng, 8, 16, (3, 3), (1, 1, 1, 1), 4)
    im2col = SparseConv(direct.layer, 8, direct.geometry, direct=False)
    x = rng.standard_normal((4, 8, 12, 12)).astype(np.float32)
    assert not im2col.uses_direct(4, 12, 12)
    close(direct.run(x), im2col.run(x).astype(np.float64))


SAME = ConvGeometry((3, 3), pads=(1, 1, 1, 1))


@pytest.mark.parametrize(("geometry", "batch", "hw", "rb", "direct"), [
    (SAME, 16, 32, 1, True),     # rows of 32 floats: every grid pixel an output
    (SAME, 16, 8, 1, True),      # 16 images of 8x8 side by side: rows of 128 floats
    (SAME, 1, 8, 1, False),      # one 8x8 image: half of each 16-float row, im2col for the panel kernel
    (SAME, 1, 8, 4, True),       # but shifted planes for the block kernel
    (SAME, 1, 4, 4, False),      # 4 of 16: im2col's quarter panel
    (SAME, 16, 4, 4, True),
    (ConvGeometry((3, 3), (2, 2), (1, 1, 1, 1)), 16, 32, 4, True),  # strided: 16x16 outputs
    (ConvGeometry((3, 3), (2, 2), (1, 1, 1, 1)), 1, 8, 1, False),    # 4x4 outputs at batch 1
    (ConvGeometry((3, 3), pads=(1, 1, 1, 1), dilations=(2, 2)), 16, 32, 4, False),  # dilated: im2col only
])
def test_shifted_rows_are_chosen_where_few_grid_pixels_are_wasted(geometry, batch, hw, rb, direct):
    layer = CsrLayer.from_dense(np.repeat(np.eye(4, 3 * 9, dtype=np.float32), rb, axis=0), None, relu=False)
    assert layer.row_block() == (rb if rb > 1 else 0)
    assert SparseConv(layer, 3, geometry).uses_direct(batch, hw, hw) is direct
    assert not SparseConv(layer, 3, geometry, direct=False).uses_direct(batch, hw, hw)


def test_forcing_shifted_planes_on_a_dilated_convolution_is_refused():
    layer = CsrLayer.from_dense(np.ones((4, 3 * 9), np.float32), None, relu=False)
    with pytest.raises(InputError, match="shifted planes need dilations 1"):
        SparseConv(layer, 3, ConvGeometry((3, 3), dilations=(2, 2)), direct=True)


@pytest.mark.parametrize(("geometry", "scratch", "message"), [
    ((4, 11, 10, 3, 3, 1, 1, 0, 0, 2, 1, 7, 8), None, "shifted planes need dilations 1"),
    ((4, 11, 10, 3, 3, 1, 1, 0, 0, 1, 1, 9, 8), np.zeros(100, np.float32), "scratch buffer too small"),
])
def test_the_c_entry_point_refuses_shifted_rows_it_cannot_run(geometry, scratch, message):
    rng = np.random.default_rng(6)
    conv = _conv(rng, 4, 6, (3, 3), (0, 0, 0, 0), 1)
    x = rng.standard_normal((2, 4, 11, 10)).astype(np.float32)
    v, i, bptr, nb, order = conv.layer.blocked(0)
    with pytest.raises(ValueError, match=message):
        K.conv(v, i, bptr, conv.layer.bias, order, x, np.zeros((2, 6, 9, 8), np.float32), conv.layer.idx_bytes, 36, 6,
               nb, 1, 1, 2, geometry, scratch, 1, True)


def test_planes_whose_offsets_would_not_fit_int32_fall_back_to_im2col():
    """40000 channels of rows 14000 wide: a band of the fewest rows (4) is 2.2e9 plane floats; nothing that size is
    allocated. With 300-wide rows the planes come in bands of 4 rows (4 x 304 floats a channel), not whole images."""
    layer = CsrLayer.from_dense(np.eye(4, 40000, dtype=np.float32), None, relu=False)
    geometry = (40000, 8, 14000, 1, 1, 1, 1, 0, 0, 1, 1, 8, 14000)
    assert K.conv_direct_scratch(1, 4, 1, geometry)[0] == -1
    floats, use = K.conv_direct_scratch(1, 4, 1, (40000, 300, 300, *geometry[3:11], 300, 300))
    assert floats == 40000 * 4 * 304 + 64 + 4 * 64 + 16 and use == pytest.approx(300 / 304, rel=0.02)
    for direct in (None, True):
        assert not SparseConv(layer, 40000, ConvGeometry((1, 1)), direct=direct).uses_direct(1, 8, 14000)
    assert SparseConv(layer, 40000, ConvGeometry((1, 1))).uses_direct(1, 16, 16)


def test_shifted_rows_on_a_scratch_of_their_own(isa):
    """No caller's scratch: a buffer of the planes' size, which end it (under ASan, a read past their slack is
    caught here)."""
    rng = np.random.default_rng(7)
    conv = _conv(rng, 3, 8, (3, 5), (1, 2, 1, 2), 4)
    x = rng.standard_normal((5, 3, 7, 9)).astype(np.float32)
    v, i, bptr, nb = conv.layer.row_blocked(0)
    y = np.zeros((5, 8, 7, 9), np.float32)
    g = conv.geometry
    K.conv(v, i, bptr, conv.layer.bias, None, x, y, conv.layer.idx_bytes, 45, 8, nb, int(conv.layer.relu), 2, 5,
           (3, 7, 9, *g.kernel, *g.strides, g.pads[0], g.pads[1], *g.dilations, 7, 9), None, 4, True)
    close(y, conv.reference(x))
