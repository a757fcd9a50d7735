"""The split virtqueue as a device sees it: pop chains, add used elements, notify or not.

The guest owns the rings and may write anything into them, so everything read from them is
checked before it is used, in a fixed order (docs/vring-parse.md, "Check order"): the
queue's configuration (size, then alignment, then bounds), then the avail index, then each
chain; within a descriptor its flags (the INDIRECT rules) before its length and its bounds.
Each violation raises the :class:`~balloonctl.errors.VirtioError` subclass that names it,
carrying the chain's head and the descriptor's index; the caller then treats the queue as
broken, as QEMU's ``virtio_error`` does.

All work is bounded by the queue size. A chain visits at most N descriptors of the table
and at most N entries of one indirect table. Across the chains in flight (popped, not yet
returned) a legal driver can never have more than N table descriptors (each belongs to one
chain), nor two indirect tables that overlap (each table is its request's own memory until
the device returns it), so both are checked too: without that, N available entries all
naming one N-long chain, or one N-entry table, would cost N*N.
Unlike rust-vmm's iterator, which silently ends a bad chain, a bad chain here is an error.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass

from balloonctl.errors import (
    AvailIndexJump,
    BufferOutOfBounds,
    ChainTooLong,
    DescriptorLoop,
    DescriptorOrder,
    HeadOutOfRange,
    IndirectTableInvalid,
    IndirectWithNext,
    NestedIndirect,
    NextOutOfRange,
    QueueSizeInvalid,
    RingMisaligned,
    RingOutOfBounds,
    ZeroLengthBuffer,
)
from balloonctl.virtio import spec
from balloonctl.virtio.memory import GuestMemory


@dataclass(frozen=True, slots=True)
class Descriptor:
    """One buffer of a chain, as read from the guest (2.7.5)."""

    index: int
    addr: int
    len: int
    flags: int
    next: int
    #: True for an entry of an indirect table (``index`` is then its index in that table).
    in_indirect: bool = False

    @property
    def is_write(self) -> bool:
        """Device-writable (VIRTQ_DESC_F_WRITE); otherwise device-readable."""
        return bool(self.flags & spec.VIRTQ_DESC_F_WRITE)


@dataclass(frozen=True, slots=True)
class Chain:
    """A validated descriptor chain: the buffers the device consumes, in order.

    An INDIRECT descriptor is not itself a buffer: ``descriptors`` holds its table's entries
    in its place, and ``indirect`` keeps the descriptor that pointed at the table.
    """

    head: int
    descriptors: tuple[Descriptor, ...]
    #: Descriptors visited in the queue's own table (the INDIRECT one included).
    table_descriptors: int
    indirect: Descriptor | None
    readable_bytes: int
    writable_bytes: int

    def __iter__(self) -> Iterator[Descriptor]:
        return iter(self.descriptors)

    def __len__(self) -> int:
        return len(self.descriptors)


class _Table:
    """A descriptor table known to lie in guest memory; reads entries without copying."""

    __slots__ = ("_addr", "_base", "_mem", "_view", "entries")

    def __init__(self, mem: GuestMemory, addr: int, entries: int) -> None:
        self._mem = mem
        self._addr = addr
        self.entries = entries
        pieces = list(mem.pieces(addr, entries * spec.DESC_SIZE))
        # The common case: the table sits in one region, so struct can read it in place.
        if len(pieces) == 1:
            region, offset, _ = pieces[0]
            self._view: memoryview | None = region.view
            self._base = offset
        else:
            self._view = None
            self._base = 0

    def read(self, index: int) -> tuple[int, int, int, int]:
        """``(addr, len, flags, next)`` of entry ``index`` (< entries, checked by caller)."""
        if self._view is not None:
            return spec.DESC_STRUCT.unpack_from(self._view, self._base + index * spec.DESC_SIZE)
        raw = self._mem.read(self._addr + index * spec.DESC_SIZE, spec.DESC_SIZE)
        return spec.DESC_STRUCT.unpack(raw)


class SplitQueue:
    """The device's view of one split virtqueue in guest memory (2.7).

    ``last_avail_idx`` is where popping starts; the used index is read from the ring, so
    the queue can be attached to a live ring as well as to a freshly initialised one.
    ``event_idx`` and ``indirect`` follow the negotiated VIRTIO_F_EVENT_IDX and
    VIRTIO_F_INDIRECT_DESC. With ``read_only`` the device never writes the rings (offline
    inspection of an image).
    """

    def __init__(
        self,
        mem: GuestMemory,
        size: int,
        desc: int,
        avail: int,
        used: int,
        *,
        last_avail_idx: int = 0,
        event_idx: bool = False,
        indirect: bool = True,
        read_only: bool = False,
        notify_on_empty: bool = False,
    ) -> None:
        # Configuration, in docs/vring-parse.md's order: size, then alignment, then bounds.
        # 2.7: "Queue Size value is always a power of 2. The maximum Queue Size value is 32768."
        if size <= 0 or size & (size - 1) or size > spec.MAX_QUEUE_SIZE:
            raise QueueSizeInvalid(
                f"queue size {size} is not a power of two from 1 to {spec.MAX_QUEUE_SIZE}"
            )
        # 2.7.1: each part of the queue must sit at its alignment (16, 2, 4 bytes).
        for name, addr, align in (
            ("descriptor table", desc, spec.DESC_ALIGN),
            ("available ring", avail, spec.AVAIL_ALIGN),
            ("used ring", used, spec.USED_ALIGN),
        ):
            if addr % align:
                raise RingMisaligned(f"{name} at {addr:#x} is not {align}-byte aligned")
        # 2.7: the parts are 16*N, 6+2*N and 6+8*N bytes, event fields included.
        for name, addr, length, error in (
            ("descriptor table", desc, spec.desc_table_size(size), RingOutOfBounds),
            ("available ring", avail, spec.avail_ring_size(size), RingOutOfBounds),
            ("used ring", used, spec.used_ring_size(size), RingOutOfBounds),
        ):
            if not mem.contains(addr, length):
                raise error(f"{name} {addr:#x}+{length:#x} is not inside guest memory")
        self.mem = mem
        self.size = size
        self.desc = desc
        self.avail = avail
        self.used = used
        self.event_idx = event_idx
        self.indirect = indirect
        self.read_only = read_only
        self.notify_on_empty = notify_on_empty
        self.last_avail_idx = last_avail_idx & 0xFFFF
        self.next_used = mem.read_u16(used + spec.USED_IDX_OFF)
        self._table = _Table(mem, desc, size)
        self._signalled_used: int | None = None
        # In-flight accounting (see the module docstring): head -> [(table, indirect), ...].
        self._in_flight: dict[int, list[tuple[int, tuple[int, int, int] | None]]] = {}
        self._in_flight_table = 0
        # Indirect tables in flight: sorted, disjoint (start, end, head).
        self._tables: list[tuple[int, int, int]] = []

    # --- the available ring ------------------------------------------------------------
    def avail_idx(self) -> int:
        """The driver's avail.idx (2.7.6): where it will put the next head."""
        return self.mem.read_u16(self.avail + spec.AVAIL_IDX_OFF)

    def pending(self) -> int:
        """How many chains the driver has made available that the device has not popped."""
        idx = self.avail_idx()
        count = (idx - self.last_avail_idx) & 0xFFFF
        # The driver can have at most N entries outstanding: the ring holds N. A jump past
        # that is a corrupt index (QEMU: "Guest moved used index from %u to %u").
        if count > self.size:
            raise AvailIndexJump(
                f"avail.idx {idx} is {count} entries ahead of last_avail_idx "
                f"{self.last_avail_idx}, more than the queue size {self.size}"
            )
        return count

    def pop(self) -> Chain | None:
        """The next available chain, validated, or None if the driver has made none."""
        if self.pending() == 0:
            return None
        slot = self.last_avail_idx % self.size
        head = self.mem.read_u16(self.avail + spec.AVAIL_RING_OFF + 2 * slot)
        # 2.7.6: ring[] holds heads of descriptor chains, i.e. indices into the table.
        if head >= self.size:
            raise HeadOutOfRange(
                f"avail ring slot {slot} names descriptor {head}, beyond the queue size "
                f"{self.size}",
                head=head,
            )
        chain = self._walk(head)
        self._admit(chain)
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        if self.event_idx and not self.read_only:
            # 2.7.10: with EVENT_IDX the device asks to be kicked once avail.idx passes
            # avail_event; like QEMU's virtqueue_split_pop, ask for the next one.
            self._write_avail_event(self.last_avail_idx)
        return chain

    def _admit(self, chain: Chain) -> None:
        table = self._in_flight_table + chain.table_descriptors
        if table > self.size:
            # Each descriptor belongs to at most one chain in flight (2.7.13), so chains in
            # flight can never hold more than the N descriptors of the table between them.
            raise DescriptorLoop(
                f"chain {chain.head} brings the descriptors in flight to {table}, more than "
                f"the table's {self.size}: the driver reuses descriptors the device holds",
                head=chain.head,
            )
        table_span = None
        if chain.indirect is not None:
            start, end = chain.indirect.addr, chain.indirect.addr + chain.indirect.len
            i = bisect.bisect_left(self._tables, (start, end, -1))
            for near in self._tables[max(0, i - 1) : i + 1]:
                if near[0] < end and start < near[1]:
                    raise IndirectTableInvalid(
                        f"indirect table {start:#x}+{chain.indirect.len:#x} of chain "
                        f"{chain.head} overlaps the table of chain {near[2]}, still in flight",
                        head=chain.head,
                        index=chain.indirect.index,
                    )
            table_span = (start, end, chain.head)
            self._tables.insert(i, table_span)
        self._in_flight.setdefault(chain.head, []).append((chain.table_descriptors, table_span))
        self._in_flight_table = table

    def _walk(self, head: int) -> Chain:
        """Follow a chain from ``head``, checking each descriptor in docs/vring-parse.md's
        order ("Check order", "Per descriptor").

        The loop holds the common path only; each check group is a named step below it:
        the chain's length against its table (:func:`_loop_error`), an INDIRECT descriptor
        (:meth:`_indirect_table`), the buffer's bounds (:func:`_buffer_error`), its direction
        (:func:`_order_error`), the chain's byte total (:func:`_length_error`) and ``next``
        (:func:`_next_error`). The error steps only build the exception, raised here, and
        run only when their check has failed: a legal descriptor costs no call (this loop
        is most of ``bench decode``'s sg time).
        """
        mem = self.mem
        table = self._table
        in_indirect = False
        indirect_desc: Descriptor | None = None
        index = head
        visited = 0
        table_descriptors = 0
        seen_write = False
        readable = writable = 0
        out: list[Descriptor] = []
        while True:
            visited += 1
            # 2.7.5.2: loops are forbidden; a chain can never be longer than its table.
            if visited > table.entries:
                raise _loop_error(head, index, table.entries, in_indirect)
            if not in_indirect:
                table_descriptors += 1
            addr, length, flags, nxt = table.read(index)

            # 2.7.5.3: flags first; an INDIRECT descriptor is not a buffer but a table.
            if flags & spec.VIRTQ_DESC_F_INDIRECT:
                table = self._indirect_table(head, index, addr, length, flags, in_indirect)
                # 2.7.5.3.2: the device ignores the WRITE flag of the INDIRECT descriptor.
                indirect_desc = Descriptor(index, addr, length, flags, nxt)
                in_indirect = True
                index = 0
                visited = 0
                continue

            # 2.7.5: a buffer has a length and lies in guest memory.
            if length == 0 or not mem.contains(addr, length):
                raise _buffer_error(head, index, addr, length, in_indirect)
            if flags & spec.VIRTQ_DESC_F_WRITE:
                seen_write = True
                writable += length
            elif seen_write:
                # 2.7.4.2: device-writable descriptors come after all device-readable ones.
                raise _order_error(head, index, in_indirect)
            else:
                readable += length
            # 2.7.5.2: "Drivers MUST NOT add a descriptor chain longer than 2^32 bytes".
            if readable + writable > spec.MAX_CHAIN_BYTES:
                raise _length_error(head, index, in_indirect)
            out.append(Descriptor(index, addr, length, flags, nxt, in_indirect))
            if not flags & spec.VIRTQ_DESC_F_NEXT:
                break
            # 2.7.5: next names an entry of the same table.
            if nxt >= table.entries:
                raise _next_error(head, index, nxt, table.entries, in_indirect)
            index = nxt
        return Chain(
            head=head,
            descriptors=tuple(out),
            table_descriptors=table_descriptors,
            indirect=indirect_desc,
            readable_bytes=readable,
            writable_bytes=writable,
        )

    def _indirect_table(
        self, head: int, index: int, addr: int, length: int, flags: int, in_indirect: bool
    ) -> _Table:
        """The table an INDIRECT descriptor points at, once its rules hold (2.7.5.3), in
        this order: not nested, not with NEXT, negotiated, a whole number of entries, at
        most the queue size, inside guest memory."""
        # 2.7.5.3.1: only one table per descriptor, no nesting.
        if in_indirect:
            raise NestedIndirect(
                f"indirect table entry {index} of chain {head} is itself INDIRECT",
                head=head,
                index=index,
                indirect=True,
            )
        # 2.7.5.3.1: INDIRECT and NEXT MUST NOT be set together; 2.7.5.3.2: the device
        # handles normal descriptors followed by a single INDIRECT one, so INDIRECT
        # can only end the direct part of a chain.
        if flags & spec.VIRTQ_DESC_F_NEXT:
            raise IndirectWithNext(
                f"descriptor {index} of chain {head} sets both INDIRECT and NEXT",
                head=head,
                index=index,
            )
        # 2.7.5.3.1: the driver MUST NOT set INDIRECT unless VIRTIO_F_INDIRECT_DESC was
        # negotiated.
        if not self.indirect:
            raise IndirectTableInvalid(
                f"descriptor {index} of chain {head} is INDIRECT but "
                "VIRTIO_F_INDIRECT_DESC was not negotiated",
                head=head,
                index=index,
            )
        entries, rest = divmod(length, spec.DESC_SIZE)
        if length == 0 or rest:
            raise IndirectTableInvalid(
                f"indirect table of chain {head} (descriptor {index}) is {length} bytes, "
                f"not a positive multiple of {spec.DESC_SIZE}",
                head=head,
                index=index,
            )
        # 2.7.5.3.1: "A driver MUST NOT create a descriptor chain longer than the Queue
        # Size of the device."
        if entries > self.size:
            raise IndirectTableInvalid(
                f"indirect table of chain {head} (descriptor {index}) has {entries} "
                f"entries, more than the queue size {self.size}",
                head=head,
                index=index,
            )
        if not self.mem.contains(addr, length):
            raise IndirectTableInvalid(
                f"indirect table {addr:#x}+{length:#x} of chain {head} (descriptor "
                f"{index}) is not inside guest memory",
                head=head,
                index=index,
            )
        return _Table(self.mem, addr, entries)

    # --- the used ring ------------------------------------------------------------------
    def add_used(self, head: int, written: int = 0) -> None:
        """Return chain ``head`` to the driver, having written ``written`` bytes (2.7.8)."""
        if self.read_only:
            raise ValueError("add_used on a read-only queue")
        counts = self._in_flight.get(head)
        if not counts:
            raise ValueError(f"chain {head} is not in flight")
        table, span = counts.pop()
        if not counts:
            del self._in_flight[head]
        self._in_flight_table -= table
        if span is not None:
            self._tables.remove(span)
        slot = self.next_used % self.size
        elem = self.used + spec.USED_RING_OFF + spec.USED_ELEM_SIZE * slot
        self.mem.write_u32(elem, head)
        self.mem.write_u32(elem + 4, written)
        # 2.7.8.2: the element is written before the index that publishes it.
        self.next_used = (self.next_used + 1) & 0xFFFF
        self.mem.write_u16(self.used + spec.USED_IDX_OFF, self.next_used)

    @property
    def in_flight(self) -> int:
        """Chains popped and not yet returned."""
        return sum(len(v) for v in self._in_flight.values())

    # --- notifications ------------------------------------------------------------------
    def needs_notification(self) -> bool:
        """Whether to interrupt the driver for what was added since the last call (2.7.7.2).

        With EVENT_IDX: iff used.idx passed the driver's used_event since the last
        notification. Without: unless the driver set VIRTQ_AVAIL_F_NO_INTERRUPT.
        """
        new = self.next_used
        old, self._signalled_used = self._signalled_used, new
        # 6.3 (legacy VIRTIO_F_NOTIFY_ON_EMPTY): interrupt whenever the device runs out of
        # buffers, whatever the suppression says (QEMU's virtio_split_should_notify).
        if self.notify_on_empty and not self.in_flight and not self.pending():
            return True
        if self.event_idx:
            if old is None:
                return True
            used_event = self.mem.read_u16(self.avail + spec.used_event_offset(self.size))
            return spec.vring_need_event(used_event, new, old)
        flags = self.mem.read_u16(self.avail + spec.AVAIL_FLAGS_OFF)
        return not flags & spec.VIRTQ_AVAIL_F_NO_INTERRUPT

    def set_notification(self, enable: bool) -> None:
        """Ask the driver to kick (or not) when it makes buffers available (2.7.10).

        With EVENT_IDX the device publishes avail_event (the index at which it wants a
        kick); without, it sets or clears VIRTQ_USED_F_NO_NOTIFY in used.flags.
        """
        if self.read_only:
            raise ValueError("set_notification on a read-only queue")
        if self.event_idx:
            if enable:
                self._write_avail_event(self.avail_idx())
            return
        flags_addr = self.used + spec.USED_FLAGS_OFF
        flags = self.mem.read_u16(flags_addr)
        if enable:
            flags &= ~spec.VIRTQ_USED_F_NO_NOTIFY & 0xFFFF
        else:
            flags |= spec.VIRTQ_USED_F_NO_NOTIFY
        self.mem.write_u16(flags_addr, flags)

    def enable_notification(self) -> bool:
        """Re-enable kicks; True if buffers arrived meanwhile (pop again, or miss them)."""
        self.set_notification(True)
        return self.pending() > 0

    def _write_avail_event(self, value: int) -> None:
        self.mem.write_u16(self.used + spec.avail_event_offset(self.size), value & 0xFFFF)


# --- the walk's failed checks ------------------------------------------------------------
# Each builds the error a check of SplitQueue._walk raises, called only once that check has
# failed; the messages are pinned by tests/virtio and the hostile corpus.


def _loop_error(head: int, index: int, entries: int, in_indirect: bool) -> DescriptorLoop:
    """2.7.5.2: the chain visits more descriptors than its table holds, so it loops."""
    where = "indirect table" if in_indirect else "descriptor table"
    return DescriptorLoop(
        f"chain {head} visits more than the {entries} descriptors of its {where}",
        head=head,
        index=index,
        indirect=in_indirect,
    )


def _buffer_error(
    head: int, index: int, addr: int, length: int, in_indirect: bool
) -> ZeroLengthBuffer | BufferOutOfBounds:
    """2.7.5: a buffer of length 0 (checked first), or one not inside guest memory."""
    if length == 0:
        return ZeroLengthBuffer(
            f"descriptor {index} of chain {head} has length 0",
            head=head,
            index=index,
            indirect=in_indirect,
        )
    return BufferOutOfBounds(
        f"buffer {addr:#x}+{length:#x} (descriptor {index} of chain {head}) "
        + ("wraps the address space" if addr + length > 1 << 64 else "is not inside guest memory"),
        head=head,
        index=index,
        indirect=in_indirect,
    )


def _order_error(head: int, index: int, in_indirect: bool) -> DescriptorOrder:
    """2.7.4.2: a device-readable descriptor after a device-writable one."""
    return DescriptorOrder(
        f"descriptor {index} of chain {head} is device-readable but follows a device-writable one",
        head=head,
        index=index,
        indirect=in_indirect,
    )


def _length_error(head: int, index: int, in_indirect: bool) -> ChainTooLong:
    """2.7.5.2: the chain's buffers add up to more than 2^32 bytes."""
    return ChainTooLong(
        f"chain {head} is longer than 2^32 bytes at descriptor {index}",
        head=head,
        index=index,
        indirect=in_indirect,
    )


def _next_error(head: int, index: int, nxt: int, entries: int, in_indirect: bool) -> NextOutOfRange:
    """2.7.5: ``next`` names no entry of the descriptor's own table."""
    return NextOutOfRange(
        f"descriptor {index} of chain {head} has next {nxt}, beyond its table of {entries}",
        head=head,
        index=index,
        indirect=in_indirect,
    )
