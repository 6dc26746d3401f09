"""What the scheduler tracks of a request (`Seq`, its `State`) and what a step asks of the engine
(`Plan`, its prompt `Chunk`s). Plain data, no JAX (scheduler.py decides, runner.py carries out)."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

from xlaserve.runtime.request import Request


class State(enum.Enum):
    WAITING = "waiting"
    PREFILL = "prefill"
    RUNNING = "running"
    DONE = "done"


_order = itertools.count()


@dataclass(eq=False)
class Seq:
    """A request's place in the engine."""

    req: Request
    state: State = State.WAITING
    slot: int | None = None
    pages: list[int] = field(default_factory=list)
    computed: int = 0  # tokens of `tokens()` whose K/V is in the cache (or being written)
    inflight: int = 0  # decode tokens dispatched whose results the host has not seen yet
    hashes: list[int] = field(default_factory=list)  # chain hashes of its full pages, in order
    published: int = 0  # leading pages already published to the prefix cache
    dropped: int = 0  # leading pages returned to the pool: every layer's window has slid past them
    order: int = field(default_factory=lambda: next(_order))

    def tokens(self) -> list[int]:
        """What the cache must hold before decoding: the prompt, then (after a preemption) the
        tokens produced so far."""
        return self.req.prompt_ids + self.req.output_ids

    @property
    def length(self) -> int:
        """Tokens in the cache while RUNNING as far as the host knows: all but the last sampled
        (the next decode input)."""
        return len(self.req.prompt_ids) + len(self.req.output_ids) - 1

    @property
    def rank(self) -> tuple:
        """Queue order: higher priority first, then earlier arrival."""
        return (-self.req.priority, self.req.timings.arrival, self.order)


@dataclass
class Chunk:
    seq: Seq
    start: int
    tokens: list[int]

    @property
    def last(self) -> bool:
        return self.start + len(self.tokens) == len(self.seq.tokens())


@dataclass
class Plan:
    prefills: list[Chunk]
    decode: list[Seq]  # the running sequences of this dispatch (empty: no decode)
    kv_tokens: int = 0  # every decoded sequence's length after the dispatch is ≤ this
    freed_slots: list[int] = field(default_factory=list)  # preempted: free these on device first
    copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) pages: copy before prefill
    # running sequences whose next token is a one-token chunk in the first prefill call, before
    # the prompts' chunks (a mixed step; `decode` is then empty)
    mixed: list[Seq] = field(default_factory=list)
