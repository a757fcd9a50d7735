"""``balloonctl vring dump``: a live VM's balloon queue through the device-side parser.

Two kinds of VM, both reached as a user reaches them, by running the CLI as a process:

* ``balloonctl sim`` processes, whose guest driver model keeps real rings in real guest
  memory (the stats buffer stays in flight, as Linux's does on QEMU);
* a fake QEMU (tests/backends/hostile_peer.py) whose queue addresses and guest memory the
  test writes itself, for what no honest guest does: rings outside RAM, windows wider than
  the queue, buffers in MMIO. Its ``pmemsave`` log proves what was read, and what was not.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import pytest

from balloonctl.cli.vring_commands import i440fx_split, pc_ranges, q35_split
from balloonctl.units import PAGE_SIZE
from balloonctl.virtio import spec
from balloonctl.virtio.layout import RingLayout
from balloonctl.virtio.mock import pfn_array, stats_buffer
from tests.backends.hostile_peer import GiB, HostilePeer, MiB
from tests.support.cli import balloonctl_argv, cli_env, json_out, run_cli
from tests.support.sims import Sim, SimFactory
from tests.support.vring_peer import BUFFERS, LOW, RING_BASE, FakeVm

WRITE: Final = spec.VIRTQ_DESC_F_WRITE


def dump(vm: str, queue: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return run_cli("vring", "dump", vm, "--queue", queue, *extra, timeout=60)


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """stderr is one ``balloonctl: error:`` line, no traceback."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("balloonctl: error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


# --------------------------------------------------------------------------------------------
# Against the simulated VM
# --------------------------------------------------------------------------------------------


def test_stats_queue_holds_the_guests_buffer_in_flight(shared_sim: Sim) -> None:
    result = dump(shared_sim.sock, "stats")
    assert result.returncode == 0, result.stderr
    out = json_out(result)
    queue = out["queue"]
    assert (queue["name"], queue["index"], queue["decode"]) == ("stats", 2, "stats")
    # The device keeps the guest's stats buffer until its next poll: popped, not returned.
    assert queue["in_flight"] == 1 == len(out["chains"])
    assert out["error"] is None
    chain = out["chains"][0]
    # 5.5.6.3: the driver writes the stats, the device reads them.
    assert all(not d["flags"] & WRITE for d in chain["descriptors"])
    assert sum(d["len"] for d in chain["descriptors"]) % spec.STAT_SIZE == 0
    stats = chain["stats"]
    assert stats["total-memory"] == 512 * MiB
    assert 0 < stats["free-memory"] <= stats["total-memory"]
    assert set(stats) <= set(spec.STAT_NAMES.values())
    # The simulated guest's driver is Linux 6.12's: tags 10-15 are in its buffer, by name,
    # and they are the guest's own counters (an idle guest has killed nothing).
    assert set(spec.EXTENDED_STAT_NAMES) <= set(stats)
    assert stats["oom-kills"] == 0
    assert stats["async-scans"] % PAGE_SIZE == 0
    assert chain["pages"] == [] and chain["rejected"] == []
    # Only the ring pages and the stats buffer's page were read. The rings are as large as
    # the device's queue (QEMU 7.2: 128 entries, 10.0: 1024), laid out from a page boundary.
    assert out["ram"] == [[0, 512 * MiB]]
    ring_pages = -(-RingLayout.packed(queue["size"]).end // PAGE_SIZE)
    assert 0 < out["read_bytes"] <= (ring_pages + 1) * PAGE_SIZE


def test_seed_sg_inflate_decodes_as_sg_and_reporting_is_refused(shared_sim: Sim) -> None:
    out = json_out(inflate := dump(shared_sim.sock, "inflate"))
    assert inflate.returncode == 0
    assert out["queue"]["decode"] == "sg"  # the seed profile, sg acked
    # The simulated device serves a kick at once: nothing is left in the window.
    assert out["chains"] == [] and out["queue"]["used_idx"] == out["queue"]["avail_idx"]
    refused = dump(shared_sim.sock, "reporting")
    assert refused.returncode == 1 and refused.stdout == ""
    assert "did not ack page-reporting" in one_line_error(refused)


@pytest.mark.parametrize(
    ("qemu_version", "sizes"),
    # The queue sizes each QEMU gives inflate and reporting (qemu-*/introspect.json).
    [("7.2", (128, 32)), ("10.0", (1024, 1024))],
)
def test_virtio_1_2_queues_after_an_inflate(
    sim_factory: SimFactory, qemu_version: str, sizes: tuple[int, int]
) -> None:
    vm = sim_factory(profile="virtio-1.2", memory="1G", qemu_version=qemu_version)
    assert run_cli("set", vm.sock, "768M", "--wait", timeout=60).returncode == 0
    inflate = json_out(dump(vm.sock, "inflate"))
    assert inflate["queue"]["decode"] == "pfn"  # bit 3 is not SG on a virtio 1.2 device
    assert inflate["queue"]["used_idx"] > 0  # the inflate went through this queue
    assert inflate["chains"] == [] and inflate["error"] is None
    reporting = dump(vm.sock, "reporting")
    assert reporting.returncode == 0, reporting.stderr
    queue = json_out(reporting)["queue"]
    # No free page hinting offered: reporting follows stats (virtio-balloon.c realize).
    assert (queue["index"], queue["decode"]) == (3, "report")
    assert (inflate["queue"]["size"], queue["size"]) == sizes


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["--queue", "free-page"], 2),
        (["--queue", "stats", "--read-limit", "0"], 2),
        (["--queue", "stats", "--read-limit", "lots"], 2),
        ([], 2),
    ],
)
def test_usage_errors(tmp_path: Path, args: list[str], code: int) -> None:
    result = run_cli("vring", "dump", str(tmp_path / "vm.sock"), *args)
    assert result.returncode == code and result.stdout == ""
    assert "Traceback" not in result.stderr


def test_unreachable_vm(tmp_path: Path) -> None:
    result = dump(str(tmp_path / "nothing.sock"), "stats")
    assert result.returncode == 1 and result.stdout == ""
    one_line_error(result)


# --------------------------------------------------------------------------------------------
# Against a fake QEMU whose rings the test writes
# --------------------------------------------------------------------------------------------


def run_fake(vm: FakeVm, sock: Path, queue: str, *extra: str) -> tuple[int, str, str, HostilePeer]:
    """``balloonctl vring dump`` (a process) against ``vm`` served on ``sock``."""

    async def main() -> tuple[int, str, str, HostilePeer]:
        async with HostilePeer(sock, vm) as peer:
            proc = await asyncio.create_subprocess_exec(
                *balloonctl_argv("vring", "dump", str(sock), "--queue", queue, *extra),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=cli_env(),
            )
            out, err = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode is not None
            return proc.returncode, out.decode(), err.decode(), peer

    return asyncio.run(main())


def reads(peer: HostilePeer) -> list[tuple[int, int]]:
    """Every pmemsave the CLI asked for, as (gpa, size)."""
    out = []
    for args in peer.arguments("pmemsave"):
        addr, size = args["val"], args["size"]
        assert isinstance(addr, int) and isinstance(size, int)
        out.append((addr, size))
    return out


def inside(ranges: Sequence[Sequence[int]], addr: int, size: int) -> bool:
    return any(base <= addr and addr + size <= base + length for base, length in ranges)


@pytest.fixture
def sock(sock_dir: Path) -> Path:
    return sock_dir / "qemu.sock"


def test_in_flight_and_pending_chains_decoded(sock: Path) -> None:
    vm = FakeVm()
    driver = vm.queue(0, RingLayout.packed(128, RING_BASE), used_idx=0, last_avail=1)
    vm.mem.write(BUFFERS, pfn_array([0x200, 0x201, 0x202]))
    vm.mem.write(BUFFERS + PAGE_SIZE, pfn_array([0x400]))
    driver.add_chain([(BUFFERS, 12, False)])
    driver.add_chain([(BUFFERS + PAGE_SIZE, 4, False)])
    code, out, err, peer = run_fake(vm, sock, "inflate")
    assert code == 0, err
    report = json.loads(out)
    assert report["queue"]["in_flight"] == 1 and report["queue"]["avail_idx"] == 2
    assert [c["pages"] for c in report["chains"]] == [[[0x200, 3]], [[0x400, 1]]]
    assert report["ram"] == [[0, 2 * GiB]]  # not a PC machine: one range from 0
    # The ring page and the two buffer pages, each once, nothing else.
    pages = [(RING_BASE, PAGE_SIZE), (BUFFERS, PAGE_SIZE), (BUFFERS + PAGE_SIZE, PAGE_SIZE)]
    assert sorted(reads(peer)) == pages
    assert report["read_bytes"] == 3 * PAGE_SIZE


def test_stats_and_reporting_decodes(sock: Path) -> None:
    vm = FakeVm()
    stats = vm.queue(2, RingLayout.packed(128, RING_BASE), last_avail=1)
    entries = [(spec.StatTag.MEMTOT, 2 * GiB), (99, 7), (spec.StatTag.DIRECT_RECLAIMS, 8192)]
    vm.mem.write(BUFFERS, stats_buffer(entries))
    stats.add_chain([(BUFFERS, len(entries) * spec.STAT_SIZE, False)])
    reporting = vm.queue(3, RingLayout.packed(32, RING_BASE + 64 * 1024))
    chunk = 1 * GiB  # inside RAM, far beyond the fake's bytes: a report is never read
    reporting.add_chain([(chunk, 2 * MiB, True), (chunk + 4 * MiB, 4 * MiB, True)])

    code, out, err, _ = run_fake(vm, sock, "stats")
    assert code == 0, err
    (chain,) = json.loads(out)["chains"]
    assert chain["stats"] == {"total-memory": 2 * GiB, "tag-99": 7, "direct-reclaims": 8192}

    code, out, err, peer = run_fake(vm, sock, "reporting")
    assert code == 0, err
    (chain,) = json.loads(out)["chains"]
    assert chain["pages"] == [[chunk // PAGE_SIZE, 512], [(chunk + 4 * MiB) // PAGE_SIZE, 1024]]
    assert all(addr + size <= LOW for addr, size in reads(peer))


def test_readable_report_is_wrong_direction(sock: Path) -> None:
    vm = FakeVm()
    vm.queue(3, RingLayout.packed(32, RING_BASE)).add_chain([(BUFFERS, 2 * MiB, False)])
    code, out, _, _ = run_fake(vm, sock, "reporting")
    assert code == 3
    assert json.loads(out)["error"]["type"] == "WrongDirection"


@pytest.mark.parametrize(
    "addr",
    [2 * GiB, 0xFEBF_0000, (1 << 64) - 8],
    ids=["past-ram", "mmio", "wraps"],
)
def test_buffer_outside_ram_is_never_read(sock: Path, addr: int) -> None:
    vm = FakeVm()
    vm.queue(0, RingLayout.packed(128, RING_BASE)).add_chain([(addr, 16, False)])
    code, out, _, peer = run_fake(vm, sock, "inflate")
    assert code == 3
    report = json.loads(out)
    assert report["error"]["type"] == "BufferOutOfBounds" and report["error"]["head"] == 0
    assert reads(peer) == [(RING_BASE, PAGE_SIZE)]


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("vring-desc", (1 << 64) - 16, "RingOutOfBounds"),
        ("vring-used", 2 * GiB - 8, "RingOutOfBounds"),
        ("vring-avail", RING_BASE + 2049, "RingMisaligned"),
        ("vring-num", 100, "QueueSizeInvalid"),
        ("vring-num", 65536, "QueueSizeInvalid"),
    ],
)
def test_hostile_queue_status_is_refused_before_any_read(
    sock: Path, field: str, value: int, error: str
) -> None:
    vm = FakeVm()
    vm.queue(0, RingLayout.packed(128, RING_BASE))
    vm.queues[0][field] = value
    code, out, _, peer = run_fake(vm, sock, "inflate")
    assert code == 3
    assert json.loads(out)["error"]["type"] == error
    assert reads(peer) == []


def test_queue_status_beyond_64_bits_is_peer_nonsense(sock: Path) -> None:
    vm = FakeVm()
    vm.queue(0, RingLayout.packed(128, RING_BASE))
    vm.queues[0]["vring-desc"] = 1 << 64
    code, out, err, peer = run_fake(vm, sock, "inflate")
    assert code == 1 and out == ""
    assert "vring-desc" in err and "Traceback" not in err
    assert reads(peer) == []


def test_window_wider_than_the_queue_is_avail_index_jump(sock: Path) -> None:
    vm = FakeVm()
    driver = vm.queue(0, RingLayout.packed(128, RING_BASE), used_idx=65530, last_avail=65531)
    driver.set_avail_idx(65530 + 129)  # wraps: 129 entries past used-idx, N is 128
    code, out, _, peer = run_fake(vm, sock, "inflate")
    assert code == 3
    report = json.loads(out)
    assert report["error"]["type"] == "AvailIndexJump" and report["chains"] == []
    assert reads(peer) == [(RING_BASE, PAGE_SIZE)]


def test_read_limit_stops_the_dump(sock: Path) -> None:
    vm = FakeVm()
    driver = vm.queue(0, RingLayout.packed(128, RING_BASE))
    vm.mem.write(BUFFERS, pfn_array([0x200]))
    driver.add_chain([(BUFFERS, 4, False)])
    code, out, err, peer = run_fake(vm, sock, "inflate", "--read-limit", "4K")
    assert code == 1 and out == ""
    assert "--read-limit" in err and "Traceback" not in err
    assert reads(peer) == [(RING_BASE, PAGE_SIZE)]  # the buffer's page was not fetched


def test_q35_layout_from_the_host_bridge(sock: Path) -> None:
    below, above = 2 * GiB, 2 * GiB
    vm = FakeVm(ram=4 * GiB, machine="pc-q35-7.2-machine", host_split=(below, above))
    vm.queue(3, RingLayout.packed(32, RING_BASE)).add_chain([(4 * GiB + 2 * MiB, 2 * MiB, True)])
    code, out, err, _ = run_fake(vm, sock, "reporting")
    assert code == 0, err
    report = json.loads(out)
    assert report["ram"] == [[0, 0xA0000], [0x100000, below - 0x100000], [4 * GiB, above]]
    assert report["chains"][0]["pages"] == [[(4 * GiB + 2 * MiB) // PAGE_SIZE, 512]]


@pytest.mark.parametrize(
    "addr", [0xA0000, 3 * GiB, 6 * GiB], ids=["legacy-vga", "pci-hole", "past-ram"]
)
def test_q35_holes_are_out_of_bounds(sock: Path, addr: int) -> None:
    # No host bridge properties: the split is computed as pc_q35.c does.
    vm = FakeVm(ram=4 * GiB, machine="pc-q35-7.2-machine")
    vm.queue(3, RingLayout.packed(32, RING_BASE)).add_chain([(addr, PAGE_SIZE, True)])
    code, out, _, _ = run_fake(vm, sock, "reporting")
    assert code == 3
    assert json.loads(out)["error"]["type"] == "BufferOutOfBounds"


def test_pc_ram_splits() -> None:
    # hw/i386/pc_q35.c: below 0xb0000000 all fits; from there the split is at 2 GiB.
    assert q35_split(2 * GiB) == (2 * GiB, 0)
    assert q35_split(0xB000_0000 - PAGE_SIZE) == (0xB000_0000 - PAGE_SIZE, 0)
    assert q35_split(0xB000_0000) == (2 * GiB, 0x3000_0000)
    assert q35_split(8 * GiB, max_ram_below_4g=1 * GiB) == (1 * GiB, 7 * GiB)
    # hw/i386/pc_piix.c: up to 3.5 GiB fits; larger splits at 3 GiB (gigabyte_align).
    assert i440fx_split(0xE000_0000 - PAGE_SIZE) == (0xE000_0000 - PAGE_SIZE, 0)
    assert i440fx_split(4 * GiB) == (3 * GiB, 1 * GiB)
    assert pc_ranges(512 * 1024, 0) == ((0, 512 * 1024),)
    assert pc_ranges(2 * GiB, 1 * GiB) == (
        (0, 0xA0000),
        (0x100000, 2 * GiB - 0x100000),
        (4 * GiB, 1 * GiB),
    )
