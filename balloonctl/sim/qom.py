"""The slice of QEMU's object model (QOM) and virtio introspection the simulated VM shows.

``qom-get``/``qom-set``/``qom-list`` on the balloon and its bus, ``device-list-properties``
of the balloon, and the ``x-query-virtio*`` replies, built from the device and driver
models' state in the shapes of the QEMU the VM answers as (``machine.qemu``, a
:class:`~balloonctl.sim.qemu_versions.QemuProfile`; ``hw/virtio/virtio-qmp.c`` in later
trees, ``hw/virtio/virtio.c`` in 7.2). Error texts are QEMU's (``qom/qom-qmp-cmds.c``,
``qom/object.c``, ``hw/virtio/virtio-balloon.c``).
"""

from __future__ import annotations

from typing import Any, Final, Protocol

from balloonctl.errors import CommandFailed
from balloonctl.sim.balloon import PROPERTIES, SimBalloon
from balloonctl.sim.brokenstats import BrokenStats
from balloonctl.sim.qemu_props import NO_DEFAULT, PropInfo, Scalar
from balloonctl.sim.qemu_versions import QemuProfile
from balloonctl.sim.qmp_server import JsonObject
from balloonctl.virtio import spec
from balloonctl.virtio.features import FeatureBit, Profile
from balloonctl.virtio.spec import BalloonQueue

PERIPHERAL: Final = "/machine/peripheral"
ROOT_BUS_PATH: Final = "/machine/q35/pcie.0"
VIRTIO_ID_BALLOON: Final = 5
UINT32_MAX: Final = (1 << 32) - 1

#: virtio_config_status_map, in the order QEMU 7.2 lists set bits (x-query-virtio-status).
_STATUS_NAMES: Final = (
    (spec.DeviceStatus.ACKNOWLEDGE, "VIRTIO_CONFIG_S_ACKNOWLEDGE: Valid virtio device found"),
    (spec.DeviceStatus.DRIVER, "VIRTIO_CONFIG_S_DRIVER: Guest OS compatible with device"),
    (spec.DeviceStatus.FEATURES_OK, "VIRTIO_CONFIG_S_FEATURES_OK: Feature negotiation complete"),
    (spec.DeviceStatus.DRIVER_OK, "VIRTIO_CONFIG_S_DRIVER_OK: Driver setup and ready"),
    (
        spec.DeviceStatus.NEEDS_RESET,
        "VIRTIO_CONFIG_S_NEEDS_RESET: Irrecoverable error, device needs reset",
    ),
    (spec.DeviceStatus.FAILED, "VIRTIO_CONFIG_S_FAILED: Error in guest, device failed"),
)
#: Feature properties only one profile's device has (virtio 1.2's bits 3-5 and RING_RESET,
#: the seed's SG): the others leave them out of qom-list and device-list-properties.
_PROFILE_PROPERTIES: Final = frozenset(name for props in PROPERTIES.values() for name in props)
#: How the seed-sg device lists its ``sg`` property (a DEFINE_PROP_BIT, like its siblings).
_SG_PROPERTY: Final = PropInfo("sg", "bool", True, "on/off")


class MachineView(Protocol):
    """What this module reads of the simulated VM (:class:`balloonctl.sim.machine.SimMachine`).

    A protocol, not an import: the machine dispatches QMP to this module, so importing the
    machine here would close a circle (machine -> qom -> machine). Read-only, since QOM only
    shows the machine's state; ``qom-set`` goes to the balloon.
    """

    @property
    def balloon(self) -> SimBalloon | None:
        """The plugged balloon, if any."""

    @property
    def buses(self) -> tuple[str, ...]:
        """The machine's buses, pcie.0 first."""

    @property
    def profile(self) -> Profile:
        """The balloon's device profile (virtio-1.2 or seed-sg)."""

    @property
    def qemu(self) -> QemuProfile:
        """The QEMU the VM answers as."""

    @property
    def stat_names(self) -> tuple[str, ...]:
        """``guest-stats`` names in tag order."""

    @property
    def broken_stats(self) -> BrokenStats | None:
        """How the guest's statistics are broken (``--broken-stats``), None if they are not."""


def device_path(dev_id: str) -> str:
    """The balloon proxy (virtio-balloon-pci) in QOM."""
    return f"{PERIPHERAL}/{dev_id}"


def backend_path(dev_id: str) -> str:
    """The virtio device behind the proxy: what x-query-virtio names."""
    return f"{device_path(dev_id)}/virtio-backend"


def bus_path(bus: str) -> str:
    """A bus by name: pcie.0 is the q35 host bridge's, rp1 the root port's own bus."""
    return ROOT_BUS_PATH if bus == "pcie.0" else f"{PERIPHERAL}/{bus}/{bus}"


def _not_found(path: str) -> CommandFailed:
    return CommandFailed(f"Device '{path}' not found", error_class="DeviceNotFound")


LPC_PATH: Final = "/machine/unattached/device[2]"


def not_writable(path: str, prop: str) -> CommandFailed:
    """qom/object.c object_property_set: a property with a getter and no setter."""
    # guest-stats is an alias of the backend's property: QEMU names the backend's type.
    owner = "virtio-balloon-device" if prop == "guest-stats" else _type_name(path)
    return CommandFailed(f"Property '{owner}.{prop}' is not writable")


def poll_interval(value: object) -> int:
    """balloon_stats_set_poll_interval's checks of a guest-stats-polling-interval value."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise CommandFailed(
            "Invalid parameter type for 'guest-stats-polling-interval', expected: integer"
        )
    if value < 0:
        raise CommandFailed("timer value must be greater than zero")
    if value > UINT32_MAX:
        raise CommandFailed("timer value is too big")
    return value


def listed_properties(machine: MachineView) -> dict[str, PropInfo]:
    """device-list-properties of the balloon this VM's profile plugs, by name, in order."""
    listing = {
        info.name: info
        for info in machine.qemu.device_properties
        if info.name not in _PROFILE_PROPERTIES or info.name in PROPERTIES[machine.profile.name]
    }
    if "sg" in PROPERTIES[machine.profile.name]:
        listing["sg"] = _SG_PROPERTY
    return listing


def device_properties(machine: MachineView, typename: str) -> list[JsonObject]:
    """qmp_device_list_properties (qom/qom-qmp-cmds.c) for the balloon's driver."""
    if typename != "virtio-balloon-pci":
        # The sim knows no other device type (QEMU would list a real one's properties).
        raise CommandFailed(f"Device '{typename}' not found", error_class="DeviceNotFound")
    out: list[JsonObject] = []
    for info in listed_properties(machine).values():
        # ObjectPropertyInfo members in schema order; the writer gives them QEMU's order.
        item: JsonObject = {"name": info.name, "type": info.type}
        if info.description is not None:
            item["description"] = info.description
        if info.default is not NO_DEFAULT:
            item["default-value"] = info.default
        out.append(item)
    return out


def _balloon_at(machine: MachineView, path: str) -> SimBalloon | None:
    balloon = machine.balloon
    if balloon is not None and path in (device_path(balloon.dev_id), backend_path(balloon.dev_id)):
        return balloon
    return None


# --- qom-get / qom-set / qom-list ---------------------------------------------------------------
def get(machine: MachineView, path: str, prop: str) -> Any:
    """qmp_qom_get for the balloon, its backend and the two buses."""
    balloon = _balloon_at(machine, path)
    if balloon is not None:
        return _balloon_get(machine, balloon, path, prop)
    for bus in machine.buses:
        if path == bus_path(bus):
            return _bus_get(machine, bus, prop)
        if bus != "pcie.0" and path == f"{PERIPHERAL}/{bus}":
            return _port_get(bus, prop)
    if path == LPC_PATH:
        if prop == "type":
            return "ICH9-LPC"
        raise CommandFailed(f"Property 'ICH9-LPC.{prop}' not found")
    if path == PERIPHERAL and prop == "type":
        return "container"
    raise _not_found(path)


def _port_get(bus: str, prop: str) -> Any:
    if prop == "type":
        return "pcie-root-port"
    if prop == "parent_bus":
        return ROOT_BUS_PATH
    if prop == "realized":
        return True
    raise CommandFailed(f"Property 'pcie-root-port.{prop}' not found")


def _type_name(path: str) -> str:
    return "virtio-balloon-device" if path.endswith("/virtio-backend") else "virtio-balloon-pci"


def _balloon_get(machine: MachineView, balloon: SimBalloon, path: str, prop: str) -> Any:
    if prop == "guest-stats":
        return guest_stats(machine, balloon)
    if prop == "guest-stats-polling-interval":
        return balloon.poll_interval
    if prop == "type":
        return _type_name(path)
    if prop == "realized":
        return True
    if prop == "hotpluggable":
        # qdev's "hotpluggable": the device class allows it and its bus can hotplug.
        return balloon.bus != "pcie.0"
    if prop == "hotplugged":
        return balloon.hotplugged
    if prop == "parent_bus":
        if path.endswith("/virtio-backend"):
            return f"{device_path(balloon.dev_id)}/virtio-bus"
        return bus_path(balloon.bus)
    if prop in PROPERTIES[balloon.profile.name]:
        _, default = PROPERTIES[balloon.profile.name][prop]
        return balloon.props.get(prop, default)
    listed = listed_properties(machine)
    if path.endswith("/virtio-backend") or prop not in listed:
        raise CommandFailed(f"Property '{_type_name(path)}.{prop}' not found")
    return _pci_value(machine, balloon, listed[prop])


def _pci_value(machine: MachineView, balloon: SimBalloon, info: PropInfo) -> Scalar:
    """What qom-get reads of a listed property the sim does not model: where the balloon
    sits decides ``addr``, ``busnr`` and ``disable-legacy``; the rest is QEMU's default or,
    where realize changes it, what the recording read (QemuProfile.live_values)."""
    on_root = balloon.bus == "pcie.0"
    if info.name == "addr":
        # devfn: slot 1 on pcie.0 (after the host bridge), slot 0 behind a root port.
        return 8 if on_root else 0
    if info.name == "busnr":
        # hw/pci/pci.c prop_pci_busnr_get: the bus number the guest gave the balloon's bus
        # (0 for pcie.0; the guest numbered rp1's secondary bus 1, qemu-10.0/properties.json).
        return 0 if on_root else 1 + machine.buses[1:].index(balloon.bus)
    if info.name == "disable-legacy":
        # hw/virtio/virtio-pci.c virtio_pci_realize: "auto" is legacy off behind a PCIe port
        # and on a root bus (qemu-*/properties.json "on", qemu-7.2/introspect.json "off").
        return "off" if on_root else "on"
    if info.name in machine.qemu.live_values:
        return machine.qemu.live_values[info.name]
    if info.default is not NO_DEFAULT:
        return info.default
    return ""  # an unset string or link reads as "" (qom/object.c)


def _bus_get(machine: MachineView, bus: str, prop: str) -> Any:
    if prop == "type":
        return "PCIE"
    if prop == "realized":
        return True
    if prop == "hotplug-handler":
        # A root port's bus is handled by ACPI PCI hotplug in the ICH9 LPC bridge (q35's
        # default); q35's pcie.0 has no handler on 7.2 and the same LPC on 10.0, which
        # still refuses hotplug there (QemuProfile.root_bus_hotplug_handler).
        if bus == "pcie.0" and not machine.qemu.root_bus_hotplug_handler:
            return ""
        return LPC_PATH
    if prop == "acpi-pcihp-bsel" and bus != "pcie.0":
        return 1 + ("rp1", "rp2").index(bus)
    raise CommandFailed(f"Property 'PCIE.{prop}' not found")


def set_(machine: MachineView, path: str, prop: str, value: object) -> None:
    """qmp_qom_set: only the stats polling interval is writable in the sim."""
    balloon = _balloon_at(machine, path)
    if balloon is None:
        raise _not_found(path)
    if prop != "guest-stats-polling-interval":
        _balloon_get(machine, balloon, path, prop)  # unknown property: QEMU's error
        raise not_writable(path, prop)
    balloon.set_poll_interval(poll_interval(value))


def list_(machine: MachineView, path: str) -> list[JsonObject]:
    """qmp_qom_list: the properties balloonctl and QEMU users look at."""
    balloon = _balloon_at(machine, path)
    if balloon is not None:
        own = PROPERTIES[balloon.profile.name]
        props: list[JsonObject] = [
            {"name": name, "type": kind}
            for name, kind in machine.qemu.qom_list
            if name not in _PROFILE_PROPERTIES or name in own
        ]
        if "sg" in own:
            props.insert(-3, {"name": "sg", "type": "bool"})
        return props
    if path == PERIPHERAL:
        children = [{"name": "type", "type": "string"}]
        children += [{"name": bus, "type": "child<pcie-root-port>"} for bus in machine.buses[1:]]
        if machine.balloon is not None:
            children.append({"name": machine.balloon.dev_id, "type": "child<virtio-balloon-pci>"})
        return children
    for bus in machine.buses:
        if path == bus_path(bus):
            props = [{"name": "type", "type": "string"}, {"name": "realized", "type": "bool"}]
            if bus != "pcie.0":
                props.append({"name": "acpi-pcihp-bsel", "type": "uint32"})
            if machine.balloon is not None and machine.balloon.bus == bus:
                props.append({"name": "child[0]", "type": "link<virtio-balloon-pci>"})
            props.append({"name": "hotplug-handler", "type": "link<hotplug-handler>"})
            return props
    raise _not_found(path)


def guest_stats(machine: MachineView, balloon: SimBalloon) -> JsonObject:
    """``guest-stats`` as QEMU shows it (through ``--broken-stats``, if the guest's are)."""
    # balloon_stats_get_all: every name, -1 for what the guest did not send (the device
    # keeps u64 -1 and QEMU prints it signed).
    last_update, values = balloon.stats()
    stats = {name: values.get(tag, -1) for tag, name in enumerate(machine.stat_names)}
    broken = machine.broken_stats
    if broken is not None:
        last_update, stats = broken.show(last_update, stats)
    return {"stats": stats, "last-update": last_update}


# --- x-query-virtio-status and friends ---------------------------------------------------------
def _feature_strings(profile: Profile, mask: int, transport_order: tuple[str, ...]) -> JsonObject:
    """qmp_decode_features: transports in QEMU's order (``transport_order``, the version's
    map reversed), device bits highest first, what QEMU has no string for as
    ``unknown-dev-features`` (present only when non-zero)."""
    by_name = {bit.name: bit for bit in profile.bits}
    transports = [
        _describe(by_name[name])
        for name in transport_order
        if name in by_name and mask & by_name[name].mask
    ]
    device = [
        _describe(bit)
        for bit in sorted(profile.device_features, key=lambda b: -b.bit)
        if mask & bit.mask
    ]
    known = sum(by_name[n].mask for n in transport_order if n in by_name) | sum(
        bit.mask for bit in profile.device_features
    )
    out: JsonObject = {"transports": transports, "dev-features": device}
    if mask & ~known:
        out["unknown-dev-features"] = mask & ~known
    return out


def _statuses(status: int) -> JsonObject:
    # The driver model sets FEATURES_OK and DRIVER_OK; a Linux driver has set ACKNOWLEDGE and
    # DRIVER before them (3.1.1), so a device past feature negotiation shows all four.
    if status & (spec.DeviceStatus.FEATURES_OK | spec.DeviceStatus.DRIVER_OK):
        status |= spec.DeviceStatus.ACKNOWLEDGE | spec.DeviceStatus.DRIVER
    return {"statuses": [text for flag, text in _STATUS_NAMES if status & flag]}


def virtio_status(machine: MachineView, balloon: SimBalloon) -> JsonObject:
    """x-query-virtio-status on the balloon's backend."""
    device = balloon.device
    order = machine.qemu.transport_order
    return {
        "name": "virtio-balloon",
        "device-id": VIRTIO_ID_BALLOON,
        "vhost-started": False,
        "device-endian": "little",
        "guest-features": _feature_strings(balloon.profile, device.acked, order),
        "host-features": _feature_strings(balloon.profile, device.offered, order),
        "backend-features": {"transports": [], "dev-features": []},  # no vhost backend
        "num-vqs": len(device.queue_roles) if device.acked else _max_queues(balloon),
        "status": _statuses(device.status),
        "isr": 0,
        "queue-sel": max(0, len(device.queues) - 1),
        "vm-running": True,
        "broken": device.broken is not None,
        "disabled": False,
        "use-started": True,
        "started": bool(device.status & spec.DeviceStatus.DRIVER_OK),
        "start-on-kick": False,
        "disable-legacy-check": False,
        "bus-name": "",
        "use-guest-notifier-mask": True,
    }


def _max_queues(balloon: SimBalloon) -> int:
    # QEMU creates the queues at realize: inflate, deflate, stats, and one per optional
    # feature offered (free page hint, reporting).
    offered = balloon.device.offered
    extra = sum(
        1
        for name in ("free-page-hint", "page-reporting")
        if any(b.name == name for b in balloon.profile.bits) and balloon.profile.has(offered, name)
    )
    return 3 + extra


def _queue(balloon: SimBalloon, index: int) -> tuple[BalloonQueue, Any]:
    roles = balloon.device.queue_roles
    if not 0 <= index < len(roles) or roles[index] not in balloon.device.queues:
        raise CommandFailed(f"Invalid virtqueue number {index}")
    role = roles[index]
    return role, balloon.device.queues[role]


def queue_status(machine: MachineView, balloon: SimBalloon, index: int) -> JsonObject:
    """x-query-virtio-queue-status: where the rings are and how far each side got.

    ``vring-num-default`` is the size the device created the queue with (the QEMU
    version's), ``vring-num`` the size the driver set up (Linux takes the default)."""
    role, queue = _queue(balloon, index)
    return {
        "name": "virtio-balloon",
        "queue-index": index,
        "inuse": queue.in_flight,
        "vring-num": queue.size,
        "vring-num-default": machine.qemu.queue_sizes[role],
        "vring-align": 4096,
        "vring-desc": queue.desc,
        "vring-avail": queue.avail,
        "vring-used": queue.used,
        "last-avail-idx": queue.last_avail_idx,
        "shadow-avail-idx": queue.avail_idx(),
        "used-idx": queue.next_used,
        "signalled-used": queue.next_used,
        "signalled-used-valid": queue.event_idx and queue.next_used > 0,
    }


_FLAG_NAMES: Final = ((1, "next"), (2, "write"), (4, "indirect"))


def queue_element(balloon: SimBalloon, index: int, element: int | None) -> JsonObject:
    """x-query-virtio-queue-element: the chain an avail entry names, without consuming it."""
    _, queue = _queue(balloon, index)
    mem = queue.mem
    avail_idx = queue.avail_idx()
    # QEMU 7.2 reads avail.ring[index % num] (index defaults to last_avail_idx) and shows
    # the chain that slot names, whether or not the driver has made it available.
    if element is None:
        slot = queue.last_avail_idx
    else:
        if not 0 <= element <= 0xFFFF:
            raise CommandFailed("Parameter 'index' expects uint16_t")
        slot = element
    head = mem.read_u16(queue.avail + spec.AVAIL_RING_OFF + 2 * (slot % queue.size))
    if head >= queue.size:
        raise CommandFailed(f"Invalid descriptor head {head}")
    descs: list[JsonObject] = []
    i = head
    for _ in range(queue.size):
        raw = mem.read(queue.desc + i * spec.DESC_SIZE, spec.DESC_SIZE)
        addr = int.from_bytes(raw[0:8], "little")
        length = int.from_bytes(raw[8:12], "little")
        flags = int.from_bytes(raw[12:14], "little")
        nxt = int.from_bytes(raw[14:16], "little")
        descs.append(
            {
                "addr": addr,
                "len": length,
                "flags": [name for bit, name in _FLAG_NAMES if flags & bit],
            }
        )
        if not flags & 1 or nxt >= queue.size:
            break
        i = nxt
    return {
        "name": "virtio-balloon",
        "index": head,
        "descs": descs,
        "avail": {"flags": mem.read_u16(queue.avail), "idx": avail_idx, "ring": head},
        "used": {"flags": mem.read_u16(queue.used), "idx": mem.read_u16(queue.used + 2)},
    }


def _describe(bit: FeatureBit) -> str:
    """A feature as QEMU prints it ("MACRO: description", 7.2 and 10.0 alike)."""
    return f"{bit.macro}: {bit.description}"
