"""Faults on a real libvirtd: a domain destroyed or shut down mid-command, libvirtd restarted.

Each fault ends in a defined way: exit 1 with one line saying what was reached, or
ConnectionLost followed by a working reconnect for queries. The balloon is kept from its
target by a tmpfs the guest fills first, so the fault always lands while the wait is on
(no race with a fast inflate).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import pytest

from balloonctl.backends.libvirt import LibvirtBackend
from balloonctl.errors import ConnectionLost, VmUnreachable
from fixtures.libvirtd import Domain, Libvirtd
from tests.cli.conftest import one_line_error

MiB = 1 << 20
GiB = 1 << 30


def _stuck_set(libvirtd: Libvirtd, dom: Domain) -> subprocess.Popen[str]:
    """``set DOM 256M --wait`` on a guest holding 1200 MiB: it cannot get there."""
    status, out = dom.channel().run(
        "mount -t tmpfs -o size=1300m none /mnt && dd if=/dev/zero of=/mnt/f bs=1M count=1200",
        timeout=120,
    )
    assert status == 0, out
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "balloonctl",
            "-c",
            libvirtd.uri,
            "--json",
            "set",
            dom.name,
            "256M",
            "--wait",
            "--timeout",
            "300",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    # The inflate is under way (set was sent) before the fault is injected.
    deadline = time.monotonic() + 60
    while dom.dommemstat()["actual"] > 1800 * 1024:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the balloon never started inflating"
        time.sleep(0.1)
    return proc


def _ends_with_what_was_reached(proc: subprocess.Popen[str]) -> None:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    line = one_line_error(err)
    assert "reached" in line and "of 256 MiB" in line
    report = json.loads(out)
    assert report["reached"] is False
    assert 256 * MiB < report["actual_bytes"] < 1800 * MiB


def test_domain_destroyed_during_set_wait(libvirtd: Libvirtd) -> None:
    dom = libvirtd.boot("bctl-victim1")
    proc = _stuck_set(libvirtd, dom)
    libvirtd.virsh("destroy", dom.name)
    _ends_with_what_was_reached(proc)


def test_domain_shut_down_mid_command(libvirtd: Libvirtd) -> None:
    dom = libvirtd.boot("bctl-victim2")
    proc = _stuck_set(libvirtd, dom)
    # The guest powers itself off (on_poweroff: destroy): QEMU exits, libvirt sees shutdown.
    status, _ = dom.channel().run("(sleep 0.2; poweroff -f) >/dev/null 2>&1 &")
    assert status == 0
    _ends_with_what_was_reached(proc)
    assert not libvirtd.is_running(dom.name)


def test_libvirtd_restart_ends_watches_and_queries_reconnect(
    libvirtd: Libvirtd, domain: Domain
) -> None:
    """A restart drops the connection: a watch ends with ConnectionLost (its events of the gap
    are lost), queries reconnect by themselves, and the domain keeps running."""

    async def scenario() -> tuple[int, int]:
        async with LibvirtBackend(domain.name, libvirtd.uri) as backend:
            before = await backend.actual()
            async with backend.watch_actual() as values:
                # From this (the main) thread: libvirtd's parent-death signal follows the
                # thread that started it. Blocking the loop meanwhile is fine: the close
                # is noticed on libvirt's own thread and handed over when the loop resumes.
                libvirtd.restart()
                with pytest.raises(ConnectionLost) as lost:
                    async with asyncio.timeout(60):
                        async for _ in values:
                            pass
                assert "\n" not in str(lost.value)
            after = await backend.actual()  # a query: reconnects on its own
        return before, after

    before, after = asyncio.run(scenario())
    assert before == after == domain.dommemstat()["actual"] * 1024
    assert libvirtd.is_running(domain.name)


def test_libvirtd_down_is_unreachable_then_back(libvirtd: Libvirtd, domain: Domain) -> None:
    async def attempt() -> int:
        async with LibvirtBackend(domain.name, libvirtd.uri, connect_timeout=1.0) as backend:
            return await backend.actual()

    libvirtd.stop_daemon()
    try:
        with pytest.raises(VmUnreachable) as err:
            asyncio.run(attempt())
        assert "cannot connect to libvirt" in str(err.value)
        assert "\n" not in str(err.value)
    finally:
        libvirtd.restart()
    assert asyncio.run(attempt()) == domain.dommemstat()["actual"] * 1024
