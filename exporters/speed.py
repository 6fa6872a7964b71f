"""Speed against the dense model: which formats promise it, how export measures it, when it is flagged.

``fast``, ``compact-onnx`` and ``int8-onnx`` exist to run faster than the dense ONNX model (``sparse-onnx``
and ``compressed`` are about size). An artifact of those formats measured below ``MIN_SPEEDUP`` × the dense
model's speed at some batch size and thread count is flagged ``slower_than_dense`` in the export and report
JSON and tables, and ``sparsekit report --min-speedup-each X`` fails on it.

What export measures (this machine, one thread): ``fast`` by its calibration (the dense model is one of the
plans it times), ``int8-onnx`` by ``speedups_vs_dense`` at ``EXPORT_BATCHES`` while it picks a quantization;
``compact-onnx`` is timed only by ``sparsekit report``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

SPEED_FORMATS = ("fast", "compact-onnx", "int8-onnx")
MIN_SPEEDUP = 0.95        # below this fraction of dense speed a speed artifact is flagged
EXPORT_BATCHES = (1, 64)  # batch sizes export times int8 candidates at


def speed_record(batch_size: int, threads: int, speedup: float) -> dict[str, Any]:
    return {"batch_size": int(batch_size), "threads": int(threads), "speedup": round(float(speedup), 4)}


def slower_than_dense(records: Iterable[dict[str, Any]], threshold: float = MIN_SPEEDUP) -> list[dict[str, Any]]:
    """The speed records (``speed_record``) below ``threshold``."""
    return [r for r in records if r["speedup"] < threshold]


def describe_slow(records: list[dict[str, Any]]) -> str:
    """'0.80× at batch 1, 0.90× at batch 64 (1 thread)' for a note or table footnote."""
    threads = sorted({r["threads"] for r in records})
    where = ", ".join(f"{r['speedup']:.2f}× at batch {r['batch_size']}" +
                      (f"/{r['threads']} threads" if len(threads) > 1 else "") for r in records)
    return where + ("" if len(threads) != 1 else f" ({threads[0]} thread{'s' if threads[0] > 1 else ''})")


def cpu_seconds_per_call(calls: dict[str, Callable[[], Any]], *, budget_s: float = 0.3, min_rounds: int = 3,
                         max_rounds: int = 15, burst_s: float = 0.002) -> dict[str, float]:
    """Median CPU seconds per call of each one-thread callable, interleaved in short bursts.

    One-thread ONNX Runtime sessions run in the calling thread, so its CPU time is the cost without the
    time other processes hold the core (steadier than the wall clock on a shared machine); each burst
    follows one untimed call, so every candidate is timed warm."""
    bursts = {}
    for k, fn in calls.items():  # warm up and size the bursts
        fn()
        t0 = time.perf_counter()
        fn()
        bursts[k] = int(min(20, max(1, burst_s // max(time.perf_counter() - t0, 1e-7))))
    times: dict[str, list[float]] = {k: [] for k in calls}
    start = time.perf_counter()
    rounds = 0
    while rounds < max_rounds and (rounds < min_rounds or time.perf_counter() - start < budget_s):
        for k, fn in calls.items():
            fn()
            t0 = time.thread_time()
            for _ in range(bursts[k]):
                fn()
            times[k].append((time.thread_time() - t0) / bursts[k])
        rounds += 1
    return {k: statistics.median(v) for k, v in times.items()}


def speedups_vs_dense(dense: Callable[[np.ndarray], Any], candidates: dict[str, Callable[[np.ndarray], Any]],
                      inputs: dict[int, np.ndarray], *, budget_s: float = 0.2) -> dict[str, list[dict[str, Any]]]:
    """Per candidate, its speed records (one thread) against ``dense`` on each batch of ``inputs``."""
    out: dict[str, list[dict[str, Any]]] = {k: [] for k in candidates}
    for b, x in inputs.items():
        calls = {"dense": lambda x=x: dense(x)} | {k: (lambda fn=fn, x=x: fn(x)) for k, fn in candidates.items()}
        med = cpu_seconds_per_call(calls, budget_s=budget_s)
        for k in candidates:
            out[k].append(speed_record(b, 1, med["dense"] / med[k] if med[k] > 0 else float("inf")))
    return out
