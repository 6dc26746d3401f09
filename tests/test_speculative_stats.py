"""Speculative decoding's acceptance figures on a tiny random Llama: each request's guesses made and
kept (`RequestOutput.speculative`, the gRPC final message, `generate --output json`) add up to the
runner's totals, which `EngineStats`, `ServerStats` and a real /metrics scrape report, with the
histogram of tokens emitted per verify step; all are > 0 for a prompt that repeats itself."""

from __future__ import annotations

import json
import socket
import time
import urllib.request

import jax
import numpy as np
import pytest
from serving import mock_llm, mock_tokenizer, start

from xlaserve import LLM
from xlaserve.runtime import models
from xlaserve.runtime.config import EngineConfig
from xlaserve.runtime.engine import Engine
from xlaserve.runtime.models import params
from xlaserve.runtime.models.presets import PRESETS
from xlaserve.runtime.sampling_params import SamplingParams
from xlaserve.runtime.stats import EngineStats

CFG = PRESETS["tiny"]
ENGINE = EngineConfig(
    max_slots=2,
    page_size=8,
    max_model_len=128,
    prefill_buckets=(32,),
    kv_buckets=(128,),
    slot_buckets=(1,),
    scoring=False,
    speculative_k=(4,),
    speculative_schedule=((2, 4, 1.0),),  # every greedy sequence guesses every step
    compile_at="use",
)
COPY = [5, 6, 7, 8, 9, 10] * 4  # a prompt that repeats itself: n-gram guesses find matches
GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    weights = jax.tree.map(np.asarray, params.random_weights(models.declare(CFG), seed=1, dtype=np.float32))
    return LLM.from_engine(Engine(CFG, weights, ENGINE), mock_tokenizer(CFG.vocab_size))


def totals(llm) -> tuple[int, int]:
    return tuple(llm.runner.spec.guesses)


def test_request_counts_add_up_to_the_runners_and_stats(llm):
    before = totals(llm)
    outs = llm.generate([COPY, [3, 1, 4, 1, 5, 9, 2, 6]], GREEDY)
    proposed = sum(o.speculative["proposed"] for o in outs)
    accepted = sum(o.speculative["accepted"] for o in outs)
    after = totals(llm)
    assert (proposed, accepted) == (after[0] - before[0], after[1] - before[1])
    assert outs[0].speculative["accepted"] > 0 and proposed > accepted
    from xlaserve.cli.generate import _json_output  # what `generate --output json` prints

    assert _json_output(llm, "x", outs[0])["speculative"] == outs[0].speculative
    s = llm.stats()
    assert (s.speculative_proposed, s.speculative_accepted) == after
    hist = s.speculative_emitted
    assert len(hist) == 4 + 2 and hist[0] == 0
    assert sum(n * c for n, c in enumerate(hist)) - sum(hist) == s.speculative_accepted  # emitted = kept + 1
    assert 0 < s.speculative_acceptance < 1
    # a request that opts out guesses nothing; counts are zeros, not None, on a speculating engine
    out = llm.generate([COPY], SamplingParams(temperature=0.8, max_tokens=5, seed=1, speculative=False))[0]
    assert out.speculative == {"proposed": 0, "accepted": 0}


def test_replicas_add_up_and_a_plain_engine_reports_none():
    a = EngineStats(speculative_proposed=3, speculative_accepted=2, speculative_emitted=(0, 1, 1))
    b = EngineStats(speculative_proposed=5, speculative_accepted=1, speculative_emitted=(0, 4, 0, 0, 1))
    s = a + b
    assert (s.speculative_proposed, s.speculative_accepted) == (8, 3)
    assert s.speculative_emitted == (0, 5, 1, 0, 1)
    plain = mock_llm()
    out = plain.generate([[5, 6, 7]], GREEDY)[0]
    assert out.speculative is None and plain.stats().speculative_emitted == ()


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("xlaserve_speculative"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_grpc_final_message_server_stats_and_metrics(llm):
    server, client = start(llm)  # its warm-up request ran through the same runner
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server.metrics.serve(port, "127.0.0.1")
        before = totals(llm)
        served = client.generate(tokens=COPY, max_tokens=40, temperature=0.0, ignore_eos=True)
        after = totals(llm)
        assert served.speculative == {"proposed": after[0] - before[0], "accepted": after[1] - before[1]}
        assert served.speculative["accepted"] > 0
        opted_out = client.generate(tokens=COPY, max_tokens=10, temperature=0.0, speculative=False)
        assert opted_out.speculative == {"proposed": 0, "accepted": 0}
        want = llm.stats()
        deadline, got = time.monotonic() + 30, {}
        while time.monotonic() < deadline:  # the loop publishes stats after the step that finished it
            got = scrape(port)
            if got.get("xlaserve_speculative_proposed_tokens_total") == want.speculative_proposed:
                break
            time.sleep(0.05)
        assert got["xlaserve_speculative_proposed_tokens_total"] == want.speculative_proposed > 0
        assert got["xlaserve_speculative_accepted_tokens_total"] == want.speculative_accepted > 0
        steps = sum(want.speculative_emitted)
        assert got["xlaserve_speculative_accepted_length_count"] == steps
        assert got["xlaserve_speculative_accepted_length_sum"] == want.speculative_accepted + steps
        assert got['xlaserve_speculative_accepted_length_bucket{le="1.0"}'] == want.speculative_emitted[1]
        assert got['xlaserve_speculative_accepted_length_bucket{le="+Inf"}'] == steps
        stats = client.stats()
        assert stats.speculative_proposed_tokens == want.speculative_proposed
        assert stats.speculative_accepted_tokens == want.speculative_accepted
    finally:
        client.close()
        server.stop()


def test_generate_json_over_grpc_prints_the_counts(capsys):
    """`xlaserve generate --server ... --output json` on the mock (each token the previous + 1: a
    prompt holding its continuation is guessed right)."""
    from xlaserve import cli

    llm = mock_llm(speculative_k=(4,))
    server, client = start(llm)
    try:
        prompt = " ".join(f"w{i}" for i in [*range(5, 40), *range(5, 8)])
        code = cli.main(
            ["generate", "--server", f"127.0.0.1:{server.port}", "--output", "json", "--max-tokens", "20",
             "--temperature", "0", prompt]
        )  # fmt: skip
        assert code == 0
        row = json.loads(capsys.readouterr().out)
        assert row["speculative"]["proposed"] >= row["speculative"]["accepted"] > 10
    finally:
        client.close()
        server.stop()
