"""ModelConfig: everything the forward pass needs, read once from GGUF metadata.

Architectures differ only by data: `ARCHITECTURES` maps a GGUF `general.architecture` to an
`ArchSpec` (rope style, activation, which norms exist and where, fused matrices, the sliding-window
pattern, soft-caps, scales, rope frequency factors), each fact as llama.cpp's
src/models/<arch>.cpp has it. `RopeScaling` is llama.cpp's reading of `rope.scaling.*`.
Adding an architecture that needs no new operation is a row here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from gguf import Keys

from .errors import ModelFormatError
from .libm import logf

#: Tensors every block has, by their GGUF names without the `blk.{i}.` prefix and `.weight`.
BLOCK_TENSORS = (
    "attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
    "ffn_norm", "ffn_gate", "ffn_up", "ffn_down",
)  # fmt: skip
#: Optional Q/K/V biases llama.cpp reads for every architecture here (qwen2 has them).
QKV_BIASES = ("attn_q.bias", "attn_k.bias", "attn_v.bias")
#: Rope scaling types llama.cpp knows (`{arch}.rope.scaling.type`); absent means linear.
ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")
_OLD_ROPE_SCALE_KEY = "{arch}.rope.scale_linear"  # llama.cpp still reads it; gguf-py no longer names it


@dataclass(frozen=True)
class ArchSpec:
    """What sets one architecture apart; the block itself is written once."""

    rope_type: str  # "norm": rotate adjacent pairs (llama); "neox": rotate halves (gemma)
    activation: str  # gate activation of the FFN: "silu" or "gelu_tanh"
    extra_block_tensors: tuple[str, ...] = ()  # e.g. QK norms, post-attention/FFN norms
    pre_norms: bool = True  # attn_norm and ffn_norm before the branches (olmo2 has none)
    fused: bool = False  # phi3: one attn_qkv matrix; ffn_up holds the gate rows, then the up rows
    qk_norm_full: bool = False  # olmo2: Q/K RMSNorm over the whole projection, not per head
    embed_scale_sqrt_dim: bool = False  # gemma multiplies embeddings by sqrt(dim)
    swa_period: int = 0  # every `period`-th layer is global, the others use a sliding window
    default_window: int = 0  # window when the file has no attention.sliding_window (gemma2)
    swa_refused: bool = False  # olmo3's sliding window (rope unscaled there) is not built here
    default_rope_base_swa: float | None = 10_000.0  # None: the global base (gemma2)
    swa_rope_scaled: bool = False  # gemma2: local layers keep the linear rope scaling
    # gemma3 scales Q by attn_scale after rope (before it is rounded to f16 for Q.K); llama scales
    # the scores. Equal in exact arithmetic, not in f16 where Q's small values are subnormal.
    scale_q: bool = False
    big_model_layers: int = 0  # gemma's 27B (this many layers): Q scale 1/sqrt(dim / n_heads)
    attn_softcap: float = 0.0  # default attention-logit soft-cap (gemma2: 50), 0: none
    final_softcap: float = 0.0  # default final-logit soft-cap (gemma2: 30), 0: none
    granite_scales: bool = False  # embedding_scale, residual_scale, logit_scale, attention.scale
    # rope frequency factors read: "llama" (rope_freqs.weight, or LongRoPE's pair when the
    # scaling type is longrope), "longrope" (phi3: rope_factors_long/_short), "": none
    rope_factors: str = ""

    @property
    def qk_norm(self) -> bool:
        return "attn_q_norm" in self.extra_block_tensors

    @property
    def post_norms(self) -> bool:
        return "post_attention_norm" in self.extra_block_tensors


_GEMMA_NORMS = ("attn_q_norm", "attn_k_norm", "post_attention_norm", "post_ffw_norm")
ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec(rope_type="norm", activation="silu", rope_factors="llama"),
    "gemma3": ArchSpec(
        rope_type="neox",
        activation="gelu_tanh",
        extra_block_tensors=_GEMMA_NORMS,
        embed_scale_sqrt_dim=True,
        swa_period=6,
        scale_q=True,
        big_model_layers=62,
    ),
    "gemma2": ArchSpec(
        rope_type="neox",
        activation="gelu_tanh",
        extra_block_tensors=("post_attention_norm", "post_ffw_norm"),
        embed_scale_sqrt_dim=True,
        swa_period=2,
        default_window=4096,
        default_rope_base_swa=None,
        swa_rope_scaled=True,
        scale_q=True,
        big_model_layers=46,
        attn_softcap=50.0,
        final_softcap=30.0,
    ),
    "qwen2": ArchSpec(rope_type="neox", activation="silu"),
    "qwen3": ArchSpec(
        rope_type="neox", activation="silu", extra_block_tensors=("attn_q_norm", "attn_k_norm")
    ),
    "olmo2": ArchSpec(
        rope_type="neox",
        activation="silu",
        extra_block_tensors=_GEMMA_NORMS,
        pre_norms=False,
        qk_norm_full=True,
        swa_refused=True,
    ),
    "granite": ArchSpec(
        rope_type="norm", activation="silu", granite_scales=True, rope_factors="llama"
    ),
    "phi3": ArchSpec(
        rope_type="neox",
        activation="silu",
        fused=True,
        scale_q=True,
        rope_factors="longrope",
    ),
}


@dataclass(frozen=True)
class RopeScaling:
    """llama.cpp's rope scaling of a file (`{arch}.rope.scaling.*`), as ggml_rope_ext takes it.

    freq_scale multiplies the angles (1/factor); YaRN (ext_factor 1) blends the unscaled angles
    back in for the dims below corr_dims and scales cos/sin by mscale; LongRoPE (phi3) divides
    the angles by per-pair factors (`rope_factors_long` past the original context, else
    `_short`), as `rope_freqs.weight` does for Llama 3.1+.
    """

    kind: str = "none"
    freq_scale: float = 1.0
    ext_factor: float = 0.0
    attn_factor: float = 1.0  # llama.cpp's cparams.yarn_attn_factor (ggml's mscale argument)
    n_ctx_orig: int = 0
    corr_dims: tuple[float, float] = (0.0, 0.0)


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
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    embedding_scale: float = 1.0  # granite's embedding_scale (gemma: sqrt(dim), see embed_scale)
    residual_scale: float = 1.0  # granite: branch outputs times this before the residual add
    logit_scale: float = 1.0  # granite: logits divided by this
    attn_softcap: float = 0.0  # gemma2: tanh(s / cap) * cap on attention logits (0: none)
    final_softcap: float = 0.0  # gemma2: the same on the output logits (0: none)

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
        """What the token embeddings are multiplied by (sqrtf(dim) for gemma, as a float32)."""
        if self.spec.embed_scale_sqrt_dim:
            return float(np.sqrt(np.float32(self.dim)))
        return self.embedding_scale

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """Bytes of K and V cache one token takes in one block."""
        return (self.kv_dim_k + self.kv_dim_v) * dtype_bytes

    def block_tensor_names(self, layer: int) -> list[str]:
        """GGUF names of the tensors block `layer` must have."""
        suffixes = [s for s in BLOCK_TENSORS if self.spec.pre_norms or not s.endswith("_norm")]
        if self.spec.fused:  # attn_qkv instead of attn_q/k/v, ffn_up holds the gate too
            suffixes = [s for s in suffixes if s not in ("attn_q", "attn_k", "attn_v", "ffn_gate")]
            suffixes.insert(1, "attn_qkv")
        return [f"blk.{layer}.{s}.weight" for s in (*suffixes, *self.spec.extra_block_tensors)]

    def rope_factor_names(self, n_ctx: int | None) -> list[str]:
        """The frequency-factor tensors llama.cpp would use at context n_ctx, best first: LongRoPE's
        long factors past the original context (llama_model::get_rope_factors), else short."""
        kind = self.spec.rope_factors
        if kind == "llama" and self.rope_scaling.kind != "longrope":
            return ["rope_freqs.weight"]
        if kind:
            # llama.cpp compares its context padded to a multiple of 256 (llama_context)
            longer = n_ctx is not None and -(-n_ctx // 256) * 256 > self.rope_scaling.n_ctx_orig
            return ["rope_factors_long.weight" if longer else "rope_factors_short.weight"]
        return []

    def known_rope_factor_names(self) -> set[str]:
        """Every frequency-factor tensor this file may carry (read at some n_ctx)."""
        return {*self.rope_factor_names(None), *self.rope_factor_names(1 << 62)}

    def optional_block_tensor_names(self, layer: int) -> list[str]:
        """GGUF names of the tensors block `layer` may have (read when present)."""
        return [] if self.spec.fused else [f"blk.{layer}.{b}" for b in QKV_BIASES]

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
        context_length = int(get(Keys.LLM.CONTEXT_LENGTH, 2048))
        rope_base = float(get(Keys.Rope.FREQ_BASE, 10_000.0))
        rope_dim = int(get(Keys.Rope.DIMENSION_COUNT, head_dim_k))
        window, swa_layers = _sliding_window(spec, get, n_layers, source)
        vocab = meta(Keys.LLM.VOCAB_SIZE.format(arch=arch))
        if vocab is None:
            tokens = meta(Keys.Tokenizer.LIST)
            vocab = len(tokens) if tokens is not None else 0
        granite = spec.granite_scales
        rope_scaling = _rope_scaling(get, source, context_length, rope_dim, rope_base)
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
            context_length=context_length,
            norm_eps=float(need(Keys.Attention.LAYERNORM_RMS_EPS)),
            rope_base=rope_base,
            rope_base_swa=float(
                get(Keys.Rope.FREQ_BASE_SWA, spec.default_rope_base_swa or rope_base)
            ),
            rope_dim=rope_dim,
            rope_scale=1.0 / rope_scaling.freq_scale,
            sliding_window=window,
            swa_layers=swa_layers,
            attn_scale=_attention_scale(spec, get, n_layers, dim, n_heads, head_dim_k),
            tied_embeddings=not has_output,
            spec=spec,
            rope_scaling=rope_scaling,
            embedding_scale=float(get(Keys.LLM.EMBEDDING_SCALE, 0.0) or 1.0) if granite else 1.0,
            residual_scale=float(get(Keys.LLM.RESIDUAL_SCALE, 0.0) or 1.0) if granite else 1.0,
            logit_scale=float(need(Keys.LLM.LOGIT_SCALE)) if granite else 1.0,
            attn_softcap=float(get(Keys.LLM.ATTN_LOGIT_SOFTCAPPING, spec.attn_softcap)),
            final_softcap=float(get(Keys.LLM.FINAL_LOGIT_SOFTCAPPING, spec.final_softcap)),
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


def _sliding_window(
    spec: ArchSpec, get: Callable[[str, Any], Any], n_layers: int, source: str
) -> tuple[int, tuple[bool, ...]]:
    """(window, per-layer flags) as llama.cpp's load_swa_pattern: a per-layer array or a period
    in `attention.sliding_window_pattern`, else the architecture's period. Architectures without
    a period ignore a window, as llama.cpp does (phi3 on purpose, llama/Mistral files)."""
    window = int(get(Keys.Attention.SLIDING_WINDOW, spec.default_window) or 0)
    if spec.swa_refused and window > 0:
        raise ModelFormatError(
            f"{source}: a sliding window (attention.sliding_window = {window}) is not supported "
            "for this architecture yet"
        )
    if not spec.swa_period or window <= 0:
        return 0, (False,) * n_layers
    pattern = get(Keys.Attention.SLIDING_WINDOW_PATTERN, spec.swa_period)
    if isinstance(pattern, list | tuple):
        if len(pattern) != n_layers:
            raise ModelFormatError(
                f"{source}: attention.sliding_window_pattern has {len(pattern)} entries "
                f"for {n_layers} layers"
            )
        return window, tuple(bool(p) for p in pattern)
    return window, _swa_layers(n_layers, int(pattern))


def _attention_scale(
    spec: ArchSpec,
    get: Callable[[str, Any], Any],
    n_layers: int,
    dim: int,
    n_heads: int,
    head_dim_k: int,
) -> float:
    """What Q.K is scaled by, as llama.cpp computes it (float32)."""
    if spec.granite_scales and get(Keys.Attention.SCALE, 0.0):
        return float(np.float32(get(Keys.Attention.SCALE, 0.0)))
    width = dim // n_heads if n_layers == spec.big_model_layers else head_dim_k
    return float(np.float32(1.0) / np.sqrt(np.float32(width)))


def _rope_scaling(
    get: Callable[[str, Any], Any], source: str, n_ctx_train: int, rope_dim: int, base: float
) -> RopeScaling:
    """llama.cpp's reading of `{arch}.rope.scaling.*` (llama-model.cpp, llama-context.cpp)."""
    kind = str(get(Keys.Rope.SCALING_TYPE, "linear"))
    if kind not in ROPE_SCALING_TYPES:
        raise ModelFormatError(
            f"{source}: rope scaling type {kind!r} is not supported "
            f"(known: {', '.join(ROPE_SCALING_TYPES)})"
        )
    factor = float(get(Keys.Rope.SCALING_FACTOR, 0.0) or get(_OLD_ROPE_SCALE_KEY, 0.0) or 0.0)
    f32 = np.float32
    freq_scale = f32(1.0) if kind == "none" or factor == 0.0 else f32(1.0) / f32(factor)
    n_ctx_orig = int(get(Keys.Rope.SCALING_ORIG_CTX_LEN, 0) or n_ctx_train)
    ext_factor = 1.0 if kind == "yarn" else 0.0
    attn_factor = f32(1.0)
    if ext_factor:
        # get_mscale(factor, 1) / (1 + 0.1 ln factor): llama.cpp cancels the factor that
        # ggml's rope_yarn applies again (both compiled as one FMA each)
        yarn_factor = f32(1.0) / freq_scale
        log = logf(yarn_factor)
        mscale = f32(1.0) if yarn_factor <= 1.0 else _fmaf(f32(0.1), log, f32(1.0))
        attn_factor = mscale * (f32(1.0) / _fmaf(f32(0.1), log, f32(1.0)))
    attn_factor = attn_factor * f32(get(Keys.Rope.SCALING_ATTN_FACTOR, 1.0))
    return RopeScaling(
        kind=kind,
        freq_scale=float(freq_scale),
        ext_factor=ext_factor,
        attn_factor=float(attn_factor),
        n_ctx_orig=n_ctx_orig,
        corr_dims=_yarn_corr_dims(rope_dim, n_ctx_orig, base, 32.0, 1.0),
    )


def _yarn_corr_dims(
    n_dims: int, n_ctx_orig: int, base: float, beta_fast: float, beta_slow: float
) -> tuple[float, float]:
    """ggml_rope_yarn_corr_dims: the dims between which YaRN ramps from extrapolation to
    interpolation (float32 arithmetic, libm logf)."""
    f32 = np.float32

    def corr_dim(n_rot: float) -> np.float32:
        ratio = f32(n_ctx_orig) / (f32(n_rot) * f32(2) * f32(math.pi))
        return f32(n_dims) * logf(ratio) / (f32(2) * logf(f32(base)))

    start = math.floor(corr_dim(beta_fast))
    end = math.ceil(corr_dim(beta_slow))
    return float(max(0, start)), float(min(n_dims - 1, end))


def _fmaf(a: Any, b: Any, c: Any) -> np.float32:
    """float32 a*b + c rounded once: the product of two floats is exact in a double, and the
    sum of these magnitudes (a few units) is too, so the one rounding is to float32."""
    return np.float32(float(a) * float(b) + float(c))
