// Causal (optionally windowed) GQA attention over float16 K/V caches with llama.cpp's
// NON-flash-attention arithmetic (what llama_cpp.Llama(...) runs by default, flash_attn=False):
//
//   scores = f16(q) . K^T   (ggml_mul_mat of f16 K by f16-converted Q)
//   p      = f16(softmax(scores * scale + mask))   (ggml_soft_max_ext; ggml_v_expf; sum in double)
//   o      = p . V          (ggml_mul_mat of the f16 V^T by f16-converted p)
//
// Both products keep ggml's lane order: with one query row ggml_vec_dot_f16 (four L-lane
// accumulators fed round-robin, folded (0+2)+(1+3), then the ISA's lane fold, leftovers in
// double); with 2+ rows tinyBLAS (one L-lane accumulator per output, halving hsum). Lanes run
// over the dot product's index: dims for Q.K, cache positions for P.V (llama.cpp's V cache is
// stored transposed, so P.V dots run over positions). L = 16 with AVX-512, 8 with AVX2.
//
// Paths: portable (any L; also under set_force_scalar), and one SIMD template (attention.cpp)
// instantiated for the ISA this core is built for (AVX-512: Isa16, AVX2+FMA+F16C: Isa8).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "ops.h"

namespace hl {

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

struct AttnShape {
    int64_t H = 0, KV = 0, dk = 0, dv = 0;  // query heads, KV heads (H % KV == 0), head dims
    int64_t window = 0;                      // 0: none; else query p sees keys p-window+1 .. p
    float scale = 1;                         // applied to the scores before the softmax
    float softcap = 0;                       // > 0: scores = tanh(raw / softcap) * softcap first (gemma2)
};

// One step's attention for an OpenMP team: plan() before the parallel region (path, work
// split, scratch sizes), run() by every thread of the team inside it (orphaned `omp for`
// loops; returns after a barrier, o complete).
class Attention {
   public:
    void plan(const AttnShape& shape, int64_t n, int64_t pos0, int nt, bool simd);
    // q [n][H][dk] f16-rounded; kc [n_ctx][KV*dk], vc [n_ctx][KV*dv]; o [n][H][dv].
    void run(const float* q, const uint16_t* kc, const uint16_t* vc, float* o);
    // The soft-cap and then the scale, on one row's raw scores s[0..n) (kernels wrote them unscaled).
    void cap(float* s, int64_t n) const;
    // A one-row step that is not split (a decode step at a short context) is row_items()
    // independent items (0 for other steps); run_row_item(i, ...) does item i in the calling
    // thread, as run() would. A batched forward runs the items of several sequences' steps in
    // one work-shared loop instead of one run() (and its barriers) per sequence.
    int64_t row_items() const;
    void run_row_item(int64_t i, const float* q, const uint16_t* kc, const uint16_t* vc, float* o);

   private:
    template <class S>
    void run_simd(const float* q, const uint16_t* kc, const uint16_t* vc, float* o);
    template <class S>
    void row_item_simd(int64_t i, const float* q, const uint16_t* kc, const uint16_t* vc, float* o);
    void run_portable(const float* q, const uint16_t* kc, const uint16_t* vc, float* o);
    void item_portable(int64_t i, const float* q, const uint16_t* kc, const uint16_t* vc, float* o);

    AttnShape s_;
    int64_t n_ = 0, pos0_ = 0, kstart_ = 0, T_ = 0, group_ = 1;
    bool simd_ = false, batched_ = false, split_ = false;
    int64_t s_len_ = 0;           // scores of one row: T + slack, 16-aligned
    int64_t kbase_ = 0, ncol_ = 0;  // batches: float K/V columns pos - kbase, ncol (64 | ncol)
    int64_t n_qb_ = 0;            // batches: blocks of QB query rows
    int64_t parts_ = 1, hpp_ = 1;  // one row, unsplit: (group, part of hpp heads) items
    int64_t pb_ = 0, n_pb_ = 0;   // one row, split: position blocks of the scores
    int64_t dc_ = 0, n_dc_ = 0;   // one row, split: output-dim chunks of P.V
    float kscale_ = 1;            // scale the score kernels apply (1 under a soft-cap, see cap())
    Buf<float> kt_, vt_, s_all_;  // batches: K [KV][ncol/L][dk][L], V [KV][dv/L][ncol][L]
    std::vector<std::unique_ptr<Buf<float>>> scratch_;  // per thread
};

}  // namespace hl
