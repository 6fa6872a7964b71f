/* Convolution inputs as panels: the im2col matrix of a 2-D convolution (one row per input channel and kernel
 * position, one column per output pixel), built 64 output pixels at a time straight in the panel layout the
 * panel kernels read ([K][PANEL] per panel), so a sparse convolution is the panel kernel's SpMM (sparse weight
 * (C_out, K) times the panel) with no separate transpose. Padding and pixels past the image are zeros.
 * Stride-1, dilation-1 convolutions skip im2col: "shifted rows" at the end of this file (dconv_job_t). */
#include "sk_runtime.h"

/* one im2col row of a panel: lanes [0, lanes) are output pixels q0.. of one image, walked output row by output
 * row; within an output row the input pixels are contiguous for stride 1 (a copy, zeros where the kernel hangs
 * over the padding) and strided otherwise */
static void im2col_row(const float *xc, float *dst, const conv_t *g, int64_t q0, int64_t lanes, int64_t dy,
                       int64_t dx) {
    int64_t l = 0;
    while (l < lanes) {
        const int64_t q = q0 + l, oy = q / g->wo, ox0 = q % g->wo;
        const int64_t n = g->wo - ox0 < lanes - l ? g->wo - ox0 : lanes - l;
        const int64_t iy = oy * g->sh - g->ph + dy;
        float *d = dst + l;
        if (iy < 0 || iy >= g->h) {
            memset(d, 0, (size_t)n * 4);
        } else {
            const float *row = xc + iy * g->w;
            /* output columns ox0 .. ox0 + n - 1 read input columns ix = ox * sw - pw + dx */
            if (g->sw == 1) {  /* contiguous: zeros where ix < 0 or ix >= w, one copy between */
                const int64_t ix0 = ox0 - g->pw + dx;
                int64_t a = ix0 < 0 ? -ix0 : 0, e = g->w - ix0;
                if (a > n) a = n;
                if (e > n) e = n;
                if (e < a) e = a;
                memset(d, 0, (size_t)a * 4);
                if (e > a) memcpy(d + a, row + ix0 + a, (size_t)(e - a) * 4);  /* else row + ix0 may be out of range */
                memset(d + e, 0, (size_t)(n - e) * 4);
            } else {
                for (int64_t k = 0; k < n; k++) {
                    const int64_t ix = (ox0 + k) * g->sw - g->pw + dx;
                    d[k] = ix >= 0 && ix < g->w ? row[ix] : 0.f;
                }
            }
        }
        l += n;
    }
}

/* panels [p0, p1) of image x (C, H, W) into xp + (p - p0) * K * PANEL, K = C * kh * kw */
void im2col_panels(const float *x, float *xp, const conv_t *g, int64_t p0, int64_t p1) {
    const int64_t npix = g->ho * g->wo, K = g->c * g->kh * g->kw;
    for (int64_t p = p0; p < p1; p++) {
        float *dst = xp + (p - p0) * K * PANEL;
        const int64_t lanes = npix - p * PANEL < PANEL ? npix - p * PANEL : PANEL;
        for (int64_t c = 0; c < g->c; c++)
            for (int64_t i = 0; i < g->kh; i++)
                for (int64_t j = 0; j < g->kw; j++, dst += PANEL) {
                    im2col_row(x + c * g->h * g->w, dst, g, p * PANEL, lanes, i * g->dh, j * g->dw);
                    if (lanes < PANEL) memset(dst + lanes, 0, (size_t)(PANEL - lanes) * 4);
                }
    }
}

/* the one panel of n images x[0 .. n-1] (C, H, W) of fewer than 64 output pixels each, side by side: image k
 * in lanes [k * npix, (k + 1) * npix), zeros after the last */
static void im2col_images(const float *x, float *xp, const conv_t *g, int64_t n) {
    const int64_t npix = g->ho * g->wo, chw = g->c * g->h * g->w;
    float *dst = xp;
    for (int64_t c = 0; c < g->c; c++)
        for (int64_t i = 0; i < g->kh; i++)
            for (int64_t j = 0; j < g->kw; j++, dst += PANEL) {
                for (int64_t k = 0; k < n; k++)
                    im2col_row(x + k * chw + c * g->h * g->w, dst + k * npix, g, 0, npix, i * g->dh, j * g->dw);
                if (n * npix < PANEL) memset(dst + n * npix, 0, (size_t)(PANEL - n * npix) * 4);
            }
}

/* One (image, panel) item of a sparse convolution: the panel's im2col columns into this thread's scratch, the
 * panel kernel over every output channel (bias and ReLU fused), and the panel's pixels copied into the
 * channel-major output y (B, C_out, ho * wo). Images of fewer than 64 output pixels: one item is the panel
 * of G images side by side (a 4x4 output fills a quarter of a panel alone). */
void conv_item(void *ctx, int64_t item, int tid) {
    const conv_job_t *j = (const conv_job_t *)ctx;
    const conv_t *g = &j->g;
    const int64_t npix = g->ho * g->wo, K = g->c * g->kh * g->kw;
    if (j->G > 1) { /* images G * item .. : one panel of them */
        const int64_t b0 = item * j->G, n = j->B - b0 < j->G ? j->B - b0 : j->G;
        float *xp = j->scratch + (int64_t)tid * j->per_thread, *yp = xp + K * PANEL;
        im2col_images(j->x + b0 * g->c * g->h * g->w, xp, g, n);
        const rowout_t ro = {NULL, 0, n * npix, 0, 0};
        panel_rows(j->fn, &j->w, j->bp, j->ord, j->nb, &ro, 0, j->w.n_out, xp, yp);
        for (int64_t k = 0; k < n; k++) {
            float *yb = j->y + (b0 + k) * j->w.n_out * npix;
            for (int64_t o = 0; o < j->w.n_out; o++) memcpy(yb + o * npix, yp + o * PANEL + k * npix, (size_t)npix * 4);
        }
        return;
    }
    const int64_t b = item / j->P, p = item % j->P;
    const int64_t lanes = npix - p * PANEL < PANEL ? npix - p * PANEL : PANEL;
    float *xp = j->scratch + (int64_t)tid * j->per_thread, *yp = xp + K * PANEL;
    im2col_panels(j->x + b * g->c * g->h * g->w, xp, g, p, p + 1);
    const rowout_t ro = {NULL, 0, lanes, 0, 0};
    panel_rows(j->fn, &j->w, j->bp, j->ord, j->nb, &ro, 0, j->w.n_out, xp, yp);
    float *yb = j->y + b * j->w.n_out * npix + p * PANEL;
    for (int64_t o = 0; o < j->w.n_out; o++) memcpy(yb + o * npix, yp + o * PANEL, (size_t)lanes * 4);
}

/* ------------------------------------------------------------------ shifted rows (stride 1, dilation 1) */

int64_t dconv_chunk(const conv_t *g, int64_t B) {
    const int64_t per = smul(smul3(g->c, g->ho + g->kh - 1, g->wo + g->kw - 1), 4), n = DCONV_CHUNK_BYTES / per;
    return n < 1 ? 1 : n < B ? n : B;
}

int64_t dconv_scratch_floats(const conv_t *g, int64_t B, int64_t n_out, int nt) {
    const int64_t plane = dconv_plane_floats(g, dconv_chunk(g, B));
    return plane < 0 ? -1 : plane + ((n_out * PANEL + 15) & ~(int64_t)15) * nt + 16;
}

int64_t dconv_plane_floats(const conv_t *g, int64_t B) {
    const int64_t hp = g->ho + g->kh - 1, wp = g->wo + g->kw - 1;
    const int64_t n = smul(smul3(g->c, B, hp), wp), all = n > INT32_MAX ? INT64_MAX : n + g->kw + PANEL + 15;
    return all > INT32_MAX ? -1 : all & ~(int64_t)15;
}

void dconv_offsets(const csr_t *w, int64_t n, const conv_t *g, int64_t B, int32_t *tab, int32_t *off) {
    const int64_t hp = g->ho + g->kh - 1, wp = g->wo + g->kw - 1;
    int32_t *t = tab;
    for (int64_t ch = 0; ch < g->c; ch++)
        for (int64_t i = 0; i < g->kh; i++)
            for (int64_t j = 0; j < g->kw; j++) *t++ = (int32_t)((ch * B * hp + i) * wp + j);
    if (w->idx16) {
        const uint16_t *ix = (const uint16_t *)w->idx;
        for (int64_t e = 0; e < n; e++) off[e] = tab[ix[e]];
    } else {
        const int32_t *ix = (const int32_t *)w->idx;
        for (int64_t e = 0; e < n; e++) off[e] = tab[ix[e]];
    }
}

/* plane (ch, b): row r holds input row r - ph, column q input column q - pw, zeros elsewhere */
void dconv_fill(void *ctx, int64_t item, int tid) {
    (void)tid;
    const dconv_job_t *j = (const dconv_job_t *)ctx;
    const conv_t *g = &j->g;
    const int64_t area = j->hp * j->wp;
    float *dst = j->plane + item * area;
    if (item == j->B * g->c) {  /* the slack after the last plane */
        memset(dst, 0, (size_t)(dconv_plane_floats(g, j->B) - item * area) * 4);
        return;
    }
    const int64_t ch = item / j->B, b = item % j->B;
    if (b >= j->nbc) {  /* an image past the batch in the last chunk: zeros (read only by dropped pixels) */
        memset(dst, 0, (size_t)area * 4);
        return;
    }
    const float *src = j->x + ((j->b0 + b) * g->c + ch) * g->h * g->w;
    const int64_t n = g->w < j->wp - g->pw ? g->w : j->wp - g->pw; /* input columns that land in the plane */
    for (int64_t r = 0; r < j->hp; r++, dst += j->wp) {
        const int64_t iy = r - g->ph;
        if (iy < 0 || iy >= g->h || n <= 0) {
            memset(dst, 0, (size_t)j->wp * 4);
            continue;
        }
        memset(dst, 0, (size_t)g->pw * 4);
        memcpy(dst + g->pw, src + iy * g->w, (size_t)n * 4);
        memset(dst + g->pw + n, 0, (size_t)(j->wp - g->pw - n) * 4);
    }
}

/* runs of valid output pixels among grid pixels q0 .. q0 + 63: lane, destination pixel (b * C_out * npix +
 * oy * wo + ox) and length of each; returns their count (at most PANEL) */
static int dconv_runs(const dconv_job_t *j, int64_t q0, int64_t lane[PANEL], int64_t dst[PANEL], int64_t len[PANEL]) {
    const conv_t *g = &j->g;
    const int64_t npix = g->ho * g->wo;
    int m = 0;
    for (int64_t q = q0; q < q0 + PANEL;) {
        const int64_t r = q / j->wp, ox = q % j->wp, b = r / j->hp, oy = r % j->hp;
        const int64_t n = j->wp - ox < q0 + PANEL - q ? j->wp - ox : q0 + PANEL - q;
        if (b < j->nbc && oy < g->ho && ox < g->wo) {
            lane[m] = q - q0;
            dst[m] = (j->b0 + b) * j->w.n_out * npix + oy * g->wo + ox;
            len[m++] = g->wo - ox < n ? g->wo - ox : n;
        }
        q += n;
    }
    return m;
}

void dconv_item(void *ctx, int64_t p, int tid) {
    const dconv_job_t *j = (const dconv_job_t *)ctx;
    const int64_t npix = j->g.ho * j->g.wo;
    float *yp = j->scratch + (int64_t)tid * j->per_thread;
    const rowout_t ro = {NULL, 0, PANEL, 0, 0};
    panel_rows(j->fn, &j->w, j->bp, j->ord, j->nb, &ro, 0, j->w.n_out, j->plane + p * PANEL, yp);
    int64_t lane[PANEL], dst[PANEL], len[PANEL];
    const int m = dconv_runs(j, p * PANEL, lane, dst, len);
    for (int64_t o = 0; o < j->w.n_out; o++)
        for (int s = 0; s < m; s++) memcpy(j->y + dst[s] + o * npix, yp + o * PANEL + lane[s], (size_t)len[s] * 4);
}
