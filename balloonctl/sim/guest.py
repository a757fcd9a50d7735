"""The simulated guest's own memory: kernel, programs (anon), page cache, and the OOM path.

The guest's RAM is real host memory (a private anonymous mapping, :mod:`virtio.memory`);
its page states live in the guest model's :class:`GuestAllocator`, shared with the balloon
driver, so the balloon can only take pages the guest really has free (or can reclaim from
cache), and a workload that needs memory the balloon holds really has to get it back.

Reclaim, counted as Linux counts it (:class:`~balloonctl.guest.driver.VmEvents`, what the
balloon driver's stats tags 10-15 report; their meaning is in ``virtio.spec``):

* **kswapd** (background reclaim): when an allocation left free memory below the low
  watermark, the next half-second step drops page cache until free memory is back at the
  high watermark (mm/vmscan.c kswapd, balance_pgdat); counted in ``pgscan_kswapd`` and
  ``pgsteal_kswapd`` (``async-scans``, ``async-reclaims``). Watermarks as mm/page_alloc.c
  sets them for one zone (:func:`watermarks`).
* **direct reclaim**: a program, or the balloon's own page allocation, that finds no free
  page reclaims page cache itself before going on: one ``allocstall`` per attempt
  (``alloc-stalls``, whether it freed anything or not) and the pages in
  ``pgscan_direct``/``pgsteal_direct`` (``direct-scans``, ``direct-reclaims``).
* **OOM**: a program still short after direct reclaim goes to the OOM notifiers
  (virtio_balloon's deflate-on-OOM, when negotiated), then to the OOM killer: one
  ``oom_kill`` (``oom-kills``). Nothing is really killed; the program makes do.

Simplifications, said once: the model's page cache is all clean and unmapped, so every page
scanned is reclaimed (scans equal reclaims; a real kernel scans more than it frees), anon
memory is never swapped (no swap device), and reclaim takes the newest cache first.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from balloonctl.guest.allocator import GuestAllocator, PageState
from balloonctl.guest.driver import VmEvents
from balloonctl.sim.workloads import demand
from balloonctl.units import PAGE_SHIFT, PAGE_SIZE
from balloonctl.virtio.memory import Backing, GuestMemory

log = logging.getLogger(__name__)

_EMPTY = np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class GuestSpec:
    """A guest to simulate."""

    memory: int = 2 << 30
    workload: str = "idle"
    #: Memory the kernel holds from boot on and never gives up.
    kernel: int | None = None
    #: The workload's clock runs this many times faster than real time (tests, demos).
    time_scale: float = 1.0
    #: Seconds the workload's clock starts at: many VMs of one sim get different ones, so
    #: that 200 ``spiky`` guests do not all spike in the same second (which stalled a
    #: 1000-VM sim for 3 s, measured).
    phase: float = 0.0

    @property
    def kernel_bytes(self) -> int:
        """Kernel memory: 1/32 of RAM, at least 32 MiB, at most 256 MiB (a small Debian
        guest's MemTotal is about that much below its RAM)."""
        if self.kernel is not None:
            return self.kernel
        return max(32 << 20, min(256 << 20, self.memory // 32))


@dataclass(frozen=True, slots=True)
class Watermarks:
    """A zone's free-page watermarks, in pages: kswapd wakes below ``low`` and sleeps at
    ``high``; below ``min`` allocations reclaim directly."""

    min: int
    low: int
    high: int


def watermarks(total_pages: int) -> Watermarks:
    """Linux's defaults for a guest of one zone of ``total_pages`` pages.

    mm/page_alloc.c: calculate_min_free_kbytes sets min_free_kbytes to
    ``int_sqrt(lowmem_kbytes * 16)`` clamped to [128, 262144]; __setup_per_zone_wmarks puts
    low and high ``max(min / 4, managed * watermark_scale_factor / 10000)`` (factor 10) and
    twice that above min. The model takes all of RAM as lowmem and managed. A 256 MiB
    guest: 2, 2.5 and 3 MiB; 2 GiB: 5.7, 7.7 and 9.8 MiB.
    """
    kbytes = total_pages * PAGE_SIZE // 1024
    min_kbytes = max(128, min(262144, math.isqrt(kbytes * 16)))
    min_pages = min_kbytes * 1024 // PAGE_SIZE
    gap = max(min_pages // 4, total_pages * 10 // 10000)
    return Watermarks(min=min_pages, low=min_pages + gap, high=min_pages + 2 * gap)


class SimGuest:
    """Guest RAM and what its programs do with it."""

    def __init__(self, spec: GuestSpec, clock: Callable[[], float]) -> None:
        self.spec = spec
        self.mem = GuestMemory.simple(spec.memory, Backing.ANON)
        self.allocator = GuestAllocator(
            self.mem.page_ranges(), used_pages=spec.kernel_bytes >> PAGE_SHIFT
        )
        self._clock = clock
        self.booted = clock()
        self.anon = _EMPTY
        self.cache = _EMPTY
        #: The kernel's vm event counters (what the balloon driver's stats report).
        self.events = VmEvents()
        self.watermarks = watermarks(self.allocator.total_pages)
        #: An allocation since kswapd last looked (counting free pages costs a pass over the
        #: page states: not done on the steps where nothing was allocated).
        self._kswapd_due = False
        #: Called when programs need memory that only the balloon has (the OOM notifier);
        #: returns pages it gave back. Set while a balloon driver is bound.
        self.oom_notifier: Callable[[], int] | None = None

    def close(self) -> None:
        """Give the RAM back to the host."""
        self.mem.close()

    @property
    def total_pages(self) -> int:
        """RAM pages."""
        return self.allocator.total_pages

    def free_pages(self) -> int:
        """Pages nobody holds."""
        return self.allocator.count(PageState.FREE)

    @property
    def oom_kills(self) -> int:
        """Times the OOM killer ran (vm event OOM_KILL)."""
        return self.events.oom_kill

    @property
    def minor_faults(self) -> int:
        """Pages the guest's programs and page cache faulted in (vm event PGFAULT)."""
        return self.events.pgfault

    # --- reclaim, used by the balloon and by programs -----------------------------------------
    def _drop_cache(self, pages: int) -> int:
        """Free up to ``pages`` of page cache (newest first); the count. Not counted as
        anything: the callers say whether it was reclaim, and which kind."""
        take = min(pages, int(self.cache.size))
        if take <= 0:
            return 0
        victims = self.cache[self.cache.size - take :]
        self.cache = self.cache[: self.cache.size - take]
        self.allocator.release(victims, PageState.USED)
        return take

    def direct_reclaim(self, pages: int) -> int:
        """An allocation found no free page and reclaims up to ``pages`` of cache itself
        (mm/vmscan.c try_to_free_pages): one alloc stall, whatever it frees; the count."""
        self.events.allocstall += 1
        got = self._drop_cache(pages)
        self.events.pgscan_direct += got
        self.events.pgsteal_direct += got
        return got

    def wake_kswapd(self) -> None:
        """Memory was allocated outside :meth:`step` (the balloon): kswapd looks at the next
        step whether free memory fell below the low watermark."""
        self._kswapd_due = True

    def kswapd(self) -> int:
        """Background reclaim: below the low watermark, drop cache up to the high one; the
        pages reclaimed (0 when free memory is above low, or there is no cache)."""
        self._kswapd_due = False
        free = self.free_pages()
        if free >= self.watermarks.low:
            return 0
        got = self._drop_cache(self.watermarks.high - free)
        self.events.pgscan_kswapd += got
        self.events.pgsteal_kswapd += got
        return got

    # --- the workload ---------------------------------------------------------------------------
    def step(self) -> None:
        """Chase the workload's demand for now (called every half second)."""
        elapsed = (self._clock() - self.booted) * self.spec.time_scale + self.spec.phase
        want = demand(self.spec.workload, elapsed, self.spec.memory)
        self._set_anon(want.anon >> PAGE_SHIFT)
        self._set_cache(want.cache >> PAGE_SHIFT)
        if self._kswapd_due:
            self.kswapd()

    def _set_anon(self, pages: int) -> None:
        have = int(self.anon.size)
        if pages < have:
            victims = self.anon[pages:]
            self.anon = self.anon[:pages]
            self.allocator.release(victims, PageState.USED)
            return
        need = pages - have
        got = self._allocate(need)
        if got.size < need:
            # The page allocator's slow path: direct reclaim of cache, then the OOM
            # notifiers (virtio_balloon's deflate-on-OOM), then the OOM killer.
            self.direct_reclaim(need - int(got.size))
            got = np.concatenate([got, self._allocate(need - int(got.size))])
            while got.size < need and self.oom_notifier is not None and self.oom_notifier() > 0:
                got = np.concatenate([got, self._allocate(need - int(got.size))])
            if got.size < need:
                self.events.oom_kill += 1
                log.info("guest OOM: wanted %d pages, got %d", need, got.size)
        self.anon = np.concatenate([self.anon, got])

    def _set_cache(self, pages: int) -> None:
        have = int(self.cache.size)
        if pages < have:
            # The programs are done with those files (deleted, truncated): freed, not
            # reclaimed.
            self._drop_cache(have - pages)
            return
        # The page cache only grows into free memory; it never pushes anything out.
        self.cache = np.concatenate([self.cache, self._allocate(pages - have)])

    def _allocate(self, pages: int) -> np.ndarray:
        if pages <= 0:
            return _EMPTY
        got = self.allocator.allocate(pages, PageState.USED).astype(np.int64)
        self.events.pgfault += int(got.size)
        if got.size:
            self._kswapd_due = True
        return got

    # --- what /proc/meminfo would say ------------------------------------------------------------
    def meminfo(self, balloon_pages: int, balloon_adjusts_total: bool) -> dict[str, int]:
        """Bytes: total (less the balloon when the driver adjusts managed pages, i.e. without
        deflate-on-OOM, as Linux does), free, available (free + reclaimable cache) and
        cache."""
        free = self.free_pages() * PAGE_SIZE
        cache = int(self.cache.size) * PAGE_SIZE
        total = self.total_pages * PAGE_SIZE
        if balloon_adjusts_total:
            total -= balloon_pages * PAGE_SIZE
        return {"total": total, "free": free, "available": free + cache, "cache": cache}
