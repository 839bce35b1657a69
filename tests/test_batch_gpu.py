"""Batched forwards with blocks on the CUDA backend (the SIMT emulator where there is no GPU):
several sequences' rows in one `Model.forward_batch`, each sequence's logits bit-equal to its
evaluation alone, with its KV caches on the device; and the engine over such a model."""

from __future__ import annotations

import queue
from typing import Any

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from test_batch import count_products
from test_kernels import random_raw

from hybridllm.backends.cpu import Matrix
from hybridllm.engine import Engine, Finished, Piece, Request, SamplingState, model_with_own_cache
from hybridllm.runner import Runner
from hybridllm.sampling import Sampler

pytestmark = pytest.mark.gpu


@pytest.fixture
def device(cupy_module: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.delenv("HYBRIDLLM_SIMULATE_GPU", raising=False)
    return cupy_module


@pytest.mark.parametrize("n_gpu", [1, "all"])
def test_gpu_blocks_batched_equal_alone(device: Any, tiny_llama_path: str, n_gpu: int | str) -> None:
    runner = Runner(tiny_llama_path, n_ctx=48, n_threads=2, n_gpu_layers=n_gpu)
    assert runner.plan.n_gpu_layers >= 1
    model = runner.model
    alone = [model_with_own_cache(model) for _ in range(3)]
    batched = [model_with_own_cache(model) for _ in range(3)]
    assert {type(b.k_cache).__module__.split(".")[0] for b in batched[0].blocks[-1:]} != {"numpy"}
    work, pos = [[1, 2, 3, 4, 5], [6], [7, 8, 9]], [0, 0, 0]
    for step in range(3):
        want = [m.forward(tokens, p)[-1] for m, tokens, p in zip(alone, work, pos, strict=True)]
        got = model.forward_batch(list(zip(batched, work, pos, strict=True)))
        for i, (a, b) in enumerate(zip(want, got, strict=True)):
            assert np.array_equal(a, b), f"step {step}, sequence {i}"
        pos = [p + len(t) for p, t in zip(pos, work, strict=True)]
        work = [[int(np.argmax(logits))] for logits in want]


def test_gpu_decode_rows_share_one_product_per_weight(
    device: Any, tiny_llama_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three sequences' decode rows through a GPU block: one matmul_rows_alone per weight
    matrix (7 a block) for all three, no per-sequence products; a prompt chunk beside them
    gets its own plain ones."""
    runner = Runner(tiny_llama_path, n_ctx=48, n_threads=2, n_gpu_layers="all")
    model = runner.model
    clones = [model_with_own_cache(model) for _ in range(4)]
    backend = model.blocks[0].backend
    assert type(backend).__name__ == "CudaBackend"
    calls = count_products(backend, monkeypatch)
    x = backend.from_host(model.embed([1, 2, 3, 4, 5]))
    model.blocks[0].forward_batch(x, [(c.blocks[0], 0, 1) for c in clones[:3]] + [(clones[3].blocks[0], 0, 2)])
    assert calls == {"matmul": 7, "matmul_rows_alone": 7}


@pytest.mark.parametrize("qt", [Q.Q4_1, Q.Q4_K, Q.F16], ids=lambda t: t.name)
def test_cuda_rows_alone_equal_one_row_products(device: Any, qt: Q) -> None:
    """matmul_rows_alone on 40 rows (above MMVQ_MAX_ROWS, where matmul takes other kernels)
    equals 40 one-row products, bit for bit."""
    from hybridllm.backends.cuda import MMVQ_MAX_ROWS, CudaBackend  # after the device fixture

    rows, cols, n = 24, 256, MMVQ_MAX_ROWS + 8
    be = CudaBackend()
    w = be.load_matrix(Matrix(random_raw(qt, rows, cols, seed=5), int(qt), rows, cols))
    x = be.from_host(np.random.default_rng(6).standard_normal((n, cols)).astype(np.float32))
    together = be.to_host(be.matmul_rows_alone(w, x))
    alone = np.concatenate([be.to_host(be.matmul(w, x[i : i + 1])) for i in range(n)])
    assert np.array_equal(together, alone)


def test_engine_over_gpu_blocks_equals_runner(device: Any, tiny_llama_path: str) -> None:
    runner = Runner(tiny_llama_path, n_ctx=48, n_threads=2, n_gpu_layers="all")
    prompts = [[1, 2, 3, 4, 5, 6, 7], [8, 9, 10], [11, 12, 13, 14]]
    want = []
    for ids in prompts:
        logits, out = runner.model.forward(ids, 0)[-1], []
        for _ in range(4):
            out.append(int(np.argmax(logits)))
            logits = runner.model.forward([out[-1]], len(ids) + len(out) - 1)[-1]
        want.append(out)
    engine = Engine(runner.model, runner.tokenizer, n_slots=3, prefill_chunk=4)
    engine.start()
    try:
        inboxes = [queue.Queue() for _ in prompts]
        for ids, inbox in zip(prompts, inboxes, strict=True):  # all running at once
            engine.submit(Request(ids, SamplingState(Sampler.create(temperature=0)), inbox.put, max_tokens=4))
        got = [_tokens(inbox) for inbox in inboxes]
    finally:
        engine.stop()
    assert got == want


def _tokens(inbox: queue.Queue) -> list[int]:
    out = []
    while not isinstance(event := inbox.get(timeout=600), Finished):
        assert isinstance(event, Piece), event
        out.extend(t.id for t in event.tokens)
    return out
