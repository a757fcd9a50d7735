"""Hostile ring images that once cost ``vring parse`` minutes or gigabytes (found in
review): each now ends quickly, with the right outcome. Timing is not asserted; the
outcome and the bounded output are."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from balloonctl.cli.main import main
from balloonctl.virtio import spec

D = spec.DESC_STRUCT
NEXT, IND = spec.VIRTQ_DESC_F_NEXT, spec.VIRTQ_DESC_F_INDIRECT
N = 32768
MEM = 64 << 20
AVAIL = 16 * N
USED = (AVAIL + 6 + 2 * N + 3) & ~3
TABLE = 1 << 20


def publish(img: bytearray, heads: list[int]) -> None:
    for i, h in enumerate(heads):
        struct.pack_into("<H", img, AVAIL + 4 + 2 * (i % N), h)
    struct.pack_into("<H", img, AVAIL + 2, len(heads) & 0xFFFF)


def parse(
    tmp_path: Path, img: bytearray, decode: str, capsys: pytest.CaptureFixture[str]
) -> tuple[int, dict[str, Any]]:
    path = tmp_path / "hostile.img"
    path.write_bytes(img)
    code = main(
        [
            "vring",
            "parse",
            str(path),
            "--queue-size",
            str(N),
            "--desc",
            "0",
            "--avail",
            hex(AVAIL),
            "--used",
            hex(USED),
            "--decode",
            decode,
        ]
    )
    return code, json.loads(capsys.readouterr().out)


def test_every_chain_sharing_one_indirect_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 32768 available entries, all descriptor 0, whose indirect table has 32768 entries:
    # N*N descriptors if walked. Tables of chains in flight cannot overlap: chain 2 fails.
    img = bytearray(MEM)
    D.pack_into(img, 0, TABLE, 16 * N, IND, 0)
    for i in range(N):
        D.pack_into(img, TABLE + 16 * i, 0x800000, 4, NEXT if i < N - 1 else 0, i + 1)
    publish(img, [0] * N)
    code, out = parse(tmp_path, img, "pfn", capsys)
    assert code == 3
    assert out["error"]["type"] == "IndirectTableInvalid"
    assert "still in flight" in out["error"]["message"]
    assert len(out["chains"]) == 1


def test_millions_of_scattered_rejections_are_summarised(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # One chain: 32768 indirect entries, each the same 256 out-of-RAM, non-adjacent PFNs.
    img = bytearray(MEM)
    arr = 0x900000
    for k in range(256):
        struct.pack_into("<I", img, arr + 4 * k, 0x100000 + 2 * k)
    D.pack_into(img, 0, TABLE, 16 * N, IND, 0)
    for i in range(N):
        D.pack_into(img, TABLE + 16 * i, arr, 1024, NEXT if i < N - 1 else 0, i + 1)
    publish(img, [0])
    code, out = parse(tmp_path, img, "pfn", capsys)
    assert code == 0
    rejected = out["chains"][0]["rejected"]
    listed = [r for r in rejected if "first_pfn" in r]
    summaries = [r for r in rejected if "first_pfn" not in r]
    assert len(listed) == 256
    assert summaries and summaries[0]["reason"] == "out-of-ram"
    assert sum(r["count"] for r in rejected) == N * 256  # every page still counted


def test_overlapping_sg_chunks_are_not_expanded_page_by_page(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 16384 chains of two overlapping 32 MiB chunks: once 16384 expansions of 16K pages.
    img = bytearray(MEM)
    for c in range(N // 2):
        D.pack_into(img, 32 * c, 0, 32 << 20, NEXT, 2 * c + 1)
        D.pack_into(img, 32 * c + 16, 16 << 20, 32 << 20, 0, 0)
    publish(img, [2 * c for c in range(N // 2)])
    code, out = parse(tmp_path, img, "sg", capsys)
    assert code == 0
    assert len(out["chains"]) == N // 2
    first = out["chains"][0]
    assert first["pages"] == [[0, 12288]]
    assert first["rejected"] == [
        {"reason": "duplicate", "descriptor": 1, "first_pfn": 4096, "count": 4096}
    ]
