"""The libvirt backend's guest statistics: libvirt's memoryStats plus tags 10-15 from QEMU.

libvirt (9.0 and 11.3 alike) drops Linux 6.12's six statistics (VIR_DOMAIN_MEMORY_STAT_NR
is 13; qemuMonitorJSONGetMemoryStats reads QEMU's first ten names), so the backend asks QEMU
through the monitor passthrough. These tests run on libvirt's test driver, which has no
passthrough (the honest "not available" path); the QEMU driver's passthrough is played by a
stand-in for ``libvirt_qemu.qemuMonitorCommand`` answering as QEMU 10.0 or 7.2 would.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator, Mapping
from typing import Any

import libvirt
import libvirt_qemu
import pytest

from balloonctl.backends.base import GuestStats
from balloonctl.backends.libvirt import LibvirtBackend
from balloonctl.cli.vm_commands import render_stats, stats_report
from balloonctl.errors import PeerError
from balloonctl.virtio.spec import EXTENDED_STAT_NAMES

URI = "test:///default"
DOMAIN = "test"
#: The test driver's memoryStats: fixed values, last_update included.
TEST_LAST_UPDATE = 627319920
BACKEND = "/machine/peripheral/balloon0/virtio-backend"


def _stats(backend_calls: int = 1) -> list[GuestStats]:
    async def main() -> list[GuestStats]:
        async with LibvirtBackend(DOMAIN, URI) as backend:
            return [await backend.stats() for _ in range(backend_calls)]

    return asyncio.run(main())


class FakeMonitor:
    """``qemuMonitorCommand`` for the test domain: x-query-virtio and qom-get guest-stats,
    as QEMU answers them (hw/virtio/virtio-balloon.c balloon_stats_get_all)."""

    def __init__(self, stats: dict[str, int], last_updates: list[int]) -> None:
        self.stats = stats
        self.last_updates = last_updates
        self.sent: list[dict[str, Any]] = []

    def __call__(self, dom: object, text: str, flags: int) -> str:
        message = json.loads(text)
        self.sent.append(message)
        if message["execute"] == "x-query-virtio":
            reply: object = [{"name": "virtio-balloon", "path": BACKEND}]
        elif message["execute"] == "qom-get":
            assert message["arguments"] == {
                "path": "/machine/peripheral/balloon0",
                "property": "guest-stats",
            }
            last = self.last_updates.pop(0) if len(self.last_updates) > 1 else self.last_updates[0]
            reply = {"stats": dict(self.stats), "last-update": last}
        else:
            return json.dumps({"error": {"class": "CommandNotFound", "desc": "no"}})
        return json.dumps({"return": reply})

    def count(self, command: str) -> int:
        return sum(1 for m in self.sent if m["execute"] == command)


QEMU_10_TEN = {
    "stat-swap-in": 0,
    "stat-swap-out": 0,
    "stat-major-faults": 0,
    "stat-minor-faults": 0,
    "stat-free-memory": 1 << 30,
    "stat-total-memory": 2 << 30,
    "stat-available-memory": 1 << 30,
    "stat-disk-caches": 256 << 20,
    "stat-htlb-pgalloc": 0,
    "stat-htlb-pgfail": 0,
}
LINUX_6_12_SIX = {
    "stat-oom-kills": 1,
    "stat-alloc-stalls": 12,
    "stat-async-scans": 40 << 20,
    "stat-direct-scans": 8 << 20,
    "stat-async-reclaims": 36 << 20,
    "stat-direct-reclaims": 6 << 20,
}


@pytest.fixture
def monitor(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeMonitor]:
    fake = FakeMonitor({**QEMU_10_TEN, **LINUX_6_12_SIX}, [TEST_LAST_UPDATE])
    monkeypatch.setattr(libvirt_qemu, "qemuMonitorCommand", fake)
    yield fake


def test_without_passthrough_the_six_are_unavailable_with_the_reason() -> None:
    (reading,) = _stats()
    # libvirt's own statistics are all there, in bytes ...
    assert reading.stats["total-memory"] == 2097152 * 1024
    assert reading.last_update == TEST_LAST_UPDATE
    # ... and the six are absent, not zero, each with why.
    assert not set(EXTENDED_STAT_NAMES) & set(reading.stats)
    assert list(reading.unavailable) == list(EXTENDED_STAT_NAMES)
    why = reading.unavailable["oom-kills"]
    assert "memoryStats has no such statistic" in why
    assert "(TEST) cannot pass QMP through" in why
    # The CLI says it once, below the table; --json carries it.
    report = stats_report(DOMAIN, reading)
    assert report["unavailable"] == reading.unavailable
    text = render_stats(report)
    (line,) = [line for line in text.splitlines() if line.startswith("not available")]
    assert line.startswith("not available: oom-kills, alloc-stalls, async-scans, direct-scans")
    assert why in line


def test_qemu_10_passthrough_adds_the_six_to_libvirts_ten(monitor: FakeMonitor) -> None:
    (reading,) = _stats()
    assert {name: reading.stats[name] for name in EXTENDED_STAT_NAMES} == {
        "oom-kills": 1,
        "alloc-stalls": 12,
        "async-scans": 40 << 20,
        "direct-scans": 8 << 20,
        "async-reclaims": 36 << 20,
        "direct-reclaims": 6 << 20,
    }
    # The ten stay libvirt's (the test driver's 1 GiB free, not the fake QEMU's).
    assert reading.stats["free-memory"] == 1048576 * 1024
    assert reading.unavailable == {}
    assert "unavailable" not in stats_report(DOMAIN, reading)


def test_an_older_guest_on_qemu_10_shows_nothing_for_them(monitor: FakeMonitor) -> None:
    monitor.stats = {**QEMU_10_TEN, **dict.fromkeys(LINUX_6_12_SIX, -1)}
    first, second = _stats(2)
    for reading in (first, second):
        assert not set(EXTENDED_STAT_NAMES) & set(reading.stats)
        assert reading.unavailable == {}  # nothing hidden: the guest has none to give
    assert monitor.count("qom-get") == 2  # QEMU names them: the guest may start sending


def test_qemu_7_2_is_asked_once_per_connection(monitor: FakeMonitor) -> None:
    monitor.stats = dict(QEMU_10_TEN)  # 7.2's balloon_stat_names: ten, no -1 placeholders
    readings = _stats(3)
    for reading in readings:
        assert not set(EXTENDED_STAT_NAMES) & set(reading.stats)
        assert reading.unavailable == {}
        assert reading.stats["total-memory"] == 2097152 * 1024
    assert monitor.count("qom-get") == 1


def test_a_reading_that_moved_between_the_two_reads_leaves_the_six_out(
    monitor: FakeMonitor,
) -> None:
    # QEMU's reading is newer than libvirt's, and stays so when libvirt is asked again.
    monitor.last_updates = [TEST_LAST_UPDATE + 2]
    (reading,) = _stats()
    assert not set(EXTENDED_STAT_NAMES) & set(reading.stats)
    assert reading.last_update == TEST_LAST_UPDATE
    assert reading.stats["total-memory"] == 2097152 * 1024


def test_a_newer_reading_is_taken_from_both_sides(
    monitor: FakeMonitor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A guest update reached QEMU between memoryStats and guest-stats: memoryStats is read
    again, and all sixteen come from that one newer reading."""
    answers = [
        {"available": 2097152, "unused": 1048576, "last_update": 1000},
        {"available": 2097152, "unused": 524288, "last_update": 1002},
    ]

    async def memory_stats(self: LibvirtBackend) -> Mapping[str, int]:
        return answers.pop(0)

    monkeypatch.setattr(LibvirtBackend, "_memory_stats", memory_stats)
    monitor.last_updates = [1002]
    (reading,) = _stats()
    assert answers == []  # read twice
    assert reading.last_update == 1002
    assert reading.stats["free-memory"] == 524288 * 1024
    assert reading.stats["oom-kills"] == 1


def test_malformed_qemu_statistics_are_a_peer_error(monitor: FakeMonitor) -> None:
    monitor.stats = {**QEMU_10_TEN, "stat-oom-kills": "many"}  # type: ignore[dict-item]
    with pytest.raises(PeerError, match="stat-oom-kills"):
        _stats()


@pytest.mark.parametrize(("version", "asked"), [(7_002_022, False), (10_000_013, True)])
def test_a_qemu_driver_older_than_9_2_is_not_asked_at_all(
    monitor: FakeMonitor, monkeypatch: pytest.MonkeyPatch, version: int, asked: bool
) -> None:
    """libvirt's QEMU driver names the QEMU it runs: before 9.2 there is nothing to ask for,
    and every passthrough would taint the domain ("custom-monitor") for nothing."""
    # The test driver's connection, dressed as the QEMU driver's.
    monkeypatch.setattr(libvirt.virConnect, "getType", lambda self: "QEMU")
    monkeypatch.setattr(libvirt.virConnect, "getVersion", lambda self: version)
    monitor.stats = dict(QEMU_10_TEN)
    (reading,) = _stats()
    assert (monitor.count("qom-get") > 0) is asked
    assert not set(EXTENDED_STAT_NAMES) & set(reading.stats)
    assert reading.unavailable == {}
