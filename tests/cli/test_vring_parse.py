"""``balloonctl vring parse``: the contract of docs/vring-parse.md, driven through main()."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from balloonctl.cli.main import main
from balloonctl.units import PAGE_SIZE
from balloonctl.virtio import spec
from balloonctl.virtio.layout import RingLayout
from balloonctl.virtio.memory import GuestMemory
from balloonctl.virtio.mock import MockDriverQueue, pfn_array, stats_buffer

NEXT = spec.VIRTQ_DESC_F_NEXT
WRITE = spec.VIRTQ_DESC_F_WRITE
INDIRECT = spec.VIRTQ_DESC_F_INDIRECT

Build = Callable[[MockDriverQueue, GuestMemory], None]


def image(tmp_path: Path, size: int, queue_size: int, build: Build) -> tuple[Path, RingLayout]:
    with GuestMemory.simple(size) as mem:
        layout = RingLayout.packed(queue_size)
        build(MockDriverQueue(mem, layout), mem)
        path = tmp_path / "ring.img"
        path.write_bytes(mem.read(0, size))
    return path, layout


def run(
    capsys: pytest.CaptureFixture[str], path: Path, layout: RingLayout, *extra: str
) -> tuple[int, dict[str, Any]]:
    code = main(
        [
            "vring",
            "parse",
            str(path),
            "--queue-size",
            str(layout.size),
            "--desc",
            hex(layout.desc),
            "--avail",
            hex(layout.avail),
            "--used",
            str(layout.used),
            *extra,
        ]
    )
    out = capsys.readouterr().out
    return code, json.loads(out)


def test_parse_pfn_chains(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def build(drv: MockDriverQueue, mem: GuestMemory) -> None:
        mem.write(0x4000, pfn_array([20, 21, 22, 40, 21, 9999]) + b"\x07")
        drv.add_chain([(0x4000, 25, False)])

    path, layout = image(tmp_path, 1 << 20, 16, build)
    code, out = run(capsys, path, layout)
    assert code == 0
    assert out == {
        "chains": [
            {
                "head": 0,
                "descriptors": [{"index": 0, "addr": 0x4000, "len": 25, "flags": 0, "next": 0}],
                "pages": [[20, 3], [40, 1]],
                "rejected": [
                    {
                        "reason": "bad-length",
                        "descriptor": 0,
                        "detail": "1 trailing bytes after 6 PFNs",
                    },
                    {"reason": "duplicate", "descriptor": 0, "first_pfn": 21, "count": 1},
                    {"reason": "out-of-ram", "descriptor": 0, "first_pfn": 9999, "count": 1},
                ],
            }
        ],
        "error": None,
    }


def test_parse_leaves_the_cyclic_collector_as_it_found_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The parse turns the collector off while it runs; main() also runs inside other
    # programs (pytest here), whose later cycles must still be collected.
    def build(drv: MockDriverQueue, mem: GuestMemory) -> None:
        mem.write(0x4000, pfn_array([20, 21]))
        drv.add_chain([(0x4000, 8, False)])

    path, layout = image(tmp_path, 1 << 20, 16, build)
    assert gc.isenabled()
    assert run(capsys, path, layout)[0] == 0
    assert gc.isenabled()


def test_parse_sg_with_indirect_tail_lists_table_entries(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def build(drv: MockDriverQueue, mem: GuestMemory) -> None:
        drv.add_indirect_chain(
            [(0x20000, 2 * PAGE_SIZE, False), (0x30000, PAGE_SIZE, False)],
            table_addr=0x8000,
            direct=[(0x10000, PAGE_SIZE, False)],
        )

    path, layout = image(tmp_path, 1 << 20, 16, build)
    code, out = run(capsys, path, layout, "--decode", "sg")
    assert code == 0
    chains = out["chains"]
    assert [(d["index"], d["addr"]) for d in chains[0]["descriptors"]] == [
        (0, 0x10000),
        (0, 0x20000),
        (1, 0x30000),
    ]
    assert chains[0]["pages"] == [[0x10, 1], [0x20, 2], [0x30, 1]]


def test_parse_stats_names_linux_6_12_tags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    entries = [(spec.StatTag.MEMFREE, 5 * PAGE_SIZE), (99, 1)]
    entries += [(tag, 7 * int(tag)) for tag in spec.EXTENDED_STAT_TAGS]

    def build(drv: MockDriverQueue, mem: GuestMemory) -> None:
        mem.write(0x4000, stats_buffer(entries))
        drv.add_chain([(0x4000, len(entries) * spec.STAT_SIZE, False)])

    path, layout = image(tmp_path, 1 << 20, 16, build)
    code, out = run(capsys, path, layout, "--decode", "stats")
    assert code == 0
    (chain,) = out["chains"]
    assert chain["stats"] == {
        "free-memory": 5 * PAGE_SIZE,
        "tag-99": 1,
        "oom-kills": 70,
        "alloc-stalls": 77,
        "async-scans": 84,
        "direct-scans": 91,
        "async-reclaims": 98,
        "direct-reclaims": 105,
    }
    assert chain["rejected"] == [] and out["error"] is None


def test_parse_stops_at_first_error_with_exit_3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def build(drv: MockDriverQueue, mem: GuestMemory) -> None:
        mem.write(0x4000, pfn_array([30]))
        drv.add_chain([(0x4000, 4, False)])
        drv.write_desc(5, 0x4000, 4, NEXT, 16)  # next beyond a queue of 16
        drv.publish(5)
        drv.add_chain([(0x4000, 4, False)])  # never reached

    path, layout = image(tmp_path, 1 << 20, 16, build)
    code, out = run(capsys, path, layout)
    assert code == 3
    assert len(out["chains"]) == 1
    assert out["error"] == {
        "type": "NextOutOfRange",
        "message": "descriptor 5 of chain 5 has next 16, beyond its table of 16",
        "head": 5,
    }


def test_parse_wrong_direction_is_a_finding(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def build(drv: MockDriverQueue, mem: GuestMemory) -> None:
        drv.add_chain([(0x4000, 4, True)])

    path, layout = image(tmp_path, 1 << 20, 16, build)
    code, out = run(capsys, path, layout)
    assert code == 3
    assert out["error"]["type"] == "WrongDirection"
    code, out = run(capsys, path, layout, "--decode", "none")
    assert code == 0


def test_parse_last_avail_and_base(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = 0x1_0000_0000

    def build(drv: MockDriverQueue, mem: GuestMemory) -> None:
        for pfn in (1, 2, 3):
            addr = 0x4000 + 4 * pfn
            mem.write(addr, pfn_array([(base >> 12) + pfn]))
            drv.add_chain([(base + addr, 4, False)])

    with GuestMemory.simple(1 << 20) as mem:
        layout = RingLayout.packed(16)
        build(MockDriverQueue(mem, layout), mem)
        path = tmp_path / "high.img"
        path.write_bytes(mem.read(0, 1 << 20))
    shifted = RingLayout(16, base + layout.desc, base + layout.avail, base + layout.used)
    code, out = run(capsys, path, shifted, "--base", hex(base), "--last-avail", "1")
    assert code == 0
    assert [c["pages"] for c in out["chains"]] == [
        [[(base >> 12) + 2, 1]],
        [[(base >> 12) + 3, 1]],
    ]


def test_parse_queue_error_before_any_chain(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, layout = image(tmp_path, 1 << 16, 16, lambda d, m: None)
    code, out = run(capsys, path, RingLayout(16, layout.desc + 8, layout.avail, layout.used))
    assert code == 3
    assert out["chains"] == []
    assert out["error"]["type"] == "RingMisaligned"
    assert out["error"]["head"] is None


# x.img does not exist: every case but the first fails on its arguments before reading it.
ARGV = ["vring", "parse", "x.img", "--queue-size", "8", "--desc", "0", "--avail", "0x80"]
USED = ["--used", "0x100"]


@pytest.mark.parametrize(
    "argv",
    [
        [*ARGV, *USED],
        [*ARGV, *USED, "--desc", "0x"],
        [*ARGV, *USED, "--last-avail", "65536"],
        ARGV,
        [*ARGV, *USED, "--decode", "bogus"],
    ],
    ids=["missing-image", "bad-hex", "last-avail-u16", "missing-used", "bad-decode"],
)
def test_usage_errors_exit_2_with_one_line(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        code = main(argv)
        raise SystemExit(code)
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1
    assert "Traceback" not in captured.err


def test_installed_command_has_no_traceback(tmp_path: Path) -> None:
    # The installed console script, in a real process.
    script = Path(sys.executable).parent / "balloonctl"
    assert script.exists(), "balloonctl is not installed beside this interpreter"
    proc = subprocess.run(
        [
            str(script),
            "vring",
            "parse",
            str(tmp_path / "none"),
            "--queue-size",
            "8",
            "--desc",
            "0",
            "--avail",
            "0x80",
            "--used",
            "0x100",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("balloonctl: error: cannot read image")


# --- the largest queue ---------------------------------------------------------------------
N = spec.MAX_QUEUE_SIZE


def big_image(tmp_path: Path, loop: bool) -> tuple[Path, RingLayout]:
    """A 32768-entry queue whose one chain uses every descriptor (or loops through them)."""

    def build(drv: MockDriverQueue, mem: GuestMemory) -> None:
        buf = 0x200000
        # 64 MiB, the contract's largest image: 16384 pages, so PFNs cycle through 8192 of
        # them and three quarters of the chain names pages already named.
        mem.write(buf, pfn_array(0x400 + i % 8192 for i in range(N)))
        entries = [
            (buf + 4 * i, 4, NEXT if (loop or i < N - 1) else 0, (i + 1) % N) for i in range(N)
        ]
        drv.write_table(drv.layout.desc, entries)
        drv.publish(0)

    return image(tmp_path, 64 << 20, N, build)


def test_chain_of_32768_descriptors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, layout = big_image(tmp_path, loop=False)
    code, out = run(capsys, path, layout)
    assert code == 0
    chain = out["chains"][0]
    assert len(chain["descriptors"]) == N
    assert chain["pages"] == [[0x400, 8192]]
    # Rejections are grouped per descriptor, and each descriptor here carries one PFN.
    rejected = chain["rejected"]
    assert {r["reason"] for r in rejected} == {"duplicate"}
    assert sum(r["count"] for r in rejected) == N - 8192
    assert rejected[0] == {
        "reason": "duplicate",
        "descriptor": 8192,
        "first_pfn": 0x400,
        "count": 1,
    }


def test_loop_through_32768_descriptors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, layout = big_image(tmp_path, loop=True)
    code, out = run(capsys, path, layout)
    assert code == 3
    assert out["error"]["type"] == "DescriptorLoop"
    assert out["chains"] == []


def test_fifo_image_is_refused_not_waited_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fifo = tmp_path / "ring.fifo"
    os.mkfifo(fifo)
    code = main([*ARGV[:2], str(fifo), *ARGV[3:], *USED])
    assert code == 2
    assert "not a regular file" in capsys.readouterr().err


def test_non_ascii_digits_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(
            [
                "vring",
                "parse",
                "x.img",
                "--queue-size",
                "\u0663\u0662",
                "--desc",
                "0",
                "--avail",
                "0",
                "--used",
                "0",
            ]
        )
    assert info.value.code == 2
