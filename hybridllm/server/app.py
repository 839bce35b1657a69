"""The HTTP server: Starlette routes over the engine, served by uvicorn.

    GET  /health               503 while the model loads, then 200 with the slots' state
    GET  /v1/models            the one model served
    GET  /slots                each slot: context, cached tokens, busy (llama-server's /slots)
    POST /v1/chat/completions  OpenAI chat, streamed (SSE) or not
    POST /v1/completions       OpenAI text completion, streamed or not
    POST /tokenize, /detokenize  llama-server's shapes

The engine runs in its own thread; each request hands it an `emit` that moves events onto the
event loop (`call_soon_threadsafe`), so the loop only parses, waits and writes. A client that
goes away (a stream's connection closes, or a plain request's client disconnects) cancels its
request, which frees its slot at the engine's next tick. Every error is OpenAI's shape,
{"error": {"message", "type", "code"}}; nothing a client sends reaches a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import uvicorn
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from ..chat import ChatTemplateError
from ..constrain import Constraint
from ..engine import Engine, Event, Failed, Finished, Piece, QueueFullError, SamplingState
from ..engine import Request as EngineRequest
from ..errors import ConfigError, HybridLLMError
from ..options import check_stop
from . import schemas, sse

#: Largest request body accepted (413 above): a prompt of a few hundred thousand tokens.
MAX_BODY_BYTES = 8 << 20
#: How often a plain (not streamed) request checks whether its client is still there.
DISCONNECT_POLL_SECONDS = 0.25


class ApiError(Exception):
    """An error answered to the client as {"error": {...}} with an HTTP status."""

    def __init__(self, status: int, message: str, type_: str, code: str) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code


def _bad_request(message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, "invalid_request_error", code)


def _context_exceeded(n_tokens: str, n_ctx: int) -> ApiError:
    return _bad_request(
        f"the prompt has {n_tokens} tokens, more than the context of {n_ctx} tokens per slot "
        "holds (start the server with a larger --ctx)", "context_length_exceeded",
    )  # fmt: skip


@dataclass
class ServerOptions:
    model_id: str
    n_parallel: int = 1
    max_queue: int = 64
    api_key: str | None = None
    max_body_bytes: int = MAX_BODY_BYTES


class ServerState:
    """The loaded runner and engine (None while loading) and why loading failed, if it did."""

    def __init__(self, load: Callable[[], Any], options: ServerOptions) -> None:
        self.load_runner, self.options = load, options
        self.runner: Any = None
        self.engine: Engine | None = None
        self.load_error: str | None = None
        self.max_token_bytes = 1  # the longest token's text, in bytes (set at load)
        self.on_load_error: Callable[[str], None] = lambda message: None

    def load(self) -> None:
        """Load the model and start the engine (on a thread, while the server answers 503)."""
        try:
            runner = self.load_runner()
            engine = Engine(runner.model, runner.tokenizer, self.options.n_parallel,
                            self.options.max_queue)  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - reported as one line, then the server stops
            from ..cli import _describe  # the CLI's one-line wording of any error

            self.load_error = _describe(exc, debug=False)
            self.on_load_error(self.load_error)
            return
        tokenizer = runner.tokenizer
        self.max_token_bytes = max(
            len(tokenizer.token_to_piece(i, special=True)) for i in range(tokenizer.n_vocab)
        )
        engine.start()
        self.runner, self.engine = runner, engine
        print(f"hybridllm: model loaded in {runner.load_seconds:.1f} s; ready", file=sys.stderr,
              flush=True)  # fmt: skip

    def ready(self) -> tuple[Any, Engine]:
        if self.engine is None:
            message = self.load_error or "Loading model"
            raise ApiError(503, message, "unavailable_error", "model_loading")
        return self.runner, self.engine

    def check_text_fits(self, n_bytes: int) -> None:
        """Refuse a text too long for a slot's context before tokenizing it: it has at least
        n_bytes / max_token_bytes tokens (tokenizing megabytes would only waste the CPU)."""
        _, engine = self.ready()
        at_least = -(-n_bytes // self.max_token_bytes)
        if at_least > engine.n_ctx:
            raise _context_exceeded(f"at least {at_least}", engine.n_ctx)

    def authorize(self, request: Request) -> None:
        key = self.options.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), key.encode()
        ):
            raise ApiError(401, "invalid or missing API key (Authorization: Bearer KEY)",
                           "authentication_error", "invalid_api_key")  # fmt: skip


# --- request parsing ----------------------------------------------------------------------------
async def read_json(request: Request, model: type[BaseModel], limit: int) -> Any:
    """The body as `model`: 413 over `limit` bytes, 400 for malformed JSON or bad fields."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body has {declared} bytes; the limit is {limit}",
                       "invalid_request_error", "request_too_large")  # fmt: skip
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"the request body is over the limit of {limit} bytes",
                           "invalid_request_error", "request_too_large")  # fmt: skip
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise _bad_request(f"malformed JSON in the request body: {exc}", "invalid_json") from None
    if not isinstance(data, dict):
        raise _bad_request("the request body must be a JSON object", "invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise _bad_request(f"{where}: {first['msg']}") from None


# --- the bridge from the engine thread ----------------------------------------------------------
class _Inbox:
    """Events from the engine thread, delivered on the event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    def emit(self, event: Event) -> None:  # engine thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    async def events(self, request: Request | None) -> AsyncIterator[Event]:
        """Events until Finished or Failed; with `request`, stop when its client disconnects
        (checked every DISCONNECT_POLL_SECONDS, whether events are flowing or not)."""
        next_check = time.monotonic() + DISCONNECT_POLL_SECONDS
        while True:
            if request is None:
                event = await self.queue.get()
            else:
                try:
                    wait = max(next_check - time.monotonic(), 0.0)
                    event = await asyncio.wait_for(self.queue.get(), wait)
                except TimeoutError:
                    event = None
                if time.monotonic() >= next_check:
                    if await request.is_disconnected():
                        return
                    next_check = time.monotonic() + DISCONNECT_POLL_SECONDS
                if event is None:
                    continue
            yield event
            if not isinstance(event, Piece):
                return


class _EventStream(StreamingResponse):
    """A stream that calls `on_close` however it ends (finished, client gone, server stopping)."""

    def __init__(self, body: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        super().__init__(body, media_type=sse.MEDIA_TYPE, headers=sse.HEADERS)
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


@dataclass
class _Job:
    """A request handed to the engine: its id, kind ("chat" or "text") and parsed body."""

    rid: str
    kind: str
    body: Any
    inbox: _Inbox
    handle: Any
    text_of: Callable[[int], str]


def _submit(
    state: ServerState, kind: str, body: Any, prompt: list[int], constraint: Constraint | None
) -> _Job:
    runner, engine = state.ready()
    sampling = SamplingState(body.sampler(), constraint)
    limit, n_logprobs, stop = body.limit(), body.n_logprobs(), check_stop(body.stop)
    if not prompt:
        raise _bad_request("the prompt is empty")
    if len(prompt) > engine.n_ctx:
        raise _context_exceeded(str(len(prompt)), engine.n_ctx)
    inbox = _Inbox()
    stop_ids = () if body.ignore_eos else runner.tokenizer.eot_ids
    request = EngineRequest(
        prompt, sampling, inbox.emit, limit, stop, stop_ids, n_logprobs, body.cache_prompt
    )
    try:
        handle = engine.submit(request)
    except QueueFullError as exc:
        raise ApiError(503, f"the server is busy: {exc}; retry later", "unavailable_error",
                       "queue_full") from None  # fmt: skip
    rid = schemas.new_id("chat" if kind == "chat" else "text")
    return _Job(rid, kind, body, inbox, handle, lambda t: runner.tokenizer.decode([t]))


def _logprobs(job: _Job, tokens: Any, offset: int = 0) -> Any:
    if job.body.n_logprobs() is None:
        return None
    if job.kind == "chat":
        return schemas.chat_logprobs(tokens, job.text_of)
    return schemas.completion_logprobs(tokens, job.text_of, offset)


async def _answer(job: _Job, request: Request, model: str) -> dict[str, Any]:
    """Collect a whole response (the request is cancelled if its client goes away)."""
    texts, tokens = [], []
    try:
        async for event in job.inbox.events(request):
            if isinstance(event, Piece):
                texts.append(event.text)
                tokens.extend(event.tokens)
            elif isinstance(event, Failed):
                raise ApiError(500, event.message, "server_error", "generation_failed")
            else:
                finished = event
                text = "".join(texts)
                if job.kind == "chat":
                    logprobs = _logprobs(job, tokens)
                    return schemas.chat_response(job.rid, model, text, finished.reason,
                                                 finished.usage, logprobs)  # fmt: skip
                return schemas.completion_response(job.rid, model, text, finished.reason,
                                                   finished.usage, _logprobs(job, tokens))  # fmt: skip
    finally:
        job.handle.cancel()  # a no-op once finished; frees the slot if the client left
    raise ApiError(499, "the client closed the request", "invalid_request_error", "client_closed")


async def _stream(job: _Job, model: str) -> AsyncIterator[bytes]:
    """The SSE body: a role chunk (chat), text chunks, a finish chunk, usage, [DONE]."""
    if job.kind == "chat":
        yield sse.event(schemas.chat_chunk(job.rid, model, {"role": "assistant", "content": ""}))
    offset = 0
    async for event in job.inbox.events(None):
        if isinstance(event, Piece):
            if not event.text and not (event.tokens and job.body.n_logprobs() is not None):
                continue
            logprobs = _logprobs(job, event.tokens, offset)
            offset += len(event.text)
            if job.kind == "chat":
                chunk = schemas.chat_chunk(job.rid, model, {"content": event.text}, None, logprobs)
            else:
                chunk = schemas.completion_chunk(job.rid, model, event.text, None, logprobs)
            yield sse.event(chunk)
        elif isinstance(event, Failed):
            yield sse.event(schemas.error_body(event.message, "server_error", "generation_failed"))
        elif isinstance(event, Finished):
            if job.kind == "chat":
                yield sse.event(schemas.chat_chunk(job.rid, model, {}, event.reason))
            else:
                yield sse.event(schemas.completion_chunk(job.rid, model, "", event.reason))
            if job.body.include_usage:
                yield sse.event(schemas.usage_chunk(job.rid, model, job.kind, event.usage))
    yield sse.DONE


async def _respond(
    state: ServerState, request: Request, kind: str, body: Any, prompt: list[int]
) -> Response:
    grammar = body.constraint_grammar()
    constraint = None
    if grammar is not None:  # building the matcher computes its first mask: off the event loop
        runner, _ = state.ready()
        constraint = await run_in_threadpool(Constraint, grammar, runner.tokenizer, runner.n_vocab)
    job = _submit(state, kind, body, prompt, constraint)
    model = state.options.model_id
    if body.stream:
        return _EventStream(_stream(job, model), job.handle.cancel)
    return JSONResponse(await _answer(job, request, model))


# --- routes -------------------------------------------------------------------------------------
def create_app(state: ServerState) -> Starlette:
    """The Starlette app; the model loads on a thread started at startup."""
    limit = state.options.max_body_bytes

    async def health(request: Request) -> Response:
        _, engine = state.ready()
        slots = engine.slot_states()
        busy = sum(s["is_processing"] for s in slots)
        return JSONResponse({"status": "ok", "slots_idle": len(slots) - busy,
                             "slots_processing": busy, "requests_waiting": engine.n_waiting})  # fmt: skip

    async def models(request: Request) -> Response:
        state.authorize(request)
        runner, _ = state.ready()
        meta = {"n_ctx_slot": runner.n_ctx, "n_parallel": state.options.n_parallel,
                "n_vocab": runner.n_vocab, "n_params": runner.n_params}  # fmt: skip
        entry = {"id": state.options.model_id, "object": "model", "created": int(time.time()),
                 "owned_by": "hybridllm", "meta": meta}  # fmt: skip
        return JSONResponse({"object": "list", "data": [entry]})

    async def slots(request: Request) -> Response:
        state.authorize(request)
        _, engine = state.ready()
        return JSONResponse(engine.slot_states())

    async def chat_completions(request: Request) -> Response:
        state.authorize(request)
        runner, _ = state.ready()
        body = await read_json(request, schemas.ChatRequest, limit)
        messages = [m.plain(i) for i, m in enumerate(body.messages)]
        state.check_text_fits(sum(len(m["content"].encode()) for m in messages))
        prompt = await run_in_threadpool(runner.chat_tokens, messages)
        return await _respond(state, request, "chat", body, prompt)

    async def completions(request: Request) -> Response:
        state.authorize(request)
        runner, _ = state.ready()
        body = await read_json(request, schemas.CompletionRequest, limit)
        if isinstance(body.prompt, str):
            state.check_text_fits(len(body.prompt.encode()))
        prompt = await run_in_threadpool(_completion_prompt, runner, body.prompt)
        return await _respond(state, request, "text", body, prompt)

    async def tokenize(request: Request) -> Response:
        state.authorize(request)
        runner, _ = state.ready()
        body = await read_json(request, schemas.TokenizeRequest, limit)
        ids = await run_in_threadpool(runner.tokenizer.encode, body.content, body.add_special,
                                      body.parse_special)  # fmt: skip
        if not body.with_pieces:
            return JSONResponse({"tokens": ids})
        decode = runner.tokenizer.decode
        return JSONResponse({"tokens": [{"id": i, "piece": decode([i])} for i in ids]})

    async def detokenize(request: Request) -> Response:
        state.authorize(request)
        runner, _ = state.ready()
        body = await read_json(request, schemas.DetokenizeRequest, limit)
        _check_ids(body.tokens, runner.n_vocab, "tokens")
        return JSONResponse({"content": runner.tokenizer.decode(body.tokens)})

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/models", models, methods=["GET"]),
        Route("/slots", slots, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/completions", completions, methods=["POST"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        threading.Thread(target=state.load, name="hybridllm-load", daemon=True).start()
        yield
        if state.engine is not None:
            await run_in_threadpool(state.engine.stop)

    handlers = {ApiError: _api_error, HTTPException: _http_error, ConfigError: _value_error,
                ChatTemplateError: _value_error, Exception: _internal_error}  # fmt: skip
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers)  # type: ignore[arg-type]


def _completion_prompt(runner: Any, prompt: str | list[int] | list[str]) -> list[int]:
    """A completion's prompt as ids: text (special tokens parsed, BOS added as the model asks,
    like Runner.generate), a list of ids as given, or a list of exactly one text."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise _bad_request(f"prompt: a list of {len(prompt)} texts; only one prompt per request is supported")  # fmt: skip
        prompt = prompt[0]
    if isinstance(prompt, str):
        return runner.tokenize(prompt, add_bos=True, special=True) or runner._bos()
    _check_ids(prompt, runner.n_vocab, "prompt")
    return list(prompt)


def _check_ids(ids: list[int], n_vocab: int, field: str) -> None:
    bad = next((t for t in ids if not 0 <= t < n_vocab), None)
    if bad is not None:
        raise _bad_request(f"{field}: token id {bad} is outside the vocabulary (0..{n_vocab - 1})")


def _error_response(status: int, message: str, type_: str, code: str) -> JSONResponse:
    return JSONResponse(schemas.error_body(message, type_, code), status_code=status)


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return _error_response(exc.status, exc.message, exc.type, exc.code)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return _error_response(404, f"no route {request.url.path}", "not_found_error", "not_found")
    if exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
        return _error_response(405, message, "invalid_request_error", "method_not_allowed")
    return _error_response(exc.status_code, str(exc.detail), "invalid_request_error", "http_error")


async def _value_error(request: Request, exc: Exception) -> Response:
    return _error_response(400, str(exc), "invalid_request_error", "invalid_value")


async def _internal_error(request: Request, exc: Exception) -> Response:
    message = f"internal error: {type(exc).__name__}: {exc}"
    print(f"hybridllm: {message}", file=sys.stderr)
    return _error_response(500, message, "server_error", "internal_error")


# --- running it ---------------------------------------------------------------------------------
def listen(host: str, port: int) -> socket.socket:
    """A bound, listening socket (ConfigError naming host and port when that fails)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def serve(state: ServerState, host: str, port: int) -> int:
    """Serve until interrupted -> exit status (1 when the model failed to load)."""
    sock = listen(host, port)
    config = uvicorn.Config(create_app(state), log_level="warning", timeout_graceful_shutdown=3,
                            access_log=False)  # fmt: skip
    server = _Server(config, state)

    def load_failed(message: str) -> None:
        server.should_exit = True

    state.on_load_error = load_failed
    print(f"hybridllm: serving {state.options.model_id} on http://{host}:{port} "
          f"({state.options.n_parallel} slots); loading the model", file=sys.stderr, flush=True)  # fmt: skip
    server.run(sockets=[sock])
    if state.load_error is not None:
        raise _LoadFailed(state.load_error)
    return 0


class _Server(uvicorn.Server):
    """uvicorn's server that, on Ctrl-C or SIGTERM, also stops the engine: open streams then
    end with their finish chunk and [DONE] instead of being cut by the shutdown."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig: int, frame: Any) -> None:
        engine = self.state.engine
        if engine is not None:  # not in the signal handler itself: stop() takes the engine's lock
            threading.Thread(target=engine.stop, daemon=True).start()
        super().handle_exit(sig, frame)


class _LoadFailed(HybridLLMError):
    """The model did not load; the CLI shows the message as its one error line."""
