"""Small float32 helpers for a forward pass on the Numba backend (llama.cpp semantics).

Every function is ``@njit`` (callable from Python or from other Numba code) and writes into a
caller-provided ``out`` of the input's shape; ``out`` may be the input itself (in place).
Row-wise operations act on the last axis of a C-contiguous array of any rank.

Reductions accumulate in float64, as ggml does (``ggml_float``). The float flags allow
reassociation and contraction only. "nnan"/"ninf" stay off because softmax inputs carry
-inf attention masks.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

# reassoc lets LLVM vectorise the reductions; no nnan/ninf (masks use -inf).
_FM = {"reassoc", "contract", "arcp", "nsz"}


@njit(cache=True, fastmath=_FM)
def rms_norm(x: np.ndarray, w: np.ndarray, eps: float, out: np.ndarray) -> None:
    """out[..., i] = x[..., i] / sqrt(mean(x[...]**2) + eps) * w[i], per row of the last axis.

    x, out: float32 (..., d) C-contiguous; w: float32 (d,). Pass an all-ones w for a plain
    RMS norm (ggml's rms_norm followed by mul, as llama.cpp's graphs use it).
    """
    d = x.shape[-1]
    xs = x.reshape((-1, d))
    os = out.reshape((-1, d))
    for r in range(xs.shape[0]):
        s = 0.0
        for i in range(d):
            v = np.float64(xs[r, i])
            s += v * v
        # ggml: mean and 1/sqrtf(mean + eps) in float32 (the sum itself in double)
        mean = np.float32(s / d)
        scale = np.float32(1.0) / np.float32(math.sqrt(mean + np.float32(eps)))
        for i in range(d):
            os[r, i] = xs[r, i] * scale * w[i]


@njit(cache=True)
def _rope_row(
    x: np.ndarray,
    o: np.ndarray,
    p: float,
    n_rot: int,
    theta_scale: np.float32,
    freq_scale: np.float32,
    ff: np.ndarray,
    neox: bool,
) -> None:
    """Rotate one head vector x (d,) at position p into o; dims >= n_rot are copied."""
    d = x.shape[0]
    half = n_rot // 2
    theta = np.float32(p)
    for i in range(half):
        t = theta * freq_scale
        if ff.shape[0] > 0:
            t = t / ff[i]
        c = np.float32(math.cos(t))
        s = np.float32(math.sin(t))
        if neox:  # pairs (i, i + n_rot/2): GPT-NeoX / Qwen / Gemma layout
            a, b = i, i + half
        else:  # adjacent pairs (2i, 2i+1): original LLaMA / GGUF "normal" layout
            a, b = 2 * i, 2 * i + 1
        x0 = x[a]
        x1 = x[b]
        o[a] = x0 * c - x1 * s
        o[b] = x0 * s + x1 * c
        theta = theta * theta_scale
    for i in range(n_rot, d):
        o[i] = x[i]


@njit(cache=True)
def rope(
    x: np.ndarray,
    pos: np.ndarray,
    n_rot: int,
    freq_base: float,
    freq_scale: float,
    neox: bool,
    out: np.ndarray,
    freq_factors: np.ndarray | None = None,
) -> None:
    """Rotary position embedding, as ggml_rope_ext without YaRN extrapolation.

    x, out: float32 (T, H, D) C-contiguous, one row per token; pos: int (T,) positions;
    n_rot: rotated dims (<= D, even; the rest are copied). For pair i < n_rot/2,
    theta = pos * freq_scale * freq_base**(-2i/n_rot) / freq_factors[i] (freq_factors
    optional, e.g. Llama 3 scaling). The angle is stepped in float32 as ggml does.
    ``neox`` selects the half-split pairing (i, i + n_rot/2); otherwise pairs are
    adjacent (2i, 2i+1).
    """
    theta_scale = np.float32(math.pow(freq_base, -2.0 / n_rot))
    fs = np.float32(freq_scale)
    ff = np.empty(0, np.float32) if freq_factors is None else freq_factors
    for t in range(x.shape[0]):
        p = pos[t]
        for h in range(x.shape[1]):
            _rope_row(x[t, h], out[t, h], p, n_rot, theta_scale, fs, ff, neox)


@njit(cache=True, fastmath=_FM)
def softmax(x: np.ndarray, out: np.ndarray, scale: float = 1.0) -> None:
    """out = softmax(x * scale) along the last axis (max-subtracted; -inf entries give 0).

    x, out: float32 (..., d) C-contiguous. A row that is entirely -inf gives zeros.
    """
    d = x.shape[-1]
    xs = x.reshape((-1, d))
    os = out.reshape((-1, d))
    sc = np.float32(scale)
    for r in range(xs.shape[0]):
        m = -np.inf
        for i in range(d):
            m = max(m, xs[r, i] * sc)
        if m == -np.inf:
            for i in range(d):
                os[r, i] = 0.0
            continue
        s = 0.0
        for i in range(d):
            e = np.float32(math.exp(xs[r, i] * sc - m))
            os[r, i] = e
            s += e
        inv = np.float32(1.0 / s)
        for i in range(d):
            os[r, i] *= inv


@njit(cache=True, fastmath=_FM)
def silu(x: np.ndarray, out: np.ndarray) -> None:
    """out = x * sigmoid(x) = x / (1 + exp(-x)), elementwise (float32, any shape)."""
    xf = x.reshape(-1)
    of = out.reshape(-1)
    for i in range(xf.shape[0]):
        v = xf[i]
        of[i] = v / (np.float32(1.0) + np.float32(math.exp(-v)))


_SQRT_2_OVER_PI = 0.7978845608028654
_GELU_COEF_A = 0.044715


@njit(cache=True, fastmath=_FM)
def gelu_tanh(x: np.ndarray, out: np.ndarray) -> None:
    """out = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), elementwise (ggml_gelu).

    float32, any shape. Evaluated in float32 from the formula; ggml's optional f16 lookup
    table differs by up to ~1e-3.
    """
    xf = x.reshape(-1)
    of = out.reshape(-1)
    c = np.float32(_SQRT_2_OVER_PI)
    a = np.float32(_GELU_COEF_A)
    for i in range(xf.shape[0]):
        v = xf[i]
        t = np.float32(math.tanh(c * v * (np.float32(1.0) + a * v * v)))
        of[i] = np.float32(0.5) * v * (np.float32(1.0) + t)
