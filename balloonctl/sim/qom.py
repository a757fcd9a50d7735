"""The slice of QEMU's object model (QOM) and virtio introspection the simulated VM shows.

``qom-get``/``qom-set``/``qom-list`` on the balloon and its bus, and the ``x-query-virtio*``
replies, built from the device and driver models' state in QEMU 7.2's shapes
(``hw/virtio/virtio-qmp.c`` in later trees, ``hw/virtio/virtio.c`` in 7.2). Error texts are
QEMU's (``qom/qom-qmp-cmds.c``, ``qom/object.c``, ``hw/virtio/virtio-balloon.c``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from balloonctl.errors import CommandFailed
from balloonctl.sim.balloon import PROPERTIES, SimBalloon
from balloonctl.sim.qmp_server import JsonObject
from balloonctl.virtio import spec
from balloonctl.virtio.features import FeatureBit, Profile
from balloonctl.virtio.spec import BalloonQueue

if TYPE_CHECKING:
    from balloonctl.sim.machine import SimMachine

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
#: Transport feature strings in the order QEMU 7.2 lists them (virtio_transport_map).
_TRANSPORT_ORDER: Final = (
    "ring-event-idx",
    "ring-indirect-desc",
    "version-1",
    "any-layout",
    "notify-on-empty",
)
#: qom-list of a virtio-balloon-pci in QEMU 7.2, as recorded (fixtures/transcripts/qemu-7.2/
#: introspect.json); the seed-sg device adds its "sg" property.
_PCI_PROPERTIES: Final = (
    ("type", "string"),
    ("parent_bus", "link<bus>"),
    ("realized", "bool"),
    ("hotplugged", "bool"),
    ("hotpluggable", "bool"),
    ("failover_pair_id", "str"),
    ("romfile", "str"),
    ("addr", "int32"),
    ("romsize", "uint32"),
    ("x-pcie-lnksta-dllla", "bool"),
    ("rombar", "uint32"),
    ("x-pcie-extcap-init", "bool"),
    ("acpi-index", "uint32"),
    ("multifunction", "bool"),
    ("legacy-addr", "str"),
    ("migrate-extra", "bool"),
    ("ats", "bool"),
    ("x-ignore-backend-features", "bool"),
    ("x-pcie-pm-init", "bool"),
    ("aer", "bool"),
    ("x-pcie-flr-init", "bool"),
    ("x-pcie-lnkctl-init", "bool"),
    ("x-ats-page-aligned", "bool"),
    ("page-per-vq", "bool"),
    ("x-pcie-deverr-init", "bool"),
    ("virtio-pci-bus-master-bug-migration", "bool"),
    ("modern-pio-notify", "bool"),
    ("x-disable-pcie", "bool"),
    ("disable-legacy", "OnOffAuto"),
    ("disable-modern", "bool"),
    ("free-page-reporting", "bool"),
    ("indirect_desc", "bool"),
    ("virtio-pci-device-virtio-balloon[0]", "child<memory-region>"),
    ("iommu_platform", "bool"),
    ("deflate-on-oom", "bool"),
    ("use-disabled-flag", "bool"),
    ("event_idx", "bool"),
    ("bus master container[0]", "child<memory-region>"),
    ("page-poison", "bool"),
    ("guest-stats-polling-interval", "int"),
    ("guest-stats", "guest statistics"),
    ("x-disable-legacy-check", "bool"),
    ("any_layout", "bool"),
    ("iothread", "link<iothread>"),
    ("notify_on_empty", "bool"),
    ("virtio-pci-notify-virtio-balloon[0]", "child<memory-region>"),
    ("queue_reset", "bool"),
    ("qemu-4-0-config-size", "bool"),
    ("packed", "bool"),
    ("use-started", "bool"),
    ("free-page-hint", "bool"),
    ("virtio-pci[1]", "child<memory-region>"),
    ("virtio-pci-notify-pio-virtio-balloon[0]", "child<memory-region>"),
    ("virtio-pci-common-virtio-balloon[0]", "child<memory-region>"),
    ("virtio-pci[0]", "child<memory-region>"),
    ("virtio-pci-isr-virtio-balloon[0]", "child<memory-region>"),
    ("bus master[0]", "child<memory-region>"),
    ("virtio-bus", "child<virtio-pci-bus>"),
    ("virtio-backend", "child<virtio-balloon-device>"),
)
#: Plain values of other properties a client may read back to re-add the device.
_FIXED_VALUES: Final[dict[str, Any]] = {
    "multifunction": False,
    "disable-legacy": "off",
    "disable-modern": False,
    "iothread": "",
    "packed": False,
    "iommu_platform": False,
    "failover_pair_id": "",
    "romfile": "",
    "queue_reset": True,
    "use-started": True,
    "ats": False,
    "aer": False,
}


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


def _balloon_at(machine: SimMachine, path: str) -> SimBalloon | None:
    balloon = machine.balloon
    if balloon is not None and path in (device_path(balloon.dev_id), backend_path(balloon.dev_id)):
        return balloon
    return None


# --- qom-get / qom-set / qom-list ---------------------------------------------------------------
def get(machine: SimMachine, path: str, prop: str) -> Any:
    """qmp_qom_get for the balloon, its backend and the two buses."""
    balloon = _balloon_at(machine, path)
    if balloon is not None:
        return _balloon_get(machine, balloon, path, prop)
    for bus in machine.buses:
        if path == bus_path(bus):
            return _bus_get(bus, prop)
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


def _balloon_get(machine: SimMachine, balloon: SimBalloon, path: str, prop: str) -> Any:
    if prop == "guest-stats":
        return _guest_stats(machine, balloon)
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
    if prop == "addr":
        # devfn: slot 1 on pcie.0 (after the host bridge), slot 0 behind a root port.
        return 8 if balloon.bus == "pcie.0" else 0
    if not path.endswith("/virtio-backend") and prop in _FIXED_VALUES:
        return _FIXED_VALUES[prop]
    if prop == "parent_bus":
        if path.endswith("/virtio-backend"):
            return f"{device_path(balloon.dev_id)}/virtio-bus"
        return bus_path(balloon.bus)
    if prop in PROPERTIES[balloon.profile.name]:
        _, default = PROPERTIES[balloon.profile.name][prop]
        return balloon.props.get(prop, default)
    raise CommandFailed(f"Property '{_type_name(path)}.{prop}' not found")


def _bus_get(bus: str, prop: str) -> Any:
    if prop == "type":
        return "PCIE"
    if prop == "realized":
        return True
    if prop == "hotplug-handler":
        # q35's pcie.0 has no hotplug handler; a root port's bus is handled by ACPI PCI
        # hotplug in the ICH9 LPC bridge (QEMU 7.2's q35 default).
        return "" if bus == "pcie.0" else LPC_PATH
    if prop == "acpi-pcihp-bsel" and bus != "pcie.0":
        return 1 + ("rp1", "rp2").index(bus)
    raise CommandFailed(f"Property 'PCIE.{prop}' not found")


def set_(machine: SimMachine, path: str, prop: str, value: object) -> None:
    """qmp_qom_set: only the stats polling interval is writable in the sim."""
    balloon = _balloon_at(machine, path)
    if balloon is None:
        raise _not_found(path)
    if prop != "guest-stats-polling-interval":
        _balloon_get(machine, balloon, path, prop)  # unknown property: QEMU's error
        # guest-stats is an alias of the backend's property: QEMU names the backend's type.
        owner = "virtio-balloon-device" if prop == "guest-stats" else _type_name(path)
        raise CommandFailed(f"Property '{owner}.{prop}' is not writable")
    if not isinstance(value, int) or isinstance(value, bool):
        raise CommandFailed(
            "Invalid parameter type for 'guest-stats-polling-interval', expected: integer"
        )
    # balloon_stats_set_poll_interval
    if value < 0:
        raise CommandFailed("timer value must be greater than zero")
    if value > UINT32_MAX:
        raise CommandFailed("timer value is too big")
    balloon.set_poll_interval(value)


def list_(machine: SimMachine, path: str) -> list[JsonObject]:
    """qmp_qom_list: the properties balloonctl and QEMU users look at."""
    balloon = _balloon_at(machine, path)
    if balloon is not None:
        props = [{"name": name, "type": kind} for name, kind in _PCI_PROPERTIES]
        if "sg" in PROPERTIES[balloon.profile.name]:
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


def _guest_stats(machine: SimMachine, balloon: SimBalloon) -> JsonObject:
    # balloon_stats_get_all: every name, -1 for what the guest did not send (the device
    # keeps u64 -1 and QEMU prints it signed).
    last_update, values = balloon.stats()
    stats = {name: values.get(tag, -1) for tag, name in enumerate(machine.stat_names)}
    return {"stats": stats, "last-update": last_update}


# --- x-query-virtio-status and friends ---------------------------------------------------------
def _feature_strings(profile: Profile, mask: int) -> JsonObject:
    """qmp_decode_features: transports in QEMU's map order, device bits highest first,
    what QEMU has no string for as ``unknown-dev-features`` (present only when non-zero)."""
    by_name = {bit.name: bit for bit in profile.bits}
    transports = [
        _describe(by_name[name])
        for name in _TRANSPORT_ORDER
        if name in by_name and mask & by_name[name].mask
    ]
    device = [
        _describe(bit)
        for bit in sorted(profile.device_features, key=lambda b: -b.bit)
        if mask & bit.mask
    ]
    known = sum(by_name[n].mask for n in _TRANSPORT_ORDER if n in by_name) | sum(
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


def virtio_status(machine: SimMachine, balloon: SimBalloon) -> JsonObject:
    """x-query-virtio-status on the balloon's backend."""
    device = balloon.device
    return {
        "name": "virtio-balloon",
        "device-id": VIRTIO_ID_BALLOON,
        "vhost-started": False,
        "device-endian": "little",
        "guest-features": _feature_strings(balloon.profile, device.acked),
        "host-features": _feature_strings(balloon.profile, device.offered),
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


def queue_status(balloon: SimBalloon, index: int) -> JsonObject:
    """x-query-virtio-queue-status: where the rings are and how far each side got."""
    _, queue = _queue(balloon, index)
    return {
        "name": "virtio-balloon",
        "queue-index": index,
        "inuse": queue.in_flight,
        "vring-num": queue.size,
        "vring-num-default": queue.size,
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
    """A feature as QEMU 7.2 prints it."""
    return f"{bit.macro}: {bit.description}"
