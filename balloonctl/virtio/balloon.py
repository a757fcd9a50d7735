"""The balloon device: features, queues, config space, and what inflating really does.

It keeps its own record of which guest pages are in the balloon (a bitmap over RAM pages),
independent of what the driver claims in ``actual``: a guest cannot make it inflate a page
twice, deflate a page it never gave, or touch anything outside RAM. (Free page reporting
discards free pages, ballooned or not: discarding is idempotent.) Inflated pages are given
back to the host for real (``madvise``/punch-hole, see ``memory.py``), one call per page as
QEMU 7.2 does or one per merged range as Firecracker does, selectable so the cost of each can
be measured.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np

from balloonctl.errors import VirtioError
from balloonctl.units import PAGE_SHIFT
from balloonctl.virtio import spec
from balloonctl.virtio.features import (
    VIRTIO_1_2,
    Profile,
    check_features_ok,
    queue_layout,
)
from balloonctl.virtio.memory import GuestMemory
from balloonctl.virtio.pages import RamMap, RangeArray, Rejection
from balloonctl.virtio.queue import Chain, SplitQueue
from balloonctl.virtio.requests import (
    RequestForm,
    StatsBuffer,
    decode_stats,
    gather,
    gather_report,
    rejection_pages,
)
from balloonctl.virtio.spec import BalloonQueue, DeviceStatus

log = logging.getLogger(__name__)


class DiscardStrategy(StrEnum):
    """How inflated pages are given back to the host."""

    #: One madvise/fallocate per 4 KiB page: QEMU 7.2's balloon_inflate_page.
    PER_PAGE = "per-page"
    #: One call per merged range: Firecracker's compact_page_frame_numbers.
    PER_RANGE = "per-range"


@dataclass
class DeviceCounters:
    """What the device has done; benchmarks and the testbed read these."""

    chains: int = 0
    descriptors: int = 0
    pfn_bytes: int = 0
    pages_inflated: int = 0
    pages_deflated: int = 0
    pages_reported: int = 0
    discard_syscalls: int = 0
    discarded_bytes: int = 0
    stats_updates: int = 0
    #: The seed's device-side stages, in seconds: PFNs to checked RAM ranges ("address
    #: translation") and giving them back to the host ("madvise").
    translate_s: float = 0.0
    discard_s: float = 0.0
    #: Skipped pages (or buffers) by reason.
    rejected: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class RequestResult:
    """One chain served: the pages it moved (merged ranges) and what was skipped."""

    queue: BalloonQueue
    head: int
    ranges: RangeArray
    rejections: tuple[Rejection, ...]

    @property
    def pages(self) -> int:
        """Pages the request moved."""
        return int(self.ranges[:, 1].sum()) if len(self.ranges) else 0


@dataclass
class BalloonConfig:
    """5.5.4 Device configuration layout; every field little-endian."""

    num_pages: int = 0
    actual: int = 0
    free_page_hint_cmd_id: int = 0
    poison_val: int = 0

    def to_bytes(self) -> bytes:
        """The 16 bytes a driver reads."""
        return np.array(
            [self.num_pages, self.actual, self.free_page_hint_cmd_id, self.poison_val],
            dtype="<u4",
        ).tobytes()


class BalloonDevice:
    """A virtio-balloon device over one guest memory.

    Lifecycle as in 3.1.1: the driver reads the offered features, acks a subset
    (:meth:`set_features`, which may refuse FEATURES_OK), attaches the queues the acked
    features imply (:meth:`attach_queue`) and sets DRIVER_OK. The host moves the target
    (:meth:`set_target_pages`); kicks arrive as :meth:`process`.
    """

    def __init__(
        self,
        mem: GuestMemory,
        *,
        profile: Profile = VIRTIO_1_2,
        offered: int | None = None,
        discard: DiscardStrategy = DiscardStrategy.PER_RANGE,
        require_version_1: bool = False,
        on_config_change: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.mem = mem
        self.profile = profile
        self.offered = profile.default_offered_mask if offered is None else offered
        self.discard = discard
        self.require_version_1 = require_version_1
        self.acked = 0
        self.status = 0
        self.config = BalloonConfig()
        self.ram = RamMap(mem.page_ranges())
        #: One flag per RAM page (dense index, see RamMap): in the balloon or not.
        self.balloon = np.zeros(self.ram.total_pages, dtype=bool)
        self.balloon_pages = 0
        self.queues: dict[BalloonQueue, SplitQueue] = {}
        self.counters = DeviceCounters()
        self.stats: StatsBuffer | None = None
        self.stats_updated: float | None = None
        self._stats_head: int | None = None
        self.broken: VirtioError | None = None
        self._on_config_change = on_config_change
        self._clock = clock

    # --- negotiation ----------------------------------------------------------------------
    def set_features(self, acked: int) -> None:
        """The driver's FEATURES_OK step: accept ``acked`` or raise NegotiationError."""
        check_features_ok(
            self.profile, self.offered, acked, require_version_1=self.require_version_1
        )
        self.acked = acked
        self.status |= DeviceStatus.FEATURES_OK

    def has(self, name: str) -> bool:
        """Whether feature ``name`` was negotiated."""
        return self.profile.has(self.acked, name)

    @property
    def form(self) -> RequestForm:
        """SG once the seed's SG feature is acked (seed-sg profile only), else PFN arrays."""
        return RequestForm.SG if self.has("sg") else RequestForm.PFN

    @property
    def queue_roles(self) -> tuple[BalloonQueue, ...]:
        """The negotiated queues, by index."""
        return queue_layout(self.profile, self.acked)

    def attach_queue(self, index: int, size: int, desc: int, avail: int, used: int) -> SplitQueue:
        """The driver set queue ``index`` up at these addresses; validate and keep it."""
        roles = self.queue_roles
        if not 0 <= index < len(roles):
            raise ValueError(f"the negotiated balloon has {len(roles)} queues, not {index + 1}")
        queue = SplitQueue(
            self.mem,
            size,
            desc,
            avail,
            used,
            event_idx=self.has("ring-event-idx"),
            indirect=self.has("ring-indirect-desc"),
            notify_on_empty=self.has("notify-on-empty"),
        )
        self.queues[roles[index]] = queue
        return queue

    def driver_ok(self) -> None:
        """The driver is ready (DRIVER_OK)."""
        self.status |= DeviceStatus.DRIVER_OK

    # --- config space -------------------------------------------------------------------
    def set_target_pages(self, pages: int) -> None:
        """Ask the guest to hold ``pages`` pages in the balloon (config num_pages)."""
        self.config.num_pages = max(0, min(pages, self.ram.total_pages))
        if self._on_config_change is not None:
            self._on_config_change()

    def read_config(self, offset: int, size: int) -> bytes:
        """Bytes of config space as the driver reads them (out of range reads as zero)."""
        data = self.config.to_bytes() + bytes(max(0, offset + size - spec.CONFIG_SIZE))
        return data[offset : offset + size]

    def write_config(self, offset: int, data: bytes) -> None:
        """A driver write: only ``actual`` and, with PAGE_POISON, ``poison_val`` take it.

        As in QEMU's virtio_balloon_set_config, writes to device-owned fields are ignored.
        """
        image = bytearray(self.config.to_bytes())
        end = min(offset + len(data), spec.CONFIG_SIZE)
        if offset < end:
            image[offset:end] = data[: end - offset]
        fields = np.frombuffer(bytes(image), dtype="<u4")
        self.config.actual = int(fields[1])
        if self.has("page-poison"):
            self.config.poison_val = int(fields[3])

    # --- the queues ---------------------------------------------------------------------
    def process(
        self, role: BalloonQueue, limit: int | None = None
    ) -> tuple[list[RequestResult], bool]:
        """Serve the chains available on queue ``role`` (at most ``limit``, to model a slow
        device); return them and whether to notify the driver.

        A ring-level VirtioError breaks the device (status NEEDS_RESET, as QEMU's
        virtio_error) and is raised; a broken device serves nothing until reset.
        """
        if self.broken is not None:
            raise type(self.broken)(f"device is broken: {self.broken}")
        queue = self.queues[role]
        results: list[RequestResult] = []
        used_before = queue.next_used
        try:
            served = 0
            while (limit is None or served < limit) and (chain := queue.pop()) is not None:
                served += 1
                self.counters.chains += 1
                self.counters.descriptors += len(chain)
                if role is BalloonQueue.STATS:
                    self._take_stats(queue, chain.head, decode_stats(self.mem, chain))
                    continue
                result = self._serve(role, chain)
                queue.add_used(chain.head, 0)
                results.append(result)
        except VirtioError as exc:
            self.broken = exc
            self.status |= DeviceStatus.NEEDS_RESET
            log.warning("balloon: %s queue broken: %s", role.name.lower(), exc)
            raise
        notify = queue.next_used != used_before and queue.needs_notification()
        return results, notify

    def _serve(self, role: BalloonQueue, chain: Chain) -> RequestResult:
        if role is BalloonQueue.REPORTING:
            got = gather_report(chain)
        elif role in (BalloonQueue.INFLATE, BalloonQueue.DEFLATE):
            got = gather(self.mem, chain, self.form, queue=role.name.lower())
        else:
            raise ValueError(f"queue {role.name} is not served by this device")
        self.counters.pfn_bytes += got.pfn_bytes
        inflate = role is BalloonQueue.INFLATE
        balloon = None if role is BalloonQueue.REPORTING else self.balloon
        t0 = time.perf_counter()
        done = got.classify(self.ram, balloon, inflate=inflate)
        self.counters.translate_s += time.perf_counter() - t0
        rejections = done.rejections
        self.counters.rejected.update(rejection_pages(rejections))
        if role is BalloonQueue.DEFLATE:
            self._mark(done.ranges, False)
            self.counters.pages_deflated += done.pages
        elif inflate:
            self._mark(done.ranges, True)
            self.counters.pages_inflated += done.pages
            self._discard(done.ranges)
        else:
            self.counters.pages_reported += done.pages
            # 5.5.6.7.2: with PAGE_POISON the device MUST NOT change a reported page to
            # anything but poison_val, and a discard reads back as zeroes. QEMU skips the
            # discard when poison_val is not 0; so does this device.
            if not (self.has("page-poison") and self.config.poison_val):
                self._discard(done.ranges)
        return RequestResult(role, chain.head, done.ranges, rejections)

    def _mark(self, ranges: RangeArray, value: bool) -> None:
        # A merged range lies in one RAM range (RamMap joins adjacent ones), so its pages
        # are consecutive in the dense index too: one slice per range.
        _, starts = self.ram.locate(ranges[:, 0])
        for start, count in zip(starts.tolist(), ranges[:, 1].tolist(), strict=True):
            self.balloon[start : start + count] = value
            self.balloon_pages += count if value else -count

    def _discard(self, ranges: RangeArray) -> None:
        """Give accepted pages back to the host; every one was checked to be RAM."""
        counters = self.counters
        t0 = time.perf_counter()
        if self.discard is DiscardStrategy.PER_RANGE:
            for first, count in ranges.tolist():
                result = self.mem.discard(first << PAGE_SHIFT, count << PAGE_SHIFT)
                counters.discard_syscalls += result.syscalls
                counters.discarded_bytes += result.length
        else:
            page = 1 << PAGE_SHIFT
            discard = self.mem.discard
            for first, count in ranges.tolist():
                for pfn in range(first, first + count):
                    counters.discard_syscalls += discard(pfn << PAGE_SHIFT, page).syscalls
                counters.discarded_bytes += count * page
        counters.discard_s += time.perf_counter() - t0

    def _take_stats(self, queue: SplitQueue, head: int, stats: StatsBuffer) -> None:
        # 5.5.6.3: the device keeps the buffer until it wants fresh stats, then returns it
        # (request_stats) and the driver refills it.
        if self._stats_head is not None:
            queue.add_used(self._stats_head, 0)
        self._stats_head = head
        self.stats = stats
        self.stats_updated = self._clock()
        self.counters.stats_updates += 1
        self.counters.rejected.update(rejection_pages(stats.rejections))

    def request_stats(self) -> bool:
        """Hand the held stats buffer back so the driver refills it; True to notify."""
        queue = self.queues.get(BalloonQueue.STATS)
        if queue is None or self._stats_head is None:
            return False
        queue.add_used(self._stats_head, 0)
        self._stats_head = None
        return queue.needs_notification()
