"""Out of device memory is a DeviceError wherever it happens in the CUDA backend: at load (a
weight, a cache) as before, and inside an op (a prompt's activations, the attention scratch),
with the bytes asked for, so callers handle one kind of error. Real device or emulator (the
`cupy_module` fixture of conftest.py)."""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np
import pytest

from hybridllm.backends.cpu import Matrix
from hybridllm.errors import DeviceError

pytestmark = pytest.mark.gpu


@pytest.fixture
def limited(cupy_module: Any) -> Any:
    """The pool, whose limit the test sets; no limit again afterwards."""
    pool = cupy_module.get_default_memory_pool()
    pool.free_all_blocks()
    old = pool.get_limit()
    yield pool
    pool.set_limit(size=old)


def test_out_of_memory_inside_ops_is_device_error(cupy_module: Any, limited: Any) -> None:
    backend = importlib.import_module("hybridllm.backends.cuda").CudaBackend()
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 256)).astype(np.float32)
    m = backend.load_matrix(Matrix(w.view(np.uint8), 0, 64, 256))  # F32 64x256
    x = backend.from_host(rng.standard_normal((8, 256)).astype(np.float32))
    q = backend.from_host(rng.standard_normal((4, 2, 64)).astype(np.float32))
    kc, vc = backend.kv_cache(4096, 128), backend.kv_cache(4096, 128)
    limited.set_limit(size=limited.used_bytes() + 1024)  # nothing more of any size fits
    with pytest.raises(DeviceError, match=r"out of memory the buffers of matmul: asked for 2048 bytes") as info:
        backend.matmul(m, x)  # the (8, 64) f32 output: 2048 bytes
    assert info.value.asked_bytes == 2048  # type: ignore[attr-defined]
    with pytest.raises(DeviceError, match="out of memory the buffers of attention"):
        backend.attention(q, kc, vc, 4000, 0, 0.125)  # scores of 4 queries over 4004 keys
    with pytest.raises(DeviceError, match="out of memory the buffers of from_host"):
        backend.from_host(np.zeros((64, 256), np.float32))
    limited.set_limit(size=0)
    assert backend.to_host(backend.matmul(m, x)).shape == (8, 64)  # usable again
