"""The KV page pool on the host: reference counts, a free list and a prefix cache. No JAX here.

A page is held by every sequence whose page table lists it and returns to the pool when the last
holder lets go. A *full* page can be published under the hash of its tokens chained with the hash
of the page before it, so a later sequence whose prompt starts with the same tokens maps those
pages instead of recomputing them (published pages are never written again: a sequence only
writes past its shared prefix, into pages of its own). Published pages nobody holds stay cached,
least recently used first in line for eviction when the free list is empty.

Below a page, reuse is by token: a sequence's partly written last page is published as a *tail*
when the sequence lets go of it (its first tokens' K/V stays valid), and `longest` finds, among the
full pages and tails that follow the same chain hash, the one sharing the most leading tokens with
a new prompt's next page. That page cannot be mapped (the new sequence writes the rest of it), so
the scheduler copies it into a page of the sequence's own and prefills only what follows. Unheld
tails are first in line for eviction: they use room no full page needs.

Invariants (checked by `check()` and a property test): every page is exactly one of free, cached
(published, unheld) or held (refcount > 0); a published full page's hash maps back to it; every
published page (full or tail) is listed under the hash of the page before it.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict, deque
from collections.abc import Sequence


class OutOfPages(RuntimeError):
    pass


def chain_hash(previous: int | None, tokens: Sequence[int]) -> int:
    """Hash of a full page given the hash of the page before it (None for the first)."""
    return hash((previous, tuple(tokens)))


class PageAllocator:
    def __init__(self, num_pages: int):
        self.num_pages = num_pages
        self._free: deque[int] = deque(range(num_pages))
        self._refs = [0] * num_pages
        self._cached: OrderedDict[int, None] = OrderedDict()  # unheld published pages, LRU first
        self._by_hash: dict[int, int] = {}  # full pages only
        # page -> (its hash, None for a tail; its tokens; the hash of the page before it)
        self._page_key: dict[int, tuple[int | None, tuple[int, ...], int | None]] = {}
        # hash of a page (None: the start) -> the published pages after it, as (tokens, page) sorted:
        # the page sharing the most leading tokens with a prompt is one of the prompt's two
        # neighbours in that order (`longest`), found by bisection, not by comparing every page
        # (an eval's 800 questions all start "Question:": a scan compared them all, 8% of its time)
        self._after: dict[int | None, list[tuple[tuple[int, ...], int]]] = {}
        self.evictions = 0

    # -- counts -----------------------------------------------------------------------------------

    @property
    def free_count(self) -> int:
        """Pages an allocation can take: free ones and cached ones (evicted on demand)."""
        return len(self._free) + len(self._cached)

    @property
    def cached_count(self) -> int:
        return len(self._cached)

    @property
    def used_count(self) -> int:
        return self.num_pages - self.free_count

    def refs(self, page: int) -> int:
        return self._refs[page]

    # -- holding and releasing ----------------------------------------------------------------------

    def alloc(self, n: int) -> list[int]:
        if n > self.free_count:
            raise OutOfPages(f"asked for {n} pages, {self.free_count} available of {self.num_pages}")
        pages = []
        for _ in range(n):
            if self._free:
                page = self._free.popleft()
            else:
                page, _ = self._cached.popitem(last=False)
                self._unpublish(page)
                self.evictions += 1
            self._refs[page] = 1
            pages.append(page)
        return pages

    def share(self, pages) -> None:
        """One more holder for pages that are held or cached (a prefix-cache hit)."""
        for p in pages:
            if self._refs[p] == 0:
                if p not in self._cached:
                    raise ValueError(f"page {p} is free and cannot be shared")
                del self._cached[p]
            self._refs[p] += 1

    def release(self, pages) -> None:
        for p in pages:
            if self._refs[p] <= 0:
                raise ValueError(f"page {p} released more times than it was taken")
            self._refs[p] -= 1
            if self._refs[p] == 0:
                if p in self._page_key:
                    self._cached[p] = None  # most recently used: last to be evicted
                    if self._page_key[p][0] is None:  # a tail (a few tokens, not a page of them) is
                        self._cached.move_to_end(p, last=False)  # first, so tails never evict pages
                else:
                    self._free.append(p)

    # -- the prefix cache ---------------------------------------------------------------------------

    def publish(self, page: int, h: int, tokens: Sequence[int], prev: int | None) -> None:
        """Make a held, full page findable by its chain hash `h` (`prev`: the hash of the page before
        it). A hash already published keeps its first page (two sequences that computed the same
        prefix apart hold equal copies)."""
        if self._refs[page] <= 0:
            raise ValueError(f"page {page} is not held and cannot be published")
        if h in self._by_hash or page in self._page_key:
            return
        self._by_hash[h] = page
        self._page_key[page] = (h, held := tuple(tokens), prev)
        bisect.insort(self._after.setdefault(prev, []), (held, page))

    def publish_tail(self, page: int, tokens: Sequence[int], prev: int | None) -> None:
        """A held page whose first `tokens` (fewer than a page) have their K/V written, following the
        page of hash `prev`: findable by `longest` only (never mapped, never written again: call it
        as its holder lets go)."""
        if self._refs[page] <= 0:
            raise ValueError(f"page {page} is not held and cannot be published")
        if page in self._page_key or not tokens:
            return
        self._page_key[page] = (None, held := tuple(tokens), prev)
        bisect.insort(self._after.setdefault(prev, []), (held, page))

    def longest(self, prev: int | None, tokens: Sequence[int]) -> tuple[int | None, int]:
        """(page, n): the published page after hash `prev` whose first n tokens are the first n of
        `tokens`, n as large as any (n >= 1), else (None, 0)."""
        after, want = self._after.get(prev, []), tuple(tokens)
        i = bisect.bisect_left(after, (want, -1))
        best, most = None, 0
        for held, page in after[max(0, i - 1) : i + 1]:  # the neighbours: the longest match is one
            same = (j for j, (a, b) in enumerate(zip(held, want, strict=False)) if a != b)
            n = next(same, min(len(held), len(want)))
            if n > most:
                best, most = page, n
        return best, most

    def lookup(self, h: int, tokens: Sequence[int]) -> int | None:
        """The page published under `h` holding exactly `tokens`, if any."""
        page = self._by_hash.get(h)
        if page is None or self._page_key[page][1] != tuple(tokens):
            return None
        return page

    def _unpublish(self, page: int) -> None:
        h, tokens, prev = self._page_key.pop(page)
        if h is not None:
            del self._by_hash[h]
        after = self._after[prev]
        del after[bisect.bisect_left(after, (tokens, page))]
        if not after:
            del self._after[prev]

    def check(self) -> None:
        """Assert the pool's invariants (tests)."""
        free, cached = set(self._free), set(self._cached)
        held = {p for p in range(self.num_pages) if self._refs[p] > 0}
        assert len(free) == len(self._free), "a page is on the free list twice"
        assert not (free & cached) and not (free & held) and not (cached & held), "a page is in two states"
        assert free | cached | held == set(range(self.num_pages)), "a page leaked"
        assert all(r >= 0 for r in self._refs)
        assert all(self._by_hash[h] == p for p, (h, _, _) in self._page_key.items() if h is not None)
        assert len(self._by_hash) == sum(h is not None for h, _, _ in self._page_key.values())
        listed = [p for after in self._after.values() for _, p in after]
        assert sorted(listed) == sorted(self._page_key), "a page is misfiled"
        assert all((t, p) in self._after[prev] for p, (_, t, prev) in self._page_key.items())
        assert all(after == sorted(after) for after in self._after.values())
        assert cached <= set(self._page_key), "an unpublished page is cached"
        assert not (free & set(self._page_key)), "a free page is still published"
