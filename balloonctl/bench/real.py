"""``balloonctl bench real``: what ``set --wait`` costs on a real VM, next to the minimum.

The question a user asks of a management tool is "how much later than the hypervisor do you
tell me it is done?". So both contenders run as whole processes, the way a script runs
them, and inflate the same guest the same amount in one run, alternating (ABBA order, so a
drift in the guest's speed, e.g. its page cache warming up, falls on both equally):

* ``balloonctl``: ``python -m balloonctl set VM TARGET --wait`` (Python start-up, imports,
  qemu.qmp handshake, ``balloon``, polling ``query-balloon`` every 20 ms);
* ``raw``: a minimal QMP client in plain stdlib Python (``python -S``, one socket,
  ``balloon``, then ``query-balloon`` with ``--raw-poll`` seconds between polls; default
  20 ms, balloonctl's own interval, so the ratio is balloonctl's own cost and not a
  polling rate: under TCG, polling every millisecond slows the guest's inflate itself,
  since each QMP command takes QEMU's big lock).

Reported: median wall time of each, their ratio (goal <= 1.10), and with ``--observer`` (a
second QMP monitor of the same VM) the detection latency: the observer polls
``query-balloon`` every millisecond, notes when QEMU's ``actual`` first reaches the target,
and the latency is the contender's exit minus that moment (the observer's own polls cost
both contenders alike). Between timed runs the guest is
deflated back to its full RAM on the observer (or the VM's own socket) and allowed to settle.
"""

from __future__ import annotations

import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final

from balloonctl.backends.address import parse_address
from balloonctl.errors import (
    CommandFailed,
    OperationTimeout,
    PeerError,
    UsageError,
    VmUnreachable,
)
from balloonctl.units import PAGE_SIZE, format_size

#: The whole raw client. Kept as source so it runs in a bare ``python -S`` process.
RAW_CLIENT: Final = r"""
import json, socket, sys, time
path, target, pause = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(path)
f = s.makefile("rwb", buffering=0)
def reply():
    while True:
        msg = json.loads(f.readline())
        if "event" not in msg:
            return msg
f.readline()
f.write(b'{"execute":"qmp_capabilities"}\n'); reply()
f.write(json.dumps({"execute": "balloon", "arguments": {"value": target}}).encode() + b"\n")
reply()
while True:
    f.write(b'{"execute":"query-balloon"}\n')
    if abs(reply()["return"]["actual"] - target) < 4096:
        break
    time.sleep(pause)
"""

TOOLS: Final = ("balloonctl", "raw")


@dataclass(frozen=True)
class RealBenchConfig:
    """What to measure: ``size`` ballooned out of the VM, ``rounds`` times per tool."""

    qmp: str
    observer: str | None = None
    size: int = 1 << 30
    rounds: int = 5
    timeout: float = 120.0
    raw_poll: float = 0.02
    observer_poll: float = 0.002


@dataclass
class Sample:
    """One timed run."""

    tool: str
    wall_s: float
    latency_s: float | None = None


@dataclass
class _Observation:
    reached_at: float | None = None
    errors: list[str] = field(default_factory=list)


class _Qmp:
    """A blocking QMP connection, for setting the guest up between runs and observing."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError as exc:
            self.sock.close()
            raise VmUnreachable(f"cannot reach VM {path}: {exc.strerror or exc}") from exc
        self.file = self.sock.makefile("rwb", buffering=0)
        try:
            greeting = json.loads(self.file.readline())
        except (OSError, ValueError) as exc:
            self.close()
            raise VmUnreachable(f"no QMP greeting from {path}: {exc}") from exc
        if "QMP" not in greeting:
            self.close()
            raise PeerError(f"{path} is not a QMP monitor")
        self.execute("qmp_capabilities")

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        request: dict[str, Any] = {"execute": command}
        if arguments is not None:
            request["arguments"] = arguments
        try:
            self.file.write(json.dumps(request).encode() + b"\n")
            while True:
                line = self.file.readline()
                if not line:
                    raise VmUnreachable(f"VM {self.path} hung up during {command}")
                msg = json.loads(line)
                if "event" in msg:
                    continue
                if "error" in msg:
                    error = msg["error"] if isinstance(msg["error"], dict) else {}
                    raise CommandFailed(
                        f"VM {self.path} refused {command}: {error.get('desc', msg['error'])}",
                        error_class=str(error.get("class", "GenericError")),
                    )
                return msg.get("return")
        except (OSError, ValueError) as exc:
            raise VmUnreachable(f"VM {self.path}: {command} failed: {exc}") from exc

    def actual(self) -> int:
        reply = self.execute("query-balloon")
        value = reply.get("actual") if isinstance(reply, dict) else None
        if not isinstance(value, int):
            raise PeerError("query-balloon: actual is not an integer")
        return value

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def _observe(
    observer: _Qmp, target: int, stop: threading.Event, seen: _Observation, pause: float
) -> None:
    """Poll every ``pause`` seconds until actual reaches ``target`` (or told to stop)."""
    try:
        while not stop.is_set():
            if abs(observer.actual() - target) < PAGE_SIZE:
                seen.reached_at = time.monotonic()
                return
            time.sleep(pause)
    except Exception as exc:  # reported with the sample, never a thread traceback
        seen.errors.append(str(exc))


def _argv(tool: str, config: RealBenchConfig, target: int) -> list[str]:
    if tool == "balloonctl":
        return [sys.executable, "-m", "balloonctl", "set", config.qmp, str(target), "--wait"]
    return [sys.executable, "-S", "-c", RAW_CLIENT, config.qmp, str(target), str(config.raw_poll)]


def _settle(control: _Qmp, value: int, timeout: float, pause: float = 1.1) -> None:
    """Bring the guest to ``value`` and wait there (untimed), then ``pause``."""
    control.execute("balloon", {"value": value})
    deadline = time.monotonic() + timeout
    while abs(control.actual() - value) >= PAGE_SIZE:
        if time.monotonic() > deadline:
            raise OperationTimeout(f"the guest did not get back to {format_size(value)}")
        time.sleep(0.01)
    # BALLOON_CHANGE is throttled to 1/s: let the last one go out before the next run, so
    # no contender pays for the previous one's events.
    time.sleep(pause)


def _run_one(config: RealBenchConfig, tool: str, target: int, ram: int) -> Sample:
    control = _Qmp(config.observer) if config.observer else None
    try:
        if control is not None:
            _settle(control, ram, config.timeout)
        else:
            with_own = _Qmp(config.qmp)
            try:
                _settle(with_own, ram, config.timeout)
            finally:
                with_own.close()
        stop = threading.Event()
        seen = _Observation()
        watcher = None
        if control is not None:
            watcher = threading.Thread(
                target=_observe, args=(control, target, stop, seen, config.observer_poll)
            )
            watcher.start()
        t0 = time.monotonic()
        try:
            done = subprocess.run(
                _argv(tool, config, target),
                capture_output=True,
                text=True,
                timeout=config.timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise OperationTimeout(f"{tool} did not finish in {config.timeout:g} s") from exc
        finally:
            t1 = time.monotonic()
            stop.set()
            if watcher is not None:
                watcher.join()
        if done.returncode != 0:
            why = done.stderr.strip().splitlines()[-1:] or ["(no message)"]
            raise PeerError(f"{tool} failed (exit {done.returncode}): {why[0]}")
        if seen.errors:
            raise PeerError(f"observer: {seen.errors[0]}")
        latency = None if seen.reached_at is None else max(0.0, t1 - seen.reached_at)
        return Sample(tool, t1 - t0, latency)
    finally:
        if control is not None:
            control.close()


def _unix_path(address: str, option: str) -> str:
    """A socket path from the VM address forms of docs/contracts.md; the client speaks unix."""
    parsed = parse_address(address)
    if parsed.kind != "unix":
        raise UsageError(f"{option} must be a unix socket (the raw client is unix-only)")
    return parsed.path


def run(config: RealBenchConfig) -> dict[str, Any]:
    """Alternate the two contenders ``rounds`` times each; medians and the ratio."""
    if config.rounds < 1:
        raise UsageError("--rounds must be at least 1")
    if config.size <= 0:
        raise UsageError("--size must be positive")
    if not 0 <= config.raw_poll <= 1:
        raise UsageError("--raw-poll must be between 0 and 1 second")
    config = replace(
        config,
        qmp=_unix_path(config.qmp, "--qmp"),
        observer=_unix_path(config.observer, "--observer") if config.observer else None,
    )
    probe = _Qmp(config.observer or config.qmp)
    try:
        summary = probe.execute("query-memory-size-summary")
        ram = summary.get("base-memory") if isinstance(summary, dict) else None
        if not isinstance(ram, int) or isinstance(ram, bool) or ram <= 0:
            raise PeerError("query-memory-size-summary: no base-memory")
        start = probe.actual()
    finally:
        probe.close()
    if config.size >= ram:
        raise UsageError(f"--size must be less than the VM's RAM ({format_size(ram)})")
    target = ram - config.size
    samples: list[Sample] = []
    for i in range(config.rounds):
        order = TOOLS if i % 2 == 0 else TOOLS[::-1]
        for tool in order:
            samples.append(_run_one(config, tool, target, ram))
    # Leave the VM as it was found.
    control = _Qmp(config.observer or config.qmp)
    try:
        _settle(control, start, config.timeout, pause=0.0)
    finally:
        control.close()
    return report(config, ram, target, samples)


def report(
    config: RealBenchConfig, ram: int, target: int, samples: Sequence[Sample]
) -> dict[str, Any]:
    """The JSON report: every sample, medians, ratio, latencies."""
    tools: dict[str, Any] = {}
    for tool in TOOLS:
        mine = [s for s in samples if s.tool == tool]
        latencies = [s.latency_s for s in mine if s.latency_s is not None]
        tools[tool] = {
            "wall_s": [round(s.wall_s, 4) for s in mine],
            "median_wall_s": round(statistics.median(s.wall_s for s in mine), 4),
            "latency_s": [round(x, 4) for x in latencies],
            "median_latency_s": round(statistics.median(latencies), 4) if latencies else None,
        }
    ratio = tools["balloonctl"]["median_wall_s"] / tools["raw"]["median_wall_s"]
    return {
        "vm": config.qmp,
        "ram_bytes": ram,
        "inflate_bytes": config.size,
        "target_bytes": target,
        "rounds": config.rounds,
        "raw_poll_s": config.raw_poll,
        "observer_poll_s": config.observer_poll if config.observer else None,
        "tools": tools,
        "ratio": round(ratio, 3),
        "goal_ratio": 1.10,
        "goal_met": ratio <= 1.10,
    }


def format_report(r: dict[str, Any]) -> str:
    """A table a person reads."""
    lines = [
        f"inflate {format_size(r['inflate_bytes'])} of {format_size(r['ram_bytes'])} "
        f"on {r['vm']}, {r['rounds']} rounds each, whole processes, alternating; "
        f"raw polls every {r['raw_poll_s'] * 1000:g} ms",
        f"{'tool':<12}{'median':>10}{'latency':>10}   runs (s)",
    ]
    for tool, t in r["tools"].items():
        lat = "-" if t["median_latency_s"] is None else f"{t['median_latency_s'] * 1000:.0f} ms"
        runs = " ".join(f"{x:.3f}" for x in t["wall_s"])
        lines.append(f"{tool:<12}{t['median_wall_s']:>9.3f}s{lat:>10}   {runs}")
    verdict = "met" if r["goal_met"] else "NOT met"
    lines.append(f"ratio balloonctl/raw {r['ratio']:.3f} (goal <= {r['goal_ratio']}: {verdict})")
    return "\n".join(lines) + "\n"
