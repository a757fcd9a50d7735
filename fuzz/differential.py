#!/usr/bin/env python3
"""Differential oracle: ``balloonctl vring parse`` against rust-vmm's ``virtio-queue`` crate.

Why: balloonctl's split-virtqueue parser (``balloonctl.virtio.queue``) is checked against its
own reading of the virtio spec by its tests and fuzz oracles. A second implementation, the
one real VMMs use, reading the same ring bytes shows where the two understand a ring
differently. Most differences are by design (the crate silently ends a bad chain where
balloonctl stops the queue with a typed error); each such kind is written down once, in
docs/differential-virtio-queue.md and in :data:`KINDS`, and recognised by a predicate that
checks the crate's output really shows that kind. Any other difference is *unexplained*: a
bug in one of the two, or a kind nobody has understood yet, and the comparison fails on it.

The Rust side is ``fuzz/virtio_queue_oracle`` (its own source only), built offline with cargo
against Debian's packaged crates (``librust-virtio-queue-dev``, Debian 13) into
``build/virtio-queue-oracle/``; :func:`build_oracle` rebuilds it when its source or the
packaged crates change. It runs as one persistent process (``--serve``) answering
length-prefixed rings, so a comparison costs a pipe round trip, not an exec.

Command line (``python -m fuzz differential`` runs ``fuzz``)::

    python3 fuzz/differential.py build
    python3 fuzz/differential.py fuzz [--time S] [--seed N] [--corpus DIR]... [--artifacts DIR]
    python3 fuzz/differential.py reproduce FILE
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import random
import select
import shutil
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from balloonctl.errors import VirtioError
from balloonctl.virtio import spec
from balloonctl.virtio.memory import GuestMemory, Region
from balloonctl.virtio.queue import SplitQueue

ROOT: Final = Path(__file__).resolve().parents[1]
ORACLE_SOURCE: Final = ROOT / "fuzz" / "virtio_queue_oracle"
BUILD_DIR: Final = ROOT / "build" / "virtio-queue-oracle"
BINARY_NAME: Final = "virtio-queue-oracle"
#: Where Debian's librust-*-dev packages put crate sources (a cargo directory source).
REGISTRY: Final = Path("/usr/share/cargo/registry")
#: The Debian package that brings virtio-queue and, as its dependencies, vm-memory & co.
PACKAGE: Final = "librust-virtio-queue-dev"
#: The crate version compared against (Debian 13's); the oracle's Cargo.toml asks for it.
CRATE_GLOB: Final = "virtio-queue-0.14.*"
#: Where the oracle builds: the Debian release that packages the crate.
BUILDS_ON: Final = "Debian 13 (trixie)"
#: A cold build takes about 11 s on the project's 2-core machine; this bounds a stuck one.
BUILD_TIMEOUT_S: Final = 600.0
#: One answer of the oracle process; far above what any ring takes.
ANSWER_TIMEOUT_S: Final = 60.0
DOC: Final = "docs/differential-virtio-queue.md"

NEXT: Final = spec.VIRTQ_DESC_F_NEXT
WRITE: Final = spec.VIRTQ_DESC_F_WRITE
INDIRECT: Final = spec.VIRTQ_DESC_F_INDIRECT
U32_MAX: Final = 0xFFFFFFFF

Json = dict[str, Any]


# ============================================================================================
# The kinds of disagreement, each explained once (docs/differential-virtio-queue.md)
# ============================================================================================
@dataclass(frozen=True)
class Kind:
    """One known kind of disagreement: its name, the spec section it is about, and what
    each side does (the doc says it at length)."""

    name: str
    section: str
    summary: str


KINDS: Final[dict[str, Kind]] = {
    k.name: k
    for k in (
        Kind(
            "ring-ends-at-memory-end",
            "2.7",
            "the crate's is_valid() asks whether the byte after a ring part is guest memory, "
            "so a part ending exactly at the end of RAM is refused; vring parse accepts it",
        ),
        Kind(
            "ring-start-not-checked",
            "2.7",
            "is_valid() checks only the end of each ring part: a part that starts outside "
            "RAM (below it, or in a hole) but ends inside passes; vring parse refuses it "
            "(RingOutOfBounds)",
        ),
        Kind(
            "avail-ring-at-gpa-0",
            "2.7.1",
            "iter() refuses an available ring at guest-physical 0 as a queue not set up "
            "(QueueNotReady); 0 is a legal, aligned address and vring parse accepts it",
        ),
        Kind(
            "memory-ends-at-2^64",
            "2.7.5",
            "vm-memory cannot hold a region whose end is 2^64 (its end must fit a u64); "
            "vring parse can, so the oracle cannot pop that image at all",
        ),
        Kind(
            "head-out-of-range",
            "2.7.6",
            "an avail entry >= queue size: the crate pops a chain with no descriptors and "
            "goes on; vring parse stops (HeadOutOfRange)",
        ),
        Kind(
            "next-out-of-range",
            "2.7.5",
            "a next field beyond its table: the crate ends the chain after that descriptor; "
            "vring parse stops (NextOutOfRange)",
        ),
        Kind(
            "loop-cut-by-ttl",
            "2.7.5.2",
            "a chain longer than its table (a loop): the crate yields as many descriptors "
            "as the table has and ends the chain; vring parse stops (DescriptorLoop)",
        ),
        Kind(
            "descriptors-reused-in-flight",
            "2.7.13",
            "chains in flight naming more descriptors than the table holds (the driver "
            "reuses descriptors the device holds): the crate pops each again; vring parse "
            "stops (DescriptorLoop)",
        ),
        Kind(
            "buffer-not-checked",
            "2.7.5",
            "a buffer outside guest memory: the crate yields the descriptor (the access "
            "made with it fails later); vring parse stops (BufferOutOfBounds)",
        ),
        Kind(
            "zero-length-buffer",
            "2.7.5",
            "a descriptor of length 0: the crate yields it; vring parse stops, as QEMU "
            "does (ZeroLengthBuffer)",
        ),
        Kind(
            "chain-over-4GiB",
            "2.7.5.2",
            "a chain over 2^32 bytes: the crate ends the chain before the descriptor that "
            "overflows its u32 count; vring parse stops (ChainTooLong)",
        ),
        Kind(
            "chain-of-exactly-4GiB",
            "2.7.5.2",
            "a chain of exactly 2^32 bytes is legal and vring parse pops it whole; the "
            "crate's u32 count overflows at 2^32, so it drops the last descriptor",
        ),
        Kind(
            "indirect-length-invalid",
            "2.7.5.3.1",
            "an indirect table of length 0 or not a multiple of 16: the crate ends the "
            "chain there; vring parse stops (IndirectTableInvalid)",
        ),
        Kind(
            "indirect-table-longer-than-queue",
            "2.7.5.3.1",
            "an indirect table with more entries than the queue size: the crate walks it "
            "(up to 65535 entries); vring parse stops (IndirectTableInvalid)",
        ),
        Kind(
            "indirect-table-outside-memory",
            "2.7.5.3",
            "an indirect table not wholly in guest memory: the crate reads entries until "
            "one is outside; vring parse stops (IndirectTableInvalid)",
        ),
        Kind(
            "indirect-tables-overlap-in-flight",
            "2.7.5.3",
            "two chains in flight whose indirect tables overlap: the crate walks both; "
            "vring parse stops (IndirectTableInvalid)",
        ),
        Kind(
            "nested-indirect",
            "2.7.5.3.1",
            "INDIRECT inside an indirect table: the crate ends the chain there; vring "
            "parse stops (NestedIndirect)",
        ),
        Kind(
            "indirect-with-next-ignored",
            "2.7.5.3.1",
            "INDIRECT and NEXT on one descriptor: the crate takes the table and ignores "
            "NEXT; vring parse stops (IndirectWithNext)",
        ),
        Kind(
            "write-before-read",
            "2.7.4.2",
            "a device-readable descriptor after a device-writable one: the crate yields "
            "both (its readable()/writable() filters split them); vring parse stops "
            "(DescriptorOrder)",
        ),
    )
}


# ============================================================================================
# Rings: what both sides read
# ============================================================================================
@dataclass(frozen=True)
class Ring:
    """Guest RAM (one or more regions) and where one split queue is in it: the arguments of
    ``vring parse`` (``--base`` is the one region's address), generalised to holes."""

    regions: tuple[tuple[int, bytes], ...]
    size: int
    desc: int
    avail: int
    used: int
    last_avail: int = 0
    name: str = ""

    def request(self, max_chains: int = 0) -> bytes:
        """The oracle's ``--serve`` request (see fuzz/virtio_queue_oracle/src/main.rs)."""
        head = struct.pack(
            "<IQQQHII",
            min(self.size, U32_MAX),
            self.desc % (1 << 64),
            self.avail % (1 << 64),
            self.used % (1 << 64),
            self.last_avail & 0xFFFF,
            max_chains,
            len(self.regions),
        )
        table = b"".join(struct.pack("<QQ", base, len(data)) for base, data in self.regions)
        return head + table + b"".join(data for _, data in self.regions)

    @classmethod
    def from_request(cls, data: bytes, name: str = "") -> Ring:
        """The inverse of :meth:`request` (artifacts are requests)."""
        size, desc, avail, used, last, _, count = struct.unpack_from("<IQQQHII", data)
        offset = struct.calcsize("<IQQQHII")
        table = [struct.unpack_from("<QQ", data, offset + 16 * i) for i in range(count)]
        offset += 16 * count
        regions = []
        for base, length in table:
            regions.append((base, data[offset : offset + length]))
            offset += length
        return cls(tuple(regions), size, desc, avail, used, last, name)

    def memory(self) -> GuestMemory:
        """The regions as balloonctl's guest memory (copies)."""
        return GuestMemory([Region.from_bytes(base, data) for base, data in self.regions])


def python_pops(ring: Ring) -> Json:
    """What ``vring parse --decode none`` pops, with each error's descriptor (``index``,
    ``indirect``) and each descriptor's table, which its JSON leaves out.

    The same loop as :func:`balloonctl.virtio.inspect.parse_ring` (tests check that the two
    agree on the corpus), kept here because the exception's ``index`` is needed to tell the
    kinds apart.
    """
    chains: list[Json] = []
    error: Json | None = None
    with ring.memory() as mem:
        try:
            queue = SplitQueue(
                mem,
                ring.size,
                ring.desc,
                ring.avail,
                ring.used,
                last_avail_idx=ring.last_avail,
                read_only=True,
            )
            while (chain := queue.pop()) is not None:
                chains.append(
                    {
                        "head": chain.head,
                        "descriptors": [
                            {
                                "index": d.index,
                                "addr": d.addr,
                                "len": d.len,
                                "flags": d.flags,
                                "next": d.next,
                                "indirect": d.in_indirect,
                            }
                            for d in chain
                        ],
                    }
                )
        except VirtioError as exc:
            error = {
                "type": type(exc).__name__,
                "message": str(exc),
                "head": exc.head,
                "index": exc.index,
                "indirect": exc.indirect,
            }
    return {"chains": chains, "error": error}


# ============================================================================================
# Building and running the Rust side
# ============================================================================================
class OracleUnavailableError(RuntimeError):
    """The oracle cannot be built on this machine: cargo or the crate is not installed.

    ``installable`` says whether apt could install the crate here (then its absence is a
    setup mistake, not a property of the stack).
    """

    def __init__(self, message: str, *, installable: bool) -> None:
        super().__init__(message)
        self.installable = installable


class OracleFailedError(RuntimeError):
    """The oracle was there to build or run and did not: a build error, a crash, a hang."""


def packaged_crate() -> Path | None:
    """The virtio-queue sources Debian's package installed, if any."""
    found = sorted(REGISTRY.glob(CRATE_GLOB))
    return found[-1] if found else None


def crate_installable() -> bool:
    """Whether apt knows :data:`PACKAGE` here (``apt-cache show``; needs apt-get update)."""
    if shutil.which("apt-cache") is None:
        return False
    shown = subprocess.run(
        ["apt-cache", "show", PACKAGE], capture_output=True, text=True, check=False
    )
    return shown.returncode == 0 and f"Package: {PACKAGE}" in shown.stdout


def _source_files() -> list[Path]:
    return sorted(
        p
        for p in ORACLE_SOURCE.rglob("*")
        if p.is_file() and "target" not in p.relative_to(ORACLE_SOURCE).parts
    )


def _stamp(cargo: str) -> str:
    """What the binary was built from: its source, cargo, the packaged crates' versions."""
    digest = hashlib.sha256()
    for path in _source_files():
        digest.update(str(path.relative_to(ORACLE_SOURCE)).encode() + b"\0")
        digest.update(path.read_bytes())
    version = subprocess.run([cargo, "--version"], capture_output=True, text=True, check=False)
    digest.update(version.stdout.encode())
    digest.update("\n".join(sorted(p.name for p in REGISTRY.iterdir())).encode())
    return digest.hexdigest()


def build_oracle(*, timeout: float = BUILD_TIMEOUT_S, quiet: bool = True) -> Path:
    """The oracle binary, built now if its source or the packaged crates changed.

    Offline, against :data:`REGISTRY` only (the crate's .cargo/config.toml replaces
    crates-io with it). The source is copied into the build directory first, so the
    checkout gets no Cargo.lock or target/ of its own. Raises :class:`OracleUnavailableError`
    where cargo or the crate is missing, :class:`OracleFailedError` when the build fails.
    """
    cargo = shutil.which("cargo")
    crate = packaged_crate()
    if cargo is None or crate is None:
        missing = " and ".join(
            what for what, absent in (("cargo", cargo is None), (PACKAGE, crate is None)) if absent
        )
        raise OracleUnavailableError(
            f"{missing} not installed (the oracle builds against Debian's packaged "
            f"virtio-queue 0.14, in {BUILDS_ON})",
            installable=crate_installable(),
        )
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    binary = BUILD_DIR / BINARY_NAME
    stamp_file = BUILD_DIR / "stamp"
    with open(BUILD_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a test run and a fuzz run may build at once
        stamp = _stamp(cargo)
        if binary.is_file() and stamp_file.is_file() and stamp_file.read_text() == stamp:
            return binary
        work = BUILD_DIR / "crate"
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(ORACLE_SOURCE, work, ignore=shutil.ignore_patterns("target"))
        log = BUILD_DIR / "build.log"
        started = time.monotonic()
        with open(log, "wb") as out:
            try:
                status = subprocess.run(
                    [
                        cargo,
                        "build",
                        "--release",
                        "--offline",
                        "--target-dir",
                        str(BUILD_DIR / "target"),
                    ],
                    cwd=work,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    timeout=timeout,
                    check=False,
                ).returncode
            except subprocess.TimeoutExpired:
                raise OracleFailedError(
                    f"cargo build of the oracle took over {timeout:.0f} s (log {log})"
                ) from None
        if status != 0:
            tail = log.read_text(errors="replace").strip().splitlines()[-15:]
            raise OracleFailedError(
                f"cargo build of the oracle failed ({status}), log {log}:\n" + "\n".join(tail)
            )
        shutil.copy2(BUILD_DIR / "target" / "release" / BINARY_NAME, binary)
        stamp_file.write_text(stamp)
        if not quiet:
            print(
                f"differential: built {binary} in {time.monotonic() - started:.1f} s "
                f"against {crate.name}",
                file=sys.stderr,
            )
        return binary


class Oracle:
    """One persistent ``virtio-queue-oracle --serve`` process."""

    def __init__(self, binary: Path) -> None:
        self.binary = binary
        self.proc = subprocess.Popen(
            [str(binary), "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.requests = 0

    def pops(self, ring: Ring, max_chains: int = 0) -> Json:
        """The crate's answer for ``ring``: at most ``max_chains`` chains (0: all)."""
        proc = self.proc
        assert proc.stdin is not None and proc.stdout is not None
        request = ring.request(max_chains)
        try:
            proc.stdin.write(struct.pack("<I", len(request)) + request)
            proc.stdin.flush()
        except BrokenPipeError:
            raise OracleFailedError(f"the oracle died: {self._stderr()}") from None
        ready, _, _ = select.select([proc.stdout], [], [], ANSWER_TIMEOUT_S)
        if not ready:
            self.close()
            raise OracleFailedError(f"the oracle gave no answer in {ANSWER_TIMEOUT_S:.0f} s")
        line = proc.stdout.readline()
        if not line:
            raise OracleFailedError(f"the oracle died: {self._stderr()}")
        self.requests += 1
        answer: Json = json.loads(line)
        return answer

    def _stderr(self) -> str:
        self.close()
        assert self.proc.stderr is not None
        return self.proc.stderr.read().decode(errors="replace").strip() or "(no output)"

    def close(self) -> None:
        """End the process (it exits at the end of its stdin)."""
        proc = self.proc
        if proc.stdin is not None and not proc.stdin.closed:
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> Oracle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if self.proc.stderr is not None:
            self.proc.stderr.close()


# ============================================================================================
# The comparison
# ============================================================================================
@dataclass
class Verdict:
    """The outcome for one ring: ``kinds`` are the explained disagreements seen (empty when
    the two agree), ``unexplained`` the others, each a sentence."""

    ring: str
    kinds: list[str] = field(default_factory=list)
    unexplained: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.unexplained


_QUEUE_ERRORS: Final = frozenset(
    {"QueueSizeInvalid", "RingMisaligned", "RingOutOfBounds", "AvailIndexJump"}
)
#: Each ring part: its size for a queue size, and the crate's alignment error for it.
_PARTS: Final[dict[str, tuple[str, Callable[[int], int], str]]] = {
    "descriptor table": ("desc", spec.desc_table_size, "InvalidDescTableAlign"),
    "available ring": ("avail", spec.avail_ring_size, "InvalidAvailRingAlign"),
    "used ring": ("used", spec.used_ring_size, "InvalidUsedRingAlign"),
}
#: The crate's error for each of vring parse's queue-level errors (same check, same order).
_SAME_QUEUE_ERROR: Final = {
    "QueueSizeInvalid": "InvalidSize",
    "RingOutOfBounds": "QueueInvalid",
    "AvailIndexJump": "InvalidAvailRingIndex",
}


def _part_named(text: str) -> str | None:
    return next((name for name in _PARTS if name in text), None)


def _part_span(ring: Ring, name: str) -> tuple[int, int]:
    attr, size_of, _ = _PARTS[name]
    return int(getattr(ring, attr)), size_of(ring.size)


def _in_ram(mem: GuestMemory, addr: int) -> bool:
    """vm-memory's address_in_range: is the byte at ``addr`` guest RAM?"""
    return 0 <= addr < 1 << 64 and mem.contains(addr, 1)


def _raw_descriptor(mem: GuestMemory, table: int, index: int) -> tuple[int, int, int, int] | None:
    """Entry ``index`` of the table at ``table`` as the guest wrote it (None outside RAM)."""
    addr = table + spec.DESC_SIZE * index
    if not mem.contains(addr, spec.DESC_SIZE):
        return None
    addr_, length, flags, nxt = spec.DESC_STRUCT.unpack(mem.read(addr, spec.DESC_SIZE))
    return int(addr_), int(length), int(flags), int(nxt)


def _without_extras(descriptors: Sequence[Json]) -> list[tuple[int, ...]]:
    keys = ("index", "addr", "len", "flags", "next", "indirect")
    return [tuple(int(d[k]) for k in keys) for d in descriptors]


def _table_descriptors(chain: Json) -> int:
    """Descriptors of the queue's own table a crate chain visited (its INDIRECT one too)."""
    direct = sum(1 for d in chain["descriptors"] if not d["indirect"])
    return direct + (1 if chain["end"]["indirect"] else 0)


def _queue_level(ring: Ring, mem: GuestMemory, py: Json, rs: Json) -> tuple[str | None, str]:
    """A comparison that ends at the queue's configuration: (kind, "") when explained,
    ("", "") when the two agree, (None, why) when not explained."""
    pe, re_ = py["error"], rs["error"]
    if re_ is not None and pe is not None and pe["type"] in _QUEUE_ERRORS:
        if pe["type"] == "RingMisaligned":
            part = _part_named(pe["message"])
            if part is not None and re_["type"] == _PARTS[part][2]:
                return "", ""
        elif _SAME_QUEUE_ERROR.get(pe["type"]) == re_["type"] and (
            pe["type"] != "RingOutOfBounds"
            or _part_named(pe["message"]) == _part_named(re_["message"])
        ):
            return "", ""
    if re_ is not None:
        kind = re_["type"]
        if kind == "Unrepresentable" and any(b + len(d) == 1 << 64 for b, d in ring.regions):
            return "memory-ends-at-2^64", ""
        if kind == "QueueInvalid" and (part := _part_named(re_["message"])) is not None:
            start, length = _part_span(ring, part)
            if mem.contains(start, length) and not _in_ram(mem, start + length):
                return "ring-ends-at-memory-end", ""
        if kind == "QueueNotReady" and ring.avail == 0:
            return "avail-ring-at-gpa-0", ""
    if pe is not None and pe["type"] == "RingOutOfBounds":
        part = _part_named(pe["message"])
        if part is not None:
            start, length = _part_span(ring, part)
            if _in_ram(mem, start + length) and not mem.contains(start, length):
                return "ring-start-not-checked", ""
    return None, f"vring parse says {_describe(pe)}, virtio-queue says {_describe(re_)}"


def _brief(chain: Json) -> str:
    """A crate chain in a sentence: its first descriptors and where its walk ended."""
    descs = chain["descriptors"]
    shown = [
        f"{d['index']}{'i' if d['indirect'] else ''}:{d['addr']:#x}+{d['len']:#x}/f{d['flags']}"
        f"/n{d['next']}"
        for d in descs[:4]
    ]
    more = f" and {len(descs) - 4} more" if len(descs) > 4 else ""
    return f"head {chain['head']} [{', '.join(shown)}{more}] ending {chain.get('end')}"


def _brief_list(descs: Sequence[tuple[int, ...]]) -> str:
    shown = ", ".join(str(d) for d in descs[:4])
    return f"[{shown}{f' and {len(descs) - 4} more' if len(descs) > 4 else ''}]"


def _describe(error: Json | None) -> str:
    if error is None:
        return "no error"
    return f"{error['type']} ({error['message']})"


def _explain_chain_error(
    ring: Ring, mem: GuestMemory, pe: Json, chains: Sequence[Json], k: int
) -> str | None:
    """The kind that explains the crate's chain ``k`` where vring parse stopped with ``pe``,
    if the crate's output really shows it; None otherwise."""
    chain = chains[k]
    descs, end = chain["descriptors"], chain["end"]
    last = descs[-1] if descs else None
    kind, message = pe["type"], pe["message"]
    at = [d for d in descs if d["index"] == pe["index"] and d["indirect"] == pe["indirect"]]
    refused = (
        _raw_descriptor(mem, end["table"], end["next_index"])
        if end["ttl"] > 0 and end["next_index"] < end["entries"]
        else None
    )
    overflow = refused is not None and end["bytes"] + refused[1] > U32_MAX
    if (
        overflow
        and kind not in ("ChainTooLong", "NestedIndirect", "IndirectTableInvalid")
        and (end["next_index"], end["indirect"]) == (pe["index"], pe["indirect"])
    ):
        # The crate's u32 count overflows at the very descriptor vring parse refused for an
        # earlier check of its order (bounds, direction): the same descriptor, both cut.
        return "chain-over-4GiB"
    if kind == "HeadOutOfRange":
        if not descs and chain["head"] >= ring.size and end["next_index"] == chain["head"]:
            return "head-out-of-range"
    elif kind == "NextOutOfRange":
        if (
            last is not None
            and last["flags"] & NEXT
            and (last["index"], last["indirect"]) == (pe["index"], pe["indirect"])
            and end["next_index"] == last["next"] >= end["entries"]
        ):
            return "next-out-of-range"
    elif kind == "DescriptorLoop" and "in flight" in message:
        held = sum(_table_descriptors(c) for c in chains[: k + 1])
        if last is not None and not last["flags"] & NEXT and held > ring.size:
            return "descriptors-reused-in-flight"
    elif kind == "DescriptorLoop":
        walked = sum(1 for d in descs if d["indirect"] == pe["indirect"])
        if (
            last is not None
            and last["flags"] & NEXT
            and end["ttl"] == 0
            and end["indirect"] == pe["indirect"]
            and walked == end["entries"]
        ):
            return "loop-cut-by-ttl"
    elif kind == "BufferOutOfBounds":
        if any(not mem.contains(d["addr"], d["len"]) for d in at):
            return "buffer-not-checked"
    elif kind == "ZeroLengthBuffer":
        if any(d["len"] == 0 for d in at):
            return "zero-length-buffer"
    elif kind == "DescriptorOrder":
        for i, d in enumerate(descs):
            if d in at and not d["flags"] & WRITE and any(e["flags"] & WRITE for e in descs[:i]):
                return "write-before-read"
    elif kind == "ChainTooLong":
        if overflow:
            return "chain-over-4GiB"
    elif kind == "NestedIndirect":
        if (
            end["indirect"]
            and refused is not None
            and refused[2] & INDIRECT
            and end["next_index"] == pe["index"]
        ):
            return "nested-indirect"
    elif kind == "IndirectWithNext":
        raw = _raw_descriptor(mem, ring.desc, pe["index"])
        took_table = end["indirect"] and raw is not None and end["table"] == raw[0]
        refused_table = not end["indirect"] and end["next_index"] == pe["index"]
        if (
            raw is not None
            and raw[2] & INDIRECT
            and raw[2] & NEXT
            and (took_table or refused_table)
        ):
            return "indirect-with-next-ignored"
    elif kind == "IndirectTableInvalid":
        if "positive multiple" in message:
            empty = end["indirect"] and end["entries"] == 0
            odd = (
                not end["indirect"]
                and refused is not None
                and refused[2] & INDIRECT
                and refused[1] % spec.DESC_SIZE != 0
            )
            if empty or odd:
                return "indirect-length-invalid"
        elif "more than the queue size" in message:
            walked = end["indirect"] and end["entries"] > ring.size
            too_big = (
                not end["indirect"]
                and refused is not None
                and refused[2] & INDIRECT
                and refused[1] // spec.DESC_SIZE > 0xFFFF
            )
            if walked or too_big:
                return "indirect-table-longer-than-queue"
        elif "not inside guest memory" in message:
            span = spec.DESC_SIZE * end["entries"]
            if end["indirect"] and not mem.contains(end["table"], span):
                return "indirect-table-outside-memory"
        elif "still in flight" in message and end["indirect"]:
            start, stop = end["table"], end["table"] + spec.DESC_SIZE * end["entries"]
            for other in chains[:k]:
                o = other["end"]
                o_stop = o["table"] + spec.DESC_SIZE * o["entries"]
                if o["indirect"] and o["table"] < stop and start < o_stop:
                    return "indirect-tables-overlap-in-flight"
    return None


def compare(ring: Ring, py: Json, rs: Json) -> Verdict:
    """Compare vring parse's pops (:func:`python_pops`) with the crate's for one ring.

    Chains both pop must be identical, descriptor by descriptor (index, addr, len, flags,
    next, and which table). Where vring parse stops at an error, the crate's chain at that
    point must show the kind the error stands for; the crate's later chains are not
    compared (vring parse, like a device marking itself broken, pops nothing more).
    """
    verdict = Verdict(ring.name)
    for problem in ("panic", "request_error"):
        if problem in rs:
            verdict.unexplained.append(f"the oracle answered {problem}: {rs[problem]}")
            return verdict
    pe, re_ = py["error"], rs["error"]
    with ring.memory() as mem:
        if re_ is not None or (pe is not None and pe["type"] in _QUEUE_ERRORS):
            kind, why = _queue_level(ring, mem, py, rs)
            if kind is None:
                verdict.unexplained.append(why)
            elif kind:
                verdict.kinds.append(kind)
            return verdict
        got = rs["chains"]
        for i, want in enumerate(py["chains"]):
            if i >= len(got):
                verdict.unexplained.append(
                    f"vring parse pops chain {i} (head {want['head']}), virtio-queue does not"
                )
                return verdict
            if got[i]["head"] != want["head"]:
                verdict.unexplained.append(
                    f"chain {i}: head {want['head']} in vring parse, {got[i]['head']} in "
                    "virtio-queue"
                )
                return verdict
            mine, theirs = (
                _without_extras(want["descriptors"]),
                _without_extras(got[i]["descriptors"]),
            )
            if mine != theirs:
                total = sum(d[2] for d in mine)
                if total == 1 << 32 and theirs == mine[:-1]:
                    verdict.kinds.append("chain-of-exactly-4GiB")
                    continue
                at = next(
                    (j for j, (a, b) in enumerate(zip(mine, theirs, strict=False)) if a != b),
                    min(len(mine), len(theirs)),
                )
                verdict.unexplained.append(
                    f"chain {i} (head {want['head']}) differs from descriptor {at} on, as "
                    "(index, addr, len, flags, next, indirect): vring parse "
                    f"{_brief_list(mine[at:])} of {len(mine)}, virtio-queue "
                    f"{_brief_list(theirs[at:])} of {len(theirs)}"
                )
                return verdict
        k = len(py["chains"])
        if pe is None:
            if len(got) != k or rs.get("truncated"):
                verdict.unexplained.append(
                    f"vring parse pops {k} chains, virtio-queue {len(got)}"
                    + (" (truncated)" if rs.get("truncated") else "")
                )
            return verdict
        if k >= len(got) or got[k]["head"] != pe["head"]:
            verdict.unexplained.append(
                f"vring parse stops at chain {k} (head {pe['head']}: {_describe(pe)}), where "
                f"virtio-queue pops {got[k]['head'] if k < len(got) else 'nothing'}"
            )
            return verdict
        kind = _explain_chain_error(ring, mem, pe, got, k)
        if kind is None:
            verdict.unexplained.append(
                f"chain {k} (head {pe['head']}): vring parse says {_describe(pe)} at "
                f"descriptor {pe['index']}{' (indirect)' if pe['indirect'] else ''}; "
                f"virtio-queue pops {_brief(got[k])}, which shows no known kind"
            )
        else:
            verdict.kinds.append(kind)
    return verdict


def check(oracle: Oracle, ring: Ring) -> Verdict:
    """Pop ``ring`` on both sides and compare. The crate is asked for no more chains than
    vring parse reached (its chain at vring parse's error included): past an error it goes
    on, and a hostile ring can make it walk billions of descriptors there."""
    py = python_pops(ring)
    if py["error"] is None:
        limit = 0
    elif py["error"]["type"] in _QUEUE_ERRORS:
        limit = 1
    else:
        limit = len(py["chains"]) + 1
    return compare(ring, py, oracle.pops(ring, limit))


# ============================================================================================
# Inputs: the committed corpora, generated rings
# ============================================================================================
def image_ring(data: bytes, name: str = "") -> Ring | None:
    """A vring_image fuzz input as the ring ``vring parse`` reads (None: no image)."""
    from fuzz import harness  # noqa: PLC0415 (heavy; only the corpus readers need it)

    head = data[: harness.IMAGE_HEADER_SIZE].ljust(harness.IMAGE_HEADER_SIZE, b"\0")
    size, desc, avail, used, last, mode, base_sel = harness._IMAGE_HEADER.unpack(head)
    image = data[harness.IMAGE_HEADER_SIZE : harness.IMAGE_HEADER_SIZE + harness.IMAGE_MAX]
    if not image:
        return None
    base = harness.IMAGE_BASES[base_sel % len(harness.IMAGE_BASES)]
    if mode & 0x80:
        desc, avail, used = base + desc, base + avail, base + used
    return Ring(((base, image),), size, desc, avail, used, last, name)


def ops_rings(data: bytes, name: str = "") -> list[Ring]:
    """The rings a vring_ops fuzz input shows the device: guest RAM (two regions, a hole
    between) and the queue, as they are at each pop, each to be parsed afresh."""
    from fuzz import harness  # noqa: PLC0415

    shots: list[Ring] = []
    real = harness._device_pop

    def snapshot(mem: Any, q: SplitQueue, in_flight: list[int]) -> bool:
        regions = tuple((r.base, bytes(r.view)) for r in mem.regions)
        shots.append(
            Ring(regions, q.size, q.desc, q.avail, q.used, q.last_avail_idx, f"{name}@{len(shots)}")
        )
        return real(mem, q, in_flight)

    harness._device_pop = snapshot
    try:
        with contextlib.suppress(Exception):  # the harness's own verdict is tests/fuzz's job
            harness.vring_ops(data)
    finally:
        harness._device_pop = real
    unique: dict[bytes, Ring] = {}
    for ring in shots:
        unique.setdefault(hashlib.sha256(ring.request()).digest(), ring)
    return list(unique.values())


def corpus_rings(corpus: Path, *, ops: bool = True) -> Iterator[Ring]:
    """Every ring of a fuzz corpus root: ``vring_image/`` files, then the pops of
    ``vring_ops/`` files."""
    for path in sorted((corpus / "vring_image").glob("*")):
        if path.is_file() and (ring := image_ring(path.read_bytes(), path.name)) is not None:
            yield ring
    if ops:
        for path in sorted((corpus / "vring_ops").glob("*")):
            if path.is_file():
                yield from ops_rings(path.read_bytes(), path.name)


class Image:
    """A one-region guest RAM and a queue in it, written raw: the generator's canvas."""

    def __init__(
        self, size: int, mem_size: int = 0x10000, *, base: int = 0, rings_at: int = 0
    ) -> None:
        self.size = size
        self.base = base
        self.buf = bytearray(mem_size)
        self.desc = base + rings_at
        self.avail = self.desc + spec.desc_table_size(size)
        self.used = (self.avail + spec.avail_ring_size(size) + 3) & ~3
        self.data = self.used + spec.used_ring_size(size)  # buffers and tables go after
        self.avail_idx = 0
        self.last_avail = 0

    def put(self, addr: int, raw: bytes) -> None:
        off = addr - self.base
        self.buf[off : off + len(raw)] = raw

    def descriptor(
        self, table: int, index: int, addr: int, length: int, flags: int, nxt: int
    ) -> None:
        self.put(table + 16 * index, spec.DESC_STRUCT.pack(addr % (1 << 64), length, flags, nxt))

    def publish(self, *heads: int) -> None:
        for head in heads:
            slot = self.avail_idx % self.size
            self.put(self.avail + 4 + 2 * slot, struct.pack("<H", head & 0xFFFF))
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.put(self.avail + 2, struct.pack("<H", self.avail_idx))

    def start_at(self, idx: int) -> None:
        """The device's last_avail (and the driver's avail.idx) start at ``idx``."""
        self.last_avail = self.avail_idx = idx & 0xFFFF
        self.put(self.avail + 2, struct.pack("<H", self.avail_idx))

    def ring(self, name: str, **override: int) -> Ring:
        fields = {
            "size": self.size,
            "desc": self.desc,
            "avail": self.avail,
            "used": self.used,
            "last_avail": self.last_avail,
        }
        fields.update(override)
        return Ring(((self.base, bytes(self.buf)),), name=name, **fields)


def catalog() -> list[tuple[Ring, frozenset[str]]]:
    """Named rings, each with the kinds it must show (none: the two agree exactly): every
    kind of :data:`KINDS` at least once, and the agreements around each."""
    out: list[tuple[Ring, frozenset[str]]] = []

    def add(ring: Ring, *kinds: str) -> None:
        out.append((ring, frozenset(kinds)))

    # --- agreements -------------------------------------------------------------------
    im = Image(8)
    d = im.data
    im.descriptor(im.desc, 0, d, 64, NEXT, 1)
    im.descriptor(im.desc, 1, d + 64, 32, WRITE, 0)
    im.descriptor(im.desc, 2, d + 0x100, 16 * 3, INDIRECT, 0)
    im.descriptor(d + 0x100, 0, d + 0x200, 8, NEXT, 2)
    im.descriptor(d + 0x100, 2, d + 0x300, 8, NEXT | WRITE, 1)
    im.descriptor(d + 0x100, 1, d + 0x400, 8, WRITE, 0)
    im.descriptor(im.desc, 3, d + 0x500, 4, NEXT, 4)
    im.descriptor(im.desc, 4, d + 0x600, 16, INDIRECT | WRITE, 0)  # WRITE ignored (2.7.5.3.2)
    im.descriptor(d + 0x600, 0, d + 0x700, 4, 0, 0)
    im.publish(0, 2, 3)
    add(im.ring("valid-direct-indirect-mixed"))
    for start in (0xFFFE, 0x7FFF):
        im = Image(4)
        im.start_at(start)
        for i in range(4):
            im.descriptor(im.desc, i, im.data + 0x40 * i, 0x40, 0, 0)
        im.publish(3, 1, 0, 2)
        add(im.ring(f"valid-wrapping-indices-{start:#x}"))
    im = Image(1)
    im.descriptor(im.desc, 0, im.data, 1, 0, 0)
    im.publish(0)
    add(im.ring("valid-queue-of-one"))
    im = Image(4, base=0x100000)
    im.descriptor(im.desc, 0, im.data, 16, 0, 0)
    im.publish(0)
    add(im.ring("valid-high-base"))
    im = Image(4, base=(1 << 64) - 0x20000)
    im.descriptor(im.desc, 0, im.data, 16, 0, 0)
    im.publish(0)
    add(im.ring("valid-base-near-2^64"))
    for size in (0, 3, 100, 65536):
        add(Image(4).ring(f"queue-size-{size}", size=size), *())
    im = Image(4)
    add(im.ring("misaligned-desc", desc=im.desc + 8))
    add(im.ring("misaligned-avail", avail=im.avail + 1))
    add(im.ring("misaligned-used", used=im.used + 2))
    add(im.ring("used-beyond-memory", used=0x10000 - 8))
    add(im.ring("desc-far-away", desc=1 << 40))
    add(im.ring("avail-wraps-2^64", avail=(1 << 64) - 2))
    im = Image(4)
    im.put(im.avail + 2, struct.pack("<H", 5))
    add(im.ring("avail-index-jump"))
    im = Image(4)
    im.start_at(10)
    add(im.ring("avail-index-behind", last_avail=12))  # 0xFFFE ahead: a jump
    im = Image(8)
    add(im.ring("empty-queue"))
    im = Image(4)
    im.descriptor(im.desc, 0, im.data, 16, INDIRECT, 0)
    im.descriptor(im.data, 0, im.data + 0x100, 8, 0, 0)
    im.publish(0)
    im.descriptor(im.desc, 1, im.data, 16, INDIRECT, 0)  # the same table, not in flight twice
    add(im.ring("valid-one-table-one-chain"))

    # --- queue-level kinds --------------------------------------------------------------
    im = Image(4, mem_size=0x1000)
    add(im.ring("desc-ends-at-memory-end", desc=0x1000 - 16 * 4), "ring-ends-at-memory-end")
    add(im.ring("avail-ends-at-memory-end", avail=0x1000 - 14), "ring-ends-at-memory-end")
    im = Image(4, base=0x1000)
    add(im.ring("desc-starts-below-memory", desc=0x1000 - 16), "ring-start-not-checked")
    im = Image(4, rings_at=0x100)
    im.descriptor(im.desc, 0, im.data, 16, 0, 0)
    im.put(2, struct.pack("<H", 1))  # an available ring at 0: idx 1, ring[0] = head 0
    add(im.ring("avail-at-gpa-0", avail=0), "avail-ring-at-gpa-0")
    high = Image(4, mem_size=0x4000, base=(1 << 64) - 0x4000)
    high.descriptor(high.desc, 0, high.data, 16, 0, 0)
    high.publish(0)
    add(high.ring("memory-ends-at-2^64"), "memory-ends-at-2^64")

    # --- chain-level kinds --------------------------------------------------------------
    def chain(name: str, kinds: Sequence[str], size: int, build: Callable[[Image], None]) -> None:
        im = Image(size)
        build(im)
        add(im.ring(name), *kinds)

    def head_out(im: Image) -> None:
        im.descriptor(im.desc, 0, im.data, 16, 0, 0)
        im.publish(0, 9, 0)

    chain("head-out-of-range", ["head-out-of-range"], 8, head_out)

    def next_out(im: Image) -> None:
        im.descriptor(im.desc, 0, im.data, 16, NEXT, 1)
        im.descriptor(im.desc, 1, im.data, 16, NEXT, 8)
        im.publish(0)

    chain("next-out-of-range", ["next-out-of-range"], 8, next_out)

    def next_out_indirect(im: Image) -> None:
        im.descriptor(im.desc, 0, im.data, 32, INDIRECT, 0)
        im.descriptor(im.data, 0, im.data + 0x100, 16, NEXT, 2)
        im.descriptor(im.data, 1, im.data + 0x100, 16, 0, 0)
        im.publish(0)

    chain("next-out-of-range-indirect", ["next-out-of-range"], 8, next_out_indirect)

    def loop(im: Image) -> None:
        im.descriptor(im.desc, 0, im.data, 16, NEXT, 1)
        im.descriptor(im.desc, 1, im.data, 16, NEXT, 0)
        im.publish(0)

    chain("loop-direct", ["loop-cut-by-ttl"], 4, loop)

    def loop_self(im: Image) -> None:
        im.descriptor(im.desc, 0, im.data, 16, NEXT, 0)
        im.publish(0)

    chain("loop-queue-of-one", ["loop-cut-by-ttl"], 1, loop_self)

    def loop_indirect(im: Image) -> None:
        im.descriptor(im.desc, 0, im.data + 0x10, 16, NEXT, 1)
        im.descriptor(im.desc, 1, im.data, 48, INDIRECT, 0)
        for i in range(3):
            im.descriptor(im.data, i, im.data + 0x100, 8, NEXT, (i + 1) % 3)
        im.publish(1, 0)

    chain("loop-indirect", ["loop-cut-by-ttl"], 8, loop_indirect)

    def reuse(im: Image) -> None:
        for i in range(3):
            im.descriptor(im.desc, i, im.data, 16, NEXT if i < 2 else 0, i + 1)
        im.publish(0, 0)

    chain("descriptors-reused-in-flight", ["descriptors-reused-in-flight"], 4, reuse)

    def outside(im: Image) -> None:
        im.descriptor(im.desc, 0, im.data, 16, NEXT, 1)
        im.descriptor(im.desc, 1, 0x10000 - 8, 16, 0, 0)
        im.publish(0)

    chain("buffer-past-memory-end", ["buffer-not-checked"], 8, outside)

    def wraps(im: Image) -> None:
        im.descriptor(im.desc, 0, (1 << 64) - 8, 16, 0, 0)
        im.publish(0)

    chain("buffer-wraps-2^64", ["buffer-not-checked"], 8, wraps)

    def zero(im: Image) -> None:
        im.descriptor(im.desc, 0, im.data, 16, NEXT, 1)
        im.descriptor(im.desc, 1, im.data, 0, WRITE, 0)
        im.publish(0)

    chain("zero-length", ["zero-length-buffer"], 8, zero)

    def order(im: Image) -> None:
        im.descriptor(im.desc, 0, im.data, 16, NEXT | WRITE, 1)
        im.descriptor(im.desc, 1, im.data, 16, 0, 0)
        im.publish(0)

    chain("write-before-read", ["write-before-read"], 8, order)

    for length, name in ((0, "empty"), (24, "odd")):

        def bad_len(im: Image, length: int = length) -> None:
            im.descriptor(im.desc, 0, im.data, 16, NEXT, 1)
            im.descriptor(im.desc, 1, im.data, length, INDIRECT, 0)
            im.publish(0)

        chain(f"indirect-length-{name}", ["indirect-length-invalid"], 8, bad_len)

    def long_table(im: Image) -> None:
        im.descriptor(im.desc, 0, im.data, 16 * 9, INDIRECT, 0)
        for i in range(9):
            im.descriptor(im.data, i, im.data + 0x200, 4, NEXT if i < 8 else 0, i + 1)
        im.publish(0)

    chain("indirect-longer-than-queue", ["indirect-table-longer-than-queue"], 8, long_table)

    def table_outside(im: Image) -> None:
        im.descriptor(im.desc, 0, 0x10000 - 16, 32, INDIRECT, 0)
        im.descriptor(0x10000 - 16, 0, im.data, 4, NEXT, 1)
        im.publish(0)

    chain("indirect-table-half-outside", ["indirect-table-outside-memory"], 8, table_outside)

    def overlap(im: Image) -> None:
        im.descriptor(im.desc, 0, im.data, 32, INDIRECT, 0)
        im.descriptor(im.desc, 1, im.data + 16, 16, INDIRECT, 0)
        im.descriptor(im.data, 0, im.data + 0x100, 4, NEXT, 1)
        im.descriptor(im.data, 1, im.data + 0x100, 4, 0, 0)
        im.publish(0, 1)

    chain("indirect-tables-overlap", ["indirect-tables-overlap-in-flight"], 8, overlap)

    def nested(im: Image) -> None:
        im.descriptor(im.desc, 0, im.data, 32, INDIRECT, 0)
        im.descriptor(im.data, 0, im.data + 0x100, 4, NEXT, 1)
        im.descriptor(im.data, 1, im.data, 16, INDIRECT, 0)
        im.publish(0)

    chain("nested-indirect", ["nested-indirect"], 8, nested)

    def with_next(im: Image) -> None:
        im.descriptor(im.desc, 0, im.data, 16, INDIRECT | NEXT, 1)
        im.descriptor(im.desc, 1, im.data + 0x100, 16, 0, 0)
        im.descriptor(im.data, 0, im.data + 0x200, 4, 0, 0)
        im.publish(0)

    chain("indirect-with-next", ["indirect-with-next-ignored"], 8, with_next)

    # 4096 descriptors of 1 MiB: exactly 2^32 bytes (legal), then one byte more.
    for extra, kind in ((0, "chain-of-exactly-4GiB"), (1, "chain-over-4GiB")):
        size = 4096
        im = Image(size, mem_size=0x201000)
        for i in range(size):
            last = i == size - 1
            im.descriptor(
                im.desc, i, 0x100000, (1 << 20) + (extra if last else 0), 0 if last else NEXT, i + 1
            )
        im.publish(0)
        add(im.ring(f"chain-4GiB-plus-{extra}"), kind)
    return out


# Values at the edges of both sides' checks, for the random rings.
_LENGTHS: Final = (0, 1, 8, 15, 16, 24, 32, 48, 4096, 1 << 20, 1 << 31, U32_MAX)
_SIZES: Final = (1, 2, 4, 8, 16, 32, 256)


def random_ring(rng: random.Random, name: str) -> Ring:
    """A ring a driver could have written, then 0-3 random corruptions of it: fields set to
    values at the edges of the checks (lengths, flags, next, heads, indices, addresses)."""
    size = rng.choice(_SIZES)
    mem_size = rng.choice((0x4000, 0x10000))
    base = rng.choice((0, 0, 0, 0x1000, (1 << 64) - 0x20000))
    rings_at = rng.choice((0, 0, 0x40, 0x800)) if size <= 32 else 0
    im = Image(size, mem_size, base=base, rings_at=rings_at)
    if im.data - base + 0x1000 > mem_size:
        im = Image(size, 0x10000, base=base)
        mem_size = 0x10000
    start = rng.choice((0, 0, rng.randrange(0x10000), 0xFFFF, 0xFFFE))
    im.start_at(start)
    area = im.data
    end = base + mem_size

    def buffer(length: int) -> int:
        nonlocal area
        if area + length > end:
            area = im.data
        addr = area
        area += (length + 15) & ~15
        return addr

    free = list(range(size))
    rng.shuffle(free)
    heads: list[int] = []
    tables: list[int] = []
    while free and len(heads) < size and rng.random() < 0.8:
        n = min(len(free), rng.choice((1, 1, 2, 3, 4)))
        chain = [free.pop() for _ in range(n)]
        writable_from = rng.randrange(n + 1)
        use_table = rng.random() < 0.3
        for j, i in enumerate(chain):
            last = j == n - 1
            if last and use_table:
                entries = rng.randrange(1, min(size, 6) + 1)
                table = buffer(16 * entries)
                tables.append(table)
                w_from = rng.randrange(entries + 1)
                for e in range(entries):
                    length = rng.choice((1, 8, 64, 256))
                    flags = (WRITE if e >= w_from else 0) | (NEXT if e < entries - 1 else 0)
                    im.descriptor(table, e, buffer(length), length, flags, e + 1)
                im.descriptor(im.desc, i, table, 16 * entries, INDIRECT, 0)
            else:
                length = rng.choice((1, 8, 64, 256, 4096))
                flags = (WRITE if j >= writable_from else 0) | (0 if last else NEXT)
                im.descriptor(
                    im.desc, i, buffer(length), length, flags, 0 if last else chain[j + 1]
                )
        heads.append(chain[0])
    im.publish(*heads)
    for _ in range(rng.choice((0, 0, 1, 1, 2, 3))):
        _corrupt(rng, im, tables, end)
    moved: dict[str, int] = {}
    if rng.random() < 0.05:  # a ring part somewhere else: the edges of RAM, GPA 0
        part = rng.choice(("desc", "avail", "used"))
        span = {"desc": spec.desc_table_size, "avail": spec.avail_ring_size}.get(
            part, spec.used_ring_size
        )(size)
        at = rng.choice((end - span, end - span + 2, end - span - 16, base - 16, base, 0))
        moved[part] = at % (1 << 64)
    return im.ring(name, **moved)


def _corrupt(rng: random.Random, im: Image, tables: list[int], end: int) -> None:
    """One driver mistake (or malice) in ``im``."""
    what = rng.randrange(8)
    if what <= 3:  # a field of a descriptor, in the queue's table or an indirect one
        table, entries = im.desc, im.size
        if tables and rng.random() < 0.4:
            table, entries = rng.choice(tables), 4
        index = rng.randrange(entries)
        off = table - im.base + 16 * index
        if not 0 <= off <= len(im.buf) - 16:
            return
        addr, length, flags, nxt = spec.DESC_STRUCT.unpack_from(im.buf, off)
        if what == 0:
            length = rng.choice(_LENGTHS)
        elif what == 1:
            flags ^= rng.choice((NEXT, WRITE, INDIRECT, NEXT | INDIRECT, 0x8))
        elif what == 2:
            nxt = rng.choice((0, rng.randrange(im.size), im.size, im.size + 1, 0xFFFF))
            flags |= NEXT
        else:
            addr = rng.choice((end - 8, end, im.base - 16, (1 << 64) - 8, im.desc, im.data))
        spec.DESC_STRUCT.pack_into(im.buf, off, addr % (1 << 64), length, flags, nxt)
    elif what == 4:  # a head
        slot = rng.randrange(im.size)
        head = rng.choice((0, rng.randrange(im.size), im.size, 0xFFFF))
        im.put(im.avail + 4 + 2 * slot, struct.pack("<H", head))
    elif what == 5:  # avail.idx
        idx = (im.avail_idx + rng.choice((1, 2, im.size, im.size + 1, -1))) & 0xFFFF
        im.put(im.avail + 2, struct.pack("<H", idx))
    elif what == 6:  # the same chain published twice
        first = struct.unpack_from("<H", im.buf, im.avail - im.base + 4)[0]
        im.publish(first)
    else:  # random bytes over the rings
        at = rng.randrange(im.desc, im.used) - im.base
        for k in range(rng.randrange(1, 9)):
            if at + k < len(im.buf):
                im.buf[at + k] = rng.randrange(256)


def mutate(rng: random.Random, ring: Ring, name: str) -> Ring:
    """A corpus ring with a few bytes of its queue's structures (or anywhere) changed."""
    regions = [bytearray(data) for _, data in ring.regions]
    for _ in range(rng.randrange(1, 9)):
        r = rng.randrange(len(regions))
        buf, base = regions[r], ring.regions[r][0]
        targets = [ring.desc, ring.avail, ring.desc + 16 * rng.randrange(max(1, ring.size))]
        at = rng.choice(targets) - base if rng.random() < 0.7 else rng.randrange(len(buf))
        at += rng.randrange(16)
        if 0 <= at < len(buf):
            buf[at] = rng.choice((0, 0xFF, 1, 2, 4, 7, 16, rng.randrange(256)))
    last = ring.last_avail
    if rng.random() < 0.1:
        last = rng.randrange(0x10000)
    return Ring(
        tuple((b, bytes(d)) for (b, _), d in zip(ring.regions, regions, strict=True)),
        ring.size,
        ring.desc,
        ring.avail,
        ring.used,
        last,
        name,
    )


# ============================================================================================
# The fuzz mode: replay corpora, then mutate, through both
# ============================================================================================
@dataclass
class Tally:
    """Counts of a run over many rings."""

    compared: int = 0
    agreed: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    unexplained: list[Json] = field(default_factory=list)

    def add(self, verdict: Verdict, ring: Ring, artifacts: Path | None) -> None:
        self.compared += 1
        if not verdict.kinds and verdict.ok:
            self.agreed += 1
        self.kinds.update(verdict.kinds)
        if not verdict.ok:
            entry: Json = {"ring": ring.name, "why": verdict.unexplained}
            if artifacts is not None:
                artifacts.mkdir(parents=True, exist_ok=True)
                request = ring.request()
                path = artifacts / f"differential-{hashlib.sha1(request).hexdigest()}"
                path.write_bytes(request)
                entry["artifact"] = str(path)
            self.unexplained.append(entry)


def run_fuzz(
    oracle: Oracle,
    corpora: Sequence[Path],
    seconds: float,
    seed: int,
    artifacts: Path | None,
    echo: Callable[[str], None] = lambda _: None,
) -> Json:
    """Replay every ring of ``corpora`` (fuzz corpus roots, or vring_image folders), then
    compare random and mutated rings until ``seconds`` have passed."""
    tally = Tally()
    started = time.monotonic()
    seeds: list[Ring] = []
    for corpus in corpora:
        if (corpus / "vring_image").is_dir() or (corpus / "vring_ops").is_dir():
            rings: Iterator[Ring] = corpus_rings(corpus)
        else:  # a working corpus of `python -m fuzz run vring_image`
            rings = (
                r
                for p in sorted(corpus.glob("*"))
                if p.is_file() and (r := image_ring(p.read_bytes(), p.name)) is not None
            )
        for ring in rings:
            tally.add(check(oracle, ring), ring, artifacts)
            if sum(len(d) for _, d in ring.regions) <= 1 << 20:
                seeds.append(ring)
    replayed = tally.compared
    echo(f"differential: replayed {replayed} corpus rings in {time.monotonic() - started:.1f} s")
    rng = random.Random(seed)
    generated = 0
    deadline = started + seconds
    while time.monotonic() < deadline:
        name = f"seed{seed}-{generated}"
        if seeds and rng.random() < 0.5:
            ring = mutate(rng, rng.choice(seeds), f"{name}-mutated")
        else:
            ring = random_ring(rng, f"{name}-random")
        tally.add(check(oracle, ring), ring, artifacts)
        generated += 1
    return {
        "status": "ran",
        "compared": tally.compared,
        "replayed": replayed,
        "generated": generated,
        "agreed": tally.agreed,
        "kinds": dict(sorted(tally.kinds.items())),
        "unexplained": tally.unexplained,
        "seconds": round(time.monotonic() - started, 2),
        "seed": seed,
        "oracle_requests": oracle.requests,
    }


def _not_run(error: OracleUnavailableError) -> Json:
    where = (
        "installable here: run `make system-deps`"
        if error.installable
        else (f"not packaged for this release; it runs on {BUILDS_ON} (`make test-debian13`)")
    )
    return {"status": "not-run", "reason": f"{error}; {PACKAGE} is {where}"}


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``build``, ``fuzz``, ``reproduce`` (JSON report on stdout)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("build", help="build the oracle (if its source or the crates changed)")
    fuzz = sub.add_parser("fuzz", help="replay corpora, then random and mutated rings")
    fuzz.add_argument("--time", type=float, default=30.0, help="seconds in all (default 30)")
    fuzz.add_argument("--seed", type=int, default=None, help="random seed (default: time)")
    fuzz.add_argument(
        "--corpus",
        action="append",
        type=Path,
        default=[],
        help="a fuzz corpus root (with vring_image/, vring_ops/) or a vring_image working "
        "corpus; repeatable (default: fixtures/corpus)",
    )
    fuzz.add_argument("--artifacts", type=Path, default=None, help="where unexplained rings go")
    reproduce = sub.add_parser("reproduce", help="compare one artifact again")
    reproduce.add_argument("file", type=Path)
    args = parser.parse_args(argv)

    def echo(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    try:
        binary = build_oracle(quiet=False)
    except OracleUnavailableError as exc:
        report = _not_run(exc)
        echo(f"differential: NOT RUN: {report['reason']}")
        print(json.dumps(report))
        return 4
    if args.action == "build":
        print(json.dumps({"status": "built", "binary": str(binary)}))
        return 0
    with Oracle(binary) as oracle:
        if args.action == "reproduce":
            ring = Ring.from_request(args.file.read_bytes(), args.file.name)
            verdict = check(oracle, ring)
            print(
                json.dumps(
                    {
                        "status": "ran",
                        "ring": ring.name,
                        "kinds": verdict.kinds,
                        "unexplained": verdict.unexplained,
                    }
                )
            )
            return 0 if verdict.ok else 3
        seed = args.seed if args.seed is not None else int(time.time()) & 0xFFFFFFFF
        corpora = args.corpus or [ROOT / "fixtures" / "corpus"]
        report = run_fuzz(oracle, corpora, args.time, seed, args.artifacts, echo)
    print(json.dumps(report))
    return 3 if report["unexplained"] else 0


if __name__ == "__main__":
    sys.exit(main())
