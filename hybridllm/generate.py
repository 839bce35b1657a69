"""Generation: the KV-cache context, prefill, the decode loop, stop strings and streaming text.

`Context` knows which tokens sit in the model's KV cache (position i holds tokens[i]); a new
prompt reuses the longest common prefix and evaluates only the rest, which is how later chat
turns cost only their new tokens. `generate_tokens` owns the loop; `generate_text` turns its
ids into UTF-8-safe text and applies stop strings, holding back any tail that could still
become one so a stop string never reaches the caller, streamed or not. With a structured-output
`Constraint` (constrain.py), each step samples only tokens the grammar allows and generation ends
once the grammar is complete; the next step's allowed tokens are computed on a worker thread
while the model evaluates the token just sampled.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ContextFullError
from .sampling import mask_logits


@dataclass
class GenerationStats:
    """Timing of the last call: what `--verbose` prints and the benchmark reads."""

    prompt_tokens: int = 0  # tokens in the prompt
    cached_tokens: int = 0  # of those, reused from the KV cache (not evaluated)
    prompt_seconds: float = 0.0
    generated_tokens: int = 0
    generation_seconds: float = 0.0  # sampling + decode steps, not the caller's time
    # "eos", "stop" (a stop string, or a structured-output grammar complete), "length", "context"
    finish_reason: str = ""
    context_shifts: int = 0  # times a full context dropped old tokens to go on

    @property
    def prompt_tokens_per_second(self) -> float:
        evaluated = self.prompt_tokens - self.cached_tokens
        return evaluated / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def generation_tokens_per_second(self) -> float:
        return (
            self.generated_tokens / self.generation_seconds if self.generation_seconds > 0 else 0.0
        )


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class Context:
    """A model plus the list of tokens its KV cache holds, positions 0..len(tokens)-1."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.tokens: list[int] = []

    @property
    def n_ctx(self) -> int:
        return int(self.model.n_ctx)

    def prefill(self, prompt: Sequence[int]) -> tuple[np.ndarray, int]:
        """Evaluate a prompt, reusing the cached prefix -> (logits of its last token, reused count)."""
        if not prompt:
            raise ValueError("the prompt has no tokens")
        if len(prompt) > self.n_ctx:
            raise ContextFullError(
                f"the prompt has {len(prompt)} tokens, more than n_ctx={self.n_ctx} holds; "
                "shorten it or use a larger n_ctx"
            )
        # Keep at least one token to evaluate: we need the logits after the last one.
        keep = min(common_prefix(self.tokens, prompt), len(prompt) - 1)
        del self.tokens[keep:]
        logits = self.model.forward(list(prompt[keep:]), keep)[-1]
        self.tokens.extend(prompt[keep:])
        return logits, keep

    def evaluate(self, tokens: Sequence[int], first_logit: int = 0) -> np.ndarray:
        """Evaluate tokens from position 0 (a fresh context) -> logits of rows first_logit.."""
        if len(tokens) > self.n_ctx:
            raise ContextFullError(f"{len(tokens)} tokens do not fit in n_ctx={self.n_ctx}")
        self.tokens = []
        logits = self.model.forward(list(tokens), 0, first_logit)
        self.tokens = list(tokens)
        return logits

    def step(self, token: int) -> np.ndarray:
        """Evaluate one token at the next position -> its logits (n_vocab,)."""
        if len(self.tokens) >= self.n_ctx:
            raise ContextFullError(
                f"the context is full (n_ctx={self.n_ctx}); context_shift=True drops old tokens "
                "to go on, or use a larger n_ctx"
            )
        logits = self.model.forward([token], len(self.tokens))[0]
        self.tokens.append(token)
        return logits

    def shift(self, n_keep: int) -> None:
        """Drop the oldest half of the tokens after the first n_keep and re-evaluate the rest.

        The first n_keep stay in the cache as they are; the tokens after them are evaluated
        again at their new positions (instead of re-roping their cached keys): slower, but
        exactly what a fresh run on the kept tokens gives.
        """
        n_keep = max(0, min(n_keep, len(self.tokens) - 1))
        n_discard = max(1, (len(self.tokens) - n_keep) // 2)
        rest = self.tokens[n_keep + n_discard :]
        del self.tokens[n_keep:]
        if rest:
            self.model.forward(rest, n_keep)
        self.tokens.extend(rest)


def generate_tokens(
    ctx: Context,
    prompt: Sequence[int],
    sample: Callable[[np.ndarray, Sequence[int]], int],
    max_tokens: int | None,
    stop_ids: Collection[int],
    stats: GenerationStats,
    context_shift: bool = False,
    n_keep: int | None = None,
    constraint: Any = None,
) -> Iterator[int]:
    """Prefill the prompt, then yield sampled ids until a stop id, max_tokens or a full context.

    A stop id ends generation and is not yielded. The last yielded token is not evaluated
    (nothing would read its logits); a later prompt that continues it evaluates it then.
    With context_shift, a full context keeps its first n_keep tokens (default: the prompt when
    it fills at most half the context, else the first token) and drops half of the rest.
    constraint (a constrain.Constraint, one per generation): only tokens it allows are sampled,
    and generation ends ("stop") when its grammar is complete; the mask of each next step is
    computed on a worker thread during the forward pass of the token just sampled.
    """
    stats.prompt_tokens, stats.finish_reason = len(prompt), "length"
    t0 = time.perf_counter()
    logits, stats.cached_tokens = ctx.prefill(prompt)
    stats.prompt_seconds = time.perf_counter() - t0
    if n_keep is None:
        n_keep = len(prompt) if len(prompt) <= ctx.n_ctx // 2 else 1
    while max_tokens is None or stats.generated_tokens < max_tokens:
        t0 = time.perf_counter()
        if constraint is not None:
            logits = mask_logits(logits, constraint.allowed())
        token = sample(logits, ctx.tokens)
        complete = constraint is not None and token not in stop_ids and constraint.advance(token)
        stats.generation_seconds += time.perf_counter() - t0
        if token in stop_ids:
            stats.finish_reason = "eos"
            return
        stats.generated_tokens += 1
        yield token
        if complete:
            stats.finish_reason = "stop"
            return
        if max_tokens is not None and stats.generated_tokens >= max_tokens:
            return
        t0 = time.perf_counter()
        if len(ctx.tokens) >= ctx.n_ctx:
            if not context_shift:
                stats.finish_reason = "context"
                raise ContextFullError(
                    f"the context is full after {stats.generated_tokens} generated tokens "
                    f"(n_ctx={ctx.n_ctx}); context_shift=True keeps going, or use a larger n_ctx"
                )
            ctx.shift(n_keep)
            stats.context_shifts += 1
        logits = ctx.step(token)
        stats.generation_seconds += time.perf_counter() - t0


class StopStrings:
    """Cuts generated text at the first stop string, holding back tails that may start one."""

    def __init__(self, stops: Sequence[str] | str | None) -> None:
        if isinstance(stops, str):
            stops = [stops]
        self.stops = [s for s in (stops or []) if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Add text -> (text safe to emit now, whether a stop string was reached)."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        hold = max((self._overlap(s) for s in self.stops), default=0)
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def _overlap(self, stop: str) -> int:
        """Longest proper prefix of `stop` that the pending text ends with."""
        for k in range(min(len(stop) - 1, len(self.pending)), 0, -1):
            if self.pending.endswith(stop[:k]):
                return k
        return 0

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def generate_text(
    tokens: Iterator[int], tokenizer: Any, stop: Sequence[str] | str | None, stats: GenerationStats
) -> Iterator[str]:
    """Decode a token stream to text pieces, ending at the first stop string (never included)."""
    decoder = tokenizer.stream_decoder()
    stops = StopStrings(stop)
    try:
        for token in tokens:
            out, hit = stops.feed(decoder.feed(token))
            if out:
                yield out
            if hit:
                stats.finish_reason = "stop"
                return
        out, hit = stops.feed(decoder.flush())
        if hit:
            stats.finish_reason = "stop"
        out += "" if hit else stops.flush()
        if out:
            yield out
    finally:
        close = getattr(tokens, "close", None)
        if close is not None:
            close()
