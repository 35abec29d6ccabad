/* Dequantize frontier's bit-packed codes (quantize.tensors.PackedIntxTensor, any bits 1..8) into a
 * dense [N][K] weight, W = (q - zero) * scale per group of g input channels, in one pass per row.
 *
 * Layouts (quantize.tensors.pack_bits):
 *  - bits dividing 8: [N][K * bits / 8] bytes, byte c of a row holding codes per c .. per c + per - 1
 *    at shifts 0, bits, 2 bits, ... (per = 8 / bits);
 *  - other bits: bit-planes [bits][N][K / 8], bit i of byte c of plane j being bit j of code 8 c + i.
 * scale / zero: float32 [N][K / g]; zero NULL: symmetric codes, zero = 2^(bits - 1).
 *
 * Arithmetic as the compiled and eager passes of quantize.fastpath do it ((q - zero) in float32,
 * times scale, rounded once to the output type; -ffp-contract=off), so the result is bit-equal. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#ifdef __AVX512BW__
#include <immintrin.h>
#endif

/* codes of row r into tmp[0..k) */
static void row_codes(const uint8_t *q, uint8_t *tmp, const uint64_t *spread, int64_t r, int64_t n, int64_t k,
                      int bits) {
    if (8 % bits == 0) {
        const int per = 8 / bits;
        const unsigned mask = (1u << bits) - 1u;
        const uint8_t *row = q + r * (k / per);
        for (int64_t c = 0; c < k / per; ++c)
            for (int i = 0; i < per; ++i) tmp[c * per + i] = (uint8_t)((row[c] >> (i * bits)) & mask);
        return;
    }
    int64_t c = 0;
#ifdef __AVX512BW__
    for (; c + 8 <= k / 8; c += 8) { /* 64 codes: plane j's 64 bits select the lanes that get bit j */
        __m512i v = _mm512_setzero_si512();
        for (int j = 0; j < bits; ++j) {
            uint64_t m;
            memcpy(&m, q + (j * n + r) * (k / 8) + c, 8);
            v = _mm512_or_si512(v, _mm512_maskz_set1_epi8(_cvtu64_mask64(m), (char)(1 << j)));
        }
        _mm512_storeu_si512((void *)(tmp + c * 8), v);
    }
#endif
    for (; c < k / 8; ++c) {
        uint64_t v = 0; /* byte i of v: code 8 c + i */
        for (int j = 0; j < bits; ++j) v |= spread[q[(j * n + r) * (k / 8) + c]] << j;
        memcpy(tmp + c * 8, &v, 8);
    }
}

#define PACKED_DEQUANT_T(NAME, T, CVT)                                                                  \
    void NAME(const uint8_t *restrict q, const float *restrict s, const float *restrict z, T *restrict out, \
              int64_t n, int64_t k, int64_t g, int64_t bits) {                                         \
        uint64_t spread[256]; /* bit i of a byte -> bit 0 of byte i (little-endian) */                  \
        for (int b = 0; b < 256; ++b) {                                                                 \
            uint64_t v = 0;                                                                             \
            for (int i = 0; i < 8; ++i) v |= (uint64_t)((b >> i) & 1) << (8 * i);                       \
            spread[b] = v;                                                                              \
        }                                                                                               \
        uint8_t *tmp = (uint8_t *)malloc((size_t)k + 8);                                                \
        const float zsym = (float)(1 << (bits - 1));                                                    \
        for (int64_t r = 0; r < n; ++r) {                                                               \
            row_codes(q, tmp, spread, r, n, k, (int)bits);                                              \
            T *o = out + r * k;                                                                         \
            for (int64_t gi = 0; gi < k / g; ++gi) {                                                    \
                const float sv = s[r * (k / g) + gi], zv = z ? z[r * (k / g) + gi] : zsym;              \
                const uint8_t *c = tmp + gi * g;                                                        \
                T *og = o + gi * g;                                                                     \
                for (int64_t j = 0; j < g; ++j) og[j] = CVT(((float)c[j] - zv) * sv);                   \
            }                                                                                           \
        }                                                                                               \
        free(tmp);                                                                                      \
    }

PACKED_DEQUANT_T(packed_dequant_bf16, uint16_t, f32_to_bf16)
PACKED_DEQUANT_T(packed_dequant_f32, float, as_f32)
