"""The daemon's Prometheus endpoint, scraped over real HTTP on localhost from a real tick
against a simulated VM (another process, reached over its QMP socket)."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from balloonctl.daemon.config import Config, DaemonConfig, HostConfig, VmConfig
from balloonctl.daemon.loop import Daemon, TickReport
from balloonctl.daemon.metrics import GUEST_COUNTERS, Metrics
from balloonctl.daemon.policy import VmState
from balloonctl.daemon.sdnotify import Notifier
from balloonctl.errors import UsageError
from balloonctl.virtio.spec import BYTE_STATS, EXTENDED_STAT_NAMES

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


def _scrape_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text: str = reply.read().decode()
    return text


def _scrape(port: int) -> dict[str, float]:
    text = _scrape_text(port)
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
    # The simulated guest is a Linux 6.12 on a QEMU that names tags 10-15: its reclaim
    # counters are there, as the guest reported them (an idle 1 GiB guest killed nothing).
    assert values['balloonctl_vm_oom_kills_total{vm="vm"}'] == 0
    for name in GUEST_COUNTERS.values():
        assert f'{name[0]}_total{{vm="vm"}}' in values
    assert values['balloonctl_vm_async_scanned_bytes_total{vm="vm"}'] % 4096 == 0


def _vm(name: str, stats: dict[str, int] | None) -> VmState:
    return VmState(
        name=name,
        actual=GIB,
        maximum=2 * GIB,
        floor=GIB // 2,
        shares=1000,
        stats=stats,
        stats_age=1.0,
        deflate_on_oom=True,
    )


def test_guest_reclaim_counters_per_vm_only_where_reported() -> None:
    port = _free_port()
    metrics = Metrics(f"127.0.0.1:{port}")
    try:
        new = {
            "available-memory": GIB // 2,
            "oom-kills": 2,
            "alloc-stalls": 30,
            "async-scans": 10 << 20,
            "direct-scans": 3 << 20,
            "async-reclaims": 9 << 20,
            "direct-reclaims": 2 << 20,
        }
        old = {"available-memory": GIB // 4}  # QEMU 7.2, or a guest before Linux 6.12
        metrics.observe(None, None, [_vm("new", new), _vm("old", old)], 2)
        text = _scrape_text(port)
        values = _scrape(port)
        # Counters, named by Prometheus' conventions: _total, bytes as _bytes_total.
        for family in ("balloonctl_vm_oom_kills", "balloonctl_vm_direct_reclaimed_bytes"):
            # (the family is written with or without _total, by prometheus_client's version)
            assert re.search(rf"^# TYPE {family}(_total)? counter$", text, re.M), text
        assert values['balloonctl_vm_oom_kills_total{vm="new"}'] == 2
        assert values['balloonctl_vm_alloc_stalls_total{vm="new"}'] == 30
        assert values['balloonctl_vm_async_scanned_bytes_total{vm="new"}'] == 10 << 20
        assert values['balloonctl_vm_direct_scanned_bytes_total{vm="new"}'] == 3 << 20
        assert values['balloonctl_vm_async_reclaimed_bytes_total{vm="new"}'] == 9 << 20
        assert values['balloonctl_vm_direct_reclaimed_bytes_total{vm="new"}'] == 2 << 20
        # The VM without them has its other series and none of these: no made-up zeros.
        assert values['balloonctl_vm_available_bytes{vm="old"}'] == GIB // 4
        assert not any('vm="old"' in key and "_total" in key for key in values)

        # A tick without a reading keeps the last one; a new reading replaces it.
        metrics.observe(None, None, [_vm("new", None), _vm("old", old)], 2)
        assert _scrape(port)['balloonctl_vm_oom_kills_total{vm="new"}'] == 2
        metrics.observe(None, None, [_vm("new", {**new, "oom-kills": 3}), _vm("old", old)], 2)
        assert _scrape(port)['balloonctl_vm_oom_kills_total{vm="new"}'] == 3
        # A VM no longer managed takes its series with it.
        metrics.observe(None, None, [_vm("old", old)], 1)
        assert not any('vm="new"' in key for key in _scrape(port))
    finally:
        metrics.close()


def test_every_extended_stat_has_a_counter_with_its_unit() -> None:
    assert set(GUEST_COUNTERS) == set(EXTENDED_STAT_NAMES)
    for stat, (name, _) in GUEST_COUNTERS.items():
        assert name.startswith("balloonctl_vm_") and not name.endswith("_total")
        assert name.endswith("_bytes") == (stat in BYTE_STATS), (stat, name)


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
