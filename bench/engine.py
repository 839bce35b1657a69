"""Engine speed: pp512 and tg128 tokens/s, hybridllm vs llama.cpp (llama-cpp-python), CPU only.

    python bench/engine.py [--models smollm2-135m gemma3-270m] [--threads 2] [--repeats 3]

Both engines go through their public APIs: ours through `Runner.generate(stream=True)` (timings
from `Runner.last_stats`), llama.cpp through `Llama.eval` (the prompt as one call, then a greedy
loop of one-token evals). Every measurement runs in a fresh process, the two engines alternating,
and the table reports the median. pp512: a 512-token prompt (the start of
tests/data/perplexity_text.txt). tg128: 128 tokens generated greedily from a fresh context, end of
sequence ignored, like llama-bench.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEXT = HERE.parent / "tests" / "data" / "perplexity_text.txt"
N_PROMPT, N_GEN = 512, 128


def prompt_text(path: str) -> str:
    """Text whose tokenization is ~512 tokens for this model."""
    from hybridllm.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(path)
    ids = tok.encode(TEXT.read_text(encoding="utf-8"), add_bos=False)[:N_PROMPT]
    return tok.decode(ids)


# --- workers: one measurement each, in a fresh process --------------------------------------------
def run_ours(path: str, threads: int, test: str) -> dict:
    from hybridllm.runner import Runner

    r = Runner(path, n_ctx=1024, n_threads=threads)
    r.generate("Warm up the kernels and the compiled ops.", max_tokens=4, temperature=0)
    if test == "pp512":
        pieces = r.generate(prompt_text(path), max_tokens=1, temperature=0, stream=True)
        for _ in pieces:
            pass
        st = r.last_stats
        n = st.prompt_tokens - st.cached_tokens
        return {"tokens": n, "seconds": st.prompt_seconds}
    r.generate("x", max_tokens=1)  # move the cache away from the warm-up prompt
    pieces = r.generate("", max_tokens=N_GEN, temperature=0, stream=True, ignore_eos=True)
    for _ in pieces:
        pass
    st = r.last_stats
    return {"tokens": st.generated_tokens, "seconds": st.generation_seconds}


def run_llama(path: str, threads: int, test: str) -> dict:
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(
        path, n_ctx=1024, n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False
    )
    llm.eval(llm.tokenize(b"Warm up the kernels and the compiled ops.")[:8])
    llm.reset()
    if test == "pp512":
        ids = llm.tokenize(prompt_text(path).encode(), add_bos=True)
        t0 = time.perf_counter()
        llm.eval(ids)
        return {"tokens": len(ids), "seconds": time.perf_counter() - t0}
    bos = llm.token_bos()
    llm.eval([bos if bos >= 0 else 0])
    t0 = time.perf_counter()
    for _ in range(N_GEN):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        llm.eval([token])
    return {"tokens": N_GEN, "seconds": time.perf_counter() - t0}


# --- driver ---------------------------------------------------------------------------------------
def measure(engine: str, path: str, threads: int, test: str) -> float:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        engine,
        "--path",
        path,
        "--threads",
        str(threads),
        "--test",
        test,
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    return result["tokens"] / result["seconds"]


def bench(models: list[str], threads: int, repeats: int) -> list[dict]:
    from hybridllm.catalog import resolve_model

    rows = []
    for name in models:
        path = str(resolve_model(name))
        for test in ("pp512", "tg128"):
            rates: dict[str, list[float]] = {"ours": [], "llama": []}
            for i in range(repeats):
                order = ("llama", "ours") if i % 2 == 0 else ("ours", "llama")
                for engine in order:
                    rates[engine].append(measure(engine, path, threads, test))
            ours, theirs = statistics.median(rates["ours"]), statistics.median(rates["llama"])
            rows.append(
                {
                    "model": name,
                    "test": test,
                    "ours": ours,
                    "llama.cpp": theirs,
                    "ratio": ours / theirs,
                    "runs": rates,
                }
            )
            print(
                f"{name} {test}: ours {ours:.1f} t/s, llama.cpp {theirs:.1f} t/s, {ours / theirs:.2f}x",
                file=sys.stderr,
            )
    return rows


def markdown(rows: list[dict], threads: int) -> str:
    lines = [
        f"| model | test | hybridllm t/s | llama.cpp t/s | ratio | ({threads} threads, median) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        spread = ", ".join(f"{x:.1f}" for x in r["runs"]["ours"])
        lines.append(
            f"| {r['model']} | {r['test']} | {r['ours']:.1f} | {r['llama.cpp']:.1f} | {r['ratio']:.2f}x | ours: {spread} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(HERE / "out" / "engine.json"))
    p.add_argument("--worker", choices=["ours", "llama"], help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--test", choices=["pp512", "tg128"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        run = run_ours if args.worker == "ours" else run_llama
        print(json.dumps(run(args.path, args.threads, args.test)))
        return
    rows = bench(args.models, args.threads, args.repeats)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))
    print(markdown(rows, args.threads))


if __name__ == "__main__":
    main()
