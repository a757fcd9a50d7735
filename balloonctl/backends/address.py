"""QMP socket addresses as users write them, parsed without touching the network.

A VM is named by its QMP socket (docs/contracts.md, "VM addresses"): ``unix:/path``, a
plain path to a socket, or ``tcp:HOST:PORT`` (an IPv6 host in brackets, ``tcp:[::1]:4444``,
as QEMU's own ``-qmp tcp:...`` syntax and URLs write it). :func:`parse_address` is pure
so that a typo is a :class:`~balloonctl.errors.UsageError` (exit 2) before any connection is
tried; :func:`looks_like_qmp_address` is the one check that looks at the file system, for a
caller that must tell a socket path from a libvirt domain name.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from typing import Final, Literal

from balloonctl.errors import UsageError

#: A scheme-like prefix ("ssh:", "qemu+ssh:") that is neither unix: nor tcp:.
_SCHEME: Final = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


@dataclass(frozen=True, slots=True)
class QmpAddress:
    """Where a QMP monitor listens: a unix socket path, or a TCP host and port."""

    kind: Literal["unix", "tcp"]
    #: The socket path (``kind == "unix"``), else "".
    path: str = ""
    #: The host without brackets (``::1``, not ``[::1]``), else "".
    host: str = ""
    port: int = 0

    @property
    def target(self) -> str | tuple[str, int]:
        """The address in the form ``qemu.qmp``'s ``connect()`` takes."""
        if self.kind == "unix":
            return self.path
        return (self.host, self.port)

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


def _parse_port(text: str, original: str) -> int:
    # ASCII digits only: str.isdigit also takes "²", which int() refuses (found by fuzz
    # target config); a port has at most 5 digits, and int() refuses over 4300.
    if not (text.isascii() and text.isdigit()) or len(text) > 5:
        raise UsageError(f"bad QMP address {original!r}: port {text[:40]!r} is not a number")
    port = int(text)
    if not 0 < port < 65536:
        raise UsageError(f"bad QMP address {original!r}: port {port} is not in 1..65535")
    return port


def _parse_tcp(rest: str, original: str) -> QmpAddress:
    if rest.startswith("["):
        # RFC 3986 style: the brackets are what makes the port separable from an IPv6 host.
        host, sep, tail = rest[1:].partition("]")
        if not sep or not tail.startswith(":"):
            raise UsageError(f"bad QMP address {original!r}: expected tcp:[IPV6]:PORT")
        if not host:
            raise UsageError(f"bad QMP address {original!r}: empty host")
        return QmpAddress("tcp", host=host, port=_parse_port(tail[1:], original))
    host, sep, port = rest.rpartition(":")
    if not sep:
        raise UsageError(f"bad QMP address {original!r}: expected tcp:HOST:PORT")
    if not host:
        raise UsageError(f"bad QMP address {original!r}: empty host")
    if ":" in host:
        raise UsageError(
            f"bad QMP address {original!r}: write an IPv6 host in brackets, tcp:[{host}]:{port}"
        )
    return QmpAddress("tcp", host=host, port=_parse_port(port, original))


def parse_address(text: str) -> QmpAddress:
    """Parse ``unix:/path``, ``tcp:HOST:PORT``, ``tcp:[V6]:PORT`` or a plain socket path.

    A plain string is a path (it may itself contain ``:``, e.g. ``/run/vm:1.sock``) unless it
    starts with a scheme other than ``unix:``/``tcp:``, which is refused rather than taken for
    a relative path nobody meant.
    """
    if not text or not text.strip():
        raise UsageError("empty QMP address")
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path:
            raise UsageError(f"bad QMP address {text!r}: no socket path after unix:")
        return QmpAddress("unix", path=path)
    if text.startswith("tcp:"):
        return _parse_tcp(text[len("tcp:") :], text)
    if _SCHEME.match(text) and not text.startswith(("/", ".")):
        scheme = text.split(":", 1)[0]
        raise UsageError(
            f"bad QMP address {text!r}: unknown scheme {scheme!r} "
            "(use unix:/path, tcp:HOST:PORT or a socket path)"
        )
    return QmpAddress("unix", path=text)


def looks_like_qmp_address(text: str) -> bool:
    """Whether ``text`` names a QMP socket rather than, say, a libvirt domain.

    True for ``unix:``/``tcp:`` addresses and for a path to an existing unix socket. A plain
    name that is not a socket (``web01``) is left to libvirt.
    """
    if text.startswith(("unix:", "tcp:")):
        return True
    try:
        return stat.S_ISSOCK(os.stat(text).st_mode)
    except (OSError, ValueError):
        return False
