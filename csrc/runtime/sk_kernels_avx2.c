/* The AVX2 + FMA kernels (per-function target attributes: the file builds without -march). */
#include "sk_runtime.h"

#if SK_X86
SK_AVX2 void rows_avx2(const sliced_t *wp, const float *x, float *y, int64_t B, int64_t s0, int64_t s1) {
    const sliced_t wl = *wp, *w = &wl;
    float out[SLICE] __attribute__((aligned(32)));
    for (int64_t s = s0; s < s1; s++) {
        const int64_t a = w->slice_ptr[s], L = (w->slice_ptr[s + 1] - a) / SLICE;
        const float *v = w->val + a;
        const __m256 blo = w->bias ? _mm256_loadu_ps(w->bias + s * SLICE) : _mm256_setzero_ps();
        const __m256 bhi = w->bias ? _mm256_loadu_ps(w->bias + s * SLICE + 8) : _mm256_setzero_ps();
        for (int64_t b = 0; b < B; b++) {
            const float *xb = x + b * w->n_in;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            int64_t j = 0;
            if (w->idx16) {
                const uint16_t *ix = (const uint16_t *)w->idx + a;
                for (; j + 2 <= L; j += 2) {
                    const __m256i i0 = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(ix + j * SLICE)));
                    const __m256i i1 = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(ix + j * SLICE + 8)));
                    const __m256i i2 = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(ix + j * SLICE + 16)));
                    const __m256i i3 = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(ix + j * SLICE + 24)));
                    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(v + j * SLICE), _mm256_i32gather_ps(xb, i0, 4), a0);
                    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(v + j * SLICE + 8), _mm256_i32gather_ps(xb, i1, 4), a1);
                    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(v + j * SLICE + 16), _mm256_i32gather_ps(xb, i2, 4), a2);
                    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(v + j * SLICE + 24), _mm256_i32gather_ps(xb, i3, 4), a3);
                }
                if (j < L) {
                    const __m256i i0 = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(ix + j * SLICE)));
                    const __m256i i1 = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(ix + j * SLICE + 8)));
                    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(v + j * SLICE), _mm256_i32gather_ps(xb, i0, 4), a0);
                    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(v + j * SLICE + 8), _mm256_i32gather_ps(xb, i1, 4), a1);
                }
            } else {
                const int32_t *ix = (const int32_t *)w->idx + a;
                for (; j < L; j++) {
                    const __m256i i0 = _mm256_loadu_si256((const __m256i *)(ix + j * SLICE));
                    const __m256i i1 = _mm256_loadu_si256((const __m256i *)(ix + j * SLICE + 8));
                    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(v + j * SLICE), _mm256_i32gather_ps(xb, i0, 4), a0);
                    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(v + j * SLICE + 8), _mm256_i32gather_ps(xb, i1, 4), a1);
                }
            }
            __m256 lo = _mm256_add_ps(_mm256_add_ps(a0, a2), blo), hi = _mm256_add_ps(_mm256_add_ps(a1, a3), bhi);
            if (w->relu) {
                lo = _mm256_max_ps(lo, _mm256_setzero_ps());
                hi = _mm256_max_ps(hi, _mm256_setzero_ps());
            }
            _mm256_store_ps(out, lo);
            _mm256_store_ps(out + 8, hi);
            float *yb = y + b * w->n_out;
            const int32_t *pm = w->perm + s * SLICE;
            for (int l = 0; l < SLICE; l++)
                if (pm[l] >= 0) yb[pm[l]] = out[l];
        }
    }
}

/* one x value per lane from a 16-wide window (lo, hi: its two halves) by 4-bit indices: two in-register
 * permutes and a blend on bit 3 (AVX2 has no two-table permute) */
SK_AVX2 static inline __m256 window16_pick(__m256 lo, __m256 hi, __m256i i) {
    const __m256 a = _mm256_permutevar8x32_ps(lo, i), b = _mm256_permutevar8x32_ps(hi, i);
    return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(i, 28)));
}

/* window form, windows of WINDOW_AVX2 (16) inputs: per slot two 8-lane halves, each a permute pick from
 * the window's two registers; no gathers */
SK_AVX2 void window_avx2(const sliced_t *wp, const float *x, float *y, int64_t B, int64_t s0, int64_t s1) {
    const sliced_t wl = *wp, *w = &wl;
    const uint8_t *ix = (const uint8_t *)w->idx;
    float out[SLICE] __attribute__((aligned(32)));
    for (int64_t s = s0; s < s1; s++) {
        const int64_t a = w->slice_ptr[s] / SLICE, e = w->slice_ptr[s + 1] / SLICE;
        const int64_t nl = w->n_out - s * SLICE < SLICE ? w->n_out - s * SLICE : SLICE;
        const __m256 blo = w->bias ? _mm256_loadu_ps(w->bias + s * SLICE) : _mm256_setzero_ps();
        const __m256 bhi = w->bias ? _mm256_loadu_ps(w->bias + s * SLICE + 8) : _mm256_setzero_ps();
        for (int64_t b = 0; b < B; b++) {
            const float *xb = x + b * w->n_in;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0;
            for (int64_t k = a; k < e; k++) {
                const float *xw = xb + w->win[k];
                const __m256 lo = _mm256_loadu_ps(xw), hi = _mm256_loadu_ps(xw + 8);
                const __m256i i0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(ix + k * SLICE)));
                const __m256i i1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(ix + k * SLICE + 8)));
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w->val + k * SLICE), window16_pick(lo, hi, i0), a0);
                a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w->val + k * SLICE + 8), window16_pick(lo, hi, i1), a1);
            }
            __m256 r0 = _mm256_add_ps(a0, blo), r1 = _mm256_add_ps(a1, bhi);
            if (w->relu) {
                r0 = _mm256_max_ps(r0, _mm256_setzero_ps());
                r1 = _mm256_max_ps(r1, _mm256_setzero_ps());
            }
            float *yb = y + b * w->n_out + s * SLICE;
            if (nl == SLICE) {
                _mm256_storeu_ps(yb, r0);
                _mm256_storeu_ps(yb + 8, r1);
            } else {
                _mm256_store_ps(out, r0);
                _mm256_store_ps(out + 8, r1);
                for (int64_t l = 0; l < nl; l++) yb[l] = out[l];
            }
        }
    }
}

SK_AVX2 void panel_avx2(const csr_t *w, const int32_t *ord, const float *xp, float *yp, int64_t k0, int64_t k1,
                               int first, int last, const rowout_t *ro) {
    float tile[TILE_ROWS * PANEL] __attribute__((aligned(64)));
    const int fuse = last && ro && ro->y && !ord;
    const int sh = col_shift(w);
    int64_t tbase = k0;
    for (int64_t r = k0; r < k1; r++) {
        const int64_t o = ord ? (int64_t)ord[r] : r;
        const int64_t s = w->rowptr[r], e = w->rowptr[r + 1];
        float *out = yp + o * PANEL;
        if (!first && !last && s == e) continue;
        __m256 a0, a1, a2, a3, a4, a5, a6, a7;
        if (first) {
            a0 = _mm256_setzero_ps(); a1 = a0; a2 = a0; a3 = a0; a4 = a0; a5 = a0; a6 = a0; a7 = a0;
        } else {
            a0 = _mm256_loadu_ps(out); a1 = _mm256_loadu_ps(out + 8); a2 = _mm256_loadu_ps(out + 16);
            a3 = _mm256_loadu_ps(out + 24); a4 = _mm256_loadu_ps(out + 32); a5 = _mm256_loadu_ps(out + 40);
            a6 = _mm256_loadu_ps(out + 48); a7 = _mm256_loadu_ps(out + 56);
        }
        for (int64_t k = s; k < e; k++) {
            const __m256 v = _mm256_broadcast_ss(w->val + k);
            const float *p = xp + (idx_at(w, k) << sh);
            a0 = _mm256_fmadd_ps(v, _mm256_loadu_ps(p), a0);
            a1 = _mm256_fmadd_ps(v, _mm256_loadu_ps(p + 8), a1);
            a2 = _mm256_fmadd_ps(v, _mm256_loadu_ps(p + 16), a2);
            a3 = _mm256_fmadd_ps(v, _mm256_loadu_ps(p + 24), a3);
            a4 = _mm256_fmadd_ps(v, _mm256_loadu_ps(p + 32), a4);
            a5 = _mm256_fmadd_ps(v, _mm256_loadu_ps(p + 40), a5);
            a6 = _mm256_fmadd_ps(v, _mm256_loadu_ps(p + 48), a6);
            a7 = _mm256_fmadd_ps(v, _mm256_loadu_ps(p + 56), a7);
        }
        const __m256 bb = _mm256_set1_ps((last && w->bias) ? w->bias[o] : 0.f);
        __m256 acc[8] = {a0, a1, a2, a3, a4, a5, a6, a7};
        float *dst = fuse ? tile + (r - tbase) * PANEL : out;
        for (int j = 0; j < 8; j++) {
            __m256 t = last ? _mm256_add_ps(acc[j], bb) : acc[j];
            if (last && w->relu) t = _mm256_max_ps(t, _mm256_setzero_ps());
            _mm256_storeu_ps(dst + 8 * j, t);
        }
        if (fuse && (r + 1 - tbase == TILE_ROWS || r + 1 == k1)) {
            tile_flush(ro, tile, tbase, r + 1 - tbase);
            tbase = r + 1;
        }
    }
}

/* The block kernel's pass over one block row for rows j0 .. j0+RT-1 of the block (RT = 4, or 2 when R = 2),
 * lanes l0 .. l0+15 (two registers): 2 RT accumulators, each entry's 16 inputs loaded once for RT rows. */
__attribute__((always_inline)) SK_AVX2 static inline void block_avx2_pass(
    const csr_t *w, const float *xp, const float *out, float *dst, int64_t s, int64_t e, int64_t j0, int64_t r0,
    int64_t l0, int first, int last, const int RT) {
    const int64_t R = w->rb;
    const float *val = w->val + j0;
    const int sh = col_shift(w);
    __m256 a[4][2];
    for (int t = 0; t < RT; t++)
        for (int q = 0; q < 2; q++)
            a[t][q] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(out + t * PANEL + l0 + 8 * q);
    for (int64_t k = s; k < e; k++) {
        const float *p = xp + (idx_at(w, k) << sh) + l0;
        const __m256 x0 = _mm256_loadu_ps(p), x1 = _mm256_loadu_ps(p + 8);
        for (int t = 0; t < RT; t++) {
            const __m256 v = _mm256_broadcast_ss(val + k * R + t);
            a[t][0] = _mm256_fmadd_ps(v, x0, a[t][0]);
            a[t][1] = _mm256_fmadd_ps(v, x1, a[t][1]);
        }
    }
    for (int t = 0; t < RT; t++) {
        const __m256 bb = _mm256_set1_ps((last && w->bias) ? w->bias[r0 + t] : 0.f);
        for (int q = 0; q < 2; q++) {
            __m256 y = last ? _mm256_add_ps(a[t][q], bb) : a[t][q];
            if (last && w->relu) y = _mm256_max_ps(y, _mm256_setzero_ps());
            _mm256_storeu_ps(dst + t * PANEL + l0 + 8 * q, y);
        }
    }
}

__attribute__((always_inline)) SK_AVX2 static inline void block_avx2_rows(
    const csr_t *w, const float *xp, float *yp, int64_t k0, int64_t k1, int first, int last, const rowout_t *ro,
    const int RT) {
    float tile[TILE_ROWS * PANEL] __attribute__((aligned(64)));
    const int64_t R = w->rb;
    const int fuse = last && ro && ro->y;
    int64_t tbase = k0;
    for (int64_t br = k0 / R; br < k1 / R; br++) {
        const int64_t s = w->rowptr[br], e = w->rowptr[br + 1];
        if (!first && !last && s == e) continue;
        for (int64_t j0 = 0; j0 < R; j0 += RT) {
            const int64_t r0 = br * R + j0;
            float *out = yp + r0 * PANEL, *dst = fuse ? tile + (r0 - tbase) * PANEL : out;
            for (int64_t l0 = 0; l0 < PANEL; l0 += 16) block_avx2_pass(w, xp, out, dst, s, e, j0, r0, l0, first, last, RT);
            if (fuse && (r0 + RT - tbase == TILE_ROWS || r0 + RT == k1)) {
                tile_flush(ro, tile, tbase, r0 + RT - tbase);
                tbase = r0 + RT;
            }
        }
    }
}

/* the block kernel (R x 1 row blocks, see sk_runtime.h), AVX2: 16 lanes of 4 rows (2 when R = 2) per pass */
SK_AVX2 void block_avx2(const csr_t *w, const int32_t *ord, const float *xp, float *yp, int64_t k0, int64_t k1,
                        int first, int last, const rowout_t *ro) {
    (void)ord;
    if (w->rb == 2) block_avx2_rows(w, xp, yp, k0, k1, first, last, ro, 2);
    else block_avx2_rows(w, xp, yp, k0, k1, first, last, ro, 4);
}

/* 8x8 float transpose: dst[c][r] = src[r][c] (row strides ss, ds in floats). */
SK_AVX2 void tr8x8_avx2(const float *src, int64_t ss, float *dst, int64_t ds) {
    __m256 r0 = _mm256_loadu_ps(src), r1 = _mm256_loadu_ps(src + ss), r2 = _mm256_loadu_ps(src + 2 * ss),
           r3 = _mm256_loadu_ps(src + 3 * ss), r4 = _mm256_loadu_ps(src + 4 * ss), r5 = _mm256_loadu_ps(src + 5 * ss),
           r6 = _mm256_loadu_ps(src + 6 * ss), r7 = _mm256_loadu_ps(src + 7 * ss);
    __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1), t2 = _mm256_unpacklo_ps(r2, r3),
           t3 = _mm256_unpackhi_ps(r2, r3), t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5),
           t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
    __m256 u0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0)), u1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2)),
           u2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0)), u3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2)),
           u4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0)), u5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2)),
           u6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0)), u7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
    _mm256_storeu_ps(dst, _mm256_permute2f128_ps(u0, u4, 0x20));
    _mm256_storeu_ps(dst + ds, _mm256_permute2f128_ps(u1, u5, 0x20));
    _mm256_storeu_ps(dst + 2 * ds, _mm256_permute2f128_ps(u2, u6, 0x20));
    _mm256_storeu_ps(dst + 3 * ds, _mm256_permute2f128_ps(u3, u7, 0x20));
    _mm256_storeu_ps(dst + 4 * ds, _mm256_permute2f128_ps(u0, u4, 0x31));
    _mm256_storeu_ps(dst + 5 * ds, _mm256_permute2f128_ps(u1, u5, 0x31));
    _mm256_storeu_ps(dst + 6 * ds, _mm256_permute2f128_ps(u2, u6, 0x31));
    _mm256_storeu_ps(dst + 7 * ds, _mm256_permute2f128_ps(u3, u7, 0x31));
}

#endif /* SK_X86 */
