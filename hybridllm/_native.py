"""The C++ core `hybridllm._core`, loaded once for the whole package.

`HYBRIDLLM_CORE=/path/to/_core....so` loads another build of the core in its place (a development
aid: a copy built for a narrower ISA, e.g. `HYBRIDLLM_MARCH=x86-64-v3` for AVX2 on an AVX-512
machine, tested against a llama.cpp built likewise; see the README's development notes). The
override is registered as `hybridllm._core`, so every `from hybridllm import _core` sees it.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType

CORE_ENV = "HYBRIDLLM_CORE"

# How long an idle OpenMP thread (ours and Numba's, both GNU OpenMP) spins before it sleeps, in
# libgomp's turns. Its default, 300,000 turns (milliseconds), makes every barrier cost whole time
# slices once other programs keep the cores busy: 40 tokens took 5.2 s with 2 threads instead of
# 0.4 s with 1. A short spin still covers the microseconds a balanced barrier waits on a quiet
# machine (bench/RESULTS.md, "Busy machines"). OMP_WAIT_POLICY or GOMP_SPINCOUNT set by the user win.
SPIN_TURNS = "3000"


def _set_wait_policy() -> None:
    """Before libgomp loads (it reads the environment once)."""
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = SPIN_TURNS


def _load() -> tuple[ModuleType | None, str | None]:
    """(module, None) when the core loads, else (None, why not)."""
    override = os.environ.get(CORE_ENV, "").strip()
    if override:
        spec = importlib.util.spec_from_file_location("hybridllm._core", override)
        if spec is None or spec.loader is None or not os.path.isfile(override):
            return None, f"{CORE_ENV}={override}: no such extension module"
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except ImportError as exc:
            return None, f"{CORE_ENV}={override}: {exc}"
        sys.modules["hybridllm._core"] = module
        return module, None
    try:
        from . import _core  # type: ignore[attr-defined]
    except ImportError as exc:  # not built (no compiler at install time) or a broken build
        return None, f"{type(exc).__name__}: {exc}"
    return _core, None


_set_wait_policy()
core, CORE_ERROR = _load()
