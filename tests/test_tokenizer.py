"""Tokenizer: exact agreement with llama.cpp, streaming decode, and small synthetic vocabs.

The corpus (tests/data/tokenizer_corpus.json) holds 300+ strings and, per model, the ids
llama.cpp (llama-cpp-python 0.3.36) produced for them, plus the decoded text. With
llama-cpp-python installed the two real models are also checked live; the goldens cover the
pre-tokenizer variants (llama-bpe, qwen2, gpt-2, default, SentencePiece with a space prefix):
the real vocabularies with a tokenizer key changed (and, for SmolLM, a few multi-digit tokens
added), run through llama.cpp from a vocab-only GGUF copy. Regenerate the goldens with

    python tests/test_tokenizer.py --regen
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import random
import sys
from pathlib import Path
from typing import Any

import pytest

from hybridllm.errors import ModelFormatError
from hybridllm.tokenizer import Tokenizer, gguf_tokenizer_metadata
from hybridllm.tokenizer.merge import _merge_heap, _merge_rescan, bytes_to_unicode, merge

CORPUS_PATH = Path(__file__).parent / "data" / "tokenizer_corpus.json"
CORPUS: dict[str, Any] = json.loads(CORPUS_PATH.read_text(encoding="utf-8"))
STRINGS: list[str] = CORPUS["strings"]
# (add_bos, special) combinations, in the order the goldens store them
COMBOS = [(True, False), (True, True), (False, False), (False, True)]
VARIANT_COMBOS = [(True, False), (False, True)]
# Pre-tokenizer variants: a real vocab with metadata overrides (None removes the key). SmolLM's
# vocab has no multi-digit tokens, so the variants add a few; otherwise digit grouping
# (llama3's 1-3 digits, default's runs of three) would not show in the ids.
DIGIT_TOKENS = ["12", "123", "1234", "34", "345", "00", "000", "99", "999"]
DIGIT_MERGES = ["1 2", "12 3", "123 4", "3 4", "34 5", "0 0", "00 0", "9 9", "99 9"]
_DIGITS = {"extra_tokens": DIGIT_TOKENS, "extra_merges": DIGIT_MERGES}
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "smollm/llama-bpe": ("smollm", {"pre": "llama-bpe", "add_bos": None, **_DIGITS}),
    "smollm/qwen2": ("smollm", {"pre": "qwen2", "add_bos": None, **_DIGITS}),
    "smollm/gpt-2": ("smollm", {"pre": "gpt-2", "add_bos": None, **_DIGITS}),
    "smollm/default": ("smollm", {"pre": None, "add_bos": None, **_DIGITS}),
    "smollm/smollm+digits": ("smollm", _DIGITS),
    "gemma/space-prefix": ("gemma", {"add_space_prefix": True, "add_bos": None}),
}


def variant_metadata(meta: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`Tokenizer.from_metadata` arguments of a variant (extra tokens are NORMAL, appended)."""
    meta = {**meta, **overrides}
    extra = meta.pop("extra_tokens", [])
    meta["tokens"] = [*meta["tokens"], *extra]
    meta["token_types"] = [*meta["token_types"], *([1] * len(extra))]
    meta["merges"] = [*(meta["merges"] or []), *meta.pop("extra_merges", [])] or None
    return meta


def _case_id(i: int) -> str:
    return f"{i:03d}-" + "".join(c if c.isalnum() else "_" for c in ascii(STRINGS[i])[1:17])


CASES = [pytest.param(i, id=_case_id(i)) for i in range(len(STRINGS))]


def vocab_sha(tok: Tokenizer) -> str:
    """Fingerprint of a vocab, so goldens are only used against the model they came from."""
    joined = "\n".join(tok.token_text(i) for i in range(tok.n_vocab))
    return hashlib.sha256(joined.encode("utf-8", "surrogateescape")).hexdigest()


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def metas(smollm_path: str, gemma_path: str) -> dict[str, dict[str, Any]]:
    return {
        "smollm": gguf_tokenizer_metadata(smollm_path),
        "gemma": gguf_tokenizer_metadata(gemma_path),
    }


@pytest.fixture(scope="module")
def smollm_tok(smollm_path: str) -> Tokenizer:
    return Tokenizer.from_gguf(smollm_path)


@pytest.fixture(scope="module")
def gemma_tok(gemma_path: str) -> Tokenizer:
    return Tokenizer.from_gguf(gemma_path)


def _llama(path: str) -> Any:
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)


@pytest.fixture(scope="module")
def smollm_llama(smollm_path: str) -> Any:
    return _llama(smollm_path)


@pytest.fixture(scope="module")
def gemma_llama(gemma_path: str) -> Any:
    return _llama(gemma_path)


def _tok(request: pytest.FixtureRequest, model: str) -> Tokenizer:
    return request.getfixturevalue(f"{model}_tok")


def _golden(name: str, tok: Tokenizer) -> dict[str, Any]:
    entry = CORPUS["models"].get(name)
    if entry is None:
        pytest.skip(f"no golden ids for {name}; run: python tests/test_tokenizer.py --regen")
    if entry["vocab_sha256"] != vocab_sha(tok):
        pytest.skip(f"{name}: this model's vocab differs from the one the goldens were made with")
    return entry


# ----------------------------------------------------------------------------- llama.cpp oracle


def llama_cpp_detokenize(llm: Any, ids: list[int], special: bool) -> bytes:
    """Llama.detokenize without its 32-byte piece buffer (it silently drops longer pieces)."""
    import llama_cpp

    buf = ctypes.create_string_buffer(256)
    out = b""
    for t in ids:
        n = llama_cpp.llama_token_to_piece(llm._model.vocab, t, buf, len(buf), 0, special)
        out += buf.raw[:n]
    if ids and ids[0] == llm.token_bos() and out[:1] == b" ":
        out = out[1:]
    return out


@pytest.mark.parametrize("model", ["smollm", "gemma"])
@pytest.mark.parametrize("index", CASES)
def test_encode_decode_match_llama_cpp(
    request: pytest.FixtureRequest, model: str, index: int
) -> None:
    tok = _tok(request, model)
    llm = request.getfixturevalue(f"{model}_llama")
    text = STRINGS[index]
    for add_bos, special in COMBOS:
        want = llm.tokenize(text.encode(), add_bos=add_bos, special=special)
        assert tok.encode(text, add_bos=add_bos, special=special) == want, (add_bos, special)
        for render in (False, True):
            expected = llama_cpp_detokenize(llm, want, render)
            assert tok.decode(want, special=render) == expected.decode("utf-8", "replace")
            if all(len(tok.token_to_piece(t, render)) <= 32 for t in want):
                assert expected == llm.detokenize(want, special=render)


@pytest.mark.parametrize("model", ["smollm", "gemma"])
def test_eog_and_control_match_llama_cpp(request: pytest.FixtureRequest, model: str) -> None:
    import llama_cpp

    tok = _tok(request, model)
    vocab = request.getfixturevalue(f"{model}_llama")._model.vocab
    eog = {i for i in range(tok.n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, i)}
    assert set(tok.eot_ids) == eog
    ours = [tok.is_control(i) for i in range(tok.n_vocab)]
    assert ours == [llama_cpp.llama_vocab_is_control(vocab, i) for i in range(tok.n_vocab)]
    assert tok.bos_id == llama_cpp.llama_vocab_bos(vocab)
    assert tok.eos_id == llama_cpp.llama_vocab_eos(vocab)


# ----------------------------------------------------------------------------- goldens


@pytest.mark.parametrize("model", ["smollm", "gemma"])
def test_goldens_real_models(request: pytest.FixtureRequest, model: str) -> None:
    tok = _tok(request, model)
    golden = _golden(model, tok)
    for text, ids4, (plain, rendered) in zip(STRINGS, golden["ids"], golden["text"], strict=True):
        got = [tok.encode(text, add_bos=a, special=s) for a, s in COMBOS]
        assert got == ids4, text
        assert tok.decode(ids4[1]) == plain, text
        assert tok.decode(ids4[1], special=True) == rendered, text


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_goldens_pre_tokenizer_variants(metas: dict[str, dict[str, Any]], variant: str) -> None:
    base, overrides = VARIANTS[variant]
    tok = Tokenizer.from_metadata(**variant_metadata(metas[base], overrides))
    golden = _golden(variant, tok)
    mismatches = []
    for text, want in zip(STRINGS, golden["ids"], strict=True):
        got = [tok.encode(text, add_bos=a, special=s) for a, s in VARIANT_COMBOS]
        if got != want:
            mismatches.append((text, got, want))
    assert not mismatches, mismatches[:3]


def test_from_open_reader_and_bad_file(smollm_path: str, tmp_path: Path) -> None:
    from hybridllm.gguf_file import open_reader

    from_reader = Tokenizer.from_gguf(open_reader(smollm_path))
    assert from_reader.encode("Hi there") == Tokenizer.from_gguf(smollm_path).encode("Hi there")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all, just text")
    with pytest.raises(ModelFormatError):
        Tokenizer.from_gguf(bad)


def test_known_ids(smollm_tok: Tokenizer, gemma_tok: Tokenizer) -> None:
    assert smollm_tok.encode("Hello world") == [19556, 905]
    assert smollm_tok.encode("<|im_start|>user", special=True) == [1, 4093]
    assert smollm_tok.encode("12345") == [33, 34, 35, 36, 37]  # smollm: one digit per token
    assert gemma_tok.encode("Hello world") == [2, 9259, 1902]
    assert gemma_tok.encode("<start_of_turn>", add_bos=False, special=True) == [105]
    assert gemma_tok.encode("a  b", add_bos=False) == [236746, 138, 236763]  # "  " is user-defined
    assert smollm_tok.eot_ids == {0, 2, 4} and gemma_tok.eot_ids == {1, 106, 212}


# ----------------------------------------------------------------------------- streaming


def _stream(tok: Tokenizer, ids: list[int], special: bool = False) -> list[str]:
    dec = tok.stream_decoder(special=special)
    return [dec.feed(t) for t in ids] + [dec.flush()]


def _byte_fallback_char(tok: Tokenizer) -> str:
    """A character Gemma has no token for, so it encodes as <0xNN> byte tokens."""
    for cp in range(0x13000, 0x13400):  # Egyptian hieroglyphs
        ids = tok.encode(chr(cp), add_bos=False)
        if len(ids) == 4 and all(tok.token_text(i).startswith("<0x") for i in ids):
            return chr(cp)
    pytest.skip("no byte-fallback character found")


def test_stream_holds_partial_utf8_byte_tokens(gemma_tok: Tokenizer) -> None:
    ch = _byte_fallback_char(gemma_tok)
    ids = gemma_tok.encode(f"a{ch}b", add_bos=False)
    parts = _stream(gemma_tok, ids)
    assert "".join(parts) == f"a{ch}b"
    assert all("\ufffd" not in p for p in parts)
    assert ch in parts and parts.count("") >= 3  # nothing leaks until the 4th byte arrives


def test_stream_byte_level_bpe_splits_characters(smollm_tok: Tokenizer) -> None:
    text = "日本語 🫠 👨‍👩‍👧 naïve"
    ids = smollm_tok.encode(text)
    assert any("\ufffd" in smollm_tok.decode([i]) for i in ids)  # some tokens are partial chars
    parts = _stream(smollm_tok, ids)
    assert "".join(parts) == text and all("\ufffd" not in p for p in parts)


def test_stream_flush_reports_dangling_bytes(gemma_tok: Tokenizer) -> None:
    ids = gemma_tok.encode(_byte_fallback_char(gemma_tok), add_bos=False)
    dec = gemma_tok.stream_decoder()
    assert [dec.feed(t) for t in ids[:2]] == ["", ""]
    assert dec.flush() == "\ufffd"
    assert dec.feed(ids[0]) == ""  # a fresh stream after flush


def test_stream_drops_space_after_bos_like_decode(gemma_tok: Tokenizer) -> None:
    ids = gemma_tok.encode(" Hello world")
    assert ids[0] == gemma_tok.bos_id
    assert "".join(_stream(gemma_tok, ids)) == gemma_tok.decode(ids) == "Hello world"


@pytest.mark.parametrize("model", ["smollm", "gemma"])
def test_stream_equals_decode_on_corpus(request: pytest.FixtureRequest, model: str) -> None:
    tok = _tok(request, model)
    for text in STRINGS:
        ids = tok.encode(text, special=True)
        for special in (False, True):
            assert "".join(_stream(tok, ids, special)) == tok.decode(ids, special=special), text


# ----------------------------------------------------------------------------- synthetic vocabs


def _toy_bpe(**kwargs: Any) -> Tokenizer:
    byte_chars = [bytes_to_unicode()[b] for b in range(256)]
    words = [
        "he",
        "ll",
        "hell",
        "hello",
        "Ġw",
        "or",
        "Ġwor",
        "ld",
        "Ġworld",
        "<|im_start|>",
        "<|im_end|>",
    ]
    merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld"]
    types = [1] * (256 + len(words) - 2) + [3, 3]
    return Tokenizer.from_metadata(
        byte_chars + words, model="gpt2", token_types=types, merges=merges, pre="gpt-2", **kwargs
    )


def _toy_spm(**kwargs: Any) -> Tokenizer:
    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    words = {"▁": -1.0, "h": -2, "e": -2, "l": -2, "o": -2, "he": -3, "ll": -3, "hell": -4}
    words |= {"hello": -4.5, "▁hello": -5}
    types = [2, 3, 3] + [6] * 256 + [1] * len(words)
    return Tokenizer.from_metadata(
        pieces + list(words), model="llama", token_types=types,
        scores=[0.0] * 259 + list(words.values()), **kwargs,
    )  # fmt: skip


def test_toy_byte_level_bpe() -> None:
    tok = _toy_bpe()
    ids = tok.encode("hello world")
    assert [tok.token_text(i) for i in ids] == ["hello", "Ġworld"]
    assert tok.decode(ids) == "hello world"
    assert tok.encode("é") == [0xC3, 0xA9]  # the two byte tokens (ids 0..255 are the bytes)
    assert tok.encode("<|im_start|>hi", special=True)[0] == tok.n_vocab - 2
    assert tok.encode("<|im_start|>", special=False) != [tok.n_vocab - 2]
    assert tok.eot_ids == {11, tok.n_vocab - 1}  # default EOS id 11 + <|im_end|> by text
    assert not tok.add_bos and tok.encode("he", add_bos=True) == tok.encode("he", add_bos=False)


def test_toy_sentencepiece() -> None:
    tok = _toy_spm()
    ids = tok.encode("hello")
    assert ids[0] == 1 and [tok.token_text(i) for i in ids[1:]] == ["▁hello"]  # BOS + prefix space
    assert tok.decode(ids) == "hello"  # leading space after BOS is dropped
    assert [tok.token_text(i) for i in tok.encode("hé", add_bos=False)] == [
        "▁",
        "h",
        "<0xC3>",
        "<0xA9>",
    ]
    assert _toy_spm(add_space_prefix=False, add_bos=False).encode("hello") == [tok.n_vocab - 2]


def test_toy_strip_rules_and_errors() -> None:
    tok = _toy_bpe(model_name="Phi-3 mini")  # phi-3: special tokens eat following whitespace
    assert tok.encode("<|im_end|>  he", special=True) == [tok.n_vocab - 1, 256 + 0]
    with pytest.raises(ModelFormatError, match="pre"):
        Tokenizer.from_metadata(["a"], model="gpt2", merges=[], pre="no-such-pre")
    with pytest.raises(ModelFormatError, match="model"):
        Tokenizer.from_metadata(["a"], model="wordpiece")
    with pytest.raises(ModelFormatError, match="merges"):
        Tokenizer.from_metadata(["a"], model="gpt2")
    with pytest.raises(ValueError, match="out of range"):
        _toy_spm().decode([10**6])


def test_merge_tie_break_and_heap_equivalence() -> None:
    assert merge(list("aaa"), {("a", "a"): 0}, joined=False) == ["aa", "a"]
    assert merge(list("aaa"), {"aa": -1.0}, joined=True) == ["aa", "a"]
    rng = random.Random(0)
    ranks: dict[tuple[str, str], int] = {}
    for _ in range(200):
        pair = tuple("".join(rng.choice("abc") for _ in range(rng.randint(1, 3))) for _ in range(2))
        ranks.setdefault(pair, rng.randint(0, 30))  # type: ignore[arg-type]
    for _ in range(500):
        word = [rng.choice("abc") for _ in range(rng.randint(2, 90))]
        assert _merge_rescan(list(word), ranks, False) == _merge_heap(word, ranks, False)


# ----------------------------------------------------------------------------- golden regeneration


def _clone_gguf(src: str, dst: str, meta_overrides: dict[str, Any]) -> None:
    """Vocab-only copy of `src` with tokenizer keys changed (None drops a key)."""
    from gguf import GGUFValueType, GGUFWriter

    from hybridllm.gguf_file import open_reader

    keys = {"pre": "tokenizer.ggml.pre", "add_bos": "tokenizer.ggml.add_bos_token",
            "add_space_prefix": "tokenizer.ggml.add_space_prefix",
            "bos_id": "tokenizer.ggml.bos_token_id"}  # fmt: skip
    changed = {keys[k]: v for k, v in meta_overrides.items() if k in keys}
    reader = open_reader(src)
    appended = {
        "tokenizer.ggml.tokens": meta_overrides.get("extra_tokens", []),
        "tokenizer.ggml.token_type": [1] * len(meta_overrides.get("extra_tokens", [])),
        "tokenizer.ggml.merges": meta_overrides.get("extra_merges", []),
    }
    writer = GGUFWriter(dst, reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in changed:
            continue
        kind = field.types[0]
        if kind == GGUFValueType.ARRAY:
            values = field.contents() + appended.get(key, [])
            writer.add_key_value(key, values, kind, sub_type=field.types[-1])
        else:
            writer.add_key_value(key, field.contents(), kind)
    for key, value in changed.items():
        if value is not None:
            kind = {str: GGUFValueType.STRING, bool: GGUFValueType.BOOL}.get(
                type(value), GGUFValueType.UINT32
            )
            writer.add_key_value(key, value, kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()


def _regen(smollm: str, gemma: str) -> None:
    import tempfile

    import llama_cpp  # noqa: F401  (the oracle must be there)

    models: dict[str, Any] = {}
    for name, path in (("smollm", smollm), ("gemma", gemma)):
        tok, llm = Tokenizer.from_gguf(path), _llama(path)
        ids = [
            [llm.tokenize(s.encode(), add_bos=a, special=sp) for a, sp in COMBOS] for s in STRINGS
        ]
        text = [
            [llama_cpp_detokenize(llm, i[1], r).decode("utf-8", "replace") for r in (False, True)]
            for i in ids
        ]
        models[name] = {"vocab_sha256": vocab_sha(tok), "ids": ids, "text": text}
    with tempfile.TemporaryDirectory() as tmp:
        for variant, (base, overrides) in VARIANTS.items():
            dst = str(Path(tmp) / "variant.gguf")
            _clone_gguf(smollm if base == "smollm" else gemma, dst, overrides)
            tok, llm = Tokenizer.from_gguf(dst), _llama(dst)
            ids = [
                [llm.tokenize(s.encode(), add_bos=a, special=sp) for a, sp in VARIANT_COMBOS]
                for s in STRINGS
            ]
            models[variant] = {"vocab_sha256": vocab_sha(tok), "ids": ids}
    _write_corpus(STRINGS, models)


def _write_corpus(strings: list[str], models: dict[str, Any]) -> None:
    """One string / one golden row per line, so diffs stay readable."""
    lines = ['{"strings": [']
    lines += [json.dumps(s) + "," for s in strings]
    lines[-1] = lines[-1].rstrip(",")
    lines.append('], "models": {')
    for n, (name, entry) in enumerate(models.items()):
        lines.append(f'{json.dumps(name)}: {{"vocab_sha256": "{entry["vocab_sha256"]}",')
        for field in ("ids", "text"):
            if field in entry:
                rows = [json.dumps(r, separators=(",", ":")) for r in entry[field]]
                lines.append(f'"{field}": [' + ",\n".join(rows) + "],")
        lines[-1] = lines[-1].rstrip(",")
        lines.append("}" + ("," if n < len(models) - 1 else ""))
    lines.append("}}")
    CORPUS_PATH.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    if sys.argv[1:2] != ["--regen"]:
        sys.exit("usage: python tests/test_tokenizer.py --regen [SMOLLM.gguf GEMMA.gguf]")
    from hybridllm import catalog

    paths = sys.argv[2:4] or [str(catalog.entry(n).path) for n in ("smollm2-135m", "gemma3-270m")]
    _regen(*paths)
