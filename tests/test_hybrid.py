"""The hybrid pipeline without a GPU: HYBRIDLLM_SIMULATE_GPU places blocks on a pretend device
that runs them through the CPU ops with its own buffers and explicit copies. Every placement
must give the all-CPU answer."""

from __future__ import annotations

import numpy as np
import pytest

from hybridllm.runner import Runner

PROMPT = "The quick brown fox jumps over the lazy dog. In the beginning"


@pytest.fixture
def python_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU and simulated blocks then run the very same Python block code: bit-identical."""
    monkeypatch.setenv("HYBRIDLLM_BLOCK", "python")


def _logits(path: str, monkeypatch: pytest.MonkeyPatch, n_gpu_layers, **kw) -> tuple[np.ndarray, Runner]:  # noqa: ANN001
    runner = Runner(path, n_ctx=256, n_threads=2, n_gpu_layers=n_gpu_layers, **kw)
    return runner.logits(runner.tokenize(PROMPT)), runner


@pytest.mark.parametrize("n_gpu", [1, 15, "all"])
def test_every_placement_gives_the_cpu_logits(
    smollm_path: str, monkeypatch: pytest.MonkeyPatch, python_blocks: None, n_gpu
) -> None:  # noqa: ANN001
    monkeypatch.delenv("HYBRIDLLM_SIMULATE_GPU", raising=False)
    reference, _ = _logits(smollm_path, monkeypatch, 0)
    monkeypatch.setenv("HYBRIDLLM_SIMULATE_GPU", "8GiB")
    logits, runner = _logits(smollm_path, monkeypatch, n_gpu, gpu_margin=0)
    expected = 30 if n_gpu == "all" else n_gpu
    assert runner.plan.n_gpu_layers == expected
    assert runner.plan.gpu_blocks == list(range(30 - expected, 30))
    assert np.array_equal(logits, reference)


def test_auto_fills_the_simulated_gpu_and_accounts_bytes(
    gemma_path: str, monkeypatch: pytest.MonkeyPatch, python_blocks: None
) -> None:
    monkeypatch.setenv("HYBRIDLLM_SIMULATE_GPU", "1GiB")
    logits, runner = _logits(gemma_path, monkeypatch, "auto", gpu_margin=0, gpu_mem="80MiB")
    placed = runner.plan
    assert 0 < placed.n_gpu_layers < 18 and placed.devices["gpu"].total_bytes <= 80 << 20
    device = runner.model.backends[-1]
    assert device is not runner.model.backends[0]  # a separate device backend
    assert device.weights_bytes == sum(b.weights_bytes for b in placed.blocks if b.device == "gpu")
    assert device.kv_bytes == placed.devices["gpu"].kv_bytes
    monkeypatch.delenv("HYBRIDLLM_SIMULATE_GPU")
    reference, _ = _logits(gemma_path, monkeypatch, 0)
    assert np.array_equal(logits, reference)


def test_head_on_gpu_gives_the_same_answer(smollm_path: str, monkeypatch: pytest.MonkeyPatch, python_blocks: None) -> None:
    monkeypatch.setenv("HYBRIDLLM_SIMULATE_GPU", "8GiB")
    logits, runner = _logits(smollm_path, monkeypatch, "all", head_on_gpu=True)
    assert runner.plan.output == "gpu"
    monkeypatch.delenv("HYBRIDLLM_SIMULATE_GPU")
    reference, _ = _logits(smollm_path, monkeypatch, 0)
    assert np.array_equal(logits, reference)


def test_out_of_memory_replans_with_fewer_blocks(
    smollm_path: str, monkeypatch: pytest.MonkeyPatch, python_blocks: None
) -> None:
    """The plan believes 8 GiB are free; the device really holds ~12 MiB: loading runs out of
    memory, the runner warns once, re-plans with fewer blocks and still answers the same."""
    from hybridllm.backends import simulated

    real = simulated.SimulatedGpuBackend
    monkeypatch.setattr(simulated, "SimulatedGpuBackend", lambda capacity_bytes, n_threads: real(12 << 20, n_threads))
    monkeypatch.setenv("HYBRIDLLM_SIMULATE_GPU", "8GiB")
    with pytest.warns(RuntimeWarning, match="re-planning with fewer GPU blocks"):
        logits, runner = _logits(smollm_path, monkeypatch, "all", gpu_margin=0)
    assert 0 < runner.plan.n_gpu_layers < 30
    monkeypatch.delenv("HYBRIDLLM_SIMULATE_GPU")
    reference, _ = _logits(smollm_path, monkeypatch, 0)
    assert np.array_equal(logits, reference)


def test_generation_matches_across_placements(smollm_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the default (C++) CPU blocks: greedy text is the same with half the blocks simulated."""
    monkeypatch.delenv("HYBRIDLLM_SIMULATE_GPU", raising=False)
    cpu = Runner(smollm_path, n_ctx=256, n_threads=2).generate(PROMPT, max_tokens=16, temperature=0)
    monkeypatch.setenv("HYBRIDLLM_SIMULATE_GPU", "8GiB")
    hybrid = Runner(smollm_path, n_ctx=256, n_threads=2, n_gpu_layers=15)
    assert hybrid.plan.n_gpu_layers == 15
    assert hybrid.generate(PROMPT, max_tokens=16, temperature=0) == cpu
