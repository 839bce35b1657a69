"""Oracle tests: the whole model against llama.cpp (llama-cpp-python) on the same GGUF files.

Real models: argmax of the logits at every position of 22 prompts, greedy completions, and
perplexity computed the way llama-perplexity does. Tiny synthetic models (random weights in a
mix of GGML types, written here) must give the same logits. Figures are printed (run with -s)
and attached to the test report as properties.

These models turn a one-ulp difference into a different argmax within a few layers (8-bit
activations: a rounding that flips moves a whole quantization step), so the thresholds hold only
when every op matches llama.cpp's arithmetic bit for bit, matmul kernels included (activation
quantization with float16 scales, and the same summation order).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")
from oracle import PROMPTS, Pair  # noqa: E402

N_CTX = 512
PERPLEXITY_TEXT = Path(__file__).parent / "data" / "perplexity_text.txt"


@pytest.fixture(scope="module", params=["smollm", "gemma"])
def pair(request: pytest.FixtureRequest) -> Pair:
    return Pair(request.getfixturevalue(f"{request.param}_path"), N_CTX)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    """Largest per-position relative difference: max |a - b| / max |b| over the vocabulary."""
    return float((np.abs(a - b).max(axis=-1) / np.abs(b).max(axis=-1)).max())


def _report(record_property, name: str, value: object) -> None:  # noqa: ANN001
    record_property(name, value)
    print(f"\n{name}: {value}")


# --- real models --------------------------------------------------------------------------------
def test_logits_argmax_agree(pair: Pair, record_property) -> None:  # noqa: ANN001
    same = total = 0
    worst = 0.0
    for prompt in PROMPTS:
        ids = pair.ours.tokenize(prompt)
        assert ids == pair.theirs.tokenize(prompt.encode(), add_bos=True, special=False), prompt
        ours, theirs = pair.ours.logits(ids), pair.their_logits(ids)
        same += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
        total += len(ids)
        worst = max(worst, _rel(ours, theirs))
    name = pair.ours.config.arch
    _report(record_property, f"{name} argmax agreement", f"{same}/{total} = {same / total:.4f}")
    _report(record_property, f"{name} max relative logit difference", f"{worst:.4g}")
    assert same / total >= 0.99, f"argmax agreement {same}/{total}"


def test_greedy_completions_match(pair: Pair, record_property) -> None:  # noqa: ANN001
    equal = 0
    for prompt in PROMPTS:
        theirs = pair.theirs.create_completion(
            prompt, max_tokens=32, temperature=0.0, repeat_penalty=1.0
        )
        ours = pair.ours.generate(prompt, max_tokens=32, temperature=0)
        equal += ours == theirs["choices"][0]["text"]
    name = pair.ours.config.arch
    _report(record_property, f"{name} greedy completions equal", f"{equal}/{len(PROMPTS)}")
    assert equal >= 0.9 * len(PROMPTS), f"greedy completions equal: {equal}/{len(PROMPTS)}"


def llama_cpp_perplexity(llm, tokens: list[int], n_ctx: int, bos: int | None) -> float:  # noqa: ANN001
    """llama-perplexity's method on llama.cpp: BOS-led chunks of n_ctx, score the second half.

    Like llama-perplexity, logits are requested for the second half of each chunk only (through
    llama-cpp-python's batch wrapper: its high-level eval would compute every row).
    """
    from llama_cpp._internals import LlamaBatch

    batch = LlamaBatch(n_tokens=n_ctx, embd=0, n_seq_max=1, verbose=False)
    n_vocab, first = llm.n_vocab(), n_ctx // 2
    nll, count = 0.0, 0
    for i in range(len(tokens) // n_ctx):
        chunk = tokens[i * n_ctx : (i + 1) * n_ctx]
        if bos is not None:
            chunk[0] = bos
        llm._ctx.kv_cache_clear()
        batch.set_batch(chunk, n_past=0, logits_all=False)
        for j in range(n_ctx):
            batch.batch.logits[j] = j >= first
        llm._ctx.decode(batch)
        rows = [
            np.ctypeslib.as_array(llm._ctx.get_logits_ith(j), shape=(n_vocab,))
            for j in range(first, n_ctx - 1)
        ]
        logits = np.array(rows, dtype=np.float64)
        targets = tokens[i * n_ctx + first + 1 : (i + 1) * n_ctx]
        mx = logits.max(axis=1)
        lse = np.log(np.exp(logits - mx[:, None]).sum(axis=1)) + mx
        nll -= float((logits[np.arange(len(targets)), targets] - lse).sum())
        count += len(targets)
    llm.reset()
    return math.exp(nll / count)


def test_perplexity_matches(pair: Pair, record_property) -> None:  # noqa: ANN001
    text = PERPLEXITY_TEXT.read_text(encoding="utf-8")
    ours = pair.ours.perplexity(text, n_ctx=N_CTX)
    tok = pair.ours.tokenizer
    tokens = pair.ours.tokenize(text)
    assert len(tokens) >= 4 * N_CTX  # a few thousand tokens: at least 4 chunks
    theirs = llama_cpp_perplexity(pair.theirs, tokens, N_CTX, tok.bos_id if tok.add_bos else None)
    name = pair.ours.config.arch
    _report(record_property, f"{name} perplexity ours vs llama.cpp", f"{ours:.4f} vs {theirs:.4f}")
    assert ours == pytest.approx(theirs, rel=0.01)


# --- tiny synthetic models ----------------------------------------------------------------------
@pytest.fixture(scope="module", params=["llama", "gemma3"])
def tiny_pair(request: pytest.FixtureRequest) -> Pair:
    return Pair(request.getfixturevalue(f"tiny_{request.param}_path"), n_ctx=128)


def test_tiny_models_match_llama_cpp(tiny_pair: Pair, record_property) -> None:  # noqa: ANN001
    # long enough to pass the gemma3 tiny model's sliding window (8) several times over
    text = (
        "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm windowsill."
    )
    ids = tiny_pair.ours.tokenize(text)
    ours, theirs = tiny_pair.ours.logits(ids), tiny_pair.their_logits(ids)
    rel = _rel(ours, theirs)
    _report(
        record_property,
        f"tiny {tiny_pair.ours.config.arch} max relative logit difference",
        f"{rel:.3g}",
    )
    # random weights leave near-ties among 49k-262k logits: the argmax must agree wherever
    # llama.cpp's top two are further apart than the largest difference between the engines
    top2 = np.sort(theirs, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * np.abs(ours - theirs).max(axis=-1)
    assert np.array_equal(ours.argmax(-1)[clear], theirs.argmax(-1)[clear])
    assert rel < 1e-2, f"max relative logit difference {rel:.3g}"
    assert clear.mean() > 0.5, f"only {clear.mean():.0%} of positions clear of near-ties"
