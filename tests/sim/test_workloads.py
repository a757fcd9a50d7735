"""Workloads are pure functions of time; the simulated guest chases them with real pages."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from balloonctl.guest.allocator import PageState
from balloonctl.sim.guest import GuestSpec, SimGuest
from balloonctl.sim.workloads import WORKLOADS, demand
from balloonctl.vmcmds import Progress

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
