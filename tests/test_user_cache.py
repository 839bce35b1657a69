"""Numba's cache goes to the user's cache folder, never next to hybridllm's installed sources
(leftover __pycache__ folders there broke a later editable install: issue 10)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CACHED_MODULE = """
from numba import njit

@njit(cache=True)
def twice(x):
    return 2 * x
"""


def _python(code: str, env: dict[str, str], cwd: Path) -> str:
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
    return env


@pytest.mark.parametrize("numba_first", [False, True], ids=["hybridllm first", "numba first"])
def test_cached_kernels_land_in_the_user_cache(env: dict[str, str], tmp_path: Path, numba_first: bool) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "kern.py").write_text(CACHED_MODULE)
    imports = "import numba, hybridllm" if numba_first else "import hybridllm"
    code = f"{imports}\nimport kern\nprint(kern.twice(21))"
    env["PYTHONPATH"] = str(package)
    assert _python(code, env, tmp_path) == "42"
    cache = tmp_path / "xdg" / "hybridllm" / "numba"
    assert list(cache.rglob("kern.twice-*.nbi")), list(cache.rglob("*"))
    assert not list(package.rglob("*.nb*"))  # nothing next to the source


def test_the_users_numba_cache_dir_wins(env: dict[str, str], tmp_path: Path) -> None:
    env["NUMBA_CACHE_DIR"] = str(tmp_path / "mine")
    code = "import hybridllm, os\nfrom numba.core import config\nprint(os.environ['NUMBA_CACHE_DIR'], config.CACHE_DIR)"
    assert _python(code, env, tmp_path).split() == [str(tmp_path / "mine")] * 2
