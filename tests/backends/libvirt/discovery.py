"""How long a domain started on libvirt waits to be managed by the daemon, shared by the
lifecycle-events test and ``python -m tests.backends.libvirt.discovery`` (the measurement).

The daemon runs as ``balloonctl daemon`` does (:meth:`Daemon.run`, one tick a second here)
against the private libvirtd of fixtures/libvirtd.py, managing only ``bctl-ev*`` domains;
a real guest domain is created (``virsh create``) and the time to the first tick whose plan
has it is measured, then the domain is destroyed.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import random
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from balloonctl.daemon.config import load as load_config
from balloonctl.daemon.loop import RESCAN_S, Daemon, TickReport
from balloonctl.daemon.sdnotify import Notifier
from fixtures.libvirtd import Libvirtd

GiB = 1 << 30
#: The daemon's tick in these runs (seconds).
INTERVAL = 1.0


def write_config(directory: Path, uri: str) -> Path:
    """A daemon config managing ``bctl-ev*`` on ``uri``; a calm 16 GiB host."""
    meminfo = directory / "meminfo"
    meminfo.write_text(f"MemTotal: {16 * GiB // 1024} kB\nMemAvailable: {8 * GiB // 1024} kB\n")
    path = directory / "config.toml"
    path.write_text(
        "[daemon]\n"
        f"interval = {INTERVAL}\n"
        f'state_dir = "{directory / "state"}"\n'
        "[host]\n"
        f'meminfo = "{meminfo}"\n'
        f'psi = "{directory / "no-psi"}"\n'
        "[libvirt]\n"
        f'uri = "{uri}"\n'
        'include = ["bctl-ev*"]\n'
    )
    return path


class Watched:
    """A running Daemon whose ticks are watched for a domain."""

    def __init__(self, config: Path, *, events: bool, rescan_s: float) -> None:
        self.daemon = Daemon(
            load_config(str(config)),
            state_dir=str(config.parent / "state"),
            notifier=Notifier(None),
        )
        self.daemon.use_events = events
        self.daemon.rescan_s = rescan_s
        self.ticks: list[tuple[float, TickReport]] = []
        real = self.daemon.tick

        async def tick(*, settle: bool = False) -> TickReport:
            report = await real(settle=settle)
            self.ticks.append((time.monotonic(), report))
            return report

        self.daemon.tick = tick  # type: ignore[method-assign]

    def managed_since(self, name: str, since: float) -> float | None:
        """When the first tick after ``since`` that decided for ``name`` ended."""
        for when, report in self.ticks:
            plan = report.plan
            if when >= since and plan is not None and any(d.vm == name for d in plan.decisions):
                return when
        return None

    def managed(self, name: str, since: float) -> bool:
        """Whether a tick after ``since`` decided for ``name``."""
        return self.managed_since(name, since) is not None

    async def wait(self, check: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return True
            await asyncio.sleep(0.05)
        return False


def _unmanaged(daemon: Daemon, name: str) -> bool:
    return name not in daemon.links


async def measure(
    libvirtd: Libvirtd,
    directory: Path,
    *,
    events: bool,
    rescan_s: float = RESCAN_S,
    trials: int = 1,
    timeout: float = 60.0,
    between: Callable[[], Awaitable[None]] | None = None,
) -> list[float]:
    """Seconds from ``virsh create`` to the first tick managing the domain, per trial."""
    config = write_config(directory, libvirtd.uri)
    watched = Watched(config, events=events, rescan_s=rescan_s)
    latencies: list[float] = []
    async with watched.daemon as d:
        running = asyncio.create_task(d.run())
        try:
            await watched.wait(lambda: len(watched.ticks) >= 2, 30)
            for trial in range(trials):
                name = f"bctl-ev{trial}"
                t0 = time.monotonic()
                await asyncio.to_thread(libvirtd.boot, name, 512 << 20, False)
                ok = await watched.wait(functools.partial(watched.managed, name, t0), timeout)
                seen = watched.managed_since(name, t0)
                await asyncio.to_thread(libvirtd.virsh, "destroy", name)
                if not ok or seen is None:
                    raise AssertionError(f"{name} not managed within {timeout:g} s")
                latencies.append(seen - t0)
                # Gone from the links again before the next one (the stop event, or a rescan).
                await watched.wait(functools.partial(_unmanaged, d, name), rescan_s + 5)
                if between is not None:
                    await between()
        finally:
            d.stop()
            await running
    return latencies


def main() -> int:
    """Before (rescan only, every RESCAN_S) and after (lifecycle events), N trials each."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args()
    rng = random.Random(18)
    out: dict[str, Any] = {"interval_s": INTERVAL, "rescan_s": RESCAN_S, "trials": args.trials}

    async def jitter() -> None:
        await asyncio.sleep(rng.uniform(0, RESCAN_S))  # a start at any phase of the rescan

    import tempfile  # noqa: PLC0415

    with Libvirtd() as libvirtd:
        for label, events in (("before (rescan only)", False), ("after (events)", True)):
            with tempfile.TemporaryDirectory(prefix="bctl-disc-") as tmp:
                lat = asyncio.run(
                    measure(libvirtd, Path(tmp), events=events, trials=args.trials, between=jitter)
                )
            out[label] = {
                "seconds": [round(x, 2) for x in lat],
                "median": round(statistics.median(lat), 2),
                "max": round(max(lat), 2),
            }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
