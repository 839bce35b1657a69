// Portable scalar row kernels: the path used when the build has no AVX2, and a reference for the
// SIMD kernels (selectable at run time with set_force_scalar, so tests cover it on any machine).
//
// Same arithmetic as the SIMD kernels: integer block dots against the quantized activations,
// then float scales. The weight block is decoded once into a small canonical form and dotted with
// the NA activation rows:
//   32-blocks: int q[32] (value = d * q, or d * q + m for the formats with a min)
//   K-quants:  uint8 u[256], per 16-group int scale sc[g] and min mn[g]:
//              value = d * sc[g] * u - dmin * mn[g]   (Q3_K / Q6_K offsets become mins, dmin = d)
#include <cmath>

#include "quants.h"
#include "vecdot.h"

namespace hl {
namespace {

struct Blk32 {
    int q[QK];
    float d, m;
};

template <int T>
inline void decode32(const uint8_t* b, Blk32* o) {
    if constexpr (T == T_Q4_0) {
        const auto* x = reinterpret_cast<const block_q4_0*>(b);
        o->d = load_f16(x->d);
        o->m = 0.0f;
        for (int j = 0; j < 16; ++j) {
            o->q[j] = (x->qs[j] & 15) - 8;
            o->q[j + 16] = (x->qs[j] >> 4) - 8;
        }
    } else if constexpr (T == T_Q4_1) {
        const auto* x = reinterpret_cast<const block_q4_1*>(b);
        o->d = load_f16(x->d);
        o->m = load_f16(x->m);
        for (int j = 0; j < 16; ++j) {
            o->q[j] = x->qs[j] & 15;
            o->q[j + 16] = x->qs[j] >> 4;
        }
    } else if constexpr (T == T_Q5_0 || T == T_Q5_1) {
        const bool has_min = T == T_Q5_1;
        const uint8_t* p = b + (has_min ? 4 : 2);  // qh
        const uint32_t qh = load_u32(p);
        const uint8_t* qs = p + 4;
        o->d = load_f16(b);
        o->m = has_min ? load_f16(b + 2) : 0.0f;
        const int off = has_min ? 0 : 16;
        for (int j = 0; j < 16; ++j) {
            o->q[j] = ((qs[j] & 15) | (((qh >> j) & 1) << 4)) - off;
            o->q[j + 16] = ((qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - off;
        }
    } else {  // Q8_0
        const auto* x = reinterpret_cast<const block_q8_0*>(b);
        o->d = load_f16(x->d);
        o->m = 0.0f;
        for (int j = 0; j < QK; ++j) o->q[j] = x->qs[j];
    }
}

template <int T, size_t BYTES, int NA>
void dot32_scalar(int64_t cols, const uint8_t* w, const QActs& a, int64_t a0, float* out, int64_t os) {
    const int64_t nb = cols / QK;
    float sum[NA] = {};
    Blk32 blk;
    for (int64_t b = 0; b < nb; ++b) {
        decode32<T>(w + b * BYTES, &blk);
        for (int i = 0; i < NA; ++i) {
            const int8_t* q8 = a.qs + (a0 + i) * cols + b * QK;
            int isum = 0;
            for (int j = 0; j < QK; ++j) isum += blk.q[j] * q8[j];
            const int64_t k = (a0 + i) * nb + b;
            sum[i] += blk.d * a.d[k] * static_cast<float>(isum) + blk.m * a.s[k];
        }
    }
    for (int i = 0; i < NA; ++i) out[i * os] = sum[i];
}

// Q4_1 against ACT_Q8_1 in ggml_vec_dot_q4_1_q8_1's AVX2 order (the same bits as the AVX2 kernel
// and as llama.cpp): 8 float lanes, lane l taking the integer dot of elements 4l .. 4l + 3 of
// the unpacked block (low nibbles 0-15, high nibbles 16-31), acc[l] = fma(dw * da, dot, acc[l]);
// summs = fma(m, s, summs); result = hsum_float_8(acc) + summs.
template <int NA>
void dot_q4_1_exact_scalar(int64_t cols, const uint8_t* w, const QActs& a, int64_t a0, float* out,
                           int64_t os) {
    const int64_t nb = cols / QK;
    for (int i = 0; i < NA; ++i) {
        const int8_t* aq = a.qs + (a0 + i) * cols;
        const float* ad = a.d + (a0 + i) * nb;
        const float* as = a.s + (a0 + i) * nb;
        float acc[8] = {};
        float summs = 0.0f;
        for (int64_t b = 0; b < nb; ++b) {
            const auto* x = reinterpret_cast<const block_q4_1*>(w + b * sizeof(block_q4_1));
            const float d0 = load_f16(x->d), m0 = load_f16(x->m);
            summs = std::fma(m0, as[b], summs);
            const float d0d1 = d0 * ad[b];
            const int8_t* q8 = aq + b * QK;
            for (int l = 0; l < 8; ++l) {
                int t = 0;
                for (int e = 4 * l; e < 4 * l + 4; ++e) {
                    const int u = e < 16 ? (x->qs[e] & 15) : (x->qs[e - 16] >> 4);
                    t += u * q8[e];
                }
                acc[l] = std::fma(d0d1, static_cast<float>(t), acc[l]);
            }
        }
        float r4[4];
        for (int l = 0; l < 4; ++l) r4[l] = acc[4 + l] + acc[l];
        const float h0 = r4[0] + r4[2], h1 = r4[1] + r4[3];
        out[i * os] = (h0 + h1) + summs;
    }
}

struct BlkK {
    uint8_t u[QK_K];
    int sc[16], mn[16];
    float d, dmin;
};

template <int T>
inline void decodeK(const uint8_t* b, BlkK* o) {
    if constexpr (T == T_Q2_K) {
        const auto* x = reinterpret_cast<const block_q2_K*>(b);
        o->d = load_f16(x->d);
        o->dmin = load_f16(x->dmin);
        for (int g = 0; g < 16; ++g) {
            o->sc[g] = x->scales[g] & 15;
            o->mn[g] = x->scales[g] >> 4;
        }
        for (int e = 0; e < QK_K; ++e)
            o->u[e] = (x->qs[32 * (e / 128) + e % 32] >> (2 * ((e / 32) % 4))) & 3;
    } else if constexpr (T == T_Q3_K) {
        const auto* x = reinterpret_cast<const block_q3_K*>(b);
        o->d = o->dmin = load_f16(x->d);
        int8_t s[16];
        unpack_scales_q3_K(x->scales, s);
        for (int g = 0; g < 16; ++g) {
            o->sc[g] = s[g];
            o->mn[g] = 4 * s[g];
        }
        for (int e = 0; e < QK_K; ++e) {
            const int q2 = (x->qs[32 * (e / 128) + e % 32] >> (2 * ((e / 32) % 4))) & 3;
            o->u[e] = static_cast<uint8_t>(q2 | (((x->hmask[e % 32] >> (e / 32)) & 1) << 2));
        }
    } else if constexpr (T == T_Q4_K || T == T_Q5_K) {
        const uint8_t* p = b;
        o->d = load_f16(p);
        o->dmin = load_f16(p + 2);
        uint8_t sc[8], mn[8];
        unpack_scale_min_k4(p + 4, sc, mn);
        for (int g = 0; g < 16; ++g) {
            o->sc[g] = sc[g / 2];
            o->mn[g] = mn[g / 2];
        }
        const uint8_t* qh = p + 16;
        const uint8_t* qs = T == T_Q5_K ? p + 48 : p + 16;
        for (int e = 0; e < QK_K; ++e) {
            const int j = e / 32;
            int v = (qs[32 * (j / 2) + e % 32] >> (4 * (j % 2))) & 15;
            if constexpr (T == T_Q5_K) v |= ((qh[e % 32] >> j) & 1) << 4;
            o->u[e] = static_cast<uint8_t>(v);
        }
    } else {  // Q6_K
        const auto* x = reinterpret_cast<const block_q6_K*>(b);
        o->d = o->dmin = load_f16(x->d);
        for (int g = 0; g < 16; ++g) {
            o->sc[g] = x->scales[g];
            o->mn[g] = 32 * x->scales[g];
        }
        for (int e = 0; e < QK_K; ++e) {
            const int h = e / 128, p = e % 128;
            const int lo = (x->ql[64 * h + p % 64] >> (4 * (p / 64))) & 15;
            const int hi = (x->qh[32 * h + p % 32] >> (2 * (p / 32))) & 3;
            o->u[e] = static_cast<uint8_t>(lo | (hi << 4));
        }
    }
}

template <int T, size_t BYTES, int NA>
void dotK_scalar(int64_t cols, const uint8_t* w, const QActs& a, int64_t a0, float* out, int64_t os) {
    const int64_t nb = cols / QK_K;
    float sum[NA] = {};
    BlkK blk;
    for (int64_t b = 0; b < nb; ++b) {
        decodeK<T>(w + b * BYTES, &blk);
        for (int i = 0; i < NA; ++i) {
            const int8_t* q8 = a.qs + (a0 + i) * cols + b * QK_K;
            const int16_t* bs = a.bsums + (a0 + i) * (cols / 16) + b * 16;
            int isum = 0, msum = 0;
            for (int g = 0; g < 16; ++g) {
                int gs = 0;
                for (int l = 16 * g; l < 16 * g + 16; ++l) gs += blk.u[l] * q8[l];
                isum += blk.sc[g] * gs;
                msum += blk.mn[g] * bs[g];
            }
            const float da = a.d[(a0 + i) * nb + b];
            sum[i] += blk.d * da * static_cast<float>(isum) - blk.dmin * da * static_cast<float>(msum);
        }
    }
    for (int i = 0; i < NA; ++i) out[i * os] = sum[i];
}

template <int T>
inline float wval(const uint8_t* w, int64_t c) {
    if constexpr (T == T_F32) {
        float v;
        std::memcpy(&v, w + 4 * c, 4);
        return v;
    }
    if constexpr (T == T_F16) return fp16_to_f32(load_u16(w + 2 * c));
    return bf16_to_f32(load_u16(w + 2 * c));
}

template <int T, int NA>
void dotF_scalar(int64_t cols, const uint8_t* w, const QActs& a, int64_t a0, float* out, int64_t os) {
    float sum[NA] = {};
    for (int64_t c = 0; c < cols; ++c) {
        const float v = wval<T>(w, c);
        for (int i = 0; i < NA; ++i) sum[i] += v * a.xf[(a0 + i) * a.ld + c];
    }
    for (int i = 0; i < NA; ++i) out[i * os] = sum[i];
}

template <int NA>
RowKernel pick(int type) {
    switch (type) {
        case T_F32: return dotF_scalar<T_F32, NA>;
        case T_F16: return dotF_scalar<T_F16, NA>;
        case T_BF16: return dotF_scalar<T_BF16, NA>;
        case T_Q4_0: return dot32_scalar<T_Q4_0, sizeof(block_q4_0), NA>;
        case T_Q4_1: return dot_q4_1_exact_scalar<NA>;
        case T_Q5_0: return dot32_scalar<T_Q5_0, sizeof(block_q5_0), NA>;
        case T_Q5_1: return dot32_scalar<T_Q5_1, sizeof(block_q5_1), NA>;
        case T_Q8_0: return dot32_scalar<T_Q8_0, sizeof(block_q8_0), NA>;
        case T_Q2_K: return dotK_scalar<T_Q2_K, sizeof(block_q2_K), NA>;
        case T_Q3_K: return dotK_scalar<T_Q3_K, sizeof(block_q3_K), NA>;
        case T_Q4_K: return dotK_scalar<T_Q4_K, sizeof(block_q4_K), NA>;
        case T_Q5_K: return dotK_scalar<T_Q5_K, sizeof(block_q5_K), NA>;
        case T_Q6_K: return dotK_scalar<T_Q6_K, sizeof(block_q6_K), NA>;
        default: return nullptr;
    }
}

}  // namespace

RowKernel get_kernel_scalar(int type, int na, int act_kind) {
    static_assert(MAX_NA == 4, "instantiate the kernels for every tile height");
    const int want = act_kind_for(type);
    if (act_kind != want) return nullptr;
    switch (na) {
        case 1: return pick<1>(type);
        case 2: return pick<2>(type);
        case 3: return pick<3>(type);
        case 4: return pick<4>(type);
        default: return nullptr;
    }
}

}  // namespace hl
