"""Faults on a real QEMU: the VM killed mid-command, the QMP connection cut and restored.

``set --wait`` must end with exit 1 and one line saying what was reached when QEMU dies
under it, and must ride out a dropped connection (queries are idempotent: reconnect and ask
again) without sending ``balloon`` twice.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import threading
import time
from pathlib import Path

from fixtures.guest import GiB, Guest, MiB
from tests.support.cli import json_out, popen_cli, run_cli
from tests.support.guests import CLI_TIMEOUT, actual, wait_for


def test_qemu_killed_during_set_wait_reports_what_was_reached(real_vm: Guest) -> None:
    assert real_vm.pid is not None
    proc = popen_cli("--json", "set", str(real_vm.qmp_path), "128M", "--wait", "--timeout", "60")
    # Kill QEMU once the balloon is on its way (somewhere between 2 GiB and the target).
    wait_for(lambda: actual(real_vm) < 2 * GiB - 64 * MiB, 60, "the inflate to start")
    os.kill(real_vm.pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=CLI_TIMEOUT)
    assert proc.returncode == 1, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "reached" in lines[0] and "of 128 MiB" in lines[0], lines[0]
    report = json.loads(out)
    assert report["reached"] is False
    # What it says was reached is a reading taken while the inflate ran.
    assert 128 * MiB < report["actual_bytes"] < 2 * GiB


class DroppingProxy:
    """A unix-socket relay in front of QEMU's QMP socket that cuts the first connection
    ``delay`` seconds after the client sent ``balloon``; later connections pass through.

    This is the network fault a management tool meets when a socket is reset: QEMU itself
    notices only a client going away, and accepts the next one.
    """

    def __init__(self, upstream: Path, listen: Path, delay: float = 0.3) -> None:
        self.upstream = upstream
        self.listen = listen
        self.delay = delay
        self.connections = 0
        self.balloon_commands = 0
        self.dropped = threading.Event()
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(listen))
        self._server.listen(4)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self._server], [], [], 0.1)
            if not ready:
                continue
            client, _ = self._server.accept()
            self.connections += 1
            first = self.connections == 1
            threading.Thread(target=self._relay, args=(client, first), daemon=True).start()

    def _relay(self, client: socket.socket, may_drop: bool) -> None:
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        upstream.connect(str(self.upstream))
        drop_at: float | None = None
        try:
            while not self._stop.is_set():
                if drop_at is not None and time.monotonic() >= drop_at:
                    self.dropped.set()
                    return
                ready, _, _ = select.select([client, upstream], [], [], 0.02)
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    if sock is client:
                        if b'"balloon"' in data:
                            self.balloon_commands += 1
                            if may_drop and drop_at is None:
                                drop_at = time.monotonic() + self.delay
                        upstream.sendall(data)
                        if drop_at is not None and self.delay == 0:
                            self.dropped.set()  # before any reply can come back
                            return
                    else:
                        client.sendall(data)
        except OSError:
            return
        finally:
            # shutdown first: close alone would leave the peer's reads hanging while the
            # other relay thread still holds the descriptor.
            for sock in (client, upstream):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._server.close()


def test_set_wait_rides_out_a_dropped_qmp_connection(real_vm: Guest) -> None:
    proxy_path = real_vm.tmpdir / "proxy.sock"
    proxy = DroppingProxy(real_vm.qmp_path, proxy_path)
    try:
        result = run_cli("--json", "set", str(proxy_path), "1G", "--wait", timeout=CLI_TIMEOUT)
    finally:
        proxy.close()
    assert proxy.dropped.is_set(), "the proxy never cut the connection"
    assert proxy.connections >= 2, "the CLI did not reconnect"
    assert proxy.balloon_commands == 1, "balloon must never be resent after a drop"
    assert result.returncode == 0, result.stderr
    report = json_out(result)
    assert report["reached"] is True
    assert actual(real_vm) == 1 * GiB


def test_a_dropped_connection_during_balloon_itself_is_not_retried(real_vm: Guest) -> None:
    """Cut right after ``balloon`` reaches QEMU, before its reply: the outcome is unknown to
    the CLI, so it says so (exit 1) rather than guessing or sending it again."""
    proxy_path = real_vm.tmpdir / "proxy0.sock"
    proxy = DroppingProxy(real_vm.qmp_path, proxy_path, delay=0.0)
    try:
        result = run_cli("set", str(proxy_path), "1G", "--wait", timeout=CLI_TIMEOUT)
    finally:
        proxy.close()
    assert proxy.dropped.is_set()
    assert proxy.balloon_commands == 1
    assert proxy.connections == 1, "nothing may be resent after the cut"
    assert result.returncode == 1, result.stderr
    line = result.stderr.strip()
    assert "\n" not in line and "during balloon" in line and "unknown" in line, line
    # Really unknown: QEMU drops the queued requests of a client that hangs up before the
    # main loop dispatched them (monitor/qmp.c, CHR_EVENT_CLOSED ->
    # monitor_qmp_cleanup_queue_and_resume), so the balloon may or may not have been taken.
    # Either way the VM is fine and answers a new client.
    assert real_vm.driver_ok()


def test_qemu_gone_before_the_command_is_one_line_exit_1(real_vm: Guest) -> None:
    path = str(real_vm.qmp_path)
    real_vm.close()
    result = run_cli("status", path)
    assert result.returncode == 1
    line = result.stderr.strip()
    assert "\n" not in line and line.startswith("balloonctl: error: cannot reach VM"), line


def test_stats_watch_ends_cleanly_when_qemu_quits(real_vm: Guest) -> None:
    watch = popen_cli("--json", "stats", str(real_vm.qmp_path), "--watch", "--period", "1")
    assert watch.stdout is not None
    first = watch.stdout.readline()
    assert json.loads(first)["stats"]["total-memory"] > 0
    real_vm.execute("quit")
    _out, err = watch.communicate(timeout=60)
    assert watch.returncode == 1, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
