/* sparsekit.runtime._kernels, the CPython module: argument parsing and size checks for the single-layer
 * kernels (rows, gemv, panel, the transposes), the code path (isa, set_isa, SPARSEKIT_ISA), the
 * threading settings, and the method table (the chain methods are in sk_pychain.c). */
#include "sk_glue.h"

#include <math.h>

int dims_ok(int64_t n_in, int64_t n_out) {
    if (n_in < 0 || n_out < 0 || n_in > SK_MAX_DIM || n_out > SK_MAX_DIM) {
        PyErr_Format(PyExc_ValueError, "layer shape %lldx%lld outside [0, 2^31 - 1]", (long long)n_out,
                     (long long)n_in);
        return 0;
    }
    return 1;
}

int check_len(const Py_buffer *b, int64_t need, const char *what) {
    if ((int64_t)b->len < need) {
        PyErr_Format(PyExc_ValueError, "%s buffer too small: %zd bytes, need %lld", what, b->len,
                     (long long)need);
        return -1;
    }
    return 0;
}

static int make_csr(csr_t *w, Py_buffer *val, Py_buffer *idx, Py_buffer *rowptr, PyObject *bias_obj,
                    Py_buffer *bias, int idx_bytes, int64_t n_in, int64_t n_out, int relu) {
    if (idx_bytes != 2 && idx_bytes != 4) { PyErr_SetString(PyExc_ValueError, "idx_bytes must be 2 or 4"); return -1; }
    /* n_out may be the row count of several column blocks (py_panel): only n_in indexes with int32 */
    if (!dims_ok(n_in, 0) || n_out < 0) { if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "negative shape"); return -1; }
    if (check_len(rowptr, smul(n_out + 1, 8), "rowptr")) return -1;
    const int64_t *rp = (const int64_t *)rowptr->buf;
    const int64_t nnz = rp[n_out];
    if (rp[0] != 0 || nnz < 0) { PyErr_SetString(PyExc_ValueError, "bad rowptr"); return -1; }
    if (check_len(val, smul(nnz + PAD_SLACK, 4), "values")) return -1;
    if (check_len(idx, smul(nnz + PAD_SLACK, idx_bytes), "indices")) return -1;
    w->val = (const float *)val->buf;
    w->idx = idx->buf;
    w->idx16 = idx_bytes == 2;
    w->rowptr = rp;
    w->bias = NULL;
    if (bias_obj != Py_None) {
        if (check_len(bias, smul(n_out, 4), "bias")) return -1;
        w->bias = (const float *)bias->buf;
    }
    w->n_in = n_in;
    w->n_out = n_out;
    w->relu = relu != 0;
    w->rb = 0;
    w->direct = 0;
    return 0;
}

static PyObject *py_rows(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer val, idx, slice_ptr, perm, x, y, bias = {0}, wins = {0};
    PyObject *bias_obj, *wins_obj = Py_None;
    int idx_bytes, relu, threads;
    long long n_in, n_out, B, wide = 0;
    if (!PyArg_ParseTuple(args, "y*y*y*y*Oy*w*iLLLii|OL", &val, &idx, &slice_ptr, &perm, &bias_obj, &x, &y,
                          &idx_bytes, &n_in, &n_out, &B, &relu, &threads, &wins_obj, &wide))
        return NULL;
    int have_bias = 0, have_wins = 0;
    PyObject *ret = NULL;
    sliced_t w = {0};
    if (bias_obj != Py_None) {
        if (PyObject_GetBuffer(bias_obj, &bias, PyBUF_C_CONTIGUOUS) < 0) goto done;
        have_bias = 1;
    }
    if (wins_obj != Py_None) {
        if (PyObject_GetBuffer(wins_obj, &wins, PyBUF_C_CONTIGUOUS) < 0) goto done;
        have_wins = 1;
    }
    if (have_wins ? idx_bytes != 1 || wide < 1 || wide > 256 || wide > n_in : idx_bytes != 2 && idx_bytes != 4) {
        PyErr_SetString(PyExc_ValueError, "idx_bytes must be 2 or 4 (gather form) or 1 with a window width in "
                                          "[1, min(256, n_in)] (window form)");
        goto done;
    }
    if (!dims_ok(n_in, n_out)) goto done;
    if (B < 0) { PyErr_SetString(PyExc_ValueError, "negative batch"); goto done; }
    w.nsl = (n_out + SLICE - 1) / SLICE;
    if (check_len(&slice_ptr, smul(w.nsl + 1, 8), "slice pointers") || check_len(&perm, smul(w.nsl * SLICE, 4), "row order"))
        goto done;
    w.slice_ptr = (const int64_t *)slice_ptr.buf;
    if (w.slice_ptr[0] != 0) { PyErr_SetString(PyExc_ValueError, "bad slice pointers"); goto done; }
    for (int64_t s = 0; s < w.nsl; s++)
        if (w.slice_ptr[s + 1] < w.slice_ptr[s] || (w.slice_ptr[s + 1] - w.slice_ptr[s]) % SLICE) {
            PyErr_SetString(PyExc_ValueError, "bad slice pointers");
            goto done;
        }
    if (check_len(&val, smul(w.slice_ptr[w.nsl], 4), "values") || check_len(&idx, smul(w.slice_ptr[w.nsl], idx_bytes), "indices") ||
        (have_bias && check_len(&bias, smul(w.nsl * SLICE, 4), "bias")) || check_len(&x, smul3(B, n_in, 4), "x") ||
        check_len(&y, smul3(B, n_out, 4), "y") ||
        (have_wins && check_len(&wins, smul(w.slice_ptr[w.nsl] / SLICE, 4), "windows")))
        goto done;
    if (have_wins) {
        w.win = (const int32_t *)wins.buf;
        w.wide = wide;
    }
    w.val = (const float *)val.buf;
    w.idx = idx.buf;
    w.idx16 = idx_bytes == 2;
    w.perm = (const int32_t *)perm.buf;
    w.bias = have_bias ? (const float *)bias.buf : NULL;
    w.n_in = n_in;
    w.n_out = n_out;
    w.relu = relu != 0;
    {
        const rows_fn fn = pick_sliced(&w);
        const float *xp = (const float *)x.buf;
        float *yp = (float *)y.buf;
        int nt = clamp_threads(threads < 0 ? -threads : threads);
        if (threads > 0) nt = rows_threads(nt, w.slice_ptr[w.nsl] * (B > 0 ? B : 1));
        Py_BEGIN_ALLOW_THREADS
        if (nt <= 1) {
            if (w.nsl > 0) fn(&w, xp, yp, B, 0, w.nsl);
        } else {
            rows_job_t job = {fn, &w, xp, yp, B, (int64_t)nt * CHUNKS_PER_THREAD};
            par_run(nt, job.nch, rows_item, &job);
        }
        Py_END_ALLOW_THREADS
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    if (have_bias) PyBuffer_Release(&bias);
    if (have_wins) PyBuffer_Release(&wins);
    PyBuffer_Release(&val); PyBuffer_Release(&idx); PyBuffer_Release(&slice_ptr); PyBuffer_Release(&perm);
    PyBuffer_Release(&x); PyBuffer_Release(&y);
    return ret;
}

static PyObject *py_gemv(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer wt, x, y, bias = {0};
    PyObject *bias_obj;
    int relu, threads;
    long long n_in, n_out, B;
    if (!PyArg_ParseTuple(args, "y*Oy*w*LLLii", &wt, &bias_obj, &x, &y, &n_in, &n_out, &B, &relu, &threads))
        return NULL;
    int have_bias = 0;
    PyObject *ret = NULL;
    if (bias_obj != Py_None) {
        if (PyObject_GetBuffer(bias_obj, &bias, PyBUF_C_CONTIGUOUS) < 0) goto done;
        have_bias = 1;
    }
    if (!dims_ok(n_in, n_out)) goto done;
    if (B < 0) { PyErr_SetString(PyExc_ValueError, "negative batch"); goto done; }
    if (check_len(&wt, smul3(n_in, n_out, 4), "weight") || check_len(&x, smul3(B, n_in, 4), "x") ||
        check_len(&y, smul3(B, n_out, 4), "y") || (have_bias && check_len(&bias, smul(n_out, 4), "bias")))
        goto done;
    {
        const gemv_fn fn = pick_gemv();
        const float *w = (const float *)wt.buf, *bp = have_bias ? (const float *)bias.buf : NULL;
        const float *xp = (const float *)x.buf;
        float *yp = (float *)y.buf;
        int nt = clamp_threads(threads < 0 ? -threads : threads);
        if (threads > 0 && n_in * n_out * B < 4 * PAR_MIN_WORK) nt = 1;
        Py_BEGIN_ALLOW_THREADS
        if (nt <= 1) {
            fn(w, bp, xp, yp, n_in, n_out, 0, B, relu != 0);
        } else {
            gemv_job_t job = {fn, w, bp, xp, yp, n_in, n_out, relu != 0};
            par_run(nt, B, gemv_item, &job);
        }
        Py_END_ALLOW_THREADS
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    if (have_bias) PyBuffer_Release(&bias);
    PyBuffer_Release(&wt); PyBuffer_Release(&x); PyBuffer_Release(&y);
    return ret;
}

/* depthwise(x, weight, bias|None, y, batch, (c, h, w, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo), lo, hi, threads):
 * dense depthwise convolution, weight (c, kh, kw), output clamped to [lo, hi] */
static PyObject *py_depthwise(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer x, wt, y, bias = {0};
    PyObject *bias_obj;
    long long B;
    double lo, hi;
    int threads, have_bias = 0;
    conv_t g;
    if (!PyArg_ParseTuple(args, "y*y*Ow*L(LLLLLLLLLLLLL)ddi", &x, &wt, &bias_obj, &y, &B, &g.c, &g.h, &g.w, &g.kh,
                          &g.kw, &g.sh, &g.sw, &g.ph, &g.pw, &g.dh, &g.dw, &g.ho, &g.wo, &lo, &hi, &threads))
        return NULL;
    PyObject *ret = NULL;
    if (bias_obj != Py_None) {
        if (PyObject_GetBuffer(bias_obj, &bias, PyBUF_C_CONTIGUOUS) < 0) goto done;
        have_bias = 1;
    }
    if (g.c < 1 || g.h < 1 || g.w < 1 || g.kh < 1 || g.kw < 1 || g.sh < 1 || g.sw < 1 || g.dh < 1 || g.dw < 1 ||
        g.ph < 0 || g.pw < 0 || g.ho < 1 || g.wo < 1 || B < 0 || g.kh > 64 || g.kw > 64 || g.sh > 64 ||
        g.sw > 64 || g.dh > 64 || g.dw > 64 || g.ph > 64 || g.pw > 64 || smul(g.ho, g.wo) > SK_MAX_DIM ||
        smul3(g.c, g.h, g.w) > SK_MAX_DIM ||
        smul3(g.sw, smul(g.ho, g.sh) + g.kh * g.dh, g.wo + g.kw * g.dw) > SK_MAX_DIM) {  /* a thread's scratch */
        PyErr_SetString(PyExc_ValueError, "bad depthwise convolution geometry");
        goto done;
    }
    if (check_len(&x, smul(smul(B, smul3(g.c, g.h, g.w)), 4), "x") ||
        check_len(&wt, smul(smul3(g.c, g.kh, g.kw), 4), "weight") ||
        check_len(&y, smul(smul3(B, g.c, smul(g.ho, g.wo)), 4), "y") ||
        (have_bias && check_len(&bias, smul(g.c, 4), "bias")))
        goto done;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = depthwise(&g, B, (const float *)x.buf, (const float *)wt.buf, have_bias ? (const float *)bias.buf : NULL,
                   (float)lo, (float)hi, (float *)y.buf, threads < 0 ? -threads : threads);
    Py_END_ALLOW_THREADS
    if (rc) {
        PyErr_NoMemory();
        goto done;
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    if (have_bias) PyBuffer_Release(&bias);
    PyBuffer_Release(&x); PyBuffer_Release(&wt); PyBuffer_Release(&y);
    return ret;
}

static PyObject *py_panel(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer val, idx, bptr, x = {0}, y, bias = {0}, yr = {0}, ordb = {0}, xrb = {0};
    PyObject *bias_obj, *x_obj, *yr_obj = Py_None, *ord_obj = Py_None, *xr_obj = Py_None;
    int idx_bytes, relu, threads;
    long long n_in, n_out, P, nb, batch = 0, rb = 1;
    if (!PyArg_ParseTuple(args, "y*y*y*OOw*iLLLLii|OLOOL", &val, &idx, &bptr, &bias_obj, &x_obj, &y, &idx_bytes,
                          &n_in, &n_out, &P, &nb, &relu, &threads, &yr_obj, &batch, &ord_obj, &xr_obj, &rb))
        return NULL;
    int have_bias = 0, have_yr = 0, have_ord = 0, have_x = 0, have_xr = 0;
    PyObject *ret = NULL;
    csr_t w;
    if (PyObject_GetBuffer(x_obj, &x, PyBUF_C_CONTIGUOUS | (xr_obj != Py_None ? PyBUF_WRITABLE : 0)) < 0) goto done;
    have_x = 1;
    if (yr_obj != Py_None || xr_obj != Py_None) {
        if (batch < 0 || batch > P * PANEL || batch <= (P - 1) * PANEL) {
            PyErr_SetString(PyExc_ValueError, "batch does not match the panel count");
            goto done;
        }
    }
    if (xr_obj != Py_None) {
        if (PyObject_GetBuffer(xr_obj, &xrb, PyBUF_C_CONTIGUOUS) < 0) goto done;
        have_xr = 1;
        if (check_len(&xrb, smul3(batch, n_in, 4), "x (row-major)")) goto done;
    }
    if (yr_obj != Py_None) {
        if (PyObject_GetBuffer(yr_obj, &yr, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) goto done;
        have_yr = 1;
        if (check_len(&yr, smul3(batch, n_out, 4), "y (row-major)")) goto done;
    }
    if (bias_obj != Py_None) {
        if (PyObject_GetBuffer(bias_obj, &bias, PyBUF_C_CONTIGUOUS) < 0) goto done;
        have_bias = 1;
    }
    if (!dims_ok(n_in, n_out)) goto done;
    if (nb < 1 || nb > SK_MAX_DIM || P < 0) { PyErr_SetString(PyExc_ValueError, "bad block/panel count"); goto done; }
    if ((rb != 1 && rb != 2 && rb != 4 && rb != 8 && rb != 16) || n_out % rb || (rb > 1 && ord_obj != Py_None)) {
        PyErr_SetString(PyExc_ValueError, "rows per block must be 1, 2, 4, 8 or 16 and divide n_out (no row order)");
        goto done;
    }
    const int64_t npos = n_out / rb; /* block pointers per column block */
    if (check_len(&bptr, smul(smul(nb, npos) + 1, 8), "block pointers")) goto done;
    if (ord_obj != Py_None) {
        if (PyObject_GetBuffer(ord_obj, &ordb, PyBUF_C_CONTIGUOUS) < 0) goto done;
        have_ord = 1;
        if (ordb.itemsize != 4 || check_len(&ordb, smul3(nb, n_out, 4), "row order")) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "row order must be int32");
            goto done;
        }
    }
    /* validate the total through make_csr on a view that treats all blocks as one long CSR (a row-block
     * layout's entries hold rb values each) */
    if (make_csr(&w, &val, &idx, &bptr, Py_None, &bias, idx_bytes, n_in, nb * npos, relu)) goto done;
    if (check_len(&val, smul(smul(w.rowptr[nb * npos], rb) + PAD_SLACK, 4), "values")) goto done;
    w.n_out = n_out;
    w.rb = rb > 1 ? (int)rb : 0;
    if (have_bias) {
        if (check_len(&bias, smul(n_out, 4), "bias")) goto done;
        w.bias = (const float *)bias.buf;
    }
    if (check_len(&x, smul3(P, n_in, PANEL * 4), "x") || check_len(&y, smul3(P, n_out, PANEL * 4), "y")) goto done;
    {
        const int64_t *bp = w.rowptr;
        int nt = clamp_threads(threads < 0 ? -threads : threads);
        const int64_t work = bp[nb * npos] * rb * P * PANEL;
        if (threads > 0 && work < sk_settings.panel_par_min) nt = 1;
        int64_t nparts = nt;
        int64_t bounds_local[POOL_MAX + 1];
        panel_job_t job = {pick_panel_for(&w), w, bp, have_ord ? (const int32_t *)ordb.buf : NULL, nb, P, 1, bounds_local,
                           (const float *)x.buf, (float *)y.buf, have_yr ? (float *)yr.buf : NULL, batch,
                           have_xr ? (const float *)xrb.buf : NULL};
        const int split_panels = nt > 1 && P >= nt && (sk_settings.panel_split == 2 || (sk_settings.panel_split == 0 && P % nt == 0));
        if (threads > 0 && !split_panels && work < (sk_settings.panel_par_min << ROW_SPLIT_SHIFT)) nt = 1;
        if (nt > 1 && !split_panels && panel_bounds(bp, nb, w.n_out, (int)rb, nparts, bounds_local)) {
            PyErr_NoMemory();
            goto done;
        }
        if (nt <= 1 || split_panels) { bounds_local[0] = 0; bounds_local[1] = w.n_out; nparts = 1; }
        job.nparts = nparts;
        Py_BEGIN_ALLOW_THREADS
        if (nt <= 1) {
            for (int64_t p = 0; p < P; p++) panel_whole(&job, p, 0);
        } else if (split_panels) {
            /* thread t owns panels [P t/nt, P (t+1)/nt): their transposes, all rows, their outputs */
            par_run(nt, P, panel_whole, &job);
        } else {
            if (job.xr) par_run(nt, P, panel_transpose_item, &job);
            /* items part-major: thread t owns row range t of every panel (its weights stay in its cache) */
            par_run(nt, nparts * P, panel_item, &job);
        }
        Py_END_ALLOW_THREADS
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    if (have_bias) PyBuffer_Release(&bias);
    if (have_yr) PyBuffer_Release(&yr);
    if (have_ord) PyBuffer_Release(&ordb);
    if (have_xr) PyBuffer_Release(&xrb);
    if (have_x) PyBuffer_Release(&x);
    PyBuffer_Release(&val); PyBuffer_Release(&idx); PyBuffer_Release(&bptr);
    PyBuffer_Release(&y);
    return ret;
}

static PyObject *py_transpose(PyObject *args, int to) {
    Py_buffer a, b;
    long long B, n;
    int threads;
    if (!PyArg_ParseTuple(args, "y*w*LLi", &a, &b, &B, &n, &threads)) return NULL;
    PyObject *ret = NULL;
    const int64_t P = (B + PANEL - 1) / PANEL;
    if (B < 0 || n < 0) { PyErr_SetString(PyExc_ValueError, "negative shape"); goto done; }
    if (to ? (check_len(&a, smul3(B, n, 4), "x") || check_len(&b, smul3(P, n, PANEL * 4), "panels"))
           : (check_len(&a, smul3(P, n, PANEL * 4), "panels") || check_len(&b, smul3(B, n, 4), "y")))
        goto done;
    {
        const float *src = (const float *)a.buf;
        float *dst = (float *)b.buf;
        int nt = clamp_threads(threads < 0 ? -threads : threads);
        if (threads > 0 && B * n < 4 * PAR_MIN_WORK) nt = 1;  /* 8 MB and up */
        Py_BEGIN_ALLOW_THREADS
        if (nt <= 1) {
            if (to) to_panels_range(src, dst, B, n, 0, P);
            else from_panels_range(src, dst, B, n, 0, P);
        } else {
            tr_job_t job = {src, dst, B, n, to};
            par_run(nt, P, tr_item, &job);
        }
        Py_END_ALLOW_THREADS
        (void)nt;
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    PyBuffer_Release(&a);
    PyBuffer_Release(&b);
    return ret;
}

static PyObject *py_to_panels(PyObject *self, PyObject *args) { (void)self; return py_transpose(args, 1); }
static PyObject *py_from_panels(PyObject *self, PyObject *args) { (void)self; return py_transpose(args, 0); }

static const char *isa_name(int isa) {
    return isa == ISA_AVX512 ? "avx512" : isa == ISA_AVX2 ? "avx2" : "generic";
}

static PyObject *py_isa(PyObject *self, PyObject *noargs) {
    (void)self; (void)noargs;
    return PyUnicode_FromString(isa_name(g_isa));
}

/* address(buffer): where its data starts (aligned_empty's offset; numpy's .ctypes.data took 1 us) */
static PyObject *py_address(PyObject *self, PyObject *arg) {
    (void)self;
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0) return NULL;
    PyObject *r = PyLong_FromVoidPtr(b.buf);
    PyBuffer_Release(&b);
    return r;
}

static PyObject *py_available_isas(PyObject *self, PyObject *noargs) {
    (void)self; (void)noargs;
    PyObject *l = PyList_New(0);
    if (!l) return NULL;
    for (int i = ISA_GENERIC; i <= g_isa_max; i++) {
        PyObject *s = PyUnicode_FromString(isa_name(i));
        if (!s || PyList_Append(l, s) < 0) { Py_XDECREF(s); Py_DECREF(l); return NULL; }
        Py_DECREF(s);
    }
    return l;
}

/* The code path a name selects ("best": the CPU's best), -1 for an unknown name. */
static int isa_by_name(const char *name) {
    return !strcmp(name, "avx512") ? ISA_AVX512 : !strcmp(name, "avx2") ? ISA_AVX2
         : !strcmp(name, "generic") ? ISA_GENERIC : !strcmp(name, "best") ? g_isa_max : -1;
}

/* The starting code path: SPARSEKIT_ISA (generic, avx2, avx512 or best) when set, else the best. A
 * value that is unknown or names a path this CPU lacks fails the import with one line (ImportError;
 * sparsekit.runtime turns it into an input error) rather than running another path than asked. */
static int isa_from_env(void) {
    const char *e = getenv("SPARSEKIT_ISA");
    if (!e || !*e) return g_isa_max;
    const int want = isa_by_name(e);
    if (want >= 0 && want <= g_isa_max) return want;
    char have[32] = "generic";
    for (int i = ISA_AVX2; i <= g_isa_max; i++) {
        strcat(have, ", ");
        strcat(have, isa_name(i));
    }
    PyErr_Format(PyExc_ImportError, "SPARSEKIT_ISA=%.40s %s (this CPU runs: %s, or best)", e,
                 want < 0 ? "is not a code path of sparsekit's kernels" : "names a code path this CPU lacks", have);
    return -1;
}

static PyObject *py_set_isa(PyObject *self, PyObject *args) {
    (void)self;
    const char *name;
    if (!PyArg_ParseTuple(args, "s", &name)) return NULL;
    const int want = isa_by_name(name);
    if (want < 0) { PyErr_Format(PyExc_ValueError, "unknown isa %s", name); return NULL; }
    if (want > g_isa_max) {
        PyErr_Format(PyExc_ValueError, "this CPU does not support %s (best: %s)", name, isa_name(g_isa_max));
        return NULL;
    }
    g_isa = want;
    Py_RETURN_NONE;
}

static PyObject *py_max_threads(PyObject *self, PyObject *noargs) {
    (void)self; (void)noargs;
    return PyLong_FromLong(max_procs());
}

static PyObject *py_rows_threads(PyObject *self, PyObject *args) {
    (void)self;
    int threads;
    long long work;
    if (!PyArg_ParseTuple(args, "iL", &threads, &work)) return NULL;
    return PyLong_FromLong(rows_threads(clamp_threads(threads), work));
}

static PyObject *py_set_threading(PyObject *self, PyObject *args) {
    (void)self;
    long long spin_us = -1, rows_min = -1, panel_min = -1;
    int split = -1;
    if (!PyArg_ParseTuple(args, "|LLLi", &spin_us, &rows_min, &panel_min, &split)) return NULL;
    if (split >= 0 && split <= 2) sk_settings.panel_split = split;
#if SK_POOL
    if (spin_us >= 0) sk_settings.spin_ns = (int64_t)spin_us * 1000;
    const long long spin_now = (long long)(sk_settings.spin_ns / 1000);
#else
    const long long spin_now = 0;
#endif
    if (rows_min >= 0) sk_settings.rows_par_min = rows_min;
    if (panel_min >= 0) sk_settings.panel_par_min = panel_min;
    return Py_BuildValue("{s:L,s:L,s:L,s:i,s:s}", "spin_us", spin_now, "rows_par_min", (long long)sk_settings.rows_par_min,
                         "panel_par_min", (long long)sk_settings.panel_par_min, "panel_split", sk_settings.panel_split, "backend",
                         SK_POOL ? "pthreads" : "openmp-or-none");
}

/* the shifted-planes convolution (dconv_job_t): w's column indices as plane offsets, the padded planes and the
 * per-thread output panels in the caller's scratch (scr: conv_scratch_floats(...) floats) or a fresh buffer */
static int conv_direct(const csr_t *w, int64_t nb, const int32_t *ord, const conv_t *g, int64_t B, int threads,
                       const float *x, float *y, Py_buffer *scr, const float *res, int post_relu, float hi) {
    if (g->dh != 1 || g->dw != 1) {
        PyErr_SetString(PyExc_ValueError, "shifted planes need dilations 1");
        return -1;
    }
    const int nt = clamp_threads(threads < 0 ? -threads : threads);
    const int64_t Bc = dconv_chunk(g, B), plane = dconv_plane_floats(g, Bc), need = dconv_scratch_floats(g, B, w->n_out, nt);
    if (plane < 0) { PyErr_SetString(PyExc_ValueError, "input too large for shifted planes (int32 offsets)"); return -1; }
    if (B == 0) return 0;
    const int64_t nent = w->rowptr[nb * (w->rb > 1 ? w->n_out / w->rb : w->n_out)];
    void *raw = NULL;
    float *base;
    if (scr) {
        if (check_len(scr, smul(need, 4), "scratch")) return -1;
        base = (float *)(((uintptr_t)scr->buf + 63) & ~(uintptr_t)63);
    } else if (!(raw = malloc((size_t)need * 4 + 64))) {
        PyErr_NoMemory();
        return -1;
    } else {
        base = (float *)(((uintptr_t)raw + 63) & ~(uintptr_t)63);
    }
    /* the offsets, then (K of them) the offset of each column */
    int32_t *off = (int32_t *)calloc((size_t)(nent + PAD_SLACK + w->n_in), 4);
    if (!off) { free(raw); PyErr_NoMemory(); return -1; }
    const int64_t R = dconv_band(g, Bc), hp = R + (g->kh - 1) / g->sh, pitch = dconv_pitch(g, Bc);
    dconv_offsets(w, nent, g, Bc, off + nent + PAD_SLACK, off);
    /* the output panels first, the planes last: a read past the planes' slack leaves the buffer */
    const int64_t per = (w->n_out * PANEL + 15) & ~(int64_t)15;
    dconv_job_t job = {pick_panel_for(w), *w, w->rowptr, ord, nb, *g, x, y, base + per * nt, Bc, hp, pitch, 0, 0, 0,
                       0, 0, res, post_relu, hi, base, per};
    job.w.idx = off;
    job.w.idx16 = 0;
    job.w.direct = 1;
    Py_BEGIN_ALLOW_THREADS
    for (int64_t b0 = 0; b0 < B; b0 += Bc)  /* a chunk of images, a band of rows: its planes, then its panels */
        for (int64_t r0 = 0; r0 < g->ho; r0 += R) {
            job.b0 = b0;
            job.nbc = B - b0 < Bc ? B - b0 : Bc;
            job.r0 = r0;
            job.rows = g->ho - r0 < R ? g->ho - r0 : R;
            job.P = (job.rows * pitch + PANEL - 1) / PANEL;
            if (nt <= 1) {
                for (int64_t i = 0; i <= dconv_planes(g) * g->c; i++) dconv_fill(&job, i, 0);
                for (int64_t p = 0; p < job.P; p++) dconv_item(&job, p, 0);
            } else {
                par_run(nt, dconv_planes(g) * g->c + 1, dconv_fill, &job);
                par_run(job.P < nt ? (int)job.P : nt, job.P, dconv_item, &job);
            }
        }
    Py_END_ALLOW_THREADS
    free(off);
    free(raw);
    return 0;
}

/* conv_direct_scratch(batch, C_out, threads, (c, h, w, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo)): (floats of the
 * scratch conv(..., direct=True) takes, share of the computed grid pixels that are outputs); floats -1: the planes'
 * offsets would not fit int32 */
static PyObject *py_conv_direct_scratch(PyObject *self, PyObject *args) {
    (void)self;
    long long B, n_out;
    int threads;
    conv_t g;
    if (!PyArg_ParseTuple(args, "LLi(LLLLLLLLLLLLL)", &B, &n_out, &threads, &g.c, &g.h, &g.w, &g.kh, &g.kw, &g.sh,
                          &g.sw, &g.ph, &g.pw, &g.dh, &g.dw, &g.ho, &g.wo))
        return NULL;
    if (B < 1 || n_out < 1 || g.c < 1 || g.kh < 1 || g.kw < 1 || g.ho < 1 || g.wo < 1) {
        PyErr_SetString(PyExc_ValueError, "bad convolution geometry");
        return NULL;
    }
    const int64_t floats = dconv_scratch_floats(&g, B, n_out, clamp_threads(threads < 0 ? -threads : threads));
    return Py_BuildValue("(Ld)", (long long)floats, floats < 0 ? 0.0 : dconv_use(&g, B));
}

/* conv(values, indices, blockptr, bias|None, order|None, x, y, idx_bytes, K, C_out, nblocks, relu, threads, batch,
 *      (c, h, w, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo)[, scratch|None, rows per block, direct, block width,
 *      residual|None, hi]): a sparse
 *      convolution (sk_conv.c); direct: the shifted-planes form (dilations 1); hi: the output clamped at it */
static PyObject *py_conv(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer val, idx, bptr, x, y, bias = {0}, ordb = {0}, scr = {0}, resb = {0};
    PyObject *bias_obj, *ord_obj, *scr_obj = Py_None, *res_obj = Py_None;
    int idx_bytes, relu, threads;
    long long K, n_out, nb, B, rb = 1, bw = 0;
    int direct = 0;
    double hi = INFINITY;
    conv_t g;
    if (!PyArg_ParseTuple(args, "y*y*y*OOy*w*iLLLiiL(LLLLLLLLLLLLL)|OLpLOd", &val, &idx, &bptr, &bias_obj, &ord_obj, &x,
                          &y, &idx_bytes, &K, &n_out, &nb, &relu, &threads, &B, &g.c, &g.h, &g.w, &g.kh, &g.kw, &g.sh,
                          &g.sw, &g.ph, &g.pw, &g.dh, &g.dw, &g.ho, &g.wo, &scr_obj, &rb, &direct, &bw, &res_obj, &hi))
        return NULL;
    int have_bias = 0, have_ord = 0, have_scr = 0, have_res = 0;
    PyObject *ret = NULL;
    csr_t w;
    void *raw = NULL;
    if (bias_obj != Py_None) {
        if (PyObject_GetBuffer(bias_obj, &bias, PyBUF_C_CONTIGUOUS) < 0) goto done;
        have_bias = 1;
    }
    if (ord_obj != Py_None) {
        if (PyObject_GetBuffer(ord_obj, &ordb, PyBUF_C_CONTIGUOUS) < 0) goto done;
        have_ord = 1;
        if (check_len(&ordb, smul3(nb, n_out, 4), "row order")) goto done;
    }
    if (g.c < 1 || g.h < 1 || g.w < 1 || g.kh < 1 || g.kw < 1 || g.sh < 1 || g.sw < 1 || g.dh < 1 || g.dw < 1 ||
        g.ph < 0 || g.pw < 0 || g.ho < 1 || g.wo < 1 || B < 0 || smul3(g.c, g.kh, g.kw) != K ||
        smul(g.ho, g.wo) > SK_MAX_DIM || smul3(g.c, g.h, g.w) > SK_MAX_DIM || g.ph > SK_MAX_DIM || g.pw > SK_MAX_DIM) {
        PyErr_SetString(PyExc_ValueError, "bad convolution geometry");
        goto done;
    }
    if (!dims_ok(K, n_out)) goto done;
    if (nb < 1 || nb > SK_MAX_DIM) { PyErr_SetString(PyExc_ValueError, "bad block count"); goto done; }
    if (nb > 1 && (bw < 1 || bw > K || (nb - 1) * bw >= K || nb * bw < K)) {
        PyErr_SetString(PyExc_ValueError, "column blocks: nblocks blocks of the block width must cover K exactly");
        goto done;
    }
    if ((rb != 1 && rb != 2 && rb != 4 && rb != 8 && rb != 16) || n_out % rb || (rb > 1 && have_ord)) {
        PyErr_SetString(PyExc_ValueError, "rows per block must be 1, 2, 4, 8 or 16 and divide C_out (no row order)");
        goto done;
    }
    if (check_len(&bptr, smul(smul(nb, n_out / rb) + 1, 8), "block pointers")) goto done;
    /* a row-block layout's pointers count block rows, and each entry holds rb values */
    if (make_csr(&w, &val, &idx, &bptr, Py_None, &bias, idx_bytes, K, nb * (n_out / rb), relu)) goto done;
    if (check_len(&val, smul(smul(w.rowptr[nb * (n_out / rb)], rb) + PAD_SLACK, 4), "values")) goto done;
    w.n_out = n_out;
    w.rb = rb > 1 ? (int)rb : 0;
    if (have_bias) {
        if (check_len(&bias, smul(n_out, 4), "bias")) goto done;
        w.bias = (const float *)bias.buf;
    }
    if (check_len(&x, smul(smul(B, smul3(g.c, g.h, g.w)), 4), "x") ||
        check_len(&y, smul(smul3(B, n_out, smul(g.ho, g.wo)), 4), "y"))
        goto done;
    if (scr_obj != Py_None) {  /* the caller's reusable scratch (conv_scratch_floats(...) floats, any alignment) */
        if (PyObject_GetBuffer(scr_obj, &scr, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) goto done;
        have_scr = 1;
    }
    if (res_obj != Py_None) {  /* y = act(conv(x) + bias + residual): ReLU after the add, not in the kernel */
        if (PyObject_GetBuffer(res_obj, &resb, PyBUF_C_CONTIGUOUS) < 0) goto done;
        have_res = 1;
        if (check_len(&resb, smul(smul3(B, n_out, smul(g.ho, g.wo)), 4), "residual")) goto done;
    }
    const float *res = have_res ? (const float *)resb.buf : NULL;
    const int post_relu = have_res && w.relu;
    if (have_res) w.relu = 0;
    if (direct) {
        if (conv_direct(&w, nb, have_ord ? (const int32_t *)ordb.buf : NULL, &g, B, threads, (const float *)x.buf,
                        (float *)y.buf, have_scr ? &scr : NULL, res, post_relu, (float)hi))
            goto done;
    } else {
        const int64_t npix = g.ho * g.wo, P = (npix + PANEL - 1) / PANEL;
        const int64_t G = npix < PANEL ? PANEL / npix : 1, items = G > 1 ? (B + G - 1) / G : B * P;
        int nt = clamp_threads(threads < 0 ? -threads : threads);
        /* fewer panels than threads (deep layers at batch 1): their output rows split between threads */
        const int64_t groups = (n_out + GROUP_ROWS - 1) / GROUP_ROWS;
        const int64_t parts = items > 0 && items < nt ? (nt / items < groups ? nt / items : groups) : 1;
        if (items * parts < nt) nt = items > 0 ? (int)(items * parts) : 1;
        const int64_t per = ((K + n_out) * PANEL + 15) & ~(int64_t)15;
        float *scratch = NULL;
        raw = NULL;
        if (have_scr) {
            if (check_len(&scr, smul(smul(per, nt) + 16, 4), "scratch")) goto done;
            scratch = (float *)(((uintptr_t)scr.buf + 63) & ~(uintptr_t)63);
        } else {
            if (smul(per, nt) > (int64_t)1 << 34 || !(raw = malloc((size_t)(per * nt) * 4 + 64))) {
                PyErr_NoMemory();
                goto done;
            }
            scratch = (float *)(((uintptr_t)raw + 63) & ~(uintptr_t)63);
        }
        conv_job_t job = {pick_panel_for(&w), w, w.rowptr, have_ord ? (const int32_t *)ordb.buf : NULL, nb, g,
                          (const float *)x.buf, (float *)y.buf, P, G, B, bw, res, post_relu, (float)hi, parts, scratch, per};
        Py_BEGIN_ALLOW_THREADS
        if (nt <= 1) {
            for (int64_t it = 0; it < items * parts; it++) conv_item(&job, it, 0);
        } else {
            par_run(nt, items * parts, conv_item, &job);
        }
        Py_END_ALLOW_THREADS
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    free(raw);
    if (have_scr) PyBuffer_Release(&scr);
    if (have_res) PyBuffer_Release(&resb);
    if (have_bias) PyBuffer_Release(&bias);
    if (have_ord) PyBuffer_Release(&ordb);
    PyBuffer_Release(&val); PyBuffer_Release(&idx); PyBuffer_Release(&bptr); PyBuffer_Release(&x);
    PyBuffer_Release(&y);
    return ret;
}

static PyObject *py_window_width(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
    return PyLong_FromLongLong((long long)window_width());
}

PyObject *sk_py_rnn(PyObject *self, PyObject *args); /* sk_rnn.c */
PyObject *sk_py_rnn_panel(PyObject *self, PyObject *args);

static PyMethodDef methods[] = {
    {"rows", py_rows, METH_VARARGS,
     "rows(values, indices, slice_ptr, perm, bias|None, x, y, idx_bytes, n_in, n_out, batch, relu, threads): the rows "
     "kernel on the sliced layout (CsrLayer.sliced): SLICE-row slices stored slot-major, perm (int32, "
     "SLICE * slices) the output row of each lane (-1: padding), bias in lane order. With windows (int32, one per slot) "
     "and a window width (rows(..., windows, width)): the window form (CsrLayer.windowed): idx_bytes 1, 8-bit "
     "in-window indices, rows in natural order; the caller guarantees windows within x (no re-check per call)"},
    {"panel", py_panel, METH_VARARGS,
     "panel(values, indices, blockptr, bias|None, xp, yp, idx_bytes, n_in, n_out, npanels, nblocks, relu, threads"
     "[, y_rows|None, batch, order|None, x_rows|None, rows_per_block]): with x_rows (batch, n_in) row-major the kernel transposes it "
     "into xp (scratch) panel by panel; with y_rows (batch, n_out) row-major, the last column block writes there "
     "(yp then holds only partial sums); order (int32, nblocks * n_out): the row at each position of each block, "
     "a permutation within 64-row groups; rows_per_block (default 1; 2, 4, 8 or 16): the weight in "
     "CsrLayer.row_blocked's layout (pointers per block row, rows_per_block values an entry), run by the block kernel"},
    {"gemv", py_gemv, METH_VARARGS,
     "gemv(weight_t, bias|None, x, y, n_in, n_out, batch, relu, threads): dense layer, weight (n_in, n_out)"},
    {"chain_new", py_chain_new, METH_VARARGS,
     "chain_new([layer, ...][, input_shape]): a prepared chain, validated once, of layers with named fields "
     "(sparsekit.runtime.model.ChainLayer): kind 0 (rows), 1 (gemv), 2 (panel) or 3 (window: rows' fields plus "
     "windows and window, the width), values (gemv: weight_t), "
     "indices, pointers (rows: slice_ptr; panel: block pointers), order (rows: perm; panel: row order or None), "
     "bias (or None), idx_bytes, n_in, n_out, relu, threads (the layer's thread cap, 0: none), blocks (panel "
     "column blocks, default 1); input_shape (a tuple of at most 8 dims, n_in elements): x may also come as "
     "(batch, *input_shape)"},
    {"chain_run", (PyCFunction)(void (*)(void))py_chain_run, METH_FASTCALL,
     "chain_run(chain, x, y, threads): run a chain_new chain on x (batch, n_in) into y (batch, n_out), one call; "
     "True when done, False (nothing run) when x is not a C-contiguous float32 (batch, n_in) array"},
    {"chain_plan", py_chain_plan, METH_VARARGS,
     "chain_plan(chain, batch, threads): how chain_run would run a panel chain on that batch: {threads, lanes, "
     "rows_split, units}, or None where it declines (small-batch chains: threads 1, units 0; their layers "
     "decide their own threads)"},
    {"fast_call", (PyCFunction)(void (*)(void))py_fast_call, METH_FASTCALL,
     "fast_call(table, x, threads): FastModel.run's fast path: table, the model's chain cache, {batch: (chain, "
     "alloc)}; runs x's batch size's chain when x fits, into alloc() or one of the last two outputs it returned "
     "once nothing else references it, and returns the output; else None"},
    {"chain_drop_outputs", py_chain_drop_outputs, METH_O,
     "chain_drop_outputs(chain): forget the outputs fast_call keeps for reuse"},
    {"to_panels", py_to_panels, METH_VARARGS, "to_panels(x, xp, batch, n, threads)"},
    {"from_panels", py_from_panels, METH_VARARGS, "from_panels(yp, y, batch, n, threads)"},
    {"isa", py_isa, METH_NOARGS, "active code path: avx512, avx2 or generic"},
    {"address", py_address, METH_O, "address(buffer): the address of its first byte"},
    {"conv", py_conv, METH_VARARGS,
     "conv(values, indices, blockptr, bias|None, order|None, x, y, idx_bytes, K, C_out, nblocks, relu, threads, batch, "
     "(c, h, w, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo)[, scratch, rows per block, direct, block width, residual, hi]): a "
     "sparse 2-D "
     "convolution, "
     "x (batch, c, h, w) -> y (batch, "
     "C_out, ho, wo), the weight (C_out, K = c * kh * kw) in CsrLayer.blocked's layout; im2col panels of 64 output "
     "pixels fed to the panel kernel; an optional argument is a reusable float32 scratch of at least "
     "(round16((K + C_out) * 64) * threads + 16) floats (None: one is allocated per call), then the rows per block "
     "(default 1; 2, 4, 8 or 16: the weight in CsrLayer.row_blocked's layout, run by the block kernel), then direct "
     "(True: no im2col, shifted planes (zero-padded, one per kernel column and row phase), dilations 1; the scratch "
     "then holds conv_direct_scratch(...)[0] floats), then the width of the layout's column blocks (needed when "
     "nblocks > 1: block c holds columns [c * width, (c + 1) * width)), then a residual shaped like y (None: none): "
     "y = act(conv(x) + bias + residual), relu applied after the add"},
    {"conv_direct_scratch", py_conv_direct_scratch, METH_VARARGS,
     "conv_direct_scratch(batch, C_out, threads, (c, h, w, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo)): (floats of the "
     "scratch conv(..., direct=True) takes (-1: too large for shifted planes), share of the computed pixels that are "
     "outputs)"},
    {"rnn", sk_py_rnn, METH_VARARGS,
     "rnn(cell, values, indices, slice_ptr, perm, bias|None, windows|None, wide, idx_bytes, hidden, xw, h, c|None, y, "
     "hr, T, N, threads): a sparse GRU (cell 0) or LSTM (1) layer's time loop (sk_rnn.c)"},
    {"rnn_panel", sk_py_rnn_panel, METH_VARARGS,
     "rnn_panel(cell, values, indices, blockptr, order, bias|None, idx_bytes, hidden, xw, h, c|None, y, T, N): rnn "
     "with R on the panel kernel (batches of several samples)"},
    {"window_width", py_window_width, METH_NOARGS,
     "the window width of the active code path's window kernel (the window form of the rows layout)"},
    {"available_isas", py_available_isas, METH_NOARGS, "code paths this CPU can run"},
    {"depthwise", py_depthwise, METH_VARARGS,
     "depthwise(x, weight, bias|None, y, batch, (c, h, w, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo), lo, hi, threads): "
     "dense depthwise convolution, output clamped to [lo, hi]"},
    {"set_isa", py_set_isa, METH_VARARGS,
     "set_isa(name): force a code path (tests): generic, avx2, avx512 or best (the CPU's best)"},
    {"max_threads", py_max_threads, METH_NOARGS, "processors the thread pool can use (1 without threads)"},
    {"rows_threads", py_rows_threads, METH_VARARGS,
     "rows_threads(threads, work): threads a rows-kernel job of `work` stored slots x samples runs on"},
    {"set_threading", py_set_threading, METH_VARARGS,
     "set_threading([spin_us, rows_par_min, panel_par_min, panel_split]): worker spin time after a job, the work "
     "(nonzero x sample products) below which rows/panel stay on one thread, and how panel splits work between "
     "threads (0 auto: whole panels when they divide evenly, else rows; 1 rows; 2 panels); -1 keeps a value; "
     "returns the settings. "
     "A negative `threads` argument to a kernel means exactly that many threads (no work threshold)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", "sparsekit sparse kernels", -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__kernels(void) {
    sk_detect_isa();
    const int isa = isa_from_env();
    if (isa < 0) return NULL;
    g_isa = isa;
#if SK_POOL
    {
        const char *e = getenv("SPARSEKIT_SPIN_US");
        if (e && *e) {
            const long long v = atoll(e);
            if (v >= 0) sk_settings.spin_ns = (int64_t)v * 1000;
        }
    }
#endif
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    PyModule_AddIntConstant(m, "PANEL", PANEL);
    PyModule_AddIntConstant(m, "PAD_SLACK", PAD_SLACK);
    PyModule_AddIntConstant(m, "GROUP_ROWS", GROUP_ROWS);
    PyModule_AddIntConstant(m, "SLICE", SLICE);
#ifdef _OPENMP
    PyModule_AddIntConstant(m, "OPENMP", 1);
#else
    PyModule_AddIntConstant(m, "OPENMP", 0);
#endif
    return m;
}
