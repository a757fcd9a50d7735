"""Simulated VMs for the tests: ``balloonctl sim`` processes on real unix sockets, started
and stopped by :class:`balloonctl.sim.fleet.SimFleet`, and the fixtures that hand them out.

Nothing here imports the simulator: the VM is another process, reached only through its
QMP socket, exactly as a user's shell reaches QEMU. A VM is ready for a test once its
guest's balloon driver is up (DRIVER_OK), as one waits for a booting guest.

The fixtures are registered for every folder by tests/conftest.py (``pytest_plugins``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Final, Protocol

import pytest

from balloonctl.errors import BalloonError
from balloonctl.sim.fleet import SimFleet, SimProcess, SimSpec
from tests.support.cli import cli_env
from tests.support.qmp import driver_ok

#: A running ``balloonctl sim`` as the tests see it.
Sim = SimProcess

#: Bound on sims becoming ready (process start, numpy import, boot probe, DRIVER_OK).
READY_TIMEOUT_S: Final = 20.0
#: Room left in sockaddr_un.sun_path (108 bytes) for a socket name.
_MAX_DIR_LEN: Final = 80

GiB: Final = 1 << 30


@contextlib.contextmanager
def short_tempdir(prefix: str) -> Iterator[Path]:
    """A fresh directory under /tmp, removed afterwards: socket paths in it fit in
    sockaddr_un's 108 bytes, which pytest's tmp_path may not leave room for."""
    directory = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


class SimPool:
    """A :class:`SimFleet` driven from synchronous tests, with the tests' defaults.

    ``defaults`` fill the spec fields a test leaves None (the CLI tests' VMs are 512M, the
    daemon tests' 1 GiB moving at 2G/s). A failure to start is an assertion error carrying
    the sim's whole log.
    """

    def __init__(self, directory: Path, **defaults: object) -> None:
        self.fleet = SimFleet(directory, env=cli_env())
        self.defaults = defaults

    def _complete(self, spec: SimSpec) -> SimSpec:
        fill = {k: v for k, v in self.defaults.items() if getattr(spec, k) is None}
        return dataclasses.replace(spec, **fill)  # type: ignore[arg-type]

    def start(self, *specs: SimSpec) -> list[Sim]:
        """Start every spec at once; return when each guest's balloon driver is up."""
        try:
            return asyncio.run(
                self.fleet.start(
                    *(self._complete(s) for s in specs), timeout=READY_TIMEOUT_S, ready=driver_ok
                )
            )
        except BalloonError as exc:
            raise AssertionError(f"{exc}\n{self._logs()}") from exc

    def restart(self, sim: Sim) -> Sim:
        """A new sim on the socket path of ``sim``, which is dead (its socket file may
        remain, refusing connections: whatever answers there is the new one)."""
        assert not sim.alive
        try:
            return asyncio.run(self.fleet.restart(sim, timeout=READY_TIMEOUT_S, ready=driver_ok))
        except BalloonError as exc:
            raise AssertionError(f"{exc}\n{self._logs()}") from exc

    def stop_all(self) -> None:
        """Stop every sim started (SIGTERM, then SIGKILL)."""
        self.fleet.stop_all()

    def _logs(self) -> str:
        return "\n".join(f"--- {p.log}:\n{p.log_text()}" for p in self.fleet.processes)


class SimFactory(Protocol):
    """``sim_factory(...)``: one VM, its options as keywords, ready when returned."""

    def __call__(
        self,
        *,
        name: str = "vm",
        memory: str = "512M",
        profile: str = "seed-sg",
        hotplug: bool = True,
        workload: str | None = None,
        rate: str | None = None,
        time_scale: float | None = None,
        qemu_version: str | None = None,
    ) -> Sim: ...


def _factory(pool: SimPool) -> SimFactory:
    def start(
        *,
        name: str = "vm",
        memory: str = "512M",
        profile: str = "seed-sg",
        hotplug: bool = True,
        workload: str | None = None,
        rate: str | None = None,
        time_scale: float | None = None,
        qemu_version: str | None = None,
    ) -> Sim:
        spec = SimSpec(
            name,
            memory=memory,
            profile=profile,
            workload=workload,
            rate=rate,
            time_scale=time_scale,
            hotplug=hotplug,
            qemu_version=qemu_version,
        )
        (sim,) = pool.start(spec)
        return sim

    return start


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture
def sock() -> Iterator[str]:
    """A QMP socket path in a fresh directory under /tmp.

    AF_UNIX paths are limited to 107 bytes; pytest's tmp_path can be longer.
    """
    with short_tempdir("qmp-") as directory:
        yield os.path.join(directory, "qmp.sock")


@pytest.fixture
def sock_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory for sockets, short enough for sockaddr_un: tmp_path when it is."""
    if len(str(tmp_path)) <= _MAX_DIR_LEN:
        yield tmp_path
        return
    with short_tempdir("bctl-") as short:
        yield short


@pytest.fixture
def run_dir() -> Iterator[Path]:
    """A directory for sockets under /tmp (short enough for sockaddr_un), removed after."""
    with short_tempdir("bd-") as directory:
        yield directory


@pytest.fixture
def sim_factory(sock_dir: Path) -> Iterator[SimFactory]:
    """Start ``balloonctl sim`` processes (options as keywords); all stopped at teardown."""
    pool = SimPool(sock_dir)
    try:
        yield _factory(pool)
    finally:
        pool.stop_all()


@pytest.fixture
def sim(sim_factory: SimFactory) -> Sim:
    """A 512M seed-sg VM, idle, on a hot-pluggable bus, its guest driver up."""
    return sim_factory()


@pytest.fixture(scope="module")
def shared_sim() -> Iterator[Sim]:
    """One 512M seed-sg VM for a module's tests that must leave its balloon as they found it
    (read-only commands and commands that must be refused before anything is sent)."""
    with short_tempdir("bctl-") as directory:
        pool = SimPool(directory)
        try:
            yield _factory(pool)(name="shared")
        finally:
            pool.stop_all()


@pytest.fixture
def fleet(run_dir: Path) -> Iterator[SimPool]:
    """Start simulated VMs with ``fleet.start(SimSpec(name, ...), ...)``: 1 GiB each, 2G/s
    unless the spec says otherwise; all stopped at teardown."""
    pool = SimPool(run_dir, memory=GiB, rate="2G")
    try:
        yield pool
    finally:
        pool.stop_all()
