"""``balloonctl bench seed`` at a small size: the report's shape and what each path did.

Timings are not asserted (they are the benchmark's output, not a test); counts are.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from balloonctl.bench.seed import SeedBenchConfig, run
from balloonctl.cli.main import main
from balloonctl.errors import UsageError
from balloonctl.virtio.memory import Backing

SMALL = SeedBenchConfig(memory=64 << 20, inflate=48 << 20, kernel=8 << 20)
PAGES = (48 << 20) >> 12


@pytest.mark.parametrize("backing", [Backing.ANON, Backing.MEMFD])
def test_every_path_inflates_and_frees_real_memory(backing: Backing) -> None:
    report = run(SeedBenchConfig(**{**SMALL.__dict__, "backing": backing}))
    assert report["backing"] == backing.value
    assert report["floor_s"] > 0
    paths = report["paths"]
    assert set(paths) == {"pfn", "pfn-compact", "sg"}
    for name, p in paths.items():
        assert p["freed_bytes"] >= (48 << 20) * 0.95, name  # real memory went back
        assert set(p["stages"]) == {"allocate", "send", "translate", "discard"}
        assert sum(s["percent"] for s in p["stages"].values()) == pytest.approx(100, abs=0.5)
    # The stages are measured where the work is: page-by-page discards dominate pfn, and
    # every path that inflated spent time discarding.
    pfn_stages = paths["pfn"]["stages"]
    assert pfn_stages["discard"]["ms"] > pfn_stages["translate"]["ms"]
    assert all(p["stages"]["discard"]["ms"] > 0 for p in paths.values())
    assert paths["pfn"]["kicks"] == PAGES // 256  # one request per 256 PFNs
    assert paths["pfn"]["discard_calls"] == PAGES  # QEMU 7.2: one call a page
    assert paths["pfn-compact"]["discard_calls"] == PAGES // 256  # one range a request
    assert paths["sg"]["kicks"] == 1 and paths["sg"]["descriptors"] == 1
    assert paths["sg"]["pfn_bytes"] == 0
    assert paths["pfn"]["pfn_bytes"] == PAGES * 4


def test_cli_json_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "seed.png"
    code = main(
        ["--json", "bench", "seed", "--memory", "32M", "--inflate", "16M", "--plot", str(png)]
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert {"memory_bytes", "inflate_bytes", "backing", "floor_s", "paths"} <= set(report)
    assert {"wall_s", "kicks", "descriptors", "discard_calls", "stages"} <= set(
        report["paths"]["sg"]
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_impossible_inflate_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="cannot inflate"):
        run(SeedBenchConfig(memory=64 << 20, inflate=64 << 20, kernel=8 << 20))
