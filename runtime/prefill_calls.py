"""How a step's prompt chunks for generation become prefill calls, and what they cost of the token
budget. Plain Python, no JAX: the scheduler plans with it, the runner dispatches with it.

A prefill call holds one chunk of each of several sequences, padded to the bucket t of its longest
chunk and to the smallest batch compiled for t (`rows`: 1, then powers of two while rows x t stays
within the largest bucket; Engine.prefill_batch). Its cost is close to that of one chunk of as many
padded tokens (rows x t): on a CPU its time is nearly linear in them and a call has a fixed cost of
its own (reading the weights), on an accelerator its memory is. So the scheduler charges the budget
the padded tokens of the step's calls (`padded`), and a step fills the rows it pays for.

Grouping (`group`), in plan order: a chunk joins the last batched call unless it would outgrow the
most rows compiled for its bucket, or that call or one after it holds a chunk of its sequence (a
sequence's chunks run in order, one call after the other); a grammar request's last chunk is a call
of its own (its masked prefill). Across sequences the order of calls does not matter: within a step
no chunk reads K/V that another sequence's chunk writes (prefix-cache hits are mapped at admission,
or copied before the step's chunks, from pages whose writes were dispatched in earlier steps).
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


def group(
    items: Sequence[Item], bucket: Callable[[int], int], rows: Callable[[int], tuple]
) -> list[list[int]]:
    """The calls `items` go in, as lists of their indices, in dispatch order."""
    calls: list[list[int]] = []
    for i, (seq, n, alone) in enumerate(items):
        batch = next((k for k in range(len(calls) - 1, -1, -1) if not items[calls[k][0]][2]), None)
        if not alone and batch is not None:
            t = bucket(max(n, *(items[j][1] for j in calls[batch])))
            ordered = all(items[j][0] is not seq for call in calls[batch:] for j in call)
            if len(calls[batch]) < rows(t)[-1] and ordered:
                calls[batch].append(i)
                continue
        calls.append([i])
    return calls


def padded(items: Sequence[Item], bucket: Callable[[int], int], rows: Callable[[int], tuple]) -> int:
    """Padded tokens of the calls `items` go in: compiled rows x bucket, summed."""
    total = 0
    for call in group(items, bucket, rows):
        t = bucket(max(items[i][1] for i in call))
        total += next(r for r in rows(t) if r >= len(call)) * t
    return total


def take(
    seq, n: int, left: int, masked: bool, calls: list[Item], budget: int, bucket, rows
) -> tuple[int, int, Item | None]:
    """(tokens of `seq`'s next generation chunk, at most `n` of its `left` to prefill; their cost
    of `budget`; its item), 0 tokens when nothing fits, after the step's `calls` so far (`masked`:
    its last chunk runs alone). A chunk costs what it adds to the padded tokens of the step's calls:
    the step's first takes up to the budget (so every step progresses), later ones their whole chunk
    when that fits, else as much as fits a row of a call already planned in a bucket already paid
    for (a row already paid for costs nothing)."""
    item = lambda m: (seq, m, masked and m == left)
    if not calls:
        m = min(n, budget)
        return (m, padded([item(m)], bucket, rows), item(m)) if m > 0 else (0, 0, None)
    before, n_calls = padded(calls, bucket, rows), len(group(calls, bucket, rows))
    paid = sorted({bucket(c[1]) for c in calls}, reverse=True)  # buckets the step pays for
    for m in dict.fromkeys((n, *(min(n, t) for t in paid))):
        after = [*calls, item(m)]
        cost = padded(after, bucket, rows) - before
        # a part of a chunk only to fill a row of a call, never as a call of its own
        if cost <= budget and (m == n or len(group(after, bucket, rows)) == n_calls):
            return m, cost, item(m)
    return 0, 0, None
