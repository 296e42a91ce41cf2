/* MXFP4 rows times bf16 activations with AVX-512 BF16 (see mxfp4_cpu.py, which builds and calls this).
 *
 * The same contract as mxfp4_avx512.c's mxfp4_grouped, for activations that are bf16 already (x [N, G*32]
 * as bf16 bits, columns in their natural order): a block's 16 code bytes become 32 bf16 weights, each
 * byte's low and high nibble side by side, which is the pair layout vdpbf16ps multiplies against 32
 * consecutive activations. The nibbles index a table of the 16 E2M1 values in bf16 (vpermw); one
 * vdpbf16ps forms the block's 32 products (each exact in float32) and sums them in float32; the block's
 * power-of-two scale then multiplies that sum exactly. So only the float32 summation order differs
 * from unpack-then-matmul, as with the float32 kernel, with half the instructions per block.
 *
 * One token per expert (decode) goes faster with the activations split once per call into even and odd
 * columns (`split`): then two blocks' 32 code bytes widen to 32 words at once, whose low nibbles are the
 * weights of the even columns and whose high nibbles those of the odd ones, two `vpermw` look both up,
 * and two `vdpbf16ps` take them against the split activations as they are. Lanes 0-7 of the sums hold the
 * first block, 8-15 the second, so one FMA applies both blocks' scales. About 5 instructions per block
 * instead of 8; still only the float32 summation order differs.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

static const uint16_t E2M1_BF16[32] = {0x0000, 0x3F00, 0x3F80, 0x3FC0, 0x4000, 0x4040, 0x4080, 0x40C0,
                                       0x8000, 0xBF00, 0xBF80, 0xBFC0, 0xC000, 0xC040, 0xC080, 0xC0C0};
#define TOKENS 8 /* activation rows sharing one decode of a block */

int mxfp4_bf16_supported(void) { return __builtin_cpu_supports("avx512bf16"); }

/* The block's 32 weights (unscaled) as bf16 pairs: lane i = (low nibble, high nibble) of byte i. */
static inline __m512bh decode(const uint8_t *b, __m512i lut) {
    const __m512i codes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)b));
    /* (codes | codes << 12) & 0x000F000F: the low nibble in the lane's low word, the high one in its high word */
    const __m512i idx = _mm512_ternarylogic_epi32(codes, _mm512_slli_epi32(codes, 12), _mm512_set1_epi32(0x000F000F), 0xA8);
    return (__m512bh)_mm512_permutexvar_epi16(idx, lut);
}

static inline __m512 dot(__m512bh w, const uint16_t *x) {
    return _mm512_dpbf16_ps(_mm512_setzero_ps(), w, (__m512bh)_mm512_loadu_si512((const void *)x));
}

/* acc + blocks g and g + 1 of a row (32 code bytes) against the split activations of their 64 columns. */
static inline __m512 two_blocks(__m512 acc, const uint8_t *b, const uint8_t *s, const uint16_t *even,
                                const uint16_t *odd, const float *powers, __m512i lut) {
    const __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)b));
    const __m512bh low = (__m512bh)_mm512_permutexvar_epi16(_mm512_and_si512(bytes, _mm512_set1_epi16(0x0F)), lut);
    const __m512bh high = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(bytes, 4), lut);
    const __m512 sum = _mm512_dpbf16_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), low, (__m512bh)_mm512_loadu_si512(even)),
                                        high, (__m512bh)_mm512_loadu_si512(odd));
    const __m512 scale = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(powers[s[0]]), _mm512_set1_ps(powers[s[1]]));
    return _mm512_fmadd_ps(sum, scale, acc);
}

/* x [width] (bf16 bits) -> even [width / 2 + 32], odd [width / 2 + 32]: its even and odd columns, zero-padded
 * so an odd block count can read a whole pair of blocks. width a multiple of 32. */
static void split(const uint16_t *x, int64_t width, uint16_t *even, uint16_t *odd) {
    const __m512i evens = _mm512_set_epi16(62, 60, 58, 56, 54, 52, 50, 48, 46, 44, 42, 40, 38, 36, 34, 32, 30, 28,
                                           26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i odds = _mm512_add_epi16(evens, _mm512_set1_epi16(1));
    for (int64_t c = 0; c + 64 <= width; c += 64) {
        const __m512i a = _mm512_loadu_si512((const void *)(x + c)), b = _mm512_loadu_si512((const void *)(x + c + 32));
        _mm512_storeu_si512((void *)(even + c / 2), _mm512_permutex2var_epi16(a, evens, b));
        _mm512_storeu_si512((void *)(odd + c / 2), _mm512_permutex2var_epi16(a, odds, b));
    }
    for (int64_t c = width / 64 * 64; c < width; c += 2) {
        even[c / 2] = x[c];
        odd[c / 2] = x[c + 1];
    }
    for (int64_t c = width / 2; c < width / 2 + 32; c++) even[c] = odd[c] = 0;
}

static void one_token(const uint8_t *blocks, const uint8_t *scales, int64_t G, const uint16_t *even,
                      const uint16_t *odd, int64_t r0, int64_t r1, float *out, const float *powers, __m512i lut) {
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *b = blocks + r * G * 16, *s = scales + r * G;
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        int64_t g = 0;
        for (; g + 3 < G; g += 4) {
            a0 = two_blocks(a0, b + g * 16, s + g, even + g * 16, odd + g * 16, powers, lut);
            a1 = two_blocks(a1, b + g * 16 + 32, s + g + 2, even + g * 16 + 32, odd + g * 16 + 32, powers, lut);
        }
        if (g + 1 < G) {
            a0 = two_blocks(a0, b + g * 16, s + g, even + g * 16, odd + g * 16, powers, lut);
            g += 2;
        }
        if (g < G) { /* the last block alone: its code bytes padded with zero codes (weight 0), scale 1 */
            uint8_t last[32] = {0}, last_scales[2] = {s[g], 127};
            __builtin_memcpy(last, b + g * 16, 16);
            a1 = two_blocks(a1, last, last_scales, even + g * 16, odd + g * 16, powers, lut);
        }
        out[r] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    }
}

static void rows(const uint8_t *blocks, const uint8_t *scales, int64_t G, const uint16_t *x, const uint16_t *split_x,
                 int64_t T, int64_t r0, int64_t r1, float *out, int64_t ld, const float *powers) {
    const __m512i lut = _mm512_loadu_si512((const void *)E2M1_BF16);
    if (T == 1) {
        one_token(blocks, scales, G, split_x, split_x + G * 16 + 32, r0, r1, out, powers, lut);
        return;
    }
    const int64_t width = G * 32;
    for (int64_t t0 = 0; t0 < T; t0 += TOKENS) {
        const int64_t n = T - t0 < TOKENS ? T - t0 : TOKENS;
        for (int64_t r = r0; r < r1; r++) {
            const uint8_t *b = blocks + r * G * 16, *s = scales + r * G;
            __m512 acc[TOKENS];
            for (int64_t t = 0; t < n; t++) acc[t] = _mm512_setzero_ps();
            for (int64_t g = 0; g < G; g++) {
                const __m512bh w = decode(b + g * 16, lut);
                const __m512 scale = _mm512_set1_ps(powers[s[g]]);
                for (int64_t t = 0; t < n; t++)
                    acc[t] = _mm512_fmadd_ps(dot(w, x + (t0 + t) * width + g * 32), scale, acc[t]);
            }
            for (int64_t t = 0; t < n; t++) out[(t0 + t) * ld + r] = _mm512_reduce_add_ps(acc[t]);
        }
    }
}

/* Returns 0, or -1 when the split activations cannot be allocated (nothing is computed then). */
int mxfp4_grouped_bf16(const uint8_t *blocks, const uint8_t *scales, int64_t R, int64_t G, const uint16_t *x,
                       const int64_t *experts, const int64_t *offsets, int64_t M, float *out, const float *powers,
                       int64_t rows_per_item, int threads) {
    const int64_t per_expert = (R + rows_per_item - 1) / rows_per_item, width = G * 32, half = G * 16 + 32;
    /* the even and odd columns of the token of each expert that has one token alone, nothing for the others
     * (a prefill's experts have many); split_x + 2 * half * slot[m] is expert m's */
    int64_t singles = 0;
    for (int64_t m = 0; m < M; m++) singles += offsets[m + 1] - offsets[m] == 1;
    int64_t *slot = malloc((size_t)M * sizeof(int64_t) + (size_t)(singles * 2 * half) * sizeof(uint16_t));
    if (!slot) return -1;
    uint16_t *split_x = (uint16_t *)(slot + M);
    for (int64_t m = 0, next = 0; m < M; m++) {
        slot[m] = offsets[m + 1] - offsets[m] == 1 ? next++ : -1;
        if (slot[m] >= 0)
            split(x + offsets[m] * width, width, split_x + slot[m] * 2 * half, split_x + slot[m] * 2 * half + half);
    }
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < M * per_expert; i++) {
        const int64_t m = i / per_expert, r0 = (i - m * per_expert) * rows_per_item;
        const int64_t r1 = r0 + rows_per_item < R ? r0 + rows_per_item : R, t0 = offsets[m], t1 = offsets[m + 1];
        if (t1 > t0)
            rows(blocks + experts[m] * R * G * 16, scales + experts[m] * R * G, G, x + t0 * width,
                 slot[m] >= 0 ? split_x + slot[m] * 2 * half : 0, t1 - t0, r0, r1, out + t0 * R, R, powers);
    }
    free(slot);
    return 0;
}
