"""The interactive chat of `hybridllm chat`: a read-eval-print loop over Runner.chat.

Each reply streams as it is generated. Ctrl-C stops the reply (what was said so far stays in the
conversation) and returns to the prompt; Ctrl-D or /exit leaves. Later turns reuse the KV cache:
Runner.chat evaluates only the tokens the conversation added since the last turn.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TextIO

HELP = """commands:
  /help          this text
  /reset         forget the conversation (keeps the system message)
  /system TEXT   set the system message and start over
  /exit          leave (Ctrl-D too); Ctrl-C stops a reply"""


class ChatSession:
    """A conversation with one model; `sampling` holds the keyword arguments of Runner.chat."""

    def __init__(self, runner: Any, sampling: dict[str, Any], system: str | None = None,
                 verbose: bool = False, out: TextIO | None = None) -> None:  # fmt: skip
        self.runner, self.sampling, self.verbose = runner, sampling, verbose
        self.out = out or sys.stdout
        self.system = system
        self.messages: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

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
        try:
            for piece in self.runner.chat(self.messages, stream=True, **self.sampling):
                pieces.append(piece)
                self.out.write(piece)
                self.out.flush()
        except KeyboardInterrupt:
            self.out.write(" [stopped]")
        self.out.write("\n")
        answer = "".join(pieces)
        self.messages.append({"role": "assistant", "content": answer})
        if self.verbose:
            self._say(_speed_line(getattr(self.runner, "last_stats", None)))
        return answer

    def _say(self, text: str) -> None:
        print(text, file=self.out, flush=True)


def _speed_line(stats: Any) -> str:
    if not stats:
        return ""
    prompt = f"prompt {stats.prompt_tokens} tok, {stats.prompt_tokens_per_second:.1f} tok/s"
    gen = f"generation {stats.generated_tokens} tok, {stats.generation_tokens_per_second:.1f} tok/s"
    return f"[{prompt}; {gen}]"


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
        if not session.handle(line):
            return
