"""Re-planning a measured artifact on another CPU, cached.

A calibrated or tuned artifact records the CPU its plan was measured on (``plan_cpu`` in its metadata; see
``sparsekit.runtime.cpu``). Loaded on a CPU with another key, its plan is measured again with the quick
whole-model calibration (the export's own, about 0.1-2 s) and the result is cached per (artifact, CPU,
threads), so later loads on that machine cost a file read. Heuristic plans (``plan_source`` "heuristic")
are computed on the machine that runs them and need nothing.

Cache: ``$SPARSEKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/sparsekit``, else ``~/.cache/sparsekit``; a
cache that cannot be written leaves the re-measured plan in memory only. ``SPARSEKIT_REPLAN=0`` (or
``load(..., replan=False)``) keeps the recorded plan as it is.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from sparsekit.errors import InputError
from sparsekit.fileio import atomic_write_json
from sparsekit.runtime.cpu import cpu_identity, cpu_key, describe
from sparsekit.runtime.graph_model import GraphModel
from sparsekit.runtime.layers import parse_kernel
from sparsekit.runtime.model import FastModel

MEASURED = ("calibrated", "tuned")
CACHE_VERSION = 1


def cache_dir() -> Path:
    env = os.environ
    if env.get("SPARSEKIT_CACHE_DIR"):
        return Path(env["SPARSEKIT_CACHE_DIR"])
    base = Path(env["XDG_CACHE_HOME"]) if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "sparsekit"


def record(model: FastModel | GraphModel) -> None:
    """Note in ``model.metadata`` the CPU its plan is measured on (the exporter calls this)."""
    here = cpu_identity()
    model.metadata["plan_cpu"] = json.dumps(here, sort_keys=True)
    model.metadata["plan_cpu_key"] = cpu_key(here)


def needs_replan(model: FastModel | GraphModel) -> bool:
    """A measured plan recorded on another CPU, or on an unrecorded one (artifacts from before the record)."""
    meta = model.metadata
    return meta.get("plan_source") in MEASURED and meta.get("plan_cpu_key") != cpu_key(cpu_identity())


def _cache_file(digest: str, key: str, threads: int) -> Path:
    tag = hashlib.sha256(f"{digest}|{key}|{threads}".encode()).hexdigest()[:32]
    return cache_dir() / "plans" / f"{tag}.json"


def _read_cached(path: Path, model: FastModel | GraphModel) -> list[dict[int, str]] | None:
    """The cached plans if the file is ours and fits this model (one plan per layer, every spec valid)."""
    try:
        data = json.loads(path.read_text())
        plans = data["plans"]
        if data.get("version") != CACHE_VERSION or len(plans) != len(model.layers):
            return None
        out = [{int(b): str(s) for b, s in plan.items()} for plan in plans]
        for plan in out:
            for b, spec in plan.items():
                parse_kernel(spec)
                if b < 1:
                    return None
        return out
    except (OSError, ValueError, KeyError, TypeError, AttributeError, InputError):
        return None  # missing, unreadable or not ours: measure again


def _apply(model: FastModel | GraphModel, plans: list[dict[int, str]]) -> None:
    for layer, plan in zip(model.layers, plans, strict=True):
        layer.plan = plan
    model.fit_plans()


def replan(model: FastModel | GraphModel, digest: str, *, threads: int) -> dict[str, Any] | None:
    """Re-measure ``model``'s plan on this CPU if it was measured on another (cached by ``digest``, the
    artifact's content hash). Returns what happened (also in ``model.notes``), or None when nothing was
    needed."""
    if os.environ.get("SPARSEKIT_REPLAN", "1") == "0" or not needs_replan(model):
        return None
    from sparsekit.runtime.tune import calibrate

    here = cpu_identity()
    key = cpu_key(here)
    recorded = model.metadata.get("plan_cpu")
    try:
        was = describe(json.loads(recorded)) if recorded else "an unrecorded CPU"
    except (ValueError, TypeError, AttributeError):
        was = "an unrecorded CPU"
    path = _cache_file(digest, key, threads)
    plans = _read_cached(path, model)
    event = {"from": was, "to": describe(here), "cache": str(path), "cached": plans is not None}
    if plans is None:
        batches = sorted({b for layer in model.layers for b in layer.plan}) or None
        for part in getattr(model, "sparse_models", [model]):  # a graph artifact: each sparse layer or chain
            calibrate(part, threads=threads, **({"batches": batches} if batches else {}))
        plans = [dict(layer.plan) for layer in model.layers]
        try:
            atomic_write_json(path, {"version": CACHE_VERSION, "cpu": here, "threads": threads,
                                     "plans": [{str(b): s for b, s in sorted(p.items())} for p in plans]})
            event["written"] = True
        except (InputError, OSError) as exc:
            event["written"] = False
            event["error"] = str(getattr(exc, "what", exc))
    _apply(model, plans)
    model.metadata["plan_cpu"] = json.dumps(here, sort_keys=True)
    model.metadata["plan_cpu_key"] = key
    model.metadata["plan_source"] = "calibrated on load"
    how = "from the cache" if event["cached"] else "measured now" + ("" if event.get("written", True) else
                                                                      " (cache not writable: not kept)")
    model.notes[f"plan measured on {was}; re-planned for {event['to']}, {how}"] = None
    model.replanned = event
    return event
