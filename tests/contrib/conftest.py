"""The real endpoint the contrib/ rules and dashboard are checked against.

One session-wide scrape: the real daemon (:class:`balloonctl.daemon.loop.Daemon`, its
Prometheus endpoint on a free localhost port) ticks against two simulated VMs (``balloonctl
sim`` processes behind real QMP sockets, Linux 6.12 guests on QEMU 10.0, so the guest
reclaim counters are there) under a fake host short of memory, and /metrics is read over
HTTP, exactly as Prometheus reads it. A metric name in a rule or panel that is not in this
text is a name no Prometheus would ever have.
"""

from __future__ import annotations

import asyncio
import socket
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from prometheus_client.parser import text_string_to_metric_families

from balloonctl.daemon.config import Config, DaemonConfig, HostConfig, VmConfig
from balloonctl.daemon.loop import Daemon
from balloonctl.daemon.sdnotify import Notifier
from balloonctl.sim.fleet import SimSpec
from tests.support.sims import SimPool, short_tempdir

GIB = 1 << 30


@dataclass(frozen=True)
class Scrape:
    """The daemon's /metrics read after each of its ticks: the texts, and the sample names
    in any of them (``balloonctl_tick_seconds_bucket``, not the family
    ``balloonctl_tick_seconds``). Several scrapes, because some series exist only in some
    states: ``balloonctl_vm_held`` only while a VM is held."""

    text: str
    samples: frozenset[str]
    families: dict[str, str]  # family name -> type


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _read(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text: str = reply.read().decode()
    return text


@pytest.fixture(scope="session")
def scrape() -> Iterator[Scrape]:
    """The daemon's /metrics after each of its ticks against two simulated VMs on a host
    with 6% of its memory available (pressure: the tick moves them, so targets and decisions
    have series): one tick of a dry run, three of the daemon proper."""
    with short_tempdir("bprom-") as directory:
        pool = SimPool(directory, memory=GIB, rate="2G")
        try:
            sims = pool.start(SimSpec("web"), SimSpec("db"))
            meminfo = directory / "meminfo"
            meminfo.write_text("MemTotal: 16000000 kB\nMemAvailable: 1000000 kB\n")

            def config(port: int) -> Config:
                return Config(
                    str(directory / "c.toml"),
                    tuple(VmConfig(s.name, s.sock, min=512 << 20) for s in sims),
                    daemon=DaemonConfig(interval=1.0, metrics=f"127.0.0.1:{port}"),
                    host=HostConfig(meminfo=str(meminfo), psi=str(directory / "nopsi")),
                )

            async def ticks() -> list[str]:
                texts = []
                # A dry run first: it does not turn the guests' stats polling on, so the
                # policy holds both VMs ("no-stats") and balloonctl_vm_held has series.
                port = _free_port()
                async with Daemon(config(port), dry_run=True, notifier=Notifier(None)) as daemon:
                    await daemon.tick()
                    texts.append(await asyncio.to_thread(_read, port))
                # Then the daemon as it runs: statistics on, both VMs moved (targets,
                # decisions), the guests' reclaim counters read.
                port = _free_port()
                state = str(directory / "state")
                async with Daemon(config(port), state_dir=state, notifier=Notifier(None)) as daemon:
                    for _ in range(3):
                        await daemon.tick(settle=True)
                        texts.append(await asyncio.to_thread(_read, port))
                return texts

            texts = asyncio.run(ticks())
        finally:
            pool.stop_all()
    families = [f for text in texts for f in text_string_to_metric_families(text)]
    yield Scrape(
        "\n".join(texts),
        frozenset(sample.name for family in families for sample in family.samples),
        {family.name: family.type for family in families},
    )
