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

// ---- 32-element blocks (Q4_0 Q4_1 Q5_0 Q5_1 Q8_0), bit-exact with llama.cpp -------------------
//
// Each block's codes are unpacked in element order (low nibbles -> elements 0-15, high nibbles
// -> 16-31) and dotted with the activation block so that int32 lane l holds the exact integer dot
// of elements 4l .. 4l + 3. The float side then follows the llama.cpp kernel for the type:
//   LANES (ggml_vec_dot_*_q8_0 / _q8_1 and llamafile's tinyBLAS, which agree): per block
//     acc8 = fma(dw * da, float(dot lanes), acc8); result hsum_float_8(acc8) [+ summs], where
//     summs = fma(m, s, summs) per block for the formats with a min (Q4_1, Q5_1).
//   CHAIN (the repacked q4_0 8x8 gemv / gemm that llama.cpp runs for Q4_0 on AVX2): per block
//     acc = fma(float(sum of the 8 lanes), dw * da, acc), one scalar chain.
// One output's chain must stay in block order, so the matvec kernels run MATVEC_NR rows' chains
// side by side instead of splitting a row.

struct Fmt8_0 {  // int8 codes
    static constexpr size_t kBytes = sizeof(block_q8_0);
    static constexpr bool kSigned = true, kMin = false, kChain = false;
    static HL_INLINE __m256i codes(const uint8_t* b) { return loadu256(b + 2); }
};

// Nibbles of 16 bytes in element order: low nibbles in bytes 0-15, high ones in 16-31.
HL_INLINE __m256i nibbles32(const uint8_t* qs) {
    const __m128i raw = loadu128(qs);
    return _mm256_and_si256(_mm256_inserti128_si256(_mm256_castsi128_si256(raw), _mm_srli_epi16(raw, 4), 1),
                            _mm256_set1_epi8(0x0f));
}

// 0xff in byte j where bit j of the 32 bits at qh is set (ggml's bytes_from_bits_32).
HL_INLINE __m256i bit_bytes32(const uint8_t* qh) {
    const __m256i spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(static_cast<int>(load_u32(qh))),
        _mm256_setr_epi64x(0, 0x0101010101010101, 0x0202020202020202, 0x0303030303030303));
    return _mm256_cmpeq_epi8(_mm256_or_si256(spread, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe)),
                             _mm256_set1_epi64x(-1));
}

struct Fmt4_0 {  // q - 8
    static constexpr size_t kBytes = sizeof(block_q4_0);
    static constexpr bool kSigned = true, kMin = false, kChain = true;
    static HL_INLINE __m256i codes(const uint8_t* b) {
        return _mm256_sub_epi8(nibbles32(b + 2), _mm256_set1_epi8(8));
    }
};

struct Fmt4_1 {  // q, value = d q + m
    static constexpr size_t kBytes = sizeof(block_q4_1);
    static constexpr bool kSigned = false, kMin = true, kChain = false;
    static HL_INLINE __m256i codes(const uint8_t* b) { return nibbles32(b + 4); }
};

struct Fmt5_0 {  // (q | h << 4) - 16
    static constexpr size_t kBytes = sizeof(block_q5_0);
    static constexpr bool kSigned = true, kMin = false, kChain = false;
    static HL_INLINE __m256i codes(const uint8_t* b) {
        const __m256i lo = nibbles32(b + 6);
#if defined(__AVX512BW__) && defined(__AVX512VL__)
        return _mm256_mask_sub_epi8(lo, static_cast<__mmask32>(~load_u32(b + 2)), lo, _mm256_set1_epi8(16));
#else
        return _mm256_or_si256(lo, _mm256_andnot_si256(bit_bytes32(b + 2), _mm256_set1_epi8(static_cast<char>(0xf0))));
#endif
    }
};

struct Fmt5_1 {  // q | h << 4, value = d q + m
    static constexpr size_t kBytes = sizeof(block_q5_1);
    static constexpr bool kSigned = false, kMin = true, kChain = false;
    static HL_INLINE __m256i codes(const uint8_t* b) {
        const __m256i lo = nibbles32(b + 8);
#if defined(__AVX512BW__) && defined(__AVX512VL__)
        return _mm256_mask_add_epi8(lo, static_cast<__mmask32>(load_u32(b + 4)), lo, _mm256_set1_epi8(16));
#else
        return _mm256_or_si256(lo, _mm256_and_si256(bit_bytes32(b + 4), _mm256_set1_epi8(16)));
#endif
    }
};

// Integer dot lanes of codes q (as F unpacks them) with activation codes a.
template <class F>
HL_INLINE __m256i block_dot(__m256i q, __m256i qabs, __m256i a) {
    if constexpr (F::kSigned) return dot_u8s8(qabs, _mm256_sign_epi8(a, q));
    return dot_u8s8(q, a);
}

HL_INLINE int hsum_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

// NR weight rows (rows of `rb` bytes from w) x NA activation rows (a0 ..); one of NR, NA is 1.
// out[i * os + r] (os: the activation-row stride of out; the rows of one activation are adjacent).
template <class F, int NR, int NA>
HL_INLINE void dot32_tile(int64_t cols, const uint8_t* w, int64_t rb, const QActs& a, int64_t a0,
                          float* out, int64_t os) {
    constexpr size_t kB = F::kBytes;
    const int64_t nb = cols / QK;
    const int8_t* aq[NA];
    const float *ad[NA], *as[NA];
    for (int i = 0; i < NA; ++i) {
        aq[i] = a.qs + (a0 + i) * cols;
        ad[i] = a.d + (a0 + i) * nb;
        as[i] = a.s + (a0 + i) * nb;
    }
    __m256 acc[NR][NA];
    float accs[NR][NA], summs[NR][NA];
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r)
        for (int i = 0; i < NA; ++i) {
            acc[r][i] = _mm256_setzero_ps();
            accs[r][i] = summs[r][i] = 0.0f;
        }
    for (int64_t b = 0; b < nb; ++b) {
        __m256i q[NR], qabs[NR];
        float dw[NR], mw[NR];
#pragma GCC unroll 4
        for (int r = 0; r < NR; ++r) {
            const uint8_t* blk = w + r * rb + b * kB;
            // Prefetch: one row's stream ahead; with NR rows side by side the rows that follow
            // this group's are the ones not yet streaming, so aim at the same spot NR rows on.
            if ((b & 15) == 0) {
                if constexpr (NR == 1)
                    prefetch_ahead(blk, 16 * kB);
                else
                    for (size_t o = 0; o < 16 * kB; o += 64) _mm_prefetch(reinterpret_cast<const char*>(blk) + NR * rb + o, _MM_HINT_T0);
            }
            dw[r] = load_f16(blk);
            if constexpr (F::kMin) mw[r] = load_f16(blk + 2);
            q[r] = F::codes(blk);
            if constexpr (F::kSigned) qabs[r] = _mm256_sign_epi8(q[r], q[r]);
        }
#pragma GCC unroll 4
        for (int i = 0; i < NA; ++i) {
            const __m256i av = loadu256(aq[i] + b * QK);
    #pragma GCC unroll 4
        for (int r = 0; r < NR; ++r) {
                const __m256i dot = block_dot<F>(q[r], qabs[r], av);
                const float dd = dw[r] * ad[i][b];
                if constexpr (F::kChain) {
                    accs[r][i] = __builtin_fmaf(static_cast<float>(hsum_epi32(dot)), dd, accs[r][i]);
                } else {
                    if constexpr (F::kMin) summs[r][i] = __builtin_fmaf(mw[r], as[i][b], summs[r][i]);
                    acc[r][i] = _mm256_fmadd_ps(_mm256_set1_ps(dd), _mm256_cvtepi32_ps(dot), acc[r][i]);
                }
            }
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r)
        for (int i = 0; i < NA; ++i) {
            float v;
            if constexpr (F::kChain)
                v = accs[r][i];
            else
                v = F::kMin ? hsum_ps(acc[r][i]) + summs[r][i] : hsum_ps(acc[r][i]);
            out[i * os + r] = v;
        }
}

template <class F, int NA>
void dot32(int64_t cols, const uint8_t* w, const QActs& a, int64_t a0, float* out, int64_t os) {
    dot32_tile<F, 1, NA>(cols, w, 0, a, a0, out, os);
}

template <class F>
void matvec32(int64_t cols, const uint8_t* w, const QActs& a, int64_t a0, float* out) {
    dot32_tile<F, MATVEC_NR, 1>(cols, w, static_cast<int64_t>(cols / QK * F::kBytes), a, a0, out, 0);
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

// Q4_K: value = d * sc[j] * q - dmin * m[j] per 32-group j, in the arithmetic of llama.cpp's
// repacked q4_K 8x8 kernels (what it runs for Q4_K on AVX2 when the row count is a multiple of 8).
// Per super-block, with exact integer sums isum = sum_j sc[j] (q . a)_j and
// imin = sum_j m[j] (bsum[2j] + bsum[2j+1]) over the sub-blocks j of a span:
//     acc = fma(float(isum), d * da, acc),  accm = fma(float(imin), dmin * da, accm)
// result acc - accm. ggml_gemv (activation rows past the last multiple of 4 of the call) takes
// the whole super-block as one span; ggml_gemm (rows in groups of 4) takes each pair of
// sub-blocks (64 elements) as a span.
template <int NA>
void dot_q4_K(int64_t cols, const uint8_t* w, const QActs& a, int64_t a0, float* out, int64_t os) {
    KRows r[NA];
    k_rows<NA>(a, a0, cols, r);
    const int64_t nb = cols / QK_K;
    const int64_t gemm_rows = a.n - a.n % 4;
    bool per_pair[NA];
    float acc[NA], accm[NA];
    for (int i = 0; i < NA; ++i) {
        per_pair[i] = a0 + i < gemm_rows;
        acc[i] = accm[i] = 0.0f;
    }
    const __m256i low4 = _mm256_set1_epi8(0x0f);
    for (int64_t b = 0; b < nb; ++b) {
        const auto* x = reinterpret_cast<const block_q4_K*>(w) + b;
        prefetch_ahead(x, sizeof(*x));
        const float dw = load_f16(x->d), dmw = load_f16(x->dmin);
        const __m128i scmn = scale_min_k4(x->scales);  // bytes 0-7: sc[j], 8-15: m[j]
        const __m256i sc16 = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(scmn));
        const __m256i mn16 = _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(scmn, scmn));  // m[j] per 16-group
        __m256i tot[NA], pair[NA][4];
        for (int i = 0; i < NA; ++i) tot[i] = _mm256_setzero_si256();
#pragma GCC unroll 4
        for (int c = 0; c < 4; ++c) {
            const __m256i v = loadu256(x->qs + 32 * c);
            const __m256i lo = _mm256_and_si256(v, low4);
            const __m256i hi = high_nibbles(v);
            const __m256i s_lo = lane_scale(sc16, 2 * c), s_hi = lane_scale(sc16, 2 * c + 1);
            for (int i = 0; i < NA; ++i) {
                const int8_t* q8 = r[i].aq + b * QK_K + 64 * c;
                __m256i t = dot_u8s8_scaled_acc(_mm256_setzero_si256(), lo, loadu256(q8), s_lo);
                t = dot_u8s8_scaled_acc(t, hi, loadu256(q8 + 32), s_hi);
                if (per_pair[i])
                    pair[i][c] = t;
                else
                    tot[i] = _mm256_add_epi32(tot[i], t);
            }
        }
        for (int i = 0; i < NA; ++i) {
            const float da = r[i].ad[b];
            if (per_pair[i]) {
                // The four pairs' integer sums, and their min sums, reduced side by side.
                const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(pair[i][0], pair[i][1]),
                                                    _mm256_hadd_epi32(pair[i][2], pair[i][3]));
                alignas(16) float isum[4], imin[4];
                _mm_store_ps(isum, _mm_cvtepi32_ps(_mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1))));
                const __m256i pm = _mm256_madd_epi16(loadu256(r[i].bs + b * 16), mn16);  // sub-block j
                const __m256i pp = _mm256_hadd_epi32(pm, pm);  // pairs 0 1 (low lane), 2 3 (high)
                _mm_store_ps(imin, _mm_cvtepi32_ps(_mm_unpacklo_epi64(_mm256_castsi256_si128(pp), _mm256_extracti128_si256(pp, 1))));
                for (int c = 0; c < 4; ++c) {
                    acc[i] = __builtin_fmaf(isum[c], dw * da, acc[i]);
                    accm[i] = __builtin_fmaf(imin[c], dmw * da, accm[i]);
                }
                continue;
            }
            const int imin = hsum_epi32(_mm256_madd_epi16(loadu256(r[i].bs + b * 16), mn16));
            acc[i] = __builtin_fmaf(static_cast<float>(hsum_epi32(tot[i])), dw * da, acc[i]);
            accm[i] = __builtin_fmaf(static_cast<float>(imin), dmw * da, accm[i]);
        }
    }
    for (int i = 0; i < NA; ++i) out[i * os] = acc[i] - accm[i];
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
// as -32 * sum_g sc[g] * bsum[g]. Float side as llama.cpp: for calls of fewer than 8 activation
// rows ggml_vec_dot_q6_K_q8_K (lane l of the integer sum holds elements 4l .. 4l + 3 of every
// 32-chunk; acc8 = fma(d * da, lanes, acc8); hsum_float_8), from 8 rows on ggml's tiled K-quant
// matmul (per super-block: acc = fma(float(isum) * d, da, acc)).
template <int NA>
void dot_q6_K(int64_t cols, const uint8_t* w, const QActs& a, int64_t a0, float* out, int64_t os) {
    KRows r[NA];
    k_rows<NA>(a, a0, cols, r);
    const int64_t nb = cols / QK_K;
    const bool tiled = a.n >= 8;
    __m256 acc[NA];
    float accs[NA];
    for (int i = 0; i < NA; ++i) {
        acc[i] = _mm256_setzero_ps();
        accs[i] = 0.0f;
    }
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
        for (int i = 0; i < NA; ++i) {
            const __m256i lanes = _mm256_add_epi32(isum[i][0], isum[i][1]);
            if (tiled)
                accs[i] = __builtin_fmaf(static_cast<float>(hsum_epi32(lanes)) * d, r[i].ad[b], accs[i]);
            else
                acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lanes), _mm256_set1_ps(d * r[i].ad[b]), acc[i]);
        }
    }
    for (int i = 0; i < NA; ++i) out[i * os] = tiled ? accs[i] : hsum_ps(acc[i]);
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
    if (kind != act_kind_for(type)) return nullptr;
    switch (type) {
        case T_F32: return dot_float<T_F32, NA>;
        case T_F16: return dot_float<T_F16, NA>;
        case T_BF16: return dot_float<T_BF16, NA>;
        case T_Q4_0: return dot32<Fmt4_0, NA>;
        case T_Q4_1: return dot32<Fmt4_1, NA>;
        case T_Q5_0: return dot32<Fmt5_0, NA>;
        case T_Q5_1: return dot32<Fmt5_1, NA>;
        case T_Q8_0: return dot32<Fmt8_0, NA>;
        case T_Q2_K: return dot_q2_K<NA>;
        case T_Q3_K: return dot_q3_K<NA>;
        case T_Q4_K: return dot_q4_K<NA>;
        case T_Q5_K: return dot_q5_K<NA>;
        case T_Q6_K: return dot_q6_K<NA>;
        default: return nullptr;
    }
}

}  // namespace

bool have_simd_kernels() { return true; }

// Only Q4_0's scalar chain (a horizontal sum and a dependent FMA per 18-byte block) gains from
// running rows side by side; for the LANES formats one row at a time streams faster from DRAM
// (measured, 1 core: 4 rows at once took Q8_0 from 27 to 14 GB/s, Q4_0 from 8.6 to 10; in cache
// both run at about the same speed, so the 32-block kernels are bound by instruction count).
MatvecKernel get_matvec_kernel_avx2(int type, int kind) {
    if (kind != act_kind_for(type)) return nullptr;
    return type == T_Q4_0 ? matvec32<Fmt4_0> : nullptr;
}

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
MatvecKernel get_matvec_kernel_avx2(int, int) { return nullptr; }

#endif

}  // namespace hl
