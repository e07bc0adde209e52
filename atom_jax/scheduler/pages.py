"""Host-side allocators for one DP rank's cache: KV pages and fixed per-sequence slots."""

from __future__ import annotations

import heapq


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
    """Fixed pool of `num_pages` pages of `page_tokens` tokens each.

    A sequence of L tokens holds ceil(L / page_tokens) pages; the page list is the sequence's
    page table, grown in place by `extend` as the sequence grows.
    """

    def __init__(self, num_pages: int, page_tokens: int):
        if page_tokens <= 0:
            raise ValueError(f"page_tokens must be > 0, got {page_tokens}")
        self.page_tokens = page_tokens
        self._pool = _IdPool(num_pages, "page")

    @property
    def num_pages(self) -> int:
        return self._pool.size

    @property
    def num_free(self) -> int:
        return self._pool.num_free

    @property
    def num_used(self) -> int:
        return self._pool.size - self._pool.num_free

    @property
    def usage(self) -> float:
        """Fraction of pages in use, in [0, 1]."""
        return self.num_used / self._pool.size

    def pages_for(self, num_tokens: int) -> int:
        return pages_for(num_tokens, self.page_tokens)

    def extra_pages(self, pages: list[int], num_tokens: int) -> int:
        """How many more pages `pages` needs to hold `num_tokens` tokens."""
        return max(0, self.pages_for(num_tokens) - len(pages))

    def can_fit(self, pages: list[int], num_tokens: int) -> bool:
        return self.extra_pages(pages, num_tokens) <= self.num_free

    def allocate(self, num_tokens: int) -> list[int]:
        """A new page table for `num_tokens` tokens; MemoryError if too few pages are free."""
        return self._pool.take(self.pages_for(num_tokens))

    def extend(self, pages: list[int], num_tokens: int) -> bool:
        """Grow `pages` in place to hold `num_tokens` tokens. False (and no change) if short."""
        extra = self.extra_pages(pages, num_tokens)
        if extra > self.num_free:
            return False
        pages.extend(self._pool.take(extra))
        return True

    def free(self, pages: list[int]) -> None:
        """Return every page of a page table; ValueError on a page that is not in use."""
        self._pool.give(pages)


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
