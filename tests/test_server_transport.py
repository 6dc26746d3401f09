"""The server's hardening (issue 20) over real gRPC on loopback and the mock engine (token i is
followed by i + 1): identity and per-client limits, request ids, request-id size, Score's item
limit, metrics of every outcome, malformed requests, and the status of a stream cut at shutdown."""

from __future__ import annotations

import logging
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2
from serving import Code, mock_llm, start

from xlaserve.cli import build_parser
from xlaserve.serve.client import Client
from xlaserve.serve.limits import MAX_SCORE_ITEMS
from xlaserve.serve.proto.xlaserve.v1 import xlaserve_pb2 as pb
from xlaserve.serve.server import Server

LONG = 250  # max_tokens of a stream that outlives the test's checks


def first_or_error(stream):
    """The stream's first message, or its status code when it is refused."""
    try:
        return next(stream)
    except grpc.RpcError as e:
        return e.code()


def sample(server, name, **labels) -> float:
    return server.metrics.registry.get_sample_value(name, labels) or 0.0


def eventually(check, timeout=5.0):
    end = time.time() + timeout
    while not check():
        assert time.time() < end, "condition not met in time"
        time.sleep(0.01)


def test_with_api_keys_the_key_is_the_client_not_x_client_id():
    """Defect 3: six x-client-ids on one key got 6 streams past --max-per-client 2, and a tenant
    naming another's id spent that tenant's share."""
    server, _ = start(mock_llm(step_s=0.01, max_per_client=2, max_queue=32), api_keys=("k1", "k2"))
    target = f"127.0.0.1:{server.port}"
    clients = [Client(target, api_key="k1", client_id=f"id-{i}") for i in range(6)]
    other = Client(target, api_key="k2", client_id="id-0")  # claims k1's first id
    try:
        streams = [c.generate_stream("w1", max_tokens=LONG) for c in clients]
        got = [first_or_error(s) for s in streams]
        assert sum(isinstance(g, pb.GenerateResponse) for g in got) == 2
        assert got.count(Code.RESOURCE_EXHAUSTED) == 4
        with pytest.raises(grpc.RpcError) as info:
            clients[0].generate("w1", max_tokens=1)
        assert "already has 2 requests in flight; the limit is 2" in info.value.details()
        mine = [other.generate_stream("w5", max_tokens=LONG) for _ in range(2)]
        assert all(isinstance(first_or_error(s), pb.GenerateResponse) for s in mine)
        for s in streams + mine:
            s.cancel()
    finally:
        for c in [*clients, other]:
            c.close()
        server.stop()


@pytest.fixture(scope="module")
def served():
    server, client = start(mock_llm(step_s=0.005, max_queue=32))
    yield server, client
    client.close()
    server.stop()


def test_request_ids_never_collide_across_clients(served):
    """Defect 4: server ids were `req-N`, in the namespace clients choose from, so a client that
    pre-claimed `req-{N+1..}` made other clients' requests fail "already running"."""
    server, client = served
    a = client.generate("w1", max_tokens=1).request_id
    b = client.generate("w1", max_tokens=1).request_id
    assert len(a) == len(b) == 32 and int(a, 16) != int(b, 16) and not a.startswith("req-")
    with Client(f"127.0.0.1:{server.port}") as squatter:
        held = [squatter.generate_stream("w1", max_tokens=LONG, request_id=rid) for rid in ("x", a, "req-9")]
        for s in held:
            next(s)
        for rid in ("x", a, "req-9"):  # another client's ids are not this client's business
            out = client.generate("w7", max_tokens=2, request_id=rid)
            assert out.token_ids == [8, 9] and out.request_id == rid
        with pytest.raises(grpc.RpcError) as info:  # a client's own id in use is still refused
            squatter.generate("w1", max_tokens=1, request_id="x")
        assert info.value.code() == Code.INVALID_ARGUMENT
        assert info.value.details() == "request_id 'x' is already running"
        for s in held:
            s.cancel()


def test_request_id_is_bounded_and_echoed_first_and_last(served):
    """Defect 5: a 1 MiB request_id was accepted and echoed in every message (68 MB for 64 tokens)."""
    _, client = served
    for rid, message in [
        ("x" * (1 << 20), "request_id has 1048576 characters; the limit is 128"),
        ("x" * 129, "request_id has 129 characters; the limit is 128"),
        ("tab\there", "request_id must be printable ASCII"),
        ("é", "request_id must be printable ASCII"),
    ]:
        with pytest.raises(grpc.RpcError) as info:
            client.generate("w1", max_tokens=1, request_id=rid)
        assert info.value.code() == Code.INVALID_ARGUMENT and message in info.value.details()
    rid = "r" * 128
    msgs = list(client.generate_stream("w1", max_tokens=5, request_id=rid))
    assert [m.request_id for m in msgs] == [rid, "", "", "", "", rid]
    assert [t for m in msgs[:-1] for t in m.delta.token_ids] == [2, 3, 4, 5, 6]


def test_score_has_an_item_limit():
    """Defect 8 (the server's part): Score took any number of items (2000 ran 110 s)."""
    server, client = start(mock_llm(max_queue=1024))
    try:
        items = [([1, 2, 3], 1)] * (MAX_SCORE_ITEMS + 1)
        with pytest.raises(grpc.RpcError) as info:
            client.score(items)
        assert info.value.code() == Code.INVALID_ARGUMENT
        assert (
            info.value.details() == f"items has {MAX_SCORE_ITEMS + 1} entries; the limit is {MAX_SCORE_ITEMS}"
        )
        assert len(client.score(items[:3])) == 3
    finally:
        client.close()
        server.stop()


def test_metrics_count_every_outcome_and_every_refusal():
    """Defect 11: cancelled and deadline requests were missing from xlaserve_requests and their
    tokens from the token counter; transport refusals were not counted at all."""
    server, client = start(mock_llm(step_s=0.01), api_keys=("k",), max_message_bytes=1 << 16)
    target = f"127.0.0.1:{server.port}"
    try:
        before = sample(server, "xlaserve_generation_tokens_total")
        stream = client.generate_stream("w1", max_tokens=LONG)
        got = [next(stream) for _ in range(3)]
        stream.cancel()
        with pytest.raises(grpc.RpcError):
            list(client.generate_stream("w1", max_tokens=LONG, timeout=0.3))
        eventually(lambda: sample(server, "xlaserve_requests_total", outcome="deadline") == 1)
        eventually(lambda: sample(server, "xlaserve_requests_total", outcome="cancelled") == 1)
        assert sample(server, "xlaserve_generation_tokens_total") - before >= len(got) + 1
        with Client(target) as anonymous, pytest.raises(grpc.RpcError):
            anonymous.generate("w1", max_tokens=1)
        with pytest.raises(grpc.RpcError) as info:
            client.generate("w1 " * (1 << 15), max_tokens=1)
        assert info.value.code() == Code.RESOURCE_EXHAUSTED
        raw = client.channel.unary_unary(
            "/xlaserve.v1.Generation/Tokenize", request_serializer=bytes, response_deserializer=bytes
        )
        with pytest.raises(grpc.RpcError):
            raw(b"\xff\xff\xff", metadata=client.metadata)
        eventually(lambda: sample(server, "xlaserve_rejected_total", reason="message_too_large") == 1)
        for reason in ("unauthenticated", "malformed"):
            assert sample(server, "xlaserve_rejected_total", reason=reason) == 1, reason
    finally:
        client.close()
        server.stop()


def test_health_watch_streams_have_their_own_cap():
    """Watch, like reflection, is open without a key: its streams count against --max-open-streams
    (the load test holds 300 reflection streams against it)."""
    server, client = start(mock_llm(), max_open_streams=1)
    request = health_pb2.HealthCheckRequest(service="")
    try:
        watch = client.health_stub.Watch(request)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:
            next(client.health_stub.Watch(request))
        assert info.value.code() == Code.RESOURCE_EXHAUSTED
        assert "the limit is 1 (--max-open-streams)" in info.value.details()
        assert client.health() == "SERVING" and client.generate("w1", max_tokens=1).token_ids == [2]
        watch.cancel()
        eventually(lambda: server.guard.open_streams == 0)
        assert sample(server, "xlaserve_rejected_total", reason="open_stream_limit") == 1
    finally:
        client.close()
        server.stop()


# Text field 3 of GenerateRequest (and 1 of TokenizeRequest) holding the byte 0xff; and bytes that
# are no protobuf at all.
BAD_UTF8 = {"Generate": b"\x1a\x01\xff", "Tokenize": b"\x0a\x01\xff"}


@pytest.mark.parametrize("method", ["Generate", "Tokenize"])
def test_malformed_request_is_invalid_argument_with_one_log_line(served, method, caplog):
    """Defect 13: invalid UTF-8 or a corrupt protobuf got INTERNAL "Exception deserializing
    request!" and a traceback in the log per request."""
    _, client = served
    path = f"/xlaserve.v1.Generation/{method}"
    call = (client.channel.unary_stream if method == "Generate" else client.channel.unary_unary)(
        path, request_serializer=bytes, response_deserializer=bytes
    )
    for payload, problem in [(BAD_UTF8[method], "bad UTF-8"), (b"\xff\xff\xff", "corrupt")]:
        caplog.clear()
        with caplog.at_level(logging.WARNING), pytest.raises(grpc.RpcError) as info:
            out = call(payload)
            list(out) if method == "Generate" else out
        assert info.value.code() == Code.INVALID_ARGUMENT, info.value.details()
        assert info.value.details().startswith("malformed request:") and problem in info.value.details()
        records = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(records) == 1 and records[0].exc_info is None and "malformed" in records[0].message
    assert client.generate("w20", max_tokens=2).token_ids == [21, 22]


def test_minor_defects(served):
    """Defect 15 (the server's part): Tokenize with no input answered OK; NOT_FOUND listed a model
    name twice."""
    server, client = served
    with pytest.raises(grpc.RpcError) as info:
        client.stub.Tokenize(pb.TokenizeRequest())
    assert info.value.code() == Code.INVALID_ARGUMENT and "input is required" in info.value.details()
    assert client.tokenize("") == []  # an empty text is an input
    names = server.service.model_names
    server.service.model_names = ("smollm2", "smollm2", "SmolLM2-135M")
    try:
        with pytest.raises(grpc.RpcError) as info:
            client.generate("w1", model="gpt-9", max_tokens=1)
        assert info.value.details().endswith("(serving: smollm2, SmolLM2-135M)")
    finally:
        server.service.model_names = names


@pytest.mark.parametrize("how", ["stop", "drain"])
def test_a_stream_cut_at_shutdown_is_unavailable(how):
    """Defect 15: a stream the server cut at shutdown (or at the end of a drain's grace period) ended
    CANCELLED, the code of a client's own cancel."""
    server, client = start(mock_llm(step_s=0.01))
    try:
        stream = client.generate_stream("w1", max_tokens=LONG)
        received = [next(stream)]
        if how == "stop":
            server.stop()
        else:
            assert server.drain(grace_s=0.2) is False
        with pytest.raises(grpc.RpcError) as info:
            for msg in stream:
                received.append(msg)
        assert info.value.code() == Code.UNAVAILABLE, info.value.details()
        assert "shutting down" in info.value.details(), info.value.details()
        assert received[-1].final.finish_reason == pb.FINISH_REASON_CANCELLED
    finally:
        client.close()
        server.stop()


def test_metrics_endpoint_binds_separately_and_says_it_has_no_auth():
    serve = build_parser("serve")._subparsers._group_actions[0].choices["serve"]
    args = serve.parse_args(["--host", "0.0.0.0", "--metrics-port", "9090", "--metrics-host", "127.0.0.1"])
    assert (args.host, args.metrics_host) == ("0.0.0.0", "127.0.0.1")
    assert "no authentication" in serve.format_help()
    assert serve.parse_args(["--max-workers", "3"]).worker_threads == 3  # the old name still works


def test_server_without_model_refuses_and_stops_cleanly():
    server = Server(port=0).start()
    with Client(f"127.0.0.1:{server.port}") as c:
        with pytest.raises(grpc.RpcError) as info:
            c.tokenize("w1")
        assert info.value.code() == Code.UNAVAILABLE
    server.stop()
    server.stop()  # twice is fine
