"""The balloon's QOM properties as two real QEMUs list them: ``qom-list`` and
``device-list-properties`` of ``virtio-balloon-pci``, data only.

Why a table and not a model: both lists come out of QEMU in the order of its hash tables
(``object_property_iter`` over ``ObjectClass.properties`` and ``Object.properties``,
qom/object.c), which no client should rely on but some do; a simulated VM that answers in
the same order behaves the same under such a client. The rows are copied from the
recordings: ``qom-list`` of the balloon on pcie.0 (``introspect.json``) and
``device-list-properties`` (``properties.json``) of fixtures/transcripts/qemu-7.2/ and
qemu-10.0/. What differs between the two versions (``busnr``, ``vectors``, ``addr`` now a
string property, ``rombar`` signed, new ``x-pcie-*`` knobs, MSI-X regions) is what the
tables show; :mod:`balloonctl.sim.qemu_versions` picks one pair per VM.
"""

from __future__ import annotations

import enum
from typing import Final, NamedTuple


class _Missing(enum.Enum):
    NO_DEFAULT = 0


#: device-list-properties gives no ``default-value`` for this property (qom/qom-qmp-cmds.c
#: qmp_device_list_properties copies ``prop->defval`` only when the property has one).
NO_DEFAULT: Final = _Missing.NO_DEFAULT

Scalar = bool | int | str


class PropInfo(NamedTuple):
    """One ``ObjectPropertyInfo`` of device-list-properties (qapi/qom.json)."""

    name: str
    type: str
    default: Scalar | _Missing
    description: str | None


_P = PropInfo

#: qom-list /machine/peripheral/balloon0 on QEMU 7.2.22 (qemu-7.2/introspect.json).
QOM_LIST_7_2: Final[tuple[tuple[str, str], ...]] = (
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

#: device-list-properties virtio-balloon-pci on QEMU 7.2.22 (qemu-7.2/properties.json).
DEVICE_PROPERTIES_7_2: Final[tuple[PropInfo, ...]] = (
    _P("failover_pair_id", "str", NO_DEFAULT, None),
    _P("romfile", "str", NO_DEFAULT, None),
    _P("addr", "int32", -1, "Slot and optional function number, example: 06.0 or 06"),
    _P("romsize", "uint32", 4294967295, None),
    _P("x-pcie-lnksta-dllla", "bool", True, "on/off"),
    _P("rombar", "uint32", 1, None),
    _P("x-pcie-extcap-init", "bool", True, "on/off"),
    _P("acpi-index", "uint32", 0, None),
    _P("multifunction", "bool", False, "on/off"),
    _P("migrate-extra", "bool", True, "on/off"),
    _P("ats", "bool", False, "on/off"),
    _P("x-ignore-backend-features", "bool", False, None),
    _P("x-pcie-pm-init", "bool", True, "on/off"),
    _P("aer", "bool", False, "on/off"),
    _P("x-pcie-flr-init", "bool", True, "on/off"),
    _P("x-pcie-lnkctl-init", "bool", True, "on/off"),
    _P("x-ats-page-aligned", "bool", True, "on/off"),
    _P("page-per-vq", "bool", False, "on/off"),
    _P("x-pcie-deverr-init", "bool", True, "on/off"),
    _P("virtio-pci-bus-master-bug-migration", "bool", False, "on/off"),
    _P("modern-pio-notify", "bool", False, "on/off"),
    _P("x-disable-pcie", "bool", False, "on/off"),
    _P("disable-legacy", "OnOffAuto", "auto", "on/off/auto"),
    _P("disable-modern", "bool", False, None),
    _P("free-page-reporting", "bool", False, "on/off"),
    _P("indirect_desc", "bool", True, "on/off"),
    _P("iommu_platform", "bool", False, "on/off"),
    _P("deflate-on-oom", "bool", False, "on/off"),
    _P("use-disabled-flag", "bool", True, None),
    _P("event_idx", "bool", True, "on/off"),
    _P("page-poison", "bool", True, "on/off"),
    _P("guest-stats-polling-interval", "int", NO_DEFAULT, None),
    _P("guest-stats", "guest statistics", NO_DEFAULT, None),
    _P("x-disable-legacy-check", "bool", False, None),
    _P("any_layout", "bool", True, "on/off"),
    _P("iothread", "link<iothread>", NO_DEFAULT, None),
    _P("notify_on_empty", "bool", True, "on/off"),
    _P("queue_reset", "bool", True, "on/off"),
    _P("qemu-4-0-config-size", "bool", False, None),
    _P("packed", "bool", False, "on/off"),
    _P("use-started", "bool", True, None),
    _P("free-page-hint", "bool", False, "on/off"),
    _P("virtio-backend", "child<virtio-balloon-device>", NO_DEFAULT, None),
)

#: qom-list /machine/peripheral/balloon0 on QEMU 10.0.13 (qemu-10.0/introspect.json).
QOM_LIST_10_0: Final[tuple[tuple[str, str], ...]] = (
    ("type", "string"),
    ("parent_bus", "link<bus>"),
    ("realized", "bool"),
    ("hotplugged", "bool"),
    ("hotpluggable", "bool"),
    ("failover_pair_id", "str"),
    ("romfile", "str"),
    ("x-pcie-ext-tag", "bool"),
    ("addr", "str"),
    ("romsize", "uint32"),
    ("x-pcie-lnksta-dllla", "bool"),
    ("rombar", "int32"),
    ("x-max-bounce-buffer-size", "size"),
    ("x-pcie-ari-nextfn-1", "bool"),
    ("x-pcie-err-unc-mask", "bool"),
    ("x-pcie-extcap-init", "bool"),
    ("busnr", "busnr"),
    ("acpi-index", "uint32"),
    ("multifunction", "bool"),
    ("legacy-addr", "str"),
    ("aer", "bool"),
    ("migrate-extra", "bool"),
    ("ats", "bool"),
    ("x-ignore-backend-features", "bool"),
    ("x-pcie-pm-init", "bool"),
    ("x-pcie-pm-no-soft-reset", "bool"),
    ("x-pcie-flr-init", "bool"),
    ("x-pcie-lnkctl-init", "bool"),
    ("x-ats-page-aligned", "bool"),
    ("page-per-vq", "bool"),
    ("x-pcie-deverr-init", "bool"),
    ("virtio-pci-bus-master-bug-migration", "bool"),
    ("modern-pio-notify", "bool"),
    ("x-disable-pcie", "bool"),
    ("vectors", "uint32"),
    ("ioeventfd", "bool"),
    ("disable-legacy", "OnOffAuto"),
    ("disable-modern", "bool"),
    ("msix-pba[0]", "child<memory-region>"),
    ("notify_on_empty", "bool"),
    ("page-poison", "bool"),
    ("virtio-balloon-pci-msix[0]", "child<memory-region>"),
    ("legacy-iothread", "str"),
    ("iothread", "link<iothread>"),
    ("qemu-4-0-config-size", "bool"),
    ("virtio-bus", "child<virtio-pci-bus>"),
    ("virtio-pci-common-virtio-balloon[0]", "child<memory-region>"),
    ("in_order", "bool"),
    ("virtio-backend", "child<virtio-balloon-device>"),
    ("packed", "bool"),
    ("guest-stats-polling-interval", "int"),
    ("guest-stats", "guest statistics"),
    ("virtio-pci-device-virtio-balloon[0]", "child<memory-region>"),
    ("use-started", "bool"),
    ("bus master container[0]", "child<memory-region>"),
    ("use-disabled-flag", "bool"),
    ("iommu_platform", "bool"),
    ("any_layout", "bool"),
    ("virtio-pci-isr-virtio-balloon[0]", "child<memory-region>"),
    ("x-disable-legacy-check", "bool"),
    ("free-page-hint", "bool"),
    ("free-page-reporting", "bool"),
    ("bus master[0]", "child<memory-region>"),
    ("virtio-pci-notify-virtio-balloon[0]", "child<memory-region>"),
    ("virtio-pci[1]", "child<memory-region>"),
    ("virtio-pci-notify-pio-virtio-balloon[0]", "child<memory-region>"),
    ("virtio-pci[0]", "child<memory-region>"),
    ("queue_reset", "bool"),
    ("msix-table[0]", "child<memory-region>"),
    ("deflate-on-oom", "bool"),
    ("event_idx", "bool"),
    ("indirect_desc", "bool"),
)

#: device-list-properties virtio-balloon-pci on QEMU 10.0.13 (qemu-10.0/properties.json):
#: ``busnr`` (hw/pci/pci.c, a getter only) and ``vectors`` are new to the balloon's list.
DEVICE_PROPERTIES_10_0: Final[tuple[PropInfo, ...]] = (
    _P("failover_pair_id", "str", NO_DEFAULT, None),
    _P("romfile", "str", NO_DEFAULT, None),
    _P("x-pcie-ext-tag", "bool", True, "on/off"),
    _P("addr", "str", -1, "Slot and optional function number, example: 06.0 or 06"),
    _P("romsize", "uint32", 4294967295, None),
    _P("x-pcie-lnksta-dllla", "bool", True, "on/off"),
    _P("rombar", "int32", -1, None),
    _P(
        "x-max-bounce-buffer-size",
        "size",
        4096,
        "Maximum buffer size allocated for bounce buffers used for mapped access to "
        "indirect DMA memory",
    ),
    _P("x-pcie-ari-nextfn-1", "bool", False, "on/off"),
    _P("x-pcie-err-unc-mask", "bool", True, "on/off"),
    _P("x-pcie-extcap-init", "bool", True, "on/off"),
    _P("busnr", "busnr", NO_DEFAULT, None),
    _P("acpi-index", "uint32", 0, None),
    _P("multifunction", "bool", False, "on/off"),
    _P("aer", "bool", False, "on/off"),
    _P("migrate-extra", "bool", True, "on/off"),
    _P("ats", "bool", False, "on/off"),
    _P("x-ignore-backend-features", "bool", False, "on/off"),
    _P("x-pcie-pm-init", "bool", True, "on/off"),
    _P("x-pcie-pm-no-soft-reset", "bool", False, "on/off"),
    _P("x-pcie-flr-init", "bool", True, "on/off"),
    _P("x-pcie-lnkctl-init", "bool", True, "on/off"),
    _P("x-ats-page-aligned", "bool", True, "on/off"),
    _P("page-per-vq", "bool", False, "on/off"),
    _P("x-pcie-deverr-init", "bool", True, "on/off"),
    _P("virtio-pci-bus-master-bug-migration", "bool", False, "on/off"),
    _P("modern-pio-notify", "bool", False, "on/off"),
    _P("x-disable-pcie", "bool", False, "on/off"),
    _P("vectors", "uint32", 4294967295, None),
    _P("ioeventfd", "bool", True, "on/off"),
    _P("disable-legacy", "OnOffAuto", "auto", "on/off/auto"),
    _P("disable-modern", "bool", False, "on/off"),
    _P("free-page-reporting", "bool", False, "on/off"),
    _P("indirect_desc", "bool", True, "on/off"),
    _P("guest-stats-polling-interval", "int", NO_DEFAULT, None),
    _P("iommu_platform", "bool", False, "on/off"),
    _P("deflate-on-oom", "bool", False, "on/off"),
    _P("use-disabled-flag", "bool", True, "on/off"),
    _P("event_idx", "bool", True, "on/off"),
    _P("page-poison", "bool", True, "on/off"),
    _P("queue_reset", "bool", True, "on/off"),
    _P("guest-stats", "guest statistics", NO_DEFAULT, None),
    _P("any_layout", "bool", True, "on/off"),
    _P("x-disable-legacy-check", "bool", False, "on/off"),
    _P("notify_on_empty", "bool", True, "on/off"),
    _P("iothread", "link<iothread>", NO_DEFAULT, None),
    _P("packed", "bool", False, "on/off"),
    _P("qemu-4-0-config-size", "bool", False, "on/off"),
    _P("use-started", "bool", True, "on/off"),
    _P("free-page-hint", "bool", False, "on/off"),
    _P("in_order", "bool", False, "on/off"),
    _P("virtio-backend", "child<virtio-balloon-device>", NO_DEFAULT, None),
)
