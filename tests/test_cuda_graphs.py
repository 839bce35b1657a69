"""Decode steps replayed as CUDA graphs (HYBRIDLLM_CUDA_GRAPHS=1) against eager steps.

A run of GPU blocks captures its first one-token step as a graph and replays it at every later
position. On a machine without a GPU the stand-in (tests/gpu_emulator/fake_cupy.py) records the
captured launches, cuBLAS calls and element-wise operators with the arguments they had at
capture, runs none of them during the capture, and replays them on launch, so a launch whose
position was baked in at capture replays at the wrong position, as on a GPU; these tests show
that the graph's steps equal the eager ones, and that such a launch would be caught.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import pytest

from hybridllm.runner import Runner

pytestmark = pytest.mark.gpu
PROMPT = "The quick brown fox jumps over the lazy dog."
STEPS = 6


@pytest.fixture
def device(cupy_module: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.delenv("HYBRIDLLM_SIMULATE_GPU", raising=False)
    monkeypatch.delenv("HYBRIDLLM_CUDA_GRAPHS", raising=False)
    return cupy_module


def decode_steps(path: str, n_gpu: int | str, graphs: bool, monkeypatch: pytest.MonkeyPatch) -> tuple[list[np.ndarray], Runner]:
    """Logits after the prompt and after each of STEPS greedy tokens (fed one at a time)."""
    monkeypatch.setenv("HYBRIDLLM_CUDA_GRAPHS", "1" if graphs else "0")
    r = Runner(path, n_ctx=64, n_threads=2, n_gpu_layers=n_gpu, gpu_margin=0)
    out = [r.slot.evaluate(r.tokenize(PROMPT), 0)[-1]]
    for _ in range(STEPS):
        out.append(r.slot.evaluate([int(out[-1].argmax())], len(r.slot.tokens))[0])
    return out, r


def decode_graphs(r: Runner) -> list[Any]:
    gpu = r.model.backends[-1]
    return list(gpu._decode_graphs.values())


@pytest.mark.parametrize(("which", "n_gpu"), [("tiny_llama_path", "all"), ("tiny_llama_path", 1), ("tiny_gemma3_path", "all")])
def test_replayed_steps_equal_eager_steps(device: Any, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, which: str, n_gpu: int | str) -> None:
    """Bit for bit: a replay runs the same kernels on the same data as the eager step."""
    path = request.getfixturevalue(which)
    eager, r_eager = decode_steps(path, n_gpu, False, monkeypatch)
    graphed, r_graph = decode_steps(path, n_gpu, True, monkeypatch)
    assert not decode_graphs(r_eager)
    (graph,) = decode_graphs(r_graph)
    assert graph.replays == STEPS - 1  # the first step ran eagerly, then was captured
    for i, (got, want) in enumerate(zip(graphed, eager, strict=True)):
        np.testing.assert_array_equal(got, want, err_msg=f"step {i}")


def test_a_position_baked_in_at_capture_is_caught(device: Any, tiny_llama_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Capture the step with the kernels reading the capture step's entry of the position table
    (what a scalar pos0 argument would do): every replay then ropes, stores and attends at that
    position, and its logits part from the eager ones."""
    from hybridllm.backends import cuda

    eager, _ = decode_steps(tiny_llama_path, "all", False, monkeypatch)
    monkeypatch.setattr(cuda.CudaBackend, "_positions_from", lambda self, position: contextlib.nullcontext())
    baked, r = decode_steps(tiny_llama_path, "all", True, monkeypatch)
    assert decode_graphs(r)[0].replays == STEPS - 1
    np.testing.assert_array_equal(baked[1], eager[1])  # the eager first step
    assert all(not np.array_equal(got, want) for got, want in zip(baked[2:], eager[2:], strict=True))


def test_the_stand_in_refuses_what_capture_refuses(device: Any) -> None:
    """Capture runs nothing; a synchronous copy, pageable host memory, the legacy stream and a
    freed buffer are refused as CUDA refuses them (only the stand-in is checked here)."""
    cp = device
    if not hasattr(cp, "POOL"):
        pytest.skip("checks the emulator's stand-in only")
    err = cp.cuda.runtime.CUDARuntimeError
    stream = cp.cuda.Stream()
    x = cp.asarray(np.ones(4, np.float32))
    with stream:
        stream.begin_capture()
        x += x
        assert x.get is not None
        with pytest.raises(err, match="while the stream captures"):
            x.get()
        with pytest.raises(err, match="pageable host memory"):
            x.set(np.zeros(4, np.float32))
        with cp.cuda.Stream.null, pytest.raises(err, match="StreamCaptureImplicit"):
            x *= 2.0
        y = x + x  # freed after capture: its address is in the graph
        graph = stream.end_capture()
    np.testing.assert_array_equal(x.get(), np.ones(4))  # captured, not run
    graph.launch(stream=stream)
    graph.launch(stream=stream)
    np.testing.assert_array_equal(x.get(), np.full(4, 4.0))
    del y
    with pytest.raises(err, match="freed since"):
        graph.launch(stream=stream)
