"""Every numeric option, once: its Python argument, its CLI flag and the values it allows.

The Python API checks values with `check(name, value)` and the CLI parses its flags with
`cli_type(name)`, so both refuse the same values with one message naming the option, the value
and the allowed range. Python messages spell options as arguments (`n_ctx=0`); `cli_text`
rewrites such a message with the CLI's flags (`--ctx 0`) for the command line.
"""

from __future__ import annotations

import argparse
import math
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from .errors import ConfigError

#: Largest context we accept: far beyond any model we run, small enough to refuse typos early.
MAX_CTX = 1 << 24
MAX_THREADS = 1024
#: Server bounds: sequence slots, requests waiting for one, alternatives per token in logprobs.
MAX_SLOTS, MAX_QUEUE, MAX_TOP_LOGPROBS = 256, 100_000, 20


@dataclass(frozen=True)
class Option:
    """A numeric option: integers or numbers in [low, high] (None: unbounded), plus special values."""

    name: str  # the Python argument, e.g. "n_ctx"
    flag: str  # the CLI flag, e.g. "--ctx"
    kind: type  # int or float
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself is refused (a number > low)
    specials: Mapping[int, str] = field(default_factory=dict)  # value -> what it means

    def allowed(self) -> str:
        """The allowed values in words, e.g. "an integer from 1 to 1024"."""
        noun = "an integer" if self.kind is int else "a number"
        if self.low is not None and self.high is not None:
            span = f"{noun} from {_text(self.low)} to {_text(self.high)}"
        elif self.low is not None:
            span = f"{noun} {'>' if self.low_open else '>='} {_text(self.low)}"
        else:
            span = noun
        extra = [f"{value} ({meaning})" for value, meaning in self.specials.items()]
        return " or ".join([*extra, span])

    def convert(self, value: object) -> int | float:
        """The value as this option's type, or ValueError naming the allowed values."""
        number = self._number(value)
        if self.kind is int and number in self.specials:
            return number
        if not self._in_range(number):
            raise ValueError(f"expected {self.allowed()}")
        return number

    def _number(self, value: object) -> int | float:
        if isinstance(value, bool):
            raise ValueError(f"expected {self.allowed()}, not a bool")
        if isinstance(value, str):
            value = value.strip()
            try:
                value = int(value) if self.kind is int else float(value)
            except ValueError:
                raise ValueError(f"expected {self.allowed()}") from None
        try:
            return operator.index(value) if self.kind is int else float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ValueError(f"expected {self.allowed()}") from None

    def _in_range(self, number: float) -> bool:
        if not math.isfinite(number):
            return False
        if self.low is not None and (number <= self.low if self.low_open else number < self.low):
            return False
        return self.high is None or number <= self.high


def _text(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"


OPTIONS: dict[str, Option] = {
    o.name: o
    for o in (
        Option("n_ctx", "--ctx", int, 1, MAX_CTX, specials={0: "the model's trained length"}),
        Option("n_threads", "--threads", int, 1, MAX_THREADS),
        Option("n_gpu_layers", "--n-gpu-layers", int, 0, None, specials={-1: "all"}),
        Option("max_tokens", "--max-tokens", int, 0, None, specials={-1: "no limit"}),
        Option("temperature", "--temp", float, 0),
        Option("top_k", "--top-k", int, 0, None),
        Option("top_p", "--top-p", float, 0, 1),
        Option("min_p", "--min-p", float, 0, 1),
        Option("repeat_penalty", "--repeat-penalty", float, 0, None, low_open=True),
        Option("repeat_last_n", "--repeat-last-n", int, 0, None, specials={-1: "the whole context"}),
        Option("presence_penalty", "--presence-penalty", float, -2, 2),
        Option("frequency_penalty", "--frequency-penalty", float, -2, 2),
        Option("seed", "--seed", int, 0, 2**64 - 1, specials={-1: "random"}),
        Option("n_prompt", "--n-prompt", int, 0, MAX_CTX),
        Option("n_gen", "--n-gen", int, 0, MAX_CTX),
        Option("depth", "--n-depth", int, 0, MAX_CTX),
        Option("repetitions", "--repetitions", int, 1, 1000),
        Option("n_keep", "--keep", int, 0, MAX_CTX, specials={-1: "the whole prompt"}),
        Option("n_parallel", "--parallel", int, 1, MAX_SLOTS),
        Option("n_seq", "--parallel", int, 1, MAX_SLOTS + 1),
        Option("max_queue", "--max-queue", int, 0, MAX_QUEUE),
        Option("port", "--port", int, 1, 65535),
        Option("top_logprobs", "--top-logprobs", int, 0, MAX_TOP_LOGPROBS),
    )
}

#: Boolean arguments and their CLI flags (for cli_text).
SWITCHES = {"context_shift": "--context-shift", "ignore_eos": "--ignore-eos"}


def check(name: str, value: object) -> int | float:
    """The value of Python argument `name`, or ConfigError: "top_p=5: expected a number from 0 to 1"."""
    try:
        return OPTIONS[name].convert(value)
    except ValueError as exc:
        raise ConfigError(f"{name}={value!r}: {exc}") from None


def check_optional(name: str, value: object) -> int | float | None:
    """check(), letting None through (None means the default)."""
    return None if value is None else check(name, value)


def check_switch(name: str, value: object) -> bool:
    """A boolean argument: True or False only (a string such as "no" would read as true)."""
    if not isinstance(value, bool):
        raise ConfigError(f"{name}={value!r}: expected True or False")
    return value


def check_stop(stop: object) -> list[str]:
    """Stop strings: None, one string, or a sequence of strings."""
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list | tuple) and all(isinstance(s, str) for s in stop):
        return list(stop)
    raise ConfigError(f"stop={stop!r}: expected a string or a list of strings")


def cli_type(name: str) -> Callable[[str], int | float]:
    """An argparse `type=` for option `name`: its errors name the flag (argparse adds it)."""
    option = OPTIONS[name]

    def parse(text: str) -> int | float:
        try:
            return option.convert(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None

    parse.__name__ = option.kind.__name__  # argparse's "invalid int value" wording
    return parse


_NAMES = {**{name: o.flag for name, o in OPTIONS.items()}, **SWITCHES}
# `name=value` for every option; bare names only where they cannot be ordinary words (n_ctx).
_ARG = re.compile(
    r"\b(" + "|".join(map(re.escape, _NAMES)) + r")=(True\b)?"
    + r"|\b(" + "|".join(re.escape(n) for n in _NAMES if "_" in n) + r")\b"
)


def cli_text(message: str) -> str:
    """A Python-side message in the CLI's words: `n_ctx=128` -> `--ctx 128`, `context_shift=True`
    -> `--context-shift`, a bare `n_ctx` -> `--ctx`."""

    def flag(m: re.Match[str]) -> str:
        if m.group(3):
            return _NAMES[m.group(3)]
        name = m.group(1)
        if name in SWITCHES:
            return _NAMES[name]
        return _NAMES[name] + " "

    return _ARG.sub(flag, message)
