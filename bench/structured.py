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
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from hybridllm import Runner

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
    return {
        "model": model,
        "threads": runner.n_threads,
        "unconstrained_tps": free,
        "json_schema_tps": constrained,
        "json_schema_tokens": lengths,
        "ratio": statistics.median(constrained) / statistics.median(free),
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
          f"{'schema tokens':>15}  (medians of {args.repeats}; all runs in --json)")  # fmt: skip
    for r in results:
        print(f"{r['model']:<16}{r['threads']:>8}{statistics.median(r['unconstrained_tps']):>12.1f}"
              f"{statistics.median(r['json_schema_tps']):>14.1f}{r['ratio']:>8.1%}"
              f"{statistics.median(r['json_schema_tokens']):>15.0f}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
