"""The ``balloonctl`` CLI as a process, as a user's shell runs it, with no configuration from
the machine the tests run on; and the checks every CLI test makes of its output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def cli_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment every CLI run gets: no configuration from the host.

    ``$BALLOONCTL_CONFIG`` and ``$LIBVIRT_DEFAULT_URI`` are dropped and ``$XDG_CONFIG_HOME``
    points nowhere, so only an explicit ``--config`` (or ``-c URI``) reaches the CLI;
    ``-v`` detail and colour are off, output unbuffered (a test reading a background
    command's lines gets them as they are printed).
    """
    env = {
        k: v for k, v in os.environ.items() if k not in ("BALLOONCTL_CONFIG", "LIBVIRT_DEFAULT_URI")
    }
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


def one_line_error(stderr: str) -> str:
    """The single error line balloonctl printed (and nothing else, no traceback): the
    contract for every failure (docs/contracts.md, "Errors: one line, never a traceback")."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith("balloonctl: error: "), stderr
    return lines[0]


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


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, step: float = 0.05) -> bool:
    """Poll ``predicate`` until true or ``timeout``; whether it became true."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(step)
