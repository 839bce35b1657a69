"""Chat templates: the model's `tokenizer.chat_template` rendered in jinja2's sandbox.

Hugging Face templates expect `messages`, `add_generation_prompt`, `bos_token`, `eos_token`,
`raise_exception` and `strftime_now`, with trim_blocks/lstrip_blocks on; we provide the same.
A model without a template gets ChatML.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import HybridLLMError, ModelFormatError

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

ROLES = ("system", "user", "assistant", "tool")


class ChatTemplateError(HybridLLMError, ValueError):
    """The template raised (raise_exception) or the messages are malformed."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"chat template: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


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
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
        try:
            return env.from_string(self.source)
        except jinja2.TemplateSyntaxError as exc:
            raise ModelFormatError(f"chat template does not parse: {exc}") from exc

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        checked = [_check_message(i, m) for i, m in enumerate(messages)]
        try:
            return self._compiled.render(
                messages=checked,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"chat template failed to render: {exc}") from exc


def render_chat(model: Any, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    return ChatTemplate.from_model(model).render(messages, add_generation_prompt)


def _check_message(index: int, message: Any) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise ChatTemplateError(f"messages[{index}] must be a dict with 'role' and 'content', got {message!r}")
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise ChatTemplateError(f"messages[{index}]['role'] is {role!r}; expected one of {ROLES}")
    if not isinstance(content, str):
        raise ChatTemplateError(f"messages[{index}]['content'] must be a string, got {type(content).__name__}")
    return dict(message)


def _token_text(model: Any, id_key: str) -> str:
    token_id = model.metadata(id_key)
    field = model.reader.get_field("tokenizer.ggml.tokens")
    if token_id is None or field is None or not 0 <= token_id < len(field.data):
        return ""
    return field.contents(int(token_id))
