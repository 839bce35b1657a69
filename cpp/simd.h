// Small AVX2 helpers shared by the SIMD kernels (only included where __AVX2__ is defined).
#pragma once

#if defined(__AVX2__)
#include <immintrin.h>

#include <cstdint>

namespace hl {

#define HL_INLINE inline __attribute__((always_inline))

HL_INLINE float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

HL_INLINE __m256i loadu256(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
HL_INLINE __m128i loadu128(const void* p) { return _mm_loadu_si128(static_cast<const __m128i*>(p)); }

// Sum of products of unsigned bytes u with signed bytes s, four adjacent pairs per int32 lane
// (8 lanes). With AVX512-VNNI this is one vpdpbusd; otherwise maddubs (int16 pairs; callers
// keep |u * s| pairs below 32767) and madd by ones.
HL_INLINE __m256i dot_u8s8(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

// acc + dot_u8s8(u, s), fused when VNNI is there.
HL_INLINE __m256i dot_u8s8_acc(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(acc, u, s);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

// acc + sum over 32 elements of u * s * scale (8 int32 lanes), where int16 lane k of `scale`
// applies to elements 2k and 2k + 1 (the maddubs pairs). With AVX512-VNNI the scaling and the
// accumulation are one vpdpwssd.
HL_INLINE __m256i dot_u8s8_scaled_acc(__m256i acc, __m256i u, __m256i s, __m256i scale16) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpwssd_epi32(acc, _mm256_maddubs_epi16(u, s), scale16);
#elif defined(__AVXVNNI__)
    return _mm256_dpwssd_avx_epi32(acc, _mm256_maddubs_epi16(u, s), scale16);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), scale16));
#endif
}

}  // namespace hl

#endif  // __AVX2__
