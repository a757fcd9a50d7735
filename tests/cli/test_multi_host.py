"""Many hosts from one command (issue 18, item 1): ``list``, ``status`` and ``stats`` with a
repeated ``-c URI`` and/or ``--hosts FILE``, asked at once, with a host column.

The libvirt tests use the project's one private real libvirtd (fixtures/libvirtd.py, the
session's ``libvirtd`` and ``domain`` fixtures) reached by two URIs that differ only in a
harmless parameter, so balloonctl opens two independent connections to it, plus URIs where
nothing answers: a socket path with nothing listening (refused at once) and a socket that
accepts and never answers (a wedged libvirtd; costs a connect timeout). A second libvirtd
would cost another capability probe and another TCG guest boot on a 2-core machine for no
code path that two URIs do not already take: each host is its own connection (and its URI
its own libvirt call worker) either way. Every answer is checked against ``virsh`` on the
same daemon.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from balloonctl.cli.hosts import Host, run_on_hosts
from balloonctl.errors import VmUnreachable
from fixtures.libvirtd import Domain, Libvirtd
from tests.support.cli import json_out, one_line_error, run_cli
from tests.support.libvirt import cli
from tests.support.sims import Sim, short_tempdir

#: The connect timeout of a libvirt backend (status, stats): what a wedged host costs.
CONNECT_TIMEOUT_S = 10.0


def _second_uri(libvirtd: Libvirtd) -> str:
    """The same libvirtd by another URI: a second, independent connection."""
    return libvirtd.uri.replace("?", "?no_tty=1&", 1)


def _dead_uri(libvirtd: Libvirtd) -> str:
    return f"qemu+unix:///session?socket={libvirtd.root}/nothing-here"


def _summary(stderr: str, failed: int, of: int) -> str:
    line = one_line_error(stderr)
    assert f"{failed} of {of} hosts did not answer" in line, line
    return line


def _without(row: dict[str, object], *keys: str) -> dict[str, object]:
    return {k: v for k, v in row.items() if k not in keys}


def _virsh_running(libvirtd: Libvirtd) -> set[str]:
    return {name for name in libvirtd.virsh("list", "--name").split() if name}


# --- libvirt: list ----------------------------------------------------------------------------
def test_list_across_hosts_dead_host_is_one_line_and_exit_1(
    libvirtd: Libvirtd, domain: Domain
) -> None:
    uris = [libvirtd.uri, _second_uri(libvirtd), _dead_uri(libvirtd)]
    result = cli("-c", uris[0], "-c", uris[1], "-c", uris[2], "list")
    assert result.returncode == 1, result.stderr
    _summary(result.stderr, 1, 3)
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["HOST", "VM", "STATE", "ACTUAL", "MAX"]
    running = _virsh_running(libvirtd)
    assert domain.name in running
    for uri in uris[:2]:
        rows = [line.split() for line in lines[1:] if line.startswith(uri + " ")]
        # Every running domain with a balloon (the session's guests all have one), per host.
        assert {row[1] for row in rows} == running
        assert all(row[2] == "running" for row in rows)
    dead = [line for line in lines if line.startswith(uris[2])]
    assert len(dead) == 1 and "error: cannot connect to libvirt" in dead[0], result.stdout


def test_list_json_shape_with_host(libvirtd: Libvirtd, domain: Domain) -> None:
    first, second, dead = libvirtd.uri, _second_uri(libvirtd), _dead_uri(libvirtd)
    result = cli("--json", "-c", first, "-c", second, "-c", dead, "list")
    assert result.returncode == 1
    report = json_out(result)
    assert set(report) == {"vms", "hosts"}
    assert report["hosts"][0] == {"host": first, "address": first, "error": None}
    assert report["hosts"][1] == {"host": second, "address": second, "error": None}
    assert report["hosts"][2]["host"] == dead
    assert "cannot connect to libvirt" in report["hosts"][2]["error"]
    # Each host's rows are exactly what a one-host `-c URI list` prints, plus "host".
    single = json_out(cli("--json", "-c", first, "list"))
    assert set(single) == {"vms"} and all("host" not in row for row in single["vms"])
    for uri in (first, second):
        rows = [row for row in report["vms"] if row["host"] == uri]
        assert [next(iter(row)) for row in rows] == ["host"] * len(rows)  # host comes first
        # actual_bytes left out: the guest may be moving between the two runs.
        mine = [_without(row, "host", "actual_bytes") for row in rows]
        theirs = [_without(row, "actual_bytes") | {"address": uri} for row in single["vms"]]
        assert mine == theirs
    row = next(r for r in report["vms"] if r["host"] == first and r["vm"] == domain.name)
    assert row["uuid"] == domain.uuid and row["max_bytes"] == 2 << 30


def test_inventory_file_is_the_same_as_repeated_c(
    libvirtd: Libvirtd, domain: Domain, tmp_path: Path
) -> None:
    inventory = tmp_path / "hosts.toml"
    inventory.write_text(
        f'[[host]]\nname = "hv1"\nuri = "{libvirtd.uri}"\n\n'
        f'[[host]]\nname = "hv2"\nuri = "{_second_uri(libvirtd)}"\n'
    )
    result = cli("--json", "--hosts", str(inventory), "list")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    report = json_out(result)
    assert [h["host"] for h in report["hosts"]] == ["hv1", "hv2"]
    assert all(h["error"] is None for h in report["hosts"])
    for host in ("hv1", "hv2"):
        assert domain.name in {r["vm"] for r in report["vms"] if r["host"] == host}
    # -c adds to the inventory; a name given twice is refused.
    both = cli("--json", "-c", _dead_uri(libvirtd), "--hosts", str(inventory), "list")
    assert both.returncode == 1
    assert [h["host"] for h in json_out(both)["hosts"]] == [_dead_uri(libvirtd), "hv1", "hv2"]


# --- libvirt: status and stats of one VM name on every host -------------------------------------
def test_status_across_hosts_one_row_per_host(libvirtd: Libvirtd, domain: Domain) -> None:
    first, second, dead = libvirtd.uri, _second_uri(libvirtd), _dead_uri(libvirtd)
    table = cli("-c", first, "-c", second, "-c", dead, "status", domain.name)
    assert table.returncode == 1
    _summary(table.stderr, 1, 3)
    lines = table.stdout.splitlines()
    assert lines[0].split() == [
        "HOST", "VM", "ACTUAL", "MAX", "BALLOON", "PROFILE", "DRIVER", "STATS",
    ]  # fmt: skip
    assert [line.split()[:2] for line in lines[1:3]] == [
        [first, domain.name],
        [second, domain.name],
    ]
    assert lines[3].startswith(dead) and "error: cannot reach VM" in lines[3]

    report = json_out(cli("--json", "-c", first, "-c", second, "status", domain.name))
    actual = domain.dommemstat()["actual"] * 1024
    single = json_out(cli("--json", "-c", first, "status", domain.name))
    assert [row["host"] for row in report["vms"]] == [first, second]
    for row in report["vms"]:
        assert set(row) == {"host", *single}
        assert row["vm"] == domain.name and row["max_bytes"] == 2 << 30
        assert row["actual_bytes"] == actual  # witness: virsh dommemstat
        assert row["features"] == single["features"]
    assert [h["error"] for h in report["hosts"]] == [None, None]


def test_stats_across_hosts(libvirtd: Libvirtd, domain: Domain) -> None:
    first, second = libvirtd.uri, _second_uri(libvirtd)
    result = cli("--json", "-c", first, "-c", second, "stats", domain.name)
    assert result.returncode == 0, result.stderr
    report = json_out(result)
    witness = domain.dommemstat()  # KiB
    for row, host in zip(report["vms"], (first, second), strict=True):
        assert row["host"] == host and row["vm"] == domain.name
        assert row["last_update"] > 0
        assert row["stats"]["total-memory"] == witness["available"] * 1024
    table = cli("-c", first, "-c", second, "stats", domain.name)
    assert table.returncode == 0
    header, *rows = table.stdout.splitlines()
    assert header.split()[:3] == ["HOST", "VM", "UPDATED"]
    assert [row.split()[0] for row in rows] == [first, second]


def test_a_vm_missing_on_one_host_is_that_hosts_line(libvirtd: Libvirtd, domain: Domain) -> None:
    """The same name asked everywhere: a host without it answers with why, the rest rows."""
    result = cli("--json", "-c", libvirtd.uri, "-c", _second_uri(libvirtd), "status", "no-such")
    assert result.returncode == 1
    report = json_out(result)
    assert report["vms"] == []
    assert all("no libvirt domain 'no-such'" in h["error"] for h in report["hosts"])


@pytest.fixture
def wedged() -> Iterator[list[str]]:
    """Two libvirt URIs whose sockets accept and never answer (a wedged libvirtd)."""
    with short_tempdir("bctl-wedge-") as directory:
        listeners = []
        for name in ("a", "b"):
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(str(directory / f"{name}.sock"))
            listener.listen(8)
            listeners.append(listener)
        try:
            yield [f"qemu+unix:///session?socket={directory}/{n}.sock" for n in ("a", "b")]
        finally:
            for listener in listeners:
                listener.close()


def test_wedged_hosts_cost_one_connect_timeout_not_the_sum(
    libvirtd: Libvirtd, domain: Domain, wedged: list[str]
) -> None:
    """Hosts are connected in parallel: two hosts that never answer cost one connect timeout
    together (one after the other they would cost twice that), and the live host still
    answers."""
    start = time.monotonic()
    result = cli(
        "--json", "-c", wedged[0], "-c", libvirtd.uri, "-c", wedged[1], "status", domain.name
    )
    elapsed = time.monotonic() - start
    assert result.returncode == 1
    _summary(result.stderr, 2, 3)
    report = json_out(result)
    assert [row["host"] for row in report["vms"]] == [libvirtd.uri]
    errors = [h["error"] for h in report["hosts"]]
    assert errors[1] is None
    for error in (errors[0], errors[2]):
        assert f"did not answer within {CONNECT_TIMEOUT_S:g} s" in error
    assert CONNECT_TIMEOUT_S <= elapsed < 2 * CONNECT_TIMEOUT_S - 2, elapsed


def test_one_c_is_exactly_as_before(libvirtd: Libvirtd, domain: Domain) -> None:
    """No host column, no "host" key: one -c is the one-host command it always was."""
    table = cli("-c", libvirtd.uri, "list")
    assert table.returncode == 0
    assert table.stdout.splitlines()[0].split() == ["VM", "STATE", "ACTUAL", "MAX", "ADDRESS"]
    status = json_out(cli("--json", "-c", libvirtd.uri, "status", domain.name))
    assert set(status) == {"vm", "actual_bytes", "max_bytes", "features", "stats_age_s"}


# --- QMP hosts (qmp_dir), no libvirt needed -----------------------------------------------------
def test_qmp_dir_host_and_a_dead_uri(sim: Sim, tmp_path: Path) -> None:
    directory, name = Path(sim.sock).parent, Path(sim.sock).stem
    inventory = tmp_path / "hosts.toml"
    inventory.write_text(
        f'[[host]]\nname = "lab"\nqmp_dir = "{directory}"\n\n'
        '[[host]]\nname = "gone"\nuri = "qemu+unix:///session?socket=/nonexistent/sock"\n'
    )
    result = run_cli("--json", "--hosts", str(inventory), "list")
    assert result.returncode == 1
    report = json_out(result)
    assert report["vms"] == [
        {
            "host": "lab",
            "vm": name,
            "address": sim.sock,
            "state": "running",
            "actual_bytes": 512 << 20,
            "max_bytes": 512 << 20,
        }
    ]
    assert report["hosts"][0] == {"host": "lab", "address": f"qmp-dir:{directory}", "error": None}
    assert "cannot connect to libvirt" in report["hosts"][1]["error"]

    status = run_cli("--json", "--hosts", str(inventory), "status", name)
    assert status.returncode == 1
    (row,) = json_out(status)["vms"]
    assert row["host"] == "lab" and row["vm"] == name and row["max_bytes"] == 512 << 20

    only_lab = tmp_path / "lab.toml"
    only_lab.write_text(f'[[host]]\nname = "lab"\nqmp_dir = "{directory}"\n')
    stats = run_cli("--hosts", str(only_lab), "stats", name, "--period", "1")
    assert stats.returncode == 0, stats.stderr
    assert stats.stdout.splitlines()[1].split()[:2] == ["lab", name]


def test_list_with_config_vms_adds_the_local_host(sim: Sim, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[[vm]]\nname = "alpha"\nqmp = "{sim.sock}"\n')
    result = run_cli(
        "--json",
        "--config",
        str(config),
        "-c",
        "test:///default",
        "-c",
        "test:///default?x=1",
        "list",
    )
    assert result.returncode == 0, result.stderr
    report = json_out(result)
    assert [h["host"] for h in report["hosts"]] == [
        "test:///default",
        "test:///default?x=1",
        "local",
    ]
    local = [row for row in report["vms"] if row["host"] == "local"]
    assert [(row["vm"], row["state"]) for row in local] == [("alpha", "running")]


# --- usage: exit 2, one line, nothing asked ---------------------------------------------------
@pytest.mark.parametrize(
    "command",
    [
        ["set", "vm1", "1G"],
        ["features", "vm1"],
        ["negotiate", "vm1", "--enable", "sg", "--yes"],
        ["vring", "dump", "vm1", "--queue", "inflate"],
        ["daemon", "--once"],
    ],
)
def test_one_vm_commands_refuse_several_hosts(command: list[str], tmp_path: Path) -> None:
    for hosts in (["-c", "test:///default", "-c", "qemu:///x"], ["--hosts", str(tmp_path / "h")]):
        result = run_cli(*hosts, *command)
        assert result.returncode == 2
        line = one_line_error(result.stderr)
        assert f"{command[0]} is about one VM on one host" in line
        assert result.stdout == ""


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["stats", "vm1", "--watch"], "--watch follows one VM"),
        (["status", "/run/vm1.sock"], "is a QMP address"),
        (["stats", "unix:/run/vm1.sock"], "is a QMP address"),
    ],
)
def test_multi_host_usage_errors(args: list[str], fragment: str) -> None:
    result = run_cli("-c", "test:///default", "-c", "test:///default?x=1", *args)
    assert result.returncode == 2
    assert fragment in one_line_error(result.stderr)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[[host]\n", "not valid TOML"),
        ('[[vm]]\nname = "a"\n', "vm: unknown table"),
        ("", "no hosts"),
        ("host = 3\n", "no hosts"),
        ('[[host]]\nuri = "qemu:///system"\n', "host[0].name: required"),
        ('[[host]]\nname = "a"\n', "host[0]: needs exactly one of uri"),
        ('[[host]]\nname = "a"\nuri = "qemu:///system"\nqmp_dir = "/run"\n', "exactly one of"),
        ('[[host]]\nname = "a"\nurl = "qemu:///system"\n', "host[0].url: unknown key"),
        ('[[host]]\nname = ""\nuri = "qemu:///system"\n', "host[0].name: must be a non-empty"),
        ('[[host]]\nname = "a"\nuri = 5\n', "host[0].uri: must be a non-empty string"),
        (
            '[[host]]\nname = "a"\nuri = "qemu:///system"\n[[host]]\nname = "a"\nuri = "x:///"\n',
            "host[1].name: 'a' is used twice",
        ),
        ("host = [1]\n", "host[0]: must be a table"),
        ("\xff", "not UTF-8"),
        ('[[host]]\nname = "local"\nuri = "qemu:///system"\n', "host[0].name: 'local' is reserved"),
        ('[[host]]\nname = "a"\nqmp_dir = "/tmp/v\\u0000x"\n', "qmp_dir: contains a NUL"),
        ('[[host]]\nname = "a"\nuri = "qemu:///sys\\u0000tem"\n', "uri: contains a NUL"),
        ('[[host]]\nname = "a\\nb"\nuri = "qemu:///system"\n', "name: contains a NUL or a line"),
    ],
)
def test_inventory_errors_are_one_line_exit_2(text: str, fragment: str, tmp_path: Path) -> None:
    inventory = tmp_path / "hosts.toml"
    inventory.write_bytes(text.encode("latin-1"))
    for command in (["list"], ["status", "vm1"], ["stats", "vm1"]):
        result = run_cli("--hosts", str(inventory), *command)
        assert result.returncode == 2, result.stderr
        line = one_line_error(result.stderr)
        assert str(inventory) in line and fragment in line, line
        assert result.stdout == ""


def test_missing_inventory_and_empty_c(tmp_path: Path) -> None:
    missing = run_cli("--hosts", str(tmp_path / "nope.toml"), "list")
    assert missing.returncode == 2
    assert "nope.toml: no such file" in one_line_error(missing.stderr)
    empty = run_cli("-c", "test:///default", "-c", " ", "list")
    assert empty.returncode == 2
    assert "needs a URI" in one_line_error(empty.stderr)
    twice = run_cli("-c", "test:///default", "-c", "test:///default", "list")
    assert twice.returncode == 2
    assert "given twice" in one_line_error(twice.stderr)


def test_test_driver_hosts_answer_at_once() -> None:
    """libvirt's test:/// driver needs no daemon: a quick check of the whole path, JSON
    object for object the one-host answer with "host" added."""
    uris = ["test:///default", "test:///default?a=1", "test:///default?a=2", "test:///default?a=3"]
    result = run_cli("--json", *(arg for uri in uris for arg in ("-c", uri)), "list")
    assert result.returncode == 0, result.stderr
    report = json_out(result)
    single = json_out(run_cli("--json", "-c", uris[0], "list"))
    for uri in uris:
        rows = [
            {k: v for k, v in r.items() if k != "host"} for r in report["vms"] if r["host"] == uri
        ]
        assert rows == [{**row, "address": uri} for row in single["vms"]]


# --- the runner itself, in this process -------------------------------------------------------
async def _answer(host: Host) -> tuple[dict[str, object], str]:
    if host.name == "bad":
        raise VmUnreachable("bad is down")
    if host.name == "slow":
        await asyncio.sleep(30)
    return {"vm": host.name}, f"note from {host.name}"


def test_runner_keeps_order_bounds_a_host_and_reports_one_line_errors() -> None:
    hosts = [Host("slow", uri="s:///"), Host("a", uri="x:///"), Host("bad", uri="y:///")]
    start = time.monotonic()
    outcomes = run_on_hosts(hosts, _answer, limit=2, deadline_s=1.0)
    assert time.monotonic() - start < 5
    assert [(o.host.name, o.report, o.error) for o in outcomes] == [
        ("slow", None, "host slow did not answer within 1 s"),
        ("a", {"vm": "a"}, None),
        ("bad", None, "bad is down"),
    ]
    assert outcomes[1].notice == "note from a"


def test_at_most_limit_hosts_at_a_time() -> None:
    running = 0
    most = 0

    async def count(host: Host) -> tuple[dict[str, object], str]:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.05)
        running -= 1
        return {}, ""

    outcomes = run_on_hosts([Host(f"h{i}", uri=f"u{i}:///") for i in range(10)], count, limit=3)
    assert len(outcomes) == 10 and most == 3
