"""Pre-tokenizers of the GGUF `gpt2` (byte-level BPE) family, chosen by `tokenizer.ggml.pre`.

llama.cpp splits text with a *list* of regexes applied one after the other: the first splits
the text into pieces (matches and the unmatched gaps between them alike), each later regex
splits every piece again, and a piece edge acts as the end of the string for lookaheads.
The lists below are llama.cpp's own (src/llama-vocab.cpp, `llm_tokenizer_bpe`), verbatim.

Four of those regexes (GPT-2, Llama 3, Qwen 2, Qwen 3.5) llama.cpp splits with hand-written
code over its Unicode 15.1 tables; we match them with `re`, spelling \\p{L}, \\p{N}, \\p{P},
\\p{M} and \\s out as explicit classes built from the same tables (see unicode.py). Every other
regex runs on llama.cpp's std::regex path, which stdregex.py reproduces.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import pairwise

from ..errors import ModelFormatError
from .stdregex import StdRegex
from .unicode import ACCENT_MARK, LETTER, NUMBER, PUNCTUATION, WHITESPACE


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
_STAND_IN = {"L": 0xE000, "N": 0xE001, "P": 0xE002, "M": 0xE003}
_OTHER = 0xE004  # an astral character of no class above; also replaces real U+E000..U+E003


def _bmp_class(name: str, ranges: str) -> tuple[str, list[tuple[int, int]]]:
    parsed = _parse_ranges(ranges)
    bmp = [(lo, min(hi, 0xFFFF)) for lo, hi in parsed if lo <= 0xFFFF]
    astral = [(max(lo, 0x10000), hi) for lo, hi in parsed if hi > 0xFFFF]
    stand_in = _STAND_IN[name]
    return _class_body([*bmp, (stand_in, stand_in)]), astral


_L, _L_ASTRAL = _bmp_class("L", LETTER)
_N, _N_ASTRAL = _bmp_class("N", NUMBER)
_P, _P_ASTRAL = _bmp_class("P", PUNCTUATION)
_M, _M_ASTRAL = _bmp_class("M", ACCENT_MARK)
_S = _class_body(_parse_ranges(WHITESPACE))  # no astral whitespace exists


class _AstralMap:
    """Replaces astral characters by same-category BMP stand-ins (length preserving)."""

    def __init__(self) -> None:
        self._find = re.compile("[\\U00010000-\\U0010FFFF\\uE000-\\uE003]")
        table = [
            (r, _STAND_IN[n])
            for n, rs in (("L", _L_ASTRAL), ("N", _N_ASTRAL), ("P", _P_ASTRAL), ("M", _M_ASTRAL))
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
# Qwen 3.5: Qwen 2's pattern with combining marks (\p{M}) joining the letters
QWEN35 = (
    f"{_CONTRACTIONS_CI}|[^\\r\\n{_L}{_N}]?[{_L}{_M}]+|[{_N}]"
    f"| ?[^{_S}{_L}{_M}{_N}]+[\\r\\n]*|[{_S}]*[\\r\\n]+|{_WS_TAIL}"
)

# --- llama.cpp's regex strings, verbatim (C++ "\\p{L}" is r"\p{L}" here) ---

_CI = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
RX_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
RX_LLAMA3 = (
    _CI + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
RX_QWEN2 = (
    _CI + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
RX_QWEN35 = (
    _CI + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
# the regexes llama.cpp splits with hand-written code (unicode_regex_split_custom) -> ours
_HAND_WRITTEN = {RX_GPT2: GPT2, RX_LLAMA3: LLAMA3, RX_QWEN2: QWEN2, RX_QWEN35: QWEN35}

_CJK_DEEPSEEK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"  # CJK ideographs and Hangul
_DEEPSEEK3 = (
    "\\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"""
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)
# gpt-4o's case-aware letter runs as llama.cpp adapts them for std::regex; tekken has no contractions
_UPPER_THEN_LOWER = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+"
_UPPERS_THEN_ANY = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*"
_BLOOM = " ?[^(\\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+"

# llama.cpp's LLAMA_VOCAB_PRE_TYPE_* -> its regex list
REGEXES: dict[str, tuple[str, ...]] = {
    "default": (r"[\p{P}\$\+<=>\^~\|]+", RX_GPT2, r"\p{N}+", "[0-9][0-9][0-9]"),
    "gpt2": (RX_GPT2,),
    "llama3": (RX_LLAMA3,),
    "jais2": (
        _CI + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
        r"|\s{512}(?!\S)|\s{256}(?!\S)|\s{128}(?!\S)|\s{64}(?!\S)|\s{32}(?!\S)|\s{16}(?!\S)"
        r"|\s{8}(?!\S)|\s{4}(?!\S)|\s{1,2}(?!\S)|\s{1}",
    ),
    "deepseek-llm": (
        "[\r\n]",
        # letters of cased scripts (Latin, Greek, Cyrillic, ...), one optional space before
        "\\s?[A-Za-z\xb5\xc0-\xd6\xd8-\xf6\xf8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af"
        "\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3"
        "-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd"
        "\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-"
        "\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-"
        "\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-"
        "\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126"
        "\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00"
        "-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f"
        "\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-"
        "\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-"
        "\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943]+",
        "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
        "\\s+$",
        _CJK_DEEPSEEK,
        "\\p{N}+",
    ),
    "deepseek3": _DEEPSEEK3,
    "youtu": (
        "[\uac00-\ud7a3\u3131-\u318e]+"
        "|[\uff01\u2026\u201c\u201d\u2018\u2019\u2014\uff1a\uff1b\uff0c\u3001-\u303f\ufe30-\ufe4f]+"
        "|[\u3105-\u312f]+|[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+" + _CI + "?"
        r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*" + _CI + "?"
        r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
    "deepseek-coder": ("[\r\n]", "\\s?\\p{L}+", "\\s?\\p{P}+", _CJK_DEEPSEEK, "\\p{N}"),
    "falcon": (r"[\p{P}\$\+<=>\^~\|`]+", RX_GPT2, "[0-9][0-9][0-9]"),
    "starcoder": (r"\p{N}", RX_GPT2),
    "qwen2": (RX_QWEN2,),
    "qwen35": (RX_QWEN35,),
    "laguna": ("[^\\n]+|[\\n]+", RX_QWEN2),
    "bloom": (_BLOOM,),
    "viking": (_BLOOM, r"\p{N}"),
    "tekken": (
        _UPPER_THEN_LOWER + "|" + _UPPERS_THEN_ANY
        + r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
    "chameleon": (
        "<sentinel:[0-9]+>",
        "(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z",
        "([\\t\\n]|    |  )",
        r"\p{N}",
        r"[\p{P}!-/:-@\[-`{-~]",
        RX_GPT2,
    ),
    "gpt-4o": (
        _UPPER_THEN_LOWER + _CI + "?|" + _UPPERS_THEN_ANY + _CI + "?"
        + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
    "bailingmoe": (
        r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",
    ),
    "seed-coder": (
        _CI + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
    "ufakzeka": (
        r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
    "exaone-moe": (
        _CI + r"|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]?"
        r"|\s*[\r\n]|\s+(?!\S)|\s+",
    ),
    "minicpm5": (
        r"\p{N}{1,3}",
        _CI + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
}  # fmt: skip


@dataclass(frozen=True)
class PreTokSpec:
    """What a `tokenizer.ggml.pre` value means: its regex list and vocab flags."""

    regexes: str  # a key of REGEXES
    ignore_merges: bool = False  # a pre-token that is already a vocab entry skips BPE
    add_bos: bool = False  # llama.cpp's default when tokenizer.ggml.add_bos_token is absent
    default_bos: bool = True  # False: no BOS id unless the GGUF names one (chatglm)


def _names(regexes: str, names: str, **flags: bool) -> dict[str, PreTokSpec]:
    return {name: PreTokSpec(regexes, **flags) for name in names.split()}


# tokenizer.ggml.pre -> spec, as llama.cpp's vocab loader maps them (llama_vocab::impl::load).
# Left out: types that need more than regexes (kimi-k2, afmoe, tiny_aya, superbpe: custom
# splitters or empty matches; gemma4, sarvam-moe, whitespace: no byte-level encoding).
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
    **_names("llama3", "chatglm-bpe", default_bos=False),
    **_names("llama3", "glm4 glm5", ignore_merges=True, default_bos=False),
    **_names("jais2", "jais-2"),
    **_names("qwen2", "qwen2 deepseek-r1-qwen kormo f2llmv2 megrez stablelm2 hunyuan solar-open"),
    **_names("qwen2", "grok-2"),
    **_names("laguna", "laguna"),
    **_names("qwen35", "qwen35"),
    **_names(
        "starcoder",
        "smollm starcoder refact command-r codeshell exaone minerva-7b mellum2",
    ),
    **_names("falcon", "falcon"),
    **_names("deepseek-llm", "deepseek-llm"),
    **_names("deepseek-coder", "deepseek-coder"),
    **_names("deepseek3", "deepseek-v3 hunyuan-dense hy_v4 joyai-llm"),
    **_names("youtu", "youtu", ignore_merges=True),
    **_names("bloom", "poro-chat bloom gpt3-finnish"),
    **_names("viking", "viking"),
    **_names("tekken", "tekken", ignore_merges=True, add_bos=True),
    **_names("chameleon", "chameleon", add_bos=True),
    **_names("gpt-4o", "gpt-4o llama4 kanana2 talkie minimax-m2"),
    **_names("bailingmoe", "bailingmoe bailingmoe2 llada-moe"),
    **_names("seed-coder", "seed-coder"),
    **_names("ufakzeka", "ufakzeka"),
    **_names("exaone-moe", "exaone-moe"),
    **_names("minicpm5", "minicpm5", ignore_merges=True),
}


def resolve_pre(pre: str | None) -> PreTokSpec:
    """Map a `tokenizer.ggml.pre` value (None or '' means llama.cpp's 'default') to its spec."""
    spec = PRE_TOKENIZERS.get(pre or "default")
    if spec is None:
        known = ", ".join(sorted(PRE_TOKENIZERS))
        raise ModelFormatError(
            f"unsupported pre-tokenizer tokenizer.ggml.pre={pre!r}; supported: {known}"
        )
    return spec


class _HandWritten:
    """A regex llama.cpp splits with hand-written code, matched here with full Unicode classes."""

    def __init__(self, pattern: str) -> None:
        self._pattern = re.compile(pattern)
        # these patterns match every character, so the pieces are exactly the matches
        self.findall = self._pattern.findall

    @staticmethod
    def rewrite(text: str) -> str:
        return _ASTRAL.apply(text) if _ASTRAL.has_any(text) else text

    def split_ascii(self, text: str) -> list[str]:
        return self.findall(text)

    def piece_lengths(self, text: str) -> Iterator[int]:
        return (len(piece) for piece in self.findall(text))


def _stage(regex: str) -> _HandWritten | StdRegex:
    if regex in _HAND_WRITTEN:
        return _HandWritten(_HAND_WRITTEN[regex])
    return StdRegex(regex)


class PreTokenizer:
    """Splits text into the pieces that BPE then encodes one by one."""

    def __init__(self, regexes: str) -> None:
        self.regexes = regexes
        self._stages = [_stage(rx) for rx in REGEXES[regexes]]
        only = self._stages[0]
        # the common case: one hand-written regex over text without astral characters
        self._fast = (
            only.findall if len(self._stages) == 1 and isinstance(only, _HandWritten) else None
        )

    def split(self, text: str) -> list[str]:
        """Pieces of `text`, in order; they concatenate back to `text`."""
        if not text:
            return []
        if self._fast is not None and not _ASTRAL.has_any(text):
            return self._fast(text)
        if text.isascii():  # every stage runs on the text itself: split strings directly
            pieces = [text]
            for stage in self._stages:
                pieces = [sub for piece in pieces for sub in stage.split_ascii(piece)]
            return pieces
        cuts = [0, len(text)]  # piece i is text[cuts[i]:cuts[i + 1]]
        for stage in self._stages:
            view = stage.rewrite(text)  # same length as text: offsets carry over
            new_cuts = [0]
            for start, end in pairwise(cuts):
                for length in stage.piece_lengths(view[start:end]):
                    new_cuts.append(new_cuts[-1] + length)
            cuts = new_cuts
        return [text[a:b] for a, b in pairwise(cuts)]
