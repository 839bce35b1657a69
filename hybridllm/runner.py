"""Runner: the public entry point. Load a model, then tokenize, score, generate and chat.

    r = Runner("smollm2-135m", n_ctx=4096)
    r.generate("The capital of France is", max_tokens=16, temperature=0)
    r.generate("Name a colour as JSON: ", json_schema={"type": "object", ...})  # structured output
    for piece in r.chat([{"role": "user", "content": "Hi!"}], stream=True): print(piece, end="")

A Runner holds one KV cache, the one slot of an `Engine` that the Runner drives on the caller's
thread (the server's engine runs the same scheduler over many slots). Calls on it run one at a
time: starting a call ends a stream still open. The slot remembers its tokens, so a prompt that
extends the previous one (the next chat turn) evaluates only the new tokens.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import sys
import time
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from . import kernels
from .backends.cpu import CpuBackend
from .backends.gpu_probe import GpuStatus, probe
from .catalog import resolve_model
from .constrain import Constraint, Grammar, compile_grammar
from .engine import Engine, Failed, Finished, Piece, SamplingState
from .errors import (
    ConfigError,
    ContextFullError,
    ContextLengthWarning,
    DeviceError,
    context_length_note,
)
from .generate import GenerationStats
from .gguf_file import ModelFile
from .model import Model, core_block_class, gpu_unverified
from .options import check, check_optional, check_stop, check_switch
from .placement import DEFAULT_MARGIN, ModelSizes, Plan, parse_size, plan
from .sampling import Sampler
from .tokenizer import Tokenizer

#: llama-perplexity's default context when none is given.
PERPLEXITY_N_CTX = 512
#: Keyword options of generate/chat beyond the common sampling arguments.
_OPTIONS = frozenset(
    {"repeat_last_n", "presence_penalty", "frequency_penalty", "context_shift", "ignore_eos", "n_keep"}
)


class Runner:
    """A loaded model with its tokenizer and KV cache; see the module docstring."""

    def __init__(
        self,
        model: str | os.PathLike[str],
        n_ctx: int = 4096,
        n_threads: int | None = None,
        n_gpu_layers: int | str = "auto",
        seed: int | None = None,
        verbose: bool = False,
        *,
        gpu_mem: int | str | None = None,
        gpu_margin: int | str = DEFAULT_MARGIN,
        head_on_gpu: bool = False,
        progress: Callable[[int, int], None] | None = None,
        n_seq: int = 1,
    ) -> None:
        """gpu_mem caps the GPU bytes the plan may use (e.g. "4GiB"); gpu_margin is kept free
        (default 1 GiB); head_on_gpu moves the output head and final norm to the GPU when every
        block is there; progress(done, total) is called as the blocks load; n_seq is the number
        of KV caches the plan reserves per block (an Engine over this model with N slots holds
        N + 1: the server passes that)."""
        t0 = time.perf_counter()
        n_ctx, n_threads = check("n_ctx", n_ctx), check_optional("n_threads", n_threads)
        placement = _Placement(
            _gpu_layers(n_gpu_layers), _size(gpu_mem, "gpu_mem"), _size(gpu_margin, "gpu_margin"),
            head_on_gpu,
        )
        seed = _seed(seed)
        self.n_seq = check("n_seq", n_seq)
        self.path = _resolve(model)
        self.model_file = ModelFile(self.path)
        self.config = self.model_file.config
        self.tokenizer = Tokenizer.from_gguf(self.model_file.reader)
        self.n_ctx = int(n_ctx) or self.config.context_length
        if self.n_ctx > self.config.context_length:
            message = context_length_note(self.n_ctx, self.config.context_length)
            warnings.warn(message, ContextLengthWarning, stacklevel=2)
        self.n_threads = int(n_threads or kernels.default_threads())
        self._placement = placement
        self.model, self.plan, self.gpu_label = self._load_model(placement, progress)
        self.n_gpu_layers = self.plan.n_gpu_layers
        cache = _ReplanningModel(self)
        # One conversation: its prompt goes through in one forward (no other stream to share
        # ticks with), as Model.forward alone evaluates it.
        self.engine = Engine(cache, self.tokenizer, prefill_chunk=self.n_ctx, slot_models=[cache])
        self.slot = self.engine.slots[0]  # the KV cache and the tokens it holds
        self._open_call: weakref.ref[Iterator[str]] | None = None  # a stream not yet finished
        self.seed = seed
        self._rng = np.random.default_rng(seed)
        self.last_stats = GenerationStats()
        self.load_seconds = time.perf_counter() - t0
        for note in self.plan.notes:
            print(f"hybridllm: {note}", file=sys.stderr)
        if verbose:
            print(self.describe(), file=sys.stderr)

    def _load_model(self, placement: _Placement, progress: Any) -> tuple[Model, Plan, str]:
        """Plan the placement and build the model; on GPU out-of-memory, re-plan with fewer
        GPU blocks (warning once) until it loads. Answers do not depend on the placement."""
        gpu = probe()
        cpu_only = gpu_unverified(self.model_file, self.n_ctx)
        if cpu_only and gpu.free_bytes is not None:  # every block on the CPU, saying why
            gpu = GpuStatus(free_bytes=None, reason=cpu_only)
        sizes = ModelSizes.from_model(self.model_file)
        request, warned = placement.n_gpu_layers, False
        while True:
            result = plan(
                self.config, sizes, self.n_ctx, gpu.free_bytes, n_gpu_layers=request,
                margin=placement.margin, gpu_mem=placement.gpu_mem,
                head_on_gpu=placement.head_on_gpu, no_gpu_reason=gpu.reason, n_seq=self.n_seq,
            )  # fmt: skip
            try:
                return self._build(result, gpu, progress), result, gpu.name or gpu.reason
            except DeviceError as exc:
                if result.n_gpu_layers == 0:
                    raise
                if not warned:
                    message = f"{exc}; re-planning with fewer GPU blocks"
                    warnings.warn(message, RuntimeWarning, stacklevel=3)
                    warned = True
                request = result.n_gpu_layers - 1

    def _replan(self, error: str) -> Model:
        """After a GPU out-of-memory in the middle of a forward: free the GPU run, then load
        again with one GPU block fewer (fewer still where that does not load) -> the new model,
        its KV caches empty."""
        warnings.warn(f"{error}; re-planning with fewer GPU blocks", RuntimeWarning, stacklevel=4)
        fewer = self._placement._replace(n_gpu_layers=self.plan.n_gpu_layers - 1)
        del self.model  # the old blocks' device memory goes back before the new ones load
        gc.collect()
        self.model, self.plan, self.gpu_label = self._load_model(fewer, None)
        self.n_gpu_layers = self.plan.n_gpu_layers
        return self.model

    def _build(self, result: Plan, gpu: GpuStatus, progress: Any) -> Model:
        cpu = CpuBackend(self.n_threads)
        on_gpu = result.n_gpu_layers > 0 or result.output == "gpu"
        device = _gpu_backend(gpu, self.n_threads) if on_gpu else None
        backends = [device if b.device == "gpu" else cpu for b in result.blocks]
        head = device if result.output == "gpu" else None
        return Model(self.model_file, self.n_ctx, self.n_threads, backends=backends,
                     head_backend=head, progress=progress)  # fmt: skip

    @property
    def model_name(self) -> str:
        return self.config.name

    @property
    def n_params(self) -> int:
        return sum(t.n_elements for t in self.model_file.tensors.values())

    @property
    def kernels_backend(self) -> str:
        block = "C++ block" if core_block_class() is not None else "Python block"
        return f"{kernels.default_backend()}, {block}"

    # --- information ----------------------------------------------------------------------
    @property
    def n_vocab(self) -> int:
        return self.model.n_vocab

    def describe(self) -> str:
        """A few lines about the loaded model and engine (what verbose=True prints)."""
        c = self.config
        block = "C++ _core.Block" if core_block_class() is not None else "Python/Numba block"
        return (
            f"hybridllm: {self.path.name}: {c.arch}, {c.name}, {c.n_layers} layers, dim {c.dim}, "
            f"{c.n_heads}/{c.n_kv_heads} heads, vocab {c.n_vocab}, "
            f"{self.model_file.file_size / 2**20:.0f} MiB\n"
            f"hybridllm: n_ctx {self.n_ctx}, {self.n_threads} threads, kernels "
            f"{kernels.default_backend()}, {block}, n_gpu_layers {self.n_gpu_layers}, "
            f"loaded in {self.load_seconds:.2f} s"
        )

    # --- tokens ---------------------------------------------------------------------------
    def tokenize(self, text: str, add_bos: bool = True, special: bool = False) -> list[int]:
        """Token ids of text; BOS is added only when add_bos and the model asks for one."""
        return self.tokenizer.encode(text, add_bos=add_bos, special=special)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)

    # --- scoring --------------------------------------------------------------------------
    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Logits (len(ids), n_vocab) float32 at every position, from a fresh context."""
        ids = [int(i) for i in ids]
        if not ids:
            return np.zeros((0, self.n_vocab), dtype=np.float32)
        self._end_open_call()
        return self.slot.evaluate(ids, 0, first_logit=0)

    def perplexity(self, text: str, n_ctx: int | None = None) -> float:
        """Perplexity of text, computed the way llama.cpp's llama-perplexity does.

        The tokens (with BOS if the model uses one) are cut into chunks of n_ctx; each chunk
        starts with BOS (replacing its first token) and only the predictions of its second half
        are scored, so every scored token sees at least n_ctx/2 tokens of context.
        """
        n_ctx = int(n_ctx or min(PERPLEXITY_N_CTX, self.n_ctx))
        if not 2 <= n_ctx <= self.n_ctx:
            raise ConfigError(
                f"perplexity n_ctx={n_ctx}: expected an integer from 2 to the Runner's n_ctx ({self.n_ctx})"
            )
        tokens = self.tokenize(text, add_bos=True)
        n_chunks = len(tokens) // n_ctx
        if n_chunks == 0:
            raise ConfigError(
                f"the text has {len(tokens)} tokens; perplexity with n_ctx={n_ctx} needs at least {n_ctx}"
            )
        first, nll, count = n_ctx // 2, 0.0, 0
        self._end_open_call()
        for i in range(n_chunks):
            chunk = tokens[i * n_ctx : (i + 1) * n_ctx]
            if self.tokenizer.add_bos and self.tokenizer.bos_id is not None:
                chunk[0] = self.tokenizer.bos_id
            logits = self.slot.evaluate(chunk, 0, first_logit=first)  # rows first..n_ctx-1
            targets = np.asarray(tokens[i * n_ctx + first + 1 : (i + 1) * n_ctx])
            nll -= float(_log_softmax_at(logits[:-1], targets).sum())
            count += len(targets)
        return math.exp(nll / count)

    # --- generation -----------------------------------------------------------------------
    def generate(
        self,
        prompt: str,
        max_tokens: int | None = 128,
        temperature: float = 0.8,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        repeat_penalty: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        stream: bool = False,
        *,
        json_schema: dict[str, Any] | str | None = None,
        regex: str | None = None,
        grammar: str | Grammar | None = None,
        choices: Sequence[str] | None = None,
        **options: Any,
    ) -> str | Iterator[str]:
        """Complete prompt (special tokens in it are parsed, as llama-cpp-python does).

        Structured output (at most one): json_schema (a dict or its JSON text), regex (matched
        whole), grammar (llama.cpp GBNF or Lark text, or a Grammar from
        constrain.compile_grammar), choices (a list of strings). Only tokens that keep the output
        a possible match are sampled, and generation stops once it is a complete match that
        nothing may extend (finish_reason "stop"). A bad constraint raises GrammarError
        (a ValueError) at the call, quoting llguidance's message.

        options: repeat_last_n (64; 0 = off, -1 = the whole context), presence_penalty,
        frequency_penalty (0.0, -2..2), context_shift (False: a full context raises
        ContextFullError), n_keep (tokens a context shift keeps at the start; default the prompt
        when it fills at most half the context, else 1; -1 = the whole prompt), ignore_eos (False).
        max_tokens None or -1: until the model stops. Returns the text, or an iterator of text
        pieces with stream=True. Timing of the call lands in `last_stats`.
        """
        ids = self.tokenize(prompt, add_bos=True, special=True) or self._bos()
        sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
        constrained = compile_grammar(
            json_schema=json_schema, regex=regex, grammar=grammar, choices=choices
        )
        return self._complete(
            ids, max_tokens, sampling, repeat_penalty, seed, stop, stream, options, constrained
        )

    def chat(
        self,
        messages: Sequence[dict[str, Any]],
        max_tokens: int | None = 128,
        temperature: float = 0.8,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        repeat_penalty: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        stream: bool = False,
        *,
        response_format: dict[str, Any] | None = None,
        json_schema: dict[str, Any] | str | None = None,
        regex: str | None = None,
        grammar: str | Grammar | None = None,
        choices: Sequence[str] | None = None,
        **options: Any,
    ) -> str | Iterator[str]:
        """Reply to a conversation, rendered with the model's chat template.

        The KV cache keeps the tokens of earlier turns, so only the new tokens are evaluated.
        response_format: OpenAI's {"type": "json_object"} (any JSON object) or {"type":
        "json_schema", "json_schema": {"schema": {...}}}; or, as in generate, one of
        json_schema, regex, grammar, choices. The reply is constrained, the prompt is not.
        """
        ids = self.chat_tokens(messages) or self._bos()
        sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
        constrained = compile_grammar(
            json_schema=json_schema, regex=regex, grammar=grammar, choices=choices,
            response_format=response_format,
        )  # fmt: skip
        return self._complete(
            ids, max_tokens, sampling, repeat_penalty, seed, stop, stream, options, constrained
        )

    def chat_tokens(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True
    ) -> list[int]:
        """The token ids `chat` evaluates for a conversation (its length against n_ctx)."""
        from .chat import render_chat  # jinja2 is loaded only by those who chat

        text = render_chat(self.model_file, list(messages), add_generation_prompt)
        bos = self.tokenizer.bos_id
        # The template may write the BOS text itself (gemma's "{{ bos_token }}"): add it once.
        has_bos = bos is not None and text.startswith(self.tokenizer.token_text(bos))
        return self.tokenize(text, add_bos=not has_bos, special=True)

    def _complete(
        self,
        ids: list[int],
        max_tokens: int | None,
        sampling: dict[str, Any],
        repeat_penalty: float,
        seed: int | None,
        stop: str | Sequence[str] | None,
        stream: bool,
        options: dict[str, Any],
        constrained: Grammar | None = None,
    ) -> str | Iterator[str]:
        unknown = set(options) - _OPTIONS
        if unknown:
            raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(unknown))}")
        max_tokens = check_optional("max_tokens", max_tokens)
        seed = _seed(seed)
        stop = check_stop(stop)
        context_shift = check_switch("context_shift", options.get("context_shift", False))
        ignore_eos = check_switch("ignore_eos", options.get("ignore_eos", False))
        n_keep = check_optional("n_keep", options.get("n_keep"))
        call_seed = seed if seed is not None else int(self._rng.integers(2**63))
        sampler = Sampler.create(
            **sampling,
            repeat_penalty=repeat_penalty,
            repeat_last_n=options.get("repeat_last_n", 64),
            presence_penalty=options.get("presence_penalty", 0.0),
            frequency_penalty=options.get("frequency_penalty", 0.0),
            seed=call_seed,
        )
        # Built here, not in the lazy generator: a grammar that fails raises at the call.
        constraint = None if constrained is None else self.constraint(constrained)
        request = dict(
            prompt=ids,
            sampling=SamplingState(sampler, constraint),
            max_tokens=None if max_tokens == -1 else max_tokens,
            stop=stop,
            stop_ids=() if ignore_eos else self.tokenizer.eot_ids,
            context_shift=context_shift,
            n_keep=n_keep,
        )
        self._end_open_call()
        self.last_stats = stats = GenerationStats(prompt_tokens=len(ids))
        pieces = self._pieces(request, stats)
        if stream:
            self._open_call = weakref.ref(pieces)
            return pieces
        return "".join(pieces)

    def _pieces(self, request: dict[str, Any], stats: GenerationStats) -> Iterator[str]:
        """Run the request on the Runner's slot -> its text pieces; stats filled at the end.
        The engine's failures are raised as they were raised in it (a GrammarError, a
        DeviceError); a full context without context_shift raises ContextFullError."""
        with contextlib.closing(self.engine.generate(request)) as events:
            for event in events:
                if isinstance(event, Piece):
                    stats.generated_tokens += len(event.tokens)
                    if event.text:
                        yield event.text
                elif isinstance(event, Finished):
                    _fill_stats(stats, event)
                    if event.reason == "context":
                        raise ContextFullError(
                            f"the context is full after {stats.generated_tokens} generated tokens "
                            f"(n_ctx={self.n_ctx}); context_shift=True keeps going, or use a "
                            "larger n_ctx"
                        )
                elif isinstance(event, Failed):
                    raise event.error if event.error is not None else RuntimeError(event.message)

    def _end_open_call(self) -> None:
        """Close a stream of an earlier call still open: its request leaves the slot."""
        pieces = self._open_call() if self._open_call is not None else None
        self._open_call = None
        if pieces is not None:
            pieces.close()

    def constraint(self, grammar: Grammar) -> Constraint:
        """A fresh matcher for one generation with this model's vocabulary (one per request)."""
        return Constraint(grammar, self.tokenizer, self.n_vocab)

    def _bos(self) -> list[int]:
        bos = self.tokenizer.bos_id
        if bos is None:
            raise ValueError("the prompt is empty and the model has no BOS token to start from")
        return [bos]


def _resolve(model: str | os.PathLike[str]) -> Path:
    return Path(resolve_model(model))


def _fill_stats(stats: GenerationStats, finished: Finished) -> None:
    """The engine's account of a finished request, in the Runner's `last_stats`."""
    usage = finished.usage
    stats.cached_tokens = usage.cached_tokens
    stats.prompt_seconds = usage.prompt_seconds
    stats.generated_tokens = usage.completion_tokens
    stats.generation_seconds = usage.generation_seconds
    stats.context_shifts = usage.context_shifts
    stats.finish_reason = finished.reason


def _log_softmax_at(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """log p(target) per row of logits (m, n_vocab), in float64 like llama-perplexity."""
    x = logits.astype(np.float64)
    mx = x.max(axis=1, keepdims=True)
    lse = np.log(np.exp(x - mx).sum(axis=1)) + mx[:, 0]
    return x[np.arange(len(targets)), targets] - lse


class _ReplanningModel:
    """What the Runner's slot evaluates through: the Runner's model, until a GPU out-of-memory
    in the middle of a forward (a prompt's activations, attention over a longer context) has the
    Runner re-plan with fewer GPU blocks (Runner._replan); the new model's caches are then
    refilled with the tokens the old one held before the failed call's position, and the call
    is retried. The Runner is held weakly (a dropped Runner frees its GPU memory at once, and a
    stream still being read without it raises the error instead of re-planning)."""

    def __init__(self, runner: Runner) -> None:
        self.model = runner.model
        self._runner = weakref.ref(runner)
        self.cached: list[int] = []  # the token whose K and V sit at each cache position

    @property
    def n_ctx(self) -> int:
        return self.model.n_ctx

    def forward_batch(
        self,
        segments: Sequence[tuple[Any, Sequence[int], int]],
        logit_rows: Sequence[int] | None = None,
    ) -> list[np.ndarray]:
        """The engine's batched forward over the Runner's one slot (this model): each segment
        through `forward`, which equals Model.forward_batch of one segment bit for bit (with
        logit_rows, the rows wanted of a segment come from one head call, as in Runner.logits)."""
        out, row0 = [], 0
        for _, tokens, pos0 in segments:
            n = len(tokens)
            wanted = [n - 1] if logit_rows is None else [r - row0 for r in logit_rows if row0 <= r < row0 + n]
            logits = self.forward(tokens, pos0, min(wanted) if wanted else -1)
            out.extend(logits[r - min(wanted)] for r in wanted)
            row0 += n
        return out

    def forward(self, tokens: Sequence[int], pos0: int = 0, first_logit: int = -1) -> np.ndarray:
        tokens, refill = list(tokens), False
        while True:
            try:
                if refill and pos0:
                    self.model.forward(self.cached[:pos0], 0)
                logits = self.model.forward(tokens, pos0, first_logit)
                self.cached[pos0:] = tokens
                return logits
            except DeviceError as exc:
                runner = self._runner()
                if runner is None or runner.plan.n_gpu_layers == 0 or len(self.cached) < pos0:
                    raise
                message = str(exc)
            # out of the except block, whose traceback holds the old model's frames
            del self.model  # with the Runner's, the last reference: the GPU run is freed
            self.model = runner._replan(message)
            refill = True


class _Placement(NamedTuple):
    n_gpu_layers: int | str
    gpu_mem: int | None
    margin: int
    head_on_gpu: bool


def _seed(seed: int | None) -> int | None:
    """A checked seed; None and -1 mean a random one."""
    seed = check_optional("seed", seed)
    return None if seed == -1 else seed


def _gpu_layers(value: int | str) -> int | str:
    """'auto', 'all', or a checked number of blocks (-1 means all, as in llama.cpp)."""
    if value in ("auto", "all"):
        return value
    if isinstance(value, str):
        raise ConfigError(f"n_gpu_layers={value!r}: expected 'auto', 'all' or an integer >= 0")
    n = check("n_gpu_layers", value)
    return "all" if n == -1 else n


def _size(value: int | str | None, name: str) -> int | None:
    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as exc:
        raise ConfigError(f"{name}={value!r}: {exc}") from None


def _gpu_backend(gpu: GpuStatus, n_threads: int) -> Any:
    """The device backend for GPU blocks: the simulated one under HYBRIDLLM_SIMULATE_GPU."""
    if gpu.simulated:
        from .backends.simulated import SimulatedGpuBackend

        return SimulatedGpuBackend(capacity_bytes=gpu.free_bytes, n_threads=n_threads)
    try:
        from .backends.cuda import CudaBackend
    except ImportError as exc:
        raise DeviceError(f"the CUDA backend cannot be imported ({exc})") from None
    return CudaBackend()
