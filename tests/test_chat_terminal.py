"""`hybridllm chat` driven as a person would, in a real pseudo-terminal (pexpect)."""

from __future__ import annotations

import sys

import pytest

pexpect = pytest.importorskip("pexpect")


def test_two_questions_an_interrupt_and_exit(smollm_path: str) -> None:
    cmd = [sys.executable, "-m", "hybridllm.cli", "chat", smollm_path,
           "--temp", "0", "-n", "400", "--ctx", "2048", "--verbose"]  # fmt: skip
    child = pexpect.spawn(cmd[0], cmd[1:], encoding="utf-8", timeout=180, dimensions=(40, 200))
    try:
        child.expect("Ctrl-D to leave")
        child.expect("> ")
        child.sendline("What is the capital of France? Answer in one word.")
        child.expect("Paris")
        child.expect(r"generation: \d+ tokens in [\d.]+ s \([\d.]+ tokens/s\)\]")  # --verbose: speeds
        child.expect("> ")

        child.sendline("/help")
        child.expect("/reset")
        child.expect("> ")

        child.sendline("Write a very long story about a dragon who learns to code.")
        child.expect("learns to code.\r\n")  # the terminal's echo of the line
        child.expect(r"\w+ \w+ \w+ \w+ \w+")  # the reply is streaming
        child.sendintr()  # Ctrl-C: stop this reply, back to the prompt
        child.expect(r"\[stopped\]")
        child.expect("> ")

        child.sendline("Say hello.")  # the session goes on after an interrupt
        child.expect(r"(?i)hello")
        child.expect("> ")
        child.sendeof()  # Ctrl-D leaves
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before


def test_a_small_context_overflows_again_and_again_and_the_chat_goes_on(smollm_path: str) -> None:
    """--ctx 256 with replies of up to 250 tokens: every turn overflows (old turns dropped, and
    replies shift the context while they are generated). The chat says so once, keeps
    answering, and the first user message (kept with the system turn) is still known at the end."""
    cmd = [sys.executable, "-m", "hybridllm.cli", "chat", smollm_path,
           "--temp", "0", "-n", "250", "--ctx", "256", "--verbose"]  # fmt: skip
    child = pexpect.spawn(cmd[0], cmd[1:], encoding="utf-8", timeout=240, dimensions=(40, 200))
    transcript = []
    try:
        child.expect("Ctrl-D to leave")
        child.expect("> ")
        turns = ["My name is Zanzibar. Please remember my name.",
                 "Write a long story about a dragon.", "Write a long poem about the sea.",
                 "Tell me about the history of Rome in detail."]  # fmt: skip
        shifted = 0
        for text in turns:
            child.sendline(text)
            child.expect(r"tokens/s\)(; context shifted (\d+)x)?\]")  # --verbose: timings
            shifted += int(child.match.group(2) or 0)
            transcript.append(child.before)
            child.expect("> ")
        assert shifted >= 1, "no reply overflowed the context while it was generated"
        child.sendline("What is my name?")
        child.expect("Zanzibar")
        child.expect("> ")
        transcript.append(child.before)
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before
    text = "".join(transcript)
    assert text.count("no longer fits the context") == 1  # said once
    assert "error" not in text.lower() and "Traceback" not in text
