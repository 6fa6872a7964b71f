/* The portable C kernels: every code path's reference, and the path of CPUs without AVX2. */
#include "sk_runtime.h"

void rows_generic(const sliced_t *wp, const float *x, float *y, int64_t B, int64_t s0, int64_t s1) {
    const sliced_t wl = *wp, *w = &wl;
    for (int64_t s = s0; s < s1; s++) {
        const int64_t a = w->slice_ptr[s], L = (w->slice_ptr[s + 1] - a) / SLICE;
        const int32_t *pm = w->perm + s * SLICE;
        for (int64_t b = 0; b < B; b++) {
            const float *xb = x + b * w->n_in;
            float acc[SLICE];
            for (int l = 0; l < SLICE; l++) acc[l] = w->bias ? w->bias[s * SLICE + l] : 0.f;
            for (int64_t j = 0; j < L; j++) {
                const int64_t k = a + j * SLICE;
                const float *v = w->val + k;
                if (w->idx16) {
                    const uint16_t *ix = (const uint16_t *)w->idx + k;
                    for (int l = 0; l < SLICE; l++) acc[l] += v[l] * xb[ix[l]];
                } else {
                    const int32_t *ix = (const int32_t *)w->idx + k;
                    for (int l = 0; l < SLICE; l++) acc[l] += v[l] * xb[ix[l]];
                }
            }
            float *yb = y + b * w->n_out;
            for (int l = 0; l < SLICE; l++) {
                if (pm[l] < 0) continue;
                yb[pm[l]] = (w->relu && acc[l] < 0.f) ? 0.f : acc[l];
            }
        }
    }
}

/* The window form of the sliced layout (any window width): slot k reads x[win[k] + idx]. Rows are in
 * natural order, so a slice's outputs are y[SLICE*s ...], the last slice cut at n_out. */
void window_generic(const sliced_t *wp, const float *x, float *y, int64_t B, int64_t s0, int64_t s1) {
    const sliced_t wl = *wp, *w = &wl;
    const uint8_t *ix = (const uint8_t *)w->idx;
    for (int64_t s = s0; s < s1; s++) {
        const int64_t a = w->slice_ptr[s] / SLICE, e = w->slice_ptr[s + 1] / SLICE;
        const int64_t nl = w->n_out - s * SLICE < SLICE ? w->n_out - s * SLICE : SLICE;
        for (int64_t b = 0; b < B; b++) {
            const float *xb = x + b * w->n_in;
            float acc[SLICE];
            for (int l = 0; l < SLICE; l++) acc[l] = w->bias ? w->bias[s * SLICE + l] : 0.f;
            for (int64_t k = a; k < e; k++) {
                const float *v = w->val + k * SLICE, *xw = xb + w->win[k];
                const uint8_t *ik = ix + k * SLICE;
                for (int l = 0; l < SLICE; l++) acc[l] += v[l] * xw[ik[l]];
            }
            float *yb = y + b * w->n_out + s * SLICE;
            for (int64_t l = 0; l < nl; l++) yb[l] = (w->relu && acc[l] < 0.f) ? 0.f : acc[l];
        }
    }
}

void panel_generic(const csr_t *w, const int32_t *ord, const float *xp, float *yp, int64_t k0, int64_t k1,
                          int first, int last, const rowout_t *ro) {
    float tile[TILE_ROWS * PANEL] __attribute__((aligned(64)));
    const int fuse = last && ro && ro->y && !ord;
    const int sh = col_shift(w);
    int64_t tbase = k0;
    float acc[PANEL];
    for (int64_t r = k0; r < k1; r++) {
        const int64_t o = ord ? (int64_t)ord[r] : r;
        const int64_t s = w->rowptr[r], e = w->rowptr[r + 1];
        float *out = yp + o * PANEL;
        if (!first && !last && s == e) continue;
        for (int t = 0; t < PANEL; t++) acc[t] = first ? 0.f : out[t];
        for (int64_t k = s; k < e; k++) {
            const float v = w->val[k];
            const float *p = xp + (idx_at(w, k) << sh);
            for (int t = 0; t < PANEL; t++) acc[t] += v * p[t];
        }
        if (!last) {
            for (int t = 0; t < PANEL; t++) out[t] = acc[t];
            continue;
        }
        const float bb = w->bias ? w->bias[o] : 0.f;
        float *dst = fuse ? tile + (r - tbase) * PANEL : out;
        for (int t = 0; t < PANEL; t++) {
            float r = acc[t] + bb;
            dst[t] = (w->relu && r < 0.f) ? 0.f : r;
        }
        if (fuse && (r + 1 - tbase == TILE_ROWS || r + 1 == k1)) {
            tile_flush(ro, tile, tbase, r + 1 - tbase);
            tbase = r + 1;
        }
    }
}

/* The block kernel, row by row: row r of block row r / R takes value j = r % R of each of the block row's
 * entries (the reference of the vector paths, which do 4 rows per pass over the entries). */
void block_generic(const csr_t *w, const int32_t *ord, const float *xp, float *yp, int64_t k0, int64_t k1,
                   int first, int last, const rowout_t *ro) {
    (void)ord;
    float tile[TILE_ROWS * PANEL] __attribute__((aligned(64)));
    const int64_t R = w->rb;
    const int fuse = last && ro && ro->y;
    const int sh = col_shift(w);
    int64_t tbase = k0;
    float acc[PANEL];
    for (int64_t r = k0; r < k1; r++) {
        const int64_t s = w->rowptr[r / R], e = w->rowptr[r / R + 1], j = r % R;
        float *out = yp + r * PANEL;
        if (!first && !last && s == e) continue;
        for (int t = 0; t < PANEL; t++) acc[t] = first ? 0.f : out[t];
        for (int64_t k = s; k < e; k++) {
            const float v = w->val[k * R + j];
            const float *p = xp + (idx_at(w, k) << sh);
            for (int t = 0; t < PANEL; t++) acc[t] += v * p[t];
        }
        if (!last) {
            for (int t = 0; t < PANEL; t++) out[t] = acc[t];
            continue;
        }
        const float bb = w->bias ? w->bias[r] : 0.f;
        float *dst = fuse ? tile + (r - tbase) * PANEL : out;
        for (int t = 0; t < PANEL; t++) {
            const float y = acc[t] + bb;
            dst[t] = (w->relu && y < 0.f) ? 0.f : y;
        }
        if (fuse && (r + 1 - tbase == TILE_ROWS || r + 1 == k1)) {
            tile_flush(ro, tile, tbase, r + 1 - tbase);
            tbase = r + 1;
        }
    }
}

void gemv_generic(const float *wt, const float *bias, const float *x, float *y, int64_t n_in,
                         int64_t n_out, int64_t b0, int64_t b1, int relu) {
    for (int64_t b = b0; b < b1; b++) {
        const float *xb = x + b * n_in;
        float *yb = y + b * n_out;
        for (int64_t o = 0; o < n_out; o++) yb[o] = 0.f;
        for (int64_t i = 0; i < n_in; i++) {
            const float v = xb[i];
            const float *r = wt + i * n_out;
            for (int64_t o = 0; o < n_out; o++) yb[o] += v * r[o];
        }
        for (int64_t o = 0; o < n_out; o++) {
            float t = yb[o] + (bias ? bias[o] : 0.f);
            yb[o] = (relu && t < 0.f) ? 0.f : t;
        }
    }
}
