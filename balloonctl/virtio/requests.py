"""Decoding what a guest puts on the balloon's queues, without any device state.

Shared by the device (which then applies requests to its balloon) and by ``vring parse``
(which only shows them). Ring-level rules were checked when the chain was popped; here come
the balloon's own: buffer direction (a ring-level error, since the queue cannot be served),
then per-page problems, which are skipped and counted, never fatal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final

import numpy as np
import numpy.typing as npt

from balloonctl.errors import WrongDirection
from balloonctl.units import PAGE_SHIFT, PAGE_SIZE
from balloonctl.virtio import spec
from balloonctl.virtio.memory import GuestMemory
from balloonctl.virtio.pages import (
    BAD_LENGTH,
    UNALIGNED,
    Classified,
    PfnArray,
    RamMap,
    RangeArray,
    Rejection,
    classify,
    classify_runs,
)
from balloonctl.virtio.queue import Chain

#: The most stats bytes read from one buffer. Linux sends 16 entries (160 bytes); anything
#: past 64 KiB is a guest trying to make the device read, and is skipped as bad-length.
STATS_BYTES_MAX: Final = 64 * 1024


class RequestForm(StrEnum):
    """How an inflate/deflate buffer names its pages."""

    #: Legacy: each buffer an array of le32 PFNs (5.5.6).
    PFN = "pfn"
    #: The seed's VIRTIO_BALLOON_F_SG: each descriptor *is* a 4 KiB-aligned chunk of pages.
    SG = "sg"


@dataclass
class Gathered:
    """One request's pages in request order, before classification.

    PFN arrays give pages (``runs`` None); SG chunks give runs, one per descriptor, which
    are only expanded to pages if the fast path of :func:`classify_runs` cannot take them.
    """

    pfns: PfnArray
    #: The descriptor index that carried each page (each run, for ``runs``).
    source: PfnArray
    rejections: list[Rejection] = field(default_factory=list)
    #: Bytes of PFN arrays read (0 for SG): what the seed's SG path saves.
    pfn_bytes: int = 0
    runs: RangeArray | None = None

    def classify(
        self, ram: RamMap, balloon: npt.NDArray[np.bool_] | None = None, *, inflate: bool = True
    ) -> Classified:
        """Accepted ranges and every rejection (this buffer's and the pages')."""
        if self.runs is not None:
            done = classify_runs(self.runs, self.source, ram, balloon, inflate=inflate)
        else:
            done = classify(self.pfns, self.source, ram, balloon, inflate=inflate)
        return Classified(done.ranges, (*self.rejections, *done.rejections))


def require_direction(chain: Chain, *, writable: bool, queue: str) -> None:
    """Raise :class:`WrongDirection` unless every buffer of ``chain`` goes the right way."""
    for desc in chain:
        if desc.is_write != writable:
            want = "device-writable" if writable else "device-readable"
            raise WrongDirection(
                f"{queue} buffer (descriptor {desc.index} of chain {chain.head}) is not {want}",
                head=chain.head,
                index=desc.index,
                indirect=desc.in_indirect,
            )


def gather(mem: GuestMemory, chain: Chain, form: RequestForm, *, queue: str) -> Gathered:
    """The pages an inflate or deflate chain names, with per-buffer rejections.

    5.5.6: the driver gives the device inflateq/deflateq buffers to read (Linux's
    ``virtqueue_add_outbuf``), so a device-writable one is :class:`WrongDirection`.
    """
    require_direction(chain, writable=False, queue=queue)
    if form is RequestForm.SG:
        return _gather_sg(chain)
    return _gather_pfn(mem, chain)


@dataclass
class PfnBuffers:
    """An inflate/deflate chain's PFN arrays as raw bytes, not yet decoded.

    :func:`gather` decodes them at once; ``vring parse`` collects those of thousands of
    chains and decodes them together (:func:`balloonctl.virtio.pages.classify_batch`).
    """

    raw: list[bytes] = field(default_factory=list)
    #: The descriptor that carried each array, and its PFN count.
    sources: list[int] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    pfn_bytes: int = 0


def pfn_buffers(mem: GuestMemory, chain: Chain, *, queue: str) -> PfnBuffers:
    """The PFN arrays of an inflate or deflate chain (5.5.6), after the direction rule and
    the per-buffer ones (:func:`gather`'s, for the legacy form)."""
    require_direction(chain, writable=False, queue=queue)
    return _pfn_arrays(mem, chain)


def _pfn_arrays(mem: GuestMemory, chain: Chain) -> PfnBuffers:
    out = PfnBuffers()
    rejections = out.rejections
    for desc in chain:
        whole, rest = divmod(desc.len, 4)
        if whole > spec.PFNS_PER_BUFFER_MAX:
            # Linux never puts more than VIRTIO_BALLOON_ARRAY_PFNS_MAX (256) PFNs in a buffer
            # and Firecracker skips larger ones ("bogus page count"). Bounding it bounds the
            # work one chain can cause to 256 pages a descriptor.
            rejections.append(
                Rejection(
                    BAD_LENGTH,
                    desc.index,
                    detail=f"{whole} PFNs in one buffer, more than {spec.PFNS_PER_BUFFER_MAX}",
                )
            )
            continue
        if rest:
            # A length not a multiple of 4: the whole PFNs before the tail still count.
            rejections.append(
                Rejection(
                    BAD_LENGTH,
                    desc.index,
                    detail=f"{rest} trailing bytes after {whole} PFNs",
                )
            )
        if whole == 0:
            continue
        out.raw.append(mem.read(desc.addr, whole * 4))
        out.pfn_bytes += whole * 4
        out.sources.append(desc.index)
        out.counts.append(whole)
    return out


def _gather_pfn(mem: GuestMemory, chain: Chain) -> Gathered:
    got = _pfn_arrays(mem, chain)  # gather() checked the direction
    if not got.raw:
        empty = np.empty(0, dtype=np.int64)
        return Gathered(empty, empty.copy(), got.rejections, got.pfn_bytes)
    pfns = np.frombuffer(b"".join(got.raw), dtype="<u4").astype(np.int64)
    source = np.repeat(np.asarray(got.sources, dtype=np.int64), got.counts)
    return Gathered(pfns, source, got.rejections, got.pfn_bytes)


def _gather_sg(chain: Chain) -> Gathered:
    runs: list[tuple[int, int]] = []
    sources: list[int] = []
    rejections: list[Rejection] = []
    for desc in chain:
        # The seed: "An sg describes a chunk of guest physically continuous pages"; the
        # device works in 4 KiB pages (5.5.6), so a chunk must start and end on one.
        if desc.addr % PAGE_SIZE or desc.len % PAGE_SIZE:
            rejections.append(
                Rejection(
                    UNALIGNED,
                    desc.index,
                    detail=f"chunk {desc.addr:#x}+{desc.len:#x} is not 4 KiB-aligned",
                )
            )
            continue
        runs.append((desc.addr >> PAGE_SHIFT, desc.len >> PAGE_SHIFT))
        sources.append(desc.index)
    ranges: RangeArray = np.asarray(runs, dtype=np.int64).reshape(-1, 2)
    empty = np.empty(0, dtype=np.int64)
    return Gathered(empty, np.asarray(sources, dtype=np.int64), rejections, runs=ranges)


def gather_report(chain: Chain) -> Gathered:
    """Free page reporting (5.5.6.7): device-writable chunks of free pages to discard.

    Linux adds them with ``virtqueue_add_inbuf``; the device writes nothing, it discards.
    """
    require_direction(chain, writable=True, queue="reporting")
    return _gather_sg(chain)


@dataclass(frozen=True)
class StatsBuffer:
    """One stats buffer: values by tag (unknown tags kept by number), and what was skipped."""

    values: dict[int, int]
    rejections: tuple[Rejection, ...]

    def by_name(self) -> dict[str, int]:
        """Values under QEMU's names (``free-memory``); an unknown tag as ``tag-N``."""
        return {spec.STAT_NAMES.get(tag, f"tag-{tag}"): value for tag, value in self.values.items()}


def decode_stats(mem: GuestMemory, chain: Chain) -> StatsBuffer:
    """5.5.6.3: a device-readable buffer of packed ``{le16 tag; le64 val}`` entries.

    A tag given twice keeps its last value, as QEMU's ``balloon_stats_poll_cb`` does. The
    device "MUST ignore" tags it does not know (5.5.6.3): they are kept by number for display
    only, and nothing acts on them.
    """
    require_direction(chain, writable=False, queue="stats")
    rejections: list[Rejection] = []
    parts: list[bytes] = []
    budget = STATS_BYTES_MAX
    for desc in chain:
        take = min(desc.len, budget)
        if take < desc.len:
            rejections.append(
                Rejection(BAD_LENGTH, desc.index, detail=f"stats past {STATS_BYTES_MAX} bytes")
            )
        if take:
            parts.append(mem.read(desc.addr, take))
            budget -= take
    data = b"".join(parts)
    whole, rest = divmod(len(data), spec.STAT_SIZE)
    if rest:
        last = chain.descriptors[-1].index
        rejections.append(
            Rejection(BAD_LENGTH, last, detail=f"{rest} trailing bytes after {whole} entries")
        )
    entries = np.frombuffer(data, dtype=[("tag", "<u2"), ("val", "<u8")], count=whole)
    values = dict(zip(entries["tag"].tolist(), entries["val"].tolist(), strict=True))
    return StatsBuffer(values=values, rejections=tuple(rejections))


def rejection_pages(rejections: Sequence[Rejection]) -> dict[str, int]:
    """Rejections summed by reason: pages where they name pages, else occurrences."""
    totals: dict[str, int] = {}
    for r in rejections:
        totals[r.reason] = totals.get(r.reason, 0) + (r.pages or 1)
    return totals
