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
#include <algorithm>
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
// Least distance of the matvec kernels' sequential prefetch (see prefetch_next_group): with short
// rows the next group of rows alone is too near to cover DRAM latency (measured on 576-column
// Q4_1 rows: 9.4 GB/s with the group's 1.4 KiB, 16.6-17.3 GB/s with 4-16 KiB).
#ifndef PF_GROUP_MIN
#define PF_GROUP_MIN 16384
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
// side by side instead of splitting a row (and cut the instructions per block).

struct Fmt8_0 {  // int8 codes; ucodes = codes + 128 as unsigned bytes (the 512-bit tile's operand)
    static constexpr size_t kBytes = sizeof(block_q8_0);
    static constexpr bool kSigned = true, kMin = false, kChain = false, kFoldActScale = false;
    static constexpr int kBias = 128;  // ucodes - kBias = codes
    static HL_INLINE __m256i codes(const uint8_t* b) { return loadu256(b + 2); }
    static HL_INLINE __m256i ucodes(const uint8_t* b) { return _mm256_xor_si256(codes(b), _mm256_set1_epi8(-128)); }
};

// Nibbles of 16 bytes in element order: low nibbles in bytes 0-15, high nibbles in 16-31.
HL_INLINE __m256i nibbles32(const uint8_t* qs) {
#if defined(__GFNI__)
    // The 16 bytes in both halves, then one GF2 affine op: x & 15 in the low half (bit matrix
    // 0x0102040800000000), x >> 4 in the high half (0x1020408000000000).
    return _mm256_gf2p8affine_epi64_epi8(_mm256_broadcastsi128_si256(loadu128(qs)),
                                         _mm256_setr_epi64x(0x0102040800000000ll, 0x0102040800000000ll,
                                                            0x1020408000000000ll, 0x1020408000000000ll), 0);
#else
    const __m128i raw = loadu128(qs);
    return _mm256_and_si256(_mm256_inserti128_si256(_mm256_castsi128_si256(raw), _mm_srli_epi16(raw, 4), 1),
                            _mm256_set1_epi8(0x0f));
#endif
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
    static constexpr bool kSigned = true, kMin = false, kChain = true, kFoldActScale = false;
    static constexpr int kBias = 8;  // ucodes - kBias = codes
    static HL_INLINE __m256i ucodes(const uint8_t* b) { return nibbles32(b + 2); }
    static HL_INLINE __m256i codes(const uint8_t* b) { return _mm256_sub_epi8(ucodes(b), _mm256_set1_epi8(8)); }
};

struct Fmt4_1 {  // q, value = d q + m
    static constexpr size_t kBytes = sizeof(block_q4_1);
    // kFoldActScale: a lane's dot x of 4-bit codes with int8 activations has |x| <= 4 * 15 * 127
    // < 2^13, so da * x (da a half value: 11 significant bits) is exact in float, as dw * da is;
    // fma(dw, da * x, acc) then rounds the same real number as llama.cpp's fma(dw * da, x, acc).
    static constexpr bool kSigned = false, kMin = true, kChain = false, kFoldActScale = true;
    static constexpr int kBias = 0;
    static HL_INLINE __m256i codes(const uint8_t* b) { return nibbles32(b + 4); }
    static HL_INLINE __m256i ucodes(const uint8_t* b) { return codes(b); }
};

struct Fmt5_0 {  // (q | h << 4) - 16
    static constexpr size_t kBytes = sizeof(block_q5_0);
    static constexpr bool kSigned = true, kMin = false, kChain = false, kFoldActScale = false;
    static constexpr int kBias = 16;  // ucodes - kBias = codes
    static HL_INLINE __m256i ucodes(const uint8_t* b) {
        const __m256i lo = nibbles32(b + 6);
#if defined(__AVX512BW__) && defined(__AVX512VL__)
        return _mm256_mask_add_epi8(lo, static_cast<__mmask32>(load_u32(b + 2)), lo, _mm256_set1_epi8(16));
#else
        return _mm256_or_si256(lo, _mm256_and_si256(bit_bytes32(b + 2), _mm256_set1_epi8(16)));
#endif
    }
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
    // 5-bit codes: |x| < 2^14, and da * x could need 25 significant bits, so no kFoldActScale.
    static constexpr bool kSigned = false, kMin = true, kChain = false, kFoldActScale = false;
    static constexpr int kBias = 0;
    static HL_INLINE __m256i ucodes(const uint8_t* b) { return codes(b); }
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

// NR rows side by side read NR streams, which the hardware prefetchers follow badly from DRAM
// (measured: Q8_0 on one core fell from 27 to 14 GB/s with 4 rows). Instead the bytes `dist`
// ahead of the group (the rows that follow it, contiguous) are prefetched into L2 as one
// sequential stream, at the pace the group is consumed (`pos` bytes of it so far).
constexpr int64_t kGroupPrefetchMin = PF_GROUP_MIN;
HL_INLINE void prefetch_next_group(const uint8_t* w, int64_t dist, int64_t pos) {
    const char* p = reinterpret_cast<const char*>(w) + dist + pos;
    _mm_prefetch(p, _MM_HINT_T1);
    _mm_prefetch(p + 64, _MM_HINT_T1);
}

HL_INLINE int hsum_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

// Sums of the 8 int32 lanes of each of v[0..3], as the 4 lanes of one vector.
HL_INLINE __m128i hsum4_epi32(const __m256i* v) {
    const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
    return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

// One weight row x NA activation rows (a0 ..): out[i * os].
template <class F, int NA>
void dot32(int64_t cols, const uint8_t* w, const QActs& a, int64_t a0, float* out, int64_t os) {
    constexpr size_t kB = F::kBytes;
    const int64_t nb = cols / QK;
    const int8_t* aq[NA];
    const float *ad[NA], *as[NA];
    for (int i = 0; i < NA; ++i) {
        aq[i] = a.qs + (a0 + i) * cols;
        ad[i] = a.d + (a0 + i) * nb;
        as[i] = a.s + (a0 + i) * nb;
    }
    __m256 acc[NA];
    float accs[NA], summs[NA];
    for (int i = 0; i < NA; ++i) {
        acc[i] = _mm256_setzero_ps();
        accs[i] = summs[i] = 0.0f;
    }
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* blk = w + b * kB;
        if ((b & 15) == 0) prefetch_ahead(blk, 16 * kB);
        const float dw = load_f16(blk);
        const __m256i q = F::codes(blk);
        const __m256i qabs = F::kSigned ? _mm256_sign_epi8(q, q) : q;
#pragma GCC unroll 4
        for (int i = 0; i < NA; ++i) {
            const __m256i dot = block_dot<F>(q, qabs, loadu256(aq[i] + b * QK));
            const float dd = dw * ad[i][b];
            if constexpr (F::kChain) {
                accs[i] = __builtin_fmaf(static_cast<float>(hsum_epi32(dot)), dd, accs[i]);
            } else {
                if constexpr (F::kMin) summs[i] = __builtin_fmaf(load_f16(blk + 2), as[i][b], summs[i]);
                acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(dd), _mm256_cvtepi32_ps(dot), acc[i]);
            }
        }
    }
    for (int i = 0; i < NA; ++i) {
        if constexpr (F::kChain)
            out[i * os] = accs[i];
        else
            out[i * os] = F::kMin ? hsum_ps(acc[i]) + summs[i] : hsum_ps(acc[i]);
    }
}

// TILE_NW weight rows x MAX_NA activation rows of the LANES formats (batches; the AVX2 build's
// tile, AVX-512 builds use tile32_pair512 below): each output keeps
// dot32's arithmetic (acc8 = fma(dw * da, float(dot lanes), acc8) per block), with the work that
// does not depend on the (row, activation) pair done once:
//   * the weight block is decoded once for the four activation rows, and each activation block
//     loaded once for both weight rows;
//   * the eight scale products dw * da of a block are two 4-lane multiplies (d_t holds the four
//     activation rows' scales of a block side by side), each lane then broadcast to its FMA;
//   * the min chains of Q4_1 / Q5_1 (summs = fma(m, s, summs) per block) run as one 4-lane FMA
//     per weight row, lane i for activation row i;
//   * Q5_0 dots its unsigned codes starting from the activations' q5_start lanes
//     (-16 * lane sums, made once per matmul): the same exact integers as the signed codes.
template <class F>
void tile32(int64_t cols, const uint8_t* w, int64_t rb, const QActs& a, int64_t a0, float* out, int64_t os) {
    constexpr int NW = TILE_NW, NA = MAX_NA;
    static_assert(NA == 4, "the scale products are 4-lane vectors");
    static_assert(F::kBias == 0 || F::kBias == 16, "q5_start holds the lanes of a 16 offset");
    constexpr size_t kB = F::kBytes;
    const int64_t nb = cols / QK;
    const int8_t* aq = a.qs + a0 * cols;
    const int32_t* start = F::kBias != 0 ? a.q5_start + a0 * (cols / 4) : nullptr;
    __m256 acc[NW][NA];
    __m128 summs[NW];
    for (int r = 0; r < NW; ++r) {
        summs[r] = _mm_setzero_ps();
        for (int i = 0; i < NA; ++i) acc[r][i] = _mm256_setzero_ps();
    }
    alignas(16) float dd[NW][NA];  // dw[r] * da[i] of the current block
    for (int64_t b = 0; b < nb; ++b) {
        __m256i u[NW];
        const __m128 da = _mm_loadu_ps(a.d_t + b * a.n + a0);
#pragma GCC unroll 2
        for (int r = 0; r < NW; ++r) {
            const uint8_t* blk = w + r * rb + b * kB;
            if ((b & 15) == 0) prefetch_ahead(blk, 16 * kB);
            u[r] = F::ucodes(blk);
            _mm_store_ps(dd[r], _mm_mul_ps(_mm_set1_ps(load_f16(blk)), da));
            if constexpr (F::kMin)
                summs[r] = _mm_fmadd_ps(_mm_set1_ps(load_f16(blk + 2)), _mm_loadu_ps(a.s_t + b * a.n + a0), summs[r]);
        }
#pragma GCC unroll 4
        for (int i = 0; i < NA; ++i) {
            const __m256i av = loadu256(aq + i * cols + b * QK);
            const __m256i lanes0 = F::kBias != 0 ? loadu256(start + i * (cols / 4) + b * 8) : _mm256_setzero_si256();
#pragma GCC unroll 2
            for (int r = 0; r < NW; ++r) {
                const __m256i dot = dot_u8s8_acc(lanes0, u[r], av);
                acc[r][i] = _mm256_fmadd_ps(_mm256_set1_ps(dd[r][i]), _mm256_cvtepi32_ps(dot), acc[r][i]);
            }
        }
    }
    for (int r = 0; r < NW; ++r) {
        alignas(16) float m[NA];
        _mm_store_ps(m, summs[r]);
        for (int i = 0; i < NA; ++i) out[i * os + r] = F::kMin ? hsum_ps(acc[r][i]) + m[i] : hsum_ps(acc[r][i]);
    }
}

// The wide kernel of the 256-bit builds for Q8_0 (the heads of batches): each of the TILE_NW
// weight rows against WIDE_NA activation rows, one row after the other, every output with
// dot32's arithmetic (acc8 = fma(dw * da, float(dot lanes), acc8) per block). The block's
// WIDE_NA scale products are one 8-lane multiply from d_t, broadcast to the FMAs from memory;
// dot32<Fmt8_0, 4> makes each a scalar product and a register broadcast. 0.92 against 1.07 ns a
// block and row on an AVX2-only Zen 3 (bench/RESULTS.md). A second weight row's 8 accumulators
// would not fit the 16 registers, so the rows take turns; the 8 activation rows stay in L1.
template <class F>
void rows_wide(int64_t cols, const uint8_t* w, int64_t rb, const QActs& a, int64_t a0, float* out, int64_t os) {
    static_assert(WIDE_NA == 8 && F::kSigned && !F::kMin && !F::kChain, "8 lanes of scale products, LANES order");
    constexpr size_t kB = F::kBytes;
    const int64_t nb = cols / QK;
    const int8_t* aq = a.qs + a0 * cols;
    alignas(32) float dd_mem[WIDE_NA];
    float* dd = dd_mem;
    asm("" : "+r"(dd));  // opaque: GCC would turn the broadcast loads back into shuffles
    for (int r = 0; r < TILE_NW; ++r) {
        const uint8_t* row = w + r * rb;
        __m256 acc[WIDE_NA];
        for (auto& v : acc) v = _mm256_setzero_ps();
        for (int64_t b = 0; b < nb; ++b) {
            const uint8_t* blk = row + b * kB;
            if ((b & 15) == 0) prefetch_ahead(blk, 16 * kB);
            const __m256i q = F::codes(blk);
            const __m256i qabs = _mm256_sign_epi8(q, q);
            _mm256_store_ps(dd, _mm256_mul_ps(_mm256_set1_ps(load_f16(blk)), _mm256_loadu_ps(a.d_t + b * a.n + a0)));
#pragma GCC unroll 8
            for (int i = 0; i < WIDE_NA; ++i) {
                const __m256i dot = block_dot<F>(q, qabs, loadu256(aq + i * cols + b * QK));
                acc[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(dd + i), _mm256_cvtepi32_ps(dot), acc[i]);
            }
        }
        for (int i = 0; i < WIDE_NA; ++i) out[i * os + r] = hsum_ps(acc[i]);
    }
}

#if defined(__AVX512F__) && defined(__AVX512VNNI__)
// The min chains of NA activation rows as one vector of NA float lanes (each lane its own chain,
// so the width does not change any result): summs = fma(m, s_a, summs) per block.
template <int NA>
struct MinChainLanes;
template <>
struct MinChainLanes<4> {
    using V = __m128;
    static HL_INLINE V zero() { return _mm_setzero_ps(); }
    static HL_INLINE V load(const float* p) { return _mm_loadu_ps(p); }
    static HL_INLINE V fma(float m, V s, V acc) { return _mm_fmadd_ps(_mm_set1_ps(m), s, acc); }
    static HL_INLINE void store(float* p, V v) { _mm_store_ps(p, v); }
};
template <>
struct MinChainLanes<8> {
    using V = __m256;
    static HL_INLINE V zero() { return _mm256_setzero_ps(); }
    static HL_INLINE V load(const float* p) { return _mm256_loadu_ps(p); }
    static HL_INLINE V fma(float m, V s, V acc) { return _mm256_fmadd_ps(_mm256_set1_ps(m), s, acc); }
    static HL_INLINE void store(float* p, V v) { _mm256_store_ps(p, v); }
};
template <>
struct MinChainLanes<16> {
    using V = __m512;
    static HL_INLINE V zero() { return _mm512_setzero_ps(); }
    static HL_INLINE V load(const float* p) { return _mm512_loadu_ps(p); }
    static HL_INLINE V fma(float m, V s, V acc) { return _mm512_fmadd_ps(_mm512_set1_ps(m), s, acc); }
    static HL_INLINE void store(float* p, V v) { _mm512_store_ps(p, v); }
};

// One block of two weight rows (blk0 and blk0 + rb) for the 512-bit tiles: codes [row 0 | row 1]
// and scales [d0 x 8 | d1 x 8], and the rows' min chains (lane i: activation row i) advanced.
template <class F, int NA>
struct PairBlock512 {
    __m512i u;
    __m512 dw;
    HL_INLINE PairBlock512(const uint8_t* blk0, int64_t rb, const float* s_t,
                           typename MinChainLanes<NA>::V* summs) {
        const uint8_t* blk1 = blk0 + rb;
        u = _mm512_inserti64x4(_mm512_castsi256_si512(F::ucodes(blk0)), F::ucodes(blk1), 1);
        // Both rows' (d, m) halves in one convert: [d0 m0 d1 m1] (m only for the formats with one).
        const __m128 dm = _mm_cvtph_ps(_mm_insert_epi32(_mm_cvtsi32_si128(static_cast<int>(load_u32(blk0))),
                                                        static_cast<int>(load_u32(blk1)), 1));
        dw = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2),
                                   _mm512_castps128_ps512(dm));
        if constexpr (F::kMin) {
            using MinLanes = MinChainLanes<NA>;
            const typename MinLanes::V sa = MinLanes::load(s_t);
            summs[0] = MinLanes::fma(_mm_cvtss_f32(_mm_permute_ps(dm, 0x55)), sa, summs[0]);
            summs[1] = MinLanes::fma(_mm_cvtss_f32(_mm_permute_ps(dm, 0xff)), sa, summs[1]);
        }
    }
};

// The two outputs of each activation row i from acc[i] ([row 0 lanes | row 1 lanes]) and the min
// chains: out[i * os] and out[i * os + 1].
template <class F, int NA>
HL_INLINE void store_pair_outputs(const __m512* acc, const typename MinChainLanes<NA>::V* summs, float* out,
                                  int64_t os) {
    alignas(64) float m[2][NA];
    MinChainLanes<NA>::store(m[0], summs[0]);
    MinChainLanes<NA>::store(m[1], summs[1]);
    for (int i = 0; i < NA; ++i) {
        const float s0 = hsum_ps(_mm512_castps512_ps256(acc[i]));
        const float s1 = hsum_ps(_mm512_extractf32x8_ps(acc[i], 1));
        out[i * os] = F::kMin ? s0 + m[0][i] : s0;
        out[i * os + 1] = F::kMin ? s1 + m[1][i] : s1;
    }
}

// tile32 with both weight rows in one 512-bit register: the low 256 bits carry row 0's lanes, the
// high 256 bits row 1's, so one dot, one convert, one scale product and one FMA serve two
// outputs. Each half computes exactly what tile32 computes for its row (integer lanes, then
// acc8 = fma(dw * da, float(lanes), acc8) per block), so the bits are the same; the instruction
// count per block is nearly halved. NA = WIDE_NA and WIDEST_NA (8 and 16 activation rows, the
// wide tiles of batches) share each decoded weight block among more rows; each output's
// arithmetic is the same.
// float(lanes) is a subtraction from lanes started at kFloatMagicBits (vecdot.h) except for Q5_0:
// the same values, with the convert's port-0-only uop moved to either port (+4% at 16 rows).
// Q4_1 (F::kFoldActScale) goes further: fmsub(lanes, da, kFloatMagic * da) = da * x exactly, then
// fma(dw, da * x, acc), the same rounding as fma(dw * da, x, acc) (Fmt4_1 says why): three vector
// uops a block and row instead of four (+5-8% on the Q4_1 matmul at 16 rows).
template <class F, int NA = MAX_NA>
void tile32_pair512(int64_t cols, const uint8_t* w, int64_t rb, const QActs& a, int64_t a0, float* out, int64_t os) {
    static_assert(TILE_NW == 2, "two weight rows in one 512-bit register");
    static_assert(F::kBias == 0 || F::kBias == 16 || F::kBias == 128, "q5_start / q8_start hold these offsets");
    constexpr size_t kB = F::kBytes;
    // Lanes from kFloatMagicBits (q8_start carries it; q5_start, shared with the 256-bit tile, not).
    constexpr bool kMagicStart = F::kBias != 16;
    const int64_t nb = cols / QK;
    const int8_t* aq = a.qs + a0 * cols;
    const float* ad = a.d + a0 * nb;
    const float* adm = F::kFoldActScale ? a.d_magic + a0 * nb : nullptr;
    const int32_t* start = F::kBias == 0 ? nullptr : (F::kBias == 16 ? a.q5_start : a.q8_start) + a0 * (cols / 4);
    __m512 acc[NA];
    for (int i = 0; i < NA; ++i) acc[i] = _mm512_setzero_ps();
    // Lane i of summs[r]: weight row r's min chain with activation row i (NA lanes of floats).
    using MinLanes = MinChainLanes<NA>;
    typename MinLanes::V summs[2] = {MinLanes::zero(), MinLanes::zero()};
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* blk0 = w + b * kB;
        if ((b & 15) == 0) {
            prefetch_ahead(blk0, 16 * kB);
            prefetch_ahead(blk0 + rb, 16 * kB);
        }
        const PairBlock512<F, NA> pb(blk0, rb, a.s_t + b * a.n + a0, summs);
        const __m512i u = pb.u;
        const __m512 dw = pb.dw;
#pragma GCC unroll 16
        for (int i = 0; i < NA; ++i) {
            const __m512i av = _mm512_broadcast_i64x4(loadu256(aq + i * cols + b * QK));
            const __m512i lanes0 = F::kBias != 0 ? _mm512_broadcast_i64x4(loadu256(start + i * (cols / 4) + b * 8))
                                                 : _mm512_set1_epi32(kFloatMagicBits);
            const __m512i dot = _mm512_dpbusd_epi32(lanes0, u, av);
            if constexpr (F::kFoldActScale) {
                // (12582912 + x) * da - 12582912 * da = da * x, exact; then fma(dw, da * x, acc).
                const __m512 da_lanes = _mm512_fmsub_ps(_mm512_castsi512_ps(dot), _mm512_set1_ps(ad[i * nb + b]),
                                                        _mm512_set1_ps(adm[i * nb + b]));
                acc[i] = _mm512_fmadd_ps(dw, da_lanes, acc[i]);
                continue;
            }
            const __m512 lanes = kMagicStart ? _mm512_sub_ps(_mm512_castsi512_ps(dot), _mm512_set1_ps(kFloatMagic))
                                             : _mm512_cvtepi32_ps(dot);
            acc[i] = _mm512_fmadd_ps(_mm512_mul_ps(dw, _mm512_set1_ps(ad[i * nb + b])), lanes, acc[i]);
        }
    }
    store_pair_outputs<F, NA>(acc, summs, out, os);
}

// Two pairs of weight rows (2 * TILE_NW) x NA activation rows: each activation block, its scale
// and (Q8_0) its start lanes are loaded once for two dots instead of one. The pair tile spends
// three loads per dot on Q8_0, where this is +13-16% (matmul_once.py, one thread, 49152x576 by
// 16 rows: 115.8-128.5 -> 134.2-143.3 GFLOP/s); every output's arithmetic is the pair tile's.
template <class F, int NA>
void tile32_quad512(int64_t cols, const uint8_t* w, int64_t rb, const QActs& a, int64_t a0, float* out, int64_t os) {
    static_assert(2 * NA <= 16, "the accumulators and the block's operands share 32 registers");
    constexpr size_t kB = F::kBytes;
    constexpr bool kMagicStart = F::kBias != 16;
    const int64_t nb = cols / QK;
    const int8_t* aq = a.qs + a0 * cols;
    const float* ad = a.d + a0 * nb;
    const int32_t* start = F::kBias == 0 ? nullptr : (F::kBias == 16 ? a.q5_start : a.q8_start) + a0 * (cols / 4);
    __m512 acc[2][NA];
    for (int i = 0; i < NA; ++i) acc[0][i] = acc[1][i] = _mm512_setzero_ps();
    using MinLanes = MinChainLanes<NA>;
    typename MinLanes::V summs[2][2] = {{MinLanes::zero(), MinLanes::zero()}, {MinLanes::zero(), MinLanes::zero()}};
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* blk0 = w + b * kB;
        if ((b & 15) == 0)
            for (int r = 0; r < 4; ++r) prefetch_ahead(blk0 + r * rb, 16 * kB);
        const PairBlock512<F, NA> pb[2] = {{blk0, rb, a.s_t + b * a.n + a0, summs[0]},
                                           {blk0 + 2 * rb, rb, a.s_t + b * a.n + a0, summs[1]}};
#pragma GCC unroll 8
        for (int i = 0; i < NA; ++i) {
            const __m512i av = _mm512_broadcast_i64x4(loadu256(aq + i * cols + b * QK));
            const __m512i lanes0 = F::kBias != 0 ? _mm512_broadcast_i64x4(loadu256(start + i * (cols / 4) + b * 8))
                                                 : _mm512_set1_epi32(kFloatMagicBits);
            const __m512 da = _mm512_set1_ps(ad[i * nb + b]);
            for (int p = 0; p < 2; ++p) {
                const __m512i dot = _mm512_dpbusd_epi32(lanes0, pb[p].u, av);
                const __m512 lanes = kMagicStart ? _mm512_sub_ps(_mm512_castsi512_ps(dot), _mm512_set1_ps(kFloatMagic))
                                                 : _mm512_cvtepi32_ps(dot);
                acc[p][i] = _mm512_fmadd_ps(_mm512_mul_ps(pb[p].dw, da), lanes, acc[p][i]);
            }
        }
    }
    store_pair_outputs<F, NA>(acc[0], summs[0], out, os);
    store_pair_outputs<F, NA>(acc[1], summs[1], out + 2, os);
}

// The widest tile over four weight rows: two halves of WIDE_NA activation rows.
template <class F>
void tile32_quad512_widest(int64_t cols, const uint8_t* w, int64_t rb, const QActs& a, int64_t a0, float* out,
                           int64_t os) {
    static_assert(WIDEST_NA == 2 * WIDE_NA, "two halves");
    tile32_quad512<F, WIDE_NA>(cols, w, rb, a, a0, out, os);
    tile32_quad512<F, WIDE_NA>(cols, w, rb, a, a0 + WIDE_NA, out + WIDE_NA * os, os);
}
#define HL_TILE32_VNNI512 1  // tile_for picks tile32_pair512
#endif

// Matvec of the 32-block formats, MATVEC_NR rows side by side: the same arithmetic as dot32
// with fewer instructions per block. The block's f16 pair (d, m) converts in one op to [d m - -],
// d * da is a scalar product in lane 0 of it, and the summs chain of the formats with a min runs
// in lane 1 of a 4-float register (fma([d m], [sa sa], acc): lane 1 is fma(m, sa, summs)).
// Offset formats (Q4_0: q - 8, Q5_0: q - 16) dot their unsigned codes with the integer lanes
// started at -bias * (lane sums of the activations), computed once per block for all rows: the
// same exact integers as dotting the signed codes, without the per-row sign instructions.
template <class F>
void matvec32(int64_t cols, const uint8_t* w, const QActs& a, int64_t a0, float* out) {
    constexpr int NR = MATVEC_NR;
    constexpr int64_t kB = static_cast<int64_t>(F::kBytes);
    const int64_t nb = cols / QK, rb = nb * kB;
    const int8_t* aq = a.qs + a0 * cols;
    const float* ad = a.d + a0 * nb;
    const float* as = a.s + a0 * nb;
    __m256 acc[NR];
    __m128 accm[NR], chain = _mm_setzero_ps();
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) {
        acc[r] = _mm256_setzero_ps();
        accm[r] = _mm_setzero_ps();
    }
#pragma GCC unroll 2
    for (int64_t b = 0; b < nb; ++b) {
        prefetch_next_group(w, std::max<int64_t>(NR * rb, kGroupPrefetchMin), b * NR * kB);
        const __m256i av = loadu256(aq + b * QK);
        const __m128 da = _mm_load_ss(ad + b);
        __m128 sa = _mm_setzero_ps();
        if constexpr (F::kMin) sa = _mm_broadcast_ss(as + b);
        __m256i lanes0 = _mm256_setzero_si256();  // -bias * lane sums of av
        if constexpr (F::kBias != 0)
            lanes0 = _mm256_sub_epi32(lanes0, dot_u8s8(_mm256_set1_epi8(F::kBias), av));
        if constexpr (F::kChain) {
            // The 4 rows' block sums reduced together (lane r = row r) and one 4-lane FMA: each
            // lane is its row's own scalar chain.
            static_assert(NR == 4, "the chain reduction packs 4 rows");
            __m256i dot[NR];
            __m128i dw = _mm_setzero_si128();
#pragma GCC unroll 4
            for (int r = 0; r < NR; ++r) {
                const uint8_t* blk = w + r * rb + b * kB;
                dot[r] = dot_u8s8_acc(lanes0, F::ucodes(blk), av);
                dw = _mm_insert_epi16(dw, load_u16(blk), r);
            }
            const __m128 dd = _mm_mul_ps(_mm_cvtph_ps(dw), _mm_broadcastss_ps(da));
            chain = _mm_fmadd_ps(_mm_cvtepi32_ps(hsum4_epi32(dot)), dd, chain);
            continue;
        }
#pragma GCC unroll 4
        for (int r = 0; r < NR; ++r) {
            const uint8_t* blk = w + r * rb + b * kB;
            const __m128 dm = _mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<int>(load_u32(blk))));
            if constexpr (F::kMin) accm[r] = _mm_fmadd_ps(dm, sa, accm[r]);
            const __m128 dd = _mm_mul_ss(dm, da);
            const __m256i dot = dot_u8s8_acc(lanes0, F::ucodes(blk), av);
            acc[r] = _mm256_fmadd_ps(_mm256_broadcastss_ps(dd), _mm256_cvtepi32_ps(dot), acc[r]);
        }
    }
    if constexpr (F::kChain) {
        _mm_storeu_ps(out, chain);
        return;
    }
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) {
        const float summs = _mm_cvtss_f32(_mm_movehdup_ps(accm[r]));
        out[r] = F::kMin ? hsum_ps(acc[r]) + summs : hsum_ps(acc[r]);
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

// Q4_K / Q5_K scales and mins as int16 multipliers: sc16 = sc[0..7] in both 128-bit halves (for
// lane_scale), mn16 = m[j] for 16-groups 2j and 2j + 1 (to madd with the activations' bsums).
struct K4Scales {
    __m256i sc16, mn16;
};
HL_INLINE K4Scales k4_scales(const uint8_t* s) {
    const __m128i scmn = scale_min_k4(s);  // bytes 0-7: sc[j], 8-15: m[j]
    return {_mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(scmn)),
            _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(scmn, scmn))};
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
// One 64-element chunk c (sub-blocks 2c, 2c + 1) of a Q4_K block, unpacked with its two scales;
// dot(q8) is the chunk's scaled integer dot with 64 activation codes, in 8 int32 lanes.
struct Q4KChunk {
    __m256i lo, hi, s_lo, s_hi;
    HL_INLINE Q4KChunk(const block_q4_K* x, __m256i sc16, int c) {
        const __m256i v = loadu256(x->qs + 32 * c);
        lo = _mm256_and_si256(v, _mm256_set1_epi8(0x0f));
        hi = high_nibbles(v);
        s_lo = lane_scale(sc16, 2 * c);
        s_hi = lane_scale(sc16, 2 * c + 1);
    }
    HL_INLINE __m256i dot(const int8_t* q8) const {
        const __m256i t = dot_u8s8_scaled_acc(_mm256_setzero_si256(), lo, loadu256(q8), s_lo);
        return dot_u8s8_scaled_acc(t, hi, loadu256(q8 + 32), s_hi);
    }
};

// dot_q4_K for four activation rows that ggml_gemm takes in one group (all per-pair spans): the
// float side runs across the rows, lane i of each 4-float vector being row i's chain, so each
// output sees exactly dot_q4_K's sequence of FMAs. The integer sums are reduced straight into
// per-pair vectors over the rows (exact integers, any order).
HL_INLINE void q4_K_gemm4(int64_t cols, const uint8_t* w, const KRows* r, const float* d_t, int64_t ld,
                          float* out, int64_t os) {
    const int64_t nb = cols / QK_K;
    __m128 acc = _mm_setzero_ps(), accm = _mm_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
        const auto* x = reinterpret_cast<const block_q4_K*>(w) + b;
        prefetch_ahead(x, sizeof(*x));
        const auto [sc16, mn16] = k4_scales(x->scales);
        __m128i isum[4];  // isum[c]: lane i = row i's integer sum over sub-blocks 2c, 2c + 1
#pragma GCC unroll 4
        for (int c = 0; c < 4; ++c) {
            const Q4KChunk chunk(x, sc16, c);
            __m256i t[4];
            for (int i = 0; i < 4; ++i) t[i] = chunk.dot(r[i].aq + b * QK_K + 64 * c);
            isum[c] = hsum4_epi32(t);
        }
        // Min sums: lane j of pm = m[j] (bsum[2j] + bsum[2j + 1]); the span of pair c is j = 2c, 2c + 1.
        __m256i pm[4];
        for (int i = 0; i < 4; ++i) pm[i] = _mm256_madd_epi16(loadu256(r[i].bs + b * 16), mn16);
        const __m256i p01 = _mm256_hadd_epi32(pm[0], pm[1]);  // r0c0 r0c1 r1c0 r1c1 | r0c2 r0c3 r1c2 r1c3
        const __m256i p23 = _mm256_hadd_epi32(pm[2], pm[3]);
        const __m128 lo01 = _mm_castsi128_ps(_mm256_castsi256_si128(p01)), hi01 = _mm_castsi128_ps(_mm256_extracti128_si256(p01, 1));
        const __m128 lo23 = _mm_castsi128_ps(_mm256_castsi256_si128(p23)), hi23 = _mm_castsi128_ps(_mm256_extracti128_si256(p23, 1));
        const __m128i imin[4] = {
            _mm_castps_si128(_mm_shuffle_ps(lo01, lo23, 0x88)), _mm_castps_si128(_mm_shuffle_ps(lo01, lo23, 0xdd)),
            _mm_castps_si128(_mm_shuffle_ps(hi01, hi23, 0x88)), _mm_castps_si128(_mm_shuffle_ps(hi01, hi23, 0xdd))};
        const __m128 da = _mm_loadu_ps(d_t + b * ld);
        const __m128 dd = _mm_mul_ps(_mm_set1_ps(load_f16(x->d)), da);
        const __m128 dm = _mm_mul_ps(_mm_set1_ps(load_f16(x->dmin)), da);
        for (int c = 0; c < 4; ++c) {
            acc = _mm_fmadd_ps(_mm_cvtepi32_ps(isum[c]), dd, acc);
            accm = _mm_fmadd_ps(_mm_cvtepi32_ps(imin[c]), dm, accm);
        }
    }
    alignas(16) float res[4];
    _mm_store_ps(res, _mm_sub_ps(acc, accm));
    for (int i = 0; i < 4; ++i) out[i * os] = res[i];
}

template <int NA>
void dot_q4_K(int64_t cols, const uint8_t* w, const QActs& a, int64_t a0, float* out, int64_t os) {
    KRows r[NA];
    k_rows<NA>(a, a0, cols, r);
    const int64_t nb = cols / QK_K;
    const int64_t gemm_rows = a.n_call - a.n_call % 4;
    if constexpr (NA == 4) {
        if (a0 + 3 < gemm_rows) return q4_K_gemm4(cols, w, r, a.d_t + a0, a.n, out, os);
    }
    bool per_pair[NA];
    float acc[NA], accm[NA];
    for (int i = 0; i < NA; ++i) {
        per_pair[i] = a0 + i < gemm_rows;
        acc[i] = accm[i] = 0.0f;
    }
    for (int64_t b = 0; b < nb; ++b) {
        const auto* x = reinterpret_cast<const block_q4_K*>(w) + b;
        prefetch_ahead(x, sizeof(*x));
        const float dw = load_f16(x->d), dmw = load_f16(x->dmin);
        const auto [sc16, mn16] = k4_scales(x->scales);
        __m256i tot[NA], pair[NA][4];
        for (int i = 0; i < NA; ++i) tot[i] = _mm256_setzero_si256();
#pragma GCC unroll 4
        for (int c = 0; c < 4; ++c) {
            const Q4KChunk chunk(x, sc16, c);
            for (int i = 0; i < NA; ++i) {
                const __m256i t = chunk.dot(r[i].aq + b * QK_K + 64 * c);
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


// Q4_K matvec (ggml_gemv order: one float step per super-block), MATVEC_NR rows side by side:
// the activation block is loaded once for the 4 rows, the 4 rows' integer sums are reduced
// together, and lane r of one 4-float FMA is row r's chain (the same arithmetic as dot_q4_K).
void matvec_q4_K(int64_t cols, const uint8_t* w, const QActs& a, int64_t a0, float* out) {
    constexpr int NR = MATVEC_NR;
    static_assert(NR == 4, "the reductions pack 4 rows");
    if (a0 < a.n_call - a.n_call % 4) {  // a row of a ggml_gemm group: the other order
        for (int r = 0; r < NR; ++r) dot_q4_K<1>(cols, w + r * (cols / QK_K) * sizeof(block_q4_K), a, a0, out + r, 0);
        return;
    }
    const int64_t nb = cols / QK_K, rb = nb * static_cast<int64_t>(sizeof(block_q4_K));
    const int8_t* aq = a.qs + a0 * cols;
    const float* ad = a.d + a0 * nb;
    const int16_t* abs = a.bsums + a0 * (cols / 16);
    __m128 acc = _mm_setzero_ps(), accm = _mm_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
        const int64_t dist = std::max<int64_t>(NR * rb, kGroupPrefetchMin), step = NR * static_cast<int64_t>(sizeof(block_q4_K));
        for (int64_t o = 0; o < step; o += 128) prefetch_next_group(w, dist + o, b * step);
        __m256i av[8];
        for (int k = 0; k < 8; ++k) av[k] = loadu256(aq + b * QK_K + 32 * k);
        const __m256i bs16 = loadu256(abs + b * 16);
        __m256i isum[NR], imin[NR];
        __m128i dh = _mm_setzero_si128(), mh = _mm_setzero_si128();
#pragma GCC unroll 4
        for (int r = 0; r < NR; ++r) {
            const auto* x = reinterpret_cast<const block_q4_K*>(w + r * rb) + b;
            dh = _mm_insert_epi16(dh, load_u16(x->d), r);
            mh = _mm_insert_epi16(mh, load_u16(x->dmin), r);
            const auto [sc16, mn16] = k4_scales(x->scales);
            imin[r] = _mm256_madd_epi16(bs16, mn16);
            __m256i t = _mm256_setzero_si256();
#pragma GCC unroll 4
            for (int c = 0; c < 4; ++c) {
                const __m256i v = loadu256(x->qs + 32 * c);
                t = dot_u8s8_scaled_acc(t, _mm256_and_si256(v, _mm256_set1_epi8(0x0f)), av[2 * c], lane_scale(sc16, 2 * c));
                t = dot_u8s8_scaled_acc(t, high_nibbles(v), av[2 * c + 1], lane_scale(sc16, 2 * c + 1));
            }
            isum[r] = t;
        }
        const __m128 da = _mm_broadcast_ss(ad + b);
        acc = _mm_fmadd_ps(_mm_cvtepi32_ps(hsum4_epi32(isum)), _mm_mul_ps(_mm_cvtph_ps(dh), da), acc);
        accm = _mm_fmadd_ps(_mm_cvtepi32_ps(hsum4_epi32(imin)), _mm_mul_ps(_mm_cvtph_ps(mh), da), accm);
    }
    _mm_storeu_ps(out, _mm_sub_ps(acc, accm));
}

// Bit j of every byte of hv, moved to bit 4 (the fifth bit of a Q5_K code).
HL_INLINE __m256i hbit4(__m256i hv, int j) {
    const __m256i t = j <= 4 ? _mm256_slli_epi16(hv, 4 - j) : _mm256_srli_epi16(hv, j - 4);
    return _mm256_and_si256(t, _mm256_set1_epi8(0x10));
}

// Q5_K: as Q4_K with q = nibble | hbit << 4. Float side as llama.cpp (Q5_K is not repacked on
// x86): for calls of fewer than 8 activation rows ggml_vec_dot_q5_K_q8_K (8 integer lanes as
// Q6_K's, acc8 = fma(d * da, lanes, acc8); summs = fma(-(da * dmin), float(imin), summs) per
// super-block; hsum_float_8(acc8) + summs), from 8 rows on ggml's tiled K-quant matmul (per
// super-block res = fma(-dmin, float(imin), float(isum) * d); acc = fma(res, da, acc)).
template <int NA>
void dot_q5_K(int64_t cols, const uint8_t* w, const QActs& a, int64_t a0, float* out, int64_t os) {
    KRows r[NA];
    k_rows<NA>(a, a0, cols, r);
    const int64_t nb = cols / QK_K;
    const bool tiled = a.n_call >= 8;
    __m256 acc[NA];
    float accs[NA], summs[NA];
    for (int i = 0; i < NA; ++i) {
        acc[i] = _mm256_setzero_ps();
        accs[i] = summs[i] = 0.0f;
    }
    const __m256i low4 = _mm256_set1_epi8(0x0f);
    for (int64_t b = 0; b < nb; ++b) {
        const auto* x = reinterpret_cast<const block_q5_K*>(w) + b;
        prefetch_ahead(x, sizeof(*x));
        const float dw = load_f16(x->d), dmw = load_f16(x->dmin);
        const auto [sc16, mn16] = k4_scales(x->scales);
        // Two integer accumulators per row (even / odd sub-blocks) halve the dependency chain.
        __m256i isum[NA][2];
        for (int i = 0; i < NA; ++i) isum[i][0] = isum[i][1] = _mm256_setzero_si256();
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
        for (int i = 0; i < NA; ++i) {
            const float da = r[i].ad[b];
            const __m256i lanes = _mm256_add_epi32(isum[i][0], isum[i][1]);
            const float imin = static_cast<float>(hsum_epi32(_mm256_madd_epi16(loadu256(r[i].bs + b * 16), mn16)));
            if (tiled) {
                const float res = __builtin_fmaf(-dmw, imin, static_cast<float>(hsum_epi32(lanes)) * dw);
                accs[i] = __builtin_fmaf(res, da, accs[i]);
            } else {
                summs[i] = __builtin_fmaf(-(da * dmw), imin, summs[i]);
                acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(da * dw), _mm256_cvtepi32_ps(lanes), acc[i]);
            }
        }
    }
    for (int i = 0; i < NA; ++i) out[i * os] = tiled ? accs[i] : hsum_ps(acc[i]) + summs[i];
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
    const bool tiled = a.n_call >= 8;
    __m256 acc[NA];
    float accs[NA];
    __m128 acc4 = _mm_setzero_ps();  // NA == 4 and tiled: lane i is accs[i]
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
        if constexpr (NA == 4) {
            if (tiled) {  // the four rows' chains as the lanes of one vector, same arithmetic
                __m256i lanes[4];
                for (int i = 0; i < 4; ++i) lanes[i] = _mm256_add_epi32(isum[i][0], isum[i][1]);
                const __m128 t = _mm_mul_ps(_mm_cvtepi32_ps(hsum4_epi32(lanes)), _mm_set1_ps(d));
                acc4 = _mm_fmadd_ps(t, _mm_loadu_ps(a.d_t + b * a.n + a0), acc4);
                continue;
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
    if constexpr (NA == 4) {
        if (tiled) _mm_storeu_ps(accs, acc4);
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
void dot_bf16(int64_t cols, const uint8_t* w, const QActs& a, int64_t a0, float* out, int64_t os) {
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

// 8 activations from x[c], rounded to f16 for F16 weights (ggml converts the f32 operand of an
// f16 matmul to f16: vec_dot_type F16).
template <int WT>
HL_INLINE __m256 load8x(const float* x, int64_t c) {
    const __m256 v = _mm256_loadu_ps(x + c);
    if constexpr (WT == T_F16) return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    return v;
}

template <int WT>
HL_INLINE float load1x(const float* x, int64_t c) {
    if constexpr (WT == T_F16) return fp16_to_f32(_cvtss_sh(x[c], _MM_FROUND_TO_NEAREST_INT));
    return x[c];
}

// F32 / F16 weights, bit-exact with llama.cpp built for the same CPU. ggml's float vectors have
// L = 16 lanes on AVX-512 (held here as two 8-lane halves, lo = lanes 0-7, hi = 8-15) and 8 on
// AVX2:
//   tinyBLAS (llamafile_sgemm; calls of 2+ activation rows when cols % L == 0): one L-lane FMA
//     accumulator over the row, reduced by halving (_mm512_reduce_add_ps = add(lo, hi) then
//     hsum_ps; tinyBLAS's 8-lane hsum = hsum_ps).
//   ggml_vec_dot_f32 / _f16 (one activation row, or cols % L != 0): four L-lane accumulators fed
//     round-robin over each 4 L elements, folded (0+2, 1+3, then 0+1) and reduced (AVX-512 by
//     halving; AVX2: the 128-bit halves added, then two horizontal adds); the last cols % 4L
//     products are added after, in double for F16 and in float (rounded product) for F32.
constexpr int kFloatLanes = float_lanes();

template <int WT, int NA>
void dot_float(int64_t cols, const uint8_t* w, const QActs& a, int64_t a0, float* out, int64_t os) {
    constexpr int L = kFloatLanes, H = L / 8;  // H: 8-lane halves per ggml vector
    const float* x[NA];
    for (int i = 0; i < NA; ++i) x[i] = a.xf + (a0 + i) * a.ld;
    if (a.n_call >= 2 && cols % L == 0) {  // tinyBLAS
        __m256 acc[NA][H];
        for (int i = 0; i < NA; ++i)
            for (int h = 0; h < H; ++h) acc[i][h] = _mm256_setzero_ps();
        for (int64_t c = 0; c < cols; c += L) {
#pragma GCC unroll 2
            for (int h = 0; h < H; ++h) {
                const __m256 wv = load8w<WT>(w, c + 8 * h);
#pragma GCC unroll 4
                for (int i = 0; i < NA; ++i) acc[i][h] = _mm256_fmadd_ps(wv, load8x<WT>(x[i], c + 8 * h), acc[i][h]);
            }
        }
        for (int i = 0; i < NA; ++i) out[i * os] = hsum_ps(H == 2 ? _mm256_add_ps(acc[i][0], acc[i][H - 1]) : acc[i][0]);
        return;
    }
    const int64_t body = cols - cols % (4 * L);
    for (int i = 0; i < NA; ++i) {
        __m256 acc[4][H];
        for (int j = 0; j < 4; ++j)
            for (int h = 0; h < H; ++h) acc[j][h] = _mm256_setzero_ps();
        for (int64_t c = 0; c < body; c += 4 * L) {
#pragma GCC unroll 4
            for (int j = 0; j < 4; ++j)
#pragma GCC unroll 2
                for (int h = 0; h < H; ++h) {
                    const int64_t e = c + L * j + 8 * h;
                    acc[j][h] = _mm256_fmadd_ps(load8w<WT>(w, e), load8x<WT>(x[i], e), acc[j][h]);
                }
        }
        for (int h = 0; h < H; ++h) {
            acc[0][h] = _mm256_add_ps(acc[0][h], acc[2][h]);
            acc[1][h] = _mm256_add_ps(acc[1][h], acc[3][h]);
            acc[0][h] = _mm256_add_ps(acc[0][h], acc[1][h]);
        }
        float r;
        if constexpr (H == 2) {
            r = hsum_ps(_mm256_add_ps(acc[0][0], acc[0][1]));
        } else {
            const __m128 t0 = _mm_add_ps(_mm256_castps256_ps128(acc[0][0]), _mm256_extractf128_ps(acc[0][0], 1));
            const __m128 t1 = _mm_hadd_ps(t0, t0);
            r = _mm_cvtss_f32(_mm_hadd_ps(t1, t1));
        }
        if constexpr (WT == T_F16) {
            double sum = r;
            for (int64_t t = body; t < cols; ++t) sum += static_cast<double>(load1w<WT>(w, t) * load1x<WT>(x[i], t));
            out[i * os] = static_cast<float>(sum);
        } else {
            float sum = r;
            // ggml rounds the product before adding (scalar builtins: never contracted to an FMA)
            for (int64_t t = body; t < cols; ++t)
                sum = _mm_cvtss_f32(_mm_add_ss(_mm_set_ss(sum), _mm_mul_ss(_mm_set_ss(load1w<WT>(w, t)), _mm_set_ss(x[i][t]))));
            out[i * os] = sum;
        }
    }
}

template <int NA>
RowKernel pick(int type, int kind) {
    if (kind != act_kind_for(type)) return nullptr;
    switch (type) {
        case T_F32: return dot_float<T_F32, NA>;
        case T_F16: return dot_float<T_F16, NA>;
        case T_BF16: return dot_bf16<T_BF16, NA>;
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

MatvecKernel get_matvec_kernel_avx2(int type, int kind) {
    if (kind != act_kind_for(type)) return nullptr;
    switch (type) {
        case T_Q4_0: return matvec32<Fmt4_0>;
        case T_Q4_1: return matvec32<Fmt4_1>;
        case T_Q5_0: return matvec32<Fmt5_0>;
        case T_Q5_1: return matvec32<Fmt5_1>;
        case T_Q4_K: return matvec_q4_K;
        // Q8_0: its row kernel alone streams faster (27 vs 22 GB/s on one core); its 34-byte
        // blocks leave the FMA chain's latency off the critical path.
        default: return nullptr;
    }
}

// The tile of `type` with NA activation rows, or nullptr. Q4_0 has none (its order is a scalar
// chain). Q8_0 dots its codes + 128 from start lanes -128 * (lane sums): exact in vpdpbusd's int32
// lanes, but over maddubs' int16 pairs (255 * 127 * 2), so only the 512-bit tile takes it. The
// 256-bit tile has no wide form: its 2 x 8 accumulators would not fit the 16 vector registers;
// the 256-bit builds' wide kernel of Q8_0 is rows_wide, one weight row at a time.
template <int NA>
TileKernel tile_for(int type) {
#if defined(HL_TILE32_VNNI512)
    switch (type) {
        case T_Q4_1: return tile32_pair512<Fmt4_1, NA>;
        case T_Q5_0: return tile32_pair512<Fmt5_0, NA>;
        case T_Q5_1: return tile32_pair512<Fmt5_1, NA>;
        case T_Q8_0: return tile32_pair512<Fmt8_0, NA>;
        default: return nullptr;
    }
#else
    if constexpr (NA == WIDE_NA) return type == T_Q8_0 ? rows_wide<Fmt8_0> : nullptr;
    if constexpr (NA != MAX_NA) return nullptr;
    switch (type) {
        case T_Q4_1: return tile32<Fmt4_1>;
        case T_Q5_0: return tile32<Fmt5_0>;
        case T_Q5_1: return tile32<Fmt5_1>;
        default: return nullptr;
    }
#endif
}

TileKernel get_wide_tile_kernel_avx2(int type, int kind) {
    return kind == act_kind_for(type) ? tile_for<WIDE_NA>(type) : nullptr;
}

TileKernel get_widest_tile_kernel_avx2(int type, int kind) {
#if defined(HL_TILE32_VNNI512)
    return kind == act_kind_for(type) ? tile_for<WIDEST_NA>(type) : nullptr;
#else
    (void)type, (void)kind;
    return nullptr;  // 2 x 16 accumulators: only the 512-bit tile has the registers
#endif
}

TileKernel get_tile_kernel_avx2(int type, int kind) {
    return kind == act_kind_for(type) ? tile_for<MAX_NA>(type) : nullptr;
}

TileKernel get_widest_quad_tile_kernel_avx2(int type, int kind) {
#if defined(HL_TILE32_VNNI512)
    // Q4_1 gained 2-3% alone and nothing in a 16-row step (pair tile 24.2 / 24.8 / 25.0 ms,
    // quad 24.1 / 24.5 / 25.4 ms, alternated): it keeps the pair tile.
    return type == T_Q8_0 && kind == act_kind_for(type) ? tile32_quad512_widest<Fmt8_0> : nullptr;
#else
    (void)type, (void)kind;
    return nullptr;
#endif
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
TileKernel get_tile_kernel_avx2(int, int) { return nullptr; }
TileKernel get_wide_tile_kernel_avx2(int, int) { return nullptr; }
TileKernel get_widest_tile_kernel_avx2(int, int) { return nullptr; }
TileKernel get_widest_quad_tile_kernel_avx2(int, int) { return nullptr; }
MatvecKernel get_matvec_kernel_avx2(int, int) { return nullptr; }

#endif

}  // namespace hl
