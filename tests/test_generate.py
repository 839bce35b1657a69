"""Generation: prefix reuse, the decode loop's stops, stop strings, context limits, the Runner API
(the loop is the engine's scheduler, driven on the caller's thread as the Runner drives it)."""

from __future__ import annotations

import numpy as np
import pytest

from hybridllm.engine import Engine, Finished, Piece, SamplingState
from hybridllm.errors import ContextFullError, DeviceError
from hybridllm.generate import StopStrings, common_prefix
from hybridllm.runner import Runner

V = 50


class CountingModel:
    """Predicts token (last + 1) % V; records how many tokens each forward evaluated."""

    def __init__(self, n_ctx: int = 32) -> None:
        self.n_ctx, self.calls = n_ctx, []

    def forward(self, tokens: list[int], pos0: int = 0, first_logit: int = -1) -> np.ndarray:
        assert pos0 + len(tokens) <= self.n_ctx
        self.calls.append((pos0, len(tokens)))
        n = len(tokens)
        first = first_logit % n if first_logit < 0 else first_logit
        out = np.zeros((n - first, V), dtype=np.float32)
        for i, t in enumerate(tokens[first:]):
            out[i, (t + 1) % V] = 1.0
        return out

    def forward_batch(self, segments: list) -> list[np.ndarray]:
        return [model.forward(list(tokens), pos0)[-1] for model, tokens, pos0 in segments]


class _Decoder:
    def feed(self, token: int) -> str:
        return f"<{token}>"

    def flush(self) -> str:
        return ""


class _Tokenizer:
    def stream_decoder(self) -> _Decoder:
        return _Decoder()


def greedy(logits: np.ndarray, history: object = ()) -> int:
    return int(np.argmax(logits))


def _engine(model: CountingModel) -> Engine:
    """The Runner's arrangement: one slot over the model's own cache, driven on this thread."""
    return Engine(model, _Tokenizer(), prefill_chunk=model.n_ctx, slot_models=[model])


def _run(
    engine: Engine, prompt: list[int], max_tokens: int | None, stop_ids=(), shift=False
) -> tuple[list[int], Finished]:  # noqa: ANN001
    request = dict(
        prompt=prompt, sampling=SamplingState(greedy), max_tokens=max_tokens,
        stop_ids=stop_ids, context_shift=shift,
    )  # fmt: skip
    events = list(engine.generate(request))
    tokens = [t.id for e in events if isinstance(e, Piece) for t in e.tokens]
    return tokens, events[-1]


# --- the loop with a stand-in model -------------------------------------------------------------
def test_common_prefix() -> None:
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0


def test_generate_stops_at_max_tokens_and_stop_ids() -> None:
    tokens, end = _run(_engine(CountingModel()), [1, 2], 3)
    assert tokens == [3, 4, 5] and end.reason == "length"
    tokens, end = _run(_engine(CountingModel()), [1], 10, stop_ids={5})
    assert tokens == [2, 3, 4] and end.reason == "eos" and end.usage.completion_tokens == 3


def test_prefix_is_reused_and_last_token_reevaluated() -> None:
    model = CountingModel()
    engine = _engine(model)
    _run(engine, [1, 2, 3, 4], 2)  # evaluates 4 prompt tokens + 1 decode step
    assert engine.slots[0].tokens == [1, 2, 3, 4, 5]
    model.calls.clear()
    _, end = _run(engine, [1, 2, 3, 4, 5, 6, 9], 1)
    assert model.calls == [(5, 2)] and end.usage.cached_tokens == 5  # only the new tokens
    model.calls.clear()
    _run(engine, [1, 2, 3, 4, 5, 6, 9], 1)  # same prompt again: the last token is re-evaluated
    assert model.calls == [(6, 1)]
    model.calls.clear()
    _run(engine, [1, 7], 1)  # diverges after one token
    assert model.calls == [(1, 1)] and engine.slots[0].tokens == [1, 7]


def test_prompt_too_long_raises() -> None:
    with pytest.raises(ContextFullError, match="n_ctx=8"):
        _run(_engine(CountingModel(8)), list(range(9)), 1)


def test_context_full_ends_or_shifts() -> None:
    tokens, end = _run(_engine(CountingModel(8)), [1, 2, 3], 20)
    assert end.reason == "context" and tokens == [4, 5, 6, 7, 8, 9]  # 5 fill it, 1 more sampled
    engine = _engine(CountingModel(8))
    tokens, end = _run(engine, [1, 2, 3], 20, shift=True)
    assert tokens == [(3 + i) % V + 1 for i in range(20)]  # the stand-in only sees the last token
    assert end.reason == "length" and end.usage.context_shifts >= 1
    held = engine.slots[0].tokens
    assert len(held) <= 8 and held[:3] == [1, 2, 3]  # the prompt is kept


def test_closing_a_stream_early_frees_the_slot() -> None:
    engine = _engine(CountingModel(64))
    request = dict(prompt=[1], sampling=SamplingState(greedy))
    events = engine.generate(request)
    next(events)
    events.close()
    assert not engine.slots[0].busy and engine.n_waiting == 0
    assert _run(engine, [1], 3)[0] == [2, 3, 4]


def test_unlimited_max_tokens_runs_to_a_stop_id() -> None:
    assert _run(_engine(CountingModel(64)), [1], None, stop_ids={10})[0] == list(range(2, 10))


# --- stop strings -------------------------------------------------------------------------------
def _feed_all(stops: StopStrings, pieces: list[str]) -> tuple[str, bool]:
    out, hit = "", False
    for p in pieces:
        text, hit = stops.feed(p)
        out += text
        if hit:
            return out, True
    return out + stops.flush(), False


def test_stop_string_split_across_pieces() -> None:
    assert _feed_all(StopStrings(["\n\nUser:"]), ["Hello", "\n", "\nUs", "er: more"]) == (
        "Hello",
        True,
    )


def test_partial_stop_prefix_is_released_when_it_does_not_complete() -> None:
    stops = StopStrings(["STOP"])
    assert stops.feed("abc ST") == ("abc ", False)  # "ST" is held back
    assert stops.feed("AR") == ("STAR", False)
    assert _feed_all(StopStrings("xyz"), ["a", "xy"]) == ("axy", False)


def test_earliest_stop_string_wins() -> None:
    assert StopStrings(["b", "abc"]).feed("xxabcd") == ("xx", True)  # "abc" starts first
    assert StopStrings([]).feed("anything") == ("anything", False)


# --- the Runner on a tiny model -----------------------------------------------------------------
@pytest.fixture(scope="module")
def runner(tiny_llama_path: str) -> Runner:
    return Runner(tiny_llama_path, n_ctx=96, n_threads=2, seed=1)


def test_runner_tokenize_roundtrip(runner: Runner) -> None:
    ids = runner.tokenize("Hello world")
    assert runner.detokenize(ids) == "Hello world"
    assert runner.logits(ids).shape == (len(ids), runner.n_vocab)


def test_generate_greedy_is_deterministic_and_streams_the_same(runner: Runner) -> None:
    a = runner.generate("Once upon a time", max_tokens=12, temperature=0)
    pieces = list(runner.generate("Once upon a time", max_tokens=12, temperature=0, stream=True))
    assert "".join(pieces) == a and len(pieces) > 1
    st = runner.last_stats
    assert st.generated_tokens == 12 and st.finish_reason == "length" and st.prompt_tokens > 0
    assert st.prompt_seconds > 0 and st.generation_seconds > 0


def test_a_new_call_ends_an_open_stream(runner: Runner) -> None:
    stream = runner.generate("Once upon a time", max_tokens=12, temperature=0, stream=True)
    first = next(stream)
    text = runner.generate("Once upon a time", max_tokens=12, temperature=0)
    assert text.startswith(first) and not runner.slot.busy
    assert list(stream) == []  # the open stream ended when the second call began


def test_an_interrupted_stream_leaves_a_consistent_cache(
    runner: Runner, tiny_llama_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while a reply streams (KeyboardInterrupt out of a forward pass): the slot is free,
    and every token it says it holds has its keys and values in the cache, so a follow-up that
    reuses them gets the logits of a fresh evaluation."""
    model_type, calls = type(runner.model), []
    real_forward = model_type.forward

    def interrupted(self, tokens, pos0=0, first_logit=-1):  # noqa: ANN001, ANN202
        calls.append(len(tokens))
        if len(calls) == 5:  # the prompt, then the fourth decode step
            raise KeyboardInterrupt
        return real_forward(self, tokens, pos0, first_logit)

    runner.slot.tokens.clear()
    monkeypatch.setattr(model_type, "forward", interrupted)
    with pytest.raises(KeyboardInterrupt):
        list(runner.generate("Once upon a time", max_tokens=12, temperature=0, stream=True))
    monkeypatch.undo()
    held = list(runner.slot.tokens)
    assert not runner.slot.busy and len(held) == len(runner.tokenize("Once upon a time")) + 3
    follow = held + [7]
    got = runner.slot.evaluate([7], len(held))[-1]
    want = Runner(tiny_llama_path, n_ctx=96, n_threads=2).logits(follow)[-1]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_seed_reproduces_sampled_text(runner: Runner) -> None:
    a = runner.generate("The", max_tokens=10, temperature=1.0, seed=42)
    b = runner.generate("The", max_tokens=10, temperature=1.0, seed=42)
    assert a == b
    other = {
        runner.generate("The", max_tokens=10, temperature=1.5, top_k=0, seed=s) for s in range(4)
    }
    assert len(other) > 1


def test_stop_strings_never_reach_the_caller(runner: Runner) -> None:
    full = runner.generate("A", max_tokens=24, temperature=0)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), full
    cut = full[: full.index(stop)]
    assert runner.generate("A", max_tokens=24, temperature=0, stop=[stop]) == cut
    streamed = list(runner.generate("A", max_tokens=24, temperature=0, stop=stop, stream=True))
    assert "".join(streamed) == cut and runner.last_stats.finish_reason == "stop"
    assert all(stop not in p for p in streamed)


def test_chat_reuses_the_kv_cache(runner: Runner) -> None:
    messages = [{"role": "user", "content": "Hi there"}]
    reply = runner.chat(messages, max_tokens=6, temperature=0)
    first = runner.last_stats
    messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "And then?"}]
    runner.chat(messages, max_tokens=4, temperature=0)
    second = runner.last_stats
    assert second.cached_tokens >= first.prompt_tokens  # the first turn was not evaluated again
    assert second.prompt_tokens > second.cached_tokens


def test_generate_context_full(runner: Runner) -> None:
    with pytest.raises(ContextFullError):
        runner.generate("x " * 200, max_tokens=4)
    with pytest.raises(ContextFullError, match="context_shift"):
        runner.generate("Hello", max_tokens=200, temperature=0, ignore_eos=True)
    text = runner.generate(
        "Hello", max_tokens=200, temperature=0, ignore_eos=True, context_shift=True
    )
    assert runner.last_stats.generated_tokens == 200 and isinstance(text, str)


def test_unknown_option_is_a_type_error(runner: Runner) -> None:
    with pytest.raises(TypeError, match="bogus"):
        runner.generate("Hi", bogus=1)


def test_perplexity_needs_enough_tokens(runner: Runner) -> None:
    with pytest.raises(ValueError, match="at least"):
        runner.perplexity("too short", n_ctx=64)
    ppl = runner.perplexity("The cat sat on the mat. " * 30, n_ctx=64)
    assert np.isfinite(ppl) and ppl > 1.0  # random weights: large, but a number


def test_gpu_layers_need_a_gpu(tiny_llama_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from hybridllm.backends import gpu_probe

    monkeypatch.delenv("HYBRIDLLM_SIMULATE_GPU", raising=False)
    no_cupy = gpu_probe.GpuStatus(None, reason="CuPy is not installed")
    monkeypatch.setattr(gpu_probe, "_probe_cupy", lambda: no_cupy)
    assert Runner(tiny_llama_path, n_ctx=64, n_gpu_layers="auto").n_gpu_layers == 0
    assert Runner(tiny_llama_path, n_ctx=64, n_gpu_layers=0).n_gpu_layers == 0
    with pytest.raises(ValueError, match="n_gpu_layers"):
        Runner(tiny_llama_path, n_ctx=64, n_gpu_layers="many")
    for asked in (3, "all"):
        with pytest.raises(DeviceError, match="CuPy is not installed"):
            Runner(tiny_llama_path, n_ctx=64, n_gpu_layers=asked)
