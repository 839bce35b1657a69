"""Tokenizer for GGUF models: the `gpt2` (byte-level BPE) and `llama` (SentencePiece BPE) kinds.

Goal: the same ids as llama.cpp (`llama_tokenize`) and the same text as llama-cpp-python's
`Llama.detokenize`, built from GGUF metadata alone. The pipeline mirrors llama.cpp:

1. split special tokens out of the text (user-defined ones always; control ones only with
   `special=True`), see vocab.SpecialSplitter;
2. `gpt2`: pre-tokenize each raw fragment with the regexes of `tokenizer.ggml.pre`, map the
   UTF-8 bytes of each piece to GPT-2's printable byte alphabet and merge by merge rank;
   `llama`: turn spaces into U+2581 (with an optional leading one) and merge characters by
   the score of the token they form, falling back to <0xNN> byte tokens;
3. add BOS/EOS only when the model asks for them.

Encoding results are cached per pre-token (an LRU), which is what makes pure Python fast
enough: natural text repeats its words.
"""

from __future__ import annotations

import codecs
import os
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Any

import numpy as np

from ..errors import ModelFormatError
from .merge import bytes_to_unicode, merge
from .pretok import PreTokenizer, resolve_pre
from .vocab import (
    Attr,
    SpecialSplitter,
    apply_strip_rules,
    attrs_from_types,
    eog_ids,
    resolve_roles,
)

__all__ = ["IncrementalDecoder", "Tokenizer", "gguf_tokenizer_metadata"]

_SPACE = "\u2581"  # SentencePiece's visible space
_CACHE_WORDS = 1 << 16
_KINDS = ("gpt2", "llama")
# llama.cpp's ids when the GGUF names none, per tokenizer kind.
_DEFAULT_IDS = {"llama": {"bos": 1, "eos": 2, "unk": 0}, "gpt2": {"bos": 11, "eos": 11}}
_ROLE_KEYS = {
    "bos": "bos_token_id", "eos": "eos_token_id", "eot": "eot_token_id", "eom": "eom_token_id",
    "unk": "unknown_token_id", "sep": "seperator_token_id", "pad": "padding_token_id",
    "fim_pre": "fim_pre_token_id", "fim_suf": "fim_suf_token_id", "fim_mid": "fim_mid_token_id",
    "fim_pad": "fim_pad_token_id", "fim_rep": "fim_rep_token_id", "fim_sep": "fim_sep_token_id",
}  # fmt: skip


class Tokenizer:
    """Encode text to token ids and back, exactly as llama.cpp does for the same GGUF vocab.

    Build one with `from_gguf` (a path or an open `gguf.GGUFReader`) or `from_metadata`
    (plain Python values). `decode` renders control tokens (BOS, `<|im_end|>`, ...) as nothing
    unless `special=True`, and drops one leading space after a leading BOS, like
    llama-cpp-python's `Llama.detokenize`.
    """

    def __init__(
        self,
        *,
        tokens: Sequence[str],
        attrs: list[int],
        scores: Sequence[float] | None,
        merges: Sequence[str] | None,
        model: str,
        pre: str | None,
        ids: dict[str, int | None],
        flags: dict[str, bool],
        model_name: str = "",
    ) -> None:
        self.model = model
        self.pre = pre or "default"
        self._texts = list(tokens)
        self._attrs = attrs
        self._token_to_id = {t: i for i, t in enumerate(self._texts)}  # last duplicate wins
        resolve_roles(ids, self._token_to_id, attrs)
        self.eot_ids: frozenset[int] = frozenset(eog_ids(ids, self._token_to_id, attrs))
        apply_strip_rules(model_name, self.pre, self._token_to_id, attrs)
        self._ids = ids
        self.add_bos: bool = flags["add_bos"]
        self.add_eos: bool = flags["add_eos"]
        self.add_space_prefix: bool = flags["add_space_prefix"]
        self._special = SpecialSplitter(self._texts, attrs)
        self._byte_map = bytes_to_unicode()
        if model == "gpt2":
            self._init_bpe(merges, flags["ignore_merges"])
        else:
            self._init_spm(scores)
        self._pieces = [self._render(i) for i in range(len(self._texts))]
        hidden = Attr.CONTROL | Attr.UNKNOWN
        self._hidden = bytes(bool(a & hidden) for a in attrs)

    # ----------------------------------------------------------------- constructors

    @classmethod
    def from_metadata(
        cls,
        tokens: Sequence[str],
        *,
        model: str = "gpt2",
        token_types: Sequence[int] | None = None,
        scores: Sequence[float] | None = None,
        merges: Sequence[str] | None = None,
        pre: str | None = None,
        bos_id: int | None = None,
        eos_id: int | None = None,
        unk_id: int | None = None,
        pad_id: int | None = None,
        eot_id: int | None = None,
        eom_id: int | None = None,
        add_bos: bool | None = None,
        add_eos: bool | None = None,
        add_space_prefix: bool | None = None,
        model_name: str = "",
        extra_ids: dict[str, int] | None = None,
    ) -> Tokenizer:
        """Build from plain values named like the GGUF `tokenizer.ggml.*` keys.

        `model` is "gpt2" (needs `merges`) or "llama" (needs `scores`). Ids and flags left
        as None take llama.cpp's defaults for that model kind and pre-tokenizer.
        `extra_ids` may name sep / fim_pre / fim_suf / fim_mid / fim_pad / fim_rep / fim_sep ids.
        """
        if model not in _KINDS:
            raise ModelFormatError(
                f"unsupported tokenizer.ggml.model {model!r}; supported: gpt2, llama"
            )
        n = len(tokens)
        if n == 0:
            raise ModelFormatError("tokenizer.ggml.tokens is empty")
        if token_types is not None and len(token_types) < n:
            raise ModelFormatError(
                f"tokenizer.ggml.token_type has {len(token_types)} entries for {n} tokens"
            )
        texts = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        given = {
            "bos": bos_id,
            "eos": eos_id,
            "unk": unk_id,
            "pad": pad_id,
            "eot": eot_id,
            "eom": eom_id,
        }
        given.update(extra_ids or {})
        ids = _role_ids(model, pre, n, given)
        flags = _flags(model, pre, add_bos, add_eos, add_space_prefix)
        return cls(
            tokens=texts, attrs=attrs_from_types(token_types, n), scores=scores, merges=merges,
            model=model, pre=pre, ids=ids, flags=flags, model_name=model_name,
        )  # fmt: skip

    @classmethod
    def from_gguf(cls, source: str | os.PathLike[str] | Any) -> Tokenizer:
        """Build from a GGUF file path or an already open `gguf.GGUFReader`.

        A vocabulary we cannot reproduce (an unknown `tokenizer.ggml.pre`, a missing array)
        raises ModelFormatError naming the file."""
        try:
            return cls.from_metadata(**gguf_tokenizer_metadata(source))
        except ModelFormatError as exc:
            where = _file_name(source)
            if where and not str(exc).startswith(where):
                raise ModelFormatError(f"{where}: {exc}") from None
            raise

    # ----------------------------------------------------------------- properties

    @property
    def n_vocab(self) -> int:
        """Number of tokens in the vocabulary."""
        return len(self._texts)

    @property
    def bos_id(self) -> int | None:
        """Beginning-of-sequence id (None when the vocab has none)."""
        return self._ids.get("bos")

    @property
    def eos_id(self) -> int | None:
        """End-of-sequence id (None when the vocab has none)."""
        return self._ids.get("eos")

    @property
    def eot_id(self) -> int | None:
        """End-of-turn id (`<|im_end|>`, `<end_of_turn>`, ...), None when there is none."""
        return self._ids.get("eot")

    @property
    def unk_id(self) -> int | None:
        """Unknown-token id, None when there is none."""
        return self._ids.get("unk")

    @property
    def pad_id(self) -> int | None:
        """Padding id, None when there is none."""
        return self._ids.get("pad")

    def is_control(self, token_id: int) -> bool:
        """True for control tokens (BOS, EOS, `<|im_start|>`, ...), as llama_vocab_is_control."""
        return bool(self._attrs[self._check(token_id)] & Attr.CONTROL)

    def is_eog(self, token_id: int) -> bool:
        """True when generating `token_id` ends generation (llama_vocab_is_eog)."""
        return token_id in self.eot_ids

    def token_text(self, token_id: int) -> str:
        """The raw vocabulary entry (e.g. 'Ġhello' or '▁hello')."""
        return self._texts[self._check(token_id)]

    # ----------------------------------------------------------------- encode

    def encode(self, text: str, add_bos: bool = True, special: bool = False) -> list[int]:
        """Token ids of `text`, identical to llama.cpp's `llama_tokenize(text, add_bos, special)`.

        `add_bos` is llama.cpp's add_special: BOS (and EOS) are added only if the model's
        `tokenizer.ggml.add_bos_token` / `add_eos_token` (or the per-kind default) asks for
        them. `special=True` turns control-token texts such as `<|im_start|>` into their ids;
        user-defined tokens (Gemma's `<b>`, runs of spaces or newlines) are always matched.
        """
        out: list[int] = []
        if add_bos and self.add_bos:
            out.append(self._required("bos"))
        fragments = self._special.split(text, special)
        if self.model == "gpt2":
            self._encode_bpe(fragments, out)
        else:
            self._encode_spm(fragments, out)
        if add_bos and self.add_eos:
            out.append(self._required("eos"))
        return out

    def _required(self, role: str) -> int:
        tid = self._ids.get(role)
        if tid is None:
            raise ModelFormatError(f"the model asks for a {role.upper()} token but defines none")
        return tid

    # --- gpt2: byte-level BPE

    def _init_bpe(self, merges: Sequence[str] | None, ignore_merges: bool) -> None:
        if merges is None:
            raise ModelFormatError("a gpt2 tokenizer needs tokenizer.ggml.merges")
        self._ranks: dict[tuple[str, str], float] = {}
        for rank, line in enumerate(merges):
            # llama.cpp splits at the first space after position 0, so a pair may start with one
            cut = line.find(" ", 1)
            pair = (line[:cut], line[cut + 1 :]) if cut >= 0 else ("", "")
            self._ranks.setdefault(pair, rank)
        self._ignore_merges = ignore_merges
        self._pretok = PreTokenizer(resolve_pre(self.pre).regexes)
        self._byte_table = str.maketrans({chr(b): c for b, c in self._byte_map.items()})
        self._bpe_word = lru_cache(maxsize=_CACHE_WORDS)(self._bpe_word_uncached)

    def _encode_bpe(self, fragments: list[str | int], out: list[int]) -> None:
        word = self._bpe_word
        for frag in fragments:
            if isinstance(frag, int):
                out.append(frag)
                continue
            for piece in self._pretok.split(frag):
                out.extend(word(piece))

    def _bpe_word_uncached(self, piece: str) -> tuple[int, ...]:
        mapped = (
            piece.encode("utf-8", "surrogatepass").decode("latin-1").translate(self._byte_table)
        )
        t2i = self._token_to_id
        if self._ignore_merges and mapped in t2i:
            return (t2i[mapped],)
        symbols = merge(list(mapped), self._ranks, joined=False)
        out: list[int] = []
        for sym in symbols:
            tid = t2i.get(sym)
            if tid is not None:
                out.append(tid)
                continue
            # llama.cpp then looks up each UTF-8 byte of the symbol alone and skips misses
            for b in sym.encode("utf-8"):
                tid = t2i.get(bytes([b]).decode("utf-8", "surrogateescape"))
                if tid is not None:
                    out.append(tid)
        return tuple(out)

    # --- llama: SentencePiece BPE over scores

    def _init_spm(self, scores: Sequence[float] | None) -> None:
        if scores is None:
            scores = [0.0] * len(self._texts)
        elif len(scores) < len(self._texts):
            raise ModelFormatError(
                f"tokenizer.ggml.scores has {len(scores)} entries for {len(self._texts)} tokens"
            )
        # any vocab entry (control tokens included) can be formed, with priority -score;
        # built from token_to_id so duplicate texts resolve to the same id as llama.cpp
        self._merge_prio = {t: -float(scores[i]) for t, i in self._token_to_id.items()}
        self._byte_ids = [self._byte_token(b) for b in range(256)]
        self._spm_words = _SpmWordSplitter(self._texts)
        self._spm_word = lru_cache(maxsize=_CACHE_WORDS)(self._spm_word_uncached)

    def _byte_token(self, b: int) -> int | None:
        tid = self._token_to_id.get(f"<0x{b:02X}>")
        if tid is None:
            tid = self._token_to_id.get(bytes([b]).decode("utf-8", "surrogateescape"))
        return tid if tid is not None else self._ids.get("unk")

    def _encode_spm(self, fragments: list[str | int], out: list[int]) -> None:
        prev_special = True  # llama.cpp prefixes a space to the first text and after specials
        word = self._spm_word
        for frag in fragments:
            if isinstance(frag, int):
                out.append(frag)
                prev_special = True
                continue
            if self.add_space_prefix and prev_special:
                frag = " " + frag
            for piece in self._spm_words.split(frag.replace(" ", _SPACE)):
                out.extend(word(piece))
            prev_special = False

    def _spm_word_uncached(self, piece: str) -> tuple[int, ...]:
        t2i = self._token_to_id
        out: list[int] = []
        for sym in merge(list(piece), self._merge_prio, joined=True):
            tid = t2i.get(sym)
            if tid is not None:
                out.append(tid)
                continue
            for b in sym.encode("utf-8", "surrogatepass"):
                byte_id = self._byte_ids[b]
                if byte_id is None:
                    raise ModelFormatError(
                        f"vocab has no byte token <0x{b:02X}> and no unknown token"
                    )
                out.append(byte_id)
        return tuple(out)

    # ----------------------------------------------------------------- decode

    def _check(self, token_id: int) -> int:
        if not 0 <= token_id < len(self._texts):
            raise ValueError(f"token id {token_id} out of range for a vocab of {len(self._texts)}")
        return token_id

    def _render(self, tid: int) -> bytes:
        """Piece bytes of one token with special=True (llama.cpp's token_to_piece cache)."""
        attr, text = self._attrs[tid], self._texts[tid]
        if attr & (Attr.CONTROL | Attr.UNKNOWN | Attr.USER_DEFINED):
            return text.encode("utf-8", "surrogateescape")
        if attr & Attr.NORMAL:
            if self.model == "llama":
                return text.replace(_SPACE, " ").encode("utf-8", "surrogateescape")
            return self._byte_decode(text)
        if attr & Attr.BYTE:
            return bytes([int(text[3:5], 16)])
        return b""  # unused / undefined tokens render as nothing

    def _byte_decode(self, text: str) -> bytes:
        inverse = self._inverse_byte_map()
        out = bytearray()
        for ch in text:
            b = inverse.get(ch)
            if b is not None:
                out.append(b)
            else:  # llama.cpp's marker for a character outside GPT-2's byte alphabet
                hexed = ch.encode("utf-8", "surrogateescape").hex()
                out += f"[UNK_BYTE_0x{hexed}{text}]".encode("utf-8", "surrogateescape")
        return bytes(out)

    def _inverse_byte_map(self) -> dict[str, int]:
        if not hasattr(self, "_inverse"):
            self._inverse = {c: b for b, c in self._byte_map.items()}
        return self._inverse

    def token_to_piece(self, token_id: int, special: bool = False) -> bytes:
        """Bytes of one token; control/unknown tokens give b'' unless `special`."""
        self._check(token_id)
        if not special and self._hidden[token_id]:
            return b""
        return self._pieces[token_id]

    def decode_bytes(self, ids: Iterable[int], special: bool = False) -> bytes:
        """Concatenated piece bytes, without the llama-cpp-python leading-space rule."""
        return b"".join(self.token_to_piece(int(i), special) for i in ids)

    def decode(self, ids: Iterable[int], special: bool = False, errors: str = "replace") -> str:
        """Text of `ids`, as `Llama.detokenize(ids, special=special).decode('utf-8', errors)`.

        Control tokens render as '' unless `special=True`; user-defined tokens always render
        as their text. If the first id is BOS, one leading space is dropped (llama-cpp-python
        strips the space SentencePiece models put in front of the first word).
        Unlike llama-cpp-python, pieces longer than 32 bytes are kept (it drops them).
        """
        ids = list(ids)
        data = self.decode_bytes(ids, special)
        if ids and ids[0] == self.bos_id and data[:1] == b" ":
            data = data[1:]
        return data.decode("utf-8", errors)

    def stream_decoder(self, special: bool = False, errors: str = "replace") -> IncrementalDecoder:
        """An IncrementalDecoder for streaming generated ids out as text."""
        return IncrementalDecoder(self, special=special, errors=errors)


class IncrementalDecoder:
    """Turns ids into text one at a time without ever emitting half a UTF-8 character.

    Bytes of an incomplete character (e.g. an emoji spread over several <0xNN> byte tokens)
    are held back until the character completes; `flush()` releases whatever is left (as
    U+FFFD under errors='replace'). The concatenation of all `feed` results and `flush()`
    equals `tokenizer.decode(all_ids)`.
    """

    def __init__(
        self, tokenizer: Tokenizer, special: bool = False, errors: str = "replace"
    ) -> None:
        self._tok = tokenizer
        self._special = special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors)
        self._first = True
        self._strip_space = False

    def feed(self, token_id: int) -> str:
        """Text completed by `token_id` ('' while a character is still incomplete)."""
        if self._first:
            self._first = False
            self._strip_space = token_id == self._tok.bos_id
        data = self._tok.token_to_piece(token_id, self._special)
        if self._strip_space and data:
            # decode() drops one leading space after a leading BOS; only the first bytes count
            self._strip_space = False
            if data[:1] == b" ":
                data = data[1:]
        return self._utf8.decode(data)

    def flush(self) -> str:
        """Emit what is still buffered and reset for a new stream."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        self._first = True
        self._strip_space = False
        return text


class _SpmWordSplitter:
    """Cuts escaped SentencePiece text into independently mergeable words.

    The SentencePiece merge runs over a whole fragment, but a merge can only join two symbols
    whose concatenation is a vocab entry. We cut before each U+2581 that follows another
    character; that is exact as long as no vocab entry spans such a cut. The few entries that
    do (Gemma-3 has one: '>▁</') are searched for, and cuts inside their occurrences are undone.
    """

    _MAX_CROSSING = 2000  # beyond this, scanning for them costs more than it saves

    def __init__(self, texts: Sequence[str]) -> None:
        import re

        self._words = re.compile(f"{_SPACE}*[^{_SPACE}]*").findall
        crossing = [t for t in texts if _crosses_cut(t)]
        self._whole = len(crossing) > self._MAX_CROSSING
        self._crossing = None
        if crossing and not self._whole:
            alternation = "|".join(re.escape(t) for t in sorted(crossing, key=len, reverse=True))
            self._crossing = re.compile(alternation)

    def split(self, text: str) -> list[str]:
        if self._whole:
            return [text] if text else []
        words = [w for w in self._words(text) if w]
        if self._crossing is None or self._crossing.search(text) is None:
            return words
        return self._rejoin(text, words)

    def _rejoin(self, text: str, words: list[str]) -> list[str]:
        blocked: set[int] = set()
        pos = 0
        assert self._crossing is not None
        while (m := self._crossing.search(text, pos)) is not None:
            blocked.update(range(m.start() + 1, m.end()))
            pos = m.start() + 1
        out: list[str] = []
        at = 0
        for w in words:
            if out and at in blocked:
                out[-1] += w
            else:
                out.append(w)
            at += len(w)
        return out


def _crosses_cut(text: str) -> bool:
    """True if `text` contains U+2581 right after a different character (a word cut)."""
    i = text.find(_SPACE, 1)
    while i > 0:
        if text[i - 1] != _SPACE:
            return True
        i = text.find(_SPACE, i + 1)
    return False


def _role_ids(
    model: str, pre: str | None, n: int, given: dict[str, int | None]
) -> dict[str, int | None]:
    """Special ids: the given ones where valid, else llama.cpp's per-kind defaults."""
    defaults = dict(_DEFAULT_IDS[model])
    if model == "gpt2" and not resolve_pre(pre).default_bos:
        del defaults["bos"]
    ids: dict[str, int | None] = {}
    for role, default in defaults.items():
        ids[role] = default if default < n else None
    for role, tid in given.items():
        if tid is not None and 0 <= int(tid) < n:
            ids[role] = int(tid)
        else:
            ids.setdefault(role, None)
    return ids


def _flags(
    model: str,
    pre: str | None,
    add_bos: bool | None,
    add_eos: bool | None,
    add_space_prefix: bool | None,
) -> dict[str, bool]:
    """add_bos / add_eos / add_space_prefix / ignore_merges with llama.cpp's defaults filled in."""
    if model == "llama":
        defaults = {
            "add_bos": True,
            "add_eos": False,
            "add_space_prefix": True,
            "ignore_merges": False,
        }
    else:
        spec = resolve_pre(pre)
        defaults = {
            "add_bos": spec.add_bos, "add_eos": False, "add_space_prefix": False,
            "ignore_merges": spec.ignore_merges,
        }  # fmt: skip
    given = {"add_bos": add_bos, "add_eos": add_eos, "add_space_prefix": add_space_prefix}
    return {k: bool(given[k]) if given.get(k) is not None else v for k, v in defaults.items()}


def gguf_tokenizer_metadata(source: str | os.PathLike[str] | Any) -> dict[str, Any]:
    """The `Tokenizer.from_metadata` keyword arguments stored in a GGUF (path or open reader)."""
    reader = source
    if isinstance(source, (str, os.PathLike)):
        from ..gguf_file import open_reader  # bounded, and bulk-reads the 262k-entry arrays

        reader = open_reader(source)
    meta = _GGUFMeta(reader)
    model = meta.scalar("tokenizer.ggml.model")
    if model is None:
        raise ModelFormatError("GGUF has no tokenizer.ggml.model key")
    tokens = meta.strings("tokenizer.ggml.tokens")
    if tokens is None:
        raise ModelFormatError("GGUF has no tokenizer.ggml.tokens array")
    ids = {role: meta.scalar(f"tokenizer.ggml.{key}") for role, key in _ROLE_KEYS.items()}
    named = {f"{role}_id": ids.pop(role) for role in ("bos", "eos", "unk", "pad", "eot", "eom")}
    return {
        "tokens": tokens,
        "model": model,
        "token_types": meta.numbers("tokenizer.ggml.token_type"),
        "scores": meta.numbers("tokenizer.ggml.scores"),
        "merges": meta.strings("tokenizer.ggml.merges"),
        "pre": meta.scalar("tokenizer.ggml.pre"),
        **named,
        "add_bos": meta.scalar("tokenizer.ggml.add_bos_token"),
        "add_eos": meta.scalar("tokenizer.ggml.add_eos_token"),
        "add_space_prefix": meta.scalar("tokenizer.ggml.add_space_prefix"),
        "model_name": meta.scalar("general.name") or "",
        "extra_ids": {k: v for k, v in ids.items() if v is not None},
    }


def _file_name(source: str | os.PathLike[str] | Any) -> str:
    """The path of a GGUF given as a path or an open reader ('' when unknown)."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return str(getattr(getattr(source, "data", None), "filename", "") or "")


class _GGUFMeta:
    """Typed access to the few GGUF metadata fields the tokenizer reads."""

    def __init__(self, reader: Any) -> None:
        self._fields = reader.fields

    def scalar(self, key: str) -> Any:
        field = self._fields.get(key)
        if field is None:
            return None
        try:
            return field.contents()
        except (ValueError, UnicodeDecodeError) as exc:
            raise ModelFormatError(f"GGUF key {key} is malformed: {exc}") from exc

    def strings(self, key: str) -> list[str] | None:
        field = self._fields.get(key)
        if field is None:
            return None
        # surrogateescape keeps a non-UTF-8 entry byte-exact instead of failing the whole load
        return [field.parts[i].tobytes().decode("utf-8", "surrogateescape") for i in field.data]

    def numbers(self, key: str) -> list[Any] | None:
        field = self._fields.get(key)
        if field is None:
            return None
        if not field.data:
            return []
        return np.concatenate([field.parts[i] for i in field.data]).tolist()
