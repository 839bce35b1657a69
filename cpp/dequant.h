// Dequantization of GGML rows to float32, bit-equal to gguf.quants.dequantize (same
// per-element operation order; see dequant.cpp).
#pragma once

#include <cstdint>

namespace hl {

// One row: `cols` elements (a multiple of the type's block size) from `src` (row bytes) to dst.
// Unsupported types are the caller's responsibility (check with type_info first).
void dequantize_row(int type, const uint8_t* src, float* dst, int64_t cols);

// rows x cols tensor, rows `row_stride` bytes apart, into dst[rows][cols]. Uses OpenMP over rows
// when the tensor is large enough for threads to pay off.
void dequantize_rows(int type, const uint8_t* src, int64_t row_stride, int64_t rows, int64_t cols,
                     float* dst, int n_threads);

// out[k][cols] = dequantized row ids[k] of the rows x cols tensor at src. ids must be in range.
void get_rows(int type, const uint8_t* src, int64_t rows, int64_t cols, const int64_t* ids,
              int64_t k, float* out, int n_threads);

}  // namespace hl
