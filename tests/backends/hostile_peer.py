"""A scripted QMP server on a real unix socket: a stand-in for QEMU in the backend's tests.

This is **not** QEMU and not the simulated VM. It exists for what a real QEMU cannot be made
to do on demand: answer with bytes that are not JSON or replies of the wrong shape, hang up in
the middle of a command, never send its greeting, flood events. Every test talks to it through
a real ``AF_UNIX`` socket and the real ``qemu.qmp`` client, so framing, ids and the library's
own failure paths are the real ones.

Its happy path (:class:`FakeQemu`) answers the balloon subset with QEMU 7.2's reply shapes: the
replies recorded from a real QEMU 7.2 in ``fixtures/transcripts/qemu-7.2`` where a recording
exists (:func:`recorded_reply`), else hand-written from QEMU's source (cited beside each one).
A test overrides single replies with :meth:`HostilePeer.script`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

GiB: Final = 1 << 30
MiB: Final = 1 << 20

TRANSCRIPTS: Final = Path(__file__).resolve().parents[2] / "fixtures" / "transcripts" / "qemu-7.2"

# --------------------------------------------------------------------------------------------
# What the peer can do in answer to a command
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Return:
    """``{"return": value, "id": ...}``: success."""

    value: object


@dataclass(frozen=True)
class Fail:
    """``{"error": {"class", "desc"}, "id": ...}``: QEMU refusing (qapi/error.json classes)."""

    error_class: str
    desc: str


@dataclass(frozen=True)
class Raw:
    """Bytes sent as they are (plus CRLF); ``{id}`` becomes the command's id as JSON."""

    text: str


@dataclass(frozen=True)
class Emit:
    """An event, as QEMU sends them (with a timestamp)."""

    event: str
    data: Mapping[str, object] | None = None


@dataclass(frozen=True)
class Flood:
    """``count`` BALLOON_CHANGE events, ``actual`` = ``start``, ``start + 1``, ..."""

    count: int
    start: int = 0


@dataclass(frozen=True)
class Drop:
    """Hang up without answering."""


@dataclass(frozen=True)
class Hang:
    """Never answer; keep the connection open."""


Action = Return | Fail | Raw | Emit | Flood | Drop | Hang
Script = Sequence[Action]


def _timestamp() -> dict[str, int]:
    now = time.time()
    return {"seconds": int(now), "microseconds": int((now % 1) * 1_000_000)}


# --------------------------------------------------------------------------------------------
# Recorded replies
# --------------------------------------------------------------------------------------------


def _load_transcripts() -> tuple[list[dict[str, object]], dict[str, object] | None]:
    """Every (command, arguments, reply) exchange recorded from QEMU 7.2, and its greeting."""
    exchanges: list[dict[str, object]] = []
    greeting: dict[str, object] | None = None
    if not TRANSCRIPTS.is_dir():
        return exchanges, greeting
    for path in sorted(TRANSCRIPTS.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if greeting is None and isinstance(data, dict) and isinstance(data.get("greeting"), dict):
            greeting = data["greeting"]
        exchanges.extend(_exchanges(data, path.stem))
    return exchanges, greeting


def _exchanges(data: object, source: str) -> Iterator[dict[str, object]]:
    """Pull ``{"execute", "arguments"} -> reply`` pairs out of a transcript, whatever its layout.

    Accepted: a list of ``{"send"/"request"/"command": ..., "recv"/"reply"/"response": ...}``
    records, or an object holding such a list under ``exchanges``/``transcript``/``messages``.
    """
    records: object = data
    if isinstance(data, dict):
        for key in ("exchanges", "transcript", "messages", "log"):
            if key in data:
                records = data[key]
                break
    if not isinstance(records, list):
        return
    for record in records:
        if not isinstance(record, dict):
            continue
        request = next(
            (record[k] for k in ("send", "request", "command", "sent", "qmp") if k in record),
            None,
        )
        reply = next(
            (record[k] for k in ("recv", "reply", "response", "received") if k in record), None
        )
        if isinstance(request, dict) and isinstance(reply, dict) and "execute" in request:
            yield {
                "execute": request["execute"],
                "arguments": request.get("arguments", {}),
                "reply": reply,
                "source": source,
            }


_RECORDED: tuple[list[dict[str, object]], dict[str, object] | None] | None = None


def _recorded() -> tuple[list[dict[str, object]], dict[str, object] | None]:
    global _RECORDED  # noqa: PLW0603 - loaded once per test session
    if _RECORDED is None:
        _RECORDED = _load_transcripts()
    return _RECORDED


def recorded_greeting() -> dict[str, object] | None:
    """The greeting real QEMU 7.2 sent, if a transcript holds one."""
    return _recorded()[1]


def recorded_return(
    command: str, arguments: Mapping[str, object] | None = None, *, source: str | None = None
) -> object | None:
    """The ``return`` value of :func:`recorded_reply`, or None (also for an error reply)."""
    reply = recorded_reply(command, arguments, source=source)
    if reply is None or "return" not in reply:
        return None
    return reply["return"]


def recorded_reply(
    command: str, arguments: Mapping[str, object] | None = None, *, source: str | None = None
) -> dict[str, object] | None:
    """The reply real QEMU 7.2 gave to ``command`` (with these arguments, if given), or None.

    ``source`` picks a transcript by name (``introspect``, ``hotplug``, ...)."""
    for exchange in _recorded()[0]:
        if exchange["execute"] != command:
            continue
        if source is not None and exchange["source"] != source:
            continue
        if arguments is not None and exchange["arguments"] != dict(arguments):
            continue
        reply = exchange["reply"]
        assert isinstance(reply, dict)
        return reply
    return None


# --------------------------------------------------------------------------------------------
# The happy path: a balloon as QEMU 7.2 shows it
# --------------------------------------------------------------------------------------------

#: qmp_greeting() in monitor/qmp.c, Debian 12's QEMU: the recorded one when there is one.
GREETING_7_2: Final[Mapping[str, object]] = recorded_greeting() or {
    "QMP": {
        "version": {
            "qemu": {"micro": 22, "minor": 2, "major": 7},
            "package": "Debian 1:7.2+dfsg-7+deb12u18+b3",
        },
        "capabilities": ["oob"],
    }
}

#: virtio_balloon_feature_map (hw/virtio/virtio.c in 7.2): device property -> feature string,
#: highest bit first, as QEMU lists them (introspect.json).
BALLOON_FEATURE_STRINGS: Final = {
    "free-page-reporting": "VIRTIO_BALLOON_F_REPORTING: Page reporting VQ enabled",
    "page-poison": "VIRTIO_BALLOON_F_PAGE_POISON: Guest page poisoning enabled",
    "free-page-hint": "VIRTIO_BALLOON_F_FREE_PAGE_HINT: VQ reporting free pages enabled",
    # The seed patch's bit 3 (only the simulated seed-sg device has it).
    "sg": "VIRTIO_BALLOON_F_SG: Use sg instead of PFN lists",
    "deflate-on-oom": "VIRTIO_BALLOON_F_DEFLATE_ON_OOM: Deflate balloon when guest OOM",
}
STATS_VQ: Final = "VIRTIO_BALLOON_F_STATS_VQ: Guest memory stats VQ available"
#: virtio_transport_map, 7.2 wording.
TRANSPORT_STRINGS: Final = {
    "event_idx": "VIRTIO_RING_F_EVENT_IDX: Used & avail. event fields enabled",
    "indirect_desc": "VIRTIO_RING_F_INDIRECT_DESC: Indirect descriptors supported",
    "version-1": "VIRTIO_F_VERSION_1: Device compliant for v1 spec (legacy)",
    "any-layout": "VIRTIO_F_ANY_LAYOUT: Device accepts arbitrary desc. layouts",
    "notify-on-empty": (
        "VIRTIO_F_NOTIFY_ON_EMPTY: Notify when device runs out of avail. descs. on VQ"
    ),
}
#: virtio_config_status_map, 7.2 wording, lowest bit first as QEMU lists them.
STATUS_STRINGS: Final = (
    "VIRTIO_CONFIG_S_ACKNOWLEDGE: Valid virtio device found",
    "VIRTIO_CONFIG_S_DRIVER: Guest OS compatible with device",
    "VIRTIO_CONFIG_S_FEATURES_OK: Feature negotiation complete",
    "VIRTIO_CONFIG_S_DRIVER_OK: Driver setup and ready",
)

#: What the 6.1 guest acks of a deflate-on-oom + free-page-reporting balloon (introspect.json:
#: not INDIRECT_DESC), and bit 40 (RING_RESET), which 7.2 cannot name and shows as unknown.
GUEST_ACKS: Final = frozenset(
    {"deflate-on-oom", "free-page-reporting", "sg", "event_idx", "version-1"}
)
RING_RESET_BIT: Final = 1 << 40
#: VIRTIO_F_BAD_FEATURE: QEMU offers it so that a legacy driver acking it can be caught.
BAD_FEATURE_BIT: Final = 1 << 30

#: device-list-properties virtio-balloon-pci (qom/qom-qmp-cmds.c), the part that matters here:
#: name, type and default as QEMU 7.2 reports them.
BALLOON_PCI_PROPERTIES: Final = (
    {"name": "addr", "type": "int32", "default-value": -1},
    {"name": "multifunction", "type": "bool", "default-value": False},
    {"name": "romfile", "type": "str"},
    {"name": "disable-legacy", "type": "OnOffAuto", "default-value": "auto"},
    {"name": "disable-modern", "type": "bool", "default-value": False},
    {"name": "ioeventfd", "type": "bool", "default-value": True},
    {"name": "iothread", "type": "link<iothread>"},
    {"name": "deflate-on-oom", "type": "bool", "default-value": False},
    {"name": "free-page-hint", "type": "bool", "default-value": False},
    {"name": "page-poison", "type": "bool", "default-value": True},
    {"name": "free-page-reporting", "type": "bool", "default-value": False},
    {"name": "indirect_desc", "type": "bool", "default-value": True},
    {"name": "event_idx", "type": "bool", "default-value": True},
    {"name": "guest-stats", "type": "guest-stats"},
    {"name": "guest-stats-polling-interval", "type": "int"},
    {"name": "virtio-backend", "type": "child<virtio-balloon-device>"},
)


@dataclass
class FakeBalloon:
    """The balloon device: id, driver, bus and properties."""

    dev_id: str | None = "balloon0"
    driver: str = "virtio-balloon-pci"
    bus: str = "rp1"
    properties: dict[str, object] = field(default_factory=dict)
    stats_interval: int = 0
    #: x-query-virtio-status polls that still show the driver probing (no DRIVER_OK).
    probing_polls: int = 0

    @property
    def path(self) -> str:
        return (
            f"/machine/peripheral/{self.dev_id}"
            if self.dev_id
            else "/machine/peripheral-anon/device[3]"
        )

    @property
    def backend(self) -> str:
        return f"{self.path}/virtio-backend"

    @property
    def bus_path(self) -> str:
        # pcie.0 belongs to the q35 host bridge; a root port's bus is its child of the same name.
        return (
            "/machine/q35/pcie.0"
            if self.bus == "pcie.0"
            else f"/machine/peripheral/{self.bus}/{self.bus}"
        )


def default_properties(profile: str = "virtio-1.2") -> dict[str, object]:
    """``-device virtio-balloon-pci,id=balloon0,deflate-on-oom=on,free-page-reporting=on``."""
    props: dict[str, object] = {
        "addr": 0,
        "multifunction": False,
        "romfile": "",
        "disable-legacy": "auto",
        "disable-modern": False,
        "ioeventfd": True,
        "iothread": "",
        "deflate-on-oom": True,
        "free-page-hint": False,
        "page-poison": True,
        "free-page-reporting": True,
        "indirect_desc": True,
        "event_idx": True,
    }
    if profile == "seed-sg":
        for name in ("free-page-hint", "page-poison", "free-page-reporting"):
            del props[name]
        props["sg"] = True
    return props


class FakeQemu:
    """QEMU 7.2's balloon subset with the reply shapes of the real thing (see module doc)."""

    def __init__(
        self,
        *,
        ram: int = 2 * GiB,
        bus: str = "rp1",
        profile: str = "virtio-1.2",
        dev_id: str | None = "balloon0",
    ) -> None:
        self.ram = ram
        self.actual = ram
        self.profile = profile
        self.balloon: FakeBalloon | None = FakeBalloon(
            dev_id=dev_id, bus=bus, properties=default_properties(profile)
        )
        #: Whether the guest ejects on device_del (ACPI/PCIe hotplug answered).
        self.releases = True
        #: Whether replies recorded from QEMU 7.2 are replayed where they fit.
        self.replay = True
        self.stats: dict[str, int] = {
            "stat-swap-out": 0,
            "stat-available-memory": 1_620_000_768,
            "stat-major-faults": 2,
            "stat-minor-faults": 68_123,
            "stat-free-memory": 1_760_444_416,
            "stat-htlb-pgfail": 0,
            "stat-total-memory": 2_059_530_240,
            "stat-swap-in": 0,
            "stat-disk-caches": 66_834_432,
            "stat-htlb-pgalloc": 0,
        }
        self.last_update = 1_732_560_000
        recorded = recorded_return(
            "qom-get",
            {"path": "/machine/peripheral/balloon0", "property": "guest-stats"},
            source="stats",
        )
        if isinstance(recorded, dict):
            stats, last = recorded.get("stats"), recorded.get("last-update")
            if isinstance(stats, dict) and isinstance(last, int):
                self.stats = {str(k): int(v) for k, v in stats.items()}
                self.last_update = last

    # ------------------------------------------------------------------ dispatch

    def handle(self, command: str, args: Mapping[str, object]) -> Script:
        handler: Callable[[Mapping[str, object]], Script] | None = getattr(
            self, "do_" + command.replace("-", "_"), None
        )
        if handler is None:
            # qmp_dispatch (qapi/qmp-dispatch.c).
            return [Fail("CommandNotFound", f"The command {command} has not been found")]
        return handler(args)

    def do_qmp_capabilities(self, args: Mapping[str, object]) -> Script:
        return [Return({})]

    def do_query_status(self, args: Mapping[str, object]) -> Script:
        return [Return({"status": "running", "singlestep": False, "running": True})]

    def do_query_balloon(self, args: Mapping[str, object]) -> Script:
        if self.balloon is None:
            # qmp_query_balloon (softmmu/balloon.c).
            return [Fail("DeviceNotActive", "No balloon device has been activated")]
        return [Return({"actual": self.actual})]

    def do_balloon(self, args: Mapping[str, object]) -> Script:
        if self.balloon is None:
            return [Fail("DeviceNotActive", "No balloon device has been activated")]
        value = args.get("value")
        assert isinstance(value, int)
        self.actual = min(value, self.ram)
        return [Return({}), Emit("BALLOON_CHANGE", {"actual": self.actual})]

    def do_query_memory_size_summary(self, args: Mapping[str, object]) -> Script:
        # qmp_query_memory_size_summary (hw/core/machine-qmp-cmds.c); introspect.json.
        return [Return({"base-memory": self.ram, "plugged-memory": 0})]

    def do_x_query_virtio(self, args: Mapping[str, object]) -> Script:
        devices: list[dict[str, object]] = [
            {"name": "virtio-net", "path": "/machine/peripheral-anon/device[1]/virtio-backend"}
        ]
        if self.balloon is not None:
            devices.append({"name": "virtio-balloon", "path": self.balloon.backend})
        return [Return(devices)]

    def _features(self, props: Mapping[str, object], *, acked: bool) -> dict[str, object]:
        dev = []
        for prop, text in BALLOON_FEATURE_STRINGS.items():
            if props.get(prop) is True and (not acked or prop in GUEST_ACKS):
                dev.append(text)
        dev.append(STATS_VQ)
        transports = [
            text
            for name, text in TRANSPORT_STRINGS.items()
            if props.get(name, True) is True and (not acked or name in GUEST_ACKS)
        ]
        unknown = RING_RESET_BIT if acked else RING_RESET_BIT | BAD_FEATURE_BIT
        return {"unknown-dev-features": unknown, "dev-features": dev, "transports": transports}

    def do_x_query_virtio_status(self, args: Mapping[str, object]) -> Script:
        balloon = self.balloon
        path = args.get("path")
        if balloon is None or path != balloon.backend:
            # qmp_x_query_virtio_status (introspect.json).
            return [Fail("GenericError", f"Path {path} is not a VirtIODevice")]
        probing = balloon.probing_polls > 0
        if probing:
            balloon.probing_polls -= 1
        if not probing and balloon.properties == default_properties() and self.replay:
            recorded = recorded_return(
                "x-query-virtio-status", {"path": balloon.backend}, source="introspect"
            )
            if recorded is not None:
                return [Return(recorded)]
        # Mid-probe: the driver has acknowledged the device but not finished.
        statuses = list(STATUS_STRINGS[:2] if probing else STATUS_STRINGS)
        return [
            Return(
                {
                    "name": "virtio-balloon",
                    "device-id": 5,
                    "vhost-started": False,
                    "device-endian": "little",
                    "guest-features": (
                        {"transports": [], "dev-features": []}
                        if probing
                        else self._features(balloon.properties, acked=True)
                    ),
                    "host-features": self._features(balloon.properties, acked=False),
                    "backend-features": {"transports": [], "dev-features": []},
                    "num-vqs": 4,
                    "status": {"statuses": statuses},
                    "isr": 0,
                    "queue-sel": 3,
                    "vm-running": True,
                    "broken": False,
                    "disabled": False,
                    "use-started": True,
                    "started": not probing,
                    "start-on-kick": False,
                    "disable-legacy-check": False,
                    "bus-name": "",
                    "use-guest-notifier-mask": True,
                }
            )
        ]

    def _bus_paths(self) -> dict[str, str]:
        """Bus QOM path -> its hotplug-handler: "" on q35's pcie.0, ICH9-LPC (ACPI PCI hotplug)
        on a root port's bus (hotplug.json, nohotplug.json)."""
        return {
            "/machine/q35/pcie.0": "",
            "/machine/peripheral/rp1/rp1": "/machine/unattached/device[2]",
        }

    def do_qom_get(self, args: Mapping[str, object]) -> Script:
        path, prop = args.get("path"), args.get("property")
        balloon = self.balloon
        if balloon is not None and path == balloon.path:
            if prop == "guest-stats":
                return [Return({"stats": dict(self.stats), "last-update": self.last_update})]
            if prop == "guest-stats-polling-interval":
                return [Return(balloon.stats_interval)]
            if prop == "type":
                return [Return(balloon.driver)]
            if prop == "parent_bus":
                return [Return(balloon.bus_path)]
            if prop == "hotpluggable":
                # device_get_hotpluggable: dc->hotpluggable && qbus_is_hotpluggable(bus).
                return [Return(self._bus_paths().get(balloon.bus_path, "") != "")]
            if prop in balloon.properties:
                return [Return(balloon.properties[prop])]
            return [Fail("GenericError", f"Property '{balloon.driver}.{prop}' not found")]
        if path in self._bus_paths():
            if prop == "hotplug-handler":
                return [Return(self._bus_paths()[str(path)])]
            return [Fail("GenericError", f"Property 'PCIE.{prop}' not found")]
        # qmp_qom_get (qom/qom-qmp-cmds.c).
        return [Fail("DeviceNotFound", f"Device '{path}' not found")]

    def do_qom_set(self, args: Mapping[str, object]) -> Script:
        balloon = self.balloon
        if balloon is None or args.get("path") != balloon.path:
            return [Fail("DeviceNotFound", f"Device '{args.get('path')}' not found")]
        if args.get("property") != "guest-stats-polling-interval":
            return [Fail("GenericError", "Insufficient permission to perform this operation")]
        value = args.get("value")
        assert isinstance(value, int)
        balloon.stats_interval = value
        return [Return({})]

    def do_device_list_properties(self, args: Mapping[str, object]) -> Script:
        if args.get("typename") != "virtio-balloon-pci":
            return [Fail("GenericError", "Parameter 'typename' expects device type")]
        props = [dict(p) for p in BALLOON_PCI_PROPERTIES]
        if self.profile == "seed-sg":
            props = [
                p
                for p in props
                if p["name"] not in ("free-page-hint", "page-poison", "free-page-reporting")
            ]
            props.append({"name": "sg", "type": "bool", "default-value": True})
        return [Return(props)]

    def do_device_del(self, args: Mapping[str, object]) -> Script:
        balloon = self.balloon
        target = args.get("id")
        if balloon is None or target not in (balloon.dev_id, balloon.path):
            return [Fail("DeviceNotFound", f"Device '{target}' not found")]
        if self._bus_paths().get(balloon.bus_path, "") == "":
            # qdev_unplug (softmmu/qdev-monitor.c): QERR_BUS_NO_HOTPLUG.
            return [Fail("GenericError", f"Bus '{balloon.bus}' does not support hotplugging")]
        if not self.releases:
            return [Return({})]
        self.balloon = None
        self.actual = self.ram  # the guest gets its ballooned pages back
        device: dict[str, object] = {"path": balloon.path}
        if balloon.dev_id:
            device["device"] = balloon.dev_id
        return [
            Return({}),
            # The backend first, then the proxy (device_unparent of the child, then the parent).
            Emit("DEVICE_DELETED", {"path": balloon.backend}),
            Emit("DEVICE_DELETED", device),
        ]

    def do_device_add(self, args: Mapping[str, object]) -> Script:
        if self.balloon is not None:
            # virtio_balloon_device_realize: qemu_add_balloon_handler refused.
            return [Fail("GenericError", "Only one balloon device is supported")]
        driver = args.get("driver")
        if driver != "virtio-balloon-pci":
            return [Fail("GenericError", f"'{driver}' is not a valid device model name")]
        known = default_properties(self.profile)
        props = dict(known)
        for key, value in args.items():
            if key in ("driver", "id", "bus"):
                continue
            if key not in known:
                return [Fail("GenericError", f"Property 'virtio-balloon-pci.{key}' not found")]
            props[key] = value
        dev_id = args.get("id")
        bus = args.get("bus", "pcie.0")
        assert dev_id is None or isinstance(dev_id, str)
        assert isinstance(bus, str)
        self.balloon = FakeBalloon(dev_id=dev_id, bus=bus, properties=props)
        return [Return({})]


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------


class HostilePeer:
    """A QMP server on ``path`` answering from :class:`FakeQemu` unless scripted otherwise.

    ``greeting``: a JSON object to greet with, a string sent raw (not QMP), or None for a
    monitor that never greets (as QEMU's is while another client holds it).
    """

    def __init__(
        self,
        path: str | Path,
        vm: FakeQemu | None = None,
        *,
        greeting: Mapping[str, object] | str | None = GREETING_7_2,
        hang_up_first: int = 0,
    ) -> None:
        self.path = str(path)
        #: The first this-many connections are closed before the greeting.
        self.hang_up_first = hang_up_first
        self.vm = vm if vm is not None else FakeQemu()
        self.greeting = greeting
        self._scripts: dict[str, deque[Script]] = {}
        #: Every command received, in order, across connections: (name, arguments).
        self.received: list[tuple[str, dict[str, object]]] = []
        #: Connections accepted so far.
        self.connections = 0
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._hanging: list[asyncio.Future[None]] = []

    def script(self, command: str, *replies: Action | Script) -> None:
        """Answer the next calls of ``command`` with these, one per call, then as usual."""
        queue = self._scripts.setdefault(command, deque())
        for reply in replies:
            queue.append([reply] if not isinstance(reply, Sequence) else reply)

    def clear_scripts(self) -> None:
        """Forget every scripted reply not used yet."""
        self._scripts.clear()

    def count(self, command: str) -> int:
        """How many times ``command`` was received."""
        return sum(1 for name, _ in self.received if name == command)

    def arguments(self, command: str) -> list[dict[str, object]]:
        """The arguments of each ``command`` received, in order."""
        return [args for name, args in self.received if name == command]

    async def __aenter__(self) -> HostilePeer:
        self._server = await asyncio.start_unix_server(self._serve, path=self.path)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for future in self._hanging:
            future.cancel()
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        if self._server is not None:
            await self._server.wait_closed()

    async def hang_up(self) -> None:
        """Close every open connection (the monitor going away under its clients)."""
        for writer in list(self._writers):
            writer.close()
        for future in self._hanging:
            future.cancel()

    async def emit(self, event: str, data: Mapping[str, object] | None = None) -> None:
        """Send an event to every connected client, outside any command."""
        for writer in list(self._writers):
            self._write(writer, self._event(event, data))
            with contextlib.suppress(ConnectionError):
                await writer.drain()

    @staticmethod
    def _event(event: str, data: Mapping[str, object] | None) -> dict[str, object]:
        msg: dict[str, object] = {"event": event}
        if data is not None:
            msg["data"] = dict(data)
        msg["timestamp"] = _timestamp()
        return msg

    @staticmethod
    def _write(writer: asyncio.StreamWriter, obj: object) -> None:
        # monitor_qmp_respond: one JSON object per line, CRLF-terminated.
        writer.write(json.dumps(obj).encode() + b"\r\n")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.connections <= self.hang_up_first:
            writer.close()
            return
        self._writers.add(writer)
        try:
            if isinstance(self.greeting, str):
                writer.write(self.greeting.encode() + b"\r\n")
            elif self.greeting is not None:
                self._write(writer, self.greeting)
            await writer.drain()
            await self._read_commands(reader, writer)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _read_commands(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        # QEMU's JSON streamer takes concatenated objects; qemu.qmp sends no newline.
        decoder = json.JSONDecoder()
        buffer = ""
        while True:
            data = await reader.read(65536)
            if not data:
                return
            buffer += data.decode()
            while True:
                buffer = buffer.lstrip()
                if not buffer:
                    break
                try:
                    msg, end = decoder.raw_decode(buffer)
                except ValueError:
                    break  # incomplete: wait for more
                buffer = buffer[end:]
                if self.greeting is None:
                    continue  # a monitor that never greets never answers either
                if not await self._answer(msg, writer):
                    return

    async def _answer(self, msg: dict[str, object], writer: asyncio.StreamWriter) -> bool:
        """Run the command's script; False once the connection is gone."""
        command = msg.get("execute", msg.get("exec-oob"))
        assert isinstance(command, str)
        raw_args = msg.get("arguments", {})
        args = dict(raw_args) if isinstance(raw_args, dict) else {}
        self.received.append((command, args))
        queue = self._scripts.get(command)
        script = queue.popleft() if queue else self.vm.handle(command, args)
        has_id = "id" in msg
        for action in script:
            if isinstance(action, Return):
                reply: dict[str, object] = {"return": action.value}
                if has_id:
                    reply["id"] = msg["id"]
                self._write(writer, reply)
            elif isinstance(action, Fail):
                error: dict[str, object] = {
                    "error": {"class": action.error_class, "desc": action.desc}
                }
                if has_id:
                    error["id"] = msg["id"]
                self._write(writer, error)
            elif isinstance(action, Raw):
                text = action.text.replace("{id}", json.dumps(msg.get("id")))
                writer.write(text.encode() + b"\r\n")
            elif isinstance(action, Emit):
                self._write(writer, self._event(action.event, action.data))
            elif isinstance(action, Flood):
                for i in range(action.count):
                    self._write(writer, self._event("BALLOON_CHANGE", {"actual": action.start + i}))
                    if i % 256 == 255:
                        await writer.drain()
            elif isinstance(action, Drop):
                await writer.drain()
                writer.close()
                return False
            else:  # Hang
                future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._hanging.append(future)
                await writer.drain()
                await future
        await writer.drain()
        return True
