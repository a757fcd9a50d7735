"""The seed's Linux virtio_balloon driver, in Python, writing real rings into guest memory.

Follows ``drivers/virtio/virtio_balloon.c`` as patched by the seed
(``shared/seeds/000_34aea63179f8e450.txt``): the legacy path sends arrays of up to 256 PFNs
and waits for each; with ``VIRTIO_BALLOON_F_SG`` (seed-sg profile only) the pages go into a
page bitmap (numpy where the seed uses an xbitmap) which ``tell_host_sgs`` searches for runs,
one descriptor per run, one chain per request, kicking and starting a new chain when the
queue fills.

Where the seed is wrong this model is right, and says so where it differs:

1. ``uint32_t sg_size`` overflows for a run of 4 GiB or more: runs are split at
   ``round_down(UINT32_MAX, 4096)``, as later versions of the series do.
2. ``tell_host_sgs`` searches ``[pfn_min, pfn_max)`` with ``while (sg_pfn_start <
   page_xb_end)``: the page at ``pfn_max`` is never sent when a run starts on it (after a
   one-page gap). Here the search includes ``pfn_max``.
3. ``virtqueue_add_chain_desc`` returns -ENOSPC when a fresh chain finds no free
   descriptor, and ``tell_host_sgs`` ignores the return value, so that run is lost: counted
   in the guest's balloon, never told to the host. Here the driver waits for the device.
4. ``tell_host_sgs`` waits for *one* used buffer after its last kick, though earlier chains
   of the same request may still be in flight when the device is slow; a deflate must not
   free pages before the host has all of them (MUST_TELL_HOST). Here it waits for all.
5. ``tell_host_sgs`` puts a whole request in one chain, so inflating 7 GiB makes a 7 GiB
   chain; spec 2.7.5.2 says "Drivers MUST NOT add a descriptor chain longer than 2^32 bytes
   in total", and a checking device (ours) refuses it. Here a chain is closed and a new one
   started before its buffers pass 2^32 bytes. (Found by the device side's ChainTooLong.)
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from balloonctl.errors import GuestModelError
from balloonctl.guest.allocator import GuestAllocator, PageState
from balloonctl.guest.vring import DriverQueue, OpenChain
from balloonctl.units import PAGE_SHIFT, PAGE_SIZE
from balloonctl.virtio import spec
from balloonctl.virtio.features import Profile, negotiate, queue_layout
from balloonctl.virtio.layout import RingLayout
from balloonctl.virtio.memory import GuestMemory
from balloonctl.virtio.pages import RangeArray, expand_ranges
from balloonctl.virtio.spec import BalloonQueue, StatTag

log = logging.getLogger(__name__)

#: What the seed's driver knows (its features[] table), by profile; plus the transport
#: features Linux's virtio core accepts. A seed-sg driver does not know bits 4 and 5.
DRIVER_FEATURES = {
    "seed-sg": ("must-tell-host", "stats-vq", "deflate-on-oom", "sg"),
    "virtio-1.2": ("must-tell-host", "stats-vq", "deflate-on-oom"),
}
TRANSPORT_FEATURES = ("ring-indirect-desc", "ring-event-idx", "version-1")
#: Linux's oom_pages module parameter: pages given back per OOM notification.
OOM_PAGES = 256
SG_CHUNK_PAGES = spec.SG_CHUNK_MAX >> PAGE_SHIFT


class Transport(Protocol):
    """The device as a driver reaches it (virtio-pci's registers, reduced)."""

    def device_features(self) -> int:
        """The features the device offers."""

    def set_features(self, acked: int) -> None:
        """Write the driver features and FEATURES_OK (may raise NegotiationError)."""

    def setup_queue(self, index: int, layout: RingLayout) -> None:
        """Tell the device where queue ``index`` is."""

    def notify(self, index: int) -> None:
        """Ring queue ``index``'s doorbell."""

    def wait(self, index: int) -> None:
        """Let the device run while the driver waits on queue ``index``."""

    def read_config(self, offset: int, size: int) -> bytes:
        """Read device config space."""

    def write_config(self, offset: int, data: bytes) -> None:
        """Write device config space."""

    def driver_ok(self) -> None:
        """Set DRIVER_OK."""


@dataclass
class VmEvents:
    """The guest kernel's vm event counters that update_balloon_stats reads (all_vm_events;
    /proc/vmstat's names), in pages or events as the kernel keeps them. They only grow.

    The driver converts them as Linux 6.12's update_balloon_vm_stats does (pages_to_bytes for
    the swap, scan and reclaim pages; counts as they are): see :data:`spec.EXTENDED_STAT_TAGS`
    for what each of the newer six means. A guest that never swaps or reclaims (the testbed's)
    has them all at zero, which is the truth about it.
    """

    pswpin: int = 0  # VIRTIO_BALLOON_S_SWAP_IN, pages
    pswpout: int = 0  # VIRTIO_BALLOON_S_SWAP_OUT, pages
    pgmajfault: int = 0  # VIRTIO_BALLOON_S_MAJFLT
    pgfault: int = 0  # VIRTIO_BALLOON_S_MINFLT
    oom_kill: int = 0  # VIRTIO_BALLOON_S_OOM_KILL: the OOM killer's victims
    allocstall: int = 0  # VIRTIO_BALLOON_S_ALLOC_STALL: entries into direct reclaim (all zones)
    pgscan_kswapd: int = 0  # VIRTIO_BALLOON_S_ASYNC_SCAN, pages
    pgscan_direct: int = 0  # VIRTIO_BALLOON_S_DIRECT_SCAN, pages
    pgsteal_kswapd: int = 0  # VIRTIO_BALLOON_S_ASYNC_RECLAIM, pages
    pgsteal_direct: int = 0  # VIRTIO_BALLOON_S_DIRECT_RECLAIM, pages
    htlb_buddy_pgalloc: int = 0  # VIRTIO_BALLOON_S_HTLB_PGALLOC
    htlb_buddy_pgalloc_fail: int = 0  # VIRTIO_BALLOON_S_HTLB_PGFAIL


@dataclass(frozen=True)
class MemInfo:
    """What update_balloon_stats takes from si_meminfo/si_mem_available, in bytes."""

    free: int  # VIRTIO_BALLOON_S_MEMFREE: MemFree
    total: int  # VIRTIO_BALLOON_S_MEMTOT: MemTotal
    available: int  # VIRTIO_BALLOON_S_AVAIL: MemAvailable
    caches: int  # VIRTIO_BALLOON_S_CACHES: reclaimable page cache


@dataclass
class StageTimes:
    """The seed's breakdown of an inflate, guest side (the device times its own stages)."""

    allocate_s: float = 0.0
    tell_host_s: float = 0.0


class BalloonStack:
    """The balloon's pages, last in first out (balloon_page_enqueue/dequeue), as runs."""

    def __init__(self) -> None:
        self._runs: list[list[int]] = []
        self.pages = 0

    def push(self, runs: RangeArray) -> None:
        """Pages just inflated."""
        for first, count in runs.tolist():
            if self._runs and self._runs[-1][0] + self._runs[-1][1] == first:
                self._runs[-1][1] += count
            else:
                self._runs.append([first, count])
            self.pages += count

    def pop(self, n: int) -> RangeArray:
        """Up to ``n`` of the most recently inflated pages."""
        out: list[tuple[int, int]] = []
        while n > 0 and self._runs:
            first, count = self._runs[-1]
            take = min(n, count)
            out.append((first + count - take, take))
            if take == count:
                self._runs.pop()
            else:
                self._runs[-1][1] -= take
            n -= take
            self.pages -= take
        return np.asarray(out, dtype=np.int64).reshape(-1, 2)

    def remove(self, pfn: int) -> bool:
        """Take one page out from anywhere (migration); False if it is not here."""
        for i, (first, count) in enumerate(self._runs):
            if first <= pfn < first + count:
                left, right = [first, pfn - first], [pfn + 1, first + count - pfn - 1]
                self._runs[i : i + 1] = [r for r in (left, right) if r[1] > 0]
                self.pages -= 1
                return True
        return False

    def all_runs(self) -> RangeArray:
        """Every page in the balloon, as runs in stack order."""
        return np.asarray(self._runs, dtype=np.int64).reshape(-1, 2)


class BalloonDriver:
    """virtio_balloon, one instance per device."""

    def __init__(
        self,
        mem: GuestMemory,
        allocator: GuestAllocator,
        transport: Transport,
        *,
        profile: Profile,
        queue_size: int = 128,
        queue_sizes: Mapping[BalloonQueue, int] | None = None,
        features: Sequence[str] | None = None,
        indirect_entries: int = 16,
        sg_indirect: bool = False,
        extended_stats: bool = True,
    ) -> None:
        """``sg_indirect`` sends an SG request that fits one indirect table through it
        (Linux's virtqueue_add_sgs), instead of the seed's direct chain. ``extended_stats``
        sends stats tags 10-15 as Linux 6.12 and later do; False is an older kernel's ten."""
        self.mem = mem
        self.allocator = allocator
        self.transport = transport
        self.profile = profile
        self.queue_size = queue_size
        #: Per-queue sizes where the device's differ (a Linux driver takes each queue's size
        #: from the device, vp_modern_get_queue_size); ``queue_size`` for the others.
        self.queue_sizes = dict(queue_sizes or {})
        wanted = (
            features
            if features is not None
            else (DRIVER_FEATURES[profile.name] + TRANSPORT_FEATURES)
        )
        self.supported = profile.encode(wanted)
        self.indirect_entries = indirect_entries
        self.sg_indirect = sg_indirect
        self.extended_stats = extended_stats
        #: When a list, every request is appended as (queue, runs): what the driver meant.
        self.record: list[tuple[BalloonQueue, RangeArray]] | None = None
        self.acked = 0
        self.queues: dict[BalloonQueue, DriverQueue] = {}
        self.balloon = BalloonStack()
        self.times = StageTimes()
        self.oom_deflated = 0
        # The page bitmap the seed keeps in an xbitmap, one flag per RAM page (dense index).
        self._bitmap = np.zeros(allocator.total_pages, dtype=bool)
        self._pfns_addr = 0
        self._stats_addr = 0

    # --- probe (virtballoon_probe / init_vqs) ----------------------------------------------
    def has(self, name: str) -> bool:
        """Whether ``name`` was negotiated."""
        return self.profile.has(self.acked, name)

    @property
    def use_sg(self) -> bool:
        """The seed's ``virtio_has_feature(vdev, VIRTIO_BALLOON_F_SG)``."""
        return self.has("sg")

    def probe(self) -> None:
        """Negotiate, set the queues up in guest memory, prime the stats queue, DRIVER_OK."""
        self.acked = negotiate(self.transport.device_features(), self.supported)
        self.transport.set_features(self.acked)
        roles = queue_layout(self.profile, self.acked)
        indirect = self.has("ring-indirect-desc") and self.indirect_entries > 0
        for index, role in enumerate(roles):
            size = self.queue_sizes.get(role, self.queue_size)
            table_bytes = size * self.indirect_entries * spec.DESC_SIZE if indirect else 0
            pages = -(-(RingLayout.packed(size).end + table_bytes) // PAGE_SIZE)
            base = self.allocator.allocate_contiguous(pages) << PAGE_SHIFT
            layout = RingLayout.packed(size, base)
            area = (layout.end + 15 & ~15, self.indirect_entries) if indirect else None
            self.queues[role] = DriverQueue(
                self.mem,
                layout,
                notify=functools.partial(self.transport.notify, index),
                wait=functools.partial(self.transport.wait, index),
                event_idx=self.has("ring-event-idx"),
                indirect_area=area,
            )
            self.transport.setup_queue(index, layout)
        # vb->pfns[] and the stats array live in the driver's kernel memory.
        self._pfns_addr = self.allocator.allocate_contiguous(1) << PAGE_SHIFT
        self._stats_addr = self.allocator.allocate_contiguous(1) << PAGE_SHIFT
        self.transport.driver_ok()
        if BalloonQueue.STATS in self.queues:
            # init_vqs: "Prime this virtqueue with one buffer so the hypervisor can use it."
            self._send_stats()

    # --- config -----------------------------------------------------------------------------
    def target_pages(self) -> int:
        """num_pages from config space: the host's wish."""
        raw = self.transport.read_config(spec.CONFIG_NUM_PAGES_OFF, 4)
        return int.from_bytes(raw, "little")

    def towards_target(self) -> int:
        """Pages to inflate (positive) or deflate (negative) to meet the target."""
        return self.target_pages() - self.balloon.pages

    def update_balloon_size(self) -> None:
        """Tell the host how many pages the balloon holds (config ``actual``)."""
        self.transport.write_config(
            spec.CONFIG_ACTUAL_OFF, self.balloon.pages.to_bytes(4, "little")
        )

    def balloon_work(self, *, max_rounds: int = 1 << 20) -> None:
        """update_balloon_size_func: fill or leak until the target is met or no progress."""
        for _ in range(max_rounds):
            diff = self.towards_target()
            if diff == 0:
                return
            moved = self.fill_balloon(diff) if diff > 0 else self.leak_balloon(-diff)
            self.update_balloon_size()
            if moved == 0:
                # Linux reschedules itself; in the model, give up until the next change
                # (the guest keeps memory it cannot give up).
                return

    # --- inflate / deflate --------------------------------------------------------------------
    def fill_balloon(self, num: int) -> int:
        """Inflate by up to ``num`` pages (256 at a time on the legacy path); the count."""
        if not self.use_sg:
            num = min(num, spec.PFNS_PER_BUFFER_MAX)  # "one array worth at a time"
        t0 = time.perf_counter()
        runs = self.allocator.allocate_runs(num, PageState.BALLOON)
        self.times.allocate_s += time.perf_counter() - t0
        got = int(runs[:, 1].sum()) if len(runs) else 0
        if got == 0:
            return 0
        t1 = time.perf_counter()
        self.balloon.push(runs)
        vq = self.queues[BalloonQueue.INFLATE]
        if self.use_sg:
            self._tell_host_sgs(vq, *self._mark(runs))
        else:
            self._tell_host(vq, runs)
        self.times.tell_host_s += time.perf_counter() - t1
        return got

    def leak_balloon(self, num: int) -> int:
        """Deflate by up to ``num`` pages; the host is told before the guest reuses them
        (MUST_TELL_HOST: "we *have* to do it in this order")."""
        if not self.use_sg:
            num = min(num, spec.PFNS_PER_BUFFER_MAX)
        runs = self.balloon.pop(min(num, self.balloon.pages))
        got = int(runs[:, 1].sum()) if len(runs) else 0
        if got == 0:
            return 0
        vq = self.queues[BalloonQueue.DEFLATE]
        if self.use_sg:
            self._tell_host_sgs(vq, *self._mark(runs))
        else:
            self._tell_host(vq, runs)
        # release_pages_balloon: only now do the pages go back to the guest.
        self.allocator.release(expand_ranges(runs))
        return got

    def _note(self, vq: DriverQueue, runs: RangeArray) -> None:
        if self.record is not None:
            role = next(r for r, q in self.queues.items() if q is vq)
            self.record.append((role, runs.copy()))

    def _tell_host(self, vq: DriverQueue, runs: RangeArray) -> None:
        """The legacy tell_host: one buffer of le32 PFNs, kick, wait for it to come back."""
        self._note(vq, runs)
        pfns = expand_ranges(runs).astype("<u4").tobytes()
        self.mem.write(self._pfns_addr, pfns)
        vq.add_sgs([(self._pfns_addr, len(pfns))], [], token="pfns")
        vq.kick()
        vq.wait_for_used()

    def _mark(self, runs: RangeArray) -> tuple[int, int]:
        """xb_set_bit for each page (a slice per run); returns the seed's (pfn_min, pfn_max)
        as dense indices."""
        dense = self.allocator.to_dense(runs[:, 0])
        for start, count in zip(dense.tolist(), runs[:, 1].tolist(), strict=True):
            self._bitmap[start : start + count] = True
        return int(np.min(dense)), int(np.max(dense + runs[:, 1])) - 1

    def _tell_host_sgs(self, vq: DriverQueue, lo: int, hi: int) -> None:
        """The seed's tell_host_sgs: one descriptor per run of set bits in [lo, hi], the
        last page included (fix 2), split at SG_CHUNK_PAGES (fix 1); a full queue
        publishes, kicks and waits (fix 3); every chain is acked before returning (fix 4)."""
        window = self._bitmap[lo : hi + 1]
        padded = np.zeros(window.size + 2, dtype=np.int8)
        padded[1:-1] = window
        edges = np.flatnonzero(np.diff(padded))  # run starts and ends, alternating
        window[:] = False  # xb_zero
        dense = np.empty((edges.size // 2, 2), dtype=np.int64)
        dense[:, 0] = edges[0::2] + lo
        dense[:, 1] = edges[1::2] - edges[0::2]
        runs = self.allocator.dense_runs_to_pfn_runs(dense)
        self._note(vq, runs)
        chunks = [
            (start << PAGE_SHIFT, min(SG_CHUNK_PAGES, first + count - start) << PAGE_SHIFT)
            for first, count in runs.tolist()
            for start in range(first, first + count, SG_CHUNK_PAGES)
        ]
        if self.sg_indirect and 1 < len(chunks) <= min(vq.indirect_entries, vq.size):
            vq.add_sgs(chunks, [], token="sg")
        else:
            chain = OpenChain()
            chain_bytes = 0
            for addr, length in chunks:
                if chain_bytes + length > spec.MAX_CHAIN_BYTES:  # fix 5
                    vq.publish_chain(chain, token="sg")
                    chain, chain_bytes = OpenChain(), 0
                vq.add_chain_desc(chain, addr, length)
                chain_bytes = chain_bytes + length if chain.count > 1 else length
            vq.publish_chain(chain, token="sg")
        vq.kick()
        while vq.in_flight:
            vq.wait_for_used()

    # --- deflate on OOM (virtballoon_oom_notify) --------------------------------------------
    def oom_notify(self) -> int:
        """The guest is out of memory: give back up to OOM_PAGES if DEFLATE_ON_OOM."""
        if not self.has("deflate-on-oom"):
            return 0
        freed = self.leak_balloon(OOM_PAGES)
        self.update_balloon_size()
        self.oom_deflated += freed
        return freed

    # --- page migration (virtballoon_migratepage) ---------------------------------------------
    def migrate(self, old_pfn: int) -> int:
        """Compaction moves balloon page ``old_pfn``: a new page goes into the balloon (told
        on the inflate queue), then the old one comes out (deflate queue) and is freed. In
        the SG form one page is one descriptor (tell_host_one_page). Returns the new PFN."""
        if not self.balloon.remove(old_pfn):
            raise GuestModelError(f"page {old_pfn} is not in the balloon")
        new = self.allocator.allocate(1, PageState.BALLOON)
        if new.size == 0:
            self.balloon.push(np.array([[old_pfn, 1]], dtype=np.int64))
            raise GuestModelError("no free page to migrate to")
        new_pfn = int(new[0])
        self.balloon.push(np.array([[new_pfn, 1]], dtype=np.int64))
        for role, pfn in ((BalloonQueue.INFLATE, new_pfn), (BalloonQueue.DEFLATE, old_pfn)):
            vq = self.queues[role]
            if self.use_sg:
                self._note(vq, np.array([[pfn, 1]], dtype=np.int64))
                chain = OpenChain()
                vq.add_chain_desc(chain, pfn << PAGE_SHIFT, PAGE_SIZE)
                vq.publish_chain(chain, token="page")
                vq.kick()
                vq.wait_for_used()
            else:
                self._tell_host(vq, np.array([[pfn, 1]], dtype=np.int64))
        self.allocator.release(np.array([old_pfn], dtype=np.int64))
        return new_pfn

    # --- stats (stats_request / update_balloon_stats) ---------------------------------------
    def vm_events(self) -> VmEvents:
        """The guest's vm event counters (a hook: the testbed's guest never swaps, faults in
        the kernel's sense or reclaims, so all are zero; the simulated VM's guest counts)."""
        return VmEvents()

    def meminfo(self) -> MemInfo:
        """MemFree, MemTotal, MemAvailable and the page cache, in bytes (a hook). The
        testbed's guest has no page cache: what is free is what is available."""
        free = self.allocator.count(PageState.FREE) * PAGE_SIZE
        return MemInfo(
            free=free, total=self.allocator.total_pages * PAGE_SIZE, available=free, caches=0
        )

    def stats_values(self) -> list[tuple[int, int]]:
        """update_balloon_stats, in Linux 6.12's order and units: the vm events first
        (update_balloon_vm_stats: swap in bytes, faults, then tags 10-15 when
        ``extended_stats``, then hugetlb), then the memory sizes. pages_to_bytes is
        ``pages << PAGE_SHIFT``; counts go out as they are."""
        ev = self.vm_events()
        values: list[tuple[int, int]] = [
            (StatTag.SWAP_IN, ev.pswpin << PAGE_SHIFT),
            (StatTag.SWAP_OUT, ev.pswpout << PAGE_SHIFT),
            (StatTag.MAJFLT, ev.pgmajfault),
            (StatTag.MINFLT, ev.pgfault),
        ]
        if self.extended_stats:
            values += [
                (StatTag.OOM_KILLS, ev.oom_kill),
                (StatTag.ALLOC_STALLS, ev.allocstall),
                (StatTag.ASYNC_SCANS, ev.pgscan_kswapd << PAGE_SHIFT),
                (StatTag.DIRECT_SCANS, ev.pgscan_direct << PAGE_SHIFT),
                (StatTag.ASYNC_RECLAIMS, ev.pgsteal_kswapd << PAGE_SHIFT),
                (StatTag.DIRECT_RECLAIMS, ev.pgsteal_direct << PAGE_SHIFT),
            ]
        info = self.meminfo()
        values += [
            (StatTag.HTLB_PGALLOC, ev.htlb_buddy_pgalloc),
            (StatTag.HTLB_PGFAIL, ev.htlb_buddy_pgalloc_fail),
            (StatTag.MEMFREE, info.free),
            (StatTag.MEMTOT, info.total),
            (StatTag.AVAIL, info.available),
            (StatTag.CACHES, info.caches),
        ]
        return values

    def _send_stats(self) -> None:
        data = b"".join(spec.STAT_STRUCT.pack(tag, value) for tag, value in self.stats_values())
        self.mem.write(self._stats_addr, data)
        vq = self.queues[BalloonQueue.STATS]
        vq.add_sgs([(self._stats_addr, len(data))], [], token="stats")
        vq.kick()

    def interrupt(self, role: BalloonQueue) -> None:
        """A used-buffer notification. On the stats queue it is the host asking for fresh
        stats (stats_request): take the buffer back and send it refilled."""
        if role is BalloonQueue.STATS:
            vq = self.queues[role]
            if vq.get_buf() is not None:
                self._send_stats()
