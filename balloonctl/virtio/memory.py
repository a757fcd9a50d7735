"""Guest memory as the device sees it: RAM regions at guest-physical addresses.

Three backings, chosen for what a test or benchmark must prove:

* ``bytes``: a bytearray. Cheap, for ring images and unit tests. There is no host memory to
  give back, so a discard zero-fills (what the guest sees after MADV_DONTNEED anyway).
* ``anon``: a private anonymous mapping, QEMU's default RAM. A discard is
  ``madvise(MADV_DONTNEED)``: the kernel frees the pages and the next read sees zeroes.
* ``memfd``: a memfd mapped shared, as QEMU's shared memory backends are. MADV_DONTNEED alone
  does not free shared memory, so a discard punches a hole (``fallocate``).

Every access is bounds-checked here; a miss raises :class:`GuestMemoryError`, which device
code never lets a guest provoke (it checks first and raises the VirtioError that names the
guest's mistake).
"""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import mmap
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from types import TracebackType
from typing import Self, cast

import numpy as np

from balloonctl.errors import GuestMemoryError
from balloonctl.units import PAGE_SIZE, is_page_aligned

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


def _libc_fallocate() -> Callable[[int, int, int, int], int]:
    """glibc's fallocate(2): Python's os module has no punch-hole mode."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    fn = libc.fallocate
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return cast("Callable[[int, int, int, int], int]", fn)


class Backing(StrEnum):
    """Where a region's bytes live; decides what a discard does."""

    BYTES = "bytes"
    ANON = "anon"
    MEMFD = "memfd"


@dataclass(frozen=True, slots=True)
class DiscardResult:
    """What one discard did: syscalls issued and bytes given back."""

    syscalls: int
    length: int


class Region:
    """One contiguous piece of guest RAM at guest-physical ``base``."""

    def __init__(self, base: int, size: int, backing: Backing = Backing.BYTES) -> None:
        if size <= 0:
            raise GuestMemoryError(f"region at {base:#x}: size must be positive, not {size}")
        if base < 0 or base + size > 1 << 64:
            raise GuestMemoryError(f"region {base:#x}+{size:#x} is outside the 64-bit space")
        if backing is not Backing.BYTES and not (is_page_aligned(base) and is_page_aligned(size)):
            # madvise and punch-hole work on host pages: guest pages must coincide with them.
            raise GuestMemoryError(f"a {backing} region must be page-aligned: {base:#x}+{size:#x}")
        self.base = base
        self.size = size
        self.backing = backing
        self._fd: int | None = None
        self._map: mmap.mmap | None = None
        self._buf: bytearray | mmap.mmap
        if backing is Backing.BYTES:
            self._buf = bytearray(size)
        elif backing is Backing.ANON:
            # MAP_PRIVATE: Python's default for fd -1 is MAP_SHARED, which is shmem and is
            # not freed by MADV_DONTNEED. QEMU's anonymous RAM is private.
            self._map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            self._buf = self._map
        else:
            self._fd = os.memfd_create("balloonctl-guest-ram", os.MFD_CLOEXEC)
            os.ftruncate(self._fd, size)
            self._map = mmap.mmap(self._fd, size, flags=mmap.MAP_SHARED)
            self._buf = self._map
        self.view = memoryview(self._buf)

    @classmethod
    def from_bytes(cls, base: int, data: bytes | bytearray) -> Region:
        """A bytes-backed region holding a copy of ``data`` (a ring image, say)."""
        region = cls(base, len(data), Backing.BYTES)
        region.view[:] = data
        return region

    @classmethod
    def from_file(cls, base: int, path: str) -> Region:
        """A file's bytes as a region, mapped copy-on-write: no copy, and writes (discards)
        stay in this process, never reaching the file. Behaves as ``bytes`` backing."""
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise GuestMemoryError(f"{path}: the image is empty")
            mapped = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
        region = cls.__new__(cls)
        region.base, region.size, region.backing = base, size, Backing.BYTES
        if base + size > 1 << 64:
            mapped.close()
            raise GuestMemoryError(f"{path}: {base:#x}+{size:#x} leaves the 64-bit space")
        region._fd, region._map, region._buf = None, mapped, mapped
        region.view = memoryview(mapped)
        return region

    @property
    def end(self) -> int:
        """First guest-physical address after the region."""
        return self.base + self.size

    def discard(self, offset: int, length: int) -> DiscardResult:
        """Give ``length`` bytes at ``offset`` back to the host: whole guest pages.

        Alignment is judged on the guest-physical address, as the balloon's pages are;
        only mmap-backed regions (page-aligned by construction) reach madvise/fallocate.
        """
        if not (is_page_aligned(self.base + offset) and is_page_aligned(length)):
            where = f"{self.base + offset:#x}+{length:#x}"
            raise GuestMemoryError(f"discard {where} is not page-aligned (whole guest pages)")
        if offset < 0 or length <= 0 or offset + length > self.size:
            raise GuestMemoryError(f"discard {offset:#x}+{length:#x} outside the region")
        if self.backing is Backing.ANON:
            assert self._map is not None
            self._map.madvise(mmap.MADV_DONTNEED, offset, length)
        elif self.backing is Backing.MEMFD:
            assert self._fd is not None
            if _FALLOCATE(self._fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length):
                err = ctypes.get_errno()
                raise GuestMemoryError(f"fallocate punch-hole failed: {os.strerror(err)}")
        else:
            self.view[offset : offset + length] = bytes(length)
            return DiscardResult(syscalls=0, length=length)
        return DiscardResult(syscalls=1, length=length)

    def resident_bytes(self) -> int:
        """Host memory the region holds now: what a discard is meant to shrink.

        memfd: the file's allocated blocks; anon: pages mincore finds mapped (a discarded
        page that is read again maps the shared zero page and counts); bytes: all of it (a
        bytearray is never given back).
        """
        if self.backing is Backing.MEMFD:
            assert self._fd is not None
            return os.fstat(self._fd).st_blocks * 512
        if self.backing is Backing.BYTES:
            return self.size
        return _mincore_resident(self.host_address(), self.size)

    def host_address(self) -> int:
        """The host virtual address of the region's first byte."""
        holder = ctypes.c_char.from_buffer(self._buf)
        try:
            return ctypes.addressof(holder)
        finally:
            del holder

    def close(self) -> None:
        """Unmap and close; the region must not be used afterwards."""
        self.view.release()
        if self._map is not None:
            self._map.close()
            self._map = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


_FALLOCATE = _libc_fallocate()


def _libc_mincore() -> Callable[[int, int, ctypes.Array[ctypes.c_ubyte]], int]:
    """glibc's mincore(2): which pages of a mapping are resident."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    fn = libc.mincore
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    fn.restype = ctypes.c_int
    return cast("Callable[[int, int, ctypes.Array[ctypes.c_ubyte]], int]", fn)


_MINCORE = _libc_mincore()


def _mincore_resident(address: int, length: int) -> int:
    """Resident bytes of exactly ``[address, address + length)``.

    mincore, not /proc/self/smaps: the kernel merges neighbouring anonymous mappings into
    one VMA, so smaps cannot tell two regions (or a region and a neighbour) apart.
    """
    pages = -(-length // PAGE_SIZE)
    vec = (ctypes.c_ubyte * pages)()
    if _MINCORE(address, length, vec):
        raise GuestMemoryError(f"mincore failed: {os.strerror(ctypes.get_errno())}")
    return int(np.count_nonzero(np.ctypeslib.as_array(vec) & 1)) * PAGE_SIZE


class GuestMemory:
    """Guest RAM: non-overlapping regions, bounds-checked little-endian access."""

    def __init__(self, regions: Sequence[Region]) -> None:
        if not regions:
            raise GuestMemoryError("guest memory needs at least one region")
        self.regions = sorted(regions, key=lambda r: r.base)
        for before, after in zip(self.regions, self.regions[1:], strict=False):
            if before.end > after.base:
                raise GuestMemoryError(
                    f"regions {before.base:#x}+{before.size:#x} and "
                    f"{after.base:#x}+{after.size:#x} overlap"
                )
        self._bases = [r.base for r in self.regions]

    @classmethod
    def create(
        cls, layout: Sequence[tuple[int, int]], backing: Backing = Backing.BYTES
    ) -> GuestMemory:
        """Regions from ``(base, size)`` pairs, all with one backing."""
        regions: list[Region] = []
        try:
            for base, size in layout:
                regions.append(Region(base, size, backing))
            return cls(regions)
        except BaseException:
            for region in regions:
                region.close()
            raise

    @classmethod
    def simple(cls, size: int, backing: Backing = Backing.BYTES) -> GuestMemory:
        """One region of ``size`` bytes at guest-physical 0."""
        return cls.create([(0, size)], backing)

    @classmethod
    def from_image(cls, data: bytes | bytearray, base: int = 0) -> GuestMemory:
        """A raw memory image whose byte 0 is guest-physical ``base``."""
        return cls([Region.from_bytes(base, data)])

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Release every region."""
        for region in self.regions:
            region.close()

    @property
    def size(self) -> int:
        """Total bytes of RAM."""
        return sum(r.size for r in self.regions)

    @property
    def end(self) -> int:
        """First guest-physical address above all RAM."""
        return self.regions[-1].end

    def _region_at(self, addr: int) -> Region | None:
        i = bisect.bisect_right(self._bases, addr) - 1
        if i >= 0 and addr < self.regions[i].end:
            return self.regions[i]
        return None

    def contains(self, addr: int, length: int) -> bool:
        """Whether ``[addr, addr + length)`` is RAM throughout (adjacent regions join)."""
        if addr < 0 or length < 0 or addr + length > 1 << 64:
            return False
        end = addr + length
        while True:
            region = self._region_at(addr)
            if region is None:
                return length == 0 and self._region_at(addr - 1) is not None
            if end <= region.end:
                return True
            addr = region.end

    def pieces(self, addr: int, length: int) -> Iterator[tuple[Region, int, int]]:
        """``(region, offset, length)`` for each region a checked range crosses."""
        if not self.contains(addr, length):
            raise GuestMemoryError(f"{addr:#x}+{length:#x} is not inside guest memory")
        end = addr + length
        while addr < end:
            region = self._region_at(addr)
            assert region is not None
            stop = min(end, region.end)
            yield region, addr - region.base, stop - addr
            addr = stop

    def read(self, addr: int, length: int) -> bytes:
        """Copy ``length`` bytes from guest-physical ``addr``."""
        region = self._region_at(addr)
        if region is not None and addr + length <= region.end and length >= 0:
            off = addr - region.base
            return bytes(region.view[off : off + length])
        return b"".join(bytes(r.view[o : o + n]) for r, o, n in self.pieces(addr, length))

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` to guest-physical ``addr``."""
        done = 0
        for region, off, n in self.pieces(addr, len(data)):
            region.view[off : off + n] = data[done : done + n]
            done += n

    def read_u16(self, addr: int) -> int:
        """A little-endian u16 (all virtio 1.x ring fields are little-endian, 2.7)."""
        return int(_U16.unpack(self.read(addr, 2))[0])

    def read_u32(self, addr: int) -> int:
        """A little-endian u32."""
        return int(_U32.unpack(self.read(addr, 4))[0])

    def read_u64(self, addr: int) -> int:
        """A little-endian u64."""
        return int(_U64.unpack(self.read(addr, 8))[0])

    def write_u16(self, addr: int, value: int) -> None:
        """Store a little-endian u16."""
        self.write(addr, _U16.pack(value))

    def write_u32(self, addr: int, value: int) -> None:
        """Store a little-endian u32."""
        self.write(addr, _U32.pack(value))

    def write_u64(self, addr: int, value: int) -> None:
        """Store a little-endian u64."""
        self.write(addr, _U64.pack(value))

    def discard(self, addr: int, length: int) -> DiscardResult:
        """Give a page-aligned range of RAM back to the host, region by region."""
        syscalls = 0
        for region, off, n in self.pieces(addr, length):
            syscalls += region.discard(off, n).syscalls
        return DiscardResult(syscalls=syscalls, length=length)

    def make_resident(self) -> None:
        """Touch every page (one byte a page, a strided numpy write, not a Python loop), so
        that a later discard has real memory to give back. Writes: call before anything
        in guest memory matters."""
        for region in self.regions:
            pages = np.frombuffer(region.view, dtype=np.uint8)
            pages[::PAGE_SIZE] = 1
            del pages

    def resident_bytes(self) -> int:
        """Host memory all regions hold now (see :meth:`Region.resident_bytes`)."""
        return sum(r.resident_bytes() for r in self.regions)

    def page_ranges(self) -> list[tuple[int, int]]:
        """RAM as ``(first_pfn, page_count)``, whole 4 KiB pages only."""
        ranges = []
        for r in self.regions:
            first = -(-r.base // PAGE_SIZE)
            last = r.end // PAGE_SIZE
            if last > first:
                ranges.append((first, last - first))
        return ranges
