"""The QMP backend's per-command CPU paths: nothing is formatted for a log that is off, the
retry loop is built only after a drop, and both keep the behaviour they replaced.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
from qemu.qmp import Message, QMPClient
from tenacity import AsyncRetrying

from balloonctl.backends import qmp
from balloonctl.backends.qmp import QmpBackend
from balloonctl.errors import ConnectionLost
from tests.backends.hostile_peer import Drop, GiB, HostilePeer

T = TypeVar("T")


def run(
    sock: str, body: Callable[[QmpBackend, HostilePeer], Awaitable[T]]
) -> tuple[T, HostilePeer]:
    async def main() -> tuple[T, HostilePeer]:
        async with HostilePeer(sock) as peer:
            backend = QmpBackend(sock, connect_timeout=5.0, command_timeout=5.0)
            try:
                return await body(backend, peer), peer
            finally:
                await backend.close()

    return asyncio.run(main())


async def poll(backend: QmpBackend, peer: HostilePeer) -> int:
    await backend.set_stats_period(2)  # qom-set, with arguments
    await backend.stats()  # qom-get, with arguments
    return await backend.actual()  # query-balloon, without


@pytest.fixture
def quiet(caplog: pytest.LogCaptureFixture) -> None:
    """The CLI without -v: balloonctl at WARNING, qemu.qmp silenced by the backend."""
    caplog.set_level(logging.WARNING)
    caplog.set_level(logging.WARNING, logger="balloonctl")


@pytest.fixture
def verbose(caplog: pytest.LogCaptureFixture) -> None:
    """The CLI with -v, and a root logger taking the library's debug lines."""
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="balloonctl")


# ============================================================================================
# Library message hooks
# ============================================================================================


def test_messages_are_not_formatted_when_the_library_log_is_off(
    sock: str, quiet: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    pretty: list[object] = []
    original = Message.__str__

    def counting_str(self: Message) -> str:
        pretty.append(self)
        return original(self)

    monkeypatch.setattr(Message, "__str__", counting_str)
    actual, _ = run(sock, poll)
    assert actual == 2 * GiB
    assert pretty == []


def test_messages_are_logged_when_the_library_log_is_on(
    sock: str, verbose: None, caplog: pytest.LogCaptureFixture
) -> None:
    run(sock, poll)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("qemu.qmp")]
    sent = [line for line in lines if line.startswith("--> ")]
    received = [line for line in lines if line.startswith("<-- ")]
    assert any('"execute": "query-balloon"' in line for line in sent)
    assert any('"return"' in line for line in received)
    assert all("\n" in line for line in sent + received), "pretty-printed, as the library does"


@pytest.mark.parametrize("hook", ["_cb_outbound", "_cb_inbound"])
def test_hook_log_records_match_the_library(
    hook: str, verbose: None, caplog: pytest.LogCaptureFixture
) -> None:
    msg = Message({"execute": "qom-get", "arguments": {"path": "/m", "property": "p"}, "id": "x"})

    def record_of(client: QMPClient) -> tuple[object, ...]:
        caplog.clear()
        assert getattr(client, hook)(msg) is msg
        [record] = caplog.records
        return (record.name, record.levelno, record.msg, record.args, record.funcName)

    assert record_of(qmp._QmpClient()) == record_of(QMPClient())


def test_backend_clients_use_the_lazy_hooks() -> None:
    assert type(QmpBackend("/nonexistent.sock")._new_client()) is qmp._QmpClient


# ============================================================================================
# balloonctl's own command log
# ============================================================================================


def test_command_log_is_not_formatted_when_off(
    sock: str, quiet: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> str:
        raise AssertionError("formatted for a log that is off")

    class NoJson:
        dumps = staticmethod(refuse)

    monkeypatch.setattr(qmp, "json", NoJson)
    monkeypatch.setattr(qmp, "_one_line", refuse)
    actual, _ = run(sock, poll)
    assert actual == 2 * GiB


def test_command_log_lines_at_debug(
    sock: str, verbose: None, caplog: pytest.LogCaptureFixture
) -> None:
    run(sock, poll)
    lines = [r.getMessage() for r in caplog.records if r.name == "balloonctl.backends.qmp"]
    args = {"path": "/machine/peripheral/balloon0", "property": "guest-stats-polling-interval"}
    assert f"{sock} -> qom-set {json.dumps({**args, 'value': 2})}" in lines
    assert f"{sock} -> query-balloon " in lines
    assert f"{sock} <- query-balloon {{'actual': {2 * GiB}}}" in lines
    assert any(line.startswith(f"{sock} <- qom-get {{'stats': ") for line in lines)


# ============================================================================================
# Query retries
# ============================================================================================


def test_a_query_that_succeeds_builds_no_retry_loop(
    sock: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("retry loop built for a command that did not fail")

    async def body(backend: QmpBackend, peer: HostilePeer) -> int:
        await backend.stats_period()  # connected and located (connecting has its own loop)
        monkeypatch.setattr(qmp, "AsyncRetrying", refuse)
        return await poll(backend, peer)

    actual, peer = run(sock, body)
    assert actual == 2 * GiB
    assert peer.connections == 1


class Recorded:
    """Patches the backend's AsyncRetrying to record the waits it sleeps."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.slept: list[float] = []
        recorded = self

        async def sleep(seconds: float) -> None:
            recorded.slept.append(seconds)
            await asyncio.sleep(seconds)

        class Retrying(AsyncRetrying):
            def __init__(self, **kwargs: Any) -> None:
                super().__init__(sleep=sleep, **kwargs)

        monkeypatch.setattr(qmp, "AsyncRetrying", Retrying)


def _retry_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "balloonctl.backends.qmp" and r.getMessage().endswith("; retrying")
    ]


def test_every_query_attempt_fails(
    sock: str, verbose: None, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorded = Recorded(monkeypatch)
    lost = f"connection to VM {sock} lost during query-balloon"

    async def body(backend: QmpBackend, peer: HostilePeer) -> None:
        peer.script("query-balloon", *[Drop()] * 10)
        with pytest.raises(ConnectionLost) as info:
            await backend.actual()
        assert str(info.value) == lost
        assert info.value.__cause__ is not None

    _, peer = run(sock, body)
    assert peer.count("query-balloon") == QmpBackend.QUERY_ATTEMPTS == 3
    assert recorded.slept == [0.05, 0.1]  # wait_exponential(multiplier=0.05, max=0.5)
    assert _retry_lines(caplog) == [
        f"{sock}: query-balloon attempt 1: {lost}; retrying",
        f"{sock}: query-balloon attempt 2: {lost}; retrying",
    ]


def test_a_query_dropped_once_is_resent(
    sock: str, verbose: None, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorded = Recorded(monkeypatch)

    async def body(backend: QmpBackend, peer: HostilePeer) -> int:
        peer.script("query-balloon", Drop())
        return await backend.actual()

    actual, peer = run(sock, body)
    assert actual == 2 * GiB
    assert peer.count("query-balloon") == 2
    assert peer.connections == 2
    assert recorded.slept == [0.05]
    lost = f"connection to VM {sock} lost during query-balloon"
    assert _retry_lines(caplog) == [f"{sock}: query-balloon attempt 1: {lost}; retrying"]


def test_one_attempt_means_no_resend(sock: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(QmpBackend, "QUERY_ATTEMPTS", 1)
    recorded = Recorded(monkeypatch)

    async def body(backend: QmpBackend, peer: HostilePeer) -> None:
        peer.script("query-balloon", Drop())
        with pytest.raises(ConnectionLost):
            await backend.actual()

    _, peer = run(sock, body)
    assert peer.count("query-balloon") == 1
    assert recorded.slept == []
