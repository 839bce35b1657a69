"""Load test of an OpenAI-compatible server: N concurrent clients, each streaming completions.

    python bench/serve_load.py --model smollm2-135m --parallel 16          # starts hybridllm serve
    python bench/serve_load.py --url http://127.0.0.1:8080 --label llama-server
    python bench/serve_load.py --model smollm2-135m --threads 2 --llama-server PATH/llama-server

With --llama-server, that binary is started too, on the same model file with the same threads
and slots (-np; -c is its total context, so --ctx times the slots), and the two servers take
turns: each concurrency runs on ours, then on llama-server, before the next one.

For each concurrency (default 1, 4, 16) every client sends --requests streamed completions of
exactly --tokens tokens (ignore_eos, which llama-server accepts too), each with a prompt of its
own so no two share more than the instruction. It checks that every request completed with
--tokens tokens and a distinct id (none lost, none duplicated), and reports the aggregate
generated tokens/s (all tokens / wall time of the round) and the time to first token (request
sent -> first text chunk), median and p95. Loopback only, bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import httpx

TOPICS = ["the sea", "a mountain", "a city at night", "an old library", "a train journey",
          "a garden in spring", "a storm", "a lighthouse", "a desert", "a forest path",
          "a market", "a snowy village", "a river", "a clock tower", "a harbor", "a bakery"]  # fmt: skip


@dataclass
class Result:
    rid: str
    tokens: int
    ttft: float  # seconds from sending to the first text chunk


async def one_request(client: httpx.AsyncClient, prompt: str, n_tokens: int) -> Result:
    body = {"prompt": prompt, "max_tokens": n_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    t0 = time.perf_counter()
    ttft, rid, chunks, usage = None, None, 0, None
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            rid = rid or event.get("id")
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices", []):
                if choice.get("text"):
                    chunks += 1
                    ttft = ttft if ttft is not None else time.perf_counter() - t0
    tokens = usage["completion_tokens"] if usage else chunks
    return Result(rid or "", tokens, ttft if ttft is not None else float("nan"))


async def run_round(
    url: str, n_clients: int, n_requests: int, n_tokens: int, timeout: float
) -> dict:
    limits = httpx.Limits(max_connections=n_clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:

        async def client_loop(c: int) -> list[Result]:
            out = []
            for r in range(n_requests):
                topic = TOPICS[(c + r) % len(TOPICS)]
                prompt = f"Request {c}-{r}. Write a long story about {topic}, told by visitor number {c * 97 + r}:"
                out.append(await one_request(client, prompt, n_tokens))
            return out

        t0 = time.perf_counter()
        results = [
            r
            for rs in await asyncio.gather(*(client_loop(c) for c in range(n_clients)))
            for r in rs
        ]
        wall = time.perf_counter() - t0
    expected = n_clients * n_requests
    ids = [r.rid for r in results]
    ttfts = sorted(r.ttft for r in results)
    return {
        "clients": n_clients,
        "requests": expected,
        "completed": sum(r.tokens == n_tokens for r in results),
        "duplicated ids": len(ids) - len(set(ids)),
        "tokens": sum(r.tokens for r in results),
        "wall s": round(wall, 2),
        "tokens/s": round(sum(r.tokens for r in results) / wall, 1),
        "TTFT median s": round(statistics.median(ttfts), 3),
        "TTFT p95 s": round(ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))], 3),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "hybridllm.cli", "serve", args.model, "--port", str(port),
               "-np", str(args.parallel), "-c", str(args.ctx)]  # fmt: skip
    if args.threads:
        command += ["-t", str(args.threads)]
    return wait_ready(subprocess.Popen(command), f"http://127.0.0.1:{port}")


def start_llama_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    from hybridllm import catalog

    port = free_port()
    command = [args.llama_server, "-m", catalog.resolve_model(args.model), "--host", "127.0.0.1",
               "--port", str(port), "-np", str(args.parallel), "-c", str(args.ctx * args.parallel)]  # fmt: skip
    if args.threads:
        command += ["-t", str(args.threads)]
    # its log goes to a file (named if the run fails): it writes a line per request
    log = tempfile.NamedTemporaryFile(prefix="llama-server-", suffix=".log", delete=False)
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    proc.log_path = log.name  # type: ignore[attr-defined]
    return wait_ready(proc, f"http://127.0.0.1:{port}")


def wait_ready(proc: subprocess.Popen, url: str) -> tuple[subprocess.Popen, str]:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("the server exited")
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise SystemExit("the server did not become ready in 300 s")


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server (loopback)")
    where.add_argument("--model", help="start `hybridllm serve MODEL` for the test")
    p.add_argument("--label", default=None, help="name of the server in the table")
    p.add_argument(
        "--parallel", type=int, default=16, help="slots of the started server (default 16)"
    )
    p.add_argument("--ctx", type=int, default=512, help="context per slot of the started server")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--clients", default="1,4,16", help="concurrencies (default 1,4,16)")
    p.add_argument(
        "--requests", type=int, default=1, help="requests per client per round (default 1)"
    )
    p.add_argument("--tokens", type=int, default=128, help="tokens per request (default 128)")
    p.add_argument("--timeout", type=float, default=600, help="seconds a request may take")
    p.add_argument("--json", action="store_true", help="print one JSON object per round")
    p.add_argument(
        "--llama-server", default=None, help="also start this llama-server binary (needs --model)"
    )
    args = p.parse_args()
    if args.llama_server and not args.model:
        raise SystemExit("--llama-server needs --model")
    procs, servers = [], []
    try:
        if args.model:
            proc, url = start_server(args)
            procs.append(proc)
            servers.append((args.label or "hybridllm", url))
            if args.llama_server:
                proc, url = start_llama_server(args)
                procs.append(proc)
                servers.append(("llama-server", url))
        else:
            servers.append((args.label or args.url, args.url))
        for _, url in servers:
            if not url.startswith(("http://127.0.0.1", "http://localhost", "http://[::1]")):
                raise SystemExit("--url: loopback addresses only")
            # one request first, not measured: first-call costs (page faults, lazy compiles)
            asyncio.run(run_round(url, 1, 1, 8, args.timeout))
        rows = []
        for n in (int(c) for c in args.clients.split(",")):
            for label, url in servers:
                round_ = asyncio.run(run_round(url, n, args.requests, args.tokens, args.timeout))
                row = {"server": label, **round_}
                rows.append(row)
                text = json.dumps(row) if args.json else "  ".join(f"{k}={v}" for k, v in row.items())
                print(text, flush=True)
        lost = [r for r in rows if r["completed"] != r["requests"] or r["duplicated ids"]]
        return 1 if lost else 0
    except BaseException:
        for proc in procs:  # which server failed, and where llama-server's log is kept
            state = "running" if proc.poll() is None else f"exited with {proc.returncode}"
            print(f"{proc.args[0]}: {state}; log: {getattr(proc, 'log_path', 'above')}", file=sys.stderr)
            proc.log_path = None  # type: ignore[attr-defined]
        raise
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)
            if getattr(proc, "log_path", None):
                os.unlink(proc.log_path)


if __name__ == "__main__":
    sys.exit(main())
