"""Offline inspection of a split virtqueue in a raw guest-memory image (``vring parse``).

The device's own code does the work: :class:`SplitQueue` pops every available chain in
read-only mode, and the balloon's decoders say which pages each one names. Inspection
stops at the first ring-level error, as a device marks itself broken, and reports it
with the chain's head; the chains before it are kept.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import numpy.typing as npt

from balloonctl.errors import VirtioError
from balloonctl.virtio.memory import GuestMemory
from balloonctl.virtio.pages import PfnArray, RamMap, RangeArray, Rejection
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


def _chain(
    mem: GuestMemory, ram: RamMap, chain: Chain, decode: Decode
) -> tuple[dict[str, object], RangeArray]:
    """One chain as ``vring parse`` prints it, its pages kept as an array (raises
    VirtioError on a wrong direction)."""
    out: dict[str, object] = {
        "head": chain.head,
        "descriptors": [
            {"index": d.index, "addr": d.addr, "len": d.len, "flags": d.flags, "next": d.next}
            for d in chain
        ],
    }
    pages: RangeArray = np.empty((0, 2), dtype=np.int64)
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
        pages = done.ranges
        rejected = done.rejections
    out["pages"] = _PAGES
    out["rejected"] = [r.to_json() for r in rejected]
    return out, pages


#: Stands for a chain's pages until they are rendered (a NUL never occurs otherwise).
_PAGES = "\x00pages\x00"


def _parse(
    mem: GuestMemory, params: RingParams, decode: Decode
) -> tuple[list[tuple[dict[str, object], RangeArray]], dict[str, object] | None]:
    chains: list[tuple[dict[str, object], RangeArray]] = []
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
            chains.append(_chain(mem, ram, chain, decode))
    except VirtioError as exc:
        error = {"type": type(exc).__name__, "message": str(exc), "head": exc.head}
    return chains, error


def parse_ring(mem: GuestMemory, params: RingParams, decode: Decode) -> dict[str, object]:
    """Every available chain from ``last_avail`` to avail.idx, and the first error if any."""
    chains, error = _parse(mem, params, decode)
    for out, pages in chains:
        out["pages"] = pages.tolist()
    return {"chains": [out for out, _ in chains], "error": error}


def render_ring_json(mem: GuestMemory, params: RingParams, decode: Decode) -> tuple[str, bool]:
    """:func:`parse_ring` as compact JSON text, fast where the output is huge, and whether
    it stopped at a ring-level error.

    A legal 64 MiB ring can name 8 million page ranges (32768 chains of 256 scattered
    pages); as Python lists and through the json module that is most of 10 s. Here the
    ranges go from numpy to ASCII digits in one vectorised pass, and are spliced into the
    JSON of everything else.
    """
    chains, error = _parse(mem, params, decode)
    skeleton = json.dumps(
        {"chains": [out for out, _ in chains], "error": error}, separators=(",", ":")
    )
    parts = skeleton.split(json.dumps(_PAGES))
    texts = _ranges_json([pages for _, pages in chains])
    pieces = [parts[0]]
    for text, part in zip(texts, parts[1:], strict=True):
        pieces.append(text)
        pieces.append(part)
    return "".join(pieces), error is not None


def _ranges_json(arrays: list[RangeArray]) -> list[str]:
    """Each (k, 2) array as the JSON text ``[[a,b],...]``, all in one numpy pass."""
    if not arrays:
        return []
    rows = np.asarray([len(a) for a in arrays], dtype=np.int64)
    values = np.concatenate([a.reshape(-1) for a in arrays]).astype(np.int64)
    powers = 10 ** np.arange(1, 19, dtype=np.int64)
    digits = np.searchsorted(powers, values, side="right") + 1
    row_len = digits[0::2] + digits[1::2] + 4  # "[a,b]" and a "," or "]" after it
    chain_len = np.where(rows > 0, 1, 2) + np.add.reduceat(
        np.concatenate((row_len, [0])), np.concatenate(([0], np.cumsum(rows)[:-1]))
    ) * (rows > 0)
    chain_start = np.concatenate(([0], np.cumsum(chain_len)[:-1]))
    buf = np.full(int(chain_len.sum()), ord(","), dtype=np.uint8)
    buf[chain_start] = ord("[")
    empty = rows == 0
    buf[chain_start[empty] + 1] = ord("]")
    row_chain = np.repeat(np.arange(rows.size), rows)
    before = np.concatenate(([0], np.cumsum(row_len)[:-1]))
    first_row = np.concatenate(([0], np.cumsum(rows)[:-1]))
    row_start = chain_start[row_chain] + 1 + before - before[first_row[row_chain]]
    a_digits, b_digits = digits[0::2], digits[1::2]
    buf[row_start] = ord("[")
    _write_digits(buf, values[0::2], a_digits, row_start + 1)
    _write_digits(buf, values[1::2], b_digits, row_start + 2 + a_digits)
    closing = row_start + 2 + a_digits + b_digits
    buf[closing] = ord("]")
    last = first_row + rows - 1
    buf[closing[last[~empty]] + 1] = ord("]")
    text = buf.tobytes().decode("ascii")
    ends = chain_start + chain_len
    return [text[s:e] for s, e in zip(chain_start.tolist(), ends.tolist(), strict=True)]


def _write_digits(
    buf: npt.NDArray[np.uint8], values: PfnArray, digits: PfnArray, at: PfnArray
) -> None:
    """Decimal digits of ``values`` into ``buf`` from positions ``at``, place by place."""
    v, n, pos = values.copy(), digits, at + digits - 1
    while v.size:
        buf[pos] = 48 + v % 10
        v //= 10
        n = n - 1
        keep = n > 0
        v, n, pos = v[keep], n[keep], pos[keep] - 1
