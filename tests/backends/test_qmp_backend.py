"""The QMP backend against a scripted peer on a real unix socket (tests/backends/hostile_peer).

Each error path asserts the exact BalloonError subclass (``type(e) is X``, so a ConnectionLost
cannot pass for a VmUnreachable), a one-line message, and what the peer received: retries are
counted on the wire, not inferred.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import socket
import tracemalloc
from collections.abc import Awaitable, Callable, Mapping
from typing import Final, TypeVar

import pytest
from qemu.qmp import Message

from balloonctl.backends.address import QmpAddress, looks_like_qmp_address, parse_address
from balloonctl.backends.base import Backend, FeatureState
from balloonctl.backends.qmp import (
    BalloonLocation,
    BoundedEventListener,
    QmpBackend,
    decode_guest_stats,
    decode_virtio_status,
    feature_property_changes,
    is_idempotent,
    locate_balloon,
)
from balloonctl.backends.qmpvocab import names_extended_stats
from balloonctl.errors import (
    BalloonError,
    CommandFailed,
    ConnectionLost,
    OperationTimeout,
    PeerError,
    UsageError,
    VmUnreachable,
)
from balloonctl.virtio.spec import EXTENDED_STAT_NAMES
from tests.backends.hostile_peer import (
    GREETING_7_2,
    STATUS_STRINGS,
    Action,
    Drop,
    Emit,
    Fail,
    FakeQemu,
    Flood,
    GiB,
    Hang,
    HostilePeer,
    Raw,
    Return,
    Script,
    recorded_reply,
    recorded_return,
)

T = TypeVar("T")
Body = Callable[[QmpBackend, HostilePeer], Awaitable[T]]


def session(
    sock: str,
    body: Body[T],
    *,
    vm: FakeQemu | None = None,
    greeting: Mapping[str, object] | str | None = GREETING_7_2,
    hang_up_first: int = 0,
    connect_timeout: float = 5.0,
    command_timeout: float = 5.0,
) -> tuple[T, HostilePeer]:
    """Run ``body(backend, peer)`` with a peer serving ``sock``; return its result and the peer."""

    async def main() -> tuple[T, HostilePeer]:
        async with HostilePeer(sock, vm, greeting=greeting, hang_up_first=hang_up_first) as peer:
            backend = QmpBackend(
                sock, connect_timeout=connect_timeout, command_timeout=command_timeout
            )
            try:
                return await body(backend, peer), peer
            finally:
                await backend.close()

    return asyncio.run(main())


def assert_one_line(exc: BaseException) -> None:
    text = str(exc)
    assert text and "\n" not in text and "\r" not in text, repr(text)


def assert_cause_kept(exc: BaseException) -> None:
    assert exc.__cause__ is not None


# ============================================================================================
# Addresses
# ============================================================================================


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("unix:/run/qmp.sock", QmpAddress("unix", path="/run/qmp.sock")),
        ("unix:rel/qmp.sock", QmpAddress("unix", path="rel/qmp.sock")),
        ("/run/vm:1.sock", QmpAddress("unix", path="/run/vm:1.sock")),
        ("./qmp.sock", QmpAddress("unix", path="./qmp.sock")),
        ("qmp.sock", QmpAddress("unix", path="qmp.sock")),
        ("tcp:127.0.0.1:4444", QmpAddress("tcp", host="127.0.0.1", port=4444)),
        ("tcp:localhost:1", QmpAddress("tcp", host="localhost", port=1)),
        ("tcp:[::1]:4444", QmpAddress("tcp", host="::1", port=4444)),
        ("tcp:[fe80::1%eth0]:65535", QmpAddress("tcp", host="fe80::1%eth0", port=65535)),
    ],
)
def test_parse_address(text: str, expected: QmpAddress) -> None:
    assert parse_address(text) == expected


def test_address_target_and_str() -> None:
    assert parse_address("tcp:[::1]:4444").target == ("::1", 4444)
    assert str(parse_address("tcp:[::1]:4444")) == "tcp:[::1]:4444"
    assert parse_address("/x/y.sock").target == "/x/y.sock"
    assert str(parse_address("/x/y.sock")) == "unix:/x/y.sock"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", "empty"),
        ("unix:", "no socket path"),
        ("tcp:host", "tcp:HOST:PORT"),
        ("tcp::4444", "empty host"),
        ("tcp:host:0", "1..65535"),
        ("tcp:host:65536", "1..65535"),
        ("tcp:host:http", "not a number"),
        ("tcp:::1:4444", "brackets"),
        ("tcp:[::1]4444", "tcp:[IPV6]:PORT"),
        ("tcp:[]:4444", "empty host"),
        ("ssh:host:22", "unknown scheme"),
    ],
)
def test_parse_address_refuses(text: str, needle: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_address(text)
    assert needle in str(info.value)
    assert_one_line(info.value)


def test_looks_like_qmp_address(sock: str, tmp_path: os.PathLike[str]) -> None:
    listener = socket.socket(socket.AF_UNIX)
    try:
        listener.bind(sock)
        regular = os.path.join(os.fspath(tmp_path), "file")
        with open(regular, "w") as f:
            f.write("x")
        assert looks_like_qmp_address(sock)
        assert looks_like_qmp_address("unix:/nowhere")
        assert looks_like_qmp_address("tcp:h:1")
        assert not looks_like_qmp_address(regular)
        assert not looks_like_qmp_address("web01")
    finally:
        listener.close()


def test_bad_address_is_a_usage_error_before_any_io() -> None:
    with pytest.raises(UsageError):
        QmpBackend("tcp:nohost")


def test_qmp_backend_is_a_backend() -> None:
    backend: Backend = QmpBackend("unix:/nowhere")
    assert backend.name == "unix:/nowhere"


# ============================================================================================
# Connecting
# ============================================================================================


async def _connect_only(backend: QmpBackend) -> None:
    async with backend:
        pass


def test_missing_socket(sock: str) -> None:
    backend = QmpBackend(f"unix:{sock}", connect_timeout=2.0)
    with pytest.raises(VmUnreachable) as info:
        asyncio.run(_connect_only(backend))
    assert type(info.value) is VmUnreachable
    assert str(info.value) == f"cannot reach VM unix:{sock}: no such socket"
    assert_cause_kept(info.value)


def test_not_a_socket(sock: str) -> None:
    with open(sock, "w") as f:
        f.write("not a socket")
    backend = QmpBackend(sock)
    with pytest.raises(VmUnreachable) as info:
        asyncio.run(_connect_only(backend))
    assert type(info.value) is VmUnreachable
    assert str(info.value) == f"cannot reach VM {sock}: {sock} is not a socket"


def test_connection_refused(sock: str) -> None:
    # A bound socket nobody listens on: what a crashed QEMU leaves behind.
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(sock)
    try:
        backend = QmpBackend(sock, connect_timeout=2.0)
        with pytest.raises(VmUnreachable) as info:
            asyncio.run(_connect_only(backend))
    finally:
        stale.close()
    assert type(info.value) is VmUnreachable
    assert "connection refused" in str(info.value)
    assert_one_line(info.value)


def test_greeting_never_comes(sock: str) -> None:
    with pytest.raises(VmUnreachable) as info:
        session(sock, lambda b, p: b.actual(), greeting=None, connect_timeout=0.3)
    assert type(info.value) is VmUnreachable
    assert "no QMP greeting within 0.3 s" in str(info.value)
    assert_one_line(info.value)


def test_not_qmp_is_unreachable_and_not_retried(sock: str) -> None:
    async def body(backend: QmpBackend, peer: HostilePeer) -> int:
        with pytest.raises(VmUnreachable) as info:
            await backend.actual()
        assert "did not greet as a QMP monitor" in str(info.value)
        assert_one_line(info.value)
        return peer.connections

    connections, _ = session(sock, body, greeting="SSH-2.0-OpenSSH_9.2")
    assert connections == 1


def test_connect_retries_a_monitor_that_hangs_up(sock: str) -> None:
    actual, peer = session(sock, lambda b, p: b.actual(), hang_up_first=2)
    assert actual == 2 * GiB
    assert peer.connections == 3


def test_connect_retries_are_bounded(sock: str) -> None:
    with pytest.raises(VmUnreachable) as info:
        session(sock, lambda b, p: b.actual(), hang_up_first=1000)
    assert "closed the connection before its QMP greeting" in str(info.value)


def test_connect_attempts_counted(sock: str) -> None:
    async def body(backend: QmpBackend, peer: HostilePeer) -> int:
        with pytest.raises(VmUnreachable):
            await backend.actual()
        return peer.connections

    connections, _ = session(sock, body, hang_up_first=1000)
    assert connections == QmpBackend.CONNECT_ATTEMPTS


# ============================================================================================
# Command errors
# ============================================================================================


def test_execute_error_is_command_failed(sock: str) -> None:
    async def body(backend: QmpBackend, peer: HostilePeer) -> None:
        peer.script("balloon", Fail("GenericError", "Parameter 'value' expects a size\nmore"))
        with pytest.raises(CommandFailed) as info:
            await backend.set_target(GiB)
        assert info.value.error_class == "GenericError"
        assert str(info.value) == (
            f"VM {sock} refused balloon: Parameter 'value' expects a size more"
        )
        assert_cause_kept(info.value)

    session(sock, body)


def test_no_balloon_keeps_the_class(sock: str) -> None:
    vm = FakeQemu()
    vm.balloon = None

    async def body(backend: QmpBackend, peer: HostilePeer) -> None:
        with pytest.raises(CommandFailed) as info:
            await backend.actual()
        assert info.value.error_class == "DeviceNotActive"
        assert str(info.value) == (
            f"VM {sock} has no balloon device (QEMU: No balloon device has been activated)"
        )

    session(sock, body, vm=vm)


def test_other_error_classes_are_kept(sock: str) -> None:
    async def body(backend: QmpBackend, peer: HostilePeer) -> None:
        peer.script(
            "query-balloon",
            Fail("KVMMissingCap", "Using KVM without synchronous MMU, balloon unavailable"),
        )
        with pytest.raises(CommandFailed) as info:
            await backend.actual()
        assert info.value.error_class == "KVMMissingCap"
        # A refusal is an answer: not retried.
        assert peer.count("query-balloon") == 1

    session(sock, body)


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ("this is {not json", "a message that is not JSON"),
        ("[1, 2, 3]", "a JSON value that is not an object"),
        ('{"error": {"class": "GenericError", "desc": "JSON parse error"}}', "without an id"),
    ],
)
def test_malformed_message_is_peer_error(sock: str, raw: str, needle: str) -> None:
    async def body(backend: QmpBackend, peer: HostilePeer) -> int:
        peer.script("query-balloon", Raw(raw))
        with pytest.raises(PeerError) as info:
            await backend.actual()
        assert type(info.value) is PeerError
        assert needle in str(info.value)
        assert_one_line(info.value)
        assert_cause_kept(info.value)
        # Not a drop: not retried...
        assert peer.count("query-balloon") == 1
        # ...and the next command gets a fresh connection.
        return await backend.actual()

    actual, peer = session(sock, body)
    assert actual == 2 * GiB
    assert peer.connections == 2


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ('{"id": {id}, "neither": 1}', "malformed reply"),
        ('{"id": {id}, "error": {"class": 42}}', "malformed reply"),
    ],
)
def test_reply_of_the_wrong_shape(sock: str, raw: str, needle: str) -> None:
    async def body(backend: QmpBackend, peer: HostilePeer) -> None:
        peer.script("query-balloon", Raw(raw))
        with pytest.raises(PeerError) as info:
            await backend.actual()
        assert needle in str(info.value)
        assert_one_line(info.value)

    session(sock, body)


@pytest.mark.parametrize(
    "value",
    [{"actual": "lots"}, {"actual": True}, {"actual": -5}, {}, [2 * GiB], None],
)
def test_query_balloon_of_the_wrong_shape(sock: str, value: object) -> None:
    async def body(backend: QmpBackend, peer: HostilePeer) -> None:
        peer.script("query-balloon", Return(value))
        with pytest.raises(PeerError) as info:
            await backend.actual()
        assert "query-balloon" in str(info.value)
        assert_one_line(info.value)

    session(sock, body)


def test_no_answer_is_a_timeout(sock: str) -> None:
    async def body(backend: QmpBackend, peer: HostilePeer) -> None:
        peer.script("query-balloon", Hang())
        with pytest.raises(OperationTimeout) as info:
            await backend.actual()
        assert str(info.value) == f"VM {sock} did not answer query-balloon within 0.3 s"
        assert peer.count("query-balloon") == 1

    session(sock, body, command_timeout=0.3)


def test_cancellation_is_never_wrapped(sock: str) -> None:
    async def body(backend: QmpBackend, peer: HostilePeer) -> None:
        peer.script("query-balloon", Hang())
        task = asyncio.create_task(backend.actual())
        while peer.count("query-balloon") == 0:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    session(sock, body)


# ============================================================================================
# Retries: queries yes, actions never
# ============================================================================================


@pytest.mark.parametrize(
    ("command", "idempotent"),
    [
        ("query-balloon", True),
        ("qom-get", True),
        ("qom-list", True),
        ("x-query-virtio", True),
        ("x-query-virtio-status", True),
        ("query-memory-size-summary", True),
        ("query-status", True),
        ("balloon", False),
        ("qom-set", False),
        ("device_add", False),
        ("device_del", False),
        ("quit", False),
    ],
)
def test_is_idempotent(command: str, idempotent: bool) -> None:
    assert is_idempotent(command) is idempotent


def test_query_reconnects_after_a_drop(sock: str) -> None:
    async def body(backend: QmpBackend, peer: HostilePeer) -> int:
        peer.script("query-balloon", Drop())
        return await backend.actual()

    actual, peer = session(sock, body)
    assert actual == 2 * GiB
    assert peer.count("query-balloon") == 2
    assert peer.connections == 2


def test_query_retries_are_bounded(sock: str) -> None:
    async def body(backend: QmpBackend, peer: HostilePeer) -> None:
        peer.script("query-balloon", *[Drop()] * 10)
        with pytest.raises(ConnectionLost) as info:
            await backend.actual()
        assert str(info.value) == f"connection to VM {sock} lost during query-balloon"
        assert_cause_kept(info.value)

    _, peer = session(sock, body)
    assert peer.count("query-balloon") == QmpBackend.QUERY_ATTEMPTS


def test_balloon_is_never_retried(sock: str) -> None:
    async def body(backend: QmpBackend, peer: HostilePeer) -> None:
        peer.script("balloon", Drop())
        with pytest.raises(ConnectionLost) as info:
            await backend.set_target(GiB)
        assert "whether it took effect is unknown" in str(info.value)
        assert_one_line(info.value)

    _, peer = session(sock, body)
    assert peer.count("balloon") == 1


def test_qom_set_is_never_retried(sock: str) -> None:
    async def body(backend: QmpBackend, peer: HostilePeer) -> None:
        peer.script("qom-set", Drop())
        with pytest.raises(ConnectionLost):
            await backend.set_stats_period(2)

    _, peer = session(sock, body)
    assert peer.count("qom-set") == 1


@pytest.mark.parametrize("command", ["device_del", "device_add"])
def test_device_commands_are_never_retried(sock: str, command: str) -> None:
    async def body(backend: QmpBackend, peer: HostilePeer) -> None:
        peer.script(command, Drop())
        with pytest.raises(ConnectionLost) as info:
            await backend.renegotiate([], ["page-reporting"])
        assert command in str(info.value)

    _, peer = session(sock, body)
    assert peer.count(command) == 1


def test_an_action_after_a_drop_gets_a_new_connection(sock: str) -> None:
    async def body(backend: QmpBackend, peer: HostilePeer) -> int:
        await backend.actual()
        await peer.hang_up()
        await asyncio.sleep(0.05)
        await backend.set_target(GiB)  # sent once, on a fresh connection
        return await backend.actual()

    actual, peer = session(sock, body)
    assert actual == GiB
    assert peer.count("balloon") == 1
    assert peer.connections == 2


# ============================================================================================
# Library logging
# ============================================================================================


def _qemu_errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r for r in caplog.records if r.name.startswith("qemu.qmp") and r.levelno >= logging.ERROR
    ]


def test_library_is_quiet_by_default(sock: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)

    async def body(backend: QmpBackend, peer: HostilePeer) -> None:
        peer.script("query-balloon", Raw("not json"))
        with pytest.raises(PeerError):
            await backend.actual()

    session(sock, body)
    assert _qemu_errors(caplog) == []


def test_library_speaks_with_verbose(sock: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="balloonctl")

    async def body(backend: QmpBackend, peer: HostilePeer) -> None:
        peer.script("query-balloon", Raw("not json"))
        with pytest.raises(PeerError):
            await backend.actual()

    try:
        session(sock, body)
    finally:
        logging.getLogger("balloonctl").setLevel(logging.NOTSET)
    assert _qemu_errors(caplog), "with -v the library's own error lines are shown"
    assert any(
        r.name == "balloonctl.backends.qmp" and "query-balloon" in r.message for r in caplog.records
    )


# ============================================================================================
# Events
# ============================================================================================


def test_bounded_listener_drops_the_oldest() -> None:
    async def main() -> None:
        listener = BoundedEventListener("BALLOON_CHANGE", maxlen=8)
        for i in range(10_000):
            await listener.put(Message({"event": "BALLOON_CHANGE", "data": {"actual": i}}))
        await listener.put(Message({"event": "SHUTDOWN"}))
        assert len(listener) == 8
        assert listener.dropped == 10_000 - 8
        assert listener.history == ()
        got = []
        while not listener.empty():
            event = await listener.get()
            data = event["data"]
            assert isinstance(data, dict)
            got.append(data["actual"])
        assert got == list(range(10_000 - 8, 10_000))

    asyncio.run(main())


def test_watch_actual_sees_balloon_change(sock: str) -> None:
    async def body(backend: QmpBackend, peer: HostilePeer) -> int:
        async with backend.watch_actual() as values:
            await backend.set_target(GiB)
            return await anext(values)

    value, _ = session(sock, body)
    assert value == GiB


def test_event_flood_does_not_grow_memory(sock: str) -> None:
    flood = 10_000
    backlog = QmpBackend.WATCH_BACKLOG

    async def body(backend: QmpBackend, peer: HostilePeer) -> tuple[list[int], int]:
        async with backend.watch_actual() as values:
            await backend.actual()  # connected, listener in place
            gc.collect()
            tracemalloc.start()
            before = tracemalloc.take_snapshot()
            # The reply comes after the flood, so when actual() returns every event has been
            # dispatched to every listener.
            peer.script("query-balloon", [Flood(flood), Return({"actual": 7})])
            assert await backend.actual() == 7
            gc.collect()
            after = tracemalloc.take_snapshot()
            tracemalloc.stop()
            grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
            got = [await anext(values) for _ in range(backlog)]
            return got, grown

    # tracemalloc makes the 10000-event flood slow on a loaded machine: the 5 s default
    # command timeout is not what this test is about.
    (got, grown), _ = session(sock, body, command_timeout=120.0)
    # Only the newest values survive, in order.
    assert got == list(range(flood - backlog, flood))
    # Unbounded listeners keep ~1 KiB a BALLOON_CHANGE (about 10 MiB here); bounded ones keep
    # a fixed handful of messages whatever the flood.
    assert grown < 1 << 20, f"retained {grown} bytes after {flood} events"


def test_watch_ends_when_the_connection_drops(sock: str) -> None:
    async def body(backend: QmpBackend, peer: HostilePeer) -> None:
        async with backend.watch_actual() as values:
            waiter = asyncio.ensure_future(anext(values))
            await asyncio.sleep(0.05)
            await peer.hang_up()
            with pytest.raises(ConnectionLost) as info:
                await waiter
            assert "BALLOON_CHANGE" in str(info.value)

    session(sock, body)


def test_latest_takes_the_newest_value_without_waiting(sock: str) -> None:
    async def body(backend: QmpBackend, peer: HostilePeer) -> list[int | None]:
        async with backend.watch_actual() as values:
            seen = [values.latest()]  # nothing yet: None at once, no waiting
            # The reply comes after the events: when actual() returns, all were dispatched.
            peer.script("query-balloon", [Flood(5, start=100), Return({"actual": 7})])
            await backend.actual()
            seen.append(values.latest())  # the newest of the five
            seen.append(values.latest())  # the older four were dropped with it
            return seen

    seen, _ = session(sock, body)
    assert seen == [None, 104, None]


def test_latest_says_when_the_connection_is_gone(sock: str) -> None:
    async def body(backend: QmpBackend, peer: HostilePeer) -> None:
        async with backend.watch_actual() as values:
            await peer.hang_up()
            with pytest.raises(ConnectionLost):
                await backend.monitor("balloon", {"value": GiB})  # sees the hang-up
            with pytest.raises(ConnectionLost) as info:
                values.latest()
            assert "BALLOON_CHANGE" in str(info.value)
            # A new connection does not revive a watch of the old one: events were missed.
            await backend.actual()
            with pytest.raises(ConnectionLost):
                values.latest()

    session(sock, body)


def test_latest_rejects_a_malformed_newest_event(sock: str) -> None:
    async def body(backend: QmpBackend, peer: HostilePeer) -> None:
        async with backend.watch_actual() as values:
            peer.script(
                "query-balloon",
                [
                    Emit("BALLOON_CHANGE", {"actual": 1}),
                    Emit("BALLOON_CHANGE", {"actual": "x"}),
                    Return({"actual": 7}),
                ],
            )
            await backend.actual()
            with pytest.raises(PeerError):
                values.latest()

    session(sock, body)


def test_watch_rejects_a_malformed_event(sock: str) -> None:
    async def body(backend: QmpBackend, peer: HostilePeer) -> None:
        async with backend.watch_actual() as values:
            await peer.emit("BALLOON_CHANGE", {"actual": "a lot"})
            with pytest.raises(PeerError):
                await anext(values)

    session(sock, body)


# ============================================================================================
# Memory size, target, stats
# ============================================================================================


def test_max_memory_adds_plugged_memory(sock: str) -> None:
    async def body(backend: QmpBackend, peer: HostilePeer) -> tuple[int, int]:
        plain = await backend.max_memory()
        peer.script(
            "query-memory-size-summary",
            Return({"base-memory": 2 * GiB, "plugged-memory": GiB}),
        )
        return plain, await backend.max_memory()

    (plain, plugged), _ = session(sock, body)
    assert (plain, plugged) == (2 * GiB, 3 * GiB)


def test_set_target_sends_balloon_value(sock: str) -> None:
    async def body(backend: QmpBackend, peer: HostilePeer) -> int:
        await backend.set_target(1536 << 20)
        return await backend.actual()

    actual, peer = session(sock, body)
    assert peer.arguments("balloon") == [{"value": 1536 << 20}]
    assert actual == 1536 << 20


@pytest.mark.parametrize("target", [0, -1, True])
def test_set_target_refuses_nonsense_without_sending(sock: str, target: int) -> None:
    async def body(backend: QmpBackend, peer: HostilePeer) -> None:
        with pytest.raises(UsageError):
            await backend.set_target(target)

    _, peer = session(sock, body)
    assert peer.count("balloon") == 0


def test_stats_normalized(sock: str) -> None:
    vm = FakeQemu()
    vm.stats = {
        "stat-swap-in": 0,
        "stat-swap-out": 0,
        "stat-major-faults": 2,
        "stat-minor-faults": 68_123,
        "stat-free-memory": 1_760_444_416,
        "stat-total-memory": 2_059_530_240,
        "stat-available-memory": 1_620_000_768,
        # Not reported by the guest: QEMU keeps -1 in a uint64 (reset_stats), and its uint64
        # visitor may print that as 2**64 - 1.
        "stat-htlb-pgalloc": -1,
        "stat-htlb-pgfail": (1 << 64) - 1,
        "stat-disk-caches": -1,
    }

    stats, _ = session(sock, lambda b, p: b.stats(), vm=vm)
    assert stats.last_update == vm.last_update
    assert stats.stats == {
        "swap-in": 0,
        "swap-out": 0,
        "major-faults": 2,
        "minor-faults": 68_123,
        "free-memory": 1_760_444_416,
        "total-memory": 2_059_530_240,
        "available-memory": 1_620_000_768,
    }


#: What QEMU 9.2+ adds to guest-stats (hw/virtio/virtio-balloon.c balloon_stat_names).
QEMU_EXTENDED_NAMES: Final = (
    "stat-oom-kills",
    "stat-alloc-stalls",
    "stat-async-scans",
    "stat-direct-scans",
    "stat-async-reclaims",
    "stat-direct-reclaims",
)


def test_stats_of_a_linux_6_12_guest_on_qemu_10(sock: str) -> None:
    vm = FakeQemu()
    vm.stats = {
        **vm.stats,
        "stat-oom-kills": 3,
        "stat-alloc-stalls": 41,
        "stat-async-scans": 1_048_576_000,
        "stat-direct-scans": 73_400_320,
        "stat-async-reclaims": 943_718_400,
        "stat-direct-reclaims": 52_428_800,
    }
    stats, _ = session(sock, lambda b, p: b.stats(), vm=vm)
    assert {name: stats.stats[name] for name in EXTENDED_STAT_NAMES} == {
        "oom-kills": 3,
        "alloc-stalls": 41,
        "async-scans": 1_048_576_000,
        "direct-scans": 73_400_320,
        "async-reclaims": 943_718_400,
        "direct-reclaims": 52_428_800,
    }
    assert stats.stats["free-memory"] == vm.stats["stat-free-memory"]  # the ten as before
    assert len(stats.stats) == 16
    assert stats.unavailable == {}


def test_stats_of_an_older_guest_on_qemu_10_leave_the_six_out(sock: str) -> None:
    """QEMU 9.2+ names all sixteen, -1 until the guest sends one (reset_stats): a Linux 6.1
    guest's reading has no oom-kills at all, not oom-kills 0."""
    vm = FakeQemu()
    vm.stats = {**vm.stats, **dict.fromkeys(QEMU_EXTENDED_NAMES[:3], -1)}
    vm.stats.update(dict.fromkeys(QEMU_EXTENDED_NAMES[3:], (1 << 64) - 1))
    stats, _ = session(sock, lambda b, p: b.stats(), vm=vm)
    assert not set(EXTENDED_STAT_NAMES) & set(stats.stats)
    assert stats.stats["total-memory"] == vm.stats["stat-total-memory"]


def test_names_extended_stats_tells_qemu_9_2_from_7_2() -> None:
    ten = {"stat-free-memory": 1, "stat-htlb-pgfail": 0}
    assert not names_extended_stats({"stats": ten, "last-update": 1})
    for name in QEMU_EXTENDED_NAMES:
        assert names_extended_stats({"stats": {**ten, name: -1}, "last-update": 1})
    assert not names_extended_stats({"stats": [], "last-update": 1})
    with pytest.raises(PeerError):
        names_extended_stats("stats")


@pytest.mark.parametrize(
    "reply",
    [
        {"stats": {"stat-oom-kills": -3}, "last-update": 1},
        {"stats": {"stat-direct-reclaims": 1.5}, "last-update": 1},
        {"stats": {"stat-free-memory": "12"}, "last-update": 1},
        {"stats": {"stat-free-memory": True}, "last-update": 1},
        {"stats": {"stat-free-memory": -7}, "last-update": 1},
        {"stats": [], "last-update": 1},
        {"stats": {}},
        {"stats": {}, "last-update": "yesterday"},
        "stats",
    ],
)
def test_stats_of_the_wrong_shape(reply: object) -> None:
    with pytest.raises(PeerError) as info:
        decode_guest_stats(reply)
    assert_one_line(info.value)


def test_stats_on_a_recorded_reply() -> None:
    reply = recorded_reply(
        "qom-get", {"path": "/machine/peripheral/balloon0", "property": "guest-stats"}
    )
    if reply is None:
        pytest.skip("no recorded QEMU 7.2 guest-stats reply in fixtures/transcripts yet")
    value = reply["return"]
    stats = decode_guest_stats(value)
    assert isinstance(value, dict)
    raw = value["stats"]
    assert isinstance(raw, dict)
    assert set(stats.stats) == {
        k.removeprefix("stat-") for k, v in raw.items() if v not in (-1, (1 << 64) - 1)
    }
    assert not any(name.startswith("stat-") for name in stats.stats)


def test_stats_period_roundtrip(sock: str) -> None:
    async def body(backend: QmpBackend, peer: HostilePeer) -> tuple[int, int]:
        before = await backend.stats_period()
        await backend.set_stats_period(2)
        return before, await backend.stats_period()

    (before, after), peer = session(sock, body)
    assert (before, after) == (0, 2)
    assert peer.arguments("qom-set") == [
        {
            "path": "/machine/peripheral/balloon0",
            "property": "guest-stats-polling-interval",
            "value": 2,
        }
    ]


def test_balloon_found_with_x_query_virtio_and_cached(sock: str) -> None:
    vm = FakeQemu(dev_id="mem0")

    async def body(backend: QmpBackend, peer: HostilePeer) -> None:
        await backend.stats()
        await backend.stats_period()
        assert peer.count("x-query-virtio") == 1  # once per connection
        await peer.hang_up()
        await asyncio.sleep(0.05)
        await backend.stats()
        assert peer.count("x-query-virtio") == 2  # a new connection looks again

    _, peer = session(sock, body, vm=vm)
    paths = {args["path"] for args in peer.arguments("qom-get")}
    assert paths == {"/machine/peripheral/mem0"}


def test_balloon_path_falls_back_without_x_query_virtio(sock: str) -> None:
    async def body(backend: QmpBackend, peer: HostilePeer) -> None:
        peer.script(
            "x-query-virtio",
            Fail("CommandNotFound", "The command x-query-virtio has not been found"),
        )
        await backend.stats()

    _, peer = session(sock, body)
    assert peer.arguments("qom-get")[0]["path"] == "/machine/peripheral/balloon0"


def test_locate_balloon() -> None:
    reply = [
        {"name": "virtio-net", "path": "/machine/peripheral-anon/device[1]/virtio-backend"},
        {"name": "virtio-balloon", "path": "/machine/peripheral/balloon0/virtio-backend"},
    ]
    location = locate_balloon(reply)
    assert location == BalloonLocation(
        device="/machine/peripheral/balloon0",
        backend="/machine/peripheral/balloon0/virtio-backend",
    )
    assert location is not None and location.device_id == "balloon0"
    # virtio-mmio: the VirtIODevice is the device.
    mmio = locate_balloon([{"name": "virtio-balloon", "path": "/machine/peripheral/b"}])
    assert mmio == BalloonLocation(device="/machine/peripheral/b", backend="/machine/peripheral/b")
    anon = BalloonLocation.from_backend("/machine/peripheral-anon/device[3]/virtio-backend")
    assert anon.device_id is None
    assert locate_balloon(reply[:1]) is None
    with pytest.raises(PeerError):
        locate_balloon({"name": "virtio-balloon"})
    with pytest.raises(PeerError):
        locate_balloon([{"name": "virtio-balloon", "path": 3}])


# ============================================================================================
# Features
# ============================================================================================

V12_OFFERED = (
    "stats-vq",
    "deflate-on-oom",
    "page-poison",
    "page-reporting",
    "notify-on-empty",
    "any-layout",
    "ring-indirect-desc",
    "ring-event-idx",
    "version-1",
)


#: introspect.json: a 6.1 guest on -device virtio-balloon-pci,deflate-on-oom=on,
#: free-page-reporting=on. Bit 40 (RING_RESET) comes as unknown-dev-features from 7.2, which
#: cannot name it; bit 30 (VIRTIO_F_BAD_FEATURE) has no name in any profile.
QEMU_7_2_FEATURES: Final = FeatureState(
    profile="virtio-1.2",
    offered=(*V12_OFFERED, "ring-reset"),
    acked=(
        "stats-vq",
        "deflate-on-oom",
        "page-reporting",
        "ring-event-idx",
        "version-1",
        "ring-reset",
    ),
    driver_ok=True,
    unknown_offered=1 << 30,
    device_path="/machine/peripheral/balloon0/virtio-backend",
    queues=4,  # num-vqs: inflate, deflate, stats, reporting
)


def test_features_qemu_7_2(sock: str) -> None:
    state, _ = session(sock, lambda b, p: b.features())
    assert state == QEMU_7_2_FEATURES


def test_the_stand_in_matches_the_recording(sock: str) -> None:
    """The peer's own x-query-virtio-status (used once properties change) is QEMU's shape."""
    recorded = recorded_return(
        "x-query-virtio-status",
        {"path": "/machine/peripheral/balloon0/virtio-backend"},
        source="introspect",
    )
    if not isinstance(recorded, dict):
        pytest.skip("no recorded x-query-virtio-status")
    vm = FakeQemu()
    vm.replay = False
    (reply,) = vm.handle(
        "x-query-virtio-status", {"path": vm.balloon.backend if vm.balloon else ""}
    )
    assert isinstance(reply, Return) and isinstance(reply.value, dict)
    assert reply.value == recorded
    state, _ = session(sock, lambda b, p: b.features(), vm=vm)
    assert state == QEMU_7_2_FEATURES


def test_features_seed_sg_device(sock: str) -> None:
    state, _ = session(sock, lambda b, p: b.features(), vm=FakeQemu(profile="seed-sg"))
    assert state.profile == "seed-sg"
    assert "sg" in state.offered and "sg" in state.acked
    assert "free-page-hint" not in state.offered


def _status(
    host_dev: list[str],
    *,
    guest_dev: list[str] | None = None,
    transports: list[str] | None = None,
    unknown: int | None = None,
    statuses: tuple[str, ...] = STATUS_STRINGS,
) -> dict[str, object]:
    host: dict[str, object] = {"transports": transports or [], "dev-features": host_dev}
    if unknown is not None:
        host["unknown-dev-features"] = unknown
    return {
        "host-features": host,
        "guest-features": {"transports": [], "dev-features": guest_dev or []},
        "status": {"statuses": list(statuses)},
    }


def test_bit_3_is_free_page_hint_unless_the_device_says_sg() -> None:
    v12 = decode_virtio_status(
        _status(["VIRTIO_BALLOON_F_FREE_PAGE_HINT: VQ reporting free pages enabled"])
    )
    assert v12.profile == "virtio-1.2"
    assert v12.offered == ("free-page-hint",)
    seed = decode_virtio_status(_status(["VIRTIO_BALLOON_F_SG: Use sg instead of PFN lists"]))
    assert seed.profile == "seed-sg"
    assert seed.offered == ("sg",)


def test_features_later_qemu_descriptions_only() -> None:
    state = decode_virtio_status(
        _status(
            ["Guest memory stats VQ available", "Page reporting VQ enabled"],
            transports=["Device compliant for v1 spec (legacy)"],
            statuses=("Driver setup and ready",),
        )
    )
    assert state.offered == ("stats-vq", "page-reporting", "version-1")
    assert state.driver_ok


def test_unknown_bits_are_kept() -> None:
    state = decode_virtio_status(_status([], unknown=(1 << 50) | (1 << 4)))
    # Bit 4 is page-poison in virtio 1.2; bit 50 has no name anywhere.
    assert state.offered == ("page-poison",)
    assert state.unknown_offered == 1 << 50
    seed = decode_virtio_status(
        _status(["VIRTIO_BALLOON_F_SG: Use sg instead of PFN lists"], unknown=1 << 4)
    )
    # The seed profile has no bit 4: kept as a number, not named page-poison.
    assert seed.offered == ("sg",)
    assert seed.unknown_offered == 1 << 4


def test_driver_not_ok_yet() -> None:
    state = decode_virtio_status(_status([], statuses=STATUS_STRINGS[:3]))
    assert not state.driver_ok
    assert decode_virtio_status(_status([], statuses=STATUS_STRINGS)).driver_ok


@pytest.mark.parametrize(
    "reply",
    [
        [],
        {"guest-features": {"transports": []}, "status": {"statuses": []}},
        {"host-features": {"transports": "x"}, "guest-features": {}, "status": {"statuses": []}},
        {"host-features": {}, "guest-features": {}, "status": {"statuses": [1]}},
        {"host-features": {"unknown-dev-features": -1}, "guest-features": {}},
    ],
)
def test_virtio_status_of_the_wrong_shape(reply: object) -> None:
    with pytest.raises(PeerError):
        decode_virtio_status(reply)


def test_features_on_a_recorded_reply() -> None:
    path = "/machine/peripheral/balloon0/virtio-backend"
    reply = recorded_return("x-query-virtio-status", {"path": path}, source="introspect")
    if reply is None:
        pytest.skip("no recorded QEMU 7.2 x-query-virtio-status reply in fixtures/transcripts yet")
    assert decode_virtio_status(reply, path) == QEMU_7_2_FEATURES


def test_recorded_hotplug_answers_decide_as_qemu_did() -> None:
    """The two recorded VMs: pcie.0 (device_del refused) and a root port (device_del worked)."""
    balloon = "/machine/peripheral/balloon0"
    for source, hotpluggable, bus, handler_empty in (
        ("nohotplug", False, "/machine/q35/pcie.0", True),
        ("hotplug", True, "/machine/peripheral/rp1/rp1", False),
    ):
        got = recorded_return(
            "qom-get", {"path": balloon, "property": "hotpluggable"}, source=source
        )
        if got is None:
            pytest.skip("no recorded hotplug transcripts")
        assert got is hotpluggable
        assert (
            recorded_return("qom-get", {"path": balloon, "property": "parent_bus"}, source=source)
            == bus
        )
        handler = recorded_return(
            "qom-get", {"path": bus, "property": "hotplug-handler"}, source=source
        )
        assert (handler == "") is handler_empty
    refused = recorded_reply("device_del", {"id": "balloon0"}, source="nohotplug")
    assert refused is not None
    assert refused["error"] == {
        "class": "GenericError",
        "desc": "Bus 'pcie.0' does not support hotplugging",
    }


# ============================================================================================
# Renegotiation
# ============================================================================================


def test_feature_property_changes() -> None:
    assert feature_property_changes(
        ["free-page-hint", "sg"], ["page-reporting", "ring-event-idx"]
    ) == {
        "free-page-hint": True,
        "sg": True,
        "free-page-reporting": False,
        "event_idx": False,
    }
    with pytest.raises(UsageError) as info:
        feature_property_changes(["stats-vq"], [])
    assert "'stats-vq'" in str(info.value)
    assert "deflate-on-oom" in str(info.value) and "ring-event-idx" in str(info.value)
    with pytest.raises(UsageError):
        feature_property_changes(["sg"], ["sg"])


def _index(peer: HostilePeer, command: str) -> int:
    return next(i for i, (name, _) in enumerate(peer.received) if name == command)


def test_renegotiate_refuses_on_pcie_0_before_deleting(sock: str) -> None:
    async def body(backend: QmpBackend, peer: HostilePeer) -> None:
        with pytest.raises(CommandFailed) as info:
            await backend.renegotiate([], ["page-reporting"])
        message = str(info.value)
        assert message.startswith("the balloon sits on bus pcie.0, which cannot hotplug;")
        assert "pcie-root-port" in message
        assert_one_line(info.value)

    _, peer = session(sock, body, vm=FakeQemu(bus="pcie.0"))
    assert peer.count("device_del") == 0
    assert peer.count("device_add") == 0
    assert peer.vm.balloon is not None


class _NoHotpluggableProperty(FakeQemu):
    """A QEMU (or the sim) that answers hotplug-handler but not the device's hotpluggable."""

    def do_qom_get(self, args: Mapping[str, object]) -> Script:
        if args.get("property") == "hotpluggable":
            return [Fail("GenericError", "Property 'virtio-balloon-pci.hotpluggable' not found")]
        return super().do_qom_get(args)


class _NoHotplugAnswers(_NoHotpluggableProperty):
    def do_qom_get(self, args: Mapping[str, object]) -> Script:
        if args.get("property") == "hotplug-handler":
            return [Fail("GenericError", "Property 'PCIE.hotplug-handler' not found")]
        return super().do_qom_get(args)


def test_renegotiate_refuses_on_an_empty_hotplug_handler(sock: str) -> None:
    async def body(backend: QmpBackend, peer: HostilePeer) -> None:
        with pytest.raises(CommandFailed) as info:
            await backend.renegotiate(["free-page-hint"], [])
        assert "pcie.0" in str(info.value)

    _, peer = session(sock, body, vm=_NoHotpluggableProperty(bus="pcie.0"))
    assert peer.count("device_del") == 0


def test_renegotiate_refuses_when_hotplug_cannot_be_told(sock: str) -> None:
    async def body(backend: QmpBackend, peer: HostilePeer) -> None:
        with pytest.raises(CommandFailed) as info:
            await backend.renegotiate(["free-page-hint"], [])
        assert "cannot tell whether bus rp1" in str(info.value)

    _, peer = session(sock, body, vm=_NoHotplugAnswers(bus="rp1"))
    assert peer.count("device_del") == 0


def test_renegotiate_replugs_with_the_same_id_bus_and_properties(sock: str) -> None:
    vm = FakeQemu(bus="rp1")
    assert vm.balloon is not None
    vm.balloon.stats_interval = 2
    probing = 3

    async def body(backend: QmpBackend, peer: HostilePeer) -> FeatureState:
        original_add = vm.do_device_add

        def add_then_probe(args: Mapping[str, object]) -> Script:
            script = original_add(args)
            if vm.balloon is not None:
                vm.balloon.probing_polls = probing
            return script

        vm.do_device_add = add_then_probe  # type: ignore[method-assign]
        return await backend.renegotiate(["free-page-hint"], ["page-reporting"])

    state, peer = session(sock, body, vm=vm)
    assert peer.arguments("device_del") == [{"id": "balloon0"}]
    assert peer.arguments("device_add") == [
        {
            "driver": "virtio-balloon-pci",
            "id": "balloon0",
            "bus": "rp1",
            "addr": 0,
            # Every feature property is passed explicitly, changed or not.
            "deflate-on-oom": True,
            "free-page-reporting": False,
            "free-page-hint": True,
            "page-poison": True,
            "indirect_desc": True,
            "event_idx": True,
        }
    ]
    # Everything read before anything was deleted; the driver waited for; polling restored.
    del_at, add_at = _index(peer, "device_del"), _index(peer, "device_add")
    assert del_at < add_at
    assert all(
        i < del_at
        for i, (name, args) in enumerate(peer.received)
        if name == "qom-get"
        and args["property"] in ("hotpluggable", "hotplug-handler", "parent_bus")
    )
    polls_after_add = sum(
        1 for name, _ in peer.received[add_at:] if name == "x-query-virtio-status"
    )
    assert polls_after_add >= probing + 1
    assert peer.arguments("qom-set") == [
        {
            "path": "/machine/peripheral/balloon0",
            "property": "guest-stats-polling-interval",
            "value": 2,
        }
    ]
    assert state.driver_ok
    assert "free-page-hint" in state.offered and "page-reporting" not in state.offered
    assert vm.balloon is not None and vm.balloon.bus == "rp1" and vm.balloon.dev_id == "balloon0"


def test_renegotiate_seed_sg(sock: str) -> None:
    async def body(backend: QmpBackend, peer: HostilePeer) -> FeatureState:
        return await backend.renegotiate([], ["sg"])

    state, peer = session(sock, body, vm=FakeQemu(profile="seed-sg"))
    (added,) = peer.arguments("device_add")
    assert added["sg"] is False
    # Without SG offered nothing names the seed profile any more; either way bit 3 is clear.
    assert "sg" not in state.offered and "free-page-hint" not in state.offered
    assert "deflate-on-oom" in state.offered


def test_renegotiate_sg_on_a_virtio_1_2_device_is_refused_before_deleting(sock: str) -> None:
    async def body(backend: QmpBackend, peer: HostilePeer) -> None:
        with pytest.raises(UsageError) as info:
            await backend.renegotiate(["sg"], [])
        assert "no property 'sg'" in str(info.value)

    _, peer = session(sock, body)
    assert peer.count("device_del") == 0


def test_renegotiate_unknown_feature_sends_nothing(sock: str) -> None:
    async def body(backend: QmpBackend, peer: HostilePeer) -> None:
        with pytest.raises(UsageError) as info:
            await backend.renegotiate(["stats-vq"], [])
        assert "'stats-vq'" in str(info.value)

    _, peer = session(sock, body)
    assert peer.count("device_del") == 0
    assert peer.count("qom-get") == 0


def test_renegotiate_nothing_to_change_does_not_replug(sock: str) -> None:
    state, peer = session(sock, lambda b, p: b.renegotiate(["deflate-on-oom"], []))
    assert peer.count("device_del") == 0
    assert "deflate-on-oom" in state.offered


def test_renegotiate_anonymous_balloon(sock: str) -> None:
    vm = FakeQemu(dev_id=None)
    _, peer = session(sock, lambda b, p: b.renegotiate([], ["deflate-on-oom"]), vm=vm)
    assert peer.arguments("device_del") == [{"id": "/machine/peripheral-anon/device[3]"}]
    (added,) = peer.arguments("device_add")
    assert "id" not in added
    assert added["deflate-on-oom"] is False


def test_renegotiate_device_never_released(sock: str) -> None:
    vm = FakeQemu()
    vm.releases = False

    async def body(backend: QmpBackend, peer: HostilePeer) -> None:
        with pytest.raises(OperationTimeout) as info:
            await backend.renegotiate([], ["page-reporting"])
        assert "may be gone" in str(info.value)
        assert_one_line(info.value)

    _, peer = session(sock, body, vm=vm, command_timeout=0.5)
    assert peer.count("device_del") == 1
    assert peer.count("device_add") == 0


def test_renegotiate_driver_never_ready(sock: str) -> None:
    vm = FakeQemu()
    original_add = vm.do_device_add

    def add_never_ready(args: Mapping[str, object]) -> Script:
        script = original_add(args)
        if vm.balloon is not None:
            vm.balloon.probing_polls = 1_000_000
        return script

    vm.do_device_add = add_never_ready  # type: ignore[method-assign]

    async def body(backend: QmpBackend, peer: HostilePeer) -> None:
        with pytest.raises(OperationTimeout) as info:
            await backend.renegotiate([], ["page-reporting"])
        assert "VIRTIO_CONFIG_S_DRIVER" in str(info.value)
        assert "DRIVER_OK" not in str(info.value)

    session(sock, body, vm=vm, command_timeout=0.5)


def test_renegotiate_refused_device_add_puts_the_old_balloon_back(sock: str) -> None:
    async def body(backend: QmpBackend, peer: HostilePeer) -> None:
        peer.script("device_add", Fail("GenericError", "iothread is required"))
        with pytest.raises(CommandFailed) as info:
            await backend.renegotiate(["free-page-hint"], [])
        assert "iothread is required" in str(info.value)
        assert "put back unchanged" in str(info.value)
        assert_one_line(info.value)

    _, peer = session(sock, body)
    first, second = peer.arguments("device_add")
    assert first["free-page-hint"] is True
    assert second["free-page-hint"] is False
    assert {k: v for k, v in first.items() if k != "free-page-hint"} == {
        k: v for k, v in second.items() if k != "free-page-hint"
    }
    assert peer.vm.balloon is not None
    assert peer.vm.balloon.properties["free-page-hint"] is False


def test_renegotiate_cannot_put_back(sock: str) -> None:
    async def body(backend: QmpBackend, peer: HostilePeer) -> None:
        peer.script(
            "device_add",
            Fail("GenericError", "iothread is required"),
            Fail("GenericError", "Bus 'rp1' not found"),
        )
        with pytest.raises(CommandFailed) as info:
            await backend.renegotiate(["free-page-hint"], [])
        assert "the VM has no balloon now" in str(info.value)
        assert '"driver": "virtio-balloon-pci"' in str(info.value)
        assert_one_line(info.value)

    session(sock, body)


def test_every_error_is_a_balloon_error(sock: str) -> None:
    """A sweep over hostile replies to every query: nothing escapes but BalloonError."""
    commands = [
        "query-balloon",
        "qom-get",
        "x-query-virtio",
        "x-query-virtio-status",
        "query-memory-size-summary",
    ]
    replies: list[Action] = [
        Raw("}{"),
        Raw('{"id": {id}}'),
        Return(None),
        Return("x"),
        Return([]),
        Return({}),
        Fail("GenericError", "no"),
        Drop(),
        Emit("BALLOON_CHANGE"),
    ]

    async def body(backend: QmpBackend, peer: HostilePeer) -> int:
        failures = 0
        for command in commands:
            for reply in replies:
                peer.script(command, *[reply] * QmpBackend.QUERY_ATTEMPTS)
                for call in (backend.actual, backend.max_memory, backend.stats, backend.features):
                    try:
                        await call()
                    except BalloonError as exc:
                        assert_one_line(exc)
                        failures += 1
                peer.clear_scripts()  # nothing left over for the next round
        return failures

    failures, _ = session(sock, body, command_timeout=0.3)
    assert failures > 0


def test_renegotiate_falls_back_to_a_minimal_balloon(sock: str) -> None:
    vm = FakeQemu()
    assert vm.balloon is not None
    vm.balloon.properties["multifunction"] = True  # differs from its default: carried

    async def body(backend: QmpBackend, peer: HostilePeer) -> None:
        peer.script(
            "device_add",
            Fail("GenericError", "iothread is required"),
            Fail("GenericError", "multifunction not allowed here"),
        )
        with pytest.raises(CommandFailed) as info:
            await backend.renegotiate(["free-page-hint"], [])
        assert "put back with its features only" in str(info.value)

    _, peer = session(sock, body, vm=vm)
    first, second, third = peer.arguments("device_add")
    assert first["multifunction"] is True and second["multifunction"] is True
    assert "multifunction" not in third
    assert third["deflate-on-oom"] is True and third["free-page-hint"] is False
    assert peer.vm.balloon is not None


def test_renegotiate_leaves_out_a_carried_property_qemu_will_not_set(sock: str) -> None:
    """QEMU 10 lists the read-only ``busnr`` in device-list-properties and refuses it back."""
    vm = FakeQemu()
    assert vm.balloon is not None
    vm.balloon.properties["busnr"] = 1
    original_list = vm.do_device_list_properties

    def list_with_busnr(args: Mapping[str, object]) -> Script:
        # As QEMU 10 lists it (hw/pci/pci.c: a getter only, no default-value): carried.
        script = original_list(args)
        (reply,) = script
        assert isinstance(reply, Return) and isinstance(reply.value, list)
        return [Return([*reply.value, {"name": "busnr", "type": "uint8"}])]

    vm.do_device_list_properties = list_with_busnr  # type: ignore[method-assign]

    async def body(backend: QmpBackend, peer: HostilePeer) -> FeatureState:
        peer.script(
            "device_add",
            Fail("GenericError", "Property 'virtio-balloon-pci.busnr' is not writable"),
        )
        return await backend.renegotiate([], ["page-reporting"])

    state, peer = session(sock, body, vm=vm)
    first, second = peer.arguments("device_add")
    assert first["busnr"] == 1 and first["free-page-reporting"] is False
    assert second == {k: v for k, v in first.items() if k != "busnr"}
    assert "page-reporting" not in state.offered


def test_renegotiate_a_refused_feature_property_is_not_dropped(sock: str) -> None:
    """Only carried properties are left out: a refused feature is the answer, not a retry."""

    async def body(backend: QmpBackend, peer: HostilePeer) -> None:
        peer.script(
            "device_add",
            Fail("GenericError", "Property 'virtio-balloon-pci.free-page-hint' is not writable"),
        )
        with pytest.raises(CommandFailed) as info:
            await backend.renegotiate(["free-page-hint"], [])
        assert "put back unchanged" in str(info.value)

    _, peer = session(sock, body)
    first, second = peer.arguments("device_add")
    assert first["free-page-hint"] is True and second["free-page-hint"] is False


def test_no_balloon_listed_by_x_query_virtio(sock: str) -> None:
    vm = FakeQemu()
    vm.balloon = None

    async def body(backend: QmpBackend, peer: HostilePeer) -> None:
        for call in (backend.stats, backend.features, backend.stats_period):
            with pytest.raises(CommandFailed) as info:
                await call()
            assert info.value.error_class == "DeviceNotActive"
            assert "has no balloon device" in str(info.value)

    _, peer = session(sock, body, vm=vm)
    assert peer.count("qom-get") == 0


def test_no_virtio_device_at_all_on_qemu_10(sock: str) -> None:
    """QEMU 10 refuses x-query-virtio when no virtio device exists (7.2 lists none)."""
    vm = FakeQemu()
    vm.balloon = None

    async def body(backend: QmpBackend, peer: HostilePeer) -> None:
        for call in (backend.stats, backend.features, backend.stats_period):
            peer.script("x-query-virtio", Fail("GenericError", "No virtio devices found"))
            with pytest.raises(CommandFailed) as info:
                await call()
            assert info.value.error_class == "DeviceNotActive"
            assert "has no balloon device" in str(info.value)
            assert_one_line(info.value)

    _, peer = session(sock, body, vm=vm)
    assert peer.count("qom-get") == 0
    assert peer.count("x-query-virtio-status") == 0


def test_concurrent_queries_on_one_dropped_connection(sock: str) -> None:
    async def body(backend: QmpBackend, peer: HostilePeer) -> list[int]:
        await backend.actual()
        peer.script("query-balloon", Drop())
        return list(await asyncio.gather(backend.actual(), backend.actual(), backend.actual()))

    results, peer = session(sock, body)
    assert results == [2 * GiB] * 3
    # One reconnect for all three: a late failure must not tear down the fresh connection.
    assert peer.connections == 2


def test_watch_notices_a_drop_even_after_a_reconnect(sock: str) -> None:
    async def body(backend: QmpBackend, peer: HostilePeer) -> None:
        async with backend.watch_actual() as values:
            await peer.hang_up()
            await asyncio.sleep(0.05)
            await backend.actual()  # reconnects; BALLOON_CHANGEs of the gap are lost
            with pytest.raises(ConnectionLost):
                async with asyncio.timeout(10):  # a hang guard, not a measurement
                    await anext(values)

    _, peer = session(sock, body)
    assert peer.connections == 2


def test_a_late_failure_does_not_tear_down_the_new_connection(sock: str) -> None:
    """The race behind the session counter, made deterministic: a command that failed on an
    old connection reports it after another command has already reconnected."""

    async def body(backend: QmpBackend, peer: HostilePeer) -> None:
        await backend.actual()
        client, old_session = backend._client, backend._session
        assert client is not None
        await peer.hang_up()
        await asyncio.sleep(0.05)
        await backend.actual()  # reconnects
        await backend._end_session(client, old_session)  # the late report
        await backend.actual()

    _, peer = session(sock, body)
    assert peer.connections == 2


def test_device_deleted_before_the_reply_is_not_missed(sock: str) -> None:
    """QEMU may put events before a reply on the wire (quit.json); the listener is in place
    before device_del is sent, so the order does not matter."""
    vm = FakeQemu()
    original_del = vm.do_device_del

    def events_first(args: Mapping[str, object]) -> Script:
        script = list(original_del(args))
        return [*script[1:], script[0]]

    vm.do_device_del = events_first  # type: ignore[method-assign]
    state, peer = session(sock, lambda b, p: b.renegotiate([], ["page-reporting"]), vm=vm)
    assert peer.count("device_add") == 1
    assert "page-reporting" not in state.offered


def test_renegotiate_driver_never_touches_the_new_device(sock: str) -> None:
    """Right after device_add, QEMU 7.2 shows no status bit at all (hotplug.json)."""
    vm = FakeQemu()
    original_add = vm.do_device_add

    def add_no_driver(args: Mapping[str, object]) -> Script:
        script = original_add(args)
        if vm.balloon is not None:
            vm.balloon.probing_polls = 1_000_000
        return script

    def status(args: Mapping[str, object]) -> Script:
        (reply,) = FakeQemu.do_x_query_virtio_status(vm, args)
        assert isinstance(reply, Return) and isinstance(reply.value, dict)
        if vm.balloon is not None and vm.balloon.probing_polls:
            return [Return({**reply.value, "status": {"statuses": []}})]
        return [reply]

    vm.do_device_add = add_no_driver  # type: ignore[method-assign]
    vm.do_x_query_virtio_status = status  # type: ignore[method-assign]

    async def body(backend: QmpBackend, peer: HostilePeer) -> None:
        with pytest.raises(OperationTimeout) as info:
            await backend.renegotiate([], ["page-reporting"])
        assert "device status: reset (no status bit set)" in str(info.value)

    session(sock, body, vm=vm, command_timeout=0.5)


class _NoDeviceListProperties(FakeQemu):
    """A QMP server without device-list-properties (the simulated VM is one)."""

    def do_device_list_properties(self, args: Mapping[str, object]) -> Script:
        return [Fail("CommandNotFound", "The command device-list-properties has not been found")]


def test_renegotiate_keeps_features_without_device_list_properties(sock: str) -> None:
    """Found against the simulated VM: a replug there lost deflate-on-oom."""
    vm = _NoDeviceListProperties(profile="seed-sg")
    state, peer = session(sock, lambda b, p: b.renegotiate([], ["sg"]), vm=vm)
    (added,) = peer.arguments("device_add")
    assert added == {
        "driver": "virtio-balloon-pci",
        "id": "balloon0",
        "bus": "rp1",
        "deflate-on-oom": True,
        "sg": False,
        "indirect_desc": True,
        "event_idx": True,
    }
    assert "deflate-on-oom" in state.offered


def test_seed_sg_device_with_sg_off_keeps_its_profile(sock: str) -> None:
    vm = FakeQemu(profile="seed-sg")
    assert vm.balloon is not None
    vm.balloon.properties["sg"] = False
    state, _ = session(sock, lambda b, p: b.features(), vm=vm)
    assert state.profile == "seed-sg"
    assert "sg" not in state.offered
    # And a QEMU balloon, which has no 'sg' property, stays virtio-1.2 in the same situation.
    plain = FakeQemu()
    assert plain.balloon is not None
    for prop in ("page-poison", "free-page-reporting"):
        plain.balloon.properties[prop] = False
    state, _ = session(sock, lambda b, p: b.features(), vm=plain)
    assert state.profile == "virtio-1.2"
