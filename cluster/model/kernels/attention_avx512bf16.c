/* Decode attention with sinks over bf16 keys and values, AVX-512 (see attention_cpu.py, which builds
 * and calls this).
 *
 * One query token per sequence: q [B, N, D] against keys/values [B, K, L, D] (any strides but D's),
 * query head n reading kv head n / (N / K). Scores, the softmax with each head's sink logit in its
 * denominator, and the weighted sum of values are all float32; the result is rounded to bf16 once.
 * visible [B, L] (0/1 bytes; NULL: every key) marks the keys each sequence sees; sinks [N] are bf16, as
 * the model holds them. torch's path for the
 * same thing is about ten small ops, each rounding to bf16 in between.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define MAX_VEC 8 /* D / 16 up to 8: head_dim up to 128 */

int attention_bf16_supported(void) { return __builtin_cpu_supports("avx512bf16"); }

static inline __m512 widen(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

static void one_group(const uint16_t *q, int64_t q_head_stride, const uint16_t *keys, int64_t key_stride,
                      const uint16_t *values, int64_t value_stride, const uint8_t *visible, int64_t L, int64_t G,
                      int64_t D, const uint16_t *sinks_bf16, float sm_scale, uint16_t *out, float *p) {
    const int64_t V = D / 16;
    float sinks[16];
    for (int64_t g = 0; g < G; g++) {
        const uint32_t bits = (uint32_t)sinks_bf16[g] << 16;
        __builtin_memcpy(&sinks[g], &bits, sizeof(float));
    }
    for (int64_t g = 0; g < G; g++) {
        __m512 qv[MAX_VEC];
        for (int64_t v = 0; v < V; v++) qv[v] = _mm512_mul_ps(widen(q + g * q_head_stride + v * 16), _mm512_set1_ps(sm_scale));
        float m = sinks[g];
        for (int64_t l = 0; l < L; l++) {
            if (visible && !visible[l]) {
                p[g * L + l] = -INFINITY;
                continue;
            }
            const uint16_t *k = keys + l * key_stride;
            __m512 acc = _mm512_mul_ps(qv[0], widen(k));
            for (int64_t v = 1; v < V; v++) acc = _mm512_fmadd_ps(qv[v], widen(k + v * 16), acc);
            const float s = _mm512_reduce_add_ps(acc);
            p[g * L + l] = s;
            m = s > m ? s : m;
        }
        float denominator = expf(sinks[g] - m);
        for (int64_t l = 0; l < L; l++) {
            const float e = expf(p[g * L + l] - m); /* exp(-inf) = 0 for hidden keys */
            p[g * L + l] = e;
            denominator += e;
        }
        const float inverse = 1.0f / denominator;
        for (int64_t l = 0; l < L; l++) p[g * L + l] *= inverse;
    }
    __m512 acc[16 * MAX_VEC];
    for (int64_t i = 0; i < G * V; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t l = 0; l < L; l++) {
        if (visible && !visible[l]) continue;
        __m512 vv[MAX_VEC];
        for (int64_t v = 0; v < V; v++) vv[v] = widen(values + l * value_stride + v * 16);
        for (int64_t g = 0; g < G; g++) {
            const __m512 w = _mm512_set1_ps(p[g * L + l]);
            for (int64_t v = 0; v < V; v++) acc[g * V + v] = _mm512_fmadd_ps(w, vv[v], acc[g * V + v]);
        }
    }
    for (int64_t g = 0; g < G; g++)
        for (int64_t v = 0; v < V; v++)
            _mm256_storeu_si256((__m256i *)(out + g * D + v * 16), (__m256i)_mm512_cvtneps_pbh(acc[g * V + v]));
}

/* q [B, N, D] (strides qb, qn), keys/values [B, K, L, D] (strides b, k, l), out [B, N*D] contiguous bf16.
 * Returns 0, or -1 for a shape the kernel does not take (the caller then keeps torch's path). */
int decode_attention_bf16(const uint16_t *q, int64_t qb, int64_t qn, const uint16_t *keys, int64_t kb, int64_t kk,
                          int64_t kl, const uint16_t *values, int64_t vb, int64_t vk, int64_t vl,
                          const uint8_t *visible, const uint16_t *sinks, float sm_scale, uint16_t *out, int64_t B,
                          int64_t N, int64_t K, int64_t L, int64_t D, int threads) {
    const int64_t G = N / K;
    if (D % 16 || D / 16 > MAX_VEC || G > 16 || G * K != N) return -1;
    int failed = 0;
#pragma omp parallel for schedule(static) num_threads(threads) if (B * K > 1 && B * N * L * D > (1 << 16)) reduction(| : failed)
    for (int64_t i = 0; i < B * K; i++) {
        const int64_t b = i / K, k = i - b * K;
        float *p = malloc((size_t)(G * L) * sizeof(float));
        if (!p) {
            failed = 1;
            continue;
        }
        one_group(q + b * qb + k * G * qn, qn, keys + b * kb + k * kk, kl, values + b * vb + k * vk, vl,
                  visible ? visible + b * L : NULL, L, G, D, sinks + k * G, sm_scale, out + (b * N + k * G) * D, p);
        free(p);
    }
    return failed ? -1 : 0;
}
