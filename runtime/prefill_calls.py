"""How a step's prompt chunks become prefill calls (for generation) and scoring calls, and what they
cost of the token budget. Plain Python, no JAX: the scheduler plans with it, the runner dispatches
with it. An engine makes its calls one of two ways (`Engine.prefill_calls`, `Engine.score_calls`):

- `Batched`: a call holds one chunk of each of several sequences as rows, padded to the bucket t of
  its longest chunk and to the smallest batch compiled for t (`rows`: 1, then powers of two while
  rows x t stays within the largest bucket; Engine.prefill_batch).
- `Packed` (where attention reads each query's pages in place: the native CPU kernel): a call holds
  the chunks' tokens back to back, each token a row of its own with its position and its sequence's
  pages, padded once to a bucket (programs.prefill_packed; buckets below the smallest prefill bucket
  too). A 1-token chunk (a prompt found in the prefix cache but for its last token) costs a token,
  not a padded row of the smallest bucket.

Scoring chunks are grouped the same two ways (`BatchedScores`, `PackedScores`); a multiple-choice
question of 17 tokens costs 17 packed tokens, not a padded row of 32.

Either way a call's cost is close to that of one chunk of as many padded tokens: on a CPU its time
is nearly linear in them and a call has a fixed cost of its own (reading the weights), on an
accelerator its memory is. So the scheduler charges the budget the padded tokens of the step's
calls (`cost`), and a step fills what it pays for (`take`).

Grouping (`group`), in plan order: a grammar request's last chunk is a call of its own (its masked
prefill). Batched: a chunk joins the last batched call unless it would outgrow the most rows
compiled for its bucket, or that call or one after it holds a chunk of its sequence (a sequence's
chunks run in order, one call after the other). Packed: a chunk joins the last packed call while its
tokens fit the largest bucket and its sequences the slots; two chunks of one sequence may share it
(each layer writes every token's K/V before any token attends). Across sequences the order of calls
does not matter: within a step no chunk reads K/V that another sequence's chunk writes (prefix-cache
hits are mapped at admission, or copied before the step's chunks, from pages whose writes were
dispatched in earlier steps).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

# One generation chunk of a step: (its sequence, its tokens, whether it runs alone)
Item = tuple[object, int, bool]


def prefill_rows(max_slots: int, buckets: Sequence[int], t: int) -> tuple[int, ...]:
    """Batch sizes compiled at chunk bucket t: 1, then powers of two (and max_slots) while rows x t
    stays within the largest bucket, so no call is larger than the largest single chunk (what the
    memory plan and the measured budget are sized by)."""
    out, r = [1], 1
    while r < max_slots and min(2 * r, max_slots) * t <= buckets[-1]:
        r = min(2 * r, max_slots)
        out.append(r)
    return tuple(out)


# Token buckets of packed calls below the smallest prefill bucket: a few prompts found in the prefix
# cache but for their last token are as many rows, not a padded chunk of 16.
SMALL = (1, 2, 4, 8)


def packed_buckets(buckets: Sequence[int]) -> tuple[int, ...]:
    """Token buckets a packed call is compiled for: SMALL below the smallest prefill bucket, then
    the prefill buckets."""
    return (*(b for b in SMALL if b < buckets[0]), *buckets)


def packed_rows(max_slots: int, n: int) -> tuple[int, ...]:
    """Sequences a packed call of n tokens is compiled for (each samples a token): 1, then powers of
    two (and max_slots) up to min(max_slots, n)."""
    out, r = [1], 1
    while r < min(max_slots, n):
        r = min(2 * r, max_slots, n)
        out.append(r)
    return tuple(out)


class Batched:
    def __init__(self, bucket: Callable[[int], int], rows: Callable[[int], tuple]):
        self.bucket, self.rows = bucket, rows

    def group(self, items: Sequence[Item]) -> list[list[int]]:
        """The calls `items` go in, as lists of their indices, in dispatch order."""
        calls: list[list[int]] = []
        for i, (seq, n, alone) in enumerate(items):
            batch = next((k for k in range(len(calls) - 1, -1, -1) if not items[calls[k][0]][2]), None)
            if not alone and batch is not None:
                t = self.bucket(max(n, *(items[j][1] for j in calls[batch])))
                ordered = all(items[j][0] is not seq for call in calls[batch:] for j in call)
                if len(calls[batch]) < self.rows(t)[-1] and ordered:
                    calls[batch].append(i)
                    continue
            calls.append([i])
        return calls

    def cost(self, items: Sequence[Item]) -> int:
        """Padded tokens of the calls `items` go in: compiled rows x bucket, summed."""
        total = 0
        for call in self.group(items):
            t = self.bucket(max(items[i][1] for i in call))
            total += next(r for r in self.rows(t) if r >= len(call)) * t
        return total

    def fills(self, items: Sequence[Item], n: int) -> tuple[int, ...]:
        """Parts of an n-token chunk that may fill a row already paid for: up to each bucket paid."""
        return tuple(min(n, t) for t in sorted({self.bucket(c[1]) for c in items}, reverse=True))


class Packed:
    def __init__(self, chunk_bucket: Callable[[int], int] | None, buckets: Sequence[int], max_slots: int):
        """chunk_bucket, buckets: the prefill buckets (a masked chunk pads to its own; None: no chunk
        is masked); packed calls pad to packed_buckets."""
        self.chunk_bucket, self.tokens, self.max_slots = chunk_bucket, packed_buckets(buckets), max_slots

    def bucket(self, n: int) -> int:
        """The tokens a packed call of n real tokens computes (n ≤ the largest bucket)."""
        return next(b for b in self.tokens if b >= n)

    def group(self, items: Sequence[Item]) -> list[list[int]]:
        calls: list[list[int]] = []
        open_, tokens = None, 0  # the packed call chunks join, and its tokens
        for i, (_, n, alone) in enumerate(items):
            if alone:
                calls.append([i])
            elif open_ is not None and tokens + n <= self.tokens[-1] and len(calls[open_]) < self.max_slots:
                calls[open_].append(i)
                tokens += n
            else:
                open_, tokens = len(calls), n
                calls.append([i])
        return calls

    def cost(self, items: Sequence[Item]) -> int:
        """Each packed call's tokens padded once to their bucket, a masked chunk to its prefill
        bucket, summed."""
        total = 0
        for call in self.group(items):
            n = sum(items[i][1] for i in call)
            total += self.chunk_bucket(n) if items[call[0]][2] else self.bucket(n)
        return total

    def fills(self, items: Sequence[Item], n: int) -> tuple[int, ...]:
        """The part of an n-token chunk that fills the last packed call's bucket (nothing if full)."""
        calls = [c for c in self.group(items) if not items[c[0]][2]]
        if not calls or len(calls[-1]) >= self.max_slots:
            return ()
        tokens = sum(items[i][1] for i in calls[-1])
        room = self.bucket(tokens) - tokens
        return (min(n, room),) if room > 0 else ()


Calls = Batched | Packed


def calls_for(ecfg, packed: bool, rows: Callable[[int], tuple]) -> Calls:
    """How an engine with EngineConfig `ecfg` makes its prefill calls (Engine.prefill_calls)."""
    if packed:
        return Packed(ecfg.prefill_bucket, ecfg.prefill_buckets, ecfg.max_slots)
    return Batched(ecfg.prefill_bucket, rows)


class BatchedScores:
    """Scoring chunks as rows of one bucket (programs.score): a call holds consecutive chunks of one
    bucket t and of distinct sequences, at most rows(t)[-1]. A chunk costs its padded row, so a
    prompt is not split to fill a call (`split`: each part would pad a row of its own)."""

    split = False

    def __init__(self, bucket: Callable[[int], int], rows: Callable[[int], tuple]):
        self.bucket, self.rows = bucket, rows

    def cost(self, n: int) -> int:
        return self.bucket(n)

    def room(self, budget: int) -> int:
        """The padded tokens a step that only scores fills, of `budget`."""
        return budget

    def group(self, items: Sequence[tuple[object, int]]) -> list[list[int]]:
        """The calls (sequence, tokens) chunks go in, as lists of their indices, in order."""
        calls: list[list[int]] = []
        for i, (seq, n) in enumerate(items):
            t, last = self.bucket(n), calls[-1] if calls else None
            if last is None or (
                t != self.bucket(items[last[0]][1])
                or len(last) == self.rows(t)[-1]
                or any(items[j][0] is seq for j in last)
            ):
                calls.append([i])
            else:
                last.append(i)
        return calls


class PackedScores:
    """Scoring chunks packed back to back (programs.score_packed), padded once to a bucket of tokens:
    a call holds consecutive chunks while their tokens fit the largest bucket and they number at most
    `max_chunks` (two of one sequence may share it, as in `Packed`). A chunk costs its tokens, and a
    step that only scores fills a bucket exactly, splitting the prompt that does not fit (`split`:
    its rest goes next step, attending to the K/V this one wrote)."""

    split = True

    def __init__(self, buckets: Sequence[int], max_chunks: int):
        # grouped as generation chunks are (`Packed`), none of them masked
        self._packed = Packed(None, buckets, max_chunks)
        self.tokens = self._packed.tokens

    def bucket(self, n: int) -> int:
        return self._packed.bucket(n)

    def cost(self, n: int) -> int:
        return n

    def room(self, budget: int) -> int:
        return max((b for b in self.tokens if b <= budget), default=self.tokens[0])

    def group(self, items: Sequence[tuple[object, int]]) -> list[list[int]]:
        return self._packed.group([(seq, n, False) for seq, n in items])


ScoreCalls = BatchedScores | PackedScores


def score_calls_for(ecfg, packed: bool, rows: Callable[[int], tuple]) -> ScoreCalls:
    """How an engine makes its scoring calls (Engine.score_calls); rows: `layout.score_rows`."""
    if packed:
        return PackedScores(ecfg.prefill_buckets, ecfg.max_slots)
    return BatchedScores(ecfg.prefill_bucket, rows)


def take(
    seq, n: int, left: int, masked: bool, calls: list[Item], budget: int, how: Calls, rows: int = 0
) -> tuple[int, int, Item | None]:
    """(tokens of `seq`'s next generation chunk, at most `n` of its `left` to prefill; their cost
    of `budget`; its item), 0 tokens when nothing fits, after the step's `calls` so far (`masked`:
    its last chunk runs alone). A chunk costs what it adds to the padded tokens of the step's calls:
    the step's first takes up to the budget (so every step progresses), later ones their whole chunk
    when that fits, else as much as fits what a call already planned pays for (costing nothing).
    rows: how many of `calls` lead as a mixed step's decode rows (one token each, packed; their
    bucket already paid for): the first chunk joins their call, so it takes at most what the
    largest bucket has left after them."""
    item = lambda m: (seq, m, masked and m == left)
    if len(calls) == rows:
        m = min(n, budget, how.tokens[-1] - rows) if rows else min(n, budget)
        return (m, how.cost([*calls, item(m)]) - how.cost(calls), item(m)) if m > 0 else (0, 0, None)
    before, n_calls = how.cost(calls), len(how.group(calls))
    for m in dict.fromkeys((n, *how.fills(calls, n))):
        after = [*calls, item(m)]
        cost = how.cost(after) - before
        # a part of a chunk only to fill a call, never as a call of its own
        if m > 0 and cost <= budget and (m == n or len(how.group(after)) == n_calls):
            return m, cost, item(m)
    return 0, 0, None
