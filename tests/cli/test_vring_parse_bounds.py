"""``vring parse`` on the worst legal rings (docs/vring-parse.md, "Bounds").

The memory bound is asserted on the full-size images (64 MiB, queue size 32768): each parse
runs in a child process and its own peak RSS (``wait4``) must stay under 512 MB. The time
bound is not asserted here (a loaded machine is not a failure): ``balloonctl bench
vring-parse`` reports it. What the output says is checked too: exact counts, the listing
budget, the typed error of a hostile ring.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from balloonctl.bench.vring_parse import GOAL_RSS, parse_in_child, worst_case
from balloonctl.virtio.inspect import LISTED_RUNS_MAX, Decode, RingParams, parse_ring
from balloonctl.virtio.memory import GuestMemory
from balloonctl.virtio.pages import MAX_LISTED_RUNS

#: Generous: only a hang fails here; the bench measures time.
NO_HANG_S = 300.0


def _in_child(tmp_path: Path, kind: str) -> tuple[int, int, Path]:
    case = worst_case(kind)
    image = tmp_path / f"{kind}.img"
    image.write_bytes(case.image)
    out = tmp_path / "out.json"
    run = parse_in_child(case.args(str(image)), str(out), timeout=NO_HANG_S)
    assert not run.timed_out
    return run.exit_code, run.max_rss, out


@pytest.mark.parametrize(
    ("kind", "exit_code"),
    [
        ("scattered-ram", 0),
        ("scattered-out", 0),
        ("huge-descriptor", 0),
        ("sg-chunks", 0),
        ("review-shared-table", 3),
        ("review-scattered", 0),
        ("review-overlapping-sg", 0),
    ],
)
def test_full_size_worst_case_under_512_mb(tmp_path: Path, kind: str, exit_code: int) -> None:
    code, rss, out = _in_child(tmp_path, kind)
    assert code == exit_code
    assert rss < GOAL_RSS, f"{kind}: peak RSS {rss >> 20} MiB"
    with out.open("rb") as f:  # whole JSON: the start, and the end after the last chain
        assert f.read(11) == b'{"chains":['
        f.seek(-400, 2)
        tail = f.read()
    if exit_code == 0:
        assert tail.endswith(b'}],"error":null}\n')
    else:
        assert b'}],"error":{"type":"IndirectTableInvalid"' in tail


def test_scattered_out_full_size_counts_are_exact(tmp_path: Path) -> None:
    code, _, out = _in_child(tmp_path, "scattered-out")
    assert code == 0
    chains = json.loads(out.read_text())["chains"]
    assert len(chains) == 32768
    listed = 0
    for chain in chains:
        assert chain["pages"] == []
        assert {r["reason"] for r in chain["rejected"]} == {"out-of-ram"}
        assert sum(r["count"] for r in chain["rejected"]) == 256  # every page counted
        listed += sum(1 for r in chain["rejected"] if "first_pfn" in r)
    assert listed == LISTED_RUNS_MAX  # 256 chains listed whole, then summaries


def _parse(kind: str, queue_size: int, memory: int) -> dict[str, Any]:
    case = worst_case(kind, queue_size, memory)
    with GuestMemory.from_image(case.image) as mem:
        q = case.layout
        return parse_ring(mem, RingParams(q.size, q.desc, q.avail, q.used), Decode(case.decode))


def test_scattered_ram_lists_every_page() -> None:
    out = _parse("scattered-ram", 4096, 8 << 20)
    assert out["error"] is None and len(out["chains"]) == 4096
    pages = 2048  # 8 MiB of RAM; the arrays name every other page
    for c, chain in enumerate(out["chains"]):
        first = (c * 256) % (pages // 2)
        want = sorted([2 * ((first + k) % (pages // 2)), 1] for k in range(256))
        assert chain["pages"] == want
        assert chain["rejected"] == []


def test_listing_budget_summarises_later_chains_exactly() -> None:
    # 512 chains of 256 scattered out-of-RAM pages: 131072 runs, twice the budget.
    out = _parse("scattered-out", 512, 1 << 20)
    chains = out["chains"]
    whole = LISTED_RUNS_MAX // MAX_LISTED_RUNS
    for chain in chains[:whole]:
        assert len(chain["rejected"]) == 256
        assert all(r["count"] == 1 and "first_pfn" in r for r in chain["rejected"])
    for chain in chains[whole:]:
        (summary,) = chain["rejected"]
        assert summary == {
            "reason": "out-of-ram",
            "descriptor": chain["head"],
            "count": 256,
            "detail": f"256 more runs from descriptor {chain['head']} on, not listed",
        }


def test_huge_descriptor_is_one_bad_length_rejection_per_chain() -> None:
    out = _parse("huge-descriptor", 1024, 8 << 20)
    for chain in out["chains"]:
        (r,) = chain["rejected"]
        assert r["reason"] == "bad-length" and "more than 256" in r["detail"]
        assert chain["pages"] == []
