"""Scoring several continuations of one context from one row (runtime/scoring.py `share_rows`), and
steps that only score filling a whole scoring call (scheduler `_score_chunks`): fewer rows and calls,
the same log-probs and greedy flags as one row per item; on the mock engine and on the real model
against the per-row path and HF transformers. On CPU the real engine packs its scoring calls
(programs.score_packed): two chunks of one sequence in one call, and prompts split across steps to
fill a call, score as one chunk and as HF does."""

from __future__ import annotations

import random

import numpy as np
import pytest
from helpers import LOGIT_ATOL, assert_same_kv, held_pages, hf_logits
from serving import mock_llm

from xlaserve.runtime.prefill_calls import PackedScores
from xlaserve.runtime.scoring import share_rows


def test_rows_cover_every_item_and_share_one_token_choices():
    ctx = [1, 2, 3]
    items = [([*ctx, 10], 3), ([*ctx, 11], 3), ([*ctx, 12, 13], 3), ([*ctx, 12, 14], 3), ([5, 6], 1)]
    rows, where = share_rows(items, max_alts=3)
    assert len(rows) == 2  # the four continuations of ctx in one row, [5, 6] in its own
    assert where[:4] == [where[0]] * 4 and where[4] != where[0]
    row = rows[where[0]]
    assert row.tokens == [*ctx, 12, 13] and row.start == 3
    assert row.alts == {4: (14,), 3: (10, 11)}


def test_rows_cover_random_items_within_the_candidate_limit():
    rng = random.Random(0)
    for trial in range(200):
        contexts = [[rng.randrange(4) for _ in range(rng.randrange(1, 6))] for _ in range(3)]
        items = []
        for _ in range(rng.randrange(1, 20)):
            ctx = rng.choice(contexts)
            items.append((ctx + [rng.randrange(6) for _ in range(rng.randrange(1, 4))], len(ctx)))
        max_alts = rng.randrange(1, 4)
        rows, where = share_rows(items, max_alts)
        for (tokens, start), r in zip(items, where, strict=True):
            row, last = rows[r], len(tokens) - 1
            assert row.tokens[:last] == tokens[:last] and row.start <= start, trial
            own = last < len(row.tokens) and row.tokens[last] == tokens[last]
            assert own or tokens[last] in row.alts[last], trial
        assert all(0 < len(c) <= max_alts for row in rows for c in row.alts.values())
        assert len(rows) <= len({tuple(t) for t, _ in items})


def counting(llm):
    """Wrap the engine's score_batch: returns a list that collects the rows of each call."""
    calls, inner = [], llm.engine.score_batch

    def score_batch(items):
        calls.append(len(items))
        return inner(items)

    llm.engine.score_batch = score_batch
    return calls


MC = [
    ("w1 w2 w3", " w4"),  # the mock's greedy token after w3
    ("w1 w2 w3", " w9"),
    ("w1 w2 w3", " w5 w6"),
    ("w1 w2 w3", " w7 w8"),
    ("w20 w21", " w22 w23"),
    ("w20 w21", " w30"),
]


def test_a_multiple_choice_batch_takes_fewer_rows_with_equal_results():
    shared, single = mock_llm(), mock_llm()
    shared_calls, single_calls = counting(shared), counting(single)
    got, want = shared.score(MC), single.score(MC, share=False)
    for a, b in zip(got, want, strict=True):
        assert (a.token_ids, a.logprobs, a.is_greedy) == (b.token_ids, b.logprobs, b.is_greedy)
    assert got[0].is_greedy == [True] and got[1].is_greedy == [False]
    # w4 and w9 ride on the row of " w7 w8" (one of the two-token choices), w30 on " w22 w23"
    assert sum(single_calls) == len(MC) and sum(shared_calls) == 3


def test_a_step_that_only_scores_fills_a_call_despite_a_small_token_budget():
    """With a 4-token prefill budget every 3-token item used to take a step and a call of its own;
    a step with nothing decoding now fills a whole call (the mock's 4 rows)."""
    llm = mock_llm(prefill_token_budget=4, max_slots=8)
    calls = counting(llm)
    items = [([7, 8 + i, 9], 1) for i in range(8)]
    results = llm.score(items, share=False)
    assert [r.is_greedy for r in results] == [[i == 0, i == 0] for i in range(8)]
    assert calls == [4, 4]


@pytest.fixture(scope="module")
def mc_pairs():
    """Questions with one-token and several-token choices (the shapes lm-eval sends)."""
    out = []
    for q, choices in [
        ("What is the capital of France?", [" Berlin", " Madrid", " Paris", " Rome"]),
        ("How many legs does a spider have?", [" Six", " Eight", " Ten", " Twelve legs"]),
        ("Which gas do plants absorb?", [" Oxygen", " Carbon dioxide", " Nitrogen", " Helium"]),
    ]:
        out += [(f"Question: {q}\nAnswer:", c) for c in choices]
    return out


def test_shared_rows_score_as_single_rows_and_hf_on_the_model(llm, hf_model, mc_pairs):
    calls = counting(llm)
    try:
        single = llm.score(mc_pairs, share=False)
        single_rows = sum(calls)
        calls.clear()
        shared = llm.score(mc_pairs)
    finally:
        del llm.engine.score_batch  # the engine's own method again
    assert sum(calls) < single_rows == len(mc_pairs)
    for (context, _continuation), a, b in zip(mc_pairs, shared, single, strict=True):
        assert a.token_ids == b.token_ids and a.is_greedy == b.is_greedy
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)
        ctx = llm.tokenizer.encode(context)
        ids = ctx + a.token_ids
        ref = hf_logits(hf_model, ids)
        ref = ref - ref.max(-1, keepdims=True)
        ref = ref - np.log(np.exp(ref).sum(-1, keepdims=True))
        want = [ref[len(ctx) - 1 + i, t] for i, t in enumerate(a.token_ids)]
        np.testing.assert_allclose(a.logprobs, want, atol=LOGIT_ATOL)
        assert a.is_greedy == [int(np.argmax(ref[len(ctx) - 1 + i])) == t for i, t in enumerate(a.token_ids)]


def test_logits_at_the_scored_positions_only_equal_all_logits(llm, mc_pairs):
    """Packed calls that read a few positions run a `score_packed` program with logits at those
    positions alone (S < N, layout.score_sel); with those hidden, the same calls compute every
    position's logits (S = N), with the same results."""
    engine, used = llm.engine, []
    programs = dict(engine._score_packed)
    few = {k: p for k, p in programs.items() if k[1] < k[0]}
    assert few  # compiled at start-up beside the full score programs
    pairs = [(f"Quiz {len(c)}. {c}", a) for c, a in mc_pairs]  # not in the prefix cache: whole contexts
    try:
        spy = {k: lambda *a, _p=p, _k=k: used.append(_k) or _p(*a) for k, p in few.items()}
        engine._score_packed = {**programs, **spy}
        got = llm.score(pairs)
        engine._score_packed = {k: p for k, p in programs.items() if k not in few}
        full = llm.score(pairs)
    finally:
        engine._score_packed = programs
    assert used
    for a, b in zip(got, full, strict=True):
        assert a.token_ids == b.token_ids and a.is_greedy == b.is_greedy
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)


def test_a_packed_scoring_call_holds_two_chunks_of_one_sequence(llm):
    """A 40-token sequence scored in one chunk, and as two chunks in one packed call with another
    sequence between them: the second chunk sees the first's K/V (written in the same layer before
    any token attends). Same log-probs and greedy flags at every position, same K/V."""
    engine, pages = llm.engine, llm.runner.scheduler.pages
    assert engine.layout.packed and isinstance(engine.score_calls, PackedScores)
    vocab = engine.cfg.vocab_size
    rng = np.random.default_rng(5)
    seq, other = rng.integers(1, vocab, 41).tolist(), rng.integers(1, vocab, 7).tolist()
    with held_pages(engine, pages, (40, 40, 7)) as (held, rows):
        ((lp, greedy),) = engine.score_batch([(seq[:40], 0, rows[0], seq[1:41])])
        two = engine.score_batch(
            [
                (seq[:25], 0, rows[1], seq[1:26]),
                (other, 0, rows[2], other[1:]),
                (seq[25:40], 25, rows[1], seq[26:41]),
            ]
        )
        np.testing.assert_allclose(np.concatenate([two[0][0], two[2][0]]), lp, atol=1e-4)
        assert (np.concatenate([two[0][1], two[2][1]]) == greedy).all()
        assert_same_kv(engine, held[0], held[1], 40)


def test_prompts_split_to_fill_packed_scoring_calls_score_as_hf(llm, hf_model):
    """Three 70-token texts scored whole: a step that only scores fills its call (128 tokens here)
    and splits the text that does not fit, its rest going next step. Every token's log-prob
    equals HF's on the whole text."""
    rng = np.random.default_rng(6)
    texts = [rng.integers(100, llm.engine.cfg.vocab_size, 70).tolist() for _ in range(3)]
    calls = []
    inner = llm.engine.score_batch
    llm.engine.score_batch = lambda items: calls.append([(it[1], len(it[0])) for it in items]) or inner(items)
    try:
        results = llm.score([(t, 1) for t in texts], share=False)
    finally:
        del llm.engine.score_batch
    room = llm.runner.scheduler.score_calls.room(llm.runner.scheduler.score_budget)
    assert sum(n for _, n in calls[0]) == room and any(start > 0 for call in calls for start, _ in call)
    for ids, r in zip(texts, results, strict=True):
        ref = hf_logits(hf_model, ids)
        ref = ref - ref.max(-1, keepdims=True)
        ref = ref - np.log(np.exp(ref).sum(-1, keepdims=True))
        assert r.token_ids == ids[1:]
        np.testing.assert_allclose(r.logprobs, [ref[i, t] for i, t in enumerate(ids[1:])], atol=LOGIT_ATOL)
        assert r.is_greedy == [int(np.argmax(ref[i])) == t for i, t in enumerate(ids[1:])]


def test_grpc_score_shares_rows_as_the_python_api():
    """The gRPC Score path builds its rows as LLM.score does: the same 3 rows for the 6 items, and
    per-item results equal to one row per item."""
    from serving import start

    want = mock_llm().score(MC, share=False)
    llm = mock_llm()
    calls = counting(llm)
    server, client = start(llm)
    try:
        got = client.score(MC)
    finally:
        client.close()
        server.stop()
    assert sum(calls) == 3
    for a, b in zip(got, want, strict=True):
        assert (list(a.token_ids), list(a.is_greedy)) == (b.token_ids, b.is_greedy)
        np.testing.assert_allclose(list(a.logprobs), b.logprobs, atol=1e-6)
        assert a.sum_logprob == pytest.approx(b.sum_logprob, abs=1e-5) and a.all_greedy == b.all_greedy
