"""``balloonctl bench vring-parse``: the worst legal rings, against the 2 s / 512 MB goal.

``vring parse`` promises any image of up to 64 MiB with any queue size up to 32768 in under
2 s and 512 MB (docs/vring-parse.md, "Bounds"). This builds the inputs that come closest,
each a 64 MiB image with a 32768-entry queue, writes them to a temporary directory, and
runs ``balloonctl vring parse`` on each in a child process, as a user would: the wall time
is the whole process's, start-up included, and the peak memory is the child's own (its
VmHWM: ``ru_maxrss`` would also count the bench's own memory at the fork).

The images (:data:`WORST_CASES`) are the issue's two (32768 chains of 256 scattered PFNs,
in RAM and out of it), Cloud Hypervisor's two balloon fuzz findings (one descriptor as long
as memory allows; millions of PFNs in one request through indirect tables), SG chunks, and
the three hostile images of the earlier review. ``fixtures/make_ring_image.py
--worst-case KIND`` writes any of them to a file.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from balloonctl.units import format_size
from balloonctl.virtio import spec
from balloonctl.virtio.layout import RingLayout

#: The goals: any legal image of up to 64 MiB, any queue size up to 32768.
GOAL_SECONDS: Final = 2.0
GOAL_RSS: Final = 512 << 20
WORST_MEMORY: Final = 64 << 20
WORST_QUEUE: Final = spec.MAX_QUEUE_SIZE
#: Where the buffers the worst cases name start: after the rings of a 32768-entry queue.
_DATA: Final = 1 << 20
_PFNS: Final = spec.PFNS_PER_BUFFER_MAX
_NEXT, _IND = spec.VIRTQ_DESC_F_NEXT, spec.VIRTQ_DESC_F_INDIRECT
#: A descriptor (2.7.5) as numpy lays out a table of them: spec.DESC_STRUCT, vectorised.
_DESC: Final = np.dtype([("addr", "<u8"), ("len", "<u4"), ("flags", "<u2"), ("next", "<u2")])

#: The worst cases, by name, and how ``vring parse`` reads each.
WORST_CASES: Final = {
    # The first image: 32768 chains, each a 256-PFN array of non-adjacent RAM pages.
    "scattered-ram": "pfn",
    # Its second: the same, 256 distinct non-adjacent PFNs each, all outside RAM.
    "scattered-out": "pfn",
    # Cloud Hypervisor's first balloon fuzz finding (a 4 GiB descriptor, a billion PFNs):
    # every chain one descriptor as long as guest memory allows, 16 M PFNs.
    "huge-descriptor": "pfn",
    # SG chunks: 32768 chains of one 4 KiB chunk, non-adjacent, every third unaligned.
    "sg-chunks": "sg",
    # Cloud Hypervisor's second (8 M PFNs in one request): chains whose indirect tables of
    # 32768 entries each name the same 256 out-of-RAM PFNs, as many chains as fit.
    "indirect-pfns": "pfn",
    # The same tables read as SG: 32768 overlapping 64 KiB chunks per chain.
    "indirect-sg": "sg",
    # The earlier review's hostile images (tests/cli/test_vring_parse_hostile.py): every
    # entry of the ring naming one chain with a 32768-entry indirect table ...
    "review-shared-table": "pfn",
    # ... one chain whose 32768 indirect entries each name 256 scattered out-of-RAM PFNs ...
    "review-scattered": "pfn",
    # ... and 16384 chains of two overlapping 32 MiB SG chunks.
    "review-overlapping-sg": "sg",
}


@dataclass(frozen=True)
class WorstCase:
    """An image and the ``vring parse`` arguments that read it."""

    image: bytes
    layout: RingLayout
    decode: str

    def args(self, path: str) -> list[str]:
        """``vring parse`` arguments for the image saved at ``path``."""
        return [
            "vring",
            "parse",
            path,
            "--queue-size",
            str(self.layout.size),
            "--desc",
            hex(self.layout.desc),
            "--avail",
            hex(self.layout.avail),
            "--used",
            hex(self.layout.used),
            "--decode",
            self.decode,
        ]


def worst_case(kind: str, queue_size: int = WORST_QUEUE, memory: int = WORST_MEMORY) -> WorstCase:
    """One of :data:`WORST_CASES`, built with numpy (a 64 MiB image in a fraction of a
    second). A smaller ``queue_size`` and ``memory`` give the same shape at a scale that
    quick tests and the fuzz corpus can hold."""
    if kind not in WORST_CASES:
        raise ValueError(f"no worst case {kind!r} (known: {', '.join(WORST_CASES)})")
    n = queue_size
    layout = RingLayout.packed(n)
    data = -(-max(layout.end, min(_DATA, memory // 2)) // 4096) * 4096
    img = np.zeros(memory, dtype=np.uint8)
    desc = np.zeros(n, dtype=_DESC)
    pages = memory // 4096
    heads = np.arange(n)
    if kind in ("scattered-ram", "scattered-out"):
        # Each chain its own array while they fit; PFNs two apart, so none adjacent.
        arrays = min(n, (memory - data) // (4 * _PFNS))
        k = np.arange(arrays * _PFNS, dtype=np.int64)
        pfns = 2 * (k % (pages // 2)) if kind == "scattered-ram" else pages + 0x1000 + 2 * k
        _put(img, data, pfns.astype("<u4"))
        desc["addr"] = data + 4 * _PFNS * (heads % arrays)
        desc["len"] = 4 * _PFNS
    elif kind == "huge-descriptor":
        desc["addr"] = data
        desc["len"] = min(memory - data, 0xFFFFFFFF) & ~3
    elif kind == "sg-chunks":
        desc["addr"] = data + 8192 * (heads % ((memory - data) // 8192))
        desc["len"] = 4096
        desc["addr"][2::3] += 0x800
    elif kind == "review-overlapping-sg":
        half = n // 2
        desc["addr"][1::2] = memory // 4
        desc["len"] = memory // 2
        desc["flags"][0::2] = _NEXT
        desc["next"][0::2] = heads[1::2]
        heads = heads[0::2][:half]
    else:
        # Indirect tables of n entries each, back to back after one PFN array.
        array = data
        _put(img, array, (pages + 0x1000 + 2 * np.arange(_PFNS)).astype("<u4"))
        tables = array + 4096
        entry = np.zeros(n, dtype=_DESC)
        if kind == "indirect-sg":
            entry["addr"] = (heads % 16) * 4096
            entry["len"] = 0x10000
        else:
            entry["addr"] = array
            entry["len"] = 4 * _PFNS if kind != "review-shared-table" else 4
        entry["flags"] = _NEXT
        entry["flags"][-1] = 0
        entry["next"] = (heads + 1) % n
        raw = entry.view(np.uint8)
        count = 1 if kind.startswith("review-") else min(n, (memory - tables) // raw.size)
        for c in range(count):
            _put(img, tables + c * raw.size, raw)
        desc["addr"][:count] = tables + raw.size * np.arange(count)
        desc["len"][:count] = raw.size
        desc["flags"][:count] = _IND
        # The shared table: every ring entry names chain 0, so its table is in flight twice.
        heads = np.zeros(n, dtype=np.int64) if kind == "review-shared-table" else heads[:count]
    _put(img, layout.desc, desc)
    _put(img, layout.avail + spec.AVAIL_RING_OFF, heads.astype("<u2"))
    _put(img, layout.avail + spec.AVAIL_IDX_OFF, np.array([heads.size & 0xFFFF], dtype="<u2"))
    return WorstCase(img.tobytes(), layout, WORST_CASES[kind])


def _put(img: np.ndarray[Any, np.dtype[np.uint8]], at: int, values: np.ndarray[Any, Any]) -> None:
    raw = values.view(np.uint8).reshape(-1)
    img[at : at + raw.size] = raw


#: A run still going after this long is killed and reported as missing the goal: the
#: unbounded images would otherwise hold the bench for minutes.
TIMEOUT_SECONDS: Final = 30.0


@dataclass(frozen=True)
class Run:
    """One ``vring parse`` child: its wall time, peak RSS, exit code and output size."""

    seconds: float
    max_rss: int
    exit_code: int
    output_bytes: int
    timed_out: bool = False


#: The child: ``balloonctl ARGS`` in-process, then its own peak RSS on stderr. The kernel's
#: ``ru_maxrss`` of a child also counts what the parent had mapped when it forked (the
#: pytest process, or this bench holding a 64 MiB image); VmHWM is the child's own
#: address space's high-water mark, from its exec on.
_CHILD: Final = """
import os, sys
from balloonctl.cli.main import main
try:
    code = main(sys.argv[1:])
finally:
    sys.stdout.flush()
    with open("/proc/self/status") as status:
        hwm = [line for line in status if line.startswith("VmHWM:")]
    os.write(2, ("\\n" + "".join(hwm)).encode())
sys.exit(code)
"""


def parse_in_child(
    args: list[str],
    out_path: str,
    timeout: float = TIMEOUT_SECONDS,
    program: tuple[str, ...] = (sys.executable, "-c", _CHILD),
) -> Run:
    """``balloonctl ARGS`` in a child process, stdout to ``out_path``: its wall time and
    its own peak RSS (VmHWM, else the ``ru_maxrss`` that ``wait4`` gives)."""
    with open(out_path, "wb") as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        child = subprocess.Popen([*program, *args], stdout=out, stderr=err)
        timer = threading.Timer(timeout, child.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(child.pid, 0)
        finally:
            timer.cancel()
        seconds = time.perf_counter() - start
        child.returncode = code = os.waitstatus_to_exitcode(status)
        err.seek(0)
        hwm = [
            line for line in err.read().decode(errors="replace").splitlines() if "VmHWM:" in line
        ]
    # Both in KiB on Linux.
    rss = int(hwm[-1].split()[1]) if hwm else usage.ru_maxrss
    return Run(seconds, rss * 1024, code, os.path.getsize(out_path), seconds >= timeout)


def run(
    kinds: list[str] | None = None,
    repeat: int = 3,
    queue_size: int = WORST_QUEUE,
    memory: int = WORST_MEMORY,
    timeout: float = TIMEOUT_SECONDS,
) -> dict[str, Any]:
    """Build each image, parse it ``repeat`` times; the report (what ``--json`` prints).
    An image whose run times out is not run again."""
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-vring-parse-") as tmp:
        for kind in kinds or list(WORST_CASES):
            case = worst_case(kind, queue_size, memory)
            path = os.path.join(tmp, f"{kind}.img")
            with open(path, "wb") as f:
                f.write(case.image)
            runs: list[Run] = []
            while len(runs) < repeat and not (runs and runs[-1].timed_out):
                out = os.path.join(tmp, "out.json")
                runs.append(parse_in_child(case.args(path), out, timeout))
            os.unlink(path)
            seconds = [r.seconds for r in runs]
            rss = max(r.max_rss for r in runs)
            results[kind] = {
                "args": case.args(f"{kind}.img"),
                "exit_codes": sorted({r.exit_code for r in runs}),
                "output_bytes": runs[-1].output_bytes,
                "seconds": [round(s, 3) for s in seconds],
                "median_s": round(statistics.median(seconds), 3),
                "max_rss_bytes": rss,
                "timed_out": any(r.timed_out for r in runs),
                "meets_goal": max(seconds) < GOAL_SECONDS and rss < GOAL_RSS,
            }
    return {
        "benchmark": "vring-parse",
        "memory_bytes": memory,
        "queue_size": queue_size,
        "repeat": repeat,
        "goal_seconds": GOAL_SECONDS,
        "goal_rss_bytes": GOAL_RSS,
        "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "images": results,
    }


def format_report(report: dict[str, Any]) -> str:
    """A table for people: one line per image, the goal met or not."""
    lines = [
        f"vring-parse: {format_size(report['memory_bytes'])} images, queue size "
        f"{report['queue_size']}, {report['repeat']} runs each in a child process; goal "
        f"< {report['goal_seconds']:g} s and < {format_size(report['goal_rss_bytes'])} "
        f"(load average {report['load_average'][0]} on {report['cpus']} CPUs)",
        f"{'image':<24}{'exit':>7}{'median s':>10}{'max s':>8}{'peak RSS':>12}{'JSON':>12}  goal",
    ]
    for kind, r in report["images"].items():
        codes = "killed" if r["timed_out"] else ",".join(str(c) for c in r["exit_codes"])
        lines.append(
            f"{kind:<24}{codes:>7}{r['median_s']:>10.2f}{max(r['seconds']):>8.2f}"
            f"{format_size(r['max_rss_bytes']):>12}{format_size(r['output_bytes']):>12}  "
            + ("met" if r["meets_goal"] else "MISSED")
        )
    return "\n".join(lines) + "\n"


__all__ = [
    "WORST_CASES",
    "Run",
    "WorstCase",
    "format_report",
    "parse_in_child",
    "run",
    "worst_case",
]
