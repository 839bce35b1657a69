"""Rope (backends/cpu.py's table and rotation) against ggml_rope_ext itself, bit for bit.

ggml is the llama.cpp build that llama-cpp-python loads (or the one in $LLAMA_CPP_LIB_PATH).
Covered: frequency bases and head widths where powf(base, -2.0f/dim) and pow in double differ,
both layouts, linear scaling, YaRN (ext_factor, corr_dims, attn_factor) and per-pair frequency
factors (Llama 3.1's rope_freqs, LongRoPE), at positions up to 8k. The C++ block builds the
same table (test_architectures.py holds it equal to the Python block).
"""

from __future__ import annotations

import ctypes
import os

import numpy as np
import pytest

from hybridllm.backends.cpu import CpuBackend, RopeSpec
from hybridllm.config import _yarn_corr_dims

F32, I32 = 0, 26  # ggml_type
NEOX = 2  # GGML_ROPE_TYPE_NEOX


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


def _lib(name: str) -> ctypes.CDLL:
    llama_cpp = pytest.importorskip("llama_cpp")
    lib_dir = os.environ.get("LLAMA_CPP_LIB_PATH") or os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    path = os.path.join(lib_dir, name)
    if not os.path.exists(path):
        pytest.skip(f"{path} not found")
    return ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)


@pytest.fixture(scope="module")
def ggml():  # noqa: ANN201
    base, cpu_lib = _lib("libggml-base.so"), _lib("libggml-cpu.so")
    cpu_lib.ggml_cpu_init()
    p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    for fn, res, args in [
        ("ggml_init", p, [_InitParams]),
        ("ggml_free", None, [p]),
        ("ggml_new_tensor_1d", p, [p, i, ctypes.c_int64]),
        ("ggml_new_tensor_3d", p, [p, i, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]),
        ("ggml_rope_ext", p, [p, p, p, p, i, i, i, f, f, f, f, f, f]),
        ("ggml_new_graph", p, [p]),
        ("ggml_build_forward_expand", None, [p, p]),
        ("ggml_get_data", p, [p]),
    ]:
        getattr(base, fn).restype, getattr(base, fn).argtypes = res, args
    cpu_lib.ggml_graph_compute_with_ctx.argtypes = [p, p, i]
    return base, cpu_lib


def _ggml_rope(ggml, x, pos, factors, mode, n_ctx_orig, base_, freq_scale, ext, attn):  # noqa: ANN001
    """ggml_rope_ext of x (n, heads, dim) at positions pos, as llama.cpp's graphs call it."""
    base, lib = ggml
    n, heads, dim = x.shape
    ctx = base.ggml_init(_InitParams(64 << 20, None, False))
    try:
        tx = base.ggml_new_tensor_3d(ctx, F32, dim, heads, n)
        tp = base.ggml_new_tensor_1d(ctx, I32, n)
        tf = None
        data = [(tx, np.ascontiguousarray(x, np.float32)), (tp, np.asarray(pos, np.int32))]
        if factors is not None:
            tf = base.ggml_new_tensor_1d(ctx, F32, len(factors))
            data.append((tf, np.asarray(factors, np.float32)))
        for t, arr in data:
            ctypes.memmove(base.ggml_get_data(t), arr.ctypes.data, arr.nbytes)
        out = base.ggml_rope_ext(ctx, tx, tp, tf, dim, mode, n_ctx_orig, base_, freq_scale, ext, attn, 32.0, 1.0)
        graph = base.ggml_new_graph(ctx)
        base.ggml_build_forward_expand(graph, out)
        lib.ggml_graph_compute_with_ctx(ctx, graph, 2)
        res = np.empty_like(x, dtype=np.float32)
        ctypes.memmove(res.ctypes.data, base.ggml_get_data(out), res.nbytes)
        return res
    finally:
        base.ggml_free(ctx)


@pytest.mark.parametrize("neox", [False, True])
@pytest.mark.parametrize(
    ("base", "dim"), [(10_000.0, 64), (250_000.0, 80), (1_000_000.0, 112), (500_000.0, 128), (10_000.0, 96)]
)
@pytest.mark.parametrize(
    ("kind", "factor", "ext", "attn", "n_ctx_orig"),
    [("none", 1.0, 0.0, 1.0, 4096), ("linear", 4.0, 0.0, 1.0, 4096), ("linear", 1.0, 0.0, 1.19, 4096),
     ("yarn", 4.0, 1.0, 1.0, 4096), ("yarn", 8.0, 1.0, 1.25, 1024)],
)  # fmt: skip
@pytest.mark.parametrize("with_factors", [False, True])
def test_rope_equals_ggml(  # noqa: PLR0913
    ggml, neox, base, dim, kind, factor, ext, attn, n_ctx_orig, with_factors  # noqa: ANN001
) -> None:
    rng = np.random.default_rng(dim)
    positions = np.array([0, 1, 2, 7, 100, 1023, 1024, 4095, 4097, 8191])
    x = (rng.standard_normal((len(positions), 3, dim)) * 3).astype(np.float32)
    factors = None
    if with_factors:  # Llama 3's shape: 1 for high frequencies, up to ~8 for low ones
        factors = tuple(float(v) for v in np.geomspace(1.0, 8.0, dim // 2).astype(np.float32) * np.float32(1.03))
    freq_scale = float(np.float32(1.0) / np.float32(factor))
    theirs = _ggml_rope(ggml, x, positions, factors, NEOX if neox else 0, n_ctx_orig, base, freq_scale, ext, attn)
    spec = RopeSpec(
        base, dim, factor, neox, 8192, ext_factor=ext, attn_factor=attn,
        corr_dims=_yarn_corr_dims(dim, n_ctx_orig, base, 32.0, 1.0) if ext else (0.0, 0.0),
        freq_factors=factors,
    )  # fmt: skip
    ours = np.empty_like(x)
    for j, p in enumerate(positions):  # our rope takes consecutive positions from pos0
        row = x[j : j + 1].copy()
        CpuBackend().rope(row, int(p), spec)
        ours[j] = row[0]
    np.testing.assert_array_equal(ours.view(np.uint32), theirs.view(np.uint32))
