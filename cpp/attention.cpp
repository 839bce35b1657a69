// Attention with llama.cpp's non-flash arithmetic (see attention.h): the portable version for
// any lane count, and one SIMD template over the ISA traits of ops.h.
//
// Work split (a team of nt threads):
//   batches (n > 1): keys and values converted to float once per step, keys in blocks of L
//     ([KV][T/L][dk][L], so that L keys sit in the L lanes and tinyBLAS's per-output
//     accumulators become L vectors folded by halving), values in blocks of L dims
//     ([KV][dv/L][T][L], read contiguously by P.V),
//     then items (head, block of QB query rows), latest rows first. Inside an item the key
//     blocks are the outer loop and the rows the inner one (a key block stays in L1 across the
//     rows), and P.V walks output-dim blocks outside the rows (that V column slice stays in L2).
//   one row, short context: items (KV group, part of its heads); each key and value row is read
//     once per part (GQA).
//   one row, long context (T >= kSplitT): three phases, so both threads stream the cache:
//     scores of (group, position block) items, the softmax of each head, then P.V of
//     (group, output-dim chunk) items (each output's chain over positions stays in one thread).
#include "attention.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "simd.h"
#include "vecdot.h"

// No contraction of separate multiplies and adds: the reference rounds the product first.
#pragma GCC optimize("fp-contract=off")

namespace hl {
namespace {

constexpr int64_t QB = 16;        // query rows of a batch item
constexpr int64_t kSplitT = 512;  // one-row steps that read at least this many cache rows split

inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }
inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// ---- portable: ggml's order for any L ------------------------------------------------------

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
    float m = kNegInf;
    for (int64_t j = 0; j < nk; ++j) m = std::max(m, s[j]);
    for (int64_t j = 0; j < nk; ++j) s[j] = v_expf(s[j] - m, L == 8);
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
                    float* s, float* acc, float* row, float* out, const Attention* capper) {
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
    if (capper != nullptr) capper->cap(s, nk);
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

// ---- SIMD kernels, one template over the ISA traits ----------------------------------------
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__) && defined(__F16C__))

// a[0] = halving sum over the L vectors a[0..L) (lane-wise): a[i] = a[w+i] + a[i].
template <class S>
inline typename S::V halve(typename S::V* a) {
    for (int w = S::L / 2; w >= 1; w /= 2)
        for (int i = 0; i < w; ++i) a[i] = S::add(a[w + i], a[i]);
    return a[0];
}

// ggml_vec_dot_f16's lane fold applied lane-wise to L vectors t[0..L) (vector i holds lane i of
// many outputs): halving on AVX-512; on AVX2 (i + i+4), then (0+1) + (2+3) as two hadds give.
template <class S>
inline typename S::V vec_fold_lanes(typename S::V* t) {
    if constexpr (S::L == 16) {
        return halve<S>(t);
    } else {
        for (int i = 0; i < 4; ++i) t[i] = S::add(t[i], t[i + 4]);
        return S::add(S::add(t[0], t[1]), S::add(t[2], t[3]));
    }
}

#if defined(__AVX512F__)
// The AVX-512 lane fold (halving: a[i] = a[i + w] + a[i] for w = 8, 4, 2, 1) of 16 vectors at
// once: lane k of the result is the fold of v[k], with the same additions. Each round adds the
// two halves of pairs of vectors side by side (two shuffles and one add per pair); the last
// round leaves the sum of v[k] in lane 4 (k % 4) + k / 4, which one permute puts in lane k.
// 16 folds in 46 instructions instead of 16 x 8.
inline __m512 fold16_transposed(const __m512* v) {
    __m512 z[8], w[4], u[2];
    for (int k = 0; k < 8; ++k)  // w = 8: lanes 0-7 of z[k] fold v[2k], lanes 8-15 fold v[2k+1]
        z[k] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0xEE),
                             _mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0x44));
    for (int m = 0; m < 4; ++m)  // w = 4: 128-bit lane c of w[m] folds v[4m + c]
        w[m] = _mm512_add_ps(_mm512_shuffle_f32x4(z[2 * m], z[2 * m + 1], 0xDD),
                             _mm512_shuffle_f32x4(z[2 * m], z[2 * m + 1], 0x88));
    for (int n = 0; n < 2; ++n)  // w = 2: lane c of u[n]: [v[8n+c] x2, v[8n+4+c] x2]
        u[n] = _mm512_add_ps(_mm512_shuffle_ps(w[2 * n], w[2 * n + 1], _MM_SHUFFLE(3, 2, 3, 2)),
                             _mm512_shuffle_ps(w[2 * n], w[2 * n + 1], _MM_SHUFFLE(1, 0, 1, 0)));
    // w = 1: element e of 128-bit lane c holds v[c + 4e]
    const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(u[0], u[1], _MM_SHUFFLE(3, 1, 3, 1)),
                                   _mm512_shuffle_ps(u[0], u[1], _MM_SHUFFLE(2, 0, 2, 0)));
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), r);
}

// Prefetch the bytes [0, n) of rows first.. first + count - 1 (stride `stride` halves).
template <int kHint>
inline void prefetch_rows(const uint16_t* first, int64_t count, int64_t stride, int64_t n) {
    for (int64_t k = 0; k < count; ++k) {
        const char* row = reinterpret_cast<const char*>(first + k * stride);
        for (int64_t o = 0; o < n; o += 64) _mm_prefetch(row + o, static_cast<_mm_hint>(kHint));
    }
}

// scores_vec's keys lo.. in groups of 16 (dk a multiple of 64, L = 16): each key's four
// accumulators are folded (0+2)+(1+3) as ggml does, and the 16 keys' lane folds run as one
// fold16_transposed. Returns the first position left (fewer than 16 keys to hi). The cache rows
// are strided (other heads between them) and read once a step, from memory or a far cache
// (a 16-row SmolLM2 step takes ~33 us longer per cached key), so key rows are prefetched two groups ahead,
// and the value rows the P.V will read (vc: dv values at stride vs, or nullptr) into L2 while
// the scores are computed.
inline int64_t scores_by16(const float* q, int nh, const uint16_t* kc, int64_t ks, int64_t lo, int64_t hi,
                           int64_t dk, float scale, float* s, int64_t ls, const uint16_t* vc, int64_t vs,
                           int64_t dv) {
    using S = Isa16;
    int64_t pos = lo;
    if (pos + 15 <= hi) prefetch_rows<_MM_HINT_T0>(kc + pos * ks, std::min<int64_t>(32, hi + 1 - pos), ks, dk * 2);
    for (; pos + 15 <= hi; pos += 16) {
        const uint16_t* k0 = kc + pos * ks;
        if (pos + 32 <= hi) prefetch_rows<_MM_HINT_T0>(k0 + 32 * ks, std::min<int64_t>(16, hi + 1 - pos - 32), ks, dk * 2);
        if (vc != nullptr) prefetch_rows<_MM_HINT_T1>(vc + pos * vs, 16, vs, dv * 2);
        for (int j = 0; j < nh; ++j) {
            const float* qj = q + j * dk;
            __m512 v[16];
            for (int k = 0; k < 16; ++k) {
                const uint16_t* kr = k0 + k * ks;
                __m512 a0 = S::zero(), a1 = a0, a2 = a0, a3 = a0;
                for (int64_t c = 0; c < dk; c += 64) {
                    a0 = S::fma(S::load(qj + c), S::load_h(kr + c), a0);
                    a1 = S::fma(S::load(qj + c + 16), S::load_h(kr + c + 16), a1);
                    a2 = S::fma(S::load(qj + c + 32), S::load_h(kr + c + 32), a2);
                    a3 = S::fma(S::load(qj + c + 48), S::load_h(kr + c + 48), a3);
                }
                v[k] = S::add(S::add(a0, a2), S::add(a1, a3));
            }
            S::store(s + j * ls + pos - lo, S::mul(fold16_transposed(v), S::set1(scale)));
        }
    }
    return pos;
}
#endif

// Scores of nh query heads (head j: q + j * dk) against cache rows lo..hi in ggml_vec_dot_f16's
// order: four L-lane accumulators fed round-robin, folded (0+2)+(1+3), then vec_fold, leftovers
// (dk % 4L) summed in double. s[j * ls + pos - lo]. Each key row is read once for the group.
template <class S>
void scores_vec(const float* q, int nh, const uint16_t* kc, int64_t ks, int64_t lo, int64_t hi,
                int64_t dk, float scale, float* s, int64_t ls, const uint16_t* vc = nullptr, int64_t vs = 0,
                int64_t dv = 0) {
    using V = typename S::V;
    constexpr int L = S::L;
    const int64_t body = dk - dk % (4 * L);
    int64_t pos = lo;
#if defined(__AVX512F__)
    if constexpr (L == 16)
        if (body == dk) pos = scores_by16(q, nh, kc, ks, lo, hi, dk, scale, s, ls, vc, vs, dv);
#endif
    for (; pos <= hi; ++pos) {
        const uint16_t* k = kc + pos * ks;
        // rows are strided (other heads between them): fetch a few positions ahead
        const char* kn = reinterpret_cast<const char*>(k + 8 * ks);
        for (int64_t o = 0; o < dk * 2; o += 64) _mm_prefetch(kn + o, _MM_HINT_T0);
        for (int j = 0; j < nh; ++j) {
            const float* qj = q + j * dk;
            V a0 = S::zero(), a1 = a0, a2 = a0, a3 = a0;
            for (int64_t c = 0; c < body; c += 4 * L) {
                a0 = S::fma(S::load(qj + c), S::load_h(k + c), a0);
                a1 = S::fma(S::load(qj + c + L), S::load_h(k + c + L), a1);
                a2 = S::fma(S::load(qj + c + 2 * L), S::load_h(k + c + 2 * L), a2);
                a3 = S::fma(S::load(qj + c + 3 * L), S::load_h(k + c + 3 * L), a3);
            }
            double total = S::vec_fold(S::add(S::add(a0, a2), S::add(a1, a3)));
            for (int64_t c = body; c < dk; ++c) {
                const float p = qj[c] * fp16_to_f32(k[c]);
                total += static_cast<double>(p);
            }
            s[j * ls + pos - lo] = static_cast<float>(total) * scale;
        }
    }
}

// ggml_soft_max over positions lo..hi whose scores are at s[pos - base], base = lo - lo % L:
// the lanes of the touched L-chunks outside [lo, hi] are set to -inf (exp gives exactly 0, as
// ggml's -inf mask does); ggml_v_expf; each chunk (aligned on position 0) summed by halving into
// a double; times float(1/sum); rounded to f16.
template <class S>
void softmax(float* s, int64_t base, int64_t lo, int64_t hi) {
    using V = typename S::V;
    constexpr int L = S::L;
    const int64_t end = round_up(hi + 1, L);
    std::fill(s, s + (lo - base), kNegInf);
    std::fill(s + (hi + 1 - base), s + (end - base), kNegInf);
    const int64_t nch = (end - base) / L;
    V mv = S::set1(kNegInf);
    for (int64_t c = 0; c < nch; ++c) mv = S::max(mv, S::load(s + L * c));
    const V m = S::set1(S::hmax(mv));
    double total = 0.0;
    for (int64_t c = 0; c < nch; ++c) {
        const V e = S::expf(S::sub(S::load(s + L * c), m));
        S::store(s + L * c, e);
        total += static_cast<double>(S::hsum(e));
    }
    const V inv = S::set1(static_cast<float>(1.0 / total));
    for (int64_t c = 0; c < nch; ++c) S::store(s + L * c, S::round_h(S::mul(S::load(s + L * c), inv)));
}

// Decode P.V of nh heads of one KV group for the W*L output dims at d0, in ggml_vec_dot_f16's
// order over positions: chain r = pos % 4L (accumulator r / L, lane r % L) sums its positions
// in order; the chains are then folded (0+2)+(1+3) and by vec_fold_lanes. A chain's W vectors
// stay in registers while it walks its positions (stride 4L rows) inside a superblock of
// 16 * 4L rows, whose value columns (prefetched one superblock ahead) stay in L2 for the nh
// heads; between superblocks the chains wait in acc [nh][4L][W*L]. prob + j * ls: head j's
// probabilities (index pos - base); out + j * dv: head j's output.
template <class S, int W>
void pv_vec_w(const float* prob, int nh, int64_t ls, int64_t base, const uint16_t* vc, int64_t vs,
              int64_t lo, int64_t hi, int64_t d0, int64_t dv, float* acc, float* out) {
    using V = typename S::V;
    constexpr int L = S::L, C = 4 * L, DC = W * L;
    constexpr int64_t SB = 16 * C;
    std::fill(acc, acc + nh * C * DC, 0.0f);  // chains without positions are zeros, as in ggml
    const uint16_t* v0 = vc + d0;
    auto prefetch = [&](int64_t a, int64_t b) {
        for (int64_t pos = a; pos <= b; ++pos) _mm_prefetch(reinterpret_cast<const char*>(v0 + pos * vs), _MM_HINT_T1);
    };
    prefetch(lo, std::min(hi, lo + SB - 1));
    for (int64_t sb = lo; sb <= hi; sb += SB) {
        const int64_t se = std::min(hi, sb + SB - 1);
        prefetch(se + 1, std::min(hi, se + SB));
        for (int j = 0; j < nh; ++j) {
            const float* pj = prob + j * ls - base;  // pj[pos]
            for (int64_t first = sb; first <= std::min(se, sb + C - 1); ++first) {
                float* a = acc + (j * C + first % C) * DC;
                V x[W];
                for (int w = 0; w < W; ++w) x[w] = S::load(a + w * L);
                for (int64_t pos = first; pos <= se; pos += C) {
                    const V p = S::set1(pj[pos]);
                    const uint16_t* v = v0 + pos * vs;
                    for (int w = 0; w < W; ++w) x[w] = S::fma(S::load_h(v + w * L), p, x[w]);
                }
                for (int w = 0; w < W; ++w) S::store(a + w * L, x[w]);
            }
        }
    }
    for (int j = 0; j < nh; ++j) {
        const float* aj = acc + j * C * DC;
        for (int d = 0; d < DC; d += L) {
            V t[L];
            for (int i = 0; i < L; ++i)
                t[i] = S::add(S::add(S::load(aj + i * DC + d), S::load(aj + (2 * L + i) * DC + d)),
                              S::add(S::load(aj + (L + i) * DC + d), S::load(aj + (3 * L + i) * DC + d)));
            S::store(out + j * dv + d0 + d, vec_fold_lanes<S>(t));
        }
    }
}

#if defined(__AVX512F__)
// Decode P.V of NH heads of one KV group for the 16 output dims at d0 (L = 16), straight down
// ggml's fold of its chains (chain r: positions = r mod 64, fma'd in order from zero; accumulator
// r / 16, lane r % 16): t_i = (C_i + C_{i+32}) + (C_{i+16} + C_{i+48}), then the halving fold
// over t_0..t_15 (a[i] = a[i + w] + a[i]), evaluated depth first so that one partial per level
// waits in registers and no chain goes to memory (pv_vec_w keeps all 64 chains x dims in a
// zeroed scratch, which costs more than the products at the short contexts of decode steps).
// Each value vector is converted once for the NH heads.
template <int NH>
struct PvTree {
    using S = Isa16;
    using V = __m512;
    const float* p;      // head j's probabilities: p[j * ls + pos]
    int64_t ls;
    const uint16_t* v0;  // value column d0 of cache row 0
    int64_t vs, lo, hi;

    HL_INLINE void chain(int r, V* out) const {
        V x[NH];
        for (int j = 0; j < NH; ++j) x[j] = S::zero();
        for (int64_t pos = lo + (r - lo % 64 + 64) % 64; pos <= hi; pos += 64) {
            const V v = S::load_h(v0 + pos * vs);
            for (int j = 0; j < NH; ++j) x[j] = S::fma(v, S::set1(p[j * ls + pos]), x[j]);
        }
        for (int j = 0; j < NH; ++j) out[j] = x[j];
    }
    // The fold's value a[i] after its round of width w (w = 16: t_i, before any round).
    template <int w>
    HL_INLINE void node(int i, V* out) const {
        if constexpr (w == 16) {
            V a[NH], b[NH];
            chain(i, a);
            chain(i + 32, b);
            for (int j = 0; j < NH; ++j) a[j] = S::add(a[j], b[j]);
            chain(i + 16, out);
            chain(i + 48, b);
            for (int j = 0; j < NH; ++j) out[j] = S::add(a[j], S::add(out[j], b[j]));
        } else {
            V a[NH];
            node<2 * w>(i + w, a);
            node<2 * w>(i, out);
            for (int j = 0; j < NH; ++j) out[j] = S::add(a[j], out[j]);
        }
    }
    // All dims [0, dv) (a multiple of 16): head j's output at out + j * dv.
    static void run(const float* prob, int64_t ls, int64_t base, const uint16_t* vc, int64_t vs, int64_t lo,
                    int64_t hi, int64_t dv, float* out) {
        for (int64_t d0 = 0; d0 < dv; d0 += 16) {
            const PvTree tree{prob - base, ls, vc + d0, vs, lo, hi};
            V r[NH];
            tree.template node<1>(0, r);
            for (int j = 0; j < NH; ++j) S::store(out + j * dv + d0, r[j]);
        }
    }
};

// P.V of nh heads (probabilities prob + j * ls, index pos - base) by PvTree, up to 3 heads at a
// time (their trees fit the 32 vector registers): out + j * dv. For the short contexts of unsplit
// steps: its chains stride 64 cache rows, which past a few hundred rows the superblocks of
// pv_vec_w read better (measured at 4096: 10-15% slower steps).
inline void pv_tree(const float* prob, int nh, int64_t ls, int64_t base, const uint16_t* vc, int64_t vs,
                    int64_t lo, int64_t hi, int64_t dv, float* out) {
    for (int j = 0; j < nh;) {
        const int left = nh - j;
        const float* pj = prob + j * ls;
        float* oj = out + j * dv;
        if (left >= 3) {
            PvTree<3>::run(pj, ls, base, vc, vs, lo, hi, dv, oj);
            j += 3;
        } else if (left == 2) {
            PvTree<2>::run(pj, ls, base, vc, vs, lo, hi, dv, oj);
            j += 2;
        } else {
            PvTree<1>::run(pj, ls, base, vc, vs, lo, hi, dv, oj);
            j += 1;
        }
    }
}
#endif

// pv_vec_w over output dims [d0, d0 + dc) (dc a multiple of L) in slices of up to 4L.
// Scratch acc: nh * 4L * min(dc, 4L) floats.
template <class S>
void pv_vec(const float* prob, int nh, int64_t ls, int64_t base, const uint16_t* vc, int64_t vs,
            int64_t lo, int64_t hi, int64_t d0, int64_t dc, int64_t dv, float* acc, float* out) {
    constexpr int L = S::L;
    for (int64_t d = d0; d < d0 + dc;) {
        const int64_t left = d0 + dc - d;
        if (left >= 4 * L) {
            pv_vec_w<S, 4>(prob, nh, ls, base, vc, vs, lo, hi, d, dv, acc, out);
            d += 4 * L;
        } else if (left >= 2 * L) {
            pv_vec_w<S, 2>(prob, nh, ls, base, vc, vs, lo, hi, d, dv, acc, out);
            d += 2 * L;
        } else {
            pv_vec_w<S, 1>(prob, nh, ls, base, vc, vs, lo, hi, d, dv, acc, out);
            d += L;
        }
    }
}

// Batch scores of rows [0, nr) of one head in tinyBLAS's order: one L-lane accumulator per
// (row, key), lanes over dims, halving hsum. The keys are float blocks of L keys, kt [blk][dk][L]
// (block b: positions kbase + b L ..), so that with L keys in the L lanes the L lane
// accumulators are L vectors and the hsum is L-1 vector adds. Key blocks outside, rows inside:
// a block (dk x L floats, 4-16 KiB) stays in L1 across the rows. Row r's scores at s + r * ls,
// index pos - kbase; whole blocks are written (the softmax masks the lanes outside the row).
template <class S>
void scores_tiny_rows(const float* q, int64_t qs, const float* kt, int64_t kbase, const int64_t* lo,
                      const int64_t* hi, int64_t nr, int64_t dk, float scale, float* s, int64_t ls) {
    using V = typename S::V;
    constexpr int L = S::L;
    int64_t first = lo[0], last = hi[0];
    for (int64_t r = 1; r < nr; ++r) first = std::min(first, lo[r]), last = std::max(last, hi[r]);
    const V vscale = S::set1(scale);
    for (int64_t b = first - first % L; b <= last; b += L) {
        const float* blk = kt + (b - kbase) * dk;  // (b - kbase) / L blocks of dk * L floats
        for (int64_t r = 0; r < nr; ++r) {
            if (b + L <= lo[r] || b > hi[r]) continue;
            const float* qr = q + r * qs;
            V acc[L];
            for (auto& a : acc) a = S::zero();
            for (int64_t c = 0; c < dk; c += L) {
#pragma GCC unroll 16
                for (int i = 0; i < L; ++i) acc[i] = S::fma(S::set1(qr[c + i]), S::load(blk + (c + i) * L), acc[i]);
            }
            S::store(s + r * ls + (b - kbase), S::mul(halve<S>(acc), vscale));
        }
    }
}

// Batch P.V of rows [0, nr) in tinyBLAS's order: one L-lane accumulator per output, lane =
// pos % L, halving hsum. L output dims at a time with the L lane accumulators in registers,
// walking aligned groups of L positions: vt [ldv][L] holds those L dims of the values as float
// (row pos - kbase; zeros outside the cache rows). Each row's probabilities are 0 on the lanes
// of its groups outside [lo, hi] (the softmax's masking), so whole groups are added, as
// llama.cpp adds its masked cells. Dim blocks outside, rows inside (the slice, T x L floats,
// stays in L2 across the rows). Row r's probabilities at prob + r * ls, index pos - kbase.
template <class S>
void pv_rows(const float* prob, int64_t ls, int64_t kbase, const float* vt, int64_t ldv, const int64_t* lo,
             const int64_t* hi, int64_t nr, int64_t dv, float* out, int64_t os) {
    using V = typename S::V;
    constexpr int L = S::L;
    for (int64_t d0 = 0; d0 < dv; d0 += L) {
        const float* vb = vt + (d0 / L) * ldv * L;  // this dim block: [ldv][L]
        for (int64_t r = 0; r < nr; ++r) {
            const int64_t c0 = lo[r] - lo[r] % L - kbase, c1 = hi[r] + 1 - kbase;
            const float* pr = prob + r * ls;  // pr[pos - kbase]
            V acc[L];
            for (auto& a : acc) a = S::zero();
            for (int64_t c = c0; c < c1; c += L) {
#pragma GCC unroll 16
                for (int i = 0; i < L; ++i) acc[i] = S::fma(S::load(vb + (c + i) * L), S::set1(pr[c + i]), acc[i]);
            }
            S::store(out + r * os + d0, halve<S>(acc));
        }
    }
}

#if defined(__AVX512F__)
using Simd = Isa16;
#else
using Simd = Isa8;
#endif
#define HL_HAVE_SIMD_ATTENTION 1
#endif  // SIMD

}  // namespace

// ---- planning ------------------------------------------------------------------------------

void Attention::plan(const AttnShape& shape, int64_t n, int64_t pos0, int nt, bool simd) {
    s_ = shape;
    kscale_ = s_.softcap > 0 ? 1.0f : s_.scale;
    n_ = n, pos0_ = pos0;
    group_ = s_.H / s_.KV;
    kstart_ = s_.window > 0 ? std::max<int64_t>(0, pos0 - s_.window + 1) : 0;
    T_ = pos0 + n - kstart_;  // cache rows any query of this step may read
    batched_ = n > 1;
    constexpr int L = float_lanes();
#if defined(HL_HAVE_SIMD_ATTENTION)
    simd_ = simd && s_.dk % L == 0 && s_.dv % L == 0;
#else
    (void)simd;
    simd_ = false;
#endif
    split_ = simd_ && !batched_ && T_ >= kSplitT;
    s_len_ = round_up(T_ + 64, 16);
    n_qb_ = batched_ ? cdiv(n, QB) : 1;
    parts_ = std::min<int64_t>(group_, std::max<int64_t>(1, cdiv(nt, s_.KV)));
    hpp_ = cdiv(group_, parts_);
    // split decode: ~8 score items (position blocks of whole rows) a thread; P.V chunks of
    // whole L-lane vectors, ~2 a thread
    pb_ = round_up(cdiv(T_, 8 * nt), 64);
    n_pb_ = cdiv(T_, pb_);
    n_dc_ = std::min<int64_t>(s_.dv / L, std::max<int64_t>(1, cdiv(2 * nt, s_.KV)));
    dc_ = round_up(cdiv(s_.dv, n_dc_), L);
    n_dc_ = cdiv(s_.dv, dc_);

    kbase_ = kstart_ - kstart_ % L;
    ncol_ = round_up(kstart_ + T_ - kbase_, 64);
    if (simd_ && batched_) {
        kt_.get(static_cast<size_t>(s_.KV * ncol_ * s_.dk));
        vt_.get(static_cast<size_t>(s_.KV * ncol_ * s_.dv));
    }
    if (split_) s_all_.get(static_cast<size_t>(s_.H * s_len_));
    size_t per = 0;
    if (!simd_)
        per = s_len_ + 4 * L * s_.dv + std::max(s_.dk, s_.dv);
    else if (batched_)
        per = QB * s_len_;
    else if (split_)
        per = group_ * 4 * L * dc_;
    else
        per = hpp_ * (s_len_ + 4 * L * s_.dv);
    while (static_cast<int>(scratch_.size()) < nt) scratch_.push_back(std::make_unique<Buf<float>>());
    for (int t = 0; t < nt; ++t) scratch_[t]->get(per + 64);
}

// Gemma 2's attention-logit soft-cap as llama.cpp's graph has it: kq * (1/cap) (ggml_scale),
// tanhf (ggml_tanh), * cap (ggml_scale), then soft_max_ext's scale. The kernels then wrote raw
// scores (kscale_ = 1, exact).
void Attention::cap(float* s, int64_t n) const {
    const float inv = 1.0f / s_.softcap, c = s_.softcap, scale = s_.scale;
    for (int64_t j = 0; j < n; ++j) {
        const float t = std::tanh(s[j] * inv) * c;
        s[j] = t * scale;
    }
}

int64_t Attention::row_items() const { return batched_ || split_ ? 0 : s_.KV * parts_; }

void Attention::run_row_item(int64_t i, const float* q, const uint16_t* kc, const uint16_t* vc, float* o) {
#if defined(HL_HAVE_SIMD_ATTENTION)
    if (simd_) {
        row_item_simd<Simd>(i, q, kc, vc, o);
        return;
    }
#endif
    item_portable(i, q, kc, vc, o);
}

void Attention::run(const float* q, const uint16_t* kc, const uint16_t* vc, float* o) {
#if defined(HL_HAVE_SIMD_ATTENTION)
    if (simd_) {
        run_simd<Simd>(q, kc, vc, o);
        return;
    }
#endif
    run_portable(q, kc, vc, o);
}

// ---- runs ----------------------------------------------------------------------------------

void Attention::run_portable(const float* q, const uint16_t* kc, const uint16_t* vc, float* o) {
    const int64_t n_items = batched_ ? s_.H * n_qb_ : s_.KV * parts_;
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < n_items; ++i) item_portable(i, q, kc, vc, o);
}

void Attention::item_portable(int64_t i, const float* q, const uint16_t* kc, const uint16_t* vc, float* o) {
    const int64_t H = s_.H, dk = s_.dk, dv = s_.dv, kvk = s_.KV * dk, kvv = s_.KV * dv;
    constexpr int L = float_lanes();
    float* ts = scratch_[omp_get_thread_num()]->get(0);
    float* acc = ts + s_len_;
    float* row = acc + 4 * L * dv;
    {
        int64_t h0, h1, t0, t1;
        if (batched_) {
            h0 = i % H, h1 = h0 + 1;
            t0 = (n_qb_ - 1 - i / H) * QB, t1 = std::min(n_, t0 + QB);
        } else {
            const int64_t g = i / parts_, part = i % parts_;
            h0 = g * group_ + part * hpp_, h1 = std::min(g * group_ + group_, h0 + hpp_);
            t0 = 0, t1 = 1;
        }
        const int64_t g = h0 / group_;
        for (int64_t t = t0; t < t1; ++t) {
            const int64_t p = pos0_ + t;
            const int64_t lo = s_.window > 0 ? std::max(kstart_, p - s_.window + 1) : kstart_;
            for (int64_t hh = h0; hh < h1; ++hh)
                attend_generic<L>(q + (t * H + hh) * dk, kc + g * dk, kvk, vc + g * dv, kvv, lo, p, dk, dv,
                                  kscale_, batched_, ts, acc, row, o + (t * H + hh) * dv,
                                  s_.softcap > 0 ? this : nullptr);
        }
    }
}

#if defined(HL_HAVE_SIMD_ATTENTION)
// One-row step, unsplit: (group, part of its heads) item i; each part reads the group's rows once.
template <class S>
void Attention::row_item_simd(int64_t i, const float* q, const uint16_t* kc, const uint16_t* vc, float* o) {
    constexpr int L = S::L;
    const int64_t dk = s_.dk, dv = s_.dv, kvk = s_.KV * dk, kvv = s_.KV * dv, group = group_, ls = s_len_;
    const int64_t p = pos0_, lo = s_.window > 0 ? std::max(kstart_, p - s_.window + 1) : kstart_;
    const int64_t base = lo - lo % L;
    float* ts = scratch_[omp_get_thread_num()]->get(0);
    const int64_t g = i / parts_, h0 = g * group + (i % parts_) * hpp_;
    const int nh = static_cast<int>(std::min(g * group + group, h0 + hpp_) - h0);
    scores_vec<S>(q + h0 * dk, nh, kc + g * dk, kvk, lo, p, dk, kscale_, ts + (lo - base), ls, vc + g * dv, kvv, dv);
    for (int j = 0; j < nh; ++j) {
        if (s_.softcap > 0) cap(ts + j * ls + (lo - base), p + 1 - lo);
        softmax<S>(ts + j * ls, base, lo, p);
    }
#if defined(__AVX512F__)
    if constexpr (L == 16) {  // dv is a multiple of L on the SIMD path (plan)
        pv_tree(ts, nh, ls, base, vc + g * dv, kvv, lo, p, dv, o + h0 * dv);
        return;
    }
#endif
    pv_vec<S>(ts, nh, ls, base, vc + g * dv, kvv, lo, p, 0, dv, dv, ts + nh * ls, o + h0 * dv);
}

template <class S>
void Attention::run_simd(const float* q, const uint16_t* kc, const uint16_t* vc, float* o) {
    constexpr int L = S::L;
    const int64_t H = s_.H, KV = s_.KV, dk = s_.dk, dv = s_.dv, kvk = KV * dk, kvv = KV * dv;
    const int64_t group = group_, T = T_, kstart = kstart_, ls = s_len_;
    float* ts = scratch_[omp_get_thread_num()]->get(0);
    auto first_key = [&](int64_t p) { return s_.window > 0 ? std::max(kstart, p - s_.window + 1) : kstart; };

    if (batched_) {
        // cache rows as float, once per step: keys in blocks of L, kt[g][blk][d][L], and values
        // in dim blocks, vt[g][d / L][col][L] (col = pos - kbase); zeros outside kstart..+T
        float* kt = kt_.get(0);
        float* vt = vt_.get(0);
        const int64_t kbase = kbase_, ncol = ncol_, c_first = kstart - kbase, c_end = c_first + T;
        const int64_t n_chunks = ncol / 64;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < KV * n_chunks; ++i) {
            const int64_t g = i / n_chunks, c0 = (i % n_chunks) * 64;
            float* ktg = kt + g * ncol * dk;
            float* vtg = vt + g * ncol * dv;
            float row[512];
            for (int64_t c = c0; c < c0 + 64; ++c) {
                float* kb = ktg + (c / L) * dk * L + c % L;
                if (c < c_first || c >= c_end) {
                    for (int64_t d = 0; d < dk; ++d) kb[d * L] = 0.0f;
                    for (int64_t d = 0; d < dv; d += L) S::store(vtg + (d / L * ncol + c) * L, S::zero());
                    continue;
                }
                const uint16_t* k = kc + (kbase + c) * kvk + g * dk;
                for (int64_t d0 = 0; d0 < dk; d0 += 512) {
                    const int64_t nd = std::min<int64_t>(512, dk - d0);
                    from_f16_row(k + d0, row, nd);
                    for (int64_t d = 0; d < nd; ++d) kb[(d0 + d) * L] = row[d];
                }
                const uint16_t* v = vc + (kbase + c) * kvv + g * dv;
                for (int64_t d = 0; d < dv; d += L) S::store(vtg + (d / L * ncol + c) * L, S::load_h(v + d));
            }
        }
        // (head, QB query rows) items, the latest rows (most keys) first
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < H * n_qb_; ++i) {
            const int64_t h = i % H, g = h / group;
            const int64_t t0 = (n_qb_ - 1 - i / H) * QB, nr = std::min(n_, t0 + QB) - t0;
            int64_t lo[QB], hi[QB];
            for (int64_t r = 0; r < nr; ++r) hi[r] = pos0_ + t0 + r, lo[r] = first_key(hi[r]);
            scores_tiny_rows<S>(q + (t0 * H + h) * dk, H * dk, kt + g * ncol * dk, kbase, lo, hi, nr, dk, kscale_,
                                ts, ls);
            for (int64_t r = 0; r < nr; ++r) {
                const int64_t base = lo[r] - lo[r] % L;
                if (s_.softcap > 0) cap(ts + r * ls + (lo[r] - kbase), hi[r] + 1 - lo[r]);
                softmax<S>(ts + r * ls + (base - kbase), base, lo[r], hi[r]);
            }
            pv_rows<S>(ts, ls, kbase, vt + g * ncol * dv, ncol, lo, hi, nr, dv, o + (t0 * H + h) * dv, H * dv);
        }
        return;
    }

    const int64_t p = pos0_, lo = first_key(p), base = lo - lo % L;
    if (!split_) {
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < KV * parts_; ++i) row_item_simd<S>(i, q, kc, vc, o);
        return;
    }
    // long context: scores by position block (each group's keys of the block in 16-key groups,
    // scores_by16; one position at a time for all groups was 4-20% slower at 4096 cells),
    // softmax by head, P.V by (group, output dims)
    float* s_all = s_all_.get(0);  // [H][ls], index pos - base
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < n_pb_; ++i) {
        const int64_t a0 = lo + i * pb_, b0 = std::min(p, a0 + pb_ - 1);
        for (int64_t g = 0; g < KV; ++g)
            scores_vec<S>(q + g * group * dk, static_cast<int>(group), kc + g * dk, kvk, a0, b0, dk, kscale_,
                          s_all + g * group * ls + (a0 - base), ls);
    }
#pragma omp for schedule(static)
    for (int64_t h = 0; h < H; ++h) {
        if (s_.softcap > 0) cap(s_all + h * ls + (lo - base), p + 1 - lo);
        softmax<S>(s_all + h * ls, base, lo, p);
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < KV * n_dc_; ++i) {
        const int64_t g = i / n_dc_, d0 = (i % n_dc_) * dc_, dc = std::min(dv, d0 + dc_) - d0;
        pv_vec<S>(s_all + g * group * ls, static_cast<int>(group), ls, base, vc + g * dv, kvv, lo, p, d0, dc, dv, ts,
                  o + g * group * dv);
    }
}
#endif

}  // namespace hl
