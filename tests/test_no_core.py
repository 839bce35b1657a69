"""Without the C++ core (as after an install with no compiler): one plain line saying so, not a
Python warning naming a source line, and a notice before the Numba kernels are first compiled."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest


def _info_without_core(model: str, numba_cache: Path) -> subprocess.CompletedProcess[str]:
    command = shutil.which("hybridllm")
    if command is None:
        pytest.skip("the hybridllm command is not installed")
    env = {**os.environ, "HYBRIDLLM_CORE": str(numba_cache / "no-core.so"),
           "NUMBA_CACHE_DIR": str(numba_cache)}  # fmt: skip
    env.pop("HYBRIDLLM_KERNELS", None)
    return subprocess.run([command, "info", model, "--json"], env=env, capture_output=True, text=True, timeout=300)


def test_one_line_and_a_compile_notice(smollm_path: str, tmp_path: Path) -> None:
    result = _info_without_core(smollm_path, tmp_path)
    assert result.returncode == 0, result.stderr
    warning, notice = result.stderr.splitlines()
    assert warning.startswith("hybridllm: warning: the C++ core does not load (HYBRIDLLM_CORE=")
    assert warning.endswith("running on the slower Numba kernels")
    assert "circular import" not in warning and ".py:" not in warning and "RuntimeWarning" not in warning
    assert notice.startswith("hybridllm: compiling the Numba kernels") and str(tmp_path) in notice
    assert '"kernels": "numba' in result.stdout


def test_no_compile_notice_once_the_kernels_are_cached(smollm_path: str, tmp_path: Path) -> None:
    """The notice keys on Numba's index files where Numba's locator puts them."""
    from hybridllm import kernels

    folder = os.path.dirname(os.path.abspath(kernels.__file__))
    cached = tmp_path / f"{os.path.basename(folder)}_{hashlib.sha1(folder.encode()).hexdigest()}"
    cached.mkdir()
    (cached / "numba_kernels.matmul-10.py311.nbi").write_bytes(b"")
    result = _info_without_core(smollm_path, tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(result.stderr.splitlines()) == 1 and "compiling" not in result.stderr
