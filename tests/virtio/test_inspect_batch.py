"""``vring parse``'s batched decoding gives what the device's per-request one does.

:func:`classify_batch` classifies thousands of PFN requests with one set of numpy calls;
:func:`classify` (the device's) does one request at a time and is the oracle here: same
accepted ranges, same rejections, listed and summarised alike, while the listing budget
is not reached. Past it, the counts stay exact.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balloonctl.virtio import pages as pages_module
from balloonctl.virtio.pages import (
    MAX_LISTED_RUNS,
    RamMap,
    Rejection,
    classify,
    classify_batch,
    limit_listed,
)

RAM = RamMap([(0, 24), (32, 16)])


def _batch(
    requests: list[list[tuple[int, int]]], budget: int
) -> tuple[pages_module.Batch, list[np.ndarray], list[np.ndarray]]:
    """Each request a list of (pfn, descriptor); the batch and each request's arrays."""
    pfns = [np.asarray([p for p, _ in r], dtype=np.int64) for r in requests]
    srcs = [np.asarray([d for _, d in r], dtype=np.int64) for r in requests]
    owner = np.repeat(np.arange(len(requests), dtype=np.int32), [len(r) for r in requests])
    done = classify_batch(
        np.concatenate(pfns) if pfns else np.empty(0, dtype=np.int64),
        np.concatenate(srcs).astype(np.int32) if srcs else np.empty(0, dtype=np.int32),
        owner,
        len(requests),
        RAM,
        budget,
    )
    return done, pfns, srcs


def _totals(rejections: list[Rejection] | tuple[Rejection, ...]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rejections:
        out[r.reason] = out.get(r.reason, 0) + r.pages
    return out


#: A request: (pfn, descriptor) pairs in request order, RAM, holes, repeats and beyond.
request = st.lists(st.tuples(st.integers(0, 60), st.integers(0, 3)), max_size=40)


@settings(max_examples=400, deadline=None)
@given(st.lists(request, max_size=8))
def test_batch_equals_one_request_at_a_time(requests: list[list[tuple[int, int]]]) -> None:
    done, pfns, srcs = _batch(requests, budget=1 << 30)
    for i, (p, s) in enumerate(zip(pfns, srcs, strict=True)):
        one = classify(p, s, RAM)
        assert done.ranges[i].tolist() == one.ranges.tolist()
        assert tuple(done.rejections[i]) == one.rejections


def _scattered(count: int, first: int = 1000, descriptor: int = 0) -> list[tuple[int, int]]:
    """``count`` out-of-RAM pages, none adjacent: as many rejected runs."""
    return [(first + 2 * k, descriptor) for k in range(count)]


def test_over_max_listed_runs_summarised_as_the_device_does() -> None:
    requests = [_scattered(MAX_LISTED_RUNS + 40), [(5, 0), (5, 1)], _scattered(3, 5000, 2)]
    requests[0][-10:] = [(3, 7), (3, 7), (2000, 7), (3, 8), *_scattered(6, 9000, 9)]
    done, pfns, srcs = _batch(requests, budget=1 << 30)
    for i, (p, s) in enumerate(zip(pfns, srcs, strict=True)):
        assert tuple(done.rejections[i]) == classify(p, s, RAM).rejections


@pytest.mark.parametrize("budget", [0, 1, 255, 256, 257, 600, 10_000])
def test_budget_lists_runs_in_chain_order_and_keeps_counts(budget: int) -> None:
    requests = [_scattered(300, 1000 + 10_000 * i, i) for i in range(4)]
    requests[2] = [(4, 0), (4, 0), *requests[2]]  # a duplicate too
    done, pfns, srcs = _batch(requests, budget)
    caps = [min(MAX_LISTED_RUNS, 300 + (i == 2)) for i in range(4)]
    want, left = [], budget
    for cap in caps:
        want.append(max(0, min(cap, left)))
        left -= want[-1]
    assert done.listed == sum(want)
    for i, (p, s) in enumerate(zip(pfns, srcs, strict=True)):
        one = classify(p, s, RAM)
        got = done.rejections[i]
        assert sum(1 for r in got if r.first_pfn is not None) == want[i]
        assert _totals(got) == _totals(one.rejections)  # exact page counts
        runs = sum(1 for r in got if r.first_pfn is not None) + sum(r.runs for r in got)
        assert runs == 300 + (i == 2)
        assert done.ranges[i].tolist() == one.ranges.tolist()


def test_runs_crossing_a_slab_boundary(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pages_module, "_SLAB", 7)
    requests = [
        [(1000 + k, 0) for k in range(20)] + _scattered(30, 3000, 1),
        [(2000 + k, 4) for k in range(9)],
    ]
    for budget in (0, 1, 3, 1000):
        done, pfns, srcs = _batch(requests, budget)
        for i, (p, s) in enumerate(zip(pfns, srcs, strict=True)):
            one = classify(p, s, RAM)
            assert _totals(done.rejections[i]) == _totals(one.rejections)
            if budget == 1000:
                assert tuple(done.rejections[i]) == one.rejections


def test_limit_listed_folds_into_existing_summaries() -> None:
    rows = [Rejection("out-of-ram", 0, 100 + 2 * k, 1) for k in range(5)]
    rows.insert(2, Rejection("bad-length", 3, detail="1 trailing bytes after 2 PFNs"))
    rows.append(Rejection("out-of-ram", 4, count=50, summary=True, runs=7))
    same, used = limit_listed(rows, 5)
    assert same == tuple(rows) and used == 5
    cut, used = limit_listed(rows, 2)
    assert used == 2
    assert [r.first_pfn for r in cut if r.first_pfn is not None] == [100, 102]
    assert cut[2].reason == "bad-length"  # not a page run: kept where it was
    (summary,) = [r for r in cut if r.summary]
    assert (summary.count, summary.runs, summary.descriptor) == (53, 10, 0)
