"""The configuration file: TOML in, frozen dataclasses out, every default in one place.

Where it is: ``--config FILE``, else ``$BALLOONCTL_CONFIG``, else
``$XDG_CONFIG_HOME/balloonctl/config.toml`` (``~/.config/...``), else
``/etc/balloonctl/config.toml``; no file is an empty configuration. Every error names the
file and the key (``ConfigError``, exit 2): a corrupt config must never be half-applied.

Today it holds the VMs balloonctl manages (``[[vm]]``: ``list`` shows them, ``set`` keeps
their floor); the daemon's ``[host]``, ``[libvirt]`` and ``[policy]`` tables build on it.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from balloonctl.errors import UsageError
from balloonctl.units import parse_size

DEFAULT_SHARES: Final = 1000


class ConfigError(UsageError):
    """The configuration file cannot be used as written (exit 2)."""


@dataclass(frozen=True, slots=True)
class VmConfig:
    """One ``[[vm]]`` entry."""

    name: str
    qmp: str
    #: Floor: balloonctl never asks for less guest memory than this (bytes).
    min: int = 0
    shares: int = DEFAULT_SHARES


@dataclass(frozen=True, slots=True)
class Config:
    """A whole file."""

    path: str | None
    vms: tuple[VmConfig, ...] = ()

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


def load(path: str | None) -> Config:
    """Read ``path`` (None: :func:`default_path`, and no file there is an empty config)."""
    explicit = path is not None
    path = path if explicit else default_path()
    if path is None:
        return Config(None)
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError as exc:
        if not explicit and "BALLOONCTL_CONFIG" not in os.environ:
            return Config(None)
        raise ConfigError(f"{path}: no such file") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from exc
    return _parse(path, data)


def _parse(path: str, data: dict[str, Any]) -> Config:
    entries = data.get("vm", [])
    if not isinstance(entries, list):
        raise ConfigError(f"{path}: 'vm' must be an array of tables ([[vm]])")
    vms: list[VmConfig] = []
    names: set[str] = set()
    for i, entry in enumerate(entries):
        where = f"{path}: vm[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: must be a table")
        vms.append(_vm(where, entry))
        if vms[-1].name in names:
            raise ConfigError(f"{where}.name: {vms[-1].name!r} is used twice")
        names.add(vms[-1].name)
    return Config(path, tuple(vms))


def _vm(where: str, entry: dict[str, Any]) -> VmConfig:
    known = {"name", "qmp", "min", "shares"}
    for key in entry:
        if key not in known:
            raise ConfigError(f"{where}.{key}: unknown key (known: {', '.join(sorted(known))})")
    qmp = entry.get("qmp")
    if not isinstance(qmp, str) or not qmp:
        raise ConfigError(f"{where}.qmp: required, a QMP socket path or unix:/tcp: address")
    if qmp.startswith(("unix:", "tcp:")):
        from balloonctl.backends.address import parse_address  # noqa: PLC0415

        try:
            parse_address(qmp)
        except UsageError as exc:
            raise ConfigError(f"{where}.qmp: {exc}") from exc
    name = entry.get("name", Path(qmp.removeprefix("unix:")).stem)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}.name: must be a non-empty string")
    floor = entry.get("min", 0)
    if isinstance(floor, str):
        try:
            floor = parse_size(floor)
        except UsageError as exc:
            raise ConfigError(f"{where}.min: {exc}") from exc
    if not isinstance(floor, int) or isinstance(floor, bool) or floor < 0:
        raise ConfigError(f'{where}.min: must be a size such as "1G" or a byte count')
    shares = entry.get("shares", DEFAULT_SHARES)
    if not isinstance(shares, int) or isinstance(shares, bool) or shares <= 0:
        raise ConfigError(f"{where}.shares: must be a positive integer")
    return VmConfig(name=name, qmp=qmp.removeprefix("unix:"), min=floor, shares=shares)
