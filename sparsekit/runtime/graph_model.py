"""Fast artifacts of whole graphs: sparse linear layers anywhere (attention and FFN projections, classifier
heads), sparse convolutions, the rest of the graph in ONNX Runtime.

A ``GraphModel`` runs a graph whose ``com.sparsekit::SparseLinear`` nodes sit between ordinary ONNX nodes.
The ordinary nodes are cut, in the graph's (topological) order, into segments of consecutive nodes; each
segment is one ONNX Runtime session (a sub-model holding only its nodes and the initializers they read).
Each sparse node is a one-layer ``FastModel``: its input ``(..., in_features)`` is viewed as rows
``(rows, in_features)`` (batch x sequence for a Transformer), run by sparsekit's kernels with the node's
plan for that many rows, and viewed back. sparsekit does not interpret ONNX operators: ONNX Runtime runs
every ordinary node, but for a few it fuses into the sparse steps beside them, so that no segment sits between
two sparse steps for their sake: a residual ``Add`` and ``Relu`` after a SparseConv (``_residual_adds``), a ReLU6
``Clip`` after one, depthwise ``Conv`` layers with their activation (``_clamps``, ``depthwise.py``), and the
Shape/Reshape nodes export writes around a SparseLinear to view its input as rows (``_rows_wrappers``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper

from sparsekit.errors import InputError
from sparsekit.runtime import checks, depthwise, forksafe, rnn_onnx
from sparsekit.runtime.conv import SparseConv
from sparsekit.runtime.depthwise import Depthwise
from sparsekit.runtime.layers import CsrLayer, kernel_isa
from sparsekit.runtime.memory import kernel_bytes
from sparsekit.runtime.model import FastModel, layer_info
from sparsekit.runtime.rnn import RnnStep, SparseRnn

# ONNX Runtime graph rewrites left out of segments: its fused SkipLayerNormalization ran a Transformer layer's
# Add + LayerNorm + Transpose segment in 290 us, unfused 47 us (Zen 5, ORT 1.31; the whole dense model ran 10%
# faster without it too: bench/RESULTS.md)
SEGMENT_DISABLED_OPTIMIZERS = ["SkipLayerNormFusion"]

_NP_TYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.INT64: np.int64,
             onnx.TensorProto.INT32: np.int32, onnx.TensorProto.BOOL: np.bool_,
             onnx.TensorProto.DOUBLE: np.float64}


@dataclass
class SparseStep:
    """One SparseLinear node, or a chain of them each read only by the next (``GraphModel._chains``): the input
    and output tensor names and the model that runs its layers."""

    x: str
    y: str
    model: FastModel
    last_rows: int = 0  # rows of the last call (batch x sequence), for kernels_used


@dataclass
class ConvStep:
    """One SparseConv node: input and output tensor names and the convolution; ``residual``: the other input of
    an Add that alone reads the convolution's output, fused into the step (``y`` is then the Add's output, or
    that of the Relu that alone reads it: ``residual_relu``)."""

    x: str
    y: str
    conv: SparseConv
    residual: str | None = None
    residual_relu: bool = False
    clamp: tuple[float, float] | None = None  # (0, hi): a ReLU6's Clip fused (``_clamps``)

    @property
    def inputs(self) -> list[str]:
        return [self.x] if self.residual is None else [self.x, self.residual]

    def run(self, env: dict[str, np.ndarray], threads: int) -> None:
        a = env[self.x]
        if a.ndim != 4 or a.shape[1] != self.conv.in_channels:
            raise InputError(f"tensor {self.x!r} has shape {list(a.shape)}, its sparse convolution takes "
                             f"(batch, {self.conv.in_channels}, h, w)", where="input", fix="check the input's shape")
        if self.residual is None:
            env[self.y] = self.conv.run(a, threads=threads, clamp=self.clamp)
            return
        r = env[self.residual]
        if r.shape == (a.shape[0], self.conv.out_channels, *self.conv.geometry.output(*a.shape[2:])):
            env[self.y] = self.conv.run(a, threads=threads, residual=r, residual_relu=self.residual_relu)
            return
        y = self.conv.run(a, threads=threads)
        try:
            y = y + r  # a broadcasting Add: as the graph says, not fused
        except ValueError as exc:  # shapes ONNX's broadcasting rejects too
            raise InputError(f"tensor {self.residual!r} of shape {list(r.shape)} cannot be added to the convolution's "
                             f"output of shape {list(y.shape)}", where="input", fix="check the input's shape") from exc
        env[self.y] = np.maximum(y, 0, out=y) if self.residual_relu else y


@dataclass
class DepthwiseStep:
    """A depthwise ``Conv`` node (and the Relu or Clip that alone reads it: ``y`` is then its output), run by
    sparsekit's dense depthwise kernel instead of an ONNX Runtime segment between two sparse steps."""

    x: str
    y: str
    conv: Depthwise

    @property
    def inputs(self) -> list[str]:
        return [self.x]

    def run(self, env: dict[str, np.ndarray], threads: int) -> None:
        env[self.y] = self.conv.run(env[self.x], threads=threads)


@dataclass
class DenseStep:
    """Consecutive ordinary nodes, run as one ONNX Runtime sub-model."""

    proto: onnx.ModelProto
    inputs: list[str]
    outputs: list[str]
    sessions: dict[int, Any] = field(default_factory=dict)


def _graph_attrs(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def _segment(model: onnx.ModelProto, nodes: list[onnx.NodeProto], needed_later: set[str],
             types: dict[str, onnx.TypeProto], inits: dict[str, onnx.TensorProto], index: int) -> DenseStep:
    """A sub-model of ``nodes``: inputs are what they read and do not produce, outputs what they produce and
    something later reads."""
    produced = {o for n in nodes for o in n.output if o}
    reads = [i for n in nodes for i in n.input if i]
    inputs = list(dict.fromkeys(i for i in reads if i not in produced and i not in inits))
    outputs = [o for n in nodes for o in n.output if o and o in needed_later]
    if not outputs:
        raise InputError(f"graph segment {index} computes nothing that is used", where="artifact",
                         fix="export the artifact with 'sparsekit export --format fast'")

    def info(name: str) -> onnx.ValueInfoProto:
        if name not in types:
            raise InputError(f"the type of tensor {name!r} cannot be inferred", where="artifact",
                             fix="export the artifact with 'sparsekit export --format fast'")
        return helper.make_value_info(name, types[name])

    used = [inits[i] for i in dict.fromkeys(reads) if i in inits]
    graph = helper.make_graph(nodes, f"segment{index}", [info(i) for i in inputs], [info(o) for o in outputs],
                              initializer=used)
    opsets = [o for o in model.opset_import if o.domain != checks.DOMAIN]
    sub = helper.make_model(graph, opset_imports=opsets, producer_name="sparsekit")
    sub.ir_version = model.ir_version
    sub.functions.extend(f for f in model.functions if f.domain != checks.DOMAIN)
    return DenseStep(sub, inputs, outputs)


Fused = dict[int, tuple[onnx.NodeProto, onnx.NodeProto, onnx.NodeProto | None, str]]
# per node id (the node itself kept, so that the id stays its own): the node, the Relu or Clip fused into its step
# (or None) and its bounds, and the depthwise convolution the node is (None: a SparseConv node)
Clamped = dict[int, tuple[onnx.NodeProto, onnx.NodeProto | None, tuple[float, float] | None, Depthwise | None]]


def _readers(g: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Per tensor name, the nodes that read it (once per input slot)."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in g.node:
        for i in node.input:
            readers.setdefault(i, []).append(node)
    return readers


def _only_reader(g: onnx.GraphProto, fixed: set[str]) -> Callable[[str, tuple[str, ...]], onnx.NodeProto | None]:
    """only(name, ops): the node that alone reads tensor ``name``, if its op is one of ``ops`` (standard domain)
    and ``name`` is not in ``fixed`` (graph outputs, initializers)."""
    readers = _readers(g)

    def only(name: str, ops: tuple[str, ...]) -> onnx.NodeProto | None:
        r = readers.get(name, [])
        ok = len(r) == 1 and r[0].op_type in ops and r[0].domain in ("", "ai.onnx") and name not in fixed
        return r[0] if ok else None

    return only


def _residual_adds(g: onnx.GraphProto, layers: dict[str, Any], fixed: set[str]) -> Fused:
    """SparseConv nodes without their own activation whose output only an ``Add`` reads (a ResNet block's second
    convolution and its shortcut), with the ``Relu`` that alone reads the Add's output, if one does: run as one
    step that adds the Add's other input (a tensor computed in the graph; ``fixed``: graph outputs and
    initializers, never fused) as the output is written, so that no ONNX Runtime segment runs between them.
    Keyed by the convolution node's id: (the convolution, the Add, the Relu or None, the residual's name)."""
    only = _only_reader(g, fixed)

    fused, claimed = {}, set()
    for node in g.node:
        conv = layers.get(node.name) if node.domain == checks.DOMAIN and node.op_type == checks.CONV_OP else None
        if not isinstance(conv, SparseConv) or conv.layer.relu:
            continue
        add = only(node.output[0], ("Add",))
        if add is None or len(add.input) != 2 or add.input[0] == add.input[1] or not all(add.input) or \
                id(add) in claimed:  # both of an Add's inputs may be convolutions: the first one takes it
            continue
        other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
        if other not in fixed:
            fused[id(node)] = (node, add, only(add.output[0], ("Relu",)), other)
            claimed.add(id(add))
    return fused


# per SparseLinear node id: the node, the tensor its rows wrapper views as rows, the one it writes, the wrapper's nodes
Wrapped = dict[int, tuple[onnx.NodeProto, str, str, list[onnx.NodeProto]]]


def _rows_wrappers(g: onnx.GraphProto, fixed: set[str], inits: dict[str, onnx.TensorProto],
                   layers: dict[str, Any]) -> Wrapped:
    """SparseLinear nodes inside the rows wrapper export writes around them (``exporters/fast_graph.py``:
    Shape/Slice of X, Reshape to (rows, in), the node, Concat of the leading dims and [out], Reshape back), its
    intermediate tensors read by nothing else: the step reads X (..., in) and writes (..., out) itself, as it
    does for any leading dims, and the wrapper's five nodes are not run (in a Transformer they made an ONNX
    Runtime segment of their own between consecutive projections)."""
    made = {o: n for n in g.node for o in n.output}
    readers = _readers(g)

    def node_of(name: str, op: str, inputs: list[str]) -> onnx.NodeProto | None:
        n = made.get(name)
        ok = n is not None and n.op_type == op and n.domain in ("", "ai.onnx") and list(n.input) == inputs
        return n if ok and len(readers.get(name, [])) == 1 and name not in fixed else None

    def consts_ok(p: str, layer: CsrLayer) -> bool:  # the wrapper's shapes are the ones export writes
        want = {"rows_shape": [-1, layer.n_in], "zero": [0], "minus_one": [-1], "out_dim": [layer.n_out]}
        return all(f"{p}.{k}" in inits and onnx.numpy_helper.to_array(inits[f"{p}.{k}"]).tolist() == v
                   for k, v in want.items())

    out: Wrapped = {}
    for node in g.node:
        p = node.name
        if node.domain != checks.DOMAIN or node.op_type != checks.OP or not p or \
                list(node.input[:1]) != [f"{p}.x2d"] or list(node.output) != [f"{p}.y2d"] or \
                not isinstance(layers.get(p), CsrLayer) or not consts_ok(p, layers[p]):
            continue
        into = made.get(f"{p}.x2d")
        x = into.input[0] if into is not None and len(into.input) == 2 else ""
        shape = node_of(f"{p}.x_shape", "Shape", [x])
        parts = [node_of(f"{p}.x2d", "Reshape", [x, f"{p}.rows_shape"]), shape,
                 node_of(f"{p}.lead", "Slice", [f"{p}.x_shape", f"{p}.zero", f"{p}.minus_one"]),
                 node_of(f"{p}.y_shape", "Concat", [f"{p}.lead", f"{p}.out_dim"])]
        back = readers.get(f"{p}.y2d", [])  # the Reshape back, alone reading the rows and the shape
        if x and shape is not None and all(parts) and len(back) == 1 and back[0].op_type == "Reshape" and \
                list(back[0].input) == [f"{p}.y2d", f"{p}.y_shape"] and len(readers[f"{p}.y_shape"]) == 1 and \
                not {f"{p}.y2d", f"{p}.y_shape"} & fixed and not shape.attribute and \
                [a.i for a in parts[3].attribute if a.name == "axis"] == [0]:
            out[id(node)] = (node, x, back[0].output[0], [*parts, back[0]])
    return out


def _clamps(g: onnx.GraphProto, layers: dict[str, Any], inits: dict[str, onnx.TensorProto], fixed: set[str],
            fused: Fused) -> Clamped:
    """Depthwise ``Conv`` nodes sparsekit runs itself (``depthwise.from_node``), each with the ``Relu`` or
    constant ``Clip`` that alone reads it; and SparseConv nodes without an activation or a fused residual whose
    output only a ``Clip`` to [0, hi] reads (a ReLU6), fused as the output is written.

    A depthwise node is taken only next to a sparse step (its input made by one, or its output read by one):
    between two ordinary nodes it would add two hand-offs to ONNX Runtime rather than remove them. And only on
    the AVX-512 path: the AVX2 and generic kernels run 2-4x slower than ONNX Runtime's."""
    only = _only_reader(g, fixed)
    out: Clamped = {}
    # tensors sparse steps make and read: fused Adds' and Relus' outputs and residuals count
    sparse_made = {o for n in g.node if n.domain == checks.DOMAIN for o in n.output}
    sparse_made |= {(relu or add).output[0] for _, add, relu, _ in fused.values()}
    sparse_reads = {i for n in g.node if n.domain == checks.DOMAIN for i in n.input}
    sparse_reads |= {residual for _, _, _, residual in fused.values()}
    native = kernel_isa() == "avx512"
    for node in g.node:
        dw = depthwise.from_node(node, inits) if native else None
        layer = layers.get(node.name) if node.domain == checks.DOMAIN and node.op_type == checks.CONV_OP else None
        if dw is None and (not isinstance(layer, SparseConv) or layer.layer.relu or id(node) in fused):
            continue
        act = only(node.output[0], ("Relu", "Clip"))
        bounds = depthwise.clamp_of(act, inits) if act is not None else None
        if dw is not None:
            y = (act if bounds is not None else node).output[0]
            if node.input[0] not in sparse_made and y not in sparse_reads:
                continue
            if bounds is not None:
                dw.lo, dw.hi = bounds
            out[id(node)] = (node, act if bounds is not None else None, None, dw)
            sparse_made.add(y)  # a depthwise layer after this one is next to a sparse step too
        elif bounds is not None and bounds[0] == 0.0 and bounds[1] > 0.0:
            out[id(node)] = (node, act, bounds, None)
            sparse_made.add(act.output[0])
    return out


def _run_order(g: onnx.GraphProto, fused: Fused, clamped: Clamped, wrapped: Wrapped
               ) -> tuple[list[onnx.NodeProto], Callable[[onnx.NodeProto], set[str]]]:
    """The nodes in the order they run: file order, but a fused convolution (``_residual_adds``) where its Add
    was (both of the Add's inputs exist there: torch writes a downsampling block's shortcut convolution after
    the second convolution), and its Add and Relu gone, as are the activations ``_clamps`` fused; and what each
    reads (a fused convolution: the residual too), from which the tensors each ONNX Runtime segment must hand on
    are found."""
    at_add = {id(add): conv for conv, add, _, _ in fused.values()}
    gone = {id(n) for conv, _, relu, _ in fused.values() for n in (conv, relu) if n is not None}
    gone |= {id(act) for _, act, _, _ in clamped.values() if act is not None}
    gone |= {id(n) for _, _, _, nodes in wrapped.values() for n in nodes}
    order = [at_add.get(id(n), n) for n in g.node if id(n) not in gone]

    def reads(node: onnx.NodeProto) -> set[str]:
        names = {i for i in node.input if i}
        if id(node) in wrapped:
            names = (names - {node.input[0]}) | {wrapped[id(node)][1]}
        return names | {fused[id(node)][3]} if id(node) in fused else names

    return order, reads


def _stand_ins(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with each SparseLinear node replaced, for shape inference only, by a MatMul with a weight
    that is a graph input of shape (in, out) (no data), each SparseConv by a Conv likewise: the same output
    type and shape, inferred by ONNX."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    for k, node in enumerate(g.node):
        if node.domain != checks.DOMAIN:
            continue
        attrs = {a.name: a.i for a in node.attribute if a.type == onnx.AttributeProto.INT}
        w = f"__sparsekit_weight_{k}"
        if node.op_type in rnn_onnx.OPS:
            stand_in, infos = rnn_onnx.stand_in(node, k)
            g.input.extend(infos)
            g.node[k].CopyFrom(stand_in)
            continue
        if node.op_type == checks.CONV_OP:
            ints = {a.name: list(a.ints) for a in node.attribute if a.type == onnx.AttributeProto.INTS}
            g.input.append(helper.make_tensor_value_info(
                w, onnx.TensorProto.FLOAT, [attrs.get("out_features", 0), attrs.get("in_channels", 0),
                                            *ints.get("kernel_shape", [1, 1])]))
            g.node[k].CopyFrom(helper.make_node("Conv", [node.input[0], w], list(node.output),
                                                **{n: ints[n] for n in ("strides", "pads", "dilations") if n in ints}))
            continue
        g.input.append(helper.make_tensor_value_info(
            w, onnx.TensorProto.FLOAT, [attrs.get("in_features", 0), attrs.get("out_features", 0)]))
        g.node[k].CopyFrom(helper.make_node("MatMul", [node.input[0], w], list(node.output)))
    return out


def _types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """Every tensor's type as ONNX shape inference sees it (element type; shapes may stay symbolic)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(_stand_ins(model), strict_mode=False)
    except Exception as exc:  # a malformed graph: say so in one line
        raise InputError(f"shape inference failed: {type(exc).__name__}", where="artifact",
                         fix="export the artifact with 'sparsekit export --format fast'") from exc
    g = inferred.graph
    return {v.name: v.type for v in [*g.input, *g.value_info, *g.output] if v.type.HasField("tensor_type")}


class GraphModel:
    """A fast artifact of a whole graph (see the module docstring). ``run(x)`` takes the graph's one input (or
    a dict of inputs by name) and returns its one output (or a list, in the graph's order)."""

    def __init__(self, proto: onnx.ModelProto, layers: dict[str, CsrLayer | SparseConv | SparseRnn], *,
                 threads: int = 1, metadata: dict[str, str] | None = None, memory_limit: int | None = None) -> None:
        self.threads = FastModel._check_threads(threads)
        self.proto = proto
        self.metadata = dict(metadata or {})
        self.notes: dict[str, None] = {}
        self.replanned: dict[str, Any] | None = None
        g = proto.graph
        inits = {t.name: t for t in g.initializer}
        self.input_names = [i.name for i in g.input if i.name not in inits]
        self.output_names = [o.name for o in g.output]
        self.input_types = {i.name: i.type for i in g.input if i.name not in inits}
        self._steps = self._cut(proto, layers, memory_limit)
        self._drops = self._drop_lists()

    def _cut(self, proto: onnx.ModelProto, layers: dict[str, CsrLayer | SparseConv | SparseRnn],
             memory_limit: int | None) -> list[SparseStep | ConvStep | RnnStep | DepthwiseStep | DenseStep]:
        """The graph's nodes in file order as steps: each sparse node one step, the ordinary nodes between them
        one ONNX Runtime segment each (its outputs: what later steps or the graph's outputs read)."""
        g = proto.graph
        inits = {t.name: t for t in g.initializer}
        types = _types(proto)
        fused = _residual_adds(g, layers, set(self.output_names) | set(inits))
        clamped = _clamps(g, layers, inits, set(self.output_names) | set(inits), fused)
        wrapped = _rows_wrappers(g, set(self.output_names), inits, layers)
        order, reads = _run_order(g, fused, clamped, wrapped)
        later: list[set[str]] = []  # per node: the tensors nodes after it (or the graph outputs) read
        need = set(self.output_names)
        for node in reversed(order):
            later.append(set(need))
            need |= reads(node)
        later.reverse()
        steps: list[SparseStep | ConvStep | RnnStep | DepthwiseStep | DenseStep] = []
        run: list[onnx.NodeProto] = []
        for node, after in zip(order, later, strict=True):
            if _graph_attrs(node):
                raise InputError(f"node {node.name!r} ({node.op_type}) has a subgraph; fast artifacts hold none",
                                 where="artifact", fix="export the artifact with 'sparsekit export --format fast'")
            _, act, bounds, dw = clamped.get(id(node), (node, None, None, None))
            if node.domain != checks.DOMAIN and dw is None:
                run.append(node)
                continue
            if run:
                steps.append(_segment(proto, run, after | reads(node), types, inits, len(steps)))
                run = []
            steps.append(DepthwiseStep(node.input[0], node.output[0], dw) if dw is not None else
                         self._sparse_step(node, layers[node.name], memory_limit))
            if id(node) in fused:
                _, add, relu, steps[-1].residual = fused[id(node)]
                steps[-1].residual_relu, steps[-1].y = relu is not None, (relu or add).output[0]
            if act is not None:
                steps[-1].y = act.output[0]
                if bounds is not None:
                    steps[-1].clamp = bounds
            if id(node) in wrapped:
                _, steps[-1].x, steps[-1].y, _ = wrapped[id(node)]
        if run:
            steps.append(_segment(proto, run, set(self.output_names), types, inits, len(steps)))
        return self._chains(steps, [name for node in order for name in reads(node)], memory_limit)

    def _chains(self, steps: list, read: list[str], memory_limit: int | None) -> list:
        """Consecutive SparseLinear steps, each output read only by the next (a classifier head's Linear ->
        ReLU -> Linear ..., a Transformer's feed-forward pair), merged into one chain: one call of the chain
        runtime instead of one a layer (each call cost 3-9 us of Python and hand-off at batch 1). ``read``: every
        tensor each node that runs reads, once per reader."""
        reads = Counter(read)
        out: list = []
        for step in steps:
            prev = out[-1] if out else None
            if isinstance(step, SparseStep) and isinstance(prev, SparseStep) and prev.y == step.x and \
                    reads.get(step.x, 0) == 1 and step.x not in self.output_names:
                chain = FastModel([*prev.model.layers, *step.model.layers], (prev.model.layers[0].n_in,),
                                  threads=self.threads, memory_limit=memory_limit)
                chain.fit_plans()
                self.notes.update(chain.notes)
                out[-1] = SparseStep(prev.x, step.y, chain)
                continue
            out.append(step)
        return out

    def _sparse_step(self, node: onnx.NodeProto, layer: CsrLayer | SparseConv | SparseRnn,
                     memory_limit: int | None) -> SparseStep | ConvStep | RnnStep:
        """A sparse node's step; its kernels held to ``memory_limit`` as a chain's are (``memory.kernel_bytes``:
        a convolution's layout and its per-thread panels of im2col columns and outputs)."""
        if isinstance(layer, SparseRnn):
            layer.prepare(self.threads, memory_limit)
            return RnnStep(node.input[0], list(node.input[9:]), list(node.output), layer)
        if isinstance(layer, SparseConv):
            need = kernel_bytes(layer.layer, layer.kernel, layer.block, self.threads)
            if memory_limit is not None and need > memory_limit:
                raise InputError(f"convolution {node.name!r} needs ~{need >> 20} MiB, over this artifact's "
                                 f"{memory_limit >> 20} MiB memory bound", where="artifact",
                                 fix="check the artifact's layer shapes; an honest artifact needs far less")
            return ConvStep(node.input[0], node.output[0], layer)
        model = FastModel([layer], (layer.n_in,), threads=self.threads, memory_limit=memory_limit)
        model.fit_plans()
        self.notes.update(model.notes)
        return SparseStep(node.input[0], node.output[0], model)

    # ---------------------------------------------------------------- structure
    @property
    def layers(self) -> list[CsrLayer]:
        return [layer for s in self._steps if isinstance(s, SparseStep) for layer in s.model.layers]

    @property
    def convs(self) -> list[SparseConv]:
        return [s.conv for s in self._steps if isinstance(s, ConvStep)]

    @property
    def sparse_models(self) -> list[FastModel]:
        return [s.model for s in self._steps if isinstance(s, SparseStep)]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The first input's per-sample shape (dims after the first; symbolic ones as 0)."""
        dims = self.input_types[self.input_names[0]].tensor_type.shape.dim
        return tuple(int(d.dim_value) if d.HasField("dim_value") else 0 for d in dims[1:])

    def _drop_lists(self) -> list[list[str]]:
        """Per step, the tensors no later step reads (dropped after it; graph outputs never are)."""
        last: dict[str, int] = {}
        for k, step in enumerate(self._steps):
            for name in ([step.x] if isinstance(step, SparseStep) else step.inputs):
                last[name] = k
        for name in self.output_names:
            last[name] = len(self._steps)
        drops: list[list[str]] = [[] for _ in self._steps]
        for name, k in last.items():
            if k < len(self._steps):
                drops[k].append(name)
        return drops

    def kernels_for(self, batch: int, rows_per_sample: int = 1) -> list[str]:
        """Each sparse layer's kernel for ``batch`` samples of ``rows_per_sample`` rows (a Transformer's
        sequence length)."""
        return [k for m in self.sparse_models for k in m.kernels_for(batch * rows_per_sample)]

    def kernels_used(self) -> list[str]:
        """Each sparse layer's kernel in the last ``run`` (for its number of rows)."""
        return [k for s in self._steps if isinstance(s, SparseStep) for k in s.model.kernels_for(max(1, s.last_rows))]

    def plan_changed(self) -> None:
        for m in self.sparse_models:
            m.plan_changed()

    def fit_plans(self) -> None:
        for m in self.sparse_models:
            m.fit_plans()
            self.notes.update(m.notes)

    # ---------------------------------------------------------------- running
    def _session(self, step: DenseStep, threads: int):
        if threads not in step.sessions:
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
            # no idle spinning: a spinning ORT worker would take the core sparsekit's pool runs the next step on
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            try:
                step.sessions[threads] = ort.InferenceSession(step.proto.SerializeToString(), so,
                                                              providers=["CPUExecutionProvider"],
                                                              disabled_optimizers=SEGMENT_DISABLED_OPTIMIZERS)
            except Exception as exc:  # ONNX Runtime refused a node of the artifact
                raise InputError(f"ONNX Runtime cannot run part of this artifact: {str(exc).splitlines()[0][:300]}",
                                 where="artifact", fix="export the artifact with 'sparsekit export --format fast'"
                                 ) from exc
        return step.sessions[threads]

    def _feeds(self, x: Any) -> dict[str, np.ndarray]:
        if not isinstance(x, dict):
            if len(self.input_names) != 1:
                raise InputError(f"this model takes {len(self.input_names)} inputs ({', '.join(self.input_names)})",
                                 where="input", fix="pass a dict {name: array}")
            x = {self.input_names[0]: x}
        feeds = {}
        for name in self.input_names:
            if name not in x:
                raise InputError(f"input {name!r} is missing", where="input", fix="pass every graph input by name")
            want = _NP_TYPES.get(self.input_types[name].tensor_type.elem_type)
            arr = np.asarray(x[name])
            if want is not None and arr.dtype != want:
                kinds = {np.dtype(want).kind, arr.dtype.kind}
                if len(kinds) > 1 and not kinds <= {"i", "u"}:
                    raise InputError(f"input {name!r} is {arr.dtype}, the model takes {np.dtype(want).name}",
                                     where="input", fix=f"pass {np.dtype(want).name} values")
                arr = arr.astype(want)
            feeds[name] = np.ascontiguousarray(arr)
        return feeds

    def run(self, x: Any, *, threads: int | None = None) -> Any:
        nt = self.threads if threads is None else FastModel._check_threads(threads)
        env: dict[str, np.ndarray] = self._feeds(x)
        for k, step in enumerate(self._steps):
            if isinstance(step, SparseStep):
                a = env[step.x]
                n_in = step.model.layers[0].n_in
                if a.ndim < 1 or a.shape[-1] != n_in:
                    raise InputError(f"tensor {step.x!r} has shape {list(a.shape)}, its sparse layer takes "
                                     f"{n_in} features", where="input", fix="check the input's shape")
                rows = np.ascontiguousarray(a, dtype=np.float32).reshape(-1, n_in)
                step.last_rows = rows.shape[0]
                env[step.y] = step.model.run(rows, threads=nt).reshape(*a.shape[:-1], -1)
            elif isinstance(step, (ConvStep, RnnStep, DepthwiseStep)):
                step.run(env, nt)
            else:
                sess = self._session(step, nt)
                try:
                    with forksafe.ORT_CALLS:
                        outs = sess.run(step.outputs, {n: env[n] for n in step.inputs})
                except Exception as exc:  # ONNX Runtime's own check of shapes and values: one line
                    raise InputError(f"ONNX Runtime refused the input: {' '.join(str(exc).split())[:300]}",
                                     where="input", fix="pass inputs of the shape and type the model takes") from exc
                env.update(zip(step.outputs, outs, strict=True))
            for name in self._drops[k]:
                env.pop(name, None)
        outs = [env[n] for n in self.output_names]
        return outs[0] if len(outs) == 1 else outs

    def to_onnx(self) -> onnx.ModelProto:
        """The artifact: the graph with each SparseLinear node's ``plan`` from its layer, and the metadata."""
        import json

        out = onnx.ModelProto()
        out.CopyFrom(self.proto)
        by_name = {layer.name: layer for layer in self.layers}
        for node in out.graph.node:
            if node.domain == checks.DOMAIN and node.name in by_name:
                plan = json.dumps({str(k): s for k, s in sorted(by_name[node.name].plan.items())})
                for a in node.attribute:
                    if a.name == "plan":
                        a.s = plan.encode()
        del out.metadata_props[:]
        helper.set_model_props(out, {str(k): str(v) for k, v in self.metadata.items()})
        return out

    def info(self) -> dict[str, Any]:
        return {
            "inputs": self.input_names,
            "outputs": self.output_names,
            "isa": kernel_isa(),
            "threads": self.threads,
            "segments": sum(isinstance(s, DenseStep) for s in self._steps),
            "depthwise": sum(isinstance(s, DepthwiseStep) for s in self._steps),
            "convolutions": [{"name": c.layer.name, "shape": [c.out_channels, c.in_channels, *c.geometry.kernel],
                              "nnz": c.layer.nnz, "sparsity": round(1.0 - c.layer.density, 6),
                              "relu": c.layer.relu, "block": c.block, "kernel": c.kernel} for c in self.convs],
            "layers": [layer_info(layer) for layer in self.layers],
            "recurrent": [{"name": s.rnn.name, "op": s.rnn.op, "hidden_size": s.rnn.hidden,
                           "input_size": s.rnn.input_size, "nnz": s.rnn.w.nnz + s.rnn.r.nnz,
                           "sparsity": round(1.0 - s.rnn.density, 6)}
                          for s in self._steps if isinstance(s, RnnStep)],
            "metadata": dict(self.metadata),
        }
