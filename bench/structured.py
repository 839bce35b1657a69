"""Decode speed with a JSON Schema constraint against unconstrained decode, on the same Runner.

    python bench/structured.py [--models smollm2-135m gemma3-270m] [--repeats 5] [--tokens 128]
                               [--threads N] [--json PATH]

Each repeat runs both, alternating which goes first, from the same prompt with the same sampler
(temperature 0.8, a fixed seed), for --tokens tokens: unconstrained with ignore_eos, and
constrained by SCHEMA (an array of 40 records: longer than --tokens, so the constraint is active
on every step). Decode speed is generated tokens over `last_stats.generation_seconds`
(sampling, masking and forward passes; not the prefill). The mask of step t+1 is computed on a
worker thread while the forward pass of step t runs, so the constrained figure pays only for
applying the mask. The table gives the median of each and their ratio (target: >= 90%).

On a busy machine the speeds swing run to run; the last columns are steadier: the constraint's
own cost per token, replaying a constrained run's tokens without the model (mask computation as
if it were not overlapped, and applying the mask to a logits row), against the decode step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from hybridllm import Runner
from hybridllm.constrain import compile_grammar
from hybridllm.sampling import mask_logits

PROMPT = "A list of people with their ages and home towns, as JSON:\n"
SCHEMA = {
    "type": "array",
    "minItems": 40,
    "maxItems": 40,
    "items": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 110},
            "town": {"type": "string", "maxLength": 12},
        },
        "required": ["name", "age", "town"],
        "additionalProperties": False,
    },
}


def decode_speed(runner: Runner, constrained: bool, tokens: int, seed: int) -> tuple[float, int]:
    """-> (tokens per second of the decode loop, tokens generated)."""
    options = {"json_schema": SCHEMA} if constrained else {"ignore_eos": True}
    runner.generate(PROMPT, max_tokens=tokens, temperature=0.8, seed=seed, **options)
    stats = runner.last_stats
    return stats.generation_tokens_per_second, stats.generated_tokens


def constraint_cost(runner: Runner) -> tuple[float, float]:
    """Replay the last run's generated tokens through a fresh constraint -> (ms per token
    computing masks serially, ms per token applying a mask to a logits row)."""
    prompt = runner.tokenize(PROMPT, special=True)
    generated = runner.slot.tokens[len(prompt) :]
    constraint = runner.constraint(compile_grammar(json_schema=SCHEMA))
    logits = np.zeros(runner.n_vocab, dtype=np.float32)
    compute = apply = 0.0
    for token in generated:
        t0 = time.perf_counter()
        bits = constraint.allowed()
        t1 = time.perf_counter()
        mask_logits(logits, bits)
        t2 = time.perf_counter()
        constraint.advance(token)
        constraint.allowed()  # wait here: count the computation as if it were not overlapped
        compute += (t1 - t0) + (time.perf_counter() - t2)
        apply += t2 - t1
    n = max(1, len(generated))
    return 1000 * compute / n, 1000 * apply / n


def bench_model(model: str, repeats: int, tokens: int, threads: int | None) -> dict:
    runner = Runner(model, n_ctx=1024, n_threads=threads)
    decode_speed(runner, True, 8, seed=0)  # warm-up: vocabulary for llguidance, kernels compiled
    decode_speed(runner, False, 8, seed=0)
    free, constrained, lengths = [], [], []
    for r in range(repeats):
        order = (False, True) if r % 2 == 0 else (True, False)
        for is_constrained in order:
            speed, n = decode_speed(runner, is_constrained, tokens, seed=r)
            (constrained if is_constrained else free).append(speed)
            if is_constrained:
                lengths.append(n)
                compute_ms, apply_ms = constraint_cost(runner)
    return {
        "model": model,
        "threads": runner.n_threads,
        "unconstrained_tps": free,
        "json_schema_tps": constrained,
        "json_schema_tokens": lengths,
        "ratio": statistics.median(constrained) / statistics.median(free),
        "mask_compute_ms_per_token": compute_ms,
        "mask_apply_ms_per_token": apply_ms,
        "decode_ms_per_token": 1000 / statistics.median(free),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128, help="unconstrained tokens per run")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    results = [bench_model(m, args.repeats, args.tokens, args.threads) for m in args.models]
    print(f"{'model':<16}{'threads':>8}{'free tok/s':>12}{'schema tok/s':>14}{'ratio':>8}"
          f"{'decode ms/tok':>15}{'mask compute':>14}{'mask apply':>12}"
          f"  (medians of {args.repeats}; all runs in --json)")  # fmt: skip
    for r in results:
        print(f"{r['model']:<16}{r['threads']:>8}{statistics.median(r['unconstrained_tps']):>12.1f}"
              f"{statistics.median(r['json_schema_tps']):>14.1f}{r['ratio']:>8.1%}"
              f"{r['decode_ms_per_token']:>15.2f}{r['mask_compute_ms_per_token']:>14.3f}"
              f"{r['mask_apply_ms_per_token']:>12.3f}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
