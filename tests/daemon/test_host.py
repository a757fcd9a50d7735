"""Reading the host's memory: /proc/meminfo and /proc/pressure/memory, as text and as files."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from balloonctl.daemon.config import HostConfig
from balloonctl.daemon.host import parse_meminfo, parse_psi, read_host
from balloonctl.daemon.policy import HostState
from balloonctl.errors import BalloonError, HostReadError

#: The head of a real /proc/meminfo (Linux 6.1).
MEMINFO = """\
MemTotal:       16318480 kB
MemFree:         1218012 kB
MemAvailable:    9727764 kB
Buffers:          652548 kB
Cached:          7838060 kB
SwapCached:            0 kB
"""

PSI = """\
some avg10=1.53 avg60=0.87 avg300=0.25 total=1234567
full avg10=0.40 avg60=0.10 avg300=0.02 total=45678
"""


def test_parse_meminfo_real() -> None:
    assert parse_meminfo(MEMINFO) == (16318480 * 1024, 9727764 * 1024)


def test_parse_meminfo_any_order_and_spacing() -> None:
    text = "Foo: 1 kB\nMemAvailable:\t2 kB\nno colon here\n\nMemTotal:3 kB\n"
    assert parse_meminfo(text) == (3 * 1024, 2 * 1024)


def test_parse_meminfo_available_equal_to_total() -> None:
    assert parse_meminfo("MemTotal: 5 kB\nMemAvailable: 5 kB\n") == (5120, 5120)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no MemTotal line"),
        ("MemTotal: 100 kB\n", "no MemAvailable line"),
        ("MemAvailable: 100 kB\n", "no MemTotal line"),
        ("memtotal: 100 kB\nmemavailable: 1 kB\n", "no MemTotal line"),
        ("MemTotal: lots kB\nMemAvailable: 1 kB\n", "MemTotal is not a number: 'lots kB'"),
        ("MemTotal: 100 kB\nMemAvailable:\n", "MemAvailable is not a number: ''"),
        ("MemTotal: 100 kB\nMemAvailable: -5 kB\n", "MemAvailable is not a number"),
        ("MemTotal: 100 kB\nMemAvailable: 1.5 kB\n", "MemAvailable is not a number"),
        ("MemTotal: 0x10 kB\nMemAvailable: 1 kB\n", "MemTotal is not a number"),
        ("MemTotal: 100 kB\nMemAvailable: 200 kB\n", "MemAvailable 204800 with MemTotal 102400"),
        ("MemTotal: 0 kB\nMemAvailable: 0 kB\n", "MemAvailable 0 with MemTotal 0"),
        ("MemTotal: \u00b2 kB\nMemAvailable: 1 kB\n", "MemTotal is not a number"),
        ("MemTotal: \u0663 kB\nMemAvailable: 1 kB\n", "MemTotal is not a number"),
        ("\x00\xff\x00" * 100, "no MemTotal line"),
    ],
)
def test_parse_meminfo_refuses(text: str, message: str) -> None:
    with pytest.raises(HostReadError) as info:
        parse_meminfo(text)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, BalloonError)


def test_parse_psi_real() -> None:
    assert parse_psi(PSI) == pytest.approx(1.53)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n", 0.0),
        ("some avg10=100.00 avg60=0.00\n", 100.0),
        ("full avg10=9.00\nsome avg60=1.00 avg10=4.50\n", 4.5),  # order of fields and lines
        ("", None),
        ("full avg10=9.00 avg60=0.00 avg300=0.00 total=0\n", None),
        ("some avg60=1.00 avg300=0.00\n", None),
        ("some avg10=lots\n", None),
        ("some avg10=\n", None),
        ("some avg10=-1.00\n", None),
        ("some avg10=100.01\n", None),
        ("some avg10=nan\n", None),
        ("some avg10=inf\n", None),
        ("something avg10=5.00\n", None),
        ("\x00\xff garbage\n", None),
    ],
)
def test_parse_psi(text: str, expected: float | None) -> None:
    value = parse_psi(text)
    if expected is None:
        assert value is None
    else:
        assert value is not None and math.isclose(value, expected)


def _host(tmp_path: Path, meminfo: str | bytes | None, psi: str | bytes | None) -> HostConfig:
    paths = {"meminfo": tmp_path / "meminfo", "psi": tmp_path / "psi"}
    for key, content in (("meminfo", meminfo), ("psi", psi)):
        if isinstance(content, str):
            paths[key].write_text(content)
        elif isinstance(content, bytes):
            paths[key].write_bytes(content)
    return HostConfig(meminfo=str(paths["meminfo"]), psi=str(paths["psi"]))


def test_read_host(tmp_path: Path) -> None:
    assert read_host(_host(tmp_path, MEMINFO, PSI)) == HostState(
        16318480 * 1024, 9727764 * 1024, 1.53
    )


@pytest.mark.parametrize(
    "psi", [None, "", "garbage", b"\xff\xfe\x00", "some avg10=250.00\n"], ids=repr
)
def test_read_host_without_usable_psi(tmp_path: Path, psi: str | bytes | None) -> None:
    host = read_host(_host(tmp_path, MEMINFO, psi))
    assert host.psi_some_avg10 is None
    assert (host.total, host.available) == (16318480 * 1024, 9727764 * 1024)


def test_read_host_psi_path_is_a_directory(tmp_path: Path) -> None:
    cfg = _host(tmp_path, MEMINFO, None)
    Path(cfg.psi).mkdir()
    assert read_host(cfg).psi_some_avg10 is None


def test_read_host_missing_meminfo(tmp_path: Path) -> None:
    with pytest.raises(HostReadError, match=r"cannot read .*meminfo: No such file"):
        read_host(_host(tmp_path, None, PSI))


def test_read_host_meminfo_is_a_directory(tmp_path: Path) -> None:
    cfg = _host(tmp_path, None, PSI)
    Path(cfg.meminfo).mkdir()
    with pytest.raises(HostReadError, match="cannot read"):
        read_host(cfg)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\xff\xfe\xfd\x00\x01" * 1000,
        "MemTotal: \u0661\u0660\u0660 kB\nMemAvailable: 1 kB\n".encode(),
        b"MemTotal: 100 kB\nMemAvailable: 101 kB\n",
    ],
    ids=["empty", "binary", "non-ascii digits", "available > total"],
)
def test_read_host_garbage_meminfo(tmp_path: Path, content: bytes) -> None:
    with pytest.raises(HostReadError):
        read_host(_host(tmp_path, content, PSI))


def test_read_host_reads_a_bounded_amount(tmp_path: Path) -> None:
    # A meminfo path pointed at something endless must not hang or eat memory.
    cfg = HostConfig(meminfo="/dev/zero", psi=str(tmp_path / "none"))
    with pytest.raises(HostReadError, match="no MemTotal line"):
        read_host(cfg)
