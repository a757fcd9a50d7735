"""Start, wait for and stop simulated VMs: ``balloonctl sim`` child processes in one directory.

The VMs run as child processes, not in the caller's event loop, for three reasons: they are
reached only through their QMP sockets, as a user's shell reaches QEMU; their CPU is not the
caller's (``bench daemon`` measures the daemon's own CPU); and one can be killed with
SIGKILL, as a crashing QEMU is, to see what the daemon does. ``balloonctl demo``,
``balloonctl bench daemon`` and the tests all start them the same way, here.

A :class:`SimSpec` is one process: one VM on ``DIR/NAME.sock``, or with ``count`` > 1 a
directory of VMs ``DIR/vm0.sock`` ... served by one process (the bench's 1000 VMs would
otherwise be 1000 interpreters). A :class:`SimFleet` starts specs in its directory, waits
until they are ready, and stops every one of them when its ``with`` or ``async with`` block
ends, however it ends (an exception, Ctrl-C, SIGTERM unwinding the command).

"Ready" is the caller's to say: by default a VM is ready when its socket exists (the bench
counts connecting as warm-up); ``ready=`` adds a check on the socket, e.g. that the guest's
balloon driver is up. This module imports nothing that speaks QMP: ``sim`` serves QMP, it
does not use ``backends`` (docs/architecture.md, "Dependency rule").
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, Self

from balloonctl.errors import OperationTimeout, PeerError

#: Seconds a sim gets to end after SIGTERM before it is killed.
STOP_GRACE_S: Final = 10.0
#: Seconds between two looks at a starting sim.
_POLL_S: Final = 0.05

#: ``ready(socket_path)``: whether the VM on that socket is ready (its socket exists).
ReadyCheck = Callable[[str], Awaitable[bool]]


@dataclass(frozen=True)
class SimSpec:
    """One ``balloonctl sim`` process: the options of its command line.

    A field left None is not passed: the sim's own default applies (2G, seed-sg, idle, 1G/s,
    time scale 1, the default QEMU version).
    """

    name: str = "vm"
    memory: int | str | None = None
    profile: str | None = None
    workload: str | None = None
    rate: int | str | None = None
    time_scale: float | None = None
    #: False puts the balloon on pcie.0, which cannot hotplug (``--no-hotplug``).
    hotplug: bool = True
    qemu_version: str | None = None
    #: More than 1: one process serving ``vm0`` .. ``vm{count-1}`` (``--qmp-dir``).
    count: int = 1
    #: With ``count`` > 1: the workloads cycled over the VMs (``--workloads``).
    workloads: tuple[str, ...] = ()

    def sockets(self, directory: str) -> list[str]:
        """The QMP socket of each VM this process serves."""
        if self.count == 1:
            return [os.path.join(directory, f"{self.name}.sock")]
        return [os.path.join(directory, f"vm{i}.sock") for i in range(self.count)]

    def argv(self, directory: str) -> list[str]:
        """``balloonctl`` arguments (after ``python -m balloonctl``) that start it."""
        if self.count == 1:
            argv = ["sim", "--qmp", self.sockets(directory)[0]]
        else:
            argv = ["sim", "--qmp-dir", directory, "--count", str(self.count)]
        options: list[tuple[str, object]] = [
            ("--memory", self.memory),
            ("--profile", self.profile),
            ("--workload", self.workload),
            ("--workloads", ",".join(self.workloads) if self.workloads else None),
            ("--rate", self.rate),
            ("--time-scale", None if self.time_scale is None else f"{self.time_scale!r}"),
            ("--qemu-version", self.qemu_version),
        ]
        for flag, value in options:
            if value is not None:
                argv += [flag, str(value)]
        if not self.hotplug:
            argv.append("--no-hotplug")
        return argv


@dataclass
class SimProcess:
    """A running ``balloonctl sim`` process and the VMs it serves."""

    spec: SimSpec
    proc: subprocess.Popen[bytes]
    sockets: list[str]
    #: Its stdout and stderr (appended to: a restart on the same name keeps the first log).
    log: Path
    argv: list[str]

    @property
    def name(self) -> str:
        """The spec's name (the VM's, when it serves one)."""
        return self.spec.name

    @property
    def sock(self) -> str:
        """The QMP socket of its (first) VM."""
        return self.sockets[0]

    @property
    def pid(self) -> int:
        """The process id (for its CPU time in /proc)."""
        return self.proc.pid

    @property
    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.proc.poll() is None

    def log_text(self) -> str:
        """Everything it wrote so far ("" if the log cannot be read)."""
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self) -> str:
        """The last line it wrote: what an error message quotes."""
        lines = self.log_text().strip().splitlines()
        return lines[-1] if lines else "(no output)"

    def terminate(self) -> None:
        """Send SIGTERM if it is still running (it removes its sockets and exits)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)

    def stop(self, grace: float = STOP_GRACE_S) -> int:
        """SIGTERM, then SIGKILL if it has not ended within ``grace`` seconds; its exit
        status."""
        self.terminate()
        try:
            return self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill(self) -> None:
        """SIGKILL: the VM dies without cleaning up, as a crashing QEMU does (its socket
        file stays behind, refusing connections)."""
        if self.alive:
            self.proc.kill()
        self.proc.wait(timeout=STOP_GRACE_S)


class SimFleet:
    """``balloonctl sim`` processes started in ``directory`` and stopped together.

    ``env`` is the environment the processes get (default: this process's). Usable as
    ``with`` and ``async with``: both stop every process on the way out. Stopping blocks
    (SIGTERM to all first, then a wait for each), so that it also happens when the event
    loop is being torn down.
    """

    def __init__(
        self, directory: str | os.PathLike[str], *, env: Mapping[str, str] | None = None
    ) -> None:
        self.directory = os.fspath(directory)
        self.env = None if env is None else dict(env)
        #: Every process started, in order, stopped or not.
        self.processes: list[SimProcess] = []

    @property
    def vm_count(self) -> int:
        """VMs served by every process started so far."""
        return sum(p.spec.count for p in self.processes)

    def spawn(self, spec: SimSpec) -> SimProcess:
        """Start one process; it is not ready yet (see :meth:`start`)."""
        argv = spec.argv(self.directory)
        log = Path(self.directory) / f"{spec.name}.log"
        # Its output goes to a file: a pipe nobody reads could fill up and stall it.
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "balloonctl", *argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        sim = SimProcess(spec, proc, spec.sockets(self.directory), log, argv)
        self.processes.append(sim)
        return sim

    async def start(
        self, *specs: SimSpec, timeout: float, ready: ReadyCheck | None = None
    ) -> list[SimProcess]:
        """Start every spec at once; return when each of their VMs is ready (see
        :meth:`wait_ready`)."""
        sims = [self.spawn(spec) for spec in specs]
        await self.wait_ready(sims, timeout=timeout, ready=ready)
        return sims

    async def restart(
        self, sim: SimProcess, *, timeout: float, ready: ReadyCheck | None = None
    ) -> SimProcess:
        """A new process for ``sim``'s spec, whose process is dead: its socket files may
        remain, refusing connections, and whatever answers there next is the new one."""
        if sim.alive:
            raise ValueError(f"sim {sim.name} is still running")
        fresh = self.spawn(sim.spec)
        await self.wait_ready([fresh], timeout=timeout, ready=ready)
        return fresh

    @staticmethod
    async def wait_ready(
        sims: Sequence[SimProcess], *, timeout: float, ready: ReadyCheck | None = None
    ) -> float:
        """Until every socket of ``sims`` exists and ``ready`` says so of it; the seconds
        it took.

        :class:`PeerError` if a process exits first (its last line of output says why),
        :class:`OperationTimeout` if ``timeout`` seconds pass.
        """
        t0 = time.monotonic()
        waiting = [(sim, path) for sim in sims for path in sim.sockets]
        total = len(waiting)
        while waiting:
            still = []
            for sim, path in waiting:
                if not sim.alive:
                    raise PeerError(f"the sim exited ({sim.proc.returncode}): {sim.tail()}")
                if not os.path.exists(path) or (ready is not None and not await ready(path)):
                    still.append((sim, path))
            waiting = still
            if not waiting:
                break
            if time.monotonic() - t0 > timeout:
                if ready is not None:
                    raise OperationTimeout(
                        f"simulated VM {waiting[0][1]} did not come up in {timeout:g} s"
                    )
                raise OperationTimeout(
                    f"the sim served {total - len(waiting)} of {total} VMs in {timeout:g} s"
                )
            await asyncio.sleep(_POLL_S)
        return time.monotonic() - t0

    def stop_all(self, grace: float = STOP_GRACE_S) -> None:
        """SIGTERM to every process at once, then wait for each (SIGKILL after ``grace``)."""
        for sim in self.processes:
            sim.terminate()
        for sim in self.processes:
            sim.stop(grace)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop_all()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop_all()


__all__ = ["ReadyCheck", "SimFleet", "SimProcess", "SimSpec"]
