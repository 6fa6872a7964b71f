"""CPU latency of exported artifacts, measured the same way for every artifact in one run.

Rules (every claim of speed is measured against the dense ONNX Runtime model in the same
run): fixed intra-op threads per session and no idle spinning (``session.intra_op.allow_spinning=0``,
since several sessions live in one process); a warm-up per artifact; then *interleaved* A/B rounds —
each round runs every artifact once, in a rotating order, so drift (frequency scaling, a noisy
neighbour) hits all of them alike; p50/p90/p99 over the rounds; speedups are ratios of p50s taken in
the same run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from sparsekit.run_dir import Inputs

Runner = Callable[[np.ndarray], Any]


def percentiles_ms(times_ns: Sequence[int]) -> dict[str, float]:
    arr = np.asarray(times_ns, dtype=np.float64) / 1e6
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return {"p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99), "mean_ms": float(arr.mean()),
            "runs": len(arr)}


def batch_input(input_shape: tuple[int, ...], batch_size: int, samples: Inputs | None = None,
                seed: int = 0) -> Inputs:
    """A batch of real samples (tiled; every input of a dict alike; dtypes kept) when available, else standard
    normal noise."""
    if isinstance(samples, dict):
        return {k: batch_input(input_shape, batch_size, v) for k, v in samples.items()}
    if samples is not None and len(samples):
        reps = -(-batch_size // len(samples))
        return np.ascontiguousarray(np.tile(samples, (reps,) + (1,) * (samples.ndim - 1))[:batch_size])
    return np.random.default_rng(seed).standard_normal((batch_size, *input_shape)).astype(np.float32)


def measure_interleaved(runners: dict[str, Runner], x: Inputs, *, runs: int = 50, warmup: int = 5,
                        min_seconds: float = 0.0) -> dict[str, dict[str, float]]:
    """Per runner latency percentiles on input ``x``, interleaving the runners round by round."""
    names = list(runners)
    for name in names:
        for _ in range(warmup):
            runners[name](x)
    times: dict[str, list[int]] = {n: [] for n in names}
    start = time.perf_counter()
    r = 0
    while r < runs or (time.perf_counter() - start < min_seconds and r < 100 * runs):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter_ns()
            runners[name](x)
            times[name].append(time.perf_counter_ns() - t0)
        r += 1
    return {n: percentiles_ms(t) for n, t in times.items()}


def latency_records(make_runner: Callable[[str, int], Runner], artifacts: Sequence[str], *,
                    input_shape: tuple[int, ...], batch_sizes: Sequence[int] = (1, 64, 256),
                    threads: Sequence[int] = (1,), runs: int = 50, warmup: int = 5,
                    dense: str = "onnx", samples: Inputs | None = None) -> list[dict[str, Any]]:
    """Latency records ``{artifact, batch_size, threads, p50_ms, p90_ms, p99_ms, speedup_vs_dense}``.

    ``make_runner(artifact, threads)`` opens one artifact; ``dense`` names the reference among
    ``artifacts``. Sessions are opened once per thread count and reused across batch sizes.
    """
    records = []
    for n_threads in threads:
        runners = {a: make_runner(a, n_threads) for a in artifacts}
        for bs in batch_sizes:
            x = batch_input(input_shape, bs, samples)
            stats = measure_interleaved(runners, x, runs=runs, warmup=warmup)
            base = stats.get(dense, {}).get("p50_ms")
            for a in artifacts:
                rec = {"artifact": a, "batch_size": int(bs), "threads": int(n_threads), **stats[a]}
                rec["speedup_vs_dense"] = (base / rec["p50_ms"]) if base and rec["p50_ms"] > 0 else None
                records.append(rec)
        del runners
    return records
