"""A guest's physical page allocator, reduced to what ballooning sees.

Every RAM page is free, used by the guest (kernel, rings, the workload's memory: pages the
guest will not give up), or in the balloon. The balloon driver allocates free pages to
inflate and frees them on deflate; a workload takes and returns pages, and when it needs
more than is free the OOM path runs (DEFLATE_ON_OOM lets the driver give some back).

Pages are handed out lowest-first, ascending, as a fresh zone's buddy allocator tends to,
so an idle guest gives long contiguous runs and a fragmented one (``fragment_pages``) short
ones. State is one numpy byte per page and a cursor, so allocating 1.8 million pages is a
few array operations rather than a Python loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum

import numpy as np

from balloonctl.virtio.pages import (
    PfnArray,
    RamMap,
    RangeArray,
    compact,
    expand_ranges,
    join_ranges,
)


class PageState(IntEnum):
    """What a guest page is doing."""

    FREE = 0
    #: The workload's memory: taken and given back as it runs.
    USED = 1
    BALLOON = 2
    #: Memory the guest will not give up: the kernel, the driver's rings and buffers.
    KERNEL = 3


class GuestAllocator:
    """Free/used/balloon pages of guest RAM, indexed densely (see :class:`RamMap`)."""

    def __init__(
        self,
        page_ranges: Sequence[tuple[int, int]],
        *,
        used_pages: int = 0,
        fragment_pages: int = 0,
        seed: int = 0,
    ) -> None:
        """``used_pages`` are kernel memory taken at boot: at the bottom of RAM, or, with
        ``fragment_pages`` > 0, scattered so the free runs between them average that many
        pages (a long-running guest)."""
        self.ram = RamMap(page_ranges)
        total = self.ram.total_pages
        self.state = np.zeros(total, dtype=np.uint8)
        used_pages = min(used_pages, total)
        if fragment_pages > 0 and used_pages:
            rng = np.random.default_rng(seed)
            holes = max(1, (total - used_pages) // fragment_pages)
            cuts = np.sort(
                rng.choice(np.arange(1, total), size=min(holes, total - 1), replace=False)
            )
            # Spread the used pages over the cuts: each cut starts a used stretch.
            per = np.full(cuts.size, used_pages // cuts.size)
            per[: used_pages % cuts.size] += 1
            for cut, n in zip(cuts.tolist(), per.tolist(), strict=True):
                stretch = self.state[cut : cut + n]
                stretch[:] = PageState.KERNEL
            short = used_pages - int(np.count_nonzero(self.state == PageState.KERNEL))
            if short > 0:
                free = np.flatnonzero(self.state == PageState.FREE)[:short]
                self.state[free] = PageState.KERNEL
        else:
            self.state[:used_pages] = PageState.KERNEL
        self._cursor = 0

    @property
    def total_pages(self) -> int:
        """RAM pages."""
        return self.ram.total_pages

    def count(self, state: PageState) -> int:
        """Pages in ``state``."""
        return int(np.count_nonzero(self.state == state))

    def to_pfns(self, dense: PfnArray) -> PfnArray:
        """Dense indices -> guest PFNs."""
        if self.ram.starts.size == 1:
            shifted: PfnArray = dense + int(self.ram.starts[0])
            return shifted
        k = np.searchsorted(self.ram.offsets, dense, side="right") - 1
        pfns: PfnArray = self.ram.starts[k] + (dense - self.ram.offsets[k])
        return pfns

    def to_dense(self, pfns: PfnArray) -> PfnArray:
        """Guest PFNs (which must be RAM) -> dense indices."""
        in_ram, dense = self.ram.locate(pfns)
        if not in_ram.all():
            raise ValueError("PFN outside guest RAM")
        return dense

    def allocate_runs(self, n: int, state: PageState = PageState.BALLOON) -> RangeArray:
        """Up to ``n`` free pages, lowest first, now in ``state``, as ``(first_pfn, count)``
        runs; fewer pages if RAM runs out (the driver's "Out of puff!").

        Runs, not pages: an idle 8 GiB guest gives 7 GiB in a handful of runs, and marking
        a run is one slice assignment.
        """
        runs: list[tuple[int, int]] = []
        need = n
        total = self.total_pages
        start = self._cursor
        window = max(2 * n, 512)  # the cursor usually sits on free pages: scan little
        while need > 0 and start < total:
            seg = self.state[start : start + window]
            free = np.empty(seg.size + 2, dtype=np.int8)
            free[0] = free[-1] = 0
            np.equal(seg, PageState.FREE, out=free[1:-1].view(np.bool_))
            edges = np.flatnonzero(np.diff(free))
            firsts, ends = edges[0::2], edges[1::2]
            for first, end in zip(firsts.tolist(), ends.tolist(), strict=True):
                take = min(end - first, need)
                self.state[start + first : start + first + take] = state
                runs.append((start + first, take))
                need -= take
                if need == 0:
                    start += first + take
                    break
            else:
                start += seg.size
            window *= 2
        self._cursor = start
        return self.dense_runs_to_pfn_runs(
            join_ranges(np.asarray(runs, dtype=np.int64).reshape(-1, 2))
        )

    def dense_runs_to_pfn_runs(self, dense: RangeArray) -> RangeArray:
        """Runs of dense indices -> runs of PFNs (split where RAM has a hole)."""
        if self.ram.starts.size == 1:
            out = dense.copy()
            out[:, 0] += int(self.ram.starts[0])
            return out
        return compact(self.to_pfns(expand_ranges(dense)))

    def allocate_contiguous(self, n: int, state: PageState = PageState.KERNEL) -> int:
        """The first PFN of ``n`` consecutive free pages, now in ``state`` (kernel memory
        for rings and buffers, which must be physically contiguous)."""
        free = np.empty(self.total_pages + 2, dtype=np.int8)
        free[0] = free[-1] = 0
        np.equal(self.state, PageState.FREE, out=free[1:-1].view(np.bool_))
        edges = np.flatnonzero(np.diff(free))
        firsts, ends = edges[0::2], edges[1::2]
        fits = np.flatnonzero(ends - firsts >= n)
        for k in fits.tolist():
            first = int(firsts[k])
            pfns = self.to_pfns(np.arange(first, first + n, dtype=np.int64))
            if n == 1 or int(pfns[-1] - pfns[0]) == n - 1:  # not across a RAM hole
                self.state[first : first + n] = state
                return int(pfns[0])
        raise ValueError(f"no {n} contiguous free pages")

    def allocate(self, n: int, state: PageState = PageState.BALLOON) -> PfnArray:
        """Like :meth:`allocate_runs`, page by page (the legacy driver's view)."""
        return expand_ranges(self.allocate_runs(n, state))

    def release(self, pfns: PfnArray, expect: PageState = PageState.BALLOON) -> None:
        """Pages back to free; each must be in ``expect`` (a model bug otherwise)."""
        dense = self.to_dense(pfns)
        if not (self.state[dense] == expect).all():
            raise ValueError(f"releasing pages that are not {expect.name}")
        self.state[dense] = PageState.FREE
        if dense.size:
            self._cursor = min(self._cursor, int(np.min(dense)))

    def take(self, pfns: PfnArray, state: PageState) -> None:
        """Specific free pages into ``state`` (compaction picking a migration target)."""
        dense = self.to_dense(pfns)
        if not (self.state[dense] == PageState.FREE).all():
            raise ValueError("taking pages that are not free")
        self.state[dense] = state

    def pages_in(self, state: PageState) -> PfnArray:
        """Every page in ``state``, ascending."""
        return self.to_pfns(np.flatnonzero(self.state == state).astype(np.int64))
