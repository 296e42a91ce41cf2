/* bf16 weights times bf16 activations with AVX-512 BF16 (see bf16_cpu.py, which builds and calls this).
 *
 * The same contract as bf16_avx512.c's bf16_linear, for activations that are bf16 already (the bf16
 * model's): out [T, R] float32 = x [T, C] times w [R, C] transposed, C a multiple of 32. vdpbf16ps
 * multiplies 32 weights by 32 activations (each product exact in float32) and adds them, in pairs, to
 * 16 float32 lanes: one instruction where the float32 kernel needs three per 16 weights (widen, shift,
 * FMA). Only the float32 summation order differs.
 *
 * bf16_linear_bf16_out is the layer's whole forward for a bf16 model: it adds the bf16 bias to the
 * float32 sum and rounds to bf16 (nearest, ties to even) as it writes, which is what torch's
 * `out += bias; out.to(bfloat16)` computes, without those two ops.
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

/* float32 -> bf16, to nearest with ties to even (torch's rounding); NaN stays a quiet NaN */
static inline uint16_t to_bf16(float f) {
    uint32_t b;
    __builtin_memcpy(&b, &f, 4);
    if ((b & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((b >> 16) | 0x40);
    return (uint16_t)((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}

static inline float from_bf16(uint16_t h) {
    const uint32_t b = (uint32_t)h << 16;
    float f;
    __builtin_memcpy(&f, &b, 4);
    return f;
}

/* out [T, R]: float32 sums (out32), or bf16 of sum + bias (out16, bias nullable) */
static void linear(const uint16_t *w, const uint16_t *x, float *out32, uint16_t *out16, const uint16_t *bias,
                   int64_t R, int64_t C, int64_t T, int64_t rows_per_item, int threads) {
    const int64_t items = (R + rows_per_item - 1) / rows_per_item;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < items; i++) {
        const int64_t r0 = i * rows_per_item, r1 = r0 + rows_per_item < R ? r0 + rows_per_item : R;
        for (int64_t r = r0; r < r1; r++) {
            const uint16_t *row = w + r * C;
            for (int64_t t = 0; t < T; t++) {
                const float sum = one_row(row, x + t * C, C);
                if (out16) out16[t * R + r] = to_bf16(bias ? sum + from_bf16(bias[r]) : sum);
                else out32[t * R + r] = sum;
            }
        }
    }
}

void bf16_linear_bf16(const uint16_t *w, const uint16_t *x, float *out, int64_t R, int64_t C, int64_t T,
                      int64_t rows_per_item, int threads) {
    linear(w, x, out, 0, 0, R, C, T, rows_per_item, threads);
}

void bf16_linear_bf16_out(const uint16_t *w, const uint16_t *x, const uint16_t *bias, uint16_t *out, int64_t R,
                          int64_t C, int64_t T, int64_t rows_per_item, int threads) {
    linear(w, x, 0, out, bias, R, C, T, rows_per_item, threads);
}
