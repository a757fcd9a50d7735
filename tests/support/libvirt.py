"""A private real libvirtd (fixtures/libvirtd.py) and one real guest domain for the session,
for every test that needs libvirt: the backend's tests, the daemon's, the CLI's.

The daemon and the main domain are session-scoped: starting libvirtd costs a capability
probe (seconds) and a boot several more under TCG. Tests that break a domain boot their own.
The fixtures are registered for every folder by tests/conftest.py (``pytest_plugins``).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from typing import Final

import pytest

from fixtures.libvirtd import Domain, Libvirtd
from tests.support.cli import run_cli

#: Bound on one CLI command against libvirtd: a guest under TCG answers slowly, and a
#: libvirtd being restarted makes the CLI wait for it.
LIBVIRT_CLI_TIMEOUT_S: Final = 120.0


@pytest.fixture(scope="session")
def libvirtd() -> Iterator[Libvirtd]:
    """The private libvirtd, started on first use and stopped at the end of the session."""
    with Libvirtd() as daemon:
        yield daemon


@pytest.fixture(scope="session")
def domain(libvirtd: Libvirtd) -> Domain:
    """``bctl-lv1``: a running guest with a balloon, shared by the session's libvirt tests
    (each leaves it as booted: 2 GiB, stats every 2 s)."""
    return libvirtd.boot("bctl-lv1")


def cli(*args: str, timeout: float = LIBVIRT_CLI_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """``balloonctl ARGS`` as a subprocess (:func:`tests.support.cli.run_cli`), with the
    longer bound a real libvirtd needs."""
    return run_cli(*args, timeout=timeout)
