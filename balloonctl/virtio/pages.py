"""Guest page numbers in bulk: which are RAM, merging into ranges, classifying requests.

An inflate of 7 GiB names 1.8 million pages. A Python loop over them costs seconds, so pages
travel as numpy arrays of PFNs (int64) and every step here is a handful of array operations.
Ranges follow Firecracker's ``compact_page_frame_numbers``: sort, drop duplicates, merge
neighbours into ``(first_pfn, count)``.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

PfnArray = npt.NDArray[np.int64]
#: shape (k, 2) int64: rows of (first_pfn, count), sorted, non-overlapping, non-adjacent.
RangeArray = npt.NDArray[np.int64]
#: Descriptor indices and request numbers of a batch's pages (both below 2**16).
IndexArray = npt.NDArray[np.int32]

#: Reasons a page of a request is skipped; the device counts them and goes on.
OUT_OF_RAM: Final = "out-of-ram"
DUPLICATE: Final = "duplicate"
NOT_IN_BALLOON: Final = "not-in-balloon"
BAD_LENGTH: Final = "bad-length"
UNALIGNED: Final = "unaligned"
#: Codes for the per-page reason array (0 = accepted), in the order reasons are decided.
_CODES: Final = (None, OUT_OF_RAM, DUPLICATE, NOT_IN_BALLOON)
#: Rejected runs listed one by one per request; the rest are summed per reason. A hostile
#: chain can name millions of scattered bad pages, and listing each would cost more than
#: the whole protocol (and print hundreds of MB from ``vring parse``).
MAX_LISTED_RUNS: Final = 256


def merge_ranges(pfns: PfnArray, steps: PfnArray | None = None) -> RangeArray:
    """Sorted, unique PFNs -> ``(first_pfn, count)`` rows of maximal consecutive runs.

    ``steps`` is ``np.diff(pfns)`` if the caller has it already.
    """
    if pfns.size == 0:
        return np.empty((0, 2), dtype=np.int64)
    if steps is None:
        steps = np.diff(pfns)
    bounds = np.empty(pfns.size + 1, dtype=np.int64)
    inner = np.flatnonzero(steps != 1) + 1
    bounds[0] = 0
    bounds[1 : inner.size + 1] = inner
    bounds[inner.size + 1] = pfns.size
    bounds = bounds[: inner.size + 2]
    out = np.empty((inner.size + 1, 2), dtype=np.int64)
    out[:, 0] = pfns[bounds[:-1]]
    out[:, 1] = np.diff(bounds)
    return out


def compact(pfns: PfnArray) -> RangeArray:
    """Any PFNs -> merged ranges of the distinct ones (Firecracker's compaction)."""
    return merge_ranges(np.unique(pfns))


def expand_ranges(ranges: RangeArray) -> PfnArray:
    """``(first_pfn, count)`` rows -> every PFN, in row order."""
    if len(ranges) == 0:
        return np.empty(0, dtype=np.int64)
    counts = ranges[:, 1]
    total = int(counts.sum())
    # Each run is first + 0..count-1: an arange with a per-run offset added.
    offsets = np.repeat(ranges[:, 0] - (np.cumsum(counts) - counts), counts)
    pfns: PfnArray = np.arange(total, dtype=np.int64) + offsets
    return pfns


class RamMap:
    """Which PFNs are guest RAM, and a dense index for each RAM page.

    The dense index (0 .. total_pages-1) lets the device keep one small bitmap for RAM that
    may sit at any guest-physical address (below and above a 4 GiB hole, or a ring image at a
    high ``--base``) without an array as large as the address space.
    """

    def __init__(self, page_ranges: Sequence[tuple[int, int]]) -> None:
        merged: list[list[int]] = []
        for first, count in sorted(page_ranges):
            if count <= 0:
                continue
            if merged and first <= merged[-1][0] + merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], first + count - merged[-1][0])
            else:
                merged.append([first, count])
        self.starts = np.array([m[0] for m in merged], dtype=np.int64)
        self.counts = np.array([m[1] for m in merged], dtype=np.int64)
        self.offsets = np.concatenate(([0], np.cumsum(self.counts)[:-1])).astype(np.int64)
        self.total_pages = int(self.counts.sum())

    def contains(self, pfns: PfnArray) -> npt.NDArray[np.bool_]:
        """Which PFNs are RAM: :meth:`locate` without the dense index (an array less)."""
        if self.starts.size == 1:
            start, count = int(self.starts[0]), int(self.counts[0])
            inside = pfns >= start
            inside &= pfns < start + count
            return inside
        return self.locate(pfns)[0]

    def locate(self, pfns: PfnArray) -> tuple[npt.NDArray[np.bool_], PfnArray]:
        """``(in_ram, dense_index)``; ``dense_index`` is meaningful only where ``in_ram``."""
        if self.starts.size == 1:
            # One RAM range (most guests below 3 GiB, every ring image): two compares.
            start, count = int(self.starts[0]), int(self.counts[0])
            return (pfns >= start) & (pfns < start + count), pfns - start
        if self.starts.size == 0:
            return np.zeros(pfns.shape, dtype=bool), np.zeros(pfns.shape, dtype=np.int64)
        k = np.searchsorted(self.starts, pfns, side="right") - 1
        kc = np.maximum(k, 0)
        delta = pfns - self.starts[kc]
        in_ram = (k >= 0) & (delta < self.counts[kc])
        return in_ram, self.offsets[kc] + delta


@dataclass(frozen=True, slots=True)
class Rejection:
    """Pages (or bytes) of a request the device skipped, and why; consecutive ones grouped."""

    reason: str
    #: The descriptor that carried them (its index in its table).
    descriptor: int
    first_pfn: int | None = None
    count: int = 0
    #: For bad-length and unaligned: the offending byte count or buffer, in words.
    detail: str = ""
    #: A summary of runs not listed (MAX_LISTED_RUNS): ``count`` pages from ``descriptor``
    #: on, no ``first_pfn``.
    summary: bool = False
    #: For a summary: how many runs it stands for (also said in ``detail``).
    runs: int = 0

    @property
    def pages(self) -> int:
        """Pages this rejection stands for (0 for a whole-buffer one: bad-length, ...)."""
        return self.count if self.first_pfn is not None or self.summary else 0

    def to_json(self) -> dict[str, object]:
        """The ``rejected`` entry of ``vring parse`` output."""
        out: dict[str, object] = {"reason": self.reason, "descriptor": self.descriptor}
        if self.first_pfn is not None or self.summary:
            if self.first_pfn is not None:
                out["first_pfn"] = self.first_pfn
            out["count"] = self.count
        if self.detail:
            out["detail"] = self.detail
        return out


@dataclass(frozen=True)
class Classified:
    """A request's pages sorted into accepted (merged ranges) and rejected (grouped)."""

    ranges: RangeArray
    rejections: tuple[Rejection, ...]

    @property
    def pages(self) -> int:
        """Accepted pages."""
        return int(self.ranges[:, 1].sum()) if len(self.ranges) else 0


def classify(
    pfns: PfnArray,
    source: npt.NDArray[np.int64],
    ram: RamMap,
    balloon: npt.NDArray[np.bool_] | None = None,
    *,
    inflate: bool = True,
) -> Classified:
    """Sort one request's pages (in request order) into accepted and rejected.

    ``source[i]`` is the descriptor that carried ``pfns[i]``. A page is rejected if it is
    not RAM, if it appeared earlier in the request, and, given the device's ``balloon``
    bitmap (dense RAM index), if an inflate names a page already in the balloon or a deflate
    one that is not. The first occurrence of a page is the one that counts.
    """
    in_ram, dense = ram.locate(pfns)
    # Fast path, what an honest driver sends: all RAM, no page twice, consistent with the
    # balloon. A few array calls instead of the bookkeeping below.
    if in_ram.all():
        ordered = np.sort(pfns)
        steps = np.diff(ordered)
        if not (steps == 0).any() and (
            balloon is None or _consistent(balloon[dense], inflate=inflate)
        ):
            return Classified(merge_ranges(ordered, steps), ())
    code = np.zeros(pfns.size, dtype=np.int8)
    code[~in_ram] = 1
    ok = np.flatnonzero(code == 0)
    if ok.size:
        _, first = np.unique(pfns[ok], return_index=True)
        repeat = np.ones(ok.size, dtype=bool)
        repeat[first] = False
        code[ok[repeat]] = 2
    if balloon is not None:
        ok = np.flatnonzero(code == 0)
        held = balloon[dense[ok]]
        code[ok[held if inflate else ~held]] = 2 if inflate else 3
    accepted = np.sort(pfns[code == 0])
    return Classified(merge_ranges(accepted), _group(pfns, source, code))


def _consistent(held: npt.NDArray[np.bool_], *, inflate: bool) -> bool:
    """No page an inflate names is already held; every page a deflate names is."""
    return not held.any() if inflate else bool(held.all())


def classify_runs(
    runs: RangeArray,
    source: PfnArray,
    ram: RamMap,
    balloon: npt.NDArray[np.bool_] | None = None,
    *,
    inflate: bool = True,
) -> Classified:
    """:func:`classify` for requests made of runs (SG chunks), without a page-by-page pass
    when the runs are disjoint, in RAM and consistent with the balloon: the seed's point is
    that a 4 GiB chunk costs the device what a 4 KiB one does."""
    if len(runs) == 0:
        return Classified(np.empty((0, 2), dtype=np.int64), ())
    order = np.argsort(runs[:, 0], kind="stable")
    firsts, counts = runs[order, 0], runs[order, 1]
    ends = firsts + counts
    disjoint = bool((firsts[1:] >= ends[:-1]).all())
    if disjoint:
        k = np.searchsorted(ram.starts, firsts, side="right") - 1
        kc = np.maximum(k, 0)
        if ((k >= 0) & (ends <= ram.starts[kc] + ram.counts[kc])).all():
            dense = ram.offsets[kc] + (firsts - ram.starts[kc])
            if balloon is None or _runs_consistent(balloon, dense, counts, inflate=inflate):
                joined = np.flatnonzero(firsts[1:] != ends[:-1]) + 1
                bounds = np.concatenate(([0], joined))
                merged = np.empty((bounds.size, 2), dtype=np.int64)
                merged[:, 0] = firsts[bounds]
                merged[:, 1] = np.add.reduceat(counts, bounds)
                return Classified(merged, ())
    return _classify_overlapping(runs, source, ram, balloon, inflate=inflate)


def _owners(runs: RangeArray) -> list[tuple[int, int, int]]:
    """``(start, end, run_index)``: each page's first occurrence is the lowest-indexed run
    covering it. A sweep over run boundaries with a heap: O(k log k) in the number of
    runs, never in pages (a hostile chain can name a million pages many times over)."""
    events = sorted(
        [(int(f), 0, i) for i, f in enumerate(runs[:, 0].tolist())]
        + [(int(f + n), 1, i) for i, (f, n) in enumerate(runs.tolist())]
    )
    active: list[int] = []
    ended: set[int] = set()
    owned: list[tuple[int, int, int]] = []
    prev = None
    for pos, kind, i in events:
        while active and active[0] in ended:
            heapq.heappop(active)
        if prev is not None and active and pos > prev:
            owner = active[0]
            if owned and owned[-1][2] == owner and owned[-1][1] == prev:
                owned[-1] = (owned[-1][0], pos, owner)
            else:
                owned.append((prev, pos, owner))
        if kind == 0:
            heapq.heappush(active, i)
        else:
            ended.add(i)
        prev = pos
    return owned


def _classify_overlapping(
    runs: RangeArray,
    source: PfnArray,
    ram: RamMap,
    balloon: npt.NDArray[np.bool_] | None,
    *,
    inflate: bool,
) -> Classified:
    """:func:`classify` semantics for runs that may overlap or leave RAM, without expanding
    them to pages: per run, the parts it owns are accepted (or rejected as out of RAM, or
    against the balloon), the parts an earlier run owns are duplicates."""
    by_run: dict[int, list[tuple[int, int]]] = {}
    for start, end, owner in _owners(runs):
        by_run.setdefault(owner, []).append((start, end))
    accepted: list[tuple[int, int]] = []
    pieces: list[tuple[str, int, int, int]] = []  # (reason, descriptor, first, count)
    for i, (first, count) in enumerate(runs.tolist()):
        desc = int(source[i])
        cursor = first
        for start, end in [*by_run.get(i, []), (first + count, first + count)]:
            if start > cursor:  # not owned: an earlier run named these pages
                pieces.extend(_split_ram(ram, cursor, start, desc, DUPLICATE))
            for lo, hi, in_ram in _ram_parts(ram, start, end):
                if not in_ram:
                    pieces.append((OUT_OF_RAM, desc, lo, hi - lo))
                elif balloon is None:
                    accepted.append((lo, hi - lo))
                else:
                    _against_balloon(ram, balloon, lo, hi, desc, inflate, accepted, pieces)
            cursor = max(cursor, end)
    merged: list[Rejection] = []
    for reason, desc, lo, n in pieces:
        last = merged[-1] if merged else None
        if (
            last is not None
            and last.reason == reason
            and last.descriptor == desc
            and last.first_pfn is not None
            and last.first_pfn + last.count == lo
        ):
            merged[-1] = Rejection(reason, desc, last.first_pfn, last.count + n)
        else:
            merged.append(Rejection(reason, desc, lo, n))
    ranges = np.asarray(sorted(accepted), dtype=np.int64).reshape(-1, 2)
    return Classified(join_ranges(ranges), _cap(merged))


def _ram_parts(ram: RamMap, lo: int, hi: int) -> list[tuple[int, int, bool]]:
    """``[lo, hi)`` cut where RAM starts and ends: ``(lo, hi, in_ram)`` pieces in order."""
    out: list[tuple[int, int, bool]] = []
    if lo >= hi:
        return out
    for start, count in zip(ram.starts.tolist(), ram.counts.tolist(), strict=True):
        end = start + count
        if end <= lo or start >= hi:
            continue
        if start > lo:
            out.append((lo, start, False))
        out.append((max(lo, start), min(hi, end), True))
        lo = min(hi, end)
    if lo < hi:
        out.append((lo, hi, False))
    return out


def _split_ram(
    ram: RamMap, lo: int, hi: int, desc: int, reason: str
) -> list[tuple[str, int, int, int]]:
    """A repeated stretch: its RAM pages are ``reason``, the rest out of RAM (checked
    first, as :func:`classify` does)."""
    return [
        (reason if in_ram else OUT_OF_RAM, desc, a, b - a)
        for a, b, in_ram in _ram_parts(ram, lo, hi)
    ]


def _against_balloon(
    ram: RamMap,
    balloon: npt.NDArray[np.bool_],
    lo: int,
    hi: int,
    desc: int,
    inflate: bool,
    accepted: list[tuple[int, int]],
    pieces: list[tuple[str, int, int, int]],
) -> None:
    """Split an owned RAM stretch by the balloon bitmap (one numpy pass over its pages)."""
    _, dense = ram.locate(np.array([lo], dtype=np.int64))
    start = int(dense[0])
    bad = balloon[start : start + hi - lo]
    if not inflate:
        bad = ~bad
    padded = np.zeros(bad.size + 2, dtype=np.int8)
    padded[1:-1] = bad
    edges = (np.flatnonzero(np.diff(padded)) + lo).tolist()
    cursor = lo
    for a, b in zip(edges[0::2], edges[1::2], strict=True):
        if a > cursor:
            accepted.append((cursor, a - cursor))
        pieces.append((DUPLICATE if inflate else NOT_IN_BALLOON, desc, a, b - a))
        cursor = b
    if cursor < hi:
        accepted.append((cursor, hi - cursor))


def join_ranges(ranges: RangeArray) -> RangeArray:
    """Sorted disjoint ranges with touching neighbours merged."""
    if len(ranges) < 2:
        return ranges
    ends = ranges[:, 0] + ranges[:, 1]
    starts = np.concatenate(([0], np.flatnonzero(ranges[1:, 0] != ends[:-1]) + 1))
    out = np.empty((starts.size, 2), dtype=np.int64)
    out[:, 0] = ranges[starts, 0]
    out[:, 1] = np.add.reduceat(ranges[:, 1], starts)
    return out


def _runs_consistent(
    balloon: npt.NDArray[np.bool_], dense: PfnArray, counts: PfnArray, *, inflate: bool
) -> bool:
    """:func:`_consistent` over disjoint sorted runs, one reduction for all of them."""
    edges = _edges(dense, counts, balloon.size)
    held = np.add.reduceat(balloon.view(np.uint8), edges, dtype=np.int64)[::2]
    return not held.any() if inflate else bool((held == counts).all())


def _edges(dense: PfnArray, counts: PfnArray, size: int) -> PfnArray:
    """reduceat indices [s0, e0, s1, e1, ...] whose even slices are the runs; a run ending
    at ``size`` ends the array, so its end index is dropped (reduceat runs to the end)."""
    edges = np.empty(dense.size * 2, dtype=np.int64)
    edges[0::2] = dense
    edges[1::2] = dense + counts
    return edges[:-1] if edges[-1] >= size else edges


def _group(
    pfns: PfnArray, source: npt.NDArray[np.int64], code: npt.NDArray[np.int8]
) -> tuple[Rejection, ...]:
    """Rejected pages, in request order, grouped into runs of one reason and descriptor."""
    bad = np.flatnonzero(code)
    if bad.size == 0:
        return ()
    p, s, c = pfns[bad], source[bad], code[bad]
    brk = np.flatnonzero((np.diff(p) != 1) | (np.diff(s) != 0) | (np.diff(c) != 0)) + 1
    starts = np.concatenate(([0], brk))
    counts = np.diff(np.concatenate((starts, [bad.size])))
    listed = [
        Rejection(
            reason=str(_CODES[int(c[i])]), descriptor=int(s[i]), first_pfn=int(p[i]), count=int(n)
        )
        for i, n in zip(
            starts[:MAX_LISTED_RUNS].tolist(), counts[:MAX_LISTED_RUNS].tolist(), strict=True
        )
    ]
    if starts.size > MAX_LISTED_RUNS:
        rest = int(starts[MAX_LISTED_RUNS])
        for code_value in np.unique(c[rest:]).tolist():
            where = np.flatnonzero(c[rest:] == code_value)
            runs = int(np.count_nonzero(c[starts[MAX_LISTED_RUNS:]] == code_value))
            listed.append(
                _summary(str(_CODES[code_value]), int(s[rest + where[0]]), where.size, runs)
            )
    return tuple(listed)


def _summary(reason: str, descriptor: int, pages: int, runs: int) -> Rejection:
    return Rejection(
        reason,
        descriptor,
        count=pages,
        detail=f"{runs} more runs from descriptor {descriptor} on, not listed",
        summary=True,
        runs=runs,
    )


def _cap(rejections: list[Rejection]) -> tuple[Rejection, ...]:
    """At most MAX_LISTED_RUNS page runs listed; the rest summed per reason."""
    runs = [r for r in rejections if r.first_pfn is not None]
    if len(runs) <= MAX_LISTED_RUNS:
        return tuple(rejections)
    keep = set(map(id, runs[:MAX_LISTED_RUNS]))
    out = [r for r in rejections if r.first_pfn is None or id(r) in keep]
    rest: dict[str, list[Rejection]] = {}
    for r in runs[MAX_LISTED_RUNS:]:
        rest.setdefault(r.reason, []).append(r)
    for reason, group in rest.items():
        out.append(_summary(reason, group[0].descriptor, sum(r.count for r in group), len(group)))
    return tuple(out)


def limit_listed(rejections: Sequence[Rejection], limit: int) -> tuple[tuple[Rejection, ...], int]:
    """At most ``limit`` page runs of one request listed, the rest folded into one summary
    per reason (with any summary of that reason already there); and how many are listed.

    ``vring parse`` shares one listing budget among all the chains of an image
    (:data:`balloonctl.virtio.inspect.LISTED_RUNS_MAX`): per request, MAX_LISTED_RUNS still
    bounds the work, but 32768 requests of 256 scattered bad pages would list 8 M runs.
    Counts stay exact: a summary's ``count`` and ``runs`` add up what it stands for.
    """
    runs = [i for i, r in enumerate(rejections) if r.first_pfn is not None]
    if len(runs) <= limit:
        return tuple(rejections), len(runs)
    dropped = set(runs[max(limit, 0) :])
    out = [r for i, r in enumerate(rejections) if i not in dropped and not r.summary]
    folded: dict[str, list[int]] = {}  # reason -> [descriptor, pages, runs]
    for i, r in enumerate(rejections):
        if i in dropped or r.summary:
            entry = folded.setdefault(r.reason, [r.descriptor, 0, 0])
            entry[1] += r.count
            entry[2] += r.runs if r.summary else 1
    out.extend(_summary(reason, d, pages, n) for reason, (d, pages, n) in folded.items())
    return tuple(out), max(limit, 0)


@dataclass(frozen=True)
class Batch:
    """Many requests classified together (``vring parse``): per request, its accepted
    ranges and its page rejections, as :func:`classify` gives them one by one."""

    ranges: list[RangeArray]
    rejections: list[list[Rejection]]
    #: Page runs listed, out of the ``budget`` given.
    listed: int
    #: ``ranges`` as one array, request after request, and how many rows each has.
    all_ranges: RangeArray
    rows: PfnArray


def classify_batch(
    pfns: PfnArray, source: IndexArray, owner: IndexArray, requests: int, ram: RamMap, budget: int
) -> Batch:
    """:func:`classify` (no balloon bitmap) of ``requests`` requests at once, listing at
    most ``budget`` rejected runs in all (and MAX_LISTED_RUNS per request).

    ``owner[i]`` is the request ``pfns[i]`` belongs to, ascending: requests lie one after
    another, each in request order. A legal 64 MiB ring holds 32768 requests of 256 pages;
    :func:`classify` costs some 40 numpy calls each, over a second in all. Here every step
    runs once over the whole batch. The only per-request step is the sort: each request's
    pages are sorted as a row of a matrix (rows padded to a power of two, grouped by that
    width), which costs ``n log(row)`` instead of a global ``n log(n)`` sort, 30 times
    less for 8 M pages.
    """
    in_ram = ram.contains(pfns)
    code = (~in_ram).view(np.int8)
    # Only RAM pages can be accepted or repeats (out of RAM is decided first): sort those.
    ok = np.flatnonzero(in_ram)
    ok_owner = owner[ok]
    counts = np.bincount(ok_owner, minlength=requests).astype(np.int64)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.int64)
    order = ok[_row_sort(pfns[ok], starts, counts)]
    sp, so = pfns[order], owner[order]
    # The first occurrence sorts first (stable): every later equal page is a repeat.
    repeat = (sp[1:] == sp[:-1]) & (so[1:] == so[:-1])
    code[order[1:][repeat]] = 2
    first = np.ones(sp.size, dtype=bool)
    first[1:] = ~repeat
    merged, merged_owner = _merge_owned(sp[first], so[first])
    rows = np.bincount(merged_owner, minlength=requests).astype(np.int64)
    ranges = np.split(merged, np.cumsum(rows)[:-1])
    rejections, listed = _group_batch(pfns, source, owner, code, requests, budget)
    return Batch(ranges, rejections, listed, merged, rows)


def _row_sort(keys: PfnArray, starts: PfnArray, counts: PfnArray) -> PfnArray:
    """Positions of ``keys`` stably sorted within each request (``starts``/``counts``)."""
    order = np.arange(keys.size, dtype=np.int64)
    # Each count rounded up to a power of two: the row width its request is padded to.
    width = np.where(counts > 1, 1 << np.ceil(np.log2(np.maximum(counts, 1))).astype(np.int64), 0)
    for req in np.flatnonzero(width > _SLAB).tolist():
        # A request of millions of pages (indirect tables) is a sort of its own.
        lo, hi = int(starts[req]), int(starts[req] + counts[req])
        order[lo:hi] = lo + np.argsort(keys[lo:hi], kind="stable")
    for w in np.unique(width[(width > 0) & (width <= _SLAB)]).tolist():
        rows = np.flatnonzero(width == w)
        # Rows in slabs of about a million cells: bounded temporary memory.
        step = max(1, _SLAB // w)
        for at in range(0, rows.size, step):
            part = rows[at : at + step]
            pos = starts[part, None] + np.arange(w, dtype=np.int64)
            valid = np.arange(w) < counts[part, None]
            pos = np.where(valid, pos, 0)
            mat = np.where(valid, keys[pos], np.iinfo(np.int64).max)
            perm = np.argsort(mat, axis=1, kind="stable")
            # Padding sorts after every real key (a PFN is below 2**32).
            order[pos[valid]] = np.take_along_axis(pos, perm, axis=1)[valid]
    return order


#: Pages handled per numpy pass where a batch can be larger (one request of 8 M pages).
_SLAB: Final = 1 << 20


def _merge_owned(pfns: PfnArray, owner: IndexArray) -> tuple[RangeArray, IndexArray]:
    """Sorted unique PFNs of each owner -> merged ``(first, count)`` rows and their owner."""
    if pfns.size == 0:
        return np.empty((0, 2), dtype=np.int64), np.empty(0, dtype=np.int32)
    brk = np.flatnonzero((np.diff(pfns) != 1) | (np.diff(owner) != 0)) + 1
    bounds = np.concatenate(([0], brk, [pfns.size]))
    out = np.empty((bounds.size - 1, 2), dtype=np.int64)
    out[:, 0] = pfns[bounds[:-1]]
    out[:, 1] = np.diff(bounds)
    return out, owner[bounds[:-1]]


def _group_batch(
    pfns: PfnArray,
    source: IndexArray,
    owner: IndexArray,
    code: npt.NDArray[np.int8],
    requests: int,
    budget: int,
) -> tuple[list[list[Rejection]], int]:
    """:func:`_group` for every request at once, under one listing budget.

    Two passes over the pages, a slab at a time, so that one request of 8 M bad
    pages costs slabs of memory, not gigabytes: the first counts runs per request, and
    pages and runs per request and reason; the second lists the runs the budget allows
    and finds the descriptor each summary starts at.
    """
    out: list[list[Rejection]] = [[] for _ in range(requests)]
    if not code.any():
        return out, 0
    reasons = len(_CODES)
    keys = requests * reasons
    runs_per = np.zeros(requests, dtype=np.int64)
    pages_rc = np.zeros(keys, dtype=np.int64)
    runs_rc = np.zeros(keys, dtype=np.int64)
    for idx, starts in _slabs(pfns, source, owner, code):
        pages_rc += np.bincount(owner[idx].astype(np.int64) * reasons + code[idx], minlength=keys)
        st = idx[starts]
        runs_rc += np.bincount(owner[st].astype(np.int64) * reasons + code[st], minlength=keys)
        runs_per += np.bincount(owner[st], minlength=requests)
    cap = np.minimum(runs_per, MAX_LISTED_RUNS)
    allowed = np.clip(budget - (np.cumsum(cap) - cap), 0, cap)
    seen = np.zeros(requests, dtype=np.int64)
    first_hidden = np.full(keys, -1, dtype=np.int64)
    listed_pages = np.zeros(keys, dtype=np.int64)
    listed_runs = np.zeros(keys, dtype=np.int64)
    listed: list[list[int]] = []  # [request, code, descriptor, first_pfn, count]
    last_listed = False  # whether the run still open at the end of the last slab is listed
    for idx, starts in _slabs(pfns, source, owner, code):
        at = np.flatnonzero(starts)
        # Pages before the slab's first run start continue the last slab's final run.
        carried = int(at[0]) if at.size else idx.size
        if carried and last_listed:
            listed[-1][4] += carried
            listed_pages[listed[-1][0] * reasons + listed[-1][1]] += carried
        if not at.size:
            continue
        length = np.diff(np.concatenate((at, [idx.size])))
        st = idx[at]
        o, c = owner[st].astype(np.int64), code[st].astype(np.int64)
        # Each run's rank in its request: runs of one request are consecutive.
        group = np.concatenate(([0], np.flatnonzero(np.diff(o)) + 1))
        rank = np.arange(at.size) - np.repeat(group, np.diff(np.concatenate((group, [at.size]))))
        rank += seen[o]
        shown = rank < allowed[o]
        key = o * reasons + c
        np.add.at(listed_pages, key[shown], length[shown])
        np.add.at(listed_runs, key[shown], 1)
        rows = zip(
            o[shown].tolist(),
            c[shown].tolist(),
            source[st[shown]].tolist(),
            pfns[st[shown]].tolist(),
            length[shown].tolist(),
            strict=True,
        )
        listed.extend([list(row) for row in rows])
        hidden = np.flatnonzero(~shown)
        if hidden.size:
            uniq, where = np.unique(key[hidden], return_index=True)
            new = first_hidden[uniq] < 0
            first_hidden[uniq[new]] = source[st[hidden[where[new]]]]
        seen += np.bincount(o, minlength=requests)
        last_listed = bool(shown[-1])
    for req, cv, desc, pfn, n in listed:
        out[req].append(Rejection(str(_CODES[cv]), desc, pfn, n))
    # One summary per request and reason not wholly listed, in reason order.
    hidden_runs = runs_rc - listed_runs
    for k in np.flatnonzero(hidden_runs > 0).tolist():
        req, cv = divmod(k, reasons)
        pages = int(pages_rc[k] - listed_pages[k])
        out[req].append(_summary(str(_CODES[cv]), int(first_hidden[k]), pages, int(hidden_runs[k])))
    return out, int(allowed.sum())


def _slabs(
    pfns: PfnArray, source: IndexArray, owner: IndexArray, code: npt.NDArray[np.int8]
) -> Iterator[tuple[PfnArray, npt.NDArray[np.bool_]]]:
    """The rejected pages a slab of pages at a time, and which of them starts a run: one
    that does not follow the rejected page before it (PFN + 1, same descriptor, same
    reason, same request)."""
    prev = np.empty(0, dtype=np.int64)
    for lo in range(0, code.size, _SLAB):
        idx = lo + np.flatnonzero(code[lo : lo + _SLAB])
        if not idx.size:
            continue
        ext = np.concatenate((prev, idx))
        brk = np.diff(pfns[ext]) != 1
        brk |= np.diff(source[ext]) != 0
        brk |= np.diff(code[ext]) != 0
        brk |= np.diff(owner[ext]) != 0
        yield idx, brk if prev.size else np.concatenate(([True], brk))
        prev = idx[-1:]
