"""`hybridllm serve`: the real server process on 127.0.0.1, spoken to with the official `openai`
client and raw HTTP (httpx). Answers are compared with Runner (and llama.cpp) on the same file.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

openai = pytest.importorskip("openai")

from oracle import PROMPTS as ALL_PROMPTS  # noqa: E402

from hybridllm.runner import Runner  # noqa: E402

N_CTX = 512
API_KEY = "sekrit-key"
# Twelve of the oracle's prompts; the stop-string test wants the days of the week last.
PROMPTS = [*ALL_PROMPTS[:10], ALL_PROMPTS[11], ALL_PROMPTS[-1]]
QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "What is 12 times 7?",
    "Who wrote Hamlet?",
    "Give me a tip for learning Python.",
    "What is the boiling point of water?",
    "Say hello in Spanish.",
]
#: Generous bound for the server to start or to settle (a loaded, shared CI machine).
DEADLINE_SECONDS = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`hybridllm serve MODEL` in a child process, ready when /health answers 200."""

    def __init__(self, model: str, *args: str, api_key: str | None = None) -> None:
        self.key = api_key
        for _ in range(3):  # a free port may be taken by another process before the server binds it
            self.port = _free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            command = [sys.executable, "-m", "hybridllm.cli", "serve", model, "--port", str(self.port),
                       "-c", str(N_CTX), "-t", "2", *args]  # fmt: skip
            if api_key:
                command += ["--api-key", api_key]
            self.proc = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            self.http = httpx.Client(base_url=self.url, timeout=DEADLINE_SECONDS)
            if self._ready():
                return
        raise RuntimeError("no free port to start the server on")

    def _ready(self) -> bool:
        """Wait for /health 200 -> True; False when the port was taken; else raise."""
        deadline = time.monotonic() + DEADLINE_SECONDS
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read()
                if "cannot listen" in err:
                    return False
                raise RuntimeError(f"the server exited: {err}")
            try:
                if self.http.get("/health").status_code == 200:
                    return True
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError("the server did not become ready")

    def client(self, key: str | None = None) -> Any:
        return openai.OpenAI(
            base_url=f"{self.url}/v1", api_key=key or self.key or "none", max_retries=0
        )

    def post(self, path: str, body: Any, **kw: Any) -> httpx.Response:
        return self.http.post(path, json=body, headers=self._auth(), **kw)

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def slots(self) -> list[dict[str, Any]]:
        return self.http.get("/slots", headers=self._auth()).json()

    def close(self) -> str:
        alive = self.proc.poll() is None
        self.proc.terminate()
        _, err = self.proc.communicate(timeout=30)
        self.http.close()
        assert alive, f"the server died during the tests: {err}"
        return err


@pytest.fixture(scope="module")
def server(smollm_path: str):  # noqa: ANN201
    s = Server(smollm_path, "-np", "4", "--max-queue", "16")
    yield s
    s.close()


@pytest.fixture(scope="module")
def keyed(smollm_path: str):  # noqa: ANN201
    """One slot, one waiting place, an API key."""
    s = Server(smollm_path, "-np", "1", "--max-queue", "1", api_key=API_KEY)
    yield s
    s.close()


@pytest.fixture(scope="module")
def runner(smollm_path: str) -> Runner:
    return Runner(smollm_path, n_ctx=N_CTX, n_threads=2)


def _chat(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


def _sse(response: httpx.Response) -> list[Any]:
    """The events of a stream: parsed JSON, and "[DONE]" as a string."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


# --- answers --------------------------------------------------------------------------------
def test_health_and_models(server: Server, smollm_path: str) -> None:
    health = server.http.get("/health").json()
    assert health["status"] == "ok" and health["slots_idle"] + health["slots_processing"] == 4
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["smollm2-135m"]


def test_chat_equals_runner_streamed_and_not(server: Server, runner: Runner) -> None:
    client = server.client()
    for question in QUESTIONS[:3]:
        messages = _chat(question)
        reply = client.chat.completions.create(
            model="x", messages=messages, max_tokens=24, temperature=0
        )
        expected = runner.chat(messages, max_tokens=24, temperature=0)
        assert reply.choices[0].message.content == expected
        assert reply.choices[0].message.role == "assistant"
        assert reply.usage.prompt_tokens == len(runner.chat_tokens(messages))
        assert reply.usage.completion_tokens == runner.last_stats.generated_tokens
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
        reason = "length" if runner.last_stats.finish_reason == "length" else "stop"
        assert reply.choices[0].finish_reason == reason
        chunks = list(client.chat.completions.create(model="x", messages=messages, max_tokens=24,
                                                     temperature=0, stream=True))  # fmt: skip
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
        assert chunks[-1].choices[0].finish_reason == reason


def test_completions_equal_runner_and_llama_cpp(
    server: Server, runner: Runner, smollm_path: str
) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    client = server.client()

    def ask(prompt: str) -> str:
        return (
            client.completions.create(model="x", prompt=prompt, max_tokens=20, temperature=0)
            .choices[0]
            .text
        )

    with ThreadPoolExecutor(4) as pool:
        ours = list(pool.map(ask, PROMPTS))
    assert ours == [runner.generate(p, max_tokens=20, temperature=0) for p in PROMPTS]
    llm = llama_cpp.Llama(smollm_path, n_ctx=N_CTX, n_threads=2, verbose=False)
    theirs = [llm.create_completion(p, max_tokens=20, temperature=0.0, repeat_penalty=1.0)["choices"][0]["text"]
              for p in PROMPTS]  # fmt: skip
    same = sum(a == b for a, b in zip(ours, theirs, strict=True))
    assert same >= 0.9 * len(PROMPTS), (
        f"greedy completions equal to llama.cpp's: {same}/{len(PROMPTS)}"
    )


def test_streamed_completion_ends_with_usage_and_done(server: Server, runner: Runner) -> None:
    body = {"prompt": PROMPTS[0], "max_tokens": 16, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    with server.http.stream("POST", "/v1/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = _sse(response)
    assert events[-1] == "[DONE]"
    usage_chunk, finish_chunk = events[-2], events[-3]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 16
    assert usage_chunk["usage"]["prompt_tokens"] == len(runner.tokenize(PROMPTS[0], special=True))
    assert finish_chunk["choices"][0]["finish_reason"] == "length"
    text = "".join(e["choices"][0]["text"] for e in events[:-2])
    plain = server.post("/v1/completions", {**body, "stream": False}).json()
    assert (
        text
        == plain["choices"][0]["text"]
        == runner.generate(PROMPTS[0], max_tokens=16, temperature=0)
    )
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert [plain["usage"][k] for k in counts] == [usage_chunk["usage"][k] for k in counts]
    assert plain["usage"]["prompt_tokens_details"]["cached_tokens"] > 0  # the same prompt again


def test_stop_strings(server: Server, runner: Runner) -> None:
    prompt, stop = PROMPTS[-1], [" Friday", "Sunday"]
    reply = server.client().completions.create(
        model="x", prompt=prompt, max_tokens=32, temperature=0, stop=stop
    )
    expected = runner.generate(prompt, max_tokens=32, temperature=0, stop=stop)
    assert reply.choices[0].text == expected and "Friday" not in expected
    assert (
        reply.choices[0].finish_reason
        == "stop"
        == {"stop": "stop"}.get(runner.last_stats.finish_reason)
    )
    chunks = list(server.client().completions.create(model="x", prompt=prompt, max_tokens=32, temperature=0,
                                                     stop=stop, stream=True))  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks) == expected


def test_seed_and_penalties_equal_runner(server: Server, smollm_path: str) -> None:
    """The same seeded request twice gives a fresh Runner's text both times. cache_prompt=false
    makes the second evaluate its whole prompt, as the fresh Runner does: logits after a reused
    prefix may differ in the last bits (other kernel splits, as in llama.cpp; seen on AVX2), and
    temperature 1 can turn that into another token."""
    client = server.client()
    sampling = dict(
        temperature=1.0, top_p=0.9, seed=7, presence_penalty=0.5, frequency_penalty=0.25
    )
    extra = {"top_k": 20, "min_p": 0.02, "repeat_penalty": 1.1, "cache_prompt": False}
    texts = [
        client.completions.create(
            model="x", prompt=PROMPTS[1], max_tokens=24, extra_body=extra, **sampling
        )
        .choices[0]
        .text  # fmt: skip
        for _ in range(2)
    ]
    del extra["cache_prompt"]
    fresh = Runner(smollm_path, n_ctx=N_CTX, n_threads=2)
    expected = fresh.generate(PROMPTS[1], max_tokens=24, **sampling, **extra)
    assert texts == [expected, expected]


def test_cache_prompt_reuses_the_slot_prefix(server: Server) -> None:
    """A repeated prompt reports its cached tokens; with cache_prompt=false none are reused."""
    body = {"prompt": PROMPTS[0] + " and then", "max_tokens": 2, "temperature": 0}
    server.post("/v1/completions", body)
    again = server.post("/v1/completions", body).json()["usage"]
    fresh = server.post("/v1/completions", {**body, "cache_prompt": False}).json()["usage"]
    assert again["prompt_tokens_details"]["cached_tokens"] == again["prompt_tokens"] - 1
    assert fresh["prompt_tokens_details"]["cached_tokens"] == 0


def test_chat_logprobs(server: Server, runner: Runner) -> None:
    reply = server.client().chat.completions.create(
        model="x",
        messages=_chat(QUESTIONS[0]),
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens == 6
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.token == entry.top_logprobs[0].token  # greedy: the most likely token
        assert entry.bytes == list(entry.token.encode())
    assert "".join(e.token for e in content) == reply.choices[0].message.content


def test_completion_logprobs_legacy_shape(server: Server) -> None:
    body = {"prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0, "logprobs": 2}
    choice = server.post("/v1/completions", body).json()["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 4
    assert "".join(lp["tokens"]) == choice["text"]
    assert lp["text_offset"][0] == 0 and all(len(top) == 2 for top in lp["top_logprobs"])


def test_tokenize_and_detokenize(server: Server, runner: Runner) -> None:
    text = "Hello world, <|im_start|> again"
    ids = server.post("/tokenize", {"content": text}).json()["tokens"]
    assert ids == runner.tokenize(text, add_bos=False, special=True)
    pieces = server.post("/tokenize", {"content": "Hello world", "with_pieces": True}).json()[
        "tokens"
    ]
    assert "".join(p["piece"] for p in pieces) == "Hello world"
    assert server.post("/detokenize", {"tokens": ids}).json()["content"] == runner.detokenize(ids)


def test_eight_concurrent_requests_each_equal_alone(server: Server) -> None:
    client = server.client()

    def ask(question: str) -> str:
        reply = client.chat.completions.create(
            model="x", messages=_chat(question), max_tokens=32, temperature=0
        )
        return reply.choices[0].message.content

    alone = [ask(q) for q in QUESTIONS]
    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        together = list(pool.map(ask, QUESTIONS))
    assert together == alone


def test_disconnect_mid_stream_frees_the_slot(server: Server) -> None:
    # ignore_eos with no max_tokens: this stream would run until the slot's context is full
    body = {"prompt": PROMPTS[1], "temperature": 0, "stream": True, "ignore_eos": True}
    with server.http.stream("POST", "/v1/completions", json=body) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        assert any(s["is_processing"] for s in server.slots())
    deadline = time.monotonic() + DEADLINE_SECONDS
    while any(s["is_processing"] for s in server.slots()) and time.monotonic() < deadline:
        time.sleep(0.05)
    slots = server.slots()
    assert not any(s["is_processing"] for s in slots)
    assert max(s["n_cached"] for s in slots) < N_CTX - 1  # stopped early, not at a full context


def test_disconnect_while_waiting_for_a_whole_answer_frees_the_slot(server: Server) -> None:
    body = {"prompt": PROMPTS[2], "temperature": 0, "ignore_eos": True}  # until the context is full
    with pytest.raises(httpx.ReadTimeout):
        server.http.post("/v1/completions", json=body, timeout=httpx.Timeout(5, read=0.3))
    deadline = time.monotonic() + DEADLINE_SECONDS
    while any(s["is_processing"] for s in server.slots()) and time.monotonic() < deadline:
        time.sleep(0.05)
    slots = server.slots()
    assert not any(s["is_processing"] for s in slots)
    assert max(s["n_cached"] for s in slots) < N_CTX - 1


# --- errors ---------------------------------------------------------------------------------
def _error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "code"} and error["message"]
    return error


CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
BAD_CHAT_BODIES = [
    {**CHAT, "temperature": "hot"},
    {**CHAT, "temperature": -1},
    {**CHAT, "top_p": 5},
    {**CHAT, "top_k": -3},
    {**CHAT, "min_p": 1.5},
    {**CHAT, "max_tokens": True},
    {**CHAT, "max_tokens": -7},
    {**CHAT, "max_completion_tokens": 2.5},
    {**CHAT, "n": 2},
    {**CHAT, "seed": -5},
    {**CHAT, "stop": 5},
    {**CHAT, "presence_penalty": 3},
    {**CHAT, "repeat_penalty": 0},
    {**CHAT, "logprobs": True, "top_logprobs": 50},
    {**CHAT, "stream": "yes"},
    {"messages": []},
    {"messages": "hi"},
    {"messages": [{"role": "user", "content": 5}]},
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
    {"messages": [{"role": "alien", "content": "x"}]},
    {"max_tokens": 2},
]


@pytest.mark.parametrize("body", BAD_CHAT_BODIES, ids=lambda b: ",".join(b)[:60])
def test_bad_parameters_are_400(server: Server, body: dict) -> None:
    error = _error(server.post("/v1/chat/completions", body), 400)
    assert error["type"] == "invalid_request_error"


def test_bad_completion_prompts_are_400(server: Server) -> None:
    for prompt in ([10**9], [-1], ["a", "b"], 5, None):
        _error(server.post("/v1/completions", {"prompt": prompt, "max_tokens": 2}), 400)
    _error(server.post("/detokenize", {"tokens": [-3]}), 400)
    _error(server.post("/v1/completions", {"prompt": "x", "logprobs": 99}), 400)
    assert (
        "echo"
        in _error(server.post("/v1/completions", {"prompt": "x", "echo": True}), 400)["message"]
    )


def test_openai_client_sees_bad_request(server: Server) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        server.client().chat.completions.create(model="x", messages=_chat("Hi"), temperature=-2)
    assert "temperature" in info.value.body["message"]


def test_malformed_json_is_400(server: Server) -> None:
    for raw in (b'{"prompt": "x",', b"\xff\xfe", b"[]", b"null", b"[" * 100_000):
        response = server.http.post(
            "/v1/completions", content=raw, headers={"content-type": "application/json"}
        )
        _error(response, 400)


def test_prompt_longer_than_the_context_is_400(server: Server) -> None:
    error = _error(
        server.post("/v1/completions", {"prompt": "word " * N_CTX, "max_tokens": 2}), 400
    )
    assert error["code"] == "context_length_exceeded" and str(N_CTX) in error["message"]
    # far too long to tokenize at all: refused by its size in bytes
    huge = {"messages": [{"role": "user", "content": "word " * 100_000}]}
    error = _error(server.post("/v1/chat/completions", huge), 400)
    assert error["code"] == "context_length_exceeded" and "at least" in error["message"]


def test_unknown_route_is_404_and_unknown_fields_are_ignored(server: Server) -> None:
    assert _error(server.http.get("/v2/nothing"), 404)["type"] == "not_found_error"
    ok = server.post(
        "/v1/completions",
        {"prompt": "Hi", "max_tokens": 2, "logit_bias": {}, "user": "u", "zzz": [1]},
    )
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 2


def test_oversized_body_is_413(server: Server) -> None:
    big = {"prompt": "x" * (9 << 20), "max_tokens": 1}
    assert _error(server.post("/v1/completions", big), 413)["code"] == "request_too_large"


def test_server_still_serves_after_the_errors(server: Server, runner: Runner) -> None:
    reply = server.post(
        "/v1/completions", {"prompt": PROMPTS[3], "max_tokens": 8, "temperature": 0}
    )
    assert reply.json()["choices"][0]["text"] == runner.generate(
        PROMPTS[3], max_tokens=8, temperature=0
    )
    assert not any(s["is_processing"] for s in server.slots())


def test_api_key(keyed: Server) -> None:
    assert keyed.http.get("/health").status_code == 200  # /health needs no key
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        error = _error(
            keyed.http.post("/v1/completions", json={"prompt": "x"}, headers=headers), 401
        )
        assert error["type"] == "authentication_error"
    _error(keyed.http.get("/v1/models"), 401)
    with pytest.raises(openai.AuthenticationError):
        keyed.client("wrong").completions.create(model="x", prompt="Hi", max_tokens=1)
    assert (
        keyed.client()
        .completions.create(model="x", prompt="Hi", max_tokens=1)
        .usage.completion_tokens
        == 1
    )


def test_full_queue_is_503(keyed: Server) -> None:
    """One slot busy, one request waiting: the next one is refused with 503, and the waiting one
    is served once the busy one's client goes away."""
    busy = {"prompt": PROMPTS[1], "temperature": 0, "stream": True, "ignore_eos": True}
    waiting: dict[str, httpx.Response] = {}

    def wait_in_queue() -> None:
        with httpx.Client(
            base_url=keyed.url, timeout=DEADLINE_SECONDS, headers=keyed._auth()
        ) as own:
            waiting["r"] = own.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})

    waiter = threading.Thread(target=wait_in_queue)
    with httpx.Client(base_url=keyed.url, timeout=DEADLINE_SECONDS, headers=keyed._auth()) as own:
        with own.stream("POST", "/v1/completions", json=busy) as stream:
            lines = stream.iter_lines()  # kept: closing it would close the connection
            assert next(line for line in lines if line.startswith("data: "))
            waiter.start()
            deadline = time.monotonic() + DEADLINE_SECONDS
            while (health := keyed.http.get("/health").json())["requests_waiting"] < 1:
                assert time.monotonic() < deadline and health["slots_processing"] == 1, health
                time.sleep(0.02)
            error = _error(keyed.post("/v1/completions", {"prompt": "Hi", "max_tokens": 2}), 503)
            assert error["code"] == "queue_full"
    waiter.join()
    assert waiting["r"].status_code == 200


def test_structured_output(server: Server, runner: Runner) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
              "required": ["city"], "additionalProperties": False}  # fmt: skip
    response_format = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    messages = _chat("What is the capital of France? Answer in JSON.")
    reply = server.client().chat.completions.create(
        model="x", messages=messages, max_tokens=40, temperature=0, response_format=response_format
    )
    content = reply.choices[0].message.content
    assert set(json.loads(content)) == {"city"} and reply.choices[0].finish_reason == "stop"
    assert content == runner.chat(
        messages, max_tokens=40, temperature=0, response_format=response_format
    )
    body = {
        "prompt": "Is the sky blue? yes or no:",
        "grammar": 'root ::= " yes" | " no"',
        "max_tokens": 8,
    }
    assert server.post("/v1/completions", body).json()["choices"][0]["text"] in (" yes", " no")
    bad = {
        **CHAT,
        "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 5}}},
    }
    error = _error(server.post("/v1/chat/completions", bad), 400)
    assert error["type"] == "invalid_request_error"
    assert "type must be a string" in error["message"]  # llguidance's own words
    bad_gbnf = {"prompt": "x", "grammar": "root ::= foo", "max_tokens": 4}
    assert "Rule 'foo' not found" in _error(server.post("/v1/completions", bad_gbnf), 400)["message"]


def test_concurrent_requests_each_have_their_own_constraint(server: Server) -> None:
    """Two requests decoding together under different grammars: each output matches its own."""
    bodies = [
        {"prompt": "Is the sky blue? Answer:", "grammar": 'root ::= " yes" | " no"', "max_tokens": 8},
        {"prompt": "Count: one, two,", "json_schema": {"type": "integer", "minimum": 0, "maximum": 999}, "max_tokens": 8},
    ]
    with ThreadPoolExecutor(2) as pool:
        texts = list(pool.map(lambda b: server.post("/v1/completions", b).json()["choices"][0]["text"], bodies))
    assert texts[0] in (" yes", " no")
    assert 0 <= int(texts[1]) <= 999


def test_sigterm_ends_open_streams_cleanly(smollm_path: str) -> None:
    """Stopping the server ends an open stream with its finish chunk and [DONE], then exits."""
    s = Server(smollm_path, "-np", "1")
    body = {"prompt": PROMPTS[1], "temperature": 0, "stream": True, "ignore_eos": True}
    with s.http.stream("POST", "/v1/completions", json=body) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        s.proc.terminate()
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2][len("data: ") :])["choices"][0]["finish_reason"] == "stop"
    # uvicorn re-raises the signal once it has shut down, so the status is SIGTERM's own
    assert s.proc.wait(timeout=DEADLINE_SECONDS) in (0, -signal.SIGTERM)
    s.http.close()
