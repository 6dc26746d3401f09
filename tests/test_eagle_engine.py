"""Speculative decoding with an EAGLE-style draft head (runtime/spec_runner.py `EagleProposer`) on a
tiny random Llama target: greedy output with the head is token for token (and log-prob for log-prob)
plain decoding's, with guesses made, for several prompt sets and batch sizes (windows of 1 and 3);
the states the engine's decode and verify programs return (and the proposer keeps) are
`draft_features.features` at the same positions; an engine without a head compiles programs without
that output; `LLM(speculative={"method": "eagle", ...})` and the CLI refuse a missing head, a head
trained for another model and flags that do not go together, naming the field."""

from __future__ import annotations

import argparse
import dataclasses

import jax
import numpy as np
import pytest
from serving import mock_tokenizer
from test_speculative_draft import ENGINE as DRAFT_ENGINE
from test_speculative_draft import assert_same, weights
from tiny_gguf import tokenizer_meta, write_tiny_gguf

from xlaserve import LLM
from xlaserve.checkpoints import draft_head as head_files
from xlaserve.cli.common import add_engine_args, engine_kwargs
from xlaserve.runtime import draft_features, draft_head
from xlaserve.runtime.engine import Engine, to_host
from xlaserve.runtime.models.presets import PRESETS
from xlaserve.runtime.results import Sampled
from xlaserve.runtime.sampling import SamplingState
from xlaserve.runtime.sampling_params import SamplingParams
from xlaserve.runtime.spec_policy import resolve_schedule, speculative_fields
from xlaserve.runtime.spec_runner import EagleProposer

CFG = PRESETS["tiny"]
# test_speculative_draft's engine (every greedy sequence guesses every step) with both slot buckets
ENGINE = dataclasses.replace(DRAFT_ENGINE, slot_buckets=(1, 3), max_logprobs=2)
PROMPTS = [
    [5, 6, 7, 8] * 3,
    [42, 17, 17, 400, 3, 250, 88, 12, 5, 61],
    [5, 9, 100, 7, 300, 21, 9],
    [9, 9, 9, 9, 9],
    [(31 * i) % 500 + 1 for i in range(21)],  # over two prefill chunks of 16
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=1)
# sampled, its guesses kept by rejection sampling; top_k=1 makes its law greedy's one token
SAMPLED = SamplingParams(temperature=0.9, top_k=1, max_tokens=12, ignore_eos=True, seed=3)


@pytest.fixture(scope="module")
def target():
    return Engine(CFG, weights(CFG, 1), ENGINE, features=True)


@pytest.fixture(scope="module", params=[1, 3])
def eagle_llm(request, target):
    engine = target
    for slot in range(ENGINE.max_slots):
        engine.free(slot)
    head = draft_head.Head(draft_head.init_params(CFG, seed=2), window=request.param)
    return LLM.from_engine(engine, mock_tokenizer(CFG.vocab_size), draft=head)


def windows_seen(llm, monkeypatch) -> list:
    """Every window a propose call read, for each guessing row: (its sequence, position of the
    newest token, states [n, D], tokens [n])."""
    proposer = llm.runner.spec.proposer
    assert isinstance(proposer, EagleProposer)
    seen, guesses = [], proposer.guesses

    def spy(rows):
        for seq, _ in rows:
            s, n = seq.slot, int(proposer.count[seq.slot])
            if proposer.ready(seq):
                w = proposer.tokens.shape[1]
                seen.append(
                    (
                        seq,
                        len(seq.tokens()) - 1,
                        proposer.feats[s, w - n :].copy(),
                        proposer.tokens[s, w - n :].copy(),
                    )
                )
        return guesses(rows)

    monkeypatch.setattr(proposer, "guesses", spy)
    return seen


@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_output_with_a_head_is_plain_decodings(eagle_llm, batch, monkeypatch):
    llm, spec = eagle_llm, eagle_llm.runner.spec
    prompts = PROMPTS[:batch] if batch == 1 else PROMPTS
    params = [GREEDY] * len(prompts)
    if batch > 1:
        params[2] = SAMPLED
    spec.on = False
    plain = llm.generate(prompts, params)
    spec.on = True
    seen = windows_seen(llm, monkeypatch)
    before = list(spec.guesses)
    fast = llm.generate(prompts, params)
    assert_same(plain, fast)
    made = spec.guesses[0] - before[0]
    assert made > 0 and seen
    assert all(out.speculative["proposed"] > 0 for out in fast)
    assert llm.stats().pages_used == 0
    # each window holds the target's own states before its final norm at its positions, and the
    # tokens after them: decode steps and the accepted positions of verify steps feed it
    by_id = {o.request_id: list(o.prompt_token_ids) + list(o.token_ids) for o in fast}
    for seq, newest, feats, tokens in seen:
        ids = by_id[seq.req.request_id]
        n = len(tokens)
        assert tokens.tolist() == ids[newest - n + 1 : newest + 1]
        ref = draft_features.features(
            jax.tree.map(np.asarray, weights(CFG, 1)),
            np.array([ids], np.int32),
            np.array([len(ids)], np.int32),
            cfg=CFG,
        )
        np.testing.assert_allclose(feats, np.asarray(ref[0, newest - n : newest]), rtol=1e-4, atol=1e-4)


def test_with_the_default_schedule_a_new_sequence_guesses_from_its_second_step(eagle_llm):
    """Its first step has no pairs yet: that step does not count as a failed guess (counted, its
    one token would keep a break-even above 1 (1.5 here, spec_policy.SCHEDULE) out of reach)."""
    engine = eagle_llm.engine
    policy = engine.ecfg
    engine.ecfg = dataclasses.replace(policy, speculative_schedule=resolve_schedule(None, 4))
    try:
        out = eagle_llm.generate([PROMPTS[1]], GREEDY)[0]
    finally:
        engine.ecfg = policy
    assert out.speculative["proposed"] > 0


@pytest.mark.slow  # two engines: ~30 s on the shared 2-core machine
def test_decode_and_verify_return_the_features_of_every_position_run():
    """On an engine of its own (its pages are not the LLM tests' prefix cache): one prompt, one
    decode step, one verify step of 4 guesses; each program's states against the reference over the
    sequence it ran (a rejected guess's state is that of the guessed sequence: causal attention)."""
    w = weights(CFG, 1)
    ecfg = dataclasses.replace(ENGINE, slot_buckets=(1,))
    with_features, plain = Engine(CFG, w, ecfg, features=True), Engine(CFG, w, ecfg)
    ids = PROMPTS[1]
    table = np.zeros((ecfg.max_slots, with_features.ecfg.pages_per_seq), np.int32)
    table[0] = np.arange(table.shape[1])
    sampling, presence = SamplingState.of(GREEDY, 0), np.zeros((CFG.vocab_size,), bool)
    guesses = np.zeros((ecfg.max_slots, 4), np.int32)
    guesses[0] = [7, 300, 21, 9]
    n = np.array([4, 0, 0], np.int32)
    got = {}
    for name, engine in (("features", with_features), ("plain", plain)):
        packed = engine.prefill(ids, 0, table[0], sampling, presence)
        engine.insert(0, packed, len(ids), sampling, presence)
        first = int(Sampled.unpack(to_host(packed)).tokens[0])
        out = engine.decode(table, len(ids) + 1, 1)
        packed, feats = out if name == "features" else (out, None)
        second = int(Sampled.unpack(to_host(packed)).tokens[0, 0])
        result = engine.verify(table, len(ids) + 6, guesses, n, 1)
        got[name] = (first, second, feats, result)
        engine.free(0)
    first, second, feats, result = got["features"]
    assert got["plain"][:2] == (first, second) and got["plain"][3].features is None
    np.testing.assert_array_equal(got["plain"][3].sampled.tokens, result.sampled.tokens)
    seq = [*ids, first, second, *guesses[0].tolist()]
    host = jax.tree.map(np.asarray, w)
    ref = np.asarray(draft_features.features(host, np.array([seq]), np.array([len(seq)]), cfg=CFG))[0]
    length = len(ids)
    assert feats.shape == (1, 1, CFG.hidden_size)  # [steps, rows, D]
    np.testing.assert_allclose(np.asarray(feats)[0, 0], ref[length], rtol=1e-4, atol=1e-4)
    assert result.features.shape == (1, 5, CFG.hidden_size)  # [rows, K+1, D]
    np.testing.assert_allclose(result.features[0], ref[length + 1 : length + 6], rtol=1e-4, atol=1e-4)


def test_a_head_for_another_model_or_none_is_refused_at_start_up(model_path, tmp_path):
    meta = tokenizer_meta(model_path, vocab=512)
    write_tiny_gguf(tmp_path / "target.gguf", meta, "F32")
    target = str(tmp_path / "target.gguf")
    missing = tmp_path / "no-head"
    with pytest.raises(ValueError, match=f"speculative head='{missing}': .*draft_head.json is missing"):
        LLM(target, speculative={"method": "eagle", "head": str(missing)}, max_slots=1)
    other = tmp_path / "other-head"  # trained for the random tiny Llama, not this file's weights
    cfg = dataclasses.replace(CFG, name="tiny-other")
    head_files.save(other, draft_head.init_params(cfg), head_files.fingerprint(cfg, weights(cfg, 1)), {})
    with pytest.raises(ValueError, match=f"speculative head='{other}': .*trained for model 'tiny-other'"):
        LLM(target, speculative={"method": "eagle", "head": str(other)}, max_slots=1)
    for bad, why in (
        ({"method": "eagle"}, "'head' .* goes with method 'eagle' only"),
        ({"method": "ngram", "head": str(other)}, "'head' .* goes with method 'eagle' only"),
        ({"method": "eagle", "head": str(other), "num_speculative_tokens": 17}, "num_speculative_tokens=17"),
    ):
        with pytest.raises(ValueError, match=why):
            LLM(target, speculative=bad)


def test_cli_draft_head_flags():
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    parse = lambda *argv: engine_kwargs(parser.parse_args(list(argv)))
    spec = parse("--speculative", "eagle", "--draft-head", "/h", "--num-speculative-tokens", "3")
    assert spec["speculative"] == {"method": "eagle", "num_speculative_tokens": 3, "head": "/h"}
    for argv in (
        ("--speculative", "eagle"),
        ("--draft-head", "/h"),
        ("--speculative", "ngram", "--draft-head", "/h"),
    ):
        with pytest.raises(ValueError, match="--speculative eagle and --draft-head DIR go together"):
            parse(*argv)


def test_a_head_gets_the_eagle_schedule_unless_one_is_given():
    fields = {}
    assert (
        speculative_fields({"method": "eagle", "head": "/h", "num_speculative_tokens": 3}, fields, 16) is None
    )
    assert fields == {"speculative_k": (3,), "speculative_schedule": ((1, 3, 3.2),)}
    fields = {"speculative_schedule": ((2, 3),)}
    speculative_fields({"method": "eagle", "head": "/h"}, fields, 16)
    assert fields["speculative_schedule"] == ((2, 3),)
