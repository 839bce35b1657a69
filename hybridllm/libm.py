"""The C library's float32 math functions that ggml calls (logf, powf), for values computed once
on the host that must be bit-identical to llama.cpp's: numpy's float32 ufuncs may use their own
SIMD variants, and a double-precision result rounded to float32 can differ by an ulp."""

from __future__ import annotations

import ctypes
import ctypes.util

import numpy as np

_LIBM = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
_LIBM.logf.restype, _LIBM.logf.argtypes = ctypes.c_float, [ctypes.c_float]
_LIBM.powf.restype, _LIBM.powf.argtypes = ctypes.c_float, [ctypes.c_float, ctypes.c_float]


def logf(x: float) -> np.float32:
    return np.float32(_LIBM.logf(float(x)))


def powf(x: float, y: float) -> np.float32:
    return np.float32(_LIBM.powf(float(x), float(y)))
