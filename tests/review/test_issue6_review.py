"""Regressions found by a hostile review of issue 6 (the auto-balloon daemon).

Each test pins one bug the way a user meets it: a configuration file given to the CLI, or
the daemon as a process against a QMP peer on a real unix socket. DESIGN.md's contract:
one-line errors with the right exit code, never a traceback on bad input, SIGTERM prompt,
never a target below a configured floor.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from balloonctl.daemon.config import load as load_config
from balloonctl.errors import ConfigError
from tests.backends.hostile_peer import FakeQemu, HostilePeer
from tests.cli.conftest import balloonctl_argv, cli_env, one_line_error, run_cli

#: Guard against a hang (a failure, not a measured time).
HANG_GUARD_S = 120.0


@pytest.fixture
def work() -> Iterator[Path]:
    # Short path: unix socket addresses are limited to 108 bytes.
    with tempfile.TemporaryDirectory(prefix="bc6-") as name:
        yield Path(name)


# --------------------------------------------------------------------------------------------
# Configuration: bad input is a one-line error, exit 2
# --------------------------------------------------------------------------------------------


def test_metrics_port_with_a_superscript_digit_is_a_config_error(work: Path) -> None:
    """``port.isdigit()`` accepts "²" and ``int("²")`` then raised ValueError: every command
    that loads the file (daemon, status, list ...) died with a traceback and exit 1."""
    cfg = work / "c.toml"
    cfg.write_text('[daemon]\nmetrics = "127.0.0.1:\u00b2"\n[[vm]]\nqmp = "/nonexistent.sock"\n')
    with pytest.raises(ConfigError):
        load_config(str(cfg))
    result = run_cli("daemon", "--config", str(cfg), "--once", "--dry-run")
    assert result.returncode == 2
    assert "metrics" in one_line_error(result.stderr)


def test_vm_socket_path_with_a_nul_byte_is_a_config_error(work: Path) -> None:
    """A NUL in ``[[vm]] qmp`` was accepted: the daemon's collection task then raised
    ValueError, which nothing logged (the VM silently never answered), and ``list``
    died with a traceback."""
    cfg = work / "c.toml"
    cfg.write_text('[[vm]]\nname = "a"\nqmp = "/tmp/a\\u0000b.sock"\n')
    with pytest.raises(ConfigError):
        load_config(str(cfg))


def test_two_vm_entries_on_one_socket_are_refused(work: Path) -> None:
    """Two ``[[vm]]`` naming the same QMP socket were managed as two VMs with two floors:
    the entry with the lower floor shrank the VM below the other entry's floor, the other
    raised it back, tick after tick (and the policy took the fight for deflate-on-OOM).
    Reproduced against a simulated VM: with floors 950M and 700M on one socket the VM was
    driven to 700 MiB again and again. ``Config.find`` already compares sockets as files;
    the loader must refuse a second entry for the same VM (or the daemon must merge them)."""
    sock = work / "vm.sock"
    sock.touch()
    cfg = work / "c.toml"
    cfg.write_text(
        f'[[vm]]\nname = "a"\nqmp = "{sock}"\nmin = "950M"\n'
        f'[[vm]]\nname = "b"\nqmp = "unix:{work}/./vm.sock"\nmin = "700M"\n'
    )
    with pytest.raises(ConfigError):
        load_config(str(cfg))


def test_unreadable_meminfo_with_once_is_one_line(work: Path) -> None:
    """``--once`` on a host whose meminfo does not parse printed two lines: the loop's
    ``ERROR: tick N: ...`` log and then ``error: ...`` (DESIGN: a one-line error)."""
    cfg = work / "c.toml"
    cfg.write_text('[host]\nmeminfo = "/dev/null"\n[[vm]]\nqmp = "/nonexistent/x.sock"\n')
    result = run_cli("daemon", "--config", str(cfg), "--once", "--state-dir", str(work / "state"))
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


def test_sigterm_during_once_settle_wait_is_prompt(work: Path) -> None:
    """``--once`` waits one interval (+0.2 s) for fresh statistics with a plain
    ``asyncio.sleep`` that SIGTERM/SIGINT do not interrupt (the daemon replaced their
    handlers with ``stop()``, which only sets an event): with ``interval = 120`` a SIGTERM
    2 s in was ignored for two minutes, and the tick then went on to decide and act, exit 0."""
    sock = work / "vm.sock"
    cfg = work / "c.toml"
    meminfo = work / "meminfo"
    meminfo.write_text("MemTotal: 8388608 kB\nMemAvailable: 4194304 kB\n")
    cfg.write_text(
        f'[daemon]\ninterval = 40\n[host]\nmeminfo = "{meminfo}"\n'
        f"[policy]\nstale_after = 120\n"
        f'[[vm]]\nname = "vm"\nqmp = "{sock}"\n'
    )
    with stale_stats_vm(sock):
        proc = subprocess.Popen(
            balloonctl_argv(
                "daemon", "--config", str(cfg), "--once", "--state-dir", str(work / "state")
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
