"""Export a (squashed) torch model to a dense fp32 ONNX file, the reference for every other format.

We use the dynamo exporter (``torch.onnx.export(..., dynamo=True)``, the default in torch 2.13, needs
``onnxscript``) at opset 18, with a dynamic batch axis (and the other dynamic axes ``sparsekit.save`` was
given); one input is named ``input``, several are named as ``sparsekit.model_inputs`` says; the output is
``logits``. Initializer names equal the torch parameter names, which is how exporters find layers.
Exporter and opset are recorded in the file's metadata. A model torch cannot export with the given
inputs is an ``InputError`` with torch's first line, not a traceback.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsekit.errors import InputError
from sparsekit.fileio import atomic_path
from sparsekit.model_inputs import ModelInputs, as_model_inputs

EXPORTER = "torch.onnx.export(dynamo=True)"
DEFAULT_OPSET = 18


def export_dense_onnx(model: nn.Module, example_input: torch.Tensor | ModelInputs, path: str | os.PathLike[str], *,
                      opset: int = DEFAULT_OPSET, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``model`` (weights as they are: masked entries must already be 0) to ``path`` atomically."""
    import onnx

    model = model.eval()
    inputs = as_model_inputs(example_input, model).to(torch.device("cpu"))
    inputs = inputs.take(0, 2) if inputs.batch >= 2 else _doubled(inputs)  # a batch of 1 would be specialised
    args, kwargs, shapes = inputs.export_args()
    torch_logger = logging.getLogger("torch")
    old_level = torch_logger.level
    torch_logger.setLevel(logging.ERROR)  # silence "torchvision is not installed" and symbolic-shape notices
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model.cpu(), args, kwargs=kwargs, dynamo=True, opset_version=opset,
                                        input_names=inputs.names, output_names=["logits"],
                                        dynamic_shapes=shapes, verbose=False, optimize=True)
    except Exception as exc:  # torch.export raises many types (UserError, ConstraintViolation, TorchExportError...)
        raise InputError(f"torch cannot export the model to ONNX with this example input: {_first_line(exc)}",
                         where=str(path), fix="the model must trace with these inputs (no Python branches on "
                         "tensor values); check dynamic_axes and the inputs' dtypes") from exc
    finally:
        torch_logger.setLevel(old_level)
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


def _doubled(inputs: ModelInputs) -> ModelInputs:
    return ModelInputs({k: torch.cat([v, v]) for k, v in inputs.tensors.items()}, inputs.keyword, inputs.dynamic)


def _first_line(exc: BaseException) -> str:
    """The root cause's type and first line (torch wraps it in TorchExportError), without terminal colours."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return (f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__)[:300]
