"""When speculation pays: how many guesses a step makes, and which requests make them. No JAX here.

A verify step for a batch costs more than a decode step for it (K + 1 positions a row instead of
one), so it pays only when it emits enough more tokens. Three rules keep speculation from being
slower than plain decoding (the runner applies them in `_propose`):

- A request may opt out (`SamplingParams.speculative=False`): it never guesses.
- K by batch size (`EngineConfig.speculative_schedule`, like TensorRT-LLM's draft_len_schedule):
  pairs (most sequences, K) in increasing order; a step with b running sequences guesses up to the K
  of the first pair with b ≤ most, and nothing past the last pair. Decode at a small batch reads
  the weights for few tokens (memory-bound), so K + 1 positions cost little more; at a large batch
  decode is already compute-bound and a verify step costs about K + 1 decode steps.
- A request whose guesses mostly fail stops guessing: over its last WINDOW verify steps it must
  emit, on average, at least `break_even` tokens a step (the cost of a verify step in decode steps,
  `EngineConfig.speculative_break_even`); below that it decodes plainly for BACKOFF output tokens
  (doubling each time it is switched off again), then tries again with an empty window.

The break-even default, VERIFY_COST, is the time of a verify step with K = 4 over a decode step at
batch 1 on SmolLM2-135M on a 2-core CPU (`python -m xlaserve.bench.spec` measures and reports it:
about 1.3-1.5). With emitted tokens e per verify step, speculation is faster iff e > VERIFY_COST;
for K guesses kept independently with probability a, e = 1 + a + ... + a^K.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

VERIFY_COST = 1.4  # verify (K=4) / decode step time at batch 1 on CPU: the break-even tokens a step
WINDOW = 8  # verify steps a request's acceptance is judged over
BACKOFF = 32  # output tokens a switched-off request decodes plainly before guessing again
# The default schedule: (most running sequences, K); K is capped at the largest compiled K.
SCHEDULE = ((8, 16),)


def resolve_schedule(schedule, most_k: int, break_even: float) -> tuple[tuple[int, int], ...]:
    """EngineConfig.speculative_schedule checked (ValueError naming the field) and resolved: None
    gives SCHEDULE with K capped at most_k (the largest speculative_k); () without speculation."""
    if schedule is None:
        schedule = tuple((b, min(k, most_k)) for b, k in SCHEDULE)
    pairs = tuple(tuple(p) for p in schedule)
    ok = all(len(p) == 2 and p[0] >= 1 and 0 <= p[1] <= most_k for p in pairs)
    if not ok or not all(a[0] < b[0] for a, b in itertools.pairwise(pairs)):
        raise ValueError(
            f"speculative_schedule={schedule!r} must be (batch size ≥ 1, K in [0, {most_k}]) pairs "
            "in increasing batch size"
        )
    if isinstance(break_even, bool) or not isinstance(break_even, int | float) or not 1 <= break_even <= 17:
        raise ValueError(f"speculative_break_even={break_even!r} must be a number of tokens in [1, 17]")
    return pairs if most_k else ()


def schedule_k(schedule: tuple[tuple[int, int], ...], batch: int) -> int:
    """The most guesses per sequence for a step of `batch` running sequences: the K of the first
    (most sequences, K) pair with batch ≤ most; 0 past the last pair."""
    return next((k for most, k in schedule if batch <= most), 0)


@dataclass
class SpecCounts:
    """One request's speculation: its totals, and whether it guesses now.

    proposed: guesses it made; accepted: of those, the ones the target kept (a step's kept guesses
    count even when the request ended inside them, e.g. on EOS: they measure agreement)."""

    proposed: int = 0
    accepted: int = 0
    recent: deque = field(default_factory=lambda: deque(maxlen=WINDOW))  # tokens emitted a step
    off_until: int = 0  # output length before which it does not guess
    backoff: int = BACKOFF
    switched_off: int = 0  # times its acceptance fell below break-even

    def guessing(self, n_output: int) -> bool:
        return n_output >= self.off_until

    def record(self, proposed: int, emitted: int, n_output: int, break_even: float) -> None:
        """One verify step in which it made `proposed` ≥ 1 guesses and emitted `emitted` tokens
        (kept guesses + 1), leaving it with `n_output` output tokens."""
        self.proposed += proposed
        self.accepted += emitted - 1
        self.recent.append(emitted)
        if len(self.recent) == WINDOW and sum(self.recent) < break_even * WINDOW:
            self.off_until, self.backoff = n_output + self.backoff, 2 * self.backoff
            self.switched_off += 1
            self.recent.clear()

    def as_dict(self) -> dict:
        return {"proposed": self.proposed, "accepted": self.accepted}
