"""``balloonctl sim``: serve one or many simulated VMs until SIGTERM or every VM's ``quit``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace

from balloonctl.sim.machine import SimMachine, VmSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Served:
    """A VM and the socket it answers on."""

    spec: VmSpec
    qmp_path: str


def layout(
    base: VmSpec,
    qmp: str | None,
    count: int,
    qmp_dir: str | None,
    workloads: Sequence[str] = (),
) -> list[Served]:
    """One VM on ``qmp``, or ``count`` VMs named vm0.. on ``qmp_dir/vmN.sock``.

    ``workloads`` (if any) are cycled over the VMs: vm0 runs the first, vm1 the second...;
    without them every VM runs ``base``'s workload. Their clocks start spread over a minute
    (the workloads' longest period), as real guests do not all boot in the same second.
    """
    if qmp_dir is None:
        assert qmp is not None
        if workloads:
            return [Served(replace(base, guest=replace(base.guest, workload=workloads[0])), qmp)]
        return [Served(base, qmp)]
    return [
        Served(
            # Everything else (profile, QEMU version, rate, bus) as ``base`` says.
            replace(
                base,
                name=f"vm{i}",
                guest=replace(
                    base.guest,
                    workload=workloads[i % len(workloads)] if workloads else base.guest.workload,
                    phase=(i * 60.0 / count) if count > 1 else 0.0,
                ),
            ),
            os.path.join(qmp_dir, f"vm{i}.sock"),
        )
        for i in range(count)
    ]


async def serve(vms: Sequence[Served], *, announce: bool = True) -> int:
    """Run until SIGTERM/SIGINT or until every VM has quit; 0 either way."""
    done = asyncio.Event()
    live: set[SimMachine] = set()
    stopping: set[asyncio.Task[None]] = set()

    def quit_one(machine: SimMachine) -> None:
        live.discard(machine)
        task = asyncio.create_task(machine.stop())
        stopping.add(task)
        task.add_done_callback(stopping.discard)
        if not live:
            done.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    machines = [SimMachine(vm.spec, quit_one) for vm in vms]
    made: dict[str, int] = {}
    try:
        for machine, vm in zip(machines, vms, strict=True):
            await machine.start(vm.qmp_path)
            made[vm.qmp_path] = os.stat(vm.qmp_path).st_ino
            live.add(machine)
            if announce:
                print(f"{vm.spec.name}: QMP on unix:{vm.qmp_path}", file=sys.stderr, flush=True)
        await done.wait()
    finally:
        for machine in list(live):
            await machine.stop()
        for task in list(stopping):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for path, inode in made.items():
            # Only our own socket: another sim may have taken the path since.
            with contextlib.suppress(FileNotFoundError):
                if os.stat(path).st_ino == inode:
                    os.unlink(path)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    return 0
