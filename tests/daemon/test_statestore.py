"""The daemon's state directory: :class:`balloonctl.daemon.statestore.StateStore` on its own, and
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

from balloonctl.daemon.config import load as load_config
from balloonctl.daemon.loop import Daemon
from balloonctl.daemon.policy import VmMemory
from balloonctl.daemon.sdnotify import Notifier
from balloonctl.daemon.statestore import StateStore, default_dir
from tests.backends.hostile_peer import FakeQemu, HostilePeer, Return
from tests.support.daemon import ConfigFile, FakeHost, GiB, MiB, VmEntry, decisions

MakeConfig = Callable[..., ConfigFile]

#: A VM's memory as the policy hands it over: a target in flight and a back-off.
MEMORY: Final = VmMemory(
    target=768 * MiB, set_tick=41, shrink=True, reached=False, failures=3, hold_until=57
)
#: What of it is kept: the back-off only (see balloonctl.daemon.statestore).
KEPT: Final = VmMemory(failures=3, hold_until=57)
#: A different back-off (so that saving it writes).
OTHER: Final = VmMemory(target=GiB, set_tick=60, shrink=True, failures=4, hold_until=76)

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


def test_round_trip_of_the_back_off_only(store: StateStore) -> None:
    store.save("vm", MEMORY)
    loaded = StateStore(store.directory).load("vm")
    assert loaded == KEPT
    assert (loaded.failures, loaded.hold_until) == (3, 57)
    # The target in flight comes back as nothing in flight.
    assert loaded.target is None and loaded.set_tick == 0
    assert loaded.shrink is False and loaded.reached is False
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
        s.save(name, VmMemory(target=(i + 1) * MiB, set_tick=i, failures=i + 1, hold_until=i))
    assert _files(str(tmp_path)) == before  # nothing written next to the directory
    files = _files(s.directory)
    assert len(files) == len(ODD_NAMES) + 1  # one each, and daemon.json
    for entry in files:
        path = os.path.join(s.directory, entry)
        assert os.path.isfile(path) and not os.path.islink(path)
        assert len(entry.encode()) <= 255
    fresh = StateStore(s.directory)
    for i, name in enumerate(ODD_NAMES):
        assert fresh.load(name) == VmMemory(failures=i + 1, hold_until=i), name
    assert fresh.load_tick() == 7


def test_state_file_records_the_vm_name(store: StateStore) -> None:
    store.save("a/b", MEMORY)
    (entry,) = _files(store.directory)
    data = json.loads(Path(store.directory, entry).read_text())
    assert data == {"vm": "a/b", "failures": 3, "hold_until": 57}  # no target in flight


def test_save_replaces_the_file_and_skips_unchanged_memory(store: StateStore) -> None:
    store.save("vm", MEMORY)
    (entry,) = _files(store.directory)
    path = os.path.join(store.directory, entry)
    first = os.stat(path).st_ino
    store.save("vm", MEMORY)  # unchanged: not written again
    assert os.stat(path).st_ino == first
    changed = VmMemory(failures=1, hold_until=12)
    store.save("vm", changed)
    assert os.stat(path).st_ino != first  # a new file renamed over the old one
    assert _files(store.directory) == {entry}  # and no temporary left behind
    assert StateStore(store.directory).load("vm") == changed


def test_save_writes_only_when_the_back_off_changes(store: StateStore) -> None:
    """The target moves nearly every tick; the file is written when the back-off does."""
    for tick in range(1, 6):  # a target in flight, no back-off: nothing to keep
        store.save("vm", VmMemory(target=tick * GiB, set_tick=tick, shrink=True))
    assert _files(store.directory) == set()
    store.save("vm", MEMORY)
    path = os.path.join(store.directory, _single(store.directory))
    first = os.stat(path).st_ino
    for tick in range(42, 47):  # new targets, same back-off: not written again
        store.save("vm", VmMemory(target=tick * MiB, set_tick=tick, failures=3, hold_until=57))
    assert os.stat(path).st_ino == first
    # What a store has read counts as written: a restarted daemon does not rewrite it.
    fresh = StateStore(store.directory)
    assert fresh.load("vm") == KEPT
    fresh.save("vm", VmMemory(target=GiB, set_tick=99, reached=True, failures=3, hold_until=57))
    assert os.stat(path).st_ino == first
    # The back-off ending is a change, and is written.
    fresh.save("vm", VmMemory(target=GiB, set_tick=99, reached=True, failures=0, hold_until=57))
    assert os.stat(path).st_ino != first
    assert StateStore(store.directory).load("vm") == VmMemory(hold_until=57)


def test_a_failed_write_leaves_the_previous_state(
    store: StateStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    store.save("vm", MEMORY)

    def no_rename(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", no_rename)
    store.save("vm", OTHER)
    monkeypatch.undo()
    assert StateStore(store.directory).load("vm") == KEPT
    assert len(_files(store.directory)) == 1  # the temporary file is gone
    assert "No space left on device" in caplog.text
    # Not taken for written: the same memory is written on the next save.
    store.save("vm", OTHER)
    assert StateStore(store.directory).load("vm") == VmMemory(failures=4, hold_until=76)


def test_a_crash_mid_write_leaves_the_previous_state(
    store: StateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.save("vm", MEMORY)

    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(json, "dump", interrupted)
    with pytest.raises(KeyboardInterrupt):
        store.save("vm", OTHER)
    monkeypatch.undo()
    assert StateStore(store.directory).load("vm") == KEPT
    assert len(_files(store.directory)) == 1


def test_unwritable_directory_warns_once_until_it_works_again(
    store: StateStore, caplog: pytest.LogCaptureFixture
) -> None:
    # The directory vanishing works as root as well (chmod does not stop root).
    os.rmdir(store.directory)
    for i in range(5):
        store.save(f"vm{i}", VmMemory(target=i + 1, failures=i + 1, hold_until=i + 2))
        store.save_tick(i)
    warnings = [r for r in caplog.records if r.name == "balloonctl.daemon.statestore"]
    assert len(warnings) == 1, caplog.text
    assert warnings[0].levelno == logging.WARNING
    assert store.directory in warnings[0].getMessage()

    store.open()
    store.save("vm0", VmMemory(target=1, failures=1, hold_until=2))  # not written before: now
    assert StateStore(store.directory).load("vm0") == VmMemory(failures=1, hold_until=2)
    os.unlink(os.path.join(store.directory, _single(store.directory)))
    os.rmdir(store.directory)
    store.save_tick(99)  # broken again after a success: one more line
    warnings = [r for r in caplog.records if r.name == "balloonctl.daemon.statestore"]
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
        '{"failures": -1}',
        '{"failures": true}',
        '{"failures": 1.5}',
        '{"failures": "3"}',
        '{"hold_until": "x"}',
        '{"hold_until": null}',
        '{"hold_until": -57}',
        '{"hold_until": false}',
        # One bad value spoils the file: no half of a back-off.
        '{"failures": 3, "hold_until": "57"}',
        '{"failures": [3], "hold_until": 57}',
        '{"target": 805306368, "failures": -1, "hold_until": 57}',
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


@pytest.mark.parametrize(
    ("content", "loaded"),
    [
        ('{"vm": "vm", "failures": 2, "from_the_future": [1]}', VmMemory(failures=2)),
        ('{"hold_until": 57}', VmMemory(hold_until=57)),
        ("{}", VmMemory()),
        # Written by an older balloonctl, which kept the target in flight: the back-off is
        # taken, the rest ignored (even where it would not pass for a target).
        (
            '{"vm": "vm", "target": 805306368, "set_tick": 41, "shrink": true,'
            ' "reached": false, "failures": 3, "hold_until": 57}',
            KEPT,
        ),
        ('{"target": -1, "set_tick": "x", "shrink": 1, "failures": 2}', VmMemory(failures=2)),
    ],
)
def test_a_state_file_with_missing_or_extra_fields(
    store: StateStore, content: str, loaded: VmMemory, caplog: pytest.LogCaptureFixture
) -> None:
    store.save("vm", MEMORY)
    Path(store.directory, _single(store.directory)).write_text(content)
    caplog.clear()
    assert StateStore(store.directory).load("vm") == loaded
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


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
    push it again before the back-off ends. Without the state, it would shrink it at once.
    The target the back-off left in flight (where the guest stayed) is not carried over."""
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
            assert memory.target == 2 * GiB  # in flight: "stays at" where it is
            return d.tick_no, memory

    async def second_run(peer: HostilePeer, tick: int, memory: VmMemory) -> str:
        async with _daemon(cfg) as d:
            assert d.tick_no == tick
            back_off = VmMemory(failures=memory.failures, hold_until=memory.hold_until)
            assert d.store is not None and d.store.load("vm") == back_off
            _fresh(peer.vm)
            report = await d.tick(settle=True)
            assert report.tick == tick + 1
            kept = d.links["vm"].memory
            assert (kept.failures, kept.hold_until) == (memory.failures, memory.hold_until)
            assert kept.target is None and kept.set_tick == 0 and not kept.reached
            assert not decisions(report)["vm"].send
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


def test_a_target_in_flight_does_not_survive_a_restart(
    run_dir: Path, make_config: MakeConfig, host: FakeHost
) -> None:
    """A daemon stopped while a guest is on its way to a target does not leave that target to
    the next one, which would wait settle_ticks for a move that may never come (the guest, or
    the whole VM, restarted meanwhile): the next daemon decides afresh at once. Nor does a
    target alone cost a file write."""
    sock = str(run_dir / "vm.sock")
    cfg = make_config([VmEntry("vm", sock)])
    cfg.policy["settle_ticks"] = 5
    cfg.write()
    host.set(600 * MiB)  # pressure

    async def scenario() -> None:
        async with HostilePeer(sock, FakeQemu(ram=2 * GiB)) as peer:
            # The VM says yes to every target and never moves.
            peer.script("balloon", *[Return({})] * 10)
            async with _daemon(cfg) as d:
                reasons = []
                for _ in range(2):
                    _fresh(peer.vm)
                    reasons.append(decisions(await d.tick(settle=True))["vm"].reason)
                assert reasons[0].startswith("give:")
                assert reasons[1].startswith("hold: on its way to"), reasons
                memory = d.links["vm"].memory
                assert memory.target is not None and memory.target < 2 * GiB
                assert memory.failures == 0 and memory.hold_until == 0
                tick = d.tick_no
            assert os.listdir(cfg.state_dir) == ["daemon.json"]  # no back-off, no file

            async with _daemon(cfg) as d:
                assert d.tick_no == tick
                _fresh(peer.vm)
                report = await d.tick(settle=True)
                assert report.tick == tick + 1
                decision = decisions(report)["vm"]
                assert decision.reason.startswith("give:"), decision.reason
                assert decision.send
                assert d.links["vm"].memory.set_tick == tick + 1
            assert peer.count("balloon") == 2

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


@pytest.mark.parametrize("content", ["{not json", '{"failures": -1}'], ids=["corrupt", "bad"])
def test_a_rejected_file_is_rewritten_at_the_next_save_even_without_back_off(
    tmp_path: Path, content: str
) -> None:
    """A VM with no back-off is normally never written; a file that was rejected must still be
    replaced, or every start would warn about it again."""
    store = StateStore(str(tmp_path))
    store.open()
    store.save("vm", VmMemory(failures=1, hold_until=9))
    (path,) = tmp_path.glob("*.vm.json")
    path.write_text(content)
    fresh = StateStore(str(tmp_path))
    assert fresh.load("vm") == VmMemory()
    fresh.save("vm", VmMemory())
    assert json.loads(path.read_text()) == {"vm": "vm", "failures": 0, "hold_until": 0}
    assert StateStore(str(tmp_path)).load("vm") == VmMemory()
