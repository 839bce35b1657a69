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
  (llamafile's tinyBLAS, which llama.cpp runs for batches, has the same order).

The other types are checked against ggml's own vec_dot (called through ctypes from
llama-cpp-python's libggml-cpu) where llama.cpp runs vec_dot, and against numpy transcriptions
of the repacked q4_0 / q4_K 8x8 kernels (arch/x86/repack.cpp) and of the tiled K-quant matmul
(tiled/tiled-kernel.cpp) where it runs those.

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


@pytest.mark.parametrize("n", [1, 2, 5, 9, 16, 40])  # 40: two panels of 20, tiles of 16 and 4 rows
def test_q4_1_matches_llama_cpp_bits(cpp_backend: str, n: int) -> None:
    rows, cols = 67, 2048 + 96  # an odd number of blocks, not a multiple of 8 or 16
    raw = random_blocks(Q.Q4_1, rows, cols, seed=n)
    x = activations(n, cols, seed=100 + n)
    got = kernels.matmul(raw, Q.Q4_1, (rows, cols), x, backend="cpp")
    ref = ref_q4_1(raw, rows, cols, x)
    np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("n", [1, 3, 9, 16, 40])  # the 512-bit tiles of 4, 8 and 16 rows
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


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q8_0])
def test_batch_tiles_at_the_largest_lanes(qtype: Q) -> None:
    """Blocks whose four-product lane sums are the largest the formats allow (Q8_0 codes -128
    against activations of +-127: |lane| = 65024; Q4_1 codes 15: 7620): the 512-bit tile's lanes,
    started at a float's bits and converted by subtraction, still give llama.cpp's bits."""
    if "cpp" not in kernels.available_backends():
        pytest.skip("hybridllm._core is not built")
    from hybridllm import _core

    if qtype == Q.Q8_0 and _core.simd_path() == "scalar":
        pytest.skip("only the SIMD Q8_0 kernel follows llama.cpp's order")
    rows, cols, n = 18, 1024, 16
    raw = random_blocks(qtype, rows, cols, seed=3).reshape(rows, cols // 32, -1)
    codes = slice(4, 20) if qtype == Q.Q4_1 else slice(2, 34)
    raw[:, ::2, codes] = 0xFF if qtype == Q.Q4_1 else 0x80  # every other block at the extreme code
    raw = raw.reshape(rows, -1)
    x = activations(n, cols, seed=5)
    sign = np.where(np.arange(n) % 2 == 0, F32(1.0), F32(-1.0))[:, None]
    x[:, : cols // 2] = sign * F32(3.0)  # whole blocks of one value: every code +-127
    got = kernels.matmul(raw, qtype, (rows, cols), x, backend="cpp")
    ref = ref_q4_1(raw, rows, cols, x) if qtype == Q.Q4_1 else ref_q8_0(raw, rows, cols, x)
    np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))


def test_q4_1_tiles_across_the_half_range_of_scales() -> None:
    """The 512-bit Q4_1 tile computes fma(dw, da * x, acc) where llama.cpp computes
    fma(dw * da, x, acc): the same real number to round, as long as da * x and dw * da are exact
    in float. Activation scales from half subnormals to about 2.3, weight scales from half
    subnormals to 60000, with the largest lanes (codes 15 against +-127) among them."""
    if "cpp" not in kernels.available_backends():
        pytest.skip("hybridllm._core is not built")
    rows, cols, n = 21, 32 * 24, 16
    rng = np.random.default_rng(11)
    raw = random_blocks(Q.Q4_1, rows, cols, seed=13).reshape(rows, cols // 32, 20)
    weight_scales = np.concatenate([[6e-8, 1e-7, 3e-6, 6.1e-5], np.geomspace(1e-3, 6e4, rows * (cols // 32) - 4)])
    rng.shuffle(weight_scales)
    raw[:, :, 0:2] = weight_scales.astype(np.float16).view(np.uint8).reshape(rows, cols // 32, 2)
    raw[:, ::3, 4:20] = 0xFF
    x = activations(n, cols, seed=17)
    x *= np.geomspace(2e-6, 30, n).astype(F32)[:, None]  # d = fp16(amax / 127): subnormal to ~2.3 (s finite)
    x[::2, 64:96] = np.where(np.arange(n)[::2, None] % 4 == 0, F32(1.0), F32(-1.0)) * np.abs(x[::2, 64:96]).max()
    got = kernels.matmul(raw.reshape(rows, -1), Q.Q4_1, (rows, cols), x, backend="cpp")
    ref = ref_q4_1(raw.reshape(rows, -1), rows, cols, x)
    assert np.isfinite(ref).all()
    np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))


# --- the other types: ggml's own vec_dot as the oracle, numpy for the repacked / tiled paths -----

# bytes per block and the (offset, low, high) ranges of its f16 scales
BLOCKS = {
    Q.Q4_0: (32, 18, [(0, 0.001, 0.05)]),
    Q.Q5_0: (32, 22, [(0, 0.001, 0.05)]),
    Q.Q5_1: (32, 24, [(0, 0.001, 0.05), (2, -0.3, 0.0)]),
    Q.Q4_K: (256, 144, [(0, 0.0005, 0.005), (2, 0.0005, 0.01)]),
    Q.Q5_K: (256, 176, [(0, 0.0005, 0.005), (2, 0.0005, 0.01)]),
    Q.Q6_K: (256, 210, [(208, 0.0002, 0.002)]),
}


def random_raw(qtype: Q, rows: int, cols: int, seed: int) -> np.ndarray:
    """Random bytes (valid codes and K-scales) with small finite f16 block scales."""
    rng = np.random.default_rng(seed)
    block, size, scales = BLOCKS[qtype]
    nb = cols // block
    raw = rng.integers(0, 256, size=(rows, nb, size), dtype=np.uint8)
    for off, lo, hi in scales:
        raw[:, :, off : off + 2] = rng.uniform(lo, hi, (rows, nb)).astype(np.float16).view(np.uint8).reshape(rows, nb, 2)
    return raw.reshape(rows, -1)


@pytest.fixture(scope="module")
def ggml():  # noqa: ANN201
    """ggml-cpu's type traits through ctypes: (from_float, vec_dot) of the llama.cpp build that
    llama-cpp-python loads (its own, or the one in $LLAMA_CPP_LIB_PATH)."""
    import ctypes
    import os

    llama_cpp = pytest.importorskip("llama_cpp")
    lib_dir = os.environ.get("LLAMA_CPP_LIB_PATH") or os.path.join(
        os.path.dirname(llama_cpp.__file__), "lib"
    )
    path = os.path.join(lib_dir, "libggml-cpu.so")
    if not os.path.exists(path):
        pytest.skip(f"{path} not found")
    lib = ctypes.CDLL(path)

    class Traits(ctypes.Structure):
        _fields_ = [("from_float", ctypes.c_void_p), ("vec_dot", ctypes.c_void_p),
                    ("vec_dot_type", ctypes.c_int), ("nrows", ctypes.c_int64)]  # fmt: skip

    lib.ggml_get_type_traits_cpu.restype = ctypes.POINTER(Traits)
    lib.ggml_cpu_init()
    from_float_t = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
    vec_dot_t = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t,
                                 ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p,
                                 ctypes.c_size_t, ctypes.c_int)  # fmt: skip
    act_bytes = {0: (1, 4), 1: (1, 2), 8: (32, 34), 9: (32, 36), 15: (256, 292)}  # F32 F16 Q8_0 Q8_1 Q8_K

    def matmul(raw: np.ndarray, qtype: Q, x: np.ndarray) -> np.ndarray:
        traits = lib.ggml_get_type_traits_cpu(int(qtype)).contents
        block, size = act_bytes[traits.vec_dot_type]
        quantize = from_float_t(lib.ggml_get_type_traits_cpu(traits.vec_dot_type).contents.from_float)
        vec_dot = vec_dot_t(traits.vec_dot)
        n, cols = x.shape
        out = np.zeros((n, raw.shape[0]), F32)
        for i in range(n):
            xr = np.ascontiguousarray(x[i], dtype=F32)
            if traits.vec_dot_type == 0:  # F32: the activations themselves
                xq = xr.view(np.uint8)
            else:
                xq = np.zeros(cols // block * size, np.uint8)
                quantize(xr.ctypes.data, xq.ctypes.data, cols)
            for r in range(raw.shape[0]):
                row = np.ascontiguousarray(raw[r])
                vec_dot(cols, out[i, r : r + 1].ctypes.data, 0, row.ctypes.data, 0,
                        xq.ctypes.data, 0, 1)  # fmt: skip
        return out

    return matmul


@pytest.mark.parametrize("qtype", [Q.F16, Q.F32])
@pytest.mark.parametrize("cols", [256, 64 * 5 + 48])  # 48 = leftovers past the 64-element steps
def test_float_matches_ggml_vec_dot_bits(ggml, qtype: Q, cols: int) -> None:  # noqa: ANN001
    _cpp_simd()
    rows = 13
    rng = np.random.default_rng(cols)
    w = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float16 if qtype == Q.F16 else F32)
    raw = w.view(np.uint8).reshape(rows, -1)
    x = activations(1, cols, seed=700 + cols)
    got = kernels.matmul(raw, qtype, (rows, cols), x, backend="cpp")
    np.testing.assert_array_equal(got.view(np.uint32), ggml(raw, qtype, x).view(np.uint32))


def ref_float_tinyblas(w: np.ndarray, x: np.ndarray, f16: bool, lanes: int) -> np.ndarray:
    """llamafile's tinyBLAS (2+ activation rows): per output one `lanes`-wide FMA accumulator
    over the row (activations rounded to f16 for f16 weights), then summed by halving."""
    xs = x.astype(np.float16).astype(F32) if f16 else x.astype(F32)
    wf = w.astype(F32)
    rows, cols = wf.shape
    out = np.zeros((x.shape[0], rows), F32)
    for i in range(x.shape[0]):
        acc = np.zeros((rows, lanes), F32)
        for c in range(0, cols, lanes):
            acc = fma32(wf[:, c : c + lanes], xs[i, c : c + lanes][None], acc)
        width = lanes
        while width > 1:
            width //= 2
            acc = (acc[:, width : 2 * width] + acc[:, :width]).astype(F32)
        out[i] = acc[:, 0]
    return out


@pytest.mark.parametrize("qtype", [Q.F16, Q.F32])
def test_float_matches_tinyblas(qtype: Q) -> None:
    _cpp_simd()
    rows, cols, n = 12, 320, 5
    rng = np.random.default_rng(9)
    w = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float16 if qtype == Q.F16 else F32)
    x = activations(n, cols, seed=800)
    got = kernels.matmul(w.view(np.uint8).reshape(rows, -1), qtype, (rows, cols), x, backend="cpp")
    from hybridllm import _core

    lanes = _core.float_lanes()  # ggml's float vector on this build
    ref = ref_float_tinyblas(w, x, qtype == Q.F16, lanes)
    np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))


def _cpp_simd() -> None:
    if "cpp" not in kernels.available_backends():
        pytest.skip("hybridllm._core is not built")
    from hybridllm import _core

    if _core.simd_path() == "scalar":
        pytest.skip("only the SIMD kernels follow llama.cpp's order")


# n = 9 runs llamafile's tinyBLAS in llama.cpp for Q5_0 / Q8_0, which has vec_dot's arithmetic;
# Q6_K from 8 rows on goes through ggml's tiled matmul instead (tested below).
@pytest.mark.parametrize("qtype,ns", [(Q.Q5_0, (1, 3, 9, 40)), (Q.Q5_1, (1, 3, 9, 40)), (Q.Q4_1, (1, 2, 9)),
                                      (Q.Q8_0, (1, 9)), (Q.Q6_K, (1, 3, 7)), (Q.Q5_K, (1, 5))])  # fmt: skip
def test_matches_ggml_vec_dot_bits(ggml, qtype: Q, ns: tuple[int, ...]) -> None:  # noqa: ANN001
    _cpp_simd()
    rows, cols = 37, 1024 + (256 if qtype in (Q.Q5_K, Q.Q6_K) else 96)
    raw = random_raw(qtype, rows, cols, seed=11) if qtype in BLOCKS else random_blocks(qtype, rows, cols, 11)
    for n in ns:
        x = activations(n, cols, seed=300 + n)
        got = kernels.matmul(raw, qtype, (rows, cols), x, backend="cpp")
        np.testing.assert_array_equal(got.view(np.uint32), ggml(raw, qtype, x).view(np.uint32), err_msg=f"n={n}")


def quantize_q8_K(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """quantize_row_q8_K on x [n][cols]: q [n][nb][256] int64 and |d| = 1 / (127 / amax) (the
    sign llama.cpp gives d and q cancels in every product)."""
    n, cols = x.shape
    xb = x.astype(F32).reshape(n, cols // 256, 256)
    amax = np.abs(xb).max(axis=2)
    with np.errstate(divide="ignore"):
        iscale = np.where(amax != 0, F32(127.0) / amax, F32(0)).astype(F32)
        d = np.where(amax != 0, F32(1.0) / iscale, F32(0)).astype(F32)
    return np.rint(xb * iscale[..., None]).astype(np.int64), d


def k4_parts(raw: np.ndarray, qtype: Q, rows: int, cols: int):  # noqa: ANN201
    """Q4_K / Q5_K rows -> d, dmin (rows, nb) float32, sc, m (rows, nb, 8), codes (rows, nb, 8, 32)
    (Q5_K: bit j of qh[l] is the fifth bit of element 32 j + l)."""
    nb = cols // 256
    blk = np.ascontiguousarray(raw).reshape(rows, nb, BLOCKS[qtype][1])
    d = blk[..., 0:2].copy().view(np.float16)[..., 0].astype(F32)
    dmin = blk[..., 2:4].copy().view(np.float16)[..., 0].astype(F32)
    s = blk[..., 4:16].astype(np.int64)
    sc = np.concatenate([s[..., 0:4] & 63, (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)], axis=-1)
    m = np.concatenate([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], axis=-1)
    qs = blk[..., -128:].reshape(rows, nb, 4, 32).astype(np.int64)
    codes = np.stack([qs & 15, qs >> 4], axis=3).reshape(rows, nb, 8, 32)
    if qtype == Q.Q5_K:
        qh = blk[..., 16:48].astype(np.int64)
        codes = codes | (np.stack([(qh >> j) & 1 for j in range(8)], axis=2) << 4)
    return d, dmin, sc, m, codes


def ref_q4_K(raw: np.ndarray, rows: int, cols: int, x: np.ndarray) -> np.ndarray:
    """llama.cpp's repacked q4_K 8x8 kernels: activation rows below n - n % 4 go through
    ggml_gemm (a float step per pair of sub-blocks), the rest through ggml_gemv (per super-block):
    acc = fma(float(sum sc (q . a)), d * da, acc), accm = fma(float(sum m bsum), dmin * da, accm)."""
    d, dmin, sc, m, codes = k4_parts(raw, Q.Q4_K, rows, cols)
    q, da = quantize_q8_K(x)
    n, nb = x.shape[0], cols // 256
    qa = q.reshape(n, nb, 8, 32)
    out = np.zeros((n, rows), F32)
    for i in range(n):
        span = 2 if i < n - n % 4 else 8  # sub-blocks per float step
        acc = np.zeros(rows, F32)
        accm = np.zeros(rows, F32)
        for b in range(nb):
            dots = sc[:, b] * (codes[:, b] * qa[i, b][None]).sum(axis=2)  # (rows, 8)
            mins = m[:, b] * qa[i, b].sum(axis=1)[None]
            for j0 in range(0, 8, span):
                acc = fma32(dots[:, j0 : j0 + span].sum(1).astype(F32), (d[:, b] * da[i, b]).astype(F32), acc)
                accm = fma32(mins[:, j0 : j0 + span].sum(1).astype(F32), (dmin[:, b] * da[i, b]).astype(F32), accm)
        out[i] = acc - accm
    return out


def ref_q6_K_tiled(raw: np.ndarray, rows: int, cols: int, x: np.ndarray) -> np.ndarray:
    """ggml's tiled K-quant matmul (8 or more activation rows), per super-block:
    acc = fma(float(sum sc (q - 32) a) * d, da, acc)."""
    nb = cols // 256
    blk = np.ascontiguousarray(raw).reshape(rows, nb, 210)
    ql, qh = blk[..., 0:128].astype(np.int64), blk[..., 128:192].astype(np.int64)
    sc = blk[..., 192:208].view(np.int8).astype(np.int64)
    d = blk[..., 208:210].copy().view(np.float16)[..., 0].astype(F32)
    u = np.zeros((rows, nb, 256), np.int64)
    for h in range(2):
        l0, l1, hh = ql[..., 64 * h : 64 * h + 32], ql[..., 64 * h + 32 : 64 * h + 64], qh[..., 32 * h : 32 * h + 32]
        u[..., 128 * h : 128 * h + 32] = (l0 & 15) | ((hh & 3) << 4)
        u[..., 128 * h + 32 : 128 * h + 64] = (l1 & 15) | (((hh >> 2) & 3) << 4)
        u[..., 128 * h + 64 : 128 * h + 96] = (l0 >> 4) | (((hh >> 4) & 3) << 4)
        u[..., 128 * h + 96 : 128 * h + 128] = (l1 >> 4) | (((hh >> 6) & 3) << 4)
    w = (u - 32) * np.repeat(sc, 16, axis=-1)  # (rows, nb, 256)
    q, da = quantize_q8_K(x)
    out = np.zeros((x.shape[0], rows), F32)
    for i in range(x.shape[0]):
        acc = np.zeros(rows, F32)
        for b in range(nb):
            s1 = (w[:, b] * q[i, b][None]).sum(axis=1).astype(F32)
            acc = fma32((s1 * d[:, b]).astype(F32), da[i, b], acc)
        out[i] = acc
    return out


def ref_q4_0_chain(raw: np.ndarray, rows: int, cols: int, x: np.ndarray) -> np.ndarray:
    """llama.cpp's repacked q4_0 8x8 kernels: acc = fma(float(sum (q - 8) a), d * da, acc) per block."""
    nb = cols // 32
    blk = np.ascontiguousarray(raw).reshape(rows, nb, 18)
    d = blk[..., 0:2].copy().view(np.float16)[..., 0].astype(F32)
    qs = blk[..., 2:].astype(np.int32)
    wq = np.concatenate([qs & 15, qs >> 4], axis=2) - 8
    q, da, _ = quantize_q8(x)
    out = np.zeros((x.shape[0], rows), F32)
    for i in range(x.shape[0]):
        acc = np.zeros(rows, F32)
        for b in range(nb):
            t = (wq[:, b] * q[i, b][None]).sum(axis=1).astype(F32)
            acc = fma32(t, (d[:, b] * da[i, b]).astype(F32), acc)
        out[i] = acc
    return out


def ref_q5_K_tiled(raw: np.ndarray, rows: int, cols: int, x: np.ndarray) -> np.ndarray:
    """ggml's tiled K-quant matmul for Q5_K (8 or more activation rows), per super-block:
    res = fma(-dmin, float(sum m bsum), float(sum sc q a) * d); acc = fma(res, da, acc)."""
    nb = cols // 256
    d, dmin, sc, m, codes = k4_parts(raw, Q.Q5_K, rows, cols)
    q, da = quantize_q8_K(x)
    out = np.zeros((x.shape[0], rows), F32)
    for i in range(x.shape[0]):
        qa = q[i].reshape(nb, 8, 32)
        acc = np.zeros(rows, F32)
        for b in range(nb):
            isum = (sc[:, b] * (codes[:, b] * qa[b][None]).sum(axis=2)).sum(axis=1).astype(F32)
            imin = (m[:, b] * qa[b].sum(axis=1)[None]).sum(axis=1).astype(F32)
            res = fma32(-dmin[:, b], imin, (isum * d[:, b]).astype(F32))
            acc = fma32(res, da[i, b], acc)
        out[i] = acc
    return out


# (type, reference, rows, cols, activation rows to try, activation seed base)
REFERENCE_CASES = [
    (Q.Q4_K, ref_q4_K, 24, 1024, (1, 3, 4, 6, 9), 400),  # repacked q4_K 8x8 gemv and gemm
    (Q.Q5_K, ref_q5_K_tiled, 17, 512, (8, 11), 900),  # tiled K-quant matmul
    (Q.Q6_K, ref_q6_K_tiled, 21, 768, (8, 13), 500),  # tiled K-quant matmul
    (Q.Q4_0, ref_q4_0_chain, 19, 32 * 23, (1, 5), 600),  # repacked q4_0 8x8
]


@pytest.mark.parametrize("qtype,ref,rows,cols,ns,seed", REFERENCE_CASES, ids=lambda v: getattr(v, "name", None))
def test_matches_llama_cpp_reference(qtype: Q, ref, rows: int, cols: int, ns: tuple[int, ...], seed: int) -> None:  # noqa: ANN001
    _cpp_simd()
    for n in ns:
        raw = random_raw(qtype, rows, cols, seed=n)
        x = activations(n, cols, seed=seed + n)
        got = kernels.matmul(raw, qtype, (rows, cols), x, backend="cpp")
        np.testing.assert_array_equal(got.view(np.uint32), ref(raw, rows, cols, x).view(np.uint32), err_msg=f"n={n}")
