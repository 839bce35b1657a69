"""llama-bench style speed test: pp (prompt tokens/s) and tg (generated tokens/s), reported apart.

pp N: one prompt of N tokens evaluated from an empty context (only the last row goes through
the head, as in generation). tg N: N single-token decode steps after a short prompt, each
feeding back the argmax. Like llama-bench, tokens are random ids (no special tokens), so the
figures do not depend on what the model would say.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np


def _random_tokens(n: int, n_vocab: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return rng.integers(1000, min(n_vocab, 30_000), size=n).tolist()


def time_prompt(model: Any, n_prompt: int, seed: int = 0) -> float:
    """Seconds to evaluate n_prompt tokens at positions 0..n_prompt-1."""
    tokens = _random_tokens(n_prompt, model.n_vocab, seed)
    start = time.perf_counter()
    model.forward(tokens, 0)
    return time.perf_counter() - start


def time_generation(model: Any, n_gen: int, seed: int = 0) -> float:
    """Seconds for n_gen decode steps (one token each) after a 1-token prompt."""
    token = _random_tokens(1, model.n_vocab, seed)[0]
    logits = model.forward([token], 0)
    start = time.perf_counter()
    for pos in range(1, n_gen + 1):
        token = int(np.argmax(logits[-1]))
        logits = model.forward([token], pos)
    return time.perf_counter() - start


def bench_rows(runner: Any, n_prompt: int = 512, n_gen: int = 128, repetitions: int = 3) -> list[dict]:
    """Median tokens/s over `repetitions` runs (after one warm-up), one row per test."""
    model = runner.model
    if max(n_prompt, n_gen + 1) > model.n_ctx:
        raise ValueError(f"the bench needs a context of {max(n_prompt, n_gen + 1)} tokens; use --ctx")
    time_prompt(model, min(n_prompt, 32))  # warm-up: compile caches, page in the weights
    rows = []
    for test, n, timer in (("pp", n_prompt, time_prompt), ("tg", n_gen, time_generation)):
        if n <= 0:
            continue
        rates = [n / timer(model, n, seed=r) for r in range(repetitions)]
        rows.append({
            "model": runner.path.name,
            "size": f"{runner.model_file.file_size / (1 << 20):.0f} MiB",
            "params": f"{runner.n_params / 1e6:.0f} M",
            "kernels": runner.kernels_backend,
            "threads": runner.n_threads,
            "gpu blocks": runner.plan.n_gpu_layers,
            "test": f"{test}{n}",
            "t/s": f"{np.median(rates):.2f} ± {np.std(rates):.2f}",
        })  # fmt: skip
    return rows
