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
        child.expect(r"tok/s\]")  # --verbose: speeds after each reply
        child.expect("> ")

        child.sendline("/help")
        child.expect("/reset")
        child.expect("> ")

        child.sendline("Write a very long story about a dragon who learns to code.")
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
