"""Shared fixtures: the two real models, found through the catalog's models directory.

`.ci/run` pulls them before the tests; on a developer machine without them the tests that need
them skip, but under CI (CI=true) a missing model is an error, so CI never passes by skipping.
"""

from __future__ import annotations

import os

import pytest
from hybridllm.models.tiny import TINY_LLAMA, write_tiny_model

from hybridllm import catalog


def _model_path(name: str) -> str:
    item = catalog.entry(name)
    if item.present:
        return str(item.path)
    message = f"model {name} is not in {catalog.models_dir()}; run: hybridllm pull {name}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


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
def tiny_llama_path(tmp_path_factory: pytest.TempPathFactory, smollm_path: str) -> str:
    """A tiny random-weight llama GGUF with SmolLM2's vocabulary, written once per session."""
    path = tmp_path_factory.getbasetemp() / "tiny-llama.gguf"
    if not path.exists():
        write_tiny_model(path, smollm_path, TINY_LLAMA)
    return str(path)
