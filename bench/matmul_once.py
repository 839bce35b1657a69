"""One quantized matmul, timed: best of REPS calls, in GFLOP/s, with a checksum of the result.

For A/B runs of two builds of the C++ core on one shape (HYBRIDLLM_CORE selects the build):

    python bench/matmul_once.py Q5_0 2048 640 512 40          # type rows cols n reps [threads]
    HYBRIDLLM_CORE=/path/to/_core...so python bench/matmul_once.py Q5_0 2048 640 512 40

Weights are random codes with small finite f16 scales at the start of each block (the min of
Q4_1 / Q5_1 / Q6_K's scale stay random, so those checksums may be nan; the time does not care).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gguf import GGMLQuantizationType  # noqa: E402
from gguf.constants import GGML_QUANT_SIZES  # noqa: E402

from hybridllm import kernels  # noqa: E402


def main() -> None:
    name, rows, cols, n, reps = sys.argv[1], *map(int, sys.argv[2:6])
    threads = int(sys.argv[6]) if len(sys.argv) > 6 else 1
    qtype = GGMLQuantizationType[name]
    block, size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(rows, cols // block * size), dtype=np.uint8)
    blocks = raw.reshape(rows, cols // block, size)
    scale = np.full(blocks.shape[:2], 0.01, np.float16).view(np.uint8).reshape(*blocks.shape[:2], 2)
    blocks[:, :, 0:2] = scale  # d of the 32-blocks; d of Q4_K / Q5_K
    if qtype in (GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q5_K):
        blocks[:, :, 2:4] = scale  # dmin
    x = rng.standard_normal((n, cols)).astype(np.float32)
    out = np.empty((n, rows), np.float32)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        kernels.matmul(raw, qtype, (rows, cols), x, "cpp", threads, out)
        best = min(best, time.perf_counter() - t0)
    gflops = 2 * n * rows * cols / best / 1e9
    print(f"{name} {rows}x{cols} n={n}: best {gflops:.1f} GFLOP/s; checksum {float(out.sum()):.6e}")


if __name__ == "__main__":
    main()
