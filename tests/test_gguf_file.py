"""GGUF loading: real models read zero-copy, and every kind of broken file is a ModelFormatError."""

from __future__ import annotations

import re
import shutil
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

from hybridllm.errors import ModelFormatError, UnsupportedTensorTypeError
from hybridllm.gguf_file import ModelFile, summarize
from hybridllm.model import block_weights


def test_smollm_config(smollm_path: str) -> None:
    cfg = ModelFile(smollm_path).config
    assert (cfg.arch, cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads) == ("llama", 30, 576, 9, 3)
    assert (cfg.head_dim_k, cfg.ffn_dim, cfg.n_vocab, cfg.context_length) == (64, 1536, 49152, 8192)
    assert cfg.rope_base == 100000.0 and cfg.spec.rope_type == "norm"
    assert cfg.tied_embeddings and not any(cfg.swa_layers)


def test_gemma_config(gemma_path: str) -> None:
    cfg = ModelFile(gemma_path).config
    assert (cfg.arch, cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads) == ("gemma3", 18, 640, 4, 1)
    assert (cfg.head_dim_k, cfg.head_dim_v, cfg.n_vocab, cfg.sliding_window) == (256, 256, 262144, 512)
    # every 6th layer is global (llama.cpp's swa pattern 6), with the global rope base
    assert [i for i, swa in enumerate(cfg.swa_layers) if not swa] == [5, 11, 17]
    assert cfg.rope_base == 1e6 and cfg.rope_base_swa == 1e4
    assert cfg.spec.qk_norm and cfg.spec.post_norms and cfg.embed_scale == pytest.approx(640**0.5)


def test_tensors_are_zero_copy_views(smollm_path: str) -> None:
    model = ModelFile(smollm_path)
    q = model.tensor("blk.0.attn_q.weight")
    assert q.qtype == gguf.GGMLQuantizationType.Q4_1 and q.shape == (576, 576)
    assert q.raw.shape == (576, 576 // 32 * 20) and q.raw.dtype == np.uint8
    assert isinstance(q.raw.base, np.memmap) or not q.raw.flags.owndata
    assert model.output_tensor.name == "token_embd.weight"  # tied head
    norm = model.tensor("blk.0.attn_norm.weight").as_f32()
    assert norm.shape == (576,) and np.isfinite(norm).all()


def test_summary_accounts_for_every_byte(gemma_path: str) -> None:
    model = ModelFile(gemma_path)
    info = summarize(model)
    tensor_bytes = sum(v["bytes"] for v in info["tensor_types"].values())
    assert tensor_bytes == sum(t.nbytes for t in model.tensors.values())
    assert tensor_bytes <= info["file_bytes"]
    assert info["parameters"] == sum(t.n_elements for t in model.tensors.values())
    assert sum(info["block_bytes"]) + info["token_embd"]["bytes"] < tensor_bytes + 1
    assert info["tokenizer"]["model"] == "llama" and info["chat_template"] is False


# --- broken files ------------------------------------------------------------------------
def write_small_model(path: Path, extra_tensors=(), extra_meta=None) -> Path:  # noqa: ANN001
    """A tiny valid llama GGUF (one block), plus any extra (name, shape) tensors and metadata."""
    w = gguf.GGUFWriter(str(path), "llama")
    dim, ffn, vocab = 32, 64, 16
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(dim)
    w.add_feed_forward_length(ffn)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    for key, value in (extra_meta or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_uint32(key, value)
    rng = np.random.default_rng(0)
    shapes = {
        "token_embd.weight": (vocab, dim), "output_norm.weight": (dim,),
        "blk.0.attn_norm.weight": (dim,), "blk.0.ffn_norm.weight": (dim,),
        "blk.0.attn_q.weight": (dim, dim), "blk.0.attn_k.weight": (dim // 2, dim),
        "blk.0.attn_v.weight": (dim // 2, dim), "blk.0.attn_output.weight": (dim, dim),
        "blk.0.ffn_gate.weight": (ffn, dim), "blk.0.ffn_up.weight": (ffn, dim),
        "blk.0.ffn_down.weight": (dim, ffn),
    } | dict(extra_tensors)  # fmt: skip
    for name, shape in shapes.items():
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny valid llama GGUF (one block), so corrupting copies of it is cheap."""
    return write_small_model(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def _copy(src: Path, dst: Path, edit=None, size: int | None = None) -> Path:  # noqa: ANN001
    data = bytearray(src.read_bytes())
    if edit:
        edit(data)
    dst.write_bytes(bytes(data[:size] if size is not None else data))
    return dst


def test_small_model_loads(small_model: Path) -> None:
    assert ModelFile(small_model).config.n_layers == 1


@pytest.mark.parametrize("cut", [0, 3, 10, 23, 40, 200, -1, -100])
def test_truncated_file(small_model: Path, tmp_path: Path, cut: int) -> None:
    size = cut if cut >= 0 else small_model.stat().st_size + cut
    bad = _copy(small_model, tmp_path / "cut.gguf", size=size)
    with pytest.raises(ModelFormatError, match=r"cut\.gguf"):
        ModelFile(bad)


def test_not_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "notes.gguf"
    bad.write_bytes(b"this is plain text, not a model\n" * 4)
    with pytest.raises(ModelFormatError, match="not a GGUF file"):
        ModelFile(bad)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelFormatError, match="no such file"):
        ModelFile(tmp_path / "absent.gguf")


@pytest.mark.parametrize("field_offset, value", [(8, 2**40), (16, 2**40), (8, 2**63), (16, 2**63 + 5)])
def test_header_counts_past_end(small_model: Path, tmp_path: Path, field_offset: int, value: int) -> None:
    """Tensor (offset 8) and metadata (offset 16) counts far larger than the file: an error, fast."""

    def edit(data: bytearray) -> None:
        data[field_offset : field_offset + 8] = struct.pack("<Q", value)

    with pytest.raises(ModelFormatError, match="too small|past the end"):
        ModelFile(_copy(small_model, tmp_path / "counts.gguf", edit))


def _patch_tensor_info(path: Path, name: str, patch) -> bytes:  # noqa: ANN001
    """Find tensor `name`'s info record and let `patch(data, offset_of_type_field)` edit it."""
    data = bytearray(path.read_bytes())
    key = struct.pack("<Q", len(name)) + name.encode()
    at = data.index(key) + len(key)
    n_dims = struct.unpack_from("<I", data, at)[0]
    type_at = at + 4 + 8 * n_dims
    patch(data, type_at)
    return bytes(data)


def test_tensor_offset_past_end(small_model: Path, tmp_path: Path) -> None:
    def patch(data: bytearray, type_at: int) -> None:
        data[type_at + 4 : type_at + 12] = struct.pack("<Q", 10**12)

    bad = tmp_path / "offset.gguf"
    bad.write_bytes(_patch_tensor_info(small_model, "blk.0.ffn_up.weight", patch))
    with pytest.raises(ModelFormatError, match="past the end"):
        ModelFile(bad)


def test_unknown_tensor_type_id(small_model: Path, tmp_path: Path) -> None:
    def patch(data: bytearray, type_at: int) -> None:
        data[type_at : type_at + 4] = struct.pack("<I", 250)

    bad = tmp_path / "typeid.gguf"
    bad.write_bytes(_patch_tensor_info(small_model, "blk.0.attn_q.weight", patch))
    with pytest.raises(ModelFormatError, match="typeid.gguf"):
        ModelFile(bad)


def test_unsupported_tensor_type(small_model: Path, tmp_path: Path) -> None:
    # I8 is a real GGML type without a kernel here: a clear error at load, naming the tensor.
    def patch(data: bytearray, type_at: int) -> None:
        data[type_at : type_at + 4] = struct.pack("<I", int(gguf.GGMLQuantizationType.I8))

    bad = tmp_path / "i8.gguf"
    bad.write_bytes(_patch_tensor_info(small_model, "output_norm.weight", patch))
    with pytest.raises(UnsupportedTensorTypeError, match="output_norm.weight.*I8"):
        ModelFile(bad)


def test_unknown_architecture(small_model: Path, tmp_path: Path) -> None:
    def edit(data: bytearray) -> None:
        at = data.index(b"llama")
        data[at : at + 5] = b"llamo"

    with pytest.raises(ModelFormatError, match="architecture 'llamo' is not supported"):
        ModelFile(_copy(small_model, tmp_path / "arch.gguf", edit))


def test_missing_tensor(small_model: Path, tmp_path: Path) -> None:
    def edit(data: bytearray) -> None:
        at = data.index(b"blk.0.ffn_down.weight")
        data[at : at + 5] = b"blk.X"

    with pytest.raises(ModelFormatError, match="'blk.0.ffn_down.weight' is missing"):
        ModelFile(_copy(small_model, tmp_path / "missing.gguf", edit))


@pytest.mark.parametrize(
    ("tensor", "shape", "feature"),
    [
        # LongRoPE factors are read only with rope.scaling.type = longrope
        ("rope_factors_long.weight", (4,), "LongRoPE frequency factors"),
        ("blk.0.attn_output.bias", (32,), "a bias"),
        ("blk.0.ffn_gate_inp.weight", (4, 32), "a mixture-of-experts router"),
        ("blk.0.ssm_in.weight", (32, 32), "a recurrent"),
        ("blk.0.mystery.weight", (32,), "a tensor"),
    ],
)
def test_unread_tensor_is_refused(tmp_path: Path, tensor: str, shape: tuple, feature: str) -> None:
    path = write_small_model(tmp_path / "extra.gguf", extra_tensors=[(tensor, shape)])
    with pytest.raises(ModelFormatError, match=f"extra.gguf.*'{re.escape(tensor)}' \\({feature}"):
        ModelFile(path)


def test_known_unused_tensor_is_accepted(tmp_path: Path) -> None:
    path = write_small_model(tmp_path / "rot.gguf", extra_tensors=[("blk.0.attn_rot_embd.weight", (8,))])
    assert ModelFile(path).config.n_layers == 1


def test_llama3_rope_freqs_and_qkv_biases_are_read(tmp_path: Path) -> None:
    """Llama 3.1's rope_freqs and the optional Q/K/V biases llama.cpp reads for every architecture."""
    extra = [("rope_freqs.weight", (4,)), ("blk.0.attn_q.bias", (32,)), ("blk.0.attn_v.bias", (16,))]
    mf = ModelFile(write_small_model(tmp_path / "l3.gguf", extra_tensors=extra))
    assert mf.rope_factors(64).shape == (4,)
    assert set(block_weights(mf, 0)) >= {"rope_freqs", "attn_q_bias", "attn_v_bias"}


def test_vector_of_the_wrong_length_is_refused(tmp_path: Path) -> None:
    path = write_small_model(tmp_path / "short.gguf", extra_tensors=[("rope_freqs.weight", (3,))])
    with pytest.raises(ModelFormatError, match=r"short.gguf: tensor 'rope_freqs.weight' is F32 \(3,\), expected F32 \(4,\)"):
        ModelFile(path)


def test_unknown_rope_scaling_is_refused(tmp_path: Path) -> None:
    path = write_small_model(tmp_path / "ntk.gguf", extra_meta={"llama.rope.scaling.type": "dynamic-ntk"})
    with pytest.raises(ModelFormatError, match="ntk.gguf: rope scaling type 'dynamic-ntk' is not supported"):
        ModelFile(path)


def test_mixture_of_experts_is_refused(tmp_path: Path) -> None:
    path = write_small_model(tmp_path / "moe.gguf", extra_meta={"llama.expert_count": 8})
    with pytest.raises(ModelFormatError, match="moe.gguf: a mixture of experts"):
        ModelFile(path)


def test_random_corruption_never_crashes(small_model: Path, tmp_path: Path) -> None:
    """Flip random header bytes: loading either works or raises ModelFormatError."""
    rng = np.random.default_rng(1)
    header_end = small_model.read_bytes().index(b"blk.0.ffn_down.weight") + 64
    for i in range(150):
        positions = rng.integers(4, header_end, size=3)

        def edit(data: bytearray, positions=positions) -> None:  # noqa: ANN001
            for p in positions:
                data[p] = int(rng.integers(0, 256))

        bad = _copy(small_model, tmp_path / f"flip{i}.gguf", edit)
        try:
            ModelFile(bad)
        except ModelFormatError:
            pass


def test_real_model_truncated(smollm_path: str, tmp_path: Path) -> None:
    bad = tmp_path / "smol_truncated.gguf"
    with open(smollm_path, "rb") as src, open(bad, "wb") as dst:
        shutil.copyfileobj(src, dst, length=1 << 20)
        dst.truncate(50_000_000)
    with pytest.raises(ModelFormatError, match="smol_truncated.gguf.*past the end"):
        ModelFile(bad)
