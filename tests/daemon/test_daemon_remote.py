"""One ``balloonctl daemon`` managing a local VM and a remote libvirt host's domain, across a
link that drops.

The remote host is fixtures/remote_libvirtd.py's libvirtd in its own network namespace,
reached over ``qemu+tcp://`` only. Two daemons are run: one with a simulated local VM on a
QMP socket (``[[vm]]``) and the remote host as its one ``[libvirt]`` table; and one with two
``[[libvirt]]`` entries, the session's local libvirtd (tests/support/libvirt.py, its
``bctl-lv1``) first and the remote one second, so both hosts' domains are libvirt domains
managed from this host (the remote one named ``URI/bctl-rm1``: see the README's daemon
section). The guests are the fixtures' own, booted once for every test that uses them.

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
import signal
import socket
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from fixtures.libvirtd import Domain, Libvirtd
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
    """A libvirt domain's balloon size as its own libvirtd says (bytes): over the remote
    daemon's unix socket, not the link under test."""
    return domain.dommemstat()["actual"] * 1024


def free_port() -> int:
    """A loopback TCP port nothing listens on now (for the metrics endpoint)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> str:
    """The daemon's metrics page."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return str(reply.read().decode())


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


def test_one_daemon_manages_two_libvirt_hosts_from_two_list_entries(
    libvirtd: Libvirtd, domain: Domain, tmp_path: Path
) -> None:
    """``[[libvirt]]`` twice: the local libvirtd's ``bctl-lv1`` and the remote one's
    ``bctl-rm1`` in one daemon.

    Both shrink to their floors under pressure, each keyed apart (the remote one as
    ``URI/bctl-rm1``, its own ``vm`` label); with the link to the remote host down, the local
    domain is still managed (it grows back when the host calms down), the remote one's loss
    is one line (and the remote listing's failure one more, the host's), nothing is sent to
    it in the dark; a reload (SIGHUP) to the local entry alone drops the remote domain and
    keeps the local one.
    """
    remote, far = shared()
    near = domain
    remote_name = f"{remote.tcp_uri}/{far.name}"
    port = free_port()
    host = FakeHost(tmp_path, total=16 * GiB)
    host.set(1 * GiB)  # 6 %: pressure
    config = ConfigFile(
        tmp_path / "autoballoon.toml",
        host,
        tmp_path / "state",
        interval=1.0,
        policy={"max_step": "2G", "max_step_percent": 100},
        daemon_extra={"metrics": f"127.0.0.1:{port}"},
    )
    local_entry = (
        f'\n[[libvirt]]\nuri = "{libvirtd.uri}"\ninclude = ["{near.name}"]\nmin = "1536M"\n'
    )
    remote_entry = (
        f'\n[[libvirt]]\nuri = "{remote.tcp_uri}"\ninclude = ["{far.name}"]\nmin = "1536M"\n'
    )
    path = config.write()
    with path.open("a") as f:
        f.write(local_entry + remote_entry)
    daemon = DaemonProcess(path, tmp_path / "daemon.log")
    try:
        # 1. Pressure: both hosts' domains shrink to their floors.
        wait(
            lambda: remote_actual(near) == REMOTE_FLOOR, "the local domain at its floor", daemon.log
        )
        wait(
            lambda: remote_actual(far) == REMOTE_FLOOR, "the remote domain at its floor", daemon.log
        )
        # Told apart: the remote domain by its long name in the log and the metrics.
        assert any(
            line.startswith(f"balloonctl: INFO: {remote_name}: ")
            for line in daemon.log().splitlines()
        ), daemon.log()
        assert any(
            line.startswith(f"balloonctl: INFO: {near.name}: ")
            for line in daemon.log().splitlines()
        ), daemon.log()
        # Two series in the metrics, one per host's domain, each at its floor.
        series = scrape(port)
        for name in (near.name, remote_name):
            key = f'balloonctl_vm_floor_bytes{{vm="{name}"}} '
            values = [float(x[len(key) :]) for x in series.splitlines() if x.startswith(key)]
            assert values == [REMOTE_FLOOR], series

        # 2. The link drops; the host calms down. The local domain grows back all the same.
        warned_before = len(daemon.lines("WARNING"))
        remote.link_down()
        dropped_at = state_tick(tmp_path / "state")
        host.set(14 * GiB)  # 87 %: calm
        wait(
            lambda: remote_actual(near) == 2 * GiB,
            "the local domain grown back, link down",
            daemon.log,
        )
        wait(
            lambda: any(remote_name in line for line in daemon.lines("WARNING")),
            "the remote domain's loss in the log",
            daemon.log,
        )
        time.sleep(12)  # more ticks in the dark, and a rescan (every 10 s) of the dead host
        assert state_tick(tmp_path / "state") >= dropped_at + 5, "the daemon stopped ticking"
        warnings = daemon.lines("WARNING")[warned_before:]
        lost = [
            line for line in warnings if line.startswith(f"balloonctl: WARNING: {remote_name}: ")
        ]
        listing = [line for line in warnings if f"libvirt {remote.tcp_uri}: cannot list" in line]
        assert len(lost) == 1, daemon.log()
        assert len(listing) <= 1, daemon.log()
        assert len(warnings) == len(lost) + len(listing), warnings  # nothing about the local host
        assert daemon.alive, daemon.log()
        assert remote_actual(far) == REMOTE_FLOOR  # nothing reached it in the dark
        assert remote_actual(near) == 2 * GiB  # and no stray target on the local one

        # 3. The link is back: the remote domain is reconnected and grown back too.
        remote.link_up()
        wait(lambda: remote_actual(far) == 2 * GiB, "the remote domain grown back", daemon.log)

        # 4. Reload to the local entry alone: the remote domain is no longer managed.
        config.write()
        with path.open("a") as f:
            f.write(local_entry)
        daemon.signal(signal.SIGHUP)
        assert daemon.wait_log(f"{remote_name}: no longer managed"), daemon.log()
        host.set(1 * GiB)
        wait(
            lambda: remote_actual(near) == REMOTE_FLOOR,
            "the local domain shrunk after the reload",
            daemon.log,
        )
        assert remote_actual(far) == 2 * GiB
        assert "Traceback" not in daemon.log(), daemon.log()
    finally:
        remote.link_up()
        code = daemon.stop()
        for lv, dom in ((libvirtd, near), (remote.libvirtd, far)):
            if remote_actual(dom) != 2 * GiB:
                lv.virsh("setmem", dom.name, "2G", "--live")
        # As the session's other libvirt tests expect it: stats every 2 s.
        libvirtd.virsh("dommemstat", near.name, "--period", "2", "--live")
    assert code in (0, 143), daemon.log()
