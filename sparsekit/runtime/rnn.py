"""Sparse recurrent layers (``com.sparsekit::SparseGRU`` / ``SparseLSTM``): one ONNX GRU/LSTM layer (forward,
batch-major time: ``X`` (T, N, input_size)) whose input weight ``W`` and recurrent weight ``R`` are sparse.

Running it: the input projection ``W x + Wb`` for all T x N rows at once on a one-layer ``FastModel`` (its plan
picks panel at many rows, rows/window at few), then the time loop in C (``csrc/runtime/sk_rnn.c``): per step the
recurrent product ``R h + Rb`` on the rows or window kernel and the gates' math. Gate order and equations are
ONNX's (GRU: z, r, h with ``linear_before_reset`` = 1, torch's; LSTM: i, o, f, c, no peepholes); an LSTM's two
biases are added once, into the projection.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sparsekit.errors import InputError
from sparsekit.runtime.layers import _K, CsrLayer, aligned_empty, window_width
from sparsekit.runtime.model import FastModel

GRU, LSTM = "SparseGRU", "SparseLSTM"
GATES = {GRU: 3, LSTM: 4}
CELLS = {GRU: 0, LSTM: 1}  # the C loop's cell codes
# from this batch on R h runs on the panel kernel (R read once per 16-64 samples), below on rows/window (once per
# sample, no transposes)
PANEL_MIN_BATCH = 16


class SparseRnn:
    """One sparse GRU/LSTM layer: ``w`` (G*H, input_size) with the projection's bias, ``r`` (G*H, H) with the
    recurrent bias (GRU; None for an LSTM, whose biases are all in ``w``)."""

    def __init__(self, op: str, w: CsrLayer, r: CsrLayer, *, name: str = "") -> None:
        where = name or op
        if op not in GATES:
            raise InputError(f"unknown recurrent op {op!r}", where=where, fix=f"use {GRU} or {LSTM}")
        g = GATES[op]
        hidden = r.n_in
        if hidden < 1 or r.n_out != g * hidden or w.n_out != g * hidden:
            raise InputError(f"W is {w.n_out}x{w.n_in} and R {r.n_out}x{r.n_in}; a {op} of hidden size {hidden} "
                             f"needs {g * hidden} rows in both and R square per gate", where=where)
        if w.relu or r.relu or (op == LSTM and r.bias is not None):
            raise InputError("recurrent weights take no activation (and an LSTM's biases are all in W)", where=where)
        self.op, self.w, self.r, self.name, self.hidden, self.gates = op, w, r, name, hidden, g
        self.projection: FastModel | None = None
        self._layouts: dict[int, tuple[Any, ...]] = {}  # R's layout per window width

    def prepare(self, threads: int = 1, memory_limit: int | None = None) -> FastModel:
        """The input projection's one-layer model (its kernels held to ``memory_limit`` as a chain's are)."""
        self.projection = FastModel([self.w], (self.w.n_in,), threads=threads, memory_limit=memory_limit)
        self.projection.fit_plans()
        return self.projection

    @property
    def density(self) -> float:
        """Nonzeros of W and R over their sizes."""
        size = self.w.n_in * self.w.n_out + self.r.n_in * self.r.n_out
        return (self.w.nnz + self.r.nnz) / size if size else 0.0

    @property
    def input_size(self) -> int:
        return self.w.n_in

    def _state(self, state: np.ndarray | None, n: int, what: str) -> np.ndarray:
        """A fresh (N, H) float32 copy of ``state`` (1, N, H), zeros when None."""
        if state is None:
            return np.zeros((n, self.hidden), np.float32)
        s = np.asarray(state, dtype=np.float32)
        if s.shape != (1, n, self.hidden):
            raise InputError(f"{what} has shape {list(s.shape)}, expected [1, {n}, {self.hidden}]",
                             where=self.name or self.op, fix="pass the state the model returned")
        return np.array(s[0], dtype=np.float32, order="C")

    def run(self, x: np.ndarray, h0: np.ndarray | None = None, c0: np.ndarray | None = None, *,
            threads: int = 1) -> tuple[np.ndarray, ...]:
        """x (T, N, input_size) -> (Y (T, 1, N, H), Y_h (1, N, H)[, Y_c (1, N, H)]), ONNX's outputs."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 3 or x.shape[2] != self.input_size:
            raise InputError(f"recurrent input has shape {list(x.shape)}, expected (T, N, {self.input_size})",
                             where=self.name or self.op, fix="check the input's shape")
        t, n, hid = x.shape[0], x.shape[1], self.hidden
        h = self._state(h0, n, "initial_h")
        c = self._state(c0, n, "initial_c") if self.op == LSTM else None
        projection = self.projection or self.prepare(threads)
        xw = (projection.run(x.reshape(t * n, -1), threads=threads) if t * n
              else np.zeros((0, self.gates * hid), np.float32))
        y = aligned_empty(t * n * hid).reshape(t, 1, n, hid)
        if _K is None:
            self._loop_numpy(xw.reshape(t, n, -1), h, c, y)
        elif n >= PANEL_MIN_BATCH:
            v, i, bp, _, order = self.r.blocked(0)
            _K.rnn_panel(CELLS[self.op], v, i, bp, order, self.r.bias, self.r.idx_bytes, hid,
                         np.ascontiguousarray(xw), h, c, y, t, n)
        else:
            width = window_width()  # the active code path's (set_isa may change it)
            if width not in self._layouts:
                self._layouts[width] = self._r_layout(width)
            sv, si, sp, perm, bias, wins, wide, idx_bytes = self._layouts[width]
            hr = aligned_empty(max(1, n * self.gates * hid))
            _K.rnn(CELLS[self.op], sv, si, sp, perm, bias, wins, wide, idx_bytes, hid, np.ascontiguousarray(xw),
                   h, c, y, hr, t, n, int(threads))
        outs = (y, h.reshape(1, n, hid))
        return outs + ((c.reshape(1, n, hid),) if c is not None else ())

    def _r_layout(self, width: int) -> tuple[Any, ...]:
        """R's sliced layout for the C loop: the window form where the active path has one (``width``) that fits,
        else the gather form (rows)."""
        if width and self.r.has_window(width):
            wv, wi, sp, order, bias, wins = self.r.windowed(width)
            return wv, wi, sp, order, bias, wins, width, 1
        sv, si, sp, perm, bias = self.r.sliced()
        return sv, si, sp, perm, bias, None, 0, self.r.idx_bytes

    def _loop_numpy(self, xw: np.ndarray, h: np.ndarray, c: np.ndarray | None, y: np.ndarray) -> None:
        """The time loop without compiled kernels (float32, as the C loop)."""
        out = step_reference(self.op, xw, self.r.dense_weight(), self.r.bias, h, c)
        y[:, 0] = out[0]
        h[...] = out[1]
        if c is not None:
            c[...] = out[2]

    def reference(self, x: np.ndarray, h0: np.ndarray | None = None,
                  c0: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
        """float64 outputs by the ONNX equations on the dense weights (tests)."""
        x = np.asarray(x, np.float64)
        n = x.shape[1]
        h = np.zeros((n, self.hidden)) if h0 is None else np.asarray(h0, np.float64)[0]
        c = None if self.op == GRU else np.zeros((n, self.hidden)) if c0 is None else np.asarray(c0, np.float64)[0]
        xw = self.w.reference(x.reshape(-1, self.input_size)).reshape(x.shape[0], n, self.gates * self.hidden)
        rb = None if self.r.bias is None else self.r.bias.astype(np.float64)
        ys, h, c = step_reference(self.op, xw, self.r.dense_weight().astype(np.float64), rb, h, c)
        return (ys[:, None], h[None]) + ((c[None],) if c is not None else ())


def step_reference(op: str, xw: np.ndarray, r: np.ndarray, rb: np.ndarray | None, h: np.ndarray,
                   c: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """ONNX's GRU (z, r, h; linear_before_reset = 1) / LSTM (i, o, f, c) time loop on the projected inputs ``xw``
    (T, N, G*H) in their dtype: (Y (T, N, H), h_T, c_T)."""
    def sig(v: np.ndarray) -> np.ndarray:
        return 1 / (1 + np.exp(-v))

    hid = r.shape[1]
    ys = np.empty((xw.shape[0], *h.shape), dtype=xw.dtype)
    for t in range(xw.shape[0]):
        hr = h @ r.T + (0 if rb is None else rb)
        x = xw[t]
        if op == GRU:
            z, rr = sig(x[:, :hid] + hr[:, :hid]), sig(x[:, hid:2 * hid] + hr[:, hid:2 * hid])
            h = (1 - z) * np.tanh(x[:, 2 * hid:] + rr * hr[:, 2 * hid:]) + z * h
        else:
            gi, go, gf = (sig(x[:, k * hid:(k + 1) * hid] + hr[:, k * hid:(k + 1) * hid]) for k in range(3))
            c = gf * c + gi * np.tanh(x[:, 3 * hid:] + hr[:, 3 * hid:])
            h = go * np.tanh(c)
        ys[t] = h
    return ys, h, c


class RnnStep:
    """One SparseGRU/SparseLSTM node of a whole-graph artifact: reads ``X`` and the initial states by name from
    the tensors computed so far and writes every output of the node (``Y``, ``Y_h``[, ``Y_c``])."""

    def __init__(self, x: str, states: list[str], outputs: list[str], rnn: SparseRnn) -> None:
        self.x, self.states, self.outputs, self.rnn = x, states, outputs, rnn

    @property
    def inputs(self) -> list[str]:
        return [self.x, *(s for s in self.states if s)]

    def run(self, env: dict[str, np.ndarray], threads: int) -> None:
        states = [env[s] if s else None for s in self.states]
        env.update(zip(self.outputs, self.rnn.run(env[self.x], *states, threads=threads), strict=True))
