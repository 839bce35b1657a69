// _core.Block: a whole transformer block per call (see block.h for the Python contract).
//
// One step evaluates n rows x [n][dim] at positions pos0 .. pos0+n-1 inside ONE OpenMP region
// (30 blocks x one token means a fork/join per block, not per op):
//
//   1  xn = rms_norm(x) * attn_norm; quantized once per activation format Q, K, V read
//   2  q [n][H*dk], k [n][KV*dk], v [n][KV*dv] = xn @ W.T: one work list over the three, items
//      of whole heads; the thread that computed a head applies q_norm/k_norm (gemma3), rope and
//      Q's f16 rounding, and writes K, V rounded into the f16 caches [n_ctx][KV*dk], [n_ctx][KV*dv]
//   3  (batches) the keys of the step transposed to float for the scores
//   4  o [n][H*dv] = softmax(q16 . K^T * scale + causal/window mask), rounded to f16, . V
//   5  quantize o;  6  att = o @ Wo.T
//   7  x += post_attention_norm?(att); h = rms_norm(x) * ffn_norm; quantize h
//   8  a [n][ffn] = act(h @ Wg.T) * (h @ Wu.T)   (activation applied per weight-row chunk)
//   9  quantize a;  10  f = a @ Wd.T;  11  x += post_ffw_norm?(f)
//
// Decode steps (n <= 4) do the row-wise steps 1, 5, 7, 9 in every thread at once, each into its
// own buffers, so the team meets only after the matmuls and the attention (6 barriers a block).
//
// Numerics are PyBlock's on backends/cpu.py, which reproduce llama.cpp's CPU path: RMSNorm
// squares in float summed in double; rope with libm cosf/sinf tables and one FMA per output;
// float16 K/V cache and Q (round to nearest even); Q.K and P.V with ggml's SIMD lane order
// (tinyBLAS's single accumulator for batches, ggml_vec_dot_f16's four for one row) and halving
// reductions; ggml_v_expf softmax with probabilities rounded to f16; SiLU via ggml_v_expf and
// GELU via ggml's f16 table. No a*b+c in this file may be contracted into an FMA (the pragma
// below), because the reference rounds the product first; FMAs are written out where ggml has
// them. The SIMD lane count L of that order is the CPU's (16 with AVX-512F+DQ, else 8), as
// backends.cpu.SIMD_LANES; the AVX-512 code below is used when L = 16 and the build has it,
// a portable version of the same arithmetic otherwise (and under set_force_scalar).
#include "block.h"

#include <omp.h>
#include <pybind11/numpy.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <tuple>
#include <vector>

#include "matmul.h"
#include "quants.h"
#include "vecdot.h"

#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

// Every function defined below this line: no contraction of separate multiplies and adds.
#pragma GCC optimize("fp-contract=off")

namespace py = pybind11;

namespace hl {
namespace {

// ---- small utilities -----------------------------------------------------------------------

// Grow-only 64-byte aligned buffer of T (contents undefined after growth).
template <class T>
class Buf {
   public:
    Buf() = default;
    Buf(const Buf&) = delete;
    Buf& operator=(const Buf&) = delete;
    ~Buf() { release(); }
    T* get(size_t n) {
        if (n > cap_) {
            release();
            p_ = static_cast<T*>(::operator new(std::max<size_t>(n, 1) * sizeof(T), std::align_val_t(64)));
            cap_ = n;
        }
        return p_;
    }

   private:
    void release() {
        if (p_ != nullptr) ::operator delete(p_, std::align_val_t(64));
        p_ = nullptr;
        cap_ = 0;
    }
    T* p_ = nullptr;
    size_t cap_ = 0;
};

inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

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

void to_f16_row(const float* src, uint16_t* dst, int64_t n) {
    int64_t i = 0;
#if defined(__F16C__)
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
#endif
    for (; i < n; ++i) dst[i] = f32_to_f16(src[i]);
}

void from_f16_row(const uint16_t* src, float* dst, int64_t n) {
    int64_t i = 0;
#if defined(__F16C__)
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
#endif
    for (; i < n; ++i) dst[i] = fp16_to_f32(src[i]);
}

// x rounded to float16 precision in place (Q before the f16 Q.K product).
void round_f16_row(float* x, int64_t n) {
    int64_t i = 0;
#if defined(__F16C__)
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(x + i, _mm256_cvtph_ps(_mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT)));
#endif
    for (; i < n; ++i) x[i] = round_f16(x[i]);
}

// Lanes of ggml's float SIMD in the llama.cpp we reproduce: one built for the same ISA as this
// core (16 with AVX-512F, else 8), as float_lanes() tells Python.
int simd_lanes() { return float_lanes(); }

// ---- element-wise numerics (PyBlock's, see backends/cpu.py) --------------------------------

// RMSNorm of one row of k: squares in float summed in double, scale = 1/sqrtf(mean + eps),
// out = (x * scale) * w. out may be x.
void rms_norm_row(const float* x, const float* w, float eps, int64_t k, float* out) {
    double acc = 0.0;
    for (int64_t j = 0; j < k; ++j) {
        const float sq = x[j] * x[j];
        acc += static_cast<double>(sq);
    }
    const float mean = static_cast<float>(acc / static_cast<double>(k));
    const float scale = 1.0f / std::sqrt(mean + eps);
    for (int64_t j = 0; j < k; ++j) out[j] = (x[j] * scale) * w[j];
}

// ggml_v_expf for one lane, bit for bit (ARM optimized-routines expf as in ggml-cpu/vec.h).
constexpr float kLog2e = 0x1.715476p+0f, kLn2Hi = 0x1.62e4p-1f, kLn2Lo = 0x1.7f7d1cp-20f;
constexpr float kE0 = 0x1.0e4020p-7f, kE1 = 0x1.573e2ep-5f, kE2 = 0x1.555e66p-3f,
                kE3 = 0x1.fffdb6p-2f, kE4 = 0x1.ffffecp-1f;
constexpr float kShift = 0x1.8p23f;  // adding it rounds to an integer

inline float v_expf(float x) {
    const float z = std::fma(x, kLog2e, kShift);
    const float n = z - kShift;
    const float b = std::fma(-n, kLn2Lo, std::fma(-n, kLn2Hi, x));
    const float u = b * b;
    const float j = std::fma(std::fma(std::fma(kE0, b, kE1), u, std::fma(kE2, b, kE3)), u,
                             std::fma(kE4, b, 1.0f));
    if (!(std::fabs(n) <= 126.0f)) {  // outside the fast path (or NaN)
        if (n != n) return n;
        return n < 0 ? 0.0f : std::numeric_limits<float>::infinity();
    }
    const uint32_t bits = static_cast<uint32_t>(static_cast<int>(n) + 127) << 23;  // 2^n exactly
    float p;
    std::memcpy(&p, &bits, 4);
    return j * p;
}

// GELU(tanh) as ggml_gelu_f32 compiles (the inner 1 + (A*x)*x one FMA, libm tanhf); constants
// rounded double -> float as numpy does.
inline float gelu_f32(float v) {
    const float a = static_cast<float>(0.044715);
    const float c = static_cast<float>(0.79788456080286535587989211986876);
    return 0.5f * v * (1.0f + std::tanh(c * v * std::fma(a * v, v, 1.0f)));
}

// ggml's GELU table: for every half bit pattern, the f16-rounded GELU as float (0 for inf/NaN).
const float* gelu_table() {
    static const std::vector<float> table = [] {
        std::vector<float> t(65536);
        for (uint32_t h = 0; h < 65536; ++h) {
            const float x = fp16_to_f32_portable(static_cast<uint16_t>(h));
            t[h] = std::isfinite(x) ? round_f16(gelu_f32(x)) : 0.0f;
        }
        return t;
    }();
    return table.data();
}

#if defined(__AVX512F__)
// ggml_v_expf on 16 lanes: the same FMAs lane by lane; j * 2^n with scalef (exact power of two).
inline __m512 v_expf16(__m512 x) {
    const __m512 shift = _mm512_set1_ps(kShift);
    const __m512 z = _mm512_fmadd_ps(x, _mm512_set1_ps(kLog2e), shift);
    const __m512 n = _mm512_sub_ps(z, shift);
    const __m512 nn = _mm512_castsi512_ps(
        _mm512_xor_si512(_mm512_castps_si512(n), _mm512_set1_epi32(static_cast<int>(0x80000000u))));
    const __m512 b = _mm512_fmadd_ps(nn, _mm512_set1_ps(kLn2Lo),
                                     _mm512_fmadd_ps(nn, _mm512_set1_ps(kLn2Hi), x));
    const __m512 u = _mm512_mul_ps(b, b);
    const __m512 j = _mm512_fmadd_ps(
        _mm512_fmadd_ps(_mm512_fmadd_ps(_mm512_set1_ps(kE0), b, _mm512_set1_ps(kE1)), u,
                        _mm512_fmadd_ps(_mm512_set1_ps(kE2), b, _mm512_set1_ps(kE3))),
        u, _mm512_fmadd_ps(_mm512_set1_ps(kE4), b, _mm512_set1_ps(1.0f)));
    __m512 r = _mm512_scalef_ps(j, n);
    const __mmask16 big = _mm512_cmp_ps_mask(_mm512_abs_ps(n), _mm512_set1_ps(126.0f), _CMP_GT_OQ);
    if (big) {
        const __mmask16 neg = _mm512_cmp_ps_mask(n, _mm512_setzero_ps(), _CMP_LT_OQ);
        r = _mm512_mask_mov_ps(r, big & neg, _mm512_setzero_ps());
        r = _mm512_mask_mov_ps(r, big & ~neg, _mm512_set1_ps(std::numeric_limits<float>::infinity()));
    }
    return r;
}

// Sum of the 16 lanes by halving (i + i+8, then i + i+4, ...): _mm512_reduce_add_ps's order.
inline float hsum16(__m512 v) {
    const __m256 lo = _mm512_castps512_ps256(v);
    const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    const __m256 s8 = _mm256_add_ps(hi, lo);
    const __m128 s4 = _mm_add_ps(_mm256_extractf128_ps(s8, 1), _mm256_castps256_ps128(s8));
    const __m128 s2 = _mm_add_ps(_mm_movehl_ps(s4, s4), s4);
    const __m128 s1 = _mm_add_ss(_mm_movehdup_ps(s2), s2);
    return _mm_cvtss_f32(s1);
}

// a[0] = halving sum over the 16 vectors a[0..15] (lane-wise): acc[i] = acc[w+i] + acc[i].
inline __m512 halve16(__m512* a) {
    for (int w = 8; w >= 1; w /= 2)
        for (int i = 0; i < w; ++i) a[i] = _mm512_add_ps(a[w + i], a[i]);
    return a[0];
}

inline __m512 load_f16x16(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
#endif

// SwiGLU on columns [j0, j1) of one row: (g / (1 + exp(-g))) * u, exp = ggml_v_expf on columns
// below simd_end (the 16-lane body of ggml_vec_swiglu_f32), libm expf on the tail.
void swiglu_cols(const float* g, const float* u, float* out, int64_t j0, int64_t j1, int64_t simd_end,
                 bool fast) {
    int64_t j = j0;
#if defined(__AVX512F__)
    if (fast) {
        const __m512 one = _mm512_set1_ps(1.0f);
        for (; j + 16 <= std::min(j1, simd_end); j += 16) {
            const __m512 x = _mm512_loadu_ps(g + j);
            const __m512 e = v_expf16(_mm512_sub_ps(_mm512_setzero_ps(), x));
            _mm512_storeu_ps(out + j, _mm512_mul_ps(_mm512_div_ps(x, _mm512_add_ps(one, e)), _mm512_loadu_ps(u + j)));
        }
    }
#else
    (void)fast;
#endif
    for (; j < j1; ++j) {
        const float x = g[j];
        const float e = j < simd_end ? v_expf(0.0f - x) : std::exp(-x);
        out[j] = (x / (1.0f + e)) * u[j];
    }
}

// GeGLU on columns [j0, j1): 0 below -10, g above 10, else the f16 table at g's half bits; times u.
void geglu_cols(const float* g, const float* u, float* out, int64_t j0, int64_t j1, const float* table,
                bool fast) {
    int64_t j = j0;
#if defined(__AVX512F__)
    if (fast) {
        const __m512 lo = _mm512_set1_ps(-10.0f), hi = _mm512_set1_ps(10.0f);
        for (; j + 16 <= j1; j += 16) {
            const __m512 x = _mm512_loadu_ps(g + j);
            const __m512i idx = _mm512_cvtepu16_epi32(_mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
            __m512 y = _mm512_i32gather_ps(idx, table, 4);
            y = _mm512_mask_mov_ps(y, _mm512_cmp_ps_mask(x, hi, _CMP_GE_OQ), x);
            y = _mm512_mask_mov_ps(y, _mm512_cmp_ps_mask(x, lo, _CMP_LE_OQ), _mm512_setzero_ps());
            _mm512_storeu_ps(out + j, _mm512_mul_ps(y, _mm512_loadu_ps(u + j)));
        }
    }
#else
    (void)fast;
#endif
    for (; j < j1; ++j) {
        const float x = g[j];
        if (x <= -10.0f)
            out[j] = 0.0f;
        else if (x >= 10.0f)
            out[j] = x * u[j];
        else
            out[j] = table[f32_to_f16(x)] * u[j];
    }
}

// ---- rope ----------------------------------------------------------------------------------

// cos/sin [n_ctx][dim/2] built as ggml does: theta starts at the position and is multiplied by
// base^(-2/dim) (float) once per pair; libm cosf/sinf. Shared by the blocks with the same spec.
struct RopeTable {
    int64_t half = 0;
    std::vector<float> cos, sin;
};

std::shared_ptr<const RopeTable> rope_table(double base, int64_t dim, double scale, int64_t n_ctx) {
    static std::mutex mu;
    static std::map<std::tuple<double, int64_t, double, int64_t>, std::weak_ptr<const RopeTable>> cache;
    const auto key = std::make_tuple(base, dim, scale, n_ctx);
    std::lock_guard<std::mutex> lock(mu);
    if (auto hit = cache[key].lock()) return hit;
    auto t = std::make_shared<RopeTable>();
    t->half = dim / 2;
    t->cos.resize(static_cast<size_t>(n_ctx * t->half));
    t->sin.resize(t->cos.size());
    const float theta_scale = static_cast<float>(std::pow(base, -2.0 / static_cast<double>(dim)));
    const float freq_scale = static_cast<float>(1.0 / scale);
    for (int64_t p = 0; p < n_ctx; ++p) {
        float theta = static_cast<float>(p);
        for (int64_t i = 0; i < t->half; ++i) {
            const float a = theta * freq_scale;
            t->cos[p * t->half + i] = std::cos(a);
            t->sin[p * t->half + i] = std::sin(a);
            theta = theta * theta_scale;
        }
    }
    cache[key] = t;
    return t;
}

// Rotate one head vector x[hd] at a position (cos/sin rows of that position): pairs (i, i+half)
// for neox (gemma), (2i, 2i+1) otherwise; dims past 2*half untouched.
void rope_head(float* x, const float* cs, const float* sn, int64_t half, bool neox) {
    for (int64_t i = 0; i < half; ++i) {
        const int64_t a = neox ? i : 2 * i, b = neox ? i + half : 2 * i + 1;
        const float x0 = x[a], x1 = x[b], c = cs[i], s = sn[i];
        const float x1s = x1 * s, x1c = x1 * c;
        x[a] = std::fma(x0, c, -x1s);
        x[b] = std::fma(x0, s, x1c);
    }
}

// ---- attention: portable version of ggml's order for any L ---------------------------------

template <int L>
inline void reduce_lanes(float* v) {  // halving, into v[0]
    for (int w = L / 2; w >= 1; w /= 2)
        for (int i = 0; i < w; ++i) v[i] = v[w + i] + v[i];
}

// ggml_vec_dot_f16's fold of its four accumulators a[4][L] (0+2, 1+3, then lanes) -> float.
template <int L>
inline float reduce_vec(float (*a)[L]) {
    for (int i = 0; i < L; ++i) a[0][i] = (a[0][i] + a[2][i]) + (a[1][i] + a[3][i]);
    if (L == 16) {
        reduce_lanes<L>(a[0]);
        return a[0][0];
    }
    const float x = a[0][0] + a[0][4], c = a[0][1] + a[0][5], d = a[0][2] + a[0][6], e = a[0][3] + a[0][7];
    return (x + c) + (d + e);  // AVX2: 128-bit halves, then two horizontal adds
}

// Softmax of s[0..nk) (positions lo..lo+nk-1) as ggml_soft_max, probabilities rounded to f16.
template <int L>
void softmax_generic(float* s, int64_t lo, int64_t nk) {
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < nk; ++j) m = std::max(m, s[j]);
    for (int64_t j = 0; j < nk; ++j) s[j] = v_expf(s[j] - m);
    const int64_t first = lo - lo % L;
    const int64_t n_chunks = (lo + nk - first + L - 1) / L;
    double total = 0.0;
    for (int64_t c = 0; c < n_chunks; ++c) {  // L-lane chunks aligned on position 0, empty lanes 0
        float ch[L];
        for (int i = 0; i < L; ++i) {
            const int64_t pos = first + c * L + i;
            ch[i] = pos >= lo && pos < lo + nk ? s[pos - lo] : 0.0f;
        }
        reduce_lanes<L>(ch);
        total += static_cast<double>(ch[0]);
    }
    const float inv = static_cast<float>(1.0 / total);
    for (int64_t j = 0; j < nk; ++j) s[j] = round_f16(s[j] * inv);
}

// One query row of one head over cache positions lo..hi. q [dk] f16-rounded; kc/vc point at the
// head's columns of cache row 0 (row strides ks/vs halves). batched: tinyBLAS's order (n > 1).
// Scratch: s [nk], acc [4 * L * dv], row [max(dk, dv)].
template <int L>
void attend_generic(const float* q, const uint16_t* kc, int64_t ks, const uint16_t* vc, int64_t vs,
                    int64_t lo, int64_t hi, int64_t dk, int64_t dv, float scale, bool batched,
                    float* s, float* acc, float* row, float* out) {
    const int64_t nk = hi + 1 - lo, step = 4 * L;
    const bool tiny = batched && dk % L == 0;
    const int64_t body = tiny ? dk : dk - dk % step;
    for (int64_t j = 0; j < nk; ++j) {
        from_f16_row(kc + (lo + j) * ks, row, dk);
        float a4[4][L] = {};
        for (int64_t c = 0; c < body; c += L) {
            const int a = tiny ? 0 : static_cast<int>((c % step) / L);
            for (int i = 0; i < L; ++i) a4[a][i] = std::fma(q[c + i], row[c + i], a4[a][i]);
        }
        float r;
        if (tiny) {
            reduce_lanes<L>(a4[0]);
            r = a4[0][0];
        } else {
            r = reduce_vec<L>(a4);
        }
        double total = r;
        for (int64_t k = body; k < dk; ++k) {  // vec_dot leftovers: float products summed in double
            const float p = q[k] * row[k];
            total += static_cast<double>(p);
        }
        s[j] = static_cast<float>(total) * scale;
    }
    softmax_generic<L>(s, lo, nk);
    const int n_acc = batched ? 1 : 4;
    std::fill(acc, acc + n_acc * L * dv, 0.0f);
    for (int64_t j = 0; j < nk; ++j) {
        const int64_t pos = lo + j;
        const int64_t a = batched ? 0 : (pos % step) / L, lane = pos % L;
        from_f16_row(vc + pos * vs, row, dv);
        float* A = acc + (a * L + lane) * dv;
        const float pj = s[j];
        for (int64_t d = 0; d < dv; ++d) A[d] = std::fma(row[d], pj, A[d]);
    }
    if (!batched) {
        for (int i = 0; i < L; ++i) {
            float* a0 = acc + i * dv;
            const float *a1 = acc + (L + i) * dv, *a2 = acc + (2 * L + i) * dv, *a3 = acc + (3 * L + i) * dv;
            for (int64_t d = 0; d < dv; ++d) a0[d] = (a0[d] + a2[d]) + (a1[d] + a3[d]);
        }
        if (L == 8) {
            for (int64_t d = 0; d < dv; ++d) {
                const float x = acc[0 * dv + d] + acc[4 * dv + d], c = acc[1 * dv + d] + acc[5 * dv + d];
                const float y = acc[2 * dv + d] + acc[6 * dv + d], e = acc[3 * dv + d] + acc[7 * dv + d];
                out[d] = (x + c) + (y + e);
            }
            return;
        }
    }
    for (int w = L / 2; w >= 1; w /= 2)
        for (int i = 0; i < w; ++i)
            for (int64_t d = 0; d < dv; ++d) acc[i * dv + d] = acc[(w + i) * dv + d] + acc[i * dv + d];
    std::copy(acc, acc + dv, out);
}

// ---- attention: AVX-512 (L = 16), dk and dv multiples of 16 --------------------------------
#if defined(__AVX512F__)

// Scores of a query against keys held transposed in float (kt [dk][ldk], key column c0 + b):
// tinyBLAS's order, one 16-lane accumulator per key, lanes over dims, folded by halving. Here the
// 16 lane accumulators are 16 vectors over 16 keys, so the fold is 15 vector adds. Writes
// s[0 .. round_up(nk, 16)) (the columns past nk are padding and land in s's slack).
void scores_tiny16(const float* q, const float* kt, int64_t ldk, int64_t c0, int64_t nk, int64_t dk,
                   float scale, float* s) {
    const __m512 vscale = _mm512_set1_ps(scale);
    for (int64_t b = 0; b < nk; b += 16) {
        __m512 acc[16];
        for (auto& a : acc) a = _mm512_setzero_ps();
        const float* col = kt + c0 + b;
        for (int64_t c = 0; c < dk; c += 16) {
#pragma GCC unroll 16
            for (int i = 0; i < 16; ++i)
                acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(q[c + i]), _mm512_loadu_ps(col + (c + i) * ldk), acc[i]);
        }
        _mm512_storeu_ps(s + b, _mm512_mul_ps(halve16(acc), vscale));
    }
}

// Decode scores of nh query heads of one KV group (head j: q + j * dk, scores at
// s + j * ls, indexed pos - lo) against cache rows lo..hi, in ggml_vec_dot_f16's order: four
// 16-lane accumulators fed round-robin, folded (0+2)+(1+3), lanes halved, leftovers (dk % 64)
// summed in double. Each key row is read once for the whole group (GQA): at long contexts the
// rows come from DRAM, and a pass per head would read them nh times.
void scores_vec16(const float* q, int nh, const uint16_t* kc, int64_t ks, const uint16_t* vc, int64_t vs,
                  int64_t dv, int64_t lo, int64_t hi, int64_t dk, float scale, float* s, int64_t ls) {
    const int64_t body = dk - dk % 64;
    for (int64_t pos = lo; pos <= hi; ++pos) {
        const uint16_t* k = kc + pos * ks;
        // Strided rows (other heads between them): fetch the key row a few positions ahead,
        // and this position's value row into L2 for the P.V pass.
        const char* kn = reinterpret_cast<const char*>(k + 8 * ks);
        for (int64_t o = 0; o < dk * 2; o += 64) _mm_prefetch(kn + o, _MM_HINT_T0);
        const char* vn = reinterpret_cast<const char*>(vc + pos * vs);
        for (int64_t o = 0; o < dv * 2; o += 64) _mm_prefetch(vn + o, _MM_HINT_T1);
        for (int j = 0; j < nh; ++j) {
            const float* qj = q + j * dk;
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int64_t c = 0; c < body; c += 64) {
                a0 = _mm512_fmadd_ps(_mm512_loadu_ps(qj + c), load_f16x16(k + c), a0);
                a1 = _mm512_fmadd_ps(_mm512_loadu_ps(qj + c + 16), load_f16x16(k + c + 16), a1);
                a2 = _mm512_fmadd_ps(_mm512_loadu_ps(qj + c + 32), load_f16x16(k + c + 32), a2);
                a3 = _mm512_fmadd_ps(_mm512_loadu_ps(qj + c + 48), load_f16x16(k + c + 48), a3);
            }
            double total = hsum16(_mm512_add_ps(_mm512_add_ps(a0, a2), _mm512_add_ps(a1, a3)));
            for (int64_t c = body; c < dk; ++c) {
                const float p = qj[c] * fp16_to_f32(k[c]);
                total += static_cast<double>(p);
            }
            s[j * ls + pos - lo] = static_cast<float>(total) * scale;
        }
    }
}

// Lanes of the 16-position chunk starting at position p0 that lie in [lo, hi].
inline __mmask16 chunk_mask(int64_t p0, int64_t lo, int64_t hi) {
    const int64_t a = std::max<int64_t>(lo - p0, 0), b = std::min<int64_t>(hi - p0, 15);
    if (b < a) return 0;
    return static_cast<__mmask16>((0xFFFFu >> (15 - b)) & (0xFFFFu << a));
}

// ggml_soft_max over positions lo..hi whose scores are at s[pos - base], base = lo - lo % 16:
// v_expf, sum of 16-lane chunks aligned on position 0 (halving) into a double, times
// float(1/sum), rounded to f16. Lanes of the touched chunks outside [lo, hi] become 0.
void softmax16(float* s, int64_t base, int64_t lo, int64_t hi) {
    const int64_t nch = (hi - base) / 16 + 1;
    __m512 mv = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t c = 0; c < nch; ++c)
        mv = _mm512_mask_max_ps(mv, chunk_mask(base + 16 * c, lo, hi), mv, _mm512_loadu_ps(s + 16 * c));
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mv));
    double total = 0.0;
    for (int64_t c = 0; c < nch; ++c) {
        const __mmask16 k = chunk_mask(base + 16 * c, lo, hi);
        const __m512 e = _mm512_maskz_mov_ps(k, v_expf16(_mm512_sub_ps(_mm512_loadu_ps(s + 16 * c), m)));
        _mm512_storeu_ps(s + 16 * c, e);
        total += static_cast<double>(hsum16(e));
    }
    const __m512 inv = _mm512_set1_ps(static_cast<float>(1.0 / total));
    for (int64_t c = 0; c < nch; ++c) {
        const __m512 p = _mm512_mul_ps(_mm512_loadu_ps(s + 16 * c), inv);
        _mm512_storeu_ps(s + 16 * c, _mm512_cvtph_ps(_mm512_cvtps_ph(p, _MM_FROUND_TO_NEAREST_INT)));
    }
}

// Batched P.V in tinyBLAS's order: one 16-lane accumulator per output, lane = pos % 16, so
// out[d] = halving sum over r of acc_r[d], acc_r[d] += prob(pos) * V[pos][d] over the positions
// pos = r (mod 16) in order. 16 output columns at a time with the 16 lane accumulators in
// registers, walking aligned groups of 16 positions. prob indexed pos - base.
void pv16(const float* prob, int64_t base, const uint16_t* vc, int64_t vs, int64_t lo, int64_t hi,
          int64_t dv, float* out) {
    for (int64_t d0 = 0; d0 < dv; d0 += 16) {
        __m512 acc[16];
        for (auto& a : acc) a = _mm512_setzero_ps();
        const uint16_t* v = vc + d0;
        for (int64_t g = lo - lo % 16; g <= hi; g += 16) {
            if (g >= lo && g + 15 <= hi) {
#pragma GCC unroll 16
                for (int r = 0; r < 16; ++r)
                    acc[r] = _mm512_fmadd_ps(load_f16x16(v + (g + r) * vs), _mm512_set1_ps(prob[g + r - base]), acc[r]);
            } else {
#pragma GCC unroll 16
                for (int r = 0; r < 16; ++r) {
                    const int64_t pos = g + r;
                    if (pos >= lo && pos <= hi)
                        acc[r] = _mm512_fmadd_ps(load_f16x16(v + pos * vs), _mm512_set1_ps(prob[pos - base]), acc[r]);
                }
            }
        }
        _mm512_storeu_ps(out + d0, halve16(acc));
    }
}

// Decode P.V of nh heads of one KV group in ggml_vec_dot_f16's order (accumulator
// (pos % 64) / 16, lane pos % 16): head j's probabilities at prob + j * ls (index pos - base),
// output at out + j * dv. The positions are walked in order, each value row read once for the
// group; the 64 lane accumulators of each head live in acc [nh][64][dv] (rows that no
// position touched count as zeros).
void pv_vec16(const float* prob, int nh, int64_t ls, int64_t base, const uint16_t* vc, int64_t vs,
              int64_t lo, int64_t hi, int64_t dv, float* acc, float* out) {
    uint64_t touched = 0;
    for (int64_t pos = lo; pos <= hi && pos < lo + 64; ++pos) {
        touched |= uint64_t{1} << (pos % 64);
        for (int j = 0; j < nh; ++j) {
            float* a = acc + (j * 64 + pos % 64) * dv;
            std::fill(a, a + dv, 0.0f);
        }
    }
    for (int64_t pos = lo; pos <= hi; ++pos) {
        const uint16_t* v = vc + pos * vs;
        for (int j = 0; j < nh; ++j) {
            float* a = acc + (j * 64 + pos % 64) * dv;
            const __m512 p = _mm512_set1_ps(prob[j * ls + pos - base]);
            for (int64_t d = 0; d < dv; d += 16)
                _mm512_storeu_ps(a + d, _mm512_fmadd_ps(load_f16x16(v + d), p, _mm512_loadu_ps(a + d)));
        }
    }
    for (int j = 0; j < nh; ++j) {
        const float* aj = acc + j * 64 * dv;
        for (int64_t d = 0; d < dv; d += 16) {
            __m512 t[16];
            auto row = [&](int r) {
                return (touched >> r) & 1 ? _mm512_loadu_ps(aj + r * dv + d) : _mm512_setzero_ps();
            };
            for (int i = 0; i < 16; ++i)
                t[i] = _mm512_add_ps(_mm512_add_ps(row(i), row(32 + i)), _mm512_add_ps(row(16 + i), row(48 + i)));
            _mm512_storeu_ps(out + j * dv + d, halve16(t));
        }
    }
}
#endif  // __AVX512F__

// ---- activations quantized for one weight format, in panels of P rows ----------------------

// x [n][cols] prepared for the kernels of one activation kind: panel p holds rows
// [p P, p P + P) as its own QActs (so a work item can take any panel; tiles of MAX_NA rows
// start at multiples of MAX_NA as in hl::matmul, hence the same results).
struct ActSet {
    int kind = ACT_F32;
    const float* x = nullptr;
    int64_t n = 0, cols = 0, P = 1;
    std::vector<QActs> panels;
    Buf<uint8_t> buf;

    void layout(int kind_, const float* x_, int64_t n_, int64_t cols_, int64_t P_) {
        kind = kind_, x = x_, n = n_, cols = cols_, P = P_;
        const int64_t np = (n + P - 1) / P;
        const int64_t per = round_up(static_cast<int64_t>(acts_bytes(kind, P, cols)), 64);
        uint8_t* b = buf.get(static_cast<size_t>(per * np + 64));
        panels.resize(static_cast<size_t>(np));
        for (int64_t p = 0; p < np; ++p)
            panels[p] = acts_layout(kind, std::min(P, n - p * P), cols, b + p * per, x + p * P * cols);
    }
    void quantize_row(int64_t r) const {
        if (kind == ACT_F32) return;
        const int64_t p = r / P, i = r - p * P;
        quantize_acts_rows(panels[p], x + p * P * cols, i, i + 1);
    }
};

struct Mat {
    const uint8_t* w = nullptr;
    int type = 0;
    int64_t rows = 0, cols = 0, rb = 0;
};

// One matmul of a phase: out [n][m->rows] = acts @ W.T, with `acts` an index into the phase's
// activation sets (decode steps give every thread its own). post: what the thread that computed
// some Q/K/V rows does with them at once (items then cover whole heads: rows % align == 0).
// m2/acts2/out2: a second weight over the same rows (ffn_up beside ffn_gate).
enum class Post { None, Q, K, V };

struct MatJob {
    const Mat* m = nullptr;
    int acts = 0;
    float* out = nullptr;
    Post post = Post::None;
    int64_t align = 1;
    const Mat* m2 = nullptr;
    int acts2 = 0;
    float* out2 = nullptr;
};

// Weight rows [r0, r1) of a job against activation panel p.
struct MatItem {
    int job;
    int64_t r0, r1, p;
};

inline int64_t job_row_bytes(const MatJob& j) { return j.m->rb + (j.m2 ? j.m2->rb : 0); }

// Work list of a phase. n <= MAX_NA (decode): the rows of each job cut into items of about
// 1/nt of the phase's weight bytes, longest first (memory-bound; every item start costs a
// stream ramp-up, ~0.4 us measured: 4 items a thread made a SmolLM token 8% slower, 16 items
// 70% slower). Else chunks of ~256 KiB of weights (L2-resident while the panel's activation
// tiles pass over them) times panels of P activation rows, at least ~4 items a thread.
void plan_phase(std::vector<MatItem>& items, const MatJob* jobs, int n_jobs, int64_t n, int64_t P, int nt) {
    items.clear();
    const int64_t np = (n + P - 1) / P;
    int64_t total = 0;
    for (int j = 0; j < n_jobs; ++j) total += jobs[j].m->rows * job_row_bytes(jobs[j]);
    for (int j = 0; j < n_jobs; ++j) {
        const int64_t rows = jobs[j].m->rows, rb = job_row_bytes(jobs[j]);
        const int64_t al = std::max<int64_t>(jobs[j].align, 1);
        int64_t R;
        if (n <= MAX_NA) {
            R = (std::max<int64_t>(total / nt, 8 << 10) + rb - 1) / rb;
        } else {
            R = std::max<int64_t>(1, (int64_t{256} << 10) / rb);
            const int64_t want = (4 * nt + np - 1) / np;  // chunks per weight for enough items
            R = std::min(R, (rows + want - 1) / want);
        }
        R = std::max<int64_t>(R, 4);
        R = std::min(rows, std::max(al, (R + al / 2) / al * al));  // nearest multiple of align
        for (int64_t r0 = 0; r0 < rows; r0 += R)
            for (int64_t p = 0; p < np; ++p) items.push_back({j, r0, std::min(rows, r0 + R), p});
    }
    if (n <= MAX_NA)
        std::stable_sort(items.begin(), items.end(), [jobs](const MatItem& a, const MatItem& b) {
            return (a.r1 - a.r0) * job_row_bytes(jobs[a.job]) > (b.r1 - b.r0) * job_row_bytes(jobs[b.job]);
        });
}

inline void run_mat(const Mat& m, const ActSet& a, float* out, const MatItem& it) {
    const int64_t stride = m.rows;
    matmul_rows(m.w, m.type, it.r0, it.r1, a.panels[it.p], out + it.p * a.P * stride, stride);
}

// Activation sets of a step: the attn_norm output in up to three formats (Q, K, V), o, the
// ffn_norm output in up to two (gate, up), and the GLU output.
enum ActIdx { A_XN0 = 0, A_O = 3, A_H0 = 4, A_H1 = 5, A_ACT = 6, kNumActs = 7 };

// A thread's own scratch: attention work space; in decode steps its copies of the row-wise
// results (xn, x + attention, h: [n][dim]; tmp: [dim]) and of the quantized activations.
struct ThreadScratch {
    Buf<float> att, xn, xp, h, tmp;
    ActSet acts[kNumActs];
};

// Scratch of a step, shared by every Block of the process: blocks run one after another, so
// one set of buffers (grown to the largest n seen) serves them all and stays cache-warm; for a
// 512-row prompt it is ~20 MB, which per block would be 20 MB x n_layers. Its mutex makes
// forward calls of different blocks from different Python threads take turns.
struct Workspace {
    std::mutex mu;
    Buf<float> xn, q, k, v, o, att, h, g, u, a, f, kt;
    ActSet acts[kNumActs];  // batches: shared by the team
    std::vector<MatItem> qkv_items, o_items, gu_items, d_items;
    std::vector<std::unique_ptr<ThreadScratch>> threads;
};

std::shared_ptr<Workspace> shared_workspace() {
    static std::mutex mu;
    static std::weak_ptr<Workspace> shared;
    std::lock_guard<std::mutex> lock(mu);
    auto ws = shared.lock();
    if (!ws) {
        ws = std::make_shared<Workspace>();
        shared = ws;
    }
    return ws;
}

[[noreturn]] void value_error(const std::string& msg) { throw py::value_error(msg); }

std::string shape_str(int64_t a, int64_t b) { return "(" + std::to_string(a) + ", " + std::to_string(b) + ")"; }

class Block {
   public:
    Block(const py::dict& cfg, const py::dict& weights, int64_t n_ctx);
    void forward(const py::object& xo, int64_t pos0, const py::object& n_threads);
    py::array cache_view(const py::object& self, bool k) const;
    int64_t n_ctx() const { return n_ctx_; }

   private:
    void run(float* x, int64_t n, int64_t pos0, int nt);

    // hyper-parameters
    int64_t dim_ = 0, H_ = 0, KV_ = 0, dk_ = 0, dv_ = 0, ffn_ = 0, rope_dim_ = 0, window_ = 0, n_ctx_ = 0;
    float eps_ = 0, scale_ = 0, q_scale_ = 1;  // scores * scale_; Q * q_scale_ after rope
    bool neox_ = false, gelu_ = false;
    int lanes_ = 8;
    // weights (views of the caller's arrays, kept alive by keep_)
    Mat wq_, wk_, wv_, wo_, wg_, wu_, wd_;
    const float *attn_norm_ = nullptr, *ffn_norm_ = nullptr, *q_norm_ = nullptr, *k_norm_ = nullptr,
                *post_attn_norm_ = nullptr, *post_ffw_norm_ = nullptr;
    std::vector<py::object> keep_;
    std::shared_ptr<const RopeTable> rope_;
    const float* gelu_table_ = nullptr;
    // f16 caches [n_ctx][KV * dk], [n_ctx][KV * dv]
    Buf<uint16_t> kc_, vc_;
    std::shared_ptr<Workspace> ws_;
};

int64_t cfg_int(const py::dict& cfg, const char* key) {
    if (!cfg.contains(key)) value_error(std::string("cfg is missing '") + key + "'");
    py::object v = cfg[key];
    if (!py::isinstance<py::int_>(v)) value_error(std::string("cfg['") + key + "'] must be an int, got " + std::string(py::str(py::type::of(v).attr("__name__"))));
    return v.cast<int64_t>();
}

double cfg_float(const py::dict& cfg, const char* key) {
    if (!cfg.contains(key)) value_error(std::string("cfg is missing '") + key + "'");
    try {
        return cfg[key].cast<double>();
    } catch (const py::cast_error&) {
        value_error(std::string("cfg['") + key + "'] must be a number");
    }
}

Mat get_matrix(const py::dict& w, const char* name, int64_t rows, int64_t cols, std::vector<py::object>& keep) {
    const std::string nm(name);
    if (!w.contains(name)) value_error("weights is missing '" + nm + "'");
    py::object obj = w[name];
    if (!PySequence_Check(obj.ptr()) || py::len(obj) != 4)
        value_error(nm + ": expected a Matrix (raw, qtype, rows, cols)");
    py::sequence seq = py::reinterpret_borrow<py::sequence>(obj);
    int qtype;
    int64_t r, c;
    try {
        qtype = seq[1].cast<int>();
        r = seq[2].cast<int64_t>();
        c = seq[3].cast<int64_t>();
    } catch (const py::cast_error&) {
        value_error(nm + ": qtype, rows and cols must be ints");
    }
    if (r != rows || c != cols)
        value_error(nm + ": expected shape " + shape_str(rows, cols) + ", got " + shape_str(r, c));
    TypeInfo ti{};
    if (!type_info(qtype, &ti)) value_error(nm + ": GGML type " + std::to_string(qtype) + " is not supported");
    if (cols % ti.block_size != 0)
        value_error(nm + ": cols=" + std::to_string(cols) + " is not a multiple of the " + ti.name +
                    " block size " + std::to_string(ti.block_size));
    if (get_kernel(qtype, 1, act_kind_for(qtype)) == nullptr)
        value_error(nm + ": no matmul kernel for " + ti.name);
    py::object raw = seq[0];
    if (!py::isinstance<py::array>(raw)) value_error(nm + ": raw must be a numpy array");
    py::array a = py::reinterpret_borrow<py::array>(raw);
    if (!(a.flags() & py::array::c_style)) a = py::array::ensure(a, py::array::c_style);
    Mat m;
    m.type = qtype, m.rows = rows, m.cols = cols, m.rb = row_bytes(ti, cols);
    if (static_cast<int64_t>(a.nbytes()) != rows * m.rb)
        value_error(nm + ": raw has " + std::to_string(a.nbytes()) + " bytes, expected " +
                    std::to_string(rows * m.rb) + " (" + std::to_string(rows) + " rows of " +
                    std::to_string(m.rb) + " bytes of " + ti.name + ")");
    m.w = static_cast<const uint8_t*>(a.data());
    keep.push_back(a);
    return m;
}

const float* get_norm(const py::dict& w, const char* name, int64_t len, bool required, std::vector<py::object>& keep) {
    const std::string nm(name);
    if (!w.contains(name)) {
        if (required) value_error("weights is missing '" + nm + "'");
        return nullptr;
    }
    py::object obj = w[name];
    if (!py::isinstance<py::array>(obj)) value_error(nm + ": expected a float32 numpy array");
    py::array a = py::reinterpret_borrow<py::array>(obj);
    if (!py::isinstance<py::array_t<float>>(a))
        value_error(nm + ": has dtype " + std::string(py::str(a.dtype())) + ", expected float32");
    if (a.ndim() != 1 || a.shape(0) != len) {
        std::string got = "(";
        for (py::ssize_t i = 0; i < a.ndim(); ++i) got += (i ? ", " : "") + std::to_string(a.shape(i));
        value_error(nm + ": expected shape (" + std::to_string(len) + ",), got " + got + (a.ndim() == 1 ? ",)" : ")"));
    }
    if (!(a.flags() & py::array::c_style)) a = py::array::ensure(a, py::array::c_style);
    keep.push_back(a);
    return static_cast<const float*>(a.data());
}

Block::Block(const py::dict& cfg, const py::dict& weights, int64_t n_ctx) {
    dim_ = cfg_int(cfg, "dim");
    H_ = cfg_int(cfg, "n_heads");
    KV_ = cfg_int(cfg, "n_kv_heads");
    dk_ = cfg_int(cfg, "head_dim_k");
    dv_ = cfg_int(cfg, "head_dim_v");
    ffn_ = cfg_int(cfg, "ffn_dim");
    rope_dim_ = cfg_int(cfg, "rope_dim");
    window_ = cfg_int(cfg, "sliding_window");
    n_ctx_ = n_ctx;
    eps_ = static_cast<float>(cfg_float(cfg, "norm_eps"));
    scale_ = static_cast<float>(cfg_float(cfg, "attn_scale"));
    q_scale_ = static_cast<float>(cfg_float(cfg, "q_scale"));
    const double rope_base = cfg_float(cfg, "rope_base"), rope_scale = cfg_float(cfg, "rope_scale");
    if (!cfg.contains("rope_neox")) value_error("cfg is missing 'rope_neox'");
    neox_ = py::bool_(cfg["rope_neox"]);
    if (!cfg.contains("activation")) value_error("cfg is missing 'activation'");
    const std::string act = py::str(cfg["activation"]);
    if (act != "silu" && act != "gelu_tanh") value_error("cfg['activation'] = '" + act + "': expected 'silu' or 'gelu_tanh'");
    gelu_ = act == "gelu_tanh";
    for (auto [v, what] : {std::pair{dim_, "dim"}, {H_, "n_heads"}, {KV_, "n_kv_heads"}, {dk_, "head_dim_k"},
                           {dv_, "head_dim_v"}, {ffn_, "ffn_dim"}})
        if (v <= 0) value_error(std::string("cfg['") + what + "'] must be > 0, got " + std::to_string(v));
    if (H_ % KV_ != 0) value_error("cfg: n_heads " + std::to_string(H_) + " is not a multiple of n_kv_heads " + std::to_string(KV_));
    if (rope_dim_ < 0 || rope_dim_ % 2 != 0 || rope_dim_ > dk_)
        value_error("cfg['rope_dim'] = " + std::to_string(rope_dim_) + ": expected an even number <= head_dim_k " + std::to_string(dk_));
    if (window_ < 0) value_error("cfg['sliding_window'] must be >= 0");
    if (!(rope_base > 0) || !(rope_scale > 0)) value_error("cfg: rope_base and rope_scale must be > 0");
    if (n_ctx <= 0) value_error("n_ctx must be > 0, got " + std::to_string(n_ctx));

    wq_ = get_matrix(weights, "attn_q", H_ * dk_, dim_, keep_);
    wk_ = get_matrix(weights, "attn_k", KV_ * dk_, dim_, keep_);
    wv_ = get_matrix(weights, "attn_v", KV_ * dv_, dim_, keep_);
    wo_ = get_matrix(weights, "attn_output", dim_, H_ * dv_, keep_);
    wg_ = get_matrix(weights, "ffn_gate", ffn_, dim_, keep_);
    wu_ = get_matrix(weights, "ffn_up", ffn_, dim_, keep_);
    wd_ = get_matrix(weights, "ffn_down", dim_, ffn_, keep_);
    attn_norm_ = get_norm(weights, "attn_norm", dim_, true, keep_);
    ffn_norm_ = get_norm(weights, "ffn_norm", dim_, true, keep_);
    q_norm_ = get_norm(weights, "attn_q_norm", dk_, false, keep_);
    k_norm_ = get_norm(weights, "attn_k_norm", dk_, false, keep_);
    if ((q_norm_ == nullptr) != (k_norm_ == nullptr))
        value_error("weights: attn_q_norm and attn_k_norm come together (got only one)");
    post_attn_norm_ = get_norm(weights, "post_attention_norm", dim_, false, keep_);
    post_ffw_norm_ = get_norm(weights, "post_ffw_norm", dim_, false, keep_);

    lanes_ = simd_lanes();
    rope_ = rope_dim_ > 0 ? rope_table(rope_base, rope_dim_, rope_scale, n_ctx) : nullptr;
    if (gelu_) gelu_table_ = gelu_table();
    const size_t kn = static_cast<size_t>(n_ctx * KV_ * dk_), vn = static_cast<size_t>(n_ctx * KV_ * dv_);
    std::fill(kc_.get(kn), kc_.get(kn) + kn, uint16_t{0});
    std::fill(vc_.get(vn), vc_.get(vn) + vn, uint16_t{0});
    ws_ = shared_workspace();
}

py::array Block::cache_view(const py::object& self, bool k) const {
    const int64_t width = KV_ * (k ? dk_ : dv_);
    uint16_t* p = const_cast<Buf<uint16_t>&>(k ? kc_ : vc_).get(0);
    return py::array(py::dtype("float16"), {n_ctx_, width},
                     {static_cast<int64_t>(width * sizeof(uint16_t)), static_cast<int64_t>(sizeof(uint16_t))}, p, self);
}

void Block::forward(const py::object& xo, int64_t pos0, const py::object& n_threads) {
    if (!py::isinstance<py::array>(xo))
        throw py::type_error("x must be a float32 numpy array of shape (n, " + std::to_string(dim_) + "), got " +
                             std::string(py::str(py::type::of(xo).attr("__name__"))));
    py::array x = py::reinterpret_borrow<py::array>(xo);
    if (!py::isinstance<py::array_t<float>>(x))
        throw py::type_error("x has dtype " + std::string(py::str(x.dtype())) + ", expected float32");
    if (x.ndim() != 2 || x.shape(1) != dim_) {
        std::string got = "(";
        for (py::ssize_t i = 0; i < x.ndim(); ++i) got += (i ? ", " : "") + std::to_string(x.shape(i));
        value_error("x has shape " + got + (x.ndim() == 1 ? ",)" : ")") + ", expected (n, " + std::to_string(dim_) + ")");
    }
    if (!(x.flags() & py::array::c_style)) value_error("x must be C-contiguous");
    if (!x.writeable()) value_error("x is read-only (it is updated in place)");
    const int64_t n = x.shape(0);
    if (pos0 < 0) value_error("pos0 must be >= 0, got " + std::to_string(pos0));
    if (pos0 + n > n_ctx_)
        value_error("positions " + std::to_string(pos0) + ".." + std::to_string(pos0 + n - 1) +
                    " exceed n_ctx=" + std::to_string(n_ctx_));
    int nt = 0;
    if (!n_threads.is_none()) {
        if (!py::isinstance<py::int_>(n_threads)) throw py::type_error("n_threads must be an int or None");
        nt = n_threads.cast<int>();
    }
    if (nt <= 0) nt = physical_cores();
    if (n == 0) return;
    float* xp = static_cast<float*>(x.mutable_data());
    py::gil_scoped_release nogil;
    std::lock_guard<std::mutex> lock(ws_->mu);
    run(xp, n, pos0, nt);
}

void Block::run(float* x, int64_t n, int64_t pos0, int nt) {
    const bool simd = !force_scalar();
    const int L = lanes_;
#if defined(__AVX512F__)
    const bool fast = simd && L == 16 && dk_ % 16 == 0 && dv_ % 16 == 0;
#else
    const bool fast = false;
#endif
    const bool batched = n > 1;
    // Decode steps (n <= MAX_NA): every thread does the row-wise work (norms, residual,
    // activation quantization) itself, into its own buffers, so the team meets only after the
    // matmuls and the attention (6 barriers a block instead of 11); x is written once, at the end.
    const bool decode = n <= MAX_NA;
    const int64_t H = H_, KV = KV_, dk = dk_, dv = dv_, dim = dim_, ffn = ffn_, group = H_ / KV_;
    const int64_t kvk = KV * dk, kvv = KV * dv;
    const int64_t kstart = window_ > 0 ? std::max<int64_t>(0, pos0 - window_ + 1) : 0;
    const int64_t T = pos0 + n - kstart;  // cache rows any query of this step may read
    const float eps = eps_;
    Workspace& ws = *ws_;

    float* q = ws.q.get(n * H * dk);     // [n][H][dk]
    float* k = ws.k.get(n * kvk);        // [n][KV][dk]
    float* v = ws.v.get(n * kvv);        // [n][KV][dv]
    float* o = ws.o.get(n * H * dv);     // [n][H][dv]
    float* att = ws.att.get(n * dim);    // [n][dim]
    float* gt = ws.g.get(n * ffn);       // [n][ffn]
    float* up = ws.u.get(n * ffn);
    float* ac = ws.a.get(n * ffn);
    float* f = ws.f.get(n * dim);
    uint16_t* kc = kc_.get(0);
    uint16_t* vc = vc_.get(0);

    // Activation formats: one set per distinct format among the weights reading one input.
    const int64_t P = n <= MAX_NA ? n : 64;
    int n_xn = 0, xn_kind[3], qkv_acts[3];
    const Mat* qkv_mat[3] = {&wq_, &wk_, &wv_};
    for (int i = 0; i < 3; ++i) {
        const int kind = act_kind_for(qkv_mat[i]->type);
        int s = 0;
        while (s < n_xn && xn_kind[s] != kind) ++s;
        if (s == n_xn) xn_kind[n_xn++] = kind;
        qkv_acts[i] = A_XN0 + s;
    }
    const int kind_g = act_kind_for(wg_.type), kind_u = act_kind_for(wu_.type);
    const int n_h = kind_g == kind_u ? 1 : 2;
    auto layout = [&](ActSet* acts, const float* xn, const float* h) {
        for (int s = 0; s < n_xn; ++s) acts[A_XN0 + s].layout(xn_kind[s], xn, n, dim, P);
        acts[A_O].layout(act_kind_for(wo_.type), o, n, H * dv, P);
        acts[A_H0].layout(kind_g, h, n, dim, P);
        if (n_h == 2) acts[A_H1].layout(kind_u, h, n, dim, P);
        acts[A_ACT].layout(act_kind_for(wd_.type), ac, n, ffn, P);
    };

    // Attention work. Batches: (head, block of QB query rows), the latest rows (most keys)
    // first so that the dynamic schedule ends balanced. One row: (KV group, some of its heads),
    // the group cut into as few parts as give every thread work, so that each part streams the
    // group's cache rows once (GQA; at long contexts they come from DRAM).
    const int64_t QB = 16;
    const int64_t n_qb = batched ? (n + QB - 1) / QB : 1;
    const int64_t parts = std::min<int64_t>(group, std::max<int64_t>(1, (nt + KV - 1) / KV));
    const int64_t hpp = (group + parts - 1) / parts;  // heads per part
    const int64_t n_att = batched ? H * n_qb : KV * parts;
    const bool use_kt = fast && batched;
    const int64_t ldk = round_up(T, 16) + 16;  // transposed keys [KV][dk][ldk], padded for 16-key loads
    float* kt = use_kt ? ws.kt.get(KV * dk * ldk) : nullptr;
    const int64_t n_ktb = (T + 63) / 64;
    const int64_t s_len = round_up(T + 64, 16);  // scores of one row, 16-aligned, with slack

    while (static_cast<int>(ws.threads.size()) < nt) ws.threads.push_back(std::make_unique<ThreadScratch>());
    for (int t = 0; t < nt; ++t) {
        ThreadScratch& me = *ws.threads[t];
        // scores [hpp][s_len] and accumulators [hpp][64][dv] (batches and the portable path
        // use [s_len] and [4 L][dv]), then a row of max(dk, dv)
        me.att.get(static_cast<size_t>(hpp * (s_len + 64 * dv) + 4 * L * dv + std::max(dk, dv) + 64));
        if (decode) {
            me.xp.get(n * dim);
            me.tmp.get(dim);
            layout(me.acts, me.xn.get(n * dim), me.h.get(n * dim));
        }
    }
    float* xn_sh = decode ? nullptr : ws.xn.get(n * dim);
    float* h_sh = decode ? nullptr : ws.h.get(n * dim);
    if (!decode) layout(ws.acts, xn_sh, h_sh);

    const MatJob qkv_jobs[3] = {{&wq_, qkv_acts[0], q, Post::Q, dk},
                                {&wk_, qkv_acts[1], k, Post::K, dk},
                                {&wv_, qkv_acts[2], v, Post::V, dv}};
    const MatJob o_job = {&wo_, A_O, att};
    const MatJob gu_job = {&wg_, A_H0, gt, Post::None, 1, &wu_, n_h == 2 ? A_H1 : A_H0, up};
    const MatJob d_job = {&wd_, A_ACT, f};
    plan_phase(ws.qkv_items, qkv_jobs, 3, n, P, nt);
    plan_phase(ws.o_items, &o_job, 1, n, P, nt);
    plan_phase(ws.gu_items, &gu_job, 1, n, P, nt);
    plan_phase(ws.d_items, &d_job, 1, n, P, nt);
    const MatItem* qkv_it = ws.qkv_items.data();
    const MatItem* o_it = ws.o_items.data();
    const MatItem* gu_it = ws.gu_items.data();
    const MatItem* d_it = ws.d_items.data();
    const int64_t n_qkv = static_cast<int64_t>(ws.qkv_items.size()), n_o = static_cast<int64_t>(ws.o_items.size()),
                  n_gu = static_cast<int64_t>(ws.gu_items.size()), n_d = static_cast<int64_t>(ws.d_items.size());

    const RopeTable* rope = rope_.get();
    const int64_t half = rope ? rope->half : 0;
    const int64_t simd_end = ffn - ffn % 16;

    // Heads [r0 / hd, r1 / hd) of the Q/K/V rows an item just computed, for its panel's rows:
    // Q: q_norm, rope, f16 rounding; K: k_norm, rope, into the f16 cache; V: into its cache.
    auto post_heads = [&](const MatJob& j, const MatItem& it) {
        const int64_t a0 = it.p * P, a1 = std::min(n, a0 + P);
        for (int64_t t = a0; t < a1; ++t) {
            const int64_t pos = pos0 + t;
            const float* cs = rope ? rope->cos.data() + pos * half : nullptr;
            const float* sn = rope ? rope->sin.data() + pos * half : nullptr;
            if (j.post == Post::Q) {
                for (int64_t hh = it.r0 / dk; hh < it.r1 / dk; ++hh) {
                    float* qh = q + (t * H + hh) * dk;
                    if (q_norm_) rms_norm_row(qh, q_norm_, eps, dk, qh);
                    if (rope) rope_head(qh, cs, sn, half, neox_);
                    if (q_scale_ != 1.0f)
                        for (int64_t d = 0; d < dk; ++d) qh[d] *= q_scale_;
                    round_f16_row(qh, dk);
                }
            } else if (j.post == Post::K) {
                for (int64_t g = it.r0 / dk; g < it.r1 / dk; ++g) {
                    float* kh = k + (t * KV + g) * dk;
                    if (k_norm_) rms_norm_row(kh, k_norm_, eps, dk, kh);
                    if (rope) rope_head(kh, cs, sn, half, neox_);
                    to_f16_row(kh, kc + pos * kvk + g * dk, dk);
                }
            } else if (j.post == Post::V) {
                for (int64_t g = it.r0 / dv; g < it.r1 / dv; ++g)
                    to_f16_row(v + (t * KV + g) * dv, vc + pos * kvv + g * dv, dv);
            }
        }
    };

#pragma omp parallel num_threads(nt)
    {
        ThreadScratch& me = *ws.threads[omp_get_thread_num()];
        float* ts = me.att.get(0);
        const ActSet* acts = decode ? me.acts : ws.acts;
        float* xn = decode ? me.xn.get(0) : xn_sh;
        float* h = decode ? me.h.get(0) : h_sh;
        float* xp = decode ? me.xp.get(0) : x;  // x after the attention residual
        float* tmp = decode ? me.tmp.get(0) : nullptr;

        // 1. xn = attn_norm(x), quantized once per format that Q, K, V read.
        if (decode) {
            for (int64_t r = 0; r < n; ++r) {
                rms_norm_row(x + r * dim, attn_norm_, eps, dim, xn + r * dim);
                for (int s = 0; s < n_xn; ++s) acts[A_XN0 + s].quantize_row(r);
            }
        } else {
#pragma omp for schedule(static)
            for (int64_t r = 0; r < n; ++r) {
                rms_norm_row(x + r * dim, attn_norm_, eps, dim, xn + r * dim);
                for (int s = 0; s < n_xn; ++s) acts[A_XN0 + s].quantize_row(r);
            }
        }
        // 2. Q, K, V: one dynamic work list over the three weights; whole heads post-processed
        //    by the thread that computed them.
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < n_qkv; ++i) {
            const MatJob& j = qkv_jobs[qkv_it[i].job];
            run_mat(*j.m, acts[j.acts], j.out, qkv_it[i]);
            post_heads(j, qkv_it[i]);
        }
        // 3. Batches: keys kstart.. as float, transposed (kt[g][d][pos - kstart]), once per step.
        if (use_kt) {
#pragma omp for schedule(static)
            for (int64_t i = 0; i < KV * n_ktb; ++i) {
                const int64_t g = i / n_ktb, t0 = (i % n_ktb) * 64, t1 = std::min(T, t0 + 64);
                float* ktg = kt + g * dk * ldk;
                float* row = ts + s_len + 4 * L * dv;  // [max(dk, dv)]
                for (int64_t t = t0; t < t1; ++t) {
                    from_f16_row(kc + (kstart + t) * kvk + g * dk, row, dk);
                    for (int64_t d = 0; d < dk; ++d) ktg[d * ldk + t] = row[d];
                }
                if (t1 == T)  // zero the padding columns the 16-key loads may read
                    for (int64_t d = 0; d < dk; ++d) std::fill(ktg + d * ldk + T, ktg + (d + 1) * ldk, 0.0f);
            }
        }
        // 4. Attention: o = softmax(q16 . K^T * scale + mask) . V per (query row, head).
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < n_att; ++i) {
            int64_t h0, h1, t0, t1;
            if (batched) {
                h0 = i % H, h1 = h0 + 1;
                t0 = (n_qb - 1 - i / H) * QB, t1 = std::min(n, t0 + QB);
            } else {
                const int64_t g = i / parts, part = i % parts;
                h0 = g * group + part * hpp, h1 = std::min(g * group + group, h0 + hpp);
                t0 = 0, t1 = 1;
            }
            const int64_t g = h0 / group;
            const uint16_t* kcg = kc + g * dk;
            const uint16_t* vcg = vc + g * dv;
            for (int64_t t = t0; t < t1; ++t) {
                const int64_t p = pos0 + t;
                const int64_t lo = window_ > 0 ? std::max(kstart, p - window_ + 1) : kstart;
#if defined(__AVX512F__)
                if (fast) {
                    const int64_t base = lo - lo % 16;  // scores at s[pos - base]
                    const int nh = static_cast<int>(h1 - h0);
                    const float* qh = q + (t * H + h0) * dk;
                    float* out = o + (t * H + h0) * dv;
                    if (batched) {
                        scores_tiny16(qh, kt + g * dk * ldk, ldk, lo - kstart, p + 1 - lo, dk, scale_, ts + (lo - base));
                        softmax16(ts, base, lo, p);
                        pv16(ts, base, vcg, kvv, lo, p, dv, out);
                    } else {
                        scores_vec16(qh, nh, kcg, kvk, vcg, kvv, dv, lo, p, dk, scale_, ts + (lo - base), s_len);
                        for (int j = 0; j < nh; ++j) softmax16(ts + j * s_len, base, lo, p);
                        pv_vec16(ts, nh, s_len, base, vcg, kvv, lo, p, dv, ts + nh * s_len, out);
                    }
                    continue;
                }
#endif
                float* acc = ts + s_len;
                float* row = acc + 4 * L * dv;
                for (int64_t hh = h0; hh < h1; ++hh) {
                    const float* qh = q + (t * H + hh) * dk;
                    float* out = o + (t * H + hh) * dv;
                    if (L == 16)
                        attend_generic<16>(qh, kcg, kvk, vcg, kvv, lo, p, dk, dv, scale_, batched, ts, acc, row, out);
                    else
                        attend_generic<8>(qh, kcg, kvk, vcg, kvv, lo, p, dk, dv, scale_, batched, ts, acc, row, out);
                }
            }
        }
        // 5-6. att = o @ Wo.T
        if (decode) {
            for (int64_t r = 0; r < n; ++r) acts[A_O].quantize_row(r);
        } else {
#pragma omp for schedule(static)
            for (int64_t r = 0; r < n; ++r) acts[A_O].quantize_row(r);
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < n_o; ++i) run_mat(wo_, acts[A_O], att, o_it[i]);
        // 7. xp = x + post_attention_norm?(att); h = ffn_norm(xp), quantized for gate and up.
        //    Decode: xp is this thread's copy (x itself is written in 11).
        if (decode) {
            for (int64_t r = 0; r < n; ++r) {
                const float* xr = x + r * dim;
                const float* ar = att + r * dim;
                if (post_attn_norm_) {
                    rms_norm_row(ar, post_attn_norm_, eps, dim, tmp);
                    ar = tmp;
                }
                float* pr = xp + r * dim;
                for (int64_t j = 0; j < dim; ++j) pr[j] = xr[j] + ar[j];
                rms_norm_row(pr, ffn_norm_, eps, dim, h + r * dim);
                for (int s = 0; s < n_h; ++s) acts[A_H0 + s].quantize_row(r);
            }
        } else {
#pragma omp for schedule(static)
            for (int64_t r = 0; r < n; ++r) {
                float* xr = x + r * dim;
                float* ar = att + r * dim;
                if (post_attn_norm_) rms_norm_row(ar, post_attn_norm_, eps, dim, ar);
                for (int64_t j = 0; j < dim; ++j) xr[j] = xr[j] + ar[j];
                rms_norm_row(xr, ffn_norm_, eps, dim, h + r * dim);
                for (int s = 0; s < n_h; ++s) acts[A_H0 + s].quantize_row(r);
            }
        }
        // 8. gate and up over the same weight rows, then the activation on those columns.
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < n_gu; ++i) {
            const MatItem& it = gu_it[i];
            run_mat(*gu_job.m, acts[gu_job.acts], gu_job.out, it);
            run_mat(*gu_job.m2, acts[gu_job.acts2], gu_job.out2, it);
            const int64_t a0 = it.p * P, a1 = std::min(n, a0 + P);
            for (int64_t r = a0; r < a1; ++r) {
                if (gelu_)
                    geglu_cols(gt + r * ffn, up + r * ffn, ac + r * ffn, it.r0, it.r1, gelu_table_, simd);
                else
                    swiglu_cols(gt + r * ffn, up + r * ffn, ac + r * ffn, it.r0, it.r1, simd_end, simd);
            }
        }
        // 9-10. f = act @ Wd.T
        if (decode) {
            for (int64_t r = 0; r < n; ++r) acts[A_ACT].quantize_row(r);
        } else {
#pragma omp for schedule(static)
            for (int64_t r = 0; r < n; ++r) acts[A_ACT].quantize_row(r);
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < n_d; ++i) run_mat(wd_, acts[A_ACT], f, d_it[i]);
        // 11. x = xp + post_ffw_norm?(f)
        if (decode) {
            if (omp_get_thread_num() == 0) {
                for (int64_t r = 0; r < n; ++r) {
                    const float* fr = f + r * dim;
                    if (post_ffw_norm_) {
                        rms_norm_row(fr, post_ffw_norm_, eps, dim, tmp);
                        fr = tmp;
                    }
                    float* xr = x + r * dim;
                    const float* pr = xp + r * dim;
                    for (int64_t j = 0; j < dim; ++j) xr[j] = pr[j] + fr[j];
                }
            }
        } else {
#pragma omp for schedule(static) nowait
            for (int64_t r = 0; r < n; ++r) {
                float* xr = x + r * dim;
                float* fr = f + r * dim;
                if (post_ffw_norm_) rms_norm_row(fr, post_ffw_norm_, eps, dim, fr);
                for (int64_t j = 0; j < dim; ++j) xr[j] = xr[j] + fr[j];
            }
        }
    }
}

}  // namespace

void register_block(py::module_& m) {
    py::class_<Block>(m, "Block",
                      "One transformer block on the CPU (see hybridllm.model.PyBlock, same contract):\n"
                      "Block(cfg, weights, n_ctx); forward(x[n, dim] float32, pos0, n_threads=0) updates x\n"
                      "in place; k_cache / v_cache are float16 [n_ctx, kv_dim] views of the caches.")
        .def(py::init<const py::dict&, const py::dict&, int64_t>(), py::arg("cfg"), py::arg("weights"),
             py::arg("n_ctx"))
        .def("forward", &Block::forward, py::arg("x"), py::arg("pos0"), py::arg("n_threads") = py::none(),
             "Evaluate rows x[n, dim] at positions pos0.. in place; n_threads <= 0 or None: physical cores.")
        .def_property_readonly("k_cache", [](const py::object& self) { return self.cast<const Block&>().cache_view(self, true); })
        .def_property_readonly("v_cache", [](const py::object& self) { return self.cast<const Block&>().cache_view(self, false); })
        .def_property_readonly("n_ctx", &Block::n_ctx);
}

}  // namespace hl
