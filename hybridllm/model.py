"""The transformer: embed -> blocks -> final norm -> head, with a float16 KV cache per block.

The block is written once (`PyBlock.forward`); the architectures of config.ARCHITECTURES differ
only through the per-block `cfg` (rope layout, base and scaling, window, activation, soft-cap,
residual scale, where the Q scale applies) and which optional vectors exist in `weights` (norms,
Q/K/V biases, rope frequency factors). `block_cfg`/`block_weights` build exactly the dicts that the C++ `_core.Block` takes,
so a CPU block is either `_core.Block(cfg, weights, n_ctx)` or `PyBlock(cfg, weights, n_ctx)`,
and `make_block` picks one. PyBlock runs its ops through a backend object (backends/cpu.py) so
that a device backend providing the same ops runs the same block.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import numba
import numpy as np

from .backends.cpu import CpuBackend, Matrix, RopeSpec
from .config import ModelConfig
from .errors import ContextFullError, ModelFormatError
from .gguf_file import ModelFile, Tensor

#: Quantized matrices of a block, by their GGUF names without `blk.{i}.` and `.weight`.
BLOCK_MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
#: Vectors of a block; all but the first two exist only in some architectures (norms: gemma,
#: qwen3, olmo2; biases: qwen2; rope_freqs: Llama 3.1+, LongRoPE's factors: phi3).
BLOCK_VECTORS = (
    "attn_norm", "ffn_norm", "attn_q_norm", "attn_k_norm", "post_attention_norm", "post_ffw_norm",
    "attn_q_bias", "attn_k_bias", "attn_v_bias", "rope_freqs",
)  # fmt: skip
#: Prompt tokens are evaluated in chunks of at most this many rows (llama.cpp's n_ubatch).
UBATCH = 512


# --- the _core.Block contract -------------------------------------------------------------
def block_cfg(config: ModelConfig, layer: int) -> dict[str, Any]:
    """Hyper-parameters of block `layer` as `_core.Block` takes them (plain Python scalars).

    The keys past the first fifteen appear only where the architecture uses them.
    """
    swa = config.swa_layers[layer]
    # gemma3's local layers: no rope scaling (llama.cpp's freq_scale_swa = 1); gemma2 keeps it
    scaled = not swa or config.spec.swa_rope_scaled
    cfg = {
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
        "rope_scale": float(config.rope_scale) if scaled else 1.0,
        "rope_neox": config.spec.rope_type == "neox",
        "sliding_window": config.sliding_window if swa else 0,
        "activation": config.spec.activation,
        # Q * q_scale after rope, scores * attn_scale: where the architecture applies the scale
        "q_scale": float(config.attn_scale) if config.spec.scale_q else 1.0,
        "attn_scale": 1.0 if config.spec.scale_q else float(config.attn_scale),
    }
    rs = config.rope_scaling
    extras = {
        "rope_ext_factor": (rs.ext_factor, 0.0),
        "rope_attn_factor": (rs.attn_factor, 1.0),
        "rope_corr_dims": (rs.corr_dims if rs.ext_factor else (0.0, 0.0), (0.0, 0.0)),
        "attn_softcap": (config.attn_softcap, 0.0),
        "residual_scale": (config.residual_scale, 1.0),
        "qk_norm_full": (config.spec.qk_norm_full, False),
    }
    cfg |= {k: v for k, (v, default) in extras.items() if v != default}
    return cfg


def block_weights(model_file: ModelFile, layer: int, n_ctx: int | None = None) -> dict[str, Any]:
    """Weights of block `layer` as `_core.Block` takes them, all views of the memory map.

    Matrices: short name -> (raw uint8 (rows, row_bytes), qtype int, rows, cols); phi3's fused
    attn_qkv and gate/up matrices give them as row ranges (views, no copies).
    Vectors: short name -> float32 (n,), present only when the file has them; `rope_freqs` is the
    model's frequency factors (Llama 3.1's, or LongRoPE's long ones when n_ctx exceeds the
    original context, else its short ones).
    """
    cfg = model_file.config
    tensors = model_file.block_tensors(layer)
    out: dict[str, Any] = {}
    if cfg.spec.fused:
        qkv, up = tensors[f"blk.{layer}.attn_qkv.weight"], tensors[f"blk.{layer}.ffn_up.weight"]
        out |= _fused_matrices(cfg, qkv, up, str(model_file.path))
    for name in BLOCK_MATRICES:
        if name not in out:
            out[name] = _matrix(tensors[f"blk.{layer}.{name}.weight"])
    for name in BLOCK_VECTORS:
        gguf_name = name.replace("_bias", ".bias") if name.endswith("_bias") else f"{name}.weight"
        t = tensors.get(f"blk.{layer}.{gguf_name}")
        if t is not None:
            out[name] = t.as_f32()
    factors = model_file.rope_factors(n_ctx)
    if factors is not None:
        out["rope_freqs"] = factors.as_f32()
    return out


def _fused_matrices(config: ModelConfig, qkv: Tensor, up: Tensor, source: str) -> dict[str, Matrix]:
    """phi3: attn_qkv (q_dim + 2 kv_dim rows) as attn_q/k/v, ffn_up (2 ffn rows) as gate, up.

    The rows of a GGUF matrix are independent, so row ranges of the raw bytes are the matrices
    llama.cpp's views of the fused product compute (ggml_swiglu: silu of the first half).
    """
    q, k = config.q_dim, config.kv_dim_k
    cols, ffn = qkv.shape[1], config.ffn_dim
    for t, rows in ((qkv, q + k + config.kv_dim_v), (up, 2 * ffn)):
        if t.shape != (rows, config.dim):
            raise ModelFormatError(
                f"{source}: tensor {t.name!r} has shape {t.shape}, expected ({rows}, {config.dim})"
            )
    ranges = {
        "attn_q": (qkv, 0, q), "attn_k": (qkv, q, q + k), "attn_v": (qkv, q + k, qkv.shape[0]),
        "ffn_gate": (up, 0, ffn), "ffn_up": (up, ffn, 2 * ffn),
    }  # fmt: skip
    return {
        name: Matrix(t.raw[a:b], int(t.qtype), b - a, cols if t is qkv else up.shape[1])
        for name, (t, a, b) in ranges.items()
    }


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
            if k != "rope_freqs"  # part of the rope table
        }
        kv_heads = cfg["n_kv_heads"]
        self.k_cache = be.kv_cache(n_ctx, kv_heads * cfg["head_dim_k"])  # (n_ctx, kv_dim_k) f16
        self.v_cache = be.kv_cache(n_ctx, kv_heads * cfg["head_dim_v"])  # (n_ctx, kv_dim_v) f16
        freqs = weights.get("rope_freqs")
        self.rope = RopeSpec(
            cfg["rope_base"], cfg["rope_dim"], cfg["rope_scale"], cfg["rope_neox"], n_ctx,
            ext_factor=float(cfg.get("rope_ext_factor", 0.0)),
            attn_factor=float(cfg.get("rope_attn_factor", 1.0)),
            corr_dims=tuple(cfg.get("rope_corr_dims", (0.0, 0.0))),
            freq_factors=None if freqs is None else tuple(float(f) for f in freqs),
        )

    def forward(self, x: Any, pos0: int, n_threads: int | None = None) -> None:
        if pos0 + x.shape[0] > self.n_ctx:
            raise ContextFullError(
                f"positions {pos0}..{pos0 + x.shape[0] - 1} exceed n_ctx={self.n_ctx}"
            )
        self._run(x, [(self, pos0, x.shape[0])], self.backend.matmul)

    def forward_batch(
        self, x: Any, segments: Sequence[tuple[PyBlock, int, int]], n_threads: int | None = None
    ) -> None:
        """The rows of several sequences, `_core.Block.forward_batch`'s contract: segments
        (block, pos0, n) cover x's rows in order, each block this layer's block of one sequence.

        Consecutive one-row segments (decode steps) run as one pass with the backend's
        `matmul_rows_alone`: each weight is read once for all of them, each row computed as if
        alone. Other segments (prompt chunks) run as their own forward on their rows, a view of x.
        """
        if sum(n for _, _, n in segments) != x.shape[0]:
            raise ValueError(f"the segments cover {sum(n for _, _, n in segments)} rows, x has {x.shape[0]}")
        row, i = 0, 0
        while i < len(segments):
            j = i
            while j < len(segments) and segments[j][2] == 1:
                j += 1
            if j - i >= 2:
                steps = segments[i:j]
                for block, pos0, _ in steps:
                    if pos0 + 1 > block.n_ctx:
                        raise ContextFullError(f"position {pos0} exceeds n_ctx={block.n_ctx}")
                self._run(x[row : row + len(steps)], steps, self.backend.matmul_rows_alone)
                row, i = row + len(steps), j
            else:
                block, pos0, n = segments[i]
                block.forward(x[row : row + n], pos0, n_threads)
                row, i = row + n, i + 1

    def _run(self, x: Any, seqs: Sequence[tuple[PyBlock, int, int]], matmul: Callable) -> None:
        """The block on x's rows, which belong to seqs (block whose caches hold the sequence,
        pos0, rows) in order, with this block's weights; matmul(W, x) is the backend's."""
        be, w = self.backend, self.w
        attn = self._attention(self._norm(x, "attn_norm"), seqs, matmul)
        be.add(x, self._branch_out(attn, "post_attention_norm"))
        h = self._norm(x, "ffn_norm")
        act = be.glu(matmul(w["ffn_gate"], h), matmul(w["ffn_up"], h), self.cfg["activation"])
        ffn = matmul(w["ffn_down"], act)  # (n, ffn_dim) -> (n, dim)
        be.add(x, self._branch_out(ffn, "post_ffw_norm"))

    def _norm(self, x: Any, name: str) -> Any:
        """RMSNorm by weight `name`, or x itself where the architecture has none (olmo2)."""
        w = self.w.get(name)
        return x if w is None else self.backend.rms_norm(x, w, self.cfg["norm_eps"])

    def _branch_out(self, y: Any, post_norm: str) -> Any:
        """What a branch adds to the residual: post_norm?(y) (gemma) times residual_scale (granite)."""
        y = self._norm(y, post_norm)
        scale = self.cfg.get("residual_scale", 1.0)
        return y if scale == 1.0 else y * np.float32(scale)

    def _attention(self, h: Any, seqs: Sequence[tuple[PyBlock, int, int]], matmul: Callable) -> Any:
        """h (n, dim) -> attention output (n, dim); writes each sequence's K and V rows to the
        caches of its block (seqs as in _run; one sequence in a plain forward)."""
        be, w, c = self.backend, self.w, self.cfg
        n, dk = h.shape[0], c["head_dim_k"]
        q = self._projection("attn_q", h, matmul).reshape(n, c["n_heads"], dk)
        k = self._projection("attn_k", h, matmul).reshape(n, c["n_kv_heads"], dk)
        v = self._projection("attn_v", h, matmul)  # (n, kv_dim_v)
        if "attn_q_norm" in w:  # gemma3, qwen3: RMSNorm over each head's dk values; olmo2: all
            width = q.shape[1] * dk if c.get("qk_norm_full") else dk
            q = be.rms_norm(q.reshape(-1, width), w["attn_q_norm"], c["norm_eps"]).reshape(q.shape)
            width = k.shape[1] * dk if c.get("qk_norm_full") else dk
            k = be.rms_norm(k.reshape(-1, width), w["attn_k_norm"], c["norm_eps"]).reshape(k.shape)
        row = 0
        for _, pos0, rows in seqs:  # each sequence's rows at its own positions
            be.rope(q[row : row + rows], pos0, self.rope)
            be.rope(k[row : row + rows], pos0, self.rope)
            row += rows
        if c["q_scale"] != 1.0:
            q = q * np.float32(c["q_scale"])
        cap = c.get("attn_softcap", 0.0)
        outs, row = [], 0
        for block, pos0, rows in seqs:
            rng = slice(row, row + rows)
            be.store_kv(block.k_cache, pos0, k[rng].reshape(rows, -1))
            be.store_kv(block.v_cache, pos0, v[rng])
            args = (q[rng], block.k_cache, block.v_cache, pos0, c["sliding_window"], c["attn_scale"])
            outs.append(be.attention(*args, softcap=cap) if cap else be.attention(*args))
            row += rows
        o = outs[0] if len(outs) == 1 else be.concat_rows(outs)
        return matmul(w["attn_output"], o)

    def _projection(self, name: str, h: Any, matmul: Callable) -> Any:
        """h @ W.T (+ bias, qwen2: ggml_add after the matmul)."""
        y = matmul(self.w[name], h)
        bias = self.w.get(f"{name}_bias")
        if bias is not None:
            self.backend.add(y, bias)
        return y


def gpu_unverified(model_file: ModelFile, n_ctx: int | None = None) -> str | None:
    """Why this model's blocks stay on the CPU, or None. The CUDA backend runs every block op of
    every supported architecture (rope tables with scaling and frequency factors, biases, soft-caps,
    scales, full-width Q/K norms: tests/test_cuda_architectures.py); only its attention kernels'
    head shapes limit it: values of at most 256 per head, keys of an even length."""
    cfg = model_file.config
    limits = []
    if cfg.head_dim_v > 256:
        limits.append(f"attention heads with {cfg.head_dim_v} values (at most 256)")
    if cfg.head_dim_k % 2:
        limits.append(f"attention keys of odd length {cfg.head_dim_k}")
    if not limits:
        return None
    return f"the GPU backend does not run {', '.join(limits)} yet ({model_file.path.name})"


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
            weights = block_weights(model_file, i, n_ctx)
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

    def logits(self, x: np.ndarray, rows_alone: bool = False) -> np.ndarray:
        """Final norm and head: hidden rows (m, dim) -> logits (m, n_vocab) float32 on the host.

        rows_alone: the rows belong to different sequences; each row's logits are then exactly
        those of that row alone (one pass over the head with the backend's matmul_rows_alone).
        """
        be, cfg = self.head_backend, self.config
        h = be.rms_norm(be.from_host(x), self.output_norm, cfg.norm_eps)
        if not rows_alone or x.shape[0] == 1:
            out = be.matmul(self.head, h)
        else:
            out = be.matmul_rows_alone(self.head, h)
        return _scale_logits(be.to_host(out), cfg.logit_scale, cfg.final_softcap)

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

    def forward_batch(
        self,
        segments: Sequence[tuple[Model, Sequence[int], int]],
        logit_rows: Sequence[int] | None = None,
    ) -> list[np.ndarray]:
        """Evaluate the tokens of several sequences in one pass -> the logits after each one's
        last token, (n_vocab,) float32 each; with logit_rows (indices into all the segments'
        rows in order: llama_batch's logits flags) the logits of those rows instead, in order.

        segments: (model, tokens, pos0) per sequence, each model this one or a clone of it with
        its own KV cache (engine.model_with_own_cache), each at most once. Every weight is read
        once for all the rows, and each sequence's logits equal model.forward(tokens, pos0)[-1]
        for that sequence alone, bit for bit (the C++ block cuts its work so that no row's
        arithmetic depends on the others; PyBlock computes decode rows with the backend's
        matmul_rows_alone and prompt chunks one after another).
        """
        if not segments:
            raise ValueError("no sequences to evaluate")
        for model, tokens, pos0 in segments:
            if model.file is not self.file or len(model.blocks) != len(self.blocks):
                raise ValueError("a sequence's model is not a clone of this model")
            if not tokens:
                raise ValueError("a sequence has no tokens to evaluate")
            if pos0 < 0 or pos0 + len(tokens) > model.n_ctx:
                raise ContextFullError(
                    f"{len(tokens)} tokens at position {pos0} do not fit in the context of "
                    f"{model.n_ctx} tokens"
                )
        n_rows = sum(len(tokens) for _, tokens, _ in segments)
        bad = [r for r in logit_rows or () if not 0 <= r < n_rows]
        if bad:
            raise ValueError(f"logit row {bad[0]} is not one of the batch's rows (0..{n_rows - 1})")
        x = self.embed([t for _, tokens, _ in segments for t in tokens])
        backend = None
        for layer, (block, be) in enumerate(zip(self.blocks, self.backends, strict=True)):
            if be is not backend:  # crossing devices
                x = be.from_host(backend.to_host(x) if backend is not None else x)
                backend = be
            rows = [(m.blocks[layer], pos0, len(tokens)) for m, tokens, pos0 in segments]
            block.forward_batch(x, rows, self.n_threads or 0)
        x = backend.to_host(x) if backend is not None else x
        rows = np.cumsum([len(tokens) for _, tokens, _ in segments]) - 1
        if logit_rows is not None:
            rows = np.asarray(list(logit_rows), dtype=np.int64)
            if rows.size == 0:
                return []
        return list(self.logits(np.ascontiguousarray(x[rows]), rows_alone=True))

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


def _scale_logits(logits: np.ndarray, logit_scale: float, softcap: float) -> np.ndarray:
    """granite: logits * (1/logit_scale); gemma2: tanh(logits * (1/cap)) * cap (llama.cpp's
    ggml_scale / ggml_tanh sequence, float32, libm tanhf through Numba)."""
    if logit_scale != 1.0:
        logits *= np.float32(1.0) / np.float32(logit_scale)
    if softcap:
        _softcap(logits, np.float32(np.float32(1.0) / np.float32(softcap)), np.float32(softcap))
    return logits


@numba.njit(cache=True)
def _softcap(x, inv_cap, cap):  # pragma: no cover - compiled
    flat = x.reshape(-1)
    for i in range(flat.shape[0]):
        flat[i] = math.tanh(flat[i] * inv_cap) * cap
