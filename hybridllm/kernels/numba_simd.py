"""LLVM vector primitives for the Numba kernels (used from ``@njit`` code only).

Why this module exists: Numba's auto-vectoriser does not turn the per-block inner loops of
the GGML formats into SIMD code. Signed array indices get wrap-around checks, small ints are
widened to int64, and LLVM prefers to vectorise the *block* loop with gathers. A plain Numba
Q4_0 matvec runs at ~1.5 GB/s. The ``@intrinsic`` functions here emit portable LLVM vector IR
(unaligned ``<N x i8>`` loads, shifts, masks, i32 multiplies, conversions, fmuladd). LLVM
lowers it to AVX-512, AVX2, SSE or NEON for the host. That is the llama.cpp SIMD scheme,
written once for every ISA.

A small Numba type, ``F32X16`` (``<16 x float>``), holds a SIMD accumulator in an ordinary
``@njit`` variable. A kernel keeps one accumulator (or a tuple of R accumulators, one per
activation row) across the block loop. It reduces it to a scalar once per output, as
llama.cpp's AVX2 kernels do, rather than once per block.

Kernels, by format family (all exact int32 dot products, scaled once per block in float):
- ``*_pair``: two consecutive 32-blocks (Q4_0 Q4_1 Q5_0 Q5_1 Q8_0) per call;
- ``nib_fma``/``nib5_fma``/``i8_fma``: one 32-block (the odd last block of a row);
- ``q2k_block`` .. ``q6k_block``: one 256-weight K-quant super-block;
- ``f32_fma``/``f16_fma``/``bf16_fma``: 16 float weights.
On x86 with AVX-512 VNNI (``ISA == "vnni512"``) the integer dots use vpdpbusd; elsewhere
they use portable IR shaped so that x86 gets vpmaddwd. Both give the same integer sums.

Numba's on-disk cache is keyed on the source file of each cached function, not on the
modules it calls. So after editing this file, delete ``hybridllm/kernels/__pycache__/*.nb[ic]``,
or numba_kernels keeps running the old intrinsics. A reinstall rewrites both files, which
invalidates the cache.

Conventions:
- ``w`` is any uint8 array (usually the raw 2-D weight). Offsets into it are *byte* offsets
  from the start of its buffer, so row ``r`` of a raw weight starts at ``r * raw.strides[0]``.
- ``y`` is an int8 array (quantized activations). ``yo`` is an element offset and ``ys`` the
  element stride between the R activation rows that one call serves. R is 1 when the
  accumulator argument is a single vector, or ``len(tuple)`` when it is a tuple of vectors.
  Per-row float scales are then a float32 or a ``UniTuple(float32, R)`` too.
- ``x`` is a float32 array (float activations); offsets in elements.
- Scalar loads (``ld_*``) take an element offset into an array of any dtype.
- Nothing is bounds-checked here: the kernels check shapes once, before their loops.
- Integer lanes are exact: |q * y| <= 32 * 128 and |lane| <= 16 * 32 * 128 * 128 < 2**31.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from typing import Any

import llvmlite.binding as llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

LANES = 16

_I8 = ir.IntType(8)
_I16 = ir.IntType(16)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_F16 = ir.HalfType()
_F32 = ir.FloatType()


#: HYBRIDLLM_NUMBA_SIMD=generic forces the portable IR (no F16C / VNNI instructions), to test
#: that path on any machine. Numba's on-disk cache key does not see this choice, so kernels
#: are not cached while it is set (see ``CACHE``).
FORCE_GENERIC = os.environ.get("HYBRIDLLM_NUMBA_SIMD", "").strip().lower() == "generic"


def _host_features() -> dict[str, bool]:
    try:
        return {k: bool(v) for k, v in llvm.get_host_cpu_features().items()}
    except RuntimeError:  # features unknown on this host: portable code only
        return {}


def _host_has_half_convert(feats: dict[str, bool]) -> bool:
    """True when LLVM lowers ``fpext half`` to one instruction (x86 F16C, AArch64)."""
    if platform.machine().lower() in ("aarch64", "arm64"):
        return True
    return feats.get("f16c", False)


_FEATS = {} if FORCE_GENERIC else _host_features()
_HALF_CVT = not FORCE_GENERIC and _host_has_half_convert(_FEATS)
#: x86 AVX-512 VNNI (Zen 4, Ice Lake and later): the 32-block pairs use vpdpbusd on zmm.
VNNI512 = all(_FEATS.get(f, False) for f in ("avx512f", "avx512bw", "avx512vl", "avx512vnni"))
#: instruction set the block kernels are built for ("vnni512" or "generic"), for reports.
ISA = "vnni512" if VNNI512 else "generic"
#: whether kernels may be cached on disk (False while the ISA is forced by the environment).
CACHE = not FORCE_GENERIC


# ---- Numba types for SIMD registers -------------------------------------------------------


class SimdVec(types.Type):
    """A ``<16 x float>`` accumulator living in registers."""

    def __init__(self) -> None:
        super().__init__(name=f"SimdVec(f32x{LANES})")


F32X16 = SimdVec()


@register_model(SimdVec)
class _SimdVecModel(models.PrimitiveModel):
    def __init__(self, dmm: Any, fe_type: SimdVec) -> None:
        super().__init__(dmm, fe_type, ir.VectorType(_F32, LANES))


# ---- IR helpers -----------------------------------------------------------------------------


def _vty(t: ir.Type, n: int) -> ir.VectorType:
    return ir.VectorType(t, n)


def _const(t: ir.Type, v: int | float) -> ir.Constant:
    """A scalar constant, or a splat of it when ``t`` is a vector type."""
    if isinstance(t, ir.VectorType):
        return ir.Constant(t, [v] * t.count)
    return ir.Constant(t, v)


def _splat(builder: ir.IRBuilder, v: ir.Value, n: int) -> ir.Value:
    vt = _vty(v.type, n)
    undef = ir.Constant(vt, ir.Undefined)
    t = builder.insert_element(undef, v, ir.Constant(_I32, 0))
    return builder.shuffle_vector(t, undef, ir.Constant(_vty(_I32, n), [0] * n))


def _ptr(
    context: Any,
    builder: ir.IRBuilder,
    aryty: types.Array,
    ary: ir.Value,
    offty: types.Type,
    off: ir.Value,
    llty: ir.Type,
) -> ir.Value:
    """Pointer to element ``off`` of the array's buffer, typed as ``llty*`` (no checks)."""
    data = context.make_array(aryty)(context, builder, ary).data
    off64 = context.cast(builder, off, offty, types.int64)
    return builder.bitcast(builder.gep(data, [off64]), llty.as_pointer())


def _load(builder: ir.IRBuilder, ptr: ir.Value, llty: ir.Type) -> ir.Value:
    # align=1: GGUF rows and blocks sit at arbitrary byte addresses.
    return builder.load(ptr, align=1, typ=llty)


def _i32(context: Any, builder: ir.IRBuilder, ty: types.Type, v: ir.Value) -> ir.Value:
    return context.cast(builder, v, ty, types.int32)


def _i64(context: Any, builder: ir.IRBuilder, ty: types.Type, v: ir.Value) -> ir.Value:
    return context.cast(builder, v, ty, types.int64)


def _call_intr(
    builder: ir.IRBuilder,
    name: str,
    ret: ir.Type,
    args: list[ir.Value],
    fastmath: tuple[str, ...] = (),
) -> ir.Value:
    fnty = ir.FunctionType(ret, [a.type for a in args])
    fn = cgutils.get_or_insert_function(builder.module, fnty, name)
    return builder.call(fn, args, fastmath=fastmath)


def _fmuladd(builder: ir.IRBuilder, a: ir.Value, b: ir.Value, c: ir.Value) -> ir.Value:
    """a * b + c; the backend fuses it into an FMA where the target has one."""
    return _call_intr(builder, f"llvm.fmuladd.v{a.type.count}f32", a.type, [a, b, c])


def _half_bits_to_f32(builder: ir.IRBuilder, h: ir.Value, hw: bool = _HALF_CVT) -> ir.Value:
    """Exact IEEE half -> float for i32 (or <N x i32>) values holding 16-bit patterns.

    With ``hw`` (F16C/AArch64) this is ``fpext half``: one instruction, exact for numbers,
    but the hardware quiets signalling NaNs. Otherwise it is branch-free integer code with no
    float denormals, so it does not depend on FTZ/DAZ and keeps NaN bits exactly as numpy's
    ``astype`` does. Normals re-bias the exponent with an integer add, and subnormals are
    ``float(m) * 2**-24`` (exact).
    """
    t = h.type
    vec = isinstance(t, ir.VectorType)
    ft = _vty(_F32, t.count) if vec else _F32
    if hw:
        ht = _vty(_F16, t.count) if vec else _F16
        h16 = builder.trunc(h, _vty(_I16, t.count) if vec else _I16)
        return builder.fpext(builder.bitcast(h16, ht), ft)
    em = builder.and_(h, _const(t, 0x7FFF))
    sign = builder.shl(builder.and_(h, _const(t, 0x8000)), _const(t, 16))
    shifted = builder.shl(em, _const(t, 13))
    normal = builder.add(shifted, _const(t, (127 - 15) << 23))
    infnan = builder.or_(shifted, _const(t, 0x7F800000))
    sub = builder.bitcast(builder.fmul(builder.sitofp(em, ft), _const(ft, 2.0**-24)), t)
    is_sub = builder.icmp_unsigned("<", em, _const(t, 0x0400))
    is_inf = builder.icmp_unsigned(">=", em, _const(t, 0x7C00))
    bits = builder.select(is_sub, sub, builder.select(is_inf, infnan, normal))
    return builder.bitcast(builder.or_(bits, sign), ft)


def _n_rows(accty: types.Type) -> int:
    """R for an accumulator argument: 1 for a SimdVec, len() for a UniTuple of them, 0 (no
    match: the intrinsic then refuses the signature) otherwise."""
    if isinstance(accty, SimdVec):
        return 1
    if isinstance(accty, types.UniTuple) and isinstance(accty.dtype, SimdVec):
        return accty.count
    return 0


def _unpack(builder: ir.IRBuilder, ty: types.Type, v: ir.Value, r: int) -> list[ir.Value]:
    if isinstance(ty, types.BaseTuple):
        return [builder.extract_value(v, k) for k in range(r)]
    return [v] * r


def _pack(context: Any, builder: ir.IRBuilder, retty: types.Type, vals: list[ir.Value]) -> ir.Value:
    if isinstance(retty, types.BaseTuple):
        return context.make_tuple(builder, retty, vals)
    return vals[0]


def _scales_ok(ty: types.Type, r: int, elem: type) -> bool:
    if r == 1:
        return isinstance(ty, elem)
    return isinstance(ty, types.UniTuple) and ty.count == r and isinstance(ty.dtype, elem)


def _y16(
    context: Any,
    builder: ir.IRBuilder,
    yty: types.Array,
    y: ir.Value,
    yoty: Any,
    yo: ir.Value,
    ysty: Any,
    ys: ir.Value,
    r: int,
) -> list[ir.Value]:
    """The r int8 activation vectors y[yo + k*ys : + 32], sign-extended to <32 x i16>."""
    yo64 = _i64(context, builder, yoty, yo)
    ys64 = _i64(context, builder, ysty, ys)
    n = 2 * LANES
    out = []
    for k in range(r):
        off = builder.add(yo64, builder.mul(ys64, ir.Constant(_I64, k)))
        v = _load(
            builder, _ptr(context, builder, yty, y, types.int64, off, _vty(_I8, n)), _vty(_I8, n)
        )
        out.append(builder.sext(v, _vty(_I16, n)))
    return out


def _pmadd(builder: ir.IRBuilder, q: ir.Value, yv: ir.Value) -> ir.Value:
    """<32 x i16> weights . <32 x i16> activations -> <16 x i32>: lane j = q[2j]*y[2j] +
    q[2j+1]*y[2j+1] (exact). This even/odd shape is the pattern x86 lowers to one vpmaddwd.
    Lanes 0..7 only see elements 0..15 and lanes 8..15 elements 16..31, which lets
    K-quants give the two 16-element halves different scales."""
    n = 2 * LANES
    p = builder.mul(builder.sext(q, _vty(_I32, n)), builder.sext(yv, _vty(_I32, n)))
    undef = ir.Constant(p.type, ir.Undefined)
    ev = builder.shuffle_vector(p, undef, ir.Constant(_vty(_I32, LANES), list(range(0, n, 2))))
    od = builder.shuffle_vector(p, undef, ir.Constant(_vty(_I32, LANES), list(range(1, n, 2))))
    return builder.add(ev, od)


def _scale_vec(
    context: Any, builder: ir.IRBuilder, st: types.Type, sv: ir.Value, r: int, k: int
) -> ir.Value:
    """Splat of float scale k of a float32 (r == 1) or UniTuple(float32, r) argument."""
    v = builder.extract_value(sv, k) if isinstance(st, types.BaseTuple) else sv
    ety = st.dtype if isinstance(st, types.BaseTuple) else st
    return _splat(builder, context.cast(builder, v, ety, types.float32), LANES)


# ---- scalar loads and bit casts -----------------------------------------------------------


def _make_scalar_load(llty: ir.Type, nbty: types.Type, conv: Callable | None = None) -> Callable:
    def impl(typingctx: Any, a: types.Type, o: types.Type) -> Any:
        if not isinstance(a, types.Array) or not isinstance(o, types.Integer):
            return None

        def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
            p = _ptr(context, builder, sig.args[0], args[0], sig.args[1], args[1], llty)
            v = _load(builder, p, llty)
            return conv(builder, v) if conv is not None else v

        return nbty(a, o), codegen

    return intrinsic(impl)


def _zext64(builder: ir.IRBuilder, v: ir.Value) -> ir.Value:
    return builder.zext(v, _I64)


def _sext64(builder: ir.IRBuilder, v: ir.Value) -> ir.Value:
    return builder.sext(v, _I64)


def _u16_to_f32(builder: ir.IRBuilder, v: ir.Value) -> ir.Value:
    return _half_bits_to_f32(builder, builder.zext(v, _I32))


def _u16_to_f32_bits_exact(builder: ir.IRBuilder, v: ir.Value) -> ir.Value:
    return _half_bits_to_f32(builder, builder.zext(v, _I32), hw=False)


#: ``ld_u8(a, off)`` etc.: unaligned, unchecked loads at element ``off`` of ``a``. Integers
#: come back zero- (u) or sign- (i) extended to int64: Numba's mixed unsigned/signed
#: arithmetic would otherwise promote to float64.
ld_u8 = _make_scalar_load(_I8, types.int64, _zext64)
ld_i8 = _make_scalar_load(_I8, types.int64, _sext64)
ld_u16 = _make_scalar_load(_I16, types.int64, _zext64)
ld_u32 = _make_scalar_load(_I32, types.int64, _zext64)
ld_f32 = _make_scalar_load(_F32, types.float32)
#: ``ld_f16(w, byte_off) -> float32``: the IEEE half at ``w[off:off+2]``, converted exactly
#: (hardware conversion where there is one; signalling NaNs come back quieted).
ld_f16 = _make_scalar_load(_I16, types.float32, _u16_to_f32)
#: As ld_f16, but NaN payloads are kept bit for bit as numpy does (integer path): dequantize.
ld_f16_exact = _make_scalar_load(_I16, types.float32, _u16_to_f32_bits_exact)


@intrinsic
def bits_f32(typingctx: Any, b: types.Type) -> Any:
    """The float32 whose IEEE bits are the low 32 bits of an integer."""
    if not isinstance(b, types.Integer):
        return None

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        v = context.cast(builder, args[0], sig.args[0], types.uint32)
        return builder.bitcast(v, _F32)

    return types.float32(b), codegen


# ---- accumulators ---------------------------------------------------------------------------


@intrinsic
def fzero(typingctx: Any) -> Any:
    """A zero F32X16 accumulator."""

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        return ir.Constant(_vty(_F32, LANES), [0.0] * LANES)

    return F32X16(), codegen


@intrinsic
def fsum(typingctx: Any, acc: types.Type) -> Any:
    """Horizontal sum of an F32X16 (tree order) -> float32."""
    if acc != F32X16:
        return None

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        return _call_intr(
            builder,
            f"llvm.vector.reduce.fadd.v{LANES}f32",
            _F32,
            [ir.Constant(_F32, 0.0), args[0]],
            fastmath=("reassoc",),
        )

    return types.float32(acc), codegen


# ---- block kernels --------------------------------------------------------------------------


def _make_nib_fma(with_high: bool) -> Callable:
    """One 32-weight block of Q4_0/Q4_1 (``nib_fma``) or Q5_0/Q5_1 (``nib5_fma``).

    ``nib_fma(acc, w, qo, off, y, yo, ys, scale)`` and
    ``nib5_fma(acc, w, qo, hmask, off, y, yo, ys, scale)`` add
    ``scale * (q_j - off) * y[yo + k*ys + j]`` to the float lanes of acc. The 16 bytes at
    ``w[qo]`` hold element j in the low nibble of byte j and element j+16 in the high nibble.
    Bit j of the uint32 ``hmask`` adds 16 to element j. ``off`` is the zero point, subtracted
    in integers (8 or 16; 0 for the _1 formats). Lane sums are exact ints, scaled once in float.
    """

    def typer(acc: Any, rest: tuple) -> Any:
        r = _n_rows(acc)
        if r == 0 or not _scales_ok(rest[-1], r, types.Float):
            return None
        return acc(acc, *rest)

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        r = _n_rows(sig.args[0])
        at, wt, qot = sig.args[:3]
        accv, wv, qov = args[:3]
        if with_high:
            ht, oft, yt, yot, yst, st = sig.args[3:]
            hv, ofv, yv, yov, ysv, sv = args[3:]
        else:
            oft, yt, yot, yst, st = sig.args[3:]
            ofv, yv, yov, ysv, sv = args[3:]
        v16 = _vty(_I8, LANES)
        vi = _vty(_I16, LANES)
        n = 2 * LANES
        b = builder.zext(_load(builder, _ptr(context, builder, wt, wv, qot, qov, v16), v16), vi)
        lo = builder.and_(b, _const(vi, 15))
        hi = builder.lshr(b, _const(vi, 4))
        q = builder.shuffle_vector(lo, hi, ir.Constant(_vty(_I32, n), list(range(n))))
        if with_high:
            h = context.cast(builder, hv, ht, types.uint32)
            hlo = _splat(builder, builder.trunc(h, _I16), LANES)
            hhi = _splat(
                builder, builder.trunc(builder.lshr(h, ir.Constant(_I32, 16)), _I16), LANES
            )
            hv32 = builder.shuffle_vector(hlo, hhi, ir.Constant(_vty(_I32, n), list(range(n))))
            bit = ir.Constant(_vty(_I16, n), [1 << (j % 16) for j in range(n)])
            set_ = builder.icmp_unsigned("!=", builder.and_(hv32, bit), _const(bit.type, 0))
            q = builder.or_(q, builder.select(set_, _const(bit.type, 16), _const(bit.type, 0)))
        q = builder.sub(
            q, _splat(builder, builder.trunc(_i32(context, builder, oft, ofv), _I16), n)
        )
        yvs = _y16(context, builder, yt, yv, yot, yov, yst, ysv, r)
        accs = _unpack(builder, at, accv, r)
        out = []
        for k in range(r):
            p = builder.sitofp(_pmadd(builder, q, yvs[k]), _vty(_F32, LANES))
            out.append(_fmuladd(builder, p, _scale_vec(context, builder, st, sv, r, k), accs[k]))
        return _pack(context, builder, sig.return_type, out)

    if with_high:

        def impl(
            typingctx: Any,
            acc: Any,
            w: Any,
            qo: Any,
            hmask: Any,
            off: Any,
            y: Any,
            yo: Any,
            ys: Any,
            scale: Any,
        ) -> Any:
            sig = typer(acc, (w, qo, hmask, off, y, yo, ys, scale))
            return None if sig is None else (sig, codegen)
    else:

        def impl(
            typingctx: Any,
            acc: Any,
            w: Any,
            qo: Any,
            off: Any,
            y: Any,
            yo: Any,
            ys: Any,
            scale: Any,
        ) -> Any:
            sig = typer(acc, (w, qo, off, y, yo, ys, scale))
            return None if sig is None else (sig, codegen)

    return intrinsic(impl)


nib_fma = _make_nib_fma(False)
nib5_fma = _make_nib_fma(True)


@intrinsic
def i8_fma(typingctx: Any, acc: Any, w: Any, o: Any, y: Any, yo: Any, ys: Any, scale: Any) -> Any:
    """One Q8_0 block: acc += scale * (q * y) for the 32 int8 weights at ``w[o]``."""
    r = _n_rows(acc)
    if r == 0 or not _scales_ok(scale, r, types.Float):
        return None

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        at, wt, ot, yt, yot, yst, st = sig.args
        accv, wv, ov, yv, yov, ysv, sv = args
        n = 2 * LANES
        vb = _vty(_I8, n)
        q = builder.sext(
            _load(builder, _ptr(context, builder, wt, wv, ot, ov, vb), vb), _vty(_I16, n)
        )
        yvs = _y16(context, builder, yt, yv, yot, yov, yst, ysv, r)
        accs = _unpack(builder, at, accv, r)
        out = []
        for k in range(r):
            p = builder.sitofp(_pmadd(builder, q, yvs[k]), _vty(_F32, LANES))
            out.append(_fmuladd(builder, p, _scale_vec(context, builder, st, sv, r, k), accs[k]))
        return _pack(context, builder, sig.return_type, out)

    return acc(acc, w, o, y, yo, ys, scale), codegen


# ---- pairs of 32-blocks (Q4_0 Q4_1 Q5_0 Q5_1 Q8_0) -------------------------------------------
#
# Two consecutive blocks A, B decode into 64 unsigned byte codes laid out like their 64
# activations [A 0-31 | B 0-31]. Lane g of the int32 result is the exact dot of the four codes
# 4g..4g+3 (lanes 0-7: A, 8-15: B) with the activations. The code offset (zero point: 8, 16, or
# 128 for Q8_0's signed bytes) is removed exactly as zp * (sum of those 4 activations). One
# fmuladd then scales the lanes by [dA * dyA x8 | dB * dyB x8]. VNNI512 does the dot with two
# vpdpbusd; the portable path widens to i16 and uses vpmaddwd-shaped IR, giving the same lanes.

# fmt -> (bytes per block, offset of the codes, offset of the 32 high bits or -1, zero point)
_PAIR_FORMATS = {
    "q4_0": (18, 2, -1, 8),
    "q4_1": (20, 4, -1, 0),
    "q5_0": (22, 6, 2, 16),
    "q5_1": (24, 8, 4, 0),
    "q8_0": (34, 2, -1, 128),
}


def _pair_codes(builder: ir.IRBuilder, wl: Callable, fmt: str) -> ir.Value:
    """<64 x i8> unsigned codes of blocks A (at 0) and B (at one block size)."""
    ts, qs, qh, _ = _PAIR_FORMATS[fmt]
    v64 = _vty(_I32, 64)
    if fmt == "q8_0":
        both = builder.shuffle_vector(
            wl(qs, _vty(_I8, 32)), wl(ts + qs, _vty(_I8, 32)), ir.Constant(v64, list(range(64)))
        )
        return builder.xor(both, _const(both.type, 0x80))  # int8 q -> q + 128 as uint8
    v = builder.shuffle_vector(
        wl(qs, _vty(_I8, 16)),
        wl(ts + qs, _vty(_I8, 16)),
        ir.Constant(_vty(_I32, 32), list(range(32))),
    )
    lo = builder.and_(v, _const(v.type, 15))
    hi = builder.lshr(v, _const(v.type, 4))
    order = list(range(0, 16)) + list(range(32, 48)) + list(range(16, 32)) + list(range(48, 64))
    codes = builder.shuffle_vector(lo, hi, ir.Constant(v64, order))
    if qh >= 0:  # bit j of (qhA | qhB << 32) adds 16 to code j
        bits = builder.or_(
            builder.zext(wl(qh, _I32), _I64),
            builder.shl(builder.zext(wl(ts + qh, _I32), _I64), ir.Constant(_I64, 32)),
        )
        mask = builder.bitcast(bits, _vty(ir.IntType(1), 64))
        codes = builder.or_(
            codes, builder.select(mask, _const(codes.type, 16), _const(codes.type, 0))
        )
    return codes


def _pair_dot(builder: ir.IRBuilder, codes: ir.Value, yv: ir.Value, zp: int) -> ir.Value:
    """<16 x i32>: lane g = sum_{j<4} (codes[4g+j] - zp) * y[4g+j], exact."""
    v16 = _vty(_I32, LANES)
    if VNNI512:
        zero = ir.Constant(v16, [0] * LANES)
        yi = builder.bitcast(yv, v16)
        dot = _call_intr(
            builder, "llvm.x86.avx512.vpdpbusd.512", v16, [zero, builder.bitcast(codes, v16), yi]
        )
        if zp:
            rep = zp * 0x01010101  # zp in every byte
            zpv = ir.Constant(v16, [rep - (1 << 32) if rep >= 1 << 31 else rep] * LANES)
            dot = builder.sub(
                dot, _call_intr(builder, "llvm.x86.avx512.vpdpbusd.512", v16, [zero, zpv, yi])
            )
        return dot
    q16 = builder.zext(codes, _vty(_I16, 64))
    if zp:
        q16 = builder.sub(q16, _const(q16.type, zp))
    y16 = builder.sext(yv, _vty(_I16, 64))
    halves = []
    for h in range(2):  # per block: pairs (vpmaddwd) then pairs of pairs
        idx = ir.Constant(_vty(_I32, 32), list(range(32 * h, 32 * h + 32)))
        p = _pmadd(
            builder, builder.shuffle_vector(q16, q16, idx), builder.shuffle_vector(y16, y16, idx)
        )
        u = ir.Constant(p.type, ir.Undefined)
        ev = builder.shuffle_vector(p, u, ir.Constant(_vty(_I32, 8), list(range(0, 16, 2))))
        od = builder.shuffle_vector(p, u, ir.Constant(_vty(_I32, 8), list(range(1, 16, 2))))
        halves.append(builder.add(ev, od))
    return builder.shuffle_vector(halves[0], halves[1], ir.Constant(v16, list(range(LANES))))


def _make_pair(fmt: str) -> Callable:
    """``<fmt>_pair(acc, w, o, y, yo, ys, yd, ym, ydo, yds)``: blocks at w[o] and w[o + size]
    against activations y[yo + k*ys:][:64], for each activation row k. The block scales are
    yd[ydo + k*yds:][:2]. For Q4_1/Q5_1, ym holds the block sums s = d * sum(q) at the same
    offsets, and the min term mA*sA + mB*sB is added to lanes 0 and 8. ym is unused otherwise.
    """
    ts, _, _, zp = _PAIR_FORMATS[fmt]
    has_min = fmt in ("q4_1", "q5_1")

    def impl(
        typingctx: Any,
        acc: Any,
        w: Any,
        o: Any,
        y: Any,
        yo: Any,
        ys: Any,
        yd: Any,
        ym: Any,
        ydo: Any,
        yds: Any,
    ) -> Any:
        r = _n_rows(acc)
        if r == 0:
            return None

        def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
            at, wt, ot, yt, yot, yst, ydt, ymt, ydot, ydst = sig.args
            accv, wv, ov, yv, yov, ysv, ydv, ymv, ydov, ydsv = args
            o64 = _i64(context, builder, ot, ov)

            def wl(off: int, llty: ir.Type) -> ir.Value:
                p = _ptr(
                    context,
                    builder,
                    wt,
                    wv,
                    types.int64,
                    builder.add(o64, ir.Constant(_I64, off)),
                    llty,
                )
                return _load(builder, p, llty)

            def f16_pair(off: int) -> ir.Value:  # <2 x float> of the halves at off, ts + off
                h = ir.Constant(_vty(_I32, 2), ir.Undefined)
                h = builder.insert_element(
                    h, builder.zext(wl(off, _I16), _I32), ir.Constant(_I32, 0)
                )
                h = builder.insert_element(
                    h, builder.zext(wl(ts + off, _I16), _I32), ir.Constant(_I32, 1)
                )
                return _half_bits_to_f32(builder, h)

            codes = _pair_codes(builder, wl, fmt)
            dw = f16_pair(0)
            mw = f16_pair(2) if has_min else None
            yo64 = _i64(context, builder, yot, yov)
            ys64 = _i64(context, builder, yst, ysv)
            ydo64 = _i64(context, builder, ydot, ydov)
            yds64 = _i64(context, builder, ydst, ydsv)
            accs = _unpack(builder, at, accv, r)
            out = []
            pick = ir.Constant(_vty(_I32, LANES), [0] * 8 + [1] * 8)
            v2 = _vty(_F32, 2)
            for k in range(r):
                kk = ir.Constant(_I64, k)
                yp = _ptr(
                    context,
                    builder,
                    yt,
                    yv,
                    types.int64,
                    builder.add(yo64, builder.mul(ys64, kk)),
                    _vty(_I8, 64),
                )
                dot = _pair_dot(builder, codes, _load(builder, yp, _vty(_I8, 64)), zp)
                so = builder.add(ydo64, builder.mul(yds64, kk))
                s2 = builder.fmul(
                    dw, _load(builder, _ptr(context, builder, ydt, ydv, types.int64, so, v2), v2)
                )
                s16 = builder.shuffle_vector(s2, ir.Constant(v2, ir.Undefined), pick)
                a = _fmuladd(builder, builder.sitofp(dot, _vty(_F32, LANES)), s16, accs[k])
                if mw is not None:
                    m2 = builder.fmul(
                        mw,
                        _load(builder, _ptr(context, builder, ymt, ymv, types.int64, so, v2), v2),
                    )
                    spread = [0] + [2] * 7 + [1] + [2] * 7  # lane 0: A, lane 8: B, else 0
                    m16 = builder.shuffle_vector(
                        m2, ir.Constant(v2, [0.0, 0.0]), ir.Constant(_vty(_I32, LANES), spread)
                    )
                    a = builder.fadd(a, m16)
                out.append(a)
            return _pack(context, builder, sig.return_type, out)

        return acc(acc, w, o, y, yo, ys, yd, ym, ydo, yds), codegen

    return intrinsic(impl)


q4_0_pair = _make_pair("q4_0")
q4_1_pair = _make_pair("q4_1")
q5_0_pair = _make_pair("q5_0")
q5_1_pair = _make_pair("q5_1")
q8_0_pair = _make_pair("q8_0")


# ---- K-quant super-blocks ------------------------------------------------------------------
#
# One call = one 256-weight super-block against R activation rows. The scales are unpacked in
# vector registers. Every 32 weights cost one load/decode of their codes, then per activation
# row a dot product with the group scale(s), accumulated in exact int32 lanes:
# - VNNI512: vpdpbusd (unsigned codes x int8 activations, sums of 4) on ymm, times the 16-group
#   scale (vpmulld). A code offset (Q6_K 32, Q3_K 4) is removed once per block, as
#   offset * sum_g(scale_g * bsum_g);
# - portable: codes minus offset widened to i16, a 16-bit multiply (|q * y| <= 32 * 128), then
#   one vpmaddwd with the 16-bit group scales.
# The epilogue adds float(lanes) * (d * dy) to the float accumulator. For the formats with
# mins it also subtracts dmin * dy * sum_g(min_g * bsum_g) in lane 0.

_KMASK_3F = 0x3F3F3F3F
_KMASK_0F = 0x0F0F0F0F
_KMASK_03 = 0x03030303


class _KBlockIR:
    """IR emission helpers for one super-block call (see ``_make_kblock``).

    An emitter calls ``set_scales`` once, then ``group`` for each run of 32 weights (codes from
    ``codes``/``sh``), then ``finish``.
    """

    def __init__(self, context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> None:
        self.c = context
        self.b = builder
        (self.at, self.wt, ot, self.yt, yot, yst, self.ydt, ydot, ydst, self.bst, bsot, bsst) = (
            sig.args
        )
        (self.acc, self.w, o, self.y, yo, ys, self.yd, ydo, yds, self.bs, bso, bss) = args
        self.r = _n_rows(self.at)
        self.o = _i64(context, builder, ot, o)
        self.yo = _i64(context, builder, yot, yo)
        self.ys = _i64(context, builder, yst, ys)
        self.ydo = _i64(context, builder, ydot, ydo)
        self.yds = _i64(context, builder, ydst, yds)
        self.bso = _i64(context, builder, bsot, bso)
        self.bss = _i64(context, builder, bsst, bss)
        self.vnni = VNNI512
        n = LANES // 2 if self.vnni else LANES
        zero = ir.Constant(_vty(_I32, n), [0] * n)
        # VNNI: two 8-lane halves, filled by alternate groups (so each group is one ymm op)
        self.isums = [[zero, zero] for _ in range(self.r)] if self.vnni else [zero] * self.r
        self.half = 0
        self.zp = 0
        self.sc16: ir.Value | None = None  # <N x i16> group scales
        self.sc32: ir.Value | None = None  # the same as <N x i32> (VNNI)

    def off(self, base: ir.Value, k: int, stride: ir.Value, extra: int) -> ir.Value:
        """base + k * stride + extra (i64)."""
        b = self.b
        return b.add(b.add(base, b.mul(stride, ir.Constant(_I64, k))), ir.Constant(_I64, extra))

    def wbytes(self, off: int, n: int) -> ir.Value:
        """<n x i8> at w[o + off]."""
        p = _ptr(
            self.c,
            self.b,
            self.wt,
            self.w,
            types.int64,
            self.b.add(self.o, ir.Constant(_I64, off)),
            _vty(_I8, n),
        )
        return _load(self.b, p, _vty(_I8, n))

    def codes(self, off: int) -> ir.Value:
        """The 32 bytes at w[o + off] as code lanes: <32 x i8> (VNNI) or zero-extended i16."""
        v = self.wbytes(off, 32)
        return v if self.vnni else self.b.zext(v, _vty(_I16, 32))

    def wscalar(self, off: int, llty: ir.Type) -> ir.Value:
        p = _ptr(
            self.c,
            self.b,
            self.wt,
            self.w,
            types.int64,
            self.b.add(self.o, ir.Constant(_I64, off)),
            llty,
        )
        return _load(self.b, p, llty)

    def wf16(self, off: int) -> ir.Value:
        return _half_bits_to_f32(self.b, self.b.zext(self.wscalar(off, _I16), _I32))

    def sh(self, v: ir.Value, right: int, mask: int, left: int = 0) -> ir.Value:
        """((v >> right) & mask) << left, lane-wise with immediate constants."""
        b = self.b
        if right:
            v = b.lshr(v, _const(v.type, right))
        v = b.and_(v, _const(v.type, mask))
        return b.shl(v, _const(v.type, left)) if left else v

    def set_scales(self, sc: ir.Value, zp: int) -> None:
        """sc: <N x i16> signed group scales (N = 8 sub-blocks of 32 or 16 groups of 16);
        zp: the code offset of this format (codes are q + zp)."""
        self.sc16 = sc
        self.zp = zp
        if self.vnni:
            self.sc32 = self.b.sext(sc, _vty(_I32, sc.type.count))

    def group(self, q: ir.Value, yoff: int, i0: int, i1: int) -> None:
        """isum_k += scale-weighted dot of 32 codes q with y_k[yoff:yoff+32], per row k:
        elements 0..15 use scale i0, 16..31 scale i1."""
        b = self.b
        if self.vnni:
            pick = ir.Constant(_vty(_I32, 8), [i0] * 4 + [i1] * 4)
            s8 = b.shuffle_vector(self.sc32, ir.Constant(self.sc32.type, ir.Undefined), pick)
            qi = b.bitcast(q, _vty(_I32, 8))
            zero = ir.Constant(_vty(_I32, 8), [0] * 8)
        else:
            if self.zp:
                q = b.sub(q, _const(q.type, self.zp))
            undef = ir.Constant(self.sc16.type, ir.Undefined)
            s16 = b.shuffle_vector(
                self.sc16, undef, ir.Constant(_vty(_I32, 32), [i0] * 16 + [i1] * 16)
            )
        for k in range(self.r):
            p = _ptr(
                self.c,
                b,
                self.yt,
                self.y,
                types.int64,
                self.off(self.yo, k, self.ys, yoff),
                _vty(_I8, 32),
            )
            y8 = _load(b, p, _vty(_I8, 32))
            if self.vnni:
                dot = _call_intr(
                    b,
                    "llvm.x86.avx512.vpdpbusd.256",
                    _vty(_I32, 8),
                    [zero, qi, b.bitcast(y8, _vty(_I32, 8))],
                )
                h = self.isums[k]
                h[self.half] = b.add(h[self.half], b.mul(dot, s8))
            else:
                yv = b.sext(y8, _vty(_I16, 32))
                self.isums[k] = b.add(self.isums[k], _pmadd(b, b.mul(q, yv), s16))
        self.half ^= 1

    def bytes_of(self, words: list[ir.Value]) -> ir.Value:
        """Concatenate i32 words (little endian) into a <4 len x i8> vector."""
        b = self.b
        v = ir.Constant(_vty(_I32, len(words)), ir.Undefined)
        for i, wd in enumerate(words):
            v = b.insert_element(v, wd, ir.Constant(_I32, i))
        return b.bitcast(v, _vty(_I8, 4 * len(words)))

    def _bsums(self, k: int, n: int) -> ir.Value:
        b = self.b
        pb = _ptr(
            self.c,
            b,
            self.bst,
            self.bs,
            types.int64,
            self.off(self.bso, k, self.bss, 0),
            _vty(_I32, n),
        )
        return _load(b, pb, _vty(_I32, n))

    def finish(
        self, d: ir.Value, dmin: ir.Value | None, mins32: ir.Value | None, sig: Any
    ) -> ir.Value:
        """acc_k += float(isum_k) * (d * dy_k) [- dmin * dy_k * (mins . bsums_k) in lane 0]."""
        b = self.b
        accs = _unpack(b, self.at, self.acc, self.r)
        zero32 = ir.Constant(_I32, 0)
        out = []
        for k in range(self.r):
            if self.vnni:
                lo, hi = self.isums[k]
                isum = b.shuffle_vector(lo, hi, ir.Constant(_vty(_I32, LANES), list(range(LANES))))
                if self.zp:  # remove the code offset: zp * sum_g(scale_g * bsum_g), 16 groups
                    corr = _reduce_add(b, b.mul(self._bsums(k, 16), self.sc32))
                    corr = b.mul(corr, ir.Constant(_I32, self.zp))
                    isum = b.insert_element(
                        isum, b.sub(b.extract_element(isum, zero32), corr), zero32
                    )
            else:
                isum = self.isums[k]
            p = _ptr(
                self.c, b, self.ydt, self.yd, types.int64, self.off(self.ydo, k, self.yds, 0), _F32
            )
            dy = _load(b, p, _F32)
            a = _fmuladd(
                b, b.sitofp(isum, _vty(_F32, LANES)), _splat(b, b.fmul(d, dy), LANES), accs[k]
            )
            if mins32 is not None:
                msum = _reduce_add(b, b.mul(self._bsums(k, mins32.type.count), mins32))
                m = b.fmul(b.fmul(dmin, dy), b.sitofp(msum, _F32))
                a = b.insert_element(a, b.fsub(b.extract_element(a, zero32), m), zero32)
            out.append(a)
        return _pack(self.c, b, sig.return_type, out)


def _reduce_add(builder: ir.IRBuilder, v: ir.Value) -> ir.Value:
    return _call_intr(builder, f"llvm.vector.reduce.add.v{v.type.count}i32", _I32, [v])


def _emit_q4k(e: _KBlockIR, sig: Any, five: bool) -> ir.Value:
    """Q4_K (144 B) / Q5_K (176 B): d, dmin, 12 bytes of 6-bit scales/mins, [qh 32], qs 128.

    Sub-block j (32 weights) = nibble (j & 1) of qs[32 (j >> 1) + l], plus bit j of qh[l]
    as 16 for Q5_K; value = d * sc[j] * q - dmin * m[j].
    """
    b = e.b
    u0, u1, u2 = (e.wscalar(4 + 4 * i, _I32) for i in range(3))
    k3f, k0f, k03 = (ir.Constant(_I32, v) for v in (_KMASK_3F, _KMASK_0F, _KMASK_03))
    # llama.cpp's utmp unpacking: bytes of (t0, t1) = 8 scales, bytes of (t2, t3) = 8 mins.
    t0 = b.and_(u0, k3f)
    t1 = b.or_(
        b.and_(u2, k0f), b.shl(b.and_(b.lshr(u0, ir.Constant(_I32, 6)), k03), ir.Constant(_I32, 4))
    )
    t2 = b.and_(u1, k3f)
    t3 = b.or_(
        b.and_(b.lshr(u2, ir.Constant(_I32, 4)), k0f),
        b.shl(b.and_(b.lshr(u1, ir.Constant(_I32, 6)), k03), ir.Constant(_I32, 4)),
    )
    e.set_scales(b.zext(e.bytes_of([t0, t1]), _vty(_I16, 8)), 0)
    mins8 = b.zext(e.bytes_of([t2, t3]), _vty(_I32, 8))
    # each min pairs with the two 16-group activation sums of its sub-block
    mins16 = b.shuffle_vector(
        mins8,
        ir.Constant(mins8.type, ir.Undefined),
        ir.Constant(_vty(_I32, 16), [j // 2 for j in range(16)]),
    )
    qs = 48 if five else 16
    qh = e.codes(16) if five else None
    for c in range(4):
        v = e.codes(qs + 32 * c)
        lo = e.sh(v, 0, 15)
        hi = e.sh(v, 4, 15)
        if qh is not None:
            lo = b.or_(lo, e.sh(qh, 2 * c, 1, 4))
            hi = b.or_(hi, e.sh(qh, 2 * c + 1, 1, 4))
        e.group(lo, 64 * c, 2 * c, 2 * c)
        e.group(hi, 64 * c + 32, 2 * c + 1, 2 * c + 1)
    return e.finish(e.wf16(0), e.wf16(2), mins16, sig)


def _emit_q6k(e: _KBlockIR, sig: Any) -> ir.Value:
    """Q6_K (210 B): ql 128, qh 64, int8 scales 16, d. Element 128 h + 32 f + l is
    (ql[64 h + 32 (f & 1) + l] >> 4 (f >> 1)) & 15 | ((qh[32 h + l] >> 2 f) & 3) << 4, minus 32,
    with scale sc[8 h + 2 f + l // 16]."""
    b = e.b
    e.set_scales(b.sext(e.wbytes(192, 16), _vty(_I16, 16)), 32)
    for h in range(2):
        ql = (e.codes(64 * h), e.codes(64 * h + 32))
        qh = e.codes(128 + 32 * h)
        for f in range(4):
            q = b.or_(e.sh(ql[f & 1], 4 * (f >> 1), 15), e.sh(qh, 2 * f, 3, 4))
            e.group(q, 128 * h + 32 * f, 8 * h + 2 * f, 8 * h + 2 * f + 1)
    return e.finish(e.wf16(208), None, None, sig)


def _emit_q3k(e: _KBlockIR, sig: Any) -> ir.Value:
    """Q3_K (110 B): hmask 32, qs 64, 12 bytes of 6-bit scales, d. Element 128 h + 32 s + l is
    ((qs[32 h + l] >> 2 s) & 3) - 4 * (1 - hbit), hbit = (hmask[l] >> (4 h + s)) & 1, with scale
    sc[8 h + 2 s + l // 16] - 32."""
    b = e.b
    a0, a1, tmp = (e.wscalar(96 + 4 * i, _I32) for i in range(3))
    k0f, k03 = ir.Constant(_I32, _KMASK_0F), ir.Constant(_I32, _KMASK_03)

    def hi2(shift: int) -> ir.Value:
        return b.shl(b.and_(b.lshr(tmp, ir.Constant(_I32, shift)), k03), ir.Constant(_I32, 4))

    four = ir.Constant(_I32, 4)
    words = [
        b.or_(b.and_(a0, k0f), hi2(0)),
        b.or_(b.and_(a1, k0f), hi2(2)),
        b.or_(b.and_(b.lshr(a0, four), k0f), hi2(4)),
        b.or_(b.and_(b.lshr(a1, four), k0f), hi2(6)),
    ]
    e.set_scales(b.sub(b.zext(e.bytes_of(words), _vty(_I16, 16)), _const(_vty(_I16, 16), 32)), 4)
    hm = e.codes(0)
    for h in range(2):
        qb = e.codes(32 + 32 * h)
        for s in range(4):
            q = b.or_(e.sh(qb, 2 * s, 3), e.sh(hm, 4 * h + s, 1, 2))
            e.group(q, 128 * h + 32 * s, 8 * h + 2 * s, 8 * h + 2 * s + 1)
    return e.finish(e.wf16(108), None, None, sig)


def _emit_q2k(e: _KBlockIR, sig: Any) -> ir.Value:
    """Q2_K (84 B): 16 scale bytes (low nibble scale, high nibble min), qs 64, d, dmin. Element
    128 h + 32 s + l is (qs[32 h + l] >> 2 s) & 3, group 8 h + 2 s + l // 16."""
    b = e.b
    raw_sc = e.wbytes(0, 16)
    e.set_scales(b.zext(b.and_(raw_sc, _const(raw_sc.type, 15)), _vty(_I16, 16)), 0)
    mins = b.zext(b.lshr(raw_sc, _const(raw_sc.type, 4)), _vty(_I32, 16))
    for h in range(2):
        qb = e.codes(16 + 32 * h)
        for s in range(4):
            e.group(e.sh(qb, 2 * s, 3), 128 * h + 32 * s, 8 * h + 2 * s, 8 * h + 2 * s + 1)
    return e.finish(e.wf16(80), e.wf16(82), mins, sig)


def _make_kblock(kind: str) -> Callable:
    """``<kind>_block(acc, w, o, y, yo, ys, yd, ydo, yds, bs, bso, bss)`` for one super-block.

    w[o:] is the block; y int8 activations at yo (+ k*ys for row k); yd float32 Q8_K scales at
    ydo (+ k*yds); bs int32 16-group activation sums at bso (+ k*bss). Returns acc updated.
    """

    def impl(
        typingctx: Any,
        acc: Any,
        w: Any,
        o: Any,
        y: Any,
        yo: Any,
        ys: Any,
        yd: Any,
        ydo: Any,
        yds: Any,
        bs: Any,
        bso: Any,
        bss: Any,
    ) -> Any:
        if _n_rows(acc) == 0:
            return None

        def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
            e = _KBlockIR(context, builder, sig, args)
            if kind == "q4k":
                return _emit_q4k(e, sig, False)
            if kind == "q5k":
                return _emit_q4k(e, sig, True)
            if kind == "q6k":
                return _emit_q6k(e, sig)
            if kind == "q3k":
                return _emit_q3k(e, sig)
            return _emit_q2k(e, sig)

        return acc(acc, w, o, y, yo, ys, yd, ydo, yds, bs, bso, bss), codegen

    return intrinsic(impl)


q2k_block = _make_kblock("q2k")
q3k_block = _make_kblock("q3k")
q4k_block = _make_kblock("q4k")
q5k_block = _make_kblock("q5k")
q6k_block = _make_kblock("q6k")


def _make_float_fma(kind: str) -> Callable:
    """``<kind>_fma(acc, w, o, x, xo, xs)``: acc += w[16 weights at byte o] * x[xo + k*xs:].

    kind: "f32", "f16" (exact half -> float) or "bf16" (bits << 16). Activations stay f32.
    """

    def impl(typingctx: Any, acc: Any, w: Any, o: Any, x: Any, xo: Any, xs: Any) -> Any:
        r = _n_rows(acc)
        if r == 0:
            return None

        def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
            at, wt, ot, xt, xot, xst = sig.args
            accv, wv, ov, xv, xov, xsv = args
            vf = _vty(_F32, LANES)
            if kind == "f32":
                wf = _load(builder, _ptr(context, builder, wt, wv, ot, ov, vf), vf)
            else:
                vh = _vty(_I16, LANES)
                h = builder.zext(
                    _load(builder, _ptr(context, builder, wt, wv, ot, ov, vh), vh),
                    _vty(_I32, LANES),
                )
                if kind == "f16":
                    wf = _half_bits_to_f32(builder, h)
                else:
                    wf = builder.bitcast(builder.shl(h, _const(h.type, 16)), vf)
            xo64 = _i64(context, builder, xot, xov)
            xs64 = _i64(context, builder, xst, xsv)
            accs = _unpack(builder, at, accv, r)
            out = []
            for k in range(r):
                off = builder.add(xo64, builder.mul(xs64, ir.Constant(_I64, k)))
                xvec = _load(builder, _ptr(context, builder, xt, xv, types.int64, off, vf), vf)
                out.append(_fmuladd(builder, wf, xvec, accs[k]))
            return _pack(context, builder, sig.return_type, out)

        return acc(acc, w, o, x, xo, xs), codegen

    return intrinsic(impl)


f32_fma = _make_float_fma("f32")
f16_fma = _make_float_fma("f16")
bf16_fma = _make_float_fma("bf16")
