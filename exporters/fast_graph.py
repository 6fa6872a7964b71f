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

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper
from sparsekit.exporters.graph import UnsupportedGraphError, _attr, initializer_arrays

from sparsekit.runtime import portable
from sparsekit.runtime.checks import DOMAIN, OP, SLOPES
from sparsekit.runtime.layers import CsrLayer

MAX_DENSITY = 0.5


@dataclass
class Packed:
    proto: onnx.ModelProto           # the graph with SparseLinear nodes (their CSR initializers included)
    layers: dict[str, CsrLayer]      # by node name
    kept_dense: list[str]            # linear layers left to ONNX Runtime (too dense)


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


def _follower(name: str, readers: dict[str, list[onnx.NodeProto]], outputs: set[str], op: str
              ) -> onnx.NodeProto | None:
    """The one node of type ``op`` that reads ``name``, when nothing else does (and it is no graph output)."""
    r = readers.get(name, [])
    if len(r) == 1 and r[0].op_type == op and r[0].domain in ("", "ai.onnx") and name not in outputs:
        return r[0]
    return None


def pack_graph(dense: onnx.ModelProto, *, max_density: float = MAX_DENSITY) -> Packed:
    """``dense`` with its sparse linear layers as SparseLinear nodes (see the module docstring)."""
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
    layers: dict[str, CsrLayer] = {}
    new_inits: list[onnx.TensorProto] = []
    kept: list[str] = []
    for k, node in enumerate(g.node):
        found = _weight(node, inits)
        if found is None:
            continue
        weight, bias = found
        name = node.name or f"linear{k}"
        if np.count_nonzero(weight) > max_density * weight.size:
            kept.append(name)
            continue
        out = node.output[0]
        add = _follower(out, readers, outputs, "Add") if bias is None else None
        if add is not None:
            other = add.input[1] if add.input[0] == out else add.input[0]
            b = inits.get(other)
            if b is not None and b.dtype == np.float32 and b.size == weight.shape[0] and b.ndim <= 2:
                bias, out = b.reshape(-1), add.output[0]
                removed.add(id(add))
        relu = _follower(out, readers, outputs, "Relu")
        if relu is not None:
            out = relu.output[0]
            removed.add(id(relu))
        layer = CsrLayer.from_dense(weight, bias, relu is not None, name=name)
        layers[name] = layer
        v, i, rp = layer.csr()
        names = [f"{name}.values", f"{name}.indices", f"{name}.rowptr"] + ([f"{name}.bias"] if bias is not None
                                                                          else [])
        arrays = [v, i, rp] + ([layer.bias] if bias is not None else [])
        new_inits += [onnx.numpy_helper.from_array(np.ascontiguousarray(a), n) for a, n in zip(arrays, names,
                                                                                                strict=True)]
        act = "relu" if layer.relu else "none"
        x = node.input[0]
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
        raise UnsupportedGraphError("no linear layer of this graph has a sparse constant weight", where="model",
                                    fix="the fast format packs sparse Linear/Gemm/MatMul layers; export --format onnx")
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
        proto.functions.append(portable.function(opset))
    return Packed(proto, layers, kept)


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


def write_graph_model(dense: onnx.ModelProto, out_path, *, tune: bool, batch_size: int, threads: int,
                      calibrate: bool, tune_budget_s: float, metadata: dict[str, str] | None,
                      inputs: np.ndarray | None) -> dict:
    """``write_model`` for a whole graph: pack, plan each sparse layer (calibrated against ONNX Runtime's GEMM
    on its own, or ``--tune``), check against the dense graph, write. Plans are keyed by rows (batch x
    sequence for a Transformer)."""
    import json
    from pathlib import Path

    from sparsekit import __version__
    from sparsekit.errors import ValidationError
    from sparsekit.runtime.artifact import save
    from sparsekit.runtime.graph_model import GraphModel
    from sparsekit.runtime.layers import kernel_isa
    from sparsekit.runtime.replan import record
    from sparsekit.runtime.tune import CALIBRATION_BATCHES, DEFAULT_BATCHES, tune_layers
    from sparsekit.runtime.tune import calibrate as calibrate_model

    packed = pack_graph(dense)
    meta = {f"source.{p.key}": p.value for p in dense.metadata_props}
    meta.update(metadata or {})
    meta.update({"sparsekit_format": "fast", "sparsekit_version": __version__, "exporter": "sparsekit.exporters.fast",
                 "fast_graph": "1", "sparsity_per_layer": json.dumps(
                     {n: round(1 - ly.density, 6) for n, ly in packed.layers.items()}),
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
    check = check_against_dense(model, dense, inputs)
    if not check["max_abs_diff"] <= check["bound"]:
        raise ValidationError(f"fast model differs from the dense model by {check['max_abs_diff']:.3g} "
                              f"(allowed {check['bound']:.3g})", where=str(out_path),
                              fix="please report this with the model attached")
    onnx.checker.check_model(model.to_onnx(), full_check=True)
    save(model, out_path)
    kernels = {str(b): model.kernels_for(b) for b in (1, 64, 256)}
    return {
        "format": "fast", "precision": "fp32", "path": str(out_path), "bytes": Path(out_path).stat().st_size,
        "dense_weight_bytes": sum(ly.n_in * ly.n_out * 4 for ly in model.layers),
        "layers": model.info()["layers"], "graph": True, "dense_linear_layers": packed.kept_dense,
        "tuned": bool(tune), "plan_source": source, "dense_check": check, "isa": kernel_isa(), "kernels": kernels,
        "notes": [f"{len(model.layers)} sparse linear layers on sparsekit's kernels, the rest of the graph in ONNX "
                  f"Runtime; kernels per layer by rows (batch x sequence): {json.dumps(kernels)} ({source})"],
    }
