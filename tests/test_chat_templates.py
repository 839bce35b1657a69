"""Real models' chat templates render exactly as llama-cpp-python's Jinja2ChatFormatter does.

The templates (tests/data/chat_templates/, copied from llama.cpp's models/templates, which keeps
them as the model repositories ship them): Llama 3.1 / 3.2 / 3.3, Qwen 2.5 (ChatML with tools),
Qwen 3 (thinking), Phi-3.5, Gemma 2, Granite 3.3, Mistral Nemo, DeepSeek-R1-Distill-Qwen and
Hermes 3 (tool use). The oracle follows transformers' apply_chat_template (json.dumps as tojson,
raise_exception, strftime_now, loop controls).
Each template renders several conversations: a single turn, a system prompt, several turns, a
tool call and its result with the tool definitions, non-ASCII and markup characters in the
content; with and without the generation prompt.
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

import hybridllm.chat
from hybridllm.chat import ChatTemplate, ChatTemplateError

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
# template file -> (bos_token, eos_token) as the model's GGUF names them
MODELS = {
    "meta-llama-Llama-3.1-8B-Instruct": ("<|begin_of_text|>", "<|eot_id|>"),
    "meta-llama-Llama-3.2-3B-Instruct": ("<|begin_of_text|>", "<|eot_id|>"),
    "meta-llama-Llama-3.3-70B-Instruct": ("<|begin_of_text|>", "<|eot_id|>"),
    "Qwen-Qwen2.5-7B-Instruct": ("", "<|im_end|>"),
    "Qwen-Qwen3-0.6B": ("", "<|im_end|>"),
    "microsoft-Phi-3.5-mini-instruct": ("<s>", "<|endoftext|>"),
    "google-gemma-2-2b-it": ("<bos>", "<eos>"),
    "ibm-granite-granite-3.3-2B-Instruct": ("", "<|end_of_text|>"),
    "mistralai-Mistral-Nemo-Instruct-2407": ("<s>", "</s>"),
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B": (
        "<\uff5cbegin\u2581of\u2581sentence\uff5c>",
        "<\uff5cend\u2581of\u2581sentence\uff5c>",
    ),
    "NousResearch-Hermes-3-Llama-3.1-8B-tool_use": ("<|begin_of_text|>", "<|im_end|>"),
}
FIXED_NOW = datetime(2025, 3, 7, 12, 0)  # strftime_now's date in both renderers

SYSTEM = {"role": "system", "content": "You are terse."}
USER = {"role": "user", "content": "Name a prime."}
REPLY = {"role": "assistant", "content": "7"}
USER2 = {"role": "user", "content": "Another one, with <b>markup</b> & 'quotes', é and 漢字?"}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city (°C)",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "e.g. Zürich"}},
                "required": ["city"],
            },
        },
    }
]
TOOL_TURNS = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "abc123XYZ",
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "abc123XYZ", "name": "get_weather", "content": '{"c": 21}'},
]
CONVERSATIONS: dict[str, tuple[list[dict[str, Any]], dict[str, Any]]] = {
    "single": ([USER], {}),
    "system": ([SYSTEM, USER], {}),
    "turns": ([SYSTEM, USER, REPLY, USER2], {}),
    "turns-no-system": ([USER, REPLY, USER2], {}),
    "tools": ([SYSTEM, *TOOL_TURNS], {"tools": TOOLS}),
    "tools-offered": ([USER], {"tools": TOOLS}),
}
# extra template variables some templates read
VARIABLES = {
    "Qwen-Qwen3-0.6B": [{}, {"enable_thinking": False}],
    "meta-llama-Llama-3.1-8B-Instruct": [{}, {"date_string": "26 Jul 2024"}],
    "ibm-granite-granite-3.3-2B-Instruct": [
        {},
        {"documents": [{"doc_id": 1, "title": "Primes", "text": "7 is prime."}]},
        {"thinking": True},
    ],
}


@pytest.fixture(autouse=True)
def fixed_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both renderers see the same date, whenever the test runs."""
    monkeypatch.setattr(hybridllm.chat, "_strftime_now", FIXED_NOW.strftime)
    llama_chat_format = pytest.importorskip("llama_cpp.llama_chat_format")
    monkeypatch.setattr(
        llama_chat_format.Jinja2ChatFormatter, "strftime_now", staticmethod(FIXED_NOW.strftime)
    )


def _oracle(name: str, messages: list[dict[str, Any]], generation: bool, **kwargs: Any) -> str:
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    bos, eos = MODELS[name]
    source = (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")
    formatter = Jinja2ChatFormatter(
        source, eos_token=eos, bos_token=bos, add_generation_prompt=generation
    )
    return formatter(messages=messages, **kwargs).prompt


def _ours(name: str, messages: list[dict[str, Any]], generation: bool, **kwargs: Any) -> str:
    bos, eos = MODELS[name]
    source = (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")
    return ChatTemplate(source, bos_token=bos, eos_token=eos).render(messages, generation, **kwargs)


def _cases() -> list[Any]:
    cases = []
    for name in MODELS:
        for conversation in CONVERSATIONS:
            for k, variables in enumerate(VARIABLES.get(name, [{}])):
                for generation in (True, False):
                    tag = f"{name}-{conversation}-v{k}-{'gen' if generation else 'nogen'}"
                    cases.append(pytest.param(name, conversation, variables, generation, id=tag))
    return cases


@pytest.mark.parametrize("name, conversation, variables, generation", _cases())
def test_renders_like_llama_cpp_python(
    name: str, conversation: str, variables: dict[str, Any], generation: bool
) -> None:
    messages, kwargs = CONVERSATIONS[conversation]
    kwargs = {**kwargs, **variables}
    try:
        want = _oracle(name, messages, generation, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the template refuses this conversation
        with pytest.raises(ChatTemplateError, match=re.escape(str(exc)[:40])):
            _ours(name, messages, generation, **kwargs)
        return
    got = _ours(name, messages, generation, **kwargs)
    assert got == want


def test_templates_use_what_they_are_given() -> None:
    """The comparisons above have teeth: tools, variables and the date reach the output."""
    llama = "meta-llama-Llama-3.1-8B-Instruct"
    with_tools = _ours(llama, [USER], True, tools=TOOLS)
    assert '"name": "get_weather"' in with_tools and "Zürich" in with_tools
    assert "Today Date: 26 Jul 2024" in _ours(llama, [USER], True, date_string="26 Jul 2024")
    qwen3 = "Qwen-Qwen3-0.6B"
    assert _ours(qwen3, [USER], True, enable_thinking=False).endswith("<think>\n\n</think>\n\n")
    granite = _ours("ibm-granite-granite-3.3-2B-Instruct", [USER], True)
    assert "Today's Date: March 07, 2025" in granite
    with pytest.raises(ChatTemplateError, match="System role not supported"):
        _ours("google-gemma-2-2b-it", [SYSTEM, USER], True)


def test_content_parts_and_tool_only_replies() -> None:
    chatml = ChatTemplate(hybridllm.chat.CHATML_TEMPLATE)
    parts = {
        "role": "user",
        "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
    }
    assert chatml.render([parts], False) == "<|im_start|>user\na\nb<|im_end|>\n"
    # a reply that only calls tools may have content None (OpenAI's form): rendered as ""
    no_content = [TOOL_TURNS[0], {**TOOL_TURNS[1], "content": None}, TOOL_TURNS[2]]
    for name in ("Qwen-Qwen2.5-7B-Instruct", "Qwen-Qwen3-0.6B", "microsoft-Phi-3.5-mini-instruct"):
        assert _ours(name, no_content, True, tools=TOOLS) == _ours(
            name, TOOL_TURNS, True, tools=TOOLS
        )
    assert "<tool_call>" in _ours("Qwen-Qwen2.5-7B-Instruct", no_content, True, tools=TOOLS)
    broken = ChatTemplate("{{ messages[0]['content'] + 1 }}")
    with pytest.raises(ChatTemplateError, match="failed to render: TypeError"):
        broken.render([USER])
    with pytest.raises(
        ChatTemplateError, match=r"messages\[0\]\['content'\]\[0\] must be a text part"
    ):
        chatml.render([{"role": "user", "content": [{"type": "image_url"}]}])
    with pytest.raises(ChatTemplateError, match=r"messages\[0\]\['content'\]"):
        chatml.render([{"role": "user", "content": None}])
    with pytest.raises(ChatTemplateError, match="tools must be a list of dicts"):
        chatml.render([USER], tools="get_weather")
