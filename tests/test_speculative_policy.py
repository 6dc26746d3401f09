"""Speculation that is never slower than plain decoding (runtime/spec_policy.py), on the mock engine
(each token the previous + 1, so a prompt holding its continuation is guessed right and one whose
repeats are followed by other tokens is guessed wrong): a request's opt-out, K by batch size, and the
switch-off of a request whose guesses fail. The outputs never change."""

from __future__ import annotations

import pytest
from serving import mock_llm, start_http

from xlaserve.runtime.config import EngineConfig
from xlaserve.runtime.models.presets import PRESETS
from xlaserve.runtime.sampling_params import SamplingParams
from xlaserve.runtime.spec_policy import BACKOFF, WINDOW, SpecCounts, schedule_k

GREEDY = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)
RIGHT = [[*range(5, 100), *range(5, 10)], [*range(200, 300), 200, 201]]  # guessed right throughout
# Every three tokens t-2, t-1, t (t in 12..111) are followed by t + 50: the n-gram guesses after
# output t are t + 50, ..., the mock's t + 1, ...; no guess is ever right.
WRONG = [x for t in range(12, 112) for x in (t - 2, t - 1, t, t + 50)] + [8, 9, 10]
# As WRONG for even t only: after output t (even) the lookup on the tokens read matches, one token
# on (t-1, t, t+1) it does not.
MISS = [x for t in range(12, 112, 2) for x in (t - 2, t - 1, t, t + 300)] + [8, 9, 10]


def run(prompts, params, **engine):
    llm = mock_llm(**{"speculative_k": (4,), **engine})
    outs = llm.generate(prompts, params)
    return outs, llm


def test_a_request_that_opts_out_never_guesses():
    opt_out = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True, speculative=False)
    outs, _ = run(RIGHT, [GREEDY, opt_out])
    assert outs[0].speculative["accepted"] > 40
    assert outs[1].speculative == {"proposed": 0, "accepted": 0}
    plain, _ = run(RIGHT, GREEDY, speculative_k=())
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
    with pytest.raises(ValueError, match="speculative='no' must be a bool"):
        SamplingParams(speculative="no")


def test_batches_where_no_sequence_may_guess_stay_pipelined(monkeypatch):
    """A decode dispatch's tokens are read once the next dispatch is queued (runner.py), unless the
    batch needs them first to guess: only batches where some sequence may guess give that up."""
    from xlaserve.runtime.runner import Runner

    read, unpipelined = Runner._read_decode, []

    def reading(self, packed, members, feats=None):  # nothing else queued on the device while read
        unpipelined.append(self._inflight is None)
        return read(self, packed, members, feats)

    monkeypatch.setattr(Runner, "_read_decode", reading)
    opt_out = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True, speculative=False)
    sampled = SamplingParams(temperature=0.7, max_tokens=60, ignore_eos=True, seed=1)
    fresh = [[*range(5, 100)], [*range(200, 300)]]  # no repeats: decode dispatches only
    # opted out, or (n-gram) never `ready`: the last three tokens never occurred before, so the
    # lookup is not even tried on fresh tokens, greedy or sampled
    for params, engine in [(GREEDY, dict(speculative_k=())), (opt_out, {}), (GREEDY, {}), (sampled, {})]:
        unpipelined.clear()
        _, llm = run(fresh, params, **engine)
        assert sum(unpipelined) == 1 and llm.engine.verifies == 0  # the last read only
    # MISS: ready on the tokens read (their last three occurred before) every other token, but the
    # fresh lookup, one token on, finds nothing: each such step reads before dispatching and counts
    # as a one-token step, so after WINDOW of them the sequence stops for BACKOFF tokens, then
    # tries again (60 tokens: 2 * WINDOW + BACKOFF would pass the end); with a break-even of 1, never
    unpipelined.clear()
    (out,), llm = run([MISS], GREEDY, max_model_len=512)
    assert out.token_ids == list(range(11, 71)) and llm.engine.verifies == 0
    assert WINDOW <= sum(unpipelined) <= 2 * WINDOW
    unpipelined.clear()
    run([MISS], GREEDY, max_model_len=512, speculative_schedule=((8, 4, 1.0),))
    assert sum(unpipelined) >= 28


def test_http_takes_the_opt_out_and_checks_it():
    import openai

    http, client = start_http(mock_llm(speculative_k=(4,)))
    try:
        prompt = " ".join(f"w{i}" for i in RIGHT[0])
        for flag in (True, False):
            out = client.completions.create(
                model="mock", prompt=prompt, max_tokens=8, temperature=0, extra_body={"speculative": flag}
            )
            assert out.choices[0].text == " ".join(f"w{i}" for i in range(10, 18))
        with pytest.raises(openai.BadRequestError, match="speculative"):
            client.completions.create(
                model="mock", prompt=prompt, max_tokens=8, extra_body={"speculative": 3}
            )
    finally:
        http.stop()


def test_k_follows_the_batch_size_schedule():
    schedule = ((1, 4, 1.5), (4, 2, 3.0))
    assert schedule_k(schedule, 1) == (4, 1.5) and schedule_k(schedule, 3) == (2, 3.0)
    assert schedule_k(schedule, 5) == (0, 1.0)
    plain, plain_llm = run(RIGHT, GREEDY, speculative_k=())
    full, _ = run(RIGHT, GREEDY)
    # two sequences run together all along: a schedule that stops at one guesses nothing, and the
    # batch stays pipelined (as many dispatches as without speculation)
    off, llm = run(RIGHT, GREEDY, speculative_schedule=((1, 4),))
    assert llm.runner.spec.guesses == [0, 0] and llm.engine.verifies == 0
    assert llm.engine.dispatches == plain_llm.engine.dispatches
    # at two sequences K = 2: a verify step emits at most 3 tokens
    two, llm = run(RIGHT, GREEDY, speculative_schedule=((1, 4), (2, 2)))
    hist = llm.stats().speculative_emitted
    assert hist[3] > 0 and hist[4:] == (0, 0)
    # when one sequence is left it guesses 4 again
    outs, llm = run(RIGHT, [GREEDY, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)],
                    speculative_schedule=((1, 4), (2, 2)))  # fmt: skip
    assert llm.stats().speculative_emitted[5] > 0
    for outs in (full, off, two):
        assert [o.token_ids for o in outs] == [o.token_ids for o in plain]


def test_default_schedule_and_validation():
    tiny = PRESETS["tiny"]
    resolve = lambda **f: EngineConfig(max_model_len=64, prefill_buckets=(16,), **f).resolve(tiny, "cpu")
    assert resolve(speculative_k=(2, 4)).speculative_schedule == ((1, 4, 1.5), (8, 4, 3.0))
    assert resolve(speculative_k=(4,), speculative_schedule=((2, 3),)).speculative_schedule == ((2, 3, 1.5),)
    assert resolve().speculative_schedule == ()
    for bad in (((4, 2), (2, 2)), ((1, 5),), ((0, 1),), ((1, 4, 0.5),), ((1,),)):
        with pytest.raises(ValueError, match=r"speculative_schedule=.* must be"):
            resolve(speculative_k=(4,), speculative_schedule=bad)


def test_a_request_whose_guesses_fail_stops_guessing():
    params = SamplingParams(temperature=0.0, max_tokens=90, ignore_eos=True)
    (out,), llm = run([WRONG], params, max_model_len=512)
    assert out.token_ids == list(range(11, 101))
    assert out.speculative["accepted"] == 0
    # one verify step (no history yet: it gets a try) emits 1 token; from then on its expected
    # tokens are below break-even, so its guesses are not checked; WINDOW steps in, it stops for
    # BACKOFF tokens, tries once more, and stops for 2 * BACKOFF: past the end
    assert llm.engine.verifies == 2
    # with a break-even of 1 token a step it never stops: a verify call per token after the
    # prefill's, but the last (no guess may reach past max_tokens) and the first two (decode steps
    # dispatched while the tokens read end at 11: 9, 10, 11 never occurred before)
    (always,), llm = run([WRONG], params, max_model_len=512, speculative_schedule=((8, 4, 1.0),))
    assert always.token_ids == out.token_ids and llm.engine.verifies == 86


def test_counts_switch_off_below_break_even_and_back_on_after_backoff():
    c = SpecCounts()
    for _ in range(WINDOW - 1):
        c.record(4, 1, 10, break_even=1.4)
    assert c.guessing(10)
    c.record(4, 2, 10, break_even=1.4)  # 9 tokens in 8 steps: below 1.4 a step
    assert not c.guessing(10) and not c.guessing(10 + BACKOFF - 1) and c.guessing(10 + BACKOFF)
    assert c.as_dict() == {"proposed": 4 * WINDOW, "accepted": 1} and c.switched_off == 1
    # a step without a verify (a miss, or refused by the batch gate) does not lower what a verify
    # step is expected to emit: only verify steps do
    first = SpecCounts()
    first.record(0, 1, 10, break_even=1.4)
    assert first.expected(4) == 5.0
    first.record(4, 3, 11, break_even=1.4)
    assert first.expected(4) == 3.0
    good = SpecCounts()
    for _ in range(3 * WINDOW):
        good.record(4, 2, 10, break_even=1.4)  # 2 tokens a step: worth it
    assert good.guessing(10) and good.switched_off == 0


def test_a_batch_verifies_only_when_its_rows_make_up_for_the_cost():
    """One row guessing right (5 tokens a step) and one guessing wrong (1): 6 tokens a step pay
    for a verify step costing 2.5 decode steps a row (5 in all) but not one costing 3.5 (7); there
    the rows stop guessing (outputs unchanged)."""
    params = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)
    prompts = [RIGHT[0], WRONG]
    plain, _ = run(prompts, params, speculative_k=(), max_model_len=512)
    cheap, cheap_llm = run(prompts, params, max_model_len=512, speculative_schedule=((2, 4, 2.5),))
    dear, dear_llm = run(prompts, params, max_model_len=512, speculative_schedule=((2, 4, 3.5),))
    for outs in (cheap, dear):
        assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
    assert cheap[0].speculative["accepted"] > 40 and cheap_llm.engine.verifies > 10
    # the first step has no history (each row may try); after it, 5 + 1 < 3.5 * 2
    assert dear_llm.engine.verifies <= 3 and dear[0].speculative["accepted"] <= 3 * 4
