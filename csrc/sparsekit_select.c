/* Mask-update helpers for sparsekit.selection: the two full passes over a layer that numpy does
 * slowly (boolean compaction), done branch-free in one loop each. No threads, no SIMD intrinsics:
 * the loops are memory-bound and the compiler vectorises what it can.
 *
 *   split(values f32[m], index i64[m], threshold, out_above i64[m], out_tied i64[m]) -> (n_above, n_tied)
 *       indices whose value is > threshold, and == threshold, in order.
 *   keep_ge(values f32[m], m, bound, out f32[m]) -> count
 *       the values >= bound, in order.
 *   gather_ge(scores f32[n], cand u8[n], mode, bound, out_values f32[n], out_index i64[n]) -> count
 *       out_values[j] = v(scores[i]) and out_index[j] = i, in order, for every candidate i whose
 *       transformed score v is >= bound (bound -inf: every candidate); v: mode bit 1 takes |score|,
 *       bit 2 negates (after |.|), NaN -> -inf.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>

static int need(const Py_buffer *b, Py_ssize_t bytes, const char *what) {
    if (b->len < bytes) {
        PyErr_Format(PyExc_ValueError, "%s buffer too small (%zd < %zd bytes)", what, b->len, bytes);
        return -1;
    }
    return 0;
}

static PyObject *py_split(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer v, x, oa, ot;
    float thr;
    Py_ssize_t m;
    if (!PyArg_ParseTuple(args, "y*y*nfw*w*", &v, &x, &m, &thr, &oa, &ot)) return NULL;
    PyObject *ret = NULL;
    if (need(&v, m * 4, "values") || need(&x, m * 8, "index") || need(&oa, m * 8, "above")
        || need(&ot, m * 8, "tied")) goto done;
    {
        const float *vals = (const float *)v.buf;
        const int64_t *idx = (const int64_t *)x.buf;
        int64_t *above = (int64_t *)oa.buf, *tied = (int64_t *)ot.buf;
        Py_ssize_t na = 0, nt = 0;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < m; i++) {
            float w = vals[i];
            above[na] = idx[i];
            na += w > thr;
            tied[nt] = idx[i];
            nt += w == thr;
        }
        Py_END_ALLOW_THREADS
        ret = Py_BuildValue("nn", na, nt);
    }
done:
    PyBuffer_Release(&v); PyBuffer_Release(&x); PyBuffer_Release(&oa); PyBuffer_Release(&ot);
    return ret;
}

static PyObject *py_keep_ge(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer v, o;
    Py_ssize_t m;
    float bound;
    if (!PyArg_ParseTuple(args, "y*nfw*", &v, &m, &bound, &o)) return NULL;
    PyObject *ret = NULL;
    if (need(&v, m * 4, "values") || need(&o, m * 4, "out")) goto done;
    {
        const float *vals = (const float *)v.buf;
        float *out = (float *)o.buf;
        Py_ssize_t j = 0;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < m; i++) {
            out[j] = vals[i];
            j += vals[i] >= bound;
        }
        Py_END_ALLOW_THREADS
        ret = PyLong_FromSsize_t(j);
    }
done:
    PyBuffer_Release(&v); PyBuffer_Release(&o);
    return ret;
}

static PyObject *py_gather_ge(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer s, c, ov, oi;
    int mode;
    float bound;
    if (!PyArg_ParseTuple(args, "y*y*ifw*w*", &s, &c, &mode, &bound, &ov, &oi)) return NULL;
    Py_ssize_t n = c.len;
    PyObject *ret = NULL;
    if (need(&s, n * 4, "scores") || need(&ov, n * 4, "values") || need(&oi, n * 8, "index")) goto done;
    {
        const float *sc = (const float *)s.buf;
        const uint8_t *cd = (const uint8_t *)c.buf;
        float *vals = (float *)ov.buf;
        int64_t *idx = (int64_t *)oi.buf;
        const int take_abs = mode & 1;
        const float sign = (mode & 2) ? -1.0f : 1.0f;
        Py_ssize_t j = 0;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < n; i++) {
            float v = sc[i];
            v = sign * (take_abs ? fabsf(v) : v);
            v = isnan(v) ? -INFINITY : v;
            vals[j] = v;
            idx[j] = (int64_t)i;
            j += (cd[i] != 0) & (v >= bound);
        }
        Py_END_ALLOW_THREADS
        ret = PyLong_FromSsize_t(j);
    }
done:
    PyBuffer_Release(&s); PyBuffer_Release(&c); PyBuffer_Release(&ov); PyBuffer_Release(&oi);
    return ret;
}

static PyMethodDef methods[] = {
    {"gather_ge", py_gather_ge, METH_VARARGS,
     "gather_ge(scores_f32, cand_u8, mode, bound, out_values_f32, out_index_i64) -> count"},
    {"keep_ge", py_keep_ge, METH_VARARGS, "keep_ge(values_f32, m, bound, out_f32) -> count"},
    {"split", py_split, METH_VARARGS, "split(values_f32, index_i64, m, threshold, out_above_i64, out_tied_i64) -> (n_above, n_tied)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_select", "mask-update selection helpers", -1, methods};

PyMODINIT_FUNC PyInit__select(void) { return PyModule_Create(&module); }
