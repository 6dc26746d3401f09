"""`EngineStats`: one snapshot of an engine's slots, KV pages, queue and counters. No JAX here.

The scheduler fills in the slot, page and prefix-cache fields (`Scheduler.stats`), the runner adds
its request and prefill counters (`Runner.stats`), the engine loop whether it is draining
(`EngineLoop.stats`), and a mixture-of-experts engine the tokens routed to each expert in each layer
(`Engine.routed_tokens`), and a speculating runner its guesses. Data-parallel replicas add theirs
up: `a + b`, or `EngineStats.total(parts)`.
The gRPC `ServerStats` message (serve/messages.py) and the Prometheus gauges (serve/metrics.py)
are read from these fields; `EngineStats()` is the all-zero snapshot of an engine not loaded yet.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, fields


@dataclass(frozen=True)
class EngineStats:
    slots_total: int = 0  # decode slots
    slots_busy: int = 0  # slots holding a request (prefilling or decoding)
    queue_length: int = 0  # requests waiting for a slot
    pages_total: int = 0  # KV pages in the pool
    pages_free: int = 0  # pages holding nothing
    pages_cached: int = 0  # published pages no request holds: kept by the prefix cache, evictable
    pages_used: int = 0  # pages held by requests
    prompt_tokens: int = 0  # prompt tokens admitted to a slot (first admission; not recomputes)
    prefill_tokens_saved: int = 0  # of those, the ones served from the prefix cache
    prefill_tokens_computed: int = 0  # prompt tokens run through the model (recomputes included)
    preemptions: int = 0  # sequences sent back to the queue for lack of pages
    mixed_steps: int = 0  # steps whose running sequences decoded inside a prefill call (mixed_batch)
    evictions: int = 0  # cached pages evicted to make room
    requests_running: int = 0  # requests in a slot
    requests_finished: dict[str, int] = field(default_factory=dict, hash=False)  # by FinishReason value
    replicas: int = 1  # runners summed into this snapshot
    draining: bool = False  # the engine loop admits nothing new
    # [layer][expert]: real tokens each MoE layer routed to each expert since start-up (prompt,
    # scored and decoded tokens alike, the server's warm-up request too; not the prefill budget's
    # timing chunks); () for a dense model
    moe_routed: tuple[tuple[int, ...], ...] = ()
    # speculative decoding since start-up (the warm-up request too): guesses made and kept, and
    # [n] the verify steps in which a guessing sequence emitted n tokens (kept guesses + 1; index
    # 0 unused); () for an engine that does not speculate
    speculative_proposed: int = 0
    speculative_accepted: int = 0
    speculative_emitted: tuple[int, ...] = ()

    @property
    def speculative_acceptance(self) -> float:
        """Guesses kept / guesses made (0 before any)."""
        return self.speculative_accepted / self.speculative_proposed if self.speculative_proposed else 0.0

    @property
    def prefix_hit_rate(self) -> float:
        """Prompt tokens served from the prefix cache / prompt tokens admitted (0 before any)."""
        return self.prefill_tokens_saved / self.prompt_tokens if self.prompt_tokens else 0.0

    def __add__(self, other: EngineStats) -> EngineStats:
        """Two replicas' stats together: counts add up, finished requests add up per reason, and
        the sum is draining if either is."""
        if not isinstance(other, EngineStats):
            return NotImplemented
        values = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if f.name == "requests_finished":
                values[f.name] = {k: a.get(k, 0) + b.get(k, 0) for k in {**a, **b}}
            elif f.name == "draining":
                values[f.name] = a or b
            elif f.name == "speculative_emitted":  # replicas may compile different K: pad the shorter
                n = max(len(a), len(b))
                a, b = a + (0,) * (n - len(a)), b + (0,) * (n - len(b))
                values[f.name] = tuple(x + y for x, y in zip(a, b, strict=True))
            elif f.name == "moe_routed":  # replicas of one model: same [L][E] shape, or one is ()
                values[f.name] = tuple(map(_add_rows, a, b)) if a and b else a or b
            else:
                values[f.name] = a + b
        return EngineStats(**values)

    @staticmethod
    def total(parts: Iterable[EngineStats]) -> EngineStats:
        """The sum of one or more snapshots (replicas)."""
        parts = list(parts)
        out = parts[0]
        for p in parts[1:]:
            out = out + p
        return out


def _add_rows(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(x + y for x, y in zip(a, b, strict=True))
