/* Running a prepared chain (sk_glue.h) and planning how: the thread count of each rows/gemv layer, and
 * for panel chains the unit of work (whole, half or quarter panels through every layer, or one unit
 * with every layer's rows split between the threads). */
#include "sk_glue.h"

sk_settings_t sk_settings = {100000, ROWS_PAR_MIN_WORK, PANEL_PAR_MIN_WORK, 0};

/* threads for a rows job of `work` (stored slots x samples) on at most nt: one below
 * sk_settings.rows_par_min, else as many as get half of it each (more threads only for more work): a job
 * of a few microseconds waits for the slowest of its threads to be handed its share and report back. */
int rows_threads(int nt, int64_t work) {
    if (nt <= 1 || work < sk_settings.rows_par_min) return 1;
    const int64_t most = work / (sk_settings.rows_par_min / 2 > 0 ? sk_settings.rows_par_min / 2 : 1);
    return most < 1 ? 1 : most < nt ? (int)most : nt;
}

/* n floats, 64-byte aligned; *raw is what to free */
static float *alloc_aligned(int64_t n, void **raw) {
    *raw = NULL;
    if (n < 0 || (uint64_t)n > (SIZE_MAX - 64) / 4) return NULL;
    *raw = malloc((size_t)n * 4 + 64);
    if (!*raw) return NULL;
    return (float *)(((uintptr_t)*raw + 63) & ~(uintptr_t)63);
}

static void chain_layer(const ch_layer_t *l, const float *x, float *y, int64_t B, int threads) {
    int nt = clamp_threads(threads);
    if (l->cap > 0 && nt > l->cap) nt = l->cap;
    if (l->kind == CH_ROWS || l->kind == CH_WINDOW) {
        const rows_fn fn = pick_sliced(&l->s);
        nt = rows_threads(nt, l->work * (B > 0 ? B : 1));
        if (nt <= 1) {
            if (l->s.nsl > 0) fn(&l->s, x, y, B, 0, l->s.nsl);
        } else {
            rows_job_t job = {fn, &l->s, x, y, B, (int64_t)nt * CHUNKS_PER_THREAD};
            par_run(nt, job.nch, rows_item, &job);
        }
    } else {
        const gemv_fn fn = pick_gemv();
        if (l->n_in * l->n_out * B < 4 * PAR_MIN_WORK) nt = 1;
        if (nt <= 1) {
            fn(l->wt, l->bias, x, y, l->n_in, l->n_out, 0, B, l->relu);
        } else {
            gemv_job_t job = {fn, l->wt, l->bias, x, y, l->n_in, l->n_out, l->relu};
            par_run(nt, B, gemv_item, &job);
        }
    }
}

/* ---- panel chains: the batch is cut into units (whole 64-sample panels, or with AVX-512 32-sample half
 * panels when whole panels would not split evenly between the threads, e.g. batch 64 on 2 threads, and
 * one half or quarter panel for a batch of at most 32 or 16 samples on one thread) and
 * each unit runs through every layer on one thread: its input transpose, every layer on its own two
 * scratch panels, and the last layer's rows written straight into y. Thread t owns the same units call
 * after call and no thread waits for another between layers (one hand-off per model call), so the
 * activations never leave the core that made them. */
typedef struct {
    const chain_t *c;
    const float *x;
    float *y;
    int64_t B;
    int lanes;          /* samples per unit: PANEL, or PANEL / 2 or PANEL / 4 (AVX-512) */
    float *scratch;     /* per thread: two (pw, PANEL) buffers */
    int64_t per_thread; /* floats */
} pchain_job_t;

static void pchain_unit(void *ctx, int64_t u, int tid) {
    const pchain_job_t *j = (const pchain_job_t *)ctx;
    const chain_t *c = j->c;
    const int64_t nl = j->lanes, b0 = u * nl;
    if (b0 >= j->B) return;
    const int64_t tb = j->B - b0 < nl ? j->B - b0 : nl;
    float *a = j->scratch + (int64_t)tid * j->per_thread, *b = a + c->pw * PANEL;
    to_panel_lanes(j->x, a, j->B, c->L[0].n_in, b0, nl);
    float *cur = a;
    for (int i = 0; i < c->n; i++) {
        const ch_layer_t *l = &c->L[i];
        float *dst = cur == a ? b : a;
        const int lastl = i + 1 == c->n;
        const rowout_t ro = {lastl ? j->y + b0 * l->n_out : NULL, l->n_out, tb,
                             lastl && j->B * l->n_out * 4 >= STREAM_MIN_BYTES, nl == PANEL ? 0 : (int)nl};
        panel_rows(pick_panel_for(&l->pw), &l->pw, l->bp, l->ord, l->nb, &ro, 0, l->n_out, cur, dst);
        cur = dst;
    }
}

/* the plan for a panel chain on B samples: p->nt, or 0 where the chain should not run this batch (the
 * panels do not split evenly and the layers are too big for half panels: chain_run returns False and
 * the runtime runs the layers one by one, splitting rows) */
static int pchain_plan(const chain_t *c, int64_t B, int threads, pplan_t *p) {
    int nt = clamp_threads(threads);
    int64_t work = 0, wbytes = 0;
    for (int i = 0; i < c->n; i++) {
        if (c->L[i].cap > 0 && nt > c->L[i].cap) nt = c->L[i].cap;
        work += c->L[i].work;
        wbytes += c->L[i].work * (4 + (c->L[i].pw.idx16 ? 2 : 4));
    }
    if (work * B < sk_settings.panel_par_min) nt = 1;
    const int64_t P = (B + PANEL - 1) / PANEL;
    const int64_t prows_min = (int64_t)c->n * (sk_settings.panel_par_min << PROWS_SPLIT_SHIFT);
    /* a unit of all B samples needs no more lanes than that: with AVX-512 half or quarter panels (a
     * partial panel costs a whole one) */
    int one_unit_lanes = PANEL;
#if SK_X86
    if (g_isa == ISA_AVX512) one_unit_lanes = B <= PANEL / 4 ? PANEL / 4 : B <= PANEL / 2 ? PANEL / 2 : PANEL;
#endif
    p->lanes = PANEL;
    p->units = P;
    p->rows = 0;
    if (nt > 1 && P == 1) {
#if SK_X86
        if (g_isa == ISA_AVX512 && wbytes <= HALF_PANEL_MAX_WEIGHT_BYTES) {
            /* weights that fit L2: data-parallel on partial panels, the lane width whose units keep the
             * threads busiest for the least work (unit_cost: the measured relative cost of a 16/32/64-lane
             * unit, see bench/RESULTS.md) */
            static const double unit_cost[3] = {0.5, 0.65, 1.0};
            double best = 1e30;
            for (int k = 0; k < 3; k++) {
                const int64_t lanes = (PANEL / 4) << k, units = (B + lanes - 1) / lanes;
                const double t = (double)((units + nt - 1) / nt) * unit_cost[k];
                if (t < best - 1e-9) {
                    best = t;
                    p->lanes = (int)lanes;
                    p->units = units;
                }
            }
            if (p->units > 1 || work * B < prows_min) {
                if (nt > p->units) nt = (int)p->units;
                return p->nt = nt;
            }
        }
#endif
        /* one unit of big layers, or one the threads can share only by rows: split every layer's rows */
        if (one_unit_lanes < PANEL ? work * B >= prows_min : work * B >= (sk_settings.panel_par_min << ROW_SPLIT_SHIFT)) {
            p->rows = 1;
            p->lanes = one_unit_lanes;
            p->units = 1;
            return p->nt = nt;
        }
        p->lanes = PANEL;
        p->units = P;
    }
    if (nt > 1 && P % nt != 0) {
        int ok = 0;
#if SK_X86
        if (g_isa == ISA_AVX512 && (2 * P) % nt == 0 && wbytes <= HALF_PANEL_MAX_WEIGHT_BYTES) {
            p->lanes = PANEL / 2;
            p->units = (B + PANEL / 2 - 1) / (PANEL / 2);
            ok = 1;
        }
#endif
        if (!ok && work * B >= (sk_settings.panel_par_min << ROW_SPLIT_SHIFT)) return 0;
    }
    if (nt > p->units) nt = (int)p->units;
    if (p->units == 1) p->lanes = one_unit_lanes;
    return p->nt = nt < 1 ? 1 : nt;
}

/* the plan for a panel chain on B samples and its thread count, or 0 when it declines (see
 * pchain_plan); 1 for other chains */
int chain_plan(const chain_t *c, int64_t B, int threads, pplan_t *p) {
    p->nt = 1;
    p->lanes = PANEL;
    p->units = 0;
    p->rows = 0;
    return c->panel ? pchain_plan(c, B, threads, p) : 1;
}

typedef struct {
    const ch_layer_t *l;
    const float *xp;
    float *yp;
    rowout_t ro;
    const int64_t *bounds; /* nt + 1 row positions on group boundaries, balanced by nonzeros */
} prows_job_t;

/* the first layer of a row-split chain: each thread transposes the whole input into its own panel
 * buffer, then runs its rows */
typedef struct {
    prows_job_t r;      /* r.xp unused */
    const float *x;     /* row-major input (B, n_in) */
    float *xp0;         /* thread t's transposed input at xp0 + t * xs */
    int64_t xs, B, lanes;
} prows0_job_t;

static void prows_item(void *ctx, int64_t part, int tid) {
    (void)tid;
    const prows_job_t *j = (const prows_job_t *)ctx;
    const int64_t o0 = j->bounds[part], o1 = j->bounds[part + 1];
    if (o1 > o0) panel_rows(pick_panel_for(&j->l->pw), &j->l->pw, j->l->bp, j->l->ord, j->l->nb, &j->ro, o0, o1, j->xp, j->yp);
}

/* floats of one thread's transposed input in prows_run (64-byte multiple) */
static int64_t prows_input_floats(const chain_t *c) { return c->L[0].n_in * PANEL + 16; }

static void prows0_item(void *ctx, int64_t part, int tid) {
    const prows0_job_t *j = (const prows0_job_t *)ctx;
    const int64_t o0 = j->r.bounds[part], o1 = j->r.bounds[part + 1];
    if (o1 <= o0) return;
    float *xp = j->xp0 + (int64_t)tid * j->xs;
    to_panel_lanes(j->x, xp, j->B, j->r.l->n_in, 0, j->lanes);
    panel_rows(pick_panel_for(&j->r.l->pw), &j->r.l->pw, j->r.l->bp, j->r.l->ord, j->r.l->nb, &j->r.ro, o0, o1, xp, j->r.yp);
}

/* a panel chain's one unit of B samples with every layer's rows split between pl->nt threads: one pool
 * job per layer (thread t takes row range t, the same rows call after call, so its weights stay in its
 * cache). In the first, each thread transposes the whole input into a buffer of its own (scratch past
 * the two shared panels: prows_input_floats each) before its rows: the input transpose split between
 * the threads had each thread then read the other's half of the panel from the other core, line by
 * line in the order of its indices.
 * The row ranges are computed here, per call (the GIL is held: a concurrent caller may use other
 * thread counts). -1: out of memory. */
static int prows_run(const chain_t *c, const float *x, int64_t B, float *y, const pplan_t *pl, float *scratch) {
    const int nt = pl->nt;
    int64_t *bounds = (int64_t *)malloc((size_t)c->n * (nt + 1) * sizeof(int64_t));
    if (!bounds) return -1;
    for (int i = 0; i < c->n; i++)
        if (panel_bounds(c->L[i].bp, c->L[i].nb, c->L[i].n_out, c->L[i].pw.rb, nt, bounds + (int64_t)i * (nt + 1))) {
            free(bounds);
            return -1;
        }
    Py_BEGIN_ALLOW_THREADS
    float *a = scratch, *b = a + c->pw * PANEL, *cur = a;
    for (int i = 0; i < c->n; i++) {
        const ch_layer_t *l = &c->L[i];
        float *dst = cur == a ? b : a;
        const int lastl = i + 1 == c->n;
        prows_job_t job = {l, cur, dst,
                           {lastl ? y : NULL, l->n_out, B, lastl && B * l->n_out * 4 >= STREAM_MIN_BYTES,
                            pl->lanes == PANEL ? 0 : pl->lanes},
                           bounds + (int64_t)i * (nt + 1)};
        if (i == 0) {
            prows0_job_t j0 = {job, x, a + 2 * c->pw * PANEL + 16, prows_input_floats(c), B, pl->lanes};
            par_run(nt, nt, prows0_item, &j0);
        } else {
            par_run(nt, nt, prows_item, &job);
        }
        cur = dst;
    }
    Py_END_ALLOW_THREADS
    free(bounds);
    return 0;
}

/* run chain c on x (B samples) into y (B * n_out floats): 1 done, -1 out of memory (exception set);
 * pl from chain_plan (pl->nt > 0). Called with the GIL held, releases it to compute. */
int chain_exec(chain_t *c, const float *x, int64_t B, float *y, int threads, const pplan_t *pl) {
    float *scratch = NULL;
    void *own = NULL;
    int64_t need = 0;
    if (c->panel) {
        /* per thread (one unit when the rows are split): two panels (+ 64 bytes) */
        need = pl->rows ? 2 * c->pw * PANEL + 16 + pl->nt * prows_input_floats(c)
                        : (int64_t)pl->nt * (2 * c->pw * PANEL + 16);
    } else if (c->n > 1) {
        need = smul3(2, c->max_mid, B) + 32; /* saturated: alloc_aligned fails */
    }
    if (need > 0) {
        if (!c->busy && c->scratch_n >= need) {
            scratch = c->scratch;
        } else if (!c->busy) {
            free(c->scratch_raw);
            c->scratch = alloc_aligned(need, &c->scratch_raw);
            c->scratch_n = c->scratch ? need : 0;
            scratch = c->scratch;
        } else {
            scratch = alloc_aligned(need, &own);
        }
        if (!scratch) { PyErr_NoMemory(); return -1; }
        if (scratch == c->scratch) c->busy = 1;
    }
    if (c->panel && pl->rows && B > 0) {
        if (prows_run(c, x, B, y, pl, scratch) < 0) {
            if (scratch == c->scratch) c->busy = 0;
            free(own);
            PyErr_NoMemory();
            return -1;
        }
    } else if (c->panel) {
        pchain_job_t job = {c, x, y, B, pl->lanes, scratch, 2 * c->pw * PANEL + 16};
        if (B > 0) {
            Py_BEGIN_ALLOW_THREADS
            if (pl->nt <= 1) {
                for (int64_t u = 0; u < pl->units; u++) pchain_unit(&job, u, 0);
            } else {
                par_run(pl->nt, pl->units, pchain_unit, &job);
            }
            Py_END_ALLOW_THREADS
        }
    } else {
        const float *cur = x;
        const int64_t half = c->max_mid * B + 16; /* second buffer starts 64 bytes apart at least */
        Py_BEGIN_ALLOW_THREADS
        for (int i = 0; i < c->n; i++) {
            float *dst = i + 1 == c->n ? y : scratch + (i & 1) * half;
            chain_layer(&c->L[i], cur, dst, B, threads);
            cur = dst;
        }
        Py_END_ALLOW_THREADS
    }
    if (scratch && scratch == c->scratch) c->busy = 0;
    free(own);
    return 1;
}
