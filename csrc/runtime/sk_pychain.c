/* The chain methods of sparsekit.runtime._kernels: chain_new (parse and validate the layer specs),
 * chain_plan, chain_run, fast_call (FastModel.run's fast path, with output recycling) and
 * chain_drop_outputs. */
#include "sk_glue.h"

/* fast_call recycles its outputs: it keeps a reference to the last two arrays it returned and hands
 * one out again once it is the only holder (Py_REFCNT 1: the caller, and any view or buffer export of
 * it, let go), which is what free + malloc of the same block would do, minus their cost (a fresh array,
 * the worker's output lines moving between the cores, page faults on large outputs). Two
 * because in `y = m.run(x)` the previous result is still bound while the next call runs. Outputs up to
 * SPARE_MAX_BYTES are kept, SPARE_TOTAL_BYTES over all chains. */
static int64_t g_spare_total = 0; /* GIL-protected */

static void spares_drop(chain_t *c) {
    for (int i = 0; i < 2; i++) {
        g_spare_total -= c->spare_bytes[i];
        c->spare_bytes[i] = 0;
        Py_CLEAR(c->spare[i]);
    }
}

static void chain_free(PyObject *cap) {
    chain_t *c = (chain_t *)PyCapsule_GetPointer(cap, "sparsekit.chain");
    if (!c) return;
    spares_drop(c);
    for (int i = 0; i < c->nbufs; i++) PyBuffer_Release(&c->bufs[i]);
    free(c->bufs);
    free(c->L);
    free(c->scratch_raw);
    free(c);
}

static int ch_get(chain_t *c, PyObject *o, int64_t need, const char *what, const void **out) {
    Py_buffer *b = &c->bufs[c->nbufs];
    if (PyObject_GetBuffer(o, b, PyBUF_C_CONTIGUOUS) < 0) return -1;
    c->nbufs++;
    if (check_len(b, need, what)) return -1;
    *out = b->buf;
    return 0;
}

/* chain_new's layers are objects with named fields (sparsekit.runtime.model.ChainLayer): kind, values,
 * indices, pointers, order, bias, idx_bytes, n_in, n_out, relu, threads (the thread cap), blocks, for
 * the window kind windows and window (the width), for the block kind rows_per_block */
#define CH_FIELDS 6

/* layer i's field `name` as an int in *out (a missing optional field leaves *out): 0, or -1 with a
 * TypeError naming the layer and field */
static int field_ll(PyObject *o, Py_ssize_t i, const char *name, int optional, long long *out) {
    PyObject *v = PyObject_GetAttrString(o, name);
    if (!v) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError)) return -1;
        PyErr_Clear();
        if (optional) return 0;
        PyErr_Format(PyExc_TypeError, "chain layer %zd: no field '%s'", i, name);
        return -1;
    }
    if (!PyLong_Check(v)) {
        PyErr_Format(PyExc_TypeError, "chain layer %zd: field '%s' must be an int, not %.100s", i, name,
                     Py_TYPE(v)->tp_name);
        Py_DECREF(v);
        return -1;
    }
    *out = PyLong_AsLongLong(v);
    Py_DECREF(v);
    return *out == -1 && PyErr_Occurred() ? -1 : 0;
}

/* layer i's int field `name` that must fit an int */
static int field_int(PyObject *o, Py_ssize_t i, const char *name, int *out) {
    long long v;
    if (field_ll(o, i, name, 0, &v) < 0) return -1;
    if (v < INT_MIN || v > INT_MAX) {
        PyErr_Format(PyExc_ValueError, "chain layer %zd: field '%s' out of range", i, name);
        return -1;
    }
    *out = (int)v;
    return 0;
}

/* layer i's array field `name` (or None) in *out, a new reference: 0, or -1 with a TypeError naming it */
static int field_obj(PyObject *o, Py_ssize_t i, const char *name, PyObject **out) {
    *out = PyObject_GetAttrString(o, name);
    if (*out) return 0;
    if (PyErr_ExceptionMatches(PyExc_AttributeError)) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "chain layer %zd: no field '%s'", i, name);
    }
    return -1;
}

/* The sliced layout of a rows or window layer (l->n_in, l->n_out, l->relu set), every part checked:
 * slice pointers from 0 by whole slots, buffer sizes, and what the kernels index with: the gather form's
 * row order and column indices; the window form's windows (within x: 0 <= win <= n_in - wide), 8-bit
 * in-window indices (< wide) and natural row order. 0, or -1 with an exception set. */
static int sliced_parse(chain_t *c, ch_layer_t *l, PyObject *vals, PyObject *idxs, PyObject *ptrs, PyObject *ord,
                        PyObject *bias_obj, PyObject *wins, int idx_bytes, long long wide) {
    sliced_t *w = &l->s;
    const int64_t n_in = l->n_in, n_out = l->n_out;
    const int window = l->kind == CH_WINDOW;
    const void *p;
    if (window ? idx_bytes != 1 || wide < 1 || wide > 256 || wide > n_in : idx_bytes != 2 && idx_bytes != 4) {
        PyErr_SetString(PyExc_ValueError, window ? "window layer: idx_bytes must be 1, the width in [1, min(256, n_in)]"
                                                 : "idx_bytes must be 2 or 4");
        return -1;
    }
    w->nsl = (n_out + SLICE - 1) / SLICE;
    if (ch_get(c, ptrs, smul(w->nsl + 1, 8), "slice pointers", &p)) return -1;
    w->slice_ptr = (const int64_t *)p;
    if (w->slice_ptr[0] != 0) { PyErr_SetString(PyExc_ValueError, "bad slice pointers"); return -1; }
    for (int64_t s = 0; s < w->nsl; s++)
        if (w->slice_ptr[s + 1] < w->slice_ptr[s] || (w->slice_ptr[s + 1] - w->slice_ptr[s]) % SLICE) {
            PyErr_SetString(PyExc_ValueError, "bad slice pointers");
            return -1;
        }
    const int64_t total = w->slice_ptr[w->nsl];
    if (ch_get(c, ord, smul(w->nsl * SLICE, 4), "row order", &p)) return -1;
    w->perm = (const int32_t *)p;
    for (int64_t r = 0; r < w->nsl * SLICE; r++)
        if (window ? w->perm[r] != (r < n_out ? r : -1) : w->perm[r] < -1 || w->perm[r] >= n_out) {
            PyErr_SetString(PyExc_ValueError, "bad row order");
            return -1;
        }
    if (ch_get(c, vals, smul(total, 4), "values", &p)) return -1;
    w->val = (const float *)p;
    if (ch_get(c, idxs, smul(total, idx_bytes), "indices", &p)) return -1;
    w->idx = p;
    w->idx16 = idx_bytes == 2;
    for (int64_t k = 0; k < total; k++) {
        const int64_t col = window ? (int64_t)((const uint8_t *)p)[k]
                                   : w->idx16 ? (int64_t)((const uint16_t *)p)[k] : (int64_t)((const int32_t *)p)[k];
        if (col < 0 || col >= (window ? wide : n_in > 0 ? n_in : 1)) {
            PyErr_SetString(PyExc_ValueError, "index out of range");
            return -1;
        }
    }
    w->win = NULL;
    w->wide = 0;
    if (window) {
        if (ch_get(c, wins, smul(total / SLICE, 4), "windows", &p)) return -1;
        w->win = (const int32_t *)p;
        w->wide = wide;
        for (int64_t k = 0; k < total / SLICE; k++)
            if (w->win[k] < 0 || w->win[k] > n_in - wide) { PyErr_SetString(PyExc_ValueError, "window out of range"); return -1; }
    }
    w->bias = NULL;
    if (bias_obj != Py_None) {
        if (ch_get(c, bias_obj, smul(w->nsl * SLICE, 4), "bias", &p)) return -1;
        w->bias = (const float *)p;
    }
    w->n_in = n_in;
    w->n_out = n_out;
    w->relu = l->relu;
    l->work = total;
    return 0;
}

PyObject *py_chain_new(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *specs, *in_shape = NULL;
    if (!PyArg_ParseTuple(args, "O!|O!", &PyList_Type, &specs, &PyTuple_Type, &in_shape)) return NULL;
    const Py_ssize_t n = PyList_GET_SIZE(specs);
    if (n < 1) { PyErr_SetString(PyExc_ValueError, "empty chain"); return NULL; }
    chain_t *c = (chain_t *)calloc(1, sizeof(chain_t));
    if (!c) return PyErr_NoMemory();
    c->L = (ch_layer_t *)calloc((size_t)n, sizeof(ch_layer_t));
    c->bufs = (Py_buffer *)calloc((size_t)n * CH_FIELDS, sizeof(Py_buffer));
    PyObject *cap = NULL, *fields[CH_FIELDS] = {NULL, NULL, NULL, NULL, NULL, NULL};
    if (!c->L || !c->bufs) { PyErr_NoMemory(); goto fail; }
    c->n = (int)n;
    for (Py_ssize_t i = 0; i < n; i++) {
        ch_layer_t *l = &c->L[i];
        PyObject *spec = PyList_GET_ITEM(specs, i);
        for (int k = 0; k < CH_FIELDS; k++) Py_CLEAR(fields[k]);
        int idx_bytes;
        long long n_in, n_out, nb = 1, wide = 0;
        if (field_int(spec, i, "kind", &l->kind) || field_obj(spec, i, "values", &fields[0]) ||
            field_obj(spec, i, "indices", &fields[1]) || field_obj(spec, i, "pointers", &fields[2]) ||
            field_obj(spec, i, "order", &fields[3]) || field_obj(spec, i, "bias", &fields[4]) ||
            field_int(spec, i, "idx_bytes", &idx_bytes) || field_ll(spec, i, "n_in", 0, &n_in) ||
            field_ll(spec, i, "n_out", 0, &n_out) || field_int(spec, i, "relu", &l->relu) ||
            field_int(spec, i, "threads", &l->cap) || field_ll(spec, i, "blocks", 1, &nb) ||
            (l->kind == CH_WINDOW && (field_obj(spec, i, "windows", &fields[5]) || field_ll(spec, i, "window", 0, &wide))))
            goto fail;
        PyObject *a = fields[0], *b = fields[1], *d = fields[2], *e = fields[3], *bias_obj = fields[4];
        if (CH_ON_PANELS(l->kind) != (i == 0 ? CH_ON_PANELS(l->kind) : c->panel)) {
            PyErr_SetString(PyExc_ValueError, "a chain is all panel layers or none (block layers run on panels too)");
            goto fail;
        }
        if (i == 0) {
            c->panel = CH_ON_PANELS(l->kind);
            c->pw = n_in;
        }
        if (n_out > c->pw) c->pw = n_out;
        if (!dims_ok(n_in, n_out)) goto fail;
        if (i > 0 && n_in != c->L[i - 1].n_out) { PyErr_SetString(PyExc_ValueError, "chain layer sizes differ"); goto fail; }
        l->n_in = n_in;
        l->n_out = n_out;
        l->relu = l->relu != 0;
        if (i + 1 < n && n_out > c->max_mid) c->max_mid = n_out;
        const void *p;
        if (l->kind == CH_ROWS || l->kind == CH_WINDOW) {
            if (sliced_parse(c, l, a, b, d, e, bias_obj, fields[5], idx_bytes, wide)) goto fail;
        } else if (l->kind == CH_GEMV) {
            if (ch_get(c, a, smul3(n_in, n_out, 4), "weight", &p)) goto fail;
            l->wt = (const float *)p;
            l->bias = NULL;
            if (bias_obj != Py_None) {
                if (ch_get(c, bias_obj, smul(n_out, 4), "bias", &p)) goto fail;
                l->bias = (const float *)p;
            }
        } else if (CH_ON_PANELS(l->kind)) {
            csr_t *w = &l->pw;
            if (idx_bytes != 2 && idx_bytes != 4) { PyErr_SetString(PyExc_ValueError, "idx_bytes must be 2 or 4"); goto fail; }
            if (nb < 1) { PyErr_SetString(PyExc_ValueError, "bad block count"); goto fail; }
            w->rb = 1;
            if (l->kind == CH_BLOCK) {
                long long rb = 0;
                if (field_ll(spec, i, "rows_per_block", 0, &rb)) goto fail;
                if ((rb != 2 && rb != 4 && rb != 8 && rb != 16) || n_out % rb != 0 || e != Py_None) {
                    PyErr_SetString(PyExc_ValueError,
                                    "block layer: rows_per_block must be 2, 4, 8 or 16 and divide n_out, order None");
                    goto fail;
                }
                w->rb = (int)rb;
            }
            const int64_t npos = n_out / w->rb; /* block pointers per column block */
            if (nb > SK_MAX_DIM || ch_get(c, d, smul(smul(nb, npos) + 1, 8), "block pointers", &p)) {
                if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "bad block count");
                goto fail;
            }
            l->bp = (const int64_t *)p;
            const int64_t nnz = l->bp[nb * npos];
            if (l->bp[0] != 0 || nnz < 0) { PyErr_SetString(PyExc_ValueError, "bad block pointers"); goto fail; }
            for (int64_t r = 0; r < nb * npos; r++)
                if (l->bp[r + 1] < l->bp[r]) { PyErr_SetString(PyExc_ValueError, "bad block pointers"); goto fail; }
            l->ord = NULL;
            if (e != Py_None) {
                if (ch_get(c, e, smul3(nb, n_out, 4), "row order", &p)) goto fail;
                l->ord = (const int32_t *)p;
                for (int64_t r = 0; r < nb * n_out; r++)
                    if (l->ord[r] < 0 || l->ord[r] >= n_out) { PyErr_SetString(PyExc_ValueError, "bad row order"); goto fail; }
            }
            if (ch_get(c, a, smul(smul(nnz, w->rb) + PAD_SLACK, 4), "values", &p)) goto fail;
            w->val = (const float *)p;
            if (ch_get(c, b, smul(nnz + PAD_SLACK, idx_bytes), "indices", &p)) goto fail;
            w->idx = p;
            w->idx16 = idx_bytes == 2;
            for (int64_t k = 0; k < nnz; k++)
                if (idx_at(w, k) < 0 || idx_at(w, k) >= n_in) { PyErr_SetString(PyExc_ValueError, "index out of range"); goto fail; }
            w->bias = NULL;
            if (bias_obj != Py_None) {
                if (ch_get(c, bias_obj, smul(n_out, 4), "bias", &p)) goto fail;
                w->bias = (const float *)p;
            }
            w->rowptr = l->bp;
            w->n_in = n_in;
            w->n_out = n_out;
            w->relu = l->relu;
            l->nb = nb;
            l->work = nnz * w->rb;
            if (w->rb == 1) w->rb = 0;
        } else {
            PyErr_SetString(PyExc_ValueError, "chain layer kind must be 0 (rows), 1 (gemv), 2 (panel), 3 (window) or 4 (block)");
            goto fail;
        }
    }
    if (in_shape) {
        const Py_ssize_t nd = PyTuple_GET_SIZE(in_shape);
        int64_t prod = 1;
        for (Py_ssize_t k = 0; k < nd && k < 8; k++) {
            const long long d = PyLong_AsLongLong(PyTuple_GET_ITEM(in_shape, k));
            if (d == -1 && PyErr_Occurred()) goto fail;
            c->in_shape[k] = d;
            prod *= d;
        }
        if (nd > 8 || prod != c->L[0].n_in) {
            PyErr_SetString(PyExc_ValueError, "chain_new: input shape must have at most 8 dims, n_in elements");
            goto fail;
        }
        c->in_ndim = (int)nd;
    }
    for (int k = 0; k < CH_FIELDS; k++) Py_CLEAR(fields[k]);
    cap = PyCapsule_New(c, "sparsekit.chain", chain_free);
    if (!cap) goto fail;
    return cap;
fail:
    for (int k = 0; k < CH_FIELDS; k++) Py_CLEAR(fields[k]);
    for (int i = 0; i < c->nbufs; i++) PyBuffer_Release(&c->bufs[i]);
    free(c->bufs);
    free(c->L);
    free(c);
    return NULL;
}

/* o's buffer (C-contiguous, with its format) in *x: 1; 0 and no buffer held where o has none of that kind
 * (the caller converts it and retries); -1 with an exception set on other errors */
static int get_x(PyObject *o, Py_buffer *x) {
    if (PyObject_GetBuffer(o, x, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
        if (!PyErr_ExceptionMatches(PyExc_BufferError) && !PyErr_ExceptionMatches(PyExc_ValueError) &&
            !PyErr_ExceptionMatches(PyExc_TypeError)) /* TypeError: no buffer at all (a list) */
            return -1;
        PyErr_Clear();
        return 0;
    }
    return 1;
}

/* x is a float32 (batch, n_in) or (batch, *input shape) buffer for chain c, n_in > 0 (C-contiguous, so
 * laid out as (batch, n_in) either way) */
static int x_fits(const chain_t *c, const Py_buffer *x) {
    const int64_t n_in = c->L[0].n_in;
    if (x->itemsize != 4 || !x->format || strcmp(x->format, "f") != 0 || n_in == 0 || x->ndim < 2) return 0;
    if (x->ndim == 2 && x->shape[1] == n_in) return 1;
    if (x->ndim != c->in_ndim + 1) return 0;
    for (int k = 0; k < c->in_ndim; k++)
        if (x->shape[k + 1] != c->in_shape[k]) return 0;
    return 1;
}

/* get_x and x_fits: 1 with the buffer held, 0 (none held) or -1 */
static int chain_x(const chain_t *c, PyObject *o, Py_buffer *x) {
    const int got = get_x(o, x);
    if (got <= 0) return got;
    if (!x_fits(c, x)) {
        PyBuffer_Release(x);
        return 0;
    }
    return 1;
}

static int parse_threads(PyObject *o, int *threads) {
    const long t = PyLong_AsLong(o);
    if (t == -1 && PyErr_Occurred()) return -1;
    *threads = t < 1 ? 1 : t > 1024 ? 1024 : (int)t;
    return 0;
}

PyObject *py_chain_plan(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *cap;
    long long B;
    int threads;
    if (!PyArg_ParseTuple(args, "OLi", &cap, &B, &threads)) return NULL;
    chain_t *c = (chain_t *)PyCapsule_GetPointer(cap, "sparsekit.chain");
    if (!c) return NULL;
    if (B < 0) { PyErr_SetString(PyExc_ValueError, "chain_plan: negative batch"); return NULL; }
    pplan_t pl;
    if (chain_plan(c, B, threads, &pl) == 0) Py_RETURN_NONE;
    return Py_BuildValue("{s:i,s:i,s:O,s:L}", "threads", pl.nt, "lanes", pl.lanes, "rows_split",
                         pl.rows ? Py_True : Py_False, "units", (long long)pl.units);
}

PyObject *py_chain_run(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 4) { PyErr_SetString(PyExc_TypeError, "chain_run(chain, x, y, threads)"); return NULL; }
    chain_t *c = (chain_t *)PyCapsule_GetPointer(args[0], "sparsekit.chain");
    int threads;
    if (!c || parse_threads(args[3], &threads) < 0) return NULL;
    Py_buffer x, y;
    const int got = chain_x(c, args[1], &x);
    if (got <= 0) {
        if (got < 0) return NULL;
        Py_RETURN_FALSE;
    }
    if (PyObject_GetBuffer(args[2], &y, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&x);
        return NULL;
    }
    PyObject *ret = NULL;
    const int64_t B = x.shape[0];
    pplan_t pl;
    if ((int64_t)y.len != B * c->L[c->n - 1].n_out * 4) {
        PyErr_SetString(PyExc_ValueError, "chain_run: y must hold (batch, n_out) float32");
    } else if (chain_plan(c, B, threads, &pl) == 0) {
        ret = Py_False;
        Py_INCREF(ret);
    } else if (chain_exec(c, (const float *)x.buf, B, (float *)y.buf, threads, &pl) > 0) {
        ret = Py_True;
        Py_INCREF(ret);
    }
    PyBuffer_Release(&x);
    PyBuffer_Release(&y);
    return ret;
}

/* o is a writable C-contiguous float32 (B, n) array: its data, else NULL (no exception) */
static float *out_data(PyObject *o, int64_t B, int64_t n) {
    Py_buffer b;
    if (PyObject_GetBuffer(o, &b, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE | PyBUF_FORMAT) < 0) {
        PyErr_Clear();
        return NULL;
    }
    float *p = NULL;
    if (b.ndim == 2 && b.shape[0] == B && b.shape[1] == n && b.itemsize == 4 && b.format &&
        strcmp(b.format, "f") == 0)
        p = (float *)b.buf;
    PyBuffer_Release(&b); /* the array itself keeps the data alive: the caller holds a reference */
    return p;
}

/* the output for a B-sample call: a recycled one (see SPARE_MAX_BYTES) or a new one from alloc();
 * a new reference and its data in *data, or NULL with an exception set */
static PyObject *out_take(chain_t *c, PyObject *alloc, int64_t B, float **data) {
    const int64_t n = c->L[c->n - 1].n_out;
    for (int k = 0; k < 2; k++) {
        const int i = (c->spare_next + k) & 1;
        PyObject *s = c->spare[i];
        if (s && Py_REFCNT(s) == 1 && (*data = out_data(s, B, n)) != NULL) {
            c->spare_next = i ^ 1;
            Py_INCREF(s);
            return s;
        }
    }
    PyObject *y = PyObject_CallNoArgs(alloc);
    if (!y) return NULL;
    if (!(*data = out_data(y, B, n))) {
        Py_DECREF(y);
        PyErr_SetString(PyExc_ValueError, "fast_call: alloc() must return a writable (batch, n_out) float32 array");
        return NULL;
    }
    const int64_t bytes = B * n * 4;
    const int i = c->spare_next;
    g_spare_total -= c->spare_bytes[i];
    c->spare_bytes[i] = 0;
    Py_CLEAR(c->spare[i]);
    if (bytes <= SPARE_MAX_BYTES && g_spare_total + bytes <= SPARE_TOTAL_BYTES) {
        Py_INCREF(y);
        c->spare[i] = y;
        c->spare_bytes[i] = bytes;
        g_spare_total += bytes;
    }
    c->spare_next = i ^ 1;
    return y;
}

/* chain c on x (a fitting buffer, held by the caller) into an output from out_take: a new reference,
 * Py_False (a new reference) where the chain declines this batch, or NULL with an exception set */
static PyObject *chain_call_x(chain_t *c, const Py_buffer *x, int threads, PyObject *alloc) {
    const int64_t B = x->shape[0];
    pplan_t pl;
    if (chain_plan(c, B, threads, &pl) == 0) Py_RETURN_FALSE;
    float *yd;
    PyObject *y = out_take(c, alloc, B, &yd);
    if (y && chain_exec(c, (const float *)x->buf, B, yd, threads, &pl) < 0) Py_CLEAR(y);
    return y;
}

/* fast_call(table, x, threads): FastModel.run's fast path in one call. table, the model's chain cache,
 * maps a batch size to (chain, alloc) (the model drops its entries when a layer's plan changes); when x
 * is a C-contiguous float32 (batch, n_in) or (batch, *input shape) array whose batch size has an entry
 * and the chain takes this batch, runs the chain into an output from out_take (recycled, or alloc())
 * and returns it; else None (nothing run). */
PyObject *py_fast_call(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 3 || !PyDict_CheckExact(args[0])) {
        PyErr_SetString(PyExc_TypeError, "fast_call(table: dict, x, threads)");
        return NULL;
    }
    int threads;
    if (parse_threads(args[2], &threads) < 0) return NULL;
    Py_buffer x;
    const int got = get_x(args[1], &x);
    if (got <= 0) {
        if (got < 0) return NULL;
        Py_RETURN_NONE;
    }
    PyObject *ret = NULL, *hit = NULL;
    if (x.ndim < 2) goto none;
    PyObject *key = PyLong_FromSsize_t(x.shape[0]);
    if (!key) goto done;
    hit = PyDict_GetItemWithError(args[0], key);
    Py_DECREF(key);
    if (!hit) {
        if (PyErr_Occurred()) goto done;
        goto none;
    }
    Py_INCREF(hit); /* another thread may replace the entry while this one computes with the GIL released */
    if (!PyTuple_CheckExact(hit) || PyTuple_GET_SIZE(hit) != 2) {
        PyErr_SetString(PyExc_TypeError, "fast_call: table values must be (chain, alloc)");
        goto done;
    }
    chain_t *c = (chain_t *)PyCapsule_GetPointer(PyTuple_GET_ITEM(hit, 0), "sparsekit.chain");
    if (!c) goto done;
    if (!x_fits(c, &x)) goto none;
    ret = chain_call_x(c, &x, threads, PyTuple_GET_ITEM(hit, 1));
    if (ret == Py_False) {
        Py_DECREF(ret);
        goto none;
    }
    goto done;
none:
    ret = Py_None;
    Py_INCREF(ret);
done:
    Py_XDECREF(hit);
    PyBuffer_Release(&x);
    return ret;
}

PyObject *py_chain_drop_outputs(PyObject *self, PyObject *cap) {
    (void)self;
    chain_t *c = (chain_t *)PyCapsule_GetPointer(cap, "sparsekit.chain");
    if (!c) return NULL;
    spares_drop(c);
    Py_RETURN_NONE;
}
