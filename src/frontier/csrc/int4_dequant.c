/* Dequantize torch's CPU int4 weight layout (aten._convert_weight_to_int4pack_for_cpu, N % 64 == 0)
 * into the transposed dense weight, W^T [K][N] = (code - 8) * scale + zero, in one pass.
 *
 * Layout (checked against the aten packing by frontier.quantize.fastpath._int4_layout_ok): blocks of
 * 64 output rows stored [K][32] bytes; byte j of row k in block b holds row b*64 + j (low nibble)
 * and row b*64 + 32 + j (high nibble). scale / zero: float32 [K/g][N]; pre: float32 [K] or NULL, an
 * input-channel factor folded into the result (AWQ's activation pre-scale: x·diag(pre)·W^T). A NULL
 * pre multiplies by 1, which is exact.
 *
 * Arithmetic as torch's vectorised ops do it (multiply, then add, no fused multiply-add: build with
 * -ffp-contract=off), float32 rounded once to bfloat16 (round to nearest even, as c10::BFloat16),
 * so the result is bit-equal to the Inductor and eager paths of fastpath._int4_dense. */
#include <stdint.h>
#include <string.h>

#include "bf16.h"

/* one function per output type: T the element type, CVT the float32 -> T conversion */
#define INT4_DEQUANT_T(NAME, T, CVT)                                                                      \
    void NAME(const uint8_t *restrict q, const float *restrict s, const float *restrict z,                \
              const float *restrict pre, T *restrict out, int64_t n, int64_t k, int64_t g) {             \
        for (int64_t r = 0; r < k; ++r) {                                                                \
            const float *sr = s + (r / g) * n, *zr = z + (r / g) * n;                                     \
            const float p = pre ? pre[r] : 1.0f;                                                          \
            T *o = out + r * n;                                                                           \
            for (int64_t b = 0; b < n / 64; ++b) {                                                        \
                const uint8_t *src = q + (b * k + r) * 32;                                                \
                const float *s0 = sr + b * 64, *z0 = zr + b * 64;                                         \
                T *o0 = o + b * 64;                                                                       \
                for (int j = 0; j < 32; ++j)                                                              \
                    o0[j] = CVT(((float)((int)(src[j] & 15) - 8) * s0[j] + z0[j]) * p);                   \
                for (int j = 0; j < 32; ++j)                                                              \
                    o0[32 + j] = CVT(((float)((int)(src[j] >> 4) - 8) * s0[32 + j] + z0[32 + j]) * p);    \
            }                                                                                             \
        }                                                                                                 \
    }

INT4_DEQUANT_T(int4_dequant_t_bf16, uint16_t, f32_to_bf16)
INT4_DEQUANT_T(int4_dequant_t_f32, float, as_f32)
