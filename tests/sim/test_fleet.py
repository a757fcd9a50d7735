"""balloonctl.sim.fleet: ``balloonctl sim`` processes started, waited for and stopped together,
as the demo, the daemon bench and the tests start them.

The command lines are checked as text; the rest with real processes on real sockets: ready
means the socket exists (or what the caller's check says), a sim that dies while starting is
a PeerError quoting its last line, and leaving the ``with`` block stops every one of them.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from balloonctl.errors import OperationTimeout, PeerError
from balloonctl.sim.fleet import SimFleet, SimSpec
from tests.support.cli import cli_env
from tests.support.qmp import driver_ok, raw_actual

MiB = 1 << 20
#: Bound on a sim starting here (a failure if exceeded, not a measurement).
START_S = 30.0


# --------------------------------------------------------------------------------------------
# Command lines
# --------------------------------------------------------------------------------------------


def test_unset_options_are_left_to_the_sims_defaults() -> None:
    assert SimSpec("web").argv("/d") == ["sim", "--qmp", "/d/web.sock"]
    assert SimSpec("web").sockets("/d") == ["/d/web.sock"]


def test_every_option_reaches_the_command_line() -> None:
    spec = SimSpec(
        "vm",
        memory="512M",
        profile="virtio-1.2",
        workload="leak",
        rate="32M",
        time_scale=2.0,
        hotplug=False,
        qemu_version="7.2",
    )
    assert spec.argv("/d") == [
        "sim",
        "--qmp",
        "/d/vm.sock",
        "--memory",
        "512M",
        "--profile",
        "virtio-1.2",
        "--workload",
        "leak",
        "--rate",
        "32M",
        "--time-scale",
        "2.0",
        "--qemu-version",
        "7.2",
        "--no-hotplug",
    ]


def test_a_directory_of_vms_is_one_process() -> None:
    spec = SimSpec("sim", count=3, memory=256 * MiB, workloads=("idle", "steady"))
    assert spec.argv("/d") == [
        "sim",
        "--qmp-dir",
        "/d",
        "--count",
        "3",
        "--memory",
        str(256 * MiB),
        "--workloads",
        "idle,steady",
    ]
    assert spec.sockets("/d") == ["/d/vm0.sock", "/d/vm1.sock", "/d/vm2.sock"]


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------


def test_start_waits_for_every_socket_and_the_block_stops_them_all(run_dir: Path) -> None:
    async def body() -> list[str]:
        async with SimFleet(run_dir, env=cli_env()) as fleet:
            one = await fleet.start(SimSpec("a", memory="256M"), timeout=START_S)
            many = await fleet.start(SimSpec("dir", count=2, memory="256M"), timeout=START_S)
            sims = one + many
            assert all(sim.alive for sim in sims)
            socks = [path for sim in sims for path in sim.sockets]
            assert socks == [str(run_dir / n) for n in ("a.sock", "vm0.sock", "vm1.sock")]
            assert all(os.path.exists(path) for path in socks)
            assert fleet.vm_count == 3
            # A synchronous look, on a thread: this loop must not block.
            actual = await asyncio.to_thread(raw_actual, str(run_dir / "vm1.sock"))
            assert actual == 256 * MiB
        assert not any(sim.alive for sim in sims)
        assert [sim.proc.returncode for sim in sims] == [0, 0]
        return socks

    socks = asyncio.run(body())
    assert not any(os.path.exists(path) for path in socks)  # SIGTERM: the sim cleaned up


def test_a_ready_check_is_asked_about_each_socket_until_it_agrees(run_dir: Path) -> None:
    asked: list[str] = []

    async def guest_up(sock: str) -> bool:
        asked.append(sock)
        return await driver_ok(sock)

    with SimFleet(run_dir, env=cli_env()) as fleet:
        (sim,) = asyncio.run(fleet.start(SimSpec("vm"), timeout=START_S, ready=guest_up))
        assert asyncio.run(driver_ok(sim.sock))
    assert set(asked) == {sim.sock}
    assert not sim.alive


def test_a_sim_that_exits_while_starting_is_a_peer_error_with_its_last_line(
    run_dir: Path,
) -> None:
    with SimFleet(run_dir, env=cli_env()) as fleet, pytest.raises(PeerError) as caught:
        asyncio.run(fleet.start(SimSpec("small", memory="1M"), timeout=START_S))
    assert str(caught.value).startswith("the sim exited (2): ")
    assert "--memory must be at least 64M" in str(caught.value)
    assert "--memory must be at least 64M" in fleet.processes[0].log_text()


def test_timeouts_say_how_far_the_fleet_got(run_dir: Path) -> None:
    async def never(sock: str) -> bool:
        return False

    with SimFleet(run_dir, env=cli_env()) as fleet:
        # No socket can exist the instant the process is started.
        with pytest.raises(OperationTimeout, match=r"^the sim served 0 of 2 VMs in 0 s$"):
            asyncio.run(fleet.start(SimSpec("d", count=2, memory="256M"), timeout=0))
        sock = str(run_dir / "vm.sock")
        with pytest.raises(
            OperationTimeout, match=rf"^simulated VM {sock} did not come up in 0.5 s$"
        ):
            asyncio.run(fleet.start(SimSpec("vm", memory="256M"), timeout=0.5, ready=never))
    assert not any(sim.alive for sim in fleet.processes)


def test_a_killed_sim_leaves_its_socket_and_a_restart_answers_there(run_dir: Path) -> None:
    with SimFleet(run_dir, env=cli_env()) as fleet:
        (sim,) = asyncio.run(fleet.start(SimSpec("vm", memory="256M"), timeout=START_S))
        sim.kill()
        assert not sim.alive
        assert os.path.exists(sim.sock)  # SIGKILL: nobody cleaned up
        fresh = asyncio.run(fleet.restart(sim, timeout=START_S, ready=driver_ok))
        assert fresh.sock == sim.sock and fresh.pid != sim.pid
        assert raw_actual(fresh.sock) == 256 * MiB
        with pytest.raises(ValueError, match="still running"):
            asyncio.run(fleet.restart(fresh, timeout=START_S))
        assert fresh.stop() == 0
    assert fresh.log_text().count(f"QMP on unix:{sim.sock}") == 2  # both runs, one log
