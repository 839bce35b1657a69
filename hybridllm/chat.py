"""Chat templates: the model's `tokenizer.chat_template` rendered in jinja2's sandbox.

We render the way Hugging Face transformers' `apply_chat_template` does (and llama-cpp-python's
Jinja2ChatFormatter, which follows it): trim_blocks and lstrip_blocks on, the loopcontrols
extension, `{% generation %}` blocks rendered as plain text, a `tojson` filter that is
`json.dumps` (not jinja2's HTML-escaping one: templates print tool schemas with it), and the
globals `raise_exception` and `strftime_now`. The template sees `messages`, `tools`,
`add_generation_prompt`, `bos_token`, `eos_token` and any extra variables the caller passes
(Qwen 3's `enable_thinking`, Llama 3.1's `date_string`, Granite's `documents`, ...).
A model without a template gets ChatML.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import HybridLLMError, ModelFormatError

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

ROLES = ("system", "user", "assistant", "tool")
# what a template's own code can raise while rendering (jinja2's errors and Python's)
_RENDER_FAULTS = (
    jinja2.TemplateError, TypeError, ValueError, LookupError, AttributeError, ArithmeticError,
)  # fmt: skip


class ChatTemplateError(HybridLLMError, ValueError):
    """The template raised (raise_exception) or the messages are malformed."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"chat template: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """transformers' tojson: plain json.dumps, non-ASCII kept, with its keyword arguments."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


class _GenerationBlocks(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (marks assistant text for training masks in
    transformers) renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        parser.stream.skip(1)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


@dataclass(frozen=True)
class ChatTemplate:
    source: str
    bos_token: str = ""
    eos_token: str = ""
    is_fallback: bool = False

    @classmethod
    def from_model(cls, model: Any) -> ChatTemplate:
        """From an open `ModelFile`: its template (or ChatML) and its BOS/EOS strings."""
        template = model.metadata("tokenizer.chat_template")
        return cls(
            source=template or CHATML_TEMPLATE,
            bos_token=_token_text(model, "tokenizer.ggml.bos_token_id"),
            eos_token=_token_text(model, "tokenizer.ggml.eos_token_id"),
            is_fallback=not template,
        )

    @cached_property
    def _compiled(self) -> jinja2.Template:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=[jinja2.ext.loopcontrols, _GenerationBlocks],
        )
        env.filters["tojson"] = _tojson
        env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
        try:
            return env.from_string(self.source)
        except jinja2.TemplateSyntaxError as exc:
            raise ModelFormatError(f"chat template does not parse: {exc}") from exc

    def render(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        *,
        tools: Sequence[dict[str, Any]] | None = None,
        **variables: Any,
    ) -> str:
        """The prompt text of `messages`.

        tools: OpenAI-style tool definitions ({"type": "function", "function": {...}}) for
        templates that render them; variables: extra template variables (enable_thinking=False,
        date_string="26 Jul 2024", documents=[...], ...)."""
        checked = [_check_message(i, m) for i, m in enumerate(messages)]
        if tools is not None and not (
            isinstance(tools, (list, tuple)) and all(isinstance(t, dict) for t in tools)
        ):
            raise ChatTemplateError(f"tools must be a list of dicts, got {tools!r}")
        context = dict(variables)
        context.update(
            messages=checked,
            tools=list(tools) if tools is not None else None,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
        )
        try:
            return self._compiled.render(**context)
        except ChatTemplateError:
            raise  # the template's own raise_exception
        except _RENDER_FAULTS as exc:
            # a template fails on input it does not expect (e.g. '+' on a missing field)
            raise ChatTemplateError(
                f"chat template failed to render: {type(exc).__name__}: {exc}"
            ) from exc


def render_chat(
    model: Any,
    messages: Sequence[dict[str, Any]],
    add_generation_prompt: bool = True,
    *,
    tools: Sequence[dict[str, Any]] | None = None,
    **variables: Any,
) -> str:
    """Render `messages` with an open `ModelFile`'s chat template (see ChatTemplate.render)."""
    template = ChatTemplate.from_model(model)
    return template.render(messages, add_generation_prompt, tools=tools, **variables)


def _check_message(index: int, message: Any) -> dict[str, Any]:
    """A copy of one message, checked; list content (OpenAI's text parts) joined into one string
    with newlines between parts, as llama.cpp's server does for templates that take strings."""
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise ChatTemplateError(
            f"{where} must be a dict with 'role' and 'content', got {message!r}"
        )
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise ChatTemplateError(f"{where}['role'] is {role!r}; expected one of {ROLES}")
    checked = dict(message)
    if isinstance(content, list):
        checked["content"] = _join_text_parts(where, content)
    elif content is None and role == "assistant" and message.get("tool_calls"):
        checked["content"] = ""  # a reply that only calls tools: "" as llama.cpp's server sends
    elif not isinstance(content, str):
        raise ChatTemplateError(
            f"{where}['content'] must be a string or a list of text parts, "
            f"got {type(content).__name__}"
        )
    return checked


def _join_text_parts(where: str, parts: list[Any]) -> str:
    texts = []
    for i, part in enumerate(parts):
        if not (isinstance(part, dict) and part.get("type") == "text"):
            raise ChatTemplateError(
                f"{where}['content'][{i}] must be a text part {{'type': 'text', 'text': ...}}, "
                f"got {part!r}"
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise ChatTemplateError(f"{where}['content'][{i}]['text'] must be a string")
        texts.append(text)
    return "\n".join(texts)


def _token_text(model: Any, id_key: str) -> str:
    token_id = model.metadata(id_key)
    field = model.reader.get_field("tokenizer.ggml.tokens")
    if token_id is None or field is None or not 0 <= token_id < len(field.data):
        return ""
    return field.contents(int(token_id))
