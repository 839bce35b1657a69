"""llama.cpp's general regex path (C++ std::regex), reproduced with Python's `re`.

llama.cpp splits the common pre-tokenizer regexes (GPT-2, Llama 3, Qwen 2, Qwen 3.5) with
hand-written code; pretok.py matches those with full Unicode classes. Every other regex runs
through std::regex, which knows no Unicode classes, so llama.cpp rewrites text and regex first
(`unicode_regex_split` in src/unicode.cpp), and we must rewrite them the same way:

- A regex naming a Unicode category (\\p{L}, \\p{N}, \\p{P}, \\p{M}, \\p{S}, \\p{Lu}, ...) runs over
  the *collapsed* text: ASCII stays, other whitespace becomes \\v, every other code point becomes
  one byte standing for its category (0xD1 number, 0xD2 letter, 0xD3 punctuation, 0xD4 mark,
  0xD5 symbol, 0xD0 anything else), and each \\p{X} in the regex becomes that byte plus the
  category's ASCII members. So a non-ASCII letter is upper- and lower-case at once: both [^a-z]
  and [^A-Z] match it (which is why gpt-4o's case-aware regex treats 'É' like 'e' here).
- Any other regex runs over the code points, non-ASCII whitespace turned into \\v.

Both rewritten texts keep one character per code point, so match offsets cut the original
text. ECMAScript's \\s, \\d, \\w and \\b are ASCII-only (re.ASCII), and its $ matches only at the
very end (Python's $ also matches before a final newline, so it becomes \\Z).
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterator

from .unicode import ACCENT_MARK, LETTER, NUMBER, PUNCTUATION, SYMBOL, WHITESPACE

_SPACE_STAND_IN = "\x0b"
_OTHER_STAND_IN = "\xd0"
# category -> (its stand-in byte, its ASCII members as a class body: llama.cpp's k_ucat_map)
_CATEGORIES = {
    "N": ("\xd1", "0-9"),
    "L": ("\xd2", "A-Za-z"),
    "P": ("\xd3", "!-#%-*,-/:-;?-@\\[-\\]_\\{\\}"),
    "M": ("\xd4", ""),
    "S": ("\xd5", "\\$\\+<->^`\\|\\~"),
}
# the \p{...} names llama.cpp rewrites; the letter subclasses all collapse to \p{L}
_PROPERTIES = {
    "\\p{N}": "N", "\\p{L}": "L", "\\p{P}": "P", "\\p{M}": "M", "\\p{S}": "S",
    "\\p{Lu}": "L", "\\p{Ll}": "L", "\\p{Lt}": "L", "\\p{Lm}": "L", "\\p{Lo}": "L",
}  # fmt: skip


def _ranges(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split():
        lo, _, hi = item.partition("-")
        out.append((int(lo, 16), int(hi or lo, 16)))
    return out


class _CategoryTable:
    """Code point -> the stand-in of its category, by binary search over the range tables."""

    def __init__(self) -> None:
        tables = {"N": NUMBER, "L": LETTER, "P": PUNCTUATION, "M": ACCENT_MARK, "S": SYMBOL}
        rows = sorted(
            (lo, hi, _CATEGORIES[name][0])
            for name, text in tables.items()
            for lo, hi in _ranges(text)
        )
        self._starts = [lo for lo, _, _ in rows]
        self._rows = rows
        self.whitespace = {cp for lo, hi in _ranges(WHITESPACE) for cp in range(lo, hi + 1)}

    def stand_in(self, cp: int) -> str:
        i = bisect.bisect_right(self._starts, cp) - 1
        if i >= 0 and cp <= self._rows[i][1]:
            return self._rows[i][2]
        return _OTHER_STAND_IN


_TABLE = _CategoryTable()


class _Rewrite(dict[int, str]):
    """A `str.translate` table filled on first sight of each code point."""

    def __init__(self, collapse: bool) -> None:
        super().__init__()
        self._collapse = collapse

    def __missing__(self, cp: int) -> str:
        if cp < 0x80:
            out = chr(cp)
        elif cp in _TABLE.whitespace:
            out = _SPACE_STAND_IN
        elif self._collapse:
            out = _TABLE.stand_in(cp)
        else:
            out = chr(cp)
        self[cp] = out
        return out


_COLLAPSED = _Rewrite(collapse=True)
_WIDE = _Rewrite(collapse=False)


def uses_categories(regex: str) -> bool:
    """True if llama.cpp runs `regex` over the collapsed text."""
    return any(name in regex for name in _PROPERTIES)


def collapse_regex(regex: str) -> str:
    """The regex with each \\p{X} rewritten, exactly as llama.cpp's loop does it."""
    out: list[str] = []
    inside = False  # within [...]; llama.cpp assumes classes do not nest
    i = 0
    while i < len(regex):
        ch = regex[i]
        if ch == "[" and (i == 0 or regex[i - 1] != "\\"):
            inside = True
        elif inside and ch == "]" and regex[i - 1] != "\\":
            inside = False
        elif regex.startswith("\\p{", i) and i + 3 < len(regex):
            close = regex.find("}", i + 3)
            name = regex[i : close + 1] if 0 <= close <= i + 10 else ""
            if name in _PROPERTIES:
                byte, ascii_members = _CATEGORIES[_PROPERTIES[name]]
                body = byte + ascii_members
                out.append(body if inside else f"[{body}]")
                i = close + 1
                continue
        out.append(ch)
        i += 1
    return "".join(out)


def _ecmascript_to_python(regex: str) -> str:
    """Spell ECMAScript's end anchor for `re`: an unescaped $ outside a class becomes \\Z."""
    out: list[str] = []
    inside = escaped = False
    for ch in regex:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == "[":
            inside = True
        elif ch == "]":
            inside = False
        elif ch == "$" and not inside:
            out.append("\\Z")
            continue
        out.append(ch)
    return "".join(out)


class StdRegex:
    """One regex of a pre-tokenizer on llama.cpp's std::regex path."""

    def __init__(self, regex: str) -> None:
        self.regex = regex
        self.collapsed = uses_categories(regex)
        source = _ecmascript_to_python(collapse_regex(regex) if self.collapsed else regex)
        self._pattern = re.compile(source, re.ASCII)
        # re.split with the whole pattern as one group returns gaps and matches alike, in C;
        # only possible when the pattern has no groups of its own
        self._split = (
            re.compile(f"({source})", re.ASCII).split if not self._pattern.groups else None
        )

    def rewrite(self, text: str) -> str:
        """The text this regex runs over (same length as `text`)."""
        if text.isascii():
            return text
        return text.translate(_COLLAPSED if self.collapsed else _WIDE)

    def split_ascii(self, text: str) -> list[str]:
        """The pieces of ASCII `text` (which needs no rewriting), empty ones left out."""
        if self._split is not None:
            return [piece for piece in self._split(text) if piece]
        return _pieces(text, self.piece_lengths(text))

    def piece_lengths(self, text: str) -> Iterator[int]:
        """Lengths of the pieces of already rewritten `text`: matches and the gaps between them.

        llama.cpp keeps the unmatched gaps as pieces too. An empty match would give an empty
        piece, which encodes to nothing, so it is skipped."""
        end = 0
        for m in self._pattern.finditer(text):
            start, stop = m.span()
            if start > end:
                yield start - end
            if stop > start:
                yield stop - start
            end = stop
        if end < len(text):
            yield len(text) - end


def _pieces(text: str, lengths: Iterator[int]) -> list[str]:
    out, start = [], 0
    for length in lengths:
        out.append(text[start : start + length])
        start += length
    return out
