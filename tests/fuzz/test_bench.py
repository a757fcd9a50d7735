"""``python -m fuzz bench``: every target's rate against its goal, on the fake fuzz/ tree of
test_fuzz_cli (``boom`` finds its seed at once, ``calm`` never fails). The shape of the report
is checked, never a rate: those depend on the machine."""

from __future__ import annotations

from fuzz import runner
from fuzz.harness import TARGETS
from tests.fuzz.test_fuzz_cli import Tree, run, tree

__all__ = ["tree"]  # the fixture, imported for pytest

_ROW_KEYS = {"target", "exec_per_s", "exec_per_cpu_s", "execs", "seconds", "goal", "met"}


def test_bench_reports_every_target(tree: Tree) -> None:
    stale = tree.work / "corpus" / "calm" / "left-by-an-earlier-campaign"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"\x07\x07")
    result = run(tree, "--json", "bench", "--time", "1", "--workdir", str(tree.work))
    assert result.code == 3, result  # boom's seed is a finding, as `run` says
    report = result.json()
    rows = report["targets"]
    assert [row["target"] for row in rows] == ["boom", "calm"]
    for row in rows:
        assert _ROW_KEYS | {"findings"} <= set(row)
        assert row["goal"] is None and row["met"] is None  # no goal for a fake target
    calm = rows[1]
    assert calm["execs"] > 0 and calm["exec_per_s"] > 0 and calm["findings"] == []
    assert len(rows[0]["findings"]) == 1
    assert report["jobs"] == 1 and report["seconds_per_target"] == 1
    assert len(report["loadavg"]) == 2
    # from the committed corpus only: the seeds, nothing an earlier run left
    names = {p.name for p in (tree.work / "corpus" / "calm").iterdir()}
    assert "seed" in names and stale.name not in names


def test_goals_name_real_targets() -> None:
    assert set(runner.GOALS) <= set(TARGETS)
    assert runner.GOALS["driver_device_roundtrip"] == 1_000
    assert {runner.GOALS[t] for t in ("vring_image", "vring_ops", "balloon_requests")} == {10_000}


def test_render_bench_marks_met_and_missed() -> None:
    row = {"execs": 10, "seconds": 1.0, "exec_per_cpu_s": 12.0, "findings": []}
    report = {
        "seconds_per_target": 1,
        "loadavg": [0.5, 0.7],
        "findings": [],
        "targets": [
            {**row, "target": "vring_ops", "exec_per_s": 12_000, "goal": 10_000, "met": True},
            {**row, "target": "vring_image", "exec_per_s": 9_000, "goal": 10_000, "met": False},
            {**row, "target": "config", "exec_per_s": 4_000, "goal": None, "met": None},
        ],
    }
    lines = runner.render_bench(report).splitlines()
    assert lines[1].split()[:4] == ["vring_ops", "12,000", "10,000", "yes"]
    assert lines[2].split()[:4] == ["vring_image", "9,000", "10,000", "NO"]
    assert lines[3].split()[:4] == ["config", "4,000", "-", "-"]
