/* A layer's work cut into pool items (par_run): the rows kernel by slice ranges, gemv by samples, the
 * panel kernel by panels or by group-aligned row ranges, the layout transposes by panels. */
#include "sk_runtime.h"

/* Split [0, n) into `parts` contiguous ranges balanced by nonzeros (rows differ in length). */
static void split_rows(const int64_t *rowptr, int64_t n, int part, int parts, int64_t *o0, int64_t *o1) {
    if (parts <= 1) { *o0 = 0; *o1 = n; return; }
    const int64_t nnz = rowptr[n];
    /* weight each row by nnz + 8 so empty rows still cost something */
    const int64_t total = nnz + 8 * n;
    int64_t lo = 0, hi = n;
    /* first row whose prefix cost >= total*part/parts, by binary search */
    const int64_t t0 = total * part / parts, t1 = total * (part + 1) / parts;
    int64_t a = 0, b = n;
    while (a < b) { int64_t m = (a + b) / 2; if (rowptr[m] + 8 * m < t0) a = m + 1; else b = m; }
    lo = a;
    a = 0; b = n;
    while (a < b) { int64_t m = (a + b) / 2; if (rowptr[m] + 8 * m < t1) a = m + 1; else b = m; }
    hi = (part == parts - 1) ? n : a;
    *o0 = lo; *o1 = hi;
}

void rows_item(void *ctx, int64_t ch, int tid) {
    (void)tid;
    const rows_job_t *j = (const rows_job_t *)ctx;
    int64_t s0, s1;
    split_rows(j->w->slice_ptr, j->w->nsl, (int)ch, (int)j->nch, &s0, &s1);
    if (s1 > s0) j->fn(j->w, j->x, j->y, j->B, s0, s1);
}

void gemv_item(void *ctx, int64_t b, int tid) {
    (void)tid;
    const gemv_job_t *j = (const gemv_job_t *)ctx;
    j->fn(j->w, j->bias, j->x, j->y, j->n_in, j->n_out, b, b + 1, j->relu);
}

/* the rows [g0, g1) of one panel, results in yp (bias and ReLU applied): into row-major y */
static void flush_rows(const rowout_t *ro, const float *yp, int64_t g0, int64_t g1) {
    for (int64_t t0 = g0; t0 < g1; t0 += TILE_ROWS)
        tile_flush(ro, yp + t0 * PANEL, t0, g1 - t0 < TILE_ROWS ? g1 - t0 : TILE_ROWS);
}

/* rows [o0, o1) of one panel (xp -> yp) over all column blocks; the last block's results also go to
 * row-major y when ro->y is set. A row-block layout (w->rb > 1: fn is the block kernel, ord NULL) takes
 * o0 and o1 on block boundaries. */
void panel_rows(panel_fn fn, const csr_t *w, const int64_t *bp, const int32_t *ord, int64_t nb,
                       const rowout_t *ro, int64_t o0, int64_t o1, const float *xp, float *yp) {
    const int64_t n_out = w->n_out, npos = w->rb > 1 ? n_out / w->rb : n_out; /* pointers per column block */
    csr_t wc = *w;
    for (int64_t c = 0; c < nb; c++) {
        wc.rowptr = bp + c * npos;
        const int first = c == 0, last = c == nb - 1;
        if (!last || !ord) {
            fn(&wc, ord ? ord + c * n_out : NULL, xp, yp, o0, o1, first, last, ro);
            continue;
        }
        /* last block in sorted order: results land in yp; each group goes to y while still in cache */
        for (int64_t g0 = o0; g0 < o1; g0 += GROUP_ROWS) {
            const int64_t g1 = g0 + GROUP_ROWS < o1 ? g0 + GROUP_ROWS : o1;
            fn(&wc, ord + c * n_out, xp, yp, g0, g1, first, 1, ro);
            if (ro->y) flush_rows(ro, yp, g0, g1);
        }
    }
#if SK_X86 && defined(__SSE__)
    if (ro->y && ro->stream) _mm_sfence(); /* streamed lines visible before the job counts as done */
#endif
}

static void panel_range(const panel_job_t *j, int64_t p, int64_t o0, int64_t o1, const float *xp, float *yp) {
    const int64_t n_out = j->w.n_out;
    const rowout_t ro = {j->yrm ? j->yrm + p * PANEL * n_out : NULL, n_out,
                         j->batch - p * PANEL < PANEL ? j->batch - p * PANEL : PANEL,
                         j->batch * n_out * 4 >= STREAM_MIN_BYTES, 0};
    panel_rows(j->fn, &j->w, j->bp, j->ord, j->nb, &ro, o0, o1, xp, yp);
}

void panel_item(void *ctx, int64_t item, int tid) {
    (void)tid;
    const panel_job_t *j = (const panel_job_t *)ctx;
    const int64_t part = item / j->P, p = item % j->P;
    const int64_t o0 = j->bounds[part], o1 = j->bounds[part + 1];
    if (o1 > o0) panel_range(j, p, o0, o1, j->xp + p * j->w.n_in * PANEL, j->yp + p * j->w.n_out * PANEL);
}

/* one whole panel: its input transpose (when the input is row-major), then every row. Run per panel,
 * the panel's input, partial sums and outputs stay in L2 between the transpose and the kernel (rather
 * than a transpose of the whole batch first). */
void panel_whole(void *ctx, int64_t p, int tid) {
    const panel_job_t *j = (const panel_job_t *)ctx;
    /* scratch a thread reuses panel after panel (L2-hot): the transposed input when the input is
     * row-major, the partial sums when the output is; else the panel's own slot */
    const int64_t xs = j->xr ? tid : p, ys = j->yrm ? tid : p;
    float *xp = (float *)j->xp + xs * j->w.n_in * PANEL;
    if (j->xr) to_panel_one(j->xr, xp, j->batch, j->w.n_in, p);
    panel_range(j, p, 0, j->w.n_out, xp, j->yp + ys * j->w.n_out * PANEL);
}

void panel_transpose_item(void *ctx, int64_t p, int tid) {
    (void)tid;
    const panel_job_t *j = (const panel_job_t *)ctx;
    to_panels_range(j->xr, (float *)j->xp, j->batch, j->w.n_in, p, p + 1);
}

/* nparts group-aligned row ranges balanced by nonzeros (+ 8 per row) over all blocks */
int panel_bounds(const int64_t *bp, int64_t nb, int64_t n_out, int rb, int64_t nparts, int64_t *bounds) {
    const int64_t ng = (n_out + GROUP_ROWS - 1) / GROUP_ROWS, npos = rb > 1 ? n_out / rb : n_out;
    const int64_t per = rb > 1 ? rb : 1; /* GROUP_ROWS is a multiple of every rb: r0, r1 fall on blocks */
    int64_t *cost = (int64_t *)malloc((size_t)(ng + 1) * sizeof(int64_t));
    if (!cost) return -1;
    cost[0] = 0;
    for (int64_t g = 0; g < ng; g++) {
        const int64_t r0 = g * GROUP_ROWS, r1 = r0 + GROUP_ROWS < n_out ? r0 + GROUP_ROWS : n_out;
        int64_t t = 8 * (r1 - r0);
        for (int64_t c = 0; c < nb; c++) t += (bp[c * npos + r1 / per] - bp[c * npos + r0 / per]) * per;
        cost[g + 1] = cost[g] + t;
    }
    bounds[0] = 0;
    int64_t g = 0;
    for (int64_t part = 1; part < nparts; part++) {
        const int64_t want = cost[ng] * part / nparts;
        while (g < ng && cost[g + 1] <= want) g++;
        /* round to the nearer group boundary */
        int64_t gb = g;
        if (g < ng && want - cost[g] > cost[g + 1] - want) gb = g + 1;
        int64_t o = gb * GROUP_ROWS;
        if (o > n_out) o = n_out;
        if (o < bounds[part - 1]) o = bounds[part - 1];
        bounds[part] = o;
    }
    bounds[nparts] = n_out;
    free(cost);
    return 0;
}

void tr_item(void *ctx, int64_t p, int tid) {
    (void)tid;
    const tr_job_t *j = (const tr_job_t *)ctx;
    if (j->to) to_panels_range(j->src, j->dst, j->B, j->n, p, p + 1);
    else from_panels_range(j->src, j->dst, j->B, j->n, p, p + 1);
}
