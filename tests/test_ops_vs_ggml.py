"""The block's float ops against ggml-cpu itself, bit for bit, through ctypes.

ggml is the llama.cpp build that llama-cpp-python loads (its own, or the one in
$LLAMA_CPP_LIB_PATH, e.g. an AVX2-only build); our side is backends/cpu.py with the lane count
of the C++ core (SIMD_LANES; HYBRIDLLM_CORE may select an AVX2 core), which the C++ block
matches bit for bit (test_core_block.py). So run these against a matching pair:

    HYBRIDLLM_CORE=<avx2 core> LLAMA_CPP_LIB_PATH=<avx2 llama.cpp>/bin pytest tests/test_ops_vs_ggml.py

Covered: ggml_vec_soft_max_f32 (ggml_v_expf of the ISA, chunk sums), ggml_vec_swiglu_f32
(ggml_v_silu body and libm tail), and the whole non-flash attention graph of llama.cpp
(mul_mat(K, Q) -> soft_max_ext(mask, scale) -> mul_mat(V^T, P)) for one query row (vec_dot
order) and for batches (tinyBLAS order), with a sliding window.
"""

from __future__ import annotations

import ctypes
import os

import numpy as np
import pytest

from hybridllm.backends import cpu
from hybridllm.backends.cpu import CpuBackend

F32, F16 = 0, 1  # ggml_type


def _lib(name: str) -> ctypes.CDLL:
    llama_cpp = pytest.importorskip("llama_cpp")
    lib_dir = os.environ.get("LLAMA_CPP_LIB_PATH") or os.path.join(
        os.path.dirname(llama_cpp.__file__), "lib"
    )
    path = os.path.join(lib_dir, name)
    if not os.path.exists(path):
        pytest.skip(f"{path} not found")
    return ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)


class InitParams(ctypes.Structure):
    _fields_ = [
        ("mem_size", ctypes.c_size_t),
        ("mem_buffer", ctypes.c_void_p),
        ("no_alloc", ctypes.c_bool),
    ]


@pytest.fixture(scope="module")
def ggml():  # noqa: ANN201
    base, cpu_lib = _lib("libggml-base.so"), _lib("libggml-cpu.so")
    cpu_lib.ggml_cpu_init()
    p = ctypes.c_void_p
    for fn, res, args in [
        ("ggml_init", p, [InitParams]),
        ("ggml_free", None, [p]),
        (
            "ggml_new_tensor_3d",
            p,
            [p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64],
        ),
        ("ggml_new_tensor_2d", p, [p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]),
        ("ggml_permute", p, [p, p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]),
        ("ggml_mul_mat", p, [p, p, p]),
        ("ggml_soft_max_ext", p, [p, p, p, ctypes.c_float, ctypes.c_float]),
        ("ggml_cont", p, [p, p]),
        ("ggml_new_graph", p, [p]),
        ("ggml_build_forward_expand", None, [p, p]),
        ("ggml_get_data", p, [p]),
    ]:
        f = getattr(base, fn)
        f.restype, f.argtypes = res, args
    cpu_lib.ggml_graph_compute_with_ctx.argtypes = [p, p, ctypes.c_int]
    cpu_lib.ggml_vec_soft_max_f32.restype = ctypes.c_double
    cpu_lib.ggml_vec_soft_max_f32.argtypes = [ctypes.c_int, p, p, ctypes.c_float]
    cpu_lib.ggml_vec_swiglu_f32.argtypes = [ctypes.c_int, p, p, p]
    return base, cpu_lib


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


def test_soft_max_exp_and_sum(ggml) -> None:  # noqa: ANN001
    """ggml_vec_soft_max_f32: y = ggml_v_expf(x - max) lane for lane, and its double sum."""
    _, lib = ggml
    rng = np.random.default_rng(1)
    n = 4096  # a multiple of every lane count: no libm tail
    x = np.concatenate([rng.uniform(-30, 0, n // 2), rng.uniform(-200, 0, n // 2)]).astype(
        np.float32
    )
    y = np.zeros(n, np.float32)
    total = lib.ggml_vec_soft_max_f32(n, _ptr(y), _ptr(x), np.float32(0.0))
    ours = np.array([cpu._v_expf(v, cpu.SIMD_LANES == 8) for v in x], np.float32)
    np.testing.assert_array_equal(ours.view(np.uint32), y.view(np.uint32))
    chunks = ours.reshape(-1, cpu.SIMD_LANES).T.copy()
    cpu._reduce_lanes(chunks, chunks.shape[1])  # each L-lane chunk by halving ...
    ours_total = 0.0
    for c in chunks[0]:  # ... into a double, in order
        ours_total += float(c)
    assert ours_total == total


def test_swiglu(ggml) -> None:  # noqa: ANN001
    """ggml_vec_swiglu_f32 vs CpuBackend.glu, with a tail past the last full vector."""
    _, lib = ggml
    rng = np.random.default_rng(2)
    n = 16 * 37 + 13
    g = (rng.standard_normal(n) * 4).astype(np.float32)
    g[:8] = [-95, -88, -87.5, 88.5, 95, -120, 0, 30]  # exp's rescaled and flushed ranges
    u = rng.standard_normal(n).astype(np.float32)
    y = np.zeros(n, np.float32)
    lib.ggml_vec_swiglu_f32(n, _ptr(y), _ptr(g), _ptr(u))
    ours = CpuBackend().glu(g[None], u[None], "silu")[0]
    np.testing.assert_array_equal(ours.view(np.uint32), y.view(np.uint32))


def _ggml_attention(ggml, q, k_cache, v_cache, pos0, window, scale):  # noqa: ANN001
    """llama.cpp's non-flash attention graph on cache cells 0..n_kv-1 (cell = position), n_kv
    padded to 256 as llama.cpp pads it."""
    base, lib = ggml
    n, H, dk = q.shape
    n_kv = -(-(pos0 + n) // 256) * 256
    KV = k_cache.shape[1] // dk
    dv = v_cache.shape[1] // KV
    ctx = base.ggml_init(InitParams(256 << 20, None, False))
    try:
        tq = base.ggml_new_tensor_3d(ctx, F32, dk, H, n)
        tk = base.ggml_new_tensor_3d(ctx, F16, dk, KV, n_kv)
        tv = base.ggml_new_tensor_3d(ctx, F16, n_kv, dv, KV)  # V cache transposed, as non-FA
        tm = base.ggml_new_tensor_2d(ctx, F32, n_kv, n)
        kv = np.zeros((n_kv, KV * dk), np.float16)
        kv[: k_cache.shape[0]] = k_cache
        vt = np.zeros((KV, dv, n_kv), np.float16)
        vt[:, :, : v_cache.shape[0]] = v_cache.reshape(-1, KV, dv).transpose(1, 2, 0)
        mask = np.full((n, n_kv), -np.inf, np.float32)
        for t in range(n):
            p = pos0 + t
            lo = max(0, p - window + 1) if window > 0 else 0
            mask[t, lo : p + 1] = 0
        for t_, arr in ((tq, np.ascontiguousarray(q, np.float32)), (tk, kv), (tv, vt), (tm, mask)):
            ctypes.memmove(base.ggml_get_data(t_), arr.ctypes.data, arr.nbytes)
        qp = base.ggml_permute(ctx, tq, 0, 2, 1, 3)  # [dk, n, H]
        kp = base.ggml_permute(ctx, tk, 0, 2, 1, 3)  # [dk, n_kv, KV]
        kq = base.ggml_mul_mat(ctx, kp, qp)  # [n_kv, n, H]
        kq = base.ggml_soft_max_ext(ctx, kq, tm, scale, 0.0)
        kqv = base.ggml_mul_mat(ctx, tv, kq)  # [dv, n, H]
        out = base.ggml_cont(ctx, base.ggml_permute(ctx, kqv, 0, 2, 1, 3))  # [dv, H, n]
        graph = base.ggml_new_graph(ctx)
        base.ggml_build_forward_expand(graph, out)
        lib.ggml_graph_compute_with_ctx(ctx, graph, 2)
        res = np.empty((n, H * dv), np.float32)
        ctypes.memmove(res.ctypes.data, base.ggml_get_data(out), res.nbytes)
        return res
    finally:
        base.ggml_free(ctx)


@pytest.mark.parametrize(
    ("n", "pos0", "window", "dk", "heads"),
    [
        (1, 200, 0, 64, (9, 3)),  # one row: ggml_vec_dot_f16 for Q.K and P.V (SmolLM2 shape)
        (1, 37, 0, 256, (4, 1)),  # gemma3 shape, an unaligned length
        (1, 100, 0, 48, (4, 2)),  # dk with vec_dot leftovers (48 % 32, 48 % 64)
        (24, 0, 0, 64, (9, 3)),  # batch: tinyBLAS tiles
        (20, 150, 0, 256, (4, 1)),
        (19, 120, 50, 64, (4, 2)),  # sliding window
        (1, 700, 0, 64, (9, 3)),  # past 512 cells: n_kv 768
        (12, 530, 512, 256, (4, 1)),  # gemma3's 512-cell window at depth
        # one row at lengths around the 16-key score groups and the 64 P.V chains
        *((1, pos0, 0, 64, (9, 3)) for pos0 in (0, 14, 15, 16, 47, 63, 64, 65, 127, 300, 510)),
        (1, 300, 100, 64, (9, 3)),  # a window starting inside a group and a chain round
        (1, 130, 0, 256, (4, 1)),
        (1, 520, 512, 256, (4, 1)),
    ],
)
def test_attention_graph(ggml, n, pos0, window, dk, heads) -> None:  # noqa: ANN001
    H, KV = heads
    dv = dk
    rng = np.random.default_rng(n * 1000 + pos0)
    T = pos0 + n
    k_cache = (rng.standard_normal((T, KV * dk)) * 2).astype(np.float16)
    v_cache = rng.standard_normal((T, KV * dv)).astype(np.float16)
    q = (rng.standard_normal((n, H, dk)) * 2).astype(np.float32)
    scale = np.float32(1.0 / np.sqrt(dk))
    ours = CpuBackend(n_threads=2).attention(q, k_cache, v_cache, pos0, window, float(scale))
    theirs = _ggml_attention(ggml, q, k_cache, v_cache, pos0, window, float(scale))
    np.testing.assert_array_equal(ours.view(np.uint32), theirs.view(np.uint32))
