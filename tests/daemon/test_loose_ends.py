"""The daemon's loose ends (issue 18, item 4), each against simulated VMs in this process.

Every VM here is a :class:`~balloonctl.sim.machine.SimMachine` served on a real QMP socket in
the test's own event loop, reached by the daemon through its real QMP backend; the host is a
meminfo file the test writes. The daemon's ticks are stepped by the test.

* broken statistics (virtio-win's 2**64-1 with a frozen last-update, a frozen report, a
  negative and an absurd available-memory) hold the VM with a reason in the log and in
  ``balloonctl_vm_held``; the VM is never marked down and never sent a target;
* ``[daemon] restore`` gives the shrunk VMs their RAM back on stop, at the configured rate;
* a reload to an empty or invalid file is refused, the running configuration kept;
* a floor above a VM's RAM is warned about once;
* a metrics endpoint on a non-loopback address is warned about;
* a migrating VM (QMP ``query-migrate``) is held, and moved again once it is over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shutil
import socket
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import pytest

from balloonctl.backends.base import Backend
from balloonctl.backends.qmp import QmpBackend
from balloonctl.daemon.config import Config
from balloonctl.daemon.config import load as load_config
from balloonctl.daemon.link import LinkState, Member, backend_for
from balloonctl.daemon.loop import Daemon, TickReport
from balloonctl.daemon.metrics import Metrics
from balloonctl.daemon.policy import Decision
from balloonctl.daemon.sdnotify import Notifier
from balloonctl.sim.guest import GuestSpec
from balloonctl.sim.machine import SimMachine, VmSpec

MiB: Final = 1 << 20
GiB: Final = 1 << 30
HOST_TOTAL: Final = 16 * GiB
#: 6 % of the host available: pressure (not critical), every idle guest gives.
PRESSURE: Final = 1 * GiB
#: 25 %: balanced, nothing moves.
BALANCED: Final = 4 * GiB


# --------------------------------------------------------------------------------------------
# Helpers: sims in this loop, a config file, the daemon
# --------------------------------------------------------------------------------------------


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory for sockets (sockaddr_un's 108 bytes)."""
    directory = Path(tempfile.mkdtemp(prefix="bctl-le-", dir="/tmp"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.asynccontextmanager
async def sims(directory: Path, *specs: VmSpec) -> AsyncIterator[dict[str, str]]:
    """Serve ``specs`` on ``directory/NAME.sock`` until the block ends; {name: socket},
    returned once every guest's balloon driver is up."""
    machines: list[SimMachine] = []
    socks: dict[str, str] = {}
    try:
        for spec in specs:
            machine = SimMachine(spec, lambda _m: None)
            path = str(directory / f"{spec.name}.sock")
            await machine.start(path)
            machines.append(machine)
            socks[spec.name] = path
        for path in socks.values():
            async with QmpBackend(path, connect_timeout=3, command_timeout=3) as b:
                for _ in range(100):
                    if (await b.features()).driver_ok:
                        break
                    await asyncio.sleep(0.05)
                else:
                    raise AssertionError(f"{path}: the balloon driver never came up")
        yield socks
    finally:
        for machine in machines:
            await machine.stop()


def vm(name: str, memory: int = GiB, **kw: object) -> VmSpec:
    """A simulated 1 GiB idle guest, its balloon moving at 2 GiB/s."""
    return VmSpec(
        name=name,
        guest=GuestSpec(memory=memory),
        rate=2 * GiB,
        boot_probe_s=0.05,
        **kw,  # type: ignore[arg-type]
    )


async def actual(sock: str) -> int:
    """The VM's size as query-balloon says, on a connection of the test's own."""
    async with QmpBackend(sock, connect_timeout=3, command_timeout=3) as b:
        return await b.actual()


async def poll_stats(sock: str, seconds: int = 1) -> None:
    """Turn the guest's stats polling on before the daemon does (for readings that have
    had time to go stale by the first tick)."""
    async with QmpBackend(sock, connect_timeout=3, command_timeout=3) as b:
        await b.set_stats_period(seconds)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Setup:
    """A config file (rewritten by :meth:`write`), the host's meminfo, the state dir."""

    root: Path
    vms: dict[str, str] = field(default_factory=dict)
    floors: dict[str, str] = field(default_factory=dict)
    daemon: dict[str, str] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return self.root / "config.toml"

    def host(self, available: int) -> None:
        (self.root / "meminfo").write_text(
            f"MemTotal: {HOST_TOTAL // 1024} kB\nMemAvailable: {available // 1024} kB\n"
        )

    def write(self) -> Config:
        lines = [
            "[daemon]",
            "interval = 0.5",
            f'state_dir = "{self.root / "state"}"',
            "connect_timeout = 2.0",
            "command_timeout = 2.0",
            *(f"{k} = {v}" for k, v in self.daemon.items()),
            "[host]",
            f'meminfo = "{self.root / "meminfo"}"',
            f'psi = "{self.root / "no-psi"}"',
            "[policy]",
            "stale_after = 2.0",
        ]
        for name, sock in self.vms.items():
            lines += ["[[vm]]", f'name = "{name}"', f'qmp = "{sock}"']
            if name in self.floors:
                lines.append(f'min = "{self.floors[name]}"')
        self.path.write_text("\n".join(lines) + "\n")
        return load_config(str(self.path))


def make_daemon(setup: Setup, factory: object = backend_for) -> Daemon:
    return Daemon(
        setup.write(),
        state_dir=str(setup.root / "state"),
        factory=factory,  # type: ignore[arg-type]
        notifier=Notifier(None),
    )


def by_vm(report: TickReport) -> dict[str, Decision]:
    assert report.plan is not None, report
    return {d.vm: d for d in report.plan.decisions}


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return str(reply.read().decode())


def held_series(text: str, vm_name: str) -> list[str]:
    return [
        line
        for line in text.splitlines()
        if line.startswith("balloonctl_vm_held{") and f'vm="{vm_name}"' in line
    ]


# --------------------------------------------------------------------------------------------
# 1. Broken statistics hold the VM; never down, never moved
# --------------------------------------------------------------------------------------------

#: --broken-stats kind -> (the held kind, the words of the hold's reason).
BROKEN: Final = {
    "virtio-win": ("bad-stats", r"hold: no statistics in the guest's report"),
    "frozen": ("stale-stats", r"hold: statistics \d+ s old \(stale after 2 s\)"),
    "negative": ("bad-stats", r"hold: statistics unusable: .*'stat-available-memory' is negative"),
    "absurd": ("bad-stats", r"hold: statistics say available-memory 4611686018427387904"),
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_broken_statistics_hold_the_vm_with_a_reason_in_log_and_metrics(
    kind: str, sock_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A guest with broken statistics beside a sane one, the host under pressure: the sane
    one gives, the broken one is held every tick with its reason (logged once, and in
    ``balloonctl_vm_held``), stays up and is sent nothing."""
    caplog.set_level(logging.INFO, logger="balloonctl")
    held, words = BROKEN[kind]
    port = free_port()

    async def body() -> None:
        async with sims(sock_dir, vm("broken", broken_stats=kind), vm("good")) as socks:
            # Polling on, and long enough ago that a frozen report is stale at the first tick.
            await poll_stats(socks["broken"])
            await asyncio.sleep(3.2)
            setup = Setup(tmp_path, dict(socks), daemon={"metrics": f'"127.0.0.1:{port}"'})
            setup.host(PRESSURE)
            async with make_daemon(setup) as d:
                for _ in range(4):
                    report = await d.tick(settle=True)
                    got = by_vm(report)
                    assert "broken" in got, f"the broken VM did not answer: {report}"
                    decision = got["broken"]
                    assert not decision.send, decision
                    assert re.match(words, decision.reason), decision.reason
                    assert decision.held == held
                    link = d.links["broken"]
                    assert link.lifecycle is LinkState.UP and link.down_reason is None
                    series = held_series(scrape(port), "broken")
                    assert series == [f'balloonctl_vm_held{{reason="{held}",vm="broken"}} 1.0'], (
                        series
                    )
                    await asyncio.sleep(0.5)
                # The host was under pressure: the sane VM gave.
                assert await actual(socks["good"]) < GiB
            assert await actual(socks["broken"]) == GiB  # never moved

    asyncio.run(body())
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("broken:")]
    holds = [line for line in lines if re.search(words, line)]
    assert len(holds) == 1, lines  # the reason is logged, once
    assert not [
        r for r in caplog.records if r.levelno >= logging.WARNING and "broken" in r.getMessage()
    ]


# --------------------------------------------------------------------------------------------
# 2. restore on stop
# --------------------------------------------------------------------------------------------


class Recording:
    """A backend factory that records every set_target with when it was sent."""

    def __init__(self) -> None:
        self.targets: list[tuple[float, str, int]] = []

    def __call__(self, member: Member, config: Config) -> Backend:
        backend = backend_for(member, config)
        real = backend.set_target

        async def set_target(target: int) -> None:
            self.targets.append((time.monotonic(), member.name, target))
            await real(target)

        backend.set_target = set_target  # type: ignore[method-assign]
        return backend


def test_restore_on_stop_gives_the_shrunk_vms_their_ram_back_at_the_rate(
    sock_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two guests shrunk under pressure; the host balanced again; SIGTERM's stop: with
    ``restore = true`` and ``restore_rate = "64M"`` both are given their 1 GiB back, in steps
    of at most 64 MiB a second all together, and reach it."""
    caplog.set_level(logging.INFO, logger="balloonctl")
    rate = 64 * MiB

    async def body() -> None:
        async with sims(sock_dir, vm("a"), vm("b")) as socks:
            setup = Setup(
                tmp_path,
                dict(socks),
                daemon={"restore": "true", "restore_rate": '"64M"', "restore_timeout": "30"},
            )
            setup.host(PRESSURE)
            recording = Recording()
            async with make_daemon(setup, recording) as d:
                for _ in range(6):
                    await d.tick(settle=True)
                    await asyncio.sleep(0.6)
                shrunk = {name: await actual(sock) for name, sock in socks.items()}
                assert all(size < GiB - 100 * MiB for size in shrunk.values()), shrunk
                setup.host(BALANCED)
                before = len(recording.targets)
                running = asyncio.create_task(d.run())
                await asyncio.sleep(0.3)
                d.stop()
                started = time.monotonic()
                await running
                took = time.monotonic() - started
            steps = recording.targets[before:]
            assert {name for _, name, _ in steps} == {"a", "b"}
            assert [t for _, name, t in steps if name == "a"][-1] == GiB
            assert [t for _, name, t in steps if name == "b"][-1] == GiB
            # The rate: what was handed back within any 0.9 s stays within one second's worth.
            given: list[tuple[float, int]] = []
            previous = dict(shrunk_targets(recording.targets[:before]))
            for when, name, target in steps:
                given.append((when, target - previous[name]))
                previous[name] = target
            for when, _ in given:
                window = sum(amount for t, amount in given if when <= t < when + 0.9)
                assert window <= rate, (window, given)
            total = sum(amount for _, amount in given)
            assert took >= total / rate - 1.0, (took, total)
            for sock in socks.values():
                deadline = time.monotonic() + 10
                while await actual(sock) != GiB:
                    assert time.monotonic() < deadline, "a VM never got its RAM back"
                    await asyncio.sleep(0.1)

    asyncio.run(body())
    assert any("restoring 2 VMs" in r.getMessage() for r in caplog.records)


def shrunk_targets(targets: list[tuple[float, str, int]]) -> dict[str, int]:
    """Each VM's last target before the restore."""
    out: dict[str, int] = {}
    for _, name, target in targets:
        out[name] = target
    return out


def test_a_second_stop_cuts_the_restore_short(
    sock_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A restore at 16 MiB/s would take most of a minute; a second SIGTERM (stop()) ends it
    at once, and what is left stays shrunk with one line each saying why."""
    caplog.set_level(logging.INFO, logger="balloonctl")

    async def body() -> None:
        async with sims(sock_dir, vm("a"), vm("b")) as socks:
            setup = Setup(
                tmp_path,
                dict(socks),
                daemon={"restore": "true", "restore_rate": '"16M"', "restore_timeout": "300"},
            )
            setup.host(PRESSURE)
            async with make_daemon(setup, Recording()) as d:
                for _ in range(6):
                    await d.tick(settle=True)
                    await asyncio.sleep(0.6)
                setup.host(BALANCED)
                running = asyncio.create_task(d.run())
                await asyncio.sleep(0.3)
                d.stop()
                await asyncio.sleep(1.5)
                assert not running.done(), "the restore ended before the second stop"
                started = time.monotonic()
                d.stop()
                await running
                assert time.monotonic() - started < 2.0
            for sock in socks.values():
                assert await actual(sock) < GiB - 100 * MiB

    asyncio.run(body())
    cut = [r for r in caplog.records if "restore cut short by a second signal" in r.getMessage()]
    assert {r.getMessage().split(":")[0] for r in cut} == {"a", "b"}


def test_restore_is_off_by_default(sock_dir: Path, tmp_path: Path) -> None:
    """Without ``restore``, a stop leaves the shrunk VM where it is."""

    async def body() -> None:
        async with sims(sock_dir, vm("a")) as socks:
            setup = Setup(tmp_path, dict(socks))
            setup.host(PRESSURE)
            async with make_daemon(setup) as d:
                assert d.config.daemon.restore is False
                for _ in range(3):
                    await d.tick(settle=True)
                    await asyncio.sleep(0.6)
                setup.host(BALANCED)
                running = asyncio.create_task(d.run())
                await asyncio.sleep(0.3)
                d.stop()
                await running
                size = await actual(socks["a"])
            await asyncio.sleep(1.0)
            assert await actual(socks["a"]) == size < GiB

    asyncio.run(body())


# --------------------------------------------------------------------------------------------
# 3. A reload to an empty or invalid file is refused
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("[daemon]\ninterval = 0.5\n", "nothing to manage (no [[vm]] and no [libvirt])"),
        ("", "nothing to manage"),
        ("[daemon\n", "not valid TOML"),
        ('[[vm]]\nqmp = "/x.sock"\nmin = "lots"\n', "vm[0].min"),
    ],
    ids=["no-vms", "empty-file", "bad-toml", "bad-value"],
)
def test_reload_to_an_empty_or_invalid_file_is_refused(
    text: str, why: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="balloonctl")
    setup = Setup(tmp_path, {"a": str(tmp_path / "a.sock")})
    setup.host(BALANCED)

    async def body() -> None:
        d = make_daemon(setup)
        running = d.config
        setup.path.write_text(text)
        d.reload()
        assert d.config is running
        refusals = [
            r.getMessage()
            for r in caplog.records
            if r.getMessage().startswith("reload refused, keeping the running configuration")
        ]
        assert len(refusals) == 1 and why in refusals[0], refusals

    asyncio.run(body())


def test_a_refused_metrics_change_is_not_recorded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The endpoint cannot move without a restart, so the running configuration keeps the
    address in use: a reload back to it is no change and warns of nothing."""
    caplog.set_level(logging.INFO, logger="balloonctl")
    setup = Setup(tmp_path, {"a": str(tmp_path / "a.sock")})
    setup.host(BALANCED)

    async def body() -> None:
        d = make_daemon(setup)
        original = setup.path.read_text()
        assert d.config.daemon.metrics is None
        setup.path.write_text(original.replace("[daemon]", '[daemon]\nmetrics = "127.0.0.1:9"'))
        d.reload()
        assert d.config.daemon.metrics is None
        setup.path.write_text(original)
        d.reload()

    asyncio.run(body())
    warnings = [r for r in caplog.records if "metrics changes need a restart" in r.getMessage()]
    assert len(warnings) == 1


# --------------------------------------------------------------------------------------------
# 4. A floor above RAM is a configuration warning
# --------------------------------------------------------------------------------------------


def test_a_floor_above_the_vms_ram_is_warned_about_once(
    sock_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="balloonctl")

    async def body() -> None:
        async with sims(sock_dir, vm("small", memory=512 * MiB)) as socks:
            setup = Setup(tmp_path, dict(socks), floors={"small": "1G"})
            setup.host(PRESSURE)
            async with make_daemon(setup) as d:
                for _ in range(3):
                    report = await d.tick(settle=True)
                    assert not by_vm(report)["small"].send
                    await asyncio.sleep(0.3)
            assert await actual(socks["small"]) == 512 * MiB

    asyncio.run(body())
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "floor" in r.getMessage()
    ]
    assert warnings == [
        "small: configuration: floor 1 GiB is above the VM's RAM 512 MiB; "
        "the VM is never shrunk (the floor is taken as its RAM)"
    ]


# --------------------------------------------------------------------------------------------
# 5. A non-loopback metrics address is warned about
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "warned"),
    [("0.0.0.0", True), ("127.0.0.1", False), ("[::1]", False), ("[::]", True)],
)
def test_a_metrics_endpoint_off_loopback_is_warned_about(
    host: str, warned: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="balloonctl")
    try:
        metrics = Metrics(f"{host}:{free_port()}")
    except Exception as exc:  # an IPv6-less sandbox
        if host.startswith("["):
            pytest.skip(f"no IPv6 here: {exc}")
        raise
    metrics.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if warned:
        assert len(warnings) == 1 and "no authentication" in warnings[0], warnings
    else:
        assert warnings == []


# --------------------------------------------------------------------------------------------
# 6. A migrating VM is held
# --------------------------------------------------------------------------------------------


def test_a_migrating_vm_is_held_and_moved_again_once_it_is_over(
    sock_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """QMP ``migrate`` on the sim (query-migrate then answers "active", as QEMU's does): the
    daemon wants to shrink it, asks first, and holds it; held "migrating" every tick after;
    ``migrate_cancel``: it is shrunk at the next tick."""
    caplog.set_level(logging.INFO, logger="balloonctl")
    port = free_port()

    async def body() -> None:
        async with (
            sims(sock_dir, vm("mig")) as socks,
            QmpBackend(socks["mig"], connect_timeout=3, command_timeout=3) as qmp,
        ):
            assert await qmp.migrating() is False  # {} before any migration
            await qmp.monitor("migrate", {"uri": "tcp:127.0.0.1:1"})
            assert await qmp.migrating() is True
            setup = Setup(tmp_path, dict(socks), daemon={"metrics": f'"127.0.0.1:{port}"'})
            setup.host(PRESSURE)
            async with make_daemon(setup) as d:
                report = await d.tick(settle=True)
                assert by_vm(report)["mig"].send  # decided, then found migrating
                assert report.sent == 0
                assert d.links["mig"].migrating
                for _ in range(2):
                    await asyncio.sleep(0.5)
                    report = await d.tick(settle=True)
                    decision = by_vm(report)["mig"]
                    assert (decision.send, decision.reason, decision.held) == (
                        False,
                        "hold: migrating",
                        "migrating",
                    )
                    assert held_series(scrape(port), "mig") == [
                        'balloonctl_vm_held{reason="migrating",vm="mig"} 1.0'
                    ]
                assert await actual(socks["mig"]) == GiB
                await qmp.monitor("migrate_cancel")
                await asyncio.sleep(0.5)
                report = await d.tick(settle=True)
                assert by_vm(report)["mig"].send and report.sent == 1
                assert not d.links["mig"].migrating
                assert held_series(scrape(port), "mig") == []

    asyncio.run(body())
    messages = [r.getMessage() for r in caplog.records]
    assert "mig: migrating: held" in messages
    assert "mig: migration over" in messages
