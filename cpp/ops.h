// Element-wise numerics of llama.cpp's CPU path shared by the block (block.cpp) and the attention
// (attention*.cpp): float16 rounding, ggml_v_expf in the two x86 variants ggml has, and SIMD
// traits (Isa16: AVX-512, Isa8: AVX2 + FMA + F16C) that let one kernel template serve both
// vector widths with each ISA's own rounding and reduction order.
//
// ggml_v_expf (ggml-cpu/vec.h) is written twice, and the two do not round alike:
//   AVX-512:  j = poly(b) + 1 (an FMA), result = scalef(j, n)           (exact power-of-two scale)
//   AVX2:     j = poly(b) without the 1, k = 2^n from z's bits, result = fma(j, k, k)
// so every exp here takes `avx2` (lanes == 8) to pick its variant. Outside |n| <= 126 the AVX2
// version rescales in two steps (s1, s2) and the AVX-512 one relies on scalef up to |n| = 192.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "quants.h"

#if defined(__F16C__) || defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace hl {

// ---- float16 -------------------------------------------------------------------------------

// float -> IEEE half bits, round to nearest even (numpy's astype(float16)).
inline uint16_t f32_to_f16_portable(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000u;
    const uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u | ((ax >> 13) & 0x3ffu));
    if (ax >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520: inf
    if (ax < 0x38800000u) {  // below 2^-14: a multiple of 2^-24 (subnormal half) or zero
        float a;
        std::memcpy(&a, &ax, 4);
        return static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(a * 16777216.0f)));
    }
    const uint32_t r = ax + 0xfffu + ((ax >> 13) & 1u) - 0x38000000u;  // RNE, exponent 127 -> 15
    return static_cast<uint16_t>(sign | (r >> 13));
}

inline uint16_t f32_to_f16(float f) {
#if defined(__F16C__)
    return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
    return f32_to_f16_portable(f);
#endif
}

inline float round_f16(float f) { return fp16_to_f32(f32_to_f16(f)); }

inline void to_f16_row(const float* src, uint16_t* dst, int64_t n) {
    int64_t i = 0;
#if defined(__F16C__)
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
#endif
    for (; i < n; ++i) dst[i] = f32_to_f16(src[i]);
}

inline void from_f16_row(const uint16_t* src, float* dst, int64_t n) {
    int64_t i = 0;
#if defined(__F16C__)
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
#endif
    for (; i < n; ++i) dst[i] = fp16_to_f32(src[i]);
}

// x rounded to float16 precision in place (Q before the f16 Q.K product).
inline void round_f16_row(float* x, int64_t n) {
    int64_t i = 0;
#if defined(__F16C__)
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(x + i, _mm256_cvtph_ps(_mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT)));
#endif
    for (; i < n; ++i) x[i] = round_f16(x[i]);
}

// ---- ggml_v_expf, one lane -----------------------------------------------------------------

constexpr float kLog2e = 0x1.715476p+0f, kLn2Hi = 0x1.62e4p-1f, kLn2Lo = 0x1.7f7d1cp-20f;
constexpr float kE0 = 0x1.0e4020p-7f, kE1 = 0x1.573e2ep-5f, kE2 = 0x1.555e66p-3f,
                kE3 = 0x1.fffdb6p-2f, kE4 = 0x1.ffffecp-1f;
constexpr float kShift = 0x1.8p23f;  // adding it rounds to an integer

inline uint32_t f32_bits(float f) {
    uint32_t b;
    std::memcpy(&b, &f, 4);
    return b;
}

// The AVX-512 variant (ggml-cpu/vec.h, __AVX512F__ && __AVX512DQ__) for one lane.
inline float v_expf_avx512(float x) {
    const float z = std::fma(x, kLog2e, kShift);
    const float n = z - kShift;
    const float b = std::fma(-n, kLn2Lo, std::fma(-n, kLn2Hi, x));
    const float u = b * b;
    const float j = std::fma(std::fma(std::fma(kE0, b, kE1), u, std::fma(kE2, b, kE3)), u,
                             std::fma(kE4, b, 1.0f));
    if (n != n) return n;
    if (std::fabs(n) > 192.0f) return n <= 0.0f ? 0.0f : std::numeric_limits<float>::infinity();
    return std::ldexp(j, static_cast<int>(n));  // scalef: j * 2^n rounded once
}

// The AVX2 variant (ggml-cpu/vec.h, __AVX2__ && __FMA__) for one lane, integer ops included.
inline float v_expf_avx2(float x) {
    const float z = std::fma(x, kLog2e, kShift);
    const float n = z - kShift;
    const float b = std::fma(-n, kLn2Lo, std::fma(-n, kLn2Hi, x));
    const uint32_t e = f32_bits(z) << 23;
    const float k = bits_to_f32(e + 0x3f800000u);  // 2^n for |n| <= 126
    const float u = b * b;
    const float j = std::fma(std::fma(std::fma(kE0, b, kE1), u, std::fma(kE2, b, kE3)), u, kE4 * b);
    if (!(std::fabs(n) > 126.0f)) return std::fma(j, k, k);
    const uint32_t g = n <= 0.0f ? 0x82000000u : 0u;
    const float s1 = bits_to_f32(g + 0x7f000000u), s2 = bits_to_f32(e - g);
    if (std::fabs(n) > 192.0f) return s1 * s1;
    return std::fma(s2, j, s2) * s1;
}

inline float v_expf(float x, bool avx2) { return avx2 ? v_expf_avx2(x) : v_expf_avx512(x); }

// ---- SIMD traits ---------------------------------------------------------------------------
// Each gives: V (a vector of L floats), loads of floats and halves, FMA, the lane-wise ops the
// kernels use, hsum (halving: tinyBLAS's hsum, _mm512_reduce_add_ps, the softmax chunk sums),
// vec_fold (ggml_vec_dot_f16's reduction of one vector: halving on AVX-512, on AVX2 128-bit
// halves then two hadds), expf (ggml_v_expf of that ISA), round_h (through float16 and back).

#if defined(__AVX512F__)
struct Isa16 {
    using V = __m512;
    static constexpr int L = 16;
    static V zero() { return _mm512_setzero_ps(); }
    static V set1(float x) { return _mm512_set1_ps(x); }
    static V load(const float* p) { return _mm512_loadu_ps(p); }
    static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
    static V load_h(const uint16_t* p) {
        return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    }
    static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
    static V add(V a, V b) { return _mm512_add_ps(a, b); }
    static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
    static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
    static V div(V a, V b) { return _mm512_div_ps(a, b); }
    static V max(V a, V b) { return _mm512_max_ps(a, b); }
    static float hmax(V v) { return _mm512_reduce_max_ps(v); }
    static V round_h(V v) { return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT)); }
    static float hsum(V v) {  // (i + i+8), (i + i+4), ...
        const __m256 lo = _mm512_castps512_ps256(v);
        const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
        const __m256 s8 = _mm256_add_ps(hi, lo);
        const __m128 s4 = _mm_add_ps(_mm256_extractf128_ps(s8, 1), _mm256_castps256_ps128(s8));
        const __m128 s2 = _mm_add_ps(_mm_movehl_ps(s4, s4), s4);
        return _mm_cvtss_f32(_mm_add_ss(_mm_movehdup_ps(s2), s2));
    }
    static float vec_fold(V v) { return hsum(v); }
    static V expf(V x) {
        const V shift = set1(kShift);
        const V z = fma(x, set1(kLog2e), shift);
        const V n = sub(z, shift);
        const V b = _mm512_fnmadd_ps(n, set1(kLn2Lo), _mm512_fnmadd_ps(n, set1(kLn2Hi), x));
        const __mmask16 d = _mm512_cmp_ps_mask(_mm512_abs_ps(n), set1(192.0f), _CMP_GT_OQ);
        const V u = mul(b, b);
        const V j = fma(fma(fma(set1(kE0), b, set1(kE1)), u, fma(set1(kE2), b, set1(kE3))), u,
                        fma(set1(kE4), b, set1(1.0f)));
        const V res = _mm512_scalef_ps(j, n);
        if (d == 0) return res;
        const V alt = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(n, zero(), _CMP_LE_OQ),
                                           set1(std::numeric_limits<float>::infinity()), zero());
        return _mm512_mask_blend_ps(d, res, alt);
    }
};
#endif

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
struct Isa8 {
    using V = __m256;
    static constexpr int L = 8;
    static V zero() { return _mm256_setzero_ps(); }
    static V set1(float x) { return _mm256_set1_ps(x); }
    static V load(const float* p) { return _mm256_loadu_ps(p); }
    static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
    static V load_h(const uint16_t* p) {
        return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    }
    static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
    static V add(V a, V b) { return _mm256_add_ps(a, b); }
    static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
    static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
    static V div(V a, V b) { return _mm256_div_ps(a, b); }
    static V max(V a, V b) { return _mm256_max_ps(a, b); }
    static float hmax(V v) {
        __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
    }
    static V round_h(V v) { return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT)); }
    static float hsum(V v) {  // (i + i+4), (i + i+2), (0 + 1)
        __m128 s = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
        s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
    }
    static float vec_fold(V v) {  // GGML_F32x8_REDUCE's tail: halves, then hadd twice
        const __m128 t0 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        const __m128 t1 = _mm_hadd_ps(t0, t0);
        return _mm_cvtss_f32(_mm_hadd_ps(t1, t1));
    }
    static V expf(V x) {
        const V r = set1(kShift);
        const V z = fma(x, set1(kLog2e), r);
        const V n = sub(z, r);
        const V b = _mm256_fnmadd_ps(n, set1(kLn2Lo), _mm256_fnmadd_ps(n, set1(kLn2Hi), x));
        const __m256i e = _mm256_slli_epi32(_mm256_castps_si256(z), 23);
        const V k = _mm256_castsi256_ps(_mm256_add_epi32(e, _mm256_castps_si256(set1(1.0f))));
        const __m256i c = _mm256_castps_si256(_mm256_cmp_ps(_mm256_andnot_ps(set1(-0.0f), n), set1(126.0f), _CMP_GT_OQ));
        const V u = mul(b, b);
        const V j = fma(fma(fma(set1(kE0), b, set1(kE1)), u, fma(set1(kE2), b, set1(kE3))), u, mul(set1(kE4), b));
        if (!_mm256_movemask_ps(_mm256_castsi256_ps(c))) return fma(j, k, k);
        const __m256i g = _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(n, zero(), _CMP_LE_OQ)),
                                           _mm256_set1_epi32(static_cast<int>(0x82000000u)));
        const V s1 = _mm256_castsi256_ps(_mm256_add_epi32(g, _mm256_set1_epi32(0x7f000000)));
        const V s2 = _mm256_castsi256_ps(_mm256_sub_epi32(e, g));
        const __m256i d = _mm256_castps_si256(_mm256_cmp_ps(_mm256_andnot_ps(set1(-0.0f), n), set1(192.0f), _CMP_GT_OQ));
        return _mm256_or_ps(
            _mm256_and_ps(_mm256_castsi256_ps(d), mul(s1, s1)),
            _mm256_andnot_ps(_mm256_castsi256_ps(d),
                             _mm256_or_ps(_mm256_and_ps(_mm256_castsi256_ps(c), mul(fma(s2, j, s2), s1)),
                                          _mm256_andnot_ps(_mm256_castsi256_ps(c), fma(k, j, k)))));
    }
};
#endif

}  // namespace hl
