"""The EAGLE-style draft head on the tiny random Llama: its shapes, the chain run at inference equals
the teacher-forced chain training runs when the guesses are the tokens, a few training steps lower
the loss, save -> load gives identical proposals, a head is refused for another model (naming the
field and both models), and acceptance counts what a greedy verify step would keep."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xlaserve.checkpoints import draft_head as head_files
from xlaserve.checkpoints.loaded import CheckpointError
from xlaserve.runtime import draft_eval, draft_features, draft_head, draft_train, models
from xlaserve.runtime.models import params as model_params
from xlaserve.runtime.models.presets import PRESETS

CFG = dataclasses.replace(PRESETS["tiny"], name="tiny-target")
PROMPTS = [[5, 9, 100, 7], [42, 17, 17, 400, 3, 250], [88, 12, 5], [61, 7, 300, 21, 9]]
GENERATED = 36  # greedy tokens after each prompt


def random_target(cfg=CFG, seed=1):
    return model_params.random_weights(models.declare(cfg), seed=seed, dtype=jnp.float32)


def greedy_sequences(target, cfg, prompts, n: int) -> list[list[int]]:
    """Each prompt and n tokens of the target's greedy continuation (from its own logits)."""
    width = 64
    tokens = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    lengths = np.array([len(p) for p in prompts], np.int32)
    rows = np.arange(len(prompts))
    for _ in range(n):
        feats = draft_features.features(target, tokens, lengths, cfg=cfg)
        last = draft_features.final_logits(target, feats[rows, lengths - 1], cfg)
        tokens[rows, lengths] = np.asarray(jnp.argmax(last, axis=-1))
        lengths += 1
    return [tokens[i, :n_].tolist() for i, n_ in enumerate(lengths)]


@pytest.fixture(scope="module")
def target():
    return random_target()


@pytest.fixture(scope="module")
def corpus(target):
    sequences = greedy_sequences(target, CFG, PROMPTS, GENERATED)
    return draft_train.build_corpus(target, CFG, sequences, [len(p) for p in PROMPTS])


def test_head_shapes(target):
    d, kd = CFG.hidden_size, CFG.head_dim
    p = draft_head.init_params(CFG)["params"]
    assert p["fc"]["kernel"].shape == (2 * d, d)  # concat(feature, embedding) -> D
    assert p["wq"]["kernel"].shape == (d, CFG.num_heads * kd)
    assert p["wk"]["kernel"].shape == p["wv"]["kernel"].shape == (d, CFG.num_kv_heads * kd)
    assert p["w_gate"]["kernel"].shape == (d, CFG.intermediate_size)
    assert p["w_down"]["kernel"].shape == (CFG.intermediate_size, d)
    rows, k, w = 3, 4, 5
    feats = jnp.ones((rows, w, d))
    tokens = jnp.arange(rows * w, dtype=jnp.int32).reshape(rows, w)
    pos = jnp.array([5, 6, 7], jnp.int32)
    params = draft_head.init_params(CFG)
    predicted, logits = draft_head.chain(params, target, feats, tokens, pos, cfg=CFG, k=k)
    assert predicted.shape == (rows, k, d) and logits.shape == (rows, k, CFG.vocab_size)
    guesses = draft_head.propose(params, target, feats, tokens, pos, cfg=CFG, k=k)
    assert guesses.shape == (rows, k) and guesses.dtype == jnp.int32
    with pytest.raises(ValueError, match=r"k=17: .* \[1, 16\]"):
        draft_head.check_k(17)


@pytest.mark.parametrize("window", [1, 6])
def test_inference_chain_is_the_teacher_forced_chain_on_its_own_guesses(target, corpus, window):
    """Training scores the chain with the real tokens as inputs; at inference each step reads the
    previous step's guess. Where the guesses are those tokens, the two are one computation."""
    params = draft_head.init_params(CFG, seed=3)
    seqs, ends = np.arange(len(PROMPTS)), np.array([5, 2, 9, 5])  # row 1's window starts before 0
    feats, tokens, pad = draft_train.context(corpus, seqs, ends, window)
    assert pad.tolist() == [max(window - 1 - e, 0) for e in ends]
    run = lambda forced: draft_head.chain(
        params, target, feats, tokens, ends + 1, cfg=CFG, k=4, pad=pad, forced=forced
    )
    free_feats, free_logits = run(None)
    guesses = np.asarray(jnp.argmax(free_logits, axis=-1))
    forced_feats, forced_logits = run(np.concatenate([tokens[:, -1:], guesses[:, :-1]], axis=1))
    np.testing.assert_array_equal(np.asarray(forced_logits), np.asarray(free_logits))
    np.testing.assert_array_equal(np.asarray(forced_feats), np.asarray(free_feats))


def test_padding_in_the_window_changes_nothing(target, corpus):
    """A window entry marked as padding is never attended: its contents do not matter."""
    params = draft_head.init_params(CFG, seed=3)
    seqs, ends = np.arange(len(PROMPTS)), np.full((len(PROMPTS),), 2)
    feats, tokens, pad = draft_train.context(corpus, seqs, ends, 6)
    assert pad.tolist() == [3] * len(PROMPTS)
    want = draft_head.propose(params, target, feats, tokens, ends + 1, pad, cfg=CFG, k=3)
    noise = np.random.default_rng(0).normal(size=feats[:, :3].shape).astype(np.float32)
    feats2, tokens2 = feats.copy(), tokens.copy()
    feats2[:, :3], tokens2[:, :3] = noise * 50, 7
    got = draft_head.propose(params, target, feats2, tokens2, ends + 1, pad, cfg=CFG, k=3)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    narrow = draft_head.propose(params, target, feats[:, 3:], tokens[:, 3:], ends + 1, cfg=CFG, k=3)
    np.testing.assert_array_equal(np.asarray(narrow), np.asarray(want))


def test_a_few_training_steps_lower_the_loss(target, corpus):
    settings = draft_train.TrainSettings(k=3, window=4, steps=30, lr=1e-2, batch=16, seed=0)
    rows = draft_train.start_rows(corpus, settings.k)
    batch = draft_train.make_batch(corpus, rows, settings.k, settings.window)  # the whole training set

    def measure(p):  # (loss, top-1 agreement with the target's greedy tokens)
        loss, (_, _, top1) = draft_train.loss_fn(
            p, target, batch, cfg=CFG, k=3, ce_weight=0.1, scale=corpus.scale
        )
        return float(loss), float(top1)

    before = measure(draft_head.init_params(CFG, settings.seed))
    seen = []
    trained, last = draft_train.train(
        target, CFG, corpus, settings, progress=lambda step, m: seen.append(step)
    )
    assert seen == list(range(1, 31)) and np.isfinite(last).all()
    after = measure(trained)
    assert after[0] < 0.8 * before[0] and after[1] > before[1] + 0.2, (before, after)


def test_save_load_round_trip_gives_identical_proposals(tmp_path, target, corpus):
    settings = draft_train.TrainSettings(k=2, window=3, steps=3, batch=4)
    params, _ = draft_train.train(target, CFG, corpus, settings)
    fp = head_files.fingerprint(CFG, target)
    head_files.save(tmp_path / "head", params, fp, {"settings": {"k": 2}})
    with pytest.raises(ValueError, match="exists"):
        head_files.save(tmp_path / "head", params, fp, {})
    loaded, meta = head_files.load(tmp_path / "head", CFG, target)
    assert meta["target"] == fp and meta["settings"] == {"k": 2}
    feats, tokens, _ = draft_train.context(corpus, np.arange(len(PROMPTS)), np.full((len(PROMPTS),), 7), 3)
    pos = np.full((len(PROMPTS),), 8, np.int32)
    want = draft_head.propose(params, target, feats, tokens, pos, cfg=CFG, k=4)
    got = draft_head.propose(loaded, target, feats, tokens, pos, cfg=CFG, k=4)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_head_trained_for_another_model_is_refused(tmp_path, target):
    path = tmp_path / "head"
    head_files.save(path, draft_head.init_params(CFG), head_files.fingerprint(CFG, target), {})
    # same shapes, other weights: the embedding's hash differs
    other = dataclasses.replace(CFG, name="other-tiny")
    with pytest.raises(ValueError, match="embed_sha256") as e:
        head_files.load(path, other, random_target(other, seed=2))
    assert "'tiny-target'" in str(e.value) and "'other-tiny'" in str(e.value)
    wider = dataclasses.replace(CFG, name="wider", hidden_size=96)
    with pytest.raises(ValueError, match=r"hidden_size=64.*'wider' \(hidden_size=96\)"):
        head_files.load(path, wider, random_target(wider))
    (path / head_files.MANIFEST).unlink()
    with pytest.raises(CheckpointError, match=r"draft_head\.json is missing"):
        head_files.load(path, CFG, target)


def test_acceptance_counts_the_prefix_a_verify_step_keeps(target, corpus):
    assert draft_eval.accepted([4, 5, 6], [4, 5, 7, 8]) == 2
    assert draft_eval.accepted([9], [4]) == 0
    assert draft_eval.accepted([], [4]) == 0
    # a sequence that repeats a 5-token cycle: from the prompt's last token on, the proposer sees
    # the cycle and one more token, whose earlier occurrence n-gram lookup continues: all k kept
    cycle = [11, 12, 13, 14, 15]
    seq = cycle * 8
    rep = draft_train.build_corpus(target, CFG, [seq], [5])
    k = 3
    acc = draft_eval.acceptance(draft_head.init_params(CFG), target, CFG, rep, k, window=4)
    where = draft_eval.eval_positions(rep, k)
    assert where[:, 1].tolist() == list(range(4, len(seq) - k - 1))
    assert acc.positions == len(where)
    assert acc.ngram == k and acc.ngram_at_least == (1.0,) * k and acc.combined == k
    assert 0.0 <= acc.head <= k and len(acc.head_at_least) == k
    assert "draft head" in acc.describe() and json.dumps(acc.as_dict())
