"""Measured kernel choices: ``calibrate`` (cheap, whole model, on by default at export) and ``--tune``
(``tune_layers``: every layer's candidate kernels per batch size).

Candidates are timed interleaved (one call of each in turn, repeated) and compared by median, so
load from other processes hits them alike. The dense candidate is ONNX Runtime's GEMM on the
densified layer(s), which keeps a measured plan from choosing something slower than dense.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import numpy as np

from sparsekit.runtime.layers import _K, PANEL, CsrLayer, aligned_empty, to_panels
from sparsekit.runtime.model import (
    GEMV_MAX_WEIGHTS,
    ON_PANELS,
    ROWS_MAX_BATCH,
    FastModel,
    _dense_session,
    default_kernel,
    small_batch_sparse,
)

# plan entries: a batch size runs the entry nearest to it on a log scale. With 1, 8, 64 a batch of 16
# ran the entry for 8, dense ORT on the demo model (49 us, where the panel chain takes 16.5 us), and a
# batch of 3 dense (22 us, rows 16 us). Calibration (whole-model plans, ~0.05 s a size) takes every
# power of two up to a panel; --tune (every layer's candidates) a factor 4 apart.
DEFAULT_BATCHES = (1, 4, 16, 64, 256)
CALIBRATION_BATCHES = (1, 2, 4, 8, 16, 32, 64, 256)


# calibration: bursts per candidate when a plan that beat the heuristic is timed against it again
CONFIRM_REPS = 7

# while timing multi-threaded candidates the pool's workers spin this long between calls (µs)
TUNE_SPIN_US = 50_000


@contextlib.contextmanager
def awake_workers(threads: int) -> Iterator[None]:
    """Keep the thread pool's workers spinning between calls while candidates are timed.

    At its default the pool's workers sleep 100 µs after a job. Candidates take turns in bursts of
    about a millisecond, so without this every multi-threaded burst would start with a sleeping
    worker, and the first few hundred microseconds after a wake-up run measurably slower under a
    hypervisor (4096×1024 98% batch 1: 13 µs per call warm, ~20 µs in a burst right after a wake-up),
    which made ``--tune`` cap layers at one thread that are faster on two when calls come back to back.
    """
    if threads <= 1 or _K is None or not hasattr(_K, "set_threading"):
        yield
        return
    saved = int(_K.set_threading()["spin_us"])
    _K.set_threading(max(saved, TUNE_SPIN_US))
    try:
        yield
    finally:
        _K.set_threading(saved)


_F = TypeVar("_F", bound=Callable[..., Any])


def _timed_with_awake_workers(fn: _F) -> _F:
    """Run ``fn`` (which takes a ``threads`` argument) inside ``awake_workers(threads)``."""
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def inner(*args: Any, **kwargs: Any) -> Any:
        threads = sig.bind(*args, **kwargs).arguments.get("threads", 1)
        with awake_workers(int(threads)):
            return fn(*args, **kwargs)

    return inner  # type: ignore[return-value]


def call_clock(threads: int):
    """The clock candidates are compared by: with one thread every kernel (ORT's included, with
    ``intra_op_num_threads=1``) runs in the calling thread, so its CPU time is the cost without the
    time other processes hold the core — far less noisy on a shared machine than the wall clock.
    With more threads, wall time (the other threads' work is not in the caller's CPU time)."""
    return time.thread_time if int(threads) == 1 else time.perf_counter


def on_panels(spec: str) -> bool:
    """Whether a kernel spec runs on 64-sample panels (``panel`` or ``block``, any block width or cap)."""
    return spec.partition(":")[0].partition("@")[0] in ON_PANELS


def candidates(layer: CsrLayer, batch: int, threads: int = 1) -> list[str]:
    """Kernel specs worth timing; with ``threads`` > 1 also each sparse kernel capped at one thread
    (``@1``), so a layer too small to gain from a second thread keeps one (recorded in the plan)."""
    if layer.n_in == 0 or layer.n_out == 0:
        return ["rows"]
    out = ["dense"]
    if batch < 64:
        out.append("rows")
        if layer.has_window():
            out.append("window")
        if layer.n_in * layer.n_out <= GEMV_MAX_WEIGHTS:
            out.append("gemv")
    if batch >= 8:
        for kernel in ("panel", "block") if layer.has_block() else ("panel",):
            out.append(kernel)
            out += [f"{kernel}:{b}" for b in (128, 256, 512) if b < layer.n_in]
    if threads > 1:
        out += [f"{s}@1" for s in out if s != "dense"]
    return out


def _runner(layer: CsrLayer, spec: str, x: np.ndarray, threads: int):
    body, at, cap = spec.partition("@")
    if at:
        threads = min(threads, int(cap))
    name, _, arg = body.partition(":")
    batch = x.shape[0]
    if name == "dense":
        sess = _dense_session([layer], threads)
        return lambda: sess.run(None, {"x": x})
    if name in ("rows", "window"):
        y = np.empty((batch, layer.n_out), dtype=np.float32)
        run = layer.run_rows if name == "rows" else layer.run_window
        return lambda: run(x, y, threads)
    if name == "gemv":
        y = np.empty((batch, layer.n_out), dtype=np.float32)
        layer.dense_t()
        return lambda: layer.run_gemv(x, y, threads)
    xp, npanels = to_panels(x, layer.n_in, threads)
    yp = aligned_empty(npanels * layer.n_out * PANEL)
    block = int(arg) if arg else 0
    row_blocks = name == "block" and layer.has_block()
    if row_blocks:  # build the layout outside the timing
        layer.row_blocked(block)
    else:
        layer.blocked(block)
    return lambda: layer.run_panel(xp, yp, npanels, block, threads, row_blocks=row_blocks)


@_timed_with_awake_workers
def time_candidates(layer: CsrLayer, batch: int, threads: int = 1, *, specs: Iterable[str] | None = None,
                    budget_s: float = 0.5, min_reps: int = 3, max_reps: int = 50,
                    seed: int = 0, burst_s: float = 0.001) -> dict[str, float]:
    """Median seconds per call of each kernel spec for this layer at ``batch``.

    Each sample is a short burst of back-to-back calls (about ``burst_s``; at most 20), after one
    unmeasured call: layers run one after another and calls come back to back in deployment, so a
    candidate is timed warm (its weights in cache, the thread pool's workers awake) rather than
    right after another candidate evicted them or let the workers fall asleep."""
    rng = np.random.default_rng(seed)
    x = np.ascontiguousarray(np.abs(rng.standard_normal((batch, layer.n_in))), dtype=np.float32)
    specs = list(specs) if specs is not None else candidates(layer, batch, threads)
    runners = {s: _runner(layer, s, x, threads) for s in specs}
    clock = call_clock(threads)
    times: dict[str, list[float]] = {s: [] for s in specs}
    bursts: dict[str, int] = {}
    for s, fn in runners.items():  # warm up (first ORT call, page faults) and size the bursts
        fn()
        t0 = time.perf_counter()
        fn()
        bursts[s] = int(min(20, max(1, burst_s // max(time.perf_counter() - t0, 1e-7))))
    start = time.perf_counter()
    reps = 0
    while reps < max_reps and (reps < min_reps or time.perf_counter() - start < budget_s):
        best = min((float(np.median(t)) for t in times.values() if t), default=None)
        for s, fn in runners.items():
            # drop a candidate that is already 4x slower than the best after 3 reps
            if best is not None and len(times[s]) >= 3 and np.median(times[s]) > 4 * best:
                continue
            n = bursts[s]
            fn()
            t0 = clock()
            for _ in range(n):
                fn()
            times[s].append((clock() - t0) / n)
        reps += 1
    return {s: float(np.median(t)) for s, t in times.items()}


def tune_layers(layers: list[CsrLayer], *, batches: Iterable[int] = DEFAULT_BATCHES, threads: int = 1,
                budget_s: float = 0.3) -> list[dict[str, dict[str, float]]]:
    """Set each layer's plan to the fastest kernel per batch size; return the timings (seconds)."""
    report = []
    for layer in layers:
        per_batch: dict[str, dict[str, float]] = {}
        plan: dict[int, str] = {}
        for b in sorted(set(int(v) for v in batches)):
            t = time_candidates(layer, b, threads, budget_s=budget_s)
            best = min(t, key=t.__getitem__)
            base = best.partition("@")[0]
            if best != base and base in t and t[base] <= t[best] * 1.02:
                best = base  # within noise of the uncapped spec: keep the model's thread count
            plan[b] = best
            per_batch[str(b)] = t
        layer.plan = plan
        report.append(per_batch)
    return report


def _time_plans(model: FastModel, x: np.ndarray, threads: int, cands: dict[str, list[str]], *,
                budget_s: float, clock) -> dict[str, float]:
    """Median seconds per call of each whole-model plan on ``x``: warmed up, bursts of about a
    millisecond (at most 8 calls), interleaved, 3 to 15 rounds within ``budget_s``."""
    times: dict[str, list[float]] = {k: [] for k in cands}
    bursts: dict[str, int] = {}
    start = time.perf_counter()
    for k, specs in cands.items():
        model.run(x, threads=threads, kernels=specs, chain=True)
        t0 = time.perf_counter()
        model.run(x, threads=threads, kernels=specs, chain=True)
        bursts[k] = int(min(8, max(1, 0.001 // max(time.perf_counter() - t0, 1e-7))))
    reps = 0
    while reps < 15 and (reps < 3 or time.perf_counter() - start < budget_s):
        for k in cands:
            times[k].append(_burst(model, x, threads, cands[k], bursts[k], clock))
        reps += 1
    return {k: float(np.median(v)) for k, v in times.items()}


def _keep_faster_plans(model: FastModel, *, batches: Iterable[int], threads: int, budget_s: float, seed: int,
                       name: str, alternative, min_batch: int = 1) -> dict[str, dict]:
    """For each batch (from ``min_batch``): time the model's plan against ``alternative(plan, batch)`` and
    keep the alternative where it is faster by more than 3%. Returns ``{batch: {name: kept,
    "median_s": {"tuned": ..., name: ...}}}`` for the batches where the two plans differ."""
    report: dict[str, dict] = {}
    rng = np.random.default_rng(seed)
    clock = call_clock(threads)
    for b in sorted({int(v) for v in batches}):
        if b < min_batch:
            continue
        tuned = model.kernels_for(b)
        alt = alternative(tuned, b)
        if alt == tuned:
            continue
        x = rng.standard_normal((b, *model.input_shape)).astype(np.float32)
        med = _time_plans(model, x, threads, {"tuned": tuned, name: alt}, budget_s=budget_s, clock=clock)
        keep = med[name] * 1.03 < med["tuned"]
        if keep:
            for layer, spec in zip(model.layers, alt, strict=True):
                layer.plan = {**layer.plan, b: spec}
        report[str(b)] = {name: keep, "median_s": {k: round(v, 9) for k, v in med.items()}}
    model.plan_changed()
    return report


@_timed_with_awake_workers
def check_thread_caps(model: FastModel, *, batches: Iterable[int], threads: int, budget_s: float = 0.25,
                      seed: int = 0) -> dict[str, dict]:
    """After per-layer tuning at ``threads`` > 1: time the whole model with its tuned plan and with every
    layer capped at one thread (``@1``), per batch size, and keep the cap where it is faster by more
    than 3%. Layers tuned in isolation miss what a chain pays between them (a small layer on one
    thread between two split ones moves the activations across cores), so a tuned small model is never
    slower on two threads than on one. Returns ``{batch: {"capped": bool, "median_s": {...}}}``."""
    if threads <= 1:
        return {}
    return _keep_faster_plans(model, batches=batches, threads=threads, budget_s=budget_s, seed=seed,
                              name="capped",
                              alternative=lambda plan, _b: [s if "@" in s else f"{s}@1" for s in plan])


@_timed_with_awake_workers
def check_panel_chain(model: FastModel, *, batches: Iterable[int], threads: int, budget_s: float = 0.25,
                      seed: int = 0) -> dict[str, dict]:
    """After per-layer tuning: for each batch from 2 whose tuned plan mixes kernels, time the whole model
    with its tuned plan and with every layer on ``panel`` (tuned panel specs kept), and keep the
    all-panel plan where it is faster by more than 3%: it runs as one C chain (data-parallel, or below a
    panel on 16/32-lane units), which layer-by-layer timings cannot see. Returns ``{batch: {"chain":
    bool, "median_s": {...}}}``."""
    return _keep_faster_plans(model, batches=batches, threads=threads, budget_s=budget_s, seed=seed,
                              name="chain", min_batch=2,
                              alternative=lambda plan, _b: [s if on_panels(s) else "panel" for s in plan])


@_timed_with_awake_workers
def check_heuristic_plan(model: FastModel, *, batches: Iterable[int], threads: int, budget_s: float = 0.25,
                         seed: int = 0) -> dict[str, dict]:
    """After per-layer tuning: for each batch, time the whole model with its tuned plan and with the
    heuristic plan (``default_kernel``, what an export without ``--tune`` starts from), and keep the
    heuristic where it is faster by more than 3%, so ``--tune`` never ends up slower than the default
    artifact. Per-layer timings run each layer alone; in the model a layer runs inside a chain (the
    all-panel chain is data-parallel: each thread takes whole panels through every layer), where the
    per-layer winner can lose: MLP 1024-4096-4096-1024 98% at batch 256 on 2 threads, tuned
    ``panel:512`` x3 3.49 ms vs the heuristic ``panel`` x3 2.83 ms. Returns ``{batch: {"heuristic":
    bool, "median_s": {...}}}`` for the batches where the plans differ."""
    return _keep_faster_plans(model, batches=batches, threads=threads, budget_s=budget_s, seed=seed,
                              name="heuristic",
                              alternative=lambda _plan, b: [default_kernel(layer, b) for layer in model.layers])


def chain_candidates(model: FastModel, batch: int, threads: int = 1) -> dict[str, list[str]]:
    """Whole-model plans worth comparing at ``batch``: the heuristic, all dense (one ONNX Runtime
    session: the dense model itself), below 8 the heuristic with small layers swapped between the sparse and
    the dense small-batch kernel and with the other sparse one (``rows`` for ``window``, and back), from 8 with
    its panel/block layers without column blocks and with its ``block`` layers on ``panel`` (what the row blocks
    gain), every layer on ``panel`` (``block`` where it has row blocks; from 2), and with
    ``threads`` > 1 the heuristic on one thread (``@1``: a model too small to gain from a second
    thread is never slower than on one)."""
    heur = [default_kernel(layer, batch) for layer in model.layers]
    cands = {"heuristic": heur, "dense": ["dense"] * len(model.layers)}
    if batch >= ROWS_MAX_BATCH and any(spec.startswith("block") for spec in heur):
        # the row-block layers on the panel kernel: what the block kernel gains, measured on this CPU
        cands["unblocked"] = [spec.replace("block", "panel", 1) if spec.startswith("block") else spec
                              for spec in heur]
    if batch < ROWS_MAX_BATCH:
        alt = []
        for layer, spec in zip(model.layers, heur, strict=True):
            small = layer.n_in * layer.n_out <= GEMV_MAX_WEIGHTS and layer.n_in > 0 and layer.n_out > 0
            alt.append({"rows": "gemv", "window": "gemv", "gemv": small_batch_sparse(layer)}.get(spec, spec)
                       if small else spec)
        cands["swapped"] = alt
        # the other sparse small-batch kernel: which of gathers (rows) and permutes (window) is faster
        # depends on the CPU (gathers are microcoded on AMD Zen 4/5, fast on recent Intel cores)
        cands["other sparse"] = [{"rows": "window", "window": "rows"}.get(spec, spec) if layer.has_window()
                                 else spec for layer, spec in zip(model.layers, heur, strict=True)]
    else:
        cands["panel"] = [spec.partition(":")[0] if on_panels(spec) else spec for spec in heur]
    if batch > 1:
        # every layer on the batch kernel: the model runs as one data-parallel C chain, which can beat
        # a plan that is faster layer by layer (a dense 256x10 output layer on ORT: 55 -> 39 us at 64;
        # at 16, 49 us on ORT vs 16.5 us); below a panel it runs a half or quarter panel (AVX-512),
        # whose cost does not grow with the batch as the rows kernel's does
        cands["panel chain"] = [spec if on_panels(spec) else "block" if layer.has_block() else "panel"
                                for layer, spec in zip(model.layers, heur, strict=True)]
    if threads > 1:
        cands["one thread"] = [f"{spec}@1" for spec in heur]
    out: dict[str, list[str]] = {}
    for name, specs in cands.items():
        if specs not in out.values():
            out[name] = specs
    return out


def _burst(model: FastModel, x: np.ndarray, threads: int, specs: list[str], n: int, clock) -> float:
    """Seconds per call of ``n`` back-to-back calls after one unmeasured call (warm, as in deployment)."""
    if n > 1:
        model.run(x, threads=threads, kernels=specs, chain=True)
    t0 = clock()
    for _ in range(n):
        model.run(x, threads=threads, kernels=specs, chain=True)
    return (clock() - t0) / n


@_timed_with_awake_workers
def calibrate(model: FastModel, *, batches: Iterable[int] = CALIBRATION_BATCHES, threads: int = 1,
              budget_s: float = 1.9, seed: int = 0) -> dict[str, dict]:
    """Quick measured plan for the whole model (on by default at export; well under ``budget_s``).

    For each batch size, a few whole-model plans (``chain_candidates``) run interleaved on random
    inputs and the fastest by median becomes every layer's plan entry for that batch: an artifact
    whose heuristic would lose to dense ONNX Runtime (tiny layers, where call overhead dominates)
    falls back to dense there. When one call is too slow to time within the budget, the heuristic
    stays unless a single call showed dense ahead. Every model is measured at every batch size, big
    sparse ones too: a margin measured on one code path does not carry to another (1024x1024 90% at
    batch 64 runs ~4x faster than dense ORT on AVX-512 but ~4x slower on the generic path, whose
    kernels are not vectorised by hand), and measuring them costs little (1024x1024 90%: 0.37 -> 0.55 s
    on AVX-512). A candidate that beat the heuristic is timed against it once more
    after every batch size has been measured (another moment: noise from other processes comes and
    goes) and kept only if it wins again: in one benchmark run the 2-thread artifact of 1024x1024 98%
    chose one thread at batch 16 (27 µs per call) where two threads take 18-21 µs and where standalone
    calibrations chose two threads every time. Returns ``{batch: {"chosen", "kernels", "median_s"[, "confirm_s",
    "confirmed"]}}``.
    """
    batches = sorted({int(b) for b in batches})
    rng = np.random.default_rng(seed)
    plans: list[dict[int, str]] = [dict(layer.plan) for layer in model.layers]
    report: dict[str, dict] = {}
    per_batch = budget_s / max(1, len(batches))
    clock = call_clock(threads)
    recheck: list[tuple[int, str, dict[str, list[str]], np.ndarray, dict[str, int]]] = []
    for b in batches:
        cands = chain_candidates(model, b, threads)
        if len(cands) == 1:
            chosen, med = next(iter(cands)), {}
        else:
            x = rng.standard_normal((b, *model.input_shape)).astype(np.float32)
            start = time.perf_counter()
            times: dict[str, list[float]] = {k: [] for k in cands}
            bursts: dict[str, int] = {}
            for k, specs in cands.items():  # warm-up (sessions, blocked copies, first touches)
                model.run(x, threads=threads, kernels=specs, chain=True)
                t0 = time.perf_counter()
                model.run(x, threads=threads, kernels=specs, chain=True)
                bursts[k] = int(min(8, max(1, 0.001 // max(time.perf_counter() - t0, 1e-7))))

            for k in cands:
                times[k].append(_burst(model, x, threads, cands[k], bursts[k], clock))
            one_round = time.perf_counter() - start
            reps = 1
            while reps < 25 and (reps < 5 or time.perf_counter() - start < per_batch) \
                    and one_round * 2 < per_batch:
                for k in cands:
                    times[k].append(_burst(model, x, threads, cands[k], bursts[k], clock))
                reps += 1
            med = {k: float(np.median(v)) for k, v in times.items()}
            chosen = min(med, key=med.__getitem__)
            if reps == 1 and chosen != "heuristic" and med[chosen] > med["heuristic"] / 1.5:
                chosen = "heuristic"  # one sample only: overrule the heuristic on a clear loss alone
            if chosen != "heuristic" and reps > 1:
                recheck.append((b, chosen, cands, x, bursts))
        for plan, spec in zip(plans, cands[chosen], strict=True):
            plan[b] = spec
        report[str(b)] = {"chosen": chosen, "kernels": cands[chosen],
                          "median_s": {k: round(v, 9) for k, v in med.items()}}
    for b, chosen, cands, x, bursts in recheck:
        pair = {"heuristic": [], chosen: []}
        for _ in range(CONFIRM_REPS):
            for k in pair:
                pair[k].append(_burst(model, x, threads, cands[k], bursts[k], clock))
        again = {k: float(np.median(v)) for k, v in pair.items()}
        entry = report[str(b)]
        entry["confirm_s"] = {k: round(v, 9) for k, v in again.items()}
        entry["confirmed"] = again[chosen] < again["heuristic"]
        if not entry["confirmed"]:
            entry["chosen"], entry["kernels"] = "heuristic", cands["heuristic"]
            for plan, spec in zip(plans, cands["heuristic"], strict=True):
                plan[b] = spec
    for layer, plan in zip(model.layers, plans, strict=True):
        layer.plan = plan
        if "dense" not in plan.values():
            layer._dense = None  # densified copies were only needed for timing
        if "gemv" not in plan.values():
            layer._dense_t = None
    model.plan_changed()
    model._sessions.clear()
    return report
