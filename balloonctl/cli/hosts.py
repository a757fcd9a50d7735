"""Many hosts from one command: the inventory file, and running one command on every host.

``list``, ``status`` and ``stats`` take several hosts (a repeated ``-c URI`` and/or
``--hosts FILE``) and ask them all at once, in this process: each host gets its own backend,
hence its own libvirt connection, and the libvirt backend makes a URI's calls on a worker
thread of that URI's own (balloonctl/backends/libvirt.py, ``_LibvirtThread``), so the
connections open in parallel and a host that accepts and never answers holds only its own
worker. What ends a dead host is its backend's timeouts; :data:`HOST_DEADLINE_S` is a last
resort on top.

The inventory (docs/contracts.md, "Many hosts") is TOML, like the configuration::

    [[host]]
    name = "hv1"
    uri = "qemu+ssh://root@hv1/system"

    [[host]]
    name = "lab"
    qmp_dir = "/run/balloonctl/vms"     # every lab/NAME.sock is VM NAME
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Final

from balloonctl.daemon.config import read_toml
from balloonctl.errors import BalloonError, ConfigError, UsageError

log = logging.getLogger("balloonctl")

#: Hosts asked at once. Each holds a connection and (libvirt) a worker thread: bounded so that
#: an inventory of hundreds of hosts does not open hundreds of each at once.
MAX_PARALLEL_HOSTS: Final = 16
#: The last resort against a host that does not end: every host's work is already bounded
#: by the backends' own timeouts (``list``: 30 s for the whole conversation with libvirtd;
#: ``status``/``stats``: connect 10 s, each call 30 s), which is what ends a dead host.
HOST_DEADLINE_S: Final = 180.0
#: The host name of ``[[vm]]`` entries and ``--qmp-dir`` sockets in a multi-host ``list``.
LOCAL_HOST: Final = "local"

_HOST_KEYS: Final = ("name", "uri", "qmp_dir")


@dataclass(frozen=True, slots=True)
class Host:
    """One host: a libvirt URI, or a directory of QMP sockets (``NAME.sock`` is VM NAME)."""

    name: str
    uri: str | None = None
    qmp_dir: str | None = None

    @property
    def address(self) -> str:
        """Where the host is reached, as the ``hosts`` objects of ``--json`` show it."""
        if self.uri is not None:
            return self.uri
        return f"qmp-dir:{self.qmp_dir}" if self.qmp_dir is not None else LOCAL_HOST


@dataclass(frozen=True, slots=True)
class HostOutcome:
    """What one host answered: its report, or the one line saying why it did not."""

    host: Host
    report: dict[str, Any] | None
    error: str | None
    #: What the host's command would have printed on stderr (stats: polling turned on).
    notice: str = ""


def load_inventory(path: str) -> list[Host]:
    """The hosts of an inventory file; anything unusable is a one-line ConfigError (exit 2)
    naming the file and the key, so a typo never becomes a host that silently fails."""
    data = read_toml(path)
    for key in data:
        if key != "host":
            raise ConfigError(f"{path}: {key}: unknown table (an inventory has only [[host]])")
    entries = data.get("host")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path}: no hosts (add [[host]] tables with name and uri or qmp_dir)")
    hosts: list[Host] = []
    for i, entry in enumerate(entries):
        where = f"{path}: host[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: must be a table ([[host]])")
        for key in entry:
            if key not in _HOST_KEYS:
                raise ConfigError(f"{where}.{key}: unknown key (known: {', '.join(_HOST_KEYS)})")
        for key in _HOST_KEYS:
            value = entry.get(key)
            if value is not None and not (isinstance(value, str) and value.strip()):
                raise ConfigError(f"{where}.{key}: must be a non-empty string")
            # A NUL reaches no path or URI (the OS and libvirt refuse it with a ValueError),
            # and a line break in a name would split the table's rows.
            if isinstance(value, str) and any(c in value for c in "\0\n\r"):
                raise ConfigError(f"{where}.{key}: contains a NUL or a line break")
        if "name" not in entry:
            raise ConfigError(f"{where}.name: required")
        if entry["name"] == LOCAL_HOST:
            raise ConfigError(
                f"{where}.name: {LOCAL_HOST!r} is reserved (list's host for the configuration's"
                " [[vm]] and --qmp-dir sockets)"
            )
        if ("uri" in entry) == ("qmp_dir" in entry):
            raise ConfigError(f"{where}: needs exactly one of uri (libvirt) or qmp_dir (QMP)")
        hosts.append(Host(entry["name"], entry.get("uri"), entry.get("qmp_dir")))
        if entry["name"] in (h.name for h in hosts[:-1]):
            raise ConfigError(f"{where}.name: {entry['name']!r} is used twice")
    return hosts


def select_hosts(connects: Sequence[str], inventory: str | None) -> list[Host]:
    """The hosts of ``-c URI``... (each named by its URI) then of ``--hosts FILE``."""
    hosts = [Host(uri, uri=uri) for uri in connects]
    if inventory is not None:
        hosts += load_inventory(inventory)
    seen: set[str] = set()
    for host in hosts:
        if host.name in seen:
            raise UsageError(f"host {host.name!r} is given twice")
        seen.add(host.name)
    return hosts


HostWork = Callable[[Host], Coroutine[Any, Any, tuple[dict[str, Any], str]]]


def run_on_hosts(
    hosts: Sequence[Host],
    work: HostWork,
    *,
    limit: int = MAX_PARALLEL_HOSTS,
    deadline_s: float = HOST_DEADLINE_S,
) -> list[HostOutcome]:
    """``work(host)`` for every host at once (at most ``limit`` at a time), in host order."""
    return asyncio.run(ask_hosts(hosts, work, limit=limit, deadline_s=deadline_s))


async def ask_hosts(
    hosts: Sequence[Host],
    work: HostWork,
    *,
    limit: int = MAX_PARALLEL_HOSTS,
    deadline_s: float = HOST_DEADLINE_S,
) -> list[HostOutcome]:
    """:func:`run_on_hosts` on the running loop.

    ``work`` returns the host's report and its notice (stderr text, often empty). A host
    whose work raises a BalloonError, or outlasts ``deadline_s``, is an outcome with its
    one-line error: one host's failure never stops the others.
    """
    bound = asyncio.Semaphore(max(1, limit))

    async def one(host: Host) -> HostOutcome:
        async with bound:
            try:
                async with asyncio.timeout(deadline_s):
                    report, notice = await work(host)
            except TimeoutError:
                return HostOutcome(
                    host, None, f"host {host.name} did not answer within {deadline_s:g} s"
                )
            except BalloonError as exc:
                log.debug("%s: detail", host.name, exc_info=True)
                return HostOutcome(host, None, str(exc))
        return HostOutcome(host, report, None, notice)

    return list(await asyncio.gather(*(one(host) for host in hosts)))
