"""One guest model wired to one device through one guest memory: the hermetic testbed.

The transport is synchronous: a kick runs the device on that queue at once, and a used-buffer
notification calls the driver's interrupt handler, so every scenario is deterministic. The
invariants can be checked at any moment between steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from balloonctl.errors import InvariantError
from balloonctl.guest.allocator import GuestAllocator, PageState
from balloonctl.guest.driver import BalloonDriver
from balloonctl.units import PAGE_SHIFT
from balloonctl.virtio.balloon import BalloonDevice, DiscardStrategy
from balloonctl.virtio.features import Profile, get_profile
from balloonctl.virtio.layout import RingLayout
from balloonctl.virtio.memory import Backing, GuestMemory
from balloonctl.virtio.spec import BalloonQueue


@dataclass(frozen=True)
class TestbedConfig:
    """A guest to build."""

    __test__ = False  # not a pytest class, whatever its name

    memory: int = 64 << 20
    profile: str = "seed-sg"
    backing: Backing = Backing.BYTES
    discard: DiscardStrategy = DiscardStrategy.PER_RANGE
    queue_size: int = 128
    used: int = 8 << 20
    fragment_pages: int = 0
    indirect_entries: int = 16
    sg_indirect: bool = False
    seed: int = 0
    #: Driver features to offer to ack (None: all the seed's driver knows).
    features: tuple[str, ...] | None = None
    #: An asynchronous device: a kick only queues work, and the device serves one chain
    #: each time the driver waits (QEMU's iothread, slowed down to show ordering bugs).
    deferred: bool = False


class _Transport:
    """The driver's view of the device: synchronous, or deferred (see TestbedConfig)."""

    def __init__(self, bed: Testbed) -> None:
        self.bed = bed

    def device_features(self) -> int:
        return self.bed.device.offered

    def set_features(self, acked: int) -> None:
        self.bed.device.set_features(acked)

    def setup_queue(self, index: int, layout: RingLayout) -> None:
        self.bed.device.attach_queue(index, layout.size, layout.desc, layout.avail, layout.used)

    def notify(self, index: int) -> None:
        self.bed.kicks += 1
        if not self.bed.config.deferred:
            self._run(index, None)

    def wait(self, index: int) -> None:
        # Synchronous: the device ran inside notify() and nothing is pending.
        if self.bed.config.deferred:
            self._run(index, 1)

    def _run(self, index: int, limit: int | None) -> None:
        device = self.bed.device
        role = device.queue_roles[index]
        _, interrupt = device.process(role, limit)
        if interrupt:
            self.bed.interrupts += 1
            self.bed.driver.interrupt(role)

    def read_config(self, offset: int, size: int) -> bytes:
        return self.bed.device.read_config(offset, size)

    def write_config(self, offset: int, data: bytes) -> None:
        self.bed.device.write_config(offset, data)

    def driver_ok(self) -> None:
        self.bed.device.driver_ok()


class Testbed:
    """Guest memory, the device, the guest's allocator and driver, probed and ready."""

    __test__ = False

    def __init__(self, config: TestbedConfig | None = None, mem: GuestMemory | None = None) -> None:
        """``mem``: guest memory made beforehand (a benchmark makes it resident first); the
        testbed then uses it and does not close it."""
        self.config = config or TestbedConfig()
        cfg = self.config
        self.profile: Profile = get_profile(cfg.profile)
        self._owns_mem = mem is None
        self.mem = mem if mem is not None else GuestMemory.simple(cfg.memory, cfg.backing)
        self.kicks = 0
        self.interrupts = 0
        self.device = BalloonDevice(
            self.mem,
            profile=self.profile,
            discard=cfg.discard,
            on_config_change=self._config_changed,
        )
        self.allocator = GuestAllocator(
            self.mem.page_ranges(),
            used_pages=cfg.used >> PAGE_SHIFT,
            fragment_pages=cfg.fragment_pages,
            seed=cfg.seed,
        )
        self.driver = BalloonDriver(
            self.mem,
            self.allocator,
            _Transport(self),
            profile=self.profile,
            queue_size=cfg.queue_size,
            indirect_entries=cfg.indirect_entries,
            sg_indirect=cfg.sg_indirect,
            features=cfg.features,
        )
        self._auto = True
        self.driver.probe()

    def close(self) -> None:
        """Release guest memory (if the testbed made it)."""
        if self._owns_mem:
            self.mem.close()

    def __enter__(self) -> Testbed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _config_changed(self) -> None:
        # virtballoon_changed -> update_balloon_size_func, run at once in the testbed.
        if self._auto and self.driver.queues:
            self.driver.balloon_work()

    # --- what a host and a guest workload do ------------------------------------------------
    def set_target(self, balloon_pages: int) -> None:
        """The host asks for a balloon of ``balloon_pages`` (QMP ``balloon`` sets guest size;
        config space holds the balloon size)."""
        self.device.set_target_pages(balloon_pages)

    def guest_use(self, pages: int) -> int:
        """The guest's workload allocates ``pages``; under pressure the OOM notifier may
        deflate (DEFLATE_ON_OOM). Returns the pages it got."""
        got = self.allocator.allocate(pages, PageState.USED).size
        while got < pages and self.driver.oom_notify() > 0:
            got += self.allocator.allocate(pages - got, PageState.USED).size
        return got

    def guest_free(self, pages: int) -> int:
        """The workload frees up to ``pages`` of what it took (highest first); kernel memory
        (boot, rings, driver buffers) is never freed."""
        used = self.allocator.pages_in(PageState.USED)
        victims = used[max(0, used.size - pages) :]
        self.allocator.release(victims, PageState.USED)
        return int(victims.size)

    def request_stats(self) -> None:
        """The host's stats timer: hand the buffer back; the driver refills it."""
        if self.device.request_stats():
            self.interrupts += 1
            self.driver.interrupt(BalloonQueue.STATS)

    # --- invariants ---------------------------------------------------------------------------
    def check(self) -> None:
        """Raise InvariantError unless guest and device agree about every page."""
        guest = self.allocator.state == PageState.BALLOON
        if not np.array_equal(guest, self.device.balloon):
            diff = np.flatnonzero(guest != self.device.balloon)
            raise InvariantError(
                f"{diff.size} pages differ between the guest's and the device's balloon "
                f"(first dense index {int(diff[0])})"
            )
        if self.driver.balloon.pages != int(np.count_nonzero(guest)):
            raise InvariantError(
                f"the driver counts {self.driver.balloon.pages} balloon pages, its allocator "
                f"{int(np.count_nonzero(guest))}"
            )
        if self.device.config.actual != self.driver.balloon.pages:
            raise InvariantError(
                f"config actual {self.device.config.actual} != balloon size "
                f"{self.driver.balloon.pages}"
            )
        if self.device.balloon_pages != self.driver.balloon.pages:
            raise InvariantError(
                f"device holds {self.device.balloon_pages}, guest {self.driver.balloon.pages}"
            )
