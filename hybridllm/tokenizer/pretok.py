"""Pre-tokenizers of the GGUF `gpt2` (byte-level BPE) family, chosen by `tokenizer.ggml.pre`.

llama.cpp splits text with a *list* of regexes applied one after the other: the first splits
the text into pieces (matches and the unmatched gaps between them alike), each later regex
splits every piece again, and a piece edge acts as the end of the string for lookaheads. We
do the same with the standard `re` module, spelling \\p{L}, \\p{N}, \\p{P} and \\s out as
explicit classes built from llama.cpp's Unicode 15.1 tables (see unicode.py).
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass

from ..errors import ModelFormatError
from .unicode import LETTER, NUMBER, PUNCTUATION, WHITESPACE


def _parse_ranges(ranges: str) -> list[tuple[int, int]]:
    """'41-5A AA' -> [(0x41, 0x5A), (0xAA, 0xAA)]."""
    out = []
    for item in ranges.split():
        lo, _, hi = item.partition("-")
        out.append((int(lo, 16), int(hi or lo, 16)))
    return out


def _class_body(ranges: list[tuple[int, int]]) -> str:
    """The inside of a regex [...] class for inclusive code point ranges."""
    return "".join(f"\\U{lo:08X}" + (f"-\\U{hi:08X}" if hi > lo else "") for lo, hi in ranges)


# `re` tests a character class containing astral (> U+FFFF) ranges by walking the range list,
# which made the GPT-2 regex ~5x slower. So the classes below hold only BMP ranges plus one
# private-use stand-in each, and text with astral characters is matched on a copy in which
# every astral character is replaced by the stand-in of its category (see `_AstralMap`).
_STAND_IN = {"L": 0xE000, "N": 0xE001, "P": 0xE002}
_OTHER = 0xE003  # an astral character of no class above; also replaces real U+E000..U+E002


def _bmp_class(name: str, ranges: str) -> tuple[str, list[tuple[int, int]]]:
    parsed = _parse_ranges(ranges)
    bmp = [(lo, min(hi, 0xFFFF)) for lo, hi in parsed if lo <= 0xFFFF]
    astral = [(max(lo, 0x10000), hi) for lo, hi in parsed if hi > 0xFFFF]
    stand_in = _STAND_IN[name]
    return _class_body([*bmp, (stand_in, stand_in)]), astral


_L, _L_ASTRAL = _bmp_class("L", LETTER)
_N, _N_ASTRAL = _bmp_class("N", NUMBER)
_P, _P_ASTRAL = _bmp_class("P", PUNCTUATION)
_S = _class_body(_parse_ranges(WHITESPACE))  # no astral whitespace exists


class _AstralMap:
    """Replaces astral characters by same-category BMP stand-ins (length preserving)."""

    def __init__(self) -> None:
        self._find = re.compile("[\\U00010000-\\U0010FFFF\\uE000-\\uE002]")
        table = [
            (r, _STAND_IN[n])
            for n, rs in (("L", _L_ASTRAL), ("N", _N_ASTRAL), ("P", _P_ASTRAL))
            for r in rs
        ]
        table.sort()
        self._starts = [lo for (lo, _), _ in table]
        self._table = table

    def has_any(self, text: str) -> bool:
        return self._find.search(text) is not None

    def apply(self, text: str) -> str:
        return self._find.sub(self._stand_in, text)

    def _stand_in(self, m: re.Match[str]) -> str:
        cp = ord(m.group())
        i = bisect.bisect_right(self._starts, cp) - 1
        if i >= 0:
            (lo, hi), stand_in = self._table[i]
            if lo <= cp <= hi:
                return chr(stand_in)
        return chr(_OTHER)


_ASTRAL = _AstralMap()

# The building blocks, written once so every family below reads like its llama.cpp original.
_CONTRACTIONS = "'s|'t|'re|'ve|'m|'ll|'d"
# llama3/qwen2 match the contractions case-insensitively; only ASCII letters lower to s/t/m/...
_CONTRACTIONS_CI = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_WS_TAIL = f"[{_S}]+(?![^{_S}])|[{_S}]+"

# GPT-2: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
GPT2 = f"{_CONTRACTIONS}| ?[{_L}]+| ?[{_N}]+| ?[^{_S}{_L}{_N}]+|{_WS_TAIL}"


def _llama3_like(digits: str) -> str:
    """The Llama-3 / Qwen2 pattern; they differ only in how many digits form one piece."""
    return (
        f"{_CONTRACTIONS_CI}|[^\\r\\n{_L}{_N}]?[{_L}]+|[{_N}]{digits}"
        f"| ?[^{_S}{_L}{_N}]+[\\r\\n]*|[{_S}]*[\\r\\n]+|{_WS_TAIL}"
    )


LLAMA3 = _llama3_like("{1,3}")
QWEN2 = _llama3_like("")
ONE_DIGIT = f"[{_N}]"
DEFAULT_PUNCT = f"[{_P}$+<=>^~|]+"

# Each family: its regexes in order. A regex that matches every character (GPT2, LLAMA3, QWEN2)
# leaves no gaps, which lets `PreTokenizer` use the faster findall for it.
_FAMILIES: dict[str, tuple[str, ...]] = {
    "default": (DEFAULT_PUNCT, GPT2, f"[{_N}]+", "[0-9][0-9][0-9]"),
    "gpt2": (GPT2,),
    "llama3": (LLAMA3,),
    "qwen2": (QWEN2,),
    # starcoder-style: every digit alone, then GPT-2 (so " 42" becomes " ", "4", "2")
    "smollm": (ONE_DIGIT, GPT2),
}
_TOTAL = {GPT2, LLAMA3, QWEN2}


@dataclass(frozen=True)
class PreTokSpec:
    """What a `tokenizer.ggml.pre` value means: its regex family and two vocab flags."""

    family: str
    ignore_merges: bool = False  # a pre-token that is already a vocab entry skips BPE
    add_bos: bool = False  # llama.cpp's default when tokenizer.ggml.add_bos_token is absent


def _names(family: str, names: str, **flags: bool) -> dict[str, PreTokSpec]:
    return {name: PreTokSpec(family, **flags) for name in names.split()}


# tokenizer.ggml.pre -> spec, as llama.cpp's vocab loader maps them (names it shares a regex with).
PRE_TOKENIZERS: dict[str, PreTokSpec] = {
    **_names("default", "default"),
    **_names(
        "gpt2",
        "gpt-2 phi-2 jina-es jina-de gigachat jina-v2-es jina-v2-de a.x-4.0 mellum modern-bert "
        "jina-v1-en jina-v2-code roberta-bpe exaone4 mpt olmo jais trillion granite-docling",
    ),
    **_names(
        "llama3",
        "llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano",
        ignore_merges=True,
        add_bos=True,
    ),
    **_names("llama3", "dbrx smaug-bpe"),
    **_names("qwen2", "qwen2 deepseek-r1-qwen kormo f2llmv2 megrez stablelm2 hunyuan solar-open"),
    **_names("smollm", "smollm starcoder refact command-r codeshell exaone minerva-7b mellum2"),
}


def resolve_pre(pre: str | None) -> PreTokSpec:
    """Map a `tokenizer.ggml.pre` value (None or '' means llama.cpp's 'default') to its spec."""
    spec = PRE_TOKENIZERS.get(pre or "default")
    if spec is None:
        known = ", ".join(sorted(PRE_TOKENIZERS))
        raise ModelFormatError(f"unsupported tokenizer.ggml.pre {pre!r}; supported: {known}")
    return spec


class PreTokenizer:
    """Splits text into the pieces that BPE then encodes one by one."""

    def __init__(self, family: str) -> None:
        self.family = family
        self._stages = [self._stage(rx) for rx in _FAMILIES[family]]

    @staticmethod
    def _stage(pattern: str):
        if pattern in _TOTAL:
            return re.compile(pattern).findall
        # split() with one capturing group returns gap, match, gap, ...; empty gaps are dropped.
        splitter = re.compile(f"({pattern})").split
        return lambda text: [piece for piece in splitter(text) if piece]

    def split(self, text: str) -> list[str]:
        """Pieces of `text`, in order; they concatenate back to `text`."""
        if not _ASTRAL.has_any(text):
            return self._split(text)
        pieces = self._split(_ASTRAL.apply(text))
        out = []
        pos = 0
        for piece in pieces:  # same lengths, so cut the original text at the same places
            out.append(text[pos : pos + len(piece)])
            pos += len(piece)
        return out

    def _split(self, text: str) -> list[str]:
        pieces = [text] if text else []
        for stage in self._stages:
            if len(pieces) == 1:
                pieces = stage(pieces[0])
            else:
                pieces = [sub for piece in pieces for sub in stage(piece)]
        return pieces
