"""Workloads are pure functions of time; the simulated guest chases them with real pages."""

from __future__ import annotations

import dataclasses
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from balloonctl.cli.vm_commands import Progress
from balloonctl.guest.allocator import PageState
from balloonctl.sim.guest import GuestSpec, SimGuest, Watermarks, watermarks
from balloonctl.sim.workloads import WORKLOADS, demand

MiB = 1 << 20
RAM = 1 << 30


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_every_workload_stays_inside_ram(name: str) -> None:
    for t in range(0, 300):
        want = demand(name, float(t), RAM)
        assert want.anon > 0 and want.cache >= 0
        assert want.anon + want.cache <= RAM


def test_workloads_move_as_documented() -> None:
    assert demand("idle", 0, RAM) == demand("idle", 1000, RAM)
    assert demand("spiky", 26, RAM).anon > 3 * demand("spiky", 10, RAM).anon
    assert demand("leak", 50, RAM).anon > demand("leak", 10, RAM).anon
    assert demand("leak", 10_000, RAM).anon == int(RAM * 0.95)
    assert demand("cache", 20, RAM).cache > demand("cache", 0, RAM).cache
    assert demand("cache", 20, RAM).anon == demand("cache", 0, RAM).anon


def test_the_guest_takes_real_pages_and_gives_them_back() -> None:
    clock = [0.0]
    guest = SimGuest(GuestSpec(memory=256 * MiB, workload="spiky"), lambda: clock[0])
    try:
        guest.step()
        low = guest.allocator.count(PageState.USED)
        clock[0] = 26.0
        guest.step()
        high = guest.allocator.count(PageState.USED)
        assert high > 2 * low
        assert high == guest.anon.size + guest.cache.size
        clock[0] = 31.0
        guest.step()
        assert guest.allocator.count(PageState.USED) == low
    finally:
        guest.close()


def test_cache_is_reclaimed_before_the_oom_path() -> None:
    clock = [0.0]
    guest = SimGuest(GuestSpec(memory=64 * MiB, workload="cache", kernel=8 * MiB), lambda: clock[0])
    try:
        clock[0] = 30.0
        guest.step()  # 15% anon, 60% cache
        cache = guest.cache.size
        assert cache > 0
        # Something takes every free page (as a balloon would): the guest still fits its
        # programs by dropping cache, without an OOM kill.
        guest.allocator.allocate(guest.free_pages(), PageState.BALLOON)
        guest._set_anon(int(guest.anon.size) + 1000)
        assert guest.oom_kills == 0
        assert guest.cache.size < cache
        info = guest.meminfo(0, False)
        assert info["available"] == info["free"] + info["cache"]
        # Counted as Linux counts it: one allocation stalled in direct reclaim, which
        # scanned and reclaimed exactly the cache that went; kswapd did nothing.
        events = guest.events
        assert events.allocstall == 1
        assert events.pgscan_direct == events.pgsteal_direct == cache - guest.cache.size
        assert events.pgscan_kswapd == events.pgsteal_kswapd == 0
    finally:
        guest.close()


def test_watermarks_are_linuxs_defaults() -> None:
    # min_free_kbytes = int_sqrt(KiB * 16); low/high min + max(min/4, 0.1% of RAM) (x2).
    assert watermarks((256 * MiB) >> 12) == Watermarks(min=512, low=640, high=768)
    assert watermarks((2 << 30) >> 12) == Watermarks(min=1448, low=1972, high=2496)
    assert watermarks((1 * MiB) >> 12) == Watermarks(min=32, low=40, high=48)  # 128 KiB floor
    assert watermarks((1 << 44) >> 12).min == (262144 * 1024) >> 12  # 256 MiB ceiling


def test_kswapd_reclaims_cache_up_to_the_high_watermark() -> None:
    clock = [30.0]
    guest = SimGuest(GuestSpec(memory=64 * MiB, workload="cache", kernel=8 * MiB), lambda: clock[0])
    try:
        guest.step()  # 15% anon, 60% cache: above the watermarks, kswapd sleeps
        assert guest.events.pgscan_kswapd == 0
        cache = int(guest.cache.size)
        # A balloon takes all but a few free pages: below the low watermark.
        marks = guest.watermarks
        guest.allocator.allocate(guest.free_pages() - marks.low // 2, PageState.BALLOON)
        guest.wake_kswapd()
        guest.step()
        assert guest.free_pages() == marks.high
        reclaimed = cache - int(guest.cache.size)
        assert reclaimed == marks.high - marks.low // 2
        assert guest.events.pgscan_kswapd == guest.events.pgsteal_kswapd == reclaimed
        # Background reclaim: nobody stalled, nothing direct.
        assert guest.events.allocstall == guest.events.pgscan_direct == 0
        # The workload still wants that cache: it reads it back into the free pages, which
        # leaves free memory below low again, and kswapd trims it again (streaming reads
        # under pressure: the counters keep growing, which is what they are for).
        guest.step()
        assert guest.free_pages() == marks.high
        assert guest.events.pgsteal_kswapd == 2 * reclaimed
        assert guest.events.allocstall == 0
    finally:
        guest.close()


def test_oom_kill_counted_when_neither_reclaim_nor_notifier_helps() -> None:
    guest = SimGuest(GuestSpec(memory=64 * MiB, workload="idle", kernel=8 * MiB), lambda: 0.0)
    try:
        guest.step()
        guest._drop_cache(int(guest.cache.size))  # nothing left to reclaim
        guest.allocator.allocate(guest.free_pages(), PageState.BALLOON)
        asked = []

        def notifier() -> int:  # a notifier with nothing to give
            asked.append(1)
            return 0

        guest.oom_notifier = notifier
        guest._set_anon(int(guest.anon.size) + 10)
        assert asked == [1]
        assert guest.events.allocstall == 1  # it still tried direct reclaim first
        assert guest.events.pgscan_direct == 0
        assert guest.oom_kills == guest.events.oom_kill == 1
    finally:
        guest.close()


def test_counters_only_grow_under_a_leak() -> None:
    clock = [0.0]
    guest = SimGuest(GuestSpec(memory=64 * MiB, workload="leak", kernel=8 * MiB), lambda: clock[0])
    try:
        before = dataclasses.astuple(guest.events)
        for t in range(0, 120, 2):
            clock[0] = float(t)
            guest.step()
            now = dataclasses.astuple(guest.events)
            assert all(b <= a for b, a in zip(before, now, strict=True)), (t, before, now)
            before = now
        # 95% wanted of a guest whose kernel holds 12.5%: it ends in the OOM killer, after
        # direct reclaim took what cache there was.
        assert guest.events.oom_kill > 0
        assert guest.events.allocstall >= guest.events.oom_kill
        assert guest.events.pgsteal_direct + guest.events.pgsteal_kswapd > 0
    finally:
        guest.close()


def test_progress_bar_only_on_a_terminal() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    piped, tty = io.StringIO(), Tty()
    for stream in (piped, tty):
        bar = Progress(2 << 30, 1 << 30, stream)
        bar.update(1536 << 20)
        bar.update(1 << 30)
        bar.finish()
    assert piped.getvalue() == ""
    assert "50%" in tty.getvalue() and "100%" in tty.getvalue()
    assert tty.getvalue().endswith("\n")


def test_one_process_serves_many_vms(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "balloonctl",
            "sim",
            "--qmp-dir",
            str(tmp_path),
            "--count",
            "4",
            "--memory",
            "128M",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while len(list(tmp_path.glob("vm*.sock"))) < 4:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        out = subprocess.run(
            [sys.executable, "-m", "balloonctl", "--json", "list", "--qmp-dir", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        vms = json.loads(out.stdout)["vms"]
        assert [v["vm"] for v in vms] == ["vm0", "vm1", "vm2", "vm3"]
        assert all(v["state"] == "running" and v["max_bytes"] == 128 * MiB for v in vms)
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) == 0
    # SIGTERM stops every VM and removes the sockets it made.
    assert list(tmp_path.glob("vm*.sock")) == []
