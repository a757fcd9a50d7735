"""Which QEMU a simulated VM answers as: one :class:`QemuProfile` per version, 7.2 and 10.0.

Why: users run both (Debian 12 ships QEMU 7.2, Debian 13 QEMU 10.0), and what works against
one can fail against the other: 10.0 refuses device_add's ``"on"`` strings and a ``busnr``
that 7.2 never listed, names six more guest statistics, and sizes the balloon's queues
differently. Every difference the two real recordings show (fixtures/transcripts/qemu-7.2/
and qemu-10.0/, each replayed against a sim of its version by tests/sim/test_transcripts.py)
is one field here, with the QEMU source or the recording it comes from; the machine, QOM and
virtio code read the fields instead of comparing version strings.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from balloonctl.errors import UsageError
from balloonctl.sim import qemu_props
from balloonctl.sim.qemu_props import PropInfo, Scalar
from balloonctl.virtio.spec import BalloonQueue

#: What ``balloonctl sim`` answers as unless told: what users run now (Debian 13).
DEFAULT_QEMU_VERSION: Final = "10.0"

#: x-query-virtio-status lists transport features in the reverse of hw/virtio/virtio-qmp.c
#: virtio_transport_map (QAPI_LIST_PREPEND); 7.2's map had no VIRTIO_F_RING_RESET entry, so
#: 7.2 shows bit 40 only in ``unknown-dev-features`` (qemu-7.2/introspect.json: 2^40 in the
#: guest's and the host's), 10.0 names it between INDIRECT_DESC and VERSION_1.
_TRANSPORTS_7_2: Final = (
    "ring-event-idx",
    "ring-indirect-desc",
    "version-1",
    "any-layout",
    "notify-on-empty",
)
_TRANSPORTS_10_0: Final = (
    "ring-event-idx",
    "ring-indirect-desc",
    "ring-reset",
    "version-1",
    "any-layout",
    "notify-on-empty",
)


@dataclass(frozen=True, eq=False)
class QemuProfile:
    """What one QEMU version answers where the two recorded versions differ."""

    #: ``MAJOR.MINOR``, as ``--qemu-version`` takes it.
    version: str
    #: query-version's ``qemu`` member and the greeting's: the series, micro 0 (the sim is
    #: no particular stable release; the recordings are 7.2.22 and 10.0.13).
    major: int
    minor: int
    #: query-status: StatusInfo's deprecated ``singlestep`` member, gone by 10.0
    #: (qapi/run-state.json; qemu-10.0/handshake.json answers only status and running).
    status_singlestep: bool
    #: vring-num-default of each queue (x-query-virtio-queue-status), which a Linux guest
    #: also takes as its ring size (virtio_pci_modern.c vp_modern_get_queue_size). 7.2:
    #: hw/virtio/virtio-balloon.c virtio_balloon_device_realize adds the inflate, deflate
    #: and stats queues with 128 entries, free page hinting with VIRTQUEUE_MAX_SIZE (1024)
    #: and reporting with 32; 10.0 answered 1024 on all four queues (qemu-10.0/introspect.json).
    queue_sizes: Mapping[BalloonQueue, int]
    #: guest-stats names tags 10-15 (``stat-oom-kills`` ... ``stat-direct-reclaims``):
    #: balloon_stat_names has sixteen entries from QEMU 9.2 (qemu-10.0/stats.json), ten in 7.2.
    extended_stats: bool
    #: Transport feature names in the order x-query-virtio-status lists them.
    transport_order: tuple[str, ...]
    #: ``balloon`` with a value <= 0: "Parameter '%s' expects a size" names 7.2's internal
    #: ``target``, 10.0's QAPI member ``value`` (qemu-*/balloon.json; system/balloon.c).
    balloon_size_param: str
    #: x-query-virtio-status on a path that is no virtio device: "Path %s is not %s"
    #: (hw/virtio/virtio-qmp.c; 10.0 checks the device is realized and says so).
    virtio_status_noun: str
    #: x-query-virtio with no virtio device: 7.2 returns ``[]``, 10.0 fails with this text
    #: (hw/virtio/virtio-qmp.c qmp_x_query_virtio; qemu-10.0/hotplug.json).
    no_virtio_devices: str | None
    #: device_add takes only JSON booleans for a bool property (10.0 visits the arguments
    #: as they are: "Invalid parameter type for '%s', expected: boolean"); 7.2 turned them
    #: into QemuOpts strings first, so ``"on"`` passed and ``"maybe"`` was "Parameter '%s'
    #: expects 'on' or 'off'" (qemu-*/hotplug.json, system/qdev-monitor.c).
    device_add_json_types: bool
    #: device_add of a second balloon onto the occupied root port fails at the PCI slot
    #: (hw/pci/pci.c do_pci_register_device: "PCI: slot %d function 0 already occupied by
    #: %s, new func %s cannot be exposed to guest.") before the balloon's own "Only one
    #: balloon device is supported", which is what 7.2 answered (qemu-*/hotplug.json).
    pci_slot_checked_first: bool
    #: q35's pcie.0 has the ICH9 LPC as its ``hotplug-handler`` link (10.0), or none (7.2);
    #: either way its ``hotpluggable`` is false and device_del there fails the same
    #: (qemu-*/nohotplug.json, hw/acpi/pcihp.c).
    root_bus_hotplug_handler: bool
    #: qom-list of the balloon (name, type), in QEMU's order.
    qom_list: tuple[tuple[str, str], ...]
    #: device-list-properties of virtio-balloon-pci, in QEMU's order.
    device_properties: tuple[PropInfo, ...]
    #: Listed properties with a getter and no setter: device_add and qom-set say "Property
    #: '%s.%s' is not writable" (qom/object.c object_property_set). 10.0's ``busnr``.
    read_only: frozenset[str]
    #: Values qom-get reads on a realized balloon that differ from the listed default and
    #: depend on nothing the sim models (10.0: ``vectors`` 2, qemu-10.0/properties.json).
    live_values: Mapping[str, Scalar]

    @property
    def qemu(self) -> dict[str, int]:
        """query-version's ``qemu`` member (VersionTriple)."""
        return {"major": self.major, "minor": self.minor, "micro": 0}


QEMU_7_2: Final = QemuProfile(
    version="7.2",
    major=7,
    minor=2,
    status_singlestep=True,
    queue_sizes=MappingProxyType(
        {
            BalloonQueue.INFLATE: 128,
            BalloonQueue.DEFLATE: 128,
            BalloonQueue.STATS: 128,
            BalloonQueue.FREE_PAGE: 1024,
            BalloonQueue.REPORTING: 32,
        }
    ),
    extended_stats=False,
    transport_order=_TRANSPORTS_7_2,
    balloon_size_param="target",
    virtio_status_noun="a VirtIODevice",
    no_virtio_devices=None,
    device_add_json_types=False,
    pci_slot_checked_first=False,
    root_bus_hotplug_handler=False,
    qom_list=qemu_props.QOM_LIST_7_2,
    device_properties=qemu_props.DEVICE_PROPERTIES_7_2,
    read_only=frozenset(),
    live_values=MappingProxyType({}),
)

QEMU_10_0: Final = QemuProfile(
    version="10.0",
    major=10,
    minor=0,
    status_singlestep=False,
    queue_sizes=MappingProxyType(dict.fromkeys(BalloonQueue, 1024)),
    extended_stats=True,
    transport_order=_TRANSPORTS_10_0,
    balloon_size_param="value",
    virtio_status_noun="a realized VirtIODevice",
    no_virtio_devices="No virtio devices found",
    device_add_json_types=True,
    pci_slot_checked_first=True,
    root_bus_hotplug_handler=True,
    qom_list=qemu_props.QOM_LIST_10_0,
    device_properties=qemu_props.DEVICE_PROPERTIES_10_0,
    read_only=frozenset({"busnr"}),
    live_values=MappingProxyType({"vectors": 2}),
)

QEMU_PROFILES: Final[Mapping[str, QemuProfile]] = MappingProxyType(
    {p.version: p for p in (QEMU_7_2, QEMU_10_0)}
)
#: The versions ``--qemu-version`` offers, oldest first.
QEMU_VERSIONS: Final = tuple(QEMU_PROFILES)


def qemu_profile(version: str) -> QemuProfile:
    """The profile of QEMU ``version`` ("7.2", "10.0"), or a UsageError naming the known."""
    try:
        return QEMU_PROFILES[version]
    except KeyError:
        raise UsageError(
            f"the simulated VM answers as QEMU {' or '.join(QEMU_VERSIONS)}, not {version!r}"
        ) from None
