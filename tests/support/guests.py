"""Real QEMU guests (fixtures/guest.py) as the tests boot them: the devices of the default
VM, and where the extra monitor of ``boot_guest(observer=True)`` listens.

The default VM is what `balloonctl negotiate` needs: q35, the balloon on a hot-pluggable
PCIe root port, deflate-on-oom and free page reporting on (QEMU's defaults are off). The
fixtures that boot them are tests/real/conftest.py's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from fixtures.guest import Guest

ROOT_PORT: Final = "pcie-root-port,id=rp1,bus=pcie.0,chassis=1,slot=1"
BALLOON: Final = "virtio-balloon-pci,id=balloon0,bus=rp1,deflate-on-oom=on,free-page-reporting=on"
#: On pcie.0, which cannot hotplug: negotiate must refuse before touching it.
BALLOON_ON_ROOT_BUS: Final = (
    "virtio-balloon-pci,id=balloon0,deflate-on-oom=on,free-page-reporting=on"
)

#: Bound for any one CLI run on a TCG guest (the 1 GiB inflate takes 1-2 s).
CLI_TIMEOUT: Final = 120.0

#: ``boot_guest(memory=..., devices=..., *, append=..., observer=..., wait=...)``.
BootGuest = Callable[..., Guest]


def observer_path(guest: Guest) -> Path:
    """Where ``boot_guest(observer=True)`` puts the extra QMP monitor."""
    return guest.tmpdir / "observer.sock"


def actual(guest: Guest) -> int:
    """query-balloon ``actual``, straight from QEMU (the guest's private monitor)."""
    value = guest.execute("query-balloon")["actual"]
    assert isinstance(value, int)
    return value


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` until true; an assertion error naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.1)
