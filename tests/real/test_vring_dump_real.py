"""``balloonctl vring dump`` on real QEMU and the real Linux balloon driver (7.2 + 6.1 or 10.0
+ 6.12, whichever stack runs the tests).

The device-side parser meets rings the real driver wrote: the stats buffer Linux keeps in
flight (QEMU holds it until its next poll), the free page reporting queue while the guest
frees memory, and the inflate queue. What QEMU itself says (``qom-get guest-stats``,
``x-query-virtio-queue-status``) is read on the guest's private monitor to check it.
"""

from __future__ import annotations

import time
from typing import Any, Final

from balloonctl.units import PAGE_SIZE
from balloonctl.virtio import spec
from fixtures.guest import GiB, Guest, MiB
from tests.support.cli import json_out, run_cli

BALLOON: Final = "/machine/peripheral/balloon0"
#: q35 with 2 GiB: everything below 4 GiB, without the legacy VGA/BIOS hole.
RAM_2G: Final = [[0, 0xA0000], [0x100000, 2 * GiB - 0x100000]]
#: Linux 6.1 reports free blocks of page_reporting_order or more, which is pageblock_order
#: (9: 2 MiB) on x86 (mm/page_reporting.c; virtio_balloon only lowers it for 64 KiB pages):
#: each chunk is a whole buddy block, naturally aligned to at least 2 MiB.
REPORT_PAGES: Final = (2 * MiB) // PAGE_SIZE


def dump(guest: Guest, queue: str) -> dict[str, Any]:
    result = run_cli("vring", "dump", str(guest.qmp_path), "--queue", queue, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    out = json_out(result)
    assert out["error"] is None
    return out


def guest_stats(guest: Guest) -> dict[str, Any]:
    reading = guest.execute("qom-get", {"path": BALLOON, "property": "guest-stats"})
    assert isinstance(reading, dict)
    return reading


def queue_status(guest: Guest, index: int) -> dict[str, Any]:
    status = guest.execute(
        "x-query-virtio-queue-status", {"path": guest.balloon_path(), "queue": index}
    )
    assert isinstance(status, dict)
    return status


def ring_size(guest: Guest, index: int) -> int:
    """The queue's size as QEMU reports it: the dump must find the same in the guest's rings.

    QEMU 7.2 gives the balloon's queues 128/128/128/32 entries, QEMU 10 1024 on all four
    (``vring-num-default``, the device's maximum); Linux sets each to that maximum, so the
    size in use (``vring-num``) equals it.
    """
    status = queue_status(guest, index)
    assert status["vring-num"] == status["vring-num-default"], status
    size = status["vring-num"]
    assert isinstance(size, int) and size in (32, 128, 1024), status
    return size


def ring_pages(guest: Guest, index: int) -> int:
    """How many pages the queue's three rings touch, at the addresses QEMU reports.

    Split virtqueue sizes (virtio spec 2.7): descriptor table 16 * n, available ring 6 + 2 * n,
    used ring 6 + 8 * n bytes (both with the event-index word). Linux lays them out in one
    allocation with 64-byte alignment on virtio-pci modern (SMP_CACHE_BYTES), so a 128-entry
    queue fits in one or two pages and a 1024-entry one in seven.
    """
    status = queue_status(guest, index)
    n = status["vring-num"]
    pages: set[int] = set()
    for addr, length in (
        (status["vring-desc"], 16 * n),
        (status["vring-avail"], 6 + 2 * n),
        (status["vring-used"], 6 + 8 * n),
    ):
        pages.update(range(addr // PAGE_SIZE, (addr + length - 1) // PAGE_SIZE + 1))
    return len(pages)


def test_stats_buffer_of_the_real_driver(real_vm: Guest) -> None:
    real_vm.execute(
        "qom-set",
        {"path": BALLOON, "property": "guest-stats-polling-interval", "value": 1},
    )
    deadline = time.monotonic() + 30
    while guest_stats(real_vm)["last-update"] == 0:
        assert time.monotonic() < deadline, "the guest never sent stats"
        time.sleep(0.1)
    # The buffer in flight holds the values QEMU last took from it; the guest refills it
    # every second, so compare within one reading: same last-update before and after.
    while True:
        before = guest_stats(real_vm)
        out = dump(real_vm, "stats")
        after = guest_stats(real_vm)
        if before == after:
            break
        assert time.monotonic() < deadline, "no dump fell within one stats reading"
    queue = out["queue"]
    assert (queue["index"], queue["size"], queue["decode"]) == (2, ring_size(real_vm, 2), "stats")
    assert queue["in_flight"] == 1 == len(out["chains"])
    assert out["ram"] == RAM_2G
    (chain,) = out["chains"]
    # 5.5.6.3: one device-readable buffer of 10-byte entries (Linux: virtqueue_add_outbuf).
    (desc,) = chain["descriptors"]
    assert not desc["flags"] & spec.VIRTQ_DESC_F_WRITE
    assert desc["len"] % spec.STAT_SIZE == 0
    stats = chain["stats"]
    expected = {
        name.removeprefix("stat-"): value for name, value in after["stats"].items() if value != -1
    }
    assert stats == expected
    # Plausible for a 2 GiB guest: the kernel keeps some RAM for itself.
    assert 1.5 * GiB < stats["total-memory"] <= 2 * GiB
    assert 0 < stats["available-memory"] <= stats["total-memory"]
    assert 0 < stats["free-memory"] <= stats["total-memory"]


def test_reporting_queue_while_the_guest_frees_memory(real_vm: Guest) -> None:
    start = dump(real_vm, "reporting")["queue"]
    assert (start["index"], start["size"], start["decode"]) == (3, ring_size(real_vm, 3), "report")
    status, output = real_vm.run(
        "mount -t tmpfs -o size=600m none /mnt && dd if=/dev/zero of=/mnt/f bs=1M count=500"
        " && rm /mnt/f",
        timeout=120,
    )
    assert status == 0, output
    # Linux reports 2 s after the frees (page_reporting_delay); QEMU returns each report
    # as soon as it is kicked, so the window is nearly always empty. What must hold in
    # every dump is checked on each; the queue moving proves it is the reporting queue.
    deadline = time.monotonic() + 60
    while True:
        out = dump(real_vm, "reporting")
        queue = out["queue"]
        assert out["ram"] == RAM_2G
        assert (queue["avail_idx"] - queue["used_idx"]) & 0xFFFF == len(out["chains"])
        for chain in out["chains"]:
            assert chain["rejected"] == []
            assert all(d["flags"] & spec.VIRTQ_DESC_F_WRITE for d in chain["descriptors"])
            for first, count in chain["pages"]:
                addr, size = first * PAGE_SIZE, count * PAGE_SIZE
                assert any(b <= addr and addr + size <= b + n for b, n in RAM_2G)
                assert first % REPORT_PAGES == 0 and count % REPORT_PAGES == 0
        if (queue["used_idx"] - start["used_idx"]) & 0xFFFF >= 2:
            break
        assert time.monotonic() < deadline, f"no free page reports: {queue}"
        time.sleep(0.2)
    # The device agrees on where the queue is.
    assert queue_status(real_vm, 3)["vring-desc"] == queue["desc"]


def test_inflate_queue_of_a_plain_guest(real_vm: Guest) -> None:
    out = dump(real_vm, "inflate")
    queue = out["queue"]
    assert (queue["index"], queue["size"], queue["decode"]) == (0, ring_size(real_vm, 0), "pfn")
    assert out["chains"] == [] and queue["used_idx"] == queue["avail_idx"] == 0
    assert out["read_bytes"] <= ring_pages(real_vm, 0) * PAGE_SIZE  # the rings only
    result = run_cli("set", str(real_vm.qmp_path), "1536M", "--wait", timeout=120)
    assert result.returncode == 0, result.stderr
    after = dump(real_vm, "inflate")["queue"]
    # 512 MiB in arrays of 256 PFNs: 512 buffers, all returned by the device.
    assert after["used_idx"] == after["avail_idx"] == 512
    assert after["used_idx"] == queue_status(real_vm, 0)["used-idx"]
