"""The daemon's state directory: :class:`balloonctl.statestore.StateStore` on its own, and
what a restarted daemon picks up from it (a scripted QMP peer stands in for the VM)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import pytest

from balloonctl.config import load as load_config
from balloonctl.daemon import Daemon
from balloonctl.policy import VmMemory
from balloonctl.sdnotify import Notifier
from balloonctl.statestore import StateStore, default_dir
from tests.backends.hostile_peer import FakeQemu, HostilePeer, Return
from tests.daemon.conftest import ConfigFile, FakeHost, GiB, MiB, VmEntry, decisions

MakeConfig = Callable[..., ConfigFile]

MEMORY: Final = VmMemory(
    target=768 * MiB, set_tick=41, shrink=True, reached=False, failures=3, hold_until=57
)

#: Names a VM may have (a libvirt domain name is almost anything) and what must not happen
#: with them: a path outside the directory, two VMs in one file, a clash with daemon.json.
ODD_NAMES: Final = [
    "plain",
    "../x",
    "../../etc/passwd",
    "a/b",
    "a%2Fb",
    "/abs",
    ".",
    "..",
    "...",
    "",
    "daemon",
    ".tmp-x",
    "with space",
    "new\nline",
    "vm-ünïcödé",
    "虚拟机",
    "虚" * 40,  # quoted, 360 bytes: longer than NAME_MAX
    "x" * 300,
    "x" * 299,
    "emoji-\U0001f388",
]


@pytest.fixture
def store(tmp_path: Path) -> StateStore:
    s = StateStore(str(tmp_path / "state"))
    s.open()
    return s


def _files(directory: str) -> set[str]:
    return set(os.listdir(directory))


# --------------------------------------------------------------------------------------------
# StateStore
# --------------------------------------------------------------------------------------------


def test_open_creates_a_private_directory(tmp_path: Path) -> None:
    s = StateStore(str(tmp_path / "a" / "state"))
    s.open()
    mode = os.stat(s.directory).st_mode
    assert stat.S_ISDIR(mode) and stat.S_IMODE(mode) == 0o700
    s.open()  # again: fine


def test_round_trip_of_every_field(store: StateStore) -> None:
    store.save("vm", MEMORY)
    assert StateStore(store.directory).load("vm") == MEMORY
    assert StateStore(store.directory).load("other") == VmMemory()


def test_tick_counter_round_trip(store: StateStore) -> None:
    assert store.load_tick() == 0
    store.save_tick(12345)
    assert StateStore(store.directory).load_tick() == 12345


def test_odd_vm_names_stay_inside_the_directory_one_file_each(tmp_path: Path) -> None:
    s = StateStore(str(tmp_path / "state"))
    s.open()
    s.save_tick(7)
    before = _files(str(tmp_path))
    for i, name in enumerate(ODD_NAMES):
        s.save(name, VmMemory(target=(i + 1) * MiB, set_tick=i))
    assert _files(str(tmp_path)) == before  # nothing written next to the directory
    files = _files(s.directory)
    assert len(files) == len(ODD_NAMES) + 1  # one each, and daemon.json
    for entry in files:
        path = os.path.join(s.directory, entry)
        assert os.path.isfile(path) and not os.path.islink(path)
        assert len(entry.encode()) <= 255
    fresh = StateStore(s.directory)
    for i, name in enumerate(ODD_NAMES):
        assert fresh.load(name) == VmMemory(target=(i + 1) * MiB, set_tick=i), name
    assert fresh.load_tick() == 7


def test_state_file_records_the_vm_name(store: StateStore) -> None:
    store.save("a/b", MEMORY)
    (entry,) = _files(store.directory)
    data = json.loads(Path(store.directory, entry).read_text())
    assert data["vm"] == "a/b" and data["target"] == MEMORY.target


def test_save_replaces_the_file_and_skips_unchanged_memory(store: StateStore) -> None:
    store.save("vm", MEMORY)
    (entry,) = _files(store.directory)
    path = os.path.join(store.directory, entry)
    first = os.stat(path).st_ino
    store.save("vm", MEMORY)  # unchanged: not written again
    assert os.stat(path).st_ino == first
    changed = VmMemory(target=512 * MiB)
    store.save("vm", changed)
    assert os.stat(path).st_ino != first  # a new file renamed over the old one
    assert _files(store.directory) == {entry}  # and no temporary left behind
    assert StateStore(store.directory).load("vm") == changed


def test_a_failed_write_leaves_the_previous_state(
    store: StateStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    store.save("vm", MEMORY)

    def no_rename(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", no_rename)
    store.save("vm", VmMemory(target=GiB))
    monkeypatch.undo()
    assert StateStore(store.directory).load("vm") == MEMORY
    assert len(_files(store.directory)) == 1  # the temporary file is gone
    assert "No space left on device" in caplog.text


def test_a_crash_mid_write_leaves_the_previous_state(
    store: StateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.save("vm", MEMORY)

    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(json, "dump", interrupted)
    with pytest.raises(KeyboardInterrupt):
        store.save("vm", VmMemory(target=GiB))
    monkeypatch.undo()
    assert StateStore(store.directory).load("vm") == MEMORY
    assert len(_files(store.directory)) == 1


def test_unwritable_directory_warns_once_until_it_works_again(
    store: StateStore, caplog: pytest.LogCaptureFixture
) -> None:
    # The directory vanishing works as root as well (chmod does not stop root).
    os.rmdir(store.directory)
    for i in range(5):
        store.save(f"vm{i}", VmMemory(target=i + 1))
        store.save_tick(i)
    warnings = [r for r in caplog.records if r.name == "balloonctl.statestore"]
    assert len(warnings) == 1, caplog.text
    assert warnings[0].levelno == logging.WARNING
    assert store.directory in warnings[0].getMessage()

    store.open()
    store.save("vm0", VmMemory(target=1))  # not written before: written now
    assert StateStore(store.directory).load("vm0") == VmMemory(target=1)
    os.unlink(os.path.join(store.directory, _single(store.directory)))
    os.rmdir(store.directory)
    store.save_tick(99)  # broken again after a success: one more line
    warnings = [r for r in caplog.records if r.name == "balloonctl.statestore"]
    assert len(warnings) == 2, caplog.text


def _single(directory: str) -> str:
    (entry,) = _files(directory)
    return entry


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        "",
        "[1, 2]",
        "null",
        '{"target": -1}',
        '{"target": "768M"}',
        '{"target": true}',
        '{"failures": 1.5}',
        '{"shrink": 1}',
        '{"hold_until": null}',
    ],
)
def test_an_unusable_state_file_is_ignored(
    store: StateStore, content: str, caplog: pytest.LogCaptureFixture
) -> None:
    store.save("vm", MEMORY)
    Path(store.directory, _single(store.directory)).write_text(content)
    caplog.clear()
    assert StateStore(store.directory).load("vm") == VmMemory()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, caplog.text
    assert "\n" not in warnings[0].getMessage()


def test_a_state_file_with_missing_or_extra_fields(store: StateStore) -> None:
    store.save("vm", MEMORY)
    Path(store.directory, _single(store.directory)).write_text(
        '{"vm": "vm", "target": null, "failures": 2, "from_the_future": [1]}'
    )
    assert StateStore(store.directory).load("vm") == VmMemory(target=None, failures=2)


@pytest.mark.parametrize("content", ["garbage", '{"tick": -3}', '{"tick": true}', '{"tick": "9"}'])
def test_an_unusable_tick_counter_starts_from_zero(store: StateStore, content: str) -> None:
    Path(store.directory, "daemon.json").write_text(content)
    assert store.load_tick() == 0
    store.save_tick(5)
    assert store.load_tick() == 5


def test_default_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/balloonctl:/var/lib/other")
    assert default_dir() == "/var/lib/balloonctl"
    monkeypatch.delenv("STATE_DIRECTORY")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert default_dir() == str(tmp_path / "balloonctl")
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_dir() == str(tmp_path / ".local" / "state" / "balloonctl")


# --------------------------------------------------------------------------------------------
# Across a restart of the daemon
# --------------------------------------------------------------------------------------------


def _daemon(cfg: ConfigFile) -> Daemon:
    return Daemon(load_config(str(cfg.path)), state_dir=str(cfg.state_dir), notifier=Notifier(None))


def _fresh(vm: FakeQemu) -> None:
    vm.stats = {
        "stat-free-memory": 1400 * MiB,
        "stat-available-memory": 1536 * MiB,
        "stat-total-memory": 2 * GiB,
    }
    vm.last_update = int(time.time())


def test_back_off_and_tick_counter_survive_a_restart(
    run_dir: Path, make_config: MakeConfig, host: FakeHost, caplog: pytest.LogCaptureFixture
) -> None:
    """A guest that never reaches its shrink is backed off; a daemon started afterwards on the
    same state directory knows it (and the tick count the back-off is measured in) and does not
    push it again before the back-off ends. Without the state, it would shrink it at once."""
    sock = str(run_dir / "vm.sock")
    cfg = make_config([VmEntry("vm", sock)])
    cfg.policy["settle_ticks"] = 2
    cfg.write()
    host.set(600 * MiB)  # pressure

    async def first_run(peer: HostilePeer) -> tuple[int, VmMemory]:
        # The VM says yes to every target and never moves.
        peer.script("balloon", *[Return({})] * 10)
        async with _daemon(cfg) as d:
            reasons = []
            for _ in range(3):
                _fresh(peer.vm)
                reasons.append(decisions(await d.tick(settle=True))["vm"].reason)
            assert reasons[0].startswith("give:")
            assert reasons[1].startswith("hold: on its way to")
            assert reasons[2].startswith("back off: 2 ticks without reaching"), reasons
            memory = d.links["vm"].memory
            assert memory.failures == 1 and memory.hold_until == d.tick_no + 2
            return d.tick_no, memory

    async def second_run(peer: HostilePeer, tick: int, memory: VmMemory) -> str:
        async with _daemon(cfg) as d:
            assert d.tick_no == tick
            assert d.store is not None and d.store.load("vm") == memory
            _fresh(peer.vm)
            report = await d.tick(settle=True)
            assert report.tick == tick + 1
            assert d.links["vm"].memory.hold_until == memory.hold_until
            return str(decisions(report)["vm"].reason)

    async def scenario() -> None:
        async with HostilePeer(sock, FakeQemu(ram=2 * GiB)) as peer:
            tick, memory = await first_run(peer)
            reason = await second_run(peer, tick, memory)
            assert reason == f"hold: backing off until tick {memory.hold_until}"

            # The same restart with the VM's state file corrupt: warned about, ignored, and
            # the VM is shrunk at once (the back-off is forgotten, the tick count is not).
            for entry in os.listdir(cfg.state_dir):
                if entry.endswith(".vm.json"):
                    (cfg.state_dir / entry).write_text('{"target": 7')
            caplog.clear()
            async with _daemon(cfg) as d:
                assert d.tick_no == tick + 1
                _fresh(peer.vm)
                report = await d.tick(settle=True)
                assert decisions(report)["vm"].reason.startswith("give:")
                assert decisions(report)["vm"].send
            assert "ignoring state file" in caplog.text

    asyncio.run(scenario())


def test_a_corrupt_tick_counter_is_ignored_with_a_warning(
    tmp_path: Path, make_config: MakeConfig, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = make_config([VmEntry("vm", str(tmp_path / "nowhere.sock"))])
    cfg.state_dir.mkdir()
    (cfg.state_dir / "daemon.json").write_text("\0\0\0garbage")

    async def scenario() -> None:
        async with _daemon(cfg) as d:
            assert d.tick_no == 0
            report = await d.tick(settle=True)
            assert report.tick == 1 and report.answered == 0

    asyncio.run(scenario())
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("ignoring state file" in r.getMessage() for r in warnings), caplog.text
    assert json.loads((cfg.state_dir / "daemon.json").read_text()) == {"tick": 1}
