"""``--tune``: measure each layer's candidate kernels on this machine and store the fastest per batch.

Candidates are timed interleaved (one call of each in turn, repeated) and compared by median, so
load from other processes hits them alike. The dense candidate is ONNX Runtime's GEMM on the
densified layer, which keeps a tuned artifact from ever choosing something slower than dense.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import numpy as np

from sparsekit.runtime.layers import PANEL, SparseLayer, aligned_empty, to_panels
from sparsekit.runtime.model import _dense_session

DEFAULT_BATCHES = (1, 8, 64, 256)


def candidates(layer: SparseLayer, batch: int) -> list[str]:
    if layer.n_in == 0 or layer.n_out == 0:
        return ["rows"]
    out = ["dense"]
    if batch < 64:
        out.append("rows")
    if batch >= 8:
        out.append("panel")
        out += [f"panel:{b}" for b in (128, 256, 512) if b < layer.n_in]
    return out


def _runner(layer: SparseLayer, spec: str, x: np.ndarray, threads: int):
    name, _, arg = spec.partition(":")
    batch = x.shape[0]
    if name == "dense":
        sess = _dense_session([layer], threads)
        return lambda: sess.run(None, {"x": x})
    if name == "rows":
        y = np.empty((batch, layer.n_out), dtype=np.float32)
        return lambda: layer.run_rows(x, y, threads)
    xp, npanels = to_panels(x, layer.n_in, threads)
    yp = aligned_empty(npanels * layer.n_out * PANEL)
    block = int(arg) if arg else 0
    layer.blocked(block)  # build the blocked copy outside the timing
    return lambda: layer.run_panel(xp, yp, npanels, block, threads)


def time_candidates(layer: SparseLayer, batch: int, threads: int = 1, *, specs: Iterable[str] | None = None,
                    budget_s: float = 0.5, min_reps: int = 3, max_reps: int = 50,
                    seed: int = 0) -> dict[str, float]:
    """Median seconds per call of each kernel spec for this layer at ``batch``."""
    rng = np.random.default_rng(seed)
    x = np.ascontiguousarray(np.abs(rng.standard_normal((batch, layer.n_in))), dtype=np.float32)
    specs = list(specs) if specs is not None else candidates(layer, batch)
    runners = {s: _runner(layer, s, x, threads) for s in specs}
    times: dict[str, list[float]] = {s: [] for s in specs}
    for fn in runners.values():  # warm up (first ORT call, page faults)
        fn()
    start = time.perf_counter()
    reps = 0
    while reps < max_reps and (reps < min_reps or time.perf_counter() - start < budget_s):
        best = min((float(np.median(t)) for t in times.values() if t), default=None)
        for s, fn in runners.items():
            # drop a candidate that is already 4x slower than the best after 3 reps
            if best is not None and len(times[s]) >= 3 and np.median(times[s]) > 4 * best:
                continue
            t0 = time.perf_counter()
            fn()
            times[s].append(time.perf_counter() - t0)
        reps += 1
    return {s: float(np.median(t)) for s, t in times.items()}


def tune_layers(layers: list[SparseLayer], *, batches: Iterable[int] = DEFAULT_BATCHES, threads: int = 1,
                budget_s: float = 0.3) -> list[dict[str, dict[str, float]]]:
    """Set each layer's plan to the fastest kernel per batch size; return the timings (seconds)."""
    report = []
    for layer in layers:
        per_batch: dict[str, dict[str, float]] = {}
        plan: dict[int, str] = {}
        for b in sorted(set(int(v) for v in batches)):
            t = time_candidates(layer, b, threads, budget_s=budget_s)
            plan[b] = min(t, key=t.__getitem__)
            per_batch[str(b)] = t
        layer.plan = plan
        report.append(per_batch)
    return report
