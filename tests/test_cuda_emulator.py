"""The SIMT emulator (tests/gpu_emulator) against CUDA's semantics, and the real kernels under
every fiber order.

The emulator is what lets CI run `cuda_kernels.cu` without a GPU, so it is tested first: warp
shuffles of float/double/int, barriers, the faults a GPU punishes (a barrier in divergent code,
a shuffle after a lane returned, a launch over __launch_bounds__, dynamic shared memory past the
launch's size, a scalar of the wrong type), the inline PTX bit for bit against numpy over every
f16 and a million f32 patterns, and the real kernels giving the same bits whatever order a
block's threads are resumed in (a missing __syncthreads would show as a difference).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gpu_emulator.build import Emulator, EmulatorError, lower_ptx

from hybridllm.backends.cpu import RopeSpec

pytestmark = pytest.mark.gpu
SELFTEST = Path(__file__).with_name("gpu_emulator") / "selftest.cu"


@pytest.fixture(scope="module")
def emu() -> Emulator:
    e = Emulator(SELFTEST)
    yield e
    e.set_order("forward")


def _launch(emu: Emulator, name: str, grid: Any, block: Any, arrays: list[np.ndarray], scalars: tuple = (), shared: int = 0) -> None:
    emu.launch(name, grid, block, (*arrays, *scalars), [a.ctypes.data for a in arrays], shared)


def test_warp_shuffles_of_float_double_int(emu: Emulator) -> None:
    f, d, i = np.zeros(64, np.float32), np.zeros(64, np.float64), np.zeros(64, np.int32)
    for order in ("forward", "reverse", "random"):
        emu.set_order(order, seed=3)
        _launch(emu, "shuffles", 1, 64, [f, d, i])
        t = np.arange(64)
        base = t & ~31
        np.testing.assert_array_equal(f, (t ^ 5) + 0.5)
        np.testing.assert_array_equal(d, (base + ((t * 3) & 31)) * 0.25)
        np.testing.assert_array_equal(i, (t ^ 16) * 7 + base * 7)
    emu.set_order("forward")


def test_missing_barrier_shows_as_order_dependence(emu: Emulator) -> None:
    x = np.arange(256, dtype=np.float32)
    outs = {}
    for with_barrier in (1, 0):
        for order in ("forward", "reverse"):
            out = np.zeros(256, np.float32)
            emu.set_order(order)
            _launch(emu, "neighbours", 2, 128, [x, out], (np.int32(with_barrier),))
            outs[with_barrier, order] = out
    emu.set_order("forward")
    expected = x.reshape(2, 128)[:, (np.arange(128) + 1) % 128].ravel()
    np.testing.assert_array_equal(outs[1, "forward"], expected)
    np.testing.assert_array_equal(outs[1, "reverse"], expected)
    assert not np.array_equal(outs[0, "forward"], outs[0, "reverse"])


@pytest.mark.parametrize(
    ("kernel", "block", "message"),
    [
        ("divergent_barrier", 64, "divergent barrier"),
        ("barrier_after_return", 64, "divergent barrier"),
        ("shuffle_after_return", 32, "shuffle after lane 5"),
        ("bounded", 128, "__launch_bounds__"),
    ],
)
def test_faults_a_gpu_punishes_are_refused(emu: Emulator, kernel: str, block: int, message: str) -> None:
    for order in ("forward", "reverse", "random"):  # caught whichever thread gets there first
        emu.set_order(order, seed=5)
        with pytest.raises(EmulatorError, match=message):
            _launch(emu, kernel, 1, block, [np.zeros(128, np.float32)])
    emu.set_order("forward")


def test_dynamic_shared_memory_limits(emu: Emulator) -> None:
    out = np.zeros(64, np.float32)
    _launch(emu, "dyn_shared", 1, 64, [out], (np.int32(64),), shared=256)
    np.testing.assert_array_equal(out, np.arange(64))
    with pytest.raises(EmulatorError, match="past the 256 bytes"):
        _launch(emu, "dyn_shared", 1, 64, [out], (np.int32(65),), shared=256)
    with pytest.raises(EmulatorError, match="dynamic shared memory"):
        _launch(emu, "dyn_shared", 1, 64, [out], (np.int32(1),), shared=48 * 1024 + 4)


def test_scalar_arguments_must_have_the_parameter_type(emu: Emulator) -> None:
    out = np.zeros(300, np.float32)
    _launch(emu, "takes_i64", 2, 256, [out], (np.int64(300),))
    np.testing.assert_array_equal(out, np.arange(300))
    for wrong in (np.int32(300), 300, np.float32(300)):
        with pytest.raises(EmulatorError, match="parameter n is i64"):
            _launch(emu, "takes_i64", 2, 256, [out], (wrong,))


def test_inline_ptx_is_exact() -> None:
    """cvt.rn.f16.f32 against numpy's astype (round to nearest even) on every f16 boundary
    region and random bits, cvt.f32.f16 on all 65536 halves, dp4a against int64 arithmetic."""
    rng = np.random.default_rng(0)
    bits = np.concatenate(
        [
            rng.integers(0, 2**32, 1 << 20, dtype=np.uint64).astype(np.uint32),
            # every f32 near f16's rounding boundaries: ties, subnormals, overflow to inf
            (np.arange(65536, dtype=np.uint32) << 13) + np.uint32(0x1000),
            (np.arange(65536, dtype=np.uint32) << 13) + np.uint32(0xFFF),
            np.array([0x477FEFFF, 0x477FF000, 0x33000000, 0x33000001, 0x7FC00001, 0xFF800000], np.uint32),
        ]
    )
    f = bits.view(np.float32)
    n = f.size
    halves = np.resize(np.arange(65536, dtype=np.uint16), n)
    a, b = rng.integers(-(2**31), 2**31, n).astype(np.int32), rng.integers(-(2**31), 2**31, n).astype(np.int32)
    d = rng.integers(-(2**31), 2**31, n).astype(np.int32)
    h, fout, dd = np.zeros(n, np.uint16), np.zeros(n, np.float32), d.copy()
    e = Emulator(SELFTEST)
    _launch(e, "ptx_ops", (n + 255) // 256, 256, [f, h, halves, fout, a, b, dd], (np.int64(n),))
    with np.errstate(over="ignore", invalid="ignore"):
        want_h = f.astype(np.float16)
    nan = np.isnan(f)
    np.testing.assert_array_equal(h[~nan], want_h[~nan].view(np.uint16))
    assert np.all(np.isnan(h[nan].view(np.float16)))
    want_f = halves.view(np.float16).astype(np.float32)
    same = (fout.view(np.uint32) == want_f.view(np.uint32)) | (np.isnan(fout) & np.isnan(want_f))
    assert same.all()
    prods = (a.view(np.int8).reshape(-1, 4).astype(np.int64) * b.view(np.int8).reshape(-1, 4)).sum(1)
    np.testing.assert_array_equal(dd, ((d.astype(np.int64) + prods + 2**31) % 2**32 - 2**31).astype(np.int32))


def test_unknown_inline_ptx_is_a_build_error() -> None:
    with pytest.raises(EmulatorError, match="no mul.wide.s32"):
        lower_ptx('asm("mul.wide.s32 %0, %1, %2;" : "=l"(r) : "r"(a), "r"(b));')
    with pytest.raises(EmulatorError, match="constraints"):
        lower_ptx('asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "r"(h));')


# --- the real kernels, every fiber order -----------------------------------------------------
@pytest.fixture(scope="module")
def backend(cupy_module: Any) -> Any:
    if not hasattr(cupy_module, "POOL"):
        pytest.fail("run these under the emulator: HYBRIDLLM_GPU_TESTS=emulated")  # a real GPU has no fiber order
    return importlib.import_module("hybridllm.backends.cuda").CudaBackend()


def _ops(gpu: Any) -> list[np.ndarray]:
    """One result of every kernel family through CudaBackend (decode and prefill paths)."""
    from gguf import GGMLQuantizationType as T
    from gguf.quants import quantize

    from hybridllm.backends.cpu import Matrix

    rng = np.random.default_rng(1)
    x = rng.standard_normal((40, 256)).astype(np.float32)
    w = rng.standard_normal((64, 256)).astype(np.float32)
    out = []
    q6k = rng.integers(0, 256, (64, 210), dtype=np.uint8)  # one Q6_K block per row
    q6k[:, 208:210] = rng.uniform(-0.05, 0.05, 64).astype(np.float16).view(np.uint8).reshape(64, 2)
    for qtype in (T.Q6_K, T.Q8_0, T.F16):
        raw = {T.Q6_K: q6k, T.Q8_0: quantize(w, T.Q8_0), T.F16: w.astype(np.float16).view(np.uint8)}[qtype]
        m = gpu.load_matrix(Matrix(raw.reshape(64, -1), int(qtype), 64, 256))
        for n in (1, 9, 40):
            out.append(gpu.to_host(gpu.matmul(m, gpu.from_host(x[:n]))))
    xd = gpu.from_host(x)
    out.append(gpu.to_host(gpu.rms_norm(xd, gpu.load_vector(w[0]), 1e-6)))
    q = gpu.from_host(x[:, :128].copy()).reshape(40, 2, 64)
    gpu.rope(q, 3, RopeSpec(10000.0, 64, 1.0, True, 64))
    out.append(gpu.to_host(q))
    kc, vc = gpu.kv_cache(64, 64), gpu.kv_cache(64, 64)
    gpu.store_kv(kc, 0, gpu.from_host(x[:, :64].copy()))
    gpu.store_kv(vc, 0, gpu.from_host(x[:, 64:128].copy()))
    for n, pos0 in ((1, 0), (3, 37), (20, 20)):  # (1, 0): one key, only warp 0 shuffles
        out.append(gpu.to_host(gpu.attention(gpu.from_host(x[:n, :128].reshape(n, 2, 64).copy()), kc, vc, pos0, 0, 0.125)))
    out.append(gpu.to_host(gpu.glu(xd, xd, "silu")))
    return out


def test_real_kernels_give_the_same_bits_in_every_fiber_order(backend: Any) -> None:
    from gpu_emulator.build import emulator

    emu = emulator()
    try:
        reference = _ops(backend)
        for order, seed in (("reverse", 0), ("random", 1), ("random", 2)):
            emu.set_order(order, seed)
            for i, (got, want) in enumerate(zip(_ops(backend), reference, strict=True)):
                assert np.array_equal(got, want), (order, seed, i)
    finally:
        emu.set_order("forward")


def test_a_kernel_writing_past_an_allocation_is_caught(cupy_module: Any) -> None:
    """store_f16 told to write 8 more elements than the cache holds: the canary after the
    allocation changes and the launch fails (a GPU would corrupt a neighbour silently)."""
    cp = cupy_module
    if not hasattr(cp, "POOL"):
        pytest.fail("run under the emulator: HYBRIDLLM_GPU_TESTS=emulated")
    src, cache = cp.asarray(np.ones(72, np.float32)), cp.zeros((4, 16), cp.float16)
    store = cp.RawModule(code="").get_function("store_f16")
    pos = cp.zeros(1, cp.int32)  # the kernel reads its row on the device
    store((1,), (256,), (src, cache, pos, np.int64(16), np.int64(64)))  # exactly the cache: fine
    with pytest.raises(cp.cuda.runtime.CUDARuntimeError, match="out of bounds of the allocation passed as cache"):
        store((1,), (256,), (src, cache, pos, np.int64(16), np.int64(72)))


def test_progress_in_one_warp_is_not_a_deadlock(emu: Emulator) -> None:
    """Regression: the scheduler inferred progress from the barrier and warp state, which a
    completed shuffle plus the next one's arrivals can leave unchanged; random orders then
    reported attn_rows (one key: only warp 0 shuffles) as a deadlock."""
    want = None
    for seed in range(40):
        emu.set_order("random", seed)
        out = np.zeros(128, np.float32)
        _launch(emu, "one_warp_reduces", 1, 128, [out])
        want = out if want is None else want
        np.testing.assert_array_equal(out, want)
    emu.set_order("forward")
    assert want[0] == 496.0 * 2**35 and want[64] == 64.0  # 8 rounds of a 32-lane sum (x32 each)
