// Dequantization, written to give the same bits as gguf.quants.dequantize: every element is
// computed with the same float operations in the same order as the numpy oracle (products of an
// f16 scale by small integers are exact in float32, so FMA contraction cannot change a result).
#include "dequant.h"

#include <omp.h>

#include <cstring>

#include "quants.h"

#if defined(__AVX2__) && defined(__F16C__)
#include <immintrin.h>
#endif

namespace hl {
namespace {

void deq_f16(const uint8_t* src, float* dst, int64_t n) {
    int64_t i = 0;
#if defined(__AVX2__) && defined(__F16C__)
    for (; i + 8 <= n; i += 8) {
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 2 * i));
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
    }
#endif
    for (; i < n; ++i) dst[i] = fp16_to_f32(load_u16(src + 2 * i));
}

void deq_bf16(const uint8_t* src, float* dst, int64_t n) {
    for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(load_u16(src + 2 * i));
}

void deq_q4_0(const uint8_t* src, float* y, int64_t nb) {
    for (int64_t b = 0; b < nb; ++b, y += QK) {
        const auto* x = reinterpret_cast<const block_q4_0*>(src) + b;
        const float d = load_f16(x->d);
        for (int j = 0; j < QK / 2; ++j) {
            y[j] = d * static_cast<float>((x->qs[j] & 0x0f) - 8);
            y[j + QK / 2] = d * static_cast<float>((x->qs[j] >> 4) - 8);
        }
    }
}

void deq_q4_1(const uint8_t* src, float* y, int64_t nb) {
    for (int64_t b = 0; b < nb; ++b, y += QK) {
        const auto* x = reinterpret_cast<const block_q4_1*>(src) + b;
        const float d = load_f16(x->d), m = load_f16(x->m);
        for (int j = 0; j < QK / 2; ++j) {
            y[j] = d * static_cast<float>(x->qs[j] & 0x0f) + m;
            y[j + QK / 2] = d * static_cast<float>(x->qs[j] >> 4) + m;
        }
    }
}

void deq_q5_0(const uint8_t* src, float* y, int64_t nb) {
    for (int64_t b = 0; b < nb; ++b, y += QK) {
        const auto* x = reinterpret_cast<const block_q5_0*>(src) + b;
        const float d = load_f16(x->d);
        const uint32_t qh = load_u32(x->qh);
        for (int j = 0; j < QK / 2; ++j) {
            const int lo = (x->qs[j] & 0x0f) | (((qh >> j) & 1) << 4);
            const int hi = (x->qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
            y[j] = d * static_cast<float>(lo - 16);
            y[j + QK / 2] = d * static_cast<float>(hi - 16);
        }
    }
}

void deq_q5_1(const uint8_t* src, float* y, int64_t nb) {
    for (int64_t b = 0; b < nb; ++b, y += QK) {
        const auto* x = reinterpret_cast<const block_q5_1*>(src) + b;
        const float d = load_f16(x->d), m = load_f16(x->m);
        const uint32_t qh = load_u32(x->qh);
        for (int j = 0; j < QK / 2; ++j) {
            const int lo = (x->qs[j] & 0x0f) | (((qh >> j) & 1) << 4);
            const int hi = (x->qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
            y[j] = d * static_cast<float>(lo) + m;
            y[j + QK / 2] = d * static_cast<float>(hi) + m;
        }
    }
}

void deq_q8_0(const uint8_t* src, float* y, int64_t nb) {
    for (int64_t b = 0; b < nb; ++b, y += QK) {
        const auto* x = reinterpret_cast<const block_q8_0*>(src) + b;
        const float d = load_f16(x->d);
        for (int j = 0; j < QK; ++j) y[j] = static_cast<float>(x->qs[j]) * d;
    }
}

void deq_q2_K(const uint8_t* src, float* y, int64_t nb) {
    for (int64_t b = 0; b < nb; ++b, y += QK_K) {
        const auto* x = reinterpret_cast<const block_q2_K*>(src) + b;
        const float d = load_f16(x->d), dmin = load_f16(x->dmin);
        for (int e = 0; e < QK_K; ++e) {
            const int h = e / 128, s = (e / 32) % 4, l = e % 32, j = e / 16;
            const float dl = d * static_cast<float>(x->scales[j] & 0x0f);
            const float ml = dmin * static_cast<float>(x->scales[j] >> 4);
            const int q = (x->qs[32 * h + l] >> (2 * s)) & 3;
            y[e] = dl * static_cast<float>(q) - ml;
        }
    }
}

void deq_q3_K(const uint8_t* src, float* y, int64_t nb) {
    for (int64_t b = 0; b < nb; ++b, y += QK_K) {
        const auto* x = reinterpret_cast<const block_q3_K*>(src) + b;
        const float d = load_f16(x->d);
        int8_t sc[16];
        unpack_scales_q3_K(x->scales, sc);
        for (int e = 0; e < QK_K; ++e) {
            const int h = e / 128, s = (e / 32) % 4, l = e % 32, k = e / 32;
            const float dl = d * static_cast<float>(sc[e / 16]);
            const int q2 = (x->qs[32 * h + l] >> (2 * s)) & 3;
            const int hbit = (x->hmask[l] >> k) & 1;
            y[e] = dl * static_cast<float>(q2 - 4 * (hbit ^ 1));
        }
    }
}

void deq_q4_K(const uint8_t* src, float* y, int64_t nb) {
    for (int64_t b = 0; b < nb; ++b, y += QK_K) {
        const auto* x = reinterpret_cast<const block_q4_K*>(src) + b;
        const float d = load_f16(x->d), dmin = load_f16(x->dmin);
        uint8_t sc[8], mn[8];
        unpack_scale_min_k4(x->scales, sc, mn);
        for (int j = 0; j < 8; ++j) {
            const float dl = d * static_cast<float>(sc[j]);
            const float ml = dmin * static_cast<float>(mn[j]);
            const uint8_t* q = x->qs + 32 * (j / 2);
            const int shift = 4 * (j % 2);
            for (int l = 0; l < 32; ++l)
                y[32 * j + l] = dl * static_cast<float>((q[l] >> shift) & 0x0f) - ml;
        }
    }
}

void deq_q5_K(const uint8_t* src, float* y, int64_t nb) {
    for (int64_t b = 0; b < nb; ++b, y += QK_K) {
        const auto* x = reinterpret_cast<const block_q5_K*>(src) + b;
        const float d = load_f16(x->d), dmin = load_f16(x->dmin);
        uint8_t sc[8], mn[8];
        unpack_scale_min_k4(x->scales, sc, mn);
        for (int j = 0; j < 8; ++j) {
            const float dl = d * static_cast<float>(sc[j]);
            const float ml = dmin * static_cast<float>(mn[j]);
            const uint8_t* q = x->qs + 32 * (j / 2);
            const int shift = 4 * (j % 2);
            for (int l = 0; l < 32; ++l) {
                const int v = ((q[l] >> shift) & 0x0f) | (((x->qh[l] >> j) & 1) << 4);
                y[32 * j + l] = dl * static_cast<float>(v) - ml;
            }
        }
    }
}

void deq_q6_K(const uint8_t* src, float* y, int64_t nb) {
    for (int64_t b = 0; b < nb; ++b, y += QK_K) {
        const auto* x = reinterpret_cast<const block_q6_K*>(src) + b;
        const float d = load_f16(x->d);
        for (int e = 0; e < QK_K; ++e) {
            const int h = e / 128, p = e % 128;
            const int lo = (x->ql[64 * h + p % 64] >> (4 * (p / 64))) & 0x0f;
            const int hi = (x->qh[32 * h + p % 32] >> (2 * (p / 32))) & 3;
            const float dl = d * static_cast<float>(x->scales[e / 16]);
            y[e] = dl * static_cast<float>((lo | (hi << 4)) - 32);
        }
    }
}

}  // namespace

void dequantize_row(int type, const uint8_t* src, float* dst, int64_t cols) {
    switch (type) {
        case T_F32: std::memcpy(dst, src, static_cast<size_t>(cols) * 4); break;
        case T_F16: deq_f16(src, dst, cols); break;
        case T_BF16: deq_bf16(src, dst, cols); break;
        case T_Q4_0: deq_q4_0(src, dst, cols / QK); break;
        case T_Q4_1: deq_q4_1(src, dst, cols / QK); break;
        case T_Q5_0: deq_q5_0(src, dst, cols / QK); break;
        case T_Q5_1: deq_q5_1(src, dst, cols / QK); break;
        case T_Q8_0: deq_q8_0(src, dst, cols / QK); break;
        case T_Q2_K: deq_q2_K(src, dst, cols / QK_K); break;
        case T_Q3_K: deq_q3_K(src, dst, cols / QK_K); break;
        case T_Q4_K: deq_q4_K(src, dst, cols / QK_K); break;
        case T_Q5_K: deq_q5_K(src, dst, cols / QK_K); break;
        case T_Q6_K: deq_q6_K(src, dst, cols / QK_K); break;
        default: break;
    }
}

void dequantize_rows(int type, const uint8_t* src, int64_t row_stride, int64_t rows, int64_t cols,
                     float* dst, int n_threads) {
    // Below ~1M elements a parallel region costs more than it saves.
    const bool par = rows > 1 && rows * cols >= (int64_t{1} << 20) && n_threads > 1;
#pragma omp parallel for schedule(static) num_threads(n_threads) if (par)
    for (int64_t r = 0; r < rows; ++r) dequantize_row(type, src + r * row_stride, dst + r * cols, cols);
}

void get_rows(int type, const uint8_t* src, int64_t rows, int64_t cols, const int64_t* ids,
              int64_t k, float* out, int n_threads) {
    (void)rows;  // ids were range-checked by the caller
    TypeInfo ti{};
    if (!type_info(type, &ti)) return;
    const int64_t rb = row_bytes(ti, cols);
    const bool par = k > 1 && k * cols >= (int64_t{1} << 20) && n_threads > 1;
#pragma omp parallel for schedule(static) num_threads(n_threads) if (par)
    for (int64_t i = 0; i < k; ++i) dequantize_row(type, src + ids[i] * rb, out + i * cols, cols);
}

}  // namespace hl
