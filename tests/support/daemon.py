"""What the daemon's tests share: a fake host, config files, the daemon stepped in-process and
watched from outside, and the daemon as a CLI process.

The host is two files the test rewrites: a meminfo with MemTotal/MemAvailable in kB and a
PSI file (``[host] meminfo``/``psi``). The daemon runs either in-process
(:class:`balloonctl.daemon.loop.Daemon`, ticks stepped by the test, :func:`follow` waiting
for what it moved) or as the CLI in a subprocess (signals, ``NOTIFY_SOCKET``), see
:class:`DaemonProcess`. The VMs are tests/support/sims.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from balloonctl.backends.base import GuestStats
from balloonctl.backends.qmp import QmpBackend
from balloonctl.daemon.link import Link
from balloonctl.daemon.loop import Daemon, TickReport
from balloonctl.sim.fleet import SimProcess
from balloonctl.sim.host import meminfo_text, replace_file
from tests.support.cli import balloonctl_argv, cli_env, stop_process

MiB: Final = 1 << 20
GiB: Final = 1 << 30

#: Bound on anything the tests wait for (a balloon reaching its target, a log line, ...).
WAIT_S: Final = 10.0

#: The policy knobs the sim scenarios use: whole steps of 256 MiB on a 1 GiB guest (so a
#: scenario takes few ticks), 35 % headroom (an idle guest, 87 % available, and a steady one,
#: 57 %, land in different tiers: the idle line is twice the headroom), 20 % guest_low.
TEST_POLICY: Final[Mapping[str, object]] = {
    "guest_headroom": 35,
    "guest_low": 20,
    "max_step": "256M",
    "max_step_percent": 25,
}


# --------------------------------------------------------------------------------------------
# The fake host
# --------------------------------------------------------------------------------------------


class FakeHost:
    """``[host] meminfo`` and ``psi`` files the test rewrites (atomically: a running daemon
    reads them at any time)."""

    def __init__(self, directory: Path, total: int = 4 * GiB) -> None:
        self.meminfo = directory / "meminfo"
        self.psi = directory / "pressure-memory"
        self.total = total
        self.set(total // 2)

    def set(self, available: int, total: int | None = None) -> None:
        """MemTotal and MemAvailable (bytes, written in kB as /proc/meminfo has them)."""
        if total is not None:
            self.total = total
        # A line the daemon does not read, as a real meminfo has dozens of.
        self.write(meminfo_text(self.total, available) + "Buffers:          123456 kB\n")

    def set_percent(self, percent: float) -> None:
        self.set(int(self.total * percent / 100))

    def write(self, text: str) -> None:
        """The meminfo file's text as given (garbage included)."""
        replace_file(self.meminfo, text)

    def set_psi(self, some_avg10: float | None) -> None:
        """/proc/pressure/memory's two lines; None removes the file (a kernel without PSI)."""
        if some_avg10 is None:
            with contextlib.suppress(FileNotFoundError):
                self.psi.unlink()
            return
        replace_file(
            self.psi,
            f"some avg10={some_avg10:.2f} avg60=0.00 avg300=0.00 total=1234\n"
            "full avg10=0.00 avg60=0.00 avg300=0.00 total=567\n",
        )


# --------------------------------------------------------------------------------------------
# Config files
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VmEntry:
    """One ``[[vm]]``."""

    name: str
    sock: str
    min: int | str = 0
    shares: int | None = None


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    raise TypeError(f"no TOML for {value!r}")


@dataclass
class ConfigFile:
    """A daemon config on disk, rewritten with :meth:`write`."""

    path: Path
    host: FakeHost
    state_dir: Path
    vms: list[VmEntry] = field(default_factory=list)
    interval: float = 0.5
    policy: dict[str, object] = field(default_factory=lambda: dict(TEST_POLICY))
    daemon_extra: dict[str, object] = field(default_factory=dict)

    def text(self) -> str:
        lines = [
            "[daemon]",
            f"interval = {_toml(self.interval)}",
            f"state_dir = {_toml(str(self.state_dir))}",
            "connect_timeout = 2.0",
            "command_timeout = 2.0",
        ]
        lines += [f"{k} = {_toml(v)}" for k, v in self.daemon_extra.items()]
        lines += [
            "",
            "[host]",
            f"meminfo = {_toml(str(self.host.meminfo))}",
            f"psi = {_toml(str(self.host.psi))}",
            "",
            "[policy]",
        ]
        lines += [f"{k} = {_toml(v)}" for k, v in self.policy.items()]
        for vm in self.vms:
            lines += ["", "[[vm]]", f"name = {_toml(vm.name)}", f"qmp = {_toml(vm.sock)}"]
            lines.append(f"min = {_toml(vm.min)}")
            if vm.shares is not None:
                lines.append(f"shares = {vm.shares}")
        return "\n".join(lines) + "\n"

    def write(self) -> Path:
        replace_file(self.path, self.text())
        return self.path


# --------------------------------------------------------------------------------------------
# In-process helpers
# --------------------------------------------------------------------------------------------


async def until(
    predicate: Callable[[], bool | Awaitable[bool]], timeout: float = WAIT_S, step: float = 0.05
) -> bool:
    """Poll ``predicate`` (sync or async) until true or ``timeout``; whether it became true."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if not isinstance(value, bool):
            value = await value
        if value:
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(step)


class Observer:
    """Looks at the sims behind the daemon's back, on connections of its own."""

    def __init__(self, vms: Sequence[SimProcess]) -> None:
        self.socks = {vm.name: vm.sock for vm in vms}

    async def actual(self, name: str) -> int:
        async with QmpBackend(self.socks[name], connect_timeout=3, command_timeout=3) as b:
            return await b.actual()

    async def actuals(self) -> dict[str, int]:
        return {name: await self.actual(name) for name in self.socks}

    async def stats(self, name: str) -> GuestStats:
        async with QmpBackend(self.socks[name], connect_timeout=3, command_timeout=3) as b:
            return await b.stats()

    async def wait_stats(
        self,
        timeout: float = WAIT_S,
        check: Callable[[str, GuestStats], bool] = lambda name, stats: True,
    ) -> None:
        """Until every VM's guest has reported statistics (the daemon turned polling on) that
        pass ``check``."""
        for name in self.socks:

            async def reported(name: str = name) -> bool:
                stats = await self.stats(name)
                usable = stats.last_update > 0 and "available-memory" in stats.stats
                return usable and check(name, stats)

            assert await until(reported, timeout, step=0.2), f"{name} never reported statistics"

    async def wait_actual(self, name: str, target: int, timeout: float = WAIT_S) -> int:
        """Until the VM is at ``target`` (assertion error with where it is if not)."""
        last = -1

        async def there() -> bool:
            nonlocal last
            last = await self.actual(name)
            return last == target

        assert await until(there, timeout), f"{name} at {last}, never reached {target}"
        return last


async def follow(d: Daemon, observer: Observer, report: TickReport) -> None:
    """After a tick: every VM it moved reaches its target, and the daemon has seen it arrive
    (BALLOON_CHANGE is throttled to one a second), so the next tick starts from a settled
    state: deterministic stepping."""
    assert report.plan is not None, report
    for decision in report.plan.decisions:
        link = d.links.get(decision.vm)
        if not decision.send or decision.vm not in observer.socks or link is None or not link.up:
            continue  # not moved, or the VM went away as it was told
        await observer.wait_actual(decision.vm, decision.target)

        def seen(link: Link = link, target: int = decision.target) -> bool:
            link.refresh_actual()  # what the next tick does first
            return link.actual == target

        assert await until(seen), (
            f"the daemon never saw {decision.vm} reach {decision.target} (has {link.actual})"
        )


def decisions(report: TickReport) -> dict[str, Any]:
    """``{vm: Decision}`` of a tick that decided."""
    assert report.plan is not None, report
    return {d.vm: d for d in report.plan.decisions}


# --------------------------------------------------------------------------------------------
# The CLI daemon as a subprocess
# --------------------------------------------------------------------------------------------


class NotifySink:
    """The service manager's end of ``NOTIFY_SOCKET``: a bound AF_UNIX datagram socket."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.setblocking(False)
        self.messages: list[dict[str, str]] = []

    def drain(self) -> list[dict[str, str]]:
        while True:
            try:
                data = self.sock.recv(8192)
            except BlockingIOError:
                return self.messages
            fields = dict(line.partition("=")[::2] for line in data.decode().split("\n"))
            self.messages.append(fields)

    def wait(
        self,
        predicate: Callable[[dict[str, str]], bool],
        timeout: float = WAIT_S,
        since: int = 0,
    ) -> bool:
        """Until a message matching ``predicate`` has arrived (the ``since``-th or later)."""
        deadline = time.monotonic() + timeout
        while True:
            if any(predicate(m) for m in self.drain()[since:]):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)

    def close(self) -> None:
        self.sock.close()


class DaemonProcess:
    """``balloonctl daemon --config FILE`` in the background; stderr (its log) to a file."""

    def __init__(
        self,
        config: Path,
        log: Path,
        *args: str,
        env: Mapping[str, str] | None = None,
        unset: Sequence[str] = (),
    ) -> None:
        self.log_path = log
        self._out = open(log, "wb")  # noqa: SIM115 - closed in stop()
        environ = cli_env(env)
        for name in unset:
            environ.pop(name, None)
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            balloonctl_argv("daemon", "--config", str(config), *args),
            stdout=self._out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=environ,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def lines(self, needle: str) -> list[str]:
        return [line for line in self.log().splitlines() if needle in line]

    def wait_log(self, needle: str, timeout: float = WAIT_S, count: int = 1) -> bool:
        deadline = time.monotonic() + timeout
        while len(self.lines(needle)) < count:
            if self.proc.poll() is not None or time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> int:
        code = stop_process(self.proc)
        self._out.close()
        return code


def state_tick(state_dir: Path) -> int:
    """The tick counter the daemon last wrote (0 before its first tick)."""
    try:
        data = json.loads((state_dir / "daemon.json").read_text())
    except FileNotFoundError:
        return 0
    tick = data["tick"]
    assert isinstance(tick, int)
    return tick


def wait_ticks(state_dir: Path, count: int, timeout: float = WAIT_S) -> int:
    """Until the daemon has finished ``count`` more ticks (it writes the counter each tick)."""
    start = state_tick(state_dir)
    deadline = time.monotonic() + timeout
    while (now := state_tick(state_dir)) < start + count:
        assert time.monotonic() < deadline, f"the daemon stopped ticking at {now}"
        time.sleep(0.05)
    return now
