"""Structured output: constrain generation to a JSON Schema, a regex, a grammar or a list of choices.

The constraint engine is llguidance (the one llama.cpp itself can be built with). Three pieces:

    grammar = compile_grammar(json_schema={...})        # checked once; immutable, shareable
    constraint = Constraint(grammar, tokenizer, n_vocab)  # one per generation (own matcher state)
    bits = constraint.allowed(); sample a token; done = constraint.advance(token) ...

`compile_grammar` turns the user's input (JSON Schema, regex, Lark or llama.cpp GBNF text, a
list of choices, OpenAI's response_format) into llguidance's grammar definition and refuses bad
input with a GrammarError quoting llguidance's message. JSON gets llama.cpp's bounds on
whitespace and integer digits, which keep a small model from writing either without end. `lltokenizer` builds llguidance's view
of our vocabulary (the bytes each token renders as, control tokens marked special, the
end-of-generation ids as EOS) once per tokenizer. A `Constraint` wraps one LLMatcher: the
allowed-token bitmask of the next step is computed on a worker thread (llguidance releases the
GIL), so it overlaps the model's forward pass of the token just sampled.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import llguidance
import numpy as np
from llguidance.gbnf_to_lark import any_to_lark

from .errors import GrammarError
from .sampling import mask_logits as _mask_logits

#: The keyword arguments that each give one kind of constraint (at most one per call).
CONSTRAINT_ARGS = ("json_schema", "regex", "grammar", "choices", "response_format")
#: Whitespace allowed between JSON tokens: llama.cpp's json-schema-to-grammar rule (nothing, a
#: space, or one or two newlines and up to 20 spaces or tabs of indent). llguidance's default has
#: no bound, and a small model at temperature 0.8 can then write whitespace until max_tokens.
#: A schema's own "x-guidance": {"whitespace_pattern": ...} still overrides it.
JSON_WHITESPACE = r"([ ]|\n{1,2}[ \t]{0,20})?"
#: Integers without a bound get one: the largest a JSON reader holds exactly (2**53 - 1, 16 digits;
#: llama.cpp's json-schema-to-grammar allows 16 digits). Unbounded, a small model can write digits
#: until max_tokens. (10**16 - 1 would round to 1e16 in llguidance's float bounds.)
INTEGER_LIMIT = 2**53 - 1
#: The keywords whose values are subschemas (a schema in each), or maps/lists of them: where
#: _bound_integers looks (never inside const, enum, default or examples, which are data).
_SUBSCHEMA = ("additionalProperties", "items", "not", "if", "then", "else", "contains",
              "propertyNames", "unevaluatedItems", "unevaluatedProperties", "additionalItems")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
#: llama.cpp's marker for special tokens in llguidance's vocabulary: such a token is never text.
_SPECIAL_PREFIX = b"\xff"


@dataclass(frozen=True)
class Grammar:
    """A checked constraint: llguidance's grammar definition and the argument it came from."""

    option: str  # the argument: "json_schema", "regex", "grammar", "choices", "response_format.schema"...
    definition: str  # llguidance's grammar (JSON text), what LLMatcher is built from

    def __str__(self) -> str:
        return f"{self.option} constraint"


# --- user input -> Grammar ----------------------------------------------------------------------
def compile_grammar(
    *,
    json_schema: dict[str, Any] | str | None = None,
    regex: str | None = None,
    grammar: str | Grammar | None = None,
    choices: Sequence[str] | None = None,
    response_format: dict[str, Any] | None = None,
) -> Grammar | None:
    """The Grammar for at most one of the arguments, or None when none constrains the output.

    json_schema: a dict or its JSON text. regex: Rust regex syntax, matched whole. grammar: Lark
    or llama.cpp GBNF text (told apart by llguidance), or a Grammar compiled before. choices: the
    strings the output may be, exactly. response_format: OpenAI's {"type": "text" | "json_object"
    | "json_schema", "json_schema": {"schema": ...}} (a "schema" beside "json_object", as
    llama-server accepts, constrains that object). Raises GrammarError naming the argument.
    """
    given = {
        name: value
        for name, value in zip(
            CONSTRAINT_ARGS, (json_schema, regex, grammar, choices, response_format), strict=True
        )
        if value is not None
    }
    if len(given) > 1:
        raise GrammarError(" and ".join(given), f"give at most one of {', '.join(CONSTRAINT_ARGS)}")
    if not given:
        return None
    (option, value), = given.items()
    if isinstance(value, Grammar):
        return value
    if option == "json_schema":
        return _checked(option, _from_schema(option, value))
    if option == "regex":
        if not isinstance(value, str):
            raise GrammarError(option, f"expected a string, not {type(value).__name__}")
        return _checked(option, llguidance.LLMatcher.grammar_from_regex(value))
    if option == "grammar":
        return _checked(option, _from_grammar_text(value))
    if option == "choices":
        return _checked(option, _from_choices(value))
    return _from_response_format(value)


def _from_schema(option: str, schema: object) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise GrammarError(option, f"not valid JSON ({exc})") from None
    if schema is False:  # JSON Schema's `false`: nothing validates
        raise GrammarError(option, "the schema false matches nothing")
    if schema is True:  # JSON Schema's `true`: any JSON value
        schema = {}
    if not isinstance(schema, dict):
        raise GrammarError(option, f"expected a JSON Schema object, not {type(schema).__name__}")
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(
            _bound_integers(schema), defaults={"whitespace_pattern": JSON_WHITESPACE}
        )
    except (ValueError, TypeError) as exc:
        raise GrammarError(option, str(exc)) from None


def _bound_integers(schema: Any) -> Any:
    """A copy of the schema where every integer type without a lower or upper bound gets
    -INTEGER_LIMIT / INTEGER_LIMIT (only integers: "number" is left as it is)."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    types = out.get("type")
    if types == "integer" or isinstance(types, list) and "integer" in types:
        if "minimum" not in out and "exclusiveMinimum" not in out:
            out["minimum"] = -INTEGER_LIMIT
        if "maximum" not in out and "exclusiveMaximum" not in out:
            out["maximum"] = INTEGER_LIMIT
    for key in _SUBSCHEMA:
        if key in out:
            out[key] = _bound_integers(out[key])
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: _bound_integers(sub) for name, sub in out[key].items()}
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [_bound_integers(sub) for sub in out[key]]
    return out


def _from_grammar_text(text: object) -> str:
    if not isinstance(text, str):
        raise GrammarError("grammar", f"expected Lark or GBNF text, not {type(text).__name__}")
    if not text.strip():
        raise GrammarError("grammar", "the grammar text is empty")
    try:
        lark = any_to_lark(text)
    except Exception as exc:  # noqa: BLE001 - llguidance's converter raises bare Exceptions
        raise GrammarError("grammar", f"cannot read the GBNF grammar: {exc}") from None
    return llguidance.LLMatcher.grammar_from_lark(lark)


def _from_choices(choices: object) -> str:
    if isinstance(choices, str) or not isinstance(choices, Sequence):
        raise GrammarError("choices", f"expected a list of strings, not {type(choices).__name__}")
    if not choices or not all(isinstance(c, str) and c for c in choices):
        raise GrammarError("choices", f"{list(choices)!r}: expected a non-empty list of non-empty strings")
    # Lark string literals take JSON's escapes; keep non-ASCII text as it is.
    lark = "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)
    return llguidance.LLMatcher.grammar_from_lark(lark)


def _from_response_format(response_format: object) -> Grammar | None:
    option = "response_format"
    if not isinstance(response_format, dict):
        raise GrammarError(option, f"{response_format!r}: expected an object with a 'type'")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        schema = response_format.get("schema", {"type": "object"})
        return _checked(f"{option}.schema", _from_schema(f"{option}.schema", schema))
    if kind == "json_schema":
        inner = response_format.get("json_schema")
        if not isinstance(inner, dict) or "schema" not in inner:
            raise GrammarError(option, 'type "json_schema" needs "json_schema": {"schema": {...}}')
        where = f"{option}.json_schema.schema"
        return _checked(where, _from_schema(where, inner["schema"]))
    raise GrammarError(option, f"type {kind!r} is not one of 'text', 'json_object', 'json_schema'")


def _checked(option: str, definition: str) -> Grammar:
    """A Grammar once llguidance accepts the definition (bad syntax, unsupported keywords ...)."""
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(definition)
    if is_error:
        raise GrammarError(option, _first_line(messages[0]))
    return Grammar(option, definition)


def _first_line(message: str) -> str:
    """llguidance's message without the grammar dump some errors append (one line for the CLI)."""
    return " ".join(message.strip().splitlines()[:3]) if message else "rejected by llguidance"


# --- our vocabulary -> llguidance's ---------------------------------------------------------
_tokenizers: weakref.WeakKeyDictionary[Any, dict[int, llguidance.LLTokenizer]] = (
    weakref.WeakKeyDictionary()
)
_tokenizers_lock = threading.Lock()


def lltokenizer(tokenizer: Any, n_vocab: int | None = None) -> llguidance.LLTokenizer:
    """llguidance's tokenizer for ours, built once per (tokenizer, n_vocab) and cached.

    n_vocab: the model's logits width when it differs from the vocabulary (extra rows are
    tokens with no bytes, which no grammar allows). Building takes about a second for a 262k
    vocabulary (Gemma 3); later requests reuse it.
    """
    n_vocab = int(n_vocab or tokenizer.n_vocab)
    with _tokenizers_lock:  # two requests of a server must not build it twice
        per_size = _tokenizers.setdefault(tokenizer, {})
        if n_vocab not in per_size:
            per_size[n_vocab] = _build_lltokenizer(tokenizer, n_vocab)
        return per_size[n_vocab]


class _VocabView:
    """What llguidance.TokenizerWrapper reads: token bytes, special ids, BOS/EOS, encode(str)."""

    def __init__(self, tokenizer: Any, n_vocab: int) -> None:
        self._tokenizer = tokenizer
        self.tokens = [_token_bytes(tokenizer, i) for i in range(tokenizer.n_vocab)]
        self.tokens += [b""] * max(0, n_vocab - len(self.tokens))
        self.special_token_ids = [
            i for i, t in enumerate(self.tokens) if t.startswith(_SPECIAL_PREFIX)
        ]
        self.bos_token_id = tokenizer.bos_id
        self.eos_token_id = _eos_ids(tokenizer)[0]

    def __call__(self, text: str) -> list[int]:
        if not isinstance(text, str):  # TokenizerWrapper probes with bytes: we take str only
            raise TypeError("text only")
        return self._tokenizer.encode(text, add_bos=False, special=False)


def _token_bytes(tokenizer: Any, token_id: int) -> bytes:
    """The bytes a token adds to the decoded text. A token that decodes to nothing but has a text
    (BOS, <|im_end|>, <unk>) is special, never text: b"\\xff" + its text, as llama.cpp marks it."""
    visible = tokenizer.token_to_piece(token_id, special=False)
    if visible:
        return visible
    text = tokenizer.token_to_piece(token_id, special=True)
    return _SPECIAL_PREFIX + text if text else b""


def _eos_ids(tokenizer: Any) -> list[int]:
    """The ids that end generation: EOS first, then the other end-of-generation tokens."""
    ids = sorted(tokenizer.eot_ids)
    if tokenizer.eos_id in ids:
        ids.remove(tokenizer.eos_id)
        ids.insert(0, tokenizer.eos_id)
    if not ids:
        raise GrammarError("grammar", "the model's vocabulary has no end-of-generation token to end it")
    return ids


def _build_lltokenizer(tokenizer: Any, n_vocab: int) -> llguidance.LLTokenizer:
    view = _VocabView(tokenizer, n_vocab)
    return llguidance.LLTokenizer(
        llguidance.TokenizerWrapper(view), n_vocab=n_vocab, eos_token=_eos_ids(tokenizer)
    )


# --- one generation's matcher ---------------------------------------------------------------
_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def _mask_executor() -> ThreadPoolExecutor:
    """Worker threads computing masks while forward passes run (shared by all generations)."""
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="hybridllm-grammar")
        return _executor


class Constraint:
    """One generation's LLMatcher: the allowed tokens of the next step, advanced token by token.

    Use: allowed() -> bitmask, sample, advance(token) -> whether the grammar is complete; advance
    starts the next mask on a worker thread, to overlap the forward pass of that token. The first
    mask is computed at construction, so a constraint that matches nothing fails there.
    Not thread-safe: one generation drives it. A server holds one per request.
    """

    def __init__(self, grammar: Grammar, tokenizer: Any, n_vocab: int | None = None) -> None:
        self.grammar = grammar
        self.lltokenizer = lltokenizer(tokenizer, n_vocab)
        self.n_vocab = self.lltokenizer.vocab_size
        self.matcher = llguidance.LLMatcher(self.lltokenizer, grammar.definition, log_level=0)
        self._raise_if_error()
        # One bit per token, token i at bit i % 32 of word i // 32 (llguidance's layout).
        self._bits = np.zeros((self.n_vocab + 31) // 32, dtype=np.int32)
        self._pending: Future[None] | None = None
        self.steps = 0  # tokens consumed
        self._compute()
        self._check_mask()
        self._ready = True  # _bits holds the mask of the next step
        self._done = self.matcher.is_stopped()

    @property
    def done(self) -> bool:
        """The grammar is complete and nothing may follow (only EOS). Known without waiting for
        the next mask, so a decode loop may ask right after advance/accept_token."""
        return self._done

    @property
    def accepting(self) -> bool:
        """The output so far is a whole match (it may stop here; more may still follow)."""
        self._wait()
        return self.matcher.is_accepting()

    def start(self) -> None:
        """Begin computing the mask of the next step on a worker thread (if not done yet)."""
        if not self._ready and self._pending is None:
            self._pending = _mask_executor().submit(self._compute)

    def allowed(self) -> np.ndarray:
        """The bitmask (int32 words) of the tokens allowed next; waits for the computation."""
        if not self._ready:
            self.start()
            self._wait()
            self._ready = True
            self._check_mask()
        return self._bits

    def advance(self, token: int) -> bool:
        """Consume a sampled token -> True when the grammar is complete (stop generating);
        else the next mask starts computing in the background."""
        self._wait()  # the worker must be done with the matcher before we change it
        if not self.matcher.consume_token(int(token)):
            self._raise_if_error()
        self.steps += 1
        self._ready = False
        self._done = self.matcher.is_stopped()
        if not self._done:
            self.start()
        return self._done

    # The engine's per-request hook (engine.Constraint): mask before sampling, then the token.
    def mask_logits(self, logits: np.ndarray) -> np.ndarray:
        """A copy of logits with -inf for the tokens the grammar forbids next."""
        return _mask_logits(logits, self.allowed())

    def accept_token(self, token: int) -> None:
        """advance(token); `done` then says whether the grammar is complete."""
        self.advance(token)

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def _compute(self) -> None:
        # Runs on a worker thread (but the first); llguidance releases the GIL while it computes.
        self.matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)

    def _check_mask(self) -> None:
        where = "at the start" if self.steps == 0 else f"after {self.steps} tokens"
        if self.matcher.is_error():
            detail = _first_line(self.matcher.get_error())
            if self.steps == 0:  # e.g. NoExtension: no byte can begin a match
                detail = f"it matches no text the model can write ({detail})"
            raise GrammarError(self.grammar.option, detail)
        if not self._bits.any():
            raise GrammarError(self.grammar.option, f"the constraint allows no token {where}")

    def _raise_if_error(self) -> None:
        if self.matcher.is_error():
            raise GrammarError(self.grammar.option, _first_line(self.matcher.get_error()))
