"""The transformer: embed -> blocks -> final norm -> head, with a float16 KV cache per block.

The block is written once (`PyBlock.forward`); llama and gemma3 differ only through the
per-block `cfg` (rope layout and base, window, activation) and which optional norms exist in
`weights`. `block_cfg`/`block_weights` build exactly the dicts that the C++ `_core.Block` takes,
so a CPU block is either `_core.Block(cfg, weights, n_ctx)` or `PyBlock(cfg, weights, n_ctx)`,
and `make_block` picks one. PyBlock runs its ops through a backend object (backends/cpu.py) so
that a device backend providing the same ops runs the same block.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .backends.cpu import CpuBackend, Matrix, RopeSpec
from .config import ModelConfig
from .errors import ContextFullError
from .gguf_file import ModelFile, Tensor

#: Quantized matrices of a block, by their GGUF names without `blk.{i}.` and `.weight`.
BLOCK_MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
#: Norm vectors of a block; the last four exist only in some architectures (gemma3).
BLOCK_NORMS = (
    "attn_norm", "ffn_norm", "attn_q_norm", "attn_k_norm", "post_attention_norm", "post_ffw_norm",
)  # fmt: skip
#: Prompt tokens are evaluated in chunks of at most this many rows (llama.cpp's n_ubatch).
UBATCH = 512


# --- the _core.Block contract -------------------------------------------------------------
def block_cfg(config: ModelConfig, layer: int) -> dict[str, Any]:
    """Hyper-parameters of block `layer` as `_core.Block` takes them (plain Python scalars)."""
    swa = config.swa_layers[layer]
    return {
        "dim": config.dim,
        "n_heads": config.n_heads,
        "n_kv_heads": config.n_kv_heads,
        "head_dim_k": config.head_dim_k,
        "head_dim_v": config.head_dim_v,
        "ffn_dim": config.ffn_dim,
        "norm_eps": float(config.norm_eps),
        # gemma3 local layers: their own rope base and no rope scaling (llama.cpp's freq_scale_swa)
        "rope_base": float(config.rope_base_swa if swa else config.rope_base),
        "rope_dim": config.rope_dim,
        "rope_scale": 1.0 if swa else float(config.rope_scale),
        "rope_neox": config.spec.rope_type == "neox",
        "sliding_window": config.sliding_window if swa else 0,
        "activation": config.spec.activation,
        # Q * q_scale after rope, scores * attn_scale: where the architecture applies the scale
        "q_scale": float(config.attn_scale) if config.spec.scale_q else 1.0,
        "attn_scale": 1.0 if config.spec.scale_q else float(config.attn_scale),
    }


def block_weights(model_file: ModelFile, layer: int) -> dict[str, Any]:
    """Weights of block `layer` as `_core.Block` takes them, all views of the memory map.

    Matrices: short name -> (raw uint8 (rows, row_bytes), qtype int, rows, cols).
    Norms: short name -> float32 (n,); optional norms are present only when the file has them.
    """
    tensors = model_file.block_tensors(layer)
    out: dict[str, Any] = {}
    for name in BLOCK_MATRICES:
        t = tensors[f"blk.{layer}.{name}.weight"]
        out[name] = _matrix(t)
    for name in BLOCK_NORMS:
        t = tensors.get(f"blk.{layer}.{name}.weight")
        if t is not None:
            out[name] = t.as_f32()
    return out


def _matrix(t: Tensor) -> Matrix:
    rows, cols = t.shape if len(t.shape) == 2 else (1, t.shape[0])
    return Matrix(t.raw, int(t.qtype), rows, cols)


# --- the block, written once --------------------------------------------------------------
class PyBlock:
    """One transformer block on a backend; same constructor, forward and caches as `_core.Block`.

    forward(x (n, dim) float32, pos0) updates x in place:
        h   = x + post_attention_norm?(attn(attn_norm(x)))
        out = h + post_ffw_norm?(ffn(ffn_norm(h)))
    """

    def __init__(
        self, cfg: dict[str, Any], weights: dict[str, Any], n_ctx: int, backend: Any = None
    ) -> None:
        self.cfg, self.n_ctx = cfg, n_ctx
        self.backend = backend if backend is not None else CpuBackend()
        be = self.backend
        self.w = {
            k: be.load_matrix(Matrix(*v)) if k in BLOCK_MATRICES else be.load_vector(v)
            for k, v in weights.items()
        }
        kv_heads = cfg["n_kv_heads"]
        self.k_cache = be.kv_cache(n_ctx, kv_heads * cfg["head_dim_k"])  # (n_ctx, kv_dim_k) f16
        self.v_cache = be.kv_cache(n_ctx, kv_heads * cfg["head_dim_v"])  # (n_ctx, kv_dim_v) f16
        self.rope = RopeSpec(
            cfg["rope_base"], cfg["rope_dim"], cfg["rope_scale"], cfg["rope_neox"], n_ctx
        )

    def forward(self, x: Any, pos0: int, n_threads: int | None = None) -> None:
        be, w, eps = self.backend, self.w, self.cfg["norm_eps"]
        if pos0 + x.shape[0] > self.n_ctx:
            raise ContextFullError(
                f"positions {pos0}..{pos0 + x.shape[0] - 1} exceed n_ctx={self.n_ctx}"
            )
        attn = self._attention(be.rms_norm(x, w["attn_norm"], eps), pos0)
        if "post_attention_norm" in w:
            attn = be.rms_norm(attn, w["post_attention_norm"], eps)
        be.add(x, attn)
        h = be.rms_norm(x, w["ffn_norm"], eps)
        act = be.glu(be.matmul(w["ffn_gate"], h), be.matmul(w["ffn_up"], h), self.cfg["activation"])
        ffn = be.matmul(w["ffn_down"], act)  # (n, ffn_dim) -> (n, dim)
        if "post_ffw_norm" in w:
            ffn = be.rms_norm(ffn, w["post_ffw_norm"], eps)
        be.add(x, ffn)

    def _attention(self, h: Any, pos0: int) -> Any:
        """h (n, dim) -> attention output (n, dim); writes this chunk's K and V to the cache."""
        be, w, c = self.backend, self.w, self.cfg
        n, dk = h.shape[0], c["head_dim_k"]
        q = be.matmul(w["attn_q"], h).reshape(n, c["n_heads"], dk)
        k = be.matmul(w["attn_k"], h).reshape(n, c["n_kv_heads"], dk)
        v = be.matmul(w["attn_v"], h)  # (n, kv_dim_v)
        if "attn_q_norm" in w:  # gemma3: RMSNorm over each head's dk values
            q = be.rms_norm(q.reshape(-1, dk), w["attn_q_norm"], c["norm_eps"]).reshape(q.shape)
            k = be.rms_norm(k.reshape(-1, dk), w["attn_k_norm"], c["norm_eps"]).reshape(k.shape)
        be.rope(q, pos0, self.rope)
        be.rope(k, pos0, self.rope)
        if c["q_scale"] != 1.0:
            q = q * np.float32(c["q_scale"])
        be.store_kv(self.k_cache, pos0, k.reshape(n, -1))
        be.store_kv(self.v_cache, pos0, v)
        o = be.attention(q, self.k_cache, self.v_cache, pos0, c["sliding_window"], c["attn_scale"])
        return be.matmul(w["attn_output"], o)


def core_block_class() -> Any:
    """`_core.Block` when the C++ core provides it (and HYBRIDLLM_BLOCK != "python"), else None."""
    if os.environ.get("HYBRIDLLM_BLOCK", "").lower() == "python":
        return None
    from ._native import core

    return getattr(core, "Block", None)


def make_block(
    cfg: dict[str, Any], weights: dict[str, Any], n_ctx: int, backend: Any = None
) -> Any:
    """A block for `backend` (default CPU): the C++ block on the CPU when built, else PyBlock."""
    core_block = core_block_class()
    if core_block is not None and (backend is None or backend.name == "cpu"):
        return core_block(cfg, weights, n_ctx)
    return PyBlock(cfg, weights, n_ctx, backend)


# --- the model ----------------------------------------------------------------------------
class Model:
    """Embedding, blocks and head of one GGUF model, with KV caches for n_ctx positions.

    The caller owns positions: forward(tokens, pos0) evaluates tokens at pos0.., overwriting any
    cache rows there; attention sees cache rows 0..pos0+n-1, so rolling back is just a smaller pos0.
    """

    def __init__(
        self,
        model_file: ModelFile,
        n_ctx: int,
        n_threads: int | None = None,
        backends: Sequence[Any] | None = None,
        head_backend: Any = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        """backends: one per block (default all CPU); head_backend runs the final norm and the
        output head (default CPU); progress(done, total) is called as each block loads."""
        cfg = model_file.config
        self.file, self.config, self.n_ctx, self.n_threads = model_file, cfg, n_ctx, n_threads
        cpu = CpuBackend(n_threads)
        self.backends = list(backends) if backends is not None else [cpu] * cfg.n_layers
        self.blocks = []
        for i in range(cfg.n_layers):
            weights = block_weights(model_file, i)
            self.blocks.append(make_block(block_cfg(cfg, i), weights, n_ctx, self.backends[i]))
            if progress is not None:
                progress(i + 1, cfg.n_layers)
        self.cpu = cpu
        self.head_backend = head_backend or cpu
        self.embedding = model_file.tensor("token_embd.weight")  # (n_vocab, dim), stays quantized
        norm = model_file.tensor("output_norm.weight").as_f32()  # (dim,)
        self.output_norm = self.head_backend.load_vector(norm)
        self.head = self.head_backend.load_matrix(_matrix(model_file.output_tensor))  # (n_vocab, dim)

    @property
    def n_vocab(self) -> int:
        return self.file.output_tensor.shape[0]

    def embed(self, tokens: Sequence[int]) -> np.ndarray:
        """Token ids -> (n, dim) float32 rows of token_embd, times the architecture's scale."""
        from . import kernels

        ids = np.asarray(tokens, dtype=np.int64)
        bad = ids[(ids < 0) | (ids >= self.embedding.shape[0])]
        if bad.size:
            raise ValueError(
                f"token id {int(bad[0])} is outside the vocabulary (0..{self.embedding.shape[0] - 1})"
            )
        t = self.embedding
        x = np.ascontiguousarray(kernels.get_rows(t.raw, t.qtype, t.shape, ids), dtype=np.float32)
        if self.config.embed_scale != 1.0:
            x *= np.float32(self.config.embed_scale)
        return x

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Final norm and head: hidden rows (m, dim) -> logits (m, n_vocab) float32 on the host."""
        be = self.head_backend
        h = be.rms_norm(be.from_host(x), self.output_norm, self.config.norm_eps)
        return be.to_host(be.matmul(self.head, h))

    def forward(self, tokens: Sequence[int], pos0: int = 0, first_logit: int = -1) -> np.ndarray:
        """Evaluate tokens at positions pos0.. and return logits of rows first_logit.. (n_out, n_vocab).

        first_logit=-1 gives the last row only (generation), 0 every row (`Runner.logits`).
        Prompts are evaluated in chunks of UBATCH rows, the head only on the rows asked for.
        """
        n = len(tokens)
        if n == 0:
            raise ValueError("no tokens to evaluate")
        if pos0 < 0 or pos0 + n > self.n_ctx:
            raise ContextFullError(
                f"{n} tokens at position {pos0} do not fit in the context of {self.n_ctx} tokens"
            )
        first = first_logit % n if first_logit < 0 else first_logit
        out = []
        for c0 in range(0, n, UBATCH):
            x = self.hidden(tokens[c0 : c0 + UBATCH], pos0 + c0)
            lo = max(first - c0, 0)
            if lo < x.shape[0]:
                out.append(self.logits(x[lo:]))
        return np.concatenate(out) if len(out) > 1 else out[0]

    def hidden(self, tokens: Sequence[int], pos0: int) -> np.ndarray:
        """Embed a chunk and run it through every block -> (n, dim) float32 on the host."""
        x = self.embed(tokens)
        backend = None
        pairs = zip(self.blocks, self.backends, strict=True)
        for _, run in itertools.groupby(pairs, key=lambda pair: id(pair[1])):  # blocks of one backend
            blocks, backends = zip(*run, strict=True)
            be = backends[0]
            x = be.from_host(backend.to_host(x) if backend is not None else x)  # crossing devices
            backend = be
            forward_blocks = getattr(be, "forward_blocks", None)  # a device's own way (CUDA graphs)
            if forward_blocks is not None:
                forward_blocks(blocks, x, pos0, self.n_threads or 0)
                continue
            for block in blocks:
                block.forward(x, pos0, self.n_threads or 0)
        return backend.to_host(x) if backend is not None else x
