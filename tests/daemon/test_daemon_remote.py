"""One ``balloonctl daemon`` managing a local VM and a remote libvirt host's domain, across a
link that drops.

The remote host is fixtures/remote_libvirtd.py's libvirtd in its own network namespace,
reached over ``qemu+tcp://`` only (``[libvirt] uri``); the local VM is a simulated one on a
QMP socket (``[[vm]]``). The configuration takes one ``[libvirt]`` URI today, so the
local host's VM is not a second libvirt domain here (see the README's remote section).

What is shown, with ``virsh`` on the remote daemon's unix socket as the witness:

* under host pressure both VMs are shrunk to their floors, the remote one over TCP;
* the link dropped (the namespace's end of the veth down: no RST, no FIN), the daemon
  keeps ticking and grows the local VM back when the host calms down, logs the remote VM's
  loss once, and sends the remote domain nothing (no target lands when the link returns
  that was decided in the dark);
* the link back, the remote domain is reconnected and grown back too.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from fixtures.libvirtd import Domain
from fixtures.remote_libvirtd import RemoteLibvirtd, missing_tools, shared
from tests.support.daemon import ConfigFile, DaemonProcess, FakeHost, VmEntry, state_tick
from tests.support.libvirt import cli
from tests.support.sims import Sim, SimFactory

MiB = 1 << 20
GiB = 1 << 30
REMOTE_FLOOR = 1536 * MiB
LOCAL_FLOOR = 384 * MiB
#: Generous: a TCG guest on two cores shared with other test runs.
WAIT_S = 90.0

if missing_tools():
    pytest.skip(
        f"a remote libvirtd in a network namespace needs {', '.join(missing_tools())}: "
        "NOT TESTED here",
        allow_module_level=True,
    )


def wait(
    predicate: Callable[[], bool], what: str, log: Callable[[], str], timeout: float = WAIT_S
) -> None:
    """Poll ``predicate``; after ``timeout`` an assertion naming ``what``, with the log."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"gave up waiting for {what}; log:\n{log()[-4000:]}"
        time.sleep(0.2)


def remote_actual(domain: Domain) -> int:
    """The remote balloon's size as its own libvirtd says (bytes)."""
    return domain.dommemstat()["actual"] * 1024


def local_actual(sim: Sim) -> int:
    """The local VM's size, asked by the CLI on its QMP socket."""
    result = cli("--json", "status", sim.sockets[0])
    assert result.returncode == 0, result.stderr
    value = json.loads(result.stdout)["actual_bytes"]
    assert isinstance(value, int)
    return value


def test_the_daemon_manages_both_hosts_and_survives_a_dropped_link(
    sim_factory: SimFactory, tmp_path: Path
) -> None:
    remote: RemoteLibvirtd
    remote, domain = shared()
    local = sim_factory(name="local1", memory="512M")
    host = FakeHost(tmp_path, total=16 * GiB)
    host.set(1 * GiB)  # 6 %: pressure
    config = ConfigFile(
        tmp_path / "autoballoon.toml",
        host,
        tmp_path / "state",
        vms=[VmEntry("local1", local.sockets[0], min="384M")],
        interval=1.0,
        policy={"max_step": "2G", "max_step_percent": 100},
    )
    path = config.write()
    with path.open("a") as f:
        f.write(
            f'\n[libvirt]\nuri = "{remote.tcp_uri}"\ninclude = ["{domain.name}"]\nmin = "1536M"\n'
        )
    daemon = DaemonProcess(path, tmp_path / "daemon.log")
    try:
        # 1. Pressure: both shrink to their floors, the remote one over the wire.
        wait(
            lambda: remote_actual(domain) == REMOTE_FLOOR,
            "the remote domain at its floor",
            daemon.log,
        )
        wait(lambda: local_actual(local) == LOCAL_FLOOR, "the local VM at its floor", daemon.log)

        # 2. The link drops; the host calms down. The local VM grows back all the same.
        remote.link_down()
        dropped_at = state_tick(tmp_path / "state")
        host.set(14 * GiB)  # 87 %: calm
        wait(
            lambda: local_actual(local) == 512 * MiB,
            "the local VM grown back, link down",
            daemon.log,
        )
        wait(
            lambda: any(domain.name in line for line in daemon.lines("WARNING")),
            "the remote domain's loss in the log",
            daemon.log,
        )
        time.sleep(10)  # more ticks in the dark: the loss must not be logged again
        assert state_tick(tmp_path / "state") >= dropped_at + 5, "the daemon stopped ticking"
        lost = [line for line in daemon.lines("WARNING") if domain.name in line]
        assert len(lost) == 1, daemon.log()
        assert daemon.alive, daemon.log()
        # Nothing reached the remote domain while the link was down.
        assert remote_actual(domain) == REMOTE_FLOOR

        # 3. The link is back: the daemon reconnects and grows the remote domain too.
        remote.link_up()
        wait(lambda: remote_actual(domain) == 2 * GiB, "the remote domain grown back", daemon.log)
        assert "Traceback" not in daemon.log(), daemon.log()
    finally:
        remote.link_up()
        code = daemon.stop()
        if remote_actual(domain) != 2 * GiB:
            remote.libvirtd.virsh("setmem", domain.name, "2G", "--live")
    assert code in (0, 143), daemon.log()  # stopped by its SIGTERM, not killed
