"""_core.Block (cpp/block.cpp) against model.PyBlock on real blocks of both models.

Both compute the same function with the same numerics: the same _core matmul kernels, and
outside the matmuls the arithmetic of backends/cpu.py (float16 K/V and Q, ggml's lane order in
Q.K and P.V, v_expf softmax with f16 probabilities, the GELU table, double-summed RMSNorm). So
the outputs are expected to be bit-identical; the tests allow a relative 1e-5 of the row scale
(summation order only) and one float16 ulp in the caches, and print the largest differences.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest

from hybridllm import kernels
from hybridllm.backends.cpu import CpuBackend
from hybridllm.gguf_file import ModelFile
from hybridllm.model import Model, PyBlock, block_cfg, block_weights

_core = pytest.importorskip("hybridllm._core")
if not hasattr(_core, "Block"):
    pytest.skip("hybridllm._core was built without Block", allow_module_level=True)

N_CTX = 64
# (n rows, pos0): a prefill, decode steps, a prefill chunk at pos0 > 0, more decode
STEPS = ((7, 0), (1, 7), (1, 8), (1, 9), (5, 10), (1, 15), (1, 16))
RTOL = 1e-5  # of max |row|: the outputs may differ only by summation order


@pytest.fixture(scope="module")
def smollm(smollm_path: str) -> ModelFile:
    return ModelFile(smollm_path)


@pytest.fixture(scope="module")
def gemma(gemma_path: str) -> ModelFile:
    return ModelFile(gemma_path)


def _inputs(mf: ModelFile, n: int, seed: int) -> np.ndarray:
    """Realistic block inputs: embedding rows of random tokens (times the model's scale)."""
    t = mf.tensor("token_embd.weight")
    ids = np.random.default_rng(seed).integers(0, t.shape[0], size=n)
    x = kernels.get_rows(t.raw, t.qtype, t.shape, ids).astype(np.float32)
    return np.ascontiguousarray(x * np.float32(mf.config.embed_scale))


def _compare(
    mf: ModelFile, cfg: dict, w: dict, steps=STEPS, n_threads: int = 2, n_ctx: int = N_CTX
) -> tuple[float, int]:
    """Run both blocks over steps; assert agreement; return (max rel. diff, max cache ulps)."""
    py, cc = PyBlock(cfg, w, n_ctx, CpuBackend()), _core.Block(cfg, w, n_ctx)
    worst, worst_ulp = 0.0, 0
    for i, (n, pos0) in enumerate(steps):
        x = _inputs(mf, n, seed=100 * i + pos0)
        a, b = x.copy(), x.copy()
        py.forward(a, pos0)
        assert cc.forward(b, pos0, n_threads) is None
        scale = np.abs(a).max(axis=1, keepdims=True)
        rel = float((np.abs(b - a) / scale).max())
        assert rel <= RTOL, f"step {i} (n={n}, pos0={pos0}): relative difference {rel:.3g}"
        worst = max(worst, rel)
        end = pos0 + n
        for ours, ref in ((cc.k_cache, py.k_cache), (cc.v_cache, py.v_cache)):
            ulps = np.abs(
                np.asarray(ours[:end]).view(np.int16).astype(np.int32)
                - ref[:end].view(np.int16).astype(np.int32)
            )
            worst_ulp = max(worst_ulp, int(ulps.max()))
            assert ulps.max() <= 1, f"step {i}: caches differ by {ulps.max()} ulps"
    return worst, worst_ulp


@pytest.mark.parametrize(
    ("model", "layer"), [("smollm", 0), ("smollm", 17), ("gemma", 0), ("gemma", 5)]
)  # gemma 0: a local (sliding-window) layer; 5: a global one
def test_matches_python_block(model: str, layer: int, request: pytest.FixtureRequest) -> None:
    mf = request.getfixturevalue(model)
    cfg, w = block_cfg(mf.config, layer), block_weights(mf, layer)
    rel, ulp = _compare(mf, cfg, w)
    print(f"\n{model} layer {layer}: max rel. diff {rel:.3g}, max cache diff {ulp} ulp")


@pytest.mark.parametrize("model", ["smollm", "gemma"])
def test_sliding_window(model: str, request: pytest.FixtureRequest) -> None:
    """window 4: keys 4+ positions back are masked, inside a prefill and across steps."""
    mf = request.getfixturevalue(model)
    cfg, w = block_cfg(mf.config, 0), block_weights(mf, 0)
    cfg["sliding_window"] = 4
    _compare(mf, cfg, w, steps=((7, 0), (1, 7), (1, 8), (6, 9), (1, 15), (20, 16), (1, 36)))


@pytest.mark.parametrize(("model", "layer"), [("smollm", 0), ("gemma", 0), ("gemma", 5)])
def test_long_context(model: str, layer: int, request: pytest.FixtureRequest) -> None:
    """Past 512 cache rows: the split decode attention (scores by position block, P.V by output
    dims) and batches at depth (keys and values converted once, blocked); gemma's layer 0 has a
    512-row sliding window, so its first rows fall out of it."""
    mf = request.getfixturevalue(model)
    cfg, w = block_cfg(mf.config, layer), block_weights(mf, layer)
    steps = ((520, 0), (1, 520), (1, 521), (30, 522), (1, 552), (1, 553))
    rel, ulp = _compare(mf, cfg, w, steps=steps, n_ctx=600)
    print(f"\n{model} layer {layer}, 554 rows: max rel. diff {rel:.3g}, max cache diff {ulp} ulp")


def test_window_changes_the_result(smollm: ModelFile) -> None:
    """The window is not ignored: the same inputs past the window give other outputs."""
    w = block_weights(smollm, 0)
    full, windowed = block_cfg(smollm.config, 0), dict(block_cfg(smollm.config, 0))
    windowed["sliding_window"] = 4
    x = _inputs(smollm, 9, seed=1)
    a, b = x.copy(), x.copy()
    _core.Block(full, w, N_CTX).forward(a, 0)
    _core.Block(windowed, w, N_CTX).forward(b, 0)
    np.testing.assert_array_equal(a[:4], b[:4])  # rows 0..3 see fewer than 4 keys either way
    assert not np.array_equal(a[4:], b[4:])


@pytest.mark.parametrize("model", ["smollm", "gemma"])
def test_portable_path_matches(model: str, request: pytest.FixtureRequest) -> None:
    """set_force_scalar: scalar matmul kernels (for both blocks) and the portable attention."""
    mf = request.getfixturevalue(model)
    _core.set_force_scalar(True)
    try:
        _compare(mf, block_cfg(mf.config, 5), block_weights(mf, 5), steps=((7, 0), (1, 7), (3, 8)))
    finally:
        _core.set_force_scalar(False)


def test_thread_counts_agree(gemma: ModelFile) -> None:
    cfg, w = block_cfg(gemma.config, 0), block_weights(gemma, 0)
    outs = []
    for nt in (1, 2, 3, 0, None):
        blk = _core.Block(cfg, w, 128)
        x = _inputs(gemma, 70, seed=3)
        blk.forward(x, 0, nt)
        y = _inputs(gemma, 1, seed=4)
        blk.forward(y, 70 - 6)  # overwrite a row, then decode: the caller owns positions
        outs.append((x, y, np.asarray(blk.k_cache).copy()))
    for x, y, k in outs[1:]:
        np.testing.assert_array_equal(x, outs[0][0])
        np.testing.assert_array_equal(y, outs[0][1])
        np.testing.assert_array_equal(k, outs[0][2])


def test_cache_views(smollm: ModelFile) -> None:
    cfg = block_cfg(smollm.config, 0)
    blk = _core.Block(cfg, block_weights(smollm, 0), 32)
    k, v = blk.k_cache, blk.v_cache
    kv = cfg["n_kv_heads"] * cfg["head_dim_k"]
    assert k.dtype == np.float16 and k.shape == (32, kv) and v.shape == (32, kv)
    assert k.flags.writeable and k.flags.c_contiguous and not k.any()
    assert np.shares_memory(k, blk.k_cache)  # a view, not a copy
    blk.forward(_inputs(smollm, 3, seed=0), 0)
    assert k[:3].any() and not k[3:].any() and v[:3].any()
    k[0] = 0  # writable: the block reads what the caller writes
    assert not blk.k_cache[0].any()
    del blk
    gc.collect()
    assert k[1].any()  # the view keeps the block (and its cache) alive


def test_weights_stay_alive(smollm: ModelFile) -> None:
    """The block keeps references to the arrays it reads (they may be its only owners)."""
    cfg, w = block_cfg(smollm.config, 0), block_weights(smollm, 0)
    ref = _core.Block(cfg, w, 16)
    copies = {
        k: (v._replace(raw=v.raw.copy()) if isinstance(v, tuple) else v.copy())
        for k, v in w.items()
    }
    blk = _core.Block(cfg, copies, 16)
    del copies
    gc.collect()
    x = _inputs(smollm, 4, seed=2)
    a, b = x.copy(), x.copy()
    ref.forward(a, 0)
    blk.forward(b, 0)
    np.testing.assert_array_equal(a, b)


# --- errors ---------------------------------------------------------------------------------------
def test_constructor_errors(gemma: ModelFile) -> None:
    cfg, w = block_cfg(gemma.config, 0), block_weights(gemma, 0)
    with pytest.raises(ValueError, match="attn_v"):
        _core.Block(cfg, {k: v for k, v in w.items() if k != "attn_v"}, 8)
    with pytest.raises(ValueError, match=r"attn_q: expected shape \(1024, 640\), got \(256, 640\)"):
        _core.Block(cfg, {**w, "attn_q": w["attn_k"]}, 8)
    with pytest.raises(ValueError, match="ffn_norm"):
        _core.Block(cfg, {**w, "ffn_norm": w["ffn_norm"][:10]}, 8)
    with pytest.raises(ValueError, match="attn_norm.*float32"):
        _core.Block(cfg, {**w, "attn_norm": w["attn_norm"].astype(np.float64)}, 8)
    with pytest.raises(ValueError, match="attn_k_norm"):
        _core.Block(cfg, {k: v for k, v in w.items() if k != "attn_k_norm"}, 8)
    with pytest.raises(ValueError, match="not supported"):
        _core.Block(cfg, {**w, "ffn_up": w["ffn_up"]._replace(qtype=39)}, 8)
    with pytest.raises(ValueError, match="bytes"):
        _core.Block(cfg, {**w, "ffn_up": w["ffn_up"]._replace(raw=w["ffn_up"].raw[:-1])}, 8)
    with pytest.raises(ValueError, match="Matrix"):
        _core.Block(cfg, {**w, "attn_output": w["attn_norm"]}, 8)
    with pytest.raises(ValueError, match="rope_base"):
        _core.Block({k: v for k, v in cfg.items() if k != "rope_base"}, w, 8)
    with pytest.raises(ValueError, match="n_kv_heads"):
        _core.Block({**cfg, "n_kv_heads": 3}, w, 8)
    with pytest.raises(ValueError, match="activation"):
        _core.Block({**cfg, "activation": "relu"}, w, 8)
    with pytest.raises(ValueError, match="n_ctx"):
        _core.Block(cfg, w, 0)


def test_forward_errors_leave_the_block_usable(smollm: ModelFile) -> None:
    cfg, w = block_cfg(smollm.config, 0), block_weights(smollm, 0)
    blk = _core.Block(cfg, w, 8)
    dim = cfg["dim"]
    x = _inputs(smollm, 2, seed=5)
    with pytest.raises(ValueError, match="shape"):
        blk.forward(np.zeros((2, dim + 1), np.float32), 0)
    with pytest.raises(ValueError, match="shape"):
        blk.forward(np.zeros(dim, np.float32), 0)
    with pytest.raises(TypeError, match="float32"):
        blk.forward(x.astype(np.float64), 0)
    with pytest.raises(TypeError):
        blk.forward(x.tolist(), 0)
    with pytest.raises(ValueError, match="contiguous"):
        blk.forward(np.asfortranarray(np.zeros((2, dim), np.float32)), 0)
    ro = x.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        blk.forward(ro, 0)
    with pytest.raises(ValueError, match="n_ctx=8"):
        blk.forward(x.copy(), 7)
    with pytest.raises(ValueError, match="pos0"):
        blk.forward(x.copy(), -1)
    assert not blk.k_cache.any()  # nothing was written by the refused calls
    blk.forward(np.zeros((0, dim), np.float32), 0)  # no rows: nothing to do
    a, b = x.copy(), x.copy()
    blk.forward(a, 0)
    PyBlock(cfg, w, 8).forward(b, 0)
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=RTOL * float(np.abs(b).max()))


# --- the whole model ------------------------------------------------------------------------------
def test_model_uses_core_block_and_matches_python(
    smollm: ModelFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = [1, 504, 3458, 282, 4649, 314, 253, 1789, 30]
    model = Model(smollm, n_ctx=32, n_threads=2)
    assert all(isinstance(b, _core.Block) for b in model.blocks)
    ours = np.concatenate([model.forward(ids[:6], 0, first_logit=0), model.forward(ids[6:], 6, 0)])
    monkeypatch.setenv("HYBRIDLLM_BLOCK", "python")
    ref_model = Model(smollm, n_ctx=32, n_threads=2)
    assert all(isinstance(b, PyBlock) for b in ref_model.blocks)
    ref = np.concatenate(
        [ref_model.forward(ids[:6], 0, first_logit=0), ref_model.forward(ids[6:], 6, 0)]
    )
    rel = float((np.abs(ours - ref).max(axis=1) / np.abs(ref).max(axis=1)).max())
    print(f"\nSmolLM2 logits, C++ vs Python blocks: max rel. diff {rel:.3g}")
    assert rel <= 1e-4
    np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))
