"""Faults on a real libvirtd: a domain destroyed or shut down mid-command, libvirtd restarted.

Each fault ends in a defined way: exit 1 with one line saying what was reached, or
ConnectionLost followed by a working reconnect for queries. The balloon is kept from its
target by a tmpfs the guest fills first, so the fault always lands while the wait is on
(no race with a fast inflate). A libvirtd that stops answering (SIGSTOP, or a socket that
accepts and never speaks) fails the command in bounded time instead of hanging it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from balloonctl.backends.libvirt import LibvirtBackend
from balloonctl.errors import ConnectionLost, OperationTimeout, VmUnreachable
from fixtures.libvirtd import Domain, Libvirtd
from tests.support.cli import one_line_error, run_cli

MiB = 1 << 20
GiB = 1 << 30
#: Guard against a hang (a failure, not a measured time): far above any honest run.
HANG_GUARD_S = 120.0


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


# --------------------------------------------------------------------------------------------
# A libvirtd that accepts and never answers hung every command for good
# --------------------------------------------------------------------------------------------


@pytest.fixture
def silent_libvirtd(run_dir: Path) -> Iterator[str]:
    """A unix socket that accepts connections and never says a word: a stopped libvirtd
    (its listening socket still queues connections). Yields its qemu+unix URI."""
    path = run_dir / "libvirt-sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError, OSError):
                held.append(server.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"qemu+unix:///session?socket={path}"
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()


@pytest.mark.parametrize(
    "command", [["status", "web01"], ["list"], ["vring", "dump", "web01", "--queue", "stats"]]
)
def test_silent_libvirtd_fails_the_command_instead_of_hanging(
    silent_libvirtd: str, command: list[str]
) -> None:
    """libvirt.open has no timeout: balloonctl waited for the handshake forever."""
    result = run_cli("-c", silent_libvirtd, *command, timeout=HANG_GUARD_S)
    assert result.returncode == 1 and result.stdout == ""
    assert "did not answer" in one_line_error(result.stderr)


def test_close_after_a_timed_out_call_does_not_wait_for_a_stuck_libvirtd(
    libvirtd: Libvirtd,
    domain: Domain,
) -> None:
    """A call timed out (libvirtd stopped mid-session), then close() queued behind that
    call on the libvirt thread and never returned: the command never printed its error."""
    pid = libvirtd.daemon_pid
    assert pid is not None

    async def main() -> None:
        backend = LibvirtBackend(domain.name, libvirtd.uri, command_timeout=2.0)
        async with asyncio.timeout(HANG_GUARD_S):  # a hang guard, not a measurement
            await backend.__aenter__()
            assert await backend.actual() > 0
            os.kill(pid, signal.SIGSTOP)
            try:
                with pytest.raises(OperationTimeout):
                    await backend.actual()
                await backend.close()
            finally:
                os.kill(pid, signal.SIGCONT)

    asyncio.run(main())
    # libvirtd serves again, and a new backend works.

    async def again() -> int:
        async with LibvirtBackend(domain.name, libvirtd.uri) as backend:
            return await backend.actual()

    assert asyncio.run(again()) > 0
