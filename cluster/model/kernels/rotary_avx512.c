/* Rotary position embedding of bf16 heads on CPU, rounded as torch rounds it (see rotary_cpu.py).
 *
 * layers.apply_rotary computes, in bf16, x1 * cos - x2 * sin and x2 * cos + x1 * sin over the two halves
 * of each head: torch rounds every product and every sum to bf16. The products of two bf16 values are
 * exact in float32, so rounding each one (to nearest even) and then their float32 sum gives torch's
 * values bit for bit, in one pass instead of eight small ops.
 */
#include <immintrin.h>
#include <stdint.h>

int rotary_supported(void) { return __builtin_cpu_supports("avx512bw"); }

static inline __m512 widen(__mmask16 m, const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(_mm512_maskz_loadu_epi16(m, p))), 16));
}

/* to the nearest bf16 (ties to even), as a float; NaN stays a quiet NaN */
static inline __m512 round_bf16(__m512 v) {
    const __m512i b = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_and_si512(_mm512_add_epi32(b, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd)),
                                 _mm512_set1_epi32((int)0xFFFF0000u));
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(b, _mm512_set1_epi32(0x7FFFFFFF)),
                                                  _mm512_set1_epi32(0x7F800000));
    return _mm512_castsi512_ps(_mm512_mask_mov_epi32(r, nan, _mm512_or_si512(b, _mm512_set1_epi32(0x00400000))));
}

static inline void narrow(__mmask16 m, uint16_t *p, __m512 rounded) {
    _mm512_mask_storeu_epi16(p, m, _mm512_castsi256_si512(_mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(rounded), 16))));
}

/* x [B, Hh, T, D] (element strides sb, sh, st; D contiguous), cos/sin [T, D/2] -> out [B, Hh, T, D] contiguous. */
void rotary_bf16(const uint16_t *x, int64_t B, int64_t Hh, int64_t T, int64_t D, int64_t sb, int64_t sh, int64_t st,
                 const uint16_t *cos, const uint16_t *sin, uint16_t *out) {
    const int64_t half = D / 2;
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < Hh; h++)
            for (int64_t t = 0; t < T; t++) {
                const uint16_t *x1 = x + b * sb + h * sh + t * st, *x2 = x1 + half, *c = cos + t * half, *s = sin + t * half;
                uint16_t *o1 = out + ((b * Hh + h) * T + t) * D, *o2 = o1 + half;
                for (int64_t i = 0; i < half; i += 16) {
                    const __mmask16 m = half - i >= 16 ? 0xFFFF : (__mmask16)((1u << (half - i)) - 1);
                    const __m512 a = widen(m, x1 + i), d = widen(m, x2 + i), cv = widen(m, c + i), sv = widen(m, s + i);
                    narrow(m, o1 + i, round_bf16(_mm512_sub_ps(round_bf16(_mm512_mul_ps(a, cv)), round_bf16(_mm512_mul_ps(d, sv)))));
                    narrow(m, o2 + i, round_bf16(_mm512_add_ps(round_bf16(_mm512_mul_ps(d, cv)), round_bf16(_mm512_mul_ps(a, sv)))));
                }
            }
}
