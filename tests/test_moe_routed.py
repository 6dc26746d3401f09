"""Mixture-of-experts observability: the tokens each layer routes to each expert, counted on device
by the prefill/decode programs, summed into `EngineStats.moe_routed`, and exported to gRPC
`ServerStats` and Prometheus (`xlaserve_moe_routed_tokens_total{layer,expert}`); absent for a dense
model. The counts are checked against HF's own router (its router logits' top k) on a tiny
checkpoint, through the offline API and through a served request and a real /metrics scrape."""

from __future__ import annotations

import socket
import time
import urllib.request

import numpy as np
import pytest
import tiny_families as tf
import tiny_moe as tm
from helpers import hf_greedy
from serving import mock_llm, mock_tokenizer, start
from tiny_gguf import tokenizer_meta

from xlaserve import LLM, EngineConfig, SamplingParams
from xlaserve.runtime.engine_loop import EngineLoop
from xlaserve.runtime.mock_engine import MockEngine
from xlaserve.runtime.stats import EngineStats
from xlaserve.serve.messages import server_stats
from xlaserve.serve.metrics import Metrics

PROMPT = [5, 17, 300, 42, 7, 99, 1000, 3, 11, 64, 12, 250, 1500, 77]
# Greedy tokens generated. The model runs over the prompt and all NEW of them: the runner dispatches
# the next decode before it reads the last token, so a finished sequence runs once more (unread),
# and its routing counts as any other: the counts are the load the experts carried.
NEW = 5


def test_replica_counts_add_up_per_layer_and_expert_and_dense_stats_have_none():
    a, b = EngineStats(moe_routed=((1, 2), (3, 4))), EngineStats(moe_routed=((10, 0), (0, 10)))
    assert (a + b).moe_routed == ((11, 2), (3, 14))
    assert (a + EngineStats()).moe_routed == a.moe_routed == EngineStats.total([a]).moe_routed
    msg = server_stats(a, 1.0)
    assert msg.moe_experts == 2 and list(msg.moe_routed_tokens) == [1, 2, 3, 4]
    assert server_stats(EngineStats(), 1.0).moe_experts == 0


class InFlight(MockEngine):
    """A mock engine whose every dispatch routes one token to expert 0 of each layer, the count of
    the last dispatch still on its way to the host unless the caller waits (as a device copy)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.counted = 0

    def routed_tokens(self, wait: bool = False, reset: bool = False) -> np.ndarray:
        self.counted = self.dispatches if wait else max(self.counted, self.dispatches - 1)
        out = np.zeros((self.cfg.num_layers, 2), np.int64)
        out[:, 0] = self.counted
        return out


def test_the_servers_counts_include_the_last_step_once_it_goes_idle():
    """The engine loop publishes its stats after each step; the last step's routing counts arrive
    from the device after it. Going idle, the loop waits for them: nothing else would publish."""
    engine = InFlight(EngineConfig(max_slots=2, max_model_len=64, page_size=4), step_s=0.001)
    llm = LLM.from_engine(engine, mock_tokenizer(), source="mock")
    loop = EngineLoop(llm.runner)
    try:
        stream = loop.submit(llm.make_request("w1 w2 w3", SamplingParams(max_tokens=5)))
        assert len([t for d in stream for t in d.token_ids]) == 5
        deadline = time.monotonic() + 10
        while loop.stats().requests_running and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # idle: no step publishes again
        assert loop.stats().moe_routed[0][0] == engine.dispatches > 0
        assert llm.stats().moe_routed[0][0] == engine.dispatches
    finally:
        loop.close()


def test_prometheus_exports_the_counts_by_layer_and_expert_only_for_an_moe_model():
    from prometheus_client import generate_latest

    text = generate_latest(Metrics(stats=lambda: EngineStats(moe_routed=((1, 2), (3, 4)))).registry).decode()
    assert 'xlaserve_moe_routed_tokens_total{expert="1",layer="0"} 2.0' in text
    assert 'xlaserve_moe_routed_tokens_total{expert="0",layer="1"} 3.0' in text
    dense = mock_llm()
    assert dense.stats().moe_routed == ()
    text = generate_latest(Metrics(stats=dense.stats).registry).decode()
    assert "xlaserve_preemptions_total" in text and "moe_routed" not in text


def hf_routed(hf, tokens: list[int]) -> np.ndarray:
    """int [L, E]: the experts HF's router picks for `tokens` (top k of its router logits, the
    order softmax keeps), counted per layer."""
    import torch

    with torch.no_grad():
        out = hf(torch.tensor([tokens]), output_router_logits=True)
    k, e = hf.config.num_experts_per_tok, tm.EXPERTS
    picks = [torch.topk(layer.reshape(-1, e), k, dim=-1).indices.reshape(-1) for layer in out.router_logits]
    return np.stack([np.bincount(p.numpy(), minlength=e) for p in picks])


@pytest.fixture(scope="module")
def moe_llm(model_path, tmp_path_factory):
    """(LLM over the tiny Qwen2-MoE checkpoint, HF's model of it). One slot of two busy, so the
    decode program also runs an idle slot, whose routing must not count. No prefix cache: every
    token of every request is routed (a hit, even within a page, computes some tokens no more)."""
    from xlaserve import LLM

    root = tmp_path_factory.mktemp("routed")
    hf = tm.build("qwen2_moe", root / "qwen2_moe", tf.tiny_tokenizer(tokenizer_meta(model_path)))
    llm = LLM(
        str(root / "qwen2_moe"),
        max_slots=2,
        prefill_buckets=(16,),
        max_model_len=64,
        compile_cache="",
        scoring=False,
        prefix_cache=False,
        compile_at="use",
    )
    return llm, hf


@pytest.mark.slow
def test_routed_counts_equal_hfs_router_choices_offline_over_grpc_and_on_metrics(moe_llm):
    from xlaserve import SamplingParams

    llm, hf = moe_llm
    params = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)
    out = llm.generate([PROMPT], params)[0].token_ids
    # the prompt and every output token but the last, which ends the request: no step feeds it back
    want = hf_routed(hf, PROMPT + out[:-1])
    assert want.sum() == hf.config.num_hidden_layers * (len(PROMPT) + NEW - 1) * 2  # k = 2
    got = np.asarray(llm.stats().moe_routed)
    np.testing.assert_array_equal(got, want)

    # the server's warm-up request ([bos, bos], 2 greedy tokens) is routed as any other
    bos = llm.config.bos_token_id or 1
    warm = [bos, bos, *hf_greedy(hf, [bos, bos], 1)]
    want = 2 * want + hf_routed(hf, warm)
    server, client = start(llm)
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server.metrics.serve(port, "127.0.0.1")
        served = client.generate(tokens=PROMPT, max_tokens=NEW, temperature=0.0, ignore_eos=True)
        assert list(served.token_ids) == out
        deadline, scraped = time.monotonic() + 30, None
        while time.monotonic() < deadline:  # the loop publishes stats after the step that finished it
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
            scraped = np.zeros_like(want)
            for line in text.splitlines():
                if line.startswith("xlaserve_moe_routed_tokens_total{"):
                    labels, value = line[len("xlaserve_moe_routed_tokens_total{") :].split("} ")
                    kv = dict(part.split("=") for part in labels.split(","))
                    scraped[int(kv["layer"].strip('"')), int(kv["expert"].strip('"'))] = float(value)
            if (scraped == want).all():
                break
            time.sleep(0.05)
        np.testing.assert_array_equal(scraped, want)
        stats = client.stats()
        assert stats.moe_experts == tm.EXPERTS
        np.testing.assert_array_equal(np.reshape(stats.moe_routed_tokens, want.shape), want)
    finally:
        client.close()
        server.stop()
