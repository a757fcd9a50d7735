"""The libvirt backend and the CLI's -c URI on a real libvirtd running a real guest (TCG).

Every reading is checked against an independent witness: ``virsh`` (dommemstat, dumpxml)
or QEMU itself through ``virsh qemu-monitor-command`` (query-balloon, pmemsave).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from balloonctl.backends.libvirt import LibvirtBackend, normalize_stats
from balloonctl.virtio.spec import EXTENDED_STAT_NAMES
from fixtures.guest import build_image, reports_extended_stats
from fixtures.libvirtd import BALLOON_BACKEND, Domain, Libvirtd
from tests.support.cli import one_line_error
from tests.support.libvirt import cli

MiB = 1 << 20
GiB = 1 << 30


def _json(args: list[str]) -> dict[str, object]:
    result = cli(*args)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert isinstance(report, dict)
    return report


def test_status_by_name_and_by_uuid(libvirtd: Libvirtd, domain: Domain) -> None:
    by_name = _json(["-c", libvirtd.uri, "--json", "status", domain.name])
    by_uuid = _json(["-c", libvirtd.uri, "--json", "status", domain.uuid])
    assert by_name["vm"] == domain.name and by_uuid["vm"] == domain.uuid
    actual = domain.dommemstat()["actual"] * 1024
    for report in (by_name, by_uuid):
        assert report["max_bytes"] == 2 * GiB
        assert report["actual_bytes"] == actual
        features = report["features"]
        assert isinstance(features, dict) and features["profile"] == "virtio-1.2"


def test_unknown_domain_is_one_line_exit_1(libvirtd: Libvirtd) -> None:
    result = cli("-c", libvirtd.uri, "status", "no-such-domain")
    assert result.returncode == 1
    line = one_line_error(result.stderr)
    assert "no libvirt domain 'no-such-domain'" in line


def test_unreachable_libvirt_is_one_line_exit_1(libvirtd: Libvirtd) -> None:
    uri = f"qemu+unix:///session?socket={libvirtd.root}/nothing-here"
    result = cli("-c", uri, "status", "bctl-lv1")
    assert result.returncode == 1
    assert "cannot connect to libvirt" in one_line_error(result.stderr)


def test_set_wait_inflate_and_deflate_agree_with_libvirt_and_qemu(
    libvirtd: Libvirtd, domain: Domain
) -> None:
    for size, expected in (("1G", GiB), ("2G", 2 * GiB)):
        report = _json(["-c", libvirtd.uri, "--json", "set", domain.name, size, "--wait"])
        assert report["reached"] is True
        assert report["target_bytes"] == expected
        assert report["actual_bytes"] == expected
        assert domain.dommemstat()["actual"] == expected // 1024
        assert domain.qmp("query-balloon") == {"actual": expected}


def test_stats_in_bytes_agree_with_dommemstat(libvirtd: Libvirtd, domain: Domain) -> None:
    # The guest refreshes every 2 s: compare two readings of the same guest update.
    deadline = time.monotonic() + 30
    while True:
        before = domain.dommemstat()
        report = _json(["-c", libvirtd.uri, "--json", "stats", domain.name])
        after = domain.dommemstat()
        if before["last_update"] == report["last_update"] == after["last_update"]:
            break
        assert time.monotonic() < deadline, "no two readings of one guest update in 30 s"
    stats = report["stats"]
    assert isinstance(stats, dict)
    assert stats["total-memory"] == after["available"] * 1024
    assert stats["available-memory"] == after["usable"] * 1024
    assert stats["free-memory"] == after["unused"] * 1024
    assert stats["disk-caches"] == after["disk_caches"] * 1024
    assert stats["swap-in"] == after["swap_in"] * 1024
    assert stats["minor-faults"] == after["minor_fault"]
    assert stats["major-faults"] == after["major_fault"]
    assert "actual" not in stats and "rss" not in stats
    assert 0 < stats["free-memory"] < stats["total-memory"] <= 2 * GiB
    # libvirt (9.0 and 11.3 alike) reads only the ten classic statistics
    # (qemu_monitor_json.c); the six of Linux 6.12 come from QEMU's guest-stats through the
    # monitor passthrough, on a stack whose kernel sends them and whose QEMU names them.
    extended = reports_extended_stats(build_image().kernel_release, domain.qmp("query-version"))
    assert not any("oom" in key or "reclaim" in key or "stall" in key for key in after), after
    if extended:
        assert set(EXTENDED_STAT_NAMES) <= set(stats), stats
        assert stats["oom-kills"] == 0  # a fresh guest has killed nothing
    else:
        assert not set(EXTENDED_STAT_NAMES) & set(stats), stats


def test_normalize_stats_names_and_units() -> None:
    got = normalize_stats({"actual": 5, "available": 2, "usable": 3, "unused": 1, "rss": 9})
    assert got.stats == {"total-memory": 2048, "available-memory": 3072, "free-memory": 1024}
    assert got.last_update == 0


def test_stats_period_is_set_and_read_from_the_live_xml(libvirtd: Libvirtd, domain: Domain) -> None:
    try:
        _json(["-c", libvirtd.uri, "--json", "stats", domain.name, "--period", "3"])
        assert "<stats period='3'/>" in libvirtd.virsh("dumpxml", domain.name)

        async def period() -> int:
            async with LibvirtBackend(domain.name, libvirtd.uri) as backend:
                return await backend.stats_period()

        assert asyncio.run(period()) == 3
    finally:
        libvirtd.virsh("dommemstat", domain.name, "--period", "2", "--live")
    assert "<stats period='2'/>" in libvirtd.virsh("dumpxml", domain.name)


def test_features_through_monitor_passthrough(libvirtd: Libvirtd, domain: Domain) -> None:
    report = _json(["-c", libvirtd.uri, "--json", "features", domain.name])
    assert report["profile"] == "virtio-1.2"
    offered, acked = set(report["offered"]), set(report["acked"])  # type: ignore[call-overload]
    assert {"deflate-on-oom", "page-reporting", "stats-vq", "version-1"} <= offered
    assert {"deflate-on-oom", "page-reporting", "stats-vq", "version-1"} <= acked
    assert report["sg"] == {"offered": False, "acked": False}
    assert "sg" not in offered
    human = cli("-c", libvirtd.uri, "features", domain.name)
    assert human.returncode == 0
    assert "SG does not exist on this device" in human.stdout


def test_balloon_change_events_reach_watch_actual(libvirtd: Libvirtd, domain: Domain) -> None:
    target = 1536 * MiB

    async def watch() -> list[int]:
        seen: list[int] = []
        async with LibvirtBackend(domain.name, libvirtd.uri) as backend:
            async with backend.watch_actual() as values:
                await backend.set_target(target)
                async with asyncio.timeout(60):
                    async for value in values:
                        seen.append(value)
                        if value == target:
                            break
            await backend.set_target(2 * GiB)
            async with asyncio.timeout(60):
                while await backend.actual() != 2 * GiB:
                    await asyncio.sleep(0.05)
        return seen

    seen = asyncio.run(watch())
    assert seen[-1] == target
    assert all(target <= v <= 2 * GiB for v in seen)


def test_latest_gives_the_newest_balloon_change_without_waiting(
    libvirtd: Libvirtd, domain: Domain
) -> None:
    target = 1792 * MiB

    async def watch() -> tuple[int | None, list[int]]:
        newest: list[int] = []
        async with LibvirtBackend(domain.name, libvirtd.uri) as backend:
            async with backend.watch_actual() as values:
                first = values.latest()  # nothing has happened: None, at once
                await backend.set_target(target)
                async with asyncio.timeout(60):
                    while not newest or newest[-1] != target:
                        await asyncio.sleep(0.1)
                        value = values.latest()
                        if value is not None:
                            newest.append(value)
            await backend.set_target(2 * GiB)
            async with asyncio.timeout(60):
                while await backend.actual() != 2 * GiB:
                    await asyncio.sleep(0.05)
        return first, newest

    first, newest = asyncio.run(watch())
    assert first is None
    assert newest[-1] == target
    assert all(target <= v <= 2 * GiB for v in newest)


def test_list_shows_running_domains_with_a_balloon(libvirtd: Libvirtd, domain: Domain) -> None:
    report = _json(["-c", libvirtd.uri, "--json", "list"])
    rows = [r for r in report["vms"] if r["vm"] == domain.name]  # type: ignore[attr-defined]
    assert len(rows) == 1
    assert rows[0]["uuid"] == domain.uuid
    assert rows[0]["state"] == "running"
    assert rows[0]["max_bytes"] == 2 * GiB
    assert rows[0]["address"] == libvirtd.uri


def test_guest_memory_peek_matches_pmemsave(libvirtd: Libvirtd, domain: Domain) -> None:
    """memoryPeek (64 KiB chunks) returns the bytes QEMU's own pmemsave writes."""
    dump = libvirtd.root / "guests" / domain.name / "pmem.bin"

    def pmemsave(gpa: int, size: int) -> bytes:
        domain.qmp("pmemsave", {"val": gpa, "size": size, "filename": str(dump)})
        data = Path(dump).read_bytes()
        os.unlink(dump)
        return data

    async def read() -> tuple[dict[str, object], bytes, bytes]:
        async with LibvirtBackend(domain.name, libvirtd.uri) as backend:
            queue = await backend.monitor(
                "x-query-virtio-queue-status", {"path": BALLOON_BACKEND, "queue": 0}
            )
            assert isinstance(queue, dict)
            desc = await backend.read_guest_memory(queue["vring-desc"], 16 * queue["vring-num"])
            # The kernel's text: static, and more than one 64 KiB peek.
            text = await backend.read_guest_memory(16 * MiB, 200_000)
        return queue, desc, text

    queue, desc, text = asyncio.run(read())
    # QEMU 7.2 gives the inflate queue 128 entries, QEMU 10 1024.
    assert queue["vring-num"] == queue["vring-num-default"] in (128, 1024), queue
    size = 16 * int(queue["vring-num"])  # type: ignore[call-overload]
    assert len(desc) == size
    assert desc == pmemsave(int(queue["vring-desc"]), size)  # type: ignore[call-overload]
    assert text == pmemsave(16 * MiB, 200_000)
    assert any(text)


def test_test_driver_says_it_has_no_passthrough() -> None:
    result = cli("-c", "test:///default", "features", "test")
    assert result.returncode == 1
    line = one_line_error(result.stderr)
    assert "cannot pass QMP commands through" in line
    assert "(TEST)" in line


def test_renegotiate_through_libvirt(libvirtd: Libvirtd, domain: Domain) -> None:
    """Replug without page-reporting, prove libvirt still drives the new balloon, put it back."""
    off = cli(
        "-c",
        libvirtd.uri,
        "--json",
        "negotiate",
        domain.name,
        "--disable",
        "page-reporting",
        "--yes",
    )
    assert off.returncode == 0, off.stderr
    report = json.loads(off.stdout)
    assert "page-reporting" not in report["offered"]
    assert "page-reporting" not in report["acked"]
    assert "deflate-on-oom" in report["acked"] and report["driver_ok"] is True
    assert "live XML still shows the old <memballoon> attributes" in off.stderr
    # The replacement answers QEMU directly ...
    status = domain.qmp("x-query-virtio-status", {"path": BALLOON_BACKEND})
    assert not any("REPORTING" in f for f in status["host-features"]["dev-features"])
    # ... and libvirt drives it: setMemory, memoryStats with fresh guest readings.
    moved = _json(["-c", libvirtd.uri, "--json", "set", domain.name, "1536M", "--wait"])
    assert moved["reached"] is True
    assert domain.dommemstat()["actual"] == 1536 * 1024
    first = domain.dommemstat()["last_update"]
    deadline = time.monotonic() + 30
    while domain.dommemstat()["last_update"] == first:
        assert time.monotonic() < deadline, "stats stopped after the replug"
        time.sleep(0.2)

    on = cli(
        "-c",
        libvirtd.uri,
        "--json",
        "negotiate",
        domain.name,
        "--enable",
        "page-reporting",
        "--yes",
    )
    assert on.returncode == 0, on.stderr
    back = json.loads(on.stdout)
    assert "page-reporting" in back["acked"]
    assert _json(["-c", libvirtd.uri, "--json", "set", domain.name, "2G", "--wait"])["reached"]


def test_status_of_a_socket_never_imports_libvirt(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            "-m",
            "balloonctl",
            "status",
            str(tmp_path / "x.sock"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    modules = [line.split("|")[-1].strip() for line in proc.stderr.splitlines() if "|" in line]
    assert "balloonctl.cli.vm_commands" in modules
    assert not [m for m in modules if m.split(".")[0] in ("libvirt", "libvirtaio", "libvirt_qemu")]
    assert "balloonctl.backends.libvirt" not in modules


def test_vring_dump_of_a_libvirt_domain_reads_the_real_stats_buffer(
    libvirtd: Libvirtd, domain: Domain
) -> None:
    """vring dump through libvirt: ring addresses by passthrough, bytes by memoryPeek."""
    result = cli("-c", libvirtd.uri, "vring", "dump", domain.name, "--queue", "stats")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["error"] is None
    assert report["queue"]["name"] == "stats" and report["queue"]["decode"] == "stats"
    assert report["read_bytes"] > 0
    # The <stats period='2'/> domain keeps one stats buffer in flight at the device.
    assert report["queue"]["in_flight"] == 1
    (chain,) = report["chains"]
    # MemTotal does not move: the driver's buffer says what libvirt reports as "available".
    assert chain["stats"]["total-memory"] == domain.dommemstat()["available"] * 1024
