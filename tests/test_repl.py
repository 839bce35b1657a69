"""The chat loop's bookkeeping with a stand-in runner: what the model sees when a conversation
outgrows the context, that nothing typed is lost, and what the user is told (once)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

from hybridllm.generate import GenerationStats
from hybridllm.repl import ChatSession, run_repl


class WordRunner:
    """A runner whose tokens are words: each message costs its words plus 2 (role markers), and
    each reply is `reply_words` words. Records every window it was asked to answer."""

    def __init__(self, n_ctx: int, reply_words: int = 10) -> None:
        self.n_ctx, self.reply_words = n_ctx, reply_words
        self.windows: list[list[dict[str, str]]] = []
        self.options: list[dict[str, Any]] = []
        self.last_stats = GenerationStats()

    def chat_tokens(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        n = sum(len(m["content"].split()) + 2 for m in messages) + (1 if add_generation_prompt else 0)
        return list(range(n))

    def chat(self, messages: list[dict[str, str]], stream: bool = True, **options: Any) -> Iterator[str]:
        self.windows.append(list(messages))
        self.options.append(options)
        self.last_stats = GenerationStats(generated_tokens=self.reply_words)
        for i in range(self.reply_words):
            yield f"w{i} "


def _user_texts(messages: list[dict[str, str]]) -> list[str]:
    return [m["content"] for m in messages if m["role"] == "user"]


def test_a_long_chat_keeps_the_start_and_the_latest_turns_and_loses_nothing() -> None:
    runner, out = WordRunner(n_ctx=80), io.StringIO()
    session = ChatSession(runner, {"max_tokens": 10}, system="be brief", out=out)
    typed = [f"question number {i} about something" for i in range(12)]
    for text in typed:
        session.reply(text)
    assert _user_texts(session.messages) == typed  # the whole conversation is kept
    assert len(session.messages) == 1 + 2 * len(typed)
    last = runner.windows[-1]
    assert last[0] == {"role": "system", "content": "be brief"}
    assert last[1]["content"] == typed[0] and last[2]["role"] == "assistant"  # the first exchange
    assert last[-1]["content"] == typed[-1]
    assert len(runner.chat_tokens(last)) <= session.budget()
    assert typed[5] not in _user_texts(last)  # older turns in between were dropped
    assert out.getvalue().count("no longer fits the context of 80 tokens") == 1  # said once
    assert "the system message, the first exchange and the latest turns" in out.getvalue()


def test_every_reply_may_shift_and_keeps_the_rendered_head() -> None:
    runner = WordRunner(n_ctx=80)
    session = ChatSession(runner, {"max_tokens": 10}, system="be brief", out=io.StringIO())
    session.reply("hello there")
    session.reply("and again")
    options = runner.options[-1]
    assert options["context_shift"] is True and options["max_tokens"] == 10
    head = session.head()
    assert options["n_keep"] == len(runner.chat_tokens(head, add_generation_prompt=False))


def test_the_first_exchange_gives_way_when_it_is_too_long_to_keep() -> None:
    runner = WordRunner(n_ctx=80, reply_words=50)
    session = ChatSession(runner, {}, system="sys", out=io.StringIO())
    for text in ("first question", "second question", "third question"):
        session.reply(text)
    last = runner.windows[-1]
    # a 50-word first reply fills more than half of the prompt budget: the system message and
    # the first user message stay, the long reply goes
    assert [m["role"] for m in last[:2]] == ["system", "user"] and last[1]["content"] == "first question"
    assert last[-1]["content"] == "third question"


def test_a_message_too_long_for_the_context_is_refused_not_sent() -> None:
    runner, out = WordRunner(n_ctx=40), io.StringIO()
    session = ChatSession(runner, {}, out=out)
    session.reply("short one")
    huge = "word " * 200
    assert session.reply(huge) == ""
    assert _user_texts(session.messages) == ["short one"] and len(runner.windows) == 1
    assert "was not sent" in out.getvalue() and "--ctx 40" in out.getvalue()
    session.reply("still here?")  # the chat goes on
    assert _user_texts(session.messages) == ["short one", "still here?"]


def test_reset_and_system_commands_and_the_loop() -> None:
    runner, out = WordRunner(n_ctx=200), io.StringIO()
    session = ChatSession(runner, {}, system="old", out=out)
    lines = iter(["hi", "/system new rules", "", "/bogus", "/reset", "hello", "/exit", "never read"])
    run_repl(session, read=lambda prompt: next(lines))
    assert session.messages[0] == {"role": "system", "content": "new rules"}
    assert _user_texts(session.messages) == ["hello"]
    assert "unknown command '/bogus'" in out.getvalue()
    assert next(lines) == "never read"  # /exit left the loop


class InterruptedRunner(WordRunner):
    """Ctrl-C arrives before the first piece (while the prompt is evaluated)."""

    def chat(self, messages: list[dict[str, str]], stream: bool = True, **options: Any) -> Iterator[str]:
        raise KeyboardInterrupt
        yield ""  # a generator, as Runner.chat(stream=True)


def test_ctrl_c_before_the_first_piece_stops_the_reply_and_the_chat_goes_on() -> None:
    runner, out = InterruptedRunner(n_ctx=200), io.StringIO()
    session = ChatSession(runner, {}, out=out)
    assert session.reply("a question") == ""
    assert "[stopped]" in out.getvalue()
    assert session.messages == [{"role": "user", "content": "a question"},
                                {"role": "assistant", "content": ""}]  # fmt: skip
