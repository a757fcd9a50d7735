"""``balloonctl daemon`` driving one real QEMU 7.2 guest (Linux 6.1, TCG).

The daemon runs as the CLI runs it under systemd (``python -m balloonctl daemon --config``,
a subprocess, stopped with SIGTERM), holding the guest's QMP socket. The test watches QEMU
on the guest's private monitor (:meth:`Guest.execute`, a second QMP monitor, so it never
competes with the daemon's connection), the guest's own /proc/meminfo through the command
channel, and the daemon's log. The host's memory is a file the test rewrites: pressure,
balanced or calm, on demand.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from balloonctl.sim.host import write_meminfo
from balloonctl.units import parse_size
from fixtures.guest import GiB, Guest, MiB
from tests.support.cli import cli_env, json_out, run_cli
from tests.support.guests import BootGuest, actual

#: The fake host: 16 GiB, with [policy]'s default host_low 20 %, host_high 30 %.
HOST_TOTAL = 16 * GiB
#: 1 GiB available: 6 %, under pressure (not critical: that is below 5 %).
PRESSURE = 1 * GiB
#: 4 GiB available: 25 %, between host_low and host_high: only hungry guests move.
BALANCED = 4 * GiB
#: 15 GiB available: 94 %, calm: guests grow back.
CALM = 15 * GiB
FLOOR = 1 * GiB
BALLOON_DEVICE = "/machine/peripheral/balloon0"
#: Bound on any one wait for the daemon (ticks are 1 s; a 1 GiB inflate takes 1.5-2.5 s).
WAIT_S = 30.0


class DaemonProcess:
    """``balloonctl daemon --config FILE`` in the background, its log in a file."""

    def __init__(self, config: Path, log: Path) -> None:
        self.log = log
        env = cli_env()
        for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            env.pop(key, None)
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "balloonctl", "daemon", "--config", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )

    def text(self) -> str:
        """What it logged so far."""
        return self.log.read_text(errors="replace")

    def alive(self) -> None:
        """Fail at once (with its log) if the daemon has exited."""
        assert self.proc.poll() is None, f"daemon exited {self.proc.returncode}:\n{self.text()}"

    def moves(self) -> list[tuple[int, int, str]]:
        """(current, target, reason) of every move it logged for VM ``real``; sizes as the
        log has them (format_size: exact below 1 GiB, else to 0.01 of the unit)."""
        found = re.findall(r"real: ([\d.]+ \w+) -> ([\d.]+ \w+): (.*)", self.text())
        return [(parse_size(a), parse_size(b), why) for a, b, why in found]

    def terminate(self) -> int:
        """SIGTERM; its exit status (killed after 15 s, which fails the test)."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"daemon ignored SIGTERM for 15 s:\n{self.text()}") from None


StartDaemon = Callable[[Guest], DaemonProcess]


@pytest.fixture
def host_meminfo(tmp_path: Path) -> Path:
    """The fake host's meminfo, under pressure to begin with."""
    path = tmp_path / "meminfo"
    write_meminfo(path, HOST_TOTAL, PRESSURE)
    return path


def write_config(tmp_path: Path, guest: Guest, meminfo: Path, *, stale_after: float = 15) -> Path:
    """The daemon's config: the guest as ``[[vm]] real`` with a 1 GiB floor, 1 s ticks.

    Large steps so every move is one tick; guest_low <= guest_headroom so a guest under its
    own pressure also needs more than it has (the policy's "hungry").
    """
    config = tmp_path / "autoballoon.toml"
    config.write_text(
        f"""
[[vm]]
name = "real"
qmp = "{guest.qmp_path}"
min = "1G"

[daemon]
interval = 1.0
state_dir = "{tmp_path / "state"}"

[host]
meminfo = "{meminfo}"
psi = "{tmp_path / "no-psi"}"

[policy]
max_step = "2G"
max_step_percent = 100
guest_headroom = 60
guest_low = 60
stale_after = {stale_after}
"""
    )
    return config


@pytest.fixture
def start_daemon(tmp_path: Path, host_meminfo: Path) -> Iterator[StartDaemon]:
    """Start the daemon on one guest's QMP socket; killed at the end if still running."""
    started: list[DaemonProcess] = []

    def start(guest: Guest) -> DaemonProcess:
        config = write_config(tmp_path, guest, host_meminfo)
        daemon = DaemonProcess(config, tmp_path / "daemon.log")
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait()


def watch(guest: Guest, daemon: DaemonProcess, done: Callable[[int], bool], what: str) -> list[int]:
    """Every query-balloon ``actual`` seen (about every 50 ms) until ``done`` holds."""
    seen: list[int] = []
    deadline = time.monotonic() + WAIT_S
    while True:
        seen.append(actual(guest))
        if done(seen[-1]):
            return seen
        daemon.alive()
        assert time.monotonic() < deadline, f"gave up waiting for {what}: {seen[-5:]}\n" + (
            daemon.text()
        )
        time.sleep(0.05)


def stats_period(guest: Guest) -> object:
    """The balloon's stats polling period (s) as QEMU has it; 0 is off."""
    return guest.execute(
        "qom-get", {"path": BALLOON_DEVICE, "property": "guest-stats-polling-interval"}
    )


def last_update(guest: Guest) -> int:
    """When the guest last reported statistics (Unix seconds, as QEMU has it)."""
    raw = guest.execute("qom-get", {"path": BALLOON_DEVICE, "property": "guest-stats"})
    value = raw["last-update"]
    assert isinstance(value, int)
    return value


def test_host_pressure_shrinks_to_the_floor_and_calm_grows_it_back(
    boot_guest: BootGuest, start_daemon: StartDaemon, host_meminfo: Path
) -> None:
    guest = boot_guest()
    assert stats_period(guest) == 0  # QEMU's default: the daemon has to turn it on
    before = guest.meminfo()
    daemon = start_daemon(guest)

    shrinking = watch(guest, daemon, lambda a: a == FLOOR, "the guest to shrink to 1 GiB")
    assert shrinking[0] == 2 * GiB
    assert min(shrinking) >= FLOOR
    # Polling at the tick (ceil(interval) = 1 s).
    assert stats_period(guest) == 1
    reading = last_update(guest)
    # The guest gave the memory: with deflate-on-oom MemTotal stays, MemAvailable falls.
    after = guest.meminfo()
    assert after["MemTotal"] == before["MemTotal"]
    # Free pages on the per-CPU lists count (fixtures/guest.py parse_meminfo): Linux 6.12
    # keeps hundreds of MiB there for seconds after a deflate.
    assert before["AvailableInclPcp"] - after["AvailableInclPcp"] > 900 * MiB, (before, after)

    # Still under pressure for 3 more ticks: the floor holds.
    steady: list[int] = []
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        steady.append(actual(guest))
        time.sleep(0.1)
    assert steady and set(steady) == {FLOOR}
    assert last_update(guest) > reading  # and the guest keeps reporting

    write_meminfo(host_meminfo, HOST_TOTAL, CALM)
    growing = watch(guest, daemon, lambda a: a == 2 * GiB, "the guest to grow back to 2 GiB")
    assert min(growing) >= FLOOR
    assert guest.meminfo()["AvailableInclPcp"] > after["AvailableInclPcp"] + 900 * MiB

    assert daemon.terminate() == 0
    log = daemon.text()
    assert "Traceback" not in log, log
    moves = daemon.moves()
    assert moves, log
    assert all(target >= FLOOR for _, target, _ in moves), moves
    shrinks = [m for m in moves if m[1] < m[0]]
    grows = [m for m in moves if m[1] > m[0]]
    assert shrinks[0][:2] == (2 * GiB, FLOOR) and shrinks[0][2].startswith("give: host"), moves
    assert grows[-1][1] == 2 * GiB and grows[-1][2].startswith("grow back: host"), moves
    # The policy's memory was kept for a restart.
    assert any((daemon.log.parent / "state").iterdir())


def test_a_guest_under_its_own_pressure_waits_for_the_host_then_grows(
    boot_guest: BootGuest, start_daemon: StartDaemon, host_meminfo: Path
) -> None:
    guest = boot_guest()
    guest.execute("balloon", {"value": FLOOR})
    deadline = time.monotonic() + WAIT_S
    while actual(guest) != FLOOR:
        assert time.monotonic() < deadline, "the guest never reached 1 GiB"
        time.sleep(0.05)
    daemon = start_daemon(guest)  # host under pressure: the guest at its floor stays there

    # ~520 MiB of its 1 GiB left available: under guest_low (60 %). tmpfs pages stay put
    # (no swap), and this is far from an OOM, so deflate-on-oom does not step in.
    status, out = guest.run(
        "mount -t tmpfs -o size=1g none /mnt && dd if=/dev/zero of=/mnt/f bs=1M count=350",
        timeout=120,
    )
    assert status == 0, out
    hungry_info = guest.meminfo()
    hungry = hungry_info["MemAvailable"]  # what the guest reports to the daemon
    assert hungry < 0.6 * FLOOR, hungry

    # The host has nothing above host_low and no other guest can give: it holds, and says why.
    deadline = time.monotonic() + WAIT_S
    while "hold: guest under pressure, nothing to give it" not in daemon.text():
        daemon.alive()
        assert time.monotonic() < deadline, daemon.text()
        time.sleep(0.1)
    assert actual(guest) == FLOOR
    assert not daemon.moves(), daemon.text()

    write_meminfo(host_meminfo, HOST_TOTAL, BALANCED)
    deadline = time.monotonic() + WAIT_S
    while not daemon.moves():
        daemon.alive()
        assert time.monotonic() < deadline, daemon.text()
        time.sleep(0.1)
    first = daemon.moves()[0]
    assert first[0] == FLOOR and first[1] > FLOOR + 64 * MiB, first
    assert first[2].startswith("grow: guest under pressure"), first
    grown = watch(guest, daemon, lambda a: a >= first[1], "the hungry guest to grow")
    assert min(grown) >= FLOOR
    assert grown[-1] <= 2 * GiB
    # The guest sees it: most of what the balloon gave back is available again.
    gain = grown[-1] - FLOOR
    available = guest.meminfo()["AvailableInclPcp"]
    assert available > hungry_info["AvailableInclPcp"] + gain // 2, (hungry_info, available, gain)

    assert daemon.terminate() == 0
    assert "Traceback" not in daemon.text()


def test_once_speeding_polling_up_waits_for_a_fresh_reading(
    boot_guest: BootGuest, tmp_path: Path, host_meminfo: Path
) -> None:
    """A VM polled slower than the tick (every 30 s here) has a reading older than
    stale_after: ``--once`` sets the period to the tick and decides on the next reading,
    not on that one (which would hold the VM: "statistics N s old")."""
    guest = boot_guest()
    guest.execute(
        "qom-set",
        {"path": BALLOON_DEVICE, "property": "guest-stats-polling-interval", "value": 30},
    )

    def age() -> float:
        reading = last_update(guest)
        assert reading > 0  # the driver's first reading, given when it probed
        return time.time() - reading

    deadline = time.monotonic() + WAIT_S
    while age() <= 4.3:  # stale for a stale_after of 4 s (last-update is whole seconds)
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert stats_period(guest) == 30
    config = write_config(tmp_path, guest, host_meminfo, stale_after=4)
    result = run_cli("--json", "daemon", "--config", str(config), "--once", timeout=60)
    assert result.returncode == 0, result.stderr
    (decision,) = json_out(result)["decisions"]
    assert decision["reason"].startswith("give: host available 6.2% < 20%"), decision
    assert decision["current_bytes"] == 2 * GiB
    assert decision["target_bytes"] == FLOOR
    assert stats_period(guest) == 1
    assert age() < 4
    deadline = time.monotonic() + WAIT_S
    while actual(guest) != FLOOR:
        assert time.monotonic() < deadline, "the guest never reached the floor"
        time.sleep(0.05)
