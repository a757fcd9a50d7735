"""balloonctl.daemon.sdnotify against real AF_UNIX datagram sockets standing in for systemd.

Each test binds the socket systemd would (a path, or an abstract ``@`` name), points
``NOTIFY_SOCKET`` at it and reads what :class:`Notifier` sent, byte for byte.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from balloonctl.daemon.sdnotify import MAX_STATUS_BYTES, Notifier


def _receiver(address: str | bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5)
    return sock


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "notify")
    assert len(os.fsencode(path)) < 108, f"tmp_path too long for a unix socket: {path}"
    with _receiver(path) as sock:
        yield path, sock


@pytest.fixture
def abstract_socket() -> Iterator[tuple[str, socket.socket]]:
    name = f"balloonctl-test-{os.getpid()}-{secrets.token_hex(8)}"
    with _receiver("\0" + name) as sock:
        yield "@" + name, sock


@pytest.fixture
def notifier(path_socket: tuple[str, socket.socket]) -> Iterator[Notifier]:
    n = Notifier.from_env({"NOTIFY_SOCKET": path_socket[0]})
    yield n
    n.close()


def _recv(sock: socket.socket) -> bytes:
    return sock.recv(8192)


# --- messages ------------------------------------------------------------------------------


def test_path_socket_receives_ready_with_status(
    path_socket: tuple[str, socket.socket], notifier: Notifier
) -> None:
    assert notifier.enabled
    assert notifier.ready("3 VMs, host calm") is True
    assert _recv(path_socket[1]) == b"READY=1\nSTATUS=3 VMs, host calm"


def test_abstract_socket_receives_messages(abstract_socket: tuple[str, socket.socket]) -> None:
    address, sock = abstract_socket
    n = Notifier.from_env({"NOTIFY_SOCKET": address})
    try:
        assert n.enabled
        assert n.ready() is True
        assert _recv(sock) == b"READY=1"
        assert n.watchdog() is True
        assert _recv(sock) == b"WATCHDOG=1"
    finally:
        n.close()


def test_each_message_kind(path_socket: tuple[str, socket.socket], notifier: Notifier) -> None:
    sock = path_socket[1]
    assert notifier.status("tick 7")
    assert _recv(sock) == b"STATUS=tick 7"
    assert notifier.watchdog()
    assert _recv(sock) == b"WATCHDOG=1"
    assert notifier.stopping()
    assert _recv(sock) == b"STOPPING=1"
    assert notifier.stopping("draining")
    assert _recv(sock) == b"STOPPING=1\nSTATUS=draining"


def test_reloading_carries_monotonic_usec(
    path_socket: tuple[str, socket.socket], notifier: Notifier
) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    lines = _recv(path_socket[1]).decode().split("\n")
    assert lines[0] == "RELOADING=1"
    key, _, value = lines[1].partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after
    assert len(lines) == 2


def test_status_is_one_line(path_socket: tuple[str, socket.socket], notifier: Notifier) -> None:
    sock = path_socket[1]
    assert notifier.status("first line\nsecond\r\nthird\n\n")
    assert _recv(sock) == b"STATUS=first line second third"
    # A newline must not smuggle in a key of its own, and a NUL would make systemd drop
    # the whole datagram.
    assert notifier.ready("ok\nWATCHDOG=1\0x")
    assert _recv(sock) == b"READY=1\nSTATUS=ok WATCHDOG=1 x"


def test_long_status_is_cut_to_fit_systemds_buffer(
    path_socket: tuple[str, socket.socket], notifier: Notifier
) -> None:
    assert notifier.ready("é" * 5000)  # 10000 bytes of UTF-8
    data = _recv(path_socket[1])
    assert data.startswith(b"READY=1\nSTATUS=\xc3\xa9")
    status = data.split(b"\n")[1].removeprefix(b"STATUS=")
    assert len(status) <= MAX_STATUS_BYTES
    status.decode("utf-8")  # cut at a character boundary
    assert len(data) < 4096


# --- nobody listening ----------------------------------------------------------------------


def test_no_socket_means_disabled_and_silent() -> None:
    n = Notifier.from_env({})
    assert not n.enabled
    assert n.watchdog_interval is None
    assert n.ready("x") is False
    assert n.status("x") is False
    assert n.watchdog() is False
    assert n.reloading() is False
    assert n.stopping() is False


@pytest.mark.parametrize("value", ["", "relative/notify", "vsock:2:1234", "/" + "x" * 200])
def test_unusable_address_is_disabled(value: str) -> None:
    n = Notifier.from_env({"NOTIFY_SOCKET": value, "WATCHDOG_USEC": "1000000"})
    assert not n.enabled
    assert n.watchdog_interval is None
    assert n.ready() is False


def test_from_env_defaults_to_os_environ(
    path_socket: tuple[str, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", path_socket[0])
    n = Notifier.from_env()
    try:
        assert n.ready()
        assert _recv(path_socket[1]) == b"READY=1"
    finally:
        n.close()


def test_socket_that_went_away_does_not_raise(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "notify"
    sock = _receiver(str(path))
    n = Notifier.from_env({"NOTIFY_SOCKET": str(path)})
    try:
        assert n.ready()
        assert _recv(sock) == b"READY=1"
        sock.close()
        # Closed but still on disk: ECONNREFUSED. Then gone: ENOENT.
        with caplog.at_level(logging.DEBUG, logger="balloonctl.daemon.sdnotify"):
            assert n.watchdog() is False
            path.unlink()
            assert n.watchdog() is False
            assert n.stopping() is False
        assert sum("sd_notify to" in r.getMessage() for r in caplog.records) == 3
        # A manager that comes back (systemd re-executed) is reached again.
        with _receiver(str(path)) as again:
            assert n.status("back")
            assert _recv(again) == b"STATUS=back"
    finally:
        n.close()


def test_abstract_socket_that_went_away_does_not_raise(
    abstract_socket: tuple[str, socket.socket],
) -> None:
    address, sock = abstract_socket
    n = Notifier.from_env({"NOTIFY_SOCKET": address})
    try:
        sock.close()
        assert n.ready("x") is False
    finally:
        n.close()


def test_full_queue_does_not_block(path_socket: tuple[str, socket.socket]) -> None:
    """A manager that stops reading must not stall the daemon: the datagram is dropped."""
    n = Notifier.from_env({"NOTIFY_SOCKET": path_socket[0]})
    results: list[bool] = []

    def flood() -> None:
        for _ in range(100_000):
            results.append(n.status("x" * 512))
            if not results[-1]:
                return

    worker = threading.Thread(target=flood, daemon=True)
    worker.start()
    worker.join(10)
    try:
        assert not worker.is_alive(), "sending blocked on a full receive queue"
        assert results[-1] is False, "the queue never filled"
        assert results.count(True) >= 1
    finally:
        n.close()


# --- the watchdog --------------------------------------------------------------------------


def test_watchdog_interval_from_usec(path_socket: tuple[str, socket.socket]) -> None:
    n = Notifier.from_env({"NOTIFY_SOCKET": path_socket[0], "WATCHDOG_USEC": "60000000"})
    assert n.watchdog_interval == 60.0


def test_watchdog_pid_of_this_process(path_socket: tuple[str, socket.socket]) -> None:
    env = {
        "NOTIFY_SOCKET": path_socket[0],
        "WATCHDOG_USEC": "2500000",
        "WATCHDOG_PID": str(os.getpid()),
    }
    assert Notifier.from_env(env).watchdog_interval == 2.5


def test_watchdog_pid_of_another_process_means_no_watchdog(
    path_socket: tuple[str, socket.socket],
) -> None:
    env = {
        "NOTIFY_SOCKET": path_socket[0],
        "WATCHDOG_USEC": "60000000",
        "WATCHDOG_PID": str(os.getpid() + 1),
    }
    n = Notifier.from_env(env)
    assert n.watchdog_interval is None
    assert n.enabled  # notifications still go out; only the watchdog is not ours


@pytest.mark.parametrize(
    ("usec", "pid"), [("0", None), ("-5", None), ("soon", None), ("1000", "me"), ("", None)]
)
def test_bad_watchdog_values_mean_no_watchdog(
    path_socket: tuple[str, socket.socket], usec: str, pid: str | None
) -> None:
    env = {"NOTIFY_SOCKET": path_socket[0], "WATCHDOG_USEC": usec}
    if pid is not None:
        env["WATCHDOG_PID"] = pid
    assert Notifier.from_env(env).watchdog_interval is None


def test_no_watchdog_without_socket() -> None:
    env = {"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier.from_env(env).watchdog_interval is None
