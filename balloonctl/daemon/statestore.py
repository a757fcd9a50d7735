"""The daemon's state directory: what the policy remembers about each VM, across restarts.

A restart must not forget that a guest could not reach its last target: it would be pushed
again at once. So a VM's back-off (its failures and the tick it may shrink again) is kept,
in one small JSON file per VM written only when the back-off changes, plus ``daemon.json``
with the tick counter (the policy counts in ticks). The target in flight is not kept: it
changes on nearly every move (1000 VMs would be hundreds of file writes a tick, measured),
and after a restart, or after the VM itself restarted behind the same name, an old target
would only make the policy wait for a move that is not coming.

Every write is a new file renamed over the old one, so a crash mid-write leaves
the previous state; a file that does not parse is reported and ignored (the VM starts with
no memory, which is only more cautious), never fatal.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from typing import Any, Final
from urllib.parse import quote

from balloonctl.daemon.policy import VmMemory

log = logging.getLogger(__name__)

_DAEMON_FILE: Final = "daemon.json"
_SUFFIX: Final = ".vm.json"
#: The part of VmMemory that is kept (see the module docstring).
_FIELDS: Final = ("failures", "hold_until")
#: Longest file name stem: NAME_MAX is 255 bytes, less the suffix, with room to spare.
_MAX_STEM: Final = 200


#: What of a VmMemory is kept: (failures, hold_until). A tuple, not a VmMemory: save() runs
#: for every move, hundreds a tick with 1000 VMs, and builds and compares one each time.
Durable = tuple[int, int]
#: What an empty VmMemory keeps (no file needed).
_NOTHING: Final[Durable] = (0, 0)


def _durable(memory: VmMemory) -> Durable:
    """What of ``memory`` is kept across restarts."""
    return (memory.failures, memory.hold_until)


def default_dir() -> str:
    """``$STATE_DIRECTORY`` (systemd's StateDirectory=), else the XDG state directory."""
    systemd = os.environ.get("STATE_DIRECTORY")
    if systemd:
        return systemd.split(":")[0]
    xdg = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    return os.path.join(xdg, "balloonctl")


class StateStore:
    """Per-VM :class:`VmMemory` and the tick counter under one directory (0700)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        #: What each VM's file holds; None when it was rejected (the next save rewrites it).
        self._written: dict[str, Durable | None] = {}
        self._broken = False

    def open(self) -> None:
        """Create the directory if need be (mode 0700: it names the VMs)."""
        os.makedirs(self.directory, mode=0o700, exist_ok=True)

    def _path(self, vm: str) -> str:
        # quote(): any VM name becomes one safe file name ("a/b" -> "a%2Fb", ".." -> "..").
        name = quote(vm, safe="")
        if name in (".", ".."):
            name = name.replace(".", "%2E")
        if len(name) > _MAX_STEM:
            # Quoting triples every byte: 40 CJK characters already pass NAME_MAX (255).
            # Keep a readable head and tell names apart by a digest; "%~" never occurs in
            # quote()'s output, so a shortened name cannot collide with a quoted one.
            digest = hashlib.sha256(vm.encode("utf-8", "surrogatepass")).hexdigest()
            name = name[: _MAX_STEM - len(digest) - 2] + "%~" + digest
        return os.path.join(self.directory, name + _SUFFIX)

    def load_tick(self) -> int:
        """The last tick a previous run reached (0 if none)."""
        data = self._read(os.path.join(self.directory, _DAEMON_FILE))
        tick = data.get("tick") if data else None
        return tick if isinstance(tick, int) and not isinstance(tick, bool) and tick >= 0 else 0

    def save_tick(self, tick: int) -> None:
        """Remember the tick counter."""
        self._write(os.path.join(self.directory, _DAEMON_FILE), {"tick": tick})

    def load(self, vm: str) -> VmMemory:
        """What was remembered about ``vm``; an empty memory if nothing (usable) was."""
        path = self._path(vm)
        data = self._read(path)
        if data is None:
            if os.path.lexists(path):
                self._written[vm] = None  # unreadable: rewrite it at the next save
            return VmMemory()
        values: dict[str, Any] = {}
        for name in _FIELDS:
            if name not in data:
                continue
            value = data[name]
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                log.warning("state of %s: ignoring %s=%r", vm, name, value)
                self._written[vm] = None
                return VmMemory()
            values[name] = value
        memory = VmMemory(**values)
        self._written[vm] = _durable(memory)
        return memory

    def save(self, vm: str, memory: VmMemory) -> None:
        """Write ``vm``'s back-off if it changed since it was last written or read."""
        durable = _durable(memory)
        if self._written.get(vm, _NOTHING) == durable:
            return
        failures, hold_until = durable
        data = {"vm": vm, "failures": failures, "hold_until": hold_until}
        if self._write(self._path(vm), data):
            self._written[vm] = durable

    def _read(self, path: str) -> dict[str, Any] | None:
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("ignoring state file %s: %s", path, exc)
            return None
        if not isinstance(data, dict):
            log.warning("ignoring state file %s: not a JSON object", path)
            return None
        return data

    def _write(self, path: str, data: dict[str, Any]) -> bool:
        try:
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    json.dump(data, fh)
                os.replace(tmp, path)
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError as exc:
            if not self._broken:  # one line, not one per VM per tick
                log.warning("cannot write state to %s: %s", self.directory, exc.strerror or exc)
                self._broken = True
            return False
        self._broken = False
        return True
