"""``balloonctl vring dump``: a live VM's balloon queue, parsed by the device-side parser.

``vring parse`` reads a ring image the user saved; this reads the rings of a running VM
through any :class:`~balloonctl.backends.base.Backend` (QMP ``pmemsave`` or libvirt's
``virDomainMemoryPeek``; nothing here knows which) and hands them to the very same parser
(:func:`balloonctl.virtio.inspect.render_ring_json`), so a real driver's rings meet the
code that checks hostile ones.

What is shown: the chains the guest has made available and the device has not returned,
i.e. avail ring entries from the device's ``used-idx`` to avail.idx. The first
``last-avail-idx - used-idx`` of them are in flight (popped, not yet returned: QEMU keeps the
stats buffer so until its next poll). That window assumes the device returns chains in the
order it popped them, which QEMU's balloon does on every queue.

The guest owns the rings, so every read is bounded whatever it wrote:

* The parser sees a :class:`FetchedMemory` that has the guest's RAM *bounds* (the VM's
  boot RAM, :meth:`Backend.guest_ram`, and the PC machines' RAM split) but holds only the bytes
  fetched so far. The parser checks each ring and buffer against the bounds before it
  reads, so a descriptor naming MMIO or an address past RAM ends as its typed error
  (``BufferOutOfBounds``, ``RingOutOfBounds``) and is never fetched: reading device memory
  through ``pmemsave`` can have side effects (a virtio ISR register clears on read).
* Bytes are fetched when the parser first reads them, whole 4 KiB pages at a time, and a
  ring (16*N, 6+2*N, 6+8*N bytes) whole on its first touch, which is after the parser
  validated its size and bounds. SG chunks and free page reports are never read: the chunk
  *is* the descriptor's buffer, its address and length say everything.
* All fetches together stop at ``read_limit`` (default 64 MiB, ``vring parse``'s image
  limit); past it the dump fails (exit 1) instead of reading on.

The parser is synchronous and the backends are asyncio, so the parse runs in a worker
thread and each fetch is handed back to the event loop (``run_coroutine_threadsafe``): one
pass, exactly the bytes the parser asks for, and no second parser to keep in step.
"""

from __future__ import annotations

import asyncio
import bisect
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final

from balloonctl.backends.base import MAX_READ, Backend, FeatureState
from balloonctl.errors import (
    CommandFailed,
    GuestMemoryError,
    PeerError,
    ReadLimitError,
)
from balloonctl.units import PAGE_SIZE, format_size
from balloonctl.virtio import spec
from balloonctl.virtio.inspect import Decode, RingParams, render_ring_json
from balloonctl.virtio.memory import GuestMemory, Region

#: The queues a user can name, in the device's creation order.
QUEUES: Final = ("inflate", "deflate", "stats", "reporting")
#: Default bound on all guest memory read by one dump: ``vring parse``'s image limit.
READ_LIMIT: Final = 64 << 20
#: One fetch (a QMP round trip and a file, or a libvirt peek) may take this long.
FETCH_TIMEOUT_S: Final = 60.0

_4G: Final = 1 << 32
#: The legacy VGA window and BIOS area. QEMU's PC machines map VGA/SMRAM (MMIO) and the
#: PAM-controlled BIOS shadow over the low RAM alias here (hw/i386/pc.c, hw/pci-host/q35.c),
#: and e820 reserves it, so no driver ever hands it to a device: it is not RAM to a dump.
_LEGACY_HOLE: Final = (0xA0000, 0x100000)
#: Where PC machines put the RAM that does not fit below 4 GiB (x86 ``above_4g_mem_start``).
_ABOVE_4G_BASE: Final = _4G


# --------------------------------------------------------------------------------------------
# Guest RAM as the device sees it
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RamLayout:
    """Guest RAM as ``(base, size)`` ranges, and how they were learnt (for the report)."""

    ranges: tuple[tuple[int, int], ...]
    source: str


def q35_split(ram: int, max_ram_below_4g: int = 0) -> tuple[int, int]:
    """``(below_4g, above_4g)`` bytes of RAM on QEMU's q35 machine.

    hw/i386/pc_q35.c, ``pc_q35_init`` (QEMU 7.2): RAM of 0xb0000000 (2.75 GiB) or more is
    split at 2 GiB, smaller RAM fits below 0xb0000000; then lowmem = min(that,
    ``max-ram-below-4g``, whose 0 means 4 GiB). The rest starts at 4 GiB.
    """
    lowmem = 0x80000000 if ram >= 0xB0000000 else 0xB0000000
    lowmem = min(lowmem, max_ram_below_4g or _4G)
    return (lowmem, ram - lowmem) if ram >= lowmem else (ram, 0)


def i440fx_split(ram: int, max_ram_below_4g: int = 0) -> tuple[int, int]:
    """``(below_4g, above_4g)`` on QEMU's pc (i440fx) machine (hw/i386/pc_piix.c, 7.2):
    lowmem = ``max-ram-below-4g`` (default 0xe0000000); a RAM that does not fit below it is
    split at 3 GiB (``gigabyte_align``, every machine type since 2.1)."""
    lowmem = max_ram_below_4g or 0xE0000000
    if ram >= lowmem > 0xC0000000:
        lowmem = 0xC0000000
    return (lowmem, ram - lowmem) if ram >= lowmem else (ram, 0)


def pc_ranges(below: int, above: int) -> tuple[tuple[int, int], ...]:
    """PC RAM: below 4 GiB from 0 without the legacy hole, then ``above`` at 4 GiB."""
    ranges: list[tuple[int, int]] = []
    lo, hi = _LEGACY_HOLE
    if below <= lo:
        ranges.append((0, below))
    else:
        ranges.append((0, lo))
        if below > hi:
            ranges.append((hi, below - hi))
    if above:
        ranges.append((_ABOVE_4G_BASE, above))
    return tuple((base, size) for base, size in ranges if size > 0)


async def ram_layout(backend: Backend) -> RamLayout:
    """Where the guest's RAM is: the bounds every ring and buffer is checked against.

    The size is the VM's boot RAM (:meth:`Backend.guest_ram`). On QEMU's PC machines the
    host bridge says how it was split around the 32-bit PCI hole; where it does not, the
    split is computed as pc_q35.c/pc_piix.c do. Anything else (the simulated VM) is taken as
    one range from 0. Hot-plugged DIMMs (``plugged-memory``) are not included: a buffer
    there shows as out of bounds.
    """
    ram = await backend.guest_ram()
    if ram.machine is None:
        return RamLayout(((0, ram.size),), "flat")
    if ram.host_split is not None:
        return RamLayout(pc_ranges(*ram.host_split), f"{ram.machine} ({ram.host_bridge})")
    split = q35_split if ram.chipset == "q35" else i440fx_split
    below, above = split(ram.size, ram.max_ram_below_4g)
    return RamLayout(pc_ranges(below, above), f"{ram.machine} (computed)")


# --------------------------------------------------------------------------------------------
# Guest memory fetched on demand
# --------------------------------------------------------------------------------------------


class FetchedMemory(GuestMemory):
    """Guest memory with the VM's RAM bounds whose bytes are fetched when first read.

    ``fetch(gpa, size)`` returns guest bytes (``size`` <= MAX_READ, never outside RAM);
    fetched pieces become bytes-backed regions, so the parser's reads (and its descriptor
    table's in-place view) work as on any :class:`GuestMemory`. ``whole`` lists ranges
    fetched in one go on first touch (the rings). Nothing outside RAM is ever fetched: the
    bounds are checked first and a miss is :class:`GuestMemoryError`, a bug, since the
    parser checks bounds before it reads.
    """

    def __init__(
        self,
        ram: Sequence[tuple[int, int]],
        fetch: Callable[[int, int], bytes],
        *,
        limit: int = READ_LIMIT,
        whole: Sequence[tuple[int, int]] = (),
    ) -> None:
        spans: list[tuple[int, int]] = []
        for base, size in sorted(ram):
            # Whole pages only: every fetch is page-granular and must stay inside RAM.
            start = -(-base // PAGE_SIZE) * PAGE_SIZE
            end = (base + size) // PAGE_SIZE * PAGE_SIZE
            if end <= start:
                continue
            if spans and start < spans[-1][1]:
                raise GuestMemoryError(f"RAM ranges overlap at {start:#x}")
            if spans and start == spans[-1][1]:
                spans[-1] = (spans[-1][0], end)
            else:
                spans.append((start, end))
        if not spans:
            raise GuestMemoryError("the VM's RAM holds no whole page")
        self._ram = spans
        self._ram_starts = [s for s, _ in spans]
        self._fetch = fetch
        self.limit = limit
        self.fetched = 0
        self.reads = 0
        self._whole = [(a, a + n) for a, n in whole if n > 0]
        # GuestMemory's own state: the fetched pieces, sorted and disjoint.
        self.regions: list[Region] = []
        self._bases: list[int] = []

    # --- bounds: the VM's RAM -----------------------------------------------------------
    def _span_at(self, addr: int) -> tuple[int, int] | None:
        i = bisect.bisect_right(self._ram_starts, addr) - 1
        if i >= 0 and addr < self._ram[i][1]:
            return self._ram[i]
        return None

    def contains(self, addr: int, length: int) -> bool:
        """Whether ``[addr, addr + length)`` is RAM throughout (the VM's, not the fetched)."""
        if addr < 0 or length < 0 or addr + length > 1 << 64:
            return False
        span = self._span_at(addr)
        if span is None:
            return length == 0 and self._span_at(addr - 1) is not None
        return addr + length <= span[1]

    @property
    def size(self) -> int:
        """Bytes of guest RAM."""
        return sum(end - start for start, end in self._ram)

    @property
    def end(self) -> int:
        """First guest-physical address above all RAM."""
        return self._ram[-1][1]

    def page_ranges(self) -> list[tuple[int, int]]:
        """RAM as ``(first_pfn, page_count)``: what a PFN or a report is checked against."""
        return [(s // PAGE_SIZE, (e - s) // PAGE_SIZE) for s, e in self._ram]

    # --- bytes: fetched on first use ----------------------------------------------------
    def pieces(self, addr: int, length: int) -> Iterator[tuple[Region, int, int]]:
        """As :meth:`GuestMemory.pieces`, after fetching whatever of the range is missing."""
        if not self.contains(addr, length):
            raise GuestMemoryError(f"{addr:#x}+{length:#x} is not inside guest memory")
        self._ensure(addr, length)
        return super().pieces(addr, length)

    def is_fetched(self, addr: int, length: int) -> bool:
        """Whether every byte of the range is held already (no fetch needed)."""
        return not self._missing(addr, addr + length)

    def _ensure(self, addr: int, length: int) -> None:
        if length <= 0:
            return
        lo = addr // PAGE_SIZE * PAGE_SIZE
        hi = -(-(addr + length) // PAGE_SIZE) * PAGE_SIZE
        for start, end in self._whole:
            if start < addr + length and addr < end:
                lo, hi = min(lo, start // PAGE_SIZE * PAGE_SIZE), max(hi, end)
        hi = -(-hi // PAGE_SIZE) * PAGE_SIZE
        for span_lo, span_hi in self._ram:
            a, b = max(lo, span_lo), min(hi, span_hi)
            if a < b:
                for gap_lo, gap_hi in self._missing(a, b):
                    self._fetch_range(gap_lo, gap_hi)

    def _missing(self, lo: int, hi: int) -> list[tuple[int, int]]:
        gaps: list[tuple[int, int]] = []
        i = max(0, bisect.bisect_right(self._bases, lo) - 1)
        pos = lo
        while pos < hi and i < len(self.regions):
            region = self.regions[i]
            if region.end <= pos:
                i += 1
                continue
            if region.base > pos:
                gaps.append((pos, min(region.base, hi)))
            pos = max(pos, region.end)
            i += 1
        if pos < hi:
            gaps.append((pos, hi))
        return gaps

    def _fetch_range(self, lo: int, hi: int) -> None:
        for gpa in range(lo, hi, MAX_READ):
            size = min(MAX_READ, hi - gpa)
            if self.fetched + size > self.limit:
                raise ReadLimitError(
                    f"the chains name more than {format_size(self.limit)} of guest memory to "
                    f"read (at {gpa:#x}); stopped there (raise it with --read-limit)"
                )
            data = self._fetch(gpa, size)
            if len(data) != size:
                raise PeerError(f"asked for {size} bytes at {gpa:#x}, got {len(data)}")
            self.fetched += size
            self.reads += 1
            region = Region.from_bytes(gpa, data)
            i = bisect.bisect_left(self._bases, gpa)
            self.regions.insert(i, region)
            self._bases.insert(i, gpa)

    def close(self) -> None:
        """Drop what was fetched."""
        for region in self.regions:
            region.close()
        self.regions, self._bases = [], []


# --------------------------------------------------------------------------------------------
# Which queue, where
# --------------------------------------------------------------------------------------------


def queue_index(state: FeatureState, queue: str) -> int:
    """The device's index of ``queue``, and a refusal if the driver does not use it.

    QEMU creates the queues at realize (hw/virtio/virtio-balloon.c,
    ``virtio_balloon_device_realize``): inflate 0, deflate 1, stats 2 (always: QEMU always
    offers STATS_VQ), then the free page hint queue if FREE_PAGE_HINT is offered, then the
    reporting queue if REPORTING is offered. The spec (5.5.2 Virtqueues) numbers them the
    same way, each optional one present only if its feature is negotiated; the two agree
    when the driver acks what is offered, as Linux does. A queue whose feature the driver
    did not ack was never set up, so there is nothing to dump.
    """
    if queue not in QUEUES:
        raise CommandFailed(f"no balloon queue called {queue!r} (known: {', '.join(QUEUES)})")
    if not state.driver_ok:
        raise CommandFailed(
            "the guest's balloon driver is not running (no DRIVER_OK): its queues are not set up"
        )
    if queue == "inflate":
        return spec.BalloonQueue.INFLATE.value
    if queue == "deflate":
        return spec.BalloonQueue.DEFLATE.value
    feature = "stats-vq" if queue == "stats" else "page-reporting"
    if feature not in state.acked:
        raise CommandFailed(
            f"the guest's driver did not ack {feature}: the {queue} queue is not in use"
        )
    if queue == "stats":
        return 2
    return 3 + ("free-page-hint" in state.offered)


def decode_for(state: FeatureState, queue: str) -> Decode:
    """How the queue's buffers read: inflate/deflate as SG chunks only where the seed
    profile's ``sg`` is acked (bit 3 is free-page-hint everywhere else, docs/protocol.md)."""
    if queue == "stats":
        return Decode.STATS
    if queue == "reporting":
        return Decode.REPORT
    if state.profile == "seed-sg" and "sg" in state.acked:
        return Decode.SG
    return Decode.PFN


# --------------------------------------------------------------------------------------------
# The dump
# --------------------------------------------------------------------------------------------


async def dump(backend: Backend, queue: str, *, read_limit: int = READ_LIMIT) -> tuple[str, bool]:
    """One queue of a live VM as ``vring parse`` JSON (extended), and whether the parse
    stopped at a ring-level error. The backend must be entered (``async with``)."""
    state = await backend.features()
    index = queue_index(state, queue)
    if not state.device_path:
        raise PeerError("the backend did not say where the balloon's virtio device is")
    # num-vqs came with the features (one x-query-virtio-status, not two).
    if not state.queues:
        raise PeerError("x-query-virtio-status did not say how many queues the balloon has")
    if index >= state.queues:
        raise CommandFailed(
            f"the {queue} queue would be number {index}, but the device has {state.queues} queues"
        )
    status = await backend.virtio_queue_status(state.device_path, index)
    if status.desc == status.avail == status.used == 0:
        raise CommandFailed(f"the {queue} queue is not set up by the guest (all addresses 0)")
    layout = await ram_layout(backend)
    decode = decode_for(state, queue)

    loop = asyncio.get_running_loop()

    async def read(gpa: int, size: int) -> bytes:
        async with asyncio.timeout(FETCH_TIMEOUT_S):
            return await backend.read_guest_memory(gpa, size)

    def fetch(gpa: int, size: int) -> bytes:
        # Called from the parser's thread: the read itself runs on the event loop.
        return asyncio.run_coroutine_threadsafe(read(gpa, size), loop).result()

    n = status.size
    # Ring extents as the spec sizes them (2.7): only meaningful once the parser has
    # validated N and the addresses, which it does before its first read.
    whole = (
        [
            (status.desc, spec.desc_table_size(n)),
            (status.avail, spec.avail_ring_size(n)),
            (status.used, spec.used_ring_size(n)),
        ]
        if 0 < n <= spec.MAX_QUEUE_SIZE
        else []
    )
    mem = FetchedMemory(layout.ranges, fetch, limit=read_limit, whole=whole)
    # The device's own state says where the window starts: the oldest chain not returned.
    params = RingParams(n, status.desc, status.avail, status.used, last_avail=status.used_idx)
    try:
        text, finding = await asyncio.to_thread(render_ring_json, mem, params, decode)
        avail_idx = (
            mem.read_u16(status.avail + spec.AVAIL_IDX_OFF)
            if mem.contains(status.avail + spec.AVAIL_IDX_OFF, 2)
            and mem.is_fetched(status.avail + spec.AVAIL_IDX_OFF, 2)
            else None
        )
    finally:
        mem.close()
    head = {
        "vm": backend.name,
        "queue": {
            "name": queue,
            "index": index,
            "size": n,
            "desc": status.desc,
            "avail": status.avail,
            "used": status.used,
            "used_idx": status.used_idx,
            "last_avail_idx": status.last_avail_idx,
            "avail_idx": avail_idx,
            "in_flight": status.in_flight,
            "decode": decode.value,
        },
        "ram": [[base, size] for base, size in layout.ranges],
        "read_bytes": mem.fetched,
    }
    # Splice: render_ring_json's text is one object; the fields above go before its own.
    prefix = json.dumps(head, separators=(",", ":"))
    return prefix[:-1] + "," + text[1:], finding
