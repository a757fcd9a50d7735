"""Feature bits and profiles: bit 3's two meanings, negotiation, queue layout, QEMU's strings."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balloonctl.errors import NegotiationError, PeerError, UsageError
from balloonctl.virtio.features import (
    PROFILES,
    SEED_SG,
    VIRTIO_1_2,
    Profile,
    check_features_ok,
    get_profile,
    negotiate,
    parse_qemu_features,
    queue_layout,
)
from balloonctl.virtio.spec import BalloonQueue

# Bit numbers written out here, not taken from spec.py, so a wrong constant there shows.
MUST_TELL_HOST = 1 << 0
STATS_VQ = 1 << 1
DEFLATE_ON_OOM = 1 << 2
BIT3 = 1 << 3  # free-page-hint in virtio 1.2, sg in the seed patch
PAGE_POISON = 1 << 4
REPORTING = 1 << 5
NOTIFY_ON_EMPTY = 1 << 24
ANY_LAYOUT = 1 << 27
INDIRECT_DESC = 1 << 28
EVENT_IDX = 1 << 29
VERSION_1 = 1 << 32
RING_PACKED = 1 << 34


# --- profiles -----------------------------------------------------------------------------
def test_bit_3_means_free_page_hint_in_virtio_1_2() -> None:
    assert VIRTIO_1_2.decode(BIT3) == ["free-page-hint"]
    assert VIRTIO_1_2.encode(["free-page-hint"]) == BIT3
    assert not VIRTIO_1_2.has(BIT3, "sg")
    with pytest.raises(UsageError, match="no feature 'sg'"):
        VIRTIO_1_2.feature("sg")


def test_bit_3_means_sg_in_seed_sg() -> None:
    assert SEED_SG.decode(BIT3) == ["sg"]
    assert SEED_SG.encode(["sg"]) == BIT3
    assert SEED_SG.has(BIT3, "sg")
    assert not SEED_SG.has(BIT3, "free-page-hint")


def test_seed_sg_does_not_name_bits_4_and_5() -> None:
    assert SEED_SG.decode(PAGE_POISON | REPORTING) == ["bit-4", "bit-5"]
    assert VIRTIO_1_2.decode(PAGE_POISON | REPORTING) == ["page-poison", "page-reporting"]


@pytest.mark.parametrize("bit", [6, 23, 30, 41, 63])
def test_decode_unknown_bit_is_bit_n(bit: int) -> None:
    for profile in PROFILES.values():
        assert profile.decode(1 << bit) == [f"bit-{bit}"]


def test_decode_is_in_bit_order() -> None:
    mask = VERSION_1 | STATS_VQ | EVENT_IDX | (1 << 63)
    assert VIRTIO_1_2.decode(mask) == ["stats-vq", "ring-event-idx", "version-1", "bit-63"]
    assert VIRTIO_1_2.decode(0) == []


def test_default_offered_masks() -> None:
    assert VIRTIO_1_2.default_offered_mask == (
        STATS_VQ
        | DEFLATE_ON_OOM
        | PAGE_POISON
        | REPORTING
        | NOTIFY_ON_EMPTY
        | ANY_LAYOUT
        | INDIRECT_DESC
        | EVENT_IDX
        | VERSION_1
    )
    assert not VIRTIO_1_2.default_offered_mask & BIT3  # QEMU never offers SG
    assert SEED_SG.default_offered_mask == (
        STATS_VQ | DEFLATE_ON_OOM | BIT3 | INDIRECT_DESC | EVENT_IDX | VERSION_1
    )


@pytest.mark.parametrize("profile", list(PROFILES.values()), ids=list(PROFILES))
def test_every_name_round_trips(profile: Profile) -> None:
    for feature in profile.bits:
        assert profile.encode([feature.name]) == 1 << feature.bit
        assert profile.decode(1 << feature.bit) == [feature.name]
    # Names are unique within a profile, and so are bits.
    assert len({f.name for f in profile.bits}) == len(profile.bits)
    assert len({f.bit for f in profile.bits}) == len(profile.bits)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(list(PROFILES.values())), st.data())
def test_encode_decode_round_trip(profile: Profile, data: st.DataObject) -> None:
    names = data.draw(st.lists(st.sampled_from([f.name for f in profile.bits]), unique=True))
    mask = profile.encode(names)
    bit_of = {f.name: f.bit for f in profile.bits}
    assert profile.decode(mask) == sorted(names, key=bit_of.__getitem__)
    assert profile.encode(profile.decode(mask)) == mask


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(list(PROFILES.values())), st.integers(0, (1 << 64) - 1))
def test_decode_names_every_set_bit(profile: Profile, mask: int) -> None:
    names = profile.decode(mask)
    assert len(names) == bin(mask).count("1")
    known = [n for n in names if not n.startswith("bit-")]
    unknown = sum(1 << int(n[4:]) for n in names if n.startswith("bit-"))
    assert profile.encode(known) | unknown == mask


def test_encode_unknown_name_is_usage_error() -> None:
    with pytest.raises(UsageError, match="no feature 'bogus'"):
        VIRTIO_1_2.encode(["stats-vq", "bogus"])
    with pytest.raises(UsageError):
        VIRTIO_1_2.encode(["bit-6"])


def test_get_profile() -> None:
    assert get_profile("virtio-1.2") is VIRTIO_1_2
    assert get_profile("seed-sg") is SEED_SG
    with pytest.raises(UsageError, match=r"unknown profile 'virtio-1\.1'.*virtio-1\.2.*seed-sg"):
        get_profile("virtio-1.1")
    with pytest.raises(UsageError):
        get_profile("")


# --- negotiation --------------------------------------------------------------------------
def test_negotiate_is_the_intersection() -> None:
    assert negotiate(STATS_VQ | VERSION_1, VERSION_1 | REPORTING) == VERSION_1


def test_acked_not_subset_of_offered_is_refused() -> None:
    with pytest.raises(NegotiationError, match="did not offer: page-reporting"):
        check_features_ok(VIRTIO_1_2, STATS_VQ | VERSION_1, STATS_VQ | VERSION_1 | REPORTING)
    with pytest.raises(NegotiationError, match="bit-50"):
        check_features_ok(VIRTIO_1_2, VERSION_1, VERSION_1 | 1 << 50)
    # In seed-sg bit 3 is SG: the message names the bit as the profile means it.
    with pytest.raises(NegotiationError, match="did not offer: sg"):
        check_features_ok(SEED_SG, VERSION_1, VERSION_1 | BIT3)


def test_acked_subset_of_offered_is_accepted() -> None:
    offered = VIRTIO_1_2.default_offered_mask
    check_features_ok(VIRTIO_1_2, offered, offered)
    check_features_ok(VIRTIO_1_2, offered, VERSION_1)
    check_features_ok(SEED_SG, SEED_SG.default_offered_mask, SEED_SG.default_offered_mask)


def test_version_1_offered_but_not_acked() -> None:
    # Transitional by default (QEMU's virtio-balloon-pci): a legacy driver may go without it.
    check_features_ok(VIRTIO_1_2, STATS_VQ | VERSION_1, STATS_VQ)
    with pytest.raises(NegotiationError, match="version-1"):
        check_features_ok(VIRTIO_1_2, STATS_VQ | VERSION_1, STATS_VQ, require_version_1=True)
    # A transitional device lets a legacy driver go without it.
    check_features_ok(VIRTIO_1_2, STATS_VQ | VERSION_1, STATS_VQ, require_version_1=False)
    # Not offered at all: nothing to require.
    check_features_ok(VIRTIO_1_2, STATS_VQ, STATS_VQ, require_version_1=True)


def test_must_tell_host_rule() -> None:
    offered = MUST_TELL_HOST | VERSION_1
    with pytest.raises(NegotiationError, match="must-tell-host"):
        check_features_ok(VIRTIO_1_2, offered, VERSION_1, require_must_tell_host=True)
    # Accepted, or not required, or not offered: fine.
    check_features_ok(VIRTIO_1_2, offered, offered, require_must_tell_host=True)
    check_features_ok(VIRTIO_1_2, offered, VERSION_1)
    check_features_ok(VIRTIO_1_2, VERSION_1, VERSION_1, require_must_tell_host=True)
    with pytest.raises(NegotiationError, match="must-tell-host"):
        check_features_ok(SEED_SG, offered, VERSION_1, require_must_tell_host=True)


def test_packed_ring_is_refused() -> None:
    offered = VERSION_1 | RING_PACKED
    with pytest.raises(NegotiationError, match="packed"):
        check_features_ok(VIRTIO_1_2, offered, offered)
    check_features_ok(VIRTIO_1_2, offered, VERSION_1)


# --- queue layout -------------------------------------------------------------------------
INFLATE, DEFLATE, STATS, FREE_PAGE, REPORT = (
    BalloonQueue.INFLATE,
    BalloonQueue.DEFLATE,
    BalloonQueue.STATS,
    BalloonQueue.FREE_PAGE,
    BalloonQueue.REPORTING,
)


@pytest.mark.parametrize(
    ("acked", "layout"),
    [
        (0, (INFLATE, DEFLATE)),
        (VERSION_1 | EVENT_IDX, (INFLATE, DEFLATE)),
        (STATS_VQ, (INFLATE, DEFLATE, STATS)),
        (STATS_VQ | REPORTING, (INFLATE, DEFLATE, STATS, REPORT)),  # reporting is index 3
        (REPORTING, (INFLATE, DEFLATE, REPORT)),
        (BIT3, (INFLATE, DEFLATE, FREE_PAGE)),
        (STATS_VQ | BIT3 | REPORTING, (INFLATE, DEFLATE, STATS, FREE_PAGE, REPORT)),
    ],
)
def test_queue_layout_virtio_1_2(acked: int, layout: tuple[BalloonQueue, ...]) -> None:
    assert queue_layout(VIRTIO_1_2, acked) == layout


def test_queue_layout_qemu_default_puts_reporting_at_index_3() -> None:
    roles = queue_layout(VIRTIO_1_2, VIRTIO_1_2.default_offered_mask)
    assert roles == (INFLATE, DEFLATE, STATS, REPORT)
    assert roles.index(REPORT) == 3


@pytest.mark.parametrize(
    ("acked", "layout"),
    [
        (STATS_VQ, (INFLATE, DEFLATE, STATS)),
        (STATS_VQ | BIT3, (INFLATE, DEFLATE, STATS)),  # sg has no queue of its own
        (BIT3 | REPORTING | PAGE_POISON, (INFLATE, DEFLATE)),  # bits 4, 5 mean nothing
        (SEED_SG.default_offered_mask, (INFLATE, DEFLATE, STATS)),
    ],
)
def test_queue_layout_seed_sg(acked: int, layout: tuple[BalloonQueue, ...]) -> None:
    assert queue_layout(SEED_SG, acked) == layout


# --- x-query-virtio-status ----------------------------------------------------------------
QEMU_7_2 = {
    "transports": [
        "VIRTIO_RING_F_EVENT_IDX: Used & avail. event fields enabled",
        "VIRTIO_F_VERSION_1: Device compliant for v1 spec (legacy)",
    ],
    "dev-features": [
        "VIRTIO_BALLOON_F_REPORTING: Page reporting VQ enabled",
        "VIRTIO_BALLOON_F_STATS_VQ: Guest memory stats VQ available",
    ],
    "unknown-dev-features": 1 << 40,
}
QEMU_LATER = {
    "transports": [
        "Used & avail. event fields enabled",
        "Device compliant for v1 spec (legacy)",
    ],
    "dev-features": ["Page reporting VQ enabled", "Guest memory stats VQ available"],
    "unknown-dev-features": 1 << 40,
}
EXPECTED_MASK = EVENT_IDX | VERSION_1 | REPORTING | STATS_VQ | 1 << 40


@pytest.mark.parametrize("obj", [QEMU_7_2, QEMU_LATER], ids=["qemu-7.2", "description-only"])
def test_parse_qemu_features_both_forms(obj: dict[str, object]) -> None:
    got = parse_qemu_features(obj)
    assert got.mask == EXPECTED_MASK
    assert got.profile_hint == "virtio-1.2"
    assert got.unrecognised == ()


def test_parse_qemu_features_qemu_7_2_default_balloon() -> None:
    # -device virtio-balloon-pci,deflate-on-oom=on,free-page-reporting=on on QEMU 7.2.
    got = parse_qemu_features(
        {
            "transports": [
                "VIRTIO_RING_F_INDIRECT_DESC: Indirect descriptors supported",
                "VIRTIO_RING_F_EVENT_IDX: Used & avail. event fields enabled",
                "VIRTIO_F_VERSION_1: Device compliant for v1 spec (legacy)",
                "VIRTIO_F_NOTIFY_ON_EMPTY: Notify when device runs out of avail. descs. on VQ",
                "VIRTIO_F_ANY_LAYOUT: Device accepts arbitrary desc. layouts",
            ],
            "dev-features": [
                "VIRTIO_BALLOON_F_REPORTING: Page reporting VQ enabled",
                "VIRTIO_BALLOON_F_PAGE_POISON: Guest page poisoning enabled",
                "VIRTIO_BALLOON_F_DEFLATE_ON_OOM: Deflate balloon when guest OOM",
                "VIRTIO_BALLOON_F_STATS_VQ: Guest memory stats VQ available",
            ],
        }
    )
    assert got.mask == VIRTIO_1_2.default_offered_mask
    assert got.profile_hint == "virtio-1.2"


@pytest.mark.parametrize(
    "sg", ["VIRTIO_BALLOON_F_SG: Use sg instead of PFN lists", "Use sg instead of PFN lists"]
)
def test_parse_qemu_features_sg_hints_seed_sg(sg: str) -> None:
    stats = "VIRTIO_BALLOON_F_STATS_VQ: Guest memory stats VQ available"
    got = parse_qemu_features({"dev-features": [stats, sg]})
    assert got.mask == STATS_VQ | BIT3
    assert got.profile_hint == "seed-sg"
    # SG decides the hint whichever order it comes in.
    reporting = "VIRTIO_BALLOON_F_REPORTING: Page reporting VQ enabled"
    assert parse_qemu_features({"dev-features": [reporting, sg]}).profile_hint == "seed-sg"
    assert parse_qemu_features({"dev-features": [sg, reporting]}).profile_hint == "seed-sg"


@pytest.mark.parametrize(
    "token",
    [
        "VIRTIO_BALLOON_F_FREE_PAGE_HINT: VQ reporting free pages enabled",
        "VIRTIO_BALLOON_F_PAGE_POISON: Guest page poisoning enabled",
        "Page reporting VQ enabled",
    ],
)
def test_parse_qemu_features_v12_only_bits_hint_virtio_1_2(token: str) -> None:
    assert parse_qemu_features({"dev-features": [token]}).profile_hint == "virtio-1.2"


def test_parse_qemu_features_no_hint_from_shared_bits() -> None:
    got = parse_qemu_features(
        {
            "transports": ["VIRTIO_F_VERSION_1: Device compliant for v1 spec (legacy)"],
            "dev-features": ["Guest memory stats VQ available", "Deflate balloon when guest OOM"],
        }
    )
    assert got.mask == VERSION_1 | STATS_VQ | DEFLATE_ON_OOM
    assert got.profile_hint is None


def test_parse_qemu_features_keeps_garbage_as_unrecognised() -> None:
    garbage = ["VIRTIO_BALLOON_F_BOGUS: Not a feature", "hello", "", ": Page reporting"]
    got = parse_qemu_features(
        {
            "transports": ["VIRTIO_F_VERSION_1: Device compliant for v1 spec (legacy)"],
            "dev-features": garbage,
        }
    )
    assert got.mask == VERSION_1
    assert got.unrecognised == tuple(garbage)
    assert got.profile_hint is None


def test_parse_qemu_features_empty_and_missing_keys() -> None:
    got = parse_qemu_features({})
    assert (got.mask, got.profile_hint, got.unrecognised) == (0, None, ())


def test_parse_qemu_features_unknown_bits_are_masked_to_64() -> None:
    got = parse_qemu_features({"unknown-dev-features": (1 << 70) | (1 << 63) | 1 << 6})
    assert got.mask == (1 << 63) | (1 << 6)


@pytest.mark.parametrize(
    "obj",
    [
        {"transports": "VIRTIO_F_VERSION_1"},
        {"dev-features": {"a": 1}},
        {"dev-features": None},
        {"transports": [1]},
        {"dev-features": ["Page reporting VQ enabled", None]},
        {"unknown-dev-features": -1},
        {"unknown-dev-features": True},
        {"unknown-dev-features": "0x10"},
        {"unknown-dev-features": 1.0},
    ],
)
def test_parse_qemu_features_rejects_malformed(obj: dict[str, object]) -> None:
    with pytest.raises(PeerError, match="x-query-virtio-status"):
        parse_qemu_features(obj)


def test_malformed_qemu_reply_is_a_peer_error_not_a_usage_error() -> None:
    with pytest.raises(PeerError) as info:
        parse_qemu_features({"transports": "not a list"})
    assert not isinstance(info.value, UsageError)
