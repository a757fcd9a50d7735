"""balloonctl's negotiate against a simulated QEMU 7.2 and 10.0: what device_add it sends.

Why here: negotiate carries the balloon's properties (device-list-properties, read back with
qom-get) into device_add. QEMU 10 lists a read-only ``busnr`` there and refuses it in
device_add; balloonctl leaves such a property out and tries again. The sims answer as the
recordings say (fixtures/transcripts/qemu-*/properties.json), so this pins both that the
retry path runs against a 10.0 VM and that nothing of the kind happens on 7.2.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from balloonctl.cli import vm_commands
from balloonctl.errors import CommandFailed
from balloonctl.sim.machine import SimMachine
from tests.support.machine import running_vm

BALLOON = "/machine/peripheral/balloon0"


def record_device_add(vm: SimMachine) -> list[tuple[dict[str, Any], str | None]]:
    """Every device_add the sim is asked for, with the error text it answered (None: added)."""
    seen: list[tuple[dict[str, Any], str | None]] = []
    command = vm.qmp.commands["device_add"]

    async def handler(args: Mapping[str, Any]) -> Any:
        try:
            result = await command.handler(args)
        except Exception as exc:
            seen.append((dict(args), str(exc)))
            raise
        seen.append((dict(args), None))
        return result

    commands = dict(vm.qmp.commands)
    commands["device_add"] = replace(command, handler=handler)
    vm.qmp.commands = commands
    return seen


@pytest.mark.parametrize("qemu_version", ["7.2", "10.0"])
def test_negotiate_replugs_a_virtio_1_2_balloon(tmp_path: Path, qemu_version: str) -> None:
    async def body() -> None:
        async with running_vm(tmp_path, profile="virtio-1.2", qemu_version=qemu_version) as (
            vm,
            qmp,
        ):
            sent = record_device_add(vm)
            report = await vm_commands.negotiate(str(tmp_path / "vm.sock"), [], ["deflate-on-oom"])
            assert report["driver_ok"] is True
            assert "deflate-on-oom" not in report["offered"]
            assert vm.balloon is not None and vm.balloon.props["deflate-on-oom"] is False
            # What was carried is what QEMU lists and reads back (properties.json), less
            # what device_add cannot take.
            added, refused = sent[-1], sent[:-1]
            assert added[1] is None
            args = added[0]
            assert (args["driver"], args["id"], args["bus"]) == (
                "virtio-balloon-pci",
                "balloon0",
                "rp1",
            )
            assert args["deflate-on-oom"] is False and args["free-page-reporting"] is True
            assert args["disable-legacy"] == "on"  # read off the old device behind rp1
            assert "busnr" not in args
            if qemu_version == "7.2":
                assert refused == []  # 7.2 lists no busnr: one device_add does it
                assert "vectors" not in args
            else:
                # 10.0: busnr (read back as 1) was carried, refused as QEMU 10 refuses it,
                # and left out of the second try; the rest of the request was the same.
                ((first, error),) = refused
                assert first["busnr"] == 1
                assert error == "Property 'virtio-balloon-pci.busnr' is not writable"
                assert {k: v for k, v in first.items() if k != "busnr"} == args
                assert args["vectors"] == 2
            assert await qmp.ok("qom-get", {"path": BALLOON, "property": "hotplugged"}) is True

    asyncio.run(body())


@pytest.mark.parametrize("qemu_version", ["7.2", "10.0"])
def test_a_vm_without_a_balloon_says_so_on_either_version(
    tmp_path: Path, qemu_version: str
) -> None:
    """7.2 lists no virtio device, 10.0 refuses x-query-virtio ("No virtio devices found"):
    features and status give one answer, the one query-balloon gives."""

    async def body() -> None:
        async with running_vm(tmp_path, qemu_version=qemu_version) as (vm, qmp):
            await qmp.ok("device_del", {"id": "balloon0"})
            deadline = asyncio.get_running_loop().time() + 10
            while vm.balloon is not None:
                assert asyncio.get_running_loop().time() < deadline, "balloon never unplugged"
                await asyncio.sleep(0.05)
            with pytest.raises(CommandFailed) as info:
                await vm_commands.features(str(tmp_path / "vm.sock"))
            assert info.value.error_class == "DeviceNotActive"
            assert "has no balloon device" in str(info.value)

    asyncio.run(body())
