"""A minimal QMP client over a real unix socket, for tests that need the raw wire: ids of
any type, malformed input, events in order with their timestamps."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any


class RawQmp:
    """One connection; replies and events are read in arrival order."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.greeting: dict[str, Any] = {}
        self.events: list[dict[str, Any]] = []
        self._next_id = 0

    @classmethod
    async def open(cls, path: str, *, negotiate: bool = True) -> RawQmp:
        reader, writer = await asyncio.open_unix_connection(path)
        client = cls(reader, writer)
        client.greeting = await client.read()
        if negotiate:
            reply = await client.call("qmp_capabilities")
            assert reply == {"return": {}, "id": reply["id"]}, reply
        return client

    async def read(self, timeout: float = 10.0) -> dict[str, Any]:
        line = await asyncio.wait_for(self.reader.readline(), timeout)
        if not line:
            raise EOFError("QMP socket closed")
        assert line.endswith(b"\r\n"), line
        obj: dict[str, Any] = json.loads(line)
        return obj

    async def reply(self, timeout: float = 10.0) -> dict[str, Any]:
        """The next non-event message; events on the way are kept in ``events``."""
        while True:
            msg = await self.read(timeout)
            if "event" in msg:
                self.events.append(msg)
                continue
            return msg

    async def send_raw(self, data: bytes) -> dict[str, Any]:
        self.writer.write(data)
        await self.writer.drain()
        return await self.reply()

    async def call(self, name: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        self._next_id += 1
        request: dict[str, Any] = {"execute": name, "id": self._next_id}
        if arguments is not None:
            request["arguments"] = arguments
        reply = await self.send_raw(json.dumps(request).encode())
        assert reply.get("id") == self._next_id, (request, reply)
        return reply

    async def ok(self, name: str, arguments: dict[str, Any] | None = None) -> Any:
        reply = await self.call(name, arguments)
        assert "return" in reply, reply
        return reply["return"]

    async def wait_event(self, name: str, timeout: float = 10.0) -> dict[str, Any]:
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
        self.writer.close()
        with contextlib.suppress(ConnectionError, BrokenPipeError):
            await self.writer.wait_closed()
