// CUDA kernels of hybridllm's GPU backend (backends/cuda.py loads this file with
// cupy.RawModule(code=..., options=("-std=c++17",)); every kernel is extern "C").
//
// Why it is written this way:
// - NVRTC has no C/C++ standard headers, so this file includes none: fixed-width types are
//   typedefs, f16 <-> f32 and dp4a are inline PTX, -inf is a bit pattern.
// - The per-block decoding of every GGML type (`unpack<T>`), the sub-block dot product and the
//   per-lane part of the matrix-vector kernel are __host__ __device__, so a host test compiled
//   with nvcc (tests/test_cuda_backend.py) checks them against gguf.quants without a GPU.
// - Weights stay as raw GGUF blocks in device memory. Matmuls quantize the activations to 8-bit
//   blocks of 32 once per input and do integer dot products with __dp4a: tiles of weight rows x
//   activation rows (llama.cpp's MMQ scheme; the 32-element block types in the CPU's float
//   order), and for the K-quants' decode one warp per weight row (llama.cpp's mmvq). Float
//   weights' prompts (and quantized ones on request) are dequantized to f16 for cuBLAS.
//
// The one trick that keeps every type in one kernel: a 32-element sub-block of any type is
// unpacked into `Sub` = 32 small integers q (packed 4 per int, as dp4a wants them) plus, for
// each 16-element half, a scale and an offset, such that
//     w[e] = dl * q[e] + ml   (e < 16),     w[e] = dh * q[e] + mh   (e >= 16).
// Then  sum_e w[e] * x~[e] = dx * (dl * sum_lo(q*qx) + dh * sum_hi(q*qx)) + ml*S_lo + mh*S_hi,
// where x~ = dx * qx is the 8-bit activation block and S_lo/S_hi = dx * (sums of qx over the
// block's halves). Offsets like Q4_0's "-8" become ml = -8*d, so q stays an unsigned nibble.
// Using the sums of the quantized x (llama.cpp's mmvq uses the float sums) makes the result
// exactly W . x~: the only error is the 8-bit rounding of x, as in the CPU's integer kernels.

typedef unsigned char u8;
typedef signed char i8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;

#define HD __host__ __device__ __forceinline__

// GGML type numbers (gguf.GGMLQuantizationType).
#define T_F32 0
#define T_F16 1
#define T_Q4_0 2
#define T_Q4_1 3
#define T_Q5_0 6
#define T_Q5_1 7
#define T_Q8_0 8
#define T_Q2_K 10
#define T_Q3_K 11
#define T_Q4_K 12
#define T_Q5_K 13
#define T_Q6_K 14
#define T_BF16 30

// ---------------------------------------------------------------------------------------------
// scalar helpers
// ---------------------------------------------------------------------------------------------
HD float h2f(u16 h) {
#ifdef __CUDA_ARCH__
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#else
    const u32 sign = (u32)(h & 0x8000u) << 16;
    const u32 exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    u32 bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp == 0) {
        const float f = (float)man * 5.9604644775390625e-08f;  // subnormal: man * 2^-24, exact
        return sign ? -f : f;
    } else {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    }
    float f;
    __builtin_memcpy(&f, &bits, 4);
    return f;
#endif
}

HD float bf2f(u16 h) {
#ifdef __CUDA_ARCH__
    return __int_as_float((int)((u32)h << 16));
#else
    const u32 bits = (u32)h << 16;
    float f;
    __builtin_memcpy(&f, &bits, 4);
    return f;
#endif
}

__device__ __forceinline__ u16 f2h(float f) {  // round to nearest even, as numpy's astype
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ float round_f16(float f) { return h2f(f2h(f)); }

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }
__device__ __forceinline__ int imax(int a, int b) { return a > b ? a : b; }
__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }

// 4 x int8 dot product + accumulator (sm_61+).
HD int dp4a(int a, int b, int c) {
#ifdef __CUDA_ARCH__
    int r;
    asm("dp4a.s32.s32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
    return r;
#else
    for (int i = 0; i < 4; ++i) c += (int)(i8)(a >> (8 * i)) * (int)(i8)(b >> (8 * i));
    return c;
#endif
}

// Single-rounding float ops that the compiler may not contract or reorder (ggml's exact bits).
HD float fma_rn(float a, float b, float c) {
#ifdef __CUDA_ARCH__
    return __fmaf_rn(a, b, c);
#else
    return fmaf(a, b, c);
#endif
}
HD float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fmul_rn(a, b);
#else
    return a * b;
#endif
}
HD float pow2i(int n) {  // 2^n for n in [-126, 127], exact
    const u32 bits = (u32)(n + 127) << 23;
#ifdef __CUDA_ARCH__
    return __uint_as_float(bits);
#else
    float f;
    __builtin_memcpy(&f, &bits, 4);
    return f;
#endif
}

// Every GGML block size is even and cudaMalloc'd rows start 256-aligned, so any field at an
// even offset can be read with 16-bit loads; 32-bit words are assembled from two of them.
HD u16 ld16(const u8* p) { return *(const u16*)p; }
HD u32 ld32(const u8* p) {
    const u16* q = (const u16*)p;
    return (u32)q[0] | ((u32)q[1] << 16);
}

// Spread 4 bits (b0..b3) of h to bit 4 of each byte (Q5_0/Q5_1 high bits).
HD u32 spread4_bit4(u32 h) {
    return ((h & 1u) << 4) | ((h & 2u) << 11) | ((h & 4u) << 18) | ((h & 8u) << 25);
}

// ---------------------------------------------------------------------------------------------
// block layouts
// ---------------------------------------------------------------------------------------------
template <int T> struct Traits;
// q8_1: the CPU pairs the type with q8_1 activations (a min per block: m times q8_1's s).
template <> struct Traits<T_Q4_0> { static constexpr int qk = 32, bytes = 18; static constexpr bool q8_1 = false; };
template <> struct Traits<T_Q4_1> { static constexpr int qk = 32, bytes = 20; static constexpr bool q8_1 = true; };
template <> struct Traits<T_Q5_0> { static constexpr int qk = 32, bytes = 22; static constexpr bool q8_1 = false; };
template <> struct Traits<T_Q5_1> { static constexpr int qk = 32, bytes = 24; static constexpr bool q8_1 = true; };
template <> struct Traits<T_Q8_0> { static constexpr int qk = 32, bytes = 34; static constexpr bool q8_1 = false; };
template <> struct Traits<T_Q2_K> { static constexpr int qk = 256, bytes = 84; static constexpr bool q8_1 = false; };
template <> struct Traits<T_Q3_K> { static constexpr int qk = 256, bytes = 110; static constexpr bool q8_1 = false; };
template <> struct Traits<T_Q4_K> { static constexpr int qk = 256, bytes = 144; static constexpr bool q8_1 = false; };
template <> struct Traits<T_Q5_K> { static constexpr int qk = 256, bytes = 176; static constexpr bool q8_1 = false; };
template <> struct Traits<T_Q6_K> { static constexpr int qk = 256, bytes = 210; static constexpr bool q8_1 = false; };

// One 32-element sub-block: q[i] packs elements 4i..4i+3 (byte b = element 4i+b), int8 each.
struct Sub {
    int q[8];
    float dl, dh;  // scale of elements 0..15 and 16..31
    float ml, mh;  // offset of elements 0..15 and 16..31
};

// unpack<T>(b, s, u): sub-block s (0 .. qk/32-1) of the block starting at b.
template <int T> HD void unpack(const u8* b, int s, Sub& u);

// Q4_0: d f16 | qs[16]; element l < 16 is the low nibble of qs[l], l >= 16 the high nibble
// of qs[l-16]; w = d * (q - 8).
template <> HD void unpack<T_Q4_0>(const u8* b, int, Sub& u) {
    const float d = h2f(ld16(b));
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const u32 v = ld32(b + 2 + 4 * i);
        u.q[i] = (int)(v & 0x0f0f0f0fu);
        u.q[4 + i] = (int)((v >> 4) & 0x0f0f0f0fu);
    }
    u.dl = u.dh = d;
    u.ml = u.mh = -8.0f * d;
}

// Q4_1: d f16 | m f16 | qs[16]; w = d * q + m.
template <> HD void unpack<T_Q4_1>(const u8* b, int, Sub& u) {
    const float d = h2f(ld16(b)), m = h2f(ld16(b + 2));
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const u32 v = ld32(b + 4 + 4 * i);
        u.q[i] = (int)(v & 0x0f0f0f0fu);
        u.q[4 + i] = (int)((v >> 4) & 0x0f0f0f0fu);
    }
    u.dl = u.dh = d;
    u.ml = u.mh = m;
}

// Q5_0: d f16 | qh u32 (bit l = 5th bit of element l) | qs[16]; w = d * (q - 16).
template <> HD void unpack<T_Q5_0>(const u8* b, int, Sub& u) {
    const float d = h2f(ld16(b));
    const u32 qh = ld32(b + 2);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const u32 v = ld32(b + 6 + 4 * i);
        u.q[i] = (int)((v & 0x0f0f0f0fu) | spread4_bit4(qh >> (4 * i)));
        u.q[4 + i] = (int)(((v >> 4) & 0x0f0f0f0fu) | spread4_bit4(qh >> (16 + 4 * i)));
    }
    u.dl = u.dh = d;
    u.ml = u.mh = -16.0f * d;
}

// Q5_1: d f16 | m f16 | qh u32 | qs[16]; w = d * q + m.
template <> HD void unpack<T_Q5_1>(const u8* b, int, Sub& u) {
    const float d = h2f(ld16(b)), m = h2f(ld16(b + 2));
    const u32 qh = ld32(b + 4);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const u32 v = ld32(b + 8 + 4 * i);
        u.q[i] = (int)((v & 0x0f0f0f0fu) | spread4_bit4(qh >> (4 * i)));
        u.q[4 + i] = (int)(((v >> 4) & 0x0f0f0f0fu) | spread4_bit4(qh >> (16 + 4 * i)));
    }
    u.dl = u.dh = d;
    u.ml = u.mh = m;
}

// Q8_0: d f16 | qs[32] int8; w = d * q.
template <> HD void unpack<T_Q8_0>(const u8* b, int, Sub& u) {
    const float d = h2f(ld16(b));
#pragma unroll
    for (int i = 0; i < 8; ++i) u.q[i] = (int)ld32(b + 2 + 4 * i);
    u.dl = u.dh = d;
    u.ml = u.mh = 0.0f;
}

// Q2_K (256 elements): scales[16] (low nibble scale, high nibble min, per 16) | qs[64] | d | dmin.
// Element e = 128*half + 32*sh + l is bits 2sh..2sh+1 of qs[32*half + l]; sub-block s = e/32
// so half = s/4, sh = s%4; w = d*sc*q - dmin*m with (sc, m) of the 16-group e/16.
template <> HD void unpack<T_Q2_K>(const u8* b, int s, Sub& u) {
    const float d = h2f(ld16(b + 80)), dmin = h2f(ld16(b + 82));
    const int half = s >> 2, sh = 2 * (s & 3);
    const u8* qs = b + 16 + 32 * half;
#pragma unroll
    for (int i = 0; i < 8; ++i) u.q[i] = (int)((ld32(qs + 4 * i) >> sh) & 0x03030303u);
    const u8 s0 = b[2 * s], s1 = b[2 * s + 1];
    u.dl = d * (float)(s0 & 0xf);
    u.dh = d * (float)(s1 & 0xf);
    u.ml = -dmin * (float)(s0 >> 4);
    u.mh = -dmin * (float)(s1 >> 4);
}

// Q3_K: hmask[32] | qs[64] | scales[12] (16 x 6-bit, offset 32) | d.
// Element e = 32s + l: low 2 bits from qs like Q2_K; bit s of hmask[l] set means +0, clear
// means -4. Here q = low | hbit<<2 in 0..7 and the -4 goes into the offset (ml = -4 dl).
HD int q3k_scale(const u8* sc, int j) {
    const int low = j < 8 ? (sc[j] & 0xf) : (sc[j - 8] >> 4);
    const int high = (sc[8 + (j & 3)] >> (2 * (j >> 2))) & 3;
    return (low | (high << 4)) - 32;
}
template <> HD void unpack<T_Q3_K>(const u8* b, int s, Sub& u) {
    const float d = h2f(ld16(b + 108));
    const int half = s >> 2, sh = 2 * (s & 3);
    const u8* qs = b + 32 + 32 * half;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const u32 low = (ld32(qs + 4 * i) >> sh) & 0x03030303u;
        const u32 hb = (ld32(b + 4 * i) >> s) & 0x01010101u;
        u.q[i] = (int)(low | (hb << 2));
    }
    u.dl = d * (float)q3k_scale(b + 96, 2 * s);
    u.dh = d * (float)q3k_scale(b + 96, 2 * s + 1);
    u.ml = -4.0f * u.dl;
    u.mh = -4.0f * u.dh;
}

// Q4_K/Q5_K scales: 8 pairs of 6-bit (scale, min) packed in 12 bytes (ggml's get_scale_min_k4).
HD void k4_scale_min(const u8* sc, int j, int& scale, int& mn) {
    if (j < 4) {
        scale = sc[j] & 63;
        mn = sc[j + 4] & 63;
    } else {
        scale = (sc[j + 4] & 0xf) | ((sc[j - 4] >> 6) << 4);
        mn = (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4);
    }
}

// Q4_K: d | dmin | scales[12] | qs[128]. Sub-block s reads the nibble s%2 of qs[32*(s/2) + l].
template <> HD void unpack<T_Q4_K>(const u8* b, int s, Sub& u) {
    const float d = h2f(ld16(b)), dmin = h2f(ld16(b + 2));
    const u8* qs = b + 16 + 32 * (s >> 1);
    const int sh = 4 * (s & 1);
#pragma unroll
    for (int i = 0; i < 8; ++i) u.q[i] = (int)((ld32(qs + 4 * i) >> sh) & 0x0f0f0f0fu);
    int sc, mn;
    k4_scale_min(b + 4, s, sc, mn);
    u.dl = u.dh = d * (float)sc;
    u.ml = u.mh = -dmin * (float)mn;
}

// Q5_K: d | dmin | scales[12] | qh[32] (bit s of qh[l] = 5th bit of element 32s+l) | qs[128].
template <> HD void unpack<T_Q5_K>(const u8* b, int s, Sub& u) {
    const float d = h2f(ld16(b)), dmin = h2f(ld16(b + 2));
    const u8* qs = b + 48 + 32 * (s >> 1);
    const int sh = 4 * (s & 1);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const u32 low = (ld32(qs + 4 * i) >> sh) & 0x0f0f0f0fu;
        const u32 hb = (ld32(b + 16 + 4 * i) >> s) & 0x01010101u;
        u.q[i] = (int)(low | (hb << 4));
    }
    int sc, mn;
    k4_scale_min(b + 4, s, sc, mn);
    u.dl = u.dh = d * (float)sc;
    u.ml = u.mh = -dmin * (float)mn;
}

// Q6_K: ql[128] | qh[64] | scales[16] int8 | d. Element e = 128*half + 32*w + l (w = s%4):
// low nibble (w/2) of ql[64*half + 32*(w%2) + l], bits 2w..2w+1 of qh[32*half + l];
// w = d * sc[e/16] * (q - 32), q in 0..63.
template <> HD void unpack<T_Q6_K>(const u8* b, int s, Sub& u) {
    const float d = h2f(ld16(b + 208));
    const int half = s >> 2, w = s & 3;
    const u8* ql = b + 64 * half + 32 * (w & 1);
    const u8* qh = b + 128 + 32 * half;
    const int lsh = 4 * (w >> 1), hsh = 2 * w;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const u32 low = (ld32(ql + 4 * i) >> lsh) & 0x0f0f0f0fu;
        const u32 high = (ld32(qh + 4 * i) >> hsh) & 0x03030303u;
        u.q[i] = (int)(low | (high << 4));
    }
    const i8* sc = (const i8*)(b + 192);
    u.dl = d * (float)sc[2 * s];
    u.dh = d * (float)sc[2 * s + 1];
    u.ml = -32.0f * u.dl;
    u.mh = -32.0f * u.dh;
}

// Dequantized value of element e (0..31) of an unpacked sub-block.
HD float sub_value(const Sub& u, int e) {
    const int q = (int)(i8)(u.q[e >> 2] >> (8 * (e & 3)));
    return e < 16 ? u.dl * (float)q + u.ml : u.dh * (float)q + u.mh;
}

// Dot product of an unpacked weight sub-block with an 8-bit activation block:
// y = 8 ints (32 int8), dy its scale, s_lo/s_hi = dy * (sum of y over each half).
HD float sub_dot(const Sub& u, const int* y, float dy, float s_lo, float s_hi) {
    int lo = 0, hi = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        lo = dp4a(u.q[i], y[i], lo);
        hi = dp4a(u.q[4 + i], y[4 + i], hi);
    }
    return dy * (u.dl * (float)lo + u.dh * (float)hi) + u.ml * s_lo + u.mh * s_hi;
}

// ---------------------------------------------------------------------------------------------
// warp / block reductions
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ double warp_sum_d(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Block-wide sum/max for blockDim.x a multiple of 32 (<= 1024); red: >= 32 entries of shared
// memory. Every thread gets the result; the trailing barrier lets red be reused at once.
__device__ double block_sum_d(double v, double* red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum_d(v);
    if (lane == 0) red[warp] = v;
    __syncthreads();
    double r = 0.0;
    for (int w = 0; w < nw; ++w) r += red[w];
    __syncthreads();
    return r;
}
__device__ float block_max(float v, float* red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_max(v);
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float r = red[0];
    for (int w = 1; w < nw; ++w) r = fmaxf(r, red[w]);
    __syncthreads();
    return r;
}

// ---------------------------------------------------------------------------------------------
// activations -> 8-bit blocks of 32, rounded as ggml's CPU quantizes them for the 32-block types
// ---------------------------------------------------------------------------------------------
// x (n, k) f32 -> yq (n, k) int8 and yds (n, k/32) float4 (d, d * sum of q over elements 0..15,
// d * sum over 16..31, s). As quantize_row_q8_0/q8_1 (the CPU's SIMD path): q = x * (127/amax)
// rounded to nearest even, d = fp16(amax/127) (exact products with d: the halves' sums need
// at most 22 bits), and q8_1's s = fp16(d_f32 * sum) for the types with a min (Q4_1, Q5_1), so
// those types' decode matmuls equal the CPU's up to the summation order. (K-quants pair with
// q8_K's one scale per 256 on the CPU; here they share these blocks, as in llama.cpp's CUDA.)
// One warp per block of 32: lane l owns element l. k % 32 == 0.
extern "C" __global__ void __launch_bounds__(256)
quantize_q8(const float* __restrict__ x, i8* __restrict__ yq, float4* __restrict__ yds, i64 n_blocks) {
    const i64 blk = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (blk >= n_blocks) return;  // whole warps leave together
    const float v = x[blk * 32 + lane];
    const float amax = warp_max(fabsf(v));
    const float id = amax == 0.0f ? 0.0f : 127.0f / amax;
    const int q = (int)rintf(v * id);
    yq[blk * 32 + lane] = (i8)q;
    // sums of q over each 16-lane half (exact ints): xor offsets below 16 stay inside the half
    int s = q;
#pragma unroll
    for (int o = 8; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    const int s_hi = __shfl_sync(0xffffffffu, s, 16);
    if (lane == 0) {
        const float d = amax / 127.0f;
        const float d16 = round_f16(d);
        float4 ds;
        ds.x = d16;
        ds.y = d16 * (float)s;
        ds.z = d16 * (float)s_hi;
        ds.w = round_f16(d * (float)(s + s_hi));
        yds[blk] = ds;
    }
}

// ---------------------------------------------------------------------------------------------
// decode matmul: out (ncols, rows) = x (ncols, k) @ W.T, W raw GGUF rows, ncols <= NC
// ---------------------------------------------------------------------------------------------
// The work of one lane of the warp that owns `row`: sub-blocks lane, lane+32, ... of the row.
// acc[c] gets this lane's partial sum for activation row c (the kernel sums the warp).
template <int T, int NC>
HD void mmvq_lane(const u8* W, i64 row_bytes, int row, int lane, int nsub, int ncols,
                  const int* yq, const float4* yds, float* acc) {
    constexpr int spb = Traits<T>::qk / 32;  // sub-blocks per block
    const u8* wrow = W + (i64)row * row_bytes;
    for (int s = lane; s < nsub; s += 32) {
        Sub u;
        unpack<T>(wrow + (i64)(s / spb) * Traits<T>::bytes, s % spb, u);
#pragma unroll
        for (int c = 0; c < NC; ++c) {
            if (c < ncols) {
                const i64 sb = (i64)c * nsub + s;
                const int4* yp = (const int4*)(yq + sb * 8);  // 32 int8 = 2 x int4, 32-aligned
                const int4 a = yp[0], bq = yp[1];
                const int y[8] = {a.x, a.y, a.z, a.w, bq.x, bq.y, bq.z, bq.w};
                const float4 ds = yds[sb];
                if (Traits<T>::q8_1)  // one min for the block: m * q8_1's s, as ggml
                    acc[c] += sub_dot(u, y, ds.x, ds.w, 0.0f);
                else
                    acc[c] += sub_dot(u, y, ds.x, ds.y, ds.z);
            }
        }
    }
}

// blockDim (32, R): warp threadIdx.y owns row blockIdx.x * R + threadIdx.y.
template <int T, int NC>
__device__ void mmvq(const u8* __restrict__ W, i64 row_bytes, int rows, int nsub, int ncols,
                     const int* __restrict__ yq, const float4* __restrict__ yds, float* __restrict__ out) {
    const int row = blockIdx.x * blockDim.y + threadIdx.y;
    if (row >= rows) return;  // whole warp
    float acc[NC];
#pragma unroll
    for (int c = 0; c < NC; ++c) acc[c] = 0.0f;
    mmvq_lane<T, NC>(W, row_bytes, row, threadIdx.x, nsub, ncols, yq, yds, acc);
#pragma unroll
    for (int c = 0; c < NC; ++c) {
        const float v = warp_sum(acc[c]);
        if (threadIdx.x == 0 && c < ncols) out[(i64)c * rows + row] = v;
    }
}

// Float weights (F32, F16, BF16): no activation quantization, x read as f32.
template <int T> HD float ldw(const u8* row, int e);
template <> HD float ldw<T_F32>(const u8* row, int e) { return ((const float*)row)[e]; }
template <> HD float ldw<T_F16>(const u8* row, int e) { return h2f(((const u16*)row)[e]); }
template <> HD float ldw<T_BF16>(const u8* row, int e) { return bf2f(((const u16*)row)[e]); }

template <int T, int NC>
HD void mv_float_lane(const u8* W, i64 row_bytes, int row, int lane, int cols, int ncols,
                      const float* x, float* acc) {
    const u8* wrow = W + (i64)row * row_bytes;
    for (int e = lane; e < cols; e += 32) {
        const float w = ldw<T>(wrow, e);
#pragma unroll
        for (int c = 0; c < NC; ++c)
            if (c < ncols) acc[c] += w * x[(i64)c * cols + e];
    }
}

template <int T, int NC>
__device__ void mv_float(const u8* __restrict__ W, i64 row_bytes, int rows, int cols, int ncols,
                         const float* __restrict__ x, float* __restrict__ out) {
    const int row = blockIdx.x * blockDim.y + threadIdx.y;
    if (row >= rows) return;
    float acc[NC];
#pragma unroll
    for (int c = 0; c < NC; ++c) acc[c] = 0.0f;
    mv_float_lane<T, NC>(W, row_bytes, row, threadIdx.x, cols, ncols, x, acc);
#pragma unroll
    for (int c = 0; c < NC; ++c) {
        const float v = warp_sum(acc[c]);
        if (threadIdx.x == 0 && c < ncols) out[(i64)c * rows + row] = v;
    }
}

// ---------------------------------------------------------------------------------------------
// quantized matmul in the CPU's arithmetic: out (n, rows) = x (n, k) @ W.T, any n
// ---------------------------------------------------------------------------------------------
// SmolLM2-class models carry a one-ulp difference in a matmul into a different argmax within a
// few layers, so for the 32-element block types this kernel reproduces the CPU's (and llama.cpp
// CPU's) float order exactly; only the integer dots, which are exact, are done differently:
//   LANES (Q4_1 Q5_0 Q5_1 Q8_0): 8 float lanes, lane l holding the integer dot of elements
//     4l..4l+3 of each block: acc[l] = fma(dw * dx, float(dot_l), acc[l]) block after block,
//     then hsum_float_8 ((l + l+4), then (0+2, 1+3), then 0+1), plus summs = fma(m, s, summs)
//     per block for the types with a min (s: q8_1's fp16 d * sum).
//   CHAIN (Q4_0, the repacked q4_0 kernels' order): acc = fma(float(dot of the block), dw * dx, acc).
// Q4_0 and Q5_0's offsets (-8, -16) enter the integer dot: dp4a of the unsigned codes, then
// dp4a of the offset bytes with x (exact ints, as the CPU's signed codes).
// Thread block 128 = 16 groups of 8 lanes; group g owns output (row, col) of a tile of 16/C
// weight rows x C activation rows, lane l owns float lane l. Every lane of a warp runs the same
// blocks (the shuffles need all 32), groups outside the matrix compute row/col 0 and store nothing.
// Where a block keeps its codes (qs) and 5th bits (qh, 0: none), the offset its codes carry,
// and whether the CPU sums it as one chain; size and min (Traits<T>::q8_1) are in Traits.
template <int T> struct Lanes32;
template <> struct Lanes32<T_Q4_0> { static constexpr int qs = 2, qh = 0, offset = 8; static constexpr bool chain = true; };
template <> struct Lanes32<T_Q4_1> { static constexpr int qs = 4, qh = 0, offset = 0; static constexpr bool chain = false; };
template <> struct Lanes32<T_Q5_0> { static constexpr int qs = 6, qh = 2, offset = 16; static constexpr bool chain = false; };
template <> struct Lanes32<T_Q5_1> { static constexpr int qs = 8, qh = 4, offset = 0; static constexpr bool chain = false; };
template <> struct Lanes32<T_Q8_0> { static constexpr int qs = 2, qh = 0, offset = 0; static constexpr bool chain = false; };

// Codes of elements 4l..4l+3 of a block, packed as dp4a wants them (unsigned nibbles or 5-bit
// values, Q8_0's int8): the same integers as unpack<T>'s q[l].
template <int T> HD int lane_codes(const u8* b, int l) {
    if (T == T_Q8_0) return (int)ld32(b + Lanes32<T>::qs + 4 * l);
    const u32 v = ld32(b + Lanes32<T>::qs + 4 * (l & 3));
    u32 q = l < 4 ? v & 0x0f0f0f0fu : (v >> 4) & 0x0f0f0f0fu;
    if (Lanes32<T>::qh) q |= spread4_bit4(ld32(b + Lanes32<T>::qh) >> (4 * l));
    return (int)q;
}

// Sum over the 8 lanes of a group in hsum_float_8's order (commutative adds: every lane of the
// group ends with lane 0's value).
__device__ __forceinline__ float group8_hsum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 4);
    v += __shfl_xor_sync(0xffffffffu, v, 2);
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v;
}
__device__ __forceinline__ int group8_isum(int v) {
    v += __shfl_xor_sync(0xffffffffu, v, 4);
    v += __shfl_xor_sync(0xffffffffu, v, 2);
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v;
}

template <int T, int C>
__device__ void mmq32(const u8* __restrict__ W, i64 row_bytes, int rows, int nb, int n,
                      const int* __restrict__ yq, const float4* __restrict__ yds, float* __restrict__ out) {
    using L = Lanes32<T>;
    const int g = threadIdx.x >> 3, l = threadIdx.x & 7;
    const int row = blockIdx.x * (16 / C) + g / C, col = blockIdx.y * C + g % C;
    const bool valid = row < rows && col < n;
    const u8* wrow = W + (i64)(valid ? row : 0) * row_bytes;
    const i64 x0 = (i64)(valid ? col : 0) * nb;  // the activation row's first block
    constexpr int offset_bytes = (int)(((0x100u - L::offset) & 0xffu) * 0x01010101u);  // -offset in each byte
    float acc = 0.0f, summs = 0.0f;
    for (int b = 0; b < nb; ++b) {
        const u8* blk = wrow + (i64)b * Traits<T>::bytes;
        const int a = yq[(x0 + b) * 8 + l];
        int dot = dp4a(lane_codes<T>(blk, l), a, 0);
        if (L::offset) dot = dp4a(offset_bytes, a, dot);
        const float4 ds = yds[x0 + b];
        const float dd = mul_rn(h2f(ld16(blk)), ds.x);
        if (L::chain) {
            acc = fma_rn((float)group8_isum(dot), dd, acc);
        } else {
            acc = fma_rn(dd, (float)dot, acc);
        }
        if (Traits<T>::q8_1) summs = fma_rn(h2f(ld16(blk + 2)), ds.w, summs);
    }
    if (!L::chain) acc = group8_hsum(acc);
    if (Traits<T>::q8_1) acc = acc + summs;
    if (valid && l == 0) out[(i64)col * rows + row] = acc;
}

// K-quants with more activation rows than the matrix-vector kernels take: the same tile, the
// 8-bit activation blocks of 32 and sub_dot of the decode kernels (the CPU's q8_K differs, as
// in decode), lane l of a group taking sub-blocks l, l+8, ... of the row.
template <int T, int C>
__device__ void mmq_k(const u8* __restrict__ W, i64 row_bytes, int rows, int nsub, int n,
                      const int* __restrict__ yq, const float4* __restrict__ yds, float* __restrict__ out) {
    constexpr int spb = Traits<T>::qk / 32;
    const int g = threadIdx.x >> 3, l = threadIdx.x & 7;
    const int row = blockIdx.x * (16 / C) + g / C, col = blockIdx.y * C + g % C;
    const bool valid = row < rows && col < n;
    const u8* wrow = W + (i64)(valid ? row : 0) * row_bytes;
    const i64 x0 = (i64)(valid ? col : 0) * nsub;
    float acc = 0.0f;
    for (int s = l; s < nsub; s += 8) {
        Sub u;
        unpack<T>(wrow + (i64)(s / spb) * Traits<T>::bytes, s % spb, u);
        const int4* yp = (const int4*)(yq + (x0 + s) * 8);
        const int4 p = yp[0], q = yp[1];
        const int y[8] = {p.x, p.y, p.z, p.w, q.x, q.y, q.z, q.w};
        const float4 ds = yds[x0 + s];
        acc += sub_dot(u, y, ds.x, ds.y, ds.z);
    }
    acc = group8_hsum(acc);
    if (valid && l == 0) out[(i64)col * rows + row] = acc;
}

// ---------------------------------------------------------------------------------------------
// prefill: W raw -> f16 (rows, cols) for cuBLAS; one thread per 32-element sub-block
// ---------------------------------------------------------------------------------------------
template <int T>
__device__ void dequant_f16(const u8* __restrict__ W, i64 row_bytes, int nsub, i64 total, u16* __restrict__ out) {
    const i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= total) return;
    constexpr int spb = Traits<T>::qk / 32;
    const i64 row = idx / nsub;
    const int s = (int)(idx % nsub);
    Sub u;
    unpack<T>(W + row * row_bytes + (i64)(s / spb) * Traits<T>::bytes, s % spb, u);
    u32 packed[16];
#pragma unroll
    for (int e = 0; e < 32; e += 2)
        packed[e / 2] = (u32)f2h(sub_value(u, e)) | ((u32)f2h(sub_value(u, e + 1)) << 16);
    uint4* dst = (uint4*)(out + idx * 32);  // 64-byte aligned: cols % 32 == 0
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        uint4 v;
        v.x = packed[4 * i];
        v.y = packed[4 * i + 1];
        v.z = packed[4 * i + 2];
        v.w = packed[4 * i + 3];
        dst[i] = v;
    }
}

// ---------------------------------------------------------------------------------------------
// the extern "C" entry points (instantiating every template, so `nvcc -c` checks them all)
// ---------------------------------------------------------------------------------------------
#define DEQUANT_KERNEL(NAME, T)                                                                    \
    extern "C" __global__ void __launch_bounds__(256) dequant_##NAME(                              \
        const u8* W, i64 rb, int nsub, i64 total, u16* out) { dequant_f16<T>(W, rb, nsub, total, out); }

// K-quants' decode (the 32-element block types decode through mmq_<type>_1/_4)
#define MMVQ_KERNELS(NAME, T)                                                                      \
    extern "C" __global__ void __launch_bounds__(128) mmvq_##NAME##_1(                             \
        const u8* W, i64 rb, int rows, int nsub, int ncols, const int* yq, const float4* yds,      \
        float* out) { mmvq<T, 1>(W, rb, rows, nsub, ncols, yq, yds, out); }                        \
    extern "C" __global__ void __launch_bounds__(128) mmvq_##NAME##_8(                             \
        const u8* W, i64 rb, int rows, int nsub, int ncols, const int* yq, const float4* yds,      \
        float* out) { mmvq<T, 8>(W, rb, rows, nsub, ncols, yq, yds, out); }

#define MMQ_KERNELS(NAME, T, IMPL)                                                                 \
    extern "C" __global__ void __launch_bounds__(128) mmq_##NAME##_1(                              \
        const u8* W, i64 rb, int rows, int nsub, int n, const int* yq, const float4* yds,          \
        float* out) { IMPL<T, 1>(W, rb, rows, nsub, n, yq, yds, out); }                            \
    extern "C" __global__ void __launch_bounds__(128) mmq_##NAME##_4(                              \
        const u8* W, i64 rb, int rows, int nsub, int n, const int* yq, const float4* yds,          \
        float* out) { IMPL<T, 4>(W, rb, rows, nsub, n, yq, yds, out); }

MMQ_KERNELS(q4_0, T_Q4_0, mmq32)
MMQ_KERNELS(q4_1, T_Q4_1, mmq32)
MMQ_KERNELS(q5_0, T_Q5_0, mmq32)
MMQ_KERNELS(q5_1, T_Q5_1, mmq32)
MMQ_KERNELS(q8_0, T_Q8_0, mmq32)
MMQ_KERNELS(q2_k, T_Q2_K, mmq_k)
MMQ_KERNELS(q3_k, T_Q3_K, mmq_k)
MMQ_KERNELS(q4_k, T_Q4_K, mmq_k)
MMQ_KERNELS(q5_k, T_Q5_K, mmq_k)
MMQ_KERNELS(q6_k, T_Q6_K, mmq_k)

DEQUANT_KERNEL(q4_0, T_Q4_0)
DEQUANT_KERNEL(q4_1, T_Q4_1)
DEQUANT_KERNEL(q5_0, T_Q5_0)
DEQUANT_KERNEL(q5_1, T_Q5_1)
DEQUANT_KERNEL(q8_0, T_Q8_0)
DEQUANT_KERNEL(q2_k, T_Q2_K)
DEQUANT_KERNEL(q3_k, T_Q3_K)
DEQUANT_KERNEL(q4_k, T_Q4_K)
DEQUANT_KERNEL(q5_k, T_Q5_K)
DEQUANT_KERNEL(q6_k, T_Q6_K)

MMVQ_KERNELS(q2_k, T_Q2_K)
MMVQ_KERNELS(q3_k, T_Q3_K)
MMVQ_KERNELS(q4_k, T_Q4_K)
MMVQ_KERNELS(q5_k, T_Q5_K)
MMVQ_KERNELS(q6_k, T_Q6_K)

#define FLOAT_KERNELS(NAME, T)                                                                     \
    extern "C" __global__ void __launch_bounds__(128) mv_##NAME##_1(                               \
        const u8* W, i64 rb, int rows, int cols, int ncols, const float* x, float* out) {          \
        mv_float<T, 1>(W, rb, rows, cols, ncols, x, out);                                          \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(128) mv_##NAME##_8(                               \
        const u8* W, i64 rb, int rows, int cols, int ncols, const float* x, float* out) {          \
        mv_float<T, 8>(W, rb, rows, cols, ncols, x, out);                                          \
    }

FLOAT_KERNELS(f32, T_F32)
FLOAT_KERNELS(f16, T_F16)
FLOAT_KERNELS(bf16, T_BF16)

// BF16 (rows, cols) -> f16 for the prefill GEMM (bf16 weights outside f16's range become inf,
// which real checkpoints do not have).
extern "C" __global__ void __launch_bounds__(256)
bf16_to_f16(const u16* __restrict__ src, u16* __restrict__ dst, i64 n) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dst[i] = f2h(bf2f(src[i]));
}

// KV cache store: rows (n, width) f32 -> cache rows pos0.. f16, round to nearest even.
// pos0 = *pos, read on the device (a CUDA graph replays the launch at every position);
// count = n * width.
extern "C" __global__ void __launch_bounds__(256)
store_f16(const float* __restrict__ src, u16* __restrict__ cache, const int* __restrict__ pos, i64 width,
          i64 count) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < count) cache[(i64)*pos * width + i] = f2h(src[i]);
}

// ---------------------------------------------------------------------------------------------
// RMSNorm: out[i, :] = (x[i, :] * 1/sqrt(mean(x^2) + eps)) * w; one block per row.
// ggml squares in float, sums in double and forms the scale in float; so do we.
// ---------------------------------------------------------------------------------------------
extern "C" __global__ void __launch_bounds__(256)
rms_norm(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ out, int k, float eps) {
    __shared__ double red[32];
    const float* xr = x + (i64)blockIdx.x * k;
    float* orow = out + (i64)blockIdx.x * k;
    double acc = 0.0;
    for (int j = threadIdx.x; j < k; j += blockDim.x) acc += (double)__fmul_rn(xr[j], xr[j]);
    acc = block_sum_d(acc, red);
    const float mean = (float)(acc / (double)k);
    const float scale = 1.0f / sqrtf(mean + eps);
    for (int j = threadIdx.x; j < k; j += blockDim.x) orow[j] = (xr[j] * scale) * w[j];
}

// ---------------------------------------------------------------------------------------------
// rope, in place on x (n, heads, head_dim), positions pos0..pos0+n-1 with pos0 = *pos (read on
// the device, so a CUDA graph replays the launch at every position); one thread per pair.
// cos/sin (n_ctx, half) are the CPU backend's table (ggml's angles, libm's cosf/sinf), and the
// rotation rounds like ggml's compiled loop, so the result is the CPU's bit for bit.
// ---------------------------------------------------------------------------------------------
extern "C" __global__ void __launch_bounds__(256)
rope(float* __restrict__ x, int n, int heads, int head_dim, int half, const int* __restrict__ pos,
     const float* __restrict__ cos_table, const float* __restrict__ sin_table, int neox) {
    const i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (i64)n * heads * half) return;
    const int i = (int)(idx % half);
    const i64 th = idx / half;  // t * heads + h
    const i64 p = *pos + th / heads;
    const float cs = cos_table[p * half + i], sn = sin_table[p * half + i];
    float* row = x + th * head_dim;
    const int a = neox ? i : 2 * i, b = neox ? i + half : 2 * i + 1;
    const float x0 = row[a], x1 = row[b];
    row[a] = __fmaf_rn(x0, cs, -__fmul_rn(x1, sn));
    row[b] = __fmaf_rn(x0, sn, __fmul_rn(x1, cs));
}

// ---------------------------------------------------------------------------------------------
// gated FFN activation: out = act(gate) * up over rows of k. act 0: SiLU as ggml's CPU
// (its ISA's ggml_v_expf on the SIMD part of a row, libm-like expf on its tail); act 1: GELU(tanh)
// through ggml's f16 table (the CPU backend's table, so the values match bit for bit).
// ---------------------------------------------------------------------------------------------
// The range reduction and polynomial that ggml_v_expf shares across ISAs (ARM
// optimized-routines expf, ggml-cpu/vec.h), for one lane: x = n ln2 + b, *n_out = n, and
// b + b^2 p(b) (plus 1 where `with_one`: the AVX-512 variant folds it into the last FMA).
HD float expf_poly(float x, float* n_out, bool with_one) {
    const float shift = 12582912.0f;  // 0x1.8p23: adding it rounds to an integer
    const float n = fma_rn(x, 0x1.715476p+0f, shift) - shift;
    const float b = fma_rn(-n, 0x1.7f7d1cp-20f, fma_rn(-n, 0x1.62e4p-1f, x));
    const float u = mul_rn(b, b);
    const float c1b = with_one ? fma_rn(0x1.ffffecp-1f, b, 1.0f) : mul_rn(0x1.ffffecp-1f, b);
    *n_out = n;
    return fma_rn(fma_rn(fma_rn(0x1.0e4020p-7f, b, 0x1.573e2ep-5f), u,
                         fma_rn(0x1.555e66p-3f, b, 0x1.fffdb6p-2f)),
                  u, c1b);
}

// ggml_v_expf as the AVX-512 build runs it: same FMAs, same polynomial, so the same bits as the
// CPU's SIMD SiLU. |x| < ~87 gives the fast path.
HD float ggml_v_expf(float x) {
    float n;
    const float j = expf_poly(x, &n, true);
    if (fabsf(n) > 126.0f) return n < 0.0f ? 0.0f : pow2i(128);  // 2^128: +inf
    return mul_rn(j, pow2i((int)n));
}

// ggml_v_expf's AVX2 variant (backends/cpu.py's _v_expf with avx2): the 1 stays out of the
// polynomial and fma(j, 2^n, 2^n) rounds once; 126 < |n| <= 192 rescales in two steps.
HD float ggml_v_expf_avx2(float x) {
    float n;
    const float j = expf_poly(x, &n, false);
    if (fabsf(n) > 192.0f) return n <= 0.0f ? 0.0f : pow2i(128);
    if (fabsf(n) <= 126.0f) {
        const float k = pow2i((int)n);
        return fma_rn(j, k, k);
    }
    const float s1 = n <= 0.0f ? pow2i(-125) : pow2i(127);
    const float s2 = n <= 0.0f ? pow2i((int)n + 125) : pow2i((int)n - 127);
    return mul_rn(fma_rn(s2, j, s2), s1);
}

// ggml_v_expf as a CPU with `lanes`-wide float SIMD runs it (8: AVX2, 16: AVX-512).
HD float ggml_v_expf_lanes(float x, int lanes) {
    return lanes == 8 ? ggml_v_expf_avx2(x) : ggml_v_expf(x);
}

// ggml_vec_swiglu_f32 for element `col` of a row of k, as a CPU with `lanes`-wide float SIMD
// (16: AVX-512, 8: AVX2) computes it: the first k - k%lanes columns use that ISA's
// ggml_v_expf, the tail expf; silu(g) * u with one rounding per op.
HD float swiglu_value(float g, float u, int col, int k, int lanes) {
    const float e = col >= k - k % lanes ? expf(-g) : ggml_v_expf_lanes(-g, lanes);
    return mul_rn(g / (1.0f + e), u);
}

extern "C" __global__ void __launch_bounds__(256)
glu(const float* __restrict__ gate, const float* __restrict__ up, float* __restrict__ out, i64 n,
    int k, int act, const float* __restrict__ gelu_table, int lanes) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float g = gate[i], u = up[i];
    float y;
    if (act == 0) {
        y = swiglu_value(g, u, (int)(i % k), k, lanes);
    } else if (g <= -10.0f) {
        y = 0.0f;
    } else if (g >= 10.0f) {
        y = g * u;
    } else {
        y = gelu_table[f2h(g)] * u;
    }
    out[i] = y;
}

// ---------------------------------------------------------------------------------------------
// attention in the CPU's arithmetic: llama.cpp's non-flash path as backends/cpu.py reproduces it
// ---------------------------------------------------------------------------------------------
// One block (128 threads) per (head, query row). q (n, n_heads, dk) f32; caches (n_ctx, n_kv*d)
// f16; scores (n, n_heads, n_keys_max) f32 scratch; out (n, n_heads, dv). pos0 = *pos is read on
// the device (a CUDA graph replays the launch at every position; n_keys_max then covers the
// whole cache or window). Query t at position p = pos0+t sees the keys lo..p, lo = max(0,
// p - window + 1) under a sliding window. softcap > 0 (gemma2): a raw score s becomes
// (tanhf(s * (1/softcap)) * softcap) * scale (the CPU's tanhf may differ from CUDA's).
//
// The CPU sums in the float order of ggml's L-lane SIMD (L = lanes: 16 for AVX-512, 8 for AVX2),
// and SmolLM2-class models carry a one-ulp difference into a different argmax, so this kernel
// keeps that order, with L consecutive threads standing for the L lanes of a vector register:
// - Q.K: q rounded to f16; lane i sums dims i, i+L, ... With several query rows (batched,
//   llamafile's tinyBLAS) and L | dk: one accumulator, folded by halving. Otherwise
//   (ggml_vec_dot_f16): four accumulators fed round-robin over steps of L dims, folded
//   (0+2)+(1+3), then halving (L = 16) or AVX2's ((0+4)+(1+5))+((2+6)+(3+7)); the dims past
//   the last 4L are scalar products added in double.
// - softmax (ggml_soft_max): exp is ggml_v_expf of the CPU's ISA; the sum takes L-lane chunks of
//   positions (aligned on position 0, lanes outside lo..p zero), each folded by halving, and adds
//   the chunks in order in double; probabilities are exp * float(1/sum), rounded to f16.
// - P.V: lane i sums the keys at positions = i mod L, in order, into one accumulator (batched)
//   or four (round-robin over steps of L positions), folded as Q.K.
// Dynamic shared memory: (80 + dk) floats.

// A raw Q.K score as softmax sees it: llama.cpp's graph order, one rounding per op (no FMA
// contraction): with a soft-cap, s * (1/cap) -> tanhf -> * cap -> * scale; else s * scale.
HD float capped_score(float s, float scale, float softcap) {
    if (softcap <= 0.0f) return mul_rn(s, scale);
    return mul_rn(mul_rn(tanhf(mul_rn(s, 1.0f / softcap)), softcap), scale);
}

// Fold of a value held by each of the L consecutive threads of a group (L = 8 or 16): halving
// (lane i + lane i + L/2, ...), or with avx2_order AVX2's hadd pattern for 8 lanes. Every
// thread of the warp must call it; lane 0 of the group gets the result.
__device__ __forceinline__ float lanes_fold(float v, int L, bool avx2_order) {
    if (avx2_order) {  // a = 0+4, c = 1+5, d = 2+6, e = 3+7; (a + c) + (d + e)
        v += __shfl_xor_sync(0xffffffffu, v, 4);
        v += __shfl_xor_sync(0xffffffffu, v, 1);
        return v + __shfl_xor_sync(0xffffffffu, v, 2);
    }
    for (int w = L >> 1; w > 0; w >>= 1) v += __shfl_xor_sync(0xffffffffu, v, w);
    return v;
}

// Four round-robin accumulators folded as ggml_vec_dot_f16 / GGML_F32_VEC_REDUCE.
__device__ __forceinline__ float vec_fold(float a0, float a1, float a2, float a3, int L) {
    return lanes_fold((a0 + a2) + (a1 + a3), L, L == 8);
}

// Accumulator `a` (0..3) of four kept in registers (no local-memory array): acc[a] = fma(x, y, acc[a]).
__device__ __forceinline__ void fma_into(int a, float x, float y, float& a0, float& a1, float& a2, float& a3) {
    if (a == 0) a0 = fma_rn(x, y, a0);
    else if (a == 1) a1 = fma_rn(x, y, a1);
    else if (a == 2) a2 = fma_rn(x, y, a2);
    else a3 = fma_rn(x, y, a3);
}

extern "C" __global__ void __launch_bounds__(128)
attn_ggml(const float* __restrict__ q, const u16* __restrict__ kc, const u16* __restrict__ vc,
          float* __restrict__ scores, float* __restrict__ out, int n_heads, int n_kv, int dk, int dv,
          const int* __restrict__ pos, int window, float scale, int n_keys_max, float softcap,
          int lanes, int batched) {
    extern __shared__ float sh[];
    const int h = blockIdx.x, t = blockIdx.y;
    const int tid = threadIdx.x, L = lanes, lane = tid % L, group = tid / L, n_groups = blockDim.x / L;
    const int g = h / (n_heads / n_kv);
    const int p = *pos + t;
    const int lo = window > 0 ? imax(0, p - window + 1) : 0;
    const int nk = p + 1 - lo;
    float* red = sh;           // 64 floats (32 doubles), offset 0: 8-byte aligned
    float* parts = sh + 64;    // one chunk sum per group (<= 16)
    float* qs = sh + 80;       // dk
    const i64 kstride = (i64)n_kv * dk, vstride = (i64)n_kv * dv;
    const i64 th = (i64)t * n_heads + h;
    const u16* kbase = kc + (i64)lo * kstride + (i64)g * dk;
    const u16* vbase = vc + (i64)lo * vstride + (i64)g * dv;
    float* s = scores + th * n_keys_max;

    for (int d = tid; d < dk; d += blockDim.x) qs[d] = round_f16(q[th * dk + d]);
    __syncthreads();

    // 1. scores: a group of L threads per key (all groups run the same rounds: shuffles)
    const bool one_acc = batched && dk % L == 0;  // tinyBLAS
    const int body = one_acc ? dk : dk - dk % (4 * L);
    for (int j0 = 0; j0 < nk; j0 += n_groups) {
        const int j = j0 + group;
        const u16* kr = kbase + (i64)imin(j, nk - 1) * kstride;
        float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f, v;
        if (one_acc) {
            for (int c = 0; c < dk; c += L) a0 = fma_rn(qs[c + lane], h2f(kr[c + lane]), a0);
            v = lanes_fold(a0, L, false);
        } else {
            for (int c = 0; c < body; c += 4 * L) {
                a0 = fma_rn(qs[c + lane], h2f(kr[c + lane]), a0);
                a1 = fma_rn(qs[c + L + lane], h2f(kr[c + L + lane]), a1);
                a2 = fma_rn(qs[c + 2 * L + lane], h2f(kr[c + 2 * L + lane]), a2);
                a3 = fma_rn(qs[c + 3 * L + lane], h2f(kr[c + 3 * L + lane]), a3);
            }
            v = vec_fold(a0, a1, a2, a3, L);
        }
        if (lane == 0 && j < nk) {
            double total = (double)v;
            for (int d = body; d < dk; ++d) total += (double)mul_rn(qs[d], h2f(kr[d]));
            s[j] = capped_score((float)total, scale, softcap);
        }
    }
    __syncthreads();

    // 2. softmax
    float m = neg_inf();
    for (int j = tid; j < nk; j += blockDim.x) m = fmaxf(m, s[j]);
    m = block_max(m, red);
    for (int j = tid; j < nk; j += blockDim.x) {
        const float x = s[j] - m;
        s[j] = ggml_v_expf_lanes(x, L);
    }
    __syncthreads();
    const int first = lo - lo % L;  // chunk c holds positions first + c*L .. + L-1
    const int n_chunks = (p + 1 - first + L - 1) / L;
    double sum = 0.0;  // thread 0's: the chunks in order
    for (int c0 = 0; c0 < n_chunks; c0 += n_groups) {
        const int j = first + (c0 + group) * L + lane - lo;  // key index of this lane's position
        const float x = (j >= 0 && j < nk) ? s[j] : 0.0f;
        const float chunk = lanes_fold(x, L, false);
        if (lane == 0) parts[group] = chunk;
        __syncthreads();
        if (tid == 0)
            for (int c = c0; c < imin(n_chunks, c0 + n_groups); ++c) sum += (double)parts[c - c0];
        __syncthreads();
    }
    if (tid == 0) red[0] = (float)(1.0 / sum);
    __syncthreads();
    const float inv = red[0];
    for (int j = tid; j < nk; j += blockDim.x) s[j] = round_f16(mul_rn(s[j], inv));
    __syncthreads();

    // 3. P.V: a group of L threads per output value, lane i over the positions = i mod L
    const int j_first = ((lane - lo) % L + L) % L;  // first key whose position is = lane mod L
    for (int d0 = 0; d0 < dv; d0 += n_groups) {
        const int d = imin(d0 + group, dv - 1);
        float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
        for (int j = j_first; j < nk; j += L) {
            const int a = batched ? 0 : ((lo + j) % (4 * L)) / L;
            fma_into(a, h2f(vbase[(i64)j * vstride + d]), s[j], a0, a1, a2, a3);
        }
        const float v = batched ? lanes_fold(a0, L, false) : vec_fold(a0, a1, a2, a3, L);
        if (lane == 0 && d0 + group < dv) out[th * dv + d] = v;
    }
}
