"""Structured output (runtime/grammar.py, masks applied in sampling on device): grammars compiled by
llguidance for the SmolLM2 tokenizer (no engine), the masked sampler on small logits, and end to end
on the real model: JSON-schema outputs that validate over many seeds, regexes that fullmatch, a Lark
grammar, refusals naming the field, finish reason "stop", log-probs of the constrained distribution,
unconstrained requests untouched by grammar requests in their batch, and a preempted grammar request
that recomputes without replaying its tokens through the matcher."""

from __future__ import annotations

import json
import math
import re

import jax
import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest

from xlaserve import LLM
from xlaserve.checkpoints import registry
from xlaserve.checkpoints.gguf import open_reader, read_metadata
from xlaserve.checkpoints.tokenizer import tokenizer_from_gguf
from xlaserve.runtime.config import EngineConfig
from xlaserve.runtime.grammar import Grammars, unpack
from xlaserve.runtime.mock_engine import MockEngine
from xlaserve.runtime.request import FinishReason, Request
from xlaserve.runtime.sampling import SamplingState, sample
from xlaserve.runtime.sampling_params import SamplingParams
from xlaserve.serve import messages
from xlaserve.serve.proto.xlaserve.v1 import xlaserve_pb2 as pb

EOS = 2  # SmolLM2's <|im_end|>
PAD = 40  # model vocabulary rows past the tokenizer's (Qwen pads 151665 -> 151936)
SCHEMAS = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 10},
            "age": {"type": "integer", "minimum": 0, "maximum": 99},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "tags": {
                "type": "array",
                "items": {"type": "string", "maxLength": 6},
                "minItems": 1,
                "maxItems": 3,
            },
        },
        "required": ["color", "tags"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "point": {
                "type": "object",
                "properties": {
                    "x": {"type": "integer", "minimum": -5, "maximum": 5},
                    "y": {"type": "integer", "minimum": 10, "maximum": 20},
                },
                "required": ["x", "y"],
                "additionalProperties": False,
            },
            "ok": {"type": "boolean"},
        },
        "required": ["point", "ok"],
        "additionalProperties": False,
    },
]
JSON_PROMPT = "Here is a small JSON object:"


@pytest.fixture(scope="module")
def tokenizer():
    path = registry.resolve(registry.DEFAULT_MODEL, log=lambda m: None)
    return tokenizer_from_gguf(read_metadata(open_reader(path)), path)


@pytest.fixture(scope="module")
def grammars(tokenizer):
    return Grammars(tokenizer, tokenizer.vocab_size + PAD, [EOS])


# -- host: compiling and advancing (no engine) ----------------------------------------------------


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("json_schema", {"type": "frob"}, "Invalid type"),
        ("json_schema", {"$ref": "#/defs/missing"}, "does not exist"),
        ("json_schema", {"type": "integer", "minimum": 5, "maximum": 2}, ""),
        ("regex", "([a-", "unclosed character class"),
        ("grammar", "start: undefined_rule", "unknown name"),
        ("grammar", "start: /[0-9]+", ""),
    ],
)
def test_a_grammar_that_does_not_compile_is_refused_naming_the_field(grammars, field, value, message):
    params = SamplingParams(**{field: value})
    with pytest.raises(ValueError, match=f"^{field} does not compile: ") as e:
        grammars.check(params)
    assert message in str(e.value)
    with pytest.raises(ValueError, match=f"^{field} does not compile: "):
        grammars.compile(params)
    # through the gRPC mapping the field is named as the client spelled it
    msg = pb.SamplingParams(**{field: params.json_schema if field == "json_schema" else value})

    def make(**fields):
        p = SamplingParams(**fields)
        grammars.check(p)
        return p

    with pytest.raises(ValueError, match=f"^sampling.{field} does not compile: "):
        messages.sampling_params(msg, make)


GBNF = 'root ::= answer " (" hedge ")"\nanswer ::= "yes" | "no"\nhedge ::= "maybe" | "surely"\n'


def test_gbnf_grammars_compile_as_lark_does(grammars, tokenizer):
    matcher = grammars.compile(SamplingParams(grammar=GBNF))
    for t in tokenizer.encode("no (surely)", add_special_tokens=False):
        assert matcher.advance(t)
    assert matcher.accepting
    with pytest.raises(ValueError, match=r"^grammar does not compile: "):
        grammars.compile(SamplingParams(grammar='root ::= "a" undefined'))


def test_proto_fields_map_to_sampling_params():
    msg = pb.SamplingParams(regex="[0-9]+", max_tokens=5)
    assert messages.sampling_params(msg) == SamplingParams(regex="[0-9]+", max_tokens=5)
    schema = json.dumps(SCHEMAS[0])
    assert messages.sampling_params(pb.SamplingParams(json_schema=schema)).json_schema == schema
    assert messages.sampling_params(pb.SamplingParams(grammar="start: /a/")).grammar == "start: /a/"
    assert not messages.sampling_params(pb.SamplingParams()).constrained


def allowed(matcher, vocab):
    return np.flatnonzero(unpack(matcher.mask(), vocab))


def test_matcher_walks_a_json_document(grammars, tokenizer):
    vocab = grammars.vocab_size
    m = grammars.compile(SamplingParams(json_schema=SCHEMAS[0]))
    assert m.words == -(-vocab // 32) and m.field == "json_schema"
    doc = '{"name":"Ada","age":42}'  # compact separators, properties in the schema's order
    tokens = tokenizer.encode(doc, add_special_tokens=False)
    for i, t in enumerate(tokens):
        ok = allowed(m, vocab)
        assert t in ok and EOS not in ok and not m.done
        assert ok.max() < tokenizer.vocab_size  # the padding rows are never allowed
        assert m.advance(t)
        assert m.accepted == i + 1
    assert m.done and m.accepting
    assert list(allowed(m, vocab)) == [EOS]  # complete: only EOS may follow
    # a token the grammar refuses puts the matcher in an error state, and it says so
    bad = grammars.compile(SamplingParams(json_schema=SCHEMAS[0]))
    assert not bad.advance(tokenizer.encode("hello", add_special_tokens=False)[0])
    assert bad.error and bad.done


def test_compiled_grammars_are_cached_and_each_request_gets_its_own_state(grammars, tokenizer):
    params = SamplingParams(regex="(cat|dog)s?")
    a, b = grammars.compile(params), grammars.compile(params)
    assert a.inner is not b.inner
    cat = tokenizer.encode("cat", add_special_tokens=False)
    for t in cat:
        assert a.advance(t)
    assert a.accepting and not b.accepting
    assert EOS in allowed(a, grammars.vocab_size) and EOS not in allowed(b, grammars.vocab_size)
    # several matchers' masks at once (llguidance's thread pool) equal each one's own
    out = np.zeros((3, grammars.words), np.int32)
    grammars.fill([(a, 0), (b, 2)], out)
    assert (out[0] == a.mask()).all() and (out[2] == b.mask()).all() and not out[1].any()


def test_a_completing_token_ends_the_request_with_stop(tokenizer):
    req = Request("r", [1], SamplingParams(max_tokens=50, stop=["zz"]), seed=0, eos_ids=frozenset([EOS]))
    text = ""
    ids = tokenizer.encode('{"a":1}', add_special_tokens=False)
    for i, t in enumerate(ids):
        _, piece = req.append(t, None, tokenizer, 1000, complete=i == len(ids) - 1)
        text += piece
    assert req.finish_reason is FinishReason.STOP and req.stop_reason is None
    assert text == req.text == '{"a":1}'


def test_runner_masks_prefill_and_decode_on_the_mock_engine(tokenizer):
    """The runner's side on the mock engine (which takes its own next token when a mask allows it,
    else the lowest allowed): grammar requests come out valid and end with "stop", a request without
    a grammar in the same batches streams the mock's plain sequence, and batches holding a grammar
    request run one masked step per dispatch although decode_steps is 3."""
    cfg = EngineConfig(max_slots=4, max_model_len=256, page_size=4, decode_steps=3)
    engine = MockEngine(cfg, vocab=tokenizer.vocab_size)
    llm = LLM.from_engine(engine, tokenizer)
    params = [
        SamplingParams(regex="[0-9]{3}-[0-9]{2}", max_tokens=20),
        SamplingParams(json_schema=SCHEMAS[1], max_tokens=60),
        SamplingParams(grammar='start: "yes" | "no"', max_tokens=5),
        SamplingParams(max_tokens=9, ignore_eos=True),
    ]
    outs = llm.generate([[5, 6, 7]] * 4, params)
    mixed = engine.dispatches
    assert re.fullmatch("[0-9]{3}-[0-9]{2}", outs[0].text) and outs[0].finish_reason == "stop"
    jsonschema.validate(json.loads(outs[1].text), SCHEMAS[1])
    assert outs[2].text in ("yes", "no") and outs[2].finish_reason == "stop"
    assert outs[3].token_ids == list(range(8, 17))
    # the plain request's 9 tokens: the first from its prefill, then one per dispatch while a
    # grammar request is in its batch, and alone 3 per dispatch (none once those in flight reach
    # max_tokens: 3 dispatches for the other 8)
    before = engine.dispatches
    assert llm.generate([[5, 6, 7]], [params[3]])[0].token_ids == outs[3].token_ids
    assert engine.dispatches - before == 3 and mixed >= 8


def test_grpc_carries_the_grammar_fields(tokenizer):
    """Over the real gRPC server (mock engine, SmolLM2's tokenizer): json_schema / regex / grammar
    constrain the stream and end it with FINISH_REASON_STOP; one that does not compile is
    INVALID_ARGUMENT naming sampling.<field>."""
    import grpc
    from serving import start

    engine = MockEngine(EngineConfig(max_slots=4, max_model_len=512), vocab=tokenizer.vocab_size)
    llm = LLM.from_engine(engine, tokenizer)
    server, client = start(llm)
    try:
        out = client.generate("Hello", regex="[0-9]{4}", max_tokens=10)
        assert re.fullmatch("[0-9]{4}", out.text) and out.finish_reason == "stop"
        out = client.generate("Hello", json_schema=json.dumps(SCHEMAS[2]), max_tokens=60)
        jsonschema.validate(json.loads(out.text), SCHEMAS[2])
        assert client.generate("Hello", grammar='start: "ok"', max_tokens=5).text == "ok"
        for field, value in (("json_schema", '{"type": "frob"}'), ("regex", "(("), ("grammar", "start: x")):
            with pytest.raises(grpc.RpcError) as e:
                client.generate("Hello", **{field: value}, max_tokens=5)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert e.value.details().startswith(f"sampling.{field} does not compile: ")
    finally:
        server.stop()


# -- device: the masked sampler ---------------------------------------------------------------------


def test_masked_sampling_draws_only_allowed_tokens_and_renormalizes_log_probs():
    v, rows = 300, 6
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((rows, v)) * 3).astype(np.float32)
    keep = rng.random((rows, v)) < 0.05
    keep[:, 7] = True
    keep[5] = True  # a row without a grammar: all ones
    keep[4, :] = False
    keep[4, [3, 250]] = True  # fewer allowed tokens than top alternatives asked for
    words = np.packbits(np.pad(keep, ((0, 0), (0, 20))), axis=-1, bitorder="little").view(np.int32)
    assert (unpack(words, v) == keep).all()
    params = [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.8, top_k=5),
        SamplingParams(temperature=1.0, top_p=0.5),
        SamplingParams(temperature=0.9, min_p=0.1, repetition_penalty=1.3),
        SamplingParams(temperature=0.0, logprobs=4),
        SamplingParams(temperature=1.0),
    ]
    seen = jnp.asarray(rng.random((rows, v)) < 0.1)
    run = jax.jit(lambda lg, st, pos, w: sample(lg, st, seen, pos, max_top=4, allowed=w))
    plain = jax.jit(lambda lg, st, pos: sample(lg, st, seen, pos, max_top=4))
    for seed in range(16):
        st = jax.tree.map(
            lambda *r: jnp.concatenate(r),
            *[SamplingState.of(p, seed * rows + i) for i, p in enumerate(params)],
        )
        pos = jnp.full((rows,), seed, jnp.int32)
        tokens, lps, top_ids, top_lps = map(np.asarray, run(logits, st, pos, words))
        assert keep[np.arange(rows), tokens].all()
        masked = np.where(keep, logits, -np.inf)
        top = masked.max(-1, keepdims=True)
        ref = masked - top - np.log(np.exp(masked - top).sum(-1, keepdims=True))
        np.testing.assert_allclose(lps, ref[np.arange(rows), tokens], rtol=1e-5, atol=1e-5)
        assert np.isneginf(top_lps[4, 2:]).all() and set(top_ids[4, :2]) == {3, 250}
        assert keep[np.arange(rows)[:, None], top_ids][:, :2].all()
        # the row without a grammar is exactly what the unmasked sampler gives
        alone = [np.asarray(a)[5] for a in plain(logits, st, pos)]
        for got, want in zip((tokens[5], lps[5], top_ids[5], top_lps[5]), alone, strict=True):
            np.testing.assert_array_equal(got, want)


# -- end to end on SmolLM2 -------------------------------------------------------------------------


def test_json_schema_outputs_validate_and_company_is_unchanged(llm):
    plain = [
        SamplingParams(temperature=0.0, max_tokens=16),
        SamplingParams(temperature=0.0, max_tokens=16, logprobs=2),
    ]
    prompts = ["The capital of France is", "def add(a, b):"]
    alone = llm.generate(prompts, plain)
    constrained = [
        SamplingParams(json_schema=s, temperature=t, seed=seed, max_tokens=64)
        for seed, (s, t) in enumerate((s, t) for s in SCHEMAS for t in (0.8, 1.0))
    ]
    outs = llm.generate([JSON_PROMPT] * len(constrained) + prompts, constrained + plain)
    for out, params in zip(outs, constrained, strict=False):
        assert out.finish_reason == "stop", out
        jsonschema.validate(json.loads(out.text), json.loads(params.json_schema))
        assert EOS not in out.token_ids  # the grammar ended it: no EOS sampled
    for a, b in zip(alone, outs[len(constrained) :], strict=True):
        assert a.token_ids == b.token_ids and a.text == b.text
    for a, b in zip(alone[1].logprobs, outs[-1].logprobs, strict=True):
        assert a.token_id == b.token_id and [t for t, _ in a.top] == [t for t, _ in b.top]
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5)


def test_regex_and_lark_outputs_match(llm):
    regexes = [r"(yes|no), because [a-z ]{3,20}\.", r"[0-9]{3}-[0-9]{4}", r"(cat|dog|bird)s?"]
    params = [
        SamplingParams(regex=r, temperature=0.9, seed=seed, max_tokens=32)
        for seed in range(3)
        for r in regexes
    ]
    lark = 'start: "Answer: " num ("," num)? ("," num)?\nnum: /[1-9][0-9]?/'
    params.append(SamplingParams(grammar=GBNF, temperature=1.0, seed=4, max_tokens=24))
    params.append(SamplingParams(grammar=lark, temperature=1.0, seed=5, max_tokens=24))
    outs = llm.generate(["Is the sky blue? Answer:"] * len(params), params)
    assert re.fullmatch(r"(yes|no) \((maybe|surely)\)", outs[-2].text), outs[-2].text
    for out, p in zip(outs[:-2], params, strict=False):
        assert re.fullmatch(p.regex, out.text), (p.regex, out.text, out.finish_reason)
        assert out.finish_reason in ("stop", "eos")
    last = outs[-1]
    body = last.text
    assert re.fullmatch(r"Answer: [1-9][0-9]?(,[1-9][0-9]?){0,2}", body), body
    assert last.finish_reason in ("stop", "eos")


def test_bad_grammars_are_refused_at_admission(llm):
    for field, value in (("json_schema", {"type": "frob"}), ("regex", "(("), ("grammar", "start: nope")):
        params = SamplingParams(**{field: value})
        with pytest.raises(ValueError, match=f"^{field} does not compile: "):
            llm.make_request("Hello", params)
        with pytest.raises(ValueError, match=f"^{field} does not compile: "):
            llm.sampling_params(**{field: value})
    assert not llm.runner.seqs and not llm.runner.busy


def test_log_probs_are_of_the_constrained_distribution(llm):
    prompt = "Pick a letter, A or B. The letter is"
    out = llm.generate(prompt, SamplingParams(regex="(A|B)", temperature=0.0, logprobs=5))[0]
    assert out.finish_reason == "stop" and out.text in ("A", "B") and len(out.token_ids) == 1
    lp = out.logprobs[0]
    # only the two allowed tokens are alternatives, and their probabilities add up to one
    assert len(lp.top) == 2 and lp.top[0][0] == out.token_ids[0] and lp.logprob == lp.top[0][1]
    assert math.isclose(sum(math.exp(v) for _, v in lp.top), 1.0, rel_tol=1e-4)
    # ... which is the model's own distribution renormalized over them
    raw = [s.logprobs[0] for s in llm.score([(prompt, "A"), (prompt, "B")])]
    want = {llm.tokenizer.encode(c, add_special_tokens=False)[0]: r for c, r in zip("AB", raw, strict=True)}
    norm = np.logaddexp(*raw)
    for token, value in lp.top:
        assert math.isclose(value, want[token] - norm, abs_tol=2e-3)
    # a token forced by the grammar has log-prob 0
    forced = llm.generate(prompt, SamplingParams(regex=r"\{", temperature=1.0, logprobs=3))[0]
    assert forced.text == "{" and forced.logprobs[0].logprob == pytest.approx(0.0, abs=1e-6)


def test_a_preempted_grammar_request_recomputes_from_its_output(llm):
    runner = llm.runner
    before = runner.stats().preemptions
    params = SamplingParams(json_schema=SCHEMAS[1], temperature=0.9, seed=3, max_tokens=48)
    preempted = []

    def preempt_once(i, delta):
        seq = runner.seqs.get(delta.request.request_id)
        if not preempted and seq is not None and len(delta.request.output_ids) >= 4 and seq.slot is not None:
            preempted.append(delta.request)
            runner.scheduler._preempt(seq)  # as if the page pool ran dry

    out = llm.generate(JSON_PROMPT, params, on_delta=preempt_once)[0]
    assert preempted and runner.stats().preemptions == before + 1
    assert out.finish_reason == "stop"
    jsonschema.validate(json.loads(out.text), SCHEMAS[1])
    assert preempted[0].grammar is None  # freed when it finished


def test_multistep_engine_runs_grammar_batches_one_step_and_survives_preemption(llm, model_path):
    """decode_steps=3 and a page pool too small for both requests: the grammar request (the later
    one, so the victim) is preempted and recomputed; the batch runs one masked step per dispatch
    while it holds the grammar request, and the unconstrained request's greedy tokens are those of
    the default engine (one step per dispatch, no grammar in its company)."""
    small = LLM(
        str(model_path),
        max_slots=2,
        prefill_buckets=(32,),
        max_model_len=128,
        attn_block=64,
        num_pages=8,
        decode_steps=3,
        scoring=False,
    )
    prompt = "Write a long story about a dragon who lives in a castle by the sea and loves old books. " * 2
    plain = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)
    regex = r"(ab ){40}"
    constrained = SamplingParams(regex=regex, temperature=1.0, seed=1, max_tokens=60)
    outs = small.generate([prompt, JSON_PROMPT], [plain, constrained])
    assert len(small.tokenizer.encode(prompt)) > 40
    assert small.stats().preemptions >= 1
    assert re.fullmatch(regex, outs[1].text) and outs[1].finish_reason == "stop"
    assert outs[0].token_ids == llm.generate(prompt, plain)[0].token_ids
