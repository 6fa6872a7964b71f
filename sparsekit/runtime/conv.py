"""Sparse 2-D convolutions (``com.sparsekit::SparseConv``): the weight (C_out, C_in, kh, kw) as a sparse
(C_out, K = C_in * kh * kw) matrix, run as the panel kernel's SpMM over im2col panels of 64 output pixels
(``csrc/runtime/sk_conv.c``): each panel's columns are built straight in the panel layout (images of fewer than
64 output pixels side by side in one panel), and the result's rows are the output channels, already
channel-major (NCHW). Bias (batch norm folded in by the exporter) and
ReLU are fused. Groups other than 1 (depthwise convolutions) stay with ONNX Runtime. A weight made of R x 1
blocks (R consecutive output channels sharing each input tap, ``CsrLayer.row_block``) runs the block kernel.

Dilation-1 convolutions skip im2col ("shifted planes"): a chunk of images is copied once into zero-padded planes,
one per kernel column j (and, for stride s, per row phase i mod s), holding the input shifted by j columns (every
s-th column and row from there), with the chunk's images side by side along each row and rows padded to a multiple
of 16 floats. Weight column (c, i, j) of 64 consecutive output pixels is then 64 contiguous, 64-byte aligned floats
of one plane at a fixed offset (row i // s of channel c): the panel kernel reads the planes in place (its indices
become those offsets). Chosen where the rows' padding to 16
floats wastes few pixels (``DIRECT_MIN_USE``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from sparsekit.errors import InputError
from sparsekit.runtime.layers import _K, PANEL, CsrLayer, aligned_empty

CALLS_KEPT = 64  # input shapes whose call a convolution keeps
# shifted planes when at least this share of the grid pixels they compute are output pixels, per kernel. Their rows
# are padded to 16 floats: 32x32 and 16x16 outputs use all of them; 8x8 at batch 1 half (im2col of the whole image
# costs the panel kernel about the same there); 4x4 at batch 1 a quarter (im2col's quarter panel computes 16 lanes)
DIRECT_MIN_USE = {"panel": 0.6, "block": 0.4}
# column blocks of shifted planes: a 64-pixel panel of 288 columns (32 channels of a 3x3 kernel) reads 72 KB of the
# planes per block; one block for all of K read 147 KB (64 channels) to 1.2 MB (512) per panel, and 512 channels at
# 4x4, batch 16, ran 1.25x faster in blocks of 288 than in one (72 and 144: more passes over the output rows)
DIRECT_BLOCK_COLUMNS = 288


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


@dataclass(frozen=True)
class _Call:
    """One input shape's call of ``_K.conv``, worked out once (the Python around a 3x3 convolution of 16
    channels at 32x32 took 10 us of its 25). ``size``/``out``: the output; the rest ``_K.conv``'s arguments."""

    out: tuple[int, int, int, int]
    size: int
    layout: tuple = ()
    sizes: tuple[int, int, int, int] = (0, 0, 0, 0)
    threads: int = 1
    geometry: tuple[int, ...] = ()
    rb: int = 1
    direct: bool = False
    width: int = 0
    scratch: int = 0


class SparseConv:
    """One sparse convolution: ``layer`` holds the (C_out, K) weight with bias and ReLU; ``block`` the panel
    kernel's column block width (0: one block). ``kernel``: ``block`` or ``panel``, the block kernel where the
    weight has row blocks (``kernel``, read-only after construction, says which runs). ``direct``: shifted planes
    instead of im2col (None: where ``uses_direct`` finds them worth it; True: wherever dilations are 1; False:
    never)."""

    def __init__(self, layer: CsrLayer, in_channels: int, geometry: ConvGeometry, *, block: int = 0,
                 direct: bool | None = None) -> None:
        kh, kw = geometry.kernel
        if layer.n_in != in_channels * kh * kw:
            raise InputError(f"weight has {layer.n_in} columns, expected {in_channels}x{kh}x{kw}",
                             where=layer.name or "conv")
        if direct and geometry.dilations != (1, 1):
            raise InputError("shifted planes need dilations 1", where=layer.name or "conv",
                             fix="leave direct unset (im2col)")
        self.layer, self.in_channels, self.geometry, self.block = layer, in_channels, geometry, block
        # shifted planes: None chooses per input shape (uses_direct), True / False force them on or off
        self.direct = direct
        self.kernel = "block" if layer.has_block() else "panel"
        # per-thread im2col and output panels, kept between calls (a fresh one each call page-faulted: 128->128
        # channels at 8x8 ran 100-160 us, dense ORT 110-140 us); a concurrent call allocates its own
        self._scratch: np.ndarray | None = None
        self._busy = threading.Lock()
        self._calls: dict[tuple, _Call] = {}  # (input shape, threads, direct, block) -> its call

    @property
    def out_channels(self) -> int:
        return self.layer.n_out

    def _direct_scratch(self, batch: int, h: int, w: int, threads: int) -> tuple[int, float]:
        """(floats of the scratch of shifted planes, -1: too large for them; share of the pixels they compute
        that are output pixels)."""
        g = self.geometry
        ho, wo = g.output(h, w)
        return _K.conv_direct_scratch(batch, self.out_channels, threads, (self.in_channels, h, w, *g.kernel,
                                      *g.strides, g.pads[0], g.pads[1], *g.dilations, ho, wo))

    def direct_block(self) -> int:
        """Column block width of shifted planes: whole input channels, about ``DIRECT_BLOCK_COLUMNS`` columns
        (0: one block)."""
        taps = self.geometry.kernel[0] * self.geometry.kernel[1]
        block = max(1, DIRECT_BLOCK_COLUMNS // taps) * taps
        return block if block < self.layer.n_in else 0

    def uses_direct(self, batch: int, h: int, w: int) -> bool:
        """Whether a (batch, C_in, h, w) input runs as shifted planes rather than im2col."""
        g = self.geometry
        if self.direct is False or g.dilations != (1, 1) or batch < 1:
            return False
        if _K is None:
            return False
        floats, use = self._direct_scratch(batch, h, w, 1)
        return floats >= 0 and (bool(self.direct) or use >= DIRECT_MIN_USE[self.kernel])

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

    def _output(self, x: np.ndarray) -> tuple[int, int]:
        """(ho, wo) of a checked (batch, C_in, h, w) input."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise InputError(f"convolution input has shape {list(x.shape)}, expected (batch, {self.in_channels}, "
                             "h, w)", where=self.layer.name or "conv")
        ho, wo = self.geometry.output(*x.shape[2:])
        if ho < 1 or wo < 1:
            raise InputError(f"input {x.shape[2]}x{x.shape[3]} is smaller than the kernel",
                             where=self.layer.name or "conv")
        return ho, wo

    def _residual(self, residual: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray | None:
        if residual is None:
            return None
        if self.layer.relu:
            raise InputError("a residual is added before the activation, and this convolution's ReLU is its own",
                             where=self.layer.name or "conv", fix="add the residual to the output instead")
        residual = np.ascontiguousarray(residual, dtype=np.float32)
        if residual.shape != shape:
            raise InputError(f"residual has shape {list(residual.shape)}, the convolution's output {list(shape)}",
                             where=self.layer.name or "conv", fix="pass a residual shaped like the output")
        return residual

    def run(self, x: np.ndarray, threads: int = 1, *, residual: np.ndarray | None = None,
            residual_relu: bool = False, clamp: tuple[float, float] | None = None) -> np.ndarray:
        """x (batch, C_in, h, w) float32 -> (batch, C_out, ho, wo). ``residual`` (shaped like the output; a
        convolution without its own ReLU): ``conv(x) + bias + residual``, then ReLU where ``residual_relu``,
        computed as the output is written (a ResNet block's Add and Relu). ``clamp`` (0, hi): the output clamped
        to [0, hi] as it is written (the ReLU6 after a convolution without a residual)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        key = (x.shape, int(threads), self.direct, self.block)
        call = self._calls.get(key)
        if call is None:
            call = self._prepare(x, int(threads))
            if _K is not None:
                if len(self._calls) >= CALLS_KEPT:  # a caller feeding ever new shapes: start over
                    self._calls.clear()
                self._calls[key] = call
        y = aligned_empty(call.size).reshape(call.out)
        residual = self._residual(residual, call.out)
        hi = self._clamp(clamp, residual)
        if _K is None:
            y[...] = self.reference(x) if residual is None else self.reference(x) + residual
            if (residual is not None and residual_relu) or clamp is not None:
                np.clip(y, 0, hi, out=y)
            return y
        relu = residual_relu if residual is not None else self.layer.relu or clamp is not None
        args = (*call.layout, x, y, *call.sizes, int(relu), call.threads, call.out[0], call.geometry)
        self._call(args, call, residual, hi)
        return y

    def _clamp(self, clamp: tuple[float, float] | None, residual: np.ndarray | None) -> float:
        """The upper bound of a fused clamp (inf: none)."""
        if clamp is None:
            return np.inf
        if residual is not None or clamp[0] != 0.0 or not clamp[1] > 0.0:
            raise InputError(f"a fused clamp is [0, hi] with hi > 0 and no residual, not {list(clamp)}",
                             where=self.layer.name or "conv", fix="apply the clamp to the output instead")
        return float(clamp[1])

    def _prepare(self, x: np.ndarray, threads: int) -> _Call:
        """What ``run`` works out once per input shape: the output, the path, the weight's layout."""
        (b, c, h, w), (ho, wo) = x.shape, self._output(x)
        out, g = (b, self.out_channels, ho, wo), self.geometry
        if _K is None:
            return _Call(out, b * self.out_channels * ho * wo)
        direct = self.uses_direct(b, h, w)
        block = self.direct_block() if direct else self.block
        if not direct and b * ho * wo <= PANEL // 2:
            # a quarter or half panel reads 64 or 128 bytes of each im2col row: all of K stays in cache in one
            # block, and each column block would cost every output row another pass (512 channels of 4x4 at
            # batch 1: 18 blocks of 256 columns, 9216 row passes of ~13 nonzeros each)
            block = 0
        rb = self.layer.row_block() if self.kernel == "block" else 1
        if rb > 1:
            (v, i, bptr, nb), order = self.layer.row_blocked(block), None
        else:
            v, i, bptr, nb, order = self.layer.blocked(block)
        if direct:
            scratch = self._direct_scratch(b, h, w, threads)[0]
        else:
            scratch = (-(-(self.layer.n_in + self.out_channels) * PANEL // 16) * 16) * max(1, threads) + 16
        return _Call(out, b * self.out_channels * ho * wo, (v, i, bptr, self.layer.bias, order),
                     (self.layer.idx_bytes, self.layer.n_in, self.out_channels, nb), threads,
                     (c, h, w, *g.kernel, *g.strides, g.pads[0], g.pads[1], *g.dilations, ho, wo), rb, direct,
                     block if 0 < block < self.layer.n_in else 0, scratch)

    def _call(self, args: tuple, call: _Call, residual: np.ndarray | None, hi: float) -> None:
        """_K.conv on this convolution's kept scratch (a concurrent call: a scratch of its own)."""
        if not self._busy.acquire(blocking=False):
            _K.conv(*args, None, call.rb, call.direct, call.width, residual, hi)
            return
        try:
            if self._scratch is None or self._scratch.size < call.scratch:
                self._scratch = np.empty(call.scratch, np.float32)
            _K.conv(*args, self._scratch, call.rb, call.direct, call.width, residual, hi)
        finally:
            self._busy.release()
