"""``balloonctl bench daemon``: what one daemon tick costs with N VMs behind real QMP sockets.

The goal: **1000 VMs, a tick under 1 s, the daemon under 20 % of one core.** So the bench
runs the real daemon (:class:`balloonctl.daemon.loop.Daemon`, its own collect/decide/act code
and QMP backend) against N simulated VMs:

* one ``balloonctl sim --qmp-dir DIR --count N`` process serves all the VMs (small guests,
  ``--memory`` each, the workloads cycled over them), so the VMs' CPU is not the daemon's;
* the daemon runs in this process, ticking every ``--interval`` as ``Daemon.run`` does
  (an overrun skips the ticks it missed), and each tick is recorded: its wall latency
  (``TickReport.seconds``), this process's CPU time over the tick's whole period (the tick
  plus the wait for the next one, where the VMs' events are read: all of it is the
  daemon's), the VMs that answered and the targets it sent;
* the daemon logs as ``balloonctl daemon`` does, at INFO (one line per move, and per hold
  whose kind changes), into a file standing in for the journal: formatting and writing
  those lines is part of its CPU;
* the host is a fake ``/proc/meminfo`` (no PSI): balanced while the daemon connects, under
  pressure for the first half of the measured ticks (guests give) and calm for the second
  (guests grow back), so the daemon really moves memory and not only reads statistics.

Connecting is warm-up, reported apart: ticks run until every VM has answered with
statistics (the daemon turns polling on when it connects; the first reading comes one
stats period later), at most ``MAX_WARMUP_S``. Reported: median, p95 and max tick latency,
CPU per tick as a percentage of one core (CPU seconds of the tick's period / the interval:
over 100 % the daemon cannot keep up), the share of a core it took over the run, VMs
answering, and the goal. The sim and the temporary directory are cleaned up on every way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final

from balloonctl.daemon.app import raise_fd_limit
from balloonctl.daemon.config import load
from balloonctl.daemon.loop import Daemon
from balloonctl.daemon.sdnotify import Notifier
from balloonctl.errors import PeerError, UsageError
from balloonctl.sim.fleet import SimFleet, SimProcess, SimSpec
from balloonctl.sim.host import SimHost, daemon_config
from balloonctl.sim.qemu_versions import DEFAULT_QEMU_VERSION, qemu_profile
from balloonctl.units import format_size

#: The goal this bench measures against.
GOAL_VMS: Final = 1000
GOAL_TICK_S: Final = 1.0
GOAL_CPU_PERCENT: Final = 20.0
GOAL_TEXT: Final = "goal: 1000 VMs, tick < 1 s, daemon < 20% of one core"

#: The sim's workloads, cycled over the VMs (vm0 idle, vm1 steady, ...).
WORKLOADS: Final = ("idle", "steady", "spiky", "cache", "leak")
#: Longest warm-up (seconds): connecting and the first statistics of every VM.
MAX_WARMUP_S: Final = 60.0
#: Fake host: MemAvailable as a % of MemTotal in each phase (policy defaults: pressure
#: below 20 %, calm above 30 %; 25 % is in between, where nothing moves).
HOST_AVAILABLE_PERCENT: Final = {"warmup": 25, "pressure": 10, "calm": 60}


@dataclass(frozen=True)
class DaemonBenchConfig:
    """What to measure."""

    vms: int = 100
    ticks: int = 30
    interval: float = 1.0
    memory: int = 256 << 20
    #: Seconds to wait for the sim's sockets (1000 VMs take about 10 s on 2 cores).
    start_timeout: float = 120.0
    #: ``follow``: the host's MemAvailable gains what the guests give and loses what they
    #: take back, as a real host's does, so moves stop once the host is where the policy
    #: wants it (the daemon's everyday load: a few ticks of moves, then mostly statistics).
    #: ``static``: it stays at the phase's value whatever the guests do, so every giver
    #: gives a step on every tick (the worst case: hundreds of targets a tick).
    host: str = "follow"
    #: The QEMU the simulated VMs answer as (``balloonctl sim --qemu-version``).
    qemu_version: str = DEFAULT_QEMU_VERSION


# --------------------------------------------------------------------------------------------
# The bench
# --------------------------------------------------------------------------------------------


@dataclass
class _Run:
    """What :func:`_measure` saw."""

    warmup: list[TickSample]
    ticks: list[TickSample]
    #: Every VM answered with statistics before the warm-up's time ran out.
    ready: bool
    sim_cpu_percent: float | None
    #: Share of the measured time (%) each process was runnable but waiting for a CPU
    #: (/proc/PID/schedstat): other work on the machine slowing the bench down.
    daemon_wait_percent: float | None
    sim_wait_percent: float | None


@dataclass
class TickSample:
    """One tick of the daemon."""

    tick: int
    phase: str
    mode: str | None
    seconds: float
    period_s: float
    cpu_s: float
    answered: int
    sent: int
    interval: float

    @property
    def cpu_percent(self) -> float:
        """This process's CPU over the tick's period per interval, % of one core. Above 100
        the daemon cannot keep up: its ticks overrun and it ticks less often than asked."""
        return 100.0 * self.cpu_s / self.interval

    def to_json(self) -> dict[str, Any]:
        """The tick's entry in ``--json`` output."""
        return {
            "tick": self.tick,
            "phase": self.phase,
            "mode": self.mode,
            "seconds": round(self.seconds, 4),
            "period_s": round(self.period_s, 4),
            "cpu_s": round(self.cpu_s, 4),
            "cpu_percent": round(self.cpu_percent, 1),
            "answered": self.answered,
            "sent": self.sent,
        }


def _validate(config: DaemonBenchConfig) -> None:
    if config.host not in ("follow", "static"):
        raise UsageError(f"--host must be follow or static, not {config.host!r}")
    qemu_profile(config.qemu_version)  # a version the sim answers as, or UsageError
    if config.vms < 1:
        raise UsageError("--vms must be at least 1")
    if config.ticks < 2:
        raise UsageError("--ticks must be at least 2 (half under pressure, half calm)")
    if not 0.1 <= config.interval <= 60:
        raise UsageError("--interval must be from 0.1 to 60 seconds")
    if config.memory < 64 << 20 or config.memory % 4096:
        raise UsageError("--memory must be at least 64M, in whole 4 KiB pages")


@contextlib.contextmanager
def _daemon_log(path: str) -> Iterator[None]:
    """The daemon's logger at INFO into ``path``, as ``balloonctl daemon`` logs to stderr
    (the journal, under systemd): the same level and line format, one write per line."""
    logger = logging.getLogger("balloonctl.daemon")
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("balloonctl: %(levelname)s: %(message)s"))
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # not onto the terminal the report goes to
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()
        logger.setLevel(level)
        logger.propagate = propagate


def _count_lines(path: str) -> int:
    try:
        with open(path, "rb") as fh:
            return sum(1 for _ in fh)
    except OSError:
        return 0


def run(config: DaemonBenchConfig) -> dict[str, Any]:
    """Start the sim, run the daemon for warm-up + ``ticks`` ticks; the report."""
    _validate(config)
    raise_fd_limit()  # one socket per VM, as `balloonctl daemon` does
    tmp = tempfile.mkdtemp(prefix="balloonctl-bench-daemon-")
    try:
        qmp_dir = os.path.join(tmp, "qmp")
        os.mkdir(qmp_dir)
        with SimFleet(qmp_dir) as fleet:
            sim = fleet.spawn(
                SimSpec(
                    name="sim",
                    count=config.vms,
                    memory=config.memory,
                    workloads=WORKLOADS,
                    qemu_version=config.qemu_version,
                )
            )
            # Sockets only: connecting and the first statistics are the warm-up's.
            sim_start_s = asyncio.run(fleet.wait_ready([sim], timeout=config.start_timeout))
            sockets = [(f"vm{i}", path) for i, path in enumerate(sim.sockets)]
            path = os.path.join(tmp, "config.toml")
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(daemon_config(sockets, interval=config.interval, directory=tmp))
            # A host twice the guests' size: under pressure every giver gives a full step
            # each tick, and when calm there is room for all of them to grow back.
            total = 2 * config.vms * config.memory
            daemon_log = os.path.join(tmp, "daemon.log")
            with _daemon_log(daemon_log):
                run_ = asyncio.run(_measure(config, path, tmp, total, sim))
        return report(config, sim_start_s, run_, log_lines=_count_lines(daemon_log))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


async def _measure(
    config: DaemonBenchConfig,
    config_path: str,
    tmp: str,
    total: int,
    sim: SimProcess,
) -> _Run:
    cfg = load(config_path)
    host = SimHost(total, {vm.name: config.memory for vm in cfg.vms}, cfg.host.meminfo)
    warmup: list[TickSample] = []
    measured: list[TickSample] = []
    sim_cpu: float | None = None
    waits: tuple[float | None, float | None] = (None, None)
    measured_t0 = 0.0
    async with Daemon(cfg, notifier=Notifier(None), state_dir=os.path.join(tmp, "state")) as d:
        interval = config.interval
        t0 = next_tick = time.monotonic()
        since = int(time.time()) + 1  # last-update is in whole seconds: from the next one
        cpu, mark = time.process_time(), t0
        warm = ready = False
        while len(measured) < config.ticks:
            if not sim.alive:
                raise PeerError(f"the sim exited ({sim.proc.returncode}) during the bench")
            if not warm:
                ready = bool(warmup) and _ready(d, config.vms, since)
                warm = ready or time.monotonic() - t0 > MAX_WARMUP_S
            if warm and not measured:
                sim_cpu, measured_t0 = _proc_cpu(sim.pid), time.monotonic()
                waits = (_run_delay(os.getpid()), _run_delay(sim.pid))
            if warm:
                phase = "pressure" if len(measured) < config.ticks // 2 else "calm"
            else:
                phase = "warmup"
            if config.host == "follow":
                # What the guests have given up (their RAM less their size now) is the host's.
                for link in d.links.values():
                    link.refresh_actual()  # the sizes now, not as of the last tick
                host.observe({name: link.actual for name, link in d.links.items()})
            # ``static``: no size is ever observed, so the phase's value is all there is.
            host.leave(HOST_AVAILABLE_PERCENT[phase], at_full_size=True)
            host.write()
            done = await d.tick()
            sample = TickSample(
                tick=done.tick,
                phase=phase,
                mode=None if done.plan is None else done.plan.mode.value,
                seconds=done.seconds,
                period_s=0.0,
                cpu_s=0.0,
                answered=done.answered,
                sent=done.sent,
                interval=interval,
            )
            (warmup if phase == "warmup" else measured).append(sample)
            next_tick += interval
            now = time.monotonic()
            if next_tick < now:  # an overrun: skip the ticks that were missed, as run() does
                next_tick = now + interval - (now - next_tick) % interval
            await asyncio.sleep(next_tick - now)
            # The period's CPU: the tick and the wait after it (the VMs' events are read then).
            cpu_now, mark_now = time.process_time(), time.monotonic()
            sample.cpu_s, sample.period_s = cpu_now - cpu, mark_now - mark
            cpu, mark = cpu_now, mark_now
    elapsed = time.monotonic() - measured_t0

    def share(before: float | None, after: float | None) -> float | None:
        if before is None or after is None or not measured:
            return None
        return 100.0 * (after - before) / elapsed

    return _Run(
        warmup,
        measured,
        ready,
        share(sim_cpu, _proc_cpu(sim.pid)),
        share(waits[0], _run_delay(os.getpid())),
        share(waits[1], _run_delay(sim.pid)),
    )


def _run_delay(pid: int) -> float | None:
    """Seconds process ``pid``'s main thread has waited on a run queue (schedstat)."""
    try:
        with open(f"/proc/{pid}/schedstat", encoding="ascii") as fh:
            return int(fh.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


def _proc_cpu(pid: int) -> float | None:
    """CPU seconds (user + system) process ``pid`` has used, from /proc; None elsewhere."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _ready(d: Daemon, vms: int, since: float) -> bool:
    """Every VM connected and with a statistics reading taken after ``since`` (wall clock)."""
    links = list(d.links.values())
    return len(links) == vms and all(
        link.up and link.stats is not None and link.stats.last_update >= since for link in links
    )


def _mean_or_none(values: Sequence[float]) -> float | None:
    return round(statistics.fmean(values), 1) if values else None


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    # Linear interpolation between closest ranks (numpy's default).
    pos = (len(ordered) - 1) * q
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _spread(values: Sequence[float], digits: int) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), digits),
        "p95": round(_quantile(values, 0.95), digits),
        "max": round(max(values), digits),
        "mean": round(statistics.fmean(values), digits),
    }


def report(
    config: DaemonBenchConfig, sim_start_s: float, run_: _Run, *, log_lines: int
) -> dict[str, Any]:
    """The JSON report."""
    warmup, ticks, ready = run_.warmup, run_.ticks, run_.ready
    connect_s = sum(t.period_s for t in warmup)
    wall = sum(t.period_s for t in ticks)
    tick_s = _spread([t.seconds for t in ticks], 4)
    cpu_pct = _spread([t.cpu_percent for t in ticks], 1)
    answered_min = min(t.answered for t in ticks)
    checks = {
        "vms": config.vms >= GOAL_VMS,
        "tick": tick_s["p95"] < GOAL_TICK_S,
        "cpu": cpu_pct["mean"] < GOAL_CPU_PERCENT,
        "answering": answered_min == config.vms,
    }
    return {
        "benchmark": "daemon",
        "vms": config.vms,
        "ticks": config.ticks,
        "interval_s": config.interval,
        "memory_bytes": config.memory,
        "host": config.host,
        "qemu_version": config.qemu_version,
        "workloads": list(WORKLOADS),
        "cpus": os.cpu_count(),
        # The machine's 1-minute load average at the end: other work competes for the CPUs.
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "sim_start_s": round(sim_start_s, 3),
        # The sim's own CPU over the measured ticks (% of one core): near 100 % it is the
        # bottleneck, and its slow answers show up in the daemon's tick latency.
        "sim_cpu_percent": _round(run_.sim_cpu_percent),
        # Time runnable but waiting for a CPU, % of the measured time (None without
        # /proc/PID/schedstat): high values mean the machine, not the code, set the pace.
        "cpu_wait_percent": {
            "daemon": _round(run_.daemon_wait_percent),
            "sim": _round(run_.sim_wait_percent),
        },
        "warmup": {
            "ticks": len(warmup),
            # From the first tick to the end of warm-up: every VM connected, polling, read
            # (all_ready false: warm-up gave up after MAX_WARMUP_S without that).
            "connect_s": round(connect_s, 3),
            "first_tick_s": round(warmup[0].seconds, 4) if warmup else None,
            "first_tick_cpu_s": round(warmup[0].cpu_s, 4) if warmup else None,
            "all_ready": ready,
            # The last warm-up tick, if every VM answered and no target was sent (the host is
            # balanced then): what reading N VMs' statistics alone costs.
            "stats_only": (
                warmup[-1].to_json()
                if warmup and warmup[-1].answered == config.vms and warmup[-1].sent == 0
                else None
            ),
            "samples": [t.to_json() for t in warmup],
        },
        "tick_s": tick_s,
        "cpu_percent": cpu_pct,
        # Ticks that set no target (the everyday load: statistics read, nothing moves) apart
        # from ticks that moved guests (hundreds of QMP `balloon` commands at 1000 VMs).
        "cpu_percent_quiet": _mean_or_none([t.cpu_percent for t in ticks if t.sent == 0]),
        "cpu_percent_moving": _mean_or_none([t.cpu_percent for t in ticks if t.sent > 0]),
        "quiet_ticks": sum(1 for t in ticks if t.sent == 0),
        "cpu_s_per_tick": _spread([t.cpu_s for t in ticks], 4),
        # Over the whole measured run: the share of a core the daemon really took, and how
        # often it really ticked (more than the interval when ticks overran).
        "core_percent": round(100.0 * sum(t.cpu_s for t in ticks) / wall, 1),
        "mean_period_s": round(wall / len(ticks), 3),
        "answered": {"min": answered_min, "max": max(t.answered for t in ticks)},
        "sent": {
            "total": sum(t.sent for t in ticks),
            "pressure": sum(t.sent for t in ticks if t.phase == "pressure"),
            "calm": sum(t.sent for t in ticks if t.phase == "calm"),
        },
        "samples": [t.to_json() for t in ticks],
        # Lines the daemon logged at INFO over the whole run, warm-up included.
        "log_lines": log_lines,
        "goal": {
            "text": GOAL_TEXT,
            "vms": GOAL_VMS,
            "tick_s": GOAL_TICK_S,
            "cpu_percent": GOAL_CPU_PERCENT,
            # Tick latency is judged on its p95, CPU on its mean over the measured ticks.
            "checks": checks,
            "met": all(checks.values()),
        },
    }


def format_report(r: dict[str, Any]) -> str:
    """A table a person reads."""
    w = r["warmup"]
    lines = [
        f"daemon: {r['vms']} VMs ({format_size(r['memory_bytes'])} each, "
        f"{'/'.join(r['workloads'])}) in one sim process; {r['ticks']} ticks every "
        f"{r['interval_s']:g} s (half host pressure, half calm; host {r['host']}); "
        f"{r['cpus']} CPUs, "
        f"load average {r['loadavg_1m']:g}",
        f"sim up in {r['sim_start_s']:.1f} s"
        + ("" if r["sim_cpu_percent"] is None else f", at {r['sim_cpu_percent']:.0f}% of a core")
        + f"; warm-up {w['ticks']} ticks, "
        f"{w['connect_s']:.2f} s until every VM answered with stats"
        + ("" if w["all_ready"] else " (NOT all of them)")
        + f" (first tick {w['first_tick_s']:.3f} s, {w['first_tick_cpu_s']:.3f} s CPU)",
        f"{'':<22}{'median':>10}{'p95':>10}{'max':>10}{'mean':>10}",
    ]
    t, c = r["tick_s"], r["cpu_percent"]
    lines.append(
        f"{'tick latency (s)':<22}{t['median']:>10.3f}{t['p95']:>10.3f}{t['max']:>10.3f}"
        f"{t['mean']:>10.3f}"
    )
    lines.append(
        f"{'CPU/tick (% of intvl)':<22}{c['median']:>10.1f}{c['p95']:>10.1f}{c['max']:>10.1f}"
        f"{c['mean']:>10.1f}"
    )
    quiet, moving = r["cpu_percent_quiet"], r["cpu_percent_moving"]
    lines.append(
        f"CPU/tick mean: {'-' if quiet is None else f'{quiet:.1f}%'} on the "
        f"{r['quiet_ticks']} ticks that moved nothing, "
        f"{'-' if moving is None else f'{moving:.1f}%'} on the "
        f"{r['ticks'] - r['quiet_ticks']} that set targets"
    )
    only = w["stats_only"]
    if only is not None:
        lines.append(
            f"a tick that only reads stats (the last of the warm-up, nothing sent): "
            f"{only['seconds']:.3f} s, {only['cpu_s']:.3f} s CPU ({only['cpu_percent']:.1f}%)"
        )
    lines.append(
        f"over the run: the daemon took {r['core_percent']:.1f}% of a core, ticking every "
        f"{r['mean_period_s']:.2f} s on average (interval {r['interval_s']:g} s)"
    )
    a, s = r["answered"], r["sent"]
    lines.append(
        f"VMs answering: {a['min']}..{a['max']} of {r['vms']}; targets sent: {s['total']} "
        f"({s['pressure']} under pressure, {s['calm']} calm)"
    )
    lines.append(
        f"the daemon logged {r['log_lines']} lines at INFO over the run (to a file, as to "
        "the journal)"
    )
    wait = r["cpu_wait_percent"]
    if wait["daemon"] is not None and wait["sim"] is not None:
        lines.append(
            f"waiting for a CPU (other load on the machine): daemon {wait['daemon']:.0f}%, "
            f"sim {wait['sim']:.0f}% of the time"
        )
    g = r["goal"]
    ok = g["checks"]
    parts = [
        f"{r['vms']} VMs" + ("" if ok["vms"] else f" (< {g['vms']})"),
        f"tick p95 {t['p95']:.3f} s " + ("ok" if ok["tick"] else "too slow"),
        f"CPU/tick mean {c['mean']:.1f}% of the interval " + ("ok" if ok["cpu"] else "too much"),
    ]
    if not ok["answering"]:
        parts.append("not every VM answered")
    lines.append(f"{g['text']}: {'met' if g['met'] else 'NOT met'} ({', '.join(parts)})")
    return "\n".join(lines) + "\n"


__all__ = ["DaemonBenchConfig", "format_report", "run"]
