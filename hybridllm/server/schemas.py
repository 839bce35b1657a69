"""OpenAI's request and response shapes (and llama-server's /tokenize, /detokenize).

Requests are pydantic models in strict mode with unknown fields ignored, as OpenAI's API does:
a known field of the wrong type is refused (`"temperature": "hot"`, `"max_tokens": true`), and
values are then checked against the option table (hybridllm/options.py), so the server and the
Python API refuse the same values with the same words. Responses are plain dicts built here.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..constrain import Grammar, compile_grammar
from ..engine import TokenInfo, Usage
from ..errors import ConfigError
from ..options import OPTIONS, check_optional
from ..sampling import Sampler


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Generation(_Strict):
    """Fields common to /v1/completions and /v1/chat/completions."""

    model: str | None = None  # one model is served; the name is not checked (as llama-server)
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repeat_penalty: float | None = None
    repeat_last_n: int | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # llama-server's extension: go on past the end-of-text token
    cache_prompt: bool = True  # llama-server's: reuse the slot's cached prefix of the prompt
    # Structured output, at most one (constrain.compile_grammar): OpenAI's response_format, or
    # llama-server's json_schema and grammar (GBNF; Lark too).
    response_format: dict[str, Any] | None = None
    json_schema: dict[str, Any] | str | None = None
    grammar: str | None = None

    def constraint_grammar(self) -> Grammar | None:
        """The request's checked grammar, or None (GrammarError names a bad one)."""
        return compile_grammar(json_schema=self.json_schema, grammar=self.grammar,
                               response_format=self.response_format)  # fmt: skip

    def sampler(self) -> Sampler:
        """The request's sampler: given fields, the library's defaults for the others (those of
        Runner.generate and llama-server); ConfigError names a bad value."""
        given = {
            name: getattr(self, name)
            for name in (
                "temperature",
                "top_k",
                "top_p",
                "min_p",
                "repeat_penalty",
                "repeat_last_n",
                "presence_penalty",
                "frequency_penalty",
            )  # fmt: skip
            if getattr(self, name) is not None
        }
        seed = check_optional("seed", self.seed)
        return Sampler.create(**given, seed=None if seed == -1 else seed)

    def limit(self) -> int | None:
        """max_tokens as the engine takes it (None: until a stop or the context is full)."""
        value = check_optional("max_tokens", self.max_tokens)
        if self.n is not None and self.n != 1:
            raise ConfigError(f"n={self.n}: only n=1 is supported")
        return None if value in (None, -1) else int(value)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ContentPart(_Strict):
    type: str
    text: str | None = None


class ChatMessage(_Strict):
    role: str
    content: str | list[ContentPart] | None = None

    def plain(self, index: int) -> dict[str, Any]:
        """{"role", "content": str}: text parts joined; other parts (images, audio) refused."""
        content = self.content
        if isinstance(content, list):
            if any(part.type != "text" or part.text is None for part in content):
                raise ConfigError(f"messages[{index}]: only text content parts are supported")
            content = "".join(part.text or "" for part in content)
        return {"role": self.role, "content": content or ""}


class ChatRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None

    def limit(self) -> int | None:
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return super().limit()

    def n_logprobs(self) -> int | None:
        top = check_optional("top_logprobs", self.top_logprobs)
        return int(top or 0) if self.logprobs else None


class CompletionRequest(_Generation):
    prompt: str | list[int] | list[str]
    logprobs: int | None = None
    echo: bool = False

    def limit(self) -> int | None:
        if self.echo:
            raise ConfigError(
                "echo=true: returning the prompt with the completion is not supported"
            )
        return super().limit()

    def n_logprobs(self) -> int | None:
        if self.logprobs is None:
            return None
        try:
            return int(OPTIONS["top_logprobs"].convert(self.logprobs))
        except ValueError as exc:
            raise ConfigError(f"logprobs={self.logprobs!r}: {exc}") from None


class TokenizeRequest(_Strict):
    content: str
    add_special: bool = False
    parse_special: bool = True
    with_pieces: bool = False


class DetokenizeRequest(_Strict):
    tokens: list[int]


# --- responses --------------------------------------------------------------------------------
def new_id(kind: Literal["chat", "text"]) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex


def now() -> int:
    return int(time.time())


def usage_dict(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def finish_reason(engine_reason: str) -> str:
    """The engine's reason in OpenAI's words: "length" for max_tokens or a full context (as
    llama-server says), "stop" for an end token, a stop string or a complete constraint."""
    return "length" if engine_reason in ("length", "context") else "stop"


def chat_logprobs(tokens: Sequence[TokenInfo], text_of: Any) -> list[dict[str, Any]]:
    """choices[].logprobs.content of a chat response: one entry per token."""

    def entry(token: int, logprob: float) -> dict[str, Any]:
        text = text_of(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return [
        {**entry(t.id, t.logprob or 0.0), "top_logprobs": [entry(i, lp) for i, lp in t.top]}
        for t in tokens
    ]


def completion_logprobs(
    tokens: Sequence[TokenInfo], text_of: Any, offset: int = 0
) -> dict[str, Any]:
    """choices[].logprobs of a text completion (the legacy shape: parallel lists)."""
    texts = [text_of(t.id) for t in tokens]
    offsets, at = [], offset
    for text in texts:
        offsets.append(at)
        at += len(text)
    return {
        "tokens": texts,
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [{text_of(i): lp for i, lp in t.top} for t in tokens],
        "text_offset": offsets,
    }


def chat_response(
    rid: str, model: str, text: str, reason: str, usage: Usage, logprobs: list | None
) -> dict[str, Any]:
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": text},
        "logprobs": None if logprobs is None else {"content": logprobs},
        "finish_reason": finish_reason(reason),
    }
    return {
        "id": rid, "object": "chat.completion", "created": now(), "model": model,
        "choices": [choice], "usage": usage_dict(usage),
    }  # fmt: skip


def completion_response(
    rid: str, model: str, text: str, reason: str, usage: Usage, logprobs: dict | None
) -> dict[str, Any]:
    choice = {
        "index": 0,
        "text": text,
        "logprobs": logprobs,
        "finish_reason": finish_reason(reason),
    }
    return {
        "id": rid, "object": "text_completion", "created": now(), "model": model,
        "choices": [choice], "usage": usage_dict(usage),
    }  # fmt: skip


def chat_chunk(
    rid: str, model: str, delta: dict[str, Any], reason: str | None = None,
    logprobs: list | None = None,
) -> dict[str, Any]:  # fmt: skip
    choice = {
        "index": 0, "delta": delta,
        "logprobs": None if logprobs is None else {"content": logprobs},
        "finish_reason": None if reason is None else finish_reason(reason),
    }  # fmt: skip
    return {"id": rid, "object": "chat.completion.chunk", "created": now(), "model": model,
            "choices": [choice]}  # fmt: skip


def completion_chunk(
    rid: str, model: str, text: str, reason: str | None = None, logprobs: dict | None = None
) -> dict[str, Any]:
    choice = {
        "index": 0, "text": text, "logprobs": logprobs,
        "finish_reason": None if reason is None else finish_reason(reason),
    }  # fmt: skip
    return {"id": rid, "object": "text_completion", "created": now(), "model": model,
            "choices": [choice]}  # fmt: skip


def usage_chunk(rid: str, model: str, kind: str, usage: Usage) -> dict[str, Any]:
    """The last chunk with stream_options.include_usage: no choices, the usage."""
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": now(), "model": model, "choices": [],
            "usage": usage_dict(usage)}  # fmt: skip


def error_body(message: str, type_: str, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "code": code}}
