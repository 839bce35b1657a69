"""ChatSession past a full context, with a stand-in runner (one token per word): what the model
sees, what is kept, what is said, and that nothing the user typed is lost."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

from hybridllm.generate import GenerationStats
from hybridllm.repl import ChatSession


class WordRunner:
    """Counts a token per word plus 3 per message; replies with `reply_words` words."""

    def __init__(self, n_ctx: int, reply_words: int = 10) -> None:
        self.n_ctx, self.reply_words = n_ctx, reply_words
        self.sent: list[list[dict[str, str]]] = []
        self.last_stats = GenerationStats()

    def chat_tokens(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        n = sum(3 + len(m["content"].split()) for m in messages) + (2 if add_generation_prompt else 0)
        return list(range(n))

    def chat(self, messages: list[dict[str, str]], stream: bool = True, **options: Any) -> Iterator[str]:
        assert options["context_shift"] is True and options["n_keep"] >= 1
        assert len(self.chat_tokens(messages)) <= self.n_ctx
        self.sent.append([dict(m) for m in messages])
        self.last_stats = GenerationStats(generated_tokens=self.reply_words)
        return iter(["word "] * self.reply_words)


def session(n_ctx: int, system: str | None = "Be brief.", reply_words: int = 10) -> tuple[ChatSession, WordRunner, io.StringIO]:
    runner, out = WordRunner(n_ctx, reply_words), io.StringIO()
    return ChatSession(runner, {}, system=system, out=out), runner, out


def test_turns_are_dropped_from_the_middle_and_the_start_is_kept() -> None:
    chat, runner, out = session(n_ctx=120)
    chat.reply("My name is Zanzibar.")
    for i in range(12):
        chat.reply(f"question number {i} " + "padding " * 8)
    first_user = {"role": "user", "content": "My name is Zanzibar."}
    for sent in runner.sent:
        assert sent[0] == {"role": "system", "content": "Be brief."} and sent[1] == first_user
        assert sent[-1]["role"] == "user"
    assert len(runner.sent[-1]) < len(chat.messages)  # old turns were dropped from the window
    assert len(chat.messages) == 1 + 2 * 13  # ... but the conversation keeps every turn
    assert out.getvalue().count("no longer fits the context") == 1  # said once


def test_the_window_is_rebuilt_rarely() -> None:
    """Dropping about half at a time: most turns extend the previous window (the KV cache is reused)."""
    chat, runner, _ = session(n_ctx=200)
    for i in range(30):
        chat.reply(f"turn {i} " + "x " * 6)
    extends = sum(prev == new[: len(prev)] for prev, new in zip(runner.sent, runner.sent[1:], strict=False))
    assert extends >= 20, extends


def test_a_message_too_long_for_the_context_is_not_sent_and_not_lost_silently() -> None:
    chat, runner, out = session(n_ctx=64)
    chat.reply("hello")
    before = list(chat.messages)
    assert chat.reply("long " * 200) == ""
    assert chat.messages == before and len(runner.sent) == 1
    assert "was not sent" in out.getvalue() and "--ctx 64" in out.getvalue()
    chat.reply("short again")  # and the chat goes on
    assert runner.sent[-1][-1]["content"] == "short again"


def test_a_long_first_exchange_keeps_the_first_user_message() -> None:
    chat, runner, _ = session(n_ctx=100, system=None, reply_words=60)
    chat.reply("Remember the word pineapple.")
    chat.reply("Tell me a story.")
    chat.reply("Another one.")
    assert runner.sent[-1][0] == {"role": "user", "content": "Remember the word pineapple."}
