"""The CUDA kernels without a GPU: they compile with nvcc, and their block decoding is right.

`cuda_kernels.cu` keeps the per-type decoding (`unpack<T>`), the sub-block dot product and the
per-lane part of the matrix-vector kernels `__host__ __device__`. A small host program compiled
with nvcc runs those on the CPU, so the bit-level layout of every GGML type is checked against
`gguf.quants.dequantize` and the integer dot product against an exact emulation, here, where
there is no GPU. These tests skip when nvcc is not on PATH.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

import hybridllm.backends

KERNELS = Path(hybridllm.backends.__file__).with_name("cuda_kernels.cu")
T = GGMLQuantizationType
QUANT_TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]
FLOAT_TYPES = [T.F32, T.F16, T.BF16]
#: Byte offsets of the f16 scale fields of each block (random bytes there could be inf/nan).
SCALE_FIELDS = {
    T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q8_0: (0,),
    T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,),
}  # fmt: skip

HARNESS = r"""
#include "@KERNELS@"
#include <cstdio>
#include <cstdlib>
#include <vector>

template <class E> static std::vector<E> slurp(const char* path) {
    FILE* f = fopen(path, "rb");
    if (!f) { perror(path); exit(2); }
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    std::vector<E> v((n + sizeof(E) - 1) / sizeof(E));
    if (n && fread(v.data(), 1, n, f) != (size_t)n) exit(3);
    fclose(f);
    return v;
}

// deq: nblocks -> values; subs: nblocks -> (dl, dh, ml, mh) per 32-element sub-block
template <int Q> static void deq(const u8* raw, int nblocks, bool subs, std::vector<float>& out) {
    constexpr int spb = Traits<Q>::qk / 32;
    for (int b = 0; b < nblocks; ++b)
        for (int s = 0; s < spb; ++s) {
            Sub u;
            unpack<Q>(raw + (long)b * Traits<Q>::bytes, s, u);
            if (subs) {
                out.push_back(u.dl); out.push_back(u.dh); out.push_back(u.ml); out.push_back(u.mh);
            } else {
                for (int e = 0; e < 32; ++e) out.push_back(sub_value(u, e));
            }
        }
}

// The warp of the mmvq kernel, lane by lane; out (ncols, rows).
template <int Q, int NC> static void dot(const u8* W, int rows, int cols, int ncols, const int* yq,
                                         const float4* yds, std::vector<float>& out) {
    const i64 rb = (i64)cols / Traits<Q>::qk * Traits<Q>::bytes;
    out.assign((size_t)rows * ncols, 0.0f);
    for (int r = 0; r < rows; ++r)
        for (int lane = 0; lane < 32; ++lane) {
            float acc[NC] = {0};
            mmvq_lane<Q, NC>(W, rb, r, lane, cols / 32, ncols, yq, yds, acc);
            for (int c = 0; c < ncols; ++c) out[(size_t)c * rows + r] += acc[c];
        }
}

template <int Q, int NC> static void mv(const u8* W, int rows, int cols, int ncols, const float* x,
                                        std::vector<float>& out) {
    const i64 rb = (i64)cols * (Q == T_F32 ? 4 : 2);
    out.assign((size_t)rows * ncols, 0.0f);
    for (int r = 0; r < rows; ++r)
        for (int lane = 0; lane < 32; ++lane) {
            float acc[NC] = {0};
            mv_float_lane<Q, NC>(W, rb, r, lane, cols, ncols, x, acc);
            for (int c = 0; c < ncols; ++c) out[(size_t)c * rows + r] += acc[c];
        }
}

#define QUANT_CASES(X) X(T_Q4_0) X(T_Q4_1) X(T_Q5_0) X(T_Q5_1) X(T_Q8_0) \
                       X(T_Q2_K) X(T_Q3_K) X(T_Q4_K) X(T_Q5_K) X(T_Q6_K)

int main(int argc, char** argv) {
    if (argc < 8) { fprintf(stderr, "usage: mode qtype rows cols ncols out in...\n"); return 1; }
    const char* mode = argv[1];
    const int q = atoi(argv[2]), rows = atoi(argv[3]), cols = atoi(argv[4]), ncols = atoi(argv[5]);
    std::vector<float> out;
    std::vector<u8> w = slurp<u8>(argv[7]);  // the first input as bytes
    if ((mode[0] == 'd' && mode[1] == 'e') || (mode[0] == 's' && mode[1] == 'u')) {
        const bool subs = mode[0] == 's';
        switch (q) {
#define CASE(Q) case Q: deq<Q>(w.data(), rows, subs, out); break;
            QUANT_CASES(CASE)
#undef CASE
            default: return 4;
        }
    } else if (mode[0] == 'd') {  // dot
        std::vector<int4> yq = slurp<int4>(argv[8]);
        std::vector<float4> yds = slurp<float4>(argv[9]);
        const int* y = (const int*)yq.data();
        switch (q) {
#define CASE(Q) case Q: if (ncols == 1) dot<Q, 1>(w.data(), rows, cols, 1, y, yds.data(), out); \
                        else dot<Q, 8>(w.data(), rows, cols, ncols, y, yds.data(), out); break;
            QUANT_CASES(CASE)
#undef CASE
            default: return 4;
        }
    } else if (mode[0] == 's' && mode[1] == 'i') {  // silu: gate (in0) and up (in1), rows x cols, q lanes
        std::vector<float> g = slurp<float>(argv[7]), u = slurp<float>(argv[8]);
        for (long i = 0; i < (long)rows * cols; ++i) out.push_back(swiglu_value(g[i], u[i], (int)(i % cols), cols, q));
    } else {  // mv
        std::vector<float> x = slurp<float>(argv[8]);
        switch (q) {
#define CASE(Q) case Q: if (ncols == 1) mv<Q, 1>(w.data(), rows, cols, 1, x.data(), out); \
                        else mv<Q, 8>(w.data(), rows, cols, ncols, x.data(), out); break;
            CASE(T_F32) CASE(T_F16) CASE(T_BF16)
#undef CASE
            default: return 4;
        }
    }
    FILE* f = fopen(argv[6], "wb");
    fwrite(out.data(), sizeof(float), out.size(), f);
    fclose(f);
    return 0;
}
"""


@pytest.fixture(scope="module")
def nvcc() -> str:
    path = shutil.which("nvcc")
    if path is None:
        pytest.skip("nvcc is not on PATH")
    return path


@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
def test_kernels_compile(nvcc: str, arch: str, tmp_path: Path) -> None:
    """What NVRTC will see on the GPU machine compiles here: catches syntax and type errors;
    and ptxas (-v) spills no register of any kernel to local memory on that architecture."""
    cmd = [nvcc, "-std=c++17", f"-arch={arch}", "-Xptxas", "-v", "-c", str(KERNELS), "-o", str(tmp_path / "k.o")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr.lower(), result.stderr
    # ptxas prints, per kernel: "Compiling entry function 'NAME'" ... "N bytes spill stores, M bytes spill loads"
    kernels = re.findall(r"Compiling entry function '(\w+)'", result.stderr)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", result.stderr)
    assert len(kernels) == len(spills) > 0, result.stderr
    spilled = [k for k, (st, ld) in zip(kernels, spills, strict=True) if int(st) or int(ld)]
    assert not spilled, f"{arch}: register spills in {spilled}"


@pytest.fixture(scope="module")
def harness(nvcc: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The host program above, built against the kernel source."""
    folder = tmp_path_factory.mktemp("cuda_host")
    source = folder / "harness.cu"
    source.write_text(HARNESS.replace("@KERNELS@", str(KERNELS)))
    exe = folder / "harness"
    cmd = [nvcc, "-std=c++17", "-arch=sm_90", "-O1", "-o", str(exe), str(source)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return exe


def _run(exe: Path, mode: str, qtype: int, rows: int, cols: int, ncols: int, *inputs: np.ndarray) -> np.ndarray:
    folder = exe.parent
    paths = []
    for i, arr in enumerate(inputs):
        path = folder / f"in{i}.bin"
        np.ascontiguousarray(arr).tofile(path)
        paths.append(str(path))
    out = folder / "out.bin"
    args = [str(exe), mode, str(qtype), str(rows), str(cols), str(ncols), str(out), *paths]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return np.fromfile(out, dtype=np.float32)


def random_blocks(qtype: T, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Random bytes as blocks of `qtype`, with finite f16 scales: every bit pattern is used."""
    size = GGML_QUANT_SIZES[qtype][1]
    raw = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    for offset in SCALE_FIELDS[qtype]:
        scale = rng.uniform(-0.05, 0.05, size=n_blocks).astype(np.float16)
        raw[:, offset : offset + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    return raw


def harness_dequantize(exe: Path, raw: np.ndarray, qtype: T) -> np.ndarray:
    n_blocks = raw.size // GGML_QUANT_SIZES[qtype][1]
    return _run(exe, "deq", int(qtype), n_blocks, 0, 0, raw)


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
def test_unpack_matches_gguf(harness: Path, qtype: T) -> None:
    raw = random_blocks(qtype, 64, np.random.default_rng(int(qtype)))
    expected = dequantize(raw, qtype).reshape(-1)
    got = harness_dequantize(harness, raw, qtype)
    # d*q + m versus gguf's d*(q - 8) etc.: equal up to float32 rounding
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())


def test_unpack_real_tensors(harness: Path, smollm_path: str, gemma_path: str) -> None:
    """Every quantized type of the two test models, on their real rows."""
    from hybridllm.gguf_file import ModelFile

    seen: set[int] = set()
    for path in (smollm_path, gemma_path):
        model = ModelFile(path)
        for layer in range(model.config.n_layers):
            for name, t in model.block_tensors(layer).items():
                if t.qtype in seen or t.qtype not in QUANT_TYPES:
                    continue
                seen.add(t.qtype)
                raw = np.ascontiguousarray(t.raw[:32])
                expected = dequantize(raw, t.qtype).reshape(-1)
                got = harness_dequantize(harness, raw, T(t.qtype))
                np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max(), err_msg=name)
    assert {T.Q4_1, T.Q5_0, T.Q8_0, T.Q4_K, T.Q6_K} <= seen


def quantize_q8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The `quantize_q8` kernel in numpy: x (n, k) -> yq (n, k) int8, yds (n, k/32, 4), x~ = d*q.

    As ggml's CPU quantize_row_q8_0/q8_1: q = x * (127/amax) rounded to nearest even (float32),
    d = fp16(amax/127); yds = (d, d * sum of q over elements 0..15, d * sum over 16..31,
    q8_1's s = fp16(d_f32 * sum of q)) per block of 32.
    """
    n, k = x.shape
    b = x.reshape(n, k // 32, 32).astype(np.float32)
    amax = np.abs(b).max(axis=-1)
    d = (amax / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(amax == 0, np.float32(0), np.float32(127) / amax).astype(np.float32)
    q = np.rint(b * inv[..., None]).astype(np.int8)  # float32 product, half to even
    qi = q.astype(np.int32)
    d16 = d.astype(np.float16).astype(np.float32)
    s_q8_1 = (d * qi.sum(-1)).astype(np.float16).astype(np.float32)
    sums = np.stack([d16, d16 * qi[..., :16].sum(-1), d16 * qi[..., 16:].sum(-1), s_q8_1], axis=-1)
    approx = (q.astype(np.float64) * d16[..., None]).reshape(n, k)
    return q.reshape(n, k), sums.astype(np.float32), approx


@pytest.mark.parametrize("ncols", [1, 3, 8])
@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
def test_dot_matches_exact_emulation(harness: Path, qtype: T, ncols: int) -> None:
    """mmvq's integer dot product is exactly W . x~ (x~ the 8-bit x; for Q4_1/Q5_1 the min
    times q8_1's s), up to float32 rounding.

    The per-sub-block offsets (from the harness's "subs" mode) only size the rounding bound.
    """
    rng = np.random.default_rng(100 * int(qtype) + ncols)
    rows, cols = 6, 512
    qk, size = GGML_QUANT_SIZES[qtype]
    raw = random_blocks(qtype, rows * cols // qk, rng)
    w = dequantize(raw, qtype).reshape(rows, cols).astype(np.float64)
    subs = _run(harness, "subs", int(qtype), raw.shape[0], 0, 0, raw).reshape(rows, cols // 32, 4)
    offset = np.repeat(subs[..., 2:4], 16, axis=-1).reshape(rows, cols).astype(np.float64)  # ml|mh
    x = rng.standard_normal((ncols, cols)).astype(np.float32)
    yq, yds, approx = quantize_q8(x)
    got = _run(harness, "dot", int(qtype), rows, cols, ncols, raw, yq, yds).reshape(ncols, rows)
    exact = approx @ w.T
    if qtype in (T.Q4_1, T.Q5_1):  # the block's min times q8_1's own rounded s, as ggml
        exact += yds[..., 3].astype(np.float64) @ subs[..., 2].T - approx @ offset.T
    scale = np.abs(x) @ (np.abs(w) + np.abs(offset)).T
    np.testing.assert_allclose(got, exact, rtol=0, atol=float(2e-6 * scale.max()))
    # and it is a good matmul: 8-bit activations cost well under 1% on random data
    reference = x.astype(np.float64) @ w.T
    assert np.linalg.norm(got - reference) < 1.5e-2 * np.linalg.norm(reference)


@pytest.mark.parametrize("ncols", [1, 5])
@pytest.mark.parametrize("qtype", FLOAT_TYPES, ids=lambda t: t.name)
def test_float_matvec(harness: Path, qtype: T, ncols: int) -> None:
    rng = np.random.default_rng(int(qtype))
    rows, cols = 5, 96
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    if qtype == T.F32:
        raw = w.view(np.uint8)
    elif qtype == T.F16:
        w = w.astype(np.float16).astype(np.float32)
        raw = w.astype(np.float16).view(np.uint8)
    else:  # bf16: the top half of the float32 bits
        bits = (w.view(np.uint32) >> 16).astype(np.uint16)
        w = (bits.astype(np.uint32) << 16).view(np.float32)
        raw = bits.view(np.uint8)
    x = rng.standard_normal((ncols, cols)).astype(np.float32)
    got = _run(harness, "mv", int(qtype), rows, cols, ncols, raw, x).reshape(ncols, rows)
    np.testing.assert_allclose(got, x.astype(np.float64) @ w.T.astype(np.float64), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("lanes", [8, 16])
def test_swiglu_matches_cpu_backend_bits(harness: Path, lanes: int) -> None:
    """The GPU's SiLU is ggml's vectorised expf, FMA for FMA: the CPU backend's bits exactly, in
    the order of a CPU with `lanes`-wide float SIMD (AVX2: 8, with its own expf; AVX-512: 16)."""
    from hybridllm.backends.cpu import _swiglu

    rng = np.random.default_rng(7)
    rows, k = 3, 1536 + 9  # 9 columns of scalar tail after the SIMD part
    gate = (rng.standard_normal((rows, k)) * 6).astype(np.float32)
    gate[0, :6] = [-90.0, -87.5, 0.0, -0.0, 88.0, 1e-8]  # the fast path's edges
    up = rng.standard_normal((rows, k)).astype(np.float32)
    got = _run(harness, "silu", lanes, rows, k, 0, gate, up).reshape(rows, k)
    expected = np.empty_like(gate)
    _swiglu(gate, up, expected, lanes)
    simd = k - k % lanes
    np.testing.assert_array_equal(got[:, :simd], expected[:, :simd])
    np.testing.assert_allclose(got[:, simd:], expected[:, simd:], rtol=1e-6)  # libm expf on both
