"""The CUDA backend against the CPU backend, op by op, block by block and model by model.

On a machine where CuPy sees a CUDA device these run on it; everywhere else (CI) they run the
unchanged `cuda_kernels.cu` and `backends/cuda.py` on the SIMT emulator and the CuPy stand-in
of tests/gpu_emulator (the `cupy_module` fixture of conftest.py), so none is skipped for lack
of a GPU. Tolerances say what differs on purpose:
- matmul: the 32-element block types (Q4_0 Q4_1 Q5_0 Q5_1 Q8_0) are the CPU's bit for bit at
  every width (q8_0/q8_1 activations, the CPU kernels' float order); K-quants share those
  8-bit blocks of 32 where the CPU uses q8_K, and float weights go through f16 + cuBLAS for a
  prompt chunk, so those are held to a float64 reference of the dequantized weight and to the
  CPU within tolerances;
- attention follows ggml's float order for the CPU's SIMD width: bit for bit;
- the small ops use the CPU's formulas (f16 rounding points, the GELU table, ggml's expf for
  SiLU, the CPU's rope table and FMA), so rope, GELU, SiLU and store_kv match bit for bit and
  RMSNorm to float32 rounding.
The host-side checks of the kernels' block decoding live in test_cuda_kernels_host.py.

On a GPU machine that cannot download the models, `python bench/trim_gguf.py --out DIR` here
makes copies with the blocks these tests use (31 MiB together), and
HYBRIDLLM_GPU_TEST_MODELS=DIR there points the tests at them.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from hybridllm import catalog
from hybridllm.backends.cpu import CpuBackend, Matrix, RopeSpec, _swiglu
from hybridllm.errors import ConfigError, DeviceError
from hybridllm.gguf_file import ModelFile
from hybridllm.model import BLOCK_MATRICES, Model, PyBlock, block_cfg, block_weights

pytestmark = pytest.mark.gpu
T = GGMLQuantizationType
BLOCK32_TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]
QUANT_TYPES = [*BLOCK32_TYPES, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]
SCALE_FIELDS = {
    T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q8_0: (0,),
    T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,),
}  # fmt: skip


@pytest.fixture(scope="module")
def cp(cupy_module: Any) -> Any:
    return cupy_module


@pytest.fixture(scope="module")
def CudaBackend(cp: Any) -> Any:
    """backends.cuda imported against this module's cupy (real, or the emulator's stand-in)."""
    return importlib.import_module("hybridllm.backends.cuda").CudaBackend


@pytest.fixture(scope="module")
def gpu(CudaBackend: Any) -> Any:
    return CudaBackend()


@pytest.fixture(scope="module")
def cpu() -> CpuBackend:
    return CpuBackend()


def _model(name: str, request: pytest.FixtureRequest, fixture: str) -> ModelFile:
    """A trimmed copy from $HYBRIDLLM_GPU_TEST_MODELS (bench/trim_gguf.py) or the catalog's model."""
    folder = os.environ.get("HYBRIDLLM_GPU_TEST_MODELS")
    if folder and (Path(folder) / catalog.entry(name).filename).is_file():
        return ModelFile(Path(folder) / catalog.entry(name).filename)
    return ModelFile(request.getfixturevalue(fixture))


@pytest.fixture(scope="module")
def smollm(request: pytest.FixtureRequest) -> ModelFile:
    return _model("smollm2-135m", request, "smollm_path")


@pytest.fixture(scope="module")
def gemma(request: pytest.FixtureRequest) -> ModelFile:
    return _model("gemma3-270m", request, "gemma_path")


def _rows(n: int, k: int, seed: int = 0, scale: float = 1.0) -> np.ndarray:
    return (scale * np.random.default_rng(seed).standard_normal((n, k))).astype(np.float32)


def _rel(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(got.astype(np.float64) - expected) / np.linalg.norm(expected))


def _random_matrix(qtype: T, rows: int, cols: int, rng: np.random.Generator) -> tuple[Matrix, np.ndarray]:
    """A matrix of random blocks (finite scales) and its float64 dequantization."""
    if qtype in (T.F32, T.F16, T.BF16):
        w = rng.standard_normal((rows, cols)).astype(np.float32)
        if qtype == T.F32:
            raw = w.view(np.uint8)
        elif qtype == T.F16:
            raw, w = w.astype(np.float16).view(np.uint8), w.astype(np.float16).astype(np.float32)
        else:
            bits = (w.view(np.uint32) >> 16).astype(np.uint16)
            raw, w = bits.view(np.uint8), (bits.astype(np.uint32) << 16).view(np.float32)
        return Matrix(np.ascontiguousarray(raw), int(qtype), rows, cols), w.astype(np.float64)
    qk, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows * cols // qk, size), dtype=np.uint8)
    for offset in SCALE_FIELDS[qtype]:
        scale = rng.uniform(-0.05, 0.05, size=raw.shape[0]).astype(np.float16)
        raw[:, offset : offset + 2] = scale.view(np.uint8).reshape(-1, 2)
    w = dequantize(raw, qtype).reshape(rows, cols).astype(np.float64)
    return Matrix(raw.reshape(rows, -1), int(qtype), rows, cols), w


# --- matmul -------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 3, 8, 11, 64])
@pytest.mark.parametrize("qtype", [*QUANT_TYPES, T.F32, T.F16, T.BF16], ids=lambda t: t.name)
def test_matmul_every_type(gpu: Any, qtype: T, n: int) -> None:
    """Every matmul path against float64: 8-bit activations for the quantized types at any n,
    float weights through the matrix-vector kernels (n <= 32) and f16 + cuBLAS (n = 64)."""
    rng = np.random.default_rng(int(qtype) * 100 + n)
    m, w = _random_matrix(qtype, 72, 512, rng)
    x = _rows(n, 512, seed=n)
    got = gpu.to_host(gpu.matmul(gpu.load_matrix(m), gpu.from_host(x)))
    assert got.shape == (n, 72)
    # 8-bit activations cost ~1% on random data; f16 activations and weights ~0.1%
    if qtype in QUANT_TYPES:
        limit = 2e-2
    else:
        limit = 1e-5 if qtype == T.F32 and n <= 32 else 3e-3
    assert _rel(got, x.astype(np.float64) @ w.T) < limit


@pytest.mark.parametrize("n", [1, 5, 40])
def test_matmul_real_weights_match_cpu(gpu: Any, cpu: CpuBackend, smollm: ModelFile, gemma: ModelFile, n: int) -> None:
    for model in (smollm, gemma):
        for layer in (0, 1):  # gemma: Q5_0, Q8_0, Q4_K, Q6_K; smollm: Q4_1
            weights = block_weights(model, layer)
            for name in BLOCK_MATRICES:
                m = Matrix(*weights[name])
                x = _rows(n, m.cols, seed=layer)
                reference = x.astype(np.float64) @ dequantize(np.asarray(m.raw), m.qtype).reshape(m.rows, m.cols).T.astype(np.float64)
                got = gpu.to_host(gpu.matmul(gpu.load_matrix(m), gpu.from_host(x)))
                on_cpu = cpu.matmul(m, x)
                assert _rel(got, reference) < 2e-2, (name, layer)
                if m.qtype in BLOCK32_TYPES:
                    np.testing.assert_array_equal(got, on_cpu, err_msg=f"{name} {layer}")
                else:
                    assert _rel(got, on_cpu) < 3e-2, (name, layer)


def test_quantized_input_is_reused_until_changed(gpu: Any, smollm: ModelFile) -> None:
    """q/k/v share one quantized input; an in-place add must not leave a stale copy behind."""
    m = gpu.load_matrix(Matrix(*block_weights(smollm, 0)["attn_q"]))
    x = gpu.from_host(_rows(1, m.cols))
    first = gpu.to_host(gpu.matmul(m, x))
    assert np.array_equal(gpu.to_host(gpu.matmul(m, x)), first)
    gpu.add(x, gpu.from_host(_rows(1, m.cols, seed=9)))
    second = gpu.to_host(gpu.matmul(m, x))
    expected = gpu.to_host(gpu.matmul(m, gpu.from_host(gpu.to_host(x))))
    assert np.array_equal(second, expected) and not np.array_equal(second, first)


# --- small ops ----------------------------------------------------------------------------
@pytest.mark.parametrize("k", [64, 256, 640, 2048])
def test_rms_norm(gpu: Any, cpu: CpuBackend, k: int) -> None:
    x, w = _rows(7, k, scale=30.0), _rows(1, k, seed=1)[0]
    got = gpu.to_host(gpu.rms_norm(gpu.from_host(x), gpu.load_vector(w), 1e-6))
    np.testing.assert_allclose(got, cpu.rms_norm(x, w, 1e-6), rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("neox", [False, True])
@pytest.mark.parametrize("pos0", [0, 5000])
def test_rope(gpu: Any, cpu: CpuBackend, neox: bool, pos0: int) -> None:
    for dim, head_dim, base in ((64, 64, 100000.0), (256, 256, 1e6), (32, 64, 10000.0)):
        spec = RopeSpec(base, dim, 1.0, neox, 8192)
        x = _rows(5, 3 * head_dim, seed=dim).reshape(5, 3, head_dim)
        expected = x.copy()
        cpu.rope(expected, pos0, spec)
        on_gpu = gpu.from_host(x).reshape(5, 3, head_dim)
        gpu.rope(on_gpu, pos0, spec)
        # the CPU's cos/sin table and ggml's FMA rounding: the same bits
        np.testing.assert_array_equal(gpu.to_host(on_gpu), expected)


def test_store_kv_rounds_like_numpy(gpu: Any, cpu: CpuBackend) -> None:
    rows = _rows(9, 192, scale=10.0)
    ours, theirs = gpu.kv_cache(32, 192), cpu.kv_cache(32, 192)
    gpu.store_kv(ours, 5, gpu.from_host(rows))
    cpu.store_kv(theirs, 5, rows)
    assert np.array_equal(gpu.to_host(ours), theirs.astype(np.float32))


ATTENTION_CASES = [  # (n, pos0, window)
    (1, 0, 0), (1, 9, 0), (1, 700, 512),  # one row: ggml_vec_dot_f16's four accumulators
    (3, 513, 512), (16, 40, 0), (17, 0, 0), (40, 30, 0), (64, 600, 512), (100, 0, 32),  # tinyBLAS's one
]  # fmt: skip


def filled_caches(cpu: CpuBackend, gpu: Any, n_ctx: int, k_rows: np.ndarray, v_rows: np.ndarray) -> tuple:
    """K and V caches of n_ctx rows on the CPU and on the GPU, rows 0.. holding k_rows / v_rows
    -> (cpu K, cpu V, gpu K, gpu V)."""
    kc, vc = cpu.kv_cache(n_ctx, k_rows.shape[1]), cpu.kv_cache(n_ctx, v_rows.shape[1])
    cpu.store_kv(kc, 0, k_rows)
    cpu.store_kv(vc, 0, v_rows)
    gkc, gvc = gpu.kv_cache(n_ctx, k_rows.shape[1]), gpu.kv_cache(n_ctx, v_rows.shape[1])
    gpu.store_kv(gkc, 0, gpu.from_host(k_rows))
    gpu.store_kv(gvc, 0, gpu.from_host(v_rows))
    return kc, vc, gkc, gvc


# d = 80: one row's dot leaves dims past the last 4 x SIMD lanes to scalar products (in double)
@pytest.mark.parametrize(("n_heads", "n_kv", "d"), [(9, 3, 64), (4, 1, 256), (8, 8, 128), (2, 1, 80)])
@pytest.mark.parametrize(("n", "pos0", "window"), ATTENTION_CASES)
def test_attention(gpu: Any, cpu: CpuBackend, n: int, pos0: int, window: int, n_heads: int, n_kv: int, d: int) -> None:
    n_ctx = 1024
    k_rows, v_rows = _rows(pos0 + n, n_kv * d, seed=4), _rows(pos0 + n, n_kv * d, seed=5)
    kc, vc, gkc, gvc = filled_caches(cpu, gpu, n_ctx, k_rows, v_rows)
    q = _rows(n, n_heads * d, seed=6).reshape(n, n_heads, d)
    scale = 1.0 / np.sqrt(d)
    expected = cpu.attention(q, kc, vc, pos0, window, scale)
    got = gpu.to_host(gpu.attention(gpu.from_host(q), gkc, gvc, pos0, window, scale))
    assert got.shape == expected.shape == (n, n_heads * d)
    np.testing.assert_array_equal(got, expected)  # ggml's order for the CPU's SIMD lanes


@pytest.mark.parametrize("lanes", [8, 16])
@pytest.mark.parametrize(("n", "pos0", "window"), [(1, 9, 0), (1, 700, 512), (40, 30, 0)])
def test_attention_for_either_simd_width(
    gpu: Any, cpu: CpuBackend, monkeypatch: pytest.MonkeyPatch, lanes: int, n: int, pos0: int, window: int
) -> None:
    """The CPU's attention order depends on its SIMD width (AVX2: 8 lanes and its own expf and
    register sums, AVX-512: 16); the GPU follows whichever the CPU backend uses, bit for bit."""
    monkeypatch.setattr("hybridllm.backends.cpu.SIMD_LANES", lanes)
    monkeypatch.setattr(f"{type(gpu).__module__}.SIMD_LANES", lanes)
    n_heads, n_kv, d = 9, 3, 80
    k_rows, v_rows = _rows(pos0 + n, n_kv * d, seed=14), _rows(pos0 + n, n_kv * d, seed=15)
    kc, vc, gkc, gvc = filled_caches(cpu, gpu, 1024, k_rows, v_rows)
    q = _rows(n, n_heads * d, seed=16, scale=3.0).reshape(n, n_heads, d)  # peaked softmax rows
    expected = cpu.attention(q, kc, vc, pos0, window, 0.125)
    np.testing.assert_array_equal(gpu.to_host(gpu.attention(gpu.from_host(q), gkc, gvc, pos0, window, 0.125)), expected)


@pytest.mark.parametrize("lanes", [8, 16])
@pytest.mark.parametrize("k", [2048, 1536 + 9])
def test_glu(gpu: Any, cpu: CpuBackend, monkeypatch: pytest.MonkeyPatch, k: int, lanes: int) -> None:
    """SiLU follows the CPU's SIMD width (AVX2: 8 lanes and its own ggml_v_expf, AVX-512: 16)."""
    monkeypatch.setattr(f"{type(gpu).__module__}.SIMD_LANES", lanes)
    gate, up = _rows(5, k, seed=2, scale=4.0), _rows(5, k, seed=3)
    gate[0, :4] = [-12.0, 12.0, -10.0, 10.0]  # the table's cut-offs
    g, u = gpu.from_host(gate), gpu.from_host(up)
    got = gpu.to_host(gpu.glu(g, u, "gelu_tanh"))
    assert np.array_equal(got, cpu.glu(gate, up, "gelu_tanh"))  # the same f16 table
    got = gpu.to_host(gpu.glu(g, u, "silu"))
    expected = np.empty_like(gate)
    _swiglu(gate, up, expected, lanes)
    simd = k - k % lanes  # ggml_v_expf, FMA for FMA; the tail is libm's expf vs CUDA's expf
    np.testing.assert_array_equal(got[:, :simd], expected[:, :simd])
    np.testing.assert_allclose(got[:, simd:], expected[:, simd:], rtol=1e-6)


def test_add_and_round_trip(gpu: Any) -> None:
    x, y = _rows(3, 576), _rows(3, 576, seed=1)
    before = gpu.bytes_to_device, gpu.bytes_to_host
    on_gpu = gpu.from_host(x)
    gpu.add(on_gpu, gpu.from_host(y))
    assert np.array_equal(gpu.to_host(on_gpu), x + y)
    assert gpu.bytes_to_device - before[0] == 2 * x.nbytes and gpu.bytes_to_host - before[1] == x.nbytes
    big = _rows(512, 640)  # larger than the first pinned buffer: it grows
    assert np.array_equal(gpu.to_host(gpu.from_host(big)), big)


# --- blocks and models --------------------------------------------------------------------
@pytest.mark.parametrize("which", ["smollm", "gemma"])
def test_block_matches_cpu(which: str, request: pytest.FixtureRequest, cpu: CpuBackend, CudaBackend: Any) -> None:
    model: ModelFile = request.getfixturevalue(which)
    gpu = CudaBackend()
    layer = 5 if which == "gemma" else 0  # gemma's layer 5 is a global (no window) layer
    for lay in (0, layer):
        cfg, weights = block_cfg(model.config, lay), block_weights(model, lay)
        on_cpu, on_gpu = PyBlock(cfg, weights, 128, cpu), PyBlock(cfg, weights, 128, gpu)
        x = _rows(40, model.config.dim)
        for pos0, chunk in ((0, x), (40, x[:1]), (41, x[1:2]), (42, x[2:5])):
            a, b = chunk.copy(), gpu.from_host(chunk)
            on_cpu.forward(a, pos0)
            on_gpu.forward(b, pos0)
            if which == "smollm":  # Q4_1 matmuls and attention in the CPU's order
                np.testing.assert_array_equal(gpu.to_host(b), a, err_msg=f"{lay} {pos0}")
            else:  # gemma's K-quants: 8-bit blocks of 32 where the CPU has q8_K, through 7
                # matmuls and 4 norms: measured up to 3.7e-2 on its layer 0
                assert _rel(gpu.to_host(b), a) < 6e-2, (lay, pos0)


@pytest.mark.parametrize("which", ["smollm", "gemma"])
def test_model_all_and_half_on_gpu(which: str, request: pytest.FixtureRequest, CudaBackend: Any) -> None:
    model: ModelFile = request.getfixturevalue(which)
    n_layers, n_ctx = model.config.n_layers, 256
    gpu, cpu = CudaBackend(), CpuBackend()
    reference = Model(model, n_ctx)
    tokens = [2, 651, 3037, 576, 2081, 603, 1105, 3265, 714, 4033, 576]  # < 4096: trimmed copies
    if which == "smollm":
        tokens = [1, 504, 3458, 314, 260, 1345, 28, 42, 2552, 282, 253]
    expected = reference.forward(tokens, 0, first_logit=0)
    for n_gpu in (n_layers, n_layers // 2):
        mixed = Model(model, n_ctx, backends=[cpu] * (n_layers - n_gpu) + [gpu] * n_gpu)
        got = mixed.forward(tokens, 0, first_logit=0)
        step = mixed.forward([42], len(tokens))
        want_step = reference.forward([42], len(tokens))
        if which == "smollm":  # every op of its blocks is the CPU's bit for bit
            np.testing.assert_array_equal(got, expected)
            np.testing.assert_array_equal(step, want_step)
            continue
        # gemma3's K-quants round their activations otherwise than the CPU (q8_K), and gemma3
        # amplifies any rounding: measured on the emulator with all 18 blocks on the GPU, 8.0e-2
        assert _rel(got, expected) < 1.2e-1, n_gpu
        assert np.mean(got.argmax(-1) == expected.argmax(-1)) >= 0.8, n_gpu
        assert _rel(step, want_step) < 1.2e-1


def test_out_of_memory_is_device_error(smollm: ModelFile, cp: Any, CudaBackend: Any) -> None:
    m = Matrix(*block_weights(smollm, 0)["ffn_up"])
    gpu = CudaBackend()
    pool = cp.get_default_memory_pool()
    old_limit = pool.get_limit()
    pool.free_all_blocks()
    pool.set_limit(size=pool.used_bytes() + 1024)
    try:
        with pytest.raises(DeviceError, match="out of memory") as info:
            gpu.load_matrix(m)
    finally:
        pool.set_limit(size=old_limit)
    assert info.value.asked_bytes == m.raw.nbytes  # type: ignore[attr-defined]


# --- every type, every decode width, prefill shapes ----------------------------------------
ALL_TYPES = [*QUANT_TYPES, T.F32, T.F16, T.BF16]


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_matmul_decode_1_to_32_and_prefill_vs_cpu(gpu: Any, cpu: CpuBackend, qtype: T) -> None:
    """n = 1..32 (every remainder of the tiles and of the 8-row matrix-vector launches) and
    prefill widths against the CPU kernels and a float64 reference. 8-bit activations on both
    sides part ~1e-2 from float64 on random data (the 32-block types not at all from the CPU);
    f16 activations ~1e-3."""
    rng = np.random.default_rng(int(qtype))
    m, w = _random_matrix(qtype, 40, 768, rng)  # 768: K-types get 3 blocks per row
    dev = gpu.load_matrix(m)
    x = _rows(130, 768, seed=int(qtype))
    for n in [*range(1, 33), 33, 64, 130]:
        got = gpu.to_host(gpu.matmul(dev, gpu.from_host(x[:n])))
        exact = x[:n].astype(np.float64) @ w.T
        if qtype in QUANT_TYPES:
            limit = 2e-2
        elif qtype == T.F32 and n <= 32:
            limit = 1e-5  # f32 weights and activations, only the summation order differs
        else:
            limit = 3e-3
        assert _rel(got, exact) < limit, n
        on_cpu = cpu.matmul(m, x[:n])
        if qtype in BLOCK32_TYPES:
            np.testing.assert_array_equal(got, on_cpu, err_msg=str(n))
        else:  # the CPU rounds its activations its own way (q8_K, or f16 for F16 weights)
            assert _rel(got, on_cpu) < (3e-2 if qtype in QUANT_TYPES else 2 * limit), n


@pytest.mark.parametrize("qtype", BLOCK32_TYPES, ids=lambda t: t.name)
def test_matmul_of_32_block_types_is_the_cpus(gpu: Any, cpu: CpuBackend, qtype: T) -> None:
    """These types quantize their activations as the CPU does (q8_0/q8_1: x * 127/amax rounded
    to nearest even, fp16 d, q8_1's fp16 s) and sum in the CPU kernels' order (8 float lanes
    of 4-element integer dots, or Q4_0's one chain), so the results are the CPU's bit for bit,
    for decode widths and prompt tiles alike, with an outlier column as real activations have."""
    rng = np.random.default_rng(int(qtype) + 100)
    m, _ = _random_matrix(qtype, 40, 768, rng)
    dev = gpu.load_matrix(m)
    x = _rows(70, 768, seed=int(qtype) + 100)
    x[:, 5] *= 40.0
    for n in (1, 5, 8, 32, 33, 70):
        got = gpu.to_host(gpu.matmul(dev, gpu.from_host(x[:n])))
        np.testing.assert_array_equal(got, cpu.matmul(m, x[:n]), err_msg=str(n))


@pytest.mark.parametrize("qtype", [T.Q4_1, T.Q4_K], ids=lambda t: t.name)
def test_cublas_prefill_on_request(CudaBackend: Any, monkeypatch: pytest.MonkeyPatch, qtype: T) -> None:
    """HYBRIDLLM_CUDA_PREFILL=cublas: prompt widths dequantize the weight to f16 (a scratch of
    the matrix's size, counted at load) and round the activations to f16 for cuBLAS."""
    monkeypatch.setenv("HYBRIDLLM_CUDA_PREFILL", "cublas")
    gpu = CudaBackend()
    rng = np.random.default_rng(7)
    m, w = _random_matrix(qtype, 40, 768, rng)
    dev = gpu.load_matrix(m)
    assert gpu.scratch_bytes == 2 * 40 * 768
    x = _rows(40, 768, seed=7)
    got = gpu.to_host(gpu.matmul(dev, gpu.from_host(x)))
    assert _rel(got, x.astype(np.float64) @ w.T) < 3e-3  # f16 activations, not 8-bit ones
    monkeypatch.setenv("HYBRIDLLM_CUDA_PREFILL", "cuBLAS")
    with pytest.raises(ConfigError, match="HYBRIDLLM_CUDA_PREFILL='cuBLAS': expected 'mmq' or 'cublas'"):
        CudaBackend()


@pytest.mark.parametrize("qtype", [*QUANT_TYPES, T.BF16], ids=lambda t: t.name)
def test_dequantize_to_f16_is_exact(gpu: Any, qtype: T) -> None:
    """The prefill path's f16 weights equal gguf's dequantization rounded to f16 (values: Q3_K
    and Q6_K give +0 where gguf gives -0)."""
    rng = np.random.default_rng(100 + int(qtype))
    m, w = _random_matrix(qtype, 24, 512, rng)
    dev = gpu.load_matrix(m)
    got = gpu.to_host(gpu._weight_f16(dev))  # (24, 512) f16 scratch -> f32, exact
    np.testing.assert_array_equal(got, w.astype(np.float16).astype(np.float32))
