"""When speculation pays: how many guesses a step makes, and which requests make them. No JAX here.

A verify step for a batch costs more than a decode step for it (K + 1 positions a row instead of
one), so it pays only when it emits enough more tokens. Three rules keep speculation from being
slower than plain decoding (`Speculation.propose` in runtime/spec_runner.py applies them):

- A request may opt out (`SamplingParams.speculative=False`): it never guesses.
- K by batch size (`EngineConfig.speculative_schedule`, like TensorRT-LLM's draft_len_schedule):
  entries (most sequences, K, break-even) in increasing order; a step with b running sequences
  guesses up to the K of the first entry with b ≤ most, and nothing past the last. Decode at batch
  1 reads the weights for one token (memory-bound), so K + 1 positions cost little more; at larger
  batches decode is compute-bound and a verify step costs several decode steps.
- A batch runs a verify step only when its rows' expected tokens (each guessing row's mean over its
  recent verify steps, 1 for the rest) are at least the entry's break-even times the rows: one row
  guessing well does not pay for eight. Otherwise its guessing rows count the step as one token (below).
- A request whose guesses mostly fail stops guessing: over its last WINDOW steps in which it may
  guess it must emit, on average, at least the entry's break-even tokens a step (the cost of that
  step in decode steps); below that it decodes plainly for BACKOFF output tokens (doubling each
  time it is switched off again), then tries again with an empty window. A step in which its
  n-gram lookup found nothing counts as one token: it still cost the batch its pipelining (the
  lookup needed the tokens in flight; runner.py).

The break-evens are what `python -m xlaserve.bench.spec` measured on SmolLM2-135M, 2-core CPU,
K = 4 (bench/results/cpu-spec-smollm2-*.md): a verify step costs c decode steps where c = mean
accepted length x off tok/s / forced tok/s on prompts whose guesses mostly fail (about 1.5 at
batch 1, about 3 at batch 8: XLA:CPU decode is compute-bound already at a few rows). With e tokens
emitted per verify step, speculation is faster iff e > c; for K guesses each kept with probability
a, e = 1 + a + ... + a^K.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

VERIFY_COST = 1.5  # verify / decode step time at batch 1 (K=4, CPU): an entry's default break-even
WINDOW = 8  # steps a request's acceptance is judged over
BACKOFF = 32  # output tokens a switched-off request decodes plainly before guessing again
# The default schedule: (most running sequences, K, break-even); K is capped at the largest
# compiled K. Nothing above 8 sequences: there a verify step costs more than K+1 decode tokens buy.
SCHEDULE = ((1, 16, VERIFY_COST), (8, 16, 3.0))
# With a draft model a verify step also costs the draft's propose call. For Qwen2.5-Coder-0.5B
# drafting for 1.5B, K=4, on the shared 2-core CPU (bench/results/cpu-spec-qwen2-5-coder-1-5b-draft-
# qwen2-5-coder-0-5b-2026-12-03.md): (verify + propose) / decode on idle slots 2.6 at batch 1 and
# 3.8 at batch 4; from tok/s (mean accepted length x off / forced) 2.6-3.0 and 2.5-3.4. Nothing
# above 4 sequences: not measured, so not assumed to pay.
DRAFT_SCHEDULE = ((1, 16, 2.6), (4, 16, 3.0))
# With a draft head a verify step also costs the head's propose call: K chained steps of one layer
# plus the target's lm_head, which for SmolLM2-135M (a 49k vocabulary) costs about a decode step.
# (verify + propose) / decode on idle slots at batch 1, K=4, shared 2-core CPU (load 3-5): 2.8, 3.2
# and 3.5 in three runs (bench/results/cpu-spec-smollm2-eagle-*2026-12-03.md); 2.2 at batch 4.
# Nothing above 1 sequence: no head measured so far guesses well enough to find out.
EAGLE_SCHEDULE = ((1, 16, 3.2),)
Entry = tuple[int, int, float]


def draft_schedule(most_k: int, entries: tuple[Entry, ...] = DRAFT_SCHEDULE) -> tuple[Entry, ...]:
    """`entries` (DRAFT_SCHEDULE: the default speculative_schedule with a draft model; EAGLE_SCHEDULE
    with a draft head) with K capped at most_k."""
    return tuple((b, min(k, most_k), c) for b, k, c in entries)


def resolve_schedule(schedule, most_k: int) -> tuple[Entry, ...]:
    """EngineConfig.speculative_schedule checked (ValueError naming the field) and resolved to
    (most, K, break-even) entries: a pair (most, K) gets VERIFY_COST; None gives SCHEDULE with K
    capped at most_k (the largest speculative_k); () without speculation (most_k 0)."""
    if not most_k:  # no speculation: any schedule is moot
        return ()
    if schedule is None:
        schedule = tuple((b, min(k, most_k), c) for b, k, c in SCHEDULE)
    entries = tuple((*e, VERIFY_COST) if len(e) == 2 else tuple(e) for e in schedule)
    ok = all(
        len(e) == 3
        and e[0] >= 1
        and 0 <= e[1] <= most_k
        and isinstance(e[2], int | float)
        and 1 <= e[2] <= 17
        for e in entries
    )
    if not ok or not all(a[0] < b[0] for a, b in itertools.pairwise(entries)):
        raise ValueError(
            f"speculative_schedule={schedule!r} must be (batch size ≥ 1, K in [0, {most_k}][, break-even "
            "tokens in [1, 17]]) entries in increasing batch size"
        )
    return entries


def schedule_k(schedule: tuple[Entry, ...], batch: int) -> tuple[int, float]:
    """(the most guesses per sequence, the break-even tokens a step) for a step of `batch` running
    sequences: those of the first entry with batch ≤ most; (0, 1.0) past the last."""
    return next(((k, c) for most, k, c in schedule if batch <= most), (0, 1.0))


@dataclass
class SpecCounts:
    """One request's speculation: its totals, and whether it guesses now.

    proposed: guesses it made; accepted: of those, the ones the target kept (a step's kept guesses
    count even when the request ended inside them, e.g. on EOS: they measure agreement)."""

    proposed: int = 0
    accepted: int = 0
    recent: deque = field(default_factory=lambda: deque(maxlen=WINDOW))  # tokens emitted a step
    # tokens emitted a verify step (steps that checked guesses only: a miss or a step the batch gate
    # refused says nothing about what a verify step would emit, and counted, one such first step
    # would hold its expected tokens at 1 below any break-even, so it would never verify)
    verified: deque = field(default_factory=lambda: deque(maxlen=WINDOW))
    off_until: int = 0  # output length before which it does not guess
    backoff: int = BACKOFF
    switched_off: int = 0  # times its acceptance fell below break-even

    def guessing(self, n_output: int) -> bool:
        return n_output >= self.off_until

    def expected(self, k: int) -> float:
        """Tokens it may be expected to emit in a verify step with k guesses: its recent verify steps'
        mean, and k + 1 (the most) while it has none (so it gets a try)."""
        return sum(self.verified) / len(self.verified) if self.verified else k + 1.0

    def record(self, proposed: int, emitted: int, n_output: int, break_even: float) -> None:
        """One step in which it may guess: it made `proposed` guesses (0: its lookup found none) and
        emitted `emitted` tokens (kept guesses + 1), with `n_output` output tokens then."""
        self.proposed += proposed
        self.accepted += emitted - 1
        self.recent.append(emitted)
        if proposed:
            self.verified.append(emitted)
        if len(self.recent) == WINDOW and sum(self.recent) < break_even * WINDOW:
            self.off_until, self.backoff = n_output + self.backoff, 2 * self.backoff
            self.switched_off += 1
            self.recent.clear()
            self.verified.clear()

    def as_dict(self) -> dict:
        return {"proposed": self.proposed, "accepted": self.accepted}


def speculative_fields(spec: dict | None, fields: dict, most_k: int) -> str | None:
    """LLM's `speculative` ({"method": "ngram" | "draft" | "eagle", "num_speculative_tokens": K in
    [1, most_k], "model": the draft model (draft), "head": a draft head's directory (eagle)}) into
    EngineConfig `fields` (speculative_k, and for a draft its schedule unless given); returns the
    draft model, if any. ValueError naming the field. A draft head's schedule, unless given, is
    EAGLE_SCHEDULE (its propose call costs about a decode step on SmolLM2)."""
    if spec is not None and "speculative_k" in fields:
        raise ValueError("give speculative={...} or speculative_k, not both")
    if spec is None:
        return None
    keys = {"method", "num_speculative_tokens", "model", "head"}
    methods = ("ngram", "draft", "eagle")
    if not isinstance(spec, dict) or spec.keys() - keys or spec.get("method") not in methods:
        raise ValueError(
            f"speculative={spec!r} must be a dict with method 'ngram', 'draft' or 'eagle', and "
            "optionally num_speculative_tokens, (draft) model and (eagle) head"
        )
    if (spec["method"] == "draft") != ("model" in spec):
        raise ValueError(f"speculative={spec!r}: 'model' (the draft model) goes with method 'draft' only")
    if (spec["method"] == "eagle") != ("head" in spec):
        raise ValueError(
            f"speculative={spec!r}: 'head' (a draft head's directory, xlaserve train-draft) goes with "
            "method 'eagle' only"
        )
    k = spec.get("num_speculative_tokens", 4)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= most_k:
        raise ValueError(f"num_speculative_tokens={k!r} must be an integer in [1, {most_k}]")
    fields["speculative_k"] = (k,)
    if spec["method"] in ("draft", "eagle"):  # unless given: break-evens that count the draft's cost
        entries = DRAFT_SCHEDULE if spec["method"] == "draft" else EAGLE_SCHEDULE
        fields.setdefault("speculative_schedule", draft_schedule(k, entries))
    return spec.get("model")
