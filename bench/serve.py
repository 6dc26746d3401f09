"""`xlaserve bench serve`: a load test of a server, over gRPC or the OpenAI HTTP API, with the
load generator of bench/serve_load.py. Reports TTFT, inter-token latency and end-to-end latency
(p50/p90/p99), output tok/s, requests/s and errors by status, as JSON and a table.

    xlaserve bench serve --server 127.0.0.1:50051 --rates 1,4 --num-requests 64
    xlaserve bench serve --concurrency 1,8,32          # starts its own server on the default model
    xlaserve bench serve --protocol http --server 127.0.0.1:8000 --concurrency 1,8
    xlaserve bench serve --protocol http --structured both --repeats 3   # JSON-schema ITL overhead
    xlaserve bench serve --protocol http --compare llamacpp              # llama-server, same GGUF

`--structured on` constrains every request's output to a JSON schema (`--json-schema FILE`,
default SCHEMA below); `both` runs each load without and then with it (`--repeats` times,
alternating) and reports the schema's ITL overhead as the median of back-to-back ratios.
`--compare llamacpp` runs `xlaserve serve` and llama-server (bench/llamacpp.py) each in a process
of its own on the same GGUF with the same slots, one after the other, under the same load.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import subprocess
import sys

import numpy as np

from xlaserve.bench import report
from xlaserve.bench.offline import prompts
from xlaserve.bench.serve_load import run_config

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
    # one file per kind of run a day: plain, with a JSON schema, against llama.cpp
    name = "serve" + ("-llamacpp" if peer else "") + ("-json-schema" if args.structured != "off" else "")
    report.write(result, report.result_path(args.out, name))  # JSON + markdown
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    main()
