"""A stand-in for exactly the CuPy surface `hybridllm/backends/cuda.py` uses (tests only).

Device arrays are host memory owned by a pretend device: they refuse implicit conversion to
numpy (as CuPy's do: `.get()` is the only way out), allocate through a pool whose limit can be
set (out of memory raises `cuda.memory.OutOfMemoryError`), and are 256-byte aligned like
cudaMalloc's. `RawModule(...).get_function(name)` launches the real kernel source through the
SIMT emulator (build.py); pointer arguments must be live device arrays. cuBLAS `gemmEx` /
`gemmStridedBatchedEx` read their operands from raw device pointers with their leading
dimensions and strides, after checking every operand's byte range lies inside one live
allocation, and compute in float64 from the f16 inputs (then round to f32).

`install()` puts this module in sys.modules as `cupy` (and its submodules); `uninstall()`
takes it out again. The package itself never selects it.
"""

from __future__ import annotations

import ctypes
import sys
import types
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from .build import emulator

float16, float32, float64 = np.float16, np.float32, np.float64
int8, int32, int64, uint8, uint16 = np.int8, np.int32, np.int64, np.uint8, np.uint16

_ALIGN = 256  # cudaMalloc alignment
_POOL_ROUND = 512  # CuPy's pool rounds allocations up to this


# --- memory ---------------------------------------------------------------------------------
class OutOfMemoryError(MemoryError):
    def __init__(self, size: int, total: int, limit: int) -> None:
        super().__init__(
            f"Out of memory allocating {size:,} bytes (allocated so far: {total:,} bytes, limit set to: {limit:,} bytes)."
        )


class CUDARuntimeError(RuntimeError):
    pass


class CompileException(Exception):
    pass


_GUARD = 256  # canary bytes before and after every allocation (kernel writes out of bounds)
_CANARY = 0xA5


class _Allocation:
    """One device allocation: an aligned slice of a host buffer, registered while alive, with
    a canary of _GUARD bytes on each side that kernel launches check afterwards."""

    def __init__(self, nbytes: int) -> None:
        raw = np.empty(nbytes + 2 * _GUARD + _ALIGN, np.uint8)
        start = (-(raw.ctypes.data + _GUARD)) % _ALIGN + _GUARD
        self.buf = raw[start : start + nbytes]
        self.before = raw[start - _GUARD : start]
        self.after = raw[start + nbytes : start + nbytes + _GUARD]
        self.before[:] = _CANARY
        self.after[:] = _CANARY
        self.ptr = self.buf.ctypes.data
        self.nbytes = nbytes
        self.charged = (max(nbytes, 1) + _POOL_ROUND - 1) // _POOL_ROUND * _POOL_ROUND
        POOL._charge(self)
        weakref.finalize(self, POOL._release, self.ptr, self.charged)

    def guards_intact(self) -> bool:
        return bool((self.before == _CANARY).all() and (self.after == _CANARY).all())


class MemoryPool:
    """CuPy's default pool, reduced to what the tests need: a limit and the bytes in use."""

    def __init__(self, total: int = 8 << 30) -> None:
        self.total = total  # the pretend device's memory
        self.limit = 0  # 0: no limit (CuPy's convention)
        self.live: dict[int, tuple[int, weakref.ref[_Allocation]]] = {}
        self.used = 0
        self.peak = 0

    def _cap(self) -> int:
        return min(self.total, self.limit) if self.limit else self.total

    def _charge(self, a: _Allocation) -> None:
        if self.used + a.charged > self._cap():
            raise OutOfMemoryError(a.nbytes, self.used, self._cap())
        self.used += a.charged
        self.peak = max(self.peak, self.used)
        self.live[a.ptr] = (a.nbytes, weakref.ref(a))

    def _release(self, ptr: int, charged: int) -> None:
        self.used -= charged
        self.live.pop(ptr, None)

    def set_limit(self, size: int | None = None, fraction: float | None = None) -> None:
        self.limit = int(size if size is not None else (fraction or 0) * self.total)

    def get_limit(self) -> int:
        return self.limit

    def used_bytes(self) -> int:
        return self.used

    def total_bytes(self) -> int:
        return self.used

    def free_bytes(self) -> int:
        return 0  # freed blocks go straight back to the device here

    def free_all_blocks(self) -> None:
        pass

    def find(self, ptr: int, nbytes: int, what: str) -> tuple[np.ndarray, int]:
        """(the allocation's bytes, offset of ptr) when [ptr, ptr+nbytes) lies in one live allocation."""
        for base, (size, ref) in self.live.items():
            if base <= ptr < base + max(size, 1) or (nbytes == 0 and ptr == base + size):
                alloc = ref()
                if alloc is None:
                    break
                if ptr + nbytes > base + size:
                    raise CUDARuntimeError(
                        f"{what}: {nbytes} bytes at offset {ptr - base} overrun an allocation of {size}"
                    )
                return alloc.buf, ptr - base
        raise CUDARuntimeError(f"{what}: address {ptr:#x} is not in any live device allocation")


POOL = MemoryPool()
PINNED_BYTES = [0]


def get_default_memory_pool() -> MemoryPool:
    return POOL


# --- arrays ---------------------------------------------------------------------------------
class _Flags:
    def __init__(self, a: np.ndarray) -> None:
        self.c_contiguous = a.flags.c_contiguous
        self.f_contiguous = a.flags.f_contiguous


class _Pointer:
    def __init__(self, ptr: int) -> None:
        self.ptr = ptr


class ndarray:
    """A device array: a numpy view `_a` of a device allocation `_mem`."""

    __array_ufunc__ = None  # numpy defers to our operators (np.float32(2) * x -> x.__rmul__)

    def __init__(self, a: np.ndarray, mem: _Allocation) -> None:
        self._a, self._mem = a, mem

    # conversion out of the device is explicit only, as CuPy
    def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        raise TypeError(
            "Implicit conversion to a NumPy array is not allowed. Please use `.get()` to construct a NumPy array explicitly."
        )

    def __iter__(self) -> Iterator[Any]:
        raise TypeError("iterating a device array element by element is not supported here")

    def __bool__(self) -> bool:
        raise TypeError("the truth value of a device array needs a device-to-host copy; use .get()")

    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    size = property(lambda self: self._a.size)
    ndim = property(lambda self: self._a.ndim)
    nbytes = property(lambda self: self._a.nbytes)
    strides = property(lambda self: self._a.strides)
    itemsize = property(lambda self: self._a.itemsize)
    flags = property(lambda self: _Flags(self._a))
    data = property(lambda self: _Pointer(self._a.ctypes.data))
    T = property(lambda self: ndarray(self._a.T, self._mem))

    def __len__(self) -> int:
        return len(self._a)

    def __repr__(self) -> str:
        return f"<emulated device array {self.shape} {self.dtype}>"

    def __getitem__(self, key: Any) -> ndarray:
        return ndarray(self._a[key], self._mem)

    def reshape(self, *shape: Any, order: str = "C") -> ndarray:
        r = self._a.reshape(*shape, order=order)
        if not np.shares_memory(r, self._a):
            return _new(r)
        return ndarray(r, self._mem)

    def view(self, dtype: Any) -> ndarray:
        return ndarray(self._a.view(dtype), self._mem)

    def transpose(self, *axes: int) -> ndarray:
        return ndarray(self._a.transpose(*axes), self._mem)

    def astype(self, dtype: Any, order: str = "K", copy: bool = True) -> ndarray:
        if not copy and np.dtype(dtype) == self.dtype:
            return self
        return _new(self._a.astype(dtype, order=order))

    def copy(self) -> ndarray:
        return _new(self._a.copy())

    def get(self, stream: Any = None, out: np.ndarray | None = None) -> np.ndarray:
        if out is None:
            return self._a.copy()
        if out.shape != self.shape or out.dtype != self.dtype:
            raise ValueError(f"get(out=): {out.shape} {out.dtype} for {self.shape} {self.dtype}")
        np.copyto(out, self._a)
        return out

    def set(self, arr: np.ndarray, stream: Any = None) -> None:
        if not isinstance(arr, np.ndarray) or arr.shape != self.shape or arr.dtype != self.dtype:
            raise ValueError(f"set(): {getattr(arr, 'shape', None)} for {self.shape} {self.dtype}")
        np.copyto(self._a, arr)

    # element-wise arithmetic: new arrays, or in place for the augmented forms
    def _binary(self, other: Any, op: Any) -> ndarray:
        return _new(np.asarray(op(self._a, _operand(other))))

    def __add__(self, o: Any) -> ndarray:
        return self._binary(o, np.add)

    def __sub__(self, o: Any) -> ndarray:
        return self._binary(o, np.subtract)

    def __mul__(self, o: Any) -> ndarray:
        return self._binary(o, np.multiply)

    __radd__, __rmul__ = __add__, __mul__

    def __iadd__(self, o: Any) -> ndarray:
        np.add(self._a, _operand(o), out=self._a)
        return self

    def __imul__(self, o: Any) -> ndarray:
        np.multiply(self._a, _operand(o), out=self._a)
        return self


def _operand(o: Any) -> Any:
    if isinstance(o, ndarray):
        return o._a
    if isinstance(o, np.ndarray) and o.ndim > 0:
        raise TypeError(
            "mixing a host numpy array with a device array; move it with asarray() first"
        )
    return o


def _new(host: np.ndarray) -> ndarray:
    """A fresh device allocation holding a copy of host (C order)."""
    mem = _Allocation(host.nbytes)
    a = (
        mem.buf.view(host.dtype).reshape(host.shape)
        if host.size
        else np.empty(host.shape, host.dtype)
    )
    if host.size:
        np.copyto(a, host)
    return ndarray(a, mem)


def empty(shape: Any, dtype: Any = float32, order: str = "C") -> ndarray:
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    dt = np.dtype(dtype)
    mem = _Allocation(int(np.prod(shape, dtype=np.int64)) * dt.itemsize)
    return ndarray(mem.buf.view(dt).reshape(shape), mem)


def zeros(shape: Any, dtype: Any = float32) -> ndarray:
    a = empty(shape, dtype)
    a._a[...] = 0
    return a


def empty_like(x: ndarray, dtype: Any = None) -> ndarray:
    return empty(x.shape, dtype or x.dtype)


def asarray(a: Any, dtype: Any = None) -> ndarray:
    if isinstance(a, ndarray):
        return a if dtype is None or np.dtype(dtype) == a.dtype else a.astype(dtype)
    return _new(np.ascontiguousarray(a, dtype=dtype))


def ascontiguousarray(a: Any, dtype: Any = None) -> ndarray:
    if not isinstance(a, ndarray):
        raise TypeError(
            f"ascontiguousarray of a host {type(a).__name__}; use asarray() to copy it to the device"
        )
    if a.flags.c_contiguous and (dtype is None or np.dtype(dtype) == a.dtype):
        return a
    return _new(np.ascontiguousarray(a._a, dtype=dtype))


def matmul(a: ndarray, b: ndarray, out: ndarray | None = None) -> ndarray:
    """float32 matmul as cuBLAS SGEMM would give it (to its own rounding; float64 here)."""
    r = (a._a.astype(np.float64) @ b._a.astype(np.float64)).astype(np.result_type(a.dtype, b.dtype))
    if out is None:
        return _new(r)
    np.copyto(out._a, r)
    return out


# --- kernels --------------------------------------------------------------------------------
class RawFunction:
    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(
        self, grid: Any, block: Any, args: tuple, shared_mem: int = 0, stream: Any = None
    ) -> None:
        emu = emulator()
        sig = emu.kernels.get(self.name)
        if sig is None:
            raise CUDARuntimeError(f"no kernel {self.name}")
        pointers = []
        for p, a in zip(sig.params, args, strict=False):
            if not p.is_pointer:
                continue
            if not isinstance(a, ndarray):
                raise TypeError(
                    f"{self.name}: parameter {p.name} ({p.ctype}) needs a device array, got {type(a).__name__}"
                )
            POOL.find(a.data.ptr, 0, f"{self.name}({p.name})")  # a live allocation
            pointers.append(a.data.ptr)
        emu.launch(self.name, grid, block, tuple(args), pointers, shared_mem)
        for p, a in zip(sig.params, args, strict=False):
            if p.is_pointer and not a._mem.guards_intact():
                raise CUDARuntimeError(
                    f"{self.name}: wrote out of bounds of the allocation passed as {p.name} "
                    f"({a._mem.nbytes} bytes; within {_GUARD} bytes before or after it)"
                )


class RawModule:
    def __init__(self, code: str = "", options: tuple[str, ...] = (), **_: Any) -> None:
        self.code, self.options = code, options

    def compile(self) -> None:
        emulator()  # builds the emulated kernels (cached on disk by source hash)

    def get_function(self, name: str) -> RawFunction:
        if name not in emulator().kernels:
            raise CUDARuntimeError(f"named symbol not found: {name}")
        return RawFunction(name)


# --- streams, events, devices, pinned memory ----------------------------------------------
class Event:
    def synchronize(self) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    done = True


class Stream:
    def record(self, event: Event | None = None) -> Event:
        return event or Event()

    def synchronize(self) -> None:
        pass

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


_STREAM = Stream()


def get_current_stream() -> Stream:
    return _STREAM


class Device:
    def __init__(self, device: int = 0) -> None:
        if device != 0:
            raise CUDARuntimeError(f"cudaErrorInvalidDevice: invalid device ordinal {device}")
        self.id = device

    def use(self) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


class PinnedMemory(bytearray):
    """Page-locked host memory stand-in (counted, so tests can see the staging buffers)."""


def alloc_pinned_memory(nbytes: int) -> PinnedMemory:
    PINNED_BYTES[0] += nbytes
    return PinnedMemory(nbytes)


def get_cublas_handle() -> int:
    return 1


# --- cuBLAS ---------------------------------------------------------------------------------
_R32F, _R16F = 0, 2
_DT = {_R32F: np.dtype(np.float32), _R16F: np.dtype(np.float16)}
GEMM_CALLS = [0]


def setPointerMode(handle: int, mode: int) -> None:  # noqa: N802 - CuPy's name
    if mode != 0:
        raise CUDARuntimeError("the stand-in supports CUBLAS_POINTER_MODE_HOST only")


def _host_f32(ptr: int) -> float:
    return ctypes.c_float.from_address(ptr).value


def _colmajor(ptr: int, dtype: int, rows: int, cols: int, ld: int, what: str) -> np.ndarray:
    """A (rows, cols) column-major matrix at device address ptr with leading dimension ld."""
    if ld < max(1, rows):
        raise CUDARuntimeError(f"cublas: {what} has ld {ld} < rows {rows}")
    dt = _DT[dtype]
    nbytes = ((cols - 1) * ld + rows) * dt.itemsize if rows and cols else 0
    buf, off = POOL.find(ptr, nbytes, f"cublas operand {what}")
    if off % dt.itemsize:
        raise CUDARuntimeError(f"cublas: {what} is misaligned for {dt}")
    return np.ndarray(
        (rows, cols), dt, buffer=buf, offset=off, strides=(dt.itemsize, ld * dt.itemsize)
    )


def _gemm_one(ta: int, tb: int, m: int, n: int, k: int, alpha: float, a: int, at: int, lda: int,
              b: int, bt: int, ldb: int, beta: float, c: int, ct: int, ldc: int) -> None:  # fmt: skip
    A = _colmajor(a, at, *((m, k) if ta == 0 else (k, m)), lda, "A")
    B = _colmajor(b, bt, *((k, n) if tb == 0 else (n, k)), ldb, "B")
    C = _colmajor(c, ct, m, n, ldc, "C")
    opA = A.astype(np.float64) if ta == 0 else A.T.astype(np.float64)
    opB = B.astype(np.float64) if tb == 0 else B.T.astype(np.float64)
    r = alpha * (opA @ opB)
    if beta != 0.0:
        r += beta * C.astype(np.float64)
    C[...] = r.astype(C.dtype)
    GEMM_CALLS[0] += 1


def _check_types(at: int, bt: int, ct: int, compute: int) -> None:
    if at not in _DT or bt not in _DT or ct not in _DT or compute != 68:  # CUBLAS_COMPUTE_32F
        raise CUDARuntimeError(f"cublas: unsupported types A={at} B={bt} C={ct} compute={compute}")


def gemmEx(handle: int, ta: int, tb: int, m: int, n: int, k: int, alpha: int, a: int, at: int, lda: int,  # noqa: N802
           b: int, bt: int, ldb: int, beta: int, c: int, ct: int, ldc: int, compute: int, algo: int) -> None:  # fmt: skip
    _check_types(at, bt, ct, compute)
    _gemm_one(
        ta, tb, m, n, k, _host_f32(alpha), a, at, lda, b, bt, ldb, _host_f32(beta), c, ct, ldc
    )


def gemmStridedBatchedEx(handle: int, ta: int, tb: int, m: int, n: int, k: int, alpha: int,  # noqa: N802
                         a: int, at: int, lda: int, sa: int, b: int, bt: int, ldb: int, sb: int,
                         beta: int, c: int, ct: int, ldc: int, sc: int, batch: int,
                         compute: int, algo: int) -> None:  # fmt: skip
    _check_types(at, bt, ct, compute)
    al, be = _host_f32(alpha), _host_f32(beta)
    ea, eb, ec = _DT[at].itemsize, _DT[bt].itemsize, _DT[ct].itemsize
    for i in range(batch):
        _gemm_one(
            ta,
            tb,
            m,
            n,
            k,
            al,
            a + i * sa * ea,
            at,
            lda,
            b + i * sb * eb,
            bt,
            ldb,
            be,
            c + i * sc * ec,
            ct,
            ldc,
        )


# --- the runtime -----------------------------------------------------------------------------
def getDeviceCount() -> int:  # noqa: N802
    return 1


def memGetInfo() -> tuple[int, int]:  # noqa: N802
    """(free, total) of the device, which knows nothing of the pool's limit (as in CUDA): a
    limit set in a test is an out-of-memory the planner did not foresee."""
    return POOL.total - POOL.used, POOL.total


def getDeviceProperties(device: int) -> dict[str, Any]:  # noqa: N802
    return {
        "name": b"emulated GPU (SIMT emulator on the CPU)",
        "totalGlobalMem": POOL.total,
        "major": 9,
        "minor": 0,
    }


# --- installation as `cupy` -------------------------------------------------------------------
def _module(name: str, **attrs: Any) -> types.ModuleType:
    m = types.ModuleType(name)
    m.__dict__.update(attrs)
    return m


def _modules() -> dict[str, types.ModuleType]:
    this = sys.modules[__name__]
    runtime = _module("cupy.cuda.runtime", CUDARuntimeError=CUDARuntimeError, getDeviceCount=getDeviceCount,
                      memGetInfo=memGetInfo, getDeviceProperties=getDeviceProperties)  # fmt: skip
    memory = _module("cupy.cuda.memory", OutOfMemoryError=OutOfMemoryError, MemoryPool=MemoryPool)
    compiler = _module("cupy.cuda.compiler", CompileException=CompileException)
    device = _module("cupy.cuda.device", get_cublas_handle=get_cublas_handle, Device=Device)
    cublas = _module("cupy.cuda.cublas", setPointerMode=setPointerMode, gemmEx=gemmEx,
                     gemmStridedBatchedEx=gemmStridedBatchedEx)  # fmt: skip
    cuda = _module("cupy.cuda", runtime=runtime, memory=memory, compiler=compiler, device=device,
                   cublas=cublas, Device=Device, Stream=Stream, Event=Event,
                   get_current_stream=get_current_stream, alloc_pinned_memory=alloc_pinned_memory)  # fmt: skip
    cuda.__path__ = []  # a package, so `from cupy.cuda import cublas` resolves
    this.cuda = cuda
    return {"cupy": this, "cupy.cuda": cuda, "cupy.cuda.runtime": runtime, "cupy.cuda.memory": memory,
            "cupy.cuda.compiler": compiler, "cupy.cuda.device": device, "cupy.cuda.cublas": cublas}  # fmt: skip


_SAVED: dict[str, Any] = {}


def install() -> None:
    """Make `import cupy` give this stand-in; forget any module that bound the real one."""
    for name, mod in _modules().items():
        _SAVED.setdefault(name, sys.modules.get(name))
        sys.modules[name] = mod
    sys.modules.pop("hybridllm.backends.cuda", None)


def uninstall() -> None:
    for name, mod in _SAVED.items():
        if mod is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = mod
    _SAVED.clear()
    sys.modules.pop("hybridllm.backends.cuda", None)


@contextmanager
def installed() -> Iterator[None]:
    install()
    try:
        yield
    finally:
        uninstall()


__path__: list[str] = []  # `cupy` is a package
