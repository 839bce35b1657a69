// Kernels that check the SIMT emulator itself (tests/test_cuda_emulator.py): each either must
// run with CUDA's semantics or must be refused the way a GPU would punish it.
typedef unsigned short u16;
typedef long long i64;

// Warp shuffles of float, double and int: out[3*i + 0..2] for thread i.
extern "C" __global__ void __launch_bounds__(64)
shuffles(float* outf, double* outd, int* outi) {
    const int t = threadIdx.x;
    float f = (float)t + 0.5f;
    double d = (double)t * 0.25;
    int i = t * 7;
    outf[t] = __shfl_xor_sync(0xffffffffu, f, 5);
    outd[t] = __shfl_sync(0xffffffffu, d, (t * 3) & 31);
    outi[t] = __shfl_xor_sync(0xffffffffu, i, 16) + __shfl_sync(0xffffffffu, i, 0);
}

// Neighbour exchange through shared memory; with_barrier selects the correct version.
extern "C" __global__ void __launch_bounds__(128)
neighbours(const float* x, float* out, int with_barrier) {
    __shared__ float buf[128];
    const int t = threadIdx.x, n = blockDim.x;
    buf[t] = x[blockIdx.x * n + t];
    if (with_barrier) __syncthreads();
    // without the barrier this is the race a GPU would punish: buf[(t+1)%n] may not be written
    // yet (or already be the next block's); a thread's own store is no substitute
    out[blockIdx.x * n + t] = buf[(t + 1) % n];
    if (with_barrier) {
        __syncthreads();
        buf[t] = -1.0f;  // the next block must not see this block's values
    }
}

extern "C" __global__ void __launch_bounds__(64)
divergent_barrier(float* out) {
    if (threadIdx.x < 16) __syncthreads();
    out[threadIdx.x] = 1.0f;
}

extern "C" __global__ void __launch_bounds__(64)
barrier_after_return(float* out) {
    if (threadIdx.x >= 32) return;
    __syncthreads();
    out[threadIdx.x] = 1.0f;
}

extern "C" __global__ void __launch_bounds__(32)
shuffle_after_return(float* out) {
    if (threadIdx.x == 5) return;
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

extern "C" __global__ void __launch_bounds__(64)
bounded(float* out) { out[threadIdx.x] = 2.0f; }

extern "C" __global__ void __launch_bounds__(64)
dyn_shared(float* out, int n_write) {
    extern __shared__ float dyn[];
    for (int i = threadIdx.x; i < n_write; i += blockDim.x) dyn[i] = (float)i;
    __syncthreads();
    out[threadIdx.x] = dyn[threadIdx.x];
}

extern "C" __global__ void __launch_bounds__(256)
takes_i64(float* out, i64 n) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = (float)i;
}

// The inline PTX the real kernels use, element-wise.
extern "C" __global__ void __launch_bounds__(256)
ptx_ops(const float* f, u16* h, const u16* hin, float* fout, const int* a, const int* b, int* d, i64 n) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    u16 r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(f[i]));
    h[i] = r;
    float w;
    asm("cvt.f32.f16 %0, %1;" : "=f"(w) : "h"(hin[i]));
    fout[i] = w;
    int acc;
    asm("dp4a.s32.s32 %0, %1, %2, %3;" : "=r"(acc) : "r"(a[i]), "r"(b[i]), "r"(d[i]));
    d[i] = acc;
}

// One warp shuffles many times while the other warps already wait at the barrier (attn_rows
// with a single key): progress in one warp only, which the scheduler must not call a deadlock.
extern "C" __global__ void __launch_bounds__(128)
one_warp_reduces(float* out) {
    float v = (float)threadIdx.x;
    if (threadIdx.x < 32)
        for (int r = 0; r < 8; ++r)
            for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    out[threadIdx.x] = v;
}
