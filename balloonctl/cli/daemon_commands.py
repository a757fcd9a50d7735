"""The CLI's side of ``balloonctl daemon --once``: the tick's decisions as a report and a table.

Rendering is the command line's job, so it lives with the other commands' reports
(``vm_commands``, ``vring_commands``) rather than in the daemon, which only produces a
:class:`~balloonctl.daemon.loop.TickReport`; ``balloonctl.cli.main`` runs the daemon and
prints what this module makes of its report. The JSON object's shape is a contract
(docs/contracts.md).
"""

from __future__ import annotations

from typing import Any

from balloonctl.daemon.loop import TickReport
from balloonctl.units import format_size


def decisions_json(report: TickReport) -> dict[str, Any]:
    """``--json --once``: ``{"decisions": [{vm, current_bytes, target_bytes, reason}], "host"}``."""
    plan = report.plan
    out: dict[str, Any] = {
        "decisions": [
            {
                "vm": d.vm,
                "current_bytes": d.current,
                "target_bytes": d.target,
                "reason": d.reason,
            }
            for d in (plan.decisions if plan is not None else ())
        ]
    }
    host = report.host
    out["host"] = (
        None
        if host is None or plan is None
        else {
            "mode": plan.mode.value,
            "total_bytes": host.total,
            "available_bytes": host.available,
            "psi_some_avg10": host.psi_some_avg10,
        }
    )
    return out


def render_decisions(data: dict[str, Any]) -> str:
    """``--once`` without ``--json``: one line per VM."""
    lines = []
    host = data.get("host")
    if host is not None:
        lines.append(
            f"host: {host['mode']}, {format_size(host['available_bytes'])} of "
            f"{format_size(host['total_bytes'])} available"
        )
    width = max((len(d["vm"]) for d in data["decisions"]), default=2)
    for d in data["decisions"]:
        lines.append(
            f"{d['vm']:<{width}}  {format_size(d['current_bytes']):>10} -> "
            f"{format_size(d['target_bytes']):>10}  {d['reason']}"
        )
    if not data["decisions"]:
        lines.append("no VM answered")
    return "\n".join(lines) + "\n"
