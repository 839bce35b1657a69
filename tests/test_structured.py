"""Structured output: the constraint's pieces, the Runner's arguments, the CLI's flags, bad input.

The sampling-heavy proof (30+ schemas on both models) is in test_structured_schemas.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from hybridllm import Runner
from hybridllm.constrain import Constraint, Grammar, compile_grammar, lltokenizer
from hybridllm.errors import ConfigError, GrammarError
from hybridllm.sampling import mask_logits
from hybridllm.tokenizer import Tokenizer

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
# A prompt the models answer with valid JSON anyway (greedy): the constraint must not change it.
FEW_SHOT = (
    'Alice is 30 years old.\n{"name": "Alice", "age": 30}\nBob is 25 years old.\n'
    '{"name": "Bob", "age": 25}\nCarol is 41 years old.\n'
)


@pytest.fixture(scope="module")
def smollm(smollm_path: str) -> Runner:
    return Runner(smollm_path, n_ctx=1024)


@pytest.fixture(scope="module", params=["smollm2-135m", "gemma3-270m"])
def runner(request: pytest.FixtureRequest) -> Runner:
    path = request.getfixturevalue("smollm_path" if request.param.startswith("smol") else "gemma_path")
    return Runner(path, n_ctx=1024)


# --- compile_grammar: bad input is one GrammarError quoting llguidance -----------------------
BAD = [
    ({"json_schema": {"type": "integr"}}, "json_schema", "Invalid type: integr"),
    ({"json_schema": "{not json"}, "json_schema", "not valid JSON"),
    ({"json_schema": [1, 2]}, "json_schema", "expected a JSON Schema object"),
    ({"json_schema": False}, "json_schema", "matches nothing"),
    ({"json_schema": {"type": "integer", "minimum": 5, "maximum": 3}}, "json_schema", "Unsatisfiable"),
    ({"json_schema": {"enum": []}}, "json_schema", "Unsatisfiable"),
    ({"json_schema": {"$ref": "#/$defs/missing"}}, "json_schema", "does not exist"),
    ({"json_schema": {"type": "string", "format": "bogus"}}, "json_schema", "Unknown format: bogus"),
    ({"json_schema": {"type": "string", "pattern": "(("}}, "json_schema", "regex parse error"),
    ({"json_schema": {"not": {"type": "string"}}}, "json_schema", "Unimplemented keys"),
    ({"regex": "(("}, "regex", "invalid regex"),
    ({"regex": "a{5,2}"}, "regex", "invalid regex"),
    ({"regex": 5}, "regex", "expected a string"),
    ({"grammar": "root ::= foo"}, "grammar", "Rule 'foo' not found"),
    ({"grammar": "nonsense"}, "grammar", "Expected ::="),
    ({"grammar": "   "}, "grammar", "empty"),
    ({"choices": []}, "choices", "non-empty list"),
    ({"choices": "abc"}, "choices", "list of strings"),
    ({"choices": ["a", 3]}, "choices", "non-empty list of non-empty strings"),
    ({"response_format": {"type": "xml"}}, "response_format", "'xml' is not one of"),
    ({"response_format": {"type": "json_schema"}}, "response_format", '"json_schema": {"schema"'),
    ({"response_format": "json"}, "response_format", "expected an object"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}},
     "response_format.json_schema.schema", "Invalid type: nope"),
    ({"json_schema": {}, "regex": "a"}, "json_schema and regex", "at most one of"),
]  # fmt: skip


@pytest.mark.parametrize(("kwargs", "option", "fragment"), BAD, ids=[b[1] + ":" + b[2] for b in BAD])
def test_bad_constraints_raise_one_clear_error(kwargs: dict, option: str, fragment: str) -> None:
    with pytest.raises(GrammarError) as info:
        compile_grammar(**kwargs)
    error = info.value
    assert isinstance(error, ValueError) and isinstance(error, ConfigError)
    assert error.option == option
    assert str(error).startswith(f"{option}: ")
    assert fragment in str(error)
    assert "\n" not in str(error)


def test_no_constraint_and_text_format_mean_none() -> None:
    assert compile_grammar() is None
    assert compile_grammar(response_format={"type": "text"}) is None


def test_a_compiled_grammar_passes_through_and_is_reusable() -> None:
    grammar = compile_grammar(json_schema=json.dumps(PERSON))
    assert isinstance(grammar, Grammar) and grammar.option == "json_schema"
    assert compile_grammar(grammar=grammar) is grammar


def test_response_format_shapes() -> None:
    assert compile_grammar(response_format={"type": "json_object"}).option == "response_format.schema"
    wrapped = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    assert compile_grammar(response_format=wrapped).option == "response_format.json_schema.schema"


# --- our vocabulary as llguidance sees it -------------------------------------------------------
def test_lltokenizer_is_built_once_and_renders_our_token_bytes(smollm_path: str) -> None:
    tokenizer = Tokenizer.from_gguf(smollm_path)
    llt = lltokenizer(tokenizer)
    assert lltokenizer(tokenizer) is llt
    assert llt.vocab_size == tokenizer.n_vocab
    assert sorted(llt.eos_tokens) == sorted(tokenizer.eot_ids)
    for token in range(0, tokenizer.n_vocab, 97):
        if tokenizer.is_control(token):
            assert llt.is_special_token(token), token
        else:
            assert llt.decode_bytes([token]) == tokenizer.token_to_piece(token), token
    ids = tokenizer.encode('{"name": "Zoë", "age": 7}', add_bos=False)
    assert llt.decode_bytes(ids) == tokenizer.decode_bytes(ids)


def test_eos_is_allowed_only_where_the_match_may_end(smollm_path: str) -> None:
    tokenizer = Tokenizer.from_gguf(smollm_path)
    constraint = Constraint(compile_grammar(regex="a+"), tokenizer)
    eos = sorted(tokenizer.eot_ids)
    assert not any(_allowed(constraint.allowed(), t) for t in eos)
    (a,) = tokenizer.encode("a", add_bos=False)
    assert constraint.advance(a) is False  # more a's may follow
    assert constraint.accepting and not constraint.done
    assert all(_allowed(constraint.allowed(), t) for t in eos)


def test_each_generation_has_its_own_matcher(smollm_path: str) -> None:
    """Two constraints from one Grammar (two server requests) advance independently."""
    tokenizer = Tokenizer.from_gguf(smollm_path)
    grammar = compile_grammar(choices=["left", "right"])
    first, second = Constraint(grammar, tokenizer), Constraint(grammar, tokenizer)
    left, right = (tokenizer.encode(w, add_bos=False) for w in ("left", "right"))
    for i in range(max(len(left), len(right))):  # interleaved, as a server's decode loop runs
        for constraint, tokens in ((first, left), (second, right)):
            if i < len(tokens):
                assert _allowed(constraint.allowed(), tokens[i])
                constraint.advance(tokens[i])
    assert first.done and second.done


def test_done_is_known_without_waiting_for_the_next_mask(
    smollm_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine asks `done` right after accept_token: that must not join the worker, or the
    mask would no longer overlap the forward pass."""
    tokenizer = Tokenizer.from_gguf(smollm_path)
    constraint = Constraint(compile_grammar(choices=["north wind", "south wind"]), tokenizer)
    tokens = tokenizer.encode("north wind", add_bos=False)
    release = threading.Event()
    compute = Constraint._compute

    def held(self: Constraint) -> None:
        release.wait(timeout=30)
        compute(self)

    monkeypatch.setattr(Constraint, "_compute", held)
    constraint.accept_token(tokens[0])
    assert constraint.done is False
    assert constraint._pending is not None and not constraint._pending.done()
    release.set()
    assert _allowed(constraint.allowed(), tokens[1])


def test_a_constraint_that_matches_nothing_fails_at_construction(smollm_path: str) -> None:
    tokenizer = Tokenizer.from_gguf(smollm_path)
    with pytest.raises(GrammarError, match="matches no text"):
        Constraint(compile_grammar(regex=r"[^\s\S]"), tokenizer)


def _allowed(bits: np.ndarray, token: int) -> bool:
    return bool((int(bits[token // 32]) >> (token % 32)) & 1)


# --- the mask before the samplers -------------------------------------------------------------
def test_mask_logits_forbids_exactly_the_cleared_bits() -> None:
    rng = np.random.default_rng(0)
    n_vocab = 1000
    bits = rng.integers(-(2**31), 2**31, size=(n_vocab + 31) // 32, dtype=np.int64).astype(np.int32)
    logits = rng.standard_normal(n_vocab).astype(np.float32)
    masked = mask_logits(logits, bits)
    expected = [(int(bits[i // 32]) >> (i % 32)) & 1 for i in range(n_vocab)]
    assert masked.dtype == np.float32
    assert np.array_equal(np.isfinite(masked), np.array(expected, dtype=bool))
    assert np.array_equal(masked[np.isfinite(masked)], logits[np.array(expected, dtype=bool)])
    # a logits row wider than the mask: the rows past it are forbidden
    wide = mask_logits(np.zeros(40, dtype=np.float32), np.full(1, -1, dtype=np.int32))
    assert np.isfinite(wide[:32]).all() and np.isneginf(wide[32:]).all()


SAMPLERS = [
    {"temperature": 0},
    {"temperature": 1.5, "top_k": 0, "top_p": 1.0, "min_p": 0.0},
    {"temperature": 0.8, "top_k": 1},
    {"temperature": 0.8, "top_p": 0.3},
    {"temperature": 0.8, "min_p": 0.5},
    {"temperature": 0.8, "repeat_penalty": 1.5, "repeat_last_n": -1},
    {"temperature": 0.8, "presence_penalty": 2.0, "frequency_penalty": 2.0},
]


@pytest.mark.parametrize("sampling", SAMPLERS, ids=[str(s) for s in SAMPLERS])
def test_every_sampler_setting_keeps_to_the_choices(smollm: Runner, sampling: dict) -> None:
    choices = ["north", "south", "east", "west"]
    for seed in (0, 1):
        out = smollm.generate("The wind blows from the", max_tokens=10, seed=seed, choices=choices,
                              **sampling)  # fmt: skip
        assert out in choices
        assert smollm.last_stats.finish_reason == "stop"


# --- the Runner ---------------------------------------------------------------------------------
def test_constrained_greedy_equals_unconstrained_greedy_where_that_is_valid(runner: Runner) -> None:
    """The mask only removes tokens that could not continue a match: where the model writes
    valid output anyway, greedy decoding gives the same text and stops where the match ends."""
    cases = [
        (FEW_SHOT, {"json_schema": PERSON}, 24),
        ("Q: In which year did the Apollo 11 mission land on the Moon?\nA: In ", {"regex": "[0-9]{4}"}, 8),
        ("The colors of the French flag are blue, white and", {"choices": [" red", " yellow", " green"]}, 4),
    ]
    for prompt, constraint, n in cases:
        free = runner.generate(prompt, max_tokens=n, temperature=0)
        constrained = runner.generate(prompt, max_tokens=n, temperature=0, **constraint)
        assert runner.last_stats.finish_reason == "stop", constraint
        assert constrained and free.startswith(constrained), (free, constrained)
    assert json.loads(runner.generate(FEW_SHOT, max_tokens=24, temperature=0, json_schema=PERSON))


def test_masks_after_the_first_are_computed_on_a_worker_thread(
    smollm: Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first mask is computed at the call (so a bad constraint fails there); each later one on
    a worker thread, started as soon as a token is chosen, so it overlaps that token's forward."""
    threads: list[str] = []
    compute = Constraint._compute

    def spy(self: Constraint) -> None:
        threads.append(threading.current_thread().name)
        compute(self)

    monkeypatch.setattr(Constraint, "_compute", spy)
    schema = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 4}
    smollm.generate("Digits: ", max_tokens=20, temperature=0, json_schema=schema)
    assert threads[0] == threading.main_thread().name
    assert len(threads) > 3 and all(name.startswith("hybridllm-grammar") for name in threads[1:])


def test_streaming_gives_the_same_text(smollm: Runner) -> None:
    schema = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "maxItems": 5}
    whole = smollm.generate("Some numbers: ", max_tokens=40, seed=7, json_schema=schema)
    pieces = list(smollm.generate("Some numbers: ", max_tokens=40, seed=7, json_schema=schema, stream=True))
    assert len(pieces) > 1 and "".join(pieces) == whole
    jsonschema.validate(json.loads(whole), schema)


def test_chat_response_format(runner: Runner) -> None:
    pet = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12},
                       "age": {"type": "integer", "minimum": 0, "maximum": 30}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }  # fmt: skip
    messages = [{"role": "user", "content": "Describe a cat named Tom, aged 3, as JSON."}]
    for seed in (1, 2):
        out = runner.chat(messages, max_tokens=60, temperature=0.8, seed=seed,
                          response_format={"type": "json_schema", "json_schema": {"schema": pet}})  # fmt: skip
        jsonschema.validate(json.loads(out), pet)
    # any JSON object, streamed: it may run past max_tokens, so it must at least open an object
    pieces = list(runner.chat(messages, max_tokens=60, temperature=0, stream=True,
                              response_format={"type": "json_object"}))  # fmt: skip
    text = "".join(pieces)
    if runner.last_stats.finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:
        assert runner.last_stats.finish_reason == "length" and text.startswith("{")


def test_bad_constraints_raise_at_the_call_even_when_streaming(smollm: Runner) -> None:
    with pytest.raises(GrammarError, match="^json_schema: Invalid type"):
        smollm.generate("x", json_schema={"type": "integr"}, stream=True)
    with pytest.raises(GrammarError, match="^regex: it matches no text"):
        smollm.generate("x", regex=r"[^\s\S]", stream=True)
    with pytest.raises(GrammarError, match="^response_format: "):
        smollm.chat([{"role": "user", "content": "hi"}], response_format={"type": "yaml"})
    # the Runner still works afterwards
    assert smollm.generate("x", max_tokens=3, choices=["ok"]) == "ok"


def test_max_tokens_cuts_a_constrained_output(smollm: Runner) -> None:
    out = smollm.generate("A list: ", max_tokens=3, temperature=0, json_schema={"type": "array"})
    assert smollm.last_stats.finish_reason == "length"
    assert smollm.last_stats.generated_tokens == 3 and out.startswith("[")


# --- the CLI ------------------------------------------------------------------------------------
def hybridllm(command: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "HYBRIDLLM_DEBUG"}
    return subprocess.run([command, *args], env={**env, "COLUMNS": "80"}, input=stdin,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_cli_run_json_schema_file(command: str, smollm_path: str, tmp_path: Path) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
              "population": {"type": "integer", "minimum": 0}}, "required": ["city", "population"],
              "additionalProperties": False}  # fmt: skip
    path = tmp_path / "city.json"
    path.write_text(json.dumps(schema), encoding="utf-8")
    result = hybridllm(command, "run", smollm_path, "-p", "The largest city in France as JSON: ",
                       "--json-schema", str(path), "--seed", "3", "-n", "80", "-c", "256")  # fmt: skip
    assert result.returncode == 0, result.stderr
    jsonschema.validate(json.loads(result.stdout), schema)


def test_cli_run_regex_and_grammar_file(command: str, smollm_path: str) -> None:
    result = hybridllm(command, "run", smollm_path, "-p", "A date: ", "--regex", r"20[0-9]{2}-0[1-9]",
                       "--seed", "1", "-c", "256")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"20[0-9]{2}-0[1-9]\n", result.stdout), result.stdout
    grammar = Path(__file__).parent / "data" / "grammars" / "json_arr.gbnf"
    result = hybridllm(command, "run", smollm_path, "-p", "A JSON list: ", "--grammar-file", str(grammar),
                       "--temp", "0", "-n", "60", "-c", "256")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("[")


def test_cli_chat_json_schema(command: str, smollm_path: str) -> None:
    result = hybridllm(command, "chat", smollm_path, "--json-schema", json.dumps(PERSON), "--temp", "0",
                       "-n", "60", "-c", "512", stdin="Tom is a cat aged 3.\n")  # fmt: skip
    assert result.returncode == 0, result.stderr
    start = result.stdout.index("{")
    reply, _ = json.JSONDecoder().raw_decode(result.stdout[start:])
    jsonschema.validate(reply, PERSON)


@pytest.mark.parametrize(
    ("args", "fault"),
    [
        (["--json-schema", '{"type": "integr"}'], '--json-schema {"type": "integr"}: Invalid type: integr'),
        (["--json-schema", "/no/such/schema.json"], "--json-schema /no/such/schema.json: cannot read it"),
        (["--json-schema", "{oops"], "--json-schema {oops: not valid JSON"),
        (["--regex", "(("], "--regex ((: "),
        (["--regex", r"[^\s\S]"], "matches no text the model can write"),
        (["--grammar-file", "/no/such.gbnf"], "--grammar-file /no/such.gbnf: cannot read it"),
        (["--regex", "a", "--json-schema", "{}"], "not allowed with argument"),
    ],
)
def test_cli_bad_constraint_is_one_error_line(command: str, smollm_path: str, args: list[str],
                                              fault: str) -> None:  # fmt: skip
    for sub in ("run", "chat"):
        extra = ["-p", "x"] if sub == "run" else []
        result = hybridllm(command, sub, smollm_path, *extra, *args, "-c", "256")
        lines = result.stderr.splitlines()
        assert result.returncode == 2, result.stderr
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        assert fault in lines[0], lines[0]
        assert "Traceback" not in result.stderr + result.stdout


def test_cli_bad_gbnf_file_names_the_flag(command: str, smollm_path: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.gbnf"
    path.write_text('root ::= "a" missing\n', encoding="utf-8")
    result = hybridllm(command, "run", smollm_path, "-p", "x", "--grammar-file", str(path))
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: --grammar-file {path}: cannot read the GBNF grammar")
    assert "missing" in result.stderr and len(result.stderr.splitlines()) == 1
