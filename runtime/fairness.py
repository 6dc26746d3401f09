"""Fair sharing between generation and scoring in the slot manager. Plain Python, no JAX.

A scoring request (evals, `Score`) is prefill-only and usually arrives by the hundred; a generation
request is a client waiting for tokens. Ordered by arrival alone, a Generate that arrives behind a
500-item Score waits for every item to take a slot first (26 s instead of 0.7 s), and a long scoring
prompt can take the whole prefill token budget of every step. Two rules bound that, both only
between requests of the same priority (a higher priority still always goes first):

- slots: when a slot frees and both kinds wait, the kind holding fewer slots takes it (ties: the
  earlier arrival), so either kind gets a free slot within one slot turnover;
- the token budget: when both kinds have prompt chunks to prefill in a step, the kinds take turns
  at going first (the other gets what the first leaves of the budget), so neither is starved of
  prefill for more than one step in two. Decode is never budgeted: running streams decode every
  step, and a step's prefill is bounded by the budget.

Within a kind, queue order (priority, then arrival) is kept; chunks of one kind stay together, so
consecutive scoring chunks still share device calls (runner.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

SCORE, GENERATE = "score", "generate"


class _Seq(Protocol):  # scheduler.Seq, as far as fairness reads it
    req: object
    rank: tuple


def kind(seq: _Seq) -> str:
    return SCORE if seq.req.score_start is not None else GENERATE


class Fairness:
    def __init__(self):
        self.first = GENERATE  # which kind goes first in the next contested step

    def pick(self, waiting: Sequence[_Seq], slots: Sequence[_Seq | None]) -> int:
        """Index in `waiting` (sorted by rank) of the request to admit to a free slot."""
        first = {}  # kind -> index of its earliest waiting request at the top priority
        for i, s in enumerate(waiting):
            if s.req.priority != waiting[0].req.priority or len(first) == 2:
                break
            first.setdefault(kind(s), i)
        if len(first) < 2:
            return 0
        held = {k: sum(1 for s in slots if s is not None and kind(s) == k) for k in first}
        return min(first.values(), key=lambda i: (held[kind(waiting[i])], i))

    def order(self, prefilling: Sequence[_Seq]) -> list[_Seq]:
        """The sequences with prompt chunks to prefill, in the order they draw on the step's token
        budget: by priority; within a priority, the kind whose turn it is first, each in rank order.
        A step where both kinds compete flips the turn."""
        kinds = {kind(s) for s in prefilling}
        if len(kinds) < 2:
            return sorted(prefilling, key=lambda s: s.rank)
        first = self.first
        self.first = SCORE if first == GENERATE else GENERATE
        return sorted(prefilling, key=lambda s: (s.rank[0], kind(s) != first, s.rank))
