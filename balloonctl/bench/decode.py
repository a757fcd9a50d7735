"""``balloonctl bench decode``: the device's cost of reading a 7 GiB inflate, PFN vs SG.

The seed measured a guest inflating 7 GiB of an 8 GiB guest and found "sending PFNs to host"
68% of the time. This is the device's share of that step: popping the chains and turning
them into merged page ranges, for the same pages sent both ways.

* ``pfn``: Linux's legacy form, 7168 buffers of 256 le32 PFNs, one request each.
* ``sg``: the seed's form, one descriptor per contiguous run, chains of at most a queue's
  worth of descriptors (``tell_host_sgs`` kicks and starts a new chain when the queue fills).
* ``pfn-python``: the PFN form decoded by a plain-Python loop (struct + set), the "before"
  that justifies numpy on this path.

Which pages: the guest gives up ``--inflate`` of ``--memory`` in runs of free pages whose
mean length is ``--run-pages`` (a fragmented allocator), handed out run by run in random
order, ascending within a run, as the buddy allocator tends to. Rings and PFN arrays live in
the first 64 MiB, which is never ballooned. Only device-side work is timed.
"""

from __future__ import annotations

import statistics
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from balloonctl.errors import UsageError
from balloonctl.units import PAGE_SHIFT, format_size
from balloonctl.virtio import spec
from balloonctl.virtio.layout import RingLayout
from balloonctl.virtio.memory import Backing, GuestMemory
from balloonctl.virtio.mock import BumpAllocator, MockDriverQueue
from balloonctl.virtio.pages import PfnArray, RamMap, compact
from balloonctl.virtio.queue import SplitQueue
from balloonctl.virtio.requests import RequestForm, gather

RESERVED = 64 << 20


@dataclass(frozen=True)
class DecodeBenchConfig:
    """What to measure."""

    memory: int = 8 << 30
    inflate: int = 7 << 30
    run_pages: int = 64
    repeat: int = 3
    python: bool = True
    queue_size: int = 128
    seed: int = 2017


def balloon_pages(config: DecodeBenchConfig) -> PfnArray:
    """The pages the guest gives up, in the order its allocator hands them out."""
    first = RESERVED >> PAGE_SHIFT
    total = config.memory >> PAGE_SHIFT
    want = config.inflate >> PAGE_SHIFT
    if want < 1:
        raise UsageError("--inflate must be at least one page (4 KiB)")
    if want > total - first:
        raise UsageError(
            f"cannot inflate {format_size(config.inflate)} of {format_size(config.memory)}: "
            "the benchmark keeps the first 64 MiB for rings"
        )
    rng = np.random.default_rng(config.seed)
    # Alternate free runs and kept holes so the runs fill `want` of the `total - first` pages.
    keep = total - first - want
    n_runs = max(1, want // max(1, config.run_pages))
    runs = rng.multinomial(want - n_runs, np.full(n_runs, 1 / n_runs)) + 1
    holes = rng.multinomial(keep, np.full(n_runs, 1 / n_runs)) if keep else np.zeros(n_runs, int)
    starts = first + np.cumsum(holes) + np.concatenate(([0], np.cumsum(runs)[:-1]))
    order = rng.permutation(n_runs)
    counts = runs[order]
    offsets = np.repeat(starts[order] - (np.cumsum(counts) - counts), counts)
    pfns: PfnArray = np.arange(int(counts.sum()), dtype=np.int64) + offsets
    return pfns


@dataclass
class PathResult:
    """One path's measurements (best of the repetitions, plus the median)."""

    name: str
    chains: int
    descriptors: int
    bytes_read: int
    pages: int
    best_s: float
    median_s: float

    def to_json(self) -> dict[str, Any]:
        """The path's entry in ``--json`` output."""
        return {
            "chains": self.chains,
            "descriptors": self.descriptors,
            "bytes_read": self.bytes_read,
            "pages": self.pages,
            "best_ms": round(self.best_s * 1000, 1),
            "median_ms": round(self.median_s * 1000, 1),
            "us_per_chain": round(self.best_s * 1e6 / max(1, self.chains), 2),
            "pages_per_s": round(self.pages / self.best_s) if self.best_s else None,
        }


Decoder = Callable[[GuestMemory, SplitQueue], int]


def _numpy_decoder(form: RequestForm, ram: RamMap) -> Decoder:
    def decode(mem: GuestMemory, queue: SplitQueue) -> int:
        pages = 0
        while (chain := queue.pop()) is not None:
            got = gather(mem, chain, form, queue="inflate")
            pages += got.classify(ram).pages
            queue.add_used(chain.head, 0)
        return pages

    return decode


def _python_decoder(ram_pages: int) -> Decoder:
    """The same decoding, page by page in plain Python: the baseline numpy replaces."""

    def decode(mem: GuestMemory, queue: SplitQueue) -> int:
        pages = 0
        while (chain := queue.pop()) is not None:
            seen: set[int] = set()
            for desc in chain:
                raw = mem.read(desc.addr, desc.len - desc.len % 4)
                for (pfn,) in struct.iter_unpack("<I", raw):
                    if pfn < ram_pages:
                        seen.add(pfn)
            runs: list[list[int]] = []
            for pfn in sorted(seen):
                if runs and runs[-1][0] + runs[-1][1] == pfn:
                    runs[-1][1] += 1
                else:
                    runs.append([pfn, 1])
            pages += sum(n for _, n in runs)
            queue.add_used(chain.head, 0)
        return pages

    return decode


def _measure(
    name: str,
    mem: GuestMemory,
    driver: MockDriverQueue,
    requests: list[list[tuple[int, int, bool]]],
    decode: Decoder,
    repeat: int,
) -> PathResult:
    times: list[float] = []
    pages = 0
    for _ in range(repeat):
        queue = driver.device_queue(last_avail_idx=driver.avail_idx)
        elapsed = 0.0
        pages = 0
        i = 0
        while i < len(requests):
            # The driver's side (untimed): make chains available while descriptors last.
            while i < len(requests) and len(requests[i]) <= driver.free_descriptors:
                driver.add_chain(requests[i])
                i += 1
            t0 = time.perf_counter()
            pages += decode(mem, queue)
            elapsed += time.perf_counter() - t0
            driver.reclaim()
        times.append(elapsed)
    return PathResult(
        name=name,
        chains=len(requests),
        descriptors=sum(len(r) for r in requests),
        bytes_read=sum(n for r in requests for _, n, _ in r) if name.startswith("pfn") else 0,
        pages=pages,
        best_s=min(times),
        median_s=statistics.median(times),
    )


def run(config: DecodeBenchConfig) -> dict[str, Any]:
    """Run every path; return the report (what ``--json`` prints)."""
    pages = balloon_pages(config)
    per_buffer = spec.PFNS_PER_BUFFER_MAX
    with GuestMemory.simple(config.memory, Backing.ANON) as mem:
        layout = RingLayout.packed(config.queue_size)
        driver = MockDriverQueue(mem, layout)
        heap = BumpAllocator(layout.end, RESERVED)
        ram = RamMap(mem.page_ranges())

        # PFN form: 256 PFNs a buffer, as Linux's fill_balloon sends them.
        pfn_requests: list[list[tuple[int, int, bool]]] = []
        for start in range(0, pages.size, per_buffer):
            chunk = pages[start : start + per_buffer].astype("<u4").tobytes()
            addr = heap.alloc(len(chunk), 4)
            mem.write(addr, chunk)
            pfn_requests.append([(addr, len(chunk), False)])

        # SG form: the seed's tell_host_sgs walks the page bitmap for runs; a run longer
        # than a descriptor can carry is split (the seed's u32 overflow, fixed).
        max_pages = spec.SG_CHUNK_MAX >> PAGE_SHIFT
        chunks: list[tuple[int, int, bool]] = []
        for run_first, run_count in compact(pages).tolist():
            for first in range(run_first, run_first + run_count, max_pages):
                n = min(max_pages, run_first + run_count - first)
                chunks.append((first << PAGE_SHIFT, n << PAGE_SHIFT, False))
        sg_requests = [
            chunks[i : i + config.queue_size] for i in range(0, len(chunks), config.queue_size)
        ]

        results = [
            _measure(
                "pfn",
                mem,
                driver,
                pfn_requests,
                _numpy_decoder(RequestForm.PFN, ram),
                config.repeat,
            ),
            _measure(
                "sg", mem, driver, sg_requests, _numpy_decoder(RequestForm.SG, ram), config.repeat
            ),
        ]
        if config.python:
            results.append(
                _measure(
                    "pfn-python",
                    mem,
                    driver,
                    pfn_requests,
                    _python_decoder(ram.total_pages),
                    1,
                )
            )
    for result in results:
        if result.pages != pages.size:
            raise AssertionError(f"{result.name} decoded {result.pages} pages of {pages.size}")
    return {
        "benchmark": "decode",
        "memory_bytes": config.memory,
        "inflate_bytes": config.inflate,
        "pages": int(pages.size),
        "runs": len(compact(pages)),
        "queue_size": config.queue_size,
        "paths": {r.name: r.to_json() for r in results},
    }


def format_report(report: dict[str, Any]) -> str:
    """A table for people."""
    lines = [
        f"decode: inflate {format_size(report['inflate_bytes'])} of "
        f"{format_size(report['memory_bytes'])} = {report['pages']} pages in "
        f"{report['runs']} runs, queue size {report['queue_size']}",
        f"{'path':<12}{'chains':>8}{'descs':>8}{'read':>10}{'best ms':>10}"
        f"{'median ms':>11}{'us/chain':>10}{'Mpages/s':>10}",
    ]
    for name, p in report["paths"].items():
        lines.append(
            f"{name:<12}{p['chains']:>8}{p['descriptors']:>8}"
            f"{format_size(p['bytes_read']) if p['bytes_read'] else '-':>10}"
            f"{p['best_ms']:>10}{p['median_ms']:>11}{p['us_per_chain']:>10}"
            f"{(p['pages_per_s'] or 0) / 1e6:>10.1f}"
        )
    return "\n".join(lines) + "\n"


__all__ = ["DecodeBenchConfig", "balloon_pages", "format_report", "run"]
