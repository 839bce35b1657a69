"""The planner, with pretend memory sizes: nothing here needs a GPU."""

from __future__ import annotations

import json

import pytest

from hybridllm.cli import main
from hybridllm.errors import DeviceError
from hybridllm.gguf_file import ModelFile
from hybridllm.placement import (
    GiB,
    ModelSizes,
    gpu_scratch_bytes,
    kv_cache_bytes,
    parse_size,
    plan,
)


@pytest.fixture(scope="module")
def gemma(gemma_path: str):  # noqa: ANN201
    model = ModelFile(gemma_path)
    return model.config, ModelSizes.from_model(model)


def _gpu_need(config, sizes, n_blocks: int, n_ctx: int) -> int:  # noqa: ANN001
    """Bytes the last n_blocks blocks need on the GPU, with scratch."""
    kv = kv_cache_bytes(config, n_ctx)
    n_layers = len(sizes.blocks)
    scratch = gpu_scratch_bytes(config, sizes, n_ctx, range(n_layers - n_blocks, n_layers))
    return scratch + sum(sizes.blocks[-n_blocks:]) + n_blocks * kv


def test_no_gpu_means_all_cpu(gemma) -> None:  # noqa: ANN001
    config, sizes = gemma
    result = plan(config, sizes, 4096, None)
    assert result.gpu_blocks == [] and set(result.devices) == {"cpu"}
    with pytest.raises(DeviceError, match="needs a GPU, but CuPy is missing"):
        plan(config, sizes, 4096, None, n_gpu_layers=2, no_gpu_reason="CuPy is missing")


def test_zero_free_memory(gemma) -> None:  # noqa: ANN001
    config, sizes = gemma
    result = plan(config, sizes, 4096, 0)
    assert result.gpu_blocks == [] and "too small for one block" in result.notes[0]


def test_exactly_one_block(gemma) -> None:  # noqa: ANN001
    config, sizes = gemma
    need = _gpu_need(config, sizes, 1, 4096)
    assert plan(config, sizes, 4096, need, margin=0).gpu_blocks == [17]
    assert plan(config, sizes, 4096, need - 1, margin=0).gpu_blocks == []
    # the margin is kept free: the same memory with the default 1 GiB margin holds nothing
    assert plan(config, sizes, 4096, need).gpu_blocks == []
    assert plan(config, sizes, 4096, need + GiB).gpu_blocks == [17]


def test_half_and_all(gemma) -> None:  # noqa: ANN001
    config, sizes = gemma
    half = plan(config, sizes, 4096, _gpu_need(config, sizes, 9, 4096) + 1000, margin=0)
    assert half.gpu_blocks == list(range(9, 18))  # one contiguous run, at the end of the stack
    everything = plan(config, sizes, 4096, 64 * GiB)
    assert everything.gpu_blocks == list(range(18))
    assert (everything.token_embd, everything.output, everything.output_norm) == ("cpu", "cpu", "cpu")


def test_every_served_sequence_has_its_kv_cache(gemma) -> None:  # noqa: ANN001
    """A server with 4 slots holds 5 KV caches per block (its slots' and the Runner's own):
    memory that fits 9 blocks of one sequence fits fewer of five, each block's KV counted 5 times."""
    config, sizes = gemma
    free = _gpu_need(config, sizes, 9, 4096) + 1000
    one, five = plan(config, sizes, 4096, free, margin=0), plan(config, sizes, 4096, free, margin=0, n_seq=5)
    assert len(one.gpu_blocks) == 9 and len(five.gpu_blocks) < 9
    assert five.blocks[0].kv_bytes == 5 * kv_cache_bytes(config, 4096)
    gpu = five.devices["gpu"]
    assert gpu.kv_bytes == len(five.gpu_blocks) * 5 * kv_cache_bytes(config, 4096) and gpu.total_bytes <= free
    with pytest.raises(ValueError, match="n_seq must be >= 1"):
        plan(config, sizes, 4096, free, n_seq=0)


def test_gpu_mem_caps_the_plan(gemma) -> None:  # noqa: ANN001
    config, sizes = gemma
    cap = _gpu_need(config, sizes, 4, 4096)
    result = plan(config, sizes, 4096, 80 * GiB, gpu_mem=cap)
    assert result.n_gpu_layers == 4 and result.devices["gpu"].total_bytes <= cap


def test_explicit_counts(gemma) -> None:  # noqa: ANN001
    config, sizes = gemma
    assert plan(config, sizes, 4096, 64 * GiB, n_gpu_layers=3).gpu_blocks == [15, 16, 17]
    assert plan(config, sizes, 4096, 64 * GiB, n_gpu_layers=0).gpu_blocks == []
    assert plan(config, sizes, 4096, 64 * GiB, n_gpu_layers=99).n_gpu_layers == 18
    assert plan(config, sizes, 4096, 64 * GiB, n_gpu_layers="all").n_gpu_layers == 18
    squeezed = plan(config, sizes, 4096, _gpu_need(config, sizes, 2, 4096), margin=0, n_gpu_layers="all")
    assert squeezed.n_gpu_layers == 2 and "only 2 fit" in squeezed.notes[0]
    for bad in ("most", -2, 2.5, True):
        with pytest.raises(ValueError, match="n_gpu_layers"):
            plan(config, sizes, 4096, GiB, n_gpu_layers=bad)


def test_head_on_gpu(gemma) -> None:  # noqa: ANN001
    config, sizes = gemma
    result = plan(config, sizes, 4096, 64 * GiB, head_on_gpu=True)
    assert (result.output, result.output_norm, result.token_embd) == ("gpu", "gpu", "cpu")
    # tied head: the GPU holds a copy of the embedding matrix as the head
    assert result.devices["gpu"].weights_bytes == sum(sizes.blocks) + sizes.output + sizes.output_norm
    partial = plan(config, sizes, 4096, 64 * GiB, n_gpu_layers=5, head_on_gpu=True)
    assert partial.output == "cpu" and "needs every block" in partial.notes[0]


def test_bytes_add_up(gemma) -> None:  # noqa: ANN001
    config, sizes = gemma
    result = plan(config, sizes, 2048, _gpu_need(config, sizes, 6, 2048) + GiB)
    cpu, gpu = result.devices["cpu"], result.devices["gpu"]
    assert cpu.weights_bytes + gpu.weights_bytes == sum(sizes.blocks) + sizes.token_embd + sizes.output_norm
    assert cpu.kv_bytes + gpu.kv_bytes == 18 * kv_cache_bytes(config, 2048)
    assert kv_cache_bytes(config, 2048) == 2048 * 2 * 256 * 2  # K and V, 1 kv head of 256, f16
    assert gpu.free_after_bytes == gpu.free_bytes - gpu.total_bytes >= GiB


def test_parse_size() -> None:
    assert parse_size("4GiB") == 4 * GiB and parse_size("512 MiB") == 512 << 20
    assert parse_size("2G") == 2 * GiB and parse_size("1GB") == 10**9 and parse_size(123) == 123
    with pytest.raises(ValueError, match="cannot read size '3x'"):
        parse_size("3x")


def test_plan_cli_json(gemma_path: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HYBRIDLLM_SIMULATE_GPU", "2GiB")
    assert main(["plan", gemma_path, "--ctx", "1024", "--gpu-mem", "64MiB", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    devices = [b["device"] for b in out["blocks"]]
    assert devices.count("gpu") == out["n_gpu_layers"] > 0 and devices[-1] == "gpu"
    assert out["token_embd"] == out["output"] == out["output_norm"] == "cpu"
    assert out["devices"]["gpu"]["total_bytes"] <= 64 << 20 and out["devices"]["gpu"]["free_bytes"] == 2 * GiB
    assert all(b["weights_bytes"] > 0 and b["kv_bytes"] == 1024 * (256 + 256) * 2 for b in out["blocks"])


def test_plan_cli_errors(smollm_path: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HYBRIDLLM_SIMULATE_GPU", raising=False)
    monkeypatch.setattr("hybridllm.backends.gpu_probe._probe_cupy", lambda: __import__(
        "hybridllm.backends.gpu_probe", fromlist=["GpuStatus"]).GpuStatus(None, reason="CuPy is not installed"))
    assert main(["plan", smollm_path, "-ngl", "4"]) == 2
    assert "needs a GPU, but CuPy is not installed" in capsys.readouterr().err
    monkeypatch.setenv("HYBRIDLLM_SIMULATE_GPU", "lots")
    assert main(["plan", smollm_path]) == 2
    assert "HYBRIDLLM_SIMULATE_GPU='lots'" in capsys.readouterr().err
    assert main(["plan", smollm_path]) == 2
