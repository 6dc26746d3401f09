"""The slot manager on the real model: outputs do not depend on what else runs or when it arrives,
preemption and prefix-cache hits change nothing in the output, and cancellation, deadlines and
admission limits release and report what they should."""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import pytest
from helpers import TEST_ENGINE

from xlaserve import LLM, SamplingParams
from xlaserve.runtime.admission import Overloaded, RequestTooLarge
from xlaserve.runtime.engine_loop import Draining, EngineLoop
from xlaserve.runtime.request import FinishReason

WORDS = "river stone lantern orchard copper violet meadow harbor quiet silver thunder maple".split()


def words(seed: int, n: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, n))


# Different prompt lengths (one spans several chunks), output lengths and sampling settings.
CASES = [
    (words(1, 8), SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)),
    (words(2, 170), SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)),
    (words(3, 40), SamplingParams(temperature=0.8, top_p=0.9, seed=11, max_tokens=30, ignore_eos=True)),
    ("def fizzbuzz(n):", SamplingParams(temperature=0.0, max_tokens=40)),
    (words(4, 3), SamplingParams(temperature=1.0, top_k=20, seed=3, max_tokens=16, ignore_eos=True)),
    (words(5, 90), SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, repetition_penalty=1.3)),
]


@pytest.fixture(scope="module")
def alone(llm):
    return [llm.generate(p, sp)[0].token_ids for p, sp in CASES]


def test_arrivals_at_different_times_change_nothing(llm, alone):
    runner = llm.runner
    requests = [llm.make_request(p, sp) for p, sp in CASES]
    arrive_at_step = [0, 0, 2, 5, 6, 11]
    step = 0
    while not all(r.finished for r in requests):
        for r, at in zip(requests, arrive_at_step, strict=True):
            if at == step:
                runner.submit(r)
        runner.step()
        step += 1
    while runner.busy:
        runner.step()
    assert [r.output_ids for r in requests] == alone
    stats = llm.stats()
    assert stats.slots_busy == 0 and stats.pages_used == 0 and stats.queue_length == 0


def test_preemption_with_a_small_page_pool_changes_nothing(model_path, alone):
    # 64 pages = one sequence of max_model_len; four slots of these requests need more than that.
    small = LLM(str(model_path), **TEST_ENGINE, num_pages=64, decode_steps=2, scoring=False, compile_at="use")
    long_cases = [
        (words(10 + i, 130), SamplingParams(temperature=0.0, max_tokens=150, ignore_eos=True))
        for i in range(4)
    ]
    outs = small.generate([p for p, _ in long_cases + CASES], [sp for _, sp in long_cases + CASES])
    stats = small.stats()
    assert stats.preemptions > 0
    assert [o.token_ids for o in outs[4:]] == alone
    for (p, sp), out in zip(long_cases, outs[:4], strict=True):  # and each equals its solo run
        assert small.generate(p, sp)[0].token_ids == out.token_ids
    assert small.stats().pages_used == 0


def test_prefix_cache_hit_same_output_fewer_prefill_tokens(llm):
    system = "You are a careful assistant. " + words(77, 150)
    asks = [system + " Question: what colour is the sky?", system + " Question: name a fruit."]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    cold_runner = llm.runner
    before = cold_runner.stats().prefill_tokens_computed
    cold = llm.generate(asks[1], params)[0]  # nothing of this prompt is cached yet
    cold_cost = cold_runner.stats().prefill_tokens_computed - before
    assert cold.cached_tokens == 0 and cold_cost == len(cold.prompt_token_ids)
    llm.generate(asks[0], params)  # shares the long system prompt
    before = llm.stats().prefill_tokens_computed
    warm = llm.generate(asks[1], params)[0]
    warm_cost = llm.stats().prefill_tokens_computed - before
    assert warm.token_ids == cold.token_ids
    assert warm.cached_tokens >= 150 and warm_cost == len(warm.prompt_token_ids) - warm.cached_tokens
    assert llm.stats().prefix_hit_rate > 0


def test_a_prefix_shared_within_a_page_is_copied_not_recomputed(llm):
    """Token-level prefix reuse. A chat's next turn continues the last turn's prompt and answer: its
    whole pages are mapped, the partly filled last one is copied (a tail, runtime/pages.py), only the
    new tokens are prefilled, and the output is the one computed with the prefix cache off."""
    ps, s = llm.engine.ecfg.page_size, llm.runner.scheduler
    prompt = llm.tokenizer.encode(words(91, 37))
    n = 12 + ((len(prompt) + 12 - 1) % ps == 0)  # the cache ends mid-page: it holds all but the last
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, logprobs=0)
    first = llm.generate(prompt, params)[0]
    held = len(prompt) + n - 1
    turn = [*prompt, *first.token_ids, *llm.tokenizer.encode(" and " + words(92, 6), False)]
    before = llm.stats().prefill_tokens_computed
    warm = llm.generate(turn, params)[0]
    assert warm.cached_tokens == held and held % ps
    assert llm.stats().prefill_tokens_computed - before == len(turn) - held
    s.prefix_cache = False
    try:
        cold = llm.generate(turn, params)[0]
    finally:
        s.prefix_cache = True
    assert cold.cached_tokens == 0 and warm.token_ids == cold.token_ids
    np.testing.assert_allclose(
        [lp.logprob for lp in warm.logprobs], [lp.logprob for lp in cold.logprobs], atol=2e-4
    )


def test_scores_after_a_prefix_hit_within_a_page_equal_the_cold_scores(llm):
    """Scoring (lm-eval's few-shot contexts diverge mid-page): a context scored before leaves its
    last, partly filled page as a tail; a longer prompt starting with it copies that page and
    scores from the middle of it, with the log-probs of scoring it cold."""
    ps, s = llm.engine.ecfg.page_size, llm.runner.scheduler
    ctx = llm.tokenizer.encode(words(93, 29))
    ctx += [ctx[-1]] * ((len(ctx) - 3) % ps == 0)  # the cached part below ends mid-page
    longer = (ctx + llm.tokenizer.encode(" stone lantern meadow quiet", False), len(ctx) - 2)
    s.prefix_cache = False
    try:
        cold = llm.score([longer], share=False)[0]
    finally:
        s.prefix_cache = True
    llm.score([(ctx, len(ctx) - 1)], share=False)  # its K/V: every token of ctx
    saved = llm.stats().prefill_tokens_saved
    warm = llm.score([longer], share=False)[0]
    # served from the cache: every position before the first whose logits give a scored log-prob
    assert llm.stats().prefill_tokens_saved - saved == longer[1] - 1 and (longer[1] - 1) % ps
    assert warm.token_ids == cold.token_ids and warm.is_greedy == cold.is_greedy
    np.testing.assert_allclose(warm.logprobs, cold.logprobs, atol=2e-4)


def test_cancel_frees_slot_and_pages_within_a_step(llm):
    stream = llm.stream(words(8, 60), SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True))
    for i, _ in enumerate(stream):
        if i == 5:
            break
    busy = llm.stats()
    assert busy.slots_busy == 1 and busy.pages_used > 0
    stream.close()  # an abandoned stream is cancelled
    after = llm.stats()
    assert after.slots_busy == 0 and after.pages_used == 0 and after.requests_finished["cancelled"] >= 1


def test_deadline_while_decoding_and_while_queued(llm):
    runner = llm.runner
    long = SamplingParams(temperature=0.0, max_tokens=500, ignore_eos=True)
    running = [
        llm.make_request(words(20 + i, 10), long, timeout_s=600) for i in range(TEST_ENGINE["max_slots"])
    ]
    late = llm.make_request(words(30, 10), long, timeout_s=0.5)  # will wait: every slot is taken
    decoding = llm.make_request(words(31, 10), long)
    for r in running:
        runner.submit(r)
    runner.step()
    runner.submit(late)
    while not late.finished:
        runner.step()
    assert late.finish_reason is FinishReason.DEADLINE and late.output_ids == []
    for r in running:
        runner.cancel(r.request_id)
    decoding.deadline = time.perf_counter() + 1.0
    runner.submit(decoding)
    while not decoding.finished:
        runner.step()
    assert decoding.finish_reason is FinishReason.DEADLINE and 0 < len(decoding.output_ids) < 500
    while runner.busy:
        runner.step()
    stats = llm.stats()
    assert stats.slots_busy == 0 and stats.pages_used == 0 and stats.requests_finished["deadline"] >= 2


def test_admission_limits_on_the_real_engine(llm):
    with pytest.raises(RequestTooLarge, match=r"prompt \(1000 tokens\) \+ max_tokens \(100\) = 1100 exceeds"):
        llm.generate([[7] * 1000], SamplingParams(max_tokens=100))
    with pytest.raises(RequestTooLarge, match="max_tokens=2000 exceeds the limit of 1023"):
        llm.generate("hi", SamplingParams(max_tokens=2000))
    scheduler = llm.runner.scheduler
    saved = scheduler.limits
    try:
        scheduler.limits = dataclasses.replace(saved, max_queue=2, max_per_client=1)
        # Requests that will take a free slot are not waiting beyond the slots (issue 20, defect 6):
        # take every slot first, so the ones below wait.
        for i in range(TEST_ENGINE["max_slots"]):
            llm.runner.submit(llm.make_request(f"x{i}", SamplingParams(max_tokens=4)))
        llm.runner.step()
        queued = [llm.make_request("a", SamplingParams(max_tokens=4), client_id=c) for c in ("c1", "c2")]
        llm.runner.submit(queued[0])
        with pytest.raises(Overloaded, match="client 'c1' already has 1 requests in flight; the limit is 1"):
            llm.runner.submit(llm.make_request("b", SamplingParams(max_tokens=4), client_id="c1"))
        llm.runner.submit(queued[1])
        with pytest.raises(Overloaded, match=r"the queue is full \(2 requests waiting\)"):
            llm.runner.submit(llm.make_request("b", SamplingParams(max_tokens=4), client_id="c3"))
        while llm.runner.busy:
            llm.runner.step()
        assert all(r.finished for r in queued)
    finally:
        scheduler.limits = saved


def test_engine_loop_serves_concurrent_threads(llm, alone):
    loop = EngineLoop(llm.runner)
    try:
        results = [None] * len(CASES)

        def client(i):
            time.sleep(0.05 * i)  # staggered arrivals
            stream = loop.submit(llm.make_request(*CASES[i]))
            results[i] = [t for d in stream for t in d.token_ids]

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(CASES))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert results == alone
        assert loop.drain(grace_s=5)
        with pytest.raises(Draining):
            loop.submit(llm.make_request("x", SamplingParams(max_tokens=2)))
    finally:
        loop.close()
    assert not llm.runner.busy
