"""Deterministic fuzzing of the fast-artifact loader and kernels: real tiny artifacts, mutated (their bytes, their
initializers' contents, types and shapes, their attributes, their nodes' wiring), each loaded and run at a few
batch sizes. Every case must either be refused with an InputError or load and match a float64 reference computed
from what was loaded; any other exception fails, a crash kills the run (``make test-asan`` runs this file under
AddressSanitizer, which also catches reads and writes that would not crash)."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from fast_artifacts import reference_in_range, tiny_proto
from onnx import AttributeProto, TensorProto, helper, numpy_helper

import sparsekit.runtime as rt
from sparsekit.errors import InputError

BATCHES = (1, 3, 70)  # rows kernels and chains, a partial panel, two panels
# cases per mutation family: a few seconds here; SPARSEKIT_FUZZ_CASES=5000 for a longer campaign by hand
CASES_PER_FAMILY = int(os.environ.get("SPARSEKIT_FUZZ_CASES", "60"))
INTS = [-1, 0, 1, 2, 5, 11, 12, 13, 37, 65535, 65536, 2**31 - 1, 2**31, 2**32 + 12, 2**63 - 1]
# values written into initializers: the widths of the seeds' layers and their neighbours, type limits, non-finite
EDGES = [0, 1, -1, 4, 5, 11, 12, 20, 21, 36, 37, 2**16 - 1, 2**31 - 1, np.nan, np.inf, 1e30]
KERNELS = ["rows", "panel", "panel:1", "panel:8", "panel:999", "gemv", "dense", "rows@1", "panel@2", "x", "rows@0",
           "block", "block:8@1"]


def seeds() -> list[bytes]:
    """Real artifacts: every kernel in a plan, the heuristic plan with a 2-D input (a Flatten node), no biases."""
    return [tiny_proto(0, "mixed").SerializeToString(),
            tiny_proto(1, "sparse", bias=False).SerializeToString(),
            tiny_proto(2, "heuristic", input_shape=(3, 4)).SerializeToString()]


def outcome(blob: bytes, path: Path) -> str:
    """'refused' (InputError at load or run) or 'ran' (outputs match the reference of what was loaded)."""
    path.write_bytes(blob)
    try:
        model = rt.load(path, threads=2)
    except InputError:
        return "refused"
    if model.n_features > 4096:  # loads, but an input that wide is not worth building here
        return "ran"
    rng = np.random.default_rng(0)
    x = rng.standard_normal((max(BATCHES), *model.input_shape)).astype(np.float32)
    for b in BATCHES:
        try:
            y = model.run(x[:b])
        except InputError:
            return "refused"
        ref, ok = reference_in_range(model, x[:b])  # samples whose float32 sums would overflow: not compared
        assert y.shape == ref.shape and y.dtype == np.float32
        scale = max(1.0, float(np.abs(ref[ok]).max(initial=0.0)))
        np.testing.assert_allclose(y[ok], ref[ok], rtol=0, atol=1e-4 * scale)
    return "ran"


# ---------------------------------------------------------------- byte mutations
def mutate_bytes(blob: bytes, rng: np.random.Generator) -> bytes:
    b = bytearray(blob)
    op = rng.integers(5)
    if op == 0:  # flip a few bits
        for pos in rng.integers(0, len(b), rng.integers(1, 5)):
            b[pos] ^= 1 << int(rng.integers(8))
    elif op == 1:  # overwrite a run of bytes with 0x00, 0xff or noise
        pos, n = int(rng.integers(len(b))), int(rng.integers(1, 9))
        fill = [0, 255, None][int(rng.integers(3))]
        for k in range(pos, min(len(b), pos + n)):
            b[k] = int(rng.integers(256)) if fill is None else fill
    elif op == 2:  # truncate
        del b[int(rng.integers(len(b))):]
    elif op == 3:  # delete a slice
        pos = int(rng.integers(len(b)))
        del b[pos:pos + int(rng.integers(1, 64))]
    else:  # duplicate a slice in place
        pos = int(rng.integers(len(b)))
        b[pos:pos] = b[pos:pos + int(rng.integers(1, 64))]
    return bytes(b)


# ---------------------------------------------------------------- structured mutations
def _pick(rng: np.random.Generator, seq: list) -> object:
    return seq[int(rng.integers(len(seq)))]


def mutate_initializer(p: onnx.ModelProto, rng: np.random.Generator) -> None:
    tensors = list(p.graph.initializer)
    ints = [t for t in tensors if t.data_type != TensorProto.FLOAT]  # indices and row pointers: half the cases
    t: TensorProto = _pick(rng, ints if ints and rng.random() < 0.5 else tensors)
    arr = numpy_helper.to_array(t).copy()
    op = rng.integers(7)
    if op < 2 and arr.size:  # one value changed: a neighbour's (duplicate column), a width's edge, a special
        k = int(rng.integers(arr.size))
        here = arr[k].item()
        val = _pick(rng, [*EDGES, arr[k - 1].item(), arr[(k + 1) % arr.size].item(), here + 1, here - 1])
        info = np.finfo(arr.dtype) if arr.dtype.kind == "f" else np.iinfo(arr.dtype)
        arr[k] = val if arr.dtype.kind == "f" or (np.isfinite(val) and info.min <= val <= info.max) else info.max
        t.CopyFrom(numpy_helper.from_array(arr, t.name))
    elif op == 2:  # another length
        arr = np.resize(arr, max(0, arr.size + int(rng.integers(-3, 4))))
        t.CopyFrom(numpy_helper.from_array(arr, t.name))
    elif op == 3:  # another declared shape
        t.dims[:] = [int(_pick(rng, [0, 1, 2, arr.size + 1, 2**40])) for _ in range(int(rng.integers(1, 3)))]
    elif op == 4:  # another element type
        t.data_type = int(_pick(rng, [TensorProto.STRING, TensorProto.DOUBLE, TensorProto.INT8, TensorProto.UINT64,
                                      TensorProto.FLOAT16, TensorProto.INT32, 99]))
    elif op == 5 and t.raw_data:  # cut raw data
        t.raw_data = t.raw_data[:int(rng.integers(len(t.raw_data)))]
    else:  # shuffled contents (valid for values, usually not for indices or row pointers)
        rng.shuffle(arr)
        t.CopyFrom(numpy_helper.from_array(arr, t.name))


def random_attribute(name: str, rng: np.random.Generator) -> AttributeProto:
    kind = rng.integers(5)
    if kind == 0:
        return helper.make_attribute(name, int(_pick(rng, INTS)))
    if kind == 1:
        return helper.make_attribute(name, float(rng.standard_normal()))
    if kind == 2:
        return helper.make_attribute(name, str(_pick(rng, ["relu", "none", "", "12", "{}", "\u00e9"])))
    if kind == 3:
        entries = {str(_pick(rng, [1, 2, 8, 64, 0, -3, 2**40, "x"])): _pick(rng, KERNELS)
                   for _ in range(int(rng.integers(1, 4)))}
        return helper.make_attribute(name, json.dumps(entries))
    return helper.make_attribute(name, [1, 2])


def mutate_attribute(p: onnx.ModelProto, rng: np.random.Generator) -> None:
    n = _pick(rng, [n for n in p.graph.node if n.op_type == "SparseLinear"])
    names = [a.name for a in n.attribute]
    target = str(_pick(rng, [*names, "extra"]))
    kept = [a for a in n.attribute if a.name != target]
    if rng.random() < 0.15:  # drop it
        n.ClearField("attribute")
        n.attribute.extend(kept)
        return
    if target == "plan" and rng.random() < 0.5:  # a valid plan with any kernels: loads, must still compute right
        value = json.dumps({str(b): str(_pick(rng, KERNELS[:8])) for b in (1, 3, 64)})
        new = helper.make_attribute("plan", value)
    else:
        new = random_attribute(target, rng)
    n.ClearField("attribute")
    n.attribute.extend([*kept, new])


def mutate_wiring(p: onnx.ModelProto, rng: np.random.Generator) -> None:
    g = p.graph
    nodes = list(g.node)
    tensors = [g.input[0].name, *(t.name for t in g.initializer), *(o for n in nodes for o in n.output), "ghost"]
    op = rng.integers(5)
    n = _pick(rng, nodes)
    if op == 0:  # an input renamed to another tensor
        k = int(rng.integers(len(n.input)))
        n.input[k] = str(_pick(rng, tensors))
    elif op == 1:  # an input dropped or added
        if rng.random() < 0.5 and len(n.input):
            del n.input[int(rng.integers(len(n.input)))]
        else:
            n.input.append(str(_pick(rng, tensors)))
    elif op == 2:  # file order shuffled (wiring unchanged: must still load and compute right)
        order = rng.permutation(len(nodes))
        g.ClearField("node")
        g.node.extend([nodes[i] for i in order])
    elif op == 3:  # a node removed or duplicated
        g.ClearField("node")
        k = int(rng.integers(len(nodes)))
        g.node.extend(nodes[:k] + nodes[k + 1:] if rng.random() < 0.5 else [*nodes, nodes[k]])
    else:  # the graph input's shape
        dims = g.input[0].type.tensor_type.shape.dim
        d = dims[int(rng.integers(1, len(dims)))]
        d.dim_value = int(_pick(rng, [0, 1, 11, 13, 2**31, 2**40]))


FAMILIES: dict[str, Callable[[onnx.ModelProto, np.random.Generator], None]] = {
    "initializer": mutate_initializer, "attribute": mutate_attribute, "wiring": mutate_wiring}


@pytest.mark.parametrize("family", ["bytes", *FAMILIES])
def test_mutated_artifacts_are_refused_or_run_correctly(family, tmp_path):
    rng = np.random.default_rng(["bytes", *FAMILIES].index(family))
    base = seeds()
    counts: Counter[str] = Counter()
    for case in range(CASES_PER_FAMILY):
        blob = base[case % len(base)]
        if family == "bytes":
            blob = mutate_bytes(blob, rng)
        else:
            proto = onnx.load_from_string(blob)
            FAMILIES[family](proto, rng)
            blob = proto.SerializeToString()
        try:
            counts[outcome(blob, tmp_path / "case.fast.onnx")] += 1
        except Exception as exc:  # not an InputError, or a wrong output: name the case to replay it
            raise AssertionError(f"{family} case {case}: {type(exc).__name__}: {exc}") from exc
    # the corpus exercises both sides: refusals, and mutated files that still load and must compute right
    assert counts["refused"] >= CASES_PER_FAMILY // 10 and counts["ran"] >= CASES_PER_FAMILY // 20, counts


def test_unmutated_seeds_load_and_run(tmp_path):
    for blob in seeds():
        assert outcome(blob, tmp_path / "seed.fast.onnx") == "ran"


# ---------------------------------------------------------------- sparse convolutions (whole-graph artifacts)

CONV_ATTRS = ["in_features", "out_features", "in_channels", "kernel_shape", "strides", "pads", "dilations", "block"]


def conv_seed() -> onnx.ModelProto:
    """Two SparseConv nodes (3->8 3x3 pad 1 with bias and ReLU, 8->6 3x3 stride 2 with uneven pads)."""
    from sparsekit.exporters.fast_graph import pack_graph
    from test_fast_graph import _conv_net

    from sparsekit.runtime.graph_model import GraphModel

    packed = pack_graph(_conv_net(np.random.default_rng(21)))
    return GraphModel(packed.proto, packed.layers).to_onnx()


def conv_outcome(proto: onnx.ModelProto, path: Path, size: tuple[int, int]) -> str:
    """'refused' or 'ran' with outputs equal to the float64 im2col reference of the convolutions loaded."""
    path.write_bytes(proto.SerializeToString())
    try:
        model = rt.load(path, threads=2)
        x = np.random.default_rng(1).standard_normal((2, 3, *size)).astype(np.float32)
        y = model.run(x)
    except InputError:
        return "refused"
    ref = x.astype(np.float64)
    for conv in model.convs:
        ref = conv.reference(ref)
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-4 * max(1.0, float(np.abs(ref).max(initial=0.0))))
    return "ran"


def test_fuzzed_sparse_convolutions_are_refused_or_run_exactly(tmp_path):
    rng = np.random.default_rng(7)
    seed = conv_seed()
    outcomes: Counter[str] = Counter()
    for case in range(CASES_PER_FAMILY):
        proto = onnx.ModelProto()
        proto.CopyFrom(seed)
        node = proto.graph.node[case % 2]
        attr = next(a for a in node.attribute if a.name == CONV_ATTRS[case % len(CONV_ATTRS)])
        value = int(rng.choice(INTS[:12]))
        if attr.type == AttributeProto.INTS:
            ints = list(attr.ints)
            ints[int(rng.integers(len(ints)))] = value
            attr.CopyFrom(helper.make_attribute(attr.name, ints))
        else:
            attr.i = value
        if case % 3 == 0:  # and a value of the CSR arrays
            name = f"{node.name}.{rng.choice(['indices', 'rowptr'])}"
            init = next(t for t in proto.graph.initializer if t.name == name)
            arr = numpy_helper.to_array(init).copy()
            arr.flat[int(rng.integers(arr.size))] = np.clip(int(rng.choice(INTS[:12])), np.iinfo(arr.dtype).min,
                                                            np.iinfo(arr.dtype).max)
            init.CopyFrom(numpy_helper.from_array(arr, init.name))
        size = [(10, 9), (1, 1), (2, 7), (33, 5)][case % 4]
        outcomes[conv_outcome(proto, tmp_path / "c.fast.onnx", size)] += 1
    assert outcomes["refused"] > 0 and outcomes["ran"] > 0, outcomes
