"""``balloonctl demo``: a scripted tour on simulated VMs, as a user would type it.

Two seed-sg VMs are started as ``balloonctl sim`` processes (a steady server and a spiky
batch job, 2 GiB each), and the demo runs the CLI's own code against their QMP sockets:
list, features (SG acked), set --wait both ways with progress, status, stats under the
workload, and a live renegotiation that turns SG off and on again. It ends by itself.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import TextIO

from balloonctl import vmcmds
from balloonctl.config import Config
from balloonctl.errors import BalloonError, OperationTimeout
from balloonctl.units import format_size

GiB = 1 << 30


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


def start_vms(qmp_dir: str, specs: dict[str, list[str]]) -> list[subprocess.Popen[bytes]]:
    """One ``balloonctl sim`` process per VM."""
    procs = []
    for name, extra in specs.items():
        argv = [
            sys.executable,
            "-m",
            "balloonctl",
            "sim",
            "--qmp",
            os.path.join(qmp_dir, f"{name}.sock"),
            *extra,
        ]
        # The sims' own log goes next to their sockets: a pipe nobody reads could fill up.
        log = open(os.path.join(qmp_dir, f"{name}.log"), "wb")  # noqa: SIM115
        procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log))
        log.close()
    return procs


async def wait_ready(path: str, timeout: float = 30.0) -> None:
    """Until the VM's guest driver is up (DRIVER_OK), as with a booting guest."""
    deadline = time.monotonic() + timeout
    while True:
        if os.path.exists(path):
            try:
                report, _ = await vmcmds.features(path)
                if report["driver_ok"]:
                    return
            except BalloonError:
                pass
        if time.monotonic() > deadline:
            raise OperationTimeout(f"simulated VM {path} did not come up in {timeout:g} s")
        await asyncio.sleep(0.1)


async def tour(demo: Demo, duration: float) -> None:
    """The scripted scenario."""
    web, batch = demo.sock("web"), demo.sock("batch")
    demo.say("Two simulated VMs (seed-sg profile, 2 GiB each) are serving QMP in $DIR.")
    demo.command("list --qmp-dir $DIR")
    demo.show(vmcmds.render_list(await vmcmds.list_vms(Config(None), demo.dir)))

    demo.say("The balloon's feature bits: the seed's VIRTIO_BALLOON_F_SG (bit 3) is acked.")
    demo.command("features $DIR/web.sock")
    report, names = await vmcmds.features(web)
    demo.show(vmcmds.render_features(report, names))

    demo.say("Inflate: give 1 GiB of web's 2 GiB back to the host, and wait for it.")
    demo.command("set $DIR/web.sock 1G --wait")
    result = await vmcmds.set_target(web, GiB, wait=True, timeout=60, config=Config(None))
    demo.show(_set_line(result))
    demo.command("status $DIR/web.sock")
    demo.show(vmcmds.render_status(await vmcmds.status(web)))

    demo.say("Stats move under batch's spiky workload (every new reading, 1 s apart).")
    demo.command("stats $DIR/batch.sock --period 1 --watch")
    await _watch(demo, batch, duration)

    demo.say("Deflate: web gets its memory back.")
    demo.command("set $DIR/web.sock 2G --wait")
    demo.show(
        _set_line(await vmcmds.set_target(web, 2 * GiB, wait=True, timeout=60, config=Config(None)))
    )

    demo.say(
        "Renegotiate live: replug web's balloon without SG; the guest falls back to 256-PFN arrays."
    )
    demo.command("negotiate $DIR/web.sock --disable sg --yes")
    after = await vmcmds.negotiate(web, [], ["sg"])
    demo.show(vmcmds.render_features(after, names))
    demo.command("set $DIR/web.sock 1G --wait")
    demo.show(
        _set_line(await vmcmds.set_target(web, GiB, wait=True, timeout=60, config=Config(None)))
    )
    demo.command("negotiate $DIR/web.sock --enable sg --yes")
    after = await vmcmds.negotiate(web, ["sg"], [])
    demo.show(f"sg offered: {after['sg']['offered']}, acked: {after['sg']['acked']}\n")


def _set_line(result: vmcmds.SetResult) -> str:
    state = "reached" if result.reached else "NOT reached"
    return (
        f"{result.vm.rsplit('/', 1)[-1]}: target {format_size(result.target)}, actual "
        f"{format_size(result.actual)} ({state} after {result.elapsed:.2f} s)\n"
    )


async def _watch(demo: Demo, vm: str, duration: float) -> None:
    end = time.monotonic() + duration
    demo.show(f"{'time':>6}  {'free':>10}  {'available':>10}  {'disk-caches':>11}\n")
    t0 = time.monotonic()
    stream = vmcmds.watch_stats(vm, 1, notice=demo.out)
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


def run(duration: float, out: TextIO = sys.stdout) -> int:
    """Start the VMs, run the tour, stop the VMs; 0 when every step worked."""
    with tempfile.TemporaryDirectory(prefix="balloonctl-demo-") as qmp_dir:
        procs = start_vms(
            qmp_dir,
            {
                "web": ["--workload", "steady"],
                "batch": ["--workload", "spiky", "--time-scale", "2"],
            },
        )
        try:

            async def main() -> None:
                for name in ("web", "batch"):
                    await wait_ready(os.path.join(qmp_dir, f"{name}.sock"))
                await tour(Demo(qmp_dir, out), duration)

            asyncio.run(main())
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in procs:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
    out.write("\n# Done: both simulated VMs stopped.\n")
    return 0
