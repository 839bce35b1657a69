"""Shared fixtures: the two real models, found through the catalog's models directory.

`.ci/run` pulls them before the tests; on a developer machine without them the tests that need
them skip, but under CI (CI=true) a missing model is an error, so CI never passes by skipping.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest
from amx_guard import refuse_amx
from hybridllm.models.tiny import TINY_GEMMA3, TINY_LLAMA, TinySpec, write_tiny_model

from hybridllm import catalog


def pytest_configure(config: pytest.Config) -> None:
    """On an AMX machine, keep the llama.cpp oracle off its AMX path (tests/amx_guard.py).

    A shell without job control starts background commands with SIGINT ignored, and an
    ignored signal stays ignored across exec: the Ctrl-C tests' children would then never see
    their interrupt. Handled again here, it is reset to the default in every child."""
    refuse_amx()
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _model_path(name: str) -> str:
    item = catalog.entry(name)
    if item.present:
        return str(item.path)
    message = f"model {name} is not in {catalog.models_dir()}; run: hybridllm pull {name}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def command() -> str:
    """The installed `hybridllm` command (CLI tests run it as users do)."""
    path = shutil.which("hybridllm")
    if path is None:
        message = "the hybridllm command is not installed (pip install -e .)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def smollm_path() -> str:
    return _model_path("smollm2-135m")


@pytest.fixture(scope="session")
def gemma_path() -> str:
    return _model_path("gemma3-270m")


@pytest.fixture(scope="session", params=["smollm2-135m", "gemma3-270m"])
def real_model_path(request: pytest.FixtureRequest) -> str:
    return _model_path(request.param)


@pytest.fixture(scope="session")
def llama_vocab_dir() -> Path:
    """llama.cpp's vocab-only test GGUFs with their .inp/.out cases (tests/llama_vocabs.py):
    fetched once from the pinned llama-cpp-python sdist into the user cache. Unobtainable
    (offline): a skip here, a failure under CI."""
    from llama_vocabs import VocabsUnavailable, vocab_dir

    try:
        return vocab_dir()
    except VocabsUnavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))


def _tiny_model(factory: pytest.TempPathFactory, vocab_from: str, spec: TinySpec) -> str:
    """A tiny random-weight model of `spec` with vocab_from's vocabulary, written once per session."""
    path = factory.getbasetemp() / f"tiny-{spec.arch}.gguf"
    if not path.exists():
        write_tiny_model(path, vocab_from, spec)
    return str(path)


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory: pytest.TempPathFactory, smollm_path: str) -> str:
    """A tiny random-weight llama GGUF with SmolLM2's vocabulary."""
    return _tiny_model(tmp_path_factory, smollm_path, TINY_LLAMA)


@pytest.fixture(scope="session")
def tiny_gemma3_path(tmp_path_factory: pytest.TempPathFactory, smollm_path: str) -> str:
    """A tiny random-weight gemma3 GGUF with SmolLM2's vocabulary (49k rows of head, not 262k:
    the emulated GPU runs it too)."""
    return _tiny_model(tmp_path_factory, smollm_path, TINY_GEMMA3)


# --- the GPU tests: a real device through CuPy, else the SIMT emulator (tests/gpu_emulator) ---
GPU_TESTS_ENV = "HYBRIDLLM_GPU_TESTS"  # "emulated" forces the emulator even where a GPU exists


def _real_cupy_with_device() -> bool:
    if os.environ.get(GPU_TESTS_ENV) == "emulated":
        return False
    try:
        import cupy

        return getattr(cupy, "__name__", "") == "cupy" and cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001 - no CuPy, no driver, no device: all mean "emulate"
        return False


@pytest.fixture(scope="module")
def cupy_module():  # noqa: ANN201 - the real cupy module or the stand-in
    """`cupy` for one test module: the real one where CuPy sees a device, else the stand-in
    (kernels on the SIMT emulator) installed in sys.modules for this module's tests only, so
    no other test finds a pretend GPU through gpu_probe."""
    if _real_cupy_with_device():
        import cupy

        yield cupy
        return
    from gpu_emulator import fake_cupy

    fake_cupy.install()
    try:
        yield fake_cupy
    finally:
        fake_cupy.uninstall()


def pytest_unconfigure(config: pytest.Config) -> None:
    """llama-cpp-python opens /dev/null twice at import (llama_cpp/_utils.py) and never closes
    it, which shows as two ResourceWarnings at exit: close them once the tests are done."""
    import sys

    utils = sys.modules.get("llama_cpp._utils")
    for name in ("outnull_file", "errnull_file"):
        handle = getattr(utils, name, None)
        if handle is not None and not handle.closed:
            handle.close()
