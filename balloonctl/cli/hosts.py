"""Many hosts from one command: the inventory file, and running one command on every host.

``list``, ``status`` and ``stats`` take several hosts (a repeated ``-c URI`` and/or
``--hosts FILE``) and ask them all at once. Why each host runs in a process of its own:
libvirt-python takes one event loop implementation per process, and the libvirt backend
therefore makes every libvirt call on one thread (balloonctl/backends/libvirt.py). In one
process the hosts' calls would queue on that thread: connections would open one after the
other, and a host that accepts and never answers would hold every host behind it until its
timeout. A forked child per host has its own libvirt thread and its own connection, so the
connections open in parallel and a dead host costs its own timeout, not the others'.

The children are forked before any thread or event loop exists in the command (the CLI
forks from its main thread, having loaded the backends once, so a child starts in
milliseconds). Where threads already run (``main()`` embedded in another program), forking
is not safe, and the hosts are asked concurrently in this process instead.

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
import contextlib
import json
import logging
import os
import selectors
import signal
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Final

from balloonctl.errors import BalloonError, ConfigError, UsageError

log = logging.getLogger("balloonctl")

#: Hosts asked at once. Each is a forked process holding one connection: bounded so that an
#: inventory of hundreds of hosts does not fork hundreds of processes on a small machine.
MAX_PARALLEL_HOSTS: Final = 16
#: The last resort against a child that does not end: every host's work is already bounded
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
        return self.uri if self.uri is not None else f"qmp-dir:{self.qmp_dir}"


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
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such file") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from exc
    except ValueError as exc:  # an integer of over 4300 digits (see daemon/config.py)
        raise ConfigError(f"{path}: not valid TOML: a number too long to read") from exc
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
        if "name" not in entry:
            raise ConfigError(f"{where}.name: required")
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
            raise UsageError(f"host {host.name!r} is given twice (-c and --hosts)")
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
    """``work(host)`` for every host at once (at most ``limit`` at a time), in host order.

    ``work`` returns the host's report and its notice (stderr text, often empty). A host
    whose work raises is an outcome with its one-line error; nothing raises out of here
    for one host's failure.
    """
    if threading.active_count() > 1:
        log.debug("threads are running: asking the hosts in this process, not forking")
        return asyncio.run(_in_process(hosts, work))
    return _forked(hosts, work, limit=max(1, limit), deadline_s=deadline_s)


async def _in_process(hosts: Sequence[Host], work: HostWork) -> list[HostOutcome]:
    async def one(host: Host) -> HostOutcome:
        try:
            report, notice = await work(host)
        except BalloonError as exc:
            log.debug("%s: detail", host.name, exc_info=True)
            return HostOutcome(host, None, str(exc))
        return HostOutcome(host, report, None, notice)

    return list(await asyncio.gather(*(one(host) for host in hosts)))


@dataclass(slots=True)
class _Child:
    index: int
    host: Host
    pid: int
    deadline: float
    data: bytearray


def _forked(
    hosts: Sequence[Host], work: HostWork, *, limit: int, deadline_s: float
) -> list[HostOutcome]:
    """One forked child per host, results back as JSON through a pipe."""
    outcomes: list[HostOutcome | None] = [None] * len(hosts)
    waiting = list(enumerate(hosts))
    running: dict[int, _Child] = {}
    # Whatever the command buffered would otherwise be written again by every child.
    sys.stdout.flush()
    sys.stderr.flush()
    with selectors.DefaultSelector() as sel:
        try:
            while waiting or running:
                while waiting and len(running) < limit:
                    index, host = waiting.pop(0)
                    try:
                        fd, child = _start(host, work)
                    except OSError as exc:  # out of processes or descriptors: this host only
                        why = f"cannot start a worker for host {host.name}: {exc.strerror or exc}"
                        outcomes[index] = HostOutcome(host, None, why)
                        continue
                    running[fd] = _Child(
                        index, host, child, time.monotonic() + deadline_s, bytearray()
                    )
                    sel.register(fd, selectors.EVENT_READ)
                wait = min(c.deadline for c in running.values()) - time.monotonic()
                for key, _ in sel.select(max(0.0, wait)):
                    fd = int(key.fd)
                    chunk = os.read(fd, 1 << 16)
                    if chunk:
                        running[fd].data += chunk
                        continue
                    sel.unregister(fd)
                    os.close(fd)
                    done = running.pop(fd)
                    _reap(done.pid)
                    outcomes[done.index] = _decode(done.host, bytes(done.data))
                now = time.monotonic()
                for fd, late in [(fd, c) for fd, c in running.items() if c.deadline <= now]:
                    sel.unregister(fd)
                    os.close(fd)
                    del running[fd]
                    _kill(late.pid)
                    outcomes[late.index] = HostOutcome(
                        late.host,
                        None,
                        f"host {late.host.name} did not answer within {deadline_s:g} s",
                    )
        finally:
            for fd, left in running.items():  # Ctrl-C, SIGTERM: no child outlives us
                with contextlib.suppress(OSError):
                    os.close(fd)
                _kill(left.pid)
    return [outcome for outcome in outcomes if outcome is not None]


def _start(host: Host, work: HostWork) -> tuple[int, int]:
    """Fork the child for ``host``; the parent gets the pipe's read end and the pid."""
    read_fd, write_fd = os.pipe()
    try:
        pid = os.fork()
    except OSError:
        os.close(read_fd)
        os.close(write_fd)
        raise
    if pid == 0:  # the child: never returns
        os.close(read_fd)
        _child(host, work, write_fd)
    os.close(write_fd)
    return read_fd, pid


def _child(host: Host, work: HostWork, fd: int) -> None:
    """Run ``work(host)`` and write the outcome as JSON; ``os._exit`` whatever happens, so
    that nothing of the parent's stack (its ``finally`` blocks, atexit) runs twice."""
    status = 0
    try:
        # Ctrl-C reaches the whole process group: the parent reports it, not every child.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        payload: dict[str, Any]
        try:
            report, notice = asyncio.run(work(host))
            payload = {"report": report, "notice": notice}
        except BalloonError as exc:
            log.debug("%s: detail", host.name, exc_info=True)
            payload = {"error": str(exc)}
        except MemoryError:
            payload = {"error": "out of memory"}
        except Exception as exc:  # a bug; still one line for this host, the rest answer
            log.debug("%s: detail", host.name, exc_info=True)
            payload = {"error": f"internal error: {type(exc).__name__}: {exc}"}
        with os.fdopen(fd, "wb") as out:
            out.write(json.dumps(payload).encode())
    except BaseException:  # SIGTERM (SystemExit) or a closed pipe: end quietly
        status = 1
    finally:
        os._exit(status)


def _decode(host: Host, data: bytes) -> HostOutcome:
    try:
        payload = json.loads(data)
    except ValueError:
        return HostOutcome(host, None, f"host {host.name}: its worker ended without an answer")
    if "error" in payload:
        return HostOutcome(host, None, str(payload["error"]))
    return HostOutcome(host, payload["report"], None, str(payload.get("notice", "")))


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    _reap(pid)
