// _core.Block: a whole transformer block per call (see block.h for the Python contract).
//
// One step evaluates n rows x [n][dim] at positions pos0 .. pos0+n-1 inside ONE OpenMP region
// (30 blocks x one token means a fork/join per block, not per op):
//
//   1  xn = rms_norm(x) * attn_norm (olmo2: x); quantized once per activation format Q, K, V read
//   2  q [n][H*dk], k [n][KV*dk], v [n][KV*dv] = xn @ W.T (+ bias, qwen2): one work list over
//      the three, items of whole heads (olmo2: whole projections); the thread that computed
//      them applies q_norm/k_norm (per head: gemma, qwen3; per projection: olmo2), rope (table
//      with linear/YaRN scaling and frequency factors) and Q's scale and f16 rounding, and
//      writes K, V rounded into the f16 caches [n_ctx][KV*dk], [n_ctx][KV*dv]
//   3-4  o [n][H*dv] = softmax(softcap?(q16 . K^T) * scale + causal/window mask), rounded to
//      f16, . V (attention.cpp: its own work split and barriers inside the region)
//   5  quantize o;  6  att = o @ Wo.T
//   7  x += post_attention_norm?(att) * residual_scale; h = rms_norm(x) * ffn_norm; quantize h
//   8  a [n][ffn] = act(h @ Wg.T) * (h @ Wu.T)   (activation applied per weight-row chunk)
//   9  quantize a;  10  f = a @ Wd.T;  11  x += post_ffw_norm?(f) * residual_scale
//
// Decode steps (n <= 4) do the row-wise steps 1, 5, 7, 9 in every thread at once, each into its
// own buffers, so the team meets only after the matmuls and the attention (6 barriers a block).
//
// Numerics are PyBlock's on backends/cpu.py, which reproduce llama.cpp's CPU path: RMSNorm
// squares in float summed in double; rope with libm cosf/sinf tables and one FMA per output;
// float16 K/V cache and Q (round to nearest even); Q.K and P.V with ggml's SIMD lane order
// (tinyBLAS's single accumulator for batches, ggml_vec_dot_f16's four for one row; see
// attention.h); ggml_v_expf softmax with probabilities rounded to f16; SiLU via ggml_v_expf and
// GELU via ggml's f16 table. No a*b+c in this file may be contracted into an FMA (the pragma
// below), because the reference rounds the product first; FMAs are written out where ggml has
// them. The SIMD lane count L of that order is the build's (16 with AVX-512F, else 8: the
// llama.cpp built for the same ISA), as backends.cpu.SIMD_LANES; ggml_v_expf differs between
// the two (ops.h). The SIMD code (ops.h's Isa16 / Isa8 traits) runs when the build has the ISA,
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

#include "attention.h"
#include "matmul.h"
#include "ops.h"
#include "quants.h"
#include "vecdot.h"

// Every function defined below this line: no contraction of separate multiplies and adds.
#pragma GCC optimize("fp-contract=off")

namespace py = pybind11;

namespace hl {
namespace {

// ---- small utilities -----------------------------------------------------------------------

inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

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
using Simd = Isa16;
#define HL_SIMD_GLU 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
using Simd = Isa8;
#define HL_SIMD_GLU 1
#endif

// SwiGLU on columns [j0, j1) of one row: (g / (1 + exp(-g))) * u, exp = ggml_v_expf of this ISA
// on columns below simd_end = ffn - ffn % L (the L-lane body of ggml_vec_swiglu_f32), libm expf
// on the tail. Element-wise, so an item may start anywhere.
void swiglu_cols(const float* g, const float* u, float* out, int64_t j0, int64_t j1, int64_t simd_end,
                 bool fast) {
    int64_t j = j0;
#if defined(HL_SIMD_GLU)
    if (fast) {
        using S = Simd;
        const S::V one = S::set1(1.0f);
        for (; j + S::L <= std::min(j1, simd_end); j += S::L) {
            const S::V x = S::load(g + j);
            const S::V e = S::expf(S::sub(S::zero(), x));
            S::store(out + j, S::mul(S::div(x, S::add(one, e)), S::load(u + j)));
        }
    }
#else
    (void)fast;
#endif
    for (; j < j1; ++j) {
        const float x = g[j];
        const float e = j < simd_end ? v_expf(0.0f - x, float_lanes() == 8) : std::exp(-x);
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
#elif defined(HL_SIMD_GLU)
    if (fast) {
        const __m256 lo = _mm256_set1_ps(-10.0f), hi = _mm256_set1_ps(10.0f);
        for (; j + 8 <= j1; j += 8) {
            const __m256 x = _mm256_loadu_ps(g + j);
            const __m256i idx = _mm256_cvtepu16_epi32(_mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
            __m256 y = _mm256_i32gather_ps(table, idx, 4);
            y = _mm256_blendv_ps(y, x, _mm256_cmp_ps(x, hi, _CMP_GE_OQ));
            y = _mm256_blendv_ps(y, _mm256_setzero_ps(), _mm256_cmp_ps(x, lo, _CMP_LE_OQ));
            _mm256_storeu_ps(out + j, _mm256_mul_ps(y, _mm256_loadu_ps(u + j)));
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

// What fixes a rope table (ggml_rope_ext's arguments): frequency base, rotated dims, freq_scale
// (1/linear factor), YaRN's ext_factor, corr_dims and magnitude scale, per-pair frequency factors
// (rope_freqs / LongRoPE; empty: none), length.
struct RopeParams {
    double base = 10000;
    int64_t dim = 0;
    float freq_scale = 1, ext_factor = 0, mscale = 1, corr_lo = 0, corr_hi = 0;
    std::vector<float> factors;
    int64_t n_ctx = 0;

    std::vector<double> key() const {
        std::vector<double> k = {base, double(dim), freq_scale, ext_factor, mscale, corr_lo, corr_hi, double(n_ctx)};
        k.insert(k.end(), factors.begin(), factors.end());
        return k;
    }
};

// cos/sin [n_ctx][dim/2] built as ggml_rope_cache_init does: theta starts at the position and is
// multiplied by base^(-2/dim) (float) once per pair; pair i rotates by theta/ff_i times
// freq_scale, with YaRN blending in the unscaled angle over the ramp between the corr dims;
// libm cosf/sinf times mscale. Shared by the blocks with the same parameters.
struct RopeTable {
    int64_t half = 0;
    std::vector<float> cos, sin;
};

// One pair's angle and magnitude (ggml's rope_yarn; its `a * b + c * d` is compiled with one FMA).
inline void rope_angle(float theta_extrap, const RopeParams& r, int64_t i, float* angle, float* mscale) {
    const float theta_interp = r.freq_scale * theta_extrap;
    *angle = theta_interp;
    *mscale = r.mscale;
    if (r.ext_factor != 0.0f) {
        const float y = (static_cast<float>(i) - r.corr_lo) / std::max(0.001f, r.corr_hi - r.corr_lo);
        const float ramp_mix = (1.0f - std::min(1.0f, std::max(0.0f, y))) * r.ext_factor;
        *angle = std::fma(theta_interp, 1.0f - ramp_mix, theta_extrap * ramp_mix);
        *mscale = r.mscale * std::fma(0.1f, std::log(1.0f / r.freq_scale), 1.0f);
    }
}

std::shared_ptr<const RopeTable> rope_table(const RopeParams& r) {
    static std::mutex mu;
    static std::map<std::vector<double>, std::weak_ptr<const RopeTable>> cache;
    const auto key = r.key();
    std::lock_guard<std::mutex> lock(mu);
    if (auto hit = cache[key].lock()) return hit;
    auto t = std::make_shared<RopeTable>();
    t->half = r.dim / 2;
    t->cos.resize(static_cast<size_t>(r.n_ctx * t->half));
    t->sin.resize(t->cos.size());
    // ggml: powf(freq_base, -2.0f/n_dims), the exponent rounded to float first
    const float theta_scale = std::pow(static_cast<float>(r.base), -2.0f / static_cast<float>(r.dim));
    for (int64_t p = 0; p < r.n_ctx; ++p) {
        float theta = static_cast<float>(p);
        for (int64_t i = 0; i < t->half; ++i) {
            const float ff = r.factors.empty() ? 1.0f : r.factors[i];
            float angle, mscale;
            rope_angle(theta / ff, r, i, &angle, &mscale);
            t->cos[p * t->half + i] = std::cos(angle) * mscale;
            t->sin[p * t->half + i] = std::sin(angle) * mscale;
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

// ---- activations quantized for one weight format, in panels of P rows ----------------------

// A sequence's rows in a forward: rows [row0, row0 + n) of x, at positions pos0.., with its own
// f16 KV cache (kc [n_ctx][KV * dk], vc [n_ctx][KV * dv]). A plain forward is one segment; a
// batched one (forward_batch) carries several sequences, each in the cache of its own Block.
struct Segment {
    int64_t row0, n, pos0;
    uint16_t *kc, *vc;
};

// Activation rows [row0, row0 + n) held by one QActs, with the arithmetic of a call of n_call
// rows (QActs::n_call). A work item takes one panel against a chunk of weight rows.
struct Panel {
    int64_t row0, n, n_call;
};

// Panels of a step, cut so that every row is computed exactly as in a forward of its segment
// alone (batch invariance): a segment of up to MAX_NA rows is one panel (a decode step), a longer
// one panels of 64 rows from its start (a prompt chunk; tiles of MAX_NA rows then start at
// multiples of MAX_NA as in hl::matmul, hence the same results). Consecutive one-row segments
// (decode steps of several sequences) share panels of up to WIDEST_NA rows with n_call = 1, so
// each weight block is decoded once per tile of them while each row keeps its one-row arithmetic.
void cut_panels(const std::vector<Segment>& segs, std::vector<Panel>& panels) {
    constexpr int64_t kPromptPanel = 64, kDecodePanel = std::max(2 * WIDE_NA, WIDEST_NA);
    panels.clear();
    for (const Segment& s : segs) {
        if (s.n == 1 && !panels.empty()) {
            Panel& last = panels.back();
            if (last.n_call == 1 && last.n < kDecodePanel && last.row0 + last.n == s.row0) {
                ++last.n;
                continue;
            }
        }
        const int64_t P = s.n <= MAX_NA ? s.n : kPromptPanel;
        for (int64_t r = 0; r < s.n; r += P) {
            const int64_t rows = std::min(P, s.n - r);
            panels.push_back({s.row0 + r, rows, rows});
        }
    }
}

// x [n][cols] prepared for the kernels of one activation kind: one QActs per panel (so a work
// item can take any panel).
struct ActSet {
    int kind = ACT_F32;
    const float* x = nullptr;
    int64_t cols = 0;
    const Panel* panel_of = nullptr;      // [n_panels]
    const int32_t* row_panel = nullptr;  // [n]: the panel holding row r
    std::vector<QActs> panels;
    Buf<uint8_t> buf;

    void layout(int kind_, const float* x_, int64_t cols_, const std::vector<Panel>& pl, const int32_t* row_panel_) {
        kind = kind_, x = x_, cols = cols_, panel_of = pl.data(), row_panel = row_panel_;
        int64_t total = 64;
        for (const Panel& p : pl) total += round_up(static_cast<int64_t>(acts_bytes(kind, p.n, cols)), 64);
        uint8_t* b = buf.get(static_cast<size_t>(total));
        panels.resize(pl.size());
        for (size_t i = 0; i < pl.size(); ++i) {
            panels[i] = acts_layout(kind, pl[i].n, cols, b, x + pl[i].row0 * cols);
            panels[i].n_call = pl[i].n_call;
            b += round_up(static_cast<int64_t>(acts_bytes(kind, pl[i].n, cols)), 64);
        }
    }
    void quantize_row(int64_t r) const {
        if (kind == ACT_F32) return;
        const int32_t p = row_panel[r];
        const int64_t r0 = panel_of[p].row0;
        quantize_acts_rows(panels[p], x + r0 * cols, r - r0, r - r0 + 1);
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

// Work list of a phase over n activation rows in np panels. n <= MAX_NA (decode): the rows of
// each job cut into items of about 1/nt of the phase's weight bytes, longest first
// (memory-bound; every item start costs a stream ramp-up, ~0.4 us measured: 4 items a thread
// made a SmolLM token 8% slower, 16 items 70% slower). Else chunks of ~256 KiB of weights
// (L2-resident while the panels' activation tiles pass over them) times the panels, at least
// ~4 items a thread.
void plan_phase(std::vector<MatItem>& items, const MatJob* jobs, int n_jobs, int64_t n, int64_t np, int nt) {
    items.clear();
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
    matmul_rows(m.w, m.type, it.r0, it.r1, a.panels[it.p], out + a.panel_of[it.p].row0 * stride, stride);
}

// Activation sets of a step: the attn_norm output in up to three formats (Q, K, V), o, the
// ffn_norm output in up to two (gate, up), and the GLU output.
enum ActIdx { A_XN0 = 0, A_O = 3, A_H0 = 4, A_H1 = 5, A_ACT = 6, kNumActs = 7 };

// A thread's own scratch: in decode steps its copies of the row-wise
// results (xn, x + attention, h: [n][dim]; tmp: [dim]) and of the quantized activations.
struct ThreadScratch {
    Buf<float> xn, xp, h, tmp;
    ActSet acts[kNumActs];
};

// Scratch of a step, shared by every Block of the process: blocks run one after another, so
// one set of buffers (grown to the largest n seen) serves them all and stays cache-warm; for a
// 512-row prompt it is ~20 MB, which per block would be 20 MB x n_layers. Its mutex makes
// forward calls of different blocks from different Python threads take turns.
struct Workspace {
    std::mutex mu;
    Buf<float> xn, q, k, v, o, att, h, g, u, a, f;
    ActSet acts[kNumActs];  // batches: shared by the team
    std::vector<Panel> panels;
    std::vector<int32_t> row_panel, row_seg;  // [n]: each row's panel and segment
    std::vector<std::unique_ptr<Attention>> attn;  // one per segment
    std::vector<std::pair<int32_t, int32_t>> attn_items;  // (segment, item) of one-row steps
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
    void forward_batch(const py::object& xo, const py::sequence& segments, const py::object& n_threads);
    py::array cache_view(const py::object& self, bool k) const;
    int64_t n_ctx() const { return n_ctx_; }

   private:
    float* checked_rows(const py::object& xo, int64_t* n) const;
    bool same_weights(const Block& o) const;
    void run(float* x, const std::vector<Segment>& segs, int nt);

    // hyper-parameters
    int64_t dim_ = 0, H_ = 0, KV_ = 0, dk_ = 0, dv_ = 0, ffn_ = 0, rope_dim_ = 0, window_ = 0, n_ctx_ = 0;
    float eps_ = 0, scale_ = 0, q_scale_ = 1;  // scores * scale_; Q * q_scale_ after rope
    float softcap_ = 0;         // gemma2: attention logits soft-capped at this value (0: none)
    float residual_scale_ = 1;  // granite: attention and FFN outputs times this before the residual add
    bool neox_ = false, gelu_ = false;
    bool qk_norm_full_ = false;  // olmo2: Q/K RMSNorm over the whole projection, not per head
    // weights (views of the caller's arrays, kept alive by keep_)
    Mat wq_, wk_, wv_, wo_, wg_, wu_, wd_;
    const float *attn_norm_ = nullptr, *ffn_norm_ = nullptr, *q_norm_ = nullptr, *k_norm_ = nullptr,
                *post_attn_norm_ = nullptr, *post_ffw_norm_ = nullptr;
    const float *bq_ = nullptr, *bk_ = nullptr, *bv_ = nullptr;  // qwen2: Q/K/V biases
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

double cfg_float(const py::dict& cfg, const char* key);

// An optional number of cfg (absent or None: `otherwise`).
double cfg_float_or(const py::dict& cfg, const char* key, double otherwise) {
    if (!cfg.contains(key) || cfg[key].is_none()) return otherwise;
    return cfg_float(cfg, key);
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
    softcap_ = static_cast<float>(cfg_float_or(cfg, "attn_softcap", 0.0));
    residual_scale_ = static_cast<float>(cfg_float_or(cfg, "residual_scale", 1.0));
    qk_norm_full_ = cfg.contains("qk_norm_full") && py::bool_(cfg["qk_norm_full"]);
    RopeParams rope;
    rope.base = rope_base, rope.dim = rope_dim_, rope.n_ctx = n_ctx;
    rope.freq_scale = static_cast<float>(1.0 / rope_scale);
    rope.ext_factor = static_cast<float>(cfg_float_or(cfg, "rope_ext_factor", 0.0));
    rope.mscale = static_cast<float>(cfg_float_or(cfg, "rope_attn_factor", 1.0));
    if (cfg.contains("rope_corr_dims") && !cfg["rope_corr_dims"].is_none()) {
        const auto dims = cfg["rope_corr_dims"].cast<std::pair<double, double>>();
        rope.corr_lo = static_cast<float>(dims.first), rope.corr_hi = static_cast<float>(dims.second);
    }
    if (softcap_ < 0) value_error("cfg['attn_softcap'] must be >= 0");
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
    // olmo2 has only the norms after attention and FFN
    attn_norm_ = get_norm(weights, "attn_norm", dim_, false, keep_);
    ffn_norm_ = get_norm(weights, "ffn_norm", dim_, false, keep_);
    q_norm_ = get_norm(weights, "attn_q_norm", qk_norm_full_ ? H_ * dk_ : dk_, false, keep_);
    k_norm_ = get_norm(weights, "attn_k_norm", qk_norm_full_ ? KV_ * dk_ : dk_, false, keep_);
    bq_ = get_norm(weights, "attn_q_bias", H_ * dk_, false, keep_);
    bk_ = get_norm(weights, "attn_k_bias", KV_ * dk_, false, keep_);
    bv_ = get_norm(weights, "attn_v_bias", KV_ * dv_, false, keep_);
    if (const float* ff = get_norm(weights, "rope_freqs", rope_dim_ / 2, false, keep_))
        rope.factors.assign(ff, ff + rope_dim_ / 2);
    if ((q_norm_ == nullptr) != (k_norm_ == nullptr))
        value_error("weights: attn_q_norm and attn_k_norm come together (got only one)");
    post_attn_norm_ = get_norm(weights, "post_attention_norm", dim_, false, keep_);
    post_ffw_norm_ = get_norm(weights, "post_ffw_norm", dim_, false, keep_);

    rope_ = rope_dim_ > 0 ? rope_table(rope) : nullptr;
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

int threads_arg(const py::object& n_threads) {
    int nt = 0;
    if (!n_threads.is_none()) {
        if (!py::isinstance<py::int_>(n_threads)) throw py::type_error("n_threads must be an int or None");
        nt = n_threads.cast<int>();
    }
    return nt > 0 ? nt : physical_cores();
}

// x checked as a writable C-contiguous float32 (n, dim) array -> its data; *n its rows.
float* Block::checked_rows(const py::object& xo, int64_t* n) const {
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
    *n = x.shape(0);
    return static_cast<float*>(x.mutable_data());
}

void check_positions(int64_t pos0, int64_t n, int64_t n_ctx) {
    if (pos0 < 0) value_error("pos0 must be >= 0, got " + std::to_string(pos0));
    if (pos0 + n > n_ctx)
        value_error("positions " + std::to_string(pos0) + ".." + std::to_string(pos0 + n - 1) +
                    " exceed n_ctx=" + std::to_string(n_ctx));
}

void Block::forward(const py::object& xo, int64_t pos0, const py::object& n_threads) {
    int64_t n = 0;
    float* xp = checked_rows(xo, &n);
    check_positions(pos0, n, n_ctx_);
    const int nt = threads_arg(n_threads);
    if (n == 0) return;
    const std::vector<Segment> segs = {{0, n, pos0, kc_.get(0), vc_.get(0)}};
    py::gil_scoped_release nogil;
    std::lock_guard<std::mutex> lock(ws_->mu);
    run(xp, segs, nt);
}

// The same matrices and hyper-parameters (blocks of one layer made for different slots).
bool Block::same_weights(const Block& o) const {
    const Mat* a[] = {&wq_, &wk_, &wv_, &wo_, &wg_, &wu_, &wd_};
    const Mat* b[] = {&o.wq_, &o.wk_, &o.wv_, &o.wo_, &o.wg_, &o.wu_, &o.wd_};
    for (int i = 0; i < 7; ++i)
        if (a[i]->w != b[i]->w || a[i]->type != b[i]->type || a[i]->rows != b[i]->rows || a[i]->cols != b[i]->cols)
            return false;
    return attn_norm_ == o.attn_norm_ && ffn_norm_ == o.ffn_norm_ && window_ == o.window_ && rope_ == o.rope_;
}

void Block::forward_batch(const py::object& xo, const py::sequence& segments, const py::object& n_threads) {
    int64_t n = 0;
    float* xp = checked_rows(xo, &n);
    const int nt = threads_arg(n_threads);
    std::vector<Segment> segs;
    std::vector<const Block*> seen;
    int64_t row = 0;
    for (const py::handle item : segments) {
        const auto t = py::reinterpret_borrow<py::object>(item);
        if (!py::isinstance<py::tuple>(t) || py::len(t) != 3)
            throw py::type_error("each segment must be a tuple (block, pos0, n)");
        const py::tuple seg = t.cast<py::tuple>();
        if (!py::isinstance<Block>(seg[0])) throw py::type_error("a segment's block must be a _core.Block");
        const Block& b = seg[0].cast<const Block&>();
        const int64_t pos0 = seg[1].cast<int64_t>(), rows = seg[2].cast<int64_t>();
        if (!same_weights(b)) value_error("a segment's block has other weights than this block's layer");
        if (std::find(seen.begin(), seen.end(), &b) != seen.end())
            value_error("two segments use the same block (one KV cache per sequence)");
        if (rows < 1) value_error("a segment must have n >= 1 rows, got " + std::to_string(rows));
        check_positions(pos0, rows, b.n_ctx_);
        seen.push_back(&b);
        auto& kc = const_cast<Buf<uint16_t>&>(b.kc_);
        auto& vc = const_cast<Buf<uint16_t>&>(b.vc_);
        segs.push_back({row, rows, pos0, kc.get(0), vc.get(0)});
        row += rows;
    }
    if (row != n) value_error("the segments cover " + std::to_string(row) + " rows, x has " + std::to_string(n));
    if (n == 0) return;
    py::gil_scoped_release nogil;
    std::lock_guard<std::mutex> lock(ws_->mu);
    run(xp, segs, nt);
}

void Block::run(float* x, const std::vector<Segment>& segs, int nt) {
    const bool simd = !force_scalar();
    const int64_t n = segs.back().row0 + segs.back().n;
    // Decode steps (n <= MAX_NA): every thread does the row-wise work (norms, residual,
    // activation quantization) itself, into its own buffers, so the team meets only after the
    // matmuls and the attention (6 barriers a block instead of 11); x is written once, at the end.
    const bool decode = n <= MAX_NA;
    const int64_t H = H_, KV = KV_, dk = dk_, dv = dv_, dim = dim_, ffn = ffn_;
    const int64_t kvk = KV * dk, kvv = KV * dv;
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

    // Panels of activation rows, and each row's panel and segment.
    cut_panels(segs, ws.panels);
    const int64_t np = static_cast<int64_t>(ws.panels.size());
    const Panel* panels = ws.panels.data();
    ws.row_panel.resize(static_cast<size_t>(n));
    ws.row_seg.resize(static_cast<size_t>(n));
    for (int64_t p = 0; p < np; ++p)
        std::fill_n(ws.row_panel.begin() + panels[p].row0, panels[p].n, static_cast<int32_t>(p));
    for (size_t si = 0; si < segs.size(); ++si)
        std::fill_n(ws.row_seg.begin() + segs[si].row0, segs[si].n, static_cast<int32_t>(si));
    const int32_t* row_seg = ws.row_seg.data();

    // Activation formats: one set per distinct format among the weights reading one input.
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
    const int32_t* row_panel = ws.row_panel.data();
    auto layout = [&](ActSet* acts, const float* xn, const float* h) {
        for (int s = 0; s < n_xn; ++s) acts[A_XN0 + s].layout(xn_kind[s], xn, dim, ws.panels, row_panel);
        acts[A_O].layout(act_kind_for(wo_.type), o, H * dv, ws.panels, row_panel);
        acts[A_H0].layout(kind_g, h, dim, ws.panels, row_panel);
        if (n_h == 2) acts[A_H1].layout(kind_u, h, dim, ws.panels, row_panel);
        acts[A_ACT].layout(act_kind_for(wd_.type), ac, ffn, ws.panels, row_panel);
    };

    // Attention: each segment over its own cache, planned as for that sequence alone.
    while (ws.attn.size() < segs.size()) ws.attn.push_back(std::make_unique<Attention>());
    ws.attn_items.clear();
    for (size_t si = 0; si < segs.size(); ++si) {
        ws.attn[si]->plan(AttnShape{H, KV, dk, dv, window_, scale_, softcap_}, segs[si].n, segs[si].pos0, nt, simd);
        for (int64_t i = 0; i < ws.attn[si]->row_items(); ++i)
            ws.attn_items.emplace_back(static_cast<int32_t>(si), static_cast<int32_t>(i));
    }
    const auto* attn_items = ws.attn_items.data();
    const int64_t n_attn_items = static_cast<int64_t>(ws.attn_items.size());

    while (static_cast<int>(ws.threads.size()) < nt) ws.threads.push_back(std::make_unique<ThreadScratch>());
    for (int t = 0; t < nt; ++t) {
        ThreadScratch& me = *ws.threads[t];
        if (decode) {
            me.xp.get(n * dim);
            me.tmp.get(dim);
            layout(me.acts, me.xn.get(n * dim), me.h.get(n * dim));
        }
    }
    float* xn_sh = decode ? nullptr : ws.xn.get(n * dim);
    float* h_sh = decode ? nullptr : ws.h.get(n * dim);
    if (!decode) layout(ws.acts, xn_sh, h_sh);

    // items cover whole heads, or whole projections when the Q/K norm spans them (olmo2)
    const MatJob qkv_jobs[3] = {{&wq_, qkv_acts[0], q, Post::Q, qk_norm_full_ ? H * dk : dk},
                                {&wk_, qkv_acts[1], k, Post::K, qk_norm_full_ ? kvk : dk},
                                {&wv_, qkv_acts[2], v, Post::V, dv}};
    const MatJob o_job = {&wo_, A_O, att};
    const MatJob gu_job = {&wg_, A_H0, gt, Post::None, 1, &wu_, n_h == 2 ? A_H1 : A_H0, up};
    const MatJob d_job = {&wd_, A_ACT, f};
    plan_phase(ws.qkv_items, qkv_jobs, 3, n, np, nt);
    plan_phase(ws.o_items, &o_job, 1, n, np, nt);
    plan_phase(ws.gu_items, &gu_job, 1, n, np, nt);
    plan_phase(ws.d_items, &d_job, 1, n, np, nt);
    const MatItem* qkv_it = ws.qkv_items.data();
    const MatItem* o_it = ws.o_items.data();
    const MatItem* gu_it = ws.gu_items.data();
    const MatItem* d_it = ws.d_items.data();
    const int64_t n_qkv = static_cast<int64_t>(ws.qkv_items.size()), n_o = static_cast<int64_t>(ws.o_items.size()),
                  n_gu = static_cast<int64_t>(ws.gu_items.size()), n_d = static_cast<int64_t>(ws.d_items.size());

    const RopeTable* rope = rope_.get();
    const int64_t half = rope ? rope->half : 0;
    const int64_t simd_end = ffn - ffn % float_lanes();

    // out [dim] = rms_norm(x) * w, or x itself where the architecture has no such norm (olmo2).
    auto norm_or_copy = [](const float* xr, const float* w, float e, int64_t k, float* out) {
        if (w)
            rms_norm_row(xr, w, e, k, out);
        else
            std::copy(xr, xr + k, out);
    };
    // What a branch (attention or FFN output row a) adds to the residual stream: post_norm?(a)
    // (gemma) times residual_scale (granite; ggml_scale), written to out (may be a) when changed.
    const float rs = residual_scale_;
    auto branch_out = [rs, eps, dim](const float* a, const float* post_norm, float* out) -> const float* {
        if (post_norm) {
            rms_norm_row(a, post_norm, eps, dim, out);
            a = out;
        }
        if (rs != 1.0f) {
            for (int64_t j = 0; j < dim; ++j) out[j] = a[j] * rs;
            a = out;
        }
        return a;
    };
    // row[c] += bias[c] for the columns [c0, c1) an item computed (ggml_add after the matmul)
    auto add_row = [](float* row, const float* bias, int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) row[c] = row[c] + bias[c];
    };

    // Heads [r0 / hd, r1 / hd) of the Q/K/V rows an item just computed, for its panel's rows:
    // Q: q_norm, rope, f16 rounding; K: k_norm, rope, into the f16 cache; V: into its cache.
    auto post_heads = [&](const MatJob& j, const MatItem& it) {
        const int64_t a0 = panels[it.p].row0, a1 = a0 + panels[it.p].n;
        for (int64_t t = a0; t < a1; ++t) {
            const Segment& sg = segs[row_seg[t]];
            const int64_t pos = sg.pos0 + (t - sg.row0);
            uint16_t* kc = sg.kc;
            uint16_t* vc = sg.vc;
            const float* cs = rope ? rope->cos.data() + pos * half : nullptr;
            const float* sn = rope ? rope->sin.data() + pos * half : nullptr;
            if (j.post == Post::Q) {
                if (bq_) add_row(q + t * H * dk, bq_, it.r0, it.r1);
                if (q_norm_ && qk_norm_full_) rms_norm_row(q + t * H * dk, q_norm_, eps, H * dk, q + t * H * dk);
                for (int64_t hh = it.r0 / dk; hh < it.r1 / dk; ++hh) {
                    float* qh = q + (t * H + hh) * dk;
                    if (q_norm_ && !qk_norm_full_) rms_norm_row(qh, q_norm_, eps, dk, qh);
                    if (rope) rope_head(qh, cs, sn, half, neox_);
                    if (q_scale_ != 1.0f)
                        for (int64_t d = 0; d < dk; ++d) qh[d] *= q_scale_;
                    round_f16_row(qh, dk);
                }
            } else if (j.post == Post::K) {
                if (bk_) add_row(k + t * kvk, bk_, it.r0, it.r1);
                if (k_norm_ && qk_norm_full_) rms_norm_row(k + t * kvk, k_norm_, eps, kvk, k + t * kvk);
                for (int64_t g = it.r0 / dk; g < it.r1 / dk; ++g) {
                    float* kh = k + (t * KV + g) * dk;
                    if (k_norm_ && !qk_norm_full_) rms_norm_row(kh, k_norm_, eps, dk, kh);
                    if (rope) rope_head(kh, cs, sn, half, neox_);
                    to_f16_row(kh, kc + pos * kvk + g * dk, dk);
                }
            } else if (j.post == Post::V) {
                if (bv_) add_row(v + t * kvv, bv_, it.r0, it.r1);
                for (int64_t g = it.r0 / dv; g < it.r1 / dv; ++g)
                    to_f16_row(v + (t * KV + g) * dv, vc + pos * kvv + g * dv, dv);
            }
        }
    };

#pragma omp parallel num_threads(nt)
    {
        ThreadScratch& me = *ws.threads[omp_get_thread_num()];
        const ActSet* acts = decode ? me.acts : ws.acts;
        float* xn = decode ? me.xn.get(0) : xn_sh;
        float* h = decode ? me.h.get(0) : h_sh;
        float* xp = decode ? me.xp.get(0) : x;  // x after the attention residual
        float* tmp = decode ? me.tmp.get(0) : nullptr;

        // 1. xn = attn_norm(x), quantized once per format that Q, K, V read.
        if (decode) {
            for (int64_t r = 0; r < n; ++r) {
                norm_or_copy(x + r * dim, attn_norm_, eps, dim, xn + r * dim);
                for (int s = 0; s < n_xn; ++s) acts[A_XN0 + s].quantize_row(r);
            }
        } else {
#pragma omp for schedule(static)
            for (int64_t r = 0; r < n; ++r) {
                norm_or_copy(x + r * dim, attn_norm_, eps, dim, xn + r * dim);
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
        // 3-4. o = softmax(q16 . K^T * scale + causal/window mask) . V (attention.cpp), each
        //      segment over its own cache: prompt chunks and long-context steps one after
        //      another, the decode steps' items all in one loop
        for (size_t si = 0; si < segs.size(); ++si)
            if (ws.attn[si]->row_items() == 0)
                ws.attn[si]->run(q + segs[si].row0 * H * dk, segs[si].kc, segs[si].vc, o + segs[si].row0 * H * dv);
        if (n_attn_items > 0) {
#pragma omp for schedule(dynamic, 1)
            for (int64_t i = 0; i < n_attn_items; ++i) {
                const Segment& sg = segs[attn_items[i].first];
                ws.attn[attn_items[i].first]->run_row_item(attn_items[i].second, q + sg.row0 * H * dk, sg.kc, sg.vc,
                                                           o + sg.row0 * H * dv);
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
                const float* ar = branch_out(att + r * dim, post_attn_norm_, tmp);
                float* pr = xp + r * dim;
                for (int64_t j = 0; j < dim; ++j) pr[j] = xr[j] + ar[j];
                norm_or_copy(pr, ffn_norm_, eps, dim, h + r * dim);
                for (int s = 0; s < n_h; ++s) acts[A_H0 + s].quantize_row(r);
            }
        } else {
#pragma omp for schedule(static)
            for (int64_t r = 0; r < n; ++r) {
                float* xr = x + r * dim;
                const float* ar = branch_out(att + r * dim, post_attn_norm_, att + r * dim);
                for (int64_t j = 0; j < dim; ++j) xr[j] = xr[j] + ar[j];
                norm_or_copy(xr, ffn_norm_, eps, dim, h + r * dim);
                for (int s = 0; s < n_h; ++s) acts[A_H0 + s].quantize_row(r);
            }
        }
        // 8. gate and up over the same weight rows, then the activation on those columns.
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < n_gu; ++i) {
            const MatItem& it = gu_it[i];
            run_mat(*gu_job.m, acts[gu_job.acts], gu_job.out, it);
            run_mat(*gu_job.m2, acts[gu_job.acts2], gu_job.out2, it);
            const int64_t a0 = panels[it.p].row0, a1 = a0 + panels[it.p].n;
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
                    const float* fr = branch_out(f + r * dim, post_ffw_norm_, tmp);
                    float* xr = x + r * dim;
                    const float* pr = xp + r * dim;
                    for (int64_t j = 0; j < dim; ++j) xr[j] = pr[j] + fr[j];
                }
            }
        } else {
#pragma omp for schedule(static) nowait
            for (int64_t r = 0; r < n; ++r) {
                float* xr = x + r * dim;
                const float* fr = branch_out(f + r * dim, post_ffw_norm_, f + r * dim);
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
        .def("forward_batch", &Block::forward_batch, py::arg("x"), py::arg("segments"),
             py::arg("n_threads") = py::none(),
             "Evaluate the rows of several sequences in one pass: segments is a sequence of\n"
             "(block, pos0, n) covering x's rows in order, each block this layer's block of one\n"
             "sequence (same weights, its own KV cache). Every row's result equals a forward of its\n"
             "segment alone, bit for bit.")
        .def_property_readonly("k_cache", [](const py::object& self) { return self.cast<const Block&>().cache_view(self, true); })
        .def_property_readonly("v_cache", [](const py::object& self) { return self.cast<const Block&>().cache_view(self, false); })
        .def_property_readonly("n_ctx", &Block::n_ctx);
}

}  // namespace hl
