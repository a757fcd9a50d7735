"""The daemon in-process, ticks stepped by the test: against ``balloonctl sim`` VMs for the
policy scenarios and a VM killed mid-tick, against a scripted QMP peer
(``tests/backends/hostile_peer.py``) for garbage statistics, dropped connections and a hang.

Each scenario builds a :class:`~balloonctl.daemon.loop.Daemon` from a config file (the VMs' QMP
sockets, a fake host meminfo in tmp_path, a state directory), calls ``tick()`` itself, and
checks the decisions, the VMs' sizes as ``query-balloon`` shows them on a connection of the
test's own, and the log. ``tick(settle=True)`` waits for every VM's answer (as ``--once``
does), so which VMs answer a tick depends on the scenario, not on the machine's speed.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Final

import pytest

from balloonctl.backends.base import Backend, GuestStats
from balloonctl.backends.qmp import QmpBackend
from balloonctl.daemon.config import Config
from balloonctl.daemon.config import load as load_config
from balloonctl.daemon.link import RETRY_MIN_S, BackendFactory, Member, backend_for
from balloonctl.daemon.loop import Daemon, TickReport
from balloonctl.daemon.policy import HostMode
from balloonctl.daemon.sdnotify import Notifier
from balloonctl.sim.fleet import SimSpec
from balloonctl.units import format_size
from tests.backends.hostile_peer import Drop, FakeQemu, Hang, HostilePeer
from tests.support.daemon import (
    ConfigFile,
    FakeHost,
    GiB,
    MiB,
    Observer,
    VmEntry,
    decisions,
    follow,
    until,
)
from tests.support.sims import SimPool

MakeConfig = Callable[..., ConfigFile]


def _daemon(cfg: ConfigFile, factory: BackendFactory = backend_for) -> Daemon:
    config = load_config(str(cfg.path))
    return Daemon(config, state_dir=str(cfg.state_dir), factory=factory, notifier=Notifier(None))


def _warnings_about(caplog: pytest.LogCaptureFixture, vm: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        # The old balloonctl.daemon.loop split in two: a VM going is logged by its link,
        # an unexpected error in its collection by the loop.
        if r.name in ("balloonctl.daemon.link", "balloonctl.daemon.loop")
        and r.levelno >= logging.WARNING
        and r.getMessage().startswith(f"{vm}:")
    ]


# --------------------------------------------------------------------------------------------
# Policy-level scenarios
# --------------------------------------------------------------------------------------------


def test_pressure_takes_from_idle_first_never_below_floors_and_calm_gives_back(
    fleet: SimPool, host: FakeHost, make_config: MakeConfig
) -> None:
    """An idle guest (87 % available) and a steady one (57 %), 1 GiB each, floors 640M/768M.

    A: PSI says pressure while MemAvailable is above host_low: the idle guest gives down
    to exactly its floor, the steady one keeps all of it. B: MemAvailable falls below
    host_low: now the steady guest gives too, down to its floor and no further, and both
    then hold there while the host is still under pressure. C: calm: both grow back to
    their maximum, and hold there.
    """
    idle, busy = fleet.start(SimSpec("idle"), SimSpec("busy", workload="steady", time_scale=0.01))
    cfg = make_config([VmEntry("idle", idle.sock, "640M"), VmEntry("busy", busy.sock, "768M")])
    observer = Observer([idle, busy])
    floors = {"idle": 640 * MiB, "busy": 768 * MiB}
    sizes = {"idle": GiB, "busy": GiB}
    history: list[tuple[str, TickReport]] = []

    def host_has(other_free: int) -> None:
        # What the guests give back is the host's again, as on a real host.
        host.set(other_free + sum(GiB - size for size in sizes.values()), total=8 * GiB)

    async def step(phase: str, other_free: int, d: Daemon) -> TickReport:
        host_has(other_free)
        report = await d.tick(settle=True)
        assert report.plan is not None, report
        history.append((phase, report))
        await follow(d, observer, report)
        sizes.update(await observer.actuals())
        for name, floor in floors.items():
            assert sizes[name] >= floor, f"phase {phase}: {name} at {sizes[name]} < {floor}"
        return report

    async def scenario() -> None:
        async with _daemon(cfg) as d:
            host_has(2 * GiB)
            first = await d.tick(settle=True)  # connects, turns stats polling on
            assert first.answered == 2, first
            await observer.wait_stats()

            # A: PSI pressure, MemAvailable at 20.3 % of 8 GiB: above host_low, 384 MiB
            # below the midpoint (25 %), which is what the idle guest has above its floor.
            host.set_psi(25.0)
            for _ in range(3):
                await step("A", 1664 * MiB, d)
            assert sizes == {"idle": 640 * MiB, "busy": GiB}
            a_reports = [r for phase, r in history if phase == "A"]
            assert all(r.plan is not None and r.plan.mode is HostMode.PRESSURE for r in a_reports)
            assert not any(decisions(r)["busy"].send for r in a_reports)
            gives = [decisions(r)["idle"] for r in a_reports if decisions(r)["idle"].send]
            assert [g.target for g in gives] == [768 * MiB, 640 * MiB]
            assert all(g.reason.startswith("give: host PSI some avg10 25.0%") for g in gives)

            # B: MemAvailable well below host_low, no PSI file any more.
            host.set_psi(None)
            for _ in range(2):
                report = await step("B", 100 * MiB, d)
            assert sizes == floors
            b_first = next(r for phase, r in history if phase == "B")
            assert decisions(b_first)["busy"].send
            assert decisions(b_first)["busy"].target == 768 * MiB
            assert not decisions(b_first)["idle"].send  # at its floor already
            assert report.plan is not None and report.plan.mode is HostMode.PRESSURE
            assert not any(dec.send for dec in report.plan.decisions)

            # C: calm; both grow back in steps, then hold at their maximum.
            for _ in range(3):
                report = await step("C", 5 * GiB, d)
            assert sizes == {"idle": GiB, "busy": GiB}
            grows = [dec for phase, r in history if phase == "C" for dec in decisions(r).values()]
            assert {dec.vm for dec in grows if dec.send} == {"idle", "busy"}
            assert all(
                dec.reason.startswith("grow back: host available") for dec in grows if dec.send
            )
            assert report.plan is not None and report.plan.mode is HostMode.CALM
            assert not any(dec.send for dec in report.plan.decisions)

    asyncio.run(scenario())


def test_page_cache_counts_as_available_so_the_cache_heavy_guest_gives_first(
    fleet: SimPool, host: FakeHost, make_config: MakeConfig
) -> None:
    """``--workload cache`` (15 % anon, 60 % page cache, about 20 % free) next to ``steady``
    (40 % anon, about 47 % free). By MemFree the steady guest has more to spare; by
    MemAvailable the cache-heavy one does (82 % against 57 %), and it is the one that gives."""
    cache, busy = fleet.start(
        SimSpec("cache", workload="cache", time_scale=50),
        SimSpec("busy", workload="steady", time_scale=0.01),
    )
    cfg = make_config([VmEntry("cache", cache.sock), VmEntry("busy", busy.sock)])
    observer = Observer([cache, busy])

    def filled(name: str, stats: GuestStats) -> bool:
        return name != "cache" or stats.stats.get("disk-caches", 0) > GiB // 2

    async def scenario() -> None:
        async with _daemon(cfg) as d:
            await d.tick(settle=True)  # calm: turns stats polling on
            await observer.wait_stats(check=filled)
            cache_stats, busy_stats = await observer.stats("cache"), await observer.stats("busy")
            assert cache_stats.stats["free-memory"] < busy_stats.stats["free-memory"]
            host.set(700 * MiB)  # pressure: 324 MiB to free, less than the cache guest's surplus
            for _ in range(2):
                report = await d.tick(settle=True)
                got = decisions(report)
                assert got["cache"].send and got["cache"].reason.startswith("give:"), got
                assert not got["busy"].send, got["busy"]
                await follow(d, observer, report)
            assert await observer.actual("busy") == GiB
            assert await observer.actual("cache") == got["cache"].target < GiB

    asyncio.run(scenario())


def test_guest_under_its_own_pressure_gets_memory_from_the_idle_one(
    fleet: SimPool, host: FakeHost, make_config: MakeConfig
) -> None:
    """A guest squeezed to 160 MiB (16 % available, guest_low 20 %) while the host is under
    pressure: it grows, out of what the idle guest gives in the same tick."""
    hungry, donor = fleet.start(SimSpec("hungry"), SimSpec("donor"))
    cfg = make_config([VmEntry("hungry", hungry.sock), VmEntry("donor", donor.sock)])
    observer = Observer([hungry, donor])
    host.set(600 * MiB)  # 14.6 %: pressure

    async def squeezed() -> bool:
        async with QmpBackend(hungry.sock, connect_timeout=3, command_timeout=3) as b:
            stats = await b.stats()
        available = stats.stats.get("available-memory", GiB)
        return stats.last_update > 0 and available < 0.2 * 160 * MiB

    async def scenario() -> None:
        # Squeezed before the daemon starts, with statistics polled all along (a reading from
        # before the squeeze would describe a 1 GiB guest: see the report on stale readings).
        async with QmpBackend(hungry.sock, connect_timeout=3, command_timeout=3) as b:
            await b.set_stats_period(1)
            await b.set_target(160 * MiB)
        await observer.wait_actual("hungry", 160 * MiB)
        assert await until(squeezed, step=0.2), "the squeezed guest never said so"
        async with _daemon(cfg) as d:
            report = await d.tick(settle=True)
            got = decisions(report)
            assert got["hungry"].send, got["hungry"]
            assert got["hungry"].target > 160 * MiB
            assert got["hungry"].reason.startswith("grow: guest under pressure")
            assert got["donor"].send, got["donor"]
            assert got["donor"].target < GiB
            assert got["donor"].reason.startswith("give:")
            await follow(d, observer, report)
            assert await observer.actual("hungry") == got["hungry"].target

    asyncio.run(scenario())


# --------------------------------------------------------------------------------------------
# A VM killed under the daemon
# --------------------------------------------------------------------------------------------


class TrapBackend(QmpBackend):
    """A QmpBackend that runs an armed action (kill the VM) when a method is entered."""

    armed: dict[str, tuple[str, Callable[[], None]]]

    def _spring(self, method: str) -> None:
        trap = self.armed.get(self.name)
        if trap is not None and trap[0] == method:
            del self.armed[self.name]
            trap[1]()

    async def stats(self) -> GuestStats:
        self._spring("stats")
        return await super().stats()

    async def set_target(self, target: int) -> None:
        self._spring("set_target")
        await super().set_target(target)


@pytest.mark.parametrize("during", ["stats", "set_target"])
def test_vm_killed_mid_tick_is_logged_once_and_picked_up_again(
    during: str,
    fleet: SimPool,
    host: FakeHost,
    make_config: MakeConfig,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="balloonctl")
    a, b = fleet.start(SimSpec("a"), SimSpec("b"))
    cfg = make_config([VmEntry("a", a.sock), VmEntry("b", b.sock)])
    observer = Observer([a, b])
    armed: dict[str, tuple[str, Callable[[], None]]] = {}

    def factory(member: Member, config: Config) -> Backend:
        backend = TrapBackend(member.address, connect_timeout=2, command_timeout=2)
        backend.armed = armed
        return backend

    async def scenario() -> None:
        nonlocal a
        async with _daemon(cfg, factory=factory) as d:
            await d.tick(settle=True)
            await observer.wait_stats()
            host.set(600 * MiB)  # pressure: both give
            armed[a.sock] = (during, a.kill)
            before = time.monotonic()
            report = await d.tick(settle=True)
            after = time.monotonic()
            assert not armed, "the trap never ran"
            assert not a.alive
            got = decisions(report)
            assert got["b"].send and got["b"].target < GiB
            if during == "set_target":
                assert got["a"].send  # decided, but the VM died as it was told
                assert report.sent == 1
                assert d.links["a"].memory.target is None  # not remembered
            else:
                assert "a" not in got
            assert len(_warnings_about(caplog, "a")) == 1, caplog.text
            # Reconnect backoff: RETRY_MIN_S after the first failure, then doubling.
            link = d.links["a"]
            assert not link.up and link.connect_failures == 1
            assert before + RETRY_MIN_S <= link.next_attempt <= after + RETRY_MIN_S

            retry_at = link.next_attempt
            before = time.monotonic()
            report = await d.tick(settle=True)  # b is still served
            assert "a" not in decisions(report)
            assert "b" in decisions(report)
            assert link.connect_failures == (1 if before < retry_at else 2)  # not tried before then
            assert await until(lambda: time.monotonic() >= link.next_attempt)
            failures = link.connect_failures
            before = time.monotonic()
            report = await d.tick(settle=True)  # tried again: still dead
            after = time.monotonic()
            assert "a" not in decisions(report)
            assert link.connect_failures == failures + 1
            delay = RETRY_MIN_S * 2**failures
            assert before + delay <= link.next_attempt <= after + delay

            a = await asyncio.to_thread(fleet.restart, a)

            async def back() -> bool:
                tick = await d.tick(settle=True)
                return "a" in decisions(tick)

            assert await until(back, timeout=15, step=0.2), caplog.text
            assert any(r.getMessage() == "a: reachable again" for r in caplog.records), caplog.text
            assert len(_warnings_about(caplog, "a")) == 1, caplog.text
            assert d.links["a"].up and d.links["a"].connect_failures == 0

    asyncio.run(scenario())


# --------------------------------------------------------------------------------------------
# A hostile QMP peer: garbage statistics, dropped connections, a hang
# --------------------------------------------------------------------------------------------

#: What the peers' guests report when all is well: 2 GiB, 1.5 GiB of it available.
GOOD_STATS: Final = {
    "stat-swap-in": 0,
    "stat-swap-out": 0,
    "stat-major-faults": 1,
    "stat-minor-faults": 1000,
    "stat-free-memory": 1400 * MiB,
    "stat-available-memory": 1536 * MiB,
    "stat-total-memory": 2 * GiB,
    "stat-disk-caches": 136 * MiB,
}


def _report(vm: FakeQemu, stats: Mapping[str, int] | None = None, age: int = 0) -> None:
    """The guest's latest reading, taken ``age`` seconds ago. By default a sane one for the
    guest's size now: 512 MiB used, the rest available (a real reading never has more
    available than the guest has; the policy holds on one that does)."""
    if stats is None:
        available = max(vm.actual - 512 * MiB, 0)
        stats = {
            **GOOD_STATS,
            "stat-available-memory": available,
            "stat-free-memory": max(available - 136 * MiB, 0),
        }
    vm.stats = dict(stats)
    vm.last_update = int(time.time()) - age


Scenario = Callable[[Daemon, HostilePeer, HostilePeer], Awaitable[None]]


def _with_peers(run_dir: Path, make_config: MakeConfig, host: FakeHost, body: Scenario) -> None:
    """Run ``body(daemon, hostile, good)`` against two scripted QMP peers (2 GiB guests) with
    the host under pressure, so that both would be shrunk if their statistics allowed it."""
    hostile_sock, good_sock = str(run_dir / "hostile.sock"), str(run_dir / "good.sock")
    cfg = make_config([VmEntry("hostile", hostile_sock), VmEntry("good", good_sock)])
    host.set(600 * MiB)

    async def scenario() -> None:
        async with (
            HostilePeer(hostile_sock, FakeQemu(ram=2 * GiB)) as hostile,
            HostilePeer(good_sock, FakeQemu(ram=2 * GiB)) as good,
        ):
            _report(hostile.vm)
            _report(good.vm)
            async with _daemon(cfg) as d:
                await body(d, hostile, good)

    asyncio.run(scenario())


def _drop(stats: dict[str, int], key: str) -> dict[str, int]:
    stats.pop(key)
    return stats


#: Statistics the policy must not act on: (statistics, age in seconds, the hold's reason).
HELD: Final[dict[str, tuple[Mapping[str, int], int, str]]] = {
    "huge": (
        {**GOOD_STATS, "stat-available-memory": 1 << 62},
        0,
        r"hold: statistics say available-memory \d+, outside 0\.\.2147483648",
    ),
    "missing": (
        _drop(dict(GOOD_STATS), "stat-available-memory"),
        0,
        r"hold: statistics without available-memory",
    ),
    "unsupported (-1)": (
        {**GOOD_STATS, "stat-available-memory": -1},
        0,
        r"hold: statistics without available-memory",
    ),
    "unsupported (2**64-1)": (
        {**GOOD_STATS, "stat-available-memory": (1 << 64) - 1},
        0,
        r"hold: statistics without available-memory",
    ),
    "total below available": (
        {**GOOD_STATS, "stat-total-memory": GiB},
        0,
        r"hold: statistics say total-memory 1073741824 with available-memory 1610612736",
    ),
    "empty": ({}, 0, r"hold: no statistics in the guest's report \(each value 'not reported'\)"),
    "stale": (GOOD_STATS, 600, r"hold: statistics 60\d s old \(stale after 15 s\)"),
}


@pytest.mark.parametrize("case", list(HELD))
def test_garbage_statistics_hold_the_vm_and_send_nothing(
    case: str, run_dir: Path, make_config: MakeConfig, host: FakeHost
) -> None:
    stats, age, reason = HELD[case]

    async def body(d: Daemon, hostile: HostilePeer, good: HostilePeer) -> None:
        for _ in range(2):  # and again: the daemon keeps going
            _report(hostile.vm, stats, age)
            _report(good.vm)
            report = await d.tick(settle=True)
            got = decisions(report)
            assert re.fullmatch(reason, got["hostile"].reason), got["hostile"]
            assert not got["hostile"].send
            assert got["hostile"].target == got["hostile"].current == 2 * GiB
            assert got["good"].send  # the other VM is served as usual
        assert hostile.count("balloon") == 0
        assert good.count("balloon") == 2

        # Sensible statistics again: the VM is shrunk like the other one was.
        _report(hostile.vm)
        report = await d.tick(settle=True)
        assert decisions(report)["hostile"].send
        assert hostile.count("balloon") == 1

    _with_peers(run_dir, make_config, host, body)


@pytest.mark.parametrize(
    ("case", "value"), [("negative", -5 * MiB), ("not a number", "lots"), ("a float", 1.5)]
)
def test_statistics_qemu_cannot_send_hold_the_vm_until_they_make_sense(
    case: str,
    value: object,
    run_dir: Path,
    make_config: MakeConfig,
    host: FakeHost,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """QEMU keeps the statistics as uint64: a negative or non-integer value is a broken peer
    (BadStatistics), not a guest's report. The VM answers, so it is held (issue 18: never
    marked down), nothing is sent, the hold is logged once, and it is served again once its
    answers make sense."""
    caplog.set_level(logging.INFO, logger="balloonctl")

    async def body(d: Daemon, hostile: HostilePeer, good: HostilePeer) -> None:
        _report(hostile.vm)
        hostile.vm.stats["stat-available-memory"] = value  # type: ignore[assignment]
        for _ in range(2):
            _report(good.vm)
            report = await d.tick(settle=True)
            held = decisions(report)["hostile"]
            assert (held.send, held.held) == (False, "bad-stats"), held
            assert "available-memory" in held.reason
            assert decisions(report)["good"].send
        assert hostile.count("balloon") == 0
        assert _warnings_about(caplog, "hostile") == []
        holds = [
            r.getMessage()
            for r in caplog.records
            if r.getMessage().startswith("hostile: at ") and "statistics unusable" in r.getMessage()
        ]
        assert len(holds) == 1, caplog.text

        _report(hostile.vm)
        _report(good.vm)
        report = await d.tick(settle=True)
        assert decisions(report)["hostile"].send
        assert hostile.count("balloon") == 1

    _with_peers(run_dir, make_config, host, body)


def test_connection_dropped_during_the_balloon_command(
    run_dir: Path, make_config: MakeConfig, host: FakeHost, caplog: pytest.LogCaptureFixture
) -> None:
    """``balloon`` is never resent after a drop (its outcome is unknown): the tick reports it
    not sent, nothing is remembered, and the next tick after the reconnect decides again."""
    caplog.set_level(logging.INFO, logger="balloonctl")

    async def body(d: Daemon, hostile: HostilePeer, good: HostilePeer) -> None:
        hostile.script("balloon", Drop())
        report = await d.tick(settle=True)
        target = decisions(report)["hostile"].target
        assert decisions(report)["hostile"].send and target < 2 * GiB
        assert report.sent == 1  # the good VM only
        assert hostile.count("balloon") == 1
        assert d.links["hostile"].memory.target is None  # the target in flight is not kept
        warnings = _warnings_about(caplog, "hostile")
        assert len(warnings) == 1, caplog.text
        assert f"setting {format_size(target)} failed" in warnings[0]
        assert "whether it took effect is unknown" in warnings[0]

        last: list[TickReport] = []

        async def resent() -> bool:
            _report(hostile.vm)
            _report(good.vm)
            last.append(await d.tick(settle=True))
            return hostile.count("balloon") == 2

        assert await until(resent, step=0.2), caplog.text
        again = decisions(last[-1])["hostile"]
        # Decided again and sent (the good VM may be holding by now: its reading follows
        # its size, so it reaches its need and stops giving).
        assert again.send and last[-1].sent >= 1
        assert hostile.vm.actual == again.target
        assert hostile.connections == 2
        assert d.links["hostile"].memory.target == again.target

    _with_peers(run_dir, make_config, host, body)


def test_connection_dropped_during_a_query_is_retried_within_the_tick(
    run_dir: Path, make_config: MakeConfig, host: FakeHost, caplog: pytest.LogCaptureFixture
) -> None:
    async def body(d: Daemon, hostile: HostilePeer, good: HostilePeer) -> None:
        await d.tick(settle=True)
        hostile.script("qom-get", Drop())
        _report(hostile.vm)
        _report(good.vm)
        report = await d.tick(settle=True)
        assert decisions(report)["hostile"].send
        assert report.sent == 2
        assert hostile.connections == 2
        assert not _warnings_about(caplog, "hostile")

    _with_peers(run_dir, make_config, host, body)


def test_vm_that_hangs_costs_its_own_slot_not_the_tick(
    run_dir: Path, make_config: MakeConfig, host: FakeHost, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="balloonctl")

    async def body(d: Daemon, hostile: HostilePeer, good: HostilePeer) -> None:
        await d.tick(settle=True)
        hostile.script("qom-get", Hang())
        report = await d.tick()  # the daemon's own deadline, as in its loop
        assert "hostile" not in decisions(report)
        assert decisions(report)["good"].send
        busy = d.links["hostile"].busy
        assert busy is not None and not busy.done()  # still waiting, outside the tick
        report = await d.tick()
        assert "hostile" not in decisions(report)
        assert d.links["hostile"].busy is busy  # not asked again while it hangs

        # command_timeout (2 s) ends the wait: the VM is down, then reconnected.
        async def served() -> bool:
            _report(hostile.vm)
            _report(good.vm)
            return "hostile" in decisions(await d.tick())

        assert await until(served, timeout=15, step=0.2), caplog.text
        warnings = _warnings_about(caplog, "hostile")
        assert len(warnings) == 1 and "did not answer qom-get" in warnings[0], caplog.text

    _with_peers(run_dir, make_config, host, body)


# --------------------------------------------------------------------------------------------
# The host's meminfo
# --------------------------------------------------------------------------------------------

BAD_MEMINFO: Final = {
    "no MemAvailable": ("MemTotal:  4194304 kB\nMemFree:  1000 kB\n", "no MemAvailable line"),
    "not a number": ("MemTotal:  lots kB\nMemAvailable:  1000 kB\n", "MemTotal is not a number"),
    "available > total": (
        "MemTotal:  1000 kB\nMemAvailable:  2000 kB\n",
        "MemAvailable 2048000 with MemTotal 1024000",
    ),
    "binary": ("\x00\x7f\x01garbage\n" * 10, "no MemTotal line"),
    "empty": ("", "no MemTotal line"),
    "missing": (None, "cannot read"),
}


@pytest.mark.parametrize("case", list(BAD_MEMINFO))
def test_unreadable_host_meminfo_decides_nothing_and_the_daemon_goes_on(
    case: str,
    run_dir: Path,
    make_config: MakeConfig,
    host: FakeHost,
    caplog: pytest.LogCaptureFixture,
) -> None:
    text, message = BAD_MEMINFO[case]

    async def body(d: Daemon, hostile: HostilePeer, good: HostilePeer) -> None:
        if text is None:
            host.meminfo.unlink()
        else:
            host.write(text)
        report = await d.tick(settle=True)
        assert report.plan is None
        assert report.error is not None and message in report.error
        assert report.sent == 0 and report.answered == 2
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1, caplog.text
        assert errors[0].getMessage().startswith(f"tick {report.tick}: ")
        assert errors[0].getMessage().endswith("; deciding nothing")
        assert "\n" not in errors[0].getMessage()
        assert hostile.count("balloon") == good.count("balloon") == 0

        host.set(600 * MiB)
        _report(hostile.vm)
        _report(good.vm)
        report = await d.tick(settle=True)
        assert report.plan is not None and report.sent == 2

    _with_peers(run_dir, make_config, host, body)
