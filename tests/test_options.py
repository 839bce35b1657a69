"""Every numeric option, checked at the edge of the Python API: one ConfigError (a ValueError)
naming the argument, the value and the allowed range; the CLI's wording of the same messages."""

from __future__ import annotations

import math
import warnings

import pytest

from hybridllm.errors import ConfigError, ContextLengthWarning
from hybridllm.options import OPTIONS, check, check_stop, check_switch, cli_text
from hybridllm.runner import Runner


def _bad_values(name: str) -> list[object]:
    """Values option `name` must refuse: below its range, above it, not a number, a bool."""
    option = OPTIONS[name]
    bad: list[object] = ["lots", True, math.nan, math.inf]
    if option.low is not None:
        below = option.low if option.low_open else option.low - (1 if option.kind is int else 0.5)
        bad.append(below - 1 if below in option.specials else below)  # -1 often means "all"
    if option.high is not None:
        bad.append(option.high + 1)
    if option.kind is int:
        bad.append(2.5)
    return bad


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_every_option_refuses_bad_values_naming_itself(name: str) -> None:
    for value in _bad_values(name):
        with pytest.raises(ConfigError) as caught:
            check(name, value)
        message = str(caught.value)
        assert message.startswith(f"{name}={value!r}: expected "), message
        assert "\n" not in message


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_every_option_takes_its_bounds_and_specials(name: str) -> None:
    option = OPTIONS[name]
    good = [*option.specials]
    if option.low is not None and not option.low_open:
        good.append(option.kind(option.low))
    if option.high is not None:
        good.append(option.kind(option.high))
    for value in good:
        assert check(name, value) == value
        assert check(name, str(value)) == value  # the CLI's text parses to the same value


def test_cli_text_names_flags_instead_of_arguments() -> None:
    assert cli_text("n_ctx=0: expected 1") == "--ctx 0: expected 1"
    assert cli_text("top_p=5: expected a number") == "--top-p 5: expected a number"
    assert cli_text("pass context_shift=True to go on") == "pass --context-shift to go on"
    assert cli_text("use a larger n_ctx") == "use a larger --ctx"
    assert cli_text("the seed of the day") == "the seed of the day"  # plain words stay


def test_switches_and_stop_strings() -> None:
    assert check_switch("context_shift", True) is True
    with pytest.raises(ConfigError, match=r"context_shift='yes': expected True or False"):
        check_switch("context_shift", "yes")
    assert check_stop(None) == [] and check_stop("x") == ["x"] and check_stop(("a", "b")) == ["a", "b"]
    for bad in (5, ["a", 1], {"a": 1}):
        with pytest.raises(ConfigError, match="stop="):
            check_stop(bad)


# --- the same checks through the Runner --------------------------------------------------------
@pytest.fixture(scope="module")
def runner(tiny_llama_path: str) -> Runner:
    return Runner(tiny_llama_path, n_ctx=64, n_threads=1, seed=1)


GENERATE_MISTAKES = [
    ({"max_tokens": -5}, "max_tokens=-5"), ({"temperature": -1}, "temperature=-1"),
    ({"top_k": -1}, "top_k=-1"), ({"top_p": 5}, "top_p=5"), ({"min_p": 2}, "min_p=2"),
    ({"repeat_penalty": 0}, "repeat_penalty=0"), ({"repeat_last_n": -2}, "repeat_last_n=-2"),
    ({"presence_penalty": 3}, "presence_penalty=3"), ({"frequency_penalty": -3}, "frequency_penalty=-3"),
    ({"seed": -2}, "seed=-2"), ({"n_keep": -3}, "n_keep=-3"), ({"n_keep": "a"}, "n_keep='a'"),
    ({"context_shift": "yes"}, "context_shift='yes'"), ({"ignore_eos": 1}, "ignore_eos=1"),
    ({"stop": 5}, "stop=5"),
]  # fmt: skip


@pytest.mark.parametrize("options, named", GENERATE_MISTAKES, ids=[m for _, m in GENERATE_MISTAKES])
def test_generate_and_chat_refuse_bad_values(runner: Runner, options: dict, named: str) -> None:
    with pytest.raises(ConfigError, match=f"^{named}: expected "):
        runner.generate("Hi", **{"max_tokens": 2, **options})
    with pytest.raises(ConfigError, match=f"^{named}: expected "):
        runner.chat([{"role": "user", "content": "Hi"}], **{"max_tokens": 2, **options})


def test_n_keep_minus_one_keeps_the_whole_prompt(runner: Runner) -> None:
    text = runner.generate("Hello there", max_tokens=80, temperature=0, ignore_eos=True,
                           context_shift=True, n_keep=-1)  # fmt: skip
    assert isinstance(text, str) and runner.last_stats.context_shifts >= 1


LOAD_MISTAKES = [
    ({"n_ctx": -1}, "n_ctx=-1"), ({"n_ctx": 1.5}, "n_ctx=1.5"), ({"n_ctx": True}, "n_ctx=True"),
    ({"n_threads": 0}, "n_threads=0"), ({"n_gpu_layers": -2}, "n_gpu_layers=-2"),
    ({"n_gpu_layers": "many"}, "n_gpu_layers='many'"), ({"seed": "x"}, "seed='x'"),
    ({"gpu_mem": "lots"}, "gpu_mem='lots'"), ({"gpu_margin": "-1GiB"}, "gpu_margin='-1GiB'"),
]  # fmt: skip


@pytest.mark.parametrize("options, named", LOAD_MISTAKES, ids=[m for _, m in LOAD_MISTAKES])
def test_runner_refuses_bad_values_before_loading(tiny_llama_path: str, options: dict, named: str) -> None:
    with pytest.raises(ConfigError, match=f"^{named}: "):
        Runner(tiny_llama_path, **options)


def test_a_context_beyond_the_trained_length_is_warned_about(tiny_llama_path: str) -> None:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trained = Runner(tiny_llama_path, n_ctx=0).n_ctx  # 0: the trained length
        longer = Runner(tiny_llama_path, n_ctx=trained + 1)
    notes = [w for w in seen if issubclass(w.category, ContextLengthWarning)]
    assert len(notes) == 1 and f"n_ctx={trained + 1}" in str(notes[0].message)
    assert f"{trained} tokens the model was trained on" in str(notes[0].message)
    assert longer.n_ctx == trained + 1


def test_perplexity_refuses_a_bad_n_ctx(runner: Runner) -> None:
    with pytest.raises(ConfigError, match="n_ctx=1: expected an integer from 2"):
        runner.perplexity("text " * 100, n_ctx=1)
