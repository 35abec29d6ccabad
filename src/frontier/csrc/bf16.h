/* float32 -> bfloat16 bits, round to nearest even (as c10::BFloat16); NaN stays NaN. */
#ifndef FRONTIER_BF16_H
#define FRONTIER_BF16_H
#include <stdint.h>
#include <string.h>

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float as_f32(float f) { return f; }
#endif
