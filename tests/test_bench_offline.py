"""The offline benchmark's prefix-cache workloads on the real model (the throughput rows beside HF
are benchmark-only): chats whose every turn resends the conversation so far."""

from __future__ import annotations

import itertools

from xlaserve.bench import offline


def test_a_chats_next_turn_prefills_only_what_the_last_turn_did_not_cache(llm):
    """Each second turn finds all of the first turn's tokens that it starts with, up to the token
    (never a whole page less), minus the first turn's last token (its K/V was never written)."""
    off = offline.chat_turns(llm, 3, 2, cache=False)
    turns = []
    on = offline.chat_turns(llm, 3, 2, cache=True, outputs=turns)
    assert off["prefill_tokens_computed"] == off["prompt_tokens"] == on["prompt_tokens"]
    ps, expected = llm.engine.ecfg.page_size, []
    for first, second in zip(*turns, strict=True):
        held = (first.prompt_token_ids + first.token_ids)[:-1]  # what the cache holds of turn 1
        pairs = zip(held, second.prompt_token_ids, strict=False)
        shared = sum(1 for _ in itertools.takewhile(lambda p: p[0] == p[1], pairs))
        expected.append(min(shared, len(second.prompt_token_ids) - 1))
    assert [o.cached_tokens for o in turns[1]] == expected
    assert any(n % ps for n in expected)  # (some end mid-page: whole pages alone would not do)
    cached = sum(o.cached_tokens for outs in turns for o in outs)
    assert on["prefill_tokens_computed"] == on["prompt_tokens"] - cached
