"""The interactive chat of `hybridllm chat`: a read-eval-print loop over Runner.chat.

Each reply streams as it is generated. Ctrl-C stops the reply (what was said so far stays in the
conversation) and returns to the prompt; Ctrl-D or /exit leaves. Later turns reuse the KV cache:
Runner.chat evaluates only the tokens the conversation added since the last turn.

When the conversation outgrows the context, the chat goes on as llama-cli's and Ollama's do: the
model sees the system message and the first exchange, then the most recent turns that fit (the
oldest in between are dropped, about half of them at a time so the cache is rebuilt rarely), and
a reply that fills the context shifts it and goes on. It says so once. Nothing the user typed
is lost: `messages` keeps the whole conversation; a message too long for the context on its own
is refused with a note, not sent.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TextIO

from .chat import ChatTemplateError

HELP = """commands:
  /help          this text
  /reset         forget the conversation (keeps the system message)
  /system TEXT   set the system message and start over
  /exit          leave (Ctrl-D too); Ctrl-C stops a reply"""


SHIFT_NOTE = (
    "(the conversation no longer fits the context of {n_ctx} tokens: the model now sees {kept}the "
    "latest turns; older turns in between are dropped; a larger --ctx keeps more)"
)
#: Of the context, the part a new prompt leaves free for the reply.
REPLY_SHARE = 4


class ChatSession:
    """A conversation with one model; `sampling` holds the keyword arguments of Runner.chat."""

    def __init__(self, runner: Any, sampling: dict[str, Any], system: str | None = None,
                 verbose: bool = False, out: TextIO | None = None) -> None:  # fmt: skip
        self.runner, self.sampling, self.verbose = runner, sampling, verbose
        self.out = out or sys.stdout
        self.system = system
        self.messages: list[dict[str, str]] = []  # the whole conversation, never trimmed
        self.first_recent = 0  # index in messages where the recent turns the model sees begin
        self.shift_noted = False
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.first_recent = 0

    # --- what the model sees ------------------------------------------------------------------
    def head(self) -> list[dict[str, str]]:
        """The messages always kept: the system message and the first exchange when they fill
        at most half of the prompt budget, else the system message and the first user message
        (if the template allows two user turns in a row), else the system message, else none."""
        system = [m for m in self.messages[:1] if m["role"] == "system"]
        first = self.messages[len(system) : len(system) + 2]
        candidates = [system + first, system + first[:1], system] if first else [system]
        if len(first) < 2 or first[1]["role"] != "assistant":
            candidates = [system]  # the first exchange is still in progress
        for head in candidates:
            if not head or self._fits(head, self.budget() // 2):
                return head
        return []

    def _fits(self, head: list[dict[str, str]], limit: int) -> bool:
        """Whether the head fills at most `limit` tokens and renders followed by a user turn."""
        try:
            return self._count([*head, {"role": "user", "content": ""}]) <= limit
        except ChatTemplateError:  # e.g. a template that insists on alternating roles
            return False

    def window(self) -> list[dict[str, str]]:
        """The messages sent to the model: the head, then the recent turns from first_recent.
        When they overflow the budget, first_recent moves on by whole turns until they fill at
        most half of it (or only the last user message is left)."""
        head = self.head()
        self.first_recent = max(self.first_recent, len(head))
        if self._count(head + self.messages[self.first_recent :]) <= self.budget():
            return head + self.messages[self.first_recent :]
        last_user = len(self.messages) - 1
        while self.first_recent < last_user:
            self.first_recent = self._next_turn(self.first_recent)
            if self._count(head + self.messages[self.first_recent :]) <= self.budget() // 2:
                break
        return head + self.messages[self.first_recent :]

    def _next_turn(self, index: int) -> int:
        """Index of the next user message after `index` (turns are dropped whole)."""
        for i in range(index + 1, len(self.messages)):
            if self.messages[i]["role"] == "user":
                return i
        return len(self.messages) - 1

    def budget(self) -> int:
        """Tokens a prompt may fill: the context less a share left for the reply."""
        n_ctx = int(self.runner.n_ctx)
        return n_ctx - max(1, n_ctx // REPLY_SHARE)

    def _count(self, messages: list[dict[str, str]], prompt: bool = True) -> int:
        return len(self.runner.chat_tokens(messages, add_generation_prompt=prompt)) if messages else 0

    def handle(self, line: str) -> bool:
        """Act on one line of input; False means leave."""
        text = line.strip()
        if not text:
            return True
        if text.startswith("/"):
            return self._command(text)
        self.reply(text)
        return True

    def _command(self, text: str) -> bool:
        name, _, arg = text.partition(" ")
        if name in ("/exit", "/quit"):
            return False
        if name == "/help":
            self._say(HELP)
        elif name == "/reset":
            self.reset()
            self._say("(conversation cleared)")
        elif name == "/system":
            self.system = arg.strip() or None
            self.reset()
            self._say(f"(system message {'set' if self.system else 'removed'}; conversation cleared)")
        else:
            self._say(f"unknown command {name!r}; /help lists them")
        return True

    def reply(self, user_text: str) -> str:
        """Stream the model's answer to `user_text`; Ctrl-C ends it early."""
        self.messages.append({"role": "user", "content": user_text})
        pieces: list[str] = []
        try:  # Ctrl-C while the prompt is prepared or evaluated stops the reply just the same
            window = self.window()
            if self._count(window) > self.budget():
                return self._refuse(user_text)
            if self.first_recent > len(self.head()):
                self._note_shift()
            options = dict(self.sampling, context_shift=True, n_keep=self._n_keep())
            for piece in self.runner.chat(window, stream=True, **options):
                pieces.append(piece)
                self.out.write(piece)
                self.out.flush()
        except KeyboardInterrupt:
            self.out.write(" [stopped]")
        self.out.write("\n")
        answer = "".join(pieces)
        self.messages.append({"role": "assistant", "content": answer})
        stats = getattr(self.runner, "last_stats", None)
        if getattr(stats, "context_shifts", 0):
            self._note_shift()
        if self.verbose:
            self._say(timings_line(stats))
        return answer

    def _n_keep(self) -> int:
        """Tokens a shift in the middle of a reply keeps: the rendered head (at least BOS)."""
        head = self.head()
        return max(1, self._count(head, prompt=False)) if head else 1

    def _refuse(self, user_text: str) -> str:
        """The message cannot fit even alone: keep it out of the conversation and say why."""
        self.messages.pop()
        tokens = len(self.runner.chat_tokens([{"role": "user", "content": user_text}]))
        self._say(
            f"(your message takes {tokens} tokens with the chat template around it; --ctx "
            f"{self.runner.n_ctx} leaves room for about {self.budget()}. It was not sent: shorten it, "
            "or restart with a larger --ctx; the up arrow brings it back)"
        )
        return ""

    def _note_shift(self) -> None:
        if not self.shift_noted:
            self.shift_noted = True
            self._say(SHIFT_NOTE.format(n_ctx=self.runner.n_ctx, kept=_kept_words(self.head())))

    def _say(self, text: str) -> None:
        print(text, file=self.out, flush=True)


def _kept_words(head: list[dict[str, str]]) -> str:
    """What the kept head of a conversation is, in words: "the system message, the first
    exchange and " (empty when nothing is kept)."""
    roles = [m["role"] for m in head]
    parts = ["the system message"] if "system" in roles else []
    if "assistant" in roles:
        parts.append("the first exchange")
    elif "user" in roles:
        parts.append("your first message")
    return ", ".join(parts) + " and " if parts else ""


def timings_line(stats: Any) -> str:
    """Prompt and generation speeds of the last call, in the manner of llama-cli's timings."""
    if stats is None:
        return ""
    evaluated = stats.prompt_tokens - stats.cached_tokens
    cached = f", {stats.cached_tokens} cached" if stats.cached_tokens else ""
    prompt = (f"prompt: {evaluated} tokens{cached} in {stats.prompt_seconds:.2f} s "
              f"({stats.prompt_tokens_per_second:.1f} tokens/s)")  # fmt: skip
    gen = (f"generation: {stats.generated_tokens} tokens in {stats.generation_seconds:.2f} s "
           f"({stats.generation_tokens_per_second:.1f} tokens/s)")  # fmt: skip
    shifts = f"; context shifted {stats.context_shifts}x" if stats.context_shifts else ""
    return f"[{prompt}; {gen}{shifts}]"


def run_repl(session: ChatSession, read: Callable[[str], str] = input) -> None:
    """Read lines until Ctrl-D or /exit. Ctrl-C at the prompt just gives a fresh prompt."""
    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:  # pragma: no cover - not on every platform
        pass
    session._say("Chatting; /help for commands, Ctrl-D to leave.")
    while True:
        try:
            line = read("> ")
        except EOFError:
            session.out.write("\n")
            return
        except KeyboardInterrupt:
            session.out.write("\n")
            continue
        try:
            if not session.handle(line):
                return
        except KeyboardInterrupt:  # Ctrl-C during a command: back to the prompt
            session.out.write("\n")
