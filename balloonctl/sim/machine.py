"""A simulated VM: guest RAM, a hot-pluggable balloon, and its QMP monitor's balloon subset.

Replies follow QEMU 7.2 or 10.0, as ``VmSpec.qemu_version`` says (``softmmu/balloon.c``,
``system/balloon.c`` from 8.0, ``hw/virtio/virtio-balloon.c``, ``hw/virtio/virtio-qmp.c``,
``qom/qom-qmp-cmds.c``, ``softmmu/qdev-monitor.c``), shape for shape and error for error;
where the two differ, :mod:`balloonctl.sim.qemu_versions` says how.
``fixtures/transcripts/qemu-7.2/`` and ``qemu-10.0/`` hold what real QEMUs said and
``tests/sim/test_transcripts.py`` holds the sim to both. The VM is what QEMU would run with
``-machine q35 -device pcie-root-port,id=rp1,... -device
virtio-balloon-pci,id=balloon0,bus=rp1,...`` (or on ``pcie.0``, which cannot hotplug).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from balloonctl import __version__
from balloonctl.errors import CommandFailed
from balloonctl.sim import qom
from balloonctl.sim.balloon import PROPERTIES, SimBalloon
from balloonctl.sim.brokenstats import BrokenStats
from balloonctl.sim.guest import GuestSpec, SimGuest
from balloonctl.sim.qemu_versions import DEFAULT_QEMU_VERSION, QemuProfile, qemu_profile
from balloonctl.sim.qmp_server import Command, JsonObject, Param, QmpServer
from balloonctl.units import PAGE_SHIFT
from balloonctl.virtio import spec
from balloonctl.virtio.features import get_profile

log = logging.getLogger(__name__)

#: A real QEMU names its Debian package here; the sim says what it is.
PACKAGE: Final = f"balloonctl-sim {__version__}"
BALLOON_DRIVER: Final = "virtio-balloon-pci"
HOTPLUG_BUS: Final = "rp1"
ROOT_BUS: Final = "pcie.0"
#: Hot-unplug: the guest's pciehp handles the request and QEMU finalizes the device
#: (docs/real-qemu.md: DEVICE_DELETED about 0.55 s after device_del).
UNPLUG_DELAY_S: Final = 0.5
#: A hot-plugged balloon reaches DRIVER_OK ~25 ms after device_add; at boot, a few seconds.
PLUG_PROBE_S: Final = 0.025
NO_BALLOON: Final = "No balloon device has been activated"


@dataclass(frozen=True)
class VmSpec:
    """One simulated VM: ``balloonctl sim`` options."""

    name: str = "sim"
    profile: str = "seed-sg"
    guest: GuestSpec = field(default_factory=GuestSpec)
    #: Inflate/deflate speed, bytes a second.
    rate: int = 1 << 30
    #: The balloon's bus: on a pcie-root-port it can be replugged; on pcie.0 it cannot.
    hotplug: bool = True
    boot_probe_s: float = 0.2
    #: The QEMU the VM answers as ("7.2" or "10.0", ``balloonctl sim --qemu-version``): its
    #: reply texts and shapes, queue sizes, QOM properties and whether ``guest-stats`` names
    #: the six statistics of tags 10-15 (QemuProfile.extended_stats). The guest is the same
    #: Linux 6.12 either way; like QEMU, a device that does not know a tag drops it.
    qemu_version: str = DEFAULT_QEMU_VERSION
    #: A guest whose statistics are broken as some are in the field (``--broken-stats``:
    #: virtio-win, frozen, negative, absurd; :mod:`balloonctl.sim.brokenstats`), or None.
    broken_stats: str | None = None


def default_props(profile: str, *, plugged: bool = False) -> dict[str, bool]:
    """At boot, ``--profile virtio-1.2`` is ``deflate-on-oom=on,free-page-reporting=on`` (4
    queues) and ``--profile seed-sg`` ``deflate-on-oom=on,sg=on``; a device_add starts from
    the device's own defaults, as QEMU's does."""
    props = {name: default for name, (_, default) in PROPERTIES[profile].items()}
    if not plugged:
        props["deflate-on-oom"] = True
        if profile == "virtio-1.2":
            props["free-page-reporting"] = True
    return props


def _bool_property(qemu: QemuProfile, key: str, value: object) -> bool:
    """A bool property's value as device_add takes it: a JSON boolean always; on 7.2 also a
    QemuOpts string ("on"/"off"/"yes"/..., util/qemu-option.c parse_option_bool), since
    7.2 turned device_add's arguments into QemuOpts before setting them."""
    if isinstance(value, bool):
        return value
    if qemu.device_add_json_types:
        # qapi/qobject-input-visitor.c: the JSON value itself must be a boolean.
        raise CommandFailed(f"Invalid parameter type for '{key}', expected: boolean")
    if isinstance(value, str) and value in ("on", "yes", "true", "y"):
        return True
    if isinstance(value, str) and value in ("off", "no", "false", "n"):
        return False
    raise CommandFailed(f"Parameter '{key}' expects 'on' or 'off'")


class SimMachine:
    """A running simulated VM."""

    def __init__(self, spec_: VmSpec, on_quit: Callable[[SimMachine], None]) -> None:
        self.spec = spec_
        self.profile = get_profile(spec_.profile)
        #: The QEMU this VM answers as (7.2 or 10.0): every reply where the two differ.
        self.qemu = qemu_profile(spec_.qemu_version)
        self.guest = SimGuest(spec_.guest, time.monotonic)
        self.ram = spec_.guest.memory
        self._on_quit = on_quit
        self.balloon: SimBalloon | None = None
        self.qmp = QmpServer(self._commands(), self.qemu.qemu, PACKAGE)
        self._tasks: list[asyncio.Task[None]] = []
        self.running = False
        self._stopped = False
        #: The machine's buses: q35's pcie.0, and two pcie-root-ports when hotplug is on.
        self.buses: tuple[str, ...] = (
            (ROOT_BUS, HOTPLUG_BUS, "rp2") if spec_.hotplug else (ROOT_BUS,)
        )
        self._broken_stats = (
            BrokenStats(spec_.broken_stats) if spec_.broken_stats is not None else None
        )
        #: query-migrate's status (None: no migration ever, QEMU answers {}), and when the
        #: migration started (time.monotonic()).
        self.migration: str | None = None
        self._migration_started = 0.0

    # --- life cycle -----------------------------------------------------------------------
    async def start(self, qmp_path: str) -> None:
        """Boot: plug the balloon (the guest probes it shortly), start the workload, listen."""
        self.balloon = self._new_balloon(
            "balloon0",
            HOTPLUG_BUS if self.spec.hotplug else ROOT_BUS,
            default_props(self.spec.profile),
        )
        self.balloon.start(self.spec.boot_probe_s)
        self._tasks.append(asyncio.create_task(self._workload()))
        await self.qmp.start(qmp_path)
        self.running = True
        log.info("%s: serving QMP on %s", self.spec.name, qmp_path)

    async def stop(self) -> None:
        """Power off: hang up QMP, stop the tasks, release guest RAM (once)."""
        if self._stopped:
            return
        self._stopped = True
        self.running = False
        for task in self._tasks:
            task.cancel()
        if self.balloon is not None:
            self.balloon.close()
        await self.qmp.close()
        self.guest.close()

    def _new_balloon(self, dev_id: str, bus: str, props: Mapping[str, bool]) -> SimBalloon:
        return SimBalloon(
            self.guest,
            self.profile,
            dev_id=dev_id,
            bus=bus,
            props=props,
            rate=self.spec.rate,
            on_actual=self._actual_changed,
            queue_sizes=self.qemu.queue_sizes,
        )

    async def _workload(self) -> None:
        while True:
            self.guest.step()
            if self._broken_stats is not None and self.balloon is not None:
                # A frozen kind keeps the guest's *first* report: look at each one as it
                # comes (within a step), not only when a client reads guest-stats.
                qom.guest_stats(self, self.balloon)
            await asyncio.sleep(0.5)

    def _actual_changed(self, actual_pages: int) -> None:
        # virtio_balloon_set_config: BALLOON_CHANGE carries the guest's size, not the
        # balloon's, and goes through the monitor's 1 s throttle.
        self.qmp.emit("BALLOON_CHANGE", {"actual": self.ram - (actual_pages << PAGE_SHIFT)})

    # --- helpers --------------------------------------------------------------------------------
    def _need_balloon(self) -> SimBalloon:
        if self.balloon is None:
            raise CommandFailed(NO_BALLOON, error_class="DeviceNotActive")
        return self.balloon

    def _virtio_backend(self, path: str, noun: str = "a VirtIODevice") -> SimBalloon:
        # virtio.c: qmp_find_virtio_device (queue-element words it "a VirtIO device";
        # x-query-virtio-status as the QemuProfile says)
        balloon = self.balloon
        if balloon is None or path != qom.backend_path(balloon.dev_id):
            raise CommandFailed(f"Path {path} is not {noun}")
        return balloon

    # --- commands -------------------------------------------------------------------------------
    def _commands(self) -> dict[str, Command]:
        table: list[tuple[str, Any, tuple[Param, ...], bool]] = [
            ("query-balloon", self._query_balloon, (), False),
            ("balloon", self._balloon, (Param("value", "int"),), False),
            ("query-status", self._query_status, (), False),
            ("query-version", self._query_version, (), False),
            ("query-memory-size-summary", self._query_memory, (), False),
            ("qom-get", self._qom_get, (Param("path", "str"), Param("property", "str")), False),
            (
                "qom-set",
                self._qom_set,
                (Param("path", "str"), Param("property", "str"), Param("value", "any")),
                False,
            ),
            ("qom-list", self._qom_list, (Param("path", "str"),), False),
            ("x-query-virtio", self._x_query_virtio, (), False),
            ("x-query-virtio-status", self._x_virtio_status, (Param("path", "str"),), False),
            (
                "x-query-virtio-queue-status",
                self._x_queue_status,
                (Param("path", "str"), Param("queue", "uint16")),
                False,
            ),
            (
                "x-query-virtio-queue-element",
                self._x_queue_element,
                (
                    Param("path", "str"),
                    Param("queue", "uint16"),
                    Param("index", "uint16", True),
                ),
                False,
            ),
            (
                "pmemsave",
                self._pmemsave,
                (Param("val", "int"), Param("size", "int"), Param("filename", "str")),
                False,
            ),
            (
                "device-list-properties",
                self._device_list_properties,
                (Param("typename", "str"),),
                False,
            ),
            ("device_add", self._device_add, (Param("driver", "str"),), True),
            ("device_del", self._device_del, (Param("id", "str"),), False),
            ("query-migrate", self._query_migrate, (), False),
            ("migrate", self._migrate, (Param("uri", "str", True),), True),
            ("migrate_cancel", self._migrate_cancel, (), False),
            ("quit", self._quit, (), False),
        ]
        return {
            name: Command(name, handler, params, extra) for name, handler, params, extra in table
        }

    async def _query_balloon(self, args: Mapping[str, Any]) -> JsonObject:
        balloon = self._need_balloon()
        return {"actual": self.ram - (balloon.actual_pages << PAGE_SHIFT)}

    async def _balloon(self, args: Mapping[str, Any]) -> None:
        balloon = self._need_balloon()
        target = int(args["value"])
        if target <= 0:
            # qmp_balloon: "Parameter '%s' expects a size" (QERR_INVALID_PARAMETER_VALUE)
            raise CommandFailed(f"Parameter '{self.qemu.balloon_size_param}' expects a size")
        # virtio_balloon_to_target: a target above RAM means "no balloon".
        target = min(target, self.ram)
        balloon.set_target_pages((self.ram - target) >> PAGE_SHIFT)

    async def _query_status(self, args: Mapping[str, Any]) -> JsonObject:
        # StatusInfo members in schema order (the writer reorders them as QEMU does).
        if self.qemu.status_singlestep:
            return {"running": True, "singlestep": False, "status": "running"}
        return {"running": True, "status": "running"}

    async def _query_version(self, args: Mapping[str, Any]) -> JsonObject:
        return {"qemu": self.qemu.qemu, "package": PACKAGE}

    async def _query_memory(self, args: Mapping[str, Any]) -> JsonObject:
        return {"base-memory": self.ram, "plugged-memory": 0}

    async def _qom_get(self, args: Mapping[str, Any]) -> Any:
        return qom.get(self, args["path"], args["property"])

    async def _qom_set(self, args: Mapping[str, Any]) -> None:
        qom.set_(self, args["path"], args["property"], args["value"])

    async def _qom_list(self, args: Mapping[str, Any]) -> list[JsonObject]:
        return qom.list_(self, args["path"])

    async def _x_query_virtio(self, args: Mapping[str, Any]) -> list[JsonObject]:
        if self.balloon is None:
            if self.qemu.no_virtio_devices is not None:
                raise CommandFailed(self.qemu.no_virtio_devices)
            return []
        return [{"name": "virtio-balloon", "path": qom.backend_path(self.balloon.dev_id)}]

    async def _x_virtio_status(self, args: Mapping[str, Any]) -> JsonObject:
        backend = self._virtio_backend(args["path"], self.qemu.virtio_status_noun)
        return qom.virtio_status(self, backend)

    async def _x_queue_status(self, args: Mapping[str, Any]) -> JsonObject:
        return qom.queue_status(self, self._virtio_backend(args["path"]), int(args["queue"]))

    async def _x_queue_element(self, args: Mapping[str, Any]) -> JsonObject:
        return qom.queue_element(
            self._virtio_backend(args["path"], "a VirtIO device"),
            int(args["queue"]),
            args.get("index"),
        )

    async def _pmemsave(self, args: Mapping[str, Any]) -> None:
        addr, size, filename = int(args["val"]), int(args["size"]), str(args["filename"])
        if size > max(self.ram, 1 << 30):
            # QEMU would write whatever was asked; a simulated VM bounds the work a client
            # can make it do (the ring inspection needs at most the whole RAM).
            raise CommandFailed(f"the simulated VM saves at most {self.ram} bytes at a time")
        try:
            fd = os.open(filename, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        except OSError as exc:
            raise CommandFailed(f"Could not open '{filename}': {exc.strerror}") from exc
        try:
            await asyncio.to_thread(self._save, fd, addr, max(0, size))
        except OSError as exc:
            raise CommandFailed("An IO error has occurred") from exc  # QERR_IO_ERROR

    def _save(self, fd: int, addr: int, size: int) -> None:
        # cpu_physical_memory_read: addresses outside RAM read as zeros here.
        with os.fdopen(fd, "wb") as out:
            pos, end = addr, addr + size
            while pos < end:
                n = min(end - pos, 1 << 20)
                chunk = self.guest.mem.read(pos, n) if self.guest.mem.contains(pos, n) else bytes(n)
                out.write(chunk)
                pos += n

    async def _device_list_properties(self, args: Mapping[str, Any]) -> list[JsonObject]:
        return qom.device_properties(self, args["typename"])

    async def _device_add(self, args: Mapping[str, Any]) -> None:
        # qdev_device_add's order: the model, the bus and whether it hotplugs, the id, the
        # properties, then realize (where the PCI slot, on 10.0, and then the balloon refuse
        # a second instance).
        driver = args["driver"]
        if driver != BALLOON_DRIVER:
            raise CommandFailed(f"'{driver}' is not a valid device model name")
        bus = args.get("bus", ROOT_BUS)
        if bus not in self.buses:
            raise CommandFailed(f"Bus '{bus}' not found")
        if bus == ROOT_BUS:
            raise CommandFailed(f"Bus '{bus}' does not support hotplugging")
        dev_id = args.get("id")
        if not isinstance(dev_id, str) or not dev_id:
            # QEMU allows anonymous devices; balloonctl finds its balloon by id, and the sim
            # does not simulate what it could not find again.
            raise CommandFailed("the simulated VM needs an 'id' for its balloon")
        if self.balloon is not None and self.balloon.dev_id == dev_id:
            raise CommandFailed(f"Duplicate device ID '{dev_id}'")
        props = default_props(self.spec.profile, plugged=True)
        known = PROPERTIES[self.spec.profile]
        listed = qom.listed_properties(self)
        interval: int | None = None
        for key, value in args.items():
            if key in ("driver", "id", "bus"):
                continue
            if key in known:
                props[key] = _bool_property(self.qemu, key, value)
            elif key in self.qemu.read_only or key == "guest-stats":
                raise qom.not_writable(qom.device_path(dev_id), key)
            elif key == "guest-stats-polling-interval":
                interval = qom.poll_interval(value)
            elif key in listed:
                # Accepted as QEMU would take it, but not modelled: the sim's balloon sits in
                # slot 0 of its bus whatever ``addr`` says, with QEMU's other defaults.
                if listed[key].type == "bool":
                    _bool_property(self.qemu, key, value)
            else:
                raise CommandFailed(f"Property '{BALLOON_DRIVER}.{key}' not found")
        occupant = self.balloon
        if occupant is not None and occupant.bus == bus and self.qemu.pci_slot_checked_first:
            # hw/pci/pci.c do_pci_register_device: a root port has one slot, and it is taken.
            raise CommandFailed(
                f"PCI: slot 0 function 0 already occupied by {BALLOON_DRIVER}, "
                f"new func {driver} cannot be exposed to guest."
            )
        if occupant is not None:
            raise CommandFailed("Only one balloon device is supported")
        balloon = self._new_balloon(dev_id, bus, props)
        balloon.hotplugged = True
        self.balloon = balloon
        balloon.start(PLUG_PROBE_S)
        if interval:
            balloon.set_poll_interval(interval)

    async def _device_del(self, args: Mapping[str, Any]) -> None:
        dev_id = args["id"]
        balloon = self.balloon
        if balloon is None or balloon.dev_id != dev_id:
            raise CommandFailed(f"Device '{dev_id}' not found", error_class="DeviceNotFound")
        if balloon.bus == ROOT_BUS:
            raise CommandFailed(f"Bus '{ROOT_BUS}' does not support hotplugging")
        if balloon.unplugging:
            return  # QEMU (7.2 and 10.0) repeats the request and answers {} again
        balloon.unplugging = True
        self._tasks = [task for task in self._tasks if not task.done()]
        self._tasks.append(asyncio.create_task(self._unplug_later(balloon)))

    async def _unplug_later(self, balloon: SimBalloon) -> None:
        await asyncio.sleep(UNPLUG_DELAY_S)
        balloon.remove_driver()
        balloon.close()
        if self.balloon is balloon:
            self.balloon = None
        # QEMU sends one DEVICE_DELETED for the virtio backend (no id), then the proxy's.
        self.qmp.emit("DEVICE_DELETED", {"path": qom.backend_path(balloon.dev_id)})
        self.qmp.emit(
            "DEVICE_DELETED",
            {"device": balloon.dev_id, "path": qom.device_path(balloon.dev_id)},
        )

    # --- migration: started and cancelled, never completed (there is no destination) -------
    async def _query_migrate(self, args: Mapping[str, Any]) -> JsonObject:
        # qmp_query_migrate: {} before any migration; then status and, while it runs, times.
        if self.migration is None:
            return {}
        info: JsonObject = {"status": self.migration}
        if self.migration == "active":
            elapsed_ms = int((time.monotonic() - self._migration_started) * 1000)
            info.update({"total-time": elapsed_ms, "setup-time": 0, "expected-downtime": 300})
        return info

    async def _migrate(self, args: Mapping[str, Any]) -> None:
        # migrate_prepare: one migration at a time (QERR_MIGRATION_ACTIVE's text).
        if self.migration == "active":
            raise CommandFailed("There's a migration process in progress")
        self.migration = "active"
        self._migration_started = time.monotonic()

    async def _migrate_cancel(self, args: Mapping[str, Any]) -> None:
        # qmp_migrate_cancel: cancels a migration in flight, else does nothing.
        if self.migration == "active":
            self.migration = "cancelled"

    async def _quit(self, args: Mapping[str, Any]) -> None:
        # QEMU sends SHUTDOWN before quit's reply (transcripts/qemu-*/quit.json), then
        # exits and the socket closes.
        self.qmp.emit("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
        self.qmp.shut_down()
        asyncio.get_running_loop().call_soon(self._on_quit, self)

    # --- for qom.py -------------------------------------------------------------------------------
    @property
    def broken_stats(self) -> BrokenStats | None:
        """How the guest's statistics are broken (``--broken-stats``), None if they are not."""
        return self._broken_stats

    @property
    def stat_names(self) -> tuple[str, ...]:
        """balloon_stat_names, in tag order: QEMU 7.2's ten (VIRTIO_BALLOON_S_NR = 10), or
        QEMU 9.2+'s sixteen (QemuProfile.extended_stats)."""
        tags = spec.CLASSIC_STAT_TAGS
        if self.qemu.extended_stats:
            tags += spec.EXTENDED_STAT_TAGS
        return tuple(f"stat-{spec.STAT_NAMES[tag]}" for tag in tags)
