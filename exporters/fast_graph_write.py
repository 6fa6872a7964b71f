"""Writing a whole-graph ``fast`` artifact (``write_model`` for a graph that is not an MLP chain): pack it
(``fast_graph.pack_graph``), keeping each sparse convolution only where it measures faster than ONNX Runtime's
with the hand-offs (``faster_than_dense``); plan the sparse linear layers; time the whole artifact against the
dense graph (``graph_speed``), without its sparse convolutions too when it loses; check it against the dense
graph; write it.
"""

from __future__ import annotations

import time

import numpy as np
import onnx
from onnx import helper
from sparsekit.exporters.fast_graph import MAX_DENSITY, Packed, _shapes, pack_graph
from sparsekit.exporters.graph import UnsupportedGraphError

from sparsekit.runtime.conv import SparseConv


def _session(nodes: list[onnx.NodeProto], shape: tuple[int, ...], inits: list[onnx.TensorProto], threads: int):
    """An ONNX Runtime session of ``nodes`` from float input ``x`` of ``shape`` to ``y``."""
    from sparsekit.exporters.fast import _dense_reference

    graph = helper.make_graph(nodes, "probe", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return _dense_reference(model, threads)


def _medians(runs: dict, reps: int, threads: int) -> dict[str, float]:
    """Median seconds per call of each callable, one call each in turn after a warm-up call; thread CPU time on
    one thread (steady on a shared machine), wall time on more."""
    clock = time.thread_time if threads == 1 else time.perf_counter
    times: dict[str, list[float]] = {k: [] for k in runs}
    for fn in runs.values():
        fn()
    for _ in range(reps):
        for k, fn in runs.items():
            t0 = clock()
            fn()
            times[k].append(clock() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}


def faster_than_dense(dense: onnx.ModelProto, threads: int, *, margin: float = 1.05, reps: int = 11):
    """``keep_conv`` for ``pack_graph``: times each sparse convolution against ONNX Runtime's Conv on its dense
    weight, at batch 1 on the input shape shape inference gives, plus two hand-offs between ONNX Runtime and
    sparsekit, and keeps it sparse where it is faster by ``margin``: a small convolution (MobileNetV2's 1x1
    layers: 0.78x of dense with all of them sparse) stays in ONNX Runtime. A convolution whose input shape is
    unknown stays dense."""
    shapes = _shapes(dense)
    handoffs: dict[tuple[int, ...], float] = {}

    def handoff_s(shape: tuple[int, ...]) -> float:
        """What taking a layer out of ONNX Runtime's graph costs per call: the sparse node splits a segment in
        two, and the tensors cross between ONNX Runtime and sparsekit (timed: an Identity session on it)."""
        if shape not in handoffs:
            sess = _session([helper.make_node("Identity", ["x"], ["y"])], shape, [], threads)
            z = np.zeros(shape, np.float32)
            handoffs[shape] = _medians({"hop": lambda: sess.run(None, {"x": z})}, 20, threads)["hop"]
        return handoffs[shape]

    def keep(conv: SparseConv, x_name: str) -> bool:
        dims = shapes.get(x_name)
        if not dims or len(dims) != 4 or any(not d for d in dims[1:]):
            return False
        x = np.random.default_rng(0).standard_normal((1, *dims[1:])).astype(np.float32)
        g, layer = conv.geometry, conv.layer
        w = layer.dense_weight().reshape(conv.out_channels, conv.in_channels, *g.kernel)
        inits = [onnx.numpy_helper.from_array(w, "w")]
        if layer.bias is not None:
            inits.append(onnx.numpy_helper.from_array(layer.bias, "b"))
        nodes = [helper.make_node("Conv", ["x", "w", "b"][:len(inits) + 1], ["c"], strides=list(g.strides),
                                  pads=list(g.pads), dilations=list(g.dilations)),
                 helper.make_node("Relu" if layer.relu else "Identity", ["c"], ["y"])]
        sess = _session(nodes, x.shape, inits, threads)
        med = _medians({"dense": lambda: sess.run(None, {"x": x}), "sparse": lambda: conv.run(x, threads=threads)},
                       reps, threads)
        return (med["sparse"] + 2 * handoff_s(x.shape)) * margin < med["dense"]

    return keep


def _random_inputs(dense: onnx.ModelProto, batch: int, seed: int) -> dict[str, np.ndarray]:
    """Inputs of each graph input's type and shape (symbolic dims: ``batch`` first, 8 after): float ones
    standard normal, integer ones 0 (a valid index for any embedding)."""
    rng = np.random.default_rng(seed)
    init_names = {t.name for t in dense.graph.initializer}
    out = {}
    for vi in dense.graph.input:
        if vi.name in init_names:
            continue
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (batch if k == 0 else 8)
                for k, d in enumerate(tt.shape.dim)]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        out[vi.name] = (rng.standard_normal(dims).astype(dtype) if np.dtype(dtype).kind == "f"
                        else np.zeros(dims, dtype))
    return out


def check_against_dense(model, dense: onnx.ModelProto, inputs: np.ndarray | None) -> dict[str, float]:
    """max |fast - dense ORT| over the first output and its bound ``1e-5 * max(1, max |dense|)``, on ``inputs``
    (the run's samples) or random inputs at batch 1 and 3."""
    from sparsekit.exporters.fast import TOLERANCE, _dense_reference

    sess = _dense_reference(dense, 1)
    name = sess.get_inputs()[0].name
    feeds = [{name: inputs}] if inputs is not None else [_random_inputs(dense, b, b) for b in (1, 3)]
    worst, bound = 0.0, 0.0
    for feed in feeds:
        ref = sess.run(None, feed)[0]
        got = model.run(feed if len(feed) > 1 else next(iter(feed.values())))
        got = got[0] if isinstance(got, list) else got
        worst = max(worst, float(np.max(np.abs(got - ref))) if ref.size else 0.0)
        bound = max(bound, TOLERANCE * max(1.0, float(np.max(np.abs(ref))) if ref.size else 1.0))
    return {"max_abs_diff": worst, "bound": bound}


# the largest batch export measures whole artifacts at (a larger --tune-batch-size is measured at this one)
MEASURE_MAX_BATCH = 64


def graph_speed(model, dense: onnx.ModelProto, inputs: np.ndarray | None, batch_size: int = 1) -> list[dict]:
    """The whole artifact against the dense graph in ONNX Runtime, one thread, at batch 1 and at ``batch_size``
    (up to ``MEASURE_MAX_BATCH``; real samples when given, repeated to fill the batch): the segments between sparse
    nodes cost a little per call, which a small model may not win back at batch 1, and a layer sparse at batch 1
    may lose at a larger batch (MobileNet-v1's pointwise convolutions)."""
    from sparsekit.exporters.fast import _dense_reference
    from sparsekit.exporters.speed import speedups_vs_dense

    sess = _dense_reference(dense, 1)
    name = sess.get_inputs()[0].name
    xs = {}
    for b in sorted({1, min(max(1, batch_size), MEASURE_MAX_BATCH)}):
        xs[b] = (np.resize(inputs, (b, *inputs.shape[1:])).astype(inputs.dtype) if inputs is not None
                 else _random_inputs(dense, b, 0)[name])
    return speedups_vs_dense(lambda a: sess.run(None, {name: a}), {"fast": lambda a: model.run(a, threads=1)},
                             xs)["fast"]


def worst_speedup(records: list[dict]) -> float:
    """The lowest speedup over the batches measured: an artifact must pay at every one."""
    return min(r["speedup"] for r in records)


def _planned(packed: Packed, dense: onnx.ModelProto, metadata: dict[str, str] | None, *, tune: bool,
             calibrate: bool, threads: int, batch_size: int, tune_budget_s: float):
    """The ``GraphModel`` of ``packed`` with its metadata and every sparse linear layer's plan (calibrated against
    ONNX Runtime's GEMM on its own, ``--tune``d, or the heuristic); and the plan's source."""
    import json

    from sparsekit import __version__
    from sparsekit.runtime.graph_model import GraphModel
    from sparsekit.runtime.layers import kernel_isa
    from sparsekit.runtime.replan import record
    from sparsekit.runtime.tune import CALIBRATION_BATCHES, DEFAULT_BATCHES, tune_layers
    from sparsekit.runtime.tune import calibrate as calibrate_model

    meta = {f"source.{p.key}": p.value for p in dense.metadata_props}
    meta.update(metadata or {})
    meta.update({"sparsekit_format": "fast", "sparsekit_version": __version__, "exporter": "sparsekit.exporters.fast",
                 "fast_graph": "1", "sparsity_per_layer": json.dumps(
                     {n: round(1 - getattr(ly, "layer", ly).density, 6) for n, ly in packed.layers.items()}),
                 "dense_linear_layers": json.dumps(packed.kept_dense)})
    model = GraphModel(packed.proto, packed.layers, threads=threads, metadata=meta)
    if tune:
        tune_layers(model.layers, batches=sorted({*DEFAULT_BATCHES, batch_size}), threads=threads,
                    budget_s=tune_budget_s)
        model.plan_changed()
        source = "tuned"
    elif calibrate:
        for m in model.sparse_models:
            calibrate_model(m, batches=sorted({*CALIBRATION_BATCHES, batch_size}), threads=threads,
                            budget_s=0.4)
        source = "calibrated"
    else:
        source = "heuristic"
    model.metadata.update({"tuned": str(bool(tune)).lower(), "plan_source": source, "tune_threads": str(threads),
                           "tune_batch_size": str(batch_size), "tuned_isa": kernel_isa() if source != "heuristic"
                           else ""})
    if source != "heuristic":
        record(model)
    return model, source


# sparse convolutions are kept only where the whole artifact with them measured this much faster than without
# (at batch 1, on a shared machine whose timings vary by ~10%: wrn-22-2's convolutions chosen at 1.0x in export
# ran 0.92x of dense in the benchmark that followed)
SPARSE_CONVS_MARGIN = 1.05


def _fastest_variant(dense: onnx.ModelProto, metadata, plan: dict, inputs, measured: tuple) -> tuple:
    """(packed, model, speed, notes) of the fastest whole artifact among the convolutions measured one by one
    (``measured``), all of them sparse, and none sparse (unless no variant with sparse convolutions is
    ``SPARSE_CONVS_MARGIN`` faster); the same artifact when the graph has no convolution to choose."""
    convs = set(measured[0].sparse_convs)
    chosen = {ly.layer.name for ly in measured[1].convs}
    if not convs:
        return (*measured, [])
    tried = {f"{len(chosen)} of {len(convs)} sparse (each measured faster)": measured}
    for label, keep in ((f"all {len(convs)} sparse", None), ("none sparse", lambda *_: False)):
        if (keep is None and chosen == convs) or (keep is not None and not chosen):
            continue
        try:
            packed = pack_graph(dense, keep_conv=keep)
        except UnsupportedGraphError:  # nothing else sparse to pack
            continue
        model, _ = _planned(packed, dense, metadata, **plan)
        tried[label] = (packed, model, graph_speed(model, dense, inputs, plan["batch_size"]))
    speed = {k: worst_speedup(v[2]) for k, v in tried.items()}
    best = max(tried, key=speed.__getitem__)
    none = next((k for k in tried if k == "none sparse" or not tried[k][1].convs), None)
    if none is not None and speed[best] < SPARSE_CONVS_MARGIN * speed[none]:
        best = none  # within timing noise of no sparse convolution: the one that cannot be slower than dense
    batches = "/".join(str(r["batch_size"]) for r in tried[best][2])
    notes = [f"convolutions: {best}, the fastest whole artifact measured by {SPARSE_CONVS_MARGIN:.2f}x (its worst "
             f"speedup over batch {batches}: " + ", ".join(f"{k}: {v:.2f}x of dense" for k, v in speed.items()) + ")"]
    return (*tried[best], notes)


def _recurrent_variant(dense: onnx.ModelProto, metadata, plan: dict, inputs, measured: tuple,
                       notes: list[str]) -> tuple:
    """``measured`` (packed, model, speed) or, when it holds sparse GRU/LSTM layers and the same artifact with them
    left to ONNX Runtime measures faster, that one: a recurrent layer stays dense where sparse does not pay."""
    from sparsekit.runtime.rnn import SparseRnn

    if not any(isinstance(ly, SparseRnn) for ly in measured[0].layers.values()):
        return (*measured, notes)
    try:
        packed = pack_graph(dense, keep_rnn=False)
    except UnsupportedGraphError:  # nothing but the recurrent layers was sparse: the dense graph itself
        return (*measured, notes)
    model, _ = _planned(packed, dense, metadata, **plan)
    speed = graph_speed(model, dense, inputs, plan["batch_size"])
    sparse_x, dense_x = worst_speedup(measured[2]), worst_speedup(speed)
    keep = sparse_x >= dense_x
    note = (f"recurrent layers: {'sparse' if keep else 'dense (ONNX Runtime)'}, the faster whole artifact measured "
            f"(sparse: {sparse_x:.2f}x of dense, dense: {dense_x:.2f}x)")
    return (*(measured if keep else (packed, model, speed)), [*notes, note])


def write_graph_model(dense: onnx.ModelProto, out_path, *, tune: bool, batch_size: int, threads: int,
                      calibrate: bool, tune_budget_s: float, metadata: dict[str, str] | None,
                      inputs: np.ndarray | None, skip_slow: bool = False) -> dict:
    """``write_model`` for a whole graph: pack, plan (``_planned``), time the whole artifact against the dense
    graph, check it against the dense graph, write. Which convolutions are sparse is measured twice: each alone
    (``faster_than_dense``), then the whole artifact with those, with every one and with none of them, and the
    fastest is written (alone a small convolution can lose and still pay in the model, or win and the model
    lose: hand-offs and broken fusions add up, MobileNetV2). Plans are keyed by rows (batch x sequence)."""
    import json
    from pathlib import Path

    from sparsekit.exporters.speed import MIN_SPEEDUP, describe_slow, slower_than_dense

    from sparsekit.errors import ValidationError
    from sparsekit.runtime.artifact import save
    from sparsekit.runtime.layers import kernel_isa

    plan = {"tune": tune, "calibrate": calibrate, "threads": threads, "batch_size": batch_size,
            "tune_budget_s": tune_budget_s}
    packed = pack_graph(dense, keep_conv=faster_than_dense(dense, threads) if calibrate or tune else None)
    model, source = _planned(packed, dense, metadata, **plan)
    speed = (graph_speed(model, dense, inputs, batch_size) if source != "heuristic" and len(model.input_names) == 1
             else None)
    notes = []
    if speed:
        packed, model, speed, notes = _fastest_variant(dense, metadata, plan, inputs, (packed, model, speed))
        packed, model, speed, notes = _recurrent_variant(dense, metadata, plan, inputs, (packed, model, speed), notes)
    check = check_against_dense(model, dense, inputs)
    if not check["max_abs_diff"] <= check["bound"]:
        raise ValidationError(f"fast model differs from the dense model by {check['max_abs_diff']:.3g} "
                              f"(allowed {check['bound']:.3g})", where=str(out_path),
                              fix="please report this with the model attached")
    onnx.checker.check_model(model.to_onnx(), full_check=True)
    slow = slower_than_dense(speed or [])
    if slow and skip_slow:
        raise UnsupportedGraphError(f"slower than the dense model on this machine ({describe_slow(slow)}, below "
                                    f"{MIN_SPEEDUP}x: the graph's segments between sparse layers cost more than "
                                    "they save); nothing was written", where="fast",
                                    fix="--format fast writes it anyway (flagged); use a sparser or larger model")
    save(model, out_path)
    kernels = {str(b): model.kernels_for(b) for b in (1, 64, 256)}
    return {
        "format": "fast", "precision": "fp32", "path": str(out_path), "bytes": Path(out_path).stat().st_size,
        "dense_weight_bytes": sum(ly.n_in * ly.n_out * 4 for ly in [*model.layers, *(c.layer for c in model.convs)]),
        "layers": model.info()["layers"], "graph": True, "dense_linear_layers": packed.kept_dense,
        "tuned": bool(tune), "plan_source": source, "dense_check": check, "isa": kernel_isa(), "kernels": kernels,
        "speed_vs_dense": speed,
        "notes": [f"{len(model.layers)} sparse linear layers and {len(model.convs)} sparse convolutions on "
                  f"sparsekit's kernels ({len(packed.kept_dense)} layers left dense: denser than "
                  f"{MAX_DENSITY:.0%} or, convolutions, not faster sparse here), the rest of the graph in ONNX "
                  f"Runtime; linear kernels by rows (batch x sequence): {json.dumps(kernels)} ({source})", *notes],
    }
