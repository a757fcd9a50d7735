"""The auto-balloon daemon's loop: one :class:`Daemon`, ticking.

Every tick it **collects** (the host's /proc/meminfo and PSI through
:mod:`balloonctl.daemon.host`; each VM's statistics, and its size from ``BALLOON_CHANGE``
events with a query now and then to resync, through its :class:`~balloonctl.daemon.link.Link`),
**decides** (:func:`balloonctl.daemon.policy.decide`, pure) and **acts** (one ``set_target``
per VM whose target moves). Like tuned's controller, the loop waits on an event, so SIGTERM
is prompt and SIGHUP reloads; the object graph is put together by
:mod:`balloonctl.daemon.app`, and systemd daemonizes it (Type=notify), no fork, no PID file.
Unlike oVirt MoM there is no thread per guest: one asyncio loop serves all of them, and a
VM that hangs costs its own slot only, never the tick (each VM's collection runs as its own
task, and the tick goes on without the ones not back by its deadline).

VMs come from ``[[vm]]`` (QMP sockets) and from ``[libvirt]`` or each ``[[libvirt]]`` entry
(every running domain with a balloon on that URI, filtered by include/exclude globs).
libvirt's lifecycle events (a domain started, stopped, crashed, undefined) make the next tick
rescan that URI, so a new domain is managed from the next tick on; the rescan every
``RESCAN_S`` stays as a safety net for events lost while the event connection was down.
Each URI is listed, and its events followed, apart from the others (its own task, and the
libvirt backend's worker thread of that URI): a host that does not answer delays only its
own domains' discovery, and the tick waits for a listing only ``DISCOVER_SHARE`` of the
interval (a late one is used at the next tick). VMs appearing and vanishing are normal: each
Link retries its own with backoff.

On stop, with ``[daemon] restore``, the VMs the daemon shrank get their RAM back, at
``restore_rate`` bytes a second, for at most ``restore_timeout`` seconds (:meth:`Daemon.restore`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import math
import re
import signal
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final, Protocol

from balloonctl.daemon.config import Config, member_name
from balloonctl.daemon.config import load as load_config
from balloonctl.daemon.host import read_host
from balloonctl.daemon.link import FULL_RESYNC_TICKS, BackendFactory, Link, backend_for, members
from balloonctl.daemon.metrics import Metrics
from balloonctl.daemon.policy import Decision, HostState, Plan, VmMemory, decide
from balloonctl.daemon.sdnotify import Notifier
from balloonctl.daemon.statestore import StateStore, default_dir
from balloonctl.errors import BalloonError, ConfigError, HostReadError, UsageError
from balloonctl.units import format_size

log = logging.getLogger(__name__)

#: The daemon's mechanics (not policy: these are not knobs anybody should need to turn); the
#: per-VM ones (resync, reconnect backoff) are in :mod:`balloonctl.daemon.link`.
#: How often libvirt is asked for its running domains.
RESCAN_S: Final = 10.0
#: Connection attempts in flight at once.
CONNECT_CONCURRENCY: Final = 64
#: Share of the interval a tick may spend waiting for the VMs' answers.
COLLECT_SHARE: Final = 0.6
#: Share of the interval a tick waits for the libvirt listings it started: a local one takes
#: milliseconds, and a host that does not answer must not take the tick of every other
#: host's domains with it (its listing goes on, and is used at a later tick).
DISCOVER_SHARE: Final = 0.25
#: The cyclic GC's thresholds while the daemon runs (CPython's default: 700, 10, 10).
#: Every tick allocates tens of thousands of short-lived containers (a task, a reply, the
#: statistics per VM) while up to 1000 collections are in flight: at 700 a young
#: collection ran every few hundred replies, promoted the in-flight ones, and the older
#: generations were collected over and over for garbage that reference counting frees
#: anyway. Measured in one 60-tick run of 1000 VMs alternating the two every 3 ticks:
#: 57 ms of GC per tick at the default, 4.6 ms at these, and 200 vs 167 ms of CPU per tick.
#: Cycles (rare here) are still found, within 50000 allocations.
GC_THRESHOLDS: Final = (50_000, 20, 50)


class _Events(Protocol):
    """What the loop uses of :class:`balloonctl.backends.libvirt.DomainEvents` (imported
    only when [libvirt] is configured: libvirt-python is optional)."""

    uri: str

    @property
    def alive(self) -> bool: ...

    async def close(self) -> None: ...


@dataclass(eq=False)
class _Discovery:
    """One libvirt URI's domain discovery: its last listing, its rescan and its events."""

    uri: str
    #: The running domains with a balloon at the last listing that answered (none before
    #: the first): a host that stops answering keeps its domains, whose Links then go
    #: down and retry on their own.
    domains: list[str] = field(default_factory=list)
    #: When the next rescan is due (time.monotonic()); 0: at the next tick.
    due: float = 0.0
    #: The rescan in flight, as its own task; none is started while one runs.
    scan: asyncio.Task[None] | None = None
    #: Lifecycle events of this URI: a libvirt.DomainEvents, or None.
    events: _Events | None = None
    #: Why the last listing failed (None: it answered): logged once when it starts failing
    #: and once when it answers again, not at every rescan of a host that is down.
    failing: str | None = None
    #: The domains last warned about as named like a [[vm]] (warned once each).
    clash: frozenset[str] = frozenset()


class _GcTuning:
    """GC_THRESHOLDS while at least one Daemon runs in the process (tests run several, even
    overlapping); the thresholds found before the first are put back after the last."""

    users = 0
    saved: tuple[int, ...] = ()

    @classmethod
    def acquire(cls) -> None:
        if cls.users == 0:
            cls.saved = gc.get_threshold()
            gc.set_threshold(*GC_THRESHOLDS)
        cls.users += 1

    @classmethod
    def release(cls) -> None:
        cls.users -= 1
        if cls.users == 0:
            gc.set_threshold(*cls.saved)


#: TickReport.error of a tick cut short by SIGTERM (nothing decided, nothing set).
STOPPED: Final = "stopped by a signal"


@dataclass(frozen=True, slots=True)
class TickReport:
    """What one tick did (for ``--once``, the bench and the tests)."""

    tick: int
    plan: Plan | None
    host: HostState | None
    managed: int
    answered: int
    sent: int
    seconds: float
    error: str | None = None


#: A hold that continues a move: the move's own line said it all.
_UNDER_WAY: Final = "hold: on its way"


_NUMBERS: Final = re.compile(r"[\d.]+")


def _reason_kind(reason: str) -> str:
    """A reason without its numbers: a hold is logged again only when its kind changes."""
    return _NUMBERS.sub("#", reason)


class Daemon:
    """The controller: the managed VMs' links, the tick, signals and reloads, one loop.

    Its defaults (the real backends, the state directory, systemd's notify socket) are the
    daemon's own; :mod:`balloonctl.daemon.app` builds the one ``balloonctl daemon`` runs,
    and tests, the bench and the demo build theirs with fakes in place of the defaults.
    """

    def __init__(
        self,
        config: Config,
        *,
        dry_run: bool = False,
        state_dir: str | None = None,
        factory: BackendFactory = backend_for,
        notifier: Notifier | None = None,
    ) -> None:
        self.config = config
        self.dry_run = dry_run
        self.factory = factory
        self.notifier = notifier if notifier is not None else Notifier.from_env()
        directory = state_dir or config.daemon.state_dir or default_dir()
        self.store = None if dry_run else StateStore(directory)
        self.links: dict[str, Link] = {}
        self.tick_no = 0
        #: Each configured libvirt URI's discovery, by URI.
        self._hosts: dict[str, _Discovery] = {}
        self._stop = asyncio.Event()
        #: A second SIGTERM/SIGINT: cut a restore on stop short (systemd's own answer to a
        #: slow stop is SIGKILL at TimeoutStopSec; an operator's second ^C is this).
        self._stop_now = asyncio.Event()
        self._wake = asyncio.Event()
        self._reload = False
        self.metrics: Metrics | None = None
        self._signals: list[int] = []
        #: Connection attempts at once: 2000 unreachable VMs retried together starved the
        #: loop (a core for seconds, connects cancelled by their own timeouts; measured).
        self._connecting = asyncio.Semaphore(CONNECT_CONCURRENCY)
        #: Connected VMs at the last gc.freeze(), and when to refreeze anyway.
        self._frozen_at = -1
        self._refreeze_tick = 0
        #: Whether this daemon holds the GC tuning (see GC_THRESHOLDS).
        self._gc_tuned = False
        #: Seconds of the periodic rescan (a test sets it long to show events suffice).
        self.rescan_s = RESCAN_S
        #: Whether to follow libvirt's lifecycle events (off: the rescan alone, as before
        #: events were used; for the discovery-latency measurement).
        self.use_events = True

    # ------------------------------------------------------------------ life cycle

    async def __aenter__(self) -> Daemon:
        if self.store is not None:
            try:
                self.store.open()
            except OSError as exc:
                raise UsageError(
                    f"state directory {self.store.directory}: {exc.strerror or exc}"
                ) from exc
            self.tick_no = self.store.load_tick()
        if self.config.daemon.metrics is not None:
            self.metrics = Metrics(self.config.daemon.metrics)
        _GcTuning.acquire()
        self._gc_tuned = True
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.notifier.stopping()
        gc.unfreeze()
        if self._gc_tuned:
            self._gc_tuned = False
            _GcTuning.release()
        hosts = list(self._hosts.values())
        self._hosts.clear()
        await asyncio.gather(*(self._forget(found) for found in hosts))
        await asyncio.gather(*(self._drop(link) for link in list(self.links.values())))
        if self.metrics is not None:
            self.metrics.close()
        loop = asyncio.get_running_loop()
        for sig in self._signals:
            loop.remove_signal_handler(sig)

    def install_signals(self) -> None:
        """SIGTERM/SIGINT stop after the current tick's step; SIGHUP reloads the config."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stop)
        loop.add_signal_handler(signal.SIGINT, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        self._signals = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP]

    def stop(self) -> None:
        """Leave the loop (prompt: it waits on an event, not a sleep); a second call cuts a
        restore on stop short."""
        if self._stop.is_set():
            self._stop_now.set()
        self._stop.set()
        self._wake.set()

    def request_reload(self) -> None:
        """Re-read the config before the next tick."""
        self._reload = True
        self._wake.set()

    def reload(self) -> None:
        """Re-read the config file; a bad one is reported and the running one kept."""
        self._reload = False
        path = self.config.path
        if path is None:
            return
        self.notifier.reloading()
        try:
            fresh = load_config(path)
            if fresh.manages_nothing:
                # Most likely a file caught half-written or emptied by mistake: applying it
                # would drop every VM (and their restore), so it is refused like a bad one.
                raise ConfigError(f"{path}: nothing to manage (no [[vm]] and no [libvirt])")
        except ConfigError as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)
        else:
            if fresh.daemon.metrics != self.config.daemon.metrics:
                log.warning("[daemon] metrics changes need a restart; keeping the endpoint")
                # The running configuration says what runs: a later reload back to the
                # address in use is then no change, and warns of nothing.
                fresh = replace(
                    fresh, daemon=replace(fresh.daemon, metrics=self.config.daemon.metrics)
                )
            if fresh.daemon.interval != self.config.daemon.interval:
                for link in self.links.values():
                    link.resync_due = True  # the stats period follows the interval
            self.config = fresh
            # Every URI rescanned at the next tick; one no longer configured is forgotten
            # there (its events closed), one still configured keeps its events.
            for found in self._hosts.values():
                found.due = 0.0
            log.info("configuration reloaded from %s", path)
        self.notifier.ready(self._status_text(None))

    async def run(self, *, once: bool = False) -> TickReport | None:
        """Tick until stopped (or once). Returns the last tick's report."""
        report: TickReport | None = None
        interval = self.config.daemon.interval
        next_tick = time.monotonic()
        first = True
        while not self._stop.is_set():
            if self._reload:
                self.reload()
                interval = self.config.daemon.interval
            report = await self.tick(settle=once)
            if first:
                self.notifier.ready(self._status_text(report))
                first = False
            else:
                self.notifier.status(self._status_text(report))
            self.notifier.watchdog()
            if once:
                break
            next_tick += interval
            now = time.monotonic()
            if next_tick < now:  # an overrun: skip the ticks that were missed
                next_tick = now + interval - (now - next_tick) % interval
            await self._sleep_until(next_tick)
        if not once and self.config.daemon.restore and not self.dry_run:
            await self.restore()
        return report

    async def _sleep_until(self, deadline: float) -> None:
        """Wait for the next tick, a signal, or half the watchdog period (then ping)."""
        ping = self.notifier.watchdog_interval
        while not self._stop.is_set() and not self._reload:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            step = min(left, ping / 2) if ping else left
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(step):
                    await self._wake.wait()
            if ping:
                self.notifier.watchdog()

    # ------------------------------------------------------------------ one tick

    async def tick(self, *, settle: bool = False) -> TickReport:
        """Collect, decide, act: one round over every managed VM."""
        started = time.monotonic()
        self.tick_no += 1
        tick = self.tick_no
        await self._reconcile(settle=settle)
        answered = await self._collect(tick, settle=settle)
        if self._stop.is_set():
            return self._report(tick, None, None, answered, 0, started, STOPPED)
        self._freeze_heap(tick)
        try:
            host = read_host(self.config.host)
        except HostReadError as exc:
            log.error("tick %d: %s; deciding nothing", tick, exc)
            return self._report(tick, None, None, answered, 0, started, str(exc))
        now_wall = time.time()
        states = [link.state(now_wall) for link in answered]
        plan = decide(host, states, self.config.policy, tick)
        sent = await self._act(plan, answered)
        if self.store is not None:
            self.store.save_tick(tick)
        if self.metrics is not None:
            self.metrics.observe(host, plan, states, len(self.links))
        return self._report(tick, plan, host, answered, sent, started, None)

    def _report(
        self,
        tick: int,
        plan: Plan | None,
        host: HostState | None,
        answered: Sequence[Link],
        sent: int,
        started: float,
        error: str | None,
    ) -> TickReport:
        seconds = time.monotonic() - started
        if self.metrics is not None:
            self.metrics.tick_took(seconds)
        return TickReport(tick, plan, host, len(self.links), len(answered), sent, seconds, error)

    def _freeze_heap(self, tick: int) -> None:
        """Keep the long-lived objects (links, connections, tasks) out of the cyclic GC.

        With 1000 VMs every full collection walked them all: a third of a stats-only tick's
        CPU and most of its jitter (measured: 0.20 s median, 0.12-0.29, down to 0.14 s,
        0.13-0.19, with them frozen). Frozen objects are never collected, so when VMs come
        or go the heap is unfrozen, collected once and frozen again, and the same every
        FULL_RESYNC_TICKS for anything else that piled up.
        """
        connected = sum(1 for link in self.links.values() if link.up)
        if connected == self._frozen_at and tick < self._refreeze_tick:
            return
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        self._frozen_at = connected
        self._refreeze_tick = tick + FULL_RESYNC_TICKS

    async def _reconcile(self, *, settle: bool = False) -> None:
        """Bring ``links`` in line with the configuration and libvirt's domains."""
        await self._discover(settle=settle)
        domains = {uri: found.domains for uri, found in self._hosts.items()}
        wanted = {m.name: m for m in members(self.config, domains)}
        for name, link in list(self.links.items()):
            member = wanted.get(name)
            if member is None:
                log.info("%s: no longer managed", name)
                await self._drop(link)
            elif (member.address, member.uri) != (link.member.address, link.member.uri):
                await self._drop(link)
            else:
                link.member = member  # a reload may change floor and shares
        for name, member in wanted.items():
            if name not in self.links:
                memory = self.store.load(name) if self.store is not None else VmMemory()
                self.links[name] = Link(member, memory)

    async def _discover(self, *, settle: bool) -> None:
        """Start the rescans that are due, one task per URI, and wait a little for them.

        A URI no longer configured is forgotten. The tick waits for the listings it started
        ``DISCOVER_SHARE`` of the interval (``--once``: as long as a listing may take); a
        listing still running after that keeps its task, and is used when it is done.
        """
        configured = [lv.uri for lv in self.config.libvirts]
        for uri in [uri for uri in self._hosts if uri not in configured]:
            await self._forget(self._hosts.pop(uri))
        now = time.monotonic()
        started: list[asyncio.Task[None]] = []
        for uri in configured:
            found = self._hosts.get(uri)
            if found is None:
                found = self._hosts[uri] = _Discovery(uri)
            if now < found.due or (found.scan is not None and not found.scan.done()):
                continue
            found.due = now + self.rescan_s
            found.scan = asyncio.create_task(self._scan(found), name=f"rescan {uri}")
            started.append(found.scan)
        if started:
            timeout = self.config.daemon.command_timeout
            budget = 2 * timeout + 1 if settle else self.config.daemon.interval * DISCOVER_SHARE
            await self._wait_or_stop(asyncio.wait(started, timeout=budget), budget)

    async def _scan(self, found: _Discovery) -> None:
        """One URI's rescan: (re)open its lifecycle events, then list its domains."""
        uri = found.uri
        if self.use_events:
            await self._open_events(found)
        try:
            # Here, not at the top: libvirt-python is optional, and a daemon of [[vm]]s
            # only never loads it (its absence is the ImportError below).
            from balloonctl.backends.libvirt import list_balloon_domains  # noqa: PLC0415

            rows = await list_balloon_domains(uri, timeout=self.config.daemon.command_timeout)
        except (BalloonError, ImportError) as exc:
            if found.failing is None:
                log.warning("libvirt %s: cannot list domains: %s", uri, exc)
            found.failing = str(exc)
            return
        if found.failing is not None:
            log.info("libvirt %s: listing domains again", uri)
            found.failing = None
        found.domains = [row.name for row in rows]
        vms = {vm.name for vm in self.config.vms}
        clash = frozenset(d for d in found.domains if member_name(self.config, uri, d) in vms)
        for name in sorted(clash - found.clash):
            log.warning("libvirt domain %s has a [[vm]]'s name; managing the [[vm]]", name)
        found.clash = clash

    async def _open_events(self, found: _Discovery) -> None:
        """Follow libvirt's lifecycle events on ``found``'s URI (again, if the connection
        closed).

        Tried at each rescan; a failure is logged at debug level only, since the listing
        that follows says the same in its own warning."""
        uri = found.uri
        events = found.events
        if events is not None and events.alive:
            return
        found.events = None
        if events is not None:
            await events.close()
        try:
            from balloonctl.backends.libvirt import DomainEvents  # noqa: PLC0415

            fresh = DomainEvents(uri, functools.partial(self._domain_changed, uri))
            await fresh.open(self.config.daemon.command_timeout)
        except (BalloonError, ImportError) as exc:
            log.debug("libvirt %s: no lifecycle events: %s", uri, exc)
            return
        if self._hosts.get(uri) is not found:  # forgotten (a reload) while it opened
            await fresh.close()
            return
        found.events = fresh
        log.debug("libvirt %s: following lifecycle events", uri)

    def _domain_changed(self, uri: str, name: str) -> None:
        """A domain started, stopped, crashed or was undefined: rescan ``uri`` at the next
        tick."""
        log.debug("libvirt %s: lifecycle event of %s; rescanning at the next tick", uri, name)
        found = self._hosts.get(uri)
        if found is not None:
            found.due = 0.0

    async def _forget(self, found: _Discovery) -> None:
        """Stop discovering on a URI (no longer configured, or the daemon stops): its rescan
        cancelled, its events closed (not waited for beyond a moment: see DomainEvents)."""
        scan, found.scan = found.scan, None
        if scan is not None and not scan.done():
            scan.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await scan
        events, found.events = found.events, None
        if events is not None:
            await events.close()

    async def _drop(self, link: Link) -> None:
        self.links.pop(link.name, None)
        busy = link.busy
        if busy is not None and not busy.done():
            busy.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await busy
        await link.close()

    async def _collect(self, tick: int, *, settle: bool) -> list[Link]:
        """Each VM's collection as its own task; the tick waits for them until its deadline."""
        started: list[Link] = []
        for link in self.links.values():
            if link.busy is not None and not link.busy.done():
                continue  # still stuck on an earlier tick: leave it out of this one
            link.busy = asyncio.create_task(
                link.collect(
                    self.factory,
                    self.config,
                    tick,
                    dry_run=self.dry_run,
                    connecting=self._connecting,
                ),
                name=f"collect {link.name}",
            )
            started.append(link)
        tasks = [link.busy for link in started if link.busy is not None]
        if tasks:
            budget = max(self.config.daemon.interval * COLLECT_SHARE, 0.5)
            if settle:
                budget = self.config.daemon.connect_timeout + self.config.daemon.command_timeout
            await self._wait_or_stop(asyncio.wait(tasks, timeout=budget), budget)
        stale_after = self.config.policy.stale_after
        if settle and any(
            link.up
            and link.polling
            and (
                link.stats is None
                or link.stats.last_update == 0
                or time.time() - link.stats.last_update > stale_after
            )
            for link in started
        ):
            # --once right after polling was turned on (or sped up from a period longer than
            # stale_after, whose last reading the policy would refuse): one period for a
            # fresh reading.
            period = max(1, math.ceil(self.config.daemon.interval)) + 0.2
            await self._wait_or_stop(asyncio.sleep(period), period)
            if not self._stop.is_set():
                await self._restats(started)
        answered = []
        for link in started:
            busy = link.busy
            if busy is None or not busy.done() or busy.cancelled():
                continue
            error = busy.exception()
            if error is not None:
                # Not a BalloonError (those are handled in collect): a bug, or an input no
                # check caught. Logged once per VM, the VM left out, the daemon goes on.
                if link.down_reason is None:
                    log.error("%s: unexpected %s: %s", link.name, type(error).__name__, error)
                    log.debug("detail", exc_info=error)
                link.down_reason = f"unexpected {type(error).__name__}"
                continue
            if busy.result() and link.actual is not None:
                answered.append(link)
        return answered

    async def _wait_or_stop(self, work: Awaitable[object], timeout: float) -> None:
        """``work``, cut short by SIGTERM: a --once settle wait can be minutes long."""
        task = asyncio.ensure_future(work)
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({task, stop}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pending in (task, stop):
                if not pending.done():
                    pending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(task, stop, return_exceptions=True)

    async def _restats(self, links: Sequence[Link]) -> None:
        async def one(link: Link) -> None:
            if link.backend is not None and link.up:
                try:
                    await link.read_stats(link.backend)
                except BalloonError as exc:
                    await link.mark_down(str(exc))

        await asyncio.gather(*(one(link) for link in links))

    async def _act(self, plan: Plan, answered: Sequence[Link]) -> int:
        by_name = {link.name: link for link in answered}
        todo: list[tuple[Link, Decision]] = []
        for decision in plan.decisions:
            link = by_name[decision.vm]
            self._log(link, decision)
            if decision.send and not self.dry_run:
                todo.append((link, decision))
            elif not self.dry_run:
                self._remember(link, decision.memory)
        if not todo:
            return 0
        todo = await self._not_migrating(todo)
        results = await asyncio.gather(*(link.act(decision) for link, decision in todo))
        sent = 0
        for (link, decision), ok in zip(todo, results, strict=True):
            if ok:
                sent += 1
                self._remember(link, decision.memory)
                if self.metrics is not None:
                    self.metrics.decided(decision)
        return sent

    async def _not_migrating(
        self, todo: Sequence[tuple[Link, Decision]]
    ) -> list[tuple[Link, Decision]]:
        """The moves whose VM is not migrating: each is asked just before its move (a VM
        found migrating is held from then on, and asked every tick until it is over), so
        the fleet's steady ticks cost no extra command. A VM that cannot answer is not
        moved (unknown means hold); the next tick's collection finds out why."""

        async def ask(link: Link) -> bool:
            try:
                return not await link.check_migrating()
            except BalloonError as exc:
                log.debug("%s: cannot tell whether it migrates: %s", link.name, exc)
                return False

        clear = await asyncio.gather(*(ask(link) for link, _ in todo))
        keep = []
        for (link, decision), ok in zip(todo, clear, strict=True):
            if ok:
                keep.append((link, decision))
            elif link.migrating:
                log.info("%s: at %s: hold: migrating", link.name, format_size(decision.current))
                link.last_reason_kind = _reason_kind("hold: migrating")
        return keep

    # ------------------------------------------------------------------ restore on stop

    async def restore(self) -> int:
        """Give every VM the daemon shrank its RAM back (``[daemon] restore``); the VMs
        restored.

        A VM counts as shrunk by the daemon when the daemon set its last target (its
        remembered memory, across restarts too) and it is below its RAM. Targets go up in
        steps so that all VMs together get at most ``restore_rate`` bytes a second (the host
        must find that memory), each second's bytes shared equally among the VMs still
        short; after ``restore_timeout`` seconds what is left stays shrunk, and is logged. A
        VM that does not answer is left as it is.
        """
        daemon = self.config.daemon
        self.notifier.stopping()
        short: dict[str, int] = {}  # VM -> the target it has been given so far
        for link in self.links.values():
            if not link.up or link.actual is None or link.maximum <= 0:
                continue
            target = link.memory.target
            if target is not None and target < link.maximum:
                short[link.name] = target
        if not short:
            return 0
        log.info(
            "restoring %d VMs to their RAM at %s/s (for at most %g s)",
            len(short),
            format_size(daemon.restore_rate),
            daemon.restore_timeout,
        )
        deadline = time.monotonic() + daemon.restore_timeout
        restored = 0
        while short and time.monotonic() < deadline and not self._stop_now.is_set():
            step_started = time.monotonic()
            share = max(daemon.restore_rate // len(short), 1)
            moves: list[tuple[Link, int]] = []
            budget = daemon.restore_rate
            for name in sorted(short, key=lambda n: self.links[n].maximum - short[n]):
                link = self.links[name]
                give = min(share, link.maximum - short[name], budget)
                if give <= 0:
                    continue
                budget -= give
                moves.append((link, short[name] + give))
            # A step never outlives the deadline or a second SIGTERM: a VM whose set_target is
            # still in flight then is left as it is (its command may or may not have acted).
            step: asyncio.Future[list[bool]] = asyncio.ensure_future(
                asyncio.gather(*(self._restore_step(link, target) for link, target in moves))
            )
            stop_now: asyncio.Future[Any] = asyncio.ensure_future(self._stop_now.wait())
            waiters: set[asyncio.Future[Any]] = {step, stop_now}
            await asyncio.wait(
                waiters,
                timeout=max(0.0, deadline - time.monotonic()),
                return_when=asyncio.FIRST_COMPLETED,
            )
            stop_now.cancel()
            if not step.done():
                step.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await step
                break
            results = step.result()
            for (link, target), ok in zip(moves, results, strict=True):
                if not ok:
                    short.pop(link.name, None)
                elif target >= link.maximum:
                    short.pop(link.name, None)
                    restored += 1
                    log.info("%s: restored to %s", link.name, format_size(link.maximum))
                else:
                    short[link.name] = target
            self.notifier.watchdog()
            if short:
                now = time.monotonic()
                pause = max(0.0, min(1.0 - (now - step_started), deadline - now))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop_now.wait(), pause)
        why = (
            "restore cut short by a second signal"
            if self._stop_now.is_set()
            else f"not restored within {daemon.restore_timeout:g} s"
        )
        for name in sorted(short):
            log.warning(
                "%s: %s; left at %s of %s",
                name,
                why,
                format_size(short[name]),
                format_size(self.links[name].maximum),
            )
        return restored

    async def _restore_step(self, link: Link, target: int) -> bool:
        """One step of :meth:`restore`; remembered so that a restart knows the target."""
        backend = link.backend
        if backend is None:
            return False
        try:
            await backend.set_target(target)
        except BalloonError as exc:
            log.warning("%s: restore to %s failed: %s", link.name, format_size(target), exc)
            return False
        memory = replace(
            link.memory, target=target, set_tick=self.tick_no, shrink=False, reached=False
        )
        self._remember(link, memory)
        return True

    def _remember(self, link: Link, memory: VmMemory) -> None:
        link.memory = memory
        if self.store is not None:
            self.store.save(link.name, memory)

    def _log(self, link: Link, decision: Decision) -> None:
        """One line per decision that moves a VM; a hold only when its kind changes."""
        if decision.send:
            log.info(
                "%s: %s -> %s: %s%s",
                link.name,
                format_size(decision.current),
                format_size(decision.target),
                decision.reason,
                " (dry run)" if self.dry_run else "",
            )
            # Holds all begin "hold:" and moves never do (a policy property test pins it), so
            # after a move the next hold is logged whatever its kind: no need to work out the
            # move's own kind.
            link.last_reason_kind = ""
            return
        kind = _reason_kind(decision.reason)
        if kind != link.last_reason_kind and not decision.reason.startswith(_UNDER_WAY):
            log.info("%s: at %s: %s", link.name, format_size(decision.current), decision.reason)
        elif log.isEnabledFor(logging.DEBUG):  # most VMs most ticks: no sizes formatted for it
            log.debug("%s: at %s: %s", link.name, format_size(decision.current), decision.reason)
        link.last_reason_kind = kind

    def _status_text(self, report: TickReport | None) -> str:
        if report is None:
            return f"reloaded; {len(self.links)} VMs"
        if report.plan is None:
            return f"tick {report.tick}: {report.error}"
        return (
            f"tick {report.tick}: {report.answered}/{report.managed} VMs answering; "
            f"{report.plan.host_reason} ({report.plan.mode.value}); {report.sent} moved"
        )
