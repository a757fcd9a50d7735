"""The balloon device: both request forms, each balloon-level rejection, stats, config space,
and discards that really give memory back."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest

from balloonctl import errors
from balloonctl.units import PAGE_SIZE
from balloonctl.virtio import spec
from balloonctl.virtio.balloon import BalloonDevice, DiscardStrategy
from balloonctl.virtio.features import SEED_SG, VIRTIO_1_2, Profile
from balloonctl.virtio.layout import RingLayout
from balloonctl.virtio.memory import Backing, GuestMemory
from balloonctl.virtio.mock import (
    BumpAllocator,
    MockDriverQueue,
    pfn_array,
    stats_buffer,
)
from balloonctl.virtio.spec import BalloonQueue, StatTag

RAM = 4 << 20  # 1024 pages; rings and buffers in the first 64 KiB (pages 0-15)


@dataclass
class Rig:
    mem: GuestMemory
    dev: BalloonDevice
    drivers: dict[BalloonQueue, MockDriverQueue]
    heap: BumpAllocator

    def send(self, role: BalloonQueue, buffers: list[tuple[int, int, bool]]) -> None:
        self.drivers[role].add_chain(buffers)

    def pfns(self, role: BalloonQueue, pfns: list[int]) -> None:
        data = pfn_array(pfns)
        addr = self.heap.alloc(max(len(data), 1))
        self.mem.write(addr, data)
        self.send(role, [(addr, len(data), False)])


def make_rig(
    profile: Profile = VIRTIO_1_2,
    backing: Backing = Backing.BYTES,
    discard: DiscardStrategy = DiscardStrategy.PER_RANGE,
) -> Rig:
    mem = GuestMemory.simple(RAM, backing)
    dev = BalloonDevice(mem, profile=profile, discard=discard)
    dev.set_features(dev.offered)
    drivers = {}
    base = 0
    for index, role in enumerate(dev.queue_roles):
        layout = RingLayout.packed(16, base)
        drivers[role] = MockDriverQueue(mem, layout, event_idx=dev.has("ring-event-idx"))
        dev.attach_queue(index, 16, layout.desc, layout.avail, layout.used)
        base = layout.end
    dev.driver_ok()
    return Rig(mem, dev, drivers, BumpAllocator(base, 16 * PAGE_SIZE))


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = make_rig()
    yield r
    r.mem.close()


@pytest.fixture
def sg_rig() -> Iterator[Rig]:
    r = make_rig(SEED_SG)
    yield r
    r.mem.close()


def inflate(rig: Rig) -> list[tuple[str, int | None, int]]:
    results, _ = rig.dev.process(BalloonQueue.INFLATE)
    return [(r.reason, r.first_pfn, r.count) for res in results for r in res.rejections]


# --- legacy PFN arrays ---------------------------------------------------------------------
def test_pfn_inflate_then_deflate(rig: Rig) -> None:
    rig.pfns(BalloonQueue.INFLATE, list(range(100, 356)))  # 256 PFNs, as Linux sends
    results, notify = rig.dev.process(BalloonQueue.INFLATE)
    assert notify
    assert results[0].ranges.tolist() == [[100, 256]]
    assert rig.dev.balloon_pages == 256
    assert rig.dev.counters.pfn_bytes == 1024
    rig.pfns(BalloonQueue.DEFLATE, list(range(100, 200)))
    results, _ = rig.dev.process(BalloonQueue.DEFLATE)
    assert results[0].ranges.tolist() == [[100, 100]]
    assert rig.dev.balloon_pages == 156
    assert rig.drivers[BalloonQueue.INFLATE].reclaim() == [(0, 0)]


def test_rejection_bad_length_keeps_the_whole_pfns(rig: Rig) -> None:
    data = pfn_array([200, 201]) + b"\x01\x02\x03"
    addr = rig.heap.alloc(len(data))
    rig.mem.write(addr, data)
    rig.send(BalloonQueue.INFLATE, [(addr, len(data), False)])
    results, _ = rig.dev.process(BalloonQueue.INFLATE)
    assert results[0].ranges.tolist() == [[200, 2]]
    assert [r.reason for r in results[0].rejections] == ["bad-length"]
    assert "3 trailing bytes" in results[0].rejections[0].detail


def test_rejection_bad_length_more_than_256_pfns(rig: Rig) -> None:
    rig.pfns(BalloonQueue.INFLATE, list(range(100, 357)))  # 257 PFNs
    results, _ = rig.dev.process(BalloonQueue.INFLATE)
    assert results[0].pages == 0
    assert results[0].rejections[0].reason == "bad-length"
    assert rig.dev.balloon_pages == 0


def test_rejection_out_of_ram(rig: Rig) -> None:
    rig.pfns(BalloonQueue.INFLATE, [500, 1024, 1025, 2**32 - 1])
    assert inflate(rig) == [("out-of-ram", 1024, 2), ("out-of-ram", 2**32 - 1, 1)]
    assert rig.dev.balloon_pages == 1


def test_rejection_duplicate_within_a_request_and_against_the_balloon(rig: Rig) -> None:
    rig.pfns(BalloonQueue.INFLATE, [300, 301, 300])
    assert inflate(rig) == [("duplicate", 300, 1)]
    rig.pfns(BalloonQueue.INFLATE, [301, 302])
    assert inflate(rig) == [("duplicate", 301, 1)]
    assert rig.dev.balloon_pages == 3
    assert rig.dev.counters.rejected["duplicate"] == 2


def test_rejection_not_in_balloon(rig: Rig) -> None:
    rig.pfns(BalloonQueue.INFLATE, [400])
    rig.dev.process(BalloonQueue.INFLATE)
    rig.pfns(BalloonQueue.DEFLATE, [400, 401])
    results, _ = rig.dev.process(BalloonQueue.DEFLATE)
    assert [(r.reason, r.first_pfn) for r in results[0].rejections] == [("not-in-balloon", 401)]
    assert rig.dev.balloon_pages == 0


def test_wrong_direction_breaks_the_device(rig: Rig) -> None:
    addr = rig.heap.alloc(4)
    rig.mem.write(addr, pfn_array([500]))
    rig.send(BalloonQueue.INFLATE, [(addr, 4, True)])
    with pytest.raises(errors.WrongDirection):
        rig.dev.process(BalloonQueue.INFLATE)
    assert rig.dev.status & spec.DeviceStatus.NEEDS_RESET
    with pytest.raises(errors.WrongDirection, match="broken"):
        rig.dev.process(BalloonQueue.DEFLATE)


def test_virtio_1_2_never_reads_bit_3_as_sg() -> None:
    # A virtio-1.2 device that offers bit 3 (free-page-hint) and a driver that acks it:
    # the device still decodes PFN arrays, never SG chunks.
    with GuestMemory.simple(RAM) as mem:
        bit3 = 1 << spec.VIRTIO_BALLOON_F_FREE_PAGE_HINT
        dev = BalloonDevice(mem, offered=VIRTIO_1_2.default_offered_mask | bit3)
        dev.set_features(dev.offered)
        assert dev.acked & bit3
        assert dev.has("free-page-hint") and not dev.has("sg")
        assert dev.form.value == "pfn"
    with GuestMemory.simple(RAM) as mem:
        dev = BalloonDevice(mem, profile=SEED_SG)
        dev.set_features(dev.offered)
        assert dev.acked & bit3 and dev.form.value == "sg"


# --- the seed's SG chunks ------------------------------------------------------------------
def test_sg_inflate_chunks_and_merge(sg_rig: Rig) -> None:
    assert sg_rig.dev.form.value == "sg"
    sg_rig.send(
        BalloonQueue.INFLATE,
        [(100 * PAGE_SIZE, 50 * PAGE_SIZE, False), (150 * PAGE_SIZE, 10 * PAGE_SIZE, False)],
    )
    results, _ = sg_rig.dev.process(BalloonQueue.INFLATE)
    assert results[0].ranges.tolist() == [[100, 60]]
    assert sg_rig.dev.counters.pfn_bytes == 0
    assert sg_rig.dev.balloon_pages == 60


def test_rejection_unaligned_sg_chunk(sg_rig: Rig) -> None:
    sg_rig.send(
        BalloonQueue.INFLATE,
        [(100 * PAGE_SIZE + 8, PAGE_SIZE, False), (200 * PAGE_SIZE, 100, False)],
    )
    results, _ = sg_rig.dev.process(BalloonQueue.INFLATE)
    assert results[0].pages == 0
    assert [r.reason for r in results[0].rejections] == ["unaligned", "unaligned"]


def test_sg_overlapping_chunks_count_pages_once(sg_rig: Rig) -> None:
    sg_rig.send(
        BalloonQueue.INFLATE,
        [(100 * PAGE_SIZE, 10 * PAGE_SIZE, False), (105 * PAGE_SIZE, 10 * PAGE_SIZE, False)],
    )
    results, _ = sg_rig.dev.process(BalloonQueue.INFLATE)
    assert results[0].ranges.tolist() == [[100, 15]]
    assert [(r.reason, r.first_pfn, r.count) for r in results[0].rejections] == [
        ("duplicate", 105, 5)
    ]


def test_sg_deflate_of_pages_not_in_balloon(sg_rig: Rig) -> None:
    sg_rig.send(BalloonQueue.INFLATE, [(100 * PAGE_SIZE, 4 * PAGE_SIZE, False)])
    sg_rig.dev.process(BalloonQueue.INFLATE)
    sg_rig.send(BalloonQueue.DEFLATE, [(102 * PAGE_SIZE, 4 * PAGE_SIZE, False)])
    results, _ = sg_rig.dev.process(BalloonQueue.DEFLATE)
    assert results[0].ranges.tolist() == [[102, 2]]
    assert [(r.reason, r.first_pfn, r.count) for r in results[0].rejections] == [
        ("not-in-balloon", 104, 2)
    ]
    assert sg_rig.dev.balloon_pages == 2


# --- real discards -------------------------------------------------------------------------
@pytest.mark.parametrize("backing", [Backing.ANON, Backing.MEMFD])
@pytest.mark.parametrize("strategy", list(DiscardStrategy))
def test_inflate_really_frees_memory(backing: Backing, strategy: DiscardStrategy) -> None:
    rig = make_rig(SEED_SG, backing=backing, discard=strategy)
    try:
        first, count = 512, 256  # 1 MiB of guest RAM, made resident with a pattern
        rig.mem.write(first * PAGE_SIZE, b"\xa5" * count * PAGE_SIZE)
        resident = rig.mem.resident_bytes()
        rig.send(BalloonQueue.INFLATE, [(first * PAGE_SIZE, count * PAGE_SIZE, False)])
        rig.dev.process(BalloonQueue.INFLATE)
        freed = resident - rig.mem.resident_bytes()
        assert freed >= count * PAGE_SIZE * 0.9
        assert rig.mem.read(first * PAGE_SIZE, count * PAGE_SIZE) == bytes(count * PAGE_SIZE)
        expected_calls = 1 if strategy is DiscardStrategy.PER_RANGE else count
        assert rig.dev.counters.discard_syscalls == expected_calls
        assert rig.dev.counters.discarded_bytes == count * PAGE_SIZE
    finally:
        rig.mem.close()


def test_discards_never_leave_guest_ram() -> None:
    # Two RAM regions with a hole: PFNs in the hole are rejected, nothing there is touched.
    with GuestMemory.create([(0, 1 << 20), (2 << 20, 1 << 20)]) as mem:
        dev = BalloonDevice(mem)
        dev.set_features(dev.offered)
        layout = RingLayout.packed(16)
        driver = MockDriverQueue(mem, layout, event_idx=True)
        dev.attach_queue(0, 16, layout.desc, layout.avail, layout.used)
        calls: list[tuple[int, int]] = []
        real = mem.discard

        def spy(addr: int, length: int):  # type: ignore[no-untyped-def]
            calls.append((addr, length))
            return real(addr, length)

        mem.discard = spy  # type: ignore[method-assign]
        mem.write(0x8000, pfn_array([255, 256, 300, 511, 512, 767, 768]))
        driver.add_chain([(0x8000, 28, False)])
        results, _ = dev.process(BalloonQueue.INFLATE)
        assert results[0].ranges.tolist() == [[255, 1], [512, 1], [767, 1]]
        assert calls == [(p * PAGE_SIZE, PAGE_SIZE) for p in (255, 512, 767)]
        assert [(r.reason, r.first_pfn) for r in results[0].rejections] == [
            ("out-of-ram", 256),
            ("out-of-ram", 300),
            ("out-of-ram", 511),
            ("out-of-ram", 768),
        ]


# --- free page reporting -------------------------------------------------------------------
def test_reporting_discards_without_ballooning(rig: Rig) -> None:
    rig.send(BalloonQueue.REPORTING, [(256 * PAGE_SIZE, 64 * PAGE_SIZE, True)])
    results, _ = rig.dev.process(BalloonQueue.REPORTING)
    assert results[0].ranges.tolist() == [[256, 64]]
    assert rig.dev.balloon_pages == 0
    assert rig.dev.counters.pages_reported == 64


def test_reporting_buffer_must_be_device_writable(rig: Rig) -> None:
    rig.send(BalloonQueue.REPORTING, [(256 * PAGE_SIZE, PAGE_SIZE, False)])
    with pytest.raises(errors.WrongDirection):
        rig.dev.process(BalloonQueue.REPORTING)


# --- stats ---------------------------------------------------------------------------------
def test_stats_are_decoded_kept_and_requested_again(rig: Rig) -> None:
    now = [1000.0]
    rig.dev._clock = lambda: now[0]
    data = stats_buffer(
        [
            (StatTag.MEMFREE, 1 << 30),
            (StatTag.AVAIL, 3 << 29),
            (StatTag.DIRECT_RECLAIMS, 7),
            (99, 5),
        ]
    )
    addr = rig.heap.alloc(len(data))
    rig.mem.write(addr, data)
    rig.send(BalloonQueue.STATS, [(addr, len(data), False)])
    results, notify = rig.dev.process(BalloonQueue.STATS)
    assert results == [] and not notify  # the buffer is held, not returned
    assert rig.dev.stats is not None
    assert rig.dev.stats.by_name() == {
        "free-memory": 1 << 30,
        "available-memory": 3 << 29,
        "direct-reclaims": 7,
        "tag-99": 5,
    }
    assert rig.dev.stats_updated == 1000.0
    assert rig.dev.request_stats()
    assert rig.drivers[BalloonQueue.STATS].reclaim() == [(0, 0)]


def test_linux_6_12_stats_tags_10_to_15_decode_by_qemus_names() -> None:
    """Tags and names as include/uapi/linux/virtio_balloon.h and QEMU's balloon_stat_names
    (minus ``stat-``) give them; units as update_balloon_vm_stats converts them."""
    assert [int(tag) for tag in spec.EXTENDED_STAT_TAGS] == list(range(10, 16))
    assert spec.EXTENDED_STAT_NAMES == (
        "oom-kills",
        "alloc-stalls",
        "async-scans",
        "direct-scans",
        "async-reclaims",
        "direct-reclaims",
    )
    assert tuple(StatTag) == spec.CLASSIC_STAT_TAGS + spec.EXTENDED_STAT_TAGS
    # pages_to_bytes for the four scan/reclaim amounts; OOM kills and stalls are counts.
    assert {"async-scans", "direct-scans", "async-reclaims", "direct-reclaims"} <= spec.BYTE_STATS
    assert not {"oom-kills", "alloc-stalls", "major-faults", "htlb-pgfail"} & spec.BYTE_STATS


def test_stats_with_all_sixteen_tags_decode_by_name(rig: Rig) -> None:
    # A Linux 6.12 guest's buffer, in its order: vm events (10-15 in the middle), then sizes.
    order = [0, 1, 2, 3, 10, 11, 12, 13, 14, 15, 8, 9, 4, 5, 6, 7]
    data = stats_buffer([(tag, 1000 + tag) for tag in order])
    addr = rig.heap.alloc(len(data))
    rig.mem.write(addr, data)
    rig.send(BalloonQueue.STATS, [(addr, len(data), False)])
    rig.dev.process(BalloonQueue.STATS)
    assert rig.dev.stats is not None
    named = rig.dev.stats.by_name()
    assert named == {spec.STAT_NAMES[tag]: 1000 + tag for tag in order}
    assert {name: named[name] for name in spec.EXTENDED_STAT_NAMES} == {
        "oom-kills": 1010,
        "alloc-stalls": 1011,
        "async-scans": 1012,
        "direct-scans": 1013,
        "async-reclaims": 1014,
        "direct-reclaims": 1015,
    }
    assert rig.dev.stats.rejections == ()


def test_stats_trailing_bytes_are_rejected_not_fatal(rig: Rig) -> None:
    data = stats_buffer([(StatTag.MEMTOT, 4 << 20)]) + b"\x00\x01\x02"
    addr = rig.heap.alloc(len(data))
    rig.mem.write(addr, data)
    rig.send(BalloonQueue.STATS, [(addr, len(data), False)])
    rig.dev.process(BalloonQueue.STATS)
    assert rig.dev.stats is not None
    assert rig.dev.stats.by_name() == {"total-memory": 4 << 20}
    assert [r.reason for r in rig.dev.stats.rejections] == ["bad-length"]


def test_stats_buffer_must_be_device_readable(rig: Rig) -> None:
    addr = rig.heap.alloc(10)
    rig.send(BalloonQueue.STATS, [(addr, 10, True)])
    with pytest.raises(errors.WrongDirection):
        rig.dev.process(BalloonQueue.STATS)


# --- config space and negotiation ----------------------------------------------------------
def test_config_space(rig: Rig) -> None:
    changes: list[int] = []
    rig.dev._on_config_change = lambda: changes.append(rig.dev.config.num_pages)
    rig.dev.set_target_pages(300)
    assert changes == [300]
    assert np.frombuffer(rig.dev.read_config(0, 16), "<u4").tolist() == [300, 0, 0, 0]
    rig.dev.write_config(spec.CONFIG_ACTUAL_OFF, (120).to_bytes(4, "little"))
    rig.dev.write_config(spec.CONFIG_NUM_PAGES_OFF, (5).to_bytes(4, "little"))  # ignored
    assert (rig.dev.config.num_pages, rig.dev.config.actual) == (300, 120)
    rig.dev.write_config(spec.CONFIG_POISON_VAL_OFF, b"\xaa\xaa\xaa\xaa")
    assert rig.dev.config.poison_val == 0xAAAAAAAA  # page-poison is negotiated here
    rig.dev.set_target_pages(10**9)
    assert rig.dev.config.num_pages == RAM // PAGE_SIZE  # never more than RAM


def test_negotiation_refuses_unoffered_features() -> None:
    with GuestMemory.simple(RAM) as mem:
        dev = BalloonDevice(mem, profile=SEED_SG)
        with pytest.raises(errors.NegotiationError, match="did not offer"):
            dev.set_features(dev.offered | 1 << spec.VIRTIO_F_RING_PACKED)
        assert not dev.status & spec.DeviceStatus.FEATURES_OK


def test_queue_layout_follows_acked_features() -> None:
    with GuestMemory.simple(RAM) as mem:
        dev = BalloonDevice(mem)
        dev.set_features(VIRTIO_1_2.encode(["version-1", "page-reporting"]))
        assert dev.queue_roles == (
            BalloonQueue.INFLATE,
            BalloonQueue.DEFLATE,
            BalloonQueue.REPORTING,
        )
        with pytest.raises(ValueError, match="3 queues"):
            dev.attach_queue(3, 16, 0, 0x100, 0x200)


def test_inflate_in_ram_at_an_unaligned_base() -> None:
    # Regression: with RAM starting at 0x800, page 5 is whole RAM and must be discardable;
    # the device used to let a GuestMemoryError escape after updating its bitmap.
    with GuestMemory.from_image(bytes(0x10000), base=0x800) as mem:
        dev = BalloonDevice(mem)
        dev.set_features(dev.offered)
        layout = RingLayout.packed(16, 0x1000)
        driver = MockDriverQueue(mem, layout, event_idx=True)
        dev.attach_queue(0, 16, layout.desc, layout.avail, layout.used)
        mem.write(0x3000, pfn_array([5, 0]))  # page 0 is only half RAM
        driver.add_chain([(0x3000, 8, False)])
        results, _ = dev.process(BalloonQueue.INFLATE)
        assert results[0].ranges.tolist() == [[5, 1]]
        assert [(r.reason, r.first_pfn) for r in results[0].rejections] == [("out-of-ram", 0)]
        assert dev.balloon_pages == 1


def test_reporting_keeps_poisoned_pages(rig: Rig) -> None:
    # 5.5.6.7.2: with PAGE_POISON and a poison value, reported pages must keep it.
    assert rig.dev.has("page-poison")
    rig.dev.write_config(spec.CONFIG_POISON_VAL_OFF, b"\xaa" * 4)
    rig.mem.write(256 * PAGE_SIZE, b"\xaa" * PAGE_SIZE)
    rig.send(BalloonQueue.REPORTING, [(256 * PAGE_SIZE, PAGE_SIZE, True)])
    rig.dev.process(BalloonQueue.REPORTING)
    assert rig.mem.read(256 * PAGE_SIZE, PAGE_SIZE) == b"\xaa" * PAGE_SIZE
    assert rig.dev.counters.pages_reported == 1
    rig.dev.write_config(spec.CONFIG_POISON_VAL_OFF, bytes(4))  # no poison: discard again
    rig.send(BalloonQueue.REPORTING, [(256 * PAGE_SIZE, PAGE_SIZE, True)])
    rig.dev.process(BalloonQueue.REPORTING)
    assert rig.mem.read(256 * PAGE_SIZE, PAGE_SIZE) == bytes(PAGE_SIZE)


def test_notify_on_empty(rig: Rig) -> None:
    # Legacy NOTIFY_ON_EMPTY: the driver is interrupted when the device runs dry, even if
    # it asked for no interrupts.
    with GuestMemory.simple(RAM) as mem:
        dev = BalloonDevice(mem)
        dev.set_features(VIRTIO_1_2.encode(["notify-on-empty"]))
        layout = RingLayout.packed(16)
        driver = MockDriverQueue(mem, layout)
        dev.attach_queue(0, 16, layout.desc, layout.avail, layout.used)
        driver.set_avail_flags(spec.VIRTQ_AVAIL_F_NO_INTERRUPT)
        mem.write(0x8000, pfn_array([500]))
        driver.add_chain([(0x8000, 4, False)])
        _, notify = dev.process(BalloonQueue.INFLATE)
        assert notify
