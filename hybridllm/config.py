"""ModelConfig: everything the forward pass needs, read once from GGUF metadata.

Architectures differ only by data: `ARCHITECTURES` maps a GGUF `general.architecture` to an
`ArchSpec` (rope style, activation, which optional norms exist, the sliding-window pattern).
Adding qwen2 or phi3 means adding a row here (and any new tensor names to its spec).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gguf import Keys

from .errors import ModelFormatError

#: Tensors every block has, by their GGUF names without the `blk.{i}.` prefix.
BLOCK_TENSORS = (
    "attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
    "ffn_norm", "ffn_gate", "ffn_up", "ffn_down",
)  # fmt: skip


@dataclass(frozen=True)
class ArchSpec:
    """What sets one architecture apart; the block itself is written once."""

    rope_type: str  # "norm": rotate adjacent pairs (llama); "neox": rotate halves (gemma)
    activation: str  # gate activation of the FFN: "silu" or "gelu_tanh"
    extra_block_tensors: tuple[str, ...] = ()  # e.g. QK norms, post-attention/FFN norms
    embed_scale_sqrt_dim: bool = False  # gemma multiplies embeddings by sqrt(dim)
    swa_period: int = 0  # every `period`-th layer is global, the others use a sliding window
    default_rope_base_swa: float = 10_000.0
    # gemma3 scales Q by attn_scale after rope (before it is rounded to f16 for Q.K); llama scales
    # the scores. Equal in exact arithmetic, not in f16 where Q's small values are subnormal.
    scale_q: bool = False

    @property
    def qk_norm(self) -> bool:
        return "attn_q_norm" in self.extra_block_tensors

    @property
    def post_norms(self) -> bool:
        return "post_attention_norm" in self.extra_block_tensors


ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec(rope_type="norm", activation="silu"),
    "gemma3": ArchSpec(
        rope_type="neox",
        activation="gelu_tanh",
        extra_block_tensors=("attn_q_norm", "attn_k_norm", "post_attention_norm", "post_ffw_norm"),
        embed_scale_sqrt_dim=True,
        swa_period=6,
        scale_q=True,
    ),
}


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of one model; shapes below are (rows, cols) in numpy order."""

    arch: str
    name: str
    n_layers: int
    dim: int  # residual stream width (n_embd)
    n_heads: int
    n_kv_heads: int
    head_dim_k: int  # per-head width of Q and K
    head_dim_v: int  # per-head width of V
    ffn_dim: int
    n_vocab: int
    context_length: int  # trained context
    norm_eps: float
    rope_base: float
    rope_base_swa: float  # rope base of sliding-window layers (gemma3 local layers)
    rope_dim: int
    rope_scale: float  # linear rope scaling: positions are multiplied by 1/rope_scale
    sliding_window: int  # 0: no sliding window
    swa_layers: tuple[bool, ...]  # per layer: does it use the sliding window?
    attn_scale: float  # multiplies Q·K before the softmax
    tied_embeddings: bool  # no output.weight: the head reuses token_embd
    spec: ArchSpec = field(repr=False)

    # --- derived sizes -------------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim_k

    @property
    def kv_dim_k(self) -> int:
        return self.n_kv_heads * self.head_dim_k

    @property
    def kv_dim_v(self) -> int:
        return self.n_kv_heads * self.head_dim_v

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.dim) if self.spec.embed_scale_sqrt_dim else 1.0

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """Bytes of K and V cache one token takes in one block."""
        return (self.kv_dim_k + self.kv_dim_v) * dtype_bytes

    def block_tensor_names(self, layer: int) -> list[str]:
        suffixes = BLOCK_TENSORS + self.spec.extra_block_tensors
        return [f"blk.{layer}.{s}.weight" for s in suffixes]

    # --- construction -------------------------------------------------------------------
    @classmethod
    def from_metadata(
        cls, meta: Callable[[str], Any], has_output: bool, source: str = "<metadata>"
    ) -> ModelConfig:
        """Build from a metadata getter `meta(key) -> value or None` (keys from gguf.Keys)."""
        arch = meta(Keys.General.ARCHITECTURE)
        if arch is None:
            raise ModelFormatError(f"{source}: no 'general.architecture' in the metadata")
        spec = ARCHITECTURES.get(arch)
        if spec is None:
            known = ", ".join(sorted(ARCHITECTURES))
            raise ModelFormatError(f"{source}: architecture {arch!r} is not supported (known: {known})")

        def need(template: str) -> Any:
            key = template.format(arch=arch)
            value = meta(key)
            if value is None:
                raise ModelFormatError(f"{source}: metadata key {key!r} is missing")
            return value

        def get(template: str, default: Any) -> Any:
            value = meta(template.format(arch=arch))
            return default if value is None else value

        if int(get(Keys.LLM.EXPERT_COUNT, 0) or 0) > 0:
            raise ModelFormatError(
                f"{source}: a mixture of experts ({arch}.expert_count = "
                f"{get(Keys.LLM.EXPERT_COUNT, 0)}) is not supported yet"
            )
        dim = int(need(Keys.LLM.EMBEDDING_LENGTH))
        n_heads = int(_first(need(Keys.Attention.HEAD_COUNT)))
        n_kv_heads = int(_first(get(Keys.Attention.HEAD_COUNT_KV, n_heads)))
        head_dim_k = int(get(Keys.Attention.KEY_LENGTH, dim // n_heads))
        head_dim_v = int(get(Keys.Attention.VALUE_LENGTH, head_dim_k))
        n_layers = int(need(Keys.LLM.BLOCK_COUNT))
        window = int(get(Keys.Attention.SLIDING_WINDOW, 0))
        rope_scale = _linear_rope_scale(get, source)
        vocab = meta(Keys.LLM.VOCAB_SIZE.format(arch=arch))
        if vocab is None:
            tokens = meta(Keys.Tokenizer.LIST)
            vocab = len(tokens) if tokens is not None else 0
        config = cls(
            arch=arch,
            name=str(meta(Keys.General.NAME) or arch),
            n_layers=n_layers,
            dim=dim,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim_k=head_dim_k,
            head_dim_v=head_dim_v,
            ffn_dim=int(_first(need(Keys.LLM.FEED_FORWARD_LENGTH))),
            n_vocab=int(vocab),
            context_length=int(get(Keys.LLM.CONTEXT_LENGTH, 2048)),
            norm_eps=float(need(Keys.Attention.LAYERNORM_RMS_EPS)),
            rope_base=float(get(Keys.Rope.FREQ_BASE, 10_000.0)),
            rope_base_swa=float(get(Keys.Rope.FREQ_BASE_SWA, spec.default_rope_base_swa)),
            rope_dim=int(get(Keys.Rope.DIMENSION_COUNT, head_dim_k)),
            rope_scale=rope_scale,
            sliding_window=window if spec.swa_period else 0,
            swa_layers=_swa_layers(n_layers, spec.swa_period if window else 0),
            attn_scale=1.0 / math.sqrt(head_dim_k),
            tied_embeddings=not has_output,
            spec=spec,
        )
        config.validate(source)
        return config

    def validate(self, source: str) -> None:
        """Reject hyper-parameters no forward pass could use, naming the value at fault."""
        checks = {
            "block_count": self.n_layers > 0,
            "embedding_length": self.dim > 0,
            "head_count": self.n_heads > 0,
            "head_count_kv": 0 < self.n_kv_heads <= self.n_heads and self.n_heads % self.n_kv_heads == 0,
            "key_length": self.head_dim_k > 0 and self.rope_dim <= self.head_dim_k,
            "feed_forward_length": self.ffn_dim > 0,
            "vocab_size": self.n_vocab > 0,
        }
        for key, ok in checks.items():
            if not ok:
                raise ModelFormatError(f"{source}: implausible hyper-parameter {self.arch}.{key} in {self}")


def _first(value: Any) -> Any:
    """Some models store per-layer arrays (e.g. head_count); we need one value for all layers."""
    if isinstance(value, list | tuple):
        if len(set(value)) != 1:
            raise ModelFormatError(f"per-layer values {value[:8]}... differ; not supported")
        return value[0]
    return value


def _swa_layers(n_layers: int, period: int) -> tuple[bool, ...]:
    # llama.cpp's set_swa_pattern(period): layer i is global when (i + 1) % period == 0.
    if period <= 0:
        return (False,) * n_layers
    return tuple((i + 1) % period != 0 for i in range(n_layers))


def _linear_rope_scale(get: Callable[[str, Any], Any], source: str) -> float:
    kind = get(Keys.Rope.SCALING_TYPE, "none")
    factor = float(get(Keys.Rope.SCALING_FACTOR, 1.0) or 1.0)
    if kind in ("none", None) or factor == 1.0:
        return 1.0
    if kind != "linear":
        raise ModelFormatError(f"{source}: rope scaling type {kind!r} is not supported (only linear)")
    return factor
