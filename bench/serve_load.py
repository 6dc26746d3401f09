"""Load generator for a running server, over gRPC or the OpenAI HTTP API: Poisson arrivals at
given rates, or a fixed number of concurrent clients, with prompts of mixed lengths. Reports TTFT,
inter-token latency and end-to-end latency (p50/p90/p99), output tok/s, requests/s and errors by
status, as JSON and a table.

    xlaserve bench serve --server 127.0.0.1:50051 --rates 1,4 --num-requests 64
    xlaserve bench serve --concurrency 1,8,32          # starts its own server on the default model
    xlaserve bench serve --protocol http --server 127.0.0.1:8000 --concurrency 1,8
    xlaserve bench serve --protocol http --structured both --concurrency 1,8   # JSON-schema overhead

Latencies are measured by the client: TTFT from sending the request to the first token, ITL as the
time between streamed messages divided by the tokens they carry (HTTP: one SSE chunk per delta,
its tokens counted with the server's usage at the end). `--structured on` constrains every
request's output to a JSON schema (`--json-schema FILE`, default SCHEMA below); `both` runs each
load twice, without and with it, and reports the schema's ITL overhead.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import itertools
import json
import os
import platform
import random
import subprocess
import sys
import time
from collections import Counter

import grpc
import numpy as np

from xlaserve.bench import report
from xlaserve.bench.offline import prompts

CONTEXT = 512  # tokens per sequence on the servers this command starts

# An open-ended document: long outputs, so a constrained request decodes about as long as a free one.
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "summary": {"type": "string"},
    },
    "required": ["title", "tags", "summary"],
}


def percentiles(xs) -> dict:
    if not xs:
        return {"p50": None, "p90": None, "p99": None}
    a = np.asarray(xs)
    return {f"p{q}": float(np.percentile(a, q)) for q in (50, 90, 99)}


async def one_grpc(client, prompt: str, max_tokens: int, record: dict, schema: str | None) -> None:
    t0 = time.perf_counter()
    times: list[tuple[float, int]] = []  # (arrival, tokens) of each delta
    try:
        async for msg in client.generate_stream(
            prompt, temperature=0.0, max_tokens=max_tokens, ignore_eos=True, json_schema=schema
        ):
            if msg.HasField("delta") and msg.delta.token_ids:
                times.append((time.perf_counter(), len(msg.delta.token_ids)))
        _finished(record, t0, times)
    except grpc.aio.AioRpcError as e:
        _failed(record, e.code().name, e.details())


async def one_http(client, prompt: str, max_tokens: int, record: dict, schema: str | None) -> None:
    """One streamed /v1/completions request. A chunk's token count is not in the stream: the usage
    chunk's total is spread evenly over the text chunks (one token each at decode_steps=1)."""
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if schema is not None:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "doc", "schema": schema}}
    t0 = time.perf_counter()
    arrivals, total = [], 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            _failed(record, str(r.status_code), (await r.aread()).decode(errors="replace"))
            return
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                total = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                arrivals.append(time.perf_counter())
    # no usage chunk (a server without include_usage): one token per chunk
    each = (total or len(arrivals)) / len(arrivals) if arrivals else 0
    _finished(record, t0, [(t, each) for t in arrivals])


def _failed(record: dict, status: str, message: str) -> None:
    """Count a refusal under its status; keep the first message of each (the reason to read)."""
    record["status"][status] += 1
    record["errors"].setdefault(status, message[:300])


def _finished(record: dict, t0: float, times: list[tuple[float, float]]) -> None:
    """A request ended: TTFT to its first delta; each later delta's gap shared by its tokens."""
    if not times:
        record["status"]["NO_TOKENS"] += 1
        return
    for (prev, _), (now, n) in itertools.pairwise(times):
        record["itl"] += [(now - prev) / n] * round(n) if n >= 1 else [now - prev]
    record["ttft"].append(times[0][0] - t0)
    record["e2e"].append(time.perf_counter() - t0)
    record["tokens"] += sum(n for _, n in times)
    record["status"]["OK"] += 1


@contextlib.asynccontextmanager
async def connect(protocol: str, target: str, api_key: str | None, clients: int):
    """(client, the coroutine that sends one request on it)."""
    if protocol == "grpc":
        from xlaserve.serve.client import AsyncClient

        async with AsyncClient(target, api_key=api_key) as client:
            yield client, one_grpc
        return
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(
        base_url=f"http://{target}", headers=headers, timeout=None, limits=limits
    ) as client:
        yield client, one_http


async def run_config(
    target: str,
    texts: list[str],
    max_tokens: int,
    *,
    rate: float | None,
    concurrency: int | None,
    seed: int,
    api_key: str | None,
    protocol: str = "grpc",
    schema: dict | None = None,
) -> dict:
    record = {"ttft": [], "itl": [], "e2e": [], "tokens": 0, "status": Counter(), "errors": {}}
    wire = None if schema is None else (json.dumps(schema) if protocol == "grpc" else schema)
    async with connect(protocol, target, api_key, concurrency or 64) as (client, one):
        t0 = time.perf_counter()
        if rate is not None:
            rng = random.Random(seed)
            tasks = []
            for text in texts:
                tasks.append(asyncio.create_task(one(client, text, max_tokens, record, wire)))
                await asyncio.sleep(rng.expovariate(rate))
            await asyncio.gather(*tasks)
        else:
            queue = list(texts)

            async def worker():
                while queue:
                    await one(client, queue.pop(), max_tokens, record, wire)

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {
        "protocol": protocol,
        "json_schema": schema is not None,
        "rate_rps": rate,
        "concurrency": concurrency,
        "requests": len(texts),
        "wall_s": wall,
        "requests_per_s": record["status"]["OK"] / wall,
        "output_tok_s": record["tokens"] / wall,
        "ttft_s": percentiles(record["ttft"]),
        "itl_s": percentiles(record["itl"]),
        "e2e_s": percentiles(record["e2e"]),
        "status": dict(record["status"]),
        "errors": record["errors"],
    }


def _median(xs):
    xs = [x for x in xs if x is not None]
    return float(np.median(xs)) if xs else None


def _key(r: dict) -> tuple:
    return r.get("server") or "xlaserve", r["rate_rps"], r["concurrency"]


def schema_overhead(rows: list[dict]) -> list[dict]:
    """Per server and load run with and without the schema: ITL p50/p90 with it / without it, the
    median over repeats (each repeat's pair ran back to back, so drift cancels in its ratio)."""
    ratios: dict[tuple, dict[str, list]] = {}
    for r in (r for r in rows if r["json_schema"]):
        base = next(
            b
            for b in rows
            if not b["json_schema"] and _key(b) == _key(r) and b.get("repeat", 0) == r.get("repeat", 0)
        )
        with_, without = r["itl_s"], base["itl_s"]
        for q in ("p50", "p90"):
            ratio = with_[q] / without[q] if with_[q] and without[q] else None
            ratios.setdefault(_key(r), {}).setdefault(q, []).append(ratio)
    return [
        {
            "server": key[0],
            "rate_rps": key[1],
            "concurrency": key[2],
            "itl_p50_ratio": _median(r["p50"]),
            "itl_p90_ratio": _median(r["p90"]),
            "repeats": len(r["p50"]),
        }
        for key, r in ratios.items()
    ]


def _load(r: dict) -> str:
    return f"{r['rate_rps']} rps" if r["rate_rps"] is not None else f"{r['concurrency']} concurrent"


def table(rows: list[dict]) -> str:
    ms = lambda d, k: "-" if d[k] is None else f"{d[k] * 1e3:.0f}"
    f = lambda x: "-" if x is None else f"{x:.3f}"
    lines = [
        "| server | load | protocol | JSON schema | req/s | out tok/s | TTFT p50/p90/p99 ms "
        "| ITL p50/p90/p99 ms | e2e p50/p99 ms | status |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t, i, e = r["ttft_s"], r["itl_s"], r["e2e_s"]
        lines.append(
            f"| {r.get('server', 'xlaserve')} | {_load(r)} | {r.get('protocol', 'grpc')} "
            f"| {'yes' if r.get('json_schema') else 'no'} | {r['requests_per_s']:.2f} "
            f"| {r['output_tok_s']:.1f} "
            f"| {ms(t, 'p50')}/{ms(t, 'p90')}/{ms(t, 'p99')} "
            f"| {ms(i, 'p50')}/{ms(i, 'p90')}/{ms(i, 'p99')} | {ms(e, 'p50')}/{ms(e, 'p99')} | "
            f"{', '.join(f'{k} {v}' for k, v in sorted(r['status'].items()))} |"
        )
    overhead = schema_overhead(rows)
    if overhead:
        lines += [
            "",
            "| server | load | ITL p50 with / without schema | ITL p90 with / without |",
            "|---|---|---|---|",
        ]
        for o in overhead:
            lines.append(
                f"| {o['server']} | {_load(o)} | {f(o['itl_p50_ratio'])} | {f(o['itl_p90_ratio'])} |"
            )
    if any(r.get("server") == "llama.cpp" for r in rows):
        lines += [
            "",
            "| load | out tok/s xlaserve / llama.cpp | TTFT p50 ms xlaserve / llama.cpp |",
            "|---|---|---|",
        ]
        for c in peer_ratios(rows):
            ttft = c["ttft_p50_s"]
            lines.append(
                f"| {_load(c)} | {f(c['output_tok_s_ratio'])} "
                f"| {ms(ttft, 'xlaserve')} / {ms(ttft, 'llama.cpp')} |"
            )
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", help="HOST:PORT of a running server (default: start one on --model)")
    p.add_argument("--protocol", choices=("grpc", "http"), default="grpc", help="gRPC or the OpenAI HTTP API")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--max-slots", type=int, default=8, help="for the server this command starts")
    p.add_argument("--rates", help="Poisson arrival rates, requests/s, comma-separated")
    p.add_argument("--concurrency", default=None, help="fixed concurrent clients, comma-separated")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument(
        "--structured",
        choices=("off", "on", "both"),
        default="off",
        help="constrain outputs to a JSON schema; both: each load without, then with it",
    )
    p.add_argument(
        "--json-schema", default=None, help="JSON schema file for --structured (default: built in)"
    )
    p.add_argument(
        "--compare",
        choices=("llamacpp",),
        help="also serve the same GGUF with llama-server (bench/llamacpp.py builds it) and run the same load",
    )
    p.add_argument(
        "--repeats", type=int, default=1, help="runs of each load (with --structured both: alternating)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key", default=None)
    p.add_argument("--out", default=None)


def _start_server(args):
    """An in-process server on --model for the chosen protocol: (server, HOST:PORT)."""
    from xlaserve.llm import LLM

    llm = LLM(args.model, max_slots=args.max_slots, max_model_len=CONTEXT)
    if args.protocol == "http":
        from xlaserve.serve.http_server import HttpServer

        server = HttpServer(port=0, model_names=(args.model,)).start()
    else:
        from xlaserve.serve.server import Server

        server = Server(port=0).start()
    server.attach(llm)
    return server, f"127.0.0.1:{server.port}"


@contextlib.contextmanager
def _serve_process(args):
    """`xlaserve serve --http-port` in a process of its own (as llama-server runs): HOST:PORT."""
    from xlaserve.bench.llamacpp import free_port, wait_healthy

    port = free_port()
    cmd = [sys.executable, "-m", "xlaserve.cli", "serve", "--model", args.model, "--http-port", str(port)]
    cmd += ["--max-slots", str(args.max_slots), "--max-model-len", str(CONTEXT)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_healthy(f"127.0.0.1:{port}", proc, timeout=900)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(60)


def _loads(args) -> list[tuple[str, float]]:
    configs = [("rate", float(r)) for r in (args.rates or "").split(",") if r]
    default = "" if args.rates else "1,8"
    return configs + [("concurrency", int(c)) for c in (args.concurrency or default).split(",") if c]


def _sweep(args, target: str, texts: list[str], schemas: list, label: str) -> list[dict]:
    rows = []
    for kind, value in _loads(args):
        for repeat, constrain in ((k, c) for k in range(args.repeats) for c in schemas):
            row = asyncio.run(
                run_config(
                    target,
                    texts,
                    args.max_tokens,
                    rate=value if kind == "rate" else None,
                    concurrency=value if kind == "concurrency" else None,
                    seed=args.seed,
                    api_key=args.api_key,
                    protocol=args.protocol,
                    schema=constrain,
                )
            )
            rows.append({"server": label, "repeat": repeat, **row})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def peer_ratios(rows: list[dict]) -> list[dict]:
    """Per load: xlaserve / llama.cpp output tok/s and each one's TTFT p50 (medians over repeats)."""
    med = lambda server, load, f: _median([f(r) for r in rows if _key(r) == (server, *load)])
    out = []
    for load in dict.fromkeys(_key(r)[1:] for r in rows if _key(r)[0] == "xlaserve"):
        ours, peer = (med(s, load, lambda r: r["output_tok_s"]) for s in ("xlaserve", "llama.cpp"))
        out.append(
            {
                "rate_rps": load[0],
                "concurrency": load[1],
                "output_tok_s_ratio": ours / peer if ours is not None and peer else None,
                "ttft_p50_s": {
                    s: med(s, load, lambda r: r["ttft_s"]["p50"]) for s in ("xlaserve", "llama.cpp")
                },
            }
        )
    return out


def run(args) -> dict:
    import jax

    if args.num_requests < 1 or args.repeats < 1:
        raise SystemExit(f"--num-requests={args.num_requests} and --repeats={args.repeats} must be ≥ 1")
    schema = SCHEMA
    if args.json_schema:
        with open(args.json_schema) as f:
            schema = json.load(f)
    schemas = {"off": [None], "on": [schema], "both": [None, schema]}[args.structured]
    load_start = os.getloadavg()[0]  # a busy machine makes every latency noisy: recorded
    texts = prompts(args.num_requests, seed=args.seed)
    peer = None
    if args.compare == "llamacpp":
        if args.server or args.protocol != "http":
            raise SystemExit(
                "--compare llamacpp starts both servers itself and drives them over HTTP: "
                "give --protocol http and no --server"
            )
        from xlaserve.bench import llamacpp
        from xlaserve.checkpoints import registry

        gguf = registry.resolve(args.model)
        with _serve_process(args) as target:
            rows = _sweep(args, target, texts, schemas, "xlaserve")
        with llamacpp.LlamaServer(gguf, args.max_slots, CONTEXT) as server:
            rows += _sweep(args, server.target, texts, schemas, "llama.cpp")
        peer = {"llama_cpp": llamacpp.version(), "ratios": peer_ratios(rows), "server_command": server.cmd}
        where = f"xlaserve serve and llama-server, {args.model} ({gguf.name}), {args.max_slots} slots each"
    else:
        server, target = (None, args.server) if args.server else _start_server(args)
        try:
            rows = _sweep(args, target, texts, schemas, "xlaserve")
        finally:
            if server is not None:
                server.stop()
        where = args.server or f"in-process ({args.protocol}), {args.model}, {args.max_slots} slots"
    print(table(rows))
    result = {
        "kind": "serve",
        "command": report.command_line("xlaserve bench serve", add_arguments, args),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "server": where,
        "client_machine": {
            "platform": platform.platform(),
            "backend": jax.default_backend(),
            "cpus": os.cpu_count(),
            "load_average_1min": {"start": load_start, "end": os.getloadavg()[0]},
        },
        "max_tokens": args.max_tokens,
        "json_schema": schema if args.structured != "off" else None,
        "rows": rows,
        "schema_overhead": schema_overhead(rows),
        "compare": peer,
        "table": table(rows),
    }
    report.write(result, report.result_path(args.out, "serve"))  # JSON + markdown
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    main()
