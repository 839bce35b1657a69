"""NVRTC compiles `cuda_kernels.cu` exactly as `backends/cuda.py` asks, for sm_80 and sm_90, with no GPU.

NVRTC (the compiler CuPy's RawModule uses at run time) is not nvcc: it has no standard headers
and its own front-end defaults, so nvcc accepting the file (test_cuda_kernels_host.py) does not
prove that a GPU machine will. CuPy's NVRTC bindings work without a driver. The test runs
`cuda.kernel_module()` itself in a subprocess, with `cupy.RawModule` replaced by a recorder
whose compile() calls NVRTC with the options and code cuda.py passed plus a target
architecture, so a change of options in cuda.py is what gets compiled.

Where NVRTC comes from: an importable CuPy (a GPU machine, or a CI image with the CUDA wheels),
else $HYBRIDLLM_NVRTC_SITE, a folder made with
    pip install --target DIR cupy-cuda12x nvidia-cuda-nvrtc-cu12
Without either the test skips, saying so (NVRTC is missing, not a GPU).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SITE_ENV = "HYBRIDLLM_NVRTC_SITE"

SCRIPT = r"""
import contextlib, sys
import cupy
from cupy.cuda import nvrtc

arch = sys.argv[1]
compiled = []

class RecordingModule:  # stands in for cupy.RawModule: compile with NVRTC, load nothing
    def __init__(self, code, options=(), **kw):
        self.code, self.options = code, tuple(options)

    def compile(self):
        prog = nvrtc.createProgram(self.code, "cuda_kernels.cu", [], [])
        options = [*self.options, "-arch=" + arch.replace("sm_", "compute_")]
        try:
            nvrtc.compileProgram(prog, options)
        except Exception:
            print("NVRTC LOG:", nvrtc.getProgramLog(prog))
            raise
        log = nvrtc.getProgramLog(prog).strip()
        ptx = nvrtc.getPTX(prog)
        nvrtc.destroyProgram(prog)
        compiled.append((options, log, ptx))

cupy.RawModule = RecordingModule
cupy.cuda.Device = lambda i=0: contextlib.nullcontext()  # no driver here
from hybridllm.backends import cuda

cuda.kernel_module(0)
(options, log, ptx) = compiled[0]
ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
# every kernel cuda.py looks up: literal _fn("name") calls and the per-type families
import re, inspect
src = inspect.getsource(cuda)
wanted = set(re.findall(r'_fn\("(\w+)"\)', src))
wanted |= {f"mmvq_{cuda.QUANT_KERNELS[t]}_{s}" for t in cuda.K_QUANTS for s in ("1", "8")}
wanted |= {f"mv_{t}_{s}" for t in cuda.FLOAT_KERNELS.values() for s in ("1", "8")}
wanted |= {f"mmq_{t}_{s}" for t in cuda.QUANT_KERNELS.values() for s in ("1", "4")}
wanted |= {f"dequant_{t}" for t in cuda.QUANT_KERNELS.values()}
missing = sorted(n for n in wanted if f".entry {n}(" not in ptx)
print("OPTIONS", options)
print("LOG", repr(log))
print("WANTED", len(wanted))
print("MISSING", missing)
"""


def _env() -> dict[str, str] | None:
    """Environment whose python can import cupy.cuda.nvrtc and load libnvrtc, or None."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    site = os.environ.get(SITE_ENV)
    if site:
        env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], site])
        libs = [str(p) for p in Path(site).glob("nvidia/*/lib")]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [*libs, os.environ.get("LD_LIBRARY_PATH")]))
    probe = subprocess.run(
        [sys.executable, "-c", "from cupy.cuda import nvrtc; nvrtc.getVersion()"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    return env if probe.returncode == 0 else None


@pytest.fixture(scope="module")
def nvrtc_env() -> dict[str, str]:
    env = _env()
    if env is None:
        pytest.skip(f"no NVRTC: install CuPy, or set {SITE_ENV} (see this module's docstring)")
    return env


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_nvrtc_compiles_with_cuda_py_options(nvrtc_env: dict[str, str], arch: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, arch], env=nvrtc_env, capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)
    assert "-std=c++17" in lines["OPTIONS"]
    assert lines["LOG"] == "''", f"NVRTC warnings: {lines['LOG']}"
    assert int(lines["WANTED"]) >= 44 and lines["MISSING"] == "[]", lines  # kernels cuda.py looks up by name
