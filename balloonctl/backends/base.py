"""What the CLI and the daemon need from a VM, whatever reaches it (QMP or libvirt).

A backend is an asyncio object bound to one VM. It speaks in bytes and in balloonctl's
names (QEMU's stat names without ``stat-``, feature names with hyphens; docs/contracts.md) so that
nothing above it knows which library is underneath. Every failure is a
:class:`~balloonctl.errors.BalloonError`: ``VmUnreachable``/``ConnectionLost`` when the VM
cannot be talked to, ``CommandFailed`` when it refuses, ``PeerError`` when it answers
nonsense. Backends import only ``errors``, ``units`` and their own library (docs/architecture.md),
plus ``virtio.features`` for decoding feature words and ``virtio.spec`` for the stat
names, pure tables without I/O.
"""

from __future__ import annotations

from collections.abc import Collection
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class GuestStats:
    """One reading of the guest's statistics.

    ``stats`` maps balloonctl's names (``free-memory``, ``available-memory``, ``total-memory``,
    ``disk-caches``, ``swap-in``, ... ``oom-kills``, ``direct-reclaims``) to bytes or counts
    (``virtio.spec.BYTE_STATS`` says which); statistics the guest or the hypervisor does not
    report are absent, never -1 or a made-up 0. ``last_update`` is the guest's timestamp of
    the reading (Unix seconds), 0 if it never reported.

    ``unavailable`` names statistics the backend knows it could not read, with why (libvirt
    without QMP passthrough cannot see tags 10-15); empty when nothing is missing for a
    reason worth telling (a QEMU or a guest that simply has no such statistic).
    """

    last_update: int
    stats: dict[str, int] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class FeatureState:
    """The balloon's feature bits as the device offers them and the driver acked them.

    ``profile`` is ``virtio-1.2`` or ``seed-sg`` (how bit 3 reads: docs/protocol.md). ``offered``
    and ``acked`` are feature names in bit order (device bits first, then transport bits);
    ``unknown_offered``/``unknown_acked`` are bits balloonctl has no name for.
    ``driver_ok`` says whether a driver is running (acked is empty before it is).
    """

    profile: str
    offered: tuple[str, ...]
    acked: tuple[str, ...]
    driver_ok: bool
    unknown_offered: int = 0
    unknown_acked: int = 0
    #: QOM path of the virtio backend, e.g. /machine/peripheral/balloon0/virtio-backend.
    device_path: str = ""
    #: Queues the device has now (``num-vqs``); 0 when the backend did not say.
    queues: int = 0


@dataclass(frozen=True)
class QueueStatus:
    """``x-query-virtio-queue-status``: where the rings are and how far the device got."""

    index: int
    size: int
    desc: int
    avail: int
    used: int
    last_avail_idx: int
    used_idx: int

    @property
    def in_flight(self) -> int:
        """Chains popped by the device and not yet returned (QEMU's ``inuse``)."""
        return (self.last_avail_idx - self.used_idx) & 0xFFFF


@dataclass(frozen=True, slots=True)
class GuestRam:
    """What the VM says of its RAM: the bounds ``vring dump`` checks rings and buffers by.

    A backend reports facts and computes nothing: where a PC machine's RAM goes when its
    host bridge does not say is the dump's business (``cli/vring_commands.py``).
    """

    #: Bytes of boot RAM (``base-memory``); hot-plugged DIMMs are not included.
    size: int
    #: ``/machine``'s type when it is a PC machine (``pc-q35-*``, ``pc-i440fx-*``), else None.
    machine: str | None = None
    #: ``q35`` or ``i440fx`` on a PC machine, else None.
    chipset: str | None = None
    #: The PC host bridge's QOM path, asked for the split (``/machine/q35``); "" if none.
    host_bridge: str = ""
    #: ``(below_4g, above_4g)`` bytes as the host bridge reports them, when they add up to
    #: ``size``; None when the split must be computed.
    host_split: tuple[int, int] | None = None
    #: ``/machine``'s ``max-ram-below-4g`` when the split must be computed (0: the default).
    max_ram_below_4g: int = 0


class ActualWatch(Protocol):
    """What :meth:`Backend.watch_actual` yields: the guest's size from each BALLOON_CHANGE.

    Read either one value at a time as they come (``async for``), or at the consumer's own
    pace with :meth:`latest`: a daemon that looks once a tick needs no task waking up for
    every event of every VM.
    """

    def __aiter__(self) -> ActualWatch: ...

    async def __anext__(self) -> int:
        """The next value; :class:`~balloonctl.errors.ConnectionLost` once the connection is
        gone (values of the gap are lost: re-read :meth:`Backend.actual`)."""

    def latest(self) -> int | None:
        """The newest unread value, dropping the older unread ones; None if none came.

        Never waits. :class:`~balloonctl.errors.ConnectionLost` if the connection is gone
        (values may have been missed: re-read :meth:`Backend.actual`);
        :class:`~balloonctl.errors.PeerError` if the newest event is malformed.
        """


class Backend(Protocol):
    """One VM's balloon. Use as ``async with backend:`` (connects, then closes).

    There is no raw QMP here: what only QEMU's monitor can say is a typed question
    (:meth:`virtio_queue_status`, :meth:`guest_ram`) whose command names and reply shapes
    live in :mod:`~balloonctl.backends.qmpvocab` alone, whichever carrier sends them.
    """

    #: The VM as the user named it (socket address, domain name).
    name: str

    async def __aenter__(self) -> Backend: ...

    async def __aexit__(self, *exc: object) -> None: ...

    async def actual(self) -> int:
        """Guest memory now, in bytes (RAM minus the balloon): ``query-balloon``."""

    async def max_memory(self) -> int:
        """The VM's RAM in bytes: the largest target that means anything."""

    async def set_target(self, target: int) -> None:
        """Ask for ``target`` bytes of guest memory. Returns at once; never retried."""

    async def stats(self) -> GuestStats:
        """The guest's latest statistics (turn polling on first: ``set_stats_period``)."""

    async def stats_period(self) -> int:
        """The stats polling interval in seconds; 0 means off."""

    async def set_stats_period(self, seconds: int) -> None:
        """Set the polling interval (0 turns polling off)."""

    async def features(self) -> FeatureState:
        """Offered and acked feature bits of the balloon."""

    async def renegotiate(self, enable: Collection[str], disable: Collection[str]) -> FeatureState:
        """Replug the balloon offering ``enable`` and not ``disable`` (feature names as in
        :class:`FeatureState`: ``deflate-on-oom``, ``page-reporting``, ``sg``, ...; the
        backend maps them to device properties); the guest re-probes.
        Refuses (``CommandFailed``) before touching the VM when the balloon's bus cannot
        hotplug. Returns the features after the guest's driver is back."""

    def watch_actual(self) -> AbstractAsyncContextManager[ActualWatch]:
        """``BALLOON_CHANGE`` events' ``actual`` values, from now on, while the context lasts.

        Bounded: a consumer that falls behind loses old values, never memory.
        """

    async def virtio_queue_status(self, path: str, index: int) -> QueueStatus:
        """Where queue ``index`` of the virtio device at QOM ``path`` is, and how far the
        device got: QEMU's own state, for ``vring dump``. Shape checked, values not (the
        ring parser judges them)."""

    async def guest_ram(self) -> GuestRam:
        """What the VM says of its RAM: its size, and on a PC machine how it is split
        around the 32-bit PCI hole."""

    async def read_guest_memory(self, gpa: int, size: int) -> bytes:
        """``size`` bytes of guest-physical memory from ``gpa`` (``size`` <= MAX_READ).

        QMP: ``pmemsave`` into a private file that QEMU writes and this process reads, so
        QEMU must run on this machine. libvirt: ``virDomainMemoryPeek`` with
        ``VIR_MEMORY_PHYSICAL``, which works on remote connections as well.
        """


#: The most one read_guest_memory call returns: a vring dump reads at most a descriptor
#: table of 32768 entries (512 KiB) or one buffer at a time.
MAX_READ = 1 << 20
