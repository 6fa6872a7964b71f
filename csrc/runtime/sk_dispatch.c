/* The active code path (g_isa) and what depends on it outside the kernels: picking a kernel, the
 * panel kernels' tile flush, and the transposes between row-major and panel layouts. */
#include "sk_runtime.h"

int g_isa = ISA_GENERIC;
int g_isa_max = ISA_GENERIC;

void sk_detect_isa(void) {
#if SK_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) g_isa_max = ISA_AVX2;
    if (g_isa_max == ISA_AVX2 && __builtin_cpu_supports("avx512f")) g_isa_max = ISA_AVX512;
#endif
}

rows_fn pick_rows(void) {
#if SK_X86
    if (g_isa == ISA_AVX512) return rows_avx512;
    if (g_isa == ISA_AVX2) return rows_avx2;
#endif
    return rows_generic;
}

rows_fn pick_sliced(const sliced_t *w) {
    if (!w->win) return pick_rows();
#if SK_X86
    if (g_isa == ISA_AVX512 && w->wide == WINDOW_AVX512) return window_avx512;
    if (g_isa >= ISA_AVX2 && w->wide == WINDOW_AVX2) return window_avx2;
#endif
    return window_generic;
}

int64_t window_width(void) {
#if SK_X86
    if (g_isa == ISA_AVX512) return WINDOW_AVX512;
    if (g_isa == ISA_AVX2) return WINDOW_AVX2;
#endif
    return WINDOW_AVX512; /* the generic kernel takes any width; this one keeps the layout small */
}

panel_fn pick_panel(void) {
#if SK_X86
    if (g_isa == ISA_AVX512) return panel_avx512;
    if (g_isa == ISA_AVX2) return panel_avx2;
#endif
    return panel_generic;
}

panel_fn pick_panel_for(const csr_t *w) {
    if (w->rb <= 1) return pick_panel();
#if SK_X86
    if (g_isa == ISA_AVX512) return block_avx512;
    if (g_isa == ISA_AVX2) return block_avx2;
#endif
    return block_generic;
}

gemv_fn pick_gemv(void) {
#if SK_X86
    if (g_isa == ISA_AVX512) return gemv_avx512;
#endif
    return gemv_generic;
}

void tile_flush(const rowout_t *ro, const float *tile, int64_t obase, int64_t nrows) {
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

/* Transpose a rows x cols block: dst[c * ds + r] = src[r * ss + c]; 8x8 tiles with AVX2. The loop
 * keeps 8 rows of the side with the long stride fixed while it walks the other (cols_outer: dst side),
 * so that side's lines are not all thrown out of one L1 set by 4 KiB aliasing. */
void transpose_block(const float *src, int64_t ss, float *dst, int64_t ds, int64_t rows, int64_t cols,
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

/* samples [b0, b0 + nl) of x (B, n) row-major -> lanes 0..nl-1 of dst (n, PANEL), samples past B zero */
void to_panel_lanes(const float *x, float *dst, int64_t B, int64_t n, int64_t b0, int64_t nl) {
    to_panel_lanes_cols(x, dst, B, n, b0, nl, 0, n);
}

/* to_panel_lanes for the input features [f0, f1) only (f0 a multiple of 64) */
void to_panel_lanes_cols(const float *x, float *dst, int64_t B, int64_t n, int64_t b0, int64_t nl,
                                int64_t f0, int64_t f1) {
    const int64_t tb = (B - b0) < nl ? (B - b0) : nl;
    for (int64_t i0 = f0; i0 < f1; i0 += 64) {
        const int64_t w = f1 - i0 < 64 ? f1 - i0 : 64;
        transpose_block(x + b0 * n + i0, n, dst + i0 * PANEL, PANEL, tb, w, 0);
        if (tb < nl)
            for (int64_t i = i0; i < i0 + w; i++) memset(dst + i * PANEL + tb, 0, (size_t)(nl - tb) * 4);
    }
}

void to_panel_one(const float *x, float *dst, int64_t B, int64_t n, int64_t p) {
    to_panel_lanes(x, dst, B, n, p * PANEL, PANEL);
}

/* x (B, n) row-major -> panels (P, n, PANEL) */
void to_panels_range(const float *x, float *xp, int64_t B, int64_t n, int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; p++) to_panel_one(x, xp + p * n * PANEL, B, n, p);
}

void from_panels_range(const float *yp, float *y, int64_t B, int64_t n, int64_t p0, int64_t p1) {
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
