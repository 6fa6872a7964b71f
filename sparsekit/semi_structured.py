"""2:4 models for GPU sparse tensor cores: the ``semi-structured`` artifact and its loader.

The file (``model.2to4.safetensors``, written by ``sparsekit export --format semi-structured``) is the
run's state dict in fp32 — every 2:4 weight dense with its zeros in place — and a JSON manifest in the
safetensors metadata (key ``sparsekit.manifest``) naming the weights a GPU runtime should compress.
``torch.sparse.to_sparse_semi_structured`` builds the compressed values and metadata only on CUDA, so the
file keeps the dense form and ``load_semi_structured`` converts at load time, on the GPU.

A listed weight is 2-D (a Linear, or a stacked attention matrix) and has at most 2 nonzeros in every
group of 4 consecutive inputs of a row (exactly 2 active); 2:4 conv weights are in the file but not
listed (torch's semi-structured tensors are 2-D). Reading checks both, so a bad file is one
``InputError`` line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from sparsekit.errors import InputError

MANIFEST_KEY = "sparsekit.manifest"
FORMAT = "sparsekit-semi-structured"
VERSION = 1
_FIX = "re-create it with 'sparsekit export RUN_DIR --format semi-structured'"


def max_per_group(weight: np.ndarray, m: int = 4) -> int:
    """The most nonzeros in any group of ``m`` consecutive entries of a row of a 2-D weight."""
    return int((weight.reshape(-1, m) != 0).sum(1).max()) if weight.size else 0


def check_2to4(name: str, weight: np.ndarray, where: str) -> None:
    """A listed weight must be 2-D with inputs in groups of 4 and at most 2 nonzeros per group."""
    if weight.ndim != 2 or weight.shape[1] % 4:
        raise InputError(f"weight {name!r} of shape {list(weight.shape)} cannot be 2:4 (2-D, inputs a multiple "
                         "of 4)", where=where, fix=_FIX)
    worst = max_per_group(weight)
    if worst > 2:
        raise InputError(f"weight {name!r} is not 2:4: a group of 4 inputs has {worst} nonzeros", where=where,
                         fix=_FIX)


def read_semi_structured(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The file's tensors (numpy, float32) and its manifest, every listed weight checked to be 2:4."""
    from safetensors import safe_open

    where = str(path)
    if not Path(path).is_file():
        raise InputError(f"{path} does not exist", where="PATH", fix="pass a file written by --format semi-structured")
    try:
        with safe_open(where, framework="numpy") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # safetensors raises its own error types
        raise InputError(f"not a readable safetensors file: {str(exc).splitlines()[0] if str(exc) else exc!r}",
                         where=where, fix=_FIX) from exc
    manifest = _manifest(meta, where)
    for entry in manifest["weights"]:
        name = entry["name"]
        if name not in tensors:
            raise InputError(f"manifest lists weight {name!r} that the file does not hold", where=where, fix=_FIX)
        if list(tensors[name].shape) != entry["shape"]:
            raise InputError(f"weight {name!r} has shape {list(tensors[name].shape)}, the manifest says "
                             f"{entry['shape']}", where=where, fix=_FIX)
        check_2to4(name, tensors[name], where)
    return tensors, manifest


def _manifest(meta: dict[str, str], where: str) -> dict[str, Any]:
    try:
        manifest = json.loads(meta[MANIFEST_KEY])
    except (KeyError, json.JSONDecodeError, TypeError) as exc:
        raise InputError(f"no semi-structured manifest in the file metadata ({exc.__class__.__name__})",
                         where=where, fix=_FIX) from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise InputError("not a sparsekit semi-structured file (manifest format field)", where=where, fix=_FIX)
    if manifest.get("version") != VERSION:
        raise InputError(f"semi-structured version {manifest.get('version')!r} is not supported (this sparsekit "
                         f"reads version {VERSION})", where=where, fix="upgrade sparsekit or re-export the run")
    weights = manifest.get("weights")
    ok = isinstance(weights, list) and all(
        isinstance(w, dict) and isinstance(w.get("name"), str) and isinstance(w.get("shape"), list) for w in weights)
    if not ok:
        raise InputError("manifest 'weights' is not a list of {name, shape} objects", where=where, fix=_FIX)
    return manifest


def _cuda_device(device: Any, where: str) -> Any:
    import torch

    if not torch.cuda.is_available():
        raise InputError("semi-structured 2:4 tensors need CUDA: torch.sparse.to_sparse_semi_structured builds them "
                         "only on an NVIDIA GPU, and torch sees none here", where=where,
                         fix="load it on a machine with a CUDA GPU (sm80 or newer), or export --format onnx or "
                             "fast for CPU")
    dev = torch.device(device)
    if dev.type != "cuda":
        raise InputError(f"device {str(dev)!r} cannot hold semi-structured tensors", where="device",
                         fix="pass device='cuda'")
    return dev


def load_semi_structured(path: str | Path, model: Any, device: Any = "cuda", dtype: Any = None) -> dict[str, str]:
    """Load the file into ``model`` (names and shapes must match its state dict), move it to ``device``
    (``dtype``: float16 by default, what the sparse kernels run) and turn every listed 2:4 weight into a
    ``torch.sparse.to_sparse_semi_structured`` tensor. Returns, per listed weight, ``"semi-structured"`` or
    ``"dense: <why torch refused it>"`` (e.g. a shape that is not a multiple of the kernel tile)."""
    import torch

    dev = _cuda_device(device, str(path))
    tensors, manifest = read_semi_structured(path)
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise InputError(f"the file does not fit the model: {str(exc).splitlines()[0]} ...", where=str(path),
                         fix="pass the model the run was trained with (same names and shapes)") from exc
    model.to(device=dev, dtype=dtype or torch.float16)
    params = dict(model.named_parameters())
    result = {}
    for entry in manifest["weights"]:
        name = entry["name"]
        if name not in params:
            raise InputError(f"listed weight {name!r} is not a parameter of the model", where=str(path),
                             fix="pass the model the run was trained with")
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        try:
            sparse = torch.sparse.to_sparse_semi_structured(params[name].detach().contiguous())
        except (RuntimeError, NotImplementedError) as exc:
            result[name] = f"dense: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            continue
        setattr(owner, attr, torch.nn.Parameter(sparse, requires_grad=False))
        result[name] = "semi-structured"
    return result
