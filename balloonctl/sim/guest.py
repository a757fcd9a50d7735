"""The simulated guest's own memory: kernel, programs (anon), page cache, and the OOM path.

The guest's RAM is real host memory (a private anonymous mapping, :mod:`virtio.memory`);
its page states live in the guest model's :class:`GuestAllocator`, shared with the balloon
driver, so the balloon can only take pages the guest really has free (or can reclaim from
cache), and a workload that needs memory the balloon holds really has to get it back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from balloonctl.guest.allocator import GuestAllocator, PageState
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
        self.oom_kills = 0
        self.minor_faults = 0
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

    # --- reclaim, used by the balloon and by programs -----------------------------------------
    def reclaim_cache(self, pages: int) -> int:
        """Drop up to ``pages`` of page cache (newest last in, first out); the count."""
        take = min(pages, int(self.cache.size))
        if take <= 0:
            return 0
        victims = self.cache[self.cache.size - take :]
        self.cache = self.cache[: self.cache.size - take]
        self.allocator.release(victims, PageState.USED)
        return take

    # --- the workload ---------------------------------------------------------------------------
    def step(self) -> None:
        """Chase the workload's demand for now (called every half second)."""
        elapsed = (self._clock() - self.booted) * self.spec.time_scale + self.spec.phase
        want = demand(self.spec.workload, elapsed, self.spec.memory)
        self._set_anon(want.anon >> PAGE_SHIFT)
        self._set_cache(want.cache >> PAGE_SHIFT)

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
            # The page allocator's slow path: reclaim cache, then the OOM notifiers
            # (virtio_balloon's deflate-on-OOM), then the OOM killer.
            self.reclaim_cache(need - int(got.size))
            got = np.concatenate([got, self._allocate(need - int(got.size))])
            while got.size < need and self.oom_notifier is not None and self.oom_notifier() > 0:
                got = np.concatenate([got, self._allocate(need - int(got.size))])
            if got.size < need:
                self.oom_kills += 1
                log.info("guest OOM: wanted %d pages, got %d", need, got.size)
        self.anon = np.concatenate([self.anon, got])

    def _set_cache(self, pages: int) -> None:
        have = int(self.cache.size)
        if pages < have:
            self.reclaim_cache(have - pages)
            return
        # The page cache only grows into free memory; it never pushes anything out.
        self.cache = np.concatenate([self.cache, self._allocate(pages - have)])

    def _allocate(self, pages: int) -> np.ndarray:
        if pages <= 0:
            return _EMPTY
        got = self.allocator.allocate(pages, PageState.USED).astype(np.int64)
        self.minor_faults += int(got.size)
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
