// GGML tensor types: ids, block layouts and scalar helpers shared by every kernel.
//
// Every block struct below has only byte members (alignment 1): GGUF rows can start at any
// address (a numpy slice of a memory map), so nothing here may assume natural alignment.
// Multi-byte fields are read through load_* helpers (memcpy, which compiles to a plain load).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace hl {

// GGML type ids, as stored in GGUF files.
enum GgmlType : int {
    T_F32 = 0,
    T_F16 = 1,
    T_Q4_0 = 2,
    T_Q4_1 = 3,
    T_Q5_0 = 6,
    T_Q5_1 = 7,
    T_Q8_0 = 8,
    T_Q2_K = 10,
    T_Q3_K = 11,
    T_Q4_K = 12,
    T_Q5_K = 13,
    T_Q6_K = 14,
    T_BF16 = 30,
};

constexpr int QK = 32;     // elements per block of the "legacy" formats (Q4_0 ... Q8_0)
constexpr int QK_K = 256;  // elements per super-block of the K-quants

struct TypeInfo {
    int block_size;  // elements per block
    int type_size;   // bytes per block
    const char* name;
};

// Fills *info and returns true for a supported type; false otherwise.
bool type_info(int type, TypeInfo* info);

// Bytes of one row of `cols` elements (cols must be a multiple of the block size).
inline int64_t row_bytes(const TypeInfo& ti, int64_t cols) {
    return cols / ti.block_size * ti.type_size;
}

// ---- block layouts (ggml order; sizes checked below) ----------------------------------------

// x = d * (q - 8), q = 4-bit; qs[j] holds element j (low nibble) and j + 16 (high nibble).
struct block_q4_0 {
    uint8_t d[2];
    uint8_t qs[QK / 2];
};
// x = d * q + m.
struct block_q4_1 {
    uint8_t d[2];
    uint8_t m[2];
    uint8_t qs[QK / 2];
};
// x = d * (q - 16), q = low nibble as q4_0 | bit j of the 32-bit qh << 4.
struct block_q5_0 {
    uint8_t d[2];
    uint8_t qh[4];
    uint8_t qs[QK / 2];
};
// x = d * q + m, q 5-bit as q5_0.
struct block_q5_1 {
    uint8_t d[2];
    uint8_t m[2];
    uint8_t qh[4];
    uint8_t qs[QK / 2];
};
// x = d * q, q int8.
struct block_q8_0 {
    uint8_t d[2];
    int8_t qs[QK];
};
// 16 sub-blocks of 16: x = d * (scales[j] & 15) * q - dmin * (scales[j] >> 4), q 2-bit.
// Element e = 128 h + 32 s + l (h < 2, s < 4, l < 32) is (qs[32 h + l] >> 2 s) & 3.
struct block_q2_K {
    uint8_t scales[QK_K / 16];
    uint8_t qs[QK_K / 4];
    uint8_t d[2];
    uint8_t dmin[2];
};
// 16 sub-blocks of 16: x = d * (sc[j] - 32) * (q2 - 4 * !hbit), sc 6-bit packed in 12 bytes.
// q2 as in q2_K; hbit of element e = 32 k + l is (hmask[l] >> k) & 1.
struct block_q3_K {
    uint8_t hmask[QK_K / 8];
    uint8_t qs[QK_K / 4];
    uint8_t scales[12];
    uint8_t d[2];
};
// 8 sub-blocks of 32: x = d * sc[j] * q - dmin * m[j], 6-bit sc/m packed in 12 bytes.
// Element e = 64 c + 32 t + l is (qs[32 c + l] >> 4 t) & 15.
struct block_q4_K {
    uint8_t d[2];
    uint8_t dmin[2];
    uint8_t scales[12];
    uint8_t qs[QK_K / 2];
};
// As q4_K with a fifth bit: bit j of qh[l] for element 32 j + l.
struct block_q5_K {
    uint8_t d[2];
    uint8_t dmin[2];
    uint8_t scales[12];
    uint8_t qh[QK_K / 8];
    uint8_t qs[QK_K / 2];
};
// 16 sub-blocks of 16: x = d * scales[j] * (q - 32), q 6-bit.
// Element e = 128 h + p: low 4 bits (ql[64 h + p % 64] >> 4 (p / 64)) & 15,
// high 2 bits (qh[32 h + p % 32] >> 2 (p / 32)) & 3.
struct block_q6_K {
    uint8_t ql[QK_K / 2];
    uint8_t qh[QK_K / 4];
    int8_t scales[QK_K / 16];
    uint8_t d[2];
};

static_assert(sizeof(block_q4_0) == 18, "q4_0 layout");
static_assert(sizeof(block_q4_1) == 20, "q4_1 layout");
static_assert(sizeof(block_q5_0) == 22, "q5_0 layout");
static_assert(sizeof(block_q5_1) == 24, "q5_1 layout");
static_assert(sizeof(block_q8_0) == 34, "q8_0 layout");
static_assert(sizeof(block_q2_K) == 84, "q2_K layout");
static_assert(sizeof(block_q3_K) == 110, "q3_K layout");
static_assert(sizeof(block_q4_K) == 144, "q4_K layout");
static_assert(sizeof(block_q5_K) == 176, "q5_K layout");
static_assert(sizeof(block_q6_K) == 210, "q6_K layout");

// ---- scalar helpers -------------------------------------------------------------------------

inline uint16_t load_u16(const uint8_t* p) {
    uint16_t v;
    std::memcpy(&v, p, 2);
    return v;
}
inline uint32_t load_u32(const uint8_t* p) {
    uint32_t v;
    std::memcpy(&v, p, 4);
    return v;
}

inline float bits_to_f32(uint32_t b) {
    float f;
    std::memcpy(&f, &b, 4);
    return f;
}

// IEEE half -> float, exact for every input (subnormals, inf, NaN) without F16C.
inline float fp16_to_f32_portable(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    if (exp == 0x1f) return bits_to_f32(sign | 0x7f800000u | (man << 13));  // inf / NaN
    if (exp == 0) {
        if (man == 0) return bits_to_f32(sign);
        // Subnormal half: normalise the mantissa into a float exponent.
        exp = 127 - 15 + 1;
        while ((man & 0x400u) == 0) {
            man <<= 1;
            --exp;
        }
        man &= 0x3ffu;
        return bits_to_f32(sign | (exp << 23) | (man << 13));
    }
    return bits_to_f32(sign | ((exp + 127 - 15) << 23) | (man << 13));
}

inline float fp16_to_f32(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    return fp16_to_f32_portable(h);
#endif
}

inline float load_f16(const uint8_t* p) { return fp16_to_f32(load_u16(p)); }

inline float bf16_to_f32(uint16_t h) { return bits_to_f32(static_cast<uint32_t>(h) << 16); }

// Q4_K / Q5_K: unpack the 12 scale bytes into 8 six-bit scales and 8 six-bit mins.
//   bytes 0-3: sc[0..3] low 6 bits, top 2 bits = sc[4..7] bits 4-5
//   bytes 4-7: m[0..3] low 6 bits,  top 2 bits = m[4..7] bits 4-5
//   bytes 8-11: low nibble = sc[4..7] bits 0-3, high nibble = m[4..7] bits 0-3
// Done on 32-bit words, four sub-blocks at a time.
inline void unpack_scale_min_k4(const uint8_t* s, uint8_t sc[8], uint8_t mn[8]) {
    const uint32_t a = load_u32(s), b = load_u32(s + 4), c = load_u32(s + 8);
    const uint32_t sc_lo = a & 0x3f3f3f3fu;
    const uint32_t mn_lo = b & 0x3f3f3f3fu;
    const uint32_t sc_hi = (c & 0x0f0f0f0fu) | (((a >> 6) & 0x03030303u) << 4);
    const uint32_t mn_hi = ((c >> 4) & 0x0f0f0f0fu) | (((b >> 6) & 0x03030303u) << 4);
    std::memcpy(sc, &sc_lo, 4);
    std::memcpy(sc + 4, &sc_hi, 4);
    std::memcpy(mn, &mn_lo, 4);
    std::memcpy(mn + 4, &mn_hi, 4);
}

// Q3_K: unpack the 12 scale bytes into 16 signed scales (6-bit value - 32).
//   scale i: low 4 bits = (s[i % 8] >> 4 (i / 8)) & 15, high 2 bits = (s[8 + i % 4] >> 2 (i / 4)) & 3
inline void unpack_scales_q3_K(const uint8_t* s, int8_t out[16]) {
    const uint32_t a0 = load_u32(s), a1 = load_u32(s + 4), a2 = load_u32(s + 8);
    const uint32_t m4 = 0x0f0f0f0fu, m2 = 0x03030303u;
    uint32_t w[4];
    w[0] = (a0 & m4) | ((a2 & m2) << 4);
    w[1] = (a1 & m4) | (((a2 >> 2) & m2) << 4);
    w[2] = ((a0 >> 4) & m4) | (((a2 >> 4) & m2) << 4);
    w[3] = ((a1 >> 4) & m4) | (((a2 >> 6) & m2) << 4);
    uint8_t u[16];
    std::memcpy(u, w, 16);
    for (int i = 0; i < 16; ++i) out[i] = static_cast<int8_t>(static_cast<int>(u[i]) - 32);
}

}  // namespace hl
