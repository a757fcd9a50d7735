"""The driver's side of a split virtqueue, as Linux's virtio_ring.c does it.

Descriptors sit on a free list threaded through their ``next`` fields; a request takes
descriptors from it (or one descriptor pointing at an indirect table), is published in the
available ring, and comes back through the used ring, when its descriptors return to the
free list. On top of Linux's ``virtqueue_add_sgs`` this has the seed's chain-building calls:
``add_chain_desc`` appends one descriptor to an open chain and, when the queue is full,
publishes what is chained, kicks, waits for the device and starts a new chain
(``virtqueue_add_chain_desc``); ``publish_chain`` is ``virtqueue_add_chain``.

Everything is written into guest memory as a real driver writes it, so the device side
parses the same bytes a guest would leave there.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from balloonctl.errors import GuestModelError
from balloonctl.virtio import spec
from balloonctl.virtio.layout import RingLayout
from balloonctl.virtio.memory import GuestMemory

#: (guest-physical address, length)
Segment = tuple[int, int]


@dataclass
class OpenChain:
    """A chain being built with :meth:`DriverQueue.add_chain_desc` (the seed's
    ``head_id``/``prev_id`` pair)."""

    head: int | None = None
    prev: int | None = None
    count: int = 0


@dataclass
class _InFlight:
    token: object
    descriptors: list[int] = field(default_factory=list)


@dataclass
class DriverCounters:
    """What the driver did to this queue."""

    kicks: int = 0
    notifications: int = 0
    chains: int = 0
    descriptors: int = 0
    waits: int = 0


class DriverQueue:
    """One split queue, driver side, in ``mem`` at ``layout``.

    ``notify`` is the doorbell (the device's queue-notify register); ``wait`` lets the device
    run while the driver waits for a used buffer (in the synchronous testbed the device has
    already run by the time a kick returns, so waiting is a no-op there).
    """

    def __init__(
        self,
        mem: GuestMemory,
        layout: RingLayout,
        *,
        notify: Callable[[], None],
        wait: Callable[[], None] = lambda: None,
        event_idx: bool = False,
        indirect_area: tuple[int, int] | None = None,
        max_waits: int = 1000,
    ) -> None:
        self.mem = mem
        self.layout = layout
        self.size = layout.size
        self.event_idx = event_idx
        self._notify = notify
        self._wait = wait
        self._max_waits = max_waits
        self.counters = DriverCounters()
        # "Put everything in free lists": desc[i].next = i + 1 (vring_alloc_queue_split).
        # Built whole, not descriptor by descriptor: a 1024-entry queue (QEMU 10's) per
        # queue per VM made a 1000-VM sim's boot seconds slower, and a list of 1024 ints
        # costs 37 KiB where an array costs 4.
        table = np.zeros((self.size, spec.DESC_SIZE // 2), dtype="<u2")
        table[:, 7] = np.arange(1, self.size + 1) % 0x10000  # le16 next, the last field
        mem.write(layout.desc, table.tobytes())
        mem.write(layout.avail, bytes(spec.avail_ring_size(self.size)))
        mem.write(layout.used, bytes(spec.used_ring_size(self.size)))
        self._next = array("I", range(1, self.size + 1))
        self.free_head = 0
        self.num_free = self.size
        self.avail_idx = 0
        self.num_added = 0
        self.last_used = 0
        self._in_flight: dict[int, _InFlight] = {}
        # One indirect table slot per head, each of up to `indirect_entries` descriptors:
        # Linux kmallocs a table per request; a fixed pool keeps the model's memory simple.
        self._indirect_base, self.indirect_entries = indirect_area or (0, 0)

    # --- descriptors ----------------------------------------------------------------------
    def _take(self) -> int:
        index = self.free_head
        self.free_head = self._next[index]
        self.num_free -= 1
        return index

    def _write_desc(self, index: int, addr: int, length: int, flags: int, nxt: int) -> None:
        self.mem.write(
            self.layout.desc + index * spec.DESC_SIZE,
            spec.DESC_STRUCT.pack(addr, length, flags, nxt),
        )
        self._next[index] = nxt

    def add_sgs(self, out: Sequence[Segment], in_: Sequence[Segment], token: object) -> int:
        """Linux's virtqueue_add_sgs: device-readable ``out`` then device-writable ``in_``,
        one chain, published; indirect when negotiated and worth it. Returns the head."""
        segments = [(a, n, 0) for a, n in out] + [(a, n, spec.VIRTQ_DESC_F_WRITE) for a, n in in_]
        if not segments:
            raise ValueError("a request needs at least one buffer")
        total = len(segments)
        # 2.7.5.3.1: not even an indirect chain may be longer than the queue size.
        fits = total <= min(self.indirect_entries, self.size)
        if self.indirect_entries and total > 1 and fits and self.num_free:
            head = self._take()
            table = self._indirect_base + head * self.indirect_entries * spec.DESC_SIZE
            raw = b"".join(
                spec.DESC_STRUCT.pack(
                    a, n, f | (spec.VIRTQ_DESC_F_NEXT if i < total - 1 else 0), i + 1
                )
                for i, (a, n, f) in enumerate(segments)
            )
            self.mem.write(table, raw)
            self._write_desc(
                head, table, total * spec.DESC_SIZE, spec.VIRTQ_DESC_F_INDIRECT, self._next[head]
            )
            self._publish(head, _InFlight(token, [head]))
            return head
        if self.num_free < total:
            raise GuestModelError(f"queue full: {total} descriptors wanted, {self.num_free} free")
        ids = [self._take() for _ in range(total)]
        for pos, (index, (addr, length, flags)) in enumerate(zip(ids, segments, strict=True)):
            last = pos == total - 1
            nxt = self._next[index] if last else ids[pos + 1]
            self._write_desc(
                index, addr, length, flags | (0 if last else spec.VIRTQ_DESC_F_NEXT), nxt
            )
        self._publish(ids[0], _InFlight(token, ids))
        return ids[0]

    def add_chain_desc(
        self, chain: OpenChain, addr: int, length: int, *, write: bool = False
    ) -> None:
        """The seed's virtqueue_add_chain_desc: append one buffer to ``chain``.

        With no descriptor free, publish what is chained, kick, wait for the device to give
        some back, and go on in a new chain. The seed returned -ENOSPC when even an empty
        chain found the queue full, and tell_host_sgs ignored it, silently losing the run
        (the pages stayed "in the balloon" in the guest, unknown to the host). Here the
        driver waits for in-flight buffers instead, and fails loudly only if none are.
        """
        while self.num_free < 1:
            if chain.head is not None:
                self.publish_chain(chain, token=None)
                self.kick()
                chain.head = chain.prev = None
                chain.count = 0
            if not self._in_flight:
                raise GuestModelError("queue full with nothing in flight")
            self.wait_for_used()
        index = self._take()
        flags = spec.VIRTQ_DESC_F_WRITE if write else 0
        self._write_desc(index, addr, length, flags, self._next[index])
        if chain.prev is not None:
            prev = chain.prev
            addr_p, len_p, flags_p, _ = spec.DESC_STRUCT.unpack(
                self.mem.read(self.layout.desc + prev * spec.DESC_SIZE, spec.DESC_SIZE)
            )
            self._write_desc(prev, addr_p, len_p, flags_p | spec.VIRTQ_DESC_F_NEXT, index)
        else:
            chain.head = index
        chain.prev = index
        chain.count += 1

    def publish_chain(self, chain: OpenChain, token: object) -> None:
        """The seed's virtqueue_add_chain: expose the chain built so far."""
        if chain.head is None:
            return
        ids = []
        index = chain.head
        for _ in range(chain.count):
            ids.append(index)
            index = self._next[index]
        self._publish(chain.head, _InFlight(token, ids))

    def _publish(self, head: int, entry: _InFlight) -> None:
        slot = self.avail_idx % self.size
        self.mem.write_u16(self.layout.avail + spec.AVAIL_RING_OFF + 2 * slot, head)
        # 2.7.13: the ring entry is written before the index that publishes it.
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write_u16(self.layout.avail + spec.AVAIL_IDX_OFF, self.avail_idx)
        self.num_added += 1
        self._in_flight[head] = entry
        self.counters.chains += 1
        self.counters.descriptors += len(entry.descriptors)

    # --- notifications --------------------------------------------------------------------
    def kick(self) -> bool:
        """virtqueue_kick: notify the device unless it asked not to be (2.7.10)."""
        self.counters.kicks += 1
        new = self.avail_idx
        old = (new - self.num_added) & 0xFFFF
        self.num_added = 0
        if self.event_idx:
            avail_event = self.mem.read_u16(self.layout.used + spec.avail_event_offset(self.size))
            needed = spec.vring_need_event(avail_event, new, old)
        else:
            needed = not self.mem.read_u16(self.layout.used) & spec.VIRTQ_USED_F_NO_NOTIFY
        if needed:
            self.counters.notifications += 1
            self._notify()
        return needed

    # --- used buffers ---------------------------------------------------------------------
    def get_buf(self) -> tuple[object, int] | None:
        """virtqueue_get_buf: the next used buffer's token and written length, or None."""
        used_idx = self.mem.read_u16(self.layout.used + spec.USED_IDX_OFF)
        if used_idx == self.last_used:
            return None
        slot = self.last_used % self.size
        elem = self.layout.used + spec.USED_RING_OFF + spec.USED_ELEM_SIZE * slot
        head, written = self.mem.read_u32(elem), self.mem.read_u32(elem + 4)
        entry = self._in_flight.pop(head, None)
        if entry is None:
            raise GuestModelError(f"device returned descriptor {head}, which is not in flight")
        # detach_buf_split: the chain's descriptors go back on the free list.
        for index in reversed(entry.descriptors):
            self._next[index] = self.free_head
            self.free_head = index
        self.num_free += len(entry.descriptors)
        self.last_used = (self.last_used + 1) & 0xFFFF
        if self.event_idx:
            # "If we expect an interrupt for the next entry, tell host by writing event index."
            self.mem.write_u16(
                self.layout.avail + spec.used_event_offset(self.size), self.last_used
            )
        return entry.token, written

    def wait_for_used(self) -> tuple[object, int]:
        """Block (let the device run) until a buffer comes back: the seed's kick_sync.

        Whatever was published and not yet kicked is kicked first: waiting on buffers the
        device was never told about would wait forever (a chain closed at 2^32 bytes is
        published before the request's last kick)."""
        if self.num_added:
            self.kick()
        for _ in range(self._max_waits):
            got = self.get_buf()
            if got is not None:
                return got
            self.counters.waits += 1
            self._wait()
        raise GuestModelError(f"the device returned no buffer after {self._max_waits} waits")

    @property
    def in_flight(self) -> int:
        """Chains the device holds."""
        return len(self._in_flight)
