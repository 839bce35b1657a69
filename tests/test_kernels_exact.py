"""Bit-exactness of the C++ matmul against llama.cpp's CPU arithmetic (AVX2 / AVX512-VNNI build).

The quantized models amplify one-ulp differences, so for the types where we claim it the C++
kernels must give llama.cpp's float32 results bit for bit. The references below are plain numpy
transcriptions of ggml's code (ggml-cpu/arch/x86/quants.c):

* quantize_row_q8_0 / quantize_row_q8_1: d = amax / 127 (float), stored as fp16; q = round half to
  even (x * (127 / amax)); q8_1 also stores s = fp16(d_float * sum(q)).
* ggml_vec_dot_q4_1_q8_1: per block summs = fma(m, s, summs); 8 float lanes, lane l = the integer
  dot of elements 4l .. 4l + 3 (low nibbles are elements 0-15, high nibbles 16-31),
  acc[l] = fma(d * da, dot_l, acc[l]); result hsum_float_8(acc) + summs.
* ggml_vec_dot_q8_0_q8_0: the same lanes, acc = fma(d * da, dot_l, acc); result hsum_float_8(acc)
  (what llama.cpp runs for one activation row; batches go through llamafile's tinyBLAS instead).

numpy has no fused multiply-add, so fma32 computes it exactly: a float32 product is exact in
float64, the float64 sum's rounding error is recovered with TwoSum, and rounding to odd in
float64 followed by rounding to float32 gives the correctly rounded result.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from hybridllm import kernels

F32 = np.float32


def fma32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float32 a * b + c with a single rounding (elementwise, broadcasting)."""
    p = np.asarray(a, np.float64) * np.asarray(b, np.float64)  # exact
    c64 = np.asarray(c, np.float64)
    p, c64 = np.broadcast_arrays(p, c64)
    s = p + c64
    bb = s - p
    err = (p - (s - bb)) + (c64 - bb)  # s + err == p + c exactly
    even = (s.view(np.int64) & 1) == 0
    fix = (err != 0) & even  # round to odd: move an inexact even result one ulp towards err
    s = np.where(fix, np.nextafter(s, np.where(err > 0, np.inf, -np.inf)), s)
    return s.astype(F32)


def hsum_float_8(acc: np.ndarray) -> np.ndarray:
    """ggml's hsum_float_8 over the last axis (8 lanes), in its order."""
    r = acc[..., 4:8] + acc[..., 0:4]
    return (r[..., 0] + r[..., 2]) + (r[..., 1] + r[..., 3])


def quantize_q8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """quantize_row_q8_0 / _q8_1 on x [n][cols]: (q [n][nb][32] int32, d, s) with d = fp16 of
    amax / 127 and s = fp16(d_float * sum q) (q8_1's; q8_0 stores d only), as float32."""
    n, cols = x.shape
    xb = x.astype(F32).reshape(n, cols // 32, 32)
    amax = np.abs(xb).max(axis=2)
    d = (amax / F32(127.0)).astype(F32)
    with np.errstate(divide="ignore"):
        idd = np.where(amax != 0, F32(127.0) / amax, F32(0)).astype(F32)
    q = np.rint(xb * idd[..., None]).astype(np.int32)
    s = (d * q.sum(axis=2).astype(F32)).astype(F32)
    return q, d.astype(np.float16).astype(F32), s.astype(np.float16).astype(F32)


def ref_q4_1(raw: np.ndarray, rows: int, cols: int, x: np.ndarray) -> np.ndarray:
    nb = cols // 32
    blk = np.ascontiguousarray(raw).reshape(rows, nb, 20)
    wd = blk[:, :, 0:2].copy().view(np.float16)[..., 0].astype(F32)
    wm = blk[:, :, 2:4].copy().view(np.float16)[..., 0].astype(F32)
    qs = blk[:, :, 4:20]
    wq = np.concatenate([qs & 15, qs >> 4], axis=2).astype(np.int32)  # (rows, nb, 32)
    q, d, s = quantize_q8(x)
    n = x.shape[0]
    acc = np.zeros((n, rows, 8), F32)
    summs = np.zeros((n, rows), F32)
    for b in range(nb):
        summs = fma32(wm[None, :, b], s[:, None, b], summs)
        d0d1 = (wd[None, :, b] * d[:, None, b]).astype(F32)  # (n, rows)
        prod = wq[None, :, b, :] * q[:, None, b, :]  # (n, rows, 32)
        t = prod.reshape(n, rows, 8, 4).sum(axis=3).astype(F32)
        acc = fma32(d0d1[..., None], t, acc)
    return (hsum_float_8(acc) + summs).astype(F32)


def ref_q8_0(raw: np.ndarray, rows: int, cols: int, x: np.ndarray) -> np.ndarray:
    nb = cols // 32
    blk = np.ascontiguousarray(raw).reshape(rows, nb, 34)
    wd = blk[:, :, 0:2].copy().view(np.float16)[..., 0].astype(F32)
    wq = blk[:, :, 2:34].copy().view(np.int8).astype(np.int32)
    q, d, _ = quantize_q8(x)
    n = x.shape[0]
    acc = np.zeros((n, rows, 8), F32)
    for b in range(nb):
        dd = (wd[None, :, b] * d[:, None, b]).astype(F32)
        t = (wq[None, :, b, :] * q[:, None, b, :]).reshape(n, rows, 8, 4).sum(axis=3).astype(F32)
        acc = fma32(dd[..., None], t, acc)
    return hsum_float_8(acc).astype(F32)


def random_blocks(qtype: Q, rows: int, cols: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    nb = cols // 32
    if qtype == Q.Q4_1:
        raw = rng.integers(0, 256, size=(rows, nb, 20), dtype=np.uint8)
        raw[:, :, 0:2] = rng.uniform(0.001, 0.05, (rows, nb)).astype(np.float16).view(np.uint8).reshape(rows, nb, 2)
        raw[:, :, 2:4] = rng.uniform(-0.3, 0.0, (rows, nb)).astype(np.float16).view(np.uint8).reshape(rows, nb, 2)
    else:
        raw = rng.integers(0, 256, size=(rows, nb, 34), dtype=np.uint8)
        raw[:, :, 0:2] = rng.uniform(0.0005, 0.01, (rows, nb)).astype(np.float16).view(np.uint8).reshape(rows, nb, 2)
    return raw.reshape(rows, -1)


def activations(n: int, cols: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, cols)).astype(F32) * rng.uniform(0.1, 10, size=(n, 1)).astype(F32)
    x[:, 32:64] = 0.0  # an all-zero block (amax = 0)
    x[0, 5] = 2.5 * np.abs(x[0, :32]).max()  # ties and a dominant element
    return x


def test_fma32_is_fused() -> None:
    # 1 + 2^-23 squared: the unfused product rounds away 2^-46.
    a = F32(1 + 2.0**-23)
    got = fma32(np.array([a]), np.array([a]), np.array([F32(-1.0)]))
    assert got[0] == F32(2.0**-22 + 2.0**-46)


# "cpp-scalar" sets force_scalar; Q4_1's activation kind is the same on both paths, so on an AVX2
# build both run the AVX2 kernel (a build without AVX2 runs the portable one, also bit-exact).
@pytest.fixture(params=["cpp", "cpp-scalar"])
def cpp_backend(request: pytest.FixtureRequest):
    if "cpp" not in kernels.available_backends():
        pytest.skip("hybridllm._core is not built")
    from hybridllm import _core

    _core.set_force_scalar(request.param == "cpp-scalar")
    try:
        yield request.param
    finally:
        _core.set_force_scalar(False)


@pytest.mark.parametrize("n", [1, 2, 5, 9])
def test_q4_1_matches_llama_cpp_bits(cpp_backend: str, n: int) -> None:
    rows, cols = 67, 2048 + 96  # an odd number of blocks, not a multiple of 8 or 16
    raw = random_blocks(Q.Q4_1, rows, cols, seed=n)
    x = activations(n, cols, seed=100 + n)
    got = kernels.matmul(raw, Q.Q4_1, (rows, cols), x, backend="cpp")
    ref = ref_q4_1(raw, rows, cols, x)
    np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("n", [1, 3])
def test_q8_0_matches_llama_cpp_vec_dot_bits(n: int) -> None:
    if "cpp" not in kernels.available_backends():
        pytest.skip("hybridllm._core is not built")
    from hybridllm import _core

    if _core.simd_path() == "scalar":
        pytest.skip("only the SIMD Q8_0 kernel follows llama.cpp's order")
    rows, cols = 53, 1024 + 160
    raw = random_blocks(Q.Q8_0, rows, cols, seed=7 + n)
    x = activations(n, cols, seed=200 + n)
    got = kernels.matmul(raw, Q.Q8_0, (rows, cols), x, backend="cpp")
    ref = ref_q8_0(raw, rows, cols, x)
    np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))


def test_q4_1_reference_matches_exact_ops_model() -> None:
    """Cross-check of the numpy reference against the Numba model that reproduced llama.cpp's
    logits (only where that development file is present)."""
    import importlib.util
    import os
    import sys

    path = "/tmp/eng/stub/exact_ops.py"
    if not os.path.exists(path):
        pytest.skip("exact_ops.py (development model) not present")
    spec = importlib.util.spec_from_file_location("exact_ops", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("exact_ops", mod)  # numba's cache looks the module up by name
    spec.loader.exec_module(sys.modules["exact_ops"])
    mod = sys.modules["exact_ops"]
    rows, cols = 19, 512
    raw = random_blocks(Q.Q4_1, rows, cols, seed=3)
    x = activations(4, cols, seed=4)
    ref = ref_q4_1(raw, rows, cols, x)
    model = mod.q41_matmul(raw, (rows, cols), x)
    np.testing.assert_array_equal(ref.view(np.uint32), model.view(np.uint32))
