"""Batched decode in process: B sequences' one-token steps as one `Model.forward_batch`.

    python bench/batch_forward.py --model smollm2-135m --threads 2 [--batch 1,4,16] [--depth 64]

Each of B sequences (a KV cache of its own, as a server slot has) first evaluates a prompt of
--depth tokens; then --steps decode steps run with one token per sequence, all B rows in one
forward. Reported per B: ms per step (blocks and head together), the head's share (final norm
and output matmul on B rows, timed alone), and generated tokens/s (B / step time). The ratio to
B=1 is what a server's aggregate can reach over its single-client rate before any HTTP cost;
the server figures are bench/serve_load.py's.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from hybridllm import catalog
from hybridllm.engine import model_with_own_cache
from hybridllm.runner import Runner


def step_ms(model, clones: list, first_pos: int, steps: int) -> float:
    """Mean ms of one decode step of every clone's sequence, all rows in one forward_batch."""
    t0 = time.perf_counter()
    for s in range(steps):
        model.forward_batch([(c, [100 + s], first_pos + s) for c in clones])
    return (time.perf_counter() - t0) / steps * 1e3


def head_ms(model, batch: int, steps: int) -> float:
    x = np.random.default_rng(0).standard_normal((batch, model.config.dim)).astype(np.float32)
    model.logits(x, rows_alone=True)
    t0 = time.perf_counter()
    for _ in range(steps):
        model.logits(x, rows_alone=True)
    return (time.perf_counter() - t0) / steps * 1e3


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="smollm2-135m", help="catalog name or GGUF path")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--batch", default="1,4,16", help="sequences per step (default 1,4,16)")
    p.add_argument(
        "--depth", type=int, default=64, help="prompt tokens per sequence before decoding"
    )
    p.add_argument("--steps", type=int, default=32, help="timed decode steps (default 32)")
    args = p.parse_args()
    runner = Runner(
        catalog.resolve_model(args.model),
        n_ctx=args.depth + 2 * args.steps + 8,
        n_threads=args.threads,
    )
    model = runner.model
    base = None
    for batch in (int(b) for b in args.batch.split(",")):
        clones = [model_with_own_cache(model) for _ in range(batch)]
        prompt = list(range(200, 200 + args.depth))
        model.forward_batch([(c, prompt, 0) for c in clones])
        step_ms(model, clones, args.depth, 2)  # warm-up steps (first-call costs)
        ms = step_ms(model, clones, args.depth + 2, args.steps)
        rate = batch / ms * 1e3
        base = base or rate
        print(
            f"B={batch:3d}  step {ms:6.1f} ms  head {head_ms(model, batch, args.steps):5.1f} ms  "
            f"{rate:6.0f} tokens/s  {rate / base:4.2f}x B=1",
            flush=True,
        )


if __name__ == "__main__":
    main()
