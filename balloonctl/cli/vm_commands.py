"""The CLI's VM commands: list, status, set, stats, features, negotiate.

Each is an async function from parsed options to a report (a dict for ``--json``) plus its
human rendering; ``balloonctl.cli.main`` runs it and maps errors to exit codes. Nothing here
imports numpy or the guest model: a ``status`` pays only for asyncio and qemu.qmp.
"""

from __future__ import annotations

import asyncio
import io
import os
import sys
import time
from collections.abc import AsyncGenerator, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, TextIO

from balloonctl.backends.base import Backend, FeatureState, GuestStats
from balloonctl.backends.open import open_backend
from balloonctl.daemon.config import Config
from balloonctl.errors import (
    BalloonError,
    CommandFailed,
    OperationTimeout,
    UsageError,
)
from balloonctl.units import PAGE_SIZE, format_size
from balloonctl.virtio.spec import BYTE_STATS

if TYPE_CHECKING:
    from balloonctl.cli.hosts import Host, HostOutcome

#: set --wait polls query-balloon this often: completion is seen within tens of ms, not at
#: the next BALLOON_CHANGE, which QEMU throttles to one a second.
POLL_S: Final = 0.02
#: stats turns polling on at this period when it is off.
DEFAULT_PERIOD_S: Final = 2
#: Stats whose values are bytes (shown as sizes); the rest are counts (virtio.spec says why).
MEMORY_STATS: Final = BYTE_STATS
#: How a person reads the stats: memory first, then paging, then reclaim from the mildest
#: (kswapd's) to the worst (an OOM kill; tags 10-15, Linux 6.12+ on QEMU 9.2+), then hugetlb.
STAT_ORDER: Final = (
    "total-memory",
    "free-memory",
    "available-memory",
    "disk-caches",
    "swap-in",
    "swap-out",
    "major-faults",
    "minor-faults",
    "async-scans",
    "async-reclaims",
    "direct-scans",
    "direct-reclaims",
    "alloc-stalls",
    "oom-kills",
    "htlb-pgalloc",
    "htlb-pgfail",
)
SG_ON_V12: Final = (
    "SG does not exist on this device: virtio 1.2 gave bit 3 to free-page-hint, and the "
    "seed's VIRTIO_BALLOON_F_SG was never merged. Its merged relative is free page "
    "reporting (page-reporting, bit 5): SG lists of free pages on their own queue."
)


#: The libvirt URI given with ``-c/--connect``; None means the default of docs/contracts.md (see
#: :func:`libvirt_uri`). A context variable, set by the CLI before ``asyncio.run`` (which
#: copies the context), so that every command reaches it without an extra parameter.
CONNECT_URI: ContextVar[str | None] = ContextVar("balloonctl_connect_uri", default=None)
#: libvirt's own default when neither -c nor $LIBVIRT_DEFAULT_URI says otherwise.
DEFAULT_LIBVIRT_URI: Final = "qemu:///system"


def libvirt_uri() -> str:
    """``-c URI``, else ``$LIBVIRT_DEFAULT_URI``, else ``qemu:///system`` (as virsh does)."""
    return CONNECT_URI.get() or os.environ.get("LIBVIRT_DEFAULT_URI") or DEFAULT_LIBVIRT_URI


def libvirt_requested() -> bool:
    """Whether the user pointed balloonctl at libvirt (``-c`` or ``$LIBVIRT_DEFAULT_URI``).

    ``list`` asks libvirt only then: a QMP-only user must not wait for, or read an error
    about, a libvirtd they do not run (virsh users pass ``-c`` anyway).
    """
    return bool(CONNECT_URI.get() or os.environ.get("LIBVIRT_DEFAULT_URI"))


def open_vm(name: str) -> Backend:
    """The backend for a VM name a user typed, on the ``-c`` URI if it names a libvirt domain.

    :func:`balloonctl.backends.open.open_backend` guesses QMP or libvirt from the name's shape
    (the rule shared with the daemon is written there); this adds only the CLI's URI.
    """
    return open_backend(name, libvirt_uri=libvirt_uri())


# --- status ------------------------------------------------------------------------------
def features_report(state: FeatureState) -> dict[str, Any]:
    """The ``features`` object of docs/contracts.md (without ``vm``)."""
    return {
        "profile": state.profile,
        "offered": list(state.offered),
        "acked": list(state.acked),
        "sg": {"offered": "sg" in state.offered, "acked": "sg" in state.acked},
        "driver_ok": state.driver_ok,
    }


async def status(vm: str) -> dict[str, Any]:
    """actual, RAM, features, and how old the guest's stats are."""
    async with open_vm(vm) as backend:
        actual = await backend.actual()
        ram = await backend.max_memory()
        feats = await backend.features()
        stats = await backend.stats()
    age = round(max(0.0, time.time() - stats.last_update), 1) if stats.last_update else None
    return {
        "vm": vm,
        "actual_bytes": actual,
        "max_bytes": ram,
        "features": features_report(feats),
        "stats_age_s": age,
    }


def render_status(report: dict[str, Any]) -> str:
    """status as a user reads it."""
    actual, ram = report["actual_bytes"], report["max_bytes"]
    feats = report["features"]
    age = report["stats_age_s"]
    lines = [
        f"VM        {report['vm']}",
        f"memory    {format_size(actual)} of {format_size(ram)} "
        f"(balloon {format_size(max(0, ram - actual))})",
        f"profile   {feats['profile']}",
        f"acked     {' '.join(feats['acked']) or '(no driver yet)'}",
        f"SG        {_sg_line(feats)}",
        "stats     "
        + (f"updated {age} s ago" if age is not None else "never (see: balloonctl stats VM)"),
    ]
    return "\n".join(lines) + "\n"


def _sg_line(feats: dict[str, Any]) -> str:
    if feats["profile"] != "seed-sg":
        return "not on this device (virtio 1.2: bit 3 is free-page-hint)"
    sg = feats["sg"]
    if sg["acked"]:
        return "negotiated (inflate/deflate as scatter-gather chains)"
    return "offered, not acked" if sg["offered"] else "not offered"


# --- set ---------------------------------------------------------------------------------------
@dataclass
class SetResult:
    """What set reached, for the report and for the error message."""

    vm: str
    target: int
    actual: int
    reached: bool
    elapsed: float
    #: Why the wait ended early (the VM went away or stopped answering), if it did.
    error: str | None = None

    def report(self) -> dict[str, Any]:
        """The ``set`` object of docs/contracts.md."""
        return {
            "vm": self.vm,
            "target_bytes": self.target,
            "actual_bytes": self.actual,
            "reached": self.reached,
            "elapsed_s": round(self.elapsed, 3),
        }


def check_floor(vm: str, target: int, config: Config) -> None:
    """Never a target below a configured floor (exit 2, nothing sent)."""
    entry = config.find(vm)
    if entry is not None and target < entry.min:
        raise UsageError(
            f"target {format_size(target)} is below the floor {format_size(entry.min)} "
            f"configured for {entry.name} in {config.path}"
        )


class Progress:
    """A one-line progress bar on a terminal; nothing at all when stderr is not one."""

    def __init__(self, start: int, target: int, stream: TextIO = sys.stderr) -> None:
        self.start = start
        self.target = target
        self.stream = stream
        self.enabled = stream.isatty()
        self._last = ""

    def update(self, actual: int) -> None:
        """Redraw for ``actual``."""
        if not self.enabled:
            return
        span = abs(self.target - self.start) or 1
        done = min(1.0, abs(actual - self.start) / span)
        width = 30
        bar = "#" * int(done * width) + "-" * (width - int(done * width))
        line = f"\r[{bar}] {format_size(actual)} -> {format_size(self.target)} {done * 100:3.0f}%"
        if line != self._last:
            self.stream.write(line)
            self.stream.flush()
            self._last = line

    def finish(self) -> None:
        """End the line."""
        if self.enabled and self._last:
            self.stream.write("\n")
            self.stream.flush()


def close_enough(actual: int, target: int) -> bool:
    """QEMU keeps the balloon in whole 4 KiB pages: actual lands within a page of target."""
    return abs(actual - target) < PAGE_SIZE


async def set_target(
    vm: str,
    size: int,
    *,
    wait: bool,
    timeout: float,
    config: Config,
    progress: Callable[[int, int], Progress] = Progress,
) -> SetResult:
    """Ask for ``size`` bytes of guest memory; with ``wait``, until actual gets there."""
    if size <= 0:
        raise UsageError("size must be positive")
    check_floor(vm, size, config)
    t0 = time.monotonic()
    async with open_vm(config.address(vm)) as backend:
        ram = await backend.max_memory()
        # Clamped to RAM, a target may sit below a floor set above the VM's RAM: that is
        # a full deflate, the closest the VM can come to its floor, so it goes ahead.
        target = min(size, ram)
        start = await backend.actual()
        # The balloon command itself is never retried: its outcome would be unknown.
        await backend.set_target(target)
        if not wait:
            actual = await backend.actual()
            return SetResult(vm, target, actual, close_enough(actual, target), 0.0)
        bar = progress(start, target)
        result = SetResult(vm, target, start, False, 0.0)
        try:
            await _wait_for(backend, result, bar, t0, timeout)
        finally:
            bar.finish()
            result.elapsed = time.monotonic() - t0
        return result


async def _wait_for(
    backend: Backend, result: SetResult, bar: Progress, t0: float, timeout: float
) -> None:
    """Poll until actual is the target, the deadline passes, or the VM is lost; a lost VM
    ends the wait with ``result.error`` set, so the caller still reports what was reached."""
    deadline = t0 + timeout
    while True:
        remaining = deadline - time.monotonic()
        try:
            async with asyncio.timeout(max(0.0, remaining)):
                result.actual = await backend.actual()
        except TimeoutError:
            return  # a VM that stops answering: the deadline still holds
        except BalloonError as exc:  # gone, refused, or answering nonsense: say where it got
            result.error = str(exc)
            return
        bar.update(result.actual)
        if close_enough(result.actual, result.target):
            result.reached = True
            return
        if time.monotonic() >= deadline:
            return
        await asyncio.sleep(POLL_S)


# --- stats --------------------------------------------------------------------------------------
def stats_report(vm: str, reading: GuestStats) -> dict[str, Any]:
    """``stats --json``'s object (README, "Managing a VM"); ``unavailable`` ({NAME: why})
    only when the backend knows statistics it could not read (libvirt without QMP
    passthrough)."""
    report: dict[str, Any] = {"vm": vm, "last_update": reading.last_update, "stats": reading.stats}
    if reading.unavailable:
        report["unavailable"] = reading.unavailable
    return report


def render_stats(report: dict[str, Any]) -> str:
    """One stat a line, sizes in binary units; what could not be read, and why, below."""
    last = report["last_update"]
    age = f"{max(0.0, time.time() - last):.1f} s ago" if last else "never"
    lines = [f"VM        {report['vm']}", f"updated   {age}"]
    order = {name: i for i, name in enumerate(STAT_ORDER)}
    for name, value in sorted(report["stats"].items(), key=lambda kv: order.get(kv[0], 99)):
        shown = format_size(value) if name in MEMORY_STATS else str(value)
        lines.append(f"{name:<18}{shown:>14}")
    why_names: dict[str, list[str]] = {}
    for name, why in report.get("unavailable", {}).items():
        why_names.setdefault(why, []).append(name)
    for why, names in why_names.items():
        lines.append(f"not available: {', '.join(names)}: {why}")
    return "\n".join(lines) + "\n"


async def _ensure_polling(backend: Backend, period: int | None, notice: TextIO) -> int:
    current = await backend.stats_period()
    if period == 0:
        # --period 0 turns the guest's polling off; what it last sent stays readable.
        await backend.set_stats_period(0)
        return 0
    if period is not None and period != current:
        await backend.set_stats_period(period)
        return period
    if current == 0:
        print(
            f"balloonctl: stats polling was off; turned it on every {DEFAULT_PERIOD_S} s "
            "(--period to choose)",
            file=notice,
        )
        await backend.set_stats_period(DEFAULT_PERIOD_S)
        return DEFAULT_PERIOD_S
    return current


async def stats(vm: str, period: int | None, notice: TextIO = sys.stderr) -> dict[str, Any]:
    """The guest's latest stats; if polling was off, turn it on and wait for a reading."""
    async with open_vm(vm) as backend:
        before = await backend.stats()
        was = await backend.stats_period()
        used = await _ensure_polling(backend, period, notice)
        reading = before
        if used and (was == 0 or not before.last_update):
            reading = await _next_reading(backend, before.last_update, used)
    return stats_report(vm, reading)


async def _next_reading(backend: Backend, after: int, period: int) -> GuestStats:
    deadline = time.monotonic() + 2 * period + 2
    while True:
        reading = await backend.stats()
        if reading.last_update > after:
            return reading
        if time.monotonic() >= deadline:
            raise OperationTimeout(
                f"no fresh stats from the guest within {2 * period + 2} s "
                "(is its balloon driver loaded?)"
            )
        await asyncio.sleep(0.1)


async def watch_stats(
    vm: str, period: int | None, notice: TextIO = sys.stderr
) -> AsyncGenerator[dict[str, Any], None]:
    """Every new reading, until the connection drops (ConnectionLost: exit 1)."""
    if period == 0:
        raise UsageError("--period 0 turns stats polling off: there would be nothing to watch")
    async with open_vm(vm) as backend:
        used = await _ensure_polling(backend, period, notice)
        last = -1
        while True:
            reading = await backend.stats()
            if reading.last_update != last:
                last = reading.last_update
                yield stats_report(vm, reading)
            await asyncio.sleep(max(0.1, min(0.5, used / 4)))


# --- features / negotiate -------------------------------------------------------------------------
def features_json(vm: str, state: FeatureState) -> dict[str, Any]:
    """The ``features`` object of docs/contracts.md."""
    out = {"vm": vm}
    out.update(features_report(state))
    return out


def render_features(report: dict[str, Any], names: list[str]) -> str:
    """A table, bit by bit, then what SG means on this device."""
    offered, acked = set(report["offered"]), set(report["acked"])
    lines = [f"VM        {report['vm']}", f"profile   {report['profile']}", ""]
    lines.append(f"{'feature':<22}{'offered':>8}{'acked':>7}")
    for name in names:
        if name in offered or name in acked:
            lines.append(
                f"{name:<22}{'yes' if name in offered else '-':>8}"
                f"{'yes' if name in acked else '-':>7}"
            )
    lines.append("")
    if report["profile"] == "seed-sg":
        lines.append(f"SG: {_sg_line(report)}.")
    else:
        lines.append(SG_ON_V12)
    if not report["driver_ok"]:
        lines.append("No driver is running in the guest yet: nothing is acked.")
    return "\n".join(lines) + "\n"


async def features(vm: str) -> tuple[dict[str, Any], list[str]]:
    """Offered/acked bits and the profile's names in bit order (for the table)."""
    from balloonctl.virtio.features import get_profile  # noqa: PLC0415

    async with open_vm(vm) as backend:
        state = await backend.features()
    names = [bit.name for bit in sorted(get_profile(state.profile).bits, key=lambda b: b.bit)]
    return features_json(vm, state), names


async def negotiate(vm: str, enable: list[str], disable: list[str]) -> dict[str, Any]:
    """Replug the balloon with other features; the features after the guest re-probed."""
    both = set(enable) & set(disable)
    if both:
        raise UsageError(f"both --enable and --disable name {', '.join(sorted(both))}")
    if not enable and not disable:
        raise UsageError("name at least one feature with --enable or --disable")
    async with open_vm(vm) as backend:
        before = await backend.features()
        if "sg" in (*enable, *disable) and before.profile != "seed-sg":
            raise CommandFailed(SG_ON_V12)  # neither on nor off: bit 3 is not SG here
        actual = await backend.actual()
        ram = await backend.max_memory()
        after = await backend.renegotiate(enable, disable)
        if actual < ram:
            # The replug gave the guest its ballooned memory back; ask for the same size
            # again, as libvirt keeps currentMemory across a balloon's re-plug.
            await backend.set_target(actual)
    report = features_json(vm, after)
    report["target_bytes"] = actual
    return report


# --- list ---------------------------------------------------------------------------------
async def list_vms(config: Config, qmp_dir: str | None) -> dict[str, Any]:
    """Configured VMs (and the sockets in ``qmp_dir``), each with what it answers now."""
    rows = await _qmp_rows([(vm.name, vm.qmp) for vm in config.vms], qmp_dir)
    if libvirt_requested():
        rows += await _libvirt_rows(libvirt_uri())
    return {"vms": rows}


async def _qmp_rows(entries: list[tuple[str, str]], qmp_dir: str | None) -> list[dict[str, Any]]:
    """``entries`` (name, QMP address) then every ``qmp_dir/*.sock``, each probed at once."""
    if qmp_dir is not None:
        try:
            found = sorted(os.listdir(qmp_dir))
        except OSError as exc:
            raise UsageError(f"cannot list {qmp_dir}: {exc.strerror}") from exc
        entries = entries + [
            (name.removesuffix(".sock"), os.path.join(qmp_dir, name))
            for name in found
            if name.endswith(".sock")
        ]
    return list(await asyncio.gather(*(_probe(name, address) for name, address in entries)))


async def _libvirt_rows(uri: str) -> list[dict[str, Any]]:
    """Running domains of ``uri`` with a balloon; an unreachable libvirt is an error (the
    user asked for it with -c or $LIBVIRT_DEFAULT_URI)."""
    try:
        from balloonctl.backends.libvirt import list_balloon_domains  # noqa: PLC0415
    except ImportError as exc:
        raise UsageError("listing libvirt domains needs libvirt-python") from exc
    domains = await list_balloon_domains(uri)
    return [
        {
            "vm": d.name,
            "address": uri,
            "uuid": d.uuid,
            "state": "running",
            "actual_bytes": d.actual,
            "max_bytes": d.max_memory,
        }
        for d in domains
    ]


async def _probe(name: str, address: str) -> dict[str, Any]:
    row: dict[str, Any] = {
        "vm": name,
        "address": address,
        "state": "unreachable",
        "actual_bytes": None,
        "max_bytes": None,
    }
    try:
        # [[vm]] and --qmp-dir entries are QMP sockets whether or not they exist yet: a guess
        # from the name would ask libvirt about a VM that is merely down.
        async with open_backend(address, kind="qmp", connect_timeout=2.0) as backend:
            row["max_bytes"] = await backend.max_memory()
            row["actual_bytes"] = await backend.actual()
            row["state"] = "running"
    except CommandFailed as exc:
        row["state"] = "no balloon" if exc.error_class == "DeviceNotActive" else "error"
    except BalloonError:
        pass
    return row


def render_list(report: dict[str, Any]) -> str:
    """A table; an empty list says where VMs come from."""
    if not report["vms"]:
        return (
            "no VMs configured: add [[vm]] qmp = PATH to the config file (or use --qmp-dir DIR, "
            "or -c URI for libvirt's running domains)\n"
        )
    lines = [f"{'VM':<16}{'STATE':<12}{'ACTUAL':>12}{'MAX':>12}  ADDRESS"]
    for row in report["vms"]:
        actual = format_size(row["actual_bytes"]) if row["actual_bytes"] is not None else "-"
        ram = format_size(row["max_bytes"]) if row["max_bytes"] is not None else "-"
        lines.append(f"{row['vm']:<16}{row['state']:<12}{actual:>12}{ram:>12}  {row['address']}")
    return "\n".join(lines) + "\n"


# --- many hosts: list, status, stats with several -c URI and/or --hosts FILE ----------------
# Each function below is one host's share, run by balloonctl.cli.hosts.run_on_hosts (all
# hosts at once, each in its own task); merge_hosts puts the hosts' answers together.


def _on_host(host: Host) -> None:
    """Point ``open_vm`` at ``host``'s libvirt (the context is the host's own task's)."""
    if host.uri is not None:
        CONNECT_URI.set(host.uri)


def host_vm_address(host: Host, vm: str) -> str:
    """VM ``vm`` on ``host``: a domain name or UUID on its URI, or ``qmp_dir/vm.sock``."""
    if host.qmp_dir is not None:
        return os.path.join(host.qmp_dir, f"{vm}.sock")
    return vm


def check_multi_host_vm(vm: str) -> None:
    """With several hosts a VM is named, never addressed: a socket path or ``tcp:`` address
    would be the same VM on every row (exit 2 before anything is asked)."""
    from balloonctl.backends.open import backend_kind  # noqa: PLC0415

    if backend_kind(vm) == "qmp":
        raise UsageError(
            f"{vm} is a QMP address; with several hosts, VM is a libvirt domain name or UUID "
            "(or NAME of a qmp_dir host's NAME.sock)"
        )


async def host_list(host: Host, config: Config, qmp_dir: str | None) -> tuple[dict[str, Any], str]:
    """One host's ``list`` rows: a URI's running domains with a balloon, a qmp_dir's sockets,
    or (the ``local`` host) the ``[[vm]]`` entries and ``--qmp-dir``'s sockets."""
    if host.uri is not None:
        return {"vms": await _libvirt_rows(host.uri)}, ""
    if host.qmp_dir is not None:
        return {"vms": await _qmp_rows([], host.qmp_dir)}, ""
    return {"vms": await _qmp_rows([(vm.name, vm.qmp) for vm in config.vms], qmp_dir)}, ""


async def host_status(host: Host, vm: str) -> tuple[dict[str, Any], str]:
    """One host's ``status`` of VM ``vm``."""
    _on_host(host)
    report = await status(host_vm_address(host, vm))
    report["vm"] = vm
    return report, ""


async def host_stats(host: Host, vm: str, period: int | None) -> tuple[dict[str, Any], str]:
    """One host's ``stats`` of VM ``vm``; its notice (polling turned on) is handed back so
    that the parent prints it once, with the host's name."""
    _on_host(host)
    notice = io.StringIO()
    report = await stats(host_vm_address(host, vm), period, notice)
    report["vm"] = vm
    return report, notice.getvalue()


def merge_hosts(outcomes: list[HostOutcome]) -> dict[str, Any]:
    """The multi-host ``--json`` object (docs/contracts.md, "Many hosts")::

        {"vms": [{"host", ...the one-host object...}, ...],
         "hosts": [{"host", "address", "error"}, ...]}

    ``vms`` holds ``list``'s rows or one ``status``/``stats`` object per host that answered;
    ``hosts`` every host asked, in order, ``error`` null when it answered.
    """
    rows: list[dict[str, Any]] = []
    hosts: list[dict[str, Any]] = []
    for outcome in outcomes:
        name = outcome.host.name
        hosts.append({"host": name, "address": outcome.host.address, "error": outcome.error})
        if outcome.report is None:
            continue
        items = outcome.report.get("vms", [outcome.report])
        rows += [{"host": name, **item} for item in items]
    return {"vms": rows, "hosts": hosts}


def _host_table(
    report: dict[str, Any], header: list[str], cells: Callable[[Any], list[str]]
) -> str:
    """Rows grouped by host in the order asked; a host that failed is one line, its error."""
    table = [header] + [[row["host"], *cells(row)] for row in report["vms"]]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    # Left-aligned names, right-aligned numbers: a column is numeric if its header says so.
    right = {i for i, title in enumerate(header) if title in _NUMERIC_COLUMNS}

    def fmt(line: list[str]) -> str:
        return "  ".join(
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(line)
        ).rstrip()

    by_host: dict[str, list[str]] = {}
    for line in table[1:]:
        by_host.setdefault(line[0], []).append(fmt(line))
    out = [fmt(header)]
    for host in report["hosts"]:
        if host["error"] is not None:
            out.append(f"{host['host'].ljust(widths[0])}  error: {host['error']}")
        else:
            out += by_host.get(host["host"], [])
    return "\n".join(out) + "\n"


_NUMERIC_COLUMNS: Final = frozenset(
    {"ACTUAL", "MAX", "BALLOON", "UPDATED", "TOTAL", "AVAILABLE", "FREE", "CACHES", "SWAP-OUT"}
    | {"MAJ-FAULTS", "STATS"}
)


def _size_or_dash(value: int | None) -> str:
    return format_size(value) if value is not None else "-"


def render_hosts_list(report: dict[str, Any]) -> str:
    """``list`` across hosts: a HOST column, then ``list``'s columns but ADDRESS (for a
    libvirt row it is the host's URI again; every row's address is in --json)."""
    return _host_table(
        report,
        ["HOST", "VM", "STATE", "ACTUAL", "MAX"],
        lambda r: [
            r["vm"],
            r["state"],
            _size_or_dash(r["actual_bytes"]),
            _size_or_dash(r["max_bytes"]),
        ],
    )


def render_hosts_status(report: dict[str, Any]) -> str:
    """``status`` across hosts: one row per host (the acked features are in --json)."""

    def cells(r: dict[str, Any]) -> list[str]:
        age = r["stats_age_s"]
        return [
            r["vm"],
            format_size(r["actual_bytes"]),
            format_size(r["max_bytes"]),
            format_size(max(0, r["max_bytes"] - r["actual_bytes"])),
            r["features"]["profile"],
            "yes" if r["features"]["driver_ok"] else "no",
            f"{age} s" if age is not None else "never",
        ]

    header = ["HOST", "VM", "ACTUAL", "MAX", "BALLOON", "PROFILE", "DRIVER", "STATS"]
    return _host_table(report, header, cells)


def render_hosts_stats(report: dict[str, Any]) -> str:
    """``stats`` across hosts: the memory a person compares between hosts, one row per host
    (every statistic is in --json)."""
    columns = (
        ("TOTAL", "total-memory"),
        ("AVAILABLE", "available-memory"),
        ("FREE", "free-memory"),
        ("CACHES", "disk-caches"),
        ("SWAP-OUT", "swap-out"),
        ("MAJ-FAULTS", "major-faults"),
    )

    def cells(r: dict[str, Any]) -> list[str]:
        last = r["last_update"]
        line = [r["vm"], f"{max(0.0, time.time() - last):.1f} s" if last else "never"]
        for _title, name in columns:
            value = r["stats"].get(name)
            if value is None:
                line.append("-")
            else:
                line.append(format_size(value) if name in MEMORY_STATS else str(value))
        return line

    return _host_table(report, ["HOST", "VM", "UPDATED", *(t for t, _ in columns)], cells)
