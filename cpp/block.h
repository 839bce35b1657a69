// _core.Block: one transformer block (every layout of config.ARCHITECTURES) forward per call, the CPU decode
// hot path. Same constructor, forward and caches as hybridllm.model.PyBlock, and the same
// numerics as PyBlock on backends/cpu.py (which follow llama.cpp's CPU path bit for bit outside
// the quantized matmuls; the matmuls are the same _core kernels).
//
//   blk = Block(cfg: dict, weights: dict, n_ctx: int)   # dicts as model.block_cfg / block_weights
//   blk.forward(x: float32 [n, dim] C-contiguous, updated in place, pos0: int, n_threads: int = 0)
//   blk.k_cache, blk.v_cache: float16 [n_ctx, n_kv_heads * head_dim] views (zero-copy, writable)
#pragma once

#include <pybind11/pybind11.h>

namespace hl {

// Adds the Block class to the module (called once from bindings.cpp).
void register_block(pybind11::module_& m);

}  // namespace hl
