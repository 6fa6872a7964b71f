"""Checkpoints as one safetensors file: tensors (weights, masks, optimizer and method state, RNG
states) plus a JSON state in the file's metadata. No pickles anywhere; written atomically
(temp file, fsync, rename), so the previous checkpoint stays intact until the new one is complete.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sparsekit.errors import InputError
from sparsekit.fileio import atomic_path

FORMAT = "sparsekit-checkpoint"
FORMAT_VERSION = 1


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{idx}/{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim/"):
            _, idx, key = name.split("/", 2)
            state.setdefault(int(idx), {})[key] = value
    for idx, values in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(path: str | Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    sparsifier_state: dict[str, Any], state: dict[str, Any],
                    before_commit: Callable[[Path], None] | None = None) -> None:
    """Write model weights, masks, optimizer/method state, RNG states and JSON ``state``.

    ``before_commit(tmp)`` runs after the temporary file is complete and before it replaces ``path``
    (fault-injection tests kill the process there to show the previous checkpoint survives)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for name, value in model.state_dict().items():
        tensors[f"model/{name}"] = value
    for name, mask in sparsifier_state["masks"].items():
        tensors[f"mask/{name}"] = mask.to(torch.uint8)
    for name, value in sparsifier_state["method"].items():
        tensors[f"method/{name}"] = value
    optim_meta: dict[str, Any] = {}
    if optimizer is not None:
        optim_tensors, optim_meta = _flatten_optimizer(optimizer)
        tensors.update(optim_tensors)
    tensors["rng/torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = s
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "step_count": sparsifier_state["step_count"],
        "method_extra": sparsifier_state["method_extra"],
        "optimizer": optim_meta,
        "state": state,
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"sparsekit": json.dumps(meta)})
        if before_commit is not None:
            before_commit(tmp)


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint; a corrupt, truncated or foreign file is an InputError naming it."""
    from safetensors import safe_open

    p = Path(path)
    try:
        with safe_open(str(p), framework="pt") as fh:
            meta_raw = (fh.metadata() or {}).get("sparsekit")
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:
        raise InputError(f"checkpoint {p} is corrupt or not a safetensors file ({str(exc).splitlines()[0]})",
                         where=str(p), fix="delete it and train again, or pass --overwrite") from exc
    try:
        meta = json.loads(meta_raw) if meta_raw else None
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise InputError(f"{p} is not a sparsekit checkpoint", where=str(p),
                         fix="point --out at a sparsekit run directory, or pass --overwrite")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise InputError(f"checkpoint {p} was written by a newer sparsekit", where=str(p),
                         fix="upgrade sparsekit")
    return tensors, meta


def restore(tensors: dict[str, torch.Tensor], meta: dict[str, Any], *, model: torch.nn.Module,
            optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Load model and optimizer in place; return the sparsifier state (for ``Sparsifier.load_state_dict``)."""
    model_sd = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    own = model.state_dict()
    if set(model_sd) != set(own) or any(tuple(own[k].shape) != tuple(v.shape) for k, v in model_sd.items()):
        raise InputError("the checkpoint is from a different model", where="checkpoint",
                         fix="resume with the same --model/--model-kwargs, or pass --overwrite")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    model.load_state_dict(model_sd)
    if optimizer is not None and meta.get("optimizer"):
        sd = _unflatten_optimizer(tensors, meta["optimizer"])
        for st in sd["state"].values():
            for k, v in st.items():
                if isinstance(v, torch.Tensor) and v.dim() > 0:
                    st[k] = v.to(device)
        optimizer.load_state_dict(sd)
    torch.set_rng_state(tensors["rng/torch"])
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng/cuda/")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    return {
        "step_count": meta["step_count"],
        "masks": {k[len("mask/"):]: v.to(torch.bool) for k, v in tensors.items() if k.startswith("mask/")},
        "method": {k[len("method/"):]: v.to(device) for k, v in tensors.items() if k.startswith("method/")},
        "method_extra": meta.get("method_extra", {}),
    }
