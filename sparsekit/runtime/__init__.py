"""sparsekit's CPU runtime for ``fast`` artifacts (sparse MLP chains run by compiled kernels).

>>> model = sparsekit.runtime.load("model.fast.onnx", threads=1)
>>> y = model.run(x)            # x: (batch, *input_shape) float32 -> (batch, n_outputs)

See ``sparsekit.runtime.layers`` for the kernels and ``sparsekit.runtime.artifact`` for the format.
"""

from sparsekit.runtime.artifact import from_onnx, load, save, to_onnx
from sparsekit.runtime.layers import PANEL, CsrLayer, have_kernels, kernel_isa
from sparsekit.runtime.model import FastModel, default_kernel, pick_kernel

__all__ = [
    "PANEL",
    "CsrLayer",
    "FastModel",
    "default_kernel",
    "from_onnx",
    "have_kernels",
    "kernel_isa",
    "load",
    "pick_kernel",
    "save",
    "to_onnx",
]
