"""The verify program on a tiny random Llama: from the same prefilled slots, verify steps with right,
wrong, partly right and no guesses (K = 1 and 4) emit exactly what plain decode emits (greedy: the
same tokens, log-probs and top alternatives; sampled without guesses: the same draws), the slots'
lengths and tokens follow, an idle slot stays idle, guesses cross page boundaries, and padding
guesses write nothing (the pages past a slot's guesses are another slot's, live, here)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from xlaserve.runtime import lower, memory, models
from xlaserve.runtime.config import EngineConfig
from xlaserve.runtime.engine import Engine
from xlaserve.runtime.layout import Layout
from xlaserve.runtime.models import params
from xlaserve.runtime.models.presets import PRESETS
from xlaserve.runtime.results import Sampled
from xlaserve.runtime.sampling import SamplingState
from xlaserve.runtime.sampling_params import SamplingParams

CFG = PRESETS["tiny"]
# 4-token pages: a 5-token verify step always crosses one. Slot 1 stays idle between two busy ones.
ENGINE = EngineConfig(
    max_slots=3,
    page_size=4,
    max_model_len=64,
    attn_block=64,
    prefill_buckets=(16,),
    kv_buckets=(64,),
    slot_buckets=(1,),
    scoring=False,
    max_logprobs=3,
    speculative_k=(1, 4),
    speculative_schedule=((3, 4, 1.0),),  # every greedy sequence guesses every step
)
PROMPTS = {0: [5, 9, 100, 7, 300, 21, 9], 2: [42, 17, 17, 400, 3, 250, 88, 12, 5, 61]}
STEPS = 40  # tokens each slot emits in the reference run
GREEDY = {
    0: SamplingParams(temperature=0.0, logprobs=3),
    2: SamplingParams(temperature=0.0, repetition_penalty=1.5),  # the guesses must count as seen
}
SAMPLED = {
    0: SamplingParams(temperature=0.8, top_k=40, seed=7, logprobs=2),
    2: SamplingParams(temperature=1.0, repetition_penalty=1.3, seed=8),
}


@pytest.fixture(scope="module")
def engine():
    weights = jax.tree.map(np.asarray, params.random_weights(models.declare(CFG), seed=1, dtype=np.float32))
    return Engine(CFG, weights, ENGINE)


def page_rows(engine) -> np.ndarray:
    """Each slot's pages, scattered over the pool: [S, W]."""
    s, w = engine.ecfg.max_slots, engine.ecfg.pages_per_seq
    return np.random.default_rng(0).permutation(s * w).reshape(s, w).astype(np.int32)


def start(engine, sampling: dict) -> dict:
    """Prefill and insert each prompt into its slot (slot 1 is freed): {slot: [first token, lp]}."""
    rows, first = page_rows(engine), {}
    engine.free(1)
    for slot, prompt in PROMPTS.items():
        row = SamplingState.of(sampling[slot], seed=0)
        presence = np.zeros((CFG.vocab_size,), bool)
        presence[prompt] = True
        packed = engine.prefill(prompt, 0, rows[slot], row, presence)
        engine.insert(slot, packed, len(prompt), row, presence)
        got = Sampled.unpack(np.asarray(packed))
        first[slot] = (int(got.tokens[0]), float(got.logprobs[0]), got.top_ids[0], got.top_logprobs[0])
    return first


def plain_decode(engine, sampling: dict, steps: int = STEPS) -> dict:
    """{slot: (tokens, logprobs, top ids, top logprobs)} of `steps` plain decode steps (the first
    token from prefill)."""
    first = start(engine, sampling)
    out = {s: [f] for s, f in first.items()}
    for _ in range(steps - 1):
        got = Sampled.unpack(np.asarray(engine.decode(page_rows(engine), 64)))
        for s in out:
            out[s].append(
                (int(got.tokens[0, s]), float(got.logprobs[0, s]), got.top_ids[0, s], got.top_logprobs[0, s])
            )
    return {s: tuple(np.array(col) for col in zip(*rows, strict=True)) for s, rows in out.items()}


@pytest.fixture(scope="module")
def greedy_ref(engine):
    return plain_decode(engine, GREEDY)


def table_for(engine, lengths: dict, n: np.ndarray) -> np.ndarray:
    """Each busy slot's real pages up to position lengths + n, the rest pointing at the other busy
    slot's first page (live prompt K/V): a write there by a padding guess would corrupt it."""
    rows, table = page_rows(engine), np.zeros((3, engine.ecfg.pages_per_seq), np.int32)
    for s, length in lengths.items():
        last = (length + n[s]) // engine.ecfg.page_size
        table[s] = rows[2 - s, 0]
        table[s, : last + 1] = rows[s, : last + 1]
    return table


# Per step, per slot: (K, guesses that are right, guesses given). A wrong guess follows the right
# ones; a slot with fewer guesses than K has its padding filled with junk.
SCHEDULE = [
    {0: (4, 4, 4), 2: (1, 0, 0)},
    {0: (4, 1, 4), 2: (4, 4, 4)},
    {0: (1, 0, 0), 2: (4, 2, 3)},
    {0: (1, 1, 1), 2: (1, 0, 1)},
    {0: (4, 2, 2), 2: (4, 0, 4)},
    {0: (4, 0, 4), 2: (1, 1, 1)},
    {0: (4, 3, 4), 2: (4, 4, 4)},
]


def test_verify_emits_what_greedy_decode_emits(engine, greedy_ref):
    start(engine, GREEDY)
    emitted = {s: [greedy_ref[s][0][0]] for s in PROMPTS}  # the prefill's token
    logprobs = {s: [greedy_ref[s][1][0]] for s in PROMPTS}
    busy, step = dict(PROMPTS), 0
    while busy:
        plan = SCHEDULE[step % len(SCHEDULE)]
        k = max(plan[s][0] for s in busy)
        proposed, n = np.full((3, k), 1, np.int32), np.zeros((3,), np.int32)
        proposed[1], n[1] = 77, k  # the idle slot's guesses are ignored
        for s in busy:
            _, right, given = plan[s]
            e = len(emitted[s])
            truth = greedy_ref[s][0][e : e + given]
            proposed[s, :given] = truth
            proposed[s, right:given] = (truth[right:given] + 1) % CFG.vocab_size  # wrong from here
            proposed[s, given:] = (proposed[s, given:] + 3 * s + 5) % CFG.vocab_size  # junk padding
            n[s] = given
        lengths = {s: len(PROMPTS[s]) + len(emitted[s]) - 1 for s in busy}
        rows = 1 if 2 not in busy else None
        got = engine.verify(table_for(engine, lengths, n), 64, proposed, n, busy_rows=rows)
        if rows is None:
            assert got.emitted[1] == 0
        for s in busy:
            _, right, given = plan[s]
            assert got.emitted[s] == right + 1, (step, s)
            e = len(emitted[s])
            assert got.tokens(s) == greedy_ref[s][0][e : e + right + 1].tolist(), (step, s)
            emitted[s] += got.tokens(s)
            logprobs[s] += got.logprobs(s).tolist()
            if s == 0:  # asked for top alternatives
                np.testing.assert_array_equal(
                    got.sampled.top_ids[0, : right + 1], greedy_ref[0][2][e : e + right + 1]
                )
                np.testing.assert_allclose(
                    got.sampled.top_logprobs[0, : right + 1],
                    greedy_ref[0][3][e : e + right + 1],
                    rtol=1e-4,
                    atol=1e-4,
                )
        state = jax.tree.map(np.asarray, engine.state)
        for s in busy:
            assert state.lengths[s] == len(PROMPTS[s]) + len(emitted[s]) - 1
            assert state.tokens[s] == emitted[s][-1]
        assert not state.active[1] and state.lengths[1] == 0
        for s in [s for s in busy if len(emitted[s]) >= STEPS - 6]:
            del busy[s]
            if s == 2:  # slot 0 then runs alone: the one-row program
                engine.free(2)
        step += 1
    for s in PROMPTS:
        n_out = len(emitted[s])
        assert emitted[s] == greedy_ref[s][0][:n_out].tolist()
        np.testing.assert_allclose(logprobs[s], greedy_ref[s][1][:n_out], rtol=1e-4, atol=1e-4)
    assert step > len(SCHEDULE)


def test_verify_without_guesses_draws_what_decode_draws(engine):
    ref = plain_decode(engine, SAMPLED, steps=12)
    start(engine, SAMPLED)
    out = {s: [ref[s][0][0]] for s in PROMPTS}
    for i in range(11):
        k = (1, 4)[i % 2]
        junk = np.random.default_rng(i).integers(0, CFG.vocab_size, (3, k)).astype(np.int32)
        got = engine.verify(page_rows(engine), 64, junk, np.zeros((3,), np.int32))
        assert got.emitted.tolist() == [1, 0, 1]
        for s in PROMPTS:
            out[s] += got.tokens(s)
            e = i + 1
            np.testing.assert_allclose(got.logprobs(s), ref[s][1][e : e + 1], rtol=1e-4, atol=1e-4)
            if s == 0:
                np.testing.assert_array_equal(got.sampled.top_ids[0, 0], ref[0][2][e])
    for s in PROMPTS:
        assert out[s] == ref[s][0].tolist()
    assert len(set(ref[0][0].tolist())) > 3  # sampled, not stuck


def test_verify_programs_are_in_the_layout_list():
    weights = params.random_weights(models.declare(CFG), 0, np.float32)
    lay = Layout.build(CFG, weights, ENGINE, backend="cpu")
    names = [p.name for p in lay.programs()]
    assert [n for n in names if "verify" in n] == [
        "verify[S=1,K=1,kv=64]",
        "verify[S=1,K=4,kv=64]",
        "verify[S=3,K=1,kv=64]",
        "verify[S=3,K=4,kv=64]",
    ]
    plain = Layout.build(CFG, weights, dataclasses.replace(ENGINE, speculative_k=()), backend="cpu")
    assert not any("verify" in p.name for p in plain.programs())
    # `xlaserve lower` reports what a verify step reads; the memory plan counts its temporaries
    verify = next(p for p in lay.programs() if p.name == "verify[S=3,K=4,kv=64]")
    per_token = 2 * CFG.num_layers * CFG.num_kv_heads * CFG.head_dim * 4
    assert lower.step_bytes(lay, verify)[1] == 3 * 64 * per_token
    act = lambda layout: memory.activation_bytes(CFG, layout.ecfg, layout.weights, 1, 0)
    assert act(lay) > act(plain)


def test_llm_with_ngram_speculation_outputs_what_it_outputs_without(engine):
    """The runner's n-gram speculation changes no greedy token and no log-prob, with more requests
    than slots and a request too short to guess much. The sampled request keeps its guesses by
    rejection sampling: with top_k=1 it is greedy, so speculation must change nothing there either."""
    from serving import mock_tokenizer

    from xlaserve import LLM

    for slot in range(ENGINE.max_slots):  # the other tests left slots active on device
        engine.free(slot)
    llm = LLM.from_engine(engine, mock_tokenizer(CFG.vocab_size))
    prompts = [[5, 6, 7, 8] * 3, PROMPTS[2], PROMPTS[0], [9, 9, 9, 9, 9]]
    params = [
        SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=0.0, max_tokens=25, ignore_eos=True, repetition_penalty=1.3),
        SamplingParams(temperature=0.9, top_k=1, max_tokens=20, ignore_eos=True, seed=3, logprobs=0),
        SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True),
    ]
    assert llm.runner.spec.on
    llm.runner.spec.on = False
    plain = llm.generate(prompts, params)
    llm.runner.spec.on = True
    fast = llm.generate(prompts, params)
    made, kept = llm.runner.spec.guesses
    assert kept > 0 and made > kept  # guesses were kept, and rejected
    for a, b in zip(plain, fast, strict=True):
        assert b.token_ids == a.token_ids and b.finish_reason == a.finish_reason
        assert (a.logprobs is None) == (b.logprobs is None)
        for x, y in zip(a.logprobs or [], b.logprobs or [], strict=True):
            assert x.token_id == y.token_id and [t for t, _ in x.top] == [t for t, _ in y.top]
            np.testing.assert_allclose(
                [x.logprob, *[lp for _, lp in x.top]],
                [y.logprob, *[lp for _, lp in y.top]],
                rtol=1e-4,
                atol=1e-4,
            )
    assert [len(o.token_ids) for o in fast] == [30, 25, 20, 3]
    assert llm.stats().pages_used == 0


def test_sampled_requests_guess_and_keep_plain_samplings_distribution(engine):
    """Sampled requests guess too (n-gram lookup), keep some guesses and reject others, reproducibly
    by seed, and the tokens they emit are distributed as without speculation: over 240 seeds, the law
    of each output position 1..7 (token 0 comes from prefill), speculation on against off, by
    chi-square tests of homogeneity. That catches gross errors only (keeping every guess, a wrong
    position's key or penalty); the exact law of `accept` is tested on 6000 rows in
    test_speculative.py. Top-k 3 at temperature 1 keeps the law on few cells; the prompt ends with
    the model's greedy continuation of its start, and lookups take one-token matches (a random
    model's samples rarely repeat three tokens), so they find what the model tends to say."""
    from scipy import stats
    from serving import mock_tokenizer

    from xlaserve import LLM

    for slot in range(ENGINE.max_slots):
        engine.free(slot)
    llm = LLM.from_engine(engine, mock_tokenizer(CFG.vocab_size))
    llm.runner.spec.on = False
    llm.runner.spec.proposer.MIN_N = 1
    start = [5, 6, 7, 8] * 3
    prompt = start + llm.generate([start], SamplingParams(temperature=0.0, max_tokens=8))[0].token_ids
    n, length = 240, 8
    params = [
        SamplingParams(temperature=1.0, top_k=3, max_tokens=length, ignore_eos=True, seed=s) for s in range(n)
    ]
    plain = llm.generate([prompt] * n, params)
    llm.runner.spec.on = True
    before = list(llm.runner.spec.guesses)
    fast = llm.generate([prompt] * n, params)
    made, kept = (a - b for a, b in zip(llm.runner.spec.guesses, before, strict=True))
    assert kept > 0 and made > kept, (made, kept)  # sampled rows guessed; some kept, some not
    again = llm.generate([prompt] * 8, params[:8])
    assert [o.token_ids for o in again] == [o.token_ids for o in fast[:8]]  # a seed reproduces
    for i in range(1, length):
        at = lambda outs: [o.token_ids[i] for o in outs]  # noqa: B023
        cells = sorted(set(at(plain)) | set(at(fast)))
        table = np.array([[at(outs).count(c) for c in cells] for outs in (plain, fast)])
        table = table[:, table.sum(axis=0) >= 10]  # cells with too few draws to test, left out
        if table.shape[1] >= 2:
            assert stats.chi2_contingency(table).pvalue > 1e-4, (i, table)


@pytest.mark.parametrize("platform, backend", [("cuda", "gpu"), ("tpu", "tpu")])
def test_verify_lowers_for_accelerators_with_the_kernels(platform, backend):
    """Verify attends with the prefill kernel batched over its rows (K+1 = 5 queries each, padded
    to a tile), Triton's on cuda; on tpu where the Mosaic kernel takes the cache (the tiny preset's
    bfloat16 K/V with 2 kv heads does). Its matmuls run the quantized-matmul kernel."""
    ecfg = EngineConfig(
        max_model_len=256, prefill_buckets=(32,), kv_buckets=(256,), max_slots=2, speculative_k=(4,)
    )
    layout = Layout.build(CFG, lower.preset_weights(CFG, "q4_0", "bfloat16"), ecfg, backend=backend)
    verify = [p for p in layout.programs() if p.kind == "verify"]
    assert [p.key[0] for p in verify] == [1, 2]
    for program in verify:
        text = program.jit().trace(*program.args).lower(lowering_platforms=(platform,)).as_text()
        want = (
            ("triton:_kernel", "triton:_prefill_kernel")
            if platform == "cuda"
            else ("mosaic:xlaserve_prefill_attention",)
        )
        assert all(k in lower.kernel_calls(text) for k in want), lower.kernel_calls(text)


def test_speculative_k_flag_reaches_the_engine_config():
    from xlaserve.cli import build_parser
    from xlaserve.cli.common import engine_kwargs

    for command in (["generate", "hi"], ["serve"]):
        parse = build_parser(command[0]).parse_args
        args = parse([*command, "--speculative", "ngram", "--num-speculative-tokens", "6"])
        assert engine_kwargs(args)["speculative"] == {"method": "ngram", "num_speculative_tokens": 6}
        spec = engine_kwargs(parse([*command, "--speculative", "draft", "--draft-model", "d.gguf"]))[
            "speculative"
        ]
        assert spec == {"method": "draft", "num_speculative_tokens": 4, "model": "d.gguf"}
        assert "speculative" not in engine_kwargs(parse(command))
        needs = "--num-speculative-tokens needs --speculative ngram, draft or eagle"
        with pytest.raises(ValueError, match=needs):
            engine_kwargs(parse([*command, "--num-speculative-tokens", "3"]))
        for bad in (["--speculative", "draft"], ["--speculative", "ngram", "--draft-model", "d.gguf"]):
            with pytest.raises(ValueError, match="--speculative draft and --draft-model M go together"):
                engine_kwargs(parse([*command, *bad]))
    args = build_parser("lower").parse_args(["lower", "--out", "x", "--num-speculative-tokens", "1,4"])
    assert args.speculative_k == (1, 4)
    with pytest.raises(ValueError, match=r"speculative_k=\(0, 99\) must be guess counts in \[1, 16\]"):
        EngineConfig(speculative_k=(0, 99)).resolve(CFG, "cpu")


def test_runner_speculation_on_the_mock_with_a_dry_pool(monkeypatch):
    """The mock continues with token + 1, so a prompt holding its own continuation is guessed right
    all along: the same outputs in a fifth of the dispatches, also when the pool is too small for
    both sequences (a guess takes only free pages: one is cut short here; preemption recomputes)."""
    from serving import mock_tokenizer

    from xlaserve import LLM
    from xlaserve.runtime.mock_engine import MockEngine
    from xlaserve.runtime.scheduler import Scheduler

    reserve, cut = Scheduler.reserve, []

    def counting(self, seq, tokens):  # records whether the pool had pages for every guess
        held = reserve(self, seq, tokens)
        cut.append(held < tokens)
        return held

    monkeypatch.setattr(Scheduler, "reserve", counting)

    def run(speculative_k, num_pages):
        fields = dict(max_slots=2, max_model_len=256, page_size=4, num_pages=num_pages)
        engine = MockEngine(EngineConfig(**fields, speculative_k=speculative_k))
        llm = LLM.from_engine(engine, mock_tokenizer(), source="mock")
        prompts = [[*range(5, 125), *range(5, 10)], [*range(200, 320), 200, 201]]
        params = SamplingParams(temperature=0.0, max_tokens=110, ignore_eos=True, logprobs=1)
        outs = llm.generate(prompts, params)
        assert llm.stats().pages_used == 0
        return [(o.token_ids, [lp.top for lp in o.logprobs]) for o in outs], engine.dispatches, llm

    plain, plain_dispatches, _ = run((), 64)
    assert plain[0][0] == list(range(10, 120)) and plain[1][0] == list(range(202, 312))
    for pool in (64, 200):
        cut.clear()
        fast, dispatches, llm = run((4,), pool)
        assert fast == plain
        assert llm.runner.spec.guesses[1] > 150 and dispatches < plain_dispatches / 4
        assert (llm.stats().preemptions > 0) == any(cut) == (pool == 64)
