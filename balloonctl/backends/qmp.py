"""A VM's balloon through its QMP socket, with ``qemu.qmp`` (the only module importing it).

What this module adds to ``qemu.qmp``, and why:

* **Errors.** Every ``qemu.qmp`` failure becomes a :class:`~balloonctl.errors.BalloonError`
  with a one-line message, chained with ``raise ... from``: ``ExecuteError`` ->
  :class:`CommandFailed` (QMP's error class kept), connection failures ->
  :class:`VmUnreachable`, a drop mid-command -> :class:`ConnectionLost`, no answer in time ->
  :class:`OperationTimeout`, a reply balloonctl cannot decode -> :class:`PeerError`.
  ``asyncio.CancelledError`` is never caught or wrapped.
* **Retries, only where they are safe.** Connecting is retried briefly (QEMU may be
  starting). Queries (:func:`is_idempotent`) are retried after a reconnect when the connection
  drops mid-command. ``balloon``, ``qom-set``, ``device_add`` and ``device_del`` never are:
  after a drop their outcome is unknown, and sending them twice could act twice.
* **Bounded events.** ``qemu.qmp``'s :class:`EventListener` keeps every event in an unbounded
  history and queue, and every client carries one such listener for all events. A daemon
  that runs for weeks on a VM emitting BALLOON_CHANGE must not grow, so both the default
  listener and ours are :class:`BoundedEventListener`.
* **Quiet library logging.** ``qemu.qmp`` logs at ERROR when a peer hangs up; unless
  balloonctl's own logger is at DEBUG (``-v``), its logger is set to CRITICAL so that the CLI
  prints only its own one line.

QMP shapes are QEMU 7.2's (``qapi/*.json``; recorded in ``fixtures/transcripts/qemu-7.2``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
import tempfile
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Final

from qemu.qmp import (
    ConnectError,
    EventListener,
    ExecInterruptedError,
    ExecuteError,
    Message,
    QMPClient,
    QMPError,
    Runstate,
    StateError,
)
from qemu.qmp.error import ProtocolError
from qemu.qmp.events import EventFilter
from qemu.qmp.message import DeserializationError, UnexpectedTypeError
from qemu.qmp.qmp_client import (
    BadReplyError,
    GreetingError,
    ServerParseError,
)
from qemu.qmp.qmp_client import (
    NegotiationError as QmpNegotiationError,
)
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
)

from balloonctl.backends.address import QmpAddress, parse_address
from balloonctl.backends.base import MAX_READ, FeatureState, GuestStats
from balloonctl.errors import (
    BalloonError,
    CommandFailed,
    ConnectionLost,
    OperationTimeout,
    PeerError,
    UsageError,
    VmUnreachable,
)
from balloonctl.virtio.features import get_profile, parse_qemu_features

_LOG = logging.getLogger(__name__)

#: ``qemu.qmp``'s logger root; its children are per-module and per-connection.
_LIBRARY_LOGGER: Final = "qemu.qmp"

#: Commands that only read state: resending one after a drop cannot change the VM.
_QUERIES: Final = frozenset(
    {
        "query-balloon",
        "query-memory-size-summary",
        "query-status",
        "query-version",
        "qom-get",
        "qom-list",
        "qom-list-properties",
        "device-list-properties",
    }
)
#: Commands that act. After a drop nobody knows whether QEMU ran them, so they are sent once.
_NEVER_RETRIED: Final = frozenset({"balloon", "qom-set", "device_add", "device_del"})

#: Where QEMU puts ``-device ...,id=X``: /machine/peripheral/X (hw/core/qdev.c,
#: qdev_set_id); devices without an id go under /machine/peripheral-anon.
_PERIPHERAL: Final = "/machine/peripheral/"
#: Where the balloon is when ``x-query-virtio`` (QEMU >= 7.2) cannot tell us.
DEFAULT_BALLOON_PATH: Final = "/machine/peripheral/balloon0"
#: A virtio-pci/ccw proxy's VirtIODevice child (hw/virtio/virtio-pci.c,
#: virtio_instance_init_common): the path x-query-virtio-status wants.
_BACKEND_CHILD: Final = "virtio-backend"

#: balloonctl feature names -> the balloon device property that offers the bit
#: (hw/virtio/virtio-balloon.c virtio_balloon_properties, DEFINE_VIRTIO_COMMON_FEATURES in
#: hw/virtio/virtio.c; ``sg`` is the simulated seed-sg device's). A proxy such as
#: virtio-balloon-pci aliases all of them (qdev_alias_all_properties).
FEATURE_PROPERTIES: Final[Mapping[str, str]] = {
    "deflate-on-oom": "deflate-on-oom",
    "page-reporting": "free-page-reporting",
    "free-page-hint": "free-page-hint",
    "page-poison": "page-poison",
    "sg": "sg",
    "ring-indirect-desc": "indirect_desc",
    "ring-event-idx": "event_idx",
}

#: Properties device-list-properties lists that must not be passed back to device_add:
#: runtime state, not configuration. The polling interval is restored with qom-set after the
#: driver is back (setting it before realize would start QEMU's timer on a device with no
#: stats queue yet).
_NOT_CARRIED: Final = frozenset(
    {
        "guest-stats",
        "guest-stats-polling-interval",
        "type",
        "realized",
        "hotpluggable",
        "hotplugged",
        "parent_bus",
        "id",
        "driver",
        "bus",
    }
)

#: virtio spec 2.1 device status bit 4, as QEMU names it in x-query-virtio-status
#: (hw/virtio/virtio-qmp.c virtio_config_status_map): "MACRO: description" in 7.2.
_DRIVER_OK: Final = "VIRTIO_CONFIG_S_DRIVER_OK"
_DRIVER_OK_DESCRIPTION: Final = "Driver setup and ready"

#: Values QEMU shows for a statistic the guest never reported. QEMU keeps -1 in a uint64
#: (virtio-balloon.c reset_stats) and visits it as uint64, so the wire may carry either form.
_UNSUPPORTED_STAT: Final = frozenset({-1, (1 << 64) - 1})


def is_idempotent(command: str) -> bool:
    """Whether ``command`` may be resent after a drop: queries yes, actions never."""
    if command in _NEVER_RETRIED:
        return False
    return command in _QUERIES or command.startswith("x-query-")


def _one_line(text: str, limit: int = 300) -> str:
    """A message squeezed onto one line (QEMU's and the library's may hold newlines)."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _same(a: object, b: object) -> bool:
    """Equality that does not take JSON ``true`` for ``1``."""
    return type(a) is type(b) and a == b


def _as_object(reply: object, what: str) -> Mapping[str, object]:
    if not isinstance(reply, dict):
        raise PeerError(f"{what}: expected a JSON object, got {type(reply).__name__}")
    return reply


def _int_member(obj: Mapping[str, object], key: str, what: str, *, minimum: int = 0) -> int:
    value = obj.get(key)
    if not _is_int(value):
        raise PeerError(f"{what}: {key!r} is not an integer")
    assert isinstance(value, int)
    if value < minimum:
        raise PeerError(f"{what}: {key!r} is {value}, below {minimum}")
    return value


# --------------------------------------------------------------------------------------------
# Pure decoders (tested on recorded QEMU replies)
# --------------------------------------------------------------------------------------------


def decode_guest_stats(reply: object) -> GuestStats:
    """``qom-get guest-stats`` -> :class:`GuestStats`.

    QEMU answers ``{"stats": {"stat-free-memory": N, ...}, "last-update": EPOCH_S}``
    (hw/virtio/virtio-balloon.c balloon_stats_get_all). Names lose ``stat-`` (DESIGN.md),
    statistics the guest does not report (-1) are dropped, and anything that is not a
    non-negative integer is a :class:`PeerError`: a daemon must not act on a guessed number.
    """
    obj = _as_object(reply, "qom-get guest-stats")
    last_update = _int_member(obj, "last-update", "qom-get guest-stats")
    raw = _as_object(obj.get("stats"), "qom-get guest-stats: 'stats'")
    stats: dict[str, int] = {}
    for key, value in raw.items():
        if not _is_int(value):
            raise PeerError(f"qom-get guest-stats: {key!r} is not an integer")
        assert isinstance(value, int)
        if value in _UNSUPPORTED_STAT:
            continue
        if value < 0:
            raise PeerError(f"qom-get guest-stats: {key!r} is negative ({value})")
        stats[key.removeprefix("stat-")] = value
    return GuestStats(last_update=last_update, stats=stats)


def profile_hint(reply: object) -> str | None:
    """The profile an x-query-virtio-status reply's feature names point to, if any."""
    obj = _as_object(reply, "x-query-virtio-status")
    for key in ("host-features", "device-features", "guest-features"):
        features = obj.get(key)
        if isinstance(features, dict):
            hint = parse_qemu_features(features).profile_hint
            if hint is not None:
                return hint
    return None


def device_status_names(status: object) -> tuple[str, ...]:
    """``status.statuses`` of x-query-virtio-status as short names (``VIRTIO_CONFIG_S_...``).

    7.2 writes ``"VIRTIO_CONFIG_S_DRIVER_OK: Driver setup and ready"``; a string without a
    ``NAME:`` prefix is kept whole.
    """
    obj = _as_object(status, "x-query-virtio-status: 'status'")
    statuses = obj.get("statuses", [])
    if not isinstance(statuses, list) or not all(isinstance(s, str) for s in statuses):
        raise PeerError("x-query-virtio-status: 'status.statuses' is not a list of strings")
    names = []
    for item in statuses:
        assert isinstance(item, str)
        macro, sep, _ = item.partition(":")
        names.append(macro.strip() if sep else item.strip())
    return tuple(names)


def _driver_ok(names: Iterable[str]) -> bool:
    return any(n in (_DRIVER_OK, _DRIVER_OK_DESCRIPTION) for n in names)


def decode_virtio_status(
    reply: object, path: str = "", *, profile_name: str | None = None
) -> FeatureState:
    """``x-query-virtio-status`` -> :class:`FeatureState`.

    ``host-features`` is what the device offers and ``guest-features`` what the driver acked
    (qapi/virtio.json VirtioStatus, QEMU 7.2). The profile is the one the device's own
    feature names point to: a device naming ``VIRTIO_BALLOON_F_SG`` is ``seed-sg``; anything
    else reads bit 3 as virtio 1.2 does (DESIGN.md). ``profile_name`` is for a caller that
    knows better (a seed-sg device with SG switched off names no seed-only feature). Bits the
    profile has no name for are kept in ``unknown_offered``/``unknown_acked``, never guessed at.
    """
    obj = _as_object(reply, "x-query-virtio-status")
    offered_raw = obj.get("host-features", obj.get("device-features"))
    acked_raw = obj.get("guest-features")
    offered = parse_qemu_features(_as_object(offered_raw, "x-query-virtio-status: host-features"))
    acked = parse_qemu_features(_as_object(acked_raw, "x-query-virtio-status: guest-features"))
    for text in offered.unrecognised + acked.unrecognised:
        _LOG.debug("x-query-virtio-status: feature string not understood: %r", text)
    profile = get_profile(
        profile_name or offered.profile_hint or acked.profile_hint or "virtio-1.2"
    )
    known = 0
    for bit in profile.bits:
        known |= bit.mask
    names = device_status_names(obj.get("status", {"statuses": []}))
    return FeatureState(
        profile=profile.name,
        offered=tuple(profile.decode(offered.mask & known)),
        acked=tuple(profile.decode(acked.mask & known)),
        driver_ok=_driver_ok(names),
        unknown_offered=offered.mask & ~known,
        unknown_acked=acked.mask & ~known,
        device_path=path,
    )


def feature_property_changes(enable: Collection[str], disable: Collection[str]) -> dict[str, bool]:
    """Feature names -> the device properties a replug sets (``{"free-page-reporting": False}``).

    Only features a device property controls can change; the rest (``stats-vq``,
    ``version-1``, ...) are fixed by the device type, so asking for them is a
    :class:`UsageError` naming what can be changed.
    """
    changeable = ", ".join(FEATURE_PROPERTIES)
    both = set(enable) & set(disable)
    if both:
        raise UsageError(f"asked to both enable and disable {', '.join(sorted(both))}")
    changes: dict[str, bool] = {}
    for names, value in ((enable, True), (disable, False)):
        for name in names:
            prop = FEATURE_PROPERTIES.get(name)
            if prop is None:
                raise UsageError(
                    f"feature {name!r} cannot be changed on a live balloon "
                    f"(the ones that can: {changeable})"
                )
            changes[prop] = value
    return changes


@dataclass(frozen=True, slots=True)
class BalloonLocation:
    """Where the balloon is in QEMU's QOM tree, found once per connection."""

    #: The device that was ``-device``'d (virtio-balloon-pci), e.g. /machine/peripheral/balloon0.
    device: str
    #: The VirtIODevice itself, the path x-query-virtio-status wants.
    backend: str

    @property
    def device_id(self) -> str | None:
        """The ``id=`` the device was added with, or None for an anonymous one."""
        if self.device.startswith(_PERIPHERAL):
            rest = self.device[len(_PERIPHERAL) :]
            if rest and "/" not in rest:
                return rest
        return None

    @classmethod
    def from_backend(cls, backend: str) -> BalloonLocation:
        """The device owning a VirtIODevice path: its parent when it is a proxy's child."""
        parent, _, leaf = backend.rpartition("/")
        device = parent if leaf == _BACKEND_CHILD and parent else backend
        return cls(device=device, backend=backend)


def locate_balloon(reply: object) -> BalloonLocation | None:
    """The balloon in an ``x-query-virtio`` reply (``[{"name", "path"}]``), or None."""
    if not isinstance(reply, list):
        raise PeerError("x-query-virtio: expected a list")
    for item in reply:
        entry = _as_object(item, "x-query-virtio: an entry")
        name, path = entry.get("name"), entry.get("path")
        if not isinstance(name, str) or not isinstance(path, str):
            raise PeerError("x-query-virtio: an entry without a string 'name' and 'path'")
        if name == "virtio-balloon" and path:
            return BalloonLocation.from_backend(path)
    return None


# --------------------------------------------------------------------------------------------
# Events
# --------------------------------------------------------------------------------------------


class BoundedEventListener(EventListener):
    """An :class:`EventListener` that keeps at most ``maxlen`` unread events and no history.

    ``qemu.qmp``'s listener appends every event it accepts to a history list and an unbounded
    queue. That is right for a test script and wrong for a daemon: a consumer that falls behind
    must lose the *oldest* values (only the latest ``actual`` matters), never grow memory.
    """

    def __init__(
        self,
        names: str | Iterable[str] | None = None,
        *,
        maxlen: int,
        event_filter: EventFilter | None = None,
    ) -> None:
        super().__init__(names, event_filter)
        if maxlen < 1:
            raise ValueError("maxlen must be at least 1")
        self._pending: deque[Message] = deque(maxlen=maxlen)
        self._arrived = asyncio.Event()
        #: Events dropped because nobody read them in time.
        self.dropped = 0

    @property
    def history(self) -> tuple[Message, ...]:
        """Always empty: keeping every event is exactly what this listener exists to avoid."""
        return ()

    @property
    def maxlen(self) -> int:
        """How many unread events are kept."""
        assert self._pending.maxlen is not None
        return self._pending.maxlen

    def __len__(self) -> int:
        return len(self._pending)

    async def put(self, event: Message) -> None:
        """Keep ``event`` if accepted, dropping the oldest unread one when full."""
        if not self.accept(event):
            return
        if len(self._pending) == self.maxlen:
            self.dropped += 1
        self._pending.append(event)
        self._arrived.set()

    def get_nowait(self) -> Message | None:
        """The oldest unread event, or None."""
        return self._pending.popleft() if self._pending else None

    async def get(self) -> Message:
        """Wait for the oldest unread event."""
        while not self._pending:
            self._arrived.clear()
            await self._arrived.wait()
        return self._pending.popleft()

    async def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for an unread event; whether there is one."""
        if self._pending:
            return True
        self._arrived.clear()
        try:
            async with asyncio.timeout(timeout):
                await self._arrived.wait()
        except TimeoutError:
            pass
        return bool(self._pending)

    def empty(self) -> bool:
        """Whether no event is waiting."""
        return not self._pending

    def clear(self) -> list[Message]:
        """Drop and return the unread events (``qemu.qmp`` calls this on removal)."""
        events = list(self._pending)
        self._pending.clear()
        return events


#: How often a waiter on events looks whether the connection is still up.
_RUNSTATE_POLL: Final = 0.2


async def _next_event(
    alive: Callable[[], bool], listener: BoundedEventListener, vm: str, what: str
) -> Message:
    """The next event of ``listener``; :class:`ConnectionLost` if the connection drops first.

    Without the check a waiter would sleep forever on a dead socket: ``qemu.qmp`` tells
    listeners nothing when the reader task ends. ``alive`` is false once the session the
    listener was waiting on is over, even if another command has reconnected since: events
    of the gap are lost, and the caller must know.
    """
    while True:
        event = listener.get_nowait()
        if event is not None:
            return event
        if not alive():
            raise ConnectionLost(f"connection to VM {vm} lost while waiting for {what}")
        await listener.wait(_RUNSTATE_POLL)


def _balloon_change_actual(event: Message) -> int:
    data = _as_object(event.get("data"), "BALLOON_CHANGE: 'data'")
    return _int_member(data, "actual", "BALLOON_CHANGE")


class _ActualValues:
    """The async iterator :meth:`QmpBackend.watch_actual` yields: BALLOON_CHANGE ``actual``s."""

    def __init__(self, vm: str, alive: Callable[[], bool], listener: BoundedEventListener) -> None:
        self._vm = vm
        self._alive = alive
        self._listener = listener

    def __aiter__(self) -> _ActualValues:
        return self

    async def __anext__(self) -> int:
        event = await _next_event(self._alive, self._listener, self._vm, "BALLOON_CHANGE")
        return _balloon_change_actual(event)


# --------------------------------------------------------------------------------------------
# Library logging
# --------------------------------------------------------------------------------------------


class _LibraryLevel:
    """Whether the library logger's level is one balloonctl set (not the user's own)."""

    ours = False


def _quiet_library_logging() -> None:
    """Silence ``qemu.qmp`` below CRITICAL unless balloonctl logs at DEBUG (``-v``).

    The library logs ERROR lines (with tracebacks at DEBUG) whenever a peer hangs up; the CLI
    reports the same event as one :class:`ConnectionLost` line. A level someone else set on
    the library logger is left alone.
    """
    library = logging.getLogger(_LIBRARY_LOGGER)
    if logging.getLogger("balloonctl").isEnabledFor(logging.DEBUG):
        if _LibraryLevel.ours:
            library.setLevel(logging.NOTSET)
            _LibraryLevel.ours = False
    elif library.level == logging.NOTSET or _LibraryLevel.ours:
        library.setLevel(logging.CRITICAL)
        _LibraryLevel.ours = True


# --------------------------------------------------------------------------------------------
# Connection errors
# --------------------------------------------------------------------------------------------

#: Failures worth another connect attempt: the socket is not there *yet*, nothing listens
#: *yet*, or QEMU hung up during the handshake (it is starting or stopping).
_TRANSIENT_CONNECT: Final = (
    FileNotFoundError,
    ConnectionRefusedError,
    ConnectionResetError,
    EOFError,
)


def _is_transient_connect_error(exc: BaseException) -> bool:
    return isinstance(exc, ConnectError) and isinstance(exc.exc, _TRANSIENT_CONNECT)


def _connect_reason(exc: ConnectError, address: QmpAddress) -> str:
    """Why a connection failed, as the end of a one-line message."""
    root = exc.exc
    if isinstance(root, FileNotFoundError):
        return "no such socket"
    if isinstance(root, ConnectionRefusedError):
        return "connection refused (nothing is listening)"
    if isinstance(root, PermissionError):
        return "permission denied"
    if isinstance(root, socket.gaierror):
        return f"unknown host {address.host!r}"
    if isinstance(root, EOFError | ConnectionResetError):
        return "the monitor closed the connection before its QMP greeting"
    if isinstance(root, GreetingError):
        return "the peer did not greet as a QMP monitor"
    if isinstance(root, QmpNegotiationError):
        return "QMP capabilities negotiation failed"
    if isinstance(root, OSError):
        return _one_line(root.strerror or str(root) or type(root).__name__)
    return _one_line(str(root) or type(root).__name__)


def _protocol_trouble(cause: BaseException) -> str:
    """What was wrong with a message that made ``qemu.qmp`` drop the connection."""
    if isinstance(cause, DeserializationError):
        return "a message that is not JSON"
    if isinstance(cause, UnexpectedTypeError):
        return "a JSON value that is not an object"
    if isinstance(cause, ServerParseError):
        return "an error reply without an id (QEMU could not parse a command)"
    if isinstance(cause, ValueError | asyncio.LimitOverrunError):
        return "a message too long to read"
    if isinstance(cause, ProtocolError):
        return _one_line(cause.error_message)
    return _one_line(str(cause) or type(cause).__name__)


# --------------------------------------------------------------------------------------------
# The backend
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _ReplugPlan:
    """Everything needed to take the balloon out and put it back, read before touching it."""

    location: BalloonLocation
    driver: str
    bus: str
    #: device_add arguments that recreate the balloon as it is now.
    original: dict[str, object]
    changes: dict[str, bool]
    stats_period: int
    carried: dict[str, object] = field(default_factory=dict)

    @property
    def target(self) -> str:
        """What device_del is given: the id, or the QOM path of an anonymous device."""
        return self.location.device_id or self.location.device

    @property
    def replacement(self) -> dict[str, object]:
        """device_add arguments for the balloon with the new features."""
        return {**self.original, **self.changes}

    @property
    def minimal(self) -> dict[str, object]:
        """The old balloon with only its id, bus, slot and feature properties: the last resort
        when QEMU will not take back some other property it reported."""
        keep = {"driver", "id", "bus", "addr", *FEATURE_PROPERTIES.values()}
        return {k: v for k, v in self.original.items() if k in keep}


class QmpBackend:
    """One VM's balloon through its QMP monitor (implements :class:`~.base.Backend`).

    ``address`` is ``unix:/path``, a socket path, or ``tcp:HOST:PORT``. ``connect_timeout``
    bounds connecting (retries included); ``command_timeout`` bounds each command and each
    wait of :meth:`renegotiate`. Connecting is lazy and repeated after a drop; the QOM path of
    the balloon is looked up once per connection.
    """

    #: Attempts to connect (bounded by connect_timeout as well).
    CONNECT_ATTEMPTS: Final = 4
    #: Attempts of a query whose connection drops mid-command (the first one included).
    QUERY_ATTEMPTS: Final = 3
    #: Unread BALLOON_CHANGE values kept for a watch_actual consumer.
    WATCH_BACKLOG: Final = 64
    #: Unread events kept by the client's catch-all listener, which nobody reads.
    DEFAULT_BACKLOG: Final = 16

    def __init__(
        self, address: str, *, connect_timeout: float = 5.0, command_timeout: float = 30.0
    ) -> None:
        if connect_timeout <= 0 or command_timeout <= 0:
            raise UsageError("timeouts must be positive")
        self.name = address
        self.address = parse_address(address)
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._client: QMPClient | None = None
        self._connect_lock = asyncio.Lock()
        self._end_lock = asyncio.Lock()
        #: Counts connections: a failure is tied to the session it happened on.
        self._session = 0
        #: (session, the exception that ended it) for the last session torn down.
        self._session_end: tuple[int, BaseException | None] | None = None
        self._location: BalloonLocation | None = None

    def __repr__(self) -> str:
        return f"QmpBackend({self.name!r})"

    async def __aenter__(self) -> QmpBackend:
        await self._connected()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Disconnect. A failure while hanging up is logged, not raised: the work is over."""
        client = self._client
        if client is not None and client.runstate is not Runstate.IDLE:
            cause = await self._end_session(client, self._session)
            if cause is not None:
                _LOG.debug("while disconnecting from %s: %r", self.name, cause)
        self._location = None

    # ---------------------------------------------------------------- connection

    def _new_client(self) -> QMPClient:
        """A client whose catch-all listener is bounded (see :class:`BoundedEventListener`)."""
        client = QMPClient()
        unbounded = client.events
        bounded = BoundedEventListener(maxlen=self.DEFAULT_BACKLOG)
        # remove_listener refuses to remove client.events, so swap the attribute first.
        client.events = bounded
        client.remove_listener(unbounded)
        client.register_listener(bounded)
        return client

    @staticmethod
    async def _reap(client: QMPClient) -> BaseException | None:
        """Bring ``client`` back to IDLE; the exception that ended its session, if any.

        ``qemu.qmp`` re-raises from ``disconnect()`` whatever stopped its reader or writer:
        EOFError when the peer hung up, OSError on a reset, a ProtocolError for bytes that are
        not QMP. That tells a lost connection from a malformed peer.
        """
        try:
            await client.disconnect()
        except Exception as exc:  # the bottom half's failure, handed back
            return exc
        return None

    async def _end_session(self, client: QMPClient, session: int) -> BaseException | None:
        """Tear down ``session`` once, however many commands saw it fail; why it ended.

        Two commands failing on one dropped connection must not both disconnect: the second
        could tear down the fresh connection the first one's retry has opened.
        """
        async with self._end_lock:
            if self._session_end is not None and self._session_end[0] == session:
                return self._session_end[1]
            if session != self._session or client.runstate is Runstate.IDLE:
                return None
            cause = await self._reap(client)
            self._session_end = (session, cause)
            return cause

    def _alive(self, session: int) -> Callable[[], bool]:
        """Whether ``session`` is still the running connection (for event waiters)."""

        def alive() -> bool:
            client = self._client
            return (
                session == self._session
                and client is not None
                and client.runstate is Runstate.RUNNING
            )

        return alive

    def _check_socket_path(self, path: str) -> None:
        """Refuse a path that exists but is not a socket, before any retry wastes time."""
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            return  # QEMU may be about to create it: connect() retries, then says so.
        except OSError as exc:
            reason = _one_line(exc.strerror or str(exc))
            raise VmUnreachable(f"cannot reach VM {self.name}: {reason}") from exc
        if not stat.S_ISSOCK(mode):
            raise VmUnreachable(f"cannot reach VM {self.name}: {path} is not a socket")

    async def _connected(self) -> QMPClient:
        """The client, connected (again, after a drop) if need be."""
        client = self._client
        if client is not None and client.runstate is Runstate.RUNNING:
            return client
        async with self._connect_lock:
            if self._client is None:
                self._client = self._new_client()
            client = self._client
            if client.runstate is Runstate.RUNNING:
                return client
            if client.runstate is not Runstate.IDLE:
                cause = await self._end_session(client, self._session)
                _LOG.debug("reconnecting to %s after %r", self.name, cause)
            self._location = None
            await self._connect(client)
            self._session += 1
            return client

    async def _connect(self, client: QMPClient) -> None:
        _quiet_library_logging()
        if self.address.kind == "unix":
            self._check_socket_path(self.address.path)
        last: ConnectError | None = None

        def log_retry(state: RetryCallState) -> None:
            _LOG.debug(
                "connecting to %s: attempt %d failed: %s", self.name, state.attempt_number, last
            )

        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.CONNECT_ATTEMPTS)
            | stop_after_delay(self._connect_timeout),
            wait=wait_exponential(multiplier=0.05, max=0.5),
            retry=retry_if_exception(_is_transient_connect_error),
            before_sleep=log_retry,
            reraise=True,
        )
        _LOG.debug("connecting to %s", self.address)
        try:
            async with asyncio.timeout(self._connect_timeout):
                async for attempt in retrying:
                    with attempt:
                        try:
                            await client.connect(self.address.target)
                        except ConnectError as exc:
                            last = exc
                            raise
        except TimeoutError as exc:
            if last is not None:
                reason = (
                    f"{_connect_reason(last, self.address)} "
                    f"(gave up after {self._connect_timeout:g} s)"
                )
            else:
                reason = (
                    f"no QMP greeting within {self._connect_timeout:g} s "
                    "(is another client attached to this monitor?)"
                )
            raise VmUnreachable(f"cannot reach VM {self.name}: {reason}") from exc
        except ConnectError as exc:
            raise VmUnreachable(
                f"cannot reach VM {self.name}: {_connect_reason(exc, self.address)}"
            ) from exc
        _LOG.debug("connected to %s", self.name)

    # ---------------------------------------------------------------- commands

    def _refused(self, command: str, exc: ExecuteError) -> CommandFailed:
        """QMP's error reply as a :class:`CommandFailed` keeping its class (qapi/error.json)."""
        error_class = exc.error_class
        desc = _one_line(str(exc))
        if error_class == "DeviceNotActive":
            # qmp_balloon/qmp_query_balloon: "No balloon device has been activated".
            message = f"VM {self.name} has no balloon device (QEMU: {desc})"
        elif error_class == "CommandNotFound":
            message = f"VM {self.name} does not know the QMP command {command} (QEMU: {desc})"
        else:
            message = f"VM {self.name} refused {command}: {desc}"
        return CommandFailed(message, error_class=error_class)

    async def _execute_once(self, command: str, arguments: Mapping[str, object] | None) -> object:
        """Send ``command`` once; every failure mapped to a :class:`BalloonError`."""
        client = await self._connected()
        session = self._session
        _LOG.debug("%s -> %s %s", self.name, command, json.dumps(arguments) if arguments else "")
        try:
            async with asyncio.timeout(self._command_timeout):
                reply = await client.execute(command, arguments)
        except ExecuteError as exc:
            _LOG.debug("%s <- %s error %s: %s", self.name, command, exc.error_class, exc)
            raise self._refused(command, exc) from exc
        except BadReplyError as exc:
            # A reply with our id but neither 'return' nor a well-formed 'error'.
            raise PeerError(
                f"VM {self.name} answered {command} with a malformed reply: "
                f"{_one_line(exc.error_message)}"
            ) from exc
        except (ExecInterruptedError, StateError) as exc:
            cause = await self._end_session(client, session)
            if cause is not None and not isinstance(cause, EOFError | OSError):
                raise PeerError(
                    f"VM {self.name} sent {_protocol_trouble(cause)} during {command}"
                ) from exc
            outcome = "" if is_idempotent(command) else "; whether it took effect is unknown"
            raise ConnectionLost(
                f"connection to VM {self.name} lost during {command}{outcome}"
            ) from exc
        except TimeoutError as exc:
            raise OperationTimeout(
                f"VM {self.name} did not answer {command} within {self._command_timeout:g} s"
            ) from exc
        except QMPError as exc:
            raise PeerError(f"VM {self.name}: {command} failed: {_one_line(str(exc))}") from exc
        _LOG.debug("%s <- %s %s", self.name, command, _one_line(repr(reply), 200))
        return reply

    async def _execute(self, command: str, arguments: Mapping[str, object] | None = None) -> object:
        """Send ``command``; a query whose connection drops is resent on a new connection."""
        if not is_idempotent(command):
            return await self._execute_once(command, arguments)

        def log_retry(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            _LOG.debug(
                "%s: %s attempt %d: %s; retrying", self.name, command, state.attempt_number, exc
            )

        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.QUERY_ATTEMPTS),
            wait=wait_exponential(multiplier=0.05, max=0.5),
            retry=retry_if_exception_type(ConnectionLost),
            before_sleep=log_retry,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await self._execute_once(command, arguments)
        raise AssertionError("unreachable: tenacity re-raises the last failure")

    async def _qom_get(self, path: str, prop: str) -> object:
        return await self._execute("qom-get", {"path": path, "property": prop})

    async def _locate(self) -> BalloonLocation:
        """The balloon's QOM paths: from x-query-virtio, else /machine/peripheral/balloon0."""
        await self._connected()  # a reconnect forgets the cached paths
        if self._location is not None:
            return self._location
        try:
            reply = await self._execute("x-query-virtio")
        except CommandFailed as exc:
            # CommandNotFound before QEMU 7.2.
            _LOG.debug("x-query-virtio unavailable (%s); assuming %s", exc, DEFAULT_BALLOON_PATH)
            location = None
        else:
            location = locate_balloon(reply)
            if location is None:
                # The class query-balloon answers with, so callers test one class for it.
                raise CommandFailed(
                    f"VM {self.name} has no balloon device (x-query-virtio lists none)",
                    error_class="DeviceNotActive",
                )
        if location is None:
            location = BalloonLocation(
                device=DEFAULT_BALLOON_PATH, backend=f"{DEFAULT_BALLOON_PATH}/{_BACKEND_CHILD}"
            )
        self._location = location
        return location

    # ---------------------------------------------------------------- Backend

    async def actual(self) -> int:
        """Guest memory now (``query-balloon`` ``actual``, bytes)."""
        reply = _as_object(await self._execute("query-balloon"), "query-balloon")
        return _int_member(reply, "actual", "query-balloon")

    async def max_memory(self) -> int:
        """RAM at boot plus hot-plugged memory (``query-memory-size-summary``)."""
        what = "query-memory-size-summary"
        reply = _as_object(await self._execute(what), what)
        total = _int_member(reply, "base-memory", what)
        if "plugged-memory" in reply:
            total += _int_member(reply, "plugged-memory", what)
        return total

    async def set_target(self, target: int) -> None:
        """``balloon {"value": target}``: the guest's target size. Sent once, never retried."""
        if not _is_int(target) or target <= 0:
            # qmp_balloon refuses it too (QERR_INVALID_PARAMETER_VALUE), after a round trip.
            raise UsageError(f"balloon target must be a positive number of bytes, not {target!r}")
        await self._execute("balloon", {"value": target})

    async def stats(self) -> GuestStats:
        """``qom-get guest-stats`` of the balloon, normalized (:func:`decode_guest_stats`)."""
        location = await self._locate()
        return decode_guest_stats(await self._qom_get(location.device, "guest-stats"))

    async def stats_period(self) -> int:
        """``guest-stats-polling-interval`` in seconds (0: off)."""
        location = await self._locate()
        value = await self._qom_get(location.device, "guest-stats-polling-interval")
        if not _is_int(value) or not isinstance(value, int) or value < 0:
            raise PeerError("qom-get guest-stats-polling-interval: not a non-negative integer")
        return value

    async def set_stats_period(self, seconds: int) -> None:
        """qom-set ``guest-stats-polling-interval`` (never retried: it is an action)."""
        if not _is_int(seconds) or seconds < 0:
            raise UsageError(
                f"stats period must be a whole number of seconds >= 0, not {seconds!r}"
            )
        location = await self._locate()
        await self._execute(
            "qom-set",
            {"path": location.device, "property": "guest-stats-polling-interval", "value": seconds},
        )

    async def _virtio_status(self, location: BalloonLocation) -> object:
        return await self._execute("x-query-virtio-status", {"path": location.backend})

    async def features(self) -> FeatureState:
        """Offered and acked features from ``x-query-virtio-status`` (QEMU >= 7.2).

        When no feature name tells the profile (a seed-sg device with SG off offers nothing
        QEMU's balloon could not), the device's ``sg`` property does: only the seed-sg
        device has one.
        """
        location = await self._locate()
        reply = await self._virtio_status(location)
        profile_name: str | None = None
        if profile_hint(reply) is None:
            try:
                has_sg = isinstance(await self._qom_get(location.device, "sg"), bool)
            except CommandFailed:
                has_sg = False
            profile_name = "seed-sg" if has_sg else None
        return decode_virtio_status(reply, location.backend, profile_name=profile_name)

    @asynccontextmanager
    async def watch_actual(self) -> AsyncIterator[AsyncIterator[int]]:
        """BALLOON_CHANGE ``actual`` values from now on, while the context lasts.

        Its own bounded listener (:attr:`WATCH_BACKLOG` values; the oldest go first). The
        iterator ends with :class:`ConnectionLost` if the connection drops: events may have
        been missed, so a consumer should re-read :meth:`actual` before it goes on.
        """
        client = await self._connected()
        alive = self._alive(self._session)
        listener = BoundedEventListener("BALLOON_CHANGE", maxlen=self.WATCH_BACKLOG)
        # qemu.qmp 0.0.6: listen() yields None, so the listener is made first (real-qemu-lab.md).
        with client.listen(listener):
            yield _ActualValues(self.name, alive, listener)

    # ---------------------------------------------------------------- raw access

    async def monitor(self, command: str, arguments: Mapping[str, object] | None = None) -> object:
        """Any QMP command on this connection; queries are retried after a drop."""
        return await self._execute(command, arguments)

    async def read_guest_memory(self, gpa: int, size: int) -> bytes:
        """``pmemsave`` into a private file, then read it back (QEMU must run on this host).

        The file is created here first (0622 in a 0711 directory with a random name), so a
        QEMU running as another user, as under libvirt, can write it and nobody else can
        read it; a QEMU on another host writes on its own host and leaves ours empty, which
        is reported rather than returned as zeros.
        """
        if not _is_int(gpa) or not _is_int(size) or gpa < 0 or not 0 < size <= MAX_READ:
            raise UsageError(f"cannot read {size!r} bytes at {gpa!r}: at most {MAX_READ} bytes")
        if gpa + size > 1 << 64:
            raise UsageError(f"{size} bytes at {gpa:#x} run past the end of the address space")
        directory = tempfile.mkdtemp(prefix="balloonctl-pmem-")
        path = os.path.join(directory, "mem")
        try:
            os.chmod(directory, 0o711)
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            os.fchmod(fd, 0o622)
            os.close(fd)
            await self._execute("pmemsave", {"val": gpa, "size": size, "filename": path})
            with open(path, "rb") as f:
                data = f.read(size + 1)
        except OSError as exc:
            raise PeerError(f"cannot read the pmemsave file {path}: {exc.strerror}") from exc
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)
            with contextlib.suppress(OSError):
                os.rmdir(directory)
        if len(data) != size:
            where = " (is QEMU running on another host?)" if not data else ""
            raise PeerError(
                f"VM {self.name}: pmemsave of {size} bytes at {gpa:#x} wrote {len(data)}{where}"
            )
        return data

    # ---------------------------------------------------------------- renegotiate

    async def renegotiate(self, enable: Collection[str], disable: Collection[str]) -> FeatureState:
        """Replug the balloon with feature properties changed; the guest driver re-probes.

        Reads everything first (driver, bus, every property that differs from its default)
        and refuses before touching the VM when the bus cannot hotplug or the device has no
        such property. Then device_del, DEVICE_DELETED, device_add with the same id, bus and
        properties plus the changes, and a wait for DRIVER_OK. If QEMU refuses the new device,
        the old one is put back. Nothing to change: no replug.
        """
        changes = feature_property_changes(enable, disable)
        plan = await self._plan_replug(changes)
        if plan is None:
            _LOG.debug("%s: the balloon already has %s; not replugging", self.name, changes)
            return await self.features()
        await self._unplug(plan)
        await self._plug(plan)
        await self._wait_driver_ok()
        if plan.stats_period:
            try:
                await self.set_stats_period(plan.stats_period)
            except BalloonError as exc:
                _LOG.warning("the balloon is back but its stats polling is off: %s", exc)
        return await self.features()

    async def _require_hotplug(
        self, location: BalloonLocation, bus_path: str, bus: str, driver: str
    ) -> None:
        """Refuse (CommandFailed) unless QEMU would let the balloon be unplugged and replugged.

        QEMU answers the question itself: a device's ``hotpluggable`` property is
        ``dc->hotpluggable && qbus_is_hotpluggable(parent_bus)`` (hw/core/qdev.c
        device_get_hotpluggable), the very test qdev_unplug (softmmu/qdev-monitor.c) makes
        before "Bus '%s' does not support hotplugging". In 7.2 qbus_is_hotpluggable is "the bus
        has a hotplug-handler" (include/hw/qdev-core.h); ACPI PCI hotplug clears the handler
        of q35's pcie.0 and of root ports with hotplug=off (hw/acpi/pcihp.c,
        acpi_pcihp_disable_root_bus). So an empty ``hotplug-handler`` on the bus also means no.
        A QEMU that answers neither question is refused: unplugging blind could leave the VM
        without a balloon.
        """
        hotpluggable: bool | None = None
        handler: str | None = None
        try:
            value = await self._qom_get(location.device, "hotpluggable")
            hotpluggable = value if isinstance(value, bool) else None
        except CommandFailed as exc:
            _LOG.debug("qom-get hotpluggable: %s", exc)
        try:
            value = await self._qom_get(bus_path, "hotplug-handler")
            handler = value if isinstance(value, str) else None
        except CommandFailed as exc:
            _LOG.debug("qom-get hotplug-handler: %s", exc)
        if hotpluggable is None and handler is None:
            raise CommandFailed(
                f"cannot tell whether bus {bus} of VM {self.name} can hotplug "
                "(no 'hotpluggable' nor 'hotplug-handler' property); not unplugging the balloon"
            )
        if hotpluggable is False or handler == "":
            ident = location.device_id or "balloon0"
            raise CommandFailed(
                f"the balloon sits on bus {bus}, which cannot hotplug; start the VM with the "
                "balloon on a pcie-root-port (-device pcie-root-port,id=rp1,bus=pcie.0,chassis=1,"
                f"slot=1 -device {driver},id={ident},bus=rp1) to change its features live"
            )

    async def _carried_properties(
        self, location: BalloonLocation, driver: str
    ) -> dict[str, object]:
        """The balloon's properties that differ from their defaults, to pass to device_add.

        ``device-list-properties`` lists what device_add accepts for the driver, with
        defaults; ``qom-get`` reads each value on the live device. Passing only what differs
        keeps device_add from choking on a property QEMU lists but will not take back.
        """
        try:
            listing = await self._execute("device-list-properties", {"typename": driver})
        except CommandFailed as exc:
            _LOG.debug(
                "device-list-properties %s: %s; carrying feature properties only", driver, exc
            )
            return {}
        if not isinstance(listing, list):
            raise PeerError("device-list-properties: expected a list")
        carried: dict[str, object] = {}
        for item in listing:
            info = _as_object(item, "device-list-properties: an entry")
            name, kind = info.get("name"), info.get("type")
            if not isinstance(name, str) or not isinstance(kind, str):
                raise PeerError("device-list-properties: an entry without 'name' and 'type'")
            if name in _NOT_CARRIED or name.startswith("legacy-") or kind.startswith("child<"):
                continue
            try:
                value = await self._qom_get(location.device, name)
            except CommandFailed as exc:
                _LOG.debug("qom-get %s: %s; not carried", name, exc)
                continue
            if kind.startswith("link<"):
                # An unset link reads as "" (qom/object.c object_get_link_property).
                if isinstance(value, str) and value:
                    carried[name] = value
                continue
            if not isinstance(value, bool | int | float | str):
                continue
            if "default-value" in info:
                if _same(info["default-value"], value):
                    continue
            elif value == "":
                continue
            carried[name] = value
        return carried

    async def _plan_replug(self, changes: dict[str, bool]) -> _ReplugPlan | None:
        location = await self._locate()
        driver = await self._qom_get(location.device, "type")
        bus_path = await self._qom_get(location.device, "parent_bus")
        if not isinstance(driver, str) or not driver:
            raise PeerError("qom-get type: not a device type name")
        if not isinstance(bus_path, str):
            raise PeerError("qom-get parent_bus: not a QOM path")
        if not bus_path:
            raise CommandFailed(
                f"the balloon of VM {self.name} is on no bus; it cannot be replugged"
            )
        # qbus_find (softmmu/qdev-monitor.c) takes a bus by name, which is its QOM leaf.
        bus = bus_path.rstrip("/").rpartition("/")[2]
        await self._require_hotplug(location, bus_path, bus, driver)

        # Every feature property the device has, read and carried explicitly whatever its
        # default: they are the point of the exercise, and a QEMU (or the simulated VM) without
        # device-list-properties must not lose them.
        current: dict[str, bool] = {}
        for feature, prop in FEATURE_PROPERTIES.items():
            try:
                value = await self._qom_get(location.device, prop)
            except CommandFailed as exc:
                if prop in changes:
                    hint = " (sg exists only on the seed-sg device)" if prop == "sg" else ""
                    raise UsageError(
                        f"this balloon ({driver}) has no property {prop!r}, so {feature} "
                        f"cannot be changed on it{hint}"
                    ) from exc
                continue
            if not isinstance(value, bool):
                raise PeerError(f"qom-get {prop}: not a boolean")
            current[prop] = value
        if all(current[prop] is value for prop, value in changes.items()):
            return None

        carried = await self._carried_properties(location, driver)
        original: dict[str, object] = {"driver": driver}
        if location.device_id is not None:
            original["id"] = location.device_id
        original["bus"] = bus
        original.update(carried)
        original.update(current)
        try:
            stats_period = await self.stats_period()
        except CommandFailed:
            stats_period = 0
        return _ReplugPlan(
            location=location,
            driver=driver,
            bus=bus,
            original=original,
            changes=changes,
            stats_period=stats_period,
            carried=carried,
        )

    async def _unplug(self, plan: _ReplugPlan) -> None:
        """device_del, then wait for the guest to let go (DEVICE_DELETED for our device)."""
        location = plan.location

        def is_ours(event: Message) -> bool:
            data = event.get("data")
            if not isinstance(data, dict):
                return False
            if location.device_id is not None and data.get("device") == location.device_id:
                return True
            return data.get("path") == location.device

        client = await self._connected()
        listener = BoundedEventListener("DEVICE_DELETED", maxlen=8, event_filter=is_ours)
        with client.listen(listener):
            await self._execute("device_del", {"id": plan.target})
            alive = self._alive(self._session)
            self._location = None
            try:
                async with asyncio.timeout(self._command_timeout):
                    await _next_event(alive, listener, self.name, "DEVICE_DELETED")
            except TimeoutError as exc:
                raise OperationTimeout(
                    f"VM {self.name} did not release the balloon {plan.target} within "
                    f"{self._command_timeout:g} s of device_del (no DEVICE_DELETED): the balloon "
                    "may be gone or may still go; check `balloonctl features` before retrying"
                ) from exc
        _LOG.debug("%s: balloon %s deleted", self.name, plan.target)

    async def _plug(self, plan: _ReplugPlan) -> None:
        """device_add with the changes; if QEMU refuses, put the old balloon back."""
        try:
            await self._execute("device_add", plan.replacement)
        except CommandFailed as refused:
            again: BalloonError | None = None
            attempts = [plan.original]
            if plan.minimal != plan.original:
                attempts.append(plan.minimal)
            for arguments in attempts:
                try:
                    await self._execute("device_add", arguments)
                except CommandFailed as exc:
                    again = exc
                    continue
                except BalloonError as exc:  # the connection went: no second guess
                    again = exc
                    break
                how = "unchanged" if arguments is plan.original else "with its features only"
                raise CommandFailed(
                    f"{refused}; the balloon was put back {how}", error_class=refused.error_class
                ) from refused
            raise CommandFailed(
                f"{refused}; putting the old balloon back failed too ({again}): the VM has "
                f"no balloon now, re-add it with device_add {json.dumps(plan.original)}",
                error_class=refused.error_class,
            ) from again

    async def _wait_driver_ok(self) -> None:
        """Poll x-query-virtio-status until the guest driver sets DRIVER_OK (spec 3.1.1)."""
        statuses: tuple[str, ...] = ()
        delay = 0.02
        try:
            async with asyncio.timeout(self._command_timeout):
                while True:
                    location = await self._locate()
                    reply = _as_object(await self._virtio_status(location), "x-query-virtio-status")
                    statuses = device_status_names(reply.get("status", {"statuses": []}))
                    if _driver_ok(statuses):
                        return
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 0.5)
        except TimeoutError as exc:
            state = ", ".join(statuses) or "reset (no status bit set)"
            raise OperationTimeout(
                f"the balloon of VM {self.name} is back but its guest driver is not ready after "
                f"{self._command_timeout:g} s (device status: {state})"
            ) from exc


__all__ = [
    "DEFAULT_BALLOON_PATH",
    "FEATURE_PROPERTIES",
    "BalloonLocation",
    "BoundedEventListener",
    "QmpBackend",
    "decode_guest_stats",
    "decode_virtio_status",
    "device_status_names",
    "feature_property_changes",
    "is_idempotent",
    "locate_balloon",
]
