"""The VM commands end to end: ``python -m balloonctl`` as a subprocess against
``balloonctl sim`` processes on real unix sockets.

Every test checks what a script relies on (docs/contracts.md): the exit code (0 done, 1
failed, 2 usage/configuration, 3 a finding), the ``--json`` object's shape and values, and
on failure exactly one line on stderr, never a traceback.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from balloonctl.backends.base import GuestStats
from balloonctl.cli.vm_commands import render_stats, stats_report
from balloonctl.units import format_size
from balloonctl.virtio.spec import EXTENDED_STAT_NAMES
from tests.support.cli import json_out, popen_cli, run_cli, stop_process, wait_until
from tests.support.qmp import qmp_quit, raw_actual, raw_stats_period
from tests.support.sims import Sim, SimFactory

MiB = 1 << 20
GiB = 1 << 30
RAM = 512 * MiB
#: The sentence `features` prints on a virtio 1.2 device (and negotiate refuses with).
SG_SENTENCE = "SG does not exist on this device"
FEATURE_NAME = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
STAT_NAME = re.compile(r"^[a-z]+(-[a-z]+)*$")
MEMORY_STATS = ("free-memory", "total-memory", "available-memory", "disk-caches")
FEATURE_KEYS = {"profile", "offered", "acked", "sg", "driver_ok"}


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def assert_error(
    result: subprocess.CompletedProcess[str], code: int, *fragments: str, stdout_empty: bool = True
) -> str:
    """Exit ``code``, one line on stderr containing every fragment, no traceback; the line."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("balloonctl"), line
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    if stdout_empty:
        assert result.stdout == "", result.stdout
    return line


def ok_json(*args: str, timeout: float = 30.0) -> dict[str, Any]:
    """``balloonctl --json ARGS``, which must exit 0 without a traceback; its object."""
    result = run_cli("--json", *args, timeout=timeout)
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    return json_out(result)


def status(sock: str) -> dict[str, Any]:
    return ok_json("status", sock)


def features(sock: str) -> dict[str, Any]:
    return ok_json("features", sock)


def stale_socket(path: Path) -> str:
    """A unix socket file nobody listens on (what a VM that died leaves behind)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()
    return str(path)


def write_config(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def toml_str(text: str) -> str:
    """A TOML basic string (JSON's escaping is a subset of it)."""
    return json.dumps(text)


class Watch:
    """A background CLI whose stdout lines are read as they come."""

    def __init__(self, *args: str) -> None:
        self.proc = popen_cli(*args)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self._pump = threading.Thread(target=self._read, daemon=True)
        self._pump.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def next_line(self, timeout: float = 10.0) -> str:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line within {timeout} s") from None
        assert line is not None, f"stdout closed; exit {self.proc.poll()}: {self.stderr()}"
        return line

    def stderr(self) -> str:
        assert self.proc.stderr is not None
        if self.proc.poll() is None:
            return "(still running)"
        return self.proc.stderr.read()

    def finish(self, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
        """Wait for the exit; everything not yet read, as a CompletedProcess."""
        try:
            self.proc.wait(timeout=timeout)
        finally:
            stop_process(self.proc)
        self._pump.join(timeout=5)
        rest: list[str] = []
        while True:
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                rest.append(line)
        assert self.proc.stderr is not None
        err = self.proc.stderr.read()
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, "".join(rest), err)

    def close(self) -> None:
        stop_process(self.proc)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def watches() -> Iterator[list[Watch]]:
    """Background CLIs a test starts; each is stopped at teardown."""
    started: list[Watch] = []
    yield started
    for watch in started:
        watch.close()


# --------------------------------------------------------------------------------------------
# global options, exit code 3, import cost
# --------------------------------------------------------------------------------------------


def test_help_exits_0_and_lists_every_vm_command() -> None:
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    for command in ("list", "status", "set", "stats", "features", "negotiate"):
        assert command in result.stdout


@pytest.mark.parametrize("command", ["status", "set", "stats", "features", "negotiate", "list"])
def test_command_help_exits_0(command: str) -> None:
    result = run_cli(command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: balloonctl {command}")


def test_unknown_command_exits_2_with_one_line() -> None:
    assert_error(run_cli("frobnicate"), 2, "frobnicate")


def test_no_command_exits_2_with_one_line() -> None:
    assert_error(run_cli(), 2, "COMMAND")


def test_vm_command_without_vm_exits_2() -> None:
    assert_error(run_cli("status"), 2, "VM")


def test_vring_parse_finding_exits_3(tmp_path: Path) -> None:
    """Exit code 3 (a finding): an avail ring naming descriptor 8 of a queue of 8."""
    image = bytearray(64 * 1024)
    struct.pack_into("<HHH", image, 0x1000, 0, 1, 8)  # flags, idx=1, ring[0]=8
    path = tmp_path / "ring.img"
    path.write_bytes(bytes(image))
    result = run_cli(
        "vring", "parse", str(path), "--queue-size", "8", "--desc", "0", "--avail", "0x1000",
        "--used", "0x2000",
    )  # fmt: skip
    assert result.returncode == 3, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    report = json.loads(result.stdout)
    assert report["chains"] == []
    assert report["error"]["type"] == "HeadOutOfRange"
    assert report["error"]["head"] == 8


def _imported_modules(importtime_stderr: str) -> list[str]:
    names = []
    for line in importtime_stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.append(line.rsplit("|", 1)[1].strip())
    return names


def test_help_does_not_import_numpy() -> None:
    result = run_cli("--help", python_flags=("-X", "importtime"))
    assert result.returncode == 0
    modules = _imported_modules(result.stderr)
    assert "balloonctl.cli.main" in modules  # the import log is really there
    assert "numpy" not in result.stderr
    assert not [m for m in modules if m.split(".")[0] == "numpy"]


def test_status_does_not_import_numpy(shared_sim: Sim) -> None:
    result = run_cli("--json", "status", shared_sim.sock, python_flags=("-X", "importtime"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert json_out(result)["actual_bytes"] == RAM
    modules = _imported_modules(result.stderr)
    assert "balloonctl.cli.vm_commands" in modules
    assert "balloonctl.backends.qmp" in modules
    assert "numpy" not in result.stderr
    assert not [m for m in modules if m.startswith(("numpy", "balloonctl.sim", "balloonctl.guest"))]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--memory", "1M"], "--memory"),
        (["--time-scale", "0"], "--time-scale"),
        (["--rate", "0"], "--rate"),
        (["--profile", "virtio-9"], "virtio-9"),
        (["--workload", "crypto"], "crypto"),
        (["--qemu-version", "9.2"], "9.2"),
    ],
)
def test_sim_bad_options_exit_2(sock_dir: Path, args: list[str], fragment: str) -> None:
    sock = str(sock_dir / "never.sock")
    assert_error(run_cli("sim", "--qmp", sock, *args, timeout=20), 2, fragment)
    assert not os.path.exists(sock)


def test_sim_socket_in_missing_directory_exits_2() -> None:
    assert_error(run_cli("sim", "--qmp", "/nonexistent/dir/vm.sock", timeout=20), 2, "QMP")


def test_sim_refuses_a_socket_another_sim_serves(sim: Sim) -> None:
    assert_error(run_cli("sim", "--qmp", sim.sock, timeout=20), 2, sim.sock)
    assert status(sim.sock)["actual_bytes"] == RAM  # the first VM still answers there


def test_sim_stops_on_sigterm_and_removes_its_socket(sim: Sim) -> None:
    assert sim.stop() == 0
    assert not os.path.exists(sim.sock)
    assert "Traceback" not in sim.log_text()


# --------------------------------------------------------------------------------------------
# list
# --------------------------------------------------------------------------------------------


def test_list_qmp_dir_shows_running_and_unreachable(sim: Sim) -> None:
    qmp_dir = Path(sim.sock).parent
    stale = stale_socket(qmp_dir / "gone.sock")
    (qmp_dir / "notes.txt").write_text("not a socket")
    report = ok_json("list", "--qmp-dir", str(qmp_dir))
    assert set(report) == {"vms"}
    rows = {row["vm"]: row for row in report["vms"]}
    assert set(rows) == {"vm", "gone"}  # only *.sock, named by their stem
    for row in rows.values():
        assert set(row) == {"vm", "address", "state", "actual_bytes", "max_bytes"}
    assert rows["vm"]["state"] == "running"
    assert rows["vm"]["address"] == sim.sock
    assert rows["vm"]["actual_bytes"] == RAM
    assert rows["vm"]["max_bytes"] == RAM
    assert rows["gone"] == {
        "vm": "gone",
        "address": stale,
        "state": "unreachable",
        "actual_bytes": None,
        "max_bytes": None,
    }

    table = run_cli("list", "--qmp-dir", str(qmp_dir))
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["VM", "STATE", "ACTUAL", "MAX", "ADDRESS"]
    by_name = {line.split()[0]: line for line in lines[1:]}
    assert set(by_name) == {"vm", "gone"}
    assert "running" in by_name["vm"] and "512 MiB" in by_name["vm"]
    assert by_name["vm"].endswith(sim.sock)
    assert "unreachable" in by_name["gone"]


def test_list_shows_actual_after_set(sim: Sim) -> None:
    ok_json("set", sim.sock, "256M", "--wait", "--timeout", "20")
    report = ok_json("list", "--qmp-dir", str(Path(sim.sock).parent))
    (row,) = report["vms"]
    assert row["actual_bytes"] == 256 * MiB
    assert row["max_bytes"] == RAM


def test_list_config_entries(sim: Sim, tmp_path: Path) -> None:
    missing = str(tmp_path / "nowhere.sock")
    config = write_config(
        tmp_path / "config.toml",
        f'[[vm]]\nname = "alpha"\nqmp = {toml_str("unix:" + sim.sock)}\nmin = "128M"\n\n'
        f"[[vm]]\nqmp = {toml_str(missing)}\n",
    )
    report = ok_json("--config", config, "list")
    assert report["vms"] == [
        {
            "vm": "alpha",
            "address": sim.sock,
            "state": "running",
            "actual_bytes": RAM,
            "max_bytes": RAM,
        },
        {
            "vm": "nowhere",
            "address": missing,
            "state": "unreachable",
            "actual_bytes": None,
            "max_bytes": None,
        },
    ]


def test_list_config_and_qmp_dir_together(sim: Sim, tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "c.toml", f'[[vm]]\nname = "cfg"\nqmp = {toml_str(sim.sock)}\n'
    )
    report = ok_json("--config", config, "list", "--qmp-dir", str(Path(sim.sock).parent))
    assert [row["vm"] for row in report["vms"]] == ["cfg", "vm"]
    assert all(row["state"] == "running" for row in report["vms"])


def test_list_with_nothing_configured(tmp_path: Path) -> None:
    empty = write_config(tmp_path / "empty.toml", "")
    assert ok_json("--config", empty, "list") == {"vms": []}
    table = run_cli("--config", empty, "list")
    assert table.returncode == 0
    assert "no VMs configured" in table.stdout


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[[vm]\nqmp = ", "not valid TOML"),
        ('[[vm]]\nqmp = "/x.sock"\ncolour = "red"\n', "colour"),
        ('vm = "x"\n', "'vm' must be an array"),
        ('[[vm]]\nname = "a"\n', "qmp"),
        ('[[vm]]\nqmp = "/x.sock"\nmin = "lots"\n', "min"),
        ('[[vm]]\nqmp = "/a/x.sock"\n\n[[vm]]\nqmp = "/b/x.sock"\n', "used twice"),
    ],
    ids=["syntax", "unknown-key", "vm-not-array", "no-qmp", "bad-min", "duplicate-name"],
)
def test_list_corrupt_config_exits_2_naming_the_file(
    tmp_path: Path, text: str, fragment: str
) -> None:
    config = write_config(tmp_path / "broken.toml", text)
    assert_error(run_cli("--config", config, "list"), 2, config, fragment)


def test_list_config_with_malformed_address_exits_2(tmp_path: Path) -> None:
    config = write_config(tmp_path / "typo.toml", '[[vm]]\nqmp = "tcp:host:notaport"\n')
    assert_error(run_cli("--config", config, "list"), 2, config, "qmp")


def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    config = str(tmp_path / "absent.toml")
    assert_error(run_cli("--config", config, "list"), 2, config)


def test_config_from_environment_is_used(sim: Sim, tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "env.toml", f'[[vm]]\nname = "envvm"\nqmp = {toml_str(sim.sock)}\n'
    )
    result = run_cli("--json", "list", env={"BALLOONCTL_CONFIG": config})
    assert result.returncode == 0, result.stderr
    assert [row["vm"] for row in json_out(result)["vms"]] == ["envvm"]


def test_list_missing_qmp_dir_exits_2(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-dir")
    assert_error(run_cli("list", "--qmp-dir", missing), 2, missing)


# --------------------------------------------------------------------------------------------
# status
# --------------------------------------------------------------------------------------------


def test_status_json_seed_sg(shared_sim: Sim) -> None:
    report = status(shared_sim.sock)
    assert set(report) == {"vm", "actual_bytes", "max_bytes", "features", "stats_age_s"}
    assert report["vm"] == shared_sim.sock
    assert report["actual_bytes"] == RAM
    assert report["max_bytes"] == RAM
    feats = report["features"]
    assert set(feats) >= FEATURE_KEYS
    assert feats["profile"] == "seed-sg"
    assert feats["sg"] == {"offered": True, "acked": True}
    assert feats["driver_ok"] is True
    assert "sg" in feats["offered"] and "sg" in feats["acked"]
    assert set(feats["acked"]) <= set(feats["offered"])
    # The guest reported stats once at probe time; the age is a number of seconds.
    age = report["stats_age_s"]
    assert isinstance(age, int | float) and not isinstance(age, bool)
    assert age >= 0


def test_status_json_virtio_1_2(sim_factory: SimFactory) -> None:
    vm = sim_factory(profile="virtio-1.2")
    report = status(vm.sock)
    feats = report["features"]
    assert feats["profile"] == "virtio-1.2"
    assert feats["sg"] == {"offered": False, "acked": False}
    assert "sg" not in feats["offered"] and "sg" not in feats["acked"]
    assert "page-reporting" in feats["acked"]
    assert report["actual_bytes"] == report["max_bytes"] == RAM


def test_status_text(shared_sim: Sim) -> None:
    result = run_cli("status", shared_sim.sock)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines: dict[str, str] = {}
    for line in result.stdout.splitlines():
        key, value = line.split(None, 1)
        lines[key] = value
    assert lines["VM"] == shared_sim.sock
    assert lines["memory"] == "512 MiB of 512 MiB (balloon 0 B)"
    assert lines["profile"] == "seed-sg"
    assert "sg" in lines["acked"].split()
    assert lines["SG"].startswith("negotiated")


def test_status_accepts_unix_prefix(shared_sim: Sim) -> None:
    report = status("unix:" + shared_sim.sock)
    assert report["vm"] == "unix:" + shared_sim.sock
    assert report["actual_bytes"] == RAM


# --------------------------------------------------------------------------------------------
# set
# --------------------------------------------------------------------------------------------

SET_KEYS = {"vm", "target_bytes", "actual_bytes", "reached", "elapsed_s"}


def test_set_without_wait_asks_and_returns(sim: Sim) -> None:
    report = ok_json("set", sim.sock, "256M")
    assert set(report) == SET_KEYS
    assert report["vm"] == sim.sock
    assert report["target_bytes"] == 256 * MiB
    assert isinstance(report["elapsed_s"], int | float) and report["elapsed_s"] >= 0
    assert isinstance(report["reached"], bool)
    # The balloon command really went out: the VM gets there on its own.
    assert wait_until(lambda: raw_actual(sim.sock) == 256 * MiB, timeout=10)


def test_set_wait_inflate_then_deflate(sim: Sim) -> None:
    down = ok_json("set", sim.sock, "256M", "--wait", "--timeout", "20")
    assert set(down) == SET_KEYS
    assert down["reached"] is True
    assert down["target_bytes"] == down["actual_bytes"] == 256 * MiB
    assert down["elapsed_s"] > 0
    assert status(sim.sock)["actual_bytes"] == 256 * MiB

    up = ok_json("set", sim.sock, "512M", "--wait", "--timeout", "20")
    assert up["reached"] is True
    assert up["target_bytes"] == up["actual_bytes"] == RAM
    assert status(sim.sock)["actual_bytes"] == RAM


def test_set_wait_text_output(sim: Sim) -> None:
    result = run_cli("set", sim.sock, "384M", "--wait", "--timeout", "20")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no progress bar when stderr is not a terminal
    assert "target 384 MiB, actual 384 MiB (reached after" in result.stdout


@pytest.mark.parametrize(
    ("memory", "size", "expected"),
    [
        ("512M", "0.25G", 256 * MiB),
        ("512M", "268435456", 256 * MiB),
        ("512M", "262144K", 256 * MiB),
        ("512M", "256MiB", 256 * MiB),
        ("2G", "1536M", 1536 * MiB),
        ("2G", "1.5G", 1536 * MiB),
        ("2G", "1536MiB", 1536 * MiB),
    ],
)
def test_set_size_spellings(sim_factory: SimFactory, memory: str, size: str, expected: int) -> None:
    vm = sim_factory(memory=memory)
    report = ok_json("set", vm.sock, size, "--wait", "--timeout", "20")
    assert report["target_bytes"] == expected
    assert report["reached"] is True
    assert report["actual_bytes"] == expected
    assert status(vm.sock)["actual_bytes"] == expected


@pytest.mark.parametrize(
    "size_args",
    [
        ["1Q"],
        ["--", "-1G"],
        ["-1G"],
        ["0"],
        ["0.0001"],
        ["1iB"],
        [""],
        ["1.5.5G"],
        ["\uff11G"],  # a fullwidth digit one
        ["99999999999T"],
    ],
    ids=["1Q", "--_-1G", "-1G", "0", "0.0001", "1iB", "empty", "1.5.5G", "fullwidth", "2**64+"],
)
def test_set_bad_size_exits_2_and_sends_nothing(shared_sim: Sim, size_args: list[str]) -> None:
    result = run_cli("--json", "set", shared_sim.sock, *size_args, "--wait", "--timeout", "5")
    assert_error(result, 2)
    assert raw_actual(shared_sim.sock) == RAM


@pytest.mark.parametrize("timeout", ["0", "-1", "nan", "inf", "soon"])
def test_set_bad_timeout_exits_2(shared_sim: Sim, timeout: str) -> None:
    result = run_cli("set", shared_sim.sock, "256M", "--wait", f"--timeout={timeout}")
    assert_error(result, 2, "timeout")
    assert raw_actual(shared_sim.sock) == RAM


def test_set_above_ram_is_clamped_with_a_notice(sim: Sim) -> None:
    ok_json("set", sim.sock, "256M", "--wait", "--timeout", "20")
    result = run_cli("--json", "set", sim.sock, "1536M", "--wait", "--timeout", "20")
    assert result.returncode == 0, result.stderr
    report = json_out(result)
    assert report["target_bytes"] == RAM
    assert report["actual_bytes"] == RAM
    assert report["reached"] is True
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "1.5 GiB" in lines[0] and "512 MiB" in lines[0] and "RAM" in lines[0]
    assert status(sim.sock)["actual_bytes"] == RAM


def test_set_unreachable_target_times_out_exit_1(sim: Sim) -> None:
    """8M of a 512M guest: the guest keeps its kernel and programs' memory."""
    result = run_cli("--json", "set", sim.sock, "8M", "--wait", "--timeout", "2")
    line = assert_error(result, 1, "8 MiB", stdout_empty=False)
    report = json_out(result)
    assert set(report) == SET_KEYS
    assert report["reached"] is False
    assert report["target_bytes"] == 8 * MiB
    assert 8 * MiB < report["actual_bytes"] < RAM  # it went as far as the guest let it
    assert report["elapsed_s"] >= 2
    assert format_size(report["actual_bytes"]) in line  # says what was reached
    assert status(sim.sock)["actual_bytes"] == report["actual_bytes"]


def test_set_timeout_on_a_slow_balloon_exit_1(sim_factory: SimFactory) -> None:
    """--rate: 256 MiB at 32 MiB/s takes 8 s; --timeout 1 ends it part of the way there."""
    vm = sim_factory(rate="32M")
    result = run_cli("--json", "set", vm.sock, "256M", "--wait", "--timeout", "1")
    assert_error(result, 1, "256 MiB", stdout_empty=False)
    report = json_out(result)
    assert report["reached"] is False
    assert 256 * MiB < report["actual_bytes"] < RAM


def test_set_text_output_not_reached(sim: Sim) -> None:
    result = run_cli("set", sim.sock, "8M", "--wait", "--timeout", "1")
    assert_error(result, 1, stdout_empty=False)
    assert "NOT reached" in result.stdout


def _floor_config(tmp_path: Path, sock: str) -> str:
    return write_config(tmp_path / "floor.toml", f'[[vm]]\nqmp = {toml_str(sock)}\nmin = "256M"\n')


@pytest.mark.parametrize("spelling", ["path", "unix:", "name"])
def test_set_below_configured_floor_exits_2_and_sends_nothing(
    sim: Sim, tmp_path: Path, spelling: str
) -> None:
    config = _floor_config(tmp_path, sim.sock)
    # The entry has no name: it is named after its socket's stem, "vm".
    vm = {"path": sim.sock, "unix:": "unix:" + sim.sock, "name": "vm"}[spelling]
    result = run_cli("--json", "--config", config, "set", vm, "128M", "--wait", "--timeout", "5")
    assert_error(result, 2, "floor", "256 MiB", config)
    time.sleep(0.5)  # a balloon command would have moved actual by now (1 GiB/s)
    assert status(sim.sock)["actual_bytes"] == RAM
    # The floor is a floor, not a ban: at or above it, set goes ahead.
    address = sim.sock if spelling == "name" else vm
    report = ok_json("--config", config, "set", address, "256M", "--wait", "--timeout", "20")
    assert report["reached"] is True and report["actual_bytes"] == 256 * MiB


def test_config_names_resolve_to_sockets(sim: Sim, tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "named.toml",
        f'[[vm]]\nname = "alpha"\nqmp = {toml_str(sim.sock)}\nmin = "256M"\n',
    )
    for command in (["status"], ["features"], ["stats", "--period", "1"]):
        report = ok_json("--config", config, command[0], "alpha", *command[1:])
        assert report["vm"] == sim.sock
    assert_error(run_cli("--config", config, "set", "alpha", "128M"), 2, "floor", "alpha")
    report = ok_json("--config", config, "set", "alpha", "300M", "--wait", "--timeout", "20")
    assert report["reached"] is True
    assert status(sim.sock)["actual_bytes"] == 300 * MiB
    # Without the configuration the name means nothing (no libvirt in this build).
    assert_error(run_cli("status", "alpha"), 1, "alpha")


def test_set_full_deflate_allowed_when_floor_is_above_ram(sim: Sim, tmp_path: Path) -> None:
    ok_json("set", sim.sock, "256M", "--wait", "--timeout", "20")
    config = write_config(
        tmp_path / "big.toml", f'[[vm]]\nqmp = {toml_str(sim.sock)}\nmin = "1G"\n'
    )
    result = run_cli(
        "--json", "--config", config, "set", sim.sock, "2G", "--wait", "--timeout", "20"
    )
    assert result.returncode == 0, result.stderr
    assert json_out(result)["actual_bytes"] == RAM


@pytest.mark.parametrize("spelling", ["dot", "symlink"])
def test_set_floor_holds_for_another_spelling_of_the_socket(
    sim: Sim, tmp_path: Path, spelling: str
) -> None:
    """Found by this suite (fixed in e8ccbec): the floor was matched by string."""
    config = _floor_config(tmp_path, sim.sock)
    directory, name = os.path.split(sim.sock)
    if spelling == "dot":
        other = os.path.join(directory, ".", name)
    else:
        other = os.path.join(directory, "link.sock")
        os.symlink(sim.sock, other)
    result = run_cli("--json", "--config", config, "set", other, "128M")
    assert result.returncode == 2, (result.stdout, result.stderr)
    time.sleep(0.5)
    assert status(sim.sock)["actual_bytes"] == RAM


# --------------------------------------------------------------------------------------------
# addresses that lead nowhere
# --------------------------------------------------------------------------------------------

VM_COMMANDS: list[list[str]] = [
    ["status"],
    ["set", "{vm}", "256M"],
    ["set", "{vm}", "256M", "--wait", "--timeout", "5"],
    ["stats"],
    ["stats", "--watch"],
    ["features"],
    ["negotiate", "{vm}", "--disable", "sg", "--yes"],
]


def _argv(template: list[str], vm: str) -> list[str]:
    if "{vm}" not in template:
        return [template[0], vm, *template[1:]]
    return [vm if part == "{vm}" else part for part in template]


@pytest.mark.parametrize(
    "template", VM_COMMANDS, ids=lambda t: "-".join(p for p in t if p != "{vm}")
)
def test_missing_socket_exits_1_for_every_command(template: list[str], tmp_path: Path) -> None:
    vm = str(tmp_path / "missing.sock")
    assert_error(run_cli(*_argv(template, vm), timeout=30), 1, vm)


@pytest.mark.parametrize(
    "template", VM_COMMANDS, ids=lambda t: "-".join(p for p in t if p != "{vm}")
)
def test_malformed_address_exits_2_for_every_command(template: list[str]) -> None:
    vm = "tcp:host:notaport"
    assert_error(run_cli(*_argv(template, vm)), 2, "notaport")


def test_status_nonexistent_directory_exits_1() -> None:
    assert_error(run_cli("--json", "status", "/nonexistent/x.sock"), 1, "/nonexistent/x.sock")


def test_status_regular_file_exits_1(tmp_path: Path) -> None:
    path = tmp_path / "plain-file"
    path.write_text("I am not a socket\n")
    assert_error(run_cli("--json", "status", str(path)), 1, "not a socket")


def test_status_stale_socket_exits_1(sock_dir: Path) -> None:
    path = stale_socket(sock_dir / "dead.sock")
    assert_error(run_cli("--json", "status", path), 1, path)


def test_status_tcp_nothing_listening_exits_1() -> None:
    assert_error(run_cli("--json", "status", "tcp:127.0.0.1:1"), 1, "tcp:127.0.0.1:1")


@pytest.mark.parametrize(
    "address",
    [
        "tcp:host:notaport",
        "tcp:host:0",
        "tcp:host:70000",
        "tcp::4444",
        "tcp:::1:4444",
        "unix:",
        "tcp:[::1",
    ],
)
def test_status_malformed_address_exits_2(address: str) -> None:
    assert_error(run_cli("--json", "status", address), 2)


def test_status_plain_name_without_libvirt_exits_1() -> None:
    assert_error(run_cli("--json", "status", "web01"), 1, "web01")


# --------------------------------------------------------------------------------------------
# a VM that goes away in the middle of a command
# --------------------------------------------------------------------------------------------


def _vm_goes_away_during_set(sim: Sim, how: str) -> subprocess.CompletedProcess[str]:
    proc = popen_cli("--json", "set", sim.sock, "64M", "--wait", "--timeout", "30")
    try:
        # The balloon command is out and the guest is inflating (32 MiB/s: ~14 s to go).
        assert wait_until(lambda: raw_actual(sim.sock) < RAM - 16 * MiB, timeout=10)
        if how == "quit":
            assert qmp_quit(sim.sock) == {"return": {}}
        elif how == "sigterm":
            sim.proc.send_signal(signal.SIGTERM)
        else:
            sim.kill()
        sim.proc.wait(timeout=10)
        out, err = proc.communicate(timeout=25)
    finally:
        stop_process(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize("how", ["quit", "sigterm", "sigkill"])
def test_vm_gone_during_set_wait_exits_1_with_one_line(sim_factory: SimFactory, how: str) -> None:
    vm = sim_factory(rate="32M")
    result = _vm_goes_away_during_set(vm, how)
    assert_error(result, 1, vm.sock, stdout_empty=False)
    assert vm.proc.returncode == (0 if how != "sigkill" else -signal.SIGKILL)


@pytest.mark.parametrize("how", ["quit", "sigterm", "sigkill"])
def test_vm_gone_during_set_wait_says_what_was_reached(sim_factory: SimFactory, how: str) -> None:
    """Found by this suite (fixed in e8ccbec): the line said only 'cannot reach VM'."""
    vm = sim_factory(rate="32M")
    result = _vm_goes_away_during_set(vm, how)
    line = assert_error(result, 1, stdout_empty=False)
    match = re.search(r"\breached ([\d.]+ (?:B|KiB|MiB|GiB)) of 64 MiB\b", line)
    assert match, line
    report = json_out(result)  # --json still prints what set got to
    assert report["reached"] is False
    assert report["target_bytes"] == 64 * MiB
    assert 64 * MiB < report["actual_bytes"] < RAM
    assert match.group(1) == format_size(report["actual_bytes"])


# --------------------------------------------------------------------------------------------
# stats
# --------------------------------------------------------------------------------------------


def _check_stats_report(report: dict[str, Any], vm: str, ram: int) -> None:
    assert set(report) == {"vm", "last_update", "stats"}
    assert report["vm"] == vm
    last = report["last_update"]
    assert isinstance(last, int) and not isinstance(last, bool)
    assert 0 < last <= time.time() + 5
    stats = report["stats"]
    assert set(MEMORY_STATS) <= set(stats)
    for name, value in stats.items():
        assert STAT_NAME.match(name), name
        assert not name.startswith("stat-"), name
        assert isinstance(value, int) and not isinstance(value, bool), (name, value)
        assert value >= 0, (name, value)
    # Memory in bytes: total is the guest's RAM to the byte (deflate-on-oom: not adjusted).
    assert stats["total-memory"] == ram
    assert 0 < stats["free-memory"] <= stats["available-memory"] <= stats["total-memory"]
    assert stats["disk-caches"] <= stats["total-memory"]
    assert stats["available-memory"] - stats["free-memory"] <= stats["disk-caches"]


def test_stats_json_turns_polling_on(sim: Sim) -> None:
    assert raw_stats_period(sim.sock) == 0
    result = run_cli("--json", "stats", sim.sock)
    assert result.returncode == 0, result.stderr
    _check_stats_report(json_out(result), sim.sock, RAM)
    # A notice (not an error) says polling was off and is now on.
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "polling was off" in lines[0], result.stderr
    assert raw_stats_period(sim.sock) == 2


def test_stats_period_then_status_shows_fresh_stats(sim: Sim) -> None:
    first = ok_json("stats", sim.sock, "--period", "1")
    _check_stats_report(first, sim.sock, RAM)
    assert raw_stats_period(sim.sock) == 1
    time.sleep(3.0)  # longer than the sim's age at boot could be mistaken for
    report = status(sim.sock)
    age = report["stats_age_s"]
    assert age is not None and 0 <= age <= 2.5, age
    later = ok_json("stats", sim.sock)
    assert later["last_update"] >= first["last_update"] + 2


def test_stats_period_0_does_not_turn_polling_on(sim: Sim) -> None:
    """Found by this suite (fixed in e8ccbec): --period 0 on a VM not polling got 2 s."""
    assert raw_stats_period(sim.sock) == 0
    result = run_cli("--json", "stats", sim.sock, "--period", "0")
    assert result.returncode in (0, 2), (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert "turned it on" not in result.stderr
    assert raw_stats_period(sim.sock) == 0


def test_stats_text(shared_sim: Sim) -> None:
    result = run_cli("stats", shared_sim.sock, "--period", "1")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["VM", shared_sim.sock]
    assert lines[1].startswith("updated")
    rows = {line.split()[0]: line.split(None, 1)[1].strip() for line in lines[2:]}
    assert rows["total-memory"] == "512 MiB"
    assert set(MEMORY_STATS) <= set(rows)


SIZE = re.compile(r"^\d+(\.\d+)? (B|KiB|MiB|GiB)$")


def test_stats_text_shows_the_linux_6_12_six_with_their_units(shared_sim: Sim) -> None:
    """The simulated guest is a Linux 6.12 on a QEMU that names tags 10-15 (9.2+): they
    are rows like the others, byte amounts as sizes and counts as numbers, between the
    faults and hugetlb, from the mildest reclaim to an OOM kill."""
    result = run_cli("stats", shared_sim.sock, "--period", "1")
    assert result.returncode == 0, result.stderr
    names = [line.split()[0] for line in result.stdout.splitlines()[2:]]
    rows = {
        line.split()[0]: line.split(None, 1)[1].strip() for line in result.stdout.splitlines()[2:]
    }
    for name in ("async-scans", "async-reclaims", "direct-scans", "direct-reclaims"):
        assert SIZE.match(rows[name]), (name, rows[name])
    for name in ("alloc-stalls", "oom-kills"):
        assert rows[name].isdigit(), (name, rows[name])
    assert rows["oom-kills"] == "0"  # an idle guest killed nothing
    six = [n for n in names if n in EXTENDED_STAT_NAMES]
    mildest_first = ("async-scans", "async-reclaims", "direct-scans", "direct-reclaims")
    assert six == [*mildest_first, "alloc-stalls", "oom-kills"]
    assert names.index("minor-faults") < names.index("async-scans")
    assert names.index("oom-kills") < names.index("htlb-pgalloc")
    assert "not available" not in result.stdout


def test_stats_count_the_guests_reclaim_under_a_leak(sim_factory: SimFactory) -> None:
    """A leaking program in a guest squeezed by the balloon: allocations stall in direct
    reclaim (page cache goes), then deflate-on-OOM; the counters say so, and only grow."""
    vm = sim_factory(workload="leak", time_scale=20.0)
    assert run_cli("set", vm.sock, "300M").returncode == 0
    first = ok_json("stats", vm.sock, "--period", "1")["stats"]
    assert wait_until(
        lambda: ok_json("stats", vm.sock)["stats"]["alloc-stalls"] > 0, timeout=10, step=0.5
    )
    later = ok_json("stats", vm.sock)["stats"]
    assert later["direct-reclaims"] > 0
    assert later["direct-scans"] >= later["direct-reclaims"]
    assert later["direct-reclaims"] % 4096 == 0  # pages, as bytes
    for name in EXTENDED_STAT_NAMES:
        assert later[name] >= first[name], name


def test_stats_without_the_six_show_nothing_for_them() -> None:
    """QEMU 7.2 (or a guest before Linux 6.12): no row, no zero, no note."""
    reading = GuestStats(last_update=1, stats={"total-memory": RAM, "free-memory": RAM // 2})
    report = stats_report("vm", reading)
    assert set(report) == {"vm", "last_update", "stats"}
    text = render_stats(report)
    assert not any(name in text for name in EXTENDED_STAT_NAMES)
    assert "not available" not in text


def test_stats_workload_and_time_scale(sim_factory: SimFactory) -> None:
    """--workload cache --time-scale 100: the page cache is at 60% of RAM within a second."""
    vm = sim_factory(workload="cache", time_scale=100.0)
    assert wait_until(
        lambda: ok_json("stats", vm.sock, "--period", "1")["stats"]["disk-caches"] > 0.4 * RAM,
        timeout=6,
        step=0.5,
    )
    stats = ok_json("stats", vm.sock)["stats"]
    assert stats["available-memory"] > stats["free-memory"] + 0.4 * RAM


def test_stats_idle_guest_has_little_cache(shared_sim: Sim) -> None:
    stats = ok_json("stats", shared_sim.sock, "--period", "1")["stats"]
    assert stats["disk-caches"] < 0.2 * RAM
    assert stats["free-memory"] > 0.5 * RAM


def test_stats_watch_json_lines(sim: Sim, watches: list[Watch]) -> None:
    watch = Watch("--json", "stats", "--watch", "--period", "1", sim.sock)
    watches.append(watch)
    first = json.loads(watch.next_line())
    second = json.loads(watch.next_line())
    for report in (first, second):
        _check_stats_report(report, sim.sock, RAM)
    assert second["last_update"] > first["last_update"]  # one line per new reading
    watch.proc.send_signal(signal.SIGINT)  # Ctrl-C is how a watch ends
    result = watch.finish()
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    for line in result.stdout.splitlines():
        json.loads(line)


@pytest.mark.parametrize("how", ["sigkill", "quit"])
def test_stats_watch_connection_dropped_exits_1(sim: Sim, watches: list[Watch], how: str) -> None:
    watch = Watch("--json", "stats", "--watch", "--period", "1", sim.sock)
    watches.append(watch)
    json.loads(watch.next_line())
    if how == "sigkill":
        sim.kill()
    else:
        assert qmp_quit(sim.sock) == {"return": {}}
    result = watch.finish()
    assert_error(result, 1, sim.sock, stdout_empty=False)
    for line in result.stdout.splitlines():
        json.loads(line)


# --------------------------------------------------------------------------------------------
# features
# --------------------------------------------------------------------------------------------


def _check_features_report(report: dict[str, Any], vm: str) -> None:
    assert {"vm", *FEATURE_KEYS} <= set(report)
    assert report["vm"] == vm
    assert isinstance(report["offered"], list) and isinstance(report["acked"], list)
    for name in report["offered"] + report["acked"]:
        assert FEATURE_NAME.match(name), name
    assert set(report["acked"]) <= set(report["offered"])
    assert report["sg"] == {"offered": "sg" in report["offered"], "acked": "sg" in report["acked"]}


def test_features_json_seed_sg(shared_sim: Sim) -> None:
    report = features(shared_sim.sock)
    _check_features_report(report, shared_sim.sock)
    assert report["profile"] == "seed-sg"
    assert report["driver_ok"] is True
    assert report["sg"] == {"offered": True, "acked": True}
    assert {"stats-vq", "deflate-on-oom", "version-1"} <= set(report["acked"])
    # Bit 3 is SG on the seed device; it must not also show up as free-page-hint.
    assert "free-page-hint" not in report["offered"]
    # status carries the same object, less vm.
    feats = status(shared_sim.sock)["features"]
    assert feats == {k: v for k, v in report.items() if k != "vm"}


def test_features_text_seed_sg(shared_sim: Sim) -> None:
    result = run_cli("features", shared_sim.sock)
    assert result.returncode == 0, result.stderr
    assert "SG: negotiated" in result.stdout
    assert SG_SENTENCE not in result.stdout
    row = next(line for line in result.stdout.splitlines() if line.startswith("sg "))
    assert row.split() == ["sg", "yes", "yes"]


def test_features_virtio_1_2(sim_factory: SimFactory) -> None:
    vm = sim_factory(profile="virtio-1.2")
    report = features(vm.sock)
    _check_features_report(report, vm.sock)
    assert report["profile"] == "virtio-1.2"
    assert report["sg"] == {"offered": False, "acked": False}
    assert "sg" not in report["offered"]
    assert "page-reporting" in report["offered"] and "page-reporting" in report["acked"]

    result = run_cli("features", vm.sock)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert SG_SENTENCE in text
    assert "free page reporting" in text
    assert "page-reporting" in text


# --------------------------------------------------------------------------------------------
# negotiate
# --------------------------------------------------------------------------------------------


def test_negotiate_without_yes_exits_2_and_changes_nothing(shared_sim: Sim) -> None:
    before = features(shared_sim.sock)
    assert_error(run_cli("negotiate", shared_sim.sock, "--disable", "sg"), 2, "--yes")
    assert features(shared_sim.sock) == before


def test_negotiate_disable_then_enable_sg(sim: Sim) -> None:
    ok_json("set", sim.sock, "256M", "--wait", "--timeout", "20")

    off = ok_json("negotiate", sim.sock, "--disable", "sg", "--yes")
    _check_features_report(off, sim.sock)
    assert off["profile"] == "seed-sg"
    assert off["sg"] == {"offered": False, "acked": False}
    assert off["driver_ok"] is True
    confirmed = features(sim.sock)
    assert confirmed["sg"] == {"offered": False, "acked": False}
    assert confirmed["profile"] == "seed-sg"
    assert {"stats-vq", "deflate-on-oom"} <= set(confirmed["acked"])
    # The replugged balloon gave the guest its memory back meanwhile; negotiate then asks
    # for the size the VM had again (as libvirt keeps currentMemory across a replug).
    assert off["target_bytes"] == 256 * MiB
    assert wait_until(lambda: raw_actual(sim.sock) == 256 * MiB, timeout=10)
    # ... and it is a working balloon.
    assert ok_json("set", sim.sock, "384M", "--wait", "--timeout", "20")["reached"] is True

    on = ok_json("negotiate", sim.sock, "--enable", "sg", "--yes")
    assert on["sg"] == {"offered": True, "acked": True}
    assert on["target_bytes"] == 384 * MiB
    assert features(sim.sock)["sg"] == {"offered": True, "acked": True}


def test_negotiate_keeps_stats_polling(sim: Sim) -> None:
    ok_json("stats", sim.sock, "--period", "1")
    assert raw_stats_period(sim.sock) == 1
    ok_json("negotiate", sim.sock, "--disable", "deflate-on-oom", "--yes")
    assert "deflate-on-oom" not in features(sim.sock)["offered"]
    assert raw_stats_period(sim.sock) == 1


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--enable", "no-such-feature"], "no-such-feature"),
        (["--disable", "stats-vq"], "stats-vq"),
        (["--enable", "sg", "--disable", "sg"], "sg"),
        ([], "--enable"),
    ],
    ids=["unknown", "fixed", "both", "none"],
)
def test_negotiate_bad_features_exit_2(shared_sim: Sim, args: list[str], fragment: str) -> None:
    before = features(shared_sim.sock)
    assert_error(run_cli("negotiate", shared_sim.sock, *args, "--yes"), 2, fragment)
    assert features(shared_sim.sock) == before


def test_negotiate_enable_sg_on_virtio_1_2_exits_1(sim_factory: SimFactory) -> None:
    vm = sim_factory(profile="virtio-1.2")
    before = features(vm.sock)
    line = assert_error(
        run_cli("--json", "negotiate", vm.sock, "--enable", "sg", "--yes"), 1, SG_SENTENCE
    )
    assert "free page reporting" in line
    assert features(vm.sock) == before
    # Turning off what does not exist is refused the same way, not as a usage error.
    assert_error(
        run_cli("--json", "negotiate", vm.sock, "--disable", "sg", "--yes"), 1, SG_SENTENCE
    )
    assert features(vm.sock) == before


def test_negotiate_on_a_bus_without_hotplug_exits_1(sim_factory: SimFactory) -> None:
    vm = sim_factory(hotplug=False)
    before = features(vm.sock)
    assert_error(
        run_cli("--json", "negotiate", vm.sock, "--disable", "sg", "--yes"),
        1,
        "cannot hotplug",
        "pcie.0",
    )
    # The balloon is still there, unchanged, and still works.
    assert features(vm.sock) == before
    report = status(vm.sock)
    assert report["actual_bytes"] == RAM
    assert report["features"]["sg"] == {"offered": True, "acked": True}
    assert ok_json("set", vm.sock, "256M", "--wait", "--timeout", "20")["reached"] is True
