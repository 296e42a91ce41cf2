/* bf16 weights times bf16 activations with AVX-512 BF16 (see bf16_cpu.py, which builds and calls this).
 *
 * The same contract as bf16_avx512.c's bf16_linear, for activations that are bf16 already (the bf16
 * model's): out [T, R] float32 = x [T, C] times w [R, C] transposed, C a multiple of 32. vdpbf16ps
 * multiplies 32 weights by 32 activations (each product exact in float32) and adds them, in pairs, to
 * 16 float32 lanes: one instruction where the float32 kernel needs three per 16 weights (widen, shift,
 * FMA). Only the float32 summation order differs.
 */
#include <immintrin.h>
#include <stdint.h>

int bf16_dot_supported(void) { return __builtin_cpu_supports("avx512bf16"); }

static inline __m512bh load(const uint16_t *p) { return (__m512bh)_mm512_loadu_si512((const void *)p); }

static inline float one_row(const uint16_t *row, const uint16_t *x, int64_t C) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + 64 <= C; c += 64) {
        a0 = _mm512_dpbf16_ps(a0, load(row + c), load(x + c));
        a1 = _mm512_dpbf16_ps(a1, load(row + c + 32), load(x + c + 32));
    }
    if (c < C) a0 = _mm512_dpbf16_ps(a0, load(row + c), load(x + c));
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}

void bf16_linear_bf16(const uint16_t *w, const uint16_t *x, float *out, int64_t R, int64_t C, int64_t T,
                      int64_t rows_per_item, int threads) {
    const int64_t items = (R + rows_per_item - 1) / rows_per_item;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < items; i++) {
        const int64_t r0 = i * rows_per_item, r1 = r0 + rows_per_item < R ? r0 + rows_per_item : R;
        for (int64_t r = r0; r < r1; r++) {
            const uint16_t *row = w + r * C;
            for (int64_t t = 0; t < T; t++) out[t * R + r] = one_row(row, x + t * C, C);
        }
    }
}
