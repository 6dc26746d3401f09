"""The prefill token budget, measured at start-up: how many prompt tokens one step may prefill,
counted as its prefill calls compute them (padded to their bucket and batch: prefill_calls.py).

A step runs its prompt chunks, then one decode for the running streams, and waits for its chunks
before the next step (runner.py). So a step's prefill is how long every running stream waits for
its next token, and how long a cancel or a deadline waits to stop a long prompt. A fixed budget
cannot bound that: the largest bucket (512 tokens) takes tens of milliseconds on a GPU and seconds
on two CPU cores. Unless the user sets `prefill_token_budget`, it is chosen from the time of one
chunk of each bucket on this engine (the fastest of up to three runs), measured after compile,
smallest bucket first and stopping at the first that exceeds the target `max_prefill_stall_s`. A
call of several rows costs about as much as one chunk of as many padded tokens, so the budget holds
either:

- the largest bucket fits: as many largest-bucket chunks as fit in the target (a fast device takes
  several chunks per step), but no more than one max_model_len prompt;
- else the largest bucket that fits (a budget between two buckets would pad each chunk up to the
  next bucket and pay for it);
- else the smallest bucket: one chunk per step is the least a step can do (logged as a warning).

A chunk costs more the deeper it starts (its attention reads every position before it): on two CPU
cores 16 tokens take 51 ms at position 0 and 81 ms at 479. Each bucket that fits at position 0 is
also timed at the deepest position a chunk of it can start, and a step's budget is chosen from the
times interpolated (linearly in the start) at its deepest prompt (`PrefillBudget.at`): short
prompts get the budget of position 0, a long prompt's late chunks the budget of their depth (it
used to be the deepest position's for every step: 16 tokens with max_model_len 8192).

The budget bounds a stall only while someone reads tokens as they come (`Request.streamed`); a
step with no such request in a slot prefills for throughput (up to a whole context: the
scheduler's `batch_budget`, set by runner.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from xlaserve.runtime.engine import to_host
from xlaserve.runtime.sampling import SamplingState
from xlaserve.runtime.sampling_params import SamplingParams

log = logging.getLogger("xlaserve")


@dataclass(frozen=True)
class PrefillBudget:
    tokens: int  # prompt tokens prefilled per step, across all prompts (measured: at position 0)
    target_s: float  # the stall it was chosen for (max_prefill_stall_s)
    seconds: dict[int, float] = field(default_factory=dict)  # bucket -> one chunk at 0; empty: user-set
    deep: dict[int, tuple[int, float]] = field(default_factory=dict)  # bucket -> (deepest start, s)
    buckets: tuple[int, ...] = ()
    max_model_len: int = 0

    @property
    def measured(self) -> bool:
        return bool(self.seconds)

    @property
    def batch(self) -> int:
        """A step's budget while no streamed request holds a slot (the scheduler's batch_budget):
        nobody waits on a stall, so a whole context."""
        return max(self.tokens, whole_context(self.buckets[-1], self.max_model_len))

    def at(self, start: int) -> int:
        """The budget of a step whose deepest chunk starts at position `start`: chosen from each
        bucket's time interpolated between position 0 and its deepest start (a bucket not timed
        deep does not fit)."""
        if not self.measured or start <= 0:
            return self.tokens
        times = {
            t: s + (self.deep[t][1] - s) * min(1.0, start / max(self.deep[t][0], 1))
            for t, s in self.seconds.items()
            if t in self.deep
        }
        return choose(times, self.buckets, self.max_model_len, self.target_s)

    def describe(self) -> str:
        if not self.measured:
            return f"prefill token budget: {self.tokens} tokens per step (prefill_token_budget)"
        times = ", ".join(f"{t} tokens {s * 1e3:.0f} ms" for t, s in self.seconds.items())
        deep = ", ".join(f"{t} tokens {s * 1e3:.0f} ms at {p}" for t, (p, s) in self.deep.items())
        return (
            f"prefill token budget: {self.tokens} tokens per step at position 0, "
            f"{self.at(self.max_model_len)} at the deepest, for a stall of at most "
            f"{self.target_s * 1e3:.0f} ms per step (max_prefill_stall_s; one chunk at position 0: "
            f"{times}; deepest: {deep or 'none fits at 0'})"
        )


def _time(engine, n: int, start: int, runs: int, target_s: float) -> float:
    """The fastest of up to `runs` runs of one n-token chunk at `start`, stopping at one within
    `target_s`: other processes on a shared machine only ever slow a run down, and one run within
    the target shows the engine's chunk fits it."""
    e = engine.ecfg
    sampling = SamplingState.of(SamplingParams(temperature=0.0), 0)
    presence = np.zeros((engine.cfg.vocab_size,), bool)
    row = np.zeros((e.pages_per_seq,), np.int32)
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        to_host(engine.prefill([0] * n, start, row, sampling, presence))
        best = min(best, time.perf_counter() - t0)
        if best <= target_s:
            break
    return best


def measure(engine, target_s: float, tries: int = 3) -> tuple[dict[int, float], dict[int, tuple[int, float]]]:
    """(bucket -> seconds of one chunk at position 0, smallest first, up to the first over
    `target_s`; bucket -> (its deepest start, seconds there) for those within it). A bucket over the
    target is run again, up to `tries` times (a single unlucky run used to cut the budget to the
    smallest bucket, and so every step to one prompt). The chunks write only page 0 (nothing holds
    a page before the first request)."""
    e = engine.ecfg
    seconds, deep = {}, {}
    for i, t in enumerate(e.prefill_buckets):
        n = min(t, e.max_model_len - 1)
        if e.prefill_bucket(n) != t:  # no chunk can use this bucket: prompts are shorter
            break
        if i == 0:
            _time(engine, n, 0, 1, 0.0)  # the first call after compile warms up
        seconds[t] = _time(engine, n, 0, tries, target_s)
        if seconds[t] > target_s:
            break
        start = e.max_model_len - n - 1
        deep[t] = (start, _time(engine, n, start, tries, target_s) if start > 0 else seconds[t])
    engine.routed_tokens(wait=True, reset=True)  # measuring is not traffic: no expert load to report
    return seconds, deep


def choose(seconds: dict[int, float], buckets: tuple[int, ...], max_model_len: int, target_s: float) -> int:
    """The budget for measured `seconds` (see the module docstring)."""
    fits = [t for t in buckets if t in seconds and seconds[t] <= target_s]
    if not fits:
        return buckets[0]
    largest = buckets[-1]
    if fits[-1] != largest:
        return fits[-1]
    chunks = int(target_s // max(seconds[largest], 1e-9))
    return min(largest * max(1, chunks), whole_context(largest, max_model_len))


def whole_context(largest: int, max_model_len: int) -> int:
    """Largest-bucket chunks enough for one max_model_len prompt: the most a step prefills."""
    return largest * -(-max_model_len // largest)


def prefill_budget(engine, *, measure_it: bool = True) -> PrefillBudget:
    """The user's prefill_token_budget, else one measured on `engine` (else, when `measure_it` is
    off, the largest bucket)."""
    e = engine.ecfg
    if e.prefill_token_budget is not None or not measure_it:
        return PrefillBudget(e.prefill_token_budget or e.prefill_buckets[-1], e.max_prefill_stall_s)
    seconds, deep = measure(engine, e.max_prefill_stall_s)
    budget = PrefillBudget(
        choose(seconds, e.prefill_buckets, e.max_model_len, e.max_prefill_stall_s),
        e.max_prefill_stall_s,
        seconds,
        deep,
        tuple(e.prefill_buckets),
        e.max_model_len,
    )
    smallest = e.prefill_buckets[0]
    if seconds[smallest] > e.max_prefill_stall_s:
        log.warning(
            "one prefill chunk of %d tokens takes %.0f ms, over max_prefill_stall_s=%.0f ms: a step "
            "prefills one such chunk (a smaller prefill bucket would bound the stall further)",
            smallest,
            seconds[smallest] * 1e3,
            e.max_prefill_stall_s * 1e3,
        )
    return budget
