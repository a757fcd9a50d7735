"""A simulated host: a ``/proc/meminfo`` whose MemAvailable follows what its guests hold.

The daemon decides from the host's MemAvailable (``[host] meminfo``, docs/architecture.md).
On a real host, memory a guest gives back through its balloon is the host's again, and
memory a guest grows back into is gone from it. A fake host that ignored its guests would
tell the daemon that nothing it did helped, and the daemon would keep moving memory every
tick. ``balloonctl demo``, ``balloonctl bench daemon`` and the tests all need that feedback,
so the arithmetic lives here once:

    available = MemTotal - the host's own use - what the guests hold

clamped to ``[0, MemTotal]``, where a guest holds its current size (RAM less its balloon),
or all of its RAM until its size is known (a VM that has not answered yet has not given
anything).

The file is replaced atomically: the daemon reads it at any moment, and must never read
half of it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

#: What a path may be given as.
PathLike = str | os.PathLike[str]


def meminfo_text(total: int, available: int) -> str:
    """The lines of ``/proc/meminfo`` the daemon reads, in kB as proc(5) writes them.

    MemFree is half of MemAvailable: the daemon does not use it, but a real meminfo has it
    and MemFree <= MemAvailable holds on a real host.
    """
    free = available // 2
    return (
        f"MemTotal:       {total // 1024:>10} kB\n"
        f"MemFree:        {free // 1024:>10} kB\n"
        f"MemAvailable:   {available // 1024:>10} kB\n"
    )


def replace_file(path: PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename, so that a reader
    sees the old file or the new one, never a half-written one."""
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def write_meminfo(path: PathLike, total: int, available: int) -> None:
    """A meminfo with ``total`` and ``available`` bytes, replaced atomically."""
    replace_file(path, meminfo_text(total, available))


def _toml(text: str) -> str:
    """A TOML basic string (JSON's escapes are TOML's)."""
    return json.dumps(text)


def daemon_config(sockets: Sequence[tuple[str, str]], *, interval: float, directory: str) -> str:
    """The daemon's config for simulated VMs on a simulated host: one ``[[vm]]`` per
    (name, socket); the host's files and the daemon's state in ``directory``.

    The host's meminfo is ``directory/meminfo`` (what :class:`SimHost` writes there) and its
    PSI file ``directory/no-psi``, never created: a simulated host has no PSI, and the
    daemon then decides from MemAvailable alone.
    """
    lines = [
        "[daemon]",
        f"interval = {interval!r}",
        f"state_dir = {_toml(os.path.join(directory, 'state'))}",
        "",
        "[host]",
        f"meminfo = {_toml(os.path.join(directory, 'meminfo'))}",
        f"psi = {_toml(os.path.join(directory, 'no-psi'))}",
    ]
    for name, path in sockets:
        lines += ["", "[[vm]]", f"name = {_toml(name)}", f"qmp = {_toml(path)}"]
    return "\n".join(lines) + "\n"


class SimHost:
    """A host of ``total`` bytes running guests of known RAM, written as a meminfo file.

    ``use`` is what the host's own programs hold. It is set per phase of a scenario (a job
    starts, a job ends) with :meth:`leave`, which says what is available *at that moment*;
    afterwards the host's MemAvailable moves with the guests' sizes, fed in with
    :meth:`observe`. A ``use`` below zero is allowed: a scenario may ask for more available
    memory than MemTotal less the guests' full RAM leaves (the daemon bench's calm phase),
    and only the clamp to MemTotal keeps that honest.
    """

    def __init__(self, total: int, guests: Mapping[str, int], meminfo: PathLike) -> None:
        if total <= 0:
            raise ValueError(f"a host of {total} bytes")
        self.total = total
        #: Each guest's full RAM (its size with an empty balloon).
        self.ram = dict(guests)
        #: Each guest's size as last observed; None until it is known.
        self.sizes: dict[str, int | None] = dict.fromkeys(self.ram)
        self.use = 0
        self.meminfo = Path(meminfo)

    def observe(self, sizes: Mapping[str, int | None]) -> None:
        """The guests' sizes now (RAM less the balloon; None: not known). Names not given
        keep their last size."""
        for name, size in sizes.items():
            if name not in self.ram:
                raise KeyError(f"no guest {name!r} on this host")
            self.sizes[name] = size

    def held(self, *, at_full_size: bool = False) -> int:
        """What the guests hold: their sizes, or their RAM where not known (or for every
        guest with ``at_full_size``)."""
        total = 0
        for name, ram in self.ram.items():
            size = self.sizes[name]
            total += ram if at_full_size or size is None else size
        return total

    def given(self) -> int:
        """What the guests have given back through their balloons (negative never: a guest
        is never larger than its RAM)."""
        return self.held(at_full_size=True) - self.held()

    def available(self) -> int:
        """MemAvailable: MemTotal less the host's own use less what the guests hold."""
        return min(max(self.total - self.use - self.held(), 0), self.total)

    def leave(self, percent: int, *, at_full_size: bool = False) -> int:
        """Set the host's own use so that ``percent`` % of MemTotal (rounded down) is
        available now, or would be with every guest at its full RAM (then what the guests
        have given is available on top); the change in use (bytes), e.g. a job's size."""
        before = self.use
        self.use = self.total - self.total * percent // 100 - self.held(at_full_size=at_full_size)
        return self.use - before

    def write(self) -> int:
        """Write the meminfo file for the guests' sizes now; the MemAvailable written."""
        available = self.available()
        write_meminfo(self.meminfo, self.total, available)
        return available


__all__ = ["SimHost", "daemon_config", "meminfo_text", "replace_file", "write_meminfo"]
