/* Few-row matmuls (decode: y[m][n] = sum_k x[m][k] W[n][k], m <= 8) that read 4-bit weights where
 * they lie, for the cases no library here covers at memory speed:
 *
 *  - int4_gemv_f32: torch's CPU int4 layout (see int4_dequant.c) with float32 activations
 *    (aten._weight_int4pack_mm_for_cpu takes bf16/fp16 activations only). W = (q - 8) * s + z per
 *    group of g input channels; computed as sum_groups s * sum_k x (q - 8) + z * sum_k x.
 *  - nf4_gemv_f32: bitsandbytes NF4 (codes two per byte, element 2i in the high nibble of byte i,
 *    row-major [N][K]; absmax per block of `bs` consecutive elements, optionally double-quantized:
 *    absmax[i] = code2[aq[i]] * absmax2[i / bs2] + offset, as bitsandbytes' dequantize_blockwise).
 *    W = code[q] * absmax; computed as sum_blocks absmax * sum_k x code[q].
 *
 * float32 accumulation; the summation order differs from a dense matmul of the dequantized weight,
 * so results agree with it to float rounding (tests compare against bitsandbytes' and torch's own
 * dequantization). AVX-512 where the build machine has it, plain C otherwise (same arithmetic). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

void int4_gemv_f32(const uint8_t *restrict q, const float *restrict s, const float *restrict z,
                   const float *restrict x, float *restrict y, int64_t m, int64_t n, int64_t k, int64_t g) {
    for (int64_t b = 0; b < n / 64; ++b) {
        const uint8_t *blk = q + b * k * 32;
        for (int64_t i = 0; i < m; ++i) {
            const float *xi = x + i * k;
            float *yi = y + i * n + b * 64;
#ifdef __AVX512F__
            __m512 acc[4], part[4];
            for (int t = 0; t < 4; ++t) acc[t] = _mm512_setzero_ps();
            const __m512i lo4 = _mm512_set1_epi32(15), eight = _mm512_set1_epi32(8);
            for (int64_t r0 = 0; r0 < k; r0 += g) {
                float xs = 0.0f;
                for (int t = 0; t < 4; ++t) part[t] = _mm512_setzero_ps();
                for (int64_t r = r0; r < r0 + g; ++r) {
                    const uint8_t *src = blk + r * 32;
                    const __m512 xv = _mm512_set1_ps(xi[r]);
                    xs += xi[r];
                    const __m512i v0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)src));
                    const __m512i v1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(src + 16)));
                    const __m512i c[4] = {_mm512_and_si512(v0, lo4), _mm512_and_si512(v1, lo4),
                                          _mm512_srli_epi32(v0, 4), _mm512_srli_epi32(v1, 4)};
                    for (int t = 0; t < 4; ++t)
                        part[t] = _mm512_fmadd_ps(xv, _mm512_cvtepi32_ps(_mm512_sub_epi32(c[t], eight)), part[t]);
                }
                const float *sr = s + (r0 / g) * n + b * 64, *zr = z + (r0 / g) * n + b * 64;
                const __m512 xsv = _mm512_set1_ps(xs);
                for (int t = 0; t < 4; ++t) {
                    acc[t] = _mm512_fmadd_ps(_mm512_loadu_ps(sr + 16 * t), part[t], acc[t]);
                    acc[t] = _mm512_fmadd_ps(_mm512_loadu_ps(zr + 16 * t), xsv, acc[t]);
                }
            }
            for (int t = 0; t < 4; ++t) _mm512_storeu_ps(yi + 16 * t, acc[t]);
#else
            float acc[64] = {0}, part[64];
            for (int64_t r0 = 0; r0 < k; r0 += g) {
                float xs = 0.0f;
                memset(part, 0, sizeof part);
                for (int64_t r = r0; r < r0 + g; ++r) {
                    const uint8_t *src = blk + r * 32;
                    const float xv = xi[r];
                    xs += xv;
                    for (int j = 0; j < 32; ++j) part[j] += xv * (float)((int)(src[j] & 15) - 8);
                    for (int j = 0; j < 32; ++j) part[32 + j] += xv * (float)((int)(src[j] >> 4) - 8);
                }
                const float *sr = s + (r0 / g) * n + b * 64, *zr = z + (r0 / g) * n + b * 64;
                for (int j = 0; j < 64; ++j) acc[j] += sr[j] * part[j] + zr[j] * xs;
            }
            memcpy(yi, acc, sizeof acc);
#endif
        }
    }
}

static inline float nf4_absmax(const float *absmax, const uint8_t *aq, const float *code2, const float *absmax2,
                               int64_t bs2, float offset, int64_t i) {
    return aq ? code2[aq[i]] * absmax2[i / bs2] + offset : absmax[i];
}

/* bs % 32 == 0 and k % bs == 0 (checked by the caller) */
void nf4_gemv_f32(const uint8_t *restrict q, const float *restrict absmax, const uint8_t *restrict aq,
                  const float *restrict code2, const float *restrict absmax2, int64_t bs2, float offset,
                  const float *restrict code, const float *restrict x, float *restrict y, int64_t m, int64_t n,
                  int64_t k, int64_t bs) {
#ifdef __AVX512F__
    /* x split per 32-element chunk into its even and odd elements (the high and low nibbles) */
    float *xp = (float *)malloc((size_t)(m * k) * sizeof(float));
    const __m512i ev = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i od = _mm512_add_epi32(ev, _mm512_set1_epi32(1));
    for (int64_t i = 0; i < m * k; i += 32) {
        const __m512 a = _mm512_loadu_ps(x + i), c = _mm512_loadu_ps(x + i + 16);
        _mm512_storeu_ps(xp + i, _mm512_permutex2var_ps(a, ev, c));
        _mm512_storeu_ps(xp + i + 16, _mm512_permutex2var_ps(a, od, c));
    }
    const __m512 table = _mm512_loadu_ps(code);
    const __m512i lo4 = _mm512_set1_epi32(15);
#endif
    for (int64_t r = 0; r < n; ++r) {
        const uint8_t *row = q + r * k / 2;
        for (int64_t i = 0; i < m; ++i) {
            float acc = 0.0f;
#ifdef __AVX512F__
            __m512 accv = _mm512_setzero_ps();
#endif
            for (int64_t c0 = 0; c0 < k; c0 += bs) {
                const float a = nf4_absmax(absmax, aq, code2, absmax2, bs2, offset, (r * k + c0) / bs);
#ifdef __AVX512F__
                const float *xb = xp + i * k + c0;
                __m512 part = _mm512_setzero_ps();
                for (int64_t c = 0; c < bs; c += 32) {
                    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + (c0 + c) / 2)));
                    part = _mm512_fmadd_ps(_mm512_loadu_ps(xb + c),
                                           _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table), part);
                    part = _mm512_fmadd_ps(_mm512_loadu_ps(xb + c + 16),
                                           _mm512_permutexvar_ps(_mm512_and_si512(v, lo4), table), part);
                }
                accv = _mm512_fmadd_ps(_mm512_set1_ps(a), part, accv);
#else
                const float *xb = x + i * k + c0;
                const uint8_t *src = row + c0 / 2;
                float part = 0.0f;
                for (int64_t c = 0; c < bs / 2; ++c)
                    part += xb[2 * c] * code[src[c] >> 4] + xb[2 * c + 1] * code[src[c] & 15];
                acc += a * part;
#endif
            }
#ifdef __AVX512F__
            acc = _mm512_reduce_add_ps(accv);
#endif
            y[i * n + r] = acc;
        }
    }
#ifdef __AVX512F__
    free(xp);
#endif
}
