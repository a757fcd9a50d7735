"""How a VM's size follows BALLOON_CHANGE: read once a tick (``Link._follow``), the watch
reopened and the size re-read whenever the watch ended, and nothing left behind on close.

One Link and its real QmpBackend against the scripted QMP server of the backend tests, over
a real unix socket, tick by tick (``Link.collect``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from balloonctl.daemon.config import Config, DaemonConfig
from balloonctl.daemon.loop import Link, Member, open_backend
from balloonctl.daemon.policy import VmMemory
from tests.backends.hostile_peer import GiB, HostilePeer, MiB

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
                    open_backend, config, next(ticks), dry_run=True, connecting=connecting
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
