"""Admission and request validation (issue 20): the queue limit counts only requests waiting beyond
the free slots (defect 6), and sampling fields are refused quoting the limit that applies (defect
15). The real scheduler and runner over the mock engine; nothing compiles."""

from __future__ import annotations

import time

import pytest
from serving import mock_llm
from test_scheduler import make, sched

from xlaserve import SamplingParams
from xlaserve.runtime.admission import Limits, Overloaded
from xlaserve.runtime.engine_loop import EngineLoop
from xlaserve.runtime.sampling import SamplingState

QUEUE_2 = Limits(max_prompt_tokens=31, max_new_tokens=31, max_model_len=32, max_queue=2)


def test_a_burst_on_an_idle_engine_takes_every_free_slot_then_the_queue():
    """max_queue=2 on an idle 8-slot engine: a burst of 8 all get a slot (they were refused from the
    third on), 2 more may wait, the 11th is refused, naming how many wait."""
    s = sched(max_slots=8, num_pages=64, limits=QUEUE_2)
    seqs = [s.add(make(2, float(i), first=10 * i + 1)) for i in range(10)]
    with pytest.raises(Overloaded, match=r"the queue is full \(2 requests waiting\)") as e:
        s.add(make(2, 10.0))
    assert (e.value.limit, e.value.value) == ("max_queue", 3)
    s.plan()
    assert [q.slot for q in seqs[:8]] == list(range(8)) and s.waiting == seqs[8:]
    with pytest.raises(Overloaded, match="the queue is full"):  # still two waiting, no free slot
        s.add(make(2, 11.0))


def test_burst_and_score_through_the_api_and_the_engine_loop():
    llm = mock_llm(max_slots=8, max_queue=2)
    outs = llm.generate([f"w{10 * i}" for i in range(8)], SamplingParams(max_tokens=2))
    assert [o.token_ids for o in outs] == [[10 * i + 1, 10 * i + 2] for i in range(8)]
    scores = llm.score([("w1", "w2"), ("w5", "w6"), ("w7", "w9")])  # a 3-item Score was refused
    assert [r.all_greedy for r in scores] == [True, True, False]
    slow = mock_llm(step_s=0.01, max_slots=8, max_queue=2)
    loop, long = EngineLoop(slow.runner), SamplingParams(max_tokens=200)
    try:  # the server's path: each request admitted from its own call, whenever the loop steps
        streams = [loop.submit(slow.make_request(f"w{i}", long)) for i in range(10)]
        with pytest.raises(Overloaded, match=r"the queue is full \(2 requests waiting\)"):
            loop.submit(slow.make_request("w1", long))
        assert next(iter(streams[7])).token_ids == [8]  # the eighth of the burst has a slot
    finally:
        loop.close()


def test_a_burst_to_an_idle_engine_loop_goes_in_one_step():
    """Requests that reach an idle engine a few ms apart (a server's event loop parsing a burst)
    are planned together: the engine thread waits until none has arrived for settle_s. They used to
    be planned one step for the first and another for the rest."""
    llm = mock_llm(max_slots=8)
    planned, plan = [], llm.runner.scheduler.plan
    llm.runner.scheduler.plan = lambda: (p := plan(), p.prefills and planned.append(len(p.prefills)))[0]
    loop = EngineLoop(llm.runner, settle_s=0.05, settle_max_s=1.0)
    try:
        streams = []
        for i in range(4):
            streams.append(loop.submit_nowait(llm.make_request(f"w{10 * i}", SamplingParams(max_tokens=2))))
            time.sleep(0.005)
        assert [[d.token_ids for d in s_] for s_ in streams] == [
            [[10 * i + 1], [10 * i + 2]] for i in range(4)
        ]
    finally:
        loop.close()
    assert planned == [4]


def test_top_k_minus_one_means_disabled_and_other_negatives_are_refused():
    assert SamplingState.of(SamplingParams(top_k=-1), 0).top_k[0] == 0  # as top_k=0: no filter
    with pytest.raises(ValueError) as e:
        SamplingParams(top_k=-5)
    assert str(e.value) == "top_k=-5 must be an integer in [-1, 2147483647] (0 or -1: no top-k filter)"


def test_sampling_refusals_quote_the_engine_limits():
    llm = mock_llm()  # vocabulary 512, max_logprobs 20
    for fields, message in [
        (dict(logprobs=500), "logprobs=500 exceeds max_logprobs=20 (an integer in [0, 20])"),
        (dict(logprobs=21), "logprobs=21 exceeds max_logprobs=20"),
        (
            dict(stop_token_ids=(3, 2**31 + 1)),
            "stop_token_ids contains 2147483649, out of range [0, 512) (the model's vocabulary size)",
        ),
        (dict(stop_token_ids=(600,)), "stop_token_ids contains 600, out of range [0, 512)"),
    ]:
        with pytest.raises(ValueError) as e:
            llm.sampling_params(**fields)
        assert message in str(e.value) and "[0, 100]" not in str(e.value), str(e.value)
        assert "2147483648" not in str(e.value)
    with pytest.raises(ValueError, match=r"out of range \[0, 512\) \(the model's vocabulary size\)"):
        llm.make_request("w1", SamplingParams(stop_token_ids=(2**31 + 1,)))
    assert llm.sampling_params(logprobs=20, stop_token_ids=(511,)).logprobs == 20
    with pytest.raises(ValueError, match=r"stop_token_ids\[0\]=-3 must be a token id"):
        SamplingParams(stop_token_ids=(-3,))
