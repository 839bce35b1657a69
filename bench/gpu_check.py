"""The one command for the day a GPU is lent: compile gates, the GPU tests, and the offload bench.

Two steps, because the device machine reaches nothing outside itself and takes at most 64 MiB
of files (see the device tool's README): prepare here, run there.

    python bench/gpu_check.py prepare            # here: trimmed models + the gguf wheel -> .gpu-check/
    # device tool: run(command="python3 bench/gpu_check.py run --out $OUT", carry=[".gpu-check"])
    python bench/gpu_check.py run --emulated     # here, no GPU: the same steps on the SIMT emulator

`run` does, each step under its own time limit so the whole fits in 8 minutes on the device:
  1. env       python, numpy, CuPy, the device (nvidia-smi), nvcc;
  2. setup     installs the carried wheels (gguf) into .gpu-check/site, builds the C++ core if
               it does not import (the device's python is not the one it was built for);
  3. nvrtc     compiles cuda_kernels.cu with backends/cuda.py's own options for sm_80 and sm_90
               through CuPy's NVRTC (no launch needed);
  4. ptxas     `nvcc -cubin -Xptxas -v` for sm_80 and sm_90: registers, and no spill stores/loads;
  5. tests     `pytest -m gpu` (tests/test_cuda_*.py ...) on the real device, or with --emulated
               on the emulator (HYBRIDLLM_GPU_TESTS=emulated), on the trimmed models;
  6. bench     bench/gpu.py: pp512 and tg128 against the number of GPU blocks, with a PNG
               (tg also as CUDA graphs, pp at all blocks also through f16 + cuBLAS);
Tests that need the full catalog models (SmolLM2's tokenizer: the tiny synthetic models borrow
it) skip on the device, which holds only the trimmed copies; test_cuda_backend.py runs there on
the trimmed copies (HYBRIDLLM_GPU_TEST_MODELS). The check
writes everything under bench/results/gpu-check-<date>[-emulated]/ (summary.md, the logs,
the bench's csv/md/png) and, when --out is given (the device tool's $OUT), copies the files that
the tool brings back (at most 8) there.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CARRY = ROOT / ".gpu-check"  # ignored through .git/info/exclude; travels with carry=[".gpu-check"]
MODELS = CARRY / "models"
WHEELS = CARRY / "whl"
SITE = CARRY / "site"
KERNELS = ROOT / "hybridllm" / "backends" / "cuda_kernels.cu"
#: Wheels the device image lacks (KINDS.md's package list): gguf is pure Python.
DEVICE_WHEELS = ("gguf==0.19.0",)
ARCHS = ("sm_80", "sm_90")


@dataclass
class Step:
    name: str
    status: str = "not run"  # ok, FAILED, skipped (why), timeout
    seconds: float = 0.0
    detail: str = ""
    log: str = ""


@dataclass
class Check:
    emulated: bool
    out_dir: Path
    steps: list[Step] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def step(self, name: str) -> Step:
        s = Step(name)
        self.steps.append(s)
        return s


def _run(cmd: list[str] | str, timeout: float, env: dict[str, str] | None = None, cwd: Path = ROOT) -> tuple[int, str]:
    """(returncode, stdout+stderr); 124 on timeout, as timeout(1)."""
    try:
        p = subprocess.run(
            cmd, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True,
            timeout=timeout, shell=isinstance(cmd, str),
        )  # fmt: skip
        return p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"") + (exc.stderr or b"")
        return 124, (out.decode(errors="replace") if isinstance(out, bytes) else out) + f"\n[timed out after {timeout:.0f} s]"
    except FileNotFoundError as exc:
        return 127, str(exc)


def _python_env() -> dict[str, str]:
    """PYTHONPATH with the repo and the carried wheels' install folder."""
    paths = [str(ROOT), *([str(SITE)] if SITE.is_dir() else []), os.environ.get("PYTHONPATH", "")]
    return {"PYTHONPATH": os.pathsep.join(p for p in paths if p), "PYTHONUNBUFFERED": "1"}


# --- steps --------------------------------------------------------------------------------
def step_env(c: Check) -> None:
    s = c.step("env")
    t0 = time.perf_counter()
    probe = (
        "import json, sys, numpy\n"
        "info = {'python': sys.version.split()[0], 'numpy': numpy.__version__}\n"
        "try:\n"
        "    import cupy\n"
        "    info['cupy'] = cupy.__version__\n"
        "    n = cupy.cuda.runtime.getDeviceCount()\n"
        "    info['devices'] = str(n)\n"
        "    if n: info['device'] = cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()\n"
        "except Exception as exc:\n"
        "    info['cupy'] = f'unusable: {type(exc).__name__}: {exc}'[:200]\n"
        "print(json.dumps(info))\n"
    )
    rc, out = _run([sys.executable, "-c", probe], 60, _python_env())
    try:
        c.env.update(json.loads(out.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        c.env["probe"] = out[-300:]
    rc_smi, smi = _run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"], 30)
    c.env["nvidia-smi"] = smi.strip() if rc_smi == 0 else "not available"
    rc_nvcc, nvcc = _run(["nvcc", "--version"], 30)
    c.env["nvcc"] = nvcc.strip().splitlines()[-1] if rc_nvcc == 0 else "not available"
    c.env["date"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    s.status, s.seconds, s.log = "ok", time.perf_counter() - t0, json.dumps(c.env, indent=1)


def step_setup(c: Check) -> None:
    s = c.step("setup")
    t0 = time.perf_counter()
    log = []
    wheels = sorted(WHEELS.glob("*.whl")) if WHEELS.is_dir() else []
    rc, out = _run([sys.executable, "-c", "import gguf"], 60, _python_env())
    if rc != 0 and wheels:
        rc, out = _run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
             "--upgrade", "--target", str(SITE), *map(str, wheels)], 120,
        )  # fmt: skip
        log.append(f"pip install {len(wheels)} wheels: rc {rc}\n{out}")
    rc, out = _run([sys.executable, "-c", "import hybridllm._core"], 60, _python_env())
    if rc != 0:
        if c.emulated:  # never rebuild a shared checkout's core from here
            s.status, s.detail = "FAILED", "the C++ core does not import"
            s.log = out
            s.seconds = time.perf_counter() - t0
            return
        # The device's copy of the tree: an in-place build there touches nothing here.
        jobs = str(os.cpu_count() or 4)
        rc, out = _run([sys.executable, "setup.py", "build_ext", "--inplace", "-j", jobs], 300, _python_env())
        log.append(f"build the C++ core: rc {rc}\n{out[-3000:]}")
        if rc != 0:
            s.status, s.detail, s.log = "FAILED", "could not build the C++ core", "\n".join(log)
            s.seconds = time.perf_counter() - t0
            return
    s.status, s.seconds, s.log = "ok", time.perf_counter() - t0, "\n".join(log) or "nothing to do"


def step_nvrtc(c: Check) -> None:
    s = c.step("nvrtc")
    t0 = time.perf_counter()
    if c.emulated:
        s.status = "skipped (emulated: NVRTC needs the real CuPy)"
        return
    # NVRTC straight (no device needed): the source and options backends/cuda.py compiles with,
    # plus each target architecture.
    code = (
        "from cupy.cuda import nvrtc\n"
        "from hybridllm.backends import cuda\n"
        "opts = list(getattr(cuda, 'NVRTC_OPTIONS', ('-std=c++17',)))\n"
        "src = cuda.KERNEL_SOURCE.read_text()\n"
        f"for arch in {ARCHS!r}:\n"
        "    prog = nvrtc.createProgram(src, 'cuda_kernels.cu', [], [])\n"
        "    try:\n"
        "        nvrtc.compileProgram(prog, [*opts, '-arch=' + arch.replace('sm_', 'compute_')])\n"
        "    except Exception:\n"
        "        print(nvrtc.getProgramLog(prog)); raise\n"
        "    log = nvrtc.getProgramLog(prog).strip()\n"
        "    print(arch, 'ok', opts, log)\n"
        "    nvrtc.destroyProgram(prog)\n"
    )
    rc, out = _run([sys.executable, "-c", code], 240, _python_env())
    s.status = "ok" if rc == 0 else ("timeout" if rc == 124 else "FAILED")
    s.seconds, s.log, s.detail = time.perf_counter() - t0, out, "sm_80, sm_90" if rc == 0 else out.strip()[-200:]


def step_ptxas(c: Check) -> None:
    s = c.step("ptxas")
    t0 = time.perf_counter()
    if shutil.which("nvcc") is None:
        s.status = "skipped (no nvcc)"
        return
    logs, spills, worst = [], [], 0
    tmp = c.out_dir / "cuda_kernels.cubin"
    for arch in ARCHS:
        rc, out = _run(["nvcc", "-std=c++17", f"-arch={arch}", "-cubin", "-Xptxas", "-v", "-o", str(tmp), str(KERNELS)], 300)
        logs.append(f"== {arch}: rc {rc}\n{out}")
        if rc != 0:
            s.status, s.log = ("timeout" if rc == 124 else "FAILED"), "\n".join(logs)
            s.detail = f"nvcc failed for {arch}"
            s.seconds = time.perf_counter() - t0
            return
        kernel = ""
        for line in out.splitlines():
            m = re.search(r"Compiling entry function '(\w+)'", line)
            if m:
                kernel = m.group(1)
            m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
            if m and (int(m.group(1)) or int(m.group(2))):
                spills.append(f"{arch} {kernel}: {m.group(0)}")
            m = re.search(r"Used (\d+) registers", line)
            if m:
                worst = max(worst, int(m.group(1)))
    tmp.unlink(missing_ok=True)
    s.log = "\n".join(logs)
    s.status = "FAILED" if spills else "ok"
    s.detail = ("spills: " + "; ".join(spills)) if spills else f"no spills; at most {worst} registers a thread"
    s.seconds = time.perf_counter() - t0


def step_tests(c: Check, pytest_args: list[str], timeout: float) -> None:
    s = c.step("tests")
    t0 = time.perf_counter()
    env = _python_env()
    env.pop("CI", None)
    if MODELS.is_dir():
        env["HYBRIDLLM_GPU_TEST_MODELS"] = str(MODELS)
    if c.emulated:
        env["HYBRIDLLM_GPU_TESTS"] = "emulated"
    junit = c.out_dir / "tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *pytest_args]
    rc, out = _run(cmd, timeout, env)
    summary = next((ln for ln in reversed(out.splitlines()) if re.search(r"\d+ (passed|failed|error)", ln)), "")
    s.status = "ok" if rc == 0 else ("timeout" if rc == 124 else "FAILED")
    s.seconds, s.log, s.detail = time.perf_counter() - t0, out, summary.strip("= ") or out.strip()[-200:]


def step_bench(c: Check, bench_args: list[str], timeout: float) -> None:
    s = c.step("bench")
    t0 = time.perf_counter()
    models = sorted(str(p) for p in MODELS.glob("*.gguf")) if MODELS.is_dir() else []
    cmd = [sys.executable, str(ROOT / "bench" / "gpu.py"), "--no-llama-cpp", "--out", str(c.out_dir)]
    if models:
        cmd += ["--models", *models]
    if c.emulated:
        cmd.append("--emulated")
    rc, out = _run([*cmd, *bench_args], timeout, _python_env())
    s.status = "ok" if rc == 0 else ("timeout" if rc == 124 else "FAILED")
    s.seconds, s.log = time.perf_counter() - t0, out
    s.detail = out.strip().splitlines()[-1][:200] if out.strip() else ""


# --- report -------------------------------------------------------------------------------
def summary(c: Check, started: float) -> str:
    lines = [
        f"# GPU check ({'emulated: SIMT emulator on the CPU' if c.emulated else 'real device'})",
        "",
        "| | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in c.env.items()),
        "",
        "| step | status | seconds | detail |",
        "|---|---|---:|---|",
        *(f"| {s.name} | {s.status} | {s.seconds:.0f} | {s.detail.replace('|', '/')} |" for s in c.steps),
        "",
        f"Total {time.perf_counter() - started:.0f} s.",
    ]
    tables = sorted(c.out_dir.glob("gpu*-*.md"))
    if tables:
        lines += ["", tables[-1].read_text()]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    tag = dt.date.today().isoformat() + ("-emulated" if args.emulated else "")
    out_dir = args.results or ROOT / "bench" / "results" / f"gpu-check-{tag}"
    out_dir.mkdir(parents=True, exist_ok=True)
    c = Check(args.emulated, out_dir)
    if args.emulated:
        pytest_args = shlex.split(args.pytest) if args.pytest else ["-m", "gpu", "-x", "tests/test_cuda_backend.py", "-k", "rms_norm or rope or store_kv or glu"]
        bench_args = shlex.split(args.bench) if args.bench else ["--pp", "40", "--tg", "3", "--reps", "1", "--layers", "0,1", "--n-ctx", "64", "--graphs", "--cublas-prefill"]
    else:
        pytest_args = shlex.split(args.pytest) if args.pytest else ["-m", "gpu", "tests"]
        bench_args = shlex.split(args.bench) if args.bench else ["--pp", "512", "--tg", "128", "--reps", "3", "--layers", "all", "--graphs", "--cublas-prefill"]
    step_env(c)
    if not c.emulated and c.env.get("devices", "0") == "0":
        c.step("setup").status = "FAILED"
        c.steps[-1].detail = "CuPy sees no CUDA device here; on a machine without a GPU use --emulated"
    else:
        step_setup(c)
    if c.steps[-1].status == "ok":
        steps = {
            "nvrtc": lambda: step_nvrtc(c),
            "ptxas": lambda: step_ptxas(c),
            "tests": lambda: step_tests(c, pytest_args, args.tests_timeout),
            "bench": lambda: step_bench(c, bench_args, args.bench_timeout),
        }
        for name, do in steps.items():
            if name in args.skip:
                c.step(name).status = "skipped (--skip)"
            else:
                do()
    for s in c.steps:
        if s.log:
            (out_dir / f"{s.name}.log").write_text(s.log)
    text = summary(c, started)
    (out_dir / "summary.md").write_text(text)
    print(text)
    if args.out is not None:  # what the device tool brings back: 8 files at most
        args.out.mkdir(parents=True, exist_ok=True)
        wanted = ["summary.md", "tests.log", "tests.xml", "bench.log", "ptxas.log", "nvrtc.log"]
        files = [out_dir / n for n in wanted] + sorted(out_dir.glob("gpu*-*.png"))[:1] + sorted(out_dir.glob("gpu*-*.csv"))[:1]
        for f in [f for f in files if f.is_file()][:8]:
            shutil.copy2(f, args.out / f.name)
    failed = [s.name for s in c.steps if s.status in ("FAILED", "timeout")]
    return 1 if failed else 0


def prepare(args: argparse.Namespace) -> int:
    """Here: trimmed models (bench/trim_gguf.py) and the wheels the device lacks, in .gpu-check/."""
    exclude = ROOT / ".git" / "info" / "exclude"
    if exclude.parent.is_dir() and "/.gpu-check/" not in (exclude.read_text() if exclude.exists() else ""):
        with exclude.open("a") as f:  # local to this checkout: never committed, still carried
            f.write("/.gpu-check/\n")
    MODELS.mkdir(parents=True, exist_ok=True)
    rc, out = _run([sys.executable, str(ROOT / "bench" / "trim_gguf.py"), "--out", str(MODELS)], 600, _python_env())
    print(out)
    if rc:
        return rc
    WHEELS.mkdir(parents=True, exist_ok=True)
    if not args.no_wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(WHEELS), *DEVICE_WHEELS]
        rc, out = _run(cmd, 300)
        print(out)
        if rc:
            return rc
    size = sum(p.stat().st_size for p in CARRY.rglob("*") if p.is_file())
    print(f"{CARRY}: {size / (1 << 20):.1f} MiB to carry; on the device: python3 bench/gpu_check.py run --out $OUT")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("prepare", help="here: trimmed models and wheels into .gpu-check/")
    pr.add_argument("--no-wheels", action="store_true", help="skip downloading the wheels")
    r = sub.add_parser("run", help="the check (on the device, or here with --emulated)")
    r.add_argument("--emulated", action="store_true", help="no GPU: CuPy stand-in and SIMT emulator, small sizes")
    r.add_argument("--out", type=Path, default=None, help="copy the main files here too (the device tool's $OUT)")
    r.add_argument("--results", type=Path, default=None, help="results folder (default bench/results/gpu-check-<date>)")
    r.add_argument("--pytest", default=None, help='pytest arguments instead of the default, one string: --pytest="-m gpu tests/x.py"')
    r.add_argument("--bench", default=None, help='bench/gpu.py arguments instead of the default, one string: --bench="--pp 64 --tg 8"')
    r.add_argument("--tests-timeout", type=float, default=240.0)
    r.add_argument("--bench-timeout", type=float, default=150.0)
    r.add_argument("--skip", nargs="*", default=[], choices=["nvrtc", "ptxas", "tests", "bench"], help="steps to leave out")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return prepare(args) if args.cmd == "prepare" else run(args)


if __name__ == "__main__":
    sys.exit(main())
