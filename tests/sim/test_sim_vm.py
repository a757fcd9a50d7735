"""The simulated VM through its real QMP socket: balloon, stats, hotplug, OOM, pmemsave."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from balloonctl.sim.machine import SimMachine
from balloonctl.virtio.inspect import Decode, RingParams, parse_ring
from balloonctl.virtio.memory import GuestMemory, Region
from tests.support.machine import running_vm, wait_driver_ok
from tests.support.qmp import RawQmp

MiB = 1 << 20
BALLOON = "/machine/peripheral/balloon0"
BACKEND = f"{BALLOON}/virtio-backend"


def run(coro_fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(coro_fn())


async def actual(client: RawQmp) -> int:
    value: int = (await client.ok("query-balloon"))["actual"]
    return value


async def wait_actual(client: RawQmp, target: int, timeout: float = 10.0) -> float:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    while await actual(client) != target:
        assert loop.time() - t0 < timeout, f"actual stuck at {await actual(client)}"
        await asyncio.sleep(0.01)
    return loop.time() - t0


def test_inflate_and_deflate_reach_the_target_and_the_device_agrees(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_vm(tmp_path) as (vm, qmp):
            assert await actual(qmp) == 256 * MiB
            assert await qmp.ok("balloon", {"value": 100 * MiB}) == {}
            await wait_actual(qmp, 100 * MiB)
            balloon = vm.balloon
            assert balloon is not None and balloon.driver is not None
            # The guest's allocator, the driver and the device hold the same pages.
            assert balloon.device.balloon_pages == (156 * MiB) >> 12
            assert balloon.driver.balloon.pages == (156 * MiB) >> 12
            await qmp.ok("balloon", {"value": 256 * MiB})
            await wait_actual(qmp, 256 * MiB)
            assert balloon.device.balloon_pages == 0

    run(body)


def test_inflation_takes_time_at_the_configured_rate(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_vm(tmp_path, memory=512 * MiB, rate=256 * MiB) as (_, qmp):
            await qmp.ok("balloon", {"value": 256 * MiB})
            seen = []
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            while (a := await actual(qmp)) != 256 * MiB:
                seen.append(a)
                await asyncio.sleep(0.05)
                assert loop.time() - t0 < 10
            # 256 MiB at 256 MiB/s: several intermediate values, strictly moving down.
            assert len(set(seen)) >= 4
            assert seen == sorted(seen, reverse=True)

    run(body)


def test_balloon_change_events_are_throttled_to_one_a_second(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_vm(tmp_path, memory=512 * MiB, rate=200 * MiB) as (_, qmp):
            await qmp.ok("balloon", {"value": 128 * MiB})
            await wait_actual(qmp, 128 * MiB)
            await asyncio.sleep(1.1)  # the last event comes when the period ends
            await qmp.ok("query-status")  # collects the events that arrived
            events = [e for e in qmp.events if e["event"] == "BALLOON_CHANGE"]
            assert events[-1]["data"]["actual"] == 128 * MiB
            assert len(events) >= 2
            stamps = [
                e["timestamp"]["seconds"] + e["timestamp"]["microseconds"] / 1e6 for e in events
            ]
            # Each event is built when actual changes; one goes out per period, so the
            # ones that do go out are at least a period apart, except the final catch-up.
            gaps = [b - a for a, b in itertools.pairwise(stamps)]
            assert all(g > 0 for g in gaps)
            assert len(events) <= 2 + int(sum(gaps)) + 1

    run(body)


#: ``balloon`` with a size <= 0 names 7.2's internal parameter, 10.0's QAPI member
#: (fixtures/transcripts/qemu-*/balloon.json).
SIZE_PARAMETER = {"7.2": "target", "10.0": "value"}


@pytest.mark.parametrize("qemu_version", sorted(SIZE_PARAMETER))
@pytest.mark.parametrize(
    ("arguments", "error"),
    [
        ({"value": 0}, ("GenericError", "Parameter '{size}' expects a size")),
        ({"value": -1}, ("GenericError", "Parameter '{size}' expects a size")),
        (
            {"value": "1G"},
            ("GenericError", "Invalid parameter type for 'value', expected: integer"),
        ),
        ({"value": 1.5}, ("GenericError", "Invalid parameter type for 'value', expected: integer")),
        ({}, ("GenericError", "Parameter 'value' is missing")),
        ({"value": 1 << 30, "x": 1}, ("GenericError", "Parameter 'x' is unexpected")),
    ],
)
def test_balloon_argument_errors_are_qemus(
    tmp_path: Path, arguments: dict[str, Any], error: tuple[str, str], qemu_version: str
) -> None:
    async def body() -> None:
        async with running_vm(tmp_path, qemu_version=qemu_version) as (vm, qmp):
            reply = await qmp.call("balloon", arguments)
            desc = error[1].format(size=SIZE_PARAMETER[qemu_version])
            assert reply["error"] == {"class": error[0], "desc": desc}
            assert vm.balloon is not None and vm.balloon.device.config.num_pages == 0

    run(body)


def test_a_target_above_ram_clamps_to_no_balloon(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_vm(tmp_path) as (vm, qmp):
            await qmp.ok("balloon", {"value": 128 * MiB})
            await wait_actual(qmp, 128 * MiB)
            await qmp.ok("balloon", {"value": 64 << 30})
            await wait_actual(qmp, 256 * MiB)
            assert vm.balloon is not None and vm.balloon.device.config.num_pages == 0

    run(body)


def test_memory_the_guest_cannot_give_up_is_never_ballooned_and_the_driver_retries(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        # 256 MiB guest, 64 MiB kernel, idle workload (10% anon, 5% cache).
        async with running_vm(tmp_path, kernel=64 * MiB) as (vm, qmp):
            await asyncio.sleep(0.6)  # the workload takes its memory
            await qmp.ok("balloon", {"value": 16 * MiB})
            await asyncio.sleep(1.0)
            first = await actual(qmp)
            await asyncio.sleep(0.5)
            assert await actual(qmp) == first  # stuck ...
            # ... at kernel + programs (+ ring pages), above the target
            assert first >= 64 * MiB + (256 * MiB * 10 // 100) - 4 * MiB
            assert vm.balloon is not None
            target_pages = vm.balloon.device.config.num_pages
            assert vm.balloon.actual_pages < target_pages
            # Raising the target to something reachable completes it.
            await qmp.ok("balloon", {"value": first + 8 * MiB})
            await wait_actual(qmp, first + 8 * MiB)

    run(body)


def test_stats_refresh_at_the_polling_interval(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_vm(tmp_path, workload="steady") as (_, qmp):
            assert (
                await qmp.ok(
                    "qom-get", {"path": BALLOON, "property": "guest-stats-polling-interval"}
                )
                == 0
            )
            await qmp.ok(
                "qom-set",
                {"path": BALLOON, "property": "guest-stats-polling-interval", "value": 1},
            )
            first = await qmp.ok("qom-get", {"path": BALLOON, "property": "guest-stats"})
            await asyncio.sleep(2.2)
            later = await qmp.ok("qom-get", {"path": BALLOON, "property": "guest-stats"})
            assert later["last-update"] > first["last-update"]
            stats = later["stats"]
            assert stats["stat-total-memory"] == 256 * MiB
            assert 0 < stats["stat-free-memory"] <= stats["stat-available-memory"]
            assert stats["stat-available-memory"] == (
                stats["stat-free-memory"] + stats["stat-disk-caches"]
            )
            # steady: 40% anon wanted, so no more than 60% free
            assert stats["stat-free-memory"] < 256 * MiB * 60 // 100

    run(body)


def _guest_stats_as_linux_sends_them(vm: SimMachine) -> dict[str, int]:
    """The simulated guest's counters converted as update_balloon_vm_stats does."""
    events = vm.guest.events
    return {
        "stat-oom-kills": events.oom_kill,
        "stat-alloc-stalls": events.allocstall,
        "stat-async-scans": events.pgscan_kswapd * 4096,
        "stat-direct-scans": events.pgscan_direct * 4096,
        "stat-async-reclaims": events.pgsteal_kswapd * 4096,
        "stat-direct-reclaims": events.pgsteal_direct * 4096,
    }


def test_guest_stats_name_tags_10_to_15(tmp_path: Path) -> None:
    """The simulated VM answers as a QEMU that names them (9.2+) unless told otherwise; its
    guest sends them as Linux 6.12 does. (QEMU 7.2's ten: tests/sim/test_transcripts.py.)"""

    async def body() -> None:
        async with running_vm(tmp_path) as (vm, qmp):
            await qmp.ok(
                "qom-set",
                {"path": BALLOON, "property": "guest-stats-polling-interval", "value": 1},
            )
            await asyncio.sleep(1.2)
            reply = await qmp.ok("qom-get", {"path": BALLOON, "property": "guest-stats"})
            stats = reply["stats"]
            assert len(stats) == 16
            extended = {name: stats[name] for name in _guest_stats_as_linux_sends_them(vm)}
            # An idle guest's counters, as the guest has them (nothing moved since the poll).
            assert extended == _guest_stats_as_linux_sends_them(vm)
            assert extended["stat-oom-kills"] == 0

    run(body)


def test_polling_interval_errors(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_vm(tmp_path) as (_, qmp):
            prop = {"path": BALLOON, "property": "guest-stats-polling-interval"}
            reply = await qmp.call("qom-set", {**prop, "value": -1})
            assert reply["error"]["desc"] == "timer value must be greater than zero"
            reply = await qmp.call("qom-get", {"path": "/machine/peripheral/nope", "property": "x"})
            assert reply["error"]["class"] == "DeviceNotFound"

    run(body)


def test_deflate_on_oom_gives_the_workload_the_balloons_pages(tmp_path: Path) -> None:
    async def body() -> None:
        # leak: anon grows 1% of RAM a (scaled) second; at 20x it needs the balloon's pages
        # within a few seconds.
        async with running_vm(tmp_path, workload="leak", time_scale=20.0) as (vm, qmp):
            await qmp.ok("balloon", {"value": 96 * MiB})
            await wait_actual(qmp, 96 * MiB)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            while await actual(qmp) <= 140 * MiB:
                assert loop.time() - t0 < 10, "deflate-on-OOM never gave pages back"
                await asyncio.sleep(0.1)
            assert vm.balloon is not None and vm.balloon.driver is not None
            assert vm.balloon.driver.oom_deflated > 0
            # The target did not change: the host still asks for 96 MiB.
            assert vm.balloon.device.config.num_pages == (160 * MiB) >> 12
            # Linux's counters: allocations stalled in direct reclaim before the OOM
            # notifier ran, and the notifier's pages spared every program (no OOM kill).
            assert vm.guest.events.allocstall > 0
            assert vm.guest.oom_kills == 0

    run(body)


def test_without_deflate_on_oom_the_guest_ooms_and_the_balloon_holds(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_vm(tmp_path, workload="leak", time_scale=20.0) as (vm, qmp):
            await replug(qmp, {"deflate-on-oom": False})
            await qmp.ok("balloon", {"value": 160 * MiB})
            await wait_actual(qmp, 160 * MiB)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            while vm.guest.oom_kills == 0:
                assert loop.time() - t0 < 10, "the leak never ran out of memory"
                await asyncio.sleep(0.1)
            assert await actual(qmp) == 160 * MiB
            # The next stats reading carries the kill, and the stalls before it.
            await qmp.ok(
                "qom-set",
                {"path": BALLOON, "property": "guest-stats-polling-interval", "value": 1},
            )
            await asyncio.sleep(1.2)
            stats = (await qmp.ok("qom-get", {"path": BALLOON, "property": "guest-stats"}))["stats"]
            assert stats["stat-oom-kills"] >= 1
            assert stats["stat-alloc-stalls"] >= stats["stat-oom-kills"]

    run(body)


async def replug(qmp: RawQmp, props: dict[str, bool]) -> None:
    """Unplug balloon0 and plug it back on rp1 with ``props`` (JSON booleans, which QEMU 7.2
    and 10.0 both take; 10.0 refuses 7.2's "on"/"off" strings)."""
    assert await qmp.ok("device_del", {"id": "balloon0"}) == {}
    await qmp.wait_event("DEVICE_DELETED")
    await qmp.wait_event("DEVICE_DELETED")
    await qmp.ok(
        "device_add", {"driver": "virtio-balloon-pci", "id": "balloon0", "bus": "rp1", **props}
    )
    await wait_driver_ok(qmp)


#: Where QEMU 7.2 and 10.0 answer hot-unplug and replug differently (qemu-*/hotplug.json):
#: x-query-virtio without a device, the spelling device_add takes for a bool property, and
#: a second balloon on the occupied root port (10.0's PCI slot check comes first).
REPLUG: dict[str, dict[str, Any]] = {
    "7.2": {
        "no_virtio": {"return": []},
        "on": "on",
        "off": "off",
        "occupied": "Only one balloon device is supported",
    },
    "10.0": {
        "no_virtio": {"error": {"class": "GenericError", "desc": "No virtio devices found"}},
        "on": True,
        "off": False,
        "occupied": "PCI: slot 0 function 0 already occupied by virtio-balloon-pci, new func "
        "virtio-balloon-pci cannot be exposed to guest.",
    },
}


@pytest.mark.parametrize("qemu_version", sorted(REPLUG))
def test_hot_unplug_gives_ballooned_memory_back_and_replug_renegotiates(
    tmp_path: Path, qemu_version: str
) -> None:
    facts = REPLUG[qemu_version]

    async def body() -> None:
        async with running_vm(tmp_path, qemu_version=qemu_version) as (vm, qmp):
            status = await qmp.ok("x-query-virtio-status", {"path": BACKEND})
            assert any("VIRTIO_BALLOON_F_SG" in f for f in status["guest-features"]["dev-features"])
            await qmp.ok("balloon", {"value": 128 * MiB})
            await wait_actual(qmp, 128 * MiB)
            free_before = vm.guest.free_pages()
            assert await qmp.ok("device_del", {"id": "balloon0"}) == {}
            # QEMU answers a repeated request while the unplug is pending with {}.
            assert await qmp.ok("device_del", {"id": "balloon0"}) == {}
            first = await qmp.wait_event("DEVICE_DELETED")
            second = await qmp.wait_event("DEVICE_DELETED")
            assert first["data"] == {"path": BACKEND}
            assert second["data"] == {"device": "balloon0", "path": BALLOON}
            assert vm.guest.free_pages() >= free_before + ((128 * MiB) >> 12)
            reply = await qmp.call("query-balloon")
            assert reply["error"] == {
                "class": "DeviceNotActive",
                "desc": "No balloon device has been activated",
            }
            reply = await qmp.call("x-query-virtio")
            assert {k: v for k, v in reply.items() if k != "id"} == facts["no_virtio"]
            plug = {"driver": "virtio-balloon-pci", "id": "balloon0", "bus": "rp1"}
            if qemu_version != "7.2":
                # QemuOpts spellings are 7.2's: 10.0 wants the JSON type, and adds nothing.
                reply = await qmp.call("device_add", {**plug, "deflate-on-oom": "on"})
                assert reply["error"]["desc"] == (
                    "Invalid parameter type for 'deflate-on-oom', expected: boolean"
                )
                assert vm.balloon is None
            await qmp.ok("device_add", {**plug, "deflate-on-oom": facts["on"], "sg": facts["off"]})
            await wait_driver_ok(qmp)
            status = await qmp.ok("x-query-virtio-status", {"path": BACKEND})
            assert not any("F_SG" in f for f in status["host-features"]["dev-features"])
            assert await actual(qmp) == 256 * MiB
            second_balloon = await qmp.call(
                "device_add", {"driver": "virtio-balloon-pci", "id": "balloon1", "bus": "rp1"}
            )
            assert second_balloon["error"]["desc"] == facts["occupied"]
            second_balloon = await qmp.call(
                "device_add", {"driver": "virtio-balloon-pci", "id": "balloon1", "bus": "rp2"}
            )
            assert second_balloon["error"]["desc"] == "Only one balloon device is supported"
            # The replugged balloon works on the PFN path.
            await qmp.ok("balloon", {"value": 200 * MiB})
            await wait_actual(qmp, 200 * MiB)

    run(body)


def test_a_balloon_on_pcie0_cannot_be_unplugged(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_vm(tmp_path, hotplug=False) as (vm, qmp):
            bus = await qmp.ok("qom-get", {"path": BALLOON, "property": "parent_bus"})
            assert bus.endswith("pcie.0")
            reply = await qmp.call("device_del", {"id": "balloon0"})
            assert "does not support hotplugging" in reply["error"]["desc"]
            assert vm.balloon is not None
            assert await actual(qmp) == 256 * MiB

    run(body)


def test_pmemsave_dumps_the_rings_and_our_parser_reads_the_stats_queue(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_vm(tmp_path, workload="steady") as (_, qmp):
            await asyncio.sleep(0.6)
            queue = await qmp.ok("x-query-virtio-queue-status", {"path": BACKEND, "queue": 2})
            dump = tmp_path / "ram.img"
            assert (
                await qmp.ok("pmemsave", {"val": 0, "size": 256 * MiB, "filename": str(dump)}) == {}
            )
            stats = await qmp.ok("qom-get", {"path": BALLOON, "property": "guest-stats"})
            with GuestMemory([Region.from_file(0, str(dump))]) as mem:
                # The stats buffer the device holds is in flight: parse from before it.
                params = RingParams(
                    queue["vring-num"],
                    queue["vring-desc"],
                    queue["vring-avail"],
                    queue["vring-used"],
                    (queue["last-avail-idx"] - 1) & 0xFFFF,
                )
                parsed = parse_ring(mem, params, Decode.STATS)
            assert parsed["error"] is None
            chain: dict[str, Any] = parsed["chains"][-1]  # type: ignore[index]
            decoded = chain["stats"]
            assert decoded["free-memory"] == stats["stats"]["stat-free-memory"]
            assert decoded["total-memory"] == 256 * MiB

    run(body)


def test_quit_replies_then_sends_shutdown_and_hangs_up(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_vm(tmp_path) as (_, qmp):
            assert await qmp.ok("quit") == {}
            event = await qmp.wait_event("SHUTDOWN")
            assert event["data"] == {"guest": False, "reason": "host-qmp-quit"}
            with pytest.raises(EOFError):
                await qmp.read(timeout=5)

    run(body)


@pytest.mark.parametrize(("qemu_version", "series"), [("7.2", (7, 2)), ("10.0", (10, 0))])
def test_unknown_command_and_handshake(
    tmp_path: Path, qemu_version: str, series: tuple[int, int]
) -> None:
    async def body() -> None:
        async with running_vm(tmp_path, qemu_version=qemu_version) as (_, qmp):
            # (migrate is served since issue 18: query-migrate, migrate, migrate_cancel.)
            reply = await qmp.call("snapshot-save", {"job-id": "x"})
            assert reply["error"] == {
                "class": "CommandNotFound",
                "desc": "The command snapshot-save has not been found",
            }
            reply = await qmp.call("qmp_capabilities")
            assert reply["error"]["class"] == "CommandNotFound"
            version = qmp.greeting["QMP"]["version"]["qemu"]
            assert (version["major"], version["minor"]) == series
            version = (await qmp.ok("query-version"))["qemu"]
            assert (version["major"], version["minor"]) == series
            for ident in (7, "x", {"a": [1]}):
                raw = {"execute": "query-status", "id": ident}
                reply = await qmp.send_raw(json.dumps(raw).encode())
                assert reply["id"] == ident

    run(body)
