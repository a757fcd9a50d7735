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

#: virtio_config_status_map, in QEMU's order.
_STATUS_NAMES: Final = (
    (spec.DeviceStatus.DRIVER_OK, "VIRTIO_CONFIG_S_DRIVER_OK: Driver setup and ready"),
    (spec.DeviceStatus.FEATURES_OK, "VIRTIO_CONFIG_S_FEATURES_OK: Feature negotiation complete"),
    (spec.DeviceStatus.DRIVER, "VIRTIO_CONFIG_S_DRIVER: Guest OS compatible with device"),
    (spec.DeviceStatus.NEEDS_RESET, "VIRTIO_CONFIG_S_NEEDS_RESET: Irrecoverable error, device needs reset"),
    (spec.DeviceStatus.FAILED, "VIRTIO_CONFIG_S_FAILED: Error in guest, device failed"),
    (spec.DeviceStatus.ACKNOWLEDGE, "VIRTIO_CONFIG_S_ACKNOWLEDGE: Valid virtio device found"),
)


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
    for bus in ("pcie.0", "rp1"):
        if path == bus_path(bus) and (bus == "pcie.0" or machine.spec.hotplug):
            return _bus_get(bus, prop)
    raise _not_found(path)


def _type_name(balloon: SimBalloon, path: str) -> str:
    return "virtio-balloon-device" if path.endswith("/virtio-backend") else "virtio-balloon-pci"


def _balloon_get(machine: SimMachine, balloon: SimBalloon, path: str, prop: str) -> Any:
    if prop == "guest-stats":
        return _guest_stats(machine, balloon)
    if prop == "guest-stats-polling-interval":
        return balloon.poll_interval
    if prop == "type":
        return _type_name(balloon, path)
    if prop == "realized":
        return True
    if prop == "parent_bus":
        if path.endswith("/virtio-backend"):
            return f"{device_path(balloon.dev_id)}/virtio-bus"
        return bus_path(balloon.bus)
    if prop in PROPERTIES[balloon.profile.name]:
        feature, default = PROPERTIES[balloon.profile.name][prop]
        return balloon.props.get(prop, default)
    raise CommandFailed(f"Property '{_type_name(balloon, path)}.{prop}' not found")


def _bus_get(bus: str, prop: str) -> Any:
    if prop == "type":
        return "PCIE"
    if prop == "realized":
        return True
    if prop == "hotplug-handler":
        # pcie.0 on q35 has no hotplug handler; a root port's bus is handled by the port.
        return "" if bus == "pcie.0" else f"{PERIPHERAL}/{bus}"
    raise CommandFailed(f"Property 'PCIE.{prop}' not found")


def set_(machine: SimMachine, path: str, prop: str, value: object) -> None:
    """qmp_qom_set: only the stats polling interval is writable in the sim."""
    balloon = _balloon_at(machine, path)
    if balloon is None:
        raise _not_found(path)
    if prop != "guest-stats-polling-interval":
        _balloon_get(machine, balloon, path, prop)  # unknown property: QEMU's error
        raise CommandFailed(f"Property '{_type_name(balloon, path)}.{prop}' is not writable")
    if not isinstance(value, int) or isinstance(value, bool):
        raise CommandFailed("Invalid parameter type for 'guest-stats-polling-interval', "
                            "expected: integer")
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
        props = [
            {"name": "type", "type": "string"},
            {"name": "realized", "type": "bool"},
            {"name": "parent_bus", "type": "link<bus>"},
            {"name": "guest-stats", "type": "guest-stats"},
            {"name": "guest-stats-polling-interval", "type": "int"},
        ]
        props += [{"name": name, "type": "bool"} for name in PROPERTIES[balloon.profile.name]]
        if not path.endswith("/virtio-backend"):
            props.append({"name": "virtio-backend", "type": "child<virtio-balloon-device>"})
        return props
    for bus in ("pcie.0", "rp1"):
        if path == bus_path(bus) and (bus == "pcie.0" or machine.spec.hotplug):
            return [
                {"name": "type", "type": "string"},
                {"name": "realized", "type": "bool"},
                {"name": "hotplug-handler", "type": "link<hotplug-handler>"},
            ]
    raise _not_found(path)


def _guest_stats(machine: SimMachine, balloon: SimBalloon) -> JsonObject:
    # balloon_stats_get_all: every name, -1 for what the guest did not send (the device
    # keeps u64 -1 and QEMU prints it signed).
    last_update, values = balloon.stats()
    stats = {name: values.get(tag, -1) for tag, name in enumerate(machine.stat_names)}
    return {"stats": stats, "last-update": last_update}


# --- x-query-virtio-status and friends ---------------------------------------------------------
def _feature_strings(profile: Profile, mask: int) -> JsonObject:
    transports: list[str] = []
    device: list[str] = []
    known = 0
    for bit in profile.bits:
        if mask & bit.mask:
            known |= bit.mask
            text = f"{bit.macro}: {bit.description}"
            (device if bit.bit < 24 else transports).append(text)
    out: JsonObject = {"transports": transports, "dev-features": device}
    unknown = mask & ~known
    if unknown:
        out["unknown-dev-features"] = unknown
    return out


def _statuses(status: int) -> JsonObject:
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
        "backend-features": {"transports": [], "dev-features": []},
        "num-vqs": len(device.queue_roles) if device.acked else _max_queues(balloon),
        "status": _statuses(device.status),
        "isr": 0,
        "queue-sel": 0,
        "vm-running": True,
        "broken": device.broken is not None,
        "disabled": False,
        "use-started": True,
        "started": bool(device.status & spec.DeviceStatus.DRIVER_OK),
        "start-on-kick": False,
        "disable-legacy-check": False,
        "bus-name": f"{balloon.dev_id}.0" if False else "",
        "use-guest-notifier-mask": True,
    }


def _max_queues(balloon: SimBalloon) -> int:
    # QEMU creates the queues at realize: inflate, deflate, stats, and one per optional
    # feature offered (free page hint, reporting).
    offered = balloon.device.offered
    extra = sum(
        1 for name in ("free-page-hint", "page-reporting")
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
        "signalled-used-valid": True,
    }


_FLAG_NAMES: Final = ((1, "next"), (2, "write"), (4, "indirect"))


def queue_element(balloon: SimBalloon, index: int, element: object) -> JsonObject:
    """x-query-virtio-queue-element: the chain an avail entry names, without consuming it."""
    _, queue = _queue(balloon, index)
    mem = queue.mem
    avail_idx = queue.avail_idx()
    if element is None:
        # QEMU shows the next element the device will pop (or the last one if none is new).
        slot = (queue.last_avail_idx - (1 if avail_idx == queue.last_avail_idx else 0)) & 0xFFFF
    else:
        slot = int(element) & 0xFFFF
    head = mem.read_u16(queue.avail + spec.AVAIL_RING_OFF + 2 * (slot % queue.size))
    if head >= queue.size:
        raise CommandFailed("Invalid descriptor head")
    descs: list[JsonObject] = []
    i = head
    for _ in range(queue.size):
        raw = mem.read(queue.desc + i * spec.DESC_SIZE, spec.DESC_SIZE)
        addr = int.from_bytes(raw[0:8], "little")
        length = int.from_bytes(raw[8:12], "little")
        flags = int.from_bytes(raw[12:14], "little")
        nxt = int.from_bytes(raw[14:16], "little")
        descs.append({"addr": addr, "len": length,
                      "flags": [name for bit, name in _FLAG_NAMES if flags & bit]})
        if not flags & 1 or nxt >= queue.size:
            break
        i = nxt
    return {
        "name": "virtio-balloon",
        "index": head,
        "descs": descs,
        "avail": {"flags": mem.read_u16(queue.avail), "idx": avail_idx,
                  "ring": head},
        "used": {"flags": mem.read_u16(queue.used), "idx": mem.read_u16(queue.used + 2)},
    }


def describe(bit: FeatureBit) -> str:
    """A feature as QEMU 7.2 prints it."""
    return f"{bit.macro}: {bit.description}"
