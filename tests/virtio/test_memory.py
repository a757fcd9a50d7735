"""Guest memory: bounds, little-endian access, region layout, and discards that free memory.

The anon and memfd discards are checked against the kernel, not against balloonctl's own
accounting alone: mincore(2) for the anonymous mapping's pages, st_blocks for the memfd.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import pytest

from balloonctl.errors import GuestMemoryError
from balloonctl.virtio.memory import Backing, GuestMemory, Region

PAGE = 4096
U64 = 1 << 64
PAGES = 64

_libc = ctypes.CDLL(None, use_errno=True)


def resident_pages(addr: int, length: int) -> int:
    """Pages of ``[addr, addr + length)`` the kernel has mapped in, by mincore(2)."""
    count = -(-length // PAGE)
    vec = (ctypes.c_ubyte * count)()
    if _libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(length), vec) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return sum(b & 1 for b in vec)


def pattern(pages: int) -> bytes:
    """Nonzero bytes, different in every page."""
    return b"".join(bytes([(i % 255) + 1]) * PAGE for i in range(pages))


# --- bounds -------------------------------------------------------------------------------
def test_contains_joins_adjacent_regions() -> None:
    with GuestMemory.create([(0, 0x1000), (0x1000, 0x1000)]) as mem:
        assert mem.contains(0, 0x2000)
        assert mem.contains(0x800, 0x1000)
        assert mem.contains(0xFFF, 2)
        assert not mem.contains(0x800, 0x1801)
        assert mem.size == 0x2000
        assert mem.end == 0x2000


def test_contains_stops_at_a_hole() -> None:
    with GuestMemory.create([(0, 0x1000), (0x2000, 0x1000)]) as mem:
        assert mem.contains(0, 0x1000)
        assert mem.contains(0x2000, 0x1000)
        assert not mem.contains(0x800, 0x1000)
        assert not mem.contains(0xFFF, 2)
        assert not mem.contains(0x1000, 1)
        assert not mem.contains(0x1800, 0x1000)
        assert not mem.contains(0, 0x3000)
        assert not mem.contains(0x3000, 1)


def test_contains_edges() -> None:
    with GuestMemory.create([(0x1000, 0x1000)]) as mem:
        assert not mem.contains(0xFFF, 1)
        assert not mem.contains(-1, 2)
        assert not mem.contains(0x1000, -1)
        assert mem.contains(0x1FFF, 1)
        assert not mem.contains(0x1FFF, 2)


def test_contains_never_wraps_past_2_64() -> None:
    top = U64 - 0x1000
    with GuestMemory.create([(0, 0x1000), (top, 0x1000)]) as mem:
        assert mem.contains(U64 - 0x10, 0x10)
        assert not mem.contains(U64 - 0x10, 0x11)
        assert not mem.contains(U64 - 1, 2)  # would wrap onto address 0, which is RAM
        assert not mem.contains(U64 - 1, U64)
        assert not mem.contains(U64, 1)
        assert mem.read_u64(U64 - 8) == 0
        with pytest.raises(GuestMemoryError):
            mem.read_u16(U64 - 1)
        with pytest.raises(GuestMemoryError):
            mem.write(U64 - 4, bytes(8))


def test_region_must_fit_the_64_bit_space() -> None:
    Region(U64 - PAGE, PAGE).close()  # ends exactly at 2**64
    for base, size in [(U64 - PAGE, PAGE + 1), (-PAGE, PAGE), (0, 0), (0, -1)]:
        with pytest.raises(GuestMemoryError):
            Region(base, size)


# --- access -------------------------------------------------------------------------------
def test_little_endian_writes() -> None:
    with GuestMemory.simple(0x100) as mem:
        mem.write_u16(0x10, 0x1122)
        mem.write_u32(0x20, 0x11223344)
        mem.write_u64(0x30, 0x1122334455667788)
        assert mem.read(0x10, 2) == b"\x22\x11"
        assert mem.read(0x20, 4) == b"\x44\x33\x22\x11"
        assert mem.read(0x30, 8) == bytes.fromhex("8877665544332211")


def test_little_endian_reads() -> None:
    with GuestMemory.from_image(bytes(range(16)), base=0x7000) as mem:
        assert mem.read_u16(0x7000) == 0x0100
        assert mem.read_u32(0x7004) == 0x07060504
        assert mem.read_u64(0x7008) == 0x0F0E0D0C0B0A0908
        assert mem.read(0x7000, 16) == bytes(range(16))
        assert mem.read(0x7010, 0) == b""
        with pytest.raises(GuestMemoryError):
            mem.read_u64(0x700C)
        with pytest.raises(GuestMemoryError):
            mem.read(0x6FFF, 1)


def test_access_across_adjacent_regions() -> None:
    with GuestMemory.create([(0x1000, 0x1000), (0, 0x1000)]) as mem:  # any order
        assert [r.base for r in mem.regions] == [0, 0x1000]
        mem.write_u64(0xFFC, 0x1122334455667788)
        assert mem.read_u64(0xFFC) == 0x1122334455667788
        assert bytes(mem.regions[0].view[-4:]) == bytes.fromhex("88776655")
        assert bytes(mem.regions[1].view[:4]) == bytes.fromhex("44332211")
        assert [(r.base, o, n) for r, o, n in mem.pieces(0xFFC, 8)] == [
            (0, 0xFFC, 4),
            (0x1000, 0, 4),
        ]


def test_access_across_a_hole_fails() -> None:
    with GuestMemory.create([(0, 0x1000), (0x2000, 0x1000)]) as mem:
        with pytest.raises(GuestMemoryError):
            mem.read(0xFFC, 8)
        with pytest.raises(GuestMemoryError):
            mem.write_u64(0xFFC, 1)
        with pytest.raises(GuestMemoryError):
            mem.read_u32(0x1800)
        with pytest.raises(GuestMemoryError):
            list(mem.pieces(0xFFC, 8))
        # A failed write leaves nothing behind.
        assert bytes(mem.regions[0].view[-4:]) == bytes(4)


@pytest.mark.parametrize(
    "layout",
    [
        [(0, 0x2000), (0x1000, 0x1000)],
        [(0x1000, 0x1000), (0, 0x2000)],
        [(0, 0x1000), (0x800, 0x100)],
        [(0, 0x1000), (0, 0x1000)],
        [(0, 0x1000), (0x3000, 0x1000), (0x2FFF, 2)],
    ],
)
def test_overlapping_regions_are_rejected(layout: list[tuple[int, int]]) -> None:
    with pytest.raises(GuestMemoryError, match="overlap"):
        GuestMemory.create(layout)


def test_no_regions_is_rejected() -> None:
    with pytest.raises(GuestMemoryError):
        GuestMemory([])


def test_page_ranges_whole_pages_only() -> None:
    with GuestMemory.create([(0, 0x3000), (0x5000, 0x1800), (0x10800, 0x2000)]) as mem:
        assert mem.page_ranges() == [(0, 3), (5, 1), (0x11, 1)]


# --- discards -----------------------------------------------------------------------------
def test_bytes_discard_zero_fills() -> None:
    with GuestMemory.simple(8 * PAGE) as mem:
        mem.write(0, pattern(8))
        result = mem.discard(2 * PAGE, 3 * PAGE)
        assert (result.syscalls, result.length) == (0, 3 * PAGE)
        assert mem.read(2 * PAGE, 3 * PAGE) == bytes(3 * PAGE)
        assert mem.read(0, 2 * PAGE) == pattern(2)
        assert mem.read(5 * PAGE, 3 * PAGE) == pattern(8)[5 * PAGE :]


@pytest.mark.parametrize("backing", list(Backing))
@pytest.mark.parametrize(
    ("addr", "length"),
    [(0x800, PAGE), (0, 0x800), (PAGE, PAGE + 1), (1, 1)],
)
def test_unaligned_discard_is_refused(backing: Backing, addr: int, length: int) -> None:
    with GuestMemory.simple(4 * PAGE, backing) as mem:
        mem.write(0, pattern(4))
        with pytest.raises(GuestMemoryError, match="page-aligned"):
            mem.discard(addr, length)
        with pytest.raises(GuestMemoryError, match="page-aligned"):
            mem.regions[0].discard(addr, length)
        assert mem.read(0, 4 * PAGE) == pattern(4)  # nothing was discarded


@pytest.mark.parametrize("backing", list(Backing))
def test_discard_outside_memory_is_refused(backing: Backing) -> None:
    with GuestMemory.create([(0, 2 * PAGE), (4 * PAGE, 2 * PAGE)], backing) as mem:
        for addr, length in [(PAGE, 2 * PAGE), (2 * PAGE, PAGE), (5 * PAGE, 2 * PAGE)]:
            with pytest.raises(GuestMemoryError):
                mem.discard(addr, length)
        with pytest.raises(GuestMemoryError):
            mem.regions[0].discard(PAGE, 2 * PAGE)
        with pytest.raises(GuestMemoryError):
            mem.regions[0].discard(0, 0)


def test_anon_discard_frees_pages() -> None:
    with GuestMemory.simple(PAGES * PAGE, Backing.ANON) as mem:
        host = mem.regions[0].host_address()
        assert host % PAGE == 0
        assert resident_pages(host, PAGES * PAGE) == 0  # a fresh private mapping
        mem.write(0, pattern(PAGES))
        assert resident_pages(host, PAGES * PAGE) == PAGES
        result = mem.discard(16 * PAGE, 32 * PAGE)
        assert (result.syscalls, result.length) == (1, 32 * PAGE)
        assert resident_pages(host, PAGES * PAGE) == PAGES - 32
        assert resident_pages(host + 16 * PAGE, 32 * PAGE) == 0
        # Data outside the discard survives; inside reads as zero (MADV_DONTNEED).
        assert mem.read(0, 16 * PAGE) == pattern(16)
        assert mem.read(48 * PAGE, 16 * PAGE) == pattern(PAGES)[48 * PAGE :]
        assert mem.read(16 * PAGE, 32 * PAGE) == bytes(32 * PAGE)


def test_anon_resident_bytes_tracks_discards() -> None:
    with GuestMemory.simple(PAGES * PAGE, Backing.ANON) as mem:
        region = mem.regions[0]
        before = region.resident_bytes()
        mem.write(0, pattern(PAGES))
        written = region.resident_bytes()
        assert written - before >= PAGES * PAGE
        mem.discard(16 * PAGE, 32 * PAGE)
        after = region.resident_bytes()
        assert written - after == 32 * PAGE
        assert mem.resident_bytes() == after
        # Reading the hole maps the shared zero page back in, which mincore counts: last.
        assert mem.read(16 * PAGE, 32 * PAGE) == bytes(32 * PAGE)


BIG = 64 << 20  # lazily allocated; big enough that the kernel places the two side by side


def test_anon_resident_bytes_with_two_adjacent_regions() -> None:
    # Regression (helper review): resident_bytes read /proc/self/smaps by start address, and
    # the kernel merges neighbouring anonymous mappings into one VMA. mincore counts exactly
    # the region's own range, wherever the kernel puts it (usually side by side, as here).
    with GuestMemory.create([(0, BIG), (BIG, BIG)], Backing.ANON) as mem:
        for region in mem.regions:
            region.view[: PAGES * PAGE] = pattern(PAGES)
        for region in mem.regions:
            assert PAGES * PAGE <= region.resident_bytes() < 2 * PAGES * PAGE
        assert mem.discard(0, 2 * BIG).syscalls == 2


def test_memfd_discard_punches_a_hole() -> None:
    with GuestMemory.simple(PAGES * PAGE, Backing.MEMFD) as mem:
        region = mem.regions[0]
        assert region._fd is not None
        fd = region._fd
        assert os.fstat(fd).st_blocks == 0
        assert region.resident_bytes() == 0
        mem.write(0, pattern(PAGES))
        blocks = os.fstat(fd).st_blocks * 512
        assert blocks >= PAGES * PAGE
        assert region.resident_bytes() == blocks
        result = mem.discard(16 * PAGE, 32 * PAGE)
        assert (result.syscalls, result.length) == (1, 32 * PAGE)
        after = os.fstat(fd).st_blocks * 512
        assert blocks - after == 32 * PAGE
        assert region.resident_bytes() == after
        assert os.fstat(fd).st_size == PAGES * PAGE  # FALLOC_FL_KEEP_SIZE
        assert mem.read(0, 16 * PAGE) == pattern(16)
        assert mem.read(48 * PAGE, 16 * PAGE) == pattern(PAGES)[48 * PAGE :]
        assert mem.read(16 * PAGE, 32 * PAGE) == bytes(32 * PAGE)
        # The hole is seen through the file too, not only through this mapping.
        assert os.pread(fd, 32 * PAGE, 16 * PAGE) == bytes(32 * PAGE)


def test_discard_across_adjacent_regions_is_one_call_per_region() -> None:
    with GuestMemory.create([(0, 4 * PAGE), (4 * PAGE, 4 * PAGE)], Backing.MEMFD) as mem:
        mem.write(0, pattern(8))
        result = mem.discard(2 * PAGE, 4 * PAGE)
        assert (result.syscalls, result.length) == (2, 4 * PAGE)
        assert mem.read(2 * PAGE, 4 * PAGE) == bytes(4 * PAGE)
        assert mem.read(0, 2 * PAGE) == pattern(2)
        assert mem.read(6 * PAGE, 2 * PAGE) == pattern(8)[6 * PAGE :]


def test_every_page_page_ranges_reports_can_be_discarded() -> None:
    # Regression (helper review): alignment was judged on the offset in the region, not on
    # the guest-physical address, so a region at base 0x800 refused its own whole pages.
    with GuestMemory.from_image(b"\xff" * 4 * PAGE, base=0x800) as mem:
        assert mem.page_ranges() == [(1, 3)]
        for first, count in mem.page_ranges():
            assert mem.discard(first * PAGE, count * PAGE).length == count * PAGE
        assert mem.read(0x800, 0x800) == b"\xff" * 0x800  # the partial page is untouched
        assert mem.read(PAGE, 3 * PAGE) == bytes(3 * PAGE)


@pytest.mark.parametrize("backing", [Backing.ANON, Backing.MEMFD])
def test_mmap_backed_region_must_be_page_aligned(backing: Backing) -> None:
    # madvise/punch-hole act on host pages, so guest pages must coincide with them.
    with pytest.raises(GuestMemoryError, match="page-aligned"):
        GuestMemory.create([(0x800, 4 * PAGE)], backing)


# --- images -------------------------------------------------------------------------------
def test_region_from_file_round_trip_never_writes_the_file(tmp_path: Path) -> None:
    data = pattern(3) + b"tail"  # not a whole number of pages
    path = tmp_path / "guest.img"
    path.write_bytes(data)
    region = Region.from_file(0x10000, str(path))
    assert (region.base, region.size, region.end) == (0x10000, len(data), 0x10000 + len(data))
    assert region.backing is Backing.BYTES
    with GuestMemory([region]) as mem:
        assert mem.read(0x10000, len(data)) == data
        assert mem.read(0x10000 + 3 * PAGE, 4) == b"tail"
        mem.write(0x10000, b"\xff" * 16)
        mem.write_u32(0x10000 + 3 * PAGE, 0)
        mem.discard(0x11000, PAGE)
        assert mem.read(0x10000, 16) == b"\xff" * 16
        assert mem.read(0x11000, PAGE) == bytes(PAGE)
        assert mem.read(0x12000, PAGE) == pattern(3)[2 * PAGE :]
        assert path.read_bytes() == data  # copy-on-write: the file never changes
        assert mem.page_ranges() == [(0x10, 3)]
    assert path.read_bytes() == data


def test_region_from_file_refuses_empty_and_too_high(tmp_path: Path) -> None:
    empty = tmp_path / "empty.img"
    empty.write_bytes(b"")
    with pytest.raises(GuestMemoryError, match="empty"):
        Region.from_file(0, str(empty))
    image = tmp_path / "page.img"
    image.write_bytes(bytes(PAGE))
    with pytest.raises(GuestMemoryError, match="64-bit"):
        Region.from_file(U64 - PAGE + 1, str(image))
    top = Region.from_file(U64 - PAGE, str(image))
    with GuestMemory([top]) as mem:
        assert mem.contains(U64 - PAGE, PAGE)


def test_region_from_bytes_copies() -> None:
    data = bytearray(b"abcd")
    with GuestMemory.from_image(data, base=0x100) as mem:
        data[0] = 0
        assert mem.read(0x100, 4) == b"abcd"
