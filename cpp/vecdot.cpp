// Activation quantizers (float rows -> ACT_Q8_32 / ACT_Q8_K) and kernel selection.
//
// The SIMD and scalar quantizers give identical bytes (same scale, same x * (127 / amax)
// product, round-half-even in both), so switching paths only changes the weight kernels.
#include "vecdot.h"

#include <cmath>
#include <cstring>

#include "matmul.h"
#include "quants.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace hl {

int act_kind_for(int type) {
    switch (type) {
        case T_F32:
        case T_F16:
        case T_BF16: return ACT_F32;
        case T_Q4_1:
        case T_Q5_1: return ACT_Q8_1;
        case T_Q4_0:
        case T_Q5_0:
        case T_Q8_0: return ACT_Q8_32;
        default: return ACT_Q8_K;
    }
}

namespace {

constexpr size_t align64(size_t v) { return (v + 63) & ~size_t{63}; }

// Bytes of each array, in the order they sit in the buffer (nb = cols / block size):
//   ACT_Q8_32:  qs [n][cols] int8 | d [n][nb] | s [n][nb] | d_t [nb][n] | s_t | q5_start [n][cols/4] int32
//               | q8_start [n][cols/4] int32
//   ACT_Q8_1:   qs [n][cols] int8 | d [n][nb] | s [n][nb] | d_t [nb][n] | s_t [nb][n] | d_magic [n][nb]
//   ACT_Q8_K:   qs [n][cols] int8 | d [n][nb] float | bsums [n][cols/16] int16 | d_t [nb][n]
struct Sizes {
    size_t qs, d, extra, d_t, s_t, q5_start, q8_start, d_magic;
    size_t total() const { return qs + d + extra + d_t + s_t + q5_start + q8_start + d_magic; }
};

Sizes sizes(int kind, int64_t n, int64_t cols) {
    const size_t nn = static_cast<size_t>(n), cc = static_cast<size_t>(cols);
    if (kind == ACT_Q8_32 || kind == ACT_Q8_1) {
        const size_t per_block = align64(nn * (cc / QK) * 4);
        const size_t start = kind == ACT_Q8_32 ? align64(nn * cc) : 0;  // (cols / 4) int32 a row
        const size_t d_magic = kind == ACT_Q8_1 ? per_block : 0;
        return {align64(nn * cc), per_block, per_block, per_block, per_block, start, start, d_magic};
    }
    if (kind == ACT_Q8_K) return {align64(nn * cc), align64(nn * (cc / QK_K) * 4), align64(nn * (cc / 16) * 2), align64(nn * (cc / QK_K) * 4), 0, 0, 0, 0};
    return {0, 0, 0, 0, 0, 0, 0, 0};
}

// -16 and -128 times the sums of each 4 consecutive codes (the offsets of Q5_0's codes and of
// Q8_0's codes + 128, in dot_u8s8's int32 lanes).
void start_lanes(const int8_t* q, int64_t cols, int32_t* lanes16, int32_t* lanes128) {
    for (int64_t l = 0; l < cols / 4; ++l) {
        const int32_t sum = q[4 * l] + q[4 * l + 1] + q[4 * l + 2] + q[4 * l + 3];
        lanes16[l] = -16 * sum;
        lanes128[l] = -128 * sum + kFloatMagicBits;
    }
}

// float -> nearest IEEE half (round to nearest even), back to float: llama.cpp's
// GGML_FP32_TO_FP16 (F16C vcvtps2ph, or the same rounding in software).
inline float round_to_f16(float f) {
#if defined(__F16C__)
    return _cvtsh_ss(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT));
#else
    uint32_t x;
    std::memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000u;
    const uint32_t ax = x & 0x7fffffffu;
    uint16_t h;
    if (ax > 0x7f800000u) {
        h = static_cast<uint16_t>(sign | 0x7e00u | ((ax >> 13) & 0x3ffu));
    } else if (ax >= 0x477ff000u) {
        h = static_cast<uint16_t>(sign | 0x7c00u);
    } else if (ax < 0x38800000u) {
        float a;
        std::memcpy(&a, &ax, 4);
        h = static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(a * 16777216.0f)));
    } else {
        h = static_cast<uint16_t>(sign | ((ax + 0xfffu + ((ax >> 13) & 1u) - 0x38000000u) >> 13));
    }
    return fp16_to_f32(h);
#endif
}

// One 32-block: q = round(x * 127 / amax); returns sum(q) and writes the scale to *d.
inline int quantize_block32(const float* x, int8_t* q, float* d) {
#if defined(__AVX2__)
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 v0 = _mm256_loadu_ps(x), v1 = _mm256_loadu_ps(x + 8);
    __m256 v2 = _mm256_loadu_ps(x + 16), v3 = _mm256_loadu_ps(x + 24);
    __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                             _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float amax = _mm_cvtss_f32(m4);
    *d = amax / 127.0f;
    const __m256 id = _mm256_set1_ps(amax != 0.0f ? 127.0f / amax : 0.0f);
    // cvtps rounds half to even under the default MXCSR, like nearbyint in the scalar path.
    const __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, id));
    const __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, id));
    const __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, id));
    const __m256i i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, id));
    // packs work within 128-bit lanes, giving order (0,2,1,3)-interleaved dwords; permute back.
    const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
    const __m256i qv = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), qv);
    __m256i s = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
    return _mm_cvtsi128_si32(s4);
#else
    float amax = 0.0f;
    for (int j = 0; j < QK; ++j) amax = std::fmax(amax, std::fabs(x[j]));
    *d = amax / 127.0f;
    const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
    int sum = 0;
    for (int j = 0; j < QK; ++j) {
        const int v = static_cast<int>(std::nearbyint(x[j] * id));
        q[j] = static_cast<int8_t>(v);
        sum += v;
    }
    return sum;
#endif
}

// q8_1 = true: llama.cpp's quantize_row_q8_1 (d and s = d_f32 * sum rounded to fp16); else
// quantize_row_q8_0 (d rounded to fp16) with s = d * sum from the stored d.
void quantize_row_q8_32(const float* x, int64_t cols, int8_t* q, float* d, float* s, bool q8_1) {
    for (int64_t b = 0; b < cols / QK; ++b) {
        float df = 0.0f;
        const int sum = quantize_block32(x + b * QK, q + b * QK, &df);
        d[b] = round_to_f16(df);
        s[b] = q8_1 ? round_to_f16(df * static_cast<float>(sum)) : d[b] * static_cast<float>(sum);
    }
}

// One 256-block with a single scale; bsums[g] = sum of q over elements 16 g .. 16 g + 15.
void quantize_block_q8_K(const float* x, int8_t* q, float* d, int16_t* bsums) {
#if defined(__AVX2__)
    __m256 m = _mm256_setzero_ps();
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int j = 0; j < QK_K; j += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + j)));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    const float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
#else
    float amax = 0.0f;
    for (int j = 0; j < QK_K; ++j) amax = std::fmax(amax, std::fabs(x[j]));
#endif
    // llama.cpp's quantize_row_q8_K: iscale = -127 / max (max = the signed value of largest
    // magnitude) and d = 1 / iscale. The sign flips both d and q, so products are unchanged and
    // only |d| = 1 / (127 / amax) matters; it differs from amax / 127 in the last bit.
    const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
    *d = amax != 0.0f ? 1.0f / id : 0.0f;
#if defined(__AVX2__)
    const __m256 vid = _mm256_set1_ps(id);
    for (int j = 0; j < QK_K; j += 32) {
        const __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + j), vid));
        const __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + j + 8), vid));
        const __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + j + 16), vid));
        const __m256i i3 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + j + 24), vid));
        const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + j),
                            _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
        // Sums of elements 0-15 and 16-31: horizontal adds leave [a0..a3 | b0..b3] style partials.
        const __m256i s01 = _mm256_add_epi32(i0, i1), s23 = _mm256_add_epi32(i2, i3);
        __m256i h = _mm256_hadd_epi32(s01, s23);  // lanes: s01[0..3]+pairs, s23 pairs per 128
        h = _mm256_hadd_epi32(h, h);
        const __m128i t = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
        bsums[j / 16] = static_cast<int16_t>(_mm_extract_epi32(t, 0));
        bsums[j / 16 + 1] = static_cast<int16_t>(_mm_extract_epi32(t, 1));
    }
#else
    for (int g = 0; g < QK_K / 16; ++g) {
        int sum = 0;
        for (int j = 16 * g; j < 16 * g + 16; ++j) {
            const int v = static_cast<int>(std::nearbyint(x[j] * id));
            q[j] = static_cast<int8_t>(v);
            sum += v;
        }
        bsums[g] = static_cast<int16_t>(sum);
    }
#endif
}

}  // namespace

size_t acts_bytes(int kind, int64_t n, int64_t cols) {
    return sizes(kind, n, cols).total();
}

QActs acts_layout(int kind, int64_t n, int64_t cols, void* buf, const float* x) {
    QActs a;
    a.kind = kind;
    a.n = n;
    a.n_call = n;
    a.cols = cols;
    if (kind == ACT_F32) {
        a.xf = x;
        a.ld = cols;
        return a;
    }
    const Sizes s = sizes(kind, n, cols);
    auto* base = static_cast<uint8_t*>(buf);
    a.qs = reinterpret_cast<const int8_t*>(base);
    a.d = reinterpret_cast<const float*>(base + s.qs);
    if (kind == ACT_Q8_32 || kind == ACT_Q8_1) {
        a.s = reinterpret_cast<const float*>(base + s.qs + s.d);
        a.d_t = reinterpret_cast<const float*>(base + s.qs + s.d + s.extra);
        a.s_t = reinterpret_cast<const float*>(base + s.qs + s.d + s.extra + s.d_t);
        if (kind == ACT_Q8_32) {
            a.q5_start = reinterpret_cast<const int32_t*>(base + s.qs + s.d + s.extra + s.d_t + s.s_t);
            a.q8_start = reinterpret_cast<const int32_t*>(base + s.qs + s.d + s.extra + s.d_t + s.s_t + s.q5_start);
        } else {
            a.d_magic = reinterpret_cast<const float*>(base + s.qs + s.d + s.extra + s.d_t + s.s_t);
        }
    } else {
        a.bsums = reinterpret_cast<const int16_t*>(base + s.qs + s.d);
        a.d_t = reinterpret_cast<const float*>(base + s.qs + s.d + s.extra);
    }
    return a;
}

void quantize_acts_rows(const QActs& a, const float* x, int64_t r0, int64_t r1) {
    const int64_t cols = a.cols;
    for (int64_t r = r0; r < r1; ++r) {
        const float* xr = x + r * cols;
        auto* q = const_cast<int8_t*>(a.qs) + r * cols;  // ACT_Q8_32 / ACT_Q8_K row
        if (a.kind == ACT_Q8_32 || a.kind == ACT_Q8_1) {
            const int64_t nb = cols / QK;
            const float* d = a.d + r * nb;
            const float* s = a.s + r * nb;
            quantize_row_q8_32(xr, cols, q, const_cast<float*>(d), const_cast<float*>(s), a.kind == ACT_Q8_1);
            for (int64_t b = 0; b < nb; ++b) {
                const_cast<float*>(a.d_t)[b * a.n + r] = d[b];
                const_cast<float*>(a.s_t)[b * a.n + r] = s[b];
                if (a.d_magic != nullptr) const_cast<float*>(a.d_magic)[r * nb + b] = d[b] * kFloatMagic;
            }
            if (a.q5_start != nullptr)
                start_lanes(q, cols, const_cast<int32_t*>(a.q5_start) + r * (cols / 4),
                            const_cast<int32_t*>(a.q8_start) + r * (cols / 4));
        } else if (a.kind == ACT_Q8_K) {
            const int64_t nb = cols / QK_K;
            float* d = const_cast<float*>(a.d) + r * nb;
            int16_t* bs = const_cast<int16_t*>(a.bsums) + r * (cols / 16);
            for (int64_t b = 0; b < nb; ++b) {
                quantize_block_q8_K(xr + b * QK_K, q + b * QK_K, d + b, bs + b * (QK_K / 16));
                const_cast<float*>(a.d_t)[b * a.n + r] = d[b];
            }
        }
    }
}

TileKernel get_tile_kernel(int type, int act_kind) {
    return force_scalar() ? nullptr : get_tile_kernel_avx2(type, act_kind);
}

TileKernel get_wide_tile_kernel(int type, int act_kind) {
    return force_scalar() ? nullptr : get_wide_tile_kernel_avx2(type, act_kind);
}

TileKernel get_widest_tile_kernel(int type, int act_kind) {
    return force_scalar() ? nullptr : get_widest_tile_kernel_avx2(type, act_kind);
}

TileKernel get_widest_quad_tile_kernel(int type, int act_kind) {
    return force_scalar() ? nullptr : get_widest_quad_tile_kernel_avx2(type, act_kind);
}

MatvecKernel get_matvec_kernel(int type, int act_kind) {
    return force_scalar() ? nullptr : get_matvec_kernel_avx2(type, act_kind);
}

RowKernel get_kernel(int type, int na, int act_kind) {
    if (na < 1 || na > MAX_NA) return nullptr;
    if (!force_scalar())
        if (RowKernel k = get_kernel_avx2(type, na, act_kind)) return k;
    return get_kernel_scalar(type, na, act_kind);
}

const char* simd_path_compiled() {
    // Base AVX2 path plus the optional extensions the kernels use when the build targets them.
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
    return "avx2+fma+f16c"
#if defined(__AVX512F__)
           "+avx512f"
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
           "+avx512vnni"
#elif defined(__AVXVNNI__)
           "+avxvnni"
#endif
#if defined(__AVX512BW__) && defined(__AVX512VL__)
           "+avx512bw"
#endif
#if defined(__GFNI__)
           "+gfni"
#endif
        ;
#else
    return "scalar";
#endif
}

}  // namespace hl
