"""Batched prefill without compiling anything: how a step's generation chunks group into prefill
calls and what they cost of the token budget (runtime/prefill_calls.py), the scheduler filling the
rows a step pays for, and the runner over the mock engine sending several prompts in one call. The
same for scoring chunks (BatchedScores, PackedScores) and the steps that only score."""

from __future__ import annotations

import dataclasses
import re

import pytest
from serving import ENGINE, mock_llm, mock_tokenizer
from test_scheduler import execute, make, sched

from xlaserve import LLM, SamplingParams
from xlaserve.checkpoints import registry
from xlaserve.checkpoints.gguf import open_reader, read_metadata
from xlaserve.checkpoints.tokenizer import tokenizer_from_gguf
from xlaserve.runtime.admission import Limits
from xlaserve.runtime.config import EngineConfig
from xlaserve.runtime.mock_engine import MockEngine
from xlaserve.runtime.prefill_calls import (
    Batched,
    BatchedScores,
    Packed,
    PackedScores,
    packed_buckets,
    packed_rows,
    prefill_rows,
)

BUCKETS = (16, 32, 128)
LONG_PROMPTS = Limits(max_prompt_tokens=200, max_new_tokens=8, max_model_len=256, max_queue=100)


def bucket(n: int) -> int:
    return next((t for t in BUCKETS if t >= n), BUCKETS[-1])


def rows(t: int) -> tuple[int, ...]:
    return prefill_rows(8, BUCKETS, t)


BATCHED, PACKED = Batched(bucket, rows), Packed(bucket, BUCKETS, 8)
group, padded = BATCHED.group, BATCHED.cost


def test_batches_stay_within_the_largest_bucket():
    assert rows(16) == (1, 2, 4, 8) and rows(32) == (1, 2, 4) and rows(128) == (1,)
    assert prefill_rows(6, (16, 128), 16) == (1, 2, 4, 6)  # max_slots closes the list
    assert prefill_rows(8, (32,), 32) == (1,)


def test_calls_group_in_order_and_cost_their_padded_tokens():
    a, b, c, d, e = "abcde"
    # three short chunks share a call of 4 rows x 16; a chunk of 20 tokens widens it to 32
    assert group([(a, 5, False), (b, 16, False), (c, 3, False)]) == [[0, 1, 2]]
    assert padded([(a, 5, False), (b, 16, False), (c, 3, False)]) == 4 * 16
    assert padded([(a, 5, False), (b, 20, False)]) == 2 * 32
    # a second chunk of a sequence, a full call and a masked (grammar) last chunk each start a call
    assert group([(a, 16, False), (a, 16, False), (b, 4, False)]) == [[0], [1, 2]]
    five = [(s, 20, False) for s in (a, b, c, d, e)]
    assert group(five) == [[0, 1, 2, 3], [4]] and padded(five) == 4 * 32 + 32
    assert group([(a, 4, False), (b, 4, True), (c, 4, False)]) == [[0, 2], [1]]
    assert group([(a, 4, False), (b, 4, True), (b, 4, False)]) == [[0], [1], [2]]


def test_packed_calls_pad_once():
    """Packed: a call's tokens back to back, padded once to their bucket; a grammar request's last
    chunk alone; a call closes at the largest bucket or at max_slots sequences."""
    a, b, c = "abc"
    assert PACKED.group([(a, 5, False), (b, 16, False), (c, 3, False)]) == [[0, 1, 2]]
    assert PACKED.cost([(a, 5, False), (b, 16, False), (c, 3, False)]) == 32  # 24 tokens; batched 4 x 16
    ones = [(s, 1, False) for s in "abcdefgh"]  # prompts found in the prefix cache but for a token
    assert PACKED.cost(ones) == 8 and padded(ones) == 8 * 16
    assert PACKED.cost(ones[:3]) == 4 and PACKED.cost([(a, 9, False)]) == 16
    assert PACKED.group([(a, 4, False), (b, 4, True), (c, 4, False)]) == [[0, 2], [1]]
    assert PACKED.cost([(a, 4, False), (b, 4, True), (c, 4, False)]) == 8 + 16  # masked: a prefill bucket
    assert PACKED.cost([(a, 100, False), (b, 100, False)]) == 2 * 128
    assert PACKED.group([*ones, ("i", 1, False)]) == [list(range(8)), [8]]  # 8 slots
    assert PACKED.group([(a, 16, False), (a, 16, False)]) == [[0, 1]]  # one sequence's chunks in order
    assert packed_rows(8, 16) == (1, 2, 4, 8) and packed_rows(64, 16) == (1, 2, 4, 8, 16)
    assert packed_rows(6, 128) == (1, 2, 4, 6) and packed_rows(1, 16) == (1,) and packed_rows(8, 2) == (1, 2)
    assert packed_buckets(BUCKETS) == (1, 2, 4, 8, 16, 32, 128) and packed_buckets((4, 64)) == (1, 2, 4, 64)


def test_packed_steps_take_what_batched_steps_pad():
    """Eight one-token prompts: one packed step of 8 tokens, against one prompt a step batched
    (each pays a row of 16). A chunk that does not fit fills the rest of the bucket paid for."""
    for calls, steps in ((PACKED, 1), (BATCHED, 8)):
        s = scheduler(16, calls)
        seqs = [s.add(make(1, float(i), first=10 * i + 1)) for i in range(8)]
        taken = 0
        for _ in range(steps):
            plan = s.plan()
            taken += len(plan.prefills)
            execute(s, plan)
        assert taken == 8 and all(seq.req.output_ids for seq in seqs), (calls, taken)
    s = scheduler(32, PACKED)
    first, second, _ = (s.add(make(n, float(i))) for i, n in enumerate((20, 100, 30)))
    # 20 tokens pay for a bucket of 32: 12 tokens of the 100-token prompt fill it, the third waits
    assert [(c.seq, len(c.tokens)) for c in s.plan().prefills] == [(first, 20), (second, 12)]


def test_scoring_calls_group_by_bucket_or_pack_by_tokens():
    a, b, c = "abc"
    batched, packed = BatchedScores(bucket, rows), PackedScores(BUCKETS, 4)
    # batched: consecutive chunks of one bucket and distinct sequences, at most the rows compiled
    assert batched.group([(a, 5), (b, 16), (c, 20), (a, 30)]) == [[0, 1], [2, 3]]
    assert batched.group([(a, 5), (a, 5)]) == [[0], [1]] and batched.cost(5) == 16
    assert batched.group([(s, 3) for s in "abcdefghi"]) == [list(range(8)), [8]]  # rows(16)[-1] = 8
    # packed: back to back while the tokens fit the largest bucket and the chunks max_chunks
    assert packed.group([(a, 5), (b, 16), (c, 20), (a, 30)]) == [[0, 1, 2, 3]] and packed.cost(5) == 5
    assert packed.group([(a, 100), (b, 20), (c, 20)]) == [[0, 1], [2]]  # 140 > 128 tokens
    assert packed.group([(s, 1) for s in "abcde"]) == [[0, 1, 2, 3], [4]]  # 4 chunks
    assert packed.group([(a, 60), (a, 60)]) == [[0, 1]]  # one sequence's chunks in order
    assert packed.bucket(71) == 128 and packed.bucket(3) == 4
    assert (packed.room(100), packed.room(128), packed.room(1000), batched.room(100)) == (32, 128, 128, 100)


def scoring(n: int, t: float, first: int):
    return dataclasses.replace(make(n, t, first=first), score_start=1)


def test_a_step_that_only_scores_fills_a_packed_call_exactly():
    """Packed, the step fills its bucket of tokens and splits the prompt that does not fit (its rest
    goes first next step); batched, each chunk pays a padded row and no prompt is split."""
    for score_calls, want in (
        (PackedScores(BUCKETS, 8), [[(0, 0, 60), (1, 0, 50), (2, 0, 18)], [(2, 18, 22)]]),
        (BatchedScores(bucket, rows), [[(0, 0, 60)], [(1, 0, 50)], [(2, 0, 40)]]),
    ):
        s = sched(
            max_slots=4,
            num_pages=256,
            pages_per_seq=64,
            chunk=128,
            limits=LONG_PROMPTS,
            score_budget=128,
            score_calls=score_calls,
        )
        seqs = [s.add(scoring(n, float(i), 100 * i + 1)) for i, n in enumerate((60, 50, 40))]
        steps = []
        while s.busy and len(steps) < 5:
            plan = s.plan()
            steps.append([(seqs.index(c.seq), c.start, len(c.tokens)) for c in plan.prefills])
            for chunk in plan.prefills:
                s.prefilled(chunk)
                if chunk.last:
                    s.finish(chunk.seq)
        assert steps == want, score_calls


def packed_mock(**fields) -> tuple[MockEngine, LLM]:
    engine = MockEngine(dataclasses.replace(ENGINE, prefill_buckets=(8, 32), **fields), packed=True)
    return engine, LLM.from_engine(engine, mock_tokenizer(), source="mock")


def test_the_runner_packs_a_steps_prompts_on_a_packed_engine():
    engine, llm = packed_mock(max_slots=4, prefill_token_budget=8)
    calls = []
    batch = engine.prefill_batch
    engine.prefill_batch = lambda chunks: calls.append([len(c[0]) for c in chunks]) or batch(chunks)
    prompts = [[5, 6], [20, 21, 22], [40], [60, 61]]
    outs = llm.generate(prompts, SamplingParams(max_tokens=3, temperature=0.0))
    assert [o.token_ids for o in outs] == [[7, 8, 9], [23, 24, 25], [41, 42, 43], [62, 63, 64]]
    assert calls == [[2, 3, 1, 2]]  # 8 tokens: the budget, one bucket (batched: 4 rows x 8)


def test_the_runner_packs_scoring_chunks_on_a_packed_engine():
    """Eight 3-token items on a packed mock with 8 slots: the scoring room of 256 tokens (a bucket of
    its 32 here) holds them all, one call of 24 tokens (batched: two calls of 4 rows x 8)."""
    engine, llm = packed_mock(max_slots=8, prefill_token_budget=4)
    calls = []
    score = engine.score_batch
    engine.score_batch = lambda items: calls.append([len(it[0]) for it in items]) or score(items)
    results = llm.score([([7, 8 + i, 9], 1) for i in range(8)], share=False)
    assert [r.is_greedy for r in results] == [[i == 0, i == 0] for i in range(8)]
    assert calls == [[3] * 8]


def scheduler(budget: int, calls=BATCHED):
    return sched(
        max_slots=8,
        num_pages=256,
        pages_per_seq=64,
        chunk=128,
        limits=LONG_PROMPTS,
        token_budget=budget,
        calls=calls,
    )


def test_a_step_prefills_several_prompts_within_the_padded_budget():
    s = scheduler(128)
    seqs = [s.add(make(n, float(i), first=10 * i + 1)) for i, n in enumerate((3, 9, 14, 16, 5, 12, 7, 2))]
    plan = s.plan()
    # eight prompts of at most 16 tokens: one call of 8 rows x 16, the budget
    assert [len(c.tokens) for c in plan.prefills] == [3, 9, 14, 16, 5, 12, 7, 2]
    execute(s, plan)
    assert all(seq.req.output_ids for seq in seqs)


def test_a_step_fills_the_rows_it_pays_for_and_no_more():
    s = scheduler(128)
    first, second, third = (s.add(make(n, float(i))) for i, n in enumerate((20, 100, 30)))
    plan = s.plan()
    # 20 tokens pay for a row of 32; the budget (4 x 32) holds two more rows of 32: the 100-token
    # prompt takes 32 tokens of it (not a call of 128 of its own), the 30-token one the third
    assert [(c.seq, len(c.tokens)) for c in plan.prefills] == [(first, 20), (second, 32), (third, 30)]
    assert padded([(c.seq, len(c.tokens), False) for c in plan.prefills]) == 4 * 32
    execute(s, plan)
    assert [(c.seq, len(c.tokens)) for c in s.plan().prefills] == [(second, 68)]  # 1 x 128


def test_without_batches_a_chunk_costs_its_tokens():
    s = sched(token_budget=8)  # no bucket/rows: the scheduler of the plain-Python tests
    s.add(make(5, 0.0))
    s.add(make(5, 1.0, first=7))
    assert [len(c.tokens) for c in s.plan().prefills] == [5, 3]


def test_the_runner_sends_a_steps_prompts_in_one_call():
    llm = mock_llm(max_slots=4, prefill_buckets=(8, 32), prefill_token_budget=32)
    engine = llm.engine
    calls = []
    batch = engine.prefill_batch
    engine.prefill_batch = lambda chunks: calls.append([len(c[0]) for c in chunks]) or batch(chunks)
    prompts = [[5, 6], [20, 21, 22], [40], [60, 61, 62, 63, 64, 65]]
    outs = llm.generate(prompts, SamplingParams(max_tokens=3, temperature=0.0))
    assert [o.token_ids for o in outs] == [[7, 8, 9], [23, 24, 25], [41, 42, 43], [66, 67, 68]]
    assert calls == [[2, 3, 1, 6]]  # 4 rows x 8 tokens: the budget


@pytest.fixture(scope="module")
def tokenizer():
    path = registry.resolve(registry.DEFAULT_MODEL, log=lambda m: None)
    return tokenizer_from_gguf(read_metadata(open_reader(path)), path)


def test_a_grammar_requests_last_chunk_runs_alone(tokenizer):
    """Its masked prefill takes the grammar's bitmask, one per call: the other prompts of the step
    share a call without it, and the grammar request's output still matches its regex."""
    cfg = EngineConfig(max_slots=4, max_model_len=256, page_size=4, prefill_buckets=(8, 32))
    engine = MockEngine(dataclasses.replace(cfg, prefill_token_budget=32), vocab=tokenizer.vocab_size)
    llm = LLM.from_engine(engine, tokenizer)
    calls = []
    batch, single = engine.prefill_batch, engine.prefill
    engine.prefill_batch = lambda chunks: calls.append(len(chunks)) or batch(chunks)
    engine.prefill = lambda *a: calls.append("masked") or single(*a)
    free = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    constrained = SamplingParams(max_tokens=8, temperature=0.0, regex="[0-9]{3}")
    outs = llm.generate([[5, 6], [7, 8], [9, 10]], [free, constrained, free])
    assert calls == [2, "masked"] and re.fullmatch("[0-9]{3}", outs[1].text), (calls, outs[1].text)
    assert outs[0].token_ids == [7, 8] and outs[2].token_ids == [11, 12]
