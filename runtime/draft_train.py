"""Training a draft head (runtime/draft_head.py) by self-distillation, with EAGLE's loss.

The data are token sequences the target generated itself (a prompt and its greedy continuation) and
the target's features over them (`draft_features.features`), gathered once into a `Corpus`. A
training row is a start position t with k positions after it in its sequence: the head's chain
starts from the real feature f_t and the token x_{t+1}, reads the sequence's tokens x_{t+1..t+k}
(teacher forcing: in the generated part they are the target's greedy choices, the guesses a verify
step would accept) and its own predicted features, as it does at inference. Step j is scored on
- smooth-L1 between its predicted feature and the real f_{t+1+j} divided by `Corpus.scale` (the
  features' RMS: SmolLM2's pre-norm states have an RMS of ~40 and a few channels in the thousands;
  the head reads its inputs normalized and predicts in these units, which the final norm ignores);
- plus `ce_weight` (EAGLE: 0.1) times the cross-entropy of its logits against the target's greedy
  next token, argmax(logits(f_{t+1+j})).
Optimiser: optax AdamW with warm-up and cosine decay, gradients clipped to norm 0.5 (EAGLE's).
Only the head's parameters train; the target's weights are read, never differentiated.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax

from xlaserve.runtime import draft_features, draft_head
from xlaserve.runtime.config import ModelConfig

BUCKET = 64  # sequences are padded to a multiple of this for `features` (one compile per length)


@dataclass(frozen=True)
class Corpus:
    """Sequences and the target's view of them (N sequences, T padded length, D hidden)."""

    tokens: np.ndarray  # [N, T] int32: prompt + generated tokens, zero-padded
    lengths: np.ndarray  # [N] int32: real tokens per sequence
    prompt_lengths: np.ndarray  # [N] int32: how many of them are the prompt's
    feats: np.ndarray  # [N, T, D] float32: features before the final norm
    greedy: np.ndarray  # [N, T] int32: the target's argmax after each position
    scale: float  # RMS of the real positions' features: the unit of the feature loss

    def subset(self, index) -> Corpus:
        pick = lambda a: a[np.asarray(index)]
        fields = (self.tokens, self.lengths, self.prompt_lengths, self.feats, self.greedy)
        return Corpus(*map(pick, fields), scale=self.scale)


def build_corpus(
    target,
    cfg: ModelConfig,
    sequences: Sequence[Sequence[int]],
    prompt_lengths: Sequence[int],
    progress: Callable[[str], None] | None = None,
) -> Corpus:
    """The target's features and greedy next tokens over each sequence (prompt + continuation)."""
    if not sequences:
        raise ValueError("sequences is empty: a draft head needs at least one sequence to learn from")
    longest = max(len(s) for s in sequences)
    t = -(-longest // BUCKET) * BUCKET
    n = len(sequences)
    tokens = np.zeros((n, t), np.int32)
    for i, s in enumerate(sequences):
        tokens[i, : len(s)] = s
    lengths = np.array([len(s) for s in sequences], np.int32)
    feats = np.zeros((n, t, cfg.hidden_size), np.float32)
    greedy = np.zeros((n, t), np.int32)
    argmax = jax.jit(lambda w, f: jnp.argmax(draft_features.final_logits(w, f, cfg), axis=-1))
    for i in range(n):
        # each sequence alone, cut to its own bucket: the attention costs its length, not the longest
        ti = -(-int(lengths[i]) // BUCKET) * BUCKET
        f = draft_features.features(target, tokens[i : i + 1, :ti], lengths[i : i + 1], cfg=cfg)
        feats[i, :ti] = np.asarray(f[0])
        greedy[i, :ti] = np.asarray(argmax(target, f[0]))
        if progress is not None:
            progress(f"target features: {i + 1}/{n} sequences")
    real = np.arange(t)[None, :] < lengths[:, None]
    scale = float(np.sqrt(np.mean(feats[real] ** 2)))
    return Corpus(tokens, lengths, np.asarray(prompt_lengths, np.int32), feats, greedy, scale)


def start_rows(corpus: Corpus, k: int) -> np.ndarray:
    """Every training row (sequence, t) [M, 2]: 1 <= t and t + k < length (the chain's k steps
    have real features and tokens). Position 0 (the first token, whose state is an outlier the
    attention sinks on) never starts a chain at inference, where prompts are prefilled first."""
    out = [(i, t) for i, n in enumerate(corpus.lengths) for t in range(1, int(n) - k)]
    return np.array(out, np.int32).reshape(-1, 2)


def context(corpus: Corpus, seqs: np.ndarray, ends: np.ndarray, window: int):
    """The head's input window ending at position p = ends[b] of sequence seqs[b]: (features
    [B, W, D] at p-W+1 .. p, tokens [B, W] after each, pad [B]: entries before position 0)."""
    at = ends[:, None] + np.arange(1 - window, 1)[None, :]  # [B, W]: p-W+1 .. p
    pad = np.maximum(window - 1 - ends, 0).astype(np.int32)
    clipped = np.maximum(at, 0)
    return corpus.feats[seqs[:, None], clipped], corpus.tokens[seqs[:, None], clipped + 1], pad


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Batch:
    """B training rows: a window of W context positions ending at t, then a chain of k steps."""

    feats: jax.Array  # [B, W, D]: the real features f_{t-W+1..t}
    tokens: jax.Array  # [B, W] int32: x_{t-W+2..t+1}
    pad: jax.Array  # [B] int32: window entries before position 0
    pos: jax.Array  # [B] int32: t + 1
    forced: jax.Array  # [B, k] int32: x_{t+1..t+k}, the chain steps' input tokens
    want_feats: jax.Array  # [B, k, D]: f_{t+1..t+k}
    labels: jax.Array  # [B, k] int32: the target's greedy token after each of those positions


def make_batch(corpus: Corpus, rows: np.ndarray, k: int, window: int) -> Batch:
    s, t = rows[:, 0], rows[:, 1]
    ahead = t[:, None] + 1 + np.arange(k)[None, :]  # [B, k]: positions t+1 .. t+k
    feats, tokens, pad = context(corpus, s, t, window)
    return Batch(
        feats=feats,
        tokens=tokens,
        pad=pad,
        pos=(t + 1).astype(np.int32),
        forced=corpus.tokens[s[:, None], ahead],
        want_feats=corpus.feats[s[:, None], ahead],
        labels=corpus.greedy[s[:, None], ahead],
    )


def loss_fn(params, target, batch: Batch, *, cfg: ModelConfig, k: int, ce_weight: float, scale: float):
    """(loss, (feature smooth-L1, cross-entropy, top-1 agreement)), each averaged over rows and steps."""
    feats, logits = draft_head.chain(
        params, target, batch.feats, batch.tokens, batch.pos, cfg=cfg, k=k, pad=batch.pad, forced=batch.forced
    )
    l1 = optax.huber_loss(feats, batch.want_feats / scale, delta=1.0).mean()  # smooth-L1, beta 1
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch.labels).mean()
    top1 = (jnp.argmax(logits, axis=-1) == batch.labels).mean()
    return l1 + ce_weight * ce, (l1, ce, top1)


def optimizer(lr: float, steps: int, warmup: int | None = None) -> optax.GradientTransformation:
    warmup = max(1, min(steps // 10, 50)) if warmup is None else warmup
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), lr * 0.1)
    return optax.chain(
        optax.clip_by_global_norm(0.5), optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=0.0)
    )


def make_step(tx: optax.GradientTransformation, *, cfg: ModelConfig, k: int, ce_weight: float, scale: float):
    """The jitted training step (params, opt_state, target, batch) -> (params, opt_state, metrics)."""
    grad = jax.value_and_grad(
        functools.partial(loss_fn, cfg=cfg, k=k, ce_weight=ce_weight, scale=scale), has_aux=True
    )

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, target, batch: Batch):
        (loss, (l1, ce, top1)), g = grad(params, target, batch)
        updates, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, jnp.stack([loss, l1, ce, top1])

    return step


@dataclass(frozen=True)
class TrainSettings:
    k: int = 4  # chain length trained (the guesses a proposal makes)
    window: int = 1  # context positions the head attends to (1: the last accepted one alone)
    steps: int = 1000
    lr: float = 3e-3
    batch: int = 32  # chains per step
    ce_weight: float = 0.1
    seed: int = 0

    def check(self) -> None:
        draft_head.check_k(self.k)
        for name, value, low in (
            ("steps", self.steps, 1),
            ("batch", self.batch, 1),
            ("window", self.window, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}={value!r} must be an integer >= {low}")
        if not 0 < self.lr <= 1:
            raise ValueError(f"lr={self.lr!r} must be in (0, 1]")
        if not 0 <= self.ce_weight <= 100:
            raise ValueError(f"ce_weight={self.ce_weight!r} must be in [0, 100]")


def train(
    target,
    cfg: ModelConfig,
    corpus: Corpus,
    settings: TrainSettings,
    params=None,
    progress: Callable[[int, np.ndarray], None] | None = None,
):
    """Train a head (fresh from `settings.seed`, or from `params`) on `corpus`; progress(step,
    [loss, smooth-L1, cross-entropy, top-1]) after every step. Returns (params, last metrics)."""
    settings.check()
    rows = start_rows(corpus, settings.k)
    if not len(rows):
        raise ValueError(
            f"no training rows: every sequence is shorter than k + 2 = {settings.k + 2} tokens "
            f"(lengths {corpus.lengths.tolist()})"
        )
    params = draft_head.init_params(cfg, settings.seed) if params is None else params
    tx = optimizer(settings.lr, settings.steps)
    opt_state = tx.init(params)
    step = make_step(tx, cfg=cfg, k=settings.k, ce_weight=settings.ce_weight, scale=corpus.scale)
    rng = np.random.default_rng(settings.seed)
    metrics = np.zeros(4, np.float32)
    for i in range(settings.steps):
        pick = rows[rng.choice(len(rows), settings.batch, replace=len(rows) < settings.batch)]
        params, opt_state, m = step(
            params, opt_state, target, make_batch(corpus, pick, settings.k, settings.window)
        )
        metrics = np.asarray(m)
        if progress is not None:
            progress(i + 1, metrics)
    return params, metrics
