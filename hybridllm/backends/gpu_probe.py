"""Find out whether a GPU can be used and how much memory it has free.

`HYBRIDLLM_SIMULATE_GPU=<bytes>` (e.g. `2GiB`) pretends there is a GPU with that much free
memory: the planner places blocks on it and the model runs those blocks through the CPU kernels
with separate buffers and explicit copies, so mixed placements are exercised without a GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import ConfigError

SIMULATE_ENV = "HYBRIDLLM_SIMULATE_GPU"


@dataclass(frozen=True)
class GpuStatus:
    free_bytes: int | None  # None: no usable GPU (see reason)
    total_bytes: int | None = None
    name: str = ""
    simulated: bool = False
    reason: str = ""  # why there is no GPU, for error messages


def probe() -> GpuStatus:
    simulated = os.environ.get(SIMULATE_ENV)
    if simulated:
        from ..placement import parse_size

        try:
            size = parse_size(simulated)
        except ValueError as exc:
            raise ConfigError(f"{SIMULATE_ENV}={simulated!r}: {exc}") from None
        return GpuStatus(free_bytes=size, total_bytes=size, name=f"simulated GPU ({simulated})", simulated=True)
    return _probe_cupy()


def _probe_cupy() -> GpuStatus:
    try:
        import cupy  # noqa: F401 - optional dependency (pip install hybridllm[gpu])
    except ImportError:
        return GpuStatus(None, reason="CuPy is not installed (pip install 'hybridllm[gpu]')")
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() == 0:
            return GpuStatus(None, reason="CuPy found no CUDA device")
        free, total = cupy.cuda.runtime.memGetInfo()
        name = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    except Exception as exc:  # noqa: BLE001 - any CUDA failure means "no usable GPU"
        return GpuStatus(None, reason=f"CUDA is not usable ({type(exc).__name__}: {exc})")
    return GpuStatus(free_bytes=int(free), total_bytes=int(total), name=name)
