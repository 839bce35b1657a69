"""The ops a transformer block needs, on the CPU: Numba loops, numpy and `hybridllm.kernels`.

A backend owns device memory (KV caches, uploaded weights) and provides the block's ops; the
block itself (model.PyBlock) is written once against this interface, so a GPU backend only has
to provide the same methods. Arrays here are float32 C-contiguous unless said otherwise.

Numerics follow llama.cpp's CPU path (non-flash attention) bit for bit, because the tests hold
us to its logits and these small quantized models amplify any rounding difference: K and V are
cached as float16, Q is rounded to float16 before Q·K (ggml converts the f32 operand of an f16
matmul to f16), the softmax uses ggml's vectorised expf and summation order, its probabilities
are rounded to float16 before P·V, both dot products accumulate in ggml's lane order, rope uses
libm's cosf/sinf and an FMA, SiLU uses ggml_v_expf and GELU ggml's float16 table.

The lane count L of those orders (SIMD_LANES: 16 for AVX-512, 8 for AVX2) is passed to the
compiled functions as an argument or an array shape, never read as a global inside them: Numba's
on-disk cache freezes globals, and the same cache serves a native and an AVX2 core.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import NamedTuple

import numba
import numpy as np
from numba.extending import intrinsic

from ..libm import powf


def _simd_lanes() -> int:
    """Float lanes of ggml's CPU SIMD (GGML_F32_EPR) in the llama.cpp we reproduce: the C++ core's
    (a llama.cpp built for the same ISA), else this CPU's: 16 with AVX-512, else 8."""
    from .._native import core

    if core is not None:
        return int(core.float_lanes())
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return 8
    return 16 if "avx512f" in flags else 8


def _numba_threads(n_threads: int | None) -> int:
    most = numba.config.NUMBA_NUM_THREADS
    return most if not n_threads else max(1, min(int(n_threads), most))


#: Lanes of the vector accumulators whose summation order we reproduce (see the attention).
SIMD_LANES = _simd_lanes()


class Matrix(NamedTuple):
    """A quantized weight matrix as `_core.Block` takes it: raw rows, GGML type, rows, cols."""

    raw: np.ndarray  # uint8 (rows, bytes_per_row), a view of the memory map
    qtype: int
    rows: int
    cols: int


class CpuBackend:
    """Ops of a transformer block on the CPU; weights stay in the memory map."""

    name = "cpu"

    def __init__(self, n_threads: int | None = None) -> None:
        from .. import kernels  # the kernels pick _core or Numba at import

        self.n_threads = n_threads
        self._kernels = kernels
        self._kernel_backend = kernels.default_backend()  # resolved once: matmul is per token

    # --- memory -------------------------------------------------------------------------
    def load_matrix(self, m: Matrix) -> Matrix:
        # The mmap view is used as is (no copy, no dequantization), seen as a plain ndarray:
        # numpy.memmap's per-view bookkeeping costs microseconds on every call.
        return m._replace(raw=m.raw.view(np.ndarray))

    def load_vector(self, v: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(v, dtype=np.float32)

    def kv_cache(self, n_ctx: int, width: int) -> np.ndarray:
        """A float16 (n_ctx, width) cache, like llama.cpp's default cache type."""
        return np.zeros((n_ctx, width), dtype=np.float16)

    def from_host(self, x: np.ndarray) -> np.ndarray:
        return x

    def to_host(self, x: np.ndarray) -> np.ndarray:
        return x

    # --- ops ----------------------------------------------------------------------------
    def matmul(self, w: Matrix, x: np.ndarray) -> np.ndarray:
        """x (n, cols) @ W.T -> (n, rows); activations are quantized to 8 bits by the kernel."""
        return self._kernels.matmul(
            w.raw, w.qtype, (w.rows, w.cols), x, self._kernel_backend, self.n_threads
        )

    def matmul_rows_alone(self, w: Matrix, x: np.ndarray) -> np.ndarray:
        """As matmul, each row computed as if it were the only one (rows of several sequences)."""
        return self._kernels.matmul(
            w.raw, w.qtype, (w.rows, w.cols), x, self._kernel_backend, self.n_threads,
            rows_alone=True,
        )

    def rms_norm(self, x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
        """Row-wise RMSNorm of x (m, k) times w (k,) -> new (m, k)."""
        out = np.empty_like(x)
        _rms_norm(x, w, np.float32(eps), out)
        return out

    def rope(self, x: np.ndarray, pos0: int, rope: RopeSpec) -> None:
        """Rotate x (n, heads, head_dim) in place for positions pos0..pos0+n-1."""
        cos, sin = rope_table(rope)
        if pos0 + x.shape[0] > cos.shape[0]:
            raise ValueError(
                f"position {pos0 + x.shape[0] - 1} is past the rope table ({cos.shape[0]})"
            )
        _rope(x, cos, sin, pos0, rope.neox)

    def store_kv(self, cache: np.ndarray, pos0: int, rows: np.ndarray) -> None:
        """Write rows (n, width) at pos0.. of a float16 cache, rounding to nearest even."""
        cache[pos0 : pos0 + rows.shape[0]] = rows

    def attention(
        self,
        q: np.ndarray,
        k_cache: np.ndarray,
        v_cache: np.ndarray,
        pos0: int,
        window: int,
        scale: float,
        softcap: float = 0.0,
    ) -> np.ndarray:
        """Causal GQA attention of q (n, n_heads, dk) over cache rows 0..pos0+n-1 -> (n, n_heads*dv).

        Query t (position pos0+t) sees key j when j <= pos0+t and, with a window, pos0+t - j < window.
        softcap > 0 (gemma2): scores are tanh(s / softcap) * softcap before the scale and softmax.
        """
        n, n_heads, dk = q.shape
        # keys older than the window are never read
        start = 0 if window <= 0 else max(0, pos0 - window + 1)
        q16 = q.astype(np.float16).astype(np.float32)  # ggml converts Q to f16 for the f16 matmul
        dv = v_cache.shape[1] // (k_cache.shape[1] // dk)
        out = np.empty((n, n_heads, dv), dtype=np.float32)
        numba.set_num_threads(_numba_threads(self.n_threads))
        # cache rows converted to float32 once per call, keys transposed so that the scores of
        # many keys vectorize; llama.cpp uses tinyBLAS for 2+ rows, ggml_vec_dot_f16 for one
        kt, vals = _attention_operands(k_cache, v_cache, start, pos0 + n, dk)
        _attention_ggml(
            q16, kt, vals, pos0, start, window, np.float32(scale), np.float32(softcap), n > 1,
            SIMD_LANES, out,
        )
        return out.reshape(n, -1)

    def glu(self, gate: np.ndarray, up: np.ndarray, activation: str) -> np.ndarray:
        """act(gate) * up for gate, up (n, ffn_dim) -> new (n, ffn_dim)."""
        out = np.empty_like(gate)
        if activation == "silu":
            _swiglu(gate, up, out, SIMD_LANES)
        elif activation == "gelu_tanh":
            _geglu(gate, up, _gelu_f16_table(), out)
        else:
            raise ValueError(f"unknown activation {activation!r}")
        return out

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        """x += y in place (the residual stream)."""
        np.add(x, y, out=x)

    def concat_rows(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        """Row blocks (n_i, width) -> one new (sum n_i, width) array."""
        return np.concatenate(parts)


# --- rope ---------------------------------------------------------------------------------
class RopeSpec(NamedTuple):
    """What fixes a rope table: ggml_rope_ext's arguments (the YaRN ones default to off)."""

    base: float
    dim: int
    scale: float  # linear scaling: positions are multiplied by 1/scale (freq_scale)
    neox: bool  # rotate halves (gemma) instead of adjacent pairs (llama)
    n_ctx: int
    ext_factor: float = 0.0  # YaRN: 1 blends extrapolated angles in below corr_dims
    attn_factor: float = 1.0  # cos/sin magnitude (ggml's mscale argument)
    corr_dims: tuple[float, float] = (0.0, 0.0)
    freq_factors: tuple[float, ...] | None = None  # per pair: angles divided by these (Llama 3.1)


@lru_cache(maxsize=8)
def rope_table(rope: RopeSpec) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (n_ctx, dim/2) float32, built bit for bit the way ggml builds them.

    ggml starts theta at the position, multiplies it by base^(-2/dim) once per pair in float32,
    divides it by the pair's frequency factor, scales it (YaRN: blended with the unscaled angle
    over the ramp between corr_dims) and takes libm's cosf/sinf (Numba's float32 math.cos calls
    the same functions) times mscale. Exact angles matter: Q is rounded to float16 before Q.K,
    and a one-ulp change flips roundings.
    """
    half = rope.dim // 2
    # ggml: powf(freq_base, -2.0f/n_dims), the exponent rounded to float first
    theta_scale = powf(rope.base, np.float32(-2.0) / np.float32(rope.dim))
    cos = np.empty((rope.n_ctx, half), dtype=np.float32)
    sin = np.empty_like(cos)
    factors = np.ones(half, np.float32) if rope.freq_factors is None else np.array(
        rope.freq_factors, dtype=np.float32
    )
    yarn = np.array(
        [rope.ext_factor, rope.attn_factor, rope.corr_dims[0], rope.corr_dims[1]], np.float32
    )
    _rope_table(theta_scale, np.float32(1.0 / rope.scale), factors, yarn, cos, sin)
    return cos, sin


@numba.njit(cache=True)
def _rope_table(theta_scale, freq_scale, factors, yarn, cos, sin):  # pragma: no cover - compiled
    ext_factor, mscale, corr_lo, corr_hi = yarn[0], yarn[1], yarn[2], yarn[3]
    if ext_factor != 0:  # rope_yarn's magnitude correction, 1 + 0.1 ln(1/freq_scale) (one FMA)
        mscale = mscale * _fma(np.float32(0.1), math.log(np.float32(1.0) / freq_scale), np.float32(1.0))
    ramp_width = max(np.float32(0.001), corr_hi - corr_lo)
    for p in range(cos.shape[0]):
        theta = np.float32(p)
        for i in range(cos.shape[1]):
            extrap = theta / factors[i]
            t = freq_scale * extrap
            if ext_factor != 0:
                y = (np.float32(i) - corr_lo) / ramp_width
                ramp_mix = (np.float32(1.0) - min(np.float32(1.0), max(np.float32(0.0), y))) * ext_factor
                t = _fma(t, np.float32(1.0) - ramp_mix, extrap * ramp_mix)
            cos[p, i] = math.cos(t) * mscale
            sin[p, i] = math.sin(t) * mscale
            theta = theta * theta_scale


@intrinsic
def _fma(typingctx, a, b, c):  # pragma: no cover - compiled
    """a*b + c with one rounding (what the C compiler emits for ggml's rope)."""

    def codegen(context, builder, signature, args):
        return builder.fma(*args)

    return a(a, b, c), codegen


@numba.njit(cache=True)
def _rope(x, cos, sin, pos0, neox):  # pragma: no cover - compiled
    n, n_heads, _ = x.shape
    half = cos.shape[1]
    for t in range(n):
        p = pos0 + t
        for h in range(n_heads):
            for i in range(half):
                a = i if neox else 2 * i
                b = i + half if neox else 2 * i + 1
                c, s = cos[p, i], sin[p, i]
                x0, x1 = x[t, h, a], x[t, h, b]
                x[t, h, a] = _fma(x0, c, -(x1 * s))
                x[t, h, b] = _fma(x0, s, x1 * c)


# --- norms and activations ----------------------------------------------------------------
@numba.njit(cache=True)
def _rms_norm(x, w, eps, out):  # pragma: no cover - compiled
    # ggml: squares in float, summed in double, scale = 1/sqrtf(mean + eps) in float, then times w.
    m, k = x.shape
    for i in range(m):
        acc = 0.0
        for j in range(k):
            acc += x[i, j] * x[i, j]  # float32 product, double sum, as in ggml
        scale = np.float32(1.0) / np.float32(math.sqrt(np.float32(acc / k) + eps))
        for j in range(k):
            out[i, j] = (x[i, j] * scale) * w[j]


@numba.njit(cache=True)
def _swiglu(gate, up, out, lanes):  # pragma: no cover - compiled
    # ggml_vec_swiglu_f32: SIMD lanes use ggml_v_silu (x / (1 + ggml_v_expf(-x))), the tail
    # that does not fill an L-lane vector uses libm's expf.
    m, k = gate.shape
    simd = k - k % lanes
    for i in range(m):
        for j in range(k):
            x = gate[i, j]
            e = _v_expf(np.float32(0.0) - x, lanes == 8) if j < simd else np.float32(math.exp(-x))
            out[i, j] = (x / (np.float32(1.0) + e)) * up[i, j]


# ggml_v_expf's constants (ARM optimized-routines expf, as in ggml-cpu/vec.h)
_LOG2E = np.float32(float.fromhex("0x1.715476p+0"))
_LN2_HI = np.float32(float.fromhex("0x1.62e4p-1"))
_LN2_LO = np.float32(float.fromhex("0x1.7f7d1cp-20"))
_EXP_C = tuple(
    np.float32(float.fromhex(h))
    for h in ("0x1.0e4020p-7", "0x1.573e2ep-5", "0x1.555e66p-3", "0x1.fffdb6p-2", "0x1.ffffecp-1")
)


@numba.njit(cache=True, inline="always")
def _v_expf(x, avx2):  # pragma: no cover - compiled
    """ggml_v_expf for one lane, bit for bit: its AVX2 variant if avx2, else its AVX-512 one.

    Both share the reduction and the polynomial's first terms; AVX-512 adds the 1 inside the
    polynomial and scales by 2^n exactly (scalef), AVX2 leaves the 1 out and rounds once in
    fma(j, 2^n, 2^n), rescaling in two steps (s2, then s1) when 126 < |n| <= 192.
    """
    shift = np.float32(12582912.0)  # 0x1.8p23: adding it rounds to an integer
    z = _fma(x, _LOG2E, shift)
    n = z - shift
    b = _fma(-n, _LN2_LO, _fma(-n, _LN2_HI, x))
    u = b * b
    c0, c1, c2, c3, c4 = _EXP_C
    if abs(n) > np.float32(192.0):
        return np.float32(0.0) if n <= 0 else np.float32(np.inf)
    if not avx2:
        j = _fma(_fma(_fma(c0, b, c1), u, _fma(c2, b, c3)), u, _fma(c4, b, np.float32(1.0)))
        return np.float32(np.float64(j) * math.ldexp(1.0, int(n)))  # j * 2^n rounded once
    j = _fma(_fma(_fma(c0, b, c1), u, _fma(c2, b, c3)), u, c4 * b)
    if abs(n) <= np.float32(126.0):
        k = np.float32(math.ldexp(1.0, int(n)))
        return _fma(j, k, k)
    if n <= 0:
        s1, s2 = np.float32(math.ldexp(1.0, -125)), np.float32(math.ldexp(1.0, int(n) + 125))
    else:
        s1, s2 = np.float32(math.ldexp(1.0, 127)), np.float32(math.ldexp(1.0, int(n) - 127))
    return _fma(s2, j, s2) * s1


@lru_cache(maxsize=1)
def _gelu_f16_table() -> np.ndarray:
    """ggml's GELU(tanh) table: for every f16 bit pattern, the f16-rounded GELU, as float32."""
    x = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32)
    y = np.zeros_like(x)
    finite = np.isfinite(x)
    y[finite] = _gelu_f32(x[finite])
    return y.astype(np.float16).astype(np.float32)


@numba.njit(cache=True)
def _gelu_f32(x):  # pragma: no cover - compiled
    # ggml_gelu_f32 as compiled: 0.5f*x*(1 + tanhf(SQRT_2_OVER_PI*x*(1 + A*x*x))), the inner
    # 1 + (A*x)*x contracted to one FMA, tanhf from libm (Numba's float32 math.tanh).
    a, c = np.float32(0.044715), np.float32(0.79788456080286535587989211986876)
    y = np.empty_like(x)
    for i in range(x.shape[0]):
        v = x[i]
        y[i] = (
            np.float32(0.5)
            * v
            * (np.float32(1.0) + math.tanh(c * v * _fma(a * v, v, np.float32(1.0))))
        )
    return y


@numba.njit(cache=True)
def _geglu(gate, up, table, out):  # pragma: no cover - compiled
    m, k = gate.shape
    for i in range(m):
        for j in range(k):
            g = gate[i, j]
            if g <= -10.0:
                out[i, j] = 0.0
            elif g >= 10.0:
                out[i, j] = g * up[i, j]
            else:
                out[i, j] = table[_f16_bits(g)] * up[i, j]


@numba.njit(cache=True, inline="always")
def _f16_bits(x):  # pragma: no cover - compiled
    """float32 -> IEEE half bits, round to nearest even (finite |x| < 65520 assumed)."""
    sign = 0x8000 if x < 0 else 0
    a = abs(x)
    if a < 6.103515625e-05:  # f16 subnormal: multiples of 2**-24
        return sign | int(np.rint(a * 16777216.0))
    m, e = math.frexp(a)  # a = m * 2**e, m in [0.5, 1)
    mant = int(np.rint(m * 2048.0))  # 11 significant bits, may round up to 2048
    if mant == 2048:
        mant, e = 1024, e + 1
    return sign | ((e + 14) << 10) | (mant - 1024)


@numba.njit(cache=True)
def _round_f16(x):  # pragma: no cover - compiled
    """Round float32 values in [0, 1] (probabilities) to the nearest float16, in place."""
    bits = x.view(np.uint32)
    for i in range(x.shape[0]):
        if x[i] < np.float32(6.103515625e-05):  # f16 subnormals: multiples of 2**-24
            x[i] = np.float32(
                np.rint(x[i] * np.float32(16777216.0)) * np.float32(5.9604644775390625e-08)
            )
        else:  # keep 10 mantissa bits, ties to even
            b = bits[i]
            bits[i] = (b + np.uint32(0x0FFF) + ((b >> np.uint32(13)) & np.uint32(1))) & np.uint32(
                0xFFFFE000
            )


# --- attention ----------------------------------------------------------------------------
@numba.njit(cache=True, inline="always")
def _f16_row(src, start, n, dst):  # pragma: no cover - compiled
    # Half bits -> float32 bits with the exponent still biased for f16; x 2**112 fixes it.
    # Exact for normals, subnormals and zeros (the cache holds no inf/nan).
    bits = dst.view(np.uint32)
    for d in range(n):
        h = np.uint32(src[start + d])
        bits[d] = ((h & np.uint32(0x8000)) << np.uint32(16)) | (
            (h & np.uint32(0x7FFF)) << np.uint32(13)
        )
    for d in range(n):
        dst[d] *= np.float32(5.192296858534828e33)


@numba.njit(cache=True)
def _f16_to_f32(src, dst):  # pragma: no cover - compiled
    """uint16 (m, k) half bits -> float32 (m, k); numpy's own cast is ~10x slower here."""
    for i in range(src.shape[0]):
        _f16_row(src[i], 0, src.shape[1], dst[i])


def _cache_f32(cache: np.ndarray, start: int, end: int) -> np.ndarray:
    rows = np.empty((end - start, cache.shape[1]), dtype=np.float32)
    _f16_to_f32(cache[start:end].view(np.uint16), rows)
    return rows


def _attention_operands(
    k_cache: np.ndarray, v_cache: np.ndarray, start: int, end: int, dk: int
) -> tuple[np.ndarray, np.ndarray]:
    """Cache rows start..end-1 as float32: keys (n_kv, dk, T) transposed, values (n_kv, T, dv)."""
    t = end - start
    keys, vals = _cache_f32(k_cache, start, end), _cache_f32(v_cache, start, end)
    n_kv = k_cache.shape[1] // dk
    kt = np.ascontiguousarray(keys.reshape(t, n_kv, dk).transpose(1, 2, 0))
    return kt, np.ascontiguousarray(vals.reshape(t, n_kv, -1).transpose(1, 0, 2))


# ggml's dot products, lane for lane. llama.cpp computes Q.K and P.V as f16 matmuls: with two
# or more query rows through llamafile's tinyBLAS (one L-lane FMA accumulator per output,
# summed by halving), with one row through ggml_vec_dot_f16 (four L-lane accumulators fed
# round-robin, folded 0+2, 1+3, 0+1, then summed). Keys are laid out by cache cell, which for
# us is the position, so lanes over keys are assigned by position modulo L. The loops below
# keep several outputs side by side in the last axis so that each step vectorizes.
_KEY_BLOCK = 64  # keys scored together


@numba.njit(cache=True, inline="always")
def _reduce_lanes(acc, n):  # pragma: no cover - compiled
    """Fold acc (L, n) over its lanes in place into acc[0, :n], as ggml sums a vector register.

    Halving (_mm512_reduce_add_ps, tinyBLAS's hsum, AVX2's hsum_float_8) for every path but
    AVX2's GGML_F32x8_REDUCE, which the caller handles with `hadd=True` via _reduce_vec.
    """
    width = acc.shape[0]
    while width > 1:
        width //= 2
        for i in range(width):
            for b in range(n):
                acc[i, b] = acc[width + i, b] + acc[i, b]


@numba.njit(cache=True, inline="always")
def _reduce_vec(acc4, n):  # pragma: no cover - compiled
    """ggml_vec_dot_f16's reduction of its four accumulators (4, L, n) into acc4[0, 0, :n]."""
    for i in range(acc4.shape[1]):
        for b in range(n):
            acc4[0, i, b] = (acc4[0, i, b] + acc4[2, i, b]) + (acc4[1, i, b] + acc4[3, i, b])
    if acc4.shape[1] == 16:
        _reduce_lanes(acc4[0], n)
        return
    for b in range(n):  # AVX2: 128-bit halves added, then two horizontal adds
        a = acc4[0, 0, b] + acc4[0, 4, b]
        c = acc4[0, 1, b] + acc4[0, 5, b]
        d = acc4[0, 2, b] + acc4[0, 6, b]
        e = acc4[0, 3, b] + acc4[0, 7, b]
        acc4[0, 0, b] = (a + c) + (d + e)


@numba.njit(cache=True)
def _scores(q, kt, first, n_keys, scale, batched, acc4, s):  # pragma: no cover - compiled
    """s[j] = (q . key j) * scale for keys first..first+n_keys-1 of kt (dk, T), keys transposed."""
    dk, lanes = q.shape[0], acc4.shape[1]
    step = 4 * lanes
    tiny = batched and dk % lanes == 0
    body = dk if tiny else dk - dk % step
    for b0 in range(0, n_keys, _KEY_BLOCK):
        nb = min(_KEY_BLOCK, n_keys - b0)
        col = first + b0
        acc4[:, :, :nb] = 0.0
        for c in range(0, body, lanes):
            a = 0 if tiny else (c % step) // lanes  # vec_dot: four accumulators, round-robin
            for i in range(lanes):
                qi, row = q[c + i], kt[c + i]
                for b in range(nb):
                    acc4[a, i, b] = _fma(qi, row[col + b], acc4[a, i, b])
        if tiny:
            _reduce_lanes(acc4[0], nb)
        else:
            _reduce_vec(acc4, nb)
        for b in range(nb):
            total = np.float64(acc4[0, 0, b])
            for k in range(body, dk):  # vec_dot leftovers: scalar products summed in double
                total += np.float64(q[k] * kt[k, col + b])
            s[b0 + b] = np.float32(total) * scale


@numba.njit(cache=True)
def _softmax_ggml(s, lo, chunks):  # pragma: no cover - compiled
    """ggml_soft_max in place on scores s of positions lo..lo+len-1, then rounded to f16.

    exp is ggml_v_expf; the sum adds L-lane chunks (aligned on position 0, masked lanes 0)
    each reduced by halving, into a double; the row is then scaled by float(1/sum).
    chunks: scratch (L, >= len/L + 2).
    """
    lanes = chunks.shape[0]
    m = np.float32(-np.inf)
    for j in range(s.shape[0]):
        m = max(m, s[j])
    for j in range(s.shape[0]):
        s[j] = _v_expf(np.float32(s[j] - m), lanes == 8)
    first = lo - lo % lanes
    n_chunks = (lo + s.shape[0] - first + lanes - 1) // lanes
    chunks[:, :n_chunks] = 0.0
    for j in range(s.shape[0]):
        pos = lo + j - first
        chunks[pos % lanes, pos // lanes] = s[j]
    _reduce_lanes(chunks, n_chunks)
    total = 0.0
    for c in range(n_chunks):
        total += np.float64(chunks[0, c])
    inv = np.float32(1.0 / total)
    for j in range(s.shape[0]):
        s[j] = s[j] * inv
    _round_f16(s)


@numba.njit(cache=True)
def _weighted_values(probs, lo, vals, first, batched, acc4, out):  # pragma: no cover - compiled
    """out[d] = sum_j probs[j] * vals[first + j, d] in ggml's order; lanes by position lo + j."""
    lanes = acc4.shape[1]
    dv, step = out.shape[0], 4 * lanes
    acc4[:, :, :dv] = 0.0
    for j in range(probs.shape[0]):
        pos = lo + j
        a = 0 if batched else (pos % step) // lanes
        lane, pj, row = pos % lanes, probs[j], vals[first + j]
        for d in range(dv):
            acc4[a, lane, d] = _fma(row[d], pj, acc4[a, lane, d])
    if batched:
        _reduce_lanes(acc4[0], dv)
    else:
        _reduce_vec(acc4, dv)
    out[:] = acc4[0, 0, :dv]


@numba.njit(cache=True, parallel=True)
def _attention_ggml(
    q, kt, vals, pos0, start, window, scale, softcap, batched, lanes, out
):  # pragma: no cover
    """Causal (windowed) GQA attention with ggml's exact arithmetic, L = lanes.

    q (n, n_heads, dk) f16-rounded; kt (n_kv, dk, T) keys transposed and vals (n_kv, T, dv),
    float32 cache rows of positions start..start+T-1; out (n, n_heads, dv). One task per head.
    softcap > 0: llama.cpp's graph on the raw scores, s * (1/cap) -> tanhf -> * cap, then scale.
    """
    kscale = np.float32(1.0) if softcap > 0 else scale
    inv_cap = np.float32(1.0) / softcap if softcap > 0 else np.float32(0.0)
    n, n_heads, _ = q.shape
    dv, n_keys = out.shape[2], kt.shape[2]
    group = n_heads // kt.shape[0]
    for h in numba.prange(n_heads):
        g = h // group
        acc4 = np.empty((4, lanes, max(_KEY_BLOCK, dv)), np.float32)
        chunks = np.empty((lanes, n_keys // lanes + 2), np.float32)
        scores = np.empty(n_keys, np.float32)
        for t in range(n):
            p = pos0 + t
            lo = max(start, p - window + 1) if window > 0 else start
            s = scores[: p + 1 - lo]
            _scores(q[t, h], kt[g], lo - start, p + 1 - lo, kscale, batched, acc4, s)
            if softcap > 0:
                for j in range(s.shape[0]):
                    s[j] = (math.tanh(s[j] * inv_cap) * softcap) * scale
            _softmax_ggml(s, lo, chunks)
            _weighted_values(s, lo, vals[g], lo - start, batched, acc4, out[t, h])
