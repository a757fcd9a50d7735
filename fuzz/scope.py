"""Which balloonctl modules each fuzz target instruments for atheris (issue 17).

atheris' ``instrument_imports(include=[...])`` instruments a whole top-level package: asking
for ``balloonctl.virtio.queue`` instruments every ``balloonctl`` module imported inside the
block. Instrumented code runs several times slower (each branch and comparison calls into
atheris), and the hottest code of every device target was support code nobody fuzzes:
memory.py's bounds bookkeeping, the feature tables, the mock driver writing the input's rings.
So each entry point includes ``balloonctl`` and *excludes* (atheris matches those by exact
name) every balloonctl module not listed here: coverage then steers by the code under test
only.

The lists name the surface each harness exists to fuzz (fuzz/harness.py's docstring). Support
that stays uninstrumented: ``virtio.memory`` (the harness checks its bounds independently),
``virtio.features`` and ``virtio.spec`` (tables), ``virtio.mock`` and ``guest.testbed``
(wiring that writes the input), ``errors`` and ``units``. Nothing here imports balloonctl
beyond its top-level package: it runs before the instrumented import.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Final

import balloonctl

#: The device side: the ring parser, request decoding, page bookkeeping, the device.
_DEVICE: Final = (
    "balloonctl.virtio.queue",
    "balloonctl.virtio.requests",
    "balloonctl.virtio.pages",
    "balloonctl.virtio.balloon",
)

#: Modules under test by target: these and only these are instrumented.
INSTRUMENTED: Final[Mapping[str, tuple[str, ...]]] = {
    "vring_ops": ("balloonctl.virtio.queue",),
    "vring_image": (
        "balloonctl.virtio.inspect",
        "balloonctl.virtio.queue",
        "balloonctl.virtio.requests",
        "balloonctl.virtio.pages",
    ),
    "balloon_requests": _DEVICE,
    "driver_device_roundtrip": (
        *_DEVICE,
        "balloonctl.guest.driver",
        "balloonctl.guest.vring",
        "balloonctl.guest.allocator",
    ),
    "qmp_replies": (
        "balloonctl.backends.qmpvocab",
        "balloonctl.backends.base",
        "balloonctl.virtio.features",
    ),
    "libvirt_stats": (
        "balloonctl.backends.libvirt",
        "balloonctl.backends.qmpvocab",
        "balloonctl.backends.base",
    ),
    "config": (
        "balloonctl.daemon.config",
        "balloonctl.daemon.policy",
        "balloonctl.backends.address",
        "balloonctl.units",
    ),
}


def package_modules() -> list[str]:
    """Every module of the balloonctl package, by name, found on disk (none imported)."""
    root = Path(balloonctl.__file__).resolve().parent
    names = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names.append(".".join(parts))
    return names


def excluded(target: str) -> list[str]:
    """The balloonctl modules ``target`` must not instrument: all but its own."""
    keep = set(INSTRUMENTED[target])
    return [name for name in package_modules() if name not in keep]
