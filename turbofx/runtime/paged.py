"""Paged KV cache bookkeeping: fixed-size pages, a free list, per-sequence block tables.

The cache tensors themselves are buffers of the serving decoder (``compiler/serving.py``), one
``[num_pages, page_size, kv_heads, head_dim]`` pair per layer; this module only decides which
pages a sequence owns. Invariant: every page except the reserved scratch pages is either on the
free list or owned by exactly one sequence (``check()`` asserts it), so when no sequence is alive
``num_free == num_pages``. Page 0 is the scratch page: padding tokens of a step write their keys
there and unused block-table entries point there, so no write ever lands in a live sequence's page.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from turbofx.errors import TurbofxError

SCRATCH_PAGE = 0


class OutOfPages(TurbofxError):
    """The allocator has fewer free pages than asked for (the scheduler preempts or waits)."""


@dataclass
class PageAllocator:
    """Pages 1..num_pages of a cache of ``num_pages + 1`` pages (page 0 is scratch)."""

    num_pages: int
    page_size: int
    _free: list[int] = field(default_factory=list, repr=False)
    _owner: dict[int, int] = field(default_factory=dict, repr=False)  # page -> sequence id

    def __post_init__(self):
        if self.num_pages < 1 or self.page_size < 1:
            raise TurbofxError(f"a paged cache needs num_pages >= 1 and page_size >= 1, got {self.num_pages}, "
                               f"{self.page_size}")
        self._free = list(range(self.num_pages, 0, -1))  # pop() hands out low pages first

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._owner)

    def pages_for(self, tokens: int) -> int:
        """Pages that hold ``tokens`` keys."""
        return -(-tokens // self.page_size)

    def allocate(self, seq_id: int, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfPages(f"{n} pages asked for, {len(self._free)} free of {self.num_pages}")
        pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            self._owner[p] = seq_id
        return pages

    def free(self, seq_id: int, pages: list[int]) -> None:
        for p in pages:
            if self._owner.get(p) != seq_id:
                raise TurbofxError(f"page {p} is not owned by sequence {seq_id} (owner {self._owner.get(p)}): "
                                   "this is a turbofx bug")
            del self._owner[p]
            self._free.append(p)

    def check(self) -> None:
        """The invariant of the module docstring (used by tests after every scenario)."""
        free = set(self._free)
        assert len(free) == len(self._free), "a page is on the free list twice"
        assert not free & set(self._owner), "a page is both free and owned"
        assert free | set(self._owner) == set(range(1, self.num_pages + 1)), "a page was lost"


@dataclass
class SequencePages:
    """The pages of one sequence, in order: key j lives in ``pages[j // page_size]``."""

    seq_id: int
    pages: list[int] = field(default_factory=list)

    def ensure(self, allocator: PageAllocator, tokens: int) -> None:
        """Own enough pages for ``tokens`` keys (OutOfPages if the allocator cannot give them;
        nothing is taken then)."""
        need = allocator.pages_for(tokens) - len(self.pages)
        if need > 0:
            self.pages += allocator.allocate(self.seq_id, need)

    def release(self, allocator: PageAllocator) -> None:
        allocator.free(self.seq_id, self.pages)
        self.pages = []

    def slot(self, position: int, page_size: int) -> int:
        """Row of the flattened cache ``[num_pages * page_size]`` holding key ``position``."""
        return self.pages[position // page_size] * page_size + position % page_size
