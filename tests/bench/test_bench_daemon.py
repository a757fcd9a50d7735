"""``balloonctl bench daemon`` at a small size, as a whole process: the report's shape, and
that the daemon was measured doing real work (ticks, VMs answering, targets sent).

Timings are not asserted: the speed goal (1000 VMs, tick < 1 s, < 20 % of a core) is what
the bench measures, not what a test on a shared machine can hold it to.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import tempfile

from balloonctl.bench.daemon import GOAL_TEXT


def _bench(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "BALLOONCTL_CONFIG"}
    return subprocess.run(
        [sys.executable, "-m", "balloonctl", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


def _leftovers() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "balloonctl-bench-daemon-*")))


def test_json_report_measures_ticks_and_moves_memory() -> None:
    before = _leftovers()
    done = _bench("--json", "bench", "daemon", "--vms", "5", "--ticks", "4", "--interval", "0.5")
    assert done.returncode == 0, done.stderr
    r = json.loads(done.stdout)

    assert r["benchmark"] == "daemon"
    assert (r["vms"], r["ticks"], r["interval_s"]) == (5, 4, 0.5)
    assert r["memory_bytes"] == 256 << 20
    assert set(r["workloads"]) >= {"idle", "steady", "spiky"}
    assert r["sim_start_s"] > 0
    assert set(r["cpu_wait_percent"]) == {"daemon", "sim"}
    assert r["loadavg_1m"] >= 0

    w = r["warmup"]
    assert w["ticks"] >= 1 and len(w["samples"]) == w["ticks"]
    assert w["all_ready"] is True
    assert w["connect_s"] > 0 and w["first_tick_s"] > 0
    assert all(s["phase"] == "warmup" for s in w["samples"])
    # Warm-up ends once every VM answered with stats, on a balanced host: nothing sent.
    assert w["stats_only"] is not None
    assert (w["stats_only"]["answered"], w["stats_only"]["sent"]) == (5, 0)

    samples = r["samples"]
    assert len(samples) == 4
    assert [s["phase"] for s in samples] == ["pressure", "pressure", "calm", "calm"]
    assert [s["mode"] for s in samples] == ["pressure", "pressure", "calm", "calm"]
    ticks = [s["tick"] for s in samples]
    assert ticks == sorted(ticks) and ticks[0] == w["ticks"] + 1
    for s in samples:
        assert s["seconds"] > 0 and s["period_s"] > 0 and s["cpu_s"] >= 0
        assert s["answered"] == 5

    for key in ("tick_s", "cpu_percent", "cpu_s_per_tick"):
        spread = r[key]
        assert set(spread) == {"median", "p95", "max", "mean"}
        assert 0 <= spread["median"] <= spread["max"]
        assert spread["p95"] <= spread["max"]
    assert r["answered"] == {"min": 5, "max": 5}
    assert r["core_percent"] >= 0 and r["mean_period_s"] > 0

    # The host was under pressure, then calm: the daemon set targets both ways.
    sent = r["sent"]
    assert sent["total"] == sum(s["sent"] for s in samples) > 0
    assert sent["pressure"] > 0
    assert sent["total"] == sent["pressure"] + sent["calm"]
    # The daemon logged as `balloonctl daemon` does (a line per move at least), into its
    # file and not onto the bench's terminal.
    assert r["log_lines"] >= sent["total"]
    assert "INFO" not in done.stderr

    goal = r["goal"]
    assert goal["text"] == GOAL_TEXT
    assert (goal["vms"], goal["tick_s"], goal["cpu_percent"]) == (1000, 1.0, 20.0)
    assert goal["checks"]["vms"] is False and goal["met"] is False  # 5 VMs is not 1000
    assert goal["checks"]["answering"] is True

    # The sim and the temporary directory are gone.
    assert _leftovers() <= before
    assert "Traceback" not in done.stderr


def test_table_and_usage_errors() -> None:
    done = _bench("bench", "daemon", "--vms", "2", "--ticks", "2", "--interval", "0.5")
    assert done.returncode == 0, done.stderr
    assert "tick latency (s)" in done.stdout
    assert "CPU/tick (% of intvl)" in done.stdout
    assert "over the run: the daemon took" in done.stdout
    assert GOAL_TEXT in done.stdout

    for bad in (["--vms", "0"], ["--ticks", "1"], ["--interval", "0"], ["--memory", "1M"]):
        done = _bench("bench", "daemon", *bad)
        assert done.returncode == 2, (bad, done.stderr)
        assert done.stderr.startswith("balloonctl: error:"), done.stderr
