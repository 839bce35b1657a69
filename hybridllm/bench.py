"""llama-bench style speed test: pp (prompt tokens/s) and tg (generated tokens/s), reported apart.

pp N: one prompt of N tokens (only the last row goes through the head, as in generation).
tg N: N single-token decode steps, each feeding back the argmax. With a depth d (llama-bench's
`-d`), the context first holds d tokens, evaluated before the clock starts, so `tg64 @ d4096` is
decode speed with 4096 tokens of history. Like llama-bench, tokens are random ids (no special
tokens), so the figures do not depend on what the model would say.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np


def _random_tokens(n: int, n_vocab: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return rng.integers(1000, min(n_vocab, 30_000), size=n).tolist()


def fill_context(model: Any, depth: int, seed: int = 0) -> None:
    """Evaluate `depth` random tokens at positions 0..depth-1 (untimed history)."""
    if depth > 0:
        model.forward(_random_tokens(depth, model.n_vocab, seed + 1_000), 0)


def time_prompt(model: Any, n_prompt: int, seed: int = 0, depth: int = 0) -> float:
    """Seconds to evaluate n_prompt tokens at positions depth..depth+n_prompt-1."""
    tokens = _random_tokens(n_prompt, model.n_vocab, seed)
    fill_context(model, depth, seed)
    start = time.perf_counter()
    model.forward(tokens, depth)
    return time.perf_counter() - start


def time_generation(model: Any, n_gen: int, seed: int = 0, depth: int = 0) -> float:
    """Seconds for n_gen decode steps (one token each) after `depth` tokens and one more."""
    fill_context(model, depth, seed)
    token = _random_tokens(1, model.n_vocab, seed)[0]
    logits = model.forward([token], depth)
    start = time.perf_counter()
    for pos in range(depth + 1, depth + n_gen + 1):
        token = int(np.argmax(logits[-1]))
        logits = model.forward([token], pos)
    return time.perf_counter() - start


def context_needed(n_prompt: int, n_gen: int, depth: int = 0) -> int:
    """Context length the tests need: the depth plus the longer of the two tests."""
    return depth + max(n_prompt, n_gen + 1 if n_gen > 0 else 0)


def bench_rows(
    runner: Any, n_prompt: int = 512, n_gen: int = 128, repetitions: int = 3, depth: int = 0
) -> list[dict]:
    """Median tokens/s over `repetitions` runs (after one warm-up), one row per test."""
    from . import kernels

    model = runner.model
    need = context_needed(n_prompt, n_gen, depth)
    if need > model.n_ctx:
        raise ValueError(f"the bench needs a context of {need} tokens; use --ctx {need}")
    time_prompt(model, min(max(n_prompt, 1), 32))  # warm-up: compile caches, page in the weights
    at = f" @ d{depth}" if depth else ""
    rows = []
    for test, n, timer in (("pp", n_prompt, time_prompt), ("tg", n_gen, time_generation)):
        if n <= 0:
            continue
        rates = [n / timer(model, n, seed=r, depth=depth) for r in range(repetitions)]
        rows.append({
            "model": runner.path.name,
            "size": f"{runner.model_file.file_size / (1 << 20):.0f} MiB",
            "params": f"{runner.n_params / 1e6:.0f} M",
            "kernels": runner.kernels_backend,
            "simd": kernels.cpu_features(),
            "threads": runner.n_threads,
            "gpu blocks": runner.plan.n_gpu_layers,
            "test": f"{test}{n}{at}",
            "t/s": f"{np.median(rates):.2f} ± {np.std(rates):.2f}",
        })  # fmt: skip
    return rows
