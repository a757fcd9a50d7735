"""A libvirt domain's balloon through libvirt-python (the only module importing ``libvirt``).

What this module adds to libvirt-python, and why:

* **Units and names.** libvirt speaks KiB (``setMemoryFlags``, ``memoryStats``) and its own
  stat names; balloonctl speaks bytes and its own names. The mapping is in one table,
  :data:`STAT_NAMES`, with libvirt's traps written out: its ``available`` is the guest's
  *total* memory (QEMU's ``stat-total-memory``), ``usable`` is MemAvailable and ``unused``
  is MemFree.
* **Errors.** Every ``libvirtError`` becomes a :class:`~balloonctl.errors.BalloonError` with
  a one-line message and ``raise ... from`` (:func:`_map_error`); libvirt's own printing of
  errors to stderr is switched off, so the CLI prints only its line.
  ``asyncio.CancelledError`` is never caught.
* **No blocked event loop, and no host blocking another.** libvirt-python calls block (an
  RPC to libvirtd, which may wait for QEMU, or for a network link that went dead), and
  events (BALLOON_CHANGE, the connection closing, keepalive) need an event loop
  implementation registered *before* a connection opens. libvirt's own default event loop
  runs on a thread of its own, and each URI's calls are made in order on that URI's worker
  thread (:class:`_LibvirtThread`); the caller's loop awaits.
* **Retries, only where they are safe.** A connection libvirt reports closed (close
  callback, keepalive) is reopened before the next call. A query whose connection drops
  mid-call is retried once on a new connection; an action (``setMemoryFlags``,
  ``setMemoryStatsPeriod``, device_del/add) never is: its outcome is unknown.
* **What only QMP can say** (feature bits, replugging the balloon, ring addresses) goes
  through libvirt's monitor passthrough, ``libvirt_qemu.qemuMonitorCommand``, speaking the
  same vocabulary as the QMP backend (:class:`~.qmpvocab.QmpVocabulary`). libvirt marks a
  domain "tainted: custom-monitor" the first time; that is a log line, nothing more. Drivers
  without passthrough (``test:///``, remote non-QEMU hypervisors) refuse with
  :class:`CommandFailed` (see :data:`NO_PASSTHROUGH`).
* **The guest statistics libvirt does not know.** libvirt's virDomainMemoryStats has
  thirteen tags (VIR_DOMAIN_MEMORY_STAT_NR = 13 in libvirt 9.0 and 11.3 alike), and its
  QEMU driver reads only QEMU's first ten ``stat-*`` names (src/qemu/qemu_monitor_json.c
  qemuMonitorJSONGetMemoryStats, GET_BALLOON_STATS): Linux 6.12's tags 10-15 (``oom-kills``
  ... ``direct-reclaims``), which QEMU 9.2+ shows, are dropped there. :meth:`stats`
  therefore reads them from QEMU's own ``qom-get guest-stats`` through the passthrough,
  once the domain's QEMU is known to name them, and says why they are missing where the
  driver cannot pass QMP through (:data:`NO_EXTENDED_STATS`).

Domains are named by name or UUID on any URI: ``qemu:///system``, ``qemu:///session``,
``qemu+ssh://user@host/system`` (guest memory is read with ``virDomainMemoryPeek``, which
works remotely, unlike the QMP backend's ``pmemsave`` into a local file).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import json
import logging
import queue
import re
import threading
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Final, TypeVar

import libvirt
import libvirt_qemu

from balloonctl.backends.base import MAX_READ, FeatureState, GuestStats
from balloonctl.backends.mailbox import Mailbox
from balloonctl.backends.qmpvocab import (
    NoQmpCarrier,
    QmpVocabulary,
    RemovalWait,
    _ReplugPlan,
    decode_guest_stats,
    is_idempotent,
    names_extended_stats,
    refusal,
)
from balloonctl.errors import (
    BadStatistics,
    BalloonError,
    CommandFailed,
    ConnectionLost,
    OperationTimeout,
    PeerError,
    UsageError,
    VmUnreachable,
)
from balloonctl.virtio.spec import EXTENDED_STAT_NAMES

_LOG = logging.getLogger(__name__)
_T = TypeVar("_T")

#: libvirt's memoryStats keys -> (balloonctl's name, multiplier to bytes or counts). ``actual``,
#: ``rss`` and ``last_update`` are not guest statistics and are handled apart.
#: (src/libvirt-domain.c VIR_DOMAIN_MEMORY_STAT_*; qemu_driver.c qemuDomainMemoryStats.)
#: libvirt has no key for stats tags 10-15: :meth:`LibvirtBackend.stats` reads those from QEMU.
STAT_NAMES: Final[Mapping[str, tuple[str, int]]] = {
    "swap_in": ("swap-in", 1024),
    "swap_out": ("swap-out", 1024),
    "major_fault": ("major-faults", 1),
    "minor_fault": ("minor-faults", 1),
    "unused": ("free-memory", 1024),  # MemFree
    "available": ("total-memory", 1024),  # the guest's total, despite the name
    "usable": ("available-memory", 1024),  # MemAvailable
    "disk_caches": ("disk-caches", 1024),
    "hugetlb_pgalloc": ("htlb-pgalloc", 1),
    "hugetlb_pgfail": ("htlb-pgfail", 1),
}

#: Why the statistics of tags 10-15 are missing under a driver without QMP passthrough.
NO_EXTENDED_STATS: Final = (
    "libvirt's memoryStats has no such statistic (libvirt knows QEMU's first ten) and this "
    "libvirt driver ({driver}) cannot pass QMP through to read it from QEMU"
)

#: One line for every driver that cannot pass QMP through.
NO_PASSTHROUGH: Final = (
    "VM {vm}: this libvirt driver ({driver}) cannot pass QMP commands through "
    "(qemuMonitorCommand, needed for {what}: feature bits, negotiate, vring dump); "
    "use a qemu:// URI or the VM's QMP socket"
)

#: Unread BALLOON_CHANGE values kept for a watch_actual consumer (as the QMP backend).
WATCH_BACKLOG: Final = 64
#: libvirt's own limit on one virDomainMemoryPeek (src/libvirt-domain.c, remote protocol).
PEEK_CHUNK: Final = 65536
#: How often the balloon's disappearance is polled for during a replug.
_REMOVAL_POLL_S: Final = 0.05

_UUID: Final = re.compile(
    r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$"
)

#: VIR_ERR_* numbers -> names, for CommandFailed.error_class and messages.
_CODE_NAMES: Final[Mapping[int, str]] = {
    value: name
    for name, value in vars(libvirt).items()
    if name.startswith("VIR_ERR_") and isinstance(value, int) and name != "VIR_ERR_OK"
}
#: Errors meaning "no connection to libvirtd" (any error domain).
_CONNECTION_CODES: Final = frozenset(
    {
        libvirt.VIR_ERR_NO_CONNECT,
        libvirt.VIR_ERR_RPC,
        libvirt.VIR_ERR_AUTH_FAILED,
        libvirt.VIR_ERR_AUTH_CANCELLED,
        libvirt.VIR_ERR_AUTH_UNAVAILABLE,
    }
)
#: Error domains of the transport to libvirtd: a system error there is a broken connection.
_TRANSPORT_DOMAINS: Final = frozenset({libvirt.VIR_FROM_RPC, libvirt.VIR_FROM_REMOTE})
#: The domain is gone or not running: the VM cannot be reached (exit 1, "gone for now").
_DOMAIN_GONE_CODES: Final = frozenset({libvirt.VIR_ERR_NO_DOMAIN})
_TIMEOUT_CODES: Final = frozenset(
    {libvirt.VIR_ERR_OPERATION_TIMEOUT, libvirt.VIR_ERR_AGENT_UNRESPONSIVE}
)


def _silence_libvirt() -> None:
    """libvirt prints every error to stderr by default; balloonctl prints its own one line."""
    libvirt.registerErrorHandler(lambda *_: None, None)


_silence_libvirt()


def _one_line(text: str, limit: int = 300) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def error_name(exc: libvirt.libvirtError) -> str:
    """``VIR_ERR_NO_DOMAIN`` for a libvirtError (``VIR_ERR_<n>`` for a code unknown here)."""
    code = exc.get_error_code()
    return _CODE_NAMES.get(code, f"VIR_ERR_{code}") if code is not None else "VIR_ERR_UNKNOWN"


def _message(exc: libvirt.libvirtError) -> str:
    return _one_line(exc.get_error_message() or str(exc) or error_name(exc))


def _is_connection_error(exc: libvirt.libvirtError) -> bool:
    code = exc.get_error_code()
    if code in _CONNECTION_CODES:
        return True
    return exc.get_error_domain() in _TRANSPORT_DOMAINS and code in (
        libvirt.VIR_ERR_SYSTEM_ERROR,
        libvirt.VIR_ERR_INTERNAL_ERROR,
    )


def _is_not_running(exc: libvirt.libvirtError) -> bool:
    """ "Requested operation is not valid: domain is not running" (a shut-off domain)."""
    return exc.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID and "not running" in (
        exc.get_error_message() or ""
    )


def _map_error(exc: libvirt.libvirtError, vm: str, what: str, *, idempotent: bool) -> BalloonError:
    """One libvirtError as the BalloonError that says what happened, in one line."""
    code = exc.get_error_code()
    text = _message(exc)
    if _is_connection_error(exc):
        outcome = "" if idempotent else "; whether it took effect is unknown"
        return ConnectionLost(
            f"connection to libvirt lost during {what} on VM {vm}{outcome}: {text}"
        )
    if code in _DOMAIN_GONE_CODES or _is_not_running(exc):
        return VmUnreachable(f"VM {vm} is gone or not running ({what}: {text})")
    if code in _TIMEOUT_CODES:
        return OperationTimeout(f"VM {vm}: {what} timed out in libvirt: {text}")
    return CommandFailed(f"VM {vm} refused {what}: {text}", error_class=error_name(exc))


# --------------------------------------------------------------------------------------------
# The event loop libvirt dispatches on
# --------------------------------------------------------------------------------------------


class _Worker:
    """One daemon thread making libvirt calls in the order they were queued.

    A daemon thread, not a ThreadPoolExecutor's: a call stuck on a dead link must not keep
    the process from exiting once its caller gave up.
    """

    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def _run(self) -> None:
        while True:
            self._queue.get()()

    async def call(self, fn: Callable[[], _T]) -> _T:
        """Run ``fn()`` on this worker; its result or exception, awaited."""
        return await asyncio.wrap_future(self.submit(fn))

    def submit(self, fn: Callable[[], _T]) -> concurrent.futures.Future[_T]:
        """Queue ``fn()`` on this worker (from any thread); its future.

        Cancelling the future before ``fn`` starts skips it; once started it runs to the end
        (a libvirt call cannot be interrupted) and its future's callbacks run on this thread.
        """
        future: concurrent.futures.Future[_T] = concurrent.futures.Future()

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the awaiting caller, not swallowed
                future.set_exception(exc)

        self._queue.put(run)
        return future


class _LibvirtThread:
    """libvirt's event loop on a thread of its own, and one call worker per URI.

    Why: libvirt takes one event loop implementation per process, for good, registered
    before the first connection opens; but the CLI's and the tests' asyncio loops come and
    go. libvirt's default implementation is thread-safe (libvirtaio is not: its handles
    must be touched from its loop's thread only, so every call had to be made there too),
    so calls are made on workers while :func:`libvirt.virEventRunDefaultImpl` dispatches
    events and keepalive on its own thread. One worker per URI, because a call in flight
    blocks its thread until libvirtd answers: with one thread for all, a host whose link
    went dead (no RST: the call waits for keepalive or the link's return) stopped every
    other host's calls with it (measured on a veth moved down: the local libvirtd's calls
    timed out for as long as the link was down). A URI's calls stay in order on its worker;
    callers' loops only await. Events are handed back with call_soon_threadsafe.
    """

    def __init__(self) -> None:
        libvirt.virEventRegisterDefaultImpl()
        threading.Thread(target=self._events, name="balloonctl-libvirt-events", daemon=True).start()
        self._lock = threading.Lock()
        self._workers: dict[str, _Worker] = {}

    @staticmethod
    def _events() -> None:
        while True:
            try:
                libvirt.virEventRunDefaultImpl()
            except libvirt.libvirtError as exc:  # pragma: no cover - libvirt's poll failed
                _LOG.debug("libvirt event loop: %s", _message(exc))

    def worker(self, uri: str) -> _Worker:
        """The worker making ``uri``'s calls, started on first use."""
        with self._lock:
            found = self._workers.get(uri)
            if found is None:
                found = self._workers[uri] = _Worker(f"balloonctl-libvirt {uri}")
            return found

    async def call(self, fn: Callable[[], _T]) -> _T:
        """Run ``fn()`` on the shared worker (calls not tied to one URI's backend)."""
        return await self.worker("").call(fn)

    def submit(self, fn: Callable[[], _T]) -> concurrent.futures.Future[_T]:
        """Queue ``fn()`` on the shared worker; its future (see :meth:`_Worker.submit`)."""
        return self.worker("").submit(fn)


_THREAD_LOCK = threading.Lock()
_THREAD: list[_LibvirtThread] = []


def _libvirt_thread() -> _LibvirtThread:
    """The process's libvirt event thread and workers, started on first use."""
    with _THREAD_LOCK:
        if not _THREAD:
            _THREAD.append(_LibvirtThread())
        return _THREAD[0]


# --------------------------------------------------------------------------------------------
# Connections (pure helpers for `list` and the CLI)
# --------------------------------------------------------------------------------------------


class _CannotConnect(VmUnreachable):
    """libvirt.open failed: worth retrying for a moment (libvirtd may be restarting)."""


def open_connection(uri: str) -> libvirt.virConnect:
    """``libvirt.open(uri)`` with its failure as :class:`VmUnreachable` (blocking)."""
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise _CannotConnect(f"cannot connect to libvirt at {uri}: {_message(exc)}") from exc


def _domain_xml(xml: str) -> ET.Element:
    """A domain XML's root element; libvirt sending XML that does not parse is a PeerError."""
    try:
        return ET.fromstring(xml)
    except ET.ParseError as exc:
        raise PeerError(f"libvirt sent a domain XML that does not parse: {exc}") from exc


def balloon_model(xml: str) -> str | None:
    """The ``<memballoon model=...>`` of a domain XML, or None when there is none/none."""
    node = _domain_xml(xml).find("./devices/memballoon")
    if node is None:
        return None
    model = node.get("model", "")
    return None if model in ("", "none") else model


def stats_period_of(xml: str) -> int:
    """``<memballoon><stats period='N'/>`` of a live domain XML; 0 when absent (polling off)."""
    node = _domain_xml(xml).find("./devices/memballoon/stats")
    if node is None:
        return 0
    text = node.get("period", "0")
    # ASCII digits only, and few enough for libvirt's C int (docs/formatdomain: "period" is
    # an int of seconds): str.isdigit also takes "²" and other scripts' digits, which int()
    # refuses, and int() refuses more than 4300 digits (found by fuzz target libvirt_stats).
    if not (text.isascii() and text.isdigit() and len(text) <= 10):
        raise PeerError(f"libvirt's domain XML has a stats period {text[:40]!r}, not a number")
    return int(text)


def normalize_stats(raw: Mapping[str, int]) -> GuestStats:
    """libvirt's ``memoryStats()`` (KiB and counts) -> balloonctl's names in bytes and counts."""
    stats: dict[str, int] = {}
    for key, value in raw.items():
        mapped = STAT_NAMES.get(key)
        if mapped is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise BadStatistics(f"libvirt memoryStats: {key!r} is not a non-negative integer")
        name, scale = mapped
        stats[name] = value * scale
    last = raw.get("last_update", 0)
    # bool is an int to isinstance: the same test as the values above (a JSON or mocked
    # ``true`` must not become last_update True; found by fuzz target libvirt_stats).
    if not isinstance(last, int) or isinstance(last, bool) or last < 0:
        raise PeerError("libvirt memoryStats: 'last_update' is not a non-negative integer")
    return GuestStats(last_update=last, stats=stats)


@dataclass(frozen=True, slots=True)
class DomainRow:
    """A running domain with a balloon, as ``list`` shows it."""

    name: str
    uuid: str
    actual: int
    max_memory: int


#: Bound on ``list``'s whole conversation with libvirtd (connect, list, one XML per domain).
LIST_TIMEOUT_S: Final = 30.0


async def list_balloon_domains(uri: str, timeout: float = LIST_TIMEOUT_S) -> list[DomainRow]:
    """Running domains of ``uri`` that have a balloon (for ``balloonctl list``).

    Bounded: a libvirtd that accepts the connection and then never answers (stopped, wedged)
    would otherwise block ``list`` for good; libvirt itself has no timeout on a call.
    """
    pending = _libvirt_thread().worker(uri).submit(lambda: running_balloon_domains(uri))
    try:
        async with asyncio.timeout(timeout):
            return await asyncio.wrap_future(pending)
    except TimeoutError as exc:
        raise OperationTimeout(f"libvirt at {uri} did not answer within {timeout:g} s") from exc


def running_balloon_domains(uri: str) -> list[DomainRow]:
    """:func:`list_balloon_domains`'s work (blocking; on the libvirt thread)."""
    conn = open_connection(uri)
    try:
        rows = []
        try:
            domains = conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        except libvirt.libvirtError as exc:
            raise _map_error(exc, uri, "listAllDomains", idempotent=True) from exc
        for dom in domains:
            try:
                if balloon_model(dom.XMLDesc(0)) is None:
                    continue
                info = dom.info()
            except libvirt.libvirtError as exc:
                _LOG.debug("list: %s vanished: %s", dom.name(), _message(exc))
                continue
            rows.append(DomainRow(dom.name(), dom.UUIDString(), info[2] * 1024, info[1] * 1024))
        return sorted(rows, key=lambda r: r.name)
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()


#: libvirt job operations that are a migration (virDomainJobOperation, libvirt 3.3+).
_MIGRATION_OPERATIONS: Final = frozenset(
    {libvirt.VIR_DOMAIN_JOB_OPERATION_MIGRATION_IN, libvirt.VIR_DOMAIN_JOB_OPERATION_MIGRATION_OUT}
)


def migration_from_job(job: Mapping[str, object]) -> bool:
    """Whether ``virDomainGetJobStats`` (``dom.jobStats()``) says the domain is migrating.

    ``type`` VIR_DOMAIN_JOB_NONE (or no ``type``): no job, not migrating. An active job
    (BOUNDED, UNBOUNDED) is a migration when its ``operation`` is MIGRATION_IN or
    MIGRATION_OUT; a job whose operation libvirt does not say (before 3.3, or an operation
    number this table does not know) counts as migrating, as unknown means hold; a save,
    dump or snapshot job does not. A finished job (COMPLETED, FAILED, CANCELLED: only with
    VIR_DOMAIN_JOB_STATS_COMPLETED, not asked for here) is not a migration in flight.
    """
    kind = job.get("type", libvirt.VIR_DOMAIN_JOB_NONE)
    if kind not in (libvirt.VIR_DOMAIN_JOB_BOUNDED, libvirt.VIR_DOMAIN_JOB_UNBOUNDED):
        return False
    operation = job.get("operation")
    if not isinstance(operation, int) or isinstance(operation, bool):
        return True
    known = (
        libvirt.VIR_DOMAIN_JOB_OPERATION_START,
        libvirt.VIR_DOMAIN_JOB_OPERATION_SAVE,
        libvirt.VIR_DOMAIN_JOB_OPERATION_RESTORE,
        libvirt.VIR_DOMAIN_JOB_OPERATION_SNAPSHOT,
        libvirt.VIR_DOMAIN_JOB_OPERATION_SNAPSHOT_REVERT,
        libvirt.VIR_DOMAIN_JOB_OPERATION_DUMP,
    )
    return operation in _MIGRATION_OPERATIONS or operation not in known


#: Lifecycle events after which the set of running domains may have changed.
DOMAIN_SET_EVENTS: Final = frozenset(
    {
        libvirt.VIR_DOMAIN_EVENT_STARTED,
        libvirt.VIR_DOMAIN_EVENT_STOPPED,
        libvirt.VIR_DOMAIN_EVENT_UNDEFINED,
        libvirt.VIR_DOMAIN_EVENT_CRASHED,
    }
)


class DomainEvents:
    """Lifecycle events of every domain on one URI, for the daemon's domain discovery.

    One connection of its own, with one VIR_DOMAIN_EVENT_ID_LIFECYCLE callback for all
    domains: a domain started, stopped, crashed or undefined calls ``on_change(name)`` on
    the caller's loop, so the daemon rescans at once rather than at its next periodic rescan
    (which stays, as a safety net for events lost while this connection was down).
    :attr:`alive` turns False when libvirt reports the connection closed; the daemon opens
    a new one at its next rescan. A daemon managing several URIs has one per URI, and its
    connection is opened and closed on that URI's worker (as the URI's calls are): a dead
    link to one host holds up only that host's events.
    """

    def __init__(self, uri: str, on_change: Callable[[str], None]) -> None:
        self.uri = uri
        self._on_change = on_change
        self._conn: libvirt.virConnect | None = None
        self._callback: int | None = None
        self._closed = False

    @property
    def alive(self) -> bool:
        """Open, and libvirt has not reported the connection closed."""
        return self._conn is not None and not self._closed

    async def open(self, timeout: float) -> None:
        """Connect and register the callback (VmUnreachable, OperationTimeout if not)."""
        loop = asyncio.get_running_loop()

        def changed(name: str) -> None:
            self._on_change(name)

        def on_lifecycle(
            _conn: libvirt.virConnect,
            dom: libvirt.virDomain,
            event: int,
            _detail: int,
            _opaque: object,
        ) -> None:
            if event in DOMAIN_SET_EVENTS:
                with contextlib.suppress(RuntimeError):  # the loop has ended
                    loop.call_soon_threadsafe(changed, dom.name())

        def on_close(_conn: libvirt.virConnect, _reason: int, _opaque: object) -> None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._mark_closed)

        def register() -> tuple[libvirt.virConnect, int]:
            conn = open_connection(self.uri)
            try:
                with contextlib.suppress(libvirt.libvirtError):
                    conn.registerCloseCallback(on_close, None)
                callback = conn.domainEventRegisterAny(
                    None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, on_lifecycle, None
                )
            except libvirt.libvirtError as exc:
                with contextlib.suppress(libvirt.libvirtError):
                    conn.close()
                raise _map_error(exc, self.uri, "domainEventRegisterAny", idempotent=False) from exc
            return conn, int(callback)

        # On this URI's own worker, as its calls are: a registration stuck on a dead link
        # to one host must not hold up another host's events or calls.
        worker = _libvirt_thread().worker(self.uri)
        pending = worker.submit(register)
        try:
            async with asyncio.timeout(timeout):
                conn, callback = await asyncio.wrap_future(pending)
        except TimeoutError as exc:
            pending.add_done_callback(functools.partial(_close_registered, worker))
            raise OperationTimeout(
                f"libvirt at {self.uri} did not answer within {timeout:g} s"
            ) from exc
        except asyncio.CancelledError:
            # The daemon forgot this URI (a reload) mid-open: a registration that completes
            # anyway is closed, not leaked with its connection.
            pending.add_done_callback(functools.partial(_close_registered, worker))
            raise
        self._conn, self._callback = conn, callback
        self._closed = False

    def _mark_closed(self) -> None:
        self._closed = True

    async def close(self) -> None:
        """Deregister and hang up (on the libvirt thread; not waited for beyond a moment)."""
        conn, self._conn = self._conn, None
        callback, self._callback = self._callback, None
        if conn is None:
            return

        def close() -> None:
            with contextlib.suppress(libvirt.libvirtError):
                if callback is not None:
                    conn.domainEventDeregisterAny(callback)
            with contextlib.suppress(libvirt.libvirtError):
                conn.unregisterCloseCallback()
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()

        pending = _libvirt_thread().worker(self.uri).submit(close)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(LibvirtBackend.CLOSE_WAIT_S):
                await asyncio.shield(asyncio.wrap_future(pending))


def _close_registered(
    worker: _Worker, future: concurrent.futures.Future[tuple[libvirt.virConnect, int]]
) -> None:
    """Close an event connection whose open completed after its caller gave up waiting
    (on ``worker``, its URI's)."""
    if future.cancelled() or future.exception() is not None:
        return
    conn, callback = future.result()

    def close() -> None:
        with contextlib.suppress(libvirt.libvirtError):
            conn.domainEventDeregisterAny(callback)
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()

    worker.submit(close)


# --------------------------------------------------------------------------------------------
# Events
# --------------------------------------------------------------------------------------------


class _ActualValues:
    """What :meth:`LibvirtBackend.watch_actual` yields: BALLOON_CHANGE actuals in bytes."""

    def __init__(self, vm: str, values: Mailbox[int], alive: Callable[[], bool]) -> None:
        self._vm = vm
        self._values = values
        self._alive = alive

    def __aiter__(self) -> _ActualValues:
        return self

    async def __anext__(self) -> int:
        while True:
            value = self._values.get_nowait()
            if value is not None:
                return value
            if not self._alive():
                raise ConnectionLost(
                    f"connection to libvirt lost while watching VM {self._vm}'s balloon"
                )
            await self._values.wait()

    def latest(self) -> int | None:
        """The newest unread value without waiting (see :class:`~.base.ActualWatch`)."""
        newest = self._values.latest()
        if not self._alive():
            raise ConnectionLost(
                f"connection to libvirt lost while watching VM {self._vm}'s balloon"
            )
        return newest


# --------------------------------------------------------------------------------------------
# The backend
# --------------------------------------------------------------------------------------------


def _close_abandoned(
    future: concurrent.futures.Future[tuple[libvirt.virConnect, libvirt.virDomain]],
) -> None:
    """Close a connection whose open completed after its caller gave up waiting."""
    if future.cancelled() or future.exception() is not None:
        return
    conn, _dom = future.result()

    def close() -> None:
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()

    # Usually called on the libvirt thread already; submit() is right from any thread.
    _libvirt_thread().submit(close)


#: The first QEMU that names tags 10-15 in guest-stats (9.2.0), as virConnectGetVersion
#: writes it.
QEMU_NAMES_EXTENDED_STATS: Final = 9_002_000


class _Session:
    """One open connection and the domain looked up on it; ``closed`` once libvirt says so."""

    def __init__(self, conn: libvirt.virConnect, dom: libvirt.virDomain, number: int) -> None:
        self.conn = conn
        self.dom = dom
        self.number = number
        self.closed = False
        self.close_reason: int | None = None
        #: Called (on the loop) when libvirt reports the connection closed.
        self.on_close: list[Callable[[], None]] = []


class LibvirtBackend(QmpVocabulary):
    """One libvirt domain's balloon (implements :class:`~.base.Backend`).

    ``domain`` is a name or a UUID on ``uri``. ``connect_timeout`` bounds (re)connecting,
    ``command_timeout`` each call and each wait of :meth:`renegotiate`.
    """

    #: Attempts of a query whose connection drops mid-call (the first one included).
    QUERY_ATTEMPTS: Final = 2
    #: How long close() waits for the libvirt thread (see :meth:`_close_later`).
    CLOSE_WAIT_S: Final = 5.0
    WATCH_BACKLOG: Final = WATCH_BACKLOG

    def __init__(
        self,
        domain: str,
        uri: str,
        *,
        connect_timeout: float = 10.0,
        command_timeout: float = 30.0,
    ) -> None:
        if connect_timeout <= 0 or command_timeout <= 0:
            raise UsageError("timeouts must be positive")
        if not domain:
            raise UsageError("empty domain name")
        self.name = domain
        self.uri = uri
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._session: _Session | None = None
        self._sessions = 0
        self._connect_lock = asyncio.Lock()
        self._location = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Whether this session's QEMU names tags 10-15 in guest-stats (None: not asked
        #: yet); False is remembered, so a QEMU 7.2 costs one passthrough call, not one a
        #: tick, and ``_extended_missing`` says why when it is worth saying.
        self._extended_stats: bool | None = None
        self._extended_missing: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"LibvirtBackend({self.name!r}, {self.uri!r})"

    @property
    def _worker(self) -> _Worker:
        """The thread making this URI's libvirt calls: a host that hangs holds only its own."""
        return _libvirt_thread().worker(self.uri)

    async def __aenter__(self) -> LibvirtBackend:
        await self._connected()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection and let libvirt's pending callbacks run before the loop ends."""
        session, self._session = self._session, None
        self._location = None
        if session is not None:
            await self._close_later(session)

    async def _close_later(self, session: _Session) -> None:
        """Close ``session`` on the libvirt thread, waiting at most :attr:`CLOSE_WAIT_S`.

        The thread may be stuck in a call to a libvirtd that stopped answering (the call's
        caller has timed out; libvirt cannot interrupt it): waiting for the close behind it
        would hang a command that has already failed, for good. The close stays queued and
        runs once the thread is free (or the process exits), so nothing leaks in a daemon.
        """
        pending = self._worker.submit(lambda: self._close_blocking(session))
        try:
            async with asyncio.timeout(self.CLOSE_WAIT_S):
                await asyncio.shield(asyncio.wrap_future(pending))
        except TimeoutError:
            _LOG.debug("%s: libvirt is busy; the connection closes when it is free", self.name)

    @staticmethod
    def _close_blocking(session: _Session) -> None:
        # The domain object holds a reference on the connection: while it lives, libvirt
        # keeps the socket (and its event handle) open whatever close() says.
        session.dom = None
        with contextlib.suppress(libvirt.libvirtError):
            session.conn.unregisterCloseCallback()
        with contextlib.suppress(libvirt.libvirtError):
            session.conn.close()

    # ---------------------------------------------------------------- connection

    def _alive(self, session: _Session) -> Callable[[], bool]:
        def alive() -> bool:
            return self._session is session and not session.closed

        return alive

    def _open_blocking(self) -> tuple[libvirt.virConnect, libvirt.virDomain]:
        """Connect and look the domain up (on the libvirt thread)."""
        conn = open_connection(self.uri)
        try:
            dom = self._lookup(conn)
            if not dom.isActive():
                raise VmUnreachable(f"VM {self.name} (libvirt {self.uri}) is not running")
        except libvirt.libvirtError as exc:
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()
            raise _map_error(exc, self.name, "lookup", idempotent=True) from exc
        except BaseException:
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()
            raise
        return conn, dom

    def _lookup(self, conn: libvirt.virConnect) -> libvirt.virDomain:
        """By name, then by UUID (virsh's order for a string that could be either)."""
        try:
            return conn.lookupByName(self.name)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise
            if _UUID.match(self.name):
                try:
                    return conn.lookupByUUIDString(self.name)
                except libvirt.libvirtError as exc2:
                    if exc2.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                        raise
            raise VmUnreachable(
                f"no libvirt domain {self.name!r} on {self.uri} (neither a name nor a UUID there)"
            ) from exc

    async def _connected(self) -> _Session:
        """The session, opened (again, after libvirt reported it closed) if need be."""
        session = self._session
        if session is not None and not session.closed:
            return session
        async with self._connect_lock:
            session = self._session
            if session is not None and not session.closed:
                return session
            if session is not None:
                old = session
                self._session = None
                _LOG.debug(
                    "reconnecting to %s after a close (reason %s)", self.uri, old.close_reason
                )
                await self._close_later(old)
            self._loop = asyncio.get_running_loop()
            deadline = self._loop.time() + self._connect_timeout
            delay = 0.1
            while True:
                try:
                    conn, dom = await self._open_until(deadline)
                    break
                except _CannotConnect as exc:
                    # A reconnect waits for a restarting libvirtd (its socket comes back within
                    # seconds); a first connect does not: no libvirtd is the usual reason there.
                    if not self._sessions or self._loop.time() + delay >= deadline:
                        raise VmUnreachable(f"cannot reach VM {self.name}: {exc}") from exc
                    _LOG.debug("connecting to %s: %s; retrying", self.uri, exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 1.0)
            self._sessions += 1
            session = _Session(conn, dom, self._sessions)
            await self._worker.call(lambda: self._watch_close(session))
            self._session = session
            self._location = None
            self._extended_stats = None  # another QEMU may be behind the domain now
            return session

    async def _open_until(self, deadline: float) -> tuple[libvirt.virConnect, libvirt.virDomain]:
        """:meth:`_open_blocking` on the libvirt thread, given up at ``deadline`` (loop time).

        libvirt.open has no timeout of its own: against a libvirtd that accepts and never
        answers (stopped, wedged) it blocks for good, and so would every command. An open
        that completes after it was given up is closed on the libvirt thread.
        """
        pending = self._worker.submit(self._open_blocking)
        try:
            async with asyncio.timeout_at(deadline):
                return await asyncio.wrap_future(pending)
        except TimeoutError as exc:
            pending.add_done_callback(_close_abandoned)
            raise VmUnreachable(
                f"cannot reach VM {self.name}: libvirt at {self.uri} did not answer within "
                f"{self._connect_timeout:g} s"
            ) from exc

    def _watch_close(self, session: _Session) -> None:
        """Mark the session closed when libvirt says so (EOF, keepalive, libvirtd restart)."""
        loop = self._loop
        assert loop is not None

        def closed_on_loop(reason: int) -> None:
            session.closed = True
            session.close_reason = reason
            for callback in session.on_close:
                callback()

        def on_close(_conn: libvirt.virConnect, reason: int, _opaque: object) -> None:
            # Called from whichever thread noticed: hand over to the loop.
            with contextlib.suppress(RuntimeError):  # the loop has ended: nobody to tell
                loop.call_soon_threadsafe(closed_on_loop, reason)

        try:
            session.conn.registerCloseCallback(on_close, None)
        except libvirt.libvirtError as exc:
            _LOG.debug(
                "%s: no close callback (%s); relying on call errors", self.uri, _message(exc)
            )

    async def _call(
        self, what: str, fn: Callable[[libvirt.virDomain], _T], *, idempotent: bool
    ) -> _T:
        """Run ``fn(domain)`` in a thread; errors mapped; a query retried after a drop."""
        attempts = self.QUERY_ATTEMPTS if idempotent else 1
        for attempt in range(1, attempts + 1):
            session = await self._connected()
            try:
                async with asyncio.timeout(self._command_timeout):
                    return await self._worker.call(functools.partial(fn, session.dom))
            except libvirt.libvirtError as exc:
                mapped = _map_error(exc, self.name, what, idempotent=idempotent)
                if isinstance(mapped, ConnectionLost):
                    session.closed = True  # do not wait for the close callback to say so
                    if attempt < attempts:
                        _LOG.debug("%s: %s; retrying on a new connection", self.name, mapped)
                        continue
                raise mapped from exc
            except TimeoutError as exc:
                raise OperationTimeout(
                    f"libvirt did not answer {what} for VM {self.name} within "
                    f"{self._command_timeout:g} s"
                ) from exc
        raise AssertionError("unreachable: the last attempt returns or raises")

    # ---------------------------------------------------------------- Backend

    async def actual(self) -> int:
        """Guest memory now, bytes: memoryStats' ``actual`` (libvirt asks QEMU's query-balloon
        then; ``info()`` would give the value of the last BALLOON_CHANGE, up to 1 s old)."""
        raw = await self._call("memoryStats", lambda d: d.memoryStats(), idempotent=True)
        value = raw.get("actual")
        if not isinstance(value, int) or value <= 0:
            raise CommandFailed(
                f"VM {self.name} has no balloon device (libvirt reports no balloon 'actual')",
                error_class="DeviceNotActive",
            )
        return value * 1024

    async def max_memory(self) -> int:
        """The domain's maximum memory (``<memory>``), bytes."""
        kib = await self._call("maxMemory", lambda d: d.maxMemory(), idempotent=True)
        return int(kib) * 1024

    async def set_target(self, target: int) -> None:
        """``setMemoryFlags(KiB, AFFECT_LIVE)``: the guest's target size. Never retried."""
        if isinstance(target, bool) or not isinstance(target, int) or target <= 0:
            raise UsageError(f"balloon target must be a positive number of bytes, not {target!r}")
        kib = max(1, target // 1024)
        await self._call(
            "setMemoryFlags",
            lambda d: d.setMemoryFlags(kib, libvirt.VIR_DOMAIN_AFFECT_LIVE),
            idempotent=False,
        )

    async def stats(self) -> GuestStats:
        """``memoryStats()`` normalized (virtio.spec.STAT_NAMES, bytes: :func:`normalize_stats`),
        with tags 10-15 from QEMU's ``guest-stats`` through the passthrough.

        libvirt's memoryStats drops them (see the module's docstring), and a libvirt user
        asking for the guest's statistics expects what the guest reports, as over QMP. Both
        reads are of one guest update: when a new one arrived between them, memoryStats is
        read again, and if they still differ the six are left out of this reading rather
        than mixed in from another. A QEMU that does not name them (before 9.2) is asked
        once per connection; a driver without passthrough gets :data:`NO_EXTENDED_STATS`
        in ``unavailable``.
        """
        reading = normalize_stats(await self._memory_stats())
        if self._extended_stats is None and await self._qemu_before_9_2():
            self._extended_stats = False  # nothing to ask for: no passthrough, no taint
            self._extended_missing = {}
        if self._extended_stats is False:
            return replace(reading, unavailable=dict(self._extended_missing))
        try:
            reply = await self._guest_stats_reply()
        except NoQmpCarrier:
            session = self._session
            driver = await self._worker.call(lambda: self._driver_name(session))
            why = NO_EXTENDED_STATS.format(driver=driver)
            self._extended_stats = False
            self._extended_missing = {name: why for name in EXTENDED_STAT_NAMES}
            return replace(reading, unavailable=dict(self._extended_missing))
        except CommandFailed as exc:
            # memoryStats answered; say why the rest is missing, and ask again next time.
            why = f"QEMU's guest-stats through libvirt failed: {exc}"
            return replace(reading, unavailable={name: why for name in EXTENDED_STAT_NAMES})
        if not names_extended_stats(reply):
            self._extended_stats = False  # QEMU before 9.2: it has no such statistics
            self._extended_missing = {}
            return reading
        self._extended_stats = True
        qemu = decode_guest_stats(reply)
        if qemu.last_update != reading.last_update:
            reading = normalize_stats(await self._memory_stats())
            if qemu.last_update != reading.last_update:
                _LOG.debug(
                    "%s: guest stats moved between memoryStats and guest-stats; "
                    "tags 10-15 left out of this reading",
                    self.name,
                )
                return reading
        extended = {name: qemu.stats[name] for name in EXTENDED_STAT_NAMES if name in qemu.stats}
        return replace(reading, stats={**reading.stats, **extended})

    async def migrating(self) -> bool:
        """Whether the domain is migrating now: its job (``jobStats()``, mapped by
        :func:`migration_from_job`). libvirtd answers from its own job bookkeeping (it asks
        QEMU only while a migration runs). A driver without jobs (VIR_ERR_NO_SUPPORT) has
        no migration to report: False."""

        def job(dom: libvirt.virDomain) -> Mapping[str, object] | None:
            try:
                stats: Mapping[str, object] = dom.jobStats()
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_SUPPORT:
                    return None
                raise
            return stats

        found = await self._call("jobStats", job, idempotent=True)
        return found is not None and migration_from_job(found)

    async def _qemu_before_9_2(self) -> bool:
        """Whether libvirt's QEMU driver runs a QEMU too old to name tags 10-15 (before 9.2).

        Then :meth:`stats` sends no passthrough at all: each one marks the domain "tainted:
        custom-monitor" in its log, which is worth it only where QEMU has something to give.
        virConnectGetVersion is the QEMU binary's version (major * 1,000,000 + minor * 1,000
        + micro). Another driver, or no answer, is not "too old": the reply decides.
        """
        session = self._session

        def version() -> int | None:
            if session is None:
                return None
            with contextlib.suppress(libvirt.libvirtError):
                if session.conn.getType() == "QEMU":
                    return int(session.conn.getVersion())
            return None

        found = await self._worker.call(version)
        return found is not None and found < QEMU_NAMES_EXTENDED_STATS

    async def _memory_stats(self) -> Mapping[str, int]:
        raw: Mapping[str, int] = await self._call(
            "memoryStats", lambda d: d.memoryStats(), idempotent=True
        )
        return raw

    async def stats_period(self) -> int:
        """The period of the live XML's ``<memballoon><stats period=.../>`` (0: off)."""
        xml = await self._call("XMLDesc", lambda d: d.XMLDesc(0), idempotent=True)
        return stats_period_of(xml)

    async def set_stats_period(self, seconds: int) -> None:
        """``setMemoryStatsPeriod(seconds, AFFECT_LIVE)`` (never retried: an action)."""
        if isinstance(seconds, bool) or not isinstance(seconds, int) or seconds < 0:
            raise UsageError(
                f"stats period must be a whole number of seconds >= 0, not {seconds!r}"
            )
        await self._call(
            "setMemoryStatsPeriod",
            lambda d: d.setMemoryStatsPeriod(seconds, libvirt.VIR_DOMAIN_AFFECT_LIVE),
            idempotent=False,
        )

    @asynccontextmanager
    async def watch_actual(self) -> AsyncIterator[_ActualValues]:
        """BALLOON_CHANGE ``actual`` values (bytes) from now on, while the context lasts.

        libvirt calls back on its event thread, which hands each value to this loop; the
        newest :attr:`WATCH_BACKLOG` values are kept. The iterator ends with
        :class:`ConnectionLost` when the connection closes: events of the gap are lost, so
        re-read :meth:`actual` before going on.
        """
        session = await self._connected()
        values: Mailbox[int] = Mailbox(self.WATCH_BACKLOG)
        loop = asyncio.get_running_loop()

        def on_balloon(
            _conn: libvirt.virConnect, _dom: libvirt.virDomain, actual_kib: int, _opaque: object
        ) -> None:
            # libvirt dispatches on its event thread; handing over is right from any thread.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(values.put, int(actual_kib) * 1024)

        session.on_close.append(values.wake)

        def register(dom: libvirt.virDomain) -> int:
            return int(
                session.conn.domainEventRegisterAny(
                    dom, libvirt.VIR_DOMAIN_EVENT_ID_BALLOON_CHANGE, on_balloon, None
                )
            )

        try:
            dom = session.dom
            callback_id = await self._worker.call(lambda: register(dom))
        except libvirt.libvirtError as exc:
            raise _map_error(exc, self.name, "domainEventRegisterAny", idempotent=False) from exc
        try:
            yield _ActualValues(self.name, values, self._alive(session))
        finally:
            with contextlib.suppress(ValueError):
                session.on_close.remove(values.wake)
            if not session.closed:
                with contextlib.suppress(libvirt.libvirtError):
                    await self._worker.call(
                        lambda: session.conn.domainEventDeregisterAny(callback_id)
                    )

    # ---------------------------------------------------------------- QMP passthrough

    def _driver_name(self, session: _Session | None) -> str:
        if session is None:
            return self.uri
        with contextlib.suppress(libvirt.libvirtError):
            return str(session.conn.getType())
        return self.uri

    async def _execute(self, command: str, arguments: Mapping[str, object] | None = None) -> object:
        """One QMP command through ``qemuMonitorCommand``; its ``return`` value.

        A QMP error reply is :class:`CommandFailed` with QMP's class (as the QMP backend);
        a driver without passthrough is :class:`CommandFailed` ``VIR_ERR_NO_SUPPORT`` with
        :data:`NO_PASSTHROUGH`: a fact about the hypervisor, not a mistake in the command
        line, and a daemon must tell "this VM cannot" from "the config is wrong".
        """
        message: dict[str, object] = {"execute": command}
        if arguments is not None:
            message["arguments"] = dict(arguments)
        text = json.dumps(message)
        _LOG.debug("%s -> %s", self.name, text)
        try:
            raw = await self._call(
                command,
                lambda d: libvirt_qemu.qemuMonitorCommand(d, text, 0),
                idempotent=is_idempotent(command),
            )
        except CommandFailed as exc:
            if exc.error_class == "VIR_ERR_NO_SUPPORT":
                session = self._session
                driver = await self._worker.call(lambda: self._driver_name(session))
                raise NoQmpCarrier(
                    NO_PASSTHROUGH.format(vm=self.name, driver=driver, what=command),
                    error_class="VIR_ERR_NO_SUPPORT",
                ) from exc
            raise
        _LOG.debug("%s <- %s", self.name, _one_line(str(raw), 200))
        try:
            reply = json.loads(raw)
        except (TypeError, ValueError) as exc:
            raise PeerError(f"VM {self.name}: {command} through libvirt: not JSON") from exc
        if not isinstance(reply, dict):
            raise PeerError(f"VM {self.name}: {command} through libvirt: not a JSON object")
        if "error" in reply:
            error = reply["error"]
            if not isinstance(error, dict):
                raise PeerError(f"VM {self.name}: {command}: a malformed error reply")
            error_class = str(error.get("class", "GenericError"))
            raise refusal(self.name, command, error_class, _one_line(str(error.get("desc", ""))))
        if "return" not in reply:
            raise PeerError(f"VM {self.name}: {command}: a reply with neither return nor error")
        return reply["return"]

    async def read_guest_memory(self, gpa: int, size: int) -> bytes:
        """``virDomainMemoryPeek(VIR_MEMORY_PHYSICAL)`` in chunks of at most 64 KiB (libvirt's
        limit per call); works on remote connections, unlike ``pmemsave``."""
        for value in (gpa, size):
            if isinstance(value, bool) or not isinstance(value, int):
                raise UsageError(f"cannot read {size!r} bytes at {gpa!r}")
        if gpa < 0 or not 0 < size <= MAX_READ:
            raise UsageError(f"cannot read {size!r} bytes at {gpa!r}: at most {MAX_READ} bytes")
        if gpa + size > 1 << 64:
            raise UsageError(f"{size} bytes at {gpa:#x} run past the end of the address space")

        def peek(dom: libvirt.virDomain) -> bytes:
            out = bytearray()
            while len(out) < size:
                n = min(PEEK_CHUNK, size - len(out))
                out += dom.memoryPeek(gpa + len(out), n, libvirt.VIR_MEMORY_PHYSICAL)
            return bytes(out)

        data = await self._call("memoryPeek", peek, idempotent=True)
        if len(data) != size:
            raise PeerError(f"VM {self.name}: memoryPeek of {size} bytes gave {len(data)}")
        return data

    # ---------------------------------------------------------------- renegotiate (via qmpvocab)

    def _hotplug_hint(self, driver: str, ident: str) -> str:
        return (
            "give the domain a <controller type='pci' model='pcie-root-port'/> and put the "
            "<memballoon> on its bus (<address type='pci' bus='0x01' .../>), with "
            "<features><acpi/></features> so the guest releases it promptly"
        )

    @asynccontextmanager
    async def _removal_waiter(self, plan: _ReplugPlan) -> AsyncIterator[RemovalWait]:
        """Poll QEMU's QOM tree until the balloon is gone.

        libvirt consumes QEMU's DEVICE_DELETED itself (9.0 logs "don't know how to remove a
        memballoon device" and keeps the <memballoon> in its live XML) and passes on no QMP
        event; its VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED does fire, but the QOM tree is the
        authority that device_add's "Duplicate device ID" checks, so it is what is polled.
        """

        async def gone() -> None:
            while await self._balloon_present(plan.location):
                await asyncio.sleep(_REMOVAL_POLL_S)

        yield gone

    async def renegotiate(self, enable: Collection[str], disable: Collection[str]) -> FeatureState:
        """Replug through QMP passthrough (see :meth:`QmpVocabulary.renegotiate`).

        libvirt 9.0 accepts it: it keeps the <memballoon> definition through the replug and
        drives the new device (same id) with setMemory and memoryStats afterwards. But its
        live XML keeps the *old* feature attributes (autodeflate, freePageReporting), so a
        migration or save/restore would bring them back: said in a warning.
        """
        state = await super().renegotiate(enable, disable)
        _LOG.warning(
            "VM %s: the balloon was replugged behind libvirt's back; its live XML still shows "
            "the old <memballoon> attributes, and a migration or restore would recreate them",
            self.name,
        )
        return state


__all__ = [
    "NO_EXTENDED_STATS",
    "NO_PASSTHROUGH",
    "PEEK_CHUNK",
    "STAT_NAMES",
    "DomainRow",
    "LibvirtBackend",
    "balloon_model",
    "error_name",
    "list_balloon_domains",
    "normalize_stats",
    "open_connection",
    "running_balloon_domains",
    "stats_period_of",
]
