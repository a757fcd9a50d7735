"""``balloonctl bench decode`` at a small size: every path decodes every page."""

from __future__ import annotations

import pytest

from balloonctl.bench.decode import DecodeBenchConfig, run
from balloonctl.errors import UsageError


def test_small_decode_bench_counts() -> None:
    report = run(DecodeBenchConfig(memory=128 << 20, inflate=32 << 20, repeat=1, run_pages=16))
    pages = (32 << 20) >> 12
    assert report["pages"] == pages
    assert report["paths"]["pfn"]["chains"] == pages // 256
    assert report["paths"]["pfn"]["bytes_read"] == pages * 4
    assert report["paths"]["sg"]["bytes_read"] == 0
    assert set(report["paths"]) == {"pfn", "sg", "pfn-python"}


def test_inflate_below_a_page_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="at least one page"):
        run(DecodeBenchConfig(memory=128 << 20, inflate=0))
