// AVX2 row kernels. Each kernel dots one weight row with NA activation rows; the weight block is
// decoded once into registers and reused for the NA rows (prompt processing is compute-bound, so
// the decode cost is shared), while NA = 1 is the memory-bound matvec.
//
// Integer products: weights enter maddubs / vpdpbusd as the unsigned operand. Q8_0 (signed int8)
// uses |w| with sign(w) moved onto the activation; every other format uses its unsigned codes and
// folds the code offset (Q4_0's -8, Q6_K's -32, ...) or the min into a correction computed from the
// activation block sums. Without VNNI, maddubs sums pairs in int16: |code| * 127 * 2 must stay
// below 32767, which holds for codes up to 6 bits and for |w| <= 128.
//
// The base is AVX2 + FMA + F16C. Where the build targets them (-march=native), a few 256-bit
// AVX-512 / GFNI instructions replace short AVX2 sequences: vpdpbusd / vpdpwssd (AVX512-VNNI),
// byte-masked adds for the Q5 high bits (AVX512-BW), and one GF2 affine op for high nibbles.
// The matvec (NA = 1) is bound by instruction throughput as much as by memory on this class of
// machine (one core streams ~33 GB/s), so the kernels are written to minimise vector ops per byte.
#include <cstddef>

#include "quants.h"
#include "simd.h"
#include "vecdot.h"

namespace hl {

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)

namespace {

// Software prefetch distance (bytes ahead in the weight stream). Measured on the benchmark machine:
// +10% matvec for the 4/5-bit and K formats at 4 KiB (2 and 8 KiB do less); Q8_0 streams fastest
// on the hardware prefetcher alone, so its kernel does not prefetch.
#ifndef PF_DIST
#define PF_DIST 4096
#endif

// Prefetch the `bytes` at p + PF_DIST (the weight stream ahead of the block being decoded, running
// into the next rows at the end of a row): the hardware prefetcher alone leaves the matvec short of
// DRAM bandwidth. Prefetches never fault, so running past the tensor's end is harmless.
HL_INLINE void prefetch_ahead(const void* p, size_t bytes) {
    const char* c = static_cast<const char*>(p) + PF_DIST;
    for (size_t o = 0; o < bytes; o += 64) _mm_prefetch(c + o, _MM_HINT_T0);
}

// High nibbles of every byte (x >> 4 & 15): one GF2 affine op where GFNI exists.
HL_INLINE __m256i high_nibbles(__m256i v) {
#if defined(__GFNI__)
    // Bit matrix for y = x >> 4 in each byte (row i of the matrix is byte 7 - i).
    return _mm256_gf2p8affine_epi64_epi8(v, _mm256_set1_epi64x(0x1020408000000000ll), 0);
#else
    return _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(0x0f));
#endif
}

// [d * da, dmin * da] of a K block in lanes 0 and 1 (d and dmin are adjacent f16s at p).
HL_INLINE __m128 k_scales(const uint8_t* p, const float* da) {
    return _mm_mul_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<int>(load_u32(p)))), _mm_broadcast_ss(da));
}

// ---- Q8_0 (32-element blocks, ACT_Q8_32 activations) ----------------------------------------

// One Q8_0 block for NA rows: acc[i] += (dw * da_i) * (w . a_i). Signed weights: |w| goes in as
// the unsigned operand, sign(w) onto the activation.
template <int NA>
HL_INLINE void step_q8_0(const uint8_t* blk, int64_t b, const int8_t* const* aq,
                         const float* const* ad, __m256* acc) {
    const __m256i q = loadu256(blk + 2);
    const __m256i qabs = _mm256_sign_epi8(q, q);
    const __m256 dw = _mm256_set1_ps(load_f16(blk));
#pragma GCC unroll 8
    for (int i = 0; i < NA; ++i) {
        const __m256i p = dot_u8s8(qabs, _mm256_sign_epi8(loadu256(aq[i] + b * QK), q));
        const __m256 scale = _mm256_mul_ps(dw, _mm256_broadcast_ss(ad[i] + b));
        acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), scale, acc[i]);
    }
}

template <int NA>
void dot_q8_0(int64_t cols, const uint8_t* w, const QActs& a, int64_t a0, float* out, int64_t os) {
    constexpr size_t kB = sizeof(block_q8_0);
    const int64_t nb = cols / QK;
    const int8_t* aq[NA];
    const float* ad[NA];
    for (int i = 0; i < NA; ++i) {
        aq[i] = a.qs + (a0 + i) * cols;
        ad[i] = a.d + (a0 + i) * nb;
    }
    // One accumulator, blocks in order: ggml_vec_dot_q8_0_q8_0's AVX2 arithmetic (lane l = the
    // integer dot of elements 4l .. 4l + 3, acc = fma(dw * da, dot, acc), hsum_float_8), so with
    // the fp16-rounded activation scales the result is llama.cpp's vec_dot bit for bit.
    __m256 acc[NA];
    for (int i = 0; i < NA; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) step_q8_0<NA>(w + b * kB, b, aq, ad, acc);
    for (int i = 0; i < NA; ++i) out[i * os] = hsum_ps(acc[i]);
}

// ---- Q4_1 (ACT_Q8_1 activations), bit-exact with llama.cpp ------------------------------------
//
// ggml_vec_dot_q4_1_q8_1 (AVX2 / AVX512-VNNI build), per block: summs = fma(m, s, summs) (the
// compiler contracts `summs += m * s`); the block unpacks to low nibbles in bytes 0-15 and high
// nibbles in 16-31; lane l of the integer dot sums elements 4l .. 4l + 3; acc = fma(d * da, dot,
// acc). Result hsum_float_8(acc) + summs. One accumulator in block order: no reassociation.
template <int NA>
void dot_q4_1_exact(int64_t cols, const uint8_t* w, const QActs& a, int64_t a0, float* out,
                    int64_t os) {
    constexpr size_t kB = sizeof(block_q4_1);
    const int64_t nb = cols / QK;
    const int8_t* aq[NA];
    const float *ad[NA], *as[NA];
    for (int i = 0; i < NA; ++i) {
        aq[i] = a.qs + (a0 + i) * cols;
        ad[i] = a.d + (a0 + i) * nb;
        as[i] = a.s + (a0 + i) * nb;
    }
    __m256 acc[NA];
    float summs[NA];
    for (int i = 0; i < NA; ++i) {
        acc[i] = _mm256_setzero_ps();
        summs[i] = 0.0f;
    }
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* blk = w + b * kB;
        if ((b & 15) == 0) prefetch_ahead(blk, 16 * kB);
        const float d0 = load_f16(blk), m0 = load_f16(blk + 2);
        const __m128i raw = loadu128(blk + 4);
        const __m256i qx = _mm256_and_si256(
            _mm256_inserti128_si256(_mm256_castsi128_si256(raw), _mm_srli_epi16(raw, 4), 1), m4);
        for (int i = 0; i < NA; ++i) {
            summs[i] = __builtin_fmaf(m0, as[i][b], summs[i]);
            const __m256 d0d1 = _mm256_set1_ps(d0 * ad[i][b]);
            const __m256i p = dot_u8s8(qx, loadu256(aq[i] + b * QK));
            acc[i] = _mm256_fmadd_ps(d0d1, _mm256_cvtepi32_ps(p), acc[i]);
        }
    }
    for (int i = 0; i < NA; ++i) out[i * os] = hsum_ps(acc[i]) + summs[i];
}


// ---- Q4_0 Q4_1 Q5_0 Q5_1 (pairs of 32-blocks, ACT_Q8_32P activations) --------------------------
//
// All four are treated as value = d * q + m with unsigned codes q: Q4_1 / Q5_1 store m, and
// Q4_0 / Q5_0 have m = -8 d / -16 d. Per block and activation row (a = da * qa):
//     sum_j value_j a_j = (d da) (q . qa) + m (da sum(qa)) = (d da) isum + m s
// Two weight blocks A, B unpack into lo = [A 0-15 | B 0-15] and hi = [A 16-31 | B 16-31],
// matching the paired activation codes, so each 256-bit op covers both blocks and the int32
// lanes 0-3 / 4-7 of a dot belong to A / B. The float scales are handled per group of 8 blocks:
// W = [d0 m0 d1 m1 ... d3 m3] (and blocks 4-7) times the activations' [da0 s0 da1 s1 ...] gives
// d da in the even lanes (broadcast per pair with one permute) and m s in the odd ones (summed
// into a separate accumulator).
// QS / QH: byte offsets of the nibbles and of the 32 high bits (-1: none) in a block; MIN: the
// block has an f16 min after d; OFF: the code offset of the formats without a min.
template <int QS, int QH, bool MIN, int OFF>
struct Pair {
    static constexpr size_t kBytes = QS + 16;

    // Codes of blocks A and B (B absent: zeros) as lo / hi registers.
    template <bool HAS_B>
    static HL_INLINE void codes(const uint8_t* A, const uint8_t* B, __m256i& lo, __m256i& hi) {
        const __m128i qa = loadu128(A + QS);
        const __m256i v = HAS_B ? _mm256_inserti128_si256(_mm256_castsi128_si256(qa), loadu128(B + QS), 1)
                                : _mm256_zextsi128_si256(qa);
        const __m256i m4 = _mm256_set1_epi8(0x0f);
        lo = _mm256_and_si256(v, m4);
        hi = high_nibbles(v);
        if constexpr (QH >= 0) {
            const uint32_t ha = load_u32(A + QH), hb = HAS_B ? load_u32(B + QH) : 0u;
#if defined(__AVX512BW__) && defined(__AVX512VL__)
            // Byte k of lo takes bit k of qhA (low lane) / qhB (high lane); hi takes bits 16-31.
            const __m256i five = _mm256_set1_epi8(0x10);
#if defined(__BMI2__)
            const uint64_t both = ha | uint64_t{hb} << 32;
            lo = _mm256_mask_add_epi8(lo, static_cast<__mmask32>(_pext_u64(both, 0x0000ffff0000ffffull)), lo, five);
            hi = _mm256_mask_add_epi8(hi, static_cast<__mmask32>(_pext_u64(both, 0xffff0000ffff0000ull)), hi, five);
#else
            lo = _mm256_mask_add_epi8(lo, (ha & 0xffffu) | (hb << 16), lo, five);
            hi = _mm256_mask_add_epi8(hi, (ha >> 16) | (hb & 0xffff0000u), hi, five);
#endif
#else
            // Spread the source bytes (qhA bytes 0-3, qhB bytes 4-7) and test one bit per byte.
            const __m256i spread =
                _mm256_set1_epi64x(static_cast<int64_t>(ha | uint64_t{hb} << 32));
            const __m256i sel = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ull));
            const __m256i five = _mm256_set1_epi8(0x10);
            const __m256i ilo = _mm256_setr_epi64x(0, 0x0101010101010101, 0x0404040404040404, 0x0505050505050505);
            const __m256i ihi = _mm256_setr_epi64x(0x0202020202020202, 0x0303030303030303,
                                                   0x0606060606060606, 0x0707070707070707);
            const __m256i hlo = _mm256_and_si256(_mm256_shuffle_epi8(spread, ilo), sel);
            const __m256i hhi = _mm256_and_si256(_mm256_shuffle_epi8(spread, ihi), sel);
            lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_cmpeq_epi8(hlo, sel), five));
            hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_cmpeq_epi8(hhi, sel), five));
#endif
        }
    }

    // Scale words of the 8 blocks of a group (n < 8 present): 32 bits at the start of each block,
    // i.e. d | m << 16 for the formats with a min; else d | d << 16 (the odd lanes then hold d
    // instead of m = -OFF d; the factor -OFF is applied once, to the final sum: see dot_pair).
    // Converted: lo = [d0 m0 d1 m1 d2 m2 d3 m3], hi = the same for blocks 4-7 (zeros past n).
    template <bool FULL>
    static HL_INLINE __m256 scales4(const uint8_t* b, int n) {
        __m128i v = _mm_cvtsi32_si128(static_cast<int>(load_u32(b)));
        if (FULL || n > 1) v = _mm_insert_epi32(v, static_cast<int>(load_u32(b + kBytes)), 1);
        if (FULL || n > 2) v = _mm_insert_epi32(v, static_cast<int>(load_u32(b + 2 * kBytes)), 2);
        if (FULL || n > 3) v = _mm_insert_epi32(v, static_cast<int>(load_u32(b + 3 * kBytes)), 3);
        if constexpr (!MIN)  // duplicate the low 16 bits (d) into the high ones
            v = _mm_shuffle_epi8(v, _mm_setr_epi8(0, 1, 0, 1, 4, 5, 4, 5, 8, 9, 8, 9, 12, 13, 12, 13));
        return _mm256_cvtph_ps(v);
    }
    template <bool FULL>
    static HL_INLINE void scales8(const uint8_t* b, int n, __m256& lo, __m256& hi) {
        lo = scales4<FULL>(b, n);
        hi = FULL || n > 4 ? scales4<FULL>(b + 4 * kBytes, n - 4) : _mm256_setzero_ps();
    }
    static constexpr float kMinFactor = MIN ? 1.0f : -static_cast<float>(OFF);
};

using PQ4_0 = Pair<2, -1, false, 8>;
using PQ4_1 = Pair<4, -1, true, 0>;
using PQ5_0 = Pair<6, 2, false, 16>;
using PQ5_1 = Pair<8, 4, true, 0>;

// One group of 8 blocks (n of them present) for NA activation rows.
template <class P, int NA, bool FULL>
HL_INLINE void group_step(const uint8_t* w, int64_t g, int n, const int8_t* const* aq,
                          const float* const* ads, __m256 (*acc)[2], __m256* accm) {
    __m256 w0, w1;
    P::template scales8<FULL>(w, n, w0, w1);
    __m256 p0[NA], p1[NA];
    for (int i = 0; i < NA; ++i) {
        p0[i] = _mm256_mul_ps(w0, _mm256_loadu_ps(ads[i] + 16 * g));
        p1[i] = _mm256_mul_ps(w1, _mm256_loadu_ps(ads[i] + 16 * g + 8));
        accm[i] = _mm256_add_ps(accm[i], _mm256_add_ps(p0[i], p1[i]));  // odd lanes: m s
    }
#pragma GCC unroll 4
    for (int p = 0; p < 4; ++p) {
        if (!FULL && 2 * p >= n) break;
        const uint8_t* A = w + 2 * p * P::kBytes;
        __m256i lo, hi;
        if (FULL || 2 * p + 1 < n)
            P::template codes<true>(A, A + P::kBytes, lo, hi);
        else
            P::template codes<false>(A, A, lo, hi);
        // Lanes 0-3 = d da of block 2p, 4-7 = of block 2p + 1 (even lanes of the group's product).
        const __m256i idx = (p % 2) ? _mm256_setr_epi32(4, 4, 4, 4, 6, 6, 6, 6)
                                    : _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2);
        for (int i = 0; i < NA; ++i) {
            const int8_t* q = aq[i] + 256 * g + 64 * p;
            const __m256i isum = dot_u8s8_acc(dot_u8s8(lo, loadu256(q)), hi, loadu256(q + 32));
            const __m256 dd = _mm256_permutevar8x32_ps(p < 2 ? p0[i] : p1[i], idx);
            acc[i][p % 2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), dd, acc[i][p % 2]);
        }
    }
}

template <class P, int NA>
void dot_pair(int64_t cols, const uint8_t* w, const QActs& a, int64_t a0, float* out, int64_t os) {
    constexpr size_t kB = P::kBytes;
    const int64_t nb = cols / QK, ng = q8p_groups(cols), full = nb / 8;
    const int8_t* aq[NA];
    const float* ads[NA];
    for (int i = 0; i < NA; ++i) {
        aq[i] = a.qs + (a0 + i) * ng * 256;
        ads[i] = a.d + (a0 + i) * ng * 16;
    }
    __m256 acc[NA][2], accm[NA];
    for (int i = 0; i < NA; ++i) acc[i][0] = acc[i][1] = accm[i] = _mm256_setzero_ps();
    for (int64_t g = 0; g < full; ++g) {
        prefetch_ahead(w + 8 * g * kB, 8 * kB);
        group_step<P, NA, true>(w + 8 * g * kB, g, 8, aq, ads, acc, accm);
    }
    if (full < ng) group_step<P, NA, false>(w + 8 * full * kB, full, static_cast<int>(nb - 8 * full), aq, ads, acc, accm);
    const __m256 odd = _mm256_castsi256_ps(_mm256_setr_epi32(0, -1, 0, -1, 0, -1, 0, -1));
    for (int i = 0; i < NA; ++i) {
        const float m = P::kMinFactor * hsum_ps(_mm256_and_ps(accm[i], odd));
        out[i * os] = hsum_ps(_mm256_add_ps(acc[i][0], acc[i][1])) + m;
    }
}

// ---- K-quants (256-element super-blocks, ACT_Q8_K activations) -------------------------------

// Q4_K / Q5_K scales in SIMD (same unpacking as unpack_scale_min_k4 in quants.h, on the three
// 32-bit words a, b, c of the 12 bytes): returns bytes 0-7 = sc[0..7], bytes 8-15 = m[0..7].
// Reads 16 bytes from s; the 4 past the scales are inside the block (qh / qs follow).
HL_INLINE __m128i scale_min_k4(const uint8_t* s) {
    const __m128i v = loadu128(s);                                               // a b c -
    const __m128i low6 = _mm_and_si128(v, _mm_set1_epi32(0x3f3f3f3f));            // sc0-3 m0-3
    const __m128i c = _mm_srlv_epi32(_mm_shuffle_epi32(v, 0xaa), _mm_setr_epi32(0, 4, 0, 0));
    const __m128i top = _mm_and_si128(_mm_srli_epi32(v, 2), _mm_set1_epi32(0x30303030));  // a, b bits 6-7 -> 4-5
    const __m128i hi = _mm_or_si128(_mm_and_si128(c, _mm_set1_epi32(0x0f0f0f0f)), top);  // sc4-7 m4-7
    return _mm_unpacklo_epi32(low6, hi);
}

// Q3_K scales in SIMD (as unpack_scales_q3_K): 16 signed bytes. Reads exactly the 12 bytes.
HL_INLINE __m128i scales_q3_K(const uint8_t* s) {
    const __m128i v = _mm_insert_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(s)),
                                       static_cast<int>(load_u32(s + 8)), 2);  // a0 a1 a2 -
    const __m128i lo = _mm_and_si128(_mm_srlv_epi32(_mm_shuffle_epi32(v, 0x44), _mm_setr_epi32(0, 0, 4, 4)),
                                     _mm_set1_epi32(0x0f0f0f0f));             // a0 a1 a0>>4 a1>>4
    const __m128i hi = _mm_and_si128(_mm_srlv_epi32(_mm_shuffle_epi32(v, 0xaa), _mm_setr_epi32(0, 2, 4, 6)),
                                     _mm_set1_epi32(0x03030303));             // a2 >> 0, 2, 4, 6
    return _mm_sub_epi8(_mm_or_si128(lo, _mm_slli_epi32(hi, 4)), _mm_set1_epi8(32));
}

// Scale vector for a 32-element chunk covering 16-groups g and g + 1: int16 lanes 0-7 = sc[g],
// lanes 8-15 = sc[g + 1]; `sc8` holds the 16 signed byte scales.
HL_INLINE __m256i chunk_scales(__m128i sc8, int g) {
    const __m128i idx = _mm_set_epi64x(0x0101010101010101ll * (g + 1), 0x0101010101010101ll * g);
    return _mm256_cvtepi8_epi16(_mm_shuffle_epi8(sc8, idx));
}

// Scale vector with all 16 lanes = sc16[j] (sc16: 8 int16 scales broadcast to both halves).
HL_INLINE __m256i lane_scale(__m256i sc16, int j) {
    return _mm256_shuffle_epi8(sc16, _mm256_set1_epi16(static_cast<int16_t>((2 * j + 1) << 8 | 2 * j)));
}

struct KRows {  // one activation row of ACT_Q8_K
    const int8_t* aq;
    const float* ad;
    const int16_t* bs;
};

template <int NA>
HL_INLINE void k_rows(const QActs& a, int64_t a0, int64_t cols, KRows* r) {
    for (int i = 0; i < NA; ++i) {
        r[i].aq = a.qs + (a0 + i) * cols;
        r[i].ad = a.d + (a0 + i) * (cols / QK_K);
        r[i].bs = a.bsums + (a0 + i) * (cols / 16);
    }
}

// Q4_K: value = d * sc[j] * q - dmin * m[j] per 32-group j.
//   sum = d * da * sum_j sc[j] * (q . a)_j  -  dmin * da * sum_j m[j] * (bsum[2j] + bsum[2j+1])
template <int NA>
void dot_q4_K(int64_t cols, const uint8_t* w, const QActs& a, int64_t a0, float* out, int64_t os) {
    KRows r[NA];
    k_rows<NA>(a, a0, cols, r);
    const int64_t nb = cols / QK_K;
    __m256 acc[NA], accm[NA];
    for (int i = 0; i < NA; ++i) acc[i] = accm[i] = _mm256_setzero_ps();
    const __m256i low4 = _mm256_set1_epi8(0x0f);
    for (int64_t b = 0; b < nb; ++b) {
        const auto* x = reinterpret_cast<const block_q4_K*>(w) + b;
        prefetch_ahead(x, sizeof(*x));
        const __m128i scmn = scale_min_k4(x->scales);  // bytes 0-7: sc[j], 8-15: m[j]
        const __m256i sc16 = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(scmn));
        const __m256i mn16 = _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(scmn, scmn));  // m[j] per 16-group
        // Two integer accumulators per row (even / odd sub-blocks) halve the dependency chain.
        __m256i isum[NA][2];
        __m128 dd[NA];
        for (int i = 0; i < NA; ++i) {
            dd[i] = k_scales(x->d, r[i].ad + b);  // d da, dmin da
            const __m256i pm = _mm256_madd_epi16(loadu256(r[i].bs + b * 16), mn16);
            accm[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pm), _mm256_permutevar8x32_ps(_mm256_castps128_ps256(dd[i]), _mm256_set1_epi32(1)), accm[i]);
            isum[i][0] = isum[i][1] = _mm256_setzero_si256();
        }
#pragma GCC unroll 4
        for (int c = 0; c < 4; ++c) {
            const __m256i v = loadu256(x->qs + 32 * c);
            const __m256i lo = _mm256_and_si256(v, low4);
            const __m256i hi = high_nibbles(v);
            const __m256i s_lo = lane_scale(sc16, 2 * c), s_hi = lane_scale(sc16, 2 * c + 1);
            for (int i = 0; i < NA; ++i) {
                const int8_t* q8 = r[i].aq + b * QK_K + 64 * c;
                isum[i][0] = dot_u8s8_scaled_acc(isum[i][0], lo, loadu256(q8), s_lo);
                isum[i][1] = dot_u8s8_scaled_acc(isum[i][1], hi, loadu256(q8 + 32), s_hi);
            }
        }
        for (int i = 0; i < NA; ++i)
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(isum[i][0], isum[i][1])),
                                     _mm256_broadcastss_ps(dd[i]), acc[i]);
    }
    for (int i = 0; i < NA; ++i) out[i * os] = hsum_ps(acc[i]) - hsum_ps(accm[i]);
}

// Bit j of every byte of hv, moved to bit 4 (the fifth bit of a Q5_K code).
HL_INLINE __m256i hbit4(__m256i hv, int j) {
    const __m256i t = j <= 4 ? _mm256_slli_epi16(hv, 4 - j) : _mm256_srli_epi16(hv, j - 4);
    return _mm256_and_si256(t, _mm256_set1_epi8(0x10));
}

// Q5_K: as Q4_K with q = nibble | hbit << 4.
template <int NA>
void dot_q5_K(int64_t cols, const uint8_t* w, const QActs& a, int64_t a0, float* out, int64_t os) {
    KRows r[NA];
    k_rows<NA>(a, a0, cols, r);
    const int64_t nb = cols / QK_K;
    __m256 acc[NA], accm[NA];
    for (int i = 0; i < NA; ++i) acc[i] = accm[i] = _mm256_setzero_ps();
    const __m256i low4 = _mm256_set1_epi8(0x0f);
    for (int64_t b = 0; b < nb; ++b) {
        const auto* x = reinterpret_cast<const block_q5_K*>(w) + b;
        prefetch_ahead(x, sizeof(*x));
        const __m128i scmn = scale_min_k4(x->scales);  // bytes 0-7: sc[j], 8-15: m[j]
        const __m256i sc16 = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(scmn));
        const __m256i mn16 = _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(scmn, scmn));  // m[j] per 16-group
        // Two integer accumulators per row (even / odd sub-blocks) halve the dependency chain.
        __m256i isum[NA][2];
        __m128 dd[NA];
        for (int i = 0; i < NA; ++i) {
            dd[i] = k_scales(x->d, r[i].ad + b);  // d da, dmin da
            const __m256i pm = _mm256_madd_epi16(loadu256(r[i].bs + b * 16), mn16);
            accm[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pm), _mm256_permutevar8x32_ps(_mm256_castps128_ps256(dd[i]), _mm256_set1_epi32(1)), accm[i]);
            isum[i][0] = isum[i][1] = _mm256_setzero_si256();
        }
        const __m256i hv = loadu256(x->qh);
#pragma GCC unroll 4
        for (int c = 0; c < 4; ++c) {
            const __m256i v = loadu256(x->qs + 32 * c);
            const __m256i lo = _mm256_or_si256(_mm256_and_si256(v, low4), hbit4(hv, 2 * c));
            const __m256i hi =
                _mm256_or_si256(high_nibbles(v), hbit4(hv, 2 * c + 1));
            const __m256i s_lo = lane_scale(sc16, 2 * c), s_hi = lane_scale(sc16, 2 * c + 1);
            for (int i = 0; i < NA; ++i) {
                const int8_t* q8 = r[i].aq + b * QK_K + 64 * c;
                isum[i][0] = dot_u8s8_scaled_acc(isum[i][0], lo, loadu256(q8), s_lo);
                isum[i][1] = dot_u8s8_scaled_acc(isum[i][1], hi, loadu256(q8 + 32), s_hi);
            }
        }
        for (int i = 0; i < NA; ++i)
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(isum[i][0], isum[i][1])),
                                     _mm256_broadcastss_ps(dd[i]), acc[i]);
    }
    for (int i = 0; i < NA; ++i) out[i * os] = hsum_ps(acc[i]) - hsum_ps(accm[i]);
}

// Q6_K: value = d * sc[g] * (u - 32), u 6-bit, per 16-group g; the -32 folds into the integer sum
// as -32 * sum_g sc[g] * bsum[g].
template <int NA>
void dot_q6_K(int64_t cols, const uint8_t* w, const QActs& a, int64_t a0, float* out, int64_t os) {
    KRows r[NA];
    k_rows<NA>(a, a0, cols, r);
    const int64_t nb = cols / QK_K;
    __m256 acc[NA];
    for (int i = 0; i < NA; ++i) acc[i] = _mm256_setzero_ps();
    const __m256i low4 = _mm256_set1_epi8(0x0f), bits45 = _mm256_set1_epi8(0x30);
    for (int64_t b = 0; b < nb; ++b) {
        const auto* x = reinterpret_cast<const block_q6_K*>(w) + b;
        prefetch_ahead(x, sizeof(*x));
        const float d = load_f16(x->d);
        const __m128i sc8 = loadu128(x->scales);
        const __m256i scall = _mm256_cvtepi8_epi16(sc8);  // lane g = sc[g]
        __m256i isum[NA][2];  // even / odd chunks: two shorter dependency chains
        for (int i = 0; i < NA; ++i) {
            const __m256i corr = _mm256_madd_epi16(loadu256(r[i].bs + b * 16), scall);
            isum[i][1] = _mm256_setzero_si256();
            isum[i][0] = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(corr, 5));
        }
#pragma GCC unroll 2
        for (int h = 0; h < 2; ++h) {
            const __m256i l0 = loadu256(x->ql + 64 * h), l1 = loadu256(x->ql + 64 * h + 32);
            const __m256i qh = loadu256(x->qh + 32 * h);
            __m256i u[4];
            u[0] = _mm256_or_si256(_mm256_and_si256(l0, low4), _mm256_and_si256(_mm256_slli_epi16(qh, 4), bits45));
            u[1] = _mm256_or_si256(_mm256_and_si256(l1, low4), _mm256_and_si256(_mm256_slli_epi16(qh, 2), bits45));
            u[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), low4), _mm256_and_si256(qh, bits45));
            u[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), low4),
                                   _mm256_and_si256(_mm256_srli_epi16(qh, 2), bits45));
#pragma GCC unroll 4
            for (int s = 0; s < 4; ++s) {
                const __m256i sv = chunk_scales(sc8, 8 * h + 2 * s);
                for (int i = 0; i < NA; ++i) {
                    const __m256i a8 = loadu256(r[i].aq + b * QK_K + 128 * h + 32 * s);
                    isum[i][s % 2] = dot_u8s8_scaled_acc(isum[i][s % 2], u[s], a8, sv);
                }
            }
        }
        for (int i = 0; i < NA; ++i)
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(isum[i][0], isum[i][1])), _mm256_set1_ps(d * r[i].ad[b]), acc[i]);
    }
    for (int i = 0; i < NA; ++i) out[i * os] = hsum_ps(acc[i]);
}

// Q3_K: value = d * sc[g] * (u - 4), u = q2 | hbit << 2 (0..7); -4 folds like Q6_K's -32.
template <int NA>
void dot_q3_K(int64_t cols, const uint8_t* w, const QActs& a, int64_t a0, float* out, int64_t os) {
    KRows r[NA];
    k_rows<NA>(a, a0, cols, r);
    const int64_t nb = cols / QK_K;
    __m256 acc[NA];
    for (int i = 0; i < NA; ++i) acc[i] = _mm256_setzero_ps();
    const __m256i low2 = _mm256_set1_epi8(3), bit2 = _mm256_set1_epi8(4);
    for (int64_t b = 0; b < nb; ++b) {
        const auto* x = reinterpret_cast<const block_q3_K*>(w) + b;
        prefetch_ahead(x, sizeof(*x));
        const float d = load_f16(x->d);
        const __m128i sc8 = scales_q3_K(x->scales);
        const __m256i scall = _mm256_cvtepi8_epi16(sc8);
        __m256i isum[NA][2];  // even / odd chunks: two shorter dependency chains
        for (int i = 0; i < NA; ++i) {
            const __m256i corr = _mm256_madd_epi16(loadu256(r[i].bs + b * 16), scall);
            isum[i][1] = _mm256_setzero_si256();
            isum[i][0] = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(corr, 2));
        }
        const __m256i hm = loadu256(x->hmask);
#pragma GCC unroll 2
        for (int h = 0; h < 2; ++h) {
            const __m256i q2 = loadu256(x->qs + 32 * h);
#pragma GCC unroll 4
            for (int s = 0; s < 4; ++s) {
                const int k = 4 * h + s;  // hmask bit of this 32-chunk
                const __m256i lo = _mm256_and_si256(_mm256_srli_epi16(q2, 2 * s), low2);
                const __m256i hb = k <= 2 ? _mm256_slli_epi16(hm, 2 - k) : _mm256_srli_epi16(hm, k - 2);
                const __m256i u = _mm256_or_si256(lo, _mm256_and_si256(hb, bit2));
                const __m256i sv = chunk_scales(sc8, 8 * h + 2 * s);
                for (int i = 0; i < NA; ++i) {
                    const __m256i a8 = loadu256(r[i].aq + b * QK_K + 128 * h + 32 * s);
                    isum[i][s % 2] = dot_u8s8_scaled_acc(isum[i][s % 2], u, a8, sv);
                }
            }
        }
        for (int i = 0; i < NA; ++i)
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(isum[i][0], isum[i][1])), _mm256_set1_ps(d * r[i].ad[b]), acc[i]);
    }
    for (int i = 0; i < NA; ++i) out[i * os] = hsum_ps(acc[i]);
}

// Q2_K: value = d * (sc[g] & 15) * q - dmin * (sc[g] >> 4), q 2-bit per 16-group g.
template <int NA>
void dot_q2_K(int64_t cols, const uint8_t* w, const QActs& a, int64_t a0, float* out, int64_t os) {
    KRows r[NA];
    k_rows<NA>(a, a0, cols, r);
    const int64_t nb = cols / QK_K;
    __m256 acc[NA], accm[NA];
    for (int i = 0; i < NA; ++i) acc[i] = accm[i] = _mm256_setzero_ps();
    const __m128i low4 = _mm_set1_epi8(0x0f);
    const __m256i low2 = _mm256_set1_epi8(3);
    for (int64_t b = 0; b < nb; ++b) {
        const auto* x = reinterpret_cast<const block_q2_K*>(w) + b;
        prefetch_ahead(x, sizeof(*x));
        const float d = load_f16(x->d), dmin = load_f16(x->dmin);
        const __m128i raw = loadu128(x->scales);
        const __m128i sc8 = _mm_and_si128(raw, low4);
        const __m256i mn16 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(raw, 4), low4));
        __m256i isum[NA][2];  // even / odd chunks: two shorter dependency chains
        for (int i = 0; i < NA; ++i) {
            const __m256i pm = _mm256_madd_epi16(loadu256(r[i].bs + b * 16), mn16);
            accm[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pm), _mm256_set1_ps(dmin * r[i].ad[b]), accm[i]);
            isum[i][0] = isum[i][1] = _mm256_setzero_si256();
        }
#pragma GCC unroll 2
        for (int h = 0; h < 2; ++h) {
            const __m256i q2 = loadu256(x->qs + 32 * h);
#pragma GCC unroll 4
            for (int s = 0; s < 4; ++s) {
                const __m256i u = _mm256_and_si256(_mm256_srli_epi16(q2, 2 * s), low2);
                const __m256i sv = chunk_scales(sc8, 8 * h + 2 * s);
                for (int i = 0; i < NA; ++i) {
                    const __m256i a8 = loadu256(r[i].aq + b * QK_K + 128 * h + 32 * s);
                    isum[i][s % 2] = dot_u8s8_scaled_acc(isum[i][s % 2], u, a8, sv);
                }
            }
        }
        for (int i = 0; i < NA; ++i)
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(isum[i][0], isum[i][1])), _mm256_set1_ps(d * r[i].ad[b]), acc[i]);
    }
    for (int i = 0; i < NA; ++i) out[i * os] = hsum_ps(acc[i]) - hsum_ps(accm[i]);
}

// ---- float weights (F32 / F16 / BF16) against float activations -------------------------------

template <int WT>
HL_INLINE __m256 load8w(const uint8_t* w, int64_t c) {
    if constexpr (WT == T_F32) return _mm256_loadu_ps(reinterpret_cast<const float*>(w) + c);
    if constexpr (WT == T_F16) return _mm256_cvtph_ps(loadu128(w + 2 * c));
    // BF16: the 16 bits are the top half of a float32.
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(loadu128(w + 2 * c)), 16));
}

template <int WT>
HL_INLINE float load1w(const uint8_t* w, int64_t c) {
    if constexpr (WT == T_F32) return reinterpret_cast<const float*>(w)[c];
    if constexpr (WT == T_F16) return fp16_to_f32(load_u16(w + 2 * c));
    return bf16_to_f32(load_u16(w + 2 * c));
}

template <int WT, int NA>
void dot_float(int64_t cols, const uint8_t* w, const QActs& a, int64_t a0, float* out, int64_t os) {
    const float* x[NA];
    for (int i = 0; i < NA; ++i) x[i] = a.xf + (a0 + i) * a.ld;
    __m256 acc0[NA], acc1[NA];
    for (int i = 0; i < NA; ++i) acc0[i] = acc1[i] = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c + 16 <= cols; c += 16) {
        const __m256 w0 = load8w<WT>(w, c), w1 = load8w<WT>(w, c + 8);
        for (int i = 0; i < NA; ++i) {
            acc0[i] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x[i] + c), acc0[i]);
            acc1[i] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x[i] + c + 8), acc1[i]);
        }
    }
    for (; c + 8 <= cols; c += 8) {
        const __m256 w0 = load8w<WT>(w, c);
        for (int i = 0; i < NA; ++i) acc0[i] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x[i] + c), acc0[i]);
    }
    for (int i = 0; i < NA; ++i) {
        float s = hsum_ps(_mm256_add_ps(acc0[i], acc1[i]));
        for (int64_t t = c; t < cols; ++t) s += load1w<WT>(w, t) * x[i][t];
        out[i * os] = s;
    }
}

template <int NA>
RowKernel pick(int type, int kind) {
    switch (type) {
        case T_F32: return kind == ACT_F32 ? dot_float<T_F32, NA> : nullptr;
        case T_F16: return kind == ACT_F32 ? dot_float<T_F16, NA> : nullptr;
        case T_BF16: return kind == ACT_F32 ? dot_float<T_BF16, NA> : nullptr;
        case T_Q4_0: return kind == ACT_Q8_32P ? dot_pair<PQ4_0, NA> : nullptr;
        case T_Q4_1: return kind == ACT_Q8_1 ? dot_q4_1_exact<NA> : nullptr;
        case T_Q5_0: return kind == ACT_Q8_32P ? dot_pair<PQ5_0, NA> : nullptr;
        case T_Q5_1: return kind == ACT_Q8_32P ? dot_pair<PQ5_1, NA> : nullptr;
        case T_Q8_0: return kind == ACT_Q8_32 ? dot_q8_0<NA> : nullptr;
        case T_Q2_K: return kind == ACT_Q8_K ? dot_q2_K<NA> : nullptr;
        case T_Q3_K: return kind == ACT_Q8_K ? dot_q3_K<NA> : nullptr;
        case T_Q4_K: return kind == ACT_Q8_K ? dot_q4_K<NA> : nullptr;
        case T_Q5_K: return kind == ACT_Q8_K ? dot_q5_K<NA> : nullptr;
        case T_Q6_K: return kind == ACT_Q8_K ? dot_q6_K<NA> : nullptr;
        default: return nullptr;
    }
}

}  // namespace

bool have_simd_kernels() { return true; }

RowKernel get_kernel_avx2(int type, int na, int kind) {
    static_assert(MAX_NA == 4, "instantiate the kernels for every tile height");
    switch (na) {
        case 1: return pick<1>(type, kind);
        case 2: return pick<2>(type, kind);
        case 3: return pick<3>(type, kind);
        case 4: return pick<4>(type, kind);
        default: return nullptr;
    }
}

#else  // no AVX2: the scalar kernels are the only ones

bool have_simd_kernels() { return false; }
RowKernel get_kernel_avx2(int, int, int) { return nullptr; }

#endif

}  // namespace hl
