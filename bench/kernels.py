"""Kernel throughput: matvec GB/s against the machine's read bandwidth, and n=512 GFLOP/s.

For each weight type:
  * matvec (n = 1): GB/s of weight bytes read, on a weight much larger than the L3 cache, with
    1 and 2 threads, for the C++ core and (when available) the Numba backend; "numpy" is the
    pure-numpy path (gguf.quants.dequantize + np.matmul, on a smaller weight, chunked);
  * prompt (n = 512): GFLOP/s (2 * n * rows * cols / time) with 2 threads.
The reference is the machine's streaming read bandwidth, measured in the same run by a C++
read loop (hybridllm._core.stream_read) over a buffer larger than the L3 cache.

Weights are random codes with small finite scales (timing does not depend on the values).
Every figure is the best of several runs (other processes share the machine; the load average
before and after is printed so noisy runs can be spotted and repeated).

    python bench/kernels.py [--quick] [--types Q4_0,Q4_K] [--write]   # --write: RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gguf  # noqa: E402
from gguf import GGMLQuantizationType as Q  # noqa: E402

from hybridllm import kernels  # noqa: E402

TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
TYPES += ["F16", "BF16", "F32"]
TARGET_TYPES = {"Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_0", "Q6_K"}  # >= 70% of read bandwidth

# Offsets of the f16 scales in each block (random bytes there could be NaN / inf).
SCALE_OFFSETS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,)}
SCALE_OFFSETS.update({"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2)})
SCALE_OFFSETS["Q6_K"] = (208,)

RESULTS = Path(__file__).with_name("RESULTS.md")

NOTES = """What limits the figures:
* Memory: this VM's read bandwidth moves between two regimes with the load of its neighbours:
  ~36 GB/s for 2 threads (one core alone reaches ~33), or ~65 GB/s (~33 per core). In the first,
  every kernel's 2-thread matvec sits at the bandwidth. In the second, 70% means ~23 GB/s per core
  while streaming, and the matvec is bound by the kernels' instruction throughput rather than by
  memory: the "C++ 1t" column is that per-core throughput, 22-24 GB/s for the 4/5-bit targets
  (Q4_0, Q4_1, Q5_0, Q4_K), which puts them at 66-71% of the high regime (Q8_0, Q6_K: 28 GB/s).
* Exactness. The kernels reproduce llama.cpp's float32 results bit for bit, which fixes each
  output's summation order: one FMA chain per output across its blocks (Q4_0 / Q4_K: a scalar
  chain over block totals), never split across accumulators. The matvec kernels therefore run 4
  weight rows side by side (independent chains), prefetch the following rows as one sequential
  stream into L2 (4 separate row streams halved the DRAM throughput), and spend few instructions
  per 32-weight block: one GF2 affine op for both nibble halves, unsigned codes with the Q4_0 /
  Q5_0 offset folded into the integer lanes' start value, the block's (d, m) halves converted in
  one op, and Q4_0 / Q4_K's per-row totals reduced 4 rows at a time into one 4-lane FMA.
* n = 512 is compute-bound: each weight block is decoded once per 4 activation rows and the dots
  are vpdpbusd / vpdpwssd (AVX512-VNNI, 256-bit) or maddubs + madd (AVX2). F16 / BF16 / F32
  weights use float FMAs against float activations (no activation quantization), so they are
  slower.
* numpy (gguf's dequantizer + np.matmul) and Numba are for comparison only.
* The CPU is shared with other jobs. When the other core is busy, a 2-thread call waits at
  OpenMP's end-of-region barrier for a thread that is not running, so 2-thread figures can fall
  below 1-thread ones; hence the best-of-rounds figures and the load averages above."""


def best_time(fn, reps: int) -> float:
    fn()  # warm-up (page faults, thread pool start, JIT)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def interleaved(f, g, reps: int) -> tuple[float, float]:
    """Best times of f and g, run alternately."""
    f()
    g()
    tf, tg = [], []
    for _ in range(reps):
        for fn, ts in ((f, tf), (g, tg)):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return min(tf), min(tg)


def machine() -> dict[str, str]:
    info = {"model": platform.processor() or "unknown", "l3": "?"}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            key, _, val = line.partition(":")
            if key.strip() == "Model name":
                info["model"] = val.strip()
            elif key.strip() == "L3 cache":
                info["l3"] = val.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    info["cores"] = str(kernels.default_threads())
    info["cpus"] = str(os.cpu_count())
    info["simd"] = kernels.cpu_features()
    return info


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def weight(buf: np.ndarray, name: str, cols: int) -> tuple[np.ndarray, int]:
    """A (rows, row_bytes) view of buf as a `name` weight with finite scales, and its rows."""
    block, size = gguf.GGML_QUANT_SIZES[Q[name]]
    rb = cols // block * size
    rows = buf.size // rb
    raw = buf[: rows * rb].reshape(rows, rb)
    if name in ("F16", "BF16"):
        # Random bytes as 16-bit floats: clear the top exponent bit so no value is inf / NaN.
        raw.view(np.uint16)[...] &= 0xBFFF
    elif name == "F32":
        raw.view(np.uint32)[...] &= 0xBFFFFFFF
    else:
        blocks = raw.reshape(rows, cols // block, size)
        for off in SCALE_OFFSETS[name]:
            blocks[:, :, off : off + 2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    return raw, rows


def numpy_matvec(raw: np.ndarray, qtype: Q, cols: int, x: np.ndarray) -> None:
    """The pure-numpy path: dequantize 4096 rows at a time with gguf, then np.matmul."""
    for r0 in range(0, raw.shape[0], 4096):
        w = gguf.quants.dequantize(raw[r0 : r0 + 4096], qtype).reshape(-1, cols)
        _ = x @ w.T


def bench_type(
    name: str,
    buf: np.ndarray,
    cols: int,
    x_pp: np.ndarray,
    out_pp: np.ndarray,
    np_bytes: int,
    reps: int,
    backends: list[str],
    rng: np.random.Generator,
) -> dict[str, float]:
    """Matvec GB/s (C++ / numba, 1 and 2 threads; numpy), the read bandwidth measured alongside,
    and n=512 GFLOP/s of one type."""
    from hybridllm import _core

    qtype = Q[name]
    raw, rows = weight(buf, name, cols)
    x = rng.standard_normal((1, cols), dtype=np.float32)
    out = np.empty((1, rows), np.float32)
    res: dict[str, float] = {}
    t = best_time(lambda: kernels.matmul(raw, qtype, (rows, cols), x, "cpp", 1, out), reps)
    res["cpp1"] = raw.nbytes / t / 1e9
    # The 2-thread matvec alternates with the 2-thread read loop, so that its reference bandwidth
    # is measured under the same conditions (the VM's memory bandwidth varies with its neighbours).
    t_mm, t_bw = interleaved(
        lambda: kernels.matmul(raw, qtype, (rows, cols), x, "cpp", 2, out),
        lambda: _core.stream_read(buf, 2),
        reps,
    )
    res["cpp2"] = raw.nbytes / t_mm / 1e9
    res["bw"] = buf.nbytes / t_bw / 1e9
    if "numba" in backends:
        for nt in (1, 2):
            t = best_time(
                lambda nt=nt: kernels.matmul(raw, qtype, (rows, cols), x, "numba", nt, out),
                max(2, reps - 2),
            )
            res[f"numba{nt}"] = raw.nbytes / t / 1e9
    small = raw[: max(1, np_bytes // raw.shape[1])]
    t = best_time(lambda: numpy_matvec(small, qtype, cols, x), 2)
    res["numpy"] = small.nbytes / t / 1e9
    n_pp, rows_pp = out_pp.shape
    w_pp = raw[:rows_pp]
    t = best_time(
        lambda: kernels.matmul(w_pp, qtype, (rows_pp, cols), x_pp, "cpp", 2, out_pp),
        max(2, reps - 2),
    )
    res["pp"] = 2 * n_pp * rows_pp * cols / t / 1e9
    return res


def run(args: argparse.Namespace) -> str:
    quick = args.quick
    big = (256 if quick else 512) << 20  # bytes of weight per matvec (L3 is 32 MiB here)
    reps = 3 if quick else 5
    backends = kernels.available_backends()
    if "cpp" not in backends:
        sys.exit("bench/kernels.py needs the C++ core (python setup.py build_ext --inplace)")
    from hybridllm import _core

    info = machine()
    load_before = load()
    print(f"# {info['model']}, {info['cores']} cores, L3 {info['l3']}, {info['simd']}")
    print(f"# load average before: {load_before}")
    rng = np.random.default_rng(0)
    buf = rng.integers(0, 256, size=big, dtype=np.uint8)

    bw = {}
    for nt in (1, 2):
        t = best_time(lambda nt=nt: _core.stream_read(buf, nt), reps)
        bw[nt] = buf.nbytes / t / 1e9
        print(f"read bandwidth, {nt} thread(s): {bw[nt]:.1f} GB/s")

    cols = 4096
    rows_pp, n_pp = (1024 if quick else 2048), 512
    x_pp = rng.standard_normal((n_pp, cols), dtype=np.float32)
    out_pp = np.empty((n_pp, rows_pp), np.float32)
    np_bytes = (16 if quick else 64) << 20

    rows_out = []
    results: dict[str, dict[str, float]] = {}
    header = (
        "| type | C++ 1t GB/s | C++ 2t GB/s | read BW 2t | 2t % of read BW | numba 1t | numba 2t "
        "| numpy | n=512 GFLOP/s (2t) |"
    )
    print(header)
    # Rounds over all types; each figure is its best over the rounds (the machine is shared, and
    # a round that overlaps another job's burst only lowers some figures).
    best: dict[str, dict[str, float]] = {}
    for rnd in range(args.rounds):
        for name in args.types:
            res = bench_type(name, buf, cols, x_pp, out_pp, np_bytes, reps, backends, rng)
            prev = best.setdefault(name, {})
            for key, val in res.items():
                if key != "bw":
                    prev[key] = max(prev.get(key, 0.0), val)
            if res["cpp2"] >= prev.get("cpp2_round", 0.0):
                # the read bandwidth measured alongside the best 2-thread matvec: the VM's memory
                # bandwidth swings (35-68 GB/s between rounds), so maxima of both would not pair
                prev["cpp2_round"], prev["bw"] = res["cpp2"], res["bw"]
            print(
                f"# round {rnd + 1} {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in res.items()),
                flush=True,
            )
    for name in args.types:
        res = best[name]
        # The % pairs the best 2-thread matvec with the read bandwidth measured alongside it.
        pct = 100 * res["cpp2"] / res["bw"]
        results[name] = {**res, "pct": pct}
        mark = " (target)" if name in TARGET_TYPES else ""

        def fmt(key: str, res: dict[str, float] = res) -> str:
            return f"{res[key]:.1f}" if key in res else "-"

        line = (
            f"| {name}{mark} | {fmt('cpp1')} | {fmt('cpp2')} | {fmt('bw')} | {pct:.0f}% | {fmt('numba1')} | "
            f"{fmt('numba2')} | {fmt('numpy')} | {res['pp']:.0f} |"
        )
        rows_out.append(line)
        print(line, flush=True)

    load_after = load()
    print(f"# load average after: {load_after}")
    date = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    lines = [
        "## Kernels",
        "",
        f"Machine: {info['model']}, {info['cores']} physical cores ({info['cpus']} CPUs), "
        f"L3 {info['l3']}, SIMD path `{info['simd']}`. Date: {date}. "
        f"Command: `python bench/kernels.py{' --quick' if quick else ''}`. "
        f"Load average before / after: {load_before} / {load_after}.",
        "",
        f"Read bandwidth (C++ streaming read of {buf.nbytes >> 20} MiB) at the start: "
        f"1 thread {bw[1]:.1f} GB/s, 2 threads {bw[2]:.1f} GB/s. The VM's memory bandwidth "
        "varies with its neighbours (36 to 65 GB/s for 2 threads across our runs), so each "
        "type's 2-thread matvec is run alternately with the 2-thread read loop and the % column "
        'is against that read bandwidth ("read BW 2t").',
        "",
        f"Matvec (n = 1) GB/s of weight bytes read, weight {big >> 20} MiB ({cols} cols); "
        f"numpy = gguf.quants.dequantize + np.matmul on {np_bytes >> 20} MiB; "
        f"n = 512 prompt GFLOP/s on a {rows_pp} x {cols} weight, 2 threads. Each figure is the best of "
        f"{reps} runs in each of {args.rounds} rounds over all types.",
        "",
        header,
        "|---|---|---|---|---|---|---|---|---|",
        *rows_out,
        "",
        targets(results),
        "",
        NOTES,
    ]
    return "\n".join(lines)


def targets(results: dict[str, dict[str, float]]) -> str:
    """One line per target: met (with the lowest figure) or the types that missed it."""
    bw = {n: r["pct"] for n, r in results.items() if n in TARGET_TYPES}
    pp = {n: r["pp"] for n, r in results.items() if n not in ("F16", "BF16", "F32")}
    out = []
    if bw:
        low = min(bw, key=bw.get)
        miss = [f"{n} {v:.0f}%" for n, v in bw.items() if v < 70]
        state = f"missed by {', '.join(miss)}" if miss else f"met (lowest: {low} {bw[low]:.0f}%)"
        out.append(
            f"Target matvec, 2 threads, >= 70% of read bandwidth ({', '.join(bw)}): {state}."
        )
    if pp:
        low = min(pp, key=pp.get)
        miss = [f"{n} {v:.0f}" for n, v in pp.items() if v < 50]
        state = f"missed by {', '.join(miss)}" if miss else f"met (lowest: {low} {pp[low]:.0f})"
        out.append(f"Target n = 512 >= 50 GFLOP/s (quantized types): {state}.")
    return "\n".join(out)


def write_section(section: str) -> None:
    """Replace (or append) the "## Kernels" section of bench/RESULTS.md, keeping the others."""
    text = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else "# Benchmark results\n\n"
    start = text.find("## Kernels")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    else:
        end = text.find("\n## ", start + 1)
        tail = text[end + 1 :] if end >= 0 else ""
        text = text[:start] + section.rstrip("\n") + "\n" + ("\n" + tail if tail else "")
    RESULTS.write_text(text, encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="smaller weights, fewer repetitions")
    ap.add_argument("--types", default=",".join(TYPES), help="comma-separated GGML type names")
    ap.add_argument("--write", action="store_true", help="update the Kernels section of RESULTS.md")
    ap.add_argument(
        "--rounds", type=int, default=None, help="rounds over all types (default 3, quick 1)"
    )
    args = ap.parse_args()
    args.types = [t.strip().upper() for t in args.types.split(",") if t.strip()]
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    section = run(args)
    if args.write:
        write_section(section)
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
