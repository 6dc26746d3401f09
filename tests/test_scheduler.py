"""The slot manager alone (plain Python; nothing compiles): chunked prefill under a token budget,
lazy page allocation, continuous batching, finishing, and preemption when the pool runs dry."""

from __future__ import annotations

import pytest
from xlaserve.runtime.pages import OutOfPages, PageAllocator
from xlaserve.runtime.request import FinishReason, Request, Timings
from xlaserve.runtime.sampling import SamplingParams
from xlaserve.runtime.scheduler import Scheduler, State

PAGE = 4


def make(n_prompt: int, t: float = 0.0, rid: str | None = None) -> Request:
    return Request(
        rid or f"r{t}", list(range(1, n_prompt + 1)), SamplingParams(), 0, frozenset({0}), Timings(arrival=t)
    )


def sched(**kw) -> Scheduler:
    args = dict(
        max_slots=2, page_size=PAGE, pages_per_seq=8, num_pages=16, max_model_len=32, decode_steps=1, chunk=8
    )
    return Scheduler(**{**args, **kw})


def run_prefill(s: Scheduler, plan):
    """Carry out a plan's prefill the way the runner does: each last chunk samples one token."""
    for chunk in plan.prefills:
        s.prefilled(chunk)
        if chunk.last:
            chunk.seq.req.output_ids.append(99)


def test_long_prompt_is_chunked_under_the_budget_and_decode_continues():
    s = sched(token_budget=8)
    a = s.add(make(3, 0.0))
    plan = s.plan()
    run_prefill(s, plan)
    assert [len(c.tokens) for c in plan.prefills] == [3] and a.state is State.RUNNING
    b = s.add(make(20, 1.0))
    plans = []
    while b.state is not State.RUNNING:
        plan = s.plan()
        plans.append(plan)
        assert sum(len(c.tokens) for c in plan.prefills) <= 8
        assert plan.decode == [a]  # the running stream keeps decoding every step
        run_prefill(s, plan)
        a.req.output_ids.append(5)
    assert [len(c.tokens) for p in plans for c in p.prefills] == [8, 8, 4]
    assert len(b.pages) == 5  # ceil(20 / 4)


def test_pages_follow_length_and_return_on_finish():
    s = sched()
    seq = s.add(make(6))
    run_prefill(s, s.plan())
    assert len(seq.pages) == 2 and s.pages.free_count == 14
    for _ in range(3):
        plan = s.plan()  # decode of position 6, 7, 8: the third needs a third page
        assert plan.decode == [seq] and plan.kv_tokens == seq.length + 1
        seq.req.output_ids.append(7)
    assert len(seq.pages) == 3
    assert list(s.page_table[seq.slot, :3]) == seq.pages
    seq.req.finish(FinishReason.EOS)
    s.finish(seq)
    assert s.pages.free_count == 16 and s.slots == [None, None] and not s.busy


def test_continuous_batching_refills_a_freed_slot():
    s = sched(max_slots=1)
    first, second = s.add(make(2, 0.0)), s.add(make(2, 1.0))
    run_prefill(s, s.plan())
    assert first.state is State.RUNNING and second.state is State.WAITING
    s.finish(first)
    plan = s.plan()
    assert second.state is State.PREFILL and plan.prefills[0].seq is second


def test_dry_pool_preempts_the_newest_and_requeues_it_first():
    s = sched(num_pages=8, pages_per_seq=8)
    old, new = s.add(make(12, 0.0)), s.add(make(12, 1.0))
    while new.state is not State.RUNNING:
        plan = s.plan()
        for seq in plan.decode:
            seq.req.output_ids.append(3)
        run_prefill(s, plan)
    assert old.state is State.RUNNING and s.pages.free_count == 8 - 3 - 3 - (len(old.pages) - 3)
    while s.preemptions == 0:  # both grow until the pool cannot hold them
        plan = s.plan()
        for seq in plan.decode:
            seq.req.output_ids.append(3)
    assert new.state is State.WAITING and new.pages == [] and s.waiting[0] is new
    assert plan.decode == [old] and plan.freed_slots == [1]
    # The preempted sequence is recomputed from its prompt plus what it already produced.
    assert new.tokens() == new.req.prompt_ids + new.req.output_ids


def test_allocator_refuses_double_release_and_over_allocation():
    pool = PageAllocator(3)
    pages = pool.alloc(2)
    pool.share(pages[:1])
    pool.release(pages)
    assert pool.free_count == 2 and pool.refs(pages[0]) == 1
    pool.release(pages[:1])
    with pytest.raises(ValueError, match="released more times"):
        pool.release(pages[:1])
    with pytest.raises(OutOfPages):
        pool.alloc(4)
