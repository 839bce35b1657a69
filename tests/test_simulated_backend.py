"""The simulated GPU: CPU ops on private copies, bit-identical results, honest byte counts."""

from __future__ import annotations

import numpy as np
import pytest

from hybridllm.backends.cpu import CpuBackend, Matrix, RopeSpec
from hybridllm.backends.simulated import SimulatedGpuBackend
from hybridllm.errors import DeviceError
from hybridllm.gguf_file import ModelFile
from hybridllm.model import BLOCK_MATRICES, Model, PyBlock, block_cfg, block_weights
from hybridllm.placement import ModelSizes, kv_cache_bytes, plan


@pytest.fixture(scope="module")
def smollm(smollm_path: str) -> ModelFile:
    return ModelFile(smollm_path)


@pytest.fixture(scope="module")
def gemma(gemma_path: str) -> ModelFile:
    return ModelFile(gemma_path)


def _rows(n: int, k: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)


@pytest.mark.parametrize("n", [1, 20])
def test_matmul_bit_identical(gemma: ModelFile, smollm: ModelFile, n: int) -> None:
    cpu, sim = CpuBackend(), SimulatedGpuBackend()
    for model in (smollm, gemma):
        for layer in (0, 1):  # gemma alternates Q4_K/Q6_K ffn_down and Q5_0/Q8_0 attn_v
            weights = block_weights(model, layer)
            for name in BLOCK_MATRICES:
                m = Matrix(*weights[name])
                x = _rows(n, m.cols, seed=layer)
                expected = cpu.matmul(cpu.load_matrix(m), x)
                got = sim.to_host(sim.matmul(sim.load_matrix(m), sim.from_host(x)))
                assert np.array_equal(got, expected), name


def test_small_ops_bit_identical() -> None:
    cpu, sim = CpuBackend(), SimulatedGpuBackend()
    x, w = _rows(6, 64), _rows(1, 64, seed=1)[0]
    assert np.array_equal(sim.rms_norm(sim.from_host(x), sim.load_vector(w), 1e-6), cpu.rms_norm(x, w, 1e-6))
    gate, up = _rows(5, 96, seed=2), _rows(5, 96, seed=3)
    for act in ("silu", "gelu_tanh"):
        assert np.array_equal(sim.glu(sim.from_host(gate), sim.from_host(up), act), cpu.glu(gate, up, act))
    for neox in (False, True):
        spec = RopeSpec(10000.0, 64, 1.0, neox, 128)
        a, b = x.reshape(2, 3, 64).copy(), sim.from_host(x).reshape(2, 3, 64)
        cpu.rope(a, 7, spec)
        sim.rope(b, 7, spec)
        assert np.array_equal(a, b)
    y = x.copy()
    cpu.add(y, w)
    z = sim.from_host(x)
    sim.add(z, w)
    assert np.array_equal(sim.to_host(z), y)


@pytest.mark.parametrize(("n", "pos0", "window"), [(1, 9, 0), (20, 0, 0), (3, 30, 8), (20, 10, 6)])
def test_attention_bit_identical(n: int, pos0: int, window: int) -> None:
    cpu, sim = CpuBackend(), SimulatedGpuBackend()
    n_heads, n_kv, d = 4, 2, 64
    caches = []
    for be in (cpu, sim):
        kc, vc = be.kv_cache(64, n_kv * d), be.kv_cache(64, n_kv * d)
        be.store_kv(kc, 0, _rows(pos0 + n, n_kv * d, seed=4))
        be.store_kv(vc, 0, _rows(pos0 + n, n_kv * d, seed=5))
        caches.append((kc, vc))
    q = _rows(n, n_heads * d, seed=6).reshape(n, n_heads, d)
    expected = cpu.attention(q, *caches[0], pos0, window, 0.125)
    got = sim.attention(sim.from_host(q), *caches[1], pos0, window, 0.125)
    assert np.array_equal(got, expected)


def test_loads_are_copies(smollm: ModelFile) -> None:
    sim = SimulatedGpuBackend()
    weights = block_weights(smollm, 0)
    m = Matrix(*weights["attn_q"])
    loaded = sim.load_matrix(m)
    assert not np.shares_memory(loaded.raw, m.raw) and np.array_equal(loaded.raw, m.raw)
    assert loaded.raw.flags.writeable and loaded.raw.flags.c_contiguous
    v = weights["attn_norm"]
    assert not np.shares_memory(sim.load_vector(v), v)
    x = _rows(2, 8)
    on_device = sim.from_host(x)
    x[:] = 0  # the host buffer changes; the device copy does not
    assert not np.array_equal(on_device, x) and not np.shares_memory(sim.to_host(on_device), on_device)
    assert sim.bytes_to_device == sim.bytes_to_host == x.nbytes and sim.n_transfers == 2


def test_block_bit_identical(gemma: ModelFile) -> None:
    cfg, weights = block_cfg(gemma.config, 0), block_weights(gemma, 0)
    sim = SimulatedGpuBackend()
    on_cpu, on_sim = PyBlock(cfg, weights, 64, CpuBackend()), PyBlock(cfg, weights, 64, sim)
    x = _rows(20, gemma.config.dim)
    a, b = x.copy(), sim.from_host(x)
    for pos0, rows in ((0, slice(0, 20)), (20, slice(0, 1)), (21, slice(1, 2))):
        a_chunk, b_chunk = a[rows].copy(), sim.from_host(b[rows])
        on_cpu.forward(a_chunk, pos0)
        on_sim.forward(b_chunk, pos0)
        assert np.array_equal(sim.to_host(b_chunk), a_chunk)
    assert sim.weights_bytes == gemma.block_nbytes(0)
    assert sim.kv_bytes == kv_cache_bytes(gemma.config, 64)


@pytest.mark.parametrize("n_gpu", [0, 7, 30])
def test_mixed_model_matches_plan_and_cpu(
    smollm: ModelFile, monkeypatch: pytest.MonkeyPatch, n_gpu: int
) -> None:
    """The last n_gpu blocks on the simulated GPU: same logits, and the bytes the plan counted."""
    monkeypatch.setenv("HYBRIDLLM_BLOCK", "python")  # PyBlock on the CPU too: bit-identical ops
    config, n_ctx = smollm.config, 64
    placement = plan(config, ModelSizes.from_model(smollm), n_ctx, 8 << 30, n_gpu_layers=n_gpu, margin=0)
    assert placement.n_gpu_layers == n_gpu
    sim = SimulatedGpuBackend(capacity_bytes=8 << 30)
    cpu = CpuBackend()
    backends = [sim if b.device == "gpu" else cpu for b in placement.blocks]
    mixed = Model(smollm, n_ctx, backends=backends)
    if n_gpu:
        gpu = placement.devices["gpu"]
        assert (sim.weights_bytes, sim.kv_bytes) == (gpu.weights_bytes, gpu.kv_bytes)
    else:
        assert sim.held_bytes == 0
    reference = Model(smollm, n_ctx)
    tokens = [1, 504, 3458, 314, 260, 1345, 28, 42]
    assert np.array_equal(mixed.forward(tokens, 0, first_logit=0), reference.forward(tokens, 0, first_logit=0))
    assert np.array_equal(mixed.forward([17], len(tokens)), reference.forward([17], len(tokens)))
    # the residual stream crosses once each way per chunk: 8 rows, then 1 row
    crossed = (len(tokens) + 1) * config.dim * 4 if n_gpu else 0
    assert sim.bytes_to_device == sim.bytes_to_host == crossed


def test_capacity_raises_device_error(smollm: ModelFile) -> None:
    m = Matrix(*block_weights(smollm, 0)["ffn_up"])
    sim = SimulatedGpuBackend(capacity_bytes=m.raw.nbytes + 100)
    sim.load_matrix(m)
    with pytest.raises(DeviceError, match="out of memory") as info:
        sim.load_matrix(m)
    assert info.value.asked_bytes == m.raw.nbytes and info.value.free_bytes == 100  # type: ignore[attr-defined]
    assert sim.weights_bytes == m.raw.nbytes  # the failed load holds nothing


def test_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HYBRIDLLM_SIMULATE_GPU", "2GiB")
    assert SimulatedGpuBackend.from_env().capacity_bytes == 2 << 30
    monkeypatch.delenv("HYBRIDLLM_SIMULATE_GPU")
    with pytest.raises(DeviceError, match="not set"):
        SimulatedGpuBackend.from_env()
