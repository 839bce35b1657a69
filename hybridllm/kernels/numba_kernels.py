"""Numba fallback for the C++ core: dequantize, matmul (x @ W.T) and get_rows on raw GGML
blocks.

The contract is the one ``hybridllm._core`` exposes (the dispatcher validates its inputs,
and these functions check shapes once more, cheaply, so that a bad call raises instead of
reading out of bounds):

    dequantize(raw, qtype, rows, cols, out)            out: float32 (rows, cols)
    matmul(raw, qtype, rows, cols, x, out, n_threads)  x: float32 (n, cols), out: (n, rows)
    get_rows(raw, qtype, rows, cols, ids, out)         ids: int64 (k,), out: float32 (k, cols)

``raw`` is the weight's bytes, uint8 (rows, row_bytes), one GGML row per array row; each row
must be contiguous.

dequantize matches ``gguf.quants.dequantize`` bit for bit: same float operations in the
same order, and NaN payloads of F16/BF16/F32 copied as numpy does.

matmul follows llama.cpp's CPU path, as the C++ core does. The activations are quantized once
per call to the weight format's partner: Q8_0-like 32-blocks for Q4_0/Q5_0/Q8_0, the same
with block sums (Q8_1) for Q4_1/Q5_1, and Q8_K 256-blocks with 16-group sums for the
K-quants. The quantizer makes the same bytes as the C++ one, so the two backends agree to
~1e-7. Each block is then an exact integer dot product, scaled in float. The SIMD work is done
by the LLVM vector intrinsics in ``numba_simd``. With one to three activation rows (decode),
each output row is one parallel task. With more (prompt), the weight rows are cut into tiles,
and each weight block is decoded once per group of RB = 4 activation rows. The per-row
arithmetic does not depend on the path: a matvec equals its row of a matmul bit for bit.
F32/F16/BF16 weights use float dot products with f32 activations.

Compilation: each kernel family compiles on first use (legacy ~13 s, K-quants ~7 s, floats
~3 s, dequantize/get_rows ~6 s on a slow core) and is then cached on disk by Numba.
"""

from __future__ import annotations

import math
from typing import Any

import numba
import numpy as np
from numba import njit, prange

from .numba_simd import (
    CACHE,
    bf16_fma,
    bits_f32,
    f16_fma,
    f32_fma,
    fsum,
    fzero,
    i8_fma,
    ld_f16,
    ld_f16_exact,
    ld_f32,
    ld_i8,
    ld_u8,
    ld_u16,
    ld_u32,
    nib5_fma,
    nib_fma,
    q2k_block,
    q3k_block,
    q4_0_pair,
    q4_1_pair,
    q4k_block,
    q5_0_pair,
    q5_1_pair,
    q5k_block,
    q6k_block,
    q8_0_pair,
)

# GGML type ids (as stored in GGUF files).
F32 = 0
F16 = 1
Q4_0 = 2
Q4_1 = 3
Q5_0 = 6
Q5_1 = 7
Q8_0 = 8
Q2_K = 10
Q3_K = 11
Q4_K = 12
Q5_K = 13
Q6_K = 14
BF16 = 30

#: qtype -> (elements per block, bytes per block), as gguf.GGML_QUANT_SIZES.
BLOCK_SIZES: dict[int, tuple[int, int]] = {
    F32: (1, 4),
    F16: (1, 2),
    BF16: (1, 2),
    Q4_0: (32, 18),
    Q4_1: (32, 20),
    Q5_0: (32, 22),
    Q5_1: (32, 24),
    Q8_0: (32, 34),
    Q2_K: (256, 84),
    Q3_K: (256, 110),
    Q4_K: (256, 144),
    Q5_K: (256, 176),
    Q6_K: (256, 210),
}
SUPPORTED_TYPES: frozenset[int] = frozenset(BLOCK_SIZES)

_LEGACY_Q8_0 = (Q4_0, Q5_0, Q8_0)  # partner: Q8_0 activations
_LEGACY_Q8_1 = (Q4_1, Q5_1)  # partner: Q8_1 activations (scale + block sum)
_KQUANTS = (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)  # partner: Q8_K activations
_FLOATS = (F32, F16, BF16)

#: activation rows served per inner call in the prompt kernels (the *4 functions below).
RB = 4
#: weight rows per parallel task in the prompt (n >= RB) kernels: a tile of 16 rows is at
#: most 16 * 8.7 KB = 140 KB for an 8192-wide Q8_0 row, so it stays in L2 while all the
#: activation rows stream past it.
RT = 16


@njit(cache=CACHE)
def _type_size(qtype: int) -> tuple[int, int]:
    """(elements per block, bytes per block) of a supported qtype; (0, 0) otherwise."""
    if qtype == F32:
        return 1, 4
    if qtype == F16 or qtype == BF16:
        return 1, 2
    if qtype == Q4_0:
        return 32, 18
    if qtype == Q4_1:
        return 32, 20
    if qtype == Q5_0:
        return 32, 22
    if qtype == Q5_1:
        return 32, 24
    if qtype == Q8_0:
        return 32, 34
    if qtype == Q2_K:
        return 256, 84
    if qtype == Q3_K:
        return 256, 110
    if qtype == Q4_K:
        return 256, 144
    if qtype == Q5_K:
        return 256, 176
    if qtype == Q6_K:
        return 256, 210
    return 0, 0


@njit(cache=CACHE)
def _check_raw(raw: np.ndarray, qtype: int, rows: int, cols: int) -> int:
    """Raise unless raw holds ``rows`` rows of ``cols`` elements of qtype; return blocks/row."""
    bs, ts = _type_size(qtype)
    if bs == 0:
        raise ValueError("unsupported qtype")
    if rows < 0 or cols < 0 or cols % bs != 0:
        raise ValueError("cols must be a multiple of the block size")
    nb = cols // bs
    if raw.shape[0] < rows or raw.shape[1] < nb * ts:
        raise ValueError("raw is smaller than rows x row_bytes")
    if raw.shape[1] > 1 and raw.strides[1] != 1:
        raise ValueError("raw rows must be contiguous")
    return nb


# ---- activation quantization (the partner formats) ----------------------------------------
#
# 32-blocks as llama.cpp's quantize_row_q8_0 / _q8_1 (and the C++ core's ACT_Q8_32 / ACT_Q8_1,
# cpp/vecdot.cpp): d = amax / 127 stored as f16, q = nearest-even(x * (127 / amax)), and for Q8_1
# s = f16(d * sum(q)) from the unrounded float d. (The C++ SIMD path for Q4_0 / Q5_0 / Q5_1 keeps
# a float32 d.) Q8_K: d = amax / 127 as float32; llama.cpp computes that scale from the signed
# maximum (-127 / max), a ~1e-4 relative difference.


@njit(cache=CACHE, inline="always")
def _round_f16(x: np.float32) -> np.float32:
    """x rounded to the nearest IEEE half (ties to even), as float32 (F16C vcvtps2ph)."""
    if x == 0 or not np.isfinite(x):
        return x
    _, e = math.frexp(float(x))  # 2^(e-1) <= |x| < 2^e: half keeps 11 bits, subnormals 2^-24
    sp = max(e - 11, -24)
    r = np.float32(np.rint(float(x) * 2.0 ** (-sp)) * 2.0**sp)
    if abs(r) > np.float32(65504.0):
        return np.float32(np.inf) if x > 0 else np.float32(-np.inf)
    return r


@njit(cache=CACHE)
def _quant_block_q8(
    x: np.ndarray, i: int, b: int, yq: np.ndarray, yd: np.ndarray, ys: np.ndarray, with_sum: bool
) -> None:
    """Block b (32 values) of activation row i -> yq[i, 32b:], yd[i, b] (and the Q8_1 block
    sum ys[i, b] = d * sum(q), which the min term of Q4_1/Q5_1 needs)."""
    c0 = b * 32
    amax = np.float32(0.0)
    for j in range(32):
        amax = max(amax, abs(x[i, c0 + j]))
    idv = np.float32(127.0) / amax if amax != 0 else np.float32(0.0)
    s = 0
    for j in range(32):
        q = int(np.rint(x[i, c0 + j] * idv))
        yq[i, c0 + j] = q
        s += q
    d = amax / np.float32(127.0)
    yd[i, b] = _round_f16(d)
    if with_sum:
        ys[i, b] = _round_f16(d * np.float32(s))


@njit(cache=CACHE)
def _quant_block_q8_k(
    x: np.ndarray, i: int, b: int, yq: np.ndarray, yd: np.ndarray, bsums: np.ndarray
) -> None:
    """Super-block b (256 values) of activation row i -> yq, the float scale yd[i, b] and the
    16 group sums bsums[i, 16 b + g] (for the K-quant mins / offsets)."""
    c0 = b * 256
    amax = np.float32(0.0)
    for j in range(256):
        amax = max(amax, abs(x[i, c0 + j]))
    idv = np.float32(127.0) / amax if amax != 0 else np.float32(0.0)
    for g in range(16):
        s = 0
        for j in range(16):
            q = int(np.rint(x[i, c0 + 16 * g + j] * idv))
            yq[i, c0 + 16 * g + j] = q
            s += q
        bsums[i, b * 16 + g] = s
    yd[i, b] = amax / np.float32(127.0)


# ---- per-row dot products, legacy formats (Q8_0 / Q8_1 partners) -------------------------
#
# Common arguments: raw (uint8 weight), base = byte offset of the weight row, nb = blocks per
# row, yq = int8 activations (n, cols) read at element offset yo, yd = activation block scales
# (n, nb) at offset ydo, ys = Q8_1 block sums (n, nb) at ydo. The *4 variants serve RB = 4
# activation rows at once (element strides ycs for yq and yds for yd/ys) and return a tuple.


@njit(cache=CACHE, inline="always")
def _legacy_blk(
    qtype: int,
    acc: Any,
    raw: np.ndarray,
    base: int,
    b: int,
    yq: np.ndarray,
    yo: int,
    yd: np.ndarray,
    ydo: int,
) -> Any:
    """acc + lanes of the single block b of a weight row (the odd last block of a row)."""
    if qtype == Q4_0:
        o = base + b * 18
        return nib_fma(acc, raw, o + 2, 8, yq, yo + b * 32, 0, ld_f16(raw, o) * ld_f32(yd, ydo + b))
    if qtype == Q5_0:
        o = base + b * 22
        return nib5_fma(
            acc,
            raw,
            o + 6,
            ld_u32(raw, o + 2),
            16,
            yq,
            yo + b * 32,
            0,
            ld_f16(raw, o) * ld_f32(yd, ydo + b),
        )
    if qtype == Q8_0:
        o = base + b * 34
        return i8_fma(acc, raw, o + 2, yq, yo + b * 32, 0, ld_f16(raw, o) * ld_f32(yd, ydo + b))
    if qtype == Q4_1:
        o = base + b * 20
        return nib_fma(acc, raw, o + 4, 0, yq, yo + b * 32, 0, ld_f16(raw, o) * ld_f32(yd, ydo + b))
    o = base + b * 24  # Q5_1
    return nib5_fma(
        acc,
        raw,
        o + 8,
        ld_u32(raw, o + 4),
        0,
        yq,
        yo + b * 32,
        0,
        ld_f16(raw, o) * ld_f32(yd, ydo + b),
    )


@njit(cache=CACHE, inline="always")
def _legacy_pair(
    qtype: int,
    acc: Any,
    raw: np.ndarray,
    base: int,
    b: int,
    yq: np.ndarray,
    yo: int,
    ycs: int,
    yd: np.ndarray,
    ys: np.ndarray,
    ydo: int,
    yds: int,
) -> Any:
    """acc (+ per activation row) lanes of blocks b and b + 1 (one ``*_pair`` intrinsic)."""
    if qtype == Q4_0:
        return q4_0_pair(acc, raw, base + b * 18, yq, yo + b * 32, ycs, yd, yd, ydo + b, yds)
    if qtype == Q5_0:
        return q5_0_pair(acc, raw, base + b * 22, yq, yo + b * 32, ycs, yd, yd, ydo + b, yds)
    if qtype == Q8_0:
        return q8_0_pair(acc, raw, base + b * 34, yq, yo + b * 32, ycs, yd, yd, ydo + b, yds)
    if qtype == Q4_1:
        return q4_1_pair(acc, raw, base + b * 20, yq, yo + b * 32, ycs, yd, ys, ydo + b, yds)
    return q5_1_pair(acc, raw, base + b * 24, yq, yo + b * 32, ycs, yd, ys, ydo + b, yds)


@njit(cache=CACHE, inline="always")
def _legacy_tail_min(
    qtype: int, raw: np.ndarray, base: int, b: int, ys: np.ndarray, ydo: int
) -> np.float32:
    """Q4_1/Q5_1 min term m * s of the single block b (the pairs add theirs in-vector)."""
    if qtype == Q4_1:
        return ld_f16(raw, base + b * 20 + 2) * ld_f32(ys, ydo + b)
    if qtype == Q5_1:
        return ld_f16(raw, base + b * 24 + 2) * ld_f32(ys, ydo + b)
    return np.float32(0.0)


@njit(cache=CACHE, inline="always")
def _legacy_row(
    qtype: int,
    raw: np.ndarray,
    base: int,
    nb: int,
    yq: np.ndarray,
    yo: int,
    yd: np.ndarray,
    ys: np.ndarray,
    ydo: int,
) -> np.float32:
    # Pairs of blocks, alternating between two accumulators: a single FMA chain would be
    # latency-bound. _legacy_row4 repeats this order exactly, so that a matvec equals the
    # same row of a matmul bit for bit.
    a0 = fzero()
    a1 = fzero()
    tail = np.float32(0.0)
    b = 0
    while b + 4 <= nb:
        a0 = _legacy_pair(qtype, a0, raw, base, b, yq, yo, 0, yd, ys, ydo, 0)
        a1 = _legacy_pair(qtype, a1, raw, base, b + 2, yq, yo, 0, yd, ys, ydo, 0)
        b += 4
    if b + 2 <= nb:
        a0 = _legacy_pair(qtype, a0, raw, base, b, yq, yo, 0, yd, ys, ydo, 0)
        b += 2
    if b < nb:
        a1 = _legacy_blk(qtype, a1, raw, base, b, yq, yo, yd, ydo)
        tail = _legacy_tail_min(qtype, raw, base, b, ys, ydo)
    return fsum(a0) + fsum(a1) + tail


@njit(cache=CACHE)
def _dot1_legacy(
    qtype: int,
    raw: np.ndarray,
    base: int,
    nb: int,
    yq: np.ndarray,
    yo: int,
    yd: np.ndarray,
    ys: np.ndarray,
    ydo: int,
) -> np.float32:
    if qtype == Q4_0:
        return _legacy_row(Q4_0, raw, base, nb, yq, yo, yd, ys, ydo)
    if qtype == Q5_0:
        return _legacy_row(Q5_0, raw, base, nb, yq, yo, yd, ys, ydo)
    if qtype == Q8_0:
        return _legacy_row(Q8_0, raw, base, nb, yq, yo, yd, ys, ydo)
    if qtype == Q4_1:
        return _legacy_row(Q4_1, raw, base, nb, yq, yo, yd, ys, ydo)
    return _legacy_row(Q5_1, raw, base, nb, yq, yo, yd, ys, ydo)


@njit(cache=CACHE, inline="always")
def _sc4(d: np.float32, yd: np.ndarray, o: int, s: int) -> tuple:
    """(d * yd[o + k*s] for k < 4): per-activation-row block scales of a 4-row call."""
    return (
        d * ld_f32(yd, o),
        d * ld_f32(yd, o + s),
        d * ld_f32(yd, o + 2 * s),
        d * ld_f32(yd, o + 3 * s),
    )


@njit(cache=CACHE, inline="always")
def _fsum4(accs: tuple) -> tuple:
    return fsum(accs[0]), fsum(accs[1]), fsum(accs[2]), fsum(accs[3])


@njit(cache=CACHE, inline="always")
def _legacy_blk4(
    qtype: int,
    accs: Any,
    raw: np.ndarray,
    base: int,
    b: int,
    yq: np.ndarray,
    yo: int,
    ycs: int,
    yd: np.ndarray,
    ydo: int,
    yds: int,
) -> Any:
    """``_legacy_blk`` for RB = 4 activation rows (same per-row arithmetic)."""
    if qtype == Q4_0:
        o = base + b * 18
        return nib_fma(
            accs, raw, o + 2, 8, yq, yo + b * 32, ycs, _sc4(ld_f16(raw, o), yd, ydo + b, yds)
        )
    if qtype == Q5_0:
        o = base + b * 22
        return nib5_fma(
            accs,
            raw,
            o + 6,
            ld_u32(raw, o + 2),
            16,
            yq,
            yo + b * 32,
            ycs,
            _sc4(ld_f16(raw, o), yd, ydo + b, yds),
        )
    if qtype == Q8_0:
        o = base + b * 34
        return i8_fma(
            accs, raw, o + 2, yq, yo + b * 32, ycs, _sc4(ld_f16(raw, o), yd, ydo + b, yds)
        )
    if qtype == Q4_1:
        o = base + b * 20
        return nib_fma(
            accs, raw, o + 4, 0, yq, yo + b * 32, ycs, _sc4(ld_f16(raw, o), yd, ydo + b, yds)
        )
    o = base + b * 24  # Q5_1
    return nib5_fma(
        accs,
        raw,
        o + 8,
        ld_u32(raw, o + 4),
        0,
        yq,
        yo + b * 32,
        ycs,
        _sc4(ld_f16(raw, o), yd, ydo + b, yds),
    )


@njit(cache=CACHE, inline="always")
def _legacy_row4(
    qtype: int,
    raw: np.ndarray,
    base: int,
    nb: int,
    yq: np.ndarray,
    yo: int,
    ycs: int,
    yd: np.ndarray,
    ys: np.ndarray,
    ydo: int,
    yds: int,
) -> tuple:
    a0 = (fzero(), fzero(), fzero(), fzero())
    a1 = (fzero(), fzero(), fzero(), fzero())
    t0 = t1 = t2 = t3 = np.float32(0.0)
    b = 0
    while b + 4 <= nb:
        a0 = _legacy_pair(qtype, a0, raw, base, b, yq, yo, ycs, yd, ys, ydo, yds)
        a1 = _legacy_pair(qtype, a1, raw, base, b + 2, yq, yo, ycs, yd, ys, ydo, yds)
        b += 4
    if b + 2 <= nb:
        a0 = _legacy_pair(qtype, a0, raw, base, b, yq, yo, ycs, yd, ys, ydo, yds)
        b += 2
    if b < nb:
        a1 = _legacy_blk4(qtype, a1, raw, base, b, yq, yo, ycs, yd, ydo, yds)
        t0 = _legacy_tail_min(qtype, raw, base, b, ys, ydo)
        t1 = _legacy_tail_min(qtype, raw, base, b, ys, ydo + yds)
        t2 = _legacy_tail_min(qtype, raw, base, b, ys, ydo + 2 * yds)
        t3 = _legacy_tail_min(qtype, raw, base, b, ys, ydo + 3 * yds)
    f0 = _fsum4(a0)
    f1 = _fsum4(a1)
    return f0[0] + f1[0] + t0, f0[1] + f1[1] + t1, f0[2] + f1[2] + t2, f0[3] + f1[3] + t3


@njit(cache=CACHE)
def _dot4_legacy(
    qtype: int,
    raw: np.ndarray,
    base: int,
    nb: int,
    yq: np.ndarray,
    yo: int,
    ycs: int,
    yd: np.ndarray,
    ys: np.ndarray,
    ydo: int,
    yds: int,
) -> tuple:
    if qtype == Q4_0:
        return _legacy_row4(Q4_0, raw, base, nb, yq, yo, ycs, yd, ys, ydo, yds)
    if qtype == Q5_0:
        return _legacy_row4(Q5_0, raw, base, nb, yq, yo, ycs, yd, ys, ydo, yds)
    if qtype == Q8_0:
        return _legacy_row4(Q8_0, raw, base, nb, yq, yo, ycs, yd, ys, ydo, yds)
    if qtype == Q4_1:
        return _legacy_row4(Q4_1, raw, base, nb, yq, yo, ycs, yd, ys, ydo, yds)
    return _legacy_row4(Q5_1, raw, base, nb, yq, yo, ycs, yd, ys, ydo, yds)


# ---- per-row dot products, K-quants (Q8_K partner) ----------------------------------------
#
# yd = Q8_K scales (n, nb) at ydo, bs = Q8_K bsums (n, 16 nb) at bso (element offsets). Each
# super-block is one q*k_block intrinsic: exact int32 lanes scaled once by d * yd, and the
# "min" part of Q2_K/Q4_K/Q5_K from the activation group sums, as llama.cpp does.


@njit(cache=CACHE, inline="always")
def _k4_scale_min(raw: np.ndarray, so: int, j: int) -> tuple[int, int]:
    """6-bit (scale, min) j < 8 of a Q4_K/Q5_K super-block (12 packed bytes at raw[so])."""
    if j < 4:
        return ld_u8(raw, so + j) & 63, ld_u8(raw, so + j + 4) & 63
    sc = (ld_u8(raw, so + j + 4) & 0xF) | ((ld_u8(raw, so + j - 4) >> 6) << 4)
    m = (ld_u8(raw, so + j + 4) >> 4) | ((ld_u8(raw, so + j) >> 6) << 4)
    return sc, m


@njit(cache=CACHE, inline="always")
def _k3_scale(raw: np.ndarray, so: int, j: int) -> int:
    """Signed scale j < 16 of a Q3_K super-block: 4 low bits + 2 high bits, minus 32."""
    lo = ld_u8(raw, so + (j & 7))
    lo = (lo >> 4) if j >= 8 else (lo & 0xF)
    hi = (ld_u8(raw, so + 8 + (j & 3)) >> (2 * (j >> 2))) & 3
    return (lo | (hi << 4)) - 32


@njit(cache=CACHE)
def _dot1_k(
    qtype: int,
    raw: np.ndarray,
    base: int,
    nb: int,
    yq: np.ndarray,
    yo: int,
    yd: np.ndarray,
    ydo: int,
    bs: np.ndarray,
    bso: int,
) -> np.float32:
    acc = fzero()
    if qtype == Q4_K:
        for b in range(nb):
            acc = q4k_block(
                acc, raw, base + 144 * b, yq, yo + 256 * b, 0, yd, ydo + b, 0, bs, bso + 16 * b, 0
            )
    elif qtype == Q6_K:
        for b in range(nb):
            acc = q6k_block(
                acc, raw, base + 210 * b, yq, yo + 256 * b, 0, yd, ydo + b, 0, bs, bso + 16 * b, 0
            )
    elif qtype == Q5_K:
        for b in range(nb):
            acc = q5k_block(
                acc, raw, base + 176 * b, yq, yo + 256 * b, 0, yd, ydo + b, 0, bs, bso + 16 * b, 0
            )
    elif qtype == Q3_K:
        for b in range(nb):
            acc = q3k_block(
                acc, raw, base + 110 * b, yq, yo + 256 * b, 0, yd, ydo + b, 0, bs, bso + 16 * b, 0
            )
    else:
        for b in range(nb):
            acc = q2k_block(
                acc, raw, base + 84 * b, yq, yo + 256 * b, 0, yd, ydo + b, 0, bs, bso + 16 * b, 0
            )
    return fsum(acc)


@njit(cache=CACHE)
def _dot4_k(
    qtype: int,
    raw: np.ndarray,
    base: int,
    nb: int,
    yq: np.ndarray,
    yo: int,
    ycs: int,
    yd: np.ndarray,
    ydo: int,
    yds: int,
    bs: np.ndarray,
    bso: int,
    bss: int,
) -> tuple:
    accs = (fzero(), fzero(), fzero(), fzero())
    if qtype == Q4_K:
        for b in range(nb):
            accs = q4k_block(
                accs,
                raw,
                base + 144 * b,
                yq,
                yo + 256 * b,
                ycs,
                yd,
                ydo + b,
                yds,
                bs,
                bso + 16 * b,
                bss,
            )
    elif qtype == Q6_K:
        for b in range(nb):
            accs = q6k_block(
                accs,
                raw,
                base + 210 * b,
                yq,
                yo + 256 * b,
                ycs,
                yd,
                ydo + b,
                yds,
                bs,
                bso + 16 * b,
                bss,
            )
    elif qtype == Q5_K:
        for b in range(nb):
            accs = q5k_block(
                accs,
                raw,
                base + 176 * b,
                yq,
                yo + 256 * b,
                ycs,
                yd,
                ydo + b,
                yds,
                bs,
                bso + 16 * b,
                bss,
            )
    elif qtype == Q3_K:
        for b in range(nb):
            accs = q3k_block(
                accs,
                raw,
                base + 110 * b,
                yq,
                yo + 256 * b,
                ycs,
                yd,
                ydo + b,
                yds,
                bs,
                bso + 16 * b,
                bss,
            )
    else:
        for b in range(nb):
            accs = q2k_block(
                accs,
                raw,
                base + 84 * b,
                yq,
                yo + 256 * b,
                ycs,
                yd,
                ydo + b,
                yds,
                bs,
                bso + 16 * b,
                bss,
            )
    return _fsum4(accs)


# ---- per-row dot products, float weights ----------------------------------------------------


@njit(cache=CACHE, inline="always")
def _ftail(qtype: int, raw: np.ndarray, o: int) -> np.float32:
    """One F32/F16/BF16 weight at byte offset o."""
    if qtype == F32:
        return ld_f32(raw, o)
    if qtype == F16:
        return ld_f16(raw, o)
    return bits_f32(ld_u16(raw, o) << 16)


@njit(cache=CACHE)
def _dot1_float(
    qtype: int, raw: np.ndarray, base: int, cols: int, x: np.ndarray, xo: int
) -> np.float32:
    acc = fzero()
    nc = cols // 16
    if qtype == F32:
        for c in range(nc):
            acc = f32_fma(acc, raw, base + 64 * c, x, xo + 16 * c, 0)
    elif qtype == F16:
        for c in range(nc):
            acc = f16_fma(acc, raw, base + 32 * c, x, xo + 16 * c, 0)
    else:
        for c in range(nc):
            acc = bf16_fma(acc, raw, base + 32 * c, x, xo + 16 * c, 0)
    t = fsum(acc)
    es = 4 if qtype == F32 else 2
    for j in range(16 * nc, cols):
        t += _ftail(qtype, raw, base + es * j) * ld_f32(x, xo + j)
    return t


@njit(cache=CACHE)
def _dot4_float(
    qtype: int, raw: np.ndarray, base: int, cols: int, x: np.ndarray, xo: int, xs: int
) -> tuple:
    accs = (fzero(), fzero(), fzero(), fzero())
    nc = cols // 16
    if qtype == F32:
        for c in range(nc):
            accs = f32_fma(accs, raw, base + 64 * c, x, xo + 16 * c, xs)
    elif qtype == F16:
        for c in range(nc):
            accs = f16_fma(accs, raw, base + 32 * c, x, xo + 16 * c, xs)
    else:
        for c in range(nc):
            accs = bf16_fma(accs, raw, base + 32 * c, x, xo + 16 * c, xs)
    t0, t1, t2, t3 = _fsum4(accs)
    es = 4 if qtype == F32 else 2
    for j in range(16 * nc, cols):
        w = _ftail(qtype, raw, base + es * j)
        t0 += w * ld_f32(x, xo + j)
        t1 += w * ld_f32(x, xo + xs + j)
        t2 += w * ld_f32(x, xo + 2 * xs + j)
        t3 += w * ld_f32(x, xo + 3 * xs + j)
    return t0, t1, t2, t3


# ---- matmul drivers -----------------------------------------------------------------------
#
# Each driver quantizes x (n, cols) once into its partner format, then computes
# out[i, r] = dot(W[r], x[i]). n < RB: one parallel task per weight row (decode matvec).
# n >= RB: one task per tile of RT weight rows, with RB activation rows per inner call.


@njit(cache=CACHE)
def _check_mm(
    raw: np.ndarray, qtype: int, rows: int, cols: int, x: np.ndarray, out: np.ndarray
) -> int:
    nb = _check_raw(raw, qtype, rows, cols)
    n = x.shape[0]
    if x.shape[1] != cols or out.shape[0] != n or out.shape[1] != rows:
        raise ValueError("matmul shapes: x (n, cols), out (n, rows)")
    if n > 0 and cols > 0 and (x.strides[1] != 4 or x.strides[0] != 4 * cols):
        raise ValueError("x must be C-contiguous")
    return nb


@njit(cache=CACHE, parallel=True)
def _mm_legacy(
    raw: np.ndarray, qtype: int, rows: int, cols: int, x: np.ndarray, out: np.ndarray
) -> None:
    nb = _check_mm(raw, qtype, rows, cols, x, out)
    n = x.shape[0]
    with_sum = qtype == Q4_1 or qtype == Q5_1
    yq = np.empty((n, cols), np.int8)
    yd = np.empty((n, nb), np.float32)
    ys = np.zeros((n, nb) if with_sum else (1, 1), np.float32)  # Q8_1 block sums
    for t in prange(n * nb):
        _quant_block_q8(x, t // nb, t % nb, yq, yd, ys, with_sum)
    st = raw.strides[0]
    if n < RB:
        for r in prange(rows):
            for i in range(n):
                out[i, r] = _dot1_legacy(qtype, raw, r * st, nb, yq, i * cols, yd, ys, i * nb)
        return
    for t in prange((rows + RT - 1) // RT):
        r1 = min(rows, (t + 1) * RT)
        i = 0
        while i + RB <= n:
            for r in range(t * RT, r1):
                v = _dot4_legacy(qtype, raw, r * st, nb, yq, i * cols, cols, yd, ys, i * nb, nb)
                for k in range(RB):
                    out[i + k, r] = v[k]
            i += RB
        for i2 in range(i, n):
            for r in range(t * RT, r1):
                out[i2, r] = _dot1_legacy(qtype, raw, r * st, nb, yq, i2 * cols, yd, ys, i2 * nb)


@njit(cache=CACHE, parallel=True)
def _mm_k(
    raw: np.ndarray, qtype: int, rows: int, cols: int, x: np.ndarray, out: np.ndarray
) -> None:
    nb = _check_mm(raw, qtype, rows, cols, x, out)
    n = x.shape[0]
    yq = np.empty((n, cols), np.int8)
    yd = np.empty((n, nb), np.float32)
    bs = np.empty((n, 16 * nb), np.int32)
    for t in prange(n * nb):
        _quant_block_q8_k(x, t // nb, t % nb, yq, yd, bs)
    st = raw.strides[0]
    if n < RB:
        for r in prange(rows):
            for i in range(n):
                out[i, r] = _dot1_k(
                    qtype, raw, r * st, nb, yq, i * cols, yd, i * nb, bs, i * 16 * nb
                )
        return
    for t in prange((rows + RT - 1) // RT):
        r1 = min(rows, (t + 1) * RT)
        i = 0
        while i + RB <= n:
            for r in range(t * RT, r1):
                v = _dot4_k(
                    qtype,
                    raw,
                    r * st,
                    nb,
                    yq,
                    i * cols,
                    cols,
                    yd,
                    i * nb,
                    nb,
                    bs,
                    i * 16 * nb,
                    16 * nb,
                )
                for k in range(RB):
                    out[i + k, r] = v[k]
            i += RB
        for i2 in range(i, n):
            for r in range(t * RT, r1):
                out[i2, r] = _dot1_k(
                    qtype, raw, r * st, nb, yq, i2 * cols, yd, i2 * nb, bs, i2 * 16 * nb
                )


@njit(cache=CACHE, parallel=True)
def _mm_float(
    raw: np.ndarray, qtype: int, rows: int, cols: int, x: np.ndarray, out: np.ndarray
) -> None:
    _check_mm(raw, qtype, rows, cols, x, out)
    n = x.shape[0]
    st = raw.strides[0]
    if n < RB:
        for r in prange(rows):
            for i in range(n):
                out[i, r] = _dot1_float(qtype, raw, r * st, cols, x, i * cols)
        return
    for t in prange((rows + RT - 1) // RT):
        r1 = min(rows, (t + 1) * RT)
        i = 0
        while i + RB <= n:
            for r in range(t * RT, r1):
                v = _dot4_float(qtype, raw, r * st, cols, x, i * cols, cols)
                for k in range(RB):
                    out[i + k, r] = v[k]
            i += RB
        for i2 in range(i, n):
            for r in range(t * RT, r1):
                out[i2, r] = _dot1_float(qtype, raw, r * st, cols, x, i2 * cols)


# ---- dequantization (bit-exact with gguf.quants.dequantize) ---------------------------------


@njit(cache=CACHE)
def _dq_row(qtype: int, raw: np.ndarray, base: int, nb: int, dst: np.ndarray) -> None:
    """Dequantize one row (nb blocks from byte raw[base]) into the float32 row dst.

    Float operations are the oracle's, in its order (e.g. Q4_K: (d*sc)*q - dmin*m), in
    float32, without FMA contraction, so results agree bit for bit.
    """
    if qtype == F32:
        du = dst.view(np.uint32)
        for j in range(nb):
            du[j] = ld_u32(raw, base + 4 * j)
    elif qtype == F16:
        for j in range(nb):
            dst[j] = ld_f16_exact(raw, base + 2 * j)
    elif qtype == BF16:
        du = dst.view(np.uint32)
        for j in range(nb):
            du[j] = ld_u16(raw, base + 2 * j) << 16
    elif qtype == Q4_0 or qtype == Q4_1 or qtype == Q5_0 or qtype == Q5_1:
        _, ts = _type_size(qtype)
        has_m = qtype == Q4_1 or qtype == Q5_1
        five = qtype == Q5_0 or qtype == Q5_1
        for b in range(nb):
            o = base + b * ts
            d = ld_f16_exact(raw, o)
            m = ld_f16_exact(raw, o + 2) if has_m else np.float32(0.0)
            p = o + (4 if has_m else 2)
            qh = ld_u32(raw, p) if five else 0
            qs = p + (4 if five else 0)
            zero = 0 if has_m else (16 if five else 8)
            for j in range(16):
                byte = ld_u8(raw, qs + j)
                q0 = (byte & 0xF) | (((qh >> j) & 1) << 4)
                q1 = (byte >> 4) | (((qh >> (j + 16)) & 1) << 4)
                if has_m:
                    dst[b * 32 + j] = d * np.float32(q0) + m
                    dst[b * 32 + 16 + j] = d * np.float32(q1) + m
                else:
                    dst[b * 32 + j] = d * np.float32(q0 - zero)
                    dst[b * 32 + 16 + j] = d * np.float32(q1 - zero)
    elif qtype == Q8_0:
        for b in range(nb):
            o = base + b * 34
            d = ld_f16_exact(raw, o)
            for j in range(32):
                dst[b * 32 + j] = np.float32(ld_i8(raw, o + 2 + j)) * d
    elif qtype == Q2_K:
        for b in range(nb):
            o = base + b * 84
            d = ld_f16_exact(raw, o + 80)
            dmin = ld_f16_exact(raw, o + 82)
            for g in range(16):  # group of 16: e = 16 g + l = 128 h + 32 s + l'
                sc = ld_u8(raw, o + g)
                dl = d * np.float32(sc & 0xF)
                ml = dmin * np.float32(sc >> 4)
                h = g >> 3
                s = (g >> 1) & 3
                lo = 16 * (g & 1)
                for ll in range(16):
                    q = (ld_u8(raw, o + 16 + 32 * h + lo + ll) >> (2 * s)) & 3
                    dst[b * 256 + 16 * g + ll] = dl * np.float32(q) - ml
    elif qtype == Q3_K:
        for b in range(nb):
            o = base + b * 110
            d = ld_f16_exact(raw, o + 108)
            for g in range(16):
                dl = d * np.float32(_k3_scale(raw, o + 96, g))
                h = g >> 3
                s = (g >> 1) & 3
                lo = 16 * (g & 1)
                for ll in range(16):
                    q2 = (ld_u8(raw, o + 32 + 32 * h + lo + ll) >> (2 * s)) & 3
                    hb = (ld_u8(raw, o + lo + ll) >> (4 * h + s)) & 1
                    dst[b * 256 + 16 * g + ll] = dl * np.float32(q2 - 4 * (1 - hb))
    elif qtype == Q4_K or qtype == Q5_K:
        qoff = 16 if qtype == Q4_K else 48
        for b in range(nb):
            o = base + b * (144 if qtype == Q4_K else 176)
            d = ld_f16_exact(raw, o)
            dmin = ld_f16_exact(raw, o + 2)
            for j in range(8):  # sub-block of 32: low (j even) / high nibbles of qs[32 (j//2)]
                sc, m = _k4_scale_min(raw, o + 4, j)
                dd = d * np.float32(sc)
                dm = dmin * np.float32(m)
                for ll in range(32):
                    q = (ld_u8(raw, o + qoff + 32 * (j >> 1) + ll) >> (4 * (j & 1))) & 0xF
                    if qtype == Q5_K:
                        q |= ((ld_u8(raw, o + 16 + ll) >> j) & 1) << 4
                    dst[b * 256 + 32 * j + ll] = dd * np.float32(q) - dm
    elif qtype == Q6_K:
        for b in range(nb):
            o = base + b * 210
            d = ld_f16_exact(raw, o + 208)
            for g in range(16):  # e = 128 h + 32 f + l, group g = 8 h + 2 f + l // 16
                h = g >> 3
                f = (g >> 1) & 3
                lo = 16 * (g & 1)
                dd = d * np.float32(ld_i8(raw, o + 192 + g))
                for ll in range(16):
                    l_ = lo + ll
                    ql = (ld_u8(raw, o + 64 * h + 32 * (f & 1) + l_) >> (4 * (f >> 1))) & 0xF
                    qh = (ld_u8(raw, o + 128 + 32 * h + l_) >> (2 * f)) & 3
                    dst[b * 256 + 16 * g + ll] = dd * np.float32((ql | (qh << 4)) - 32)


@njit(cache=CACHE, parallel=True)
def _dequantize(raw: np.ndarray, qtype: int, rows: int, cols: int, out: np.ndarray) -> None:
    nb = _check_raw(raw, qtype, rows, cols)
    if out.shape[0] != rows or out.shape[1] != cols or (cols > 1 and out.strides[1] != 4):
        raise ValueError("out must be float32 (rows, cols) with contiguous rows")
    st = raw.strides[0]
    for r in prange(rows):
        _dq_row(qtype, raw, r * st, nb, out[r])


@njit(cache=CACHE, parallel=True)
def _get_rows(
    raw: np.ndarray, qtype: int, rows: int, cols: int, ids: np.ndarray, out: np.ndarray
) -> None:
    nb = _check_raw(raw, qtype, rows, cols)
    k = ids.shape[0]
    if out.shape[0] != k or out.shape[1] != cols or (cols > 1 and out.strides[1] != 4):
        raise ValueError("out must be float32 (len(ids), cols) with contiguous rows")
    for t in range(k):
        if ids[t] < 0 or ids[t] >= rows:
            raise IndexError("row id out of range")
    st = raw.strides[0]
    for t in prange(k):
        _dq_row(qtype, raw, ids[t] * st, nb, out[t])


# ---- public API -------------------------------------------------------------------------------


def _set_threads(n_threads: int) -> None:
    """numba.set_num_threads(n) clamped to [1, NUMBA_NUM_THREADS]; n <= 0 means all."""
    cap = numba.config.NUMBA_NUM_THREADS
    n = cap if n_threads <= 0 else min(int(n_threads), cap)
    if numba.get_num_threads() != n:
        numba.set_num_threads(n)


def dequantize(raw: np.ndarray, qtype: int, rows: int, cols: int, out: np.ndarray) -> None:
    """out[:rows, :cols] = the float32 values of the GGML rows in ``raw`` (bit-exact).

    raw: uint8 (rows, row_bytes); out: float32 (rows, cols).
    """
    _dequantize(raw, int(qtype), int(rows), int(cols), out)


def matmul(
    raw: np.ndarray,
    qtype: int,
    rows: int,
    cols: int,
    x: np.ndarray,
    out: np.ndarray,
    n_threads: int,
) -> None:
    """out = x @ W.T for the GGML weight W (rows, cols) in ``raw``, as llama.cpp's CPU path.

    x: float32 (n, cols) C-contiguous; out: float32 (n, rows); n_threads <= 0: all threads.
    """
    q = int(qtype)
    _set_threads(n_threads)
    if q in _KQUANTS:
        _mm_k(raw, q, int(rows), int(cols), x, out)
    elif q in _FLOATS:
        _mm_float(raw, q, int(rows), int(cols), x, out)
    elif q in _LEGACY_Q8_0 or q in _LEGACY_Q8_1:
        _mm_legacy(raw, q, int(rows), int(cols), x, out)
    else:
        raise ValueError(f"unsupported qtype {qtype}")


def get_rows(
    raw: np.ndarray, qtype: int, rows: int, cols: int, ids: np.ndarray, out: np.ndarray
) -> None:
    """out[t] = dequantized row ids[t] of the GGML weight in ``raw`` (embedding lookup).

    ids: int64 (k,); out: float32 (k, cols).
    """
    _get_rows(raw, int(qtype), int(rows), int(cols), ids, out)
