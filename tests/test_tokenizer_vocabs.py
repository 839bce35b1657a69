"""Pre-tokenizers against llama.cpp: its own tokenizer tests, and llama.cpp itself on our corpus.

1. llama.cpp's vocab-only GGUFs (models/ggml-vocab-*.gguf, the `llama_vocab_dir` fixture) with
   their .inp/.out cases: our ids equal the .out ids for every case of every vocab whose
   tokenizer we support (tokenized as llama.cpp's test-tokenizer-0 does: no BOS/EOS, specials
   as text), and decoding gives the text back.
2. The same vocabs through llama-cpp-python (`Llama(vocab_only=True)`) on our corpus
   (tests/data/tokenizer_corpus.json): the ids of every BOS/special combination, and the text.
3. Every `tokenizer.ggml.pre` name we accept, set on a BPE vocab that can merge every adjacent
   pair (so pre-token boundaries show in the ids): the ids llama.cpp gives on the corpus. This
   checks our name -> regexes table against llama.cpp's own mapping, offline.
4. A pre-tokenizer we do not implement is refused at load, naming the type and the file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from llama_vocabs import read_cases
from test_tokenizer import COMBOS, STRINGS, _clone_gguf, llama_cpp_detokenize

from hybridllm.errors import ModelFormatError
from hybridllm.gguf_file import open_reader
from hybridllm.tokenizer import Tokenizer
from hybridllm.tokenizer.merge import bytes_to_unicode
from hybridllm.tokenizer.pretok import PRE_TOKENIZERS

# llama.cpp's test vocabs whose tokenizer we implement: byte-level BPE ("gpt2") by pre-tokenizer,
# and SentencePiece ("llama": llama-spm is Llama 2, phi-3 is Phi-3/3.5)
SUPPORTED_VOCABS = [
    "llama-bpe", "qwen2", "qwen35", "phi-3", "llama-spm", "refact", "starcoder", "gpt-2", "mpt",
    "falcon", "deepseek-llm", "deepseek-coder", "command-r",
]  # fmt: skip
# The rest of llama.cpp's vocabs with test cases, and the tokenizer model that has us refuse them
UNSUPPORTED_VOCABS = {"bert-bge": "bert", "gemma-4": "gemma4"}


def _vocab(folder: Path, name: str) -> Path:
    return folder / f"ggml-vocab-{name}.gguf"


def _llama(path: Path | str) -> Any:
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


@pytest.fixture(scope="module")
def vocab_tokenizers(llama_vocab_dir: Path) -> dict[str, Tokenizer]:
    return {name: Tokenizer.from_gguf(_vocab(llama_vocab_dir, name)) for name in SUPPORTED_VOCABS}


def test_every_vocab_with_cases_is_covered(llama_vocab_dir: Path) -> None:
    """A new ggml-vocab-*.inp upstream is either tested or knowingly refused, never ignored."""
    with_cases = {
        p.name[len("ggml-vocab-") : -len(".gguf.inp")] for p in llama_vocab_dir.glob("*.inp")
    }
    assert with_cases == set(SUPPORTED_VOCABS) | set(UNSUPPORTED_VOCABS)


@pytest.mark.parametrize("name", SUPPORTED_VOCABS)
def test_llama_cpp_cases(
    llama_vocab_dir: Path, vocab_tokenizers: dict[str, Tokenizer], name: str
) -> None:
    tok = vocab_tokenizers[name]
    cases = read_cases(_vocab(llama_vocab_dir, name))
    assert len(cases) >= 40
    wrong = [(text, want) for text, want in cases if tok.encode(text, add_bos=False) != want]
    assert not wrong, wrong[:3]
    # SentencePiece puts a space before any text (no BOS here to drop it after)
    prefix = " " if tok.add_space_prefix else ""
    for text, want in cases:
        assert tok.decode(want) == (prefix + text if text else ""), text


@pytest.mark.parametrize("name", sorted(UNSUPPORTED_VOCABS))
def test_unsupported_vocab_refused(llama_vocab_dir: Path, name: str) -> None:
    path = _vocab(llama_vocab_dir, name)
    with pytest.raises(ModelFormatError) as info:
        Tokenizer.from_gguf(path)
    message = str(info.value)
    assert str(path) in message and repr(UNSUPPORTED_VOCABS[name]) in message


@pytest.mark.parametrize("name", SUPPORTED_VOCABS)
def test_corpus_matches_llama_cpp(
    llama_vocab_dir: Path, vocab_tokenizers: dict[str, Tokenizer], name: str
) -> None:
    import llama_cpp

    tok, llm = vocab_tokenizers[name], _llama(_vocab(llama_vocab_dir, name))
    assert (tok.bos_id, tok.eos_id) == tuple(
        None if t < 0 else t for t in (llm.token_bos(), llm.token_eos())
    )
    vocab = llm._model.vocab  # end-of-generation set and control tokens (rendered as nothing)
    assert set(tok.eot_ids) == {
        i for i in range(tok.n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, i)
    }
    assert [tok.is_control(i) for i in range(tok.n_vocab)] == [
        llama_cpp.llama_vocab_is_control(vocab, i) for i in range(tok.n_vocab)
    ]
    wrong = []
    for text in STRINGS:
        for add_bos, special in COMBOS:
            want = llm.tokenize(text.encode(), add_bos=add_bos, special=special)
            if tok.encode(text, add_bos=add_bos, special=special) != want:
                wrong.append((text, add_bos, special))
                continue
            for render in (False, True):
                expected = llama_cpp_detokenize(llm, want, render).decode("utf-8", "replace")
                if tok.decode(want, special=render) != expected:
                    wrong.append((text, add_bos, special, "decode", render))
    assert not wrong, wrong[:3]


def _llama_cpp_add_bos(llm: Any) -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_vocab_get_add_bos(llm._model.vocab))


SWEEP_STRINGS = [*STRINGS, "they'rexwriting it'sokay I'dx'llama MixedCaseWords éCOLE"]


@pytest.fixture(scope="module")
def bigram_vocab() -> dict[str, Any]:
    """A byte-level BPE vocab: the 256 byte symbols, then one merge for every adjacent pair of
    byte symbols in SWEEP_STRINGS, and <|endoftext|> as BOS/EOS. Every pair can merge, so a
    pre-token boundary between two characters shows in the ids as a merge that did not happen
    (a real vocab hides most boundaries: its tokens rarely span them)."""
    byte_symbol = bytes_to_unicode()
    pairs: dict[str, str] = {}
    for text in SWEEP_STRINGS:
        symbols = [byte_symbol[b] for b in text.encode()]
        for left, right in zip(symbols, symbols[1:], strict=False):
            pairs.setdefault(left + right, f"{left} {right}")
    tokens = [byte_symbol[b] for b in range(256)] + list(pairs) + ["<|endoftext|>"]
    types = [1] * (len(tokens) - 1) + [3]  # normal ..., control
    return {"tokens": tokens, "types": types, "merges": list(pairs.values())}


def _write_bpe_vocab(path: Path, vocab: dict[str, Any], pre: str) -> None:
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "gpt2")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    writer.add_token_merges(vocab["merges"])
    writer.add_bos_token_id(len(vocab["tokens"]) - 1)
    writer.add_eos_token_id(len(vocab["tokens"]) - 1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()


@pytest.mark.parametrize("pre", sorted(PRE_TOKENIZERS))
def test_every_pre_name_matches_llama_cpp(
    bigram_vocab: dict[str, Any], tmp_path: Path, pre: str
) -> None:
    """A BPE vocab with tokenizer.ggml.pre=`pre`: ids and BOS handling equal llama.cpp's on the
    corpus (special tokens parsed, BOS added where the type asks for it)."""
    path = tmp_path / "vocab.gguf"
    _write_bpe_vocab(path, bigram_vocab, pre)
    tok, llm = Tokenizer.from_gguf(path), _llama(path)
    assert tok.add_bos == _llama_cpp_add_bos(llm)
    wrong = []
    for text in SWEEP_STRINGS:
        want = llm.tokenize(text.encode(), add_bos=True, special=True)
        if tok.encode(text, add_bos=True, special=True) != want:
            wrong.append(text)
    assert not wrong, wrong[:3]


def test_chatglm_has_no_default_bos(llama_vocab_dir: Path, tmp_path: Path) -> None:
    """chatglm-bpe / glm4 vocabs have no BOS unless the file names one (llama.cpp's loader)."""
    path = tmp_path / "glm.gguf"
    _clone_gguf(str(_vocab(llama_vocab_dir, "gpt-2")), str(path), {"pre": "glm4", "bos_id": None})
    tok, llm = Tokenizer.from_gguf(path), _llama(path)
    assert tok.bos_id is None and llm.token_bos() == -1
    text = "ignore merges: hello world 12345"
    assert tok.encode(text) == llm.tokenize(text.encode(), add_bos=True)


def test_unknown_pre_refused_naming_type_and_file(llama_vocab_dir: Path, tmp_path: Path) -> None:
    from hybridllm.models.tiny import TINY_LLAMA, write_tiny_model

    from hybridllm import Runner

    vocab = tmp_path / "kimi.gguf"
    _clone_gguf(str(_vocab(llama_vocab_dir, "gpt-2")), str(vocab), {"pre": "kimi-k2"})
    for source in (vocab, open_reader(vocab)):
        with pytest.raises(ModelFormatError, match=f"^{re.escape(str(vocab))}: .*'kimi-k2'"):
            Tokenizer.from_gguf(source)
    model = write_tiny_model(tmp_path / "tiny-kimi.gguf", open_reader(vocab), TINY_LLAMA)
    with pytest.raises(ModelFormatError, match=f"^{re.escape(str(model))}: .*pre.*'kimi-k2'"):
        Runner(str(model))
