"""Every VM command of the CLI against a real QEMU running a real Linux guest (TCG): QEMU 7.2
and Linux 6.1 on Debian 12, QEMU 10.0 and Linux 6.12 on Debian 13.

The CLI runs as a subprocess on the guest's QMP socket, as a user's shell runs it; what it
says is checked against QEMU itself (``query-balloon``, ``qom-get guest-stats``,
``x-query-virtio-status``) on the guest's second, private monitor, and against the guest's
own view (``/proc/meminfo`` through the command channel).
"""

from __future__ import annotations

import json
import time
from typing import Any

from balloonctl.virtio.spec import EXTENDED_STAT_NAMES
from fixtures.guest import GiB, Guest, MiB, reports_extended_stats
from tests.support.cli import json_out, run_cli
from tests.support.guests import (
    BALLOON_ON_ROOT_BUS,
    CLI_TIMEOUT,
    ROOT_PORT,
    BootGuest,
    actual,
    wait_for,
)


def cli(guest: Guest, *args: str, timeout: float = CLI_TIMEOUT) -> Any:
    """``balloonctl --json ARGS`` with the guest's socket put where ``VM`` goes; exit 0."""
    argv = [a.replace("VM", str(guest.qmp_path)) if a == "VM" else a for a in args]
    result = run_cli("--json", *argv, timeout=timeout)
    assert result.returncode == 0, (argv, result.stderr)
    assert "Traceback" not in result.stderr
    return json_out(result)


def virtio_names(guest: Guest, key: str) -> set[str]:
    """Feature names QEMU lists under ``key`` (host-features/guest-features), sans text."""
    status = guest.execute("x-query-virtio-status", {"path": guest.balloon_path()})
    names: set[str] = set()
    for group in ("dev-features", "transports"):
        for entry in status[key].get(group, []):
            names.add(str(entry).split(":", 1)[0].strip())
    return names


# --- set ----------------------------------------------------------------------------------


def test_set_wait_inflates_and_deflates_as_qemu_and_the_guest_see_it(real_vm: Guest) -> None:
    before = real_vm.meminfo()
    report = cli(real_vm, "set", "VM", "1G", "--wait")
    assert report["reached"] is True
    assert report["target_bytes"] == 1 * GiB
    assert abs(report["actual_bytes"] - 1 * GiB) < 4096
    assert actual(real_vm) == report["actual_bytes"]  # QEMU agrees, after the CLI is gone
    # The guest gave the memory: with deflate-on-oom Linux keeps MemTotal, but the pages
    # are the balloon's, not free (virtio_balloon.c: adjust_managed_page_count only
    # without DEFLATE_ON_OOM).
    after = real_vm.meminfo()
    # Free pages on the per-CPU lists count as free (Linux 6.12 keeps hundreds of MiB there
    # for seconds after a deflate; fixtures/guest.py parse_meminfo).
    assert before["FreeInclPcp"] - after["FreeInclPcp"] > 900 * MiB, (before, after)

    back = cli(real_vm, "set", "VM", "2G", "--wait")
    assert back["reached"] is True
    assert actual(real_vm) == 2 * GiB
    assert real_vm.meminfo()["FreeInclPcp"] > after["FreeInclPcp"] + 900 * MiB


def test_set_without_wait_returns_at_once_and_the_guest_gets_there(real_vm: Guest) -> None:
    report = cli(real_vm, "set", "VM", "1536M")
    assert report["target_bytes"] == 1536 * MiB
    assert report["elapsed_s"] == 0.0
    wait_for(lambda: actual(real_vm) == 1536 * MiB, 60, "the guest to reach 1536 MiB")


def test_set_above_ram_is_clamped_with_a_notice(real_vm: Guest) -> None:
    cli(real_vm, "set", "VM", "1G", "--wait")
    result = run_cli("--json", "set", str(real_vm.qmp_path), "8G", "--wait", timeout=CLI_TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert "more than the VM's RAM" in result.stderr
    assert json_out(result)["target_bytes"] == 2 * GiB
    assert actual(real_vm) == 2 * GiB


def test_status_agrees_with_qemu(real_vm: Guest) -> None:
    report = cli(real_vm, "status", "VM")
    assert report["max_bytes"] == 2 * GiB
    assert report["actual_bytes"] == actual(real_vm)
    assert report["features"]["profile"] == "virtio-1.2"
    assert report["features"]["driver_ok"] is True


# --- the guest refusing -------------------------------------------------------------------


def test_unreachable_target_times_out_with_what_was_reached(real_vm: Guest) -> None:
    # 1.2 GiB the guest cannot give up: tmpfs pages are not reclaimable without swap.
    status, out = real_vm.run(
        "mount -t tmpfs -o size=1300m none /mnt && dd if=/dev/zero of=/mnt/f bs=1M count=1200",
        timeout=180,
    )
    assert status == 0, out
    result = run_cli("--json", "set", str(real_vm.qmp_path), "256M", "--wait", "--timeout", "8")
    assert result.returncode == 1, result.stderr
    report = json_out(result)
    assert report["reached"] is False
    # Linux's balloon allocates with __GFP_NORETRY: it stops short ("Out of puff") rather
    # than OOM-kill, and keeps what the tmpfs holds.
    assert report["actual_bytes"] > 1200 * MiB
    assert report["actual_bytes"] == actual(real_vm)
    line = result.stderr.strip()
    assert "\n" not in line and "timed out after 8 s; reached" in line, line
    assert real_vm.run("echo alive")[1].strip() == "alive"  # nothing was killed


def test_deflate_on_oom_gives_memory_back_when_the_guest_fills_it(real_vm: Guest) -> None:
    cli(real_vm, "set", "VM", "1G", "--wait")
    # 1400 MiB does not fit in the 1 GiB the guest has left: the OOM notifier of the
    # balloon driver (VIRTIO_BALLOON_F_DEFLATE_ON_OOM, spec 5.5.6.1) deflates instead of a kill.
    status, out = real_vm.run(
        "mount -t tmpfs -o size=1700m none /mnt && dd if=/dev/zero of=/mnt/f bs=1M count=1400",
        timeout=300,
    )
    assert status == 0, out
    assert "Killed" not in out
    grown = actual(real_vm)
    assert grown > 1 * GiB + 300 * MiB, grown
    # What it took back it keeps until the host asks again (docs/real-qemu.md, Deflate-on-OOM).
    real_vm.run("rm /mnt/f")
    assert actual(real_vm) >= grown


# --- stats --------------------------------------------------------------------------------


def test_stats_agree_with_qom_get_guest_stats(real_vm: Guest) -> None:
    first = cli(real_vm, "stats", "VM", "--period", "1")
    assert first["last_update"] > 0
    for _ in range(20):
        report = cli(real_vm, "stats", "VM")
        raw = real_vm.execute(
            "qom-get", {"path": "/machine/peripheral/balloon0", "property": "guest-stats"}
        )
        if raw["last-update"] == report["last_update"]:
            break
    else:
        raise AssertionError("never read the same guest reading twice in 20 tries")
    expected = {
        name.removeprefix("stat-"): value
        for name, value in raw["stats"].items()
        if value not in (-1, (1 << 64) - 1)
    }
    assert report["stats"] == expected
    total = report["stats"]["total-memory"]
    assert 1800 * MiB < total <= 2 * GiB  # the kernel's MemTotal, in bytes
    assert real_vm.meminfo()["MemTotal"] == total
    assert 0 < report["stats"]["available-memory"] <= total
    period = real_vm.execute(
        "qom-get",
        {"path": "/machine/peripheral/balloon0", "property": "guest-stats-polling-interval"},
    )
    assert period == 1


#: Without deflate-on-oom, so that running out of memory kills a program.
BALLOON_WITHOUT_DOO = "virtio-balloon-pci,id=balloon0,bus=rp1,free-page-reporting=on"


def _stats_when(guest: Guest, ready: Any, what: str) -> dict[str, Any]:
    """``stats --json`` readings (1 s polling) until ``ready(stats)`` holds, within 60 s."""
    deadline = time.monotonic() + 60
    while True:
        stats = cli(guest, "stats", "VM")["stats"]
        if ready(stats):
            return dict(stats)
        assert time.monotonic() < deadline, f"gave up waiting for {what}: {stats}"
        time.sleep(0.5)


def test_the_guests_own_pressure_statistics_follow_its_kernel_and_qemu(
    boot_guest: BootGuest,
) -> None:
    """Linux 6.12 on QEMU 9.2+ reports OOM kills and reclaim (tags 10-15); older stacks none.

    The guest is squeezed to 512 MiB without deflate-on-oom, then a shell builds a 700 MB
    string: it is OOM-killed (status 137) and, on the way, the guest reclaims directly.
    """
    guest = boot_guest(devices=(ROOT_PORT, BALLOON_WITHOUT_DOO))
    extended = reports_extended_stats(guest.image.kernel_release, guest.execute("query-version"))
    cli(guest, "stats", "VM", "--period", "1")
    before = _stats_when(guest, lambda s: "total-memory" in s, "the first reading")
    assert ("oom-kills" in before) is extended, before
    cli(guest, "set", "VM", "512M", "--wait")

    status, out = guest.run("sh -c 'a=$(head -c 700m /dev/zero | tr \"\\000\" x)'", timeout=300)
    assert status == 137, (status, out)  # SIGKILL: the OOM killer's
    _, dmesg = guest.run("dmesg | grep -c 'Out of memory: Killed process'")
    assert int(dmesg.strip() or 0) >= 1, dmesg

    if not extended:
        # QEMU 7.2 has no names for tags 10-15 (and Linux 6.1 sends none): nothing is shown,
        # neither by balloonctl nor by QEMU, rather than a made-up zero.
        after = cli(guest, "stats", "VM")["stats"]
        assert not set(EXTENDED_STAT_NAMES) & set(after), after
        raw = guest.execute(
            "qom-get", {"path": "/machine/peripheral/balloon0", "property": "guest-stats"}
        )
        assert not {f"stat-{n}" for n in EXTENDED_STAT_NAMES} & set(raw["stats"]), raw
        return
    after = _stats_when(
        guest, lambda s: s["oom-kills"] > before["oom-kills"], "the OOM kill to be reported"
    )
    assert set(EXTENDED_STAT_NAMES) <= set(after)
    assert after["oom-kills"] == before["oom-kills"] + 1
    # Running out of memory went through direct reclaim first (alloc-stalls). This guest has
    # no swap and no evictable page cache (its files live in the initramfs), so reclaim
    # finds nothing to scan: the scan and reclaim counters may stay where they were. They
    # are bytes of whole pages (pages_to_bytes in the driver).
    assert after["alloc-stalls"] > before["alloc-stalls"]
    assert after["direct-scans"] % 4096 == 0 and after["direct-reclaims"] % 4096 == 0
    for name in EXTENDED_STAT_NAMES:  # counters since boot: they never go back
        assert after[name] >= before[name], name


# --- features and negotiate ----------------------------------------------------------------


def test_features_decode_what_qemu_offers_and_the_guest_acks(real_vm: Guest) -> None:
    report = cli(real_vm, "features", "VM")
    assert report["profile"] == "virtio-1.2"
    assert report["sg"] == {"offered": False, "acked": False}
    offered, acked = set(report["offered"]), set(report["acked"])
    assert {"stats-vq", "deflate-on-oom", "page-reporting", "version-1"} <= acked
    assert acked <= offered
    assert "sg" not in offered and "free-page-hint" not in offered
    host = virtio_names(real_vm, "host-features")
    assert ("VIRTIO_BALLOON_F_REPORTING" in host) == ("page-reporting" in offered)
    guest = virtio_names(real_vm, "guest-features")
    assert ("VIRTIO_BALLOON_F_DEFLATE_ON_OOM" in guest) == ("deflate-on-oom" in acked)
    human = run_cli("features", str(real_vm.qmp_path))
    assert human.returncode == 0
    assert "SG does not exist on this device" in human.stdout


def test_negotiate_replugs_the_balloon_and_the_guest_reprobes(real_vm: Guest) -> None:
    cli(real_vm, "set", "VM", "1536M", "--wait")
    cli(real_vm, "stats", "VM", "--period", "2")
    report = cli(real_vm, "negotiate", "VM", "--disable", "page-reporting", "--yes")
    assert "page-reporting" not in report["offered"]
    assert "deflate-on-oom" in report["acked"]
    # QEMU agrees, and the new device has a running driver again.
    assert "VIRTIO_BALLOON_F_REPORTING" not in virtio_names(real_vm, "host-features")
    assert real_vm.driver_ok()
    # The target survived the replug, the stats period too, and the new balloon works.
    wait_for(lambda: actual(real_vm) == 1536 * MiB, 60, "the re-probed guest to re-inflate")
    period = real_vm.execute(
        "qom-get",
        {"path": "/machine/peripheral/balloon0", "property": "guest-stats-polling-interval"},
    )
    assert period == 2
    assert cli(real_vm, "set", "VM", "1G", "--wait")["reached"] is True
    # And back.
    again = cli(real_vm, "negotiate", "VM", "--enable", "page-reporting", "--yes")
    assert "page-reporting" in again["acked"]


def test_negotiate_refuses_a_balloon_on_a_bus_without_hotplug(boot_guest: BootGuest) -> None:
    guest = boot_guest(devices=(ROOT_PORT, BALLOON_ON_ROOT_BUS))
    result = run_cli("negotiate", str(guest.qmp_path), "--disable", "page-reporting", "--yes")
    assert result.returncode == 1, result.stderr
    line = result.stderr.strip()
    assert "\n" not in line and "cannot hotplug" in line, line
    # Untouched: still there, still driven, still offering reporting.
    assert guest.driver_ok()
    assert "VIRTIO_BALLOON_F_REPORTING" in virtio_names(guest, "host-features")


def test_negotiate_sg_on_a_real_qemu_is_refused_with_the_sg_story(real_vm: Guest) -> None:
    result = run_cli("negotiate", str(real_vm.qmp_path), "--enable", "sg", "--yes")
    assert result.returncode == 1, result.stderr
    line = result.stderr.strip()
    assert "\n" not in line and "SG does not exist on this device" in line, line
    # Refused before anything was unplugged: the same device still offers reporting.
    assert real_vm.driver_ok()
    assert "VIRTIO_BALLOON_F_REPORTING" in virtio_names(real_vm, "host-features")


# --- list ---------------------------------------------------------------------------------


def test_list_shows_a_configured_real_vm(real_vm: Guest, tmp_path: Any) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[[vm]]\nname = "real"\nqmp = "{real_vm.qmp_path}"\nmin = "512M"\n')
    result = run_cli("--json", "--config", str(config), "list")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    (entry,) = [vm for vm in report["vms"] if vm["vm"] == "real"]
    assert entry["state"] == "running"
    assert entry["max_bytes"] == 2 * GiB
    assert entry["actual_bytes"] == actual(real_vm)
    # The floor holds against the real VM as well: refused before anything is sent.
    refused = run_cli("--config", str(config), "set", "real", "256M")
    assert refused.returncode == 2
    assert actual(real_vm) == 2 * GiB
