"""Fixtures for the daemon's tests: a fake host, config files, the CLI daemon in the
background. The classes behind them are tests/support/daemon.py's; the simulated VMs
(``fleet``, ``run_dir``) are tests/support/sims.py's, registered for every folder.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import ConfigFile, DaemonProcess, FakeHost, VmEntry


@pytest.fixture
def host(tmp_path: Path) -> FakeHost:
    """A 4 GiB host with half of it available and no PSI file."""
    return FakeHost(tmp_path)


@pytest.fixture
def make_config(tmp_path: Path, host: FakeHost) -> Callable[..., ConfigFile]:
    """``make_config(vms, **fields)``: a :class:`ConfigFile` written to tmp_path/config.toml."""

    def make(vms: Sequence[VmEntry], **fields: Any) -> ConfigFile:
        cfg = ConfigFile(tmp_path / "config.toml", host, tmp_path / "state", list(vms), **fields)
        cfg.write()
        return cfg

    return make


@pytest.fixture
def spawn_daemon(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """``spawn_daemon(config_path, *args, env=..., unset=...)``: the CLI daemon in the
    background, its log in tmp_path; stopped at teardown if the test did not stop it."""
    started: list[DaemonProcess] = []

    def spawn(config: Path, *args: str, **kwargs: Any) -> DaemonProcess:
        proc = DaemonProcess(config, tmp_path / f"daemon-{len(started)}.log", *args, **kwargs)
        started.append(proc)
        return proc

    try:
        yield spawn
    finally:
        for proc in started:
            proc.stop()
