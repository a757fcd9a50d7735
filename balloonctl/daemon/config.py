"""The configuration file: TOML in, frozen dataclasses out, every default in one place.

Where it is: ``--config FILE``, else ``$BALLOONCTL_CONFIG``, else
``$XDG_CONFIG_HOME/balloonctl/config.toml`` (``~/.config/...``), else
``/etc/balloonctl/config.toml``; no file is an empty configuration. Every error names the
file and the key (``ConfigError``, exit 2): a corrupt config must never be half-applied.

It holds the VMs balloonctl manages (``[[vm]]``: ``list`` shows them, ``set`` keeps their
floor, the daemon balances them) and the auto-balloon daemon's tables: ``[daemon]`` (tick,
state directory, metrics endpoint), ``[host]`` (where host memory is read), ``[libvirt]``
(domains to manage, with include/exclude globs and per-domain floors; or ``[[libvirt]]``, one
such table per libvirt URI, for a daemon managing the domains of several hosts) and
``[policy]`` (the knobs of :mod:`balloonctl.daemon.policy`). Every default is on the
dataclasses below or on :class:`~balloonctl.daemon.policy.PolicyConfig`, nowhere else;
``contrib/systemd/autoballoon.toml`` shows them all. The ``[policy]`` knobs' dataclass
lives with the pure policy that reads them, so the policy imports no file I/O; this module
only builds it.
"""

from __future__ import annotations

import math
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Final

from balloonctl.backends.address import parse_address
from balloonctl.daemon.policy import PolicyConfig
from balloonctl.errors import ConfigError, UsageError
from balloonctl.units import parse_size

DEFAULT_SHARES: Final = 1000


@dataclass(frozen=True, slots=True)
class VmConfig:
    """One ``[[vm]]`` entry."""

    name: str
    qmp: str
    #: Floor: balloonctl never asks for less guest memory than this (bytes).
    min: int = 0
    shares: int = DEFAULT_SHARES


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """``[daemon]``: how ``balloonctl daemon`` runs."""

    #: Seconds between ticks (collect, decide, act); the guests' stats period follows it.
    interval: float = 5.0
    #: Per-VM state kept across restarts; None: ``$STATE_DIRECTORY`` (systemd's
    #: StateDirectory=), else ``$XDG_STATE_HOME/balloonctl``, else ``~/.local/state/balloonctl``.
    state_dir: str | None = None
    #: ``HOST:PORT`` of the Prometheus endpoint; None (the default) serves none.
    metrics: str | None = None
    #: Seconds to connect to one VM, and for one command.
    connect_timeout: float = 5.0
    command_timeout: float = 10.0
    #: On stop, give every VM the daemon shrank its RAM back. Off by default: a restart or
    #: an upgrade of the daemon would then inflate the whole fleet's guests at once and take
    #: that memory from a host that may be short of it (the reason they were shrunk), which
    #: can push it into the OOM killer; a daemon that starts again picks up where it was.
    restore: bool = False
    #: With ``restore``: at most this many bytes handed back per second, all VMs together
    #: (a VM far below its RAM gets it back in steps).
    restore_rate: int = 1 << 30
    #: With ``restore``: seconds the restore may take; what is left then stays shrunk (and
    #: is logged). Below the unit's TimeoutStopSec (30 s), or systemd kills the daemon first.
    restore_timeout: float = 20.0


@dataclass(frozen=True, slots=True)
class HostConfig:
    """``[host]``: where the host's memory state is read (tests point these at files)."""

    meminfo: str = "/proc/meminfo"
    #: Pressure stall information; a missing file means no PSI (older kernels).
    psi: str = "/proc/pressure/memory"


@dataclass(frozen=True, slots=True)
class DomainConfig:
    """``[[libvirt.domain]]``: floor and shares of one libvirt domain."""

    name: str
    min: int = 0
    shares: int = DEFAULT_SHARES


@dataclass(frozen=True, slots=True)
class LibvirtConfig:
    """``[libvirt]``, or one ``[[libvirt]]`` entry: manage every running domain with a balloon
    on ``uri``."""

    uri: str
    #: fnmatch globs on domain names: a domain is managed when it matches an include and
    #: no exclude.
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    #: Floor and shares of domains without a ``[[libvirt.domain]]`` entry.
    min: int = 0
    shares: int = DEFAULT_SHARES
    domains: tuple[DomainConfig, ...] = ()

    def domain(self, name: str) -> DomainConfig:
        """The floor and shares of domain ``name``."""
        for entry in self.domains:
            if entry.name == name:
                return entry
        return DomainConfig(name, self.min, self.shares)


@dataclass(frozen=True, slots=True)
class Config:
    """A whole file."""

    path: str | None
    vms: tuple[VmConfig, ...] = ()
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    host: HostConfig = field(default_factory=HostConfig)
    #: The libvirt URIs to manage, in the file's order: ``[libvirt]`` is one entry,
    #: ``[[libvirt]]`` one per table; the URIs are distinct. The first entry's domains keep
    #: their bare names, the others' are named ``URI/domain`` (see :func:`member_name`).
    libvirts: tuple[LibvirtConfig, ...] = ()
    policy: PolicyConfig = field(default_factory=PolicyConfig)

    @property
    def libvirt(self) -> LibvirtConfig | None:
        """The first libvirt entry (the only one of a ``[libvirt]`` table), or None.

        For callers that take one URI; the daemon reads :attr:`libvirts`."""
        return self.libvirts[0] if self.libvirts else None

    @property
    def manages_nothing(self) -> bool:
        """No ``[[vm]]`` and no ``[libvirt]``: a daemon would have nothing to manage."""
        return not self.vms and not self.libvirts

    def find(self, vm: str) -> VmConfig | None:
        """The entry a VM name (entry name, socket path or ``unix:`` address) refers to.

        Paths are compared as files (device and inode, else the resolved path), so a floor
        cannot be dodged by spelling the socket ``./a.sock``, ``//tmp/a.sock`` or via a link.
        """
        for entry in self.vms:
            if vm == entry.name:
                return entry
        key = _file_key(vm.removeprefix("unix:"))
        for entry in self.vms:
            if key == _file_key(entry.qmp):
                return entry
        return None

    def address(self, vm: str) -> str:
        """What to connect to for ``vm``: a configured entry's socket, else ``vm`` itself."""
        for entry in self.vms:
            if vm == entry.name:
                return entry.qmp
        return vm


def member_name(config: Config, uri: str, domain: str) -> str:
    """The name the daemon gives libvirt domain ``domain`` of ``uri``: in its log, its state
    file and its metrics' ``vm`` label.

    The first libvirt entry's domains keep their bare names, so a ``[libvirt]`` table names
    them as it always did and adding a second host renames nothing on the first; every
    other entry's are ``URI/domain``. Fixed by the configuration alone, never by which
    domains happen to run: a name that changed when another host started a domain of the
    same name would hand one VM's remembered target to another. libvirt refuses a ``/`` in
    a domain name, so ``URI/domain`` is never a bare domain name of the first entry.
    """
    first = config.libvirts[0].uri if config.libvirts else None
    return domain if uri == first else f"{uri}/{domain}"


def _file_key(path: str) -> tuple[int, int] | str:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return os.path.realpath(path) if path and not path.startswith("tcp:") else path
    return (st.st_dev, st.st_ino)


def default_path() -> str | None:
    """The file balloonctl reads when no ``--config`` is given, if it exists."""
    env = os.environ.get("BALLOONCTL_CONFIG")
    if env:
        return env
    xdg = os.environ.get("XDG_CONFIG_HOME") or os.path.join(Path.home(), ".config")
    for candidate in (
        os.path.join(xdg, "balloonctl", "config.toml"),
        "/etc/balloonctl/config.toml",
    ):
        if os.path.isfile(candidate):
            return candidate
    return None


def read_toml(path: str) -> dict[str, Any]:
    """A TOML file's tables, or a one-line :class:`ConfigError` naming the file: the one
    reader of balloonctl's TOML files (this configuration and the CLI's host inventory)."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such file") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from exc
    except ValueError as exc:
        # tomllib turns an integer literal of over 4300 digits into a plain ValueError
        # (Python's int_max_str_digits limit), not a TOMLDecodeError.
        raise ConfigError(f"{path}: not valid TOML: a number too long to read") from exc


def load(path: str | None) -> Config:
    """Read ``path`` (None: :func:`default_path`, and no file there is an empty config)."""
    explicit = path is not None
    path = path if explicit else default_path()
    if path is None:
        return Config(None)
    try:
        data = read_toml(path)
    except ConfigError as exc:
        # default_path() saw the file a moment ago; gone since, it is no file at all.
        missing = isinstance(exc.__cause__, FileNotFoundError)
        if missing and not explicit and "BALLOONCTL_CONFIG" not in os.environ:
            return Config(None)
        raise
    return _parse(path, data)


_TABLES: Final = ("vm", "daemon", "host", "libvirt", "policy")


def _parse(path: str, data: dict[str, Any]) -> Config:
    for key in data:
        if key not in _TABLES:
            raise ConfigError(f"{path}: {key}: unknown table (known: {', '.join(_TABLES)})")
    vms = _vms(path, data)
    daemon = _daemon(path, _table(path, data, "daemon"))
    policy = _policy(path, _table(path, data, "policy"))
    period = math.ceil(daemon.interval)
    if policy.stale_after < 2 * period:
        # Stats come every ceil(interval) seconds and are read up to a tick later: a
        # shorter stale_after would call every reading stale and hold every VM for good.
        raise ConfigError(
            f"{path}: policy.stale_after: {policy.stale_after:g} s is less than twice the "
            f"stats period ({period} s, from daemon.interval); every reading would be stale"
        )
    return Config(
        path,
        vms,
        daemon=daemon,
        host=_host(path, _table(path, data, "host")),
        libvirts=_libvirts(path, data),
        policy=policy,
    )


def _vms(path: str, data: dict[str, Any]) -> tuple[VmConfig, ...]:
    entries = data.get("vm", [])
    if not isinstance(entries, list):
        raise ConfigError(f"{path}: 'vm' must be an array of tables ([[vm]])")
    vms: list[VmConfig] = []
    names: set[str] = set()
    sockets: dict[tuple[int, int] | str, str] = {}
    for i, entry in enumerate(entries):
        where = f"{path}: vm[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: must be a table")
        vms.append(_vm(where, entry))
        if vms[-1].name in names:
            raise ConfigError(f"{where}.name: {vms[-1].name!r} is used twice")
        names.add(vms[-1].name)
        # One VM, one entry: two floors for one socket would let the lower one win (the
        # daemon would shrink it under the other). Compared as files, like Config.find.
        key = _file_key(vms[-1].qmp)
        if key in sockets:
            raise ConfigError(f"{where}.qmp: the same VM as {sockets[key]!r} (one entry per VM)")
        sockets[key] = vms[-1].name
    return tuple(vms)


def _vm(where: str, entry: dict[str, Any]) -> VmConfig:
    known = {"name", "qmp", "min", "shares"}
    for key in entry:
        if key not in known:
            raise ConfigError(f"{where}.{key}: unknown key (known: {', '.join(sorted(known))})")
    qmp = entry.get("qmp")
    if not isinstance(qmp, str) or not qmp or "\0" in qmp:
        raise ConfigError(f"{where}.qmp: required, a QMP socket path or unix:/tcp: address")
    if qmp.startswith(("unix:", "tcp:")):
        try:
            parse_address(qmp)
        except UsageError as exc:
            raise ConfigError(f"{where}.qmp: {exc}") from exc
    name = entry.get("name", Path(qmp.removeprefix("unix:")).stem)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}.name: must be a non-empty string")
    return VmConfig(
        name=name,
        qmp=qmp.removeprefix("unix:"),
        min=_size(f"{where}.min", entry.get("min", 0)),
        shares=_shares(f"{where}.shares", entry.get("shares", DEFAULT_SHARES)),
    )


# --- the daemon's tables ---------------------------------------------------------------------


def _table(path: str, data: dict[str, Any], name: str) -> dict[str, Any]:
    table = data.get(name, {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: {name}: must be a table ([{name}])")
    return table


def _known(where: str, table: dict[str, Any], known: set[str]) -> None:
    for key in table:
        if key not in known:
            raise ConfigError(f"{where}.{key}: unknown key (known: {', '.join(sorted(known))})")


def _size(where: str, value: object) -> int:
    if isinstance(value, str):
        try:
            value = parse_size(value)
        except UsageError as exc:
            raise ConfigError(f"{where}: {exc}") from exc
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f'{where}: must be a size such as "1G" or a byte count')
    return value


def _shares(where: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= 1 << 20:
        raise ConfigError(f"{where}: must be a positive integer (at most 1048576)")
    return value


def _number(where: str, value: object, low: float, high: float) -> float:
    """A finite number in [low, high] (TOML ints are accepted)."""
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or not low <= value <= high
    ):
        raise ConfigError(f"{where}: must be a number from {low:g} to {high:g}")
    return float(value)


def _string(where: str, value: object) -> str:
    if not isinstance(value, str) or not value or "\0" in value:
        raise ConfigError(f"{where}: must be a non-empty string")
    return value


def _globs(where: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f'{where}: must be a list of glob patterns such as ["web-*"]')
    return tuple(value)


def _daemon(path: str, table: dict[str, Any]) -> DaemonConfig:
    where = f"{path}: daemon"
    _known(where, table, {f.name for f in fields(DaemonConfig)})
    base = DaemonConfig()
    metrics = table.get("metrics")
    if metrics is not None:
        metrics = _string(f"{where}.metrics", metrics)
        host, sep, port = metrics.rpartition(":")
        if (
            not sep
            or not host
            or not (port.isascii() and port.isdigit())
            or not 0 < int(port) < 65536
        ):
            raise ConfigError(f'{where}.metrics: must be HOST:PORT such as "127.0.0.1:9712"')
    state_dir = table.get("state_dir")
    return DaemonConfig(
        interval=_number(f"{where}.interval", table.get("interval", base.interval), 0.1, 3600),
        state_dir=None if state_dir is None else _string(f"{where}.state_dir", state_dir),
        metrics=metrics,
        connect_timeout=_number(
            f"{where}.connect_timeout", table.get("connect_timeout", base.connect_timeout), 0.1, 600
        ),
        command_timeout=_number(
            f"{where}.command_timeout", table.get("command_timeout", base.command_timeout), 0.1, 600
        ),
        restore=_bool(f"{where}.restore", table.get("restore", base.restore)),
        restore_rate=_rate(f"{where}.restore_rate", table.get("restore_rate", base.restore_rate)),
        restore_timeout=_number(
            f"{where}.restore_timeout", table.get("restore_timeout", base.restore_timeout), 1, 3600
        ),
    )


def _bool(where: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: must be true or false")
    return value


def _rate(where: str, value: object) -> int:
    """Bytes a second: a size, at least one MiB (anything slower would restore nothing)."""
    size = _size(where, value)
    if size < 1 << 20:
        raise ConfigError(f'{where}: must be at least 1M (bytes a second, such as "1G")')
    return size


def _host(path: str, table: dict[str, Any]) -> HostConfig:
    where = f"{path}: host"
    _known(where, table, {f.name for f in fields(HostConfig)})
    base = HostConfig()
    return HostConfig(
        meminfo=_string(f"{where}.meminfo", table.get("meminfo", base.meminfo)),
        psi=_string(f"{where}.psi", table.get("psi", base.psi)),
    )


def _libvirts(path: str, data: dict[str, Any]) -> tuple[LibvirtConfig, ...]:
    """``[libvirt]`` (one table: one entry) or ``[[libvirt]]`` (an array of tables: one
    entry each); TOML itself tells the two apart. Two entries of one URI are refused: two
    sets of globs and floors for the same domains would fight over them."""
    if "libvirt" not in data:
        return ()
    value = data["libvirt"]
    if isinstance(value, dict):
        return (_libvirt(f"{path}: libvirt", value),)
    if not isinstance(value, list) or not value:
        raise ConfigError(
            f"{path}: libvirt: must be a table ([libvirt]) or an array of tables ([[libvirt]])"
        )
    entries: list[LibvirtConfig] = []
    for i, table in enumerate(value):
        where = f"{path}: libvirt[{i}]"
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: must be a table")
        entry = _libvirt(where, table)
        for j, other in enumerate(entries):
            if other.uri == entry.uri:
                raise ConfigError(
                    f"{where}.uri: {entry.uri!r} is libvirt[{j}]'s too (one entry per URI)"
                )
        entries.append(entry)
    return tuple(entries)


def _libvirt(where: str, table: dict[str, Any]) -> LibvirtConfig:
    _known(where, table, {"uri", "include", "exclude", "min", "shares", "domain"})
    if "uri" not in table:
        raise ConfigError(f'{where}.uri: required, a libvirt URI such as "qemu:///system"')
    uri = _string(f"{where}.uri", table["uri"])
    entries = table.get("domain", [])
    if not isinstance(entries, list):
        raise ConfigError(f"{where}.domain: must be an array of tables ([[libvirt.domain]])")
    domains: list[DomainConfig] = []
    for i, entry in enumerate(entries):
        at = f"{where}.domain[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{at}: must be a table")
        _known(at, entry, {"name", "min", "shares"})
        name = _string(f"{at}.name", entry.get("name"))
        if any(d.name == name for d in domains):
            raise ConfigError(f"{at}.name: {name!r} is used twice")
        domains.append(
            DomainConfig(
                name,
                _size(f"{at}.min", entry.get("min", 0)),
                _shares(f"{at}.shares", entry.get("shares", DEFAULT_SHARES)),
            )
        )
    return LibvirtConfig(
        uri=uri,
        include=_globs(f"{where}.include", table.get("include", ["*"])),
        exclude=_globs(f"{where}.exclude", table.get("exclude", [])),
        min=_size(f"{where}.min", table.get("min", 0)),
        shares=_shares(f"{where}.shares", table.get("shares", DEFAULT_SHARES)),
        domains=tuple(domains),
    )


#: [policy] keys that are sizes; the rest are numbers, with their ranges here.
_POLICY_SIZES: Final = ("max_step", "deadband")
_POLICY_RANGES: Final[dict[str, tuple[float, float]]] = {
    "host_low": (0, 100),
    "host_critical": (0, 100),
    "host_high": (0, 100),
    "psi_some_avg10": (0, 100),
    "guest_headroom": (0, 90),
    "guest_low": (0, 90),
    "no_deflate_on_oom_headroom": (0, 50),
    "max_step_percent": (0.01, 100),
    "deadband_percent": (0, 50),
    "stale_after": (0.1, 86400),
    "settle_ticks": (1, 1000),
    "backoff_max": (2, 100000),
}


def _policy(path: str, table: dict[str, Any]) -> PolicyConfig:
    where = f"{path}: policy"
    _known(where, table, {f.name for f in fields(PolicyConfig)})
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key in _POLICY_SIZES:
            values[key] = _size(f"{where}.{key}", value)
        elif key in ("settle_ticks", "backoff_max"):
            low, high = _POLICY_RANGES[key]
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise ConfigError(f"{where}.{key}: must be an integer from {low:g} to {high:g}")
            values[key] = value
        else:
            low, high = _POLICY_RANGES[key]
            values[key] = _number(f"{where}.{key}", value, low, high)
    policy = PolicyConfig(**values)
    if not policy.host_critical <= policy.host_low <= policy.host_high:
        raise ConfigError(
            f"{where}: host_critical ({policy.host_critical:g}) <= host_low "
            f"({policy.host_low:g}) <= host_high ({policy.host_high:g}) must hold"
        )
    if policy.max_step <= 0:
        raise ConfigError(f"{where}.max_step: must be more than 0")
    if policy.guest_low > policy.guest_headroom:
        # A guest shrunk to its headroom would be under its own pressure line at once, and
        # give and grow back in turn.
        raise ConfigError(
            f"{where}.guest_low: {policy.guest_low:g} is more than guest_headroom "
            f"({policy.guest_headroom:g}); guests would be shrunk into their own pressure"
        )
    return policy
