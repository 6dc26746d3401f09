"""The slot manager alone (plain Python; nothing compiles): chunked prefill under a token budget,
lazy pages, continuous batching, priorities, admission limits, the prefix cache, preemption, and a
property test over random event sequences."""

from __future__ import annotations

import contextlib
import dataclasses
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xlaserve.runtime.admission import Limits, Overloaded, RequestTooLarge
from xlaserve.runtime.pages import OutOfPages, PageAllocator, chain_hash
from xlaserve.runtime.prefill_calls import Packed
from xlaserve.runtime.request import FinishReason, Request, Timings
from xlaserve.runtime.sampling_params import SamplingParams
from xlaserve.runtime.scheduler import Scheduler
from xlaserve.runtime.sequence import Chunk, State
from xlaserve.runtime.stats import EngineStats

PAGE = 4
LIMITS = Limits(max_prompt_tokens=31, max_new_tokens=31, max_model_len=32, max_queue=100)


def make(
    n_prompt: int, t: float = 0.0, *, rid=None, first=1, priority=0, client=None, max_tokens=4, deadline=None
) -> Request:
    return Request(
        rid or f"r{t}-{first}",
        list(range(first, first + n_prompt)),
        SamplingParams(max_tokens=max_tokens),
        0,
        frozenset({0}),
        Timings(arrival=t),
        priority=priority,
        client_id=client,
        deadline=deadline,
    )


def sched(**kw) -> Scheduler:
    args = dict(
        max_slots=2, page_size=PAGE, pages_per_seq=8, num_pages=16, decode_steps=1, chunk=8, limits=LIMITS
    )
    return Scheduler(**{**args, **kw})


def execute(s: Scheduler, plan):
    """Carry out a plan as the runner does, with the results read at once: each last chunk samples
    one token, each decode dispatch one token per sequence; a mixed step's running sequences go as
    one-token chunks, sampling one token each."""
    for seq in plan.mixed:
        s.prefilled(Chunk(seq, seq.length, seq.tokens()[-1:]))
        seq.req.output_ids.append(5)
        s.decoded(seq)
    for chunk in plan.prefills:
        s.prefilled(chunk)
        if chunk.last:
            chunk.seq.req.output_ids.append(99)
    s.dispatched(plan.decode)
    for seq in plan.decode:
        seq.req.output_ids.append(5)
        s.decoded(seq)


def test_long_prompt_is_chunked_under_the_budget_and_decode_continues():
    s = sched(token_budget=8)
    a = s.add(make(3, 0.0))
    plan = s.plan()
    execute(s, plan)
    assert [len(c.tokens) for c in plan.prefills] == [3] and a.state is State.RUNNING
    b = s.add(make(20, 1.0))
    sizes = []
    while b.state is not State.RUNNING:
        plan = s.plan()
        assert sum(len(c.tokens) for c in plan.prefills) <= 8
        assert plan.decode == [a]  # the running stream keeps decoding every step
        sizes += [len(c.tokens) for c in plan.prefills]
        execute(s, plan)
    assert sizes == [8, 8, 4]
    assert len(b.pages) == 5  # ceil(20 / 4)


def test_pages_follow_length_and_return_on_finish():
    s = sched(prefix_cache=False)
    seq = s.add(make(6))
    execute(s, s.plan())
    assert len(seq.pages) == 2 and s.pages.free_count == 14
    for _ in range(3):
        plan = s.plan()  # decode of positions 6, 7, 8: the third needs a third page
        assert plan.decode == [seq] and plan.kv_tokens == seq.length + 1
        execute(s, plan)
    assert len(seq.pages) == 3 and list(s.page_table[seq.slot, :3]) == seq.pages
    seq.req.finish(FinishReason.EOS)
    s.finish(seq)
    assert s.pages.free_count == 16 and s.slots == [None, None] and not s.busy


def test_inflight_dispatches_get_pages_ahead():
    s = sched(decode_steps=2)
    seq = s.add(make(3))
    execute(s, s.plan())  # length 3, next input at position 3
    plan = s.plan()
    s.dispatched(plan.decode)  # in flight: positions 3, 4
    plan = s.plan()  # the next dispatch writes 5, 6 before the host has seen 3, 4
    assert plan.kv_tokens == 3 + 2 + 2 and len(seq.pages) == 2


def test_continuous_batching_refills_a_freed_slot():
    s = sched(max_slots=1)
    first, second = s.add(make(2, 0.0)), s.add(make(2, 1.0, first=50))
    execute(s, s.plan())
    assert first.state is State.RUNNING and second.state is State.WAITING
    s.finish(first)
    plan = s.plan()
    assert second.state is State.PREFILL and plan.prefills[0].seq is second


def test_priority_then_arrival_order():
    s = sched(max_slots=1)
    running = s.add(make(2, 0.0))
    execute(s, s.plan())
    low, high, high_later = (
        s.add(make(2, 1.0)),
        s.add(make(2, 2.0, priority=5)),
        s.add(make(2, 3.0, priority=5)),
    )
    assert s.waiting == [high, high_later, low]
    s.finish(running)
    s.plan()
    assert s.slots[0] is high


def test_admission_limits_name_the_limit_and_the_value():
    s = sched(
        limits=Limits(max_prompt_tokens=10, max_new_tokens=8, max_model_len=16, max_queue=2, max_per_client=1)
    )
    with pytest.raises(RequestTooLarge, match="prompt has 11 tokens; the limit is 10") as e:
        s.add(make(11))
    assert (e.value.limit, e.value.value) == ("max_prompt_tokens", 11)
    with pytest.raises(RequestTooLarge, match="max_tokens=9 exceeds the limit of 8"):
        s.add(make(3, max_tokens=9))
    with pytest.raises(
        RequestTooLarge, match=r"prompt \(10 tokens\) \+ max_tokens \(8\) = 18 exceeds the context of 16"
    ):
        s.add(make(10, max_tokens=8))
    s.add(make(2, 0.0, client="a"))
    with pytest.raises(Overloaded, match="client 'a' already has 1 requests in flight; the limit is 1"):
        s.add(make(2, 1.0, client="a"))
    s.add(make(2, 2.0, client="b"))
    # a and b take the two free slots at the next step, so they are not waiting beyond the slots
    # (issue 20, defect 6): step once, then fill the queue.
    s.plan()
    s.add(make(2, 2.5, first=20)), s.add(make(2, 2.6, first=30))
    with pytest.raises(Overloaded, match="the queue is full") as e:
        s.add(make(2, 3.0))
    assert e.value.limit == "max_queue" and len(s.waiting) == 2


def test_prefix_cache_maps_published_pages_and_never_the_last_token():
    s = sched(max_slots=1)
    a = s.add(make(10, 0.0))  # pages [1..4], [5..8] full; [9, 10] partial
    execute(s, s.plan())
    execute(s, s.plan())  # (chunks of 8 tokens)
    a_pages = list(a.pages)
    s.finish(a)
    assert s.pages.cached_count == 3  # the two full pages stay cached, and the partial one as a tail
    b = s.add(make(9, 1.0))  # shares the first 8 tokens; must still compute token 9
    plan = s.plan()
    assert b.pages[:2] == a_pages[:2] and plan.prefills[0].start == 8 and b.req.cached_tokens == 8
    assert plan.copies == []
    s.finish(b)
    c = s.add(make(8, 2.0))  # all 8 tokens cached: the last page is recomputed for the last logits...
    plan = s.plan()
    # ... from a copy of page [5..8], of which it keeps 5, 6, 7
    assert plan.copies == [(a_pages[1], c.pages[1])] and c.pages[1] != a_pages[1]
    assert plan.prefills[0].start == 7 and c.req.cached_tokens == 7
    assert s.stats().prefill_tokens_saved == 15 and s.stats().prefix_hit_rate == 15 / 27
    s.pages.check()


def test_a_finished_sequences_partial_page_is_copied_for_a_prompt_that_continues_it():
    """A chat's next turn: the prompt is the last turn's prompt and answer and more. The last turn's
    partly filled page (a tail) gives its K/V to a copy; whole pages are mapped as before."""
    s = sched(max_slots=1)
    a = s.add(make(9, 0.0))  # [1..4] [5..8] [9, then its answer]
    for _ in range(3):  # chunks of 8 and 1 tokens (first output 99), a decode (99's K/V, then 5)
        execute(s, s.plan())
    assert a.req.output_ids == [99, 5]
    tail = a.pages[2]
    s.finish(a)  # length 10: the cache holds 1..9, 99
    s.pages.check()
    turn = s.add(make(1, 1.0, rid="turn2"))
    turn.req.prompt_ids = [*range(1, 10), 99, 5, 42, 43]  # its answer and a new message
    plan = s.plan()
    assert plan.copies == [(tail, turn.pages[2])] and plan.prefills[0].start == 10
    assert turn.req.cached_tokens == 10
    execute(s, plan)
    s.pages.check()
    assert s.pages.refs(tail) == 0 and s.pages.cached_count == 1  # the tail, cached again, unheld


def test_longest_prefers_the_page_sharing_the_most_tokens_after_the_same_prefix():
    pool = PageAllocator(8)
    first, other, second = pool.alloc(3)
    h = chain_hash(None, [1, 2, 3, 4])
    pool.publish(first, h, [1, 2, 3, 4], None)
    pool.publish(other, chain_hash(h, [5, 6, 7, 8]), [5, 6, 7, 8], h)
    pool.publish_tail(second, [5, 6, 9], h)  # a tail after the same page
    assert pool.longest(h, [5, 6, 9, 9]) == (second, 3)
    assert pool.longest(h, [5, 6, 7, 1]) == (other, 3)
    assert pool.longest(h, [5, 1]) in ((other, 1), (second, 1)) and pool.longest(h, [6]) == (None, 0)
    assert pool.longest(None, [5, 6]) == (None, 0)  # another prefix: nothing
    pool.release([first, other, second])
    pool.check()
    pool.alloc(8)  # evicts all three: none is found any more
    assert pool.longest(h, [5, 6, 9]) == (None, 0) and pool.lookup(h, [1, 2, 3, 4]) is None
    pool.check()


def test_longest_finds_the_most_shared_tokens_among_many_pages_with_one_first_token():
    # an eval's questions all start alike: the match is found among hundreds of such pages
    rng = np.random.default_rng(0)
    pool = PageAllocator(400)
    h = chain_hash(None, [9, 9])
    held = {}
    for page in pool.alloc(400):
        tokens = [7, *rng.integers(0, 3, int(rng.integers(1, 8)))]
        if page % 3:
            pool.publish(page, chain_hash(h, tokens), tokens, h)
        else:
            pool.publish_tail(page, tokens, h)
        held[page] = tokens

    def shared(a, b):
        return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))

    for _ in range(300):
        want = [int(t) for t in rng.integers(0, 3, int(rng.integers(1, 9)))]
        want[0] = 7 if rng.random() < 0.9 else 1
        page, n = pool.longest(h, want)
        best = max(shared(t, want) for t in held.values())
        assert n == best and (page is None) == (best == 0)
        if page is not None:
            assert shared(held[page], want) == n
    pool.check()


def test_unheld_tails_are_evicted_before_full_pages():
    pool = PageAllocator(2)
    full, tail = pool.alloc(2)
    pool.publish(full, chain_hash(None, [1, 2]), [1, 2], None)
    pool.publish_tail(tail, [7], None)
    pool.release([full])
    pool.release([tail])  # released last, yet first out: a tail is a few tokens, not a page of them
    assert pool.alloc(1) == [tail] and pool.lookup(chain_hash(None, [1, 2]), [1, 2]) == full
    pool.check()


def test_lookup_checks_tokens_not_only_hashes():
    pool = PageAllocator(4)
    (p,) = pool.alloc(1)
    h = chain_hash(None, [1, 2])
    pool.publish(p, h, [1, 2], None)
    assert pool.lookup(h, [1, 2]) == p and pool.lookup(h, [1, 3]) is None


def test_dry_pool_preempts_lowest_priority_then_newest_and_requeues_it():
    s = sched(num_pages=8, pages_per_seq=8, prefix_cache=False)
    old = s.add(make(12, 0.0, priority=1))
    new = s.add(make(12, 1.0, first=100))
    while new.state is not State.RUNNING or old.state is not State.RUNNING:
        execute(s, s.plan())
    while s.preemptions == 0:  # both grow until the pool cannot hold them
        plan = s.plan()
        execute(s, plan)
    assert new.state is State.WAITING and new.pages == [] and s.waiting[0] is new
    assert plan.decode == [old] and plan.freed_slots == [1]
    # It is recomputed from its prompt plus what it already produced.
    assert new.tokens() == new.req.prompt_ids + new.req.output_ids


def test_expired_lists_waiting_and_running():
    s = sched(max_slots=1)
    a, b = s.add(make(2, 0.0, deadline=5.0)), s.add(make(2, 1.0, deadline=9.0))
    s.plan()
    assert s.expired(4.0) == [] and s.expired(6.0) == [a] and set(s.expired(10.0)) == {a, b}


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


# -- property test: random event sequences keep every invariant ------------------------------------

EVENTS = st.lists(
    st.one_of(
        # (submit, prompt tokens of its own, shared leading tokens, priority, max_tokens)
        st.tuples(
            st.just("submit"),
            st.integers(1, 12),
            st.sampled_from([0, 6, 8, 11, 12, 12]),
            st.integers(0, 2),
            st.integers(1, 16),
        ),
        # (continue, which ended request, tokens of its own): a chat's next turn, that request's
        # prompt and output then more
        st.tuples(st.just("continue"), st.integers(0, 30), st.integers(1, 6)),
        st.tuples(st.just("steps"), st.integers(1, 8)),
        st.tuples(st.just("cancel"), st.integers(0, 30)),
    ),
    min_size=10,
    max_size=60,
)
REACHED = {"preempted": 0, "evicted": 0, "prefix hit": 0, "copied": 0, "slid": 0, "mixed": 0}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(
    events=EVENTS,
    pages=st.integers(8, 14),
    steps=st.integers(1, 3),
    cache=st.booleans(),
    window=st.sampled_from([None, 5, 9]),
    packed=st.booleans(),
)
def test_random_events_keep_pages_and_requests_consistent(events, pages, steps, cache, window, packed):
    limits = Limits(max_prompt_tokens=24, max_new_tokens=16, max_model_len=32, max_queue=6)
    s = Scheduler(
        max_slots=3,
        page_size=PAGE,
        pages_per_seq=8,
        num_pages=pages,
        decode_steps=steps,
        chunk=8,
        limits=limits,
        prefix_cache=cache,
        window=window,
        # packed prefill calls; with one decode step a step, mixed steps
        calls=Packed(None, (4, 8), 3) if packed else None,
        mix=packed and steps == 1,
    )
    seqs, ended, slid, copied, mixed = [], [], False, 0, 0

    def end(seq):
        assert seq.state is not State.DONE, "a request ended twice"
        s.finish(seq)
        ended.append(seq)

    for n, event in enumerate(events):
        if event[0] in ("submit", "continue"):
            if event[0] == "submit":
                _, own, shared, priority, max_tokens = event
                # prompts share 0..12 leading tokens (whole pages or not) so the prefix cache is exercised
                prompt = list(range(1, 1 + shared))
            elif ended:
                _, which, own = event
                base = ended[which % len(ended)].req
                prompt, priority, max_tokens = (base.prompt_ids + base.output_ids)[: 24 - own], 0, 4
            else:
                continue
            prompt += list(range(1000 + 100 * n, 1000 + 100 * n + own))
            req = Request(
                f"q{n}",
                prompt,
                SamplingParams(max_tokens=max_tokens),
                0,
                frozenset({0}),
                Timings(arrival=float(n)),
                priority=priority,
            )
            with contextlib.suppress(Overloaded, RequestTooLarge):
                seqs.append(s.add(req))
        elif event[0] == "steps":
            for _ in range(event[1]):
                plan = s.plan()
                assert len(set(plan.freed_slots)) == len(plan.freed_slots)
                # a copy's destination is a page of its sequence's own, never shared (its sequence may
                # have been preempted in the same plan: the copy still runs first, harmlessly)
                dst = [d for _, d in plan.copies]
                assert len(set(dst)) == len(dst) and all(s.pages.refs(d) <= 1 for d in dst)
                assert all(src != d for src, d in plan.copies)
                copied += len(plan.copies)
                mixed += bool(plan.mixed)
                assert not (plan.mixed and plan.decode)
                execute(s, plan)
                for seq in plan.decode + plan.mixed:
                    if len(seq.req.output_ids) >= seq.req.params.max_tokens and seq.state is not State.DONE:
                        end(seq)
        else:
            live = [q for q in seqs if q.state is not State.DONE]
            if live:
                end(live[event[1] % len(live)])
        # invariants after every event
        s.pages.check()
        live = [q for q in seqs if q.state is not State.DONE]
        held = {q: q.pages[q.dropped :] for q in live}  # pages below a window went back
        for p in range(pages):
            assert s.pages.refs(p) == sum(held[q].count(p) for q in live), f"page {p} refcount"
        for q in live:
            assert len(set(held[q])) == len(held[q])
            if q.slot is not None:
                row = list(s.page_table[q.slot, : len(q.pages)])
                assert s.slots[q.slot] is q and row[q.dropped :] == held[q]
                assert q.dropped * PAGE <= max(0, q.length - window + 1) if window else q.dropped == 0
                slid |= q.dropped > 0
            else:
                assert q.state is State.WAITING and q.pages == [] and q in s.waiting
        assert sorted(s.waiting, key=lambda q: q.rank) == s.waiting
    REACHED["preempted"] += s.preemptions > 0
    REACHED["evicted"] += s.pages.evictions > 0
    REACHED["prefix hit"] += s.cached_tokens > 0
    REACHED["copied"] += copied > 0
    REACHED["slid"] += slid
    REACHED["mixed"] += mixed > 0
    for q in [q for q in seqs if q.state is not State.DONE]:
        end(q)
    s.pages.check()
    assert s.pages.used_count == 0 and not s.busy
    assert sorted(map(id, ended)) == sorted(map(id, seqs)), "every request ends exactly once"


def test_property_test_reaches_preemption_eviction_prefix_hits_and_copies():
    """Guards the property test above against generating only easy cases."""
    if not any(REACHED.values()):  # run alone: run the property test first
        test_random_events_keep_pages_and_requests_consistent()
    assert all(count >= 20 for count in REACHED.values()), REACHED


def test_replicas_stats_add_up():
    """Two schedulers' snapshots added the way data-parallel replicas add theirs: counts sum, the hit
    rate is recomputed from the summed tokens, finished requests sum per reason."""
    a, b = sched(), sched()
    first = a.add(make(10, 0.0))
    execute(a, a.plan())
    a.finish(first)
    a.add(make(9, 1.0))  # its first 8 tokens hit the prefix cache
    a.plan()
    b.add(make(3, 0.0))
    b.plan()
    sa = dataclasses.replace(a.stats(), requests_finished={"eos": 1, "stop": 0}, draining=True)
    sb = dataclasses.replace(b.stats(), requests_finished={"eos": 2, "stop": 3})
    total = EngineStats.total([sa, sb])
    assert total.slots_total == 4 and total.slots_busy == 2 and total.pages_total == 32
    assert total.replicas == 2 and total.draining and total.requests_finished == {"eos": 3, "stop": 3}
    assert (total.prompt_tokens, total.prefill_tokens_saved) == (22, 8) and total.prefix_hit_rate == 8 / 22
    assert EngineStats().prefix_hit_rate == 0.0


def test_host_modules_do_not_import_jax():
    """The scheduler, requests and sampling parameters are plain Python: importing them starts no JAX."""
    code = (
        "import sys; import xlaserve.runtime.scheduler, xlaserve.runtime.request, "
        "xlaserve.runtime.sampling_params, xlaserve.runtime.admission, xlaserve.runtime.stats, "
        "xlaserve.runtime.scoring; "
        "assert 'jax' not in sys.modules, sorted(m for m in sys.modules if m.startswith('jax'))"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_pages_below_every_layers_window_go_back_to_the_pool(prefix_cache):
    """A model whose layers all slide (Mistral, Phi-3): a running sequence holds only the pages its
    next query's window can reach; the rest return to the pool (published ones stay findable in
    the prefix cache), so two long sequences fit a pool that holds one without the window."""
    window = 6
    s = sched(window=window, num_pages=8, prefix_cache=prefix_cache)
    a, b = s.add(make(5, 0.0, max_tokens=26)), s.add(make(5, 1.0, first=50, max_tokens=26))
    while a.req.output_ids == [] or len(a.req.output_ids) < 26:
        execute(s, s.plan())
        for seq in (a, b):
            held = seq.pages[seq.dropped :]
            # the pages kept cover every position the next query sees: > length - window
            assert seq.dropped * PAGE <= max(0, seq.length - window + 1)
            assert all(s.pages.refs(p) > 0 for p in held)
            assert (s.page_table[seq.slot, : seq.dropped] == 0).all()
            assert len(held) <= -(-window // PAGE) + 2
        s.pages.check()
    assert s.preemptions == 0 and a.dropped > 0
    for seq in (a, b):
        s.finish(seq)
    s.pages.check()
    assert s.pages.free_count == 8


def test_a_prompt_being_prefilled_never_preempts_a_running_stream():
    """Pages go to running streams first: when the pool runs dry, the prompt mid-prefill (later in
    line) gives its pages back, not the stream (which used to thrash: each recomputing the other)."""
    s = sched(num_pages=8, chunk=4, token_budget=4)
    a = s.add(make(4, 0.0, max_tokens=24))
    execute(s, s.plan())
    b = s.add(make(24, 1.0, first=50))
    for _ in range(24):
        execute(s, s.plan())
        assert a.state is State.RUNNING
        s.pages.check()
    assert s.preemptions >= 1 and b.state is not State.RUNNING and len(a.req.output_ids) == 25


def test_no_decode_is_dispatched_when_the_tokens_in_flight_end_every_sequence():
    """The runner plans a step before reading the last dispatch. When its tokens take every running
    sequence to max_tokens (or max_model_len), another dispatch would only compute tokens nobody
    reads, and the next step's prompts would wait for it (8 clients whose requests end together
    send their next ones during it)."""
    s = sched(max_slots=2)
    a, b = s.add(make(4, 0.0, max_tokens=2)), s.add(make(4, 1.0, first=50, max_tokens=5))
    execute(s, s.plan())  # both prefilled, one token each
    plan = s.plan()
    assert plan.decode == [a, b]
    s.dispatched(plan.decode)  # in flight: a's last token, b's second
    assert s.plan().decode == [a, b]  # b goes on (a's row is computed and dropped, as before)
    s.finish(b)
    assert s.plan().decode == []  # only a is left and its last token is in flight
    a.req.output_ids.append(7)
    s.decoded(a)  # read: a has its 2 tokens (the runner then ends it)
    assert a.inflight == 0 and s.plan().decode == [a]  # nothing in flight: not for the scheduler to end
