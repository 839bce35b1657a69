// Activation quantizers and per-type row kernels (integer dot products), llama.cpp CPU style:
// the activations are quantized once per matmul to the weight type's partner format, then each
// weight row is dotted with a few activation rows at a time.
//
// Partner formats (our own SoA layout; one QActs holds n activation rows):
//   ACT_F32   F32 / F16 / BF16 weights: the float activations themselves.
//   ACT_Q8_32 Q8_0, and Q4_0 Q5_0 Q5_1 on the scalar path ("Q8_0"/"Q8_1"): blocks of 32
//             int8 with a float scale d rounded to fp16 (as llama.cpp's quantize_row_q8_0 stores
//             it) and s = d * sum(q) (the block sum that the min / offset terms need).
//   ACT_Q8_32P Q4_0 Q4_1 Q5_0 Q5_1 on the AVX2 path: the same blocks, with the codes stored in
//             pairs laid out the way a pair of 4/5-bit weight blocks unpacks into two registers
//             (so one 256-bit op handles two blocks) and the scales in groups of 8 blocks (so one
//             op scales 4 blocks). Per pair p of blocks (A, B) = (2p, 2p + 1):
//               qs[64 p ..]: A[0:16] B[0:16] A[16:32] B[16:32]   (B = zeros past the last block)
//             Per group g of blocks 8g .. 8g + 7:
//               ds[16 g ..]: d0 s0 d1 s1 ... d7 s7   (float; s = d * sum(q); zeros past the end)
//             qs holds 4 pairs per group (zero padded), i.e. q8p_groups(cols) * 256 bytes a row.
//   ACT_Q8_1  Q4_1 (both paths): the ACT_Q8_32 layout, rounded exactly as llama.cpp's
//             quantize_row_q8_1: d = fp16(amax / 127), s = fp16(d_f32 * sum(q)) with the unrounded
//             d_f32 (both stored as floats holding half values). The Q4_1 kernels follow
//             ggml_vec_dot_q4_1_q8_1's AVX2 arithmetic order, so results match llama.cpp bit for bit.
//   ACT_Q8_K  K-quants ("Q8_K"): blocks of 256 int8 with a float scale d and the int16 sums of
//             each 16-element group (bsums), for the per-16 mins / offsets.
#pragma once

#include <cstddef>
#include <cstdint>

namespace hl {

enum ActKind : int { ACT_F32 = 0, ACT_Q8_32 = 1, ACT_Q8_K = 2, ACT_Q8_32P = 3, ACT_Q8_1 = 4 };

// Partner activation format of a weight type (type must be supported) for the SIMD kernels
// (simd = true, where the build has them) or the scalar ones.
int act_kind_for(int type, bool simd);

// Groups of 8 32-blocks (4 pairs) in a row of the ACT_Q8_32P layout.
inline int64_t q8p_groups(int64_t cols) { return (cols / 32 + 7) / 8; }

struct QActs {
    int kind = ACT_F32;
    int64_t n = 0, cols = 0;
    const float* xf = nullptr;         // ACT_F32: [n][ld]
    int64_t ld = 0;                    // ACT_F32: row stride of xf in floats (>= cols)
    const int8_t* qs = nullptr;        // quantized: [n][cols] (ACT_Q8_32P: [n][256 groups])
    const float* d = nullptr;          // ACT_Q8_32 / ACT_Q8_1: [n][cols/32]; ACT_Q8_K: [n][cols/256];
                                       // ACT_Q8_32P: ds [n][16 groups]
    const float* s = nullptr;          // ACT_Q8_32 / ACT_Q8_1: [n][cols/32], d * sum(q)
    const int16_t* bsums = nullptr;    // ACT_Q8_K: [n][cols/16]
};

// Bytes of scratch that quantized activations of this kind and size need (0 for ACT_F32).
size_t acts_bytes(int kind, int64_t n, int64_t cols);

// Lays out a QActs over `buf` (64-byte aligned, acts_bytes long; unused for ACT_F32, where the
// activations `x` [n][cols] are used in place).
QActs acts_layout(int kind, int64_t n, int64_t cols, void* buf, const float* x);

// Quantizes activation rows [r0, r1) of x [n][cols] into a (laid out by acts_layout).
void quantize_acts_rows(const QActs& a, const float* x, int64_t r0, int64_t r1);

// A row kernel computes NA dot products of one weight row w (row bytes) with activation rows
// a0 .. a0 + NA - 1:  out[i * out_stride] = sum_c W[c] * x[a0 + i][c].
using RowKernel = void (*)(int64_t cols, const uint8_t* w, const QActs& a, int64_t a0,
                           float* out, int64_t out_stride);

constexpr int MAX_NA = 4;  // activation rows per kernel call (register tile height)

// Kernel for `type` computing na (1..MAX_NA) rows against activations of kind `act_kind`: the
// SIMD one when the build has it for that pair, else the scalar one; nullptr when there is none
// (unsupported type, or a kind that does not partner the type).
RowKernel get_kernel(int type, int na, int act_kind);

// Table entries filled by vecdot_avx2.cpp / vecdot_scalar.cpp (nullptr where they have none).
RowKernel get_kernel_scalar(int type, int na, int act_kind);
RowKernel get_kernel_avx2(int type, int na, int act_kind);

// Whether this build has SIMD kernels at all.
bool have_simd_kernels();

// Name of the compiled SIMD path, e.g. "avx2+fma+f16c+avx512vnni" or "scalar".
const char* simd_path_compiled();

}  // namespace hl
