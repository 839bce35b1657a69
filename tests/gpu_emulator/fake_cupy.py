"""A stand-in for exactly the CuPy surface `hybridllm/backends/cuda.py` uses (tests only).

Device arrays are host memory owned by a pretend device: they refuse implicit conversion to
numpy (as CuPy's do: `.get()` is the only way out), allocate through a pool whose limit can be
set (out of memory raises `cuda.memory.OutOfMemoryError`), and are 256-byte aligned like
cudaMalloc's. `RawModule(...).get_function(name)` launches the real kernel source through the
SIMT emulator (build.py); pointer arguments must be live device arrays. cuBLAS `gemmEx` reads
its operands from raw device pointers with their leading dimensions, after checking every
operand's byte range lies inside one live allocation, and computes in float64 from the f16
inputs (then rounds to f32).

Device work (launches, cuBLAS calls, element-wise operators, copies) is submitted to a stream:
the current one (`with stream:`), a launch's `stream=`, cuBLAS's `setStream`. Off capture it
runs at once. While a stream captures (`begin_capture` .. `end_capture` -> `Graph`), its work
is recorded and not run, as CUDA does: kernels with their pointer and scalar arguments as given
at capture, cuBLAS calls with their operand addresses and host alpha/beta values, copies and
element-wise operators on the arrays they were given. `Graph.launch` replays that work,
checking first that every address it touches is still device memory (a live allocation, or one
cached by a private `MemoryPool`, which keeps what is freed, as CuPy's pools do). What CUDA
refuses during a capture is refused here: a synchronous device-to-host copy, synchronizing the
capturing stream, a copy from pageable host memory, and any work on the legacy default stream
while a blocking stream captures (cudaErrorStreamCaptureImplicit).

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


class _Block:
    """Device memory of one allocation: an aligned slice of a host buffer with a canary of
    _GUARD bytes on each side, which kernel launches check afterwards."""

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

    def guards_intact(self) -> bool:
        return bool((self.before == _CANARY).all() and (self.after == _CANARY).all())


class _Allocation:
    """One device allocation from the current allocator's pool, registered while alive."""

    def __init__(self, nbytes: int) -> None:
        pool = _ALLOCATOR[-1] if _ALLOCATOR else POOL
        self.charged = (max(nbytes, 1) + _POOL_ROUND - 1) // _POOL_ROUND * _POOL_ROUND
        self.block = pool._take(nbytes)
        self.buf, self.ptr, self.nbytes = self.block.buf, self.block.ptr, nbytes
        pool._charge(self)
        weakref.finalize(self, pool._release, self.block, self.charged)

    def guards_intact(self) -> bool:
        return self.block.guards_intact()


_DEVICE_BYTES = 8 << 30  # the pretend device's memory
_PRIVATE_POOLS: weakref.WeakSet[MemoryPool] = weakref.WeakSet()


class MemoryPool:
    """A CuPy memory pool, reduced to what the tests need: a limit and the bytes in use.

    The default pool (POOL) gives freed memory straight back, so a freed address is no device
    memory any more and anything that still uses it fails. A pool made by the caller (for
    `using_allocator`, as a CUDA graph's private pool) keeps every block it handed out, live or
    freed, and hands a freed block of the same size out again, as CuPy's pools do: its memory
    stays valid while the pool lives.
    """

    def __init__(self, total: int = _DEVICE_BYTES, *, keeps_freed: bool = True) -> None:
        self.total = total
        self.limit = 0  # 0: no limit (CuPy's convention)
        self.live: dict[int, tuple[int, weakref.ref[_Allocation]]] = {}
        self.used = 0
        self.peak = 0
        self.keeps_freed = keeps_freed
        self.cached: dict[int, list[_Block]] = {}  # size -> freed blocks (keeps_freed)
        self.held: dict[int, _Block] = {}  # address -> every block handed out (keeps_freed)
        if keeps_freed:
            _PRIVATE_POOLS.add(self)

    def _cap(self) -> int:
        return min(self.total, self.limit) if self.limit else self.total

    def _take(self, nbytes: int) -> _Block:
        free = self.cached.get(nbytes)
        if free:
            return free.pop()
        block = _Block(nbytes)
        if self.keeps_freed:
            self.held[block.ptr] = block
        return block

    def _charge(self, a: _Allocation) -> None:
        if self.used + a.charged > self._cap() or _device_used() + a.charged > _DEVICE_BYTES:
            if self.keeps_freed:
                self.cached.setdefault(a.nbytes, []).append(a.block)
            raise OutOfMemoryError(a.nbytes, self.used, self._cap())
        self.used += a.charged
        self.peak = max(self.peak, self.used)
        self.live[a.ptr] = (a.nbytes, weakref.ref(a))

    def _release(self, block: _Block, charged: int) -> None:
        self.used -= charged
        self.live.pop(block.ptr, None)
        if self.keeps_freed:
            self.cached.setdefault(block.nbytes, []).append(block)

    def malloc(self, size: int) -> _Allocation:
        _ALLOCATOR.append(self)
        try:
            return _Allocation(size)
        finally:
            _ALLOCATOR.pop()

    def held_bytes(self) -> int:
        return sum(b.buf.nbytes for b in self.held.values())

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
        """(the allocation's bytes, offset of ptr) when [ptr, ptr+nbytes) lies in one live
        allocation of this pool, or in a block it keeps; else CUDARuntimeError."""
        live = [(base, size, ref) for base, (size, ref) in list(self.live.items())]
        held = [(base, b.nbytes, lambda b=b: b) for base, b in list(self.held.items())]
        for base, size, ref in live + held:
            mem = ref() if base <= ptr < base + max(size, 1) or (nbytes == 0 and ptr == base + size) else None
            if mem is not None:
                if ptr + nbytes > base + size:
                    raise CUDARuntimeError(
                        f"{what}: {nbytes} bytes at offset {ptr - base} overrun an allocation of {size}"
                    )
                return mem.buf, ptr - base
        raise CUDARuntimeError(f"{what}: address {ptr:#x} is not in any live device allocation")


POOL = MemoryPool(keeps_freed=False)
_ALLOCATOR: list[MemoryPool] = []  # pools of the `using_allocator` contexts, innermost last


def _device_used() -> int:
    return POOL.used + sum(p.held_bytes() for p in _PRIVATE_POOLS)


def _find(ptr: int, nbytes: int, what: str) -> tuple[np.ndarray, int]:
    """find() in the default pool, then in the private pools."""
    error = None
    for pool in (POOL, *_PRIVATE_POOLS):
        try:
            return pool.find(ptr, nbytes, what)
        except CUDARuntimeError as exc:
            error = error or exc
    raise error  # type: ignore[misc]


@contextmanager
def using_allocator(allocator: Any = None) -> Iterator[None]:
    """Allocations inside come from `allocator`, which must be a MemoryPool's malloc here."""
    pool = getattr(allocator, "__self__", None)
    if not isinstance(pool, MemoryPool):
        raise CUDARuntimeError("the stand-in's using_allocator takes a MemoryPool's malloc only")
    _ALLOCATOR.append(pool)
    try:
        yield
    finally:
        _ALLOCATOR.pop()
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

    def __setitem__(self, key: Any, value: Any) -> None:
        dst, src = self._a[key], _operand(value)
        _submit("setitem", lambda: np.copyto(dst, src), [dst, src])

    def reshape(self, *shape: Any, order: str = "C") -> ndarray:
        r = self._a.reshape(*shape, order=order)
        if not np.shares_memory(r, self._a):  # a copy: a kernel on the stream
            out = empty(r.shape, r.dtype)
            src, dst = self._a, out._a  # work holds memory, never the arrays (they may be freed)
            _submit("reshape copy", lambda: np.copyto(dst, src.reshape(*shape, order=order)), [src, dst])
            return out
        return ndarray(r, self._mem)

    def view(self, dtype: Any) -> ndarray:
        return ndarray(self._a.view(dtype), self._mem)

    def transpose(self, *axes: int) -> ndarray:
        return ndarray(self._a.transpose(*axes), self._mem)

    def astype(self, dtype: Any, order: str = "K", copy: bool = True) -> ndarray:
        if not copy and np.dtype(dtype) == self.dtype:
            return self
        return _converted(self._a, dtype, "C" if order == "K" else order)

    def copy(self) -> ndarray:
        return _converted(self._a, self.dtype, "C")

    def get(self, stream: Any = None, out: np.ndarray | None = None) -> np.ndarray:
        _synchronous(stream or get_current_stream(), "a device-to-host copy (get)")
        if out is None:
            return self._a.copy()
        if out.shape != self.shape or out.dtype != self.dtype:
            raise ValueError(f"get(out=): {out.shape} {out.dtype} for {self.shape} {self.dtype}")
        np.copyto(out, self._a)
        return out

    def set(self, arr: np.ndarray, stream: Any = None) -> None:
        if not isinstance(arr, np.ndarray) or arr.shape != self.shape or arr.dtype != self.dtype:
            raise ValueError(f"set(): {getattr(arr, 'shape', None)} for {self.shape} {self.dtype}")
        dst = self._a
        _submit_copy_from_host(stream or get_current_stream(), "set", dst, arr)

    # element-wise arithmetic: new arrays, or in place for the augmented forms
    def _binary(self, other: Any, op: Any) -> ndarray:
        a, b = self._a, _operand(other)
        out = empty(np.broadcast_shapes(a.shape, np.shape(b)), np.result_type(a, b))
        r = out._a
        _submit(op.__name__, lambda: np.copyto(r, op(a, b)), [a, b, r])
        return out

    def _inplace(self, other: Any, op: Any) -> ndarray:
        a, b = self._a, _operand(other)
        _submit(f"in-place {op.__name__}", lambda: op(a, b, out=a), [a, b])
        return self

    def __add__(self, o: Any) -> ndarray:
        return self._binary(o, np.add)

    def __sub__(self, o: Any) -> ndarray:
        return self._binary(o, np.subtract)

    def __mul__(self, o: Any) -> ndarray:
        return self._binary(o, np.multiply)

    __radd__, __rmul__ = __add__, __mul__

    def __iadd__(self, o: Any) -> ndarray:
        return self._inplace(o, np.add)

    def __imul__(self, o: Any) -> ndarray:
        return self._inplace(o, np.multiply)


def _operand(o: Any) -> Any:
    if isinstance(o, ndarray):
        return o._a
    if isinstance(o, np.ndarray) and o.ndim > 0:
        raise TypeError(
            "mixing a host numpy array with a device array; move it with asarray() first"
        )
    return o


def _converted(src: np.ndarray, dtype: Any, order: str) -> ndarray:
    """A new device array holding src converted to dtype (a kernel on the current stream)."""
    out = empty(src.shape, dtype, order=order)
    dst = out._a
    _submit("astype", lambda: np.copyto(dst, src, casting="unsafe"), [src, dst])
    return out


def empty(shape: Any, dtype: Any = float32, order: str = "C") -> ndarray:
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    dt = np.dtype(dtype)
    mem = _Allocation(int(np.prod(shape, dtype=np.int64)) * dt.itemsize)
    flat = mem.buf.view(dt) if mem.nbytes else np.empty(0, dt)
    a = flat.reshape(shape[::-1]).T if order == "F" else flat.reshape(shape)
    return ndarray(a, mem)


def zeros(shape: Any, dtype: Any = float32) -> ndarray:
    a = empty(shape, dtype)
    dst = a._a
    _submit("memset", lambda: dst.fill(0), [dst])
    return a


def empty_like(x: ndarray, dtype: Any = None) -> ndarray:
    return empty(x.shape, dtype or x.dtype)


def asarray(a: Any, dtype: Any = None) -> ndarray:
    if isinstance(a, ndarray):
        return a if dtype is None or np.dtype(dtype) == a.dtype else a.astype(dtype)
    host = np.ascontiguousarray(a, dtype=dtype)
    out = empty(host.shape, host.dtype)
    _submit_copy_from_host(get_current_stream(), "asarray", out._a, host)
    return out


def ascontiguousarray(a: Any, dtype: Any = None) -> ndarray:
    if not isinstance(a, ndarray):
        raise TypeError(
            f"ascontiguousarray of a host {type(a).__name__}; use asarray() to copy it to the device"
        )
    if a.flags.c_contiguous and (dtype is None or np.dtype(dtype) == a.dtype):
        return a
    return _converted(a._a, dtype or a.dtype, "C")


def copyto(dst: ndarray, src: ndarray) -> None:
    """dst[...] = src between device arrays (a kernel on the current stream)."""
    d, s = dst._a, _operand(src)
    _submit("copyto", lambda: np.copyto(d, s), [d, s])


def matmul(a: ndarray, b: ndarray, out: ndarray | None = None) -> ndarray:
    """float32 matmul as cuBLAS SGEMM would give it (to its own rounding; float64 here)."""
    x, y = a._a, b._a
    if out is None:
        out = empty(x.shape[:-1] + y.shape[-1:], np.result_type(a.dtype, b.dtype))
    r = out._a
    _submit("matmul", lambda: np.copyto(r, x.astype(np.float64) @ y.astype(np.float64), casting="unsafe"), [x, y, r])
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
        pointers, guards = [], []
        for p, a in zip(sig.params, args, strict=False):
            if not p.is_pointer:
                continue
            if not isinstance(a, ndarray):
                raise TypeError(
                    f"{self.name}: parameter {p.name} ({p.ctype}) needs a device array, got {type(a).__name__}"
                )
            _find(a.data.ptr, 0, f"{self.name}({p.name})")  # a live allocation
            pointers.append(a.data.ptr)
            guards.append((p.name, a._mem.block))
        launch = emu.prepare(self.name, grid, block, tuple(args), pointers, shared_mem)

        def run() -> None:
            launch()
            for name, mem in guards:
                if not mem.guards_intact():
                    raise CUDARuntimeError(
                        f"{self.name}: wrote out of bounds of the allocation passed as {name} "
                        f"({mem.nbytes} bytes; within {_GUARD} bytes before or after it)"
                    )

        (stream or get_current_stream()).submit(_Work(self.name, run, pointers))


class RawModule:
    def __init__(self, code: str = "", options: tuple[str, ...] = (), **_: Any) -> None:
        self.code, self.options = code, options

    def compile(self) -> None:
        emulator()  # builds the emulated kernels (cached on disk by source hash)

    def get_function(self, name: str) -> RawFunction:
        if name not in emulator().kernels:
            raise CUDARuntimeError(f"named symbol not found: {name}")
        return RawFunction(name)


# --- streams, capture, graphs, events -----------------------------------------------------------
class _Work:
    """One piece of device work: `run` does it; `addresses` are the device addresses it
    touches, which a graph replay checks are still device memory before running it."""

    def __init__(self, what: str, run: Any, addresses: list[int]) -> None:
        self.what, self.run, self.addresses = what, run, addresses

    def replay(self) -> None:
        for ptr in self.addresses:
            _find(ptr, 0, f"graph replay: {self.what}, captured with the address {ptr:#x}, which was freed since")
        self.run()


class Graph:
    """Work captured on a stream; launch() replays it in order, with the arguments of capture."""

    def __init__(self, work: list[_Work]) -> None:
        self.work = work
        self.launches = 0

    def launch(self, stream: Any = None) -> None:
        (stream or get_current_stream()).submit(_Work("graph launch", self._replay, []))

    def _replay(self) -> None:
        for work in self.work:
            work.replay()
        self.launches += 1

    def upload(self, stream: Any = None) -> None:
        pass


class Event:
    def synchronize(self) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    done = True


_STREAMS: weakref.WeakValueDictionary[int, Stream] = weakref.WeakValueDictionary()


class Stream:
    """A CUDA stream; `with stream:` makes it current. ptr 0 is the legacy default stream."""

    _next_ptr = 0x10

    def __init__(self, null: bool = False, non_blocking: bool = False, ptds: bool = False, priority: int | None = None) -> None:
        self.ptr = 0 if null else Stream._next_ptr
        if not null:
            Stream._next_ptr += 0x10
        self.non_blocking = non_blocking
        self.captured: list[_Work] | None = None  # the work recorded while capturing
        if self.ptr:
            _STREAMS[self.ptr] = self

    def submit(self, work: _Work) -> None:
        """Run work now, or record it while this stream captures."""
        if self.captured is not None:
            self.captured.append(work)
            return
        if self.ptr == 0:
            capturing = [s for s in _CAPTURING if not s.non_blocking]
            if capturing:
                raise CUDARuntimeError(
                    f"cudaErrorStreamCaptureImplicit: {work.what} on the legacy default stream while "
                    "a blocking stream captures (work meant for the graph belongs on its stream)"
                )
        work.run()

    def begin_capture(self, mode: int | None = None) -> None:
        if self.ptr == 0:
            raise RuntimeError("cannot capture on the default (legacy) stream")
        if self.captured is not None:
            raise CUDARuntimeError("cudaErrorIllegalState: the stream is capturing already")
        self.captured = []
        _CAPTURING.append(self)

    def end_capture(self) -> Graph:
        if self.captured is None:
            raise CUDARuntimeError("cudaErrorIllegalState: the stream is not capturing")
        work, self.captured = self.captured, None
        _CAPTURING.remove(self)
        return Graph(work)

    def is_capturing(self) -> bool:
        return self.captured is not None

    def record(self, event: Event | None = None) -> Event:
        return event or Event()

    def synchronize(self) -> None:
        _synchronous(self, "synchronizing the stream")

    def __enter__(self) -> Stream:
        _CURRENT.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        _CURRENT.pop()


Stream.null = Stream(null=True)  # type: ignore[attr-defined]
_CURRENT: list[Stream] = []  # streams of the `with stream:` blocks, innermost last
_CAPTURING: list[Stream] = []


def get_current_stream() -> Stream:
    return _CURRENT[-1] if _CURRENT else Stream.null  # type: ignore[attr-defined]


def _synchronous(stream: Stream, what: str) -> None:
    """What waits for the device may not happen on (or, from the legacy stream, beside) a capture."""
    if stream.is_capturing() or (stream.ptr == 0 and any(not s.non_blocking for s in _CAPTURING)):
        raise CUDARuntimeError(f"cudaErrorStreamCaptureUnsupported: {what} while the stream captures")


def _submit(what: str, run: Any, arrays: list[Any]) -> None:
    """Device work on the current stream touching these (numpy views of device) arrays."""
    addresses = [a.ctypes.data for a in arrays if isinstance(a, np.ndarray) and a.size]
    get_current_stream().submit(_Work(what, run, addresses))


def _pinned(host: np.ndarray) -> bool:
    base = host
    while isinstance(base, np.ndarray):
        base = base.base
    return isinstance(base, PinnedMemory)


def _submit_copy_from_host(stream: Stream, what: str, dst: np.ndarray, host: np.ndarray) -> None:
    """A host-to-device copy; captured only from pinned memory, read when the graph runs."""
    if stream.is_capturing() and not _pinned(host):
        raise CUDARuntimeError(
            f"cudaErrorStreamCaptureUnsupported: {what} copies from pageable host memory while the stream captures"
        )
    stream.submit(_Work(f"{what} (host to device)", lambda: np.copyto(dst, host), [dst.ctypes.data] if dst.size else []))


class Device:
    def __init__(self, device: int = 0) -> None:
        if device != 0:
            raise CUDARuntimeError(f"cudaErrorInvalidDevice: invalid device ordinal {device}")
        self.id = device

    def use(self) -> None:
        pass

    def synchronize(self) -> None:
        if _CAPTURING:
            raise CUDARuntimeError("cudaErrorStreamCaptureUnsupported: device synchronize while a stream captures")

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
_HANDLE_STREAM: dict[int, int] = {}  # cuBLAS handle -> stream ptr (setStream; 0 by default)


def setPointerMode(handle: int, mode: int) -> None:  # noqa: N802 - CuPy's name
    if mode != 0:
        raise CUDARuntimeError("the stand-in supports CUBLAS_POINTER_MODE_HOST only")


def setStream(handle: int, stream_ptr: int) -> None:  # noqa: N802
    _HANDLE_STREAM[handle] = stream_ptr


def _handle_stream(handle: int) -> Stream:
    """The stream a cuBLAS call on `handle` goes to: the one set, not the current one."""
    ptr = _HANDLE_STREAM.get(handle, 0)
    stream = Stream.null if ptr == 0 else _STREAMS.get(ptr)  # type: ignore[attr-defined]
    if stream is None:
        raise CUDARuntimeError(f"cublas: the handle's stream {ptr:#x} no longer exists")
    return stream


def _host_f32(ptr: int) -> float:
    return ctypes.c_float.from_address(ptr).value


def _colmajor(ptr: int, dtype: int, rows: int, cols: int, ld: int, what: str) -> np.ndarray:
    """A (rows, cols) column-major matrix at device address ptr with leading dimension ld."""
    if ld < max(1, rows):
        raise CUDARuntimeError(f"cublas: {what} has ld {ld} < rows {rows}")
    dt = _DT[dtype]
    nbytes = ((cols - 1) * ld + rows) * dt.itemsize if rows and cols else 0
    buf, off = _find(ptr, nbytes, f"cublas operand {what}")
    if off % dt.itemsize:
        raise CUDARuntimeError(f"cublas: {what} is misaligned for {dt}")
    return np.ndarray(
        (rows, cols), dt, buffer=buf, offset=off, strides=(dt.itemsize, ld * dt.itemsize)
    )


def _gemm_one(ta: int, tb: int, m: int, n: int, k: int, alpha: float, a: int, at: int, lda: int,
              b: int, bt: int, ldb: int, beta: float, c: int, ct: int, ldc: int) -> Any:  # fmt: skip
    """One GEMM with its operands checked and resolved now -> the computation, to run later."""
    A = _colmajor(a, at, *((m, k) if ta == 0 else (k, m)), lda, "A")
    B = _colmajor(b, bt, *((k, n) if tb == 0 else (n, k)), ldb, "B")
    C = _colmajor(c, ct, m, n, ldc, "C")

    def run() -> None:
        opA = A.astype(np.float64) if ta == 0 else A.T.astype(np.float64)
        opB = B.astype(np.float64) if tb == 0 else B.T.astype(np.float64)
        r = alpha * (opA @ opB)
        if beta != 0.0:
            r += beta * C.astype(np.float64)
        C[...] = r.astype(C.dtype)
        GEMM_CALLS[0] += 1

    return run


def _check_types(at: int, bt: int, ct: int, compute: int) -> None:
    if at not in _DT or bt not in _DT or ct not in _DT or compute != 68:  # CUBLAS_COMPUTE_32F
        raise CUDARuntimeError(f"cublas: unsupported types A={at} B={bt} C={ct} compute={compute}")


def gemmEx(handle: int, ta: int, tb: int, m: int, n: int, k: int, alpha: int, a: int, at: int, lda: int,  # noqa: N802
           b: int, bt: int, ldb: int, beta: int, c: int, ct: int, ldc: int, compute: int, algo: int) -> None:  # fmt: skip
    """alpha and beta are read now (host pointer mode: a captured call keeps their values)."""
    _check_types(at, bt, ct, compute)
    run = _gemm_one(ta, tb, m, n, k, _host_f32(alpha), a, at, lda, b, bt, ldb, _host_f32(beta), c, ct, ldc)
    _handle_stream(handle).submit(_Work("cublas gemmEx", run, [a, b, c]))


# --- the runtime -----------------------------------------------------------------------------
def getDeviceCount() -> int:  # noqa: N802
    return 1


def memGetInfo() -> tuple[int, int]:  # noqa: N802
    """(free, total) of the device, which knows nothing of the pool's limit (as in CUDA): a
    limit set in a test is an out-of-memory the planner did not foresee."""
    return _DEVICE_BYTES - _device_used(), _DEVICE_BYTES


def getDeviceProperties(device: int) -> dict[str, Any]:  # noqa: N802
    return {
        "name": b"emulated GPU (SIMT emulator on the CPU)",
        "totalGlobalMem": _DEVICE_BYTES,
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
    memory = _module("cupy.cuda.memory", OutOfMemoryError=OutOfMemoryError, MemoryPool=MemoryPool,
                     using_allocator=using_allocator)  # fmt: skip
    compiler = _module("cupy.cuda.compiler", CompileException=CompileException)
    device = _module("cupy.cuda.device", get_cublas_handle=get_cublas_handle, Device=Device)
    cublas = _module("cupy.cuda.cublas", setPointerMode=setPointerMode, setStream=setStream, gemmEx=gemmEx)  # fmt: skip
    cuda = _module("cupy.cuda", runtime=runtime, memory=memory, compiler=compiler, device=device,
                   cublas=cublas, Device=Device, Stream=Stream, Event=Event, Graph=Graph,
                   MemoryPool=MemoryPool, using_allocator=using_allocator,
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
