"""Quantized GGML kernels: dequantize, matmul (x @ W.T) and row gathers on raw GGUF bytes.

Two backends implement the same low-level functions:

* ``"cpp"``: the C++ core ``hybridllm._core`` (AVX2/FMA, OpenMP), built by setup.py;
* ``"numba"``: ``hybridllm.kernels.numba_kernels``, the fallback when the core is not built.

``backend=None`` picks the best available one; the environment variable ``HYBRIDLLM_KERNELS``
(``cpp`` or ``numba``) overrides that default. This module validates every argument (shapes,
sizes, dtypes) so that the backends never see inputs that could crash them or be silently
misread; the backends then work on the caller's memory without copies (``raw`` may be a view
of a memory-mapped GGUF file).

Shapes follow numpy: a weight of shape ``(rows, cols)`` is stored as ``rows`` rows of
``cols`` elements, each row quantized along ``cols`` (``cols`` a multiple of the type's block).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from importlib.machinery import EXTENSION_SUFFIXES
from types import ModuleType

import numpy as np

from .._native import CORE_ENV
from .._native import CORE_ERROR as _CORE_ERROR
from .._native import core as _core
from .._user_cache import numba_cache_dir, numba_cache_present
from ..errors import ConfigError, HybridLLMError
from ._types import SUPPORTED, TypeSpec, resolve_qtype

__all__ = [
    "SUPPORTED",
    "TypeSpec",
    "available_backends",
    "cpu_features",
    "default_backend",
    "default_threads",
    "dequantize",
    "get_rows",
    "matmul",
    "resolve_qtype",
]

ENV_VAR = "HYBRIDLLM_KERNELS"
BACKENDS = ("cpp", "numba")


_numba_module: ModuleType | None = None
_warned_fallback = False


def _numba_importable() -> bool:
    return (
        importlib.util.find_spec("numba") is not None
        and importlib.util.find_spec(f"{__name__}.numba_kernels") is not None
    )


def _load_numba() -> ModuleType:
    global _numba_module
    if _numba_module is None:
        from . import numba_kernels

        _numba_module = numba_kernels
    return _numba_module


def available_backends() -> list[str]:
    """Backends that can run here, best first (``"cpp"`` before ``"numba"``)."""
    found = []
    if _core is not None:
        found.append("cpp")
    if _numba_importable():
        found.append("numba")
    return found


def default_backend() -> str:
    """The backend used when none is given: $HYBRIDLLM_KERNELS, else the best available one."""
    global _warned_fallback
    wanted = os.environ.get(ENV_VAR, "").strip().lower()
    if wanted:
        if wanted not in BACKENDS:
            raise ConfigError(f"{ENV_VAR}={wanted!r}: expected one of {', '.join(BACKENDS)}")
        if wanted not in available_backends():
            raise ConfigError(f"{ENV_VAR}={wanted!r}: {_why_missing(wanted)}")
        return wanted
    if _core is not None:
        return "cpp"
    if _numba_importable():
        if not _warned_fallback:
            _warned_fallback = True
            _say_fallback()
        return "numba"
    raise HybridLLMError(
        f"no kernel backend available: {_why_missing('cpp')}; {_why_missing('numba')}"
    )


def _say_fallback() -> None:
    """Warn once that the C++ core is missing (a RuntimeWarning for Python callers, which the
    CLI shows as one plain line), and say when the Numba kernels are about to be compiled."""
    warnings.warn(
        f"{_core_missing_reason()}; running on the slower Numba kernels", RuntimeWarning, stacklevel=4
    )
    if not numba_cache_present(os.path.join(os.path.dirname(__file__), "numba_kernels.py")):
        print(
            "hybridllm: compiling the Numba kernels for this machine, once (about a minute; "
            f"cached in {numba_cache_dir()})",
            file=sys.stderr,
            flush=True,
        )


def _core_missing_reason() -> str:
    """Why hybridllm._core did not load, in words: not built at install, or a broken build."""
    package = os.path.dirname(os.path.dirname(__file__))
    built = [f for f in os.listdir(package) if f.startswith("_core.") and f.endswith(tuple(EXTENSION_SUFFIXES))]
    if not built and not os.environ.get(CORE_ENV):
        return (
            "the C++ core was not built when hybridllm was installed (no C++ compiler, or the "
            "build failed: `pip install -v .` shows why)"
        )
    return f"the C++ core does not load ({_CORE_ERROR})"


def _why_missing(name: str) -> str:
    if name == "cpp":
        return f"the C++ core hybridllm._core is not built ({_CORE_ERROR})"
    return "the Numba backend needs numba and hybridllm.kernels.numba_kernels"


def _backend(backend: str | None) -> ModuleType:
    name = default_backend() if backend is None else str(backend).strip().lower()
    if name == "cpp":
        if _core is None:
            raise ConfigError(f"backend 'cpp': {_why_missing('cpp')}")
        return _core
    if name == "numba":
        if not _numba_importable():
            raise ConfigError(f"backend 'numba': {_why_missing('numba')}")
        return _load_numba()
    raise ConfigError(f"backend={backend!r}: expected one of {', '.join(BACKENDS)} or None")


def default_threads() -> int:
    """Default thread count: the physical cores this process may run on."""
    if _core is not None:
        return int(_core.physical_cores())
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def cpu_features() -> str:
    """The SIMD path the kernels use, e.g. ``"avx2+fma+f16c"`` (C++), or the CPU's flags."""
    if _core is not None:
        return str(_core.simd_path())
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "neon", "asimd")
    have = "+".join(f for f in wanted if f in flags) or "unknown"
    return f"numba (cpu: {have})"


# ---- validation -----------------------------------------------------------------------------


def _dims(shape: object, what: str = "shape") -> tuple[int, ...]:
    if isinstance(shape, (int, np.integer)):
        shape = (shape,)
    try:
        dims = tuple(int(d) for d in shape)  # type: ignore[union-attr]
    except TypeError:
        raise ValueError(f"{what} must be a tuple of ints, got {shape!r}") from None
    if not dims or any(d < 0 for d in dims):
        raise ValueError(f"{what} must be non-empty with dimensions >= 0, got {shape!r}")
    return dims


def _check_cols(spec: TypeSpec, cols: int) -> None:
    if cols % spec.block_size:
        raise ValueError(
            f"{spec.name}: cols={cols} is not a multiple of the block size {spec.block_size}"
        )


def _raw_rows(raw: object, spec: TypeSpec, rows: int, cols: int) -> np.ndarray:
    """raw as a (rows, row_bytes) uint8 C-contiguous array, a view of the caller's memory when it
    is already contiguous (memory-mapped tensors stay zero-copy)."""
    if isinstance(raw, (bytes, bytearray, memoryview)):
        arr = np.frombuffer(raw, dtype=np.uint8)
    elif isinstance(raw, np.ndarray):
        arr = raw
    else:
        raise ValueError(f"raw must be a numpy array or bytes, got {type(raw).__name__}")
    kind = arr.dtype.kind
    if kind == "f":
        # A float array is accepted only as the type's own storage (F32 data as float32, F16 as
        # float16): anything else means dequantized values were passed instead of raw bytes.
        if spec.float_dtype is None or arr.dtype != spec.float_dtype:
            want = f"{spec.float_dtype} or uint8" if spec.float_dtype is not None else "uint8"
            raise ValueError(f"{spec.name} raw has dtype {arr.dtype}, expected {want} bytes")
    elif kind not in "uiV":
        raise ValueError(f"{spec.name} raw has dtype {arr.dtype}, expected uint8 bytes")
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)
    flat = arr.reshape(-1).view(np.uint8)
    rb = spec.row_bytes(cols)
    if flat.size != rows * rb:
        raise ValueError(
            f"{spec.name} raw has {flat.size} bytes, expected {rows * rb} "
            f"({rows} rows x {rb} bytes for shape ({rows}, {cols}))"
        )
    return flat.reshape(rows, rb)


def _threads(n_threads: object) -> int:
    if n_threads is None:
        return default_threads()
    if not isinstance(n_threads, (int, np.integer)) or isinstance(n_threads, bool) or n_threads < 1:
        raise ValueError(f"n_threads must be an int >= 1 or None, got {n_threads!r}")
    return int(n_threads)


# ---- public operations ----------------------------------------------------------------------


def dequantize(raw: object, qtype: object, shape: object, backend: str | None = None) -> np.ndarray:
    """Float32 values of a GGML tensor; `shape` is numpy order, the last axis quantized.

    raw: the tensor's bytes (uint8 rows as GGUFReader gives them; float32 / float16 arrays for
    F32 / F16 tensors are accepted as their own bytes).
    """
    spec = resolve_qtype(qtype)
    dims = _dims(shape)
    cols = dims[-1]
    rows = int(np.prod(dims[:-1], dtype=np.int64)) if len(dims) > 1 else 1
    _check_cols(spec, cols)
    src = _raw_rows(raw, spec, rows, cols)
    out = np.empty((rows, cols), dtype=np.float32)
    if rows and cols:
        _backend(backend).dequantize(src, spec.id, rows, cols, out)
    return out.reshape(dims)


def matmul(
    raw: object,
    qtype: object,
    shape: object,
    x: object,
    backend: str | None = None,
    n_threads: int | None = None,
    out: np.ndarray | None = None,
    rows_alone: bool = False,
) -> np.ndarray:
    """x @ W.T for the GGML weight W of shape (rows, cols): (n, cols) -> (n, rows) float32.

    x: float32 (n, cols), or (cols,) giving (rows,). Activations are quantized to the weight
    type's partner format (as llama.cpp's CPU backend does), so results match the float64
    product to ~1e-2 relative error for quantized weights. out: optional float32 C-contiguous
    buffer of the result's shape to write into (and return); it must not overlap x or raw.
    rows_alone: every row of the result equals the product of that row alone, bit for bit
    (llama.cpp's arithmetic for some types depends on the row count; the rows of different
    sequences must not influence each other).
    """
    spec = resolve_qtype(qtype)
    dims = _dims(shape)
    if len(dims) != 2:
        raise ValueError(f"matmul needs a 2-D weight shape (rows, cols), got {shape!r}")
    rows, cols = dims
    _check_cols(spec, cols)
    w = _raw_rows(raw, spec, rows, cols)
    xa = np.asarray(x)
    if xa.dtype != np.float32:
        raise ValueError(f"x has dtype {xa.dtype}, expected float32")
    if xa.ndim not in (1, 2) or xa.shape[-1] != cols:
        raise ValueError(f"x has shape {xa.shape}, expected (n, {cols}) or ({cols},)")
    x2 = np.ascontiguousarray(xa.reshape(1, cols) if xa.ndim == 1 else xa)
    n = x2.shape[0]
    want = (rows,) if xa.ndim == 1 else (n, rows)
    if out is None:
        res = np.empty(want, dtype=np.float32)
    else:
        if not isinstance(out, np.ndarray) or out.dtype != np.float32:
            got = out.dtype if isinstance(out, np.ndarray) else type(out).__name__
            raise ValueError(f"out has dtype {got}, expected float32")
        if out.shape != want:
            raise ValueError(f"out has shape {out.shape}, expected {want}")
        if not out.flags.c_contiguous or not out.flags.writeable:
            raise ValueError("out must be C-contiguous and writeable")
        if np.may_share_memory(out, x2) or np.may_share_memory(out, w):
            raise ValueError("out must not overlap x or raw")
        res = out
    if n == 0 or rows == 0:
        return res
    if cols == 0:
        res.fill(0.0)
        return res
    impl, threads, res2 = _backend(backend), _threads(n_threads), res.reshape(n, rows)
    if not rows_alone or n == 1:
        impl.matmul(w, spec.id, rows, cols, x2, res2, threads)
    elif impl is _core:
        impl.matmul(w, spec.id, rows, cols, x2, res2, threads, rows_alone=True)
    else:
        for i in range(n):
            impl.matmul(w, spec.id, rows, cols, x2[i : i + 1], res2[i : i + 1], threads)
    return res


def get_rows(
    raw: object, qtype: object, shape: object, ids: object, backend: str | None = None
) -> np.ndarray:
    """Dequantized rows ids of the GGML tensor of shape (rows, cols): (len(ids), cols) float32.

    The embedding lookup. ids: 1-D integers in [0, rows); IndexError otherwise.
    """
    spec = resolve_qtype(qtype)
    dims = _dims(shape)
    if len(dims) != 2:
        raise ValueError(f"get_rows needs a 2-D shape (rows, cols), got {shape!r}")
    rows, cols = dims
    _check_cols(spec, cols)
    src = _raw_rows(raw, spec, rows, cols)
    ida = np.asarray(ids)
    if ida.ndim != 1:
        raise ValueError(f"ids has shape {ida.shape}, expected 1-D (k,)")
    if ida.size and ida.dtype.kind not in "iu":
        raise ValueError(f"ids has dtype {ida.dtype}, expected integers")
    ids64 = np.ascontiguousarray(ida, dtype=np.int64)
    if ids64.size:
        lo, hi = int(ids64.min()), int(ids64.max())
        if lo < 0 or hi >= rows:
            bad = lo if lo < 0 else hi
            raise IndexError(f"row id {bad} out of range [0, {rows})")
    out = np.empty((ids64.size, cols), dtype=np.float32)
    if ids64.size and cols:
        _backend(backend).get_rows(src, spec.id, rows, cols, ids64, out)
    return out
