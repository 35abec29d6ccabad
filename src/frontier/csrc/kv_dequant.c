/* Dequantize the quantized KV caches into dense keys and values for attention, one pass per tensor.
 *
 * int8 (frontier.kvcache.Int8KVLayer): codes [rows][D] int8, scale [rows] float32 (per token and
 * head); out = code * scale in float32, rounded once.
 *
 * KIVI's packed 2/4-bit cache (frontier.kivi): out = code * scale + zero, computed in float32 (multiply, then add: build with
 * -ffp-contract=off) and rounded once to the output type, as the eager and compiled passes of
 * frontier.kivi do (tests compare them bit for bit). Scales and zero points come as float32.
 *
 * keys:   codes [BH][G][rows][D] (rows = group / per, per = 8 / bits codes per byte; byte row r of
 *         a group holds tokens r, r + rows, r + 2 rows, ... in bits 0.., bits.., ...);
 *         scale / zero [BH][G][D]; out row t of head i at out + i * out_bh + t * D.
 * values: codes [BH][ceil(n / per)][D] (byte row r holds tokens per r .. per r + per - 1);
 *         scale / zero [BH][n][D / group]; out as for keys. */
#include <stdint.h>
#include <string.h>

#include "bf16.h"

#define KIVI_DEQUANT_T(SUFFIX, T, CVT)                                                                    \
    void kivi_keys_##SUFFIX(const uint8_t *restrict codes, const float *restrict s, const float *restrict z, \
                            T *restrict out, int64_t bh, int64_t ng, int64_t rows, int64_t d, int64_t bits,   \
                            int64_t out_bh) {                                                            \
        const int per = 8 / (int)bits;                                                                   \
        const unsigned mask = (1u << bits) - 1u;                                                         \
        for (int64_t i = 0; i < bh; ++i)                                                                 \
            for (int64_t gi = 0; gi < ng; ++gi) {                                                        \
                const float *sr = s + (i * ng + gi) * d, *zr = z + (i * ng + gi) * d;                    \
                const uint8_t *src = codes + (i * ng + gi) * rows * d;                                    \
                for (int p = 0; p < per; ++p) {                                                          \
                    T *dst = out + i * out_bh + (gi * per + p) * rows * d;                               \
                    const int sh = p * (int)bits;                                                        \
                    for (int64_t r = 0; r < rows; ++r)                                                   \
                        for (int64_t j = 0; j < d; ++j)                                                  \
                            dst[r * d + j] = CVT((float)((src[r * d + j] >> sh) & mask) * sr[j] + zr[j]); \
                }                                                                                        \
            }                                                                                            \
    }                                                                                                    \
    void kivi_values_##SUFFIX(const uint8_t *restrict codes, const float *restrict s, const float *restrict z, \
                              T *restrict out, int64_t bh, int64_t n, int64_t d, int64_t group, int64_t bits, \
                              int64_t out_bh) {                                                          \
        const int per = 8 / (int)bits;                                                                   \
        const unsigned mask = (1u << bits) - 1u;                                                         \
        const int64_t rows = (n + per - 1) / per, ng = d / group;                                        \
        for (int64_t i = 0; i < bh; ++i)                                                                 \
            for (int64_t t = 0; t < n; ++t) {                                                            \
                const uint8_t *src = codes + (i * rows + t / per) * d;                                    \
                const float *sr = s + (i * n + t) * ng, *zr = z + (i * n + t) * ng;                      \
                const int sh = (int)(t % per) * (int)bits;                                               \
                T *dst = out + i * out_bh + t * d;                                                       \
                for (int64_t gi = 0; gi < ng; ++gi) {                                                    \
                    const float sv = sr[gi], zv = zr[gi];                                                \
                    for (int64_t j = gi * group; j < (gi + 1) * group; ++j)                              \
                        dst[j] = CVT((float)((src[j] >> sh) & mask) * sv + zv);                          \
                }                                                                                        \
            }                                                                                            \
    }

#define INT8_ROWS_T(SUFFIX, T, CVT)                                                                       \
    void int8_rows_##SUFFIX(const int8_t *restrict q, const float *restrict s, T *restrict out, int64_t rows, \
                            int64_t d) {                                                                 \
        for (int64_t r = 0; r < rows; ++r) {                                                             \
            const float sv = s[r];                                                                       \
            for (int64_t j = 0; j < d; ++j) out[r * d + j] = CVT((float)q[r * d + j] * sv);              \
        }                                                                                                \
    }

INT8_ROWS_T(bf16, uint16_t, f32_to_bf16)
INT8_ROWS_T(f32, float, as_f32)
KIVI_DEQUANT_T(bf16, uint16_t, f32_to_bf16)
KIVI_DEQUANT_T(f32, float, as_f32)
