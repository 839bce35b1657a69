"""A pretend GPU for machines without one (`HYBRIDLLM_SIMULATE_GPU=<bytes>`).

`SimulatedGpuBackend` has the GPU backend's interface and runs every op through the CPU
kernels (it is a `CpuBackend`), but it behaves like a separate device where that matters to
the rest of the program:
- load_matrix / load_vector / kv_cache put the bytes in arrays of its own (copies, never views
  of the memory map), and it counts them, so tests can hold the placement plan to its numbers;
- from_host / to_host copy, and count the bytes that would cross the bus;
- given a capacity, a load that does not fit raises `DeviceError` as a real out-of-memory does,
  so the re-plan path can be exercised.
Because the ops are the CPU backend's on identical copies, results are bit-identical to it.
"""

from __future__ import annotations

import numpy as np

from ..errors import DeviceError
from .cpu import CpuBackend, Matrix


class SimulatedGpuBackend(CpuBackend):
    """CPU ops on private copies; counts held and transferred bytes like a device would."""

    name = "simulated-gpu"  # not "cpu": model.make_block gives it a PyBlock that calls our ops

    def __init__(self, capacity_bytes: int | None = None, n_threads: int | None = None) -> None:
        super().__init__(n_threads)
        self.capacity_bytes = capacity_bytes  # None: unlimited
        self.weights_bytes = 0  # matrices and vectors loaded
        self.kv_bytes = 0  # KV caches allocated
        self.bytes_to_device = 0  # from_host
        self.bytes_to_host = 0  # to_host
        self.n_transfers = 0  # from_host + to_host calls

    @classmethod
    def from_env(cls, n_threads: int | None = None) -> SimulatedGpuBackend:
        """A backend whose capacity is the size in HYBRIDLLM_SIMULATE_GPU (see gpu_probe)."""
        from .gpu_probe import SIMULATE_ENV, probe

        status = probe()
        if not status.simulated:
            raise DeviceError(f"{SIMULATE_ENV} is not set: there is no simulated GPU")
        return cls(capacity_bytes=status.free_bytes, n_threads=n_threads)

    @property
    def held_bytes(self) -> int:
        """Bytes this pretend device holds (weights + KV caches)."""
        return self.weights_bytes + self.kv_bytes

    # --- memory -------------------------------------------------------------------------
    def load_matrix(self, m: Matrix) -> Matrix:
        raw = np.array(m.raw, dtype=np.uint8, order="C", copy=True)
        self._reserve(raw.nbytes, f"a {m.rows}x{m.cols} matrix")
        self.weights_bytes += raw.nbytes
        return Matrix(raw, m.qtype, m.rows, m.cols)

    def load_vector(self, v: np.ndarray) -> np.ndarray:
        out = np.array(v, dtype=np.float32, order="C", copy=True)
        self._reserve(out.nbytes, f"a vector of {out.size}")
        self.weights_bytes += out.nbytes
        return out

    def kv_cache(self, n_ctx: int, width: int) -> np.ndarray:
        self._reserve(2 * n_ctx * width, f"a KV cache of {n_ctx}x{width}")
        cache = super().kv_cache(n_ctx, width)
        self.kv_bytes += cache.nbytes
        return cache

    def from_host(self, x: np.ndarray) -> np.ndarray:
        out = np.array(x, dtype=np.float32, order="C", copy=True)
        self.bytes_to_device += out.nbytes
        self.n_transfers += 1
        return out

    def to_host(self, x: np.ndarray) -> np.ndarray:
        out = np.array(x, dtype=np.float32, order="C", copy=True)
        self.bytes_to_host += out.nbytes
        self.n_transfers += 1
        return out

    def _reserve(self, nbytes: int, what: str) -> None:
        if self.capacity_bytes is not None and self.held_bytes + nbytes > self.capacity_bytes:
            free = self.capacity_bytes - self.held_bytes
            err = DeviceError(
                f"simulated GPU out of memory loading {what}: asked for {nbytes} bytes, {free} free "
                f"of {self.capacity_bytes}; place fewer blocks on the GPU"
            )
            err.asked_bytes, err.free_bytes = nbytes, free  # type: ignore[attr-defined]
            raise err
