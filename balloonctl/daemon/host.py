"""Reading the host's memory state: /proc/meminfo and PSI, each tick.

Split from the tick loop so that what is read (and what makes a reading unusable) can be
tested on text alone, and so that the loop's module holds the loop only. A meminfo that
cannot be used raises :class:`~balloonctl.errors.HostReadError`: the tick then decides
nothing for any VM (a guess about the host would move every VM on it). PSI is optional:
older kernels, or ``psi=0`` on the kernel's command line, have none, and MemAvailable
alone decides (docs/architecture.md, ``daemon/``).
"""

from __future__ import annotations

from balloonctl.daemon.config import HostConfig
from balloonctl.daemon.policy import HostState
from balloonctl.errors import HostReadError


def parse_meminfo(text: str) -> tuple[int, int]:
    """(MemTotal, MemAvailable) in bytes from /proc/meminfo's text (proc(5): kB units)."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        if sep and key in ("MemTotal", "MemAvailable"):
            number = rest.split()
            # isdigit() alone takes "²" (int() then raises ValueError) and "٣" (int() reads 3).
            if not number or not (number[0].isascii() and number[0].isdigit()):
                raise HostReadError(f"meminfo: {key} is not a number: {rest.strip()!r}")
            values[key] = int(number[0]) * 1024
    for key in ("MemTotal", "MemAvailable"):
        if key not in values:
            raise HostReadError(f"meminfo: no {key} line (Linux 3.14 or later has it)")
    total, available = values["MemTotal"], values["MemAvailable"]
    if total <= 0 or available > total:
        raise HostReadError(f"meminfo: MemAvailable {available} with MemTotal {total}")
    return total, available


def parse_psi(text: str) -> float | None:
    """``some avg10`` from /proc/pressure/memory (Documentation/accounting/psi.rst)."""
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "some":
            for field in fields[1:]:
                key, _, value = field.partition("=")
                if key == "avg10":
                    try:
                        number = float(value)
                    except ValueError:
                        return None
                    return number if 0.0 <= number <= 100.0 else None
    return None


def read_host(cfg: HostConfig) -> HostState:
    """The host's memory now; PSI is optional (no file, no PSI)."""
    try:
        with open(cfg.meminfo, encoding="ascii", errors="replace") as fh:
            total, available = parse_meminfo(fh.read(65536))
    except OSError as exc:
        raise HostReadError(f"cannot read {cfg.meminfo}: {exc.strerror or exc}") from exc
    psi: float | None = None
    try:
        with open(cfg.psi, encoding="ascii", errors="replace") as fh:
            psi = parse_psi(fh.read(4096))
    except OSError:
        psi = None  # no PSI on this kernel (or it is disabled): MemAvailable alone decides
    return HostState(total, available, psi)
