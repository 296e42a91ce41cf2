/* The bf16 expert MLP's steps around its two MXFP4 matmuls, AVX-512 (see expert_epilogue_cpu.py, which
 * builds and calls this): the biased, clamped SwiGLU between them and, for one token, the biased,
 * weighted sum of its experts' outputs after them.
 *
 * Rounding points as torch's bf16 path has them where they matter for the next matmul (biased
 * projections rounded to bf16, each output rounded to bf16); in between, float32 (torch rounds every
 * elementwise op of the SwiGLU to bf16). exp is a degree-6 polynomial after range reduction, within a
 * few float32 ulps.
 */
#include <immintrin.h>
#include <stdint.h>

int expert_epilogue_supported(void) { return __builtin_cpu_supports("avx512bf16"); }

static inline __m512 widen(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

static inline __m512 round_bf16(__m512 x) { return _mm512_cvtpbh_ps(_mm512_cvtneps_pbh(x)); }

static inline __m512 exp512(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x); /* ln 2, split in two */
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* out [P, I] bf16 = swiglu(round_bf16(h [P, 2I] + bias [E, 2I][expert[p]])): gate and linear interleaved
 * (even, odd), gate clamped above at limit, linear to [-limit, limit], gate * sigmoid(alpha gate) * (linear + 1).
 * I a multiple of 16. */
void swiglu_bias_bf16(const float *h, const uint16_t *bias, const int64_t *expert, int64_t P, int64_t I, float alpha,
                      float limit, uint16_t *out, int threads) {
    const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    const int64_t chunks = I / 16;
#pragma omp parallel for schedule(static) num_threads(threads) if (P * I >= (1 << 13))
    for (int64_t i = 0; i < P * chunks; i++) {
        const int64_t p = i / chunks, c = (i - p * chunks) * 16;
        const float *row = h + p * 2 * I + 2 * c;
        const uint16_t *b = bias + expert[p] * 2 * I + 2 * c;
        const __m512 lo = round_bf16(_mm512_add_ps(_mm512_loadu_ps(row), widen(b)));
        const __m512 hi = round_bf16(_mm512_add_ps(_mm512_loadu_ps(row + 16), widen(b + 16)));
        const __m512 gate = _mm512_min_ps(_mm512_permutex2var_ps(lo, even, hi), _mm512_set1_ps(limit));
        __m512 linear = _mm512_permutex2var_ps(lo, odd, hi);
        linear = _mm512_min_ps(_mm512_max_ps(linear, _mm512_set1_ps(-limit)), _mm512_set1_ps(limit));
        const __m512 one = _mm512_set1_ps(1.0f);
        const __m512 sigmoid = _mm512_div_ps(one, _mm512_add_ps(one, exp512(_mm512_mul_ps(gate, _mm512_set1_ps(-alpha)))));
        const __m512 y = _mm512_mul_ps(_mm512_mul_ps(gate, sigmoid), _mm512_add_ps(linear, one));
        _mm256_storeu_si256((__m256i *)(out + p * I + c), (__m256i)_mm512_cvtneps_pbh(y));
    }
}

/* One token's output [H] bf16 = sum over its A experts a of weight[order[a]] * round_bf16(y [A, H][a] +
 * bias [E, H][expert[a]]), summed in float32 and rounded once; weight holds the token's A router weights
 * (bf16), y's rows are in `expert` (sorted) order. H a multiple of 16. */
void combine_bf16(const float *y, const uint16_t *bias, const int64_t *expert, const uint16_t *weight,
                  const int64_t *order, int64_t A, int64_t H, uint16_t *out) {
    for (int64_t c = 0; c < H; c += 16) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t a = 0; a < A; a++) {
            const uint32_t bits = (uint32_t)weight[order[a]] << 16;
            float w;
            __builtin_memcpy(&w, &bits, sizeof w);
            const __m512 v = round_bf16(_mm512_add_ps(_mm512_loadu_ps(y + a * H + c), widen(bias + expert[a] * H + c)));
            acc = _mm512_fmadd_ps(_mm512_set1_ps(w), v, acc);
        }
        _mm256_storeu_si256((__m256i *)(out + c), (__m256i)_mm512_cvtneps_pbh(acc));
    }
}
