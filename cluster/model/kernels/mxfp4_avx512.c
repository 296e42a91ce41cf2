/* MXFP4 rows times float32 activations with AVX-512 (see mxfp4_cpu.py, which builds and calls this).
 *
 * mxfp4_grouped: blocks [E, R, G, 16] and scales [E, R, G] are a layer's packed experts; xe/xo [N, G*16]
 * are the even and odd columns of N activation rows grouped by expert: rows offsets[m]..offsets[m+1]
 * meet expert experts[m]. out [N, R] float32. OpenMP threads split (expert, row range) items. A block's 16 code
 * bytes widen to 16 lanes; vpermps looks the low and high nibbles up in the 16 E2M1 values (even and
 * odd columns), and the block's power-of-two scale multiplies them exactly, so only the float32
 * summation order differs from unpack-then-matmul.
 */
#include <immintrin.h>
#include <stdint.h>

static const float FP4[16] = {0.f, .5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f, -0.f, -.5f, -1.f, -1.5f, -2.f, -3.f, -4.f, -6.f};
#define TOKENS 8 /* activation rows sharing one decode of a block */

static inline void decode(const uint8_t *b, float scale, __m512 lut, __m512 *even, __m512 *odd) {
    const __m512i codes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)b));
    const __m512 s = _mm512_set1_ps(scale);
    *even = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(codes, _mm512_set1_epi32(15)), lut), s);
    *odd = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(codes, 4), lut), s);
}

/* One activation row: four independent accumulators (two blocks a step) hide the FMA latency. */
static void one_token(const uint8_t *blocks, const uint8_t *scales, int64_t G, const float *xe, const float *xo,
                      int64_t r0, int64_t r1, float *out, const float *powers, __m512 lut) {
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *b = blocks + r * G * 16, *s = scales + r * G;
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
        __m512 we, wo, ve, vo;
        int64_t g = 0;
        for (; g + 1 < G; g += 2) {
            decode(b + g * 16, powers[s[g]], lut, &we, &wo);
            decode(b + g * 16 + 16, powers[s[g + 1]], lut, &ve, &vo);
            a0 = _mm512_fmadd_ps(we, _mm512_loadu_ps(xe + g * 16), a0);
            a1 = _mm512_fmadd_ps(wo, _mm512_loadu_ps(xo + g * 16), a1);
            a2 = _mm512_fmadd_ps(ve, _mm512_loadu_ps(xe + g * 16 + 16), a2);
            a3 = _mm512_fmadd_ps(vo, _mm512_loadu_ps(xo + g * 16 + 16), a3);
        }
        if (g < G) {
            decode(b + g * 16, powers[s[g]], lut, &we, &wo);
            a0 = _mm512_fmadd_ps(we, _mm512_loadu_ps(xe + g * 16), a0);
            a1 = _mm512_fmadd_ps(wo, _mm512_loadu_ps(xo + g * 16), a1);
        }
        out[r] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    }
}

static void rows(const uint8_t *blocks, const uint8_t *scales, int64_t G, const float *xe, const float *xo,
                int64_t T, int64_t r0, int64_t r1, float *out, int64_t ld, const float *powers) {
    const __m512 lut = _mm512_loadu_ps(FP4);
    if (T == 1) {
        one_token(blocks, scales, G, xe, xo, r0, r1, out, powers, lut);
        return;
    }
    const int64_t half = G * 16;
    for (int64_t t0 = 0; t0 < T; t0 += TOKENS) {
        const int64_t n = T - t0 < TOKENS ? T - t0 : TOKENS;
        for (int64_t r = r0; r < r1; r++) {
            const uint8_t *b = blocks + r * G * 16, *s = scales + r * G;
            __m512 acc[TOKENS];
            for (int64_t t = 0; t < n; t++) acc[t] = _mm512_setzero_ps();
            for (int64_t g = 0; g < G; g++) {
                __m512 we, wo;
                decode(b + g * 16, powers[s[g]], lut, &we, &wo);
                for (int64_t t = 0; t < n; t++) {
                    const int64_t at = (t0 + t) * half + g * 16;
                    acc[t] = _mm512_fmadd_ps(wo, _mm512_loadu_ps(xo + at), _mm512_fmadd_ps(we, _mm512_loadu_ps(xe + at), acc[t]));
                }
            }
            for (int64_t t = 0; t < n; t++) out[(t0 + t) * ld + r] = _mm512_reduce_add_ps(acc[t]);
        }
    }
}

void mxfp4_grouped(const uint8_t *blocks, const uint8_t *scales, int64_t R, int64_t G, const float *xe,
                   const float *xo, const int64_t *experts, const int64_t *offsets, int64_t M, float *out,
                   const float *powers, int64_t rows_per_item, int threads) {
    const int64_t per_expert = (R + rows_per_item - 1) / rows_per_item, half = G * 16;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < M * per_expert; i++) {
        const int64_t m = i / per_expert, r0 = (i - m * per_expert) * rows_per_item;
        const int64_t r1 = r0 + rows_per_item < R ? r0 + rows_per_item : R, t0 = offsets[m], t1 = offsets[m + 1];
        if (t1 > t0)
            rows(blocks + experts[m] * R * G * 16, scales + experts[m] * R * G, G, xe + t0 * half, xo + t0 * half,
                 t1 - t0, r0, r1, out + t0 * R, R, powers);
    }
}
