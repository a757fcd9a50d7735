"""``python -m fuzz``: the campaign runner's contract, against a tiny fake fuzz/ tree.

The fake tree has what a checkout has (entry points, replay.py, seed corpora, a dictionary)
and two targets: ``boom`` fails on any input starting with ``BOOM`` and its seed corpus has
one, so libFuzzer finds it while loading the seeds, at once and every time; ``calm`` never
fails. The runner runs as a subprocess, as a user's shell runs it from the checkout (its root
on the import path), with its state directory in the test's own tmp_path.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from balloonctl.errors import UsageError
from fuzz import runner

REPO = Path(__file__).resolve().parents[2]

_ENTRY = '''\
#!/usr/bin/env python3
"""Fake target {name}: coverage only from this function, a crash on BOOM if {crashes}."""
import sys

import atheris


@atheris.instrument_func
def test_one_input(data: bytes) -> None:
    if {crashes} and data[:4] == b"BOOM":
        raise ValueError("boom input")
    if len(data) > 2 and data[0] == 7:
        pass


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
'''

# replay.py's contract (see fuzz.runner); it imports the package so that the
# coverage command has something of balloonctl to measure.
_REPLAY = """\
import sys
from pathlib import Path

from balloonctl.units import format_size


def main() -> int:
    target, *names = sys.argv[1:]
    files = []
    for path in map(Path, names):
        files.extend(sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path])
    for path in files:
        format_size(len(path.read_bytes()))
        if target == "boom" and path.read_bytes()[:4] == b"BOOM":
            print(f"FINDING {target} {path}: ValueError: boom input")
            return 1
    print(f"ok {target}: {len(files)} inputs")
    return 0


sys.exit(main())
"""


@dataclass
class Tree:
    """A fake checkout: ``root/fuzz`` and ``root/fixtures``; ``work`` for campaign state."""

    root: Path
    work: Path

    @property
    def fuzz(self) -> Path:
        return self.root / "fuzz"

    def corpus(self, target: str) -> Path:
        return self.root / "fixtures" / "corpus" / target


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    root = tmp_path / "checkout"
    fuzz = root / "fuzz"
    fuzz.mkdir(parents=True)
    for name, crashes in (("boom", True), ("calm", False)):
        entry = fuzz / f"fuzz_{name}.py"
        entry.write_text(_ENTRY.format(name=name, crashes=crashes))
        entry.chmod(0o755)
        (root / "fixtures" / "corpus" / name).mkdir(parents=True)
    (fuzz / "replay.py").write_text(_REPLAY)
    (root / "fixtures" / "corpus" / "boom" / "bad").write_bytes(b"BOOM!")
    (root / "fixtures" / "corpus" / "boom" / "good").write_bytes(b"fine")
    (root / "fixtures" / "corpus" / "calm" / "seed").write_bytes(b"\x07\x01\x02")
    (root / "fixtures" / "dict").mkdir()
    (root / "fixtures" / "dict" / "calm.dict").write_text('kw="\\x07"\n')
    return Tree(root, tmp_path / "work")


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> dict[str, Any]:
        report = json.loads(self.out)  # the whole of stdout is one object
        assert isinstance(report, dict)
        return report

    def row(self) -> dict[str, Any]:
        """The one target's row of a ``fuzz run``/``minimize`` report."""
        (row,) = self.json()["targets"]
        assert isinstance(row, dict)
        return row


def fuzz_main(*argv: str, cache: Path) -> Result:
    """Run ``python -m fuzz`` as from the checkout's root (on the import path), but in
    ``cache``: the default campaign state goes there, never to the user's cache."""
    env = dict(os.environ, XDG_CACHE_HOME=str(cache))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    cache.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", "fuzz", *argv],
        capture_output=True,
        text=True,
        env=env,
        cwd=cache,
        timeout=300,
        check=False,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def run(tree: Tree, *argv: str) -> Result:
    return fuzz_main(*argv, "--fuzz-dir", str(tree.fuzz), cache=tree.work / "cache")


def assert_one_line_error(result: Result, code: int) -> None:
    assert result.code == code, result
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("fuzz: error: ")
    assert "Traceback" not in result.err


def test_run_exits_3_and_names_the_artifact(tree: Tree) -> None:
    result = run(
        tree,
        "--json",
        "run",
        "boom",
        "--time",
        "30",
        "--jobs",
        "1",
        "--workdir",
        str(tree.work),
    )
    assert result.code == 3, result
    report = result.json()
    findings = report["findings"]
    assert isinstance(findings, list) and findings
    for path in findings:
        assert Path(path).parent == tree.work / "artifacts"
        assert Path(path).name.startswith("boom-crash-")
        assert Path(path).read_bytes().startswith(b"BOOM")
        assert f"fuzz: finding: {path}" in result.err
    # The seeds were copied into the working corpus; the checkout's corpus is untouched.
    assert sorted(p.name for p in tree.corpus("boom").iterdir()) == ["bad", "good"]
    assert (tree.work / "corpus" / "boom" / "good").read_bytes() == b"fine"


def test_run_table_names_the_artifact(tree: Tree) -> None:
    result = run(tree, "run", "boom", "--time", "30", "--jobs", "1")
    assert result.code == 3, result
    artifacts = list((tree.work / "cache" / "balloonctl" / "fuzz" / "artifacts").iterdir())
    assert artifacts
    for path in artifacts:
        assert str(path) in result.out


def test_clean_target_exits_0(tree: Tree) -> None:
    result = run(
        tree,
        "--json",
        "run",
        "calm",
        "--time",
        "1",
        "--jobs",
        "1",
        "--workdir",
        str(tree.work),
    )
    assert result.code == 0, result
    report = result.json()
    assert report["findings"] == []
    (row,) = report["targets"]
    assert row["target"] == "calm" and row["mode"] == "in-process"
    assert row["execs"] > 0
    assert row["corpus_after"] >= 1
    assert sorted(p.name for p in tree.corpus("calm").iterdir()) == ["seed"]


def test_fork_mode_runs_with_atheris(tree: Tree) -> None:
    """--jobs 2 is libFuzzer's -fork=2: the jobs re-run the entry point by its path."""
    result = run(
        tree,
        "--json",
        "run",
        "calm",
        "--time",
        "2",
        "--jobs",
        "2",
        "--workdir",
        str(tree.work),
    )
    assert result.code == 0, result
    row = result.row()
    assert row["mode"] == "fork" and row["jobs"] == 2
    assert row["execs"] > 0


def test_all_runs_each_target_and_fails_on_the_finding(tree: Tree) -> None:
    result = run(
        tree,
        "--json",
        "run",
        "all",
        "--time",
        "2",
        "--jobs",
        "1",
        "--workdir",
        str(tree.work),
    )
    assert result.code == 3, result
    report = result.json()
    assert [row["target"] for row in report["targets"]] == ["boom", "calm"]
    assert all(Path(p).name.startswith("boom-") for p in report["findings"])


def test_reproduce_artifact_prints_one_line_and_exits_3(tree: Tree) -> None:
    artifact = tree.work / "boom-crash-0123abcd"
    artifact.parent.mkdir(parents=True)
    artifact.write_bytes(b"BOOM\xff")
    result = run(tree, "reproduce", str(artifact))
    assert result.code == 3, result
    assert result.out == f"FINDING boom {artifact}: ValueError: boom input\n"
    as_json = run(tree, "--json", "reproduce", str(artifact))
    assert as_json.code == 3
    report = as_json.json()
    assert report["finding"] is True
    assert (report["target"], report["type"], report["message"]) == (
        "boom",
        "ValueError",
        "boom input",
    )


def test_reproduce_infers_the_target_from_the_corpus_path(tree: Tree) -> None:
    bad = run(tree, "reproduce", str(tree.corpus("boom") / "bad"))
    assert bad.code == 3 and bad.out.startswith("FINDING boom ")
    good = run(tree, "reproduce", str(tree.corpus("boom") / "good"))
    assert good.code == 0, good
    assert good.out == "ok boom: 1 inputs\n"


def test_reproduce_needs_a_target_it_can_tell(tree: Tree) -> None:
    stray = tree.root / "stray"
    stray.write_bytes(b"BOOM")
    assert_one_line_error(run(tree, "reproduce", str(stray)), 2)
    told = run(tree, "reproduce", str(stray), "--target", "boom")
    assert told.code == 3


def test_reproduce_a_replay_that_breaks_its_contract_fails(tree: Tree) -> None:
    (tree.fuzz / "replay.py").write_text("raise SystemExit('replay.py: broken')\n")
    assert_one_line_error(run(tree, "reproduce", str(tree.corpus("boom") / "bad")), 1)


def test_missing_fuzz_dir_is_a_usage_error(tree: Tree) -> None:
    result = fuzz_main("run", "boom", "--fuzz-dir", str(tree.root / "nowhere"), cache=tree.work)
    assert_one_line_error(result, 2)


def test_no_targets_beside_the_runner_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runner copied away from its harnesses: the error names the directory it looked in."""
    alone = tmp_path / "fuzz"
    alone.mkdir()
    monkeypatch.setattr(runner, "FUZZ_DIR", alone)
    with pytest.raises(UsageError, match=f"no fuzz targets .*in {alone}"):
        runner.locate(None)


def test_default_fuzz_dir_is_the_runners_own() -> None:
    """Without --fuzz-dir the runner fuzzes the checkout's own targets, beside it."""
    tree = runner.locate(None)
    assert tree.fuzz_dir == REPO / "fuzz"
    assert "vring_image" in tree.targets()


def test_bad_target_is_a_usage_error(tree: Tree) -> None:
    result = run(tree, "run", "nosuch", "--time", "1")
    assert_one_line_error(result, 2)
    assert "boom, calm, all" in result.err
    assert_one_line_error(run(tree, "coverage", "nosuch"), 2)
    assert_one_line_error(run(tree, "reproduce", str(tree.root), "--target", "x"), 2)


def test_bad_options_are_usage_errors(tree: Tree) -> None:
    assert run(tree, "run", "calm", "--time", "0").code == 2
    assert run(tree, "run", "calm", "--jobs", "-1").code == 2
    assert run(tree, "run", "calm", "--jobs", "99999999").code == 2  # not 10**8 processes
    assert_one_line_error(run(tree, "reproduce", str(tree.root / "absent")), 2)


def test_minimize_merges_new_coverage_and_keeps_the_corpus(tree: Tree) -> None:
    found = tree.work / "found"
    found.mkdir(parents=True)
    for i, data in enumerate([b"\x07abc", b"\x07abc", b"x"]):
        (found / f"input{i}").write_bytes(data)
    keep = tree.corpus("calm") / "seed"
    result = run(
        tree,
        "--json",
        "minimize",
        "calm",
        "--from",
        str(found),
        "--workdir",
        str(tree.work),
    )
    assert result.code == 0, result
    row = result.row()
    assert row["before"] == 1
    assert row["after"] == len(list(tree.corpus("calm").iterdir()))
    assert keep.exists()  # nothing of the committed corpus is removed


def test_minimize_without_a_campaign_is_a_usage_error(tree: Tree) -> None:
    result = run(tree, "minimize", "calm", "--workdir", str(tree.work))
    assert_one_line_error(result, 2)
    assert "fuzz run calm" in result.err


def test_coverage_reports_the_package(tree: Tree) -> None:
    html = tree.work / "html"
    result = run(tree, "--json", "coverage", "calm", "--html", str(html))
    assert result.code == 0, result
    report = result.json()
    assert report["inputs"] == {"calm": 1}
    virtio = report["virtio"]
    assert isinstance(virtio, dict) and virtio["statements"] > 0
    assert report["virtio_percent"] == virtio["percent"]
    areas = report["areas"]
    assert isinstance(areas, dict) and areas["units.py"]["covered"] > 0
    assert (html / "index.html").is_file()
    table = run(tree, "coverage", "all")
    assert table.code == 3  # boom's corpus holds a failing input
    assert table.out.startswith("line coverage of balloonctl/virtio/ from 2 corpus(es)")
    assert "FINDING boom " in table.out


def test_parse_log_in_process() -> None:
    text = textwrap.dedent(
        """\
        INFO: Seed: 1
        #3\tINITED cov: 5 ft: 5 corp: 2/8b exec/s: 0 rss: 40Mb
        #16\tREDUCE cov: 7 ft: 9 corp: 2/7b lim: 5 exec/s: 0 rss: 40Mb L: 4/4 MS: 3 A-
        #900\tDONE   cov: 9 ft: 12 corp: 3/9b lim: 5 exec/s: 450 rss: 40Mb
        stat::number_of_executed_units: 900
        stat::average_exec_per_sec:     450
        """
    )
    stats = runner.parse_log(text)
    assert (stats.execs, stats.exec_per_s, stats.cov_start, stats.cov_end) == (900, 450, 5, 9)


def test_parse_log_fork() -> None:
    text = textwrap.dedent(
        """\
        INFO: -fork=2: 2 seed inputs, starting to fuzz in /tmp/x
        #838: cov: 5 ft: 5 corp: 2 exec/s 419 oom/timeout/crash: 0/0/0 time: 2s job: 1
        #2112: cov: 12 ft: 8 corp: 4 exec/s 424 oom/timeout/crash: 0/0/0 time: 3s job: 2
        INFO: exiting: 0 time: 3s
        """
    )
    stats = runner.parse_log(text)
    assert (stats.execs, stats.exec_per_s, stats.cov_start, stats.cov_end) == (2112, 424, 5, 12)


def test_parse_log_says_nothing_it_did_not_see() -> None:
    stats = runner.parse_log("#3\tINITED exec/s: 0 rss: 40Mb\n")
    assert stats == runner.LogStats(None, None, None, None, None)


def test_infer_target() -> None:
    known = ["vring_ops", "vring_ops_x", "config"]
    assert runner.infer_target(Path("/a/corpus/config/abc"), known) == "config"
    assert runner.infer_target(Path("/a/vring_ops_x-crash-12"), known) == "vring_ops_x"
    assert runner.infer_target(Path("/a/vring_ops-timeout-12"), known) == "vring_ops"
    assert runner.infer_target(Path("/a/vring_ops-slow-unit-12"), known) == "vring_ops"
    with pytest.raises(UsageError):
        runner.infer_target(Path("/a/vring_ops-notes"), known)


def test_real_target_short_run(tmp_path: Path) -> None:
    """The project's own vring_image target, five seconds on one core: no finding."""
    result = fuzz_main(
        "--json",
        "run",
        "vring_image",
        "--time",
        "5",
        "--jobs",
        "1",
        "--workdir",
        str(tmp_path / "work"),
        cache=tmp_path / "cache",
    )
    assert result.code == 0, result
    row = result.row()
    assert row["target"] == "vring_image" and row["execs"] > 0
    assert result.json()["findings"] == []


def _imported(stderr: str) -> list[str]:
    """The module names of a ``-X importtime`` log (``import time: self | cum | name``)."""
    names = []
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.append(line.rsplit("|", 1)[1].strip())
    return names


def test_balloonctl_imports_nothing_of_fuzz() -> None:
    """The product's command line neither builds nor loads the fuzzing tools (they live in
    the checkout's fuzz/, and balloonctl never imports fuzz/)."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "balloonctl", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0
    modules = _imported(proc.stderr)
    assert "balloonctl.cli.main" in modules  # the import log is really there
    assert [m for m in modules if m == "fuzz" or m.startswith("fuzz.")] == []
    assert [m for m in modules if m.startswith("balloonctl.fuzz")] == []
    assert "fuzz" not in proc.stdout  # nor offers it as a command


def test_balloonctl_fuzz_is_an_unknown_command(tmp_path: Path) -> None:
    """No stub is left behind: argparse refuses ``fuzz`` as any unknown command."""
    proc = subprocess.run(
        [sys.executable, "-m", "balloonctl", "fuzz", "run", "vring_image"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "invalid choice: 'fuzz'" in proc.stderr
    assert importlib.util.find_spec("balloonctl.fuzzcmd") is None
    assert importlib.util.find_spec("balloonctl.fuzzrunner") is None


def test_fuzz_help_lists_every_action(tmp_path: Path) -> None:
    result = fuzz_main("--help", cache=tmp_path)
    assert result.code == 0, result
    assert result.out.startswith("usage: python -m fuzz ")
    for action in ("run", "reproduce", "minimize", "coverage", "differential"):
        assert f"    {action}" in result.out, action
    assert "--json" in result.out
