"""The gRPC server on the real model: streams equal the Python API, 64 concurrent streams lose and
duplicate nothing, cancellations and deadlines give everything back, and a real `xlaserve serve`
process reports health truthfully and drains on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time

import grpc
import pytest
from helpers import TEST_ENGINE

from xlaserve import SamplingParams
from xlaserve.serve.client import AsyncClient, Client
from xlaserve.serve.server import Server

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time",
    "The three primary colours are",
    "Water boils at",
    "List of planets: Mercury,",
    "import numpy as np\n",
    "Le chat est",
]
GREEDY = dict(temperature=0.0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def solo(llm):
    """Each prompt alone through the Python API (before the server takes the runner)."""
    return [llm.generate(p, SamplingParams(**GREEDY))[0] for p in PROMPTS]


@pytest.fixture(scope="module")
def served(llm, solo):
    server = Server(port=0, model_names=("smollm2",)).start()
    server.attach(llm)
    client = Client(f"127.0.0.1:{server.port}")
    yield server, client
    client.close()
    server.stop()  # gives the runner back to the other tests


def idle(client, timeout=30.0):
    end = time.time() + timeout
    while time.time() < end:
        s = client.stats()
        if s.slots_busy == 0 and s.queue_length == 0 and s.pages_used == 0:
            return s
        time.sleep(0.05)
    raise AssertionError(client.stats())


def test_streamed_text_equals_the_python_api(served, solo):
    _, client = served
    out = client.generate(PROMPTS[0], **GREEDY)
    assert (out.text, out.token_ids, out.finish_reason) == (solo[0].text, solo[0].token_ids, "length")
    chat = client.generate(
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24,
        temperature=0.0,
    )
    assert "Paris" in chat.text and chat.finish_reason == "eos"


def test_64_concurrent_streams_each_equal_to_its_solo_output(served, solo):
    server, _ = served

    async def run():
        async with AsyncClient(f"127.0.0.1:{server.port}") as c:
            return await asyncio.gather(*(c.generate(PROMPTS[i % 8], **GREEDY) for i in range(64)))

    outs = asyncio.run(run())
    for i, out in enumerate(outs):
        assert out.token_ids == solo[i % 8].token_ids and out.text == solo[i % 8].text, i


def test_n_seeded_samples_equal_separate_requests_with_seeds_seed_plus_j(served):
    _, client = served
    sampled = dict(temperature=1.0, max_tokens=12, ignore_eos=True)
    outs = client.generate_n(PROMPTS[2], n=3, seed=7, **sampled)
    alone = [client.generate(PROMPTS[2], seed=7 + j, **sampled) for j in range(3)]
    assert [o.token_ids for o in outs] == [a.token_ids for a in alone]
    assert len({tuple(o.token_ids) for o in outs}) > 1  # independent samples, not copies


def test_20_cancelled_streams_give_everything_back(served):
    _, client = served
    streams = [
        client.generate_stream(PROMPTS[i % 8], temperature=0.0, max_tokens=300, ignore_eos=True)
        for i in range(20)
    ]
    for s in streams[: TEST_ENGINE["max_slots"]]:
        next(s)  # these are decoding; the rest are queued or prefilling
    for s in streams:
        s.cancel()
    stats = idle(client)
    assert stats.slots_busy == 0 and stats.pages_used == 0 and stats.queue_length == 0


def test_deadline_while_queued_and_while_decoding(served):
    _, client = served
    long = dict(temperature=0.0, max_tokens=500, ignore_eos=True)
    blockers = [client.generate_stream(PROMPTS[i], **long) for i in range(TEST_ENGINE["max_slots"])]
    for s in blockers:
        next(s)
    with pytest.raises(grpc.RpcError) as info:
        client.generate(PROMPTS[5], max_tokens=8, timeout=0.5)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    for s in blockers:
        s.cancel()
    idle(client)
    got = []
    with pytest.raises(grpc.RpcError) as info:
        for msg in client.generate_stream(PROMPTS[6], timeout=1.5, **long):
            got.append(msg)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and 0 < len(got) < 500
    stats = idle(client)
    assert stats.requests_finished["deadline"] >= 2


def test_score_matches_the_python_api(served, llm):
    _, client = served
    results = client.score([("The capital of France is", " Paris"), ("The capital of France is", " London")])
    assert results[0].all_greedy and not results[1].all_greedy
    assert results[0].sum_logprob > results[1].sum_logprob
    assert abs(results[0].logprobs[0] - (-0.2581)) < 2e-3  # the log-prob seen while generating " Paris"


def wait_for(pattern: str, proc, timeout: float) -> re.Match:
    end, seen = time.time() + timeout, ""
    while time.time() < end:
        line = proc.stderr.readline()
        seen += line
        m = re.search(pattern, line)
        if m:
            return m
        if proc.poll() is not None:
            break
    raise AssertionError(f"{pattern!r} not seen; stderr so far:\n{seen}")


def test_serve_process_health_and_sigterm_drain(model_path, tmp_path):
    flags = [
        "--max-slots",
        str(TEST_ENGINE["max_slots"]),
        "--max-model-len",
        str(TEST_ENGINE["max_model_len"]),
        "--prefill-buckets",
        ",".join(map(str, TEST_ENGINE["prefill_buckets"])),
    ]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "xlaserve.cli",
            "serve",
            "--model",
            str(model_path),
            "--port",
            "0",
            "--grace-period",
            "60",
            *flags,
        ],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        port = int(wait_for(r"listening on 127\.0\.0\.1:(\d+)", proc, 120).group(1))
        client = Client(f"127.0.0.1:{port}")
        assert client.health() == "NOT_SERVING"  # still loading and compiling
        wait_for(r"SERVING .*compile", proc, 300)
        assert client.health() == "SERVING" and client.health("xlaserve.v1.Generation") == "SERVING"
        streams = [
            client.generate_stream(p, temperature=0.0, max_tokens=48, ignore_eos=True) for p in PROMPTS[:3]
        ]
        for s in streams:
            next(s)
        proc.send_signal(signal.SIGTERM)
        wait_for("draining", proc, 30)
        assert client.health() == "NOT_SERVING"
        with pytest.raises(grpc.RpcError) as info:
            client.generate("x", max_tokens=1)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        for s in streams:  # the streams in flight complete
            *_, last = list(s)
            assert last.final.usage.completion_tokens == 48
        assert proc.wait(timeout=60) == 0
        client.close()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_cli_generate_through_the_server(served, solo):
    server, _ = served
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "xlaserve.cli",
            "generate",
            "--server",
            f"127.0.0.1:{server.port}",
            "--max-tokens",
            "16",
            "--ignore-eos",
            PROMPTS[0],
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout == solo[0].text + "\n"
