"""``balloonctl bench real`` runs end to end on a real guest (its numbers go in notes, not
assertions: a benchmark measures, a test checks that it measured)."""

from __future__ import annotations

from fixtures.guest import GiB, Guest, MiB
from tests.support.cli import json_out, run_cli
from tests.support.guests import BootGuest, actual, observer_path


def test_bench_real_times_both_tools_and_sees_the_latency(boot_guest: BootGuest) -> None:
    guest = boot_guest(observer=True)
    observer = observer_path(guest)
    result = run_cli(
        "--json",
        "bench",
        "real",
        "--qmp",
        str(guest.qmp_path),
        "--observer",
        str(observer),
        "--size",
        "256M",
        "--rounds",
        "1",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json_out(result)
    assert report["target_bytes"] == 2 * GiB - 256 * MiB
    for tool in ("balloonctl", "raw"):
        entry = report["tools"][tool]
        assert len(entry["wall_s"]) == 1 and entry["wall_s"][0] > 0
        # The observer saw QEMU reach the target before the contender exited.
        assert len(entry["latency_s"]) == 1 and entry["latency_s"][0] >= 0
    assert report["ratio"] > 0
    assert actual(guest) == 2 * GiB  # left as it was found


def test_bench_real_refuses_a_size_that_is_not_below_ram(real_vm: Guest) -> None:
    result = run_cli("bench", "real", "--qmp", str(real_vm.qmp_path), "--size", "2G")
    assert result.returncode == 2
    assert "--size must be less than the VM's RAM" in result.stderr


def test_bench_real_takes_a_unix_address_and_refuses_tcp(real_vm: Guest) -> None:
    bad = run_cli("bench", "real", "--qmp", "tcp:127.0.0.1:4444")
    assert bad.returncode == 2
    assert "--qmp must be a unix socket" in bad.stderr
    zero = run_cli("bench", "real", "--qmp", str(real_vm.qmp_path), "--size", "0")
    assert zero.returncode == 2
    assert "--size must be positive" in zero.stderr
    # unix:PATH reaches the VM (it got as far as reading its RAM).
    big = run_cli("bench", "real", "--qmp", f"unix:{real_vm.qmp_path}", "--size", "2G")
    assert big.returncode == 2
    assert "--size must be less than the VM's RAM (2 GiB)" in big.stderr
