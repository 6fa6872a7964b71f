"""``FastModel``: an MLP chain of sparse layers run by sparsekit's kernels, layer by layer.

Each layer carries a *plan*: for a few batch sizes, the kernel measured (``--tune``) or guessed
(``default_kernel``) to be fastest there. ``run`` picks, per layer, the plan entry nearest to the
actual batch size (log scale), keeps activations in the layout the next kernel wants (row-major or
64-sample panels) and runs runs of consecutive ``dense`` layers as one ONNX Runtime session.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

# imported here, not on first use: a process that forks while another thread is importing a module leaves that
# module's import lock held in the child for good (a child forked during a model's first dense call hung)
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from sparsekit.errors import InputError
from sparsekit.runtime import forksafe
from sparsekit.runtime.layers import (
    _K,
    PANEL,
    CsrLayer,
    aligned_empty,
    from_panels,
    kernel_isa,
    parse_kernel,
    window_width,
)
from sparsekit.runtime.memory import kernel_bytes

_F32 = np.dtype(np.float32)

CHAIN_ROWS, CHAIN_GEMV, CHAIN_PANEL, CHAIN_WINDOW, CHAIN_BLOCK = 0, 1, 2, 3, 4  # ChainLayer.kind
ON_PANELS = ("panel", "block")  # the kernels whose activations are 64-sample panels


@dataclass(frozen=True)
class ChainLayer:
    """One layer of a C chain as ``_kernels.chain_new`` reads it, field by field (and validates every one)."""

    kind: int                       # CHAIN_ROWS, CHAIN_GEMV, CHAIN_PANEL, CHAIN_WINDOW or CHAIN_BLOCK
    values: np.ndarray              # float32 values (gemv: the weight transposed, (n_in, n_out); block: R an entry)
    indices: np.ndarray | None      # column indices (idx_bytes each; window: in-window); gemv: None
    pointers: np.ndarray | None     # int64 rows/window: slice pointers; panel/block: block pointers; gemv: None
    order: np.ndarray | None        # int32 rows/window: row at each slot; panel: row order or None; gemv: None
    bias: np.ndarray | None         # float32 (n_out,) (rows/window: padded to whole slices) or None
    idx_bytes: int                  # 2 or 4 (window: 1)
    n_in: int
    n_out: int
    relu: int                       # 0 or 1
    threads: int                    # the layer's thread cap (``@N``), 0: none
    blocks: int = 1                 # panel: column blocks
    windows: np.ndarray | None = None  # window: int32 first input of each slot's window
    window: int = 0                 # window: the window width
    rows_per_block: int = 1         # block: R, the rows of a row block
# outputs from this many floats are allocated 64-byte aligned (see _new_output)
ALIGNED_OUTPUT_FLOATS = 1 << 16


def _new_output(batch: int, n: int) -> np.ndarray:
    """A fresh (batch, n) float32 output. Large ones are 64-byte aligned, so the panel kernel's fused
    transpose writes whole cache lines (its fast path needs that; numpy's own large allocations are
    16 bytes past a page boundary): 4096x1024 90% batch 256 on one thread 3.76 -> 3.22 ms. Small ones
    skip aligned_empty's few µs of numpy calls."""
    size = batch * n
    if size >= ALIGNED_OUTPUT_FLOATS:
        return aligned_empty(size).reshape(batch, n)
    return np.empty((batch, n), _F32)


def _mib(n: int) -> str:
    return f"{n / (1 << 20):,.0f}"


# batch size below which the gathered-row kernel is the default; above it the panel kernel
ROWS_MAX_BATCH = 8
# densities above which the dense GEMM is the default (no tuning): measured break-even points
ROWS_MAX_DENSITY = 0.4
PANEL_MAX_DENSITY = 0.3


# gemv (own dense kernel) instead of ONNX Runtime's GEMM for dense-ish layers up to this many weights
GEMV_MAX_WEIGHTS = 1 << 18


def small_batch_costs(layer: CsrLayer) -> dict[str, float]:
    """Rough per-sample cost (µs) of the small-batch kernels as a chain layer: ``rows`` pays per output
    row and per nonzero, ``gemv`` a fixed 0.29 µs more plus per 16-wide vector of the dense weight.
    Least-squares fit of 60 layers (n_in 16-1024, n_out 10-1024, density 2-30%) at batch 1 on the Xeon of
    bench/RESULTS.md, after the rows kernel's aligned layout: it picks the faster kernel in all but 2 (at
    most 13% off); the fit it replaces (0.0055/row + 0.00032/nonzero vs 0.0009/vector) picked gemv for a
    512x64 98% layer that runs 1.4x faster on rows."""
    return {"rows": 0.0005 * layer.n_out + 0.0002 * layer.nnz,
            "gemv": 0.29 + 0.00075 * layer.n_in * -(-layer.n_out // 16)}


def small_batch_sparse(layer: CsrLayer) -> str:
    """The sparse small-batch kernel the heuristic starts from: ``window`` with a vector code path (no
    gathers: 1024x1024 90% at batch 1 on AMD Zen 5, 40 -> 13 us; calibration still times ``rows``, whose
    gathers are fast on some Intel cores), ``rows`` on the generic path or for layers narrower than a
    window."""
    return "window" if kernel_isa() in ("avx512", "avx2") and layer.has_window() else "rows"


def default_kernel(layer: CsrLayer, batch: int) -> str:
    """The untuned choice: sparse kernels where they clearly win, dense kernels otherwise."""
    if layer.n_in == 0 or layer.n_out == 0:
        return "rows"
    d = layer.density
    if batch < ROWS_MAX_BATCH:
        cost = small_batch_costs(layer)
        if layer.n_in * layer.n_out <= GEMV_MAX_WEIGHTS and (d > ROWS_MAX_DENSITY or cost["gemv"] < cost["rows"]):
            return "gemv"
        return small_batch_sparse(layer) if d <= ROWS_MAX_DENSITY else "dense"
    if d > PANEL_MAX_DENSITY:
        return "dense"
    if layer.has_block():
        # R x 1 row blocks: each input row is loaded once for R rows, which also makes column blocks unnecessary
        # (4096x4096 4x1 blocks at 80% and 90%, batch 16 and 256: block:256 5-15% slower than block)
        return "block"
    if layer.n_in > 512 and d >= 0.05:  # column blocks whose input slab stays in L1/L2 (measured at 90%)
        return "panel:128" if layer.n_in <= 2048 else "panel:256"
    return "panel"  # sparser: too few nonzeros per row and block to pay for the blocks' overhead


def pick_kernel(layer: CsrLayer, batch: int) -> str:
    """The layer's plan entry nearest to ``batch`` (log scale), else ``default_kernel``. Halfway between
    two entries the larger one's: the small-batch kernels cost about linearly in the batch while a
    panel costs the same from 1 to 64 samples (the demo model at batch 8: rows 36 us, the batch-16
    entry's panel chain 24 us)."""
    if not layer.plan:
        return default_kernel(layer, batch)
    lb = math.log2(max(batch, 1))
    best = min(layer.plan, key=lambda b: (abs(math.log2(max(b, 1)) - lb), -b))
    spec = layer.plan[best]
    if spec.partition("@")[0] == "dense" and (layer.n_in == 0 or layer.n_out == 0):
        return "rows"
    return spec


def _dense_session(layers: Sequence[CsrLayer], threads: int):
    """An ONNX Runtime session computing ``layers`` densely (MatMul + Add + Relu)."""
    nodes, inits = [], []
    cur = "x"
    for i, layer in enumerate(layers):
        last = i == len(layers) - 1
        # MatMul with the weight stored (in, out) (+ Add): what ORT runs fastest for a dense MLP
        inits.append(numpy_helper.from_array(layer.dense_t(), f"w{i}"))
        out = "y" if last and not layer.relu else f"g{i}"
        if layer.bias is not None:
            inits.append(numpy_helper.from_array(layer.bias, f"b{i}"))
            nodes.append(helper.make_node("MatMul", [cur, f"w{i}"], [f"m{i}"]))
            nodes.append(helper.make_node("Add", [f"m{i}", f"b{i}"], [out]))
        else:
            nodes.append(helper.make_node("MatMul", [cur, f"w{i}"], [out]))
        cur = out
        if layer.relu:
            nodes.append(helper.make_node("Relu", [cur], ["y" if last else f"r{i}"]))
            cur = f"r{i}"
    graph = helper.make_graph(
        nodes, "sparsekit_dense_segment",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", layers[0].n_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", layers[-1].n_out])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads > 1:  # idle ORT workers spin; sparsekit's own kernels share the cores
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


class FastModel:
    """A loaded ``fast`` artifact. ``run(x)`` is safe to call from several Python threads: batches whose layers
    all run the rows/gemv kernels, or all run ``panel``, go through one prepared C chain (concurrent callers
    each get their own activation scratch and their own output array); other calls are serialised."""

    def __init__(self, layers: list[CsrLayer], input_shape: tuple[int, ...], *, threads: int = 1,
                 input_name: str = "input", output_name: str = "output",
                 metadata: dict[str, str] | None = None, memory_limit: int | None = None) -> None:
        """``memory_limit``: bytes each layer's kernel may use beyond its CSR (``memory.kernel_bytes``); kernels
        over it are replaced by a sparse kernel that fits (``notes`` says so), or refused. None: no limit (models
        built in this process); ``load`` sets ``memory.memory_bound`` of the file."""
        if not layers:
            raise InputError("a fast model needs at least one layer", where="model")
        prev = int(np.prod(input_shape)) if input_shape else 1
        for layer in layers:
            if layer.n_in != prev:
                raise InputError(f"layer {layer.name!r} takes {layer.n_in} inputs, gets {prev}",
                                 where=layer.name or "model")
            prev = layer.n_out
        self.layers = layers
        self.input_shape = tuple(int(d) for d in input_shape)
        self.input_name = input_name
        self.output_name = output_name
        self.metadata = dict(metadata or {})
        self.threads = self._check_threads(threads)
        self._sessions: dict[tuple[int, int, int], Any] = {}
        # batch -> (the layers' plan dicts it was made from, parsed specs, prepared C chain or None)
        self._plans: dict[int, tuple[tuple[dict[int, str], ...], list[tuple[str, int, int]], Any]] = {}
        # batch -> (C chain, output allocator): run()'s fast path, dropped by plan_changed() (which a layer
        # calls when its plan is replaced)
        self._fast: dict[int, tuple[Any, Callable[[], np.ndarray]]] = {}
        self._forced_chains: dict[tuple[tuple[str, int, int], ...], Any] = {}  # run(kernels=, chain=True)
        self._n_out = layers[-1].n_out
        self._buffers: list[np.ndarray | None] = [None, None]
        self._lock = threading.Lock()
        self.memory_limit = memory_limit
        self.notes: dict[str, None] = {}  # one line per kernel replaced to fit memory_limit (ordered set)
        self.replanned: dict[str, Any] | None = None  # set when loading re-measured the plan on this CPU
        self._fits: dict[tuple[int, str, int], int] = {}  # (layer, kernel, block) -> kernel_bytes
        forksafe.register(self)  # a fresh lock in forked children
        for layer in layers:
            layer._owners.add(self)

    @staticmethod
    def _check_threads(threads: int) -> int:
        if not isinstance(threads, (int, np.integer)) or threads < 1:
            raise InputError(f"threads must be a positive integer, got {threads!r}", where="threads")
        return int(threads)

    @property
    def n_features(self) -> int:
        return self.layers[0].n_in

    @property
    def n_outputs(self) -> int:
        return self.layers[-1].n_out

    def kernels_for(self, batch: int) -> list[str]:
        specs = [pick_kernel(layer, batch) for layer in self.layers]
        if self.memory_limit is None:
            return specs
        return [self._fit(i, spec, batch) for i, spec in enumerate(specs)]

    def _kernel_bytes(self, i: int, spec: str) -> int:
        name, block, _ = parse_kernel(spec)
        key = (i, name, block)
        if key not in self._fits:
            self._fits[key] = kernel_bytes(self.layers[i], name, block, self.threads)
        return self._fits[key]

    def _fit(self, i: int, spec: str, batch: int) -> str:
        """``spec``, or where it needs more than ``memory_limit``, the sparse kernel for this batch that fits
        (rows below ROWS_MAX_BATCH, else panel; then the other), noted in ``notes``; InputError when none fits."""
        limit = self.memory_limit
        if limit is None:
            return spec
        need = self._kernel_bytes(i, spec)
        if need <= limit:
            return spec
        layer = self.layers[i]
        label = f"layer {layer.name or i!r} ({layer.n_out}x{layer.n_in}, {layer.nnz} nonzeros)"
        body, at, cap = spec.partition("@")
        for alt in (("rows", "panel") if batch < ROWS_MAX_BATCH else ("panel", "rows")):
            if self._kernel_bytes(i, alt) <= limit:
                self.notes[f"{label}: kernel {body} would need ~{_mib(need)} MiB, over this artifact's "
                           f"{_mib(limit)} MiB memory bound; running {alt} instead"] = None
                return alt + at + cap
        raise InputError(f"{label} needs ~{_mib(self._kernel_bytes(i, 'rows'))} MiB even on the sparse kernels, "
                         f"over this artifact's {_mib(limit)} MiB memory bound", where=layer.name or "model",
                         fix="check the artifact's layer shapes; an honest artifact needs far less")

    def _check_forced(self, specs: list[str]) -> None:
        """Kernels forced by the caller are run as asked or refused, never replaced."""
        limit = self.memory_limit
        for i, spec in enumerate(specs if limit is not None else ()):
            need = self._kernel_bytes(i, spec)
            if need > limit:
                raise InputError(f"kernel {spec} needs ~{_mib(need)} MiB for layer {self.layers[i].name or i!r}, "
                                 f"over this artifact's {_mib(limit)} MiB memory bound", where="kernels",
                                 fix="force a sparse kernel (rows or panel) for this layer")

    def fit_plans(self) -> None:
        """Replace every plan entry whose kernel does not fit ``memory_limit`` (see ``_fit``)."""
        for i, layer in enumerate(self.layers):
            fitted = {b: self._fit(i, spec, b) for b, spec in layer.plan.items()}
            if fitted != layer.plan:
                layer.plan = fitted

    def parsed_plan(self, batch: int) -> list[tuple[str, int, int]]:
        """Parsed kernel specs for ``batch``, cached until a layer's plan dict is replaced (assign a new
        dict to ``layer.plan`` rather than editing it in place, or call ``plan_changed()``)."""
        return self._plan(batch)[0]

    def _plan(self, batch: int) -> tuple[list[tuple[str, int, int]], Any]:
        """(parsed specs, prepared chain or None) for ``batch``, cached like ``parsed_plan``."""
        hit = self._plans.get(batch)
        if hit is not None and self._same_plans(hit[0]):
            return hit[1], hit[2]
        plans = tuple(layer.plan for layer in self.layers)  # before reading them: a plan replaced meanwhile shows
        parsed = [parse_kernel(s) for s in self.kernels_for(batch)]
        chain = self._make_chain(parsed) if batch > 0 else None
        if len(self._plans) > 64:
            self._plans.clear()
            self._fast.clear()
        self._plans[batch] = (plans, parsed, chain)
        if chain is not None and self._same_plans(plans):
            alloc = (partial(np.empty, (batch, self._n_out), _F32) if batch * self._n_out < ALIGNED_OUTPUT_FLOATS
                     else partial(_new_output, batch, self._n_out))
            self._fast[batch] = (chain, alloc)
        return parsed, chain

    def chain(self, batch: int) -> Any:
        """The prepared C chain that runs ``batch`` (one Python -> C call per ``run``), or None when the layers'
        kernels for it do not form one (e.g. a mix of rows and panel, or a dense layer)."""
        return self._plan(batch)[1]

    @property
    def chain_cache(self) -> dict[int, tuple[Any, Callable[[], np.ndarray]]]:
        """batch -> (C chain, output allocator): the table ``_kernels.fast_call`` looks a call up in. Emptied by
        ``plan_changed``; filled by ``run`` as batch sizes are met."""
        return self._fast

    def _same_plans(self, plans: tuple[dict[int, str], ...]) -> bool:
        """Every layer still holds the plan dict it held when ``plans`` was taken."""
        return all(layer.plan is plan for layer, plan in zip(self.layers, plans, strict=True))

    def _make_chain(self, parsed: list[tuple[str, int, int]]) -> Any:
        """A C chain (``_kernels.chain_new``) when every layer runs a small-batch kernel (rows, window or gemv),
        or every layer runs ``panel`` or ``block``: the whole model is then one Python->C call per ``run``, its
        arguments validated here once. A panel chain runs data-parallel: each thread takes whole panels
        (or half panels) of the batch through every layer, with no hand-off between layers."""
        if _K is None or not hasattr(_K, "chain_new") or self.layers[0].n_in == 0:
            return None
        names = {name for name, _, _ in parsed}
        on_panels = names <= set(ON_PANELS)
        if not (names <= {"rows", "window", "gemv"} or on_panels):
            return None
        if on_panels and any(layer.n_out == 0 for layer in self.layers):
            return None
        return _K.chain_new(self.chain_layers(parsed), self.input_shape)

    def chain_layers(self, parsed: list[tuple[str, int, int]]) -> list[ChainLayer]:
        """``chain_new``'s layers, one ``ChainLayer`` per layer in the kernel ``parsed`` picks for it."""
        specs: list[ChainLayer] = []
        for layer, (name, block, cap) in zip(self.layers, parsed, strict=True):
            shape = {"n_in": layer.n_in, "n_out": layer.n_out, "relu": int(layer.relu), "threads": cap}
            if name == "block" and layer.has_block():
                v, i, bptr, nb = layer.row_blocked(block)
                specs.append(ChainLayer(CHAIN_BLOCK, v, i, bptr, None, layer.bias, layer.idx_bytes, **shape,
                                        blocks=int(nb), rows_per_block=layer.row_block()))
            elif name in ON_PANELS:  # block on a layer without row blocks: panel
                v, i, bptr, nb, order = layer.blocked(block)
                specs.append(ChainLayer(CHAIN_PANEL, v, i, bptr, order, layer.bias, layer.idx_bytes, **shape,
                                        blocks=int(nb)))
            elif name == "window" and layer.has_window():
                width = window_width()
                wv, wi, slice_ptr, order, bias, windows = layer.windowed(width)
                specs.append(ChainLayer(CHAIN_WINDOW, wv, wi, slice_ptr, order, bias, 1, **shape, windows=windows,
                                        window=width))
            elif name in ("rows", "window"):  # window on a layer narrower than a window: rows
                sv, si, slice_ptr, perm, bias = layer.sliced()
                specs.append(ChainLayer(CHAIN_ROWS, sv, si, slice_ptr, perm, bias, layer.idx_bytes, **shape))
            else:
                specs.append(ChainLayer(CHAIN_GEMV, layer.dense_t(), None, None, None, layer.bias, 4, **shape))
        return specs

    def plan_changed(self) -> None:
        """Forget cached kernel choices and chains (after editing a layer's plan dict in place; assigning a
        new dict to ``layer.plan`` calls this for every model running the layer)."""
        self._plans.clear()
        self._fast.clear()

    def _prepare_input(self, x: Any) -> np.ndarray:
        if (type(x) is np.ndarray and x.dtype == np.float32 and x.ndim == 2  # the common case, cheaply
                and x.shape[1] == self.n_features and len(self.input_shape) == 1 and x.flags.c_contiguous):
            return x
        try:
            arr = np.asarray(x)
        except Exception as exc:  # pragma: no cover - odd objects
            raise InputError(f"input is not an array: {exc}", where="input") from exc
        if arr.dtype.kind not in "fiub":
            raise InputError(f"input dtype {arr.dtype} is not numeric", where="input",
                             fix="pass a float32 array")
        shape = self.input_shape
        if arr.ndim == len(shape) + 1 and tuple(arr.shape[1:]) == shape:
            pass
        elif arr.ndim == 2 and arr.shape[1] == self.n_features:
            pass
        else:
            want = ", ".join(str(d) for d in shape)
            raise InputError(f"input has shape {tuple(arr.shape)}, expected (batch, {want})", where="input",
                             fix=f"reshape the input to (batch, {want})")
        return np.ascontiguousarray(arr.reshape(arr.shape[0], -1), dtype=np.float32)

    def run(self, x: Any, *, threads: int | None = None, kernels: Sequence[str] | None = None,
            chain: bool = False) -> np.ndarray:
        """Outputs ``(batch, n_outputs)`` float32 for inputs ``(batch, *input_shape)``.

        ``kernels`` forces one kernel spec per layer (benchmarks, tests); by default the plan decides.
        With ``kernels`` and ``chain=True`` the specs run the way a plan with them would (as one
        prepared C chain where they allow it): what calibration and ``--tune`` time.
        Returns an array nothing else references: a new one, or (fast path) one an earlier call returned
        that its caller has let go of (no name, view or buffer export left), as malloc would reuse it.
        """
        nt = self.threads if threads is None else self._check_threads(threads)
        if kernels is None and _K is not None:
            # fast path, one C call: a float32 C-contiguous (batch, n_features) or (batch, *input_shape) x of
            # a batch size in this model's chain cache (seen before, all its layers one C chain, no plan
            # changed since: else None); outputs nothing references any more are recycled (fast_call,
            # csrc/runtime/sk_pychain.c)
            y = _K.fast_call(self._fast, x, nt)
            if y is not None:
                return y
        xf = self._prepare_input(x)
        batch = xf.shape[0]
        if kernels is None:
            parsed, planned = self._plan(batch)
            if planned is not None:  # rows/gemv layers only, or panel layers only: the whole chain in one C call
                y = _new_output(batch, self.n_outputs)
                if _K.chain_run(planned, xf, y, nt):
                    return y
        else:
            specs = list(kernels)
            if len(specs) != len(self.layers):
                raise InputError(f"{len(specs)} kernel specs for {len(self.layers)} layers", where="kernels")
            parsed = [parse_kernel(s) for s in specs]
            self._check_forced(specs)
            if chain and batch > 0:
                key = tuple(parsed)
                if key not in self._forced_chains:
                    if len(self._forced_chains) > 64:
                        self._forced_chains.clear()
                    self._forced_chains[key] = self._make_chain(parsed)
                forced = self._forced_chains[key]
                if forced is not None:
                    y = _new_output(batch, self.n_outputs)
                    if _K.chain_run(forced, xf, y, nt):
                        return y
        if batch == 0:
            return np.zeros((0, self.n_outputs), dtype=np.float32)
        with self._lock:
            return self._run(xf, parsed, nt)

    def _scratch(self, slot: int, size: int) -> np.ndarray:
        """Aligned float32 scratch of ``size`` in slot 0 or 1, kept between calls (``run`` holds the
        lock): a fresh multi-MB buffer per layer costs page faults on first touch every call."""
        buf = self._buffers[slot]
        if buf is None or buf.size < size:
            buf = self._buffers[slot] = aligned_empty(size)
        return buf[:size]

    def release_scratch(self) -> None:
        """Free the cached activation buffers (they hold the largest batch's panels) and the outputs the
        C chains keep for reuse."""
        with self._lock:
            self._buffers = [None, None]
        for chain, _ in list(self._fast.values()):
            _K.chain_drop_outputs(chain)

    def _run(self, x: np.ndarray, parsed: list[tuple[str, int, int]], threads: int) -> np.ndarray:
        batch = x.shape[0]
        cur: np.ndarray = x
        panels = 0  # > 0 while ``cur`` holds that many panels
        slot = 0  # scratch slot ``cur`` lives in while it holds panels
        i = 0
        n = len(self.layers)
        while i < n:
            name, block, cap = parsed[i]
            nt = min(threads, cap) if cap else threads  # the plan's per-layer thread cap (``@N``)
            layer = self.layers[i]
            if name == "dense":
                j = i
                while j < n and parsed[j][0] == "dense" and parsed[j][2] == cap:
                    j += 1
                if panels:
                    cur, panels = from_panels(cur, batch, layer.n_in, nt), 0
                with forksafe.ORT_CALLS:  # a fork waits for this call (ORT's locks do not survive one)
                    sess = self._session(i, j, nt)
                    cur = sess.run(None, {"x": cur})[0]
                i = j
                continue
            if name in ("rows", "window", "gemv"):
                if panels:
                    cur, panels = from_panels(cur, batch, layer.n_in, nt), 0
                y = np.empty((batch, layer.n_out), dtype=np.float32)
                {"rows": layer.run_rows, "window": layer.run_window, "gemv": layer.run_gemv}[name](cur, y, nt)
                cur = y
            else:  # panel, block: activations ping-pong between two cached scratch buffers
                x_rows = None
                if not panels:  # row-major input: the kernel transposes it panel by panel into scratch
                    slot = 0
                    panels = -(-batch // PANEL)
                    x_rows, cur = cur, self._scratch(slot, layer.n_in * panels * PANEL)
                slot ^= 1
                yp = self._scratch(slot, panels * layer.n_out * PANEL)
                blocks = {"row_blocks": True} if name == "block" else {}
                if i + 1 == n or parsed[i + 1][0] not in ON_PANELS:
                    # the layout changes after this layer: the kernel writes row-major output itself
                    # (fused transpose) into an output _new_output aligns when large
                    y = _new_output(batch, layer.n_out)
                    layer.run_panel(cur, yp, panels, block, nt, y_rows=y, x_rows=x_rows, **blocks)
                    cur, panels = y, 0
                else:
                    layer.run_panel(cur, yp, panels, block, nt, x_rows=x_rows, **blocks)
                    cur = yp
            i += 1
        if panels:
            cur = from_panels(cur, batch, self.n_outputs, threads)
        return cur

    def _session(self, start: int, end: int, threads: int):
        key = (start, end, threads)
        if key not in self._sessions:
            self._sessions[key] = _dense_session(self.layers[start:end], threads)
        return self._sessions[key]

    def info(self) -> dict[str, Any]:
        """A JSON-able summary: layers, sparsity, plans, code path."""
        return {
            "input_shape": list(self.input_shape),
            "n_outputs": self.n_outputs,
            "isa": kernel_isa(),
            "threads": self.threads,
            "layers": [layer_info(layer) for layer in self.layers],
            "metadata": dict(self.metadata),
        }


def layer_info(layer: CsrLayer) -> dict[str, Any]:
    """A layer for ``info()``: name, shape (out, in), nonzeros, sparsity, ReLU, plan."""
    return {"name": layer.name, "shape": [layer.n_out, layer.n_in], "nnz": layer.nnz,
            "sparsity": round(1.0 - layer.density, 6), "relu": layer.relu,
            "plan": {str(k): v for k, v in sorted(layer.plan.items())}}
