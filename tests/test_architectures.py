"""Every supported architecture against llama.cpp, on tiny random-weight models written here.

One tiny model per architecture feature (models/tiny.py SPECS: Llama 3's rope_freqs, YaRN and
linear rope scaling, Mistral-style GQA, qwen2's biases, qwen3's Q/K norms with a key length
other than dim / n_heads, gemma2's soft-caps and alternating window, granite's scales, olmo2's
norms, phi3's fused matrices and LongRoPE), each with SmolLM2's vocabulary and a mix of GGML
types. For each: logits equal to llama.cpp's bit for bit at every position of several prompts,
greedy continuations equal, and the C++ block equal to the Python block. Block-level checks
show that each feature binds (switching it off changes the output), so equality is not an
accident of a feature that does nothing on these weights.
"""

from __future__ import annotations

import numpy as np
import pytest
from hybridllm.models.tiny import SPECS, write_tiny_model

from hybridllm.errors import ModelFormatError
from hybridllm.gguf_file import ModelFile
from hybridllm.model import PyBlock, block_cfg, block_weights
from hybridllm.runner import Runner

llama_cpp = pytest.importorskip("llama_cpp")
from oracle import Pair  # noqa: E402

N_CTX = 128
NEW = [name for name in SPECS if name not in ("llama", "gemma3")]  # those two: test_vs_llama_cpp
PROMPTS = [
    "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm windowsill.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "Once upon a time",
]


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory: pytest.TempPathFactory, smollm_path: str) -> dict[str, str]:
    """Every spec written once per session with SmolLM2's vocabulary."""
    folder = tmp_path_factory.mktemp("architectures")
    reader = ModelFile(smollm_path).reader
    return {name: str(write_tiny_model(folder / f"{name}.gguf", reader, SPECS[name])) for name in NEW}


@pytest.fixture(scope="module", params=NEW)
def pair(request: pytest.FixtureRequest, tiny_paths: dict[str, str]) -> tuple[str, Pair]:
    return request.param, Pair(tiny_paths[request.param], N_CTX)


def test_logits_equal_llama_cpp(pair: tuple[str, Pair], record_property) -> None:  # noqa: ANN001
    name, p = pair
    worst, rows = 0.0, 0
    for prompt in PROMPTS:
        ids = p.ours.tokenize(prompt)
        ours, theirs = p.ours.logits(ids), p.their_logits(ids)
        worst = max(worst, float((np.abs(ours - theirs).max(-1) / np.abs(theirs).max(-1)).max()))
        rows += len(ids)
        assert np.array_equal(ours.argmax(-1), theirs.argmax(-1)), f"{name}: argmax differs"
    record_property(f"{name} max relative logit difference", worst)
    print(f"\n{name}: {rows} positions, max relative logit difference {worst:.3g}")
    assert worst == 0.0, f"{name}: logits differ from llama.cpp's (max relative {worst:.3g})"


def test_greedy_continuations_equal(pair: tuple[str, Pair]) -> None:
    """16 greedy tokens after each prompt: our prefill then one-token decode steps."""
    name, p = pair
    for prompt in PROMPTS:
        ids = p.ours.tokenize(prompt)
        ours, pos = [], 0
        step = ids
        for _ in range(16):
            logits = p.ours.model.forward(step, pos)
            pos += len(step)
            step = [int(logits[-1].argmax())]
            ours.append(step[0])
        p.theirs.reset()
        theirs = []
        for token in p.theirs.generate(ids, temp=0.0, repeat_penalty=1.0):
            theirs.append(int(token))
            if len(theirs) == 16:
                break
        assert ours == theirs, f"{name}: {prompt!r}"


@pytest.mark.parametrize("name", ["llama3", "llama-yarn", "gemma2", "phi3"])
def test_long_prompt_logits_equal_llama_cpp(name: str, tiny_paths: dict[str, str]) -> None:
    """~600 tokens (past YaRN's and LongRoPE's original contexts, several 512-row chunks and the
    attention's long-context paths), every position."""
    from pathlib import Path

    text = (Path(__file__).parent / "data" / "perplexity_text.txt").read_text(encoding="utf-8")
    p = Pair(tiny_paths[name], n_ctx=1024)
    ids = p.ours.tokenize(text)[:600]
    np.testing.assert_array_equal(p.ours.logits(ids), p.their_logits(ids))


@pytest.mark.parametrize("name", ["llama-yarn", "gemma2", "phi3"])
def test_python_block_logits_equal_llama_cpp(
    name: str, tiny_paths: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole model on the Python block (HYBRIDLLM_BLOCK=python) against llama.cpp."""
    monkeypatch.setenv("HYBRIDLLM_BLOCK", "python")
    p = Pair(tiny_paths[name], N_CTX)
    ids = p.ours.tokenize(PROMPTS[0])
    np.testing.assert_array_equal(p.ours.logits(ids), p.their_logits(ids))


# --- the C++ block against the Python block ------------------------------------------------------
_core = pytest.importorskip("hybridllm._core")
STEPS = ((7, 0), (1, 7), (1, 8), (5, 9), (1, 14))  # a prefill, decode steps, a chunk at pos0 > 0


def _run(block, x: np.ndarray, steps=STEPS) -> list[np.ndarray]:  # noqa: ANN001
    """Outputs of a block over steps, each on its own rows of x (one row per position)."""
    outs = []
    for n, pos0 in steps:
        rows = x[pos0 : pos0 + n].copy()
        block.forward(rows, pos0, 2)
        outs.append(rows)
    return outs


def _inputs(mf: ModelFile, n: int) -> np.ndarray:
    return (np.random.default_rng(n).standard_normal((n, mf.config.dim)) * 2).astype(np.float32)


@pytest.mark.parametrize("name", NEW)
def test_core_block_equals_python_block(name: str, tiny_paths: dict[str, str]) -> None:
    mf = ModelFile(tiny_paths[name])
    x = _inputs(mf, 16)
    for layer in range(mf.config.n_layers):
        cfg, w = block_cfg(mf.config, layer), block_weights(mf, layer, N_CTX)
        py, cc = PyBlock(cfg, w, N_CTX), _core.Block(cfg, w, N_CTX)
        for a, b in zip(_run(py, x), _run(cc, x), strict=True):
            np.testing.assert_array_equal(a, b, err_msg=f"{name} layer {layer}")
        np.testing.assert_array_equal(np.asarray(cc.k_cache), py.k_cache)
        np.testing.assert_array_equal(np.asarray(cc.v_cache), py.v_cache)


def test_core_block_equals_python_block_past_512_rows(tiny_paths: dict[str, str]) -> None:
    """gemma2's soft-cap in the long-context paths (split decode, batches at depth) of a global
    layer, and a windowed one."""
    mf = ModelFile(tiny_paths["gemma2"])
    n_ctx, steps = 600, ((520, 0), (1, 520), (1, 521), (9, 522))
    x = _inputs(mf, 531)
    for layer in (0, 1):
        cfg, w = block_cfg(mf.config, layer), block_weights(mf, layer, n_ctx)
        assert cfg["attn_softcap"] and (cfg["sliding_window"] > 0) == (layer == 0)
        py, cc = PyBlock(cfg, w, n_ctx), _core.Block(cfg, w, n_ctx)
        for a, b in zip(_run(py, x, steps), _run(cc, x, steps), strict=True):
            np.testing.assert_array_equal(a, b, err_msg=f"gemma2 layer {layer}")


# (spec, layer, what to switch off): a cfg key dropped, or a weight dropped
FEATURES = [
    ("llama3", 0, "weight", "rope_freqs"),
    ("llama-yarn", 0, "cfg", "rope_ext_factor"),
    ("llama-yarn", 0, "cfg", "rope_attn_factor"),
    ("mistral", 0, "cfg", "rope_scale"),
    ("qwen2", 0, "weight", "attn_k_bias"),
    ("qwen3", 0, "weight", "attn_q_norm"),
    ("gemma2", 0, "cfg", "attn_softcap"),
    ("gemma2", 0, "cfg", "sliding_window"),
    ("granite", 0, "cfg", "residual_scale"),
    ("olmo2", 0, "cfg", "qk_norm_full"),
    ("phi3", 0, "weight", "rope_freqs"),
]


@pytest.mark.parametrize(("name", "layer", "kind", "key"), FEATURES)
def test_feature_binds(name: str, layer: int, kind: str, key: str, tiny_paths: dict[str, str]) -> None:
    """Switching the feature off changes the block's output on the test inputs."""
    mf = ModelFile(tiny_paths[name])
    cfg, w = block_cfg(mf.config, layer), block_weights(mf, layer, N_CTX)
    assert key in (cfg if kind == "cfg" else w), f"{name}: {key} not in use"
    off_cfg, off_w = dict(cfg), dict(w)
    if key == "rope_scale":
        off_cfg[key] = 1.0
    elif key == "qk_norm_full":  # per-head norms of the same weights' first head
        del off_cfg[key]
        off_w["attn_q_norm"] = w["attn_q_norm"][: cfg["head_dim_k"]].copy()
        off_w["attn_k_norm"] = w["attn_k_norm"][: cfg["head_dim_k"]].copy()
    elif key == "sliding_window":
        off_cfg[key] = 0
    elif key == "attn_q_norm":  # the Q and K norms come together
        del off_w["attn_q_norm"], off_w["attn_k_norm"]
    else:
        (off_cfg if kind == "cfg" else off_w).pop(key)
    x = _inputs(mf, 16)
    on = _run(_core.Block(cfg, w, N_CTX), x)
    off = _run(_core.Block(off_cfg, off_w, N_CTX), x)
    assert not all(np.array_equal(a, b) for a, b in zip(on, off, strict=True))


def test_final_softcap_binds(tiny_paths: dict[str, str]) -> None:
    """gemma2's final soft-cap (4 here) bounds the logits and is reached."""
    runner = Runner(tiny_paths["gemma2"], n_ctx=N_CTX, n_threads=2)
    cap = runner.config.final_softcap
    logits = runner.logits(runner.tokenize(PROMPTS[0]))
    assert cap == 4.0 and np.abs(logits).max() <= cap and np.abs(logits).max() > 0.9 * cap


def test_phi3_short_factors_below_the_original_context(
    tmp_path_factory: pytest.TempPathFactory, tiny_paths: dict[str, str]
) -> None:
    """LongRoPE: the long factors past the original context (64 here), else the short ones."""
    mf = ModelFile(tiny_paths["phi3"])
    assert mf.rope_factors(N_CTX).name == "rope_factors_long.weight"
    spec = SPECS["phi3"]
    long_ctx = type(spec)(**{**spec.__dict__, "extra_meta": {**spec.extra_meta, "rope.scaling.original_context_length": 4096}})
    path = write_tiny_model(tmp_path_factory.mktemp("phi3") / "phi3-4k.gguf", mf.reader, long_ctx)
    assert ModelFile(path).rope_factors(N_CTX).name == "rope_factors_short.weight"
    p = Pair(str(path), N_CTX)
    ids = p.ours.tokenize(PROMPTS[0])
    np.testing.assert_array_equal(p.ours.logits(ids), p.their_logits(ids))


def test_olmo2_sliding_window_is_refused(tmp_path_factory: pytest.TempPathFactory, smollm_path: str) -> None:
    spec = SPECS["olmo2"]
    windowed = type(spec)(**{**spec.__dict__, "sliding_window": 8})
    path = tmp_path_factory.mktemp("olmo3") / "olmo3.gguf"
    write_tiny_model(path, smollm_path, windowed)
    with pytest.raises(ModelFormatError, match="olmo3.gguf: a sliding window .* not supported"):
        ModelFile(path)


def _gemma2_meta(**extra: object) -> dict[str, object]:
    meta = {
        "general.architecture": "gemma2", "gemma2.embedding_length": 64, "gemma2.block_count": 6,
        "gemma2.attention.head_count": 4, "gemma2.feed_forward_length": 256,
        "gemma2.attention.layer_norm_rms_epsilon": 1e-6, "gemma2.vocab_size": 100,
    }  # fmt: skip
    return meta | {f"gemma2.{k}": v for k, v in extra.items()}


@pytest.mark.parametrize(
    ("extra", "swa"),
    [
        ({}, (True, False) * 3),  # gemma2's default: window 4096 on alternate layers
        ({"attention.sliding_window_pattern": 3}, (True, True, False) * 2),
        ({"attention.sliding_window_pattern": [True, False, False, True, True, False]},
         (True, False, False, True, True, False)),
    ],
)  # fmt: skip
def test_sliding_window_pattern(extra: dict, swa: tuple[bool, ...]) -> None:
    """llama.cpp's load_swa_pattern: a per-layer array, a period, or the architecture's period."""
    from hybridllm.config import ModelConfig

    cfg = ModelConfig.from_metadata(_gemma2_meta(**extra).get, has_output=False)
    assert cfg.swa_layers == swa and cfg.sliding_window == 4096
    assert (cfg.attn_softcap, cfg.final_softcap) == (50.0, 30.0)  # gemma2's defaults
