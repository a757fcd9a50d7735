"""``balloonctl demo``: a scripted tour on simulated VMs, as a user would type it.

Three seed-sg VMs are started as ``balloonctl sim`` processes, 2 GiB each, each running its
own workload: ``web`` (steady, a loaded server), ``batch`` (spiky, a batch job) and ``idle``.
The tour runs the CLI's own code against their QMP sockets: list, features (SG acked),
set --wait both ways with progress, status, stats under the workload, and a live
renegotiation that turns SG off and on again.

Then the auto-balloon daemon takes over: a fourth VM, ``leak`` (a program leaking memory),
boots, and the daemon's own code (:class:`balloonctl.daemon.loop.Daemon`, one ``tick()`` a
second, in this process) manages all four against a simulated host, a fake /proc/meminfo
of a 12 GiB machine whose MemAvailable follows the guests' sizes. A job on the host puts
it under pressure, so guests with memory to spare (the idle one first) give it back; the
job ends, the host is calm and they grow back; a guest under its own pressure (leak, and
batch in its spikes) gets memory whatever the host's mode. Every target the daemon sets
is printed as it happens, with a line per tick (host mode, each VM's size). It ends by
itself.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Final, TextIO

from balloonctl.cli import vm_commands
from balloonctl.daemon.config import Config
from balloonctl.daemon.config import load as load_config
from balloonctl.daemon.loop import Daemon
from balloonctl.daemon.sdnotify import Notifier
from balloonctl.errors import BalloonError
from balloonctl.sim.fleet import SimFleet, SimSpec
from balloonctl.sim.host import SimHost, daemon_config
from balloonctl.sim.qemu_versions import DEFAULT_QEMU_VERSION
from balloonctl.units import format_size

GiB = 1 << 30

#: The tour's VMs (the sim's defaults otherwise: 2 GiB, seed-sg); the daemon part boots
#: ``leak`` too.
TOUR_VMS: Final = (
    SimSpec("web", workload="steady"),
    SimSpec("batch", workload="spiky", time_scale=2.0),
    SimSpec("idle", workload="idle"),
)
#: Its anon memory grows by 5 % of RAM a second (the workload's 1 %, five times as fast):
#: short of memory about a dozen seconds into the daemon part.
LEAK_VM: Final = SimSpec("leak", workload="leak", time_scale=5.0)
#: Each VM's RAM (the sim's default): what it holds until the daemon knows its size.
VM_RAM: Final = 2 * GiB
#: Seconds the VMs get to boot (their guest drivers up).
BOOT_TIMEOUT_S: Final = 30.0
#: The simulated host: MemTotal, and its MemAvailable (% of MemTotal) when the daemon
#: starts, under the job's pressure, and when the job has ended (all guests at full size).
HOST_TOTAL: Final = 12 * GiB
HOST_START_PERCENT: Final = 25
HOST_PRESSURE_PERCENT: Final = 10
#: Ticks (one a second) of the daemon part, after it has connected: half with the host
#: under pressure, half calm.
DAEMON_TICKS: Final = 24
#: Most ticks spent connecting (until every VM answered with statistics).
MAX_WARMUP_TICKS: Final = 8


class Demo:
    """Prints each step as the command a user would type, then its output."""

    def __init__(self, qmp_dir: str, out: TextIO) -> None:
        self.dir = qmp_dir
        self.out = out

    def sock(self, name: str) -> str:
        """A VM's socket path."""
        return os.path.join(self.dir, f"{name}.sock")

    def say(self, text: str) -> None:
        """Narration."""
        self.out.write(f"\n# {text}\n")
        self.out.flush()

    def command(self, line: str) -> None:
        """The command being shown, with the temp dir written as $DIR."""
        self.out.write(f"$ balloonctl {line}\n")
        self.out.flush()

    def show(self, text: str) -> None:
        """A command's output."""
        self.out.write(text)
        self.out.flush()


async def driver_ok(path: str) -> bool:
    """Whether the VM's guest driver is up (DRIVER_OK): the tour's first command must find
    a booted guest, as a user would."""
    try:
        report, _ = await vm_commands.features(path)
    except BalloonError:
        return False
    return bool(report["driver_ok"])


async def tour(demo: Demo, duration: float) -> None:
    """The scripted scenario."""
    web, batch = demo.sock("web"), demo.sock("batch")
    demo.say(
        "Three simulated VMs (seed-sg profile, 2 GiB each; workloads: web steady, batch "
        "spiky, idle idle) are serving QMP in $DIR."
    )
    demo.command("list --qmp-dir $DIR")
    demo.show(vm_commands.render_list(await vm_commands.list_vms(Config(None), demo.dir)))

    demo.say("The balloon's feature bits: the seed's VIRTIO_BALLOON_F_SG (bit 3) is acked.")
    demo.command("features $DIR/web.sock")
    report, names = await vm_commands.features(web)
    demo.show(vm_commands.render_features(report, names))

    demo.say("Inflate: give 1 GiB of web's 2 GiB back to the host, and wait for it.")
    demo.command("set $DIR/web.sock 1G --wait")
    result = await vm_commands.set_target(web, GiB, wait=True, timeout=60, config=Config(None))
    demo.show(_set_line(result))
    demo.command("status $DIR/web.sock")
    demo.show(vm_commands.render_status(await vm_commands.status(web)))

    demo.say("Stats move under batch's spiky workload (every new reading, 1 s apart).")
    demo.command("stats $DIR/batch.sock --period 1 --watch")
    await _watch(demo, batch, duration)

    demo.say("Deflate: web gets its memory back.")
    demo.command("set $DIR/web.sock 2G --wait")
    demo.show(
        _set_line(
            await vm_commands.set_target(web, 2 * GiB, wait=True, timeout=60, config=Config(None))
        )
    )

    demo.say(
        "Renegotiate live: replug web's balloon without SG; the guest falls back to 256-PFN arrays."
    )
    demo.command("negotiate $DIR/web.sock --disable sg --yes")
    after = await vm_commands.negotiate(web, [], ["sg"])
    demo.show(vm_commands.render_features(after, names))
    demo.command("set $DIR/web.sock 1G --wait")
    demo.show(
        _set_line(
            await vm_commands.set_target(web, GiB, wait=True, timeout=60, config=Config(None))
        )
    )
    demo.command("negotiate $DIR/web.sock --enable sg --yes")
    after = await vm_commands.negotiate(web, ["sg"], [])
    demo.show(f"sg offered: {after['sg']['offered']}, acked: {after['sg']['acked']}\n")


def _set_line(result: vm_commands.SetResult) -> str:
    state = "reached" if result.reached else "NOT reached"
    return (
        f"{result.vm.rsplit('/', 1)[-1]}: target {format_size(result.target)}, actual "
        f"{format_size(result.actual)} ({state} after {result.elapsed:.2f} s)\n"
    )


async def _watch(demo: Demo, vm: str, duration: float) -> None:
    end = time.monotonic() + duration
    demo.show(f"{'time':>6}  {'free':>10}  {'available':>10}  {'disk-caches':>11}\n")
    t0 = time.monotonic()
    stream = vm_commands.watch_stats(vm, 1, notice=demo.out)
    async for report in stream:
        s = report["stats"]
        demo.show(
            f"{time.monotonic() - t0:5.1f}s  {format_size(s['free-memory']):>10}  "
            f"{format_size(s['available-memory']):>10}  "
            f"{format_size(s['disk-caches']):>11}\n"
        )
        if time.monotonic() >= end:
            break
    await stream.aclose()


def _gib(size: int | None) -> str:
    return "    -   " if size is None else f"{size / GiB:5.2f} GiB"


class Autoballoon:
    """The daemon part: a simulated host around an in-process :class:`Daemon`."""

    def __init__(self, demo: Demo, names: Sequence[str], config_path: str) -> None:
        self.demo = demo
        self.names = list(names)
        config = load_config(config_path)
        #: What the host's own programs use is set per phase; its MemAvailable then follows
        #: the guests' sizes.
        self.host = SimHost(HOST_TOTAL, dict.fromkeys(self.names, VM_RAM), config.host.meminfo)
        self.daemon = Daemon(config, notifier=Notifier(None))
        #: Each VM's size at every tick, as the daemon knew it.
        self.history: dict[str, list[int]] = {name: [] for name in self.names}

    def sizes(self) -> dict[str, int | None]:
        """Each VM's size as the daemon knows it (None before it connected)."""
        out: dict[str, int | None] = {}
        for name in self.names:
            link = self.daemon.links.get(name)
            if link is not None:
                link.refresh_actual()  # the newest BALLOON_CHANGE, not only the last tick's
            out[name] = None if link is None else link.actual
        return out

    def observe(self) -> None:
        """The host sees the guests' sizes now (their full RAM until the daemon knows)."""
        self.host.observe(self.sizes())

    def ready(self, since: float) -> bool:
        """Every VM connected, with a statistics reading taken after ``since`` (wall clock:
        a reading from before, e.g. from when web's balloon was replugged, is out of date)."""
        links = self.daemon.links
        return len(links) == len(self.names) and all(
            link.up and link.stats is not None and link.stats.last_update >= since
            for link in links.values()
        )

    async def tick(self) -> None:
        """Write the host's meminfo, tick the daemon, print what it did."""
        self.observe()
        self.host.write()
        report = await self.daemon.tick()
        plan = report.plan
        mode = "-" if plan is None else plan.mode.value
        host = report.host
        avail = (
            "host ?"
            if host is None
            else f"host {_gib(host.available)} avail ({100 * host.available / host.total:4.1f}%)"
        )
        sizes = self.sizes()
        vms = "  ".join(f"{name} {_gib(size)}" for name, size in sizes.items())
        self.demo.show(f"tick {report.tick:>2} {mode:<9} {avail}   {vms}\n")
        for name, size in sizes.items():
            if size is not None:
                self.history[name].append(size)
        for decision in () if plan is None else plan.decisions:
            if decision.send:
                self.demo.show(
                    f"    {decision.vm}: {format_size(decision.current)} -> "
                    f"{format_size(decision.target)}: {decision.reason}\n"
                )

    async def run(self, ticks: int) -> None:
        """Connect, then ``ticks`` ticks: half under pressure, half calm."""
        demo = self.demo
        async with self.daemon:
            # QEMU's last-update is in whole seconds: a reading from the next one on.
            start, since = time.monotonic(), int(time.time()) + 1
            done = 0

            async def one() -> None:
                nonlocal done
                await self.tick()
                done += 1
                await asyncio.sleep(max(0.0, start + done - time.monotonic()))

            for _ in range(MAX_WARMUP_TICKS):
                # Balanced while it connects, whatever the guests' sizes: nothing to do yet.
                self.observe()
                self.host.leave(HOST_START_PERCENT)
                await one()
                if self.ready(since):
                    break
            pressure = (ticks + 1) // 2
            self.observe()
            job = self.host.leave(HOST_PRESSURE_PERCENT)
            demo.say(
                f"A job on the host starts and takes {format_size(job)}: host MemAvailable "
                f"falls to {HOST_PRESSURE_PERCENT}% of {format_size(HOST_TOTAL)}, under the 20% "
                "pressure line. Guests with memory to spare give it back (idle ones first, a step "
                "of at most 5% of a VM a tick) until the host is out of pressure; a guest "
                "short of memory itself still gets some."
            )
            for _ in range(pressure):
                await one()
            demo.say(
                "The host's job ends: the host is calm (more than 30% available), and the "
                "guests grow back toward their 2 GiB out of what lies above 30%."
            )
            self.host.use = 0
            for _ in range(ticks - pressure):
                await one()
        self.summary()

    def summary(self) -> None:
        """Where each VM started, its smallest and largest size, where it ended."""
        self.demo.say("What moved (sizes as the daemon saw them, tick by tick):")
        for name, seen in self.history.items():
            if not seen:
                self.demo.show(f"{name:<6} never answered\n")
                continue
            self.demo.show(
                f"{name:<6} started {_gib(seen[0])}, smallest {_gib(min(seen))}, "
                f"largest {_gib(max(seen))}, ended {_gib(seen[-1])}\n"
            )


async def autoballoon(demo: Demo, names: Sequence[str], ticks: int) -> None:
    """The daemon part of the tour."""
    path = os.path.join(demo.dir, "autoballoon.toml")
    sockets = [(name, demo.sock(name)) for name in names]
    text = daemon_config(sockets, interval=1.0, directory=demo.dir)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    demo.say(
        "The auto-balloon daemon takes over (`balloonctl daemon`: read the host's and each "
        "guest's memory, decide, set targets; one tick a second). A fourth VM, leak, has "
        "just booted: a program in it leaks 5% of its RAM a second. The host is simulated "
        f"too: {format_size(HOST_TOTAL)}, its /proc/meminfo a file the demo writes; "
        f"{HOST_START_PERCENT}% of it is available now (no pressure, nothing to do)."
    )
    demo.out.write("$ cat $DIR/autoballoon.toml\n")
    demo.show(text.replace(demo.dir, "$DIR"))
    demo.command("daemon --config $DIR/autoballoon.toml")
    await Autoballoon(demo, names, path).run(ticks)


def run(
    duration: float,
    out: TextIO = sys.stdout,
    *,
    daemon_ticks: int = DAEMON_TICKS,
    qemu_version: str = DEFAULT_QEMU_VERSION,
) -> int:
    """Start the VMs (answering as QEMU ``qemu_version``), run the tour and the daemon
    part, stop the VMs; 0 when every step worked."""
    tour_vms = [replace(spec, qemu_version=qemu_version) for spec in TOUR_VMS]
    leak_vm = replace(LEAK_VM, qemu_version=qemu_version)
    # The fleet stops every VM on the way out, before their directory goes.
    with (
        tempfile.TemporaryDirectory(prefix="balloonctl-demo-") as qmp_dir,
        SimFleet(qmp_dir) as fleet,
    ):

        async def main() -> None:
            await fleet.start(*tour_vms, timeout=BOOT_TIMEOUT_S, ready=driver_ok)
            demo = Demo(qmp_dir, out)
            await tour(demo, duration)
            if daemon_ticks > 0:
                await fleet.start(leak_vm, timeout=BOOT_TIMEOUT_S, ready=driver_ok)
                names = [spec.name for spec in (*tour_vms, leak_vm)]
                await autoballoon(demo, names, daemon_ticks)

        asyncio.run(main())
    out.write(f"\n# Done: all {fleet.vm_count} simulated VMs stopped.\n")
    return 0
