"""`xlaserve bench serve` against real servers on loopback (gRPC and the OpenAI HTTP API) over the
mock engine: every request is counted, tokens arrive as the engine made them, results are written.
The HTTP server's mock speaks SmolLM2's tokenizer, so JSON schemas compile (llguidance needs a
real byte-level vocabulary)."""

from __future__ import annotations

import asyncio
import json

import pytest
from serving import ENGINE, mock_llm, start, start_http

from xlaserve import LLM
from xlaserve.bench import serve, serve_load
from xlaserve.checkpoints import registry
from xlaserve.checkpoints.gguf import open_reader, read_metadata
from xlaserve.checkpoints.tokenizer import tokenizer_from_gguf
from xlaserve.runtime.mock_engine import MockEngine


@pytest.fixture(scope="module")
def targets():
    grpc_server, client = start(mock_llm(step_s=0.002))
    path = registry.resolve(registry.DEFAULT_MODEL, log=lambda m: None)
    tokenizer = tokenizer_from_gguf(read_metadata(open_reader(path)), path)
    engine = MockEngine(ENGINE, vocab=tokenizer.vocab_size, step_s=0.002)
    http, _ = start_http(LLM.from_engine(engine, tokenizer, source="mock"))
    yield {"grpc": f"127.0.0.1:{grpc_server.port}", "http": f"127.0.0.1:{http.port}"}
    client.close()
    grpc_server.stop()
    http.stop()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("load", [dict(concurrency=3, rate=None), dict(concurrency=None, rate=200.0)])
def test_every_request_and_token_is_counted(targets, protocol, load):
    texts = [f"w{i} w{i + 1}" for i in range(1, 7)]
    row = asyncio.run(
        serve_load.run_config(targets[protocol], texts, 5, seed=0, api_key=None, protocol=protocol, **load)
    )
    assert row["status"] == {"OK": 6} and row["requests"] == 6
    assert row["output_tok_s"] * row["wall_s"] == pytest.approx(30)  # 6 requests x 5 tokens
    for key in ("ttft_s", "itl_s", "e2e_s"):
        assert 0 < row[key]["p50"] <= row[key]["p99"] < 30, key
    assert row["protocol"] == protocol and not row["json_schema"]


def test_refusals_are_counted_by_status(targets):
    for protocol, status in (("grpc", "INVALID_ARGUMENT"), ("http", "400")):
        row = asyncio.run(
            serve_load.run_config(
                targets[protocol],
                ["w1"],
                10_000,
                rate=None,
                concurrency=1,
                seed=0,
                api_key=None,
                protocol=protocol,
            )
        )  # max_tokens past the model's context
        assert row["status"] == {status: 1}, row


def test_the_command_writes_its_result_with_the_schema_overhead(targets, tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "string"}))
    result = serve.main(
        [
            "--server",
            targets["http"],
            "--protocol",
            "http",
            "--concurrency",
            "2",
            "--num-requests",
            "4",
            "--max-tokens",
            "4",
            "--structured",
            "both",
            "--repeats",
            "2",
            "--json-schema",
            str(schema),
            "--out",
            str(tmp_path),
        ]
    )
    assert [(r["repeat"], r["json_schema"]) for r in result["rows"]] == [
        (0, False),
        (0, True),
        (1, False),
        (1, True),
    ]
    assert result["rows"][0]["status"] == {"OK": 4}
    (overhead,) = result["schema_overhead"]
    assert overhead["concurrency"] == 2 and overhead["itl_p50_ratio"] > 0 and overhead["repeats"] == 2
    written = json.loads(next(tmp_path.glob("*-serve-*.json")).read_text())
    assert (
        written["command"].startswith("xlaserve bench serve --server")
        and "--structured both" in written["command"]
    )
    assert "with / without schema" in next(tmp_path.glob("*-serve-*.md")).read_text()


def test_the_peer_comparison_pairs_rows_by_load():
    def row(server, concurrency, tok_s, ttft):
        pct = {"p50": ttft, "p90": ttft, "p99": ttft}
        return dict(
            server=server,
            rate_rps=None,
            concurrency=concurrency,
            output_tok_s=tok_s,
            ttft_s=pct,
            itl_s=pct,
            e2e_s=pct,
            requests_per_s=1.0,
            status={"OK": 1},
            json_schema=False,
        )

    rows = [row("xlaserve", 1, 30.0, 0.1), row("xlaserve", 8, 90.0, 0.5)]
    rows += [row("llama.cpp", 1, 60.0, 0.05), row("llama.cpp", 8, 180.0, 0.25)]
    ratios = serve.peer_ratios(rows)
    assert [(c["concurrency"], c["output_tok_s_ratio"]) for c in ratios] == [(1, 0.5), (8, 0.5)]
    assert ratios[1]["ttft_p50_s"] == {"xlaserve": 0.5, "llama.cpp": 0.25}
    assert "| 8 concurrent | 0.500 | 500 / 250 |" in serve.table(rows)
    mixed = [row(serve.MIXED, 8, 108.0, 0.4)]
    assert [c["output_tok_s_ratio"] for c in serve.peer_ratios(rows + mixed, serve.MIXED, "xlaserve")] == [
        1.2
    ]
    assert "| 8 concurrent | 1.200 | 400 / 500 |" in serve.table(rows + mixed)


def sweep_args(**fields):
    """The arguments `serve._sweep` reads, with these changed."""
    import argparse

    base = dict(rates=None, concurrency="2", repeats=2, max_tokens=3, seed=0, num_requests=2)
    return argparse.Namespace(
        **{**base, "api_key": None, "protocol": "grpc", "fresh_prompts": False, **fields}
    )


def test_fresh_prompts_differ_per_load_and_repeat_and_match_across_servers(monkeypatch):
    sent = []

    async def record(target, texts, *a, **kw):
        sent.append(texts)
        return {"output_tokens": 0}

    monkeypatch.setattr(serve, "run_config", record)
    for fresh in (True, False):
        sent.clear()
        args = sweep_args(rates="2", concurrency="4", seed=5, num_requests=3, fresh_prompts=fresh)
        rows = serve._sweep(args, {"a": "x", "b": "y"}, [None])
        assert len(rows) == len(sent) == 8 and all(len(t) == 3 for t in sent)  # 2 loads x 2 repeats x 2
        pairs = [tuple(map(tuple, sent[i : i + 2])) for i in range(0, 8, 2)]  # a and b, one repeat
        assert all(a == b for a, b in pairs)
        assert len({a for a, _ in pairs}) == (4 if fresh else 1)
        assert len({r["prompt_seed"] for r in rows}) == (4 if fresh else 1)


def test_servers_alternate_per_repeat_and_mixed_batch_needs_our_own_server(targets):
    args = sweep_args()
    rows = serve._sweep(args, {"a": targets["grpc"], "b": targets["grpc"]}, [None])
    assert [(r["server"], r["repeat"]) for r in rows] == [("a", 0), ("b", 0), ("a", 1), ("b", 1)]
    for argv in (
        ["--server", targets["grpc"], "--mixed-batch", "on"],
        ["--compare", "llamacpp", "--mixed-batch", "both"],
    ):
        with pytest.raises(SystemExit, match="--mixed-batch sets up the server this command starts"):
            serve.main(argv)
