"""balloonctl against a real remote libvirtd: qemu+tcp and qemu+tls across a veth pair.

The remote daemon is fixtures/remote_libvirtd.py's: nobody's ``qemu:///session`` in a
private network namespace, with a real guest (``bctl-rm1``), reached only over the network
URIs; ``virsh`` on its unix socket is the independent witness. The link is dropped by moving
the namespace's end of the veth down (packets vanish: no RST, no FIN), and the daemon is
killed outright; both must give the CLI one line and exit 1.

Every test leaves ``bctl-rm1`` as it was booted: 2 GiB, stats every 2 s, the link up and
libvirtd running. They run as root (a network namespace and a veth need it); elsewhere the
module is skipped with the reason, which is not coverage.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from balloonctl.backends.libvirt import LibvirtBackend
from balloonctl.errors import BalloonError
from fixtures.libvirtd import Domain, Libvirtd
from fixtures.remote_libvirtd import RemoteLibvirtd, missing_tools, shared
from tests.support.libvirt import cli

MiB = 1 << 20
GiB = 1 << 30

if missing_tools():
    pytest.skip(
        f"a remote libvirtd in a network namespace needs {', '.join(missing_tools())}: "
        "NOT TESTED here",
        allow_module_level=True,
    )


@pytest.fixture(scope="module")
def remote() -> RemoteLibvirtd:
    """The process's remote libvirtd (fixtures.remote_libvirtd.shared)."""
    return shared()[0]


@pytest.fixture
def rdomain(remote: RemoteLibvirtd) -> Iterator[Domain]:
    """``bctl-rm1`` at 2 GiB, the link up and libvirtd running, before and after the test."""
    domain = shared()[1]

    def restore() -> None:
        if remote.libvirtd.daemon_pid is None:
            remote.libvirtd.restart()
        remote.link_up()
        if domain.dommemstat()["actual"] != 2 * GiB // 1024:
            remote.libvirtd.virsh("setmem", domain.name, "2G", "--live")
            deadline = time.monotonic() + 60
            while domain.dommemstat()["actual"] != 2 * GiB // 1024:
                assert time.monotonic() < deadline, "bctl-rm1 did not grow back to 2 GiB"
                time.sleep(0.1)

    restore()
    yield domain
    restore()


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The CLI's single stderr line (exit 1, no traceback)."""
    assert result.returncode == 1, result
    stderr = result.stderr
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("balloonctl: error: "), stderr
    return lines[0]


def json_of(*args: str) -> dict[str, object]:
    """``balloonctl --json ARGS``: its object (exit 0, nothing on stderr but notices)."""
    result = cli("--json", *args)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    report = json.loads(result.stdout)
    assert isinstance(report, dict)
    return report


def test_list_sees_the_remote_domain_over_tcp_and_tls(
    remote: RemoteLibvirtd, rdomain: Domain
) -> None:
    for uri in (remote.tcp_uri, remote.tls_uri):
        report = json_of("-c", uri, "list")
        rows = {row["vm"]: row for row in report["vms"]}  # type: ignore[attr-defined]
        assert rows[rdomain.name]["uuid"] == rdomain.uuid, uri
        assert rows[rdomain.name]["state"] == "running", uri
        assert rows[rdomain.name]["actual_bytes"] == 2 * GiB, uri


def test_set_wait_over_tcp_moves_the_remote_guest(remote: RemoteLibvirtd, rdomain: Domain) -> None:
    t0 = time.monotonic()
    report = json_of("-c", remote.tcp_uri, "set", rdomain.name, "1536M", "--wait")
    elapsed = time.monotonic() - t0
    assert report["reached"] is True, report
    assert report["target_bytes"] == report["actual_bytes"] == 1536 * MiB, report
    # The witness: the remote libvirtd's own view, on its unix socket.
    assert rdomain.dommemstat()["actual"] * 1024 == 1536 * MiB
    assert elapsed < 60, elapsed


def test_set_wait_over_tls_moves_the_remote_guest(remote: RemoteLibvirtd, rdomain: Domain) -> None:
    report = json_of("-c", remote.tls_uri, "set", rdomain.name, "1G", "--wait")
    assert report["reached"] is True, report
    assert rdomain.dommemstat()["actual"] * 1024 == GiB


def test_stats_over_tls_are_the_guests(remote: RemoteLibvirtd, rdomain: Domain) -> None:
    report = json_of("-c", remote.tls_uri, "stats", rdomain.name)
    stats = report["stats"]
    assert isinstance(stats, dict)
    witness = rdomain.dommemstat()  # KiB, libvirt's names: "available" is total memory
    assert stats["total-memory"] == witness["available"] * 1024
    assert 0 < stats["free-memory"] <= stats["total-memory"]
    assert isinstance(report["last_update"], int) and report["last_update"] > 0


def test_features_over_tcp_name_the_acked_bits(remote: RemoteLibvirtd, rdomain: Domain) -> None:
    report = json_of("-c", remote.tcp_uri, "features", rdomain.name)
    text = json.dumps(report)
    # The domain's balloon has stats and free page reporting on, and the guest acks both:
    # the feature bits came over the wire through the monitor passthrough.
    for name in ("stats-vq", "deflate-on-oom", "page-reporting"):
        assert name in text, report
    assert report["vm"] == rdomain.name


def test_vring_dump_over_tcp_reads_guest_memory_by_peek(
    remote: RemoteLibvirtd, rdomain: Domain
) -> None:
    report = json_of("-c", remote.tcp_uri, "vring", "dump", "--queue", "stats", rdomain.name)
    assert report["error"] is None, report
    queue = report["queue"]
    assert isinstance(queue, dict) and queue["name"] == "stats"
    # The rings and the buffer they name came over the wire (virDomainMemoryPeek).
    assert isinstance(report["read_bytes"], int) and report["read_bytes"] > 0
    chains = report["chains"]
    assert isinstance(chains, list)
    if chains:  # the guest keeps one stats buffer out while the device holds it
        stats = chains[0]["stats"]
        assert stats["total-memory"] == rdomain.dommemstat()["available"] * 1024


def test_tls_without_a_client_certificate_is_one_line(
    remote: RemoteLibvirtd, rdomain: Domain, tmp_path: Path
) -> None:
    # Only the CA: the server asks for a client certificate and there is none to give.
    assert remote.pki is not None
    (tmp_path / "cacert.pem").write_bytes((remote.pki.client_dir / "cacert.pem").read_bytes())
    uri = remote.tls_uri.split("?")[0] + f"?pkipath={tmp_path}"
    line = one_line_error(cli("-c", uri, "stats", rdomain.name))
    assert "cannot reach VM" in line or "cannot connect" in line, line


def test_a_dropped_link_is_one_line_and_exit_1(remote: RemoteLibvirtd, rdomain: Domain) -> None:
    remote.link_down()
    try:
        t0 = time.monotonic()
        result = cli("-c", remote.tcp_uri, "stats", rdomain.name)
        elapsed = time.monotonic() - t0
        line = one_line_error(result)
        assert rdomain.name in line, line
        # Bounded by the connect timeout (or the kernel's unanswered ARP), never a hang.
        assert elapsed < 60, elapsed
    finally:
        remote.link_up()
    # Nothing was sent across: the guest is as it was.
    assert rdomain.dommemstat()["actual"] * 1024 == 2 * GiB


def test_a_killed_remote_libvirtd_is_one_line_and_exit_1(
    remote: RemoteLibvirtd, rdomain: Domain
) -> None:
    remote.libvirtd.stop_daemon()
    try:
        line = one_line_error(cli("-c", remote.tcp_uri, "set", rdomain.name, "1G", "--wait"))
        assert "Connection refused" in line, line
    finally:
        remote.libvirtd.restart()
        remote.wait_reachable()
    # QEMU outlived its libvirtd and nothing reached it.
    assert rdomain.dommemstat()["actual"] * 1024 == 2 * GiB


def test_a_dead_link_to_one_host_does_not_stall_another(
    remote: RemoteLibvirtd, rdomain: Domain, libvirtd: Libvirtd, domain: Domain
) -> None:
    """One process, two hosts (the local libvirtd's ``bctl-lv1`` and the remote's): while
    a call to the remote hangs on the dead link, the local host's calls answer at once.
    Before each URI had its own libvirt worker thread they all timed out with it."""

    async def scenario() -> tuple[str, list[float]]:
        far = LibvirtBackend(rdomain.name, remote.tcp_uri, connect_timeout=5, command_timeout=5)
        near = LibvirtBackend(domain.name, libvirtd.uri, connect_timeout=5, command_timeout=5)
        try:
            assert await far.actual() == 2 * GiB
            assert await near.actual() > 0
            remote.link_down()

            async def hung() -> str:
                try:
                    await far.actual()
                except BalloonError as exc:
                    return str(exc)
                return "answered"

            far_call = asyncio.create_task(hung())
            near_times = []
            for _ in range(6):
                await asyncio.sleep(0.5)
                t0 = time.monotonic()
                await near.actual()
                near_times.append(time.monotonic() - t0)
            return await far_call, near_times
        finally:
            remote.link_up()
            await far.close()
            await near.close()

    far_result, near_times = asyncio.run(scenario())
    assert "did not answer" in far_result, far_result
    assert max(near_times) < 1.0, near_times
