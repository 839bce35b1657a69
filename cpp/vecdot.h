// Activation quantizers and per-type row kernels (integer dot products), llama.cpp CPU style:
// the activations are quantized once per matmul to the weight type's partner format, then each
// weight row is dotted with a few activation rows at a time.
//
// Partner formats (our own SoA layout; one QActs holds n activation rows). Each is rounded exactly
// as llama.cpp quantizes activations for that weight type, and the SIMD kernels follow the
// arithmetic order of the llama.cpp kernel this CPU would run (ggml vec_dot, llamafile tinyBLAS
// or the repacked q4_0 / q4_K 8x8 kernels), so the products match llama.cpp bit for bit:
//   ACT_F32   F32 / F16 / BF16 weights: the float activations themselves.
//   ACT_Q8_32 Q4_0 Q5_0 Q8_0 ("Q8_0"): blocks of 32 int8 with the scale d = fp16(amax / 127)
//             (stored as a float holding a half value) and s = d * sum(q), for the scalar path.
//   ACT_Q8_1  Q4_1 Q5_1 ("Q8_1"): the same layout, rounded as quantize_row_q8_1:
//             d = fp16(amax / 127), s = fp16(d_f32 * sum(q)) with the unrounded d_f32.
//   ACT_Q8_K  K-quants ("Q8_K"): blocks of 256 int8 with a float scale d = 1 / (127 / amax) and
//             the int16 sums of each 16-element group (bsums), for the per-16 mins / offsets.
#pragma once

#include <cstddef>
#include <cstdint>

namespace hl {

enum ActKind : int { ACT_F32 = 0, ACT_Q8_32 = 1, ACT_Q8_K = 2, ACT_Q8_1 = 3 };

// Partner activation format of a weight type (type must be supported); the same for the SIMD
// and the scalar kernels.
int act_kind_for(int type);

struct QActs {
    int kind = ACT_F32;
    int64_t n = 0, cols = 0;
    // Activation rows of the llama.cpp call whose arithmetic the kernels copy (its ne11): the
    // ggml_gemm groups of Q4_K, the tiled K-quant and tinyBLAS float paths are chosen from it.
    // acts_layout sets it to n; 1 makes every row compute as a one-row call (decode rows of
    // several sequences in one panel, each as if alone: the engine's batch invariance).
    int64_t n_call = 0;
    const float* xf = nullptr;         // ACT_F32: [n][ld]
    int64_t ld = 0;                    // ACT_F32: row stride of xf in floats (>= cols)
    const int8_t* qs = nullptr;        // quantized: [n][cols]
    const float* d = nullptr;          // ACT_Q8_32 / ACT_Q8_1: [n][cols/32]; ACT_Q8_K: [n][cols/256]
    const float* s = nullptr;          // ACT_Q8_32 / ACT_Q8_1: [n][cols/32], d * sum(q)
    const int16_t* bsums = nullptr;    // ACT_Q8_K: [n][cols/16]
    // Copies laid out for the batch tiles, which read MAX_NA rows' values of one block at once:
    const float* d_t = nullptr;        // d transposed, [nb][n] (nb: blocks per row of the kind)
    const float* s_t = nullptr;        // ACT_Q8_1: s transposed, [cols/32][n]
    // ACT_Q8_1: d * kFloatMagic, [n][cols/32] (exact: d is a half value), for the 512-bit Q4_1
    // tile's float(lanes) * d in one fmsub from lanes started at kFloatMagicBits.
    const float* d_magic = nullptr;
    // ACT_Q8_32: -16 * (sum of codes 4l .. 4l + 3) in int32 lane l of each block, [n][cols/4]:
    // the start value of Q5_0's unsigned-code dot (q - 16 folded in), once per matmul instead of
    // once per weight-row pair.
    const int32_t* q5_start = nullptr;
    // ACT_Q8_32: -128 * the same sums + kFloatMagicBits, [n][cols/4]: the start value of Q8_0's
    // codes + 128 (the unsigned operand of the 512-bit tile), lanes then converted by subtraction.
    const int32_t* q8_start = nullptr;
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

// A matvec kernel dots MATVEC_NR consecutive weight rows (w, w + row bytes, ...) with the one
// activation row a0: out[r] = sum_c W_r[c] * x[a0][c]. Each output is still one float chain in
// llama.cpp's order; running several rows' chains side by side hides the FMA latency that would
// otherwise bound the memory-bound n = 1 product.
using MatvecKernel = void (*)(int64_t cols, const uint8_t* w, const QActs& a, int64_t a0,
                              float* out);

constexpr int MATVEC_NR = 4;

// A tile kernel dots TILE_NW consecutive weight rows (w, w + rb) with MAX_NA activation rows
// a0 ..: out[i * out_stride + r] for row r < TILE_NW, activation i < MAX_NA. The register tile of
// batches: each activation block is loaded once for TILE_NW rows; every output keeps the
// arithmetic of the row kernel.
using TileKernel = void (*)(int64_t cols, const uint8_t* w, int64_t rb, const QActs& a, int64_t a0,
                            float* out, int64_t out_stride);

constexpr int TILE_NW = 2;

// The wide tile: TILE_NW weight rows x WIDE_NA activation rows (the same TileKernel signature),
// for batches of 8+ rows where the weight decode shared by MAX_NA rows is still a large share.
constexpr int WIDE_NA = 8;

// The widest tile: TILE_NW weight rows x WIDEST_NA activation rows (AVX-512 builds), so that a
// server step's 16 decode rows share each decoded weight block (and its scales) in one pass.
constexpr int WIDEST_NA = 16;

// Int32 lanes started at the bits of the float 1.5 * 2^23 end as the bits of 12582912 + x for
// any dot x with |x| < 2^22 (a block's lane sums of four int8 products are below 2^16), so
// float(x) is one subtraction of 12582912: exactly what the int-to-float convert gives, on
// either 512-bit port where the convert has only one (the 512-bit tile's lanes start there).
constexpr int32_t kFloatMagicBits = 0x4B400000;
constexpr float kFloatMagic = 12582912.0f;

// The SIMD tile kernel for `type` against `act_kind`, or nullptr (use the row kernels).
TileKernel get_tile_kernel(int type, int act_kind);
TileKernel get_tile_kernel_avx2(int type, int act_kind);

// The SIMD wide tile kernel, or nullptr (the AVX2 build and the formats without one).
TileKernel get_wide_tile_kernel(int type, int act_kind);
TileKernel get_wide_tile_kernel_avx2(int type, int act_kind);
TileKernel get_widest_tile_kernel(int type, int act_kind);
TileKernel get_widest_tile_kernel_avx2(int type, int act_kind);
// The widest tile over 2 * TILE_NW weight rows (same signature, out[i * out_stride + r] for
// r < 2 * TILE_NW), for the formats whose loads bound the pair tile; nullptr for the others.
TileKernel get_widest_quad_tile_kernel(int type, int act_kind);
TileKernel get_widest_quad_tile_kernel_avx2(int type, int act_kind);

// The SIMD matvec kernel for `type` against `act_kind`, or nullptr (use the row kernels).
MatvecKernel get_matvec_kernel(int type, int act_kind);

// Kernel for `type` computing na (1..MAX_NA) rows against activations of kind `act_kind`: the
// SIMD one when the build has it for that pair, else the scalar one; nullptr when there is none
// (unsupported type, or a kind that does not partner the type).
RowKernel get_kernel(int type, int na, int act_kind);

// Table entries filled by vecdot_avx2.cpp / vecdot_scalar.cpp (nullptr where they have none).
RowKernel get_kernel_scalar(int type, int na, int act_kind);
RowKernel get_kernel_avx2(int type, int na, int act_kind);
MatvecKernel get_matvec_kernel_avx2(int type, int act_kind);

// Float lanes of ggml's SIMD vectors (GGML_F32_EPR) in a llama.cpp built for the ISA this core
// is built for: 16 with AVX-512F, else 8. Every float summation order we copy depends on it.
constexpr int float_lanes() {
#if defined(__AVX512F__)
    return 16;
#else
    return 8;
#endif
}

// Whether this build has SIMD kernels at all.
bool have_simd_kernels();

// Name of the compiled SIMD path, e.g. "avx2+fma+f16c+avx512vnni" or "scalar".
const char* simd_path_compiled();

}  // namespace hl
