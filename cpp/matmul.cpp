// Matmul driver: activation quantization, tiling and OpenMP scheduling around the row kernels.
//
// Work split: the weight rows are cut into chunks of R rows and the activation rows into panels of
// P rows; an item (chunk, panel) is one unit of dynamic scheduling. Inside an item, each tile of
// MAX_NA activation rows (a few KiB, stays in L1) is run against every weight row of the chunk
// (R rows sized to stay in L2), so each weight block is decoded once per MAX_NA activation rows and
// read from memory once per panel. For n = 1 the chunks are just a balanced split of the rows
// (several per thread, so a busy core does not hold the others back).
#include "matmul.h"

#include <omp.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <new>
#include <set>
#include <utility>

#include "quants.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace hl {
namespace {

std::atomic<bool> g_force_scalar{false};

// Grow-only 64-byte aligned buffer; one set per thread, so concurrent callers never share.
class Scratch {
   public:
    ~Scratch() { ::operator delete(p_, std::align_val_t(64)); }
    void* get(size_t bytes) {
        if (bytes > cap_) {
            ::operator delete(p_, std::align_val_t(64));
            p_ = nullptr;
            cap_ = 0;
            p_ = ::operator new(bytes, std::align_val_t(64));
            cap_ = bytes;
        }
        return p_;
    }

   private:
    void* p_ = nullptr;
    size_t cap_ = 0;
};

constexpr int kUserSlots = 4;  // slots for quantize_acts callers; one more for matmul itself
thread_local Scratch t_scratch[kUserSlots + 1];

struct Kernels {
    RowKernel k[MAX_NA + 1];
    MatvecKernel mv;  // MATVEC_NR rows x 1 activation row, or nullptr
    TileKernel tile;  // TILE_NW rows x MAX_NA activation rows, or nullptr
    TileKernel wide;  // TILE_NW rows x WIDE_NA activation rows, or nullptr
    TileKernel widest;  // TILE_NW rows x WIDEST_NA activation rows, or nullptr
    TileKernel widest_quad;  // 2 * TILE_NW rows x WIDEST_NA activation rows, or nullptr
    int64_t rb;
};

Kernels kernels_for(int type, int act_kind, int64_t cols) {
    Kernels ks{};
    for (int na = 1; na <= MAX_NA; ++na) ks.k[na] = get_kernel(type, na, act_kind);
    ks.mv = get_matvec_kernel(type, act_kind);
    ks.tile = get_tile_kernel(type, act_kind);
    ks.wide = get_wide_tile_kernel(type, act_kind);
    ks.widest = get_widest_tile_kernel(type, act_kind);
    ks.widest_quad = get_widest_quad_tile_kernel(type, act_kind);
    TypeInfo ti{};
    type_info(type, &ti);
    ks.rb = row_bytes(ti, cols);
    return ks;
}

// Weight rows [r0, r1) x NA activation rows from ag with the tile `wide` of that height (first
// four rows at a time with `quad` where there is one; an odd last weight row with the MAX_NA
// row kernel).
template <int NA>
inline void run_wide_tile(const Kernels& ks, TileKernel wide, TileKernel quad, const uint8_t* w, const QActs& acts,
                          int64_t r0, int64_t r1, int64_t ag, float* out, int64_t os) {
    const int64_t cols = acts.cols;
    int64_t r = r0;
    if (quad != nullptr)
        for (; r + 2 * TILE_NW <= r1; r += 2 * TILE_NW) quad(cols, w + r * ks.rb, ks.rb, acts, ag, out + ag * os + r, os);
    for (; r + TILE_NW <= r1; r += TILE_NW) wide(cols, w + r * ks.rb, ks.rb, acts, ag, out + ag * os + r, os);
    for (; r < r1; ++r)
        for (int64_t h = ag; h < ag + NA; h += MAX_NA) ks.k[MAX_NA](cols, w + r * ks.rb, acts, h, out + h * os + r, os);
}

// Weight rows [r0, r1) x activation rows [a0, a1): tiles of WIDEST_NA, then WIDE_NA (where such
// tiles exist), then MAX_NA activation rows outside, weight rows inside (the activation tile
// stays in L1 while the weight chunk streams from L2). Every output's arithmetic is its row
// kernel's, whatever the tile.
inline void run_tile(const Kernels& ks, const uint8_t* w, const QActs& acts, int64_t r0,
                     int64_t r1, int64_t a0, int64_t a1, float* out, int64_t os) {
    const int64_t cols = acts.cols;
    int64_t ag = a0;
    if (ks.widest != nullptr)
        for (; ag + WIDEST_NA <= a1; ag += WIDEST_NA) run_wide_tile<WIDEST_NA>(ks, ks.widest, ks.widest_quad, w, acts, r0, r1, ag, out, os);
    if (ks.wide != nullptr)
        for (; ag + WIDE_NA <= a1; ag += WIDE_NA) run_wide_tile<WIDE_NA>(ks, ks.wide, nullptr, w, acts, r0, r1, ag, out, os);
    for (; ag < a1; ag += MAX_NA) {
        const int na = static_cast<int>(std::min<int64_t>(MAX_NA, a1 - ag));
        const RowKernel k = ks.k[na];
        int64_t r = r0;
        if (na == 1 && ks.mv != nullptr)
            for (; r + MATVEC_NR <= r1; r += MATVEC_NR) ks.mv(cols, w + r * ks.rb, acts, ag, out + ag * os + r);
        if (na == MAX_NA && ks.tile != nullptr)
            for (; r + TILE_NW <= r1; r += TILE_NW) ks.tile(cols, w + r * ks.rb, ks.rb, acts, ag, out + ag * os + r, os);
        for (; r < r1; ++r) k(cols, w + r * ks.rb, acts, ag, out + ag * os + r, os);
    }
}

struct Plan {
    int64_t R, P, nrc, np;
    int threads;
};

Plan make_plan(int64_t rows, int64_t n, int64_t cols, int64_t rb, int n_threads) {
    Plan p{};
    // Tiny products: a parallel region costs more than the work.
    const int64_t work = rows * cols * std::max<int64_t>(n, 1);
    p.threads = work < (int64_t{1} << 17) ? 1 : std::max(1, n_threads);
    const int64_t t = p.threads;
    if (n <= MAX_NA) {
        // Memory-bound: ~8 chunks per thread for balance, but at least 4 rows of prefetchable stream.
        p.R = std::max<int64_t>(4, (rows + 8 * t - 1) / (8 * t));
        p.P = n;
    } else {
        // Weight chunk ~256 KiB (L2-resident while activation tiles pass over it).
        p.R = std::max<int64_t>(1, (int64_t{256} << 10) / std::max<int64_t>(rb, 1));
        p.R = std::min(p.R, std::max<int64_t>(1, (rows + 2 * t - 1) / (2 * t)));
        p.P = n;
    }
    p.nrc = (rows + p.R - 1) / p.R;
    // Too few chunks to keep every thread busy: split the activation rows too.
    if (n > MAX_NA && p.nrc < 4 * t) {
        const int64_t want_np = (4 * t + p.nrc - 1) / p.nrc;
        int64_t P = (n + want_np - 1) / want_np;
        P = (P + MAX_NA - 1) / MAX_NA * MAX_NA;
        p.P = std::max<int64_t>(MAX_NA, P);
    }
    p.np = (n + p.P - 1) / p.P;
    return p;
}

void run_plan(const Plan& p, const Kernels& ks, const uint8_t* w, int64_t rows, const QActs& acts,
              const float* x_to_quantize, float* out) {
    const int64_t n = acts.n;
    const int64_t items = p.nrc * p.np;
#pragma omp parallel num_threads(p.threads) if (p.threads > 1)
    {
        if (x_to_quantize != nullptr) {
#pragma omp for schedule(static)
            for (int64_t r = 0; r < n; ++r) quantize_acts_rows(acts, x_to_quantize, r, r + 1);
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < items; ++it) {
            const int64_t rc = it / p.np, pa = it % p.np;
            const int64_t r0 = rc * p.R, r1 = std::min(rows, r0 + p.R);
            const int64_t a0 = pa * p.P, a1 = std::min(n, a0 + p.P);
            run_tile(ks, w, acts, r0, r1, a0, a1, out, rows);
        }
    }
}

}  // namespace

void set_force_scalar(bool on) { g_force_scalar.store(on); }
bool force_scalar() { return g_force_scalar.load(); }

void matmul(const uint8_t* w, int type, int64_t rows, int64_t cols, const float* x, int64_t n,
            float* out, int n_threads, bool rows_alone) {
    if (rows <= 0 || n <= 0) return;
    const int kind = act_kind_for(type);
    void* buf = t_scratch[kUserSlots].get(acts_bytes(kind, n, cols));
    QActs acts = acts_layout(kind, n, cols, buf, x);
    if (rows_alone) acts.n_call = 1;
    const Kernels ks = kernels_for(type, kind, cols);
    const Plan p = make_plan(rows, n, cols, ks.rb, n_threads);
    run_plan(p, ks, w, rows, acts, kind == ACT_F32 ? nullptr : x, out);
}

QActs quantize_acts(int type, const float* x, int64_t n, int64_t cols, int slot) {
    const int kind = act_kind_for(type);
    slot = std::clamp(slot, 0, kUserSlots - 1);
    void* buf = t_scratch[slot].get(acts_bytes(kind, n, cols));
    const QActs acts = acts_layout(kind, n, cols, buf, x);
    if (kind != ACT_F32) quantize_acts_rows(acts, x, 0, n);
    return acts;
}

void matmul_acts(const uint8_t* w, int type, int64_t rows, const QActs& acts, float* out,
                 int n_threads) {
    if (rows <= 0 || acts.n <= 0) return;
    const Kernels ks = kernels_for(type, acts.kind, acts.cols);
    const Plan p = make_plan(rows, acts.n, acts.cols, ks.rb, n_threads);
    run_plan(p, ks, w, rows, acts, nullptr, out);
}

void matmul_rows(const uint8_t* w, int type, int64_t r0, int64_t r1, const QActs& acts, float* out,
                 int64_t out_stride) {
    if (r1 <= r0 || acts.n <= 0) return;
    const Kernels ks = kernels_for(type, acts.kind, acts.cols);
    run_tile(ks, w, acts, r0, r1, 0, acts.n, out, out_stride);
}

namespace {

int count_physical_cores() {
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof(set), &set) != 0) return std::max(1, omp_get_num_procs());
    const int logical = CPU_COUNT(&set);
    std::set<std::pair<long, long>> cores;
    for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
        if (!CPU_ISSET(cpu, &set)) continue;
        long ids[2] = {-1, -1};
        const char* names[2] = {"physical_package_id", "core_id"};
        for (int k = 0; k < 2; ++k) {
            char path[128];
            std::snprintf(path, sizeof(path), "/sys/devices/system/cpu/cpu%d/topology/%s", cpu, names[k]);
            if (FILE* f = std::fopen(path, "r")) {
                if (std::fscanf(f, "%ld", &ids[k]) != 1) ids[k] = -1;
                std::fclose(f);
            }
        }
        if (ids[1] < 0) return std::max(1, logical);  // no topology info: count logical CPUs
        cores.insert({ids[0], ids[1]});
    }
    return std::max<int>(1, static_cast<int>(cores.size()));
}

}  // namespace

int physical_cores() {
    // Reading sysfs costs ~30 us; the topology does not change while we run.
    static const int cached = count_physical_cores();
    return cached;
}

uint64_t stream_read(const uint8_t* p, int64_t n, int n_threads) {
    uint64_t total = 0;
    const int64_t chunk = int64_t{1} << 20;  // 1 MiB pieces, statically split
    const int64_t pieces = (n + chunk - 1) / chunk;
#pragma omp parallel for schedule(static) num_threads(std::max(1, n_threads)) reduction(+ : total)
    for (int64_t c = 0; c < pieces; ++c) {
        const uint8_t* s = p + c * chunk;
        const int64_t len = std::min(chunk, n - c * chunk);
        int64_t i = 0;
#if defined(__AVX2__)
        __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
        for (; i + 128 <= len; i += 128) {
            a0 = _mm256_add_epi64(a0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i)));
            a1 = _mm256_add_epi64(a1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i + 32)));
            a2 = _mm256_add_epi64(a2, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i + 64)));
            a3 = _mm256_add_epi64(a3, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i + 96)));
        }
        alignas(32) uint64_t lanes[4];
        _mm256_store_si256(reinterpret_cast<__m256i*>(lanes),
                           _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3)));
        total += lanes[0] + lanes[1] + lanes[2] + lanes[3];
#endif
        for (; i < len; ++i) total += s[i];
    }
    return total;
}

}  // namespace hl
