"""The daemon's cyclic-GC thresholds (GC_THRESHOLDS): set while it runs, put back after, and
reference cycles still collected without anyone calling gc.collect()."""

from __future__ import annotations

import asyncio
import gc
import weakref
from pathlib import Path

import pytest

from balloonctl.daemon.config import Config, DaemonConfig, HostConfig
from balloonctl.daemon.loop import GC_THRESHOLDS, Daemon
from balloonctl.daemon.sdnotify import Notifier


def _config(tmp_path: Path) -> Config:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 16000000 kB\nMemAvailable: 8000000 kB\n")
    return Config(
        str(tmp_path / "c.toml"),
        (),
        daemon=DaemonConfig(interval=1.0),
        host=HostConfig(meminfo=str(meminfo), psi=str(tmp_path / "nopsi")),
    )


class _Node:
    """A container that can be part of a cycle and be weakly referenced."""

    def __init__(self) -> None:
        self.other: object = None


def test_thresholds_are_set_while_the_daemon_runs_and_put_back_after(tmp_path: Path) -> None:
    before = gc.get_threshold()
    assert before != GC_THRESHOLDS
    seen: list[tuple[int, ...]] = []

    async def scenario() -> None:
        async with Daemon(
            _config(tmp_path), state_dir=str(tmp_path / "st"), notifier=Notifier(None)
        ):
            seen.append(gc.get_threshold())
            raise RuntimeError("the daemon's body fails")

    with pytest.raises(RuntimeError):
        asyncio.run(scenario())
    assert seen == [GC_THRESHOLDS]
    assert gc.get_threshold() == before


def test_a_cycle_is_collected_without_an_explicit_collection(tmp_path: Path) -> None:
    died: list[bool] = []

    async def scenario() -> None:
        async with Daemon(
            _config(tmp_path), state_dir=str(tmp_path / "st"), notifier=Notifier(None)
        ):
            gc.collect()  # a clean start: the cycle below is in the youngest generation
            a, b = _Node(), _Node()
            a.other, b.other = b, a
            gone = weakref.ref(a)
            del a, b
            assert gone() is not None, "reference counting alone cannot free a cycle"
            # More container allocations than the youngest generation's threshold.
            keep: list[list[int]] = [[] for _ in range(GC_THRESHOLDS[0] + 1000)]
            died.append(gone() is None)
            del keep

    asyncio.run(scenario())
    assert died == [True]


def test_overlapping_daemons_keep_the_thresholds_until_the_last_one_ends(tmp_path: Path) -> None:
    before = gc.get_threshold()
    seen: list[tuple[int, ...]] = []

    def daemon(name: str) -> Daemon:
        return Daemon(_config(tmp_path), state_dir=str(tmp_path / name), notifier=Notifier(None))

    async def scenario() -> None:
        first, second = daemon("a"), daemon("b")
        await first.__aenter__()
        await second.__aenter__()
        await first.__aexit__(None, None, None)  # the first one in leaves first
        seen.append(gc.get_threshold())  # the second one still runs
        await second.__aexit__(None, None, None)
        seen.append(gc.get_threshold())

    asyncio.run(scenario())
    assert seen == [GC_THRESHOLDS, before]
