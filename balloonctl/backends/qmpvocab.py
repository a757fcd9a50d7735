"""QMP's balloon vocabulary: which commands to send and how to read the replies.

Shared by the two backends that can reach QEMU's monitor: :class:`~.qmp.QmpBackend` (its own
QMP socket, through ``qemu.qmp``) and :class:`~.libvirt.LibvirtBackend` (libvirt's
``qemuMonitorCommand`` passthrough). Why a separate module: features, live renegotiation
and balloon discovery are the same QMP conversation whoever carries it, and two copies
would drift (the hotplug pre-check, the put-back after a refused device_add). This module
therefore knows nothing of a transport: :class:`QmpVocabulary` is a mixin whose
subclasses supply ``_execute`` (one command, every failure already a
:class:`~balloonctl.errors.BalloonError`) and ``_removal_waiter`` (how to learn that the
guest let the balloon go: a DEVICE_DELETED event on a QMP socket, polling the QOM tree under
libvirt, which consumes the events itself).

Backends import only ``errors``, ``units`` and their own library (docs/architecture.md). The one
exception here, ``balloonctl.virtio.features``, is pure tables and string decoding (it
imports ``errors`` and ``virtio.spec``, no I/O, no numpy): the bit names and profiles must
have one source of truth, shared with the device side, so they are imported, not copied.

QMP shapes are QEMU 7.2's (``qapi/*.json``; recorded in ``fixtures/transcripts/qemu-7.2``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Final

from balloonctl.backends.base import FeatureState, GuestRam, GuestStats, QueueStatus
from balloonctl.errors import (
    BadStatistics,
    BalloonError,
    CommandFailed,
    OperationTimeout,
    PeerError,
    UsageError,
)
from balloonctl.virtio.features import get_profile, parse_qemu_features
from balloonctl.virtio.spec import EXTENDED_STAT_NAMES

_LOG = logging.getLogger(__name__)

#: Commands that only read state: resending one after a drop cannot change the VM.
_QUERIES: Final = frozenset(
    {
        "query-balloon",
        "query-memory-size-summary",
        "query-migrate",
        "query-status",
        "query-version",
        "qom-get",
        "qom-list",
        "qom-list-properties",
        "device-list-properties",
    }
)
#: Commands that act. After a drop nobody knows whether QEMU ran them, so they are sent once.
_NEVER_RETRIED: Final = frozenset({"balloon", "qom-set", "device_add", "device_del"})

#: Where QEMU puts ``-device ...,id=X``: /machine/peripheral/X (hw/core/qdev.c,

#: qdev_set_id); devices without an id go under /machine/peripheral-anon.
_PERIPHERAL: Final = "/machine/peripheral/"
#: Where the balloon is when ``x-query-virtio`` (QEMU >= 7.2) cannot tell us.
DEFAULT_BALLOON_PATH: Final = "/machine/peripheral/balloon0"
#: A virtio-pci/ccw proxy's VirtIODevice child (hw/virtio/virtio-pci.c,
#: virtio_instance_init_common): the path x-query-virtio-status wants.
_BACKEND_CHILD: Final = "virtio-backend"

#: balloonctl feature names -> the balloon device property that offers the bit
#: (hw/virtio/virtio-balloon.c virtio_balloon_properties, DEFINE_VIRTIO_COMMON_FEATURES in
#: hw/virtio/virtio.c; ``sg`` is the simulated seed-sg device's). A proxy such as
#: virtio-balloon-pci aliases all of them (qdev_alias_all_properties).
FEATURE_PROPERTIES: Final[Mapping[str, str]] = {
    "deflate-on-oom": "deflate-on-oom",
    "page-reporting": "free-page-reporting",
    "free-page-hint": "free-page-hint",
    "page-poison": "page-poison",
    "sg": "sg",
    "ring-indirect-desc": "indirect_desc",
    "ring-event-idx": "event_idx",
}

#: Properties device-list-properties lists that must not be passed back to device_add:
#: runtime state, not configuration. The polling interval is restored with qom-set after the
#: driver is back (setting it before realize would start QEMU's timer on a device with no
#: stats queue yet).
NOT_CARRIED: Final = frozenset(
    {
        "guest-stats",
        "guest-stats-polling-interval",
        "type",
        "realized",
        "hotpluggable",
        "hotplugged",
        "parent_bus",
        "id",
        "driver",
        "bus",
    }
)

#: x-query-virtio's refusal on a VM without any virtio device (QEMU 10, recorded in
#: fixtures/transcripts/qemu-10.0, hw/virtio/virtio-qmp.c qmp_x_query_virtio); 7.2 lists none.
_NO_VIRTIO_DEVICES: Final = "No virtio devices found"

#: device_add's refusal of a property that has a getter but no setter (qom/object.c
#: object_property_set: "Property '%s.%s' is not writable"). device-list-properties lists such
#: properties without saying they are read-only: QEMU 10 lists ``busnr`` (the PCI bus number,
#: hw/pci/pci.c, a getter only) for every PCI device, and reads it back as 1 on a root port.
_NOT_WRITABLE: Final = re.compile(r"Property '[^']*\.([^'.]+)' is not writable")

#: virtio spec 2.1 device status bit 4, as QEMU names it in x-query-virtio-status
#: (hw/virtio/virtio-qmp.c virtio_config_status_map): "MACRO: description" in 7.2.
_DRIVER_OK: Final = "VIRTIO_CONFIG_S_DRIVER_OK"
_DRIVER_OK_DESCRIPTION: Final = "Driver setup and ready"

#: QEMU's PC machines by the prefix of ``/machine``'s type, with their chipset and the QOM
#: path of the host bridge that says how RAM was split around the 32-bit PCI hole
#: (``below-4g-mem-size``/``above-4g-mem-size``, include/hw/i386/pc.h).
_PC_MACHINES: Final = (
    ("pc-q35-", "q35", "/machine/q35"),
    ("pc-i440fx-", "i440fx", "/machine/i440fx"),
)

#: Values QEMU shows for a statistic the guest never reported. QEMU keeps -1 in a uint64
#: (virtio-balloon.c reset_stats) and visits it as uint64, so the wire may carry either form.
_UNSUPPORTED_STAT: Final = frozenset({-1, (1 << 64) - 1})


def is_idempotent(command: str) -> bool:
    """Whether ``command`` may be resent after a drop: queries yes, actions never."""
    if command in _NEVER_RETRIED:
        return False
    return command in _QUERIES or command.startswith("x-query-")


def _one_line(text: str, limit: int = 300) -> str:
    """A message squeezed onto one line (QEMU's and the library's may hold newlines)."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _same(a: object, b: object) -> bool:
    """Equality that does not take JSON ``true`` for ``1``."""
    return type(a) is type(b) and a == b


def _as_object(reply: object, what: str) -> Mapping[str, object]:
    if not isinstance(reply, dict):
        raise PeerError(f"{what}: expected a JSON object, got {type(reply).__name__}")
    return reply


def _int_member(obj: Mapping[str, object], key: str, what: str, *, minimum: int = 0) -> int:
    value = obj.get(key)
    if not _is_int(value):
        raise PeerError(f"{what}: {key!r} is not an integer")
    assert isinstance(value, int)
    if value < minimum:
        raise PeerError(f"{what}: {key!r} is {value}, below {minimum}")
    return value


def refusal(vm: str, command: str, error_class: str, desc: str) -> CommandFailed:
    """QMP's error reply as a :class:`CommandFailed` keeping its class (qapi/error.json),
    worded the same whichever carrier brought it (``desc`` already on one line)."""
    if error_class == "DeviceNotActive":
        # qmp_balloon/qmp_query_balloon: "No balloon device has been activated".
        message = f"VM {vm} has no balloon device (QEMU: {desc})"
    elif error_class == "CommandNotFound":
        message = f"VM {vm} does not know the QMP command {command} (QEMU: {desc})"
    else:
        message = f"VM {vm} refused {command}: {desc}"
    return CommandFailed(message, error_class=error_class)


# --------------------------------------------------------------------------------------------
# Pure decoders (tested on recorded QEMU replies)
# --------------------------------------------------------------------------------------------


def decode_guest_stats(reply: object) -> GuestStats:
    """``qom-get guest-stats`` -> :class:`GuestStats`.

    QEMU answers ``{"stats": {"stat-free-memory": N, ...}, "last-update": EPOCH_S}``
    (hw/virtio/virtio-balloon.c balloon_stats_get_all). Names lose ``stat-`` (docs/contracts.md),
    statistics the guest does not report (-1) are dropped, and a value that is not a
    non-negative integer is a :class:`BadStatistics` (a :class:`PeerError`): a daemon must
    not act on a guessed number, and holds the VM instead (the VM itself answered).

    Every name QEMU gives is kept, so tags 10-15 (``stat-oom-kills`` ...
    ``stat-direct-reclaims``, QEMU 9.2+) come through as ``oom-kills`` ... ``direct-reclaims``
    when a Linux 6.12+ guest sends them; QEMU 7.2 has no such names and an older guest leaves
    them at -1, and either way they are absent, not zero.
    """
    obj = _as_object(reply, "qom-get guest-stats")
    last_update = _int_member(obj, "last-update", "qom-get guest-stats")
    raw = _as_object(obj.get("stats"), "qom-get guest-stats: 'stats'")
    stats: dict[str, int] = {}
    for key, value in raw.items():
        if not _is_int(value):
            raise BadStatistics(f"qom-get guest-stats: {key!r} is not an integer")
        assert isinstance(value, int)
        if value in _UNSUPPORTED_STAT:
            continue
        if value < 0:
            raise BadStatistics(f"qom-get guest-stats: {key!r} is negative ({value})")
        stats[key.removeprefix("stat-")] = value
    return GuestStats(last_update=last_update, stats=stats)


#: ``query-migrate`` statuses of a VM that is not migrating now (qapi/migration.json
#: MigrationStatus): never started (QEMU answers ``{}`` then, or "none"), or over.
_MIGRATION_OVER: Final = frozenset({"none", "completed", "failed", "cancelled"})


def decode_migration_active(reply: object) -> bool:
    """``query-migrate`` -> whether a migration is under way (source or destination side).

    QEMU answers ``{}`` before any migration (qmp_query_migrate fills ``status`` only once
    one ran) and ``{"status": S, ...}`` after. Every status but none, completed, failed and
    cancelled is a migration in flight (setup, active, pre-switchover, device,
    postcopy-*, wait-unplug, colo, cancelling); a status this list does not know counts as
    migrating, so that an unknown state holds the VM rather than moving it.
    """
    obj = _as_object(reply, "query-migrate")
    status = obj.get("status")
    if status is None:
        return False
    if not isinstance(status, str):
        raise PeerError("query-migrate: 'status' is not a string")
    return status not in _MIGRATION_OVER


def names_extended_stats(reply: object) -> bool:
    """Whether a ``qom-get guest-stats`` reply has the names of tags 10-15 at all (QEMU 9.2
    and later name them, -1 until a Linux 6.12+ guest sends them; QEMU 7.2 does not)."""
    raw = _as_object(reply, "qom-get guest-stats").get("stats")
    return isinstance(raw, dict) and any(f"stat-{name}" in raw for name in EXTENDED_STAT_NAMES)


def profile_hint(reply: object) -> str | None:
    """The profile an x-query-virtio-status reply's feature names point to, if any."""
    obj = _as_object(reply, "x-query-virtio-status")
    for key in ("host-features", "device-features", "guest-features"):
        features = obj.get(key)
        if isinstance(features, dict):
            hint = parse_qemu_features(features).profile_hint
            if hint is not None:
                return hint
    return None


def device_status_names(status: object) -> tuple[str, ...]:
    """``status.statuses`` of x-query-virtio-status as short names (``VIRTIO_CONFIG_S_...``).

    7.2 writes ``"VIRTIO_CONFIG_S_DRIVER_OK: Driver setup and ready"``; a string without a
    ``NAME:`` prefix is kept whole.
    """
    obj = _as_object(status, "x-query-virtio-status: 'status'")
    statuses = obj.get("statuses", [])
    if not isinstance(statuses, list) or not all(isinstance(s, str) for s in statuses):
        raise PeerError("x-query-virtio-status: 'status.statuses' is not a list of strings")
    names = []
    for item in statuses:
        assert isinstance(item, str)
        macro, sep, _ = item.partition(":")
        names.append(macro.strip() if sep else item.strip())
    return tuple(names)


def _driver_ok(names: Iterable[str]) -> bool:
    return any(n in (_DRIVER_OK, _DRIVER_OK_DESCRIPTION) for n in names)


def decode_virtio_status(
    reply: object, path: str = "", *, profile_name: str | None = None
) -> FeatureState:
    """``x-query-virtio-status`` -> :class:`FeatureState`.

    ``host-features`` is what the device offers and ``guest-features`` what the driver acked
    (qapi/virtio.json VirtioStatus, QEMU 7.2). The profile is the one the device's own
    feature names point to: a device naming ``VIRTIO_BALLOON_F_SG`` is ``seed-sg``; anything
    else reads bit 3 as virtio 1.2 does (docs/protocol.md). ``profile_name`` is for a caller that
    knows better (a seed-sg device with SG switched off names no seed-only feature). Bits the
    profile has no name for are kept in ``unknown_offered``/``unknown_acked``, never guessed at.
    """
    obj = _as_object(reply, "x-query-virtio-status")
    offered_raw = obj.get("host-features", obj.get("device-features"))
    acked_raw = obj.get("guest-features")
    offered = parse_qemu_features(_as_object(offered_raw, "x-query-virtio-status: host-features"))
    acked = parse_qemu_features(_as_object(acked_raw, "x-query-virtio-status: guest-features"))
    for text in offered.unrecognised + acked.unrecognised:
        _LOG.debug("x-query-virtio-status: feature string not understood: %r", text)
    profile = get_profile(
        profile_name or offered.profile_hint or acked.profile_hint or "virtio-1.2"
    )
    known = 0
    for bit in profile.bits:
        known |= bit.mask
    names = device_status_names(obj.get("status", {"statuses": []}))
    queues = obj.get("num-vqs")
    return FeatureState(
        profile=profile.name,
        offered=tuple(profile.decode(offered.mask & known)),
        acked=tuple(profile.decode(acked.mask & known)),
        driver_ok=_driver_ok(names),
        unknown_offered=offered.mask & ~known,
        unknown_acked=acked.mask & ~known,
        device_path=path,
        queues=queues if _is_int(queues) and isinstance(queues, int) and queues > 0 else 0,
    )


def feature_property_changes(enable: Collection[str], disable: Collection[str]) -> dict[str, bool]:
    """Feature names -> the device properties a replug sets (``{"free-page-reporting": False}``).

    Only features a device property controls can change; the rest (``stats-vq``,
    ``version-1``, ...) are fixed by the device type, so asking for them is a
    :class:`UsageError` naming what can be changed.
    """
    changeable = ", ".join(FEATURE_PROPERTIES)
    both = set(enable) & set(disable)
    if both:
        raise UsageError(f"asked to both enable and disable {', '.join(sorted(both))}")
    changes: dict[str, bool] = {}
    for names, value in ((enable, True), (disable, False)):
        for name in names:
            prop = FEATURE_PROPERTIES.get(name)
            if prop is None:
                raise UsageError(
                    f"feature {name!r} cannot be changed on a live balloon "
                    f"(the ones that can: {changeable})"
                )
            changes[prop] = value
    return changes


@dataclass(frozen=True, slots=True)
class BalloonLocation:
    """Where the balloon is in QEMU's QOM tree, found once per connection."""

    #: The device that was ``-device``'d (virtio-balloon-pci), e.g. /machine/peripheral/balloon0.
    device: str
    #: The VirtIODevice itself, the path x-query-virtio-status wants.
    backend: str

    @property
    def device_id(self) -> str | None:
        """The ``id=`` the device was added with, or None for an anonymous one."""
        if self.device.startswith(_PERIPHERAL):
            rest = self.device[len(_PERIPHERAL) :]
            if rest and "/" not in rest:
                return rest
        return None

    @classmethod
    def from_backend(cls, backend: str) -> BalloonLocation:
        """The device owning a VirtIODevice path: its parent when it is a proxy's child."""
        parent, _, leaf = backend.rpartition("/")
        device = parent if leaf == _BACKEND_CHILD and parent else backend
        return cls(device=device, backend=backend)


def locate_balloon(reply: object) -> BalloonLocation | None:
    """The balloon in an ``x-query-virtio`` reply (``[{"name", "path"}]``), or None."""
    if not isinstance(reply, list):
        raise PeerError("x-query-virtio: expected a list")
    for item in reply:
        entry = _as_object(item, "x-query-virtio: an entry")
        name, path = entry.get("name"), entry.get("path")
        if not isinstance(name, str) or not isinstance(path, str):
            raise PeerError("x-query-virtio: an entry without a string 'name' and 'path'")
        if name == "virtio-balloon" and path:
            return BalloonLocation.from_backend(path)
    return None


#: The events balloonctl listens for (qapi/machine.json BALLOON_CHANGE, qapi/qdev.json
#: DEVICE_DELETED).
BALLOON_CHANGE: Final = "BALLOON_CHANGE"
DEVICE_DELETED: Final = "DEVICE_DELETED"


def balloon_change_actual(event: Mapping[str, object]) -> int:
    """A ``BALLOON_CHANGE`` event's ``actual``: guest memory now, bytes."""
    data = _as_object(event.get("data"), "BALLOON_CHANGE: 'data'")
    return _int_member(data, "actual", "BALLOON_CHANGE")


def device_deleted_names(event: Mapping[str, object], location: BalloonLocation) -> bool:
    """Whether a ``DEVICE_DELETED`` event is about the balloon at ``location`` (its id, or
    the QOM path of an anonymous device)."""
    data = event.get("data")
    if not isinstance(data, dict):
        return False
    if location.device_id is not None and data.get("device") == location.device_id:
        return True
    return data.get("path") == location.device


def _bounded_int(value: object, what: str, *, limit: int = (1 << 64) - 1) -> int:
    """``value`` as an integer from 0 to ``limit``; anything else is :class:`PeerError`."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        raise PeerError(f"{what}: not an integer from 0 to {limit}: {value!r}")
    return value


def parse_queue_status(reply: object, index: int) -> QueueStatus:
    """``x-query-virtio-queue-status`` (qapi/virtio.json VirtQueueStatus) -> QueueStatus.

    Checks QEMU's answer's shape; the values themselves are the parser's to judge (a size of
    0 or 70000 is QueueSizeInvalid, an address past RAM RingOutOfBounds).
    """
    what = "x-query-virtio-queue-status"
    if not isinstance(reply, dict):
        raise PeerError(f"{what}: not an object")
    if (
        "queue-index" in reply
        and _bounded_int(reply["queue-index"], f"{what} queue-index") != index
    ):
        raise PeerError(f"{what}: asked for queue {index}, got {reply['queue-index']!r}")
    u16 = 0xFFFF
    return QueueStatus(
        index=index,
        size=_bounded_int(reply.get("vring-num"), f"{what} vring-num", limit=0xFFFFFFFF),
        desc=_bounded_int(reply.get("vring-desc"), f"{what} vring-desc"),
        avail=_bounded_int(reply.get("vring-avail"), f"{what} vring-avail"),
        used=_bounded_int(reply.get("vring-used"), f"{what} vring-used"),
        last_avail_idx=_bounded_int(
            reply.get("last-avail-idx"), f"{what} last-avail-idx", limit=u16
        ),
        used_idx=_bounded_int(reply.get("used-idx"), f"{what} used-idx", limit=u16),
    )


def decode_memory_size_summary(reply: object) -> int:
    """``query-memory-size-summary`` -> bytes of boot RAM (``base-memory``, never 0)."""
    what = "query-memory-size-summary"
    if not isinstance(reply, dict):
        raise PeerError(f"{what}: not an object")
    ram = _bounded_int(reply.get("base-memory"), f"{what} base-memory")
    if ram == 0:
        raise PeerError(f"{what}: the VM has no RAM")
    return ram


@dataclass(slots=True)
class _ReplugPlan:
    """Everything needed to take the balloon out and put it back, read before touching it."""

    location: BalloonLocation
    driver: str
    bus: str
    #: device_add arguments that recreate the balloon as it is now.
    original: dict[str, object]
    changes: dict[str, bool]
    stats_period: int
    carried: dict[str, object] = field(default_factory=dict)

    @property
    def target(self) -> str:
        """What device_del is given: the id, or the QOM path of an anonymous device."""
        return self.location.device_id or self.location.device

    @property
    def replacement(self) -> dict[str, object]:
        """device_add arguments for the balloon with the new features."""
        return {**self.original, **self.changes}

    @property
    def minimal(self) -> dict[str, object]:
        """The old balloon with only its id, bus, slot and feature properties: the last resort
        when QEMU will not take back some other property it reported."""
        keep = {"driver", "id", "bus", "addr", *FEATURE_PROPERTIES.values()}
        return {k: v for k, v in self.original.items() if k in keep}


# --------------------------------------------------------------------------------------------
# The conversation, transport left out
# --------------------------------------------------------------------------------------------

#: Waits until the guest has let the balloon go; raises ConnectionLost if it cannot know.
RemovalWait = Callable[[], Awaitable[None]]


class NoQmpCarrier(CommandFailed):
    """The carrier cannot send QMP at all (a libvirt driver without monitor passthrough).

    Unlike a QEMU refusing one command, this is never a reason to guess a fallback.
    """


class QmpVocabulary:
    """Features, live renegotiation and balloon discovery, spoken in QMP over any carrier.

    A subclass provides :meth:`_execute` and :meth:`_removal_waiter`; ``name`` and
    ``_command_timeout`` are the subclass's too. The Backend questions are answered here in
    QMP (``actual``, ``max_memory``, ``set_target``, ``stats``, the stats period, the
    queue status and guest RAM a dump needs), so that every command name and reply shape is
    in this module; a carrier with a better way of its own overrides them (a libvirt
    domain's size and polling period belong to libvirt, so libvirt is asked).
    """

    name: str
    _command_timeout: float
    _location: BalloonLocation | None

    async def _execute(self, command: str, arguments: Mapping[str, object] | None = None) -> object:
        """Send one QMP command and return its ``return`` value (subclass: the transport)."""
        raise NotImplementedError

    def _removal_waiter(self, plan: _ReplugPlan) -> AbstractAsyncContextManager[RemovalWait]:
        """A context entered *before* device_del, yielding a wait for the balloon to be gone.

        Entered first so that an event-driven carrier cannot miss an event that arrives
        between device_del's reply and the start of the wait.
        """
        raise NotImplementedError

    async def _before_locate(self) -> None:
        """Hook: a carrier that reconnects forgets the cached location here."""

    def _hotplug_hint(self, driver: str, ident: str) -> str:
        """How to start the VM so that its balloon can be replugged (the carrier's syntax)."""
        return (
            "start the VM with the balloon on a pcie-root-port (-device pcie-root-port,id=rp1,"
            f"bus=pcie.0,chassis=1,slot=1 -device {driver},id={ident},bus=rp1)"
        )

    # ---------------------------------------------------------------- Backend, over QMP

    async def actual(self) -> int:
        """Guest memory now (``query-balloon`` ``actual``, bytes)."""
        reply = _as_object(await self._execute("query-balloon"), "query-balloon")
        return _int_member(reply, "actual", "query-balloon")

    async def max_memory(self) -> int:
        """RAM at boot plus hot-plugged memory (``query-memory-size-summary``)."""
        what = "query-memory-size-summary"
        reply = _as_object(await self._execute(what), what)
        total = _int_member(reply, "base-memory", what)
        if "plugged-memory" in reply:
            total += _int_member(reply, "plugged-memory", what)
        return total

    async def set_target(self, target: int) -> None:
        """``balloon {"value": target}``: the guest's target size. Sent once, never retried."""
        if not _is_int(target) or target <= 0:
            # qmp_balloon refuses it too (QERR_INVALID_PARAMETER_VALUE), after a round trip.
            raise UsageError(f"balloon target must be a positive number of bytes, not {target!r}")
        await self._execute("balloon", {"value": target})

    async def stats(self) -> GuestStats:
        """``qom-get guest-stats`` of the balloon, normalized (:func:`decode_guest_stats`)."""
        return decode_guest_stats(await self._guest_stats_reply())

    async def migrating(self) -> bool:
        """Whether the VM is migrating now (``query-migrate``, :func:`decode_migration_active`).

        A peer without the command (CommandNotFound: not a QEMU, or a stub) cannot migrate
        through it: False."""
        try:
            reply = await self._execute("query-migrate")
        except CommandFailed as exc:
            if exc.error_class == "CommandNotFound":
                return False
            raise
        return decode_migration_active(reply)

    async def stats_period(self) -> int:
        """``guest-stats-polling-interval`` in seconds (0: off)."""
        location = await self._locate()
        value = await self._qom_get(location.device, "guest-stats-polling-interval")
        if not _is_int(value) or not isinstance(value, int) or value < 0:
            raise PeerError("qom-get guest-stats-polling-interval: not a non-negative integer")
        return value

    async def set_stats_period(self, seconds: int) -> None:
        """qom-set ``guest-stats-polling-interval`` (never retried: it is an action)."""
        if not _is_int(seconds) or seconds < 0:
            raise UsageError(
                f"stats period must be a whole number of seconds >= 0, not {seconds!r}"
            )
        location = await self._locate()
        await self._execute(
            "qom-set",
            {"path": location.device, "property": "guest-stats-polling-interval", "value": seconds},
        )

    async def _pmemsave(self, gpa: int, size: int, filename: str) -> None:
        """QEMU writes ``size`` bytes of guest-physical memory from ``gpa`` into ``filename``
        (on QEMU's host)."""
        await self._execute("pmemsave", {"val": gpa, "size": size, "filename": filename})

    async def _balloon_present(self, location: BalloonLocation) -> bool:
        """Whether the balloon at ``location`` is still in QEMU's QOM tree: by its id under
        /machine/peripheral, or an anonymous one by its path in ``x-query-virtio``."""
        device_id = location.device_id
        if device_id is not None:
            listing = await self._execute("qom-list", {"path": "/machine/peripheral"})
            if not isinstance(listing, list):
                raise PeerError("qom-list: expected a list")
            return any(isinstance(e, dict) and e.get("name") == device_id for e in listing)
        reply = await self._execute("x-query-virtio")
        if not isinstance(reply, list):
            raise PeerError("x-query-virtio: expected a list")
        return any(isinstance(e, dict) and e.get("path") == location.backend for e in reply)

    async def _qom_get(self, path: str, prop: str) -> object:
        return await self._execute("qom-get", {"path": path, "property": prop})

    async def _qom_int(self, path: str, prop: str) -> int | None:
        """An integer QOM property, or None where the VM has no such object or property."""
        try:
            value = await self._qom_get(path, prop)
        except CommandFailed:
            return None
        return _bounded_int(value, f"qom-get {path} {prop}")

    async def monitor(self, command: str, arguments: Mapping[str, object] | None = None) -> object:
        """Any QMP command on the carrier, its ``return`` value; queries are retried after a
        drop. Not part of :class:`~.base.Backend`: it is for tests and debugging, so that
        the rest of balloonctl asks typed questions and speaks no QMP of its own."""
        return await self._execute(command, arguments)

    async def virtio_queue_status(self, path: str, index: int) -> QueueStatus:
        """``x-query-virtio-queue-status`` of queue ``index`` of the VirtIODevice at ``path``
        (QEMU >= 7.2), shape checked (:func:`parse_queue_status`)."""
        reply = await self._execute("x-query-virtio-queue-status", {"path": path, "queue": index})
        return parse_queue_status(reply, index)

    async def guest_ram(self) -> GuestRam:
        """The VM's boot RAM (``query-memory-size-summary``) and, on a PC machine, its split.

        ``/machine``'s type says whether it is a PC machine (``pc-q35-*``, ``pc-i440fx-*``);
        if so the host bridge is asked how RAM was split around the 32-bit PCI hole, and
        its answer is kept only when the two halves add up to the RAM. Otherwise
        ``/machine``'s ``max-ram-below-4g`` is read, for the caller to compute the split as
        QEMU does. Any other machine (the simulated VM) is just a size.
        """
        size = decode_memory_size_summary(await self._execute("query-memory-size-summary"))
        try:
            machine = await self._qom_get("/machine", "type")
        except CommandFailed:
            machine = None
        pc = (
            next((m for m in _PC_MACHINES if machine.startswith(m[0])), None)
            if isinstance(machine, str)
            else None
        )
        if pc is None or not isinstance(machine, str):
            return GuestRam(size)
        _, chipset, host = pc
        below = await self._qom_int(host, "below-4g-mem-size")
        above = await self._qom_int(host, "above-4g-mem-size")
        if below is not None and above is not None and below + above == size:
            return GuestRam(size, machine, chipset, host, host_split=(below, above))
        limit = await self._qom_int("/machine", "max-ram-below-4g") or 0
        return GuestRam(size, machine, chipset, host, max_ram_below_4g=limit)

    async def _guest_stats_reply(self) -> object:
        """The balloon's ``qom-get guest-stats`` reply, undecoded (:func:`decode_guest_stats`,
        :func:`names_extended_stats`)."""
        location = await self._locate()
        return await self._qom_get(location.device, "guest-stats")

    async def _locate(self) -> BalloonLocation:
        """The balloon's QOM paths: from x-query-virtio, else /machine/peripheral/balloon0."""
        await self._before_locate()  # a reconnect forgets the cached paths
        if self._location is not None:
            return self._location
        try:
            reply = await self._execute("x-query-virtio")
        except NoQmpCarrier:
            raise
        except CommandFailed as exc:
            if _NO_VIRTIO_DEVICES in str(exc):
                # QEMU 10 (hw/virtio/virtio-qmp.c qmp_x_query_virtio) refuses instead of
                # listing nothing as 7.2 does: no virtio device at all, so no balloon.
                raise CommandFailed(
                    f"VM {self.name} has no balloon device (x-query-virtio: no virtio devices)",
                    error_class="DeviceNotActive",
                ) from exc
            # CommandNotFound before QEMU 7.2.
            _LOG.debug("x-query-virtio unavailable (%s); assuming %s", exc, DEFAULT_BALLOON_PATH)
            location = None
        else:
            location = locate_balloon(reply)
            if location is None:
                # The class query-balloon answers with, so callers test one class for it.
                raise CommandFailed(
                    f"VM {self.name} has no balloon device (x-query-virtio lists none)",
                    error_class="DeviceNotActive",
                )
        if location is None:
            location = BalloonLocation(
                device=DEFAULT_BALLOON_PATH, backend=f"{DEFAULT_BALLOON_PATH}/{_BACKEND_CHILD}"
            )
        self._location = location
        return location

    # ---------------------------------------------------------------- Backend

    async def _virtio_status(self, location: BalloonLocation) -> object:
        return await self._execute("x-query-virtio-status", {"path": location.backend})

    async def features(self) -> FeatureState:
        """Offered and acked features from ``x-query-virtio-status`` (QEMU >= 7.2).

        When no feature name tells the profile (a seed-sg device with SG off offers nothing
        QEMU's balloon could not), the device's ``sg`` property does: only the seed-sg
        device has one.
        """
        location = await self._locate()
        reply = await self._virtio_status(location)
        profile_name: str | None = None
        if profile_hint(reply) is None:
            try:
                has_sg = isinstance(await self._qom_get(location.device, "sg"), bool)
            except CommandFailed:
                has_sg = False
            profile_name = "seed-sg" if has_sg else None
        return decode_virtio_status(reply, location.backend, profile_name=profile_name)

    # ---------------------------------------------------------------- renegotiate

    async def renegotiate(self, enable: Collection[str], disable: Collection[str]) -> FeatureState:
        """Replug the balloon with feature properties changed; the guest driver re-probes.

        Reads everything first (driver, bus, every property that differs from its default)
        and refuses before touching the VM when the bus cannot hotplug or the device has no
        such property. Then device_del, DEVICE_DELETED, device_add with the same id, bus and
        properties plus the changes, and a wait for DRIVER_OK. If QEMU refuses the new device,
        the old one is put back. Nothing to change: no replug.
        """
        changes = feature_property_changes(enable, disable)
        plan = await self._plan_replug(changes)
        if plan is None:
            _LOG.debug("%s: the balloon already has %s; not replugging", self.name, changes)
            return await self.features()
        await self._unplug(plan)
        await self._plug(plan)
        await self._wait_driver_ok()
        if plan.stats_period:
            try:
                await self.set_stats_period(plan.stats_period)
            except BalloonError as exc:
                _LOG.warning("the balloon is back but its stats polling is off: %s", exc)
        return await self.features()

    async def _require_hotplug(
        self, location: BalloonLocation, bus_path: str, bus: str, driver: str
    ) -> None:
        """Refuse (CommandFailed) unless QEMU would let the balloon be unplugged and replugged.

        QEMU answers the question itself: a device's ``hotpluggable`` property is
        ``dc->hotpluggable && qbus_is_hotpluggable(parent_bus)`` (hw/core/qdev.c
        device_get_hotpluggable), the very test qdev_unplug (softmmu/qdev-monitor.c) makes
        before "Bus '%s' does not support hotplugging". In 7.2 qbus_is_hotpluggable is "the bus
        has a hotplug-handler" (include/hw/qdev-core.h); ACPI PCI hotplug clears the handler
        of q35's pcie.0 and of root ports with hotplug=off (hw/acpi/pcihp.c,
        acpi_pcihp_disable_root_bus). So an empty ``hotplug-handler`` on the bus also means no.
        A QEMU that answers neither question is refused: unplugging blind could leave the VM
        without a balloon.
        """
        hotpluggable: bool | None = None
        handler: str | None = None
        try:
            value = await self._qom_get(location.device, "hotpluggable")
            hotpluggable = value if isinstance(value, bool) else None
        except CommandFailed as exc:
            _LOG.debug("qom-get hotpluggable: %s", exc)
        try:
            value = await self._qom_get(bus_path, "hotplug-handler")
            handler = value if isinstance(value, str) else None
        except CommandFailed as exc:
            _LOG.debug("qom-get hotplug-handler: %s", exc)
        if hotpluggable is None and handler is None:
            raise CommandFailed(
                f"cannot tell whether bus {bus} of VM {self.name} can hotplug "
                "(no 'hotpluggable' nor 'hotplug-handler' property); not unplugging the balloon"
            )
        if hotpluggable is False or handler == "":
            ident = location.device_id or "balloon0"
            raise CommandFailed(
                f"the balloon sits on bus {bus}, which cannot hotplug; "
                f"{self._hotplug_hint(driver, ident)} to change its features live"
            )

    async def _carried_properties(
        self, location: BalloonLocation, driver: str
    ) -> dict[str, object]:
        """The balloon's properties that differ from their defaults, to pass to device_add.

        ``device-list-properties`` lists what device_add accepts for the driver, with
        defaults; ``qom-get`` reads each value on the live device. Passing only what differs
        keeps device_add from choking on a property QEMU lists but will not take back.
        """
        try:
            listing = await self._execute("device-list-properties", {"typename": driver})
        except CommandFailed as exc:
            _LOG.debug(
                "device-list-properties %s: %s; carrying feature properties only", driver, exc
            )
            return {}
        if not isinstance(listing, list):
            raise PeerError("device-list-properties: expected a list")
        carried: dict[str, object] = {}
        for item in listing:
            info = _as_object(item, "device-list-properties: an entry")
            name, kind = info.get("name"), info.get("type")
            if not isinstance(name, str) or not isinstance(kind, str):
                raise PeerError("device-list-properties: an entry without 'name' and 'type'")
            if name in NOT_CARRIED or name.startswith("legacy-") or kind.startswith("child<"):
                continue
            try:
                value = await self._qom_get(location.device, name)
            except CommandFailed as exc:
                _LOG.debug("qom-get %s: %s; not carried", name, exc)
                continue
            if kind.startswith("link<"):
                # An unset link reads as "" (qom/object.c object_get_link_property).
                if isinstance(value, str) and value:
                    carried[name] = value
                continue
            if not isinstance(value, bool | int | float | str):
                continue
            if "default-value" in info:
                if _same(info["default-value"], value):
                    continue
            elif value == "":
                continue
            carried[name] = value
        return carried

    async def _plan_replug(self, changes: dict[str, bool]) -> _ReplugPlan | None:
        location = await self._locate()
        driver = await self._qom_get(location.device, "type")
        bus_path = await self._qom_get(location.device, "parent_bus")
        if not isinstance(driver, str) or not driver:
            raise PeerError("qom-get type: not a device type name")
        if not isinstance(bus_path, str):
            raise PeerError("qom-get parent_bus: not a QOM path")
        if not bus_path:
            raise CommandFailed(
                f"the balloon of VM {self.name} is on no bus; it cannot be replugged"
            )
        # qbus_find (softmmu/qdev-monitor.c) takes a bus by name, which is its QOM leaf.
        bus = bus_path.rstrip("/").rpartition("/")[2]
        await self._require_hotplug(location, bus_path, bus, driver)

        # Every feature property the device has, read and carried explicitly whatever its
        # default: they are the point of the exercise, and a QEMU (or the simulated VM) without
        # device-list-properties must not lose them.
        current: dict[str, bool] = {}
        for feature, prop in FEATURE_PROPERTIES.items():
            try:
                value = await self._qom_get(location.device, prop)
            except CommandFailed as exc:
                if prop in changes:
                    hint = " (sg exists only on the seed-sg device)" if prop == "sg" else ""
                    raise UsageError(
                        f"this balloon ({driver}) has no property {prop!r}, so {feature} "
                        f"cannot be changed on it{hint}"
                    ) from exc
                continue
            if not isinstance(value, bool):
                raise PeerError(f"qom-get {prop}: not a boolean")
            current[prop] = value
        if all(current[prop] is value for prop, value in changes.items()):
            return None

        carried = await self._carried_properties(location, driver)
        original: dict[str, object] = {"driver": driver}
        if location.device_id is not None:
            original["id"] = location.device_id
        original["bus"] = bus
        original.update(carried)
        original.update(current)
        try:
            stats_period = await self.stats_period()
        except CommandFailed:
            stats_period = 0
        return _ReplugPlan(
            location=location,
            driver=driver,
            bus=bus,
            original=original,
            changes=changes,
            stats_period=stats_period,
            carried=carried,
        )

    async def _unplug(self, plan: _ReplugPlan) -> None:
        """device_del, then wait for the guest to let go (the carrier says how it learns it)."""
        async with self._removal_waiter(plan) as gone:
            await self._execute("device_del", {"id": plan.target})
            self._location = None
            try:
                async with asyncio.timeout(self._command_timeout):
                    await gone()
            except TimeoutError as exc:
                raise OperationTimeout(
                    f"VM {self.name} did not release the balloon {plan.target} within "
                    f"{self._command_timeout:g} s of device_del: the balloon may be gone or may "
                    "still go; check `balloonctl features` before retrying"
                ) from exc
        _LOG.debug("%s: balloon %s deleted", self.name, plan.target)

    async def _device_add(self, plan: _ReplugPlan, arguments: Mapping[str, object]) -> None:
        """device_add, leaving out each carried property QEMU says it cannot set.

        Only properties read off the old device (``plan.carried``) are left out: the
        driver, id, bus and feature properties are the request itself, so their refusal is
        the answer. At most one retry per carried property, so the loop is bounded.
        """
        args = dict(arguments)
        while True:
            try:
                await self._execute("device_add", args)
                return
            except CommandFailed as exc:
                match = _NOT_WRITABLE.search(str(exc))
                name = match.group(1) if match else None
                if name is None or name not in plan.carried or name not in args:
                    raise
                _LOG.debug("%s: device_add refused read-only %s; not carried", self.name, name)
                del args[name]

    async def _plug(self, plan: _ReplugPlan) -> None:
        """device_add with the changes; if QEMU refuses, put the old balloon back."""
        try:
            await self._device_add(plan, plan.replacement)
        except CommandFailed as refused:
            again: BalloonError | None = None
            attempts = [plan.original]
            if plan.minimal != plan.original:
                attempts.append(plan.minimal)
            for arguments in attempts:
                try:
                    await self._device_add(plan, arguments)
                except CommandFailed as exc:
                    again = exc
                    continue
                except BalloonError as exc:  # the connection went: no second guess
                    again = exc
                    break
                how = "unchanged" if arguments is plan.original else "with its features only"
                raise CommandFailed(
                    f"{refused}; the balloon was put back {how}", error_class=refused.error_class
                ) from refused
            raise CommandFailed(
                f"{refused}; putting the old balloon back failed too ({again}): the VM has "
                f"no balloon now, re-add it with device_add {json.dumps(plan.original)}",
                error_class=refused.error_class,
            ) from again

    async def _wait_driver_ok(self) -> None:
        """Poll x-query-virtio-status until the guest driver sets DRIVER_OK (spec 3.1.1)."""
        statuses: tuple[str, ...] = ()
        delay = 0.02
        try:
            async with asyncio.timeout(self._command_timeout):
                while True:
                    location = await self._locate()
                    reply = _as_object(await self._virtio_status(location), "x-query-virtio-status")
                    statuses = device_status_names(reply.get("status", {"statuses": []}))
                    if _driver_ok(statuses):
                        return
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 0.5)
        except TimeoutError as exc:
            state = ", ".join(statuses) or "reset (no status bit set)"
            raise OperationTimeout(
                f"the balloon of VM {self.name} is back but its guest driver is not ready after "
                f"{self._command_timeout:g} s (device status: {state})"
            ) from exc
