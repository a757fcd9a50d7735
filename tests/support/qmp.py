"""One raw QMP client, line by line over a unix socket: for looking at a VM behind
balloonctl's back, and for tests that need the wire itself (ids of any type, malformed
input, events in order with their timestamps).

No qemu.qmp: the tests check balloonctl's own QMP code, which uses that library, so the
witness must not share it. :class:`RawQmp` is the client (asyncio, for tests whose VM runs
in their own event loop); :class:`RawQmpClient` drives the same client from synchronous
code on a private event loop, so the wire is handled in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Mapping
from typing import Any, Final

#: How the balloon's driver says it is up, in x-query-virtio-status (QEMU's macro name).
_DRIVER_OK: Final = "VIRTIO_CONFIG_S_DRIVER_OK"
#: QOM path of the balloon device in the simulated VM and in the test guests.
BALLOON: Final = "/machine/peripheral/balloon0"


class RawQmp:
    """One connection; replies and events are read in arrival order."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float = 10.0
    ) -> None:
        self.reader = reader
        self.writer = writer
        #: Bound on one read, unless the caller gives its own.
        self.timeout = timeout
        self.greeting: dict[str, Any] = {}
        self.events: list[dict[str, Any]] = []
        self._next_id = 0

    @classmethod
    async def open(cls, path: str, *, negotiate: bool = True, timeout: float = 10.0) -> RawQmp:
        """Connect, read the greeting and (unless told not to) leave capabilities
        negotiation mode."""
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), timeout)
        client = cls(reader, writer, timeout)
        try:
            client.greeting = await client.read()
            assert "QMP" in client.greeting, client.greeting
            if negotiate:
                reply = await client.call("qmp_capabilities")
                assert reply == {"return": {}, "id": reply["id"]}, reply
        except BaseException:
            await client.close()
            raise
        return client

    async def read(self, timeout: float | None = None) -> dict[str, Any]:
        """The next message, whatever it is; EOFError when the peer hung up."""
        line = await asyncio.wait_for(
            self.reader.readline(), self.timeout if timeout is None else timeout
        )
        if not line:
            raise EOFError("QMP socket closed")
        # QEMU ends every line with CRLF; the simulated VM must as well.
        assert line.endswith(b"\r\n"), line
        obj: dict[str, Any] = json.loads(line)
        return obj

    async def reply(self, timeout: float | None = None) -> dict[str, Any]:
        """The next non-event message; events on the way are kept in ``events``."""
        while True:
            msg = await self.read(timeout)
            if "event" in msg:
                self.events.append(msg)
                continue
            return msg

    async def send_raw(self, data: bytes) -> dict[str, Any]:
        """Send bytes as they are; the next reply."""
        self.writer.write(data)
        await self.writer.drain()
        return await self.reply()

    async def call(
        self, name: str, arguments: Mapping[str, Any] | None = None, *, with_id: bool = True
    ) -> dict[str, Any]:
        """Send a command (with the next integer id, which the reply must echo, unless
        ``with_id`` is false); its reply, ``{"return": ...}`` or ``{"error": ...}``."""
        request: dict[str, Any] = {"execute": name}
        if with_id:
            self._next_id += 1
            request["id"] = self._next_id
        if arguments is not None:
            request["arguments"] = dict(arguments)
        reply = await self.send_raw(json.dumps(request).encode() + b"\n")
        if with_id:
            assert reply.get("id") == self._next_id, (request, reply)
        return reply

    async def ok(self, name: str, arguments: Mapping[str, Any] | None = None) -> Any:
        """Send a command; its ``return`` value (assertion error on an error reply)."""
        reply = await self.call(name, arguments)
        assert "return" in reply, (name, reply)
        return reply["return"]

    async def wait_event(self, name: str, timeout: float = 10.0) -> dict[str, Any]:
        """The first event called ``name``, already received or still to come."""
        for i, event in enumerate(self.events):
            if event["event"] == name:
                return self.events.pop(i)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            msg = await self.read(max(0.01, deadline - loop.time()))
            if msg.get("event") == name:
                return msg
            if "event" in msg:
                self.events.append(msg)

    async def close(self) -> None:
        """Hang up (a peer that already did is fine)."""
        self.writer.close()
        with contextlib.suppress(ConnectionError, BrokenPipeError):
            await self.writer.wait_closed()


class RawQmpClient:
    """:class:`RawQmp` for synchronous code: one connection on an event loop of its own.

    Commands go without an id, as a management tool's often do, so a reply is compared
    whole (``{"return": {}}``).
    """

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self._runner = asyncio.Runner()
        opening = RawQmp.open(path, timeout=timeout)
        try:
            self._client = self._runner.run(opening)
        except BaseException:
            opening.close()  # never started if called from a running loop: no warning
            self._runner.close()
            raise

    @property
    def greeting(self) -> dict[str, Any]:
        """The QMP greeting the peer sent."""
        return self._client.greeting

    @property
    def events(self) -> list[dict[str, Any]]:
        """Events received so far while waiting for replies."""
        return self._client.events

    def execute_raw(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
        """Send a command; its reply (``{"return": ...}`` or ``{"error": ...}``)."""
        return self._runner.run(self._client.call(command, arguments, with_id=False))

    def execute(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
        """Send a command; its ``return`` value (assertion error on an error reply)."""
        reply = self.execute_raw(command, arguments)
        assert "return" in reply, (command, reply)
        return reply["return"]

    def close(self) -> None:
        """Hang up and drop the private event loop."""
        try:
            self._runner.run(self._client.close())
        finally:
            self._runner.close()

    def __enter__(self) -> RawQmpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# One-shot looks at a VM, each on a connection of its own
# --------------------------------------------------------------------------------------------


def raw_execute(sock: str, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
    """One QMP command straight on the VM; its ``return`` value."""
    with RawQmpClient(sock) as client:
        return client.execute(command, arguments)


def raw_actual(sock: str) -> int:
    """``query-balloon`` ``actual`` straight from the VM (not through balloonctl)."""
    actual = raw_execute(sock, "query-balloon")["actual"]
    assert isinstance(actual, int)
    return actual


def raw_stats_period(sock: str) -> int:
    """The balloon's ``guest-stats-polling-interval``, straight from the VM."""
    value = raw_execute(
        sock, "qom-get", {"path": BALLOON, "property": "guest-stats-polling-interval"}
    )
    assert isinstance(value, int)
    return value


def qmp_quit(sock: str) -> dict[str, Any]:
    """QMP ``quit``, as a management tool would power the VM off; the reply."""
    with RawQmpClient(sock) as client:
        reply: dict[str, Any] = client.execute_raw("quit")
        return reply


async def driver_ok(sock: str) -> bool:
    """Whether the VM's balloon driver is up (x-query-virtio-status says DRIVER_OK): a
    booted guest, as the tests wait for one. False while the VM cannot tell."""
    try:
        client = await RawQmp.open(sock, timeout=5)
    except (OSError, EOFError, TimeoutError, AssertionError, ValueError):
        return False
    try:
        devices = await client.ok("x-query-virtio")
        path = next(d["path"] for d in devices if d["name"] == "virtio-balloon")
        status = await client.ok("x-query-virtio-status", {"path": path})
    except (OSError, EOFError, TimeoutError, StopIteration, AssertionError, ValueError):
        return False
    finally:
        await client.close()
    return any(s.startswith(_DRIVER_OK) for s in status["status"]["statuses"])
