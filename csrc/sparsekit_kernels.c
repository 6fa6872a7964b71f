/*
 * sparsekit._kernels: sparse x dense kernels for the `fast` export format.
 *
 * A layer is y = act(W x + b) with W (n_out, n_in) stored as CSR: float32 values, uint16 or int32
 * column indices, int64 row pointers. Two kernels, chosen per layer and batch size by the runtime:
 *
 *   sell   the "rows" kernel (small batches): x row-major (B, n_in) -> y (B, n_out), the weights in a
 *          sliced layout (SELL-16, built by SparseLayer.sliced from the CSR): slices of 16 length-sorted
 *          rows stored slot-major, so one 16-lane gather of x serves 16 rows, without per-row
 *          horizontal sums or masked tails (see "sliced rows"). Gather lanes, not bytes, bound it.
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
 * __builtin_cpu_supports) and portable C; the build never needs a CPU with AVX2. Threads (`threads`
 * argument): sparsekit's own persistent pthread pool (see "thread pool" below: static nnz-balanced
 * ranges per thread, stealing, workers that spin briefly between calls), OpenMP where there are no
 * pthreads, else one thread. Small calls stay on the calling thread (no hand-off at all).
 *
 * Chains (see "chains"): a model whose layers all run sell/gemv, or all run panel, is prepared once
 * (chain_new) and run with one Python->C call (fast_call, which also recycles outputs; chain_run into
 * a given output). A panel chain runs data-parallel: each thread takes whole panels, or 32/16-sample
 * partial panels (AVX-512), of the batch through every layer, with one hand-off per model call instead
 * of one per layer; one panel or less of big layers has every layer's rows split between the threads.
 *
 * Safety contract (checked by the Python wrapper at load, sizes re-checked here: widths at most 2^31 - 1,
 * buffer lengths computed without overflow; chain_new also re-checks indices and row orders): rowptr is
 * non-decreasing from 0, indices < n_in, the index and value arrays have PAD_SLACK spare
 * elements after the last nonzero (the vector tails read, but never use, up to 31 of them), and a
 * panel row order (SparseLayer.blocked) permutes rows only within GROUP_ROWS-row groups, and a sliced
 * layout's perm holds each output row once (-1 elsewhere; the slice pointers are re-checked here).
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
#define CHUNKS_PER_THREAD 4 /* rows kernel: chunks per thread (its own first, then the others') */
/* Below this much work (dense weights x samples for gemv; floats moved for the transposes) a call runs
 * on one thread. */
#define PAR_MIN_WORK (1 << 19)
/* rows and panel: from this many nonzero x sample products a second thread pays. With the pool's workers
 * awake (spinning after the previous call or layer) a job takes ~0.3 us to reach the worker and ~0.2 us
 * to report back; a sleeping worker costs the caller ~5 us (the wake-up call) and joins ~30 us later
 * (under this hypervisor), the caller doing the items meanwhile. 1024x1024 98% batch 1 (2.1e4): 15.4 -> 11.5 us on 2 threads, 90% (1e5):
 * 38.5 -> 23.7 us; 4096x1024 90% (4.2e5): 154 -> 77 us. Layers under the threshold stay on one thread. */
#define ROWS_PAR_MIN_WORK (1 << 14)
/* panel: whole panels per thread (when the panels divide evenly between the threads) from 2^16
 * products. Thread t owns the same panels in every layer of a chain, so the activations stay in its
 * cache from layer to layer; a small layer left on one thread between two split ones moves them across
 * cores twice (64-512-256-10 98% batch 256: 52 us on one thread, 62 us with only its middle layer split,
 * 40 us with every layer split). Splitting one panel's rows needs 64x more (ROW_SPLIT_SHIFT): both
 * threads then read the whole input panel, which the caller transposed in its own cache
 * (784-300-100-10 90% batch 64: 62 us on one thread, 82 us with its 1.5e6-product first layer split). */
#define PANEL_PAR_MIN_WORK (1 << 16)
#define ROW_SPLIT_SHIFT 6
/* A panel chain on one partial panel (AVX-512: 16 or 32 lanes) splits every layer's rows from 2x the
 * panel minimum (nonzeros x batch) per layer: each layer is one pool job, and from the second layer on
 * each thread reads the other's half of the activations from the other core. 2 threads against one:
 * 1024x1024 98% at batch 8 (1.7e5): 25.5 -> 17 us, batch 16: 28 -> 18 us; 784-300-100-10 90% at batch 16
 * (4.3e5, 1.4e5 a layer): 23.9 -> 21.5 us; 64-512-256-10 90% at batch 16 (2.6e5, 8.7e4 a layer): 11.3 ->
 * 17 us, left on one thread. */
#define PROWS_SPLIT_SHIFT 1
static int64_t g_rows_par_min = ROWS_PAR_MIN_WORK;
static int64_t g_panel_par_min = PANEL_PAR_MIN_WORK;

/* threads for a rows job of `work` (stored slots x samples) on at most nt: one below g_rows_par_min,
 * else as many as get half of it each (two threads exactly as before; more only for more work). A job
 * of a few microseconds waits for the slowest of its threads to be handed its share and report back:
 * on the 16-vCPU host of a lent GPU 1024x1024 98% at batch 1 (2.1e4) on four threads ran at 0.88x of
 * one thread with all four, 1.24x and 1.63x (two runs) now that it takes two. */
static int rows_threads(int nt, int64_t work) {
    if (nt <= 1 || work < g_rows_par_min) return 1;
    const int64_t most = work / (g_rows_par_min / 2 > 0 ? g_rows_par_min / 2 : 1);
    return most < 1 ? 1 : most < nt ? (int)most : nt;
}

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
    int stream;    /* non-temporal stores (large outputs) */
    int lanes;     /* AVX-512 only: 32 or 16: the panel holds that many samples (lanes 0..lanes-1 of each
                    * 64-wide row); 0: a full panel */
} rowout_t;
/* Outputs from this size (bytes) are written with non-temporal stores: no read-for-ownership of y's
 * lines, which would come from L3 or memory. 1024x1024 90% batch 256 (1 MB out) on one thread
 * 837 -> 808 us, 4096x1024 (4 MB) 3.56 -> 3.21 ms. Smaller outputs stay in cache for their reader. */
#define STREAM_MIN_BYTES (1 << 19)

static void transpose_block(const float *src, int64_t ss, float *dst, int64_t ds, int64_t rows, int64_t cols,
                            int cols_outer);

#if SK_X86
/* rows 0..nrows-1 of a tile (TILE_ROWS rows of PANEL lanes, lanes 0..tb-1 valid) into row-major y:
 * 16x16 transposes in registers, one 64-byte store per sample and 16 rows (masked for a ragged last
 * tile). Partial and ragged panels used to go through 8x8 transposes, two 32-byte halves per sample
 * and line at different times (with y's rows a power-of-two apart every line of a tile sits in one L1
 * set). Side by side: 4096x1024 98% at batch 16 104.9 -> 101.5 us on one thread, 51.4 -> 48.1 us on
 * two; 1024x1024 90% at batch 100 394.6 -> 378.3 us. stream: non-temporal stores for large outputs (y
 * 64-byte aligned, whole tiles only): no read-for-ownership of y's lines, which sit n_out*4 bytes apart
 * and would otherwise all compete for one L1 set. */
SK_AVX512 static void tile_flush_avx512(const float *tile, float *y, int64_t ldy, int stream, int64_t tb,
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
#endif

static inline void tile_flush(const rowout_t *ro, const float *tile, int64_t obase, int64_t nrows) {
#if SK_X86
    float *y = ro->y + obase;
    if (g_isa == ISA_AVX512) {
        const int aligned = nrows == 16 && ((uintptr_t)y & 63) == 0 && (ro->ldy & 15) == 0;
        tile_flush_avx512(tile, y, ro->ldy, ro->stream && aligned, ro->tb, nrows);
        return;
    }
#endif
    transpose_block(tile, PANEL, ro->y + obase, ro->ldy, nrows, ro->tb, 1);
}

/* ------------------------------------------------------------------ portable C */

/* sliced rows ("sell", SELL-16): the rows kernel for the layouts SparseLayer.sliced() builds. Rows sorted by
 * nonzero count (descending) are cut into slices of SLICE (16) rows; a slice stores its rows' nonzeros
 * slot-major, slot j of its 16 rows side by side (rows shorter than the slice's longest are padded with
 * value 0, index 0). One 16-lane gather then feeds 16 rows, lane l accumulating row perm[l]: no horizontal
 * sums, no masked tails, 16 outputs per vector (scattered to their rows with bias and ReLU fused). At 98%
 * sparsity (~20 nonzeros per row) the per-row kernel spent as many gather lanes on tails as on nonzeros. */
#define SLICE 16
typedef struct {
    const float *val;
    const void *idx;
    int idx16;
    const int64_t *sp;    /* slice pointers (nsl + 1), in elements; slice s holds (sp[s+1]-sp[s])/SLICE slots */
    const int32_t *perm;  /* nsl * SLICE: output row of each lane, -1 for padding lanes */
    const float *bias;    /* nsl * SLICE, in lane order (NULL: none) */
    int64_t n_in, n_out, nsl;
    int relu;
} sell_t;

static void sell_generic(const sell_t *wp, const float *x, float *y, int64_t B, int64_t s0, int64_t s1) {
    const sell_t wl = *wp, *w = &wl;
    for (int64_t s = s0; s < s1; s++) {
        const int64_t a = w->sp[s], L = (w->sp[s + 1] - a) / SLICE;
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

static void panel_generic(const csr_t *w, const int32_t *ord, const float *xp, float *yp, int64_t k0, int64_t k1,
                          int first, int last, const rowout_t *ro) {
    float tile[TILE_ROWS * PANEL] __attribute__((aligned(64)));
    const int fuse = last && ro && ro->y && !ord;
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
            const float *p = xp + idx_at(w, k) * PANEL;
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

SK_AVX2 static void sell_avx2(const sell_t *wp, const float *x, float *y, int64_t B, int64_t s0, int64_t s1) {
    const sell_t wl = *wp, *w = &wl;
    float out[SLICE] __attribute__((aligned(32)));
    for (int64_t s = s0; s < s1; s++) {
        const int64_t a = w->sp[s], L = (w->sp[s + 1] - a) / SLICE;
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

SK_AVX2 static void panel_avx2(const csr_t *w, const int32_t *ord, const float *xp, float *yp, int64_t k0, int64_t k1,
                               int first, int last, const rowout_t *ro) {
    float tile[TILE_ROWS * PANEL] __attribute__((aligned(64)));
    const int fuse = last && ro && ro->y && !ord;
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

/* ------------------------------------------------------------------ AVX-512F */

/* The sell kernels work on a local copy of the layout (*w): the build has no strict aliasing, so each
 * slice's stores into y would otherwise make the compiler reload w's fields from memory for the next
 * slice. 4096x4096 98% batch 1 on one thread 81.2 -> 78.1 us, 1024x1024 98% 4.96 -> 4.85 us. */
SK_AVX512 static void sell_avx512(const sell_t *wp, const float *x, float *y, int64_t B, int64_t s0, int64_t s1) {
    const sell_t wl = *wp, *w = &wl;
    for (int64_t s = s0; s < s1; s++) {
        const int64_t a = w->sp[s], L = (w->sp[s + 1] - a) / SLICE;
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

/* panel_avx512 on part of a panel: lanes 0..16*nr-1 only (nr = 2: half a panel, 32 samples; nr = 1: a
 * quarter, 16 samples), nr registers per row. A batch of at most 16 or 32 samples on one thread pays
 * for its lanes only (a partial full panel costs a whole one), and a 64-sample panel split between two
 * threads by samples has each thread read only its half of every input row and write only its half of
 * every output row, so no activation line is shared and both threads keep their own half of the
 * activations in their own cache through a whole chain. Kept apart from panel_avx512: one body generic
 * in the register count for full panels too (nr = 4) measured 3-7% slower there (4096x1024 90% batch
 * 256: 3.20 -> 3.40 ms). */
__attribute__((always_inline)) SK_AVX512 static inline void panel_avx512_part(
    const csr_t *w, const int32_t *ord, const float *xp, float *yp, int64_t k0, int64_t k1, int first,
    int last, const rowout_t *ro, const int nr) {
    float tile[TILE_ROWS * PANEL] __attribute__((aligned(64)));
    const int fuse = last && ro && ro->y && !ord;
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
        for (; k + 2 <= e; k += 2) {
            const __m512 v = _mm512_set1_ps(w->val[k]);
            const __m512 u = _mm512_set1_ps(w->val[k + 1]);
            const float *p = xp + idx_at(w, k) * PANEL;
            const float *pq = xp + idx_at(w, k + 1) * PANEL;
            for (int q = 0; q < nr; q++) {
                a[q] = _mm512_fmadd_ps(v, _mm512_loadu_ps(p + 16 * q), a[q]);
                c[q] = _mm512_fmadd_ps(u, _mm512_loadu_ps(pq + 16 * q), c[q]);
            }
        }
        if (k < e) {
            const __m512 v = _mm512_set1_ps(w->val[k]);
            const float *p = xp + idx_at(w, k) * PANEL;
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

SK_AVX512 static void panel_avx512(const csr_t *w, const int32_t *ord, const float *xp, float *yp, int64_t k0,
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

typedef void (*panel_fn)(const csr_t *, const int32_t *, const float *, float *, int64_t, int64_t, int, int,
                         const rowout_t *);

typedef void (*sell_fn)(const sell_t *, const float *, float *, int64_t, int64_t, int64_t);

static sell_fn pick_sell(void) {
#if SK_X86
    if (g_isa == ISA_AVX512) return sell_avx512;
    if (g_isa == ISA_AVX2) return sell_avx2;
#endif
    return sell_generic;
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

/* ------------------------------------------------------------------ thread pool
 *
 * par_run(nt, n, fn, ctx) runs fn(ctx, i) for the items i in [0, n) on nt threads (the caller is thread
 * 0). Items are pre-assigned: thread t owns the contiguous range [n*t/nt, n*(t+1)/nt), so a kernel that
 * numbers its items part-major gives every thread the same rows (and weights, which stay in that core's
 * cache) call after call; a thread that finishes its own range takes items from the others' (front to
 * back), so a late or slowed thread costs nothing but its share.
 *
 * Workers are persistent pthreads. After a job they spin for g_spin_ns (SPARSEKIT_SPIN_US, default 100
 * us; set_spin_us) before sleeping on a condition variable: the next layer of a model, or the next call
 * of a model run back to back, finds them awake (a wake-up from sleep costs tens of us under a
 * hypervisor; OpenMP regions with OMP_WAIT_POLICY=PASSIVE paid it on every region). The caller never
 * waits for a sleeping worker to wake: it waits for the items to be done, and does them itself if the
 * worker is not there yet.
 *
 * Protocol, built so that a job of a few microseconds costs the fewest cache-line trips between cores
 * (batch-1 layers at 98% sparsity run 3-20 us): the caller writes the job into one cache line (a
 * seqlock: g_job.seq odd while it is written) with plain stores and goes straight to its own items; a
 * spinning worker gets the whole job with one line transfer. Each thread's range has one claim counter
 * that only grows: job items are numbered from g_job.base, the count of all items of earlier jobs, so
 * item i of thread t's range is counter value base + i, claimed by compare-and-swap (the first claim of
 * a job jumps the counter up to its range), and nobody writes the other threads' lines to set a job
 * up. A late worker still holding an older job finds every counter past that job's ranges and touches
 * nothing: a job is finished only when all its items are claimed and done, so no one runs a stale
 * item. The caller claims its first item before it publishes the job. A thread done with its own range
 * waits up to STEAL_AFTER_NS for the job to end before it takes items from another range. Each worker
 * counts the items it finished in its own line; the caller sums those against its snapshot from the
 * previous job. Sleeping uses the Dekker pattern between g_job.seq and g_sleeping: the caller reads
 * g_sleeping right after publishing (plain read: wakes sleepers at once) and again after a fence once
 * it has run its items (catches a worker that went to sleep at that very moment). Calls from several
 * Python threads at once: the one that does not get g_dispatch runs its items serially. Without
 * pthreads (MSVC) OpenMP runs the items, without either one thread does.
 */
#if !defined(_WIN32) && (defined(__unix__) || defined(__APPLE__)) && (defined(__GNUC__) || defined(__clang__))
#define SK_POOL 1
#include <pthread.h>
#include <sched.h>
#include <time.h>
#include <unistd.h>
#define YIELD_AFTER_NS 5000
#else
#define SK_POOL 0
#endif

typedef void (*item_fn)(void *ctx, int64_t item, int tid);
#define POOL_MAX 64

static int max_procs(void) {
#if SK_POOL
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : (int)n;
#elif defined(_OPENMP)
    return omp_get_num_procs();
#else
    return 1;
#endif
}

static int clamp_threads(int t) {
#if SK_POOL || defined(_OPENMP)
    return t < 1 ? 1 : t > POOL_MAX ? POOL_MAX : t;
#else
    (void)t;
    return 1;
#endif
}

static inline void cpu_relax(void) {
#if SK_X86
    __builtin_ia32_pause();
#endif
}

#if SK_POOL
typedef struct {
    uint64_t seq; /* 2 * generation; odd while the caller writes the job */
    item_fn fn;
    void *ctx;
    int64_t n;
    int64_t nt;
    uint64_t base; /* items of all earlier jobs: claim counters of this job start here */
    char pad[16];
} job_t;

typedef struct {
    uint64_t word; /* claim counter of thread t's range: base + the next item (grows only) */
    char pad[56];
} claim_t;

typedef struct {
    uint64_t done; /* items this worker finished, over all jobs (only the worker writes it) */
    char pad[56];
} done_t;

static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_cv = PTHREAD_COND_INITIALIZER;
static pthread_mutex_t g_dispatch = PTHREAD_MUTEX_INITIALIZER;
static int g_nworkers = 0;
static int g_sleeping = 0; /* atomic */
static int64_t g_spin_ns = 100000;
static job_t g_job __attribute__((aligned(64)));
static claim_t g_claim[POOL_MAX] __attribute__((aligned(64)));
static done_t g_done[POOL_MAX] __attribute__((aligned(64)));
static uint64_t g_done_seen[POOL_MAX]; /* the caller's (g_dispatch holder's) snapshot of g_done */

#define LD(p) __atomic_load_n((p), __ATOMIC_SEQ_CST)
#define LDA(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define LDR(p) __atomic_load_n((p), __ATOMIC_RELAXED)
#define STR(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define ADD(p, v) __atomic_add_fetch((p), (v), __ATOMIC_SEQ_CST)

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* the next item of range [start, end) of the job whose items are numbered from `base`, from claim
 * counter *w, or -1 when there is none (the range is done, or the counter belongs to a newer job).
 * *mine: the caller may take every item, it is the range's owner or the first to claim in it; other
 * thieves leave the last item to whoever works the range: taking it costs more than it saves (its
 * weights are in the other core's cache, and with a few us per job the thief would finish later than
 * the owner), and the owner is there, working. */
static inline int64_t claim(uint64_t *w, uint64_t base, int64_t start, int64_t end, int *mine) {
    uint64_t cur = LDR(w);
    const uint64_t lo = base + (uint64_t)start, hi = base + (uint64_t)end;
    for (;;) {
        const int started = cur >= lo;
        const uint64_t c = started ? cur : lo;
        if (c >= hi || (started && !*mine && c + 1 >= hi)) return -1;
        if (__atomic_compare_exchange_n(w, &cur, c + 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED)) {
            if (!started) *mine = 1;
            return (int64_t)(c - base);
        }
    }
}

typedef struct {
    uint64_t base;
    item_fn fn;
    void *ctx;
    int64_t n;
    int nt;
    uint64_t seq;
} jobsnap_t;

/* A thread that has run its own range waits up to this long for the job to end before it takes items
 * from another thread's range. Looking at another thread's claim counter moves that line out of its
 * owner's cache, and the owner's first claim of the next job then waits for it (~0.1 us each way on
 * this machine); in a balanced job the other thread ends within a fraction of this. */
#define STEAL_AFTER_NS 2000

/* the job is over: for the caller, every item done; for a worker, a newer job published */
static int job_over(const jobsnap_t *j, int tid, int64_t own_done) {
    if (tid > 0) return LDA(&g_job.seq) != j->seq;
    int64_t total = own_done;
    for (int t = 1; t < j->nt; t++) total += (int64_t)(LDA(&g_done[t].done) - g_done_seen[t]);
    return total >= j->n;
}

/* run items of job j as thread tid: its own range first (from item `first` when the caller claimed it
 * before publishing the job), then, if the job is not over within STEAL_AFTER_NS (at once without
 * `wait`), the others'.
 * Returns how many. A worker adds what it did to its count after each range, not after each item: a
 * store per item would wait, at the next claim (a locked instruction), for the line the caller polls
 * to come back; and the caller learns that the worker's own range is done before the worker goes
 * looking for items to take. */
static int64_t run_items(const jobsnap_t *j, int tid, int64_t first, int wait) {
    int64_t done = 0, told = 0;
    for (int r = 0; r < j->nt; r++) {
        const int t = (tid + r) % j->nt;
        const int64_t start = j->n * t / j->nt, end = j->n * (t + 1) / j->nt;
        int mine = r == 0;
        if (r == 1 && wait) {
            const int64_t t0 = now_ns();
            int spins = 0, over = 0;
            while (!(over = job_over(j, tid, done))) {
                cpu_relax();
                if (++spins == 8) {
                    spins = 0;
                    if (now_ns() - t0 > STEAL_AFTER_NS) break;
                }
            }
            if (over) break;
        }
        if (r == 0 && first >= 0) {
            j->fn(j->ctx, first, tid);
            done++;
        }
        for (;;) {
            const int64_t i = claim(&g_claim[t].word, j->base, start, end, &mine);
            if (i < 0) break;
            j->fn(j->ctx, i, tid);
            done++;
        }
        if (tid > 0 && done > told) {
            STR(&g_done[tid].done, LDR(&g_done[tid].done) + (uint64_t)(done - told));
            told = done;
        }
    }
    return done;
}

static void wake_sleepers(void) {
    pthread_mutex_lock(&g_mu);
    pthread_cond_broadcast(&g_cv);
    pthread_mutex_unlock(&g_mu);
}

/* a consistent copy of the published job, or 0 while one is being written */
static int snap_job(jobsnap_t *j, uint64_t seq) {
    if (seq & 1) return 0;
    j->fn = LDR(&g_job.fn);
    j->ctx = LDR(&g_job.ctx);
    j->n = LDR(&g_job.n);
    j->nt = (int)LDR(&g_job.nt);
    j->base = LDR(&g_job.base);
    j->seq = seq;
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    return LDR(&g_job.seq) == seq;
}

static void *worker_main(void *arg) {
    const int tid = (int)(intptr_t)arg;
    uint64_t seen = LDA(&g_job.seq) & ~(uint64_t)1;
    for (;;) {
        uint64_t s = LDA(&g_job.seq);
        jobsnap_t j;
        if (s == seen || (s & 1)) {
            const int64_t t0 = now_ns();
            int spins = 0;
            while ((s = LDA(&g_job.seq)) == seen || (s & 1)) {
                cpu_relax();
                if (++spins == 32) {
                    spins = 0;
                    const int64_t dt = now_ns() - t0;
                    if (dt > g_spin_ns) break;
                    /* after a few us, spin with yields: should the scheduler have put this worker on
                     * the caller's core (another process holding the other one), the caller runs */
                    if (dt > YIELD_AFTER_NS) sched_yield();
                }
            }
            if (s == seen || (s & 1)) {
                pthread_mutex_lock(&g_mu);
                ADD(&g_sleeping, 1);
                while ((s = LD(&g_job.seq)) == seen || (s & 1)) pthread_cond_wait(&g_cv, &g_mu);
                ADD(&g_sleeping, -1);
                pthread_mutex_unlock(&g_mu);
            }
        }
        if (!snap_job(&j, s)) continue; /* rewritten meanwhile: look again */
        seen = s;
        if (tid < j.nt) run_items(&j, tid, -1, 1);
    }
    return NULL;
}

static void pool_atfork_child(void) { /* the workers do not exist in a forked child */
    pthread_mutex_t mi = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t ci = PTHREAD_COND_INITIALIZER;
    g_mu = mi;
    g_dispatch = mi;
    g_cv = ci;
    g_nworkers = 0;
    g_sleeping = 0;
    memset(g_done_seen, 0, sizeof g_done_seen);
    memset(g_done, 0, sizeof g_done);
    g_job.seq &= ~(uint64_t)1; /* a job being written by another thread of the parent is gone */
}

/* start workers 1..want-1; returns how many threads (with the caller) are available */
static int pool_grow(int want) {
    static int atfork_done = 0;
    if (!atfork_done) {
        pthread_atfork(NULL, NULL, pool_atfork_child);
        atfork_done = 1;
    }
    while (g_nworkers + 1 < want) {
        pthread_t th;
        pthread_attr_t at;
        pthread_attr_init(&at);
        pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
        pthread_attr_setstacksize(&at, 1 << 20);
        const int rc = pthread_create(&th, &at, worker_main, (void *)(intptr_t)(g_nworkers + 1));
        pthread_attr_destroy(&at);
        if (rc != 0) break;
        g_nworkers++;
    }
    return g_nworkers + 1;
}

/* one job on nt > 1 threads (g_dispatch held) */
static void pool_job(int nt, int64_t n, item_fn fn, void *ctx) {
    const uint64_t seq = LDR(&g_job.seq) + 2; /* even: the caller never leaves it odd */
    const uint64_t base = LDR(&g_job.base) + (uint64_t)LDR(&g_job.n);
    /* the caller's first item is claimed before the job is published: that claim (a locked instruction)
     * then finds nothing in the store buffer to wait for, and the job's stores drain while it runs */
    int mine = 1;
    const int64_t first = claim(&g_claim[0].word, base, 0, n / nt, &mine);
    STR(&g_job.seq, seq - 1);
    STR(&g_job.fn, fn);
    STR(&g_job.ctx, ctx);
    STR(&g_job.n, n);
    STR(&g_job.nt, (int64_t)nt);
    STR(&g_job.base, base);
    STR(&g_job.seq, seq);
    const jobsnap_t j = {base, fn, ctx, n, nt, seq};
    /* Dekker with a worker going to sleep (it adds itself to g_sleeping, then looks at g_job.seq): a
     * plain read here may miss one that is going to sleep right now, so it is read again after a fence
     * once the caller's own range is done; the worker joins late then, it is not lost */
    int woke = 0;
    if (LDR(&g_sleeping) > 0) {
        wake_sleepers();
        woke = 1;
    }
    /* a worker it had to wake arrives tens of us later (KVM): take its items now rather than wait for it */
    int64_t done = run_items(&j, 0, first, !woke);
    if (!woke) {
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        if (LDR(&g_sleeping) > 0) wake_sleepers();
    }
    /* wait for the items the workers claimed; yield after a few us (a worker may share this core) */
    const int64_t t0 = now_ns();
    int spins = 0;
    for (;;) {
        int64_t total = done;
        for (int t = 1; t < nt; t++) total += (int64_t)(LDA(&g_done[t].done) - g_done_seen[t]);
        if (total >= n) break;
        cpu_relax();
        if (++spins == 32) {
            spins = 0;
            if (now_ns() - t0 > YIELD_AFTER_NS) sched_yield();
        }
    }
    for (int t = 1; t < nt; t++) g_done_seen[t] = LDR(&g_done[t].done);
}
#endif /* SK_POOL */

static void par_run(int nt, int64_t n, item_fn fn, void *ctx) {
    if (n <= 0) return;
    if (nt > n) nt = (int)n;
#if SK_POOL
    if (nt > 1 && pthread_mutex_trylock(&g_dispatch) == 0) {
        const int have = pool_grow(nt);
        if (have < nt) nt = have;
        if (nt > 1) {
            pool_job(nt, n, fn, ctx);
            pthread_mutex_unlock(&g_dispatch);
            return;
        }
        pthread_mutex_unlock(&g_dispatch);
    }
    for (int64_t i = 0; i < n; i++) fn(ctx, i, 0);
#elif defined(_OPENMP)
    if (nt > 1) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
        for (int64_t i = 0; i < n; i++) fn(ctx, i, omp_get_thread_num());
        return;
    }
    for (int64_t i = 0; i < n; i++) fn(ctx, i, 0);
#else
    (void)nt;
    for (int64_t i = 0; i < n; i++) fn(ctx, i, 0);
#endif
}

/* ------------------------------------------------------------------ Python glue */

/* Sizes from Python are checked before use: layer widths within SK_MAX_DIM (column indices, row orders and
 * the sliced layout's lanes are int32; a wider layer would narrow them), and every buffer length computed with
 * smul, which saturates instead of wrapping, so an overflowing size fails its length check. */
#define SK_MAX_DIM INT32_MAX
static inline int64_t smul(int64_t a, int64_t b) {
    if (a < 0 || b < 0) return INT64_MAX;
    if (a != 0 && b > INT64_MAX / a) return INT64_MAX;
    return a * b;
}
static inline int64_t smul3(int64_t a, int64_t b, int64_t c) { return smul(smul(a, b), c); }

static int dims_ok(int64_t n_in, int64_t n_out) {
    if (n_in < 0 || n_out < 0 || n_in > SK_MAX_DIM || n_out > SK_MAX_DIM) {
        PyErr_Format(PyExc_ValueError, "layer shape %lldx%lld outside [0, 2^31 - 1]", (long long)n_out,
                     (long long)n_in);
        return 0;
    }
    return 1;
}

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
    /* n_out may be the row count of several column blocks (py_panel): only n_in indexes with int32 */
    if (!dims_ok(n_in, 0) || n_out < 0) { if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "negative shape"); return -1; }
    if (check_len(rowptr, smul(n_out + 1, 8), "rowptr")) return -1;
    const int64_t *rp = (const int64_t *)rowptr->buf;
    const int64_t nnz = rp[n_out];
    if (rp[0] != 0 || nnz < 0) { PyErr_SetString(PyExc_ValueError, "bad rowptr"); return -1; }
    if (check_len(val, smul(nnz + PAD_SLACK, 4), "values")) return -1;
    if (check_len(idx, smul(nnz + PAD_SLACK, idx_bytes), "indices")) return -1;
    w->val = (const float *)val->buf;
    w->idx = idx->buf;
    w->idx16 = idx_bytes == 2;
    w->rowptr = rp;
    w->bias = NULL;
    if (bias_obj != Py_None) {
        if (check_len(bias, smul(n_out, 4), "bias")) return -1;
        w->bias = (const float *)bias->buf;
    }
    w->n_in = n_in;
    w->n_out = n_out;
    w->relu = relu != 0;
    return 0;
}

typedef struct {
    sell_fn fn;
    const sell_t *w;
    const float *x;
    float *y;
    int64_t B, nch;
} sell_job_t;

static void sell_item(void *ctx, int64_t ch, int tid) {
    (void)tid;
    const sell_job_t *j = (const sell_job_t *)ctx;
    int64_t s0, s1;
    split_rows(j->w->sp, j->w->nsl, (int)ch, (int)j->nch, &s0, &s1);
    if (s1 > s0) j->fn(j->w, j->x, j->y, j->B, s0, s1);
}

static PyObject *py_sell(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer val, idx, sp, perm, x, y, bias = {0};
    PyObject *bias_obj;
    int idx_bytes, relu, threads;
    long long n_in, n_out, B;
    if (!PyArg_ParseTuple(args, "y*y*y*y*Oy*w*iLLLii", &val, &idx, &sp, &perm, &bias_obj, &x, &y, &idx_bytes,
                          &n_in, &n_out, &B, &relu, &threads))
        return NULL;
    int have_bias = 0;
    PyObject *ret = NULL;
    sell_t w;
    if (bias_obj != Py_None) {
        if (PyObject_GetBuffer(bias_obj, &bias, PyBUF_C_CONTIGUOUS) < 0) goto done;
        have_bias = 1;
    }
    if (idx_bytes != 2 && idx_bytes != 4) { PyErr_SetString(PyExc_ValueError, "idx_bytes must be 2 or 4"); goto done; }
    if (!dims_ok(n_in, n_out)) goto done;
    if (B < 0) { PyErr_SetString(PyExc_ValueError, "negative batch"); goto done; }
    w.nsl = (n_out + SLICE - 1) / SLICE;
    if (check_len(&sp, smul(w.nsl + 1, 8), "slice pointers") || check_len(&perm, smul(w.nsl * SLICE, 4), "row order"))
        goto done;
    w.sp = (const int64_t *)sp.buf;
    if (w.sp[0] != 0) { PyErr_SetString(PyExc_ValueError, "bad slice pointers"); goto done; }
    for (int64_t s = 0; s < w.nsl; s++)
        if (w.sp[s + 1] < w.sp[s] || (w.sp[s + 1] - w.sp[s]) % SLICE) {
            PyErr_SetString(PyExc_ValueError, "bad slice pointers");
            goto done;
        }
    if (check_len(&val, smul(w.sp[w.nsl], 4), "values") || check_len(&idx, smul(w.sp[w.nsl], idx_bytes), "indices") ||
        (have_bias && check_len(&bias, smul(w.nsl * SLICE, 4), "bias")) || check_len(&x, smul3(B, n_in, 4), "x") ||
        check_len(&y, smul3(B, n_out, 4), "y"))
        goto done;
    w.val = (const float *)val.buf;
    w.idx = idx.buf;
    w.idx16 = idx_bytes == 2;
    w.perm = (const int32_t *)perm.buf;
    w.bias = have_bias ? (const float *)bias.buf : NULL;
    w.n_in = n_in;
    w.n_out = n_out;
    w.relu = relu != 0;
    {
        const sell_fn fn = pick_sell();
        const float *xp = (const float *)x.buf;
        float *yp = (float *)y.buf;
        int nt = clamp_threads(threads < 0 ? -threads : threads);
        if (threads > 0) nt = rows_threads(nt, w.sp[w.nsl] * (B > 0 ? B : 1));
        Py_BEGIN_ALLOW_THREADS
        if (nt <= 1) {
            if (w.nsl > 0) fn(&w, xp, yp, B, 0, w.nsl);
        } else {
            sell_job_t job = {fn, &w, xp, yp, B, (int64_t)nt * CHUNKS_PER_THREAD};
            par_run(nt, job.nch, sell_item, &job);
        }
        Py_END_ALLOW_THREADS
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    if (have_bias) PyBuffer_Release(&bias);
    PyBuffer_Release(&val); PyBuffer_Release(&idx); PyBuffer_Release(&sp); PyBuffer_Release(&perm);
    PyBuffer_Release(&x); PyBuffer_Release(&y);
    return ret;
}

typedef void (*gemv_fn)(const float *, const float *, const float *, float *, int64_t, int64_t, int64_t, int64_t, int);

typedef struct {
    gemv_fn fn;
    const float *w, *bias, *x;
    float *y;
    int64_t n_in, n_out;
    int relu;
} gemv_job_t;

static void gemv_item(void *ctx, int64_t b, int tid) {
    (void)tid;
    const gemv_job_t *j = (const gemv_job_t *)ctx;
    j->fn(j->w, j->bias, j->x, j->y, j->n_in, j->n_out, b, b + 1, j->relu);
}

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
    if (!dims_ok(n_in, n_out)) goto done;
    if (B < 0) { PyErr_SetString(PyExc_ValueError, "negative batch"); goto done; }
    if (check_len(&wt, smul3(n_in, n_out, 4), "weight") || check_len(&x, smul3(B, n_in, 4), "x") ||
        check_len(&y, smul3(B, n_out, 4), "y") || (have_bias && check_len(&bias, smul(n_out, 4), "bias")))
        goto done;
    {
        gemv_fn fn = gemv_generic;
#if SK_X86
        if (g_isa == ISA_AVX512) fn = gemv_avx512;
#endif
        const float *w = (const float *)wt.buf, *bp = have_bias ? (const float *)bias.buf : NULL;
        const float *xp = (const float *)x.buf;
        float *yp = (float *)y.buf;
        int nt = clamp_threads(threads < 0 ? -threads : threads);
        if (threads > 0 && n_in * n_out * B < 4 * PAR_MIN_WORK) nt = 1;
        Py_BEGIN_ALLOW_THREADS
        if (nt <= 1) {
            fn(w, bp, xp, yp, n_in, n_out, 0, B, relu != 0);
        } else {
            gemv_job_t job = {fn, w, bp, xp, yp, n_in, n_out, relu != 0};
            par_run(nt, B, gemv_item, &job);
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

/* ------------------------------------------------------------------ chains
 * A prepared chain of small-batch layers (sell and gemv kernels): validated once by chain_new, run with one
 * Python->C call per model call by chain_run (no per-layer argument parsing, buffer exports, slice pointer
 * re-checks or intermediate numpy arrays). Activations between layers live in the chain's scratch; a
 * caller that finds it in use (another thread inside chain_run: the flag is read and set under the GIL)
 * gets a private malloc'ed one, so two concurrent callers never share a buffer. */
enum { CH_SELL = 0, CH_GEMV = 1, CH_PANEL = 2 };
typedef struct {
    int kind, cap;
    sell_t s;            /* CH_SELL */
    const float *wt;     /* CH_GEMV: weight (n_in, n_out) */
    const float *bias;   /* CH_GEMV */
    int64_t n_in, n_out;
    int relu;
    int64_t work;        /* sell: stored slots (nonzeros + padding); panel: nonzeros */
    csr_t pw;            /* CH_PANEL: values, indices, bias, shape (rowptr: bp) */
    const int64_t *bp;   /* CH_PANEL: block pointers (nb * n_out + 1), by position */
    const int32_t *ord;  /* CH_PANEL: row at each position, per block; NULL: natural order */
    int64_t nb;          /* CH_PANEL: column blocks */
} ch_layer_t;

typedef struct {
    int n;
    ch_layer_t *L;
    Py_buffer *bufs;     /* held for the chain's lifetime */
    int nbufs;
    int64_t max_mid;     /* widest intermediate activation (floats per sample) */
    int panel;           /* every layer is CH_PANEL: run data-parallel (see pchain_run) */
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

/* fast_call recycles its outputs: it keeps a reference to the last two arrays it returned and hands
 * one out again once it is the only holder (Py_REFCNT 1: the caller, and any view or buffer export of
 * it, let go), which is what free + malloc of the same block would do, minus their cost: a fresh 4 KB
 * numpy array is ~0.25 us plus, on two threads, ~0.15 us more of the worker's output lines moving
 * between the cores; a fresh 4 MB output (4096 x 256) costs 40-60 us of page faults per call. Two
 * because in `y = m.run(x)` the previous result is still bound while the next call runs. Outputs up to
 * SPARE_MAX_BYTES are kept, SPARE_TOTAL_BYTES over all chains. */
#define SPARE_MAX_BYTES ((int64_t)16 << 20)
#define SPARE_TOTAL_BYTES ((int64_t)64 << 20)
static int64_t g_spare_total = 0; /* GIL-protected */

static void spares_drop(chain_t *c) {
    for (int i = 0; i < 2; i++) {
        g_spare_total -= c->spare_bytes[i];
        c->spare_bytes[i] = 0;
        Py_CLEAR(c->spare[i]);
    }
}

static void chain_free(PyObject *cap) {
    chain_t *c = (chain_t *)PyCapsule_GetPointer(cap, "sparsekit.chain");
    if (!c) return;
    spares_drop(c);
    for (int i = 0; i < c->nbufs; i++) PyBuffer_Release(&c->bufs[i]);
    free(c->bufs);
    free(c->L);
    free(c->scratch_raw);
    free(c);
}

/* n floats, 64-byte aligned; *raw is what to free */
static float *alloc_aligned(int64_t n, void **raw) {
    *raw = NULL;
    if (n < 0 || (uint64_t)n > (SIZE_MAX - 64) / 4) return NULL;
    *raw = malloc((size_t)n * 4 + 64);
    if (!*raw) return NULL;
    return (float *)(((uintptr_t)*raw + 63) & ~(uintptr_t)63);
}

static void panel_rows(panel_fn fn, const csr_t *w, const int64_t *bp, const int32_t *ord, int64_t nb,
                       const rowout_t *ro, int64_t o0, int64_t o1, const float *xp, float *yp);
static void to_panel_lanes(const float *x, float *dst, int64_t B, int64_t n, int64_t b0, int64_t nl);
static void to_panel_lanes_cols(const float *x, float *dst, int64_t B, int64_t n, int64_t b0, int64_t nl,
                                int64_t f0, int64_t f1);

static int ch_get(chain_t *c, PyObject *o, int64_t need, const char *what, const void **out) {
    Py_buffer *b = &c->bufs[c->nbufs];
    if (PyObject_GetBuffer(o, b, PyBUF_C_CONTIGUOUS) < 0) return -1;
    c->nbufs++;
    if (check_len(b, need, what)) return -1;
    *out = b->buf;
    return 0;
}

static PyObject *py_chain_new(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *specs, *in_shape = NULL;
    if (!PyArg_ParseTuple(args, "O!|O!", &PyList_Type, &specs, &PyTuple_Type, &in_shape)) return NULL;
    const Py_ssize_t n = PyList_GET_SIZE(specs);
    if (n < 1) { PyErr_SetString(PyExc_ValueError, "empty chain"); return NULL; }
    chain_t *c = (chain_t *)calloc(1, sizeof(chain_t));
    if (!c) return PyErr_NoMemory();
    c->L = (ch_layer_t *)calloc((size_t)n, sizeof(ch_layer_t));
    c->bufs = (Py_buffer *)calloc((size_t)n * 5, sizeof(Py_buffer));
    PyObject *cap = NULL;
    if (!c->L || !c->bufs) { PyErr_NoMemory(); goto fail; }
    c->n = (int)n;
    for (Py_ssize_t i = 0; i < n; i++) {
        ch_layer_t *l = &c->L[i];
        PyObject *a, *b, *d, *e, *bias_obj;
        int idx_bytes;
        long long n_in, n_out, nb = 1;
        if (!PyArg_ParseTuple(PyList_GET_ITEM(specs, i), "iOOOOOiLLii|L;chain layer", &l->kind, &a, &b, &d, &e,
                              &bias_obj, &idx_bytes, &n_in, &n_out, &l->relu, &l->cap, &nb))
            goto fail;
        if ((l->kind == CH_PANEL) != (i == 0 ? l->kind == CH_PANEL : c->panel)) {
            PyErr_SetString(PyExc_ValueError, "a chain is all panel layers or none");
            goto fail;
        }
        if (i == 0) {
            c->panel = l->kind == CH_PANEL;
            c->pw = n_in;
        }
        if (n_out > c->pw) c->pw = n_out;
        if (!dims_ok(n_in, n_out)) goto fail;
        if (i > 0 && n_in != c->L[i - 1].n_out) { PyErr_SetString(PyExc_ValueError, "chain layer sizes differ"); goto fail; }
        l->n_in = n_in;
        l->n_out = n_out;
        l->relu = l->relu != 0;
        if (i + 1 < n && n_out > c->max_mid) c->max_mid = n_out;
        const void *p;
        if (l->kind == CH_SELL) {
            sell_t *w = &l->s;
            if (idx_bytes != 2 && idx_bytes != 4) { PyErr_SetString(PyExc_ValueError, "idx_bytes must be 2 or 4"); goto fail; }
            w->nsl = (n_out + SLICE - 1) / SLICE;
            if (ch_get(c, d, smul(w->nsl + 1, 8), "slice pointers", &p)) goto fail;
            w->sp = (const int64_t *)p;
            if (w->sp[0] != 0) { PyErr_SetString(PyExc_ValueError, "bad slice pointers"); goto fail; }
            for (int64_t s = 0; s < w->nsl; s++)
                if (w->sp[s + 1] < w->sp[s] || (w->sp[s + 1] - w->sp[s]) % SLICE) {
                    PyErr_SetString(PyExc_ValueError, "bad slice pointers");
                    goto fail;
                }
            if (ch_get(c, e, smul(w->nsl * SLICE, 4), "row order", &p)) goto fail;
            w->perm = (const int32_t *)p;
            for (int64_t r = 0; r < w->nsl * SLICE; r++)
                if (w->perm[r] < -1 || w->perm[r] >= n_out) { PyErr_SetString(PyExc_ValueError, "bad row order"); goto fail; }
            if (ch_get(c, a, smul(w->sp[w->nsl], 4), "values", &p)) goto fail;
            w->val = (const float *)p;
            if (ch_get(c, b, smul(w->sp[w->nsl], idx_bytes), "indices", &p)) goto fail;
            w->idx = p;
            w->idx16 = idx_bytes == 2;
            for (int64_t k = 0; k < w->sp[w->nsl]; k++) {
                const int64_t col = w->idx16 ? (int64_t)((const uint16_t *)p)[k] : (int64_t)((const int32_t *)p)[k];
                if (col < 0 || col >= (n_in > 0 ? n_in : 1)) { PyErr_SetString(PyExc_ValueError, "index out of range"); goto fail; }
            }
            w->bias = NULL;
            if (bias_obj != Py_None) {
                if (ch_get(c, bias_obj, smul(w->nsl * SLICE, 4), "bias", &p)) goto fail;
                w->bias = (const float *)p;
            }
            w->n_in = n_in;
            w->n_out = n_out;
            w->relu = l->relu;
            l->work = w->sp[w->nsl];
        } else if (l->kind == CH_GEMV) {
            if (ch_get(c, a, smul3(n_in, n_out, 4), "weight", &p)) goto fail;
            l->wt = (const float *)p;
            l->bias = NULL;
            if (bias_obj != Py_None) {
                if (ch_get(c, bias_obj, smul(n_out, 4), "bias", &p)) goto fail;
                l->bias = (const float *)p;
            }
        } else if (l->kind == CH_PANEL) {
            csr_t *w = &l->pw;
            if (idx_bytes != 2 && idx_bytes != 4) { PyErr_SetString(PyExc_ValueError, "idx_bytes must be 2 or 4"); goto fail; }
            if (nb < 1) { PyErr_SetString(PyExc_ValueError, "bad block count"); goto fail; }
            if (nb > SK_MAX_DIM || ch_get(c, d, smul(smul(nb, n_out) + 1, 8), "block pointers", &p)) {
                if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "bad block count");
                goto fail;
            }
            l->bp = (const int64_t *)p;
            const int64_t nnz = l->bp[nb * n_out];
            if (l->bp[0] != 0 || nnz < 0) { PyErr_SetString(PyExc_ValueError, "bad block pointers"); goto fail; }
            for (int64_t r = 0; r < nb * n_out; r++)
                if (l->bp[r + 1] < l->bp[r]) { PyErr_SetString(PyExc_ValueError, "bad block pointers"); goto fail; }
            l->ord = NULL;
            if (e != Py_None) {
                if (ch_get(c, e, smul3(nb, n_out, 4), "row order", &p)) goto fail;
                l->ord = (const int32_t *)p;
                for (int64_t r = 0; r < nb * n_out; r++)
                    if (l->ord[r] < 0 || l->ord[r] >= n_out) { PyErr_SetString(PyExc_ValueError, "bad row order"); goto fail; }
            }
            if (ch_get(c, a, smul(nnz + PAD_SLACK, 4), "values", &p)) goto fail;
            w->val = (const float *)p;
            if (ch_get(c, b, smul(nnz + PAD_SLACK, idx_bytes), "indices", &p)) goto fail;
            w->idx = p;
            w->idx16 = idx_bytes == 2;
            for (int64_t k = 0; k < nnz; k++)
                if (idx_at(w, k) < 0 || idx_at(w, k) >= n_in) { PyErr_SetString(PyExc_ValueError, "index out of range"); goto fail; }
            w->bias = NULL;
            if (bias_obj != Py_None) {
                if (ch_get(c, bias_obj, smul(n_out, 4), "bias", &p)) goto fail;
                w->bias = (const float *)p;
            }
            w->rowptr = l->bp;
            w->n_in = n_in;
            w->n_out = n_out;
            w->relu = l->relu;
            l->nb = nb;
            l->work = nnz;
        } else {
            PyErr_SetString(PyExc_ValueError, "chain layer kind must be 0 (sell), 1 (gemv) or 2 (panel)");
            goto fail;
        }
    }
    if (in_shape) {
        const Py_ssize_t nd = PyTuple_GET_SIZE(in_shape);
        int64_t prod = 1;
        for (Py_ssize_t k = 0; k < nd && k < 8; k++) {
            const long long d = PyLong_AsLongLong(PyTuple_GET_ITEM(in_shape, k));
            if (d == -1 && PyErr_Occurred()) goto fail;
            c->in_shape[k] = d;
            prod *= d;
        }
        if (nd > 8 || prod != c->L[0].n_in) {
            PyErr_SetString(PyExc_ValueError, "chain_new: input shape must have at most 8 dims, n_in elements");
            goto fail;
        }
        c->in_ndim = (int)nd;
    }
    cap = PyCapsule_New(c, "sparsekit.chain", chain_free);
    if (!cap) goto fail;
    return cap;
fail:
    for (int i = 0; i < c->nbufs; i++) PyBuffer_Release(&c->bufs[i]);
    free(c->bufs);
    free(c->L);
    free(c);
    return NULL;
}

static void chain_layer(const ch_layer_t *l, const float *x, float *y, int64_t B, int threads) {
    int nt = clamp_threads(threads);
    if (l->cap > 0 && nt > l->cap) nt = l->cap;
    if (l->kind == CH_SELL) {
        const sell_fn fn = pick_sell();
        nt = rows_threads(nt, l->work * (B > 0 ? B : 1));
        if (nt <= 1) {
            if (l->s.nsl > 0) fn(&l->s, x, y, B, 0, l->s.nsl);
        } else {
            sell_job_t job = {fn, &l->s, x, y, B, (int64_t)nt * CHUNKS_PER_THREAD};
            par_run(nt, job.nch, sell_item, &job);
        }
    } else {
        gemv_fn fn = gemv_generic;
#if SK_X86
        if (g_isa == ISA_AVX512) fn = gemv_avx512;
#endif
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
    const panel_fn fn = pick_panel();
    to_panel_lanes(j->x, a, j->B, c->L[0].n_in, b0, nl);
    float *cur = a;
    for (int i = 0; i < c->n; i++) {
        const ch_layer_t *l = &c->L[i];
        float *dst = cur == a ? b : a;
        const int lastl = i + 1 == c->n;
        const rowout_t ro = {lastl ? j->y + b0 * l->n_out : NULL, l->n_out, tb,
                             lastl && j->B * l->n_out * 4 >= STREAM_MIN_BYTES, nl == PANEL ? 0 : (int)nl};
        panel_rows(fn, &l->pw, l->bp, l->ord, l->nb, &ro, 0, l->n_out, cur, dst);
        cur = dst;
    }
}

/* Half (and quarter) panels on several threads: every thread reads all the weights, so only while they
 * fit well within a core's L2 (bigger layers split the rows: one panel or less in the chain, prows_run;
 * more panels layer by layer, the caller's fallback). */
#define HALF_PANEL_MAX_WEIGHT_BYTES (1 << 20)

/* how a panel chain runs B samples: nt threads over `units` units of `lanes` samples each (data-parallel:
 * each thread whole units through every layer), or with `rows` one unit whose every layer has its rows
 * split between the nt threads (one pool job per layer) */
typedef struct {
    int nt, lanes, rows;
    int64_t units;
} pplan_t;

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
    if (work * B < g_panel_par_min) nt = 1;
    const int64_t P = (B + PANEL - 1) / PANEL, prows_min = (int64_t)c->n * (g_panel_par_min << PROWS_SPLIT_SHIFT);
    /* a unit of all B samples needs no more lanes than that: with AVX-512 half or quarter panels (a
     * partial panel costs a whole one: the demo model at batch 16, 37 us on a full panel, 24 on a half,
     * 16.5 on a quarter) */
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
             * threads busiest for the least work (relative cost of a 16/32/64-lane unit: the demo model
             * 16.5/22/35 us; LeNet at batch 32 on 2 threads: 37 us on one half panel, 26 us on two
             * quarter panels) */
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
        if (one_unit_lanes < PANEL ? work * B >= prows_min : work * B >= (g_panel_par_min << ROW_SPLIT_SHIFT)) {
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
        if (!ok && work * B >= (g_panel_par_min << ROW_SPLIT_SHIFT)) return 0;
    }
    if (nt > p->units) nt = (int)p->units;
    if (p->units == 1) p->lanes = one_unit_lanes;
    return p->nt = nt < 1 ? 1 : nt;
}

/* o's buffer (C-contiguous, with its format) in *x: 1; 0 and no buffer held where o has none of that kind
 * (the caller converts it and retries); -1 with an exception set on other errors */
static int get_x(PyObject *o, Py_buffer *x) {
    if (PyObject_GetBuffer(o, x, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
        if (!PyErr_ExceptionMatches(PyExc_BufferError) && !PyErr_ExceptionMatches(PyExc_ValueError) &&
            !PyErr_ExceptionMatches(PyExc_TypeError)) /* TypeError: no buffer at all (a list) */
            return -1;
        PyErr_Clear();
        return 0;
    }
    return 1;
}

/* x is a float32 (batch, n_in) or (batch, *input shape) buffer for chain c, n_in > 0 (C-contiguous, so
 * laid out as (batch, n_in) either way) */
static int x_fits(const chain_t *c, const Py_buffer *x) {
    const int64_t n_in = c->L[0].n_in;
    if (x->itemsize != 4 || !x->format || strcmp(x->format, "f") != 0 || n_in == 0 || x->ndim < 2) return 0;
    if (x->ndim == 2 && x->shape[1] == n_in) return 1;
    if (x->ndim != c->in_ndim + 1) return 0;
    for (int k = 0; k < c->in_ndim; k++)
        if (x->shape[k + 1] != c->in_shape[k]) return 0;
    return 1;
}

/* get_x and x_fits: 1 with the buffer held, 0 (none held) or -1 */
static int chain_x(const chain_t *c, PyObject *o, Py_buffer *x) {
    const int got = get_x(o, x);
    if (got <= 0) return got;
    if (!x_fits(c, x)) {
        PyBuffer_Release(x);
        return 0;
    }
    return 1;
}

/* the plan for a panel chain on B samples and its thread count, or 0 when it declines (see
 * pchain_plan); 1 for other chains */
static int chain_plan(const chain_t *c, int64_t B, int threads, pplan_t *p) {
    p->nt = 1;
    p->lanes = PANEL;
    p->units = 0;
    p->rows = 0;
    return c->panel ? pchain_plan(c, B, threads, p) : 1;
}

static int panel_bounds(const int64_t *bp, int64_t nb, int64_t n_out, int64_t nparts, int64_t *bounds);

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
    if (o1 > o0) panel_rows(pick_panel(), &j->l->pw, j->l->bp, j->l->ord, j->l->nb, &j->ro, o0, o1, j->xp, j->yp);
}

/* floats of one thread's transposed input in prows_run (64-byte multiple) */
static int64_t prows_input_floats(const chain_t *c) { return c->L[0].n_in * PANEL + 16; }

static void prows0_item(void *ctx, int64_t part, int tid) {
    const prows0_job_t *j = (const prows0_job_t *)ctx;
    const int64_t o0 = j->r.bounds[part], o1 = j->r.bounds[part + 1];
    if (o1 <= o0) return;
    float *xp = j->xp0 + (int64_t)tid * j->xs;
    to_panel_lanes(j->x, xp, j->B, j->r.l->n_in, 0, j->lanes);
    panel_rows(pick_panel(), &j->r.l->pw, j->r.l->bp, j->r.l->ord, j->r.l->nb, &j->r.ro, o0, o1, xp, j->r.yp);
}

/* a panel chain's one unit of B samples with every layer's rows split between pl->nt threads: one pool
 * job per layer (thread t takes row range t, the same rows call after call, so its weights stay in its
 * cache). In the first, each thread transposes the whole input into a buffer of its own (scratch past
 * the two shared panels: prows_input_floats each) before its rows: the input transpose split between
 * the threads had each thread then read the other's half of the panel from the other core, line by
 * line in the order of its indices (1024x1024 98% at batch 16 on 2 threads: 29 us, one thread 28 us).
 * The row ranges are computed here, per call (the GIL is held: a concurrent caller may use other
 * thread counts). -1: out of memory. */
static int prows_run(const chain_t *c, const float *x, int64_t B, float *y, const pplan_t *pl, float *scratch) {
    const int nt = pl->nt;
    int64_t *bounds = (int64_t *)malloc((size_t)c->n * (nt + 1) * sizeof(int64_t));
    if (!bounds) return -1;
    for (int i = 0; i < c->n; i++)
        if (panel_bounds(c->L[i].bp, c->L[i].nb, c->L[i].n_out, nt, bounds + (int64_t)i * (nt + 1))) {
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
static int chain_exec(chain_t *c, const float *x, int64_t B, float *y, int threads, const pplan_t *pl) {
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

static int parse_threads(PyObject *o, int *threads) {
    const long t = PyLong_AsLong(o);
    if (t == -1 && PyErr_Occurred()) return -1;
    *threads = t < 1 ? 1 : t > 1024 ? 1024 : (int)t;
    return 0;
}

static PyObject *py_chain_plan(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *cap;
    long long B;
    int threads;
    if (!PyArg_ParseTuple(args, "OLi", &cap, &B, &threads)) return NULL;
    chain_t *c = (chain_t *)PyCapsule_GetPointer(cap, "sparsekit.chain");
    if (!c) return NULL;
    if (B < 0) { PyErr_SetString(PyExc_ValueError, "chain_plan: negative batch"); return NULL; }
    pplan_t pl;
    if (chain_plan(c, B, threads, &pl) == 0) Py_RETURN_NONE;
    return Py_BuildValue("{s:i,s:i,s:O,s:L}", "threads", pl.nt, "lanes", pl.lanes, "rows_split",
                         pl.rows ? Py_True : Py_False, "units", (long long)pl.units);
}

static PyObject *py_chain_run(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 4) { PyErr_SetString(PyExc_TypeError, "chain_run(chain, x, y, threads)"); return NULL; }
    chain_t *c = (chain_t *)PyCapsule_GetPointer(args[0], "sparsekit.chain");
    int threads;
    if (!c || parse_threads(args[3], &threads) < 0) return NULL;
    Py_buffer x, y;
    const int got = chain_x(c, args[1], &x);
    if (got <= 0) {
        if (got < 0) return NULL;
        Py_RETURN_FALSE;
    }
    if (PyObject_GetBuffer(args[2], &y, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&x);
        return NULL;
    }
    PyObject *ret = NULL;
    const int64_t B = x.shape[0];
    pplan_t pl;
    if ((int64_t)y.len != B * c->L[c->n - 1].n_out * 4) {
        PyErr_SetString(PyExc_ValueError, "chain_run: y must hold (batch, n_out) float32");
    } else if (chain_plan(c, B, threads, &pl) == 0) {
        ret = Py_False;
        Py_INCREF(ret);
    } else if (chain_exec(c, (const float *)x.buf, B, (float *)y.buf, threads, &pl) > 0) {
        ret = Py_True;
        Py_INCREF(ret);
    }
    PyBuffer_Release(&x);
    PyBuffer_Release(&y);
    return ret;
}

/* o is a writable C-contiguous float32 (B, n) array: its data, else NULL (no exception) */
static float *out_data(PyObject *o, int64_t B, int64_t n) {
    Py_buffer b;
    if (PyObject_GetBuffer(o, &b, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE | PyBUF_FORMAT) < 0) {
        PyErr_Clear();
        return NULL;
    }
    float *p = NULL;
    if (b.ndim == 2 && b.shape[0] == B && b.shape[1] == n && b.itemsize == 4 && b.format &&
        strcmp(b.format, "f") == 0)
        p = (float *)b.buf;
    PyBuffer_Release(&b); /* the array itself keeps the data alive: the caller holds a reference */
    return p;
}

/* the output for a B-sample call: a recycled one (see SPARE_MAX_BYTES) or a new one from alloc();
 * a new reference and its data in *data, or NULL with an exception set */
static PyObject *out_take(chain_t *c, PyObject *alloc, int64_t B, float **data) {
    const int64_t n = c->L[c->n - 1].n_out;
    for (int k = 0; k < 2; k++) {
        const int i = (c->spare_next + k) & 1;
        PyObject *s = c->spare[i];
        if (s && Py_REFCNT(s) == 1 && (*data = out_data(s, B, n)) != NULL) {
            c->spare_next = i ^ 1;
            Py_INCREF(s);
            return s;
        }
    }
    PyObject *y = PyObject_CallNoArgs(alloc);
    if (!y) return NULL;
    if (!(*data = out_data(y, B, n))) {
        Py_DECREF(y);
        PyErr_SetString(PyExc_ValueError, "fast_call: alloc() must return a writable (batch, n_out) float32 array");
        return NULL;
    }
    const int64_t bytes = B * n * 4;
    const int i = c->spare_next;
    g_spare_total -= c->spare_bytes[i];
    c->spare_bytes[i] = 0;
    Py_CLEAR(c->spare[i]);
    if (bytes <= SPARE_MAX_BYTES && g_spare_total + bytes <= SPARE_TOTAL_BYTES) {
        Py_INCREF(y);
        c->spare[i] = y;
        c->spare_bytes[i] = bytes;
        g_spare_total += bytes;
    }
    c->spare_next = i ^ 1;
    return y;
}

/* chain c on x (a fitting buffer, held by the caller) into an output from out_take: a new reference,
 * Py_False (a new reference) where the chain declines this batch, or NULL with an exception set */
static PyObject *chain_call_x(chain_t *c, const Py_buffer *x, int threads, PyObject *alloc) {
    const int64_t B = x->shape[0];
    pplan_t pl;
    if (chain_plan(c, B, threads, &pl) == 0) Py_RETURN_FALSE;
    float *yd;
    PyObject *y = out_take(c, alloc, B, &yd);
    if (y && chain_exec(c, (const float *)x->buf, B, yd, threads, &pl) < 0) Py_CLEAR(y);
    return y;
}

/* fast_call(table, x, threads, epoch): FastModel.run's fast path in one call. table maps a batch size to
 * (plan epoch, chain, alloc); when x is a C-contiguous float32 (batch, n_in) or (batch, *input shape)
 * array whose batch size has an entry made at epoch[0] (no layer's plan replaced since) and the chain
 * takes this batch, runs the chain into an output from out_take (recycled, or alloc()) and returns it;
 * else None (nothing run). */
static PyObject *py_fast_call(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 4 || !PyDict_CheckExact(args[0]) || !PyList_CheckExact(args[3]) || PyList_GET_SIZE(args[3]) < 1) {
        PyErr_SetString(PyExc_TypeError, "fast_call(table: dict, x, threads, epoch: list)");
        return NULL;
    }
    int threads;
    if (parse_threads(args[2], &threads) < 0) return NULL;
    Py_buffer x;
    const int got = get_x(args[1], &x);
    if (got <= 0) {
        if (got < 0) return NULL;
        Py_RETURN_NONE;
    }
    PyObject *ret = NULL, *hit = NULL;
    if (x.ndim < 2) goto none;
    PyObject *key = PyLong_FromSsize_t(x.shape[0]);
    if (!key) goto done;
    hit = PyDict_GetItemWithError(args[0], key);
    Py_DECREF(key);
    if (!hit) {
        if (PyErr_Occurred()) goto done;
        goto none;
    }
    Py_INCREF(hit); /* another thread may replace the entry while this one computes with the GIL released */
    if (!PyTuple_CheckExact(hit) || PyTuple_GET_SIZE(hit) != 3) {
        PyErr_SetString(PyExc_TypeError, "fast_call: table values must be (epoch, chain, alloc)");
        goto done;
    }
    const int same = PyObject_RichCompareBool(PyTuple_GET_ITEM(hit, 0), PyList_GET_ITEM(args[3], 0), Py_EQ);
    if (same < 0) goto done;
    if (!same) goto none;
    chain_t *c = (chain_t *)PyCapsule_GetPointer(PyTuple_GET_ITEM(hit, 1), "sparsekit.chain");
    if (!c) goto done;
    if (!x_fits(c, &x)) goto none;
    ret = chain_call_x(c, &x, threads, PyTuple_GET_ITEM(hit, 2));
    if (ret == Py_False) {
        Py_DECREF(ret);
        goto none;
    }
    goto done;
none:
    ret = Py_None;
    Py_INCREF(ret);
done:
    Py_XDECREF(hit);
    PyBuffer_Release(&x);
    return ret;
}

static PyObject *py_chain_drop_outputs(PyObject *self, PyObject *cap) {
    (void)self;
    chain_t *c = (chain_t *)PyCapsule_GetPointer(cap, "sparsekit.chain");
    if (!c) return NULL;
    spares_drop(c);
    Py_RETURN_NONE;
}

/* Rows are handled in groups of GROUP_ROWS: thread ranges start on group boundaries, and a layer's
 * optional row order (`order`, per column block) permutes rows only within their group. The Python side
 * sorts each group's rows by their nonzero count in the block (SparseLayer.blocked): the inner loop's
 * trip count then repeats from row to row and its exit branch is predicted. With random counts nearly
 * every row mispredicted it: 1024x1024 90%, 128-wide blocks, batch 256: 851 us random vs 619 us with
 * equal counts per row. */
#define GROUP_ROWS 64

static void to_panels_range(const float *x, float *xp, int64_t B, int64_t n, int64_t p0, int64_t p1);
static void to_panel_one(const float *x, float *dst, int64_t B, int64_t n, int64_t p);

typedef struct {
    panel_fn fn;
    csr_t w;
    const int64_t *bp;   /* block pointers (nb * n_out + 1), by position */
    const int32_t *ord;  /* row at each position, per block; NULL: natural order */
    int64_t nb, P, nparts;
    const int64_t *bounds; /* nparts + 1 group-aligned row bounds */
    const float *xp;
    float *yp, *yrm;
    int64_t batch;
    const float *xr; /* row-major input (batch, n_in) to transpose into xp panel by panel; NULL: xp is ready */
} panel_job_t;

/* the rows [g0, g1) of one panel, results in yp (bias and ReLU applied): into row-major y */
static void flush_rows(const rowout_t *ro, const float *yp, int64_t g0, int64_t g1) {
    for (int64_t t0 = g0; t0 < g1; t0 += TILE_ROWS)
        tile_flush(ro, yp + t0 * PANEL, t0, g1 - t0 < TILE_ROWS ? g1 - t0 : TILE_ROWS);
}

/* rows [o0, o1) of one panel (xp -> yp) over all column blocks; the last block's results also go to
 * row-major y when ro->y is set */
static void panel_rows(panel_fn fn, const csr_t *w, const int64_t *bp, const int32_t *ord, int64_t nb,
                       const rowout_t *ro, int64_t o0, int64_t o1, const float *xp, float *yp) {
    const int64_t n_out = w->n_out;
    csr_t wc = *w;
    for (int64_t c = 0; c < nb; c++) {
        wc.rowptr = bp + c * n_out;
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

static void panel_item(void *ctx, int64_t item, int tid) {
    (void)tid;
    const panel_job_t *j = (const panel_job_t *)ctx;
    const int64_t part = item / j->P, p = item % j->P;
    const int64_t o0 = j->bounds[part], o1 = j->bounds[part + 1];
    if (o1 > o0) panel_range(j, p, o0, o1, j->xp + p * j->w.n_in * PANEL, j->yp + p * j->w.n_out * PANEL);
}

/* one whole panel: its input transpose (when the input is row-major), then every row. Run per panel,
 * the panel's input, partial sums and outputs stay in L2 between the transpose and the kernel: 1024x1024
 * 90% batch 256 on one thread 838 -> ~765 us against a transpose of the whole batch first. */
static void panel_whole(void *ctx, int64_t p, int tid) {
    const panel_job_t *j = (const panel_job_t *)ctx;
    /* scratch a thread reuses panel after panel (L2-hot): the transposed input when the input is
     * row-major, the partial sums when the output is; else the panel's own slot */
    const int64_t xs = j->xr ? tid : p, ys = j->yrm ? tid : p;
    float *xp = (float *)j->xp + xs * j->w.n_in * PANEL;
    if (j->xr) to_panel_one(j->xr, xp, j->batch, j->w.n_in, p);
    panel_range(j, p, 0, j->w.n_out, xp, j->yp + ys * j->w.n_out * PANEL);
}

static void panel_transpose_item(void *ctx, int64_t p, int tid) {
    (void)tid;
    const panel_job_t *j = (const panel_job_t *)ctx;
    to_panels_range(j->xr, (float *)j->xp, j->batch, j->w.n_in, p, p + 1);
}

/* 2+ threads: split the batch (each thread whole panels) when the panels divide evenly, else the rows */
static int g_panel_split = 0; /* 0 auto, 1 always rows, 2 always panels when P >= threads */

/* nparts group-aligned row ranges balanced by nonzeros (+ 8 per row) over all blocks */
static int panel_bounds(const int64_t *bp, int64_t nb, int64_t n_out, int64_t nparts, int64_t *bounds) {
    const int64_t ng = (n_out + GROUP_ROWS - 1) / GROUP_ROWS;
    int64_t *cost = (int64_t *)malloc((size_t)(ng + 1) * sizeof(int64_t));
    if (!cost) return -1;
    cost[0] = 0;
    for (int64_t g = 0; g < ng; g++) {
        const int64_t r0 = g * GROUP_ROWS, r1 = r0 + GROUP_ROWS < n_out ? r0 + GROUP_ROWS : n_out;
        int64_t t = 8 * (r1 - r0);
        for (int64_t c = 0; c < nb; c++) t += bp[c * n_out + r1] - bp[c * n_out + r0];
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

static PyObject *py_panel(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer val, idx, bptr, x = {0}, y, bias = {0}, yr = {0}, ordb = {0}, xrb = {0};
    PyObject *bias_obj, *x_obj, *yr_obj = Py_None, *ord_obj = Py_None, *xr_obj = Py_None;
    int idx_bytes, relu, threads;
    long long n_in, n_out, P, nb, batch = 0;
    if (!PyArg_ParseTuple(args, "y*y*y*OOw*iLLLLii|OLOO", &val, &idx, &bptr, &bias_obj, &x_obj, &y, &idx_bytes,
                          &n_in, &n_out, &P, &nb, &relu, &threads, &yr_obj, &batch, &ord_obj, &xr_obj))
        return NULL;
    int have_bias = 0, have_yr = 0, have_ord = 0, have_x = 0, have_xr = 0;
    PyObject *ret = NULL;
    csr_t w;
    if (PyObject_GetBuffer(x_obj, &x, PyBUF_C_CONTIGUOUS | (xr_obj != Py_None ? PyBUF_WRITABLE : 0)) < 0) goto done;
    have_x = 1;
    if (yr_obj != Py_None || xr_obj != Py_None) {
        if (batch < 0 || batch > P * PANEL || batch <= (P - 1) * PANEL) {
            PyErr_SetString(PyExc_ValueError, "batch does not match the panel count");
            goto done;
        }
    }
    if (xr_obj != Py_None) {
        if (PyObject_GetBuffer(xr_obj, &xrb, PyBUF_C_CONTIGUOUS) < 0) goto done;
        have_xr = 1;
        if (check_len(&xrb, smul3(batch, n_in, 4), "x (row-major)")) goto done;
    }
    if (yr_obj != Py_None) {
        if (PyObject_GetBuffer(yr_obj, &yr, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) goto done;
        have_yr = 1;
        if (check_len(&yr, smul3(batch, n_out, 4), "y (row-major)")) goto done;
    }
    if (bias_obj != Py_None) {
        if (PyObject_GetBuffer(bias_obj, &bias, PyBUF_C_CONTIGUOUS) < 0) goto done;
        have_bias = 1;
    }
    if (!dims_ok(n_in, n_out)) goto done;
    if (nb < 1 || nb > SK_MAX_DIM || P < 0) { PyErr_SetString(PyExc_ValueError, "bad block/panel count"); goto done; }
    if (check_len(&bptr, smul(smul(nb, n_out) + 1, 8), "block pointers")) goto done;
    if (ord_obj != Py_None) {
        if (PyObject_GetBuffer(ord_obj, &ordb, PyBUF_C_CONTIGUOUS) < 0) goto done;
        have_ord = 1;
        if (ordb.itemsize != 4 || check_len(&ordb, smul3(nb, n_out, 4), "row order")) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "row order must be int32");
            goto done;
        }
    }
    /* validate the total through make_csr on a view that treats all blocks as one long CSR */
    if (make_csr(&w, &val, &idx, &bptr, Py_None, &bias, idx_bytes, n_in, nb * n_out, relu)) goto done;
    w.n_out = n_out;
    if (have_bias) {
        if (check_len(&bias, smul(n_out, 4), "bias")) goto done;
        w.bias = (const float *)bias.buf;
    }
    if (check_len(&x, smul3(P, n_in, PANEL * 4), "x") || check_len(&y, smul3(P, n_out, PANEL * 4), "y")) goto done;
    {
        const int64_t *bp = w.rowptr;
        int nt = clamp_threads(threads < 0 ? -threads : threads);
        const int64_t work = bp[nb * w.n_out] * P * PANEL;
        if (threads > 0 && work < g_panel_par_min) nt = 1;
        int64_t nparts = nt;
        int64_t bounds_local[POOL_MAX + 1];
        panel_job_t job = {pick_panel(), w, bp, have_ord ? (const int32_t *)ordb.buf : NULL, nb, P, 1, bounds_local,
                           (const float *)x.buf, (float *)y.buf, have_yr ? (float *)yr.buf : NULL, batch,
                           have_xr ? (const float *)xrb.buf : NULL};
        const int split_panels = nt > 1 && P >= nt && (g_panel_split == 2 || (g_panel_split == 0 && P % nt == 0));
        if (threads > 0 && !split_panels && work < (g_panel_par_min << ROW_SPLIT_SHIFT)) nt = 1;
        if (nt > 1 && !split_panels && panel_bounds(bp, nb, w.n_out, nparts, bounds_local)) {
            PyErr_NoMemory();
            goto done;
        }
        if (nt <= 1 || split_panels) { bounds_local[0] = 0; bounds_local[1] = w.n_out; nparts = 1; }
        job.nparts = nparts;
        Py_BEGIN_ALLOW_THREADS
        if (nt <= 1) {
            for (int64_t p = 0; p < P; p++) panel_whole(&job, p, 0);
        } else if (split_panels) {
            /* thread t owns panels [P t/nt, P (t+1)/nt): their transposes, all rows, their outputs */
            par_run(nt, P, panel_whole, &job);
        } else {
            if (job.xr) par_run(nt, P, panel_transpose_item, &job);
            /* items part-major: thread t owns row range t of every panel (its weights stay in its cache) */
            par_run(nt, nparts * P, panel_item, &job);
        }
        Py_END_ALLOW_THREADS
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    if (have_bias) PyBuffer_Release(&bias);
    if (have_yr) PyBuffer_Release(&yr);
    if (have_ord) PyBuffer_Release(&ordb);
    if (have_xr) PyBuffer_Release(&xrb);
    if (have_x) PyBuffer_Release(&x);
    PyBuffer_Release(&val); PyBuffer_Release(&idx); PyBuffer_Release(&bptr);
    PyBuffer_Release(&y);
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

/* panel p of x (B, n) row-major -> dst (n, PANEL), samples beyond B zero. Tiles of 64 features. */
/* samples [b0, b0 + nl) of x (B, n) row-major -> lanes 0..nl-1 of dst (n, PANEL), samples past B zero */
static void to_panel_lanes(const float *x, float *dst, int64_t B, int64_t n, int64_t b0, int64_t nl) {
    to_panel_lanes_cols(x, dst, B, n, b0, nl, 0, n);
}

/* to_panel_lanes for the input features [f0, f1) only (f0 a multiple of 64) */
static void to_panel_lanes_cols(const float *x, float *dst, int64_t B, int64_t n, int64_t b0, int64_t nl,
                                int64_t f0, int64_t f1) {
    const int64_t tb = (B - b0) < nl ? (B - b0) : nl;
    for (int64_t i0 = f0; i0 < f1; i0 += 64) {
        const int64_t w = f1 - i0 < 64 ? f1 - i0 : 64;
        transpose_block(x + b0 * n + i0, n, dst + i0 * PANEL, PANEL, tb, w, 0);
        if (tb < nl)
            for (int64_t i = i0; i < i0 + w; i++) memset(dst + i * PANEL + tb, 0, (size_t)(nl - tb) * 4);
    }
}

static void to_panel_one(const float *x, float *dst, int64_t B, int64_t n, int64_t p) {
    to_panel_lanes(x, dst, B, n, p * PANEL, PANEL);
}

/* x (B, n) row-major -> panels (P, n, PANEL) */
static void to_panels_range(const float *x, float *xp, int64_t B, int64_t n, int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; p++) to_panel_one(x, xp + p * n * PANEL, B, n, p);
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

typedef struct {
    const float *src;
    float *dst;
    int64_t B, n;
    int to;
} tr_job_t;

static void tr_item(void *ctx, int64_t p, int tid) {
    (void)tid;
    const tr_job_t *j = (const tr_job_t *)ctx;
    if (j->to) to_panels_range(j->src, j->dst, j->B, j->n, p, p + 1);
    else from_panels_range(j->src, j->dst, j->B, j->n, p, p + 1);
}

static PyObject *py_transpose(PyObject *args, int to) {
    Py_buffer a, b;
    long long B, n;
    int threads;
    if (!PyArg_ParseTuple(args, "y*w*LLi", &a, &b, &B, &n, &threads)) return NULL;
    PyObject *ret = NULL;
    const int64_t P = (B + PANEL - 1) / PANEL;
    if (B < 0 || n < 0) { PyErr_SetString(PyExc_ValueError, "negative shape"); goto done; }
    if (to ? (check_len(&a, smul3(B, n, 4), "x") || check_len(&b, smul3(P, n, PANEL * 4), "panels"))
           : (check_len(&a, smul3(P, n, PANEL * 4), "panels") || check_len(&b, smul3(B, n, 4), "y")))
        goto done;
    {
        const float *src = (const float *)a.buf;
        float *dst = (float *)b.buf;
        int nt = clamp_threads(threads < 0 ? -threads : threads);
        if (threads > 0 && B * n < 4 * PAR_MIN_WORK) nt = 1;  /* 8 MB and up */
        Py_BEGIN_ALLOW_THREADS
        if (nt <= 1) {
            if (to) to_panels_range(src, dst, B, n, 0, P);
            else from_panels_range(src, dst, B, n, 0, P);
        } else {
            tr_job_t job = {src, dst, B, n, to};
            par_run(nt, P, tr_item, &job);
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

/* The code path a name selects ("best": the CPU's best), -1 for an unknown name. */
static int isa_by_name(const char *name) {
    return !strcmp(name, "avx512") ? ISA_AVX512 : !strcmp(name, "avx2") ? ISA_AVX2
         : !strcmp(name, "generic") ? ISA_GENERIC : !strcmp(name, "best") ? g_isa_max : -1;
}

/* The starting code path: SPARSEKIT_ISA (generic, avx2, avx512 or best) when set, else the best. A
 * value that is unknown or names a path this CPU lacks fails the import with one line (ImportError;
 * sparsekit.runtime turns it into an input error) rather than running another path than asked. */
static int isa_from_env(void) {
    const char *e = getenv("SPARSEKIT_ISA");
    if (!e || !*e) return g_isa_max;
    const int want = isa_by_name(e);
    if (want >= 0 && want <= g_isa_max) return want;
    char have[32] = "generic";
    for (int i = ISA_AVX2; i <= g_isa_max; i++) {
        strcat(have, ", ");
        strcat(have, isa_name(i));
    }
    PyErr_Format(PyExc_ImportError, "SPARSEKIT_ISA=%.40s %s (this CPU runs: %s, or best)", e,
                 want < 0 ? "is not a code path of sparsekit's kernels" : "names a code path this CPU lacks", have);
    return -1;
}

static PyObject *py_set_isa(PyObject *self, PyObject *args) {
    (void)self;
    const char *name;
    if (!PyArg_ParseTuple(args, "s", &name)) return NULL;
    const int want = isa_by_name(name);
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
    return PyLong_FromLong(max_procs());
}

static PyObject *py_rows_threads(PyObject *self, PyObject *args) {
    (void)self;
    int threads;
    long long work;
    if (!PyArg_ParseTuple(args, "iL", &threads, &work)) return NULL;
    return PyLong_FromLong(rows_threads(clamp_threads(threads), work));
}

static PyObject *py_set_threading(PyObject *self, PyObject *args) {
    (void)self;
    long long spin_us = -1, rows_min = -1, panel_min = -1;
    int split = -1;
    if (!PyArg_ParseTuple(args, "|LLLi", &spin_us, &rows_min, &panel_min, &split)) return NULL;
    if (split >= 0 && split <= 2) g_panel_split = split;
#if SK_POOL
    if (spin_us >= 0) g_spin_ns = (int64_t)spin_us * 1000;
    const long long spin_now = (long long)(g_spin_ns / 1000);
#else
    const long long spin_now = 0;
#endif
    if (rows_min >= 0) g_rows_par_min = rows_min;
    if (panel_min >= 0) g_panel_par_min = panel_min;
    return Py_BuildValue("{s:L,s:L,s:L,s:i,s:s}", "spin_us", spin_now, "rows_par_min", (long long)g_rows_par_min,
                         "panel_par_min", (long long)g_panel_par_min, "panel_split", g_panel_split, "backend",
                         SK_POOL ? "pthreads" : "openmp-or-none");
}

static PyMethodDef methods[] = {
    {"sell", py_sell, METH_VARARGS,
     "sell(values, indices, sliceptr, perm, bias|None, x, y, idx_bytes, n_in, n_out, batch, relu, threads): the rows "
     "kernel on the sliced layout (SparseLayer.sliced): SLICE-row slices stored slot-major, perm (int32, "
     "SLICE * slices) the output row of each lane (-1: padding), bias in lane order"},
    {"panel", py_panel, METH_VARARGS,
     "panel(values, indices, blockptr, bias|None, xp, yp, idx_bytes, n_in, n_out, npanels, nblocks, relu, threads"
     "[, y_rows|None, batch, order|None, x_rows|None]): with x_rows (batch, n_in) row-major the kernel transposes it "
     "into xp (scratch) panel by panel; with y_rows (batch, n_out) row-major, the last column block writes there "
     "(yp then holds only partial sums); order (int32, nblocks * n_out): the row at each position of each block, "
     "a permutation within 64-row groups"},
    {"gemv", py_gemv, METH_VARARGS,
     "gemv(weight_t, bias|None, x, y, n_in, n_out, batch, relu, threads): dense layer, weight (n_in, n_out)"},
    {"chain_new", py_chain_new, METH_VARARGS,
     "chain_new([(kind, a, b, c, d, bias|None, idx_bytes, n_in, n_out, relu, cap), ...][, input_shape]): a prepared chain of "
     "small-batch layers, validated once; kind 0 (sell): a, b, c, d = values, indices, sliceptr, perm (as for "
     "sell); kind 1 (gemv): a = weight_t (b, c, d unused); cap: the layer's thread cap (0: none); input_shape (a "
     "tuple of at most 8 dims, n_in elements): x may also come as (batch, *input_shape)"},
    {"chain_run", (PyCFunction)(void (*)(void))py_chain_run, METH_FASTCALL,
     "chain_run(chain, x, y, threads): run a chain_new chain on x (batch, n_in) into y (batch, n_out), one call; "
     "True when done, False (nothing run) when x is not a C-contiguous float32 (batch, n_in) array"},
    {"chain_plan", py_chain_plan, METH_VARARGS,
     "chain_plan(chain, batch, threads): how chain_run would run a panel chain on that batch: {threads, lanes, "
     "rows_split, units}, or None where it declines (small-batch chains: threads 1, units 0; their layers "
     "decide their own threads)"},
    {"fast_call", (PyCFunction)(void (*)(void))py_fast_call, METH_FASTCALL,
     "fast_call(table, x, threads, epoch): FastModel.run's fast path: table {batch: (epoch, chain, alloc)}; runs "
     "x's batch size's chain when its entry is current (epoch[0]) and x fits, into alloc() or one of the last "
     "two outputs it returned once nothing else references it, and returns the output; else None"},
    {"chain_drop_outputs", py_chain_drop_outputs, METH_O,
     "chain_drop_outputs(chain): forget the outputs fast_call keeps for reuse"},
    {"to_panels", py_to_panels, METH_VARARGS, "to_panels(x, xp, batch, n, threads)"},
    {"from_panels", py_from_panels, METH_VARARGS, "from_panels(yp, y, batch, n, threads)"},
    {"isa", py_isa, METH_NOARGS, "active code path: avx512, avx2 or generic"},
    {"available_isas", py_available_isas, METH_NOARGS, "code paths this CPU can run"},
    {"set_isa", py_set_isa, METH_VARARGS,
     "set_isa(name): force a code path (tests): generic, avx2, avx512 or best (the CPU's best)"},
    {"max_threads", py_max_threads, METH_NOARGS, "processors the thread pool can use (1 without threads)"},
    {"rows_threads", py_rows_threads, METH_VARARGS,
     "rows_threads(threads, work): threads a rows-kernel job of `work` stored slots x samples runs on"},
    {"set_threading", py_set_threading, METH_VARARGS,
     "set_threading([spin_us, rows_par_min, panel_par_min, panel_split]): worker spin time after a job, the work "
     "(nonzero x sample products) below which rows/panel stay on one thread, and how panel splits work between "
     "threads (0 auto: whole panels when they divide evenly, else rows; 1 rows; 2 panels); -1 keeps a value; "
     "returns the settings. "
     "A negative `threads` argument to a kernel means exactly that many threads (no work threshold)."},
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
    const int isa = isa_from_env();
    if (isa < 0) return NULL;
    g_isa = isa;
#if SK_POOL
    {
        const char *e = getenv("SPARSEKIT_SPIN_US");
        if (e && *e) {
            const long long v = atoll(e);
            if (v >= 0) g_spin_ns = (int64_t)v * 1000;
        }
    }
#endif
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    PyModule_AddIntConstant(m, "PANEL", PANEL);
    PyModule_AddIntConstant(m, "PAD_SLACK", PAD_SLACK);
    PyModule_AddIntConstant(m, "GROUP_ROWS", GROUP_ROWS);
    PyModule_AddIntConstant(m, "SLICE", SLICE);
#ifdef _OPENMP
    PyModule_AddIntConstant(m, "OPENMP", 1);
#else
    PyModule_AddIntConstant(m, "OPENMP", 0);
#endif
    return m;
}
