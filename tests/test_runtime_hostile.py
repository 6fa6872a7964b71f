"""Fast artifacts from someone else: every class of crafted file the loader must refuse (one clear InputError,
exit 2 from ``sparsekit run``), the memory bound on what a plan may allocate, reads past the panel buffer, the C
side's own size checks, and a forked child of a process whose thread holds a model's lock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from fast_artifacts import (
    del_attr,
    init,
    node,
    one_layer_proto,
    reference,
    save,
    set_attr,
    set_init,
    tiny_model,
    tiny_proto,
)
from onnx import TensorProto, helper, numpy_helper

import sparsekit.runtime as rt
from sparsekit.errors import InputError
from sparsekit.runtime import layers as L
from sparsekit.runtime.memory import kernel_bytes, memory_bound
from sparsekit.runtime.model import ChainLayer

K = L._K
X = np.random.default_rng(0).standard_normal((5, 12)).astype(np.float32)


def refused(proto: onnx.ModelProto, match: str) -> InputError:
    with pytest.raises(InputError, match=match) as info:
        rt.from_onnx(proto)
    return info.value


def cli_refuses(cli, tmp_path: Path, proto: onnx.ModelProto, match: str) -> str:
    """``sparsekit run`` on the crafted file: exit 2 and one line naming the problem."""
    art = save(proto, tmp_path / "crafted.fast.onnx")
    np.save(tmp_path / "x.npy", X)
    res = cli(["run", str(art), "--input", str(tmp_path / "x.npy")])
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2, res.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], res.stderr
    return lines[0]


# ---------------------------------------------------------------- widths past int32 (the 8 GiB read)
def test_a_column_index_past_int32_is_refused_not_narrowed(tmp_path, cli):
    # the 569-byte file: in_features 2^31 + 64 and a column index 2^31 + 5, which int32 narrowing turned
    # into a read 8 GiB before the input
    proto = one_layer_proto(2**31 + 64, 4, [2**31 + 5])
    assert len(proto.SerializeToString()) < 1024
    refused(proto, "more than 2.31 - 1 features")
    cli_refuses(cli, tmp_path, proto, "more than 2^31 - 1 features")
    # the same layer behind an honest input shape: the attribute itself is refused
    proto.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 12
    refused(proto, r"in_features = 2147483712 is outside \[0, 2\^31 - 1\]")
    with pytest.raises(InputError, match="in_features"):
        rt.CsrLayer.from_csr(2**31 + 64, 1, np.ones(1), np.array([2**31 + 5]), np.array([0, 1]), None, False)
    # the widest layer allowed keeps its indices exact (int32) and runs
    layer = rt.CsrLayer.from_csr(2**31 - 1, 1, np.ones(1), np.array([2**31 - 2]), np.array([0, 1]), None, False)
    assert layer.indices.dtype == np.int32 and int(layer.indices[0]) == 2**31 - 2


@pytest.mark.skipif(K is None, reason="compiled kernels")
def test_kernels_refuse_widths_past_int32_and_overflowing_sizes():
    layer = rt.CsrLayer.from_dense(np.eye(4, dtype=np.float32), None, False)
    sv, si, slice_ptr, perm, _ = layer.sliced()
    x, y = np.zeros(4, np.float32), np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="outside"):
        K.rows(sv, si, slice_ptr, perm, None, x, y, 4, 2**31 + 64, 4, 1, 0, 1)
    with pytest.raises(ValueError, match="too small"):  # batch x n_in x 4 overflows int64: must not wrap to 0
        K.rows(sv, si, slice_ptr, perm, None, x, y, layer.idx_bytes, 2**31 - 1, 4, 2**62, 0, 1)
    with pytest.raises(ValueError, match="too small"):
        K.gemv(layer.dense_t(), None, x, y, 2**31 - 1, 2**31 - 1, 1, 0, 1)
    with pytest.raises(ValueError, match="too small"):  # 2^32 x 2^30 x 4 bytes: exactly 2^64, 0 once wrapped
        K.to_panels(x, y, 2**32, 2**30, 1)
    v, i, bptr, nb, _ = layer.blocked(0)
    with pytest.raises(ValueError, match="outside"):
        K.panel(v, i, bptr, None, x, y, layer.idx_bytes, 2**31 + 64, 4, 1, nb, 0, 1)
    bad_perm = perm.copy()
    bad_perm[0] = 4  # a lane writing past the output row
    with pytest.raises(ValueError, match="row order"):
        K.chain_new([ChainLayer(0, sv, si, slice_ptr, bad_perm, None, layer.idx_bytes, 4, 4, 0, 0)])


# ---------------------------------------------------------------- reads past the panel buffer
GUARD_PAGE_SCRIPT = r"""
import ctypes, mmap, sys
import numpy as np
from sparsekit.runtime import layers as L
K = L._K
K.set_isa(sys.argv[1])
libc = ctypes.CDLL(None)
page = mmap.PAGESIZE
for n_out in (1, 5, 17, 37, 100):
    rng = np.random.default_rng(n_out)
    w = (rng.standard_normal((n_out, 30)) * (rng.random((n_out, 30)) < 0.5)).astype(np.float32)
    layer = L.CsrLayer.from_dense(w, rng.standard_normal(n_out), relu=True)
    need = n_out * L.PANEL * 4
    pages = -(-need // page) + 1
    buf = mmap.mmap(-1, pages * page)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    assert libc.mprotect(ctypes.c_void_p(addr + (pages - 1) * page), page, 0) == 0  # PROT_NONE guard page
    whole = np.frombuffer(buf, np.float32)
    yp = whole[(pages - 1) * page // 4 - n_out * L.PANEL:(pages - 1) * page // 4]  # ends at the guard page
    x = rng.standard_normal((3, 30)).astype(np.float32)
    xp = L.aligned_empty(30 * L.PANEL)
    y = np.empty((3, n_out), np.float32)
    layer.run_panel(xp, yp, 1, 0, 1, y_rows=y, x_rows=x)  # row-ordered layout: each group flushed from yp
    assert np.allclose(y, layer.reference(x), atol=1e-4), n_out
print("ok")
"""


@pytest.mark.skipif(K is None or not hasattr(os, "fork"), reason="compiled kernels, POSIX mmap")
@pytest.mark.parametrize("isa", K.available_isas() if K is not None else [])
def test_panel_output_flush_reads_nothing_past_the_panel_buffer(isa):
    # the AVX-512 flush loaded 16 rows of a ragged last tile: 64 bytes past the buffer, a segfault before a guard page
    res = subprocess.run([sys.executable, "-c", GUARD_PAGE_SCRIPT, isa], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", (res.returncode, res.stderr[-2000:])


# ---------------------------------------------------------------- memory bound
def test_a_dense_plan_on_a_huge_sparse_layer_is_replanned_within_the_bound(tmp_path, cli):
    # 16384 x 16384 with 16 nonzeros, a ~129 KiB file whose plan asked for dense (7.2 GiB on its first call)
    cols = list(range(0, 16384, 1024))
    proto = one_layer_proto(16384, 16384, cols, plan={"1": "dense", "8": "gemv", "256": "panel:1"})
    model = rt.from_onnx(proto)
    assert model.memory_limit == memory_bound(proto.ByteSize()) == 256 << 20
    assert model.kernels_for(1) == ["rows"] and model.kernels_for(8) == ["panel"] and model.kernels_for(256) == [
        "panel"]
    assert model.layers[0].plan == {1: "rows", 8: "panel", 256: "panel"}
    notes = list(model.notes)
    assert len(notes) == 3 and all("memory bound" in n for n in notes)
    assert any("kernel dense would need ~8,192 MiB" in n and n.endswith("running rows instead") for n in notes)
    x = np.random.default_rng(1).standard_normal((2, 16384)).astype(np.float32)
    np.testing.assert_allclose(model.run(x), reference(model, x), rtol=1e-5, atol=1e-5)
    assert model.layers[0]._dense is None and model.layers[0]._dense_t is None  # nothing was densified
    with pytest.raises(InputError, match="kernel dense needs ~8,192 MiB"):  # forced kernels: refused, not replaced
        model.run(x, kernels=["dense"])
    art = save(proto, tmp_path / "huge.fast.onnx")
    np.save(tmp_path / "x.npy", x)
    res = cli(["run", str(art), "--input", str(tmp_path / "x.npy"), "--json"])
    assert res.exit_code == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["kernels"] == ["rows"] and out["notes"] == notes
    assert "warning: " in res.stderr and "memory bound" in res.stderr


def test_kernels_within_the_bound_are_kept_and_none_fitting_is_refused():
    model = rt.from_onnx(tiny_proto(plan="mixed"))
    assert not model.notes and model.kernels_for(64) == ["panel", "panel:16", "dense"]
    layer = model.layers[0]
    # the estimates follow what each layout holds: densified weight, padded slices, block pointers
    assert kernel_bytes(layer, "dense", 0) == 8 * 4 * 37 * 12 and kernel_bytes(layer, "gemv", 0) == 2 * 4 * 37 * 12
    assert kernel_bytes(layer, "panel", 1) > kernel_bytes(layer, "panel", 0)
    assert kernel_bytes(layer, "rows", 0) >= layer.sliced()[2][-1] * (4 + layer.idx_bytes)
    tight = rt.FastModel(model.layers, (12,), memory_limit=1)
    with pytest.raises(InputError, match="even on the sparse kernels"):
        tight.run(X)


# ---------------------------------------------------------------- silently accepted before
def test_a_missing_activation_is_refused(tmp_path, cli):
    proto = tiny_proto()
    del_attr(proto, "l0", "activation")  # it used to default to "none": the ReLU dropped, outputs off
    refused(proto, "missing required attribute.s. activation")
    cli_refuses(cli, tmp_path, proto, "node 'l0'")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_bias_is_refused(bad):
    proto = tiny_proto()
    b = numpy_helper.to_array(init(proto, "layer1.bias")).copy()
    b[3] = bad
    set_init(proto, "layer1.bias", b)
    refused(proto, "non-finite bias")


@pytest.mark.parametrize("how", ["duplicate", "unsorted"])
def test_column_indices_must_strictly_increase_within_a_row(how):
    proto = tiny_proto()
    idx = numpy_helper.to_array(init(proto, "layer0.indices")).copy()
    rp = numpy_helper.to_array(init(proto, "layer0.rowptr"))
    row = int(np.argmax(np.diff(rp) >= 2))
    a = int(rp[row])
    if how == "duplicate":  # kernels disagreed: batch 1 and batch 64 summed it differently
        idx[a + 1] = idx[a]
    else:
        idx[a], idx[a + 1] = idx[a + 1], idx[a]
    set_init(proto, "layer0.indices", idx)
    refused(proto, f"row {row}: column indices not strictly increasing")


def test_a_rows_first_index_may_be_below_the_previous_rows_last():
    model = rt.from_onnx(tiny_proto())  # every honest artifact has such row boundaries
    np.testing.assert_allclose(model.run(X), reference(model, X), rtol=1e-5, atol=1e-5)


def test_node_inputs_must_name_existing_tensors_and_the_wiring_is_followed(tmp_path, cli):
    proto = tiny_proto()
    node(proto, "l1").input[0] = "nope"  # was ignored: the nodes ran in file order
    refused(proto, "reads 'nope', a tensor that no node produces")
    cli_refuses(cli, tmp_path, proto, "reads 'nope'")
    proto = tiny_proto()
    node(proto, "l1").input[4] = "missing.bias"
    refused(proto, "input bias names 'missing.bias', which is not an initializer")
    proto = tiny_proto()
    node(proto, "l2").input[0] = "layer0.out"  # l1's output goes nowhere, l0's feeds two nodes
    refused(proto, "tensor 'layer0.out' feeds 2 nodes")
    proto = tiny_proto()
    proto.graph.output[0].name = "layer1.out"
    refused(proto, "node 'l2' is not on the chain|ends at tensor")


def test_nodes_listed_out_of_order_run_in_wiring_order():
    model = tiny_model()
    proto = rt.to_onnx(model)
    nodes = list(proto.graph.node)
    del proto.graph.node[:]
    proto.graph.node.extend([nodes[2], nodes[0], nodes[1]])
    loaded = rt.from_onnx(proto)
    assert [layer.name for layer in loaded.layers] == ["l0", "l1", "l2"]
    np.testing.assert_allclose(loaded.run(X), model.run(X), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- exit 1 "internal error" before: now exit 2
def _string_values(proto):
    set_init(proto, "layer0.values", helper.make_tensor("layer0.values", TensorProto.STRING, [2], [b"a", b"b"]))


def _truncated(proto):
    init(proto, "layer0.values").raw_data = init(proto, "layer0.values").raw_data[:-3]


def _huge_dims(proto):
    t = init(proto, "layer0.rowptr")
    del t.dims[:]
    t.dims.append(2**40)


def _huge_input(proto):
    proto.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 2**40


def _three_inputs(proto):
    del node(proto, "l1").input[3:]


def _external(proto):
    t = init(proto, "layer0.values")
    t.data_location = TensorProto.EXTERNAL
    t.external_data.add(key="location", value="/etc/passwd")


CRAFTED = {
    "string-typed values": (_string_values, "element type STRING"),
    "non-integer in_features": (lambda p: set_attr(p, "l0", "in_features", 12.5), "'in_features' is FLOAT"),
    "in_features as text": (lambda p: set_attr(p, "l0", "in_features", "12"), "'in_features' is STRING"),
    "plan as INT": (lambda p: set_attr(p, "l1", "plan", 7), "'plan' is INT, expected STRING"),
    "plan not an object": (lambda p: set_attr(p, "l1", "plan", "[1, 2]"), "plan must be a JSON object"),
    "plan too deep": (lambda p: set_attr(p, "l1", "plan", "[" * 100000), "unreadable plan"),
    "plan with a bad kernel": (lambda p: set_attr(p, "l1", "plan", '{"1": "fast"}'), "unknown kernel 'fast'"),
    "plan with a huge thread cap": (lambda p: set_attr(p, "l1", "plan", '{"1": "rows@99999999999"}'),
                                    "bad thread cap"),
    "plan with a bad batch": (lambda p: set_attr(p, "l1", "plan", '{"-1": "rows"}'), "bad plan entry '-1'"),
    "unknown attribute": (lambda p: set_attr(p, "l1", "activaton", "relu"), "unknown attribute 'activaton'"),
    "unknown activation": (lambda p: set_attr(p, "l1", "activation", "gelu"), "unknown activation 'gelu'"),
    "a node with 3 inputs": (_three_inputs, "has 3 inputs; SparseLinear takes 4 or 5"),
    "declared dims of 2^40": (_huge_dims, "declares shape [1099511627776]"),
    "input dims of 2^40": (_huge_input, "more than 2^31 - 1 features"),
    "truncated raw data": (_truncated, "truncated or corrupt"),
    "external data": (_external, "external or segmented tensor data"),
    "float indices": (lambda p: set_init(p, "layer0.indices", np.zeros(3, np.float32)), "expected a 1-D integer"),
    "2-D values": (lambda p: set_init(p, "layer2.values", np.zeros((1, 1), np.float32)), "expected a 1-D float32"),
    "a column index equal to in_features": (lambda p: set_init(p, "layer2.indices", np.full(55, 21, np.uint16)),
                                            "column index out of range [0, 21)"),
    "too many values": (lambda p: set_init(p, "layer2.values", np.zeros(999, np.float32)),
                        "CSR arrays hold 999 values"),
    "uint64-wrapping rowptr": (lambda p: set_init(p, "layer2.rowptr", np.full(6, 2**63, np.uint64)),
                               "element type UINT64"),
    "negative rowptr": (lambda p: set_init(p, "layer2.rowptr", -np.arange(6)), "malformed row pointers"),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_crafted_files_exit_2_with_one_line(case, tmp_path, cli):
    edit, match = CRAFTED[case]
    proto = tiny_proto()
    edit(proto)
    cli_refuses(cli, tmp_path, proto, match)


@pytest.mark.parametrize("case", ["truncated raw data", "declared dims of 2^40", "a node with 3 inputs",
                                  "a column index equal to in_features"])
def test_report_refuses_crafted_fast_artifacts_with_exit_2(case, tmp_path, cli):
    edit, match = CRAFTED[case]
    proto = tiny_proto()
    edit(proto)
    art = save(proto, tmp_path / "crafted.fast.onnx")
    res = cli(["report", str(art), "--no-latency"])
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and lines[-1].startswith("error: ") and match in lines[-1], res.stderr


# ---------------------------------------------------------------- fork while another thread holds a model's lock
def _wait(pid: int, seconds: float) -> int | None:
    """The child's exit status, or None (child killed) if it is still running after ``seconds``."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return None


def _fork_and_run(model: rt.FastModel, x: np.ndarray, ref: np.ndarray) -> int | None:
    pid = os.fork()
    if pid == 0:  # child: run the model, exit without Python's shutdown (os._exit)
        code = 1
        try:
            code = 0 if np.allclose(model.run(x), ref, rtol=1e-4, atol=1e-4) else 3
        finally:
            os._exit(code)
    return _wait(pid, 30)


@pytest.mark.skipif(not hasattr(os, "fork") or K is None, reason="fork, compiled kernels")
@pytest.mark.parametrize("plan", ["sparse", "mixed"])
def test_a_forked_child_runs_a_model_whose_lock_a_parent_thread_holds(plan):
    model = tiny_model(plan=plan, threads=2)
    x = np.random.default_rng(3).standard_normal((70, 12)).astype(np.float32)
    if plan == "sparse":
        model.layers[1].plan = {1: "rows", 8: "rows"}  # panel, rows, panel
    assert model.chain(70) is None and len(set(model.kernels_for(70))) > 1  # not one chain: run() takes the lock
    ref = reference(model, x)
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with model._lock:
            held.set()
            release.wait(30)

    t = threading.Thread(target=hold)
    t.start()
    held.wait(10)
    try:
        assert _fork_and_run(model, x, ref) == 0  # the lock was copied held: the child hung every time
    finally:
        release.set()
        t.join()
    # and while another thread runs the model in a loop (the lock taken and released all the time)
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            model.run(x)

    t = threading.Thread(target=loop)
    t.start()
    try:
        codes = [_fork_and_run(model, x, ref) for _ in range(10)]
    finally:
        stop.set()
        t.join()
    assert codes == [0] * 10
    np.testing.assert_allclose(model.run(x), ref, rtol=1e-4, atol=1e-4)  # the parent's pool still works
