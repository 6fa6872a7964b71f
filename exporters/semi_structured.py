"""``semi-structured``: a 2:4 run in the form GPU sparse tensor cores consume (``sparsekit.semi_structured``).

Written only for runs whose every prunable (masked) weight is exactly 2:4 along its inputs; ``--format
all`` includes it only for such runs. The file is the run's ``weights.safetensors`` state dict (fp32,
masked entries exactly 0) with a manifest listing the 2-D 2:4 weights; ``load_semi_structured`` turns
them into ``torch.sparse.to_sparse_semi_structured`` tensors on CUDA. Validation here (CPU): every listed
weight is 2:4 and the file's weights, put into the run's reference ONNX graph, reproduce its outputs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from onnx import numpy_helper
from sparsekit.exporters.context import ExportContext, ExportOptions, io_of
from sparsekit.exporters.graph import UnsupportedGraphError
from sparsekit.exporters.registry import register_format
from sparsekit.exporters.validate import Runner, onnx_runner, register_runner

import sparsekit
from sparsekit import structure
from sparsekit.errors import InputError, ValidationError
from sparsekit.fileio import atomic_path
from sparsekit.run_dir import RunDir
from sparsekit.semi_structured import FORMAT, MANIFEST_KEY, VERSION, read_semi_structured

FIX = "train with --granularity 2:4 (every prunable layer 2:4), or pick another --format"


def is_2to4_run(ctx: ExportContext) -> bool:
    """Every masked weight of the source is exactly 2:4 along its inputs (and there is one)."""
    return bool(ctx.masks) and all(structure.is_nm(m, 2, 4) for m in ctx.masks.values())


def _refuse_unless_2to4(ctx: ExportContext) -> None:
    if ctx.source_kind != "run" or not RunDir(ctx.source).weights_file.is_file():
        raise UnsupportedGraphError("semi-structured needs a run dir with its weights.safetensors",
                                    where=str(ctx.source), fix="export from the run dir, not an archive")
    if not ctx.masks:
        raise UnsupportedGraphError("semi-structured needs a sparse run: this one has no masks",
                                    where=str(ctx.source), fix=FIX)
    bad = next((n for n, m in ctx.masks.items() if not structure.is_nm(m, 2, 4)), None)
    if bad is not None:
        declared = ctx.summary.get("granularity", "unstructured")
        raise UnsupportedGraphError(f"semi-structured needs every prunable layer 2:4; {bad!r} is not (the run's "
                                    f"granularity is {declared})", where=str(ctx.source), fix=FIX)


def manifest_for(ctx: ExportContext, state: dict[str, np.ndarray]) -> dict[str, Any]:
    listed = [{"name": n, "shape": list(state[n].shape)} for n in ctx.masks if state[n].ndim == 2]
    return {"format": FORMAT, "version": VERSION, "sparsekit_version": sparsekit.__version__, "pattern": "2:4",
            "granularity": ctx.summary.get("granularity", "unstructured"), "source_run": ctx.source_run,
            "method": ctx.summary.get("method"), "test_accuracy": ctx.summary.get("test_accuracy"),
            "io": io_of(ctx), "weights": listed,
            "dense_2to4": sorted(n for n in ctx.masks if state[n].ndim != 2)}


@register_format("semi-structured", "2:4 runs only: fp32 state dict + manifest of the 2:4 weights, loaded as "
                 "torch semi-structured sparse tensors on CUDA (sparsekit.semi_structured)", ".2to4.safetensors",
                 in_all=is_2to4_run)
def write_semi_structured(ctx: ExportContext, out_path: Path, options: ExportOptions) -> dict[str, Any]:
    from safetensors.numpy import save_file

    _refuse_unless_2to4(ctx)
    state = {k: v.float().numpy() for k, v in RunDir(ctx.source).weights().items()}
    missing = sorted(set(ctx.masks) - set(state))
    if missing:
        raise InputError(f"weights.safetensors has no {missing[0]!r}", where=str(ctx.source),
                         fix="re-export from a complete run dir")
    for name, mask in ctx.masks.items():  # squashed: nothing outside the mask
        state[name] = np.where(mask, state[name], np.float32(0)).astype(np.float32)
    manifest = manifest_for(ctx, state)
    with atomic_path(out_path) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(tmp),
                  metadata={MANIFEST_KEY: json.dumps(manifest)})
    read_semi_structured(out_path)  # the CPU check of every listed weight
    notes = [f"{len(manifest['weights'])} 2:4 weights for GPU sparse tensor cores: load with "
             "sparsekit.semi_structured.load_semi_structured(path, model) on CUDA"]
    if manifest["dense_2to4"]:
        notes.append(f"{len(manifest['dense_2to4'])} 2:4 conv weights stay dense (torch's semi-structured "
                     "tensors are 2-D)")
    return {"precision": "fp32", "notes": notes, "semi_structured_weights": [w["name"] for w in manifest["weights"]]}


@register_runner("semi-structured")
def semi_structured_runner(path: str | Path, threads: int = 1) -> Runner:
    """On CPU: the source run's reference ONNX graph with the file's weights put in (checked 2:4 first)."""
    tensors, manifest = read_semi_structured(path)
    run = RunDir(str(manifest.get("source_run")))
    if not run.onnx_file.is_file():
        raise InputError(f"the source run {run.path} of {path} is gone: its ONNX graph runs the file on CPU",
                         where=str(path), fix="keep the run dir next to the file, or load it on a GPU")
    model = run.onnx_model()
    for t in model.graph.initializer:
        if t.name in tensors:
            arr = tensors[t.name]
            if list(arr.shape) != list(t.dims):
                raise ValidationError(f"weight {t.name!r} shape {list(arr.shape)} != graph {list(t.dims)}",
                                      where=str(path), fix="re-export the run")
            t.CopyFrom(numpy_helper.from_array(arr.astype(np.float32), t.name))
    return onnx_runner(model.SerializeToString(), threads)


