"""One plugged virtio-balloon: the device, the guest's driver bound to it, and real time.

The device side (:class:`BalloonDevice`) and the guest driver model (:class:`BalloonDriver`)
are the same code the tests and benchmarks use; this module adds what a running VM has and
a testbed does not: Linux's ``update_balloon_size_func`` as an asyncio task that moves the
balloon at a bounded rate (QEMU under TCG inflates about 1 GiB/s, docs/real-qemu.md), retries
every 200 ms when the guest has no pages to give ("Out of puff!"), the stats timer of
``guest-stats-polling-interval``, and the driver's removal on hot-unplug.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

import numpy as np

from balloonctl.guest.allocator import PageState
from balloonctl.guest.driver import (
    DRIVER_FEATURES,
    TRANSPORT_FEATURES,
    BalloonDriver,
    MemInfo,
    VmEvents,
)
from balloonctl.sim.guest import SimGuest
from balloonctl.units import PAGE_SHIFT
from balloonctl.virtio.balloon import BalloonDevice
from balloonctl.virtio.features import Profile
from balloonctl.virtio.layout import RingLayout
from balloonctl.virtio.spec import BalloonQueue

log = logging.getLogger(__name__)

#: How often the driver's work item runs while the balloon moves.
STEP_S: Final = 0.02
#: fill_balloon's msleep(200) after a failed allocation.
OUT_OF_PUFF_S: Final = 0.2

#: Device properties (QEMU's names) -> (feature name, default), per profile. QEMU's
#: virtio-balloon offers STATS_VQ always, PAGE_POISON by default, and the transport bits,
#: RING_RESET (bit 40, ``queue_reset``, DEFINE_VIRTIO_COMMON_FEATURES) among them in 7.2 and
#: 10.0 alike (qemu-*/introspect.json); the seed's device (2017) offers SG by default instead
#: of bits 4 and 5, which it does not know, and predates RING_RESET.
_COMMON_PROPS: Final = {
    "deflate-on-oom": ("deflate-on-oom", False),
    "indirect_desc": ("ring-indirect-desc", True),
    "event_idx": ("ring-event-idx", True),
    "notify_on_empty": ("notify-on-empty", True),
    "any_layout": ("any-layout", True),
}
PROPERTIES: Final[Mapping[str, Mapping[str, tuple[str, bool]]]] = {
    "virtio-1.2": {
        **_COMMON_PROPS,
        "free-page-reporting": ("page-reporting", False),
        "free-page-hint": ("free-page-hint", False),
        "page-poison": ("page-poison", True),
        "queue_reset": ("ring-reset", True),
    },
    "seed-sg": {**_COMMON_PROPS, "sg": ("sg", True)},
}
#: What the guest's driver acks, by profile: the seed's driver table, plus free page
#: reporting on a virtio 1.2 guest (Linux 6.1 acks it; the model does not send reports).
#: A Linux 6.1 guest on QEMU 7.2 and a 6.12 guest on QEMU 10.0 ack EVENT_IDX, VERSION_1 and
#: RING_RESET but not INDIRECT_DESC (fixtures/transcripts/qemu-*/introspect.json); the
#: virtio-1.2 sim's guest does the same (it never resets a queue).
_GUEST_FEATURES: Final = {
    "virtio-1.2": (
        *DRIVER_FEATURES["virtio-1.2"],
        "page-reporting",
        "ring-event-idx",
        "version-1",
        "ring-reset",
    ),
    "seed-sg": (*DRIVER_FEATURES["seed-sg"], *TRANSPORT_FEATURES),
}


def offered_features(profile: Profile, props: Mapping[str, bool]) -> int:
    """The device feature word that properties ``props`` make QEMU offer."""
    names = ["stats-vq", "version-1"]
    for prop, (feature, default) in PROPERTIES[profile.name].items():
        if props.get(prop, default):
            names.append(feature)
    return profile.encode(names)


@dataclass
class _Transport:
    """The driver's virtio-pci registers: a kick runs the device at once (QEMU's main loop
    serves the balloon's queues in the vCPU's notify), interrupts go straight back."""

    balloon: SimBalloon

    def device_features(self) -> int:
        return self.balloon.device.offered

    def set_features(self, acked: int) -> None:
        self.balloon.device.set_features(acked)

    def setup_queue(self, index: int, layout: RingLayout) -> None:
        self.balloon.device.attach_queue(index, layout.size, layout.desc, layout.avail, layout.used)

    def notify(self, index: int) -> None:
        device = self.balloon.device
        role = device.queue_roles[index]
        _, interrupt = device.process(role)
        if interrupt and self.balloon.driver is not None:
            self.balloon.driver.interrupt(role)

    def wait(self, index: int) -> None:
        """Synchronous device: nothing is pending when the driver waits."""

    def read_config(self, offset: int, size: int) -> bytes:
        return self.balloon.device.read_config(offset, size)

    def write_config(self, offset: int, data: bytes) -> None:
        before = self.balloon.device.config.actual
        self.balloon.device.write_config(offset, data)
        if self.balloon.device.config.actual != before:
            self.balloon.on_actual_change()

    def driver_ok(self) -> None:
        self.balloon.device.driver_ok()


class _SimDriver(BalloonDriver):
    """The guest model's driver, reporting the simulated guest's meminfo and vm events.

    Its stats are Linux 6.12's (tags 10-15 included): whether they reach a QMP client is the
    simulated QEMU's business (QemuProfile.extended_stats), as a QEMU before 9.2 drops tags
    it does not know. Its rings are as large as the device's queues (``queue_sizes``).
    """

    def __init__(
        self,
        guest: SimGuest,
        transport: _Transport,
        profile: Profile,
        queue_sizes: Mapping[BalloonQueue, int],
    ) -> None:
        super().__init__(
            guest.mem,
            guest.allocator,
            transport,
            profile=profile,
            queue_sizes=queue_sizes,
            features=_GUEST_FEATURES[profile.name],
        )
        self.guest = guest

    def vm_events(self) -> VmEvents:
        """The simulated guest's own counters (faults, reclaim, OOM kills)."""
        return self.guest.events

    def meminfo(self) -> MemInfo:
        """The simulated guest's meminfo (MemTotal less the balloon without deflate-on-OOM)."""
        info = self.guest.meminfo(self.balloon.pages, not self.has("deflate-on-oom"))
        return MemInfo(
            free=info["free"],
            total=info["total"],
            available=info["available"],
            caches=info["cache"],
        )


class SimBalloon:
    """A virtio-balloon-pci device with ``id`` on ``bus``, and the guest driver bound to it."""

    def __init__(
        self,
        guest: SimGuest,
        profile: Profile,
        *,
        dev_id: str,
        bus: str,
        props: Mapping[str, bool],
        rate: int,
        on_actual: Callable[[int], None],
        queue_sizes: Mapping[BalloonQueue, int],
    ) -> None:
        self.guest = guest
        self.profile = profile
        #: Each queue's size as the device offers it (vring-num-default), by role.
        self.queue_sizes = queue_sizes
        self.dev_id = dev_id
        self.bus = bus
        self.props = dict(props)
        self.rate = rate
        self._on_actual = on_actual
        self.poll_interval = 0
        self.unplugging = False
        #: Plugged with device_add (QEMU's "hotplugged" property), not at boot.
        self.hotplugged = False
        self.device = BalloonDevice(
            guest.mem,
            profile=profile,
            offered=offered_features(profile, props),
            on_config_change=self._config_changed,
            clock=time.time,
        )
        self.driver: _SimDriver | None = None
        self._kernel_before: np.ndarray | None = None
        self._work = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._stats_task: asyncio.Task[None] | None = None

    # --- life cycle -------------------------------------------------------------------------
    def start(self, probe_delay: float) -> None:
        """The guest finds the device after ``probe_delay`` s and binds its driver."""
        self._tasks.append(asyncio.create_task(self._probe_later(probe_delay)))

    async def _probe_later(self, delay: float) -> None:
        await asyncio.sleep(delay)
        self.probe()

    def probe(self) -> None:
        """virtballoon_probe: negotiate, rings in guest kernel memory, DRIVER_OK."""
        self._kernel_before = self.guest.allocator.state == PageState.KERNEL
        driver = _SimDriver(self.guest, _Transport(self), self.profile, self.queue_sizes)
        self.driver = driver
        driver.probe()
        if driver.has("deflate-on-oom"):
            self.guest.oom_notifier = self._oom
        self._tasks.append(asyncio.create_task(self._worker()))
        self._work.set()  # a target set before the driver came is acted on now

    def remove_driver(self) -> None:
        """virtballoon_remove (hot-unplug): give every balloon page back, telling the host,
        then free the rings; the device is gone after this."""
        for task in self._tasks:
            task.cancel()
        self.set_poll_interval(0)
        driver = self.driver
        if driver is None:
            return
        self.guest.oom_notifier = None
        while driver.balloon.pages and driver.leak_balloon(driver.balloon.pages):
            pass
        driver.update_balloon_size()
        if self._kernel_before is not None:
            rings = np.flatnonzero(
                (self.guest.allocator.state == PageState.KERNEL) & ~self._kernel_before
            )
            self.guest.allocator.release(self.guest.allocator.to_pfns(rings), PageState.KERNEL)
        self.driver = None

    def close(self) -> None:
        """Stop the tasks (the VM is going away with its RAM)."""
        for task in self._tasks:
            task.cancel()
        if self._stats_task is not None:
            self._stats_task.cancel()

    # --- host side ----------------------------------------------------------------------------
    @property
    def actual_pages(self) -> int:
        """Balloon size as the driver last reported it (config ``actual``)."""
        return self.device.config.actual

    def set_target_pages(self, pages: int) -> None:
        """QMP ``balloon``: write num_pages and raise the config interrupt."""
        self.device.set_target_pages(pages)

    def _config_changed(self) -> None:
        # virtballoon_changed -> queue_work(update_balloon_size_work)
        self._work.set()

    def on_actual_change(self) -> None:
        """The driver wrote a new ``actual``: QEMU's virtio_balloon_set_config."""
        self._on_actual(self.device.config.actual)

    def set_poll_interval(self, seconds: int) -> None:
        """guest-stats-polling-interval: 0 stops the timer."""
        self.poll_interval = seconds
        if self._stats_task is not None:
            self._stats_task.cancel()
            self._stats_task = None
        if seconds > 0:
            self._stats_task = asyncio.create_task(self._stats_timer(seconds))

    async def _stats_timer(self, seconds: int) -> None:
        # balloon_stats_poll_cb: hand the held buffer back; the guest refills it at once.
        while True:
            await asyncio.sleep(seconds)
            driver = self.driver
            if driver is not None and self.device.request_stats():
                driver.interrupt(BalloonQueue.STATS)

    # --- the guest's work item ------------------------------------------------------------------
    def _oom(self) -> int:
        driver = self.driver
        if driver is None:
            return 0
        got = driver.oom_notify()
        log.debug("deflate-on-OOM gave back %d pages", got)
        return got

    async def _worker(self) -> None:
        """update_balloon_size_func, paced: at most ``rate`` bytes a second either way."""
        budget_pages = max(1, (self.rate * STEP_S) // (1 << PAGE_SHIFT))
        while True:
            await self._work.wait()
            self._work.clear()
            while (driver := self.driver) is not None and (diff := driver.towards_target()):
                want = min(abs(diff), int(budget_pages))
                moved = self._fill(driver, want) if diff > 0 else self._leak(driver, want)
                if moved == 0:
                    # "Out of puff! Can't get %u pages": Linux sleeps and tries again, for
                    # as long as the target stays out of reach.
                    await asyncio.sleep(OUT_OF_PUFF_S)
                else:
                    await asyncio.sleep(STEP_S)

    def _fill(self, driver: BalloonDriver, want: int) -> int:
        moved = 0
        while moved < want:
            got = driver.fill_balloon(want - moved)
            if got == 0:
                # The balloon's allocation reclaims page cache itself (balloon_page_alloc's
                # __GFP_NORETRY still runs direct reclaim once): an alloc stall each time.
                if self.guest.direct_reclaim(want - moved) == 0:
                    break
                continue
            moved += got
        if moved:
            driver.update_balloon_size()
            self.guest.wake_kswapd()  # the pages it took may leave free memory below low
        return moved

    def _leak(self, driver: BalloonDriver, want: int) -> int:
        moved = 0
        while moved < want:
            got = driver.leak_balloon(want - moved)
            if got == 0:
                break
            moved += got
        if moved:
            driver.update_balloon_size()
        return moved

    # --- what QMP shows -------------------------------------------------------------------------
    def stats(self) -> tuple[int, dict[int, int]]:
        """(last-update in Unix seconds, values by tag) as the device holds them."""
        updated = self.device.stats_updated
        values = dict(self.device.stats.values) if self.device.stats is not None else {}
        return (int(updated) if updated else 0, values)
