"""Export a (squashed) torch model to a dense fp32 ONNX file, the reference for every other format.

We use the dynamo exporter (``torch.onnx.export(..., dynamo=True)``, the default in torch 2.13, needs
``onnxscript``) at opset 18, with a dynamic batch axis; the input is named ``input`` and the output
``logits``. Initializer names equal the torch parameter names, which is how exporters find layers.
Exporter and opset are recorded in the file's metadata.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsekit.fileio import atomic_path

EXPORTER = "torch.onnx.export(dynamo=True)"
DEFAULT_OPSET = 18


def export_dense_onnx(model: nn.Module, example_input: torch.Tensor, path: str | os.PathLike[str], *,
                      opset: int = DEFAULT_OPSET, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``model`` (weights as they are: masked entries must already be 0) to ``path`` atomically."""
    import onnx

    model = model.eval()
    example_input = example_input[:2].detach().cpu().float()
    batch = torch.export.Dim("batch", min=1)
    onnx_logger = logging.getLogger("torch.onnx")
    old_level = onnx_logger.level
    onnx_logger.setLevel(logging.ERROR)  # silence "torchvision is not installed" notices
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model.cpu(), (example_input,), dynamo=True, opset_version=opset,
                                    input_names=["input"], output_names=["logits"],
                                    dynamic_shapes=({0: batch},), verbose=False, optimize=True)
    onnx_logger.setLevel(old_level)
    proto = program.model_proto
    info = {"exporter": EXPORTER, "opset": opset, "torch_version": torch.__version__}
    meta = {**info, **(metadata or {})}
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key = str(key)
        entry.value = value if isinstance(value, str) else __import__("json").dumps(value)
    with atomic_path(Path(path)) as tmp:
        onnx.save_model(proto, str(tmp))
    return info
