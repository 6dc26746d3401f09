"""The slot manager: which requests run, where their KV lives. Plain Python, no JAX.

Each step the scheduler returns a `Plan` (prompt chunks to prefill, the slots to decode) and the
executor (`runner.py`) carries it out on the engine, then reports back. Requests wait ordered by
priority (higher first), then arrival; a free decode slot admits the next one, except that scoring
and generation share slots and the per-step token budget fairly (fairness.py). Its prompt is looked
up in the prefix cache page by page (then token by token in one copied page: pages.py), and only
the rest is prefilled, in chunks within a per-step token budget across all prompts (measured at
start-up, by the depth of the prompts: budget.py), so a long prompt never stalls running streams for
more than one step's budget, and a cancel or deadline stops it at the next step (a step with no
streamed request in a slot prefills for throughput). Generation chunks are charged the padded tokens
of the prefill calls they go in (prefill_calls.py): several prompts share a call, and a step fills
the rows it pays for. Then the sequence joins the decode batch. A scheduler that mixes (`mix`) puts
the running sequences' next tokens in a step's first prefill call, as one-token chunks, instead of
a decode of their own (`Plan.mixed`; runner.py). Pages are taken lazily: a chunk
takes the pages it writes, a decode dispatch the pages its k tokens will fill. Full pages are
published to the prefix cache as soon as their K/V is written. When the pool runs dry the victim
(lowest priority, then the most recent) is preempted: its pages go back and it is recomputed later
from its prompt and the tokens it already produced; its published pages usually survive in the
cache, so recomputing it is mostly cache hits.

What a request must fit to be queued (`Limits`, and the refusals) is admission.py; `stats()` is a
snapshot of the slots, pages and prefix cache as an `EngineStats`.
"""

from __future__ import annotations

import time

import numpy as np

from xlaserve.runtime.admission import Limits
from xlaserve.runtime.fairness import Fairness
from xlaserve.runtime.pages import OutOfPages, PageAllocator, chain_hash
from xlaserve.runtime.prefill_calls import Item, take
from xlaserve.runtime.request import Request
from xlaserve.runtime.sequence import Chunk, Plan, Seq, State
from xlaserve.runtime.stats import EngineStats


class Scheduler:
    def __init__(
        self,
        *,
        max_slots: int,
        page_size: int,
        pages_per_seq: int,
        num_pages: int,
        decode_steps: int,
        chunk: int,
        limits: Limits,
        token_budget: int | None = None,
        prefix_cache: bool = True,
        window: int | None = None,
        score_budget: int | None = None,
        score_calls=None,
        calls=None,
        budget_at=None,
        batch_budget: int | None = None,
        mix: bool = False,
    ):
        """window: when every layer attends only to its last `window` positions (the largest
        window of the model), a running sequence's pages that fall out of it go back to the pool.
        score_budget, score_calls (the engine's prefill_calls.ScoreCalls): a step with only scoring
        to prefill and nothing decoding fills score_budget padded tokens (`_score_chunks`); None:
        such steps take token_budget like any other. calls (the engine's prefill_calls.Batched or
        Packed): generation chunks cost the padded tokens of their calls (`_take`); None: their
        tokens. budget_at (deepest start -> budget: budget.PrefillBudget.at; None:
        token_budget); batch_budget: a step's while no request in a slot is streamed (None: same).
        mix: a step that prefills takes the running sequences' next tokens in its first packed call,
        as one-token chunks (`Plan.mixed`; calls must be prefill_calls.Packed)."""
        self.page_size = page_size
        self.window = window
        self.decode_steps = decode_steps
        self.chunk = chunk
        self.limits = limits
        self.token_budget = token_budget or chunk
        self.prefix_cache = prefix_cache
        self.score_budget, self.score_calls, self.calls = score_budget, score_calls, calls
        self.budget_at, self.batch_budget, self.mix = budget_at, batch_budget, mix
        self.pages = PageAllocator(num_pages)
        self.page_table = np.zeros((max_slots, pages_per_seq), np.int32)
        self.slots: list[Seq | None] = [None] * max_slots
        self.waiting: list[Seq] = []  # kept sorted by rank
        self.fair = Fairness()
        self.preemptions = 0
        self.prompt_tokens = 0  # prompt tokens admitted to a slot
        self.cached_tokens = 0  # of which served from the prefix cache
        self._freed: list[int] = []
        self._copies: list[tuple[int, int]] = []  # this plan's page copies
        self._holds: list[int] = []  # their source pages, held until the plan is made

    # -- queries ----------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or any(s is not None for s in self.slots)

    def running(self) -> list[Seq]:
        return [s for s in self.slots if s is not None and s.state is State.RUNNING]

    def stats(self) -> EngineStats:
        """Slots, pages, queue and prefix-cache counters (the runner adds its own)."""
        return EngineStats(
            slots_total=len(self.slots),
            slots_busy=sum(s is not None for s in self.slots),
            queue_length=len(self.waiting),
            pages_total=self.pages.num_pages,
            pages_free=self.pages.free_count - self.pages.cached_count,
            pages_cached=self.pages.cached_count,
            pages_used=self.pages.used_count,
            prompt_tokens=self.prompt_tokens,
            prefill_tokens_saved=self.cached_tokens,
            preemptions=self.preemptions,
            evictions=self.pages.evictions,
        )

    # -- admission ---------------------------------------------------------------------------------

    def check(self, req: Request) -> None:
        """Refuse a request that can never run (RequestTooLarge); nothing changes."""
        self.limits.check(req)

    def add(self, req: Request) -> Seq:
        """Queue a request, or refuse it (RequestTooLarge, Overloaded) leaving everything as it was."""
        self.limits.check(req)
        self.limits.check_room(
            req,
            waiting=len(self.waiting),
            free_slots=self.slots.count(None),
            in_flight=(s.req for s in self._all()),
        )
        seq = Seq(req)
        self._enqueue(seq)
        return seq

    # -- steps ------------------------------------------------------------------------------------

    def plan(self) -> Plan:
        self._admit()
        # Running sequences take their pages first; prompts being prefilled take what is left (a
        # prompt never preempts a running stream: that would thrash, each recomputing the other).
        decode = self._decode_batch()
        prefilling = self._in_slots(State.PREFILL)
        prefills, budget = [], self._budget(prefilling)
        scoring_only = prefilling and all(s.req.score_start is not None for s in prefilling)
        if scoring_only and not decode and self.score_budget:
            prefills, budget = self._score_chunks(prefilling), 0
        rows = self._mixed_rows(decode, prefilling, budget)
        budget -= self.calls.cost(rows) if rows else 0
        calls: list[Item] = list(rows)  # the step's generation chunks, as prefill_calls items
        for seq in self.fair.order(prefilling) if budget else ():
            todo, start = seq.tokens(), seq.computed
            while start < len(todo):
                n, cost, item = self._take(seq, len(todo) - start, calls, budget, len(rows))
                if not n or not self._grow(seq, start + n):
                    break
                prefills.append(Chunk(seq, start, todo[start : start + n]))
                calls += [item] if item else []
                start, budget = start + n, budget - cost
        mixed = []
        if rows and len(self.calls.group(calls)[0]) > len(rows):  # a prompt's chunk joined the rows
            decode, mixed = [], decode
        stuck = self._in_slots(State.PREFILL)
        if not prefills and not decode and len(stuck) > 1:
            # Every busy slot is mid-prefill and the pool is dry: the last in line gives its pages back.
            self._preempt(self._victim(stuck))
        kv = max((s.length + s.inflight + self.decode_steps for s in decode), default=0)
        freed, self._freed = self._freed, []
        copies, self._copies = self._copies, []
        self.pages.release(self._holds)  # the copies are dispatched before anything this plan writes
        self._holds = []
        kv = min(kv, self.page_table.shape[1] * self.page_size)
        return Plan(prefills, decode, kv, freed, copies, mixed)

    def _mixed_rows(self, decode: list[Seq], prefilling: list[Seq], budget: int) -> list[Item]:
        """A mixed step's decode rows (prefill_calls items of one token each): `decode` when the
        scheduler mixes, prompts to generate from wait in slots, no grammar sequence decodes (its
        masked step is a call of its own) and the budget leaves room for a chunk beside the rows;
        else none."""
        generating = any(s.req.score_start is None for s in prefilling)
        if not (self.mix and decode and generating) or any(s.req.grammar is not None for s in decode):
            return []
        rows = [(s, 1, False) for s in decode]
        return rows if budget > self.calls.cost(rows) else []

    def _budget(self, prefilling: list[Seq]) -> int:
        """This step's: by its deepest prompt while a streamed request holds a slot, else batch_budget."""
        if self.batch_budget and not any(s.req.streamed for s in self.slots if s is not None):
            return self.batch_budget
        deepest = max((s.computed for s in prefilling), default=0)
        return self.budget_at(deepest) if self.budget_at else self.token_budget

    def _take(
        self, seq: Seq, left: int, calls: list[Item], budget: int, rows: int
    ) -> tuple[int, int, Item | None]:
        """(tokens of `seq`'s next chunk, of its `left` to prefill; their cost of the budget; its
        prefill_calls item, None when scoring): 0 tokens when nothing fits (prefill_calls.take). A
        scoring chunk, or any chunk without the engine's batches, costs its tokens."""
        n = min(left, self.chunk)
        if seq.req.score_start is not None or self.calls is None:
            n = min(n, budget)
            return (n, n, None) if n > 0 else (0, 0, None)
        masked = seq.req.grammar is not None  # its last chunk is a call of its own (masked prefill)
        return take(seq, n, left, masked, calls, budget, self.calls, rows)

    def _score_chunks(self, seqs: list[Seq]) -> list[Chunk]:
        """The chunks of a step that only scores: no stream waits on it, so instead of the token
        budget (bounding running streams' stall) it fills a scoring call (`score_calls.room`).
        Batched, a prompt that fits no longer goes whole or waits for the next step (split, it
        would pad a row in each; the first chunk always goes); packed, the last one is split."""
        how, chunks, budget = self.score_calls, [], self.score_calls.room(self.score_budget)
        for seq in seqs:
            todo, start = seq.tokens(), seq.computed
            while start < len(todo):
                n = min(len(todo) - start, self.chunk, budget if how.split else len(todo))
                if n <= 0 or (chunks and how.cost(n) > budget) or not self._grow(seq, start + n):
                    return chunks
                chunks.append(Chunk(seq, start, todo[start : start + n]))
                start, budget = start + n, budget - how.cost(n)
        return chunks

    def prefilled(self, chunk: Chunk) -> None:
        """A chunk was dispatched; after the last one the sequence decodes."""
        seq = chunk.seq
        seq.computed = chunk.start + len(chunk.tokens)
        self._publish(seq, seq.computed)
        if chunk.last:
            seq.state = State.RUNNING

    def dispatched(self, seqs: list[Seq]) -> None:
        """A decode dispatch for `seqs` is in flight."""
        for s in seqs:
            s.inflight += self.decode_steps

    def decoded(self, seq: Seq) -> None:
        """The host has read a dispatch's results for `seq` (its output_ids grew)."""
        seq.inflight = max(0, seq.inflight - self.decode_steps)
        if seq.state is State.RUNNING:
            self._publish(seq, seq.length)
            self._slide(seq)

    def reserve(self, seq: Seq, tokens: int) -> int:
        """Pages for `seq`'s first `tokens` tokens if the pool has them now (never preempting: a
        speculative step's guesses are optional). Returns how many tokens its pages hold."""
        self._grow(seq, tokens)
        return len(seq.pages) * self.page_size

    def expired(self, now: float) -> list[Seq]:
        """Sequences (waiting or in a slot) whose deadline has passed."""
        return [s for s in self._all() if s.req.deadline is not None and now >= s.req.deadline]

    def finish(self, seq: Seq) -> None:
        """Release the slot and pages of a finished, cancelled or expired sequence."""
        if seq.state is State.DONE:
            return
        if seq.state is State.WAITING:
            self.waiting.remove(seq)
        elif seq.slot is not None:
            self._publish_tail(seq)
            self.slots[seq.slot] = None
            self.page_table[seq.slot] = 0
            seq.slot = None
        self.pages.release(seq.pages[seq.dropped :])
        seq.pages, seq.dropped = [], 0
        seq.state = State.DONE

    # -- internals --------------------------------------------------------------------------------

    def _all(self) -> list[Seq]:
        return [s for s in self.slots if s is not None] + self.waiting

    def _enqueue(self, seq: Seq) -> None:
        self.waiting.append(seq)
        self.waiting.sort(key=lambda s: s.rank)

    def _in_slots(self, state: State) -> list[Seq]:
        return sorted((s for s in self.slots if s is not None and s.state is state), key=lambda s: s.rank)

    def _admit(self) -> None:
        for slot, occupant in enumerate(self.slots):
            if occupant is None and self.waiting:
                seq = self.waiting.pop(self.fair.pick(self.waiting, self.slots))
                seq.slot, seq.state, seq.computed, seq.inflight = slot, State.PREFILL, 0, 0
                self.slots[slot] = seq
                self._hit_prefix(seq)

    def _hit_prefix(self, seq: Seq) -> None:
        """Map the longest cached prefix of whole pages (never the last token: its logits are needed)."""
        tokens, ps = seq.tokens(), self.page_size
        seq.hashes, seq.published = [], 0
        prev = None
        for i in range(len(tokens) // ps):
            prev = chain_hash(prev, tokens[i * ps : (i + 1) * ps])
            seq.hashes.append(prev)
        hits = []
        seq.req.timings.scheduled = seq.req.timings.scheduled or time.perf_counter()
        # Never cache-hit the last token (its logits are needed), nor, when scoring, any position
        # whose logits give a scored token's log-prob.
        score = seq.req.score_start
        needed_from = (len(tokens) if score is None else min(len(tokens), score)) - 1
        if self.prefix_cache:
            for i in range(needed_from // ps):
                page = self.pages.lookup(seq.hashes[i], tokens[i * ps : (i + 1) * ps])
                if page is None:
                    break
                hits.append(page)
        self.pages.share(hits)
        seq.pages = hits
        self.page_table[seq.slot, : len(hits)] = hits
        seq.computed = seq.published = len(hits)
        seq.computed *= ps
        if self.prefix_cache and seq.computed < needed_from:
            self._hit_within_page(seq, tokens[seq.computed : min(seq.computed + ps, needed_from)])
        if not seq.req.output_ids:  # the first admission counts; a recompute after preemption does not
            self.prompt_tokens += len(tokens)
            self.cached_tokens += seq.computed
            seq.req.cached_tokens = seq.computed

    def _hit_within_page(self, seq: Seq, want: list[int]) -> None:
        """After the whole pages: the published page (full, or a tail) after the same prefix holding
        the most of `want` (the next page's tokens up to the first needed) is copied into a page of
        the sequence's own, and only what follows is prefilled. Its source stays held until the plan
        is made, so no allocation of this plan evicts it before the copy (dispatched first) reads it."""
        i = len(seq.pages)
        src, n = self.pages.longest(seq.hashes[i - 1] if i else None, want)
        if not n:
            return
        self.pages.share([src])
        self._holds.append(src)
        if self._grow(seq, i * self.page_size + 1):
            self._copies.append((src, seq.pages[i]))
            seq.computed += n

    def _publish_tail(self, seq: Seq) -> None:
        """As a sequence in a slot lets go of its pages: its partly written last page becomes a tail
        (pages.py), so a later prompt with the same tokens copies their K/V instead of computing it."""
        valid = seq.length if seq.state is State.RUNNING else seq.computed
        i, n = divmod(valid, self.page_size)
        if self.prefix_cache and n and seq.dropped <= i < len(seq.pages):
            self._publish(seq, valid)  # (and the chain hashes up to page i)
            tokens = seq.tokens()[i * self.page_size : valid]
            self.pages.publish_tail(seq.pages[i], tokens, seq.hashes[i - 1] if i else None)

    def _publish(self, seq: Seq, written: int) -> None:
        """Publish the pages entirely below position `written` (their K/V is in the cache)."""
        if not self.prefix_cache:
            return
        tokens, ps = seq.tokens(), self.page_size
        while len(seq.hashes) < len(tokens) // ps:  # decode filled more pages
            i = len(seq.hashes)
            prev = seq.hashes[-1] if seq.hashes else None
            seq.hashes.append(chain_hash(prev, tokens[i * ps : (i + 1) * ps]))
        full = min(written // ps, len(seq.hashes), len(seq.pages))
        for i in range(seq.published, full):
            prev = seq.hashes[i - 1] if i else None
            self.pages.publish(seq.pages[i], seq.hashes[i], tokens[i * ps : (i + 1) * ps], prev)
        seq.published = max(seq.published, full)

    def _slide(self, seq: Seq) -> None:
        """Return the pages below every layer's window to the pool (after publishing them, so the
        prefix cache keeps them while unclaimed). The next query is at position `length` and sees
        positions > length - window; later ones see less. The table keeps a valid page id (0) in
        the dropped entries: the attention masks those positions and the kernels skip them."""
        if self.window is None or seq.slot is None:
            return
        below = min(max(0, seq.length - self.window + 1) // self.page_size, len(seq.pages))
        if below > seq.dropped:
            self.pages.release(seq.pages[seq.dropped : below])
            self.page_table[seq.slot, seq.dropped : below] = 0
            seq.dropped = below

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
        """Running sequences with pages for their next k tokens (beyond those in flight),
        preempting victims (running or mid-prefill, the last in line) while the pool is dry. None
        when the tokens in flight take every one to its length limit (the host ends them on reading
        those): a dispatch then would only delay the next step's prompts."""
        while True:
            running = self._in_slots(State.RUNNING)
            if running and all(self._ends_in_flight(s) for s in running):
                return []
            need = self.decode_steps
            short = next((s for s in running if not self._grow(s, s.length + s.inflight + need)), None)
            if short is None:
                return running
            self._preempt(self._victim(running + self._in_slots(State.PREFILL)))

    def _ends_in_flight(self, seq: Seq) -> bool:
        made = len(seq.req.output_ids) + seq.inflight
        limit = min(seq.req.params.max_tokens, self.limits.max_model_len - len(seq.req.prompt_ids))
        return seq.inflight > 0 and made >= limit

    @staticmethod
    def _victim(seqs: list[Seq]) -> Seq:  # lowest priority, then the most recent
        return max(seqs, key=lambda s: s.rank)

    def _preempt(self, seq: Seq) -> None:
        self.preemptions += 1
        self._freed.append(seq.slot)
        self._publish_tail(seq)
        self.slots[seq.slot] = None
        self.page_table[seq.slot] = 0
        self.pages.release(seq.pages[seq.dropped :])
        seq.pages, seq.dropped, seq.slot, seq.computed, seq.inflight = [], 0, None, 0, 0
        seq.state = State.WAITING
        self._enqueue(seq)
