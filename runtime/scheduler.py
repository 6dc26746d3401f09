"""The slot manager: which requests run, where their KV lives. Plain Python, no JAX.

Each step the scheduler returns a `Plan` (prefill chunks to run, whether to dispatch a decode) and
the executor (`runner.py`) carries it out on the engine, then reports back. Requests wait in a FIFO
queue; a free decode slot admits the next one; its prompt is prefilled in chunks, at most
`token_budget` prompt tokens per step, so a long prompt never stalls the running streams for more
than one chunk; then it joins the decode batch. Pages are allocated lazily: a prompt chunk takes the
pages it writes, a decode dispatch the pages its k tokens will fill. When the pool runs dry the
newest running sequence is preempted: its pages return to the pool and it waits at the head of the
queue to be recomputed from its prompt and the tokens it already produced.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

import numpy as np
from xlaserve.runtime.pages import OutOfPages, PageAllocator
from xlaserve.runtime.request import Request


class State(enum.Enum):
    WAITING = "waiting"
    PREFILL = "prefill"
    RUNNING = "running"
    DONE = "done"


@dataclass(eq=False)
class Seq:
    """A request's place in the engine."""

    req: Request
    state: State = State.WAITING
    slot: int | None = None
    pages: list[int] = field(default_factory=list)
    computed: int = 0  # tokens of `tokens()` already in the cache

    def tokens(self) -> list[int]:
        """What the cache must hold before decoding: the prompt, then (after a preemption) the
        tokens produced so far."""
        return self.req.prompt_ids + self.req.output_ids

    @property
    def length(self) -> int:
        """Tokens in the cache while RUNNING: all but the last sampled (the next decode input)."""
        return len(self.req.prompt_ids) + len(self.req.output_ids) - 1


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


class Scheduler:
    def __init__(
        self,
        *,
        max_slots: int,
        page_size: int,
        pages_per_seq: int,
        num_pages: int,
        max_model_len: int,
        decode_steps: int,
        chunk: int,
        token_budget: int | None = None,
    ):
        self.page_size = page_size
        self.max_model_len = max_model_len
        self.decode_steps = decode_steps
        self.chunk = chunk
        self.token_budget = token_budget or chunk
        self.pages = PageAllocator(num_pages)
        self.page_table = np.zeros((max_slots, pages_per_seq), np.int32)
        self.slots: list[Seq | None] = [None] * max_slots
        self.waiting: deque[Seq] = deque()
        self.preemptions = 0
        self._freed: list[int] = []

    # -- queries ----------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or any(s is not None for s in self.slots)

    def running(self) -> list[Seq]:
        return [s for s in self.slots if s is not None and s.state is State.RUNNING]

    # -- events -----------------------------------------------------------------------------------

    def add(self, req: Request) -> Seq:
        seq = Seq(req)
        self.waiting.append(seq)
        return seq

    def plan(self) -> Plan:
        self._admit()
        prefills, budget = [], self.token_budget
        for seq in self._by_arrival(State.PREFILL):
            todo, start = seq.tokens(), seq.computed
            while budget > 0 and start < len(todo):
                n = min(len(todo) - start, self.chunk, budget)
                if not self._grow(seq, start + n):
                    break
                prefills.append(Chunk(seq, start, todo[start : start + n]))
                start, budget = start + n, budget - n
        decode = self._decode_batch()
        stuck = self._by_arrival(State.PREFILL)
        if not prefills and not decode and len(stuck) > 1:
            # Every slot is mid-prefill and the pool is dry: the newest gives its pages back.
            self._preempt(stuck[-1])
        kv = max((s.length + self.decode_steps for s in decode), default=0)
        freed, self._freed = self._freed, []
        return Plan(prefills, decode, min(kv, self.page_table.shape[1] * self.page_size), freed)

    def prefilled(self, chunk: Chunk) -> None:
        """A chunk ran; after the last one the sequence decodes (its first new token was sampled)."""
        seq = chunk.seq
        seq.computed = chunk.start + len(chunk.tokens)
        if chunk.last:
            seq.state = State.RUNNING

    def finish(self, seq: Seq) -> None:
        """Release the slot and pages of a finished (or cancelled) sequence."""
        if seq.state is State.WAITING:
            self.waiting.remove(seq)
        elif seq.slot is not None:
            self.slots[seq.slot] = None
            self.page_table[seq.slot] = 0
            seq.slot = None
        self.pages.release(seq.pages)
        seq.pages = []
        seq.state = State.DONE

    # -- internals --------------------------------------------------------------------------------

    def _by_arrival(self, state: State) -> list[Seq]:
        seqs = [s for s in self.slots if s is not None and s.state is state]
        return sorted(seqs, key=lambda s: s.req.timings.arrival)

    def _admit(self) -> None:
        for slot, occupant in enumerate(self.slots):
            if occupant is None and self.waiting:
                seq = self.waiting.popleft()
                seq.slot, seq.state, seq.computed = slot, State.PREFILL, 0
                self.slots[slot] = seq

    def _grow(self, seq: Seq, tokens: int) -> bool:
        """Give `seq` pages for its first `tokens` tokens (capped at the table width)."""
        need = min(-(-tokens // self.page_size), self.page_table.shape[1]) - len(seq.pages)
        if need <= 0:
            return True
        try:
            new = self.pages.alloc(need)
        except OutOfPages:
            return False
        self.page_table[seq.slot, len(seq.pages) : len(seq.pages) + need] = new
        seq.pages += new
        return True

    def _decode_batch(self) -> list[Seq]:
        """Running sequences with pages for their next k tokens, preempting the newest when the pool
        is dry."""
        while True:
            running = self._by_arrival(State.RUNNING)
            short = next((s for s in running if not self._grow(s, s.length + self.decode_steps)), None)
            if short is None:
                return running
            self._preempt(running[-1])

    def _preempt(self, seq: Seq) -> None:
        self.preemptions += 1
        self._freed.append(seq.slot)
        self.slots[seq.slot] = None
        self.page_table[seq.slot] = 0
        self.pages.release(seq.pages)
        seq.pages, seq.slot, seq.computed, seq.state = [], None, 0, State.WAITING
        self.waiting.appendleft(seq)
