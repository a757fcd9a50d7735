"""Offline inspection of a split virtqueue in a raw guest-memory image (``vring parse``).

The device's own code does the work: :class:`SplitQueue` pops every available chain in
read-only mode, and the balloon's decoders say which pages each one names. Inspection
stops at the first ring-level error, as a device marks itself broken, and reports it
with the chain's head; the chains before it are kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from balloonctl.errors import VirtioError
from balloonctl.virtio.memory import GuestMemory
from balloonctl.virtio.pages import RamMap, Rejection
from balloonctl.virtio.queue import Chain, SplitQueue
from balloonctl.virtio.requests import RequestForm, decode_stats, gather, gather_report


class Decode(StrEnum):
    """How ``vring parse`` reads the buffers of each chain."""

    PFN = "pfn"  # inflate/deflate, legacy le32 PFN arrays
    SG = "sg"  # inflate/deflate, the seed's SG chunks
    STATS = "stats"  # the stats queue's tag/value entries
    REPORT = "report"  # free page reporting: device-writable chunks
    NONE = "none"  # descriptors only


@dataclass(frozen=True)
class RingParams:
    """Where the queue is: sizes and guest-physical addresses, as given by the user."""

    queue_size: int
    desc: int
    avail: int
    used: int
    last_avail: int = 0


def chain_json(mem: GuestMemory, ram: RamMap, chain: Chain, decode: Decode) -> dict[str, object]:
    """One chain as ``vring parse`` prints it (raises VirtioError on a wrong direction)."""
    out: dict[str, object] = {
        "head": chain.head,
        "descriptors": [
            {"index": d.index, "addr": d.addr, "len": d.len, "flags": d.flags, "next": d.next}
            for d in chain
        ],
    }
    pages: list[list[int]] = []
    rejected: tuple[Rejection, ...] = ()
    if decode is Decode.STATS:
        stats = decode_stats(mem, chain)
        out["stats"] = stats.by_name()
        rejected = stats.rejections
    elif decode is not Decode.NONE:
        if decode is Decode.REPORT:
            got = gather_report(chain)
        else:
            got = gather(mem, chain, RequestForm(decode.value), queue="inflate/deflate")
        done = got.classify(ram)
        pages = done.ranges.tolist()
        rejected = done.rejections
    out["pages"] = pages
    out["rejected"] = [r.to_json() for r in rejected]
    return out


def parse_ring(mem: GuestMemory, params: RingParams, decode: Decode) -> dict[str, object]:
    """Every available chain from ``last_avail`` to avail.idx, and the first error if any."""
    chains: list[dict[str, object]] = []
    error: dict[str, object] | None = None
    ram = RamMap(mem.page_ranges())
    try:
        queue = SplitQueue(
            mem,
            params.queue_size,
            params.desc,
            params.avail,
            params.used,
            last_avail_idx=params.last_avail,
            read_only=True,
        )
        while (chain := queue.pop()) is not None:
            chains.append(chain_json(mem, ram, chain, decode))
    except VirtioError as exc:
        error = {"type": type(exc).__name__, "message": str(exc), "head": exc.head}
    return {"chains": chains, "error": error}
