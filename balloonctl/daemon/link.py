"""One managed VM as the daemon sees it: how to reach it, its connection, and its life cycle.

A :class:`Link` is the per-VM half of the daemon (the loop in :mod:`balloonctl.daemon.loop`
is the other): connect, follow ``BALLOON_CHANGE``, read statistics, resync now and then,
set a target, and when the VM cannot be reached, hang up and retry with exponential backoff
(``RETRY_MIN_S`` doubling to ``RETRY_MAX_S``), logging once when it goes and once when it
comes back. Its life cycle is one :class:`LinkState` with the legal moves in
:data:`TRANSITIONS`, as ``qemu.qmp`` keeps its ``Runstate``: the loose flags it replaced
(``up``, a backend or none, a reason or none, a failure count) could say things no VM can be,
such as "up, and waiting to retry".
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
import math
import time
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Final, Protocol, runtime_checkable

from balloonctl.backends.base import ActualWatch, Backend, GuestStats
from balloonctl.backends.open import open_backend
from balloonctl.daemon.config import Config, member_name
from balloonctl.daemon.policy import Decision, VmMemory, VmState
from balloonctl.errors import BadStatistics, BalloonError
from balloonctl.units import format_size

log = logging.getLogger(__name__)

#: Ticks between re-reads of a VM's size (events keep it current in between; the re-read
#: catches a missed event), and of its maximum, features and stats period as well (a
#: hot-plugged DIMM, a renegotiated balloon, polling someone turned off). Each is a QMP
#: command per VM: at 1000 VMs every resync of everything each 30 ticks cost ~130 extra
#: commands a tick (measured), so the full one is rarer.
RESYNC_TICKS: Final = 30
FULL_RESYNC_TICKS: Final = 300
#: Reconnect backoff for a VM that cannot be reached.
RETRY_MIN_S: Final = 1.0
RETRY_MAX_S: Final = 60.0


class LinkState(Enum):
    """Where a :class:`Link` is in its life cycle.

    ::

        NEW ----------> UP <-----------+
         |  connected    |             | reconnected after the backoff
         |               | a command   |
         |  first        v  failed     |
         +-----------> DOWN -----------+
           connect       ^  |
           failed        +--+ a retry failed (the backoff doubles)

        NEW, UP, DOWN --> CLOSED  (unmanaged now, or the daemon stops; final)
    """

    #: Not connected yet: a VM the daemon has just started managing.
    NEW = "new"
    #: Connected: the tick reads its statistics and may set its target.
    UP = "up"
    #: Could not be reached, or a command failed: hung up, and not tried again before
    #: ``Link.next_attempt``.
    DOWN = "down"
    #: Hung up for good; the daemon builds a new Link if it manages the VM again.
    CLOSED = "closed"


#: The legal moves, from each state (the diagram on :class:`LinkState`). Any other move is
#: a bug and :meth:`Link._to` refuses it.
TRANSITIONS: Final[Mapping[LinkState, frozenset[LinkState]]] = {
    LinkState.NEW: frozenset({LinkState.UP, LinkState.DOWN, LinkState.CLOSED}),
    LinkState.UP: frozenset({LinkState.DOWN, LinkState.CLOSED}),
    LinkState.DOWN: frozenset({LinkState.UP, LinkState.DOWN, LinkState.CLOSED}),
    LinkState.CLOSED: frozenset(),
}


@dataclass(frozen=True, slots=True)
class Member:
    """A VM to manage and how to reach it."""

    name: str
    floor: int
    shares: int
    #: A QMP socket address, or a libvirt domain name when ``uri`` is set.
    address: str
    uri: str | None = None


def members(config: Config, domains: Mapping[str, Iterable[str]]) -> list[Member]:
    """The VMs ``config`` manages: its ``[[vm]]``s, then, for each libvirt entry in the
    file's order, the domains ``domains[uri]`` lists that pass its include/exclude globs.

    Names key the state files, the log and the metrics' ``vm`` label, so they must be unique:
    a libvirt domain is named by :func:`~balloonctl.daemon.config.member_name` (bare on the
    first URI, ``URI/domain`` on the others), and one whose name is a ``[[vm]]``'s is left
    to the ``[[vm]]``. Each member keeps its bare domain name as its address, and its URI.
    """
    out = [Member(vm.name, vm.min, vm.shares, vm.qmp) for vm in config.vms]
    names = {m.name for m in out}
    for lv in config.libvirts:
        for domain in sorted(domains.get(lv.uri, ())):
            name = member_name(config, lv.uri, domain)
            if name in names:
                continue
            if not any(fnmatch.fnmatchcase(domain, g) for g in lv.include):
                continue
            if any(fnmatch.fnmatchcase(domain, g) for g in lv.exclude):
                continue
            entry = lv.domain(domain)
            out.append(Member(name, entry.min, entry.shares, domain, lv.uri))
            names.add(name)
    return out


@runtime_checkable
class MigrationAware(Protocol):
    """A backend that can say whether its VM is migrating (QMP's ``query-migrate``,
    libvirt's job). Not part of :class:`~balloonctl.backends.base.Backend`: the daemon's
    fakes and a backend that cannot tell are taken as not migrating, as before."""

    async def migrating(self) -> bool:
        """Whether a migration of the VM is under way."""
        ...


#: How a Link gets its backend; tests and the bench pass their own.
BackendFactory = Callable[[Member, Config], Backend]


def backend_for(member: Member, config: Config) -> Backend:
    """``member``'s backend, through the one :func:`~balloonctl.backends.open.open_backend`.

    Where the member came from decides the kind, never its name's shape: a ``[[vm]]`` is a
    QMP socket even while its VM is down and the socket missing, and a name libvirt listed
    is a libvirt domain whatever it looks like. The ``[daemon]`` timeouts go to both kinds.
    """
    return open_backend(
        member.address,
        kind="qmp" if member.uri is None else "libvirt",
        libvirt_uri=member.uri,
        connect_timeout=config.daemon.connect_timeout,
        command_timeout=config.daemon.command_timeout,
    )


class Link:
    """One managed VM: its connection, what the daemon knows of it, and its policy memory."""

    def __init__(self, member: Member, memory: VmMemory) -> None:
        self.member = member
        self.memory = memory
        self.backend: Backend | None = None
        #: Where the link is in its life cycle; changed only by :meth:`_to`.
        self._state = LinkState.NEW
        #: Consecutive failed collections (the reconnect backoff doubles with each).
        self.connect_failures = 0
        #: When a DOWN link may try again (time.monotonic()).
        self.next_attempt = 0.0
        #: Why the VM was last logged as gone (None: it answers, or was never logged as
        #: gone). Not the life cycle: it is the "log once when it goes, once when it comes
        #: back" memory, and the loop also sets it for a collection that raised something
        #: other than a BalloonError while the connection itself stayed up.
        self.down_reason: str | None = None
        self.maximum = 0
        self.deflate_on_oom = False
        self.actual: int | None = None
        self.stats: GuestStats | None = None
        #: Whether the guest's stats are polled (None: not known yet).
        self.polling: bool | None = None
        #: Resyncs fall on ticks where (tick + offset) is a multiple of RESYNC_TICKS (or
        #: FULL_RESYNC_TICKS): those of many VMs spread over the ticks, not all on one.
        self.resync_offset = zlib.crc32(member.name.encode()) % FULL_RESYNC_TICKS
        self.resync_due = True
        #: BALLOON_CHANGE sizes, read once a tick (ActualWatch.latest): a task per VM woken
        #: by every event cost 27-48 us an event (measured), hundreds a tick at 1000 VMs.
        self.watch: ActualWatch | None = None
        self._watch_scope: contextlib.AsyncExitStack | None = None
        #: The watch ended (connection lost, a malformed event): reopened at the next tick.
        self._watch_ended = False
        #: The collection in progress (a VM that hangs keeps its own task, not the tick).
        self.busy: asyncio.Task[bool] | None = None
        self.last_reason_kind = ""
        #: Why the last reading of the statistics was refused (BadStatistics), None if not:
        #: the policy holds the VM for it (held "bad-stats"); the VM stays up.
        self.stats_error: str | None = None
        #: Whether the VM was migrating when last asked. Asked before every move and, while
        #: True, every tick (to see it end): a steady fleet pays no extra command a tick.
        self.migrating = False
        #: The (floor, RAM) last warned about as a floor above the VM's RAM: warned once,
        #: and again only if either changes.
        self._floor_warned: tuple[int, int] | None = None

    @property
    def name(self) -> str:
        """The VM's name in logs, state and decisions."""
        return self.member.name

    @property
    def lifecycle(self) -> LinkState:
        """Where the link is in its life cycle (:class:`LinkState`)."""
        return self._state

    @property
    def up(self) -> bool:
        """Connected and answering: the tick may read it and act on it."""
        return self._state is LinkState.UP

    def _to(self, new: LinkState) -> None:
        """Move to ``new``, refusing a move :data:`TRANSITIONS` does not list.

        An illegal move is a bug in this module, so it raises a RuntimeError, deliberately
        not a BalloonError: :meth:`collect` takes a BalloonError for "the VM is gone" and
        would hide the bug as a VM marked down.
        """
        if new not in TRANSITIONS[self._state]:
            raise RuntimeError(
                f"{self.name}: link cannot go from {self._state.value} to {new.value}"
            )
        self._state = new

    def state(self, now_wall: float) -> VmState:
        """What the policy needs, as of this tick."""
        assert self.actual is not None
        self._check_floor()
        stats = self.stats
        usable = stats is not None and stats.last_update > 0
        return VmState(
            name=self.name,
            actual=self.actual,
            maximum=self.maximum,
            floor=self.member.floor,
            shares=self.member.shares,
            stats=stats.stats if usable and stats is not None else None,
            stats_age=now_wall - stats.last_update if usable and stats is not None else math.inf,
            deflate_on_oom=self.deflate_on_oom,
            memory=self.memory,
            migrating=self.migrating,
            polling_off=self.polling is False,
            stats_error=self.stats_error,
        )

    def _check_floor(self) -> None:
        """A floor above the VM's RAM is a configuration mistake: the policy clamps it to
        the RAM (the VM is never shrunk at all), which nobody would notice. Warned once."""
        floor, maximum = self.member.floor, self.maximum
        if maximum <= 0 or floor <= maximum:
            self._floor_warned = None
            return
        if self._floor_warned != (floor, maximum):
            self._floor_warned = (floor, maximum)
            log.warning(
                "%s: configuration: floor %s is above the VM's RAM %s; "
                "the VM is never shrunk (the floor is taken as its RAM)",
                self.name,
                format_size(floor),
                format_size(maximum),
            )

    async def check_migrating(self) -> bool:
        """Ask the backend whether the VM migrates (False if it cannot tell); remembered in
        :attr:`migrating`. A failure is the VM's (BalloonError, as any command's)."""
        backend = self.backend
        if isinstance(backend, MigrationAware):
            was = self.migrating
            self.migrating = await backend.migrating()
            if self.migrating != was:
                log.info(
                    "%s: %s", self.name, "migrating: held" if self.migrating else "migration over"
                )
        return self.migrating

    async def collect(
        self,
        factory: BackendFactory,
        config: Config,
        tick: int,
        *,
        dry_run: bool,
        connecting: asyncio.Semaphore,
    ) -> bool:
        """Connect if need be, then read the statistics (and resync the size now and then).

        False when the VM cannot be reached now (it is retried later, with backoff).
        """
        state = self._state
        if state is LinkState.CLOSED:
            return False  # closed for good: the daemon made a new Link if it still wants the VM
        if state is LinkState.DOWN and time.monotonic() < self.next_attempt:
            return False
        try:
            if state is not LinkState.UP:
                async with connecting:
                    await self._connect(factory, config)
            backend = self.backend
            assert backend is not None
            await self._follow(backend)  # before the size is read: no change is missed
            phase = tick + self.resync_offset
            if self.resync_due or phase % FULL_RESYNC_TICKS == 0:
                await self._resync(backend)
                await self._ensure_polling(backend, config, dry_run=dry_run)
            elif phase % RESYNC_TICKS == 0:
                self.actual = await backend.actual()
            await self.read_stats(backend)
            if self.migrating:
                await self.check_migrating()
        except BalloonError as exc:
            await self.mark_down(str(exc))
            return False
        if self.down_reason is not None:
            log.info("%s: reachable again", self.name)
            self.down_reason = None
        self.connect_failures = 0
        return True

    async def read_stats(self, backend: Backend) -> None:
        """This tick's reading; one the backend refused as impossible (BadStatistics) is
        kept as :attr:`stats_error` for the policy to hold on, not a reason to hang up."""
        if not self.polling:
            self.stats, self.stats_error = None, None
            return
        try:
            self.stats = await backend.stats()
        except BadStatistics as exc:
            self.stats = None
            if self.stats_error is None:
                log.debug("%s: statistics refused: %s", self.name, exc)
            self.stats_error = str(exc)
        else:
            self.stats_error = None

    async def _connect(self, factory: BackendFactory, config: Config) -> None:
        backend = factory(self.member, config)
        self.backend = backend
        await backend.__aenter__()
        self._to(LinkState.UP)

    async def _ensure_polling(self, backend: Backend, config: Config, *, dry_run: bool) -> None:
        """Stats polling at the tick's pace: on connect, and on every resync, since a VM
        restarted behind the same socket (or someone with ``balloonctl stats``) may have
        turned it off."""
        period = max(1, math.ceil(config.daemon.interval))
        current = await backend.stats_period()
        # Faster than the tick is fine (someone else wants it); slower or off is not.
        if not dry_run and (current == 0 or current > period):
            await backend.set_stats_period(period)
            current = period
        if dry_run and current == 0 and self.polling is not False:
            log.info("%s: stats polling is off; --dry-run does not turn it on", self.name)
        self.polling = current > 0

    async def _resync(self, backend: Backend) -> None:
        self.maximum = await backend.max_memory()
        self.actual = await backend.actual()
        features = await backend.features()
        self.deflate_on_oom = "deflate-on-oom" in features.acked
        self.resync_due = False

    def refresh_actual(self) -> bool:
        """Take the size from the newest BALLOON_CHANGE, if one came since the last look.

        Each tick does it first; the bench's fake host and the demo between ticks. False if
        no watch is running (the next tick opens one and re-reads the size).
        """
        watch = self.watch
        if watch is None or self._watch_ended:
            return False
        try:
            actual = watch.latest()
        except BalloonError as exc:
            log.debug("%s: event watch ended: %s", self.name, exc)
            self._watch_ended = True
            return False
        if actual is not None:
            self.actual = actual
        return True

    async def _follow(self, backend: Backend) -> None:
        """The size from the newest BALLOON_CHANGE since the last tick; the watch (re)opened
        if it is not running. A watch that ended, or could not start, may have missed
        events: the size is re-read (resync) this tick."""
        if self.refresh_actual():
            return
        await self._close_watch()
        scope = contextlib.AsyncExitStack()
        try:
            self.watch = await scope.enter_async_context(backend.watch_actual())
        except BalloonError as exc:
            log.debug("%s: cannot watch BALLOON_CHANGE: %s", self.name, exc)
        else:
            self._watch_scope = scope
        self.resync_due = True

    async def _close_watch(self) -> None:
        scope, self._watch_scope = self._watch_scope, None
        self.watch = None
        self._watch_ended = False
        if scope is not None:
            with contextlib.suppress(BalloonError):
                await scope.aclose()

    async def mark_down(self, reason: str) -> None:
        """The VM cannot be used now: hang up, and try again after the backoff."""
        self._to(LinkState.DOWN)
        if self.down_reason is None:
            log.warning("%s: %s", self.name, reason)
        self.down_reason = reason
        self.connect_failures += 1
        delay = min(RETRY_MAX_S, RETRY_MIN_S * 2 ** (self.connect_failures - 1))
        self.next_attempt = time.monotonic() + delay
        await self._hang_up()

    async def close(self) -> None:
        """Hang up for good (the VM is unmanaged now, or the daemon stops).

        Closing a closed link does nothing, as closing a closed file does.
        """
        if self._state is not LinkState.CLOSED:
            self._to(LinkState.CLOSED)
        await self._hang_up()

    async def _hang_up(self) -> None:
        """Drop the watch and the connection and forget what they said (DOWN and CLOSED)."""
        await self._close_watch()
        backend, self.backend = self.backend, None
        if backend is not None:
            with contextlib.suppress(BalloonError):
                await backend.__aexit__(None, None, None)
        self.actual = None
        self.stats = None
        self.stats_error = None
        self.migrating = False
        self.resync_due = True

    async def act(self, decision: Decision) -> bool:
        """Set the decided target. False if it was refused or the VM is gone."""
        backend = self.backend
        if backend is None:
            return False
        try:
            await backend.set_target(decision.target)
        except BalloonError as exc:
            # One line: mark_down logs it (a VM that answered this tick is not down yet).
            await self.mark_down(f"setting {format_size(decision.target)} failed: {exc}")
            return False
        return True
