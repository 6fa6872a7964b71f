"""Dense depthwise convolutions (an ONNX ``Conv`` whose ``group`` is its channel count, one filter per channel),
with the ``Relu`` or ``Clip`` after them, run by sparsekit's own kernel (``csrc/runtime/sk_depthwise.c``).

They are not sparse: MobileNets alternate them with sparse pointwise convolutions, and handing each one to an
ONNX Runtime segment cost more than the layer (10-20 us per hand-off at batch 1). The artifact keeps them as
ordinary ``Conv`` nodes; the runtime recognizes them (``from_node``) and runs them between the sparse steps
(``graph_model._clamps``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from sparsekit.errors import InputError
from sparsekit.runtime.conv import ConvGeometry
from sparsekit.runtime.layers import _K, aligned_empty

# a Clip's bounds when its min or max input is absent
NO_BOUND = float(np.finfo(np.float32).max)


@dataclass
class Depthwise:
    """weight (C, kh, kw) float32, bias (C,) or None; the output clamped to [lo, hi] (ReLU: 0, inf)."""

    weight: np.ndarray
    bias: np.ndarray | None
    geometry: ConvGeometry
    lo: float = -np.inf
    hi: float = np.inf
    name: str = ""

    @property
    def channels(self) -> int:
        return self.weight.shape[0]

    def _checked(self, x: np.ndarray) -> tuple[np.ndarray, int, int]:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise InputError(f"depthwise convolution input has shape {list(x.shape)}, expected (batch, "
                             f"{self.channels}, h, w)", where=self.name or "depthwise")
        ho, wo = self.geometry.output(*x.shape[2:])
        if ho < 1 or wo < 1:
            raise InputError(f"input {x.shape[2]}x{x.shape[3]} is smaller than the kernel",
                             where=self.name or "depthwise")
        return x, ho, wo

    def run(self, x: np.ndarray, threads: int = 1) -> np.ndarray:
        """x (batch, C, h, w) float32 -> (batch, C, ho, wo)."""
        x, ho, wo = self._checked(x)
        if _K is None:
            return self.reference(x).astype(np.float32)
        b, g = x.shape[0], self.geometry
        y = aligned_empty(b * self.channels * ho * wo).reshape(b, self.channels, ho, wo)
        _K.depthwise(x, self.weight, self.bias, y, b, (self.channels, *x.shape[2:], *g.kernel, *g.strides,
                     g.pads[0], g.pads[1], *g.dilations, ho, wo), self.lo, self.hi, int(threads))
        return y

    def reference(self, x: np.ndarray) -> np.ndarray:
        """float64 output, tap by tap (tests, and the path without the compiled kernels)."""
        x, ho, wo = self._checked(x)
        g = self.geometry
        (kh, kw), (sh, sw), (dh, dw) = g.kernel, g.strides, g.dilations
        xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (g.pads[0], g.pads[2]), (g.pads[1], g.pads[3])))
        y = np.zeros((x.shape[0], self.channels, ho, wo))
        for i in range(kh):
            for j in range(kw):
                tap = xp[:, :, i * dh:i * dh + sh * (ho - 1) + 1:sh, j * dw:j * dw + sw * (wo - 1) + 1:sw]
                y += tap * self.weight[None, :, i, j, None, None]
        if self.bias is not None:
            y += self.bias[None, :, None, None]
        return np.clip(y, self.lo, self.hi)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def from_node(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> Depthwise | None:
    """The depthwise convolution of a ``Conv`` node with constant float weights, one filter per channel and
    explicit pads; None for any other Conv (ONNX Runtime runs it)."""
    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.input) < 2 or \
            node.input[1] not in inits or (len(node.input) > 2 and node.input[2] and node.input[2] not in inits):
        return None
    a = _attrs(node)
    w = numpy_helper.to_array(inits[node.input[1]])
    if w.dtype != np.float32 or w.ndim != 4 or w.shape[1] != 1 or a.get("group", 1) != w.shape[0] or \
            w.shape[0] < 2 or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return None
    kernel = tuple(a.get("kernel_shape", w.shape[2:]))
    strides, dilations = tuple(a.get("strides", (1, 1))), tuple(a.get("dilations", (1, 1)))
    pads = tuple(a.get("pads", (0, 0, 0, 0)))
    if kernel != w.shape[2:] or len(strides) != 2 or len(dilations) != 2 or len(pads) != 4 or \
            min(*kernel, *strides, *dilations) < 1 or min(pads) < 0 or max(*kernel, *strides, *dilations, *pads) > 64:
        return None
    bias = numpy_helper.to_array(inits[node.input[2]]) if len(node.input) > 2 and node.input[2] else None
    if bias is not None and (bias.dtype != np.float32 or bias.shape != (w.shape[0],)):
        return None
    return Depthwise(np.ascontiguousarray(w[:, 0]), bias, ConvGeometry(kernel, strides, pads, dilations),
                     name=node.name)


def clamp_of(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> tuple[float, float] | None:
    """(lo, hi) of a ``Relu``, or of a ``Clip`` whose bounds are constants; None for anything else."""
    if node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "Relu":
        return 0.0, np.inf
    if node.op_type != "Clip":
        return None
    a = _attrs(node)
    bounds = [float(a.get("min", -NO_BOUND)), float(a.get("max", NO_BOUND))]
    for k, name in enumerate(node.input[1:3]):
        if not name:
            continue
        if name not in inits:
            return None
        v = numpy_helper.to_array(inits[name])
        if v.size != 1 or v.dtype != np.float32:
            return None
        bounds[k] = float(v.reshape(()))
    return bounds[0], bounds[1]
