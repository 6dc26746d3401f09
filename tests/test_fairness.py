"""Scoring and generation share the engine fairly (issue 20, defect 8): a Generate arriving during a
large Score gets a slot and its prefill within a step or two and then decodes every step, instead
of waiting behind every scoring item. The real scheduler and runner over the mock engine, counting
steps (the unit of engine time)."""

from __future__ import annotations

import time

from serving import mock_llm

from xlaserve import SamplingParams
from xlaserve.runtime.request import FinishReason

GEN = SamplingParams(max_tokens=16, temperature=0.0)


def steps_until(runner, done) -> int:
    steps = 0
    while not done():
        runner.step()
        steps += 1
        assert steps < 10_000
    return steps


def drain(runner) -> None:
    while runner.busy:
        runner.step()


def test_a_generate_is_not_queued_behind_a_large_score():
    llm = mock_llm(step_s=0.001, max_queue=1000)  # 4 slots
    runner = llm.runner
    t0 = time.perf_counter()
    alone = llm.make_request("w5", GEN)
    runner.submit(alone)
    alone_steps = steps_until(runner, lambda: alone.finished)
    alone_s = time.perf_counter() - t0
    drain(runner)

    items = [llm.score_request(([10 + i % 400, 11 + i % 400, 12, 13], 1)) for i in range(200)]
    for r in items:
        runner.submit(r)
    runner.step()  # the Score is under way, every slot scoring
    t0 = time.perf_counter()
    gen = llm.make_request("w5", GEN)
    runner.submit(gen)
    gen_steps = steps_until(runner, lambda: gen.finished)
    gen_s = time.perf_counter() - t0
    scored = sum(r.finished for r in items)
    drain(runner)
    # It took a slot at the next free one and then decoded every step: at most two steps more than
    # alone (it used to wait for all 200 items to take a slot first: 50+ steps more).
    assert gen.output_ids == alone.output_ids and gen_steps <= alone_steps + 2, (gen_steps, alone_steps)
    assert scored < 150, scored  # the Score was still running: scoring shared the engine, not gave way
    assert all(r.finish_reason is FinishReason.SCORED for r in items)
    assert all(len(r.scores) == 3 and r.scores[0] == (0.0, True) for r in items)
    print(f"16-token generate: alone {alone_s:.3f} s, during a 200-item score {gen_s:.3f} s")


def test_scoring_chunks_do_not_take_every_step_of_the_token_budget():
    """Three long scoring prompts hold the budget (128 tokens a step) when a Generate with a 290-token
    prompt arrives: its chunks go first every other step, so its first token comes after at most
    2 × ceil(290 / 128) steps (it used to wait for all 21 remaining scoring chunks)."""
    llm = mock_llm(max_queue=100, max_model_len=1024, prefill_buckets=(32, 128), prefill_token_budget=128)
    runner = llm.runner
    items = [llm.score_request(([7 + i] * 900, 1)) for i in range(3)]
    for r in items:
        runner.submit(r)
    runner.step()
    gen = llm.make_request(list(range(10, 300)), SamplingParams(max_tokens=4, temperature=0.0))
    runner.submit(gen)
    first = steps_until(runner, lambda: bool(gen.output_ids))
    assert first <= 6, first
    assert not any(r.finished for r in items)  # scoring kept its turns meanwhile
    assert sum(len(r.scores) for r in items) >= 128 * 2
    drain(runner)
    assert gen.output_ids == [300, 301, 302, 303] and all(len(r.scores) == 899 for r in items)


def test_priority_still_comes_first():
    """Fairness is between kinds of one priority: a higher-priority Score still goes before a Generate."""
    llm = mock_llm(max_queue=100, max_slots=1)
    runner = llm.runner
    blocker = llm.make_request("w1", SamplingParams(max_tokens=3))
    runner.submit(blocker)
    runner.step()
    gen = llm.make_request("w5", SamplingParams(max_tokens=2))
    urgent = llm.score_request(([4, 5, 6], 1))
    urgent.priority = 5
    runner.submit(gen)
    runner.submit(urgent)
    steps_until(runner, lambda: urgent.finished)
    assert not gen.output_ids
    drain(runner)
    assert gen.output_ids == [6, 7]
