"""Tiny synthetic GGUF models of every supported architecture, for tests against llama.cpp.

The weights are random (seeded) and stored in a mix of GGML types so every kernel gets used;
the vocabulary and tokenizer metadata are copied from a real model file, so the tokenizer,
chat template and llama.cpp's loader all behave as with the real thing. The models are small
(a few MB plus the embedding) and load in well under a second.

    python -m hybridllm.models.tiny --arch gemma3 --vocab-from gemma.gguf tiny-gemma.gguf
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import quantize

from hybridllm.config import ARCHITECTURES
from hybridllm.gguf_file import ModelFile

Q = GGMLQuantizationType


@dataclass(frozen=True)
class TinySpec:
    """Shape and types of a tiny model. Matrices whose columns are a multiple of 256 may be K-quants."""

    arch: str  # a key of hybridllm.config.ARCHITECTURES
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 16
    ffn_dim: int = 256
    context_length: int = 2048
    rope_base: float = 10_000.0
    sliding_window: int = 0  # gemma3: window of the local layers
    tied: bool = True  # no output.weight: the head reuses token_embd
    # per layer, GGUF name -> type; layers cycle through this list
    layer_types: tuple[dict[str, Q], ...] = field(default_factory=tuple)
    output_type: Q = Q.F16
    # further `{arch}.`-relative metadata: key -> value (float: float32, int: uint32, str)
    extra_meta: dict[str, float | int | str] = field(default_factory=dict)
    qkv_bias: bool = False  # attn_q/k/v.bias (qwen2)
    rope_factors: tuple[str, ...] = ()  # top-level frequency-factor tensors (rope_freqs, LongRoPE)


LLAMA_TYPES = (
    {"attn_q": Q.Q4_0, "attn_k": Q.Q4_1, "attn_v": Q.Q5_0, "attn_output": Q.Q5_1,
     "ffn_gate": Q.Q8_0, "ffn_up": Q.Q4_1, "ffn_down": Q.Q6_K},
    {"attn_q": Q.F16, "attn_k": Q.Q8_0, "attn_v": Q.Q4_0, "attn_output": Q.F32,
     "ffn_gate": Q.Q5_1, "ffn_up": Q.Q5_0, "ffn_down": Q.Q4_K},
)  # fmt: skip

GEMMA_TYPES = (
    {"attn_q": Q.Q5_0, "attn_k": Q.Q5_0, "attn_v": Q.Q8_0, "attn_output": Q.Q4_K,
     "ffn_gate": Q.Q5_0, "ffn_up": Q.Q5_0, "ffn_down": Q.Q6_K},
    {"attn_q": Q.Q8_0, "attn_k": Q.Q4_0, "attn_v": Q.Q5_0, "attn_output": Q.Q6_K,
     "ffn_gate": Q.Q4_1, "ffn_up": Q.Q8_0, "ffn_down": Q.Q4_K},
    {"attn_q": Q.Q4_1, "attn_k": Q.Q8_0, "attn_v": Q.Q4_0, "attn_output": Q.Q5_K,
     "ffn_gate": Q.Q5_1, "ffn_up": Q.Q5_0, "ffn_down": Q.Q5_K},
)  # fmt: skip

TINY_LLAMA = TinySpec("llama", n_layers=2, tied=False, layer_types=LLAMA_TYPES)
# 6 layers: llama.cpp's gemma3 pattern makes layers 0-4 local (window 8) and layer 5 global.
TINY_GEMMA3 = TinySpec(
    "gemma3", n_layers=6, n_heads=4, n_kv_heads=1, head_dim=64, rope_base=1_000_000.0,
    sliding_window=8, layer_types=GEMMA_TYPES,
)  # fmt: skip


def write_tiny_model(
    path: str | os.PathLike[str],
    vocab_from: str | os.PathLike[str] | GGUFReader,
    spec: TinySpec,
    seed: int = 0,
) -> Path:
    """Write a tiny model with spec's shapes, random weights and vocab_from's tokenizer -> path.

    vocab_from: a GGUF model path, or an open GGUFReader.
    """
    # hybridllm's reader: gguf's own takes ~15 s over gemma's 262k-token vocabulary
    reader = vocab_from if isinstance(vocab_from, GGUFReader) else ModelFile(vocab_from).reader
    n_vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    rng = np.random.default_rng(seed)
    writer = GGUFWriter(str(path), spec.arch)
    # not "tiny-phi3": llama.cpp's vocabulary loader special-cases names containing "phi3"
    writer.add_name(f"tiny random-weight {spec.arch.replace('phi3', 'phi')} model")
    _add_hparams(writer, spec, n_vocab)
    _copy_tokenizer(reader, writer)
    for name, data, qtype in _tensors(spec, n_vocab, rng):
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def _add_hparams(w: GGUFWriter, s: TinySpec, n_vocab: int) -> None:
    a = s.arch
    w.add_uint32(f"{a}.block_count", s.n_layers)
    w.add_uint32(f"{a}.context_length", s.context_length)
    w.add_uint32(f"{a}.embedding_length", s.dim)
    w.add_uint32(f"{a}.feed_forward_length", s.ffn_dim)
    w.add_uint32(f"{a}.attention.head_count", s.n_heads)
    w.add_uint32(f"{a}.attention.head_count_kv", s.n_kv_heads)
    w.add_uint32(f"{a}.attention.key_length", s.head_dim)
    w.add_uint32(f"{a}.attention.value_length", s.head_dim)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_float32(f"{a}.rope.freq_base", s.rope_base)
    w.add_uint32(f"{a}.rope.dimension_count", s.head_dim)
    w.add_uint32(f"{a}.vocab_size", n_vocab)
    if s.sliding_window:
        w.add_uint32(f"{a}.attention.sliding_window", s.sliding_window)
    for key, value in s.extra_meta.items():
        if isinstance(value, str):
            w.add_string(f"{a}.{key}", value)
        elif isinstance(value, float):
            w.add_float32(f"{a}.{key}", value)
        else:
            w.add_uint32(f"{a}.{key}", value)


def _copy_tokenizer(reader: GGUFReader, w: GGUFWriter) -> None:
    """Copy every tokenizer.* key with its GGUF type (tokens, merges, ids, flags, template)."""
    for key, f in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = GGUFValueType(f.types[0])
        if vtype == GGUFValueType.ARRAY:
            sub = GGUFValueType(f.types[-1])
            w.add_key_value(key, list(f.contents()), vtype, sub_type=sub)
        else:
            w.add_key_value(key, f.contents(), vtype)


def _tensors(
    s: TinySpec, n_vocab: int, rng: np.random.Generator
) -> Iterator[tuple[str, np.ndarray, Q]]:
    """(name, data, type) for every tensor; norms are F32 around 1 (gemma's already include +1)."""
    arch = ARCHITECTURES[s.arch]
    q_dim, kv_dim = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim
    yield "token_embd.weight", *_weight(rng, (n_vocab, s.dim), 0.5, Q.Q8_0)
    yield "output_norm.weight", *_norm(rng, s.dim)
    if not s.tied:
        yield "output.weight", *_weight(rng, (n_vocab, s.dim), 0.5, s.output_type)
    for name in s.rope_factors:  # Llama 3's shape: 1 for high frequencies, up to ~8 for low ones
        yield name, np.geomspace(1.0, 8.0, s.head_dim // 2).astype(np.float32) * (
            1.0 + 0.1 * rng.random(s.head_dim // 2, dtype=np.float32)
        ), Q.F32
    shapes = {
        "attn_q": (q_dim, s.dim), "attn_k": (kv_dim, s.dim), "attn_v": (kv_dim, s.dim),
        "attn_output": (s.dim, q_dim), "ffn_gate": (s.ffn_dim, s.dim),
        "ffn_up": (s.ffn_dim, s.dim), "ffn_down": (s.dim, s.ffn_dim),
    }  # fmt: skip
    norms = {"attn_norm": s.dim, "ffn_norm": s.dim} if arch.pre_norms else {}
    full = arch.qk_norm_full
    norms |= {
        "attn_q_norm": q_dim if full else s.head_dim, "attn_k_norm": kv_dim if full else s.head_dim,
        "post_attention_norm": s.dim, "post_ffw_norm": s.dim,
    }  # fmt: skip
    wanted = (*(("attn_norm", "ffn_norm") if arch.pre_norms else ()), *arch.extra_block_tensors)
    norms = {k: n for k, n in norms.items() if k in wanted}
    for i in range(s.n_layers):
        types = s.layer_types[i % len(s.layer_types)]
        for name, n in norms.items():
            yield f"blk.{i}.{name}.weight", *_norm(rng, n)
        if s.qkv_bias:
            for name, n in (("attn_q", q_dim), ("attn_k", kv_dim), ("attn_v", kv_dim)):
                yield f"blk.{i}.{name}.bias", (0.5 * rng.standard_normal(n)).astype(np.float32), Q.F32
        matrices = {
            name: _weight(rng, shape, 1.0 / np.sqrt(shape[1]), types[name])
            for name, shape in shapes.items()
        }  # ~unit-variance outputs for unit-variance inputs keep the residual stream tame
        if arch.fused:  # phi3: one Q/K/V matrix, ffn_up = gate rows then up rows (same types)
            matrices["attn_qkv"] = _fuse(matrices.pop("attn_q"), matrices.pop("attn_k"), matrices.pop("attn_v"))
            matrices["ffn_up"] = _fuse(matrices.pop("ffn_gate"), matrices["ffn_up"])
        for name, (data, qtype) in matrices.items():
            yield f"blk.{i}.{name}.weight", data, qtype


def _fuse(*parts: tuple[np.ndarray, Q]) -> tuple[np.ndarray, Q]:
    """Stack matrices of one type by rows (the fused tensors of phi3)."""
    types = {q for _, q in parts}
    if len(types) != 1:
        raise ValueError(f"fused matrices need one type, got {sorted(t.name for t in types)}")
    return np.concatenate([d for d, _ in parts]), types.pop()


def _norm(rng: np.random.Generator, n: int) -> tuple[np.ndarray, Q]:
    return (1.0 + 0.2 * rng.standard_normal(n)).astype(np.float32), Q.F32


def _weight(
    rng: np.random.Generator, shape: tuple[int, int], std: float, qtype: Q
) -> tuple[np.ndarray, Q]:
    """Random (rows, cols) weights stored as qtype: float arrays, or uint8 (rows, row_bytes)."""
    if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
        return _random_k_blocks(rng, shape, std, qtype), qtype
    w = (std * rng.standard_normal(shape)).astype(np.float32)
    if qtype == Q.F32:
        return w, qtype
    if qtype == Q.F16:
        return w.astype(np.float16), qtype
    return quantize(w, qtype), qtype


def _random_k_blocks(
    rng: np.random.Generator, shape: tuple[int, int], std: float, qtype: Q
) -> np.ndarray:
    """K-quant blocks of random quants and scales (gguf-py cannot quantize K types).

    Random bytes are valid quants and 6-/8-bit scales; only the float16 super-block scales are
    set by hand, so the weights come out with about the asked std and no inf/nan.
    """
    rows, cols = shape
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    if qtype == Q.Q4_K:  # d, dmin (f16) | scales[12] | qs[128]; w = d*sc*q - dmin*m, std ~250d, mean ~236d - 31dmin
        raw[..., 0:2] = _f16_bytes(std / 250.0)
        raw[..., 2:4] = _f16_bytes(7.5 * std / 250.0)
    elif qtype == Q.Q5_K:  # as Q4_K with qh[32] before qs; q 5-bit: std ~500d, mean ~490d - 31dmin
        raw[..., 0:2] = _f16_bytes(std / 500.0)
        raw[..., 2:4] = _f16_bytes(15.5 * std / 500.0)
    else:  # Q6_K: ql[128] | qh[64] | scales[16] int8 | d (f16); w = d*sc*(q - 32)
        raw[..., 208:210] = _f16_bytes(std / 1350.0)
    return raw.reshape(rows, -1)


def _f16_bytes(value: float) -> np.ndarray:
    return np.frombuffer(np.float16(value).tobytes(), dtype=np.uint8)


# One spec per architecture feature, every feature switched on so that it binds: soft-caps below
# the logits' range, original contexts short of the test prompts, scales far from 1.
PHI3_TYPES = (  # fused matrices share one type; K-quants only where the columns allow (256)
    {"attn_q": Q.Q8_0, "attn_k": Q.Q8_0, "attn_v": Q.Q8_0, "attn_output": Q.Q5_1,
     "ffn_gate": Q.Q5_0, "ffn_up": Q.Q5_0, "ffn_down": Q.Q6_K},
    {"attn_q": Q.Q4_1, "attn_k": Q.Q4_1, "attn_v": Q.Q4_1, "attn_output": Q.F16,
     "ffn_gate": Q.Q4_0, "ffn_up": Q.Q4_0, "ffn_down": Q.Q5_K},
)  # fmt: skip
TINY_LLAMA3 = TinySpec(
    "llama", tied=False, layer_types=LLAMA_TYPES, rope_base=500_000.0,
    rope_factors=("rope_freqs.weight",),
)  # fmt: skip
TINY_LLAMA_YARN = TinySpec(
    "llama", layer_types=LLAMA_TYPES,
    extra_meta={"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0,
                "rope.scaling.original_context_length": 128, "rope.scaling.attn_factor": 1.25},
)  # fmt: skip
TINY_MISTRAL = TinySpec(  # Mistral-style: architecture llama, few KV heads, linear rope scaling,
    # key length 32 other than dim / heads (as Mistral Nemo's 128 for 5120 / 32)
    "llama", n_heads=8, n_kv_heads=2, dim=128, head_dim=32, tied=False, layer_types=LLAMA_TYPES,
    extra_meta={"rope.scaling.type": "linear", "rope.scaling.factor": 2.0},
)  # fmt: skip
TINY_QWEN2 = TinySpec("qwen2", layer_types=LLAMA_TYPES, rope_base=1_000_000.0, qkv_bias=True)
# head_dim 80 and base 250000: a pair where powf(base, -2.0f/dim) differs from pow in double
TINY_QWEN3 = TinySpec("qwen3", head_dim=80, layer_types=LLAMA_TYPES, rope_base=250_000.0)
TINY_GEMMA2 = TinySpec(
    "gemma2", n_layers=4, n_kv_heads=1, head_dim=64, sliding_window=6, layer_types=GEMMA_TYPES,
    extra_meta={"attn_logit_softcapping": 1.5, "final_logit_softcapping": 4.0},
)  # fmt: skip
TINY_GRANITE = TinySpec(
    "granite", tied=False, layer_types=LLAMA_TYPES,
    extra_meta={"embedding_scale": 3.0, "residual_scale": 0.5, "attention.scale": 0.15,
                "logit_scale": 2.5},
)  # fmt: skip
TINY_OLMO2 = TinySpec("olmo2", tied=False, layer_types=LLAMA_TYPES, rope_base=500_000.0)
TINY_PHI3 = TinySpec(
    "phi3", n_heads=4, n_kv_heads=4, layer_types=PHI3_TYPES,
    rope_factors=("rope_factors_long.weight", "rope_factors_short.weight"),
    extra_meta={"rope.scaling.original_context_length": 64, "rope.scaling.attn_factor": 1.19},
)  # fmt: skip

SPECS = {
    "llama": TINY_LLAMA, "gemma3": TINY_GEMMA3, "llama3": TINY_LLAMA3, "llama-yarn": TINY_LLAMA_YARN,
    "mistral": TINY_MISTRAL, "qwen2": TINY_QWEN2, "qwen3": TINY_QWEN3, "gemma2": TINY_GEMMA2,
    "granite": TINY_GRANITE, "olmo2": TINY_OLMO2, "phi3": TINY_PHI3,
}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="where to write the .gguf")
    p.add_argument("--arch", choices=sorted(SPECS), default="llama", help="a tiny model spec")
    p.add_argument("--vocab-from", required=True, help="a real GGUF model whose tokenizer to copy")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    path = write_tiny_model(args.out, args.vocab_from, SPECS[args.arch], args.seed)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
