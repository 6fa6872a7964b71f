"""The sparse recurrent layers' time loop (csrc/runtime/sk_rnn.c via sparsekit.runtime.rnn): against a float64
reference of ONNX's equations and against torch's own GRU/LSTM, on every code path, batch 1 and several, window
and gather layouts of R; and the C entry point refusing buffers that do not fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from runtime_helpers import K, close, sparse_matrix

from sparsekit.runtime.layers import CsrLayer
from sparsekit.runtime.rnn import GATES, GRU, LSTM, SparseRnn


def sparse_rnn(op: str, hidden: int, n_in: int, seed: int = 0, *, bias: bool = True) -> SparseRnn:
    rng = np.random.default_rng(seed)
    g = GATES[op]
    w, r = sparse_matrix(rng, g * hidden, n_in, 0.3), sparse_matrix(rng, g * hidden, hidden, 0.3)
    wb, rb = (rng.standard_normal(g * hidden).astype(np.float32) for _ in range(2)) if bias else (None, None)
    if op == LSTM:  # an LSTM's two biases are one, in W
        wb, rb = (None if wb is None else wb + rb), None
    return SparseRnn(op, CsrLayer.from_dense(w, wb, False), CsrLayer.from_dense(r, rb, False), name="rnn")


@pytest.mark.parametrize("op", [GRU, LSTM])
@pytest.mark.parametrize(("hidden", "t", "n"), [(64, 5, 1), (64, 3, 4), (8, 4, 2), (40, 0, 1), (37, 2, 3),
                                               (64, 3, 16), (37, 2, 40), (24, 2, 70)])
def test_time_loop_matches_the_onnx_equations(isa, op, hidden, t, n):
    """hidden 64: R's window form on the SIMD paths; 8 and 37: narrower than a window or ragged (gather form);
    from batch 16 the panel form: a quarter, half and a full and a partial panel (AVX-512 lanes)."""
    m = sparse_rnn(op, hidden, 12, seed=hidden + t)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((t, n, 12)).astype(np.float32)
    states = [rng.standard_normal((1, n, hidden)).astype(np.float32) for _ in range(2 if op == LSTM else 1)]
    got, want = m.run(x, *states), m.reference(x, *states)
    assert len(got) == (3 if op == LSTM else 2) and got[0].shape == (t, 1, n, hidden)
    for g, w in zip(got, want, strict=True):
        close(g, w)


@pytest.mark.parametrize("op", [GRU, LSTM])
def test_zero_initial_state_and_no_bias(isa, op):
    m = sparse_rnn(op, 48, 7, bias=False)
    x = np.random.default_rng(2).standard_normal((4, 2, 7)).astype(np.float32)
    for g, w in zip(m.run(x), m.reference(x), strict=True):
        close(g, w)


def _onnx_gates(t: torch.Tensor, order: list[int], hidden: int) -> np.ndarray:
    """torch's stacked gate rows in ONNX's order (GRU r, z, n -> z, r, h; LSTM i, f, g, o -> i, o, f, c)."""
    a = t.detach().numpy()
    return np.concatenate([a[k * hidden:(k + 1) * hidden] for k in order]).astype(np.float32)


@pytest.mark.parametrize("op", [GRU, LSTM])
def test_time_loop_equals_torch(isa, op):
    """Independent of the numpy reference: torch's nn.GRU (linear_before_reset form) and nn.LSTM."""
    torch.manual_seed(0)
    hidden, n_in = 32, 10
    cell = (torch.nn.GRU if op == GRU else torch.nn.LSTM)(n_in, hidden)
    order = [1, 0, 2] if op == GRU else [0, 3, 1, 2]
    with torch.no_grad():
        for p in (cell.weight_ih_l0, cell.weight_hh_l0):
            p.mul_((torch.rand_like(p) < 0.3).float())
    w, r = (_onnx_gates(p, order, hidden) for p in (cell.weight_ih_l0, cell.weight_hh_l0))
    wb, rb = (_onnx_gates(p, order, hidden) for p in (cell.bias_ih_l0, cell.bias_hh_l0))
    if op == LSTM:
        wb, rb = wb + rb, None
    m = SparseRnn(op, CsrLayer.from_dense(w, wb, False), CsrLayer.from_dense(r, rb, False))
    x = torch.randn(6, 3, n_in)
    h0 = torch.randn(1, 3, hidden)
    state = h0 if op == GRU else (h0, torch.randn(1, 3, hidden))
    with torch.no_grad():
        y, final = cell(x, state)
    got = m.run(x.numpy(), *(s.numpy() for s in (state if op == LSTM else (state,))))
    close(got[0][:, 0], y.numpy())
    for g, want in zip(got[1:], final if op == LSTM else (final,), strict=True):
        close(g, want.numpy())


def test_threads_give_the_same_result():
    m = sparse_rnn(GRU, 64, 16)
    x = np.random.default_rng(3).standard_normal((5, 8, 16)).astype(np.float32)
    for g, w in zip(m.run(x, threads=2), m.run(x, threads=1), strict=True):
        close(g, w)


def test_state_of_the_wrong_shape_is_refused_in_one_line():
    m = sparse_rnn(GRU, 16, 4)
    with pytest.raises(Exception, match=r"initial_h has shape \[1, 2, 8\], expected \[1, 2, 16\]"):
        m.run(np.zeros((3, 2, 4), np.float32), np.zeros((1, 2, 8), np.float32))
    with pytest.raises(Exception, match=r"recurrent input has shape \[3, 2, 5\], expected \(T, N, 4\)"):
        m.run(np.zeros((3, 2, 5), np.float32))


@pytest.mark.skipif(K is None, reason="compiled kernels")
def test_the_c_loop_refuses_buffers_that_do_not_fit():
    """Every size is checked against hidden, gates, T and N before the loop touches memory."""
    m = sparse_rnn(GRU, 16, 4)
    sv, si, sp, perm, bias = m.r.sliced()
    h, hr = np.zeros(16, np.float32), np.zeros(48, np.float32)
    xw, y = np.zeros(2 * 48, np.float32), np.zeros(2 * 16, np.float32)
    args = [0, sv, si, sp, perm, bias, None, 0, m.r.idx_bytes, 16, xw, h, None, y, hr, 2, 1, 1]
    K.rnn(*args)  # fits
    for k, bad, msg in ((10, xw[:-1], "xw buffer too small"), (11, h[:-1], "h buffer too small"),
                        (13, y[:-1], "y buffer too small"), (14, hr[:-1], "hr buffer too small"),
                        (9, 17, "buffer too small"), (0, 2, "cell must be 0"), (12, h, "a GRU none"),
                        (4, np.full_like(perm, 99), "bad row order"), (8, 3, "idx_bytes must be")):
        with pytest.raises(ValueError, match=msg):
            K.rnn(*[bad if j == k else a for j, a in enumerate(args)])


@pytest.mark.skipif(K is None, reason="compiled kernels")
def test_the_panel_loop_refuses_layouts_that_do_not_fit():
    m = sparse_rnn(LSTM, 16, 4)
    v, i, bp, _, order = m.r.blocked(0)
    h, c, xw, y = (np.zeros(n, np.float32) for n in (32, 32, 2 * 2 * 64, 2 * 2 * 16))
    args = [1, v, i, bp, order, m.r.bias, m.r.idx_bytes, 16, xw, h, c, y, 2, 2]
    K.rnn_panel(*args)  # fits
    bad_bp = bp.copy()
    bad_bp[3] = bad_bp[2] - 1
    big_bp = bp.copy()
    big_bp[-1] += 10**6
    for k, bad, msg in ((3, bad_bp, "bad block pointers"), (3, big_bp, "values buffer too small"),
                        (4, np.full_like(order, 64), "bad row order"), (9, h[:-1], "h buffer too small"),
                        (10, c[:-1], "c buffer too small"), (11, y[:-1], "y buffer too small"),
                        (8, xw[:-1], "xw buffer too small"), (10, None, "takes a cell state"),
                        (6, 1, "idx_bytes must be 2 or 4")):
        with pytest.raises(ValueError, match=msg):
            K.rnn_panel(*[bad if j == k else a for j, a in enumerate(args)])
