"""bench/gpu_check.py, the one command for the day a GPU is lent, rehearsed end to end in CI on the
SIMT emulator (`run --emulated`, small sizes), so that its first real run is not its first run:
its steps run, the nested GPU tests pass, the bench writes a row per (blocks, test), also with
decode steps as CUDA graphs and with the prompt through f16 + cuBLAS, and the files the device
tool brings back land in --out."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.gpu


def test_gpu_check_rehearsal(tmp_path: Path, smollm_path: str) -> None:
    results, out = tmp_path / "results", tmp_path / "out"
    cmd = [
        sys.executable, "bench/gpu_check.py", "run", "--emulated", "--results", str(results), "--out", str(out),
        "--skip", "ptxas",  # nvcc's spill check runs in test_cuda_kernels_host.py
        "--pytest=-m gpu tests/test_cuda_backend.py -k store_kv",
        "--bench=--models smollm2-135m --pp 40 --tg 1 --reps 1 --layers 0,1 --n-ctx 64 --graphs --cublas-prefill",
    ]  # fmt: skip
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    summary = (results / "summary.md").read_text()
    status = {
        cells[1].strip(): cells[2].strip()
        for cells in (line.split("|") for line in summary.splitlines())
        if len(cells) > 4 and cells[1].strip() in ("env", "setup", "nvrtc", "ptxas", "tests", "bench")
    }
    assert status["env"] == status["setup"] == status["tests"] == status["bench"] == "ok", summary
    assert status["ptxas"].startswith("skipped") and status["nvrtc"].startswith("skipped"), summary
    assert "1 passed" in summary  # the nested pytest's summary line
    (table,) = results.glob("gpu-emulated-*.csv")
    rows = list(csv.DictReader(table.open()))
    got = {(r["engine"], int(r["gpu_blocks"]), r["test"]) for r in rows}
    eager = {("hybridllm", k, t) for k in (0, 1) for t in ("pp40", "tg1")}
    # a replayed decode step; the prompt at the most GPU blocks with HYBRIDLLM_CUDA_PREFILL=cublas
    assert got == eager | {("hybridllm graphs", 1, "tg1"), ("hybridllm cublas", 1, "pp40")}
    assert all(float(r["tokens_per_s"]) > 0 for r in rows)
    assert {r["device"] for r in rows if r["gpu_blocks"] == "1"} == {"emulated GPU (SIMT emulator on the CPU)"}
    assert {"summary.md", "tests.xml", "bench.log"} <= {p.name for p in out.iterdir()}
