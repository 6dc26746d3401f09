"""The prefill token budget, measured at start-up: how many prompt tokens one step may prefill,
counted as its prefill calls compute them (padded to their bucket and batch: prefill_calls.py).

A step runs its prompt chunks, then one decode for the running streams, and waits for its chunks
before the next step (runner.py). So a step's prefill is how long every running stream waits for
its next token, and how long a cancel or a deadline waits to stop a long prompt. A fixed budget
cannot bound that: the largest bucket (512 tokens) takes tens of milliseconds on a GPU and seconds
on two CPU cores. Unless the user sets `prefill_token_budget`, it is chosen from the time of one
chunk of each bucket on this engine (the fastest of up to three runs), measured after compile at
the deepest position a chunk can start (attention over a whole context: the slowest chunk of that
bucket), smallest bucket first and stopping at the first that exceeds the target
`max_prefill_stall_s`. A call of several rows costs about as much as one chunk of as many padded
tokens, so the budget holds either:

- the largest bucket fits: as many largest-bucket chunks as fit in the target (a fast device takes
  several chunks per step), but no more than one max_model_len prompt;
- else the largest bucket that fits (a budget between two buckets would pad each chunk up to the
  next bucket and pay for it);
- else the smallest bucket: one chunk per step is the least a step can do (logged as a warning).
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
    tokens: int  # prompt tokens prefilled per step, across all prompts
    target_s: float  # the stall it was chosen for (max_prefill_stall_s)
    seconds: dict[int, float] = field(default_factory=dict)  # bucket -> one chunk; empty: user-set

    @property
    def measured(self) -> bool:
        return bool(self.seconds)

    def describe(self) -> str:
        if not self.measured:
            return f"prefill token budget: {self.tokens} tokens per step (prefill_token_budget)"
        times = ", ".join(f"{t} tokens {s * 1e3:.0f} ms" for t, s in self.seconds.items())
        return (
            f"prefill token budget: {self.tokens} tokens per step, for a stall of at most "
            f"{self.target_s * 1e3:.0f} ms per step (max_prefill_stall_s; one chunk at the deepest "
            f"position: {times})"
        )


def measure(engine, target_s: float, tries: int = 3) -> dict[int, float]:
    """Seconds of one prefill chunk per bucket, smallest first, up to the first over `target_s`.
    A bucket over the target is run again, up to `tries` times, and its fastest run kept: other
    processes on a shared machine only ever slow a run down, and one run within the target shows
    the engine's chunk fits it (a single unlucky run used to cut the budget to the smallest bucket,
    and so every step to one prompt). The chunks write only page 0 (nothing holds a page before the
    first request)."""
    e = engine.ecfg
    sampling = SamplingState.of(SamplingParams(temperature=0.0), 0)
    presence = np.zeros((engine.cfg.vocab_size,), bool)
    row = np.zeros((e.pages_per_seq,), np.int32)
    seconds = {}
    for i, t in enumerate(e.prefill_buckets):
        n = min(t, e.max_model_len - 1)
        if e.prefill_bucket(n) != t:  # no chunk can use this bucket: prompts are shorter
            break
        start = e.max_model_len - n - 1
        runs = []
        for _ in range(tries + (i == 0)):  # the first call after compile also warms up
            t0 = time.perf_counter()
            to_host(engine.prefill([0] * n, start, row, sampling, presence))
            runs.append(time.perf_counter() - t0)
            if runs[-1] <= target_s and (i > 0 or len(runs) > 1):
                break
        seconds[t] = min(runs[1:] if i == 0 else runs)
        if seconds[t] > target_s:
            break
    engine.routed_tokens(wait=True, reset=True)  # measuring is not traffic: no expert load to report
    return seconds


def choose(seconds: dict[int, float], buckets: tuple[int, ...], max_model_len: int, target_s: float) -> int:
    """The budget for measured `seconds` (see the module docstring)."""
    fits = [t for t in buckets if t in seconds and seconds[t] <= target_s]
    if not fits:
        return buckets[0]
    largest = buckets[-1]
    if fits[-1] != largest:
        return fits[-1]
    chunks = int(target_s // max(seconds[largest], 1e-9))
    return largest * max(1, min(chunks, -(-max_model_len // largest)))


def prefill_budget(engine, *, measure_it: bool = True) -> PrefillBudget:
    """The user's prefill_token_budget, else one measured on `engine` (else, when `measure_it` is
    off, the largest bucket)."""
    e = engine.ecfg
    if e.prefill_token_budget is not None or not measure_it:
        return PrefillBudget(e.prefill_token_budget or e.prefill_buckets[-1], e.max_prefill_stall_s)
    seconds = measure(engine, e.max_prefill_stall_s)
    budget = PrefillBudget(
        choose(seconds, e.prefill_buckets, e.max_model_len, e.max_prefill_stall_s),
        e.max_prefill_stall_s,
        seconds,
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
