"""The split queue, device side: every hostile class of docs/vring-parse.md ends in its error.

Each test is named after the error it provokes; each builds the smallest ring that shows it.
"""

from __future__ import annotations

import pytest

from balloonctl import errors
from balloonctl.virtio import spec
from balloonctl.virtio.layout import RingLayout
from balloonctl.virtio.memory import Backing, GuestMemory
from balloonctl.virtio.mock import MockDriverQueue
from balloonctl.virtio.queue import SplitQueue
from tests.support.ring import MEM_SIZE, Ring

NEXT = spec.VIRTQ_DESC_F_NEXT
WRITE = spec.VIRTQ_DESC_F_WRITE
INDIRECT = spec.VIRTQ_DESC_F_INDIRECT


def pop_error(ring: Ring, **kwargs: bool | int) -> errors.VirtioError:
    queue = ring.driver.device_queue(**kwargs)
    with pytest.raises(errors.VirtioError) as info:
        queue.pop()
    return info.value


# --- configuration -------------------------------------------------------------------------
@pytest.mark.parametrize("size", [0, 3, 100, 65536, 32769])
def test_QueueSizeInvalid(size: int) -> None:
    with GuestMemory.simple(MEM_SIZE) as mem, pytest.raises(errors.QueueSizeInvalid):
        SplitQueue(mem, size, 0, 0x1000, 0x2000)


def test_queue_size_32768_is_valid() -> None:
    with GuestMemory.simple(1 << 20) as mem:
        queue = SplitQueue(mem, 32768, 0, 0x80000, 0x90000)
        assert queue.pop() is None


@pytest.mark.parametrize(
    ("desc", "avail", "used"),
    [(0x8, 0x1000, 0x2000), (0x0, 0x1001, 0x2000), (0x0, 0x1000, 0x2002)],
    ids=["desc-16", "avail-2", "used-4"],
)
def test_RingMisaligned(desc: int, avail: int, used: int) -> None:
    with GuestMemory.simple(MEM_SIZE) as mem, pytest.raises(errors.RingMisaligned):
        SplitQueue(mem, 8, desc, avail, used)


@pytest.mark.parametrize(
    ("desc", "avail", "used"),
    [
        (MEM_SIZE - 16 * 8 + 16, 0x1000, 0x2000),  # table ends 16 bytes past RAM
        (0x0, MEM_SIZE - (6 + 2 * 8) + 2, 0x2000),  # used_event past RAM
        (0x0, 0x1000, MEM_SIZE - 68),  # 70 bytes from here: avail_event past RAM
        (0x0, 0x1000, (1 << 64) - 16),  # wraps the address space
    ],
    ids=["desc", "avail-used_event", "used-avail_event", "wrap"],
)
def test_RingOutOfBounds(desc: int, avail: int, used: int) -> None:
    with GuestMemory.simple(MEM_SIZE) as mem, pytest.raises(errors.RingOutOfBounds):
        SplitQueue(mem, 8, desc, avail, used)


def test_rings_exactly_at_the_end_of_memory_are_in_bounds() -> None:
    # The sizes are exact (16N, 6+2N, 6+8N): a ring that ends on the last byte is legal.
    with GuestMemory.simple(MEM_SIZE) as mem:
        SplitQueue(mem, 8, MEM_SIZE - 128, MEM_SIZE - 128 - 24, MEM_SIZE - 128 - 24 - 72)


def test_configuration_checks_run_size_then_alignment_then_bounds() -> None:
    with GuestMemory.simple(MEM_SIZE) as mem:
        with pytest.raises(errors.QueueSizeInvalid):
            SplitQueue(mem, 3, 0x8, 0x1, 1 << 40)
        with pytest.raises(errors.RingMisaligned):
            SplitQueue(mem, 8, 0x8, 0x1000, 1 << 40)


# --- the available ring --------------------------------------------------------------------
def test_AvailIndexJump(ring: Ring) -> None:
    ring.driver.set_avail_idx(9)  # queue size 8
    assert isinstance(pop_error(ring), errors.AvailIndexJump)


def test_avail_index_of_exactly_queue_size_is_legal(ring: Ring) -> None:
    buf = ring.heap.alloc(4)
    for _ in range(8):
        ring.driver.write_desc(0, buf, 4)
        ring.driver.publish(0)
    queue = ring.driver.device_queue()
    assert queue.pending() == 8


def test_HeadOutOfRange(ring: Ring) -> None:
    ring.driver.publish(8)
    err = pop_error(ring)
    assert isinstance(err, errors.HeadOutOfRange)
    assert err.head == 8


# --- chains --------------------------------------------------------------------------------
def test_NextOutOfRange(ring: Ring) -> None:
    buf = ring.heap.alloc(8)
    ring.driver.write_desc(0, buf, 4, NEXT, 8)
    ring.driver.publish(0)
    err = pop_error(ring)
    assert isinstance(err, errors.NextOutOfRange)
    assert (err.head, err.index) == (0, 0)


def test_NextOutOfRange_in_indirect_table(ring: Ring) -> None:
    buf = ring.heap.alloc(8)
    table = ring.heap.alloc(32)
    ring.driver.write_table(table, [(buf, 4, NEXT, 2), (buf, 4, 0, 0)])  # 2 entries, next 2
    ring.driver.write_desc(0, table, 32, INDIRECT)
    ring.driver.publish(0)
    err = pop_error(ring)
    assert isinstance(err, errors.NextOutOfRange)
    assert err.indirect and err.index == 0


def test_DescriptorLoop(ring: Ring) -> None:
    buf = ring.heap.alloc(8)
    ring.driver.write_desc(0, buf, 4, NEXT, 1)
    ring.driver.write_desc(1, buf, 4, NEXT, 0)
    ring.driver.publish(0)
    assert isinstance(pop_error(ring), errors.DescriptorLoop)


def test_DescriptorLoop_self(ring: Ring) -> None:
    buf = ring.heap.alloc(8)
    ring.driver.write_desc(3, buf, 4, NEXT, 3)
    ring.driver.publish(3)
    err = pop_error(ring)
    assert isinstance(err, errors.DescriptorLoop)
    assert err.head == 3


def test_DescriptorLoop_in_indirect_table(ring: Ring) -> None:
    buf = ring.heap.alloc(8)
    table = ring.heap.alloc(32)
    ring.driver.write_table(table, [(buf, 4, NEXT, 1), (buf, 4, NEXT, 0)])
    ring.driver.write_desc(0, table, 32, INDIRECT)
    ring.driver.publish(0)
    err = pop_error(ring)
    assert isinstance(err, errors.DescriptorLoop)
    assert err.indirect


def test_chain_through_the_whole_table_is_legal(ring: Ring) -> None:
    buf = ring.heap.alloc(8)
    for i in range(8):
        ring.driver.write_desc(i, buf, 4, NEXT if i < 7 else 0, i + 1 if i < 7 else 0)
    ring.driver.publish(0)
    chain = ring.driver.device_queue().pop()
    assert chain is not None and [d.index for d in chain] == list(range(8))


def test_DescriptorLoop_when_chains_in_flight_reuse_descriptors(ring: Ring) -> None:
    # Two available entries naming the same 8-long chain: 16 descriptors in flight from a
    # table of 8, which no legal driver can do (and which would cost N*N to walk).
    buf = ring.heap.alloc(8)
    for i in range(8):
        ring.driver.write_desc(i, buf, 4, NEXT if i < 7 else 0, i + 1 if i < 7 else 0)
    ring.driver.publish(0)
    ring.driver.publish(0)
    queue = ring.driver.device_queue()
    assert queue.pop() is not None
    with pytest.raises(errors.DescriptorLoop):
        queue.pop()


def test_same_head_twice_is_tolerated_while_descriptors_fit(ring: Ring) -> None:
    # Like QEMU, a repeated one-descriptor head is not itself an error.
    buf = ring.heap.alloc(8)
    ring.driver.write_desc(0, buf, 4)
    ring.driver.publish(0)
    ring.driver.publish(0)
    queue = ring.driver.device_queue()
    assert queue.pop() is not None and queue.pop() is not None


@pytest.mark.parametrize(
    ("addr", "length"),
    [(MEM_SIZE - 4, 8), (MEM_SIZE, 1), ((1 << 64) - 4, 8), (1 << 63, 4096)],
    ids=["straddles-end", "past-end", "wraps-2**64", "far-away"],
)
def test_BufferOutOfBounds(ring: Ring, addr: int, length: int) -> None:
    ring.driver.write_desc(0, addr, length)
    ring.driver.publish(0)
    err = pop_error(ring)
    assert isinstance(err, errors.BufferOutOfBounds)
    assert (err.head, err.index) == (0, 0)


def test_ZeroLengthBuffer(ring: Ring) -> None:
    buf = ring.heap.alloc(8)
    ring.driver.write_desc(0, buf, 4, NEXT, 1)
    ring.driver.write_desc(1, buf, 0)
    ring.driver.publish(0)
    err = pop_error(ring)
    assert isinstance(err, errors.ZeroLengthBuffer)
    assert err.index == 1


def test_ChainTooLong() -> None:
    # Three 1.5 GiB buffers (a 2 GiB guest, lazily mapped) add up past 2**32.
    with GuestMemory.simple(2 << 30, backing=Backing.ANON) as mem:
        driver = MockDriverQueue(mem, RingLayout.packed(8))
        big = 3 << 29
        driver.add_chain([(1 << 20, big, False), (1 << 20, big, False), (1 << 20, big, True)])
        with pytest.raises(errors.ChainTooLong) as info:
            driver.device_queue().pop()
        assert info.value.index == 2


def test_chain_of_exactly_2_pow_32_bytes_is_legal() -> None:
    with GuestMemory.simple(3 << 30, backing=Backing.ANON) as mem:
        driver = MockDriverQueue(mem, RingLayout.packed(8))
        driver.add_chain([(1 << 20, 1 << 31, False), (1 << 20, 1 << 31, False)])
        chain = driver.device_queue().pop()
        assert chain is not None and chain.readable_bytes == 1 << 32


@pytest.mark.parametrize(
    ("length", "why"),
    [(0, "len 0"), (24, "not a multiple of 16"), (16 * 9, "more entries than the queue")],
)
def test_IndirectTableInvalid(ring: Ring, length: int, why: str) -> None:
    table = ring.heap.alloc(16 * 9)
    buf = ring.heap.alloc(8)
    ring.driver.write_table(table, [(buf, 4, 0, 0)] * 9)
    ring.driver.write_desc(0, table, length, INDIRECT)
    ring.driver.publish(0)
    err = pop_error(ring)
    assert isinstance(err, errors.IndirectTableInvalid), why
    assert err.index == 0


def test_IndirectTableInvalid_outside_memory(ring: Ring) -> None:
    ring.driver.write_desc(0, MEM_SIZE - 16, 32, INDIRECT)
    ring.driver.publish(0)
    assert isinstance(pop_error(ring), errors.IndirectTableInvalid)


def test_IndirectTableInvalid_when_not_negotiated(ring: Ring) -> None:
    table = ring.heap.alloc(16)
    buf = ring.heap.alloc(8)
    ring.driver.write_table(table, [(buf, 4, 0, 0)])
    ring.driver.write_desc(0, table, 16, INDIRECT)
    ring.driver.publish(0)
    assert isinstance(pop_error(ring, indirect=False), errors.IndirectTableInvalid)


def test_NestedIndirect(ring: Ring) -> None:
    inner = ring.heap.alloc(16)
    outer = ring.heap.alloc(16)
    buf = ring.heap.alloc(8)
    ring.driver.write_table(inner, [(buf, 4, 0, 0)])
    ring.driver.write_table(outer, [(inner, 16, INDIRECT, 0)])
    ring.driver.write_desc(0, outer, 16, INDIRECT)
    ring.driver.publish(0)
    err = pop_error(ring)
    assert isinstance(err, errors.NestedIndirect)
    assert err.indirect


def test_IndirectWithNext(ring: Ring) -> None:
    table = ring.heap.alloc(16)
    buf = ring.heap.alloc(8)
    ring.driver.write_table(table, [(buf, 4, 0, 0)])
    ring.driver.write_desc(0, table, 16, INDIRECT | NEXT, 1)
    ring.driver.write_desc(1, buf, 4)
    ring.driver.publish(0)
    assert isinstance(pop_error(ring), errors.IndirectWithNext)


def test_indirect_flag_rules_are_checked_before_length(ring: Ring) -> None:
    # INDIRECT|NEXT with a zero length: the flags rule wins (docs/vring-parse.md's check order).
    ring.driver.write_desc(0, 0, 0, INDIRECT | NEXT, 1)
    ring.driver.publish(0)
    assert isinstance(pop_error(ring), errors.IndirectWithNext)


def test_DescriptorOrder(ring: Ring) -> None:
    buf = ring.heap.alloc(16)
    ring.driver.add_chain([(buf, 4, True), (buf + 8, 4, False)])
    err = pop_error(ring)
    assert isinstance(err, errors.DescriptorOrder)
    assert err.index == 1


def test_DescriptorOrder_across_direct_part_and_indirect_table(ring: Ring) -> None:
    buf = ring.heap.alloc(16)
    table = ring.heap.alloc(16)
    ring.driver.add_indirect_chain([(buf, 4, False)], table, direct=[(buf + 8, 4, True)])
    err = pop_error(ring)
    assert isinstance(err, errors.DescriptorOrder)
    assert err.indirect


# --- legal shapes --------------------------------------------------------------------------
def test_chain_then_indirect_is_legal(ring: Ring) -> None:
    # 2.7.5.3.2: zero or more normal chained descriptors followed by one INDIRECT one.
    a, b, c = ring.heap.alloc(8), ring.heap.alloc(8), ring.heap.alloc(8)
    table = ring.heap.alloc(32)
    head = ring.driver.add_indirect_chain(
        [(b, 8, False), (c, 8, True)], table, direct=[(a, 4, False)]
    )
    queue = ring.driver.device_queue()
    chain = queue.pop()
    assert chain is not None
    assert chain.head == head
    assert [(d.addr, d.in_indirect, d.index) for d in chain] == [
        (a, False, head),
        (b, True, 0),
        (c, True, 1),
    ]
    assert chain.indirect is not None and chain.indirect.addr == table
    assert (chain.readable_bytes, chain.writable_bytes) == (12, 8)


def test_write_flag_of_the_indirect_descriptor_is_ignored(ring: Ring) -> None:
    # 2.7.5.3.2: the device MUST ignore the write-only flag of the INDIRECT descriptor, so it
    # does not make the readable entries of its table out of order.
    buf = ring.heap.alloc(8)
    table = ring.heap.alloc(16)
    ring.driver.write_table(table, [(buf, 8, 0, 0)])
    ring.driver.write_desc(0, table, 16, INDIRECT | WRITE)
    ring.driver.publish(0)
    chain = ring.driver.device_queue().pop()
    assert chain is not None and chain.readable_bytes == 8


def test_index_wrap_around(ring: Ring) -> None:
    # avail.idx and used.idx are free-running u16s: start both just below 65536 and run
    # chains across the wrap; the ring slots are idx % N.
    buf = ring.heap.alloc(8)
    ring.driver.write_desc(0, buf, 4)
    start = 65533
    ring.driver.set_avail_idx(start)
    ring.mem.write_u16(ring.layout.used + spec.USED_IDX_OFF, start)
    ring.driver.last_used = start
    queue = ring.driver.device_queue(last_avail_idx=start)
    seen = 0
    for _ in range(3):
        for _ in range(2):
            ring.driver.publish(0)
        while (chain := queue.pop()) is not None:
            queue.add_used(chain.head, 0)
            seen += 1
    assert seen == 6
    assert queue.last_avail_idx == (start + 6) & 0xFFFF == 3
    assert ring.mem.read_u16(ring.layout.used + spec.USED_IDX_OFF) == 3
    assert len(ring.driver.reclaim()) == 6


def test_add_used_writes_element_then_index(ring: Ring) -> None:
    buf = ring.heap.alloc(8)
    head = ring.driver.add_chain([(buf, 8, True)])
    queue = ring.driver.device_queue()
    chain = queue.pop()
    assert chain is not None
    queue.add_used(chain.head, 5)
    assert ring.driver.reclaim() == [(head, 5)]
    assert queue.in_flight == 0


# --- notification suppression --------------------------------------------------------------
def test_no_interrupt_flag_suppresses_notification(ring: Ring) -> None:
    buf = ring.heap.alloc(8)
    ring.driver.add_chain([(buf, 4, False)])
    queue = ring.driver.device_queue()
    chain = queue.pop()
    assert chain is not None
    queue.add_used(chain.head)
    ring.driver.set_avail_flags(spec.VIRTQ_AVAIL_F_NO_INTERRUPT)
    assert not queue.needs_notification()
    ring.driver.set_avail_flags(0)
    assert queue.needs_notification()


def test_event_idx_used_event(ring: Ring) -> None:
    buf = ring.heap.alloc(8)
    queue = ring.driver.device_queue(event_idx=True)
    ring.driver.set_used_event(1)  # interrupt me once the second element is used
    results = []
    for _ in range(3):
        ring.driver.add_chain([(buf, 4, False)])
        chain = queue.pop()
        assert chain is not None
        queue.add_used(chain.head)
        results.append(queue.needs_notification())
    # First call always notifies (nothing signalled yet); then only when used.idx passes 1.
    assert results == [True, True, False]


def test_event_idx_avail_event_and_no_notify(ring: Ring) -> None:
    buf = ring.heap.alloc(8)
    queue = ring.driver.device_queue(event_idx=True)
    ring.driver.add_chain([(buf, 4, False)])
    assert queue.pop() is not None
    avail_event = ring.layout.used + spec.avail_event_offset(8)
    assert ring.mem.read_u16(avail_event) == 1  # kick me when avail.idx passes 1
    plain = ring.driver.device_queue(last_avail_idx=1)  # the first chain is consumed
    plain.set_notification(False)
    assert ring.mem.read_u16(ring.layout.used) & spec.VIRTQ_USED_F_NO_NOTIFY
    assert plain.enable_notification() is False  # nothing new yet
    plain.set_notification(False)
    ring.driver.add_chain([(buf, 4, False)])
    assert plain.enable_notification() is True  # something arrived while disabled
    assert not ring.mem.read_u16(ring.layout.used) & spec.VIRTQ_USED_F_NO_NOTIFY


def test_read_only_queue_never_writes(ring: Ring) -> None:
    buf = ring.heap.alloc(8)
    ring.driver.add_chain([(buf, 4, False)])
    before = ring.mem.read(0, 0x1000)
    queue = ring.driver.device_queue(event_idx=True, read_only=True)
    assert queue.pop() is not None
    assert ring.mem.read(0, 0x1000) == before
    with pytest.raises(ValueError, match="read-only"):
        queue.add_used(0)
