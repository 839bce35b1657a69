"""GPU offload benchmark: pp512 and tg128 (tokens/s) against the number of blocks on the GPU.

For each model and each GPU block count k (the last k blocks on the GPU, as llama.cpp's -ngl k;
embedding and head on the CPU), hybridllm is timed with the same definitions as
`hybridllm bench` (hybridllm.bench: pp = one prompt of N random tokens from an empty context;
tg = N single-token steps feeding back the argmax). When llama-cpp-python is a CUDA build, the
same k is timed in llama.cpp beside it (pp: one eval of N tokens; tg: N single-token evals).

Writes, under --out (default bench/results/):
    gpu-<date>.csv   one row per (model, engine, gpu blocks, test)
    gpu-<date>.md    a table per model: gpu blocks x (pp, tg) x (hybridllm, llama.cpp)
    gpu-<date>.png   tokens/s against gpu blocks, one panel per model and test (matplotlib)

    python bench/gpu.py                       # both test models, k = 0, L/4, L/2, 3L/4, L
    python bench/gpu.py --layers all --reps 5 # every k from 0 to L
    python bench/gpu.py --graphs              # tg also with decode steps as CUDA graphs
    python bench/gpu.py --cublas-prefill      # pp at the most GPU blocks also through f16 +
                                              # cuBLAS (HYBRIDLLM_CUDA_PREFILL=cublas)
    python bench/gpu.py --simulate            # no GPU: HYBRIDLLM's simulated GPU (smoke test)
    python bench/gpu.py --emulated --pp 40 --tg 2 --layers 0,1   # no GPU: the real CUDA backend
                                              # on the tests' CuPy stand-in and SIMT emulator
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_MODELS = ("smollm2-135m", "gemma3-270m")
FIELDS = ("model", "engine", "device", "gpu_blocks", "n_layers", "test", "tokens_per_s", "stdev", "reps")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="catalog names or .gguf paths")
    p.add_argument("--layers", default="quarters", help="'quarters' (0, L/4, .., L), 'all' (0..L) or a list like 0,8,16")
    p.add_argument("--pp", type=int, default=512, help="prompt tokens (0 skips pp)")
    p.add_argument("--tg", type=int, default=128, help="generated tokens (0 skips tg)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions; the median is reported")
    p.add_argument("--n-ctx", type=int, default=1024, help="context size of the KV caches")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: the kernels' default)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--no-llama-cpp", action="store_true", help="skip llama-cpp-python")
    p.add_argument("--simulate", action="store_true", help="use the simulated GPU (CPU kernels), to test this script")
    p.add_argument(
        "--graphs", action="store_true",
        help="for k > 0, time tg again with each decode step replayed as a CUDA graph (engine 'hybridllm graphs')",
    )  # fmt: skip
    p.add_argument(
        "--cublas-prefill", action="store_true",
        help="at the largest GPU block count measured, time pp again with quantized weights dequantized "
        "to f16 for cuBLAS instead of the 8-bit mmq tiles (engine 'hybridllm cublas')",
    )  # fmt: skip
    p.add_argument(
        "--emulated", action="store_true",
        help="run CudaBackend on the tests' CuPy stand-in (tests/gpu_emulator): the real kernels, very slowly",
    )  # fmt: skip
    return p.parse_args(argv)


def layer_counts(spec: str, n_layers: int) -> list[int]:
    if spec == "all":
        return list(range(n_layers + 1))
    if spec == "quarters":
        return sorted({round(n_layers * f / 4) for f in range(5)})
    counts = sorted({min(int(v), n_layers) for v in spec.split(",") if v.strip()})
    if not counts or counts[0] < 0:
        raise SystemExit(f"--layers {spec!r}: expected 'all', 'quarters' or non-negative integers")
    return counts


def model_path(name: str) -> Path:
    from hybridllm import catalog

    if name.endswith(".gguf"):
        return Path(name)
    item = catalog.entry(name)
    if not item.present:
        raise SystemExit(f"model {name} is not in {catalog.models_dir()}; run: hybridllm pull {name}")
    return item.path


# --- hybridllm ------------------------------------------------------------------------------
def gpu_backend(simulate: bool) -> tuple[Any, str]:
    """A fresh GPU backend (one per model, shared by its GPU blocks) and the device's name."""
    if simulate:
        from hybridllm.backends.simulated import SimulatedGpuBackend

        return SimulatedGpuBackend(), "simulated GPU"
    from hybridllm.backends.cuda import CudaBackend
    from hybridllm.backends.gpu_probe import probe

    status = probe()
    if status.free_bytes is None:
        raise SystemExit(f"no usable GPU: {status.reason} (use --simulate to test the script)")
    return CudaBackend(), status.name


@contextmanager
def prefill_env(value: str) -> Iterator[None]:
    """$HYBRIDLLM_CUDA_PREFILL set to value while the backends are made (and then restored)."""
    from hybridllm.placement import CUDA_PREFILL_ENV

    old = os.environ.get(CUDA_PREFILL_ENV)
    os.environ[CUDA_PREFILL_ENV] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(CUDA_PREFILL_ENV)
        else:
            os.environ[CUDA_PREFILL_ENV] = old


def release_gpu_memory(simulate: bool) -> None:
    if not simulate:
        import cupy

        cupy.get_default_memory_pool().free_all_blocks()


def bench_hybridllm(
    path: Path, k: int, args: argparse.Namespace, graphs: bool = False, only_pp: bool = False
) -> tuple[dict[str, list[float]], str]:
    """tokens/s per test for the last k blocks on the GPU; graphs: tg only, with the GPU run's
    decode steps replayed as CUDA graphs (CudaBackend.graphs); only_pp: no tg."""
    from hybridllm.backends.cpu import CpuBackend
    from hybridllm.bench import time_generation, time_prompt
    from hybridllm.gguf_file import ModelFile
    from hybridllm.model import Model

    mf = ModelFile(path)
    n_layers = mf.config.n_layers
    gpu, device = gpu_backend(args.simulate) if k else (None, "cpu")
    if graphs:
        gpu.graphs = True
    cpu = CpuBackend(args.threads)
    model = Model(mf, args.n_ctx, args.threads, backends=[cpu] * (n_layers - k) + [gpu] * k)
    time_prompt(model, min(args.pp or 32, 32))  # warm-up: kernel compilation, page-in, pools
    rates: dict[str, list[float]] = {}
    for test, n, timer in (("pp", args.pp, time_prompt), ("tg", args.tg, time_generation)):
        if n > 0 and not (graphs and test == "pp") and not (only_pp and test == "tg"):
            rates[f"{test}{n}"] = [n / timer(model, n, seed=r) for r in range(args.reps)]
    del model, gpu
    if k:  # k = 0 never touched the GPU (nor needs CuPy)
        release_gpu_memory(args.simulate)
    return rates, device


# --- llama.cpp ------------------------------------------------------------------------------
def llama_cpp_cuda() -> Any:
    """The llama_cpp module when it can offload to a GPU, else None."""
    try:
        import llama_cpp
    except ImportError:
        return None
    return llama_cpp if llama_cpp.llama_supports_gpu_offload() else None


def bench_llama_cpp(llama_cpp: Any, path: Path, k: int, args: argparse.Namespace) -> dict[str, list[float]]:
    llm = llama_cpp.Llama(
        model_path=str(path), n_gpu_layers=k, n_ctx=args.n_ctx, n_batch=512, n_ubatch=512,
        n_threads=args.threads, verbose=False,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    vocab = llm.n_vocab()

    def tokens(n: int) -> list[int]:
        return rng.integers(1000, min(vocab, 30_000), size=n).tolist()

    def prompt(n: int) -> float:
        llm.reset()
        ids = tokens(n)
        start = time.perf_counter()
        llm.eval(ids)
        return time.perf_counter() - start

    def generation(n: int) -> float:
        llm.reset()
        llm.eval(tokens(1))
        ids = tokens(n)
        start = time.perf_counter()
        for t in ids:
            llm.eval([t])
        return time.perf_counter() - start

    prompt(min(args.pp or 32, 32))  # warm-up
    rates: dict[str, list[float]] = {}
    for test, n, timer in (("pp", args.pp, prompt), ("tg", args.tg, generation)):
        if n > 0:
            rates[f"{test}{n}"] = [n / timer(n) for _ in range(args.reps)]
    llm.close()
    return rates


# --- reporting ------------------------------------------------------------------------------
def result_rows(model: str, engine: str, device: str, k: int, n_layers: int, rates: dict[str, list[float]]) -> list[dict]:
    return [
        {
            "model": model, "engine": engine, "device": device, "gpu_blocks": k, "n_layers": n_layers,
            "test": test, "tokens_per_s": round(statistics.median(r), 2),
            "stdev": round(statistics.stdev(r), 2) if len(r) > 1 else 0.0, "reps": len(r),
        }  # fmt: skip
        for test, r in rates.items()
    ]


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    """One table per model: a row per GPU block count, a column per (test, engine)."""
    devices = sorted({r["device"] for r in rows if r["device"] != "cpu"}) or ["cpu only"]
    lines = [
        f"# GPU offload: tokens/s against blocks on the GPU ({dt.date.today()})",
        "",
        f"Device: {', '.join(devices)}. n_ctx {args.n_ctx}, median of {args.reps} runs; "
        "the last k blocks on the GPU, embedding and head on the CPU.",
    ]
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        columns = list(dict.fromkeys((r["test"], r["engine"]) for r in mine))
        table = {(r["gpu_blocks"], r["test"], r["engine"]): r for r in mine}
        lines += ["", f"## {model} ({mine[0]['n_layers']} blocks)", ""]
        lines.append("| gpu blocks | " + " | ".join(f"{t} {e}" for t, e in columns) + " |")
        lines.append("|---:|" + "---:|" * len(columns))
        for k in sorted({r["gpu_blocks"] for r in mine}):
            cells = []
            for t, e in columns:
                r = table.get((k, t, e))
                cells.append(f"{r['tokens_per_s']:.1f} ± {r['stdev']:.1f}" if r else "")
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    models = list(dict.fromkeys(r["model"] for r in rows))
    tests = list(dict.fromkeys(r["test"] for r in rows))
    fig, axes = plt.subplots(len(models), len(tests), figsize=(5 * len(tests), 3.6 * len(models)), squeeze=False)
    for i, model in enumerate(models):
        for j, test in enumerate(tests):
            ax = axes[i][j]
            for engine in dict.fromkeys(r["engine"] for r in rows):
                pts = sorted((r["gpu_blocks"], r["tokens_per_s"]) for r in rows if (r["model"], r["test"], r["engine"]) == (model, test, engine))
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", label=engine)
            ax.set(title=f"{model} {test}", xlabel="blocks on the GPU", ylabel="tokens/s")
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def install_emulator() -> None:
    """Put the tests' CuPy stand-in (kernels on the SIMT emulator) in place of `cupy`: a rehearsal
    of this script for a machine without a GPU (bench/gpu_check.py run --emulated)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from gpu_emulator import fake_cupy

    fake_cupy.install()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.emulated:
        if args.simulate:
            raise SystemExit("--emulated and --simulate exclude each other")
        install_emulator()
    offline = args.no_llama_cpp or args.simulate or args.emulated
    llama_cpp = None if offline else llama_cpp_cuda()
    if not offline and llama_cpp is None:
        print("llama-cpp-python is missing or a CPU-only build: hybridllm numbers only", file=sys.stderr)
    from hybridllm.gguf_file import ModelFile

    rows: list[dict] = []
    for name in args.models:
        path = model_path(name)
        label = Path(name).stem if name.endswith(".gguf") else name
        n_layers = ModelFile(path).config.n_layers
        counts = layer_counts(args.layers, n_layers)
        for k in counts:
            rates, device = bench_hybridllm(path, k, args)
            rows += result_rows(label, "hybridllm", device, k, n_layers, rates)
            print(f"{label} k={k:2d} hybridllm  " + "  ".join(f"{t} {statistics.median(r):8.1f}" for t, r in rates.items()), flush=True)
            if args.graphs and k and not args.simulate and args.tg:
                rates, _ = bench_hybridllm(path, k, args, graphs=True)
                rows += result_rows(label, "hybridllm graphs", device, k, n_layers, rates)
                print(f"{label} k={k:2d} graphs     " + "  ".join(f"{t} {statistics.median(r):8.1f}" for t, r in rates.items()), flush=True)
            if args.cublas_prefill and k == counts[-1] > 0 and not args.simulate and args.pp:
                with prefill_env("cublas"):
                    rates, _ = bench_hybridllm(path, k, args, only_pp=True)
                rows += result_rows(label, "hybridllm cublas", device, k, n_layers, rates)
                print(f"{label} k={k:2d} cublas     " + "  ".join(f"{t} {statistics.median(r):8.1f}" for t, r in rates.items()), flush=True)
            if llama_cpp is not None:
                rates = bench_llama_cpp(llama_cpp, path, k, args)
                rows += result_rows(label, "llama.cpp", device, k, n_layers, rates)
                print(f"{label} k={k:2d} llama.cpp  " + "  ".join(f"{t} {statistics.median(r):8.1f}" for t, r in rates.items()), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    kind = "-simulated" if args.simulate else "-emulated" if args.emulated else ""
    stem = args.out / f"gpu{kind}-{dt.date.today()}"
    write_csv(rows, stem.with_suffix(".csv"))
    stem.with_suffix(".md").write_text(markdown(rows, args))
    plotted = plot(rows, stem.with_suffix(".png"))
    print(f"wrote {stem}.csv, {stem}.md" + (f", {stem}.png" if plotted else " (no matplotlib: no plot)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
