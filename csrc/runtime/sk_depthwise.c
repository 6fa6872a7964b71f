/* Dense depthwise 2-D convolutions (groups = channels, one kh x kw filter per channel): the 3x3 layers of
 * MobileNets, run here so that no ONNX Runtime segment sits between a network's sparse pointwise convolutions
 * (each hand-off cost 10-20 us at batch 1, more than the layer itself). Three forms, the output clamped to
 * [lo, hi] (ReLU, ReLU6, or +-inf: none; a NaN stays NaN) as it is written:
 *
 * - AVX-512, stride 1 with the output the input's size (dw_flat_item_avx512): the input read in place, 16 output
 *   pixels a vector, each tap's lanes outside the image masked off;
 * - AVX-512, column stride 2 (dw_s2_item_avx512): 32-float spans of input rows, their even lanes kept;
 * - otherwise (any stride and dilation; the AVX2 and generic paths): one item per (image, channel), the plane
 *   copied into a zero-padded scratch split into sw column phases (phase q, column c holds padded column
 *   c * sw + q), so tap (i, j) of an output row reads contiguous floats: phase (j * dw) % sw from column
 *   (j * dw) / sw; 16 output columns at a time (plain C on the generic path, one __m512 or two __m256). */
#include "sk_runtime.h"

#include <stdlib.h>
#include <string.h>

/* padded rows and phase columns of one channel's scratch */
static int64_t dw_rows(const conv_t *g) { return (g->ho - 1) * g->sh + (g->kh - 1) * g->dh + 1; }
/* output columns are computed 16 at a time: the last chunk reads up to 15 padded columns past wo */
static int64_t dw_cols(const conv_t *g) { return (g->wo + 15) / 16 * 16 + (g->kw - 1) * g->dw / g->sw + 1; }

int64_t depthwise_scratch_floats(const conv_t *g) { return g->sw * dw_rows(g) * dw_cols(g); }

typedef struct {
    const conv_t *g;
    const float *x, *w, *bias;
    float *y, *scratch;
    const int64_t *tap; /* per tap (i, j): its offset in the phases from an output row's first column */
    int64_t C, per;
    float lo, hi;
} dw_job_t;

/* the padded, phase-split copy of plane x (h x w): per phase, the columns [c0, c1) that fall inside the image,
 * zeros either side (no test per element: that fill cost 8x the taps) */
static inline __attribute__((always_inline)) void dw_fill(const conv_t *g, const float *x, float *ph) {
    const int64_t rows = dw_rows(g), cols = dw_cols(g), sw = g->sw;
    for (int64_t q = 0; q < sw; q++) {
        int64_t c0 = g->pw > q ? (g->pw - q + sw - 1) / sw : 0, c1 = (g->w + g->pw - q + sw - 1) / sw;
        if (c1 > cols) c1 = cols;
        if (c0 > c1) c0 = c1;
        for (int64_t r = 0; r < rows; r++) {
            float *restrict dst = ph + (q * rows + r) * cols;
            const int64_t iy = r - g->ph;
            if (iy < 0 || iy >= g->h) {
                memset(dst, 0, (size_t)cols * sizeof(float));
                continue;
            }
            const float *restrict src = x + iy * g->w + q - g->pw;
            memset(dst, 0, (size_t)c0 * sizeof(float));
            if (sw == 1)
                memcpy(dst + c0, src + c0, (size_t)(c1 - c0) * sizeof(float));
            else
                for (int64_t c = c0; c < c1; c++) dst[c] = src[c * sw];
            memset(dst + c1, 0, (size_t)(cols - c1) * sizeof(float));
        }
    }
}

/* one output plane from the phases: 16 output columns at a time, every tap, then the clamp */
static void dw_plane_generic(const dw_job_t *j, const float *ph, const float *wk, float bias, float *restrict y) {
    const conv_t *g = j->g;
    const int64_t cols = dw_cols(g), wo = g->wo, taps = g->kh * g->kw;
    const float lo = j->lo, hi = j->hi;
    for (int64_t r = 0; r < g->ho; r++) {
        const float *row = ph + r * g->sh * cols;
        for (int64_t c0 = 0; c0 < wo; c0 += 16) {
            float a[16];
            for (int l = 0; l < 16; l++) a[l] = bias;
            for (int64_t t = 0; t < taps; t++) {
                const float wv = wk[t], *restrict src = row + j->tap[t] + c0;
                for (int l = 0; l < 16; l++) a[l] += wv * src[l];
            }
            for (int l = 0; l < 16; l++) {
                const float v = a[l] < lo ? lo : a[l];
                a[l] = v > hi ? hi : v;
            }
            float *restrict out = y + r * wo + c0;
            if (wo - c0 >= 16)
                for (int l = 0; l < 16; l++) out[l] = a[l];
            else
                for (int64_t l = 0; l < wo - c0; l++) out[l] = a[l];
        }
    }
}

#if SK_X86
/* the next DW_CHUNKS chunks of 16 output columns (row by row): where each reads the phases and writes y, and how
 * many of its columns exist (0: past the plane's end, computed on a copy of the last chunk and not stored) */
#define DW_CHUNKS 4
typedef struct {
    const float *src[DW_CHUNKS];
    float *dst[DW_CHUNKS];
    int64_t n[DW_CHUNKS];
} dw_chunks_t;

static int64_t dw_next(const dw_job_t *j, const float *ph, float *y, int64_t *r, int64_t *c0, dw_chunks_t *k) {
    const conv_t *g = j->g;
    const int64_t cols = dw_cols(g);
    int64_t got = 0;
    for (int u = 0; u < DW_CHUNKS; u++) {
        if (*r < g->ho) {
            k->src[u] = ph + *r * g->sh * cols + *c0;
            k->dst[u] = y + *r * g->wo + *c0;
            k->n[u] = g->wo - *c0 < 16 ? g->wo - *c0 : 16;
            got++;
            if ((*c0 += 16) >= g->wo) *c0 = 0, (*r)++;
        } else {
            k->src[u] = k->src[0], k->dst[u] = k->dst[0], k->n[u] = 0;
        }
    }
    return got;
}

SK_AVX512 static void dw_plane_avx512(const dw_job_t *j, const float *ph, const float *wk, float bias, float *y) {
    const int64_t taps = j->g->kh * j->g->kw;
    const __m512 lo = _mm512_set1_ps(j->lo), hi = _mm512_set1_ps(j->hi);
    int64_t r = 0, c0 = 0;
    dw_chunks_t k;
    while (dw_next(j, ph, y, &r, &c0, &k)) {
        __m512 a[DW_CHUNKS];
        for (int u = 0; u < DW_CHUNKS; u++) a[u] = _mm512_set1_ps(bias);
        for (int64_t t = 0; t < taps; t++) {
            const __m512 wv = _mm512_set1_ps(wk[t]);
            const int64_t off = j->tap[t];
            for (int u = 0; u < DW_CHUNKS; u++) a[u] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(k.src[u] + off), a[u]);
        }
        for (int u = 0; u < DW_CHUNKS; u++)
            _mm512_mask_storeu_ps(k.dst[u], (__mmask16)((1u << k.n[u]) - 1),
                                  _mm512_min_ps(hi, _mm512_max_ps(lo, a[u])));
    }
}

SK_AVX2 static void dw_plane_avx2(const dw_job_t *j, const float *ph, const float *wk, float bias, float *y) {
    const int64_t taps = j->g->kh * j->g->kw;
    const __m256 lo = _mm256_set1_ps(j->lo), hi = _mm256_set1_ps(j->hi);
    int64_t r = 0, c0 = 0;
    dw_chunks_t k;
    while (dw_next(j, ph, y, &r, &c0, &k)) {
        __m256 a[2 * DW_CHUNKS];
        for (int u = 0; u < 2 * DW_CHUNKS; u++) a[u] = _mm256_set1_ps(bias);
        for (int64_t t = 0; t < taps; t++) {
            const __m256 wv = _mm256_set1_ps(wk[t]);
            const int64_t off = j->tap[t];
            for (int u = 0; u < DW_CHUNKS; u++) {
                a[2 * u] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(k.src[u] + off), a[2 * u]);
                a[2 * u + 1] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(k.src[u] + off + 8), a[2 * u + 1]);
            }
        }
        for (int u = 0; u < DW_CHUNKS; u++) {
            float out[16];
            _mm256_storeu_ps(out, _mm256_min_ps(hi, _mm256_max_ps(lo, a[2 * u])));
            _mm256_storeu_ps(out + 8, _mm256_min_ps(hi, _mm256_max_ps(lo, a[2 * u + 1])));
            memcpy(k.dst[u], out, (size_t)k.n[u] * sizeof(float));
        }
    }
}
#endif

#if SK_X86
/* Stride 1 with the output the input's size (pads adding up to the kernel's reach): output pixel p and input pixel
 * p + (i * dh - ph) * w + (j * dw - pw) sit one flattened offset apart, so AVX-512 reads x in place, 16 output
 * pixels (of one row or several) a chunk, each tap's lanes outside the image masked off (not read), with no
 * padded copy. An item is one image's DW_FLAT_CHANNELS channels: a chunk's masks, worked out once, serve them all
 * (small planes, 4x4 at 256 channels, cost 80 ns a channel in fills before). */
#define DW_FLAT_TAPS 49
#define DW_FLAT_CHANNELS 16
static int dw_flat(const conv_t *g) {
    return g_isa == ISA_AVX512 && g->sh == 1 && g->sw == 1 && g->ho == g->h && g->wo == g->w &&
           g->kh * g->kw <= DW_FLAT_TAPS;
}

SK_AVX512 static void dw_flat_item_avx512(void *ctx, int64_t item, int tid) {
    (void)tid;
    const dw_job_t *j = ctx;
    const conv_t *g = j->g;
    const int64_t groups = (j->C + DW_FLAT_CHANNELS - 1) / DW_FLAT_CHANNELS, b = item / groups;
    const int64_t c0 = item % groups * DW_FLAT_CHANNELS, c1 = c0 + DW_FLAT_CHANNELS < j->C ? c0 + DW_FLAT_CHANNELS : j->C;
    const int64_t n = g->h * g->w, taps = g->kh * g->kw;
    int32_t off[DW_FLAT_TAPS], dx[DW_FLAT_TAPS], lane[16];
    for (int64_t t = 0; t < taps; t++) {
        dx[t] = (int32_t)(t % g->kw * g->dw - g->pw);
        off[t] = (int32_t)((t / g->kw * g->dh - g->ph) * g->w + dx[t]);
    }
    for (int l = 0; l < 16; l++) lane[l] = (int32_t)(l % g->w);
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i wv = _mm512_set1_epi32((int32_t)g->w), nv = _mm512_set1_epi32((int32_t)n);
    const __m512i wrap = _mm512_set1_epi32((int32_t)(16 % g->w));
    const __m512 lo = _mm512_set1_ps(j->lo), hi = _mm512_set1_ps(j->hi);
    __m512i col = _mm512_loadu_si512(lane); /* each lane's output column in the next chunk */
    for (int64_t p0 = 0; p0 < n; p0 += 64) {
        __mmask16 m[4][DW_FLAT_TAPS], keep[4];
        for (int u = 0; u < 4; u++) {
            const __m512i pv = _mm512_add_epi32(_mm512_set1_epi32((int32_t)(p0 + 16 * u)), iota);
            keep[u] = _mm512_cmplt_epu32_mask(pv, nv);
            for (int64_t t = 0; t < taps; t++)  /* unsigned compares: a negative column or pixel is out too */
                m[u][t] = keep[u] & _mm512_cmplt_epu32_mask(_mm512_add_epi32(col, _mm512_set1_epi32(dx[t])), wv) &
                          _mm512_cmplt_epu32_mask(_mm512_add_epi32(pv, _mm512_set1_epi32(off[t])), nv);
            col = _mm512_add_epi32(col, wrap);
            col = _mm512_mask_sub_epi32(col, _mm512_cmpge_epi32_mask(col, wv), col, wv);
        }
        for (int64_t ch = c0; ch < c1; ch++) {
            const float *xc = j->x + (b * j->C + ch) * n + p0, *wk = j->w + ch * taps;
            __m512 a[4];
            for (int u = 0; u < 4; u++) a[u] = _mm512_set1_ps(j->bias ? j->bias[ch] : 0.f);
            for (int64_t t = 0; t < taps; t++) {
                const __m512 wt = _mm512_set1_ps(wk[t]);
                for (int u = 0; u < 4; u++)
                    a[u] = _mm512_fmadd_ps(wt, _mm512_maskz_loadu_ps(m[u][t], xc + 16 * u + off[t]), a[u]);
            }
            float *yc = j->y + (b * j->C + ch) * n + p0;
            for (int u = 0; u < 4; u++)
                _mm512_mask_storeu_ps(yc + 16 * u, keep[u], _mm512_min_ps(hi, _mm512_max_ps(lo, a[u])));
        }
    }
}

/* Column stride 2 (MobileNets' downsampling layers): 16 output columns of one row read a 32-float span of an
 * input row per tap, masked to the image's columns, and keep its even lanes (one permute); rows outside the
 * image skip their taps. An item is one image's DW_FLAT_CHANNELS channels, four at a time for independent FMA
 * chains; a chunk's masks serve them all. */
#define DW_S2_COLS 16
static int dw_s2(const conv_t *g) { return g_isa == ISA_AVX512 && g->sw == 2 && g->kw <= DW_S2_COLS && g->kh <= 64; }

SK_AVX512 static void dw_s2_item_avx512(void *ctx, int64_t item, int tid) {
    (void)tid;
    const dw_job_t *j = ctx;
    const conv_t *g = j->g;
    const int64_t groups = (j->C + DW_FLAT_CHANNELS - 1) / DW_FLAT_CHANNELS, b = item / groups;
    const int64_t c0 = item % groups * DW_FLAT_CHANNELS, c1 = c0 + DW_FLAT_CHANNELS < j->C ? c0 + DW_FLAT_CHANNELS : j->C;
    const int64_t taps = g->kh * g->kw, hw = g->h * g->w, out = g->ho * g->wo;
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512 lo = _mm512_set1_ps(j->lo), hi = _mm512_set1_ps(j->hi);
    for (int64_t r = 0; r < g->ho; r++)
        for (int64_t ox = 0; ox < g->wo; ox += 16) {
            __mmask16 m0[DW_S2_COLS], m1[DW_S2_COLS];
            int64_t sx[DW_S2_COLS];
            for (int64_t k = 0; k < g->kw; k++) {  /* input columns sx .. sx + 31, those in [0, w) read */
                sx[k] = 2 * ox + k * g->dw - g->pw;
                const int64_t a = sx[k] < 0 ? -sx[k] : 0, e = g->w - sx[k];  /* lanes [a, e) */
                const uint32_t span = e <= a ? 0u : (e >= 32 ? 0xFFFFFFFFu : (uint32_t)((1ull << e) - 1)) & ~((1u << (a > 31 ? 31 : a)) - 1u);
                m0[k] = (__mmask16)(span & 0xFFFF);
                m1[k] = (__mmask16)(span >> 16);
            }
            const __mmask16 keep = g->wo - ox >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (g->wo - ox)) - 1);
            for (int64_t ch = c0; ch < c1; ch += 4) {
                /* four channels always (past c1: the last one again, not stored), so a[] stays in registers */
                const int nc = c1 - ch < 4 ? (int)(c1 - ch) : 4;
                int64_t cu[4];
                __m512 a[4];
                for (int u = 0; u < 4; u++) {
                    cu[u] = u < nc ? ch + u : c1 - 1;
                    a[u] = _mm512_set1_ps(j->bias ? j->bias[cu[u]] : 0.f);
                }
                for (int64_t i = 0; i < g->kh; i++) {
                    const int64_t iy = r * g->sh + i * g->dh - g->ph;
                    if (iy < 0 || iy >= g->h) continue;
                    for (int64_t k = 0; k < g->kw; k++)
                        for (int u = 0; u < 4; u++) {
                            const float *src = j->x + (b * j->C + cu[u]) * hw + iy * g->w + sx[k];
                            const __m512 v = _mm512_permutex2var_ps(_mm512_maskz_loadu_ps(m0[k], src), even,
                                                                    _mm512_maskz_loadu_ps(m1[k], src + 16));
                            a[u] = _mm512_fmadd_ps(_mm512_set1_ps(j->w[cu[u] * taps + i * g->kw + k]), v, a[u]);
                        }
                }
                for (int u = 0; u < nc; u++)
                    _mm512_mask_storeu_ps(j->y + (b * j->C + ch + u) * out + r * g->wo + ox, keep,
                                          _mm512_min_ps(hi, _mm512_max_ps(lo, a[u])));
            }
        }
}
#endif

typedef void (*dw_plane_fn)(const dw_job_t *j, const float *ph, const float *wk, float bias, float *y);

static inline __attribute__((always_inline)) void dw_item_body(void *ctx, int64_t item, int tid, dw_plane_fn plane) {
    const dw_job_t *j = ctx;
    const conv_t *g = j->g;
    const int64_t ch = item % j->C;
    float *ph = j->scratch + tid * j->per;
    dw_fill(g, j->x + item * g->h * g->w, ph);
    plane(j, ph, j->w + ch * g->kh * g->kw, j->bias ? j->bias[ch] : 0.f, j->y + item * g->ho * g->wo);
}

static void dw_item_generic(void *ctx, int64_t item, int tid) { dw_item_body(ctx, item, tid, dw_plane_generic); }
#if SK_X86
static void dw_item_avx2(void *ctx, int64_t item, int tid) { dw_item_body(ctx, item, tid, dw_plane_avx2); }
static void dw_item_avx512(void *ctx, int64_t item, int tid) { dw_item_body(ctx, item, tid, dw_plane_avx512); }
#endif

int depthwise(const conv_t *g, int64_t B, const float *x, const float *w, const float *bias, float lo, float hi,
              float *y, int threads) {
#if SK_X86
    if (dw_flat(g)) {
        const int64_t items = B * ((g->c + DW_FLAT_CHANNELS - 1) / DW_FLAT_CHANNELS);
        int nt = clamp_threads(threads);
        dw_job_t job = {g, x, w, bias, y, NULL, NULL, g->c, 0, lo, hi};
        par_run(nt > items ? (int)items : nt, items, dw_flat_item_avx512, &job);
        return 0;
    }
    if (dw_s2(g)) {
        const int64_t items = B * ((g->c + DW_FLAT_CHANNELS - 1) / DW_FLAT_CHANNELS);
        int nt = clamp_threads(threads);
        dw_job_t job = {g, x, w, bias, y, NULL, NULL, g->c, 0, lo, hi};
        par_run(nt > items ? (int)items : nt, items, dw_s2_item_avx512, &job);
        return 0;
    }
#endif
    const int64_t items = B * g->c;
    int nt = clamp_threads(threads);
    if (nt > items) nt = items > 0 ? (int)items : 1;
    const int64_t per = (depthwise_scratch_floats(g) + 15) & ~(int64_t)15;
    float *scratch = malloc((size_t)(per * nt) * sizeof(float));
    int64_t *tap = malloc((size_t)(g->kh * g->kw) * sizeof(int64_t));
    if (!scratch || !tap) {
        free(scratch);
        free(tap);
        return -1;
    }
    for (int64_t i = 0; i < g->kh; i++)
        for (int64_t k = 0; k < g->kw; k++)
            tap[i * g->kw + k] = (k * g->dw % g->sw * dw_rows(g) + i * g->dh) * dw_cols(g) + k * g->dw / g->sw;
    dw_job_t job = {g, x, w, bias, y, scratch, tap, g->c, per, lo, hi};
    item_fn fn = dw_item_generic;
#if SK_X86
    if (g_isa == ISA_AVX512) fn = dw_item_avx512;
    else if (g_isa == ISA_AVX2) fn = dw_item_avx2;
#endif
    par_run(nt, items, fn, &job);
    free(scratch);
    free(tap);
    return 0;
}
