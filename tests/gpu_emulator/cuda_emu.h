// A SIMT emulator of the CUDA built-ins that hybridllm/backends/cuda_kernels.cu uses, so that
// g++ compiles that file unchanged (as C++17) and runs its kernels on the CPU.
//
// Why fibers: every CUDA thread of a block is a fiber with its own stack, so __syncthreads
// and warp shuffles have their real semantics (a thread blocks until the others arrive) and
// per-thread locals (acc[8], Sub, ...) live where they would on a GPU. Blocks run one after
// another; inside a block the scheduler resumes the runnable fibers in forward, reverse or
// random order (emu_set_order), so a missing barrier shows up as different output.
//
// What it refuses (emu_error + a message, the launch returns an error code):
// - __syncthreads reached by some threads of the block while others exited or wait at a
//   different barrier (divergent barrier), a deadlock;
// - a shuffle whose mask names lanes that exited or do not exist;
// - a launch over __launch_bounds__, over 1024 threads, or over 48 KiB of dynamic shared
//   memory, and a write past the dynamic shared memory the launch asked for.
//
// Shared memory: `__shared__` is `thread_local` (all fibers run on one OS thread, so one
// instance per block, as on a GPU); `extern __shared__ T name[]` binds to a thread_local
// array that the generated launcher defines with the 48 KiB maximum.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#ifndef __CUDA_ARCH__
#define __CUDA_ARCH__ 900
#endif
#define __host__
#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ thread_local

struct uint3 { unsigned x, y, z; };
struct dim3 { unsigned x = 1, y = 1, z = 1; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) float2 { float x, y; };
struct alignas(8) int2 { int x, y; };

namespace emu {

constexpr int kMaxThreads = 1024;
constexpr size_t kStackBytes = 64 * 1024;
constexpr size_t kMaxDynShared = 48 * 1024;

enum Order { kForward = 0, kReverse = 1, kRandom = 2 };

struct Fiber {
    uint3 tid;
    int linear = 0;       // threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)
    void* sp = nullptr;   // saved stack pointer while suspended
    char* stack = nullptr;
    bool done = false;
    bool started = false;
    // what the fiber waits for: 0 nothing, 1 block barrier, 2 warp exchange
    int wait = 0;
    unsigned long long wait_gen = 0;
};

struct Warp {
    unsigned long long gen = 0;  // exchanges completed
    unsigned arrived = 0;        // lanes arrived at the current exchange (bit mask)
    unsigned mask = 0;           // the mask of the current exchange
    unsigned exists = 0;         // lanes this block has
    unsigned done = 0;           // lanes that returned
    // double-buffered lane values: exchange g writes slot[g & 1]
    unsigned long long slot[2][32];
};

struct State {
    dim3 grid, block;
    uint3 block_idx;
    int nthreads = 0;
    std::vector<Fiber> fibers;
    std::vector<Warp> warps;
    Fiber* cur = nullptr;
    void* sched_sp = nullptr;
    // block barrier
    unsigned long long bar_gen = 0;
    int bar_arrived = 0;
    int bar_line = -1;
    int n_done = 0;
    unsigned long long events = 0;  // arrivals and exits: a pass without one is a deadlock
    bool error = false;
    std::string message;
    Order order = kForward;
    std::mt19937 rng{12345};
    const std::function<void()>* body = nullptr;
};

inline State g_state;  // one launch at a time, on the calling OS thread
inline State& st() { return g_state; }

}  // namespace emu

extern "C" void emu_switch(void** save_sp, void* load_sp);
// Save the callee-saved registers on the current stack, store its pointer in *save_sp, load
// load_sp and restore the registers saved there (System V x86-64: rbx rbp r12-r15).
asm(R"(
.text
.globl emu_switch
.type emu_switch,@function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
.size emu_switch, .-emu_switch
)");

namespace emu {

[[noreturn]] inline void fail_here(const std::string& why);

inline void yield_to_scheduler() {
    State& s = st();
    emu_switch(&s.cur->sp, s.sched_sp);
}

// A fiber that hits an error stops here: it marks the launch failed and parks forever.
[[noreturn]] inline void fail_here(const std::string& why) {
    State& s = st();
    if (!s.error) {
        s.error = true;
        char where[96];
        std::snprintf(where, sizeof where, " (block %u,%u,%u thread %u,%u,%u)", s.block_idx.x,
                      s.block_idx.y, s.block_idx.z, s.cur->tid.x, s.cur->tid.y, s.cur->tid.z);
        s.message = why + where;
    }
    for (;;) yield_to_scheduler();
}

[[noreturn]] inline void fiber_entry() {
    State& s = st();
    (*s.body)();
    if (s.bar_arrived > 0)
        fail_here("thread returned while others wait at the __syncthreads of line " +
                  std::to_string(s.bar_line) + " (divergent barrier)");
    const Warp& w = s.warps[s.cur->linear >> 5];
    if (w.arrived && (w.mask >> (s.cur->linear & 31) & 1u))
        fail_here("shuffle after lane " + std::to_string(s.cur->linear & 31) +
                  " of the warp returned (its lanes wait for it)");
    s.cur->done = true;
    s.warps[s.cur->linear >> 5].done |= 1u << (s.cur->linear & 31);
    ++s.n_done;
    ++s.events;
    emu_switch(&s.cur->sp, s.sched_sp);
    __builtin_unreachable();
}

inline void init_fiber(Fiber& f) {
    // Stack top 16-aligned; the fiber enters fiber_entry as if called (rsp % 16 == 8).
    auto* top = (void**)(f.stack + kStackBytes);
    *--top = nullptr;                        // fake return address of fiber_entry
    *--top = (void*)&fiber_entry;            // emu_switch's `ret` lands here
    for (int i = 0; i < 6; ++i) *--top = nullptr;  // rbp rbx r12-r15
    f.sp = top;
    f.done = false;
    f.started = true;
    f.wait = 0;
}

// ---- barriers ------------------------------------------------------------------------------
inline void syncthreads(int line) {
    State& s = st();
    Fiber* f = s.cur;
    if (s.n_done > 0)
        fail_here("__syncthreads at line " + std::to_string(line) +
                  " after other threads of the block returned (divergent barrier)");
    if (s.bar_arrived == 0) {
        s.bar_line = line;
    } else if (s.bar_line != line) {
        fail_here("__syncthreads at line " + std::to_string(line) + " while others wait at line " +
                  std::to_string(s.bar_line) + " (divergent barrier)");
    }
    const unsigned long long gen = s.bar_gen;
    ++s.events;
    if (++s.bar_arrived == s.nthreads) {
        s.bar_arrived = 0;
        ++s.bar_gen;
        return;
    }
    f->wait = 1;
    f->wait_gen = gen;
    while (s.bar_gen == gen) yield_to_scheduler();
    f->wait = 0;
}

// One warp-wide exchange: every lane in mask deposits a 64-bit value, then reads lane src's.
inline unsigned long long exchange(unsigned mask, unsigned long long v, int src_lane) {
    State& s = st();
    Fiber* f = s.cur;
    const int lane = f->linear & 31;
    Warp& w = s.warps[f->linear >> 5];
    const int warp_base = f->linear & ~31;
    if (!(mask >> lane & 1u)) fail_here("shuffle by a lane outside its mask");
    if (mask & ~w.exists) fail_here("shuffle mask names lanes that do not exist in this block");
    if (mask & w.done) {
        const int l = __builtin_ctz(mask & w.done);
        fail_here("shuffle after lane " + std::to_string(l) + " of the warp returned");
    }
    if (w.arrived == 0) {
        w.mask = mask;
    } else if (w.mask != mask) {
        fail_here("lanes of a warp shuffle with different masks");
    }
    const unsigned long long gen = w.gen;
    w.slot[gen & 1][lane] = v;
    w.arrived |= 1u << lane;
    ++s.events;
    if (w.arrived == mask) {
        w.arrived = 0;
        ++w.gen;
    } else {
        f->wait = 2;
        f->wait_gen = gen;
        while (w.gen == gen) yield_to_scheduler();
        f->wait = 0;
    }
    if (src_lane < 0 || src_lane > 31 || !(mask >> src_lane & 1u)) return v;  // CUDA: own value
    return w.slot[gen & 1][src_lane];
}

template <class T> inline unsigned long long to_bits(T v) {
    static_assert(sizeof(T) <= 8, "shuffle of a type over 8 bytes");
    unsigned long long b = 0;
    std::memcpy(&b, &v, sizeof(T));
    return b;
}
template <class T> inline T from_bits(unsigned long long b) {
    T v;
    std::memcpy(&v, &b, sizeof(T));
    return v;
}

// ---- the launch ----------------------------------------------------------------------------
inline std::vector<char*>& stacks() {
    static std::vector<char*> v;
    return v;
}

inline int run_block(State& s) {
    const int n = s.nthreads;
    for (int i = 0; i < n; ++i) init_fiber(s.fibers[i]);
    for (size_t i = 0; i < s.warps.size(); ++i) {
        s.warps[i] = Warp{};
        const int lanes = n - 32 * (int)i;
        s.warps[i].exists = lanes >= 32 ? 0xffffffffu : (1u << lanes) - 1u;
    }
    s.bar_gen = 0;
    s.bar_arrived = 0;
    s.n_done = 0;
    std::vector<int> order(n);
    for (int i = 0; i < n; ++i) order[i] = s.order == kReverse ? n - 1 - i : i;
    while (s.n_done < n) {
        if (s.order == kRandom) std::shuffle(order.begin(), order.end(), s.rng);
        // progress is counted, not inferred from the barrier/warp state: a completed exchange
        // and the next one's arrivals can leave that state as it was
        const unsigned long long events_before = s.events;
        for (int i : order) {
            Fiber& f = s.fibers[i];
            if (f.done) continue;
            // a fiber still blocked would only yield back: do not switch to it
            if (f.wait == 1 && s.bar_gen == f.wait_gen) continue;
            if (f.wait == 2 && s.warps[f.linear >> 5].gen == f.wait_gen) continue;
            s.cur = &f;
            emu_switch(&s.sched_sp, f.sp);
            if (s.error) return 1;
        }
        if (s.n_done < n && s.events == events_before) {
            s.error = true;
            s.message = "deadlock: threads wait at a barrier or shuffle the others never reach";
            return 1;
        }
    }
    return 0;
}

// Run body() as every thread of every block of the grid; 0 on success.
inline int launch(dim3 grid, dim3 block, int bound, const std::function<void()>& body) {
    State& s = st();
    s.error = false;
    s.message.clear();
    const long nthreads = (long)block.x * block.y * block.z;
    if (nthreads <= 0 || nthreads > kMaxThreads || (bound > 0 && nthreads > bound)) {
        s.error = true;
        s.message = "launch of " + std::to_string(nthreads) + " threads per block over the limit (" +
                    std::to_string(bound > 0 ? bound : kMaxThreads) + ", __launch_bounds__)";
        return 1;
    }
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535) {
        s.error = true;
        s.message = "grid dimensions out of range";
        return 1;
    }
    s.grid = grid;
    s.block = block;
    s.nthreads = (int)nthreads;
    s.body = &body;
    auto& pool = stacks();
    while ((long)pool.size() < nthreads) {
        char* p = (char*)std::aligned_alloc(64, kStackBytes);
        pool.push_back(p);
    }
    s.fibers.assign(nthreads, Fiber{});
    s.warps.assign((nthreads + 31) / 32, Warp{});
    for (unsigned z = 0, i = 0; z < block.z; ++z)
        for (unsigned y = 0; y < block.y; ++y)
            for (unsigned x = 0; x < block.x; ++x, ++i) {
                Fiber& f = s.fibers[i];
                f.tid = {x, y, z};
                f.linear = (int)i;
                f.stack = pool[i];
            }
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                s.block_idx = {bx, by, bz};
                if (run_block(s)) return 1;
            }
    return 0;
}

// ---- inline PTX (the front end lowers each asm statement to one of these) -----------------
namespace ptx {
// cvt.rn.f16.f32: IEEE binary32 -> binary16, round to nearest even (overflow -> inf, NaN kept).
inline uint16_t cvt_rn_f16_f32(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000u;
    const uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return (uint16_t)(sign | 0x7e00u | ((ax >> 13) & 0x3ffu));  // NaN
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  // >= 65520: rounds to inf
    if (ax >= 0x38800000u) {  // normal f16 (>= 2^-14)
        const uint32_t mant = ax & 0x7fffffu;
        uint32_t h = ((ax >> 23) - 112u) << 10 | (mant >> 13);
        const uint32_t rest = mant & 0x1fffu;
        if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // carries into the exponent
        return (uint16_t)(sign | h);
    }
    if (ax < 0x33000000u) return (uint16_t)sign;  // < 2^-25: rounds to zero (2^-25 ties to 0)
    // subnormal: value = m * 2^-24 with m = round(ax * 2^24)
    const uint32_t e = ax >> 23, mant = (ax & 0x7fffffu) | 0x800000u;
    const int shift = 126 - (int)e;  // 14 .. 24 for e in 102 .. 112
    uint32_t h = mant >> shift;
    const uint32_t rest = mant & ((1u << shift) - 1u), halfway = 1u << (shift - 1);
    if (rest > halfway || (rest == halfway && (h & 1u))) ++h;
    return (uint16_t)(sign | h);
}
// cvt.f32.f16: exact widening.
inline float cvt_f32_f16(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {  // normalize the subnormal
            int e = -1;
            uint32_t m = man;
            do { ++e; m <<= 1; } while (!(m & 0x400u));
            bits = sign | ((uint32_t)(112 - e) << 23) | ((m & 0x3ffu) << 13);
        }
    } else {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}
// dp4a.s32.s32 d, a, b, c: d = c + sum of the 4 signed byte products (wrapping 32-bit add).
inline int dp4a_s32_s32(int a, int b, int c) {
    uint32_t acc = (uint32_t)c;
    for (int i = 0; i < 4; ++i)
        acc += (uint32_t)((int)(int8_t)(a >> (8 * i)) * (int)(int8_t)(b >> (8 * i)));
    return (int)acc;
}
}  // namespace ptx

}  // namespace emu

// ---- CUDA built-ins ------------------------------------------------------------------------
#define threadIdx (emu::st().cur->tid)
#define blockIdx (emu::st().block_idx)
#define blockDim (emu::st().block)
#define gridDim (emu::st().grid)
#define warpSize 32
#define __syncthreads() emu::syncthreads(__LINE__)

template <class T> inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    const int lane = emu::st().cur->linear & 31;
    const int src = width == 32 ? (lane ^ lane_mask) : ((lane ^ lane_mask) & (width - 1)) | (lane & ~(width - 1));
    return emu::from_bits<T>(emu::exchange(mask, emu::to_bits(v), src));
}
template <class T> inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
    const int lane = emu::st().cur->linear & 31;
    const int src = (lane & ~(width - 1)) + (src_lane & (width - 1));
    return emu::from_bits<T>(emu::exchange(mask, emu::to_bits(v), src));
}

inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float __uint_as_float(unsigned i) { float f; std::memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
inline unsigned __float_as_uint(float f) { unsigned i; std::memcpy(&i, &f, 4); return i; }
// Explicit single roundings: fmaf is a fused multiply-add in glibc (exact), and this file is
// built with -ffp-contract=off so a * b stays one rounding.
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
