"""``balloonctl demo`` end to end, shortened: the tour runs, then the auto-balloon daemon
moves memory (the idle VM gives under host pressure and grows back when the host is calm).

Run as a whole process, as ``make demo`` runs it; its simulated VMs are its own children.
"""

from __future__ import annotations

import re

from tests.support.cli import run_cli

SIZE = r"\s*([\d.]+) GiB"


def test_demo_tour_then_daemon_moves_memory() -> None:
    done = run_cli("demo", "--duration", "2", "--daemon-ticks", "12", timeout=240)
    out = done.stdout
    assert done.returncode == 0, done.stderr + out
    assert "Traceback" not in done.stderr

    # The tour: three VMs with their own workloads, the CLI's commands against them.
    assert "$ balloonctl list --qmp-dir $DIR" in out
    for vm in ("web", "batch", "idle"):
        assert re.search(rf"^{vm}\s+running", out, re.MULTILINE), vm
    assert "(reached after" in out
    assert "NOT reached" not in out

    # The daemon part: connected, then the host under pressure, then calm.
    assert "$ balloonctl daemon --config $DIR/autoballoon.toml" in out
    ticks = re.findall(r"^tick\s+\d+ (\w+)\s+host", out, re.MULTILINE)
    assert "pressure" in ticks and "calm" in ticks, ticks
    assert ticks.index("calm") > ticks.index("pressure")
    for vm in ("web", "batch", "idle", "leak"):
        assert re.search(rf"^tick .*\b{vm}{SIZE}", out, re.MULTILINE), vm

    # One line per target set, with the policy's reason: idle gave, then grew back.
    assert re.search(r"^    idle: .* -> .*: give: host available", out, re.MULTILINE), out
    assert re.search(r"^    idle: .* -> .*: grow back: host available", out, re.MULTILINE), out

    # The summary: the idle VM shrank under pressure and grew back in calm.
    m = re.search(
        rf"^idle\s+started{SIZE}, smallest{SIZE}, largest{SIZE}, ended{SIZE}$", out, re.MULTILINE
    )
    assert m is not None, out
    started, smallest, largest, ended = (float(g) for g in m.groups())
    assert smallest < started, m.group(0)
    assert ended > smallest, m.group(0)
    assert largest >= ended

    assert "# Done: all 4 simulated VMs stopped." in out
