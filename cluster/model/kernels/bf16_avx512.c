/* bf16 weights times float32 activations with AVX-512 (see bf16_cpu.py, which builds and calls this).
 *
 * out [T, R] float32 = x [T, C] float32 times w [R, C] bf16, transposed; C a multiple of 32. A bf16 is
 * the top half of a float32, so 16 weights widen to 16 lanes and shift left by 16: exact, and every
 * product and sum is float32, as torch's own bf16 matmul on CPU accumulates. Made for one activation
 * row (batch-1 decode): two accumulators hide the FMA latency; several rows are done one after another
 * (torch's blocked GEMM is faster from two rows on, measured). OpenMP threads split the rows (torch's runtime: the
 * library links the libgomp torch already loaded).
 */
#include <immintrin.h>
#include <stdint.h>

static inline __m512 widen(const uint16_t *w) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)w)), 16));
}

static inline float one_row(const uint16_t *row, const float *x, int64_t C) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    for (int64_t c = 0; c < C; c += 32) {
        a0 = _mm512_fmadd_ps(widen(row + c), _mm512_loadu_ps(x + c), a0);
        a1 = _mm512_fmadd_ps(widen(row + c + 16), _mm512_loadu_ps(x + c + 16), a1);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}

void bf16_linear(const uint16_t *w, const float *x, float *out, int64_t R, int64_t C, int64_t T,
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
