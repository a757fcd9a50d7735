"""``balloonctl bench vring-parse`` at a small size: it builds the images, runs each parse in
a child, and reports what the child used. Times are reported, never asserted."""

from __future__ import annotations

import json
import sys

import pytest

from balloonctl.bench.vring_parse import WORST_CASES, format_report, parse_in_child, run
from balloonctl.cli.main import main


def test_small_bench_reports_every_image() -> None:
    report = run(repeat=1, queue_size=64, memory=1 << 20)
    assert list(report["images"]) == list(WORST_CASES)
    for kind, image in report["images"].items():
        # The shared indirect table is refused (IndirectTableInvalid); the rest parse.
        assert image["exit_codes"] == ([3] if kind == "review-shared-table" else [0])
        assert image["max_rss_bytes"] > 1 << 20  # the child's own, in bytes
        assert image["output_bytes"] > 0
        assert len(image["seconds"]) == 1 and not image["timed_out"]
    table = format_report(report)
    assert "scattered-out" in table and "goal < 2 s" in table


def test_a_run_past_its_timeout_is_killed() -> None:
    sleep = ["-c", "import time; time.sleep(30)"]
    run_ = parse_in_child(sleep, "/dev/null", timeout=0.5, program=(sys.executable,))
    assert run_.timed_out and run_.exit_code == -9


def test_unknown_image_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "vring-parse", "--image", "nope"]) == 2
    assert "no worst case nope" in capsys.readouterr().err


def test_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--json", "bench", "vring-parse", "--image", "sg-chunks", "--repeat", "1"]
    code = main([*argv, "--queue-size", "16", "--memory", "1M"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report["images"]) == ["sg-chunks"]
    assert report["goal_rss_bytes"] == 512 << 20
