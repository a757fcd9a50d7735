"""One way to open a VM's backend, for the command line and the daemon alike.

Before this module the CLI and the daemon each had a factory, choosing QMP or libvirt by
rules of their own (the CLI by the name's shape, the daemon by where the VM came from) and
handling a missing libvirt-python differently. The rule is now written once, here:

1. ``kind`` given: the caller knows where the name came from (a ``[[vm]]`` entry's ``qmp``
   and a ``--qmp-dir`` socket are QMP addresses; a name libvirt listed is a libvirt domain),
   and that decides. A guess would be wrong exactly when it matters: a socket whose VM is not
   running yet does not exist, and would be taken for a domain name.
2. ``kind`` not given (a name a user typed): :func:`backend_kind` guesses from its shape.

Timeouts left out are each backend's own defaults (QMP: connect 5 s; libvirt: connect 10 s,
since libvirtd may be restarting; commands 30 s for both), so the CLI's defaults are what
they always were and the daemon passes its ``[daemon]`` timeouts for both kinds.

Like every module under ``backends``, this one takes plain arguments (no daemon
configuration objects: docs/architecture.md, Dependency rule) and imports a backend only
when it builds one, so that ``status`` of a QMP socket never loads libvirt-python.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from balloonctl.backends.address import looks_like_qmp_address
from balloonctl.errors import UsageError

if TYPE_CHECKING:
    from balloonctl.backends.base import Backend

#: How a VM is reached: its own QMP socket, or a libvirt domain.
BackendKind = Literal["qmp", "libvirt"]


def backend_kind(name: str) -> BackendKind:
    """Guess how a VM name a user typed is reached.

    A QMP address (``unix:``, ``tcp:``, the path of an existing unix socket) is QMP, and so is
    anything with a ``/``: libvirt refuses ``/`` in domain names, so a missing socket path is
    reported as a missing socket rather than looked up in libvirt. Anything else is a domain.
    """
    if looks_like_qmp_address(name) or "/" in name:
        return "qmp"
    return "libvirt"


def open_backend(
    name: str,
    *,
    kind: BackendKind | None = None,
    libvirt_uri: str | None = None,
    connect_timeout: float | None = None,
    command_timeout: float | None = None,
) -> Backend:
    """A backend (not yet connected: ``async with`` it) for the VM ``name``.

    ``kind`` None guesses with :func:`backend_kind`. A libvirt domain needs ``libvirt_uri``
    (a ValueError otherwise: a caller's bug, not a user's), and libvirt-python; without it,
    a UsageError saying how to install it.
    """
    chosen = kind if kind is not None else backend_kind(name)
    timeouts: dict[str, float] = {}
    if connect_timeout is not None:
        timeouts["connect_timeout"] = connect_timeout
    if command_timeout is not None:
        timeouts["command_timeout"] = command_timeout
    if chosen == "qmp":
        # Imported here: qemu.qmp is the heaviest import of a `status`, and only QMP needs it.
        from balloonctl.backends.qmp import QmpBackend  # noqa: PLC0415

        return QmpBackend(name, **timeouts)
    if libvirt_uri is None:
        raise ValueError(f"libvirt domain {name!r} without a libvirt URI")
    try:
        # Imported here: an optional dependency, and a QMP user must never pay for it.
        from balloonctl.backends.libvirt import LibvirtBackend  # noqa: PLC0415
    except ImportError as exc:
        raise UsageError(
            f"{name} is not a QMP socket, and libvirt domains need libvirt-python "
            "(pip install 'balloonctl[libvirt]')"
        ) from exc
    return LibvirtBackend(name, libvirt_uri, **timeouts)
