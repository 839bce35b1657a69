"""Open a GGUF file through gguf.GGUFReader: metadata, ModelConfig and zero-copy tensors.

Nothing here copies tensor data: every `Tensor.raw` is a view into the memory map. Malformed
files (wrong magic, truncated, counts or offsets past the end, unknown types) raise
ModelFormatError naming the file and the fault, never a bare numpy/struct error or a hang.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType

from .config import ModelConfig
from .errors import ModelFormatError, UnsupportedTensorTypeError

#: GGML types with kernels in hybridllm (C++ core and Numba fallback).
SUPPORTED_TYPES = frozenset(
    GGMLQuantizationType[n]
    for n in "F32 F16 BF16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K Q3_K Q4_K Q5_K Q6_K".split()
)

# Smallest possible encodings, used to reject counts that cannot fit in the file before
# gguf's reader loops over them (a corrupted count of 2**60 would otherwise spin for ages).
_MIN_KV_BYTES = 8 + 4  # empty key + value type
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # empty name, n_dims, type, offset
_SCALAR_BYTES = {t: np.dtype(d).itemsize for t, d in GGUFReader.gguf_scalar_to_np.items()}


class _BoundedReader(GGUFReader):
    """GGUFReader that refuses to read past the end of the file or to trust absurd counts."""

    def _get(self, offset, dtype, count=1, override_order=None):  # type: ignore[override]
        end = int(offset) + int(count) * np.dtype(dtype).itemsize
        if int(offset) < 0 or end > len(self.data):
            raise _PastEnd(int(offset), end, len(self.data))
        return super()._get(offset, dtype, count, override_order)

    def _get_field_parts(self, orig_offs, raw_type):  # type: ignore[override]
        if raw_type != GGUFValueType.ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        item_type = int(self._get(orig_offs, np.uint32)[0])
        length = int(self._get(orig_offs + 4, np.uint64)[0])
        item_bytes = 8 if item_type == GGUFValueType.STRING else _SCALAR_BYTES.get(item_type, 1)
        if length * item_bytes > len(self.data) - orig_offs:
            raise ModelFormatError(f"metadata array of {length} items runs past the end of the file")
        if item_type == GGUFValueType.STRING and self.byte_order == "I":
            return self._string_array_parts(orig_offs, length)
        if item_type in _SCALAR_BYTES and self.byte_order == "I":
            return self._scalar_array_parts(orig_offs, item_type, length)
        return super()._get_field_parts(orig_offs, raw_type)

    # gguf's reader walks arrays one item at a time through numpy (about 14 s for Gemma's
    # 262k-token vocabulary); these two build the same parts in bulk, in well under a second.
    def _scalar_array_parts(self, offs: int, item_type: int, length: int):  # noqa: ANN202
        head = [self._get(offs, np.uint32), self._get(offs + 4, np.uint64)]
        values = self._get(offs + 12, self.gguf_scalar_to_np[GGUFValueType(item_type)], length)
        parts = head + list(values.view(np.ndarray).reshape(length, 1))
        types = [GGUFValueType.ARRAY, GGUFValueType(item_type)]
        return 12 + int(values.nbytes), parts, list(range(2, 2 + length)), types

    def _string_array_parts(self, offs: int, length: int):  # noqa: ANN202
        flat = self.data.view(np.ndarray)
        parts: list[np.ndarray] = [self._get(offs, np.uint32), self._get(offs + 4, np.uint64)]
        pos, end = offs + 12, len(flat)
        for _ in range(length):
            if pos + 8 > end:
                raise _PastEnd(pos, pos + 8, end)
            n = int.from_bytes(flat[pos : pos + 8], "little")
            if pos + 8 + n > end:
                raise _PastEnd(pos, pos + 8 + n, end)
            parts += (flat[pos : pos + 8].view(np.uint64), flat[pos + 8 : pos + 8 + n])
            pos += 8 + n
        data_idx = list(range(3, 3 + 2 * length, 2))
        return pos - offs, parts, data_idx, [GGUFValueType.ARRAY, GGUFValueType.STRING]

    def _build_fields(self, offs, count):  # type: ignore[override]
        if int(count) * _MIN_KV_BYTES > len(self.data):
            raise ModelFormatError(f"header claims {int(count)} metadata entries; the file is too small")
        return super()._build_fields(offs, count)

    def _build_tensor_info(self, offs, count):  # type: ignore[override]
        if int(count) * _MIN_TENSOR_INFO_BYTES > len(self.data):
            raise ModelFormatError(f"header claims {int(count)} tensors; the file is too small")
        return super()._build_tensor_info(offs, count)


class _PastEnd(ModelFormatError):
    def __init__(self, start: int, end: int, size: int) -> None:
        super().__init__(f"data at bytes {start}..{end} lies past the end of the file ({size} bytes; truncated?)")


@dataclass(frozen=True)
class Tensor:
    """A tensor as stored: GGUF name, GGML type, numpy-order shape and a view of its raw bytes.

    `raw` is uint8 of shape (rows, bytes_per_row) for 2-D tensors ((1, nbytes) for 1-D),
    each row quantized along the last axis. Only the kernels interpret the bytes.
    """

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order: (rows, cols) for matrices, (n,) for vectors
    raw: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.raw.nbytes)

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape))

    def as_f32(self) -> np.ndarray:
        """The values of an F32 tensor (a view, no copy); norms and biases are stored this way."""
        if self.qtype != GGMLQuantizationType.F32:
            raise ModelFormatError(f"tensor {self.name!r} is {self.qtype.name}, expected F32")
        return self.raw.reshape(-1).view(np.float32).reshape(self.shape)


class ModelFile:
    """An open GGUF model: `config`, `tensors` by GGUF name, metadata access, the reader."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.reader = open_reader(self.path)
        self.tensors: dict[str, Tensor] = {t.name: t for t in _tensors(self.reader, self.path)}
        self.config = ModelConfig.from_metadata(
            self.metadata, has_output="output.weight" in self.tensors, source=str(self.path)
        )
        self._check_tensors()

    # --- metadata -----------------------------------------------------------------------
    def metadata(self, key: str) -> Any:
        """A metadata value as a Python object (str, int, float, bool, list), or None."""
        field = self.reader.get_field(key)
        if field is None:
            return None
        try:
            value = field.contents()
        except (UnicodeDecodeError, IndexError, ValueError) as exc:
            raise ModelFormatError(f"{self.path}: metadata key {key!r} is unreadable ({exc})") from exc
        return value.item() if isinstance(value, np.generic) else value

    def metadata_keys(self) -> Iterator[str]:
        return (k for k in self.reader.fields if not k.startswith("GGUF."))

    @cached_property
    def file_size(self) -> int:
        return self.path.stat().st_size

    # --- tensors ------------------------------------------------------------------------
    def tensor(self, name: str) -> Tensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise ModelFormatError(f"{self.path}: tensor {name!r} is missing") from None

    @property
    def output_tensor(self) -> Tensor:
        """The output head: `output.weight`, or the token embedding when tied."""
        return self.tensors.get("output.weight") or self.tensor("token_embd.weight")

    def block_tensors(self, layer: int) -> dict[str, Tensor]:
        """The tensors of block `layer`: the required ones and the optional ones the file has."""
        out = {n: self.tensor(n) for n in self.config.block_tensor_names(layer)}
        optional = self.config.optional_block_tensor_names(layer)
        return out | {n: self.tensors[n] for n in optional if n in self.tensors}

    def rope_factors(self, n_ctx: int | None) -> Tensor | None:
        """The rope frequency factors (dim/2,) used at context n_ctx, or None (see config)."""
        for name in self.config.rope_factor_names(n_ctx):
            if name in self.tensors:
                return self.tensors[name]
        return None

    def block_nbytes(self, layer: int) -> int:
        return sum(t.nbytes for t in self.block_tensors(layer).values())

    def _check_tensors(self) -> None:
        required = ["token_embd.weight", "output_norm.weight"]
        for layer in range(self.config.n_layers):
            required += self.config.block_tensor_names(layer)
        for name in required:
            self.tensor(name)  # raises when missing
        read = set(required) | {"output.weight"} | self.config.known_rope_factor_names()
        for layer in range(self.config.n_layers):
            read |= set(self.config.optional_block_tensor_names(layer))
        for name in sorted(set(self.tensors) - read):
            if not KNOWN_UNUSED.match(name):
                raise ModelFormatError(f"{self.path}: {unread_tensor_error(name, self.config.arch)}")
        self._check_vectors()
        for t in self.tensors.values():
            if t.qtype not in SUPPORTED_TYPES:
                raise UnsupportedTensorTypeError(
                    f"{self.path}: tensor {t.name!r} has type {t.qtype.name}, which hybridllm does not "
                    f"support yet (supported: {', '.join(sorted(q.name for q in SUPPORTED_TYPES))})"
                )


    def _check_vectors(self) -> None:
        """Biases and frequency factors must be F32 of the length the block reads."""
        cfg = self.config
        half = cfg.rope_dim // 2
        lengths = {n: half for n in cfg.known_rope_factor_names()}
        for layer in range(cfg.n_layers):
            widths = (cfg.q_dim, cfg.kv_dim_k, cfg.kv_dim_v)
            lengths |= dict(zip(cfg.optional_block_tensor_names(layer), widths, strict=False))
        for name, n in lengths.items():
            t = self.tensors.get(name)
            if t is not None and (t.qtype != GGMLQuantizationType.F32 or t.shape != (n,)):
                raise ModelFormatError(
                    f"{self.path}: tensor {name!r} is {t.qtype.name} {t.shape}, expected F32 ({n},)"
                )


#: Tensors a file may carry that llama.cpp does not read either (an old rotary table).
KNOWN_UNUSED = re.compile(r"^blk\.\d+\.attn_rot_embd\.weight$")

#: What a tensor we do not read would have done: ignoring it would give wrong answers silently.
TENSOR_FEATURES = {
    "rope_freqs": "rope frequency factors",
    "rope_factors_long": "LongRoPE frequency factors",
    "rope_factors_short": "LongRoPE frequency factors",
    "attn_qkv": "a fused Q/K/V projection",
    "ffn_gate_inp": "a mixture-of-experts router",
    "ffn_gate_exps": "mixture-of-experts weights",
    "ffn_up_exps": "mixture-of-experts weights",
    "ffn_down_exps": "mixture-of-experts weights",
    "ssm_in": "a recurrent (state-space) layer",
    "ssm_conv1d": "a recurrent (state-space) layer",
    "time_mix_key": "a recurrent (RWKV) layer",
    "bias": "a bias",
}


def unread_tensor_error(name: str, arch: str) -> str:
    """Why a tensor this runtime does not read makes the file unsupported, naming the feature."""
    parts = name.split(".")
    feature = next(
        (TENSOR_FEATURES[p] for p in (parts[-1], *parts) if p in TENSOR_FEATURES), "a tensor"
    )
    return (
        f"tensor {name!r} ({feature}) is not supported yet for architecture {arch!r}: "
        "running without it would give wrong answers"
    )


def open_reader(path: str | os.PathLike[str]) -> GGUFReader:
    """A bounded, fast GGUFReader over `path`; any fault becomes a ModelFormatError."""
    path = Path(path)
    if not path.is_file():
        raise ModelFormatError(f"{path}: no such file")
    if path.stat().st_size < 24:
        raise ModelFormatError(f"{path}: file is {path.stat().st_size} bytes, too small to be GGUF")
    try:
        return _BoundedReader(path, "r")
    except ModelFormatError as exc:
        raise ModelFormatError(f"{path}: {exc}") from None
    except (ValueError, KeyError, IndexError, OverflowError, UnicodeDecodeError, TypeError) as exc:
        reason = str(exc) or type(exc).__name__
        if "magic" in reason:
            reason = "not a GGUF file (bad magic bytes)"
        raise ModelFormatError(f"{path}: {reason}") from None


def _tensors(reader: GGUFReader, path: Path) -> Iterator[Tensor]:
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # ggml ne0 first -> numpy order
        block, type_bytes = GGML_QUANT_SIZES[t.tensor_type]
        if shape[-1] % block:
            raise ModelFormatError(
                f"{path}: tensor {t.name!r} has {shape[-1]} columns, not a multiple of "
                f"{t.tensor_type.name}'s block of {block}"
            )
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        raw = t.data.reshape(-1).view(np.uint8).reshape(rows, shape[-1] // block * type_bytes)
        yield Tensor(t.name, GGMLQuantizationType(t.tensor_type), shape, raw)


def summarize(model: ModelFile) -> dict[str, Any]:
    """What `hybridllm info` shows: a JSON-ready account of the file and where its bytes are."""
    cfg = model.config
    histogram: dict[str, dict[str, int]] = {}
    for t in model.tensors.values():
        row = histogram.setdefault(t.qtype.name, {"tensors": 0, "bytes": 0})
        row["tensors"] += 1
        row["bytes"] += t.nbytes
    embd = model.tensor("token_embd.weight")
    head = model.output_tensor
    return {
        "file": str(model.path),
        "file_bytes": model.file_size,
        "name": cfg.name,
        "architecture": cfg.arch,
        "parameters": sum(t.n_elements for t in model.tensors.values()),
        "hyperparameters": {
            "n_layers": cfg.n_layers, "dim": cfg.dim, "n_heads": cfg.n_heads,
            "n_kv_heads": cfg.n_kv_heads, "head_dim_k": cfg.head_dim_k, "head_dim_v": cfg.head_dim_v,
            "ffn_dim": cfg.ffn_dim, "norm_eps": cfg.norm_eps, "rope_base": cfg.rope_base,
            "rope_dim": cfg.rope_dim, "sliding_window": cfg.sliding_window,
            "swa_layers": sum(cfg.swa_layers),
            "rope_scaling": cfg.rope_scaling.kind, "rope_freq_scale": cfg.rope_scaling.freq_scale,
            "rope_factors": model.rope_factors(None) is not None,
            "attn_softcap": cfg.attn_softcap, "final_softcap": cfg.final_softcap,
        },  # fmt: skip
        "context_length": cfg.context_length,
        "tensor_types": histogram,
        "block_bytes": [model.block_nbytes(i) for i in range(cfg.n_layers)],
        "token_embd": {"type": embd.qtype.name, "bytes": embd.nbytes},
        "output": {"type": head.qtype.name, "bytes": head.nbytes, "tied": cfg.tied_embeddings},
        "tokenizer": {
            "model": model.metadata("tokenizer.ggml.model"),
            "pre": model.metadata("tokenizer.ggml.pre"),
            "vocab_size": cfg.n_vocab,
        },
        "chat_template": model.metadata("tokenizer.chat_template") is not None,
    }
