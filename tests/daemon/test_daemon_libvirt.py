"""``balloonctl daemon`` with ``[libvirt]`` on the private libvirtd (fixtures/libvirtd.py).

The daemon discovers the running domains with a balloon on the libvirtd's URI, filters them
by the include/exclude globs and balances them; here as ``--once`` subprocesses, checked
against ``virsh`` (dominfo, dumpxml, list) as the independent witness. The host's memory is
a file the test writes.

The domain is the session's ``bctl-lv1``, shared with the other libvirt tests: every test
here leaves it at 2 GiB with ``<stats period='2'/>``, as it was booted.
"""

from __future__ import annotations

import fnmatch
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from balloonctl.sim.host import write_meminfo
from fixtures.libvirtd import Domain, Libvirtd
from tests.support.libvirt import cli

MiB = 1 << 20
GiB = 1 << 30
#: The fake host: 16 GiB; [policy]'s defaults put pressure below 20 % and calm above 30 %.
HOST_TOTAL = 16 * GiB
PRESSURE = 1 * GiB  # 6 %
BALANCED = 4 * GiB  # 25 %: nothing moves but guests under their own pressure
FLOOR = 1536 * MiB


def used_memory(libvirtd: Libvirtd, name: str) -> int:
    """``virsh dominfo``'s Used memory (libvirt's current balloon size), bytes."""
    for line in libvirtd.virsh("dominfo", name).splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Used memory":
            number, unit = value.split()
            assert unit == "KiB", line
            return int(number) * 1024
    raise AssertionError(f"virsh dominfo {name} has no Used memory line")


def xml_stats_period(libvirtd: Libvirtd, name: str) -> str:
    """The ``<stats period=.../>`` element of the live XML, as text."""
    xml = libvirtd.virsh("dumpxml", name)
    start = xml.find("<stats ")
    assert start >= 0, xml
    return xml[start : xml.find("/>", start) + 2]


def wait_used(libvirtd: Libvirtd, name: str, size: int, timeout: float = 60.0) -> list[int]:
    """Every Used memory seen until it is ``size``."""
    seen = [used_memory(libvirtd, name)]
    deadline = time.monotonic() + timeout
    while seen[-1] != size:
        assert time.monotonic() < deadline, f"{name} never got to {size}: {seen[-5:]}"
        time.sleep(0.1)
        seen.append(used_memory(libvirtd, name))
    return seen


@pytest.fixture
def full_size(libvirtd: Libvirtd, domain: Domain) -> Iterator[Domain]:
    """The shared domain at 2 GiB with stats every 2 s, before the test and after it."""

    def restore() -> None:
        if xml_stats_period(libvirtd, domain.name) != "<stats period='2'/>":
            libvirtd.virsh("dommemstat", domain.name, "--period", "2", "--live")
        if used_memory(libvirtd, domain.name) != 2 * GiB:
            libvirtd.virsh("setmem", domain.name, "2G", "--live")
            wait_used(libvirtd, domain.name, 2 * GiB)

    restore()
    yield domain
    restore()


def write_config(
    tmp_path: Path,
    libvirtd: Libvirtd,
    *,
    available: int,
    include: tuple[str, ...] = ("*",),
    exclude: tuple[str, ...] = (),
    interval: float = 1.0,
    floors: dict[str, str] | None = None,
) -> Path:
    """A daemon config on the private libvirtd, with a fake host meminfo."""
    meminfo = tmp_path / "meminfo"
    write_meminfo(meminfo, HOST_TOTAL, available)
    domains = "".join(
        f'\n[[libvirt.domain]]\nname = "{name}"\nmin = "{size}"\n'
        for name, size in (floors or {}).items()
    )
    config = tmp_path / "autoballoon.toml"
    config.write_text(
        f"""[libvirt]
uri = "{libvirtd.uri}"
include = {json.dumps(list(include))}
exclude = {json.dumps(list(exclude))}
{domains}
[daemon]
interval = {interval}
state_dir = "{tmp_path / "state"}"

[host]
meminfo = "{meminfo}"
psi = "{tmp_path / "no-psi"}"

[policy]
max_step = "2G"
max_step_percent = 100
"""
    )
    return config


def once(config: Path, *flags: str) -> dict[str, Any]:
    """``balloonctl --json daemon --config FILE --once FLAGS``: its report (exit 0)."""
    result = cli("--json", "daemon", "--config", str(config), "--once", *flags)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    report = json.loads(result.stdout)
    assert isinstance(report, dict)
    return report


def test_dry_run_once_lists_the_discovered_domain_as_libvirt_sees_it(
    libvirtd: Libvirtd, full_size: Domain, tmp_path: Path
) -> None:
    domain = full_size
    config = write_config(tmp_path, libvirtd, available=BALANCED, include=("bctl-*",))
    report = once(config, "--dry-run")

    # Every running domain matching the glob, each with its balloon (all of the fixture's
    # domains have one), and nothing else.
    running = libvirtd.virsh("list", "--name").split()
    expected = {name for name in running if fnmatch.fnmatchcase(name, "bctl-*")}
    assert domain.name in expected
    assert {d["vm"] for d in report["decisions"]} == expected
    (mine,) = [d for d in report["decisions"] if d["vm"] == domain.name]
    assert mine["current_bytes"] == used_memory(libvirtd, domain.name) == 2 * GiB
    # Balanced host, idle guest: it holds (and a dry run would not have sent anything).
    assert mine["target_bytes"] == mine["current_bytes"]
    assert mine["reason"].startswith("hold: host available 25.0%"), mine
    assert report["host"]["mode"] == "balanced"
    assert report["host"]["total_bytes"] == HOST_TOTAL
    assert report["host"]["available_bytes"] == BALANCED
    # A dry run changes nothing: not the stats period (interval 1 s would make a real run
    # set it to 1), and no state is written.
    assert xml_stats_period(libvirtd, domain.name) == "<stats period='2'/>"
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize(
    ("include", "exclude"),
    [(("*",), ("bctl-lv*",)), (("web-*",), ())],
    ids=["excluded", "not-included"],
)
def test_a_domain_the_globs_leave_out_is_not_touched(
    libvirtd: Libvirtd,
    full_size: Domain,
    tmp_path: Path,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
) -> None:
    domain = full_size
    # Host under pressure and not a dry run: a managed domain would be shrunk and get
    # its stats period set to the 1 s tick.
    config = write_config(tmp_path, libvirtd, available=PRESSURE, include=include, exclude=exclude)
    report = once(config)
    assert report["decisions"] == []
    assert report["host"]["mode"] == "pressure"
    time.sleep(1.5)  # room for a balloon change that should not come
    assert used_memory(libvirtd, domain.name) == 2 * GiB
    assert xml_stats_period(libvirtd, domain.name) == "<stats period='2'/>"


def test_once_under_host_pressure_moves_the_domain_down_to_its_floor(
    libvirtd: Libvirtd, full_size: Domain, tmp_path: Path
) -> None:
    domain = full_size
    # Interval 2 s: the stats period the domain already has, so only the balloon moves.
    config = write_config(
        tmp_path,
        libvirtd,
        available=PRESSURE,
        include=(domain.name,),
        interval=2.0,
        floors={domain.name: "1536M"},
    )
    report = once(config)
    (decision,) = report["decisions"]
    assert decision["vm"] == domain.name
    assert decision["current_bytes"] == 2 * GiB
    # An idle guest needs far less than 1.5 GiB: the floor is where it stops.
    assert decision["target_bytes"] == FLOOR, decision
    assert decision["reason"].startswith("give: host available 6.2% < 20%"), decision

    seen = wait_used(libvirtd, domain.name, FLOOR)
    assert min(seen) >= FLOOR, seen
    time.sleep(2.0)  # the daemon is gone; nothing moves it further
    assert used_memory(libvirtd, domain.name) == FLOOR
    assert domain.dommemstat()["actual"] * 1024 == FLOOR
    assert xml_stats_period(libvirtd, domain.name) == "<stats period='2'/>"
    # The tick counter is kept for its next run; a target in flight is not (only back-off
    # is, and this domain reached its target).
    assert json.loads((tmp_path / "state" / "daemon.json").read_text())["tick"] >= 1
    assert not (tmp_path / "state" / f"{domain.name}.vm.json").exists()
