"""The watch mailbox both backends keep BALLOON_CHANGE values in (balloonctl/backends/mailbox.py).

What the QMP listener and the libvirt callback's queue each guaranteed before they shared it:
bounded, the oldest unread item dropped and counted, ``latest()`` the newest without waiting,
a waiter woken by an item or by ``wake()``.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from balloonctl.backends.mailbox import Mailbox


def test_bound_is_at_least_one() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Mailbox[int](0)


def test_full_mailbox_drops_the_oldest_and_counts_it() -> None:
    box: Mailbox[int] = Mailbox(8)
    for i in range(10_000):
        box.put(i)
    assert len(box) == 8 == box.maxlen
    assert box.dropped == 10_000 - 8
    got = []
    while (item := box.get_nowait()) is not None:
        got.append(item)
    assert got == list(range(10_000 - 8, 10_000))  # the newest, oldest first
    assert box.empty() and box.get_nowait() is None


def test_latest_is_the_newest_and_empties_the_mailbox() -> None:
    box: Mailbox[int] = Mailbox(4)
    assert box.latest() is None  # nothing came: None, at once
    for i in (1, 2, 3):
        box.put(i)
    assert box.latest() == 3
    assert box.latest() is None  # the older ones went with it
    assert box.dropped == 0  # passed over, not lost to the bound
    box.put(7)
    assert box.latest() == 7


def test_clear_returns_the_unread_oldest_first() -> None:
    box: Mailbox[str] = Mailbox(2)
    for item in "abc":
        box.put(item)
    assert box.clear() == ["b", "c"]
    assert box.empty() and len(box) == 0


def test_get_waits_for_an_item() -> None:
    async def main() -> int:
        box: Mailbox[int] = Mailbox(2)
        waiter = asyncio.ensure_future(box.get())
        await asyncio.sleep(0.01)
        assert not waiter.done()
        box.put(5)
        return await asyncio.wait_for(waiter, 5)

    assert asyncio.run(main()) == 5


def test_wait_returns_at_once_when_an_item_is_there() -> None:
    async def main() -> bool:
        box: Mailbox[int] = Mailbox(2)
        box.put(1)
        return await box.wait(0)

    assert asyncio.run(main()) is True


def test_wait_times_out_without_an_item() -> None:
    async def main() -> tuple[bool, float]:
        box: Mailbox[int] = Mailbox(2)
        start = time.monotonic()
        there = await box.wait(0.05)
        return there, time.monotonic() - start

    there, waited = asyncio.run(main())
    assert there is False and waited >= 0.04


def test_wake_rouses_a_waiter_without_an_item() -> None:
    async def main() -> bool:
        box: Mailbox[int] = Mailbox(2)
        waiter = asyncio.ensure_future(box.wait())
        await asyncio.sleep(0.01)
        assert not waiter.done()
        box.wake()  # the connection it waits on has ended
        return await asyncio.wait_for(waiter, 5)

    assert asyncio.run(main()) is False


def test_a_thread_hands_over_through_the_loop() -> None:
    # libvirt's callbacks: loop.call_soon_threadsafe(mailbox.put, value).
    async def main() -> list[int]:
        box: Mailbox[int] = Mailbox(3)
        loop = asyncio.get_running_loop()

        def produce() -> None:
            for i in range(10):
                loop.call_soon_threadsafe(box.put, i)

        thread = threading.Thread(target=produce)
        thread.start()
        thread.join()
        got = [await asyncio.wait_for(box.get(), 5)]
        while (item := box.get_nowait()) is not None:
            got.append(item)
        return got

    assert asyncio.run(main()) == [7, 8, 9]
