"""The gRPC server over the mock engine (hand-checkable tokens: each is the previous + 1; nothing
compiles): real gRPC on loopback, the real scheduler, runner and engine loop."""

from __future__ import annotations

import asyncio
import filecmp
import subprocess
import threading
import time
import urllib.request

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from serving import Code, mock_llm, start

from xlaserve import SamplingParams
from xlaserve.runtime.mock_engine import OTHER_LOGPROB
from xlaserve.serve.client import AsyncClient, Client
from xlaserve.serve.proto import generate as proto_gen
from xlaserve.serve.proto.xlaserve.v1 import xlaserve_pb2 as pb
from xlaserve.serve.server import Server


@pytest.fixture(scope="module")
def served():
    server, client = start(mock_llm(step_s=0.002))
    yield server, client
    client.close()
    server.stop()


def test_stream_equals_python_api(served):
    _, client = served
    out = client.generate("w5 w6 w7", max_tokens=6, temperature=0.0, logprobs=1)
    assert out.token_ids == [8, 9, 10, 11, 12, 13] and out.text == "w8 w9 w10 w11 w12 w13"
    assert (
        out.finish_reason == "length"
        and out.usage["prompt_tokens"] == 3
        and out.usage["completion_tokens"] == 6
    )
    assert [lp.top[0].token for lp in out.logprobs] == ["w8", "w9", "w10", "w11", "w12", "w13"]
    same = mock_llm().generate("w5 w6 w7", SamplingParams(max_tokens=6, temperature=0.0))[0]
    assert (same.text, same.token_ids) == (out.text, out.token_ids)
    eos = client.generate("w509", max_tokens=10)
    assert eos.token_ids == [510, 511, 0] and eos.finish_reason == "eos" and eos.stop_reason == 0
    stop = client.generate("w5", max_tokens=10, stop=["w9"])
    assert stop.text == "w6 w7 w8 " and stop.finish_reason == "stop" and stop.stop_reason == "w9"
    chat = client.generate(messages=[{"role": "user", "content": "w40"}], max_tokens=2)
    assert chat.token_ids == [4, 5]  # the template ends with w3


def test_rpcs_besides_generate(served):
    _, client = served
    assert client.tokenize("w1 w2 w300") == [1, 2, 300]
    assert client.detokenize([4, 5, 6]) == "w4 w5 w6"
    info = client.model_info()
    assert (
        info.vocab_size == 512
        and info.context_length == 256
        and info.max_slots == 4
        and info.has_chat_template
    )
    scores = client.score([("w1 w2", "w3 w4 w9"), ([7, 8, 10], 1)])
    assert list(scores[0].token_ids) == [3, 4, 9] and list(scores[0].is_greedy) == [True, True, False]
    assert list(scores[0].logprobs) == [0.0, 0.0, -10.0] and scores[0].sum_logprob == -10.0
    assert list(scores[1].is_greedy) == [True, False] and not scores[1].all_greedy
    stats = client.stats()
    assert stats.slots_total == 4 and stats.requests_finished["scored"] >= 2


def wait_idle(client, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        s = client.stats()
        if s.slots_busy == 0 and s.queue_length == 0 and s.pages_used == 0:
            return s
        time.sleep(0.02)
    raise AssertionError(f"server not idle: {client.stats()}")


BAD = [
    (pb.GenerateRequest(), Code.INVALID_ARGUMENT, "input is required"),
    (pb.GenerateRequest(text=""), Code.INVALID_ARGUMENT, "prompt is empty"),
    (pb.GenerateRequest(tokens=pb.TokenIds()), Code.INVALID_ARGUMENT, "tokens.ids is empty"),
    (
        pb.GenerateRequest(tokens=pb.TokenIds(ids=[1, 10**6])),
        Code.INVALID_ARGUMENT,
        "prompt token id 1000000 is out of range",
    ),
    (
        pb.GenerateRequest(tokens=pb.TokenIds(ids=[-4])),
        Code.INVALID_ARGUMENT,
        "prompt token id -4 is out of range",
    ),
    (pb.GenerateRequest(chat=pb.Chat()), Code.INVALID_ARGUMENT, "messages must be a non-empty list"),
    (
        pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(content="w1")])),
        Code.INVALID_ARGUMENT,
        "messages[0].role must be non-empty",
    ),
    (
        pb.GenerateRequest(text="w1", sampling=pb.SamplingParams(temperature=-1)),
        Code.INVALID_ARGUMENT,
        "sampling.temperature=-1.0 must be a number in [0.0, 100.0]",
    ),
    (
        pb.GenerateRequest(text="w1", sampling=pb.SamplingParams(temperature=float("nan"))),
        Code.INVALID_ARGUMENT,
        "sampling.temperature=nan",
    ),
    (
        pb.GenerateRequest(text="w1", sampling=pb.SamplingParams(top_p=0)),
        Code.INVALID_ARGUMENT,
        "sampling.top_p=0.0",
    ),
    (
        pb.GenerateRequest(text="w1", sampling=pb.SamplingParams(top_p=1.5)),
        Code.INVALID_ARGUMENT,
        "sampling.top_p=1.5",
    ),
    (
        pb.GenerateRequest(text="w1", sampling=pb.SamplingParams(top_k=-5)),
        Code.INVALID_ARGUMENT,
        "sampling.top_k=-5",
    ),
    (
        pb.GenerateRequest(text="w1", sampling=pb.SamplingParams(min_p=2)),
        Code.INVALID_ARGUMENT,
        "sampling.min_p=2.0",
    ),
    (
        pb.GenerateRequest(text="w1", sampling=pb.SamplingParams(repetition_penalty=0)),
        Code.INVALID_ARGUMENT,
        "sampling.repetition_penalty=0.0",
    ),
    (
        pb.GenerateRequest(text="w1", sampling=pb.SamplingParams(max_tokens=0)),
        Code.INVALID_ARGUMENT,
        "sampling.max_tokens=0",
    ),
    (
        pb.GenerateRequest(text="w1", sampling=pb.SamplingParams(max_tokens=10**6)),
        Code.INVALID_ARGUMENT,
        "max_tokens=1000000 exceeds the limit of 255",
    ),
    (
        pb.GenerateRequest(text="w1", sampling=pb.SamplingParams(logprobs=500)),
        Code.INVALID_ARGUMENT,
        "sampling.logprobs=500",
    ),
    (
        pb.GenerateRequest(text="w1", sampling=pb.SamplingParams(logprobs=50)),
        Code.INVALID_ARGUMENT,
        "logprobs=50 exceeds max_logprobs=20",
    ),
    (
        pb.GenerateRequest(text="w1", sampling=pb.SamplingParams(stop=[""])),
        Code.INVALID_ARGUMENT,
        "stop must be",
    ),
    (
        pb.GenerateRequest(text="w1", sampling=pb.SamplingParams(stop_token_ids=[9999])),
        Code.INVALID_ARGUMENT,
        "stop_token_ids contains 9999",
    ),
    (
        pb.GenerateRequest(tokens=pb.TokenIds(ids=[5] * 300)),
        Code.INVALID_ARGUMENT,
        "prompt has 300 tokens; the limit is 255",
    ),
    (
        pb.GenerateRequest(tokens=pb.TokenIds(ids=[5] * 200), sampling=pb.SamplingParams(max_tokens=100)),
        Code.INVALID_ARGUMENT,
        "prompt (200 tokens) + max_tokens (100) = 300 exceeds the context of 256 tokens",
    ),
    (pb.GenerateRequest(model="gpt-9", text="w1"), Code.NOT_FOUND, "model 'gpt-9' is not served here"),
    (pb.GenerateRequest(text="w1 " * (9 << 20)), Code.RESOURCE_EXHAUSTED, "larger than max"),
    (pb.ScoreRequest(), Code.INVALID_ARGUMENT, "items is empty"),
    (
        pb.ScoreRequest(items=[pb.ScoreItem(tokens=pb.TokenIds(ids=[1, 2]), start=0)]),
        Code.INVALID_ARGUMENT,
        "items[0]: start=0 must be an integer in [1, 1]",
    ),
    (
        pb.ScoreRequest(items=[pb.ScoreItem(pair=pb.ContextContinuation(context="w1"))]),
        Code.INVALID_ARGUMENT,
        "items[0].pair.continuation is empty",
    ),
    (pb.ScoreRequest(items=[pb.ScoreItem()]), Code.INVALID_ARGUMENT, "items[0].input is required"),
    (
        pb.ScoreRequest(model="other", items=[pb.ScoreItem(tokens=pb.TokenIds(ids=[1, 2]), start=1)]),
        Code.NOT_FOUND,
        "model 'other'",
    ),
    (pb.DetokenizeRequest(token_ids=[1, 777]), Code.INVALID_ARGUMENT, "token_ids contains 777"),
    (pb.GenerateRequest(text="w1", n=-1), Code.INVALID_ARGUMENT, "n=-1 must be in [1, 12]"),
    (pb.GenerateRequest(text="w1", n=13), Code.INVALID_ARGUMENT, "n=13 must be in [1, 12]"),
]


@pytest.mark.parametrize("request_msg, code, message", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_input_gets_its_status_and_the_server_keeps_serving(served, request_msg, code, message):
    _, client = served
    call = {
        pb.GenerateRequest: lambda m: list(client.stub.Generate(m)),
        pb.ScoreRequest: client.stub.Score,
        pb.DetokenizeRequest: client.stub.Detokenize,
    }[type(request_msg)]
    with pytest.raises(grpc.RpcError) as info:
        call(request_msg)
    assert info.value.code() == code, info.value.details()
    assert message in info.value.details()
    assert client.generate("w20", max_tokens=3).token_ids == [21, 22, 23]


def test_n_samples_stream_interleaved_each_with_its_index(served):
    _, client = served
    msgs = list(client.generate_stream("w5 w6", n=3, max_tokens=4, temperature=0.0, request_id="many"))
    assert {m.index for m in msgs} == {0, 1, 2}
    finals = [m for m in msgs if m.HasField("final")]
    assert [m.index for m in finals] == [0, 1, 2] and all(m.request_id == "many" for m in finals)
    assert msgs[-3:] == finals  # every final after every delta
    outs = client.generate_n("w5 w6", n=3, max_tokens=4, temperature=0.0)
    for out in outs:
        assert out.token_ids == [7, 8, 9, 10] and out.finish_reason == "length"
        assert out.usage["prompt_tokens"] == 2 and out.request_id
    assert len({out.request_id for out in outs}) == 1
    wait_idle(client)


def test_n_samples_are_admitted_together_and_cancelled_together():
    server, client = start(mock_llm(step_s=0.02, max_slots=2, max_queue=1))
    try:
        with pytest.raises(grpc.RpcError) as info:  # 4 > 2 slots + 1 queued
            client.generate_n("w1", n=4, max_tokens=2)
        assert info.value.code() == Code.INVALID_ARGUMENT and "n=4 must be in [1, 3]" in info.value.details()
        stream = client.generate_stream("w1", n=3, max_tokens=200)
        next(stream)
        stream.cancel()
        stats = wait_idle(client)
        assert stats.requests_finished["cancelled"] == 3
        assert [o.token_ids for o in client.generate_n("w1", n=2, max_tokens=2)] == [[2, 3], [2, 3]]
    finally:
        client.close()
        server.stop()


def test_duplicate_request_id_is_refused(served):
    _, client = served
    first = client.generate_stream("w1", max_tokens=200, request_id="dup")
    next(first)
    with pytest.raises(grpc.RpcError) as info:
        client.generate("w1", max_tokens=2, request_id="dup")
    assert info.value.code() == Code.INVALID_ARGUMENT and "already running" in info.value.details()
    first.cancel()
    wait_idle(client)


def test_overload_is_resource_exhausted_then_recovers():
    server, client = start(mock_llm(step_s=0.02, max_per_client=3))
    try:
        streams = [client.generate_stream(f"w{i}", max_tokens=250) for i in range(4)]  # fill the 4 slots
        for s in streams:
            next(s)
        streams += [client.generate_stream(f"w{i}", max_tokens=250) for i in range(8)]  # and the queue
        while client.stats().queue_length < 8:
            time.sleep(0.01)
        with pytest.raises(grpc.RpcError) as info:
            client.generate("w1", max_tokens=2)
        assert info.value.code() == Code.RESOURCE_EXHAUSTED and "queue is full" in info.value.details()
        for s in streams:
            s.cancel()
        wait_idle(client)
        assert client.generate("w30", max_tokens=2).token_ids == [31, 32]
        tagged = Client(f"127.0.0.1:{server.port}", client_id="team-a")
        mine = [tagged.generate_stream("w1", max_tokens=250) for _ in range(3)]
        for s in mine:
            next(s)
        with pytest.raises(grpc.RpcError) as info:
            tagged.generate("w1", max_tokens=2)
        assert (
            info.value.code() == Code.RESOURCE_EXHAUSTED
            and "client 'team-a' already has 3" in info.value.details()
        )
        assert client.generate("w40", max_tokens=1).token_ids == [41]  # others are unaffected
        for s in mine:
            s.cancel()
        tagged.close()
        wait_idle(client)
    finally:
        client.close()
        server.stop()


def test_cancelled_streams_give_back_every_slot_and_page():
    server, client = start(mock_llm(step_s=0.01, max_queue=32))
    try:
        streams = [client.generate_stream(f"w{i}", max_tokens=250) for i in range(20)]
        got = [next(streams[i]) for i in range(4)]  # the first four are decoding
        assert all(g.HasField("delta") for g in got)
        for s in streams:
            s.cancel()
        stats = wait_idle(client)
        assert stats.pages_used == 0 and stats.pages_free + stats.pages_cached == stats.pages_total
        assert stats.requests_finished["cancelled"] >= 4
    finally:
        client.close()
        server.stop()


def test_deadline_while_queued_and_while_decoding():
    server, client = start(mock_llm(step_s=0.02))
    try:
        blockers = [client.generate_stream(f"w{i}", max_tokens=250) for i in range(4)]
        for s in blockers:
            next(s)
        with pytest.raises(grpc.RpcError) as info:  # queued behind four long streams
            client.generate("w1", max_tokens=5, timeout=0.3)
        assert info.value.code() == Code.DEADLINE_EXCEEDED
        for s in blockers:
            s.cancel()
        wait_idle(client)
        received = []
        with pytest.raises(grpc.RpcError) as info:
            for msg in client.generate_stream("w1", max_tokens=250, timeout=0.5):
                received.append(msg)
        assert info.value.code() == Code.DEADLINE_EXCEEDED and 0 < len(received) < 250
        stats = wait_idle(client)
        assert stats.requests_finished["deadline"] == 2
    finally:
        client.close()
        server.stop()


def test_health_across_start_and_drain():
    server = Server(port=0).start()
    client = Client(f"127.0.0.1:{server.port}")
    try:
        assert client.health() == "NOT_SERVING" and client.health("xlaserve.v1.Generation") == "NOT_SERVING"
        with pytest.raises(grpc.RpcError) as info:
            client.generate("w1", max_tokens=1)
        assert info.value.code() == Code.UNAVAILABLE and "loading" in info.value.details()
        server.attach(mock_llm(step_s=0.02))
        assert client.health() == "SERVING"
        running = client.generate_stream("w1", max_tokens=40)
        next(running)
        result = {}
        drainer = threading.Thread(target=lambda: result.setdefault("done", server.drain(grace_s=10)))
        drainer.start()
        end = time.time() + 10
        while client.health() != "NOT_SERVING" and time.time() < end:
            time.sleep(0.01)
        assert client.health() == "NOT_SERVING"
        with pytest.raises(grpc.RpcError) as info:
            client.generate("w1", max_tokens=1)
        assert info.value.code() == Code.UNAVAILABLE and "draining" in info.value.details()
        rest = list(running)  # the stream in flight completes
        assert rest[-1].final.finish_reason == pb.FINISH_REASON_LENGTH
        drainer.join(10)
        assert result["done"] is True
    finally:
        client.close()
        server.stop()


def test_reflection_lists_the_services(served):
    _, client = served
    stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for r in replies for s in r.list_services_response.service}
    assert {"xlaserve.v1.Generation", "grpc.health.v1.Health"} <= names


def test_api_keys():
    server, client = start(mock_llm(), api_keys=("s3cret", "other"))
    target = f"127.0.0.1:{server.port}"
    try:
        assert client.generate("w1", max_tokens=1).token_ids == [2]
        for key, expected in [(None, "missing API key"), ("wrong", "invalid API key")]:
            with Client(target, api_key=key) as c:
                with pytest.raises(grpc.RpcError) as info:
                    c.generate("w1", max_tokens=1)
                assert info.value.code() == Code.UNAUTHENTICATED and expected in info.value.details()
                with pytest.raises(grpc.RpcError) as info:
                    c.model_info()
                assert info.value.code() == Code.UNAUTHENTICATED
                assert c.health() == "SERVING"  # probes need no key
    finally:
        client.close()
        server.stop()


def test_tls(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    server = Server(port=0, tls=(key.read_bytes(), cert.read_bytes())).start()
    server.attach(mock_llm())
    try:
        with Client(f"localhost:{server.port}", root_certificates=cert.read_bytes()) as c:
            assert c.generate("w1", max_tokens=2).token_ids == [2, 3]
        with Client(f"localhost:{server.port}") as plain:
            with pytest.raises(grpc.RpcError) as info:
                plain.generate("w1", max_tokens=1, timeout=5)
            assert info.value.code() == Code.UNAVAILABLE
    finally:
        server.stop()


def test_metrics_exposition(served):
    server, client = served
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server.metrics.serve(port, "127.0.0.1")
    client.generate("w1", max_tokens=4)
    with pytest.raises(grpc.RpcError):
        client.generate("", max_tokens=1)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    for name in (
        "xlaserve_time_to_first_token_seconds_bucket",
        "xlaserve_inter_token_latency_seconds_count",
        "xlaserve_request_latency_seconds_sum",
        "xlaserve_queue_time_seconds_count",
        "xlaserve_prompt_tokens_total",
        "xlaserve_generation_tokens_total",
        'outcome="length"',
        'outcome="invalid_argument"',
        "xlaserve_slots_busy",
        "xlaserve_kv_pages_used",
        "xlaserve_kv_pages_free",
        "xlaserve_prefix_cache_hit_rate",
        "xlaserve_preemptions_total",
        "xlaserve_mixed_steps_total",
    ):
        assert name in text, name


def test_async_client(served):
    server, _ = served

    async def run():
        async with AsyncClient(f"127.0.0.1:{server.port}") as c:
            outs = await asyncio.gather(*(c.generate(f"w{10 * i}", max_tokens=3) for i in range(1, 6)))
            info = await c.model_info()
            return [o.token_ids for o in outs], info.vocab_size, await c.health()

    ids, vocab, health = asyncio.run(run())
    assert (
        ids == [[10 * i + 1, 10 * i + 2, 10 * i + 3] for i in range(1, 6)]
        and vocab == 512
        and health == "SERVING"
    )


def test_generated_proto_code_is_fresh(tmp_path):
    fresh = proto_gen.generate(tmp_path)
    committed = proto_gen.ROOT / "xlaserve" / "v1"
    for f in fresh:
        assert filecmp.cmp(f, committed / f.name, shallow=False), (
            f"{f.name} is stale: run `python -m xlaserve.serve.proto.generate`"
        )


def test_scoring_chunks_share_device_calls():
    """Scoring requests admitted together are scored in batched calls (rows of one program), in
    plan order, and each still gets its own log-probs."""
    llm = mock_llm(max_queue=64)
    calls, batch = [], llm.engine.score_batch
    llm.engine.score_batch = lambda items: calls.append(len(items)) or batch(items)
    items = [(f"w{i} w{i + 1} w{i + 2}", f" w{i + 3} w{i + 4}") for i in range(10, 20)]
    items += [("w30 w31", " w40")]  # not the model's continuation
    results = llm.score(items)
    assert [r.all_greedy for r in results] == [True] * 10 + [False]
    assert results[-1].logprobs == [OTHER_LOGPROB]
    assert sum(calls) == len(items) and max(calls) == 4 and len(calls) < len(items)


def test_final_timings_carry_the_queue_time(served):
    """Final.timings.queue_s is arrival to first scheduled (it was always 0.0), the same interval the
    Prometheus queue-time histogram records; it is part of the time to first token."""
    _, client = served
    out = client.generate("w5", max_tokens=3)
    assert 0.0 < out.timings["queue_s"] <= out.timings["ttft_s"] <= out.timings["total_s"]
