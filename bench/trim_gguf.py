"""Trim a GGUF model to its first K blocks and V embedding rows, keeping real shapes and types.

Why: a GPU machine is reached with at most 64 MiB of files and cannot download anything, while
the test models are 98 MB (smollm2-135m) and 253 MB (gemma3-270m, mostly its 262k-row
embedding). A trimmed copy keeps every block tensor bit for bit, so the GPU tests compare the
CUDA backend with the CPU backend on real weights there. The tokenizer is dropped (the tests
feed token ids < V) and `{arch}.vocab_size` is set to V.

    python bench/trim_gguf.py --out gpu-models        # smollm2-135m: 2 blocks, gemma3-270m: 6
    HYBRIDLLM_GPU_TEST_MODELS=gpu-models pytest -m gpu tests/test_cuda_backend.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gguf import GGUFValueType, GGUFWriter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: Blocks kept per catalog model: gemma3's first six are five sliding-window layers and a global one.
DEFAULT_BLOCKS = {"smollm2-135m": 2, "gemma3-270m": 6}


def trim(src: str | Path, dst: str | Path, n_blocks: int, n_vocab: int) -> Path:
    """Write dst: src's metadata (no tokenizer) and tensors of blocks < n_blocks, embedding rows < n_vocab."""
    from hybridllm.gguf_file import ModelFile

    model = ModelFile(src)
    arch = model.config.arch
    n_blocks = min(n_blocks, model.config.n_layers)
    n_vocab = min(n_vocab, model.tensor("token_embd.weight").shape[0])
    writer = GGUFWriter(str(dst), arch)
    replaced = {f"{arch}.block_count": n_blocks, f"{arch}.vocab_size": n_vocab}
    for key, field in model.reader.fields.items():
        if key.startswith(("GGUF.", "tokenizer.")) or key in ("general.architecture", *replaced):
            continue
        vtype = GGUFValueType(field.types[0])
        if vtype == GGUFValueType.ARRAY:
            writer.add_key_value(key, list(field.contents()), vtype, sub_type=GGUFValueType(field.types[-1]))
        else:
            writer.add_key_value(key, field.contents(), vtype)
    for key, value in replaced.items():
        writer.add_uint32(key, value)
    for name, t in model.tensors.items():
        if name.startswith("blk.") and int(name.split(".")[1]) >= n_blocks:
            continue
        # uint8 data: the writer reads its shape as bytes per row, so vectors go in 1-D
        raw = t.raw.reshape(-1) if len(t.shape) == 1 else t.raw
        if name in ("token_embd.weight", "output.weight"):
            raw = raw[:n_vocab]
        writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=t.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(dst)


def main(argv: list[str] | None = None) -> int:
    from hybridllm import catalog

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for the trimmed copies (same file names)")
    p.add_argument("--models", nargs="+", default=list(DEFAULT_BLOCKS), help="catalog names")
    p.add_argument("--blocks", type=int, default=None, help="blocks to keep (default: 2 smollm, 6 gemma)")
    p.add_argument("--vocab", type=int, default=4096, help="embedding rows to keep")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        item = catalog.entry(name)
        if not item.present:
            raise SystemExit(f"model {name} is not in {catalog.models_dir()}; run: hybridllm pull {name}")
        blocks = args.blocks or DEFAULT_BLOCKS.get(name, 2)
        dst = trim(item.path, args.out / item.filename, blocks, args.vocab)
        print(f"{dst}: {blocks} blocks, {args.vocab} rows, {dst.stat().st_size / (1 << 20):.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
