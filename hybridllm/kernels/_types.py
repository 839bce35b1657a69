"""GGML tensor types the kernels support: ids, names, block sizes and bytes per block.

The numbers are ggml's (the same as ``gguf.GGML_QUANT_SIZES``; tests check that they agree).
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral

import numpy as np
from gguf import GGMLQuantizationType

from ..errors import UnsupportedTensorTypeError


@dataclass(frozen=True)
class TypeSpec:
    """One supported GGML type: each row of `cols` elements is cols / block_size blocks."""

    id: int
    name: str
    block_size: int  # elements per block
    type_size: int  # bytes per block
    float_dtype: np.dtype | None  # numpy dtype of the unquantized float types, else None

    def row_bytes(self, cols: int) -> int:
        """Bytes of one row of `cols` elements (cols a multiple of block_size)."""
        return cols // self.block_size * self.type_size


def _spec(name: str, block_size: int, type_size: int, float_dtype: type | None = None) -> TypeSpec:
    qid = int(GGMLQuantizationType[name])
    dtype = np.dtype(float_dtype) if float_dtype is not None else None
    return TypeSpec(qid, name, block_size, type_size, dtype)


SUPPORTED: dict[int, TypeSpec] = {
    s.id: s
    for s in (
        _spec("F32", 1, 4, np.float32),
        _spec("F16", 1, 2, np.float16),
        _spec("BF16", 1, 2),  # no numpy dtype: raw uint16 / uint8 bytes
        _spec("Q4_0", 32, 18),
        _spec("Q4_1", 32, 20),
        _spec("Q5_0", 32, 22),
        _spec("Q5_1", 32, 24),
        _spec("Q8_0", 32, 34),
        _spec("Q2_K", 256, 84),
        _spec("Q3_K", 256, 110),
        _spec("Q4_K", 256, 144),
        _spec("Q5_K", 256, 176),
        _spec("Q6_K", 256, 210),
    )
}

_BY_NAME: dict[str, TypeSpec] = {s.name: s for s in SUPPORTED.values()}


def _unsupported(label: str) -> UnsupportedTensorTypeError:
    names = ", ".join(s.name for s in SUPPORTED.values())
    return UnsupportedTensorTypeError(
        f"GGML type {label} has no hybridllm kernel (supported: {names})"
    )


def resolve_qtype(qtype: object) -> TypeSpec:
    """TypeSpec of a GGMLQuantizationType, a type id (int) or a type name (str, any case).

    Raises UnsupportedTensorTypeError (a NotImplementedError) naming the type otherwise.
    """
    if isinstance(qtype, TypeSpec):
        return qtype
    if isinstance(qtype, str):
        key = qtype.strip().upper()
        spec = _BY_NAME.get(key)
        if spec is None:
            raise _unsupported(repr(qtype))
        return spec
    if isinstance(qtype, Integral) and not isinstance(qtype, bool):
        qid = int(qtype)
        spec = SUPPORTED.get(qid)
        if spec is None:
            try:
                label = f"{GGMLQuantizationType(qid).name} ({qid})"
            except ValueError:
                label = f"id {qid} (unknown)"
            raise _unsupported(label)
        return spec
    raise _unsupported(repr(qtype))
