"""The daemon's configuration tables: [daemon], [host], [libvirt] or [[libvirt]] (+
[[libvirt.domain]]) and [policy]. Every key parsed, every default, and every error naming the
file and the key."""

from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path

import pytest

from balloonctl.daemon.config import (
    DEFAULT_SHARES,
    Config,
    DaemonConfig,
    DomainConfig,
    HostConfig,
    LibvirtConfig,
    load,
    member_name,
)
from balloonctl.daemon.link import Member, members
from balloonctl.daemon.policy import PolicyConfig
from balloonctl.daemon.statestore import StateStore
from balloonctl.errors import ConfigError, UsageError
from tests.support.cli import one_line_error, run_cli

MiB = 1 << 20
GiB = 1 << 30


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "balloonctl.toml"
    path.write_text(text)
    return str(path)


def load_text(tmp_path: Path, text: str) -> Config:
    return load(write(tmp_path, text))


def error(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------------------------
# Defaults
# --------------------------------------------------------------------------------------------


def test_dataclass_defaults() -> None:
    assert DaemonConfig() == DaemonConfig(5.0, None, None, 5.0, 10.0)
    assert HostConfig() == HostConfig("/proc/meminfo", "/proc/pressure/memory")
    policy = PolicyConfig()
    assert (policy.host_critical, policy.host_low, policy.host_high) == (5.0, 20.0, 30.0)
    assert policy.psi_some_avg10 == 10.0
    assert (policy.guest_headroom, policy.guest_low, policy.no_deflate_on_oom_headroom) == (
        20.0,
        10.0,
        10.0,
    )
    assert (policy.max_step, policy.max_step_percent) == (128 * MiB, 5.0)
    assert (policy.deadband, policy.deadband_percent) == (16 * MiB, 1.0)
    assert (policy.stale_after, policy.settle_ticks, policy.backoff_max) == (15.0, 3, 64)
    assert LibvirtConfig("qemu:///system") == LibvirtConfig(
        "qemu:///system", ("*",), (), 0, DEFAULT_SHARES, ()
    )


def test_empty_file_is_all_defaults(tmp_path: Path) -> None:
    config = load_text(tmp_path, "")
    assert config.daemon == DaemonConfig()
    assert config.host == HostConfig()
    assert config.policy == PolicyConfig()
    assert config.libvirt is None
    assert config.vms == ()


def test_empty_tables_are_all_defaults(tmp_path: Path) -> None:
    config = load_text(tmp_path, "[daemon]\n[host]\n[policy]\n[libvirt]\nuri = 'qemu:///session'\n")
    assert config.daemon == DaemonConfig()
    assert config.host == HostConfig()
    assert config.policy == PolicyConfig()
    assert config.libvirt == LibvirtConfig("qemu:///session")


def test_no_file_is_all_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("BALLOONCTL_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.setattr("balloonctl.daemon.config.os.path.isfile", lambda _path: False)
    config = load(None)
    assert config == Config(None)
    assert config.policy == PolicyConfig()
    assert config.daemon == DaemonConfig()


# --------------------------------------------------------------------------------------------
# Every key parsed
# --------------------------------------------------------------------------------------------

FULL = """
[daemon]
interval = 2.5
state_dir = "/var/lib/balloonctl"
metrics = "127.0.0.1:9712"
connect_timeout = 3
command_timeout = 20.5

[host]
meminfo = "/tmp/meminfo"
psi = "/tmp/psi"

[libvirt]
uri = "qemu+ssh://root@h/system"
include = ["web-*", "db-*"]
exclude = ["*-test"]
min = "512M"
shares = 500

[[libvirt.domain]]
name = "db-1"
min = "2G"
shares = 4000

[[libvirt.domain]]
name = "web-1"
min = 1073741824

[policy]
host_low = 15
host_critical = 3.5
host_high = 40
psi_some_avg10 = 0
guest_headroom = 25
guest_low = 8
no_deflate_on_oom_headroom = 5
max_step = "256M"
max_step_percent = 10
deadband = 8388608
deadband_percent = 0.5
stale_after = 30
settle_ticks = 5
backoff_max = 128
"""


def test_every_key_parsed(tmp_path: Path) -> None:
    config = load_text(tmp_path, FULL)
    assert config.daemon == DaemonConfig(2.5, "/var/lib/balloonctl", "127.0.0.1:9712", 3.0, 20.5)
    assert config.host == HostConfig("/tmp/meminfo", "/tmp/psi")
    assert config.libvirt == LibvirtConfig(
        uri="qemu+ssh://root@h/system",
        include=("web-*", "db-*"),
        exclude=("*-test",),
        min=512 * MiB,
        shares=500,
        domains=(DomainConfig("db-1", 2 * GiB, 4000), DomainConfig("web-1", GiB, DEFAULT_SHARES)),
    )
    assert config.policy == PolicyConfig(
        host_low=15.0,
        host_critical=3.5,
        host_high=40.0,
        psi_some_avg10=0.0,
        guest_headroom=25.0,
        guest_low=8.0,
        no_deflate_on_oom_headroom=5.0,
        max_step=256 * MiB,
        max_step_percent=10.0,
        deadband=8 * MiB,
        deadband_percent=0.5,
        stale_after=30.0,
        settle_ticks=5,
        backoff_max=128,
    )
    # TOML integers for float knobs come out as floats, the tick counts stay ints.
    assert isinstance(config.daemon.connect_timeout, float)
    assert isinstance(config.policy.host_low, float)
    assert isinstance(config.policy.settle_ticks, int)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ('"1G"', GiB),
        ('"1.5G"', 3 * GiB // 2),
        ('"512MiB"', 512 * MiB),
        ('"4096"', 4096),
        ("4096", 4096),
        ("0", 0),
    ],
    ids=["1G", "1.5G", "512MiB", "string-bytes", "int-bytes", "zero"],
)
@pytest.mark.parametrize(
    "where",
    ["libvirt.min", "libvirt.domain.min", "policy.deadband", "policy.max_step"],
)
def test_sizes(tmp_path: Path, text: str, size: int, where: str) -> None:
    if where == "policy.max_step" and size == 0:
        assert "max_step" in error(tmp_path, f"[policy]\nmax_step = {text}\n")
        return
    if where.startswith("policy"):
        policy = load_text(tmp_path, f"[policy]\n{where.split('.')[1]} = {text}\n").policy
        assert getattr(policy, where.split(".")[1]) == size
        return
    if where == "libvirt.min":
        libvirt = load_text(tmp_path, f"[libvirt]\nuri = 'test:///default'\nmin = {text}\n").libvirt
        assert libvirt is not None
        assert libvirt.min == size
        return
    libvirt = load_text(
        tmp_path,
        f"[libvirt]\nuri = 'test:///default'\n[[libvirt.domain]]\nname = 'a'\nmin = {text}\n",
    ).libvirt
    assert libvirt is not None
    assert libvirt.domains == (DomainConfig("a", size, DEFAULT_SHARES),)


@pytest.mark.parametrize("name", [f.name for f in fields(PolicyConfig)])
def test_every_policy_key_accepted_alone(tmp_path: Path, name: str) -> None:
    """Each [policy] key parses on its own to its default (a key with no range would not)."""
    default = getattr(PolicyConfig(), name)
    value = f'"{default}"' if name in ("max_step", "deadband") else repr(default)
    policy = load_text(tmp_path, f"[policy]\n{name} = {value}\n").policy
    assert policy == PolicyConfig()


@pytest.mark.parametrize(
    "metrics", ["127.0.0.1:9712", "localhost:1", "0.0.0.0:65535", "[::1]:9712"]
)
def test_metrics_accepted(tmp_path: Path, metrics: str) -> None:
    assert load_text(tmp_path, f'[daemon]\nmetrics = "{metrics}"\n').daemon.metrics == metrics


def test_libvirt_domain_fallback(tmp_path: Path) -> None:
    text = """
[libvirt]
uri = "qemu:///system"
min = "1G"
shares = 200
[[libvirt.domain]]
name = "big"
min = "4G"
[[libvirt.domain]]
name = "cheap"
shares = 50
"""
    libvirt = load_text(tmp_path, text).libvirt
    assert libvirt is not None
    assert libvirt.domain("big") == DomainConfig("big", 4 * GiB, DEFAULT_SHARES)
    assert libvirt.domain("cheap") == DomainConfig("cheap", 0, 50)
    assert libvirt.domain("other") == DomainConfig("other", GiB, 200)
    assert LibvirtConfig("qemu:///system").domain("x") == DomainConfig("x", 0, DEFAULT_SHARES)


# --------------------------------------------------------------------------------------------
# Errors: file and key named, ConfigError (a UsageError: exit 2)
# --------------------------------------------------------------------------------------------


def test_config_error_is_a_usage_error() -> None:
    assert issubclass(ConfigError, UsageError)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[deamon]\ninterval = 5\n", "deamon: unknown table"),
        ("interval = 5\n", "interval: unknown table"),
        ("[[domain]]\nname = 'a'\n", "domain: unknown table"),
    ],
    ids=["misspelt-table", "top-level-key", "top-level-array"],
)
def test_unknown_table(tmp_path: Path, text: str, key: str) -> None:
    message = error(tmp_path, text)
    assert key in message
    assert "known: vm, daemon, host, libvirt, policy" in message


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[daemon]\ninterval_s = 5\n", "daemon.interval_s: unknown key"),
        ("[host]\nmeminfo_path = '/x'\n", "host.meminfo_path: unknown key"),
        ("[libvirt]\nuri = 'qemu:///system'\nurl = 'x'\n", "libvirt.url: unknown key"),
        (
            "[libvirt]\nuri = 'qemu:///system'\n[[libvirt.domain]]\nname = 'a'\nfloor = 1\n",
            "libvirt.domain[0].floor: unknown key",
        ),
        ("[policy]\nhost_pressure = 20\n", "policy.host_pressure: unknown key"),
        ("[[vm]]\nqmp = '/run/a.sock'\nfloor = 1\n", "vm[0].floor: unknown key"),
    ],
    ids=["daemon", "host", "libvirt", "libvirt.domain", "policy", "vm"],
)
def test_unknown_key(tmp_path: Path, text: str, key: str) -> None:
    message = error(tmp_path, text)
    assert key in message
    assert "(known: " in message


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("daemon = 5\n", "daemon: must be a table"),
        ("host = 'x'\n", "host: must be a table"),
        ("policy = [1]\n", "policy: must be a table"),
        ("libvirt = 'qemu:///system'\n", "libvirt: must be a table"),
        ("[daemon]\ninterval = '5'\n", "daemon.interval:"),
        ("[daemon]\ninterval = true\n", "daemon.interval:"),
        ("[daemon]\nconnect_timeout = '1s'\n", "daemon.connect_timeout:"),
        ("[daemon]\ncommand_timeout = [10]\n", "daemon.command_timeout:"),
        ("[daemon]\nstate_dir = 5\n", "daemon.state_dir:"),
        ("[daemon]\nstate_dir = ''\n", "daemon.state_dir:"),
        ("[daemon]\nmetrics = 9712\n", "daemon.metrics:"),
        ("[host]\nmeminfo = 1\n", "host.meminfo:"),
        ("[host]\npsi = ''\n", "host.psi:"),
        ("[libvirt]\nuri = 5\n", "libvirt.uri:"),
        ("[libvirt]\nuri = ''\n", "libvirt.uri:"),
        ("[libvirt]\nuri = 'x'\ninclude = 'web-*'\n", "libvirt.include:"),
        ("[libvirt]\nuri = 'x'\nexclude = [1]\n", "libvirt.exclude:"),
        ("[libvirt]\nuri = 'x'\nexclude = ['']\n", "libvirt.exclude:"),
        ("[libvirt]\nuri = 'x'\nmin = 1.5\n", "libvirt.min:"),
        ("[libvirt]\nuri = 'x'\nmin = 'lots'\n", "libvirt.min:"),
        ("[libvirt]\nuri = 'x'\nmin = -1\n", "libvirt.min:"),
        ("[libvirt]\nuri = 'x'\nmin = true\n", "libvirt.min:"),
        ("[libvirt]\nuri = 'x'\nshares = 1.5\n", "libvirt.shares:"),
        ("[libvirt]\nuri = 'x'\nshares = '1000'\n", "libvirt.shares:"),
        ("[libvirt]\nuri = 'x'\nshares = true\n", "libvirt.shares:"),
        ("[libvirt]\nuri = 'x'\ndomain = {name = 'a'}\n", "libvirt.domain: must be an array"),
        ("[libvirt]\nuri = 'x'\ndomain = ['a']\n", "libvirt.domain[0]: must be a table"),
        ("[libvirt]\nuri = 'x'\n[[libvirt.domain]]\nmin = 1\n", "libvirt.domain[0].name:"),
        ("[libvirt]\nuri = 'x'\n[[libvirt.domain]]\nname = 7\n", "libvirt.domain[0].name:"),
        (
            "[libvirt]\nuri = 'x'\n[[libvirt.domain]]\nname = 'a'\nmin = '1X'\n",
            "libvirt.domain[0].min:",
        ),
        (
            "[libvirt]\nuri = 'x'\n[[libvirt.domain]]\nname = 'a'\nshares = 'many'\n",
            "libvirt.domain[0].shares:",
        ),
        ("[policy]\nhost_low = '20'\n", "policy.host_low:"),
        ("[policy]\nguest_low = true\n", "policy.guest_low:"),
        ("[policy]\nmax_step = 1.5\n", "policy.max_step:"),
        ("[policy]\nmax_step = '128 furlongs'\n", "policy.max_step:"),
        ("[policy]\ndeadband = -1\n", "policy.deadband:"),
        ("[policy]\nsettle_ticks = 2.5\n", "policy.settle_ticks:"),
        ("[policy]\nbackoff_max = '64'\n", "policy.backoff_max:"),
        ("[policy]\nsettle_ticks = true\n", "policy.settle_ticks:"),
    ],
    ids=lambda v: None if v.endswith("\n") else v,
)
def test_wrong_type(tmp_path: Path, text: str, key: str) -> None:
    assert key in error(tmp_path, text)


@pytest.mark.parametrize(
    ("table", "key", "value"),
    [
        ("daemon", "interval", "0.05"),
        ("daemon", "interval", "3601"),
        ("daemon", "interval", "nan"),
        ("daemon", "interval", "inf"),
        ("daemon", "connect_timeout", "0"),
        ("daemon", "connect_timeout", "601"),
        ("daemon", "command_timeout", "-1"),
        ("daemon", "restore_timeout", "0"),
        ("daemon", "restore_timeout", "3601"),
        ("libvirt", "shares", "0"),
        ("libvirt", "shares", "-5"),
        ("libvirt", "shares", "1048577"),
        ("policy", "host_low", "-1"),
        ("policy", "host_high", "100.5"),
        ("policy", "host_critical", "nan"),
        ("policy", "psi_some_avg10", "101"),
        ("policy", "guest_headroom", "91"),
        ("policy", "guest_low", "-0.5"),
        ("policy", "no_deflate_on_oom_headroom", "51"),
        ("policy", "max_step_percent", "0"),
        ("policy", "max_step_percent", "101"),
        ("policy", "deadband_percent", "51"),
        ("policy", "stale_after", "0"),
        ("policy", "stale_after", "inf"),
        ("policy", "settle_ticks", "0"),
        ("policy", "settle_ticks", "1001"),
        ("policy", "backoff_max", "1"),
        ("policy", "backoff_max", "100001"),
        ("policy", "max_step", "0"),
        ("policy", "max_step", '"0M"'),
    ],
    ids=str,
)
def test_out_of_range(tmp_path: Path, table: str, key: str, value: str) -> None:
    head = "[libvirt]\nuri = 'x'\n" if table == "libvirt" else f"[{table}]\n"
    message = error(tmp_path, f"{head}{key} = {value}\n")
    assert f"{table}.{key}:" in message
    assert "must be" in message


@pytest.mark.parametrize(
    "knobs",
    [
        "host_critical = 25",  # above the default host_low 20
        "host_low = 4",  # below the default host_critical 5
        "host_low = 35",  # above the default host_high 30
        "host_high = 15",
        "host_critical = 10\nhost_low = 9\nhost_high = 50",
    ],
)
def test_host_thresholds_must_be_ordered(tmp_path: Path, knobs: str) -> None:
    message = error(tmp_path, f"[policy]\n{knobs}\n")
    assert ": policy:" in message
    assert "host_critical" in message
    assert "host_low" in message
    assert "must hold" in message


def test_host_thresholds_may_be_equal(tmp_path: Path) -> None:
    policy = load_text(tmp_path, "[policy]\nhost_critical = 20\nhost_low = 20\nhost_high = 20\n")
    assert (policy.policy.host_critical, policy.policy.host_low, policy.policy.host_high) == (
        20.0,
        20.0,
        20.0,
    )


@pytest.mark.parametrize(
    "metrics",
    ["9712", ":9712", "localhost:", "localhost:http", "localhost:0", "localhost:65536", ""],
)
def test_metrics_not_host_port(tmp_path: Path, metrics: str) -> None:
    message = error(tmp_path, f'[daemon]\nmetrics = "{metrics}"\n')
    assert "daemon.metrics:" in message
    if metrics:
        assert "HOST:PORT" in message


@pytest.mark.parametrize(
    "text",
    [
        "[libvirt]\n",
        "[libvirt]\ninclude = ['*']\n",
        "[libvirt]\n[[libvirt.domain]]\nname = 'a'\n",
    ],
    ids=["empty", "include-only", "domains-only"],
)
def test_libvirt_without_uri(tmp_path: Path, text: str) -> None:
    message = error(tmp_path, text)
    assert "libvirt.uri: required" in message


def test_duplicate_libvirt_domain(tmp_path: Path) -> None:
    text = """
[libvirt]
uri = "qemu:///system"
[[libvirt.domain]]
name = "a"
[[libvirt.domain]]
name = "b"
[[libvirt.domain]]
name = "a"
min = "1G"
"""
    message = error(tmp_path, text)
    assert "libvirt.domain[2].name" in message
    assert "'a' is used twice" in message


def test_error_is_raised_before_anything_is_applied(tmp_path: Path) -> None:
    """A corrupt table fails the whole load, whatever else the file holds."""
    message = error(tmp_path, FULL + "x = 1\n")
    # The stray key lands in the last table ([policy]) in TOML.
    assert "policy.x: unknown key" in message


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_numbers(tmp_path: Path, value: str) -> None:
    message = error(tmp_path, f"[policy]\nguest_headroom = {value}\n")
    assert "policy.guest_headroom: must be a number from 0 to 90" in message
    assert not math.isfinite(float(value))


def test_stale_after_shorter_than_two_stats_periods_is_refused(tmp_path: Path) -> None:
    """Every reading would be stale: the daemon would hold every VM for good."""
    message = error(tmp_path, "[daemon]\ninterval = 10\n[policy]\nstale_after = 15\n")
    assert "policy.stale_after: 15 s is less than twice the stats period (10 s" in message
    ok = load_text(tmp_path, "[daemon]\ninterval = 10\n[policy]\nstale_after = 20\n")
    assert ok.policy.stale_after == 20.0


def test_guest_low_above_guest_headroom_is_refused(tmp_path: Path) -> None:
    message = error(tmp_path, "[policy]\nguest_low = 30\nguest_headroom = 25\n")
    assert "policy.guest_low: 30 is more than guest_headroom (25)" in message
    assert load_text(tmp_path, "[policy]\nguest_low = 25\nguest_headroom = 25\n").policy


def test_two_vm_entries_for_one_socket_spelled_differently_are_refused(tmp_path: Path) -> None:
    sock = tmp_path / "vm.sock"
    sock.touch()
    text = (
        f'[[vm]]\nname = "a"\nqmp = "{sock}"\n'
        f'[[vm]]\nname = "b"\nqmp = "unix:{tmp_path}/./vm.sock"\n'
    )
    assert "vm[1].qmp: the same VM as 'a'" in error(tmp_path, text)


def test_metrics_port_with_a_superscript_digit_is_a_config_error(tmp_path: Path) -> None:
    """``port.isdigit()`` accepts "²" and ``int("²")`` then raised ValueError: every command
    that loads the file (daemon, status, list ...) died with a traceback and exit 1."""
    cfg = tmp_path / "c.toml"
    cfg.write_text('[daemon]\nmetrics = "127.0.0.1:\u00b2"\n[[vm]]\nqmp = "/nonexistent.sock"\n')
    with pytest.raises(ConfigError):
        load(str(cfg))
    result = run_cli("daemon", "--config", str(cfg), "--once", "--dry-run")
    assert result.returncode == 2
    assert "metrics" in one_line_error(result.stderr)


def test_vm_socket_path_with_a_nul_byte_is_a_config_error(tmp_path: Path) -> None:
    """A NUL in ``[[vm]] qmp`` was accepted: the daemon's collection task then raised
    ValueError, which nothing logged (the VM silently never answered), and ``list``
    died with a traceback."""
    cfg = tmp_path / "c.toml"
    cfg.write_text('[[vm]]\nname = "a"\nqmp = "/tmp/a\\u0000b.sock"\n')
    with pytest.raises(ConfigError):
        load(str(cfg))


def test_two_vm_entries_on_one_socket_are_refused(tmp_path: Path) -> None:
    """Two ``[[vm]]`` naming the same QMP socket were managed as two VMs with two floors:
    the entry with the lower floor shrank the VM below the other entry's floor, the other
    raised it back, tick after tick (and the policy took the fight for deflate-on-OOM).
    Reproduced against a simulated VM: with floors 950M and 700M on one socket the VM was
    driven to 700 MiB again and again. ``Config.find`` already compares sockets as files;
    the loader must refuse a second entry for the same VM (or the daemon must merge them)."""
    sock = tmp_path / "vm.sock"
    sock.touch()
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'[[vm]]\nname = "a"\nqmp = "{sock}"\nmin = "950M"\n'
        f'[[vm]]\nname = "b"\nqmp = "unix:{tmp_path}/./vm.sock"\nmin = "700M"\n'
    )
    with pytest.raises(ConfigError):
        load(str(cfg))


# --------------------------------------------------------------------------------------------
# [[libvirt]]: several libvirt URIs, one daemon
# --------------------------------------------------------------------------------------------

TWO_HOSTS = """\
[[libvirt]]
uri = "qemu:///system"
min = "1G"
[[libvirt.domain]]
name = "db-1"
min = "2G"

[[libvirt]]
uri = "qemu+tcp://10.0.0.2/system"
include = ["web-*"]
exclude = ["web-test*"]
shares = 500
[[libvirt.domain]]
name = "db-1"
shares = 4000
"""


def test_the_table_form_is_one_entry(tmp_path: Path) -> None:
    """``[libvirt]`` parses as it always did: one entry, also seen as ``libvirt``."""
    config = load_text(tmp_path, "[libvirt]\nuri = 'qemu:///system'\nmin = '1G'\n")
    assert config.libvirts == (LibvirtConfig("qemu:///system", min=GiB),)
    assert config.libvirt == config.libvirts[0]
    assert not config.manages_nothing


def test_the_list_form_is_one_entry_per_table(tmp_path: Path) -> None:
    """``[[libvirt]]``: each table its own URI, globs, floors and ``[[libvirt.domain]]``s
    (a ``[[libvirt.domain]]`` belongs to the ``[[libvirt]]`` above it, as TOML nests it)."""
    config = load_text(tmp_path, TWO_HOSTS)
    assert config.libvirts == (
        LibvirtConfig("qemu:///system", min=GiB, domains=(DomainConfig("db-1", 2 * GiB),)),
        LibvirtConfig(
            "qemu+tcp://10.0.0.2/system",
            include=("web-*",),
            exclude=("web-test*",),
            shares=500,
            domains=(DomainConfig("db-1", 0, 4000),),
        ),
    )
    assert config.libvirt == config.libvirts[0]
    assert not config.manages_nothing


def test_one_list_entry_is_the_table_form(tmp_path: Path) -> None:
    """One ``[[libvirt]]`` is the same configuration as one ``[libvirt]``."""
    table = load_text(tmp_path, "[libvirt]\nuri = 'qemu:///system'\ninclude = ['a*']\n")
    listed = load_text(tmp_path, "[[libvirt]]\nuri = 'qemu:///system'\ninclude = ['a*']\n")
    assert table.libvirts == listed.libvirts


def test_no_libvirt_is_no_entry(tmp_path: Path) -> None:
    config = load_text(tmp_path, "[[vm]]\nqmp = '/run/a.sock'\n")
    assert config.libvirts == ()
    assert config.libvirt is None


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (
            "[[libvirt]]\nuri = 'qemu:///system'\n[[libvirt]]\nuri = 'qemu:///system'\n",
            "libvirt[1].uri: 'qemu:///system' is libvirt[0]'s too (one entry per URI)",
        ),
        (
            "[[libvirt]]\nuri = 'a'\n[[libvirt]]\nuri = 'b'\n[[libvirt]]\nuri = 'a'\n",
            "libvirt[2].uri: 'a' is libvirt[0]'s too",
        ),
        ("[[libvirt]]\nuri = 'a'\n[[libvirt]]\ninclude = ['x']\n", "libvirt[1].uri: required"),
        ("[[libvirt]]\nuri = 'a'\n[[libvirt]]\nuri = 'b'\nurl = 'c'\n", "libvirt[1].url: unknown"),
        ("[[libvirt]]\nuri = 'a'\nmin = 'lots'\n", "libvirt[0].min:"),
        (
            "[[libvirt]]\nuri = 'a'\n[[libvirt]]\nuri = 'b'\n[[libvirt.domain]]\nname = 7\n",
            "libvirt[1].domain[0].name:",
        ),
        (
            "[[libvirt]]\nuri = 'a'\n[[libvirt.domain]]\nname = 'x'\n"
            "[[libvirt.domain]]\nname = 'x'\n",
            "libvirt[0].domain[1].name: 'x' is used twice",
        ),
        ("libvirt = []\n", "libvirt: must be a table ([libvirt]) or an array of tables"),
        ("libvirt = ['qemu:///system']\n", "libvirt[0]: must be a table"),
        ("libvirt = [{uri = 'a'}, 5]\n", "libvirt[1]: must be a table"),
    ],
    ids=[
        "same-uri",
        "same-uri-later",
        "no-uri",
        "unknown-key",
        "bad-min",
        "bad-domain",
        "domain-twice",
        "empty-array",
        "array-of-strings",
        "array-with-a-number",
    ],
)
def test_list_form_errors(tmp_path: Path, text: str, key: str) -> None:
    """Each refused in one line naming the file and the entry by its index."""
    assert key in error(tmp_path, text)


def test_list_form_error_is_one_line_from_the_cli(tmp_path: Path) -> None:
    """Two entries of one URI stop ``balloonctl daemon`` with exit 2 and one line."""
    path = write(
        tmp_path, "[[libvirt]]\nuri = 'test:///default'\n[[libvirt]]\nuri = 'test:///default'\n"
    )
    result = run_cli("--config", path, "daemon", "--once", "--dry-run")
    assert result.returncode == 2, result.stderr
    assert "libvirt[1].uri" in one_line_error(result.stderr)


def test_member_names_first_uri_bare_the_others_qualified(tmp_path: Path) -> None:
    """The naming rule: the first entry's domains keep their bare names (a ``[libvirt]``
    file names its VMs as before), every other entry's are ``URI/domain``, whatever runs
    where; so a name on two hosts is two VMs, two state files and two metric labels. A
    ``[[vm]]`` keeps its name and a domain named like it is left out, as before."""
    config = load_text(tmp_path, TWO_HOSTS + "[[vm]]\nname = 'db-9'\nqmp = '/run/db-9.sock'\n")
    remote = "qemu+tcp://10.0.0.2/system"
    assert member_name(config, "qemu:///system", "db-1") == "db-1"
    assert member_name(config, remote, "db-1") == f"{remote}/db-1"
    found = members(
        config,
        {
            "qemu:///system": ["db-1", "web-1", "db-9"],
            remote: ["db-1", "web-1", "web-test1", "other"],
        },
    )
    assert found == [
        Member("db-9", 0, DEFAULT_SHARES, "/run/db-9.sock"),
        Member("db-1", 2 * GiB, DEFAULT_SHARES, "db-1", "qemu:///system"),
        Member("web-1", GiB, DEFAULT_SHARES, "web-1", "qemu:///system"),
        Member(f"{remote}/web-1", 0, 500, "web-1", remote),
    ]
    # db-1 is not in the remote entry's include: its [[libvirt.domain]] gives shares only
    # to a domain that is managed. With a wider include it is managed under its long name.
    assert len({m.name for m in found}) == len(found)
    store = StateStore(str(tmp_path / "state"))
    paths = {store._path(m.name) for m in found}  # the state file each name keys
    assert len(paths) == len(found)
    # The names depend on the configuration only: the second host's web-1 keeps its long
    # name when the first host has no web-1 running.
    alone = members(config, {remote: ["web-1"]})
    assert [m.name for m in alone] == ["db-9", f"{remote}/web-1"]
