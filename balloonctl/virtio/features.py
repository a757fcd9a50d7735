"""Feature bits by name, device profiles, and the device's side of feature negotiation.

Bit 3 is the reason profiles exist. The seed patch (``VIRTIO_BALLOON_F_SG``, 2017) took bit 3
for scatter-gather inflate/deflate; it was never merged, and virtio 1.2 and Linux gave bit 3 to
``FREE_PAGE_HINT``. So a bit number alone does not say what a balloon offers: the *profile*
does. ``virtio-1.2`` is what QEMU is (and never offers SG); ``seed-sg`` is the seed's world,
which only our simulated device speaks. Nothing here reads bit 3 as SG unless the profile is
``seed-sg``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from balloonctl.errors import NegotiationError, PeerError, UsageError
from balloonctl.virtio import spec
from balloonctl.virtio.spec import BalloonQueue


@dataclass(frozen=True, slots=True)
class FeatureBit:
    """One feature bit: its number, balloonctl's name, the C macro and QEMU's description."""

    bit: int
    name: str
    macro: str
    description: str

    @property
    def mask(self) -> int:
        """The bit as a mask of the 64-bit feature word."""
        return 1 << self.bit


# Descriptions are QEMU's (hw/virtio/virtio-qmp.c), so that both the 7.2 form
# ("MACRO: description") and the later description-only form decode to a bit.
TRANSPORT_FEATURES: Final = (
    FeatureBit(
        spec.VIRTIO_F_NOTIFY_ON_EMPTY,
        "notify-on-empty",
        "VIRTIO_F_NOTIFY_ON_EMPTY",
        "Notify when device runs out of avail. descs. on VQ",
    ),
    FeatureBit(
        spec.VIRTIO_F_ANY_LAYOUT,
        "any-layout",
        "VIRTIO_F_ANY_LAYOUT",
        "Device accepts arbitrary desc. layouts",
    ),
    FeatureBit(
        spec.VIRTIO_F_INDIRECT_DESC,
        "ring-indirect-desc",
        "VIRTIO_RING_F_INDIRECT_DESC",
        "Indirect descriptors supported",
    ),
    FeatureBit(
        spec.VIRTIO_F_EVENT_IDX,
        "ring-event-idx",
        "VIRTIO_RING_F_EVENT_IDX",
        "Used & avail. event fields enabled",
    ),
    FeatureBit(
        spec.VIRTIO_F_VERSION_1,
        "version-1",
        "VIRTIO_F_VERSION_1",
        "Device compliant for v1 spec (legacy)",
    ),
    FeatureBit(
        spec.VIRTIO_F_ACCESS_PLATFORM,
        "access-platform",
        "VIRTIO_F_IOMMU_PLATFORM",
        "Device can be used on IOMMU platform",
    ),
    FeatureBit(
        spec.VIRTIO_F_RING_PACKED,
        "ring-packed",
        "VIRTIO_F_RING_PACKED",
        "Device supports packed VQ layout",
    ),
    FeatureBit(
        spec.VIRTIO_F_IN_ORDER,
        "in-order",
        "VIRTIO_F_IN_ORDER",
        "Device uses buffers in same order as made available by driver",
    ),
    FeatureBit(
        spec.VIRTIO_F_ORDER_PLATFORM,
        "order-platform",
        "VIRTIO_F_ORDER_PLATFORM",
        "Memory accesses ordered by platform",
    ),
    FeatureBit(
        spec.VIRTIO_F_SR_IOV,
        "sr-iov",
        "VIRTIO_F_SR_IOV",
        "Device supports single root I/O virtualization",
    ),
    FeatureBit(
        spec.VIRTIO_F_NOTIFICATION_DATA,
        "notification-data",
        "VIRTIO_F_NOTIFICATION_DATA",
        "Extra data sent with notifications",
    ),
    FeatureBit(
        spec.VIRTIO_F_NOTIF_CONFIG_DATA,
        "notif-config-data",
        "VIRTIO_F_NOTIF_CONFIG_DATA",
        "Notification config data",
    ),
    FeatureBit(
        spec.VIRTIO_F_RING_RESET,
        "ring-reset",
        "VIRTIO_F_RING_RESET",
        "Driver can reset a queue individually",
    ),
)

_MUST_TELL_HOST = FeatureBit(
    spec.VIRTIO_BALLOON_F_MUST_TELL_HOST,
    "must-tell-host",
    "VIRTIO_BALLOON_F_MUST_TELL_HOST",
    "Tell host before reclaiming pages",
)
_STATS_VQ = FeatureBit(
    spec.VIRTIO_BALLOON_F_STATS_VQ,
    "stats-vq",
    "VIRTIO_BALLOON_F_STATS_VQ",
    "Guest memory stats VQ available",
)
_DEFLATE_ON_OOM = FeatureBit(
    spec.VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
    "deflate-on-oom",
    "VIRTIO_BALLOON_F_DEFLATE_ON_OOM",
    "Deflate balloon when guest OOM",
)
_FREE_PAGE_HINT = FeatureBit(
    spec.VIRTIO_BALLOON_F_FREE_PAGE_HINT,
    "free-page-hint",
    "VIRTIO_BALLOON_F_FREE_PAGE_HINT",
    "VQ reporting free pages enabled",
)
_PAGE_POISON = FeatureBit(
    spec.VIRTIO_BALLOON_F_PAGE_POISON,
    "page-poison",
    "VIRTIO_BALLOON_F_PAGE_POISON",
    "Guest page poisoning enabled",
)
_PAGE_REPORTING = FeatureBit(
    spec.VIRTIO_BALLOON_F_PAGE_REPORTING,
    "page-reporting",
    "VIRTIO_BALLOON_F_REPORTING",
    "Page reporting VQ enabled",
)
_SG = FeatureBit(
    spec.SEED_VIRTIO_BALLOON_F_SG,
    "sg",
    "VIRTIO_BALLOON_F_SG",
    "Use sg instead of PFN lists",
)

#: 2.2: feature bits 0 to 63.
FEATURE_WORD_MASK: Final = (1 << 64) - 1

_QUEUE_FEATURE: Final = {
    BalloonQueue.STATS: "stats-vq",
    BalloonQueue.FREE_PAGE: "free-page-hint",
    BalloonQueue.REPORTING: "page-reporting",
}


@dataclass(frozen=True)
class Profile:
    """What a balloon's device feature bits mean, and what such a device offers by default."""

    name: str
    device_features: tuple[FeatureBit, ...]
    default_offered: tuple[str, ...]
    summary: str

    @property
    def bits(self) -> tuple[FeatureBit, ...]:
        """Every bit this profile names: the device's, then the transport's."""
        return self.device_features + TRANSPORT_FEATURES

    def feature(self, name: str) -> FeatureBit:
        """The bit called ``name`` (e.g. ``sg``, ``version-1``) in this profile."""
        for feature in self.bits:
            if feature.name == name:
                return feature
        known = ", ".join(f.name for f in self.bits)
        raise UsageError(f"profile {self.name} has no feature {name!r} (known: {known})")

    def has(self, mask: int, name: str) -> bool:
        """Whether ``mask`` has the bit called ``name``; False if the profile has no such bit."""
        return any(f.name == name and mask & f.mask for f in self.bits)

    def encode(self, names: Iterable[str]) -> int:
        """Names to a feature mask; an unknown name is a :class:`UsageError`."""
        mask = 0
        for name in names:
            mask |= self.feature(name).mask
        return mask

    def decode(self, mask: int) -> list[str]:
        """A feature mask to names in bit order; a bit this profile does not name is ``bit-N``."""
        names = []
        known = {f.bit: f.name for f in self.bits}
        for bit in range(64):
            if mask >> bit & 1:
                names.append(known.get(bit, f"bit-{bit}"))
        return names

    @property
    def default_offered_mask(self) -> int:
        """The features a device of this profile offers unless told otherwise."""
        return self.encode(self.default_offered)


#: What QEMU's virtio-balloon is: the virtio 1.2 meanings.
VIRTIO_1_2: Final = Profile(
    name="virtio-1.2",
    device_features=(
        _MUST_TELL_HOST,
        _STATS_VQ,
        _DEFLATE_ON_OOM,
        _FREE_PAGE_HINT,
        _PAGE_POISON,
        _PAGE_REPORTING,
    ),
    # QEMU 7.2 `-device virtio-balloon-pci,deflate-on-oom=on,free-page-reporting=on`, as
    # x-query-virtio-status shows it (docs/real-qemu.md).
    default_offered=(
        "stats-vq",
        "deflate-on-oom",
        "page-poison",
        "page-reporting",
        "notify-on-empty",
        "any-layout",
        "ring-indirect-desc",
        "ring-event-idx",
        "version-1",
    ),
    summary="virtio 1.2 meanings (QEMU): bit 3 is free-page-hint; SG does not exist",
)

#: The seed patch's world: bit 3 is SG. Bits 4 and 5 had no meaning then and are not named.
SEED_SG: Final = Profile(
    name="seed-sg",
    device_features=(_MUST_TELL_HOST, _STATS_VQ, _DEFLATE_ON_OOM, _SG),
    default_offered=(
        "stats-vq",
        "deflate-on-oom",
        "sg",
        "ring-indirect-desc",
        "ring-event-idx",
        "version-1",
    ),
    summary="the unmerged 2017 seed patch: bit 3 is SG (scatter-gather inflate/deflate)",
)

PROFILES: Final[Mapping[str, Profile]] = {p.name: p for p in (VIRTIO_1_2, SEED_SG)}


def get_profile(name: str) -> Profile:
    """The profile called ``name``, or a :class:`UsageError` listing the known ones."""
    try:
        return PROFILES[name]
    except KeyError:
        raise UsageError(f"unknown profile {name!r} (known: {', '.join(PROFILES)})") from None


def negotiate(offered: int, driver_supported: int) -> int:
    """What a driver acks: the offered features it also supports (3.1.1 step 4)."""
    return offered & driver_supported


def check_features_ok(
    profile: Profile,
    offered: int,
    acked: int,
    *,
    require_version_1: bool = False,
    require_must_tell_host: bool = False,
) -> None:
    """Raise :class:`NegotiationError` where a device would refuse FEATURES_OK.

    ``require_version_1`` is a modern-only device (QEMU's virtio-balloon-pci is transitional,
    hence the default); ``require_must_tell_host``
    a device that relies on being told before the guest reuses a page (5.5.3.2).
    """
    extra = acked & ~offered
    if extra:
        # 2.2.1: "The driver MUST NOT accept a feature which the device did not offer".
        raise NegotiationError(
            "the driver acked features the device did not offer: "
            + ", ".join(profile.decode(extra))
        )
    version_1 = profile.feature("version-1").mask
    if require_version_1 and offered & version_1 and not acked & version_1:
        # 6.1: a driver MUST accept VERSION_1 if offered; 6.2: a device MAY then fail.
        raise NegotiationError("the driver did not accept version-1 on a modern device")
    if (
        require_must_tell_host
        and profile.has(offered, "must-tell-host")
        and not profile.has(acked, "must-tell-host")
    ):
        # 5.5.3.2: the device MAY fail FEATURES_OK if MUST_TELL_HOST is not accepted.
        raise NegotiationError("the driver did not accept must-tell-host")
    if profile.has(acked, "ring-packed"):
        raise NegotiationError("packed virtqueues are not implemented (split queues only)")


def queue_layout(profile: Profile, acked: int) -> tuple[BalloonQueue, ...]:
    """The queues a negotiated balloon has, in index order.

    5.5.2 numbers them 0 inflateq, 1 deflateq, 2 statsq, 3 free_page_vq, 4 reporting_vq, each
    of the last three only if its feature is acked. Linux numbers the queues it finds
    consecutively by acked features; QEMU always creates the stats queue and the others by
    offered features. The two agree whenever the driver acks what is offered (Linux does), so
    with STATS_VQ and REPORTING but no FREE_PAGE_HINT the reporting queue is index 3, as
    x-query-virtio-queue-status shows on QEMU 7.2.
    """
    queues = [BalloonQueue.INFLATE, BalloonQueue.DEFLATE]
    for role, feature in _QUEUE_FEATURE.items():
        if profile.has(acked, feature):
            queues.append(role)
    return tuple(queues)


@dataclass(frozen=True, slots=True)
class QemuFeatures:
    """A feature word decoded from one ``x-query-virtio-status`` features object."""

    mask: int
    #: "seed-sg" if the device named VIRTIO_BALLOON_F_SG, "virtio-1.2" if it named a bit that
    #: only exists there (FREE_PAGE_HINT, PAGE_POISON, REPORTING), None if nothing told.
    profile_hint: str | None
    #: Strings that named no feature balloonctl knows (kept for display, not guessed at).
    unrecognised: tuple[str, ...]


def _string_index() -> dict[str, FeatureBit]:
    index: dict[str, FeatureBit] = {}
    for profile in PROFILES.values():
        for feature in profile.bits:
            index[feature.macro] = feature
            index[feature.description] = feature
    return index


_BY_STRING: Final = _string_index()
_SEED_ONLY: Final = frozenset({_SG.macro, _SG.description})
_V12_ONLY: Final = frozenset(
    s for f in (_FREE_PAGE_HINT, _PAGE_POISON, _PAGE_REPORTING) for s in (f.macro, f.description)
)


def parse_qemu_features(obj: Mapping[str, object]) -> QemuFeatures:
    """Decode QEMU's ``{"transports": [...], "dev-features": [...], "unknown-dev-features"}``.

    QEMU 7.2 writes each feature as ``"MACRO: description"``; later versions write only the
    description. Both decode; a string matching neither is kept in ``unrecognised``.
    """
    mask = 0
    hint: str | None = None
    unrecognised: list[str] = []
    for key in ("transports", "dev-features"):
        strings = obj.get(key, [])
        if not isinstance(strings, list):
            raise PeerError(f"x-query-virtio-status: {key!r} is not a list")
        for item in strings:
            if not isinstance(item, str):
                raise PeerError(f"x-query-virtio-status: {key!r} holds a non-string")
            macro, sep, _ = item.partition(":")
            token = macro.strip() if sep else item.strip()
            feature = _BY_STRING.get(token)
            if feature is None:
                unrecognised.append(item)
                continue
            mask |= feature.mask
            if token in _SEED_ONLY:
                hint = "seed-sg"
            elif token in _V12_ONLY and hint is None:
                hint = "virtio-1.2"
    unknown = obj.get("unknown-dev-features", 0)
    if not isinstance(unknown, int) or isinstance(unknown, bool) or unknown < 0:
        raise PeerError("x-query-virtio-status: 'unknown-dev-features' is not a bit mask")
    mask |= unknown & FEATURE_WORD_MASK
    return QemuFeatures(mask=mask, profile_hint=hint, unrecognised=tuple(unrecognised))
