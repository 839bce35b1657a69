"""The two merge loops: byte-level BPE (by merge rank) and SentencePiece BPE (by token score).

Both follow llama.cpp's priority queue exactly: always merge the adjacent pair with the best
priority, ties going to the leftmost pair, one merge at a time. Short words (the common case,
and cached by the caller) keep a list of pair priorities and rescan it; long ones (CJK runs,
minified code) use a heap so that a 10k-character run costs O(n log n) instead of O(n^2).
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from itertools import pairwise
from typing import Any

# Below this many symbols the list rescan (whose inner loops run in C: min() and index())
# beats heap bookkeeping in Python; above it the heap's O(n log n) wins.
_HEAP_THRESHOLD = 256
_NONE = float("inf")  # priority of a pair that cannot merge


def merge(symbols: list[str], table: Mapping[Any, float], joined: bool) -> list[str]:
    """Merge `symbols` greedily and return the final symbols.

    `table` gives the priority of a pair (lower merges first): keyed by the concatenated
    text when `joined` (SentencePiece: -score of the token it forms), else by the
    (left, right) tuple (BPE: merge rank). Pairs missing from `table` never merge.
    """
    if len(symbols) < 2:
        return list(symbols)
    if len(symbols) < _HEAP_THRESHOLD:
        return _merge_rescan(list(symbols), table, joined)
    return _merge_heap(symbols, table, joined)


def _priority(table: Mapping[Any, float], joined: bool, left: str, right: str) -> float:
    return table.get(left + right if joined else (left, right), _NONE)


def _merge_rescan(sym: list[str], table: Mapping[Any, float], joined: bool) -> list[str]:
    if joined:
        prios = [table.get(a + b, _NONE) for a, b in pairwise(sym)]
    else:
        prios = [table.get(pair, _NONE) for pair in pairwise(sym)]
    while prios:
        best = min(prios)
        if best == _NONE:
            break
        i = prios.index(best)  # the leftmost of equal priorities, like llama.cpp's tie-break
        sym[i : i + 2] = [sym[i] + sym[i + 1]]
        del prios[i]
        # only the pairs touching the merged symbol changed
        if i < len(prios):
            prios[i] = _priority(table, joined, sym[i], sym[i + 1])
        if i > 0:
            prios[i - 1] = _priority(table, joined, sym[i - 1], sym[i])
    return sym


def _merge_heap(symbols: list[str], table: Mapping[Any, float], joined: bool) -> list[str]:
    text = list(symbols)
    nxt = list(range(1, len(text) + 1))
    nxt[-1] = -1
    prv = list(range(-1, len(text) - 1))
    heap: list[tuple[float, int, int, str]] = []

    def push(left: int, right: int) -> None:
        if left < 0 or right < 0:
            return
        p = _priority(table, joined, text[left], text[right])
        if p != _NONE:
            heapq.heappush(heap, (p, left, right, text[left] + text[right]))

    for i in range(len(text) - 1):
        push(i, i + 1)
    while heap:
        _, left, right, joined_text = heapq.heappop(heap)
        # stale entry: one side already merged elsewhere since it was queued
        if not text[left] or nxt[left] != right or text[left] + text[right] != joined_text:
            continue
        text[left] = joined_text
        text[right] = ""
        nxt[left] = nxt[right]
        if nxt[right] >= 0:
            prv[nxt[right]] = left
        push(prv[left], left)
        push(left, nxt[left])
    return [t for t in text if t]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies.

    Printable Latin-1 bytes map to themselves; the other 68 bytes (controls, space, NBSP, soft
    hyphen) map to U+0100.. in byte order, so every byte has a visible, non-space stand-in.
    """
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table
