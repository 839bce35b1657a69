"""The engine (hybridllm/engine.py): slots, prefix reuse, queue, cancellation, batch invariance.

Everything runs SmolLM2-135M in-process; the reference is `Runner.generate` on the same file,
which runs one sequence through the same model code.
"""

from __future__ import annotations

import queue
import threading

import numpy as np
import pytest
from oracle import PROMPTS as ALL_PROMPTS

from hybridllm.engine import (
    Engine,
    Failed,
    Finished,
    Piece,
    QueueFullError,
    Request,
    SamplingState,
    model_with_own_cache,
)
from hybridllm.errors import ContextFullError
from hybridllm.model import Model, PyBlock, core_block_class
from hybridllm.runner import Runner
from hybridllm.sampling import Sampler

N_CTX = 256
PROMPTS = [*ALL_PROMPTS[:7], ALL_PROMPTS[9]]


@pytest.fixture(scope="module")
def runner(smollm_path: str) -> Runner:
    return Runner(smollm_path, n_ctx=N_CTX, n_threads=2)


@pytest.fixture(scope="module")
def engine(runner: Runner):  # noqa: ANN201
    # small prefill chunks, so prompts are prefilled over several ticks between decode steps
    engine = Engine(runner.model, runner.tokenizer, n_slots=4, max_queue=16, prefill_chunk=5)
    engine.start()
    yield engine
    engine.stop()


def _args(runner: Runner, prompt: str, max_tokens: int = 16, **sampling) -> dict:  # noqa: ANN003
    ids = runner.tokenize(prompt, add_bos=True, special=True)
    sampler = Sampler.create(**{"temperature": 0, **sampling})
    return dict(prompt=ids, sampling=SamplingState(sampler), max_tokens=max_tokens,
                stop_ids=runner.tokenizer.eot_ids)  # fmt: skip


def _collect(events) -> tuple[str, Finished]:  # noqa: ANN001
    texts, end = [], None
    for event in events:
        if isinstance(event, Piece):
            texts.append(event.text)
        else:
            end = event
    assert isinstance(end, Finished), end
    return "".join(texts), end


def test_greedy_equals_runner(runner: Runner, engine: Engine) -> None:
    for prompt in PROMPTS[:3]:
        text, end = _collect(engine.generate(_args(runner, prompt)))
        assert text == runner.generate(prompt, max_tokens=16, temperature=0)
        assert end.usage.completion_tokens == runner.last_stats.generated_tokens
        assert end.usage.prompt_tokens == runner.last_stats.prompt_tokens


def test_concurrent_requests_each_equal_alone(runner: Runner, engine: Engine) -> None:
    """Batch invariance: 8 requests at once (4 slots, 4 waiting) give what each gives alone,
    the same tokens with the same logprobs to the last bit. Without prefix reuse: which slot holds what depends on the requests served before, and
    logits after a reused prefix may differ from a whole evaluation in the last bits (other
    kernel splits, as in llama.cpp: on the AVX2 core one greedy text here changed)."""

    def args(prompt: str) -> dict:
        return {**_args(runner, prompt, 24), "reuse_prefix": False, "n_logprobs": 0}

    def served(prompt: str) -> tuple[str, list[tuple[int, float | None]]]:
        """The text and each token with its logprob (bit-equal logits give equal floats)."""
        pieces = list(engine.generate(args(prompt)))
        text, _ = _collect(pieces)
        return text, [(t.id, t.logprob) for p in pieces if isinstance(p, Piece) for t in p.tokens]

    alone = [served(p) for p in PROMPTS]
    results: dict[int, tuple[str, list]] = {}

    def one(i: int) -> None:
        results[i] = served(PROMPTS[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(len(PROMPTS))] == alone


def test_seeded_sampling_equals_runner(runner: Runner, engine: Engine) -> None:
    prompt = PROMPTS[1]
    sampling = dict(temperature=1.0, top_k=40, top_p=0.95, min_p=0.05, seed=1234)
    text, _ = _collect(engine.generate(_args(runner, prompt, 24, **sampling)))
    assert text == runner.generate(prompt, max_tokens=24, **sampling)


def test_stop_string_ends_the_request(runner: Runner, engine: Engine) -> None:
    prompt = "List of the days of the week: Monday, Tuesday,"
    args = {**_args(runner, prompt, 32), "stop": ["Friday"]}
    text, end = _collect(engine.generate(args))
    assert text == runner.generate(prompt, max_tokens=32, temperature=0, stop=["Friday"])
    assert "Friday" not in text and end.reason == "stop"
    assert runner.last_stats.finish_reason == "stop"


def test_follow_up_reuses_its_slot_prefix(runner: Runner, engine: Engine) -> None:
    first = "Question: What is 12 times 7?\nAnswer:"
    text, _ = _collect(engine.generate(_args(runner, first, 8)))
    follow = first + text + "\nQuestion: And 12 times 8?\nAnswer:"
    _, end = _collect(engine.generate(_args(runner, follow, 8)))
    n_first = len(runner.tokenize(first, special=True))
    # the follow-up evaluates only what its slot does not hold: at least the first prompt is reused
    assert end.usage.cached_tokens >= n_first
    held = max(s["n_cached"] for s in engine.slot_states())
    assert held >= end.usage.prompt_tokens


def test_new_request_takes_the_slot_with_the_longest_prefix(runner: Runner) -> None:
    engine = Engine(runner.model, runner.tokenizer, n_slots=3, max_queue=4)
    engine.start()
    try:
        for prompt in PROMPTS[:3]:  # unrelated prompts spread over the slots (least recently used)
            _collect(engine.generate(_args(runner, prompt, 4)))
        assert all(s["n_cached"] > 0 for s in engine.slot_states())
        ids = runner.tokenize(PROMPTS[1], special=True)
        holder = next(s for s in engine.slots if s.tokens[: len(ids)] == ids)
        _, end = _collect(engine.generate(_args(runner, PROMPTS[1] + " a fisherman lived", 4)))
        assert end.usage.cached_tokens >= len(ids)
        assert holder.last_used == max(s.last_used for s in engine.slots)
    finally:
        engine.stop()


def test_cancel_frees_the_slot_at_once(runner: Runner) -> None:
    engine = Engine(runner.model, runner.tokenizer, n_slots=1, max_queue=1)
    engine.start()
    events: queue.Queue = queue.Queue()
    try:
        args = {**_args(runner, PROMPTS[0], None), "stop_ids": ()}  # runs until the context is full
        handle = engine.submit(Request(emit=events.put, **args))
        assert isinstance(events.get(), Piece)
        handle.cancel()
        while isinstance(end := events.get(), Piece):
            pass
        assert isinstance(end, Finished) and end.reason == "cancelled"
        assert end.usage.completion_tokens < N_CTX - len(args["prompt"])
        assert not engine.slot_states()[0]["is_processing"]
        text, _ = _collect(engine.generate(_args(runner, PROMPTS[3], 16)))
        assert text == runner.generate(PROMPTS[3], max_tokens=16, temperature=0)
    finally:
        engine.stop()


def test_queue_is_bounded_and_in_arrival_order(runner: Runner) -> None:
    engine = Engine(runner.model, runner.tokenizer, n_slots=1, max_queue=2)
    order: list[int] = []
    done = threading.Event()

    def emit_for(i: int):  # noqa: ANN202
        def emit(event) -> None:  # noqa: ANN001
            if isinstance(event, Finished):
                order.append(i)
                if len(order) == 3:
                    done.set()

        return emit

    # not started yet: nothing is admitted, so 1 free slot + 2 waiting places take 3 requests
    for i in range(3):
        engine.submit(Request(emit=emit_for(i), **_args(runner, PROMPTS[i], 2)))
    with pytest.raises(QueueFullError):
        engine.submit(Request(emit=emit_for(9), **_args(runner, PROMPTS[3], 2)))
    engine.start()
    try:
        done.wait()
        assert order == [0, 1, 2]
    finally:
        engine.stop()


def test_prompt_longer_than_the_context_is_refused(runner: Runner, engine: Engine) -> None:
    args = _args(runner, "word " * N_CTX)
    with pytest.raises(ContextFullError, match="more than n_ctx="):
        engine.submit(Request(emit=lambda e: None, **args))


def test_logprobs_are_log_softmax_of_the_logits(runner: Runner, engine: Engine) -> None:
    args = {**_args(runner, PROMPTS[0], 3), "n_logprobs": 5}
    tokens = [t for e in engine.generate(args) if isinstance(e, Piece) for t in e.tokens]
    assert len(tokens) == 3
    ids = runner.tokenize(PROMPTS[0], special=True)
    logits = runner.logits(ids + [tokens[0].id])[-2]  # after the prompt's last token
    log_p = logits.astype(np.float64) - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
    assert tokens[0].id == int(np.argmax(logits)) == tokens[0].top[0][0]
    assert tokens[0].logprob == pytest.approx(float(log_p[tokens[0].id]), abs=1e-4)
    assert [lp for _, lp in tokens[0].top] == sorted((lp for _, lp in tokens[0].top), reverse=True)
    assert len(tokens[0].top) == 5


def test_a_failing_constraint_fails_only_its_request(runner: Runner, engine: Engine) -> None:
    class Broken:
        done = False

        def mask_logits(self, logits: np.ndarray) -> np.ndarray:
            raise RuntimeError("matcher broke")

        def accept_token(self, token: int) -> None:
            pass

    args = _args(runner, PROMPTS[0])
    args["sampling"] = SamplingState(args["sampling"].sampler, constraint=Broken())
    events = list(engine.generate(args))
    assert isinstance(events[-1], Failed) and "matcher broke" in events[-1].message
    text, _ = _collect(engine.generate(_args(runner, PROMPTS[0])))
    assert text == runner.generate(PROMPTS[0], max_tokens=16, temperature=0)


def test_a_constraint_masks_the_logits(runner: Runner, engine: Engine) -> None:
    """A constraint that allows only the token ' the' gets it every time."""
    only = runner.tokenize(" the", add_bos=False)[0]
    seen: list[int] = []

    class OnlyThe:
        done = False

        def mask_logits(self, logits: np.ndarray) -> np.ndarray:
            masked = np.full_like(logits, -np.inf)
            masked[only] = logits[only]
            return masked

        def accept_token(self, token: int) -> None:
            seen.append(token)

    args = _args(runner, PROMPTS[0], 4)
    args["sampling"] = SamplingState(args["sampling"].sampler, constraint=OnlyThe())
    text, _ = _collect(engine.generate(args))
    assert text == " the" * 4 and seen == [only] * 4


@pytest.mark.parametrize("block", ["default", "python"])
def test_slot_models_share_weights_and_own_their_caches(
    tiny_llama_path: str, block: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hybridllm.gguf_file import ModelFile

    if block == "python":
        monkeypatch.setenv("HYBRIDLLM_BLOCK", "python")
    model = Model(ModelFile(tiny_llama_path), n_ctx=32, n_threads=1)
    clone = model_with_own_cache(model)
    assert clone.head is model.head and clone.embedding is model.embedding
    assert isinstance(model.blocks[0], PyBlock) == (block == "python" or core_block_class() is None)
    for a, b in zip(model.blocks, clone.blocks, strict=True):
        assert a is not b
        if isinstance(a, PyBlock):
            assert a.w is b.w and a.k_cache is not b.k_cache
    # the clone's cache is its own: evaluating there leaves the original's logits unchanged
    first = model.forward([1, 2, 3], 0)
    clone.forward([4, 5, 6, 7], 0)
    np.testing.assert_array_equal(model.forward([3], 2), first)


def test_a_complete_grammar_stops_the_request(runner: Runner, engine: Engine) -> None:
    """constrain.Constraint (llguidance) as the request's constraint: the output is one of the
    choices, ends with finish reason "stop", and equals Runner.generate's with the same choices."""
    from hybridllm.constrain import Constraint, compile_grammar

    prompt, choices = "Is the sky blue? Answer yes or no:", [" yes", " no", " maybe so"]
    args = _args(runner, prompt, 16)
    constraint = Constraint(compile_grammar(choices=choices), runner.tokenizer, runner.n_vocab)
    args["sampling"] = SamplingState(args["sampling"].sampler, constraint=constraint)
    text, end = _collect(engine.generate(args))
    assert text in choices and end.reason == "stop"
    assert text == runner.generate(prompt, max_tokens=16, temperature=0, choices=choices)


def test_stop_ends_active_and_waiting_requests(runner: Runner) -> None:
    engine = Engine(runner.model, runner.tokenizer, n_slots=1, max_queue=2)
    events: queue.Queue = queue.Queue()
    args = {**_args(runner, PROMPTS[0], None), "stop_ids": ()}
    engine.submit(Request(emit=events.put, **args))
    engine.submit(Request(emit=events.put, **_args(runner, PROMPTS[1], 4)))
    engine.start()
    assert isinstance(events.get(), Piece)
    engine.stop()
    ends = []
    while not events.empty():
        event = events.get()
        if not isinstance(event, Piece):
            ends.append(event)
    assert [e.reason for e in ends] == ["cancelled", "cancelled"]


def test_a_long_prompt_does_not_freeze_other_streams(runner: Runner) -> None:
    """While a 200-token prompt is prefilled 16 tokens a tick, a decoding stream gets a token
    every tick: about 200 / 16 of them before the long request's first token."""
    engine = Engine(runner.model, runner.tokenizer, n_slots=2, max_queue=2, prefill_chunk=16)
    log: queue.Queue = queue.Queue()
    engine.start()
    try:
        args = {**_args(runner, PROMPTS[0], None), "stop_ids": ()}
        streaming = engine.submit(Request(emit=lambda e: log.put(("a", e)), **args))
        assert log.get()[0] == "a"  # decoding
        long_prompt = runner.tokenize("word " * 200, special=True)
        assert len(long_prompt) >= 200
        long_args = {**_args(runner, "x", 1), "prompt": long_prompt}
        engine.submit(Request(emit=lambda e: log.put(("b", e)), **long_args))
        a_tokens = 0
        while (item := log.get())[0] == "a":
            a_tokens += len(item[1].tokens)
        assert a_tokens >= len(long_prompt) // 16 - 1
        streaming.cancel()
    finally:
        engine.stop()
