"""Batched forwards over several sequences (the engine's ticks) against each sequence alone.

The property held is bit equality, not closeness: a sequence's hidden rows and logits do not
depend on what else is in the batch (the issue's batch invariance). It rests on the kernels:
`matmul(..., rows_alone=True)` gives every row the arithmetic of a one-row call, and the C++
block cuts each sequence's rows into the panels its own forward would use.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from test_kernels import ALL_TYPES, COLS, random_raw

from hybridllm import kernels
from hybridllm.engine import Batch, Engine, model_with_own_cache
from hybridllm.errors import ContextFullError
from hybridllm.gguf_file import ModelFile
from hybridllm.model import Model, PyBlock

_core = pytest.importorskip("hybridllm._core")

# Sequences of one batch as (prompt length, then decode steps): a short prompt, a prompt of
# more than one 64-row panel, one of 65 rows (a last panel of one row), single tokens, and
# prompts of 2..4 rows (decode-sized panels of their own). 18 sequences: their decode rows fill
# a panel of 16 (two wide tiles of 8 rows) and one of 2.
PROMPT_LENGTHS = (7, 130, 65, 1, 3, 12, 2, 5, 1, 4, 1, 6, 3, 1, 2, 8, 1, 2)
N_CTX = 160


def _backends() -> list[tuple[str, bool]]:
    out = [("cpp", False), ("cpp", True)]  # the SIMD kernels, the portable scalar ones
    if "numba" in kernels.available_backends():
        out.append(("numba", False))
    return out


@pytest.mark.parametrize("backend,scalar", _backends(), ids=lambda v: str(v))
@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_rows_alone_equal_one_row_calls(qtype: Q, backend: str, scalar: bool) -> None:
    rows, cols, n = 37, COLS[qtype], 12
    raw = random_raw(qtype, rows, cols, seed=3)
    x = np.random.default_rng(4).standard_normal((n, cols)).astype(np.float32)
    _core.set_force_scalar(scalar)
    try:
        together = kernels.matmul(raw, qtype, (rows, cols), x, backend=backend, rows_alone=True)
        alone = [kernels.matmul(raw, qtype, (rows, cols), x[i : i + 1], backend=backend) for i in range(n)]
        plain = kernels.matmul(raw, qtype, (rows, cols), x, backend=backend)
    finally:
        _core.set_force_scalar(False)
    assert np.array_equal(together, np.concatenate(alone))
    if qtype in (Q.Q4_K, Q.Q6_K) and backend == "cpp" and not scalar and kernels.cpu_features() != "scalar":
        # llama.cpp's arithmetic for these depends on the row count (ggml_gemm groups of 4 rows,
        # the tiled K-quant matmul from 8): without rows_alone the rows differ from one-row calls
        assert not np.array_equal(plain, together), "rows_alone made no difference"


def _models(path: str, count: int, n_ctx: int = N_CTX) -> tuple[Model, list[Model]]:
    model = Model(ModelFile(path), n_ctx, n_threads=2)
    return model, [model_with_own_cache(model) for _ in range(count)]


def _prompts(model: Model, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(0, model.n_vocab, size=k)] for k in PROMPT_LENGTHS]


def _alone_then_batched(path: str, steps: int = 3) -> None:
    """Each sequence's prompt then `steps` decode tokens, alone and all in one batch per step:
    the logits after every step are bit-equal."""
    model, alone = _models(path, len(PROMPT_LENGTHS))
    batched = [model_with_own_cache(model) for _ in PROMPT_LENGTHS]
    prompts = _prompts(model, seed=1)
    work = prompts
    pos = [0] * len(prompts)
    for step in range(steps + 1):
        want = [m.forward(tokens, p)[-1] for m, tokens, p in zip(alone, work, pos, strict=True)]
        got = model.forward_batch(list(zip(batched, work, pos, strict=True)))
        for i, (a, b) in enumerate(zip(want, got, strict=True)):
            assert np.array_equal(a, b), f"step {step}, sequence {i}: max diff {np.abs(a - b).max()}"
        pos = [p + len(t) for p, t in zip(pos, work, strict=True)]
        work = [[int(np.argmax(logits))] for logits in want]


def test_smollm_batched_equals_alone(smollm_path: str) -> None:
    _alone_then_batched(smollm_path)


def test_gemma_batched_equals_alone(gemma_path: str) -> None:
    """Q4_K (ggml_gemm groups), Q6_K and Q5_K (tiled from 8 rows), a Q6_K head of 262k rows."""
    _alone_then_batched(gemma_path, steps=2)


def test_scalar_kernels_batched_equal_alone(tiny_gemma3_path: str) -> None:
    _core.set_force_scalar(True)
    try:
        _alone_then_batched(tiny_gemma3_path)
    finally:
        _core.set_force_scalar(False)


@pytest.mark.parametrize("block", ["cpp", "python"])
def test_tiny_models_batched_equal_alone(
    block: str, tiny_llama_path: str, tiny_gemma3_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every weight type (the tiny models mix them), through _core.Block and PyBlock."""
    monkeypatch.setenv("HYBRIDLLM_BLOCK", block)
    for path in (tiny_llama_path, tiny_gemma3_path):
        model, _ = _models(path, 0)
        assert isinstance(model.blocks[0], PyBlock) == (block == "python")
        _alone_then_batched(path)


def test_forward_batch_rejects_bad_segments(tiny_llama_path: str, tiny_gemma3_path: str) -> None:
    model, (a, b) = _models(tiny_llama_path, 2)
    other, _ = _models(tiny_gemma3_path, 0)
    with pytest.raises(ContextFullError, match="do not fit in the context of 160 tokens"):
        model.forward_batch([(a, [1, 2], 159), (b, [3], 0)])
    with pytest.raises(ValueError, match="not a clone of this model"):
        model.forward_batch([(a, [1], 0), (other, [3], 0)])
    with pytest.raises(ValueError, match="has no tokens"):
        model.forward_batch([(a, [], 0)])
    block, x = model.blocks[0], model.embed([1, 2, 3])
    with pytest.raises(ValueError, match="the segments cover 2 rows, x has 3"):
        block.forward_batch(x, [(a.blocks[0], 0, 1), (b.blocks[0], 0, 1)])
    with pytest.raises(ValueError, match="two segments use the same block"):
        block.forward_batch(x, [(a.blocks[0], 0, 1), (a.blocks[0], 5, 2)])
    with pytest.raises(ValueError, match="other weights"):
        block.forward_batch(x, [(a.blocks[1], 0, 3)])
    with pytest.raises(ValueError, match="exceed n_ctx=160"):
        block.forward_batch(x, [(a.blocks[0], 158, 3)])
    with pytest.raises(TypeError, match="tuple"):
        block.forward_batch(x, [a.blocks[0]])


def count_products(backend: object, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts of the backend's matmul and matmul_rows_alone calls from now on (updated live)."""
    calls = {"matmul": 0, "matmul_rows_alone": 0}
    for name in calls:
        method = getattr(backend, name)

        def counted(w, x, name=name, method=method):  # noqa: ANN001, ANN202
            calls[name] += 1
            return method(w, x)

        monkeypatch.setattr(backend, name, counted)
    return calls


def test_pyblock_reads_each_weight_once_for_decode_rows(
    tiny_llama_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four sequences' decode rows: one product per weight matrix for all four (7 a block),
    each row as if alone; a prompt chunk beside them gets its own plain products."""
    monkeypatch.setenv("HYBRIDLLM_BLOCK", "python")
    model, clones = _models(tiny_llama_path, 5)
    calls = count_products(model.blocks[0].backend, monkeypatch)
    block = model.blocks[0]
    x = model.embed([1, 2, 3, 4, 5, 6, 7])
    block.forward_batch(x, [(c.blocks[0], 0, 1) for c in clones[:4]] + [(clones[4].blocks[0], 0, 3)])
    assert calls == {"matmul": 7, "matmul_rows_alone": 7}


def test_engine_decode_takes_llama_batch_rows(tiny_llama_path: str) -> None:
    """Engine.decode: rows of several slots in llama_batch's shape, logits for the flagged rows
    only, each equal to its sequence alone (hidden rows of its own forward, a one-row head)."""
    model, alone = _models(tiny_llama_path, 3)
    engine = Engine(model, tokenizer=None, n_slots=3)
    rng = np.random.default_rng(7)
    first, second = ([int(t) for t in rng.integers(0, model.n_vocab, size=k)] for k in (9, 4))
    flags = [True, False, False, True, False, False, False, False, True] + [False, False, False, True]
    batch = Batch(first + second, [*range(9), *range(4)], [2] * 9 + [0] * 4, flags)
    got = engine.decode(batch)

    def one_row_logits(m: Model, tokens: list[int], pos0: int, rows: list[int]) -> list[np.ndarray]:
        x = m.hidden(tokens, pos0)
        return [m.logits(np.ascontiguousarray(x[r : r + 1]))[0] for r in rows]

    want = one_row_logits(alone[2], first, 0, [0, 3, 8]) + one_row_logits(alone[0], second, 0, [3])
    assert len(got) == 4 and all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))
    assert engine.slots[2].tokens == first and engine.slots[0].tokens == second

    # the next rows continue each slot's cache; a sequence may also restart inside what it holds
    nxt = Batch.of([(2, [5], 9), (1, second[:2], 0), (0, [6, 7], 2)])
    got = engine.decode(nxt)
    want = [alone[2].forward([5], 9)[-1], alone[1].forward(second[:2], 0)[-1], alone[0].forward([6, 7], 2)[-1]]
    assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))
    assert engine.slots[0].tokens == second[:2] + [6, 7]


def test_engine_decode_rejects_bad_batches(tiny_llama_path: str) -> None:
    model, _ = _models(tiny_llama_path, 0)
    engine = Engine(model, tokenizer=None, n_slots=2)
    engine.decode(Batch.of([(0, [1, 2, 3], 0)]))
    bad = [
        (Batch([1, 2], [0, 1], [0], [True, True]), "one entry per row"),
        (Batch([], [], [], []), "one entry per row"),
        (Batch([1], [0], [2], [True]), r"batch.seq_id\[0\] = 2: no such slot \(0..1\)"),
        (Batch([1, 2], [0, 2], [1, 1], [False, True]), r"batch.pos\[1\] = 2: .* consecutive"),
        (Batch([1, 2, 3], [0, 0, 1], [1, 0, 1], [True] * 3), r"batch.seq_id\[2\] = 1: .* come together"),
        (Batch([1], [4], [0], [True]), r"batch.pos\[0\] = 4: slot 0 holds 3 tokens"),
        (Batch([1, 10**6], [1, 2], [0, 0], [True, True]), r"batch.token\[1\] = 1000000: outside"),
        (Batch([1], [0], [1], [True]), None),  # fine: a fresh slot from position 0
    ]
    for batch, message in bad:
        if message is None:
            engine.decode(batch)
            continue
        with pytest.raises(ValueError, match=message):
            engine.decode(batch)
    with pytest.raises(ContextFullError, match="slot 0's context of 160 tokens"):
        engine.decode(Batch.of([(0, [1] * N_CTX, 1)]))
    assert engine.slots[0].tokens == [1, 2, 3]  # a rejected batch changes nothing
    with pytest.raises(ValueError, match="sequence 1 has no tokens"):
        Batch.of([(0, [1], 3), (1, [], 0)])
    engine.slots[1].busy = True
    with pytest.raises(ValueError, match="serving a request"):
        engine.decode(Batch.of([(1, [1], 0)]))
    engine.slots[1].busy = False
    engine.start()
    try:
        with pytest.raises(RuntimeError, match="engine thread"):
            engine.decode(Batch.of([(1, [1], 0)]))
    finally:
        engine.stop()


def test_runner_engine_decode_flags_rows(tiny_llama_path: str) -> None:
    """The Runner's one slot takes Batch rows too: flagged rows as Runner.logits gives them."""
    from hybridllm.runner import Runner

    r = Runner(tiny_llama_path, n_ctx=64, n_threads=2)
    tokens = [3, 9, 27, 81, 243]
    got = r.engine.decode(Batch(tokens, list(range(5)), [0] * 5, [False, True, False, True, False]))
    want = r.logits(tokens)
    assert len(got) == 2 and np.array_equal(got[0], want[1]) and np.array_equal(got[1], want[3])
