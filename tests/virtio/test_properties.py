"""Property tests: hostile rings, page-range merging, classification and device discards.

Every property compares the code under test with something that cannot share its bugs: a
guest memory that asserts each access it serves, a plain-Python oracle over sets and
sorted lists, or the list of regions the test itself laid out.
"""

from __future__ import annotations

import itertools
import json
import struct
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from unittest import mock

import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from balloonctl import errors
from balloonctl.virtio import queue as queue_module
from balloonctl.virtio import spec
from balloonctl.virtio.balloon import BalloonDevice, DiscardStrategy
from balloonctl.virtio.features import SEED_SG, VIRTIO_1_2, Profile
from balloonctl.virtio.inspect import (
    Decode,
    RingParams,
    _ranges_json,
    parse_ring,
    render_ring_json,
)
from balloonctl.virtio.layout import RingLayout
from balloonctl.virtio.memory import Backing, DiscardResult, GuestMemory, Region
from balloonctl.virtio.mock import (
    Buffer,
    BumpAllocator,
    MockDriverQueue,
    pfn_array,
)
from balloonctl.virtio.pages import (
    DUPLICATE,
    NOT_IN_BALLOON,
    OUT_OF_RAM,
    RamMap,
    classify_runs,
    compact,
    expand_ranges,
    merge_ranges,
)
from balloonctl.virtio.pages import classify as classify_pages
from balloonctl.virtio.queue import SplitQueue
from balloonctl.virtio.spec import BalloonQueue

U64 = 1 << 64
PAGE = 4096


def _subclasses(cls: type) -> set[type]:
    out: set[type] = set()
    sub: type
    for sub in cls.__subclasses__():
        out |= {sub} | _subclasses(sub)
    return out


VIRTIO_ERROR_NAMES = frozenset(c.__name__ for c in _subclasses(errors.VirtioError))


# --- a guest memory that checks every access ------------------------------------------------
class CheckedMemory(GuestMemory):
    """Guest memory that asserts every access lies inside its regions and records it.

    The bounds are computed here from the regions, not with ``GuestMemory.contains``, so a
    bug there cannot hide one in the queue. ``frozen`` forbids writes (read-only queues).
    """

    def __init__(self, regions: Sequence[Region]) -> None:
        super().__init__(regions)
        self.spans = [(r.base, r.end) for r in self.regions]
        self.accesses: list[tuple[int, int]] = []
        self.frozen = False

    def inside(self, addr: int, length: int) -> bool:
        """Whether every byte of ``[addr, addr + length)`` belongs to some region."""
        if length == 0:
            return any(lo <= addr <= hi for lo, hi in self.spans)
        covered = sum(max(0, min(hi, addr + length) - max(lo, addr)) for lo, hi in self.spans)
        return addr >= 0 and length > 0 and covered == length

    def _check(self, addr: int, length: int) -> None:
        self.accesses.append((addr, length))
        assert self.inside(addr, length), f"access {addr:#x}+{length:#x} outside {self.spans}"

    def read(self, addr: int, length: int) -> bytes:
        self._check(addr, length)
        return super().read(addr, length)

    def pieces(self, addr: int, length: int) -> Iterator[tuple[Region, int, int]]:
        self._check(addr, length)
        for region, offset, n in super().pieces(addr, length):
            assert offset >= 0 and offset + n <= region.size
            yield region, offset, n

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        assert not self.frozen, f"write of {len(data)} bytes at {addr:#x} to a read-only ring"
        super().write(addr, data)


class _CheckedTable(queue_module._Table):
    """The queue's descriptor table, asserting that no entry past its end is read.

    The table's own fast path reads the region's view directly; its extent was checked
    once through ``mem.pieces`` (see CheckedMemory), so an in-range index is an in-memory
    read.
    """

    def read(self, index: int) -> tuple[int, int, int, int]:
        assert 0 <= index < self.entries, f"descriptor {index} of a {self.entries}-entry table"
        return super().read(index)


@contextmanager
def checked_tables() -> Iterator[None]:
    with mock.patch.object(queue_module, "_Table", _CheckedTable):
        yield


@dataclass(frozen=True)
class RingCase:
    """A memory image and the queue parameters a (possibly hostile) guest gave."""

    image: bytes
    base: int
    size: int
    desc: int
    avail: int
    used: int
    last_avail: int
    event_idx: bool
    indirect: bool
    #: 0: the image is one region; else it is two adjacent regions split at this offset
    #: (any byte, even inside a descriptor), so reads have to cross from one to the other.
    split: int = 0

    def memory(self) -> CheckedMemory:
        if 0 < self.split < len(self.image):
            regions = [
                Region.from_bytes(self.base, self.image[: self.split]),
                Region.from_bytes(self.base + self.split, self.image[self.split :]),
            ]
        else:
            regions = [Region.from_bytes(self.base, self.image)]
        mem = CheckedMemory(regions)
        mem.frozen = True
        return mem

    def avail_idx(self) -> int | None:
        """avail.idx as written in the image, or None if it is not in the image."""
        off = self.avail + spec.AVAIL_IDX_OFF - self.base
        if off < 0 or off + 2 > len(self.image):
            return None
        return int.from_bytes(self.image[off : off + 2], "little")


def pop_all(case: RingCase) -> None:
    """Pop until None; only a VirtioError may stop it, and nothing may be written."""
    with case.memory() as mem, checked_tables():
        try:
            queue = SplitQueue(
                mem,
                case.size,
                case.desc,
                case.avail,
                case.used,
                last_avail_idx=case.last_avail,
                event_idx=case.event_idx,
                indirect=case.indirect,
                read_only=True,
            )
            popped = 0
            while (chain := queue.pop()) is not None:
                popped += 1
                assert popped <= case.size
                event(f"popped {min(popped, 3)}+")
                assert 0 <= chain.head < case.size
                for desc in chain:
                    assert mem.inside(desc.addr, desc.len)
                    assert desc.len > 0
        except errors.VirtioError as exc:
            event(type(exc).__name__)
        assert b"".join(bytes(r.view) for r in mem.regions) == case.image
        assert all(mem.inside(a, n) for a, n in mem.accesses)


def parse_all(case: RingCase) -> None:
    """parse_ring with every decoding: a well-formed result, a VirtioError name or None."""
    for decode in Decode:
        with case.memory() as mem, checked_tables():
            params = RingParams(case.size, case.desc, case.avail, case.used, case.last_avail)
            result = parse_ring(mem, params, decode)
            assert set(result) == {"chains", "error"}
            chains, error = result["chains"], result["error"]
            assert isinstance(chains, list)
            for chain in chains:
                assert isinstance(chain, dict)
                assert 0 <= chain["head"] < case.size
                assert isinstance(chain["pages"], list)
                assert isinstance(chain["rejected"], list)
            if error is None:
                idx = case.avail_idx()
                assert idx is not None  # the avail ring was in memory: no error
                assert len(chains) == (idx - case.last_avail) & 0xFFFF
            else:
                assert isinstance(error, dict)
                assert error["type"] in VIRTIO_ERROR_NAMES
                assert isinstance(error["message"], str)
            assert b"".join(bytes(r.view) for r in mem.regions) == case.image


# --- strategies ---------------------------------------------------------------------------
POWERS = [1 << i for i in range(16)]  # 1 .. 32768
SMALL_POWERS = [1, 2, 4, 8, 16, 32]
# Mostly sizes a 4 KiB image can hold a ring of; also any power of two and any int.
queue_sizes = st.one_of(
    *[st.sampled_from(SMALL_POWERS)] * 3, st.sampled_from(POWERS), st.integers(0, 70000)
)
near_top = st.integers(U64 - 4096, U64 - 1)
any_u64 = st.integers(0, U64 - 1)


@st.composite
def arbitrary_rings(draw: st.DrawFn) -> RingCase:
    image = draw(
        st.one_of(st.binary(min_size=1, max_size=64), st.binary(min_size=256, max_size=4096))
    )
    base = draw(
        st.one_of(
            st.just(0),
            st.integers(0, 1 << 40),
            st.just(U64 - len(image)),  # the image ends at the top of the address space
        )
    )

    size = draw(queue_sizes)

    # Mostly rings whose three parts fit in the image, aligned, so that pops happen; else
    # each address anywhere in the image (unaligned, straddling its end), anywhere at all,
    # or near 2**64.
    plausible = draw(st.integers(0, 3)) > 0

    def address(align: int, part: int) -> st.SearchStrategy[int]:
        fits = st.integers(0, max(0, len(image) - part)).map(lambda off: base + off)
        aligned = fits.map(lambda a: a + (-a % align))
        if plausible:
            return aligned
        inside = st.integers(0, len(image)).map(lambda off: base + off)
        return st.one_of(aligned, inside, any_u64, near_top)

    desc = draw(address(spec.DESC_ALIGN, spec.desc_table_size(max(size, 0))))
    avail = draw(address(spec.AVAIL_ALIGN, spec.avail_ring_size(max(size, 0))))
    used = draw(address(spec.USED_ALIGN, spec.used_ring_size(max(size, 0))))
    last_avail = draw(st.integers(0, 0xFFFF))
    idx_off = avail + spec.AVAIL_IDX_OFF - base
    if 0 <= idx_off <= len(image) - 2 and draw(st.booleans()):
        # Often a last_avail_idx a few entries behind avail.idx, so chains get popped.
        idx = int.from_bytes(image[idx_off : idx_off + 2], "little")
        last_avail = (idx - draw(st.integers(0, max(size, 0)))) & 0xFFFF
    return RingCase(
        image=image,
        base=base,
        size=size,
        desc=desc,
        avail=avail,
        used=used,
        last_avail=last_avail,
        event_idx=draw(st.booleans()),
        indirect=draw(st.booleans()),
        split=draw(st.one_of(st.just(0), st.integers(0, len(image)))),
    )


MUTATED_MEM = 0x4000  # 16 KiB: 4 pages
interesting = st.one_of(
    st.integers(0, 0xFFFF),
    st.sampled_from([0, 1, 2, 4, 15, 16, 17, 0xFFFF, 0xFFFFFFFF, U64 - 1, U64 - 16]),
    st.integers(0, U64 - 1),
)


@st.composite
def mutated_rings(draw: st.DrawFn) -> RingCase:
    """An honest driver's ring, then a few fields or bytes overwritten by hypothesis."""
    size = draw(st.sampled_from([1, 2, 4, 8, 16]))
    base = draw(st.sampled_from([0, 0x10000, U64 - MUTATED_MEM]))
    with GuestMemory.from_image(bytes(MUTATED_MEM), base) as mem:
        layout = RingLayout.packed(size, base)
        driver = MockDriverQueue(mem, layout)
        heap = BumpAllocator(layout.end, base + MUTATED_MEM)
        pages = [base + p * PAGE for p in range(MUTATED_MEM // PAGE)]

        def buffer() -> Buffer:
            if draw(st.booleans()):
                # A PFN array (for pfn decoding; an arbitrary readable buffer otherwise).
                pfns = draw(st.lists(st.integers(0, 0xFFFFFFFF), min_size=1, max_size=8))
                data = pfn_array(pfns)
                addr = heap.alloc(len(data), 4)
                mem.write(addr, data)
                return (addr, len(data), draw(st.booleans()))
            # A page-aligned chunk (for sg and report decoding).
            first = draw(st.integers(0, len(pages) - 1))
            count = draw(st.integers(1, len(pages) - first))
            return (pages[first], count * PAGE, draw(st.booleans()))

        for _ in range(draw(st.integers(0, size))):
            free = size - sum(len(ids) for ids in driver._chains.values())
            if free == 0:
                break
            buffers = [buffer() for _ in range(draw(st.integers(1, min(3, free))))]
            buffers.sort(key=lambda b: b[2])  # readable first, as an honest driver does
            if draw(st.booleans()) and free >= 1:
                table = heap.alloc(16 * len(buffers), 16)
                driver.add_indirect_chain(buffers, table)
            else:
                driver.add_chain(buffers)
        image = bytearray(mem.regions[0].view)

    # The fields a hostile guest would change: descriptors, avail idx and ring, used idx.
    fields: list[tuple[int, str]] = []
    for i in range(size):
        d = layout.desc + 16 * i
        fields += [(d, "<Q"), (d + 8, "<I"), (d + 12, "<H"), (d + 14, "<H")]
        fields.append((layout.avail + spec.AVAIL_RING_OFF + 2 * i, "<H"))
    fields += [(layout.avail + spec.AVAIL_IDX_OFF, "<H"), (layout.used + spec.USED_IDX_OFF, "<H")]
    for _ in range(draw(st.integers(0, 3))):
        if draw(st.booleans()):
            addr, fmt = draw(st.sampled_from(fields))
            value = draw(interesting) % (1 << (8 * struct.calcsize(fmt)))
            struct.pack_into(fmt, image, addr - base, value)
        else:
            # Any byte of the ring or of the heap (buffers, indirect tables).
            offset = draw(st.integers(0, heap.next - base - 1))
            image[offset] = draw(st.integers(0, 255))

    return RingCase(
        image=bytes(image),
        base=base,
        size=size,
        desc=layout.desc,
        avail=layout.avail,
        used=layout.used,
        last_avail=draw(st.sampled_from([0, 0, 0, 1, 0xFFFF])),
        event_idx=draw(st.booleans()),
        indirect=draw(st.sampled_from([True, True, False])),
        # Often inside the descriptor table, so _Table takes its two-region path.
        split=draw(
            st.one_of(
                st.just(0),
                st.integers(0, spec.desc_table_size(size)),
                st.integers(0, len(image)),
            )
        ),
    )


SETTINGS = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- a. hostile rings -----------------------------------------------------------------------
@SETTINGS
@given(arbitrary_rings())
def test_arbitrary_ring_pops_only_raise_virtio_errors(case: RingCase) -> None:
    pop_all(case)


@SETTINGS
@given(arbitrary_rings())
def test_arbitrary_ring_parse_ring_reports_only_virtio_errors(case: RingCase) -> None:
    parse_all(case)


@SETTINGS
@given(mutated_rings())
def test_mutated_ring_pops_only_raise_virtio_errors(case: RingCase) -> None:
    pop_all(case)


@SETTINGS
@given(mutated_rings())
def test_mutated_ring_parse_ring_reports_only_virtio_errors(case: RingCase) -> None:
    parse_all(case)


def test_checked_memory_catches_an_out_of_bounds_read() -> None:
    # The oracle itself must be able to fail.
    with CheckedMemory.from_image(bytes(64), 0x1000) as mem:
        assert isinstance(mem, CheckedMemory)
        assert mem.read(0x1000, 64) == bytes(64)
        for addr, length in [(0xFFF, 2), (0x1000 + 63, 2), (0, 1)]:
            try:
                mem.read(addr, length)
            except AssertionError:
                continue
            raise AssertionError(f"read {addr:#x}+{length} was not caught")


def test_checked_tables_are_the_ones_the_queue_uses() -> None:
    with GuestMemory.simple(0x1000) as mem, checked_tables():
        queue = SplitQueue(mem, 4, 0, 0x100, 0x200, read_only=True)
        assert isinstance(queue._table, _CheckedTable)
        try:
            queue._table.read(4)
        except AssertionError:
            return
        raise AssertionError("reading entry 4 of a 4-entry table was not caught")


def test_unmutated_mock_ring_parses_without_error() -> None:
    # The mutated-ring generator with no mutation: every chain comes back.
    with GuestMemory.simple(0x10000) as mem:
        layout = RingLayout.packed(8)
        driver = MockDriverQueue(mem, layout)
        heap = BumpAllocator(layout.end, 0x10000)
        for pfns in ([1, 2, 3], [7], [3, 3]):
            data = pfn_array(pfns)
            addr = heap.alloc(len(data), 4)
            mem.write(addr, data)
            driver.add_chain([(addr, len(data), False)])
        image = bytes(mem.regions[0].view)
    case = RingCase(image, 0, 8, layout.desc, layout.avail, layout.used, 0, False, True)
    with case.memory() as checked:
        result = parse_ring(checked, RingParams(8, case.desc, case.avail, case.used), Decode.PFN)
    assert result["error"] is None
    chains = result["chains"]
    assert isinstance(chains, list)
    assert [c["pages"] for c in chains] == [[[1, 3]], [[7, 1]], [[3, 1]]]


# --- b. PFN -> range merging ----------------------------------------------------------------
def runs_oracle(pfns: list[int]) -> list[list[int]]:
    """sorted(set(pfns)) grouped into maximal runs of consecutive numbers, as [first, n]."""
    out: list[list[int]] = []
    for p in sorted(set(pfns)):
        if out and out[-1][0] + out[-1][1] == p:
            out[-1][1] += 1
        else:
            out.append([p, 1])
    return out


@st.composite
def pfn_lists(draw: st.DrawFn) -> list[int]:
    """PFNs with runs in them (shuffled, with repeats), and scattered ones, all < 2**32."""
    start = st.one_of(st.integers(0, 200), st.integers(0, (1 << 32) - 1 - 16))
    runs = draw(st.lists(st.tuples(start, st.integers(1, 16)), max_size=8))
    values = [first + i for first, n in runs for i in range(n)]
    values += draw(st.lists(st.one_of(st.integers(0, (1 << 32) - 1), st.integers(0, 64))))
    if values:
        values += draw(st.lists(st.sampled_from(values), max_size=10))
    return list(draw(st.permutations(values)))


@settings(max_examples=300, deadline=None)
@given(pfn_lists())
def test_compact_matches_plain_python_runs(pfns: list[int]) -> None:
    ranges = compact(np.array(pfns, dtype=np.int64))
    assert ranges.shape == (len(runs_oracle(pfns)), 2)
    assert ranges.dtype == np.int64
    assert ranges.tolist() == runs_oracle(pfns)
    assert expand_ranges(ranges).tolist() == sorted(set(pfns))


@settings(max_examples=300, deadline=None)
@given(pfn_lists())
def test_merge_ranges_rows_are_sorted_disjoint_and_not_adjacent(pfns: list[int]) -> None:
    rows = merge_ranges(np.array(sorted(set(pfns)), dtype=np.int64)).tolist()
    assert all(count >= 1 for _, count in rows)
    for (first, count), (after, _) in itertools.pairwise(rows):
        assert first + count < after  # sorted, not overlapping, not touching
    assert sum(count for _, count in rows) == len(set(pfns))


# --- c. classify ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ClassifyCase:
    ranges: list[tuple[int, int]]
    pfns: list[int]
    source: list[int]
    ballooned: frozenset[int]
    use_balloon: bool
    inflate: bool


@st.composite
def classify_cases(draw: st.DrawFn) -> ClassifyCase:
    ranges = draw(st.lists(st.tuples(st.integers(0, 200), st.integers(-2, 40)), max_size=6))
    ram = sorted({p for first, count in ranges for p in range(first, first + count)})
    # RAM pages, the pages at and just past each range's ends (off-by-one land), any page.
    edges = sorted({v for f, n in ranges for v in (f - 1, f, f + n - 1, f + n) if v >= 0})
    pfn = st.integers(0, 260)
    if ram:
        pfn = st.one_of(st.sampled_from(ram), st.sampled_from(edges), pfn)
    pfns = draw(st.lists(pfn, max_size=80))
    source = draw(st.lists(st.integers(0, 3), min_size=len(pfns), max_size=len(pfns)))
    source.sort()  # descriptors carry consecutive parts of a request
    ballooned = frozenset(p for p in ram if draw(st.booleans()))
    return ClassifyCase(ranges, pfns, source, ballooned, draw(st.booleans()), draw(st.booleans()))


@settings(max_examples=300, deadline=None)
@given(classify_cases())
def test_classify_matches_plain_python_oracle(case: ClassifyCase) -> None:
    ram_pages = sorted({p for f, n in case.ranges for p in range(f, f + n)})
    ram = RamMap(case.ranges)
    assert ram.total_pages == len(ram_pages)
    balloon = None
    if case.use_balloon:
        dense = {p: i for i, p in enumerate(ram_pages)}
        balloon = np.zeros(ram.total_pages, dtype=bool)
        for p in case.ballooned:
            balloon[dense[p]] = True

    # The oracle: request order, first occurrence of a RAM page counts.
    seen: set[int] = set()
    accepted: list[int] = []
    rejected: list[tuple[int, int, str]] = []  # (pfn, source, reason), request order
    ram_set = set(ram_pages)
    for p, s in zip(case.pfns, case.source, strict=True):
        if p not in ram_set:
            rejected.append((p, s, OUT_OF_RAM))
            continue
        if p in seen:
            rejected.append((p, s, DUPLICATE))
            continue
        seen.add(p)
        if balloon is not None and case.inflate and p in case.ballooned:
            rejected.append((p, s, DUPLICATE))
        elif balloon is not None and not case.inflate and p not in case.ballooned:
            rejected.append((p, s, NOT_IN_BALLOON))
        else:
            accepted.append(p)

    done = classify_pages(
        np.array(case.pfns, dtype=np.int64),
        np.array(case.source, dtype=np.int64),
        ram,
        balloon,
        inflate=case.inflate,
    )
    assert expand_ranges(done.ranges).tolist() == sorted(accepted)
    assert done.ranges.tolist() == runs_oracle(accepted)
    assert done.pages == len(accepted)
    assert sum(r.count for r in done.rejections) + done.pages == len(case.pfns)
    # Each rejection is a run of consecutive pages of one reason and one descriptor;
    # expanded in order they are exactly the oracle's rejected pages.
    expanded = []
    for r in done.rejections:
        assert r.first_pfn is not None
        assert r.count >= 1
        expanded += [(r.first_pfn + i, r.descriptor, r.reason) for i in range(r.count)]
    assert expanded == rejected


# --- d. the device's discards stay in RAM ---------------------------------------------------
class RecordingMemory(GuestMemory):
    """Guest memory that records every discard the device asks for."""

    def __init__(self, regions: Sequence[Region]) -> None:
        super().__init__(regions)
        self.discards: list[tuple[int, int]] = []

    def discard(self, addr: int, length: int) -> DiscardResult:
        self.discards.append((addr, length))
        return super().discard(addr, length)


#: Two 1 MiB regions with a 3 MiB hole: pages 0-255 and 1024-1279.
LAYOUT = [(0, 1 << 20), (4 << 20, 1 << 20)]
RAM_PFNS = frozenset(range(256)) | frozenset(range(1024, 1280))
#: Pages 0-15 hold the rings and the buffers; a guest inflating them would destroy its own
#: rings, so the generated pages avoid them (they are still RAM the oracle knows of).
RESERVED_PAGES = 16
QSIZE = 16


@dataclass
class DeviceRig:
    mem: RecordingMemory
    dev: BalloonDevice
    inflateq: MockDriverQueue
    deflateq: MockDriverQueue
    heap: BumpAllocator

    def run(self, role: BalloonQueue, buffers: list[Buffer]) -> None:
        driver = self.inflateq if role is BalloonQueue.INFLATE else self.deflateq
        driver.add_chain(buffers)
        self.dev.process(role)
        assert len(driver.reclaim()) == 1


def make_device(profile: Profile, strategy: DiscardStrategy) -> DeviceRig:
    mem = RecordingMemory.create(LAYOUT, Backing.BYTES)
    assert isinstance(mem, RecordingMemory)
    dev = BalloonDevice(mem, profile=profile, discard=strategy)
    dev.set_features(dev.offered)
    drivers = []
    for index, base in ((0, 0x0), (1, 0x1000)):
        layout = RingLayout.packed(QSIZE, base)
        drivers.append(MockDriverQueue(mem, layout))
        dev.attach_queue(index, QSIZE, layout.desc, layout.avail, layout.used)
    heap = BumpAllocator(0x2000, RESERVED_PAGES * PAGE)
    return DeviceRig(mem, dev, drivers[0], drivers[1], heap)


def check_discards(rig: DeviceRig, newly: set[int], start: int) -> None:
    """Discards since ``start`` lie wholly in one region and cover exactly ``newly``."""
    pages: Counter[int] = Counter()
    for addr, length in rig.mem.discards[start:]:
        assert length > 0
        assert any(lo <= addr and addr + length <= lo + size for lo, size in LAYOUT), (
            f"discard {addr:#x}+{length:#x} leaves RAM"
        )
        assert addr % PAGE == 0 and length % PAGE == 0
        pages.update(range(addr // PAGE, (addr + length) // PAGE))
    assert set(pages) == newly
    assert all(n == 1 for n in pages.values())  # no page given back twice


# 0-3000 less the reserved pages: the first region, the hole, the second region, beyond.
pfn_values = st.one_of(
    st.integers(RESERVED_PAGES, 255), st.integers(1024, 1279), st.integers(RESERVED_PAGES, 3000)
)
pfn_buffers = st.lists(
    st.one_of(
        st.lists(pfn_values, min_size=1, max_size=40),
        st.lists(pfn_values, min_size=250, max_size=270),
    ),
    min_size=1,
    max_size=3,
)
pfn_steps = st.lists(st.tuples(st.booleans(), pfn_buffers), max_size=6)


@settings(max_examples=120, deadline=None)
@given(pfn_steps, st.sampled_from(DiscardStrategy))
def test_device_discards_stay_in_ram_pfn(
    steps: list[tuple[bool, list[list[int]]]], strategy: DiscardStrategy
) -> None:
    rig = make_device(VIRTIO_1_2, strategy)
    with rig.mem:
        assert rig.dev.form.value == "pfn"
        held: set[int] = set()
        for inflate, buffers in steps:
            chain: list[Buffer] = []
            for pfns in buffers:
                data = pfn_array(pfns)
                addr = rig.heap.alloc(len(data), 4)
                rig.mem.write(addr, data)
                chain.append((addr, len(data), False))
            # A buffer of more than 256 PFNs is skipped whole (bad-length).
            named = {p for pfns in buffers if len(pfns) <= spec.PFNS_PER_BUFFER_MAX for p in pfns}
            start = len(rig.mem.discards)
            role = BalloonQueue.INFLATE if inflate else BalloonQueue.DEFLATE
            rig.run(role, chain)
            if inflate:
                newly = (named & RAM_PFNS) - held
                held |= newly
            else:
                newly = set()
                held -= named
            check_discards(rig, newly, start)
            assert rig.dev.balloon_pages == len(held)
            assert int(rig.dev.balloon.sum()) == len(held)
        assert rig.dev.broken is None


@st.composite
def sg_chunk(draw: st.DrawFn) -> tuple[int, int]:
    page = draw(pfn_values)
    count = draw(st.integers(1, 8))
    addr_off = draw(st.sampled_from([0, 0, 0, 0, 0, 1, 2048]))
    len_off = draw(st.sampled_from([0, 0, 0, 0, 0, 16, 2048]))
    return page * PAGE + addr_off, count * PAGE + len_off


sg_steps = st.lists(
    st.tuples(st.booleans(), st.lists(sg_chunk(), min_size=1, max_size=3)), max_size=6
)


@settings(max_examples=120, deadline=None)
@given(sg_steps, st.sampled_from(DiscardStrategy))
def test_device_discards_stay_in_ram_sg(
    steps: list[tuple[bool, list[tuple[int, int]]]], strategy: DiscardStrategy
) -> None:
    rig = make_device(SEED_SG, strategy)

    def in_ram(addr: int, length: int) -> bool:
        return any(lo <= addr and addr + length <= lo + size for lo, size in LAYOUT)

    with rig.mem:
        assert rig.dev.form.value == "sg"
        held: set[int] = set()
        for inflate, chunks in steps:
            role = BalloonQueue.INFLATE if inflate else BalloonQueue.DEFLATE
            start = len(rig.mem.discards)
            if not all(in_ram(a, n) for a, n in chunks):
                # A chunk outside RAM is a ring-level error: the device stops the queue.
                try:
                    rig.run(role, [(a, n, False) for a, n in chunks])
                except errors.BufferOutOfBounds:
                    pass
                else:
                    raise AssertionError(f"chunks {chunks} outside RAM were served")
                assert isinstance(rig.dev.broken, errors.BufferOutOfBounds)
                assert len(rig.mem.discards) == start
                assert rig.dev.balloon_pages == len(held)
                return
            named = {
                p
                for a, n in chunks
                if a % PAGE == 0 and n % PAGE == 0  # unaligned chunks are skipped
                for p in range(a // PAGE, (a + n) // PAGE)
            }
            assert named <= RAM_PFNS
            rig.run(role, [(a, n, False) for a, n in chunks])
            if inflate:
                newly = named - held
                held |= newly
            else:
                newly = set()
                held -= named
            check_discards(rig, newly, start)
            assert rig.dev.balloon_pages == len(held)
            assert rig.dev.counters.pfn_bytes == 0  # SG: no PFN arrays read


def test_discard_recorder_sees_the_device() -> None:
    # One concrete inflate, so the property's recorder is known to be on the device's path.
    rig = make_device(VIRTIO_1_2, DiscardStrategy.PER_RANGE)
    with rig.mem:
        data = pfn_array([20, 21, 22, 1030, 300])
        addr = rig.heap.alloc(len(data), 4)
        rig.mem.write(addr, data)
        rig.run(BalloonQueue.INFLATE, [(addr, len(data), False)])
        assert rig.mem.discards == [(20 * PAGE, 3 * PAGE), (1030 * PAGE, PAGE)]
        assert rig.dev.balloon_pages == 4


# --- classify_runs: the SG fast path agrees with the page-by-page classifier --------------
@st.composite
def run_cases(draw: st.DrawFn) -> tuple[np.ndarray, RamMap, np.ndarray, bool]:
    ram_ranges = draw(
        st.lists(st.tuples(st.integers(0, 300), st.integers(1, 80)), min_size=1, max_size=3)
    )
    ram = RamMap(ram_ranges)
    runs = draw(
        st.lists(st.tuples(st.integers(0, 400), st.integers(1, 40)), min_size=0, max_size=8)
    )
    held = draw(st.lists(st.booleans(), min_size=ram.total_pages, max_size=ram.total_pages))
    return (
        np.asarray(runs, dtype=np.int64).reshape(-1, 2),
        ram,
        np.asarray(held, dtype=bool),
        draw(st.booleans()),
    )


@settings(max_examples=1500, deadline=None)
@given(run_cases(), st.booleans())
def test_classify_runs_matches_classify(
    case: tuple[np.ndarray, RamMap, np.ndarray, bool], with_balloon: bool
) -> None:
    runs, ram, held, inflate = case
    balloon = held if with_balloon else None
    source = np.arange(len(runs), dtype=np.int64)
    fast = classify_runs(runs, source, ram, balloon, inflate=inflate)
    slow = classify_pages(
        expand_ranges(runs), np.repeat(source, runs[:, 1]), ram, balloon, inflate=inflate
    )
    assert fast.ranges.tolist() == slow.ranges.tolist()
    assert fast.rejections == slow.rejections


# --- render_ring_json: the CLI's fast JSON is exactly parse_ring's ------------------------
@settings(max_examples=200, deadline=None)
@given(mutated_rings(), st.sampled_from(list(Decode)))
def test_render_ring_json_equals_parse_ring(case: RingCase, decode: Decode) -> None:
    with GuestMemory.from_image(bytes(case.image), base=case.base) as mem:
        params = RingParams(case.size, case.desc, case.avail, case.used, case.last_avail)
        text, finding = render_ring_json(mem, params, decode)
        expected = parse_ring(mem, params, decode)
        assert json.loads(text) == expected
        assert finding is (expected["error"] is not None)


def test_render_ranges_json_edge_values() -> None:
    arrays = [
        np.empty((0, 2), dtype=np.int64),
        np.array([[0, 1], [9, 10], [99, 100], [2**52 - 1, 123456789]], dtype=np.int64),
        np.empty((0, 2), dtype=np.int64),
        np.array([[10**17, 1]], dtype=np.int64),
    ]
    assert _ranges_json(arrays) == [
        "[]",
        "[[0,1],[9,10],[99,100],[4503599627370495,123456789]]",
        "[]",
        "[[100000000000000000,1]]",
    ]


@settings(max_examples=500, deadline=None)
@given(
    st.lists(
        st.lists(
            st.tuples(st.integers(0, 2**52 - 1), st.integers(1, 2**32)), min_size=0, max_size=12
        ),
        min_size=0,
        max_size=8,
    )
)
def test_render_ranges_json_matches_json_module(chains: list[list[tuple[int, int]]]) -> None:
    arrays = [np.asarray(c, dtype=np.int64).reshape(-1, 2) for c in chains]
    expected = [json.dumps([list(r) for r in c], separators=(",", ":")) for c in chains]
    assert _ranges_json(arrays) == expected
