"""``vring parse`` against rust-vmm's virtio-queue: the differential oracle (issue 17, part 2).

The Rust side (fuzz/virtio_queue_oracle) builds against Debian's packaged crate, which Debian
13 has and Debian 12 does not: there the tests that need it are skipped with that reason,
and they fail if the package could be installed but is not. The comparator's own tests (it
fails on a disagreement it does not know; its Python side is vring parse's) run everywhere.
What each known kind of disagreement is: docs/differential-virtio-queue.md.
"""

from __future__ import annotations

import copy
import json
import random
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from balloonctl.virtio.inspect import Decode, RingParams, parse_ring
from fuzz import differential as diff

CORPUS = diff.ROOT / "fixtures" / "corpus"
CATALOG = diff.catalog()


def _release() -> str:
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        return "this system"
    match = re.search(r'^PRETTY_NAME="?([^"\n]*)', text, re.M)
    return match[1] if match else "this system"


@pytest.fixture(scope="session")
def oracle() -> Iterator[diff.Oracle]:
    """The oracle process, built once (cached in build/ across sessions; ~11 s cold)."""
    try:
        binary = diff.build_oracle()
    except diff.OracleUnavailableError as exc:
        if exc.installable:
            pytest.fail(
                f"{exc}; {diff.PACKAGE} is installable here, so the differential must run: "
                "`make system-deps` installs it",
                pytrace=False,
            )
        pytest.skip(
            f"rust-vmm's virtio-queue is not packaged for {_release()}; the differential "
            f"runs on {diff.BUILDS_ON}: `make test` there, `make test-debian13` here ({exc})"
        )
    with diff.Oracle(binary) as proc:
        yield proc


# --- with the oracle ----------------------------------------------------------------------
@pytest.mark.parametrize(("ring", "expected"), CATALOG, ids=[ring.name for ring, _ in CATALOG])
def test_catalog_ring_shows_exactly_its_kinds(
    oracle: diff.Oracle, ring: diff.Ring, expected: frozenset[str]
) -> None:
    verdict = diff.check(oracle, ring)
    assert verdict.unexplained == []
    assert set(verdict.kinds) == expected


def test_committed_corpus_has_no_unexplained_disagreement(oracle: diff.Oracle) -> None:
    rings = list(diff.corpus_rings(CORPUS))
    images = [r for r in rings if len(r.regions) == 1]
    snapshots = [r for r in rings if len(r.regions) == 2]
    assert len(images) >= 100 and len(snapshots) >= 100, (len(images), len(snapshots))
    kinds: Counter[str] = Counter()
    agreed = 0
    failures = []
    for ring in rings:
        verdict = diff.check(oracle, ring)
        kinds.update(verdict.kinds)
        agreed += not verdict.kinds and verdict.ok
        failures += [f"{ring.name}: {why}" for why in verdict.unexplained]
    assert failures == []
    # The corpus's hostile seeds reach most kinds, and its driver snapshots agree exactly.
    assert agreed >= 150
    assert len(kinds) >= 12, kinds


def test_generated_rings_have_no_unexplained_disagreement(oracle: diff.Oracle) -> None:
    rng = random.Random(17)
    seeds = list(diff.corpus_rings(CORPUS, ops=False))
    kinds: Counter[str] = Counter()
    failures = []
    for n in range(4000):
        if n % 4 == 3:
            ring = diff.mutate(rng, rng.choice(seeds), f"mutated-{n}")
        else:
            ring = diff.random_ring(rng, f"random-{n}")
        verdict = diff.check(oracle, ring)
        kinds.update(verdict.kinds)
        failures += [f"{ring.name}: {why}" for why in verdict.unexplained]
    assert failures[:5] == []
    assert len(kinds) >= 12, kinds  # the generator reaches the chain-level kinds


def test_oracle_command_line_takes_vring_parse_arguments(
    oracle: diff.Oracle, tmp_path: Path
) -> None:
    """Run as a command with vring parse's own arguments, the oracle says what it says
    through --serve, and exits as vring parse does (0, or 3 for a refused queue)."""
    for ring, _ in CATALOG:
        if ring.name not in (
            "valid-high-base",
            "misaligned-avail",
            "valid-wrapping-indices-0xfffe",
        ):
            continue
        ((base, data),) = ring.regions
        image = tmp_path / f"{ring.name}.img"
        image.write_bytes(data)
        args = [
            str(image),
            "--queue-size", str(ring.size),
            "--desc", hex(ring.desc),
            "--avail", str(ring.avail),
            "--used", hex(ring.used),
            "--base", hex(base),
            "--last-avail", str(ring.last_avail),
            "--decode", "none",
        ]  # fmt: skip
        run = subprocess.run(
            [str(oracle.binary), *args], capture_output=True, text=True, check=False
        )
        served = oracle.pops(ring)
        assert json.loads(run.stdout) == served
        assert run.returncode == (3 if served["error"] else 0)
        py = subprocess.run(
            [sys.executable, "-m", "balloonctl", "vring", "parse", *args],
            capture_output=True,
            text=True,
            check=False,
        )
        assert py.returncode == run.returncode, (ring.name, py.stderr)


# --- the comparator itself (no oracle needed) -----------------------------------------------
def _crate_view(py: dict[str, Any], size: int) -> dict[str, Any]:
    """What the oracle answers for a ring vring parse pops without error."""
    chains = []
    for chain in py["chains"]:
        descs = chain["descriptors"]
        chains.append(
            {
                "head": chain["head"],
                "descriptors": copy.deepcopy(descs),
                "end": {
                    "indirect": bool(descs and descs[-1]["indirect"]),
                    "table": 0,
                    "entries": size,
                    "next_index": 0,
                    "ttl": 0,
                    "bytes": sum(d["len"] for d in descs),
                },
            }
        )
    return {"chains": chains, "error": None, "truncated": False}


def _ring(name: str) -> diff.Ring:
    return next(ring for ring, _ in CATALOG if ring.name == name)


def test_comparator_agrees_with_a_faithful_answer() -> None:
    ring = _ring("valid-direct-indirect-mixed")
    py = diff.python_pops(ring)
    verdict = diff.compare(ring, py, _crate_view(py, ring.size))
    assert verdict.ok and verdict.kinds == []
    assert len(py["chains"]) == 3


@pytest.mark.parametrize(
    "tamper",
    ["addr", "flags", "missing-chain", "extra-chain", "head", "queue-error", "panic"],
)
def test_comparator_fails_on_a_disagreement_it_does_not_know(tamper: str) -> None:
    ring = _ring("valid-direct-indirect-mixed")
    py = diff.python_pops(ring)
    rs = _crate_view(py, ring.size)
    if tamper == "addr":
        rs["chains"][1]["descriptors"][2]["addr"] += 0x1000
    elif tamper == "flags":
        rs["chains"][0]["descriptors"][0]["flags"] ^= diff.WRITE
    elif tamper == "missing-chain":
        rs["chains"].pop()
    elif tamper == "extra-chain":
        rs["chains"].append(copy.deepcopy(rs["chains"][0]))
    elif tamper == "head":
        rs["chains"][2]["head"] = 5
    elif tamper == "queue-error":
        rs = {"chains": [], "error": {"type": "InvalidSize", "message": "x", "head": None}}
    else:
        rs = {"panic": "index out of bounds"}
    verdict = diff.compare(ring, py, rs)
    assert not verdict.ok
    assert verdict.kinds == []


def test_comparator_checks_that_the_crate_shows_the_kind() -> None:
    """A known kind is accepted only where the crate's answer shows it: here vring parse
    says BufferOutOfBounds, and an answer whose descriptor is inside RAM is refused."""
    ring = _ring("buffer-past-memory-end")
    py = diff.python_pops(ring)
    assert py["error"]["type"] == "BufferOutOfBounds"
    d0 = {"index": 0, "addr": 0x1000, "len": 16, "flags": diff.NEXT, "next": 1, "indirect": False}
    d1 = dict(d0, index=1, addr=0x10000 - 8, flags=0, next=0)
    end = {"indirect": False, "table": 0, "entries": 8, "next_index": 1, "ttl": 0, "bytes": 32}
    shows: dict[str, Any] = {
        "chains": [{"head": 0, "descriptors": [d0, d1], "end": end}],
        "error": None,
    }
    assert diff.compare(ring, py, shows).kinds == ["buffer-not-checked"]
    hides = copy.deepcopy(shows)
    hides["chains"][0]["descriptors"][1]["addr"] = 0x1000
    verdict = diff.compare(ring, py, hides)
    assert not verdict.ok and verdict.kinds == []


def _plain(chains: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chains as vring parse prints them with --decode none: head and descriptors."""
    keys = ("index", "addr", "len", "flags", "next")
    return [
        {"head": c["head"], "descriptors": [{k: d[k] for k in keys} for d in c["descriptors"]]}
        for c in chains
    ]


def test_python_side_is_vring_parse() -> None:
    """python_pops is vring parse --decode none, plus the fields the comparison needs."""
    compared = errors = 0
    for ring in diff.corpus_rings(CORPUS, ops=False):
        params = RingParams(ring.size, ring.desc, ring.avail, ring.used, ring.last_avail)
        with ring.memory() as mem:
            want = parse_ring(mem, params, Decode.NONE)
        got = diff.python_pops(ring)
        assert _plain(got["chains"]) == _plain(want["chains"])  # type: ignore[arg-type]
        if want["error"] is None:
            assert got["error"] is None
        else:
            errors += 1
            assert {k: got["error"][k] for k in ("type", "message", "head")} == want["error"]
        compared += 1
    assert compared >= 100 and errors >= 15, (compared, errors)


def test_every_kind_is_documented_and_demonstrated() -> None:
    """The doc, KINDS and the catalog name the same kinds, each with its spec section."""
    doc = (diff.ROOT / diff.DOC).read_text()
    headings = dict(re.findall(r"^### `([^`]+)` \(spec ([0-9.]+)\)$", doc, re.M))
    assert headings == {name: kind.section for name, kind in diff.KINDS.items()}
    shown = set().union(*(expected for _, expected in CATALOG))
    assert shown == set(diff.KINDS)
