"""Sampling on device: the filters keep exactly the tokens HF's logits warpers keep, draws never
leave that set, seeds reproduce, greedy is argmax after the repetition penalty, and every invalid
parameter is refused with its name and range."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from xlaserve.runtime.sampling import (
    SamplingState,
    _argmax_by_blocks,
    argmax,
    filter_logits,
    log_probs_of,
    sample,
)
from xlaserve.runtime.sampling_params import SamplingParams

V = 4096
CASES = [
    dict(temperature=1.0, top_k=5),
    dict(temperature=0.7, top_p=0.9),
    dict(temperature=1.3, min_p=0.05),
    dict(temperature=0.8, top_k=50, top_p=0.95, min_p=0.02),
    dict(temperature=1.0, top_k=1),
    dict(temperature=2.0, top_p=0.3),
    dict(temperature=1.0, top_k=V + 10),
]


def hf_kept(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
    """The tokens HF's warpers (in HF's order) leave finite, for one row."""
    x = torch.tensor(logits[None], dtype=torch.float32)
    ids = torch.zeros((1, 1), dtype=torch.long)
    x = TemperatureLogitsWarper(p.temperature)(ids, x)
    if p.top_k > 0:
        x = TopKLogitsWarper(min(p.top_k, V))(ids, x)
    if p.top_p < 1.0:
        x = TopPLogitsWarper(p.top_p)(ids, x)
    if p.min_p > 0.0:
        x = MinPLogitsWarper(p.min_p)(ids, x)
    return torch.isfinite(x[0]).numpy()


def state_of(params: list[SamplingParams], seeds=None) -> SamplingState:
    rows = [SamplingState.of(p, s) for p, s in zip(params, seeds or range(len(params)), strict=True)]
    return jax.tree.map(lambda *r: jnp.concatenate(r), *rows)


@pytest.fixture
def logits():
    # Fresh random logits each run (the seed is printed on failure by pytest's repr of the array).
    rng = np.random.default_rng()
    return (rng.standard_normal((len(CASES), V)) * 3).astype(np.float32)


def test_filters_keep_what_hf_keeps(logits):
    params = [SamplingParams(**c) for c in CASES]
    st = state_of(params)
    x = jnp.asarray(logits) / st.temperature[:, None]
    kept = np.isfinite(np.asarray(jax.jit(filter_logits)(x, st.top_k, st.top_p, st.min_p)))
    for i, p in enumerate(params):
        np.testing.assert_array_equal(kept[i], hf_kept(logits[i], p), err_msg=str(CASES[i]))


def test_draws_never_leave_the_kept_set(logits):
    n = 256  # draws per case, each with its own seed
    for i, case in enumerate(CASES[:4]):
        p = SamplingParams(**case)
        st = state_of([p] * n, seeds=list(range(1000 * i, 1000 * i + n)))
        rows = jnp.broadcast_to(jnp.asarray(logits[i]), (n, V))
        tokens, *_ = jax.jit(sample, static_argnames="max_top")(
            rows, st, jnp.zeros((n, V), bool), jnp.arange(n), max_top=0
        )
        allowed = hf_kept(logits[i], p)
        assert allowed[np.asarray(tokens)].all(), case
        assert len(set(np.asarray(tokens).tolist())) > 1 or allowed.sum() == 1  # it is really sampling


def test_same_seed_same_token_and_seeds_differ(logits):
    p = SamplingParams(temperature=1.0)
    row = jnp.broadcast_to(jnp.asarray(logits[0]), (4, V))
    run = jax.jit(sample, static_argnames="max_top")
    st = state_of([p] * 4, seeds=[7, 7, 8, 2**64 - 1])
    pos = jnp.array([5, 5, 5, 5])
    a, *_ = run(row, st, jnp.zeros((4, V), bool), pos, max_top=0)
    b, *_ = run(row, st, jnp.zeros((4, V), bool), pos, max_top=0)
    assert np.array_equal(a, b) and a[0] == a[1]
    many = state_of([p] * 64, seeds=list(range(64)))
    c, *_ = run(
        jnp.broadcast_to(jnp.asarray(logits[0]), (64, V)),
        many,
        jnp.zeros((64, V), bool),
        jnp.zeros(64, int),
        max_top=0,
    )
    assert len(set(np.asarray(c).tolist())) > 1


def test_greedy_applies_repetition_penalty_like_hf(logits):
    seen = np.zeros((2, V), bool)
    seen[:, np.argsort(-logits[0])[:3]] = True  # penalize the current top 3 (positive and negative logits)
    seen[:, np.argsort(logits[0])[:3]] = True
    params = [SamplingParams(temperature=0.0, repetition_penalty=1.8), SamplingParams(temperature=0.0)]
    st = state_of(params)
    rows = jnp.asarray(np.stack([logits[0], logits[0]]))
    tokens, chosen, _, _ = jax.jit(sample, static_argnames="max_top")(
        rows, st, jnp.asarray(seen), jnp.zeros(2, int), max_top=0
    )
    hf = RepetitionPenaltyLogitsProcessor(1.8)(
        torch.tensor(np.flatnonzero(seen[0]))[None], torch.tensor(logits[:1])
    )
    assert int(tokens[0]) == int(hf.argmax())
    assert int(tokens[1]) == int(np.argmax(logits[0]))
    # log-probs are those of the raw distribution
    raw = jax.nn.log_softmax(jnp.asarray(logits[0]))
    np.testing.assert_allclose(chosen, raw[np.asarray(tokens)], rtol=1e-6)


def test_top_logprobs(logits):
    p = SamplingParams(temperature=0.0, logprobs=5)
    st = state_of([p, dataclasses.replace(p, logprobs=0)])
    rows = jnp.asarray(logits[:2])
    _, _, ids, lps = jax.jit(sample, static_argnames="max_top")(
        rows, st, jnp.zeros((2, V), bool), jnp.zeros(2, int), max_top=8
    )
    raw = np.asarray(jax.nn.log_softmax(rows))
    for r in range(2):
        np.testing.assert_array_equal(ids[r], np.argsort(-raw[r])[:8])
        np.testing.assert_allclose(lps[r], raw[r][np.asarray(ids[r])], rtol=1e-6)


@pytest.mark.parametrize("case", ["blocks", "both-infinities", "nans"])
@pytest.mark.parametrize("vocab", [49152, 300, 7])
def test_argmax_is_jnp_argmax_with_ties_nans_and_infinities(vocab, case):
    rng = np.random.default_rng(vocab)
    x = rng.integers(-3, 4, size=(3, 5, vocab)).astype(np.float32)  # many ties among small integers
    x[0, 0] = -np.inf  # all -inf: index 0
    x[0, 3, [vocab // 3, vocab - 1]] = np.inf
    x[1, 0] = -0.0
    x[1, 0, vocab - 1] = 0.0  # -0.0 == 0.0: the first
    x[1, 1, :] = 5.0  # all equal
    x[1, 2, 1:] = -np.inf  # a grammar mask: one token allowed
    if case == "both-infinities":  # in one block: the exact path
        x[0, 1, 1 : vocab // 2] = -np.inf
        x[0, 1, [0, vocab // 2]] = np.inf
    if case == "nans":
        x[2, 0, vocab // 2 :] = np.nan  # NaNs after the maximum: the first NaN wins
        x[2, 1, -1] = np.nan  # a NaN in the last (padded) block
        x[2, 2, ::3] = np.nan
    ours = jax.jit(argmax)(jnp.asarray(x))
    assert ours.dtype == jnp.int32
    want = jnp.argmax(jnp.asarray(x), axis=-1)
    np.testing.assert_array_equal(ours, want)
    if case == "blocks" and vocab % 128 == 0:  # the fast path itself, which the others do not take
        np.testing.assert_array_equal(_argmax_by_blocks(jnp.asarray(x).reshape(3, 5, -1, 128)), want)


def test_log_probs_of_reads_log_softmax(logits):
    rows = jnp.asarray(logits[:2])
    tokens = jnp.asarray([[0, 5, V - 1], [7, 7, 3]])
    ours = jax.jit(log_probs_of)(rows, tokens)
    np.testing.assert_array_equal(ours, jnp.take_along_axis(jax.jit(jax.nn.log_softmax)(rows), tokens, -1))


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("max_tokens", 0, "max_tokens=0 must be an integer in [1,"),
        ("max_tokens", 2.5, "max_tokens=2.5"),
        ("temperature", -0.1, "temperature=-0.1 must be a number in [0.0, 100.0]"),
        ("temperature", float("nan"), "temperature=nan"),
        ("top_k", -2, "top_k=-2 must be an integer in [-1,"),
        ("top_p", 0.0, "top_p=0.0 must be a number in (0.0, 1.0]"),
        ("top_p", 1.5, "top_p=1.5"),
        ("min_p", -0.5, "min_p=-0.5 must be a number in [0.0, 1.0]"),
        ("repetition_penalty", 0.0, "repetition_penalty=0.0 must be a number in (0.0, 100.0]"),
        ("seed", -1, "seed=-1 must be an integer in [0, 18446744073709551615]"),
        ("seed", 2**64, "seed=18446744073709551616"),
        ("stop", ("",), "stop must be at most 16 non-empty strings"),
        ("stop_token_ids", (-3,), "stop_token_ids[0]=-3"),
        ("logprobs", 101, "logprobs=101 must be an integer in [0, 100]"),
        ("ignore_eos", "yes", "ignore_eos='yes' must be a bool"),
        ("max_tokens", True, "max_tokens=True"),
    ],
)
def test_invalid_params_name_field_and_range(field, value, message):
    with pytest.raises(ValueError) as info:
        SamplingParams(**{field: value})
    assert message in str(info.value)
