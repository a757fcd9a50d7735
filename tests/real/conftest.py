"""Real QEMU 7.2 guests for the tests: Debian's Linux 6.1 kernel and busybox under TCG.

The guest image is built once per machine from Debian packages (fixtures/guest.py; cached
in ~/.cache/balloonctl/guest) and booted per test, since most tests change the balloon:
PVH boot to the balloon driver's DRIVER_OK takes 2-3 s here. Nothing is skipped: a machine
that cannot build or boot the guest fails these tests with the console log named.

The default VM is what `balloonctl negotiate` needs: q35, the balloon on a hot-pluggable
PCIe root port, deflate-on-oom and free page reporting on (QEMU's defaults are off).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytest

from fixtures.guest import GiB, Guest, GuestImage, build_image
from tests.support.guests import BALLOON, ROOT_PORT, BootGuest, observer_path


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    """The cached guest, built on first use (about 4 s, then free)."""
    return build_image()


@pytest.fixture
def boot_guest(guest_image: GuestImage) -> Iterator[BootGuest]:
    """Boot guests for one test; all of them are quit (or killed) when it ends."""
    guests: list[Guest] = []

    def boot(
        memory: int = 2 * GiB,
        devices: Sequence[str] = (ROOT_PORT, BALLOON),
        *,
        append: str = "",
        observer: bool = False,
        wait: bool = True,
    ) -> Guest:
        guest = Guest(memory, devices, image=guest_image, append=append)
        if observer:
            # A third QMP monitor, at observer_path(guest), for watching QEMU while another
            # client holds qmp.sock (bench real's --observer).
            guest.extra_args = (
                "-chardev",
                f"socket,id=obs,path={observer_path(guest)},server=on,wait=off",
                "-mon",
                "chardev=obs,mode=control",
            )
        guests.append(guest)
        guest.start()
        if wait:
            guest.wait_driver_ok()
        return guest

    yield boot
    for guest in guests:
        guest.close()


@pytest.fixture
def real_vm(boot_guest: BootGuest) -> Guest:
    """A 2 GiB guest whose balloon driver is ready, on a hot-pluggable root port."""
    return boot_guest()
