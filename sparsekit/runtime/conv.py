"""Sparse 2-D convolutions (``com.sparsekit::SparseConv``): the weight (C_out, C_in, kh, kw) as a sparse
(C_out, K = C_in * kh * kw) matrix, run as the panel kernel's SpMM over im2col panels of 64 output pixels
(``csrc/runtime/sk_conv.c``): each panel's columns are built straight in the panel layout (images of fewer than
64 output pixels side by side in one panel), and the result's rows are the output channels, already
channel-major (NCHW). Bias (batch norm folded in by the exporter) and
ReLU are fused. Groups other than 1 (depthwise convolutions) stay with ONNX Runtime. A weight made of R x 1
blocks (R consecutive output channels sharing each input tap, ``CsrLayer.row_block``) runs the block kernel.

Stride-1, dilation-1 convolutions skip im2col ("shifted rows"): the batch is copied once into zero-padded planes
(C_in, batch, ho + kh - 1, wo + kw - 1), and the output is computed on the grid of padded-width pixels, where
weight column (c, i, j) of 64 consecutive grid pixels is 64 contiguous floats of the planes at a fixed offset:
the panel kernel reads the planes in place (its indices become those offsets) and the pad-column pixels it
also computes are dropped. Chosen where those wasted pixels are few (``DIRECT_MIN_USE``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from sparsekit.errors import InputError
from sparsekit.runtime.layers import _K, PANEL, CsrLayer, aligned_empty

# shifted rows when at least this share of the computed grid pixels are output pixels, per kernel (a 3x3
# kernel on 32x32 outputs: 32 of every 34 columns; on 8x8 at batch 16: 0.64; on 4x4 at batch 1: 16 of 64): the
# panel kernel's im2col costs less than that waste below 0.7, the block kernel's (R rows a load) from 0.25 on
DIRECT_MIN_USE = {"panel": 0.7, "block": 0.2}


@dataclass(frozen=True)
class ConvGeometry:
    """Kernel (kh, kw), strides, pads (top, left, bottom, right) and dilations of a convolution."""

    kernel: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilations: tuple[int, int] = (1, 1)

    def output(self, h: int, w: int) -> tuple[int, int]:
        (kh, kw), (sh, sw), (dh, dw) = self.kernel, self.strides, self.dilations
        ho = (h + self.pads[0] + self.pads[2] - dh * (kh - 1) - 1) // sh + 1
        wo = (w + self.pads[1] + self.pads[3] - dw * (kw - 1) - 1) // sw + 1
        return ho, wo


class SparseConv:
    """One sparse convolution: ``layer`` holds the (C_out, K) weight with bias and ReLU; ``block`` the panel
    kernel's column block width (0: one block). ``kernel``: ``block`` or ``panel``, the block kernel where the
    weight has row blocks (``kernel``, read-only after construction, says which runs). ``direct``: shifted rows
    instead of im2col (None: where ``uses_direct`` finds them worth it; True: wherever strides and dilations
    are 1; False: never)."""

    def __init__(self, layer: CsrLayer, in_channels: int, geometry: ConvGeometry, *, block: int = 0,
                 direct: bool | None = None) -> None:
        kh, kw = geometry.kernel
        if layer.n_in != in_channels * kh * kw:
            raise InputError(f"weight has {layer.n_in} columns, expected {in_channels}x{kh}x{kw}",
                             where=layer.name or "conv")
        if direct and (geometry.strides != (1, 1) or geometry.dilations != (1, 1)):
            raise InputError("shifted rows need strides and dilations 1", where=layer.name or "conv",
                             fix="leave direct unset (im2col)")
        self.layer, self.in_channels, self.geometry, self.block = layer, in_channels, geometry, block
        # shifted rows: None chooses per input shape (uses_direct), True / False force it on or off
        self.direct = direct
        self.kernel = "block" if layer.has_block() else "panel"
        # per-thread im2col and output panels, kept between calls (a fresh one each call page-faulted: 128->128
        # channels at 8x8 ran 100-160 us, dense ORT 110-140 us); a concurrent call allocates its own
        self._scratch: np.ndarray | None = None
        self._busy = threading.Lock()

    @property
    def out_channels(self) -> int:
        return self.layer.n_out

    def _direct_scratch(self, batch: int, h: int, w: int, threads: int) -> int:
        """Floats of the scratch of shifted rows (-1: too large for them)."""
        g = self.geometry
        ho, wo = g.output(h, w)
        return _K.conv_direct_scratch(batch, self.out_channels, threads, (self.in_channels, h, w, *g.kernel,
                                      *g.strides, g.pads[0], g.pads[1], *g.dilations, ho, wo))

    def uses_direct(self, batch: int, h: int, w: int) -> bool:
        """Whether a (batch, C_in, h, w) input runs as shifted rows rather than im2col."""
        g = self.geometry
        if self.direct is False or g.strides != (1, 1) or g.dilations != (1, 1) or batch < 1:
            return False
        ho, wo = g.output(h, w)
        if _K is None or self._direct_scratch(batch, h, w, 1) < 0:
            return False
        if self.direct:
            return True
        (kh, kw) = g.kernel
        grid = -(-(batch * (ho + kh - 1) - kh + 1) * (wo + kw - 1) // PANEL) * PANEL
        return batch * ho * wo >= DIRECT_MIN_USE[self.kernel] * grid

    def reference(self, x: np.ndarray) -> np.ndarray:
        """float64 NCHW output by explicit im2col (tests)."""
        g = self.geometry
        (kh, kw), (sh, sw), (dh, dw) = g.kernel, g.strides, g.dilations
        b, c, h, w = x.shape
        ho, wo = g.output(h, w)
        xp = np.zeros((b, c, h + g.pads[0] + g.pads[2], w + g.pads[1] + g.pads[3]))
        xp[:, :, g.pads[0]:g.pads[0] + h, g.pads[1]:g.pads[1] + w] = x
        cols = np.empty((b, c, kh, kw, ho, wo))
        for i in range(kh):
            for j in range(kw):
                cols[:, :, i, j] = xp[:, :, i * dh:i * dh + sh * (ho - 1) + 1:sh, j * dw:j * dw + sw * (wo - 1) + 1:sw]
        y = self.layer.reference(cols.reshape(b, c * kh * kw, ho * wo).transpose(0, 2, 1))
        return y.transpose(0, 2, 1).reshape(b, -1, ho, wo)

    def run(self, x: np.ndarray, threads: int = 1) -> np.ndarray:
        """x (batch, C_in, h, w) float32 -> (batch, C_out, ho, wo)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise InputError(f"convolution input has shape {list(x.shape)}, expected (batch, {self.in_channels}, "
                             "h, w)", where=self.layer.name or "conv")
        b, c, h, w = x.shape
        g = self.geometry
        ho, wo = g.output(h, w)
        if ho < 1 or wo < 1:
            raise InputError(f"input {h}x{w} is smaller than the kernel", where=self.layer.name or "conv")
        y = aligned_empty(b * self.out_channels * ho * wo).reshape(b, self.out_channels, ho, wo)
        if _K is None:
            y[...] = self.reference(x)
            return y
        rb = self.layer.row_block() if self.kernel == "block" else 1
        if rb > 1:
            (v, i, bptr, nb), order = self.layer.row_blocked(self.block), None
        else:
            v, i, bptr, nb, order = self.layer.blocked(self.block)
        args = (v, i, bptr, self.layer.bias, order, x, y, self.layer.idx_bytes, self.layer.n_in, self.out_channels,
                nb, int(self.layer.relu), int(threads), b,
                (c, h, w, *g.kernel, *g.strides, g.pads[0], g.pads[1], *g.dilations, ho, wo))
        direct = self.uses_direct(b, h, w)
        if not self._busy.acquire(blocking=False):
            _K.conv(*args, None, rb, direct)  # another thread is in this convolution: its own scratch
            return y
        try:
            if direct:
                need = self._direct_scratch(b, h, w, int(threads))
            else:
                need = (-(-(self.layer.n_in + self.out_channels) * PANEL // 16) * 16) * max(1, int(threads)) + 16
            if self._scratch is None or self._scratch.size < need:
                self._scratch = np.empty(need, np.float32)
            _K.conv(*args, self._scratch, rb, direct)
        finally:
            self._busy.release()
        return y
