/*
 * sparsekit._kernels: sparse x dense kernels for the `fast` export format.
 *
 * A layer is y = act(W x + b) with W (n_out, n_in) stored as CSR: float32 values, uint16 or int32
 * column indices, int64 row pointers. Two kernels, chosen per layer and batch size by the runtime:
 *
 *   rows   x row-major (B, n_in) -> y (B, n_out). One output row at a time, dot product of the row's
 *          nonzeros with gathered x values (vector gathers). Batch 1 is memory bound, so what
 *          matters is bytes per nonzero: 4 (value) + 2 (uint16 index).
 *   panel  activations in "panel" layout: the batch is cut into panels of PANEL (64) samples, each
 *          panel stored [n][PANEL] (batch-minor). For every nonzero of a weight row the value is
 *          broadcast and multiplied into a contiguous 64-wide row of the input panel; the 64 outputs
 *          stay in registers (register-blocked SpMM). Bias and ReLU are fused into the store.
 *   gemv   small layers at small batch, run dense from the transposed weight (n_in, n_out): x[i] is
 *          broadcast into 128-wide rows of W^T. No per-row branches or horizontal sums and no ONNX
 *          Runtime call overhead, so tiny layers (where the sparse kernels' fixed costs dominate)
 *          are not slower than dense.
 *
 * Code paths: AVX-512F, AVX2+FMA (GCC/Clang target attributes, chosen at run time with
 * __builtin_cpu_supports) and portable C; the build never needs a CPU with AVX2. Threads: OpenMP
 * when the compiler has it (`threads` argument), else one thread; one thread skips the parallel
 * region (about 1 us a call), more threads take row chunks balanced by nonzeros dynamically.
 *
 * Safety contract (checked by the Python wrapper at load, sizes re-checked here): rowptr is
 * non-decreasing from 0, indices < n_in, and the index and value arrays have PAD_SLACK spare
 * elements after the last nonzero (the vector tails read, but never use, up to 31 of them).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define SK_X86 1
#include <immintrin.h>
#define SK_AVX2 __attribute__((target("avx2,fma")))
#define SK_AVX512 __attribute__((target("avx512f,avx2,fma")))
#else
#define SK_X86 0
#endif

#define PANEL 64
#define PAD_SLACK 32
#define CHUNKS_PER_THREAD 8 /* work items per thread for dynamic scheduling */
/* The panel kernel splits each panel's rows into one nnz-balanced range per thread (items: panels x
 * threads, dynamic): a thread then walks every column block over many rows, reusing each block's input
 * slab in its cache. 8 chunks per thread (64-row ranges at 1024 rows) reloaded the slabs per chunk:
 * 1024x1024 90% batch 256 at 2 threads 857 -> 693 us, 4096x1024 2.6 -> 2.1 ms; 2 per thread: 762 us. */
#define PANEL_CHUNKS_PER_THREAD 1
/* Below this much work (nonzero x sample products; dense weights x samples for gemv; floats moved for
 * the transposes) a call runs on one thread: waking sleeping OpenMP workers (OMP_WAIT_POLICY=PASSIVE,
 * or after the spin time) and joining them costs tens of microseconds a region, more than a second
 * core saves on a layer that takes a few hundred. */
#define PAR_MIN_WORK (1 << 19)
/* The rows kernel at batch 1 is memory bound and already ~40-200 us for mid-size layers: from this many
 * nonzero x sample products (4096x1024 at 90%: 4.2e5) a second thread gains more than the wake-up
 * costs (measured 180 -> 127 us with OMP_WAIT_POLICY=PASSIVE); 1024x1024 at 90% (1e5, 43 us) would lose. */
#define ROWS_PAR_MIN_WORK (1 << 18)

enum { ISA_GENERIC = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };
static int g_isa = ISA_GENERIC;     /* active code path */
static int g_isa_max = ISA_GENERIC; /* best the CPU supports */

typedef struct {
    const float *val;
    const void *idx;
    int idx16;
    const int64_t *rowptr;
    const float *bias; /* may be NULL */
    int64_t n_in, n_out;
    int relu;
} csr_t;

static inline int64_t idx_at(const csr_t *w, int64_t k) {
    return w->idx16 ? (int64_t)((const uint16_t *)w->idx)[k] : (int64_t)((const int32_t *)w->idx)[k];
}

static inline float finish(float acc, const csr_t *w, int64_t o) {
    if (w->bias) acc += w->bias[o];
    if (w->relu && acc < 0.0f) acc = 0.0f;
    return acc;
}

/* Fused output transpose: the last column block of a panel layer can write its results straight into
 * the row-major output y (B, n_out) instead of the panel buffer. Each kernel then stores up to TILE_ROWS
 * finished rows of 64 samples into a small tile on its stack (L1) and flushes the tile with 8x8
 * transposes: every flush writes whole 64-byte lines of y, so the separate from_panels pass (a read and
 * a write of the whole activation) disappears. */
#define TILE_ROWS 16
typedef struct {
    float *y;      /* row-major output rows of this panel's first sample; NULL: write panels */
    int64_t ldy;   /* row stride of y (n_out) */
    int64_t tb;    /* valid samples in this panel (<= PANEL) */
} rowout_t;

static void transpose_block(const float *src, int64_t ss, float *dst, int64_t ds, int64_t rows, int64_t cols,
                            int cols_outer);

#if SK_X86
/* Full tile (16 rows x 64 samples) -> 64 rows of y, 16 floats (one 64-byte line) each: 16x16 transposes
 * in registers and non-temporal stores (no read-for-ownership of y's lines, which sit n_out*4 bytes
 * apart and would otherwise all compete for one L1 set). */
SK_AVX512 static void tile_flush_avx512(const float *tile, float *y, int64_t ldy) {
    for (int s0 = 0; s0 < PANEL; s0 += 16) {
        __m512 r[16], t[16];
        for (int i = 0; i < 16; i++) r[i] = _mm512_load_ps(tile + i * PANEL + s0);
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
        for (int i = 0; i < 16; i++) _mm512_store_ps(y + (int64_t)(s0 + i) * ldy, r[i]);
    }
}
#endif

static inline void tile_flush(const rowout_t *ro, const float *tile, int64_t obase, int64_t nrows) {
#if SK_X86
    float *y = ro->y + obase;
    if (g_isa == ISA_AVX512 && nrows == 16 && ro->tb == PANEL && ((uintptr_t)y & 63) == 0 && (ro->ldy & 15) == 0) {
        tile_flush_avx512(tile, y, ro->ldy);
        return;
    }
#endif
    transpose_block(tile, PANEL, ro->y + obase, ro->ldy, nrows, ro->tb, 1);
}

/* ------------------------------------------------------------------ portable C */

static void rows_generic(const csr_t *w, const float *x, float *y, int64_t B, int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; o++) {
        int64_t s = w->rowptr[o], e = w->rowptr[o + 1];
        for (int64_t b = 0; b < B; b++) {
            const float *xb = x + b * w->n_in;
            float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
            int64_t k = s;
            for (; k + 4 <= e; k += 4) {
                a0 += w->val[k] * xb[idx_at(w, k)];
                a1 += w->val[k + 1] * xb[idx_at(w, k + 1)];
                a2 += w->val[k + 2] * xb[idx_at(w, k + 2)];
                a3 += w->val[k + 3] * xb[idx_at(w, k + 3)];
            }
            for (; k < e; k++) a0 += w->val[k] * xb[idx_at(w, k)];
            y[b * w->n_out + o] = finish((a0 + a1) + (a2 + a3), w, o);
        }
    }
}

static void panel_generic(const csr_t *w, const float *xp, float *yp, int64_t o0, int64_t o1, int first, int last,
                          const rowout_t *ro) {
    float tile[TILE_ROWS * PANEL] __attribute__((aligned(64)));
    const int fuse = last && ro && ro->y;
    int64_t tbase = o0;
    float acc[PANEL];
    for (int64_t o = o0; o < o1; o++) {
        float *out = yp + o * PANEL;
        if (!first && !last && w->rowptr[o] == w->rowptr[o + 1]) continue;
        for (int t = 0; t < PANEL; t++) acc[t] = first ? 0.f : out[t];
        for (int64_t k = w->rowptr[o]; k < w->rowptr[o + 1]; k++) {
            const float v = w->val[k];
            const float *p = xp + idx_at(w, k) * PANEL;
            for (int t = 0; t < PANEL; t++) acc[t] += v * p[t];
        }
        if (!last) {
            for (int t = 0; t < PANEL; t++) out[t] = acc[t];
            continue;
        }
        const float bb = w->bias ? w->bias[o] : 0.f;
        float *dst = fuse ? tile + (o - tbase) * PANEL : out;
        for (int t = 0; t < PANEL; t++) {
            float r = acc[t] + bb;
            dst[t] = (w->relu && r < 0.f) ? 0.f : r;
        }
        if (fuse && (o + 1 - tbase == TILE_ROWS || o + 1 == o1)) {
            tile_flush(ro, tile, tbase, o + 1 - tbase);
            tbase = o + 1;
        }
    }
}

static void gemv_generic(const float *wt, const float *bias, const float *x, float *y, int64_t n_in,
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

#if SK_X86
/* ------------------------------------------------------------------ AVX2 + FMA */

SK_AVX2 static inline __m256i load_idx8(const csr_t *w, int64_t k) {
    if (w->idx16) return _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)w->idx + k)));
    return _mm256_loadu_si256((const __m256i *)((const int32_t *)w->idx + k));
}

SK_AVX2 static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

SK_AVX2 static void rows_avx2(const csr_t *w, const float *x, float *y, int64_t B, int64_t o0, int64_t o1) {
    static const int32_t lanes[8] = {0, 1, 2, 3, 4, 5, 6, 7};
    const __m256i lane = _mm256_loadu_si256((const __m256i *)lanes);
    for (int64_t o = o0; o < o1; o++) {
        const int64_t s = w->rowptr[o], e = w->rowptr[o + 1];
        for (int64_t b = 0; b < B; b++) {
            const float *xb = x + b * w->n_in;
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
            int64_t k = s;
            for (; k + 16 <= e; k += 16) {
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w->val + k),
                                     _mm256_i32gather_ps(xb, load_idx8(w, k), 4), a0);
                a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w->val + k + 8),
                                     _mm256_i32gather_ps(xb, load_idx8(w, k + 8), 4), a1);
            }
            for (; k < e; k += 8) {
                const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(e - k)), lane);
                const __m256 v = _mm256_maskload_ps(w->val + k, m);
                const __m256 g = _mm256_mask_i32gather_ps(_mm256_setzero_ps(), xb, load_idx8(w, k),
                                                          _mm256_castsi256_ps(m), 4);
                a0 = _mm256_fmadd_ps(v, g, a0);
            }
            y[b * w->n_out + o] = finish(hsum256(_mm256_add_ps(a0, a1)), w, o);
        }
    }
}

SK_AVX2 static void panel_avx2(const csr_t *w, const float *xp, float *yp, int64_t o0, int64_t o1, int first, int last,
                          const rowout_t *ro) {
    float tile[TILE_ROWS * PANEL] __attribute__((aligned(64)));
    const int fuse = last && ro && ro->y;
    int64_t tbase = o0;
    for (int64_t o = o0; o < o1; o++) {
        float *out = yp + o * PANEL;
        if (!first && !last && w->rowptr[o] == w->rowptr[o + 1]) continue;
        __m256 a0, a1, a2, a3, a4, a5, a6, a7;
        if (first) {
            a0 = _mm256_setzero_ps(); a1 = a0; a2 = a0; a3 = a0; a4 = a0; a5 = a0; a6 = a0; a7 = a0;
        } else {
            a0 = _mm256_loadu_ps(out); a1 = _mm256_loadu_ps(out + 8); a2 = _mm256_loadu_ps(out + 16);
            a3 = _mm256_loadu_ps(out + 24); a4 = _mm256_loadu_ps(out + 32); a5 = _mm256_loadu_ps(out + 40);
            a6 = _mm256_loadu_ps(out + 48); a7 = _mm256_loadu_ps(out + 56);
        }
        for (int64_t k = w->rowptr[o]; k < w->rowptr[o + 1]; k++) {
            const __m256 v = _mm256_broadcast_ss(w->val + k);
            const float *p = xp + idx_at(w, k) * PANEL;
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
        __m256 r[8] = {a0, a1, a2, a3, a4, a5, a6, a7};
        float *dst = fuse ? tile + (o - tbase) * PANEL : out;
        for (int j = 0; j < 8; j++) {
            __m256 t = last ? _mm256_add_ps(r[j], bb) : r[j];
            if (last && w->relu) t = _mm256_max_ps(t, _mm256_setzero_ps());
            _mm256_storeu_ps(dst + 8 * j, t);
        }
        if (fuse && (o + 1 - tbase == TILE_ROWS || o + 1 == o1)) {
            tile_flush(ro, tile, tbase, o + 1 - tbase);
            tbase = o + 1;
        }
    }
}

/* ------------------------------------------------------------------ AVX-512F */

SK_AVX512 static inline __m512i load_idx16(const csr_t *w, int64_t k) {
    if (w->idx16)
        return _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)w->idx + k)));
    return _mm512_loadu_si512((const void *)((const int32_t *)w->idx + k));
}

SK_AVX512 static void rows_avx512(const csr_t *w, const float *x, float *y, int64_t B, int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; o++) {
        const int64_t s = w->rowptr[o], e = w->rowptr[o + 1];
        for (int64_t b = 0; b < B; b++) {
            const float *xb = x + b * w->n_in;
            __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
            int64_t k = s;
            for (; k + 32 <= e; k += 32) {
                a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w->val + k),
                                     _mm512_i32gather_ps(load_idx16(w, k), xb, 4), a0);
                a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w->val + k + 16),
                                     _mm512_i32gather_ps(load_idx16(w, k + 16), xb, 4), a1);
            }
            for (; k < e; k += 16) {
                const int64_t r = e - k;
                const __mmask16 m = r >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << r) - 1u);
                const __m512 v = _mm512_maskz_loadu_ps(m, w->val + k);
                const __m512 g = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, load_idx16(w, k), xb, 4);
                a0 = _mm512_fmadd_ps(v, g, a0);
            }
            y[b * w->n_out + o] = finish(_mm512_reduce_add_ps(_mm512_add_ps(a0, a1)), w, o);
        }
    }
}

SK_AVX512 static void panel_avx512(const csr_t *w, const float *xp, float *yp, int64_t o0, int64_t o1, int first, int last,
                          const rowout_t *ro) {
    float tile[TILE_ROWS * PANEL] __attribute__((aligned(64)));
    const int fuse = last && ro && ro->y;
    int64_t tbase = o0;
    for (int64_t o = o0; o < o1; o++) {
        float *out = yp + o * PANEL;
        if (!first && !last && w->rowptr[o] == w->rowptr[o + 1]) continue;
        __m512 a0, a1, a2, a3, c0 = _mm512_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;
        if (first) {
            a0 = c0; a1 = c0; a2 = c0; a3 = c0;
        } else {
            a0 = _mm512_loadu_ps(out); a1 = _mm512_loadu_ps(out + 16);
            a2 = _mm512_loadu_ps(out + 32); a3 = _mm512_loadu_ps(out + 48);
        }
        int64_t k = w->rowptr[o];
        const int64_t e = w->rowptr[o + 1];
        for (; k + 2 <= e; k += 2) {
            const __m512 v = _mm512_set1_ps(w->val[k]);
            const __m512 u = _mm512_set1_ps(w->val[k + 1]);
            const float *p = xp + idx_at(w, k) * PANEL;
            const float *q = xp + idx_at(w, k + 1) * PANEL;
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
            const float *p = xp + idx_at(w, k) * PANEL;
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
        float *dst = fuse ? tile + (o - tbase) * PANEL : out;
        _mm512_storeu_ps(dst, r0);
        _mm512_storeu_ps(dst + 16, r1);
        _mm512_storeu_ps(dst + 32, r2);
        _mm512_storeu_ps(dst + 48, r3);
        if (fuse && (o + 1 - tbase == TILE_ROWS || o + 1 == o1)) {
            tile_flush(ro, tile, tbase, o + 1 - tbase);
            tbase = o + 1;
        }
    }
}


/* gemv: small layers at small batch run dense, from the transposed weight wt (n_in, n_out): for each
 * input i, y[o..o+127] += x[i] * wt[i][o..o+127] in 8 registers. No horizontal sums, no per-row
 * branches, no call into ONNX Runtime: for layers of a few 10^4 weights this beats the sparse kernel. */
SK_AVX512 static void gemv_avx512(const float *wt, const float *bias, const float *x, float *y, int64_t n_in,
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

/* ------------------------------------------------------------------ dispatch */

typedef void (*rows_fn)(const csr_t *, const float *, float *, int64_t, int64_t, int64_t);
typedef void (*panel_fn)(const csr_t *, const float *, float *, int64_t, int64_t, int, int, const rowout_t *);

static rows_fn pick_rows(void) {
#if SK_X86
    if (g_isa == ISA_AVX512) return rows_avx512;
    if (g_isa == ISA_AVX2) return rows_avx2;
#endif
    return rows_generic;
}

static panel_fn pick_panel(void) {
#if SK_X86
    if (g_isa == ISA_AVX512) return panel_avx512;
    if (g_isa == ISA_AVX2) return panel_avx2;
#endif
    return panel_generic;
}

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

static int clamp_threads(int t) {
#ifdef _OPENMP
    return t < 1 ? 1 : t;
#else
    (void)t;
    return 1;
#endif
}

/* ------------------------------------------------------------------ Python glue */

static int check_len(const Py_buffer *b, int64_t need, const char *what) {
    if ((int64_t)b->len < need) {
        PyErr_Format(PyExc_ValueError, "%s buffer too small: %zd bytes, need %lld", what, b->len,
                     (long long)need);
        return -1;
    }
    return 0;
}

static int make_csr(csr_t *w, Py_buffer *val, Py_buffer *idx, Py_buffer *rowptr, PyObject *bias_obj,
                    Py_buffer *bias, int idx_bytes, int64_t n_in, int64_t n_out, int relu) {
    if (idx_bytes != 2 && idx_bytes != 4) { PyErr_SetString(PyExc_ValueError, "idx_bytes must be 2 or 4"); return -1; }
    if (n_in < 0 || n_out < 0) { PyErr_SetString(PyExc_ValueError, "negative shape"); return -1; }
    if (check_len(rowptr, (n_out + 1) * 8, "rowptr")) return -1;
    const int64_t *rp = (const int64_t *)rowptr->buf;
    const int64_t nnz = rp[n_out];
    if (rp[0] != 0 || nnz < 0) { PyErr_SetString(PyExc_ValueError, "bad rowptr"); return -1; }
    if (check_len(val, (nnz + PAD_SLACK) * 4, "values")) return -1;
    if (check_len(idx, (nnz + PAD_SLACK) * idx_bytes, "indices")) return -1;
    w->val = (const float *)val->buf;
    w->idx = idx->buf;
    w->idx16 = idx_bytes == 2;
    w->rowptr = rp;
    w->bias = NULL;
    if (bias_obj != Py_None) {
        if (check_len(bias, n_out * 4, "bias")) return -1;
        w->bias = (const float *)bias->buf;
    }
    w->n_in = n_in;
    w->n_out = n_out;
    w->relu = relu != 0;
    return 0;
}

static PyObject *py_rows(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer val, idx, rowptr, x, y, bias = {0};
    PyObject *bias_obj;
    int idx_bytes, relu, threads;
    long long n_in, n_out, B;
    if (!PyArg_ParseTuple(args, "y*y*y*Oy*w*iLLLii", &val, &idx, &rowptr, &bias_obj, &x, &y, &idx_bytes,
                          &n_in, &n_out, &B, &relu, &threads))
        return NULL;
    int have_bias = 0;
    PyObject *ret = NULL;
    csr_t w;
    if (bias_obj != Py_None) {
        if (PyObject_GetBuffer(bias_obj, &bias, PyBUF_C_CONTIGUOUS) < 0) goto done;
        have_bias = 1;
    }
    if (make_csr(&w, &val, &idx, &rowptr, bias_obj, &bias, idx_bytes, n_in, n_out, relu)) goto done;
    if (B < 0 || check_len(&x, B * n_in * 4, "x") || check_len(&y, B * n_out * 4, "y")) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "negative batch");
        goto done;
    }
    {
        const rows_fn fn = pick_rows();
        const float *xp = (const float *)x.buf;
        float *yp = (float *)y.buf;
        const int nt = w.rowptr[w.n_out] * (B > 0 ? B : 1) < ROWS_PAR_MIN_WORK ? 1 : clamp_threads(threads);
        Py_BEGIN_ALLOW_THREADS
        if (nt <= 1) {  /* no parallel region: its fixed cost matters for small layers */
            if (w.n_out > 0) fn(&w, xp, yp, B, 0, w.n_out);
        } else {
            /* chunks balanced by nonzeros, handed out dynamically: a thread slowed by another
             * process on its core takes fewer of them */
            const int64_t nch = (int64_t)nt * CHUNKS_PER_THREAD;
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
#endif
            for (int64_t ch = 0; ch < nch; ch++) {
                int64_t o0, o1;
                split_rows(w.rowptr, w.n_out, (int)ch, (int)nch, &o0, &o1);
                if (o1 > o0) fn(&w, xp, yp, B, o0, o1);
            }
        }
        Py_END_ALLOW_THREADS
        (void)nt;
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    if (have_bias) PyBuffer_Release(&bias);
    PyBuffer_Release(&val); PyBuffer_Release(&idx); PyBuffer_Release(&rowptr);
    PyBuffer_Release(&x); PyBuffer_Release(&y);
    return ret;
}

typedef void (*gemv_fn)(const float *, const float *, const float *, float *, int64_t, int64_t, int64_t, int64_t, int);

static PyObject *py_gemv(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer wt, x, y, bias = {0};
    PyObject *bias_obj;
    int relu, threads;
    long long n_in, n_out, B;
    if (!PyArg_ParseTuple(args, "y*Oy*w*LLLii", &wt, &bias_obj, &x, &y, &n_in, &n_out, &B, &relu, &threads))
        return NULL;
    int have_bias = 0;
    PyObject *ret = NULL;
    if (bias_obj != Py_None) {
        if (PyObject_GetBuffer(bias_obj, &bias, PyBUF_C_CONTIGUOUS) < 0) goto done;
        have_bias = 1;
    }
    if (n_in < 0 || n_out < 0 || B < 0) { PyErr_SetString(PyExc_ValueError, "negative shape"); goto done; }
    if (check_len(&wt, n_in * n_out * 4, "weight") || check_len(&x, B * n_in * 4, "x") ||
        check_len(&y, B * n_out * 4, "y") || (have_bias && check_len(&bias, n_out * 4, "bias")))
        goto done;
    {
        gemv_fn fn = gemv_generic;
#if SK_X86
        if (g_isa == ISA_AVX512) fn = gemv_avx512;
#endif
        const float *w = (const float *)wt.buf, *bp = have_bias ? (const float *)bias.buf : NULL;
        const float *xp = (const float *)x.buf;
        float *yp = (float *)y.buf;
        int nt = clamp_threads(threads) > B ? (int)(B > 0 ? B : 1) : clamp_threads(threads);
        if (n_in * n_out * B < 4 * PAR_MIN_WORK) nt = 1;
        Py_BEGIN_ALLOW_THREADS
        if (nt <= 1) {
            fn(w, bp, xp, yp, n_in, n_out, 0, B, relu != 0);
        } else {
#ifdef _OPENMP
#pragma omp parallel for schedule(static, 1) num_threads(nt)
#endif
            for (int64_t b = 0; b < B; b++) fn(w, bp, xp, yp, n_in, n_out, b, b + 1, relu != 0);
        }
        Py_END_ALLOW_THREADS
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    if (have_bias) PyBuffer_Release(&bias);
    PyBuffer_Release(&wt); PyBuffer_Release(&x); PyBuffer_Release(&y);
    return ret;
}

static PyObject *py_panel(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer val, idx, bptr, x, y, bias = {0}, yr = {0};
    PyObject *bias_obj, *yr_obj = Py_None;
    int idx_bytes, relu, threads;
    long long n_in, n_out, P, nb, batch = 0;
    if (!PyArg_ParseTuple(args, "y*y*y*Oy*w*iLLLLii|OL", &val, &idx, &bptr, &bias_obj, &x, &y, &idx_bytes,
                          &n_in, &n_out, &P, &nb, &relu, &threads, &yr_obj, &batch))
        return NULL;
    int have_bias = 0, have_yr = 0;
    PyObject *ret = NULL;
    csr_t w;
    if (yr_obj != Py_None) {
        if (PyObject_GetBuffer(yr_obj, &yr, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) goto done;
        have_yr = 1;
        if (batch < 0 || batch > P * PANEL || batch <= (P - 1) * PANEL) {
            PyErr_SetString(PyExc_ValueError, "batch does not match the panel count");
            goto done;
        }
        if (check_len(&yr, batch * n_out * 4, "y (row-major)")) goto done;
    }
    if (bias_obj != Py_None) {
        if (PyObject_GetBuffer(bias_obj, &bias, PyBUF_C_CONTIGUOUS) < 0) goto done;
        have_bias = 1;
    }
    if (nb < 1 || n_out < 0 || P < 0) { PyErr_SetString(PyExc_ValueError, "bad block/panel count"); goto done; }
    if (check_len(&bptr, (nb * n_out + 1) * 8, "block pointers")) goto done;
    {
        /* validate the total through make_csr on a view that treats all blocks as one long CSR */
        const int64_t *bp = (const int64_t *)bptr.buf;
        if (make_csr(&w, &val, &idx, &bptr, Py_None, &bias, idx_bytes, n_in, nb * n_out, relu)) goto done;
        w.n_out = n_out;
        if (have_bias) {
            if (check_len(&bias, n_out * 4, "bias")) goto done;
            w.bias = (const float *)bias.buf;
        }
        (void)bp;
    }
    if (check_len(&x, P * n_in * PANEL * 4, "x") || check_len(&y, P * n_out * PANEL * 4, "y")) goto done;
    {
        const panel_fn fn = pick_panel();
        const float *xp = (const float *)x.buf;
        float *yp = (float *)y.buf;
        float *yrm = have_yr ? (float *)yr.buf : NULL;
        const int64_t *bp = w.rowptr;
        const int nt = bp[nb * w.n_out] * P * PANEL < 16 * PAR_MIN_WORK ? 1 : clamp_threads(threads);
        /* nonzeros per row over all column blocks, for chunks balanced by work */
        int64_t *cost = NULL;
        if (nt > 1 && nb > 1) {
            cost = (int64_t *)malloc((size_t)(w.n_out + 1) * sizeof(int64_t));
            if (!cost) { PyErr_NoMemory(); goto done; }
            cost[0] = 0;
            for (int64_t o = 0; o < w.n_out; o++) {
                int64_t t = 0;
                for (int64_t c = 0; c < nb; c++) t += bp[c * w.n_out + o + 1] - bp[c * w.n_out + o];
                cost[o + 1] = cost[o] + t;
            }
        }
        Py_BEGIN_ALLOW_THREADS
        if (nt <= 1) {
            csr_t wc = w;
            for (int64_t p = 0; p < P; p++)
                for (int64_t c = 0; c < nb; c++) {
                    wc.rowptr = bp + c * w.n_out;
                    const rowout_t ro = {have_yr ? yrm + p * PANEL * w.n_out : NULL, w.n_out,
                                         batch - p * PANEL < PANEL ? batch - p * PANEL : PANEL};
                    fn(&wc, xp + p * w.n_in * PANEL, yp + p * w.n_out * PANEL, 0, w.n_out, c == 0, c == nb - 1, &ro);
                }
        } else {
            /* (panel, row range) work items balanced by nonzeros, handed out dynamically */
            const int64_t nch = (int64_t)nt * PANEL_CHUNKS_PER_THREAD;
            const int64_t *rp = nb == 1 ? bp : cost;
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
#endif
            for (int64_t item = 0; item < P * nch; item++) {
                const int64_t p = item / nch, ch = item % nch;
                int64_t o0, o1;
                split_rows(rp, w.n_out, (int)ch, (int)nch, &o0, &o1);
                if (o1 <= o0) continue;
                csr_t wc = w;
                const rowout_t ro = {have_yr ? yrm + p * PANEL * w.n_out : NULL, w.n_out,
                                     batch - p * PANEL < PANEL ? batch - p * PANEL : PANEL};
                for (int64_t c = 0; c < nb; c++) {
                    wc.rowptr = bp + c * w.n_out;
                    fn(&wc, xp + p * w.n_in * PANEL, yp + p * w.n_out * PANEL, o0, o1, c == 0, c == nb - 1, &ro);
                }
            }
        }
        Py_END_ALLOW_THREADS
        free(cost);
        (void)nt;
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    if (have_bias) PyBuffer_Release(&bias);
    if (have_yr) PyBuffer_Release(&yr);
    PyBuffer_Release(&val); PyBuffer_Release(&idx); PyBuffer_Release(&bptr);
    PyBuffer_Release(&x); PyBuffer_Release(&y);
    return ret;
}

#if SK_X86
/* 8x8 float transpose: dst[c][r] = src[r][c] (row strides ss, ds in floats). */
SK_AVX2 static void tr8x8_avx2(const float *src, int64_t ss, float *dst, int64_t ds) {
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
#endif

/* Transpose a rows x cols block: dst[c * ds + r] = src[r * ss + c]; 8x8 tiles with AVX2. The loop
 * keeps 8 rows of the side with the long stride fixed while it walks the other (cols_outer: dst side),
 * so that side's lines are not all thrown out of one L1 set by 4 KiB aliasing. */
static void transpose_block(const float *src, int64_t ss, float *dst, int64_t ds, int64_t rows, int64_t cols,
                            int cols_outer) {
#if SK_X86
    if (g_isa >= ISA_AVX2) {
        const int64_t R = rows & ~(int64_t)7, C = cols & ~(int64_t)7;
        if (cols_outer) {
            for (int64_t c0 = 0; c0 < C; c0 += 8)
                for (int64_t r0 = 0; r0 < R; r0 += 8) tr8x8_avx2(src + r0 * ss + c0, ss, dst + c0 * ds + r0, ds);
        } else {
            for (int64_t r0 = 0; r0 < R; r0 += 8)
                for (int64_t c0 = 0; c0 < C; c0 += 8) tr8x8_avx2(src + r0 * ss + c0, ss, dst + c0 * ds + r0, ds);
        }
        for (int64_t r = 0; r < rows; r++)  /* ragged edges */
            for (int64_t c = (r < R ? C : 0); c < cols; c++) dst[c * ds + r] = src[r * ss + c];
        return;
    }
#endif
    (void)cols_outer;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < cols; c++) dst[c * ds + r] = src[r * ss + c];
}

/* x (B, n) row-major -> panels (P, n, PANEL), samples beyond B zero. Tiles of 64 features. */
static void to_panels_range(const float *x, float *xp, int64_t B, int64_t n, int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; p++) {
        float *dst = xp + p * n * PANEL;
        const int64_t b0 = p * PANEL;
        const int64_t tb = (B - b0) < PANEL ? (B - b0) : PANEL;
        for (int64_t i0 = 0; i0 < n; i0 += 64) {
            const int64_t w = n - i0 < 64 ? n - i0 : 64;
            transpose_block(x + b0 * n + i0, n, dst + i0 * PANEL, PANEL, tb, w, 0);
            if (tb < PANEL)
                for (int64_t i = i0; i < i0 + w; i++) memset(dst + i * PANEL + tb, 0, (size_t)(PANEL - tb) * 4);
        }
    }
}

static void from_panels_range(const float *yp, float *y, int64_t B, int64_t n, int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; p++) {
        const float *src = yp + p * n * PANEL;
        const int64_t b0 = p * PANEL;
        const int64_t tb = (B - b0) < PANEL ? (B - b0) : PANEL;
        for (int64_t i0 = 0; i0 < n; i0 += 64) {
            const int64_t w = n - i0 < 64 ? n - i0 : 64;
            transpose_block(src + i0 * PANEL, PANEL, y + b0 * n + i0, n, w, tb, 1);
        }
    }
}

static PyObject *py_transpose(PyObject *args, int to) {
    Py_buffer a, b;
    long long B, n;
    int threads;
    if (!PyArg_ParseTuple(args, "y*w*LLi", &a, &b, &B, &n, &threads)) return NULL;
    PyObject *ret = NULL;
    const int64_t P = (B + PANEL - 1) / PANEL;
    if (B < 0 || n < 0) { PyErr_SetString(PyExc_ValueError, "negative shape"); goto done; }
    if (to ? (check_len(&a, B * n * 4, "x") || check_len(&b, P * n * PANEL * 4, "panels"))
           : (check_len(&a, P * n * PANEL * 4, "panels") || check_len(&b, B * n * 4, "y")))
        goto done;
    {
        const float *src = (const float *)a.buf;
        float *dst = (float *)b.buf;
        int nt = clamp_threads(threads) > P ? (int)(P > 0 ? P : 1) : clamp_threads(threads);
        if (B * n < 4 * PAR_MIN_WORK) nt = 1;  /* 8 MB and up */
        Py_BEGIN_ALLOW_THREADS
        if (nt <= 1) {
            if (to) to_panels_range(src, dst, B, n, 0, P);
            else from_panels_range(src, dst, B, n, 0, P);
        } else {
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
#endif
            for (int64_t p = 0; p < P; p++) {
                if (to) to_panels_range(src, dst, B, n, p, p + 1);
                else from_panels_range(src, dst, B, n, p, p + 1);
            }
        }
        Py_END_ALLOW_THREADS
        (void)nt;
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    PyBuffer_Release(&a);
    PyBuffer_Release(&b);
    return ret;
}

static PyObject *py_to_panels(PyObject *self, PyObject *args) { (void)self; return py_transpose(args, 1); }
static PyObject *py_from_panels(PyObject *self, PyObject *args) { (void)self; return py_transpose(args, 0); }

static const char *isa_name(int isa) {
    return isa == ISA_AVX512 ? "avx512" : isa == ISA_AVX2 ? "avx2" : "generic";
}

static PyObject *py_isa(PyObject *self, PyObject *noargs) {
    (void)self; (void)noargs;
    return PyUnicode_FromString(isa_name(g_isa));
}

static PyObject *py_available_isas(PyObject *self, PyObject *noargs) {
    (void)self; (void)noargs;
    PyObject *l = PyList_New(0);
    if (!l) return NULL;
    for (int i = ISA_GENERIC; i <= g_isa_max; i++) {
        PyObject *s = PyUnicode_FromString(isa_name(i));
        if (!s || PyList_Append(l, s) < 0) { Py_XDECREF(s); Py_DECREF(l); return NULL; }
        Py_DECREF(s);
    }
    return l;
}

static PyObject *py_set_isa(PyObject *self, PyObject *args) {
    (void)self;
    const char *name;
    if (!PyArg_ParseTuple(args, "s", &name)) return NULL;
    int want = !strcmp(name, "avx512") ? ISA_AVX512 : !strcmp(name, "avx2") ? ISA_AVX2
             : !strcmp(name, "generic") ? ISA_GENERIC : !strcmp(name, "best") ? g_isa_max : -1;
    if (want < 0) { PyErr_Format(PyExc_ValueError, "unknown isa %s", name); return NULL; }
    if (want > g_isa_max) {
        PyErr_Format(PyExc_ValueError, "this CPU does not support %s (best: %s)", name, isa_name(g_isa_max));
        return NULL;
    }
    g_isa = want;
    Py_RETURN_NONE;
}

static PyObject *py_max_threads(PyObject *self, PyObject *noargs) {
    (void)self; (void)noargs;
#ifdef _OPENMP
    return PyLong_FromLong(omp_get_num_procs());
#else
    return PyLong_FromLong(1);
#endif
}

static PyMethodDef methods[] = {
    {"rows", py_rows, METH_VARARGS,
     "rows(values, indices, rowptr, bias|None, x, y, idx_bytes, n_in, n_out, batch, relu, threads)"},
    {"panel", py_panel, METH_VARARGS,
     "panel(values, indices, blockptr, bias|None, xp, yp, idx_bytes, n_in, n_out, npanels, nblocks, relu, threads"
     "[, y_rows, batch]): with y_rows (batch, n_out) row-major, the last column block writes there (yp then "
     "holds only partial sums)"},
    {"gemv", py_gemv, METH_VARARGS,
     "gemv(weight_t, bias|None, x, y, n_in, n_out, batch, relu, threads): dense layer, weight (n_in, n_out)"},
    {"to_panels", py_to_panels, METH_VARARGS, "to_panels(x, xp, batch, n, threads)"},
    {"from_panels", py_from_panels, METH_VARARGS, "from_panels(yp, y, batch, n, threads)"},
    {"isa", py_isa, METH_NOARGS, "active code path: avx512, avx2 or generic"},
    {"available_isas", py_available_isas, METH_NOARGS, "code paths this CPU can run"},
    {"set_isa", py_set_isa, METH_VARARGS, "set_isa(name): force a code path (tests); 'best' restores"},
    {"max_threads", py_max_threads, METH_NOARGS, "processors OpenMP sees (1 without OpenMP)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", "sparsekit sparse kernels", -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__kernels(void) {
#if SK_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) g_isa_max = ISA_AVX2;
    if (g_isa_max == ISA_AVX2 && __builtin_cpu_supports("avx512f")) g_isa_max = ISA_AVX512;
#endif
    g_isa = g_isa_max;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    PyModule_AddIntConstant(m, "PANEL", PANEL);
    PyModule_AddIntConstant(m, "PAD_SLACK", PAD_SLACK);
#ifdef _OPENMP
    PyModule_AddIntConstant(m, "OPENMP", 1);
#else
    PyModule_AddIntConstant(m, "OPENMP", 0);
#endif
    return m;
}
