"""Load generator for a running server: Poisson arrivals at given rates, or a fixed number of
concurrent clients, with prompts of mixed lengths. Reports TTFT, inter-token latency and end-to-end
latency (p50/p90/p99), output tok/s, requests/s and errors by status, as JSON and a table.

    xlaserve bench serve --server 127.0.0.1:50051 --rates 1,4 --num-requests 64
    xlaserve bench serve --concurrency 1,8,32          # starts its own server on the default model

Latencies are measured by the client: TTFT from sending the request to the first token, ITL as the
time between streamed messages divided by the tokens they carry.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import platform
import random
import time
from collections import Counter

import grpc
import numpy as np

from xlaserve.bench import report
from xlaserve.bench.offline import prompts


def percentiles(xs) -> dict:
    if not xs:
        return {"p50": None, "p90": None, "p99": None}
    a = np.asarray(xs)
    return {f"p{q}": float(np.percentile(a, q)) for q in (50, 90, 99)}


async def one(client, prompt: str, max_tokens: int, record: dict) -> None:
    t0 = time.perf_counter()
    first = last = None
    tokens = 0
    try:
        async for msg in client.generate_stream(
            prompt, temperature=0.0, max_tokens=max_tokens, ignore_eos=True
        ):
            if not msg.HasField("delta") or not msg.delta.token_ids:
                continue
            now = time.perf_counter()
            n = len(msg.delta.token_ids)
            if first is None:
                first = now
            else:
                record["itl"] += [(now - last) / n] * n
            last, tokens = now, tokens + n
        record["ttft"].append(first - t0)
        record["e2e"].append(time.perf_counter() - t0)
        record["tokens"] += tokens
        record["status"]["OK"] += 1
    except grpc.aio.AioRpcError as e:
        record["status"][e.code().name] += 1


async def run_config(
    target: str,
    texts: list[str],
    max_tokens: int,
    *,
    rate: float | None,
    concurrency: int | None,
    seed: int,
    api_key: str | None,
) -> dict:
    from xlaserve.serve.client import AsyncClient

    record = {"ttft": [], "itl": [], "e2e": [], "tokens": 0, "status": Counter()}
    async with AsyncClient(target, api_key=api_key) as client:
        t0 = time.perf_counter()
        if rate is not None:
            rng = random.Random(seed)
            tasks = []
            for text in texts:
                tasks.append(asyncio.create_task(one(client, text, max_tokens, record)))
                await asyncio.sleep(rng.expovariate(rate))
            await asyncio.gather(*tasks)
        else:
            queue = list(texts)

            async def worker():
                while queue:
                    await one(client, queue.pop(), max_tokens, record)

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {
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
    }


def table(rows: list[dict]) -> str:
    ms = lambda d, k: "-" if d[k] is None else f"{d[k] * 1e3:.0f}"
    lines = [
        "| load | req/s | out tok/s | TTFT p50/p90/p99 ms | ITL p50/p90/p99 ms | e2e p50/p99 ms | status |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        load = f"{r['rate_rps']} rps" if r["rate_rps"] is not None else f"{r['concurrency']} concurrent"
        t, i, e = r["ttft_s"], r["itl_s"], r["e2e_s"]
        lines.append(
            f"| {load} | {r['requests_per_s']:.2f} | {r['output_tok_s']:.1f} "
            f"| {ms(t, 'p50')}/{ms(t, 'p90')}/{ms(t, 'p99')} "
            f"| {ms(i, 'p50')}/{ms(i, 'p90')}/{ms(i, 'p99')} | {ms(e, 'p50')}/{ms(e, 'p99')} | "
            f"{', '.join(f'{k} {v}' for k, v in sorted(r['status'].items()))} |"
        )
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", help="HOST:PORT of a running server (default: start one on --model)")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--max-slots", type=int, default=8, help="for the server this command starts")
    p.add_argument("--rates", help="Poisson arrival rates, requests/s, comma-separated")
    p.add_argument("--concurrency", default=None, help="fixed concurrent clients, comma-separated")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key", default=None)
    p.add_argument("--out", default=None)


def run(args) -> dict:
    import jax

    server = None
    target = args.server
    if target is None:
        from xlaserve.llm import LLM
        from xlaserve.serve.server import Server

        server = Server(port=0).start()
        server.attach(LLM(args.model, max_slots=args.max_slots, max_model_len=512))
        target = f"127.0.0.1:{server.port}"
    texts = prompts(args.num_requests, seed=args.seed)
    configs = [("rate", float(r)) for r in (args.rates or "").split(",") if r]
    configs += [
        ("concurrency", int(c)) for c in (args.concurrency or ("" if args.rates else "1,8")).split(",") if c
    ]
    rows = []
    try:
        for kind, value in configs:
            row = asyncio.run(
                run_config(
                    target,
                    texts,
                    args.max_tokens,
                    rate=value if kind == "rate" else None,
                    concurrency=value if kind == "concurrency" else None,
                    seed=args.seed,
                    api_key=args.api_key,
                )
            )
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        if server is not None:
            server.stop()
    print(table(rows))
    result = {
        "kind": "serve",
        "command": report.command_line("xlaserve bench serve", add_arguments, args),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "server": args.server or f"in-process, {args.model}, {args.max_slots} slots",
        "client_machine": {"platform": platform.platform(), "backend": jax.default_backend()},
        "max_tokens": args.max_tokens,
        "rows": rows,
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
