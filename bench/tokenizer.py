"""Tokenizer throughput: MB/s of English text encoded (and decoded) on one core.

Corpus: CPython's own documentation topics (pydoc_data, ~466 KB of English prose with some
code), so the numbers are reproducible offline. "cold" is a fresh tokenizer (empty word
cache) encoding the corpus once; "warm" encodes it again. Rates are MB of UTF-8 input per
CPU-second of this (single-threaded) process. With llama-cpp-python installed the
same text is also run through llama.cpp for reference, and the ids are checked to agree.

    python bench/tokenizer.py [model.gguf ...]   # default: the two test models
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hybridllm.tokenizer import Tokenizer  # noqa: E402

_CATALOG_NAMES = ("smollm2-135m", "gemma3-270m")


def english_corpus() -> str:
    """~466 KB of English documentation that ships with CPython."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def default_models() -> list[str]:
    """The two test models, where `hybridllm pull` put them."""
    from hybridllm import catalog

    return [str(catalog.entry(n).path) for n in _CATALOG_NAMES if catalog.entry(n).present]


def timed(fn, *args):
    """Result and CPU seconds of fn(*args): CPU time, not wall time, so that other processes
    sharing the machine do not count against the single core this runs on."""
    t0 = time.process_time()
    result = fn(*args)
    return result, time.process_time() - t0


def bench_model(path: str, text: str) -> dict[str, float]:
    mb = len(text.encode()) / 1e6
    tok, load_s = timed(Tokenizer.from_gguf, path)
    ids, cold = timed(tok.encode, text)
    _, warm = timed(tok.encode, text)
    decoded, dec = timed(tok.decode, ids)
    row = {
        "load_s": load_s, "tokens": len(ids), "cold_mb_s": mb / cold, "warm_mb_s": mb / warm,
        "decode_mb_s": mb / dec, "roundtrip": float(decoded == text),
    }  # fmt: skip
    row.update(_llama_cpp_reference(path, text, ids, mb))
    return row


def _llama_cpp_reference(path: str, text: str, ids: list[int], mb: float) -> dict[str, float]:
    try:
        import llama_cpp
    except ImportError:
        return {}
    llm = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    ref, secs = timed(llm.tokenize, text.encode(), True, False)
    return {"llama_cpp_mb_s": mb / secs, "agrees": float(ref == ids)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="GGUF files (default: the test models)")
    args = parser.parse_args()
    text = english_corpus()
    print(f"corpus: {len(text.encode()) / 1e3:.0f} KB, python {sys.version.split()[0]}")
    for path in args.models or default_models():
        row = bench_model(path, text)
        cells = " ".join(f"{k}={v:.3g}" for k, v in row.items())
        print(f"{Path(path).name}: {cells}")


if __name__ == "__main__":
    main()
