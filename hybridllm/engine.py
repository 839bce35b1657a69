"""The engine: sequence slots over one model and a scheduler that serves many requests at once.

    engine = Engine(runner.model, runner.tokenizer, n_slots=4)
    engine.start()
    handle = engine.submit(Request(prompt_ids, SamplingState(Sampler.create(...)), emit=print))
    ...
    handle.cancel()

Each slot has its own KV cache (its own blocks over the same weights: the C++ block keeps raw
pointers into the memory map, PyBlock shares its loaded weights, so a slot costs only its
cache) and remembers the tokens that cache holds. A new request takes the free slot with the
longest cached prefix of its prompt and evaluates only the rest, so a follow-up chat turn costs
its new tokens. Requests beyond the slots wait in a bounded queue, in arrival order.

The scheduler runs in its own thread (the forward is C++ that releases the GIL, so an event
loop in another thread stays responsive). Each tick it samples one token for every decoding
sequence (round robin), then evaluates those tokens plus at most `prefill_chunk` tokens of the
prompts being prefilled, so a long prompt never freezes the other streams. Without the thread
(`Runner`, one conversation on one slot over the model's own cache), `generate` drives the same
scheduler tick by tick on the caller's thread.
`_evaluate` runs the tick's rows, every sequence at its own positions in its own cache, as one
batched forward (`Model.forward_batch`): each weight is read once per tick for all the streams,
and each sequence's logits are bit for bit those of its evaluation alone, so a request's tokens
do not depend on what else is served. Results come back through each request's `emit(event)`
callback, called on the engine thread: `Piece` (text and the tokens behind it) and finally
`Finished` or `Failed`. A sequence whose slot is full either ends (reason "context") or, with
`context_shift`, drops the older half of its tokens after the first n_keep and goes on.
"""

from __future__ import annotations

import copy
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from .errors import ContextFullError
from .generate import StopStrings, common_prefix
from .model import PyBlock, block_cfg, block_weights
from .sampling import Sampler

#: Prompt tokens evaluated per tick for one sequence (llama-server's n_ubatch is 512; smaller
#: chunks keep other streams' inter-token gaps short while a long prompt is prefilled).
PREFILL_CHUNK = 128
#: A cached prefix must cover more than this share of a prompt to pick its slot.
PREFIX_SIMILARITY = 0.5


class QueueFullError(RuntimeError):
    """Every slot is busy and the waiting queue holds its maximum."""


class Constraint(Protocol):
    """A per-request constraint on the tokens (constrain.Constraint, llguidance's matcher): it
    masks the logits before sampling, is told each token chosen (not an end-of-generation one),
    and says when its grammar is complete (the request then stops, finish reason "stop")."""

    def mask_logits(self, logits: np.ndarray) -> np.ndarray: ...

    def accept_token(self, token: int) -> None: ...

    @property
    def done(self) -> bool: ...


@dataclass
class SamplingState:
    """A request's own sampling state: its sampler (with its own seeded RNG) and constraint."""

    sampler: Sampler
    constraint: Constraint | None = None

    def choose(self, logits: np.ndarray, history: Sequence[int]) -> int:
        if self.constraint is not None:
            logits = self.constraint.mask_logits(logits)
        return self.sampler(logits, history)

    def accept(self, token: int) -> bool:
        """Tell the constraint the chosen token -> whether its grammar is now complete."""
        if self.constraint is None:
            return False
        self.constraint.accept_token(token)
        return bool(self.constraint.done)


@dataclass(frozen=True)
class TokenInfo:
    """A generated token; logprob/top only when the request asked for logprobs (natural log,
    over the model's raw logits, as llama-server reports them)."""

    id: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Piece:
    """New text, and the tokens sampled since the last piece (text held back by a possible stop
    string arrives with a later piece)."""

    text: str
    tokens: tuple[TokenInfo, ...]


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens reused from the slot's cache (not evaluated)
    prompt_seconds: float
    generation_seconds: float  # the ticks the sequence decoded in (sampling and forwards)
    context_shifts: int = 0  # times a full slot dropped old tokens to go on


@dataclass(frozen=True)
class Finished:
    # "eos" (an end-of-generation token), "stop" (a stop string, or the constraint complete),
    # "length" (max_tokens), "context" (the slot is full and context_shift is off), "cancelled"
    reason: str
    usage: Usage


@dataclass(frozen=True)
class Failed:
    message: str
    error: BaseException | None = None  # what was raised, for a caller that re-raises it


Event = Piece | Finished | Failed


@dataclass
class Request:
    """One generation: prompt ids, how to sample, when to stop, where the events go."""

    prompt: list[int]
    sampling: SamplingState
    emit: Callable[[Event], None]
    max_tokens: int | None = None  # None: until a stop or the slot's context is full
    stop: Sequence[str] = ()
    stop_ids: Collection[int] = ()  # end-of-generation ids (empty: ignore_eos)
    n_logprobs: int | None = None  # None: off; 0: the chosen token's; k: also the top k
    # False: evaluate the whole prompt even where the slot holds it (llama-server's
    # cache_prompt). Logits after a reused prefix can differ from a fresh evaluation in the last
    # bits (the rows go through other kernel splits, as in llama.cpp), which sampling can amplify.
    reuse_prefix: bool = True
    # A full slot keeps its first n_keep tokens (None: the prompt when it fills at most half the
    # context, else 1; -1: the whole prompt), drops half of the rest and goes on.
    context_shift: bool = False
    n_keep: int | None = None


@dataclass(frozen=True)
class Batch:
    """The rows of one forward over the slots, in llama.cpp's `llama_batch` shape: row i is token
    token[i] at position pos[i] of sequence seq_id[i] (a slot's index), and logits[i] says
    whether its logits are wanted. A sequence's rows come together, at consecutive positions
    that start at most at the end of what its slot holds (the slot's tokens from there on are
    dropped first, as llama_memory_seq_rm would)."""

    token: Sequence[int]
    pos: Sequence[int]
    seq_id: Sequence[int]
    logits: Sequence[bool]

    @classmethod
    def of(cls, sequences: Sequence[tuple[int, Sequence[int], int]]) -> Batch:
        """(seq_id, tokens, pos0) per sequence -> their rows, logits wanted for each last one."""
        token, pos, seq_id, logits = [], [], [], []
        for s, tokens, pos0 in sequences:
            if not tokens:
                raise ValueError(f"Batch.of: sequence {s} has no tokens")
            token += tokens
            pos += range(pos0, pos0 + len(tokens))
            seq_id += [s] * len(tokens)
            logits += [False] * (len(tokens) - 1) + [True]
        return cls(token, pos, seq_id, logits)


class RequestHandle:
    """What `submit` returns: cancel() frees the request's slot at the next tick."""

    def __init__(self, engine: Engine, request: Request) -> None:
        self._engine, self.request = engine, request
        self.cancelled = False

    def cancel(self) -> None:
        self._engine.cancel(self)


@dataclass
class Slot:
    """A KV cache (the blocks of `model`) and the tokens it holds, positions 0..len-1."""

    index: int
    model: Any
    tokens: list[int] = field(default_factory=list)
    last_used: int = 0
    busy: bool = False

    @property
    def n_ctx(self) -> int:
        return int(self.model.n_ctx)

    def evaluate(self, tokens: Sequence[int], pos0: int, first_logit: int = -1) -> np.ndarray:
        """Evaluate tokens at positions pos0.. (<= the tokens held, which are cut there) ->
        the logits of rows first_logit.. (n, n_vocab) float32, as model.forward gives them (it
        raises ContextFullError for tokens beyond the context)."""
        if not 0 <= pos0 <= len(self.tokens):
            raise ValueError(f"pos0={pos0}: the slot holds {len(self.tokens)} tokens")
        del self.tokens[pos0:]
        logits = self.model.forward(list(tokens), pos0, first_logit)
        self.tokens.extend(tokens)
        return logits

    def shift(self, n_keep: int) -> None:
        """Drop the older half of the tokens after the first n_keep; the rest move down.

        The first n_keep stay in the cache as they are; the tokens after the dropped ones are
        evaluated again at their new positions (instead of re-roping their cached keys):
        slower, but exactly what a fresh run on the kept tokens gives.
        """
        n_keep = max(0, min(n_keep, len(self.tokens) - 1))
        n_discard = max(1, (len(self.tokens) - n_keep) // 2)
        rest = self.tokens[n_keep + n_discard :]
        del self.tokens[n_keep:]
        if rest:
            self.evaluate(rest, n_keep)


class _Sequence:
    """An admitted request's progress in its slot."""

    def __init__(self, handle: RequestHandle, slot: Slot, tokenizer: Any) -> None:
        self.handle, self.request, self.slot = handle, handle.request, slot
        prompt = self.request.prompt
        # Keep at least one token to evaluate: sampling needs the logits after the last one.
        reusable = common_prefix(slot.tokens, prompt) if self.request.reuse_prefix else 0
        self.cached = min(reusable, len(prompt) - 1)
        del slot.tokens[self.cached :]
        self.pending: list[int] = list(prompt[self.cached :])  # prompt tokens not yet evaluated
        self.logits: np.ndarray | None = None  # after the last evaluated token, once prefilled
        self.decoder = tokenizer.stream_decoder()
        self.stops = StopStrings(list(self.request.stop))
        self.generated = 0
        self.unsent: list[TokenInfo] = []
        self.t_start = time.perf_counter()
        self.prompt_seconds = 0.0
        self.decode_seconds = 0.0  # the ticks since the prompt, up to the last one's start
        self.shifts = 0
        n_keep = self.request.n_keep
        if n_keep is None:
            n_keep = len(prompt) if len(prompt) <= slot.n_ctx // 2 else 1
        self.n_keep = len(prompt) if n_keep == -1 else n_keep


class Engine:
    """Slots, a waiting queue and the scheduler thread; see the module docstring."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        n_slots: int = 1,
        max_queue: int = 64,
        prefill_chunk: int = PREFILL_CHUNK,
        slot_models: Sequence[Any] | None = None,
    ) -> None:
        """model: a loaded `Model`; each of n_slots slots gets blocks with a KV cache of n_ctx
        rows of its own. slot_models instead gives the slots' models (the Runner's one slot is
        its model's own cache); model.forward_batch must take them as its segments' models."""
        if slot_models is not None:
            n_slots = len(slot_models)
        if n_slots < 1 or max_queue < 0 or prefill_chunk < 1:
            raise ValueError("n_slots and prefill_chunk must be >= 1, max_queue >= 0")
        self.model, self.tokenizer = model, tokenizer
        self.max_queue, self.prefill_chunk = max_queue, prefill_chunk
        if slot_models is None:
            slot_models = [model_with_own_cache(model) for _ in range(n_slots)]
        self.slots = [Slot(i, m) for i, m in enumerate(slot_models)]
        self.n_ctx = int(model.n_ctx)
        self._waiting: deque[RequestHandle] = deque()
        self._active: list[_Sequence] = []
        self._prefill_turn = 0  # round robin among sequences still prefilling
        self._tick_start: float | None = None  # while a tick runs: when it began
        self._clock = itertools.count(1)
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # --- public surface (any thread) ----------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="hybridllm-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    def submit(self, request: Request) -> RequestHandle:
        """Queue a request (QueueFullError when the queue is full, ValueError for a prompt that
        is empty or does not fit in a slot's context)."""
        if not request.prompt:
            raise ValueError("the prompt has no tokens")
        if len(request.prompt) > self.n_ctx:
            raise ContextFullError(
                f"the prompt has {len(request.prompt)} tokens, more than n_ctx={self.n_ctx} "
                "holds; shorten it or use a larger n_ctx"
            )
        handle = RequestHandle(self, request)
        with self._wake:
            if self._stopping:
                raise QueueFullError("the engine is shutting down")
            n_free = sum(not s.busy for s in self.slots)
            if len(self._waiting) >= self.max_queue + n_free:
                raise QueueFullError(
                    f"all {len(self.slots)} slots are busy and {len(self._waiting)} requests wait"
                )
            self._waiting.append(handle)
            self._wake.notify()
        return handle

    def cancel(self, handle: RequestHandle) -> None:
        with self._wake:
            handle.cancelled = True
            self._wake.notify()

    def slot_states(self) -> list[dict[str, Any]]:
        """For /slots and /health: each slot's index, context, cached tokens and whether busy."""
        with self._wake:
            return [
                {
                    "id": s.index,
                    "n_ctx": s.n_ctx,
                    "n_cached": len(s.tokens),
                    "is_processing": s.busy,
                }
                for s in self.slots
            ]

    @property
    def n_waiting(self) -> int:
        return len(self._waiting)

    def generate(self, request_args: dict[str, Any]) -> Iterator[Event]:
        """Submit a request and yield its events on this thread; request_args are Request's
        fields but emit. With the engine thread started the events come from it; without, each
        `next` runs the scheduler here until the next event (closing the iterator early
        cancels the request and frees its slot)."""
        import queue

        events: queue.Queue[Event] = queue.Queue()
        handle = self.submit(Request(emit=events.put, **request_args))
        try:
            while True:
                while self._thread is None and events.empty():
                    self.step()
                event = events.get()
                yield event
                if not isinstance(event, Piece):
                    return
        finally:
            handle.cancel()
            if self._thread is None:
                with self._wake:
                    self._drop_cancelled()

    def decode(self, batch: Batch) -> list[np.ndarray]:
        """Evaluate a batch over the slots in one forward (llama_decode) -> the logits
        (n_vocab,) float32 of each row batch.logits flags, in row order, each as if its
        sequence were evaluated alone. For driving idle slots by hand: not while the engine's
        thread serves requests (RuntimeError); a slot serving a request is a ValueError."""
        if self._thread is not None:
            raise RuntimeError("decode drives the slots itself; stop the engine thread first")
        groups = self._batch_groups(batch)
        segments = [(slot.model, tokens, pos0) for slot, tokens, pos0 in groups]
        wanted = [i for i, flag in enumerate(batch.logits) if flag]
        try:
            logits = self.model.forward_batch(segments, wanted)
        except BaseException:
            for slot, _, pos0 in groups:  # its cache from pos0 on may hold part of the rows
                del slot.tokens[pos0:]
            raise
        for slot, tokens, pos0 in groups:
            slot.tokens[pos0:] = tokens
        return logits

    def _batch_groups(self, batch: Batch) -> list[tuple[Slot, list[int], int]]:
        """A batch's sequences as (slot, tokens, pos0), checked (ValueError naming the row)."""
        n = len(batch.token)
        if n == 0 or not len(batch.pos) == len(batch.seq_id) == len(batch.logits) == n:
            raise ValueError("batch: token, pos, seq_id and logits need one entry per row, and a row")
        groups: list[tuple[Slot, list[int], int]] = []
        for i in range(n):
            s, p = batch.seq_id[i], batch.pos[i]
            if i > 0 and batch.seq_id[i - 1] == s:
                if p != batch.pos[i - 1] + 1:
                    raise ValueError(f"batch.pos[{i}] = {p}: a sequence's positions must be consecutive")
                groups[-1][1].append(batch.token[i])
                continue
            if not 0 <= s < len(self.slots):
                raise ValueError(f"batch.seq_id[{i}] = {s}: no such slot (0..{len(self.slots) - 1})")
            slot = self.slots[s]
            if any(g[0] is slot for g in groups):
                raise ValueError(f"batch.seq_id[{i}] = {s}: a sequence's rows must come together")
            if slot.busy:
                raise ValueError(f"batch.seq_id[{i}] = {s}: that slot is serving a request")
            if not 0 <= p <= len(slot.tokens):
                raise ValueError(
                    f"batch.pos[{i}] = {p}: slot {s} holds {len(slot.tokens)} tokens; a sequence "
                    "goes on at or before its end"
                )
            groups.append((slot, [batch.token[i]], p))
        n_vocab = getattr(self.model, "n_vocab", None)
        for i, t in enumerate(batch.token):
            if n_vocab is not None and not 0 <= t < n_vocab:
                raise ValueError(f"batch.token[{i}] = {t}: outside the vocabulary (0..{n_vocab - 1})")
        for slot, tokens, pos0 in groups:
            if pos0 + len(tokens) > slot.n_ctx:
                raise ContextFullError(
                    f"batch: {len(tokens)} tokens at position {pos0} do not fit in slot "
                    f"{slot.index}'s context of {slot.n_ctx} tokens"
                )
        return groups

    # --- the scheduler (engine thread, or the caller's through generate) ----------------------
    def step(self) -> None:
        """One round of the scheduler: drop cancelled requests, admit waiting ones into free
        slots, then one tick for the active sequences (none when there are none)."""
        with self._wake:
            self._drop_cancelled()
            self._admit()
        if not self._active:
            return
        try:
            self._tick()
        except Exception as exc:  # noqa: BLE001 - a fault here must not stop the engine
            for seq in list(self._active):
                seq.slot.tokens.clear()
                self._fail(seq, f"internal error: {type(exc).__name__}: {exc}", exc)

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self._active and not self._waiting:
                    self._wake.wait()
                if self._stopping:
                    break
            self.step()
        with self._wake:
            for seq in list(self._active):
                self._finish(seq, "cancelled")
            for handle in self._waiting:
                _send(handle.request, Finished("cancelled", Usage(0, 0, 0, 0.0, 0.0)))
            self._waiting.clear()

    def _drop_cancelled(self) -> None:
        for handle in [h for h in self._waiting if h.cancelled]:
            self._waiting.remove(handle)
            _send(handle.request, Finished("cancelled", Usage(0, 0, 0, 0.0, 0.0)))
        for seq in [s for s in self._active if s.handle.cancelled]:
            self._finish(seq, "cancelled")

    def _admit(self) -> None:
        """Waiting requests, in arrival order, into free slots (see `_choose_slot`)."""
        while self._waiting:
            free = [s for s in self.slots if not s.busy]
            if not free:
                return
            handle = self._waiting.popleft()
            slot = _choose_slot(free, handle.request.prompt)
            slot.busy, slot.last_used = True, next(self._clock)
            self._active.append(_Sequence(handle, slot, self.tokenizer))

    def _tick(self) -> None:
        """Sample one token for each decoding sequence, then evaluate those tokens and one
        prompt chunk together."""
        self._tick_start = start = time.perf_counter()
        decoding = [s for s in self._active if s.logits is not None and not s.handle.cancelled]
        try:
            work: list[tuple[_Sequence, list[int]]] = []
            for seq in decoding:
                token = self._sample(seq)
                if token is not None:
                    work.append((seq, [token]))
            work.extend(self._prefill_chunks())
            for (seq, _tokens), result in zip(work, self._evaluate(work), strict=True):
                if isinstance(result, Exception):
                    seq.slot.tokens.clear()  # the cache may hold part of the failed rows
                    self._fail(seq, f"evaluation failed: {result}", result)
                    continue
                if not seq.pending:
                    if seq.logits is None:  # the prompt's last chunk: prefill done
                        seq.prompt_seconds = time.perf_counter() - seq.t_start
                    seq.logits = result
        finally:
            self._tick_start = None
        elapsed = time.perf_counter() - start
        for seq in decoding:
            seq.decode_seconds += elapsed

    def _prefill_chunks(self) -> list[tuple[_Sequence, list[int]]]:
        """This tick's prompt chunks: at most prefill_chunk tokens in all (but at least one
        chunk), taken round robin from the prompts being prefilled, so several short prompts
        share a tick and a long one takes turns. A prompt is always cut into chunks of
        prefill_chunk tokens from its start, whatever else is served: its rows then go through
        the same kernel splits as when it is served alone (batch invariance)."""
        prefilling = [s for s in self._active if s.pending and not s.handle.cancelled]
        chunks, budget = [], self.prefill_chunk
        for i in range(len(prefilling)):
            seq = prefilling[(self._prefill_turn + i) % len(prefilling)]
            size = min(len(seq.pending), self.prefill_chunk)
            if chunks and size > budget:
                continue
            chunk, seq.pending = seq.pending[:size], seq.pending[size:]
            chunks.append((seq, chunk))
            budget -= size
        self._prefill_turn += 1
        return chunks

    def _evaluate(self, work: list[tuple[_Sequence, list[int]]]) -> list[Any]:
        """Evaluate each row group (sequence, its tokens at the slot's next positions) in one
        batched forward -> the logits after each group's last token. Should the batch fail,
        each group is evaluated alone, so that a failure (its exception, in its place) is only
        its own request's."""
        segments = [(seq.slot.model, tokens, len(seq.slot.tokens)) for seq, tokens in work]
        try:
            logits = self.model.forward_batch(segments)
        except Exception as exc:  # noqa: BLE001 - find which sequence it was, below
            return [exc] if len(work) == 1 else self._evaluate_each(work)
        for seq, tokens in work:
            seq.slot.tokens.extend(tokens)
        return logits

    def _evaluate_each(self, work: list[tuple[_Sequence, list[int]]]) -> list[Any]:
        results: list[Any] = []
        for seq, tokens in work:
            try:
                results.append(seq.slot.evaluate(tokens, len(seq.slot.tokens))[-1])
            except Exception as exc:  # noqa: BLE001 - one request's failure is its own
                results.append(exc)
        return results

    def _sample(self, seq: _Sequence) -> int | None:
        """Choose the next token; emit it; return it when the sequence goes on (its logits are
        needed), None when the sequence finished."""
        req, logits = seq.request, seq.logits
        assert logits is not None
        try:
            token = req.sampling.choose(logits, seq.slot.tokens)
            complete = token not in req.stop_ids and req.sampling.accept(token)
        except Exception as exc:  # noqa: BLE001 - a constraint or sampler error ends this request
            self._fail(seq, f"sampling failed: {exc}", exc)
            return None
        if token in req.stop_ids:
            self._flush(seq)
            self._finish(seq, "eos")
            return None
        seq.generated += 1
        seq.unsent.append(_token_info(token, logits, req.n_logprobs))
        text, hit = seq.stops.feed(seq.decoder.feed(token))
        if hit:
            self._send_piece(seq, text)
            self._finish(seq, "stop")
            return None
        if text:
            self._send_piece(seq, text)
        if complete or (req.max_tokens is not None and seq.generated >= req.max_tokens):
            hit = self._flush(seq)
            self._finish(seq, "stop" if hit or complete else "length")
            return None
        if len(seq.slot.tokens) >= seq.slot.n_ctx:  # no room for the token just sampled
            return self._make_room(seq, token)
        return token

    def _make_room(self, seq: _Sequence, token: int) -> int | None:
        """The slot is full: shift its context (request.context_shift) and go on with token,
        else end the sequence (reason "context") -> token, or None when it ended."""
        if not seq.request.context_shift:
            hit = self._flush(seq)
            self._finish(seq, "stop" if hit else "context")
            return None
        try:
            seq.slot.shift(seq.n_keep)
        except Exception as exc:  # noqa: BLE001 - one request's failure is its own
            seq.slot.tokens.clear()
            self._fail(seq, f"evaluation failed: {exc}", exc)
            return None
        seq.shifts += 1
        return token

    def _flush(self, seq: _Sequence) -> bool:
        """Send what the decoder and stop strings hold back -> whether a stop string matched."""
        text, hit = seq.stops.feed(seq.decoder.flush())
        if not hit:
            text += seq.stops.flush()
        if text or seq.unsent:
            self._send_piece(seq, text)
        return hit

    def _send_piece(self, seq: _Sequence, text: str) -> None:
        _send(seq.request, Piece(text, tuple(seq.unsent)))
        seq.unsent = []

    def _finish(self, seq: _Sequence, reason: str) -> None:
        in_tick = self._tick_start is not None and seq.logits is not None
        this_tick = time.perf_counter() - self._tick_start if in_tick else 0.0
        usage = Usage(
            prompt_tokens=len(seq.request.prompt),
            completion_tokens=seq.generated,
            cached_tokens=seq.cached,
            prompt_seconds=seq.prompt_seconds,
            generation_seconds=seq.decode_seconds + this_tick if seq.generated else 0.0,
            context_shifts=seq.shifts,
        )
        self._release(seq)
        _send(seq.request, Finished(reason, usage))

    def _fail(self, seq: _Sequence, message: str, error: BaseException | None = None) -> None:
        self._release(seq)
        _send(seq.request, Failed(message, error))

    def _release(self, seq: _Sequence) -> None:
        if seq in self._active:
            self._active.remove(seq)
            seq.slot.busy = False
            if seq.pending:  # stopped mid-prompt: the cache holds only what was evaluated
                seq.pending = []


def _choose_slot(free: Sequence[Slot], prompt: Sequence[int]) -> Slot:
    """The free slot whose cache holds the longest prefix of the prompt, when that prefix is
    more than PREFIX_SIMILARITY of the prompt (a follow-up turn); else the least recently used
    one, so that a new conversation does not evict another's cache for a shared BOS or system
    prompt (llama-server's slot_prompt_similarity rule)."""
    best = max(free, key=lambda s: (common_prefix(s.tokens, prompt), -s.last_used))
    if common_prefix(best.tokens, prompt) > PREFIX_SIMILARITY * len(prompt):
        return best
    return min(free, key=lambda s: s.last_used)


def _send(request: Request, event: Event) -> None:
    try:
        request.emit(event)
    except Exception:  # noqa: BLE001 - a receiver that went away must not stop the engine
        pass


def _token_info(token: int, logits: np.ndarray, n_logprobs: int | None) -> TokenInfo:
    if n_logprobs is None:
        return TokenInfo(token)
    logits = np.asarray(logits, dtype=np.float64)
    top = logits.max()
    log_z = top + np.log(np.exp(logits - top).sum())
    top_ids = np.argsort(-logits, kind="stable")[:n_logprobs] if n_logprobs > 0 else []
    return TokenInfo(
        token,
        float(logits[token] - log_z),
        tuple((int(i), float(logits[i] - log_z)) for i in top_ids),
    )


def model_with_own_cache(model: Any) -> Any:
    """A Model sharing `model`'s weights, embedding and head, with blocks of its own KV cache.

    The C++ block takes raw pointers into the memory-mapped weights (no copy: 7 extra block
    sets of SmolLM2-135M at n_ctx 512 add 79 MiB of RSS, their KV caches' size); a PyBlock is
    cloned with its loaded weights (host views or device arrays) shared and new caches."""
    clone = copy.copy(model)
    clone.blocks = [
        _block_with_own_cache(block, model, layer) for layer, block in enumerate(model.blocks)
    ]
    return clone


def _block_with_own_cache(block: Any, model: Any, layer: int) -> Any:
    if isinstance(block, PyBlock):
        clone = copy.copy(block)
        be, cfg, n_ctx = block.backend, block.cfg, block.n_ctx
        clone.k_cache = be.kv_cache(n_ctx, cfg["n_kv_heads"] * cfg["head_dim_k"])
        clone.v_cache = be.kv_cache(n_ctx, cfg["n_kv_heads"] * cfg["head_dim_v"])
        return clone
    return type(block)(
        block_cfg(model.config, layer), block_weights(model.file, layer, model.n_ctx), model.n_ctx
    )
