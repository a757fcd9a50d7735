"""The QMP client's fast command path (``_QmpClient.execute``) against ``qemu.qmp``'s own.

The fast path serializes a command once, writes it without the library's outgoing queue and
writer task, and waits on a future (see the class docstring). These tests hold it to the
library's behaviour: the same bytes on the wire, the same return values and exceptions for
every kind of reply, no pending entry left behind, and a timeout that leaves the connection
usable. The first test fails if a qemu.qmp upgrade changes the internals it relies on, so that
the fallback to the library's path (correct, but about twice the CPU per command) is never
taken unawares.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
from qemu.qmp import ExecInterruptedError, ExecuteError, QMPClient
from qemu.qmp.qmp_client import BadReplyError

from balloonctl.backends import qmp
from balloonctl.backends.qmp import QmpBackend
from tests.backends.hostile_peer import (
    GREETING_7_2,
    Action,
    Drop,
    Fail,
    GiB,
    HostilePeer,
    Raw,
    Return,
)

T = TypeVar("T")


def with_client(
    sock: str,
    client_type: type[QMPClient],
    body: Callable[[QMPClient, HostilePeer], Awaitable[T]],
) -> T:
    async def main() -> T:
        async with HostilePeer(sock) as peer:
            client = client_type()
            await client.connect(sock)
            try:
                async with asyncio.timeout(10):  # a wrong id would wait forever
                    return await body(client, peer)
            finally:
                # The library re-raises what ended the session (EOFError after a hang-up).
                with contextlib.suppress(Exception):
                    await client.disconnect()

    return asyncio.run(main())


# ============================================================================================
# The fast path is the one taken
# ============================================================================================


def test_the_fast_path_is_taken_with_the_installed_qemu_qmp(
    sock: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def refuse(*args: object, **kwargs: object) -> object:
        raise AssertionError("QMPClient.execute used: qemu.qmp's internals are not as expected")

    monkeypatch.setattr(QMPClient, "execute", refuse)

    async def body(backend: QmpBackend, peer: HostilePeer) -> int:
        await backend.set_stats_period(2)
        await backend.stats()
        return await backend.actual()

    async def main() -> int:
        async with HostilePeer(sock) as peer:
            backend = QmpBackend(sock, connect_timeout=5.0, command_timeout=5.0)
            try:
                return await body(backend, peer)
            finally:
                await backend.close()

    assert asyncio.run(main()) == 2 * GiB


def test_without_the_expected_internals_the_librarys_path_is_used(
    sock: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(qmp._QmpClient, "_fast_path", lambda self: None)
    used: list[str] = []
    original = QMPClient.execute

    async def library_execute(self: QMPClient, cmd: str, *args: Any, **kwargs: Any) -> object:
        used.append(cmd)
        return await original(self, cmd, *args, **kwargs)

    monkeypatch.setattr(QMPClient, "execute", library_execute)

    async def body(client: QMPClient, peer: HostilePeer) -> object:
        assert isinstance(client, qmp._QmpClient)
        reply = await client.execute("query-balloon", timeout=5.0)
        peer.script("query-balloon", Raw('{"return": {"actual": 1}, "id": "other"}'))
        with pytest.raises(TimeoutError):
            await client.execute("query-balloon", timeout=0.2)
        return reply

    assert with_client(sock, qmp._QmpClient, body) == {"actual": 2 * GiB}
    assert used == ["query-balloon", "query-balloon"]


# ============================================================================================
# The same bytes on the wire
# ============================================================================================


async def captured_commands(path: str, client: QMPClient) -> list[bytes]:
    """The raw bytes of two commands as ``client`` sends them to a monitor on ``path``."""
    seen: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(json.dumps(GREETING_7_2).encode() + b"\r\n")
        decoder = json.JSONDecoder()
        buffer = b""
        while True:
            data = await reader.read(65536)
            if not data:
                return
            buffer += data
            while buffer:
                try:
                    msg, end = decoder.raw_decode(buffer.decode())
                except ValueError:
                    break
                seen.append(buffer[:end])
                buffer = buffer[end:]
                writer.write(json.dumps({"return": {}, "id": msg.get("id")}).encode() + b"\r\n")

    server = await asyncio.start_unix_server(serve, path=path)
    try:
        await client.connect(path)
        await client.execute(
            "qom-get", {"path": "/machine/peripheral/balloon0", "property": "guest-stats"}
        )
        await client.execute("query-balloon")
        await client.disconnect()
    finally:
        server.close()
        await server.wait_closed()
        # Python 3.13's start_unix_server removes its socket on close (cleanup_socket);
        # 3.11 leaves it for the caller.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    return seen


def test_the_bytes_sent_are_the_librarys(sock: str) -> None:
    async def main() -> tuple[list[bytes], list[bytes]]:
        library = await captured_commands(sock, QMPClient())
        fast = await captured_commands(sock, qmp._QmpClient())
        return library, fast

    async def guarded() -> tuple[list[bytes], list[bytes]]:
        async with asyncio.timeout(10):  # a wrong id would wait forever
            return await main()

    library, fast = asyncio.run(guarded())
    assert len(library) == 3  # qmp_capabilities, qom-get, query-balloon
    assert fast == library


# ============================================================================================
# The same outcome for every kind of reply
# ============================================================================================

REPLIES: dict[str, Action] = {
    "return": Return({"actual": 123}),
    "error": Fail("DeviceNotActive", "No balloon device has been activated"),
    "error-not-an-object": Raw('{"error": "broken", "id": {id}}'),
    "error-without-class": Raw('{"error": {"desc": "no class"}, "id": {id}}'),
    "neither-return-nor-error": Raw('{"id": {id}}'),
    "hang-up": Drop(),
}


def outcome(client_type: type[QMPClient], sock: str, action: Action) -> tuple[object, ...]:
    async def body(client: QMPClient, peer: HostilePeer) -> tuple[object, ...]:
        peer.script("query-balloon", action)
        try:
            value = await client.execute("query-balloon")
        except ExecuteError as exc:
            result: tuple[object, ...] = (
                "ExecuteError",
                exc.error_class,
                str(exc),
                dict(exc.sent),
                dict(exc.received),
            )
        except (BadReplyError, ExecInterruptedError) as exc:
            sent = dict(exc.sent) if isinstance(exc, BadReplyError) else None
            result = (type(exc).__name__, str(exc), sent)
        else:
            result = ("return", value)
        pending = getattr(client, "_pending", None)
        return (*result, pending)

    return with_client(sock, client_type, body)


@pytest.mark.parametrize("reply", sorted(REPLIES))
def test_each_reply_has_the_librarys_outcome(sock: str, reply: str) -> None:
    library = outcome(QMPClient, sock, REPLIES[reply])
    fast = outcome(qmp._QmpClient, sock, REPLIES[reply])
    assert fast == library
    assert fast[-1] == {}, "no pending entry left behind"


# ============================================================================================
# Timeouts
# ============================================================================================


def test_a_timeout_drops_the_late_reply_and_the_connection_goes_on(sock: str) -> None:
    async def body(client: QMPClient, peer: HostilePeer) -> object:
        assert isinstance(client, qmp._QmpClient)
        # A reply to another id only: the command waits in vain, like one QEMU never answers.
        peer.script("query-balloon", Raw('{"return": {"actual": 1}, "id": "not-ours"}'))
        with pytest.raises(TimeoutError):
            await client.execute("query-balloon", timeout=0.2)
        assert client._pending == {}
        return await client.execute("query-balloon", timeout=5.0)

    assert with_client(sock, qmp._QmpClient, body) == {"actual": 2 * GiB}


def test_a_reply_in_time_cancels_the_timer(sock: str) -> None:
    async def body(client: QMPClient, peer: HostilePeer) -> int:
        assert isinstance(client, qmp._QmpClient)
        loop = asyncio.get_running_loop()
        for _ in range(20):
            await client.execute("query-balloon", timeout=30.0)
        # BaseEventLoop's timer heap: a timer left behind per command would pile up here.
        scheduled: list[asyncio.TimerHandle] = loop._scheduled  # type: ignore[attr-defined]
        later = loop.time() + 20
        return sum(1 for handle in scheduled if not handle.cancelled() and handle.when() > later)

    assert with_client(sock, qmp._QmpClient, body) == 0


# ============================================================================================
# The recv() size
# ============================================================================================


def test_connections_read_in_recv_size_chunks_and_longer_replies_arrive_whole(sock: str) -> None:
    long_value = "x" * (3 * qmp.RECV_SIZE + 17)

    async def main() -> tuple[object, object]:
        async with HostilePeer(sock) as peer:
            backend = QmpBackend(sock, connect_timeout=5.0, command_timeout=5.0)
            try:
                await backend.actual()
                client = backend._client
                assert client is not None
                writer = client._writer
                assert writer is not None
                # As connecting left it (nothing here calls tune_transport first).
                size = getattr(writer.transport, "max_size")  # noqa: B009 (not in the stubs)
                # Fails if asyncio's transport no longer has max_size: the cap would be lost.
                assert client.tune_transport()
                peer.script("query-balloon", Return({"actual": 1, "padding": long_value}))
                return size, await backend.monitor("query-balloon")
            finally:
                await backend.close()

    size, reply = asyncio.run(main())
    assert size == qmp.RECV_SIZE
    assert reply == {"actual": 1, "padding": long_value}
