"""The placement planner: which block runs on which device, and where every byte goes.

`plan(...)` is a pure function of the model's sizes and the memory it is told about: no GPU
calls, so any pretend memory size can be tested. The GPU blocks are one contiguous run at the
end of the stack (as llama.cpp's -ngl offloads the last layers), so the hidden state crosses
the bus twice per step: into the GPU run and back out to the CPU head. The token embedding,
the final norm and the output head stay on the CPU unless `head_on_gpu` asks otherwise.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from .config import ModelConfig
from .errors import ConfigError, DeviceError

GiB = 1 << 30
DEFAULT_MARGIN = 1 * GiB
DEFAULT_BATCH = 512  # prompt tokens per prefill chunk; sizes the activation scratch
#: How the CUDA backend multiplies quantized weights by a prompt chunk: "mmq" (default: 8-bit
#: activations and integer dots, as llama.cpp's CUDA MMQ and the CPU) or "cublas" (the weight
#: dequantized to f16 into a scratch the size of the largest matrix, activations rounded to f16).
CUDA_PREFILL_ENV = "HYBRIDLLM_CUDA_PREFILL"
_BF16 = 30  # gguf's BF16: no kernel of its own for prompts, converted to f16 for cuBLAS
Device = Literal["cpu", "gpu"]
LayerRequest = int | Literal["auto", "all"]


@dataclass(frozen=True)
class ModelSizes:
    """Bytes of the weights, as stored (quantized blocks, no dequantized copies)."""

    blocks: tuple[int, ...]  # per transformer block, all its tensors
    token_embd: int
    output: int  # the head; equals token_embd when the embedding is tied
    output_norm: int
    # Elements of the largest matrix the CUDA backend dequantizes to f16 for a prefill GEMM
    # (cuda_dequantizes: backends/cuda.py's scratch is sized for it at load), per
    # block and for the head; () / 0 when unknown (then no such scratch is counted).
    dequant_elements: tuple[int, ...] = ()
    output_dequant_elements: int = 0

    @classmethod
    def from_model(cls, model: Any) -> ModelSizes:
        """From an open `ModelFile`."""
        n_layers = model.config.n_layers
        return cls(
            blocks=tuple(model.block_nbytes(i) for i in range(n_layers)),
            token_embd=model.tensor("token_embd.weight").nbytes,
            output=model.output_tensor.nbytes,
            output_norm=model.tensor("output_norm.weight").nbytes,
            dequant_elements=tuple(
                max((_dequant_elements(t) for t in model.block_tensors(i).values()), default=0) for i in range(n_layers)
            ),
            output_dequant_elements=_dequant_elements(model.output_tensor),
        )


def cuda_prefill() -> str:
    """The CUDA backend's prefill path for quantized weights, from $HYBRIDLLM_CUDA_PREFILL."""
    value = os.environ.get(CUDA_PREFILL_ENV, "mmq")
    if value not in ("mmq", "cublas"):
        raise ConfigError(f"{CUDA_PREFILL_ENV}={value!r}: expected 'mmq' or 'cublas'")
    return value


def cuda_dequantizes(qtype: int, prefill: str) -> bool:
    """Whether the CUDA backend's prefill matmuls dequantize a matrix of this type to f16:
    BF16 always, the quantized types with prefill "cublas" (F32 and F16 are used as they are)."""
    return qtype == _BF16 or (prefill == "cublas" and qtype not in (0, 1))


def _dequant_elements(tensor: Any) -> int:
    """rows * cols of a matrix that a GPU prefill dequantizes to f16, else 0."""
    if len(tensor.shape) != 2 or not cuda_dequantizes(int(tensor.qtype), cuda_prefill()):
        return 0
    return int(tensor.shape[0]) * int(tensor.shape[1])


@dataclass(frozen=True)
class BlockPlacement:
    index: int
    device: Device
    weights_bytes: int
    kv_bytes: int


@dataclass(frozen=True)
class DeviceBudget:
    weights_bytes: int = 0
    kv_bytes: int = 0
    scratch_bytes: int = 0
    margin_bytes: int = 0
    free_bytes: int | None = None  # free before loading (None: not measured, e.g. host RAM)

    @property
    def total_bytes(self) -> int:
        """What the plan puts on this device (the margin is kept free, not used)."""
        return self.weights_bytes + self.kv_bytes + self.scratch_bytes

    @property
    def free_after_bytes(self) -> int | None:
        return None if self.free_bytes is None else self.free_bytes - self.total_bytes


@dataclass(frozen=True)
class Plan:
    blocks: tuple[BlockPlacement, ...]
    token_embd: Device = "cpu"
    output: Device = "cpu"
    output_norm: Device = "cpu"
    devices: dict[str, DeviceBudget] = field(default_factory=dict)
    n_ctx: int = 0
    notes: tuple[str, ...] = ()

    @property
    def gpu_blocks(self) -> list[int]:
        return [b.index for b in self.blocks if b.device == "gpu"]

    @property
    def n_gpu_layers(self) -> int:
        return len(self.gpu_blocks)

    def to_dict(self) -> dict[str, Any]:
        devices = {
            name: {**asdict(d), "total_bytes": d.total_bytes, "free_after_bytes": d.free_after_bytes}
            for name, d in self.devices.items()
        }
        return {
            "n_ctx": self.n_ctx,
            "n_gpu_layers": self.n_gpu_layers,
            "blocks": [asdict(b) for b in self.blocks],
            "token_embd": self.token_embd,
            "output": self.output,
            "output_norm": self.output_norm,
            "devices": devices,
            "notes": list(self.notes),
        }


def kv_cache_bytes(config: ModelConfig, n_ctx: int, kv_dtype_bytes: int = 2) -> int:
    """K and V cache of one block for n_ctx tokens (f16 by default, as llama.cpp)."""
    return n_ctx * config.kv_bytes_per_token(kv_dtype_bytes)


def scratch_bytes(config: ModelConfig, n_ctx: int, n_batch: int = DEFAULT_BATCH, logits: bool = False) -> int:
    """Activation buffers of one device for a prefill chunk of n_batch tokens (f32).

    Per token: the residual and its normed copy, Q, K, V, the attention output, gate/up/act of
    the FFN; plus the attention scores of one chunk against the whole context, and the logits
    of the chunk's last token where the head lives.
    """
    per_token = 3 * config.dim + config.q_dim + config.kv_dim_k + config.kv_dim_v + config.n_heads * config.head_dim_v
    per_token += 3 * config.ffn_dim
    scores = config.n_heads * n_batch * n_ctx
    head = config.n_vocab if logits else 0
    return 4 * (n_batch * per_token + scores + head)


#: ggml's GELU table of the CUDA backend: one f32 per f16 bit pattern.
GELU_TABLE_BYTES = 4 * 65536


def gpu_scratch_bytes(
    config: ModelConfig, sizes: ModelSizes, n_ctx: int, gpu_blocks: Any, head_gpu: bool = False,
    n_batch: int = DEFAULT_BATCH,
) -> int:  # fmt: skip
    """Everything the CUDA backend allocates on the device besides weights and KV caches.

    The activations of a prefill chunk (scratch_bytes; a chunk is at most n_ctx tokens), plus
    what backends/cuda.py adds: the f16 dequantization scratch of the largest quantized matrix
    it holds (2 bytes an element), the rope cos/sin tables ((n_ctx, rope_dim/2) f32 each, one pair
    per distinct rope base among its blocks: gemma3's local and global layers differ), the GELU
    table, the position table the kernels read their position from (an int32 per position),
    the converted copy of a chunk's widest matmul input (8-bit blocks of 32: 1.5 bytes an
    element; f16 for cuBLAS: 2), and with the head the logits of every row of a chunk (scoring
    asks for all of them). Attention needs nothing past the f32 scores of scratch_bytes.
    """
    blocks = list(gpu_blocks)
    if not blocks and not head_gpu:
        return 0
    chunk = min(n_batch, n_ctx)
    dequant = max(
        [sizes.dequant_elements[i] for i in blocks if i < len(sizes.dequant_elements)]
        + [sizes.output_dequant_elements if head_gpu else 0]
    )  # fmt: skip
    bases = {config.rope_base_swa if config.swa_layers[i] else config.rope_base for i in blocks}
    rope = len(bases) * 2 * 4 * n_ctx * (config.rope_dim // 2)
    gelu = GELU_TABLE_BYTES if config.spec.activation == "gelu_tanh" else 0
    widest = max(config.dim, config.ffn_dim, config.q_dim, config.n_heads * config.head_dim_v)
    converted = 2 * chunk * widest
    logits = 4 * config.n_vocab * (chunk - 1) if head_gpu else 0  # every row's logits, not one
    positions = 4 * n_ctx
    return scratch_bytes(config, n_ctx, chunk, logits=head_gpu) + 2 * dequant + rope + gelu + converted + logits + positions


def plan(
    config: ModelConfig,
    sizes: ModelSizes,
    n_ctx: int,
    free_device_bytes: int | None,
    *,
    n_gpu_layers: LayerRequest = "auto",
    kv_dtype_bytes: int = 2,
    margin: int = DEFAULT_MARGIN,
    gpu_mem: int | None = None,
    head_on_gpu: bool = False,
    no_gpu_reason: str = "no GPU",
    n_batch: int = DEFAULT_BATCH,
    n_seq: int = 1,
) -> Plan:
    """Place blocks on the GPU (as many as fit, or as asked) and the rest on the CPU.

    free_device_bytes: free GPU memory, or None when there is no usable GPU (no_gpu_reason
    says why). usable = min(free - margin, gpu_mem): gpu_mem caps the plan so a small GPU can
    be reproduced on a big one. n_seq: KV caches of n_ctx tokens each block holds (one per
    sequence served at once: the server's slots and the Runner's own).
    """
    n_layers = config.n_layers
    wanted = _wanted_layers(n_gpu_layers, n_layers)
    if n_ctx <= 0:
        raise ValueError(f"n_ctx must be positive, got {n_ctx}")
    if n_seq < 1:
        raise ValueError(f"n_seq must be >= 1, got {n_seq}")
    kv = kv_cache_bytes(config, n_ctx, kv_dtype_bytes) * n_seq
    notes: list[str] = []

    if free_device_bytes is None:
        if wanted not in (None, 0):
            raise DeviceError(f"n_gpu_layers={n_gpu_layers!r} needs a GPU, but {no_gpu_reason}")
        n_gpu, usable = 0, 0
    else:
        usable = max(0, free_device_bytes - margin)
        if gpu_mem is not None:
            usable = min(usable, gpu_mem)
        fit = _blocks_that_fit(
            sizes.blocks, kv, usable,
            lambda k: gpu_scratch_bytes(config, sizes, n_ctx, range(n_layers - k, n_layers), n_batch=n_batch),
        )  # fmt: skip
        n_gpu = fit if wanted is None else min(wanted, fit)
        if wanted is None and fit == 0:
            need = gpu_scratch_bytes(config, sizes, n_ctx, [n_layers - 1], n_batch=n_batch) + sizes.blocks[-1] + kv
            notes.append(f"GPU too small for one block (needs {_mib(need)}, usable {_mib(usable)}): running on the CPU")
        elif wanted is not None and wanted > fit:
            notes.append(f"asked for {wanted} GPU blocks, only {fit} fit in {_mib(usable)} usable GPU memory")

    first_gpu = n_layers - n_gpu
    blocks = tuple(
        BlockPlacement(i, "gpu" if i >= first_gpu else "cpu", sizes.blocks[i], kv) for i in range(n_layers)
    )
    head_gpu = head_on_gpu and n_gpu == n_layers and n_gpu > 0
    if head_gpu:
        head_bytes = sizes.output + sizes.output_norm
        scratch = gpu_scratch_bytes(config, sizes, n_ctx, range(n_layers), head_gpu=True, n_batch=n_batch)
        if scratch + sum(sizes.blocks) + n_layers * kv + head_bytes > usable:
            head_gpu = False
            notes.append("head_on_gpu: the output head does not fit on the GPU; it stays on the CPU")
    elif head_on_gpu:
        notes.append("head_on_gpu needs every block on the GPU; the head stays on the CPU")
    return Plan(
        blocks=blocks,
        output="gpu" if head_gpu else "cpu",
        output_norm="gpu" if head_gpu else "cpu",
        devices=_budgets(config, sizes, blocks, head_gpu, n_ctx, n_batch, free_device_bytes, margin),
        n_ctx=n_ctx,
        notes=tuple(notes),
    )


def _wanted_layers(request: LayerRequest, n_layers: int) -> int | None:
    """None for "auto"; else the number of GPU blocks asked for, clamped to the model's."""
    if request == "auto":
        return None
    if request == "all":
        return n_layers
    if isinstance(request, bool) or not isinstance(request, int) or request < -1:
        raise ValueError(f"n_gpu_layers must be 'auto', 'all', or an int >= 0; got {request!r}")
    return n_layers if request == -1 else min(request, n_layers)  # -1 means all, as in llama.cpp


def _blocks_that_fit(block_bytes: tuple[int, ...], kv: int, budget: int, scratch: Any) -> int:
    """How many blocks, taken from the end of the stack, fit in `budget` bytes with the
    device scratch that k blocks need (scratch(k))."""
    count, used = 0, 0
    for size in reversed(block_bytes):
        if used + size + kv + scratch(count + 1) > budget:
            break
        used += size + kv
        count += 1
    return count


def _budgets(config, sizes, blocks, head_gpu, n_ctx, n_batch, free, margin) -> dict[str, DeviceBudget]:  # noqa: ANN001
    cpu_blocks = [b for b in blocks if b.device == "cpu"]
    gpu_blocks = [b for b in blocks if b.device == "gpu"]
    # A tied head is the embedding itself: on the CPU it costs nothing more; on the GPU it is a copy.
    head = sizes.output_norm + (0 if config.tied_embeddings and not head_gpu else sizes.output)
    budgets = {
        "cpu": DeviceBudget(
            weights_bytes=sum(b.weights_bytes for b in cpu_blocks) + sizes.token_embd + (0 if head_gpu else head),
            kv_bytes=sum(b.kv_bytes for b in cpu_blocks),
            scratch_bytes=scratch_bytes(config, n_ctx, n_batch, logits=not head_gpu),
        )
    }
    if free is not None:
        budgets["gpu"] = DeviceBudget(
            weights_bytes=sum(b.weights_bytes for b in gpu_blocks) + (head if head_gpu else 0),
            kv_bytes=sum(b.kv_bytes for b in gpu_blocks),
            scratch_bytes=gpu_scratch_bytes(config, sizes, n_ctx, [b.index for b in gpu_blocks], head_gpu, n_batch),
            margin_bytes=margin,
            free_bytes=free,
        )
    return budgets


def parse_size(text: str | int) -> int:
    """'4GiB', '512 MiB', '2G', '1e9' or an int -> bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?)(i?B?)\s*", str(text), flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"cannot read size {text!r}; use e.g. 4GiB, 512MiB or a byte count")
    number, prefix, binary = match.groups()
    power = " KMGT".index(prefix.upper() or " ")
    base = 1024 if binary.lower().startswith("i") or not binary else 1000
    return int(float(number) * base**power)


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"
