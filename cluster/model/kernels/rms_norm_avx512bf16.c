/* RMS norm of bf16 rows with a float32 scale, AVX-512 (see rms_norm_cpu.py, which builds and calls this).
 *
 * out = round_bf16(x / sqrt(mean(x^2) + eps) * scale) per row of H (a multiple of 16), all in float32 as
 * torch computes F.rms_norm on x.float(); only the order of the sum of squares differs.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

int rms_norm_bf16_supported(void) { return __builtin_cpu_supports("avx512bf16"); }

static inline __m512 widen(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

void rms_norm_bf16(const uint16_t *x, const float *scale, uint16_t *out, int64_t rows, int64_t H, float eps) {
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *row = x + r * H;
        __m512 sum = _mm512_setzero_ps();
        for (int64_t h = 0; h < H; h += 16) {
            const __m512 v = widen(row + h);
            sum = _mm512_fmadd_ps(v, v, sum);
        }
        const __m512 inverse = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(sum) / (float)H + eps));
        for (int64_t h = 0; h < H; h += 16) {
            const __m512 y = _mm512_mul_ps(_mm512_mul_ps(widen(row + h), inverse), _mm512_loadu_ps(scale + h));
            _mm256_storeu_si256((__m256i *)(out + r * H + h), (__m256i)_mm512_cvtneps_pbh(y));
        }
    }
}
