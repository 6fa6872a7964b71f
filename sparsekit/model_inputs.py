"""A model's example inputs as ``sparsekit.save`` takes them: one tensor, a tuple of tensors (positional
arguments) or a dict of tensors (keyword arguments); float, integer (token ids) or bool; with dynamic axes.

``ModelInputs`` names each input as the exported ONNX graph will (one tensor: ``input``; a tuple: the
names of ``forward``'s parameters; a dict: its keys), calls the model with them and slices them by sample.
Anything that cannot be exported is an ``InputError`` naming the input, never a torch traceback.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from sparsekit.errors import InputError

WHERE = "save(example_input=...)"
BATCH = "batch"
_AXIS_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,31}\Z")
_FIX = "pass a tensor, a tuple of tensors (forward's positional arguments) or a dict of tensors (keyword arguments)"


@dataclass(frozen=True)
class ModelInputs:
    """Example inputs in call order, keyed by their ONNX input names, and each input's dynamic axes."""

    tensors: dict[str, torch.Tensor]
    keyword: bool = False                       # the model is called as model(**tensors), else model(*tensors)
    dynamic: dict[str, dict[int, str]] = field(default_factory=dict)  # input name -> {axis: dim name}

    @property
    def names(self) -> list[str]:
        return list(self.tensors)

    @property
    def batch(self) -> int:
        return int(next(iter(self.tensors.values())).shape[0])

    def take(self, start: int, stop: int) -> ModelInputs:
        """Samples ``start:stop`` of every input."""
        return ModelInputs({k: v[start:stop] for k, v in self.tensors.items()}, self.keyword, self.dynamic)

    def to(self, device: torch.device) -> ModelInputs:
        return ModelInputs({k: v.to(device) for k, v in self.tensors.items()}, self.keyword, self.dynamic)

    def call(self, model: nn.Module) -> Any:
        if self.keyword:
            return model(**self.tensors)
        return model(*self.tensors.values())

    def arrays(self) -> np.ndarray | dict[str, np.ndarray]:
        """As numpy for samples.npz and runners: the array of a one-input model, else a dict by input name."""
        arrays = {k: v.detach().cpu().numpy() for k, v in self.tensors.items()}
        return next(iter(arrays.values())) if len(arrays) == 1 else arrays

    def export_args(self) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor], Any]:
        """``(args, kwargs, dynamic_shapes)`` for ``torch.onnx.export(dynamo=True)``: one ``Dim`` per dim name."""
        dims: dict[str, Any] = {}

        def dim(name: str) -> Any:
            return dims.setdefault(name, torch.export.Dim(name, min=1))

        shapes = {k: {axis: dim(n) for axis, n in self.dynamic.get(k, {0: BATCH}).items()} for k in self.tensors}
        if self.keyword:
            return (), dict(self.tensors), shapes
        return tuple(self.tensors.values()), {}, tuple(shapes.values())


def _checked_tensor(value: Any, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise InputError(f"input {name!r} is a {type(value).__name__}, not a torch.Tensor", where=WHERE, fix=_FIX)
    if value.is_complex() or value.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise InputError(f"input {name!r} has dtype {value.dtype}, which ONNX export does not take", where=WHERE,
                         fix="pass float, integer (token ids) or bool tensors")
    if value.dim() < 1 or value.shape[0] < 1:
        raise InputError(f"input {name!r} has shape {list(value.shape)}; the first axis must hold >= 1 samples",
                         where=WHERE, fix="pass a batch of real inputs, samples on the first axis")
    value = value.detach()
    return value.float() if value.is_floating_point() else value  # float16/64 -> float32; ints and bool as given


def _positional_names(model: nn.Module, n: int) -> list[str]:
    """The names of ``forward``'s first ``n`` positional parameters, else input_0, input_1, ..."""
    try:
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    names = [p.name for p in params[:n]]
    return names if len(names) == n and len(set(names)) == n else [f"input_{i}" for i in range(n)]


def _dynamic(given: dict[str, Any] | None, tensors: dict[str, torch.Tensor]) -> dict[str, dict[int, str]]:
    """Every input's batch axis (0, ``batch``) plus the axes named in ``given`` ({input: {axis: name}})."""
    out = {k: {0: BATCH} for k in tensors}
    if given is None:
        return out
    if not isinstance(given, dict):
        raise InputError("dynamic_axes must be a dict {input name: {axis: dim name}}", where="save(dynamic_axes=...)",
                         fix="e.g. dynamic_axes={'input_ids': {1: 'seq'}} (axis 0 is always the batch)")
    for name, axes in given.items():
        if name not in tensors:
            raise InputError(f"dynamic_axes names input {name!r}; the inputs are {', '.join(tensors)}",
                             where="save(dynamic_axes=...)", fix="use the names the inputs are exported with")
        pairs = axes.items() if isinstance(axes, dict) else [(a, f"{name}_dim{a}") for a in axes]
        for axis, dim_name in pairs:
            ndim = tensors[name].dim()
            if isinstance(axis, bool) or not isinstance(axis, int) or not 0 <= axis < ndim \
                    or not isinstance(dim_name, str) or not _AXIS_NAME.match(dim_name):
                raise InputError(f"dynamic axis {axis!r}: {dim_name!r} of input {name!r} (rank {ndim}) is invalid",
                                 where="save(dynamic_axes=...)",
                                 fix="use {axis: name} with 0 <= axis < rank and names like 'seq'")
            out[name][axis] = dim_name
    return out


def as_model_inputs(example: Any, model: nn.Module, dynamic_axes: dict[str, Any] | None = None) -> ModelInputs:
    """Check and name ``example`` (tensor, tuple/list of tensors, or dict of tensors); see the module doc."""
    if isinstance(example, ModelInputs):
        return example
    if isinstance(example, torch.Tensor):
        raw, keyword = {"input": example}, False
    elif isinstance(example, (tuple, list)) and example:
        raw, keyword = dict(zip(_positional_names(model, len(example)), example, strict=True)), False
    elif isinstance(example, dict) and example:
        if not all(isinstance(k, str) and k.isidentifier() for k in example):
            raise InputError("example_input dict keys must be forward's parameter names", where=WHERE, fix=_FIX)
        raw, keyword = dict(example), True
    else:
        raise InputError(f"example_input is a {type(example).__name__}" + (" and empty" if example is not None
                         and hasattr(example, "__len__") else ""), where=WHERE, fix=_FIX)
    tensors = {k: _checked_tensor(v, k) for k, v in raw.items()}
    batches = {k: int(v.shape[0]) for k, v in tensors.items()}
    if len(set(batches.values())) != 1:
        raise InputError(f"inputs hold different numbers of samples ({batches})", where=WHERE,
                         fix="give every input the same first (batch) axis")
    return ModelInputs(tensors, keyword, _dynamic(dynamic_axes, tensors))


def io_record(inputs: ModelInputs, *, layout: str | dict[str, str] | None, normalization: dict[str, Any] | None,
              class_names: list[str] | None) -> dict[str, Any]:
    """The io record (``sparsekit.model_io``) of a ``save()`` run: what was given, the layout inferred from the
    inputs' dtypes and ranks where not given; checked."""
    from sparsekit.model_io import check_io, infer_layout

    if layout is None:
        found = {k: infer_layout(v.is_floating_point(), v.dim()) for k, v in inputs.tensors.items()}
        layout = next(iter(found.values())) if len(found) == 1 else ({k: v for k, v in found.items() if v} or None)
    if isinstance(normalization, dict):  # numpy or torch values as plain numbers and lists
        normalization = {k: v.tolist() if hasattr(v, "tolist") else v for k, v in normalization.items()}
    names = list(class_names) if isinstance(class_names, (tuple, list)) else class_names
    return check_io({"input_layout": layout, "input_normalization": normalization, "class_names": names},
                    "save(input_layout=, normalization=, class_names=)")
