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
import secrets
import socket
import stat
import tempfile
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
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
from qemu.qmp.models import ErrorResponse
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
from balloonctl.backends.base import MAX_READ
from balloonctl.backends.mailbox import Mailbox
from balloonctl.backends.qmpvocab import (
    BALLOON_CHANGE,
    DEFAULT_BALLOON_PATH,
    DEVICE_DELETED,
    FEATURE_PROPERTIES,
    BalloonLocation,
    QmpVocabulary,
    RemovalWait,
    _is_int,
    _one_line,
    _ReplugPlan,
    balloon_change_actual,
    decode_guest_stats,
    decode_virtio_status,
    device_deleted_names,
    device_status_names,
    feature_property_changes,
    is_idempotent,
    locate_balloon,
    refusal,
)
from balloonctl.errors import (
    CommandFailed,
    ConnectionLost,
    OperationTimeout,
    PeerError,
    UsageError,
    VmUnreachable,
)

_LOG = logging.getLogger(__name__)

#: ``qemu.qmp``'s logger root; its children are per-module and per-connection.
_LIBRARY_LOGGER: Final = "qemu.qmp"

# --------------------------------------------------------------------------------------------
# Events
# --------------------------------------------------------------------------------------------


class BoundedEventListener(EventListener):
    """An :class:`EventListener` that keeps at most ``maxlen`` unread events and no history.

    ``qemu.qmp``'s listener appends every event it accepts to a history list and an unbounded
    queue. That is right for a test script and wrong for a daemon: a consumer that falls behind
    must lose the *oldest* values (only the latest ``actual`` matters), never grow memory.
    The keeping and dropping is :class:`~.mailbox.Mailbox`'s, shared with the libvirt backend.
    """

    def __init__(
        self,
        names: str | Iterable[str] | None = None,
        *,
        maxlen: int,
        event_filter: EventFilter | None = None,
    ) -> None:
        super().__init__(names, event_filter)
        self.mailbox: Mailbox[Message] = Mailbox(maxlen)

    @property
    def history(self) -> tuple[Message, ...]:
        """Always empty: keeping every event is exactly what this listener exists to avoid."""
        return ()

    @property
    def maxlen(self) -> int:
        """How many unread events are kept."""
        return self.mailbox.maxlen

    @property
    def dropped(self) -> int:
        """Events dropped because nobody read them in time."""
        return self.mailbox.dropped

    def __len__(self) -> int:
        return len(self.mailbox)

    async def put(self, event: Message) -> None:
        """Keep ``event`` if accepted, dropping the oldest unread one when full."""
        if self.accept(event):
            self.mailbox.put(event)

    def wake(self) -> None:
        """Wake a waiter without an event (the connection it waits on has ended)."""
        self.mailbox.wake()

    def get_nowait(self) -> Message | None:
        """The oldest unread event, or None."""
        return self.mailbox.get_nowait()

    async def get(self) -> Message:
        """Wait for the oldest unread event."""
        return await self.mailbox.get()

    async def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for an unread event; whether there is one."""
        return await self.mailbox.wait(timeout)

    def empty(self) -> bool:
        """Whether no event is waiting."""
        return self.mailbox.empty()

    def clear(self) -> list[Message]:
        """Drop and return the unread events (``qemu.qmp`` calls this on removal)."""
        return self.mailbox.clear()


#: How often a waiter on events looks whether the connection is still up. Only a fallback:
#: the end of a session wakes its waiters at once (QmpBackend._on_session_end). A short
#: poll here cost a daemon with 1000 VMs 5000 wake-ups a second for nothing.
_RUNSTATE_POLL: Final = 5.0


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


class _ActualValues:
    """The async iterator :meth:`QmpBackend.watch_actual` yields: BALLOON_CHANGE ``actual``s."""

    def __init__(self, vm: str, alive: Callable[[], bool], listener: BoundedEventListener) -> None:
        self._vm = vm
        self._alive = alive
        self._listener = listener

    def __aiter__(self) -> _ActualValues:
        return self

    async def __anext__(self) -> int:
        event = await _next_event(self._alive, self._listener, self._vm, BALLOON_CHANGE)
        return balloon_change_actual(event)

    def latest(self) -> int | None:
        """The newest unread value without waiting (see :class:`~.base.ActualWatch`)."""
        newest = self._listener.mailbox.latest()
        if not self._alive():
            raise ConnectionLost(f"connection to VM {self._vm} lost while watching BALLOON_CHANGE")
        return None if newest is None else balloon_change_actual(newest)


# --------------------------------------------------------------------------------------------
# Library logging
# --------------------------------------------------------------------------------------------


class _LibraryLevel:
    """Whether the library logger's level is one balloonctl set (not the user's own)."""

    ours = False


def _quiet_library_logging() -> None:
    """Silence ``qemu.qmp`` entirely unless balloonctl logs at DEBUG (``-v``).

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
        # Above CRITICAL: the library's CRITICAL lines ("Unexpected bottom half exception",
        # with a traceback) came by the thousand when connects timed out under load; the
        # failure each one stands for is reported as one BalloonError line anyway.
        library.setLevel(logging.CRITICAL + 1)
        _LibraryLevel.ours = True


class _ReplySlot:
    """Where the reply to one command lands: a future behind the two methods ``qemu.qmp``
    calls on the ``asyncio.Queue(maxsize=1)`` it would keep per pending command.

    ``QMPClient._on_message`` awaits ``put(reply)`` for a reply whose id is pending, and
    ``_bh_disconnect`` calls ``put_nowait(ExecInterruptedError)`` on each pending entry when
    the session ends. A future does the same work as the queue without its two deques and
    its getter futures.
    """

    __slots__ = ("future",)

    def __init__(self, future: asyncio.Future[object]) -> None:
        self.future = future

    async def put(self, item: object) -> None:
        self.put_nowait(item)

    def put_nowait(self, item: object) -> None:
        if not self.future.done():
            self.future.set_result(item)

    def expire(self) -> None:
        """The command's time is up: its waiter gets TimeoutError (a late reply is dropped
        by ``qemu.qmp`` as one with an unknown id, as after a cancelled wait)."""
        if not self.future.done():
            self.future.set_exception(TimeoutError())


#: Bytes each recv() on a QMP connection asks for. asyncio's selector transport asks for
#: 256 KiB, above glibc's mmap threshold: each recv() then maps a fresh buffer, shrinks it to
#: the few hundred bytes of a reply and unmaps it later, 13.8 us per recv() against 1.5 us
#: for 64 KiB (measured on a socketpair, 400-byte messages). A longer message just takes
#: more than one recv().
RECV_SIZE: Final = 64 * 1024

#: Serializes commands as ``qemu.qmp``'s ``Message`` does (compact separators); built once,
#: since ``json.dumps`` with any argument builds a new encoder on every call.
_ENCODER: Final = json.JSONEncoder(separators=(",", ":"))


class _QmpClient(QMPClient):
    """A :class:`QMPClient` with a cheaper command path and logging only when it is logged.

    ``qemu.qmp``'s message hooks, documented as meant for subclasses, log every message with
    ``str(msg)``: an indented ``json.dumps`` (the pure-Python encoder) computed even when the
    logger is off, about a third of the client's CPU per command. These log the same lines,
    at the same level on the same logger, and cost a level check otherwise.

    :meth:`execute` sends a command the way ``QMPClient.execute`` does (the same id scheme, the
    same bytes, the same reply routing by ``_pending``, the same exceptions) but serializes it
    once instead of three times, writes it at once instead of through the outgoing queue and
    the writer task, and waits on a future instead of a queue (:class:`_ReplySlot`), with a
    timer on that future instead of an ``asyncio.timeout`` around the task. A daemon polling
    1000 VMs a second spends most of its CPU here. It relies on ``QMPClient`` internals as
    they are in qemu.qmp 0.0.6, the version it was measured and tested with (``_pending``,
    ``_writer``, ``_get_exec_id``); when they are not as expected it falls back to the
    library's own path, and
    ``tests/backends/test_qmp_fast_path.py`` fails so that nobody loses the fast path unawares.
    Its commands do not pass through the ``_cb_outbound`` hook: it logs the same debug line
    itself, and nothing here filters outgoing messages.
    """

    def tune_transport(self) -> bool:
        """Cap the connection's recv() size at :data:`RECV_SIZE`; whether it could be.

        ``max_size`` is the selector transport's per-recv() size (asyncio's
        ``_SelectorSocketTransport``); a transport without it is left alone.
        """
        writer = getattr(self, "_writer", None)
        if not isinstance(writer, asyncio.StreamWriter):
            return False
        transport = writer.transport
        size = getattr(transport, "max_size", None)
        if not isinstance(size, int):
            return False
        if size > RECV_SIZE:
            transport.max_size = RECV_SIZE  # type: ignore[attr-defined]
        return True

    def _fast_path(self) -> tuple[dict[str, object], asyncio.StreamWriter] | None:
        """The pending map and the writer, if this client's internals are as expected."""
        pending = getattr(self, "_pending", None)
        writer = getattr(self, "_writer", None)
        if type(pending) is not dict or not isinstance(writer, asyncio.StreamWriter):
            return None
        return pending, writer

    async def execute(
        self,
        cmd: str,
        arguments: Mapping[str, object] | None = None,
        oob: bool = False,
        *,
        timeout: float | None = None,
    ) -> object:
        """``QMPClient.execute``, raising TimeoutError after ``timeout`` seconds if given."""
        fast = self._fast_path() if not oob and self.runstate is Runstate.RUNNING else None
        if fast is None:
            async with asyncio.timeout(timeout):
                return await super().execute(cmd, arguments, oob=oob)
        pending, writer = fast
        exec_id = self._get_exec_id()
        # Member order as qemu.qmp sends it: execute, arguments, id.
        sent: dict[str, object] = {"execute": cmd}
        if arguments is not None:
            sent["arguments"] = arguments
        sent["id"] = exec_id
        data = _ENCODER.encode(sent).encode("utf-8")
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("--> %s", json.dumps(sent, indent=2))
        loop = asyncio.get_running_loop()
        slot = _ReplySlot(loop.create_future())
        timer = None if timeout is None else loop.call_later(timeout, slot.expire)
        pending[exec_id] = slot
        try:
            writer.write(data)
            reply = await slot.future
        finally:
            del pending[exec_id]
            if timer is not None:
                timer.cancel()
        if isinstance(reply, ExecInterruptedError):
            raise reply
        assert isinstance(reply, Message)
        if "error" in reply:
            try:
                error_response = ErrorResponse(reply)
            except (KeyError, TypeError) as err:
                raise BadReplyError("QMP error reply is malformed", reply, Message(sent)) from err
            raise ExecuteError(error_response, Message(sent), reply)
        if "return" not in reply:
            raise BadReplyError(
                "QMP reply is missing a 'error' or 'return' member", reply, Message(sent)
            )
        return reply["return"]

    def _cb_outbound(self, msg: Message) -> Message:
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("--> %s", str(msg))
        return msg

    def _cb_inbound(self, msg: Message) -> Message:
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("<-- %s", str(msg))
        return msg


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


class QmpBackend(QmpVocabulary):
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
        self._client: _QmpClient | None = None
        self._connect_lock = asyncio.Lock()
        self._end_lock = asyncio.Lock()
        #: Counts connections: a failure is tied to the session it happened on.
        self._session = 0
        #: (session, the exception that ended it) for the last session torn down.
        self._session_end: tuple[int, BaseException | None] | None = None
        self._location: BalloonLocation | None = None
        #: Listeners of event waiters, woken when the session ends.
        self._waiting: set[BoundedEventListener] = set()
        self._session_watch: asyncio.Task[None] | None = None

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
        watch, self._session_watch = self._session_watch, None
        if watch is not None:
            watch.cancel()
        for listener in list(self._waiting):
            listener.wake()

    # ---------------------------------------------------------------- connection

    def _new_client(self) -> _QmpClient:
        """A client whose catch-all listener is bounded (see :class:`BoundedEventListener`)."""
        client = _QmpClient()
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

    async def _connected(self) -> _QmpClient:
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
            if self._session_watch is not None:
                self._session_watch.cancel()
            self._session_watch = asyncio.create_task(self._on_session_end(client))
            return client

    async def _on_session_end(self, client: QMPClient) -> None:
        """Wake every event waiter when the connection leaves RUNNING (the peer hung up, or
        we did): they find the session over and raise ConnectionLost, without polling."""
        while client.runstate is Runstate.RUNNING:
            await client.runstate_changed()
        for listener in list(self._waiting):
            listener.wake()

    @contextmanager
    def _listening(self, client: QMPClient, listener: BoundedEventListener) -> Iterator[None]:
        """``client.listen(listener)``, with the listener woken if the session ends."""
        self._waiting.add(listener)
        try:
            with client.listen(listener):
                yield
        finally:
            self._waiting.discard(listener)

    async def _connect(self, client: _QmpClient) -> None:
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
                        client.tune_transport()
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
        return refusal(self.name, command, exc.error_class, _one_line(str(exc)))

    async def _execute_once(self, command: str, arguments: Mapping[str, object] | None) -> object:
        """Send ``command`` once; every failure mapped to a :class:`BalloonError`."""
        client = self._client
        if client is None or client.runstate is not Runstate.RUNNING:
            client = await self._connected()
        session = self._session
        if _LOG.isEnabledFor(logging.DEBUG):  # not json.dumps per command when nobody reads it
            args = json.dumps(arguments) if arguments else ""
            _LOG.debug("%s -> %s %s", self.name, command, args)
        try:
            reply = await client.execute(command, arguments, timeout=self._command_timeout)
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
        if _LOG.isEnabledFor(logging.DEBUG):
            _LOG.debug("%s <- %s %s", self.name, command, _one_line(repr(reply), 200))
        return reply

    async def _execute(self, command: str, arguments: Mapping[str, object] | None = None) -> object:
        """Send ``command``; a query whose connection drops is resent on a new connection.

        The first attempt is made without tenacity: building its retry loop costs more CPU than
        the rest of a command, and a daemon polling many VMs sends queries all the time. Only a
        query whose connection dropped enters the loop (:meth:`_retry_query`).
        """
        if not is_idempotent(command):
            return await self._execute_once(command, arguments)
        try:
            return await self._execute_once(command, arguments)
        except ConnectionLost as exc:
            first_failure = exc
        return await self._retry_query(command, arguments, first_failure)

    async def _retry_query(
        self,
        command: str,
        arguments: Mapping[str, object] | None,
        first_failure: ConnectionLost,
    ) -> object:
        """Resend query ``command`` whose first attempt failed with ``first_failure``.

        That failure is replayed as the loop's first attempt, so that tenacity counts, waits
        and logs exactly as if it had made it: :attr:`QUERY_ATTEMPTS` in all.
        """
        replay: ConnectionLost | None = first_failure

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
                if replay is not None:
                    failure, replay = replay, None
                    raise failure
                return await self._execute_once(command, arguments)
        raise AssertionError("unreachable: tenacity re-raises the last failure")

    async def _before_locate(self) -> None:
        client = self._client
        if client is None or client.runstate is not Runstate.RUNNING:
            await self._connected()  # a reconnect forgets the cached paths (see _connected)

    @asynccontextmanager
    async def _removal_waiter(self, plan: _ReplugPlan) -> AsyncIterator[RemovalWait]:
        """DEVICE_DELETED for our device, listened for before device_del is sent."""
        location = plan.location

        def is_ours(event: Message) -> bool:
            return device_deleted_names(event, location)

        client = await self._connected()
        listener = BoundedEventListener(DEVICE_DELETED, maxlen=8, event_filter=is_ours)

        async def gone() -> None:
            # Tied to the session device_del went out on (called right after its reply).
            alive = self._alive(self._session)
            await _next_event(alive, listener, self.name, DEVICE_DELETED)

        with self._listening(client, listener):
            yield gone

    # ---------------------------------------------------------------- Backend

    @asynccontextmanager
    async def watch_actual(self) -> AsyncIterator[_ActualValues]:
        """BALLOON_CHANGE ``actual`` values from now on, while the context lasts.

        Its own bounded listener (:attr:`WATCH_BACKLOG` values; the oldest go first). The
        iterator ends with :class:`ConnectionLost` if the connection drops: events may have
        been missed, so a consumer should re-read :meth:`actual` before it goes on.
        """
        client = await self._connected()
        alive = self._alive(self._session)
        listener = BoundedEventListener(BALLOON_CHANGE, maxlen=self.WATCH_BACKLOG)
        # qemu.qmp 0.0.6: listen() yields None, so the listener is made first (docs/real-qemu.md).
        with self._listening(client, listener):
            yield _ActualValues(self.name, alive, listener)

    # ---------------------------------------------------------------- raw access

    async def read_guest_memory(self, gpa: int, size: int) -> bytes:
        """``pmemsave`` into a private file, then read it back (QEMU must run on this host).

        The file is created here first, 0622 under an unguessable name in a 0711 directory:
        a QEMU running as another user, as under libvirt, can write it; nobody else can read
        it, and nobody else can find it to write into it (the directory cannot be listed).
        A QEMU on another host writes on its own host and leaves ours empty, which is
        reported rather than returned as zeros.
        """
        if not _is_int(gpa) or not _is_int(size) or gpa < 0 or not 0 < size <= MAX_READ:
            raise UsageError(f"cannot read {size!r} bytes at {gpa!r}: at most {MAX_READ} bytes")
        if gpa + size > 1 << 64:
            raise UsageError(f"{size} bytes at {gpa:#x} run past the end of the address space")
        directory = tempfile.mkdtemp(prefix="balloonctl-pmem-")
        path = os.path.join(directory, f"mem-{secrets.token_hex(16)}")
        try:
            os.chmod(directory, 0o711)
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            os.fchmod(fd, 0o622)
            os.close(fd)
            await self._pmemsave(gpa, size, path)
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
