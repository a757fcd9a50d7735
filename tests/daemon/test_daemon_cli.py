"""``balloonctl daemon`` as a user and systemd run it: a subprocess against ``balloonctl sim``
VMs, looked at from outside (raw QMP, its log, its state directory, ``NOTIFY_SOCKET``).

Signals are the point here: SIGHUP reloads (a new floor is honoured, a removed VM is let go,
a corrupt file is refused and the running configuration kept), SIGTERM stops, and systemd hears
READY=1, STATUS=, WATCHDOG=1, RELOADING=1 and STOPPING=1.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from balloonctl.sim.fleet import SimSpec
from tests.backends.hostile_peer import FakeQemu, HostilePeer
from tests.support.cli import balloonctl_argv, cli_env, run_cli, wait_until
from tests.support.daemon import (
    ConfigFile,
    DaemonProcess,
    FakeHost,
    GiB,
    MiB,
    NotifySink,
    VmEntry,
    state_tick,
    wait_ticks,
)
from tests.support.qmp import raw_actual, raw_execute, raw_stats_period
from tests.support.sims import SimPool

MakeConfig = Callable[..., ConfigFile]
SpawnDaemon = Callable[..., DaemonProcess]

#: Liveness bound on SIGTERM (the daemon waits on an event, so it is prompt; this only
#: catches a daemon that does not stop at all).
STOP_BOUND_S = 10.0
#: Guard against a hang (a failure, not a measured time).
HANG_GUARD_S = 120.0


def _set_period(sock: str, seconds: int) -> None:
    raw_execute(
        sock,
        "qom-set",
        {
            "path": "/machine/peripheral/balloon0",
            "property": "guest-stats-polling-interval",
            "value": seconds,
        },
    )


def _last_update(sock: str) -> int:
    reply = raw_execute(
        sock, "qom-get", {"path": "/machine/peripheral/balloon0", "property": "guest-stats"}
    )
    value = reply["last-update"]
    assert isinstance(value, int)
    return value


def _settled(sock: str) -> int:
    """The VM's size once it stops moving (the sims move 2 GiB a second: 0.3 s is ample)."""
    last = raw_actual(sock)
    while True:
        time.sleep(0.3)
        now = raw_actual(sock)
        if now == last:
            return now
        last = now


def _sigterm(daemon: DaemonProcess) -> float:
    """SIGTERM; the seconds until it exited, with exit status 0."""
    started = time.monotonic()
    daemon.signal(signal.SIGTERM)
    code = daemon.proc.wait(timeout=STOP_BOUND_S)
    took = time.monotonic() - started
    assert code == 0, daemon.log()
    print(f"daemon stopped {took:.2f} s after SIGTERM")
    return took


# --------------------------------------------------------------------------------------------
# --once
# --------------------------------------------------------------------------------------------


def test_once_dry_run_decides_and_changes_nothing(
    fleet: SimPool, host: FakeHost, make_config: MakeConfig
) -> None:
    """``--json daemon --once --dry-run``: the decisions, and the VMs as they were: no target
    set, stats polling not turned on (nor made faster), no state directory. The same run
    without ``--dry-run`` then does all of that, so each check could fail."""
    polled, low = fleet.start(SimSpec("polled"), SimSpec("low"))
    # polled: statistics already polled every 3 s (by someone else); low: squeezed to 300M,
    # below its floor, and never polled.
    since = int(time.time())
    _set_period(polled.sock, 3)
    raw_execute(low.sock, "balloon", {"value": 300 * MiB})
    assert wait_until(lambda: raw_actual(low.sock) == 300 * MiB)
    assert wait_until(lambda: _last_update(polled.sock) >= since, timeout=10, step=0.2)
    cfg = make_config([VmEntry("polled", polled.sock), VmEntry("low", low.sock, "512M")])
    host.set(600 * MiB)

    result = run_cli("--json", "daemon", "--config", str(cfg.path), "--once", "--dry-run")
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    assert set(report) == {"decisions", "host"}
    assert report["host"] == {
        "mode": "pressure",
        "total_bytes": 4 * GiB,
        "available_bytes": 600 * MiB,
        "psi_some_avg10": None,
    }
    got = {d["vm"]: d for d in report["decisions"]}
    assert set(got) == {"polled", "low"}
    for decision in got.values():
        assert set(decision) == {"vm", "current_bytes", "target_bytes", "reason"}
    assert got["polled"]["current_bytes"] == GiB
    assert got["polled"]["target_bytes"] < GiB
    assert got["polled"]["reason"].startswith("give: host available 14.6% < 20%")
    assert got["low"] == {
        "vm": "low",
        "current_bytes": 300 * MiB,
        "target_bytes": 512 * MiB,
        "reason": "raise to its floor 512 MiB",
    }
    assert "(dry run)" in result.stderr  # the log says what it would have done

    # Nothing moved, nothing turned on, nothing written. (A target would have arrived long
    # before this: the sims move 2 GiB a second.)
    assert raw_actual(polled.sock) == GiB
    assert raw_actual(low.sock) == 300 * MiB
    assert raw_stats_period(polled.sock) == 3
    assert raw_stats_period(low.sock) == 0
    assert not cfg.state_dir.exists()

    # The human rendering of the same.
    human = run_cli("daemon", "--config", str(cfg.path), "--once", "--dry-run")
    assert human.returncode == 0, human.stderr
    lines = human.stdout.splitlines()
    assert lines[0] == "host: pressure, 600 MiB of 4 GiB available"
    assert any(line.startswith("low ") and "raise to its floor" in line for line in lines)
    assert not cfg.state_dir.exists()

    # Without --dry-run: the same decisions are carried out.
    real = run_cli("--json", "daemon", "--config", str(cfg.path), "--once")
    assert real.returncode == 0, real.stderr
    targets = {d["vm"]: d["target_bytes"] for d in json.loads(real.stdout)["decisions"]}
    assert targets["low"] == 512 * MiB and targets["polled"] < GiB
    assert wait_until(lambda: raw_actual(low.sock) == 512 * MiB)
    assert wait_until(lambda: raw_actual(polled.sock) == targets["polled"])
    assert raw_stats_period(polled.sock) == 1
    assert raw_stats_period(low.sock) == 1
    assert state_tick(cfg.state_dir) == 1


def test_once_refusals_are_one_line(
    tmp_path: Path, host: FakeHost, make_config: MakeConfig
) -> None:
    def one_line(result: Any, code: int, text: str) -> None:
        assert result.returncode == code, (result.stdout, result.stderr)
        assert result.stderr.count("\n") == 1, result.stderr
        assert text in result.stderr
        assert "Traceback" not in result.stderr

    one_line(run_cli("daemon", "--once"), 2, "needs a configuration file")
    empty = tmp_path / "empty.toml"
    empty.write_text("[daemon]\ninterval = 1\n")
    one_line(run_cli("daemon", "--config", str(empty), "--once"), 2, "nothing to manage")
    bad = tmp_path / "bad.toml"
    bad.write_text("[daemon]\ninterval = -1\n")
    one_line(run_cli("daemon", "--config", str(bad), "--once"), 2, "daemon.interval")

    # A host whose meminfo is garbage: the tick decides nothing, exit 1 (the VM is not
    # there either, which is only a warning).
    cfg = make_config([VmEntry("gone", str(tmp_path / "gone.sock"))])
    host.write("MemTotal: 1 kB\n")
    result = run_cli("daemon", "--config", str(cfg.path), "--once")
    assert result.returncode == 1, result.stderr
    # Said once (the tick's own error line), not again by the CLI.
    assert result.stderr.count("meminfo: no MemAvailable line") == 1, result.stderr
    assert "balloonctl: ERROR: tick 1: meminfo: no MemAvailable line" in result.stderr
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------------------------
# The long-running daemon
# --------------------------------------------------------------------------------------------


def test_sighup_reload_new_floor_removed_vm_and_corrupt_file(
    fleet: SimPool, host: FakeHost, make_config: MakeConfig, spawn_daemon: SpawnDaemon
) -> None:
    a, b = fleet.start(SimSpec("a"), SimSpec("b"))
    cfg = make_config([VmEntry("a", a.sock), VmEntry("b", b.sock)])
    host.set(600 * MiB)  # pressure: both are shrunk
    daemon = spawn_daemon(cfg.path)
    assert wait_until(lambda: raw_actual(a.sock) < GiB and raw_actual(b.sock) < GiB), daemon.log()

    # Raise a's floor to all of it, stop managing b.
    cfg.vms = [VmEntry("a", a.sock, "1G")]
    cfg.write()
    daemon.signal(signal.SIGHUP)
    assert daemon.wait_log("configuration reloaded from"), daemon.log()
    assert daemon.wait_log("b: no longer managed"), daemon.log()
    assert wait_until(lambda: raw_actual(a.sock) == GiB), daemon.log()
    assert daemon.lines("a: ") and any("raise to its floor 1 GiB" in x for x in daemon.lines("a: "))
    b_size = _settled(b.sock)  # its last target may still have been on its way
    wait_ticks(cfg.state_dir, 3)
    assert raw_actual(b.sock) == b_size  # let go: no longer shrunk
    assert raw_actual(a.sock) == GiB  # its floor holds under pressure

    # A corrupt file: refused in one line, the running configuration kept.
    cfg.path.write_text("[[vm]]\nname = \n")
    daemon.signal(signal.SIGHUP)
    assert daemon.wait_log("reload refused, keeping the running configuration"), daemon.log()
    wait_ticks(cfg.state_dir, 3)
    assert daemon.alive
    assert len(daemon.lines("reload refused")) == 1
    assert "Traceback" not in daemon.log()
    assert raw_actual(a.sock) == GiB  # the old floor still holds
    assert raw_actual(b.sock) == b_size  # and b is still not managed
    assert len(daemon.lines("configuration reloaded from")) == 1

    took = _sigterm(daemon)
    assert took < STOP_BOUND_S


def test_notify_socket_sim_killed_and_back_and_sigterm(
    fleet: SimPool,
    host: FakeHost,
    make_config: MakeConfig,
    spawn_daemon: SpawnDaemon,
    run_dir: Path,
) -> None:
    """systemd's view: READY=1 after the first tick, a STATUS= line per tick, WATCHDOG=1 at
    half of WatchdogSec, RELOADING=1 then READY=1 on SIGHUP, STOPPING=1 last. A VM SIGKILLed
    under the running daemon shows as not answering (one warning line), the other is still
    served, and a new sim on the same socket is picked up again."""
    a, b = fleet.start(SimSpec("a"), SimSpec("b"))
    cfg = make_config([VmEntry("a", a.sock), VmEntry("b", b.sock)])
    sink = NotifySink(str(run_dir / "notify"))
    try:
        daemon = spawn_daemon(
            cfg.path,
            env={"NOTIFY_SOCKET": sink.path, "WATCHDOG_USEC": "400000"},
            unset=("WATCHDOG_PID",),
        )

        def status(text: str) -> Callable[[dict[str, str]], bool]:
            return lambda m: text in m.get("STATUS", "")

        assert sink.wait(lambda m: m.get("READY") == "1"), daemon.log()
        first = sink.messages[0]
        assert first.get("READY") == "1", sink.messages
        assert first["STATUS"].startswith("tick 1: "), first
        assert sink.wait(status("2/2 VMs answering")), sink.messages
        wait_ticks(cfg.state_dir, 2)
        # WATCHDOG_USEC=0.4 s: pinged every tick and at 0.2 s while waiting for the next.
        assert sum(1 for m in sink.drain() if m.get("WATCHDOG") == "1") >= 4

        b.kill()
        assert sink.wait(status("1/2 VMs answering"), since=len(sink.drain())), daemon.log()
        wait_ticks(cfg.state_dir, 4)
        assert daemon.alive
        warnings = daemon.lines("WARNING: b: ")
        assert len(warnings) == 1, daemon.log()
        assert "cannot reach VM" in warnings[0] or "lost" in warnings[0]
        assert not daemon.lines("WARNING: a: ")

        seen = len(sink.drain())
        fleet.restart(b)
        assert daemon.wait_log("b: reachable again", timeout=15), daemon.log()
        assert sink.wait(status("2/2 VMs answering"), since=seen), daemon.log()
        assert len(daemon.lines("WARNING: b: ")) == 1, daemon.log()

        reload_at = len(sink.drain())
        daemon.signal(signal.SIGHUP)

        def ready_after_reloading() -> bool:
            after = sink.drain()[reload_at:]
            at = next((i for i, m in enumerate(after) if m.get("RELOADING") == "1"), None)
            return at is not None and any(m.get("READY") == "1" for m in after[at + 1 :])

        assert wait_until(ready_after_reloading), sink.messages[reload_at:]
        reloading = next(m for m in sink.messages[reload_at:] if m.get("RELOADING") == "1")
        assert reloading["MONOTONIC_USEC"].isdigit()

        _sigterm(daemon)
        messages = sink.drain()
        assert messages[-1].get("STOPPING") == "1", messages[-3:]
        assert all("STOPPING" not in m for m in messages[:-1])
        assert "Traceback" not in daemon.log()
    finally:
        sink.close()


# --------------------------------------------------------------------------------------------
# --once: one tick and out, with a one-line error and a prompt SIGTERM
# --------------------------------------------------------------------------------------------


def test_unreadable_meminfo_with_once_is_one_line(run_dir: Path) -> None:
    """``--once`` on a host whose meminfo does not parse printed two lines: the loop's
    ``ERROR: tick N: ...`` log and then ``error: ...`` (docs/contracts.md: a one-line error)."""
    cfg = run_dir / "c.toml"
    cfg.write_text('[host]\nmeminfo = "/dev/null"\n[[vm]]\nqmp = "/nonexistent/x.sock"\n')
    result = run_cli(
        "daemon", "--config", str(cfg), "--once", "--state-dir", str(run_dir / "state")
    )
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if "meminfo" in line]
    assert len(lines) == 1, result.stderr


# --------------------------------------------------------------------------------------------
# --once: SIGTERM during the settle wait
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def stale_stats_vm(path: Path) -> Iterator[HostilePeer]:
    """A QMP peer whose guest statistics are old (FakeQemu's recorded last-update)."""
    loop = asyncio.new_event_loop()
    peer = HostilePeer(path, FakeQemu(ram=1 << 30))
    ready = threading.Event()
    stop: asyncio.Future[None] | None = None

    async def serve() -> None:
        nonlocal stop
        stop = loop.create_future()
        async with peer:
            ready.set()
            await stop

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield peer
    finally:

        def finish() -> None:
            if stop is not None and not stop.done():
                stop.set_result(None)

        loop.call_soon_threadsafe(finish)
        thread.join(10)
        loop.close()


def test_sigterm_during_once_settle_wait_is_prompt(run_dir: Path) -> None:
    """``--once`` waits one interval (+0.2 s) for fresh statistics with a plain
    ``asyncio.sleep`` that SIGTERM/SIGINT do not interrupt (the daemon replaced their
    handlers with ``stop()``, which only sets an event): with ``interval = 120`` a SIGTERM
    2 s in was ignored for two minutes, and the tick then went on to decide and act, exit 0."""
    sock = run_dir / "vm.sock"
    cfg = run_dir / "c.toml"
    meminfo = run_dir / "meminfo"
    meminfo.write_text("MemTotal: 8388608 kB\nMemAvailable: 4194304 kB\n")
    cfg.write_text(
        f'[daemon]\ninterval = 40\n[host]\nmeminfo = "{meminfo}"\n'
        f"[policy]\nstale_after = 120\n"
        f'[[vm]]\nname = "vm"\nqmp = "{sock}"\n'
    )
    with stale_stats_vm(sock):
        proc = subprocess.Popen(
            balloonctl_argv(
                "daemon", "--config", str(cfg), "--once", "--state-dir", str(run_dir / "state")
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=cli_env(),
        )
        try:
            time.sleep(4)  # connected, in the settle wait
            assert proc.poll() is None
            sent = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=HANG_GUARD_S)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            took = time.monotonic() - sent
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert took < 10, f"SIGTERM took {took:.1f} s to end --once"
    # Ended by the signal (128 + SIGTERM), nothing decided or printed as a tick.
    assert proc.returncode == 143, proc.stderr.read() if proc.stderr else ""
    assert proc.stdout is not None and proc.stdout.read() == ""
