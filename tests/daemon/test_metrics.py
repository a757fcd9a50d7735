"""The daemon's Prometheus endpoint, scraped over real HTTP on localhost from a real tick
against a simulated VM (another process, reached over its QMP socket)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from balloonctl.config import Config, DaemonConfig, HostConfig, VmConfig
from balloonctl.daemon import Daemon, TickReport
from balloonctl.errors import UsageError
from balloonctl.sdnotify import Notifier

GIB = 1 << 30


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def sim_socket(tmp_path: Path) -> Iterator[str]:
    """One simulated 1 GiB VM; its QMP socket path."""
    path = str(tmp_path / "vm.sock")
    proc = subprocess.Popen(
        [sys.executable, "-m", "balloonctl", "sim", "--qmp", path, "--memory", "1G"],
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 15
        while not os.path.exists(path):
            assert proc.poll() is None, "the sim died"
            assert time.monotonic() < deadline, "the sim did not come up"
            time.sleep(0.05)
        yield path
    finally:
        proc.terminate()
        proc.wait(10)


def _config(tmp_path: Path, sock: str, port: int) -> Config:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 16000000 kB\nMemAvailable: 1000000 kB\n")
    return Config(
        str(tmp_path / "c.toml"),
        (VmConfig("vm", sock, min=512 << 20),),
        daemon=DaemonConfig(interval=1.0, metrics=f"127.0.0.1:{port}"),
        host=HostConfig(meminfo=str(meminfo), psi=str(tmp_path / "nopsi")),
    )


def _scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def test_metrics_endpoint_reports_the_tick(tmp_path: Path, sim_socket: str) -> None:
    port = _free_port()
    config = _config(tmp_path, sim_socket, port)

    async def scenario() -> tuple[TickReport, dict[str, float]]:
        async with Daemon(config, state_dir=str(tmp_path / "st"), notifier=Notifier(None)) as d:
            report = await d.tick(settle=True)
            assert report.answered == 1
            return report, await asyncio.to_thread(_scrape, port)

    report, values = asyncio.run(scenario())
    assert report.plan is not None
    (decision,) = report.plan.decisions
    # The size the tick decided on (settle=True waited a stats period, during which the
    # guest's own workload may have moved it a little).
    assert values['balloonctl_vm_actual_bytes{vm="vm"}'] == decision.current
    assert values['balloonctl_vm_maximum_bytes{vm="vm"}'] == GIB
    assert values['balloonctl_vm_floor_bytes{vm="vm"}'] == 512 << 20
    assert 0 < values['balloonctl_vm_available_bytes{vm="vm"}'] <= GIB
    assert values["balloonctl_host_available_bytes"] == 1000000 * 1024
    assert values['balloonctl_host_mode{mode="critical"}'] == 0
    assert values['balloonctl_host_mode{mode="pressure"}'] == 1
    assert values["balloonctl_vms_up"] == 1
    assert values["balloonctl_tick_seconds_count"] == 1
    # Under pressure with an idle guest, the tick shrank it: one "give" counted.
    assert values['balloonctl_decisions_total{action="give"}'] == 1
    assert values['balloonctl_vm_target_bytes{vm="vm"}'] == decision.target < decision.current
    # Only this process's own registry: no Python/GC collectors mixed in.
    assert not any(name.startswith(("python_", "process_")) for name in values)


def test_metrics_endpoint_is_closed_with_the_daemon(tmp_path: Path, sim_socket: str) -> None:
    port = _free_port()
    config = _config(tmp_path, sim_socket, port)

    async def scenario() -> None:
        async with Daemon(config, dry_run=True, notifier=Notifier(None)):
            pass

    asyncio.run(scenario())
    with pytest.raises(OSError):
        _scrape(port)


def test_metrics_port_in_use_is_one_usage_error(tmp_path: Path, sim_socket: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = _config(tmp_path, sim_socket, port)

        async def scenario() -> None:
            async with Daemon(config, dry_run=True, notifier=Notifier(None)):
                pass

        with pytest.raises(UsageError, match=rf"metrics endpoint 127.0.0.1:{port}: .*in use"):
            asyncio.run(scenario())
