"""A private real libvirtd (fixtures/libvirtd.py) and one real guest domain for the session.

The daemon and the main domain are session-scoped: starting libvirtd costs a capability
probe (seconds) and a boot several more under TCG. Tests that break a domain boot their own.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from fixtures.libvirtd import Domain, Libvirtd


@pytest.fixture(scope="session")
def libvirtd() -> Iterator[Libvirtd]:
    with Libvirtd() as daemon:
        yield daemon


@pytest.fixture(scope="session")
def domain(libvirtd: Libvirtd) -> Domain:
    return libvirtd.boot("bctl-lv1")


def cli(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """``balloonctl ARGS`` as a subprocess, with no configuration file from the host."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("BALLOONCTL_CONFIG", "LIBVIRT_DEFAULT_URI")
    }
    env["XDG_CONFIG_HOME"] = "/nonexistent/balloonctl-libvirt-tests"
    return subprocess.run(
        [sys.executable, "-m", "balloonctl", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        stdin=subprocess.DEVNULL,
        check=False,
    )
