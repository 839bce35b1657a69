"""Generation pieces shared by the engine and the Runner: timing stats, prefix matching, stop strings.

The decode loop itself is the engine's scheduler (engine.py), which the Runner drives for its
one conversation. `StopStrings` holds back any tail of the text that could still become a stop
string, so a stop string never reaches the caller, streamed or not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


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
