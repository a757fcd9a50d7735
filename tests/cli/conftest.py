"""End-to-end fixtures: the ``balloonctl`` CLI as a subprocess against ``balloonctl sim``
subprocesses serving simulated VMs on real unix sockets.

Nothing here imports the simulator: the VM is another process, reached only through its
QMP socket, exactly as a user's shell reaches QEMU.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pytest

#: Bound on a sim becoming ready (process start, numpy import, boot probe, DRIVER_OK).
READY_TIMEOUT_S = 15.0
#: Room left in sockaddr_un.sun_path (108 bytes) for a socket name.
_MAX_DIR_LEN = 80


def cli_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment every CLI run gets: no configuration file from the host.

    ``$BALLOONCTL_CONFIG`` is dropped and ``$XDG_CONFIG_HOME`` points nowhere, so only an
    explicit ``--config`` reaches the CLI; ``-v`` detail and colour are off.
    """
    env = {k: v for k, v in os.environ.items() if k != "BALLOONCTL_CONFIG"}
    env["XDG_CONFIG_HOME"] = "/nonexistent/balloonctl-cli-tests"
    env.pop("PYTHONWARNINGS", None)
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


def balloonctl_argv(*args: str, python_flags: Sequence[str] = ()) -> list[str]:
    """``python [FLAGS] -m balloonctl ARGS...``"""
    return [sys.executable, *python_flags, "-m", "balloonctl", *args]


def run_cli(
    *args: str,
    timeout: float = 30.0,
    python_flags: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``balloonctl ARGS...`` to completion; stdout and stderr captured as text."""
    return subprocess.run(
        balloonctl_argv(*args, python_flags=python_flags),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env(env),
        stdin=subprocess.DEVNULL,
        check=False,
    )


def one_line_error(stderr: str) -> str:
    """The single error line balloonctl printed (and nothing else, no traceback)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith("balloonctl: error: "), stderr
    return lines[0]


def popen_cli(*args: str, python_flags: Sequence[str] = ()) -> subprocess.Popen[str]:
    """Start ``balloonctl ARGS...`` in the background, stdout and stderr piped (text)."""
    return subprocess.Popen(
        balloonctl_argv(*args, python_flags=python_flags),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=cli_env(),
    )


def stop_process(proc: subprocess.Popen[Any], grace: float = 5.0) -> int:
    """SIGTERM, then SIGKILL after ``grace`` seconds; the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=grace)
    return proc.returncode


def json_out(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The one JSON object a ``--json`` run printed (assertion error with the output if not)."""
    try:
        obj = json.loads(result.stdout)
    except json.JSONDecodeError as exc:
        raise AssertionError(
            f"stdout is not one JSON object ({exc}):\n{result.stdout!r}\nstderr: {result.stderr!r}"
        ) from None
    assert isinstance(obj, dict), obj
    return obj


# --------------------------------------------------------------------------------------------
# A raw QMP client (no qemu.qmp): for `quit` and for looking at the VM behind the CLI's back
# --------------------------------------------------------------------------------------------


class RawQmpClient:
    """One QMP connection over a unix socket, line by line, synchronous."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.file = self.sock.makefile("rwb")
        self.events: list[dict[str, Any]] = []
        self.greeting = self._read()
        assert "QMP" in self.greeting, self.greeting
        reply = self.execute_raw("qmp_capabilities")
        assert reply == {"return": {}}, reply

    def _read(self) -> dict[str, Any]:
        line = self.file.readline()
        if not line:
            raise EOFError("QMP socket closed")
        obj: dict[str, Any] = json.loads(line)
        return obj

    def execute_raw(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
        """Send a command; its reply (``{"return": ...}`` or ``{"error": ...}``)."""
        request: dict[str, Any] = {"execute": command}
        if arguments is not None:
            request["arguments"] = dict(arguments)
        self.file.write(json.dumps(request).encode() + b"\n")
        self.file.flush()
        while True:
            msg = self._read()
            if "event" in msg:
                self.events.append(msg)
                continue
            return msg

    def execute(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
        """Send a command; its ``return`` value (assertion error on an error reply)."""
        reply = self.execute_raw(command, arguments)
        assert "return" in reply, (command, reply)
        return reply["return"]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> RawQmpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def qmp_quit(path: str) -> dict[str, Any]:
    """QMP ``quit``, as a management tool would power the VM off; the reply."""
    with RawQmpClient(path) as client:
        reply: dict[str, Any] = client.execute_raw("quit")
        return reply


def query_actual(path: str) -> int:
    """``query-balloon`` ``actual`` straight from the VM (not through balloonctl)."""
    with RawQmpClient(path) as client:
        actual = client.execute("query-balloon")["actual"]
    assert isinstance(actual, int)
    return actual


# --------------------------------------------------------------------------------------------
# The simulated VM as a process
# --------------------------------------------------------------------------------------------


@dataclass
class Sim:
    """A ``balloonctl sim`` process and the VM it serves."""

    proc: subprocess.Popen[bytes]
    sock: str
    memory: str
    profile: str
    log: Path
    argv: list[str] = field(default_factory=list)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> int:
        """SIGTERM (then SIGKILL); the exit status."""
        return stop_process(self.proc)

    def kill(self) -> None:
        """SIGKILL: the VM dies without cleaning up (its socket file stays)."""
        if self.alive:
            self.proc.kill()
            self.proc.wait(timeout=10)


class SimFactory(Protocol):
    def __call__(
        self,
        *,
        name: str = "vm",
        memory: str = "512M",
        profile: str = "seed-sg",
        hotplug: bool = True,
        workload: str | None = None,
        rate: str | None = None,
        time_scale: float | None = None,
        qemu_version: str | None = None,
    ) -> Sim: ...


def _features_ready(sock: str) -> bool:
    result = run_cli("--json", "features", sock, timeout=15)
    if result.returncode != 0:
        return False
    try:
        report = json.loads(result.stdout)
    except json.JSONDecodeError:
        return False
    return bool(report.get("driver_ok"))


def wait_ready(sim: Sim, timeout: float = READY_TIMEOUT_S) -> None:
    """Until the socket exists and ``balloonctl --json features`` says driver_ok."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(sim.sock):
        if not sim.alive:
            raise AssertionError(
                f"sim exited {sim.proc.returncode} before serving: {sim.log_text()}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"sim never created {sim.sock}: {sim.log_text()}")
        time.sleep(0.02)
    while not _features_ready(sim.sock):
        if not sim.alive:
            raise AssertionError(f"sim exited {sim.proc.returncode}: {sim.log_text()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"the sim's guest driver never came up: {sim.log_text()}")
        time.sleep(0.05)


def _short_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="bctl-"))


@pytest.fixture
def sock_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory for sockets, short enough for sockaddr_un."""
    if len(str(tmp_path)) <= _MAX_DIR_LEN:
        yield tmp_path
        return
    short = _short_dir()
    try:
        yield short
    finally:
        shutil.rmtree(short, ignore_errors=True)


class SimPool:
    """``balloonctl sim`` processes started in one directory, stopped together."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: list[Sim] = []

    def start(
        self,
        *,
        name: str = "vm",
        memory: str = "512M",
        profile: str = "seed-sg",
        hotplug: bool = True,
        workload: str | None = None,
        rate: str | None = None,
        time_scale: float | None = None,
        qemu_version: str | None = None,
    ) -> Sim:
        """Start one and wait until its guest driver is up."""
        sock = str(self.directory / f"{name}.sock")
        argv = ["sim", "--qmp", sock, "--memory", memory, "--profile", profile]
        if not hotplug:
            argv.append("--no-hotplug")
        if workload is not None:
            argv += ["--workload", workload]
        if rate is not None:
            argv += ["--rate", rate]
        if time_scale is not None:
            argv += ["--time-scale", repr(time_scale)]
        if qemu_version is not None:
            argv += ["--qemu-version", qemu_version]
        log = self.directory / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                balloonctl_argv(*argv),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=cli_env(),
            )
        sim = Sim(proc=proc, sock=sock, memory=memory, profile=profile, log=log, argv=argv)
        self.started.append(sim)
        wait_ready(sim)
        return sim

    def stop_all(self) -> None:
        for sim in self.started:
            sim.stop()
        self.started.clear()


@pytest.fixture
def sim_factory(sock_dir: Path) -> Iterator[SimFactory]:
    """Start ``balloonctl sim`` processes (options as keywords); all stopped at teardown."""
    pool = SimPool(sock_dir)
    try:
        yield pool.start
    finally:
        pool.stop_all()


@pytest.fixture
def sim(sim_factory: SimFactory) -> Sim:
    """A 512M seed-sg VM, idle, on a hot-pluggable bus, its guest driver up."""
    return sim_factory()


@pytest.fixture(scope="module")
def shared_sim() -> Iterator[Sim]:
    """One 512M seed-sg VM for a module's tests that must leave its balloon as they found it
    (read-only commands and commands that must be refused before anything is sent)."""
    directory = _short_dir()
    pool = SimPool(directory)
    try:
        yield pool.start(name="shared")
    finally:
        pool.stop_all()
        shutil.rmtree(directory, ignore_errors=True)


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, step: float = 0.05) -> bool:
    """Poll ``predicate`` until true or ``timeout``; whether it became true."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(step)
