"""Token attributes, end-of-generation ids and the special-token split, as llama.cpp derives them.

llama.cpp does not take token types from the GGUF at face value: it promotes well-known
end-of-turn / FIM texts to CONTROL, collects the end-of-generation (EOG) set by token text, and
splits special tokens out of raw text before any BPE runs (`tokenizer_st_partition`). The
encoder must repeat all of that to produce the same ids.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# GGUF tokenizer.ggml.token_type values
(
    TYPE_UNDEFINED,
    TYPE_NORMAL,
    TYPE_UNKNOWN,
    TYPE_CONTROL,
    TYPE_USER_DEFINED,
    TYPE_UNUSED,
    TYPE_BYTE,
) = range(7)


class Attr:
    """Per-token attribute bits (llama.cpp's llama_token_attr; our own values).

    Plain ints rather than an IntFlag: enum arithmetic is slow over a 262k-token vocab.
    """

    UNDEFINED = 1
    UNKNOWN = 2
    UNUSED = 4
    NORMAL = 8
    CONTROL = 16
    USER_DEFINED = 32
    BYTE = 64
    LSTRIP = 128
    RSTRIP = 256


_TYPE_TO_ATTR = {
    TYPE_NORMAL: Attr.NORMAL,
    TYPE_UNKNOWN: Attr.UNKNOWN,
    TYPE_CONTROL: Attr.CONTROL,
    TYPE_USER_DEFINED: Attr.USER_DEFINED,
    TYPE_UNUSED: Attr.UNUSED,
    TYPE_BYTE: Attr.BYTE,
}

# Texts llama.cpp recognises when the GGUF does not name the id. For each role the first text
# present in the vocab wins (llama.cpp walks a hash map, so with several present its pick is
# arbitrary; real vocabularies carry at most one per role).
ROLE_TEXTS: dict[str, tuple[str, ...]] = {
    "eot": ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
            "<|end_of_text|>", "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>",
            "<end_of_utterance>"),
    "eom": ("<|eom_id|>",),
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>",
                "▁<PRE>", "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>",
                "▁<SUF>", "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>",
                "▁<MID>", "<|code_middle|>", "<|middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}  # fmt: skip

# Every token with one of these texts ends generation (and is forced to CONTROL).
EOG_TEXTS = frozenset((
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<｜end▁of▁sentence｜>", "[e~[",
))  # fmt: skip

# gpt-oss chat markers that llama.cpp always renders, whatever their GGUF type.
_ALWAYS_RENDERED = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")

# C isspace() in the "C" locale: what llama.cpp strips next to LSTRIP/RSTRIP tokens.
_C_SPACE = " \t\n\v\f\r"


def attrs_from_types(types: Sequence[int] | None, n: int) -> list[int]:
    """GGUF token types -> attribute bits (all NORMAL when the file has no type array)."""
    if types is None:
        return [Attr.NORMAL] * n
    return [_TYPE_TO_ATTR.get(int(t), Attr.UNDEFINED) for t in types]


def resolve_roles(
    ids: dict[str, int | None], token_to_id: dict[str, int], attrs: list[int]
) -> None:
    """Fill unset role ids (eot, eom, fim_*) by token text, promoting what is found to CONTROL."""
    for role, texts in ROLE_TEXTS.items():
        if ids.get(role) is not None:
            continue
        for text in texts:
            tid = token_to_id.get(text)
            if tid is not None:
                ids[role] = tid
                attrs[tid] |= Attr.CONTROL
                break


def eog_ids(ids: dict[str, int | None], token_to_id: dict[str, int], attrs: list[int]) -> set[int]:
    """The end-of-generation set of llama_vocab_is_eog; promotes EOG texts to CONTROL."""
    eog = {ids[r] for r in ("fim_pad", "fim_rep", "fim_sep") if ids.get(r) is not None}
    for text in EOG_TEXTS:
        tid = token_to_id.get(text)
        if tid is not None:
            eog.add(tid)
            attrs[tid] |= Attr.CONTROL
    for text in _ALWAYS_RENDERED:
        if text in token_to_id:
            attrs[token_to_id[text]] = Attr.USER_DEFINED
    eog.update(ids[r] for r in ("eos", "eot", "eom") if ids.get(r) is not None)
    _drop_false_eogs(eog, token_to_id, attrs)
    return eog


def _drop_false_eogs(eog: set[int], token_to_id: dict[str, int], attrs: list[int]) -> None:
    """llama.cpp's two exceptions: harmony-style '<|end|>' and gemma4/plamo's plain '</s>'."""
    texts = EOG_TEXTS | {"<|plamo:eos|>"}
    present = {text for text in texts if token_to_id.get(text, -1) in eog}
    end_id = token_to_id.get("<|end|>")
    harmony = {"<|return|>", "<|call|>"} <= present or {"<|calls|>", "<|flush|>"} <= present
    if end_id in eog and harmony:
        eog.discard(end_id)
        attrs[end_id] = Attr.USER_DEFINED
    s_id = token_to_id.get("</s>")
    if s_id in eog and present & {"<|tool_response>", "<|plamo:eos|>"}:
        eog.discard(s_id)
        attrs[s_id] = Attr.NORMAL


def apply_strip_rules(
    model_name: str, pre: str, token_to_id: dict[str, int], attrs: list[int]
) -> None:
    """The per-model LSTRIP/RSTRIP attributes llama.cpp sets from the model and pre-tokenizer name."""
    name = model_name.lower()
    if (
        any(p in pre for p in ("jina-v2-de", "jina-v2-es", "jina-v2-code"))
        and "<mask>" in token_to_id
    ):
        attrs[token_to_id["<mask>"]] |= Attr.LSTRIP
    elif "phi-3" in name or "phi3" in name:
        special = Attr.CONTROL | Attr.USER_DEFINED | Attr.UNKNOWN
        for tid, attr in enumerate(attrs):
            if attr & special:
                attrs[tid] |= Attr.RSTRIP
        for text, on in (
            ("</s>", True),
            ("<unk>", False),
            ("<s>", False),
            ("<|endoftext|>", False),
        ):
            if text in token_to_id:
                tid = token_to_id[text]
                attrs[tid] = attrs[tid] | Attr.RSTRIP if on else attrs[tid] & ~Attr.RSTRIP
    elif "modern-bert" in name and "[MASK]" in token_to_id:
        attrs[token_to_id["[MASK]"]] |= Attr.LSTRIP


class SpecialSplitter:
    """Cuts special tokens out of raw text the way llama.cpp's tokenizer_st_partition does.

    llama.cpp takes the special tokens longest first and splits every remaining raw fragment at
    each occurrence of the current one. Only tokens that occur somewhere in the text can matter
    (fragments are substrings of it), so we first find those with one scan of a trie-shaped
    regex and then replay llama.cpp's loop over just them.
    """

    def __init__(self, texts: Sequence[str], attrs: Sequence[int]) -> None:
        self._texts = texts
        self._attrs = attrs
        special = Attr.CONTROL | Attr.USER_DEFINED | Attr.UNKNOWN
        ids = [i for i, a in enumerate(attrs) if a & special and texts[i]]
        # longest first like llama.cpp; equal lengths by id (llama.cpp's std::sort leaves that
        # order unspecified, which only matters for two same-length tokens overlapping in text)
        ids.sort(key=lambda i: (-len(texts[i]), i))
        plain = [i for i in ids if not attrs[i] & (Attr.CONTROL | Attr.UNKNOWN)]
        self._order = {True: ids, False: plain}
        self._scanners: dict[bool, re.Pattern[str] | None] = {}

    def _scanner(self, parse_special: bool) -> re.Pattern[str] | None:
        if parse_special not in self._scanners:
            strings = {self._texts[i] for i in self._order[parse_special]}
            self._scanners[parse_special] = _trie_regex(strings) if strings else None
        return self._scanners[parse_special]

    def _present(self, text: str, parse_special: bool) -> set[str]:
        """Every special text that occurs in `text` (overlapping occurrences included)."""
        scanner = self._scanner(parse_special)
        found: set[str] = set()
        if scanner is None:
            return found
        pos = 0
        while (m := scanner.search(text, pos)) is not None:
            found.add(m.group())
            pos = m.start() + 1
        # the scan reports the longest token at each start; shorter ones there are its prefixes
        specials = {self._texts[i] for i in self._order[parse_special]}
        for longest in list(found):
            found.update(longest[:k] for k in range(1, len(longest)) if longest[:k] in specials)
        return found

    def split(self, text: str, parse_special: bool) -> list[str | int]:
        """`text` as raw fragments (str) and special token ids (int), in order."""
        if not text:
            return []
        present = self._present(text, parse_special)
        frags: list[tuple[int, int] | int] = [(0, len(text))]
        for tid in self._order[parse_special]:
            if self._texts[tid] in present:
                frags = self._split_on(text, frags, tid)
        return [text[f[0] : f[1]] if isinstance(f, tuple) else f for f in frags]

    def _split_on(
        self, text: str, frags: list[tuple[int, int] | int], tid: int
    ) -> list[tuple[int, int] | int]:
        needle = self._texts[tid]
        lstrip = bool(self._attrs[tid] & Attr.LSTRIP)
        rstrip = bool(self._attrs[tid] & Attr.RSTRIP)
        out: list[tuple[int, int] | int] = []
        for frag in frags:
            if isinstance(frag, int):
                out.append(frag)
                continue
            start, end = frag
            while (hit := text.find(needle, start, end)) >= 0:
                left_end = hit
                while lstrip and left_end > start and text[left_end - 1] in _C_SPACE:
                    left_end -= 1
                if left_end > start:
                    out.append((start, left_end))
                out.append(tid)
                start = hit + len(needle)
                while rstrip and start < end and text[start] in _C_SPACE:
                    start += 1
            if start < end:
                out.append((start, end))
        return out


def _trie_regex(strings: set[str]) -> re.Pattern[str]:
    """A regex matching the longest of `strings` at a position, shaped as a trie.

    A flat alternation of thousands of literals (Gemma has ~6k special tokens) would be tried
    branch by branch at every position; the trie shape lets `re` follow one path instead.
    """
    root: dict = {}
    for s in strings:
        node = root
        for ch in s:
            node = node.setdefault(ch, {})
        node[""] = True
    return re.compile(_trie_pattern(root))


def _trie_pattern(node: dict) -> str:
    branches = [re.escape(ch) + _trie_pattern(child) for ch, child in sorted(node.items()) if ch]
    if not branches:
        return ""
    body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
    # a token may end here: the greedy '?' still tries the longer continuations first
    return f"(?:{body})?" if "" in node else body
