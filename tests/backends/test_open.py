"""balloonctl.backends.open: the one rule the CLI and the daemon use to pick QMP or libvirt.

Nothing here connects: a backend is built, its kind and timeouts checked. The cases are
the ones where the CLI's old ``open_vm`` and the daemon's old ``open_backend`` differed,
so that each reconciled choice is pinned.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path
from typing import Any

import pytest

from balloonctl.backends.base import Backend
from balloonctl.backends.libvirt import LibvirtBackend
from balloonctl.backends.open import BackendKind, backend_kind, open_backend
from balloonctl.backends.qmp import QmpBackend
from balloonctl.cli import vm_commands
from balloonctl.daemon.config import Config, DaemonConfig, VmConfig
from balloonctl.daemon.link import Member, backend_for
from balloonctl.errors import UsageError

URI = "qemu:///system"


def test_a_typed_name_is_guessed_from_its_shape(sock: str) -> None:
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(sock)
        assert backend_kind(sock) == "qmp"  # an existing socket
    assert backend_kind("unix:/nowhere.sock") == "qmp"
    assert backend_kind("tcp:127.0.0.1:4444") == "qmp"
    assert backend_kind("./missing.sock") == "qmp"  # a "/": never a domain name
    assert backend_kind("web01") == "libvirt"


def test_a_guessed_domain_goes_to_libvirt_on_the_uri() -> None:
    backend = open_backend("web01", libvirt_uri=URI)
    assert isinstance(backend, LibvirtBackend)
    assert backend.uri == URI


def test_default_timeouts_are_each_backends_own() -> None:
    """The CLI passes none: QMP connects within 5 s, libvirt within 10 s (libvirtd may be
    restarting), as the CLI's open_vm did; commands get 30 s."""
    qmp = open_backend("unix:/nowhere.sock")
    domain = open_backend("web01", libvirt_uri=URI)
    assert isinstance(qmp, QmpBackend) and isinstance(domain, LibvirtBackend)
    assert (getattr(qmp, "_connect_timeout"), getattr(qmp, "_command_timeout")) == (5.0, 30.0)  # noqa: B009
    assert (getattr(domain, "_connect_timeout"), getattr(domain, "_command_timeout")) == (  # noqa: B009
        10.0,
        30.0,
    )


def test_the_daemon_passes_its_timeouts_to_both_kinds() -> None:
    config = Config(None, daemon=DaemonConfig(connect_timeout=3.0, command_timeout=7.0))
    for member in (Member("a", 0, 1, "a.sock"), Member("web01", 0, 1, "web01", URI)):
        backend = backend_for(member, config)
        assert getattr(backend, "_connect_timeout") == 3.0  # noqa: B009
        assert getattr(backend, "_command_timeout") == 7.0  # noqa: B009


def test_the_source_decides_over_the_shape() -> None:
    """A [[vm]] socket with no "/" whose VM is down is not a domain; a domain libvirt listed
    is a domain whatever its name looks like."""
    config = Config(None)
    assert isinstance(backend_for(Member("a", 0, 1, "a.sock"), config), QmpBackend)
    odd = Member("tcp:odd:1", 0, 1, "tcp:odd:1", URI)
    assert isinstance(backend_for(odd, config), LibvirtBackend)
    assert isinstance(open_backend("web01", kind="qmp"), QmpBackend)


def test_a_domain_without_a_uri_is_a_callers_bug() -> None:
    with pytest.raises(ValueError, match="without a libvirt URI"):
        open_backend("web01", kind="libvirt")


def test_without_libvirt_python_a_domain_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's message, now the daemon's too (it used to get a bare ImportError)."""
    monkeypatch.setitem(sys.modules, "balloonctl.backends.libvirt", None)
    with pytest.raises(UsageError, match=r"pip install 'balloonctl\[libvirt\]'"):
        open_backend("web01", libvirt_uri=URI)
    with pytest.raises(UsageError, match="libvirt-python"):
        backend_for(Member("web01", 0, 1, "web01", URI), Config(None))


def test_list_probes_a_configured_socket_as_qmp_even_when_it_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The one user-visible change: ``list`` used to guess from the name, so a [[vm]] whose
    socket is a bare name (no "/") and absent while its VM is down was looked up as a
    libvirt domain on qemu:///system. It is a QMP socket, as in the daemon: unreachable."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LIBVIRT_DEFAULT_URI", raising=False)  # list asks libvirt only then
    opened: list[tuple[str, BackendKind | None, Backend]] = []

    def spy(name: str, **kwargs: Any) -> Backend:
        backend = open_backend(name, **kwargs)
        opened.append((name, kwargs.get("kind"), backend))
        return backend

    monkeypatch.setattr(vm_commands, "open_backend", spy)
    assert not os.path.exists("missing.sock")
    config = Config(None, vms=(VmConfig("down", "missing.sock"),))
    report = asyncio.run(vm_commands.list_vms(config, None))
    assert [row["state"] for row in report["vms"]] == ["unreachable"]
    assert [(name, kind) for name, kind, _ in opened] == [("missing.sock", "qmp")]
    assert isinstance(opened[0][2], QmpBackend)
