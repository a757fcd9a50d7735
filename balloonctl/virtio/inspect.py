"""Offline inspection of a split virtqueue in a raw guest-memory image (``vring parse``).

The device's own code does the work: :class:`SplitQueue` pops every available chain in
read-only mode, and the balloon's decoders say which pages each one names. Inspection
stops at the first ring-level error, as a device marks itself broken, and reports it
with the chain's head; the chains before it are kept.

The work and the output are bounded for the largest legal input, a 64 MiB image with a
32768-entry queue (docs/vring-parse.md, "Bounds"). Chains are popped and decoded in
batches of up to :data:`BATCH_CHAINS`: the PFN arrays of a whole batch are classified by
one set of numpy calls (:func:`~balloonctl.virtio.pages.classify_batch`), and each batch
is rendered to JSON and written out before the next is read, so memory holds one batch,
not the 80 MB of text a legal ring can produce. Rejected page runs are listed up to
:data:`LISTED_RUNS_MAX` per parse; past it they are summed per chain and reason, with
exact counts.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final

import numpy as np

from balloonctl.errors import VirtioError
from balloonctl.virtio.memory import GuestMemory
from balloonctl.virtio.pages import (
    PfnArray,
    RamMap,
    RangeArray,
    Rejection,
    classify_batch,
    limit_listed,
)
from balloonctl.virtio.queue import Chain, SplitQueue
from balloonctl.virtio.requests import (
    RequestForm,
    decode_stats,
    gather,
    gather_report,
    pfn_buffers,
)

#: Rejected page runs listed in one parse, all chains together; past it, each chain's runs
#: are summed per reason (a ``rejected`` entry with ``count`` and no ``first_pfn``). 32768
#: chains of 256 scattered bad pages would otherwise list 8 M runs, 600 MB of JSON.
LISTED_RUNS_MAX: Final = 65536
#: Chains decoded and written together, and the PFNs or descriptors that close a batch
#: early: enough for numpy to pay, few enough that a batch's arrays and text stay in tens
#: of MB (chains with indirect tables can hold 4 M descriptors in 64 MiB).
BATCH_CHAINS: Final = 1024
BATCH_PFNS: Final = 1 << 18
BATCH_DESCRIPTORS: Final = 1 << 16


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


#: Stands for a chain's pages until they are rendered (a NUL never occurs otherwise).
_PAGES = "\x00pages\x00"


@dataclass(frozen=True)
class _Done:
    """A batch of chains as printed, their pages still one array: ``rows[i]`` ranges of
    ``ranges`` are chain ``i``'s, in order."""

    chains: list[dict[str, object]]
    ranges: RangeArray
    rows: PfnArray

    def pages(self) -> Iterator[RangeArray]:
        """Each chain's ranges, in order."""
        ends = np.cumsum(self.rows).tolist()
        return (self.ranges[b - n : b] for b, n in zip(ends, self.rows.tolist(), strict=True))


@dataclass
class _Batch:
    """Chains popped and not yet written; for PFN decoding, their arrays not yet decoded."""

    chains: list[dict[str, object]] = field(default_factory=list)
    pages: list[RangeArray] = field(default_factory=list)
    rejected: list[list[Rejection]] = field(default_factory=list)
    raw: list[bytes] = field(default_factory=list)
    sources: list[int] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    owners: list[int] = field(default_factory=list)
    pfns: int = 0
    descriptors: int = 0


_NO_PAGES: RangeArray = np.empty((0, 2), dtype=np.int64)


class _Parse:
    """One ``vring parse`` run: batches of chains as they are popped, then ``error``."""

    def __init__(self, mem: GuestMemory, params: RingParams, decode: Decode) -> None:
        self.mem = mem
        self.params = params
        self.decode = decode
        self.ram = RamMap(mem.page_ranges())
        self.budget = LISTED_RUNS_MAX
        self.error: dict[str, object] | None = None

    def batches(self) -> Iterator[_Done]:
        """The chains in order, a batch at a time; ``error`` is set once they end."""
        batch = _Batch()
        try:
            queue = SplitQueue(
                self.mem,
                self.params.queue_size,
                self.params.desc,
                self.params.avail,
                self.params.used,
                last_avail_idx=self.params.last_avail,
                read_only=True,
            )
            while (chain := queue.pop()) is not None:
                self._add(batch, chain)
                if (
                    len(batch.chains) >= BATCH_CHAINS
                    or batch.pfns >= BATCH_PFNS
                    or batch.descriptors >= BATCH_DESCRIPTORS
                ):
                    yield self._finish(batch)
                    batch = _Batch()
        except VirtioError as exc:
            self.error = {"type": type(exc).__name__, "message": str(exc), "head": exc.head}
        # The chains before an error are kept.
        yield self._finish(batch)

    def _add(self, batch: _Batch, chain: Chain) -> None:
        """Decode what can be decoded alone (raising VirtioError on a wrong direction)."""
        out: dict[str, object] = {
            "head": chain.head,
            "descriptors": [
                {"index": d.index, "addr": d.addr, "len": d.len, "flags": d.flags, "next": d.next}
                for d in chain
            ],
        }
        pages = _NO_PAGES
        rejected: tuple[Rejection, ...] = ()
        decode = self.decode
        if decode is Decode.PFN:
            got = pfn_buffers(self.mem, chain, queue="inflate/deflate")
            owner = len(batch.chains)
            batch.raw.extend(got.raw)
            batch.sources.extend(got.sources)
            batch.counts.extend(got.counts)
            batch.owners.extend([owner] * len(got.raw))
            batch.pfns += sum(got.counts)
            rejected = tuple(got.rejections)  # the page rejections follow, once decoded
        elif decode is Decode.STATS:
            stats = decode_stats(self.mem, chain)
            out["stats"] = stats.by_name()
            rejected = stats.rejections
        elif decode is not Decode.NONE:
            if decode is Decode.REPORT:
                gathered = gather_report(chain)
            else:
                gathered = gather(self.mem, chain, RequestForm.SG, queue="inflate/deflate")
            done = gathered.classify(self.ram)
            pages = done.ranges
            rejected, listed = limit_listed(done.rejections, self.budget)
            self.budget -= listed
        out["pages"] = _PAGES
        batch.descriptors += len(chain)
        batch.chains.append(out)
        batch.pages.append(pages)
        batch.rejected.append(list(rejected))

    def _finish(self, batch: _Batch) -> _Done:
        """Classify the batch's PFN arrays together, then each chain as it is printed."""
        ranges: RangeArray | None = None
        if batch.raw:
            pfns: PfnArray = np.frombuffer(b"".join(batch.raw), dtype="<u4").astype(np.int64)
            batch.raw.clear()  # 32 MB of arrays for one chain of 8 M PFNs
            source = np.repeat(np.asarray(batch.sources, dtype=np.int32), batch.counts)
            owner = np.repeat(np.asarray(batch.owners, dtype=np.int32), batch.counts)
            done = classify_batch(pfns, source, owner, len(batch.chains), self.ram, self.budget)
            self.budget -= done.listed
            ranges, rows = done.all_ranges, done.rows
            for mine, more in zip(batch.rejected, done.rejections, strict=True):
                mine.extend(more)
        else:
            rows = np.asarray([len(p) for p in batch.pages], dtype=np.int64)
        if ranges is None:
            ranges = np.concatenate([_NO_PAGES, *batch.pages]) if batch.pages else _NO_PAGES
        for out, rejected in zip(batch.chains, batch.rejected, strict=True):
            out["rejected"] = [r.to_json() for r in rejected]
        return _Done(batch.chains, ranges, rows)


def parse_ring(mem: GuestMemory, params: RingParams, decode: Decode) -> dict[str, object]:
    """Every available chain from ``last_avail`` to avail.idx, and the first error if any."""
    run = _Parse(mem, params, decode)
    chains: list[dict[str, object]] = []
    for batch in run.batches():
        for out, pages in zip(batch.chains, batch.pages(), strict=True):
            out["pages"] = pages.tolist()
            chains.append(out)
    return {"chains": chains, "error": run.error}


def write_ring_json(
    mem: GuestMemory, params: RingParams, decode: Decode, write: Callable[[str], object]
) -> bool:
    """:func:`parse_ring` as compact JSON text, handed to ``write`` a batch at a time, and
    whether the parse stopped at a ring-level error.

    A legal 64 MiB ring can name 8 million page ranges (32768 chains of 256 scattered
    pages); as Python lists and through the json module that is most of 10 s. Here the
    ranges go from numpy to ASCII digits in one vectorised pass per batch, and are spliced
    into the JSON of everything else; the text of one batch is written before the next is
    parsed, so memory never holds the whole output.
    """
    run = _Parse(mem, params, decode)
    write('{"chains":[')
    sep = ""
    for batch in run.batches():
        if batch.chains:
            write(sep + _batch_json(batch))
            sep = ","
    write('],"error":' + json.dumps(run.error, separators=(",", ":")) + "}")
    return run.error is not None


def render_ring_json(mem: GuestMemory, params: RingParams, decode: Decode) -> tuple[str, bool]:
    """:func:`write_ring_json` into one string (``vring dump``, the fuzz harness)."""
    parts: list[str] = []
    finding = write_ring_json(mem, params, decode, parts.append)
    return "".join(parts), finding


def _batch_json(batch: _Done) -> str:
    """The chains of a batch as the comma-separated JSON objects of the ``chains`` list."""
    skeleton = json.dumps(batch.chains, separators=(",", ":"))[1:-1]
    parts = skeleton.split(json.dumps(_PAGES))
    texts = _ranges_text(batch.ranges, batch.rows)
    pieces = [parts[0]]
    for text, part in zip(texts, parts[1:], strict=True):
        pieces.append(text)
        pieces.append(part)
    return "".join(pieces)


def _ranges_json(arrays: list[RangeArray]) -> list[str]:
    """Each (k, 2) array as the JSON text ``[[a,b],...]``, all in one numpy pass.

    Every row is laid out at a fixed width, ``[`` ``a`` ``,`` ``b`` ``]`` ``,``, with the
    digits written four places at a time over whole columns; a mask then drops the leading
    zeros, and the trailing comma of a chain's last row becomes its closing bracket.
    """
    if not arrays:
        return []
    rows = np.asarray([len(a) for a in arrays], dtype=np.int64)
    return _ranges_text(np.concatenate([a.reshape(-1, 2) for a in arrays]), rows)


def _ranges_text(values: RangeArray, rows: PfnArray) -> list[str]:
    """:func:`_ranges_json` of ``values`` cut into arrays of ``rows`` rows each."""
    if not rows.any():
        return ["[]"] * rows.size
    values = values.astype(np.int64, copy=False)
    # Each column as wide as its largest value: counts are mostly a digit or two.
    wa, wb = (len(str(int(np.max(values[:, col])))) for col in (0, 1))
    mat = np.empty((values.shape[0], wa + wb + 4), dtype=np.uint8)
    keep = np.ones(mat.shape, dtype=bool)
    mat[:, 0] = ord("[")
    mat[:, wa + 1] = ord(",")
    mat[:, wa + wb + 2] = ord("]")
    mat[:, wa + wb + 3] = ord(",")
    for col, at, width in ((0, 1, wa), (1, wa + 2, wb)):
        v = values[:, col]
        # Four digits at a time from a table: a quarter of the (slow) integer divisions.
        rest, end = v, at + width
        while end > at:
            n = min(4, end - at)
            mat[:, end - n : end] = _DIGITS[rest % 10000, 4 - n :]
            end -= n
            if end > at:
                rest = rest // 10000
        # A leading zero is dropped: the column of 10**k is kept where the value reaches it.
        for place in range(width - 1):
            keep[:, at + place] = v >= 10 ** (width - 1 - place)
    ends = np.cumsum(rows)
    mat[ends[rows > 0] - 1, wa + wb + 3] = ord("]")
    row_len = np.count_nonzero(keep, axis=1)
    text = mat[keep].tobytes().decode("ascii")
    bounds = np.concatenate(([0], np.cumsum(row_len)))[np.concatenate(([0], ends))].tolist()
    return ["[" + text[lo:hi] if hi > lo else "[]" for lo, hi in itertools.pairwise(bounds)]


#: The four ASCII digits of 0000 to 9999, a row each.
_DIGITS: Final = np.frombuffer(
    "".join(f"{i:04d}" for i in range(10000)).encode("ascii"), dtype=np.uint8
).reshape(10000, 4)
