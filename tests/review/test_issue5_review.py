"""Regressions found by a hostile review of issue 5 (libvirt backend, vring dump, bench real).

Each test pins one bug: the symptom a user met, reproduced the way a user meets it (the CLI
as a process, a real private libvirtd where libvirt matters).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from balloonctl.backends.libvirt import LibvirtBackend
from balloonctl.errors import OperationTimeout
from balloonctl.virtio import spec
from balloonctl.virtio.mock import RingLayout, stats_buffer
from fixtures.libvirtd import Domain, Libvirtd
from tests.backends.hostile_peer import Hang, HostilePeer, Script
from tests.backends.libvirt.conftest import domain, libvirtd  # noqa: F401 (pytest fixtures)
from tests.cli.conftest import balloonctl_argv, cli_env, one_line_error, run_cli
from tests.cli.test_vring_dump import BUFFERS, RING_BASE, FakeVm

#: Guard against a hang (a failure, not a measured time): far above any honest run.
HANG_GUARD_S = 120.0


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path (sun_path holds 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="bctl-rv-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# SIGTERM during vring dump left guest memory in the temporary directory
# --------------------------------------------------------------------------------------------


class _SlowPmemsave(FakeVm):
    """Writes the pmemsave file as QEMU does, then never answers (a slow or stuck QEMU)."""

    def do_pmemsave(self, args: Mapping[str, object]) -> Script:
        super().do_pmemsave(args)
        return [Hang()]


def test_sigterm_during_vring_dump_removes_the_pmemsave_file(short_dir: Path) -> None:
    """Python's default SIGTERM skipped every ``finally``: the private directory and its
    file of guest memory stayed behind in $TMPDIR (`timeout`, systemd, a script's kill)."""
    vm = _SlowPmemsave()
    stats = vm.queue(2, RingLayout.packed(128, RING_BASE), last_avail=1)
    vm.mem.write(BUFFERS, stats_buffer([(spec.StatTag.MEMTOT, 1 << 30)]))
    stats.add_chain([(BUFFERS, spec.STAT_SIZE, False)])
    tmp = short_dir / "tmp"
    tmp.mkdir()
    sock = short_dir / "qemu.sock"

    async def main() -> tuple[int, str, list[str]]:
        async with HostilePeer(sock, vm) as peer:
            proc = await asyncio.create_subprocess_exec(
                *balloonctl_argv("vring", "dump", str(sock), "--queue", "stats"),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=cli_env({"TMPDIR": str(tmp)}),
            )
            async with asyncio.timeout(HANG_GUARD_S):
                while not peer.count("pmemsave"):  # the file is written when it is logged
                    await asyncio.sleep(0.02)
            written = [str(p.relative_to(tmp)) for p in tmp.rglob("*")]
            proc.send_signal(signal.SIGTERM)
            _, err = await asyncio.wait_for(proc.communicate(), HANG_GUARD_S)
            assert proc.returncode is not None
            assert written, "the dump wrote no pmemsave file where TMPDIR says"
            return proc.returncode, err.decode(), [p.name for p in tmp.iterdir()]

    code, err, left = asyncio.run(main())
    assert code == 128 + signal.SIGTERM, err
    assert "Traceback" not in err, err
    assert left == []


# --------------------------------------------------------------------------------------------
# stdout closed (`balloonctl ... >&-`)
# --------------------------------------------------------------------------------------------


def test_closed_stdout_is_a_one_line_error_not_a_traceback(short_dir: Path) -> None:
    """With fd 1 closed, sys.stdout is None: the report's write was an AttributeError
    traceback, after the command had acted (here: a libvirt balloon target set)."""
    proc = subprocess.run(
        [*balloonctl_argv("-c", "test:///default", "--json", "set", "test", "1G")],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
        timeout=HANG_GUARD_S,
        check=False,
        preexec_fn=lambda: os.close(1),
    )
    assert proc.returncode == 1
    assert "standard output is closed" in one_line_error(proc.stderr)


# --------------------------------------------------------------------------------------------
# A libvirtd that accepts and never answers hung every command for good
# --------------------------------------------------------------------------------------------


@pytest.fixture
def silent_libvirtd(short_dir: Path) -> Iterator[str]:
    """A unix socket that accepts connections and never says a word: a stopped libvirtd
    (its listening socket still queues connections). Yields its qemu+unix URI."""
    path = short_dir / "libvirt-sock"
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
    libvirtd: Libvirtd,  # noqa: F811 (the fixture)
    domain: Domain,  # noqa: F811 (the fixture)
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
