"""Pure fuzz harnesses: raw bytes in, an oracle's verdict out (issue 7).

Each harness in :data:`TARGETS` takes the fuzzer's bytes, decodes them with
:class:`ByteReader` into inputs for one untrusted-input surface of balloonctl, runs them,
catches *only* the errors documented for that surface (docs/vring-parse.md,
"Hostile-guest input classes", and the error tree in ``balloonctl.errors``) and checks an
explicit oracle. Anything else that escapes, an unexpected exception or an
:class:`OracleViolation`, is a finding.

Why no atheris here: the same functions replay the committed corpus in plain pytest
(``tests/fuzz``) and in ``fuzz/replay.py`` on machines without atheris, so a finding pinned
as a corpus file is checked on every change. The decoder is deliberately pure Python and
deterministic (bytes run out as zeroes), unlike atheris' FuzzedDataProvider, whose
decoding is not specified to be stable across versions.

Set-up happens once per process, not per input (issue 17): the guest memory of vring_ops,
balloon_requests and driver_device_roundtrip is made once per layout (:func:`_memory`) and
reset to all-zero before each input (:class:`_ReusedMemory` says why that reset is total);
the counting descriptor table is one class; RAM's PFN set is computed with the memory. What
each input builds is what it fuzzes: the queue, the device and the driver from its own
parameters. The guest's own writes go straight into RAM (``poke``), and the oracles read and
bounds-check RAM themselves (``peek``, ``holds``), not through memory.py, which is both
faster and more independent. fuzz/scope.py says which modules atheris instruments.

Targets and oracles:

* ``vring_ops``: queue parameters, guest writes and device operations on
  :class:`~balloonctl.virtio.queue.SplitQueue`. Only ``VirtioError`` may end a run. Each
  pop reads at most N + N descriptors (its table, one indirect table), agrees with an
  independent reference walk of docs/vring-parse.md's rules, and the device writes nothing but the
  used ring. A ``GuestMemoryError`` escaping (a touch outside guest memory) is a finding.
* ``vring_image``: a header of queue parameters and a raw image through ``vring parse``'s
  :func:`~balloonctl.virtio.inspect.parse_ring`, which must report every problem in its
  dict; the fast JSON renderer must say exactly what the dict says; the image is not written.
* ``balloon_requests``: inflate/deflate/stats/reporting buffers through the balloon device on
  a real memfd-backed guest memory. Every discard lies in guest RAM; each request's accepted
  and rejected pages equal a page-by-page reference model; the balloon's accounting adds up.
* ``driver_device_roundtrip``: random host and guest actions through the guest driver model
  and the device (``balloonctl.guest.testbed``): the device reads exactly the pages the
  driver meant, nothing is rejected, and guest and device agree (``Testbed.check``).
* ``qmp_replies``: any JSON through the QMP reply decoders: only ``BalloonError``.
* ``libvirt_stats``: any JSON (memoryStats-like dicts) and any XML text through the libvirt
  backend's pure helpers: only ``BalloonError``, and what comes out is well typed.
* ``config``: any bytes as a configuration file: only ``ConfigError``.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Final, TypeVar

import numpy as np

from balloonctl import errors
from balloonctl.backends import libvirt as libvirt_backend
from balloonctl.backends import qmpvocab
from balloonctl.backends.base import GuestStats
from balloonctl.backends.qmpvocab import parse_queue_status
from balloonctl.daemon.config import load as load_config
from balloonctl.errors import BalloonError, ConfigError, GuestMemoryError, VirtioError
from balloonctl.guest.allocator import PageState
from balloonctl.guest.testbed import Testbed, TestbedConfig
from balloonctl.units import PAGE_SHIFT, PAGE_SIZE
from balloonctl.virtio import queue as queue_module
from balloonctl.virtio import spec
from balloonctl.virtio.balloon import BalloonDevice, DiscardStrategy, RequestResult
from balloonctl.virtio.features import PROFILES, negotiate
from balloonctl.virtio.inspect import Decode, RingParams, parse_ring, render_ring_json
from balloonctl.virtio.layout import RingLayout
from balloonctl.virtio.memory import Backing, DiscardResult, GuestMemory, Region
from balloonctl.virtio.mock import BumpAllocator, MockDriverQueue
from balloonctl.virtio.pages import DUPLICATE, NOT_IN_BALLOON, OUT_OF_RAM, expand_ranges
from balloonctl.virtio.queue import Chain, SplitQueue
from balloonctl.virtio.requests import STATS_BYTES_MAX
from balloonctl.virtio.spec import BalloonQueue

_T = TypeVar("_T")


class OracleViolation(AssertionError):  # noqa: N818 (the name is the contract)
    """A harness's oracle failed: balloonctl did something its contract forbids."""


def _check(condition: bool, message: str) -> None:
    """``assert`` that survives ``python -O`` (a fuzz oracle must never be compiled out)."""
    if not condition:
        raise OracleViolation(message)


class ByteReader:
    """A deterministic consumer of fuzz bytes, like atheris' FuzzedDataProvider.

    Integers are little-endian; once the data runs out every read returns zeroes, so any
    input decodes to *something* and a corpus file replays the same way forever.

    It runs a few hundred times per input (every decoded field), uninstrumented, so the
    common reads are written for speed: ``u8`` indexes instead of slicing, and the fixed
    widths unpack in place while whole. What any read returns is exactly what
    ``int.from_bytes(take(n), "little")`` returns; ``tests/fuzz/test_speed.py`` pins that.
    """

    __slots__ = ("_data", "_len", "_pos")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._len = len(data)
        self._pos = 0

    @property
    def remaining(self) -> int:
        """Bytes not consumed yet."""
        return self._len - self._pos

    def take(self, n: int) -> bytes:
        """Up to ``n`` bytes (fewer at the end)."""
        pos = self._pos
        if n <= 0 or pos >= self._len:
            return b""
        chunk = self._data[pos : pos + n]
        self._pos = pos + len(chunk)
        return chunk

    def uint(self, nbytes: int) -> int:
        """An unsigned little-endian integer of ``nbytes`` bytes."""
        return int.from_bytes(self.take(nbytes), "little")

    def u8(self) -> int:
        """One byte."""
        pos = self._pos
        if pos < self._len:
            self._pos = pos + 1
            return self._data[pos]
        return 0

    def _fixed(self, unpack: Callable[[bytes, int], tuple[int]], nbytes: int) -> int:
        pos = self._pos
        if pos + nbytes <= self._len:
            self._pos = pos + nbytes
            return unpack(self._data, pos)[0]
        return self.uint(nbytes)

    def u16(self) -> int:
        """A le16."""
        return self._fixed(_LE16, 2)

    def u32(self) -> int:
        """A le32."""
        return self._fixed(_LE32, 4)

    def u64(self) -> int:
        """A le64."""
        return self._fixed(_LE64, 8)

    def below(self, n: int) -> int:
        """An integer in ``[0, n)`` (0 when ``n`` <= 1), using as few bytes as ``n`` needs."""
        if n <= 1:
            return 0
        if n < 0x100:  # one byte, as (n.bit_length() + 7) // 8 says
            return self.u8() % n
        return self.uint((n.bit_length() + 7) // 8) % n

    def flag(self) -> bool:
        """One byte's low bit."""
        return bool(self.u8() & 1)

    def pick(self, items: Sequence[_T]) -> _T:
        """One of ``items`` (non-empty)."""
        return items[self.below(len(items))]

    def rest(self) -> bytes:
        """Everything not consumed yet."""
        return self.take(self.remaining)


_LE16: Final = struct.Struct("<H").unpack_from
_LE32: Final = struct.Struct("<I").unpack_from
_LE64: Final = struct.Struct("<Q").unpack_from


# ============================================================================================
# vring_ops
# ============================================================================================

#: Queue sizes worth trying: the invalid ones (0, not a power of two, > 32768) included.
QUEUE_SIZES: Final = (0, 1, 2, 3, 4, 8, 16, 32, 64, 100, 128, 256, 1024, 32768, 65536)
#: Lengths at the edges of docs/vring-parse.md's checks (0, not a multiple of 16, a page,
#: 2**32 - 1).
LENGTHS: Final = (0, 1, 4, 15, 16, 32, 48, 4096, 0x10000, 0xFFFFFFFF)
#: Guest memory for the queue targets: two regions and a hole between them, so the "leaves
#: guest memory" checks meet a hole as well as the end of RAM.
_RING_LAYOUT: Final = ((0, 0x8000), (0xC000, 0x4000))
_RING_LAYOUT_LARGE: Final = ((0, 0x100000), (0x110000, 0x10000))
_MAX_OPS: Final = 256


class _ReusedMemory(GuestMemory):
    """Guest memory made once per process and reset before every input (issue 17).

    A fresh memory per input cost a bytearray (a mmap and a memfd for the balloon target)
    and its zeroing every time; this one is made once by :func:`_memory` and
    :meth:`reset` gives it back all-zero, as a fresh one is.

    Why the reset is total: every byte outside the dirty span of its region is zero. That
    holds after ``__init__`` and after :meth:`reset` (which zeroes the spans), and every way
    to write is tracked: :meth:`write` (``write_u16``/``u32``/``u64`` call it) and
    :meth:`poke` widen the span first; a discard writes only zeroes (bytes backing) or punches
    a hole that reads as zeroes (memfd); nothing in balloonctl writes through
    ``Region.view`` (the queue reads its table through it, never writes).
    ``tests/fuzz/test_speed.py`` replays every corpus input and checks that the memory is
    all zero after its reset.

    The regions must not touch (each layout here has a hole between them): then a range is
    RAM exactly when one region holds it, which lets :meth:`holds` and :meth:`poke` say so
    without memory.py, in a few comparisons.
    """

    def __init__(self, layout: Sequence[tuple[int, int]], backing: Backing = Backing.BYTES) -> None:
        super().__init__([Region(base, size, backing) for base, size in layout])
        for before, after in zip(self.regions, self.regions[1:], strict=False):
            if before.end >= after.base:
                raise ValueError("a reused harness memory needs a hole between its regions")
        self._spans = [(r.base, r.end, r.view) for r in self.regions]
        #: Per region, [lo, hi): the offsets written since the last reset.
        self._dirty = [[r.size, 0] for r in self.regions]
        self._zeros = memoryview(bytes(max(r.size for r in self.regions)))

    def _mark(self, addr: int, length: int) -> None:
        end = addr + length
        for (lo, hi, _), span in zip(self._spans, self._dirty, strict=True):
            if addr < hi and end > lo:
                span[0] = min(span[0], max(addr, lo) - lo)
                span[1] = max(span[1], min(end, hi) - lo)

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        self._mark(addr, len(data))
        super().write(addr, data)

    def holds(self, addr: int, length: int) -> bool:
        """Whether ``[addr, addr + length)`` is RAM: the oracle's own bounds, not memory.py's
        (so a bug in ``GuestMemory.contains`` cannot agree with itself)."""
        end = addr + length
        return any(lo <= addr and end <= hi for lo, hi, _ in self._spans)

    def peek(self, addr: int, length: int) -> bytes:
        """The oracle's read of RAM it knows is there (``holds``); memory.py is not asked."""
        end = addr + length
        for lo, hi, view in self._spans:
            if lo <= addr and end <= hi:
                return bytes(view[addr - lo : end - lo])
        raise GuestMemoryError(f"oracle read {addr:#x}+{length:#x} outside guest memory")

    def poke(self, addr: int, data: bytes | bytearray) -> None:
        """The guest writes its own memory: all of ``data`` if RAM holds it, else nothing (a
        write that would leave RAM is not one a guest can do)."""
        n = len(data)
        if not n:
            return
        end = addr + n
        for (lo, hi, view), span in zip(self._spans, self._dirty, strict=True):
            if lo <= addr and end <= hi:
                off = addr - lo
                view[off : off + n] = data
                span[0] = min(span[0], off)
                span[1] = max(span[1], off + n)
                return

    def reset(self) -> None:
        """All RAM zero again, as a fresh memory is."""
        for (_, _, view), span in zip(self._spans, self._dirty, strict=True):
            lo, hi = span
            if hi > lo:
                view[lo:hi] = self._zeros[: hi - lo]
            span[0], span[1] = len(view), 0

    def is_zero(self) -> bool:
        """Every byte zero (the reset's test; a whole scan, so not called per input)."""
        return all(not any(view) for _, _, view in self._spans)


_M = TypeVar("_M", bound=_ReusedMemory)
_MEMORIES: dict[tuple[type[_ReusedMemory], tuple[tuple[int, int], ...], Backing], object] = {}


def _memory(
    kind: type[_M], layout: tuple[tuple[int, int], ...], backing: Backing = Backing.BYTES
) -> _M:
    """The process's one memory of this kind and layout, reset for a new input."""
    key = (kind, layout, backing)
    mem = _MEMORIES.get(key)
    if mem is None:
        mem = _MEMORIES[key] = kind(layout, backing)
    assert isinstance(mem, kind)
    mem.reset()
    return mem


def reset_memories() -> list[GuestMemory]:
    """Reset every reused memory and return them (for the reset's test)."""
    out: list[GuestMemory] = []
    for mem in _MEMORIES.values():
        assert isinstance(mem, _ReusedMemory)
        mem.reset()
        out.append(mem)
    return out


class _SpyMemory(_ReusedMemory):
    """Guest memory that records what the *device* writes (``device_phase``), to hold the
    device to writing only its used ring (2.7.8: the used ring is the device's; everything
    else belongs to the driver)."""

    device_phase = False
    allowed: tuple[int, int] = (0, 0)

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        if self.device_phase:
            lo, hi = self.allowed
            _check(
                lo <= addr and addr + len(data) <= hi,
                f"device wrote {addr:#x}+{len(data):#x}, outside its used ring {lo:#x}..{hi:#x}",
            )
        super().write(addr, data)

    def reset(self) -> None:
        super().reset()
        self.device_phase = False
        self.allowed = (0, 0)


class _TableReads:
    """Counts descriptor reads, to check that a pop is bounded by the queue size."""

    count = 0


def _counting_table_class() -> type[queue_module._Table]:
    """A subclass of ``queue._Table`` counting ``read`` calls: made once per process."""
    original = queue_module._Table

    class Counting(original):  # type: ignore[valid-type,misc]
        __slots__ = ()

        def read(self, index: int) -> tuple[int, int, int, int]:
            _TableReads.count += 1
            return super().read(index)  # type: ignore[no-any-return]

    return Counting


_COUNTING_TABLE: Final = _counting_table_class()


@contextlib.contextmanager
def _counting_tables() -> Iterator[None]:
    """Swap ``queue._Table`` for the counting subclass, for one harness run.

    The harness patches instead of balloonctl exposing a counter, so that the device code
    pays nothing for being fuzzed; it is restored on the way out whatever happens.
    """
    original = queue_module._Table
    queue_module._Table = _COUNTING_TABLE  # type: ignore[misc]
    try:
        yield
    finally:
        queue_module._Table = original  # type: ignore[misc]


#: A reference walk's result: descriptors (index, addr, len, flags, next, in_indirect) or
#: the VirtioError subclass the walk must end in.
_Walk = list[tuple[int, int, int, int, int, bool]] | type[VirtioError] | None


def _reference_pop(mem: _ReusedMemory, q: SplitQueue) -> _Walk:
    """What the next pop must give, from docs/vring-parse.md's rules written out independently.

    Order: the avail index (AvailIndexJump), the head (HeadOutOfRange), then per
    descriptor its flags (the INDIRECT rules, 2.7.5.3.1), its length, its bounds, its
    direction (2.7.4.2), the chain's total (2.7.5.2) and its next (2.7.5). None: nothing
    available. It reads and bounds-checks through the harness's own ``peek``/``holds``, not
    through memory.py, so the two sides share nothing but the bytes.
    """
    avail_idx = _U16.unpack(mem.peek(q.avail + spec.AVAIL_IDX_OFF, 2))[0]
    count = (avail_idx - q.last_avail_idx) & 0xFFFF
    if count > q.size:
        return errors.AvailIndexJump
    if count == 0:
        return None
    head = _U16.unpack(
        mem.peek(q.avail + spec.AVAIL_RING_OFF + 2 * (q.last_avail_idx % q.size), 2)
    )[0]
    if head >= q.size:
        return errors.HeadOutOfRange
    table, entries, in_indirect = q.desc, q.size, False
    index, visited, seen_write, total = head, 0, False, 0
    out: list[tuple[int, int, int, int, int, bool]] = []
    while True:
        visited += 1
        if visited > entries:
            return errors.DescriptorLoop
        addr, length, flags, nxt = spec.DESC_STRUCT.unpack(
            mem.peek(table + spec.DESC_SIZE * index, spec.DESC_SIZE)
        )
        if flags & spec.VIRTQ_DESC_F_INDIRECT:
            if in_indirect:
                return errors.NestedIndirect
            if flags & spec.VIRTQ_DESC_F_NEXT:
                return errors.IndirectWithNext
            if (
                not q.indirect
                or length == 0
                or length % spec.DESC_SIZE
                or length // spec.DESC_SIZE > q.size
                or not mem.holds(addr, length)
            ):
                return errors.IndirectTableInvalid
            table, entries, in_indirect = addr, length // spec.DESC_SIZE, True
            index, visited = 0, 0
            continue
        if length == 0:
            return errors.ZeroLengthBuffer
        if not mem.holds(addr, length):
            return errors.BufferOutOfBounds
        if flags & spec.VIRTQ_DESC_F_WRITE:
            seen_write = True
        elif seen_write:
            return errors.DescriptorOrder
        total += length
        if total > spec.MAX_CHAIN_BYTES:
            return errors.ChainTooLong
        out.append((index, addr, length, flags, nxt, in_indirect))
        if not flags & spec.VIRTQ_DESC_F_NEXT:
            return out
        if nxt >= entries:
            return errors.NextOutOfRange
        index = nxt


def _check_chain(mem: _ReusedMemory, q: SplitQueue, chain: Chain, reads: int) -> None:
    """Properties every popped chain has, whatever the reference says."""
    n = q.size
    entries = chain.indirect.len // spec.DESC_SIZE if chain.indirect is not None else 0
    _check(reads <= n + entries, f"pop read {reads} descriptors, queue size {n} + {entries}")
    _check(1 <= chain.table_descriptors <= n, f"{chain.table_descriptors} table descriptors")
    _check(len(chain) >= 1, "an empty chain was popped")
    total = 0
    seen_write = False
    for d in chain:
        _check(d.len > 0 and mem.holds(d.addr, d.len), f"buffer {d} not in guest memory")
        _check(not d.flags & spec.VIRTQ_DESC_F_INDIRECT, f"INDIRECT descriptor in chain: {d}")
        _check(not (seen_write and not d.is_write), "readable descriptor after a writable one")
        _check(d.index < (entries if d.in_indirect else n), f"descriptor index {d.index}")
        seen_write |= d.is_write
        total += d.len
    _check(total <= spec.MAX_CHAIN_BYTES, f"chain of {total} bytes popped")
    _check(total == chain.readable_bytes + chain.writable_bytes, "byte counts disagree")


#: Errors a pop may raise from admission (descriptors or indirect tables already in flight),
#: which a per-chain reference walk cannot foresee.
_ADMISSION_ERRORS: Final = (errors.DescriptorLoop, errors.IndirectTableInvalid)


def _device_pop(mem: _SpyMemory, q: SplitQueue, in_flight: list[int]) -> bool:
    """Pop once with every oracle on; False when the queue is broken (a VirtioError)."""
    expected = _reference_pop(mem, q)
    _TableReads.count = 0
    mem.device_phase = True
    try:
        chain = q.pop()
    except VirtioError as exc:
        if isinstance(expected, list):
            _check(
                isinstance(exc, _ADMISSION_ERRORS),
                f"pop raised {type(exc).__name__} where the reference accepts the chain",
            )
        else:
            _check(
                expected is type(exc),
                f"pop raised {type(exc).__name__}, the reference expects {expected}",
            )
        _check(_TableReads.count <= 2 * q.size, f"failed pop read {_TableReads.count}")
        return False
    finally:
        mem.device_phase = False
    if chain is None:
        _check(expected is None, f"pop gave nothing, the reference expects {expected}")
        return True
    got = [(d.index, d.addr, d.len, d.flags, d.next, d.in_indirect) for d in chain]
    _check(got == expected, f"pop gave {got}, the reference expects {expected}")
    _check_chain(mem, q, chain, _TableReads.count)
    in_flight.append(chain.head)
    return True


def _guest_write(mem: _ReusedMemory, addr: int, data: bytes) -> None:
    """The guest writes its own memory; a write that would leave it is not one it can do."""
    mem.poke(addr, data)


def _fuzz_addr(r: ByteReader, mem: GuestMemory) -> int:
    """A guest-physical address: mostly inside memory (possibly misaligned), sometimes raw."""
    mode = r.u8() % 4
    if mode == 0:
        return r.u64()
    if mode == 1:
        return r.below(mem.end) & ~0xF
    return r.below(mem.end)


def vring_ops(data: bytes) -> None:
    """Queue parameters, guest writes and device operations on one split queue."""
    r = ByteReader(data)
    config = r.u8()
    layout_spec = _RING_LAYOUT_LARGE if config & 0x80 else _RING_LAYOUT
    sel = r.u8()
    size = QUEUE_SIZES[sel] if sel < len(QUEUE_SIZES) else r.u16()
    base = r.below(layout_spec[0][1]) & ~0xF
    packed = RingLayout.packed(size if 0 < size <= spec.MAX_QUEUE_SIZE else 1, base)
    place = (config >> 4) & 3
    desc, avail, used = packed.desc, packed.avail, packed.used
    if place == 1:  # skewed: misalignment and overlap
        desc, avail, used = desc + r.u8(), avail + r.u8(), used + r.u8()
    elif place == 2:  # anywhere at all
        desc, avail, used = r.u64(), r.u64(), r.u64()
    mem = _memory(_SpyMemory, layout_spec)
    with _counting_tables():
        try:
            q = SplitQueue(
                mem,
                size,
                desc,
                avail,
                used,
                last_avail_idx=r.u16() if config & 0x40 else 0,
                event_idx=bool(config & 1),
                indirect=bool(config & 2),
                notify_on_empty=bool(config & 4),
            )
        except VirtioError:
            return
        mem.allowed = (used, used + spec.used_ring_size(size))
        _run_ops(r, mem, q)


def _run_ops(r: ByteReader, mem: _SpyMemory, q: SplitQueue) -> None:
    """Decode and run operations until the bytes or the queue run out.

    The guest's side (ops 0-2 and 7-10) writes with ``poke``, straight into RAM: those
    writes are the input, not code under test, and went through memory.py's checked path
    at about ten times the cost.
    """
    n = q.size
    in_flight: list[int] = []
    guest_avail = _U16.unpack(mem.peek(q.avail + spec.AVAIL_IDX_OFF, 2))[0]
    for _ in range(_MAX_OPS):
        if r.remaining == 0:
            return
        op = r.u8() % 11
        if op == 0:  # write one descriptor of the queue's table
            index = r.below(n)
            length = r.pick(LENGTHS) if r.flag() else r.u32()
            addr = _fuzz_addr(r, mem) % (1 << 64)
            raw = spec.DESC_STRUCT.pack(addr, length, r.u8(), r.u16())
            _guest_write(mem, q.desc + spec.DESC_SIZE * index, raw)
        elif op == 1:  # publish a head (2.7.13)
            head = r.u16() if r.u8() == 0xFF else r.below(n + 1)
            _guest_write(mem, q.avail + spec.AVAIL_RING_OFF + 2 * (guest_avail % n), _u16(head))
            guest_avail = (guest_avail + 1) & 0xFFFF
            _guest_write(mem, q.avail + spec.AVAIL_IDX_OFF, _u16(guest_avail))
        elif op == 2:  # avail.idx anywhere
            guest_avail = r.u16()
            _guest_write(mem, q.avail + spec.AVAIL_IDX_OFF, _u16(guest_avail))
        elif op == 3:
            if not _device_pop(mem, q, in_flight):
                return
        elif op == 4 and in_flight:  # return a chain (2.7.8)
            head = in_flight.pop(r.below(len(in_flight)))
            before = q.next_used
            mem.device_phase = True
            try:
                q.add_used(head, r.u32())
            finally:
                mem.device_phase = False
            used_idx = _U16.unpack(mem.peek(q.used + spec.USED_IDX_OFF, 2))[0]
            _check(used_idx == (before + 1) & 0xFFFF, "used.idx did not advance by one")
        elif op in (5, 6):  # notification checks (2.7.7.2, 2.7.10)
            mem.device_phase = True
            try:
                if op == 5:
                    q.needs_notification()
                elif r.flag():
                    q.enable_notification()
                else:
                    q.set_notification(False)
            except VirtioError:
                return
            finally:
                mem.device_phase = False
        elif op == 7:  # an indirect table somewhere
            addr = _fuzz_addr(r, mem)
            count = 1 + r.below(16)
            table = b"".join(
                spec.DESC_STRUCT.pack(
                    _fuzz_addr(r, mem) % (1 << 64),
                    r.pick(LENGTHS) if r.flag() else r.u32(),
                    r.u8(),
                    r.below(count + 1),
                )
                for _ in range(count)
            )
            _guest_write(mem, addr, table)
        elif op == 8:  # any bytes anywhere in guest memory (a driver model's whole ring)
            addr = _fuzz_addr(r, mem)
            _guest_write(mem, addr, r.take(1 + r.below(4096)))
        elif op == 9:  # avail.flags or used_event
            where = spec.AVAIL_FLAGS_OFF if r.flag() else spec.used_event_offset(n)
            _guest_write(mem, q.avail + where, _u16(r.u16()))
        elif op == 10:  # a run of chained descriptors (long chains, loops through the end)
            start, count = r.below(n), 1 + r.below(n)
            addr, length, flags = _fuzz_addr(r, mem) % (1 << 64), r.u32(), r.u8()
            _chain_run(mem, q.desc, n, start, count, (addr, length, flags))


#: A descriptor as numpy lays it out: exactly spec.DESC_STRUCT's ``<QIHH``.
_DESC_DTYPE: Final = np.dtype([("addr", "<u8"), ("len", "<u4"), ("flags", "<u2"), ("next", "<u2")])


def _chain_run(
    mem: _ReusedMemory, table: int, n: int, start: int, count: int, desc: tuple[int, int, int]
) -> None:
    """Entries ``start .. start + count - 1`` (mod ``n``) of the table at ``table`` become one
    chain: each ``desc`` with NEXT to the following entry, the last without NEXT.

    Built as one array and written as at most two runs (the part up to the table's end, the
    part that wrapped to its start), not entry by entry: at N = 32768 this op was most of the
    target's time. RAM holds the table (the queue checked it), so nothing is dropped.
    """
    addr, length, flags = desc
    index = (start + np.arange(count, dtype=np.int64)) % n
    entries = np.empty(count, dtype=_DESC_DTYPE)
    entries["addr"] = addr
    entries["len"] = length
    entries["flags"] = flags | spec.VIRTQ_DESC_F_NEXT
    entries["flags"][-1] = flags
    entries["next"] = (index + 1) % n
    first = min(count, n - start)
    raw = entries.tobytes()
    mem.poke(table + spec.DESC_SIZE * start, raw[: spec.DESC_SIZE * first])
    mem.poke(table, raw[spec.DESC_SIZE * first :])


_U16: Final = struct.Struct("<H")


def _u16(value: int) -> bytes:
    return _U16.pack(value & 0xFFFF)


# ============================================================================================
# vring_image
# ============================================================================================

#: The most image bytes one input may carry: big enough for a 32768-entry ring.
IMAGE_MAX: Final = 1 << 20
#: Where byte 0 of the image sits (``--base``): 0, a page, 1 MiB, near the top of 2**64.
IMAGE_BASES: Final = (0, 0x1000, 0x100000, (1 << 64) - (2 << 20))
_IMAGE_HEADER: Final = struct.Struct("<HIIIHBB")
#: Header: queue size, desc, avail, used, last_avail, decode mode, base selector.
IMAGE_HEADER_SIZE: Final = _IMAGE_HEADER.size
_VIRTIO_ERRORS: Final = frozenset(
    name
    for name, value in vars(errors).items()
    if isinstance(value, type) and issubclass(value, VirtioError) and value is not VirtioError
)


def vring_image(data: bytes) -> None:
    """A ``vring parse`` run: queue parameters in a header, then the raw image."""
    head = data[:IMAGE_HEADER_SIZE].ljust(IMAGE_HEADER_SIZE, b"\0")
    size, desc, avail, used, last, mode, base_sel = _IMAGE_HEADER.unpack(head)
    image = data[IMAGE_HEADER_SIZE : IMAGE_HEADER_SIZE + IMAGE_MAX]
    if not image:
        return
    decodes = list(Decode)
    decode = decodes[mode % len(decodes)]
    base = IMAGE_BASES[base_sel % len(IMAGE_BASES)]
    if mode & 0x80:  # addresses relative to the base, as a user passes --base
        desc, avail, used = base + desc, base + avail, base + used
    params = RingParams(size, desc, avail, used, last)
    with GuestMemory.from_image(image, base) as mem:
        out = parse_ring(mem, params, decode)
        text, broken = render_ring_json(mem, params, decode)
        _check(bytes(mem.read(base, len(image))) == image, "vring parse wrote the image")
    error = out["error"]
    _check(broken == (error is not None), "render_ring_json and parse_ring disagree on error")
    if isinstance(error, dict):
        _check(error["type"] in _VIRTIO_ERRORS, f"unknown error type {error['type']!r}")
    _check(
        json.loads(text) == json.loads(json.dumps(out)),
        "render_ring_json's JSON differs from parse_ring's dict",
    )


# ============================================================================================
# balloon_requests
# ============================================================================================

#: RAM for the device targets, in pages: two regions with a hole (PFNs 24..31) between.
_BALLOON_RAM: Final = ((0, 24 * PAGE_SIZE), (32 * PAGE_SIZE, 16 * PAGE_SIZE))
_BALLOON_QUEUE_SIZES: Final = (1, 2, 4, 8, 16)
_PROFILE_NAMES: Final = tuple(sorted(PROFILES))
#: Rings and driver buffers live in the first pages, data pages after them.
_RING_PAGES: Final = 6
_PAGE_REASONS: Final = (OUT_OF_RAM, DUPLICATE, NOT_IN_BALLOON)
_ALL_REASONS: Final = frozenset({*_PAGE_REASONS, "bad-length", "unaligned"})


class _DiscardSpy(_ReusedMemory):
    """Guest memory recording every discard, and refusing any that leaves guest RAM."""

    def __init__(self, layout: Sequence[tuple[int, int]], backing: Backing = Backing.BYTES) -> None:
        super().__init__(layout, backing)
        self.discarded: list[tuple[int, int]] = []
        #: RAM in whole pages, as bytes and as PFNs: fixed with the layout, so made once.
        self.ram_bytes = [(first << PAGE_SHIFT, n << PAGE_SHIFT) for first, n in self.page_ranges()]
        self.ram_pfns = frozenset(
            p for first, n in self.page_ranges() for p in range(first, first + n)
        )

    def discard(self, addr: int, length: int) -> DiscardResult:
        _check(
            length > 0
            and addr % PAGE_SIZE == 0
            and length % PAGE_SIZE == 0
            and any(lo <= addr and addr + length <= lo + n for lo, n in self.ram_bytes),
            f"discard {addr:#x}+{length:#x} is not whole pages of guest RAM",
        )
        self.discarded.append((addr >> PAGE_SHIFT, length >> PAGE_SHIFT))
        return super().discard(addr, length)

    def reset(self) -> None:
        super().reset()
        self.discarded = []


def _expected_pages(
    mem: _ReusedMemory,
    buffers: Sequence[tuple[int, int]],
    sg: bool,
    ram: frozenset[int],
    held: set[int],
    inflate: bool | None,
) -> tuple[set[int], dict[str, int]]:
    """The reference for one request: pages accepted and pages rejected per reason, page by
    page in request order (the first occurrence counts; 5.5.6, Firecracker's rules)."""
    pages: list[int] = []
    for addr, length in buffers:
        if sg:
            if addr % PAGE_SIZE == 0 and length % PAGE_SIZE == 0:
                pages.extend(range(addr >> PAGE_SHIFT, (addr + length) >> PAGE_SHIFT))
        elif length // 4 <= spec.PFNS_PER_BUFFER_MAX:
            raw = mem.peek(addr, length // 4 * 4)
            pages.extend(int(v) for v in np.frombuffer(raw, dtype="<u4"))
    accepted: set[int] = set()
    seen: set[int] = set()
    rejected = dict.fromkeys(_PAGE_REASONS, 0)
    for pfn in pages:
        if pfn not in ram:
            rejected[OUT_OF_RAM] += 1
        elif pfn in seen or (inflate is True and pfn in held):
            rejected[DUPLICATE] += 1
        elif inflate is False and pfn not in held:
            rejected[NOT_IN_BALLOON] += 1
        else:
            accepted.add(pfn)
        seen.add(pfn)
    return accepted, rejected


def _result_pages(result: RequestResult) -> tuple[set[int], dict[str, int]]:
    accepted = {int(p) for p in expand_ranges(result.ranges)}
    _check(len(accepted) == result.pages, "the device's ranges overlap")
    rejected = dict.fromkeys(_PAGE_REASONS, 0)
    for rej in result.rejections:
        _check(rej.reason in _ALL_REASONS, f"unknown rejection reason {rej.reason!r}")
        if rej.reason in rejected:
            rejected[rej.reason] += rej.pages
    return accepted, rejected


def balloon_requests(data: bytes) -> None:
    """Hostile inflate/deflate/stats/reporting requests against the balloon device."""
    r = ByteReader(data)
    profile = PROFILES[r.pick(_PROFILE_NAMES)]
    mask = r.u16()
    wanted = [f.name for i, f in enumerate(profile.bits) if mask >> i & 1]
    qsize = r.pick(_BALLOON_QUEUE_SIZES)
    strategy = DiscardStrategy.PER_PAGE if r.flag() else DiscardStrategy.PER_RANGE
    mem = _memory(_DiscardSpy, _BALLOON_RAM, Backing.MEMFD)
    device = BalloonDevice(mem, profile=profile, discard=strategy)
    device.set_features(negotiate(device.offered, profile.encode(wanted)))
    drivers: dict[BalloonQueue, MockDriverQueue] = {}
    base = 0
    for index, role in enumerate(device.queue_roles):
        layout = RingLayout.packed(qsize, base)
        base = layout.end
        drivers[role] = MockDriverQueue(mem, layout, event_idx=device.has("ring-event-idx"))
        device.attach_queue(index, layout.size, layout.desc, layout.avail, layout.used)
    device.driver_ok()
    heap_start = (base + 15) & ~15
    _check(heap_start < _RING_PAGES * PAGE_SIZE, "rings do not fit their pages")
    try:
        _balloon_ops(r, mem, device, drivers, heap_start)
    except VirtioError:
        _check(device.broken is not None, "a VirtioError left the device unbroken")


def _balloon_ops(
    r: ByteReader,
    mem: _DiscardSpy,
    device: BalloonDevice,
    drivers: Mapping[BalloonQueue, MockDriverQueue],
    heap_start: int,
) -> None:
    ram = mem.ram_pfns
    held: set[int] = set()
    sg = device.has("sg")
    roles = [q for q in (BalloonQueue.INFLATE, BalloonQueue.DEFLATE, BalloonQueue.REPORTING)]
    roles = [q for q in roles if q in drivers]
    for _ in range(32):
        if r.remaining == 0:
            return
        heap = BumpAllocator(heap_start, _RING_PAGES * PAGE_SIZE)
        op = r.u8()
        if op & 0x3F == 7 and BalloonQueue.STATS in drivers:
            _stats_op(r, mem, device, drivers[BalloonQueue.STATS], heap)
            continue
        role = roles[(op & 0x3F) % len(roles)]
        drv = drivers[role]
        drv.reclaim()
        buffers = _request_buffers(r, mem, heap, sg or role is BalloonQueue.REPORTING)
        if not buffers or len(buffers) > drv.free_descriptors:
            continue
        writable = role is BalloonQueue.REPORTING
        if op & 0x40:  # the wrong direction on one buffer
            writable = not writable
        bufs = [(a, n, writable) for a, n in buffers]
        if op & 0x80 and device.has("ring-indirect-desc") and drv.free_descriptors:
            drv.add_indirect_chain(bufs, heap.alloc(spec.DESC_SIZE * len(bufs)))
        else:
            drv.add_chain(bufs)
        inflate = {BalloonQueue.INFLATE: True, BalloonQueue.DEFLATE: False}.get(role)
        expect, expect_rej = _expected_pages(
            mem, buffers, sg or role is BalloonQueue.REPORTING, ram, held, inflate
        )
        mem.discarded = []
        results, _ = device.process(role)
        _check(len(results) == 1, f"one chain made {len(results)} results")
        got, got_rej = _result_pages(results[0])
        _check(got == expect, f"{role.name}: device took {sorted(got)}, expected {sorted(expect)}")
        _check(got_rej == expect_rej, f"{role.name}: rejected {got_rej}, expected {expect_rej}")
        discarded = {p for first, n in mem.discarded for p in range(first, first + n)}
        if role is BalloonQueue.INFLATE:
            _check(discarded == got, "inflate discarded other pages than it accepted")
            held |= got
        elif role is BalloonQueue.DEFLATE:
            _check(not discarded, "deflate discarded pages")
            held -= got
        else:
            _check(discarded <= got, "reporting discarded pages it did not accept")
        c = device.counters
        _check(device.balloon_pages == len(held), "balloon_pages != the reference's")
        _check(int(device.balloon.sum()) == len(held), "balloon bitmap != the reference's")
        _check(c.pages_inflated - c.pages_deflated == len(held), "inflated - deflated != held")
        _check(set(c.rejected) <= _ALL_REASONS, f"unknown reasons {set(c.rejected)}")


def _request_buffers(
    r: ByteReader, mem: _ReusedMemory, heap: BumpAllocator, sg: bool
) -> list[tuple[int, int]]:
    """Buffers of one inflate/deflate/reporting request, in the device's form."""
    out: list[tuple[int, int]] = []
    ram_pages = mem.end >> PAGE_SHIFT
    for _ in range(1 + r.below(4)):
        if sg:
            first = r.below(ram_pages + 4)
            count = 1 + r.below(6)
            skew = r.pick((0, 0, 0, 1, 0x800))
            out.append(((first << PAGE_SHIFT) + skew, (count << PAGE_SHIFT) - (skew and r.u8())))
            continue
        count = r.pick((1, 2, 3, 8, 64, 256, 257))
        pfns = [_fuzz_pfn(r, ram_pages) for _ in range(min(count, 16))]
        pfns = (pfns * (count // max(1, len(pfns)) + 1))[:count]
        raw = np.asarray(pfns, dtype="<u4").tobytes() + bytes(r.pick((0, 0, 0, 1, 3)))
        try:
            addr = heap.alloc(len(raw), 4)
        except MemoryError:
            break
        mem.poke(addr, raw)  # the heap is in RAM (the first pages)
        out.append((addr, len(raw)))
    return out


def _fuzz_pfn(r: ByteReader, ram_pages: int) -> int:
    """A PFN: mostly near RAM (the hole and the end included), sometimes any le32."""
    mode = r.u8() % 4
    if mode == 0:
        return r.u32()
    return r.below(ram_pages + 8)


def _stats_op(
    r: ByteReader,
    mem: _ReusedMemory,
    device: BalloonDevice,
    drv: MockDriverQueue,
    heap: BumpAllocator,
) -> None:
    """A stats buffer (5.5.6.3): the device keeps the last value of each tag."""
    drv.reclaim()
    if drv.free_descriptors == 0:
        if r.flag():
            device.request_stats()
        return
    entries = [(r.below(20), r.u64()) for _ in range(r.below(24))]
    raw = b"".join(spec.STAT_STRUCT.pack(t, v) for t, v in entries) + r.take(r.below(10))
    if not raw:
        raw = b"\0"
    raw = raw[:STATS_BYTES_MAX]
    try:
        addr = heap.alloc(len(raw), 8)
    except MemoryError:
        return
    mem.poke(addr, raw)  # the heap is in RAM (the first pages)
    drv.add_chain([(addr, len(raw), False)])
    device.process(BalloonQueue.STATS)
    assert device.stats is not None
    whole = len(raw) // spec.STAT_SIZE
    expect = {t: v for t, v in entries[:whole]}
    _check(device.stats.values == expect, f"stats {device.stats.values} != {expect}")


# ============================================================================================
# driver_device_roundtrip
# ============================================================================================

_ROUNDTRIP_MEMORY: Final = 4 << 20
_ROUNDTRIP_PAGES: Final = _ROUNDTRIP_MEMORY >> PAGE_SHIFT
#: One region and no hole: the testbed's guest RAM (``GuestMemory.simple``), made once.
_ROUNDTRIP_LAYOUT: Final = ((0, _ROUNDTRIP_MEMORY),)


def driver_device_roundtrip(data: bytes) -> None:
    """Host and guest actions through the driver model and the device: a differential."""
    r = ByteReader(data)
    cfg = TestbedConfig(
        memory=_ROUNDTRIP_MEMORY,
        profile=r.pick(("seed-sg", "virtio-1.2")),
        used=1 << 20,
        fragment_pages=r.pick((0, 1, 3, 40)),
        queue_size=r.pick((2, 4, 8, 16, 64, 128)),
        indirect_entries=r.pick((0, 2, 4, 8, 16)),
        sg_indirect=r.flag(),
        deferred=r.flag(),
        seed=r.u8(),
        discard=DiscardStrategy.PER_PAGE if r.flag() else DiscardStrategy.PER_RANGE,
    )
    # The process's one guest RAM, all zero again: a fresh 4 MiB bytearray per input was
    # the largest single cost of this target's set-up. The testbed does not close it.
    with Testbed(cfg, _memory(_ReusedMemory, _ROUNDTRIP_LAYOUT)) as bed:
        seen: list[tuple[BalloonQueue, list[int]]] = []
        real_process = bed.device.process

        def process(
            role: BalloonQueue, limit: int | None = None
        ) -> tuple[list[RequestResult], bool]:
            results, notify = real_process(role, limit)
            for res in results:
                _check(not res.rejections, f"device rejected {res.rejections}")
                seen.append((role, expand_ranges(res.ranges).tolist()))
            return results, notify

        bed.device.process = process  # type: ignore[method-assign]
        bed.driver.record = []
        for _ in range(24):
            if r.remaining == 0:
                break
            _roundtrip_step(r, bed)
            bed.check()
            _check(bed.device.broken is None, f"device broke: {bed.device.broken}")
        meant = _flatten(bed.driver.record)
        told = _flatten([(role, pages) for role, pages in seen])
        _check(meant == told, "the device read other pages than the driver meant")


def _flatten(
    requests: Sequence[tuple[BalloonQueue, Sequence[int] | np.ndarray]],
) -> dict[BalloonQueue, list[int]]:
    """Pages per queue in the order sent: each request's pages sorted (the device reports a
    chain's pages as sorted ranges; a request's chains are in page order)."""
    out: dict[BalloonQueue, list[int]] = {}
    for role, sent in requests:
        pages = expand_ranges(sent).tolist() if isinstance(sent, np.ndarray) else sent
        out.setdefault(role, []).extend(sorted(pages))
    return out


def _roundtrip_step(r: ByteReader, bed: Testbed) -> None:
    op = r.u8() % 6
    if op in (0, 1):
        bed.set_target(r.below(_ROUNDTRIP_PAGES + 1))
    elif op == 2:
        bed.guest_use(1 + r.below(_ROUNDTRIP_PAGES // 2))
    elif op == 3:
        bed.guest_free(1 + r.below(_ROUNDTRIP_PAGES // 2))
    elif op == 4:
        pages = bed.allocator.pages_in(PageState.BALLOON)
        if pages.size and bed.allocator.count(PageState.FREE):
            bed.driver.migrate(int(pages[r.below(pages.size)]))
    else:
        bed.request_stats()


# ============================================================================================
# qmp_replies, libvirt_stats, config
# ============================================================================================


def _json(data: bytes) -> tuple[bool, object]:
    """Bytes as JSON; (False, None) for what is not JSON (not interesting: QEMU sends JSON,
    and qemu.qmp rejects the rest before balloonctl sees it)."""
    try:
        return True, json.loads(data)
    except (ValueError, RecursionError):
        return False, None


def _check_stats(stats: object) -> None:
    _check(isinstance(stats, GuestStats), "not GuestStats")
    assert isinstance(stats, GuestStats)
    for value in (stats.last_update, *stats.stats.values()):
        _check(type(value) is int and value >= 0, f"stats hold {value!r}, not a non-negative int")


def qmp_replies(data: bytes) -> None:
    """Any JSON through QMP's reply decoders: only BalloonError may come out."""
    ok, reply = _json(data)
    if not ok:
        return
    candidates = [reply]
    if isinstance(reply, dict):
        candidates.extend(v for k, v in reply.items() if k in ("return", "status", "stats"))
    decoders: list[Callable[[object], object]] = [
        qmpvocab.decode_guest_stats,
        qmpvocab.names_extended_stats,
        qmpvocab.profile_hint,
        qmpvocab.device_status_names,
        qmpvocab.locate_balloon,
        qmpvocab.decode_virtio_status,
        lambda o: qmpvocab.decode_virtio_status(o, "/x", profile_name="seed-sg"),
        lambda o: parse_queue_status(o, 0),
        lambda o: parse_queue_status(o, 2),
    ]
    for obj in candidates:
        for decode in decoders:
            try:
                out = decode(obj)
            except BalloonError:
                continue
            if decode is qmpvocab.decode_guest_stats:
                _check_stats(out)
            elif decode is qmpvocab.names_extended_stats:
                _check(isinstance(out, bool), f"names_extended_stats: {out!r}")


def libvirt_stats(data: bytes) -> None:
    """memoryStats-like JSON and domain XML through the libvirt backend's pure helpers."""
    if data[:1] == b"<" or data[:1] == b"\x00":
        text = data.lstrip(b"\x00").decode("utf-8", "replace")
        for helper in (libvirt_backend.balloon_model, libvirt_backend.stats_period_of):
            try:
                out = helper(text)
            except BalloonError:
                continue
            _check(out is None or isinstance(out, (str, int)), f"{helper.__name__}: {out!r}")
            if isinstance(out, int):
                _check(out >= 0, f"stats period {out}")
        return
    ok, raw = _json(data)
    if not ok or not isinstance(raw, dict):
        return
    try:
        stats = libvirt_backend.normalize_stats(raw)
    except BalloonError:
        return
    _check_stats(stats)


_CONFIG_FD: list[int] = []


def config(data: bytes) -> None:
    """Any bytes as a configuration file: only ConfigError may come out.

    The file is a memfd, reached as ``/proc/self/fd/N``: load() opens and reads a real path,
    but nothing touches the disk and nothing is left behind when libFuzzer ends the process
    (a temporary directory was, once per run, since libFuzzer's exit runs no cleanup)."""
    if not _CONFIG_FD:
        _CONFIG_FD.append(os.memfd_create("balloonctl-fuzz-config"))
    fd = _CONFIG_FD[0]
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    path = f"/proc/self/fd/{fd}"
    try:
        cfg = load_config(path)
    except ConfigError:
        return
    for vm in cfg.vms:
        _check(isinstance(vm.name, str) and vm.name != "", f"vm name {vm.name!r}")
        _check(isinstance(vm.qmp, str) and vm.qmp != "", f"vm qmp {vm.qmp!r}")
        _check(type(vm.min) is int and vm.min >= 0, f"vm min {vm.min!r}")
        _check(type(vm.shares) is int and vm.shares > 0, f"vm shares {vm.shares!r}")


#: Every harness by target name: the contract ``fuzz_*.py``, ``fuzz/replay.py``, the tests
#: and ``python -m fuzz`` rely on.
TARGETS: Final[Mapping[str, Callable[[bytes], None]]] = {
    "vring_ops": vring_ops,
    "vring_image": vring_image,
    "balloon_requests": balloon_requests,
    "driver_device_roundtrip": driver_device_roundtrip,
    "qmp_replies": qmp_replies,
    "libvirt_stats": libvirt_stats,
    "config": config,
}
