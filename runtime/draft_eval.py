"""How many guesses a proposer gets accepted: a trained draft head against n-gram prompt lookup, on
the same positions of text the target generated itself.

At a position p of a sequence's generated part (the target's greedy output), the proposer sees the
sequence up to x_{p+1} (the head: the target's feature f_p and the token x_{p+1}; n-gram lookup: the
tokens x_0..x_{p+1}) and guesses k tokens; a greedy verify step would accept the longest prefix of
them equal to x_{p+2..p+k+1}, the target's own continuation, then emit one token of its own. So the
accepted count is what a verify step gains there, and 1 + it the tokens that step emits. Positions
are every p from the prompt's last token on with k tokens of continuation after x_{p+1}.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xlaserve.runtime import draft_head
from xlaserve.runtime.config import ModelConfig
from xlaserve.runtime.draft_train import Corpus, context
from xlaserve.runtime.speculative import ngram_propose

ROWS = 256  # chains per `propose` call


@dataclass(frozen=True)
class Acceptance:
    """Mean guesses accepted per verify step (0..k) of each proposer, over the same positions, and
    how often each depth is reached: at_least[j] is the share of positions with > j accepted.
    `combined`: n-gram lookup's guesses where it finds a match, else the head's (one proposer a
    runner could run)."""

    k: int
    positions: int
    head: float
    ngram: float
    combined: float
    head_at_least: tuple[float, ...]
    ngram_at_least: tuple[float, ...]

    def describe(self) -> str:
        depth = lambda xs: " ".join(f"{x:.2f}" for x in xs)
        return (
            f"acceptance over {self.positions} positions of held-out generated text, k={self.k} "
            f"(guesses accepted per verify step; tokens per step = 1 + that)\n"
            f"  draft head : {self.head:.3f} accepted, {1 + self.head:.3f} tokens/step; "
            f"P(accepted > j), j=0..{self.k - 1}: {depth(self.head_at_least)}\n"
            f"  n-gram     : {self.ngram:.3f} accepted, {1 + self.ngram:.3f} tokens/step; "
            f"P(accepted > j), j=0..{self.k - 1}: {depth(self.ngram_at_least)}\n"
            f"  n-gram where it matches, else the head: {self.combined:.3f} accepted"
        )

    def as_dict(self) -> dict:
        return {
            "k": self.k,
            "positions": self.positions,
            "head_accepted": self.head,
            "ngram_accepted": self.ngram,
            "combined_accepted": self.combined,
            "head_at_least": list(self.head_at_least),
            "ngram_at_least": list(self.ngram_at_least),
        }


def accepted(guesses, truth) -> int:
    """The length of the longest prefix of `guesses` equal to `truth`'s start."""
    n = 0
    for g, t in zip(guesses, truth, strict=False):
        if int(g) != int(t):
            break
        n += 1
    return n


def eval_positions(corpus: Corpus, k: int) -> np.ndarray:
    """(sequence, p) [M, 2]: p from the prompt's last token, with x_{p+2..p+k+1} in the sequence."""
    out = [
        (i, p)
        for i, (n, m) in enumerate(zip(corpus.lengths, corpus.prompt_lengths, strict=True))
        for p in range(max(int(m) - 1, 0), int(n) - k - 1)
    ]
    return np.array(out, np.int32).reshape(-1, 2)


def acceptance(params, target, cfg: ModelConfig, corpus: Corpus, k: int, window: int) -> Acceptance:
    """The head's greedy k-step chains (over a window of `window` context positions, then on its own
    predicted features, as at inference) and n-gram lookup's k guesses, accepted against the
    target's continuation at every `eval_positions`."""
    draft_head.check_k(k)
    where = eval_positions(corpus, k)
    if not len(where):
        raise ValueError(
            f"no position to measure: no sequence has k + 2 = {k + 2} generated tokens "
            f"(generated lengths {(corpus.lengths - corpus.prompt_lengths).tolist()})"
        )
    head, ngram, combined = [], [], []
    for lo in range(0, len(where), ROWS):
        part = where[lo : lo + ROWS]
        s, p = part[:, 0], part[:, 1]
        pad = ROWS - len(part)  # one compiled shape: padded rows repeat the last
        s_in, p_in = np.pad(s, (0, pad), mode="edge"), np.pad(p, (0, pad), mode="edge")
        feats, tokens, pad = context(corpus, s_in, p_in, window)
        guesses = draft_head.propose(
            params, target, feats, tokens, (p_in + 1).astype(np.int32), pad, cfg=cfg, k=k
        )
        guesses = np.asarray(guesses)[: len(part)]
        for row, (i, q) in enumerate(zip(s, p, strict=True)):
            truth = corpus.tokens[i, q + 2 : q + 2 + k]
            lookup = ngram_propose(corpus.tokens[i, : q + 2], k)
            head.append(accepted(guesses[row], truth))
            ngram.append(accepted(lookup, truth))
            combined.append(ngram[-1] if len(lookup) else head[-1])
    head_arr, ngram_arr = np.array(head), np.array(ngram)
    at_least = lambda a: tuple(float(np.mean(a > j)) for j in range(k))
    return Acceptance(
        k=k,
        positions=len(where),
        head=float(head_arr.mean()),
        ngram=float(ngram_arr.mean()),
        combined=float(np.mean(combined)),
        head_at_least=at_least(head_arr),
        ngram_at_least=at_least(ngram_arr),
    )
