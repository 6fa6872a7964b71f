/*
 * sparsekit runtime: the layouts, constants and kernel signatures shared by the C sources of
 * sparsekit.runtime._kernels (no Python here; the CPython glue is sk_glue.h).
 *
 * A layer is y = act(W x + b) with W (n_out, n_in) stored as CSR: float32 values, uint16 or int32
 * column indices, int64 row pointers. Three kernels, chosen per layer and batch size by the runtime:
 *
 *   rows   small batches: x row-major (B, n_in) -> y (B, n_out), the weights in a
 *          sliced layout (SELL-16, built by CsrLayer.sliced from the CSR): slices of 16 length-sorted
 *          rows stored slot-major, so one 16-lane gather of x serves 16 rows, without per-row
 *          horizontal sums or masked tails. Gather lanes, not bytes, bound it.
 *   panel  activations in "panel" layout: the batch is cut into panels of PANEL (64) samples, each
 *          panel stored [n][PANEL] (batch-minor). For every nonzero of a weight row the value is
 *          broadcast and multiplied into a contiguous 64-wide row of the input panel; the 64 outputs
 *          stay in registers (register-blocked SpMM). Bias and ReLU are fused into the store.
 *   window small batches without gathers (CPUs whose gathers are microcoded, e.g. AMD Zen 4/5): the
 *          sliced layout again, but every slot of a slice draws its 16 inputs from one window of
 *          WINDOW (32 with AVX-512, 16 with AVX2) consecutive inputs, held in registers and indexed
 *          by a permute (one instruction) instead of a 16-lane gather. Rows stay in natural order.
 *   block  the panel kernel for layers made of R x 1 blocks (R consecutive output rows that share every
 *          input column, R = 2, 4, 8 or 16, detected from the nonzeros by CsrLayer.row_block): each column of
 *          a block row is one index and R values, and each 64-wide input panel row it names is loaded once
 *          for R rows (R x 64 accumulators in registers, 4 rows at a time), so loads and index reads per
 *          FMA drop R-fold. Runs wherever panel runs (chains, convolutions); a csr_t with rb > 1 selects it.
 *   gemv   small layers at small batch, run dense from the transposed weight (n_in, n_out): x[i] is
 *          broadcast into 128-wide rows of W^T. No per-row branches or horizontal sums, so tiny layers
 *          (where the sparse kernels' fixed costs dominate) are not slower than dense.
 *
 * Sources: sk_kernels_generic.c, sk_kernels_avx2.c, sk_kernels_avx512.c (the kernels: no threads, no
 * Python), sk_conv.c (convolutions as im2col panels, or shifted copies of padded planes, for the panel and block
 * kernels), sk_dispatch.c (the active code path, layout transposes), sk_pool.c (thread pool), sk_drive.c
 * (a layer's work cut into pool items), sk_chain.c (chains and their planner), sk_pychain.c and
 * sk_module.c (CPython glue).
 *
 * Code paths: AVX-512F, AVX2+FMA (GCC/Clang per-function target attributes, chosen at run time with
 * __builtin_cpu_supports) and portable C; the build never needs a CPU with AVX2 (no -march).
 *
 * Safety contract (checked by the Python wrapper at load, sizes re-checked by the glue: widths at most
 * 2^31 - 1, buffer lengths computed without overflow; chain_new also re-checks indices and row orders):
 * rowptr is non-decreasing from 0, indices < n_in, the index and value arrays have PAD_SLACK spare
 * elements after the last nonzero (the vector tails read, but never use, up to 31 of them), a panel row
 * order (CsrLayer.blocked) permutes rows only within GROUP_ROWS-row groups, a sliced layout's perm
 * holds each output row once (-1 elsewhere; the slice pointers are re-checked by the glue), and a row-block
 * layout (rb > 1) has rb in {2, 4, 8, 16} dividing n_out, no row order, and rb values an entry (+ PAD_SLACK).
 */
#ifndef SK_RUNTIME_H
#define SK_RUNTIME_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define SK_X86 1
#include <immintrin.h>
#define SK_AVX2 __attribute__((target("avx2,fma")))
#define SK_AVX512 __attribute__((target("avx512f,avx2,fma")))
#else
#define SK_X86 0
#endif

#if !defined(_WIN32) && (defined(__unix__) || defined(__APPLE__)) && (defined(__GNUC__) || defined(__clang__))
#define SK_POOL 1 /* sparsekit's own pthread pool (sk_pool.c); else OpenMP, else one thread */
#else
#define SK_POOL 0
#endif

/* ------------------------------------------------------------------ layout constants */

#define PANEL 64      /* samples per activation panel */
#define PAD_SLACK 32  /* spare elements after the last nonzero of the value and index arrays */
#define SLICE 16      /* rows per slice of the sliced (SELL-16) layout */
#define TILE_ROWS 16  /* finished rows a panel kernel gathers on its stack before writing row-major y */
/* Rows are handled in groups of GROUP_ROWS: thread ranges start on group boundaries, and a layer's
 * optional row order (per column block) permutes rows only within their group. The Python side sorts
 * each group's rows by their nonzero count in the block (CsrLayer.blocked): the inner loop's trip
 * count then repeats from row to row and its exit branch is predicted. */
#define GROUP_ROWS 64
#define POOL_MAX 64   /* most threads a job runs on */
/* layer widths from Python: column indices, row orders and the sliced layout's lanes are int32 */
#define SK_MAX_DIM INT32_MAX

/* ------------------------------------------------------------------ tuning (compile-time)
 * Where the planner puts its thresholds; the measurements behind them are in bench/RESULTS.md ("Notes
 * moved from the kernel sources"). The ones Python may change at run time are in sk_settings below. */

/* rows kernel: chunks per thread (its own first, then the others') */
#define CHUNKS_PER_THREAD 4
/* gemv and the transposes: below this much work (dense weights x samples; floats moved) one thread */
#define PAR_MIN_WORK (1 << 19)
/* rows kernel: from this many stored-slot x sample products a second thread pays for its hand-off */
#define ROWS_PAR_MIN_WORK (1 << 14)
/* panel kernel: whole panels per thread from this many nonzero x sample products */
#define PANEL_PAR_MIN_WORK (1 << 16)
/* splitting one panel's rows between threads needs 2^ROW_SPLIT_SHIFT times the panel minimum: every
 * thread then reads the whole input panel, which the caller transposed in its own cache */
#define ROW_SPLIT_SHIFT 6
/* a panel chain on one partial panel (AVX-512: 16 or 32 lanes) splits every layer's rows from
 * 2^PROWS_SPLIT_SHIFT times the panel minimum per layer: each layer is one pool job, and from the second
 * layer on each thread reads the other's half of the activations from the other core */
#define PROWS_SPLIT_SHIFT 1
/* outputs from this size (bytes) are written with non-temporal stores: no read-for-ownership of y's
 * lines, which would come from L3 or memory; smaller outputs stay in cache for their reader */
#define STREAM_MIN_BYTES (1 << 19)
/* half (and quarter) panels on several threads: every thread reads all the weights, so only while they
 * fit well within a core's L2 */
#define HALF_PANEL_MAX_WEIGHT_BYTES (1 << 20)
/* fast_call keeps outputs up to this size for reuse, and this much over all chains */
#define SPARE_MAX_BYTES ((int64_t)16 << 20)
#define SPARE_TOTAL_BYTES ((int64_t)64 << 20)

/* The settings Python changes at run time (set_threading, SPARSEKIT_SPIN_US), in one place. */
typedef struct {
    int64_t spin_ns;       /* pool workers spin this long after a job before they sleep */
    int64_t rows_par_min;  /* ROWS_PAR_MIN_WORK unless changed */
    int64_t panel_par_min; /* PANEL_PAR_MIN_WORK unless changed */
    int panel_split;       /* single panel layers on 2+ threads: 0 auto, 1 always rows, 2 always panels */
} sk_settings_t;
extern sk_settings_t sk_settings;

/* ------------------------------------------------------------------ code paths */

enum { ISA_GENERIC = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };
extern int g_isa;     /* active code path */
extern int g_isa_max; /* best the CPU supports */
void sk_detect_isa(void); /* sets g_isa_max (g_isa is left to the caller) */

/* ------------------------------------------------------------------ layouts */

typedef struct {
    const float *val;
    const void *idx;
    int idx16;
    const int64_t *rowptr;
    const float *bias; /* may be NULL */
    int64_t n_in, n_out;
    int relu;
    /* rows per block: 0 or 1, plain CSR; R > 1, the row-block layout of the block kernel (CsrLayer.row_blocked):
     * rowptr indexes block rows (R consecutive output rows sharing their columns), entry k holds one column
     * idx[k] and R values val[k*R .. k*R + R-1], one per row of the block. R is 2, 4, 8 or 16. */
    int rb;
    /* 0: entry k reads the input row at xp + idx[k] * PANEL (a panel); 1: at xp + idx[k], idx[k] an offset into
     * zero-padded image planes (the shifted-rows convolution of sk_conv.c, int32 indices) */
    int direct;
} csr_t;

static inline int64_t idx_at(const csr_t *w, int64_t k) {
    return w->idx16 ? (int64_t)((const uint16_t *)w->idx)[k] : (int64_t)((const int32_t *)w->idx)[k];
}

/* the kernels read entry k's input row at xp + (idx_at(w, k) << col_shift(w)) */
#define PANEL_LOG2 6
static inline int col_shift(const csr_t *w) { return w->direct ? 0 : PANEL_LOG2; }
_Static_assert(PANEL == 1 << PANEL_LOG2, "PANEL_LOG2");

/* Sliced rows (SELL-16), the layout of the rows kernel (CsrLayer.sliced() builds it). Rows sorted by
 * nonzero count (descending) are cut into slices of SLICE rows; a slice stores its rows' nonzeros
 * slot-major, slot j of its 16 rows side by side (rows shorter than the slice's longest are padded with
 * value 0, index 0). One 16-lane gather then feeds 16 rows, lane l accumulating row perm[l]: no
 * horizontal sums, no masked tails, 16 outputs per vector (scattered to their rows with bias and ReLU
 * fused). */
typedef struct {
    const float *val;
    const void *idx;
    int idx16;
    const int64_t *slice_ptr; /* nsl + 1, in elements: slice s holds (slice_ptr[s+1]-slice_ptr[s])/SLICE slots */
    const int32_t *perm;  /* nsl * SLICE: output row of each lane, -1 for padding lanes */
    const float *bias;    /* nsl * SLICE, in lane order (NULL: none) */
    int64_t n_in, n_out, nsl;
    int relu;
    /* the window form (CsrLayer.windowed builds it; NULL: the gather form above): slot k of the layer
     * (element k*SLICE) reads x[win[k] + idx] for 8-bit in-window indices idx < wide, with
     * 0 <= win[k] <= n_in - wide. Rows are in natural order (perm[SLICE*s + l] = SLICE*s + l). */
    const int32_t *win;
    int64_t wide;
} sliced_t;

/* window widths of the SIMD window kernels (the generic kernel takes any width) */
#define WINDOW_AVX512 32
#define WINDOW_AVX2 16

/* Fused output transpose: the last column block of a panel layer can write its results straight into
 * the row-major output y (B, n_out) instead of the panel buffer. Each kernel then stores up to TILE_ROWS
 * finished rows of 64 samples into a small tile on its stack (L1) and flushes the tile with transposes:
 * every flush writes whole 64-byte lines of y, so a separate from_panels pass (a read and a write of the
 * whole activation) disappears. */
typedef struct {
    float *y;      /* row-major output rows of this panel's first sample; NULL: write panels */
    int64_t ldy;   /* row stride of y (n_out) */
    int64_t tb;    /* valid samples in this panel (<= PANEL) */
    int stream;    /* non-temporal stores (large outputs) */
    int lanes;     /* AVX-512 only: 32 or 16: the panel holds that many samples (lanes 0..lanes-1 of each
                    * 64-wide row); 0: a full panel */
} rowout_t;

/* ------------------------------------------------------------------ kernel signatures */

/* rows kernel: slices [s0, s1) of w for B samples of x (B, n_in) into y (B, n_out) */
typedef void (*rows_fn)(const sliced_t *w, const float *x, float *y, int64_t B, int64_t s0, int64_t s1);
/* panel kernel: rows k0..k1-1 of one panel (xp -> yp) for one column block; `first` starts the sums at 0,
 * `last` adds bias and ReLU (and with ro->y writes row-major y); ord: the row at each position or NULL */
typedef void (*panel_fn)(const csr_t *w, const int32_t *ord, const float *xp, float *yp, int64_t k0, int64_t k1,
                         int first, int last, const rowout_t *ro);
/* dense kernel: samples [b0, b1) of x through the transposed weight wt (n_in, n_out) into y */
typedef void (*gemv_fn)(const float *wt, const float *bias, const float *x, float *y, int64_t n_in, int64_t n_out,
                        int64_t b0, int64_t b1, int relu);

void rows_generic(const sliced_t *w, const float *x, float *y, int64_t B, int64_t s0, int64_t s1);
void window_generic(const sliced_t *w, const float *x, float *y, int64_t B, int64_t s0, int64_t s1);
void panel_generic(const csr_t *w, const int32_t *ord, const float *xp, float *yp, int64_t k0, int64_t k1,
                   int first, int last, const rowout_t *ro);
/* block kernel (a panel_fn for csr_t layouts with rb > 1): rows k0..k1-1 are whole blocks (multiples of
 * w->rb), ord is unused (natural order) */
void block_generic(const csr_t *w, const int32_t *ord, const float *xp, float *yp, int64_t k0, int64_t k1,
                   int first, int last, const rowout_t *ro);
void gemv_generic(const float *wt, const float *bias, const float *x, float *y, int64_t n_in, int64_t n_out,
                  int64_t b0, int64_t b1, int relu);
#if SK_X86
SK_AVX2 void rows_avx2(const sliced_t *w, const float *x, float *y, int64_t B, int64_t s0, int64_t s1);
SK_AVX2 void window_avx2(const sliced_t *w, const float *x, float *y, int64_t B, int64_t s0, int64_t s1);
SK_AVX2 void panel_avx2(const csr_t *w, const int32_t *ord, const float *xp, float *yp, int64_t k0, int64_t k1,
                        int first, int last, const rowout_t *ro);
SK_AVX2 void block_avx2(const csr_t *w, const int32_t *ord, const float *xp, float *yp, int64_t k0, int64_t k1,
                        int first, int last, const rowout_t *ro);
/* 8x8 float transpose: dst[c][r] = src[r][c] (row strides ss, ds in floats) */
SK_AVX2 void tr8x8_avx2(const float *src, int64_t ss, float *dst, int64_t ds);
SK_AVX512 void rows_avx512(const sliced_t *w, const float *x, float *y, int64_t B, int64_t s0, int64_t s1);
SK_AVX512 void window_avx512(const sliced_t *w, const float *x, float *y, int64_t B, int64_t s0, int64_t s1);
SK_AVX512 void panel_avx512(const csr_t *w, const int32_t *ord, const float *xp, float *yp, int64_t k0,
                            int64_t k1, int first, int last, const rowout_t *ro);
SK_AVX512 void block_avx512(const csr_t *w, const int32_t *ord, const float *xp, float *yp, int64_t k0,
                            int64_t k1, int first, int last, const rowout_t *ro);
SK_AVX512 void gemv_avx512(const float *wt, const float *bias, const float *x, float *y, int64_t n_in,
                           int64_t n_out, int64_t b0, int64_t b1, int relu);
/* rows 0..nrows-1 of a tile (TILE_ROWS rows of PANEL lanes, lanes 0..tb-1 valid) into row-major y */
SK_AVX512 void tile_flush_avx512(const float *tile, float *y, int64_t ldy, int stream, int64_t tb, int64_t nrows);
#endif

/* ------------------------------------------------------------------ dispatch and layout (sk_dispatch.c) */

rows_fn pick_rows(void);
/* the kernel for a sliced layout: its gather or window form; a window the active path's SIMD kernel
 * was not built for (another width) runs the generic window kernel */
rows_fn pick_sliced(const sliced_t *w);
/* the window width the active code path's window kernel takes */
int64_t window_width(void);
panel_fn pick_panel(void);
/* the kernel for layout w: the block kernel when w->rb > 1, else the panel kernel */
panel_fn pick_panel_for(const csr_t *w);
gemv_fn pick_gemv(void);
/* a finished tile of a panel kernel into row-major y (ro->y + obase), with the active code path */
void tile_flush(const rowout_t *ro, const float *tile, int64_t obase, int64_t nrows);
/* Transpose a rows x cols block: dst[c * ds + r] = src[r * ss + c] */
void transpose_block(const float *src, int64_t ss, float *dst, int64_t ds, int64_t rows, int64_t cols,
                     int cols_outer);
void to_panel_lanes(const float *x, float *dst, int64_t B, int64_t n, int64_t b0, int64_t nl);
void to_panel_lanes_cols(const float *x, float *dst, int64_t B, int64_t n, int64_t b0, int64_t nl, int64_t f0,
                         int64_t f1);
void to_panel_one(const float *x, float *dst, int64_t B, int64_t n, int64_t p);
void to_panels_range(const float *x, float *xp, int64_t B, int64_t n, int64_t p0, int64_t p1);
void from_panels_range(const float *yp, float *y, int64_t B, int64_t n, int64_t p0, int64_t p1);

/* ------------------------------------------------------------------ convolutions (sk_conv.c) */

/* a 2-D convolution's geometry: input (c, h, w), kernel kh x kw, strides, leading pads, dilations, output
 * ho x wo (the caller computes it from the trailing pads) */
typedef struct {
    int64_t c, h, w, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo;
} conv_t;

/* ------------------------------------------------------------------ depthwise convolutions (sk_depthwise.c) */

/* y (B, c, ho, wo) = clamp(depthwise(x) + bias, lo, hi); weight (c, kh, kw); -1: out of memory */
int depthwise(const conv_t *g, int64_t B, const float *x, const float *w, const float *bias, float lo, float hi,
              float *y, int threads);
int64_t depthwise_scratch_floats(const conv_t *g);

/* ------------------------------------------------------------------ thread pool (sk_pool.c) */

typedef void (*item_fn)(void *ctx, int64_t item, int tid);
/* fn(ctx, i, tid) for the items i in [0, n) on nt threads (the caller is thread 0) */
void par_run(int nt, int64_t n, item_fn fn, void *ctx);
int max_procs(void);
int clamp_threads(int t);

/* ------------------------------------------------------------------ layer drivers (sk_drive.c) */

typedef struct {
    rows_fn fn;
    const sliced_t *w;
    const float *x;
    float *y;
    int64_t B, nch;
} rows_job_t;
void rows_item(void *ctx, int64_t ch, int tid);

typedef struct {
    gemv_fn fn;
    const float *w, *bias, *x;
    float *y;
    int64_t n_in, n_out;
    int relu;
} gemv_job_t;
void gemv_item(void *ctx, int64_t b, int tid);

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
void panel_item(void *ctx, int64_t item, int tid);
void panel_whole(void *ctx, int64_t p, int tid);
void panel_transpose_item(void *ctx, int64_t p, int tid);
void panel_rows(panel_fn fn, const csr_t *w, const int64_t *bp, const int32_t *ord, int64_t nb,
                const rowout_t *ro, int64_t o0, int64_t o1, const float *xp, float *yp);
/* a sparse convolution (sk_conv.c): B images, P panels of 64 output pixels each; item = image * P + panel.
 * An image of fewer than 64 output pixels shares a panel: G = 64 / (ho * wo) images side by side in its lanes
 * (P = 1, item = images G * item .. G * item + G - 1). */
typedef struct {
    panel_fn fn;
    csr_t w;             /* (C_out, K) over column blocks: rowptr = bp */
    const int64_t *bp;   /* block pointers (nb * C_out + 1), by position */
    const int32_t *ord;  /* row at each position, per block; NULL: natural order */
    int64_t nb;
    conv_t g;
    const float *x;      /* (B, c, h, w) */
    float *y;            /* (B, C_out, ho * wo) */
    int64_t P, G, B;     /* panels per image, images per panel (1 unless an image has fewer than 64 pixels), images */
    int64_t bw;          /* columns a column block (nb > 1): block c holds columns [c * bw, (c + 1) * bw) */
    const float *res;    /* NULL, or a residual like y added as y is written, then ReLU where post_relu */
    int post_relu;
    float hi;            /* y clamped at hi as it is written (a ReLU6's 6; INFINITY: none) */
    int64_t parts;       /* work items an item: its output rows cut in this many parts of whole GROUP_ROWS groups */
    float *scratch;      /* per thread: K * PANEL + C_out * PANEL floats, 64-byte aligned */
    int64_t per_thread;
} conv_job_t;
/* kernel positions (kh * kw) up to which small images' im2col rows are built by permutes (AVX-512) */
#define IM2COL_PERMUTE_TAPS 64
void conv_item(void *ctx, int64_t work, int tid);  /* work = item * parts + part */

/* A dilation-1 convolution without im2col ("shifted planes", sk_conv.c). A chunk of Bc images is copied once into
 * kw * phases planes, phases = min(sh, kh), one per kernel column j and row phase f, each (c, hp, pitch):
 * hp = R + (kh - 1) / sh rows for a band of R output rows from r0 (dconv_band), row r holding input row
 * (r0 + r) * sh + f - ph, and a row holds the Bc images' rows side
 * by side, wo floats each, read from input column ox * sw + j - pw (zeros past the edges), zero-padded to the
 * pitch, a multiple of 16 floats. The output is computed on the grid of R rows of pitch pixels, where weight
 * column (ch, i, j) reads plane (j, i mod sh) at offset (ch * hp + i / sh) * pitch from the grid pixel: a panel of
 * 64 consecutive grid pixels reads 64 contiguous, 64-byte aligned floats per column (csr_t.direct, idx = those
 * offsets), and no pixel is computed twice or dropped but the rows' padding. Stride 2 costs 1.5x the input in
 * planes (6 for a 3x3 kernel, each a quarter of the image), where im2col copies 2.25x. */
typedef struct {
    panel_fn fn;
    csr_t w;             /* direct: idx are plane offsets */
    const int64_t *bp;   /* block pointers, by position */
    const int32_t *ord;  /* row at each position, per block; NULL: natural order */
    int64_t nb;
    conv_t g;
    const float *x;      /* (B, c, h, w) */
    float *y;            /* (B, C_out, ho * wo) */
    float *plane;        /* dconv_plane_floats(g, B) floats, 64-byte aligned */
    int64_t B, hp, pitch; /* B: images a chunk (the planes' batch) */
    int64_t b0, nbc, P;  /* this chunk: images b0 .. b0 + nbc - 1 (nbc <= B), P panels of 64 grid pixels */
    int64_t r0, rows;    /* this band: output rows r0 .. r0 + rows - 1 (plane row r: output row r0 + r) */
    const float *res;    /* NULL, or a residual like y added as y is written, then ReLU where post_relu */
    int post_relu;
    float hi;            /* y clamped at hi as it is written (a ReLU6's 6; INFINITY: none) */
    float *scratch;      /* per thread: C_out * PANEL floats, 64-byte aligned */
    int64_t per_thread;
} dconv_job_t;
/* the batch runs in chunks of images whose planes fit DCONV_CHUNK_BYTES (one image at least): a panel's
 * columns then sit within them, and the planes are filled just before they are read */
#define DCONV_CHUNK_BYTES (1 << 19)
int64_t dconv_chunk(const conv_t *g, int64_t B);
/* planes a chunk: kw * min(sh, kh) */
int64_t dconv_planes(const conv_t *g);
/* floats of a row of the planes of Bc images */
int64_t dconv_pitch(const conv_t *g, int64_t Bc);
/* output rows a band: the chunk's planes are filled and read a band of rows at a time, so that they fit
 * DCONV_CHUNK_BYTES where one image's do not (64 channels at 56x56: 8-row bands of 10 plane rows, not 58); at least
 * DCONV_MIN_BAND rows (each band copies (kh - 1) / sh rows more than it computes) */
int64_t dconv_band(const conv_t *g, int64_t Bc);
#define DCONV_MIN_BAND 4
/* the caller's scratch for B images on nt threads (the planes of one chunk, an output panel per thread) */
int64_t dconv_scratch_floats(const conv_t *g, int64_t B, int64_t n_out, int nt);
/* floats of the planes of Bc images, slack included (the last panel reads up to 63 floats past them); -1: the
 * offsets would not fit int32 */
int64_t dconv_plane_floats(const conv_t *g, int64_t Bc);
/* the share of the grid's pixels over all chunks of B images that are output pixels */
double dconv_use(const conv_t *g, int64_t B);
/* entry e's column idx[e] = (ch * kh + i) * kw + j as its plane offset, for the n entries of w (tab: K scratch) */
void dconv_offsets(const csr_t *w, int64_t n, const conv_t *g, int64_t Bc, int32_t *tab, int32_t *off);
void dconv_fill(void *ctx, int64_t item, int tid);  /* item = plane * c + ch; item planes * c: the slack */
void dconv_item(void *ctx, int64_t p, int tid);     /* panel p: the kernel, output pixels into y */

/* nparts group-aligned row ranges balanced by nonzeros (+ 8 per row) over all blocks; rb: rows per block
 * pointer (1, or a row-block layout's R: bp then holds nb * n_out / rb + 1 pointers); -1: out of memory */
int panel_bounds(const int64_t *bp, int64_t nb, int64_t n_out, int rb, int64_t nparts, int64_t *bounds);

typedef struct {
    const float *src;
    float *dst;
    int64_t B, n;
    int to;
} tr_job_t;
void tr_item(void *ctx, int64_t p, int tid);

/* threads for a rows job of `work` (stored slots x samples) on at most nt (sk_chain.c) */
int rows_threads(int nt, int64_t work);

/* ------------------------------------------------------------------ sizes */

/* a * b, saturating at INT64_MAX instead of wrapping (negative inputs too), so an overflowing buffer
 * size fails its length check */
static inline int64_t smul(int64_t a, int64_t b) {
    if (a < 0 || b < 0) return INT64_MAX;
    if (a != 0 && b > INT64_MAX / a) return INT64_MAX;
    return a * b;
}
static inline int64_t smul3(int64_t a, int64_t b, int64_t c) { return smul(smul(a, b), c); }

#endif /* SK_RUNTIME_H */
