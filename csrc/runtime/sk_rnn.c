/* Sparse recurrent cells (com.sparsekit::SparseGRU / SparseLSTM): the time loop of one layer. The input
 * projection W x (+ its bias) for every time step is done before, by the ordinary layer kernels (panel at many
 * rows, rows/window at few); here, per time step, the recurrent product R h (+ R's bias) runs on the rows or
 * window kernel (the sliced layout of R, gates x H rows of H columns) and the gates' elementwise math follows in
 * plain C, so that batch-1 generation pays one Python call per sequence, not per step and op.
 *
 * Gate order and equations are ONNX's: GRU rows z, r, h with linear_before_reset = 1 (torch's GRU)
 *   z = s(xz + hz), r = s(xr + hr), n = tanh(xn + r * hn), h' = (1 - z) n + z h
 * LSTM rows i, o, f, c (no peepholes)
 *   i = s(xi + hi), o = s(xo + ho), f = s(xf + hf), g = tanh(xc + hc), c' = f c + i g, h' = o tanh(c')
 * where x* are the rows of the input projection and h* those of R h + Rb. */
#include "sk_glue.h"

enum { CELL_GRU = 0, CELL_LSTM = 1 };

/* GCC keeps the clamps' compares as branches (no vectorized gates) unless floating-point traps may be ignored,
 * which nothing here relies on; clang if-converts them anyway */
#if defined(__GNUC__) && !defined(__clang__)
#define SK_GATES __attribute__((optimize("no-trapping-math")))
#else
#define SK_GATES
#endif

/* exp(x) for the gates, branch-free so the compiler vectorizes the gate loops (libm's expf/tanhf are calls, one
 * element at a time: 4 per hidden unit made the gates cost as much as R h). Cephes' expf: x = n ln2 + r with
 * |r| <= ln2 / 2, a degree-6 polynomial for e^r (about 1 ulp), 2^n from the exponent bits; x clamped to
 * [-87, 88] (e^x stays a normal float; the gates saturate far before). */
SK_GATES static inline float sk_expf(float x) {
    x = x < -87.f ? -87.f : x > 88.f ? 88.f : x;
    /* n = round(x / ln2): adding and taking away 1.5 * 2^23 rounds to the nearest integer (|x / ln2| < 2^22) */
    const float fn = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;
    const int n = (int)fn;
    const float r = (x - fn * 0.693359375f) + fn * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    union { int32_t i; float f; } scale = {(int32_t)((n + 127) << 23)};
    return p * scale.f;
}

SK_GATES static inline float sigmoidf(float v) { return 1.f / (1.f + sk_expf(-v)); }
/* tanh(v) = 1 - 2 / (e^{2v} + 1): absolute error ~1e-7 (its relative error near 0 does not matter next to the
 * terms it is added to) */
SK_GATES static inline float sk_tanhf(float v) { return 1.f - 2.f / (sk_expf(2.f * v) + 1.f); }

/* one step's gates for N samples: xw (N, G*H) and hr (N, G*H) -> h (N, H) [, c (N, H)] in place */
SK_GATES static void gru_gates(const float *xw, const float *hr, float *h, int64_t N, int64_t H) {
    for (int64_t b = 0; b < N; b++) {
        const float *restrict x = xw + b * 3 * H, *restrict r = hr + b * 3 * H;
        float *restrict hb = h + b * H;
        for (int64_t k = 0; k < H; k++) {
            const float z = sigmoidf(x[k] + r[k]);
            const float rr = sigmoidf(x[H + k] + r[H + k]);
            const float n = sk_tanhf(x[2 * H + k] + rr * r[2 * H + k]);
            hb[k] = (1.f - z) * n + z * hb[k];
        }
    }
}

SK_GATES static void lstm_gates(const float *xw, const float *hr, float *h, float *c, int64_t N, int64_t H) {
    for (int64_t b = 0; b < N; b++) {
        const float *restrict x = xw + b * 4 * H, *restrict r = hr + b * 4 * H;
        float *restrict hb = h + b * H, *restrict cb = c + b * H;
        for (int64_t k = 0; k < H; k++) {
            const float i = sigmoidf(x[k] + r[k]);
            const float o = sigmoidf(x[H + k] + r[H + k]);
            const float f = sigmoidf(x[2 * H + k] + r[2 * H + k]);
            const float g = sk_tanhf(x[3 * H + k] + r[3 * H + k]);
            cb[k] = f * cb[k] + i * g;
            hb[k] = o * sk_tanhf(cb[k]);
        }
    }
}

typedef struct {
    int cell;
    const sliced_t *w;  /* R: G*H rows, H columns, sliced (rows/window kernels); NULL: the panel form below */
    rows_fn fn;
    int nt;
    const csr_t *pw;    /* R for the panel kernel (one column block: rowptr = block pointers) */
    const int32_t *ord; /* the panel layout's row order */
    float *xp, *yp;     /* one panel of h (H x PANEL) and of R h (G*H x PANEL) */
    const float *xw;    /* (T, N, G*H) */
    float *h, *c, *y, *hr;
    int64_t T, N, H;
} rnn_job_t;

/* hr (N, G*H) = R h + Rb with the panel kernel, 64 samples (AVX-512: 16 or 32 when that is all) per panel: at
 * batch 16 the rows kernels stream all of R once per sample, the panel kernel once per panel */
static void panel_product(const rnn_job_t *j) {
    const int64_t H = j->H, GH = j->pw->n_out;
    for (int64_t p0 = 0; p0 < j->N; p0 += PANEL) {
        const int64_t tb = j->N - p0 < PANEL ? j->N - p0 : PANEL;
        const int lanes = g_isa == ISA_AVX512 && tb <= PANEL / 2 ? (tb <= PANEL / 4 ? PANEL / 4 : PANEL / 2) : 0;
        const int64_t width = lanes ? lanes : PANEL;
        for (int64_t k = 0; k < H; k++) {
            float *d = j->xp + k * PANEL;
            for (int64_t l = 0; l < tb; l++) d[l] = j->h[(p0 + l) * H + k];
            for (int64_t l = tb; l < width; l++) d[l] = 0.f;
        }
        const rowout_t ro = {NULL, 0, tb, 0, lanes};
        panel_rows(pick_panel(), j->pw, j->pw->rowptr, j->ord, 1, &ro, 0, GH, j->xp, j->yp);
        for (int64_t o = 0; o < GH; o++)
            for (int64_t l = 0; l < tb; l++) j->hr[(p0 + l) * GH + o] = j->yp[o * PANEL + l];
    }
}

static void rows_product(const rnn_job_t *j) {
    if (j->w->nsl <= 0) return;
    if (j->nt <= 1) {
        j->fn(j->w, j->h, j->hr, j->N, 0, j->w->nsl);
    } else {
        rows_job_t job = {j->fn, j->w, j->h, j->hr, j->N, (int64_t)j->nt * CHUNKS_PER_THREAD};
        par_run(j->nt, job.nch, rows_item, &job);
    }
}

static void rnn_loop(const rnn_job_t *j) {
    const int64_t G = j->cell == CELL_GRU ? 3 : 4, step = j->N * G * j->H;
    for (int64_t t = 0; t < j->T; t++) {
        if (j->w) rows_product(j);
        else panel_product(j);
        if (j->cell == CELL_GRU) gru_gates(j->xw + t * step, j->hr, j->h, j->N, j->H);
        else lstm_gates(j->xw + t * step, j->hr, j->h, j->c, j->N, j->H);
        memcpy(j->y + t * j->N * j->H, j->h, (size_t)(j->N * j->H) * 4);
    }
}

/* R's sliced layout (as the rows method takes it) checked into w: sizes against G*H rows of H columns */
static int rnn_sliced(sliced_t *w, Py_buffer *val, Py_buffer *idx, Py_buffer *sp, Py_buffer *perm, Py_buffer *bias,
                      int have_bias, Py_buffer *wins, int have_wins, int64_t wide, int idx_bytes, int64_t n_in,
                      int64_t n_out) {
    if (have_wins ? idx_bytes != 1 || wide < 1 || wide > 256 || wide > n_in : idx_bytes != 2 && idx_bytes != 4) {
        PyErr_SetString(PyExc_ValueError, "idx_bytes must be 2 or 4 (gather form) or 1 with a window width in "
                                          "[1, min(256, hidden)] (window form)");
        return -1;
    }
    w->nsl = (n_out + SLICE - 1) / SLICE;
    if (check_len(sp, smul(w->nsl + 1, 8), "slice pointers") || check_len(perm, smul(w->nsl * SLICE, 4), "row order"))
        return -1;
    w->slice_ptr = (const int64_t *)sp->buf;
    if (w->slice_ptr[0] != 0) { PyErr_SetString(PyExc_ValueError, "bad slice pointers"); return -1; }
    for (int64_t s = 0; s < w->nsl; s++)
        if (w->slice_ptr[s + 1] < w->slice_ptr[s] || (w->slice_ptr[s + 1] - w->slice_ptr[s]) % SLICE) {
            PyErr_SetString(PyExc_ValueError, "bad slice pointers");
            return -1;
        }
    const int64_t slots = w->slice_ptr[w->nsl];
    if (check_len(val, smul(slots, 4), "values") || check_len(idx, smul(slots, idx_bytes), "indices") ||
        (have_bias && check_len(bias, smul(w->nsl * SLICE, 4), "bias")) ||
        (have_wins && check_len(wins, smul(slots / SLICE, 4), "windows")))
        return -1;
    const int32_t *pm = (const int32_t *)perm->buf;
    for (int64_t k = 0; k < w->nsl * SLICE; k++)
        if (pm[k] < -1 || pm[k] >= n_out) { PyErr_SetString(PyExc_ValueError, "bad row order"); return -1; }
    if (have_wins) {
        const int32_t *wn = (const int32_t *)wins->buf;
        for (int64_t k = 0; k < slots / SLICE; k++)
            if (wn[k] < 0 || wn[k] > n_in - wide) { PyErr_SetString(PyExc_ValueError, "bad windows"); return -1; }
        w->win = wn;
        w->wide = wide;
    }
    w->val = (const float *)val->buf;
    w->idx = idx->buf;
    w->idx16 = idx_bytes == 2;
    w->perm = pm;
    w->bias = have_bias ? (const float *)bias->buf : NULL;
    w->n_in = n_in;
    w->n_out = n_out;
    w->relu = 0;
    return 0;
}

/* An optional buffer argument: 0 and nothing held for None, 1 with the buffer held, -1 with an exception set. */
static int optional_buffer(PyObject *obj, Py_buffer *buf, int flags) {
    if (obj == Py_None) return 0;
    return PyObject_GetBuffer(obj, buf, flags) < 0 ? -1 : 1;
}

/* The gates of a cell (3 for a GRU, 4 for an LSTM) after checking the cell, its state and the sizes; 0 with an
 * exception set when one is wrong. */
static int64_t cell_gates(int cell, int have_c, long long H, long long T, long long N) {
    if (cell != CELL_GRU && cell != CELL_LSTM) {
        PyErr_SetString(PyExc_ValueError, "cell must be 0 (GRU) or 1 (LSTM)");
        return 0;
    }
    if (have_c != (cell == CELL_LSTM)) {
        PyErr_SetString(PyExc_ValueError, "an LSTM takes a cell state c, a GRU none");
        return 0;
    }
    if (H < 1 || H > SK_MAX_DIM / 4 || T < 0 || N < 0) {
        PyErr_SetString(PyExc_ValueError, "hidden size must be in [1, 2^29), T and N non-negative");
        return 0;
    }
    return cell == CELL_GRU ? 3 : 4;
}

/* rnn(cell, values, indices, slice_ptr, perm, bias|None, windows|None, wide, idx_bytes, hidden, xw, h, c|None, y,
 *     hr, T, N, threads): see the file comment; h (and c) hold the initial state and are updated in place. */
PyObject *sk_py_rnn(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer val, idx, sp, perm, xw, h, y, hr, bias = {0}, wins = {0}, c = {0};
    PyObject *bias_obj, *wins_obj, *c_obj;
    int cell, idx_bytes, threads;
    long long wide, H, T, N;
    if (!PyArg_ParseTuple(args, "iy*y*y*y*OOLiLy*w*Ow*w*LLi", &cell, &val, &idx, &sp, &perm, &bias_obj, &wins_obj,
                          &wide, &idx_bytes, &H, &xw, &h, &c_obj, &y, &hr, &T, &N, &threads))
        return NULL;
    int have_bias = 0, have_wins = 0, have_c = 0;
    PyObject *ret = NULL;
    sliced_t w = {0};
    if ((have_bias = optional_buffer(bias_obj, &bias, PyBUF_C_CONTIGUOUS)) < 0) { have_bias = 0; goto done; }
    if ((have_wins = optional_buffer(wins_obj, &wins, PyBUF_C_CONTIGUOUS)) < 0) { have_wins = 0; goto done; }
    if ((have_c = optional_buffer(c_obj, &c, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE)) < 0) { have_c = 0; goto done; }
    const int64_t G = cell_gates(cell, have_c, H, T, N);
    if (!G) goto done;
    if (rnn_sliced(&w, &val, &idx, &sp, &perm, &bias, have_bias, &wins, have_wins, wide, idx_bytes, H, G * H))
        goto done;
    if (check_len(&xw, smul(smul3(T, N, G), smul(H, 4)), "xw") || check_len(&h, smul3(N, H, 4), "h") ||
        (have_c && check_len(&c, smul3(N, H, 4), "c")) || check_len(&y, smul(smul3(T, N, H), 4), "y") ||
        check_len(&hr, smul(smul3(N, G, H), 4), "hr"))
        goto done;
    {
        int nt = clamp_threads(threads < 0 ? -threads : threads);
        if (threads > 0) nt = rows_threads(nt, w.slice_ptr[w.nsl] * (N > 0 ? N : 1));
        const rnn_job_t job = {cell, &w, pick_sliced(&w), nt, NULL, NULL, NULL, NULL, (const float *)xw.buf,
                               (float *)h.buf, have_c ? (float *)c.buf : NULL, (float *)y.buf, (float *)hr.buf, T, N, H};
        Py_BEGIN_ALLOW_THREADS
        rnn_loop(&job);
        Py_END_ALLOW_THREADS
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    if (have_bias) PyBuffer_Release(&bias);
    if (have_wins) PyBuffer_Release(&wins);
    if (have_c) PyBuffer_Release(&c);
    PyBuffer_Release(&val); PyBuffer_Release(&idx); PyBuffer_Release(&sp); PyBuffer_Release(&perm);
    PyBuffer_Release(&xw); PyBuffer_Release(&h); PyBuffer_Release(&y); PyBuffer_Release(&hr);
    return ret;
}

/* the panel form of R checked into w: block pointers (one column block) from 0, non-decreasing, within the value
 * and index buffers; row order within [0, G*H) */
static int rnn_panel_csr(csr_t *w, Py_buffer *val, Py_buffer *idx, Py_buffer *bp, Py_buffer *ord, Py_buffer *bias,
                         int have_bias, int idx_bytes, int64_t n_in, int64_t n_out) {
    if (idx_bytes != 2 && idx_bytes != 4) { PyErr_SetString(PyExc_ValueError, "idx_bytes must be 2 or 4"); return -1; }
    if (check_len(bp, smul(n_out + 1, 8), "block pointers") || check_len(ord, smul(n_out, 4), "row order") ||
        (have_bias && check_len(bias, smul(n_out, 4), "bias")))
        return -1;
    const int64_t *p = (const int64_t *)bp->buf;
    for (int64_t r = 0; r < n_out; r++)
        if (p[r + 1] < p[r]) { PyErr_SetString(PyExc_ValueError, "bad block pointers"); return -1; }
    if (p[0] != 0 || check_len(val, smul(p[n_out] + PAD_SLACK, 4), "values") ||
        check_len(idx, smul(p[n_out] + PAD_SLACK, idx_bytes), "indices")) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "bad block pointers");
        return -1;
    }
    const int32_t *o = (const int32_t *)ord->buf;
    for (int64_t r = 0; r < n_out; r++)
        if (o[r] < 0 || o[r] >= n_out) { PyErr_SetString(PyExc_ValueError, "bad row order"); return -1; }
    *w = (csr_t){(const float *)val->buf, idx->buf, idx_bytes == 2, p, have_bias ? (const float *)bias->buf : NULL,
                 n_in, n_out, 0};
    return 0;
}

/* rnn_panel(cell, values, indices, blockptr, order, bias|None, idx_bytes, hidden, xw, h, c|None, y, T, N): rnn with
 * R in the panel kernel's layout (CsrLayer.blocked(0)), for batches of several samples; one thread. */
PyObject *sk_py_rnn_panel(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer val, idx, bp, ord, xw, h, y, bias = {0}, c = {0};
    PyObject *bias_obj, *c_obj;
    int cell, idx_bytes;
    long long H, T, N;
    if (!PyArg_ParseTuple(args, "iy*y*y*y*OiLy*w*Ow*LL", &cell, &val, &idx, &bp, &ord, &bias_obj, &idx_bytes, &H,
                          &xw, &h, &c_obj, &y, &T, &N))
        return NULL;
    int have_bias = 0, have_c = 0;
    PyObject *ret = NULL;
    float *scratch = NULL;
    csr_t w;
    if ((have_bias = optional_buffer(bias_obj, &bias, PyBUF_C_CONTIGUOUS)) < 0) { have_bias = 0; goto done; }
    if ((have_c = optional_buffer(c_obj, &c, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE)) < 0) { have_c = 0; goto done; }
    const int64_t G = cell_gates(cell, have_c, H, T, N);
    if (!G) goto done;
    if (rnn_panel_csr(&w, &val, &idx, &bp, &ord, &bias, have_bias, idx_bytes, H, G * H)) goto done;
    if (check_len(&xw, smul(smul3(T, N, G), smul(H, 4)), "xw") || check_len(&h, smul3(N, H, 4), "h") ||
        (have_c && check_len(&c, smul3(N, H, 4), "c")) || check_len(&y, smul(smul3(T, N, H), 4), "y"))
        goto done;
    /* xp (H x PANEL), yp (G*H x PANEL), hr (N x G*H), from a 64-byte boundary (multiples of 64 bytes) */
    const int64_t nxp = H * PANEL, nyp = G * H * PANEL, nhr = (N > 0 ? N : 1) * G * H;
    scratch = (float *)malloc((size_t)(nxp + nyp + nhr + 16) * 4);
    if (!scratch) { PyErr_NoMemory(); goto done; }
    {
        float *a = (float *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63);
        const rnn_job_t job = {cell, NULL, NULL, 1, &w, (const int32_t *)ord.buf, a, a + nxp, (const float *)xw.buf,
                               (float *)h.buf, have_c ? (float *)c.buf : NULL, (float *)y.buf, a + nxp + nyp, T, N, H};
        Py_BEGIN_ALLOW_THREADS
        rnn_loop(&job);
        Py_END_ALLOW_THREADS
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    free(scratch);
    if (have_bias) PyBuffer_Release(&bias);
    if (have_c) PyBuffer_Release(&c);
    PyBuffer_Release(&val); PyBuffer_Release(&idx); PyBuffer_Release(&bp); PyBuffer_Release(&ord);
    PyBuffer_Release(&xw); PyBuffer_Release(&h); PyBuffer_Release(&y);
    return ret;
}
