"""The load generator of `xlaserve bench serve` (bench/serve.py): one configuration of requests
against a running server, over gRPC or the OpenAI HTTP API, as Poisson arrivals at a rate or a
fixed number of concurrent clients.

Latencies are measured by the client: TTFT from sending the request to the first token, ITL as the
time between streamed messages divided by the tokens they carry (HTTP: one SSE chunk per delta,
its tokens counted with the server's usage at the end), e2e to the last message. Refusals are
counted by status (gRPC code or HTTP status), with the first message of each kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import time
from collections import Counter

import grpc
import numpy as np


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
    # A connection per request: llama-server closes one after a streamed response without saying
    # so, and a client that reuses it before the close arrives gets "Server disconnected without
    # sending a response" (a race a busy machine makes common). Loopback connects cost ~1 ms, and
    # both servers pay them alike.
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=0)
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
