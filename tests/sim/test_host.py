"""balloonctl.sim.host: the simulated host's arithmetic (what the guests give, the host gains),
the meminfo it writes, and the daemon config that points at it.

The demo and the daemon bench set their phases with it, so the numbers here are theirs: a
12 GiB host with four 2 GiB guests (the demo), a host twice its guests' RAM (the bench).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from balloonctl.sim.host import SimHost, daemon_config, meminfo_text, replace_file, write_meminfo

MiB = 1 << 20
GiB = 1 << 30


def read_kb(path: Path) -> dict[str, int]:
    """``{key: bytes}`` of a meminfo file, as proc(5) writes it (values in kB)."""
    out = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition(":")
        number, unit = value.split()
        assert unit == "kB", line
        out[key] = int(number) * 1024
    return out


# --------------------------------------------------------------------------------------------
# The file
# --------------------------------------------------------------------------------------------


def test_meminfo_text_is_in_kb_with_free_half_of_available() -> None:
    text = meminfo_text(16 * GiB, 6 * GiB)
    assert text.splitlines() == [
        "MemTotal:         16777216 kB",
        "MemFree:           3145728 kB",
        "MemAvailable:      6291456 kB",
    ]


def test_meminfo_rounds_down_to_whole_kb() -> None:
    text = meminfo_text(4 * GiB + 1023, 2 * GiB + 1023)
    assert "MemTotal:          4194304 kB" in text
    assert "MemAvailable:      2097152 kB" in text


def test_write_meminfo_replaces_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "meminfo"
    path.write_text("garbage\n")
    write_meminfo(path, 8 * GiB, 2 * GiB)
    assert read_kb(path) == {"MemTotal": 8 * GiB, "MemFree": 1 * GiB, "MemAvailable": 2 * GiB}
    assert os.listdir(tmp_path) == ["meminfo"]


def test_replace_file_writes_any_text(tmp_path: Path) -> None:
    path = tmp_path / "psi"
    replace_file(str(path), "some avg10=1.00\n")
    assert path.read_text() == "some avg10=1.00\n"
    assert os.listdir(tmp_path) == ["psi"]


def test_daemon_config_points_at_the_hosts_files(tmp_path: Path) -> None:
    text = daemon_config(
        [("web", "/run/web.sock"), ("db", "/run/d b.sock")], interval=1.0, directory="/d"
    )
    assert text == (
        "[daemon]\n"
        "interval = 1.0\n"
        'state_dir = "/d/state"\n'
        "\n"
        "[host]\n"
        'meminfo = "/d/meminfo"\n'
        'psi = "/d/no-psi"\n'
        "\n"
        "[[vm]]\n"
        'name = "web"\n'
        'qmp = "/run/web.sock"\n'
        "\n"
        "[[vm]]\n"
        'name = "db"\n'
        'qmp = "/run/d b.sock"\n'
    )


# --------------------------------------------------------------------------------------------
# The arithmetic
# --------------------------------------------------------------------------------------------


def demo_host(tmp_path: Path) -> SimHost:
    """The demo's: 12 GiB, four 2 GiB guests."""
    return SimHost(
        12 * GiB, dict.fromkeys(("web", "batch", "idle", "leak"), 2 * GiB), tmp_path / "m"
    )


def test_a_guest_of_unknown_size_holds_all_of_its_ram(tmp_path: Path) -> None:
    host = demo_host(tmp_path)
    assert host.held() == 8 * GiB
    assert host.given() == 0
    assert host.available() == 4 * GiB  # 12 GiB less 8 GiB of guests, the host using nothing
    host.observe({"idle": 1536 * MiB, "web": None})
    assert host.held() == 8 * GiB - 512 * MiB
    assert host.held(at_full_size=True) == 8 * GiB
    assert host.given() == 512 * MiB
    assert host.available() == 4 * GiB + 512 * MiB


def test_what_the_guests_give_the_host_gains_and_what_they_take_it_loses(
    tmp_path: Path,
) -> None:
    host = demo_host(tmp_path)
    host.observe(dict.fromkeys(host.ram, 2 * GiB))
    host.use = 1 * GiB
    assert host.available() == 3 * GiB
    host.observe({"idle": 1 * GiB, "batch": 1792 * MiB})  # give 1 GiB and 256 MiB
    assert host.available() == 3 * GiB + 1280 * MiB
    host.observe({"idle": 2 * GiB})  # idle grows back
    assert host.available() == 3 * GiB + 256 * MiB


def test_available_is_clamped_to_zero_and_to_memtotal(tmp_path: Path) -> None:
    host = demo_host(tmp_path)
    host.use = 5 * GiB  # 5 + 8 > 12: overcommitted
    assert host.available() == 0
    host.use = -20 * GiB
    assert host.available() == 12 * GiB


def test_leave_sets_what_is_available_now_and_returns_the_jobs_size(tmp_path: Path) -> None:
    """The demo's phases: 25 % while the daemon connects, then a job takes the host to
    10 %; from there MemAvailable follows the guests."""
    host = demo_host(tmp_path)
    host.observe({"idle": 1 * GiB})
    assert host.leave(25) == 12 * GiB - 3 * GiB - 7 * GiB  # the use that leaves 3 GiB
    assert host.available() == 3 * GiB
    job = host.leave(10)
    assert host.available() == 12 * GiB * 10 // 100
    assert job == 3 * GiB - 12 * GiB * 10 // 100
    host.observe({"web": 1536 * MiB})  # under pressure, web gives 512 MiB
    assert host.available() == 12 * GiB * 10 // 100 + 512 * MiB


def test_leave_at_full_size_counts_what_was_given_on_top(tmp_path: Path) -> None:
    """The daemon bench (host ``follow``): a host twice its guests' RAM, each phase a share
    of MemTotal when every guest is at full size, plus what the guests have given."""
    ram = 256 * MiB
    host = SimHost(2 * 5 * ram, {f"vm{i}": ram for i in range(5)}, tmp_path / "m")
    total = host.total
    host.leave(25, at_full_size=True)
    assert host.available() == total * 25 // 100
    host.observe({"vm0": 192 * MiB, "vm1": 128 * MiB, "vm2": None})
    host.leave(10, at_full_size=True)
    assert host.available() == total * 10 // 100 + 64 * MiB + 128 * MiB
    # Calm: 60 % at full size is more than MemTotal less the guests' RAM (50 %) leaves: the
    # host's own use goes below zero and only the clamp to MemTotal bounds it.
    host.leave(60, at_full_size=True)
    assert host.use < 0
    assert host.available() == total * 60 // 100 + 192 * MiB


def test_with_no_size_observed_the_phase_value_is_all_there_is(tmp_path: Path) -> None:
    """The daemon bench (host ``static``): nothing observed, every phase exactly its share."""
    host = SimHost(10 * GiB, {"vm0": 2 * GiB}, tmp_path / "m")
    for percent in (25, 10, 60, 10):
        host.leave(percent, at_full_size=True)
        assert host.available() == 10 * GiB * percent // 100


def test_write_puts_the_hosts_numbers_in_its_meminfo(tmp_path: Path) -> None:
    host = demo_host(tmp_path)
    host.leave(25)
    host.observe({"idle": 1 * GiB})
    assert host.write() == 4 * GiB
    assert read_kb(tmp_path / "m") == {
        "MemTotal": 12 * GiB,
        "MemFree": 2 * GiB,
        "MemAvailable": 4 * GiB,
    }


def test_an_unknown_guest_and_an_empty_host_are_refused(tmp_path: Path) -> None:
    host = demo_host(tmp_path)
    with pytest.raises(KeyError):
        host.observe({"nope": 1 * GiB})
    with pytest.raises(ValueError):
        SimHost(0, {}, tmp_path / "m")
