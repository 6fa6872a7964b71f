/* Convolution inputs as panels: the im2col matrix of a 2-D convolution (one row per input channel and kernel
 * position, one column per output pixel), built 64 output pixels at a time straight in the panel layout the
 * panel kernels read ([K][PANEL] per panel), so a sparse convolution is the panel kernel's SpMM (sparse weight
 * (C_out, K) times the panel) with no separate transpose. Padding and pixels past the image are zeros.
 * Dilation-1 convolutions skip im2col: "shifted planes" at the end of this file (dconv_job_t). */
#include "sk_runtime.h"

#include <math.h>

#if SK_X86
/* conv_put's work with a residual or a clamp, 16 floats a step (the scalar loop took 7% of a ResNet-20 at batch 64) */
SK_AVX512 static void conv_put_avx512(float *y, const float *src, int64_t n, const float *res, int relu, float hi) {
    const __m512 lo = _mm512_set1_ps(relu ? 0.f : -INFINITY), top = _mm512_set1_ps(hi);
    for (int64_t k = 0; k < n; k += 16) {
        const __mmask16 m = n - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - k)) - 1);
        __m512 v = _mm512_maskz_loadu_ps(m, src + k);
        if (res) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, res + k));
        /* max_ps/min_ps return their second operand when either is NaN: a NaN stays NaN */
        _mm512_mask_storeu_ps(y + k, m, _mm512_min_ps(top, _mm512_max_ps(lo, v)));
    }
}
#endif

/* n finished output floats into y: copied, or with a residual (the same positions of res) added and then, with
 * relu, clamped at 0 (the Add and Relu after a convolution, fused into the copy that writes y anyway); then
 * clamped at hi where it is finite (a ReLU6's Clip) */
static void conv_put(float *y, const float *src, int64_t n, const float *res, int relu, float hi) {
#if SK_X86
    if (g_isa == ISA_AVX512 && (res || hi < INFINITY)) {
        conv_put_avx512(y, src, n, res, res && relu, hi);
        return;
    }
#endif
    if (!res)
        memcpy(y, src, (size_t)n * 4);
    else if (relu)  /* a NaN stays NaN, as on the AVX-512 path */
        for (int64_t k = 0; k < n; k++) y[k] = src[k] + res[k] < 0.f ? 0.f : src[k] + res[k];
    else
        for (int64_t k = 0; k < n; k++) y[k] = src[k] + res[k];
    if (hi < INFINITY)
        for (int64_t k = 0; k < n; k++) y[k] = y[k] > hi ? hi : y[k];
}

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

/* rows [k0, k1) of the one panel of n images x[0 .. n-1] (C, H, W) of fewer than 64 output pixels each, side by
 * side: image k in lanes [k * npix, (k + 1) * npix), zeros after the last up to lane `read` (the lanes the kernel
 * reads: 16 or 32 for a quarter or half panel, whose other lanes are never read, so not written) */
static void im2col_images(const float *x, float *xp, const conv_t *g, int64_t n, int64_t read, int64_t k0, int64_t k1) {
    const int64_t npix = g->ho * g->wo, chw = g->c * g->h * g->w, taps = g->kh * g->kw;
    for (int64_t r = k0; r < k1; r++) {
        const int64_t c = r / taps, i = r % taps / g->kw, j = r % g->kw;
        float *dst = xp + r * PANEL;
        for (int64_t k = 0; k < n; k++)
            im2col_row(x + k * chw + c * g->h * g->w, dst + k * npix, g, 0, npix, i * g->dh, j * g->dw);
        if (n * npix < read) memset(dst + n * npix, 0, (size_t)(read - n * npix) * 4);
    }
}

#if SK_X86
/* im2col_images for images of at most 64 input and 64 output pixels (ResNet's 8x8, 7x7 and 4x4 maps at batch 1):
 * an image's channel is four registers, and each 16 lanes of a kernel position's im2col row are one or two masked
 * two-register permutes of them (lane l: output pixel l's input pixel for that position, zero where it falls in
 * the padding), where im2col_row spends a call and two memsets a 7-float row */
SK_AVX512 static void im2col_images_avx512(const float *x, float *xp, const conv_t *g, int64_t n, int64_t read,
                                           int64_t k0, int64_t k1) {
    const int64_t npix = g->ho * g->wo, hw = g->h * g->w, chw = g->c * hw, taps = g->kh * g->kw;
    const int64_t nv = (npix + 15) / 16;
    __m512i idx[IM2COL_PERMUTE_TAPS][4];
    __mmask16 in[IM2COL_PERMUTE_TAPS][4];
    for (int64_t t = 0; t < taps; t++)
        for (int64_t v = 0; v < nv; v++) {
            int32_t at[16] = {0};
            unsigned m = 0;
            for (int64_t l = 16 * v; l < npix && l < 16 * v + 16; l++) {
                const int64_t iy = (l / g->wo) * g->sh - g->ph + (t / g->kw) * g->dh;
                const int64_t ix = (l % g->wo) * g->sw - g->pw + (t % g->kw) * g->dw;
                if (iy >= 0 && iy < g->h && ix >= 0 && ix < g->w) {
                    at[l - 16 * v] = (int32_t)(iy * g->w + ix);
                    m |= 1u << (l - 16 * v);
                }
            }
            idx[t][v] = _mm512_loadu_si512((const void *)at);
            in[t][v] = (__mmask16)m;
        }
    const __m512i hi = _mm512_set1_epi32(32);
    for (int64_t r = k0; r < k1; r++) {
        const int64_t c = r / taps, t = r % taps;
        float *dst = xp + r * PANEL;
        for (int64_t k = n * npix; k < read; k += 16)
            _mm512_mask_storeu_ps(dst + k, read - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (read - k)) - 1u),
                                  _mm512_setzero_ps());
        for (int64_t k = 0; k < n; k++) {
            const float *src = x + k * chw + c * hw;
            __m512 q[4];
            for (int u = 0; u < 4; u++) {
                const int64_t left = hw - 16 * u;
                q[u] = _mm512_maskz_loadu_ps(left >= 16 ? (__mmask16)0xFFFF : left > 0 ? (__mmask16)((1u << left) - 1u)
                                             : (__mmask16)0, src + 16 * u);
            }
            for (int64_t v = 0; v < nv; v++) {
                const int64_t left = npix - 16 * v;
                const __mmask16 keep = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
                __m512 o = _mm512_permutex2var_ps(q[0], idx[t][v], q[1]);  /* pixels 0..31 */
                if (hw > 32)  /* pixels 32..63 where the index says so */
                    o = _mm512_mask_blend_ps(_mm512_cmpge_epi32_mask(idx[t][v], hi), o,
                                             _mm512_permutex2var_ps(q[2], idx[t][v], q[3]));
                _mm512_mask_storeu_ps(dst + k * npix + 16 * v, keep, _mm512_maskz_mov_ps(in[t][v], o));
            }
        }
    }
}
#endif

/* im2col rows [k0, k1) of item `item`'s panel (conv_item) into xp */
static void conv_fill(const conv_job_t *j, int64_t item, float *xp, int64_t read, int64_t k0, int64_t k1) {
    const conv_t *g = &j->g;
    const int64_t npix = g->ho * g->wo, chw = g->c * g->h * g->w, taps = g->kh * g->kw;
    if (j->G > 1 || j->P == 1) {  /* the images of one panel (one image of 64 pixels at most when G = 1) */
        const int64_t b0 = item * j->G, n = j->B - b0 < j->G ? j->B - b0 : j->G;
#if SK_X86
        if (g_isa == ISA_AVX512 && g->h * g->w <= 64 && npix <= PANEL && taps <= IM2COL_PERMUTE_TAPS) {
            im2col_images_avx512(j->x + b0 * chw, xp, g, n, read, k0, k1);
            return;
        }
#endif
        im2col_images(j->x + b0 * chw, xp, g, n, read, k0, k1);
        return;
    }
    const int64_t b = item / j->P, p = item % j->P, q0 = p * PANEL;
    const int64_t lanes = npix - q0 < PANEL ? npix - q0 : PANEL;
    for (int64_t r = k0; r < k1; r++) {
        float *dst = xp + r * PANEL;
        im2col_row(j->x + b * chw + r / taps * g->h * g->w, dst, g, q0, lanes, r % taps / g->kw * g->dh,
                   r % g->kw * g->dw);
        if (lanes < PANEL) memset(dst + lanes, 0, (size_t)(PANEL - lanes) * 4);
    }
}

/* One (image, panel) item of a sparse convolution, or a part of its output rows (parts > 1: a single panel
 * on several threads, e.g. 512 channels of 4x4 at batch 1, each building the panel's columns for itself): the
 * panel's im2col columns into this thread's scratch, the
 * panel kernel over every output channel (bias and ReLU fused), and the panel's pixels copied into the
 * channel-major output y (B, C_out, ho * wo). Images of fewer than 64 output pixels: one item is the panel
 * of G images side by side (a 4x4 output fills a quarter of a panel alone). With column blocks (bw columns each)
 * each block's columns are built right before the kernel reads them: the whole panel of a wide K (512 channels
 * of a 3x3 kernel: 1.2 MB) would leave the core's L2 before its last block is read. */
void conv_item(void *ctx, int64_t work, int tid) {
    const conv_job_t *j = (const conv_job_t *)ctx;
    const conv_t *g = &j->g;
    const int64_t npix = g->ho * g->wo, K = g->c * g->kh * g->kw, n_out = j->w.n_out;
    /* this part's output rows: whole GROUP_ROWS groups (a row order permutes rows within them) */
    const int64_t item = work / j->parts, part = work % j->parts, groups = (n_out + GROUP_ROWS - 1) / GROUP_ROWS;
    const int64_t o0 = part * groups / j->parts * GROUP_ROWS, e1 = (part + 1) * groups / j->parts * GROUP_ROWS;
    const int64_t o1 = e1 < n_out ? e1 : n_out;
    float *xp = j->scratch + (int64_t)tid * j->per_thread, *yp = xp + K * PANEL;
    int64_t n = 1, lanes = npix - item % j->P * PANEL < PANEL ? npix - item % j->P * PANEL : PANEL, read = PANEL;
    int quarter = 0;  /* AVX-512 half and quarter panels: a 4x4 image alone computes its 16 lanes, not 64 */
    if (j->G > 1) {
        n = j->B - item * j->G < j->G ? j->B - item * j->G : j->G;
        lanes = n * npix;
        quarter = lanes <= PANEL / 4 ? PANEL / 4 : lanes <= PANEL / 2 ? PANEL / 2 : 0;
        if (g_isa != ISA_AVX512) quarter = 0;
        read = quarter ? quarter : PANEL;
    }
    const rowout_t ro = {NULL, 0, lanes, 0, quarter};
    const int64_t npos = j->w.rb > 1 ? n_out / j->w.rb : n_out, bw = j->nb > 1 ? j->bw : K;
    csr_t wc = j->w;
    for (int64_t c = 0; c < j->nb; c++) {
        const int64_t k0 = c * bw, k1 = k0 + bw < K ? k0 + bw : K;
        conv_fill(j, item, xp, read, k0, k1);
        wc.rowptr = j->bp + c * npos;
        j->fn(&wc, j->ord ? j->ord + c * n_out : NULL, xp, yp, o0, o1, c == 0, c == j->nb - 1, &ro);
    }
    if (j->G > 1) {
        for (int64_t k = 0; k < n; k++) {
            const int64_t at = (item * j->G + k) * n_out * npix;
            for (int64_t o = o0; o < o1; o++)
                conv_put(j->y + at + o * npix, yp + o * PANEL + k * npix, npix, j->res ? j->res + at + o * npix : NULL,
                         j->post_relu, j->hi);
        }
        return;
    }
    const int64_t b = item / j->P, p = item % j->P;
    const int64_t at = b * n_out * npix + p * PANEL;
    for (int64_t o = o0; o < o1; o++)
        conv_put(j->y + at + o * npix, yp + o * PANEL, lanes, j->res ? j->res + at + o * npix : NULL, j->post_relu,
                 j->hi);
}

/* ------------------------------------------------------------------ shifted planes (dilation 1) */

/* row phases (kernel rows i with the same i mod sh share a plane) and rows of each plane */
static int64_t dconv_phases(const conv_t *g) { return g->sh < g->kh ? g->sh : g->kh; }
int64_t dconv_planes(const conv_t *g) { return g->kw * dconv_phases(g); }

/* images a chunk: the batch cut into the fewest chunks whose planes fit DCONV_CHUNK_BYTES (one image at least), of
 * equal size, rounded up to a count whose rows fill whole 16-float groups (16 / gcd(wo, 16): wo = 8, an even count) */
int64_t dconv_chunk(const conv_t *g, int64_t B) {
    /* rows already a multiple of 16 floats: one image a chunk, whose planes are whole shifted copies of its
     * channels (dconv_fill_image) and whose panels are runs of 64 output pixels (16 channels of 32x32 at batch 64:
     * two images a chunk, filled row by row, 1.35x faster than ONNX Runtime's Conv; one image a chunk 2.2x) */
    if (g->wo % 16 == 0) return 1;
    const int64_t per = smul(smul3(dconv_planes(g), g->c, g->ho + (g->kh - 1) / g->sh), smul(g->wo, 4));
    int64_t n = DCONV_CHUNK_BYTES / per;
    n = n < 1 ? 1 : n < B ? n : B < 1 ? 1 : B;
    const int64_t chunks = (B + n - 1) / n;
    int64_t bc = chunks > 0 ? (B + chunks - 1) / chunks : 1, m = 16;
    while (m > 1 && (g->wo * (m / 2)) % 16 == 0) m /= 2;
    if (bc > 1 && bc % m) bc += m - bc % m;
    return bc < B ? bc : B < 1 ? 1 : B;
}

int64_t dconv_pitch(const conv_t *g, int64_t Bc) { return (smul(Bc, g->wo) + 15) & ~(int64_t)15; }

int64_t dconv_band(const conv_t *g, int64_t Bc) {
    const int64_t per = smul(smul3(dconv_planes(g), g->c, dconv_pitch(g, Bc)), 4), extra = (g->kh - 1) / g->sh;
    int64_t r = DCONV_CHUNK_BYTES / per - extra;
    if (r < DCONV_MIN_BAND) r = DCONV_MIN_BAND;
    if (r >= g->ho) return g->ho;
    const int64_t bands = (g->ho + r - 1) / r;
    return (g->ho + bands - 1) / bands; /* bands of (nearly) equal height */
}

/* plane rows of a band of output rows */
static int64_t dconv_band_rows(const conv_t *g, int64_t Bc) { return dconv_band(g, Bc) + (g->kh - 1) / g->sh; }

int64_t dconv_plane_floats(const conv_t *g, int64_t Bc) {
    const int64_t n = smul(smul3(dconv_planes(g), g->c, dconv_band_rows(g, Bc)), dconv_pitch(g, Bc));
    return n > INT32_MAX - PANEL ? -1 : n + PANEL;
}

int64_t dconv_scratch_floats(const conv_t *g, int64_t B, int64_t n_out, int nt) {
    const int64_t plane = dconv_plane_floats(g, dconv_chunk(g, B));
    return plane < 0 ? -1 : plane + ((n_out * PANEL + 15) & ~(int64_t)15) * nt + 16;
}

double dconv_use(const conv_t *g, int64_t B) {
    const int64_t Bc = dconv_chunk(g, B), pitch = dconv_pitch(g, Bc), chunks = (B + Bc - 1) / Bc;
    const int64_t R = dconv_band(g, Bc), full = g->ho / R, last = g->ho % R;
    const int64_t grid = chunks * (full * ((R * pitch + PANEL - 1) / PANEL) + (last ? (last * pitch + PANEL - 1) / PANEL : 0)) * PANEL;
    return (double)(B * g->ho * g->wo) / (double)grid;
}

void dconv_offsets(const csr_t *w, int64_t n, const conv_t *g, int64_t Bc, int32_t *tab, int32_t *off) {
    const int64_t hp = dconv_band_rows(g, Bc), pitch = dconv_pitch(g, Bc), plane = g->c * hp * pitch, np = dconv_phases(g);
    int32_t *t = tab;
    for (int64_t ch = 0; ch < g->c; ch++)
        for (int64_t i = 0; i < g->kh; i++)
            for (int64_t j = 0; j < g->kw; j++)
                *t++ = (int32_t)((j * np + i % g->sh) * plane + (ch * hp + i / g->sh) * pitch);
    if (w->idx16) {
        const uint16_t *ix = (const uint16_t *)w->idx;
        for (int64_t e = 0; e < n; e++) off[e] = tab[ix[e]];
    } else {
        const int32_t *ix = (const int32_t *)w->idx;
        for (int64_t e = 0; e < n; e++) off[e] = tab[ix[e]];
    }
}

/* output columns [a, e) of a plane row read input columns ox * sw + dx inside [0, w) */
static void dconv_span(const conv_t *g, int64_t dx, int64_t *a, int64_t *e) {
    const int64_t lo = dx < 0 ? (-dx + g->sw - 1) / g->sw : 0, hi = g->w - dx > 0 ? (g->w - dx + g->sw - 1) / g->sw : 0;
    *a = lo < g->wo ? lo : g->wo;
    *e = hi < *a ? *a : hi < g->wo ? hi : g->wo;
}

/* one row of a plane of channel ch: image b's wo floats at b * wo hold its input row iy at columns ox * sw + dx
 * (zeros past the edges, and for images past the batch); zeros after the last image up to the pitch. Plain
 * loops, not memcpy / memset calls: the rows are short (wo floats) and there are kw * c * hp of them an image. */
static void dconv_fill_row(const dconv_job_t *j, float *dst, int64_t ch, int64_t iy, int64_t dx) {
    const conv_t *g = &j->g;
    const int64_t wo = g->wo, sw = g->sw;
    int64_t a, e;
    dconv_span(g, dx, &a, &e);
    const int64_t live = iy >= 0 && iy < g->h && e > a ? j->nbc : 0;  /* images with input on this row */
    for (int64_t b = 0; b < live; b++, dst += wo) {
        const float *src = j->x + ((j->b0 + b) * g->c + ch) * g->h * g->w + iy * g->w + dx;
        for (int64_t k = 0; k < a; k++) dst[k] = 0.f;
        if (sw == 1)
            for (int64_t k = a; k < e; k++) dst[k] = src[k];
        else
            for (int64_t k = a; k < e; k++) dst[k] = src[k * sw];
        for (int64_t k = e; k < wo; k++) dst[k] = 0.f;
    }
    for (int64_t k = 0; k < j->pitch - live * wo; k++) dst[k] = 0.f;
}

#if SK_X86
/* dconv_fill_row for column stride 1 with 16-lane masked loads and stores (no access outside [a, e) of a source
 * row, none past the pitch): the fill is kw times the input, which plain loops (SSE2 without -march) wrote at a
 * third of the panel kernel's time at 64 channels */
SK_AVX512 static void dconv_fill_row_avx512(const dconv_job_t *j, float *dst, int64_t ch, int64_t iy, int64_t dx) {
    const conv_t *g = &j->g;
    const int64_t wo = g->wo;
    int64_t a, e;
    dconv_span(g, dx, &a, &e);
    const int64_t live = iy >= 0 && iy < g->h && e > a ? j->nbc : 0;
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int64_t b = 0; b < live; b++, dst += wo) {
        const float *src = j->x + ((j->b0 + b) * g->c + ch) * g->h * g->w + iy * g->w + dx;
        for (int64_t k = 0; k < wo; k += 16) {
            const __m512i at = _mm512_add_epi32(lane, _mm512_set1_epi32((int)k));
            const __mmask16 in = _mm512_cmpge_epi32_mask(at, _mm512_set1_epi32((int)a)) &
                                 _mm512_cmplt_epi32_mask(at, _mm512_set1_epi32((int)e));
            const __mmask16 st = _mm512_cmplt_epi32_mask(at, _mm512_set1_epi32((int)wo));
            const __m512 v = _mm512_maskz_loadu_ps(in, src + k);
            if (st == 0xFFFF) _mm512_storeu_ps(dst + k, v);
            else _mm512_mask_storeu_ps(dst + k, st, v);
        }
    }
    const int64_t rest = j->pitch - live * wo;
    for (int64_t k = 0; k < rest; k += 16)
        _mm512_mask_storeu_ps(dst + k, rest - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (rest - k)) - 1u),
                              _mm512_setzero_ps());
}
#endif

/* plane (kernel column jj, channel ch) of one image whose rows are the pitch (w = wo = pitch, stride 1) for the band
 * from output row r0: the input rows it holds as one copy, shifted by dx, then its edge columns and the rows past
 * the image zeroed */
static void dconv_fill_image(const dconv_job_t *j, float *dst, int64_t ch, int64_t dx) {
    const conv_t *g = &j->g;
    const int64_t w = g->w, hw = g->h * w, a = dx < 0 ? -dx : 0, top = g->ph - j->r0; /* plane row of input row 0 */
    const int64_t ra = top > 0 ? top : 0, rb = top + g->h < j->hp ? top + g->h : j->hp;
    const float *src = j->x + (j->b0 * g->c + ch) * hw;
    if (rb <= ra) {
        memset(dst, 0, (size_t)(j->hp * w) * 4);
        return;
    }
    const int64_t s0 = (ra - top) * w + dx, n = (rb - ra) * w; /* dst[ra * w + t] = src[s0 + t] where in range */
    const int64_t lo = s0 < 0 ? -s0 : 0, hi = s0 + n > hw ? hw - s0 : n, end = hi > lo ? hi : lo;
    memset(dst, 0, (size_t)(ra * w + lo) * 4);
    if (hi > lo) memcpy(dst + ra * w + lo, src + s0 + lo, (size_t)(hi - lo) * 4);
    memset(dst + ra * w + end, 0, (size_t)((j->hp - ra) * w - end) * 4);
    for (int64_t r = ra; r < rb; r++) {  /* the columns the shift brought in from the neighbouring rows */
        float *row = dst + r * w;
        for (int64_t k = 0; k < a && k < w; k++) row[k] = 0.f;
        for (int64_t k = w - dx; k < w; k++)
            if (k >= 0) row[k] = 0.f;
    }
}

/* plane pl = j * phases + phase of channel ch for item pl * c + ch: row r holds input row r * sh + phase - ph, read
 * from column j - pw on with stride sw; item planes * c: the slack after the last */
void dconv_fill(void *ctx, int64_t item, int tid) {
    (void)tid;
    const dconv_job_t *j = (const dconv_job_t *)ctx;
    const conv_t *g = &j->g;
    const int64_t area = j->hp * j->pitch, np = dconv_phases(g);
    float *dst = j->plane + item * area;
    if (item == dconv_planes(g) * g->c) {
        memset(dst, 0, PANEL * 4);
        return;
    }
    const int64_t pl = item / g->c, ch = item % g->c, dx = pl / np - g->pw, iy0 = pl % np - g->ph;
    if (j->B == 1 && j->nbc == 1 && g->w == g->wo && j->pitch == g->wo && g->sh == 1 && g->sw == 1) {
        dconv_fill_image(j, dst, ch, dx);
        return;
    }
#if SK_X86
    if (g_isa == ISA_AVX512 && g->sw == 1) {
        for (int64_t r = 0; r < j->hp; r++)
            dconv_fill_row_avx512(j, dst + r * j->pitch, ch, (j->r0 + r) * g->sh + iy0, dx);
        return;
    }
#endif
    for (int64_t r = 0; r < j->hp; r++) dconv_fill_row(j, dst + r * j->pitch, ch, (j->r0 + r) * g->sh + iy0, dx);
}

/* runs of output pixels among grid pixels q0 .. q0 + 63: lane, destination pixel (b * C_out * npix + oy * wo + ox)
 * and length of each; returns their count (at most PANEL) */
static int dconv_runs(const dconv_job_t *j, int64_t q0, int64_t lane[PANEL], int64_t dst[PANEL], int64_t len[PANEL]) {
    const conv_t *g = &j->g;
    const int64_t npix = g->ho * g->wo, end = q0 + PANEL, used = j->nbc * g->wo;
    int m = 0;
    for (int64_t q = q0; q < end;) {
        const int64_t oy = j->r0 + q / j->pitch, rem = q % j->pitch;
        if (oy >= j->r0 + j->rows) break;
        if (rem >= used) {  /* images past the batch and the pitch's pad: to the next row */
            q += j->pitch - rem;
            continue;
        }
        const int64_t b = rem / g->wo, ox = rem % g->wo, n = g->wo - ox < end - q ? g->wo - ox : end - q;
        const int64_t d = (j->b0 + b) * j->w.n_out * npix + oy * g->wo + ox;
        if (m > 0 && lane[m - 1] + len[m - 1] == q - q0 && dst[m - 1] + len[m - 1] == d) {
            len[m - 1] += n;  /* one image's next output row right after its last: one copy (pitch = wo) */
        } else {
            lane[m] = q - q0;
            dst[m] = d;
            len[m++] = n;
        }
        q += n;
    }
    return m;
}

#if SK_X86
/* a whole panel of output pixels (one run of 64) into its rows of y: one call, not one memcpy a row */
SK_AVX512 static void dconv_copy_panel_avx512(const float *yp, float *y, int64_t n_out, int64_t npix) {
    for (int64_t o = 0; o < n_out; o++, yp += PANEL, y += npix)
        for (int q = 0; q < PANEL; q += 16) _mm512_storeu_ps(y + q, _mm512_load_ps(yp + q));
}
#endif

void dconv_item(void *ctx, int64_t p, int tid) {
    const dconv_job_t *j = (const dconv_job_t *)ctx;
    const int64_t npix = j->g.ho * j->g.wo;
    float *yp = j->scratch + (int64_t)tid * j->per_thread;
    const rowout_t ro = {NULL, 0, PANEL, 0, 0};
    panel_rows(j->fn, &j->w, j->bp, j->ord, j->nb, &ro, 0, j->w.n_out, j->plane + p * PANEL, yp);
    int64_t lane[PANEL], dst[PANEL], len[PANEL];
    const int m = dconv_runs(j, p * PANEL, lane, dst, len);
#if SK_X86
    if (g_isa == ISA_AVX512 && m == 1 && len[0] == PANEL && !j->res && !(j->hi < INFINITY)) {
        dconv_copy_panel_avx512(yp, j->y + dst[0], j->w.n_out, npix);
        return;
    }
#endif
    for (int64_t o = 0; o < j->w.n_out; o++)
        for (int s = 0; s < m; s++)
            conv_put(j->y + dst[s] + o * npix, yp + o * PANEL + lane[s], len[s], j->res ? j->res + dst[s] + o * npix : NULL,
                     j->post_relu, j->hi);
}
