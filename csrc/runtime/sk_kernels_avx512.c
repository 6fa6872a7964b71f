/* The AVX-512F kernels (per-function target attributes: the file builds without -march). */
#include "sk_runtime.h"

#if SK_X86
/* rows 0..nrows-1 of a tile (TILE_ROWS rows of PANEL lanes, lanes 0..tb-1 valid) into row-major y:
 * 16x16 transposes in registers, one 64-byte store per sample and 16 rows (masked for a ragged last
 * tile), rather than 8x8 transposes writing two 32-byte halves of each line at different times (with
 * y's rows a power-of-two apart every line of a tile sits in one L1 set). stream: non-temporal stores
 * for large outputs (y 64-byte aligned, whole tiles only): no read-for-ownership of y's lines, which
 * sit n_out*4 bytes apart and would otherwise all compete for one L1 set. */
SK_AVX512 void tile_flush_avx512(const float *tile, float *y, int64_t ldy, int stream, int64_t tb,
                                        int64_t nrows) {
    const __mmask16 keep = nrows >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << nrows) - 1);
    for (int s0 = 0; s0 < tb; s0 += 16) {
        __m512 r[16], t[16];
        /* only the nrows rows that exist: the tile may be the end of a panel buffer (flush_rows), and
         * reading rows past it would run off the allocation when n_out % 16 != 0 */
        for (int i = 0; i < 16; i++) r[i] = i < nrows ? _mm512_load_ps(tile + i * PANEL + s0) : _mm512_setzero_ps();
        for (int i = 0; i < 16; i += 2) {
            t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
            t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
        }
        for (int i = 0; i < 16; i += 4) {
            r[i] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
            r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
            r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
            r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
        }
        for (int i = 0; i < 4; i++) {
            t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
            t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xDD);
            t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
            t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xDD);
        }
        for (int i = 0; i < 4; i++) {
            r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
            r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
            r[i + 4] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0x88);
            r[i + 12] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0xDD);
        }
        const int ns = tb - s0 < 16 ? (int)(tb - s0) : 16;
        if (stream)
            for (int i = 0; i < ns; i++) _mm512_stream_ps(y + (int64_t)(s0 + i) * ldy, r[i]);
        else if (nrows >= 16)
            for (int i = 0; i < ns; i++) _mm512_storeu_ps(y + (int64_t)(s0 + i) * ldy, r[i]);
        else
            for (int i = 0; i < ns; i++) _mm512_mask_storeu_ps(y + (int64_t)(s0 + i) * ldy, keep, r[i]);
    }
}

/* The rows kernels work on a local copy of the layout (*w): the build has no strict aliasing, so each
 * slice's stores into y would otherwise make the compiler reload w's fields from memory for the next
 * slice. */
SK_AVX512 void rows_avx512(const sliced_t *wp, const float *x, float *y, int64_t B, int64_t s0, int64_t s1) {
    const sliced_t wl = *wp, *w = &wl;
    for (int64_t s = s0; s < s1; s++) {
        const int64_t a = w->slice_ptr[s], L = (w->slice_ptr[s + 1] - a) / SLICE;
        const float *v = w->val + a;
        const __m512i pm = _mm512_loadu_si512((const void *)(w->perm + s * SLICE));
        const __mmask16 valid = _mm512_cmpge_epi32_mask(pm, _mm512_setzero_si512());
        const __m512 bb = w->bias ? _mm512_loadu_ps(w->bias + s * SLICE) : _mm512_setzero_ps();
        for (int64_t b = 0; b < B; b++) {
            const float *xb = x + b * w->n_in;
            __m512 a0 = _mm512_setzero_ps(), a1 = a0;
            int64_t j = 0;
            if (w->idx16) {
                const uint16_t *ix = (const uint16_t *)w->idx + a;
                for (; j + 2 <= L; j += 2) {
                    const __m512i i0 = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(ix + j * SLICE)));
                    const __m512i i1 = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(ix + j * SLICE + 16)));
                    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(v + j * SLICE), _mm512_i32gather_ps(i0, xb, 4), a0);
                    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(v + j * SLICE + 16), _mm512_i32gather_ps(i1, xb, 4), a1);
                }
                if (j < L) {
                    const __m512i i0 = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(ix + j * SLICE)));
                    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(v + j * SLICE), _mm512_i32gather_ps(i0, xb, 4), a0);
                }
            } else {
                const int32_t *ix = (const int32_t *)w->idx + a;
                for (; j < L; j++) {
                    const __m512i i0 = _mm512_loadu_si512((const void *)(ix + j * SLICE));
                    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(v + j * SLICE), _mm512_i32gather_ps(i0, xb, 4), a0);
                }
            }
            __m512 r = _mm512_add_ps(_mm512_add_ps(a0, a1), bb);
            if (w->relu) r = _mm512_max_ps(r, _mm512_setzero_ps());
            _mm512_mask_i32scatter_ps(y + b * w->n_out, valid, pm, r, 4);
        }
    }
}

/* one slot's 16 inputs from the 32-input window at xw, picked by the lanes' in-window indices i */
#define WINDOW_PICK(xw, i) _mm512_permutex2var_ps(_mm512_loadu_ps(xw), (i), _mm512_loadu_ps((xw) + 16))

/* y rows of slice s for samples b, b+1 (pair) or b alone: bias, ReLU, a store masked at n_out */
SK_AVX512 static inline void window_store(const sliced_t *w, float *y, int64_t s, int64_t b, __m512 r, __mmask16 keep,
                                          __m512 bb) {
    r = _mm512_add_ps(r, bb);
    if (w->relu) r = _mm512_max_ps(r, _mm512_setzero_ps());
    _mm512_mask_storeu_ps(y + b * w->n_out + s * SLICE, keep, r);
}

/* window form, windows of WINDOW_AVX512 (32) inputs: per slot the window is two registers and one
 * two-table permute (vpermt2ps) picks each lane's input, where the gather form issues a 16-lane gather
 * (microcoded on AMD Zen 4/5: 1024x1024 90% at batch 1 runs ~3x faster this way there). Samples go two
 * at a time through a slice (the slot's values and indices loaded once for both: at batch 2-7 the
 * layout, not the input, is what streams from cache), one at a time at batch 1 with two accumulators
 * for the FMA latency; the last slice's store is masked at n_out. */
SK_AVX512 void window_avx512(const sliced_t *wp, const float *x, float *y, int64_t B, int64_t s0, int64_t s1) {
    const sliced_t wl = *wp, *w = &wl;
    const uint8_t *ix = (const uint8_t *)w->idx;
    for (int64_t s = s0; s < s1; s++) {
        const int64_t a = w->slice_ptr[s] / SLICE, e = w->slice_ptr[s + 1] / SLICE;
        const int64_t nl = w->n_out - s * SLICE < SLICE ? w->n_out - s * SLICE : SLICE;
        const __mmask16 keep = (__mmask16)((1u << nl) - 1);
        const __m512 bb = w->bias ? _mm512_loadu_ps(w->bias + s * SLICE) : _mm512_setzero_ps();
        int64_t b = 0;
        for (; b + 2 <= B; b += 2) {
            const float *x0 = x + b * w->n_in, *x1 = x0 + w->n_in;
            __m512 a0 = _mm512_setzero_ps(), a1 = a0;
            for (int64_t k = a; k < e; k++) {
                const __m512i i0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(ix + k * SLICE)));
                const __m512 v = _mm512_loadu_ps(w->val + k * SLICE);
                a0 = _mm512_fmadd_ps(v, WINDOW_PICK(x0 + w->win[k], i0), a0);
                a1 = _mm512_fmadd_ps(v, WINDOW_PICK(x1 + w->win[k], i0), a1);
            }
            window_store(w, y, s, b, a0, keep, bb);
            window_store(w, y, s, b + 1, a1, keep, bb);
        }
        if (b < B) {
            const float *xb = x + b * w->n_in;
            __m512 a0 = _mm512_setzero_ps(), a1 = a0;
            int64_t k = a;
            for (; k + 2 <= e; k += 2) {
                const __m512i i0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(ix + k * SLICE)));
                const __m512i i1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(ix + k * SLICE + 16)));
                a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w->val + k * SLICE), WINDOW_PICK(xb + w->win[k], i0), a0);
                a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w->val + k * SLICE + 16), WINDOW_PICK(xb + w->win[k + 1], i1), a1);
            }
            if (k < e) {
                const __m512i i0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(ix + k * SLICE)));
                a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w->val + k * SLICE), WINDOW_PICK(xb + w->win[k], i0), a0);
            }
            window_store(w, y, s, b, _mm512_add_ps(a0, a1), keep, bb);
        }
    }
}
#undef WINDOW_PICK

/* panel_avx512 on part of a panel: lanes 0..16*nr-1 only (nr = 2: half a panel, 32 samples; nr = 1: a
 * quarter, 16 samples), nr registers per row. A batch of at most 16 or 32 samples on one thread pays
 * for its lanes only (a partial full panel costs a whole one), and a 64-sample panel split between two
 * threads by samples has each thread read only its half of every input row and write only its half of
 * every output row, so no activation line is shared and both threads keep their own half of the
 * activations in their own cache through a whole chain. Kept apart from panel_avx512: one body generic
 * in the register count for full panels too (nr = 4) was slower there. */
__attribute__((always_inline)) SK_AVX512 static inline void panel_avx512_part(
    const csr_t *w, const int32_t *ord, const float *xp, float *yp, int64_t k0, int64_t k1, int first,
    int last, const rowout_t *ro, const int nr) {
    float tile[TILE_ROWS * PANEL] __attribute__((aligned(64)));
    const int fuse = last && ro && ro->y && !ord;
    const int sh = col_shift(w);
    int64_t tbase = k0;
    for (int64_t r = k0; r < k1; r++) {
        const int64_t o = ord ? (int64_t)ord[r] : r;
        const int64_t s = w->rowptr[r], e = w->rowptr[r + 1];
        float *out = yp + o * PANEL;
        if (!first && !last && s == e) continue;
        __m512 a[2], c[2];
        for (int q = 0; q < nr; q++) {
            a[q] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(out + 16 * q);
            c[q] = _mm512_setzero_ps();
        }
        int64_t k = s;
        if (nr == 1) { /* one register a row: four FMA chains (two leave the FMA latency exposed) */
            __m512 a2 = _mm512_setzero_ps(), a3 = a2;
            for (; k + 4 <= e; k += 4) {
                a[0] = _mm512_fmadd_ps(_mm512_set1_ps(w->val[k]), _mm512_loadu_ps(xp + (idx_at(w, k) << sh)), a[0]);
                c[0] = _mm512_fmadd_ps(_mm512_set1_ps(w->val[k + 1]), _mm512_loadu_ps(xp + (idx_at(w, k + 1) << sh)),
                                       c[0]);
                a2 = _mm512_fmadd_ps(_mm512_set1_ps(w->val[k + 2]), _mm512_loadu_ps(xp + (idx_at(w, k + 2) << sh)), a2);
                a3 = _mm512_fmadd_ps(_mm512_set1_ps(w->val[k + 3]), _mm512_loadu_ps(xp + (idx_at(w, k + 3) << sh)), a3);
            }
            a[0] = _mm512_add_ps(a[0], a2);
            c[0] = _mm512_add_ps(c[0], a3);
        }
        for (; k + 2 <= e; k += 2) {
            const __m512 v = _mm512_set1_ps(w->val[k]);
            const __m512 u = _mm512_set1_ps(w->val[k + 1]);
            const float *p = xp + (idx_at(w, k) << sh);
            const float *pq = xp + (idx_at(w, k + 1) << sh);
            for (int q = 0; q < nr; q++) {
                a[q] = _mm512_fmadd_ps(v, _mm512_loadu_ps(p + 16 * q), a[q]);
                c[q] = _mm512_fmadd_ps(u, _mm512_loadu_ps(pq + 16 * q), c[q]);
            }
        }
        if (k < e) {
            const __m512 v = _mm512_set1_ps(w->val[k]);
            const float *p = xp + (idx_at(w, k) << sh);
            for (int q = 0; q < nr; q++) a[q] = _mm512_fmadd_ps(v, _mm512_loadu_ps(p + 16 * q), a[q]);
        }
        const __m512 bb = _mm512_set1_ps((last && w->bias) ? w->bias[o] : 0.f);
        float *dst = fuse ? tile + (r - tbase) * PANEL : out;
        for (int q = 0; q < nr; q++) {
            __m512 rq = _mm512_add_ps(_mm512_add_ps(a[q], c[q]), bb);
            if (last && w->relu) rq = _mm512_max_ps(rq, _mm512_setzero_ps());
            _mm512_storeu_ps(dst + 16 * q, rq);
        }
        if (fuse && (r + 1 - tbase == TILE_ROWS || r + 1 == k1)) {
            tile_flush(ro, tile, tbase, r + 1 - tbase);
            tbase = r + 1;
        }
    }
}

SK_AVX512 static void panel_avx512_half(const csr_t *w, const int32_t *ord, const float *xp, float *yp,
                                        int64_t k0, int64_t k1, int first, int last, const rowout_t *ro) {
    panel_avx512_part(w, ord, xp, yp, k0, k1, first, last, ro, 2);
}

SK_AVX512 static void panel_avx512_quarter(const csr_t *w, const int32_t *ord, const float *xp, float *yp,
                                           int64_t k0, int64_t k1, int first, int last, const rowout_t *ro) {
    panel_avx512_part(w, ord, xp, yp, k0, k1, first, last, ro, 1);
}

SK_AVX512 void panel_avx512(const csr_t *w, const int32_t *ord, const float *xp, float *yp, int64_t k0,
                                   int64_t k1, int first, int last, const rowout_t *ro) {
    if (ro && ro->lanes == PANEL / 2) {
        panel_avx512_half(w, ord, xp, yp, k0, k1, first, last, ro);
        return;
    }
    if (ro && ro->lanes == PANEL / 4) {
        panel_avx512_quarter(w, ord, xp, yp, k0, k1, first, last, ro);
        return;
    }
    float tile[TILE_ROWS * PANEL] __attribute__((aligned(64)));
    const int fuse = last && ro && ro->y && !ord;
    const int sh = col_shift(w);
    int64_t tbase = k0;
    for (int64_t r = k0; r < k1; r++) {
        const int64_t o = ord ? (int64_t)ord[r] : r;
        const int64_t s = w->rowptr[r], e = w->rowptr[r + 1];
        float *out = yp + o * PANEL;
        if (!first && !last && s == e) continue;
        __m512 a0, a1, a2, a3, c0 = _mm512_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;
        if (first) {
            a0 = c0; a1 = c0; a2 = c0; a3 = c0;
        } else {
            a0 = _mm512_loadu_ps(out); a1 = _mm512_loadu_ps(out + 16);
            a2 = _mm512_loadu_ps(out + 32); a3 = _mm512_loadu_ps(out + 48);
        }
        int64_t k = s;
        for (; k + 2 <= e; k += 2) {
            const __m512 v = _mm512_set1_ps(w->val[k]);
            const __m512 u = _mm512_set1_ps(w->val[k + 1]);
            const float *p = xp + (idx_at(w, k) << sh);
            const float *q = xp + (idx_at(w, k + 1) << sh);
            a0 = _mm512_fmadd_ps(v, _mm512_loadu_ps(p), a0);
            a1 = _mm512_fmadd_ps(v, _mm512_loadu_ps(p + 16), a1);
            a2 = _mm512_fmadd_ps(v, _mm512_loadu_ps(p + 32), a2);
            a3 = _mm512_fmadd_ps(v, _mm512_loadu_ps(p + 48), a3);
            c0 = _mm512_fmadd_ps(u, _mm512_loadu_ps(q), c0);
            c1 = _mm512_fmadd_ps(u, _mm512_loadu_ps(q + 16), c1);
            c2 = _mm512_fmadd_ps(u, _mm512_loadu_ps(q + 32), c2);
            c3 = _mm512_fmadd_ps(u, _mm512_loadu_ps(q + 48), c3);
        }
        if (k < e) {
            const __m512 v = _mm512_set1_ps(w->val[k]);
            const float *p = xp + (idx_at(w, k) << sh);
            a0 = _mm512_fmadd_ps(v, _mm512_loadu_ps(p), a0);
            a1 = _mm512_fmadd_ps(v, _mm512_loadu_ps(p + 16), a1);
            a2 = _mm512_fmadd_ps(v, _mm512_loadu_ps(p + 32), a2);
            a3 = _mm512_fmadd_ps(v, _mm512_loadu_ps(p + 48), a3);
        }
        const __m512 bb = _mm512_set1_ps((last && w->bias) ? w->bias[o] : 0.f);
        __m512 r0 = _mm512_add_ps(_mm512_add_ps(a0, c0), bb), r1 = _mm512_add_ps(_mm512_add_ps(a1, c1), bb);
        __m512 r2 = _mm512_add_ps(_mm512_add_ps(a2, c2), bb), r3 = _mm512_add_ps(_mm512_add_ps(a3, c3), bb);
        if (last && w->relu) {
            const __m512 z = _mm512_setzero_ps();
            r0 = _mm512_max_ps(r0, z); r1 = _mm512_max_ps(r1, z);
            r2 = _mm512_max_ps(r2, z); r3 = _mm512_max_ps(r3, z);
        }
        float *dst = fuse ? tile + (r - tbase) * PANEL : out;
        _mm512_storeu_ps(dst, r0);
        _mm512_storeu_ps(dst + 16, r1);
        _mm512_storeu_ps(dst + 32, r2);
        _mm512_storeu_ps(dst + 48, r3);
        if (fuse && (r + 1 - tbase == TILE_ROWS || r + 1 == k1)) {
            tile_flush(ro, tile, tbase, r + 1 - tbase);
            tbase = r + 1;
        }
    }
}

/* The block kernel's pass over one block row for rows j0 .. j0+RT-1 of the block (RT = 4, or 2 when R = 2)
 * on nr registers of lanes: each entry's input row (nr vectors) is loaded once and multiplied into RT rows'
 * accumulators (its RT values broadcast). With fewer than 16 accumulators a second set takes every other
 * entry, so enough FMA chains are in flight. Results: bias and ReLU when `last`, stored into dst rows
 * (PANEL apart). */
__attribute__((always_inline)) SK_AVX512 static inline void block_avx512_pass(
    const csr_t *w, const float *xp, const float *out, float *dst, int64_t s, int64_t e, int64_t j0, int64_t r0,
    int first, int last, const int RT, const int nr) {
    const int64_t R = w->rb;
    const float *val = w->val + j0;
    const int sh = col_shift(w);
    __m512 a[4][4], c[4][4];
    for (int t = 0; t < RT; t++)
        for (int q = 0; q < nr; q++) {
            a[t][q] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(out + t * PANEL + 16 * q);
            c[t][q] = _mm512_setzero_ps();
        }
    int64_t k = s;
    if (RT * nr < 16) {
        for (; k + 2 <= e; k += 2) {
            const float *p = xp + (idx_at(w, k) << sh), *pn = xp + (idx_at(w, k + 1) << sh);
            __m512 x[4], xn[4];
            for (int q = 0; q < nr; q++) {
                x[q] = _mm512_loadu_ps(p + 16 * q);
                xn[q] = _mm512_loadu_ps(pn + 16 * q);
            }
            for (int t = 0; t < RT; t++) {
                const __m512 v = _mm512_set1_ps(val[k * R + t]), u = _mm512_set1_ps(val[(k + 1) * R + t]);
                for (int q = 0; q < nr; q++) {
                    a[t][q] = _mm512_fmadd_ps(v, x[q], a[t][q]);
                    c[t][q] = _mm512_fmadd_ps(u, xn[q], c[t][q]);
                }
            }
        }
    }
    for (; k < e; k++) {
        const float *p = xp + (idx_at(w, k) << sh);
        __m512 x[4];
        for (int q = 0; q < nr; q++) x[q] = _mm512_loadu_ps(p + 16 * q);
        for (int t = 0; t < RT; t++) {
            const __m512 v = _mm512_set1_ps(val[k * R + t]);
            for (int q = 0; q < nr; q++) a[t][q] = _mm512_fmadd_ps(v, x[q], a[t][q]);
        }
    }
    for (int t = 0; t < RT; t++) {
        const __m512 bb = _mm512_set1_ps((last && w->bias) ? w->bias[r0 + t] : 0.f);
        for (int q = 0; q < nr; q++) {
            __m512 y = RT * nr < 16 ? _mm512_add_ps(a[t][q], c[t][q]) : a[t][q];
            if (last) y = _mm512_add_ps(y, bb);
            if (last && w->relu) y = _mm512_max_ps(y, _mm512_setzero_ps());
            _mm512_storeu_ps(dst + t * PANEL + 16 * q, y);
        }
    }
}

/* rows k0..k1-1 (whole blocks) on nr registers of lanes (4: a full panel; 2, 1: half, quarter) */
__attribute__((always_inline)) SK_AVX512 static inline void block_avx512_rows(
    const csr_t *w, const float *xp, float *yp, int64_t k0, int64_t k1, int first, int last, const rowout_t *ro,
    const int RT, const int nr) {
    float tile[TILE_ROWS * PANEL] __attribute__((aligned(64)));
    const int64_t R = w->rb;
    const int fuse = last && ro && ro->y;
    int64_t tbase = k0;
    for (int64_t br = k0 / R; br < k1 / R; br++) {
        const int64_t s = w->rowptr[br], e = w->rowptr[br + 1];
        if (!first && !last && s == e) continue;
        for (int64_t j0 = 0; j0 < R; j0 += RT) {
            const int64_t r0 = br * R + j0;
            float *out = yp + r0 * PANEL;
            block_avx512_pass(w, xp, out, fuse ? tile + (r0 - tbase) * PANEL : out, s, e, j0, r0, first, last, RT,
                              nr);
            if (fuse && (r0 + RT - tbase == TILE_ROWS || r0 + RT == k1)) {
                tile_flush(ro, tile, tbase, r0 + RT - tbase);
                tbase = r0 + RT;
            }
        }
    }
}

SK_AVX512 static void block_avx512_r4(const csr_t *w, const float *xp, float *yp, int64_t k0, int64_t k1, int first,
                                      int last, const rowout_t *ro, int nr) {
    if (nr == 4) block_avx512_rows(w, xp, yp, k0, k1, first, last, ro, 4, 4);
    else if (nr == 2) block_avx512_rows(w, xp, yp, k0, k1, first, last, ro, 4, 2);
    else block_avx512_rows(w, xp, yp, k0, k1, first, last, ro, 4, 1);
}

SK_AVX512 static void block_avx512_r2(const csr_t *w, const float *xp, float *yp, int64_t k0, int64_t k1, int first,
                                      int last, const rowout_t *ro, int nr) {
    if (nr == 4) block_avx512_rows(w, xp, yp, k0, k1, first, last, ro, 2, 4);
    else if (nr == 2) block_avx512_rows(w, xp, yp, k0, k1, first, last, ro, 2, 2);
    else block_avx512_rows(w, xp, yp, k0, k1, first, last, ro, 2, 1);
}

/* the block kernel (R x 1 row blocks, see sk_runtime.h): full, half or quarter panels as panel_avx512 */
SK_AVX512 void block_avx512(const csr_t *w, const int32_t *ord, const float *xp, float *yp, int64_t k0, int64_t k1,
                            int first, int last, const rowout_t *ro) {
    (void)ord;
    const int nr = ro && ro->lanes == PANEL / 2 ? 2 : ro && ro->lanes == PANEL / 4 ? 1 : 4;
    if (w->rb == 2) block_avx512_r2(w, xp, yp, k0, k1, first, last, ro, nr);
    else block_avx512_r4(w, xp, yp, k0, k1, first, last, ro, nr);
}

/* gemv: small layers at small batch run dense, from the transposed weight wt (n_in, n_out): for each
 * input i, y[o..o+127] += x[i] * wt[i][o..o+127] in 8 registers. No horizontal sums, no per-row
 * branches, no call into ONNX Runtime: for layers of a few 10^4 weights this beats the sparse kernel. */
SK_AVX512 void gemv_avx512(const float *wt, const float *bias, const float *x, float *y, int64_t n_in,
                                  int64_t n_out, int64_t b0, int64_t b1, int relu) {
    for (int64_t b = b0; b < b1; b++) {
        const float *xb = x + b * n_in;
        float *yb = y + b * n_out;
        for (int64_t o = 0; o < n_out; o += 128) {
            const int64_t left = n_out - o;
            const int nv = left >= 128 ? 8 : (int)((left + 15) / 16);
            __mmask16 m[8];
            for (int j = 0; j < 8; j++) {
                const int64_t r = left - 16 * j;
                m[j] = r >= 16 ? (__mmask16)0xFFFF : r > 0 ? (__mmask16)((1u << r) - 1u) : (__mmask16)0;
            }
            __m512 a[8];
            for (int j = 0; j < 8; j++) a[j] = _mm512_setzero_ps();
            if (nv == 8 && m[7] == 0xFFFF) {
                for (int64_t i = 0; i < n_in; i++) {
                    const __m512 v = _mm512_set1_ps(xb[i]);
                    const float *r = wt + i * n_out + o;
                    for (int j = 0; j < 8; j++) a[j] = _mm512_fmadd_ps(v, _mm512_loadu_ps(r + 16 * j), a[j]);
                }
            } else {
                for (int64_t i = 0; i < n_in; i++) {
                    const __m512 v = _mm512_set1_ps(xb[i]);
                    const float *r = wt + i * n_out + o;
                    for (int j = 0; j < nv; j++)
                        a[j] = _mm512_fmadd_ps(v, _mm512_maskz_loadu_ps(m[j], r + 16 * j), a[j]);
                }
            }
            for (int j = 0; j < nv; j++) {
                __m512 t = a[j];
                if (bias) t = _mm512_add_ps(t, _mm512_maskz_loadu_ps(m[j], bias + o + 16 * j));
                if (relu) t = _mm512_max_ps(t, _mm512_setzero_ps());
                _mm512_mask_storeu_ps(yb + o + 16 * j, m[j], t);
            }
        }
    }
}

#endif /* SK_X86 */
