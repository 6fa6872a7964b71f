"""Packing a whole graph for the ``fast`` format: every linear layer with a sparse constant weight becomes a
``com.sparsekit::SparseLinear`` node, wherever it is; the rest of the graph is kept as it is (ONNX Runtime
runs it, see ``sparsekit.runtime.graph_model``).

A layer is a ``MatMul(X, W)`` whose ``W`` is a 2-D initializer (``W`` is (in, out): torch exports
``nn.Linear`` on 3-D inputs this way), or a ``Gemm(X, B[, C])`` with a constant ``B`` (alpha = beta = 1,
no transposed ``X``). A following ``Add`` of a constant (out,) vector becomes the node's bias and a following
``Relu`` its activation, when nothing else reads the intermediate tensor. SparseLinear takes rows (2-D): an
input of another rank, e.g. (batch, sequence, features), is reshaped to rows and back by standard nodes
around it. The artifact carries the op's ONNX function (``sparsekit.runtime.portable``), so stock ONNX
Runtime runs it too, at dense speed. Layers denser than
``MAX_DENSITY`` stay ordinary nodes: the sparse kernels would not beat ONNX Runtime's GEMM on them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper
from sparsekit.exporters.graph import UnsupportedGraphError, _attr, initializer_arrays

from sparsekit.runtime import portable
from sparsekit.runtime.checks import CONV_OP, DOMAIN, OP, SLOPES
from sparsekit.runtime.conv import ConvGeometry, SparseConv
from sparsekit.runtime.layers import CsrLayer

MAX_DENSITY = 0.5


@dataclass
class Packed:
    proto: onnx.ModelProto           # the graph with SparseLinear nodes (their CSR initializers included)
    layers: dict[str, CsrLayer | SparseConv]  # by node name
    kept_dense: list[str]            # linear and conv layers left to ONNX Runtime (too dense, or slower sparse)


def _weight(node: onnx.NodeProto, inits: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray | None] | None:
    """(weight (out, in), bias or None) of a linear node with a constant weight, else None."""
    if node.op_type == "MatMul" and node.domain in ("", "ai.onnx") and len(node.input) == 2:
        x, w = node.input
        if x not in inits and w in inits and inits[w].ndim == 2 and inits[w].dtype == np.float32:
            return np.ascontiguousarray(inits[w].T), None
    if node.op_type == "Gemm" and node.domain in ("", "ai.onnx") and len(node.input) in (2, 3):
        x, b = node.input[:2]
        if x in inits or b not in inits or inits[b].ndim != 2 or inits[b].dtype != np.float32:
            return None
        if _attr(node, "alpha", 1.0) != 1.0 or _attr(node, "beta", 1.0) != 1.0 or _attr(node, "transA", 0):
            return None
        w = inits[b] if _attr(node, "transB", 0) else inits[b].T
        bias = None
        if len(node.input) == 3 and node.input[2]:
            c = inits.get(node.input[2])
            if c is None or c.size != w.shape[0] or c.dtype != np.float32:
                return None
            bias = c.reshape(-1)
        return np.ascontiguousarray(w), bias
    return None


def _conv(node: onnx.NodeProto, inits: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray | None,
                                                                         ConvGeometry] | None:
    """(weight (C_out, C_in, kh, kw), bias or None, geometry) of a dense 2-D convolution with a constant weight
    and one group (explicit pads; depthwise and grouped convolutions stay with ONNX Runtime), else None."""
    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
        return None
    x, w = node.input[:2]
    weight = inits.get(w)
    if x in inits or weight is None or weight.ndim != 4 or weight.dtype != np.float32:
        return None
    auto_pad = _attr(node, "auto_pad", b"NOTSET")
    if _attr(node, "group", 1) != 1 or (auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad) != "NOTSET":
        return None
    bias = None
    if len(node.input) > 2 and node.input[2]:
        bias = inits.get(node.input[2])
        if bias is None or bias.dtype != np.float32 or bias.size != weight.shape[0]:
            return None
        bias = bias.reshape(-1)
    geometry = ConvGeometry(tuple(int(k) for k in weight.shape[2:]), tuple(_attr(node, "strides", [1, 1])),
                            tuple(_attr(node, "pads", [0, 0, 0, 0])), tuple(_attr(node, "dilations", [1, 1])))
    if len(geometry.strides) != 2 or len(geometry.pads) != 4 or len(geometry.dilations) != 2:
        return None
    return weight, bias, geometry


def _follower(name: str, readers: dict[str, list[onnx.NodeProto]], outputs: set[str], op: str
              ) -> onnx.NodeProto | None:
    """The one node of type ``op`` that reads ``name``, when nothing else does (and it is no graph output)."""
    r = readers.get(name, [])
    if len(r) == 1 and r[0].op_type == op and r[0].domain in ("", "ai.onnx") and name not in outputs:
        return r[0]
    return None


def pack_graph(dense: onnx.ModelProto, *, max_density: float = MAX_DENSITY,
               keep_conv: Callable[[SparseConv, str], bool] | None = None) -> Packed:
    """``dense`` with its sparse linear layers as SparseLinear nodes and its sparse convolutions as SparseConv
    nodes (see the module docstring). ``keep_conv(conv, input_name)``: whether a sparse convolution is packed
    (the exporter measures it against ONNX Runtime's; default: every one)."""
    inits = initializer_arrays(dense)
    g = dense.graph
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in g.node:
        for i in node.input:
            readers.setdefault(i, []).append(node)
    outputs = {o.name for o in g.output}
    removed: set[int] = set()
    replaced: dict[int, list[onnx.NodeProto]] = {}
    ranks = _ranks(dense)
    layers: dict[str, CsrLayer | SparseConv] = {}
    new_inits: list[onnx.TensorProto] = []
    kept: list[str] = []
    for k, node in enumerate(g.node):
        linear, conv = _weight(node, inits), _conv(node, inits)
        if linear is None and conv is None:
            continue
        weight, bias = linear if linear is not None else (conv[0].reshape(conv[0].shape[0], -1), conv[1])
        name = node.name or f"{'linear' if linear is not None else 'conv'}{k}"
        if np.count_nonzero(weight) > max_density * weight.size:
            kept.append(name)
            continue
        out = node.output[0]
        add = _follower(out, readers, outputs, "Add") if bias is None and linear is not None else None
        if add is not None:
            other = add.input[1] if add.input[0] == out else add.input[0]
            b = inits.get(other)
            if b is not None and b.dtype == np.float32 and b.size == weight.shape[0] and b.ndim <= 2:
                bias, out = b.reshape(-1), add.output[0]
                removed.add(id(add))
        relu = _follower(out, readers, outputs, "Relu")
        layer = CsrLayer.from_dense(weight, bias, relu is not None, name=name)
        if conv is not None:
            sc = SparseConv(layer, conv[0].shape[1], conv[2], block=conv_block(layer))
            if keep_conv is not None and not keep_conv(sc, node.input[0]):
                kept.append(name)
                continue
            layers[name] = sc
        else:
            layers[name] = layer
        if relu is not None:
            out = relu.output[0]
            removed.add(id(relu))
        names, arrays = _csr_initializers(name, layer)
        new_inits += [onnx.numpy_helper.from_array(np.ascontiguousarray(a), n) for a, n in zip(arrays, names,
                                                                                                strict=True)]
        act = "relu" if layer.relu else "none"
        x = node.input[0]
        if conv is not None:
            geo = conv[2]
            replaced[id(node)] = [helper.make_node(
                CONV_OP, [x, *names], [out], domain=DOMAIN, name=name, in_features=layer.n_in,
                out_features=layer.n_out, in_channels=int(conv[0].shape[1]), kernel_shape=list(geo.kernel),
                strides=list(geo.strides), pads=list(geo.pads), dilations=list(geo.dilations), activation=act,
                negative_slope=SLOPES[act], block=int(layers[name].block))]
            continue
        two_d = ranks.get(x) == 2
        sparse = helper.make_node(OP, [x if two_d else f"{name}.x2d", *names], [out if two_d else f"{name}.y2d"],
                                  domain=DOMAIN, name=name, in_features=layer.n_in, out_features=layer.n_out,
                                  activation=act, negative_slope=SLOPES[act], plan="{}")
        if two_d:
            replaced[id(node)] = [sparse]
        else:
            wrapped, consts = _rows_wrapper(sparse, x, out, layer.n_in, layer.n_out)
            replaced[id(node)] = wrapped
            new_inits += consts
    if not layers:
        raise UnsupportedGraphError("no linear layer or convolution of this graph has a sparse constant weight",
                                    where="model", fix="the fast format packs sparse Linear/Gemm/MatMul and Conv "
                                    "layers; use --format onnx")
    nodes = [m for n in g.node if id(n) not in removed for m in replaced.get(id(n), [n])]
    used = {i for n in nodes for i in n.input}
    kept_inits = [t for t in g.initializer if t.name in used]
    all_inits = {t.name for t in g.initializer}
    inputs = [i for i in g.input if i.name not in all_inits or i.name in used]
    graph = helper.make_graph(nodes, g.name or "sparsekit_fast", inputs, list(g.output),
                              initializer=kept_inits + new_inits, value_info=list(g.value_info))
    opsets = [o for o in dense.opset_import if o.domain != DOMAIN] + [helper.make_opsetid(DOMAIN, 1)]
    proto = helper.make_model(graph, opset_imports=opsets, producer_name="sparsekit")
    proto.ir_version = dense.ir_version
    proto.functions.extend(dense.functions)
    opset = next((int(o.version) for o in dense.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset >= portable.MIN_OPSET:  # stock ONNX Runtime runs the artifact too (its body needs opset 16)
        kinds = {n.op_type for n in nodes if n.domain == DOMAIN}
        proto.functions.extend(portable.BODIES[op](opset) for op in (OP, CONV_OP) if op in kinds)
    return Packed(proto, layers, kept)


def conv_block(layer: CsrLayer) -> int:
    """The panel kernel's column block width for a convolution's (C_out, K) weight: the heuristic's for its
    64-pixel panels (blocks of 128/256 columns keep a wide K's panel rows in cache)."""
    from sparsekit.runtime.layers import parse_kernel
    from sparsekit.runtime.model import default_kernel

    name, block, _ = parse_kernel(default_kernel(layer, 64))
    return block if name == "panel" else 0


def _csr_initializers(name: str, layer: CsrLayer) -> tuple[list[str], list[np.ndarray]]:
    v, i, rp = layer.csr()
    names = [f"{name}.values", f"{name}.indices", f"{name}.rowptr"]
    arrays = [v, i, rp]
    if layer.bias is not None:
        names.append(f"{name}.bias")
        arrays.append(layer.bias)
    return names, arrays


def faster_than_dense(dense: onnx.ModelProto, threads: int, *, margin: float = 1.05, reps: int = 5):
    """``keep_conv`` for ``pack_graph``: times each sparse convolution against ONNX Runtime's Conv on its dense
    weight, at batch 1 on the input shape shape inference gives (one call each in turn, ``reps`` rounds,
    medians of thread CPU time), plus two hand-offs between ONNX Runtime and sparsekit, and keeps it sparse
    where it is faster by ``margin``: a small convolution (MobileNetV2's 1x1 layers: 0.78x of dense with all
    of them sparse) stays in ONNX Runtime. A convolution whose input shape is unknown stays dense."""
    import time

    from sparsekit.exporters.fast import _dense_reference

    shapes = _shapes(dense)
    boundary: dict[tuple[int, ...], float] = {}

    def handoff_s(shape: tuple[int, ...]) -> float:
        """What taking a layer out of ONNX Runtime's graph costs per call: the sparse node splits a segment in
        two, and the tensors cross between ONNX Runtime and sparsekit (timed: an Identity session on it)."""
        if shape not in boundary:
            node = helper.make_node("Identity", ["x"], ["y"])
            graph = helper.make_graph([node], "hop", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                                                    list(shape))],
                                      [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)])
            m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
            m.ir_version = 9
            sess = _dense_reference(m, threads)
            z = np.zeros(shape, np.float32)
            sess.run(None, {"x": z})
            t0 = time.perf_counter()
            for _ in range(20):
                sess.run(None, {"x": z})
            boundary[shape] = (time.perf_counter() - t0) / 20
        return boundary[shape]

    def keep(conv: SparseConv, x_name: str) -> bool:
        dims = shapes.get(x_name)
        if not dims or len(dims) != 4 or any(not d for d in dims[1:]):
            return False
        x = np.random.default_rng(0).standard_normal((1, *dims[1:])).astype(np.float32)
        g, layer = conv.geometry, conv.layer
        w = layer.dense_weight().reshape(conv.out_channels, conv.in_channels, *g.kernel)
        nodes = [helper.make_node("Conv", ["x", "w", "b"] if layer.bias is not None else ["x", "w"], ["c"],
                                  strides=list(g.strides), pads=list(g.pads), dilations=list(g.dilations))]
        nodes.append(helper.make_node("Relu" if layer.relu else "Identity", ["c"], ["y"]))
        inits = [onnx.numpy_helper.from_array(w, "w")] + (
            [onnx.numpy_helper.from_array(layer.bias, "b")] if layer.bias is not None else [])
        graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                                                list(x.shape))],
                                  [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 9
        sess = _dense_reference(model, threads)
        runs = {"dense": lambda: sess.run(None, {"x": x}), "sparse": lambda: conv.run(x, threads=threads)}
        times: dict[str, list[float]] = {k: [] for k in runs}
        for fn in runs.values():
            fn()
        for _ in range(reps):
            for k, fn in runs.items():
                t0 = time.thread_time() if threads == 1 else time.perf_counter()
                fn()
                times[k].append((time.thread_time() if threads == 1 else time.perf_counter()) - t0)
        sparse_s = float(np.median(times["sparse"])) + 2 * handoff_s(x.shape)
        return sparse_s * margin < float(np.median(times["dense"]))

    return keep


def _shapes(dense: onnx.ModelProto) -> dict[str, list[int]]:
    """Each tensor's dims where shape inference knows them (0 for a symbolic dim)."""
    try:
        g = onnx.shape_inference.infer_shapes(dense, strict_mode=False).graph
    except Exception:
        return {}
    return {v.name: [d.dim_value if d.HasField("dim_value") else 0 for d in v.type.tensor_type.shape.dim]
            for v in [*g.input, *g.value_info, *g.output]
            if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape")}


def _ranks(dense: onnx.ModelProto) -> dict[str, int]:
    """Each tensor's rank where ONNX shape inference knows it."""
    try:
        g = onnx.shape_inference.infer_shapes(dense, strict_mode=False).graph
    except Exception:  # unknown ranks only mean wrappers everywhere
        return {}
    return {v.name: len(v.type.tensor_type.shape.dim) for v in [*g.input, *g.value_info, *g.output]
            if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape")}


def _rows_wrapper(sparse: onnx.NodeProto, x: str, y: str, n_in: int, n_out: int
                  ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """SparseLinear takes rows (2-D, as Gemm in its function body does): ``x`` (..., in) is viewed as (rows, in)
    and the result (rows, out) as (..., out), with standard Shape/Slice/Reshape/Concat nodes around it."""
    p = sparse.name
    mk = helper.make_node
    consts = [onnx.numpy_helper.from_array(np.asarray(a, np.int64), n) for a, n in (
        ([-1, n_in], f"{p}.rows_shape"), ([0], f"{p}.zero"), ([-1], f"{p}.minus_one"), ([n_out], f"{p}.out_dim"))]
    nodes = [mk("Shape", [x], [f"{p}.x_shape"]),
             mk("Slice", [f"{p}.x_shape", f"{p}.zero", f"{p}.minus_one"], [f"{p}.lead"]),
             mk("Reshape", [x, f"{p}.rows_shape"], [f"{p}.x2d"]),
             sparse,
             mk("Concat", [f"{p}.lead", f"{p}.out_dim"], [f"{p}.y_shape"], axis=0),
             mk("Reshape", [f"{p}.y2d", f"{p}.y_shape"], [y])]
    return nodes, consts


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


def graph_speed(model, dense: onnx.ModelProto, inputs: np.ndarray | None) -> list[dict]:
    """The whole artifact against the dense graph in ONNX Runtime, one thread, at batch 1 (a real sample when
    given): the segments between sparse nodes cost a little per call, which a small model may not win back."""
    from sparsekit.exporters.fast import _dense_reference
    from sparsekit.exporters.speed import speedups_vs_dense

    sess = _dense_reference(dense, 1)
    name = sess.get_inputs()[0].name
    x = inputs[:1] if inputs is not None else _random_inputs(dense, 1, 0)[name]
    return speedups_vs_dense(lambda a: sess.run(None, {name: a}), {"fast": lambda a: model.run(a, threads=1)},
                             {1: x})["fast"]


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


def write_graph_model(dense: onnx.ModelProto, out_path, *, tune: bool, batch_size: int, threads: int,
                      calibrate: bool, tune_budget_s: float, metadata: dict[str, str] | None,
                      inputs: np.ndarray | None, skip_slow: bool = False) -> dict:
    """``write_model`` for a whole graph: pack, plan (``_planned``), time the whole artifact against the dense
    graph, check it against the dense graph, write. Sparse convolutions are each kept only where measured faster;
    when the artifact with them still loses to the dense graph (hand-offs and broken fusions add up: MobileNetV2)
    and the one without them does better, that one is written. Plans are keyed by rows (batch x sequence)."""
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
    timed = source != "heuristic" and len(model.input_names) == 1
    speed = graph_speed(model, dense, inputs) if timed else None
    notes = []
    if speed and model.convs and speed[0]["speedup"] < 1.0:
        try:
            alt = pack_graph(dense, keep_conv=lambda *_: False)
        except UnsupportedGraphError:
            alt = None
        if alt is not None:
            alt_model, _ = _planned(alt, dense, metadata, **plan)
            alt_speed = graph_speed(alt_model, dense, inputs)
            if alt_speed[0]["speedup"] > speed[0]["speedup"]:
                notes.append(f"convolutions left to ONNX Runtime: with {len(model.convs)} sparse ones the artifact "
                             f"measured {speed[0]['speedup']:.2f}x of dense, without {alt_speed[0]['speedup']:.2f}x")
                packed, model, speed = alt, alt_model, alt_speed
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
