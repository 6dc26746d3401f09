"""`xlaserve bench serve`: a load test of a server, over gRPC or the OpenAI HTTP API, with the
load generator of bench/serve_load.py. Reports TTFT, inter-token latency and end-to-end latency
(p50/p90/p99), output tok/s, requests/s and errors by status, as JSON and a table.

    xlaserve bench serve --server 127.0.0.1:50051 --rates 1,4 --num-requests 64
    xlaserve bench serve --concurrency 1,8,32          # starts its own server on the default model
    xlaserve bench serve --protocol http --server 127.0.0.1:8000 --concurrency 1,8
    xlaserve bench serve --protocol http --structured both --repeats 3   # JSON-schema ITL overhead
    xlaserve bench serve --protocol http --compare llamacpp              # llama-server, same GGUF
    xlaserve bench serve --rates 2 --concurrency 8 --mixed-batch both   # with and without mixed steps

`--structured on` constrains every request's output to a JSON schema (`--json-schema FILE`,
default SCHEMA below); `both` runs each load without and then with it (`--repeats` times,
alternating) and reports the schema's ITL overhead as the median of back-to-back ratios.
`--compare llamacpp` runs `xlaserve serve` and llama-server (bench/llamacpp.py) each in a process
of its own on the same GGUF with the same slots, one after the other, under the same load.
`--mixed-batch both` starts two servers, without and with mixed steps (serve --mixed-batch), and
alternates every load between them, `--repeats` times; the ratio table compares them.
Every load and repeat sends the same `--num-requests` prompts, so after the first run a server finds
them in its prefix cache but for their last page; `--fresh-prompts` draws new ones for each load and
repeat (the same for every server), so each run prefills cold.
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
MIXED = "xlaserve mixed"  # the label of a server started with --mixed-batch beside one without

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
    servers = {r.get("server") for r in rows}
    for ours, peer in (pair for pair in PAIRS if set(pair) <= servers):
        lines += ["", f"| load | out tok/s {ours} / {peer} | TTFT p50 ms {ours} / {peer} |", "|---|---|---|"]
        for c in peer_ratios(rows, ours, peer):
            ttft = c["ttft_p50_s"]
            ratio = f(c["output_tok_s_ratio"])
            lines.append(f"| {_load(c)} | {ratio} | {ms(ttft, ours)} / {ms(ttft, peer)} |")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", help="HOST:PORT of a running server (default: start one on --model)")
    p.add_argument("--protocol", choices=("grpc", "http"), default="grpc", help="gRPC or the OpenAI HTTP API")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--max-slots", type=int, default=8, help="for the server this command starts")
    p.add_argument(
        "--mixed-batch",
        choices=("off", "on", "both"),
        default="off",
        help="the server this command starts decodes inside its prefill calls (serve --mixed-batch); "
        "both: a server each way, loads alternating between them, and the ratio",
    )
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
    p.add_argument(
        "--fresh-prompts",
        action="store_true",
        help="new prompts for each load and repeat (the same on every server), so no run finds the "
        "last one's in the prefix cache (default: every run sends the same --num-requests prompts)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key", default=None)
    p.add_argument("--out", default=None)


def _start_server(args, mixed: bool):
    """An in-process server on --model for the chosen protocol: (server, HOST:PORT)."""
    from xlaserve.llm import LLM

    llm = LLM(args.model, max_slots=args.max_slots, max_model_len=CONTEXT, mixed_batch=mixed)
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
    cmd += ["--mixed-batch"] if args.mixed_batch == "on" else []
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


def _prompt_seed(args, load: int, repeat: int) -> int:
    """The seed of one load's repeat's prompts: --seed for all (the same prompts each run, found in
    the prefix cache but for their last page after the first), or with --fresh-prompts one per
    (load, repeat), which every server of the sweep gets alike."""
    return args.seed + 1 + load * args.repeats + repeat if args.fresh_prompts else args.seed


def _sweep(args, targets: dict[str, str], schemas: list) -> list[dict]:
    """Each load, --repeats times, on each server (label -> HOST:PORT) without and with each
    schema, alternating so that drift falls on all alike; the prompts as `_prompt_seed` says."""
    rows = []
    for load, (kind, value) in enumerate(_loads(args)):
        runs = ((k, c, s) for k in range(args.repeats) for c in schemas for s in targets.items())
        for repeat, constrain, (label, target) in runs:
            seed = _prompt_seed(args, load, repeat)
            row = asyncio.run(
                run_config(
                    target,
                    prompts(args.num_requests, seed=seed),
                    args.max_tokens,
                    rate=value if kind == "rate" else None,
                    concurrency=value if kind == "concurrency" else None,
                    seed=args.seed,
                    api_key=args.api_key,
                    protocol=args.protocol,
                    schema=constrain,
                )
            )
            rows.append({"server": label, "repeat": repeat, "prompt_seed": seed, **row})
            print(json.dumps(rows[-1]), flush=True)
    return rows


# (server, the server it is measured against) in the ratio tables: the peer, the unmixed engine
PAIRS = (("xlaserve", "llama.cpp"), (MIXED, "xlaserve"))


def peer_ratios(rows: list[dict], ours: str = "xlaserve", peer: str = "llama.cpp") -> list[dict]:
    """Per load: ours / peer output tok/s and each one's TTFT p50 (medians over repeats)."""
    med = lambda server, load, f: _median([f(r) for r in rows if _key(r) == (server, *load)])
    out = []
    for load in dict.fromkeys(_key(r)[1:] for r in rows if _key(r)[0] == ours):
        a, b = (med(s, load, lambda r: r["output_tok_s"]) for s in (ours, peer))
        out.append(
            {
                "rate_rps": load[0],
                "concurrency": load[1],
                "output_tok_s_ratio": a / b if a is not None and b else None,
                "ttft_p50_s": {s: med(s, load, lambda r: r["ttft_s"]["p50"]) for s in (ours, peer)},
            }
        )
    return out


def run(args) -> dict:
    import jax

    if args.num_requests < 1 or args.repeats < 1:
        raise SystemExit(f"--num-requests={args.num_requests} and --repeats={args.repeats} must be ≥ 1")
    if (args.mixed_batch != "off" and args.server) or (args.mixed_batch == "both" and args.compare):
        raise SystemExit(
            "--mixed-batch sets up the server this command starts (give no --server); "
            "with --compare llamacpp it is on or off"
        )
    schema = SCHEMA
    if args.json_schema:
        with open(args.json_schema) as f:
            schema = json.load(f)
    schemas = {"off": [None], "on": [schema], "both": [None, schema]}[args.structured]
    load_start = os.getloadavg()[0]  # a busy machine makes every latency noisy: recorded
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
            rows = _sweep(args, {"xlaserve": target}, schemas)
        with llamacpp.LlamaServer(gguf, args.max_slots, CONTEXT) as server:
            rows += _sweep(args, {"llama.cpp": server.target}, schemas)
        peer = {"llama_cpp": llamacpp.version(), "ratios": peer_ratios(rows), "server_command": server.cmd}
        where = f"xlaserve serve and llama-server, {args.model} ({gguf.name}), {args.max_slots} slots each"
        where += ", xlaserve with --mixed-batch" if args.mixed_batch == "on" else ""
    elif args.server:
        rows, where = _sweep(args, {"xlaserve": args.server}, schemas), args.server
    else:
        ways = {"off": (False,), "on": (True,), "both": (False, True)}[args.mixed_batch]
        servers = {MIXED if m and len(ways) > 1 else "xlaserve": _start_server(args, m) for m in ways}
        try:
            rows = _sweep(args, {label: target for label, (_, target) in servers.items()}, schemas)
        finally:
            for server, _ in servers.values():
                server.stop()
        where = f"in-process ({args.protocol}), {args.model}, {args.max_slots} slots"
        where += {"off": "", "on": ", mixed batch", "both": f", without and with mixed batch ({MIXED})"}[
            args.mixed_batch
        ]
        if args.mixed_batch == "both":
            peer = {"ratios": peer_ratios(rows, MIXED, "xlaserve")}
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
