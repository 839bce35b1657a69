"""Structured output on the two real models: JSON Schemas, regexes and llama.cpp's GBNF grammars.

Every schema below is sampled at temperature 0.8 with two seeds on SmolLM2 and Gemma 3; every
output must parse and validate with `jsonschema`. Regex outputs must `re.fullmatch`; grammar
outputs (GBNF files copied from llama.cpp's grammars/) are checked by a second llguidance matcher
fed the output one byte at a time, so our vocabulary's token bytes are checked too. Strings are
bounded (maxLength, pattern, enum, format) where the schema allows, so runs end in few tokens.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import llguidance
import pytest

from hybridllm import Runner
from hybridllm.constrain import Grammar, compile_grammar

GRAMMARS = Path(__file__).parent / "data" / "grammars"
SEEDS = (1, 2)
NAME = {"type": "string", "minLength": 1, "maxLength": 16}

SCHEMAS: dict[str, dict] = {
    "object_required": {
        "type": "object",
        "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"],
    },
    "nested_object": {
        "type": "object",
        "properties": {
            "name": NAME,
            "address": {
                "type": "object",
                "properties": {
                    "city": NAME,
                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                },
                "required": ["city", "zip"],
                "additionalProperties": False,
            },
        },
        "required": ["name", "address"],
        "additionalProperties": False,
    },
    "array_integers_2_to_4": {
        "type": "array",
        "items": {"type": "integer", "minimum": -50, "maximum": 50},
        "minItems": 2,
        "maxItems": 4,
    },
    "array_enum_1_to_3": {
        "type": "array",
        "items": {"enum": ["red", "green", "blue", "yellow"]},
        "minItems": 1,
        "maxItems": 3,
    },
    "enum_strings": {"enum": ["cat", "dog", "bird"]},
    "enum_mixed": {"enum": ["yes", 1, None, True, 2.5]},
    "const": {
        "type": "object",
        "properties": {"version": {"const": 2}, "kind": {"const": "report"}},
        "required": ["version", "kind"],
        "additionalProperties": False,
    },
    "number_bounds": {
        "type": "object",
        "properties": {
            "probability": {"type": "number", "minimum": 0, "maximum": 1},
            "temperature": {"type": "number", "minimum": -40.5, "maximum": 50},
        },
        "required": ["probability", "temperature"],
        "additionalProperties": False,
    },
    "integer_exclusive": {"type": "integer", "exclusiveMinimum": 10, "exclusiveMaximum": 20},
    "integer_negative_range": {"type": "integer", "minimum": -1000, "maximum": -10},
    "string_pattern": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
    "string_length": {"type": "string", "minLength": 3, "maxLength": 8},
    "format_date": {
        "type": "object",
        "properties": {"event": NAME, "date": {"type": "string", "format": "date"}},
        "required": ["event", "date"],
        "additionalProperties": False,
    },
    "format_uuid_date": {
        "type": "object",
        "properties": {
            "id": {"type": "string", "format": "uuid"},
            "day": {"type": "string", "format": "date"},
        },
        "required": ["id", "day"],
        "additionalProperties": False,
    },
    "optional_properties": {
        "type": "object",
        "properties": {"title": NAME, "subtitle": NAME, "pages": {"type": "integer", "minimum": 1, "maximum": 999}},
        "required": ["title"],
        "additionalProperties": False,
    },
    "no_additional_properties": {
        "type": "object",
        "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9}, "y": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["x", "y"],
        "additionalProperties": False,
    },
    "additional_properties_typed": {
        "type": "object",
        "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 99}},
        "required": ["id"],
        "additionalProperties": {"type": "boolean"},
        "maxProperties": 3,
    },
    "any_of_scalar": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 99}, {"type": "boolean"}, NAME]},
    "any_of_objects": {
        "anyOf": [
            {
                "type": "object",
                "properties": {"shape": {"const": "circle"}, "radius": {"type": "integer", "minimum": 1, "maximum": 10}},
                "required": ["shape", "radius"],
                "additionalProperties": False,
            },
            {
                "type": "object",
                "properties": {"shape": {"const": "square"}, "side": {"type": "integer", "minimum": 1, "maximum": 10}},
                "required": ["shape", "side"],
                "additionalProperties": False,
            },
        ]
    },
    "ref_defs": {
        "$defs": {
            "point": {
                "type": "object",
                "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9}, "y": {"type": "integer", "minimum": -9, "maximum": 9}},
                "required": ["x", "y"],
                "additionalProperties": False,
            }
        },
        "type": "object",
        "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
        "required": ["start", "end"],
        "additionalProperties": False,
    },
    "ref_defs_enum_array": {
        "$defs": {"level": {"enum": ["low", "medium", "high"]}},
        "type": "array",
        "items": {"$ref": "#/$defs/level"},
        "minItems": 2,
        "maxItems": 2,
    },
    "boolean": {"type": "boolean"},
    "nullable": {
        "type": "object",
        "properties": {"nickname": {"anyOf": [NAME, {"type": "null"}]}},
        "required": ["nickname"],
        "additionalProperties": False,
    },
    "type_list": {"type": ["integer", "null"], "minimum": 0, "maximum": 5},
    "array_of_objects": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"sku": {"type": "string", "pattern": "^[a-z]{2}[0-9]{2}$"}, "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
            "required": ["sku", "qty"],
            "additionalProperties": False,
        },
        "minItems": 1,
        "maxItems": 2,
    },
    "matrix_2x2": {
        "type": "array",
        "items": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 2, "maxItems": 2},
        "minItems": 2,
        "maxItems": 2,
    },
    "tuple_prefix_items": {
        "type": "array",
        "prefixItems": [NAME, {"type": "integer", "minimum": 0, "maximum": 99}, {"type": "boolean"}],
        "items": False,
    },
    "all_of": {
        "allOf": [
            {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["a"]},
            {"type": "object", "properties": {"b": {"enum": ["x", "y"]}}, "required": ["b"]},
        ],
        "additionalProperties": False,
        "properties": {"a": {}, "b": {}},
    },
    "annotations": {
        "title": "Book",
        "description": "A book with annotations that constrain nothing",
        "type": "object",
        "properties": {
            "title": {**NAME, "description": "the title", "examples": ["Dune"]},
            "year": {"type": "integer", "minimum": 1450, "maximum": 2030, "default": 2000},
        },
        "required": ["title", "year"],
        "additionalProperties": False,
    },
    "recipe": {
        "type": "object",
        "properties": {
            "dish": NAME,
            "servings": {"type": "integer", "minimum": 1, "maximum": 12},
            "vegetarian": {"type": "boolean"},
            "steps": {"type": "array", "items": {"type": "string", "maxLength": 20}, "minItems": 1, "maxItems": 2},
        },
        "required": ["dish", "servings", "vegetarian", "steps"],
        "additionalProperties": False,
    },
    "order_status": {
        "type": "object",
        "properties": {
            "order": {"type": "integer", "minimum": 1000, "maximum": 9999},
            "status": {"enum": ["pending", "shipped", "delivered"]},
            "shipped_on": {"anyOf": [{"type": "string", "format": "date"}, {"type": "null"}]},
        },
        "required": ["order", "status", "shipped_on"],
        "additionalProperties": False,
    },
    "pattern_properties": {
        "type": "object",
        "patternProperties": {"^[a-z]{1,6}$": {"type": "integer", "minimum": 0, "maximum": 9}},
        "additionalProperties": False,
        "minProperties": 1,
        "maxProperties": 2,
    },
}

REGEXES = {
    "iso_date": r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])",
    "phone": r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}",
    "yes_no": r"(yes|no)",
    "word_then_number": r"[A-Za-z]{2,10} [0-9]{1,3}",
    "hex_color": r"#[0-9a-f]{6}",
    "ipv4": r"((25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])",
}

# Grammars whose language is finite enough to finish in a few dozen tokens get a small
# max_tokens; the others may stop at max_tokens, where the output must still be a valid prefix.
GBNF_FILES = ("json.gbnf", "json_arr.gbnf", "list.gbnf", "arithmetic.gbnf", "chess.gbnf", "c.gbnf")


@pytest.fixture(scope="module", params=["smollm2-135m", "gemma3-270m"])
def runner(request: pytest.FixtureRequest) -> Runner:
    path = request.getfixturevalue("smollm_path" if request.param.startswith("smol") else "gemma_path")
    return Runner(path, n_ctx=2048)


def test_there_are_30_schemas_of_every_kind() -> None:
    text = json.dumps(SCHEMAS)
    assert len(SCHEMAS) >= 30
    for keyword in ('"minItems"', '"maxItems"', '"enum"', '"const"', '"minimum"', '"pattern"',
                    '"format": "date"', '"required"', '"additionalProperties": false', '"anyOf"',
                    '"$ref"', '"$defs"', '"type": "number"', '"type": "integer"'):  # fmt: skip
        assert keyword in text, keyword
    for schema in SCHEMAS.values():
        jsonschema.Draft202012Validator.check_schema(schema)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_sampled_json_validates(runner: Runner, name: str) -> None:
    schema = SCHEMAS[name]
    prompt = f"Give one example that fits this JSON Schema.\nSchema: {json.dumps(schema)}\nExample: "
    for seed in SEEDS:
        out = runner.generate(prompt, max_tokens=160, temperature=0.8, seed=seed, json_schema=schema)
        assert runner.last_stats.finish_reason in ("stop", "eos"), (seed, out)
        jsonschema.validate(json.loads(out), schema)


@pytest.mark.parametrize("name", sorted(REGEXES))
def test_sampled_text_fullmatches_the_regex(runner: Runner, name: str) -> None:
    pattern = REGEXES[name]
    for seed in SEEDS:
        out = runner.generate(f"An example of {name.replace('_', ' ')}: ", max_tokens=40,
                              temperature=0.8, seed=seed, regex=pattern)  # fmt: skip
        assert runner.last_stats.finish_reason in ("stop", "eos"), (seed, out)
        assert re.fullmatch(pattern, out), (seed, out)


@pytest.mark.parametrize("file", GBNF_FILES)
def test_sampled_text_matches_the_gbnf_grammar(runner: Runner, file: str) -> None:
    text = (GRAMMARS / file).read_text(encoding="utf-8")
    for seed in SEEDS:
        out = runner.generate("Here is an example:\n", max_tokens=48, temperature=0.8, seed=seed,
                              grammar=text)  # fmt: skip
        finished = runner.last_stats.finish_reason in ("stop", "eos")
        assert out, seed
        assert_matches(text, out.encode("utf-8"), complete=finished)
        if file.startswith("json") and finished:
            json.loads(out)


def assert_matches(grammar: str | Grammar, data: bytes, complete: bool) -> None:
    """An independent check: llguidance's matcher over a one-byte-per-token vocabulary (so it
    does not share our token bytes), fed the output byte by byte."""
    definition = compile_grammar(grammar=grammar).definition
    matcher = llguidance.LLMatcher(_byte_tokenizer(), definition, log_level=0)
    assert matcher.consume_tokens(list(data)), (matcher.get_error(), data)
    if complete:
        assert matcher.is_accepting(), data


class _Bytes:
    """A vocabulary of the 256 bytes plus an EOS, for llguidance.TokenizerWrapper."""

    tokens = [bytes([b]) for b in range(256)] + [b"\xff<eos>"]
    special_token_ids = [256]
    eos_token_id, bos_token_id = 256, None

    def __call__(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError("text only")
        return list(text.encode("utf-8"))


_BYTE_TOKENIZER: list[llguidance.LLTokenizer] = []


def _byte_tokenizer() -> llguidance.LLTokenizer:
    if not _BYTE_TOKENIZER:
        _BYTE_TOKENIZER.append(llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Bytes())))
    return _BYTE_TOKENIZER[0]


def test_the_byte_checker_refuses_what_the_grammar_does_not_match() -> None:
    """The checker above can fail: a wrong byte or an unfinished match is caught."""
    grammar = (GRAMMARS / "json.gbnf").read_text(encoding="utf-8")
    assert_matches(grammar, b'{"a": [1, 2.5, "x"]}', complete=True)
    assert_matches(grammar, b'{"a": [1, 2', complete=False)
    with pytest.raises(AssertionError):
        assert_matches(grammar, b'{"a": ]', complete=False)
    with pytest.raises(AssertionError):
        assert_matches(grammar, b'{"a": [1, 2', complete=True)


def test_json_whitespace_is_bounded_like_llama_cpp() -> None:
    """Between JSON tokens: nothing, a space, or up to two newlines and 20 spaces or tabs."""
    grammar = compile_grammar(json_schema={"type": "object", "properties": {"a": {"type": "integer"}}})
    assert_matches(grammar, b'{"a":1}', complete=True)
    assert_matches(grammar, b'{\n  "a": 1\n}', complete=True)
    assert_matches(grammar, b'{\n\n' + b" " * 20 + b'"a": 1}', complete=True)
    for loose in (b'{  "a": 1}', b'{\n\n\n"a": 1}', b'{\n' + b" " * 21 + b'"a"'):
        with pytest.raises(AssertionError):
            assert_matches(grammar, loose, complete=False)


def test_integers_without_bounds_get_16_digits_at_most() -> None:
    grammar = compile_grammar(json_schema={"type": "object", "properties": {"n": {"type": "integer"}}})
    assert_matches(grammar, b'{"n": -9007199254740991}', complete=True)
    with pytest.raises(AssertionError):
        assert_matches(grammar, b'{"n": 9007199254740992}', complete=True)
    # bounds the schema gives stay as they are; const and enum values are data, not schemas
    wide = {"type": "integer", "minimum": 0, "maximum": 10**18}
    assert_matches(compile_grammar(json_schema=wide), b"123456789012345678", complete=True)
    data = {"const": {"type": "integer"}}
    assert_matches(compile_grammar(json_schema=data), b'{"type": "integer"}', complete=True)
