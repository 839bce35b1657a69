"""The forward pass: CPU backend ops against references, the block, the model, the _core contract."""

from __future__ import annotations

import ctypes
import ctypes.util
import math

import numpy as np
import pytest

import hybridllm.model as model_mod
from hybridllm.backends.cpu import CpuBackend, Matrix, RopeSpec, _round_f16, rope_table
from hybridllm.config import ModelConfig
from hybridllm.errors import ContextFullError
from hybridllm.gguf_file import ModelFile
from hybridllm.model import (
    BLOCK_MATRICES,
    Model,
    PyBlock,
    block_cfg,
    block_weights,
    core_block_class,
)

RNG = np.random.default_rng(0)


def _rand(*shape: int, scale: float = 1.0) -> np.ndarray:
    return (scale * RNG.standard_normal(shape)).astype(np.float32)


# --- tiny models, shared by the test modules of one session ------------------------------------
@pytest.fixture(scope="module")
def tiny_llama(tiny_llama_path: str) -> ModelFile:
    return ModelFile(tiny_llama_path)


# --- ops ----------------------------------------------------------------------------------------
def test_rope_table_is_bit_identical_to_ggml() -> None:
    """theta = pos * base^(-2i/d), multiplied up in float32, then libm cosf/sinf (as ggml)."""
    libm = ctypes.CDLL(ctypes.util.find_library("m"))
    for fn in (libm.cosf, libm.sinf):
        fn.restype, fn.argtypes = ctypes.c_float, [ctypes.c_float]
    spec = RopeSpec(10_000.0, 16, 1.0, False, 40)
    cos, sin = rope_table(spec)
    scale = np.float32(10_000.0 ** (-2.0 / 16))
    for p in range(40):
        theta = np.float32(p)
        for i in range(8):
            assert cos[p, i] == np.float32(libm.cosf(float(theta)))
            assert sin[p, i] == np.float32(libm.sinf(float(theta)))
            theta = np.float32(theta * scale)


@pytest.mark.parametrize("neox", [False, True])
def test_rope_rotates_pairs(neox: bool) -> None:
    n, heads, d, rope_dim, pos0 = 5, 3, 16, 8, 7  # partial rotary: the last 8 dims pass through
    x = _rand(n, heads, d)
    y = x.copy()
    CpuBackend().rope(y, pos0, RopeSpec(500.0, rope_dim, 1.0, neox, 64))
    half = rope_dim // 2
    theta = np.arange(pos0, pos0 + n)[:, None, None] * 500.0 ** (-2.0 * np.arange(half) / rope_dim)
    a = np.arange(half) if neox else 2 * np.arange(half)
    b = a + half if neox else a + 1
    ref = x.astype(np.float64).copy()
    ref[..., a] = x[..., a] * np.cos(theta) - x[..., b] * np.sin(theta)
    ref[..., b] = x[..., a] * np.sin(theta) + x[..., b] * np.cos(theta)
    np.testing.assert_allclose(y, ref, atol=2e-5)
    assert np.array_equal(y[..., rope_dim:], x[..., rope_dim:])


def test_rope_past_the_table_raises() -> None:
    with pytest.raises(ValueError, match="rope table"):
        CpuBackend().rope(_rand(3, 1, 8), 30, RopeSpec(10_000.0, 8, 1.0, False, 32))


def test_rms_norm() -> None:
    x, w = _rand(4, 96), _rand(96)
    ref = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-6) * w
    np.testing.assert_allclose(CpuBackend().rms_norm(x, w, 1e-6), ref, rtol=1e-5, atol=1e-6)


def test_glu_activations() -> None:
    be, gate, up = CpuBackend(), _rand(3, 64, scale=3.0), _rand(3, 64)
    np.testing.assert_allclose(
        be.glu(gate, up, "silu"), gate / (1 + np.exp(-gate)) * up, rtol=1e-5, atol=1e-6
    )
    gelu = 0.5 * gate * (1 + np.tanh(math.sqrt(2 / math.pi) * (gate + 0.044715 * gate**3)))
    # ggml's GELU goes through a float16 table: ~1e-3 relative
    np.testing.assert_allclose(be.glu(gate, up, "gelu_tanh"), gelu * up, rtol=4e-3, atol=2e-3)
    with pytest.raises(ValueError, match="activation"):
        be.glu(gate, up, "relu")


def test_round_f16_matches_numpy() -> None:
    p = RNG.random(20_000).astype(np.float32) ** 6  # many subnormal-f16 sized values
    q = p.copy()
    _round_f16(q)
    assert np.array_equal(q, p.astype(np.float16).astype(np.float32))


def _attention_reference(q, kc, vc, pos0, window, scale):  # noqa: ANN001, ANN202
    n, heads, d = q.shape
    n_kv = kc.shape[1] // d
    q16, k, v = (
        q.astype(np.float16).astype(np.float64),
        kc.astype(np.float64),
        vc.astype(np.float64),
    )
    out = np.zeros((n, heads, d))
    for t in range(n):
        p = pos0 + t
        keys = np.array([j for j in range(p + 1) if not window or p - j < window])
        for h in range(heads):
            g = h // (heads // n_kv)
            s = k[keys, g * d : (g + 1) * d] @ q16[t, h] * scale
            e = np.exp(s - s.max())
            e = (e / e.sum()).astype(np.float16).astype(np.float64)  # ggml rounds P to f16 for P.V
            out[t, h] = e @ v[keys, g * d : (g + 1) * d]
    return out.reshape(n, -1)


@pytest.mark.parametrize(
    ("n", "pos0", "window", "heads", "n_kv"),
    [(1, 0, 0, 4, 2), (1, 37, 0, 9, 3), (3, 20, 8, 4, 1), (40, 0, 0, 4, 2), (40, 30, 16, 4, 1)],
)
def test_attention_paths_match_reference(
    n: int, pos0: int, window: int, heads: int, n_kv: int
) -> None:
    d = 32
    kc = _rand(128, n_kv * d).astype(np.float16)
    vc = _rand(128, n_kv * d).astype(np.float16)
    q = _rand(n, heads, d)
    got = CpuBackend().attention(q, kc, vc, pos0, window, 1 / math.sqrt(d))
    np.testing.assert_allclose(
        got, _attention_reference(q, kc, vc, pos0, window, 1 / math.sqrt(d)), atol=2e-3
    )


def test_attention_batch_and_single_rows_agree() -> None:
    """A batch uses tinyBLAS's summation order, single rows ggml_vec_dot_f16's: same values to ~1e-6."""
    kc, vc, q = _rand(64, 64).astype(np.float16), _rand(64, 64).astype(np.float16), _rand(12, 4, 32)
    batch = CpuBackend().attention(q, kc, vc, 5, 10, 0.17)
    rows = np.concatenate(
        [CpuBackend().attention(q[t : t + 1], kc, vc, 5 + t, 10, 0.17) for t in range(12)]
    )
    np.testing.assert_allclose(batch, rows, rtol=1e-4, atol=1e-4)


def test_store_kv_rounds_to_float16() -> None:
    cache = CpuBackend().kv_cache(8, 4)
    rows = np.array([[1 / 3, 1e-6, 7000.3, -2.5]] * 2, dtype=np.float32)
    CpuBackend().store_kv(cache, 3, rows)
    assert cache.dtype == np.float16
    assert np.array_equal(cache[3:5], rows.astype(np.float16))
    assert not cache[:3].any() and not cache[5:].any()


# --- config -> the _core.Block contract ---------------------------------------------------------
def _gemma_config() -> ModelConfig:
    meta = {
        "general.architecture": "gemma3", "gemma3.embedding_length": 64, "gemma3.block_count": 6,
        "gemma3.attention.head_count": 4, "gemma3.attention.head_count_kv": 1,
        "gemma3.attention.key_length": 64, "gemma3.attention.value_length": 64,
        "gemma3.feed_forward_length": 256, "gemma3.attention.layer_norm_rms_epsilon": 1e-6,
        "gemma3.rope.freq_base": 1e6, "gemma3.attention.sliding_window": 8, "gemma3.vocab_size": 100,
    }  # fmt: skip
    return ModelConfig.from_metadata(meta.get, has_output=False)


def test_block_cfg_gemma_local_and_global_layers() -> None:
    cfg = _gemma_config()
    local, global_ = block_cfg(cfg, 0), block_cfg(cfg, 5)
    assert (local["rope_base"], local["sliding_window"]) == (10_000.0, 8)
    assert (global_["rope_base"], global_["sliding_window"]) == (1e6, 0)
    assert local["rope_neox"] and local["activation"] == "gelu_tanh"
    # gemma3 scales Q (after rope), not the scores, as llama.cpp's gemma3 graph does
    assert (local["q_scale"], local["attn_scale"]) == (pytest.approx(1 / 8), 1.0)
    expected = {
        "dim", "n_heads", "n_kv_heads", "head_dim_k", "head_dim_v", "ffn_dim", "norm_eps", "rope_base",
        "rope_dim", "rope_scale", "rope_neox", "sliding_window", "activation", "attn_scale", "q_scale",
    }  # fmt: skip
    assert set(local) == expected
    assert all(isinstance(v, int | float | bool | str) for v in local.values())


def test_block_weights_are_views_of_the_mmap(tiny_llama: ModelFile) -> None:
    w = block_weights(tiny_llama, 0)
    assert set(w) == set(BLOCK_MATRICES) | {"attn_norm", "ffn_norm"}
    for name in BLOCK_MATRICES:
        raw, qtype, rows, cols = w[name]
        t = tiny_llama.tensors[f"blk.0.{name}.weight"]
        assert (int(t.qtype), (rows, cols)) == (qtype, t.shape)
        assert raw.dtype == np.uint8 and np.shares_memory(raw, tiny_llama.reader.data)
    assert w["attn_norm"].dtype == np.float32 and np.shares_memory(
        w["attn_norm"], tiny_llama.reader.data
    )


# --- block and model ----------------------------------------------------------------------------
def test_block_incremental_equals_batch(tiny_llama: ModelFile) -> None:
    cfg, w = block_cfg(tiny_llama.config, 0), block_weights(tiny_llama, 0)
    x = _rand(20, cfg["dim"])
    batch, step = PyBlock(cfg, w, 32), PyBlock(cfg, w, 32)
    xb = x.copy()
    batch.forward(xb, 0)
    xs = x.copy()
    for t in range(20):
        row = xs[t : t + 1].copy()
        step.forward(row, t)
        xs[t] = row[0]
    np.testing.assert_allclose(xs, xb, rtol=2e-2, atol=2e-2)  # 8-bit activations: rounding flips
    assert np.array_equal(batch.k_cache[:20] != 0, step.k_cache[:20] != 0)
    assert batch.k_cache.shape == (32, cfg["n_kv_heads"] * cfg["head_dim_k"])


def test_block_refuses_positions_past_n_ctx(tiny_llama: ModelFile) -> None:
    blk = PyBlock(block_cfg(tiny_llama.config, 0), block_weights(tiny_llama, 0), 8)
    with pytest.raises(ContextFullError):
        blk.forward(_rand(3, tiny_llama.config.dim), 6)


def test_model_forward_logit_rows(tiny_llama: ModelFile, monkeypatch: pytest.MonkeyPatch) -> None:
    model = Model(tiny_llama, n_ctx=64)
    ids = list(range(100, 130))
    full = model.forward(ids, 0, first_logit=0)
    assert full.shape == (30, tiny_llama.config.n_vocab) and full.dtype == np.float32
    # The head's arithmetic depends on how many rows it multiplies, as llama.cpp's does (its F16
    # head runs vec_dot for one row, tinyBLAS for several): the last row alone agrees to rounding.
    np.testing.assert_allclose(model.forward(ids, 0)[0], full[-1], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(model.forward(ids, 0, first_logit=25), full[25:])
    monkeypatch.setattr(model_mod, "UBATCH", 7)  # chunked prefill: same rows, same values
    np.testing.assert_allclose(model.forward(ids, 0, first_logit=0), full, rtol=1e-3, atol=1e-3)


def test_model_rejects_bad_input(tiny_llama: ModelFile) -> None:
    model = Model(tiny_llama, n_ctx=16)
    with pytest.raises(ContextFullError, match="16"):
        model.forward(list(range(17)))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.forward([tiny_llama.config.n_vocab])
    with pytest.raises(ValueError):
        model.forward([])


def test_core_block_matches_python_block(tiny_llama: ModelFile) -> None:
    core_block = core_block_class()
    if core_block is None:
        pytest.skip("hybridllm._core has no Block yet")
    cfg, w = block_cfg(tiny_llama.config, 0), block_weights(tiny_llama, 0)
    x = _rand(9, cfg["dim"])
    py, cc = PyBlock(cfg, w, 32), core_block(cfg, w, 32)
    a, b = x.copy(), x.copy()
    py.forward(a, 0)
    cc.forward(b, 0, 2)
    np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(np.asarray(cc.k_cache)[:9], py.k_cache[:9])


def test_make_block_uses_python_block_when_forced(
    tiny_llama: ModelFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HYBRIDLLM_BLOCK", "python")
    blk = model_mod.make_block(block_cfg(tiny_llama.config, 0), block_weights(tiny_llama, 0), 8)
    assert isinstance(blk, PyBlock)
    assert isinstance(blk.w["attn_q"], Matrix)


def test_tiny_gemma_writes_and_loads(tiny_gemma3_path: str) -> None:
    mf = ModelFile(tiny_gemma3_path)
    assert mf.config.arch == "gemma3" and mf.config.swa_layers == (True,) * 5 + (False,)
    logits = Model(mf, n_ctx=32).forward([2, 100, 200, 300], 0, first_logit=0)
    assert logits.shape == (4, mf.config.n_vocab) and np.isfinite(logits).all()
