"""The ops of a transformer block on an NVIDIA GPU, through CuPy and `cuda_kernels.cu`.

`CudaBackend` provides the interface of `backends.cpu.CpuBackend` (load_matrix, load_vector,
kv_cache, from_host, to_host, matmul, rms_norm, rope, store_kv, attention, glu, add), so
`model.PyBlock` runs unchanged on it. Activations are CuPy float32 C-contiguous arrays.

Where the bytes go:
- A weight matrix is copied to the GPU once, as its raw GGUF blocks (rows, row_bytes) uint8:
  no dequantized copy lives on the device; the memory budget is the file's size.
- Quantized matmuls: the activations are quantized to 8-bit blocks of 32 once per matmul
  input (one kernel, reused by every matmul of the same input, as llama.cpp's q8_1) and the
  weight's blocks are dotted with them in integers (__dp4a). The 32-element block types (Q4_0,
  Q4_1, Q5_0, Q5_1, Q8_0) go through mmq_<type>, tiles of weight rows x activation rows at any
  width (llama.cpp's MMQ scheme), in the CPU's float order. K-quants use one warp per weight
  row up to MMVQ_MAX_ROWS activation rows (llama.cpp's mmvq), mmq_<type> above.
- Float weights (and quantized ones with HYBRIDLLM_CUDA_PREFILL=cublas) for more than
  MMVQ_MAX_ROWS rows: cuBLAS x16 @ W16.T with f32 accumulation and output, BF16 (or the
  quantized weight) dequantized to f16 into one scratch buffer sized at load time for the
  largest such matrix, so running out of memory shows up at load, not mid-prompt.
- Attention reads the f16 KV cache, one block per (head, query row), for decode and prompts
  alike; gemma2's attention-logit soft-cap is applied before the softmax, in llama.cpp's order.
- What the architectures add besides (rope frequency factors, linear and YaRN scaling,
  LongRoPE, Q/K/V biases, residual and Q scales, full-width Q/K norms) needs no kernel of its
  own: the rope table is the CPU's, a bias is a broadcast add, a scale an element-wise product,
  a Q/K norm `rms_norm` over rows of the width the block asks for. Embedding and logit scales
  and the final soft-cap are applied on the host by `model.Model`, on whichever device ran.
- Rope, the KV store and decode attention read their position from device memory (an entry
  of a table 0..n_ctx-1, or a decode graph's position scalar), so a one-token step can be
  captured once as a CUDA graph and replayed at every position (`DecodeGraph`, switched on by
  HYBRIDLLM_CUDA_GRAPHS=1): a decode step is then one graph launch instead of ~15 kernel
  launches from Python per block.

Numerics are the CPU backend's (llama.cpp CPU's), because models like SmolLM2 carry a one-ulp
difference into a different argmax within a few layers: f16 KV cache, GELU through ggml's f16
table, SiLU through ggml's vectorised expf, RMSNorm's squares summed in double, rope from the
CPU's own cos/sin table with ggml's FMA rounding, the 32-block matmuls' activations rounded as
q8_0/q8_1 and summed in the CPU kernels' lane order, and attention in ggml's order for the
CPU's SIMD width (Q rounded to f16, L-lane dot products, softmax chunks summed in double,
probabilities rounded to f16). All of these are bit for bit the CPU's on the emulator; on a GPU
only CUDA's tanhf (gemma2's soft-cap) and expf (SiLU tails) may differ. K-quants share the
8-bit blocks of 32 where the CPU uses q8_K's one scale per 256, and float weights go through
cuBLAS with f16 activations for prompts, so those agree to about 1e-3 relative.

Importing this module needs CuPy; `backends.gpu_probe` says whether a GPU can be used.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import cupy as cp
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import DeviceError, UnsupportedTensorTypeError
from ..placement import cuda_dequantizes, cuda_prefill
from .cpu import SIMD_LANES, Matrix, RopeSpec, _gelu_f16_table, rope_table

KERNEL_SOURCE = Path(__file__).with_name("cuda_kernels.cu")
_T = GGMLQuantizationType
#: Types with an integer decode kernel (mmvq_<name>_{1,8}) and a dequantize kernel.
QUANT_KERNELS: dict[int, str] = {
    _T.Q4_0: "q4_0", _T.Q4_1: "q4_1", _T.Q5_0: "q5_0", _T.Q5_1: "q5_1", _T.Q8_0: "q8_0",
    _T.Q2_K: "q2_k", _T.Q3_K: "q3_k", _T.Q4_K: "q4_k", _T.Q5_K: "q5_k", _T.Q6_K: "q6_k",
}  # fmt: skip
#: K-quants keep the matrix-vector kernels for decode; every quantized type has mmq_<name>_{1,4}.
K_QUANTS = frozenset({_T.Q2_K, _T.Q3_K, _T.Q4_K, _T.Q5_K, _T.Q6_K})
#: Float types: decode through mv_<name>_{1,8}, prefill through cuBLAS.
FLOAT_KERNELS: dict[int, str] = {_T.F32: "f32", _T.F16: "f16", _T.BF16: "bf16"}
SUPPORTED_TYPES = frozenset(QUANT_KERNELS) | frozenset(FLOAT_KERNELS)

#: Up to this many activation rows the K-quant and float matmuls use the matrix-vector kernels
#: (8 rows per launch); above, the K-quants' mmq tiles and cuBLAS for float weights. Reading a
#: 4-bit weight 4 times costs about what writing and re-reading its f16 copy does.
MMVQ_MAX_ROWS = 32
_MV_ROWS_PER_BLOCK = 4  # warps (= weight rows) per block of the matrix-vector kernels

# cuBLAS / CUDA enum values (cublas_api.h, library_types.h)
_OP_N, _OP_T = 0, 1
_CUDA_R_32F, _CUDA_R_16F = 0, 2
_COMPUTE_32F = 68
_GEMM_DEFAULT = -1
_POINTER_MODE_HOST = 0

#: "1" replays each one-token step of a run of GPU blocks as a CUDA graph (`DecodeGraph`); off
#: by default until a GPU has shown it faster and equal to the eager step.
GRAPHS_ENV = "HYBRIDLLM_CUDA_GRAPHS"

_modules: dict[int, cp.RawModule] = {}


def kernel_module(device_id: int) -> cp.RawModule:
    """The compiled `cuda_kernels.cu` for a device (NVRTC; CuPy caches the binary on disk)."""
    module = _modules.get(device_id)
    if module is None:
        try:
            with cp.cuda.Device(device_id):
                module = cp.RawModule(code=KERNEL_SOURCE.read_text(), options=("-std=c++17",))
                module.compile()
        except (ImportError, cp.cuda.compiler.CompileException, cp.cuda.runtime.CUDARuntimeError) as exc:
            raise DeviceError(f"cannot compile {KERNEL_SOURCE.name} for GPU {device_id}: {exc}") from exc
        _modules[device_id] = module
    return module


def cublas_module() -> Any:
    """CuPy's cuBLAS bindings. Importing them loads libcublas, which a bare CuPy wheel may lack."""
    try:
        from cupy.cuda import cublas
    except ImportError as exc:
        raise DeviceError(
            f"CuPy cannot load cuBLAS ({exc}); install the CUDA libraries, e.g. pip install 'cupy-cuda12x[ctk]'"
        ) from None
    return cublas


def _i32(v: int) -> np.int32:
    return np.int32(v)


def _i64(v: int) -> np.int64:
    return np.int64(v)


def _blocks(n: int, per_block: int) -> int:
    return (n + per_block - 1) // per_block


_F = TypeVar("_F", bound=Callable[..., Any])


def _device_errors(op: _F) -> _F:
    """Out of device memory inside an op (a prompt's activations, attention scratch) raises
    DeviceError as loading does, never CuPy's own error: callers handle one kind."""

    @functools.wraps(op)
    def wrapper(self: CudaBackend, *args: Any, **kwargs: Any) -> Any:
        try:
            return op(self, *args, **kwargs)
        except cp.cuda.memory.OutOfMemoryError as exc:
            asked = re.search(r"allocating ([\d,]+) bytes", str(exc))
            nbytes = int(asked.group(1).replace(",", "")) if asked else 0
            raise self._out_of_memory(f"the buffers of {op.__name__}", nbytes, exc) from exc

    return wrapper  # type: ignore[return-value]


class CudaBackend:
    """Ops of a transformer block on one CUDA device; weights stay quantized in device memory.

    Every method runs on the current CuPy stream of `device`; the constructor makes that device
    current. Counters (`weights_bytes`, `kv_bytes`, `scratch_bytes`, `bytes_to_device`,
    `bytes_to_host`) let callers compare what was loaded with what the planner expected.
    """

    name = "cuda"

    def __init__(self, device: int = 0, graphs: bool | None = None) -> None:
        """graphs: replay one-token steps as CUDA graphs (default: HYBRIDLLM_CUDA_GRAPHS == "1")."""
        try:
            self.device = cp.cuda.Device(device)
            self.device.use()
        except cp.cuda.runtime.CUDARuntimeError as exc:
            raise DeviceError(f"CUDA device {device} is not usable: {exc}") from exc
        self._cublas = cublas_module()  # prefill GEMMs; fail here, not in the first prompt
        self._module = kernel_module(device)
        self._functions: dict[str, Any] = {}
        self.weights_bytes = 0
        self.kv_bytes = 0
        self.scratch_bytes = 0
        self.bytes_to_device = 0
        self.bytes_to_host = 0
        self._w16: Any = None  # f16 scratch for the dequantized weight of one prefill matmul
        self._gelu: Any = None  # ggml's GELU table (65536 f32), uploaded on first use
        self._rope_tables: dict[RopeSpec, tuple[Any, Any]] = {}  # cos, sin (n_ctx, dim/2) f32
        self._pinned: dict[str, np.ndarray] = {}  # "in"/"out" -> float32 view of pinned memory
        self._pinned_event: Any = None  # completion of the last async host->device copy
        # Last matmul input and its quantized (or f16) form: q/k/v and gate/up share an input.
        self._x_cache: tuple[Any, str, tuple[Any, ...]] | None = None
        self._one = np.ones(1, np.float32)
        self._zero = np.zeros(1, np.float32)
        self._n_ctx = 0  # most cache rows of any KV cache: the positions kernels may be asked for
        self._positions: Any = None  # int32 0..n-1 on the device: kernels read their pos0 here
        self._step_position: Any = None  # a decode graph's position scalar while it is captured
        self.graphs = os.environ.get(GRAPHS_ENV) == "1" if graphs is None else graphs
        self.prefill = cuda_prefill()  # "mmq", or "cublas" for f16 weights + cuBLAS
        self._decode_graphs: dict[tuple[int, ...], DecodeGraph] = {}

    # --- memory -------------------------------------------------------------------------
    def load_matrix(self, m: Matrix) -> Matrix:
        """Copy the raw GGUF rows (rows, row_bytes) to the device once; no dequantization."""
        qtype = int(m.qtype)
        if qtype not in SUPPORTED_TYPES:
            raise UnsupportedTensorTypeError(
                f"the CUDA backend has no kernel for {_T(qtype).name} matrices ({m.rows}x{m.cols})"
            )
        block, size = GGML_QUANT_SIZES[_T(qtype)]
        row_bytes = m.cols // block * size
        raw = np.ascontiguousarray(m.raw).reshape(m.rows, row_bytes)
        if m.cols % 32 and qtype in QUANT_KERNELS:
            raise ValueError(f"a {_T(qtype).name} matrix needs cols % 32 == 0, got {m.cols}")
        dev = self._alloc(raw.nbytes, f"a {_T(qtype).name} {m.rows}x{m.cols} matrix", lambda: cp.asarray(raw))
        self.weights_bytes += raw.nbytes
        if self._dequantizes(qtype):  # to f16 for prefill GEMMs
            self._reserve_w16(m.rows * m.cols)
        return Matrix(dev, qtype, m.rows, m.cols)

    def load_vector(self, v: np.ndarray) -> Any:
        host = np.ascontiguousarray(v, dtype=np.float32)
        dev = self._alloc(host.nbytes, f"a vector of {host.size}", lambda: cp.asarray(host))
        self.weights_bytes += host.nbytes
        return dev

    def kv_cache(self, n_ctx: int, width: int) -> Any:
        """A float16 (n_ctx, width) cache on the device, zeroed, like llama.cpp's default."""
        nbytes = 2 * n_ctx * width
        cache = self._alloc(nbytes, f"a KV cache of {n_ctx}x{width}", lambda: cp.zeros((n_ctx, width), cp.float16))
        self.kv_bytes += nbytes
        self._n_ctx = max(self._n_ctx, n_ctx)
        return cache

    @_device_errors
    def from_host(self, x: np.ndarray) -> Any:
        """Host (n, dim) float32 -> device, through a pinned staging buffer (async copy)."""
        host = np.ascontiguousarray(x, dtype=np.float32)
        if self._pinned_event is not None:  # the staging buffer may still be in flight
            self._pinned_event.synchronize()
        stage = self._pinned_view("in", host.size).reshape(host.shape)
        np.copyto(stage, host)
        dev = cp.empty(host.shape, cp.float32)
        stream = cp.cuda.get_current_stream()
        dev.set(stage, stream=stream)
        self._pinned_event = stream.record()
        self.bytes_to_device += host.nbytes
        return dev

    @_device_errors
    def to_host(self, x: Any) -> np.ndarray:
        """Device -> a new host float32 array, through a pinned staging buffer."""
        x = self._f32(x)
        stage = self._pinned_view("out", x.size).reshape(x.shape)
        x.get(out=stage)  # blocking: waits for the kernels that produce x
        self.bytes_to_host += x.nbytes
        return stage.copy()  # the staging buffer is reused by the next call

    # --- ops ----------------------------------------------------------------------------
    @_device_errors
    def matmul(self, w: Matrix, x: Any) -> Any:
        """x (n, cols) @ W.T -> (n, rows) float32."""
        x, out = self._product(w, x)
        n = x.shape[0]
        if w.qtype in QUANT_KERNELS:
            if n > MMVQ_MAX_ROWS and self._dequantizes(w.qtype):
                self._gemm(w, x, out)
            elif n <= MMVQ_MAX_ROWS and w.qtype in K_QUANTS:
                self._matvec(w, x, out)
            else:
                self._mmq(w, x, out)
        elif n <= MMVQ_MAX_ROWS:
            self._matvec(w, x, out)
        else:
            self._gemm(w, x, out)
        return out

    @_device_errors
    def matmul_rows_alone(self, w: Matrix, x: Any) -> Any:
        """As matmul, each row computed as a one-row call computes it (the decode rows of several
        sequences): the kernels of n = 1 at any n. Their outputs do not depend on the other rows
        (mmq32 gives each output a group of its own, mmvq an accumulator of its own), unlike the
        K-quant mmq tiles and cuBLAS that matmul takes for more rows."""
        x, out = self._product(w, x)
        if w.qtype in QUANT_KERNELS and w.qtype not in K_QUANTS:
            self._mmq(w, x, out)
        else:
            self._matvec(w, x, out)
        return out

    @_device_errors
    def concat_rows(self, parts: Sequence[Any]) -> Any:
        """Row blocks (n_i, width) -> one new (sum n_i, width) array."""
        out = cp.empty((sum(p.shape[0] for p in parts), parts[0].shape[1]), parts[0].dtype)
        row = 0
        for p in parts:
            out[row : row + p.shape[0]] = p
            row += p.shape[0]
        return out

    @_device_errors
    def rms_norm(self, x: Any, w: Any, eps: float) -> Any:
        """Row-wise RMSNorm of x (m, k) times w (k,) -> new (m, k)."""
        x = self._f32(x)
        k = x.shape[-1]
        if w.shape != (k,):
            raise ValueError(f"rms_norm: weight of shape {w.shape} for rows of {k}")
        out = cp.empty_like(x)
        threads = 256 if k >= 1024 else 128 if k >= 256 else 64
        self._fn("rms_norm")((x.size // k,), (threads,), (x, w, out, _i32(k), np.float32(eps)))
        return out

    @_device_errors
    def rope(self, x: Any, pos0: int, rope: RopeSpec) -> None:
        """Rotate x (n, heads, head_dim) in place for positions pos0..pos0+n-1."""
        n, heads, head_dim = x.shape
        if pos0 + n > rope.n_ctx:
            raise ValueError(f"position {pos0 + n - 1} is past the rope table ({rope.n_ctx})")
        if not x.flags.c_contiguous or x.dtype != cp.float32:
            raise ValueError("rope works in place on a C-contiguous float32 array")
        self._x_cache = None  # x may be a matmul input we hold in quantized form
        cos, sin = self._rope_table(rope)
        half = rope.dim // 2
        total = n * heads * half
        pos = self._position(pos0)
        args = (x, _i32(n), _i32(heads), _i32(head_dim), _i32(half), pos, cos, sin, _i32(rope.neox))
        self._fn("rope")((_blocks(total, 256),), (256,), args)

    @_device_errors
    def store_kv(self, cache: Any, pos0: int, rows: Any) -> None:
        """Write rows (n, width) at pos0.. of a float16 cache, rounding to nearest even."""
        rows = self._f32(rows)
        n, width = rows.shape
        if width != cache.shape[1] or pos0 < 0 or pos0 + n > cache.shape[0]:
            raise ValueError(f"store_kv: {n}x{width} rows at {pos0} into a {cache.shape} cache")
        count = n * width
        args = (rows, cache, self._position(pos0), _i64(width), _i64(count))
        self._fn("store_f16")((_blocks(count, 256),), (256,), args)

    @_device_errors
    def attention(
        self, q: Any, k_cache: Any, v_cache: Any, pos0: int, window: int, scale: float, softcap: float = 0.0
    ) -> Any:
        """Causal GQA attention of q (n, n_heads, dk) over cache rows 0..pos0+n-1 -> (n, n_heads*dv).

        Query t (position pos0+t) sees key j when j <= pos0+t and, with a window, pos0+t - j < window.
        softcap > 0 (gemma2): scores are tanh(s / softcap) * softcap before the scale and softmax.
        """
        q = self._f32(q)
        n, n_heads, dk = q.shape
        n_kv = k_cache.shape[1] // dk
        dv = v_cache.shape[1] // n_kv
        if n_heads % n_kv or dv > 256 or dk % 2:
            raise ValueError(f"attention: {n_heads} heads over {n_kv} KV heads, dk={dk} (even), dv={dv} (<= 256)")
        out = self._attention_ggml(q, k_cache, v_cache, pos0, window, scale, softcap, n_kv, dv)
        return out.reshape(n, n_heads * dv)

    @_device_errors
    def glu(self, gate: Any, up: Any, activation: str) -> Any:
        """act(gate) * up for gate, up (n, ffn_dim) -> new (n, ffn_dim)."""
        gate, up = self._f32(gate), self._f32(up)
        if activation == "silu":
            act, table = 0, gate  # table unused; any device pointer will do
        elif activation == "gelu_tanh":
            act, table = 1, self._gelu_table()
        else:
            raise ValueError(f"unknown activation {activation!r}")
        out = cp.empty_like(gate)
        args = (gate, up, out, _i64(gate.size), _i32(gate.shape[-1]), _i32(act), table, _i32(SIMD_LANES))
        self._fn("glu")((_blocks(gate.size, 256),), (256,), args)
        return out

    def add(self, x: Any, y: Any) -> None:
        """x += y in place (the residual stream)."""
        self._x_cache = None
        x += y

    # --- a run of blocks ----------------------------------------------------------------
    def forward_blocks(self, blocks: Sequence[Any], x: Any, pos0: int, n_threads: int = 0) -> None:
        """Run consecutive blocks of this backend on x (n, dim) in place; with graphs on, a
        one-token step is a replay of the run's DecodeGraph (captured on its first step)."""
        if not self.graphs or x.shape[0] != 1:
            for block in blocks:
                block.forward(x, pos0, n_threads)
            return
        key = tuple(id(block) for block in blocks)
        graph = self._decode_graphs.get(key)
        if graph is None:
            graph = self._decode_graphs[key] = DecodeGraph(self, blocks, x.shape[1])
        graph.step(x, pos0, n_threads)

    @contextmanager
    def _positions_from(self, position: Any) -> Iterator[None]:
        """Every op inside reads its position from `position` (a device int32 scalar), whatever
        pos0 it is given: the launches a decode graph captures stay valid at every position."""
        self._step_position, self._x_cache = position, None
        try:
            yield
        finally:
            self._step_position, self._x_cache = None, None

    # --- matmul paths -------------------------------------------------------------------
    def _product(self, w: Matrix, x: Any) -> tuple[Any, Any]:
        """x as f32 (n, cols) and the output (n, rows) of x @ W.T, checking the shapes."""
        x = self._f32(x)
        n, k = x.shape
        if k != w.cols:
            raise ValueError(f"matmul: x has {k} columns, the matrix {w.rows}x{w.cols}")
        return x, cp.empty((n, w.rows), cp.float32)

    def _matvec(self, w: Matrix, x: Any, out: Any) -> None:
        """Matrix-vector kernels of the K-quants and float types, 8 activation rows per launch
        (1 when there is only one)."""
        n, k = x.shape
        grid, block = (_blocks(w.rows, _MV_ROWS_PER_BLOCK),), (32, _MV_ROWS_PER_BLOCK)
        row_bytes = _i64(w.raw.shape[1])
        suffix = "1" if n == 1 else "8"
        if w.qtype in FLOAT_KERNELS:
            fn = self._fn(f"mv_{FLOAT_KERNELS[w.qtype]}_{suffix}")
            for c0 in range(0, n, 8):
                nc = min(8, n - c0)
                fn(grid, block, (w.raw, row_bytes, _i32(w.rows), _i32(k), _i32(nc), x[c0:], out[c0:]))
            return
        yq, yds = self._quantized(x)  # (n, k) int8, (n, k/32, 4) f32
        fn = self._fn(f"mmvq_{QUANT_KERNELS[w.qtype]}_{suffix}")
        for c0 in range(0, n, 8):
            nc = min(8, n - c0)
            fn(grid, block, (w.raw, row_bytes, _i32(w.rows), _i32(k // 32), _i32(nc), yq[c0:], yds[c0:], out[c0:]))

    def _mmq(self, w: Matrix, x: Any, out: Any) -> None:
        """Quantized weights against 8-bit activations, any n: tiles of 16 weight rows x 1
        activation row (n = 1) or 4 x 4; the 32-block types in the CPU's float order."""
        n, k = x.shape
        yq, yds = self._quantized(x)  # (n, k) int8, (n, k/32, 4) f32
        cols = 1 if n == 1 else 4
        grid = (_blocks(w.rows, 16 // cols), _blocks(n, cols))
        args = (w.raw, _i64(w.raw.shape[1]), _i32(w.rows), _i32(k // 32), _i32(n), yq, yds, out)
        self._fn(f"mmq_{QUANT_KERNELS[w.qtype]}_{cols}")(grid, (128,), args)

    def _dequantizes(self, qtype: int) -> bool:
        """Whether prefill matmuls of this type dequantize the weight to f16 for cuBLAS."""
        return cuda_dequantizes(qtype, self.prefill)

    def _quantized(self, x: Any) -> tuple[Any, Any]:
        """x (n, k) -> 8-bit blocks: yq (n, k) int8, yds (n, k/32, 4) float32 (d, sum_lo, sum_hi, 0)."""
        cached = self._cached(x, "q8")
        if cached is not None:
            return cached  # type: ignore[return-value]
        n, k = x.shape
        if k % 32:
            raise ValueError(f"quantized matmul needs a multiple of 32 columns, got {k}")
        yq = cp.empty((n, k), cp.int8)
        yds = cp.empty((n, k // 32, 4), cp.float32)
        n_blocks = n * k // 32
        self._fn("quantize_q8")((_blocks(n_blocks, 8),), (256,), (x, yq, yds, _i64(n_blocks)))
        self._x_cache = (x, "q8", (yq, yds))
        return yq, yds

    def _gemm(self, w: Matrix, x: Any, out: Any) -> None:
        """out (n, rows) f32 = x @ W.T with W in f16 (dequantized into scratch) via cuBLAS."""
        n, k = x.shape
        if w.qtype == _T.F32:
            cp.matmul(x, w.raw.view(cp.float32).T, out=out)
            return
        x16 = self._cached(x, "f16")
        if x16 is None:
            x16 = x.astype(cp.float16)  # as ggml's cuBLAS path: activations to f16
            self._x_cache = (x, "f16", x16)
        w16 = self._weight_f16(w)
        self._gemm_ex(w.rows, n, k, w16, x16, out)

    def _weight_f16(self, w: Matrix) -> Any:
        """The matrix as f16 (rows, cols): a view for F16, else dequantized into the scratch."""
        if w.qtype == _T.F16:
            return w.raw.view(cp.float16)
        count = w.rows * w.cols
        self._reserve_w16(count)
        w16 = self._w16[:count].reshape(w.rows, w.cols)
        if w.qtype == _T.BF16:
            self._fn("bf16_to_f16")((_blocks(count, 256),), (256,), (w.raw, w16, _i64(count)))
            return w16
        nsub = w.cols // 32
        total = w.rows * nsub  # one thread per sub-block of 32
        args = (w.raw, _i64(w.raw.shape[1]), _i32(nsub), _i64(total), w16)
        self._fn(f"dequant_{QUANT_KERNELS[w.qtype]}")((_blocks(total, 256),), (256,), args)
        return w16

    def _gemm_ex(self, m: int, n: int, k: int, a: Any, b: Any, c: Any) -> None:
        """Column-major cuBLAS GEMM C (m, n) = A^T B with A (k, m) and B (k, n) f16, C and the
        accumulation f32: for row-major x (n, k) and W (m, k), C is x @ W.T (n, m)."""
        cublas = self._cublas
        handle = cp.cuda.device.get_cublas_handle()
        cublas.setStream(handle, cp.cuda.get_current_stream().ptr)  # a capturing stream, too
        cublas.setPointerMode(handle, _POINTER_MODE_HOST)
        cublas.gemmEx(
            handle, _OP_T, _OP_N, m, n, k, self._one.ctypes.data,
            a.data.ptr, _CUDA_R_16F, k, b.data.ptr, _CUDA_R_16F, k,
            self._zero.ctypes.data, c.data.ptr, _CUDA_R_32F, m, _COMPUTE_32F, _GEMM_DEFAULT,
        )  # fmt: skip

    # --- attention ----------------------------------------------------------------------
    def _attention_ggml(
        self, q: Any, kc: Any, vc: Any, pos0: int, window: int, scale: float, softcap: float, n_kv: int, dv: int
    ) -> Any:
        """One block per (head, query row), in the CPU's float order (SIMD_LANES lanes; one
        accumulator per lane for several rows, four for one, as llama.cpp's CPU). The scores
        scratch has room for every key a query at any position may see (the cache, or the
        window), not only pos0's: the same launch, replayed by a decode graph at later
        positions, needs no other buffer."""
        n, n_heads, dk = q.shape
        n_keys = kc.shape[0] if window <= 0 else min(kc.shape[0], window)  # most keys a query sees
        scores = cp.empty((n, n_heads, n_keys), cp.float32)
        out = cp.empty((n, n_heads, dv), cp.float32)
        shared = 4 * (80 + dk)  # reduction scratch, one chunk sum per lane group, q
        args = (
            q, kc, vc, scores, out, _i32(n_heads), _i32(n_kv), _i32(dk), _i32(dv),
            self._position(pos0), _i32(window), np.float32(scale), _i32(n_keys), np.float32(softcap),
            _i32(SIMD_LANES), _i32(n > 1),
        )  # fmt: skip
        self._fn("attn_ggml")((n_heads, n), (128,), args, shared_mem=shared)
        return out

    # --- helpers ------------------------------------------------------------------------
    def _fn(self, name: str) -> Any:
        fn = self._functions.get(name)
        if fn is None:
            fn = self._functions[name] = self._module.get_function(name)
        return fn

    def _f32(self, x: Any) -> Any:
        if isinstance(x, np.ndarray):
            raise TypeError("the CUDA backend got a host array; move it with from_host() first")
        return cp.ascontiguousarray(x, dtype=cp.float32)

    def _cached(self, x: Any, kind: str) -> Any:
        """The converted form of x when x is the last matmul input and nothing changed since.

        Holding a reference to x keeps its memory from being reused, so identity is safe;
        every in-place op of this backend (rope, add) clears the cache.
        """
        c = self._x_cache
        if c is not None and c[0] is x and c[1] == kind:
            return c[2]
        return None

    def _rope_table(self, rope: RopeSpec) -> tuple[Any, Any]:
        """The CPU backend's cos/sin (n_ctx, dim/2) on the device, once per RopeSpec (bit-identical angles)."""
        table = self._rope_tables.get(rope)
        if table is None:
            cos, sin = rope_table(rope)
            nbytes = cos.nbytes + sin.nbytes
            table = self._alloc(nbytes, f"a rope table of {cos.shape}", lambda: (cp.asarray(cos), cp.asarray(sin)))
            self._rope_tables[rope] = table
            self.scratch_bytes += nbytes
        return table

    def _gelu_table(self) -> Any:
        if self._gelu is None:
            table = _gelu_f16_table()
            self._gelu = self._alloc(table.nbytes, "the GELU table", lambda: cp.asarray(table))
            self.scratch_bytes += table.nbytes
        return self._gelu

    def _position(self, pos0: int) -> Any:
        """A device int32 holding the position the kernels use: the decode graph's scalar while
        a step is captured, else entry pos0 of a table 0..n_ctx-1 uploaded once (no copy per op)."""
        if self._step_position is not None:
            return self._step_position
        have = 0 if self._positions is None else self._positions.size
        if pos0 >= have:
            table = np.arange(max(pos0 + 1, self._n_ctx), dtype=np.int32)
            self._positions = None
            self._positions = self._alloc(table.nbytes, "the position table", lambda: cp.asarray(table))
            self.scratch_bytes += table.nbytes - 4 * have
        return self._positions[pos0 : pos0 + 1]

    def _reserve_w16(self, count: int) -> None:
        """Grow the f16 dequantization scratch to at least `count` elements."""
        have = 0 if self._w16 is None else self._w16.size
        if count > have:
            self._w16 = None  # let the pool reuse the old buffer for the new one
            self._w16 = self._alloc(2 * count, "the f16 dequantization scratch", lambda: cp.empty(count, cp.float16))
            self.scratch_bytes += 2 * (count - have)

    def _pinned_view(self, key: str, count: int) -> np.ndarray:
        """A float32 view of `count` elements of a pinned host buffer (grown by doubling)."""
        buf = self._pinned.get(key)
        if buf is None or buf.size < count:
            size = max(count, 2 * (0 if buf is None else buf.size), 1 << 14)
            mem = cp.cuda.alloc_pinned_memory(4 * size)
            buf = self._pinned[key] = np.frombuffer(mem, np.float32, size)
        return buf[:count]

    def _alloc(self, nbytes: int, what: str, make: Any) -> Any:
        """Run an allocation; out of device memory becomes DeviceError with asked/free bytes."""
        try:
            return make()
        except cp.cuda.memory.OutOfMemoryError as exc:
            raise self._out_of_memory(f"loading {what}", nbytes, exc) from exc

    def _out_of_memory(self, what: str, nbytes: int, exc: Exception) -> DeviceError:
        free, total = cp.cuda.runtime.memGetInfo()
        free += cp.get_default_memory_pool().free_bytes()  # cached by CuPy, reusable
        err = DeviceError(
            f"GPU out of memory {what}: asked for {nbytes} bytes, {free} free of {total} "
            f"(this backend holds {self.weights_bytes + self.kv_bytes + self.scratch_bytes}); "
            "place fewer blocks on the GPU"
        )
        err.asked_bytes, err.free_bytes = nbytes, free  # type: ignore[attr-defined]
        return err


class DecodeGraph:
    """One token through a run of blocks on a CudaBackend, captured once as a CUDA graph and
    replayed at every later step.

    A captured launch keeps its arguments, so nothing in the step may depend on the position
    through a scalar argument: while the step is captured, every position-dependent kernel
    (rope, the KV store, attention) reads `position`, a device int32 written before each replay,
    and attention's scores scratch covers the whole cache. `x` (1, dim) is the graph's input and
    output. What the step allocates while it is captured comes from `pool`, a memory pool used by
    nothing else, so no later allocation can take memory the graph reads or writes; the buffers
    freed inside the step are reused inside it in stream order, as on eager steps.

    The first step runs eagerly (it also compiles CuPy's element-wise kernels and uploads any
    table, which capture may not do) and is then captured; capture runs no work.
    """

    def __init__(self, backend: CudaBackend, blocks: Sequence[Any], dim: int) -> None:
        self.backend, self.blocks = backend, list(blocks)
        self.stream = cp.cuda.Stream()  # blocking: ordered after the default stream's work
        self.pool = cp.cuda.MemoryPool()
        self.x = backend._alloc(4 * dim, "a decode graph's input", lambda: cp.zeros((1, dim), cp.float32))
        self.position = backend._alloc(4, "a decode graph's position", lambda: cp.zeros(1, cp.int32))
        self.graph: Any = None
        self.replays = 0

    def step(self, x: Any, pos0: int, n_threads: int = 0) -> None:
        """Evaluate the blocks on x (1, dim) at position pos0, in place."""
        if self.graph is None:
            for block in self.blocks:
                block.forward(x, pos0, n_threads)
            self.graph = self._capture(pos0, n_threads)
            return
        with self.stream:
            cp.copyto(self.x, x)
            self.position.set(np.array([pos0], np.int32))
            self.graph.launch(stream=self.stream)
            cp.copyto(x, self.x)
        self.replays += 1

    def _capture(self, pos0: int, n_threads: int) -> Any:
        """The step's launches as a graph; pos0 serves only the Python-side range checks."""
        be = self.backend
        with self.stream, cp.cuda.using_allocator(self.pool.malloc), be._positions_from(self.position):
            self.stream.begin_capture()
            try:
                for block in self.blocks:
                    block.forward(self.x, pos0, n_threads)
            finally:
                graph = self.stream.end_capture()  # leave capture mode also on an error
        return graph
