"""A mock driver: writes split-queue rings into guest memory the way a driver does.

Like rust-vmm's ``MockSplitQueue`` it lives beside the real code and is reused by the tests,
the benchmarks, the ring-image generator and (later) the fuzz seed corpora. It writes raw
bytes, so a test can also write what no honest driver would: that is how every hostile class
of docs/vring-parse.md ("Hostile-guest input classes") is produced. The full driver model of
the seed (free-list management, queue-full behaviour, ``tell_host_sgs``) is
``balloonctl.guest``; this is the bare minimum.

:class:`RingLayout` is production code (the parser, the guest model and the simulator use it)
and lives in :mod:`balloonctl.virtio.layout`, not here.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence

import numpy as np

from balloonctl.virtio import spec
from balloonctl.virtio.layout import RingLayout, align_up
from balloonctl.virtio.memory import GuestMemory
from balloonctl.virtio.queue import SplitQueue

__all__ = [
    "Buffer",
    "BumpAllocator",
    "MockDriverQueue",
    "RawDescriptor",
    "pfn_array",
    "stats_buffer",
]

#: (addr, len, device_writable)
Buffer = tuple[int, int, bool]
#: (addr, len, flags, next): a raw descriptor, exactly as written.
RawDescriptor = tuple[int, int, int, int]


class BumpAllocator:
    """Hands out guest-physical space for buffers and tables, never reusing it."""

    def __init__(self, start: int, end: int) -> None:
        self.next = start
        self.end = end

    def alloc(self, size: int, align: int = 16) -> int:
        """``size`` bytes at ``align``; raises MemoryError when the area is used up."""
        addr = align_up(self.next, align)
        if addr + size > self.end:
            raise MemoryError(f"mock allocator: {size} bytes do not fit below {self.end:#x}")
        self.next = addr + size
        return addr


class MockDriverQueue:
    """The driver's side of one split queue, written into ``mem``."""

    def __init__(self, mem: GuestMemory, layout: RingLayout, *, event_idx: bool = False) -> None:
        self.mem = mem
        self.layout = layout
        self.event_idx = event_idx
        self.avail_idx = 0
        self.last_used = 0
        self._free = list(range(layout.size))
        mem.write(layout.desc, bytes(spec.desc_table_size(layout.size)))
        mem.write(layout.avail, bytes(spec.avail_ring_size(layout.size)))
        mem.write(layout.used, bytes(spec.used_ring_size(layout.size)))
        self._chains: dict[int, list[int]] = {}

    @property
    def size(self) -> int:
        """The queue size N."""
        return self.layout.size

    @property
    def free_descriptors(self) -> int:
        """Descriptors not in any chain the device holds."""
        return len(self._free)

    # --- raw writes, for hostile rings ---------------------------------------------------
    def write_desc(
        self, index: int, addr: int, length: int, flags: int = 0, next_: int = 0
    ) -> None:
        """Write descriptor ``index`` of the queue's table as given, checks or not."""
        self.write_table(self.layout.desc + index * spec.DESC_SIZE, [(addr, length, flags, next_)])

    def write_table(self, addr: int, entries: Sequence[RawDescriptor]) -> None:
        """Write raw descriptors contiguously at ``addr`` (a table or part of one)."""
        data = b"".join(spec.DESC_STRUCT.pack(a, n, f, x) for a, n, f, x in entries)
        self.mem.write(addr, data)

    def publish(self, head: int) -> None:
        """Put ``head`` in the next avail slot and bump avail.idx (2.7.13)."""
        slot = self.avail_idx % self.size
        self.mem.write_u16(self.layout.avail + spec.AVAIL_RING_OFF + 2 * slot, head)
        self.set_avail_idx(self.avail_idx + 1)

    def set_avail_idx(self, idx: int) -> None:
        """Write avail.idx directly (any value: index jumps and wrap-around tests)."""
        self.avail_idx = idx & 0xFFFF
        self.mem.write_u16(self.layout.avail + spec.AVAIL_IDX_OFF, self.avail_idx)

    def set_avail_flags(self, flags: int) -> None:
        """Write avail.flags (VIRTQ_AVAIL_F_NO_INTERRUPT)."""
        self.mem.write_u16(self.layout.avail + spec.AVAIL_FLAGS_OFF, flags)

    def set_used_event(self, idx: int) -> None:
        """Write used_event (EVENT_IDX: interrupt me once used.idx passes this)."""
        self.mem.write_u16(self.layout.avail + spec.used_event_offset(self.size), idx & 0xFFFF)

    # --- what an honest driver does -------------------------------------------------------
    def add_chain(self, buffers: Sequence[Buffer]) -> int:
        """Chain ``buffers`` through free descriptors (readable ones first) and publish."""
        if not buffers or len(buffers) > len(self._free):
            raise ValueError(f"{len(buffers)} buffers, {len(self._free)} free descriptors")
        ids = [self._free.pop(0) for _ in buffers]
        entries: list[tuple[int, RawDescriptor]] = []
        for pos, (index, (addr, length, write)) in enumerate(zip(ids, buffers, strict=True)):
            last = pos == len(ids) - 1
            flags = (spec.VIRTQ_DESC_F_WRITE if write else 0) | (
                0 if last else spec.VIRTQ_DESC_F_NEXT
            )
            entries.append((index, (addr, length, flags, 0 if last else ids[pos + 1])))
        for index, raw in entries:
            self.write_desc(index, *raw)
        self._chains[ids[0]] = ids
        self.publish(ids[0])
        return ids[0]

    def add_indirect_chain(
        self, buffers: Sequence[Buffer], table_addr: int, direct: Sequence[Buffer] = ()
    ) -> int:
        """Publish ``direct`` buffers (may be none) then one INDIRECT descriptor whose table,
        written at ``table_addr``, holds ``buffers`` (2.7.5.3)."""
        table: list[RawDescriptor] = []
        for pos, (addr, length, write) in enumerate(buffers):
            last = pos == len(buffers) - 1
            flags = (spec.VIRTQ_DESC_F_WRITE if write else 0) | (
                0 if last else spec.VIRTQ_DESC_F_NEXT
            )
            table.append((addr, length, flags, 0 if last else pos + 1))
        self.write_table(table_addr, table)
        ids = [self._free.pop(0) for _ in range(len(direct) + 1)]
        for pos, (addr, length, write) in enumerate(direct):
            flags = spec.VIRTQ_DESC_F_NEXT | (spec.VIRTQ_DESC_F_WRITE if write else 0)
            self.write_desc(ids[pos], addr, length, flags, ids[pos + 1])
        self.write_desc(
            ids[-1], table_addr, len(table) * spec.DESC_SIZE, spec.VIRTQ_DESC_F_INDIRECT
        )
        self._chains[ids[0]] = ids
        self.publish(ids[0])
        return ids[0]

    def reclaim(self) -> list[tuple[int, int]]:
        """Used elements ``(id, len)`` since the last call; their descriptors become free."""
        used_idx = self.mem.read_u16(self.layout.used + spec.USED_IDX_OFF)
        out = []
        while self.last_used != used_idx:
            slot = self.last_used % self.size
            elem = self.layout.used + spec.USED_RING_OFF + spec.USED_ELEM_SIZE * slot
            head, length = self.mem.read_u32(elem), self.mem.read_u32(elem + 4)
            self._free.extend(self._chains.pop(head, []))
            out.append((head, length))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out

    def device_queue(self, **kwargs: bool | int) -> SplitQueue:
        """The device's view of this queue (kwargs go to :class:`SplitQueue`)."""
        return SplitQueue(
            self.mem,
            self.size,
            self.layout.desc,
            self.layout.avail,
            self.layout.used,
            **kwargs,  # type: ignore[arg-type]
        )


def pfn_array(pfns: Iterable[int]) -> bytes:
    """A legacy inflate/deflate buffer: le32 PFNs (5.5.6)."""
    return np.asarray(list(pfns), dtype="<u4").tobytes()


def stats_buffer(entries: Iterable[tuple[int, int]]) -> bytes:
    """A stats buffer: packed ``{le16 tag; le64 val}`` entries (5.5.6.3)."""
    return b"".join(struct.pack("<HQ", tag, value) for tag, value in entries)
