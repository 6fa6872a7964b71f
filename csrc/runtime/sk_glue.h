/*
 * sparsekit runtime: what the CPython glue (sk_module.c, sk_pychain.c) and the chain runner (sk_chain.c)
 * share: Python's headers, the prepared chain object and the size checks on arguments from Python.
 * Include this first (Python.h must come before the standard headers).
 */
#ifndef SK_GLUE_H
#define SK_GLUE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "sk_runtime.h"

/* ------------------------------------------------------------------ chains
 * A prepared chain of layers (rows, window and gemv kernels, or panel kernels): validated once by chain_new, run
 * with one Python->C call per model call by chain_run or fast_call (no per-layer argument parsing, buffer
 * exports, slice pointer re-checks or intermediate numpy arrays). Activations between layers live in the
 * chain's scratch; a caller that finds it in use (another thread inside chain_run: the flag is read and
 * set under the GIL) gets a private malloc'ed one, so two concurrent callers never share a buffer. */
enum { CH_ROWS = 0, CH_GEMV = 1, CH_PANEL = 2, CH_WINDOW = 3, CH_BLOCK = 4 };
/* the layer kinds that run on panels (a chain is all of these or none); CH_BLOCK is CH_PANEL's layout with
 * R x 1 row blocks (pw.rb = R), run by the block kernel */
#define CH_ON_PANELS(kind) ((kind) == CH_PANEL || (kind) == CH_BLOCK)
typedef struct {
    int kind, cap;
    sliced_t s;          /* CH_ROWS (gather form), CH_WINDOW (window form) */
    const float *wt;     /* CH_GEMV: weight (n_in, n_out) */
    const float *bias;   /* CH_GEMV */
    int64_t n_in, n_out;
    int relu;
    int64_t work;        /* rows: stored slots (nonzeros + padding); panel, block: weights stored */
    csr_t pw;            /* CH_PANEL, CH_BLOCK: values, indices, bias, shape, rows per block (rowptr: bp) */
    const int64_t *bp;   /* CH_PANEL: block pointers (nb * n_out + 1), by position; CH_BLOCK: (nb * n_out / rb + 1),
                          * by block row */
    const int32_t *ord;  /* CH_PANEL: row at each position, per block; NULL: natural order (always for CH_BLOCK) */
    int64_t nb;          /* CH_PANEL, CH_BLOCK: column blocks */
} ch_layer_t;

typedef struct {
    int n;
    ch_layer_t *L;
    Py_buffer *bufs;     /* held for the chain's lifetime */
    int nbufs;
    int64_t max_mid;     /* widest intermediate activation (floats per sample) */
    int panel;           /* every layer is CH_PANEL or CH_BLOCK: run data-parallel (see pchain_run) */
    int64_t pw;          /* panel chains: widest activation incl. the input (floats per sample) */
    float *scratch;      /* 64-byte aligned, scratch_n floats */
    void *scratch_raw;
    int64_t scratch_n;
    int busy;
    int in_ndim;         /* the model's per-sample input shape (0: none given), also accepted for x */
    int64_t in_shape[8];
    PyObject *spare[2];  /* fast_call: the last outputs it returned (strong references), see out_take */
    int64_t spare_bytes[2];
    int spare_next;
} chain_t;

/* how a panel chain runs B samples: nt threads over `units` units of `lanes` samples each (data-parallel:
 * each thread whole units through every layer), or with `rows` one unit whose every layer has its rows
 * split between the nt threads (one pool job per layer) */
typedef struct {
    int nt, lanes, rows;
    int64_t units;
} pplan_t;

/* sk_chain.c */
/* the plan for chain c on B samples: 1 (p filled in), or 0 where a panel chain declines this batch */
int chain_plan(const chain_t *c, int64_t B, int threads, pplan_t *p);
/* run chain c on x (B samples) into y: 1 done, -1 out of memory (exception set); GIL held on entry */
int chain_exec(chain_t *c, const float *x, int64_t B, float *y, int threads, const pplan_t *pl);

/* sk_module.c: checks on sizes from Python (0/-1 with a ValueError set when they fail) */
int dims_ok(int64_t n_in, int64_t n_out);
int check_len(const Py_buffer *b, int64_t need, const char *what);

/* sk_pychain.c: the chain methods of the module */
PyObject *py_chain_new(PyObject *self, PyObject *args);
PyObject *py_chain_plan(PyObject *self, PyObject *args);
PyObject *py_chain_run(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *py_fast_call(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *py_chain_drop_outputs(PyObject *self, PyObject *cap);

#endif /* SK_GLUE_H */
