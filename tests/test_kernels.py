"""Kernels: every type and backend against gguf's numpy dequantizer, on random and real tensors.

Backends: "cpp" (hybridllm._core, SIMD kernels), "cpp-scalar" (the same module forced onto its
portable scalar kernels, so that path is tested on AVX2 machines too) and "numba".
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from hybridllm import kernels
from hybridllm.errors import ConfigError

ALL_TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0]
ALL_TYPES += [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]
FLOAT_TYPES = {Q.F32, Q.F16, Q.BF16}

# Byte offsets of the f16 scales (d, and dmin / m) inside each block: random bytes there could be
# NaN / inf, so the generator writes small finite values instead.
SCALE_OFFSETS = {
    Q.Q4_0: (0,),
    Q.Q4_1: (0, 2),
    Q.Q5_0: (0,),
    Q.Q5_1: (0, 2),
    Q.Q8_0: (0,),
    Q.Q2_K: (80, 82),
    Q.Q3_K: (108,),
    Q.Q4_K: (0, 2),
    Q.Q5_K: (0, 2),
    Q.Q6_K: (208,),
}

# cols for the random tests: an odd number of 32-blocks (the C++ kernels pair blocks) and a
# float row length that is not a multiple of the SIMD width.
COLS = {**{t: 352 for t in ALL_TYPES}, Q.F32: 100, Q.F16: 100, Q.BF16: 100}
COLS.update({t: 512 for t in (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)})

MATMUL_RTOL = 1e-2  # activations are quantized to 8 bits (llama.cpp's scheme)


# ---- helpers ----------------------------------------------------------------------------------


def random_raw(qtype: Q, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """(rows, row_bytes) uint8 of a random tensor: random codes, small finite random scales."""
    rng = np.random.default_rng(seed)
    if qtype in FLOAT_TYPES:
        x = rng.standard_normal((rows, cols), dtype=np.float32)
        if qtype == Q.F32:
            return x.view(np.uint8)
        if qtype == Q.F16:
            return x.astype(np.float16).view(np.uint8)
        return (x.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    for off in SCALE_OFFSETS[qtype]:
        mag = 10.0 ** rng.uniform(-3, -1, size=(rows, cols // block))
        sign = rng.choice([-1.0, 1.0], size=mag.shape)
        raw[:, :, off : off + 2] = (
            (mag * sign).astype(np.float16).view(np.uint8).reshape(mag.shape + (2,))
        )
    return raw.reshape(rows, -1)


def oracle(raw: np.ndarray, qtype: Q, rows: int, cols: int) -> np.ndarray:
    return np.asarray(gguf.quants.dequantize(raw, qtype), dtype=np.float32).reshape(rows, cols)


def assert_dequant_close(got: np.ndarray, ref: np.ndarray) -> None:
    """Equal within 1e-6 of the largest |value| (bit-equal where the float order is the same)."""
    assert got.shape == ref.shape and got.dtype == np.float32
    assert np.isfinite(got).all()
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    err = float(np.abs(got - ref).max()) if ref.size else 0.0
    assert err <= 1e-6 * scale, f"max error {err} vs max |value| {scale}"


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))


def activations(n: int, cols: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, size=(n, cols)).astype(np.float32)


# ---- backends ---------------------------------------------------------------------------------


@pytest.fixture(params=["cpp", "cpp-scalar", "numba"])
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    name = request.param
    if name.startswith("cpp") and "cpp" not in kernels.available_backends():
        pytest.skip("hybridllm._core is not built")
    if name == "numba" and "numba" not in kernels.available_backends():
        pytest.skip("hybridllm.kernels.numba_kernels is not available")
    if name == "cpp-scalar":
        from hybridllm import _core

        _core.set_force_scalar(True)
        try:
            yield "cpp"
        finally:
            _core.set_force_scalar(False)
    else:
        yield name


# ---- type table -------------------------------------------------------------------------------


def test_type_table_matches_gguf() -> None:
    assert {Q(t) for t in kernels.SUPPORTED} == set(ALL_TYPES)
    for qid, spec in kernels.SUPPORTED.items():
        assert (spec.block_size, spec.type_size) == gguf.GGML_QUANT_SIZES[Q(qid)]
        assert spec.name == Q(qid).name
    assert kernels.resolve_qtype("q4_k") is kernels.resolve_qtype(Q.Q4_K)
    assert kernels.resolve_qtype(12) is kernels.resolve_qtype(np.int64(12))


def test_core_type_table_agrees() -> None:
    if "cpp" not in kernels.available_backends():
        pytest.skip("hybridllm._core is not built")
    from hybridllm import _core

    for qid, spec in kernels.SUPPORTED.items():
        assert _core.type_info(qid) == (spec.block_size, spec.type_size, spec.name)


# ---- random tensors, every type ---------------------------------------------------------------


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_dequantize_matches_oracle(backend: str, qtype: Q) -> None:
    rows, cols = 7, COLS[qtype]
    raw = random_raw(qtype, rows, cols)
    got = kernels.dequantize(raw, qtype, (rows, cols), backend=backend)
    ref = oracle(raw, qtype, rows, cols)
    assert_dequant_close(got, ref)
    if backend == "cpp":  # the C++ kernels follow the oracle's operation order exactly
        np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_matmul_matches_float64(backend: str, qtype: Q) -> None:
    rows, cols = 37, COLS[qtype]
    raw = random_raw(qtype, rows, cols, seed=2)
    w = oracle(raw, qtype, rows, cols).astype(np.float64)
    tol = float_tol(backend, qtype) if qtype in FLOAT_TYPES else MATMUL_RTOL
    for n in (1, 3, 64):
        x = activations(n, cols, seed=n)
        got = kernels.matmul(raw, qtype, (rows, cols), x, backend=backend)
        assert got.shape == (n, rows) and got.dtype == np.float32
        err = rel_err(got, x.astype(np.float64) @ w.T)
        assert err < tol, f"n={n}: relative error {err:.2e}"


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_get_rows_matches_oracle(backend: str, qtype: Q) -> None:
    rows, cols = 9, COLS[qtype]
    raw = random_raw(qtype, rows, cols, seed=3)
    ids = np.array([8, 0, 3, 3, 5], dtype=np.int64)
    got = kernels.get_rows(raw, qtype, (rows, cols), ids, backend=backend)
    assert_dequant_close(got, oracle(raw, qtype, rows, cols)[ids])


# ---- real models ------------------------------------------------------------------------------

_readers: dict[str, gguf.GGUFReader] = {}


def _reader(path: str) -> gguf.GGUFReader:
    if path not in _readers:
        _readers[path] = gguf.GGUFReader(path)
    return _readers[path]


def _first_tensors(path: str) -> dict[Q, gguf.ReaderTensor]:
    """The first 2-D tensor of each type in the file (and the first 1-D one for F32)."""
    found: dict[Q, gguf.ReaderTensor] = {}
    for t in _reader(path).tensors:
        qt = Q(t.tensor_type)
        if qt not in found and (len(t.shape) == 2 or qt == Q.F32):
            found[qt] = t
    return found


def _numpy_shape(t: gguf.ReaderTensor) -> tuple[int, ...]:
    return tuple(int(d) for d in reversed(t.shape))  # GGUF dims are ne0 (innermost) first


@pytest.fixture(params=["smollm", "gemma"])
def real_tensors(request: pytest.FixtureRequest) -> dict[Q, gguf.ReaderTensor]:
    fixture = "smollm_path" if request.param == "smollm" else "gemma_path"
    return _first_tensors(request.getfixturevalue(fixture))


def test_real_model_types(smollm_path: str, gemma_path: str) -> None:
    assert set(_first_tensors(smollm_path)) == {Q.Q4_1, Q.Q8_0, Q.F32}
    assert set(_first_tensors(gemma_path)) == {Q.Q5_0, Q.Q4_K, Q.Q6_K, Q.Q8_0, Q.F32}


def test_real_tensors(backend: str, real_tensors: dict[Q, gguf.ReaderTensor]) -> None:
    for qtype, t in real_tensors.items():
        shape = _numpy_shape(t)
        if len(shape) == 1:  # norm weights: F32 given as a float32 array (GGUFReader's view)
            got = kernels.dequantize(t.data, qtype, shape, backend=backend)
            np.testing.assert_array_equal(got, np.asarray(t.data))
            continue
        rows = min(shape[0], 256)  # token_embd has 262144 rows: a slice is enough (and zero-copy)
        cols = shape[1]
        raw = t.data[:rows]
        ref = oracle(raw, qtype, rows, cols)
        assert_dequant_close(kernels.dequantize(raw, qtype, (rows, cols), backend=backend), ref)
        ids = np.array([rows - 1, 0, rows // 2], dtype=np.int64)
        assert_dequant_close(
            kernels.get_rows(raw, qtype, (rows, cols), ids, backend=backend), ref[ids]
        )
        for n in (1, 3, 64):
            x = activations(n, cols, seed=n)
            got = kernels.matmul(raw, qtype, (rows, cols), x, backend=backend)
            err = rel_err(got, x.astype(np.float64) @ ref.astype(np.float64).T)
            assert err < MATMUL_RTOL, f"{t.name} ({qtype.name}) n={n}: relative error {err:.2e}"


def test_real_embedding_lookup_whole_tensor(gemma_path: str) -> None:
    """get_rows over the full 262144-row memory-mapped embedding (no copy of the tensor)."""
    t = next(t for t in _reader(gemma_path).tensors if t.name == "token_embd.weight")
    rows, cols = _numpy_shape(t)
    ids = np.array([0, 1, 2, rows - 1, 12345], dtype=np.int64)
    got = kernels.get_rows(t.data, t.tensor_type, (rows, cols), ids)
    ref = oracle(np.ascontiguousarray(t.data[ids]), Q.Q8_0, len(ids), cols)
    assert_dequant_close(got, ref)


# ---- shapes and edge cases --------------------------------------------------------------------


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.F16], ids=lambda t: t.name)
def test_matmul_threading_and_tiles(backend: str, qtype: Q) -> None:
    """Rows not a multiple of any chunk, n not a multiple of the tile: same result for 1 or 2
    threads, and each row equal to its own matvec (the tiling does not change the arithmetic)."""
    rows, cols = 1001, COLS[qtype]
    raw = random_raw(qtype, rows, cols, seed=4)
    x = activations(7, cols, seed=5)
    one = kernels.matmul(raw, qtype, (rows, cols), x, backend=backend, n_threads=1)
    two = kernels.matmul(raw, qtype, (rows, cols), x, backend=backend, n_threads=2)
    np.testing.assert_allclose(two, one, rtol=1e-5, atol=1e-6 * float(np.abs(one).max()))
    for i in (0, 6):
        row = kernels.matmul(raw, qtype, (rows, cols), x[i], backend=backend)
        np.testing.assert_allclose(row, one[i], rtol=1e-5, atol=1e-6 * float(np.abs(one).max()))


def float_tol(backend: str, qtype: Q) -> float:
    """Relative error allowed for float weights: the C++ core rounds the activations of an F16
    matmul to f16, as llama.cpp does (its vec_dot_type for F16 is F16): ~1e-4."""
    return 1e-3 if backend == "cpp" and qtype == Q.F16 else 1e-5


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16], ids=lambda t: t.name)
def test_float_matmul_long_rows(backend: str, qtype: Q) -> None:
    """Float weights with long rows and a prompt-sized batch."""
    rows, cols, n = 33, 2100, 9
    raw = random_raw(qtype, rows, cols, seed=6)
    w = oracle(raw, qtype, rows, cols).astype(np.float64)
    x = activations(n, cols, seed=7)
    got = kernels.matmul(raw, qtype, (rows, cols), x, backend=backend)
    assert rel_err(got, x.astype(np.float64) @ w.T) < float_tol(backend, qtype)


def test_matmul_shapes_and_buffers(backend: str) -> None:
    qtype, rows, cols = Q.Q4_0, 50, 96
    raw = random_raw(qtype, rows, cols)
    x = activations(4, cols)
    ref = kernels.matmul(raw, qtype, (rows, cols), x, backend=backend)
    # n = 0
    empty = kernels.matmul(
        raw, qtype, (rows, cols), np.zeros((0, cols), np.float32), backend=backend
    )
    assert empty.shape == (0, rows)
    # 1-D x gives (rows,)
    vec = kernels.matmul(raw, qtype, (rows, cols), x[2], backend=backend)
    assert vec.shape == (rows,)
    np.testing.assert_array_equal(vec, ref[2])
    # non-contiguous x (every other column of a wider array, and a transposed view)
    wide = np.zeros((4, 2 * cols), np.float32)
    wide[:, ::2] = x
    np.testing.assert_array_equal(
        kernels.matmul(raw, qtype, (rows, cols), wide[:, ::2], backend=backend), ref
    )
    np.testing.assert_array_equal(
        kernels.matmul(raw, qtype, (rows, cols), np.asfortranarray(x), backend=backend), ref
    )
    # out= is filled and returned
    out = np.full((4, rows), np.nan, np.float32)
    assert kernels.matmul(raw, qtype, (rows, cols), x, backend=backend, out=out) is out
    np.testing.assert_array_equal(out, ref)
    # a raw passed as bytes works too
    np.testing.assert_array_equal(
        kernels.matmul(raw.tobytes(), "Q4_0", (rows, cols), x, backend=backend), ref
    )


def test_float_tensors_accept_typed_arrays(backend: str) -> None:
    x = np.random.default_rng(0).standard_normal((3, 40)).astype(np.float32)
    np.testing.assert_array_equal(kernels.dequantize(x, Q.F32, (3, 40), backend=backend), x)
    h = x.astype(np.float16)
    np.testing.assert_array_equal(
        kernels.dequantize(h, "F16", (3, 40), backend=backend), h.astype(np.float32)
    )
    v = np.ones(40, np.float32)
    np.testing.assert_allclose(
        kernels.matmul(h, Q.F16, (3, 40), v, backend=backend),
        h.astype(np.float32).sum(1),
        rtol=1e-6,
    )
    bf = (x.view(np.uint32) >> 16).astype(np.uint16)
    np.testing.assert_array_equal(
        kernels.dequantize(bf, Q.BF16, (3, 40), backend=backend),
        (bf.astype(np.uint32) << 16).view(np.float32),
    )


def test_dequantize_nd_and_empty(backend: str) -> None:
    raw = random_raw(Q.Q8_0, 6, 64)
    ref = oracle(raw, Q.Q8_0, 6, 64)
    got = kernels.dequantize(raw, Q.Q8_0, (2, 3, 64), backend=backend)
    assert got.shape == (2, 3, 64)
    assert_dequant_close(got.reshape(6, 64), ref)
    assert kernels.dequantize(raw[:0], Q.Q8_0, (0, 64), backend=backend).shape == (0, 64)
    assert kernels.get_rows(
        raw, Q.Q8_0, (6, 64), np.array([], np.int64), backend=backend
    ).shape == (0, 64)


def test_invalid_arguments() -> None:
    raw = random_raw(Q.Q4_0, 4, 64)
    x = activations(2, 64)
    with pytest.raises(ValueError, match="multiple of the block size 32"):
        kernels.matmul(raw, Q.Q4_0, (4, 48), x)
    with pytest.raises(ValueError, match="block size 256"):
        kernels.dequantize(np.zeros((1, 144), np.uint8), Q.Q4_K, (1, 128))
    with pytest.raises(ValueError, match=r"raw has 144 bytes, expected 108"):
        kernels.dequantize(raw, Q.Q4_0, (3, 64))
    with pytest.raises(ValueError, match="expected 144"):
        kernels.matmul(raw[:, :-1], Q.Q4_0, (4, 64), x)
    with pytest.raises(ValueError, match="x has shape"):
        kernels.matmul(raw, Q.Q4_0, (4, 64), activations(2, 32))
    with pytest.raises(ValueError, match="x has dtype float64"):
        kernels.matmul(raw, Q.Q4_0, (4, 64), x.astype(np.float64))
    with pytest.raises(ValueError, match="out has shape"):
        kernels.matmul(raw, Q.Q4_0, (4, 64), x, out=np.empty((4, 2), np.float32))
    with pytest.raises(ValueError, match="out has dtype"):
        kernels.matmul(raw, Q.Q4_0, (4, 64), x, out=np.empty((2, 4), np.float64))
    with pytest.raises(ValueError, match="n_threads"):
        kernels.matmul(raw, Q.Q4_0, (4, 64), x, n_threads=0)
    with pytest.raises(ValueError, match="2-D"):
        kernels.matmul(raw, Q.Q4_0, (256,), x)
    with pytest.raises(ValueError, match="dtype float32, expected"):  # dequantized data, not bytes
        kernels.dequantize(np.zeros((4, 64), np.float32), Q.Q4_0, (4, 64))
    with pytest.raises(IndexError, match="out of range"):
        kernels.get_rows(raw, Q.Q4_0, (4, 64), np.array([4]))
    with pytest.raises(IndexError, match="out of range"):
        kernels.get_rows(raw, Q.Q4_0, (4, 64), [-1])
    with pytest.raises(ValueError, match="ids has dtype"):
        kernels.get_rows(raw, Q.Q4_0, (4, 64), np.array([0.5]))


def test_overlap_detected() -> None:
    buf = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="overlap"):
        kernels.matmul(
            np.zeros((2, 8), np.uint8), Q.F32, (2, 2), buf.reshape(2, 2), out=buf.reshape(2, 2)
        )


@pytest.mark.parametrize("qtype", [Q.IQ2_XXS, Q.TQ1_0, Q.F64, 99, "MXFP4_NOPE", "q4_k_m"], ids=str)
def test_unknown_types_raise_not_implemented(qtype: object) -> None:
    with pytest.raises(NotImplementedError, match="has no hybridllm kernel"):
        kernels.dequantize(np.zeros(66, np.uint8), qtype, (1, 256))
    with pytest.raises(NotImplementedError):
        kernels.matmul(np.zeros(66, np.uint8), qtype, (1, 256), np.zeros(256, np.float32))


def test_core_checks_memory_safety() -> None:
    """The low-level module validates what it needs to stay in bounds."""
    if "cpp" not in kernels.available_backends():
        pytest.skip("hybridllm._core is not built")
    from hybridllm import _core

    raw = random_raw(Q.Q4_0, 4, 64)
    out = np.empty((4, 64), np.float32)
    with pytest.raises(ValueError):
        _core.dequantize(raw, int(Q.Q4_0), 5, 64, out)
    with pytest.raises(ValueError):
        _core.dequantize(raw, int(Q.Q4_0), 4, 64, np.empty((4, 63), np.float32))
    with pytest.raises(ValueError):
        _core.matmul(
            raw, int(Q.Q4_0), 4, 64, np.zeros((2, 64), np.float64), np.empty((2, 4), np.float32), 1
        )
    with pytest.raises(IndexError):
        _core.get_rows(
            raw, int(Q.Q4_0), 4, 64, np.array([7], np.int64), np.empty((1, 64), np.float32)
        )
    with pytest.raises(NotImplementedError):
        _core.dequantize(raw, 16, 4, 64, out)


# ---- backend selection ------------------------------------------------------------------------


def test_backend_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    avail = kernels.available_backends()
    assert avail and set(avail) <= {"cpp", "numba"}
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    assert kernels.default_backend() == avail[0]
    for name in avail:
        monkeypatch.setenv(kernels.ENV_VAR, name)
        assert kernels.default_backend() == name
    monkeypatch.setenv(kernels.ENV_VAR, "fortran")
    with pytest.raises(ConfigError, match="HYBRIDLLM_KERNELS"):
        kernels.default_backend()
    with pytest.raises(ConfigError):
        kernels.dequantize(np.zeros(4, np.uint8), Q.F32, (1,), backend="gpu")
    assert isinstance(kernels.cpu_features(), str) and kernels.cpu_features()
    assert kernels.default_threads() >= 1


def test_numba_fallback_warns_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the C++ core the default is Numba, with one warning per process."""
    if "numba" not in kernels.available_backends():
        pytest.skip("hybridllm.kernels.numba_kernels is not available")
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    monkeypatch.setattr(kernels, "_core", None)
    monkeypatch.setattr(kernels, "_warned_fallback", False)
    with pytest.warns(RuntimeWarning, match="Numba"):
        assert kernels.default_backend() == "numba"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels.default_backend() == "numba"
        assert kernels.available_backends() == ["numba"]
    monkeypatch.setenv(kernels.ENV_VAR, "cpp")
    with pytest.raises(ConfigError, match="not built"):
        kernels.default_backend()
