"""Samplers: logits -> token id, composed like llama.cpp's default chain.

    [grammar mask] -> penalties -> top_k -> top_p -> min_p -> temperature -> sample

`make_sampler(temperature, top_k, top_p, min_p, seed)` returns a callable on a float32 logits
vector (n_vocab,); temperature <= 0 means greedy. `make_logits_processors(...)` returns the
penalty steps, which see the token history. `Sampler` bundles both for the generate loop.
`mask_logits(logits, bits)` applies a structured-output constraint's allowed-token bitmask
first (disallowed tokens get -inf), so every sampler setting works on what the grammar allows.
Filters work on a candidate list (ids, logits) sorted by descending logit, as llama.cpp's
`llama_token_data_array` after top_k, so each step costs O(k) after the first.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .options import check

#: (ids, logits) of the surviving candidates, sorted by descending logit.
Candidates = tuple[np.ndarray, np.ndarray]
LogitsProcessor = Callable[[np.ndarray, Sequence[int]], np.ndarray]


# --- grammar mask --------------------------------------------------------------------------
def mask_logits(logits: np.ndarray, allowed_bits: np.ndarray) -> np.ndarray:
    """A copy of logits (n_vocab,) with -inf where the bitmask forbids the token.

    allowed_bits: int32 words, token i at bit i % 32 of word i // 32 (llguidance's layout); rows
    past the mask's end (a logits row wider than the vocabulary) are forbidden too.
    """
    n_vocab = len(logits)
    # Little-endian words: byte 0 holds bits 0..7, so unpacking bytes little-first gives token order.
    bits = np.unpackbits(allowed_bits.view(np.uint8), bitorder="little", count=n_vocab)
    return np.where(bits.astype(bool), logits, np.float32(-np.inf)).astype(np.float32, copy=False)


# --- penalties ------------------------------------------------------------------------------
def make_logits_processors(
    repeat_penalty: float = 1.0,
    repeat_last_n: int = 64,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
) -> list[LogitsProcessor]:
    """The penalty step of llama.cpp (`llama_sampler_init_penalties`), or [] when all are off.

    repeat_last_n: how many recent tokens count (0 turns the penalties off, -1: all of them)."""
    repeat_penalty = check("repeat_penalty", repeat_penalty)
    repeat_last_n = check("repeat_last_n", repeat_last_n)
    presence_penalty = check("presence_penalty", presence_penalty)
    frequency_penalty = check("frequency_penalty", frequency_penalty)
    off = repeat_penalty == 1.0 and presence_penalty == 0.0 and frequency_penalty == 0.0
    if off or repeat_last_n == 0:
        return []

    def penalize(logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        window = history[-repeat_last_n:] if repeat_last_n > 0 else history
        if not window:
            return logits
        counts = Counter(window)
        ids = np.fromiter(counts, dtype=np.int64, count=len(counts))
        n = np.fromiter(counts.values(), dtype=np.float32, count=len(counts))
        out = logits.copy()
        picked = out[ids]
        # llama.cpp divides positive logits and multiplies negative ones, so both move down
        picked = np.where(picked <= 0, picked * repeat_penalty, picked / repeat_penalty)
        out[ids] = picked - n * frequency_penalty - presence_penalty
        return out

    return [penalize]


# --- the sampling chain ---------------------------------------------------------------------
def apply_top_k(c: Candidates, k: int) -> Candidates:
    """Keep the k highest logits; k <= 0 keeps all (they are sorted either way)."""
    ids, logits = c
    if 0 < k < len(ids):
        part = np.argpartition(-logits, k - 1)[:k]
        ids, logits = ids[part], logits[part]
    order = np.argsort(-logits, kind="stable")
    return ids[order], logits[order]


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp((logits - logits[0]).astype(np.float64))  # logits sorted: [0] is the max
    return e / e.sum()


def apply_top_p(c: Candidates, p: float, min_keep: int = 1) -> Candidates:
    """Keep the smallest prefix whose probability mass reaches p (p >= 1 keeps all)."""
    if p >= 1.0:
        return c
    cum = np.cumsum(_softmax(c[1]))
    keep = max(int(np.searchsorted(cum, p) + 1), min_keep)
    return c[0][:keep], c[1][:keep]


def apply_min_p(c: Candidates, p: float, min_keep: int = 1) -> Candidates:
    """Keep tokens whose probability is at least p times the top one's (p <= 0 keeps all)."""
    if p <= 0.0:
        return c
    # p_i >= p * p_max  <=>  logit_i >= logit_max + log(p): no softmax needed
    keep = max(int(np.count_nonzero(c[1] >= c[1][0] + np.log(p))), min_keep)
    return c[0][:keep], c[1][:keep]


def make_sampler(
    temperature: float = 0.8,
    top_k: int = 40,
    top_p: float = 0.95,
    min_p: float = 0.05,
    seed: int | None = None,
) -> Callable[[np.ndarray], int]:
    """logits (n_vocab,) -> token id. temperature 0: greedy (first max, like llama.cpp)."""
    temperature, top_k = check("temperature", temperature), check("top_k", top_k)
    top_p, min_p = check("top_p", top_p), check("min_p", min_p)
    if temperature <= 0:
        return lambda logits: int(np.argmax(logits))
    rng = np.random.default_rng(seed)

    def sample(logits: np.ndarray) -> int:
        c = apply_top_k(_all(logits), top_k)
        c = apply_min_p(apply_top_p(c, top_p), min_p)
        probs = _softmax(c[1] / np.float32(temperature))
        return int(c[0][rng.choice(len(probs), p=probs)])

    return sample


def _all(logits: np.ndarray) -> Candidates:
    logits = np.asarray(logits, dtype=np.float32)
    return np.arange(len(logits)), logits


@dataclass
class Sampler:
    """Penalties then the sampling chain: what generate calls once per token."""

    sample_fn: Callable[[np.ndarray], int]
    processors: list[LogitsProcessor]

    @classmethod
    def create(
        cls,
        temperature: float = 0.8,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        repeat_penalty: float = 1.0,
        repeat_last_n: int = 64,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        seed: int | None = None,
    ) -> Sampler:
        return cls(
            make_sampler(temperature, top_k, top_p, min_p, seed),
            make_logits_processors(
                repeat_penalty, repeat_last_n, presence_penalty, frequency_penalty
            ),
        )

    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        for proc in self.processors:
            logits = proc(logits, history)
        return self.sample_fn(logits)
