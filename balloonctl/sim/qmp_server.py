"""A QMP server engine: framing, capabilities negotiation, dispatch, events. No vocabulary.

Like qemu.qmp on the client side, the transport knows nothing of what the commands mean:
:class:`QmpServer` takes a table of :class:`Command` objects and answers as QEMU 7.2's
monitor does (``monitor/qmp.c``, ``qapi/qmp-dispatch.c``): a greeting, only
``qmp_capabilities`` until it is sent, ``id`` copied back whatever its JSON type, QAPI's
argument errors word for word, and events only to negotiated clients. Event rate limits
follow ``monitor_qapi_event_queue``: the first event of a throttled kind goes out at once,
later ones within the period replace each other, and the last is sent when the period ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from balloonctl.errors import CommandFailed, UsageError

log = logging.getLogger(__name__)

JsonObject = dict[str, Any]
Handler = Callable[[Mapping[str, Any]], Awaitable[Any]]

#: A JSON message larger than this is refused (QEMU's json-streamer caps tokens at 64 MiB
#: and nesting at 1024; a simulated VM needs far less, and a client cannot exhaust us).
MAX_MESSAGE: Final = 1 << 20
MAX_NESTING: Final = 1024

#: Argument types as QAPI names them in its "expected: ..." messages.
_TYPE_NAMES: Final = {
    "int": "integer",
    "uint": "integer",
    "uint16": "integer",
    "size": "integer",
    "number": "number",
    "str": "string",
    "bool": "boolean",
    "any": "any",
    "dict": "object",
}


@dataclass(frozen=True)
class Param:
    """One QAPI argument: its name, QAPI type, and whether it may be left out."""

    name: str
    kind: str
    optional: bool = False


@dataclass(frozen=True)
class Command:
    """A QMP command: arguments checked the way QAPI's input visitor checks them."""

    name: str
    handler: Handler
    params: tuple[Param, ...] = ()
    #: Commands whose arguments are free-form to QAPI (qom-set's ``value``: 'any').
    extra_ok: bool = False


def _type_ok(kind: str, value: object) -> bool:
    if kind == "any":
        return True
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind == "dict":
        return isinstance(value, dict)
    if isinstance(value, bool):
        return False
    if kind == "number":
        return isinstance(value, int | float)
    if kind == "int":
        return isinstance(value, int) and -(1 << 63) <= value < (1 << 63)
    if kind == "uint16":
        return isinstance(value, int) and -(1 << 63) <= value < (1 << 64)
    # uint / size: QEMU's qobject input visitor takes 0..2**64-1, and negative int64s
    # converted (qnum_get_try_uint); keep the common range.
    return isinstance(value, int) and -(1 << 63) <= value < (1 << 64)


def check_arguments(command: Command, arguments: Mapping[str, Any]) -> None:
    """Raise CommandFailed with QAPI's message for a missing, mistyped or unknown argument.

    QAPI visits members in declaration order, so the first missing or mistyped member is
    reported before any unexpected one (qobject_input_check_struct runs last).
    """
    for param in command.params:
        if param.name not in arguments:
            if not param.optional:
                raise CommandFailed(f"Parameter '{param.name}' is missing")
            continue
        value = arguments[param.name]
        if not _type_ok(param.kind, value):
            raise CommandFailed(
                f"Invalid parameter type for '{param.name}', expected: {_TYPE_NAMES[param.kind]}"
            )
        if param.kind == "uint16" and not 0 <= value <= 0xFFFF:
            # visit_type_uint16: in range or "Parameter 'index' expects uint16_t"
            raise CommandFailed(f"Parameter '{param.name}' expects uint16_t")
    if not command.extra_ok:
        known = {p.name for p in command.params}
        unexpected = glib_order([name for name in arguments if name not in known])
        if unexpected:
            raise CommandFailed(f"Parameter '{unexpected[0]}' is unexpected")


def timestamp(now: float | None = None) -> JsonObject:
    """QMP's event timestamp (``qmp_event_build_dict``): wall clock, seconds + microseconds."""
    now = time.time() if now is None else now
    seconds = int(now)
    return {"seconds": seconds, "microseconds": int((now - seconds) * 1_000_000)}


# --- QEMU's key order -----------------------------------------------------------------------
#: QDICT_BUCKET_MAX in qobject/qdict.c.
_QDICT_BUCKETS: Final = 512


def _tdb_hash(key: str) -> int:
    """qdict.c's tdb_hash: which of the 512 buckets a key lands in."""
    value = (0x238F13AF * len(key.encode())) & 0xFFFFFFFF
    for i, byte in enumerate(key.encode()):
        value = (value + (byte << (i * 5 % 24))) & 0xFFFFFFFF
    return ((1103515243 * value + 12345) & 0xFFFFFFFF) % _QDICT_BUCKETS


def qemu_order(obj: Any) -> Any:
    """``obj`` with every object's keys in the order QEMU's JSON writer emits them.

    QEMU's output visitor inserts members in QAPI schema order into a QDict, a hash table
    of 512 buckets, each a list with the newest entry first; the JSON writer walks the
    buckets in order. Building our dicts in schema order and reordering them here gives
    byte-identical key order (the transcripts check it), so a client that (wrongly) relies
    on order behaves the same against the simulated VM as against QEMU.
    """
    if isinstance(obj, list):
        return [qemu_order(item) for item in obj]
    if not isinstance(obj, dict):
        return obj
    buckets: dict[int, list[str]] = {}
    for key in obj:
        buckets.setdefault(_tdb_hash(key), []).insert(0, key)
    return {key: qemu_order(obj[key]) for b in sorted(buckets) for key in buckets[b]}


def _djb2(key: str) -> int:
    value = 5381
    for byte in key.encode():
        value = (value * 33 + byte) & 0xFFFFFFFF
    return value


def glib_order(keys: list[str]) -> list[str]:
    """The order a small GHashTable of string keys iterates in (glib 2.74: g_str_hash,
    ``hash * 11 % mod``, quadratic probing). QAPI's input visitor keeps the arguments it has
    not visited in such a table and reports the first as unexpected."""
    size, mod = 8, 7
    while len(keys) * 17 >= size * 16:
        size *= 2
        mod = {16: 13, 32: 31, 64: 61, 128: 127, 256: 251}.get(size, size - 1)
    slots: list[str | None] = [None] * size
    for key in keys:
        index = (_djb2(key) * 11) % mod
        step = 0
        while slots[index] is not None:
            step += 1
            index = (index + step) & (size - 1)
        slots[index] = key
    return [key for key in slots if key is not None]


class JsonSplitter:
    """Cuts a byte stream into JSON texts the way QEMU's json-streamer does: by counting
    brackets outside strings. A top-level text that is not an object or array ends at a
    newline (QEMU's lexer ends it at the next token; a line is what clients send)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._skipping = False
        self.too_big = False

    def feed(self, data: bytes) -> list[bytes]:
        """Return the complete texts in ``data`` and what came before it.

        A text longer than MAX_MESSAGE (inside a string or not) is cut off and reported
        once (``too_big``); the rest of it, up to the next newline, is dropped.
        """
        out: list[bytes] = []
        for byte in data:
            if self._skipping:
                if byte == 0x0A:
                    self._skipping = False
                continue
            if not self._buf and self._depth == 0 and byte in b" \t\r\n":
                continue
            self._buf.append(byte)
            if len(self._buf) > MAX_MESSAGE:
                self.too_big = True
                out.append(b"")
                self._reset()
                self._skipping = True
                continue
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif byte == 0x5C:  # backslash
                    self._escape = True
                elif byte == 0x22:
                    self._in_string = False
                continue
            if byte == 0x22:
                self._in_string = True
            elif byte in b"{[":
                self._depth += 1
            elif byte in b"}]":
                self._depth -= 1
            if (self._depth <= 0 and byte in b"}]\n") or self._depth > MAX_NESTING:
                out.append(bytes(self._buf))
                self._reset()
        return out

    def _reset(self) -> None:
        self._buf.clear()
        self._depth = 0
        self._in_string = False
        self._escape = False


class EventThrottle:
    """QEMU's per-event rate limit (monitor_qapi_event_queue_no_reenter)."""

    def __init__(self, period: float, send: Callable[[JsonObject], None]) -> None:
        self.period = period
        self._send = send
        self._timer: asyncio.TimerHandle | None = None
        self._pending: JsonObject | None = None

    def emit(self, event: JsonObject) -> None:
        """Send now if the period is free, else keep the newest for the period's end."""
        if self._timer is None:
            self._send(event)
            self._arm()
        else:
            self._pending = event

    def _arm(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(self.period, self._expire)

    def _expire(self) -> None:
        if self._pending is None:
            self._timer = None
            return
        event, self._pending = self._pending, None
        self._send(event)
        self._arm()

    def cancel(self) -> None:
        """Drop the timer (server shutting down)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


@dataclass(eq=False)
class _Session:
    writer: asyncio.StreamWriter
    negotiated: bool = False
    oob: bool = False


@dataclass
class QmpServer:
    """One VM's monitor on one unix socket; any number of clients, each its own session."""

    commands: Mapping[str, Command]
    version: JsonObject
    package: str
    #: Events rate-limited as QEMU limits them (qapi/monitor: BALLOON_CHANGE 1 s, ...).
    throttled: Mapping[str, float] = field(default_factory=lambda: {"BALLOON_CHANGE": 1.0})
    _sessions: set[_Session] = field(default_factory=set)
    _throttles: dict[str, EventThrottle] = field(default_factory=dict)
    _server: asyncio.Server | None = None
    closing: bool = False
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self, path: str) -> None:
        """Listen on ``path``: a stale socket there is replaced, a live one is not taken
        over (that would orphan the VM behind it)."""
        if os.path.exists(path):
            try:
                _, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), 2.0)
            except (OSError, TimeoutError):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            else:
                writer.close()
                raise UsageError(f"something is already serving {path}")
        self._server = await asyncio.start_unix_server(self._client, path=path)

    async def close(self) -> None:
        """Stop listening and hang up on every client."""
        for throttle in self._throttles.values():
            throttle.cancel()
        if self._server is not None:
            self._server.close()
        for session in list(self._sessions):
            session.writer.close()
        for task in list(self._tasks):
            task.cancel()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    # --- events -------------------------------------------------------------------------
    def shut_down(self) -> None:
        """The VM is powering off (quit): no more replies or events from now on."""
        self.closing = True

    def emit(self, name: str, data: JsonObject | None = None) -> None:
        """Build the event now (its timestamp is now, as in QEMU) and queue it."""
        if self.closing:
            return
        # qmp_event_build_dict: timestamp first, then the name, then the data.
        event: JsonObject = {"timestamp": timestamp(), "event": name}
        if data is not None:
            event["data"] = data
        period = self.throttled.get(name)
        if period is None:
            self._broadcast(event)
            return
        throttle = self._throttles.get(name)
        if throttle is None:
            throttle = self._throttles[name] = EventThrottle(period, self._broadcast)
        throttle.emit(event)

    def _broadcast(self, event: JsonObject) -> None:
        for session in list(self._sessions):
            if session.negotiated:
                self._write(session, event)

    # --- sessions ---------------------------------------------------------------------------
    @staticmethod
    def _write(session: _Session, obj: JsonObject) -> None:
        # QEMU ends every message with CRLF.
        session.writer.write(json.dumps(qemu_order(obj)).encode() + b"\r\n")

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        session = _Session(writer)
        self._sessions.add(session)
        splitter = JsonSplitter()
        try:
            self._write(
                session,
                {
                    "QMP": {
                        "version": {"qemu": self.version, "package": self.package},
                        "capabilities": ["oob"],
                    }
                },
            )
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                for text in splitter.feed(data):
                    if self.closing:
                        break
                    reply = await self._handle(session, text, splitter.too_big)
                    splitter.too_big = False
                    if reply is not None:
                        self._write(session, reply)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._sessions.discard(session)
            if task is not None:
                self._tasks.discard(task)
            writer.close()

    async def _handle(self, session: _Session, text: bytes, too_big: bool) -> JsonObject | None:
        if too_big:
            return _error("GenericError", "JSON parse error, message too big")
        try:
            request = json.loads(text, parse_constant=_no_constant)
        except UnicodeDecodeError:
            return _error("GenericError", "JSON parse error, invalid UTF-8 sequence in string")
        except (ValueError, RecursionError) as exc:
            return _error("GenericError", f"JSON parse error, {_parse_problem(exc)}")
        if not isinstance(request, dict):
            return _error("GenericError", "QMP input must be a JSON object")
        has_id = "id" in request
        reply = await self._dispatch(session, request)
        if reply is not None and has_id:
            reply["id"] = request["id"]
        return reply

    async def _dispatch(self, session: _Session, request: JsonObject) -> JsonObject | None:
        # qmp_dispatch_check_obj: members first, in QEMU's order.
        for key, value in request.items():
            if key == "exec-oob" and not session.oob:
                return _error("GenericError", "QMP input member 'exec-oob' is unexpected")
            if key in ("execute", "exec-oob"):
                if not isinstance(value, str):
                    return _error("GenericError", f"QMP input member '{key}' must be a string")
            elif key == "arguments":
                if not isinstance(value, dict):
                    return _error("GenericError", "QMP input member 'arguments' must be an object")
            elif key != "id":
                return _error("GenericError", f"QMP input member '{key}' is unexpected")
        name = request.get("execute")
        if name is None:
            if "exec-oob" in request:
                # Only a few QEMU commands may run out of band; none of the balloon's.
                return _error(
                    "GenericError", f"The command {request['exec-oob']} does not support OOB"
                )
            return _error("GenericError", "QMP input lacks member 'execute'")
        arguments: Mapping[str, Any] = request.get("arguments", {})
        if not session.negotiated:
            if name != "qmp_capabilities":
                return _error(
                    "CommandNotFound",
                    "Expecting capabilities negotiation with 'qmp_capabilities'",
                )
            problem = _check_capabilities(arguments)
            if problem is not None:
                return problem
            session.oob = "oob" in arguments.get("enable", [])
            session.negotiated = True
            return {"return": {}}
        if name == "qmp_capabilities":
            return _error(
                "CommandNotFound", "Capabilities negotiation is already complete, command ignored"
            )
        command = self.commands.get(name)
        if command is None:
            return _error("CommandNotFound", f"The command {name} has not been found")
        try:
            check_arguments(command, arguments)
            result = await command.handler(arguments)
        except CommandFailed as exc:
            return _error(exc.error_class, str(exc))
        except Exception:
            # A bug in the simulated VM, not the client's fault: keep the session (QEMU's
            # monitor does not hang up on a client) and say so loudly in the log.
            log.exception("QMP command %s failed inside the simulated VM", name)
            return _error("GenericError", f"internal error in the simulated VM running {name}")
        return {"return": {} if result is None else result}


def _no_constant(name: str) -> object:
    # Python's json takes NaN and Infinity; JSON (and QEMU) do not.
    raise json.JSONDecodeError(f"invalid keyword '{name}'", name, 0)


def _check_capabilities(arguments: Mapping[str, Any]) -> JsonObject | None:
    """qmp_capabilities' arguments: ``enable`` may name the one capability offered, oob."""
    for key in arguments:
        if key != "enable":
            return _error("GenericError", f"Parameter '{key}' is unexpected")
    enable = arguments.get("enable", [])
    if not isinstance(enable, list) or not all(isinstance(c, str) for c in enable):
        return _error("GenericError", "Invalid parameter type for 'enable', expected: array")
    for capability in enable:
        if capability != "oob":
            return _error(
                "GenericError",
                f"Parameter 'enable' does not accept value '{capability}'",
            )
    return None


def _error(error_class: str, desc: str) -> JsonObject:
    return {"error": {"class": error_class, "desc": desc}}


def _parse_problem(exc: BaseException) -> str:
    """QEMU's json-parser wording where the two parsers agree on the problem; the class
    and the ``JSON parse error, `` prefix are always QEMU's."""
    if not isinstance(exc, json.JSONDecodeError):
        return "nesting too deep"
    if exc.msg.startswith("invalid keyword"):
        return exc.msg
    if exc.msg == "Expecting ':' delimiter":
        return "missing : in object pair"
    if exc.msg == "Expecting value":
        word = exc.doc[exc.pos :].split(None, 1)[0] if exc.doc[exc.pos :].strip() else ""
        if word.isalpha():
            return f"invalid keyword '{word}'"
        return "expecting value"
    return exc.msg.lower()
