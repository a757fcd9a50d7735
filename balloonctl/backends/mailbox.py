"""One bounded, drop-oldest mailbox: where ``watch_actual``'s values wait until read.

Both backends receive ``BALLOON_CHANGE`` as it comes (a QMP socket's reader task, libvirt's
event callback) and hand it to one consumer that reads at its own pace: a CLI waiting for
the next value, or a daemon that looks once a tick with :meth:`Mailbox.latest`. A daemon
runs for weeks against VMs that may emit events faster than it reads, so the mailbox must
never grow: when it is full the *oldest* unread item goes, because only the newest
``actual`` matters (:class:`~balloonctl.backends.base.ActualWatch`; docs/architecture.md,
``backends/``). Written once here so that the QMP and the libvirt backend cannot drift in
what they keep, drop and count.

The mailbox is asyncio's, not thread-safe: a producer on another thread hands over with
``loop.call_soon_threadsafe(mailbox.put, item)``.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Generic, TypeVar

_T = TypeVar("_T")


class Mailbox(Generic[_T]):
    """At most ``maxlen`` unread items, oldest first; a full mailbox drops its oldest.

    ``dropped`` counts the items lost that way. :meth:`wake` rouses a waiter without an item
    (the connection it waits on has ended: the waiter then looks why).
    """

    __slots__ = ("_arrived", "_items", "dropped")

    def __init__(self, maxlen: int) -> None:
        if maxlen < 1:
            raise ValueError("maxlen must be at least 1")
        self._items: deque[_T] = deque(maxlen=maxlen)
        self._arrived = asyncio.Event()
        #: Items dropped because nobody read them in time.
        self.dropped = 0

    @property
    def maxlen(self) -> int:
        """How many unread items are kept."""
        assert self._items.maxlen is not None
        return self._items.maxlen

    def __len__(self) -> int:
        return len(self._items)

    def empty(self) -> bool:
        """Whether no item is waiting."""
        return not self._items

    def put(self, item: _T) -> None:
        """Keep ``item``, dropping (and counting) the oldest unread one when full."""
        if len(self._items) == self.maxlen:
            self.dropped += 1
        self._items.append(item)
        self._arrived.set()

    def wake(self) -> None:
        """Wake a waiter without an item."""
        self._arrived.set()

    def get_nowait(self) -> _T | None:
        """The oldest unread item, or None."""
        return self._items.popleft() if self._items else None

    def latest(self) -> _T | None:
        """The newest unread item, dropping the older unread ones; None if none came.

        Never waits: a consumer that looks once a tick needs no task woken for every event.
        The older items are not counted in ``dropped``: they were read, and passed over.
        """
        newest = None
        while self._items:
            newest = self._items.popleft()
        return newest

    async def get(self) -> _T:
        """Wait for the oldest unread item."""
        while not self._items:
            self._arrived.clear()
            await self._arrived.wait()
        return self._items.popleft()

    async def wait(self, timeout: float | None = None) -> bool:
        """Wait until an item is there or :meth:`wake` is called, at most ``timeout``
        seconds (None: no limit); whether an item is there."""
        if self._items:
            return True
        self._arrived.clear()
        try:
            async with asyncio.timeout(timeout):
                await self._arrived.wait()
        except TimeoutError:
            pass
        return bool(self._items)

    def clear(self) -> list[_T]:
        """Drop and return the unread items, oldest first."""
        items = list(self._items)
        self._items.clear()
        return items
