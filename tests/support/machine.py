"""A simulated VM in the test's own event loop (no child process), on a real unix socket,
with a raw QMP client on it: for the simulator's own tests, which look at the machine's
insides as well as at what it says on the wire."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from balloonctl.sim.guest import GuestSpec
from balloonctl.sim.machine import SimMachine, VmSpec
from balloonctl.sim.qemu_versions import DEFAULT_QEMU_VERSION
from tests.support.qmp import RawQmp


@contextlib.asynccontextmanager
async def running_vm(
    tmp_path: Path,
    *,
    memory: int = 256 << 20,
    profile: str = "seed-sg",
    workload: str = "idle",
    hotplug: bool = True,
    rate: int = 1 << 30,
    time_scale: float = 1.0,
    kernel: int | None = None,
    qemu_version: str = DEFAULT_QEMU_VERSION,
) -> AsyncIterator[tuple[SimMachine, RawQmp]]:
    """A booted simulated VM (driver bound) answering as QEMU ``qemu_version``, and a
    negotiated raw QMP client."""
    stopping: list[asyncio.Task[None]] = []

    def on_quit(machine: SimMachine) -> None:
        # As balloonctl sim does: quit powers the VM off.
        stopping.append(asyncio.create_task(machine.stop()))

    spec = VmSpec(
        profile=profile,
        guest=GuestSpec(memory=memory, workload=workload, time_scale=time_scale, kernel=kernel),
        rate=rate,
        hotplug=hotplug,
        boot_probe_s=0.0,
        qemu_version=qemu_version,
    )
    machine = SimMachine(spec, on_quit)
    path = str(tmp_path / "vm.sock")
    await machine.start(path)
    client = await RawQmp.open(path)
    try:
        await wait_driver_ok(client)
        yield machine, client
    finally:
        await client.close()
        for task in stopping:
            await task
        if machine.running:
            await machine.stop()


async def wait_driver_ok(client: RawQmp, timeout: float = 5.0) -> None:
    """Poll x-query-virtio-status until DRIVER_OK, as one waits for a real guest."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        listed = await client.ok("x-query-virtio")
        if listed:
            status = await client.ok("x-query-virtio-status", {"path": listed[0]["path"]})
            if any("DRIVER_OK" in s for s in status["status"]["statuses"]):
                return
        assert loop.time() < deadline, "the simulated guest's driver never came up"
        await asyncio.sleep(0.01)
