"""systemd's service notification protocol (sd_notify(3)) in the standard library only.

Why not ``python-systemd``: it is a C extension that needs libsystemd's headers to build
(no wheels on PyPI), and all balloonctl needs from it is the protocol, which is one
datagram per call. That protocol, as sd_notify(3) describes it:

* ``$NOTIFY_SOCKET`` names an ``AF_UNIX`` ``SOCK_DGRAM`` socket: an absolute path, or a
  name in the abstract namespace when it starts with ``@`` (the ``@`` stands for the
  leading NUL byte of the socket address). Unset: the service is not run by systemd (or
  not with ``Type=notify``) and every notification is a no-op.
* A message is newline-separated ``KEY=VALUE`` lines, one datagram, sent with
  ``sendto()`` (systemd reads the sender's credentials from the socket, so nothing else
  is needed: ``NotifyAccess=main`` accepts it from the main process).
* ``READY=1`` ends start-up (``Type=notify``), ``RELOADING=1`` and ``STOPPING=1`` mark the
  reload and the stop, ``STATUS=`` is the one line ``systemctl status`` shows, and
  ``WATCHDOG=1`` keeps ``WatchdogSec=`` from killing the service.

Two rules come from what the caller is: a daemon that balances guest memory must not stop
because its supervisor's socket is gone (systemd re-executing, a test harness, a
container without systemd), so **sending never raises** (failures are logged at DEBUG);
and it must not wait on its supervisor, so **sending never blocks** (``MSG_DONTWAIT`` on
a non-blocking socket: when systemd's queue is full the message is dropped, which the
watchdog tolerates because callers ping at half its period).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping
from typing import Final

log = logging.getLogger(__name__)

#: systemd reads a notification into a buffer of NOTIFY_BUFFER_MAX (PIPE_BUF, 4096) bytes
#: (src/core/manager.c) and drops a longer datagram whole, READY=1 included; STATUS= is the
#: only field of unbounded length, so it is cut to keep every message well inside that.
MAX_STATUS_BYTES: Final = 1024

#: ``sockaddr_un.sun_path`` (unix(7)): a longer address cannot be sent to.
_SUN_PATH_MAX: Final = 108


class Notifier:
    """A client of the service manager's notification socket (sd_notify(3)).

    Build it with :meth:`from_env`. Every method returns whether the message was handed to
    the kernel (False when notifications are off or sending failed) and never raises.
    """

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        """``address``: ``$NOTIFY_SOCKET`` as systemd sets it (None: notifications off);
        ``watchdog_usec``: the watchdog period that applies to this process, if any."""
        self._address: bytes | None = _encode_address(address) if address else None
        if address and self._address is None:
            log.debug("NOTIFY_SOCKET=%r is not an absolute path or @name: ignored", address)
        self._display = address
        self._watchdog_usec = watchdog_usec if self._address is not None else None
        self._sock: socket.socket | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Notifier:
        """The notifier systemd set up for this process, from ``env``.

        ``$WATCHDOG_USEC`` is the watchdog period; when ``$WATCHDOG_PID`` is set it must be
        this process's PID (sd_watchdog_enabled(3)): the variables are inherited, and a
        child that is not the one systemd watches must not ping for it.

        The variables are left in the environment (unlike ``unset_environment=1``): the
        daemon reads them once, and ``NotifyAccess=main`` already makes systemd ignore
        whatever a child (ssh for a ``qemu+ssh`` URI) might send.
        """
        address = env.get("NOTIFY_SOCKET") or None
        return cls(address, _watchdog_usec(env))

    def __repr__(self) -> str:
        return f"Notifier({self._display!r}, watchdog_usec={self._watchdog_usec!r})"

    @property
    def enabled(self) -> bool:
        """Whether a service manager listens (``$NOTIFY_SOCKET`` names a usable socket)."""
        return self._address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """The watchdog period in seconds, or None when no watchdog applies.

        Callers should ping at half of it (sd_watchdog_enabled(3) recommends that): a ping
        dropped on a full queue or sent late by a slow tick then still lands in time. None
        also when notifications are off, as then no ping could be delivered.
        """
        return None if self._watchdog_usec is None else self._watchdog_usec / 1_000_000

    def ready(self, status: str | None = None) -> bool:
        """Start-up (or a reload) is complete: ``READY=1``, with ``STATUS=`` if given.

        After :meth:`reloading`, this is also what ends the reload for systemd.
        """
        return self._send([("READY", "1"), *_status(status)])

    def status(self, text: str) -> bool:
        """Set the one line ``systemctl status`` shows (``STATUS=``)."""
        return self._send(_status(text))

    def watchdog(self) -> bool:
        """Tell the watchdog the service is alive (``WATCHDOG=1``)."""
        return self._send([("WATCHDOG", "1")])

    def stopping(self, status: str | None = None) -> bool:
        """The service is shutting down (``STOPPING=1``): systemd stops waiting for pings."""
        return self._send([("STOPPING", "1"), *_status(status)])

    def reloading(self, status: str | None = None) -> bool:
        """The configuration is being reloaded; :meth:`ready` ends it.

        ``MONOTONIC_USEC=`` goes with ``RELOADING=1`` because systemd 253's
        ``Type=notify-reload`` uses it to tell this reload from an earlier one
        (sd_notify(3)); systemd 252 and older ignore the unknown key, so it is harmless there.
        """
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self._send([("RELOADING", "1"), ("MONOTONIC_USEC", str(now)), *_status(status)])

    def close(self) -> None:
        """Close the socket (the next message opens a new one)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _send(self, items: list[tuple[str, str]]) -> bool:
        if self._address is None or not items:
            return False
        message = "\n".join(f"{key}={value}" for key, value in items).encode("utf-8")
        try:
            if self._sock is None:
                # Non-blocking and close-on-exec: a hung manager cannot stall the daemon,
                # and children (ssh for qemu+ssh URIs) do not inherit the descriptor.
                self._sock = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
                )
            self._sock.sendto(message, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL, self._address)
        except OSError as exc:
            # The socket went away (ENOENT, ECONNREFUSED), its queue is full (EAGAIN), or
            # socket() was refused: the daemon carries on without its supervisor.
            log.debug("sd_notify to %s failed: %s", self._display, exc)
            return False
        return True


def _encode_address(address: str) -> bytes | None:
    """The ``sockaddr_un`` path for ``$NOTIFY_SOCKET``, or None when it is not one systemd
    would accept (sd_notify(3): absolute path or ``@`` abstract name; ``vsock:`` addresses,
    new in systemd 254, are not supported)."""
    if address.startswith("@"):
        raw = b"\0" + os.fsencode(address[1:])
    elif address.startswith("/"):
        raw = os.fsencode(address)
    else:
        return None
    return raw if len(raw) <= _SUN_PATH_MAX else None


def _watchdog_usec(env: Mapping[str, str]) -> int | None:
    """``$WATCHDOG_USEC`` when it applies to this process (sd_watchdog_enabled(3))."""
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = env.get("WATCHDOG_PID")
    try:
        period = int(usec)
        if pid and int(pid) != os.getpid():
            log.debug("WATCHDOG_PID=%s is not this process (%d): no watchdog", pid, os.getpid())
            return None
    except ValueError:
        log.debug("WATCHDOG_USEC=%r / WATCHDOG_PID=%r unparsable: no watchdog", usec, pid)
        return None
    return period if period > 0 else None


def _status(text: str | None) -> list[tuple[str, str]]:
    """``STATUS=`` as one line: systemd splits the message at newlines (a second line would
    be read as a key of its own) and refuses a message with a NUL byte in it."""
    if text is None:
        return []
    line = " ".join(part.strip() for part in text.replace("\0", " ").splitlines() if part.strip())
    raw = line.encode("utf-8")
    if len(raw) > MAX_STATUS_BYTES:
        line = raw[:MAX_STATUS_BYTES].decode("utf-8", errors="ignore")
    return [("STATUS", line)]
