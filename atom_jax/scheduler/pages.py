"""Host-side allocators for one DP rank's cache: KV pages and fixed per-sequence slots."""

from __future__ import annotations

import collections
import hashlib
import heapq

import numpy as np


STATE_PAGES_PER_SLOT = 4  # default window-state entries per sequence slot (prefix caching)


def default_state_pages(num_slots: int, num_pages: int) -> int:
    """The window-state pool's default size: STATE_PAGES_PER_SLOT per slot, at most one per page."""
    return min(num_pages, STATE_PAGES_PER_SLOT * num_slots)


def pages_for(num_tokens: int, page_tokens: int) -> int:
    """Pages needed to hold `num_tokens` tokens (ceil division)."""
    return -(-num_tokens // page_tokens)


class _IdPool:
    """Lowest-free-id-first pool of ints; deterministic so every host allocates alike."""

    def __init__(self, size: int, what: str):
        if size <= 0:
            raise ValueError(f"number of {what}s must be > 0, got {size}")
        self.size = size
        self._what = what
        self._free = list(range(size))  # a sorted list is a valid heap
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def take(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"asked for {n} {self._what}s, only {len(self._free)} free")
        ids = [heapq.heappop(self._free) for _ in range(n)]
        self._used.update(ids)
        return ids

    def give(self, ids) -> None:
        ids = list(ids)
        for i in ids:
            if i not in self._used:
                state = "already free" if 0 <= i < self.size else "out of range"
                raise ValueError(f"{self._what} {i} freed but {state} (double free?)")
        if len(set(ids)) != len(ids):
            raise ValueError(f"{self._what} ids {ids} freed twice in one call")
        for i in ids:
            self._used.discard(i)
            heapq.heappush(self._free, i)


class PageAllocator:
    """Fixed pool of `num_pages` pages of `page_tokens` tokens each, reference counted, with an
    optional prefix cache (DESIGN.md section 5; docs/design.md, "Prefix caching").

    A sequence of L tokens holds ceil(L / page_tokens) pages; the page list is the sequence's
    page table, grown in place by `extend` as the sequence grows. With `prefix_caching`, a
    full page whose contents are final is `register`ed under the key of the token block it holds
    (`block_keys`); later sequences starting with the same blocks `match` and `acquire` it
    instead of recomputing it (several sequences then hold the same page: its reference count).
    A registered page nobody holds stays cached and counts as free: it is evicted, least
    recently released first, only when the free pool is empty.

    Window state (docs/design.md, "Prefix caching"): a sequence can start after a cached page
    only if the sliding-window and compressor state at that page's end is kept, and it is kept
    for at most `state_pages` pages at once (`StatePool`; None: every page). A page gets a
    state entry when it is allocated, the deepest pages of an allocation first (`StatePool.give`);
    `match` ends the reused run at the last page whose state (and that of the `window_pages - 1`
    pages before it: the window spans them) is still there.
    """

    def __init__(self, num_pages: int, page_tokens: int, prefix_caching: bool = False,
                 state_pages: int | None = None, window_pages: int = 1):
        if page_tokens <= 0:
            raise ValueError(f"page_tokens must be > 0, got {page_tokens}")
        self.page_tokens = page_tokens
        self.prefix_caching = prefix_caching
        self.window_pages = max(1, window_pages)
        n_states = 0 if not prefix_caching else num_pages if state_pages is None else state_pages
        self.states = StatePool(n_states)
        self._pool = _IdPool(num_pages, "page")  # pages neither held nor cached
        self._refs = [0] * num_pages
        self._key: dict[int, bytes] = {}  # registered page -> block key
        self._index: dict[bytes, int] = {}  # block key -> page
        self._lru: collections.OrderedDict[int, None] = collections.OrderedDict()  # cached, unheld
        self.num_evictions = 0

    @property
    def num_pages(self) -> int:
        return self._pool.size

    @property
    def num_free(self) -> int:
        """Pages an allocation can take: never-used ones plus cached pages nobody holds."""
        return self._pool.num_free + len(self._lru)

    @property
    def num_used(self) -> int:
        """Pages held by at least one sequence."""
        return self._pool.size - self.num_free

    @property
    def num_cached(self) -> int:
        """Registered pages (held or not): what the prefix cache can hand out."""
        return len(self._key)

    @property
    def num_cached_free(self) -> int:
        """Registered pages nobody holds (evictable)."""
        return len(self._lru)

    @property
    def usage(self) -> float:
        """Fraction of pages held, in [0, 1] (cached pages nobody holds count as free)."""
        return self.num_used / self._pool.size

    def refcount(self, page: int) -> int:
        return self._refs[page]

    def pages_for(self, num_tokens: int) -> int:
        return pages_for(num_tokens, self.page_tokens)

    def extra_pages(self, pages: list[int], num_tokens: int) -> int:
        """How many more pages `pages` needs to hold `num_tokens` tokens."""
        return max(0, self.pages_for(num_tokens) - len(pages))

    def can_fit(self, pages: list[int], num_tokens: int) -> bool:
        return self.extra_pages(pages, num_tokens) <= self.num_free

    def allocate(self, num_tokens: int) -> list[int]:
        """A new page table for `num_tokens` tokens; MemoryError if too few pages are free."""
        return self._take(self.pages_for(num_tokens))

    def extend(self, pages: list[int], num_tokens: int, own_from: int | None = None) -> bool:
        """Grow `pages` in place to hold `num_tokens` tokens. False (and no change) if short.
        `own_from`: `pages[own_from:]` are the sequence's own pages (computed by it, not reused
        from the cache): short of free window-state entries, the new pages take theirs first
        (`StatePool.give`); None: it has none."""
        extra = self.extra_pages(pages, num_tokens)
        if extra > self.num_free:
            return False
        own = () if own_from is None else pages[own_from:]
        pages.extend(self._take(extra, own))
        return True

    def free(self, pages: list[int]) -> None:
        """Drop one reference to every page of a page table; a page nobody holds any more goes
        back to the pool, or, when registered, to the cache. ValueError on a page not held."""
        pages = list(pages)
        for p in pages:
            if not 0 <= p < self._pool.size:
                raise ValueError(f"page {p} freed but out of range (double free?)")
        counts = collections.Counter(pages)
        for p, n in counts.items():
            if self._refs[p] < n:
                raise ValueError(f"page {p} freed but already free (double free?)"
                                 if self._refs[p] == 0 else f"page ids {pages} freed twice in one call")
        unheld = []
        for p in pages:
            self._refs[p] -= 1
            if self._refs[p] == 0:
                if p in self._key:
                    self._lru[p] = None
                else:
                    unheld.append(p)
                    self.states.drop(p)
        self._pool.give(unheld)

    # -- prefix cache ------------------------------------------------------------------------
    def match(self, keys) -> list[int]:
        """The pages of the longest run of `keys` (from the first) that are registered."""
        out = []
        if self.prefix_caching:
            for k in keys:
                p = self._index.get(k)
                if p is None:
                    break
                out.append(p)
        m = len(out)  # a sequence can start only where the window state is kept
        while m and not all(self.states.has(p) for p in out[max(0, m - self.window_pages):m]):
            m -= 1
        return out[:m]

    def num_free_after_acquire(self, pages: list[int]) -> int:
        """`num_free` once `pages` (from `match`) are acquired: cached unheld ones stop counting."""
        return self.num_free - sum(1 for p in pages if p in self._lru)

    def acquire(self, pages: list[int]) -> list[int]:
        """Hold matched pages (one more reference each); returns a new page table of them."""
        for p in pages:
            if p not in self._key:
                raise ValueError(f"page {p} is not a cached page")
            self._lru.pop(p, None)
            self._refs[p] += 1
        for p in pages[-self.window_pages:]:  # the state a restore reads: used now
            self.states.touch(p)
        return list(pages)

    def register(self, page: int, key: bytes) -> None:
        """Offer a held, full page whose contents are final under its block key. A key already
        cached keeps its page (the same block computed twice: this copy stays private), unless
        only this copy has its window state: then the index moves to it."""
        if not self.prefix_caching or page in self._key:
            return
        if self._refs[page] <= 0:
            raise ValueError(f"page {page} registered but not held")
        old = self._index.get(key)
        if old is not None:
            if self.states.has(old) or not self.states.has(page):
                self.states.drop(page)  # a private copy: its state is never read
                return
            del self._key[old]  # the old copy stays with its holders, private
            if old in self._lru:
                del self._lru[old]
                self._pool.give([old])
        self._index[key] = page
        self._key[page] = key
        self.states.final(page)

    def unregister(self, page: int, key: bytes) -> bool:
        """Take `page` out of the prefix cache if it is still registered under `key` (its contents
        were never written: the step that computed them failed); nobody holding it, it goes back
        to the pool. True if it was taken out."""
        if self._key.get(page) != key:
            return False
        del self._key[page]
        del self._index[key]
        self.states.drop(page)  # (its state was never written either)
        if page in self._lru:
            del self._lru[page]
            self._pool.give([page])
        return True

    def _take(self, n: int, own=()) -> list[int]:
        if n > self.num_free:
            raise MemoryError(f"asked for {n} pages, only {self.num_free} free")
        fresh = min(n, self._pool.num_free)
        ids = self._pool.take(fresh)
        while len(ids) < n:  # evict the least recently released cached pages
            p, _ = self._lru.popitem(last=False)
            del self._index[self._key.pop(p)]
            self.states.drop(p)
            self.num_evictions += 1
            ids.append(p)
        for p in ids:
            self._refs[p] = 1
        # own pages another sequence holds now are its reuse point: not the caller's to recycle
        self.states.give(ids, (p for p in own if self._refs[p] == 1))
        return ids

    def check(self) -> None:
        """Bookkeeping cross-check (tests)."""
        for p in range(self._pool.size):
            held, cached, in_lru = self._refs[p] > 0, p in self._key, p in self._lru
            free = p not in self._pool._used
            assert self._refs[p] >= 0, p
            assert in_lru == (cached and not held), p
            assert free == (not held and not cached), p
        assert all(self._index[k] == p for p, k in self._key.items())
        assert len(self._index) == len(self._key)
        for p in self.states.pages():
            assert self._refs[p] > 0 or p in self._key, f"page {p} free but keeps a state entry"
        self.states.check()


class StatePool:
    """Which pages keep their window state (`cache.layout`: the `state_pages` entries of the
    cache's page-state arrays), host side. The pages of an allocation get entries deepest
    first (`give`), from the free ones, else from full pages whose state may be read (registered:
    `final`); the entries of pages still being filled are never taken. `entry(page)`: -1 when
    none (the step then drops that page's state rows)."""

    def __init__(self, size: int):
        self.size = size
        self._free = list(range(size))  # a sorted list is a valid heap
        self._entry: dict[int, int] = {}  # page -> entry
        self._lru: collections.OrderedDict[int, None] = collections.OrderedDict()  # full pages
        self.num_evictions = 0

    def has(self, page: int) -> bool:
        return page in self._entry

    def entry(self, page: int) -> int:
        return self._entry.get(page, -1)

    def pages(self):
        return self._entry.keys()

    def give(self, pages: list[int], own=()) -> None:
        """Entries for a sequence's freshly allocated `pages` (in page-table order), as many as
        are free or evictable, to the DEEPEST of them: the last pages of a chunk are the longest
        reusable prefixes, and a run of pages ending at the last one keeps every reuse point in
        it usable (`match` needs the `window_pages` pages before a reuse point to keep state).
        Giving the first ones instead, a prompt allocated in one chunk larger than the pool kept
        only its shallowest reuse points.

        Where an entry comes from: a free one; else one of `own`, the sequence's own full pages
        (shallowest first); else the full page whose state was used least recently. Own first:
        a sequence's later chunk or decode page supersedes its own shallower reuse points (its
        next turn, the likeliest reuse, starts at its deepest page; its interior pages serve
        only a request branching inside it), while other sequences' states are mostly their
        deepest points. So a long prompt fed chunk by chunk keeps the entries its first chunk
        got, recycled forward, instead of flushing every other conversation's reuse point."""
        entries = []
        own = iter(own)
        while len(entries) < len(pages):
            if self._free:
                entries.append(heapq.heappop(self._free))
                continue
            if not self._lru:
                break
            victim = next((p for p in own if p in self._lru), None)
            if victim is None:
                victim, _ = self._lru.popitem(last=False)
            else:
                del self._lru[victim]
            entries.append(self._entry.pop(victim))
            self.num_evictions += 1
        for page, e in zip(pages[len(pages) - len(entries):], sorted(entries)):
            self._entry[page] = e

    def final(self, page: int) -> None:
        """The page is full and registered: its state may be read (and evicted) from now on."""
        if page in self._entry:
            self._lru[page] = None

    def touch(self, page: int) -> None:
        if page in self._lru:
            self._lru.move_to_end(page)

    def drop(self, page: int) -> None:
        e = self._entry.pop(page, None)
        if e is not None:
            self._lru.pop(page, None)
            heapq.heappush(self._free, e)

    def check(self) -> None:
        used = list(self._entry.values())
        assert len(set(used)) == len(used) and not set(used) & set(self._free), "state entries"
        assert len(used) + len(self._free) == self.size
        assert all(p in self._entry for p in self._lru)


def chain_key(prev: bytes, block_tokens) -> bytes:
    """Key of a full token block given the key of the block before it (b"" for the first): a
    digest of the whole prefix, so equal keys mean equal prefixes (sha256 chain, as vLLM)."""
    return hashlib.sha256(prev + np.asarray(block_tokens, np.int64).tobytes()).digest()


class SlotAllocator:
    """The rank's fixed per-sequence state slots (sliding-window ring, compressor state)."""

    def __init__(self, num_slots: int):
        self._pool = _IdPool(num_slots, "slot")

    @property
    def num_slots(self) -> int:
        return self._pool.size

    @property
    def num_free(self) -> int:
        return self._pool.num_free

    def allocate(self) -> int | None:
        """A free slot, or None when all are held."""
        return self._pool.take(1)[0] if self._pool.num_free else None

    def free(self, slot: int) -> None:
        self._pool.give([slot])
