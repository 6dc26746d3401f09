"""Mixed steps (EngineConfig.mixed_batch): a step that prefills prompts takes the running sequences'
next tokens in its first packed prefill call, as one-token chunks, instead of a decode call of their
own. The scheduler's plans and their budget (no compiling), the runner over the mock engine, and on
the real model: HF's greedy tokens, a seeded sampled request's tokens as when it runs alone."""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from helpers import hf_greedy
from serving import mock_tokenizer, start
from test_prefill_batch import WORDS
from test_prefill_calls import BUCKETS, bucket
from test_scheduler import execute, make, sched

from xlaserve import LLM, EngineConfig, SamplingParams
from xlaserve.runtime.admission import Limits
from xlaserve.runtime.mock_engine import MockEngine, mock_config
from xlaserve.runtime.prefill_calls import Packed, take
from xlaserve.runtime.sequence import State

LIMITS = Limits(max_prompt_tokens=200, max_new_tokens=16, max_model_len=256, max_queue=100)


def scheduler(budget: int, mix: bool = True):
    return sched(
        max_slots=4,
        num_pages=256,
        pages_per_seq=64,
        chunk=128,
        limits=LIMITS,
        token_budget=budget,
        calls=Packed(bucket, BUCKETS, 4),
        mix=mix,
    )


def running(s, *sizes):
    """Sequences of these prompt sizes, prefilled and decoding."""
    seqs = [s.add(make(n, float(i), first=100 * i + 1, max_tokens=16)) for i, n in enumerate(sizes)]
    while not all(seq.req.output_ids for seq in seqs):
        execute(s, s.plan())
    return seqs


def test_a_step_that_prefills_takes_the_running_tokens_in_its_first_call():
    """Two running sequences cost their bucket (2 tokens) of a 32-token budget: the prompt's chunk
    takes the other 30, all in one call of 32 tokens; no decode is planned. Without mixing, the
    same step prefills 32 tokens and then decodes."""
    for mix, chunks, decode in ((True, [30, 30, 30, 10], 0), (False, [32, 32, 32, 4], 2)):
        s = scheduler(32, mix)
        a, b = running(s, 5, 7)
        c = s.add(make(100, 9.0, first=2000))
        sizes = []
        while c.state is not State.RUNNING:
            plan = s.plan()
            assert len(plan.decode) == decode and plan.mixed == ([a, b] if mix else [])
            items = [(q, 1, False) for q in plan.mixed] + [
                (ch.seq, len(ch.tokens), False) for ch in plan.prefills
            ]
            assert len(s.calls.group(items)) == 1 and s.calls.cost(items) <= 32
            sizes += [len(ch.tokens) for ch in plan.prefills]
            execute(s, plan)
        assert sizes == chunks and len(a.req.output_ids) == 1 + len(chunks)
        plan = s.plan()  # nothing to prefill: a decode step
        assert plan.mixed == [] and plan.decode == [a, b, c]


def test_what_does_not_mix():
    # a decoding sequence with a grammar (its masked decode is a call of its own)
    s = scheduler(32)
    a, b = running(s, 5, 7)
    b.req.grammar = object()
    s.add(make(20, 9.0, first=2000))
    plan = s.plan()
    assert plan.mixed == [] and plan.decode == [a, b] and len(plan.prefills[0].tokens) == 20
    # only prompts to score wait
    s = scheduler(32)
    a, b = running(s, 5, 7)
    s.add(dataclasses.replace(make(20, 9.0, first=2000), score_start=1))
    plan = s.plan()
    assert plan.mixed == [] and plan.decode == [a, b] and len(plan.prefills) == 1
    # a budget with no room beside the rows: the prompt takes the budget, then a decode
    s = scheduler(2)
    a, b = running(s, 5, 7)
    s.add(make(20, 9.0, first=2000))
    plan = s.plan()
    assert plan.mixed == [] and plan.decode == [a, b] and len(plan.prefills[0].tokens) == 2
    # no page for the prompt's chunk: nothing to mix with
    calls = Packed(None, (4, 8), 3)
    s = sched(max_slots=3, num_pages=6, pages_per_seq=8, chunk=8, token_budget=32, calls=calls, mix=True)
    a, b = running(s, 8, 8)  # their next tokens take a third page each: the pool's 6
    s.add(make(4, 9.0, first=2000))
    plan = s.plan()
    assert plan.mixed == [] and plan.prefills == [] and len(plan.decode) == 2


def test_take_after_decode_rows():
    how = Packed(bucket, BUCKETS, 8)
    rows = [(q, 1, False) for q in "abc"]  # 3 rows: bucket 4, paid before the prompts' chunks
    # the first chunk joins the rows' call: at most the budget, and what the largest bucket leaves
    assert take("p", 100, 100, False, rows, 28, how, 3) == (28, 32 - 4, ("p", 28, False))
    assert take("p", 128, 128, False, rows, 200, how, 3) == (125, 128 - 4, ("p", 125, False))
    # a later chunk costs what it adds, as without rows
    calls = [*rows, ("p", 13, False)]  # 16 tokens
    assert take("q", 16, 16, False, calls, 16, how, 3) == (16, 16, ("q", 16, False))
    assert take("q", 40, 40, False, calls, 10, how, 3) == (0, 0, None)


def mixed_llm(mix: bool, packed: bool = True, **fields) -> LLM:
    cfg = EngineConfig(max_slots=2, max_model_len=256, page_size=4, mixed_batch=mix, **fields)
    engine = MockEngine(cfg, packed=packed, step_s=0.001, async_dispatch=True)
    return LLM.from_engine(engine, mock_tokenizer(), source="mock")


# five requests for two slots, of different lengths: a slot frees while the other still decodes
PROMPTS = [" ".join(f"w{10 * i + j}" for j in range(1, 4 + 3 * i)) for i in range(1, 6)]
LENGTHS = (9, 3, 14, 5, 7)


def test_runner_mixes_and_the_output_is_unchanged():
    """Five requests through two slots: prompts admitted while others decode go in mixed steps. The
    tokens are the same as without mixing, with fewer calls (the mock engine continues each
    sequence with its last token + 1, so a mixed row's token shows it continued from the last)."""
    prompts = PROMPTS
    params = [SamplingParams(max_tokens=n, logprobs=1) for n in LENGTHS]
    runs = {}
    for mix in (True, False):
        llm = mixed_llm(mix)
        outs = llm.generate(prompts, params)
        runs[mix] = ([o.token_ids for o in outs], llm.engine.dispatches, llm.stats())
    (mixed, calls, stats), (plain, plain_calls, plain_stats) = runs[True], runs[False]
    assert mixed == plain and [len(t) for t in mixed] == list(LENGTHS)
    last = [int(p.split()[-1][1:]) for p in prompts]
    assert all(t == list(range(k + 1, k + 1 + len(t))) for t, k in zip(mixed, last, strict=True))
    assert stats.mixed_steps >= 3 and plain_stats.mixed_steps == 0 and calls < plain_calls


def test_the_servers_stats_count_mixed_steps():
    """GetServerStats over real gRPC carries the engine's counters: mixed steps, prompt tokens
    admitted and computed, evictions."""
    server, client = start(mixed_llm(True))
    try:
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            list(pool.map(lambda p, n: client.generate(p, max_tokens=n), PROMPTS, LENGTHS))
        got = client.stats()
        # five prompts through two slots: the later ones are admitted while others decode
        assert got.mixed_steps >= 1 and got.requests_finished["length"] == 6  # the 5 and the warm-up
        assert got.prompt_tokens >= sum(len(p.split()) for p in PROMPTS)  # + the warm-up request
        assert got.prefill_tokens_computed >= got.prompt_tokens - got.prefill_tokens_saved
        assert got.evictions == 0
    finally:
        client.close()
        server.stop()


def test_mixed_batch_is_refused_where_it_cannot_run():
    with pytest.raises(ValueError, match="mixed_batch=True needs decode_steps 1 and no speculative_k"):
        EngineConfig(mixed_batch=True, decode_steps=2).resolve(mock_config(), "cpu")
    with pytest.raises(ValueError, match="mixed_batch=True needs decode_steps 1 and no speculative_k"):
        EngineConfig(mixed_batch=True, speculative_k=(4,)).resolve(mock_config(), "cpu")
    with pytest.raises(ValueError, match="mixed_batch=True needs packed prefill calls"):
        mixed_llm(True, packed=False)


def test_mixed_batch_flag_reaches_the_engine_config():
    from xlaserve.cli import build_parser
    from xlaserve.cli.common import engine_kwargs

    args = build_parser("serve").parse_args(["serve", "--mixed-batch"])
    assert engine_kwargs(args)["mixed_batch"] is True
    assert "mixed_batch" not in engine_kwargs(build_parser("serve").parse_args(["serve"]))


def test_mixed_steps_on_the_real_model_give_hfs_greedy_tokens(model_path, hf_model):
    """Prompts admitted while others decode: the running sequences' tokens come from the packed
    prefill call in those steps. Greedy tokens equal HF's; a seeded sampled request's equal its
    tokens when it runs alone (sampling keys on the position, not on the call)."""
    llm = LLM(
        str(model_path),
        max_slots=2,
        prefill_buckets=(32,),
        max_model_len=128,
        scoring=False,
        compile_at="use",
        mixed_batch=True,
    )
    rng = np.random.default_rng(3)
    prompts = [" ".join(rng.choice(WORDS, n)) for n in (9, 30, 14, 22, 5)]
    lengths = (12, 4, 10, 6, 8)
    greedy = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths]
    outs = llm.generate(prompts, greedy)
    assert llm.stats().mixed_steps >= 3
    for prompt, out, n in zip(prompts, outs, lengths, strict=True):
        assert out.token_ids == hf_greedy(hf_model, llm.encode(prompt), n), prompt
    # the sampled request decodes while the next two prompts are admitted, in mixed steps
    sampled = SamplingParams(temperature=0.9, seed=11, max_tokens=20, ignore_eos=True)
    short = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    before = llm.stats().mixed_steps
    together = llm.generate(prompts[:4], [short, sampled, short, short])[1]
    assert llm.stats().mixed_steps >= before + 2
    alone = llm.generate([prompts[1]], [sampled])[0]
    assert together.token_ids == alone.token_ids
