"""A draft model for speculative decoding: a smaller model with the target's tokenizer guesses the
target's next K tokens, and the target checks them in one verify step (runtime/speculative.py).

The draft runs as an engine of its own (`DraftEngine`): its own weights, paged K/V cache and compiled
programs, but the target's page table. Its cache has the target's page size and page count, so page
p of the draft's cache holds the draft's K/V of the tokens whose target K/V is in page p of the
target's: the scheduler's pages serve both models, with no second allocator, and the target's
memory plan counts both (`Layout.footprint`, runtime/memory.py). A sequence's draft K/V is written
only by its own draft calls (a page shared through the prefix cache may hold none), so a new
sequence's draft starts at position 0; the host bookkeeping of how far each sequence's draft K/V
goes is runtime/spec_runner.py's `DraftProposer`.

Programs, compiled at start-up like the target's:
- prefill[T] per prefill bucket: catches a sequence's draft K/V up (its prompt; tokens decoded while
  it did not guess) to all but its last WINDOW tokens;
- propose[S, K, kv] per slot bucket S, guess count K (`speculative_k`) and KV bucket: for each
  guessing row among the first S slots, its last 1..WINDOW tokens the draft lacks (the newest is
  the next input), then K - 1 one-token steps; each guess is the draft's argmax.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from xlaserve.runtime import models
from xlaserve.runtime.config import ModelConfig
from xlaserve.runtime.engine import Engine, to_host
from xlaserve.runtime.layout import Layout, Program
from xlaserve.runtime.programs import Statics
from xlaserve.runtime.sampling import argmax

# Tokens a row feeds the propose program before its first guess. In steady state a row lacks one
# (its next input) or two (after a verify step that kept every guess, the last guess's K/V was never
# written: the draft computed it, it did not feed it); longer gaps go through prefill chunks.
WINDOW = 2


def propose(weights, cache, page_table, window, start, n_valid, most, *, st: Statics, kv_pages, rows, steps):
    """Greedy guesses of the first `rows` slots (slots ≥ rows must not guess).

    window [S, WINDOW] int32: each row's tokens at positions start .. start + n_valid - 1 (padding
    after); n_valid [S] in [0, WINDOW] (0: the row guesses nothing and writes nothing); most [S] in
    [1, steps]: the guesses it wants. The draft writes K/V at positions start .. start + n_valid +
    most - 2 (its inputs), which page_table [S, W] must hold within the first `kv_pages` pages.
    Returns (cache, guesses int32 [rows, steps]; a row's first `most` are its guesses)."""
    page_table = page_table[:rows, :kv_pages]
    window, start, n_valid, most = window[:rows], start[:rows], n_valid[:rows], most[:rows]
    block = kv_pages * cache.page_size
    active = n_valid > 0
    j = jnp.arange(window.shape[1])[None, :]
    # Several query tokens a row: the XLA attention path (as in verify; layout.py).
    xla = dataclasses.replace(st, kernels=dataclasses.replace(st.kernels, attention="xla"))
    hidden, cache = xla.forward(
        weights,
        cache,
        window,
        start[:, None] + j,
        active[:, None] & (j < n_valid[:, None]),
        page_table,
        jnp.where(active, start + n_valid, 0),
        block,
    )
    last = jnp.take_along_axis(hidden, jnp.maximum(n_valid - 1, 0)[:, None, None], axis=1)[:, 0]
    guesses = jnp.zeros((rows, steps), jnp.int32).at[:, 0].set(argmax(st.logits(weights, last)))
    first = start + n_valid  # the position of guess 0

    def step(i, carry):
        """Feed guess i - 1 (at position first + i - 1) to rows that want guess i."""
        cache, guesses = carry
        on = active & (i < most)
        hidden, cache = st.forward(
            weights,
            cache,
            guesses[:, i - 1][:, None],
            (first + i - 1)[:, None],
            on[:, None],
            page_table,
            jnp.where(on, first + i, 0),
            block,
        )
        guess = jnp.where(on, argmax(st.logits(weights, hidden[:, 0])), 0)
        return cache, guesses.at[:, i].set(guess)

    # as many steps as the row that wants the most guesses needs
    last_step = jnp.minimum(jnp.max(jnp.where(active, most, 1)), steps)
    return jax.lax.fori_loop(1, last_step, step, (cache, guesses))


def propose_program(lay: Layout, rows: int, kv_tokens: int, k: int) -> Program:
    ecfg = lay.ecfg
    fn = functools.partial(propose, st=lay.st, kv_pages=kv_tokens // ecfg.page_size, rows=rows, steps=k)
    i32 = lambda *shape: lay.spec(shape, jnp.int32)
    s = ecfg.max_slots
    args = (lay.weights, lay.cache, i32(s, ecfg.pages_per_seq), i32(s, WINDOW), i32(s), i32(s), i32(s))
    name = f"propose[S={rows},K={k},kv={kv_tokens}]"
    return lay.program("propose", (rows, kv_tokens, k), name, fn, ("cache",), args, ("cache", "guesses"))


class DraftEngine(Engine):
    """The draft's engine: the target's slots, page size, page count and buckets (one page table
    serves both), no scoring; its programs are `prefill` and `propose` only."""

    plans_memory = False  # the target's plan counts it

    def __init__(self, target: Engine, cfg: ModelConfig, weights, *, progress=None, calibration=None):
        t = target.ecfg
        ecfg = dataclasses.replace(t, num_pages=t.total_pages, scoring=False)
        super().__init__(cfg, weights, ecfg, mesh=target.mesh, progress=progress, calibration=calibration)
        assert (self.ecfg.pages_per_seq, self.ecfg.total_pages) == (t.pages_per_seq, t.total_pages)

    def _compile_all(self) -> None:
        lay, ecfg = self.layout, self.ecfg
        keys = [(r, kv, k) for r in ecfg.slot_buckets for kv in ecfg.kv_buckets for k in ecfg.speculative_k]
        programs = [lay.prefill(t) for t in ecfg.prefill_buckets] + [propose_program(lay, *k) for k in keys]
        compiled = self._compiler.all(programs, ecfg.compile_at == "start")
        self._prefill, self._propose = compiled["prefill"], compiled["propose"]

    def propose(
        self,
        page_table: np.ndarray,
        kv_tokens: int,
        window: np.ndarray,
        start: np.ndarray,
        n_valid: np.ndarray,
        most: np.ndarray,
        busy_rows: int,
    ) -> np.ndarray:
        """Each guessing slot's guesses (`propose`; its arguments [max_slots, ...]), at most
        max(most) ≤ the largest speculative_k each: int32 [rows ≥ busy_rows, K ≥ max(most)].
        kv_tokens bounds start + n_valid + most - 1 of every guessing slot."""
        k = next(b for b in self.ecfg.speculative_k if b >= most.max())
        key = (self.slot_bucket(busy_rows), self.kv_bucket(kv_tokens), k)
        host = self._put(page_table, window, start, n_valid, most)
        self.cache, guesses = self._propose[key](self.weights, self.cache, *host)
        return to_host(guesses)


def check_pair(target: tuple[str, ModelConfig, object], draft: tuple[str, ModelConfig, object]) -> None:
    """(name, config, tokenizer) of the target and the draft: ValueError naming both unless the draft
    can draft for the target: the same vocabulary (ids, tokens and EOS), and a target whose pages
    stay (a model whose every layer has a sliding window returns pages that fall out of it, and a
    draft catching up would write to the table's placeholder entries)."""
    (t_name, t_cfg, t_tok), (d_name, d_cfg, d_tok) = target, draft
    pair = f"the draft model {d_name} and the target model {t_name}"
    if d_cfg.vocab_size != t_cfg.vocab_size:
        raise ValueError(
            f"{pair} have different vocabularies (vocab_size {d_cfg.vocab_size} vs {t_cfg.vocab_size}): "
            "a draft model needs the target's tokenizer"
        )
    differs = _first_difference(_vocab(t_tok), _vocab(d_tok))
    if differs is not None:
        raise ValueError(f"{pair} have different tokenizers ({differs}): a draft model needs the target's")
    if set(d_cfg.eos_token_ids) != set(t_cfg.eos_token_ids):
        eos = sorted(d_cfg.eos_token_ids), sorted(t_cfg.eos_token_ids)
        raise ValueError(f"{pair} have different EOS tokens ({eos[0]} vs {eos[1]})")
    if None not in models.kv_spec(t_cfg).windows:
        raise ValueError(f"{pair}: a target whose every layer has a sliding window cannot take a draft model")


def _vocab(tokenizer) -> dict[int, str]:
    """id -> token of a tokenizer backed by HF `tokenizers` (added tokens included); {} otherwise."""
    backend = getattr(tokenizer, "backend", None)
    if backend is None:
        return {}
    return {i: t for t, i in backend.get_vocab(with_added_tokens=True).items()}


def _first_difference(a: dict[int, str], b: dict[int, str]) -> str | None:
    if a == b:
        return None
    if len(a) != len(b):
        return f"{len(b)} tokens vs {len(a)}"
    i = min(i for i in a.keys() | b.keys() if a.get(i) != b.get(i))
    return f"token id {i} is {b.get(i)!r} vs {a.get(i)!r}"
