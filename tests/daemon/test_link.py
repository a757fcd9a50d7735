"""balloonctl.daemon.link: how a VM's size follows BALLOON_CHANGE (read once a tick,
``Link._follow``; the watch reopened and the size re-read whenever the watch ended, and
nothing left behind on close), and the Link's life cycle (:class:`LinkState`).

One Link and its real QmpBackend against the scripted QMP server of the backend tests, over
a real unix socket, tick by tick (``Link.collect``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Final

import pytest

from balloonctl.daemon.config import Config, DaemonConfig
from balloonctl.daemon.link import (
    RETRY_MIN_S,
    TRANSITIONS,
    Link,
    LinkState,
    Member,
    backend_for,
)
from balloonctl.daemon.policy import VmMemory
from balloonctl.errors import BalloonError
from tests.backends.hostile_peer import Fail, GiB, HostilePeer, MiB

Step = Callable[[], Awaitable[bool]]


def scenario(sock: str, body: Callable[[Link, HostilePeer, Step], Awaitable[None]]) -> None:
    config = Config(None, daemon=DaemonConfig(interval=1.0, connect_timeout=2, command_timeout=2))

    async def main() -> None:
        async with HostilePeer(sock) as peer:
            link = Link(Member("vm", 0, 1, sock), VmMemory())
            connecting = asyncio.Semaphore(4)
            ticks = iter(range(1, 1000))

            async def tick() -> bool:
                # Ticks 1, 2, ...: for the name "vm" (resync offset 262) no periodic resync
                # falls on the first 5, so every query-balloon counted below is one the watch
                # handling made, not a scheduled one.
                return await link.collect(
                    backend_for, config, next(ticks), dry_run=True, connecting=connecting
                )

            try:
                await body(link, peer, tick)
            finally:
                await link.close()

    asyncio.run(main())


async def changed(peer: HostilePeer, size: int) -> None:
    """The guest's size changes and QEMU says so (BALLOON_CHANGE), between two ticks."""
    peer.vm.actual = size
    await peer.emit("BALLOON_CHANGE", {"actual": size})
    await asyncio.sleep(0.05)


def test_an_event_between_ticks_sets_the_size_at_the_next_tick(sock: str) -> None:
    async def body(link: Link, peer: HostilePeer, tick: Step) -> None:
        assert await tick()
        assert link.actual == 2 * GiB
        await changed(peer, 1536 * MiB)
        assert await tick()
        assert link.actual == 1536 * MiB
        assert peer.count("query-balloon") == 1, "from the event, not a query"

    scenario(sock, body)


def test_after_a_hang_up_the_watch_is_reopened_and_the_size_re_read(sock: str) -> None:
    async def body(link: Link, peer: HostilePeer, tick: Step) -> None:
        assert await tick()
        await peer.hang_up()
        await asyncio.sleep(0.05)
        peer.vm.actual = 1024 * MiB  # changed while nobody was connected: no event to see
        assert await tick()
        assert link.actual == 1024 * MiB
        # The new watch is on the new connection: the next change comes by event again.
        queries = peer.count("query-balloon")
        await changed(peer, 900 * MiB)
        assert await tick()
        assert link.actual == 900 * MiB
        assert peer.count("query-balloon") == queries

    scenario(sock, body)


def test_a_malformed_event_ends_the_watch_and_the_size_is_re_read(sock: str) -> None:
    async def body(link: Link, peer: HostilePeer, tick: Step) -> None:
        assert await tick()
        await peer.emit("BALLOON_CHANGE", {"actual": 5})
        await peer.emit("BALLOON_CHANGE", {"actual": "a lot"})
        await asyncio.sleep(0.05)
        queries = peer.count("query-balloon")
        assert await tick()
        assert link.actual == 2 * GiB, "neither the malformed value nor the one before it"
        assert peer.count("query-balloon") == queries + 1
        await changed(peer, 1536 * MiB)
        assert await tick()
        assert link.actual == 1536 * MiB

    scenario(sock, body)


def test_closing_a_link_removes_its_watch(sock: str) -> None:
    async def body(link: Link, peer: HostilePeer, tick: Step) -> None:
        assert await tick()
        backend = link.backend
        assert link.watch is not None and backend is not None
        client = getattr(backend, "_client")  # noqa: B009 (a QmpBackend's qemu.qmp client)
        listeners = getattr(client, "_listeners")  # noqa: B009
        assert len(listeners) == 2  # the client's own catch-all and the watch's
        await link.close()
        assert link.watch is None
        assert len(listeners) == 1

    scenario(sock, body)


# --------------------------------------------------------------------------------------------
# The life cycle (LinkState): every legal move through the code that makes it, and the
# illegal ones refused
# --------------------------------------------------------------------------------------------

#: The moves the LinkState diagram documents; the table in link.py must be exactly these.
LEGAL: Final = {
    (LinkState.NEW, LinkState.UP),
    (LinkState.NEW, LinkState.DOWN),
    (LinkState.NEW, LinkState.CLOSED),
    (LinkState.UP, LinkState.DOWN),
    (LinkState.UP, LinkState.CLOSED),
    (LinkState.DOWN, LinkState.UP),
    (LinkState.DOWN, LinkState.DOWN),
    (LinkState.DOWN, LinkState.CLOSED),
}


def _lifecycle(sock: str, body: Callable[[Link, Step], Awaitable[None]]) -> None:
    """A Link to ``sock`` with nothing listening there yet; ``body`` starts peers itself."""
    config = Config(None, daemon=DaemonConfig(interval=1.0, connect_timeout=1, command_timeout=2))

    async def main() -> None:
        link = Link(Member("vm", 0, 1, sock), VmMemory())
        connecting = asyncio.Semaphore(4)
        ticks = iter(range(1, 1000))

        async def tick() -> bool:
            return await link.collect(
                backend_for, config, next(ticks), dry_run=True, connecting=connecting
            )

        try:
            await body(link, tick)
        finally:
            await link.close()

    asyncio.run(main())


def _state(link: Link) -> LinkState:
    """``link.lifecycle``, read afresh (mypy would keep an earlier ``is`` narrowing across
    the awaits that change it)."""
    return link.lifecycle


def test_the_transition_table_is_the_documented_one() -> None:
    table = {(old, new) for old, targets in TRANSITIONS.items() for new in targets}
    assert table == LEGAL
    assert set(TRANSITIONS) == set(LinkState)


def test_new_to_up_on_the_first_connection(sock: str) -> None:
    async def body(link: Link, tick: Step) -> None:
        assert _state(link) is LinkState.NEW and not link.up
        async with HostilePeer(sock):
            assert await tick()
            assert _state(link) is LinkState.UP and link.up
            assert link.backend is not None and link.connect_failures == 0

    _lifecycle(sock, body)


def test_new_to_down_then_down_again_with_the_backoff_doubling(sock: str) -> None:
    async def body(link: Link, tick: Step) -> None:
        before = time.monotonic()
        assert not await tick()  # nothing listens: the first connection fails
        assert _state(link) is LinkState.DOWN and not link.up
        assert link.connect_failures == 1 and link.down_reason is not None
        assert link.backend is None
        assert before + RETRY_MIN_S <= link.next_attempt <= time.monotonic() + RETRY_MIN_S
        assert not await tick()  # before next_attempt: not even tried
        assert link.connect_failures == 1
        link.next_attempt = 0.0  # the backoff has passed
        before = time.monotonic()
        assert not await tick()  # DOWN -> DOWN: the retry failed too
        assert _state(link) is LinkState.DOWN and link.connect_failures == 2
        assert link.next_attempt >= before + 2 * RETRY_MIN_S

    _lifecycle(sock, body)


def test_down_to_up_when_the_vm_is_back(sock: str) -> None:
    async def body(link: Link, tick: Step) -> None:
        assert not await tick()
        assert _state(link) is LinkState.DOWN
        async with HostilePeer(sock):
            link.next_attempt = 0.0
            assert await tick()
            assert _state(link) is LinkState.UP
            assert link.connect_failures == 0 and link.down_reason is None

    _lifecycle(sock, body)


def test_up_to_down_when_a_command_fails(sock: str) -> None:
    async def body(link: Link, tick: Step) -> None:
        async with HostilePeer(sock) as peer:
            assert await tick()
            assert _state(link) is LinkState.UP
            peer.script("query-memory-size-summary", Fail("GenericError", "not today"))
            link.resync_due = True  # the resync asks for the maximum, which now fails
            assert not await tick()
            assert _state(link) is LinkState.DOWN and not link.up
            assert link.backend is None and link.actual is None
            assert link.down_reason is not None and "not today" in link.down_reason

    _lifecycle(sock, body)


@pytest.mark.parametrize("start", [LinkState.NEW, LinkState.UP, LinkState.DOWN])
def test_close_from_every_live_state_is_final(sock: str, start: LinkState) -> None:
    async def body(link: Link, tick: Step) -> None:
        async with HostilePeer(sock) as peer:
            if start is LinkState.UP:
                assert await tick()
            elif start is LinkState.DOWN:
                peer.script("query-memory-size-summary", Fail("GenericError", "no"))
                link.resync_due = True
                assert not await tick()
            assert _state(link) is start
            await link.close()
            assert _state(link) is LinkState.CLOSED and link.backend is None
            await link.close()  # closing a closed link does nothing
            assert _state(link) is LinkState.CLOSED
            connections = peer.connections
            link.next_attempt = 0.0
            assert not await tick(), "a closed link never connects again"
            assert peer.connections == connections
            assert _state(link) is LinkState.CLOSED

    _lifecycle(sock, body)


@pytest.mark.parametrize(
    ("old", "new"),
    [(a, b) for a in LinkState for b in LinkState if (a, b) not in LEGAL],
)
def test_an_illegal_move_is_refused(old: LinkState, new: LinkState) -> None:
    link = Link(Member("vm", 0, 1, "/nowhere.sock"), VmMemory())
    link._state = old  # put there directly: the code paths never reach some of these
    with pytest.raises(RuntimeError, match=f"from {old.value} to {new.value}") as info:
        link._to(new)
    assert not isinstance(info.value, BalloonError), "collect() would hide it as a VM down"
    assert _state(link) is old, "a refused move changes nothing"
