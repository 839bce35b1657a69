// Quantized matrix multiplication out = x @ W.T on raw GGML rows, for Python (bindings.cpp) and
// for C++ callers such as a transformer-block forward.
//
// Shapes: W rows x cols (each row = row_bytes(type, cols) bytes, rows contiguous), x [n][cols]
// float32 row-major, out [n][rows] float32 row-major.
#pragma once

#include <cstdint>

#include "vecdot.h"

namespace hl {

// Full matmul: quantizes x once to the partner format (scratch owned by the calling thread) and
// runs an OpenMP team of n_threads over tiles of weight rows x activation rows.
// Preconditions (checked by callers): type supported, cols a multiple of its block size.
// rows_alone: every activation row gets the arithmetic of a one-row call (QActs::n_call = 1),
// so row i of the result does not depend on the other rows (the rows of several sequences).
void matmul(const uint8_t* w, int type, int64_t rows, int64_t cols, const float* x, int64_t n,
            float* out, int n_threads, bool rows_alone = false);

// Pieces of the same, for a caller that quantizes one activation set and multiplies it by several
// weight matrices (Q, K and V of one input), or runs inside its own parallel region:
//
// quantize_acts: quantizes x [n][cols] for `type` into the calling thread's scratch slot `slot`
// (0..3; a slot's QActs stay valid until that slot is reused by the same thread). Single-threaded.
QActs quantize_acts(int type, const float* x, int64_t n, int64_t cols, int slot = 0);

// matmul_acts: out = acts @ W.T with an OpenMP team (as matmul, activations already quantized).
void matmul_acts(const uint8_t* w, int type, int64_t rows, const QActs& acts, float* out,
                 int n_threads);

// matmul_rows: weight rows [r0, r1) only, in the calling thread (no OpenMP):
// out[i * out_stride + r] for every activation row i and r0 <= r < r1.
void matmul_rows(const uint8_t* w, int type, int64_t r0, int64_t r1, const QActs& acts, float* out,
                 int64_t out_stride);

// Uses the portable scalar kernels even where AVX2 kernels exist (tests, debugging).
void set_force_scalar(bool on);
bool force_scalar();

// Physical cores available to this process (distinct core ids among the CPUs in its affinity
// mask; falls back to the affinity count).
int physical_cores();

// Streaming read of n bytes with n_threads threads, returning a checksum (so the loads cannot be
// optimised away): the machine's read bandwidth reference for the benchmark.
uint64_t stream_read(const uint8_t* p, int64_t n, int n_threads);

}  // namespace hl
