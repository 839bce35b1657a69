"""Engine speed, hybridllm vs llama-bench, CPU only: pp512, tg128, pp4096 and tg64 @ d4096.

    python bench/engine.py --llama-bench PATH [--models smollm2-135m gemma3-270m]
                           [--tests pp512 tg128 pp4096 tg64@d4096] [--threads 2] [--repeats 3]
                           [--fa off auto] [--numba]

Both sides measure the same thing the same way: random token ids, a prompt of N tokens (ppN) or
N single-token greedy decode steps (tgN), after `@dD` tokens of untimed history (llama-bench's
`-d`). Ours runs `hybridllm.bench` on a fresh `Runner`; llama.cpp runs its own `llama-bench`
(`-r 1`, its warm-up included). Every measurement is a fresh process, the engines alternating,
and the table reports the median of `--repeats`.

Which ISA: ours is whatever core `hybridllm` loads (`HYBRIDLLM_CORE` selects another build), and
llama.cpp is the `--llama-bench` binary; `dev/avx2-pair run python bench/engine.py
--llama-bench build/avx2-pair/llama.cpp/build/bin/llama-bench` compares the two AVX2 builds on an
AVX-512 machine. The table header names both.

llama.cpp's flash attention: `--fa off` is the configuration our exactness tests compare with
(llama-cpp-python's `Llama(...)` default, flash_attn=False); `--fa auto` is llama-bench's default
(flash attention on for the CPU). Each value given is a column of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEST_RE = re.compile(r"^(pp|tg)(\d+)(?:@d(\d+))?$")


def parse_test(test: str) -> tuple[str, int, int]:
    """'tg64@d4096' -> ('tg', 64, 4096)."""
    m = TEST_RE.match(test)
    if not m:
        raise SystemExit(f"error: --tests: {test!r} is not ppN, tgN, ppN@dD or tgN@dD")
    return m.group(1), int(m.group(2)), int(m.group(3) or 0)


# --- workers: one measurement each, in a fresh process --------------------------------------------
def run_ours(path: str, threads: int, test: str) -> float:
    """tokens/s of one run of `test` on a fresh Runner."""
    from hybridllm.bench import context_needed, time_generation, time_prompt
    from hybridllm.runner import Runner

    kind, n, depth = parse_test(test)
    n_prompt, n_gen = (n, 0) if kind == "pp" else (0, n)
    warm_up = 32
    r = Runner(path, n_ctx=max(context_needed(n_prompt, n_gen, depth), warm_up), n_threads=threads)
    time_prompt(r.model, warm_up)  # as llama-bench's warm-up run
    timer = time_prompt if kind == "pp" else time_generation
    return n / timer(r.model, n, seed=0, depth=depth)


def run_llama_bench(binary: str, path: str, threads: int, test: str, fa: str) -> float:
    kind, n, depth = parse_test(test)
    cmd = [binary, "-m", path, "-t", str(threads), "-r", "1", "-o", "json", "-fa", fa,
           "-p", str(n if kind == "pp" else 0), "-n", str(n if kind == "tg" else 0),
           "-d", str(depth)]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(json.loads(out)[0]["avg_ts"])


def run_ours_subprocess(path: str, threads: int, test: str, env: dict[str, str]) -> float:
    cmd = [sys.executable, __file__, "--worker", "--path", path, "--threads", str(threads),
           "--tests", test]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return float(out.strip().splitlines()[-1])


# --- driver ---------------------------------------------------------------------------------------
def engines(args: argparse.Namespace) -> dict[str, object]:
    """name -> callable(path, test) -> tokens/s, in the order they alternate."""
    env = dict(os.environ)
    found: dict[str, object] = {
        "ours": lambda path, test: run_ours_subprocess(path, args.threads, test, env)
    }
    for fa in args.fa:
        found[f"llama.cpp fa={fa}"] = (
            lambda path, test, fa=fa: run_llama_bench(args.llama_bench, path, args.threads, test, fa)
        )
    if args.numba:
        numba_env = env | {"HYBRIDLLM_KERNELS": "numba", "HYBRIDLLM_BLOCK": "python"}
        found["ours, Numba"] = lambda path, test: run_ours_subprocess(
            path, args.threads, test, numba_env
        )
    return found


def bench(args: argparse.Namespace) -> list[dict]:
    from hybridllm.catalog import resolve_model

    rows = []
    runners = engines(args)
    for name in args.models:
        path = str(resolve_model(name))
        for test in args.tests:
            rates: dict[str, list[float]] = {e: [] for e in runners}
            for i in range(args.repeats):
                order = list(runners) if i % 2 == 0 else list(reversed(runners))
                for engine in order:
                    if engine == "ours, Numba" and parse_test(test)[2] > 0:
                        continue  # the fallback at depth 4096 would take many minutes a run
                    rates[engine].append(runners[engine](path, test))  # type: ignore[operator]
            medians = {e: statistics.median(v) for e, v in rates.items() if v}
            rows.append({"model": name, "test": test, "median": medians, "runs": rates})
            print(f"{name} {test}: " + ", ".join(f"{e} {v:.1f}" for e, v in medians.items()),
                  file=sys.stderr)  # fmt: skip
    return rows


def machine() -> dict[str, str]:
    from hybridllm import kernels

    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    return {
        "cpu": model or platform.processor(),
        "ours": f"{kernels.default_backend()} ({kernels.cpu_features()})",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def markdown(rows: list[dict], args: argparse.Namespace, info: dict[str, str]) -> str:
    engines_ = [e for e in rows[0]["median"]] if rows else []
    llamas = [e for e in engines_ if e.startswith("llama.cpp")]
    head = ["model", "test", *(f"{e} t/s" for e in engines_), *(f"ours / {e}" for e in llamas)]
    lines = [
        f"{info['cpu']}; ours: {info['ours']}; llama.cpp: `{args.llama_bench}`; "
        f"{args.threads} threads, median of {args.repeats}; {info['date']}, load {info['load']}",
        "",
        "| " + " | ".join(head) + " |",
        "|" + " --- |" * len(head),
    ]
    for r in rows:
        m = r["median"]
        cells = [r["model"], r["test"], *(f"{m[e]:.1f}" if e in m else "-" for e in engines_)]
        cells += [f"{m['ours'] / m[e]:.2f}x" for e in llamas]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    p.add_argument("--tests", nargs="+", default=["pp512", "tg128", "pp4096", "tg64@d4096"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--llama-bench", default=os.environ.get("LLAMA_BENCH", ""),
                   help="llama-bench binary built from the oracle's llama.cpp source ($LLAMA_BENCH)")  # fmt: skip
    p.add_argument("--fa", nargs="+", default=["off"], choices=["off", "on", "auto"],
                   help="llama.cpp flash-attention settings to compare with (default: off)")  # fmt: skip
    p.add_argument("--numba", action="store_true", help="also time the Numba fallback")
    p.add_argument("--out", default=str(HERE / "out" / "engine.json"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(run_ours(args.path, args.threads, args.tests[0]))
        return
    for test in args.tests:
        parse_test(test)
    if not args.llama_bench or not Path(args.llama_bench).is_file():
        raise SystemExit("error: --llama-bench: give the llama-bench binary (see the docstring)")
    info = machine()
    rows = bench(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": info, "rows": rows}, indent=2))
    print(markdown(rows, args, info))


if __name__ == "__main__":
    main()
